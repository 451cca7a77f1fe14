"""One validation layer for every received or replayed instance.

``screener serve`` (the C-STORE SCP) and ``screener replay`` both call
:func:`validate_dataset` (replay through :func:`read_instance`), so an instance
is judged the same way whichever door it came in by. Each problem becomes a
:class:`Rejected` with a DICOM status (what the SCP answers) and a reason
(what the sender or the replay table is told):

======  ==================================================================
0xA900  a Study / Series / SOP Instance UID or the SOP Class UID missing
0xC000  the data set cannot be parsed (any pydicom failure: unknown VR,
        bad length, truncated or not DICOM)
0xC001  pixel data missing, empty, shorter or longer than Rows x Columns x
        samples x frames say, or its encapsulation malformed
0xC002  an invalid value: a UID that is not a UID (digits and dots, at most
        64 characters; a leading zero in a component is tolerated), a
        rescale or geometry number the pipeline computes with that is not a
        finite number (RescaleSlope / Intercept, ImagePositionPatient,
        PixelSpacing, SliceThickness, KVP, ...), or a RescaleSlope of 0
======  ==================================================================

Decodability is judged cheaply from the pixel data framing (length of native
data; encapsulated fragments with the codec's start and end markers) instead
of decoding; the series loader still declines undecodable series later.

:func:`quantitative_problems` says why a CT series cannot be measured in
Hounsfield units (lossy compression, 8-bit pixel data) so that a job is
declined for that reason instead of a later, misleading one.
"""
from __future__ import annotations

import math
import re
import struct
from pathlib import Path

import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.encaps import generate_frames
from pydicom.tag import Tag
from pydicom.uid import (UID, JPEG2000, JPEG2000Lossless, JPEGBaseline8Bit, JPEGExtended12Bit,
                         JPEGLosslessSV1, JPEGLossless, JPEGLSLossless, JPEGLSNearLossless,
                         RLELossless)

STATUS_SUCCESS = 0x0000
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_OUT_OF_DISK = 0xA700
STATUS_WRITE_FAILED = 0xA701
STATUS_DATASET_MISMATCH = 0xA900
STATUS_DUPLICATE_CONFLICT = 0xB006
STATUS_CANNOT_PARSE = 0xC000
STATUS_BAD_PIXEL_DATA = 0xC001
STATUS_INVALID_VALUE = 0xC002

_JPEG_FAMILY = {JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1,
                JPEGLSLossless, JPEGLSNearLossless}
_J2K_FAMILY = {JPEG2000Lossless, JPEG2000}
_PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}
#: numbers the pipeline computes with: each value must be a finite number (at any depth,
#: so the functional groups of enhanced images are checked too)
_RESCALE_TAGS = {0x00281053: "RescaleSlope", 0x00281052: "RescaleIntercept",
                 0x00200032: "ImagePositionPatient", 0x00200037: "ImageOrientationPatient",
                 0x00280030: "PixelSpacing", 0x00181164: "ImagerPixelSpacing",
                 0x00180050: "SliceThickness", 0x00180088: "SpacingBetweenSlices",
                 0x00180060: "KVP", 0x00201041: "SliceLocation"}
_NUMBER_SIZES = {"US": 2, "SS": 2, "UL": 4, "SL": 4, "FL": 4, "FD": 8, "AT": 4, "SV": 8,
                 "UV": 8, "OW": 2, "OF": 4, "OD": 8, "OL": 4, "OV": 8, "OB": 1, "UN": 1}
_DS_BYTES = re.compile(rb"^ *[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)? *\x00?$")
_IS_BYTES = re.compile(rb"^ *[+-]?\d+ *\x00?$")
#: text VRs whose conversion cannot raise (undecodable bytes become replacement characters)
_SAFE_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "TM",
                            "UC", "UI", "UR", "UT"})
#: digits and dots, no empty component; leading zeros are tolerated (old modalities send them)
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
IDENTIFYING_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
#: CT storage classes (HU images): the quantitative check applies to these
CT_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1",
                        "1.2.840.10008.5.1.4.1.1.2.2"})
#: projection radiograph storage classes and their names (the hip protocol takes these)
PROJECTION_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.1.1": "DX for presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "DX for processing",
    "1.2.840.10008.5.1.4.1.1.1": "CR",
}


#: the spacing attributes of a projection radiograph: it has up to three sources of its pixel size
#: (:func:`screener.radiograph.pixel_spacing_mm`), so one that is not a finite number is a problem
#: for that protocol to weigh (it may use another, or decline with the reason), not a reason to
#: refuse the image; a CT's PixelSpacing stays strict (its geometry has no other source)
RADIOGRAPH_SPACING_TAGS = frozenset({0x00280030, 0x00181164})


