"""Fuzzed radiograph headers (issue 15 item 5): every variant ends as a valid SR + SC or a recorded decline.

Variants are derived from a cohort AP pelvis radiograph (:func:`tests.fuzz_inputs.cohort_radiograph`)
and the files of ``../shared/data/real-public/`` (the two CRs also relabelled as a pelvis, so that
the hip reader sees their headers), one header mutation each (:data:`MUTATIONS`: attributes
missing, empty or odd -- ``"0.2\\\\"``, ``"abc"``, negative, NaN spacing, a bad magnification factor,
orientation, view, laterality, window, VOI LUT sequence, MONOCHROME1, BitsStored 8/10/16, RGB, an
SC / OT class, a patient under 20), each written in one transfer syntax (:data:`SYNTAXES`:
explicit / implicit little endian, deflated, RLE, JPEG-LS lossless, JPEG 2000 lossless, JPEG
baseline on an 8-bit copy; the real files keep theirs).  ``screener replay`` (in process, every
protocol) processes them all.  Asserted for each variant's series:

- its job is ``done`` with an SR and an SC among its results, or ``skipped`` with a reason and no
  findings or results, or the file is listed unusable with the validation's reason (e.g. a
  non-numeric RescaleSlope) -- never ``failed``, never a protocol ``error:`` decision, no
  "Traceback";
- the SR and SC of every 10th ``done`` variant, and of the first ``done`` variant of each mutation,
  pass ``dciodvfy`` without errors.

``test_fuzz_headers_quick`` (normal suite): 30 fixed-seed variants, ~35 s on the shared 2-core
machine (~2.5 min while it trains).  ``test_fuzz_headers_full``: 220 variants (every mutation with
several syntaxes), only with ``pytest -m fuzz``, ~2 min (~8 min while it trains); last run: 107 SR + SC written (52 checked
with dciodvfy), 113 recorded declines, 0 failures.
"""
from __future__ import annotations

import collections
import copy
import io
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (ComputedRadiographyImageStorage, DeflatedExplicitVRLittleEndian,
                         ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit,
                         JPEGLSLossless, RLELossless, SecondaryCaptureImageStorage)

from screener.config import Config
from screener.db import Database
from screener.replay import replay
from tests.conftest import SHARED, require_tool
from tests.fuzz_inputs import (_uid_source, as_monochrome1, as_rgb, cohort_radiograph, lenient_pydicom,
                               set_raw_text, with_bits_stored)

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]

Mutation = Callable[[Dataset], None]
SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, RLELossless,
            JPEGLSLossless, JPEG2000Lossless, JPEGBaseline8Bit]


def _drop(*keywords: str) -> Mutation:
    def f(ds: Dataset) -> None:
        for k in keywords:
            if k in ds:
                del ds[k]
    return f


def _raw(keyword: str, value: str) -> Mutation:
    return lambda ds: set_raw_text(ds, keyword, value)


def _set(**values: Any) -> Mutation:
    def f(ds: Dataset) -> None:
        for k, v in values.items():
            setattr(ds, k, v)
    return f


def _then(*steps: Mutation) -> Mutation:
    def f(ds: Dataset) -> None:
        for step in steps:
            step(ds)
    return f


def _voi_lut_sequence(ds: Dataset) -> None:
    """A linear VOI LUT over the stored range (instead of the window)."""
    bits = int(ds.BitsStored)
    item = Dataset()
    item.LUTDescriptor = [2 ** bits if bits < 16 else 0, 0, 16]
    item["LUTData"] = DataElement(0x00283006, "US", list(np.linspace(0, 65535, 2 ** bits).astype(int)))
    ds.VOILUTSequence = [item]
    _drop("WindowCenter", "WindowWidth")(ds)


def _secondary_capture(modality: str, **extra: Any) -> Mutation:
    def f(ds: Dataset) -> None:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        ds.Modality, ds.ConversionType = modality, "WSD"
        for k, v in extra.items():
            setattr(ds, k, v)
    return f


