"""Bone density scores shared by the model protocols: T-scores, WHO grades and the
:class:`~screener.findings.Measurement` objects that carry them into the SR.

T-score references (mean, SD in g/cm²) are those each paper states
(``../shared/reference/clinical-physics.md``); the same numbers label the virtual cohort
(:mod:`training.phantoms.labels`).
"""
from __future__ import annotations

import math

from pydicom.sr.coding import Code

from screener.findings import Measurement
from screener.reporting import codes

__all__ = ["T_REFERENCES", "bmd_measurement", "flag", "grade_category", "probability_measurement",
           "t_score", "t_score_measurement", "tbs_measurement", "who_grade", "yam_percent_measurement"]

#: name -> (young-adult mean, SD), g/cm².
T_REFERENCES: dict[str, tuple[float, float]] = {
    "kang_l1": (0.9747, 0.1185),      # Kang et al. 2023, L1 DXA
    "nhanes_fn": (0.858, 0.120),      # NHANES III femoral neck (Gu et al. 2023)
    "nhanes_th": (0.942, 0.122),      # NHANES III total hip
    "spine_l1l4": (1.047, 0.110),     # L1-L4 young-adult reference (Yoshida: %YAM base 1.047)
}

_SPINE_SITES = {"spine", "lumbar spine", "L1", "L2", "L3", "L4", "L1-L4"}


def t_score(bmd: float, mean: float, sd: float) -> float:
    """T-score ``(bmd - mean) / sd``.

    Raises
    ------
    ValueError
        If ``sd`` is not positive.
    """
    if not sd > 0:
        raise ValueError(f"T-score reference SD must be > 0 (got {sd})")
    return (float(bmd) - float(mean)) / float(sd)


def who_grade(t: float) -> str:
    """WHO category of a T-score: ``"osteoporosis"`` (≤ −2.5), ``"osteopenia"`` (< −1) or ``"normal"``."""
    if not math.isfinite(t):
        raise ValueError(f"T-score must be finite (got {t})")
    if t <= -2.5:
        return "osteoporosis"
    if t < -1.0:
        return "osteopenia"
    return "normal"


def _is_spine(site: str) -> bool:
    return site in _SPINE_SITES or site.lower().startswith("l") and site[1:2].isdigit()


def bmd_measurement(value: float, *, site: str, name: str = "") -> Measurement:
    """Areal BMD (g/cm²) estimate, coded as DXA spine or femur BMD by ``site``."""
    concept = codes.ABMD_SPINE if _is_spine(site) else codes.ABMD_FEMUR
    return Measurement(name or f"{site} BMD", float(value), codes.UNIT_G_CM2[0], concept,
                       unit_meaning=codes.UNIT_G_CM2[1])


def t_score_measurement(value: float, *, site: str, name: str = "") -> Measurement:
    """T-score (no unit), coded as DXA spine or femur T-score by ``site``."""
    concept = codes.TSCORE_SPINE if _is_spine(site) else codes.TSCORE_FEMUR
    return Measurement(name or f"{site} T-score", float(value), codes.UNIT_NONE[0], concept,
                       unit_meaning=codes.UNIT_NONE[1])


def tbs_measurement(value: float, name: str = "TBS") -> Measurement:
    """Trabecular bone score (no unit)."""
    return Measurement(name, float(value), codes.UNIT_NONE[0], codes.TBS, unit_meaning=codes.UNIT_NONE[1])


def yam_percent_measurement(value: float, name: str = "%YAM") -> Measurement:
    """BMD as percent of the young-adult mean."""
    return Measurement(name, float(value), "%", codes.YAM_PERCENT, unit_meaning="percent")


def probability_measurement(name: str, p: float) -> Measurement:
    """A model probability ``p`` (0-1) reported in percent."""
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"probability {name!r} must be in [0, 1] (got {p})")
    return Measurement(name, 100.0 * float(p), "%", codes.PROBABILITY, unit_meaning="percent")


def grade_category(grade: str) -> tuple[str, Code]:
    """``(category, coded value)`` for :class:`~screener.findings.Finding`."""
    return grade, codes.category_code(grade)


def flag(text: str) -> str:
    """A free-text caveat for :attr:`Finding.flags` (trimmed to the SR's 1024-character text limit)."""
    return " ".join(str(text).split())[:1024]
