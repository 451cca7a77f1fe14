"""Series loading: DICOM instances -> :class:`SeriesInfo` (headers) and :class:`~screener.domain.Volume`.

Incoming DICOM is read leniently and judged explicitly: every reason a
series cannot be turned into a trustworthy volume (missing slices, uneven
spacing, gantry tilt, mixed orientations or sizes, multi-frame objects
without per-frame geometry, undecodable pixel data) raises
:class:`SeriesUnusable` whose message is the reason recorded for the job.

Enhanced CT and Legacy Converted Enhanced CT (multi-frame) are supported:
each frame becomes a slice whose geometry comes from the functional groups,
and whose KVP, contrast agent, slice thickness and gantry tilt come from the
CT macros or the unassigned converted attributes
(:func:`functional_group_value`); :func:`frame_number` tells which frame a
slice header stands for. Localizer/scout images found inside an
axial series are left out (with a warning).

Conventions are those of :mod:`screener.domain`: slices sorted ascending
along the slice normal ``row_dir x col_dir`` (ImagePositionPatient projected
on it, never InstanceNumber), HU = stored x RescaleSlope + RescaleIntercept
as float32.
"""
from __future__ import annotations

import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pydicom
import structlog
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from screener.domain import Volume

log = structlog.get_logger(__name__)

#: SOP classes of single-frame, Enhanced and Legacy Converted Enhanced CT
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.2"
#: every CT image storage class a CT protocol can read (``""``: class unknown, judged by Modality)
CT_IMAGE_STORAGE_CLASSES = (CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE,
                            LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE)

#: tolerances
GAP_FACTOR = 1.5           # a step > 1.5 x median spacing is a missing slice
UNEVEN_TOLERANCE = 0.10    # steps may differ from the median by 10 % (and >= 0.05 mm)
TILT_TOLERANCE_DEG = 0.5   # slice positions must follow the normal within this angle
ORIENTATION_TOLERANCE = 1e-3

#: transfer syntax -> the package that decodes it (for the decline reason)
_DECODER_HINT = {
    "1.2.840.10008.1.2.4.90": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.91": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.201": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.202": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.50": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.51": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.57": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.70": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.80": "pyjpegls (or pylibjpeg-libjpeg)",
    "1.2.840.10008.1.2.4.81": "pyjpegls (or pylibjpeg-libjpeg)",
    "1.2.840.10008.1.2.5": "pylibjpeg-rle (or numpy, built in)",
}


_NATIVE_SYNTAXES = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2",
                    "1.2.840.10008.1.2.1.99"}


