"""Protocol ``hip_xray``: femoral-neck BMD from an AP pelvis / hip radiograph (Gu et al. 2023, BMD-GAN).

One folder, found by :func:`screener.protocols.registry` (its :data:`PROTOCOL`):

* ``protocol.py``: :class:`HipXrayProtocol`: what the router accepts, the run, the findings it reports
* ``preprocess.py``: the network input, one function for inference and training

Its training spec is ``training/protocols/hip_xray.py``; its bundle ``models/hip_xray/`` (the model card
names the network class and input spec).
"""
from screener.protocols.hip_xray.protocol import HipXrayProtocol

#: the protocol class this folder registers
PROTOCOL = HipXrayProtocol

__all__ = ["PROTOCOL", "HipXrayProtocol"]
