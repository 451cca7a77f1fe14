"""Where ``screener replay`` runs its series: threads, a process pool, or a Dask cluster.

The walk of the folder and the database stay with the caller (the *client*); a series travels to a
worker as a :class:`SeriesTask` (its files, its output folder, the SR it supersedes, the
configuration), the worker runs the pipeline (:func:`compute_series`) and hands back a
:class:`SeriesOutcome` (status, router decisions, finding rows, output rows), and the client records
it in one transaction (:func:`record_outcome`) exactly as :func:`screener.worker.run_job` does in
the daemon: the same rows, so ``screener results`` and the exporter see no difference.

Executors
---------
``threads``
    :func:`screener.worker.run_job` on ``N`` threads of this process (the Python-level work holds
    the GIL, so this is about one core).
``processes`` (the command's default)
    A pool of ``N`` worker processes; each loads the configured protocols' model bundles once, in
    its initializer (:func:`warm_worker`), and keeps them, and runs torch on one thread
    (:data:`WORKER_TORCH_THREADS`), so its numbers do not depend on the worker count.  A worker
    that dies (killed, out of memory) breaks the pool: a new pool is started and the series that
    were running are sent again, up to :data:`MAX_ATTEMPTS` times each, then recorded as failed.
``dask``
    A ``dask.distributed`` cluster (``--scheduler tcp://HOST:8786``): a worker plugin
    (:func:`bundle_plugin`) loads the bundles once per worker process (torch on one thread, as
    above); the scheduler reruns the
    series of a worker that dies on another worker (``distributed.scheduler.allowed-failures``
    times, then it is recorded as failed).  The workers must see the archive, the models and the
    data directory's ``results/`` at the same paths as the client (a shared file system), and
    have the screener installed.

Every executor: a series whose pipeline raises is recorded as failed with the error and the others
go on; a second run skips what is done (the caller's walk decides what is to do).
"""
from __future__ import annotations

import os
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import structlog

from screener.config import Config
from screener.db import Database

log = structlog.get_logger(__name__)

__all__ = ["EXECUTORS", "MAX_ATTEMPTS", "WORKER_TORCH_THREADS", "ProcessRunner", "SeriesOutcome", "SeriesTask", "bundle_plugin", "compute_series",
           "prepare_task", "record_outcome", "run_dask", "run_processes", "run_threads", "warm_worker"]

EXECUTORS = ("threads", "processes", "dask")
#: times a series is sent to a process worker that then dies before it is recorded as failed
MAX_ATTEMPTS = 3
#: torch threads of a worker process: one, so that a series' numbers are the same to the last bit
#: whichever executor and however many workers ran it (a network's float32 sums depend on the
#: thread count: 1e-7 apart in a BMD between 1 and 2 threads); the workers share out the cores
WORKER_TORCH_THREADS = 1


@dataclass(frozen=True)
class SeriesTask:
    """One series to process, as it travels to a worker (picklable).

    Attributes
    ----------
    job_id : int
    series_uid, study_uid : str
    paths : list of str
        The series' instance files (present when the task was made).
    out_dir : str
        Where the worker writes the SR and SC objects (``results/<series>/job-<id>``).
    supersedes : str or None
        The previous SR's file (the new SR lists it as its predecessor).
    previous_sr_uid : str
        Its SOP Instance UID (``""`` when there is none).
    config : Config
    process : str or None
        ``"module:function"`` of the pipeline (default :func:`screener.pipeline.process_series`).
    """

    job_id: int
    series_uid: str
    study_uid: str
    paths: list[str]
    out_dir: str
    supersedes: str | None
    previous_sr_uid: str
    config: Config
    process: str | None = None


@dataclass
class SeriesOutcome:
    """What a worker made of a :class:`SeriesTask` (picklable), recorded by :func:`record_outcome`.

    Attributes
    ----------
    job_id : int
    status : str
        ``done``, ``skipped`` or ``failed``.
    reason : str
    error : str
        For a failure: the pipeline's reason, or ``"Type: message"`` of the exception it raised.
    raised : bool
        The pipeline raised (recorded like :func:`screener.worker.run_job` records an exception:
        the job failed, nothing else).
    decisions, findings, results : list
        Rows for :meth:`screener.db.Database.record_job_outcome`.
    seconds : float
    worker : str
        Which process ran it (``host:pid``).
    """

    job_id: int
    status: str
    reason: str = ""
    error: str = ""
    raised: bool = False
    decisions: list[tuple[str, bool, str]] = field(default_factory=list)
    findings: list[dict[str, Any]] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    worker: str = ""


