"""Protocols: analyses the router can send a series to.

``default_protocols()`` builds the protocols of :data:`REGISTRY` that the daemon and
``screener replay`` run (``Config.protocols`` narrows the list).  The deep-learning
protocols subclass :class:`~screener.protocols.model.ModelProtocol`.
"""
from __future__ import annotations

from screener.protocols.base import (Decision, Protocol, ProtocolContext, ProtocolDeclined,
                                     axial_ct_decision)

__all__ = ["REGISTRY", "Decision", "Protocol", "ProtocolContext", "ProtocolDeclined", "axial_ct_decision",
           "default_protocols"]


#: Registered protocols in routing order: name -> "module:class".
REGISTRY: dict[str, str] = {
    "l1_attenuation": "screener.protocols.l1_attenuation:L1AttenuationProtocol",
    "l1_axial": "screener.protocols.l1_axial:L1AxialProtocol",
    "femur_coronal": "screener.protocols.femur_coronal:FemurCoronalProtocol",
    "lumbar_sagittal": "screener.protocols.lumbar_sagittal:LumbarSagittalProtocol",
    "hip_xray": "screener.protocols.hip_xray:HipXrayProtocol",
    "dxa_spine": "screener.protocols.dxa_spine:DxaSpineProtocol",
}


def default_protocols(names: list[str] | None = None) -> list[Protocol]:
    """Instances of the registered protocols (all, or those named).

    Parameters
    ----------
    names : list of str, optional
        Protocol names to keep (``Config.protocols``); empty or None means all.

    Raises
    ------
    ValueError
        For a name that is not registered (the message lists the known ones).
    """
    import importlib

    wanted = list(names or REGISTRY)
    unknown = [n for n in wanted if n not in REGISTRY]
    if unknown:
        raise ValueError(f"unknown protocol(s) {', '.join(unknown)}; registered: {', '.join(REGISTRY)}")
    out: list[Protocol] = []
    for name in wanted:
        module, _, cls = REGISTRY[name].partition(":")
        out.append(getattr(importlib.import_module(module), cls)())
    return out
