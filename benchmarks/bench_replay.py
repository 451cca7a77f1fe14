"""Replay of a CT cohort with 1 and with 2 worker processes (issue 21: >= 1.7x on a 2-core machine).

Renders ``--series`` virtual-cohort abdomen-pelvis CTs (5 mm, about 95 slices each), then replays
the folder into fresh data directories with ``--executor processes`` and every CT protocol with the
shipped bundles, alternately with one worker and with ``--workers`` workers (``--repeats`` times
each; the fastest of each counts), and prints the wall time of each whole replay (walk, pool start
with its bundle loading, series, export) and the ratio.  Every run must agree on every series'
status; a last run through a 2-worker ``dask`` ``LocalCluster`` must give the same results JSON as
the first 1-worker one.  After each pair of runs, ``--workers`` processes that only burn CPU
measure how many cores the machine gives them now (other jobs on a shared machine take cores from
the parallel run: the speed-up cannot exceed that figure)::

    python benchmarks/bench_replay.py [--series 8] [--workers 2] [--repeats 2] [--no-dask]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROFILES = ("canon_ap_native", "siemens_ap_pv")


def render(out: Path, n: int, seed: int = 31) -> None:
    """``n`` cohort CTs below ``out`` (one folder per patient)."""
    from training.phantoms.anatomy import build_scene
    from training.phantoms.ct import render_ct, write_series
    from training.phantoms.population import make_patient

    for i in range(n):
        scene = build_scene(make_patient(seed, i))
        write_series(render_ct(scene, PROFILES[i % len(PROFILES)], seed), out / f"patient{i:02d}" / "ct")


def timed_replay(folder: Path, data: Path, workers: int, scheduler: str | None = None
                 ) -> tuple[float, dict[str, str]]:
    """Seconds of one whole replay (on ``workers`` processes, or the Dask ``scheduler``) and each
    series' status."""
    from screener.config import load_config
    from screener.replay import replay

    cfg = load_config(env={"SCREENER_DEVICE": "cpu", "SCREENER_LOG_LEVEL": "warning"}, data_dir=data)
    t0 = time.perf_counter()
    rows, _ = replay(folder, cfg, workers=workers, progress=False,
                     executor="dask" if scheduler else "processes", scheduler=scheduler)
    return time.perf_counter() - t0, {str(r["series_uid"]): str(r["status"]) for r in rows}


def _burn(seconds: float) -> float:
    t0 = time.process_time()
    while time.process_time() - t0 < seconds:
        pass
    return seconds


def cpu_ceiling(workers: int, seconds: float = 2.0) -> float:
    """How many cores ``workers`` CPU-bound processes get on this machine now: each burns ``seconds``
    of CPU; the CPU seconds over the wall seconds (``workers`` on an idle machine)."""
    import multiprocessing

    with multiprocessing.get_context("forkserver").Pool(workers) as pool:
        t0 = time.perf_counter()
        pool.map(_burn, [seconds] * workers)
        return workers * seconds / (time.perf_counter() - t0)


def results_json(data: Path) -> str:
    """``screener results --format json`` of a data directory, in a fixed order."""
    from screener.db import Database
    from screener.results import finding_records

    recs = finding_records(Database(data / "screener.db"))
    recs.sort(key=lambda r: (r["study_uid"], r["protocol"] != "study result", r["series_uid"], r["protocol"]))
    return json.dumps(recs, sort_keys=True, default=float)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--series", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2,
                    help="alternated runs of each; the fastest counts (other jobs on a shared machine slow some)")
    ap.add_argument("--no-dask", action="store_true", help="skip the run through a 2-worker dask LocalCluster")
    args = ap.parse_args(argv)

    from screener.logs import configure_logging

    configure_logging("warning")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "cohort"
        t0 = time.perf_counter()
        render(folder, args.series)
        print(f"rendered {args.series} CT series in {time.perf_counter() - t0:.0f} s; "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
        ones, manys, ceilings, s1, s2 = [], [], [], {}, {}
        for r in range(args.repeats):  # alternated, each into a fresh data directory
            secs, s1 = timed_replay(folder, Path(tmp) / f"one-{r}", 1)
            ones.append(secs)
            print(f"1 worker process:   {secs:6.1f} s  ({secs / args.series:.1f} s per series)  "
                  f"load average {os.getloadavg()[0]:.1f}", flush=True)
            secs, s2 = timed_replay(folder, Path(tmp) / f"many-{r}", args.workers)
            manys.append(secs)
            print(f"{args.workers} worker processes: {secs:6.1f} s  ({secs / args.series:.1f} s per series)  "
                  f"load average {os.getloadavg()[0]:.1f}", flush=True)
            if s1 != s2:
                print(f"the two runs disagree: {s1} vs {s2}")
                return 1
            ceilings.append(cpu_ceiling(args.workers))
            print(f"{args.workers} CPU-bound processes get {ceilings[-1]:.2f} cores here now", flush=True)
        one, many = min(ones), min(manys)
        done = sum(s == "done" for s in s1.values())
        print(f"{done}/{len(s1)} series done in every run; speed-up {one / many:.2f}x with {args.workers} workers "
              f"(fastest of {args.repeats} runs each: {one:.1f} s vs {many:.1f} s; goal >= 1.7x on 2 cores); "
              f"the machine gave {args.workers} CPU-bound processes {min(ceilings):.2f}-{max(ceilings):.2f} cores")
        if not args.no_dask:
            from distributed import LocalCluster

            with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
                secs, s3 = timed_replay(folder, Path(tmp) / "dask", 1, scheduler=cluster.scheduler_address)
            same = s3 == s1 and results_json(Path(tmp) / "dask") == results_json(Path(tmp) / "one-0")
            print(f"2-worker dask LocalCluster: {secs:6.1f} s; results JSON {'identical to' if same else 'DIFFERENT from'} "
                  f"the 1-worker run")
            if not same:
                return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