# ----------------------------------------------------------------------------- client side

def prepare_task(job: dict[str, Any], db: Database, config: Config,
                 process: str | None = None) -> SeriesTask | None:
    """The task of a queued job, or ``None`` when the job was settled here without a worker.

    The same checks as :func:`screener.worker.run_job` before the pipeline, by the same function
    (:func:`screener.worker.prepare_job`): a finished job is left alone; a series with no stored
    file fails; a series that is not quantitative (lossy, 8-bit) is skipped with the reason.

    Parameters
    ----------
    job : dict
        A row of the ``jobs`` table.
    db : Database
    config : Config
    process : str, optional
        ``"module:function"`` of the pipeline.

    Returns
    -------
    SeriesTask or None
    """
    from screener.worker import prepare_job

    ready = prepare_job(job, db, config)
    if ready is None:
        return None
    paths, out_dir, prev = ready
    job_id, series_uid = int(job["id"]), str(job["series_uid"])
    study_uid = str(job.get("study_uid") or "")
    return SeriesTask(job_id=job_id, series_uid=series_uid, study_uid=study_uid, paths=[str(p) for p in paths],
                      out_dir=str(out_dir), supersedes=str(prev["path"]) if prev else None,
                      previous_sr_uid=str(prev["sop_instance_uid"]) if prev else "", config=config,
                      process=process)


def record_outcome(task: SeriesTask, outcome: SeriesOutcome, db: Database, config: Config) -> None:
    """Record a worker's outcome in one transaction, as :func:`screener.worker.run_job` would have.

    Parameters
    ----------
    task : SeriesTask
    outcome : SeriesOutcome
    db : Database
    config : Config
        Its destinations are where the results are queued for export.
    """
    from screener.worker import export_destinations

    if outcome.raised:
        db.finish_job(task.job_id, "failed", error=outcome.error[:2000])
        log.error("job failed", job_id=task.job_id, series_uid=task.series_uid, error=outcome.error,
                  worker=outcome.worker)
        return
    db.record_job_outcome(task.job_id, series_uid=task.series_uid, study_uid=task.study_uid,
                          status=outcome.status, reason=outcome.reason, error=outcome.error,
                          decisions=outcome.decisions, findings=outcome.findings, results=outcome.results,
                          destinations=export_destinations(config))
    log.info("job finished", job_id=task.job_id, series_uid=task.series_uid, status=outcome.status,
             reason=outcome.reason, n_instances=len(task.paths), results=len(outcome.results),
             seconds=round(outcome.seconds, 2), worker=outcome.worker)


def _lost(task: SeriesTask, why: str) -> SeriesOutcome:
    return SeriesOutcome(job_id=task.job_id, status="failed", error=why, raised=True)


# ----------------------------------------------------------------------------- worker side

def warm_worker(config: Config, torch_threads: int | None = None) -> list[str]:
    """Load the model bundles of the configured protocols into this process's cache, once.

    The pipeline's protocols take their bundles from a per-process cache
    (:meth:`screener.protocols.model.ModelProtocol.load_bundle`), so a worker that has run this
    never loads them again.  A bundle that is missing or unusable is left to the protocol, which
    declines with the reason when a series needs it.

    Parameters
    ----------
    config : Config
    torch_threads : int, optional
        Threads torch may use in this process (workers sharing a machine should split its cores).

    Returns
    -------
    list of str
        ``name@version`` of the bundles loaded.
    """
    from screener.logs import configure_logging
    from screener.protocols import default_protocols
    from screener.protocols.base import ProtocolContext, ProtocolDeclined

    configure_logging(config.log_level)  # to standard error, never into the client's summary on stdout
    if torch_threads:
        import torch

        torch.set_num_threads(int(torch_threads))
    loaded = []
    context = ProtocolContext(config=config, info=None)  # type: ignore[arg-type] - bundles need only the config
    for p in default_protocols(config.protocols):
        if not hasattr(p, "load_bundle"):
            continue
        try:
            b = p.load_bundle(context)
        except ProtocolDeclined:
            continue
        loaded.append(f"{p.name}@{getattr(b, 'version', '')}")
    log.info("worker ready", pid=os.getpid(), bundles=loaded)
    return loaded


