"""Helpers for tests that run the daemon, DCMTK and Orthanc as real processes.

- :func:`make_ct_series` writes a small synthetic axial CT series (any transfer syntax).
- :func:`fresh_uid_copy` copies the shared real CT giving it fresh Study/Series/SOP UIDs.
- :class:`Daemon` runs ``python -m screener serve`` on a free loopback port, accepting the
  calling AE title ``TESTSCU`` (override ``SCREENER_ALLOWED_CALLING_AES`` in ``env``).
- :class:`Orthanc` runs ``/usr/sbin/Orthanc`` with a temp config (loopback DICOM + HTTP).
- :func:`fake_process_series` is a stand-in pipeline that writes one valid Secondary
  Capture result per series (for networking tests that must not depend on the real one).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.conftest import ROOT, free_port, require_tool

PATIENT_NAME = "Testpatient^Secret"
PATIENT_ID = "PID-4711-SECRET"
PATIENT_BIRTH = "19411122"
ACCESSION = "ACC-998877"


def make_ct_series(out_dir: Path, n: int = 5, rows: int = 64, cols: int = 64,
                   transfer_syntax: str = ExplicitVRLittleEndian, study_uid: str | None = None,
                   series_uid: str | None = None, start: int = 0) -> list[Path]:
    """Write ``n`` axial CT slices (uint16, rescale -1024) and return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    paths = []
    rng = np.random.default_rng(n + rows)
    for k in range(start, start + n):
        ds = Dataset()
        ds.SOPClassUID = pydicom.uid.CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = PATIENT_NAME, PATIENT_ID, PATIENT_BIRTH
        ds.PatientSex, ds.AccessionNumber, ds.StudyID = "F", ACCESSION, "1"
        ds.StudyDate, ds.StudyTime, ds.Modality = "20260101", "120000", "CT"
        ds.SeriesNumber, ds.InstanceNumber = 2, k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [-100.0, -100.0, -2.5 * k]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing, ds.SliceThickness = [1.5, 1.5], 2.5
        ds.KVP, ds.RescaleIntercept, ds.RescaleSlope = 120, -1024, 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = (rng.integers(900, 1300, (rows, cols))).astype("<u2").tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        if pydicom.uid.UID(transfer_syntax).is_compressed:
            ds.compress(transfer_syntax)
        else:  # implicit / explicit / deflated little endian: written by save_as
            ds.file_meta.TransferSyntaxUID = transfer_syntax
        p = out_dir / f"ct{k:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def fresh_uid_copy(src_dir: Path, out_dir: Path) -> list[Path]:
    """Copy every file of ``src_dir`` with new Study/Series/SOP UIDs (pixel data untouched)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    out = []
    for i, f in enumerate(sorted(p for p in src_dir.iterdir() if p.is_file())):
        ds = pydicom.dcmread(f)
        sop = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, sop
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        p = out_dir / f"{i:04d}.dcm"
        ds.save_as(p)
        out.append(p)
    return out


def fake_process_series(paths: list[Path], *, config: Any, out_dir: Path,
                        supersedes: str | None = None, **_: Any) -> Any:
    """Stand-in for ``screener.pipeline.process_series``: one Secondary Capture per series.

    The SC copies the patient/study of the first instance; ``supersedes`` is echoed.
    """
    from screener.pipeline import OutputObject, PipelineResult
    ref = pydicom.dcmread(sorted(paths)[0], stop_before_pixels=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    ds = Dataset()
    ds.SOPClassUID = pydicom.uid.SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    for kw in ("StudyInstanceUID", "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
               "AccessionNumber", "StudyID", "StudyDate", "StudyTime"):
        setattr(ds, kw, ref.get(kw, ""))
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = generate_uid(), 901, 1
    ds.Modality, ds.ConversionType = "OT", "WSD"
    ds.SeriesDescription = f"fake result of {len(paths)} instances"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(range(256))
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = out_dir / "sc.dcm"
    ds.save_as(path, enforce_file_format=True)
    out = OutputObject(kind="SC", path=path, sop_instance_uid=ds.SOPInstanceUID,
                       sop_class_uid=ds.SOPClassUID, supersedes=supersedes or "")
    return PipelineResult(status="done", reason="", decisions=[("fake", True, "test")], outputs=[out])


def fake_failing_process_series(paths: list[Path], **_: Any) -> Any:
    """A pipeline that raises (the worker must record the job as failed)."""
    raise RuntimeError("simulated pipeline crash")


def dcmtk_env() -> dict[str, str]:
    """Environment for DCMTK processes (TCP_NODELAY=1 avoids 40 ms stalls)."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


