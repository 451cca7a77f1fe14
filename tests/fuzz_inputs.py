"""Generator of hostile DICOM inputs for the fuzz suite (``tests/test_fuzz.py``, issue 17).

:func:`generate` derives ``n`` inputs from a few *base* instances — small synthetic CT slices
(``tests/ct_factory.py``), cohort CT slices and an AP pelvis radiograph from
``training.phantoms``, and the files of ``../shared/data/real-public/`` when present — each
with fresh UIDs, then mutated by one *kind*:

==================== ==========================================================================
good                 unchanged copy (fresh UIDs): must be stored
byte_flip            1-8 bytes of the data set flipped (mostly in the header)
truncation           the data set cut at a random offset
wrong_vr             a header element's VR replaced (unknown ``CR``/``EI``/``XX``, or a wrong one)
huge_dims            Rows / Columns 65535 with the original (short) pixel data
long_pixel           native pixel data longer than Rows x Columns x samples x bits
bad_transfer_syntax  unknown / big-endian / compressed-with-native-data / deflate / implicit
bad_uid              SOP / Series / Study Instance UID not a valid UID (``../../../../tmp/ESCAPE``)
nan_rescale          RescaleSlope / RescaleIntercept NaN, inf, -inf, 1e999
empty                zero-byte file (for the SCP: File Meta and no data set)
random_bytes         random bytes (some behind a valid preamble + ``DICM``)
cut_preamble         a file cut inside its 128-byte preamble / ``DICM`` prefix
duplicate_conflict   an earlier good instance's SOP Instance UID with different pixel data
bad_charset          SpecificCharacterSet with an empty first value, unknown terms, bad bytes
bad_date             invalid PatientBirthDate / StudyDate / PatientAge / PatientSex
bad_numbers          NumberOfFrames, BitsAllocated, SamplesPerPixel, PixelRepresentation,
                     HighBit, PixelSpacing, ImagePositionPatient / Orientation, SliceThickness
                     zero, negative, NaN, inf or absurd
==================== ==========================================================================

Each :class:`FuzzInput` carries the bytes of the file as replay sees it and the bytes the SCU
sends over the network (always with a File Meta header, so ``pynetdicom`` can stream them as
they are), the SOP class / instance / transfer syntax of the request, and an expectation:
``stored`` (must be stored), ``refused`` (a failure status or listed reason is required by
issue 17), ``first_kept`` (a conflicting duplicate: the first version stays) or ``any``.

:func:`write_series_variants` writes whole cohort CT series (full size, through the real
pipeline) whose demographics are bad on every slice: only a series that yields a finding
reaches the report writer (issue 17 cases 3 and 11).

Everything is seeded: the same ``(n, seed)`` gives the same inputs.
"""
from __future__ import annotations

import contextlib
import copy
import struct
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pydicom
from pydicom import config as pdconfig
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.tag import BaseTag
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (DeflatedExplicitVRLittleEndian,
                         ImplicitVRLittleEndian, JPEGBaseline8Bit, JPEG2000Lossless, RLELossless)

KINDS: dict[str, float] = {   # kind -> relative weight
    "good": 16, "byte_flip": 7, "truncation": 6, "wrong_vr": 7, "huge_dims": 5,
    "long_pixel": 5, "bad_transfer_syntax": 6, "bad_uid": 7, "nan_rescale": 5, "empty": 4,
    "random_bytes": 5, "cut_preamble": 4, "duplicate_conflict": 5, "bad_charset": 6,
    "bad_date": 6, "bad_numbers": 6,
}

#: Kinds whose expectation is "refused" (issue 17: the validation layer must refuse them).
MUST_REFUSE = {"huge_dims", "long_pixel", "bad_uid", "nan_rescale", "empty", "random_bytes",
               "cut_preamble"}

IMPLEMENTATION_UID = "1.2.826.0.1.3680043.10.1234.1"
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
             b"UT", b"UV"}
_PIXEL_TAG = struct.pack("<HH", 0x7FE0, 0x0010)


