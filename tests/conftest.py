"""Shared fixtures. Area-specific helpers live in the test modules of each area."""
from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path
from typing import Any, Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SCREENER_SHARED_DIR", ROOT.parent / "shared"))
REAL_CT = SHARED / "data" / "ct-upper-abdomen-j2k"


@pytest.fixture(autouse=True)
def _dcmtk_no_nagle(monkeypatch: pytest.MonkeyPatch) -> None:
    """DCMTK tools here stall ~45 ms per instance unless TCP_NODELAY=1."""
    monkeypatch.setenv("TCP_NODELAY", "1")


@pytest.fixture(scope="session")
def _sr_write_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file every SR written during the session is listed in (also by daemon subprocesses,
    which inherit the environment): :data:`screener.reporting.sr.WRITE_LOG_ENV`."""
    from screener.reporting.sr import WRITE_LOG_ENV

    log = tmp_path_factory.mktemp("sr-log") / "written.txt"
    log.touch()
    os.environ[WRITE_LOG_ENV] = str(log)
    return log


@pytest.fixture(autouse=True)
def _no_dxa_loinc_in_any_sr(_sr_write_log: Path) -> Any:
    """Issue 16: every SR a test writes is read back and must not name a DXA LOINC code (the
    screener estimates from CT and radiographs; it never reads DXA reports)."""
    import pydicom

    from screener.reporting.sr import dxa_loinc_codes

    start = _sr_write_log.stat().st_size
    yield
    with _sr_write_log.open(encoding="utf-8") as fh:
        fh.seek(start)
        paths = [Path(p) for p in fh.read().split("\n") if p]
    bad = {}
    for p in paths:
        if p.is_file():
            found = dxa_loinc_codes(pydicom.dcmread(p, stop_before_pixels=True))
            if found:
                bad[str(p)] = found
    assert not bad, f"SRs with DXA LOINC codes: {bad}"


@pytest.fixture
def real_ct_dir() -> Path:
    """The shared real CT (JPEG 2000, empty Study/Series UIDs, no L1 in view)."""
    if not REAL_CT.is_dir():
        pytest.skip(f"shared real CT absent at {REAL_CT}: clone the project with ../shared beside "
                    "it (or set SCREENER_SHARED_DIR)")
    return REAL_CT


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[tuple[Any, Any, Any]]:
    """An in-process SCP (``screener.ingest.start_scp``: no worker, no scheduler) that accepts
    the calling AE TESTSCU: ``(config, database, server)``."""
    from screener.config import load_config
    from screener.db import Database
    from screener.ingest import start_scp

    cfg = load_config(env={}, data_dir=tmp_path / "data", host="127.0.0.1", port=free_port(),
                      min_free_mb=1, allowed_calling_aes=["TESTSCU"], quiet_seconds=3600)
    db = Database(cfg.db_path)
    srv = start_scp(cfg, db)
    yield cfg, db, srv
    srv.stop()
    db.close()


def require_tool(name: str) -> str:
    """Path of an external tool; fails (not skips) when missing: CI installs them all.

    Debian's directories are searched first: pynetdicom installs Python scripts
    called ``storescu``/``storescp``/``echoscu`` that would shadow DCMTK's.
    """
    path = shutil.which(name, path="/usr/bin:/usr/sbin:/usr/local/bin") or shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not on PATH: run .ci/run (it installs dcmtk, dicom3tools, orthanc)")
    return path
