"""STOW-RS client (DICOM PS3.18 section 10.5): store DICOM files on a DICOMweb server.

Only the standard library: one ``POST {root}/studies`` per batch with a
``multipart/related; type="application/dicom"`` body, and the server's
answer (``application/dicom+json``) read per instance: the Referenced SOP
Sequence (0008,1199) lists what was stored, the Failed SOP Sequence
(0008,1198) what was not, with its Failure Reason (0008,1197).
"""
from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Sequence

__all__ = ["StowResult", "stow"]

_REFERENCED_SOP_SEQ = "00081199"
_FAILED_SOP_SEQ = "00081198"
_REFERENCED_SOP_INSTANCE_UID = "00081155"
_FAILURE_REASON = "00081197"


@dataclass
class StowResult:
    """What a STOW-RS server answered.

    Attributes
    ----------
    http_status : int
        200 (all stored), 202 (some stored), 409 (none stored), or another HTTP status.
    stored : set of str
        SOP Instance UIDs the server lists as stored.
    failed : dict
        SOP Instance UID -> failure reason (``"0xA700"`` style) of those it lists as failed.
    message : str
        The HTTP reason, for a log line or an export's last error.
    """

    http_status: int
    stored: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)
    message: str = ""


def _multipart(files: Sequence[bytes]) -> tuple[bytes, str]:
    boundary = f"screener-{uuid.uuid4().hex}"
    chunks = []
    for data in files:
        chunks += [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(), data, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f'multipart/related; type="application/dicom"; boundary={boundary}'


def _uids(answer: dict, key: str) -> list[dict]:
    return list((answer.get(key) or {}).get("Value") or [])


def _value(item: dict, tag: str) -> str:
    v = (item.get(tag) or {}).get("Value") or [""]
    return str(v[0])


def _parse(status: int, reason: str, body: bytes) -> StowResult:
    res = StowResult(status, message=f"HTTP {status} {reason}".strip())
    try:
        answer = json.loads(body.decode("utf-8")) if body.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        return res  # an answer that is not JSON confirms nothing per instance
    if isinstance(answer, list):  # some servers wrap the dataset in a list
        answer = answer[0] if answer else {}
    for item in _uids(answer, _REFERENCED_SOP_SEQ):
        res.stored.add(_value(item, _REFERENCED_SOP_INSTANCE_UID))
    for item in _uids(answer, _FAILED_SOP_SEQ):
        code = _value(item, _FAILURE_REASON)
        try:
            code = f"0x{int(code):04X}"
        except ValueError:
            pass
        res.failed[_value(item, _REFERENCED_SOP_INSTANCE_UID)] = code
    return res


def stow(root: str, files: Sequence[bytes], *, timeout: float = 60.0,
         context: ssl.SSLContext | None = None) -> StowResult:
    """Store ``files`` (each one DICOM Part 10 file) at the DICOMweb service ``root``.

    Parameters
    ----------
    root : str
        Service root, e.g. ``https://pacs.example.org/dicom-web`` (``/studies`` is appended).
    files : sequence of bytes
    timeout : float
        Seconds for the whole request.
    context : ssl.SSLContext, optional
        TLS settings for https (default: the system's trusted CAs, host name checked).

    Returns
    -------
    StowResult
        The per-instance answer; an HTTP error status is returned, not raised.

    Raises
    ------
    OSError
        The server could not be reached (``urllib.error.URLError``, a timeout, a TLS failure).
    """
    body, ctype = _multipart(files)
    req = urllib.request.Request(f"{root.rstrip('/')}/studies", data=body, method="POST",
                                 headers={"Content-Type": ctype, "Accept": "application/dicom+json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as r:
            return _parse(r.status, r.reason, r.read())
    except urllib.error.HTTPError as exc:  # 4xx / 5xx still carry the per-instance answer
        return _parse(exc.code, str(exc.reason), exc.read() or b"")
