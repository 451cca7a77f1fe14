"""``screener serve``: the daemon (SCP + completion + workers + exporter), wired in one place.

Start-up: configure logging, log the redacted effective configuration, remove
temp files of a crash, re-queue jobs a crash left ``running``, then start the
SCP, the completion monitor, the worker pool and the exporter. SIGTERM or
SIGINT stops accepting associations, lets a running job finish (up to
``--stop-timeout`` seconds; an unfinished job is re-queued next start) and
exits 0.

Access is strict by default: the daemon refuses to start (exit 2) while
``allowed_calling_aes`` is empty unless ``--allow-any-ae`` is given, and the
called AE title must be ours (see deploy/README.md).

Once the listener is up, one log line says which inference device the models run on
(``inference device``: cpu or cuda, and why) — e.g. that ``device = "auto"`` fell back to
the CPU because the service cannot see ``/dev/nvidia*``.
"""
from __future__ import annotations

import argparse
import signal
import sqlite3
import threading
from typing import Sequence

import structlog

from screener import __version__
from screener.completion import CompletionMonitor
from screener.config import ConfigError, find_config_path, load_config
from screener.db import Database
from screener.devices import inference_device
from screener.export import Exporter
from screener.ingest import start_scp
from screener.logs import LOG_FORMATS, configure_logging, resolve_log_format
from screener.storage import clean_tmp
from screener.worker import WorkerPool

log = structlog.get_logger(__name__)


def _log_inference_device(setting: str) -> None:
    """Log the ``inference device`` line (run in a thread: importing torch takes seconds)."""
    try:
        device, reason = inference_device(setting)
    except Exception as exc:  # noqa: BLE001 - a log line must never stop the daemon
        log.warning("inference device unknown", error=f"{type(exc).__name__}: {exc}")
        return
    (log.warning if "not usable" in reason else log.info)(
        "inference device", device=device, setting=setting, reason=reason)


def build_parser() -> argparse.ArgumentParser:
    """The ``screener serve`` argument parser."""
    p = argparse.ArgumentParser(
        prog="screener serve",
        description="Receive DICOM studies (C-STORE SCP), screen completed series and send "
                    "the results to PACS (or the outbox folder).")
    p.add_argument("--config", help="TOML configuration (default: $SCREENER_CONFIG or built-in "
                                    "defaults); see deploy/screener.toml")
    p.add_argument("--port", type=int, help="listening port (overrides the config)")
    p.add_argument("--ae-title", help="our AE title (overrides the config)")
    p.add_argument("--data-dir", help="data directory: database, store, outbox (overrides the "
                                      "config and $SCREENER_DATA_DIR)")
    p.add_argument("--allow-any-ae", action="store_true",
                   help="accept associations from any calling AE title; without it "
                        "allowed_calling_aes must list the senders (secure default)")
    p.add_argument("--pipeline", default=None,
                   help="alternative pipeline as 'module:function' (site plug-ins, tests); "
                        "default screener.pipeline:process_series")
    p.add_argument("--stop-timeout", type=float, default=60.0,
                   help="seconds a running job may take to finish on SIGTERM (default 60)")
    p.add_argument("--log-format", choices=LOG_FORMATS + ("console",), default=None,
                   help="log lines on stderr: human (default on a terminal) or json (default "
                        "otherwise: systemd, pipes); console is an alias of human")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the daemon until SIGTERM / SIGINT; returns the exit status.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments after ``serve``.

    Returns
    -------
    int
        0 after a clean stop, 2 for an invalid configuration (including an empty
        ``allowed_calling_aes`` without ``--allow-any-ae``), 1 when the listener
        cannot start.
    """
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    json_logs = resolve_log_format(args.log_format) == "json"
    try:
        config = load_config(find_config_path(args.config), port=args.port,
                             ae_title=args.ae_title, data_dir=args.data_dir,
                             allow_any_ae=args.allow_any_ae or None)
        configure_logging(config.log_level, json=json_logs)
        config.check_access_policy()
        config.check_data_dir()
    except (ConfigError, ValueError) as exc:
        configure_logging("info", json=json_logs)
        log.error("invalid configuration", error=str(exc))
        return 2
    log.info("screener serve starting", version=__version__, config=config.redacted())
    clean_tmp(config.tmp_dir)
    try:
        db = Database(config.db_path)
    except sqlite3.Error as exc:
        log.error("cannot open the database", path=str(config.db_path), error=str(exc),
                  hint="restore it from the backup (deploy/README.md, Backup) or move it aside")
        return 2
    requeued = db.requeue_running_jobs()
    if requeued:
        log.warning("jobs interrupted by a previous stop were re-queued", jobs=requeued)

    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("stop requested", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    exporter = Exporter(db, config)
    workers = WorkerPool(db, config, process=args.pipeline, on_finished=exporter.wake)
    completion = CompletionMonitor(db, config, on_enqueue=workers.wake)
    try:
        scp = start_scp(config, db)
    except (OSError, ValueError) as exc:
        log.error("cannot start the DICOM listener", host=config.host, port=config.port,
                  error=str(exc))
        db.close()
        return 1
    health = None
    if config.health_port:
        from screener.health import start_health_server
        try:
            health = start_health_server(config.health_host, config.health_port, db,
                                         listener_up=lambda: not getattr(scp, "_stopped", False))
        except OSError as exc:  # the DICOM service matters more: run on, say so once
            log.error("cannot start the health endpoint; running without it",
                      host=config.health_host, port=config.health_port, error=str(exc))
    exporter.start()
    workers.start()
    completion.start()
    log.info("screener serve ready", ae_title=config.ae_title, port=scp.port)
    threading.Thread(target=_log_inference_device, args=(config.device,),
                     name="screener-device-probe", daemon=True).start()
    while not stop.wait(1.0):
        pass
    log.info("stopping: no new associations")
    scp.stop()
    if health is not None:
        health.stop()
    completion.stop()
    if not workers.stop(args.stop_timeout):
        log.warning("a job was still running at stop; it will be re-queued at the next start")
    exporter.stop()
    db.close()
    log.info("screener serve stopped")
    return 0
