"""``/healthz`` and Prometheus ``/metrics`` of ``screener serve`` (off unless ``health_port`` is set).

A small stdlib HTTP server on ``health_host:health_port`` (default ``127.0.0.1``, so only the
host itself — a local Prometheus agent or a load balancer's probe through a proxy — can ask):

``GET /healthz``
    200 ``{"status": "ok", ...}`` while the database answers and the DICOM listener runs;
    503 with the failing part otherwise.
``GET /metrics``
    Prometheus text format 0.0.4: queue depth, jobs by state, exports by state, export backlog,
    time of the last processed series and of the last export, received instances, refusals
    and rejected associations. No UIDs, no patient data.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import structlog

from screener import __version__
from screener.db import JOB_STATES, Database

log = structlog.get_logger(__name__)

EXPORT_STATES = ("pending", "sent", "failed")


def _num(v: float) -> str:
    """A sample value at full precision (``:g`` would print 1.8e+09 for a timestamp)."""
    v = float(v)
    return str(int(v)) if v.is_integer() else repr(v)


def _gauge(name: str, help_: str, values: dict[str, float] | float, label: str = "",
           kind: str = "gauge") -> list[str]:
    lines = [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
    if isinstance(values, dict):
        lines += [f'{name}{{{label}="{k}"}} {_num(v)}' for k, v in values.items()]
    else:
        lines.append(f"{name} {_num(values)}")
    return lines


def metrics_text(db: Database) -> str:
    """The Prometheus exposition of the service's state.

    Parameters
    ----------
    db : Database

    Returns
    -------
    str
        Text format 0.0.4, one metric family per block, ending with a newline.
    """
    c = db.counts()
    with db.lock:
        conn = db._conn  # noqa: SLF001 - read-only aggregate queries under the database lock
        last_job = conn.execute("select max(finished_at) from jobs where status in"
                                " ('done', 'skipped')").fetchone()[0]
        last_export = conn.execute("select max(sent_at) from exports where status='sent'"
                                   ).fetchone()[0]
    jobs = {s: float(c["jobs"].get(s, 0)) for s in JOB_STATES}
    exports = {s: float(c["exports"].get(s, 0)) for s in EXPORT_STATES}
    lines: list[str] = []
    lines += _gauge("screener_up", "1 while the service answers.", 1)
    lines += ["# HELP screener_build_info Version of the running screener.",
              "# TYPE screener_build_info gauge", f'screener_build_info{{version="{__version__}"}} 1']
    lines += _gauge("screener_queue_depth", "Series jobs waiting to run (pending).",
                    jobs["pending"])
    lines += _gauge("screener_jobs", "Series jobs by state.", jobs, "state")
    lines += _gauge("screener_exports", "Result exports by state (one per file and destination).",
                    exports, "state")
    lines += _gauge("screener_export_backlog", "Result exports not yet delivered (pending).",
                    exports["pending"])
    lines += _gauge("screener_last_success_timestamp_seconds",
                    "UNIX time of the last series processed (job) and of the last result "
                    "delivered (export); 0 = never.",
                    {"job": float(last_job or 0), "export": float(last_export or 0)}, "what")
    lines += _gauge("screener_instances", "Received instances recorded (purged ones leave).",
                    float(c["instances"]))
    lines += _gauge("screener_rejections_total", "Instances refused with a C-STORE error status.",
                    float(c["rejections"]), kind="counter")
    lines += _gauge("screener_rejected_associations_total",
                    "Associations rejected (calling or called AE title not accepted).",
                    float(c["rejected_associations"]), kind="counter")
    return "\n".join(lines) + "\n"


def health(db: Database, listener_up: Callable[[], bool] | None = None
           ) -> tuple[int, dict[str, Any]]:
    """The ``/healthz`` answer.

    Parameters
    ----------
    db : Database
    listener_up : callable, optional
        Whether the DICOM listener still runs.

    Returns
    -------
    status : int
        200 or 503.
    body : dict
        ``status`` (``ok`` / ``failing``), ``database``, ``listener``, ``version``.
    """
    body: dict[str, Any] = {"status": "ok", "version": __version__}
    try:
        with db.lock:
            db._conn.execute("select count(*) from jobs").fetchone()  # noqa: SLF001
        body["database"] = "ok"
    except Exception as exc:  # noqa: BLE001 - any failure is "unhealthy", said in words
        body["database"] = f"failing: {type(exc).__name__}: {exc}"
        body["status"] = "failing"
    if listener_up is not None:
        up = bool(listener_up())
        body["listener"] = "up" if up else "down"
        if not up:
            body["status"] = "failing"
    return (200 if body["status"] == "ok" else 503), body


@dataclass
class HealthServer:
    """A running health / metrics endpoint (see :func:`start_health_server`)."""

    server: ThreadingHTTPServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        """The listening port."""
        return int(self.server.server_address[1])

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def start_health_server(host: str, port: int, db: Database,
                        listener_up: Callable[[], bool] | None = None) -> HealthServer:
    """Serve ``/healthz`` and ``/metrics`` in a background thread.

    Parameters
    ----------
    host : str
        Address to bind (``127.0.0.1`` by default in the config: local only).
    port : int
        TCP port; 0 picks a free one (tests).
    db : Database
    listener_up : callable, optional
        Whether the DICOM listener runs (``/healthz`` answers 503 when not).

    Returns
    -------
    HealthServer

    Raises
    ------
    OSError
        The address cannot be bound (port in use, no such address).
    """

    class Handler(BaseHTTPRequestHandler):
        server_version = f"screener/{__version__}"

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                status, body = health(db, listener_up)
                self._send(status, "application/json", json.dumps(body) + "\n")
            elif path == "/metrics":
                try:
                    text = metrics_text(db)
                except Exception as exc:  # noqa: BLE001
                    self._send(503, "text/plain", f"metrics unavailable: {exc}\n")
                    return
                self._send(200, "text/plain; version=0.0.4; charset=utf-8", text)
            else:
                self._send(404, "text/plain", "not found: GET /healthz or /metrics\n")

        def _send(self, status: int, ctype: str, text: str) -> None:
            data = text.encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass  # probes every few seconds would flood the journal

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5},
                              name="screener-health", daemon=True)
    thread.start()
    srv = HealthServer(server=server, thread=thread)
    log.info("health endpoint listening", host=host, port=srv.port,
             paths=["/healthz", "/metrics"])
    return srv
