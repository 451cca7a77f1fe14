"""``screener replay STUDY_DIR``: backfill an archive through the daemon's own pipeline.

Walks a directory tree, groups DICOM files by series, records them in the same
database as ``screener serve`` (files stay where they are), and runs each
series through the same pipeline and records it as the daemon's job runner
(:func:`screener.worker.run_job`) does, on N worker processes (or threads, or a
Dask cluster: :mod:`screener.executors`) with a progress bar. Series already
done are skipped unless ``--force``. Results go to the configured destinations or the outbox. Ends with
a summary table; the exit status is 1 when any series failed or any file was
unusable, 2 when the folder holds no DICOM file at all (empty, or only JPEGs: one
line on stderr says how many files were seen), else 0.
"""
from __future__ import annotations

import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import structlog
from tqdm import tqdm

from screener.cli import command_config, command_parser
from screener.config import Config
from screener.db import Database
from screener.executors import (EXECUTORS, ProcessRunner, SeriesOutcome, SeriesTask, prepare_task, record_outcome,
                                run_dask, run_threads)
from screener.logs import accession_hash
from screener.validation import Rejected, read_instance

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
    not_dicom_paths: list[Path] = field(default_factory=list)
    ignored: int = 0  # instances of classes the screener does not process (e.g. SR)
    duplicates: list[Path] = field(default_factory=list)  # identical to an earlier file


#: Files with these suffixes (or none) are expected to be DICOM: when unreadable they are
#: listed as unusable. Other files (README.txt, .jpg, ...) are only counted as not DICOM.
DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".dic", ".ima", ""})


def iter_files(root: Path) -> Iterable[Path]:
    """All regular files below ``root`` in a stable order."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


def _looks_dicom(path: Path) -> bool:
    """A file that should be DICOM: a DICOM-like suffix, or the ``DICM`` prefix at 128."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _dataset_bytes(path: Path) -> bytes | None:
    """A file's data set bytes (after the File Meta when it has one)."""
    from screener.ingest import _stored_dataset_bytes
    try:
        return _stored_dataset_bytes(str(path)) or path.read_bytes()
    except OSError:
        return None


def _same_content(a: Path, b: Path) -> bool:
    """Whether two files hold the same data set (their File Meta may differ)."""
    first = _dataset_bytes(a)
    return first is not None and first == _dataset_bytes(b)


def _scan_one(path: Path, found: ScanResult, seen: dict[str, Path]) -> None:
    """Validate one file (:func:`screener.validation.read_instance`) and file it."""
    from screener.ingest import IMAGE_STORAGE_CLASSES
    if path.name.upper() == "DICOMDIR":
        found.not_dicom += 1
        found.not_dicom_paths.append(path)
        return
    try:
        ds, uids, ts = read_instance(path, frozenset(IMAGE_STORAGE_CLASSES))
    except Rejected as rej:
        if _looks_dicom(path):
            found.unusable.append((path, f"{rej.reason} (would be refused with "
                                         f"0x{rej.status:04X})"))
        else:
            found.not_dicom += 1
            found.not_dicom_paths.append(path)
        return
    if not uids["SOPClassUID"]:
        found.unusable.append((path, "missing SOPClassUID: re-export it with its SOP Class"))
        return
    if uids["SOPClassUID"] not in IMAGE_STORAGE_CLASSES:
        found.ignored += 1
        return
    sop = uids["SOPInstanceUID"]
    if sop in seen:
        if _same_content(seen[sop], path):
            found.duplicates.append(path)
        else:
            found.unusable.append((path, f"SOP Instance UID already used by {seen[sop]} with "
                                         "different content; the first file is kept"))
        return
    seen[sop] = path
    s = found.series.setdefault(uids["SeriesInstanceUID"], ScannedSeries(
        series_uid=uids["SeriesInstanceUID"], study_uid=uids["StudyInstanceUID"],
        modality=str(ds.get("Modality", "") or ""),
        accession_hash=accession_hash(str(ds.get("AccessionNumber", "") or ""))))
    s.files.append((path.resolve(), sop, uids["SOPClassUID"], ts))


def scan(root: Path, on_series: Callable[[], object] | None = None) -> ScanResult:
    """Validate every file below ``root`` and group DICOM instances by series.

    Every file goes through the validation layer the SCP uses
    (:mod:`screener.validation`): a file that should be DICOM (``.dcm`` or no
    suffix, or the ``DICM`` prefix) but cannot be parsed, lacks or has invalid
    UIDs, has bad pixel data or non-finite rescale values is listed as unusable
    with the reason, never dropped silently. Other files are counted as not
    DICOM; instances of classes the screener does not process are counted as
    ignored; a second file with the same SOP Instance UID and different content
    is unusable (the first is kept). ``on_series()`` is called when the first
    series is found (replay starts its workers then, while the walk goes on).
    """
    found = ScanResult(series={}, unusable=[])
    seen: dict[str, Path] = {}
    for path in iter_files(root):
        try:
            _scan_one(path, found, seen)
        except Exception as exc:  # noqa: BLE001 - one odd file never stops a replay
            found.unusable.append((path, f"cannot be read: {type(exc).__name__}: {exc}"))
        if on_series is not None and found.series:
            on_series()
            on_series = None
    return found


