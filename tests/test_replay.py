"""``screener replay`` / ``results`` / ``status``: the backfill path through the real pipeline."""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from screener.config import load_config
from screener.db import Database
from screener.replay import replay
from screener.results import finding_records, to_csv
from tests.conftest import ROOT
from tests.daemon_helpers import fresh_uid_copy
from training.phantoms import anatomy, ct, population

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"


@pytest.fixture(scope="module")
def phantom_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One synthetic patient, 5 mm abdomen CT from T11 to L3, and its truth."""
    patient = population.sample_population(1, 5)[0]
    scene = anatomy.build_scene(patient)
    top = scene.vertebra("T11").centroid_mm[2] + 10.0
    bottom = scene.vertebra("L3").centroid_mm[2] - 10.0
    dss = ct.render_ct(scene, "canon_ap_native", seed=5, z_range=(top, bottom))
    folder = tmp_path_factory.mktemp("phantom") / "patient" / "ct"
    ct.write_series(dss, folder)
    l1 = scene.vertebra("L1")
    return folder.parent, {"z_range": l1.z_range_mm, "centroid": l1.centroid_mm}


def _cli(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, SCREENER_PROTOCOLS="l1_attenuation")  # model protocols: own tests
    return subprocess.run([sys.executable, "-m", "screener", *args, "--data-dir", str(data_dir)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def test_replay_processes_phantom_then_skips_then_force_supersedes(
        phantom_study: tuple[Path, dict], tmp_path: Path) -> None:
    study, truth = phantom_study
    data = tmp_path / "data"
    run = _cli("replay", str(study), "--no-progress", data_dir=data)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 series: 1 done; 0 unusable files" in run.stdout
    outbox = sorted((data / "outbox").rglob("*.dcm"))
    classes = sorted(str(pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID) for f in outbox)
    # two SEGs (the ROI; the L1 body outline), one SC overlay, one SR
    assert classes == ["1.2.840.10008.5.1.4.1.1.66.4"] * 2 + ["1.2.840.10008.5.1.4.1.1.7", SR_CLASS]

    # results: the ROI centre lies inside the true L1 body, extent overlaps the true L1
    res = _cli("results", "--format", "json", data_dir=data)
    study_rec, *recs = json.loads(res.stdout)
    # the study-level result comes first (issue 16), then the finding
    assert study_rec["protocol"] == "study result" and study_rec["methods"] == ["l1_attenuation"]
    # one L1 attenuation: the study category is its Pickhardt category
    assert study_rec["category"] == recs[0]["category"]
    assert study_rec["flags"][0] == "one measurement" and "L1 attenuation measured on CT" in study_rec["flags"][1]
    assert len(recs) == 1 and recs[0]["protocol"] == "l1_attenuation" and recs[0]["site"] == "L1"
    z0, z1 = sorted(truth["z_range"])
    assert z0 - 2.0 <= recs[0]["roi_center_z_mm"] <= z1 + 2.0
    assert abs(recs[0]["roi_center_x_mm"] - truth["centroid"][0]) < 10.0
    names = {m["name"]: m for m in recs[0]["measurements"]}
    assert names["L1 attenuation mean"]["unit"] == "[hnsf'U]"

    # second run: nothing new, nothing processed twice
    again = _cli("replay", str(study), "--no-progress", data_dir=data)
    assert again.returncode == 0 and "already done" in again.stdout
    assert len(Database(data / "screener.db").jobs()) == 1

    # --force: a new SR that supersedes the first, never a contradicting duplicate
    forced = _cli("replay", str(study), "--no-progress", "--force", data_dir=data)
    assert forced.returncode == 0, forced.stdout + forced.stderr
    srs = [pydicom.dcmread(f) for f in (data / "outbox").rglob("*.dcm")
           if pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID == SR_CLASS]
    assert len(srs) == 2
    newer = max(srs, key=lambda d: int(d.InstanceNumber))
    older = min(srs, key=lambda d: int(d.InstanceNumber))
    refs = [i.ReferencedSOPInstanceUID for s in newer.PredecessorDocumentsSequence
            for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence]
    assert refs == [older.SOPInstanceUID]
    status = _cli("status", data_dir=data)
    assert "done 2" in status.stdout and "sent 8" in status.stdout  # SR, SC and 2 SEGs of each run


def test_replay_real_ct_unusable_then_declined_with_fresh_uids(real_ct_dir: Path,
                                                                tmp_path: Path) -> None:
    cfg = load_config(env={}, data_dir=tmp_path / "data")
    rows, found = replay(real_ct_dir, cfg, progress=False)
    assert rows == [] and len(found.unusable) == 20
    assert all("missing StudyInstanceUID, SeriesInstanceUID" in r for _, r in found.unusable)

    copy = tmp_path / "fresh"
    fresh_uid_copy(real_ct_dir, copy)
    rows, found = replay(copy, cfg, progress=False)
    assert found.unusable == [] and len(rows) == 1
    assert rows[0]["status"] == "skipped" and "L1 not in view" in str(rows[0]["reason"])
    assert finding_records(Database(cfg.db_path)) == []


def test_replay_counts_non_dicom_and_csv_is_flat(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("not dicom")
    cfg = load_config(env={}, data_dir=tmp_path / "data")
    rows, found = replay(tmp_path / "in", cfg, progress=False)
    assert rows == [] and found.not_dicom == 1
    rec = {"study_uid": "1", "series_uid": "2", "job_id": 3, "protocol": "p",
           "protocol_version": "0", "site": "L1", "category": "c", "flags": ["a", "b"],
           "z_min_mm": -1.0, "z_max_mm": 1.0, "roi_center_x_mm": 0.5, "roi_center_y_mm": 0.0,
           "roi_center_z_mm": 0.0,
           "measurements": [{"name": "HU", "value": 101.5, "unit": "[hnsf'U]"}]}
    row = next(csv.DictReader(io.StringIO(to_csv([rec]))))
    assert row["HU"] == "101.5" and row["HU unit"] == "[hnsf'U]" and row["flags"] == "a; b"
