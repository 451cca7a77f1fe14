"""Export of results: C-STORE SCU to PACS destinations, STOW-RS to DICOMweb destinations
(:mod:`screener.dicomweb`), or a filesystem outbox.

Every result file is queued once per destination (``exports`` table). The
exporter sends what is due; a failure schedules the next attempt with
exponential backoff (``export_backoff_seconds * 2**(attempts-1)``, capped at
``export_backoff_max_seconds``) stored in the database, so a PACS outage or a
daemon restart delays a result but never drops it. After
``export_max_attempts`` failures the export is marked ``failed`` with its
last error (``screener status`` shows it).
"""
from __future__ import annotations

import ssl
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

import pydicom
import structlog
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from screener.config import Config
from screener.destinations import Destination, parse_destination
from screener.db import Database, now
from screener.dicomweb import stow
from screener.storage import copy_atomic, sanitise_uid

log = structlog.get_logger(__name__)

#: C-STORE response statuses that mean "stored" (success and the storage warnings).
STORED_STATUSES = {0x0000, 0x0001, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007}


class Exporter:
    """Send due exports; run in the background with :meth:`start`.

    Parameters
    ----------
    db : Database
    config : Config
        ``ae_title`` (our calling AE), ``outbox_dir``, retry policy.
    interval : float
        Seconds between passes when not woken.
    """

    def __init__(self, db: Database, config: Config, interval: float = 1.0) -> None:
        self.db, self.config, self.interval = db, config, interval
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ policy
    def backoff(self, attempts: int) -> float:
        """Seconds before the next try after ``attempts`` failed attempts."""
        c = self.config
        return float(min(c.export_backoff_max_seconds,
                         c.export_backoff_seconds * 2 ** max(0, attempts - 1)))

    def _failed_attempt(self, row: dict[str, Any], error: str, at: float) -> str:
        attempts = int(row["attempts"]) + 1
        if attempts >= self.config.export_max_attempts:
            self.db.update_export(row["id"], status="failed", attempts=attempts, last_error=error)
            log.error("export failed for good", export_id=row["id"],
                      sop_instance_uid=row["sop_instance_uid"], destination=row["destination"],
                      attempts=attempts, error=error)
            return "failed"
        delay = self.backoff(attempts)
        self.db.update_export(row["id"], attempts=attempts, last_error=error,
                              next_attempt_at=at + delay)
        log.warning("export attempt failed, will retry", export_id=row["id"],
                    sop_instance_uid=row["sop_instance_uid"], destination=row["destination"],
                    attempts=attempts, retry_in=round(delay, 1), error=error)
        return "retry"

    def _sent(self, row: dict[str, Any]) -> str:
        self.db.update_export(row["id"], status="sent", attempts=int(row["attempts"]) + 1,
                              sent_at=now(), last_error="")
        log.info("result exported", export_id=row["id"], sop_instance_uid=row["sop_instance_uid"],
                 destination=row["destination"])
        return "sent"

    # ------------------------------------------------------------ sending
    def _to_outbox(self, row: dict[str, Any], at: float) -> str:
        src = Path(row["path"])
        try:
            res = self.db.get_result(int(row["result_id"])) if row.get("result_id") else None
            study = res["study_uid"] if res and res.get("study_uid") else \
                str(pydicom.dcmread(src, stop_before_pixels=True).StudyInstanceUID)
            dest = (self.config.outbox_dir / sanitise_uid(study)
                    / f"{sanitise_uid(row['sop_instance_uid'])}.dcm")
            copy_atomic(src, dest, self.config.tmp_dir)
        except Exception as exc:  # noqa: BLE001
            return self._failed_attempt(row, f"outbox copy failed: {type(exc).__name__}: {exc}", at)
        return self._sent(row)

    def _to_dicomweb(self, dest: Destination, rows: list[dict[str, Any]], at: float) -> dict[str, int]:
        """STOW-RS of the due files to ``dest``; each row is sent, retried or failed by the server's
        per-instance answer (an instance it does not confirm is retried)."""
        out: dict[str, int] = defaultdict(int)
        files: list[tuple[dict[str, Any], bytes]] = []
        for r in rows:
            try:
                files.append((r, Path(r["path"]).read_bytes()))
            except OSError as exc:
                out[self._failed_attempt(r, f"cannot read {r['path']}: {exc}", at)] += 1
        if not files:
            return out
        try:
            res = stow(dest.url, [data for _, data in files], timeout=60.0)
        except OSError as exc:  # unreachable, timeout, TLS
            for r, _ in files:
                out[self._failed_attempt(r, f"STOW-RS to {dest.url} failed: {exc}", at)] += 1
            return out
        for r, _ in files:
            uid = str(r["sop_instance_uid"])
            if uid in res.stored and uid not in res.failed:
                out[self._sent(r)] += 1
            elif uid in res.failed:
                out[self._failed_attempt(r, f"STOW-RS {res.message}: failure reason {res.failed[uid]}", at)] += 1
            else:
                out[self._failed_attempt(r, f"STOW-RS {res.message}: instance not confirmed stored", at)] += 1
        return out

    def _to_dicom(self, dest: Destination, rows: list[dict[str, Any]], at: float) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        destination, ae_title, host, port = dest.key, dest.ae_title, dest.host, dest.port
        datasets: list[tuple[dict[str, Any], Any]] = []
        contexts: dict[str, list[str]] = {}
        for r in rows:
            try:
                ds = pydicom.dcmread(r["path"])
            except Exception as exc:  # noqa: BLE001
                out[self._failed_attempt(r, f"cannot read {r['path']}: {exc}", at)] += 1
                continue
            ts = str(ds.file_meta.TransferSyntaxUID)
            syntaxes = contexts.setdefault(str(ds.SOPClassUID), [])
            for t in (ts, ExplicitVRLittleEndian, ImplicitVRLittleEndian):
                if t not in syntaxes:
                    syntaxes.append(t)
            datasets.append((r, ds))
        if not datasets:
            return out
        ae = AE(ae_title=self.config.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        for sop_class, syntaxes in contexts.items():
            ae.add_requested_context(sop_class, syntaxes)
        if dest.tls:
            try:
                tls_args = (client_ssl_context(self.config), host)
            except ValueError as exc:  # the configured PEM files cannot be read: retried, with the reason
                for r, _ in datasets:
                    out[self._failed_attempt(r, str(exc), at)] += 1
                return out
            assoc = ae.associate(host, port, ae_title=ae_title, tls_args=tls_args)
        else:
            assoc = ae.associate(host, port, ae_title=ae_title)
        if not assoc.is_established:
            why = ("rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted
                   else "no connection")
            for r, _ in datasets:
                out[self._failed_attempt(r, f"association with {destination} failed ({why})",
                                         at)] += 1
            return out
        try:
            for r, ds in datasets:
                try:
                    status = assoc.send_c_store(ds)
                except Exception as exc:  # noqa: BLE001 - e.g. no accepted context
                    out[self._failed_attempt(r, f"C-STORE not sent: {exc}", at)] += 1
                    continue
                code = int(getattr(status, "Status", -1)) if status else -1
                if code in STORED_STATUSES:
                    out[self._sent(r)] += 1
                elif code == -1:
                    out[self._failed_attempt(r, "no C-STORE response (association aborted or"
                                                " timed out)", at)] += 1
                else:
                    comment = str(status.get("ErrorComment", "") or "")
                    out[self._failed_attempt(r, f"C-STORE status 0x{code:04X} {comment}".strip(),
                                             at)] += 1
                if not assoc.is_established:
                    break
        finally:
            if assoc.is_established:
                assoc.release()
        # rows not attempted because the association dropped stay due: next pass
        return out

    def run_once(self, at: float | None = None) -> dict[str, int]:
        """Send every export that is due.

        Returns
        -------
        dict
            Counts of ``sent``, ``retry`` and ``failed`` in this pass.
        """
        at = now() if at is None else at
        counts: dict[str, int] = defaultdict(int)
        by_dest: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in self.db.due_exports(at):
            by_dest[row["destination"]].append(row)
        for dest, rows in by_dest.items():
            if dest == "outbox":
                for r in rows:
                    counts[self._to_outbox(r, at)] += 1
            else:
                try:
                    target = parse_destination(dest)
                except ValueError as exc:
                    for r in rows:
                        counts[self._failed_attempt(r, str(exc), at)] += 1
                    continue
                send = self._to_dicomweb if target.kind == "dicomweb" else self._to_dicom
                for k, v in send(target, rows, at).items():
                    counts[k] += v
        return dict(counts)

    # ------------------------------------------------------------ thread
    def wake(self, *_: Any) -> None:
        """Run a pass now (e.g. when a job finished)."""
        self._wake.set()

    def _loop(self) -> None:
        failing: str | None = None  # the error of the failing passes, logged once per change
        while not self._stop.is_set():
            try:
                self.run_once()
                if failing is not None:
                    log.info("export passes recovered", previous_error=failing)
                    failing = None
            except Exception as exc:  # noqa: BLE001 - keep exporting; say why, once per state
                err = f"{type(exc).__name__}: {exc}"
                if err != failing:
                    log.error("export pass failed; retrying every pass, logged again when the error "
                              "changes or clears", error=err)
                    failing = err
                log.debug("export pass failed", exc_info=True)
            self._wake.wait(self.interval)
            self._wake.clear()

    def start(self) -> None:
        """Start the background thread."""
        self._thread = threading.Thread(target=self._loop, name="screener-exporter", daemon=True)
        self._thread.start()
        log.info("exporter started", destinations=[d.key for d in self.config.destinations] or ["outbox"])

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the current pass."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None


def client_ssl_context(config: Config) -> ssl.SSLContext:
    """The TLS context the exporter uses for ``tls:AE@host:port`` destinations: the PACS's
    certificate checked against ``export_tls_ca`` (else the system's trusted CAs) and its host name,
    TLS 1.2 or later; with ``export_tls_cert`` / ``export_tls_key``, the screener's own certificate.

    Raises
    ------
    ValueError
        A configured PEM file cannot be read (the message names the config keys).
    """
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=config.export_tls_ca or None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if config.export_tls_cert:
            ctx.load_cert_chain(certfile=config.export_tls_cert, keyfile=config.export_tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"export TLS: cannot load export_tls_ca/export_tls_cert/export_tls_key: {exc}") from exc
    return ctx
