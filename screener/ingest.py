"""DICOM ingest: the C-ECHO / C-STORE SCP of ``screener serve`` (pynetdicom).

The C-STORE handler is thin and runs inline in the association thread, so the
sender waits for exactly this: check -> save durably -> record -> status.
Success (0x0000) is returned only after the file is fsync'ed under its final
name and its row is committed, so an acknowledged instance survives a crash.

Statuses (PS3.4 B.2.3) returned with an ``ErrorComment`` that says why:

======  ==================================================================
0x0000  stored (or already stored: duplicates are kept once)
0x0122  SOP class not an image class the screener accepts
0xA700  out of resources: free disk below ``min_free_mb``
0xA701  out of resources: the file could not be written
0xA900  data set does not match the SOP class: Study / Series / SOP
        Instance UID missing, or UIDs contradict the request
0xC000  cannot understand: the data set cannot be parsed
0xC001  cannot understand: pixel data missing, truncated or malformed
======  ==================================================================

Decodability is judged cheaply from the pixel data framing (length of native
data; encapsulated fragments with the codec's start and end markers) instead
of decoding: decoding one 512x512 JPEG 2000 slice costs ~24 ms here, many
times the ~3 ms the whole store takes. The series loader still declines
undecodable series later, with a recorded reason.
"""
from __future__ import annotations

import errno
import os
import ssl
import struct
import time
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import structlog
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import (UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian, JPEG2000, JPEG2000Lossless, JPEGBaseline8Bit,
                         JPEGExtended12Bit, JPEGLosslessSV1, JPEGLossless, JPEGLSLossless,
                         JPEGLSNearLossless, RLELossless)
from pynetdicom import (AE, PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION,
                        evt)
from pynetdicom import sop_class as sc
from pynetdicom.transport import ThreadedAssociationServer

from screener.config import Config
from screener.db import Database
from screener.logs import accession_hash
from screener.storage import (StorageError, encode_file_meta, free_mb, fsync_dir,
                              instance_path, write_atomic)

log = structlog.get_logger(__name__)

#: Image storage SOP classes accepted (everything else is refused at negotiation).
IMAGE_STORAGE_CLASSES: dict[str, str] = {
    sc.CTImageStorage: "CT",
    sc.EnhancedCTImageStorage: "Enhanced CT",
    sc.LegacyConvertedEnhancedCTImageStorage: "Legacy Converted Enhanced CT",
    sc.ComputedRadiographyImageStorage: "CR",
    sc.DigitalXRayImageStorageForPresentation: "DX for presentation",
    sc.DigitalXRayImageStorageForProcessing: "DX for processing",
    sc.SecondaryCaptureImageStorage: "Secondary Capture",
    sc.MultiFrameGrayscaleByteSecondaryCaptureImageStorage: "MF Grayscale Byte SC",
    sc.MultiFrameGrayscaleWordSecondaryCaptureImageStorage: "MF Grayscale Word SC",
}

#: Transfer syntaxes accepted. pynetdicom picks, per presentation context, the first
#: of these that the sender proposed. Uncompressed first, as most SCPs do: a sender
#: that lists several syntaxes in ONE context (pynetdicom does) can always send
#: uncompressed data; senders that keep compressed files as they are propose one
#: context per syntax (DCMTK storescu does), so each file is stored exactly as encoded.
TRANSFER_SYNTAXES: list[str] = [
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless, JPEGLSLossless, JPEGLosslessSV1, JPEGLossless, RLELossless,
    JPEG2000, JPEGLSNearLossless, JPEGBaseline8Bit, JPEGExtended12Bit,
]

_JPEG_FAMILY = {JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1,
                JPEGLSLossless, JPEGLSNearLossless}
_J2K_FAMILY = {JPEG2000Lossless, JPEG2000}

STATUS_SUCCESS = 0x0000
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_OUT_OF_DISK = 0xA700
STATUS_WRITE_FAILED = 0xA701
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_PARSE = 0xC000
STATUS_BAD_PIXEL_DATA = 0xC001


