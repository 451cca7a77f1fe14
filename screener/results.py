"""``screener results``: export findings as CSV or JSON.

Each study's records start with its study-level screening result
(:mod:`screener.study_result` over the newest findings of every series of the
study: protocol ``study result``, site ``study``, the category, ``methods``,
and as flags the agreement, each contributing measurement with its method,
and the notes), then one record per finding: study/series UIDs,
protocol, site, category, flags,
each measurement's name, value and unit, and for spine findings the
vertebra's extent along the patient z axis and the ROI centre in patient
coordinates (mm), so a result can be checked against an independent
segmentation. Only the newest job of each series is exported unless
``--all-versions``.
"""
from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

from screener.cli import command_config, command_parser
from screener.db import Database
from screener.findings import Finding
from screener.study_result import study_result

BASE_FIELDS = ["study_uid", "series_uid", "job_id", "protocol", "protocol_version", "site",
               "category", "flags", "z_min_mm", "z_max_mm", "roi_center_x_mm",
               "roi_center_y_mm", "roi_center_z_mm"]


def finding_records(db: Database, series_uid: str | None = None,
                    all_versions: bool = False) -> list[dict[str, Any]]:
    """Findings as flat JSON-able records, each study's study-level result first (module docstring)."""
    by_study: dict[str, list[dict[str, Any]]] = {}
    rows = db.findings(series_uid=series_uid, latest_only=not all_versions)
    for row in rows:
        data = dict(row["data"])
        rec: dict[str, Any] = {
            "study_uid": row["study_uid"], "series_uid": row["series_uid"],
            "job_id": row["job_id"], "protocol": row["protocol"],
            "protocol_version": data.get("protocol_version", ""), "site": row["site"],
            "category": row["category"], "flags": list(data.get("flags", [])),
        }
        extent = data.get("z_extent_mm") or [None, None]
        rec["z_min_mm"], rec["z_max_mm"] = (extent + [None, None])[:2]
        centre = data.get("roi_center_mm") or [None, None, None]
        rec["roi_center_x_mm"], rec["roi_center_y_mm"], rec["roi_center_z_mm"] = \
            (list(centre) + [None] * 3)[:3]
        rec["measurements"] = [_measurement(m) for m in data.get("measurements", [])]
        by_study.setdefault(str(row["study_uid"]), []).append(rec)
    latest = db.findings(latest_only=True) if all_versions or series_uid else rows
    out: list[dict[str, Any]] = []
    for study_uid, recs in by_study.items():
        stored = [Finding.from_record(r["data"]) for r in latest if str(r["study_uid"]) == study_uid]
        out.append(_study_record(recs[0], study_result(stored).to_record(),
                                 sorted({str(f.series_uid) for f in stored})))
        out.extend(recs)
    return out


def other_series_findings(db: Database, study_uid: str, series_uid: str) -> list[Finding]:
    """The newest findings of the study's OTHER series (rebuilt with :meth:`Finding.from_record`), so a
    series' SR can combine everything already measured in its study."""
    rows = [r for r in db.findings(latest_only=True)
            if str(r["study_uid"]) == study_uid and str(r["series_uid"]) != series_uid]
    return [Finding.from_record(r["data"]) for r in rows]


def _measurement(m: dict[str, Any]) -> dict[str, Any]:
    """A measurement record: ``name``, ``value``, ``unit``; its interval and T-score reference when stored."""
    out = {"name": m.get("name"), "value": m.get("value"), "unit": m.get("unit")}
    for k in ("interval", "interval_level", "reference"):
        if k in m:
            out[k] = m[k]
    return out


def _study_record(first: dict[str, Any], study: dict[str, Any], series: list[str]) -> dict[str, Any]:
    """The study-level result as a record shaped like a finding's (``series_uid``: the series it
    combines, joined by ``|``; ``job_id`` None)."""
    lines = [study.get("agreement", "")]
    for c in study.get("contributions", []):
        grade = c.get("grade") or "indeterminate"
        lines.append(f"{c['method']}, {c['site']}: {c['value']} -> {grade} "
                     f"(compatible: {', '.join(c['compatible'])}; {c['uncertainty']})")
    lines += list(study.get("notes", []))
    rec: dict[str, Any] = {"study_uid": first["study_uid"], "series_uid": "|".join(series), "job_id": None}
    rec.update({"protocol": "study result", "protocol_version": "", "site": "study",
                "category": study.get("category", ""), "flags": [x for x in lines if x],
                "methods": list(study.get("methods", [])), "measurements": []})
    rec.update({k: None for k in BASE_FIELDS if k not in rec})
    return rec


def to_csv(records: list[dict[str, Any]]) -> str:
    """Flatten records to CSV: one row per finding (the study result first), ``<measurement>`` and
    ``<measurement> unit`` columns, and where a measurement has them ``<measurement> interval low`` /
    ``high`` (its prediction interval) and ``<measurement> reference`` (a T-score's reference key)."""
    names: list[str] = []
    extra: dict[str, list[str]] = {}
    for r in records:
        for m in r["measurements"]:
            if m["name"] not in names:
                names.append(m["name"])
            cols = extra.setdefault(m["name"], [])
            if "interval" in m and "interval low" not in cols:
                cols += ["interval low", "interval high"]
            if "reference" in m and "reference" not in cols:
                cols.append("reference")
    header = BASE_FIELDS + [c for n in names for c in (n, f"{n} unit", *(f"{n} {e}" for e in extra[n]))]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
    w.writeheader()
    for r in records:
        row = {k: r.get(k) for k in BASE_FIELDS}
        row["flags"] = "; ".join(r["flags"])
        for m in r["measurements"]:
            row[m["name"]] = m["value"]
            row[f"{m['name']} unit"] = m["unit"]
            if "interval" in m:
                row[f"{m['name']} interval low"], row[f"{m['name']} interval high"] = m["interval"]
            if "reference" in m:
                row[f"{m['name']} reference"] = m["reference"].get("key", "")
        w.writerow(row)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``screener results``."""
    p = command_parser("results", __doc__.splitlines()[0])
    p.add_argument("--format", choices=("csv", "json"), default="csv")
    p.add_argument("--out", type=Path, help="write here instead of standard output")
    p.add_argument("--series", help="only this SeriesInstanceUID")
    p.add_argument("--all-versions", action="store_true",
                   help="include findings of superseded runs")
    args = p.parse_args(argv)
    cfg = command_config("results", args)
    if cfg is None:
        return 2
    if not cfg.db_path.exists():
        print(f"screener results: no database at {cfg.db_path}; run 'screener serve' or "
              "'screener replay' first, or pass --data-dir", file=sys.stderr)
        return 2
    db = Database(cfg.db_path)
    recs = finding_records(db, args.series, args.all_versions)
    text = to_csv(recs) if args.format == "csv" else json.dumps(recs, indent=2, default=float) + "\n"
    if args.out:
        args.out.write_text(text)
    else:
        sys.stdout.write(text)
    return 0
