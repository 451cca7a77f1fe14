"""Jobs and export: run_job records outcomes, the exporter's outbox / C-STORE / backoff, Orthanc."""
from __future__ import annotations

import subprocess
import threading
from pathlib import Path
from typing import Any, Iterator

import pydicom
import pytest
from pynetdicom import AE, AllStoragePresentationContexts, evt

from screener.config import Config, Destination, load_config
from screener.db import Database, now
from screener.destinations import parse_destination
from screener.export import Exporter
from screener.pipeline import PipelineResult
from screener.worker import WorkerPool, load_process, run_job
from tests.conftest import free_port, require_tool
from tests.daemon_helpers import (Daemon, Orthanc, fake_failing_process_series,
                                  fake_process_series, make_ct_series, storescu, wait_for)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[Config, Database]]:
    cfg = load_config(env={}, data_dir=tmp_path / "data", export_backoff_seconds=5,
                      export_backoff_max_seconds=600, export_max_attempts=4)
    cfg.ensure_dirs()
    db = Database(cfg.db_path)
    yield cfg, db
    db.close()


def _ingest(db: Database, files: list[Path]) -> str:
    """Record files as received (no network) and return their series UID."""
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        db.record_instance(sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
                           study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID,
                           path=str(f), source="test", modality="CT")
    return str(ds.SeriesInstanceUID)


def _claim(db: Database, series: str) -> dict[str, Any]:
    db.enqueue_job(series)
    job = db.claim_job()
    assert job is not None
    return job


def test_backoff_is_exponential_and_capped(env: tuple[Config, Database]) -> None:
    cfg, db = env
    ex = Exporter(db, cfg)
    assert [ex.backoff(a) for a in range(1, 10)] == [5, 10, 20, 40, 80, 160, 320, 600, 600]
    assert parse_destination("PACS@10.1.2.3:104") == Destination("PACS", "10.1.2.3", 104)
    assert parse_destination("PACS@10.1.2.3:104").key == "PACS@10.1.2.3:104"
    web = parse_destination("dicomweb+https://pacs.example.org/dicom-web/")
    assert (web.kind, web.url, web.key) == ("dicomweb", "https://pacs.example.org/dicom-web",
                                            "dicomweb+https://pacs.example.org/dicom-web")
    for bad in ("PACS:104", "dicomweb+ftp://x/dicom-web", "@h:104"):
        with pytest.raises(ValueError, match="AE@host:port|http"):
            parse_destination(bad)


def test_run_job_records_outcome_and_outbox_delivers(tmp_path: Path,
                                                      env: tuple[Config, Database]) -> None:
    cfg, db = env
    files = make_ct_series(tmp_path / "ct", 4)
    series = _ingest(db, files)
    job = _claim(db, series)
    run_job(job, db, cfg, process=fake_process_series)
    j = db.get_job(job["id"])
    assert (j["status"], j["reason"], j["error"]) == ("done", "", "")
    [res] = [r for r in db.iter_table("results")]
    assert Path(res["path"]).parent == cfg.results_dir / series / f"job-{job['id']}"
    assert [(d["protocol"], d["accepted"]) for d in db.iter_table("decisions")] == [("fake", 1)]
    [exp] = db.exports()
    assert (exp["destination"], exp["status"], exp["attempts"]) == ("outbox", "pending", 0)
    assert Exporter(db, cfg).run_once() == {"sent": 1}
    study = pydicom.dcmread(files[0]).StudyInstanceUID
    out = cfg.outbox_dir / study / f"{res['sop_instance_uid']}.dcm"
    assert out.read_bytes() == Path(res["path"]).read_bytes()
    assert db.exports()[0]["status"] == "sent" and db.exports()[0]["sent_at"] > 0
    assert Exporter(db, cfg).run_once() == {}
    assert list(cfg.tmp_dir.iterdir()) == []