class Rejected(Exception):
    """An instance refused with a DICOM status and a reason for the sender.

    Parameters
    ----------
    status : int
        The C-STORE failure status.
    reason : str
        Human-readable reason (sent as ErrorComment, truncated to 64 characters).
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _frame_problem(frame: bytes, ts: str, index: int) -> str | None:
    body = frame.rstrip(b"\x00")
    where = f"frame {index + 1}"
    if ts in _JPEG_FAMILY:
        if not body.startswith(b"\xff\xd8"):
            return f"{where}: JPEG stream lacks its SOI marker"
        if not body.endswith(b"\xff\xd9"):
            return f"{where}: JPEG stream lacks its EOI marker (truncated)"
    elif ts in _J2K_FAMILY:
        if not (body.startswith(b"\xff\x4f\xff\x51") or body[4:8] == b"jP  "):
            return f"{where}: JPEG 2000 codestream lacks its SOC/SIZ markers"
        if not body.endswith(b"\xff\xd9"):
            return f"{where}: JPEG 2000 codestream lacks its EOC marker (truncated)"
    elif ts == RLELossless:
        if len(frame) < 64:
            return f"{where}: RLE header shorter than 64 bytes"
        header = struct.unpack("<16L", frame[:64])
        n = header[0]
        if not 1 <= n <= 15:
            return f"{where}: RLE header gives {n} segments (1-15 allowed)"
        offsets = header[1:n + 1]
        if offsets[0] != 64 or list(offsets) != sorted(offsets) or offsets[-1] >= len(frame):
            return f"{where}: RLE segment offsets inconsistent with the fragment length"
    return None


def check_pixel_data(ds: Dataset, transfer_syntax: str) -> None:
    """Check, without decoding, that an image's pixel data is present and well framed.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        The received data set.
    transfer_syntax : str
        Its transfer syntax UID.

    Raises
    ------
    Rejected
        ``0xC001`` with the reason (missing, truncated or malformed pixel data).
    """
    try:
        rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
        bits = int(ds.get("BitsAllocated") or 0)
        spp = int(ds.get("SamplesPerPixel") or 1)
        frames = int(ds.get("NumberOfFrames") or 1)
    except Exception as exc:  # noqa: BLE001 - bad VR / value in a received data set
        raise Rejected(STATUS_BAD_PIXEL_DATA, f"image attributes unreadable: {exc}") from exc
    if rows <= 0 or cols <= 0 or bits not in (1, 8, 16, 32, 64):
        raise Rejected(STATUS_BAD_PIXEL_DATA,
                       f"invalid image size: Rows {rows}, Columns {cols}, BitsAllocated {bits}")
    if "PixelData" not in ds:
        raise Rejected(STATUS_BAD_PIXEL_DATA, "no Pixel Data in an image instance")
    try:
        value = ds["PixelData"].value
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on bad data
        raise Rejected(STATUS_BAD_PIXEL_DATA, f"Pixel Data unreadable: {exc}") from exc
    if value is None or len(value) == 0:
        raise Rejected(STATUS_BAD_PIXEL_DATA, "Pixel Data is empty")
    ts = UID(transfer_syntax)
    if not ts.is_compressed:
        n_pixels = rows * cols * spp * frames
        expected = (n_pixels + 7) // 8 if bits == 1 else n_pixels * bits // 8
        if len(value) < expected:
            raise Rejected(STATUS_BAD_PIXEL_DATA,
                           f"Pixel Data truncated: {len(value)} of {expected} bytes")
        return
    try:
        found = list(generate_frames(value, number_of_frames=frames))
    except Exception as exc:  # noqa: BLE001
        raise Rejected(STATUS_BAD_PIXEL_DATA,
                       f"encapsulated Pixel Data malformed: {exc}") from exc
    if len(found) < frames or any(len(f) == 0 for f in found):
        raise Rejected(STATUS_BAD_PIXEL_DATA,
                       f"encapsulated Pixel Data has {len(found)} of {frames} frames")
    for i, frame in enumerate(found):
        problem = _frame_problem(frame, ts, i)
        if problem:
            raise Rejected(STATUS_BAD_PIXEL_DATA, problem)


def _uid(ds: Dataset, keyword: str) -> str:
    v = ds.get(keyword)
    return str(v).strip().strip("\x00") if v else ""


def _failure(status: int, reason: str) -> Dataset:
    rsp = Dataset()
    rsp.Status = status
    rsp.ErrorComment = reason[:64]
    return rsp


def _stats(event: evt.Event) -> dict[str, Any]:
    """Per-association counters (kept on the association object, logged when it closes)."""
    assoc = event.assoc
    st = getattr(assoc, "_screener_stats", None)
    if st is None:
        st = {"stored": 0, "duplicates": 0, "refused": 0, "bytes": 0, "studies": set(),
              "series": set(), "started": time.monotonic()}
        assoc._screener_stats = st  # type: ignore[attr-defined]
    return st


def _already_stored(db: Database, sop_uid: str) -> bool:
    """Recorded AND its file is in place with the recorded size (see :func:`handle_store`)."""
    row = db.get_instance(sop_uid)
    if row is None:
        return False
    try:
        return os.stat(row["path"]).st_size == int(row["size"] or 0)
    except OSError:
        return False


def handle_store(event: evt.Event, db: Database, config: Config,
                 syncer: Executor | None = None) -> int | Dataset:
    """``EVT_C_STORE`` handler: check, store durably, record, return the status.

    Durability: the file is written to a temp name and fdatasync'ed, renamed
    into place, then the folder fsync and the database commit run in
    parallel (``syncer``), and success is returned only after both. A power
    cut between them can leave a row whose file is missing; a re-sent
    instance is then written again, because "already stored" means recorded
    *and* the file present with its recorded size.

    Parameters
    ----------
    event : pynetdicom.events.Event
    db : screener.db.Database
    config : screener.config.Config
    syncer : concurrent.futures.Executor, optional
        Runs the folder fsync beside the database commit; ``None`` runs it first.

    Returns
    -------
    int or pydicom.dataset.Dataset
        ``0x0000`` or a status data set with ``ErrorComment``.
    """
    calling_ae = str(event.assoc.requestor.ae_title).strip()
    req = event.request
    sop_class = str(req.AffectedSOPClassUID or "")
    sop_instance = str(req.AffectedSOPInstanceUID or "").strip()
    try:
        if sop_class not in IMAGE_STORAGE_CLASSES:
            raise Rejected(STATUS_SOP_CLASS_NOT_SUPPORTED,
                           f"SOP class {sop_class} is not an accepted image class")
        free = free_mb(config.data_dir)
        if free < config.min_free_mb:
            raise Rejected(STATUS_OUT_OF_DISK,
                           f"disk nearly full: {free:.0f} MB free, need {config.min_free_mb}")
        ts = str(event.context.transfer_syntax)
        try:
            ds = event.dataset
            study_uid = _uid(ds, "StudyInstanceUID")
            series_uid = _uid(ds, "SeriesInstanceUID")
            sop_uid = _uid(ds, "SOPInstanceUID")
            ds_class = _uid(ds, "SOPClassUID")
            modality = str(ds.get("Modality") or "")
            acc = accession_hash(str(ds.get("AccessionNumber") or ""))
        except Rejected:
            raise
        except Exception as exc:  # noqa: BLE001 - any parse error means "cannot understand"
            raise Rejected(STATUS_CANNOT_PARSE,
                           f"data set cannot be parsed: {type(exc).__name__}") from exc
        if not any(k in ds for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID",
                                     "SeriesInstanceUID")):
            # pydicom reads a truncated stream or random bytes as an empty / alien data set
            raise Rejected(STATUS_CANNOT_PARSE,
                           "data set unreadable: truncated or not DICOM (no UIDs found)")
        missing = [name for name, v in (("StudyInstanceUID", study_uid),
                                        ("SeriesInstanceUID", series_uid),
                                        ("SOPInstanceUID", sop_uid)) if not v]
        if missing:
            raise Rejected(STATUS_DATASET_MISMATCH, "missing " + ", ".join(missing))
        if sop_uid != sop_instance:
            raise Rejected(STATUS_DATASET_MISMATCH,
                           "SOPInstanceUID differs from the request's Affected SOP Instance")
        if ds_class and ds_class != sop_class:
            raise Rejected(STATUS_DATASET_MISMATCH,
                           "SOPClassUID differs from the negotiated SOP class")
        if _already_stored(db, sop_uid):
            _stats(event)["duplicates"] += 1
            log.info("duplicate instance acknowledged, not rewritten", sop_instance_uid=sop_uid,
                     series_uid=series_uid, calling_ae=calling_ae)
            return STATUS_SUCCESS
        check_pixel_data(ds, ts)
        path = instance_path(config.store_dir, study_uid, series_uid, sop_uid)
        try:
            meta = encode_file_meta(sop_class, sop_uid, ts, PYNETDICOM_IMPLEMENTATION_UID,
                                    PYNETDICOM_IMPLEMENTATION_VERSION, calling_ae)
            size = write_atomic(path, (meta, event.encoded_dataset(include_meta=False)),
                                config.tmp_dir, sync_dir=False)
            dir_synced = (syncer.submit(fsync_dir, path.parent) if syncer is not None
                          else _done(fsync_dir, path.parent))
        except StorageError as exc:
            status = STATUS_OUT_OF_DISK if exc.errno == errno.ENOSPC else STATUS_WRITE_FAILED
            raise Rejected(status, f"cannot write the file: {exc.strerror}") from exc
        db.record_instance(sop_instance_uid=sop_uid, sop_class_uid=sop_class, study_uid=study_uid,
                           series_uid=series_uid, path=str(path), transfer_syntax=ts,
                           calling_ae=calling_ae, source="scp", modality=modality,
                           accession_hash=acc, size=size)
        try:
            dir_synced.result()
        except OSError as exc:
            raise Rejected(STATUS_WRITE_FAILED, f"cannot sync the folder: {exc.strerror}") from exc
        st = _stats(event)
        st["stored"] += 1
        st["bytes"] += size
        st["studies"].add(study_uid)
        st["series"].add(series_uid)
        log.debug("stored", sop_instance_uid=sop_uid, series_uid=series_uid, study_uid=study_uid,
                  transfer_syntax=ts, size=size, calling_ae=calling_ae)
        return STATUS_SUCCESS
    except Rejected as rej:
        _stats(event)["refused"] += 1
        log.warning("instance refused", sop_instance_uid=sop_instance, calling_ae=calling_ae,
                    status=f"0x{rej.status:04X}", reason=rej.reason)
        try:
            db.record_rejection(sop_instance_uid=sop_instance, calling_ae=calling_ae,
                                status=rej.status, reason=rej.reason)
        except Exception:  # noqa: BLE001 - the status must still go back
            log.exception("could not record a rejection")
        return _failure(rej.status, rej.reason)
    except Exception as exc:  # noqa: BLE001 - never crash the association thread
        log.exception("C-STORE handler failed", sop_instance_uid=sop_instance)
        return _failure(STATUS_WRITE_FAILED, f"internal error: {type(exc).__name__}")


def _done(fn: Any, *args: Any) -> Future[Any]:
    """Run ``fn`` now and return its outcome as a completed future."""
    fut: Future[Any] = Future()
    try:
        fut.set_result(fn(*args))
    except Exception as exc:  # noqa: BLE001 - re-raised by .result()
        fut.set_exception(exc)
    return fut


def handle_conn_close(event: evt.Event) -> None:
    """``EVT_CONN_CLOSE``: one summary line per association that sent instances."""
    st = getattr(event.assoc, "_screener_stats", None)
    if not st:
        return
    log.info("association closed", calling_ae=str(event.assoc.requestor.ae_title).strip(),
             stored=st["stored"], duplicates=st["duplicates"], refused=st["refused"],
             mbytes=round(st["bytes"] / 1e6, 1), study_uids=sorted(st["studies"])[:10],
             series=len(st["series"]), seconds=round(time.monotonic() - st["started"], 2))


def handle_echo(event: evt.Event) -> int:
    """``EVT_C_ECHO`` handler (verification)."""
    log.debug("echo", calling_ae=str(event.assoc.requestor.ae_title).strip())
    return STATUS_SUCCESS


#: Idle poll of pynetdicom's per-association network loop (its default is 1 ms).
#: Measured once (300 CT instances from storescu, in-process SCP): 1.72 s -> 1.37 s with 0.2 ms;
#: costs idle wake-ups only while an association is open.
DUL_POLL_SECONDS = 0.0002


def handle_conn_open(event: evt.Event) -> None:
    """``EVT_CONN_OPEN``: shorten the network loop's idle poll for this association."""
    dul = getattr(event.assoc, "dul", None)
    if dul is not None and hasattr(dul, "_run_loop_delay"):
        dul._run_loop_delay = DUL_POLL_SECONDS