class SeriesUnusable(ValueError):
    """The series cannot be used as input; ``reason`` (also ``str(exc)``) says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class SeriesInfo:
    """What the headers of a series say, read without decoding pixel data.

    Protocols decide from this whether they apply (``Protocol.accepts``).

    Attributes
    ----------
    study_uid, series_uid : str
    modality : str
        ``Modality`` of the first instance, e.g. ``"CT"``.
    sop_class_uid : str
    image_type : tuple of str
        Upper-case values of ImageType, e.g. ``("ORIGINAL", "PRIMARY", "AXIAL")``
        (multi-frame objects without ImageType: the first frame's FrameType).
    body_part : str
        BodyPartExamined (upper case, may be empty; multi-frame: also from Frame Anatomy,
        :func:`header_body_part`).
    series_description : str
    orientation : tuple of float or None
        ImageOrientationPatient of the first instance (multi-frame: Plane Orientation group).
    n_instances : int
        Number of files.
    n_frames : int
        Total frames (== n_instances for single-frame objects).
    kvp : float or None
        Tube voltage (``KVP``); ``None`` when absent or not a positive number (:func:`header_kvp`;
        multi-frame: CT X-Ray Details or the unassigned converted attributes).
    contrast_agent : str
        ContrastBolusAgent (empty when absent or empty); for multi-frame objects
        also from the unassigned groups or the Enhanced Contrast/Bolus module
        (:func:`header_contrast_agent`).
    slice_thickness : float or None
        SliceThickness (top level, else Pixel Measures of the first frame).
    z_range_mm : tuple of float or None
        Lowest and highest patient z of the slice positions.
    transfer_syntaxes : list of str
    mixed_series : bool
        The files belong to more than one SeriesInstanceUID.
    manufacturer : str
    n_scouts_excluded : int
        Localizer/scout images found among the slices of a series and left
        out (some scanners put the scout into the axial series).
    paths : list of pathlib.Path
        The files described (scouts excluded).
    header : pydicom.dataset.Dataset or None
        Header of the first instance (no pixel data), for protocols that need
        more than the fields above (radiographs: ViewPosition, Laterality, ...).
    datasets : list of pydicom.dataset.Dataset or None
        With ``read_series_info(..., with_pixels=True)``: the whole files read (pixel data
        still encoded), one per path, for :func:`load_volume` (``datasets=``) to decode without
        reading the files again; ``None`` otherwise.
    """

    study_uid: str = ""
    series_uid: str = ""
    modality: str = ""
    sop_class_uid: str = ""
    image_type: tuple[str, ...] = ()
    body_part: str = ""
    series_description: str = ""
    orientation: tuple[float, ...] | None = None
    n_instances: int = 0
    n_frames: int = 0
    kvp: float | None = None
    contrast_agent: str = ""
    slice_thickness: float | None = None
    z_range_mm: tuple[float, float] | None = None
    transfer_syntaxes: list[str] = field(default_factory=list)
    mixed_series: bool = False
    manufacturer: str = ""
    n_scouts_excluded: int = 0
    paths: list[Path] = field(default_factory=list)
    header: Any = field(default=None, repr=False, compare=False)
    datasets: list[Dataset] | None = field(default=None, repr=False, compare=False)

    @property
    def z_coverage_mm(self) -> float:
        """Extent of the slice positions along patient z (0 when unknown)."""
        if self.z_range_mm is None:
            return 0.0
        return float(self.z_range_mm[1] - self.z_range_mm[0])

    @property
    def contrast_enhanced(self) -> bool:
        """True when ContrastBolusAgent is present and non-empty."""
        return bool(self.contrast_agent.strip())

    @property
    def n_slices(self) -> int:
        """Image slices: frames of a multi-frame object, else instances."""
        return self.n_frames if self.is_multiframe else self.n_instances

    @property
    def is_multiframe(self) -> bool:
        """True when any instance holds more than one frame."""
        return self.n_frames > self.n_instances

    @property
    def is_axial(self) -> bool:
        """True when the slice normal is within 10 degrees of patient z."""
        if not self.orientation or len(self.orientation) != 6:
            return False
        r = np.asarray(self.orientation[:3], float)
        c = np.asarray(self.orientation[3:], float)
        n = np.cross(r, c)
        norm = np.linalg.norm(n)
        return bool(norm > 0 and abs(n[2] / norm) >= np.cos(np.deg2rad(10.0)))

    def describe(self) -> dict[str, Any]:
        """Loggable summary (no patient data)."""
        return {"series_uid": self.series_uid, "modality": self.modality,
                "n_instances": self.n_instances, "image_type": "\\".join(self.image_type),
                "body_part": self.body_part, "kvp": self.kvp,
                "contrast": self.contrast_enhanced, "z_coverage_mm": round(self.z_coverage_mm, 1)}


def _checked(ds: Dataset, path: Path) -> Dataset:
    """Reject what ``force=True`` parsed out of non-DICOM bytes (no image attributes)."""
    if not any(kw in ds for kw in ("SOPClassUID", "Modality", "Rows", "StudyInstanceUID")):
        raise SeriesUnusable(f"{path.name}: not a DICOM file (no DICOM attributes could be read)")
    return ds


def _read_header(path: Path) -> Dataset:
    try:
        return _checked(pydicom.dcmread(path, stop_before_pixels=True, force=True), path)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError) as exc:
        raise SeriesUnusable(f"{path.name}: not a readable DICOM file ({exc})") from exc


def _is_scout(ds: Dataset) -> bool:
    it = [str(v).upper() for v in (ds.get("ImageType") or [])]
    return any(t in it for t in ("LOCALIZER", "SCOUT", "TOPOGRAM", "SURVIEW", "SCANOGRAM"))


def _without_scouts(headers: list[Dataset]) -> list[int]:
    """Indices of the non-scout instances; all of them when every instance is a scout."""
    keep = [i for i, h in enumerate(headers) if not _is_scout(h)]
    return keep if keep else list(range(len(headers)))


def _read_full(path: Path) -> Dataset:
    try:
        return _checked(pydicom.dcmread(path, force=True), path)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError) as exc:
        raise SeriesUnusable(f"{path.name}: not a readable DICOM file ({exc})") from exc


def _sop_class(ds: Dataset) -> str:
    uid = str(ds.get("SOPClassUID", "") or "")
    if not uid and hasattr(ds, "file_meta"):
        uid = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or "")
    return uid


def _float(value: Any) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


#: functional-group sequences whose items carry plain (classic) attributes: the CT-specific
#: macros of Enhanced CT, then the Legacy Converted "unassigned" groups. The per-frame item is
#: searched before the shared one; within an item, the macros before the unassigned groups.
_ATTRIBUTE_GROUPS = ("CTXRayDetailsSequence", "CTAcquisitionDetailsSequence",
                     "CTAcquisitionTypeSequence", "CTReconstructionSequence", "CTExposureSequence",
                     "CTGeometrySequence", "CTPositionSequence", "CTTableDynamicsSequence",
                     "PixelMeasuresSequence", "FrameVOILUTSequence",
                     "CTImageFrameTypeSequence", "FrameAnatomySequence",
                     "UnassignedPerFrameConvertedAttributesSequence",
                     "UnassignedSharedConvertedAttributesSequence")


def _group_items(ds: Any, frame: int = 0) -> list[Dataset]:
    """Per-frame item ``frame`` then the shared item of a multi-frame header ([] if none)."""
    items: list[Dataset] = []
    try:
        per = ds.get("PerFrameFunctionalGroupsSequence") or []
        if len(per) > frame:
            items.append(per[frame])
        shared = ds.get("SharedFunctionalGroupsSequence") or []
        if shared:
            items.append(shared[0])
    except (AttributeError, TypeError):
        return []
    return items


def functional_group_value(ds: Any, keyword: str, frame: int = 0,
                           groups: Sequence[str] = _ATTRIBUTE_GROUPS) -> Any:
    """``keyword`` of a header: top level first, then the functional groups of frame ``frame``.

    Enhanced CT keeps acquisition attributes in functional-group macros
    (``KVP`` in CT X-Ray Details, ``SliceThickness`` in Pixel Measures, the
    gantry tilt in CT Acquisition Details); Legacy Converted Enhanced CT keeps
    what has no enhanced home in the Unassigned Per-Frame / Shared Converted
    Attributes sequences. The per-frame item is searched before the shared one.

    Returns
    -------
    The element's value, or ``None`` when it is nowhere (or empty).
    """
    try:
        value = ds.get(keyword)
    except (AttributeError, TypeError):
        return None
    if value not in (None, ""):
        return value
    for item in _group_items(ds, frame):
        for kw in groups:
            seq = item.get(kw)
            if seq and keyword in seq[0]:
                v = seq[0].get(keyword)
                if v not in (None, ""):
                    return v
    return None


def _number(value: Any, keyword: str, path: Path) -> float:
    """``float(value)``, or :class:`SeriesUnusable` naming the file and attribute (not the value)."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise SeriesUnusable(f"{path.name}: {keyword} is not a number; fix or remove this "
                             "instance") from None
    if not np.isfinite(out):
        raise SeriesUnusable(f"{path.name}: {keyword} is not finite; fix or remove this instance")
    return out