def test_new_sr_supersedes_the_previous_one(tmp_path: Path, env: tuple[Config, Database]) -> None:
    cfg, db = env
    seen: list[str | None] = []

    def sr_pipeline(paths: list[Path], *, config: Config, out_dir: Path,
                    supersedes: str | None = None) -> Any:
        seen.append(supersedes)
        r = fake_process_series(paths, config=config, out_dir=out_dir, supersedes=supersedes)
        r.outputs[0].kind, r.outputs[0].supersedes = "SR", ""
        return r

    series = _ingest(db, make_ct_series(tmp_path / "a", 2))
    run_job(_claim(db, series), db, cfg, process=sr_pipeline)
    first = db.latest_sr(series)
    _ingest(db, make_ct_series(tmp_path / "b", 1, series_uid=series, start=2,
                               study_uid=first["study_uid"]))
    run_job(_claim(db, series), db, cfg, process=sr_pipeline)
    second = db.latest_sr(series)
    assert seen == [None, first["path"]]
    assert second["id"] != first["id"] and second["supersedes"] == first["sop_instance_uid"]
    assert [j["n_instances"] for j in db.jobs()] == [2, 3]


def test_failed_and_skipped_jobs_are_recorded(tmp_path: Path, env: tuple[Config, Database]) -> None:
    cfg, db = env
    s1 = _ingest(db, make_ct_series(tmp_path / "a", 2))
    j1 = _claim(db, s1)
    run_job(j1, db, cfg, process=fake_failing_process_series)
    assert (db.get_job(j1["id"])["status"], db.get_job(j1["id"])["error"]) == (
        "failed", "RuntimeError: simulated pipeline crash")

    def skipping(paths: list[Path], **_: Any) -> Any:
        return PipelineResult("skipped", "no protocol accepted the series: l1_attenuation: L1 not in view",
                              decisions=[("l1_attenuation", False, "L1 not in view")])
    s2 = _ingest(db, make_ct_series(tmp_path / "b", 2))
    j2 = _claim(db, s2)
    run_job(j2, db, cfg, process=skipping)
    j = db.get_job(j2["id"])
    assert j["status"] == "skipped" and j["reason"].endswith("L1 not in view")
    assert [(d["protocol"], d["accepted"], d["reason"]) for d in db.iter_table("decisions")] == [
        ("l1_attenuation", 0, "L1 not in view")]
    assert db.exports() == [] and list(db.iter_table("results")) == []


def test_worker_pool_processes_pending_jobs(tmp_path: Path, env: tuple[Config, Database]) -> None:
    cfg, db = env
    finished: list[int] = []
    pool = WorkerPool(db, cfg, process="tests.daemon_helpers:fake_process_series", n=2,
                      on_finished=finished.append, poll_interval=0.05)
    for k in range(3):
        db.enqueue_job(_ingest(db, make_ct_series(tmp_path / f"s{k}", 2)))
    pool.start()
    try:
        wait_for(lambda: len(finished) == 3, 30, what="3 jobs")
    finally:
        assert pool.stop(10)
    assert [j["status"] for j in db.jobs()] == ["done"] * 3
    assert len(db.exports("pending")) == 3


def test_unavailable_pipeline_fails_jobs_with_the_reason(tmp_path: Path,
                                                         env: tuple[Config, Database]) -> None:
    cfg, db = env
    with pytest.raises(ValueError, match="expected 'package.module:function'"):
        load_process("screener.pipeline")
    with pytest.raises(ValueError, match="nothing is not a function of tests.daemon_helpers"):
        load_process("tests.daemon_helpers:nothing")
    done: list[int] = []
    pool = WorkerPool(db, cfg, process="no_such_module:process", n=1, on_finished=done.append,
                      poll_interval=0.05)
    db.enqueue_job(_ingest(db, make_ct_series(tmp_path / "ct", 1)))
    pool.start()
    try:
        wait_for(lambda: db.jobs("failed"), 10, what="failed job")
    finally:
        assert pool.stop(10)
    [j] = db.jobs()
    assert j["error"] == "pipeline unavailable: ModuleNotFoundError: No module named " \
        "'no_such_module'"


class _Receiver:
    """An in-process C-STORE SCP collecting SOP Instance UIDs."""

    def __init__(self, port: int) -> None:
        self.port, self.received = port, []
        self.ae = AE(ae_title="PACS")
        self.ae.supported_contexts = AllStoragePresentationContexts
        self.server: Any = None

    def _store(self, event: Any) -> int:
        self.received.append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    def start(self) -> "_Receiver":
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._store)])
        return self

    def stop(self) -> None:
        self.server.shutdown()


