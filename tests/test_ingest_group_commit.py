"""Group commit of ingest (issue 21): instances of concurrent associations are made durable and
recorded together, and none is acknowledged before its group is.

- In process: :class:`screener.ingest.GroupCommitter` puts the waiting instances of every open
  association in one transaction, closes a group as soon as no open association can add to it,
  answers a SOP Instance UID stored twice in one group as a duplicate, and refuses a whole
  group whose row cannot be written (no file left in ``store/``).
- With the daemon: a group held open (a long ``ingest_group_window_ms`` and an idle association
  it waits for) is SIGKILLed; the senders were not told success for its instances, and after the
  restart every instance they were told succeeded is stored and recorded, and nothing else.
"""
from __future__ import annotations

import sqlite3
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from screener.db import Database
from screener.ingest import DUPLICATE, STORED, GroupCommitter, _Pending
from screener.storage import commit_rename, write_temp
from screener.validation import STATUS_OUT_OF_DISK, Rejected
from tests.daemon_helpers import (Daemon, acknowledged_files, dcmtk_env, make_ct_series,
                                  storescu, wait_for)
from tests.conftest import require_tool


# ------------------------------------------------------------------ in process

def _pending(tmp_dir: Path, store: Path, sop: str, series: str = "1.2.3.4",
             payload: bytes = b"x" * 1000) -> _Pending:
    tmp, size = write_temp(payload, tmp_dir)
    dest = store / "1.2.3" / series / f"{sop}.dcm"
    row = dict(sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
               study_uid="1.2.3", series_uid=series, path=str(dest), size=size)
    return _Pending(tmp=tmp, dest=dest, row=row)


@pytest.fixture()
def parts(tmp_path: Path) -> Any:
    tmp_dir, store = tmp_path / "tmp", tmp_path / "store"
    tmp_dir.mkdir()
    store.mkdir()
    db = Database(tmp_path / "screener.db")
    syncer = ThreadPoolExecutor(max_workers=2)
    committers: list[GroupCommitter] = []

    def make(window: float) -> GroupCommitter:
        c = GroupCommitter(db, syncer, window)
        committers.append(c)
        return c
    yield tmp_dir, store, db, make
    for c in committers:
        c.stop()
    syncer.shutdown()
    db.close()


def _commit_all(committer: GroupCommitter, pendings: list[_Pending]) -> list[Any]:
    """Commit each from its own thread (as association threads do); outcome or exception."""
    out: list[Any] = [None] * len(pendings)

    def one(i: int) -> None:
        try:
            out[i] = committer.commit(pendings[i])
        except Rejected as exc:
            out[i] = exc
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(pendings))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a handler still waits for its group"
    return out


def test_instances_of_all_open_associations_share_one_transaction(parts: Any) -> None:
    tmp_dir, store, db, make = parts
    committer = make(window=600.0)        # the group closes when every association is in it
    for _ in range(3):
        committer.association_opened()
    pendings = [_pending(tmp_dir, store, f"1.2.3.4.{i}", series=f"1.2.3.{i % 2}")
                for i in range(3)]
    assert _commit_all(committer, pendings) == [STORED] * 3
    assert (committer.groups, committer.committed) == (1, 3)
    rows = db.instances_by_uid([p.row["sop_instance_uid"] for p in pendings])
    assert len(rows) == 3
    for p in pendings:
        assert p.dest.read_bytes() == b"x" * 1000 and not p.tmp.exists()
    assert {s["series_uid"]: s["n_instances"] for s in db.iter_table("series")} == {
        "1.2.3.0": 2, "1.2.3.1": 1}


def test_group_closes_when_the_association_it_waits_for_closes(parts: Any) -> None:
    tmp_dir, store, db, make = parts
    committer = make(window=600.0)
    committer.association_opened()
    committer.association_opened()       # a second, idle association: the group waits for it
    p = _pending(tmp_dir, store, "1.2.3.4.9")
    done: list[Any] = []
    t = threading.Thread(target=lambda: done.append(committer.commit(p)))
    t.start()
    wait_for(lambda: committer.open_associations() == 2 and not p.done.done(), 10,
             what="instance waiting in its group")
    assert db.instances_by_uid(["1.2.3.4.9"]) == {} and not p.dest.exists()
    committer.association_closed()
    t.join(60)
    assert done == [STORED] and db.get_instance("1.2.3.4.9") is not None


