"""Protocol ``l1_axial``: DXA-equivalent L1 aBMD from one axial CT slice (Kang et al. 2023).

One folder, found by :func:`screener.protocols.registry` (its :data:`PROTOCOL`):

* ``protocol.py``: :class:`L1AxialProtocol`: what the router accepts, the run, the findings it reports
* ``preprocess.py``: the network input, one function for inference and training

Its training spec is ``training/protocols/l1_axial.py``; its bundle ``models/l1_axial/`` (the model card
names the network class and input spec).
"""
from screener.protocols.l1_axial.protocol import L1AxialProtocol

#: the protocol class this folder registers
PROTOCOL = L1AxialProtocol

__all__ = ["PROTOCOL", "L1AxialProtocol"]