def _record(db: Database, s: ScannedSeries, found: ScanResult) -> int:
    """Record a scanned series' instances; returns how many were new.

    An instance whose SOP Instance UID is already recorded from another file with
    different content is a conflict: the first version is kept, the file is listed
    as unusable and the conflict recorded (as the SCP does with status 0xB006).
    """
    new = 0
    for path, sop, cls, ts in s.files:
        added = db.record_instance(
            sop_instance_uid=sop, sop_class_uid=cls, study_uid=s.study_uid,
            series_uid=s.series_uid, path=str(path), transfer_syntax=ts, calling_ae="",
            source="replay", modality=s.modality, accession_hash=s.accession_hash,
            size=path.stat().st_size)
        new += added
        if added:
            continue
        first = Path(str((db.get_instance(sop) or {}).get("path") or path))
        if first != path and first.is_file() and not _same_content(first, path):
            reason = (f"SOP Instance UID already recorded from {first} with different "
                      "content; the first version is kept")
            found.unusable.append((path, reason))
            db.record_rejection(sop_instance_uid=sop, calling_ae="", status=0xB006,
                                reason=reason)
    return new


def replay(root: Path, config: Config, *, workers: int = 1, force: bool = False,
           progress: bool = True, executor: str = "threads", scheduler: Any = None,
           process: str | None = None) -> tuple[list[dict[str, object]], ScanResult]:
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
    executor : {"threads", "processes", "dask"}
        Where the series run (:mod:`screener.executors`): threads of this process, ``workers``
        processes that keep their bundles loaded, or the Dask cluster at ``scheduler``.  The walk,
        the database and the export stay here whichever it is.
    scheduler : str or distributed.Client, optional
        With ``executor="dask"``: ``tcp://HOST:8786`` (or a client).
    process : str, optional
        ``"module:function"`` of the pipeline (default :func:`screener.pipeline.process_series`).

    Returns
    -------
    rows : list of dict
        One summary row per series: series_uid, modality, instances, status, reason.
    scan : ScanResult
        What the walk found, including unusable files.
    """
    if executor not in EXECUTORS:
        raise ValueError(f"executor {executor!r}: choose one of {', '.join(EXECUTORS)}")
    if executor == "dask" and scheduler is None:
        raise ValueError("executor 'dask' needs the scheduler's address: --scheduler tcp://HOST:8786")
    config.ensure_dirs()
    runner = ProcessRunner(config, workers) if executor == "processes" else None
    try:
        return _replay(root, config, workers, force, progress, executor, scheduler, process, runner)
    finally:
        if runner is not None:
            runner.close()


def _replay(root: Path, config: Config, workers: int, force: bool, progress: bool, executor: str,
            scheduler: Any, process: str | None, runner: ProcessRunner | None
            ) -> tuple[list[dict[str, object]], ScanResult]:
    """:func:`replay` with its process workers (``runner``) made: started as the walk finds a series."""
    from screener.export import Exporter

    db = Database(config.db_path)
    db.requeue_running_jobs()
    found = scan(root, on_series=runner.start if runner is not None else None)
    log.info("replay.scanned", root=str(root), series=len(found.series),
             unusable=len(found.unusable), not_dicom=found.not_dicom, ignored=found.ignored,
             duplicates=len(found.duplicates))
    todo: list[int] = []
    rows: dict[str, dict[str, object]] = {}
    for uid, s in found.series.items():
        new = _record(db, s, found)
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

    bar = tqdm(total=len(todo), unit="series", disable=not progress or not todo,
               file=sys.stderr, desc="replay")
    if executor == "threads":
        run_threads(todo, db, config, workers, lambda _job_id: bar.update(1), process=process)
    else:
        tasks = []
        for job_id in todo:  # settled here (missing files, not quantitative) or sent to a worker
            task = prepare_task(db.get_job(job_id), db, config, process=process)
            if task is None:
                bar.update(1)
            else:
                tasks.append(task)

        def _done(task: SeriesTask, outcome: SeriesOutcome) -> None:
            record_outcome(task, outcome, db, config)
            bar.update(1)

        if runner is not None:
            runner.run(tasks, _done)
        elif tasks:
            run_dask(tasks, config, scheduler, _done)
    bar.close()
    for job_id in todo:
        job = db.get_job(job_id)
        rows[job["series_uid"]].update(status=job["status"],
                                       reason=job["reason"] or job["error"] or "")
    exporter = Exporter(db, config)
    exporter.run_once()
    db.close()
    return list(rows.values()), found


def format_table(rows: list[dict[str, object]], unusable: list[tuple[Path, str]],
                 not_dicom: list[Path] | None = None, ignored: int = 0,
                 duplicates: list[Path] | None = None) -> str:
    """The end-of-run summary as a plain-text table.

    Parameters
    ----------
    rows : list of dict
        One per series (see :func:`replay`).
    unusable : list of (path, reason)
        Files that should be DICOM but cannot be used; each is listed.
    not_dicom : list of pathlib.Path, optional
        Other files skipped (counted, the first five named).
    ignored : int
        Instances of classes the screener does not process.
    duplicates : list of pathlib.Path, optional
        Files identical to an earlier one (same SOP Instance UID and data set), skipped.

    Returns
    -------
    str
    """
    out = [f"{'series':<28} {'mod':<4} {'n':>5}  {'status':<16} reason"]
    for r in rows:
        uid = str(r["series_uid"])
        short = uid if len(uid) <= 28 else "…" + uid[-27:]
        out.append(f"{short:<28} {str(r['modality']):<4} {r['instances']:>5}  "
                   f"{str(r.get('status', '')):<16} {r.get('reason', '')}")
    for path, reason in unusable:
        out.append(f"unusable file {path}: {reason}")
    if unusable:
        out.append("unusable files were not processed: re-export them from their source system "
                   "(or correct the attribute named) and replay the folder again")
    counts: dict[str, int] = defaultdict(int)
    for r in rows:
        counts[str(r.get("status", ""))] += 1
    summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    tail = f"{len(rows)} series: {summary or 'none'}; {len(unusable)} unusable files"
    if not_dicom:
        names = ", ".join(str(p) for p in not_dicom[:5]) + (", ..." if len(not_dicom) > 5 else "")
        tail += f"; {len(not_dicom)} files not DICOM, skipped ({names})"
    if ignored:
        tail += f"; {ignored} instances of classes not processed (e.g. SR), ignored"
    if duplicates:
        names = ", ".join(str(p) for p in duplicates[:5]) + (", ..." if len(duplicates) > 5 else "")
        tail += (f"; {len(duplicates)} duplicate files (identical to an earlier one), "
                 f"skipped ({names})")
    out.append(tail)
    return "\n".join(out)


def no_dicom_message(root: Path, found: ScanResult) -> str:
    """The one line printed when a folder holds no DICOM file at all (empty, or only JPEGs).

    Parameters
    ----------
    root : pathlib.Path
    found : ScanResult

    Returns
    -------
    str
    """
    n = found.not_dicom
    if n == 0:
        return (f"no DICOM files in {root}: 0 files seen (the folder is empty); "
                "point replay at the folder that holds the exported .dcm files")
    names = ", ".join(p.name for p in found.not_dicom_paths[:3]) + (", ..." if n > 3 else "")
    return (f"no DICOM files in {root}: {n} file{'s' if n != 1 else ''} seen, {n} not DICOM "
            f"({names}); export the studies as DICOM (.dcm, or files with the DICM prefix)")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``screener replay``."""
    p = command_parser("replay", __doc__.splitlines()[0])
    p.add_argument("study_dir", type=Path, help="folder tree of DICOM files")
    p.add_argument("--workers", type=int, default=None, help="series processed in parallel")
    p.add_argument("--force", action="store_true", help="re-process series already done")
    p.add_argument("--executor", choices=EXECUTORS, default="processes",
                   help="where the series run: worker processes that keep their models loaded (default), "
                        "threads of this process, or a Dask cluster (--scheduler)")
    p.add_argument("--scheduler", default=None, metavar="tcp://HOST:8786",
                   help="the Dask scheduler's address (with --executor dask)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    cfg = command_config("replay", args, writes=True)
    if cfg is None:
        return 2
    if not args.study_dir.is_dir():
        print(f"screener replay: {args.study_dir} is not a directory", file=sys.stderr)
        return 2
    if args.executor == "dask" and not args.scheduler:
        print("screener replay: --executor dask needs --scheduler tcp://HOST:8786 (the address "
              "dask-scheduler prints)", file=sys.stderr)
        return 2
    if args.scheduler and args.executor != "dask":
        print("screener replay: --scheduler is for --executor dask", file=sys.stderr)
        return 2
    rows, found = replay(args.study_dir, cfg, workers=args.workers or cfg.workers,
                         force=args.force, progress=not args.no_progress, executor=args.executor,
                         scheduler=args.scheduler)
    if not rows and not found.unusable and not found.ignored and not found.duplicates:
        print(f"screener replay: {no_dicom_message(args.study_dir, found)}", file=sys.stderr)
        return 2
    print(format_table(rows, found.unusable, found.not_dicom_paths, found.ignored,
                       found.duplicates))
    failed = any(r.get("status") == "failed" for r in rows)
    return 1 if failed or found.unusable else 0
