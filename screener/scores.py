"""Bone density scores, their one home: T-scores, WHO and JOS grades, and the
:class:`~screener.findings.Measurement` objects that carry them into the SR.

T-score references live in ONE table, :mod:`screener.references` (selectable per site in
the configuration); :func:`t_score_for` computes a T-score with the selected one and
:func:`apply_references` puts it on every T-score of a study. The training code
(``training.phantoms.labels``, ``training.metrics``) grades with these same functions.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from pydicom.sr.coding import Code

from screener import references
from screener.findings import Finding, Measurement
from screener.reporting import codes

__all__ = ["apply_references", "bmd_measurement", "flag", "grade_category", "jos_grade", "probability_measurement",
           "t_score", "t_score_for", "t_score_measurement", "tbs_measurement", "who_grade",
           "yam_percent_measurement"]


def t_score(bmd: Any, mean: float, sd: float) -> Any:
    """T-score ``(bmd - mean) / sd`` against an explicit reference.

    Reports take their reference from :func:`t_score_for` (or have it replaced by
    :func:`apply_references`); this is for callers that state their own (training metrics).

    Parameters
    ----------
    bmd : float or array_like
        Areal BMD (g/cm2); an array gives an array (float64).
    mean, sd : float
        The reference's young-adult mean and SD.

    Raises
    ------
    ValueError
        If ``sd`` is not positive.
    """
    if not sd > 0:
        raise ValueError(f"T-score reference SD must be > 0 (got {sd})")
    if np.ndim(bmd):
        return (np.asarray(bmd, dtype=np.float64) - float(mean)) / float(sd)
    return (float(bmd) - float(mean)) / float(sd)


def t_score_for(bmd: float, site: str, sex: str | None = None, config: Any = None
                ) -> tuple[float, dict[str, Any]]:
    """T-score of an areal BMD at ``site`` and the record of the reference used.

    Parameters
    ----------
    bmd : float
        Areal BMD, g/cm2.
    site : str
        The finding's site label (:func:`screener.references.reference_site`).
    sex : str, optional
        PatientSex.
    config : Config, optional
        Selects the reference per site (``reference_l1``, ``reference_l1_l4``,
        ``reference_femoral_neck``, ``reference_total_hip``).

    Returns
    -------
    (float, dict)
        The T-score and :meth:`screener.references.Reference.to_record` plus ``selection`` and
        ``sex_used``.

    Raises
    ------
    ValueError
        For a non-finite BMD.
    """
    if not math.isfinite(float(bmd)):
        raise ValueError(f"BMD must be finite (got {bmd})")
    ref, sex_used = references.resolve(site, sex, config)
    rec = {**ref.to_record(), "selection": references.selection_for(site, config), "sex_used": sex_used}
    return t_score(bmd, ref.mean, ref.sd), rec


def who_grade(t: float) -> str:
    """WHO category of a T-score: ``"osteoporosis"`` (<= -2.5), ``"osteopenia"`` (< -1) or ``"normal"``.

    Raises
    ------
    ValueError
        For a non-finite T-score.
    """
    if not math.isfinite(t):
        raise ValueError(f"T-score must be finite (got {t})")
    if t <= -2.5:
        return "osteoporosis"
    if t < -1.0:
        return "osteopenia"
    return "normal"


def jos_grade(yam_pct: float) -> str:
    """JOS 2012 category of a %YAM: ``"osteoporosis"`` (<= 70), ``"low bone mass"`` (< 80) or ``"normal"``.

    Raises
    ------
    ValueError
        For a non-finite %YAM.
    """
    if not math.isfinite(yam_pct):
        raise ValueError(f"%YAM must be finite (got {yam_pct})")
    if yam_pct <= 70.0:
        return "osteoporosis"
    if yam_pct < 80.0:
        return "low bone mass"
    return "normal"


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
            t, rec = t_score_for(bmd.value, f.site, sex, config)
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