def compute_series(task: SeriesTask) -> SeriesOutcome:
    """Run the pipeline on one series (in a worker) and turn its result into database rows.

    Never raises for a pipeline error: the outcome says ``raised`` with ``"Type: message"``.

    Parameters
    ----------
    task : SeriesTask

    Returns
    -------
    SeriesOutcome
    """
    import socket

    from screener.worker import job_outcome, load_process

    t0 = time.perf_counter()
    where = f"{socket.gethostname()}:{os.getpid()}"
    try:
        process = load_process(task.process)
        result = process([Path(p) for p in task.paths], config=task.config, out_dir=Path(task.out_dir),
                         supersedes=task.supersedes)
        out = job_outcome(result, task.previous_sr_uid or "")
        return SeriesOutcome(job_id=task.job_id, status=out.status, reason=out.reason, error=out.error,
                             decisions=out.decisions, findings=out.findings, results=out.results,
                             seconds=time.perf_counter() - t0, worker=where)
    except Exception as exc:  # noqa: BLE001 - one series' failure never stops the others
        log.debug("job failure traceback", job_id=task.job_id, traceback=traceback.format_exc())
        return SeriesOutcome(job_id=task.job_id, status="failed", error=f"{type(exc).__name__}: {exc}",
                             raised=True, seconds=time.perf_counter() - t0, worker=where)


# ----------------------------------------------------------------------------- executors

OnDone = Callable[[SeriesTask, SeriesOutcome], None]


def run_threads(job_ids: Iterable[int], db: Database, config: Config, workers: int,
                on_done: Callable[[int], None], process: str | None = None) -> None:
    """:func:`screener.worker.run_job` on ``workers`` threads of this process (replay before issue 21).

    Parameters
    ----------
    job_ids : iterable of int
    db : Database
    config : Config
    workers : int
    on_done : callable
        ``on_done(job_id)`` as each job is recorded.
    process : str, optional
        ``"module:function"`` of the pipeline.
    """
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from screener.worker import load_process, run_job

    fn = load_process(process)

    def _run(job_id: int) -> int:
        job = db.get_job(job_id)
        run_job(job, db, config, process=fn)
        return job_id

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for fut in as_completed([pool.submit(_run, j) for j in job_ids]):
            on_done(fut.result())