def _cr_class(ds: Dataset) -> None:
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    ds.Modality = "CR"


def _born_15_years_before_the_study(ds: Dataset) -> None:
    study = str(ds.get("StudyDate", "") or "20250101")
    ds.PatientBirthDate = f"{int(study[:4]) - 15:04d}{study[4:6] or '01'}01"
    _drop("PatientAge")(ds)


NO_ORIENTATION = _drop("PatientOrientation")
#: (name, mutation, changes the pixels) -- applied to the cohort radiograph, and to the real files
#: when the pixels are left alone
MUTATIONS: list[tuple[str, Mutation, bool]] = [
    ("unchanged", lambda ds: None, False),
    ("ImagerPixelSpacing missing", _drop("ImagerPixelSpacing"), False),
    ("ImagerPixelSpacing empty", _raw("ImagerPixelSpacing", ""), False),
    ("ImagerPixelSpacing '0.2\\'", _raw("ImagerPixelSpacing", "0.2\\"), False),
    ("ImagerPixelSpacing 'abc'", _raw("ImagerPixelSpacing", "abc"), False),
    ("ImagerPixelSpacing negative", _raw("ImagerPixelSpacing", "-0.2\\-0.2"), False),
    ("PixelSpacing missing", _drop("PixelSpacing"), False),
    ("PixelSpacing 0", _raw("PixelSpacing", "0\\0"), False),
    ("PixelSpacing NaN", _raw("PixelSpacing", "nan\\nan"), False),
    ("PixelSpacing '0.2\\'", _raw("PixelSpacing", "0.2\\"), False),
    ("PixelSpacing 1e6, no ImagerPixelSpacing", _then(_drop("ImagerPixelSpacing"), _raw("PixelSpacing", "1e6\\1e6")),
     False),
    ("PixelSpacingCalibrationType missing", _drop("PixelSpacingCalibrationType"), False),
    ("PixelSpacingCalibrationType FIDUCIAL", _set(PixelSpacingCalibrationType="FIDUCIAL"), False),
    ("PixelSpacingCalibrationType odd", _raw("PixelSpacingCalibrationType", "XYZ"), False),
    ("magnification missing", _drop("EstimatedRadiographicMagnificationFactor"), False),
    ("magnification 0", _raw("EstimatedRadiographicMagnificationFactor", "0"), False),
    ("magnification 'abc'", _raw("EstimatedRadiographicMagnificationFactor", "abc"), False),
    ("only ImagerPixelSpacing and magnification", _drop("PixelSpacing", "PixelSpacingCalibrationType"), False),
    ("only ImagerPixelSpacing", _drop("PixelSpacing", "PixelSpacingCalibrationType",
                                      "EstimatedRadiographicMagnificationFactor"), False),
    ("only PixelSpacing, uncalibrated", _drop("ImagerPixelSpacing", "PixelSpacingCalibrationType",
                                              "EstimatedRadiographicMagnificationFactor"), False),
    ("no spacing at all", _drop("PixelSpacing", "ImagerPixelSpacing"), False),
    ("PatientOrientation missing", NO_ORIENTATION, False),
    ("PatientOrientation empty", _raw("PatientOrientation", ""), False),
    ("PatientOrientation 'L\\'", _raw("PatientOrientation", "L\\"), False),
    ("PatientOrientation R\\F (mirrored)", _set(PatientOrientation=["R", "F"]), False),
    ("PatientOrientation 'X\\Y'", _raw("PatientOrientation", "X\\Y"), False),
    ("PatientOrientation lateral A\\F", _set(PatientOrientation=["A", "F"]), False),
    ("ViewPosition missing", _drop("ViewPosition"), False),
    ("ViewPosition empty", _raw("ViewPosition", ""), False),
    ("ViewPosition PA", _set(ViewPosition="PA"), False),
    ("ViewPosition LL", _set(ViewPosition="LL"), False),
    ("ImageLaterality missing", _drop("ImageLaterality"), False),
    ("ImageLaterality empty", _raw("ImageLaterality", ""), False),
    ("ImageLaterality L, no orientation", _then(NO_ORIENTATION, _set(ImageLaterality="L")), False),
    ("Laterality R only", _then(_drop("ImageLaterality"), _set(Laterality="R")), False),
    ("FieldOfViewRotation 180, no orientation", _then(NO_ORIENTATION, _set(FieldOfViewRotation="180")), False),
    ("FieldOfViewRotation 'abc', no orientation", _then(NO_ORIENTATION, _raw("FieldOfViewRotation", "abc")), False),
    ("window missing", _drop("WindowCenter", "WindowWidth"), False),
    ("window empty", _then(_raw("WindowCenter", ""), _raw("WindowWidth", "")), False),
    ("window 'abc'", _then(_raw("WindowCenter", "abc"), _raw("WindowWidth", "abc")), False),
    ("window width 0", _raw("WindowWidth", "0"), False),
    ("window multi-valued", _then(_raw("WindowCenter", "2000\\1500"), _raw("WindowWidth", "3000\\800")), False),
    ("VOILUTFunction SIGMOID", _set(VOILUTFunction="SIGMOID"), False),
    ("VOILUTFunction odd", _raw("VOILUTFunction", "BOGUS"), False),
    ("RescaleSlope 'abc'", _raw("RescaleSlope", "abc"), False),
    ("PresentationLUTShape INVERSE on MONOCHROME2", _set(PresentationLUTShape="INVERSE"), False),
    ("PhotometricInterpretation missing", _drop("PhotometricInterpretation"), False),
    ("PatientAge 015Y", _set(PatientAge="015Y"), False),
    ("born 15 years before the study", _born_15_years_before_the_study, False),
    ("PatientAge 'abc'", _raw("PatientAge", "abc"), False),
    ("BodyPartExamined and descriptions missing",
     _drop("BodyPartExamined", "SeriesDescription", "StudyDescription", "ProtocolName"), False),
    ("CR class", _cr_class, False),
    ("secondary capture OT", _secondary_capture("OT"), False),
    ("OT DXA spine export", _secondary_capture("OT", SeriesDescription="DXA lumbar spine", BodyPartExamined="LSPINE"),
     False),
    ("VOI LUT sequence", _voi_lut_sequence, True),
    ("MONOCHROME1", as_monochrome1, True),
    ("BitsStored 8", lambda ds: with_bits_stored(ds, 8), True),
    ("BitsStored 10", lambda ds: with_bits_stored(ds, 10), True),
    ("BitsStored 16", lambda ds: with_bits_stored(ds, 16), True),
    ("BitsStored 10 MONOCHROME1", _then(lambda ds: with_bits_stored(ds, 10), as_monochrome1), True),
    ("RGB", as_rgb, True),
]


