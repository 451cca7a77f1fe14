"""Ingest throughput: ``screener serve`` vs DCMTK ``storescp`` and vs a receiver that fsyncs.

The same N CT instances (default 300 synthetic 512x512 16-bit slices, explicit
VR little endian, ~0.5 MB each; ``--j2k`` uses the shared real CT, JPEG 2000,
repeated with fresh UIDs) are sent over loopback by DCMTK ``storescu`` (with
``TCP_NODELAY=1``) on K associations at once (the series split into K
contiguous parts, one ``storescu`` each; ``--assocs 1,4`` measures K = 1 and
K = 4) to

* ``storescp``: DCMTK ``/usr/bin/storescp`` writing into a temp folder (no fsync,
  no database; single process, so it takes the K associations one after another);
* ``pynet-rx``: a minimal pynetdicom receiver (this script, ``--null-receiver``)
  that takes each data set and answers success, writing nothing: what
  pynetdicom itself costs;
* ``fsync-rx``: the same receiver (``--fsync-receiver``) writing each file,
  ``fdatasync``ing it and fsyncing its folder before answering success, one
  instance at a time: a storescp-like receiver that fsyncs each file, the floor
  of durable ingest in Python, with none of the screener's checks and no database;
* ``screener``: ``python -m screener serve`` (validation, fsync'ed write, group
  commit of the folder fsync and the SQLite row; processing disabled by a very
  long quiet period), measured once its start-up (the torch import of the
  device probe) is over,

``--repeats`` times each (fresh UIDs every run). Before the runs it measures
the disk: write + ``fdatasync`` + folder fsync of one instance-sized file, and
one SQLite ``synchronous=FULL`` commit (the per-instance durability costs that
a group commit shares). Prints instances/s and the ratios (medians of the
repeats), the receiver's CPU time per instance (user + system, all its threads,
from ``/proc``) and the load average. Run from the project root::

    nice -n -10 python benchmarks/bench_ingest.py [--n 300] [--repeats 3] [--assocs 1,4] [--j2k]
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import sqlite3
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
CALLING_AE = "BENCH"


def free_port() -> int:
    """A free loopback TCP port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 60) -> None:
    """Wait until something listens on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def synthetic_ct(out: Path, n: int) -> list[Path]:
    """``n`` synthetic 512x512 CT slices (explicit VR little endian) in ``out``."""
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
    """``n`` instances of the shared JPEG 2000 CT (repeated) with fresh UIDs."""
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


def send(port: int, files: list[Path], ts_flag: str, assocs: int = 1) -> float:
    """Send ``files`` on ``assocs`` concurrent ``storescu`` associations; wall seconds."""
    env = dict(os.environ, TCP_NODELAY="1")
    step = -(-len(files) // assocs)
    parts = [files[i:i + step] for i in range(0, len(files), step)]
    t = time.perf_counter()
    procs = [subprocess.Popen(["/usr/bin/storescu", ts_flag, "-aet", CALLING_AE, "-aec",
                               "SCREENER", "127.0.0.1", str(port), *map(str, part)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for part in parts]
    outs = [p.communicate() for p in procs]
    dt = time.perf_counter() - t
    for p, (_, err) in zip(procs, outs):
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed ({p.returncode}): {err[-2000:]}")
    return dt


#: CPU seconds the receiver of the last run spent while the files were sent (``None``
#: where not measured).
LAST_CPU: list[float | None] = [None]


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) process ``pid`` has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def send_measured(proc: subprocess.Popen[bytes], port: int, files: list[Path], ts_flag: str,
                  assocs: int) -> float:
    """:func:`send`, noting the receiver's CPU seconds meanwhile in :data:`LAST_CPU`."""
    before = proc_cpu(proc.pid)
    dt = send(port, files, ts_flag, assocs)
    LAST_CPU[0] = proc_cpu(proc.pid) - before
    return dt


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    proc.send_signal(sig)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def run_storescp(files: list[Path], ts_flag: str, work: Path, assocs: int) -> float:
    """DCMTK ``storescp`` (no fsync, no database)."""
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
        return send_measured(proc, port, files, ts_flag, assocs)
    finally:
        _stop(proc)