def test_pacs_outage_delays_with_backoff_then_delivers(tmp_path: Path,
                                                      env: tuple[Config, Database]) -> None:
    cfg, db = env
    port = free_port()
    cfg.destinations = [Destination("PACS", "127.0.0.1", port)]
    series = _ingest(db, make_ct_series(tmp_path / "ct", 2))
    run_job(_claim(db, series), db, cfg, process=fake_process_series)
    ex = Exporter(db, cfg)
    t = now()
    assert ex.run_once(at=t) == {"retry": 1}
    [e] = db.exports()
    assert e["destination"] == f"PACS@127.0.0.1:{port}" and e["status"] == "pending"
    assert e["attempts"] == 1 and e["next_attempt_at"] == pytest.approx(t + 5)
    assert "association with PACS@127.0.0.1:" in e["last_error"]
    assert ex.run_once(at=t + 4) == {}           # not due yet
    assert ex.run_once(at=t + 6) == {"retry": 1}
    assert db.exports()[0]["next_attempt_at"] == pytest.approx(t + 6 + 10)
    rx = _Receiver(port).start()
    try:
        assert ex.run_once(at=t + 17) == {"sent": 1}
    finally:
        rx.stop()
    e = db.exports()[0]
    assert (e["status"], e["attempts"], e["last_error"]) == ("sent", 3, "")
    assert rx.received == [e["sop_instance_uid"]]


def test_export_gives_up_after_max_attempts(tmp_path: Path, env: tuple[Config, Database]) -> None:
    cfg, db = env
    cfg.destinations = [Destination("PACS", "127.0.0.1", free_port())]
    cfg.export_max_attempts = 2
    run_job(_claim(db, _ingest(db, make_ct_series(tmp_path / "ct", 1))), db, cfg,
            process=fake_process_series)
    ex = Exporter(db, cfg)
    assert ex.run_once(at=now()) == {"retry": 1}
    assert ex.run_once(at=now() + 1000) == {"failed": 1}
    e = db.exports()[0]
    assert e["status"] == "failed" and e["attempts"] == 2 and "failed" in e["last_error"]
    assert ex.run_once(at=now() + 10 ** 6) == {}


def test_exporter_thread_runs_and_stops(tmp_path: Path, env: tuple[Config, Database]) -> None:
    cfg, db = env
    run_job(_claim(db, _ingest(db, make_ct_series(tmp_path / "ct", 1))), db, cfg,
            process=fake_process_series)
    ex = Exporter(db, cfg, interval=0.05)
    ex.start()
    try:
        wait_for(lambda: db.exports("sent"), 10, what="outbox export")
    finally:
        ex.stop()
    assert not [t for t in threading.enumerate() if t.name == "screener-exporter"]