class Rejected(Exception):
    """An instance refused with a DICOM status and a reason for the sender.

    Parameters
    ----------
    status : int
        The C-STORE status.
    reason : str
        Human-readable reason (sent as ErrorComment, truncated to 64 characters).
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def clean_uid(value: object) -> str:
    """A UID value as text without padding (``""`` when absent)."""
    return str(value).strip().strip("\x00").strip() if value else ""


def is_valid_uid(uid: str) -> bool:
    """Whether ``uid`` is a usable UID: 1-64 characters of digits and dots, no empty part.

    Parameters
    ----------
    uid : str
        The UID without padding.

    Returns
    -------
    bool
    """
    return 0 < len(uid) <= 64 and bool(_UID_RE.match(uid))


def _short(exc: BaseException) -> str:
    """The exception type, and its message only when it cannot quote a value.

    pydicom's messages often quote the offending value (``Instead received
    b'...'``, ``could not convert string to float: '...'``): when the element is a
    patient's name or birth date that would put PHI into the log, the database
    and the sender's ErrorComment. Messages with quotes are therefore reduced to
    the type, except pydicom's "Unknown Value Representation 'XX' in tag ..."
    (it quotes the VR, not the value).
    """
    msg = str(exc).replace("\n", " ")
    if msg.startswith("Unknown Value Representation") and len(msg) < 100:
        return f"{type(exc).__name__}: {msg}"
    if not msg or any(q in msg for q in ("'", '"', "b'", "\\x")) or len(msg) > 100:
        return type(exc).__name__
    return f"{type(exc).__name__}: {msg}"


def _raw_vr(elem: object, tag: int) -> str | None:
    """The VR of a not yet converted element (the dictionary's when implicit), else ``None``."""
    if not isinstance(elem, RawDataElement):
        return None
    if elem.VR:
        return str(elem.VR)
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return None


def _raw_ok(raw: object, tag: int) -> bool:
    """Whether a not yet converted element certainly converts: a text VR, a number string
    that looks like one, or binary numbers whose length fits the VR. Anything else is
    converted by :func:`_walk` (and an error becomes the reason)."""
    vr = _raw_vr(raw, tag)
    if vr is None:
        return False
    if vr in _SAFE_TEXT_VRS:
        return True
    value = getattr(raw, "value", None)
    if vr in _NUMBER_SIZES:
        length = getattr(raw, "length", 0)
        return length != 0xFFFFFFFF and length % _NUMBER_SIZES[vr] == 0
    if vr in ("DS", "IS") and isinstance(value, bytes):
        items = value.split(b"\\")
        pattern = _DS_BYTES if vr == "DS" else _IS_BYTES
        return all(not item.strip(b" \x00") or pattern.match(item) for item in items)
    return False


def _walk(ds: Dataset, depth: int = 0, lenient: frozenset[int] = frozenset()) -> None:
    """Convert every element whose conversion can fail (raising what pydicom raises) and
    check rescale values. Text VRs that pydicom always decodes (with replacement
    characters at worst) are left raw: converting everything cost ~4 ms per CT slice.
    Tags in ``lenient`` are checked like any other element, not as numbers the pipeline
    needs (:data:`RADIOGRAPH_SPACING_TAGS`)."""
    if depth > 16:
        raise Rejected(STATUS_CANNOT_PARSE, "sequences nested deeper than 16 levels")
    for tag in list(ds.keys()):
        itag = int(tag)
        if itag in _PIXEL_TAGS and depth == 0:
            continue
        if (itag not in _RESCALE_TAGS or itag in lenient) and _raw_ok(ds.get_item(tag), itag):
            continue
        try:
            elem = ds[tag]
            value = elem.value
            items = list(value) if elem.VR == "SQ" and value is not None else None
        except Exception as exc:  # noqa: BLE001 - every pydicom failure means "cannot parse"
            vr = getattr(ds.get_item(tag), "VR", None)
            raise Rejected(STATUS_CANNOT_PARSE,
                           f"attribute {Tag(tag)} unreadable (VR {vr}): {_short(exc)}") from exc
        for item in items or ():
            _walk(item, depth + 1, lenient)
        name = _RESCALE_TAGS.get(itag) if itag not in lenient else None
        if name and value not in (None, ""):
            _check_rescale(name, value)


def _check_rescale(name: str, value: object) -> None:
    """Every value of a rescale / geometry attribute must be a finite number (the
    reason names the attribute, never the value)."""
    items = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    for item in items:
        try:
            number = float(item)  # type: ignore[arg-type]
        except (TypeError, ValueError) as exc:
            raise Rejected(STATUS_INVALID_VALUE, f"{name} is not a number") from exc
        if not math.isfinite(number):
            raise Rejected(STATUS_INVALID_VALUE, f"{name} is not finite ({number})")
    if name == "RescaleSlope" and items and float(items[0]) == 0.0:  # type: ignore[arg-type]
        raise Rejected(STATUS_INVALID_VALUE, "RescaleSlope is 0")


def check_identifiers(ds: Dataset) -> dict[str, str]:
    """Check the UIDs that identify an instance.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset

    Returns
    -------
    dict
        ``StudyInstanceUID``, ``SeriesInstanceUID``, ``SOPInstanceUID`` and
        ``SOPClassUID`` (``""`` when the class is absent) without padding.

    Raises
    ------
    Rejected
        ``0xC000`` nothing identifies a DICOM instance (random bytes, cut
        files); ``0xA900`` an identifying UID is missing; ``0xC002`` a UID is
        not a valid UID.
    """
    if not any(k in ds for k in (*IDENTIFYING_UIDS, "SOPClassUID")):
        raise Rejected(STATUS_CANNOT_PARSE,
                       "data set unreadable: truncated or not DICOM (no UIDs found)")
    out = {k: clean_uid(ds.get(k)) for k in (*IDENTIFYING_UIDS, "SOPClassUID")}
    missing = [k for k in IDENTIFYING_UIDS if not out[k]]
    if missing:
        raise Rejected(STATUS_DATASET_MISMATCH, "missing " + ", ".join(missing))
    for k, v in out.items():
        if v and not is_valid_uid(v):
            raise Rejected(STATUS_INVALID_VALUE,
                           f"{k} is not a valid UID (digits and dots, at most 64)")
    return out


def _expected_native_length(ds: Dataset, rows: int, cols: int, bits: int, spp: int,
                            frames: int) -> int:
    if str(ds.get("PhotometricInterpretation", "")).strip() == "YBR_FULL_422":
        return rows * cols * frames * 2 * bits // 8
    n_pixels = rows * cols * spp * frames
    return (n_pixels + 7) // 8 if bits == 1 else n_pixels * bits // 8


def _image_size(ds: Dataset) -> tuple[int, int, int, int, int]:
    try:
        rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
        bits = int(ds.get("BitsAllocated") or 0)
        spp = int(ds.get("SamplesPerPixel") or 1)
        frames = int(ds.get("NumberOfFrames") or 1)
    except Exception as exc:  # noqa: BLE001 - bad VR / value in a received data set
        raise Rejected(STATUS_BAD_PIXEL_DATA,
                       f"image attributes unreadable: {_short(exc)}") from exc
    if rows <= 0 or cols <= 0 or bits not in (1, 8, 16, 32, 64) or spp <= 0 or frames <= 0:
        raise Rejected(STATUS_BAD_PIXEL_DATA,
                       f"invalid image size: Rows {rows}, Columns {cols}, BitsAllocated {bits}")
    return rows, cols, bits, spp, frames


def _frame_problem(frame: bytes, ts: str, index: int) -> str | None:
    body = frame.rstrip(b"\x00")
    if body.endswith(b"\xff\xd9\xff"):  # one 0xFF pad byte to even length (real files have it)
        body = body[:-1]
    where = f"frame {index + 1}"
    if ts in _JPEG_FAMILY:
        if not body.startswith(b"\xff\xd8"):
            return f"{where}: JPEG stream lacks its SOI marker"
        if not body.endswith(b"\xff\xd9"):
            return f"{where}: JPEG stream lacks its EOI marker (truncated)"
    elif ts in _J2K_FAMILY:
        if not (body.startswith(b"\xff\x4f\xff\x51") or body[4:8] == b"jP  "):
            return f"{where}: JPEG 2000 codestream lacks its SOC/SIZ markers"
        if not body.endswith(b"\xff\xd9"):
            return f"{where}: JPEG 2000 codestream lacks its EOC marker (truncated)"
    elif ts == RLELossless:
        if len(frame) < 64:
            return f"{where}: RLE header shorter than 64 bytes"
        header = struct.unpack("<16L", frame[:64])
        n = header[0]
        if not 1 <= n <= 15:
            return f"{where}: RLE header gives {n} segments (1-15 allowed)"
        offsets = header[1:n + 1]
        if offsets[0] != 64 or list(offsets) != sorted(offsets) or offsets[-1] >= len(frame):
            return f"{where}: RLE segment offsets inconsistent with the fragment length"
    return None


_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD,
                          0xCE, 0xCF, 0xF7})  # JPEG SOFn and JPEG-LS SOF55


