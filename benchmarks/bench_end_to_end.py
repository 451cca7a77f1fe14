"""End to end: seconds per 300-slice CT, received -> SR in the outbox, vs pydicom decode alone.

A virtual-cohort CT of 300 slices (512x512, 1 mm, lumbar spine in view) is sent
by DCMTK ``storescu`` (``TCP_NODELAY=1``) to a running ``screener serve`` with
the embedded defaults (SQLite, outbox, no PACS) and a 1 s quiet period. The
clock runs from the first byte sent to the SR file appearing in the outbox.
The baseline is the time pydicom alone needs to read and decode the same
files (``dcmread`` + ``pixel_array``). Both are printed with their ratio; the
quiet period (a configured wait, not work) is printed separately and also
subtracted. Run from the project root::

    python benchmarks/bench_end_to_end.py [--repeats 2] [--transfer-syntax explicit|j2k]
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
QUIET = 1.0

from benchmarks.bench_ingest import free_port, wait_port  # noqa: E402


def render_study(out: Path, seed: int, j2k: bool) -> list[Path]:
    """A 300-slice 1 mm CT of one synthetic patient, L1 in view."""
    from training.phantoms import anatomy, ct, population

    patient = population.sample_population(1, seed)[0]
    scene = anatomy.build_scene(patient)
    dss = ct.render_ct(scene, "siemens_abd_native_thin", seed, z_range=(120.0, -179.0))
    if j2k:
        from pydicom.uid import JPEG2000Lossless
        for ds in dss:
            ds.compress(JPEG2000Lossless)
    return ct.write_series(dss, out)


def decode_seconds(paths: list[Path]) -> float:
    t0 = time.perf_counter()
    for p in paths:
        pydicom.dcmread(p).pixel_array
    return time.perf_counter() - t0


def end_to_end_seconds(paths: list[Path], work: Path) -> float:
    data = work / "data"
    port = free_port()
    env = dict(os.environ, SCREENER_DATA_DIR=str(data), SCREENER_HOST="127.0.0.1",
               SCREENER_PORT=str(port), SCREENER_QUIET_SECONDS=str(QUIET),
               SCREENER_MIN_FREE_MB="1", SCREENER_ALLOWED_CALLING_AES="BENCH", TCP_NODELAY="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = open(work / "daemon.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "screener", "serve"], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port(port)
        t0 = time.perf_counter()
        subprocess.run(["/usr/bin/storescu", "-xv", "-aet", "BENCH", "-aec", "SCREENER",
                        "127.0.0.1", str(port), *map(str, paths)], env=env, check=True,
                       capture_output=True)
        outbox = data / "outbox"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            for f in outbox.rglob("*.dcm") if outbox.exists() else []:
                ds = pydicom.dcmread(f, stop_before_pixels=True)
                if ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33":
                    return time.perf_counter() - t0
            time.sleep(0.05)
        raise RuntimeError(f"no SR in the outbox after 300 s; see {work / 'daemon.log'}")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        log.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--transfer-syntax", choices=("explicit", "j2k"), default="explicit")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    try:
        e2e, dec = [], []
        for r in range(args.repeats):
            paths = render_study(tmp / f"study{r}", seed=100 + r, j2k=args.transfer_syntax == "j2k")
            dec.append(decode_seconds(paths))
            (tmp / f"run{r}").mkdir()
            e2e.append(end_to_end_seconds(paths, tmp / f"run{r}"))
        d, e = statistics.median(dec), statistics.median(e2e)
        print(f"CT: {len(paths)} slices 512x512, {args.transfer_syntax}; medians of {args.repeats} runs")
        print(f"pydicom read+decode      : {d:6.2f} s")
        print(f"received -> SR in outbox : {e:6.2f} s (includes the {QUIET:.0f} s quiet period)")
        print(f"ratio end-to-end / decode: {e / d:6.2f}x   (without the quiet period: {(e - QUIET) / d:.2f}x)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
