"""Ingest: durable storage, the C-STORE SCP's statuses, completion, logging; DCMTK against the daemon."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Iterator

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless,
                         generate_uid)

from screener.completion import CompletionMonitor
from screener.config import Config, load_config
from screener.db import Database, now
from screener.ingest import Rejected, check_pixel_data, start_scp
from screener.logs import accession_hash, configure_logging
from screener.storage import (StorageError, encode_file_meta, instance_path, sanitise_uid,
                              write_atomic)
from tests.conftest import free_port
from tests.daemon_helpers import (ACCESSION, PATIENT_BIRTH, PATIENT_ID, PATIENT_NAME, Daemon,
                                  echoscu, make_ct_series, pynet_send, storescu, wait_for)


def _dataset_bytes(path: Path) -> bytes:
    """The bytes of a DICOM file after its File Meta Information."""
    raw = path.read_bytes()
    meta_len = int.from_bytes(raw[140:144], "little")  # (0002,0000) value at 132+8
    return raw[144 + meta_len:]


# ----------------------------------------------------------------------------- storage
def test_sanitise_uid_keeps_paths_inside_the_store(tmp_path: Path) -> None:
    assert sanitise_uid(" 1.2.840.113619.2\x00") == "1.2.840.113619.2"
    assert sanitise_uid("../../etc/passwd") == "_._..___________"
    assert sanitise_uid("1.2.3a") == "1.2.3_"
    p = instance_path(tmp_path, "1.2", "..", "3/4")
    assert p.resolve().is_relative_to(tmp_path.resolve())
    assert p.relative_to(tmp_path).parts == ("1.2", "_.", "3_4.dcm")
    with pytest.raises(ValueError, match="empty UID"):
        sanitise_uid("  ")


def test_encode_file_meta_reads_back() -> None:
    b = encode_file_meta("1.2.840.10008.5.1.4.1.1.2", "1.2.3.45", JPEG2000Lossless,
                         "1.2.826.0.1.3680043.9.3811", "VER_1", "MODALITY1")
    assert b[:128] == b"\x00" * 128 and b[128:132] == b"DICM"
    ds = pydicom.dcmread(io.BytesIO(b), force=True)
    m = ds.file_meta
    assert (m.MediaStorageSOPClassUID, m.MediaStorageSOPInstanceUID) == (
        "1.2.840.10008.5.1.4.1.1.2", "1.2.3.45")
    assert m.TransferSyntaxUID == JPEG2000Lossless and m.SourceApplicationEntityTitle == "MODALITY1"
    assert m.FileMetaInformationGroupLength == len(b) - 144


def test_write_atomic_writes_whole_file_and_leaves_no_temp(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    dest = tmp_path / "store" / "a" / "b" / "x.dcm"
    assert write_atomic(dest, (b"abc", b"def" * 1000), tmp) == 3003
    assert dest.read_bytes() == b"abc" + b"def" * 1000
    assert list(tmp.iterdir()) == []
    with pytest.raises(StorageError, match="cannot store"):
        write_atomic(tmp_path / "store" / "y.dcm", b"z", tmp_path / "no-such-tmp")
    assert not (tmp_path / "store" / "y.dcm").exists()


# ---------------------------------------------------------------------- pixel framing
def _one(tmp_path: Path, ts: str) -> Dataset:
    return pydicom.dcmread(make_ct_series(tmp_path / ts, 1, rows=32, cols=32,
                                          transfer_syntax=ts)[0])


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                                JPEG2000Lossless, RLELossless])
def test_check_pixel_data_accepts_well_formed(tmp_path: Path, ts: str) -> None:
    ds = _one(tmp_path, ts)
    check_pixel_data(ds, ts)  # no exception


def test_check_pixel_data_reasons(tmp_path: Path) -> None:
    ds = _one(tmp_path, ExplicitVRLittleEndian)
    ds.PixelData = ds.PixelData[:1000]
    with pytest.raises(Rejected, match=r"Pixel Data truncated: 1000 of 2048 bytes") as e:
        check_pixel_data(ds, ExplicitVRLittleEndian)
    assert e.value.status == 0xC001
    j2k = _one(tmp_path, JPEG2000Lossless)
    frame = pydicom.encaps.generate_frames(j2k.PixelData, number_of_frames=1).__next__()
    j2k.PixelData = pydicom.encaps.encapsulate([frame[: len(frame) // 2]])
    with pytest.raises(Rejected, match="EOC marker"):
        check_pixel_data(j2k, JPEG2000Lossless)
    rle = _one(tmp_path, RLELossless)
    rle.PixelData = pydicom.encaps.encapsulate([b"\x20" + b"\x00" * 63 + b"\x01" * 10])
    with pytest.raises(Rejected, match="32 segments"):
        check_pixel_data(rle, RLELossless)
    del ds.PixelData
    with pytest.raises(Rejected, match="no Pixel Data"):
        check_pixel_data(ds, ExplicitVRLittleEndian)


# ------------------------------------------------------------------------- SCP in-process
@pytest.fixture
def scp(tmp_path: Path) -> Iterator[tuple[Config, Database]]:
    cfg = load_config(env={}, data_dir=tmp_path / "data", host="127.0.0.1", port=free_port(),
                      min_free_mb=1, allowed_calling_aes=["TESTSCU"], quiet_seconds=5)
    db = Database(cfg.db_path)
    srv = start_scp(cfg, db)
    yield cfg, db
    srv.stop()
    db.close()


def test_scp_stores_every_transfer_syntax_as_received(tmp_path: Path,
                                                      scp: tuple[Config, Database]) -> None:
    cfg, db = scp
    sent = []
    for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
               JPEG2000Lossless, RLELossless, JPEGLSLossless):
        sent += make_ct_series(tmp_path / "in" / ts, 2, rows=48, cols=40, transfer_syntax=ts)
    assert pynet_send(cfg.port, sent) == [(0, "")] * len(sent)
    rows = {r["sop_instance_uid"]: r for r in db.iter_table("instances")}
    assert len(rows) == len(sent) == 12
    for f in sent:
        orig = pydicom.dcmread(f)
        row = rows[orig.SOPInstanceUID]
        stored = Path(row["path"])
        assert stored.is_file() and stored.stat().st_size == row["size"]
        assert stored.parent.name == orig.SeriesInstanceUID
        assert row["transfer_syntax"] == orig.file_meta.TransferSyntaxUID
        assert _dataset_bytes(stored) == _dataset_bytes(f)  # byte-identical, original syntax
        back = pydicom.dcmread(stored)
        assert np.array_equal(back.pixel_array, orig.pixel_array)
        assert back.file_meta.SourceApplicationEntityTitle == "TESTSCU"
        assert row["calling_ae"] == "TESTSCU"
    s = db.get_series(pydicom.dcmread(sent[0]).SeriesInstanceUID)
    assert s["n_instances"] == 2 and s["modality"] == "CT"
    assert s["accession_hash"] == accession_hash(ACCESSION) != ACCESSION
    assert list(cfg.tmp_dir.iterdir()) == []


def test_duplicate_is_acknowledged_and_stored_once(tmp_path: Path,
                                                   scp: tuple[Config, Database]) -> None:
    cfg, db = scp
    files = make_ct_series(tmp_path / "in", 3)
    assert pynet_send(cfg.port, files) == [(0, "")] * 3
    path = Path(db.series_instances(pydicom.dcmread(files[0]).SeriesInstanceUID)[0]["path"])
    mtime = path.stat().st_mtime_ns
    assert pynet_send(cfg.port, files + files[:1]) == [(0, "")] * 4
    assert db.counts()["instances"] == 3
    assert db.get_series(pydicom.dcmread(files[0]).SeriesInstanceUID)["n_instances"] == 3
    assert path.stat().st_mtime_ns == mtime


def test_recorded_instance_whose_file_is_gone_is_written_again(
        tmp_path: Path, scp: tuple[Config, Database]) -> None:
    # e.g. a power cut after the database commit but before the folder fsync
    cfg, db = scp
    [f] = make_ct_series(tmp_path / "in", 1)
    assert pynet_send(cfg.port, [f]) == [(0, "")]
    [row] = list(db.iter_table("instances"))
    Path(row["path"]).unlink()
    assert pynet_send(cfg.port, [f]) == [(0, "")]
    assert _dataset_bytes(Path(row["path"])) == _dataset_bytes(f)
    assert db.counts()["instances"] == 1


def test_refusals_have_clear_statuses_and_are_recorded(tmp_path: Path,
                                                       scp: tuple[Config, Database]) -> None:
    cfg, db = scp
    f_ok, f_nostudy, f_noseries, f_mr = make_ct_series(tmp_path / "in", 4)
    ds = pydicom.dcmread(f_nostudy)
    del ds.StudyInstanceUID
    ds.save_as(f_nostudy)
    ds = pydicom.dcmread(f_noseries)
    ds.SeriesInstanceUID = ""
    ds.save_as(f_noseries)
    ds = pydicom.dcmread(f_mr)
    ds.SOPClassUID = pydicom.uid.MRImageStorage  # body says MR, request says CT
    ds.save_as(f_mr)
    res = pynet_send(cfg.port, [f_ok, f_nostudy, f_noseries, f_mr])
    assert res == [(0x0000, ""), (0xA900, "missing StudyInstanceUID"),
                   (0xA900, "missing SeriesInstanceUID"),
                   (0xA900, "SOPClassUID differs from the negotiated SOP class")]
    rej = db.rejections()
    assert [(r["status"], r["calling_ae"]) for r in rej] == [(0xA900, "TESTSCU")] * 3
    assert rej[0]["sop_instance_uid"] == pydicom.dcmread(f_nostudy).SOPInstanceUID
    assert db.counts()["instances"] == 1


def test_non_image_sop_classes_are_accepted_and_ignored(tmp_path: Path,
                                                       scp: tuple[Config, Database]) -> None:
    cfg, db = scp
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = pydicom.uid.BasicTextSRStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), "SR"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sr = tmp_path / "sr.dcm"
    ds.save_as(sr, enforce_file_format=True)
    ct, mr = make_ct_series(tmp_path / "mr", 2)
    m = pydicom.dcmread(mr)
    m.SOPClassUID = m.file_meta.MediaStorageSOPClassUID = pydicom.uid.MRImageStorage
    m.save_as(mr)
    res = pynet_send(cfg.port, [ct, sr, mr])
    assert res == [(0, "")] * 3   # a PACS forwarding a whole study must not fail on them
    assert db.counts()["instances"] == 1
    ignored = {r["sop_instance_uid"]: r for r in db.iter_table("ignored")}
    assert set(ignored) == {ds.SOPInstanceUID, m.SOPInstanceUID}
    assert ignored[ds.SOPInstanceUID]["sop_class_uid"] == pydicom.uid.BasicTextSRStorage
    assert pynet_send(cfg.port, [sr]) == [(0, "")]   # alone too
    assert db.counts()["ignored"] == 2


def test_low_disk_answers_a700(tmp_path: Path) -> None:
    cfg = load_config(env={}, data_dir=tmp_path / "data", host="127.0.0.1", port=free_port(),
                      min_free_mb=10 ** 9, allowed_calling_aes=["TESTSCU"])
    db = Database(cfg.db_path)
    srv = start_scp(cfg, db)
    try:
        [(status, comment)] = pynet_send(cfg.port, make_ct_series(tmp_path / "in", 1))
    finally:
        srv.stop()
    assert status == 0xA700 and comment.startswith("disk nearly full:")
    assert db.counts() == {"instances": 0, "series": 0, "jobs": {}, "exports": {},
                           "rejections": 1, "ignored": 0, "rejected_associations": 0}


def test_unknown_calling_ae_is_rejected_and_recorded(tmp_path: Path,
                                                     scp: tuple[Config, Database]) -> None:
    cfg, db = scp
    files = make_ct_series(tmp_path / "in", 1)
    assert pynet_send(cfg.port, files, calling="INTRUDER") == [(-1, "association not established")]
    wait_for(lambda: db.rejected_associations(), 5, what="rejected association row")
    [r] = db.rejected_associations()
    assert r["calling_ae"] == "INTRUDER" and "not in allowed_calling_aes" in r["reason"]
    assert r["count"] == 1 and db.rejections() == []
    assert db.counts()["instances"] == 0


# --------------------------------------------------------------------------- completion
def test_completion_queues_quiet_series_once_and_again_for_late_instances(
        tmp_path: Path, scp: tuple[Config, Database]) -> None:
    cfg, db = scp
    queued: list[int] = []
    mon = CompletionMonitor(db, cfg, on_enqueue=queued.append)
    assert mon.interval == 1.25  # quiet 5 s / 4
    series = generate_uid()
    files = make_ct_series(tmp_path / "a", 3, series_uid=series)
    pynet_send(cfg.port, files)
    t = now()
    assert mon.check(at=t + 1) == []            # not quiet yet
    [job] = mon.check(at=t + 6)
    assert queued == [job] and db.jobs()[0]["n_instances"] == 3
    assert mon.check(at=t + 60) == []           # covered by a pending job
    db.finish_job(db.claim_job()["id"], "done")
    assert mon.check(at=t + 60) == []           # nothing new
    late = make_ct_series(tmp_path / "b", 2, series_uid=series, start=3)
    pynet_send(cfg.port, late)
    [job2] = mon.check(at=now() + 6)
    assert job2 != job and db.get_job(job2)["n_instances"] == 5


def test_completion_scheduler_runs_in_background(tmp_path: Path,
                                                 scp: tuple[Config, Database]) -> None:
    cfg, db = scp
    cfg.quiet_seconds = 0.5
    mon = CompletionMonitor(db, cfg)
    pynet_send(cfg.port, make_ct_series(tmp_path / "a", 2))
    mon.start()
    try:
        wait_for(lambda: db.jobs(), 10, what="a job queued by the scheduler")
    finally:
        mon.stop()
    assert [j["status"] for j in db.jobs()] == ["pending"]


# ------------------------------------------------------------------------------- logging
def test_logs_are_json_and_drop_phi_keys() -> None:
    import structlog
    buf = io.StringIO()
    configure_logging("info", json=True, stream=buf)
    structlog.get_logger("t").info("stored", sop_instance_uid="1.2.3", PatientName="Doe^Jane",
                                   patient_id="X1", PatientBirthDate="19500101")
    line = json.loads(buf.getvalue().splitlines()[-1])
    assert line["sop_instance_uid"] == "1.2.3" and line["event"] == "stored"
    assert line["phi_dropped"] == 3 and line["timestamp"].endswith("Z")
    assert "Doe" not in buf.getvalue() and "19500101" not in buf.getvalue()
    configure_logging("info", json=True)
    assert len(accession_hash("A1")) == 16 and accession_hash("A1") != accession_hash("A2")
    assert accession_hash("") == ""


# ------------------------------------------------------------------- daemon + DCMTK peers
@pytest.mark.network
def test_daemon_receives_study_from_storescu_echo_and_rejects_unknown_ae(tmp_path: Path) -> None:
    d = Daemon(tmp_path / "d", env={"SCREENER_ALLOWED_CALLING_AES": "TESTSCU",
                                    "SCREENER_QUIET_SECONDS": "3600",
                                    "SCREENER_LOG_LEVEL": "debug"}).start()
    try:
        study = generate_uid()
        plain = make_ct_series(tmp_path / "plain", 20, study_uid=study)
        j2k = make_ct_series(tmp_path / "j2k", 5, study_uid=study, transfer_syntax=JPEG2000Lossless)
        r1 = storescu(d.port, plain)
        r2 = storescu(d.port, j2k, extra=["-xv"])
        assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
        assert r1.stderr.count("Received Store Response (Success)") == 20
        e = echoscu(d.port)
        assert e.returncode == 0, e.stderr
        bad = echoscu(d.port, calling="EVIL")
        assert bad.returncode != 0 and "Association Rejected" in bad.stderr + bad.stdout
        db = d.db()
        rows = list(db.iter_table("instances"))
        assert len(rows) == 25 and {r["study_uid"] for r in rows} == {study}
        assert all(Path(r["path"]).is_file() for r in rows)
        assert sorted({r["transfer_syntax"] for r in rows}) == sorted(
            {ExplicitVRLittleEndian, JPEG2000Lossless})
        wait_for(lambda: db.rejected_associations(), 5, what="rejection")
        assert [r["calling_ae"] for r in db.rejected_associations()] == ["EVIL"]
    finally:
        assert d.stop() == 0
    log = d.log()
    sop = pydicom.dcmread(plain[0]).SOPInstanceUID
    lines = [json.loads(x) for x in log.splitlines() if x.startswith("{")]
    stored_lines = [x for x in lines if x["event"] == "stored"]
    assert len(stored_lines) == 25 and any(x["sop_instance_uid"] == sop for x in stored_lines)
    for secret in (PATIENT_NAME, "Testpatient", PATIENT_ID, PATIENT_BIRTH, ACCESSION):
        assert secret not in log
    assert '"screener serve stopped"' in log and "EVIL" in log
    closed = [x for x in lines if x["event"] == "association closed"]
    assert sorted(c["stored"] for c in closed) == [5, 20]
    assert all(c["study_uids"] == [study] and c["level"] == "info" for c in closed)


def test_tls_scp_accepts_tls_clients_only(tmp_path: Path) -> None:
    import ssl
    import subprocess
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    cfg = load_config(env={}, data_dir=tmp_path / "data", host="127.0.0.1", port=free_port(),
                      tls_cert=str(cert), tls_key=str(key), allowed_calling_aes=["TLSSCU"])
    db = Database(cfg.db_path)
    srv = start_scp(cfg, db)
    try:
        ae = AE(ae_title="TLSSCU")
        ae.add_requested_context(Verification)
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
        assoc = ae.associate("127.0.0.1", cfg.port, ae_title="SCREENER",
                             tls_args=(ctx, "localhost"))
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
        plain = ae.associate("127.0.0.1", cfg.port, ae_title="SCREENER")
        assert not plain.is_established
    finally:
        srv.stop()
        db.close()
    with pytest.raises(ValueError, match="TLS: cannot load"):
        start_scp(load_config(env={}, data_dir=tmp_path / "d2", host="127.0.0.1",
                              port=free_port(), tls_cert=str(key), tls_key=str(cert),
                              allow_any_ae=True),
                  Database(tmp_path / "x.db"))


