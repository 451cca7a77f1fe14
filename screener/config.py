"""Typed configuration: TOML file + ``SCREENER_*`` environment overrides.

With no file at all the defaults run: an SQLite database and the
``store/``, ``outbox/`` and ``tmp/`` folders under one data directory
(``./screener-data`` unless ``SCREENER_DATA_DIR`` says otherwise).
``deploy/screener.toml`` documents every key.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from screener.destinations import Destination, parse_destination

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


#: Where ``screener serve`` and every other command look for the site configuration when
#: neither ``--config`` nor ``SCREENER_CONFIG`` names one (``deploy/README.md`` installs it here).
DEFAULT_CONFIG_PATH = Path("/etc/screener/screener.toml")

#: The bundles shipped with the project (``models/`` beside the ``screener`` package).
DEFAULT_MODELS_DIR = Path(__file__).resolve().parent.parent / "models"


class ConfigError(ValueError):
    """The configuration is invalid; the message says which key and why."""


@dataclass
class Config:
    """Effective configuration of one screener process.

    Attributes
    ----------
    data_dir : pathlib.Path
        Root of the database, store, outbox and temp folders.
    ae_title, host, port : str, str, int
        The SCP's own AE title and listening address.
    allowed_calling_aes : list of str
        Calling AE titles accepted. ``screener serve`` refuses to start with an
        empty list unless ``allow_any_ae`` is set.
    allow_any_ae : bool
        Accept any calling AE title (``serve --allow-any-ae``); default off.
    quiet_seconds : float
        A series is complete after this many seconds without a new instance.
    min_free_mb : int
        Below this much free disk space C-STORE answers 0xA700.
    workers : int
        Concurrent series jobs.
    destinations : list of Destination
        Where results go; empty writes them to ``outbox_dir``.
    export_max_attempts, export_backoff_seconds, export_backoff_max_seconds
        Retry policy of the exporter (exponential backoff).
    tls_cert, tls_key, tls_ca : str
        Optional TLS for the SCP (PEM paths); all empty = plain TCP.
    export_tls_ca, export_tls_cert, export_tls_key : str
        For ``tls:AE@host:port`` destinations (PEM paths): the CA that signed the PACS's
        certificate (empty: the system's CAs), and the screener's own certificate and key when the
        PACS asks for one (both or neither).
    device : str
        ``"auto"``, ``"cpu"`` or ``"cuda"`` for model inference.
    models_dir : pathlib.Path
        Folder of the model bundles (``<models_dir>/<protocol>/``); default: the
        ``models/`` folder shipped beside the package.
    protocols : list of str
        Protocols to run (default: all registered ones).
    contrast_adjust_hu : float
        HU subtracted from L1 attenuation on contrast-enhanced CT before the
        Pickhardt thresholds are applied (clinical-physics.md section 1).
    reference_l1, reference_l1_l4, reference_femoral_neck, reference_total_hip : str
        T-score reference population of each site (:mod:`screener.references`);
        empty = the documented default (``kang_l1``, ``spine_l1l4_young_adult``,
        ``nhanes3_fn_women``, ``nhanes3_th_women``); ``nhanes3_fn``, ``nhanes3_th`` and
        ``nhanes_0508_l1l4`` choose the women's or men's reference by PatientSex.
    log_level : str
        structlog level name.
    health_host, health_port : str, int
        Where ``screener serve`` answers ``GET /healthz`` and Prometheus ``GET /metrics``
        (:mod:`screener.health`); port 0 (default) = off.
    seg_output : bool
        Also write a DICOM SEG of the measured ROIs on their CT slices
        (:mod:`screener.reporting.seg`) beside the SR and the overlays; default on.
    pmap_output : bool
        Also write each explanation map a protocol made on CT slices (l1_axial's Grad-RAMP) as a
        DICOM Parametric Map (:mod:`screener.reporting.pmap`); default on.
    ingest_group_window_ms : float
        Group commit of received instances (:class:`screener.ingest.GroupCommitter`): how long
        a group waits for instances of other associations before its files and rows are made
        durable together (it closes early once every open association has one in it, so a
        single sender never waits); default 5 ms.
    """

    data_dir: Path = Path("screener-data")
    ae_title: str = "SCREENER"
    host: str = "0.0.0.0"
    port: int = 11112
    allowed_calling_aes: list[str] = field(default_factory=list)
    allow_any_ae: bool = False
    quiet_seconds: float = 30.0
    min_free_mb: int = 500
    workers: int = 1
    destinations: list[Destination] = field(default_factory=list)
    export_max_attempts: int = 50
    export_backoff_seconds: float = 5.0
    export_backoff_max_seconds: float = 600.0
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    export_tls_ca: str = ""
    export_tls_cert: str = ""
    export_tls_key: str = ""
    device: str = "auto"
    models_dir: Path = DEFAULT_MODELS_DIR
    protocols: list[str] = field(default_factory=list)
    contrast_adjust_hu: float = 11.2
    reference_l1: str = ""
    reference_l1_l4: str = ""
    reference_femoral_neck: str = ""
    reference_total_hip: str = ""
    log_level: str = "info"
    health_host: str = "127.0.0.1"
    health_port: int = 0
    seg_output: bool = True
    pmap_output: bool = True
    ingest_group_window_ms: float = 5.0

    @property
    def db_path(self) -> Path:
        """SQLite database file."""
        return self.data_dir / "screener.db"

    @property
    def store_dir(self) -> Path:
        """Received instances, ``store/<study>/<series>/<sop>.dcm``."""
        return self.data_dir / "store"

    @property
    def outbox_dir(self) -> Path:
        """Results written here when no destination is configured."""
        return self.data_dir / "outbox"

    @property
    def results_dir(self) -> Path:
        """Every SR / SC produced, kept for re-sending (``results/<series>/``)."""
        return self.data_dir / "results"

    @property
    def tmp_dir(self) -> Path:
        """Temporary files on the same file system as the store (atomic rename)."""
        return self.data_dir / "tmp"

    def ensure_dirs(self) -> None:
        """Create the data directory tree, each folder private (0700) whatever the umask:
        the store, results and outbox hold patient data."""
        from screener.storage import make_private_dir
        for d in (self.data_dir, self.store_dir, self.outbox_dir, self.results_dir, self.tmp_dir):
            make_private_dir(d)

    def check_data_dir(self, create: bool = True) -> None:
        """Check that the data directory can be used, before anything is written.

        Parameters
        ----------
        create : bool
            Create the folder tree (:meth:`ensure_dirs`) — for the commands that write
            (``serve``, ``replay``, ``purge``). ``False`` only checks that ``data_dir``, when
            it exists, is a folder (``status``, ``results``).

        Raises
        ------
        ConfigError
            ``data_dir`` is a file, lies under a file, or cannot be created or written;
            the message names the folder and what to do.
        """
        d = self.data_dir
        hint = "pass --data-dir (or SCREENER_DATA_DIR, or data_dir in the config) a writable folder"
        if d.exists() and not d.is_dir():
            raise ConfigError(f"data directory {d} is a file, not a folder; {hint}")
        if not create:
            return
        try:
            self.ensure_dirs()
            probe = self.tmp_dir / f".write-test-{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as exc:
            raise ConfigError(f"data directory {d} cannot be used: {exc.strerror or exc} "
                              f"({exc.filename or d}); {hint}") from None

    def check_access_policy(self) -> None:
        """Refuse an SCP that would accept any sender by accident.

        Raises
        ------
        ConfigError
            ``allowed_calling_aes`` is empty and ``allow_any_ae`` is not set.
        """
        if not self.allowed_calling_aes and not self.allow_any_ae:
            raise ConfigError(
                "allowed_calling_aes is empty: list the AE titles that may send studies "
                "(config key allowed_calling_aes or SCREENER_ALLOWED_CALLING_AES), or pass "
                "--allow-any-ae to accept any sender")

    def redacted(self) -> dict[str, Any]:
        """The effective configuration as a dict, safe to log (no secrets)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("tls_key", "export_tls_key") and v:
                v = "<set>"
            elif isinstance(v, Path):
                v = str(v)
            elif f.name == "destinations":
                v = [d.key for d in v]
            out[f.name] = v
        return out


_ENV_PREFIX = "SCREENER_"


def _coerce(name: str, value: Any, default: Any) -> Any:
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                return value.strip().lower() in ("1", "true", "yes", "on")
            return bool(value)
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, Path):
            return Path(value).expanduser()
        if isinstance(default, list) and name in ("allowed_calling_aes", "protocols"):
            return [str(v).strip() for v in parse_list(name, value) if str(v).strip()]
        return str(value) if isinstance(default, str) else value
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config key {name!r}: cannot use {value!r} ({exc})") from exc


def parse_list(name: str, value: Any) -> list[Any]:
    """A list setting from TOML (a list) or from the environment (a string).

    A string is read as a JSON list when it starts with ``[`` (``'["CT1", "CT2"]'``), else as
    comma-separated items (``CT1,CT2``); blanks around items are dropped.

    Parameters
    ----------
    name : str
        The config key, for the error message.
    value : list or str

    Returns
    -------
    list

    Raises
    ------
    ConfigError
        A string that starts with ``[`` but is not a JSON list, or a value that is neither
        a list nor a string.
    """
    if isinstance(value, (list, tuple)):
        return list(value)
    if not isinstance(value, str):
        raise ConfigError(f"config key {name!r}: expected a list, got {value!r}")
    text = value.strip()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"config key {name!r}: {value!r} starts with '[' but is not a JSON list "
                f"({exc.msg}); write it as '[\"A\", \"B\"]' or as A,B") from None
        if not isinstance(items, list):  # pragma: no cover - '[' always decodes to a list
            raise ConfigError(f"config key {name!r}: expected a list, got {value!r}")
        return items
    return [v.strip() for v in text.split(",") if v.strip()]


