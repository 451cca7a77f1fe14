"""DICOMweb export (issue 20): STOW-RS to Orthanc's DICOMweb plugin, with C-STORE's retry rules.

Orthanc runs with Debian's ``orthanc-dicomweb`` plugin on loopback ports. The
results land in the source study; an unreachable server delays them with the
same back-off as a PACS outage; a server that refuses an instance (Failed SOP
Sequence) gets it again later with the failure reason recorded.
"""
from __future__ import annotations

import http.server
import json
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pydicom
import pytest

from screener.config import Config
from screener.db import Database, now
from screener.destinations import parse_destination
from screener.dicomweb import stow
from screener.export import Exporter
from screener.worker import run_job
from tests.conftest import free_port
from tests.daemon_helpers import Orthanc, fake_process_series, make_ct_series
from tests.test_export import _claim, _ingest, env  # noqa: F401 - env is the shared fixture


def _processed(db: Database, cfg: Config, files: list[Path]) -> None:
    """Record ``files`` as one received series and run the (fake) pipeline on it: one result."""
    run_job(_claim(db, _ingest(db, files)), db, cfg, process=fake_process_series)


def _upload(orthanc: Orthanc, f: Path) -> None:
    req = urllib.request.Request(f"http://127.0.0.1:{orthanc.http_port}/instances", data=f.read_bytes(),
                                 method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200


@pytest.mark.network
def test_stow_rs_lands_the_results_in_the_source_study_after_an_outage(
        tmp_path: Path, env: tuple[Config, Database]) -> None:
    cfg, db = env
    orthanc = Orthanc(tmp_path / "orthanc", dicomweb=True)
    orthanc.http_port = free_port()  # known before it starts: the destination names it
    root = f"http://127.0.0.1:{orthanc.http_port}/dicom-web"
    cfg.destinations = [parse_destination(f"dicomweb+{root}")]
    files = make_ct_series(tmp_path / "ct", 3)
    _processed(db, cfg, files)
    [e] = db.exports()
    assert e["destination"] == f"dicomweb+{root}" and e["status"] == "pending"
    ex = Exporter(db, cfg)
    t = now()
    # the server is down: retried with the back-off C-STORE has, the error says where it went
    assert ex.run_once(at=t) == {"retry": 1}
    e = db.exports()[0]
    assert e["attempts"] == 1 and e["next_attempt_at"] == pytest.approx(t + 5)
    assert f"STOW-RS to {root} failed" in e["last_error"]
    orthanc.start()
    try:
        for f in files:  # the source study is in the archive already
            _upload(orthanc, f)
        [study] = orthanc.get("/studies")
        assert ex.run_once(at=t + 6) == {"sent": 1}
        e = db.exports()[0]
        assert (e["status"], e["attempts"], e["last_error"]) == ("sent", 2, "")
        assert orthanc.get("/studies") == [study]  # no second study: it joined the source one
        uids = {i["MainDicomTags"]["SOPInstanceUID"] for i in orthanc.get(f"/studies/{study}/instances")}
        assert e["sop_instance_uid"] in uids and len(uids) == len(files) + 1
        # and it reads back over DICOMweb (QIDO-RS), as a viewer would ask for it
        src = pydicom.dcmread(files[0], stop_before_pixels=True)
        with urllib.request.urlopen(f"{root}/studies/{src.StudyInstanceUID}/instances", timeout=30) as r:
            listed = {i["00080018"]["Value"][0] for i in json.loads(r.read())}
        assert e["sop_instance_uid"] in listed
    finally:
        orthanc.stop()


class _Refusing(http.server.BaseHTTPRequestHandler):
    """A STOW-RS server that refuses every instance: 409 with Failure Reason 0xA700 (out of resources)."""

    seen: list[bytes] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).seen.append(body)
        uids = [pydicom.dcmread(__import__("io").BytesIO(part.split(b"\r\n\r\n", 1)[1]),
                                stop_before_pixels=True).SOPInstanceUID
                for part in body.split(b"--" + self.headers.get_boundary().encode())[1:-1]]
        answer = {"00081198": {"vr": "SQ", "Value": [
            {"00081155": {"vr": "UI", "Value": [u]}, "00081197": {"vr": "US", "Value": [0xA700]}} for u in uids]}}
        out = json.dumps(answer).encode()
        self.send_response(409)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *_: Any) -> None:
        pass


def test_a_refused_instance_is_retried_with_the_servers_reason(
        tmp_path: Path, env: tuple[Config, Database]) -> None:
    cfg, db = env
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        root = f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
        cfg.destinations = [parse_destination(f"dicomweb+{root}")]
        _processed(db, cfg, make_ct_series(tmp_path / "ct", 2))
        assert Exporter(db, cfg).run_once(at=now()) == {"retry": 1}
        e = db.exports()[0]
        assert e["last_error"] == "STOW-RS HTTP 409 Conflict: failure reason 0xA700"
        # the request was one multipart/related part holding the result file, byte for byte
        [body] = _Refusing.seen
        assert Path(db.get_result(int(e["result_id"]))["path"]).read_bytes() in body
        res = stow(root, [Path(e["path"]).read_bytes()])
        assert (res.http_status, res.stored, list(res.failed.values())) == (409, set(), ["0xA700"])
    finally:
        server.shutdown()
