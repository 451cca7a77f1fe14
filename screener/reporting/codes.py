"""Coded concepts used in screener reports (docs/sr.md lists each with its unit and why).

Standard codes (DICOM PS3.16 first, then SNOMED CT, LOINC, UCUM) come from
pydicom's dictionary where it has them.  Concepts without a standard code use
ONE private coding scheme, :data:`SCHEME` (``99SCRNR``), declared in every SR
through CodingSchemeIdentificationSequence (:data:`SCHEME_NAME`,
:data:`SCHEME_RESPONSIBLE`); dciodvfy still warns "Unrecognized defined term
<99SCRNR>", as it does for any private scheme.  Meanings are at most 64
characters (LO) and ASCII.

What a model estimates from CT or a radiograph is never coded with LOINC's DXA
concepts (:data:`DXA_LOINC_CODES`): a system that files by LOINC would store an
estimate as a DXA measurement.  Estimates use :data:`ABMD_ESTIMATE` /
:data:`TSCORE_ESTIMATE` with a TID 300 Measurement Method modifier saying what
they were estimated from (:func:`method_for_modality`).
"""
from __future__ import annotations

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

SCHEME = "99SCRNR"
SCHEME_NAME = "screener private codes"
SCHEME_RESPONSIBLE = "screener project (docs/sr.md)"

#: LOINC codes of values MEASURED by DXA; never written for a CT or radiograph estimate
DXA_LOINC_CODES: dict[str, str] = {
    "24966-4": "DXA Lumbar spine [Mass/Area] Bone density",
    "24701-5": "DXA Femur [Mass/Area] Bone density",
    "38261-4": "DXA Hip [Mass/Area] Bone density",
    "38267-1": "DXA Lumbar spine [T-score] Bone density",
    "38263-0": "DXA Femur [T-score] Bone density",
    "38264-8": "DXA Hip [T-score] Bone density",
}

# --- measurement concepts -------------------------------------------------
ATTENUATION = codes.DCM.AttenuationCoefficient            # (DCM,112031)
HU_ADJUSTED = Code("L1HUADJ", SCHEME, "Contrast-adjusted attenuation coefficient")
VBMD = Code("VBMD", SCHEME, "Volumetric bone mineral density")
AREA = codes.SCT.Area                                      # (SCT,42798000)
ABMD_ESTIMATE = Code("ABMDEST", SCHEME, "Areal BMD estimate (DXA-equivalent, not by DXA)")
TSCORE_ESTIMATE = Code("TSCOREEST", SCHEME, "T-score of an areal BMD estimate")
ZSCORE = Code("121416", "DCM", "Z-Score of measurement")
TBS = Code("TBS", SCHEME, "Trabecular bone score")
YAM_PERCENT = Code("YAMPCT", SCHEME, "Percent of young adult mean BMD")
#: probability concepts: each names the event it is the probability of
PROBABILITY_OF: dict[str, Code] = {
    "scoliosis": Code("PSCOLIO", SCHEME, "Probability of scoliosis"),
    "unreliable": Code("PDXAUNREL", SCHEME, "Probability that spine DXA BMD is unreliable"),
    "fracture": Code("PFRACTURE", SCHEME, "Probability of raised fracture risk"),
    "normal": Code("PWHONORM", SCHEME, "Probability of WHO class normal"),
    "osteopenia": Code("PWHOPENIA", SCHEME, "Probability of WHO class osteopenia"),
    "osteoporosis": Code("PWHOPOROS", SCHEME, "Probability of WHO class osteoporosis"),
}

# --- methods (TID 300 Measurement Method, a HAS CONCEPT MOD of the NUM) ---------
MEASUREMENT_METHOD = Code("370129005", "SCT", "Measurement Method")
METHOD_ALGORITHM_CT = Code("ALGCT", SCHEME, "Estimated by algorithm from CT")
METHOD_ALGORITHM_RADIOGRAPH = Code("ALGXR", SCHEME, "Estimated by algorithm from radiograph")
METHOD_ALGORITHM_DXA_IMAGE = Code("ALGDXAIMG", SCHEME, "Estimated by algorithm from a DXA image")
#: modality -> method of a model estimate
_METHODS = {"CT": METHOD_ALGORITHM_CT, "CR": METHOD_ALGORITHM_RADIOGRAPH,
            "DX": METHOD_ALGORITHM_RADIOGRAPH, "RG": METHOD_ALGORITHM_RADIOGRAPH,
            "PX": METHOD_ALGORITHM_RADIOGRAPH, "OT": METHOD_ALGORITHM_DXA_IMAGE}


