"""Every real radiograph header (issue 15 items 3 and 4): spacing, photometric, orientation, age.

- the header readers of :mod:`screener.radiograph` (spacing from PixelSpacing with its
  calibration type, ImagerPixelSpacing and the magnification factor; orientation; greyscale) and
  the router's age gate, on small tables of real header values;
- a cohort radiograph without ImagerPixelSpacing and with an empty PatientOrientation writes an SR
  and an SC that dciodvfy accepts, and the stored source is not changed;
- a job whose SR cannot be written has no results; results and the SR carry the bundle's version;
- MONOCHROME1 gives the same BMD as the equivalent MONOCHROME2; RGB and a patient under 20 are
  declined with the reason;
- the four files of ``../shared/data/real-public/`` end as recorded declines with a plain reason,
  in ``screener replay`` and through the SCP.
"""
from __future__ import annotations

import copy
import datetime
import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from screener import radiograph as rg
from screener.config import Config
from screener.db import Database
from screener.replay import replay
from screener.results import finding_records
from screener.router import UNDER_AGE_REASON, patient_age_years
from tests.conftest import ROOT, SHARED, require_tool
from tests.fuzz_inputs import _uid_source, as_monochrome1, as_rgb, cohort_radiograph, lenient_pydicom, set_raw_text

REAL_PUBLIC = SHARED / "data" / "real-public"
#: what each real-public file is declined for (all protocols refuse; these words name why)
REAL_REASONS = {
    "chest-cr-monochrome1-j2k.dcm": "BodyPartExamined CHEST: a chest radiograph",
    "tibia-cr-monochrome1-j2k.dcm": "cannot tell the body part",
    "ct-chest-single-slice-j2k.dcm": "localizer/scout image",
    "ct-single-slice-jpegls.dcm": "series not quantitative: lossy compressed",
}
HIP_CARD = ROOT / "models" / "hip_xray" / "model_card.json"


@pytest.fixture(scope="module")
def radiograph() -> Dataset:
    """A cohort AP pelvis radiograph (DX, ImagerPixelSpacing 2 mm, magnification ~1.25)."""
    return cohort_radiograph(11)


def _write(src: Dataset, folder: Path, seed: int, **changes: Any) -> Path:
    """A copy of ``src`` as a one-file series with fresh UIDs; ``None`` removes an attribute."""
    uid = _uid_source(seed)
    ds = copy.deepcopy(src)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uid(), uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid()
    for key, value in changes.items():
        if value is None:
            if key in ds:
                del ds[key]
        else:
            setattr(ds, key, value)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "0001.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _config(tmp: Path) -> Config:
    return Config(data_dir=tmp / "data", device="cpu")


def _replay(folder: Path, tmp: Path) -> tuple[Database, dict[str, dict[str, Any]]]:
    """``screener replay`` in process; the database and the last job of each series."""
    cfg = _config(tmp)
    replay(folder, cfg, progress=False)
    db = Database(cfg.db_path)
    return db, {j["series_uid"]: j for j in db.jobs()}


def _dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True, text=True,
                         timeout=120)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def _content_items(ds: Dataset) -> list[Dataset]:
    out = []
    for item in ds.get("ContentSequence", []):
        out.append(item)
        out += _content_items(item)
    return out


def _concept(item: Dataset) -> str:
    seq = item.get("ConceptNameCodeSequence")
    return str(seq[0].CodeValue) if seq else ""


def _bmd(finding: Any) -> float:
    return next(float(m.value) for m in finding.measurements if m.name.endswith("BMD"))


