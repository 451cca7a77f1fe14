"""Where results are sent: a DICOM node (C-STORE) or a DICOMweb server (STOW-RS).

One parser for every place a destination is written down: the configuration
(``destinations`` in the TOML file, ``SCREENER_DESTINATIONS``), the export
queue (each queued file names its destination by :attr:`Destination.key`),
and the exporter that sends it.

Forms
-----
``AE@host:port``
    A DICOM node, sent to by C-STORE with our AE title as the calling AE.
``dicomweb+https://host/dicom-web`` (or ``dicomweb+http://``)
    A DICOMweb service root; results are stored with STOW-RS
    (``POST {root}/studies``), with the same retries and back-off as C-STORE.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import urlsplit

__all__ = ["DICOMWEB_PREFIX", "Destination", "parse_destination"]

#: prefix that marks a DICOMweb destination
DICOMWEB_PREFIX = "dicomweb+"


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
    """

    ae_title: str = ""
    host: str = ""
    port: int = 0
    name: str = ""
    url: str = ""

    @property
    def kind(self) -> str:
        """``"dicomweb"`` or ``"dicom"``."""
        return "dicomweb" if self.url else "dicom"

    @property
    def key(self) -> str:
        """The destination as written in the export queue: ``AE@host:port`` or ``dicomweb+URL``."""
        return f"{DICOMWEB_PREFIX}{self.url}" if self.url else f"{self.ae_title}@{self.host}:{self.port}"


def parse_destination(item: str | Mapping[str, Any]) -> Destination:
    """A :class:`Destination` from ``"AE@host:port"``, ``"dicomweb+https://host/dicom-web"`` or a
    table with ``ae_title``, ``host``, ``port`` (and ``name``) or ``url`` (and ``name``).

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
        try:
            return Destination(str(item["ae_title"]), str(item["host"]), int(item["port"]), name)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"destination port must be a number, got {item['port']!r}") from exc
    text = str(item).strip()
    if text.startswith(DICOMWEB_PREFIX):
        return _dicomweb(text[len(DICOMWEB_PREFIX):], "")
    try:
        ae, hostport = text.split("@", 1)
        host, port = hostport.rsplit(":", 1)
        if not ae or not host:
            raise ValueError
        return Destination(ae, host, int(port))
    except ValueError as exc:
        raise ValueError(f"destination {text!r} is not 'AE@host:port' or "
                         "'dicomweb+https://host/dicom-web'") from exc


def _dicomweb(url: str, name: str) -> Destination:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"DICOMweb destination {url!r} is not an http(s) URL of the service root, "
                         "e.g. dicomweb+https://pacs.example.org/dicom-web")
    return Destination(name=name, url=url.rstrip("/"))
