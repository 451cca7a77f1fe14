"""Protocol ``l1_attenuation``: trabecular attenuation of L1 on axial CT (Pickhardt), no network.

One folder, found by :func:`screener.protocols.registry` (its :data:`PROTOCOL`):

* ``protocol.py``: :class:`L1AttenuationProtocol`: what the router accepts, the run, the findings it reports

A classical measurement: no training spec, no bundle.
"""
from screener.protocols.l1_attenuation.protocol import L1AttenuationProtocol

#: the protocol class this folder registers
PROTOCOL = L1AttenuationProtocol

__all__ = ["PROTOCOL", "L1AttenuationProtocol"]
