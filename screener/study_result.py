"""The study-level screening result: one category for the patient from everything measured.

The rule (written out for readers in ``docs/study-result.md``; this module is its only code):

1. **Evidence.**  Every finding that grades bone density casts one vote, ranked by how it was
   obtained (:data:`EVIDENCE`): a measured L1 attenuation first (Pickhardt et al. 2013
   thresholds, measured on the image), then the model estimates in the order of their validated
   accuracy on the virtual cohort's test split.  The per-vertebra findings of
   ``lumbar_sagittal`` do not vote (their L1-L4 finding does); ``dxa_spine`` grades no density,
   its "spine BMD unreliable" call is listed as a note.
2. **Each vote** has a grade (``osteoporosis``, ``osteopenia``, ``normal``; or none when it is
   indeterminate) and the set of grades compatible with its uncertainty:

   * L1 attenuation: the band of the HU used for the category (contrast-adjusted when
     enhanced): <= 110 HU osteoporosis, >= 160 HU normal, between: indeterminate (no grade) and
     compatible with osteopenia (110 and 160 HU are 80 and 120 mg/cm3 at 0.75 mg/cm3 per HU,
     the ACR QCT low-bone-density band); the compatible set is every band reached within
     +/- :data:`HU_LSC` HU (the repeat-scan least significant change, Binkley 2025).
   * Model T-scores: the WHO grade of the T-score; compatible: the grades its prediction
     interval reaches, or, without an interval, T +/- :data:`DEFAULT_T_TOLERANCE`.
   * Class probabilities (``femur_coronal``): the most probable class; compatible: the
     smallest set of classes holding :data:`CLASS_SET_MASS` of the probability.
3. **Combination.**  Two votes whose compatible sets do not overlap disagree beyond their
   intervals: the result is ``"discordant — review"``, with no grade.  Otherwise the grade of
   the highest-ranked vote that has one, moved to the nearest grade every vote is compatible
   with when it lies outside that common set; ``"likely <grade>"``.  Only indeterminate votes:
   ``"indeterminate"``; no vote at all (e.g. a DXA image read for its reliability only):
   ``"no bone density grade"``.
4. Every contributing measurement is listed with its method, value, grade and compatible set.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from screener.findings import Finding
from screener.reporting import codes
from screener.scores import who_grade

__all__ = ["CLASS_SET_MASS", "DEFAULT_T_TOLERANCE", "DISCORDANT", "EVIDENCE", "GRADES", "HU_LSC", "NOT_GRADED",
           "Contribution", "StudyResult", "study_result"]

#: grades from lowest to highest density
GRADES = ("osteoporosis", "osteopenia", "normal")
DISCORDANT = "discordant \u2014 review"
INDETERMINATE = "indeterminate"
NOT_GRADED = "no bone density grade"
#: Pickhardt et al. 2013 L1 thresholds (HU, 120 kVp)
HU_OSTEOPOROSIS, HU_NORMAL = 110.0, 160.0
#: least significant change of L1 HU between repeat scans (Binkley et al. 2025: 10-16 HU)
HU_LSC = 15.0
#: half-width (T-score units) used for an estimate without a prediction interval
DEFAULT_T_TOLERANCE = 0.5
#: probability mass of a classifier's compatible set
CLASS_SET_MASS = 0.9

#: protocol -> (rank, method in words, validated accuracy in words); lower rank = stronger evidence
EVIDENCE: dict[str, tuple[int, str, str]] = {
    "l1_attenuation": (0, "L1 attenuation measured on CT (Pickhardt thresholds)",
                       "Pickhardt 2013: <= 110 HU > 90 % specific, 160 HU 90 % sensitive for DXA osteoporosis"),
    "l1_axial": (1, "L1 BMD estimated by algorithm from CT (Kang et al.)",
                 "virtual-cohort test r 0.988, T < -1 accuracy 0.94"),
    "lumbar_sagittal": (2, "L1-L4 BMD estimated by algorithm from CT (Yoshida et al.)",
                        "virtual-cohort test patient BMD r 0.923"),
    "hip_xray": (3, "femoral neck BMD estimated by algorithm from radiograph (BMD-GAN)",
                 "virtual-cohort test PCC 0.882, MAE 0.056 g/cm2"),
    "femur_coronal": (4, "WHO class estimated by algorithm from CT (Ha et al.)",
                      "virtual-cohort test 3-class accuracy 0.860"),
}


@dataclass
class Contribution:
    """One vote of the rule (module docstring).

    Attributes
    ----------
    protocol, site : str
    method : str
        How the value was obtained, in words (:data:`EVIDENCE`).
    value : str
        The value the vote rests on, in words (``"L1 97.2 HU"``, ``"T -2.71 (BMD 0.654 g/cm2)"``).
    grade : str or None
        Its grade, ``None`` when indeterminate.
    compatible : list of str
        Grades compatible with its uncertainty, lowest first.
    uncertainty : str
        Where ``compatible`` comes from.
    rank : int
        Evidence rank (0 strongest).
    """

    protocol: str
    site: str
    method: str
    value: str
    grade: str | None
    compatible: list[str]
    uncertainty: str
    rank: int

    def line(self) -> str:
        """One line for the SR and ``screener results``."""
        grade = self.grade or INDETERMINATE
        return (f"{self.method}, {self.site}: {self.value} -> {grade} "
                f"(compatible: {', '.join(self.compatible)}; {self.uncertainty})")


@dataclass
class StudyResult:
    """The study-level result: ``category``, the votes and notes (module docstring)."""

    category: str
    contributions: list[Contribution] = field(default_factory=list)
    agreement: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def grade(self) -> str | None:
        """The WHO grade of a confident category, else ``None``."""
        return self.category.removeprefix("likely ") if self.category.startswith("likely ") else None

    @property
    def methods(self) -> list[str]:
        """The contributing methods (protocol names), strongest evidence first."""
        return list(dict.fromkeys(c.protocol for c in self.contributions))

    def to_record(self) -> dict[str, Any]:
        """JSON-able dict (``category``, ``agreement``, ``methods``, ``contributions``, ``notes``)."""
        return {"category": self.category, "agreement": self.agreement, "methods": self.methods,
                "contributions": [asdict(c) for c in self.contributions], "notes": list(self.notes)}


def _band_set(lo: float, hi: float, cuts: tuple[float, float]) -> list[str]:
    """Grades whose band ``[lo, hi]`` reaches; cuts = (osteoporosis upper, normal lower)."""
    out = []
    if lo <= cuts[0]:
        out.append("osteoporosis")
    if hi > cuts[0] and lo < cuts[1]:
        out.append("osteopenia")
    if hi >= cuts[1]:
        out.append("normal")
    return out


def _t_set(lo: float, hi: float) -> list[str]:
    """WHO grades a T-score interval reaches (osteoporosis <= -2.5 < osteopenia < -1 <= normal)."""
    out = []
    if lo <= -2.5:
        out.append("osteoporosis")
    if hi > -2.5 and lo < -1.0:
        out.append("osteopenia")
    if hi >= -1.0:
        out.append("normal")
    return out


def _measure(f: Finding, *names: str) -> Any:
    for n in names:
        for m in f.measurements:
            if m.name == n:
                return m
    return None


def _attenuation_vote(f: Finding, rank: int, method: str) -> Contribution | None:
    m = _measure(f, "L1 attenuation mean, contrast-adjusted", "L1 attenuation mean")
    if m is None:
        return None
    hu = float(m.value)
    grade = "osteoporosis" if hu <= HU_OSTEOPOROSIS else "normal" if hu >= HU_NORMAL else None
    compatible = _band_set(hu - HU_LSC, hu + HU_LSC, (HU_OSTEOPOROSIS, HU_NORMAL))
    adj = ", contrast-adjusted" if "adjusted" in m.name else ""
    return Contribution(f.protocol, f.site, method, f"L1 {hu:.1f} HU{adj}", grade, compatible,
                        f"+/- {HU_LSC:g} HU repeat-scan least significant change", rank)


def _t_vote(f: Finding, rank: int, method: str) -> Contribution | None:
    t = next((m for m in f.measurements if m.concept == codes.TSCORE_ESTIMATE), None)
    if t is None:
        return None
    bmd = next((m for m in f.measurements if m.concept == codes.ABMD_ESTIMATE), None)
    tv = float(t.value)
    if t.interval is not None:
        lo, hi = t.interval
        unc = f"{100 * t.interval_level:.0f} % prediction interval T {lo:+.2f} to {hi:+.2f}"
    elif bmd is not None and bmd.interval is not None and t.reference:
        mean, sd = float(t.reference["mean"]), float(t.reference["sd"])
        lo, hi = ((bmd.interval[0] - mean) / sd, (bmd.interval[1] - mean) / sd)
        unc = f"{100 * bmd.interval_level:.0f} % prediction interval T {lo:+.2f} to {hi:+.2f}"
    else:
        lo, hi = tv - DEFAULT_T_TOLERANCE, tv + DEFAULT_T_TOLERANCE
        unc = f"no prediction interval: T +/- {DEFAULT_T_TOLERANCE:g}"
    value = f"T {tv:+.2f}" + (f" (BMD {float(bmd.value):.3f} g/cm2)" if bmd is not None else "")
    return Contribution(f.protocol, f.site, method, value, who_grade(tv), _t_set(lo, hi), unc, rank)


def _class_vote(f: Finding, rank: int, method: str) -> Contribution | None:
    probs = {k: float(v) for k, v in (f.details.get("probabilities") or {}).items() if k in GRADES}
    if not probs or f.category not in GRADES:
        return None
    chosen, mass = [], 0.0
    for k in sorted(probs, key=probs.get, reverse=True):
        chosen.append(k)
        mass += probs[k]
        if mass >= CLASS_SET_MASS:
            break
    value = ", ".join(f"P({k}) {100 * probs[k]:.0f} %" for k in GRADES if k in probs)
    return Contribution(f.protocol, f.site, method, value, f.category, [g for g in GRADES if g in chosen],
                        f"classes holding {100 * CLASS_SET_MASS:.0f} % of the probability", rank)


def _vote(f: Finding) -> Contribution | None:
    rank, method, _ = EVIDENCE.get(f.protocol, (len(EVIDENCE), f"{f.protocol} estimate", ""))
    if f.protocol == "l1_attenuation":
        return _attenuation_vote(f, rank, method)
    if f.protocol == "lumbar_sagittal" and f.site != "L1-L4":
        return None
    return _t_vote(f, rank, method) or _class_vote(f, rank, method)


def _nearest(grade: str, allowed: set[str]) -> str:
    i = GRADES.index(grade)
    return min(allowed, key=lambda g: (abs(GRADES.index(g) - i), GRADES.index(g)))


def study_result(findings: Sequence[Finding]) -> StudyResult:
    """Combine the findings of a study into one screening result (module docstring).

    Parameters
    ----------
    findings : sequence of Finding
        Everything measured in the study (any protocols, any order).

    Returns
    -------
    StudyResult
    """
    votes = sorted((v for v in (_vote(f) for f in findings) if v is not None),
                   key=lambda v: (v.rank, v.site))
    notes = []
    for f in findings:
        if f.protocol == "dxa_spine" and f.category == "spine BMD unreliable":
            notes.append("a DXA spine image was read as unreliable for BMD (dxa_spine): prefer the hip")
        low = [x for x in f.flags if "fold" in x.lower() and "disagree" in x.lower()]
        low += [x for x in f.flags if "unlike the training data" in x.lower()]
        notes += [f"{f.protocol} {f.site}: {x}" for x in low]
    if not votes:
        return StudyResult(NOT_GRADED, [], "no measurement that grades bone density", notes)
    clashes = [(a, b) for i, a in enumerate(votes) for b in votes[i + 1:]
               if not set(a.compatible) & set(b.compatible)]
    if clashes:
        a, b = clashes[0]
        return StudyResult(DISCORDANT, votes,
                           f"{a.protocol} ({a.grade or INDETERMINATE}) and {b.protocol} "
                           f"({b.grade or INDETERMINATE}) disagree beyond their uncertainty", notes)
    common = set(GRADES)
    for v in votes:
        common &= set(v.compatible)
    decisive = [v for v in votes if v.grade is not None]
    if not decisive:
        return StudyResult(INDETERMINATE, votes, "no method gives a grade", notes)
    if not common:
        return StudyResult(DISCORDANT, votes, "no grade is compatible with every method", notes)
    top = decisive[0]
    grade = top.grade if top.grade in common else _nearest(top.grade, common)
    grades = {v.grade for v in decisive}
    n_methods = len({v.protocol for v in votes})
    if len(votes) == 1:
        agreement = "one measurement"
    elif grades == {grade} and len(decisive) == len(votes):
        agreement = (f"all {n_methods} methods agree" if n_methods == len(votes) else
                     f"all {len(votes)} measurements ({n_methods} method{'s' * (n_methods > 1)}) agree")
    else:
        agreement = (f"methods differ in grade ({', '.join(sorted(g or INDETERMINATE for g in {v.grade for v in votes}))}) "
                     f"but overlap within their uncertainty at {grade}")
    return StudyResult(f"likely {grade}", votes, agreement, notes)