def storescu(port: int, files: list[Path] | Path, calling: str = "TESTSCU",
             called: str = "SCREENER", extra: list[str] | None = None,
             timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run DCMTK ``/usr/bin/storescu -v`` and return the completed process (text output)."""
    exe = require_tool("storescu")
    args = [exe, "-v", "-aet", calling, "-aec", called, *(extra or []), "127.0.0.1", str(port)]
    args += [str(f) for f in (files if isinstance(files, list) else [files])]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=dcmtk_env())


def echoscu(port: int, calling: str = "TESTSCU", called: str = "SCREENER"
            ) -> subprocess.CompletedProcess[str]:
    """Run DCMTK ``/usr/bin/echoscu -v``."""
    exe = require_tool("echoscu")
    return subprocess.run([exe, "-v", "-aet", calling, "-aec", called, "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=30, env=dcmtk_env())


def wait_for(cond: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1,
             what: str = "condition") -> Any:
    """Poll ``cond`` until it returns something truthy; fail the test on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def wait_port(port: int, timeout: float = 30.0) -> None:
    """Wait until something listens on 127.0.0.1:port."""
    import socket

    def ok() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return False
    wait_for(ok, timeout, 0.1, f"port {port}")


@dataclass
class Daemon:
    """``python -m screener serve`` as a subprocess with its own data directory."""

    data_dir: Path
    port: int = 0
    env: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    def start(self, wait: bool = True) -> "Daemon":
        """Start it (and wait until it listens)."""
        self.port = self.port or free_port()
        env = dict(os.environ)
        # secure by default: serve needs the senders listed (or --allow-any-ae); the test
        # senders (storescu, echoscu, pynet_send) call as TESTSCU unless a test says otherwise
        env.update({"SCREENER_DATA_DIR": str(self.data_dir), "SCREENER_HOST": "127.0.0.1",
                    "SCREENER_PORT": str(self.port), "SCREENER_MIN_FREE_MB": "1",
                    "SCREENER_ALLOWED_CALLING_AES": "TESTSCU",
                    "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")})
        env.update(self.env)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data_dir / f"daemon-{time.monotonic_ns()}.log"
        fh = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "screener", "serve", *self.args],
                                     cwd=str(ROOT), env=env, stdout=fh, stderr=subprocess.STDOUT)
        fh.close()
        if wait:
            try:
                wait_port(self.port, 60)
            except AssertionError:
                raise AssertionError(f"daemon did not start:\n{self.log()}") from None
        return self

    def log(self) -> str:
        """Everything the daemon wrote so far."""
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def kill(self) -> None:
        """SIGKILL (simulated crash)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return int(self.proc.returncode)

    def db(self) -> Any:
        """A Database on the daemon's file (read while it runs: WAL allows it)."""
        from screener.db import Database
        return Database(self.data_dir / "screener.db")


#: where Debian's orthanc-dicomweb package puts the plugin
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