@dataclass
class Base:
    """One source instance the inputs are derived from."""

    source: str          # ct_factory / cohort_ct / radiograph / real:<file name>
    ds: Dataset          # with file_meta
    native: bool         # uncompressed pixel data
    weight: float = 1.0  # how often it is drawn


@dataclass
class FuzzInput:
    """One generated input."""

    index: int
    kind: str
    source: str
    detail: str
    file_bytes: bytes            # the file as ``screener replay`` reads it
    scp_bytes: bytes | None      # preamble + File Meta + data set as streamed by the SCU
    sop_class: str
    sop_uid: str                 # the request's Affected SOP Instance UID
    series_uid: str
    transfer_syntax: str
    expect: str = "any"          # stored / refused / first_kept / any
    dup_of: int | None = None    # duplicate_conflict: index of the original
    name: str = field(default="")

    @property
    def good(self) -> bool:
        """A well-formed instance that must be stored."""
        return self.expect == "stored"


@contextlib.contextmanager
def lenient_pydicom() -> Iterator[None]:
    """Let pydicom hold and write invalid values (restored afterwards)."""
    s = pdconfig.settings
    old = (s.reading_validation_mode, s.writing_validation_mode)
    s.reading_validation_mode = s.writing_validation_mode = pdconfig.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        s.reading_validation_mode, s.writing_validation_mode = old