def test_same_sop_twice_in_one_group_is_stored_once(parts: Any) -> None:
    tmp_dir, store, db, make = parts
    committer = make(window=600.0)
    committer.association_opened()
    committer.association_opened()
    a = _pending(tmp_dir, store, "1.2.3.4.5", payload=b"a" * 100)
    b = _pending(tmp_dir, store, "1.2.3.4.5", payload=b"b" * 100)
    outcomes = _commit_all(committer, [a, b])
    assert sorted(outcomes) == [DUPLICATE, STORED]
    first = (a, b)[outcomes.index(STORED)]
    assert first.dest.read_bytes() == (b"a" * 100 if first is a else b"b" * 100)
    assert not a.tmp.exists() and not b.tmp.exists()
    assert len(list(db.iter_table("instances"))) == 1


def test_a_group_whose_rows_cannot_be_written_is_refused_whole(parts: Any,
                                                               monkeypatch: Any) -> None:
    tmp_dir, store, db, make = parts

    def full(rows: Any) -> list[bool]:
        raise sqlite3.OperationalError("database or disk is full")
    monkeypatch.setattr(db, "record_instances", full)
    committer = make(window=600.0)
    committer.association_opened()
    committer.association_opened()
    pendings = [_pending(tmp_dir, store, f"1.2.3.4.{i}") for i in range(2)]
    outcomes = _commit_all(committer, pendings)
    assert all(isinstance(o, Rejected) and o.status == STATUS_OUT_OF_DISK for o in outcomes)
    assert "cannot record the instance" in outcomes[0].reason
    assert not [f for f in store.rglob("*") if f.is_file()]    # no file without its row
    assert not list(tmp_dir.iterdir())


def test_a_handler_whose_group_hangs_answers_a_failure(parts: Any, monkeypatch: Any) -> None:
    import screener.ingest as ingest
    from screener.validation import STATUS_WRITE_FAILED

    tmp_dir, store, db, make = parts
    release = threading.Event()
    record = db.record_instances

    def stuck(rows: Any) -> list[bool]:
        release.wait(60)
        return record(rows)
    monkeypatch.setattr(db, "record_instances", stuck)
    monkeypatch.setattr(ingest, "GROUP_TIMEOUT_SECONDS", 0.2)
    committer = make(window=0.0)
    p = _pending(tmp_dir, store, "1.2.3.4.7")
    with pytest.raises(Rejected) as err:
        committer.commit(p)           # told a failure, never success, while the commit hangs
    assert err.value.status == STATUS_WRITE_FAILED and "did not finish" in err.value.reason
    release.set()                     # the late commit still records it: a re-send is a duplicate
    assert p.done.result(60) == STORED and db.get_instance("1.2.3.4.7") is not None


@pytest.mark.parametrize("hard_links", [True, False])
def test_commit_rename_without_replace_keeps_the_first_file(tmp_path: Path, monkeypatch: Any,
                                                            hard_links: bool) -> None:
    import errno
    import os

    if not hard_links:                   # a file system without hard links: check, then rename
        def no_link(*_: Any) -> None:
            raise OSError(errno.EPERM, "Operation not permitted")
        monkeypatch.setattr(os, "link", no_link)
    tmp_dir = tmp_path / "tmp"
    tmp_dir.mkdir()
    dest = tmp_path / "store" / "1.2" / "3.4" / "5.dcm"
    first, _ = write_temp(b"first", tmp_dir)
    second, _ = write_temp(b"second", tmp_dir)
    assert commit_rename(first, dest, replace=False)           # folders created on the way
    assert not commit_rename(second, dest, replace=False)      # the name is taken: left alone
    assert dest.read_bytes() == b"first" and second.read_bytes() == b"second"
    assert commit_rename(second, dest)                         # replace=True: written again
    assert dest.read_bytes() == b"second" and list(tmp_dir.iterdir()) == []


