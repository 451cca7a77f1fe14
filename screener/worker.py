"""Job execution: run the pipeline on a queued series and record what it produced.

:func:`run_job` holds no network state, so ``screener replay`` calls it
directly. Everything a job produces (router decisions, findings, result
files, export queue entries) and its final state are recorded in ONE database
transaction (:meth:`Database.record_job_outcome`). Where a crash can happen:

* before that transaction: nothing of the job is recorded; at start-up
  ``requeue_running_jobs`` puts it back to pending and it runs again, writing
  into a fresh ``job-<id>`` folder (leftovers of the first attempt removed);
* after it: the job is ``done``/``skipped``/``failed`` and is never re-run;
  its exports are pending in the database and the exporter resumes them.

Findings are recorded only for a ``done`` job together with the SR that reports
them (:func:`job_outcome`): a failed job has no results.

So a killed daemon resumes, nothing is processed twice and nothing is lost.
"""
from __future__ import annotations

import importlib
import shutil
import threading
import time
import traceback
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable

import pydicom
import structlog

from screener.config import Config
from screener.db import Database
from screener.findings import Finding
from screener.logs import FailureState
from screener.pipeline import PipelineResult
from screener.storage import make_private_dir, sanitise_uid
from screener.validation import quantitative_problems

log = structlog.get_logger(__name__)

#: the pipeline's signature: ``process(paths, *, config, out_dir, supersedes) -> PipelineResult``
ProcessFn = Callable[..., PipelineResult]


def load_process(spec: str | None = None) -> ProcessFn:
    """Resolve the pipeline function.

    Parameters
    ----------
    spec : str, optional
        ``"package.module:function"``; default
        ``screener.pipeline:process_series``.

    Raises
    ------
    ValueError
        The spec is malformed or does not name a callable.
    """
    spec = spec or "screener.pipeline:process_series"
    module, _, func = spec.partition(":")
    if not module or not func:
        raise ValueError(f"pipeline {spec!r}: expected 'package.module:function'")
    fn = getattr(importlib.import_module(module), func, None)
    if not callable(fn):
        raise ValueError(f"pipeline {spec!r}: {func} is not a function of {module}")
    return fn


def export_destinations(config: Config) -> list[str]:
    """Export targets of every result: each destination's :attr:`~screener.destinations.Destination.key`
    (``AE@host:port`` or ``dicomweb+URL``), or ``["outbox"]``."""
    if config.destinations:
        return [d.key for d in config.destinations]
    return ["outbox"]


@dataclass
class JobOutcome:
    """What a job records (:meth:`Database.record_job_outcome`), read from a
    :class:`~screener.pipeline.PipelineResult`: the daemon's :func:`run_job` and replay's
    executors (:func:`screener.executors.compute_series`) record the same rows."""

    status: str
    reason: str
    decisions: list[tuple[str, bool, str]]
    findings: list[dict[str, Any]]
    results: list[dict[str, Any]]

    @property
    def error(self) -> str:
        """The job's error: its reason when it failed."""
        return self.reason if self.status == "failed" else ""


def job_outcome(result: PipelineResult, prev_sr_uid: str = "") -> JobOutcome:
    """The rows a pipeline result records; an SR supersedes ``prev_sr_uid`` (the series' last SR)
    unless the pipeline said which one it replaces. A status the pipeline should not give is a
    failure that says so."""
    status, reason = str(result.status), str(result.reason or "")
    if status not in ("done", "skipped", "failed"):
        reason, status = f"pipeline returned unknown status {status!r}; {reason}", "failed"
    results = []
    for o in result.outputs:
        supersedes = str(o.supersedes or "") or (prev_sr_uid if o.kind == "SR" else "")
        results.append({"sop_instance_uid": str(o.sop_instance_uid), "sop_class_uid": str(o.sop_class_uid),
                        "kind": str(o.kind), "path": str(o.path), "supersedes": supersedes})
    decisions = [(str(n), bool(a), str(r)) for n, a, r in result.decisions]
    return JobOutcome(status, reason, decisions, _reported_findings(result.findings, status, results), results)


