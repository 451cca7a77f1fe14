"""Structured JSON logging (structlog) that never writes patient identifiers.

Only :func:`configure_logging` (called by a ``main()``) sets up output; every
module logs through ``structlog.get_logger(__name__)``. Log UIDs and
:func:`accession_hash` values, never names, IDs or birth dates; the
:func:`drop_phi` processor removes such keys anyway as a last line of defence.
"""
from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
from typing import Any, MutableMapping, TextIO

import structlog

#: Keys (compared lower-case, without ``_``) that are dropped from every log event.
PHI_KEYS = frozenset({
    "patientname", "patientid", "patientbirthdate", "patientbirthtime", "patientsex",
    "patientage", "patientaddress", "patienttelephonenumbers", "otherpatientids",
    "otherpatientnames", "patientmothersbirthname", "accessionnumber", "accession",
    "issuerofpatientid", "referringphysicianname", "institutionname", "name", "birthdate",
})

_DEFAULT_SALT = "screener-accession-v1"

#: Log line formats of every command's ``--log-format``: ``human`` (one readable line per
#: event) or ``json`` (one JSON object per line, for journald and log shippers).
LOG_FORMATS = ("human", "json")

#: Environment variable the dispatcher (:func:`screener.cli.main`) sets from ``--log-format``
#: so that a sub-command configuring its logging later uses the same format.
LOG_FORMAT_ENV = "SCREENER_LOG_FORMAT"


def resolve_log_format(choice: str | None = None, stream: Any = None,
                       env: MutableMapping[str, str] | None = None) -> str:
    """The log format to use: the explicit choice, else ``$SCREENER_LOG_FORMAT``, else
    ``human`` when ``stream`` (default ``sys.stderr``) is a terminal and ``json`` otherwise
    (systemd, pipes, files).

    Parameters
    ----------
    choice : str, optional
        ``human`` or ``json`` (``console`` is accepted as ``human``).
    stream : file-like, optional
        Where the lines go.
    env : mapping, optional
        Default ``os.environ``.

    Returns
    -------
    str
        ``"human"`` or ``"json"``.

    Raises
    ------
    ValueError
        The choice (or the environment variable) is neither ``human`` nor ``json``.
    """
    env = os.environ if env is None else env
    value = choice or env.get(LOG_FORMAT_ENV, "")
    value = value.strip().lower()
    if value == "console":
        value = "human"
    if value:
        if value not in LOG_FORMATS:
            raise ValueError(f"log format {value!r} is not one of {', '.join(LOG_FORMATS)}")
        return value
    stream = sys.stderr if stream is None else stream
    try:
        return "human" if stream.isatty() else "json"
    except (AttributeError, ValueError):  # closed or not a real file
        return "json"


class ProgressAwareStream:
    """A line-buffered text stream that writes through :func:`tqdm.tqdm.write` while a
    progress bar is shown (``screener replay``), so that log lines are printed above the bar
    instead of being cut into it; directly to ``target`` otherwise.

    Parameters
    ----------
    target : file-like, optional
        Default: ``sys.stderr`` at the time of each write.
    """

    def __init__(self, target: TextIO | None = None) -> None:
        self._target = target
        self._buf = ""
        self._lock = threading.Lock()

    @property
    def target(self) -> TextIO:
        """The underlying stream."""
        return self._target if self._target is not None else sys.stderr

    def isatty(self) -> bool:
        """Whether the underlying stream is a terminal."""
        try:
            return bool(self.target.isatty())
        except (AttributeError, ValueError):
            return False

    def write(self, text: str) -> int:
        """Buffer ``text`` and write every complete line."""
        with self._lock:
            self._buf += text
            if "\n" not in self._buf:
                return len(text)
            lines, self._buf = self._buf.rsplit("\n", 1)
        self._emit(lines)
        return len(text)

    def _emit(self, lines: str) -> None:
        try:
            from tqdm import tqdm
            bars = len(getattr(tqdm, "_instances", ()) or ())
        except ImportError:  # pragma: no cover - tqdm is a dependency
            bars = 0
        if bars:
            tqdm.write(lines, file=self.target)
        else:
            self.target.write(lines + "\n")
            self.target.flush()

    def flush(self) -> None:
        """Write a pending partial line, then flush the underlying stream."""
        with self._lock:
            rest, self._buf = self._buf, ""
        if rest:
            self._emit(rest)
        self.target.flush()


def accession_hash(value: str | None, salt: str | None = None) -> str:
    """Return a short salted SHA-256 of an accession number, safe to log and store.

    Parameters
    ----------
    value : str or None
        The accession number; empty or ``None`` gives ``""``.
    salt : str, optional
        Site secret; defaults to ``SCREENER_HASH_SALT`` or a built-in constant.
        Use a site-specific salt so hashes cannot be matched across sites.

    Returns
    -------
    str
        16 hexadecimal characters (64 bits), or ``""`` for an empty value.
    """
    value = (value or "").strip()
    if not value:
        return ""
    salt = salt if salt is not None else os.environ.get("SCREENER_HASH_SALT", _DEFAULT_SALT)
    return hashlib.sha256(f"{salt}\x00{value}".encode()).hexdigest()[:16]