@pytest.mark.network
def test_results_from_the_daemon_arrive_in_orthanc(tmp_path: Path) -> None:
    orthanc = Orthanc(tmp_path / "orthanc").start()
    d = Daemon(tmp_path / "d", env={
        "SCREENER_QUIET_SECONDS": "1",
        "SCREENER_DESTINATIONS": f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"},
        args=["--pipeline", "tests.daemon_helpers:fake_process_series"])
    try:
        d.start()
        files = make_ct_series(tmp_path / "ct", 8)
        r = storescu(d.port, files)
        assert r.returncode == 0, r.stderr
        db = d.db()
        wait_for(lambda: db.exports("sent"), 60, what="export sent to Orthanc")
        [res] = list(db.iter_table("results"))
        assert res["sop_instance_uid"] in orthanc.sop_instance_uids()
        [oid] = orthanc.get("/instances")
        tags = orthanc.get(f"/instances/{oid}/simplified-tags")
        ref = pydicom.dcmread(files[0])
        assert tags["StudyInstanceUID"] == ref.StudyInstanceUID   # same study as the source
        assert tags["PatientID"] == ref.PatientID
        assert tags["SeriesDescription"] == "fake result of 8 instances"
        assert [j["status"] for j in db.jobs()] == ["done"]
    finally:
        assert d.stop() == 0
        orthanc.stop()


def _phantom_ct(out: Path) -> list[Path]:
    """A virtual-cohort CT (97 axial slices, ribs and lumbar spine in view)."""
    from training.phantoms.anatomy import build_scene
    from training.phantoms.ct import render_ct, write_series
    from training.phantoms.population import make_patient
    return write_series(render_ct(build_scene(make_patient(7, 0)), "siemens_ap_pv", 7), out)


@pytest.mark.network
@pytest.mark.slow
def test_real_pipeline_sr_and_sc_reach_orthanc_and_late_instances_supersede(
        tmp_path: Path) -> None:
    files = sorted(_phantom_ct(tmp_path / "ct"))
    orthanc = Orthanc(tmp_path / "orthanc").start()
    d = Daemon(tmp_path / "d", env={
        "SCREENER_QUIET_SECONDS": "1", "SCREENER_ALLOWED_CALLING_AES": "TESTSCU",
        "SCREENER_PROTOCOLS": "l1_attenuation",  # the model protocols: test_model_protocols_daemon
        "SCREENER_DESTINATIONS": f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"})
    try:
        d.start()
        early, late = files[:-4], files[-4:]     # the series arrives in two pieces
        assert storescu(d.port, early).returncode == 0
        db = d.db()
        wait_for(lambda: len(db.exports("sent")) == 4, 120, what="first SR + SC + 2 SEGs in Orthanc")
        [j1] = db.jobs()
        assert (j1["status"], j1["n_instances"]) == ("done", len(early))
        first = {r["kind"]: r for r in db.iter_table("results")}
        assert set(first) == {"SR", "SC", "SEG"}
        assert storescu(d.port, late).returncode == 0
        wait_for(lambda: len(db.exports("sent")) == 8, 120, what="second SR + SC + 2 SEGs in Orthanc")
        j2 = db.jobs()[-1]
        assert (j2["status"], j2["n_instances"]) == ("done", len(files))
        sr2 = db.latest_sr(j2["series_uid"])
        assert sr2["job_id"] == j2["id"]
        assert sr2["supersedes"] == first["SR"]["sop_instance_uid"]
        ds = pydicom.dcmread(sr2["path"])
        pred = ds.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
        assert pred.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == \
            first["SR"]["sop_instance_uid"]
        in_orthanc = orthanc.sop_instance_uids()
        assert {r["sop_instance_uid"] for r in db.iter_table("results")} <= in_orthanc
        src = pydicom.dcmread(files[0], stop_before_pixels=True)
        for oid in orthanc.get("/instances"):   # same patient and study as the source CT
            tags = orthanc.get(f"/instances/{oid}/simplified-tags")
            assert tags["StudyInstanceUID"] == src.StudyInstanceUID
            assert tags["PatientID"] == src.PatientID
        findings = db.findings(j2["series_uid"])
        assert [(f["protocol"], f["site"]) for f in findings] == [("l1_attenuation", "L1")]
        # what was sent is valid DICOM (errors fail; warnings allowed) and the SR renders
        for r in db.iter_table("results"):
            v = subprocess.run([require_tool("dciodvfy"), r["path"]], capture_output=True,
                               text=True)
            assert v.returncode == 0 and "Error" not in v.stdout + v.stderr, v.stderr[-2000:]
            if r["kind"] == "SR":
                h = subprocess.run([require_tool("dsr2html"), r["path"]], capture_output=True,
                                   text=True)
                assert h.returncode == 0 and "<html" in h.stdout.lower()
    finally:
        assert d.stop() == 0
        orthanc.stop()


def test_a_failing_export_pass_is_logged_once_per_state_change(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk or a broken database fails every pass: one error line (no traceback) when it
    starts, one when it clears, not one per pass."""
    from structlog.testing import capture_logs

    db = Database(tmp_path / "db.sqlite")
    ex = Exporter(db, Config(data_dir=tmp_path), interval=0.01)
    calls = {"n": 0}

    def flaky() -> dict:
        calls["n"] += 1
        if calls["n"] <= 5:
            raise OSError(28, "No space left on device")
        if calls["n"] >= 8:
            ex._stop.set()
        return {}

    monkeypatch.setattr(ex, "run_once", flaky)
    with capture_logs() as logs:
        ex._loop()
    errors = [e for e in logs if e["log_level"] == "error"]
    assert len(errors) == 1 and "No space left on device" in errors[0]["error"]
    assert "exc_info" not in errors[0] and "traceback" not in errors[0]
    assert [e["event"] for e in logs if e["log_level"] == "info"] == ["export passes recovered"]
