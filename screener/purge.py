"""``screener purge --older-than DAYS``: retention of received studies and results.

A study is purged when it is finished and old:

* every series of it is covered by a job (no instance arrived after its last job), no job of
  it is pending or running, and the last job of each series is ``done`` or ``skipped`` (a
  ``failed`` job keeps its study, so that it can be run again);
* every result of it is exported (each ``exports`` row ``sent``);
* its last activity — the newest of its instances' arrival, its jobs' end and its exports —
  is more than DAYS days ago.

Purging deletes the study's received instances under ``store/`` (files ``screener replay``
read from elsewhere are never touched) and its SR / SC files under ``results/``, then the folders
left empty. The deleted instances' rows go too, so a study sent again later is received and
screened again; findings, jobs and export history stay in the database. Each purged study is
recorded in the ``purges`` table (and logged, UIDs only). ``--dry-run`` lists what would go and
changes nothing.

Run it from a systemd timer (``deploy/screener-purge.timer``); it is safe beside a running
``screener serve``: a study that receives an instance while it is being purged is kept.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
import structlog

from screener.cli import command_config, command_parser
from screener.config import Config
from screener.db import Database

log = structlog.get_logger(__name__)

SECONDS_PER_DAY = 86400.0


@dataclass
class StudyPlan:
    """What purging one study deletes, or why it is kept."""

    study_uid: str
    last_activity: float
    keep_reason: str = ""
    instance_uids: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    results: int = 0
    bytes: int = 0

    @property
    def purgeable(self) -> bool:
        """Finished, old enough and with something to delete."""
        return not self.keep_reason and bool(self.files or self.instance_uids)


def _inside(path: Path, root: Path) -> bool:
    try:
        return path.resolve().is_relative_to(root.resolve())
    except (OSError, ValueError):
        return False


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def ensure_table(db: Database) -> None:
    """Create the ``purges`` table (one row per purged study) when missing."""
    with db.lock:
        if "purges" not in db.db.table_names():
            db.db["purges"].create({
                "id": int, "at": float, "study_uid": str, "older_than_days": float,
                "instances": int, "results": int, "files": int, "bytes": int,
                "failed_files": int,
            }, pk="id")


def _keep_reason(db: Database, study_uid: str) -> str:
    """Why a study must be kept ("" when it is finished)."""
    q = db.db.query
    for s in q("select series_uid, n_instances, processed_instances from series"
               " where study_uid = ?", [study_uid]):
        if int(s["n_instances"] or 0) > int(s["processed_instances"] or 0):
            return "instances not yet processed"
        last = list(q("select status from jobs where series_uid = ? order by id desc limit 1",
                      [s["series_uid"]]))
        if not last:
            return "instances not yet processed"
        active = list(q("select 1 from jobs where series_uid = ? and status in"
                        " ('pending', 'running') limit 1", [s["series_uid"]]))
        if active or last[0]["status"] in ("pending", "running"):
            return "a job is pending or running"
        if last[0]["status"] == "failed":
            return "a job failed (kept so that it can be run again)"
    unsent = list(q("select count(*) as n from exports e join results r on r.id = e.result_id"
                    " where r.study_uid = ? and e.status != 'sent'", [study_uid]))[0]["n"]
    if unsent:
        return "results not yet exported (screener status lists them)"
    return ""


def _last_activity(db: Database, study_uid: str) -> float:
    row = list(db.db.query(
        "select max(t) as t from ("
        " select max(received_at) as t from instances where study_uid = :s"
        " union all select max(finished_at) from jobs where study_uid = :s"
        " union all select max(coalesce(e.sent_at, e.created_at)) from exports e"
        "   join results r on r.id = e.result_id where r.study_uid = :s)",
        {"s": study_uid}))[0]
    return float(row["t"] or 0.0)


def plan_study(db: Database, config: Config, study_uid: str, cutoff: float) -> StudyPlan:
    """What purging ``study_uid`` would delete, or why it is kept.

    Parameters
    ----------
    db : Database
    config : Config
        ``store_dir`` and ``results_dir``: only files inside them are deleted.
    study_uid : str
    cutoff : float
        UNIX time; a study whose last activity is later is kept.

    Returns
    -------
    StudyPlan
    """
    with db.lock:
        plan = StudyPlan(study_uid=study_uid, last_activity=_last_activity(db, study_uid))
        if plan.last_activity > cutoff:
            plan.keep_reason = "newer than the cut-off"
            return plan
        plan.keep_reason = _keep_reason(db, study_uid)
        if plan.keep_reason:
            return plan
        for row in db.db.query("select sop_instance_uid, path from instances where"
                               " study_uid = ?", [study_uid]):
            p = Path(row["path"])
            if _inside(p, config.store_dir):  # never a replayed file from elsewhere
                plan.instance_uids.append(str(row["sop_instance_uid"]))
                if p.exists():
                    plan.files.append(p)
        for row in db.db.query("select path from results where study_uid = ?", [study_uid]):
            p = Path(row["path"])
            if _inside(p, config.results_dir) and p.exists():
                plan.files.append(p)
                plan.results += 1
    plan.bytes = sum(_size(p) for p in plan.files)
    return plan


def _remove_empty_parents(path: Path, root: Path) -> None:
    d = path.parent
    root = root.resolve()
    while _inside(d, root) and d.resolve() != root:
        try:
            d.rmdir()
        except OSError:
            return
        d = d.parent


def purge(config: Config, older_than_days: float, *, dry_run: bool = False,
          at: float | None = None) -> list[StudyPlan]:
    """Delete the files of finished studies older than ``older_than_days``.

    Parameters
    ----------
    config : Config
        ``db_path``, ``store_dir``, ``results_dir``.
    older_than_days : float
        Age of a study's last activity, in days (not negative).
    dry_run : bool
        Only plan: nothing is deleted or recorded.
    at : float, optional
        "Now" as UNIX time (tests).

    Returns
    -------
    list of StudyPlan
        Every study considered, purged or kept (``keep_reason``).

    Raises
    ------
    ValueError
        ``older_than_days`` is negative.
    """
    if older_than_days < 0:
        raise ValueError(f"--older-than must be 0 days or more, not {older_than_days:g}")
    now = time.time() if at is None else at
    cutoff = now - older_than_days * SECONDS_PER_DAY
    db = Database(config.db_path)
    try:
        ensure_table(db)
        with db.lock:
            studies = [r["study_uid"] for r in db.db.query(
                "select distinct study_uid from instances union"
                " select distinct study_uid from results")]
        plans = [plan_study(db, config, s, cutoff) for s in studies if s]
        if dry_run:
            return plans
        for plan in plans:
            if plan.purgeable:
                _purge_one(db, config, plan, older_than_days, now, cutoff)
        return plans
    finally:
        db.close()


def _purge_one(db: Database, config: Config, plan: StudyPlan, days: float, now: float,
               cutoff: float) -> None:
    """Re-check the study inside one transaction, drop its instance rows, record the purge,
    then delete its files (after the commit: a crash leaves files, never rows without files)."""
    with db.lock:
        fresh = plan_study(db, config, plan.study_uid, cutoff)
        if not fresh.purgeable:  # something arrived or started meanwhile
            plan.keep_reason = fresh.keep_reason or "changed while purging"
            return
        with db.transaction() as conn:
            conn.executemany("delete from instances where sop_instance_uid = ?",
                             [(u,) for u in fresh.instance_uids])
            conn.execute("insert into purges (at, study_uid, older_than_days, instances, results,"
                         " files, bytes, failed_files) values (?,?,?,?,?,?,?,0)",
                         (now, plan.study_uid, days, len(fresh.instance_uids), fresh.results,
                          len(fresh.files), fresh.bytes))
            purge_id = conn.execute("select last_insert_rowid()").fetchone()[0]
    failed = 0
    for p in fresh.files:
        try:
            p.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            failed += 1
            log.warning("purge: file not deleted", path=str(p), error=exc.strerror)
            continue
        root = config.store_dir if _inside(p, config.store_dir) else config.results_dir
        _remove_empty_parents(p, root)
    if failed:
        with db.lock:
            db.db["purges"].update(purge_id, {"failed_files": failed})
    plan.instance_uids, plan.files = fresh.instance_uids, fresh.files
    plan.results, plan.bytes = fresh.results, fresh.bytes
    plan.keep_reason = f"{failed} files could not be deleted" if failed else ""
    log.info("study purged", study_uid=plan.study_uid, instances=len(fresh.instance_uids),
             results=fresh.results, files=len(fresh.files) - failed,
             mbytes=round(fresh.bytes / 1e6, 1), older_than_days=days)


def format_report(plans: list[StudyPlan], days: float, dry_run: bool) -> str:
    """The summary printed by ``screener purge``.

    Parameters
    ----------
    plans : list of StudyPlan
    days : float
    dry_run : bool

    Returns
    -------
    str
    """
    done = [p for p in plans if p.purgeable]
    verb = "would purge" if dry_run else "purged"
    lines = []
    for p in done:
        uid = p.study_uid if len(p.study_uid) <= 40 else "…" + p.study_uid[-39:]
        age = (time.time() - p.last_activity) / SECONDS_PER_DAY
        lines.append(f"{verb} {uid:<40} {len(p.instance_uids):>5} instances {p.results:>3} "
                     f"results {p.bytes / 1e6:>8.1f} MB  last activity {age:.0f} days ago")
    kept: dict[str, int] = {}
    for p in plans:
        if p.keep_reason and p.keep_reason != "newer than the cut-off":
            kept[p.keep_reason] = kept.get(p.keep_reason, 0) + 1
    total = sum(p.bytes for p in done)
    lines.append(f"{len(done)} of {len(plans)} studies {verb} ({total / 1e6:.1f} MB): finished, "
                 f"last activity more than {days:g} days ago")
    for reason, n in sorted(kept.items()):
        lines.append(f"kept {n} older stud{'y' if n == 1 else 'ies'}: {reason}")
    return "\n".join(lines)


EPILOG = """\
Only finished studies go: every series processed (last job done or skipped), every result
exported. Received files outside the data directory (screener replay) are never deleted.
Exit status: 0 done (or nothing to do), 1 some files could not be deleted, 2 usage or
configuration error.
"""


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``screener purge``."""
    p = command_parser("purge", __doc__.splitlines()[0].strip("`"), epilog=EPILOG)
    p.add_argument("--older-than", type=float, required=True, metavar="DAYS",
                   help="purge finished studies whose last activity is more than DAYS days ago")
    p.add_argument("--dry-run", action="store_true",
                   help="list what would be purged; delete and record nothing")
    args = p.parse_args(argv)
    if args.older_than < 0:
        print(f"screener purge: --older-than must be 0 days or more, not {args.older_than:g}",
              file=sys.stderr)
        return 2
    cfg = command_config("purge", args, writes=not args.dry_run)
    if cfg is None:
        return 2
    if not cfg.db_path.is_file():
        print(f"screener purge: no database at {cfg.db_path}: nothing received there yet "
              "(pass --config or --data-dir with the service's data directory)", file=sys.stderr)
        return 2
    plans = purge(cfg, args.older_than, dry_run=args.dry_run)
    print(format_report(plans, args.older_than, args.dry_run))
    return 1 if any(p.keep_reason.endswith("could not be deleted") for p in plans) else 0