def drop_phi(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]
             ) -> MutableMapping[str, Any]:
    """structlog processor: remove keys that name patient identifiers.

    A key such as ``patient_name``, ``PatientName`` or ``PatientBirthDate`` is
    replaced by nothing; the event records that something was dropped in
    ``phi_dropped`` so the offending call site can be found and fixed.
    """
    dropped = [k for k in list(event_dict) if k.replace("_", "").lower() in PHI_KEYS]
    for k in dropped:
        del event_dict[k]
    if dropped:
        event_dict["phi_dropped"] = len(dropped)
    return event_dict


def configure_logging(level: str = "info", json: bool | None = None, stream: Any = None) -> None:
    """Configure structlog (and stdlib ``logging``) for a screener process.

    Parameters
    ----------
    level : str
        ``debug``, ``info``, ``warning``, ``error`` or ``critical``.
    json : bool, optional
        One JSON object per line (for journald / log shippers); ``False`` gives
        human-readable lines; ``None`` (default) follows :func:`resolve_log_format`
        (``--log-format`` / ``$SCREENER_LOG_FORMAT``, else human on a terminal, JSON otherwise).
    stream : file-like, optional
        Where to write; default standard error, through :class:`ProgressAwareStream` so that
        lines never cut into a progress bar.

    Raises
    ------
    ValueError
        Unknown level name.
    """
    name = str(level).strip().lower()
    levels = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
              "warn": logging.WARNING, "error": logging.ERROR, "critical": logging.CRITICAL}
    if name not in levels:
        raise ValueError(f"log level {level!r} is not one of debug, info, warning, error, critical")
    stream = stream if stream is not None else ProgressAwareStream()
    if json is None:
        json = resolve_log_format(None, stream) == "json"
    renderer: Any = (structlog.processors.JSONRenderer(sort_keys=False) if json
                     else structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            drop_phi,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(levels[name]),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    # Libraries (pynetdicom, apscheduler) log through stdlib logging: keep them
    # at WARNING at least — pynetdicom's debug output dumps whole datasets (PHI).
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_screener", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processor=renderer,
        foreign_pre_chain=[structlog.stdlib.add_logger_name, structlog.processors.add_log_level,
                           structlog.processors.TimeStamper(fmt="iso", utc=True), drop_phi]))
    handler._screener = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(max(levels[name], logging.WARNING))
    logging.captureWarnings(True)  # e.g. pydicom's warnings on malformed input, as JSON lines
    # pydicom's value-validation warnings quote the value ("Invalid value for VR DA:
    # '19411322'"): a birth date or name in the log. The validation layer and the report
    # builder check what matters themselves, so these warnings are switched off.
    import pydicom.config
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    for lib in ("pynetdicom", "apscheduler"):
        logging.getLogger(lib).setLevel(max(levels[name], logging.WARNING))


class FailureState:
    """Log a repeating failure once per state change, with a growing back-off.

    A loop (completion check, job claim) calls :meth:`failed` when its step
    raised and :meth:`ok` when it succeeded: the first failure is logged as an
    error (message, no traceback), repeats are only counted, and the return to
    health is logged once with how many attempts failed. :meth:`delay` is the
    wait before the next attempt: ``base`` while healthy, doubling up to
    ``maximum`` while failing.

    Parameters
    ----------
    what : str
        The step, e.g. ``"completion check"``.
    base, maximum : float
        Seconds.
    logger : structlog logger, optional
    """

    def __init__(self, what: str, base: float = 1.0, maximum: float = 30.0,
                 logger: Any = None) -> None:
        self.what = what
        self.base = base
        self.maximum = maximum
        self.failures = 0
        self._log = logger or structlog.get_logger(__name__)

    def failed(self, exc: BaseException) -> float:
        """Count a failure (logged when it is the first).

        Parameters
        ----------
        exc : BaseException
            What the step raised (its message is logged, without a traceback).

        Returns
        -------
        float
            Seconds to wait before the next attempt (:meth:`delay`).
        """
        self.failures += 1
        if self.failures == 1:
            self._log.error(f"{self.what} failing; retrying with back-off, logged again when "
                            "it recovers", error=f"{type(exc).__name__}: {exc}",
                            hint="free disk space" if "full" in str(exc) else None)
        return self.delay()

    def ok(self) -> None:
        """Mark a success (logged when it ends a run of failures)."""
        if self.failures:
            self._log.warning(f"{self.what} recovered", failed_attempts=self.failures)
        self.failures = 0

    def delay(self) -> float:
        """Seconds to wait before the next attempt."""
        if not self.failures:
            return self.base
        return min(self.maximum, self.base * 2 ** min(self.failures, 16))