def _context() -> Any:
    """Worker processes forked from a server that has imported torch and the pipeline once.

    Not ``fork``: a forked copy of a process that has run torch can hang.  Not ``spawn``: every
    worker would import torch and the pipeline itself (seconds each, all at once on a busy machine)."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "screener.pipeline", "screener.protocols", "screener.executors"])
    return ctx


class ProcessRunner:
    """A pool of ``workers`` processes that keep their bundles (module docstring), started ahead of
    the work: :meth:`start` launches the workers at once, so they load their bundles while the
    client is still walking the archive.

    At most ``workers`` series are in flight, so a pool that breaks (a worker died) names the
    series that may have caused it: each is sent again to a new pool, up to :data:`MAX_ATTEMPTS`
    times, then handed to ``on_done`` as failed ("worker died").

    Parameters
    ----------
    config : Config
    workers : int
    """

    def __init__(self, config: Config, workers: int) -> None:
        self.config = config
        self.workers = max(1, int(workers))
        self._pool: ProcessPoolExecutor | None = None

    def _new_pool(self) -> ProcessPoolExecutor:
        pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=_context(), initializer=warm_worker,
                                   initargs=(self.config, WORKER_TORCH_THREADS))
        for _ in range(self.workers):  # a worker process is started per task waiting for one: all now
            pool.submit(os.getpid)
        return pool

    def start(self) -> "ProcessRunner":
        """Start the workers (they load their bundles now); a second call does nothing."""
        if self._pool is None:
            self._pool = self._new_pool()
        return self

    def run(self, tasks: list[SeriesTask], on_done: OnDone) -> None:
        """Run the tasks; ``on_done(task, outcome)`` is called in this thread as each finishes.

        Parameters
        ----------
        tasks : list of SeriesTask
        on_done : callable
        """
        queue = list(tasks)
        attempts: dict[int, int] = {}
        while queue:
            pool = self.start()._pool
            assert pool is not None
            running: dict[Future[SeriesOutcome], SeriesTask] = {}
            broken = False
            while queue or running:
                while queue and len(running) < self.workers and not broken:
                    t = queue.pop(0)
                    attempts[t.job_id] = attempts.get(t.job_id, 0) + 1
                    running[pool.submit(compute_series, t)] = t
                done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for fut in done:
                    t = running.pop(fut)
                    try:
                        outcome = fut.result()
                    except BrokenProcessPool:
                        broken = True
                        if attempts[t.job_id] < MAX_ATTEMPTS:
                            log.warning("worker died, series sent again", job_id=t.job_id, attempt=attempts[t.job_id])
                            queue.insert(0, t)
                            continue
                        outcome = _lost(t, f"the worker process died {attempts[t.job_id]} times while processing "
                                           "this series (killed, or out of memory?)")
                    on_done(t, outcome)
                if broken and not running:
                    break
            if broken:
                pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None

    def close(self) -> None:
        """Stop the workers."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "ProcessRunner":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def run_processes(tasks: list[SeriesTask], config: Config, workers: int, on_done: OnDone) -> None:
    """Run tasks on a :class:`ProcessRunner` of ``workers`` processes, then stop it.

    Parameters
    ----------
    tasks : list of SeriesTask
    config : Config
    workers : int
    on_done : callable
        ``on_done(task, outcome)`` in this thread, as each series finishes.
    """
    with ProcessRunner(config, workers) as runner:
        runner.run(tasks, on_done)


def bundle_plugin(config: Config) -> Any:
    """A ``dask.distributed`` worker plugin that loads the bundles once when a worker starts
    (:func:`warm_worker`), so every series the worker runs finds them loaded.

    Parameters
    ----------
    config : Config

    Returns
    -------
    distributed.WorkerPlugin
    """
    from distributed.diagnostics.plugin import WorkerPlugin

    class BundlePlugin(WorkerPlugin):  # defined here: distributed is an optional dependency
        name = "screener-bundles"

        def __init__(self, config: Config) -> None:
            self.config = config

        def setup(self, worker: Any) -> None:
            warm_worker(self.config, torch_threads=WORKER_TORCH_THREADS)

    return BundlePlugin(config)


def run_dask(tasks: list[SeriesTask], config: Config, scheduler: Any, on_done: OnDone) -> None:
    """Run tasks on a ``dask.distributed`` cluster (module docstring).

    Parameters
    ----------
    tasks : list of SeriesTask
    config : Config
    scheduler : str or distributed.Client
        ``tcp://HOST:8786`` of a running scheduler (or a ``LocalCluster``'s address), or a client.
    on_done : callable
        ``on_done(task, outcome)`` in this thread, as each series finishes.
    """
    try:
        from distributed import Client, as_completed
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise RuntimeError("--executor dask needs dask.distributed: pip install 'screener[dask]'") from exc
    own = not isinstance(scheduler, Client)
    client = Client(scheduler) if own else scheduler
    try:
        client.register_plugin(bundle_plugin(config), name="screener-bundles")
        futures = {client.submit(compute_series, t, key=f"screener-series-{t.job_id}-{time.time_ns()}", pure=False): t
                   for t in tasks}
        for fut in as_completed(list(futures)):
            t = futures[fut]
            try:
                outcome = fut.result()
            except Exception as exc:  # noqa: BLE001 - KilledWorker after allowed-failures, lost scheduler
                outcome = _lost(t, f"dask could not run this series: {type(exc).__name__}: {exc}")
            on_done(t, outcome)
    finally:
        if own:
            client.close()
