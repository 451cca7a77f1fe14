"""Secondary-capture overlays: the measured slice with the ROI and numbers burned in.

An SC has no geometry (viewers cannot fuse it); it exists so that a reader
sees, in any PACS viewer, where the ROI was and what was measured.
It joins the source study (same Study Instance UID and patient module), says
``BurnedInAnnotation YES``, references the CT slice in SourceImageSequence and
describes the derivation (dicom-sr.md section 3).
"""
from __future__ import annotations

import copy
import datetime
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian

from screener.findings import Finding

#: bone window (level, width) used for the overlay
BONE_WINDOW = (300.0, 1500.0)
DISCLAIMER = "NOT FOR DIAGNOSTIC USE WITHOUT REVIEW"
SC_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"

#: CID 4031 body parts that are not paired (Laterality must then be absent)
UNPAIRED_BODY_PARTS = frozenset({
    "ABDOMEN", "ABDOMENPELVIS", "CHEST", "CHESTABDOMEN", "CHESTABDPELVIS", "PELVIS", "SPINE",
    "CSPINE", "TSPINE", "LSPINE", "SSPINE", "CTSPINE", "TLSPINE", "LSSPINE", "COCCYX", "SACRUM",
    "HEAD", "HEADNECK", "NECK", "SKULL", "BRAIN", "HEART", "WHOLEBODY", "THORAX", "LIVER",
    "PANCREAS", "SPLEEN", "STOMACH", "BLADDER", "PROSTATE", "UTERUS", "AORTA", "ESOPHAGUS",
    "COLON", "RECTUM", "NECKCHEST", "HEADNECKCHEST", "NECKCHESTABDOMEN", "NECKCHESTABDPELV"})

_TYPE2_DEFAULTS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                   "AccessionNumber", "StudyID", "StudyDate", "StudyTime",
                   "ReferringPhysicianName")


_AGE = re.compile(r"^\d{3}[DWMY]$")
_DATE_KEYWORDS = ("PatientBirthDate", "StudyDate", "SeriesDate", "ContentDate", "AcquisitionDate")
_TIME_KEYWORDS = ("StudyTime", "SeriesTime", "ContentTime", "AcquisitionTime", "PatientBirthTime")


def _valid_date(text: str) -> bool:
    try:
        datetime.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return False
    return len(text) == 8 and text.isdigit()


def _valid_time(text: str) -> bool:
    m = re.match(r"^(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?$", text)
    if not m:
        return False
    hh, mm, ss = int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 0)
    return hh < 24 and mm < 60 and ss < 61


def demographic_problems(ds: Dataset) -> dict[str, str]:
    """Patient / study attributes of a source header that a report cannot carry as they are.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        A source image header.

    Returns
    -------
    dict
        keyword -> note (e.g. ``"PatientBirthDate left out: not a valid date"``); the
        notes name the attribute, never its value (no PHI in reports' comments or logs).
    """
    out: dict[str, str] = {}
    for kw in (*_DATE_KEYWORDS, *_TIME_KEYWORDS, "PatientSex", "PatientAge"):
        try:
            value = str(ds.get(kw, "") or "").strip()
        except Exception:  # noqa: BLE001 - an unreadable value is left out too
            out[kw] = f"{kw} left out: unreadable"
            continue
        if not value:
            continue
        if kw in _DATE_KEYWORDS and not _valid_date(value):
            out[kw] = f"{kw} left out: not a valid date"
        elif kw in _TIME_KEYWORDS and not _valid_time(value):
            out[kw] = f"{kw} left out: not a valid time"
        elif kw == "PatientSex" and value.upper() not in ("M", "F", "O"):
            out[kw] = "PatientSex left out: not M, F or O"
        elif kw == "PatientAge" and not _AGE.match(value):
            out[kw] = "PatientAge left out: not nnnD/W/M/Y"
    for kw in ("PatientName", "PatientID", "AccessionNumber", "StudyID", "ReferringPhysicianName"):
        try:
            value = ds.get(kw)
        except Exception:  # noqa: BLE001
            out[kw] = f"{kw} left out: unreadable"
            continue
        if isinstance(value, (list, tuple, MultiValue)):
            out[kw] = f"{kw} had several values: the first is kept"
    charsets = ds.get("SpecificCharacterSet")
    if charsets is not None:
        values = [str(v).strip() for v in
                  (charsets if isinstance(charsets, (list, tuple, MultiValue)) else [charsets])]
        if any(not v for v in values) or len(values) > 1 or not _known_charset(values[0]):
            out["SpecificCharacterSet"] = ("SpecificCharacterSet re-encoded as ISO_IR 192 "
                                           "(UTF-8)")
    return out


def _known_charset(value: str) -> bool:
    from highdicom.enum import SpecificCharacterSetValues
    return value in {v.value for v in SpecificCharacterSetValues}


