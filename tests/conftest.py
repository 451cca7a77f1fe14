"""Shared fixtures. Area-specific helpers live in the test modules of each area."""
from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SCREENER_SHARED_DIR", ROOT.parent / "shared"))
REAL_CT = SHARED / "data" / "ct-upper-abdomen-j2k"


@pytest.fixture(autouse=True)
def _dcmtk_no_nagle(monkeypatch: pytest.MonkeyPatch) -> None:
    """DCMTK tools here stall ~45 ms per instance unless TCP_NODELAY=1."""
    monkeypatch.setenv("TCP_NODELAY", "1")


@pytest.fixture
def real_ct_dir() -> Path:
    """The shared real CT (JPEG 2000, empty Study/Series UIDs, no L1 in view)."""
    if not REAL_CT.is_dir():
        pytest.fail(f"shared real CT missing at {REAL_CT}: clone the project with ../shared beside it")
    return REAL_CT


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_tool(name: str) -> str:
    """Path of an external tool; fails (not skips) when missing: CI installs them all.

    Debian's directories are searched first: pynetdicom installs Python scripts
    called ``storescu``/``storescp``/``echoscu`` that would shadow DCMTK's.
    """
    path = shutil.which(name, path="/usr/bin:/usr/sbin:/usr/local/bin") or shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not on PATH: run .ci/run (it installs dcmtk, dicom3tools, orthanc)")
    return path