@dataclass
class Orthanc:
    """A throw-away Orthanc on loopback ports (DICOM + REST)."""

    work_dir: Path
    aet: str = "ORTHANC"
    dicom_port: int = 0
    http_port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    modalities: dict[str, list[Any]] = field(default_factory=dict)  # name -> [AET, host, port]
    dicomweb: bool = False  # load the DICOMweb plugin (Debian orthanc-dicomweb): /dicom-web/ and /wado

    def start(self) -> "Orthanc":
        """Start it (ports are kept across restarts) and wait until both ports answer."""
        exe = require_tool("Orthanc")
        self.dicom_port = self.dicom_port or free_port()
        self.http_port = self.http_port or free_port()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        cfg = {
            "Name": "screener-test", "StorageDirectory": str(self.work_dir / "storage"),
            "IndexDirectory": str(self.work_dir / "storage"), "DicomAet": self.aet,
            "DicomPort": self.dicom_port, "HttpPort": self.http_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomServerEnabled": True, "HttpServerEnabled": True,
            "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True,
            "Plugins": [], "StableAge": 1, "ConcurrentJobs": 1, "HttpThreadsCount": 4,
            "DicomThreadsCount": 2, "LimitFindResults": 0, "SaveJobs": False,
            "DicomModalities": self.modalities,
        }
        if self.dicomweb:
            plugin = Path(DICOMWEB_PLUGIN)
            if not plugin.exists():
                pytest.skip(f"Orthanc's DICOMweb plugin {plugin} is not installed (apt-get install orthanc-dicomweb)")
            cfg["Plugins"] = [str(plugin)]
            cfg["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "WadoRoot": "/wado",
                               "StudiesMetadata": "Full", "SeriesMetadata": "Full"}
        cfg_path = self.work_dir / "orthanc.json"
        cfg_path.write_text(json.dumps(cfg))
        log = open(self.work_dir / "orthanc.log", "ab")
        self.proc = subprocess.Popen([exe, str(cfg_path)], stdout=log, stderr=subprocess.STDOUT,
                                     cwd=str(self.work_dir))
        log.close()
        wait_port(self.http_port, 60)
        wait_port(self.dicom_port, 60)
        return self

    def get(self, path: str) -> Any:
        """GET a REST resource (JSON)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as r:
            return json.loads(r.read())

    def post(self, path: str, body: Any) -> Any:
        """POST a JSON body to a REST resource; returns the JSON answer."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}",
                                     data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read() or b"null")

    def sop_instance_uids(self) -> set[str]:
        """SOP Instance UIDs of everything Orthanc has stored."""
        uids = set()
        for oid in self.get("/instances"):
            tags = self.get(f"/instances/{oid}/simplified-tags")
            uids.add(tags.get("SOPInstanceUID", ""))
        return uids

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL)."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)




def pynet_send(port: int, paths: list[Path], calling: str = "TESTSCU", called: str = "SCREENER",
               raw: bool = True) -> list[tuple[int, str]]:
    """Send files with pynetdicom; returns ``(status, ErrorComment)`` per file.

    ``raw=True`` streams each file's bytes after its File Meta as they are
    (``STORE_SEND_CHUNKED_DATASET``), so truncated or non-DICOM content reaches
    the SCP unchanged. ``-1`` = not sent (no accepted context / no association).
    """
    from pydicom.filereader import read_file_meta_info
    from pynetdicom import AE, _config

    metas = [read_file_meta_info(p) for p in paths]
    ae = AE(ae_title=calling)
    ctx: dict[str, list[str]] = {}
    for m in metas:
        ts = ctx.setdefault(str(m.MediaStorageSOPClassUID), [])
        if str(m.TransferSyntaxUID) not in ts:
            ts.append(str(m.TransferSyntaxUID))
    for sop, syntaxes in ctx.items():  # one context per syntax, as storescu does
        for ts in syntaxes:
            ae.add_requested_context(sop, ts)
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = raw
    out: list[tuple[int, str]] = []
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title=called)
        if not assoc.is_established:
            return [(-1, "association not established")] * len(paths)
        for p in paths:
            try:
                st = assoc.send_c_store(p)
            except ValueError as exc:  # no accepted presentation context
                out.append((-1, str(exc)))
                continue
            out.append((int(st.Status), str(st.get("ErrorComment", ""))) if st else (-1, "none"))
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
    return out


def slow_process_series(paths: list[Path], *, config: Any, out_dir: Path,
                        supersedes: str | None = None, **kw: Any) -> Any:
    """:func:`fake_process_series` after a 3 s pause; appends a line to ``calls.txt``
    beside the job folders on every call (to count how often a series ran)."""
    with open(out_dir.parent / "calls.txt", "a") as fh:
        fh.write(f"{out_dir.name}\n")
    time.sleep(3.0)
    return fake_process_series(paths, config=config, out_dir=out_dir, supersedes=supersedes)


def acknowledged_files(storescu_output: str) -> list[str]:
    """Files that ``storescu -v`` reported as stored successfully (in order)."""
    acked, current = [], None
    for line in storescu_output.splitlines():
        if "Sending file: " in line:
            current = line.split("Sending file: ", 1)[1].strip()
        elif "Received Store Response (Success)" in line and current:
            acked.append(current)
            current = None
    return acked