@pytest.mark.network
def test_scp_counts_associations_back_to_zero(tmp_path: Path) -> None:
    """Released, rejected and aborted associations all stop counting, so no later group waits
    for an association that is gone; concurrent senders share groups."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from screener.config import load_config
    from screener.ingest import start_scp
    from tests.conftest import free_port

    cfg = load_config(env={}, data_dir=tmp_path / "data", host="127.0.0.1", port=free_port(),
                      min_free_mb=1, allowed_calling_aes=["TESTSCU"])
    db = Database(cfg.db_path)
    srv = start_scp(cfg, db)
    try:
        parts = [make_ct_series(tmp_path / f"in{i}", 4, rows=32, cols=32) for i in range(3)]
        senders = [subprocess.Popen([require_tool("storescu"), "-aet", "TESTSCU", "-aec",
                                     "SCREENER", "127.0.0.1", str(cfg.port), *map(str, part)],
                                    env=dcmtk_env()) for part in parts]
        assert [s.wait(120) for s in senders] == [0, 0, 0]
        assert db.counts()["instances"] == 12
        assert srv.committer.committed == 12 and srv.committer.groups <= 12
        assert storescu(cfg.port, parts[0][:1], calling="INTRUDER").returncode != 0  # rejected
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", cfg.port, ae_title="SCREENER")
        assert assoc.is_established
        assoc.abort()
        wait_for(lambda: srv.committer.open_associations() == 0, 30,
                 what="every association counted as closed")
    finally:
        srv.stop()
        db.close()


# ------------------------------------------------------------------ the daemon, SIGKILLed

def _dataset_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    return raw[144 + int.from_bytes(raw[140:144], "little"):]


def _complete_parts(tmp_dir: Path, rows: int, cols: int) -> list[str]:
    """SOP Instance UIDs of the fully written temp files in ``tmp_dir``."""
    out = []
    for p in tmp_dir.glob(".rx-*.part"):
        try:
            ds = pydicom.dcmread(p)
            if len(ds.PixelData) == rows * cols * 2:
                out.append(str(ds.SOPInstanceUID))
        except Exception:  # noqa: BLE001 - still being written
            continue
    return out


@pytest.mark.network
def test_sigkill_inside_the_group_window_loses_no_acknowledged_instance(tmp_path: Path) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    size = 64
    a = make_ct_series(tmp_path / "a", 6, rows=size, cols=size)
    b = make_ct_series(tmp_path / "b", 6, rows=size, cols=size)
    sop_of = {str(f): str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
              for f in a + b}
    # a group stays open up to 10 minutes unless every open association has an instance in it
    env = {"SCREENER_INGEST_GROUP_WINDOW_MS": "600000", "SCREENER_QUIET_SECONDS": "3600"}
    d = Daemon(tmp_path / "d", env=env).start()
    tmp_dir = tmp_path / "d" / "tmp"

    # 1. two senders at once, nobody else: every group closes when both wait in it
    senders = [subprocess.Popen([require_tool("storescu"), "-v", "-aet", "TESTSCU", "-aec",
                                 "SCREENER", "127.0.0.1", str(d.port), *map(str, part)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=dcmtk_env()) for part in (a[:3], b[:3])]
    acked: list[str] = []
    for s in senders:
        out, _ = s.communicate(timeout=120)
        assert s.returncode == 0, out
        acked += acknowledged_files(out)
    assert sorted(acked) == sorted(map(str, a[:3] + b[:3]))

    # 2. an idle association is open: the next group waits for it; kill inside that window.
    # Two more senders (pynetdicom, one instance each, associations kept open) send a[3], b[3].
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    idle = ae.associate("127.0.0.1", d.port, ae_title="SCREENER")
    assert idle.is_established
    told: dict[str, Any] = {}

    def send(f: Path) -> None:
        assoc = ae.associate("127.0.0.1", d.port, ae_title="SCREENER")
        assert assoc.is_established
        try:
            rsp = assoc.send_c_store(f)
            told[str(f)] = rsp.get("Status") if rsp is not None else None
        except Exception as exc:  # noqa: BLE001 - the connection dropped
            told[str(f)] = repr(exc)
    senders = [threading.Thread(target=send, args=(f,)) for f in (a[3], b[3])]
    for t in senders:
        t.start()
    waiting = wait_for(lambda: (lambda u: u if len(u) == 2 else None)(
        _complete_parts(tmp_dir, size, size)), 60, 0.02, "two instances waiting in a group")
    assert sorted(waiting) == sorted([sop_of[str(a[3])], sop_of[str(b[3])]])
    db = d.db()
    assert db.instances_by_uid(waiting) == {}           # written and fdatasync'ed, not recorded
    db.close()
    d.kill()                                            # SIGKILL inside the group window
    for t in senders:
        t.join(60)
    idle.abort()
    assert set(told) == {str(a[3]), str(b[3])}
    assert 0 not in told.values(), told                 # nobody was told success
    # 3. restart: every acknowledged instance stored and recorded intact, nothing else
    d2 = Daemon(tmp_path / "d", port=d.port, env={"SCREENER_QUIET_SECONDS": "3600"}).start()
    db = d2.db()
    try:
        recorded = {r["sop_instance_uid"]: r for r in db.iter_table("instances")}
        assert set(recorded) == {sop_of[f] for f in acked}
        for f in acked:
            assert _dataset_bytes(Path(recorded[sop_of[f]]["path"])) == _dataset_bytes(Path(f))
        stored = {str(p) for p in (tmp_path / "d" / "store").rglob("*.dcm")}
        assert stored == {r["path"] for r in recorded.values()}  # no file without its row
        assert not list(tmp_dir.glob("*.part"))         # the open group's temp files removed
        # the senders send again what was not acknowledged: all stored and acknowledged
        for part in (a[3:], b[3:]):
            r = storescu(d2.port, part)
            assert r.returncode == 0 and len(acknowledged_files(r.stdout + r.stderr)) == 3
        assert db.counts()["instances"] == 12
    finally:
        db.close()
        assert d2.stop() == 0