def method_for_modality(modality: str, *, dxa_image: bool = False) -> Code:
    """The "estimated by algorithm from ..." method of an estimate made from ``modality``.

    Parameters
    ----------
    modality : str
        The source images' Modality (CT, CR, DX, ...).
    dxa_image : bool
        The source is a DXA image (any modality value a DXA scanner writes).

    Raises
    ------
    KeyError
        For a modality the screener makes no estimate from.
    """
    if dxa_image:
        return METHOD_ALGORITHM_DXA_IMAGE
    try:
        return _METHODS[str(modality).strip().upper()]
    except KeyError:
        raise KeyError(f"no estimate method for modality {modality!r}; known: {', '.join(_METHODS)}") from None


# --- derivations ------------------------------------------------------------
MEAN = codes.SCT.Mean                                      # (SCT,373098007)
STANDARD_DEVIATION = codes.SCT.StandardDeviation           # (SCT,386136009)
#: the ROI statistics of an attenuation as the SR names them (PS3.16 CID 6141): a viewer that
#: shows only a NUM's concept name (OHIF) then reads "Standard Deviation of Attenuation
#: Coefficient", not a second "Attenuation Coefficient"
MEAN_ATTENUATION = codes.DCM.MeanAttenuationCoefficient    # (DCM,112181)
SD_ATTENUATION = codes.DCM.StandardDeviationOfAttenuationCoefficient  # (DCM,112183)


def sr_concept(concept: Code, derivation: Code | None) -> tuple[Code, Code | None]:
    """The concept name and derivation a NUM carries in the SR.

    An attenuation with a Mean / Standard Deviation derivation becomes PS3.16's own concept
    for that statistic (DCM 112181 Mean Attenuation Coefficient, DCM 112183 Standard Deviation
    of Attenuation Coefficient) without a derivation modifier: the statistic is in the name a
    reader sees.  Every other concept is returned as it is.
    """
    if concept == ATTENUATION and derivation == MEAN:
        return MEAN_ATTENUATION, None
    if concept == ATTENUATION and derivation == STANDARD_DEVIATION:
        return SD_ATTENUATION, None
    return concept, derivation

# --- units (UCUM code, meaning) ------------------------------------------------
UNIT_HU = ("[hnsf'U]", "Hounsfield unit")
UNIT_MG_CM3 = ("mg/cm3", "mg/cm^3")
UNIT_G_CM2 = ("g/cm2", "g/cm2")
UNIT_MM2 = ("mm2", "square millimeter")
UNIT_NONE = ("1", "no units")

# --- sites, finding types, procedures ------------------------------------------
FINDING_TYPE_BONE = codes.SCT.Bone                         # (SCT,272673000)
SITES: dict[str, Code] = {
    "L1": codes.SCT.L1Vertebra,                            # (SCT,66794005)
    "L2": Code("14293000", "SCT", "L2 vertebra"),
    "L3": Code("36470004", "SCT", "L3 vertebra"),
    "L4": Code("11994002", "SCT", "L4 vertebra"),
    "L5": Code("49668003", "SCT", "L5 vertebra"),
    "lumbar spine": Code("122496007", "SCT", "Lumbar spine"),
    "femoral neck": Code("29627003", "SCT", "Structure of neck of femur"),
    "right femoral neck": Code("29627003", "SCT", "Structure of neck of femur"),  # + RIGHT
    "left femoral neck": Code("29627003", "SCT", "Structure of neck of femur"),   # + LEFT
    "proximal femur": Code("787184008", "SCT", "Structure of proximal end of femur"),
}
#: laterality of a finding site (FindingSite laterality modifier, SCT)
LEFT = Code("7771000", "SCT", "Left")
RIGHT = Code("24028007", "SCT", "Right")
PROCEDURE_CT = codes.LN.CTUnspecifiedBodyRegion            # (LN,25045-6)
PROCEDURE_BONE_DENSITY = Code("312681000", "SCT", "Bone density scan")