def header_kvp(ds: Any) -> float | None:
    """Tube voltage (``KVP``) of a DICOM header, ``None`` when absent or not a positive number.

    Looks at the top level, then (multi-frame objects) the first frame's
    functional groups: CT X-Ray Details (Enhanced CT) and the unassigned
    converted attributes (Legacy Converted Enhanced CT).

    Parameters
    ----------
    ds : pydicom.dataset.Dataset

    Returns
    -------
    float or None
    """
    k = _float(getattr(ds, "KVP", None))
    if k is None:
        k = _float(functional_group_value(ds, "KVP"))
    return k if k is not None and np.isfinite(k) and k > 0 else None


def header_contrast_agent(ds: Any, frame: int = 0) -> str:
    """The contrast/bolus agent of a header (``""`` when none was given or administered).

    Classic objects: ``ContrastBolusAgent``. Legacy Converted Enhanced CT may
    hold it in the unassigned converted attributes. Enhanced CT describes it
    in the Enhanced Contrast/Bolus module (ContrastBolusAgentSequence, coded:
    the CodeMeaning is returned) and says per frame in the Contrast/Bolus
    Usage functional group whether it was administered; an agent whose usage
    says ``ContrastBolusAgentAdministered`` NO is not reported.
    """
    agent = functional_group_value(ds, "ContrastBolusAgent", frame)
    if agent not in (None, ""):
        return str(agent)
    try:
        agents = ds.get("ContrastBolusAgentSequence") or []
    except (AttributeError, TypeError):
        return ""
    if not agents:
        return ""
    usage = None
    for item in _group_items(ds, frame):
        if item.get("ContrastBolusUsageSequence"):
            usage = item.ContrastBolusUsageSequence
            break
    given: set[Any] | None = None
    if usage is not None:
        given = {_float(u.get("ContrastBolusAgentNumber")) for u in usage
                 if str(u.get("ContrastBolusAgentAdministered", "") or "").upper() == "YES"}
    names = []
    for a in agents:
        if given is not None and _float(a.get("ContrastBolusAgentNumber")) not in given:
            continue
        names.append(str(a.get("CodeMeaning", "") or a.get("CodeValue", "") or "agent (coded)"))
    return "; ".join(n for n in names if n)


_REGION_TO_BODY_PART: dict[tuple[str, str], str] | None = None


def _body_part_of_region(code: Dataset) -> str:
    """BodyPartExamined term of an AnatomicRegionSequence item (PS3.16 Annex L, reversed)."""
    global _REGION_TO_BODY_PART
    if _REGION_TO_BODY_PART is None:
        table: dict[tuple[str, str], str] = {}
        try:  # highdicom ships the standard's BodyPartExamined <-> SNOMED-CT table
            from highdicom.legacy.sop import get_anatomic_region_map
            for term, (item, _paired) in get_anatomic_region_map().items():
                table.setdefault((str(item.CodingSchemeDesignator), str(item.CodeValue)), term)
        except Exception:  # noqa: BLE001 - the code meaning is the fallback
            pass
        _REGION_TO_BODY_PART = table
    key = (str(code.get("CodingSchemeDesignator", "") or ""), str(code.get("CodeValue", "") or ""))
    if key in _REGION_TO_BODY_PART:
        return _REGION_TO_BODY_PART[key]
    return "".join(ch for ch in str(code.get("CodeMeaning", "") or "").upper() if ch.isalnum())


