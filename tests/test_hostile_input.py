"""Hostile input and a hostile network (issue 17): one test per numbered case.

Each test failed on the main of the day the issue was filed and passes now:
the validation layer shared by the SCP and replay, reports that tolerate odd
demographics and character sets, the secure-by-default access policy, private
file permissions and the full-disk behaviour.
"""
from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pydicom
import pytest
import structlog
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from structlog.testing import capture_logs

from screener.completion import CompletionMonitor
from screener.config import Config, ConfigError, load_config
from screener.db import Database
from screener.pipeline import PipelineResult
from screener.ingest import IMAGE_STORAGE_CLASSES, start_scp
from screener.replay import format_table, scan
from screener.storage import copy_atomic
from screener.worker import WorkerPool, run_job
from tests.conftest import ROOT, free_port
from tests.daemon_helpers import fake_process_series, make_ct_series, pynet_send, wait_for


# ----------------------------------------------------------------------------- helpers
# the in-process SCP: tests/conftest.py's ``scp`` fixture


def _edit(path: Path, **values: Any) -> Path:
    ds = pydicom.dcmread(path)
    for k, v in values.items():
        setattr(ds, k, v)
    ds.save_as(path)
    return path


def _replace_bytes(path: Path, old: bytes, new: bytes) -> Path:
    raw = path.read_bytes()
    assert raw.count(old) == 1, old
    path.write_bytes(raw.replace(old, new))
    return path