@dataclass
class Variant:
    """One generated file (a series of its own)."""

    index: int
    source: str
    mutation: str
    syntax: str
    path: Path
    series_uid: str

    @property
    def tag(self) -> str:
        return f"#{self.index} {self.source} / {self.mutation} / {self.syntax}"


def _jpeg_baseline(ds: Dataset) -> None:
    """Encode an 8-bit greyscale image as baseline JPEG (quality 90) with Pillow."""
    from PIL import Image

    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise ValueError("baseline JPEG is written for greyscale only here")
    if int(ds.BitsAllocated) != 8:
        with_bits_stored(ds, 8)
    buf = io.BytesIO()
    Image.fromarray(ds.pixel_array.astype(np.uint8), mode="L").save(buf, format="JPEG", quality=90)
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.LossyImageCompression, ds.LossyImageCompressionMethod = "01", "ISO_10918_1"


def _encode(ds: Dataset, syntax: str) -> str:
    """Write ``ds``'s pixels in ``syntax``; returns the syntax used (explicit LE when it cannot)."""
    try:
        if syntax == JPEGBaseline8Bit:
            _jpeg_baseline(ds)
        elif syntax in (RLELossless, JPEGLSLossless, JPEG2000Lossless):
            ds.compress(syntax)
        else:
            ds.file_meta.TransferSyntaxUID = syntax
        return str(syntax)
    except Exception:  # noqa: BLE001 - e.g. lossless J2K of RGB: the native encoding instead
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        return f"{ExplicitVRLittleEndian} (fallback)"


