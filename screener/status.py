"""``screener status``: queue, jobs, exports, rejections and rejected associations at a glance."""
from __future__ import annotations

import json
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``screener status``."""
    p = command_parser("status", __doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="machine-readable counts")
    args = p.parse_args(argv)
    cfg = command_config("status", args)
    if cfg is None:
        return 2
    if not cfg.db_path.exists():
        print(f"screener status: no database at {cfg.db_path} yet (nothing received)")
        return 0
    db = Database(cfg.db_path)
    print(json.dumps(db.counts()) if args.json else render(db))
    return 0