def _replay_cli(folder: Path, data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "screener", "replay", str(folder),
                           "--data-dir", str(data_dir), "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def _unusable(folder: Path) -> dict[str, str]:
    return {p.name: reason for p, reason in scan(folder).unusable}


# ---------------------------------------------------------------------- case 1
def test_case01_replay_lists_a_file_with_an_unknown_vr_and_processes_the_rest(
        tmp_path: Path) -> None:
    folder = tmp_path / "in"
    good, cr, ei = make_ct_series(folder, 3)
    # (0008,0005) with VR 'CR' in front of the data set; (0020,000D) with VR 'EI'
    raw = cr.read_bytes()
    meta_end = 132 + 12 + int.from_bytes(raw[140:144], "little")
    cr.write_bytes(raw[:meta_end] + b"\x08\x00\x05\x00CR\x0a\x00ISO_IR 100" + raw[meta_end:])
    _replace_bytes(ei, b"\x20\x00\x0d\x00UI", b"\x20\x00\x0d\x00EI")
    found = scan(folder)
    assert [s.files[0][0].name for s in found.series.values()] == [good.name]
    reasons = {p.name: r for p, r in found.unusable}
    assert set(reasons) == {cr.name, ei.name}
    assert "(0008,0005)" in reasons[cr.name] and "0xC000" in reasons[cr.name]
    assert "(0020,000D)" in reasons[ei.name]
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    for p in (cr, ei):
        (only_bad / p.name).write_bytes(p.read_bytes())
    r = _replay_cli(only_bad, tmp_path / "d")
    assert r.returncode == 1 and "Traceback" not in r.stderr + r.stdout, r.stderr
    assert f"unusable file {only_bad / cr.name}" in r.stdout


# ---------------------------------------------------------------------- case 2
def test_case02_replay_lists_empty_random_and_cut_files_and_exits_1(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    [ct] = make_ct_series(tmp_path / "ct", 1)
    (folder / "empty.dcm").write_bytes(b"")
    (folder / "random.dcm").write_bytes(os.urandom(5000))
    (folder / "cut_in_preamble.dcm").write_bytes(ct.read_bytes()[:60])
    (folder / "notes.txt").write_text("not DICOM, and not meant to be")
    r = _replay_cli(folder, tmp_path / "d")
    assert r.returncode == 1, r.stdout + r.stderr
    for name in ("empty.dcm", "random.dcm", "cut_in_preamble.dcm"):
        assert f"unusable file {folder / name}" in r.stdout, r.stdout
    assert "empty file (0 bytes)" in r.stdout
    assert "3 unusable files; 1 files not DICOM, skipped" in r.stdout
    assert "Traceback" not in r.stderr


# ---------------------------------------------------------------------- cases 3 and 11
def _report_run(tmp_path: Path, **header: Any) -> Any:
    from screener.pipeline import process_series
    from screener.protocols.l1_attenuation.protocol import L1AttenuationProtocol
    from tests.ct_factory import make_ct_series as make_phantom

    ct = make_phantom(tmp_path / "in", rows=160, cols=160, pixel_spacing=1.2, n_slices=30,
                      z_start=-36.0, seed=3)
    for p in ct.paths:
        ds = pydicom.dcmread(p)
        for k, v in header.items():
            setattr(ds, k, v)
        ds.save_as(p)
    return process_series(ct.paths, config=Config(), out_dir=tmp_path / "job-1",
                          protocols=[L1AttenuationProtocol(localizer=ct.fake_localizer())])


def _texts(ds: Dataset) -> list[str]:
    out = [str(ds.TextValue)] if "TextValue" in ds else []
    for item in ds.get("ContentSequence", []):
        out += _texts(item)
    return out


def test_case03_invalid_birth_date_age_and_sex_are_left_out_of_the_reports(
        tmp_path: Path) -> None:
    res = _report_run(tmp_path, PatientBirthDate="19411322", PatientAge="71 years",
                      PatientSex="female", StudyTime="25:61", ReferringPhysicianName="Dr\\Who")
    assert res.status == "done", res.reason
    assert [o.kind for o in res.outputs] == ["SR", "SC"]
    sr = pydicom.dcmread(res.outputs[0].path)
    assert sr.PatientBirthDate == "" and sr.PatientSex == "" and "PatientAge" not in sr
    text = " ".join(_texts(sr))
    assert "PatientBirthDate left out: not a valid date" in text
    assert "19411322" not in text and "ReferringPhysicianName had several values" in text
    assert sr.StudyTime == "" and sr.ReferringPhysicianName == "Dr"
    sc = pydicom.dcmread(res.outputs[1].path)
    assert sc.PatientBirthDate == "" and sc.PatientName == sr.PatientName != ""


@pytest.mark.parametrize("charset", [["", "ISO 2022 IR 87"], ["", "ISO 2022 IR 149"]])
def test_case11_empty_first_character_set_value_still_gives_sr_and_sc(
        tmp_path: Path, charset: list[str]) -> None:
    name = "Yamada^Tarou=山田^太郎" if charset[1].endswith("87") else "Hong^Gildong=洪^吉洞"
    res = _report_run(tmp_path, SpecificCharacterSet=charset, PatientName=name)
    assert res.status == "done", res.reason
    assert [o.kind for o in res.outputs] == ["SR", "SC"]
    for o in res.outputs:
        back = pydicom.dcmread(o.path)
        assert back.SpecificCharacterSet == "ISO_IR 192"
        assert str(back.PatientName) == name


# ---------------------------------------------------------------------- case 4
def test_case04_conflicting_duplicate_gets_a_warning_is_recorded_and_first_is_kept(
        tmp_path: Path, scp: tuple[Config, Database, Any]) -> None:
    cfg, db, _ = scp
    [f] = make_ct_series(tmp_path / "in", 1)
    assert pynet_send(cfg.port, [f]) == [(0, "")]
    [row] = list(db.iter_table("instances"))
    first = Path(row["path"]).read_bytes()
    other = tmp_path / "other.dcm"
    ds = pydicom.dcmread(f)
    ds.PixelData = bytes(len(ds.PixelData))  # same SOP Instance UID, different pixels
    ds.save_as(other)
    [(status, comment)] = pynet_send(cfg.port, [other])
    assert status == 0xB006 and comment.startswith("SOP Instance UID already stored with diff")
    assert Path(row["path"]).read_bytes() == first
    assert pynet_send(cfg.port, [f]) == [(0, "")]  # the identical one is still a duplicate
    [rej] = db.rejections()
    assert (rej["status"], rej["sop_instance_uid"]) == (0xB006, ds.SOPInstanceUID)
    assert db.counts()["instances"] == 1


# ---------------------------------------------------------------------- cases 5, 6, 10
def test_case05_pixel_data_longer_than_the_image_is_refused(
        tmp_path: Path, scp: tuple[Config, Database, Any]) -> None:
    cfg, db, _ = scp
    [f] = make_ct_series(tmp_path / "in", 1, rows=32, cols=32)
    _edit(f, PixelData=pydicom.dcmread(f).PixelData + b"\x00" * 64)
    assert pynet_send(cfg.port, [f]) == [
        (0xC001, "Pixel Data too long: 2112 bytes, image size says 2048")]
    assert f.name in _unusable(f.parent)
    assert db.counts()["instances"] == 0


@pytest.mark.parametrize("keyword,value", [("RescaleSlope", "NaN"), ("RescaleIntercept", "inf"),
                                           ("RescaleIntercept", "-inf")])
def test_case06_non_finite_rescale_is_refused_with_the_real_reason(
        tmp_path: Path, scp: tuple[Config, Database, Any], keyword: str, value: str) -> None:
    cfg, db, _ = scp
    [f] = make_ct_series(tmp_path / "in", 1)
    with warnings.catch_warnings():  # pydicom writes what it is given (and may say so)
        warnings.simplefilter("ignore")
        _edit(f, **{keyword: value})
    [(status, comment)] = pynet_send(cfg.port, [f])
    assert status == 0xC002 and comment.startswith(f"{keyword} is not finite"), comment
    assert f"{keyword} is not finite" in _unusable(f.parent)[f.name]
    assert db.counts()["instances"] == 0


def test_case10_invalid_series_uid_is_refused(tmp_path: Path,
                                              scp: tuple[Config, Database, Any]) -> None:
    cfg, db, _ = scp
    [f] = make_ct_series(tmp_path / "in", 1, series_uid="../../../../tmp/ESCAPE")
    [(status, comment)] = pynet_send(cfg.port, [f])
    assert status == 0xC002 and comment.startswith("SeriesInstanceUID is not a valid UID")
    assert "SeriesInstanceUID is not a valid UID" in _unusable(f.parent)[f.name]
    assert db.counts()["instances"] == 0
    assert not list(cfg.store_dir.rglob("*.dcm"))


# ---------------------------------------------------------------------- case 7
class _FullDisk:
    """Wraps a Database connection: every write fails like SQLite on a full disk."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.full = True

    def _check(self, sql: str) -> None:
        if self.full and sql.lstrip().split()[0].lower() in ("insert", "update", "delete"):
            raise sqlite3.OperationalError("database or disk is full")

    def execute(self, sql: str, *args: Any) -> Any:
        self._check(sql)
        return self._conn.execute(sql, *args)

    def executemany(self, sql: str, *args: Any) -> Any:
        self._check(sql)
        return self._conn.executemany(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def _series(db: Database, tmp_path: Path, name: str) -> str:
    [f] = make_ct_series(tmp_path / name, 1)
    ds = pydicom.dcmread(f)
    db.record_instance(sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
                       study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID,
                       path=str(f), size=f.stat().st_size)
    return str(ds.SeriesInstanceUID)


def test_case07_full_disk_backs_off_logs_once_and_accounts_for_every_refusal(
        tmp_path: Path) -> None:
    db = Database(tmp_path / "s.db")
    db.enqueue_job(_series(db, tmp_path, "queued"))      # a job waiting to be claimed
    _series(db, tmp_path, "quiet")                        # a series waiting for its job
    real, full = db._conn, _FullDisk(db._conn)
    db._conn = full  # type: ignore[assignment]
    monitor = CompletionMonitor(db, Config(quiet_seconds=0.0), interval=0.01)
    pool = WorkerPool(db, Config(data_dir=tmp_path / "data"), process=fake_process_series,
                      n=1, poll_interval=0.01)
    pool.state.maximum = 0.1  # the test does not wait out a long back-off
    with capture_logs() as logs:
        for _ in range(11):
            monitor._tick()
            monitor._retry_at = 0.0
        refused = [db.record_rejection(sop_instance_uid=f"1.2.4.{i}", calling_ae="A",
                                       status=0xA700, reason="disk full") for i in range(3)]
        pool.start()
        time.sleep(0.5)
        assert db.jobs("pending") and not db.jobs("running")
        full.full = False
        monitor._tick()
        assert db.record_rejection(sop_instance_uid="1.2.4.9", calling_ae="A", status=0xA700,
                                   reason="disk full")
        wait_for(lambda: len(db.jobs("done")) == 2, 20, what="both jobs run after recovery")
        pool.stop(5)
    db._conn = real
    assert refused == [False] * 3
    assert [r["sop_instance_uid"] for r in db.rejections()] == [f"1.2.4.{i}" for i in (0, 1, 2, 9)]
    errors = [e["event"] for e in logs if e["log_level"] in ("error", "critical")]
    assert sorted(errors) == ["completion check failing; retrying with back-off, logged again "
                              "when it recovers", "job queue failing; retrying with back-off, "
                              "logged again when it recovers"], errors
    assert not any("exc_info" in e for e in logs)
    assert sorted(e["event"] for e in logs if e["event"].endswith("recovered")) == [
        "completion check recovered", "job queue recovered"]
    assert monitor.state.failures == 0 and monitor.state.delay() == 0.01
    db.close()


# ---------------------------------------------------------------------- case 8
def test_case08_access_is_strict_by_default_and_rejections_are_counted_not_rowed(
        tmp_path: Path, scp: tuple[Config, Database, Any]) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    with pytest.raises(ConfigError, match="--allow-any-ae"):
        load_config(env={}).check_access_policy()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCREENER_")}
    r = subprocess.run([sys.executable, "-m", "screener", "serve", "--data-dir",
                        str(tmp_path / "d"), "--port", str(port)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "allowed_calling_aes is empty" in r.stderr + r.stdout
    cfg, db, srv = scp
    [f] = make_ct_series(tmp_path / "in", 1)
    assert pynet_send(cfg.port, [f], called="NOT-US") == [(-1, "association not established")]
    ae = AE(ae_title="INTRUDER")
    ae.add_requested_context(Verification)
    with capture_logs() as logs:
        for _ in range(40):
            assert not ae.associate("127.0.0.1", cfg.port, ae_title="SCREENER").is_established
        srv.stop()
    lines = [e for e in logs if e["event"] == "association rejected"]
    assert 1 <= len(lines) <= 3 and sum(e["count"] for e in lines) == 40, lines
    counts = {r["calling_ae"]: r for r in db.rejected_associations()}
    assert counts["INTRUDER"]["count"] == 40
    assert "not in allowed_calling_aes" in counts["INTRUDER"]["reason"]
    assert "called AE title 'NOT-US' is not ours" in counts["TESTSCU"]["reason"]
    assert db.rejections() == [] and db.counts()["rejected_associations"] == 41


# ---------------------------------------------------------------------- case 9
def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_case09_files_with_phi_are_0600_and_folders_0700_whatever_the_umask(
        tmp_path: Path) -> None:
    from screener.reporting.sc import write_sc
    from screener.reporting.sr import write_sr

    old = os.umask(0o022)
    try:
        cfg = load_config(env={}, data_dir=tmp_path / "data", host="127.0.0.1",
                          port=free_port(), min_free_mb=1, allowed_calling_aes=["TESTSCU"])
        db = Database(cfg.db_path)
        srv = start_scp(cfg, db)
        try:
            [f] = make_ct_series(tmp_path / "in", 1)
            assert pynet_send(cfg.port, [f]) == [(0, "")]
        finally:
            srv.stop()
        stored = Path(db.series_instances(pydicom.dcmread(f).SeriesInstanceUID)[0]["path"])
        db.enqueue_job(pydicom.dcmread(f).SeriesInstanceUID)
        run_job(db.claim_job(), db, cfg, process=fake_process_series)
        [res] = list(db.iter_table("results"))
        ds = pydicom.dcmread(f)
        ds.SOPInstanceUID = generate_uid()
        out = cfg.results_dir / "series" / "job-9"
        written = [write_sr(ds, out), write_sc(ds, out / "sc"),
                   cfg.outbox_dir / "study" / "series" / "x.dcm"]
        copy_atomic(written[0], written[2], cfg.tmp_dir)
    finally:
        os.umask(old)
    for p in [stored, *written, cfg.db_path]:
        assert _mode(p) == 0o600, (p, oct(_mode(p)))
    folders = [cfg.data_dir, cfg.store_dir, stored.parent, stored.parent.parent, cfg.results_dir,
               Path(res["path"]).parent, Path(res["path"]).parent.parent, out, out / "sc",
               cfg.outbox_dir, written[2].parent, written[2].parent.parent, cfg.tmp_dir]
    for d in folders:
        assert _mode(d) == 0o700, (d, oct(_mode(d)))
    db.close()


# ---------------------------------------------------------------------- case 12
def test_case12_every_storage_class_is_accepted_non_ours_ignored_and_recorded(
        tmp_path: Path, scp: tuple[Config, Database, Any]) -> None:
    cfg, db, srv = scp
    assert {"1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2"} <= set(
        IMAGE_STORAGE_CLASSES)
    ct = make_ct_series(tmp_path / "in", 4)
    sr = Dataset()  # our own SR, as a PACS forwards it with the rest of the study
    sr.SOPClassUID, sr.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.88.33", generate_uid()
    sr.StudyInstanceUID = pydicom.dcmread(ct[0]).StudyInstanceUID
    sr.SeriesInstanceUID, sr.Modality = generate_uid(), "SR"
    sr.file_meta = FileMetaDataset()
    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    res = pynet_send(cfg.port, [ct[0], ct[1], tmp_path / "sr.dcm", ct[2], ct[3]])
    assert res == [(0, "")] * 5
    assert db.counts()["instances"] == 4 and db.counts()["ignored"] == 1
    [ign] = list(db.iter_table("ignored"))
    assert (ign["sop_instance_uid"], ign["sop_class_uid"]) == (sr.SOPInstanceUID,
                                                               sr.SOPClassUID)
    classes = {str(c.abstract_syntax) for c in srv.ae.supported_contexts}
    assert {"1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.22",
            "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.2.1"} <= classes


@pytest.mark.network
def test_case12_orthanc_forwards_a_study_holding_our_sr_and_every_ct_arrives(
        tmp_path: Path) -> None:
    from tests.daemon_helpers import Daemon, Orthanc, storescu
    d = Daemon(tmp_path / "d", env={"SCREENER_ALLOWED_CALLING_AES": "ORTHANC,TESTSCU",
                                    "SCREENER_QUIET_SECONDS": "3600"}).start()
    orthanc = Orthanc(tmp_path / "orthanc",
                      modalities={"screener": ["SCREENER", "127.0.0.1", d.port]}).start()
    try:
        ct = make_ct_series(tmp_path / "ct", 6)
        sr = Dataset()
        sr.SOPClassUID, sr.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.88.33", generate_uid()
        ref = pydicom.dcmread(ct[0])
        for kw in ("StudyInstanceUID", "PatientName", "PatientID"):
            setattr(sr, kw, ref.get(kw))
        sr.SeriesInstanceUID, sr.Modality = generate_uid(), "SR"
        sr.file_meta = FileMetaDataset()
        sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
        assert storescu(orthanc.dicom_port, [*ct, tmp_path / "sr.dcm"]).returncode == 0
        [study] = orthanc.get("/studies")
        orthanc.post("/modalities/screener/store", {"Resources": [study], "Synchronous": True})
        db = d.db()
        assert db.counts()["instances"] == 6 and db.counts()["ignored"] == 1
        assert [r["sop_instance_uid"] for r in db.iter_table("ignored")] == [sr.SOPInstanceUID]
    finally:
        orthanc.stop()
        assert d.stop() == 0


# ---------------------------------------------------------------------- case 13
def test_case13_lossy_8bit_ct_is_declined_for_that_reason_and_aborts_are_logged(
        tmp_path: Path, scp: tuple[Config, Database, Any]) -> None:
    from pynetdicom import AE

    cfg, db, _ = scp
    files = make_ct_series(tmp_path / "in", 3, rows=32, cols=32)
    for p in files:
        ds = pydicom.dcmread(p)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.PixelData = bytes(32 * 32)
        ds.LossyImageCompression, ds.ImageType = "01", ["DERIVED", "PRIMARY", "AXIAL"]
        ds.save_as(p)
    assert pynet_send(cfg.port, files) == [(0, "")] * 3
    series_uid = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
    calls = []

    def pipeline(paths: list[Path], **_: Any) -> Any:
        calls.append(paths)
        return PipelineResult("skipped", "no protocol applies: L1 not in view: coverage ends at T12")
    db.enqueue_job(series_uid)
    run_job(db.claim_job(), db, cfg, process=pipeline)
    [job] = db.jobs()
    assert calls == [] and job["status"] == "skipped"
    assert job["reason"].startswith("series not quantitative: lossy compressed "
                                    "(LossyImageCompression 01); 8-bit pixel data"), job
    # an association the sender aborts is logged as an abort, not as a release
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(pydicom.uid.CTImageStorage, ExplicitVRLittleEndian)
    [f] = make_ct_series(tmp_path / "more", 1)
    with capture_logs() as logs:
        assoc = ae.associate("127.0.0.1", cfg.port, ae_title="SCREENER")
        assert assoc.send_c_store(pydicom.dcmread(f)).Status == 0
        assoc.abort()
        wait_for(lambda: [e for e in logs if e["event"].startswith("association ")], 5,
                 what="association log line")
    [line] = [e for e in logs if e["event"].startswith("association ")]
    assert line["event"] == "association aborted" and line["log_level"] == "warning"
    assert line["stored"] == 1


def test_replay_summary_names_skipped_non_dicom_files() -> None:
    text = format_table([], [], [Path("/x/readme.txt")], ignored=2)
    assert "1 files not DICOM, skipped (/x/readme.txt)" in text and "2 instances" in text


def test_fuzz_f5_replay_counts_an_identical_duplicate_file(tmp_path: Path) -> None:
    [f] = make_ct_series(tmp_path / "in", 1)
    (f.parent / "copy.dcm").write_bytes(f.read_bytes())
    found = scan(f.parent)
    assert found.unusable == [] and [p.name for p in found.duplicates] == ["ct0000.dcm"]
    text = format_table([], found.unusable, found.not_dicom_paths, found.ignored,
                        found.duplicates)
    assert "1 duplicate files (identical to an earlier one), skipped" in text
    assert structlog is not None


# ---------------------------------------------------------------- fuzz findings (F1, F2)
def test_fuzz_f1_wrong_vr_on_sop_class_is_listed_not_raised(tmp_path: Path) -> None:
    [f] = make_ct_series(tmp_path / "in", 1)
    _replace_bytes(f, b"\x08\x00\x16\x00UI", b"\x08\x00\x16\x00FD")
    reason = _unusable(f.parent)[f.name]
    assert "(0008,0016) unreadable" in reason and "0xC000" in reason


def test_fuzz_f2_real_encapsulated_files_with_a_pad_byte_after_the_end_marker_are_valid(
        ) -> None:
    from screener.validation import read_instance
    from tests.conftest import SHARED
    files = sorted((SHARED / "data" / "real-public").glob("*.dcm"))
    if not files:
        pytest.skip(f"shared real-public files absent under {SHARED} (../shared not beside "
                    "the project)")
    for p in files:
        _, uids, ts = read_instance(p, frozenset(IMAGE_STORAGE_CLASSES))
        assert uids["SOPInstanceUID"] and ts


def test_reasons_never_quote_a_broken_value(tmp_path: Path,
                                            scp: tuple[Config, Database, Any]) -> None:
    cfg, db, _ = scp
    [f] = make_ct_series(tmp_path / "in", 1)
    _replace_bytes(f, b"\x10\x00\x10\x00PN", b"\x10\x00\x10\x00FD")  # PatientName read as FD
    reason = _unusable(f.parent)[f.name]
    [(status, comment)] = pynet_send(cfg.port, [f])
    assert status == 0xC000 and comment.startswith("attribute (0010,0010) unreadable (VR FD)")
    for text in (reason, comment, db.rejections()[0]["reason"]):
        assert "Secret" not in text and "Testpatient" not in text, text


@pytest.mark.parametrize("tag,old,new,expect", [
    (b"\x28\x00\x10\x00US", b"\x02\x00\x20\x00", b"\x03\x00\x20\x00\x00", "(0028,0010)"),
])
def test_binary_numbers_of_the_wrong_length_are_unusable(tmp_path: Path, tag: bytes, old: bytes,
                                                new: bytes, expect: str) -> None:
    [f] = make_ct_series(tmp_path / "in", 1, rows=32, cols=32)
    _replace_bytes(f, tag + old, tag + new)
    reason = _unusable(f.parent)[f.name]
    assert expect in reason, reason


def test_fuzz_f3_encapsulated_size_must_match_rows_and_columns(tmp_path: Path) -> None:
    from tests.conftest import SHARED
    src = SHARED / "data" / "real-public" / "tibia-cr-monochrome1-j2k.dcm"
    if not src.is_file():
        pytest.skip(f"shared real-public file absent: {src} (../shared not beside the project)")
    folder = tmp_path / "in"
    folder.mkdir()
    for name, rows in (("ok.dcm", None), ("huge.dcm", 65535)):
        ds = pydicom.dcmread(src)
        if rows:
            ds.Rows = rows
        ds.save_as(folder / name)
    reasons = _unusable(folder)
    assert set(reasons) == {"huge.dcm"}
    assert "the codestream is 1760 x 1760 (columns x rows), Columns / Rows say 1760 x 65535" \
        in reasons["huge.dcm"], reasons


def test_replay_of_a_uid_already_received_with_other_content_is_a_recorded_conflict(
        tmp_path: Path, scp: tuple[Config, Database, Any]) -> None:
    from screener.replay import replay
    cfg, db, _ = scp
    [f] = make_ct_series(tmp_path / "in", 1)
    assert pynet_send(cfg.port, [f]) == [(0, "")]
    folder = tmp_path / "archive"
    folder.mkdir()
    (folder / "same.dcm").write_bytes(f.read_bytes())          # identical: nothing to say
    rows, found = replay(folder, cfg, progress=False)
    assert found.unusable == []
    ds = pydicom.dcmread(f)
    ds.PixelData = bytes(len(ds.PixelData))
    ds.save_as(folder / "same.dcm")
    rows, found = replay(folder, cfg, progress=False)
    [(path, reason)] = found.unusable
    assert path.name == "same.dcm" and "with different content; the first version" in reason
    assert [r["status"] for r in Database(cfg.db_path).rejections()] == [0xB006]


@pytest.mark.network
def test_case08_allow_any_ae_is_explicit_and_said_at_start(tmp_path: Path) -> None:
    from tests.daemon_helpers import Daemon, echoscu
    d = Daemon(tmp_path / "d", env={"SCREENER_ALLOWED_CALLING_AES": ""},
               args=["--allow-any-ae"]).start()
    try:
        assert echoscu(d.port, calling="ANYONE").returncode == 0
        assert echoscu(d.port, calling="ANYONE", called="OTHER").returncode != 0
    finally:
        assert d.stop() == 0
    assert "allow_any_ae is set: any calling AE title is accepted" in d.log()


@pytest.mark.parametrize("keyword,value,reason", [
    ("ImagePositionPatient", b"-100.0\\-100.0\\1.00\x8c", "ImagePositionPatient is not a number"),
    ("PixelSpacing", b"nan\\1.5 ", "PixelSpacing is not finite (nan)"),
])
def test_fuzz_f6_geometry_that_is_not_a_finite_number_is_refused(
        tmp_path: Path, scp: tuple[Config, Database, Any], keyword: str, value: bytes,
        reason: str) -> None:
    cfg, db, _ = scp
    [f] = make_ct_series(tmp_path / "in", 1)
    tag = {"ImagePositionPatient": b"\x20\x00\x32\x00DS", "PixelSpacing": b"\x28\x00\x30\x00DS"}
    raw = f.read_bytes()
    at = raw.index(tag[keyword])
    old_len = int.from_bytes(raw[at + 6:at + 8], "little")
    value += b" " * (len(value) % 2)
    f.write_bytes(raw[:at + 6] + len(value).to_bytes(2, "little") + value
                  + raw[at + 8 + old_len:])
    assert pynet_send(cfg.port, [f]) == [(0xC002, reason)]
    assert reason in _unusable(f.parent)[f.name]
    assert db.counts()["instances"] == 0


def test_a_non_numeric_position_in_a_stored_slice_is_an_unusable_series_not_a_failed_job(tmp_path: Path) -> None:
    """Fuzz finding F6 (b): a slice placed in the store with a non-numeric ImagePositionPatient (the
    ingest validation refuses such instances) makes the series unusable with a reason naming the
    attribute, not a failed job with a ValueError."""
    from screener.series import SeriesUnusable, load_volume, read_series_info
    from tests.ct_factory import make_ct_series

    paths = make_ct_series(tmp_path / "s", n_slices=12).paths
    ds = pydicom.dcmread(paths[3])
    ds.ImagePositionPatient = ["-253.904", "-264.646", "1.2501"]
    ds.save_as(paths[3])
    raw = paths[3].read_bytes()
    assert raw.count(b"\\1.2501") == 1
    paths[3].write_bytes(raw.replace(b"\\1.2501", b"\\1.25x1"))  # a flipped byte, as the fuzz wrote it
    with pytest.raises(SeriesUnusable, match="ImagePositionPatient is not a number"):
        read_series_info(paths)
    with pytest.raises(SeriesUnusable, match="geometry attribute"):
        load_volume(paths)