# ------------------------------------------------------------------------ header readers
@pytest.mark.parametrize("header,spacing,source", [
    ({"PixelSpacing": [0.16, 0.16], "PixelSpacingCalibrationType": "GEOMETRY",
      "ImagerPixelSpacing": [0.2, 0.2], "EstimatedRadiographicMagnificationFactor": "1.25"},
     (0.16, 0.16), "PixelSpacing (calibrated: GEOMETRY)"),
    ({"ImagerPixelSpacing": [0.2, 0.2], "EstimatedRadiographicMagnificationFactor": "1.25"},
     (0.16, 0.16), "ImagerPixelSpacing / EstimatedRadiographicMagnificationFactor"),
    ({"PixelSpacing": [0.17, 0.17], "ImagerPixelSpacing": [0.2, 0.2]},
     (0.17, 0.17), "PixelSpacing (corrected, calibration type not stated)"),
    ({"PixelSpacing": [0.2, 0.2], "ImagerPixelSpacing": [0.2, 0.2]},
     (0.2, 0.2), "ImagerPixelSpacing (detector plane: no magnification factor)"),
    ({"PixelSpacing": [0.2, 0.2]}, (0.2, 0.2), "PixelSpacing (calibration not stated)"),
    # a broken magnification factor is not used; a broken PixelSpacing falls back to the imager's
    ({"ImagerPixelSpacing": [0.2, 0.2], "EstimatedRadiographicMagnificationFactor": "0"},
     (0.2, 0.2), "ImagerPixelSpacing (detector plane: no magnification factor)"),
    ({"PixelSpacing": "0.2\\", "PixelSpacingCalibrationType": "GEOMETRY", "ImagerPixelSpacing": [0.2, 0.2],
      "EstimatedRadiographicMagnificationFactor": "1.25"},
     (0.16, 0.16), "ImagerPixelSpacing / EstimatedRadiographicMagnificationFactor"),
])
def test_pixel_spacing_comes_from_the_attribute_the_standard_says(header: dict, spacing: tuple,
                                                                  source: str) -> None:
    got, src = rg.pixel_spacing_mm(header)
    assert got == pytest.approx(spacing) and src == source


@pytest.mark.parametrize("header,why", [
    ({}, "PixelSpacing absent; ImagerPixelSpacing absent"),
    ({"PixelSpacing": ["0", "0"]}, "PixelSpacing is not two positive finite numbers"),
    ({"PixelSpacing": "0.2\\"}, "PixelSpacing is not two numbers"),
    ({"ImagerPixelSpacing": "abc"}, "ImagerPixelSpacing is not two numbers"),
    ({"ImagerPixelSpacing": ["-0.2", "-0.2"]}, "ImagerPixelSpacing is not two positive finite numbers"),
    ({"PixelSpacing": ["nan", "inf"]}, "PixelSpacing is not two positive finite numbers"),
    ({"PixelSpacing": ["0.2"]}, "PixelSpacing has 1 value(s), not two"),
    ({"PixelSpacing": ["1e6", "1e6"]}, "PixelSpacing is outside 0.01-10 mm"),
])
def test_no_usable_spacing_is_a_decline_that_says_what_is_missing(header: dict, why: str) -> None:
    with pytest.raises(rg.RadiographError) as err:
        rg.pixel_spacing_mm(header)
    assert why in str(err.value) and "send the image with ImagerPixelSpacing or PixelSpacing" in str(err.value)


def test_detector_spacing_orientation_and_greyscale_readers() -> None:
    assert rg.detector_pixel_spacing_mm({"PixelSpacing": [0.16, 0.16], "PixelSpacingCalibrationType": "GEOMETRY",
                                         "EstimatedRadiographicMagnificationFactor": "1.25"}) == \
        pytest.approx((0.2, 0.2))
    assert rg.detector_pixel_spacing_mm({}) is None
    assert rg.patient_orientation({"PatientOrientation": ["L", "F"]}) == ("L", "F")
    assert rg.patient_orientation({"PatientOrientation": "R\\FL"}) == ("R", "FL")
    for bad in ("", [], ["", ""], "L\\", "L", ["X", "Y"], ["LRAP", "F"]):
        assert rg.patient_orientation({"PatientOrientation": bad}) is None
    # absent, empty, one-sided or FOV-free: the standard AP display is assumed, not refused
    assert rg.image_layout({"PatientOrientation": ""}).source == "assumed"
    assert rg.image_layout({"PatientOrientation": "L\\", "ImageLaterality": ""}).laterality is None
    assert rg.image_layout({"Laterality": "L"}).laterality == "L"
    with pytest.raises(rg.RadiographError, match="same axis"):
        rg.image_layout({"PatientOrientation": ["L", "R"]})
    assert "SamplesPerPixel 3, RGB" in rg.greyscale_problem({"SamplesPerPixel": 3,
                                                             "PhotometricInterpretation": "RGB"})
    assert rg.greyscale_problem({"SamplesPerPixel": 1, "PhotometricInterpretation": "MONOCHROME1"}) is None


@pytest.mark.parametrize("header,age", [
    ({"PatientAge": "015Y"}, 15.0), ({"PatientAge": "006M"}, 0.5), ({"PatientAge": "071Y"}, 71.0),
    ({"PatientAge": "000Y", "PatientBirthDate": "20100615", "StudyDate": "20250614"}, 14.0),
    ({"PatientBirthDate": "20100615", "StudyDate": "20250615"}, 15.0),
    ({"PatientAge": "000Y"}, None), ({"PatientAge": "abc"}, None),
    ({"PatientBirthDate": "19411322", "StudyDate": "20250615"}, None), ({}, None),
])
def test_patient_age_from_age_or_birth_and_study_date(header: dict, age: float | None) -> None:
    assert patient_age_years(header) == (pytest.approx(age) if age is not None else None)