def _bases() -> list[tuple[str, Dataset, float]]:
    """(source, dataset, weight): the cohort radiograph, and the real-public files (CRs also as a pelvis)."""
    out: list[tuple[str, Dataset, float]] = [("cohort", cohort_radiograph(11), 6.0)]
    for p in sorted((SHARED / "data" / "real-public").glob("*.dcm")):
        ds = pydicom.dcmread(p)
        out.append((f"real:{p.name}", ds, 0.5))
        if ds.Modality == "CR":
            pelvis = copy.deepcopy(ds)
            pelvis.BodyPartExamined = "PELVIS"
            out.append((f"real:{p.name} as PELVIS", pelvis, 0.75))
    return out


def generate(n: int, seed: int, folder: Path) -> list[Variant]:
    """``n`` variants (mutation ``i`` cycles through :data:`MUTATIONS`), written under ``folder``."""
    rng = np.random.default_rng(seed)
    uid = _uid_source(seed)
    bases = _bases()
    weights = np.array([w for _, _, w in bases])
    cohort = bases[0]
    order = rng.permutation(len(MUTATIONS))
    out = []
    with lenient_pydicom():
        for i in range(n):
            name, mutate, pixels = MUTATIONS[int(order[i % len(MUTATIONS)])]
            source, base, _ = cohort if pixels else bases[int(rng.choice(len(bases), p=weights / weights.sum()))]
            ds = copy.deepcopy(base)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = uid(), uid()
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid()
            mutate(ds)
            if source == "cohort":
                syntax = _encode(ds, SYNTAXES[int(rng.integers(len(SYNTAXES)))])
            else:
                syntax = str(ds.file_meta.TransferSyntaxUID)
            d = folder / f"{i:04d}"
            d.mkdir(parents=True)
            ds.save_as(d / "0001.dcm", enforce_file_format=True)
            out.append(Variant(i, source, name, pydicom.uid.UID(syntax.split()[0]).name +
                               (" (fallback)" if "fallback" in syntax else ""), d / "0001.dcm",
                               str(ds.SeriesInstanceUID)))
    return out


@dataclass
class Tally:
    """What became of the variants."""

    done: int = 0
    declines: collections.Counter[str] = field(default_factory=collections.Counter)
    failures: list[str] = field(default_factory=list)
    checked: int = 0

    def report(self, variants: list[Variant]) -> str:
        lines = [f"{len(variants)} variants: {self.done} SR + SC written ({self.checked} checked with "
                 f"dciodvfy), {sum(self.declines.values())} declined, {len(self.failures)} failures",
                 "syntaxes: " + str(dict(collections.Counter(v.syntax for v in variants)))]
        lines += [f"  {n:>4}  {r}" for r, n in self.declines.most_common()]
        return "\n".join(lines + self.failures[:30])


def _deciding_reason(db: Database, job: dict[str, Any]) -> str:
    """The radiograph protocols' decisions (hip_xray, dxa_spine), else the job's reason."""
    rows = [d for d in db.iter_table("decisions") if d["job_id"] == job["id"]
            and d["protocol"] in ("hip_xray", "dxa_spine") and "modality" not in d["reason"]]
    text = "; ".join(f"{d['protocol']}: {d['reason']}" for d in rows) or str(job["reason"])
    return text[:110]


