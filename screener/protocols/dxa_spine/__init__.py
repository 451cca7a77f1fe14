"""Protocol ``dxa_spine``: scoliosis, unreliable spine BMD and fracture risk from a DXA spine image (Nissinen et al. 2021).

One folder, found by :func:`screener.protocols.registry` (its :data:`PROTOCOL`):

* ``protocol.py``: :class:`DxaSpineProtocol`: what the router accepts, the run, the findings it reports
* ``preprocess.py``: the network input, one function for inference and training

Its training spec is ``training/protocols/dxa_spine.py``; its bundle ``models/dxa_spine/`` (the model card
names the network class and input spec).
"""
from screener.protocols.dxa_spine.protocol import DxaSpineProtocol

#: the protocol class this folder registers
PROTOCOL = DxaSpineProtocol

__all__ = ["PROTOCOL", "DxaSpineProtocol"]