# ---------------------------------------------------------------- reports of any header
def test_no_imager_spacing_and_empty_orientation_write_a_valid_sr_and_sc(radiograph: Dataset,
                                                                         tmp_path: Path) -> None:
    from screener.pipeline import process_series

    p = _write(radiograph, tmp_path / "in", 1, ImagerPixelSpacing=None, PatientOrientation="", ViewPosition=None)
    before = hashlib.sha256(p.read_bytes()).hexdigest()
    res = process_series([p], config=Config(device="cpu"), out_dir=tmp_path / "out")
    assert res.status == "done", res.reason
    assert sorted(o.kind for o in res.outputs) == ["SC", "SR"]
    assert hashlib.sha256(p.read_bytes()).hexdigest() == before  # the stored source is untouched
    for o in res.outputs:
        assert _dciodvfy_errors(o.path) == [], o.kind
    sr = pydicom.dcmread(next(o.path for o in res.outputs if o.kind == "SR"))
    items = _content_items(sr)
    # TID 1603: the spacing the header gives (PixelSpacing x magnification, the detector plane) is
    # stated; the orientation the header does not state is left out
    src = pydicom.dcmread(p)
    expected = float(src.PixelSpacing[1]) * float(src.EstimatedRadiographicMagnificationFactor)
    [horizontal] = [i for i in items if _concept(i) == "111026"]
    assert float(horizontal.MeasuredValueSequence[0].NumericValue) == pytest.approx(expected, rel=1e-5)
    assert not [i for i in items if _concept(i) in ("111044", "111043")]
    sc = pydicom.dcmread(next(o.path for o in res.outputs if o.kind == "SC"))
    assert sc.PatientOrientation == "" and sc.StudyInstanceUID == src.StudyInstanceUID


def _finding(ds: Dataset) -> Any:
    """A hip finding drawn on ``ds`` by hand (the writers' input, whatever the model does)."""
    from screener.findings import Finding, RoiGeometry
    from screener.scores import bmd_measurement

    roi = RoiGeometry(source_sop_instance_uid=str(ds.SOPInstanceUID), source_sop_class_uid=str(ds.SOPClassUID),
                      polygon=np.array([[60.0, 80.0], [90.0, 80.0], [90.0, 95.0], [60.0, 95.0], [60.0, 80.0]]),
                      centre_mm=(120.0, 140.0, 0.0), area_mm2=450.0, slice_index=0)
    return Finding(protocol="hip_xray", protocol_version="0.5.0", site="left femoral neck",
                   measurements=[bmd_measurement(0.81, site="femur", name="left femoral neck BMD")], roi=roi,
                   referenced_sop_instance_uids=[str(ds.SOPInstanceUID)],
                   overlay=np.full((64, 48, 3), 90, dtype=np.uint8),
                   details={"overlay_pixel_spacing_mm": [0.7, 0.7]})


@pytest.mark.parametrize("raw,removed,spacing_stated,orientation_stated", [
    ({}, ("ImagerPixelSpacing",), True, False),
    ({"PatientOrientation": "X\\Y", "PixelSpacing": "abc"}, (), True, False),
    ({"PatientOrientation": "L\\"}, ("ImagerPixelSpacing", "PixelSpacing", "ViewPosition", "ImageLaterality"),
     False, False),
    ({"PatientOrientation": "R\\F"}, ("EstimatedRadiographicMagnificationFactor",), True, True),
    ({"PatientOrientation": "L\\F", "Laterality": "X"}, ("BodyPartExamined", "ImageLaterality"), True, True),
])
def test_sr_and_sc_writers_take_any_radiograph_header(radiograph: Dataset, tmp_path: Path, raw: dict,
                                                       removed: tuple, spacing_stated: bool,
                                                       orientation_stated: bool) -> None:
    from screener.reporting.sc import build_sc, write_sc
    from screener.reporting.sr import build_sr, write_sr

    src = copy.deepcopy(radiograph)
    with lenient_pydicom():
        for keyword, value in raw.items():
            set_raw_text(src, keyword, value)
        p = _write(src, tmp_path / "in", 7, PatientOrientation=None if not raw else src.PatientOrientation,
                   **{k: None for k in removed})
    header = pydicom.dcmread(p, stop_before_pixels=True)
    before = copy.deepcopy(header)
    finding = _finding(header)
    paths = [write_sr(build_sr([finding], [header]), tmp_path / "out"),
             write_sc(build_sc(finding, header, series_uid=header.SeriesInstanceUID + ".9",
                               sop_instance_uid=header.SOPInstanceUID + ".9"), tmp_path / "out")]
    assert header == before  # the writers work on copies
    for path in paths:
        assert _dciodvfy_errors(path) == [], path
    items = _content_items(pydicom.dcmread(paths[0]))
    assert bool([i for i in items if _concept(i) in ("111026", "111066")]) == spacing_stated
    assert bool([i for i in items if _concept(i) in ("111044", "111043")]) == orientation_stated


