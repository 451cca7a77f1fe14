"""``/healthz`` and Prometheus ``/metrics`` (issue 20, item 5), asked over HTTP, and the
start-up line that names the inference device."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from screener.config import ConfigError, load_config
from screener.db import Database
from screener.health import HealthServer, start_health_server
from tests.conftest import ROOT, free_port


def _get(port: int, path: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    d = Database(tmp_path / "screener.db")
    for i, status in enumerate(("done", "done", "failed", None, None)):
        series = f"1.2.{i}"
        d.record_instance(sop_instance_uid=f"{series}.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                          study_uid="1.2", series_uid=series, path="/x")
        job = d.enqueue_job(series)
        if status:
            d.record_job_outcome(job, series_uid=series, study_uid="1.2", status=status,
                                 results=[{"sop_instance_uid": f"{series}.9", "sop_class_uid": "1",
                                           "kind": "SR", "path": "/r"}] if status == "done" else [],
                                 destinations=["PACS@h:104"])
    with d.transaction() as c:
        c.execute("update jobs set finished_at = 1800000000.5 where status = 'done'")
    first = d.exports()[0]
    d.update_export(first["id"], status="sent", sent_at=1800000100.0)
    d.record_rejection(sop_instance_uid="9.9", calling_ae="CT1", status=0xC000, reason="x")
    d.add_rejected_associations(calling_ae="EVIL", reason="not allowed", count=7)
    yield d
    d.close()


@pytest.fixture
def server(db: Database) -> Iterator[tuple[HealthServer, list[bool]]]:
    up = [True]
    srv = start_health_server("127.0.0.1", 0, db, listener_up=lambda: up[0])
    yield srv, up
    srv.stop()


def test_metrics_are_prometheus_text_with_the_real_counts(
        server: tuple[HealthServer, list[bool]]) -> None:
    srv, _ = server
    status, ctype, text = _get(srv.port, "/metrics")
    assert status == 200 and ctype == "text/plain; version=0.0.4; charset=utf-8"
    samples = {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1])
               for ln in text.splitlines() if ln and not ln.startswith("#")}
    assert samples["screener_queue_depth"] == 2
    assert {k: v for k, v in samples.items() if k.startswith("screener_jobs{")} == {
        'screener_jobs{state="pending"}': 2, 'screener_jobs{state="running"}': 0,
        'screener_jobs{state="done"}': 2, 'screener_jobs{state="skipped"}': 0,
        'screener_jobs{state="failed"}': 1}
    assert samples['screener_exports{state="sent"}'] == 1
    assert samples["screener_export_backlog"] == 1  # the second SR's export waits
    assert samples['screener_last_success_timestamp_seconds{what="job"}'] == 1800000000.5
    assert samples['screener_last_success_timestamp_seconds{what="export"}'] == 1800000100.0
    assert samples["screener_instances"] == 5 and samples["screener_rejections_total"] == 1
    assert samples["screener_rejected_associations_total"] == 7
    assert "# TYPE screener_rejections_total counter" in text
    assert "1.2.0" not in text  # no UIDs in the metrics


def test_healthz_is_ok_and_503_when_the_listener_stops(
        server: tuple[HealthServer, list[bool]]) -> None:
    srv, up = server
    status, ctype, text = _get(srv.port, "/healthz")
    assert (status, ctype) == (200, "application/json")
    body = json.loads(text)
    assert (body["status"], body["database"], body["listener"]) == ("ok", "ok", "up")
    up[0] = False
    status, _, text = _get(srv.port, "/healthz")
    assert status == 503 and json.loads(text)["listener"] == "down"
    assert _get(srv.port, "/other")[0] == 404


def test_healthz_says_when_the_database_fails(tmp_path: Path) -> None:
    d = Database(tmp_path / "screener.db")
    srv = start_health_server("127.0.0.1", 0, d)
    try:
        d.close()
        status, _, text = _get(srv.port, "/healthz")
        assert status == 503
        assert json.loads(text)["database"].startswith("failing: ProgrammingError: Cannot "
                                                       "operate on a closed database")
    finally:
        srv.stop()


def test_health_port_is_off_by_default_and_checked() -> None:
    c = load_config(env={})
    assert (c.health_host, c.health_port) == ("127.0.0.1", 0)
    assert load_config(env={"SCREENER_HEALTH_PORT": "9464"}).health_port == 9464
    with pytest.raises(ConfigError, match="'health_port' must be 1-65535, or 0 for off"):
        load_config(env={"SCREENER_HEALTH_PORT": "70000"})


def test_serve_answers_healthz_and_logs_the_inference_device(tmp_path: Path) -> None:
    """The daemon as a subprocess: the endpoint runs beside the SCP, and the start-up says which
    device the models use (cpu here, with the reason)."""
    hport = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCREENER_")}
    env.update(SCREENER_HEALTH_PORT=str(hport), SCREENER_DEVICE="auto",
               CUDA_VISIBLE_DEVICES="")
    proc = subprocess.Popen([sys.executable, "-m", "screener", "serve", "--data-dir",
                             str(tmp_path / "d"), "--port", str(free_port()), "--allow-any-ae",
                             "--log-format", "json"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        status = 0
        while time.monotonic() < deadline:
            try:
                status, _, text = _get(hport, "/healthz")
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        assert status == 200 and json.loads(text)["listener"] == "up"
        status, _, metrics = _get(hport, "/metrics")
        assert status == 200 and "screener_queue_depth 0" in metrics
        device = None
        assert proc.stderr is not None
        while time.monotonic() < deadline and device is None:
            line = proc.stderr.readline()
            if line.startswith("{") and json.loads(line)["event"] == "inference device":
                device = json.loads(line)
        assert device is not None
        assert (device["device"], device["setting"]) == ("cpu", "auto")
        assert device["reason"].startswith("device = auto, running on the CPU: ")
    finally:
        proc.terminate()
        proc.wait(30)
    assert proc.returncode == 0


def test_inference_device_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from screener import devices, serve
    assert serve.inference_device("cpu") == ("cpu", "device = cpu in the configuration")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(devices.glob, "glob", lambda pattern: [])
    assert serve.inference_device("auto") == (
        "cpu", "device = auto, running on the CPU: no /dev/nvidia* device is visible to this "
        "process (systemd PrivateDevices=yes or a missing DeviceAllow hides them; see "
        "deploy/README.md, GPU)")
    device, reason = serve.inference_device("cuda")
    assert device == "cuda" and reason.startswith("device = cuda but CUDA is not usable: no "
                                                  "/dev/nvidia*")
    monkeypatch.setattr(torch.version, "cuda", None)
    assert serve.inference_device("auto")[1] == (
        "device = auto, running on the CPU: this torch build has no CUDA support (a CPU wheel): "
        "install a CUDA build")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    assert serve.inference_device("auto") == (
        "cuda", "device = auto: CUDA GPU found (NVIDIA H100 80GB HBM3, 1 device(s), CUDA 12.4)")


def test_resolve_device_is_the_same_choice_and_refuses_an_unusable_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from screener import devices
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(devices.glob, "glob", lambda pattern: [])
    assert devices.resolve_device("auto") == devices.resolve_device(torch.device("cpu")) == "cpu"
    with pytest.raises(RuntimeError, match=r"CUDA is not usable: no /dev/nvidia\*.*use device = \"auto\""):
        devices.resolve_device("cuda")
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        devices.resolve_device("cuda:1")