def handle_rejected(event: evt.Event, db: Database, config: Config) -> None:
    """``EVT_REJECTED``: log and record an association refused (unknown calling AE)."""
    calling_ae = str(event.assoc.requestor.ae_title).strip()
    address = event.assoc.requestor.address
    if config.allowed_calling_aes and calling_ae not in config.allowed_calling_aes:
        reason = (f"association rejected: calling AE title {calling_ae!r} is not in "
                  "allowed_calling_aes")
    else:
        reason = "association rejected (too many associations, or a request we cannot serve)"
    log.warning("association rejected", calling_ae=calling_ae, peer=address, reason=reason)
    try:
        db.record_rejection(sop_instance_uid="", calling_ae=calling_ae, status=0, reason=reason)
    except Exception:  # noqa: BLE001
        log.exception("could not record a rejected association")


def ssl_context_from_config(config: Config) -> ssl.SSLContext | None:
    """A server TLS context from ``tls_cert``/``tls_key`` (and ``tls_ca`` to require
    client certificates), or ``None`` for plain TCP.

    Raises
    ------
    ValueError
        A PEM file is missing or unusable.
    """
    if not config.tls_cert:
        return None
    try:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(certfile=config.tls_cert, keyfile=config.tls_key)
        if config.tls_ca:
            ctx.load_verify_locations(cafile=config.tls_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"TLS: cannot load tls_cert/tls_key/tls_ca: {exc}") from exc
    return ctx