# -------------------------------------------------------------------- results and versions
def test_a_failed_sr_write_leaves_no_results(radiograph: Dataset, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import screener.reporting.sr as sr

    def disk_full(*_: Any, **__: Any) -> Path:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sr, "write_sr", disk_full)
    p = _write(radiograph, tmp_path / "in", 2)
    db, jobs = _replay(p.parent, tmp_path)
    [job] = jobs.values()
    assert job["status"] == "failed" and "report writing failed: OSError" in job["error"]
    assert db.findings(latest_only=False) == [] and list(db.iter_table("results")) == []
    assert finding_records(db, all_versions=True) == []
    # the protocol itself ran and measured: the decision says so, only the report is missing
    assert any(d["protocol"] == "hip_xray" and d["accepted"] for d in db.iter_table("decisions"))


def test_a_pipeline_result_that_failed_with_findings_records_none() -> None:
    from types import SimpleNamespace

    from screener.worker import _reported_findings

    finding = SimpleNamespace(protocol="hip_xray", site="left femoral neck", category="normal",
                              to_record=lambda: {"protocol_version": "0.5.0"})
    sr = [{"kind": "SR"}, {"kind": "SC"}]
    assert _reported_findings([finding], "failed", sr) == []
    assert _reported_findings([finding], "done", [{"kind": "SC"}]) == []
    assert len(_reported_findings([finding], "done", sr)) == 1


def test_results_and_the_sr_carry_the_bundle_version(radiograph: Dataset, tmp_path: Path) -> None:
    version = json.loads(HIP_CARD.read_text())["version"]
    p = _write(radiograph, tmp_path / "in", 3)
    db, jobs = _replay(p.parent, tmp_path)
    [job] = jobs.values()
    assert job["status"] == "done", job["reason"]
    study, *records = finding_records(db)  # the study-level result comes first (issue 16)
    assert study["protocol"] == "study result" and study["methods"] == ["hip_xray"]
    assert len(records) >= 1 and {r["protocol_version"] for r in records} == {version}
    from screener.protocols.hip_xray.protocol import HipXrayProtocol
    assert version != HipXrayProtocol.version  # the bundle's, not the module's
    [sr_row] = [r for r in db.iter_table("results") if r["kind"] == "SR"]
    versions = {str(i.TextValue) for i in _content_items(pydicom.dcmread(sr_row["path"]))
                if _concept(i) == "111003"}  # Algorithm Version
    assert versions == {version}


# ------------------------------------------------------------------- photometric and age
def test_monochrome1_gives_the_same_bmd_as_monochrome2(radiograph: Dataset, tmp_path: Path) -> None:
    from screener.pipeline import process_series

    p2 = _write(radiograph, tmp_path / "m2", 4)
    m1 = copy.deepcopy(radiograph)
    as_monochrome1(m1)
    p1 = _write(m1, tmp_path / "m1", 5)
    r2 = process_series([p2], config=Config(device="cpu"), out_dir=tmp_path / "o2")
    r1 = process_series([p1], config=Config(device="cpu"), out_dir=tmp_path / "o1")
    assert r1.status == r2.status == "done", (r1.reason, r2.reason)
    assert [f.site for f in r1.findings] == [f.site for f in r2.findings]
    for a, b in zip(r1.findings, r2.findings):
        assert abs(_bmd(a) - _bmd(b)) <= 1e-3, (a.site, _bmd(a), _bmd(b))


