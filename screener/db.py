"""The screener's SQLite database (sqlite-utils): instances, series, jobs, results, exports.

One :class:`Database` per process. SQLite in WAL mode with ``synchronous=FULL``:
a row committed here survives a power cut, which is what lets the C-STORE
handler answer success only after its group's ``record_instances`` returned.

Tables
------
instances   one row per stored SOP instance (never a duplicate)
series      one row per series: counts, last arrival, source
jobs        pending -> running -> done / skipped / failed, with reason / error
decisions   per job, every protocol the router considered: accepted + reason
findings    per job, one row per finding (JSON measurements, flags, geometry)
results     per job, every DICOM object written (SR, SC), with what it supersedes
exports     per result file and destination: pending / sent / failed, attempts, backoff
rejections  every refused instance (and conflicting duplicate) with its status and reason
ignored     instances of storage classes the screener does not process (answered 0x0000)
rejected_associations  refused associations counted per calling AE and reason

A refusal that cannot be written (database or disk full) is kept in memory and
written with the next one that can, so every refusal is accounted for once
space returns.
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import sqlite_utils

JOB_STATES = ("pending", "running", "done", "skipped", "failed")


def now() -> float:
    """Current UNIX time (seconds)."""
    return time.time()


class Database:
    """Thread-safe access to the screener database.

    Parameters
    ----------
    path : path-like
        SQLite file; created with its tables when missing.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30.0,
                               isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=30000")
        try:  # findings and accession hashes are patient data: private, whatever the umask
            os.chmod(self.path, 0o600)
        except OSError:
            pass
        self._conn = conn
        self._unrecorded: list[dict[str, Any]] = []
        self.db = sqlite_utils.Database(conn)
        self.lock = threading.RLock()
        self._create()

    # ------------------------------------------------------------------ schema
    def _create(self) -> None:
        db = self.db
        with self.lock:
            if "instances" not in db.table_names():
                db["instances"].create({
                    "sop_instance_uid": str, "sop_class_uid": str, "study_uid": str,
                    "series_uid": str, "path": str, "transfer_syntax": str,
                    "calling_ae": str, "source": str, "received_at": float, "size": int,
                }, pk="sop_instance_uid")
                db["instances"].create_index(["series_uid"])
            if "series" not in db.table_names():
                db["series"].create({
                    "series_uid": str, "study_uid": str, "modality": str,
                    "accession_hash": str, "n_instances": int, "first_received_at": float,
                    "last_received_at": float, "source": str, "processed_instances": int,
                }, pk="series_uid")
            if "jobs" not in db.table_names():
                db["jobs"].create({
                    "id": int, "series_uid": str, "study_uid": str, "status": str,
                    "reason": str, "error": str, "n_instances": int, "created_at": float,
                    "started_at": float, "finished_at": float, "attempts": int, "source": str,
                }, pk="id")
                db["jobs"].create_index(["series_uid"])
                db["jobs"].create_index(["status"])
            if "decisions" not in db.table_names():
                db["decisions"].create({
                    "id": int, "job_id": int, "series_uid": str, "protocol": str,
                    "accepted": int, "reason": str,
                }, pk="id")
            if "findings" not in db.table_names():
                db["findings"].create({
                    "id": int, "job_id": int, "series_uid": str, "study_uid": str,
                    "protocol": str, "site": str, "category": str, "data": str,
                    "created_at": float,
                }, pk="id")
                db["findings"].create_index(["series_uid"])
            if "results" not in db.table_names():
                db["results"].create({
                    "id": int, "job_id": int, "series_uid": str, "study_uid": str,
                    "sop_instance_uid": str, "sop_class_uid": str, "kind": str, "path": str,
                    "supersedes": str, "created_at": float,
                }, pk="id")
                db["results"].create_index(["series_uid"])
            if "exports" not in db.table_names():
                db["exports"].create({
                    "id": int, "result_id": int, "path": str, "sop_instance_uid": str,
                    "destination": str, "status": str, "attempts": int,
                    "next_attempt_at": float, "last_error": str, "sent_at": float,
                    "created_at": float,
                }, pk="id")
                db["exports"].create_index(["status"])
            if "rejections" not in db.table_names():
                db["rejections"].create({
                    "id": int, "at": float, "sop_instance_uid": str, "calling_ae": str,
                    "status": int, "reason": str,
                }, pk="id")
            if "ignored" not in db.table_names():
                db["ignored"].create({
                    "sop_instance_uid": str, "sop_class_uid": str, "study_uid": str,
                    "series_uid": str, "calling_ae": str, "at": float,
                }, pk="sop_instance_uid")
            if "rejected_associations" not in db.table_names():
                db["rejected_associations"].create({
                    "calling_ae": str, "reason": str, "count": int, "first_at": float,
                    "last_at": float,
                }, pk=("calling_ae", "reason"))

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One SQLite transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``), rolled back on error.

        The connection runs in autocommit mode (``isolation_level=None``), where
        ``with conn:`` does *not* open a transaction; use this instead when
        several statements must be atomic. Not re-entrant.
        """
        with self.lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:  # e.g. COMMIT failed: "database or disk is full"
                    try:
                        self._conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                raise

    def close(self) -> None:
        """Close the connection."""
        with self.lock:
            self._conn.close()

    # --------------------------------------------------------------- instances
    def has_instance(self, sop_instance_uid: str) -> bool:
        """Whether this SOP instance is already stored."""
        with self.lock:
            return bool(list(self.db.query(
                "select 1 from instances where sop_instance_uid = ?", [sop_instance_uid])))

    def get_instance(self, sop_instance_uid: str) -> dict[str, Any] | None:
        """The instance row (path, size, ...) or ``None``."""
        with self.lock:
            rows = list(self.db.query("select * from instances where sop_instance_uid = ?",
                                      [sop_instance_uid]))
        return rows[0] if rows else None

    def record_instance(self, *, sop_instance_uid: str, sop_class_uid: str, study_uid: str,
                        series_uid: str, path: str, transfer_syntax: str = "",
                        calling_ae: str = "", source: str = "scp", modality: str = "",
                        accession_hash: str = "", size: int = 0) -> bool:
        """Record a durably stored instance and update its series.

        Returns
        -------
        bool
            ``True`` if the instance is new, ``False`` if it was already recorded.
        """
        return self.record_instances([dict(
            sop_instance_uid=sop_instance_uid, sop_class_uid=sop_class_uid, study_uid=study_uid,
            series_uid=series_uid, path=path, transfer_syntax=transfer_syntax,
            calling_ae=calling_ae, source=source, modality=modality,
            accession_hash=accession_hash, size=size)])[0]

    def record_instances(self, rows: Sequence[Mapping[str, Any]]) -> list[bool]:
        """Record several durably stored instances and update their series in ONE transaction
        (the group commit of the SCP: one SQLite commit, one WAL fsync, for all of them).

        Parameters
        ----------
        rows : sequence of mapping
            Each with the keyword arguments of :meth:`record_instance`
            (``sop_instance_uid``, ``sop_class_uid``, ``study_uid``, ``series_uid``,
            ``path``; optional ``transfer_syntax``, ``calling_ae``, ``source``,
            ``modality``, ``accession_hash``, ``size``).

        Returns
        -------
        list of bool
            Per row, ``True`` if the instance is new, ``False`` if it was already recorded.
            Either every row is committed or none (the error is raised).
        """
        t = now()
        out: list[bool] = []
        with self.lock:
            with self.transaction() as c:
                for r in rows:
                    source = r.get("source", "scp")
                    cur = c.execute(
                        "insert or ignore into instances (sop_instance_uid, sop_class_uid,"
                        " study_uid, series_uid, path, transfer_syntax, calling_ae, source,"
                        " received_at, size) values (?,?,?,?,?,?,?,?,?,?)",
                        (r["sop_instance_uid"], r["sop_class_uid"], r["study_uid"],
                         r["series_uid"], str(r["path"]), r.get("transfer_syntax", ""),
                         r.get("calling_ae", ""), source, t, int(r.get("size", 0))))
                    new = cur.rowcount == 1
                    out.append(new)
                    if new:
                        c.execute(
                            "insert into series (series_uid, study_uid, modality, accession_hash,"
                            " n_instances, first_received_at, last_received_at, source,"
                            " processed_instances) values (?,?,?,?,1,?,?,?,0)"
                            " on conflict(series_uid) do update set n_instances = n_instances + 1,"
                            " last_received_at = excluded.last_received_at",
                            (r["series_uid"], r["study_uid"], r.get("modality", ""),
                             r.get("accession_hash", ""), t, t, source))
        return out

    def instances_by_uid(self, sop_instance_uids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The recorded rows of these SOP Instance UIDs (missing ones are left out).

        Parameters
        ----------
        sop_instance_uids : sequence of str

        Returns
        -------
        dict
            SOP Instance UID -> instance row.
        """
        uids = list(dict.fromkeys(sop_instance_uids))
        out: dict[str, dict[str, Any]] = {}
        with self.lock:
            for i in range(0, len(uids), 500):
                part = uids[i:i + 500]
                out.update((r["sop_instance_uid"], r) for r in self.db.query(
                    "select * from instances where sop_instance_uid in"
                    f" ({','.join('?' * len(part))})", part))
        return out

    def series_instances(self, series_uid: str) -> list[dict[str, Any]]:
        """All recorded instances of a series."""
        with self.lock:
            return list(self.db.query(
                "select * from instances where series_uid = ? order by received_at",
                [series_uid]))

    def get_series(self, series_uid: str) -> dict[str, Any] | None:
        """The series row or ``None``."""
        with self.lock:
            rows = list(self.db.query("select * from series where series_uid = ?", [series_uid]))
        return rows[0] if rows else None

    def series_needing_jobs(self, quiet_seconds: float, at: float | None = None) -> list[dict[str, Any]]:
        """Series quiet for ``quiet_seconds`` with instances not yet covered by a job."""
        at = now() if at is None else at
        with self.lock:
            return list(self.db.query(
                "select * from series where n_instances > processed_instances"
                " and last_received_at <= ? and series_uid not in"
                " (select series_uid from jobs where status in ('pending','running'))",
                [at - quiet_seconds]))

    # -------------------------------------------------------------------- jobs
    def enqueue_job(self, series_uid: str, source: str = "scp") -> int:
        """Queue a job for a series covering all its instances recorded so far."""
        with self.lock:
            with self.transaction():
                s = self.get_series(series_uid)
                if s is None:
                    raise KeyError(f"series {series_uid} is not recorded")
                cur = self._conn.execute(
                    "insert into jobs (series_uid, study_uid, status, reason, error, n_instances,"
                    " created_at, attempts, source) values (?,?,'pending','','',?,?,0,?)",
                    (series_uid, s["study_uid"], s["n_instances"], now(), source))
                self._conn.execute("update series set processed_instances = ? where series_uid = ?",
                                   (s["n_instances"], series_uid))
                return int(cur.lastrowid)

    def claim_job(self) -> dict[str, Any] | None:
        """Move the oldest pending job to running and return it (``None`` if none)."""
        with self.lock:
            with self.transaction():
                rows = list(self.db.query(
                    "select * from jobs where status = 'pending' order by id limit 1"))
                if not rows:
                    return None
                job = rows[0]
                self._conn.execute(
                    "update jobs set status='running', started_at=?, attempts=attempts+1"
                    " where id=?", (now(), job["id"]))
                job["status"] = "running"
                job["attempts"] = int(job["attempts"] or 0) + 1
                return job

    def finish_job(self, job_id: int, status: str, reason: str = "", error: str = "") -> None:
        """Set a job's final state: ``done``, ``skipped`` (with reason) or ``failed`` (with error)."""
        if status not in ("done", "skipped", "failed"):
            raise ValueError(f"final job status must be done, skipped or failed, not {status!r}")
        with self.lock:
            with self.transaction():
                self._conn.execute(
                    "update jobs set status=?, reason=?, error=?, finished_at=? where id=?",
                    (status, reason, error, now(), job_id))

    def requeue_running_jobs(self) -> int:
        """After a crash: jobs left ``running`` go back to ``pending``. Returns how many."""
        with self.lock:
            with self.transaction():
                cur = self._conn.execute("update jobs set status='pending' where status='running'")
                return cur.rowcount

    def requeue_job(self, job_id: int) -> None:
        """Put one ``running`` job back to ``pending`` (its outcome could not be recorded)."""
        with self.lock:
            with self.transaction():
                self._conn.execute("update jobs set status='pending' where id=? and"
                                   " status='running'", (job_id,))

    def jobs(self, status: str | None = None) -> list[dict[str, Any]]:
        """Jobs, optionally filtered by status."""
        with self.lock:
            if status:
                return list(self.db.query("select * from jobs where status=? order by id", [status]))
            return list(self.db.query("select * from jobs order by id"))

    def last_job(self, series_uid: str) -> dict[str, Any] | None:
        """The newest job of a series."""
        with self.lock:
            rows = list(self.db.query(
                "select * from jobs where series_uid=? order by id desc limit 1", [series_uid]))
        return rows[0] if rows else None

    # --------------------------------------------------------- job outcomes
    def record_decisions(self, job_id: int, series_uid: str,
                         decisions: list[tuple[str, bool, str]]) -> None:
        """Store the router's decisions ``(protocol, accepted, reason)``."""
        with self.lock:
            self.db["decisions"].insert_all(
                [{"job_id": job_id, "series_uid": series_uid, "protocol": p,
                  "accepted": int(a), "reason": r} for p, a, r in decisions])

    def record_finding(self, job_id: int, series_uid: str, study_uid: str, protocol: str,
                       site: str, category: str, data: dict[str, Any]) -> None:
        """Store one finding; ``data`` is JSON-serialisable (measurements, flags, geometry)."""
        with self.lock:
            self.db["findings"].insert({
                "job_id": job_id, "series_uid": series_uid, "study_uid": study_uid,
                "protocol": protocol, "site": site, "category": category or "",
                "data": json.dumps(data, default=float), "created_at": now()})

    def record_result(self, job_id: int, series_uid: str, study_uid: str, sop_instance_uid: str,
                      sop_class_uid: str, kind: str, path: str, supersedes: str = "") -> int:
        """Store a written SR / SC; returns the result id."""
        with self.lock:
            return int(self.db["results"].insert({
                "job_id": job_id, "series_uid": series_uid, "study_uid": study_uid,
                "sop_instance_uid": sop_instance_uid, "sop_class_uid": sop_class_uid,
                "kind": kind, "path": path, "supersedes": supersedes,
                "created_at": now()}).last_pk)

    def record_job_outcome(self, job_id: int, *, series_uid: str, study_uid: str, status: str,
                           reason: str = "", error: str = "",
                           decisions: list[tuple[str, bool, str]] = (),  # type: ignore[assignment]
                           findings: list[dict[str, Any]] = (),  # type: ignore[assignment]
                           results: list[dict[str, Any]] = (),  # type: ignore[assignment]
                           destinations: list[str] = ()) -> list[int]:  # type: ignore[assignment]
        """Record everything a job produced and its final state in ONE transaction.

        A crash leaves either nothing (the job is re-run after restart) or all of
        it (the job is done and is not re-run): never half a result.

        Parameters
        ----------
        job_id : int
        series_uid, study_uid : str
        status : str
            ``done``, ``skipped`` or ``failed``.
        reason, error : str
        decisions : list of (protocol, accepted, reason)
        findings : list of dict
            Each with keys ``protocol``, ``site``, ``category``, ``data`` (JSON-able).
        results : list of dict
            Each with keys ``sop_instance_uid``, ``sop_class_uid``, ``kind``, ``path``,
            ``supersedes``.
        destinations : list of str
            Every result is queued for export to each (``AE@host:port`` or ``outbox``).

        Returns
        -------
        list of int
            The result ids, in the order of ``results``.
        """
        if status not in ("done", "skipped", "failed"):
            raise ValueError(f"final job status must be done, skipped or failed, not {status!r}")
        t = now()
        ids: list[int] = []
        with self.transaction() as c:
            c.execute("delete from exports where result_id in"
                      " (select id from results where job_id=?)", (job_id,))
            for table in ("decisions", "findings", "results"):
                c.execute(f"delete from {table} where job_id=?", (job_id,))
            c.executemany("insert into decisions (job_id, series_uid, protocol, accepted, reason)"
                          " values (?,?,?,?,?)",
                          [(job_id, series_uid, p, int(a), r) for p, a, r in decisions])
            c.executemany("insert into findings (job_id, series_uid, study_uid, protocol, site,"
                          " category, data, created_at) values (?,?,?,?,?,?,?,?)",
                          [(job_id, series_uid, study_uid, f.get("protocol", ""), f.get("site", ""),
                            f.get("category") or "", json.dumps(f.get("data", {}), default=float), t)
                           for f in findings])
            for r in results:
                cur = c.execute(
                    "insert into results (job_id, series_uid, study_uid, sop_instance_uid,"
                    " sop_class_uid, kind, path, supersedes, created_at) values (?,?,?,?,?,?,?,?,?)",
                    (job_id, series_uid, study_uid, r["sop_instance_uid"], r["sop_class_uid"],
                     r["kind"], str(r["path"]), r.get("supersedes", "") or "", t))
                rid = int(cur.lastrowid)
                ids.append(rid)
                for d in destinations:
                    c.execute("insert into exports (result_id, path, sop_instance_uid, destination,"
                              " status, attempts, next_attempt_at, last_error, sent_at, created_at)"
                              " values (?,?,?,?,'pending',0,?,'',NULL,?)",
                              (rid, str(r["path"]), r["sop_instance_uid"], d, t, t))
            c.execute("update jobs set status=?, reason=?, error=?, finished_at=? where id=?",
                      (status, reason, error, t, job_id))
        return ids

    def get_result(self, result_id: int) -> dict[str, Any] | None:
        """One result row or ``None``."""
        with self.lock:
            rows = list(self.db.query("select * from results where id=?", [result_id]))
        return rows[0] if rows else None

    def get_job(self, job_id: int) -> dict[str, Any] | None:
        """One job row or ``None``."""
        with self.lock:
            rows = list(self.db.query("select * from jobs where id=?", [job_id]))
        return rows[0] if rows else None

    def latest_sr(self, series_uid: str) -> dict[str, Any] | None:
        """The newest SR result of a series (what a new SR supersedes)."""
        with self.lock:
            rows = list(self.db.query(
                "select * from results where series_uid=? and kind='SR' order by id desc limit 1",
                [series_uid]))
        return rows[0] if rows else None

    def findings(self, series_uid: str | None = None, latest_only: bool = True) -> list[dict[str, Any]]:
        """Findings, newest job per series only unless ``latest_only`` is false."""
        sql = "select f.* from findings f"
        args: list[Any] = []
        cond = []
        if latest_only:
            cond.append("f.job_id = (select max(f2.job_id) from findings f2"
                        " where f2.series_uid = f.series_uid)")
        if series_uid:
            cond.append("f.series_uid = ?")
            args.append(series_uid)
        if cond:
            sql += " where " + " and ".join(cond)
        sql += " order by f.id"
        with self.lock:
            rows = list(self.db.query(sql, args))
        for r in rows:
            r["data"] = json.loads(r["data"])
        return rows

    # ----------------------------------------------------------------- exports
    def queue_export(self, result_id: int, path: str, sop_instance_uid: str,
                     destination: str) -> int:
        """Queue one result file for one destination (``AE@host:port`` or ``outbox``)."""
        with self.lock:
            return int(self.db["exports"].insert({
                "result_id": result_id, "path": path, "sop_instance_uid": sop_instance_uid,
                "destination": destination, "status": "pending", "attempts": 0,
                "next_attempt_at": now(), "last_error": "", "sent_at": None,
                "created_at": now()}).last_pk)

    def due_exports(self, at: float | None = None) -> list[dict[str, Any]]:
        """Pending exports whose next attempt is due."""
        at = now() if at is None else at
        with self.lock:
            return list(self.db.query(
                "select * from exports where status='pending' and next_attempt_at <= ? order by id",
                [at]))

    def update_export(self, export_id: int, **values: Any) -> None:
        """Update an export row (status, attempts, next_attempt_at, last_error, sent_at)."""
        with self.lock:
            self.db["exports"].update(export_id, values)

    def exports(self, status: str | None = None) -> list[dict[str, Any]]:
        """Export rows, optionally filtered by status."""
        with self.lock:
            if status:
                return list(self.db.query("select * from exports where status=? order by id", [status]))
            return list(self.db.query("select * from exports order by id"))

    # -------------------------------------------------------------- rejections
    def record_rejection(self, *, sop_instance_uid: str, calling_ae: str, status: int,
                         reason: str) -> bool:
        """Store a refused instance and its reason; never raises.

        When the row cannot be written (e.g. "database or disk is full") it is
        kept in memory and written before the next refusal that can be.

        Returns
        -------
        bool
            ``True`` when this and every earlier refusal are written.
        """
        row = {"at": now(), "sop_instance_uid": sop_instance_uid, "calling_ae": calling_ae,
               "status": status, "reason": reason}
        with self.lock:
            self._unrecorded.append(row)
            try:
                with self.transaction() as conn:
                    conn.executemany(
                        "insert into rejections (at, sop_instance_uid, calling_ae, status, reason)"
                        " values (:at, :sop_instance_uid, :calling_ae, :status, :reason)",
                        self._unrecorded)
            except sqlite3.Error:
                return False
            self._unrecorded = []
        return True

    def unrecorded_rejections(self) -> int:
        """Refusals kept in memory because the database could not be written."""
        with self.lock:
            return len(self._unrecorded)

    def rejections(self) -> list[dict[str, Any]]:
        """All rejections, oldest first."""
        with self.lock:
            return list(self.db.query("select * from rejections order by id"))

    def record_ignored(self, *, sop_instance_uid: str, sop_class_uid: str, study_uid: str,
                       series_uid: str, calling_ae: str) -> None:
        """Record an instance of a class the screener does not process (once per UID).

        Parameters
        ----------
        sop_instance_uid, sop_class_uid, study_uid, series_uid : str
            As received.
        calling_ae : str
            Who sent it.
        """
        with self.lock:
            self._conn.execute(
                "insert or ignore into ignored (sop_instance_uid, sop_class_uid, study_uid,"
                " series_uid, calling_ae, at) values (?,?,?,?,?,?)",
                (sop_instance_uid, sop_class_uid, study_uid, series_uid, calling_ae, now()))

    def add_rejected_associations(self, *, calling_ae: str, reason: str, count: int) -> None:
        """Add ``count`` refused associations of one calling AE and reason.

        Parameters
        ----------
        calling_ae : str
        reason : str
            The same text for the same cause, so that counts add up in one row.
        count : int
        """
        t = now()
        with self.lock:
            self._conn.execute(
                "insert into rejected_associations (calling_ae, reason, count, first_at, last_at)"
                " values (?,?,?,?,?) on conflict(calling_ae, reason) do update set"
                " count = count + excluded.count, last_at = excluded.last_at",
                (calling_ae, reason, count, t, t))

    def rejected_associations(self) -> list[dict[str, Any]]:
        """Refused associations per calling AE and reason, with their counts."""
        with self.lock:
            return list(self.db.query("select * from rejected_associations order by first_at"))

    def counts(self) -> dict[str, Any]:
        """Summary counts for ``screener status``."""
        with self.lock:
            def q(sql: str) -> dict[str, int]:
                return {r[0]: r[1] for r in self._conn.execute(sql).fetchall()}
            return {
                "instances": self._conn.execute("select count(*) from instances").fetchone()[0],
                "series": self._conn.execute("select count(*) from series").fetchone()[0],
                "jobs": q("select status, count(*) from jobs group by status"),
                "exports": q("select status, count(*) from exports group by status"),
                "rejections": self._conn.execute("select count(*) from rejections").fetchone()[0],
                "ignored": self._conn.execute("select count(*) from ignored").fetchone()[0],
                "rejected_associations": self._conn.execute(
                    "select coalesce(sum(count), 0) from rejected_associations").fetchone()[0],
            }

    def iter_table(self, name: str) -> Iterator[dict[str, Any]]:
        """Rows of a table (for export / debugging)."""
        with self.lock:
            rows = list(self.db[name].rows)
        yield from rows