def _el(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    if vr in _LONG_VRS:
        return struct.pack("<HH", group, elem) + vr + b"\x00\x00" + struct.pack("<L", len(value)) \
            + value
    return struct.pack("<HH", group, elem) + vr + struct.pack("<H", len(value)) + value


def _pad(s: str, ch: bytes = b"\x00") -> bytes:
    b = s.encode("ascii", "replace")
    return b + ch if len(b) % 2 else b


def file_meta_bytes(sop_class: str, sop_uid: str, ts: str) -> bytes:
    """128-byte preamble, ``DICM`` and a File Meta group (explicit VR little endian)."""
    body = b"".join([
        _el(2, 1, b"OB", b"\x00\x01"), _el(2, 2, b"UI", _pad(sop_class)),
        _el(2, 3, b"UI", _pad(sop_uid)), _el(2, 0x10, b"UI", _pad(ts)),
        _el(2, 0x12, b"UI", _pad(IMPLEMENTATION_UID)),
    ])
    return b"\x00" * 128 + b"DICM" + _el(2, 0, b"UL", struct.pack("<L", len(body))) + body


def dataset_bytes(ds: Dataset, implicit: bool = False) -> bytes:
    """The data set (no File Meta) encoded little endian."""
    buf = DicomBytesIO()
    buf.is_little_endian = True
    buf.is_implicit_VR = implicit
    write_dataset(buf, ds)
    return buf.getvalue()


def top_level_elements(raw: bytes) -> list[tuple[int, int, bytes]]:
    """``(offset, tag, vr)`` of the top-level elements of an explicit VR LE data set."""
    out, pos = [], 0
    while pos + 8 <= len(raw):
        group, elem = struct.unpack_from("<HH", raw, pos)
        vr = raw[pos + 4:pos + 6]
        if vr in _LONG_VRS:
            length = struct.unpack_from("<L", raw, pos + 8)[0]
            head = 12
        else:
            length = struct.unpack_from("<H", raw, pos + 6)[0]
            head = 8
        out.append((pos, (group << 16) | elem, vr))
        if length == 0xFFFFFFFF:  # undefined length (encapsulated pixel data, SQ): stop here
            break
        pos += head + length
    return out


# ------------------------------------------------------------------------------ bases
def _ct_factory_bases(tmp: Path) -> list[Base]:
    from tests.ct_factory import make_ct_series
    ct = make_ct_series(tmp / "ctf", n_slices=4, rows=64, cols=64, pixel_spacing=5.0, seed=3)
    return [Base("ct_factory", pydicom.dcmread(p), True) for p in ct.paths]


def _cohort_bases() -> list[Base]:
    from training.phantoms import anatomy, ct, population, xray
    patient = population.sample_population(1, 7)[0]
    scene = anatomy.build_scene(patient)
    top = scene.vertebra("L1").centroid_mm[2] + 6.0
    dss = ct.render_ct(scene, "canon_ap_native", seed=7, z_range=(top, top - 12.0))
    out = []
    for d in dss[:3]:
        arr = d.pixel_array[::4, ::4].copy()            # 512 -> 128: keeps the inputs small
        d.Rows, d.Columns = arr.shape
        d.PixelSpacing = [float(v) * 4 for v in d.PixelSpacing]
        d.PixelData = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
        out.append(Base("cohort_ct", d, True))
    xr, _ = xray.render_hip_xray(scene, 7, pixel_mm=2.0, ray_mm=4.0, dy_mm=4.0)
    out.append(Base("radiograph", xr, True))
    return out


def _real_bases(shared: Path | None) -> list[Base]:
    folder = shared / "data" / "real-public" if shared else None
    if folder is None or not folder.is_dir():
        return []
    out = []
    for p in sorted(folder.glob("*.dcm")):
        if p.stat().st_size > 300_000:   # the 680 kB chest CR would dominate the run time
            continue
        out.append(Base(f"real:{p.name}", pydicom.dcmread(p), False, weight=0.35))
    return out


def load_bases(shared: Path | None) -> list[Base]:
    """Every base instance (the real-public files only when ``shared`` holds them)."""
    with tempfile.TemporaryDirectory() as tmp:
        bases = _ct_factory_bases(Path(tmp))
    return bases + _cohort_bases() + _real_bases(shared)


# ------------------------------------------------------------------------------ mutations
_BAD_UIDS = ["../../../../tmp/ESCAPE", "1.2.abc.4", "1..2.3", "1.2.3.", "01.2.3",
             "1.2." + "9" * 70, "1.2.3\\4.5.6", "2.25.-1", "1.2.3 4"]
#: Invalid by PS3.5 9.1 but accepted on purpose (see deploy/README.md): not "refused".
TOLERATED_UIDS = {"01.2.3"}
_BAD_RESCALE = ["NaN", "nan", "inf", "-inf", "Infinity", "1e999", "-1e400"]
_BAD_DATES = ["20261340", "19411322", "19410230", "abcdefgh", "1941-11-22", "0", "99999999",
              "19411122\\19500101", "1941112"]
_BAD_CHARSETS: list[Any] = [["", "ISO 2022 IR 87"], ["", "ISO 2022 IR 149"], "ISO_IR 999",
                            "UTF8", ["ISO 2022 IR 6", "ISO 2022 IR 87"], "GB18030",
                            ["ISO_IR 100", "", "ISO 2022 IR 13"], "ISO_IR 192"]
_WRONG_VRS = [b"CR", b"EI", b"XX", b"\x00\x00", b"UN", b"SQ", b"US", b"FD", b"OB", b"UT",
              b"DA", b"UI", b"AT"]


_BAD_NUMBERS: list[tuple[str, str, Any]] = [
    ("NumberOfFrames", "IS", "0"), ("NumberOfFrames", "IS", "-1"), ("NumberOfFrames", "IS", "abc"),
    ("NumberOfFrames", "IS", "1000000"), ("NumberOfFrames", "IS", "2"),
    ("BitsAllocated", "US", 0), ("BitsAllocated", "US", 7), ("BitsAllocated", "US", 33),
    ("BitsAllocated", "US", 8), ("BitsStored", "US", 40), ("HighBit", "US", 40),
    ("SamplesPerPixel", "US", 0), ("SamplesPerPixel", "US", 3), ("PixelRepresentation", "US", 5),
    ("PixelSpacing", "DS", ["0", "0"]), ("PixelSpacing", "DS", ["-1", "-1"]),
    ("PixelSpacing", "DS", ["nan", "nan"]), ("PixelSpacing", "DS", ["inf", "1"]),
    ("PixelSpacing", "DS", ["1"]), ("ImagePositionPatient", "DS", ["nan", "0", "0"]),
    ("ImagePositionPatient", "DS", ["0", "0", "inf"]), ("ImagePositionPatient", "DS", ["1", "2"]),
    ("ImageOrientationPatient", "DS", ["0"] * 6),
    ("ImageOrientationPatient", "DS", ["nan", "0", "0", "0", "1", "0"]),
    ("SliceThickness", "DS", "nan"), ("SliceThickness", "DS", "-5"),
    ("ImagerPixelSpacing", "DS", ["0", "0"]), ("KVP", "DS", "inf"),
]


class _Gen:
    def __init__(self, bases: list[Base], seed: int, series_per_source: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.bases = bases
        self.native = [b for b in bases if b.native]
        self.study: dict[tuple[str, int], str] = {}
        self.series_per_source = series_per_source
        self.goods: list[FuzzInput] = []

    def uid(self) -> str:
        return "2.25." + str(int.from_bytes(self.rng.bytes(15), "big"))

    def pick(self, pool: list[Base]) -> Base:
        w = np.array([b.weight for b in pool], float)
        return pool[int(self.rng.choice(len(pool), p=w / w.sum()))]

    def fresh(self, base: Base) -> Dataset:
        """A copy of ``base`` with a fresh SOP UID in one of its source's series."""
        ds = copy.deepcopy(base.ds)
        k = (base.source, int(self.rng.integers(self.series_per_source)))
        if k not in self.study:
            self.study[k] = self.uid() + "|" + self.uid()
        study, series = self.study[k].split("|")
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, self.uid()
        ds.SOPClassUID = base.ds.file_meta.MediaStorageSOPClassUID
        return ds

    def make(self, i: int, kind: str, base: Base, ds: Dataset, raw: bytes | None = None,
             ts: str | None = None, detail: str = "", expect: str = "any",
             file_bytes: bytes | None = None, scp: bool = True,
             sop_uid: str | None = None) -> FuzzInput:
        ts = ts if ts is not None else str(base.ds.file_meta.TransferSyntaxUID)
        cls = str(base.ds.file_meta.MediaStorageSOPClassUID)
        sop = sop_uid if sop_uid is not None else str(ds.get("SOPInstanceUID", ""))
        raw = raw if raw is not None else dataset_bytes(ds)
        meta = file_meta_bytes(cls, sop, ts)
        fb = file_bytes if file_bytes is not None else meta + raw
        return FuzzInput(index=i, kind=kind, source=base.source, detail=detail, file_bytes=fb,
                         scp_bytes=(meta + raw) if scp else None, sop_class=cls, sop_uid=sop,
                         series_uid=str(ds.get("SeriesInstanceUID", "")), transfer_syntax=ts,
                         expect=expect)

    # one function per kind ---------------------------------------------------------------
    def good(self, i: int) -> FuzzInput:
        base = self.pick(self.bases)
        inp = self.make(i, "good", base, self.fresh(base), expect="stored")
        if base.native:
            self.goods.append(inp)
        return inp

    def byte_flip(self, i: int) -> FuzzInput:
        base = self.pick(self.bases)
        ds = self.fresh(base)
        raw = bytearray(dataset_bytes(ds))
        header_end = raw.find(_PIXEL_TAG) if _PIXEL_TAG in raw else len(raw)
        n = int(self.rng.integers(1, 9))
        where = []
        for _ in range(n):
            hi = header_end if self.rng.random() < 0.75 else len(raw)
            pos = int(self.rng.integers(0, max(1, hi)))
            raw[pos] ^= int(self.rng.integers(1, 256))
            where.append(pos)
        return self.make(i, "byte_flip", base, ds, bytes(raw), detail=f"offsets {where}")

    def truncation(self, i: int) -> FuzzInput:
        base = self.pick(self.bases)
        ds = self.fresh(base)
        raw = dataset_bytes(ds)
        cut = int(self.rng.integers(0, len(raw)))
        return self.make(i, "truncation", base, ds, raw[:cut], detail=f"{cut} of {len(raw)}")

    def wrong_vr(self, i: int) -> FuzzInput:
        base = self.pick(self.bases)
        ds = self.fresh(base)
        raw = bytearray(dataset_bytes(ds))
        elems = [e for e in top_level_elements(bytes(raw)) if e[1] != 0x7FE00010]
        off, tag, vr = elems[int(self.rng.integers(len(elems)))]
        new = vr
        while new == vr:
            new = _WRONG_VRS[int(self.rng.integers(len(_WRONG_VRS)))]
        raw[off + 4:off + 6] = new
        return self.make(i, "wrong_vr", base, ds, bytes(raw),
                         detail=f"({tag >> 16:04X},{tag & 0xFFFF:04X}) {vr!r} -> {new!r}")

    def huge_dims(self, i: int) -> FuzzInput:
        base = self.pick(self.bases)
        ds = self.fresh(base)
        which = ["Rows", "Columns", "both"][int(self.rng.integers(3))]
        if which in ("Rows", "both"):
            ds.Rows = 65535
        if which in ("Columns", "both"):
            ds.Columns = 65535
        return self.make(i, "huge_dims", base, ds, detail=f"{which} 65535, short data",
                         expect="refused")

    def long_pixel(self, i: int) -> FuzzInput:
        base = self.pick(self.native)
        ds = self.fresh(base)
        extra = 2 * int(self.rng.integers(1, 2048))
        ds.PixelData = bytes(ds.PixelData) + self.rng.bytes(extra)
        return self.make(i, "long_pixel", base, ds, detail=f"{extra} bytes too many",
                         expect="refused")

    def bad_transfer_syntax(self, i: int) -> FuzzInput:
        base = self.pick(self.native)
        ds = self.fresh(base)
        choice = int(self.rng.integers(6))
        raw = dataset_bytes(ds)
        ts, detail, scp = {
            0: ("1.2.3.4.5.6.7", "unknown transfer syntax UID", True),
            1: ("1.2.840.10008.1.2.2", "explicit big endian declared, little endian data", True),
            2: (JPEGBaseline8Bit, "JPEG baseline declared, native pixel data", True),
            3: (DeflatedExplicitVRLittleEndian, "deflate declared, data not deflated", True),
            4: (ImplicitVRLittleEndian, "implicit VR declared, explicit VR data", True),
            5: ("", "empty transfer syntax UID", False),
        }[choice]
        if choice == 2 and self.rng.random() < 0.5:
            ts, detail = RLELossless, "RLE declared, native pixel data"
        if choice == 3 and self.rng.random() < 0.5:
            ts, detail = JPEG2000Lossless, "JPEG 2000 declared, native pixel data"
        return self.make(i, "bad_transfer_syntax", base, ds, raw, ts=ts, detail=detail, scp=scp)

    def bad_uid(self, i: int) -> FuzzInput:
        base = self.pick(self.bases)
        ds = self.fresh(base)
        which = ["SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"][
            int(self.rng.integers(3))]
        value = _BAD_UIDS[int(self.rng.integers(len(_BAD_UIDS)))]
        setattr(ds, which, value)
        # a leading zero in a component is tolerated by policy (old modalities write them;
        # deploy/README.md): any status, stored or not
        expect = "any" if value in TOLERATED_UIDS else "refused"
        return self.make(i, "bad_uid", base, ds, detail=f"{which} {value!r}", expect=expect)

    def nan_rescale(self, i: int) -> FuzzInput:
        base = self.pick(self.native)
        ds = self.fresh(base)
        which = ["RescaleSlope", "RescaleIntercept"][int(self.rng.integers(2))]
        value = _BAD_RESCALE[int(self.rng.integers(len(_BAD_RESCALE)))]
        if "RescaleSlope" not in ds:
            ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = "1", "0", "US"
        ds[which] = DataElement(ds.data_element(which).tag, "DS", value)
        return self.make(i, "nan_rescale", base, ds, detail=f"{which} {value}", expect="refused")

    def empty(self, i: int) -> FuzzInput:
        base = self.pick(self.bases)
        ds = self.fresh(base)
        return self.make(i, "empty", base, ds, b"", file_bytes=b"", expect="refused",
                         detail="zero bytes")

    def random_bytes(self, i: int) -> FuzzInput:
        base = self.pick(self.bases)
        ds = self.fresh(base)
        n = int(self.rng.integers(1, 6000))
        junk = self.rng.bytes(n)
        with_prefix = self.rng.random() < 0.35
        fb = (b"\x00" * 128 + b"DICM" + junk) if with_prefix else junk
        return self.make(i, "random_bytes", base, ds, junk, file_bytes=fb, expect="refused",
                         detail=f"{n} bytes{' after preamble + DICM' if with_prefix else ''}")

    def cut_preamble(self, i: int) -> FuzzInput:
        base = self.pick(self.bases)
        ds = self.fresh(base)
        raw = dataset_bytes(ds)
        k = int(self.rng.integers(0, 132))
        full = file_meta_bytes(str(base.ds.file_meta.MediaStorageSOPClassUID),
                               str(ds.SOPInstanceUID), str(base.ds.file_meta.TransferSyntaxUID)
                               ) + raw
        # the network has no preamble: the SCU sends the first k bytes of the data set
        return self.make(i, "cut_preamble", base, ds, raw[:min(k, 6)], file_bytes=full[:k],
                         expect="refused", detail=f"file cut at byte {k}")

    def duplicate_conflict(self, i: int) -> FuzzInput:
        recent = self.goods[-40:]
        if not recent:
            return self.good(i)
        orig = recent[int(self.rng.integers(len(recent)))]
        base = next(b for b in self.native if b.source == orig.source)
        with lenient_pydicom():
            ds = pydicom.dcmread(DicomBytesIO(orig.file_bytes))
        px = bytearray(ds.PixelData)
        for _ in range(max(1, len(px) // 64)):
            px[int(self.rng.integers(len(px)))] ^= 0x5A
        ds.PixelData = bytes(px)
        inp = self.make(i, "duplicate_conflict", base, ds, detail=f"same SOP UID as #{orig.index}",
                        expect="first_kept")
        inp.dup_of = orig.index
        return inp

    def bad_charset(self, i: int) -> FuzzInput:
        base = self.pick(self.bases)
        ds = self.fresh(base)
        cs = _BAD_CHARSETS[int(self.rng.integers(len(_BAD_CHARSETS)))]
        ds.SpecificCharacterSet = cs
        raw_name = [b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B",
                    b"M\xfcller^J\xf6rg", b"\xff\xfe\x80\x81", b"Hong^Gildong=\x1b$)C\xc8\xab"
                    b"^\xb1\xe6\xb5\xbf"][int(self.rng.integers(4))]
        ds["PatientName"] = DataElement(0x00100010, "PN", raw_name)
        return self.make(i, "bad_charset", base, ds, detail=f"SpecificCharacterSet {cs!r}, "
                         f"PatientName {raw_name[:12]!r}")

    def bad_date(self, i: int) -> FuzzInput:
        base = self.pick(self.bases)
        ds = self.fresh(base)
        which = ["PatientBirthDate", "StudyDate", "PatientAge", "PatientSex",
                 "AcquisitionDateTime"][int(self.rng.integers(5))]
        if which == "PatientAge":
            value = ["999Y", "abc", "-01Y", "0", "120"][int(self.rng.integers(5))]
        elif which == "PatientSex":
            value = ["X", "Q", "female", "?"][int(self.rng.integers(4))]
        elif which == "AcquisitionDateTime":
            value = ["2026131", "20261301250000", "yesterday"][int(self.rng.integers(3))]
        else:
            value = _BAD_DATES[int(self.rng.integers(len(_BAD_DATES)))]
        setattr(ds, which, value)
        return self.make(i, "bad_date", base, ds, detail=f"{which} {value!r}")

    def bad_numbers(self, i: int) -> FuzzInput:
        base = self.pick(self.bases)
        ds = self.fresh(base)
        keyword, vr, value = _BAD_NUMBERS[int(self.rng.integers(len(_BAD_NUMBERS)))]
        tag = tag_for_keyword(keyword)
        if vr == "US":
            raw = struct.pack("<H", value)
            ds._dict[BaseTag(tag)] = RawDataElement(BaseTag(tag), vr, len(raw), raw, 0, False, True)
        else:
            set_raw_text(ds, keyword, value, vr)
        return self.make(i, "bad_numbers", base, ds, detail=f"{keyword} {value!r}")


def generate(n: int, seed: int, bases: list[Base], series_per_source: int = 2) -> list[FuzzInput]:
    """``n`` inputs drawn by kind weight (at least one of each kind when ``n >= 15``).

    Parameters
    ----------
    n : int
        How many inputs.
    seed : int
        Seeds kinds, bases, mutations and UIDs.
    bases : list of Base
        From :func:`load_bases`.
    series_per_source : int
        Fresh-UID copies of one base source are spread over this many series.
    """
    g = _Gen(bases, seed, series_per_source)
    names = list(KINDS)
    p = np.array([KINDS[k] for k in names], float)
    kinds = list(names) if n >= len(names) else []
    kinds += [names[int(j)] for j in g.rng.choice(len(names), n - len(kinds), p=p / p.sum())]
    order = g.rng.permutation(len(kinds))
    kinds = [kinds[int(j)] for j in order]
    out: list[FuzzInput] = []
    with lenient_pydicom():
        for i, kind in enumerate(kinds):
            fn: Callable[[int], FuzzInput] = getattr(g, kind)
            inp = fn(i)
            inp.name = f"{i:05d}_{inp.kind}.dcm"
            out.append(inp)
    return out


def write_inputs(inputs: list[FuzzInput], folder: Path) -> dict[str, FuzzInput]:
    """Write the replay files (``NNNNN_kind.dcm``) and the SCU files (``scp/NNNNN_kind.dcm``)
    under ``folder``; returns name -> input."""
    (folder / "replay").mkdir(parents=True, exist_ok=True)
    (folder / "scp").mkdir(parents=True, exist_ok=True)
    for inp in inputs:
        (folder / "replay" / inp.name).write_bytes(inp.file_bytes)
        if inp.scp_bytes is not None:
            (folder / "scp" / inp.name).write_bytes(inp.scp_bytes)
    return {inp.name: inp for inp in inputs}


def write_series_variants(folder: Path, seed: int, variants: list[tuple[str, str, Any]]
                          ) -> list[tuple[str, str, list[Path]]]:
    """Whole cohort CT series (T12-L2, full size) with one bad demographic on every slice.

    ``variants``: ``(kind, keyword, value)``, e.g. ``("bad_date", "PatientBirthDate",
    "19411322")``. Returns ``(kind, series_uid, paths)`` per variant.
    """
    from training.phantoms import anatomy, ct, population
    patient = population.sample_population(1, seed)[0]
    scene = anatomy.build_scene(patient)
    top = scene.vertebra("T12").centroid_mm[2] + 8.0
    bottom = scene.vertebra("L2").centroid_mm[2] - 8.0
    dss = ct.render_ct(scene, "canon_ap_native", seed=seed, z_range=(top, bottom))
    uid = _uid_source(seed)

    out = []
    with lenient_pydicom():
        for j, (kind, keyword, value) in enumerate(variants):
            study, series = uid(), uid()
            d = folder / f"series_{j:02d}_{kind}"
            d.mkdir(parents=True, exist_ok=True)
            paths = []
            for k, src in enumerate(dss):
                ds = copy.deepcopy(src)
                ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid()
                _set_raw(ds, keyword, value)
                p = d / f"{k:04d}.dcm"
                ds.save_as(p, enforce_file_format=True)
                paths.append(p)
            out.append((kind, series, paths))
    return out


def set_raw_text(ds: Dataset, keyword: str, value: str | list[str], vr: str | None = None) -> None:
    """Put ``value`` into ``ds`` as raw text (several values joined with ``\\``), so that pydicom
    never converts (or refuses) it: ``"abc"`` in a DS, ``"0.2\\"``, ``"nan"``."""
    from pydicom.datadict import dictionary_VR
    tag = BaseTag(tag_for_keyword(keyword))
    raw = _pad("\\".join(value) if isinstance(value, list) else value, b" ")
    ds._dict[tag] = RawDataElement(tag, vr or dictionary_VR(tag), len(raw), raw, 0, False, True)


def cohort_radiograph(seed: int) -> Dataset:
    """A small AP pelvis radiograph (DX, 2 mm detector pixels) of cohort patient ``seed``."""
    from training.phantoms import anatomy, population, xray
    scene = anatomy.build_scene(population.sample_population(1, seed)[0])
    return xray.render_hip_xray(scene, seed, pixel_mm=2.0, ray_mm=4.0, dy_mm=4.0)[0]


def with_bits_stored(ds: Dataset, bits: int) -> None:
    """Requantise a greyscale image to ``bits`` stored bits (8: 8 bits allocated), window scaled alike."""
    top = 2 ** int(ds.BitsStored) - 1
    scale = (2 ** bits - 1) / top
    arr = np.round(ds.pixel_array.astype(np.float64) * scale)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = (8 if bits <= 8 else 16), bits, bits - 1, 0
    ds.PixelData = arr.astype(np.uint8 if bits <= 8 else "<u2").tobytes()
    if "WindowCenter" in ds and "WindowWidth" in ds:
        ds.WindowCenter = f"{float(ds.WindowCenter) * scale:.1f}"
        ds.WindowWidth = f"{max(2.0, float(ds.WindowWidth) * scale):.1f}"


def as_monochrome1(ds: Dataset) -> None:
    """The same picture stored as MONOCHROME1: values mirrored in the stored range, the LINEAR
    window mirrored with them (centre ``c`` -> ``2^bits - c``), PresentationLUTShape INVERSE."""
    bits = int(ds.BitsStored)
    arr = (2 ** bits - 1) - ds.pixel_array.astype(np.int64)
    ds.PixelData = arr.astype(np.uint8 if int(ds.BitsAllocated) == 8 else "<u2").tobytes()
    ds.PhotometricInterpretation, ds.PresentationLUTShape = "MONOCHROME1", "INVERSE"
    if "WindowCenter" in ds:
        ds.WindowCenter = f"{2 ** bits - float(ds.WindowCenter):.1f}"


def as_rgb(ds: Dataset) -> None:
    """The picture as an 8-bit RGB image (a screenshot): SamplesPerPixel 3, no VOI."""
    grey = np.round(ds.pixel_array.astype(np.float64) / (2 ** int(ds.BitsStored) - 1) * 255).astype(np.uint8)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    for kw in ("WindowCenter", "WindowWidth", "PresentationLUTShape", "VOILUTFunction"):
        if kw in ds:
            del ds[kw]
    ds.PixelData = np.repeat(grey[..., None], 3, axis=2).tobytes()


def _set_raw(ds: Dataset, keyword: str, value: Any) -> None:
    """Set one (bad) demographic value as given; a name goes in as raw PN text."""
    if keyword == "PatientName":
        ds["PatientName"] = DataElement(0x00100010, "PN", value)
    else:
        setattr(ds, keyword, value)


def _uid_source(seed: int) -> Callable[[], str]:
    """A function returning fresh deterministic ``2.25.`` UIDs from ``seed``."""
    rng = np.random.default_rng(seed)

    def uid() -> str:
        return "2.25." + str(int.from_bytes(rng.bytes(15), "big"))
    return uid


def write_radiograph_variants(folder: Path, seed: int, variants: list[tuple[str, str, Any]]
                              ) -> list[tuple[str, str, list[Path]]]:
    """One AP pelvis radiograph (DX) per variant with one bad demographic: through the
    ``hip_xray`` model protocol a radiograph yields a finding, so its report is written."""
    src = cohort_radiograph(seed)
    uid = _uid_source(seed)

    out = []
    with lenient_pydicom():
        for j, (kind, keyword, value) in enumerate(variants):
            ds = copy.deepcopy(src)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = uid(), uid()
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid()
            _set_raw(ds, keyword, value)
            d = folder / f"radiograph_{j:02d}_{kind}"
            d.mkdir(parents=True, exist_ok=True)
            p = d / "0001.dcm"
            ds.save_as(p, enforce_file_format=True)
            out.append((kind, str(ds.SeriesInstanceUID), [p]))
    return out
