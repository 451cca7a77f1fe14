"""Where results are sent: a DICOM node (C-STORE) or a DICOMweb server (STOW-RS).

One parser for every place a destination is written down: the configuration
(``destinations`` in the TOML file, ``SCREENER_DESTINATIONS``), the export
queue (each queued file names its destination by :attr:`Destination.key`),
and the exporter that sends it.

Forms
-----
``AE@host:port``
    A DICOM node, sent to by C-STORE with our AE title as the calling AE.
``tls:AE@host:port``
    The same over TLS (PS3.15 secure transport): the node's certificate is checked against
    ``export_tls_ca`` (else the system's CAs) and its host name; with ``export_tls_cert`` /
    ``export_tls_key`` the screener presents its own certificate.
``dicomweb+https://host/dicom-web`` (or ``dicomweb+http://``)
    A DICOMweb service root; results are stored with STOW-RS
    (``POST {root}/studies``), with the same retries and back-off as C-STORE.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import urlsplit

__all__ = ["DICOMWEB_PREFIX", "Destination", "TLS_PREFIX", "parse_destination"]

#: prefix that marks a DICOMweb destination
DICOMWEB_PREFIX = "dicomweb+"
#: prefix that marks a DICOM node reached over TLS
TLS_PREFIX = "tls:"


@dataclass
class Destination:
    """A place results are sent to.

    Attributes
    ----------
    ae_title, host, port : str, str, int
        The DICOM node (C-STORE); empty / 0 for a DICOMweb destination.
    name : str
        A label for logs (optional).
    url : str
        The DICOMweb service root (``https://host/dicom-web``), empty for a DICOM node.
    tls : bool
        A DICOM node reached over TLS.
    """

    ae_title: str = ""
    host: str = ""
    port: int = 0
    name: str = ""
    url: str = ""
    tls: bool = False

    @property
    def kind(self) -> str:
        """``"dicomweb"`` or ``"dicom"``."""
        return "dicomweb" if self.url else "dicom"

    @property
    def key(self) -> str:
        """The destination as written in the export queue: ``AE@host:port``, ``tls:AE@host:port``
        or ``dicomweb+URL``."""
        if self.url:
            return f"{DICOMWEB_PREFIX}{self.url}"
        return f"{TLS_PREFIX if self.tls else ''}{self.ae_title}@{self.host}:{self.port}"


def parse_destination(item: str | Mapping[str, Any]) -> Destination:
    """A :class:`Destination` from ``"AE@host:port"``, ``"tls:AE@host:port"``,
    ``"dicomweb+https://host/dicom-web"`` or a table with ``ae_title``, ``host``, ``port`` (and
    ``name``, ``tls``) or ``url`` (and ``name``).

    Raises
    ------
    ValueError
        Not one of those forms; the message shows the forms accepted.
    """
    if isinstance(item, Mapping):
        name = str(item.get("name", "") or "")
        if "url" in item:
            return _dicomweb(str(item["url"]), name)
        if not {"ae_title", "host", "port"} <= set(item):
            raise ValueError("a destination table needs ae_title, host and port (a DICOM node) or url "
                             "(a DICOMweb service root)")
        tls = _flag(item.get("tls", False))
        try:
            return Destination(str(item["ae_title"]), str(item["host"]), int(item["port"]), name, tls=tls)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"destination port must be a number, got {item['port']!r}") from exc
    text = str(item).strip()
    if text.startswith(DICOMWEB_PREFIX):
        return _dicomweb(text[len(DICOMWEB_PREFIX):], "")
    tls = text.startswith(TLS_PREFIX)
    try:
        ae, hostport = text[len(TLS_PREFIX) if tls else 0:].split("@", 1)
        host, port = hostport.rsplit(":", 1)
        if not ae or not host:
            raise ValueError
        return Destination(ae, host, int(port), tls=tls)
    except ValueError as exc:
        raise ValueError(f"destination {text!r} is not 'AE@host:port', 'tls:AE@host:port' or "
                         "'dicomweb+https://host/dicom-web'") from exc


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off", ""):
        return False
    raise ValueError(f"destination tls must be true or false, got {value!r}")


def _dicomweb(url: str, name: str) -> Destination:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"DICOMweb destination {url!r} is not an http(s) URL of the service root, "
                         "e.g. dicomweb+https://pacs.example.org/dicom-web")
    return Destination(name=name, url=url.rstrip("/"))
