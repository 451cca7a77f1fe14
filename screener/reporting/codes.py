"""Coded concepts used in screener reports (dicom-sr.md section 2).

Standard codes come from pydicom's dictionary where it has them; concepts
without a standard code use the private coding scheme ``99SCRNR``, declared
in every SR through :data:`CODING_SCHEME` (dciodvfy still warns
"Unrecognized defined term <99SCRNR>": expected for private schemes).
Meanings are at most 64 characters (LO).
"""
from __future__ import annotations

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

SCHEME = "99SCRNR"
SCHEME_NAME = "screener private codes"

# --- measurement concepts -------------------------------------------------
ATTENUATION = codes.DCM.AttenuationCoefficient            # (DCM,112031)
HU_ADJUSTED = Code("L1HUADJ", SCHEME, "Contrast-adjusted attenuation coefficient")
VBMD = Code("VBMD", SCHEME, "Volumetric bone mineral density")
AREA = codes.SCT.Area                                      # (SCT,42798000)
ABMD_SPINE = Code("24966-4", "LN", "DXA Lumbar spine [Mass/Area] Bone density")
ABMD_FEMUR = Code("24701-5", "LN", "DXA Femur [Mass/Area] Bone density")
TSCORE_SPINE = Code("38267-1", "LN", "DXA Lumbar spine [T-score] Bone density")
TSCORE_FEMUR = Code("38263-0", "LN", "DXA Femur [T-score] Bone density")
ZSCORE = Code("121416", "DCM", "Z-Score of measurement")
TBS = Code("TBS", SCHEME, "Trabecular bone score")
YAM_PERCENT = Code("YAMPCT", SCHEME, "Percent of young adult mean BMD")
PROBABILITY = Code("PROB", SCHEME, "Model probability")

# --- derivations ------------------------------------------------------------
MEAN = codes.SCT.Mean                                      # (SCT,373098007)
STANDARD_DEVIATION = codes.SCT.StandardDeviation           # (SCT,386136009)

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
    "right femoral neck": Code("29627003", "SCT", "Structure of neck of femur"),
    "left femoral neck": Code("29627003", "SCT", "Structure of neck of femur"),
    "proximal femur": Code("787184008", "SCT", "Structure of proximal end of femur"),
}
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
