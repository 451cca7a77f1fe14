"""The database: instances recorded once, job state machine, restart recovery, export queue."""
from __future__ import annotations

from pathlib import Path

import pytest

from screener.db import Database


def _inst(db: Database, sop: str, series: str = "1.2.3.2", **kw: object) -> bool:
    return db.record_instance(sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                              study_uid="1.2.3", series_uid=series, path=f"/x/{sop}.dcm", **kw)


def test_instances_recorded_once_and_series_counts(tmp_path: Path) -> None:
    db = Database(tmp_path / "s.db")
    assert _inst(db, "1.1") is True
    assert _inst(db, "1.1") is False  # duplicate: stored once
    assert _inst(db, "1.2") is True
    assert db.get_series("1.2.3.2")["n_instances"] == 2
    assert [r["sop_instance_uid"] for r in db.series_instances("1.2.3.2")] == ["1.1", "1.2"]


def test_job_lifecycle_and_late_instances(tmp_path: Path) -> None:
    db = Database(tmp_path / "s.db")
    for i in range(3):
        _inst(db, f"1.{i}")
    quiet = db.series_needing_jobs(quiet_seconds=0.0)
    assert [s["series_uid"] for s in quiet] == ["1.2.3.2"]
    assert db.series_needing_jobs(quiet_seconds=3600.0) == []  # not quiet yet
    jid = db.enqueue_job("1.2.3.2")
    assert db.series_needing_jobs(quiet_seconds=0.0) == []  # covered by a pending job
    job = db.claim_job()
    assert job is not None and job["id"] == jid and job["n_instances"] == 3
    assert db.claim_job() is None
    db.finish_job(jid, "skipped", reason="L1 not in view")
    assert db.jobs("skipped")[0]["reason"] == "L1 not in view"
    # a late instance of a finished series makes it due again
    _inst(db, "1.9")
    assert [s["series_uid"] for s in db.series_needing_jobs(quiet_seconds=0.0)] == ["1.2.3.2"]
    with pytest.raises(ValueError, match="final job status"):
        db.finish_job(jid, "running")


def test_running_jobs_requeued_after_crash(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    db = Database(path)
    _inst(db, "1.1")
    db.enqueue_job("1.2.3.2")
    assert db.claim_job() is not None
    db.close()  # "crash" with the job running
    db2 = Database(path)
    assert db2.requeue_running_jobs() == 1
    job = db2.claim_job()
    assert job is not None and job["attempts"] == 2


def test_findings_latest_only_and_exports(tmp_path: Path) -> None:
    db = Database(tmp_path / "s.db")
    _inst(db, "1.1")
    j1 = db.enqueue_job("1.2.3.2")
    db.record_finding(j1, "1.2.3.2", "1.2.3", "l1_attenuation", "L1", "indeterminate", {"v": 1})
    j2 = db.enqueue_job("1.2.3.2")
    db.record_finding(j2, "1.2.3.2", "1.2.3", "l1_attenuation", "L1", "likely normal", {"v": 2})
    assert [f["data"]["v"] for f in db.findings()] == [2]
    assert [f["data"]["v"] for f in db.findings(latest_only=False)] == [1, 2]
    rid = db.record_result(j2, "1.2.3.2", "1.2.3", "9.9", "1.2.840.10008.5.1.4.1.1.88.33", "SR",
                           "/r/9.9.dcm")
    assert db.latest_sr("1.2.3.2")["id"] == rid
    eid = db.queue_export(rid, "/r/9.9.dcm", "9.9", "outbox")
    assert [e["id"] for e in db.due_exports()] == [eid]
    db.update_export(eid, status="sent", attempts=1)
    assert db.due_exports() == [] and db.counts()["exports"] == {"sent": 1}
