"""``screener purge --older-than DAYS`` (issue 20, item 5): only finished, exported, old studies
lose their received instances and results; everything else is kept with the reason."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from screener import cli
from screener.config import Config, load_config
from screener.db import Database
from screener.purge import purge
from screener.storage import instance_path

DAY = 86400.0
NOW = 1_900_000_000.0


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for k in list(os.environ):
        if k.startswith("SCREENER_"):
            monkeypatch.delenv(k)
    monkeypatch.setattr("screener.config.DEFAULT_CONFIG_PATH", tmp_path / "none.toml")


def _study(db: Database, cfg: Config, name: str, *, age_days: float, job: str | None = "done",
           export: str = "sent", n: int = 3, outside: Path | None = None) -> dict[str, list[Path]]:
    """A study of one series with ``n`` instances, its job and SR + SC results, all
    ``age_days`` old; returns its instance and result files."""
    study, series = f"1.2.{name}", f"1.2.{name}.1"
    t = NOW - age_days * DAY
    files = []
    for i in range(n):
        sop = f"{series}.{i}"
        p = (outside / f"{i}.dcm") if outside else instance_path(cfg.store_dir, study, series, sop)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x" * 1000)
        db.record_instance(sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                           study_uid=study, series_uid=series, path=str(p), size=1000,
                           source="replay" if outside else "scp")
        files.append(p)
    results: list[Path] = []
    if job is not None:
        job_id = db.enqueue_job(series)
        out = cfg.results_dir / series / f"job-{job_id}"
        out.mkdir(parents=True)
        for kind in ("SR", "SC"):
            r = out / f"{kind}.dcm"
            r.write_bytes(b"y" * 500)
            results.append(r)
        if job != "pending":
            db.record_job_outcome(
                job_id, series_uid=series, study_uid=study, status=job,
                findings=[{"protocol": "l1_attenuation", "site": "L1", "category": "normal",
                           "data": {"mean_hu": 170.0}}],
                results=[{"sop_instance_uid": f"{series}.9{k}", "sop_class_uid": "1.2", "kind": k,
                          "path": str(r)} for k, r in zip(("SR", "SC"), results)]
                if job == "done" else [],
                destinations=["outbox"])
            for e in db.exports():
                if e["path"] in {str(r) for r in results} and export == "sent":
                    db.update_export(e["id"], status="sent", sent_at=t)
    with db.transaction() as c:
        c.execute("update instances set received_at=? where study_uid=?", (t, study))
        c.execute("update jobs set created_at=?, finished_at=? where study_uid=?", (t, t, study))
        c.execute("update exports set created_at=? where result_id in"
                  " (select id from results where study_uid=?)", (t, study))
    return {"instances": files, "results": results}


@pytest.fixture
def site(tmp_path: Path) -> tuple[Config, dict[str, dict[str, list[Path]]]]:
    cfg = load_config(env={}, data_dir=tmp_path / "data")
    cfg.ensure_dirs()
    db = Database(cfg.db_path)
    studies = {
        "old_done": _study(db, cfg, "1", age_days=40),
        "old_unexported": _study(db, cfg, "2", age_days=40, export="pending"),
        "old_unprocessed": _study(db, cfg, "3", age_days=40, job=None),
        "old_failed": _study(db, cfg, "4", age_days=40, job="failed"),
        "old_queued": _study(db, cfg, "5", age_days=40, job="pending"),
        "recent_done": _study(db, cfg, "6", age_days=5),
        "old_replayed": _study(db, cfg, "7", age_days=40, outside=tmp_path / "archive"),
    }
    db.close()
    return cfg, studies


def test_only_finished_exported_old_studies_are_purged(site) -> None:  # noqa: ANN001
    cfg, studies = site
    plans = {p.study_uid: p for p in purge(cfg, 30, at=NOW)}
    assert {u: p.keep_reason for u, p in plans.items()} == {
        "1.2.1": "",
        "1.2.2": "results not yet exported (screener status lists them)",
        "1.2.3": "instances not yet processed",
        "1.2.4": "a job failed (kept so that it can be run again)",
        "1.2.5": "a job is pending or running",
        "1.2.6": "newer than the cut-off",
        "1.2.7": "",
    }
    gone = studies["old_done"]
    assert not any(p.exists() for p in gone["instances"] + gone["results"])
    assert not (cfg.store_dir / "1.2.1").exists()  # empty folders removed too
    assert not (cfg.results_dir / "1.2.1.1").exists()
    # the replayed study's source files are not ours: only its results go
    assert all(p.exists() for p in studies["old_replayed"]["instances"])
    assert not any(p.exists() for p in studies["old_replayed"]["results"])
    for key in ("old_unexported", "old_unprocessed", "old_failed", "old_queued", "recent_done"):
        assert all(p.exists() for p in studies[key]["instances"] + studies[key]["results"]), key
    db = Database(cfg.db_path)
    rows = {r["study_uid"]: r for r in db.iter_table("purges")}
    assert set(rows) == {"1.2.1", "1.2.7"}
    r = rows["1.2.1"]
    assert (r["instances"], r["results"], r["files"], r["bytes"], r["failed_files"],
            r["older_than_days"], r["at"]) == (3, 2, 5, 4000, 0, 30.0, NOW)
    assert (rows["1.2.7"]["instances"], rows["1.2.7"]["files"]) == (0, 2)
    # instance rows of purged files are gone (a re-sent study is screened again) ...
    assert db.series_instances("1.2.1.1") == [] and len(db.series_instances("1.2.7.1")) == 3
    # ... the findings and the export history stay
    assert [f["series_uid"] for f in db.findings()].count("1.2.1.1") == 1
    db.close()
    # a second run has nothing more to delete
    again = {p.study_uid: p for p in purge(cfg, 30, at=NOW)}
    assert not any(p.purgeable for p in again.values())


def test_dry_run_deletes_and_records_nothing(site, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    cfg, studies = site
    plans = purge(cfg, 30, dry_run=True, at=NOW)
    assert sorted(p.study_uid for p in plans if p.purgeable) == ["1.2.1", "1.2.7"]
    assert all(p.exists() for s in studies.values() for p in s["instances"] + s["results"])
    db = Database(cfg.db_path)
    assert list(db.iter_table("purges")) == []
    db.close()


def test_purge_command_prints_what_went_and_why_the_rest_stayed(
        site, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    cfg, _ = site
    monkeypatch.setattr("screener.purge.time.time", lambda: NOW)
    assert cli.main(["purge", "--older-than", "30", "--dry-run", "--data-dir",
                     str(cfg.data_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["would", "purge", "1.2.1", "3", "instances", "2", "results", "0.0",
                              "MB", "last", "activity", "40", "days", "ago"]
    assert out[2:] == [
        "2 of 7 studies would purge (0.0 MB): finished, last activity more than 30 days ago",
        "kept 1 older study: a job failed (kept so that it can be run again)",
        "kept 1 older study: a job is pending or running",
        "kept 1 older study: instances not yet processed",
        "kept 1 older study: results not yet exported (screener status lists them)"]
    assert cli.main(["purge", "--older-than", "30", "--data-dir", str(cfg.data_dir)]) == 0
    assert capsys.readouterr().out.splitlines()[2].startswith("2 of 7 studies purged")


def test_purge_usage_errors_are_one_line(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["purge", "--older-than", "-1", "--data-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == ("screener purge: --older-than must be 0 days or more, "
                                       "not -1\n")
    afile = tmp_path / "f"
    afile.write_text("")
    assert cli.main(["purge", "--older-than", "30", "--data-dir", str(afile)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert cli.main(["purge", "--older-than", "30", "--data-dir", str(tmp_path / "new")]) == 2
    assert capsys.readouterr().err.startswith(
        f"screener purge: no database at {tmp_path / 'new' / 'screener.db'}: nothing received")
