"""``screener status``: queue, jobs, exports, rejections and rejected associations at a glance."""
from __future__ import annotations

import json
import sqlite3
import sys
import time

from screener.cli import command_config, command_parser
from screener.db import Database


def _age(t: float | None) -> str:
    if not t:
        return "-"
    s = max(0.0, time.time() - t)
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}m ago" if s < 7200 else f"{s / 3600:.1f}h ago"


def render(db: Database, recent: int = 10) -> str:
    """The status report as text."""
    c = db.counts()
    lines = [f"instances {c['instances']}   series {c['series']}   rejections {c['rejections']}"
             f"   ignored {c.get('ignored', 0)}"
             f"   rejected associations {c.get('rejected_associations', 0)}",
             "jobs     " + ("  ".join(f"{k} {v}" for k, v in sorted(c["jobs"].items())) or "none"),
             "exports  " + ("  ".join(f"{k} {v}" for k, v in sorted(c["exports"].items())) or "none"),
             "", f"last {recent} jobs:"]
    for j in db.jobs()[-recent:]:
        why = j["reason"] or j["error"] or ""
        lines.append(f"  #{j['id']:<5} {j['status']:<8} {j['series_uid'][-24:]:<24} "
                     f"n={j['n_instances']:<4} {_age(j['finished_at'] or j['created_at']):>9}  {why[:80]}")
    pend = db.exports("pending") + db.exports("failed")
    if pend:
        lines += ["", "exports waiting or failed:"]
        for e in pend[:recent]:
            lines.append(f"  #{e['id']:<5} {e['status']:<8} -> {e['destination']:<28} "
                         f"attempts {e['attempts']}  {e['last_error'][:60]}")
    rej = db.rejections()[-recent:]
    if rej:
        lines += ["", "recent rejections:"]
        for r in rej:
            lines.append(f"  {_age(r['at']):>9}  0x{r['status']:04X}  {r['calling_ae']:<16} {r['reason'][:90]}")
    assocs = db.rejected_associations()[-recent:]
    if assocs:
        lines += ["", "rejected associations (per calling AE and reason):"]
        for a in assocs:
            lines.append(f"  {_age(a['last_at']):>9}  x{a['count']:<6} {a['calling_ae']:<16} "
                         f"{a['reason'][:90]}")
    return "\n".join(lines)


EPILOG = """\
Which data directory: --data-dir, else $SCREENER_DATA_DIR, else data_dir of the
configuration file the service uses (--config, else $SCREENER_CONFIG, else
/etc/screener/screener.toml when it exists), else ./screener-data. The first line of the
report names the folder and the configuration file used.

Exit status:
  0  the report was printed
  1  no database in that data directory: the service has not run with it, or it is
     not the service's folder (pass --config or --data-dir)
  2  invalid configuration, the data directory is a file, or the database cannot be
     read (permissions: run as the service user, e.g. sudo -u screener screener status)
"""


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``screener status``.

    Returns
    -------
    int
        0 report printed, 1 no database in the data directory, 2 configuration error or
        unreadable database (see ``EPILOG``).
    """
    from screener.config import find_config_path

    p = command_parser("status", __doc__.splitlines()[0], epilog=EPILOG)
    p.add_argument("--json", action="store_true", help="machine-readable counts")
    args = p.parse_args(argv)
    cfg = command_config("status", args)
    if cfg is None:
        return 2
    source = find_config_path(args.config)
    where = f"data directory {cfg.data_dir.resolve()} (config: {source or 'none, built-in defaults'})"
    try:
        exists = cfg.db_path.is_file()
    except PermissionError as exc:
        print(f"screener status: cannot read the database at {cfg.db_path.resolve()}: "
              f"{exc.strerror}; run as the service user (sudo -u screener screener status) "
              "or root", file=sys.stderr)
        return 2
    if not exists:
        if args.data_dir is not None:
            hint = "the service has not run with this data directory (is it its data_dir?)"
        elif source is None:
            hint = ("no service configuration found (no --config, $SCREENER_CONFIG or "
                    "/etc/screener/screener.toml): pass --config FILE or --data-dir DIR")
        else:
            hint = ("the service has not started with this data directory yet, or uses "
                    "another one (check data_dir in the config and SCREENER_DATA_DIR in its "
                    "unit)")
        print(f"screener status: no database at {cfg.db_path.resolve()}: {hint}", file=sys.stderr)
        return 1
    try:
        db = Database(cfg.db_path)
        counts = db.counts()
        text = json.dumps({**counts, "data_dir": str(cfg.data_dir.resolve())}) if args.json \
            else where + "\n" + render(db)
    except (sqlite3.Error, OSError) as exc:
        print(f"screener status: cannot read the database at {cfg.db_path.resolve()}: {exc}; "
              "run as the service user (sudo -u screener screener status) or root",
              file=sys.stderr)
        return 2
    print(text)
    return 0
