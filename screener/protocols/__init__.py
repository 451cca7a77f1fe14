"""Protocols: analyses the router can send a series to.

The registry is built, not edited: the built-in protocols, one folder each
(``screener/protocols/<name>/``, its ``__init__`` exporting ``PROTOCOL``; :func:`builtin`),
then every protocol a site has installed under the entry-point group
:data:`ENTRY_POINT_GROUP` (``screener.protocols``), e.g. in the site package's
``pyproject.toml``::

    [project.entry-points."screener.protocols"]
    my_protocol = "my_package.my_module:MyProtocol"

:func:`registry` lists them in routing order and :func:`default_protocols`
builds those the daemon and ``screener replay`` run (``Config.protocols``
narrows the list). The deep-learning protocols subclass
:class:`~screener.protocols.model.ModelProtocol`.
"""
from __future__ import annotations

import functools
import importlib
import importlib.metadata
import pkgutil

import structlog

from screener.protocols.base import (Decision, Protocol, ProtocolContext, ProtocolDeclined,
                                     axial_ct_decision)

__all__ = ["ENTRY_POINT_GROUP", "Decision", "Protocol", "ProtocolContext", "ProtocolDeclined",
           "axial_ct_decision", "builtin", "default_protocols", "registry"]

log = structlog.get_logger(__name__)

#: entry-point group under which installed packages register further protocols
ENTRY_POINT_GROUP = "screener.protocols"


@functools.lru_cache(maxsize=1)
def builtin() -> dict[str, str]:
    """The built-in protocols, found rather than listed: name -> ``"module:class"``.

    Every sub-package ``screener/protocols/<name>/`` whose ``__init__`` exports
    ``PROTOCOL`` (a :class:`Protocol` subclass whose ``name`` is the folder's), in
    ascending :attr:`Protocol.routing_order`.

    Raises
    ------
    TypeError
        For a folder whose ``PROTOCOL`` is missing, not a Protocol, or named otherwise.
    """
    found: list[tuple[int, str, str]] = []
    for info in pkgutil.iter_modules(__path__):
        if not info.ispkg:
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        cls = getattr(module, "PROTOCOL", None)
        if not (isinstance(cls, type) and issubclass(cls, Protocol) and cls.name == info.name):
            raise TypeError(f"{module.__name__}.PROTOCOL must be the Protocol subclass named {info.name!r}")
        found.append((cls.routing_order, info.name, f"{cls.__module__}:{cls.__qualname__}"))
    return {name: path for _, name, path in sorted(found)}


def registry() -> dict[str, str]:
    """Every protocol the router can use, in routing order: name -> ``"module:class"``.

    The built-ins first (:func:`builtin`), then the installed entry points of
    :data:`ENTRY_POINT_GROUP` in name order. An entry point whose name is a
    built-in's is ignored with a warning (a plug-in cannot replace a protocol
    silently).
    """
    out = dict(builtin())
    for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        if ep.name in out:
            if out[ep.name] != ep.value:
                log.warning("protocol entry point ignored: the name is taken", name=ep.name,
                            entry_point=ep.value, registered=out[ep.name])
            continue
        out[ep.name] = ep.value
    return out


def default_protocols(names: list[str] | None = None) -> list[Protocol]:
    """Instances of the registered protocols (all, or those named).

    Parameters
    ----------
    names : list of str, optional
        Protocol names to keep (``Config.protocols``); empty or None means all of :func:`registry`.

    Raises
    ------
    ValueError
        For a name that is not registered (the message lists the known ones), or an entry point
        that does not load or is not a :class:`Protocol`.
    """
    known = registry()
    wanted = list(names or known)
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ValueError(f"unknown protocol(s) {', '.join(unknown)}; registered: {', '.join(known)}")
    out: list[Protocol] = []
    for name in wanted:
        module, _, attr = known[name].partition(":")
        try:
            obj = getattr(importlib.import_module(module), attr)()
        except Exception as exc:  # noqa: BLE001 - a broken plug-in is named, not a traceback
            raise ValueError(f"protocol {name!r} ({known[name]}) could not be loaded: "
                             f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(obj, Protocol):
            raise ValueError(f"protocol {name!r} ({known[name]}) is not a screener.protocols.Protocol")
        if obj.name != name:
            raise ValueError(f"protocol {name!r} ({known[name]}) calls itself {obj.name!r}: the "
                             "registered name and Protocol.name must be the same")
        out.append(obj)
    return out