def fsync_receiver(port: int, out: Path, write: bool = True) -> None:
    """A storescp-like pynetdicom SCP that only writes, fdatasyncs and folder-fsyncs.

    Each instance is written to a temp name in ``out``, ``fdatasync``'ed,
    renamed to ``<SOP Instance UID>.dcm`` and the folder fsync'ed before
    success is returned: per-instance durability, no checks, no database.
    With ``write=False`` it only takes the data set's bytes and answers
    success: what the receive path itself costs. Its associations take the
    screener's network path (:mod:`screener.scp_reactor`: blocking loops, the
    C-STORE fast path).
    """
    import threading
    import types

    from pynetdicom import AE, AllStoragePresentationContexts, evt
    from pynetdicom.sop_class import Verification

    from screener import scp_reactor
    from screener.ingest import DUL_POLL_SECONDS, TRANSFER_SYNTAXES, _recv_exact

    out.mkdir(parents=True, exist_ok=True)

    def on_store(event: evt.Event) -> int:
        if not write:
            event.encoded_dataset(include_meta=True)
            return 0x0000
        sop = str(event.request.AffectedSOPInstanceUID).strip()
        tmp = out / f".{sop}.part"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, bytes(event.encoded_dataset(include_meta=True)))
            os.fdatasync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, out / f"{sop}.dcm")
        dfd = os.open(out, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return 0x0000

    def on_open(event: evt.Event) -> None:  # the same network path as the screener's SCP
        if scp_reactor.install(event.assoc):
            return
        event.assoc.dul._run_loop_delay = DUL_POLL_SECONDS
        sock = event.assoc.dul.socket
        sock.recv = types.MethodType(_recv_exact, sock)

    ae = AE(ae_title="SCREENER")
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    ae.maximum_pdu_size = 0
    ae.maximum_associations = 16
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store),
                                           (evt.EVT_CONN_OPEN, on_open)])
    scp_reactor.speed_up_server(server)
    threading.Event().wait()


def run_fsync_rx(files: list[Path], ts_flag: str, work: Path, assocs: int,
                 mode: str = "--fsync-receiver") -> float:
    """The minimal pynetdicom receiver that fsyncs each file (see :func:`fsync_receiver`)."""
    port = free_port()
    out = work / "fsync-rx-out"
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, __file__, mode, str(port), str(out)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        return send_measured(proc, port, files, ts_flag, assocs)
    finally:
        _stop(proc, signal.SIGKILL)


def run_pynet_rx(files: list[Path], ts_flag: str, work: Path, assocs: int) -> float:
    """The same pynetdicom receiver writing nothing: pynetdicom's own cost."""
    return run_fsync_rx(files, ts_flag, work, assocs, mode="--null-receiver")


def run_screener(files: list[Path], ts_flag: str, work: Path, assocs: int) -> float:
    """``python -m screener serve``, measured after its start-up work is over."""
    port = free_port()
    data = work / "screener-data"
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    env = dict(os.environ, SCREENER_DATA_DIR=str(data), SCREENER_PORT=str(port),
               SCREENER_HOST="127.0.0.1", SCREENER_QUIET_SECONDS="100000",
               SCREENER_MIN_FREE_MB="1", SCREENER_ALLOWED_CALLING_AES=CALLING_AE,
               SCREENER_LOG_LEVEL="info",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log_path = work / "screener.log"
    with open(log_path, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "screener", "serve", "--log-format",
                                 "json"], env=env, cwd=str(ROOT), stdout=fh,
                                stderr=subprocess.STDOUT)
    try:
        wait_port(port)
        # the device probe imports torch in a thread after the listener is up; it would
        # compete for the CPUs and the GIL with the first instances: wait for its log line
        deadline = time.monotonic() + 120
        while b"inference device" not in log_path.read_bytes():
            if time.monotonic() > deadline or proc.poll() is not None:
                break
            time.sleep(0.1)
        return send_measured(proc, port, files, ts_flag, assocs)
    finally:
        _stop(proc)


