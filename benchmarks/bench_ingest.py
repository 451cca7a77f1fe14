"""Ingest throughput: ``screener serve`` vs DCMTK ``storescp``, both fed by DCMTK ``storescu``.

The same N CT instances (default 300 synthetic 512x512 16-bit slices, explicit
VR little endian, ~0.5 MB each; ``--j2k`` uses the shared real CT, JPEG 2000,
repeated with fresh UIDs) are sent over loopback with ``TCP_NODELAY=1`` to

* ``/usr/bin/storescp`` writing into a temp folder (no fsync, no database), and
* ``python -m screener serve`` (fsync'ed atomic write + SQLite commit per instance,
  processing disabled by a very long quiet period),

``--repeats`` times each (fresh UIDs every run). Prints instances/s and the
ratio screener / storescp (median of the repeats). Run from the project root::

    python benchmarks/bench_ingest.py [--n 300] [--repeats 3] [--j2k]
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parents[1]
REAL_CT = ROOT.parent / "shared" / "data" / "ct-upper-abdomen-j2k"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def synthetic_ct(out: Path, n: int) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    pixels = np.random.default_rng(0).integers(0, 2000, (512, 512)).astype("<u2").tobytes()
    paths = []
    for k in range(n):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientName, ds.PatientID, ds.Modality = "Bench^Mark", "BENCH", "CT"
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(k)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], 1.0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = 512
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = pixels
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        p = out / f"{k:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def real_j2k(out: Path, n: int) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    src = sorted(p for p in REAL_CT.iterdir() if p.is_file())
    study, series = generate_uid(), generate_uid()
    paths = []
    for k in range(n):
        ds = pydicom.dcmread(src[k % len(src)])
        sop = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, sop
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        p = out / f"{k:04d}.dcm"
        ds.save_as(p)
        paths.append(p)
    return paths


def send(port: int, files: list[Path], ts_flag: str) -> float:
    env = dict(os.environ, TCP_NODELAY="1")
    t = time.perf_counter()
    r = subprocess.run(["/usr/bin/storescu", ts_flag, "-aet", "BENCH", "-aec", "SCREENER",
                        "127.0.0.1", str(port), *map(str, files)],
                       capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"storescu failed ({r.returncode}): {r.stderr[-2000:]}")
    return dt


def run_storescp(files: list[Path], ts_flag: str, work: Path) -> float:
    port = free_port()
    out = work / "storescp-out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = dict(os.environ, TCP_NODELAY="1")
    proc = subprocess.Popen(["/usr/bin/storescp", "-aet", "SCREENER", "+xa", "-od", str(out),
                             str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        return send(port, files, ts_flag)
    finally:
        proc.terminate()
        proc.wait(10)


def run_screener(files: list[Path], ts_flag: str, work: Path) -> float:
    port = free_port()
    data = work / "screener-data"
    shutil.rmtree(data, ignore_errors=True)
    env = dict(os.environ, SCREENER_DATA_DIR=str(data), SCREENER_PORT=str(port),
               SCREENER_HOST="127.0.0.1", SCREENER_QUIET_SECONDS="100000",
               SCREENER_MIN_FREE_MB="1", SCREENER_ALLOWED_CALLING_AES="BENCH",
               SCREENER_LOG_LEVEL="warning",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "screener", "serve"], env=env, cwd=str(ROOT),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        return send(port, files, ts_flag)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300, help="instances per run (default 300)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per server (default 3)")
    ap.add_argument("--j2k", action="store_true", help="send the real JPEG 2000 CT (repeated)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    try:
        scp_times, scr_times = [], []
        for _ in range(args.repeats):
            files = (real_j2k if args.j2k else synthetic_ct)(work / "in", args.n)
            flag = "-xv" if args.j2k else "-xe"
            scp_times.append(run_storescp(files, flag, work))
            scr_times.append(run_screener(files, flag, work))
            shutil.rmtree(work / "in")
        a, b = statistics.median(scp_times), statistics.median(scr_times)
        kind = "real CT JPEG 2000" if args.j2k else "synthetic CT 512x512 explicit LE"
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"ingest of {args.n} instances ({kind}), median of {args.repeats} runs;"
              f" load average {load} on {os.cpu_count()} CPUs")
        print(f"  storescp        : {a:7.2f} s  {args.n / a:7.1f} instances/s  runs {scp_times}")
        print(f"  screener serve  : {b:7.2f} s  {args.n / b:7.1f} instances/s  runs {scr_times}")
        print(f"  ratio screener/storescp throughput: {a / b:.2f}x"
              "  (storescp does not fsync; screener makes each instance durable before"
              " answering: file fdatasync + folder fsync || SQLite WAL commit)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