def _jpeg_size(body: bytes) -> tuple[int, int] | None:
    """(rows, columns) from a JPEG / JPEG-LS frame header, without decoding."""
    i = 2
    while i + 4 <= len(body):
        if body[i] != 0xFF:
            return None
        marker = body[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = int.from_bytes(body[i + 2:i + 4], "big")
        if marker in _SOF_MARKERS and i + 9 <= len(body):
            return (int.from_bytes(body[i + 5:i + 7], "big"),
                    int.from_bytes(body[i + 7:i + 9], "big"))
        if marker == 0xDA:  # start of scan before any frame header
            return None
        i += 2 + length
    return None


def _j2k_size(body: bytes) -> tuple[int, int] | None:
    """(rows, columns) from a JPEG 2000 SIZ marker segment, without decoding."""
    at = body.find(b"\xff\x4f\xff\x51")
    if at < 0 or at + 24 > len(body):
        return None
    siz = body[at + 4:at + 24]
    xsiz, ysiz, xo, yo = struct.unpack(">4L", siz[4:20])
    return ysiz - yo, xsiz - xo


def _size_problem(frame: bytes, ts: str, rows: int, cols: int) -> str | None:
    """The codestream's own image size, when it contradicts Rows / Columns."""
    size = (_jpeg_size(frame) if ts in _JPEG_FAMILY else
            _j2k_size(frame) if ts in _J2K_FAMILY else None)
    if size is None or size[0] == 0 or size == (rows, cols):
        return None
    return (f"frame 1: the codestream is {size[1]} x {size[0]} (columns x rows), "
            f"Columns / Rows say {cols} x {rows}")


def _pixel_value(ds: Dataset) -> bytes | None:
    try:
        return ds["PixelData"].value
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on bad data
        raise Rejected(STATUS_BAD_PIXEL_DATA, f"Pixel Data unreadable: {_short(exc)}") from exc


def check_pixel_data(ds: Dataset, transfer_syntax: str) -> None:
    """Check, without decoding, that an image's pixel data is present and well framed.

    Native pixel data must be exactly as long as Rows x Columns x samples x
    frames x BitsAllocated / 8 say (plus one pad byte when that is odd).

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        The received data set.
    transfer_syntax : str
        Its transfer syntax UID; ``""`` when unknown (then judged from the
        encoding of the Pixel Data element).

    Raises
    ------
    Rejected
        ``0xC001`` with the reason (missing, truncated, too long or malformed pixel data).
    """
    rows, cols, bits, spp, frames = _image_size(ds)
    if "PixelData" not in ds:
        raise Rejected(STATUS_BAD_PIXEL_DATA, "no Pixel Data in an image instance")
    raw = ds.get_item("PixelData")
    length = getattr(raw, "length", None)
    ts = UID(transfer_syntax) if transfer_syntax else None
    compressed = ts.is_compressed if ts is not None else length == 0xFFFFFFFF
    if not compressed and isinstance(length, int) and length != 0xFFFFFFFF \
            and getattr(raw, "value", b"") is None:
        size = length  # deferred read (replay): the length is enough
    else:
        value = _pixel_value(ds)
        if value is None or len(value) == 0:
            raise Rejected(STATUS_BAD_PIXEL_DATA, "Pixel Data is empty")
        size = len(value)
    if size == 0:
        raise Rejected(STATUS_BAD_PIXEL_DATA, "Pixel Data is empty")
    if not compressed:
        expected = _expected_native_length(ds, rows, cols, bits, spp, frames)
        if size < expected:
            raise Rejected(STATUS_BAD_PIXEL_DATA,
                           f"Pixel Data truncated: {size} of {expected} bytes")
        if size > expected + (expected % 2):
            raise Rejected(STATUS_BAD_PIXEL_DATA,
                           f"Pixel Data too long: {size} bytes, image size says {expected}")
        return
    _check_encapsulated(value, str(ts or ""), frames, rows, cols)


def _check_encapsulated(value: bytes, ts: str, frames: int, rows: int, cols: int) -> None:
    try:
        found = list(generate_frames(value, number_of_frames=frames))
    except Exception as exc:  # noqa: BLE001
        raise Rejected(STATUS_BAD_PIXEL_DATA,
                       f"encapsulated Pixel Data malformed: {exc}") from exc
    if len(found) < frames or any(len(f) == 0 for f in found):
        raise Rejected(STATUS_BAD_PIXEL_DATA,
                       f"encapsulated Pixel Data has {len(found)} of {frames} frames")
    for i, frame in enumerate(found):
        problem = _frame_problem(frame, ts, i)
        if problem:
            raise Rejected(STATUS_BAD_PIXEL_DATA, problem)
    problem = _size_problem(found[0], ts, rows, cols)
    if problem:
        raise Rejected(STATUS_BAD_PIXEL_DATA, problem)


def validate_dataset(ds: Dataset, transfer_syntax: str, *, image: bool = True) -> dict[str, str]:
    """Validate one instance: parseable, identified by valid UIDs, sane image values.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        The instance as received or read (pixel data may be deferred).
    transfer_syntax : str
        Its transfer syntax UID (``""`` when unknown).
    image : bool
        Check the pixel data too (an image class the screener processes).

    Returns
    -------
    dict
        The identifying UIDs (see :func:`check_identifiers`).

    Raises
    ------
    Rejected
        With the status and reason of the first problem found.
    """
    if not any(k in ds for k in (*IDENTIFYING_UIDS, "SOPClassUID")):
        raise Rejected(STATUS_CANNOT_PARSE,
                       "data set unreadable: truncated or not DICOM (no UIDs found)")
    try:
        sop_class = clean_uid(ds.get("SOPClassUID"))
    except Exception:  # noqa: BLE001 - an unreadable class is reported by check_identifiers
        sop_class = ""
    try:
        _walk(ds, lenient=RADIOGRAPH_SPACING_TAGS if sop_class in PROJECTION_CLASSES else frozenset())
    except Rejected:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. a broken data set structure
        raise Rejected(STATUS_CANNOT_PARSE, f"data set cannot be parsed: {_short(exc)}") from exc
    uids = check_identifiers(ds)
    if image:
        check_pixel_data(ds, transfer_syntax)
    return uids


def read_instance(path: Path, image_classes: frozenset[str] | set[str] | None = None
                  ) -> tuple[Dataset, dict[str, str], str]:
    """Read and validate a file the way the SCP validates a received instance.

    Parameters
    ----------
    path : pathlib.Path
        A DICOM file (Part 10, or a bare data set pydicom can read).
    image_classes : set of str, optional
        SOP classes whose pixel data is checked; default: every class with
        Pixel Data.

    Returns
    -------
    ds : pydicom.dataset.Dataset
        The header (pixel data deferred).
    uids : dict
        The identifying UIDs (see :func:`check_identifiers`).
    transfer_syntax : str
        From the file meta, ``""`` when absent.

    Raises
    ------
    Rejected
        The file is empty, not DICOM, cut, or fails :func:`validate_dataset`.
    """
    try:
        if path.stat().st_size == 0:
            raise Rejected(STATUS_CANNOT_PARSE, "empty file (0 bytes)")
        ds = pydicom.dcmread(path, defer_size=4096, force=True)
    except Rejected:
        raise
    except Exception as exc:  # noqa: BLE001 - InvalidDicomError, EOFError, OSError, ...
        raise Rejected(STATUS_CANNOT_PARSE, f"not a readable DICOM file: {_short(exc)}") from exc
    meta = getattr(ds, "file_meta", None)
    ts = clean_uid(meta.get("TransferSyntaxUID")) if meta is not None else ""
    uids = validate_dataset(ds, ts, image=False)
    image = ("PixelData" in ds if image_classes is None
             else uids["SOPClassUID"] in image_classes)
    if image:
        check_pixel_data(ds, ts)
    return ds, uids, ts


def quantitative_problems(ds: Dataset) -> list[str]:
    """Why a CT image cannot be measured in Hounsfield units; empty when it can.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        A header of the series (pixel data not needed).

    Returns
    -------
    list of str
        e.g. ``["lossy compressed (LossyImageCompression 01)", "8-bit pixel data"]``;
        always empty for non-CT classes.
    """
    sop_class = clean_uid(ds.get("SOPClassUID"))
    if sop_class not in CT_CLASSES and str(ds.get("Modality", "")).strip() != "CT":
        return []
    problems = []
    if str(ds.get("LossyImageCompression", "")).strip() == "01":
        problems.append("lossy compressed (LossyImageCompression 01)")
    try:
        stored = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
    except (TypeError, ValueError):
        stored = 16
    if stored <= 8:
        problems.append(f"{stored}-bit pixel data cannot hold Hounsfield units")
    if problems:
        image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
        if image_type[:1] == ["DERIVED"]:
            problems.append("a DERIVED image")
    return problems
