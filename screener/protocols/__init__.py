"""Protocols: analyses the router can send a series to.

``default_protocols()`` is the registry the daemon and ``screener replay``
use. Deep-learning protocols plug in later through the same
:class:`~screener.protocols.base.Protocol` interface.
"""
from __future__ import annotations

from screener.protocols.base import (Decision, Protocol, ProtocolContext, ProtocolDeclined,
                                     axial_ct_decision)

__all__ = ["Decision", "Protocol", "ProtocolContext", "ProtocolDeclined", "axial_ct_decision",
           "default_protocols"]


def default_protocols() -> list[Protocol]:
    """The protocols registered by default (currently ``l1_attenuation``)."""
    from screener.protocols.l1_attenuation import L1AttenuationProtocol
    return [L1AttenuationProtocol()]