def fix_type2(ds: Dataset) -> Dataset:
    """A copy of a source header that highdicom can build a report from.

    Missing type-2 patient/study attributes are set empty (highdicom copies them
    from the reference and raises ``AttributeError`` when one is absent,
    dicom-sr.md section 6); invalid dates, times, sex and age are emptied or
    removed (:func:`demographic_problems`); a character set highdicom refuses
    (e.g. ``\\ISO 2022 IR 87`` with its empty first value) is replaced by
    UTF-8 after decoding every text value.
    """
    out = copy.deepcopy(ds)
    problems = demographic_problems(out)
    if "SpecificCharacterSet" in problems:
        out.decode()
        out.SpecificCharacterSet = "ISO_IR 192"
    for kw, note in problems.items():
        if kw == "PatientAge" and kw in out:
            del out[kw]
        elif "several values" in note:
            values = list(out[kw].value)
            setattr(out, kw, values[0] if values else "")
        elif kw != "SpecificCharacterSet":
            setattr(out, kw, "")
    for kw in _TYPE2_DEFAULTS:
        if kw not in out or out[kw].value is None:
            setattr(out, kw, "")
    if not out.get("SOPClassUID") and hasattr(out, "file_meta"):
        out.SOPClassUID = out.file_meta.get("MediaStorageSOPClassUID", "")
    return out


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType
        return ImageFont.load_default()