def find_config_path(path: str | os.PathLike[str] | None = None,
                     env: dict[str, str] | None = None) -> Path | None:
    """The configuration file a command uses: ``path`` (``--config``), else
    ``$SCREENER_CONFIG``, else :data:`DEFAULT_CONFIG_PATH` when it exists, else none.

    ``screener serve`` and the commands an operator runs beside it (``status``,
    ``results``, ``purge``) find the same file, and so the same data directory.

    Parameters
    ----------
    path : path-like, optional
    env : dict, optional
        Default ``os.environ``.

    Returns
    -------
    pathlib.Path or None
    """
    env = dict(os.environ if env is None else env)
    given = path or env.get(_ENV_PREFIX + "CONFIG")
    if given:
        return Path(given)
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.is_file() else None


def _parse_destination(item: Any, where: str) -> Destination:
    try:
        return parse_destination(item)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def load_config(path: str | os.PathLike[str] | None = None,
                env: dict[str, str] | None = None, **overrides: Any) -> Config:
    """Build the effective configuration.

    Parameters
    ----------
    path : path-like, optional
        TOML file (see ``deploy/screener.toml``); ``SCREENER_CONFIG`` is used
        when not given; no file means defaults.
    env : dict, optional
        Environment to read ``SCREENER_*`` overrides from (default ``os.environ``).
        ``SCREENER_DESTINATIONS`` takes ``AE@host:port`` or ``dicomweb+https://host/dicom-web``
        items separated by commas (or a JSON list).
    **overrides
        Highest-priority values (e.g. from command-line flags); ``None`` is ignored.

    Returns
    -------
    Config

    Raises
    ------
    ConfigError
        Unknown keys, wrong types or a missing file, with the key named.
    """
    env = dict(os.environ if env is None else env)
    cfg = Config()
    known = {f.name: f for f in fields(Config)}
    path = path or env.get(_ENV_PREFIX + "CONFIG")
    values: dict[str, Any] = {}
    if path:
        p = Path(path)
        try:
            with p.open("rb") as fh:
                raw = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {p} does not exist; pass an existing TOML file or "
                              "omit it") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {p} is not valid TOML: {exc}") from exc
        except PermissionError as exc:
            raise ConfigError(f"config file {p} cannot be read: {exc.strerror}; run as the "
                              "service user (sudo -u screener ...) or root") from None
        except OSError as exc:
            raise ConfigError(f"config file {p} cannot be read: {exc.strerror}; pass a TOML "
                              "file") from None
        # sections are for readability only: [network] port = 11112 == port = 11112
        for key, val in raw.items():
            if key == "destinations":
                values[key] = val
            elif isinstance(val, dict):
                values.update(val)
            else:
                values[key] = val
    for key in known:
        ev = env.get(_ENV_PREFIX + key.upper())
        if ev is not None and ev != "":
            values[key] = ev
    values.update({k: v for k, v in overrides.items() if v is not None})
    for key, val in values.items():
        if key not in known:
            raise ConfigError(f"unknown config key {key!r}; known keys: {', '.join(sorted(known))}")
        if key == "destinations":
            items = parse_list(key, val)
            setattr(cfg, key, [_parse_destination(x.strip() if isinstance(x, str) else x,
                                                   f"destinations[{i}]")
                               for i, x in enumerate(items) if x])
        else:
            setattr(cfg, key, _coerce(key, val, getattr(Config(), key)))
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"config key 'device' must be auto, cpu or cuda, not {cfg.device!r}")
    from screener.protocols import registry

    known = registry()
    unknown = [n for n in cfg.protocols if n not in known]
    if unknown:
        raise ConfigError(f"config key 'protocols': unknown {', '.join(unknown)}; "
                          f"registered: {', '.join(known)}")
    from screener.references import check_config

    try:
        check_config(cfg)
    except ValueError as exc:
        raise ConfigError(f"config key {exc}") from None
    if not 0 < cfg.port < 65536:
        raise ConfigError(f"config key 'port' must be 1-65535, not {cfg.port}")
    if not 0 <= cfg.health_port < 65536:
        raise ConfigError(f"config key 'health_port' must be 1-65535, or 0 for off, "
                          f"not {cfg.health_port}")
    if bool(cfg.tls_cert) != bool(cfg.tls_key):
        raise ConfigError("TLS needs both tls_cert and tls_key (PEM files), or neither")
    if bool(cfg.export_tls_cert) != bool(cfg.export_tls_key):
        raise ConfigError("export TLS needs both export_tls_cert and export_tls_key (PEM files), or neither")
    return cfg
