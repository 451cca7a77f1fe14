"""The SCP's association loops and C-STORE fast path (``screener.scp_reactor``): the
same bytes on the wire as pynetdicom's own path, and pynetdicom's path wherever the
fast one does not apply."""
from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pytest
from pynetdicom import AE, evt
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE

from screener import scp_reactor
from screener.config import Config
from screener.db import Database
from tests.daemon_helpers import make_ct_series, pynet_send


def _pynetdicom_command(msg_cls: type, primitive: C_STORE) -> bytes:
    msg = msg_cls()
    msg.primitive_to_message(primitive)
    first = next(iter(msg.encode_msg(1, 0)))  # the command set (a data set follows)
    return bytes(first.presentation_data_value_list[0][1][1:])


@pytest.mark.parametrize("status,comment", [
    (0x0000, None), (0xA900, "missing StudyInstanceUID"), (0xB006, "odd length!"),
    (0xC000, "data set cannot be parsed: ValueError")])
@pytest.mark.parametrize("sop_uid", ["1.2.3.4", "1.2.3.45"])
def test_store_response_is_encoded_as_pynetdicom_does(status: int, comment: str | None,
                                                      sop_uid: str) -> None:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    rsp.AffectedSOPInstanceUID = sop_uid
    rsp.Status = status
    if comment:
        rsp.ErrorComment = comment
    assert scp_reactor._encode_store_rsp(rsp) == _pynetdicom_command(C_STORE_RSP, rsp)


def test_store_request_command_is_read_as_pynetdicom_writes_it() -> None:
    req = C_STORE()
    req.MessageID, req.Priority = 12, 2
    req.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    req.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    req.MoveOriginatorApplicationEntityTitle = "MOVER"
    req.MoveOriginatorMessageID = 3
    req.DataSet = BytesIO(b"\x08\x00\x16\x00")
    cmd = scp_reactor._command(_pynetdicom_command(C_STORE_RQ, req))
    assert cmd == {"AffectedSOPClassUID": "1.2.840.10008.5.1.4.1.1.2", "CommandField": 1,
                   "MessageID": 12, "Priority": 2, "CommandDataSetType": 1,
                   "AffectedSOPInstanceUID": "1.2.826.0.1.3680043.8.498.1",
                   "MoveOriginatorApplicationEntityTitle": "MOVER",
                   "MoveOriginatorMessageID": 3}
    assert scp_reactor._command(b"\x00\x00\x00\x00\xff") is None


# the in-process SCP: tests/conftest.py's ``scp`` fixture


def test_the_scp_stores_on_the_fast_path(tmp_path: Path,
                                         scp: tuple[Config, Database, object]) -> None:
    cfg, db, _ = scp
    files = make_ct_series(tmp_path / "in", 3, rows=300, cols=300)  # several PDVs each
    before = scp_reactor.fast_stores
    assert pynet_send(cfg.port, files) == [(0, "")] * 3
    assert scp_reactor.fast_stores - before == 3
    assert db.counts()["instances"] == 3


def test_a_watched_association_takes_pynetdicom_path(tmp_path: Path,
                                                     scp: tuple[Config, Database, object]) -> None:
    cfg, db, srv = scp
    seen: list[int] = []
    srv.server.bind(evt.EVT_PDU_RECV, lambda event: seen.append(1))
    files = make_ct_series(tmp_path / "in", 2)
    before = scp_reactor.fast_stores
    assert pynet_send(cfg.port, files) == [(0, "")] * 2
    assert scp_reactor.fast_stores == before and seen
    assert db.counts()["instances"] == 2


def test_echo_and_release_still_work(scp: tuple[Config, Database, object]) -> None:
    cfg, _, _ = scp
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", cfg.port, ae_title="SCREENER")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    assert assoc.is_released