def check(variants: list[Variant], data: Path, unusable: dict[Path, str], dciodvfy_every: int = 10) -> Tally:
    """Judge every variant's job (see the module docstring); a file the validation refused
    (``unusable``: path -> reason, listed by replay) is a recorded decline too."""
    tally = Tally()
    db = Database(data / "screener.db")
    jobs = {j["series_uid"]: j for j in db.jobs()}
    decisions = collections.defaultdict(list)
    for d in db.iter_table("decisions"):
        decisions[d["job_id"]].append(d)
    results = collections.defaultdict(list)
    for r in db.iter_table("results"):
        results[r["job_id"]].append(r)
    dciodvfy = require_tool("dciodvfy")
    checked_mutations: set[str] = set()
    for v in variants:
        job = jobs.get(v.series_uid)
        if job is None and unusable.get(v.path, "").strip():
            tally.declines[f"file refused: {unusable[v.path]}"[:110]] += 1
            continue
        if job is None:
            tally.failures.append(f"{v.tag}: no job (not recorded by replay)")
            continue
        errors = [d["reason"] for d in decisions[job["id"]] if d["reason"].startswith(("error:", "accepts() failed"))]
        if job["status"] == "failed" or errors:
            tally.failures.append(f"{v.tag}: job {job['status']}: {job['error'] or job['reason']} {errors}")
            continue
        found = db.findings(series_uid=v.series_uid, latest_only=False)
        if job["status"] == "skipped":
            if not str(job["reason"]).strip() or found or results[job["id"]]:
                tally.failures.append(f"{v.tag}: skipped without a reason or with findings / results")
                continue
            tally.declines[_deciding_reason(db, job)] += 1
            continue
        kinds = sorted(r["kind"] for r in results[job["id"]])
        if job["status"] != "done" or "SR" not in kinds or "SC" not in kinds or not found:
            tally.failures.append(f"{v.tag}: job {job['status']} with results {kinds} and {len(found)} findings")
            continue
        tally.done += 1
        if (tally.done - 1) % dciodvfy_every == 0 or v.mutation not in checked_mutations:
            checked_mutations.add(v.mutation)
            tally.checked += 1
            for r in results[job["id"]]:
                out = subprocess.run([dciodvfy, r["path"]], capture_output=True, text=True, timeout=120)
                bad = [x for x in (out.stdout + out.stderr).splitlines() if x.startswith("Error")]
                if bad:
                    tally.failures.append(f"{v.tag}: {r['kind']} not valid: {bad[:3]}")
    db.close()
    return tally


def _run(tmp: Path, n: int, seed: int, capfd: pytest.CaptureFixture[str]) -> tuple[list[Variant], Tally]:
    variants = generate(n, seed, tmp / "in")
    _, scan = replay(tmp / "in", Config(data_dir=tmp / "data", device="cpu"), progress=False)
    tally = check(variants, tmp / "data", {Path(p): r for p, r in scan.unusable})
    out, err = capfd.readouterr()
    if "Traceback" in out + err:
        i = (out + err).index("Traceback")
        tally.failures.append(f"replay output holds a traceback: {(out + err)[i:i + 1500]}")
    print(tally.report(variants))
    return variants, tally


def test_fuzz_headers_quick(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """30 fixed-seed variants (30 of the mutations, mixed syntaxes and bases)."""
    variants, tally = _run(tmp_path, 30, 15, capfd)
    assert not tally.failures, tally.report(variants)
    assert tally.done >= 3 and sum(tally.declines.values()) >= 3, tally.report(variants)


@pytest.mark.fuzz
@pytest.mark.slow
def test_fuzz_headers_full(tmp_path: Path, capfd: pytest.CaptureFixture[str],
                           request: pytest.FixtureRequest) -> None:
    """220 variants: every mutation three or more times, every syntax; only with ``pytest -m fuzz``."""
    if "fuzz" not in (request.config.option.markexpr or ""):
        pytest.skip("the full header fuzz set runs with: pytest -m fuzz tests/test_fuzz_headers.py")
    variants, tally = _run(tmp_path, 220, 2026, capfd)
    assert len(variants) >= 200
    assert not tally.failures, tally.report(variants)
    assert {v.syntax for v in variants} >= {s.name for s in SYNTAXES}, tally.report(variants)
