"""T-score reference populations: ONE table for every protocol and site.

A T-score is ``(BMD - young-adult mean) / young-adult SD`` of a reference population.  Every
T-score the screener reports is computed by :func:`screener.scores.t_score_for` from the reference that the
configuration selects for its site (:func:`selection_for`), so two protocols that report the
same site use the same reference, and the SR states that reference (population, mean, SD,
source) next to the T-score.

Sites and their selectable references (``config.reference_<site>``; the default first):

========================  ==============================================================
site (config key)         selections
========================  ==============================================================
L1 (``reference_l1``)     ``kang_l1`` (default: Kang et al. 2023, seed 000, L1 DXA
                          0.9747 / 0.1185 g/cm2, the reference the l1_axial model's
                          T < -1 accuracy was validated with; sexes pooled in the paper)
L1-L4                     ``spine_l1l4_young_adult`` (default: 1.047 / 0.110, seed 002's
(``reference_l1_l4``)     %YAM base and the virtual cohort's spine label);
                          ``nhanes_0508_l1l4`` (sex-specific: NHANES 2005-08 women 21-30
                          1.064 / 0.106, men 21-30 1.057 / 0.110)
femoral neck              ``nhanes3_fn_women`` (default: NHANES III white women 20-29,
(``reference_femoral_     0.858 / 0.120, for women AND men as ISCD 2019 recommends and as
neck``)                   Gu et al. and the virtual cohort use); ``nhanes3_fn`` (sex-specific:
                          women 0.858 / 0.120, men 0.934 / 0.137)
total hip                 ``nhanes3_th_women`` (default: 0.942 / 0.122); ``nhanes3_th``
(``reference_total_hip``) (sex-specific: men 1.041 / 0.144)
========================  ==============================================================

A sex-specific selection needs the patient's sex (PatientSex F or M); without it the women's
reference is used and the T-score says so (``sex`` of the record is ``"F (sex not stated)"``).
Numbers marked [R] in ``../shared/reference/clinical-physics.md`` are recalled, not verified
(the Hologic-scale L1-L4 reference and the NHANES III men's values): check them before relying.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

__all__ = ["DEFAULT_SELECTIONS", "REFERENCES", "Reference", "SELECTIONS", "SITES", "check_config", "describe",
           "patient_sex", "reference_site", "resolve", "selection_for"]


@dataclass(frozen=True)
class Reference:
    """One young-adult reference population of areal BMD.

    Attributes
    ----------
    key : str
        Stable identifier (``nhanes3_fn_women``).
    site : str
        Reference site (``"L1"``, ``"L1-L4"``, ``"femoral neck"``, ``"total hip"``).
    population : str
        Who was measured, in words.
    sex : str
        ``"F"``, ``"M"`` or ``""`` (sexes pooled / not stated by the source).
    mean, sd : float
        Young-adult mean and SD, g/cm2 (Hologic scale where the source says).
    source : str
        Where the numbers come from ([V] verified / [R] recalled, clinical-physics.md).
    """

    key: str
    site: str
    population: str
    sex: str
    mean: float
    sd: float
    source: str

    def __post_init__(self) -> None:
        if not (self.sd > 0 and self.mean > 0):
            raise ValueError(f"reference {self.key}: mean and SD must be > 0 (got {self.mean}, {self.sd})")

    def to_record(self) -> dict[str, Any]:
        """JSON-able dict, as stored with a T-score measurement (``unit`` is g/cm2)."""
        return {**asdict(self), "unit": "g/cm2"}


_REFS = (
    Reference("kang_l1", "L1", "Kang et al. 2023 L1 DXA young-adult reference (as the paper states)", "",
              0.9747, 0.1185, "Kang et al., Front Physiol 2023 (seed 000); not traceable to a public database"),
    Reference("spine_l1l4_young_adult", "L1-L4", "L1-L4 young-adult reference, Hologic scale", "",
              1.047, 0.110, "Yoshida et al. 2023 %YAM base (seed 002); Hologic L1-L4 [R]"),
    Reference("nhanes_0508_l1l4_women", "L1-L4", "NHANES 2005-08 women 21-30 y", "F",
              1.064, 0.106, "NHANES 2005-2008 [V] (clinical-physics.md section 3)"),
    Reference("nhanes_0508_l1l4_men", "L1-L4", "NHANES 2005-08 men 21-30 y", "M",
              1.057, 0.110, "NHANES 2005-2008 [V] (clinical-physics.md section 3)"),
    Reference("nhanes3_fn_women", "femoral neck", "NHANES III white women 20-29 y", "F",
              0.858, 0.120, "Looker et al. 1998, NHANES III [V]"),
    Reference("nhanes3_fn_men", "femoral neck", "NHANES III white men 20-29 y", "M",
              0.934, 0.137, "Looker et al. 1998, NHANES III [R]"),
    Reference("nhanes3_th_women", "total hip", "NHANES III white women 20-29 y", "F",
              0.942, 0.122, "Looker et al. 1998, NHANES III [R]"),
    Reference("nhanes3_th_men", "total hip", "NHANES III white men 20-29 y", "M",
              1.041, 0.144, "Looker et al. 1998, NHANES III [R]"),
)
#: every reference by key
REFERENCES: dict[str, Reference] = {r.key: r for r in _REFS}

#: selectable name -> {sex: reference key}; ``""`` is the entry for any / unknown sex
SELECTIONS: dict[str, dict[str, str]] = {
    "kang_l1": {"": "kang_l1"},
    "spine_l1l4_young_adult": {"": "spine_l1l4_young_adult"},
    "nhanes_0508_l1l4": {"F": "nhanes_0508_l1l4_women", "M": "nhanes_0508_l1l4_men",
                         "": "nhanes_0508_l1l4_women"},
    "nhanes3_fn_women": {"": "nhanes3_fn_women"},
    "nhanes3_fn": {"F": "nhanes3_fn_women", "M": "nhanes3_fn_men", "": "nhanes3_fn_women"},
    "nhanes3_th_women": {"": "nhanes3_th_women"},
    "nhanes3_th": {"F": "nhanes3_th_women", "M": "nhanes3_th_men", "": "nhanes3_th_women"},
}
#: reference site -> config key
SITES: dict[str, str] = {"L1": "reference_l1", "L1-L4": "reference_l1_l4",
                         "femoral neck": "reference_femoral_neck", "total hip": "reference_total_hip"}
#: the documented default selection of each site (module docstring)
DEFAULT_SELECTIONS: dict[str, str] = {"L1": "kang_l1", "L1-L4": "spine_l1l4_young_adult",
                                      "femoral neck": "nhanes3_fn_women", "total hip": "nhanes3_th_women"}


def reference_site(site: str) -> str:
    """The reference site of a finding's site label.

    ``"L1"`` -> ``"L1"``; ``"L1-L4"`` / ``"lumbar spine"`` -> ``"L1-L4"``; ``"left femoral
    neck"``, ``"femoral neck"`` -> ``"femoral neck"``; ``"total hip"`` -> ``"total hip"``.

    Raises
    ------
    KeyError
        For a site no T-score reference exists for (e.g. ``"L2"``).
    """
    s = " ".join(str(site).split())
    low = s.lower()
    if s == "L1":
        return "L1"
    if s in ("L1-L4", "L1–L4") or low == "lumbar spine":
        return "L1-L4"
    if low.endswith("femoral neck"):
        return "femoral neck"
    if low.endswith("total hip"):
        return "total hip"
    raise KeyError(f"no T-score reference site for {site!r}; sites: {', '.join(SITES)}")


def selection_for(site: str, config: Any = None) -> str:
    """The selection name the configuration gives ``site`` (``config.reference_<site>``), else
    the default; raises ``KeyError`` for an unknown site or selection."""
    rsite = reference_site(site)
    name = str(getattr(config, SITES[rsite], "") or "") if config is not None else ""
    name = name or DEFAULT_SELECTIONS[rsite]
    if name not in SELECTIONS:
        raise KeyError(f"{SITES[rsite]} = {name!r}: unknown reference; known: {', '.join(SELECTIONS)}")
    if REFERENCES[SELECTIONS[name][""]].site != rsite:
        raise KeyError(f"{SITES[rsite]} = {name!r} is a {REFERENCES[SELECTIONS[name]['']].site} reference, "
                       f"not {rsite}")
    return name


def resolve(site: str, sex: str | None = None, config: Any = None) -> tuple[Reference, str]:
    """The reference for ``site`` and the patient's ``sex``, and the sex it was chosen for.

    Returns
    -------
    (Reference, str)
        The reference and a note of the sex used: ``"F"``, ``"M"``, ``""`` (not sex-specific) or
        ``"F (sex not stated)"`` when a sex-specific selection had no PatientSex.
    """
    table = SELECTIONS[selection_for(site, config)]
    sx = str(sex or "").strip().upper()[:1]
    if len(table) == 1:
        return REFERENCES[table[""]], ""
    if sx in ("F", "M") and sx in table:
        return REFERENCES[table[sx]], sx
    ref = REFERENCES[table[""]]
    return ref, f"{ref.sex} (sex not stated)"


def patient_sex(header: Any) -> str:
    """PatientSex of a header (``"F"``, ``"M"``, ``"O"``) or ``""`` when absent or unreadable."""
    try:
        return str(header.get("PatientSex", "") or "").strip().upper()[:1] if header is not None else ""
    except Exception:  # noqa: BLE001 - an unreadable sex is not stated
        return ""


def check_config(config: Any) -> None:
    """Raise ``ValueError`` naming the key when a configured reference is unknown or of another site."""
    for site in SITES:
        try:
            selection_for(site, config)
        except KeyError as exc:
            raise ValueError(str(exc.args[0])) from None


def describe(rec: Mapping[str, Any]) -> str:
    """One line for a reader: ``"NHANES III white women 20-29 y, mean 0.858 g/cm2, SD 0.120"``."""
    return (f"{rec['population']}, mean {float(rec['mean']):.4g} g/cm2, SD {float(rec['sd']):.4g}"
            + (f"; {rec['sex_used']}" if "not stated" in str(rec.get("sex_used", "")) else ""))
