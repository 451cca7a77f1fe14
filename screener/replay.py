"""``screener replay STUDY_DIR``: backfill an archive through the daemon's own pipeline.

Walks a directory tree, groups DICOM files by series, records them in the same
database as ``screener serve`` (files stay where they are), and runs each
series through the same job runner (:func:`screener.worker.run_job`) with N
workers and a progress bar. Series already done are skipped unless
``--force``. Results go to the configured destinations or the outbox. Ends with
a summary table; the exit status is 1 when any series failed or any file was
unusable, else 0.
"""
from __future__ import annotations

import os
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import pydicom
import structlog
from pydicom.errors import InvalidDicomError
from tqdm import tqdm

from screener.cli import command_config, command_parser
from screener.config import Config
from screener.db import Database
from screener.logs import accession_hash, configure_logging

log = structlog.get_logger(__name__)


@dataclass
class ScannedSeries:
    """Files of one series found on disk."""

    series_uid: str
    study_uid: str
    modality: str
    accession_hash: str
    files: list[tuple[Path, str, str, str]] = field(default_factory=list)  # path, sop, class, ts


@dataclass
class ScanResult:
    """What a walk of a directory found."""

    series: dict[str, ScannedSeries]
    unusable: list[tuple[Path, str]]  # path, reason
    not_dicom: int = 0


def iter_files(root: Path) -> Iterable[Path]:
    """All regular files below ``root`` in a stable order."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


def scan(root: Path) -> ScanResult:
    """Read the headers of every file below ``root`` and group DICOM instances by series.

    Files that are not DICOM are counted, DICOM files lacking the UIDs that
    identify them are listed as unusable with the reason, never dropped
    silently.
    """
    series: dict[str, ScannedSeries] = {}
    unusable: list[tuple[Path, str]] = []
    not_dicom = 0
    for path in iter_files(root):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, AttributeError):
            not_dicom += 1
            continue
        if "SOPClassUID" not in ds and "PatientID" not in ds and "Modality" not in ds:
            not_dicom += 1
            continue
        missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
                   if not str(ds.get(k, "") or "").strip()]
        if missing:
            unusable.append((path, f"missing {', '.join(missing)}: the instance cannot be "
                                   "filed into a study/series; re-export it with its UIDs"))
            continue
        if not str(ds.get("SOPClassUID", "") or ""):
            unusable.append((path, "missing SOPClassUID"))
            continue
        s = series.setdefault(str(ds.SeriesInstanceUID), ScannedSeries(
            series_uid=str(ds.SeriesInstanceUID), study_uid=str(ds.StudyInstanceUID),
            modality=str(ds.get("Modality", "")),
            accession_hash=accession_hash(str(ds.get("AccessionNumber", "") or ""))))
        ts = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
        s.files.append((path.resolve(), str(ds.SOPInstanceUID), str(ds.SOPClassUID), ts))
    return ScanResult(series=series, unusable=unusable, not_dicom=not_dicom)


def _record(db: Database, s: ScannedSeries) -> int:
    """Record a scanned series' instances; returns how many were new."""
    new = 0
    for path, sop, cls, ts in s.files:
        new += db.record_instance(
            sop_instance_uid=sop, sop_class_uid=cls, study_uid=s.study_uid,
            series_uid=s.series_uid, path=str(path), transfer_syntax=ts, calling_ae="",
            source="replay", modality=s.modality, accession_hash=s.accession_hash,
            size=path.stat().st_size)
    return new


def replay(root: Path, config: Config, *, workers: int = 1, force: bool = False,
           progress: bool = True) -> tuple[list[dict[str, object]], ScanResult]:
    """Process every series below ``root``.

    Parameters
    ----------
    root : pathlib.Path
        Directory tree of DICOM files.
    config : Config
        Effective configuration (database, result folders, destinations).
    workers : int
        Series processed in parallel.
    force : bool
        Re-process series already done (the new SR supersedes the old one).
    progress : bool
        Show a tqdm progress bar on stderr.

    Returns
    -------
    rows : list of dict
        One summary row per series: series_uid, modality, instances, status, reason.
    scan : ScanResult
        What the walk found, including unusable files.
    """
    from screener.export import Exporter
    from screener.worker import run_job

    config.ensure_dirs()
    db = Database(config.db_path)
    db.requeue_running_jobs()
    found = scan(root)
    log.info("replay.scanned", root=str(root), series=len(found.series),
             unusable=len(found.unusable), not_dicom=found.not_dicom)
    todo: list[int] = []
    rows: dict[str, dict[str, object]] = {}
    for uid, s in found.series.items():
        new = _record(db, s)
        last = db.last_job(uid)
        row = {"series_uid": uid, "modality": s.modality, "instances": len(s.files)}
        if last and not force and new == 0 and last["status"] in ("done", "skipped"):
            row.update(status="already " + last["status"], reason=last["reason"] or "")
            rows[uid] = row
            continue
        if last and last["status"] in ("pending", "running") and not force:
            job_id = int(last["id"])
        else:
            job_id = db.enqueue_job(uid, source="replay")
        rows[uid] = row
        todo.append(job_id)

    def _run(job_id: int) -> None:
        job = db.get_job(job_id)
        run_job(job, db, config)

    bar = tqdm(total=len(todo), unit="series", disable=not progress, file=sys.stderr,
               desc="replay")
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(_run, j) for j in todo]
        for fut in as_completed(futures):
            fut.result()
            bar.update(1)
    bar.close()
    for job_id in todo:
        job = db.get_job(job_id)
        rows[job["series_uid"]].update(status=job["status"],
                                       reason=job["reason"] or job["error"] or "")
    exporter = Exporter(db, config)
    exporter.run_once()
    db.close()
    return list(rows.values()), found


def format_table(rows: list[dict[str, object]], unusable: list[tuple[Path, str]]) -> str:
    """The end-of-run summary as a plain-text table."""
    out = [f"{'series':<28} {'mod':<4} {'n':>5}  {'status':<16} reason"]
    for r in rows:
        uid = str(r["series_uid"])
        short = uid if len(uid) <= 28 else "…" + uid[-27:]
        out.append(f"{short:<28} {str(r['modality']):<4} {r['instances']:>5}  "
                   f"{str(r.get('status', '')):<16} {r.get('reason', '')}")
    for path, reason in unusable:
        out.append(f"unusable file {path}: {reason}")
    counts: dict[str, int] = defaultdict(int)
    for r in rows:
        counts[str(r.get("status", ""))] += 1
    summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    out.append(f"{len(rows)} series: {summary or 'none'}; {len(unusable)} unusable files")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``screener replay``."""
    p = command_parser("replay", __doc__.splitlines()[0])
    p.add_argument("study_dir", type=Path, help="folder tree of DICOM files")
    p.add_argument("--workers", type=int, default=None, help="series processed in parallel")
    p.add_argument("--force", action="store_true", help="re-process series already done")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    cfg = command_config("replay", args)
    if cfg is None:
        return 2
    configure_logging(cfg.log_level)
    if not args.study_dir.is_dir():
        print(f"screener replay: {args.study_dir} is not a directory", file=sys.stderr)
        return 2
    rows, found = replay(args.study_dir, cfg, workers=args.workers or cfg.workers,
                         force=args.force, progress=not args.no_progress)
    print(format_table(rows, found.unusable))
    failed = any(r.get("status") == "failed" for r in rows)
    return 1 if failed or found.unusable else 0