@pytest.mark.parametrize("case", ["rgb", "age 015Y", "born 15 years before the study"])
def test_rgb_and_a_patient_under_20_are_declined_with_the_reason(radiograph: Dataset, tmp_path: Path,
                                                                  case: str) -> None:
    study = datetime.date(int(radiograph.StudyDate[:4]), int(radiograph.StudyDate[4:6]), 1)
    src = copy.deepcopy(radiograph)
    changes: dict[str, Any] = {}
    if case == "rgb":
        as_rgb(src)
    elif case == "age 015Y":
        changes = {"PatientAge": "015Y"}
    else:
        changes = {"PatientAge": None, "PatientBirthDate": f"{study.year - 15}{study:%m%d}"}
    p = _write(src, tmp_path / "in", 6, **changes)
    db, jobs = _replay(p.parent, tmp_path)
    [job] = jobs.values()
    assert job["status"] == "skipped"
    hip = next(d["reason"] for d in db.iter_table("decisions") if d["protocol"] == "hip_xray")
    if case == "rgb":
        assert "RGB image: not a greyscale radiograph" in hip
    else:
        assert hip == UNDER_AGE_REASON == "patient under 20: adult reference data do not apply"
        assert all(d["reason"] == UNDER_AGE_REASON for d in db.iter_table("decisions"))
    assert db.findings(latest_only=False) == [] and list(db.iter_table("results")) == []


# ----------------------------------------------------------------------- real-public files
def _real_files() -> list[Path]:
    files = sorted(REAL_PUBLIC.glob("*.dcm"))
    if {f.name for f in files} != set(REAL_REASONS):
        pytest.fail(f"expected the four real-public files {sorted(REAL_REASONS)} under {REAL_PUBLIC}")
    return files


def _check_real_declines(db: Database, jobs: dict[str, dict[str, Any]], files: list[Path]) -> None:
    for f in files:
        uid = str(pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID)
        job = jobs.get(uid)
        assert job is not None, f"{f.name}: no job"
        assert job["status"] == "skipped", (f.name, job["status"], job["error"])
        assert REAL_REASONS[f.name] in job["reason"], (f.name, job["reason"])
        assert db.findings(series_uid=uid, latest_only=False) == []
    assert list(db.iter_table("results")) == []


def test_real_public_files_end_as_recorded_declines_in_replay(tmp_path: Path) -> None:
    files = _real_files()
    folder = tmp_path / "real"
    folder.mkdir()
    for f in files:
        shutil.copy(f, folder / f.name)
    db, jobs = _replay(folder, tmp_path)
    _check_real_declines(db, jobs, files)


@pytest.mark.network
def test_real_public_files_end_as_recorded_declines_through_the_scp(tmp_path: Path) -> None:
    from tests.daemon_helpers import Daemon, pynet_send, wait_for

    files = _real_files()
    d = Daemon(tmp_path / "data", env={"SCREENER_QUIET_SECONDS": "1"}).start()
    try:
        assert [s for s, _ in pynet_send(d.port, files)] == [0, 0, 0, 0]
        db = d.db()
        wait_for(lambda: len([j for j in db.jobs() if j["status"] in ("done", "skipped", "failed")]) == 4,
                 120, 0.5, "the four jobs")
        _check_real_declines(db, {j["series_uid"]: j for j in db.jobs()}, files)
        db.close()
    finally:
        assert d.stop() == 0
    assert "Traceback" not in d.log()


def test_a_radiograph_whose_pixel_spacing_is_not_a_number_is_received_and_measured(radiograph: Dataset,
                                                                                 tmp_path: Path) -> None:
    # PixelSpacing NaN (or text) beside a good ImagerPixelSpacing: the ingest validation used to refuse
    # the image (0xC002) although the hip protocol has two other sources of the pixel size. For a
    # projection radiograph the spacing attributes are the protocol's to weigh; a CT's stay strict.
    from screener.pipeline import process_series
    from screener.validation import Rejected, validate_dataset

    for bad in ("nan\\nan", "abc\\0.2"):
        p = _write(radiograph, tmp_path / bad[:3], 2)
        ds = pydicom.dcmread(p)
        set_raw_text(ds, "PixelSpacing", bad)
        ds.save_as(p, enforce_file_format=True)
        ds = pydicom.dcmread(p)
        validate_dataset(ds, str(ds.file_meta.TransferSyntaxUID))  # no Rejected
        res = process_series([p], config=Config(device="cpu"), out_dir=tmp_path / f"out-{bad[:3]}")
        assert res.status == "done", res.reason
        assert {o.kind for o in res.outputs} == {"SR", "SC"}
        assert all(_dciodvfy_errors(o.path) == [] for o in res.outputs)
    ct = pydicom.dcmread(p)
    ct.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    set_raw_text(ct, "PixelSpacing", "nan\\nan")
    with pytest.raises(Rejected, match="PixelSpacing is not finite"):
        validate_dataset(ct, str(ct.file_meta.TransferSyntaxUID))
