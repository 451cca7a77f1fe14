"""Bone density scores shared by the model protocols: T-scores, WHO grades and the
:class:`~screener.findings.Measurement` objects that carry them into the SR.

T-score references live in ONE table, :mod:`screener.references` (selectable per site in
the configuration); :func:`apply_references` puts the selected one on every T-score.
"""
from __future__ import annotations

from typing import Any, Sequence

from pydicom.sr.coding import Code

from screener import references
from screener.findings import Finding, Measurement
from screener.reporting import codes

__all__ = ["apply_references", "bmd_measurement", "flag", "grade_category", "probability_measurement",
           "t_score", "t_score_measurement", "tbs_measurement", "who_grade", "yam_percent_measurement"]

#: WHO grade of a T-score (one definition: :func:`screener.references.who_grade`)
who_grade = references.who_grade


def t_score(bmd: float, mean: float, sd: float) -> float:
    """T-score ``(bmd - mean) / sd`` against an explicit reference.

    Reports take their reference from :func:`screener.references.t_score_for` (or have it
    replaced by :func:`apply_references`); this stays for callers that state their own.

    Raises
    ------
    ValueError
        If ``sd`` is not positive.
    """
    if not sd > 0:
        raise ValueError(f"T-score reference SD must be > 0 (got {sd})")
    return (float(bmd) - float(mean)) / float(sd)


def bmd_measurement(value: float, *, site: str = "", name: str = "") -> Measurement:
    """Areal BMD (g/cm2) estimated by a model: coded :data:`codes.ABMD_ESTIMATE`, never a DXA
    LOINC code (the SR adds the "estimated by algorithm from <modality>" method)."""
    return Measurement(name or f"{site} BMD", float(value), codes.UNIT_G_CM2[0], codes.ABMD_ESTIMATE,
                       unit_meaning=codes.UNIT_G_CM2[1])


def t_score_measurement(value: float, *, site: str = "", name: str = "",
                        reference: dict[str, Any] | None = None) -> Measurement:
    """T-score (no unit) of a model's BMD estimate: :data:`codes.TSCORE_ESTIMATE` with its
    ``reference`` record (population, mean, SD; :func:`screener.references.t_score_for`)."""
    return Measurement(name or f"{site} T-score", float(value), codes.UNIT_NONE[0], codes.TSCORE_ESTIMATE,
                       unit_meaning=codes.UNIT_NONE[1], reference=dict(reference) if reference else None)


def apply_references(findings: Sequence[Finding], *, sex: str | None = None, config: Any = None) -> None:
    """Recompute every T-score estimate from its finding's BMD estimate with the ONE reference the
    configuration selects for the site (:mod:`screener.references`), in place.

    A finding whose category is a WHO grade gets the grade of the new T-score; its
    ``details["t_score_reference"]`` becomes the reference record.  Findings without both an
    areal-BMD estimate and a T-score estimate, or at a site without a reference, are left alone.
    """
    for f in findings:
        bmd = next((m for m in f.measurements if m.concept == codes.ABMD_ESTIMATE), None)
        tms = [m for m in f.measurements if m.concept == codes.TSCORE_ESTIMATE]
        if bmd is None or not tms:
            continue
        try:
            t, rec = references.t_score_for(bmd.value, f.site, sex, config)
        except KeyError:
            continue
        for m in tms:
            m.value, m.reference = t, rec
        f.details["t_score_reference"] = rec
        if f.category in ("normal", "osteopenia", "osteoporosis"):
            f.category, f.category_code = grade_category(who_grade(t))
        if "who_grade" in f.details:
            f.details["who_grade"] = who_grade(t)


def tbs_measurement(value: float, name: str = "TBS") -> Measurement:
    """Trabecular bone score (no unit)."""
    return Measurement(name, float(value), codes.UNIT_NONE[0], codes.TBS, unit_meaning=codes.UNIT_NONE[1])


def yam_percent_measurement(value: float, name: str = "%YAM") -> Measurement:
    """BMD as percent of the young-adult mean."""
    return Measurement(name, float(value), "%", codes.YAM_PERCENT, unit_meaning="percent")


def probability_measurement(name: str, p: float, *, of: str) -> Measurement:
    """A model probability ``p`` (0-1) of the event ``of`` reported in percent.

    Parameters
    ----------
    name : str
    p : float
    of : str
        The event, a key of :data:`codes.PROBABILITY_OF` (``"scoliosis"``, ``"unreliable"``,
        ``"fracture"``, ``"normal"``, ``"osteopenia"``, ``"osteoporosis"``): the coded concept
        names what this is the probability of.

    Raises
    ------
    ValueError
        ``p`` outside [0, 1] or an unknown event.
    """
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"probability {name!r} must be in [0, 1] (got {p})")
    if of not in codes.PROBABILITY_OF:
        raise ValueError(f"probability {name!r}: unknown event {of!r}; known: {', '.join(codes.PROBABILITY_OF)}")
    return Measurement(name, 100.0 * float(p), "%", codes.PROBABILITY_OF[of], unit_meaning="percent")


def grade_category(grade: str) -> tuple[str, Code]:
    """``(category, coded value)`` for :class:`~screener.findings.Finding`."""
    return grade, codes.category_code(grade)


def flag(text: str) -> str:
    """A free-text caveat for :attr:`Finding.flags` (trimmed to the SR's 1024-character text limit)."""
    return " ".join(str(text).split())[:1024]