def _reported_findings(found: list[Finding], status: str, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``findings`` rows of a pipeline result: only a ``done`` job whose SR was written has any.

    A finding becomes a result (``screener results``) only together with the SR that reports it;
    a job that failed after inference (e.g. the report could not be written) records none.
    """
    if status != "done" or not any(r["kind"] == "SR" for r in results):
        if found:
            log.warning("findings not recorded: no SR was written for them", status=status,
                        findings=len(found))
        return []
    return [{"protocol": f.protocol, "site": f.site, "category": f.category or "", "data": f.to_record()}
            for f in found]


def _not_quantitative(paths: list[Path]) -> list[str]:
    """Why a CT series cannot be measured in HU (lossy, 8-bit), from its first header."""
    try:
        ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - the pipeline's loader reports unreadable files
        return []
    return quantitative_problems(ds)


def prepare_job(job: dict[str, Any], db: Database, config: Config
                ) -> tuple[list[Path], Path, dict[str, Any] | None] | None:
    """What a job needs before the pipeline runs, or ``None`` when it is settled without it.

    A finished job is left alone; a series with no stored file fails; a series that is not
    quantitative (lossy, 8-bit) is skipped with the reason (each recorded here). Otherwise the
    output folder ``results/<series>/job-<id>`` is made afresh (leftovers of an attempt interrupted
    by a crash removed).

    Returns
    -------
    (paths, out_dir, previous SR row) or None
        The series' stored files, the output folder and the series' latest SR (``None`` if none).
    """
    job_id, series_uid = int(job["id"]), str(job["series_uid"])
    current = db.get_job(job_id)
    if current is not None and current["status"] in ("done", "skipped", "failed"):
        log.info("job already finished, not re-run", job_id=job_id, status=current["status"])
        return None
    paths = [Path(r["path"]) for r in db.series_instances(series_uid)]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        log.warning("stored files missing, processing the rest", job_id=job_id,
                    series_uid=series_uid, missing=len(missing))
        paths = [p for p in paths if p.is_file()]
    if not paths:
        db.finish_job(job_id, "failed", error="no stored instance files for this series")
        log.error("job failed: no files", job_id=job_id, series_uid=series_uid)
        return None
    not_quantitative = _not_quantitative(paths)
    if not_quantitative:
        reason = (f"series not quantitative: {'; '.join(not_quantitative)}; send the "
                  "original (lossless, 12/16-bit) series")
        db.record_job_outcome(job_id, series_uid=series_uid, study_uid=str(job.get("study_uid") or ""),
                              status="skipped", reason=reason)
        log.info("job finished", job_id=job_id, series_uid=series_uid, status="skipped",
                 reason=reason, n_instances=len(paths))
        return None
    out_dir = config.results_dir / sanitise_uid(series_uid) / f"job-{job_id}"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    make_private_dir(out_dir)
    return paths, out_dir, db.latest_sr(series_uid)


def run_job(job: dict[str, Any], db: Database, config: Config,
            process: ProcessFn | None = None) -> None:
    """Process one claimed job and record its outcome; never raises for pipeline errors.

    Parameters
    ----------
    job : dict
        A row of the ``jobs`` table (as returned by ``Database.claim_job``).
    db : Database
    config : Config
        ``results_dir`` (outputs go to ``results/<series>/job-<id>/``) and
        ``destinations`` (where results are queued for export).
    process : callable, optional
        ``process_series(paths, *, config, out_dir, supersedes) -> PipelineResult``;
        default ``screener.pipeline.process_series``.
    """
    job_id, series_uid = int(job["id"]), str(job["series_uid"])
    study_uid = str(job.get("study_uid") or "")
    t0 = time.perf_counter()
    try:
        process = process or load_process()
        ready = prepare_job(job, db, config)
        if ready is None:
            return
        paths, out_dir, prev = ready
        result = process(paths, config=config, out_dir=out_dir,
                         supersedes=prev["path"] if prev else None)
        out = job_outcome(result, str(prev["sop_instance_uid"]) if prev else "")
        status, reason = out.status, out.reason
        ids = db.record_job_outcome(
            job_id, series_uid=series_uid, study_uid=study_uid, status=status, reason=reason,
            error=out.error, decisions=out.decisions, findings=out.findings, results=out.results,
            destinations=export_destinations(config))
        log.info("job finished", job_id=job_id, series_uid=series_uid, status=status,
                 reason=reason, n_instances=len(paths), results=len(ids),
                 seconds=round(time.perf_counter() - t0, 2))
    except Exception as exc:  # noqa: BLE001 - a job failure must never stop the daemon
        error = f"{type(exc).__name__}: {exc}"
        # one line for the operator; the traceback (for a developer) only at debug level
        log.error("job failed", job_id=job_id, series_uid=series_uid, error=error)
        log.debug("job failure traceback", job_id=job_id, traceback=traceback.format_exc())
        try:
            db.finish_job(job_id, "failed", error=error[:2000])
        except Exception as rec:  # noqa: BLE001 - e.g. disk full: re-queued by the pool
            log.error("could not record the job failure", job_id=job_id,
                      error=f"{type(rec).__name__}: {rec}")


class WorkerPool:
    """``n`` threads that claim pending jobs and run them.

    Parameters
    ----------
    db : Database
    config : Config
        ``workers`` threads unless ``n`` is given.
    process : callable or str, optional
        The pipeline function, or its ``"module:function"`` spec; resolved on
        the first job so start-up does not pay for the pipeline's imports.
    on_finished : callable, optional
        Called with the job id after each job (e.g. ``Exporter.wake``).
    poll_interval : float
        Seconds an idle worker sleeps unless woken by :meth:`wake`.
    """

    def __init__(self, db: Database, config: Config, process: ProcessFn | str | None = None,
                 n: int | None = None, on_finished: Callable[[int], None] | None = None,
                 poll_interval: float = 1.0) -> None:
        self.db, self.config = db, config
        self.n = max(1, int(n if n is not None else config.workers))
        self._process = process
        self._resolved: ProcessFn | None = None
        self._resolve_lock = threading.Lock()
        self.on_finished = on_finished
        self.poll_interval = poll_interval
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._stuck: set[int] = set()
        self._stuck_lock = threading.Lock()
        self.state = FailureState("job queue", base=poll_interval, maximum=60.0, logger=log)

    def _get_process(self) -> ProcessFn:
        with self._resolve_lock:
            if self._resolved is None:
                p = self._process
                self._resolved = p if callable(p) else load_process(p)
            return self._resolved

    def wake(self, *_: Any) -> None:
        """Make idle workers look for a job now."""
        self._wake.set()

    def _claim(self) -> dict[str, Any] | None:
        """Re-queue jobs whose outcome could not be recorded, then claim the next job.

        While the database cannot be written (disk full) this backs off and the
        failure is logged once, and once more when it recovers (:class:`FailureState`).
        """
        try:
            with self._stuck_lock:
                for job_id in list(self._stuck):
                    self.db.requeue_job(job_id)
                    self._stuck.remove(job_id)
            job = self.db.claim_job()
        except Exception as exc:  # noqa: BLE001 - e.g. "database or disk is full"
            with self._stuck_lock:
                delay = self.state.failed(exc)
            self._stop.wait(delay)
            return None
        with self._stuck_lock:
            self.state.ok()
        return job

    def _loop(self) -> None:
        while not self._stop.is_set():
            job = self._claim()
            if job is None:
                self._wake.wait(self.poll_interval)
                self._wake.clear()
                continue
            log.info("job started", job_id=job["id"], series_uid=job["series_uid"],
                     attempt=job["attempts"])
            try:
                process = self._get_process()
            except Exception as exc:  # noqa: BLE001 - e.g. the pipeline cannot be imported
                log.error("pipeline unavailable", job_id=job["id"],
                          error=f"{type(exc).__name__}: {exc}")
                self.db.finish_job(job["id"], "failed",
                                   error=f"pipeline unavailable: {type(exc).__name__}: {exc}")
                continue
            run_job(job, self.db, self.config, process=process)
            self._check_recorded(int(job["id"]))
            if self.on_finished:
                self.on_finished(int(job["id"]))

    def _check_recorded(self, job_id: int) -> None:
        """A job still ``running`` after :func:`run_job` could not record its outcome (disk
        full): it is re-queued as soon as the database can be written again."""
        try:
            row = self.db.get_job(job_id)
        except Exception:  # noqa: BLE001
            row = None
        if row is None or row["status"] == "running":
            with self._stuck_lock:
                self._stuck.add(job_id)

    def start(self) -> None:
        """Start the worker threads."""
        for i in range(self.n):
            t = threading.Thread(target=self._loop, name=f"screener-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        log.info("workers started", workers=self.n)

    def stop(self, timeout: float = 60.0) -> bool:
        """Let running jobs finish (up to ``timeout`` s) and stop; ``False`` if one is still
        running (it stays ``running`` and is re-queued at the next start)."""
        self._stop.set()
        self._wake.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = any(t.is_alive() for t in self._threads)
        self._threads = [t for t in self._threads if t.is_alive()]
        return not alive