def render_overlay(hu: np.ndarray, polygon: np.ndarray | None, lines: Sequence[str],
                   window: tuple[float, float] = BONE_WINDOW) -> np.ndarray:
    """Window a HU slice and burn in the ROI outline and text.

    Parameters
    ----------
    hu : numpy.ndarray
        2-D HU image (rows, columns).
    polygon : numpy.ndarray or None
        ``(N, 2)`` closed polygon in SCOORD image coordinates (column, row).
    lines : sequence of str
        Text drawn top-left; the disclaimer is always added at the bottom.
    window : (level, width)
        Grey-scale window (default bone window L 300 / W 1500).

    Returns
    -------
    numpy.ndarray
        ``uint8`` RGB image ``(rows, columns, 3)``.
    """
    level, width = window
    g = np.clip((np.asarray(hu, np.float32) - (level - width / 2.0)) / width, 0.0, 1.0)
    grey = (g * 255.0 + 0.5).astype(np.uint8)
    img = Image.fromarray(np.stack([grey] * 3, axis=-1), mode="RGB")
    draw = ImageDraw.Draw(img)
    rows, cols = grey.shape
    if polygon is not None and len(polygon) >= 3:
        pts = [(float(c), float(r)) for c, r in np.asarray(polygon, float)]
        draw.line(pts, fill=(255, 255, 0), width=max(1, cols // 256))
    burn_text(draw, lines, max(9, min(18, cols // 32)), rows)
    return np.asarray(img, dtype=np.uint8).copy()


def burn_text(draw: ImageDraw.ImageDraw, lines: Sequence[str], size: int, rows: int
              ) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Burn ``lines`` top-left (yellow on black) and the disclaimer along the bottom.

    Parameters
    ----------
    draw : PIL.ImageDraw.ImageDraw
        Drawing context of the overlay image.
    lines : sequence of str
        Result lines, drawn from the top.
    size : int
        Font size (pixels).
    rows : int
        Image height: the disclaimer sits at its bottom.

    Returns
    -------
    PIL.ImageFont
        The font used, for further labels.
    """
    font = _font(size)
    y = 4
    for text in lines:
        box = draw.textbbox((4, y), text, font=font)
        draw.rectangle(box, fill=(0, 0, 0))
        draw.text((4, y), text, fill=(255, 255, 0), font=font)
        y = box[3] + 2
    box = draw.textbbox((4, 0), DISCLAIMER, font=font)
    yb = rows - (box[3] - box[1]) - 6
    draw.rectangle((4, yb, box[2], yb + box[3] - box[1] + 2), fill=(0, 0, 0))
    draw.text((4, yb - box[1]), DISCLAIMER, fill=(255, 80, 80), font=font)
    return font


def _orientation_letters(vec: np.ndarray) -> str:
    """Patient orientation code string of a direction (e.g. ``"L"``, ``"PF"``)."""
    letters = (("L", "R"), ("P", "A"), ("H", "F"))
    out = ""
    for axis in np.argsort(-np.abs(vec)):
        if abs(vec[axis]) < 0.25:
            break
        out += letters[axis][0] if vec[axis] > 0 else letters[axis][1]
    return out or "L"


def _positive_pair(value: Any) -> tuple[float, float] | None:
    """Two positive finite numbers (a pixel spacing), or ``None``."""
    try:
        pair = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if len(pair) != 2 or not all(np.isfinite(v) and v > 0 for v in pair):
        return None
    return pair[0], pair[1]


def _value(ds: Dataset, keyword: str) -> Any:
    """``ds.get(keyword)``, ``None`` when the stored value cannot be converted (e.g. DS "abc")."""
    try:
        return ds.get(keyword)
    except (TypeError, ValueError, OverflowError):
        return None


def _overlay_orientation(ref: Dataset) -> tuple[str, str] | None:
    """Patient orientation of an overlay drawn on a cross-sectional slice, from its
    ``ImageOrientationPatient``; ``None`` for images without one (projection radiographs, DXA)."""
    try:
        iop = np.array([float(v) for v in _value(ref, "ImageOrientationPatient") or []], dtype=float)
    except (TypeError, ValueError):
        return None
    if iop.shape != (6,) or not np.isfinite(iop).all() or \
            min(np.linalg.norm(iop[:3]), np.linalg.norm(iop[3:])) < 0.5:
        return None
    return _orientation_letters(iop[:3]), _orientation_letters(iop[3:])


def build_sc(finding: Finding, source: Dataset, *, series_uid: str, sop_instance_uid: str,
             series_number: int = 902, instance_number: int = 1,
             manufacturer: str = "screener", software_version: str = "") -> Dataset:
    """Build the secondary capture of one finding's overlay.

    Parameters
    ----------
    finding : Finding
        Must have ``overlay`` (uint8 RGB).
    source : pydicom.dataset.Dataset
        Header of the image the overlay shows (the ROI slice or radiograph); not changed.
        A cross-sectional slice gives the overlay its patient orientation; a projection image
        (no ``ImageOrientationPatient``) leaves it empty, and the pixel spacing is the
        finding's ``overlay_pixel_spacing_mm`` when stated.
    series_uid, sop_instance_uid : str
    series_number, instance_number : int
    manufacturer, software_version : str

    Returns
    -------
    highdicom.sc.SCImage

    Raises
    ------
    ValueError
        When the finding has no overlay or the overlay is not uint8 RGB.
    """
    import highdicom as hd

    if finding.overlay is None:
        raise ValueError(f"finding {finding.protocol}/{finding.site} has no overlay to capture")
    pixels = np.ascontiguousarray(finding.overlay)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"overlay must be uint8 (rows, cols, 3), got {pixels.dtype} "
                         f"{pixels.shape}")
    ref = fix_type2(source)
    orientation = _overlay_orientation(ref)
    spacing = _positive_pair(finding.details.get("overlay_pixel_spacing_mm")) or \
        (_positive_pair(_value(ref, "PixelSpacing")) if orientation is not None else None)
    kwargs = {}
    if software_version:
        kwargs["software_versions"] = software_version
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ref, pixel_array=pixels, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", series_instance_uid=series_uid,
        series_number=series_number, sop_instance_uid=sop_instance_uid,
        instance_number=instance_number, manufacturer=manufacturer,
        pixel_spacing=spacing, patient_orientation=orientation or ("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description="Bone density screening (overlay)", **kwargs)
    if orientation is None:
        # type 2, left empty (the stand-in above only satisfies highdicom): the overlay of a
        # projection image is not on the source's grid (halves, crops, mirrored hips)
        sc.PatientOrientation = ""
    sc.BurnedInAnnotation = "YES"
    src_item = Dataset()
    src_item.ReferencedSOPClassUID = ref.SOPClassUID
    src_item.ReferencedSOPInstanceUID = ref.SOPInstanceUID
    if finding.roi is not None and finding.roi.frame_number:
        src_item.ReferencedFrameNumber = finding.roi.frame_number
    sc.SourceImageSequence = [src_item]
    described = finding.details.get("overlay_description") or (
        f"{finding.site} slice in bone window (L {BONE_WINDOW[0]:g} / W {BONE_WINDOW[1]:g}) "
        "with ROI and results burned in")
    sc.DerivationDescription = (
        f"{finding.protocol} {finding.protocol_version}: {described}; {DISCLAIMER.lower()}")[:1024]
    body = str(_value(ref, "BodyPartExamined") or "").strip()
    if body:
        sc.BodyPartExamined = body
    # Laterality (type 2C) must be absent for unpaired body parts and present otherwise; for
    # non-standard terms (e.g. PARTIALBODY) or no body part at all pairing is unknown: present
    # (R or L when the source says so, else empty)
    if body.upper() not in UNPAIRED_BODY_PARTS and "Laterality" not in sc:
        laterality = str(_value(ref, "Laterality") or "").strip().upper()
        sc.Laterality = laterality if laterality in ("R", "L") else ""
    sc.ImageComments = DISCLAIMER
    for kw in ("StudyDescription", "IssuerOfPatientID"):  # study/patient IE consistency
        if ref.get(kw) and kw not in sc:
            setattr(sc, kw, ref.get(kw))
    return sc


def write_private(ds: Dataset, out_dir: Path) -> Path:
    """Write ``ds`` to ``out_dir/<SOPInstanceUID>.dcm`` as a 0600 file in a 0700 folder
    (whatever the umask: results carry the patient's name, ID and birth date).

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        An SR or SC with ``SOPInstanceUID`` and file meta.
    out_dir : pathlib.Path

    Returns
    -------
    pathlib.Path
    """
    from screener.storage import make_private_dir, open_private
    make_private_dir(out_dir)
    path = out_dir / f"{ds.SOPInstanceUID}.dcm"
    with os.fdopen(open_private(path), "wb") as fh:
        ds.save_as(fh, enforce_file_format=True)
    return path


def write_sc(sc: Dataset, out_dir: Path) -> Path:
    """Write ``sc`` to ``out_dir/<SOPInstanceUID>.dcm`` (0600, folder 0700); returns the path."""
    return write_private(sc, out_dir)