def disk_costs(work: Path, size: int, n: int = 50) -> tuple[float, float]:
    """Median seconds of (write + fdatasync + folder fsync of ``size`` bytes,
    one SQLite WAL ``synchronous=FULL`` commit of one row)."""
    d = work / "disk"
    d.mkdir(parents=True, exist_ok=True)
    buf = os.urandom(size)
    t_file = []
    for i in range(n):
        t = time.perf_counter()
        fd = os.open(d / f"{i}.part", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, buf)
        os.fdatasync(fd)
        os.close(fd)
        os.replace(d / f"{i}.part", d / f"{i}.dcm")
        dfd = os.open(d, os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)
        t_file.append(time.perf_counter() - t)
    conn = sqlite3.connect(str(d / "t.db"), isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("create table t (k text primary key, v text)")
    t_db = []
    for i in range(n):
        t = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("insert into t values (?, ?)", (str(i), "x" * 200))
        conn.execute("COMMIT")
        t_db.append(time.perf_counter() - t)
    conn.close()
    shutil.rmtree(d)
    return statistics.median(t_file), statistics.median(t_db)


SERVERS = {"storescp": run_storescp, "pynet-rx": run_pynet_rx, "fsync-rx": run_fsync_rx,
           "screener": run_screener}


def main() -> int:
    """Run the benchmark and print its table."""
    if len(sys.argv) == 4 and sys.argv[1] in ("--fsync-receiver", "--null-receiver"):
        fsync_receiver(int(sys.argv[2]), Path(sys.argv[3]),
                       write=sys.argv[1] == "--fsync-receiver")
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300, help="instances per run (default 300)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per server (default 3)")
    ap.add_argument("--assocs", default="1,4",
                    help="concurrent associations, comma-separated (default 1,4)")
    ap.add_argument("--j2k", action="store_true", help="send the real JPEG 2000 CT (repeated)")
    args = ap.parse_args()
    ks = [int(k) for k in args.assocs.split(",") if k.strip()]
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-", dir=os.environ.get("BENCH_TMP")))
    try:
        flag = "-xv" if args.j2k else "-xe"
        make = real_j2k if args.j2k else synthetic_ct
        probe = make(work / "probe", 1)
        size = probe[0].stat().st_size
        t_file, t_db = disk_costs(work, size)
        times: dict[tuple[str, int], list[float]] = {}
        cpus: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.repeats):
            for k in ks:
                files = make(work / "in", args.n)
                for name, run in SERVERS.items():
                    times.setdefault((name, k), []).append(run(files, flag, work, k))
                    cpus.setdefault((name, k), []).append(LAST_CPU[0] or 0.0)
                shutil.rmtree(work / "in")
        kind = "real CT JPEG 2000" if args.j2k else "synthetic CT 512x512 explicit LE"
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"ingest of {args.n} instances ({kind}, {size / 1e6:.2f} MB each), median of"
              f" {args.repeats} runs; load average {load} on {os.cpu_count()} CPUs;"
              f" {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
        print(f"  disk: write + fdatasync + folder fsync of one instance {t_file * 1e3:.2f} ms"
              f" (one at a time: {1 / t_file:.0f} instances/s); one SQLite FULL commit"
              f" {t_db * 1e3:.2f} ms")
        for k in ks:
            med = {name: statistics.median(times[(name, k)]) for name in SERVERS}
            print(f"  {k} association{'s' if k > 1 else ''} (storescu x{k}, the series split"
                  f" {k} ways):")
            for name in SERVERS:
                runs = ", ".join(f"{x:.2f}" for x in times[(name, k)])
                cpu = statistics.median(cpus[(name, k)]) / args.n * 1e3
                print(f"    {name:9s}: {med[name]:6.2f} s {args.n / med[name]:7.1f} instances/s"
                      f"   receiver CPU {cpu:4.2f} ms/instance   runs {runs}")
            print(f"    ratio screener/storescp {med['storescp'] / med['screener']:.2f}x;"
                  f" screener/fsync-rx {med['fsync-rx'] / med['screener']:.2f}x;"
                  f" fsync-rx/storescp {med['storescp'] / med['fsync-rx']:.2f}x;"
                  f" pynet-rx/storescp {med['storescp'] / med['pynet-rx']:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