def header_body_part(ds: Any) -> str:
    """BodyPartExamined (upper case), else (Enhanced / Legacy Converted CT) the unassigned
    attributes or the first frame's Frame Anatomy region mapped back to its BodyPartExamined term
    (``""`` when none)."""
    bp = functional_group_value(ds, "BodyPartExamined")
    if bp not in (None, ""):
        return str(bp).upper()
    for item in _group_items(ds):
        fa = item.get("FrameAnatomySequence")
        if fa and fa[0].get("AnatomicRegionSequence"):
            return _body_part_of_region(fa[0].AnatomicRegionSequence[0])
    regions = ds.get("AnatomicRegionSequence") if hasattr(ds, "get") else None
    return _body_part_of_region(regions[0]) if regions else ""


def read_series_info(paths: Sequence[Path], *, with_pixels: bool = False) -> SeriesInfo:
    """Summarise a series from its headers only (no pixel decoding).

    Parameters
    ----------
    paths : sequence of pathlib.Path
        The instance files of one series.
    with_pixels : bool
        Read the whole files (pixel data still encoded) and keep them in
        ``SeriesInfo.datasets``: :func:`load_volume` given them (``datasets=info.datasets``)
        decodes without reading and parsing every file a second time.

    Returns
    -------
    SeriesInfo

    Raises
    ------
    SeriesUnusable
        When there are no files or a file is not DICOM.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise SeriesUnusable("series has no instances")
    headers = [(_read_full if with_pixels else _read_header)(p) for p in paths]
    keep = _without_scouts(headers)
    n_scouts = len(headers) - len(keep)
    headers = [headers[i] for i in keep]
    paths = [paths[i] for i in keep]
    first = headers[0]
    series_uids = {str(h.get("SeriesInstanceUID", "") or "") for h in headers}
    zs: list[float] = []
    for h, path in zip(headers, paths):
        try:  # pydicom converts DS values on access: a malformed one raises there
            ipp = h.get("ImagePositionPatient")
            if ipp is not None and len(ipp) == 3:
                zs.append(_number(ipp[2], "ImagePositionPatient", path))
            for item in h.get("PerFrameFunctionalGroupsSequence") or []:  # Enhanced CT
                pps = item.get("PlanePositionSequence")
                if pps and pps[0].get("ImagePositionPatient") is not None:
                    zs.append(_number(pps[0].ImagePositionPatient[2], "ImagePositionPatient", path))
        except SeriesUnusable:
            raise
        except (TypeError, ValueError):
            raise SeriesUnusable(f"{path.name}: ImagePositionPatient is not a number; fix or remove "
                                 "this instance") from None
    n_frames = sum(int(_float(h.get("NumberOfFrames")) or 1) for h in headers)
    iop = first.get("ImageOrientationPatient")
    if iop is None:  # enhanced objects: Plane Orientation (shared or first frame)
        iop = functional_group_value(first, "ImageOrientationPatient",
                                     groups=("PlaneOrientationSequence",))
    image_type = first.get("ImageType") or functional_group_value(
        first, "FrameType", groups=("CTImageFrameTypeSequence",)) or []
    if isinstance(image_type, str):
        image_type = [image_type]
    tsyntaxes = sorted({str(getattr(getattr(h, "file_meta", None), "TransferSyntaxUID", ""))
                        for h in headers})
    return SeriesInfo(
        study_uid=str(first.get("StudyInstanceUID", "") or ""),
        series_uid=str(first.get("SeriesInstanceUID", "") or ""),
        modality=str(first.get("Modality", "") or "").upper(),
        sop_class_uid=_sop_class(first),
        image_type=tuple(str(v).upper() for v in image_type),
        body_part=header_body_part(first),
        series_description=str(first.get("SeriesDescription", "") or ""),
        orientation=tuple(float(v) for v in iop) if iop is not None and len(iop) == 6 else None,
        n_instances=len(headers),
        header=first,
        n_scouts_excluded=n_scouts,
        n_frames=n_frames,
        kvp=header_kvp(first),
        contrast_agent=header_contrast_agent(first),
        slice_thickness=_float(functional_group_value(first, "SliceThickness")),
        z_range_mm=(min(zs), max(zs)) if zs else None,
        transfer_syntaxes=[t for t in tsyntaxes if t],
        mixed_series=len(series_uids) > 1,
        manufacturer=str(first.get("Manufacturer", "") or ""),
        paths=paths,
        datasets=headers if with_pixels else None,
    )


def _ts_name(uid: str) -> str:
    try:
        return f"{UID(uid).name} ({uid})"
    except Exception:  # pragma: no cover - unknown UID
        return uid


#: little-endian uncompressed syntaxes :func:`_native_frame` reads itself
_LE_NATIVE = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"})


def _native_frame(ds: Dataset, ts: str) -> np.ndarray | None:
    """The pixels of a single-frame, one-sample, 16-bit little-endian uncompressed image as
    pydicom's ``pixel_array`` gives them (bits above Bits Stored cleared, or sign-extended when
    signed, by the same left and right shifts), read straight from the buffer: pydicom's decoder
    machinery took about 0.4 ms a slice for what is a reinterpretation. ``None`` for anything
    else (compressed, multi-frame, colour, 8- or 32-bit, a length that is not exactly
    Rows x Columns x 2): pydicom decodes those."""
    if ts not in _LE_NATIVE or "PixelData" not in ds:
        return None
    try:
        if (int(ds.get("SamplesPerPixel", 1)) != 1 or int(ds.BitsAllocated) != 16
                or int(ds.get("NumberOfFrames", 1) or 1) != 1):
            return None
        rows, cols, stored = int(ds.Rows), int(ds.Columns), int(ds.BitsStored)
        signed = int(ds.PixelRepresentation)
        raw = ds.PixelData
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    if signed not in (0, 1) or not 1 <= stored <= 16 or not isinstance(raw, (bytes, bytearray)) \
            or len(raw) != rows * cols * 2:
        return None
    arr = np.frombuffer(raw, dtype="<i2" if signed else "<u2").reshape(rows, cols).copy()
    shift = 16 - stored
    if shift:
        np.left_shift(arr, shift, out=arr)
        np.right_shift(arr, shift, out=arr)
    return arr


def _decode(ds: Dataset, path: Path) -> np.ndarray:
    ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    fast = _native_frame(ds, ts)
    if fast is not None:
        return fast
    try:
        arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a decline reason
        if ts in _NATIVE_SYNTAXES:
            raise SeriesUnusable(
                f"pixel data of {path.name} cannot be read (transfer syntax {_ts_name(ts)}): "
                f"{type(exc).__name__}: {exc}. Uncompressed data needs no decoder: the file is "
                "truncated or damaged; resend the instance") from exc
        hint = _DECODER_HINT.get(ts, "pylibjpeg with its plugins or python-gdcm")
        raise SeriesUnusable(
            f"cannot decode pixel data of {path.name} (transfer syntax {_ts_name(ts)}): "
            f"{type(exc).__name__}: {exc}. If the data are intact, install a decoder for this "
            f"transfer syntax: pip install {hint}") from exc
    return np.asarray(arr)


#: attribute (a Python attribute, not a DICOM element) holding a frame's 1-based number
FRAME_ATTR = "screener_frame_number"


def frame_number(ds: Dataset) -> int | None:
    """1-based frame number of a :class:`~screener.domain.Volume` slice header, or ``None``.

    Slices of a multi-frame (Enhanced CT) object share one SOP Instance UID;
    references to them (SR region, SC source) must name the frame.
    """
    value = getattr(ds, FRAME_ATTR, None)
    return int(value) if value is not None else None


def _is_multiframe(ds: Dataset) -> bool:
    return (int(_float(ds.get("NumberOfFrames")) or 1) > 1
            or "PerFrameFunctionalGroupsSequence" in ds)


_FG_SKIP = {"PixelData", "FloatPixelData", "DoubleFloatPixelData",
            "PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"}


def _frame_headers(ds: Dataset, path: Path) -> list[Dataset]:
    """One single-slice-like header per frame of an Enhanced (multi-frame) image.

    Geometry and rescale come from the per-frame or shared functional groups
    (Plane Position, Plane Orientation, Pixel Measures, Pixel Value
    Transformation); the top-level attributes (UIDs, patient, study,
    NumberOfFrames) are copied; attributes a classic slice carries at its top
    level are filled in from the frame's CT macros (CT X-Ray Details ``KVP``,
    CT Acquisition Details ``GantryDetectorTilt``, ...) and the Legacy
    Converted unassigned groups, and ``ContrastBolusAgent`` from the
    Enhanced Contrast/Bolus module (:func:`header_contrast_agent`), so that a
    frame header reads like the equivalent classic slice header.

    Raises
    ------
    SeriesUnusable
        When a frame has no position, orientation or pixel spacing.
    """
    n = int(_float(ds.get("NumberOfFrames")) or 1)
    shared = ds.SharedFunctionalGroupsSequence[0] if ds.get("SharedFunctionalGroupsSequence") \
        else Dataset()
    per = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per) != n:
        raise SeriesUnusable(f"{path.name}: multi-frame object with {n} frames but {len(per)} "
                             "per-frame functional group items; cannot place its frames")
    base = Dataset()
    for elem in ds:
        if elem.keyword not in _FG_SKIP:
            base.add(elem)

    def group(item: Dataset, kw: str) -> Dataset | None:
        for src in (item, shared):
            seq = src.get(kw)
            if seq:
                return seq[0]
        return None

    out = []
    for f in range(n):
        item = per[f]
        pos, ori, pm = (group(item, kw) for kw in ("PlanePositionSequence",
                                                   "PlaneOrientationSequence",
                                                   "PixelMeasuresSequence"))
        if pos is None or ori is None or pm is None or "PixelSpacing" not in pm:
            raise SeriesUnusable(f"{path.name}: frame {f + 1} lacks Plane Position, Plane "
                                 "Orientation or Pixel Measures functional groups")
        fh = Dataset()
        fh.update(base)  # a new element dict per frame (Dataset(base) would share it)
        if getattr(ds, "file_meta", None) is not None:
            fh.file_meta = ds.file_meta
        fh.ImagePositionPatient = pos.ImagePositionPatient
        fh.ImageOrientationPatient = ori.ImageOrientationPatient
        fh.PixelSpacing = pm.PixelSpacing
        if pm.get("SliceThickness") is not None:
            fh.SliceThickness = pm.SliceThickness
        pvt = group(item, "PixelValueTransformationSequence")
        if pvt is not None:
            fh.RescaleSlope = pvt.get("RescaleSlope", 1)
            fh.RescaleIntercept = pvt.get("RescaleIntercept", 0)
        # what a classic slice header carries at its top level, from the frame's groups:
        # KVP (CT X-Ray Details / unassigned), GantryDetectorTilt (CT Acquisition Details),
        # ConvolutionKernel, SpacingBetweenSlices, window, ... (per-frame item before shared)
        for src in (item, shared):
            for kw in _ATTRIBUTE_GROUPS:
                seq = src.get(kw)
                if not seq:
                    continue
                for elem in seq[0]:
                    if elem.keyword and elem.keyword not in fh and elem.keyword not in _FG_SKIP:
                        fh.add(elem)
        if "ContrastBolusAgent" not in fh:
            agent = header_contrast_agent(ds, f)
            if agent:
                fh.ContrastBolusAgent = agent
        if "BodyPartExamined" not in fh:  # Legacy Converted: mapped into Frame Anatomy
            body_part = header_body_part(fh) or header_body_part(ds)
            if body_part:
                fh.BodyPartExamined = body_part
        setattr(fh, FRAME_ATTR, f + 1)
        out.append(fh)
    return out


def _check_geometry(headers: list[Dataset], paths: list[Path]) -> None:
    """Raise SeriesUnusable for series that cannot form a regular volume."""
    for h, p in zip(headers, paths):
        for kw in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            v = h.get(kw)
            if v is None or len(v) == 0:
                raise SeriesUnusable(f"{p.name}: {kw} missing; the volume geometry is unknown")
    iops = np.array([[float(v) for v in h.ImageOrientationPatient] for h in headers])
    if np.abs(iops - iops[0]).max() > ORIENTATION_TOLERANCE:
        n = len({tuple(np.round(r, 3)) for r in iops})
        raise SeriesUnusable(f"mixed orientations: {n} different ImageOrientationPatient values "
                             "in one series (e.g. axial and reformats together)")
    sizes = Counter((int(h.Rows), int(h.Columns),
                     round(float(h.PixelSpacing[0]), 4), round(float(h.PixelSpacing[1]), 4))
                    for h in headers)
    if len(sizes) > 1:
        desc = ", ".join(f"{r}x{c} @ {a}x{b} mm ({n})" for (r, c, a, b), n in sizes.items())
        raise SeriesUnusable(f"mixed image sizes / pixel spacings in one series: {desc}")
    for h, p in zip(headers, paths):
        tilt = _float(h.get("GantryDetectorTilt"))
        if tilt is not None and abs(tilt) > 1e-3:
            raise SeriesUnusable(
                f"gantry tilt {tilt:g} degrees: slices are sheared; a tilted acquisition must "
                "be resampled to an orthogonal grid (reconstruct without tilt)")


def load_volume(paths: Sequence[Path], *, datasets: Sequence[Dataset] | None = None) -> Volume:
    """Read the instances of one series and build a HU :class:`~screener.domain.Volume`.

    Slices are sorted by their position along the slice normal (not by
    InstanceNumber); pixel values are rescaled to HU (float32). Frames of
    multi-frame (Enhanced CT) objects become slices (see :func:`frame_number`).
    MONOCHROME1 data are rescaled like MONOCHROME2: in DICOM the inversion of
    MONOCHROME1 happens after the modality LUT (display only), so the
    rescaled values are already HU; a warning is recorded on the volume.

    Parameters
    ----------
    paths : sequence of pathlib.Path
        Instance files of one series.
    datasets : sequence of pydicom.dataset.Dataset, optional
        The files already read whole, one per path (``SeriesInfo.datasets`` of
        ``read_series_info(paths, with_pixels=True)``): decoded without reading the files
        again.  They become the volume's headers (their pixel data are dropped).

    Returns
    -------
    Volume

    Raises
    ------
    SeriesUnusable
        Missing slices (a gap > 1.5 x the median spacing), uneven spacing,
        gantry tilt (GantryDetectorTilt != 0 or positions not along the
        normal), mixed orientations or sizes, frames without per-frame
        geometry, duplicate positions, mixed series, or pixel data that cannot be decoded (the
        reason names the transfer syntax and the package to install).
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise SeriesUnusable("series has no instances")
    if datasets is not None and len(datasets) != len(paths):
        raise ValueError(f"{len(datasets)} datasets given for {len(paths)} paths")
    headers = list(datasets) if datasets is not None else [_read_full(p) for p in paths]
    keep = _without_scouts(headers)
    warnings: list[str] = []
    if len(keep) < len(headers):
        warnings.append(f"{len(headers) - len(keep)} localizer/scout image(s) in the series left out")
        headers = [headers[i] for i in keep]
        paths = [paths[i] for i in keep]
    series_uids = {str(h.get("SeriesInstanceUID", "") or "") for h in headers}
    if len(series_uids) > 1:
        raise SeriesUnusable(f"files of {len(series_uids)} different series were given as one")
    headers, paths, sources = _expand_frames(headers, paths)
    row_dir, col_dir, normal, pos = _orientation(headers, paths)
    proj = pos @ normal
    order = np.argsort(proj, kind="stable")
    pos, proj = pos[order], proj[order]
    headers = [headers[i] for i in order]
    paths = [paths[i] for i in order]
    sources = [sources[i] for i in order]
    spacing_k = _slice_spacing(headers, pos, proj, normal, warnings)
    array = _hu_array(sources, headers, paths, warnings)
    for h in headers:  # keep headers only
        for kw in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            if kw in h:
                del h[kw]
    ps = headers[0].PixelSpacing
    direction = np.stack([row_dir, col_dir, normal], axis=1)
    vol = Volume(array=array, spacing=(float(spacing_k), float(ps[0]), float(ps[1])),
                 origin=pos[0].astype(float), direction=direction,
                 datasets=headers, paths=paths, warnings=warnings)
    log.debug("volume loaded", series_uid=str(headers[0].get("SeriesInstanceUID", "")),
              shape=list(array.shape), spacing=list(vol.spacing))
    return vol


