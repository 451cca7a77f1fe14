"""Series completion: a series is "complete" after ``quiet_seconds`` without a new instance.

Completion is only a guess (DICOM has no end-of-series signal), so it is an
explicit, configurable policy: every few seconds an apscheduler job queues a
processing job for each series that is quiet and has instances not yet
covered by a job. Instances of an already processed series arriving later
make it eligible again: a new job runs and its SR supersedes the previous one.
"""
from __future__ import annotations

import time
from typing import Callable

import structlog
from apscheduler.schedulers.background import BackgroundScheduler

from screener.config import Config
from screener.db import Database, now
from screener.logs import FailureState

log = structlog.get_logger(__name__)


class CompletionMonitor:
    """Queue jobs for series that have gone quiet.

    Parameters
    ----------
    db : Database
    config : Config
        ``quiet_seconds`` is the completion policy.
    interval : float, optional
        Seconds between checks; default a quarter of ``quiet_seconds``,
        clamped to 0.2-5 s.
    on_enqueue : callable, optional
        Called with each new job id (e.g. ``WorkerPool.wake``).
    """

    def __init__(self, db: Database, config: Config, interval: float | None = None,
                 on_enqueue: Callable[[int], None] | None = None) -> None:
        self.db = db
        self.config = config
        self.interval = interval if interval is not None else min(5.0, max(0.2, config.quiet_seconds / 4))
        self.on_enqueue = on_enqueue
        self._scheduler: BackgroundScheduler | None = None
        self.state = FailureState("completion check", base=self.interval, maximum=60.0,
                                  logger=log)
        self._retry_at = 0.0

    def check(self, at: float | None = None) -> list[int]:
        """Queue a job for every quiet series with unprocessed instances.

        Parameters
        ----------
        at : float, optional
            The time to judge quietness at (UNIX seconds); default now.

        Returns
        -------
        list of int
            The ids of the jobs queued.
        """
        at = now() if at is None else at
        queued = []
        for s in self.db.series_needing_jobs(self.config.quiet_seconds, at=at):
            job_id = self.db.enqueue_job(s["series_uid"], source=s.get("source") or "scp")
            queued.append(job_id)
            log.info("series complete, job queued", series_uid=s["series_uid"],
                     study_uid=s["study_uid"], job_id=job_id, n_instances=s["n_instances"],
                     previously_processed=s["processed_instances"],
                     quiet_for=round(at - s["last_received_at"], 1))
            if self.on_enqueue:
                self.on_enqueue(job_id)
        return queued

    def _tick(self) -> None:
        """One scheduled check; while the database cannot be written (disk full) checks back
        off and the failure is logged once, and once more when it recovers."""
        if time.monotonic() < self._retry_at:
            return
        try:
            self.check()
        except Exception as exc:  # noqa: BLE001 - keep the schedule alive, say why
            self._retry_at = time.monotonic() + self.state.failed(exc)
            return
        self.state.ok()

    def start(self) -> None:
        """Run :meth:`check` every ``interval`` seconds in a background thread."""
        if self._scheduler is not None:
            return
        sched = BackgroundScheduler(daemon=True)
        sched.add_job(self._tick, "interval", seconds=self.interval, max_instances=1,
                      coalesce=True, id="series-completion")
        sched.start()
        self._scheduler = sched
        log.info("completion monitor started", quiet_seconds=self.config.quiet_seconds,
                 interval=self.interval)

    def stop(self) -> None:
        """Stop the schedule (waits for a running check)."""
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)
            self._scheduler = None