# --- qualitative evaluations ---------------------------------------------------
CATEGORY = Code("BMDCAT", SCHEME, "Bone density category")
CATEGORIES: dict[str, Code] = {
    "likely osteoporosis": Code("LIKELYOP", SCHEME, "Likely osteoporosis (screening)"),
    "indeterminate": Code("INDETERM", SCHEME, "Indeterminate bone density (screening)"),
    "likely normal": Code("LIKELYNORM", SCHEME, "Likely normal bone density (screening)"),
    "osteoporosis": Code("64859006", "SCT", "Osteoporosis"),
    "osteopenia": Code("312894000", "SCT", "Osteopenia"),
    "normal": Code("17621005", "SCT", "Normal"),
    "spine BMD unreliable": Code("DXAUNREL", SCHEME, "Spine DXA BMD unreliable (structural change)"),
    "spine BMD usable": Code("DXAOK", SCHEME, "Spine DXA BMD not flagged as unreliable"),
}
INTENDED_USE = Code("INTUSE", SCHEME, "Intended use")
NOT_FOR_DIAGNOSTIC_USE = Code("NODXREV", SCHEME, "Not for diagnostic use without review")
FLAG = Code("FLAG", SCHEME, "Screening caveat")
FLAG_CODES: dict[str, Code] = {
    "contrast": Code("CONTRAST", SCHEME, "Contrast-enhanced: attenuation reads higher"),
    "kvp": Code("KVPNOT120", SCHEME, "Tube voltage not 120 kVp: thresholds qualified"),
    "risk135": Code("LE135HU", SCHEME, "At or below 135 HU risk threshold"),
    "roi_shrunk": Code("ROISHRUNK", SCHEME, "ROI smaller than 200 mm2"),
    "level_uncertain": Code("LEVELUNC", SCHEME, "Vertebral level label uncertain"),
    "estimate": Code("VBMDEST", SCHEME, "vBMD is a phantomless estimate"),
}


#: the coded flag of a caveat (:func:`flag_code`): (key, how its text starts or what it holds)
_FLAG_PATTERNS: tuple[tuple[str, str, str], ...] = (
    ("contrast", "startswith", "contrast-enhanced"),
    ("kvp", "startswith", "kvp"),
    ("risk135", "contains", "135 hu risk"),
    ("risk135", "contains", "<= 135 hu"),
    ("roi_shrunk", "startswith", "roi shrunk"),
    ("level_uncertain", "contains", "level label uncertain"),
    ("level_uncertain", "contains", "level labels uncertain"),
    ("estimate", "startswith", "vbmd is an estimate"),
)


def flag_code(text: str) -> Code | None:
    """The coded caveat of a flag's text, or ``None`` when it has no code (it stays TEXT).

    Matches are exact prefixes or phrases (never a bare word such as "estimate": an
    areal-BMD model caveat is not the vBMD caveat).
    """
    low = " ".join(str(text).lower().split())
    for key, how, what in _FLAG_PATTERNS:
        if (low.startswith(what) if how == "startswith" else what in low):
            return FLAG_CODES[key]
    return None


# --- study-level result, coverage, uncertainty -----------------------------------
STUDY_RESULT = Code("STUDYRES", SCHEME, "Study-level bone density screening result")
STUDY_CATEGORIES: dict[str, Code] = {
    "likely osteoporosis": CATEGORIES["likely osteoporosis"],
    "likely osteopenia": Code("LIKELYPENIA", SCHEME, "Likely osteopenia (screening)"),
    "likely normal": CATEGORIES["likely normal"],
    "indeterminate": CATEGORIES["indeterminate"],
    "discordant \u2014 review": Code("DISCORDANT", SCHEME, "Discordant methods - review, no confident grade"),
    "no bone density grade": Code("NOTGRADED", SCHEME, "No measurement in the study grades bone density"),
}
CONTRIBUTING = Code("CONTRIB", SCHEME, "Contributing measurement")
STUDY_RULE = Code("STUDYRULE", SCHEME, "Rule that combined the measurements")
#: TID 1500 row "Qualitative Evaluations": the study-level content that has no image region
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
PROTOCOL_OUTCOME = Code("PROTOUT", SCHEME, "Screening protocol outcome")
PROTOCOL_RAN = Code("PROTRAN", SCHEME, "Measured")
PROTOCOL_NOT_RUN = Code("PROTNOTRUN", SCHEME, "Not measured")
PREDICTION_INTERVAL = Code("PREDINT", SCHEME, "Prediction interval")
FOLD_DISAGREEMENT = Code("FOLDDIS", SCHEME, "Ensemble folds disagree beyond validation")
OUT_OF_DISTRIBUTION = Code("OODINPUT", SCHEME, "Input unlike the training data")


def category_code(category: str) -> Code:
    """The coded value of a category string.

    Raises
    ------
    KeyError
        For an unknown category (the message lists the known ones).
    """
    try:
        return CATEGORIES[category]
    except KeyError:
        raise KeyError(f"no code for category {category!r}; known: "
                       f"{', '.join(CATEGORIES)}") from None


def site_code(site: str) -> Code:
    """The SCT code of an anatomical site label such as ``"L1"``."""
    try:
        return SITES[site]
    except KeyError:
        raise KeyError(f"no code for site {site!r}; known: {', '.join(SITES)}") from None