def build_ae(config: Config) -> AE:
    """The application entity with the accepted contexts and calling-AE allow-list."""
    ae = AE(ae_title=config.ae_title)
    for uid in IMAGE_STORAGE_CLASSES:
        ae.add_supported_context(uid, TRANSFER_SYNTAXES)
    ae.add_supported_context(sc.Verification)
    ae.maximum_pdu_size = 0  # no limit: fewer, larger PDUs from the sender
    ae.maximum_associations = 16
    ae.network_timeout = 60
    ae.dimse_timeout = 60
    ae.acse_timeout = 30
    if config.allowed_calling_aes:
        ae.require_calling_aet = list(config.allowed_calling_aes)
    return ae


@dataclass
class IngestServer:
    """A running SCP (see :func:`start_scp`)."""

    ae: AE
    server: ThreadedAssociationServer
    syncer: ThreadPoolExecutor

    @property
    def port(self) -> int:
        """The listening port."""
        return int(self.server.server_address[1])

    def stop(self) -> None:
        """Stop accepting and close the socket; associations in progress are aborted."""
        self.server.shutdown()
        self.ae.shutdown()
        self.syncer.shutdown(wait=True)


def start_scp(config: Config, db: Database) -> IngestServer:
    """Start the C-ECHO / C-STORE SCP in background threads.

    Parameters
    ----------
    config : Config
        ``ae_title``, ``host``, ``port``, ``allowed_calling_aes``, TLS, ``min_free_mb``.
    db : Database

    Returns
    -------
    IngestServer
    """
    config.ensure_dirs()
    ae = build_ae(config)
    if not config.allowed_calling_aes:
        log.warning("allowed_calling_aes is empty: any calling AE title is accepted")
    syncer = ThreadPoolExecutor(max_workers=4, thread_name_prefix="screener-fsync")
    handlers: list[Any] = [
        (evt.EVT_C_STORE, handle_store, [db, config, syncer]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_CONN_OPEN, handle_conn_open),
        (evt.EVT_CONN_CLOSE, handle_conn_close),
        (evt.EVT_REJECTED, handle_rejected, [db, config]),
    ]
    try:
        server = ae.start_server((config.host, config.port), block=False,
                                 evt_handlers=handlers, ssl_context=ssl_context_from_config(config))
    except BaseException:
        syncer.shutdown(wait=False)
        raise
    srv = IngestServer(ae=ae, server=server, syncer=syncer)
    log.info("SCP listening", ae_title=config.ae_title, host=config.host, port=srv.port,
             tls=bool(config.tls_cert), sop_classes=len(IMAGE_STORAGE_CLASSES),
             transfer_syntaxes=len(TRANSFER_SYNTAXES))
    return srv