def _expand_frames(headers: list[Dataset], paths: list[Path]
                   ) -> tuple[list[Dataset], list[Path], list[tuple[Dataset, int | None]]]:
    """One header and path per slice (the frames of a multi-frame object each become one, with
    :func:`_frame_headers`), and the (dataset holding the pixels, frame index or ``None``) of each."""
    sources: list[tuple[Dataset, int | None]] = []
    expanded_h: list[Dataset] = []
    expanded_p: list[Path] = []
    for h, p in zip(headers, paths):
        if _is_multiframe(h):
            for f, fh in enumerate(_frame_headers(h, p)):
                expanded_h.append(fh)
                expanded_p.append(p)
                sources.append((h, f))
        else:
            expanded_h.append(h)
            expanded_p.append(p)
            sources.append((h, None))
    return expanded_h, expanded_p, sources


def _orientation(headers: list[Dataset], paths: list[Path]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Row and column direction, slice normal (unit vectors) and every slice's position.

    Raises
    ------
    SeriesUnusable
        Inconsistent geometry (:func:`_check_geometry`), an orientation that is not orthonormal,
        or a geometry value that is not a number.
    """
    try:
        _check_geometry(headers, paths)
        iop = np.array([float(v) for v in headers[0].ImageOrientationPatient])
        row_dir, col_dir = iop[:3], iop[3:]
        row_dir = row_dir / np.linalg.norm(row_dir)
        col_dir = col_dir / np.linalg.norm(col_dir)
        normal = np.cross(row_dir, col_dir)
        if np.linalg.norm(normal) < 0.5 or abs(float(row_dir @ col_dir)) > 0.01:
            raise SeriesUnusable("ImageOrientationPatient is not orthonormal")
        normal /= np.linalg.norm(normal)
        pos = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
    except SeriesUnusable:
        raise
    except (TypeError, ValueError) as exc:
        # a geometry value that is not a number (the ingest validation refuses these; files
        # placed in the store by hand may still carry one)
        raise SeriesUnusable("a geometry attribute (ImagePositionPatient, ImageOrientationPatient, "
                             "PixelSpacing) is not a number; fix or remove the offending instance"
                             ) from exc
    return row_dir, col_dir, normal, pos


def _slice_spacing(headers: list[Dataset], pos: np.ndarray, proj: np.ndarray, normal: np.ndarray,
                   warnings: list[str]) -> float:
    """Slice spacing (mm) of slices sorted along the normal (``proj``: their positions on it).

    Raises
    ------
    SeriesUnusable
        Duplicate positions, missing slices (a gap > :data:`GAP_FACTOR` x the median step),
        uneven spacing, or positions that drift in plane (gantry tilt).
    """
    if len(headers) == 1:
        warnings.append("single slice: slice spacing taken from the header")
        return _float(headers[0].get("SpacingBetweenSlices")) or _float(headers[0].get("SliceThickness")) or 1.0
    steps = np.diff(proj)
    if np.any(steps < 1e-3):
        k = int(np.argmin(steps))
        raise SeriesUnusable(
            f"duplicate slice positions ({proj[k]:.2f} mm along the normal): the series "
            "holds overlapping acquisitions or duplicated instances")
    med = float(np.median(steps))
    big = np.where(steps > GAP_FACTOR * med)[0]
    if len(big):
        k = int(big[0])
        raise SeriesUnusable(
            f"missing slices: gap of {steps[k]:.2f} mm between slices at "
            f"{proj[k]:.2f} and {proj[k + 1]:.2f} mm along the normal "
            f"(median spacing {med:.2f} mm; {len(big)} gap(s)); the series is incomplete")
    dev = np.abs(steps - med)
    if np.any(dev > max(UNEVEN_TOLERANCE * med, 0.05)):
        raise SeriesUnusable(
            f"uneven slice spacing: steps from {steps.min():.2f} to {steps.max():.2f} mm "
            f"(median {med:.2f} mm); resample or re-reconstruct with constant spacing")
    # positions must move along the normal: in-plane drift means shear (tilt)
    disp = pos[-1] - pos[0]
    along = float(disp @ normal)
    inplane = float(np.linalg.norm(disp - along * normal))
    angle = np.degrees(np.arctan2(inplane, abs(along)))
    if angle > TILT_TOLERANCE_DEG:
        raise SeriesUnusable(
            f"gantry tilt / sheared geometry: slice positions deviate {angle:.1f} degrees "
            "from the slice normal; reconstruct without tilt")
    return med


#: The float32 buffer of the last volume loaded, kept for the next one: a 300-slice 512 x 512
#: volume is 315 MB, and the first write to freshly allocated memory (page faults, the kernel's
#: huge-page compaction) took 0.1-0.5 s of a load, more than converting the pixels.
_spare: np.ndarray | None = None
#: ``sys.getrefcount`` of the kept buffer with nothing but the global and the local name on it,
#: measured when it was made (reference counts differ between CPython versions: not a constant)
_spare_free_refs = 0
_spare_lock = threading.Lock()


def _volume_buffer(shape: tuple[int, int, int]) -> np.ndarray:
    """An uninitialised float32 array of ``shape``: the kept buffer when it is large enough and
    nothing refers to it any more (no volume and no view of one: a view holds a reference to
    the buffer it shows), else a new one, which is kept instead."""
    global _spare, _spare_free_refs
    n = shape[0] * shape[1] * shape[2]
    with _spare_lock:
        buf = _spare
        # referrers when free: the global and ``buf``, as when it was made; a live volume or view adds one
        if buf is not None and buf.size >= n and sys.getrefcount(buf) == _spare_free_refs:
            return buf[:n].reshape(shape)
        _spare = buf = np.empty(n, dtype=np.float32)
        _spare_free_refs = sys.getrefcount(buf)
        return buf.reshape(shape)


def _hu_array(sources: list[tuple[Dataset, int | None]], headers: list[Dataset], paths: list[Path],
              warnings: list[str]) -> np.ndarray:
    """The slices' pixels decoded (each multi-frame object once) and rescaled to HU (float32); the
    encoded pixel data are dropped from the datasets as soon as they are decoded.

    Raises
    ------
    SeriesUnusable
        A slice without pixel data, or a frame that is not one grey-scale Rows x Columns image.
    """
    rows, cols = int(headers[0].Rows), int(headers[0].Columns)
    array = _volume_buffer((len(headers), rows, cols))  # every element is written below
    decoded: dict[int, np.ndarray] = {}
    for k, ((src, frame), ds, p) in enumerate(zip(sources, headers, paths)):
        if frame is None:
            if "PixelData" not in src:
                raise SeriesUnusable(f"{p.name}: no pixel data")
            arr = _decode(src, p)
            src.PixelData = b""  # free the encoded bytes early (header kept below)
        else:
            if id(src) not in decoded:
                if "PixelData" not in src:
                    raise SeriesUnusable(f"{p.name}: no pixel data")
                decoded[id(src)] = _decode(src, p)
                src.PixelData = b""
            arr = decoded[id(src)][frame]
        if arr.shape != (rows, cols):
            raise SeriesUnusable(f"{p.name}: expected one grey-scale {rows}x{cols} frame, "
                                 f"got shape {arr.shape} ({ds.get('PhotometricInterpretation', '?')})")
        slope = _float(ds.get("RescaleSlope")) or 1.0
        intercept = _float(ds.get("RescaleIntercept")) or 0.0
        out = array[k]
        out[...] = arr  # converts to float32 in place
        if slope != 1.0:
            out *= np.float32(slope)
        if intercept != 0.0:
            out += np.float32(intercept)
        if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1" and \
                not any("MONOCHROME1" in w for w in warnings):
            warnings.append("MONOCHROME1: rescaled values used as HU (the inversion of "
                            "MONOCHROME1 applies to display only)")
    return array
