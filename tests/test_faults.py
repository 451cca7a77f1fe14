"""Faults: crashes, PACS outages, malformed input — the daemon loses nothing and keeps serving."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from screener.config import load_config
from screener.db import Database
from screener.storage import encode_file_meta
from screener.worker import run_job
from tests.conftest import free_port, require_tool
from tests.daemon_helpers import (Daemon, Orthanc, acknowledged_files, dcmtk_env, echoscu,
                                  fake_process_series, fresh_uid_copy, make_ct_series,
                                  pynet_send, storescu, wait_for)

pytestmark = pytest.mark.network


def _dataset_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    return raw[144 + int.from_bytes(raw[140:144], "little"):]


def test_sigkill_mid_study_loses_no_acknowledged_instance(tmp_path: Path) -> None:
    files = make_ct_series(tmp_path / "ct", 300, rows=128, cols=128)
    sop_of = {str(f): pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}
    env = {"SCREENER_QUIET_SECONDS": "2"}
    args = ["--pipeline", "tests.daemon_helpers:fake_process_series"]
    d = Daemon(tmp_path / "d", env=env, args=args).start()
    db = d.db()
    sender = subprocess.Popen([require_tool("storescu"), "-v", "-aet", "TESTSCU", "-aec",
                               "SCREENER", "127.0.0.1", str(d.port), *map(str, files)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=dcmtk_env())
    wait_for(lambda: db.counts()["instances"] >= 40, 60, 0.005, "40 instances stored")
    d.kill()                                     # SIGKILL in the middle of the study
    out, _ = sender.communicate(timeout=60)
    assert sender.returncode != 0               # the sender saw the connection drop
    acked = acknowledged_files(out)
    assert 30 <= len(acked) < 300   # (the last recorded one may die before its response)
    db.close()

    d2 = Daemon(tmp_path / "d", port=d.port, env=env, args=args).start()
    db = d2.db()
    try:
        recorded = {r["sop_instance_uid"]: r for r in db.iter_table("instances")}
        for f in acked:                          # every acknowledged instance survived intact
            row = recorded[sop_of[f]]
            assert _dataset_bytes(Path(row["path"])) == _dataset_bytes(Path(f))
        assert all(Path(r["path"]).is_file() for r in recorded.values())
        assert not list((tmp_path / "d" / "tmp").glob("*.part"))   # crash leftovers removed
        # the sender retries the whole study; duplicates are acknowledged once
        r = storescu(d2.port, files)
        assert r.returncode == 0 and len(acknowledged_files(r.stderr + r.stdout)) == 300
        assert db.counts()["instances"] == 300
        wait_for(lambda: db.jobs("done"), 60, what="job done after restart")
        wait_for(lambda: any(j["n_instances"] == 300 for j in db.jobs("done")), 60,
                 what="all covered by a finished job")
        assert max(j["n_instances"] for j in db.jobs()) == 300
        assert not db.jobs("failed") and not db.jobs("running")
    finally:
        assert d2.stop() == 0


def test_sigkill_during_a_job_reruns_it_once(tmp_path: Path) -> None:
    env = {"SCREENER_QUIET_SECONDS": "0.5"}
    args = ["--pipeline", "tests.daemon_helpers:slow_process_series"]
    d = Daemon(tmp_path / "d", env=env, args=args).start()
    files = make_ct_series(tmp_path / "ct", 3)
    assert storescu(d.port, files).returncode == 0
    db = d.db()
    series = pydicom.dcmread(files[0]).SeriesInstanceUID
    calls = tmp_path / "d" / "results" / series / "calls.txt"
    wait_for(calls.exists, 30, 0.05, "pipeline running")
    assert [j["status"] for j in db.jobs()] == ["running"]
    d.kill()                                     # crash while the pipeline runs
    assert calls.read_text().split() == ["job-1"]
    assert list(db.iter_table("results")) == []  # nothing half-recorded
    d2 = Daemon(tmp_path / "d", env=env, args=args).start()
    try:
        wait_for(lambda: db.jobs("done"), 60, what="job done after restart")
        wait_for(lambda: db.exports("sent"), 30, what="result in the outbox")
    finally:
        assert d2.stop() == 0
    assert calls.read_text().split() == ["job-1", "job-1"]   # re-run once, same job
    assert [(j["id"], j["status"], j["attempts"]) for j in db.jobs()] == [(1, "done", 2)]
    assert len(list(db.iter_table("results"))) == 1 and len(db.exports()) == 1
    assert len(list((tmp_path / "d" / "outbox").rglob("*.dcm"))) == 1
    # a finished job is never re-run: a third start finds nothing to do
    d3 = Daemon(tmp_path / "d", env=env, args=args).start()
    time.sleep(2)
    assert d3.stop() == 0
    assert calls.read_text().split() == ["job-1", "job-1"]


def test_recorded_job_is_not_rerun_after_requeue(tmp_path: Path) -> None:
    cfg = load_config(env={}, data_dir=tmp_path / "data")
    cfg.ensure_dirs()
    db = Database(cfg.db_path)
    f = make_ct_series(tmp_path / "ct", 2)
    for p in f:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        db.record_instance(sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=CTImageStorage,
                           study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID,
                           path=str(p))
    db.enqueue_job(ds.SeriesInstanceUID)
    job = db.claim_job()
    calls = []

    def counting(paths: list[Path], **kw: object) -> object:
        calls.append(len(paths))
        return fake_process_series(paths, **kw)  # type: ignore[arg-type]

    run_job(job, db, cfg, process=counting)
    assert db.requeue_running_jobs() == 0       # done: nothing to resume
    run_job(job, db, cfg, process=counting)     # a stale claim is ignored
    assert calls == [2] and len(list(db.iter_table("results"))) == 1
    db.close()


def test_pacs_down_result_delivered_after_it_starts(tmp_path: Path) -> None:
    orthanc = Orthanc(tmp_path / "orthanc", dicom_port=free_port(), http_port=free_port())
    d = Daemon(tmp_path / "d", env={
        "SCREENER_QUIET_SECONDS": "0.5", "SCREENER_EXPORT_BACKOFF_SECONDS": "0.5",
        "SCREENER_EXPORT_BACKOFF_MAX_SECONDS": "1",
        "SCREENER_DESTINATIONS": f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"},
        args=["--pipeline", "tests.daemon_helpers:fake_process_series"]).start()
    try:
        assert storescu(d.port, make_ct_series(tmp_path / "ct", 3)).returncode == 0
        db = d.db()
        wait_for(lambda: [e for e in db.exports() if e["attempts"] >= 2], 60,
                 what="failed export attempts while PACS is down")
        [e] = db.exports()
        assert e["status"] == "pending" and "association with ORTHANC@" in e["last_error"]
        orthanc.start()
        wait_for(lambda: db.exports("sent"), 60, what="delivery after PACS came back")
        assert e["sop_instance_uid"] in orthanc.sop_instance_uids()
    finally:
        assert d.stop() == 0
        orthanc.stop()


def test_shared_real_ct_refused_with_clear_status_then_received_with_fresh_uids(
        tmp_path: Path, real_ct_dir: Path) -> None:
    d = Daemon(tmp_path / "d", env={"SCREENER_QUIET_SECONDS": "1",    # real pipeline
                                    "SCREENER_PROTOCOLS": "l1_attenuation"}).start()
    try:
        real = sorted(p for p in real_ct_dir.iterdir() if p.is_file())
        assert len(real) == 20
        # as published: SOP Class / Instance UIDs only in the File Meta, Study/Series empty
        res = pynet_send(d.port, real[:3])
        assert res == [(0xA900, "missing StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID")] * 3
        # storescu needs the SOP class in the data set; Study/Series stay empty
        fixed = tmp_path / "fixed"
        fixed.mkdir()
        for i, f in enumerate(real[:2]):
            ds = pydicom.dcmread(f)
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
            ds.save_as(fixed / f"{i}.dcm")
        r = storescu(d.port, sorted(fixed.iterdir()), extra=["-xv", "-d"])
        out = r.stdout + r.stderr
        assert r.returncode != 0
        assert "DIMSE Status                  : 0xa900: Error: Data Set does not match SOP Class" \
            in out
        assert "missing StudyInstanceUID, SeriesInstanceUID" in out   # the ErrorComment
        db = d.db()
        assert db.counts()["instances"] == 0 and db.counts()["rejections"] == 4
        # with fresh UIDs the same JPEG 2000 files are received as they are
        fresh = fresh_uid_copy(real_ct_dir, tmp_path / "fresh")
        r = storescu(d.port, fresh, extra=["-xv"])
        assert r.returncode == 0 and len(acknowledged_files(r.stderr + r.stdout)) == 20
        rows = list(db.iter_table("instances"))
        assert len(rows) == 20 and {r["transfer_syntax"] for r in rows} == {
            "1.2.840.10008.1.2.4.90"}
        back = pydicom.dcmread(rows[0]["path"])
        assert back.pixel_array.shape == (512, 512)
        # ... decoded and declined by the router: L1 is not in view (covers T11-T12 only)
        [job] = wait_for(lambda: db.jobs("skipped") or db.jobs("failed") or db.jobs("done"),
                         120, what="the job of the real CT")
        assert job["status"] == "skipped" and "L1 not in view" in job["reason"], job
        [dec] = [x for x in db.iter_table("decisions") if x["protocol"] == "l1_attenuation"]
        assert dec["accepted"] == 0 and "L1 not in view" in dec["reason"]
        assert db.exports() == []
    finally:
        assert d.stop() == 0


def test_malformed_input_gets_failure_statuses_and_daemon_keeps_serving(tmp_path: Path,
                                                                        real_ct_dir: Path) -> None:
    d = Daemon(tmp_path / "d", env={"SCREENER_QUIET_SECONDS": "3600"}).start()
    try:
        bad = tmp_path / "bad"
        bad.mkdir()
        ct = make_ct_series(tmp_path / "ct", 2)
        raw = ct[0].read_bytes()
        (bad / "1_truncated_native.dcm").write_bytes(raw[: int(len(raw) * 0.6)])
        j2k = fresh_uid_copy(real_ct_dir, tmp_path / "j2k")[0].read_bytes()
        (bad / "2_truncated_j2k.dcm").write_bytes(j2k[: len(j2k) - 5000])
        (bad / "3_random_bytes.dcm").write_bytes(
            encode_file_meta(CTImageStorage, "1.2.3.4.5", ExplicitVRLittleEndian, "1.2.3")
            + os.urandom(6000))
        (bad / "4_text.dcm").write_bytes(
            encode_file_meta(CTImageStorage, "1.2.3.4.6", ImplicitVRLittleEndian, "1.2.3")
            + b"this is not a DICOM data set, just some text. " * 40)
        files = sorted(bad.iterdir())
        res = pynet_send(d.port, files)
        # Pixel Data (8192 bytes) ends the file, so what is left of it follows from the cut
        # (the file length varies with the random UIDs' lengths)
        kept = int(len(raw) * 0.6) - (len(raw) - 8192)
        assert res[0] == (0xC001, f"Pixel Data truncated: {kept} of 8192 bytes")
        unreadable = (0xC000, "data set unreadable: truncated or not DICOM (no UIDs found)")
        assert res[1:] == [unreadable] * 3
        # storescu refuses to send a truncated file itself
        r = storescu(d.port, files[:1])
        assert r.returncode != 0 and "premature end of stream" in r.stderr + r.stdout
        # a class the screener does not process (MR) is accepted, not stored, recorded
        mr = make_ct_series(tmp_path / "mr", 1)[0]
        m = pydicom.dcmread(mr)
        m.SOPClassUID = m.file_meta.MediaStorageSOPClassUID = pydicom.uid.MRImageStorage
        m.save_as(mr)
        r = storescu(d.port, [mr])
        assert r.returncode == 0 and "Received Store Response (Success)" in r.stderr, r.stderr
        # still serving
        assert echoscu(d.port).returncode == 0
        assert storescu(d.port, ct).returncode == 0
        db = d.db()
        assert db.counts()["instances"] == 2 and db.counts()["ignored"] == 1
        assert sorted(r["status"] for r in db.rejections()) == [0xC000] * 3 + [0xC001]
    finally:
        assert d.stop() == 0
