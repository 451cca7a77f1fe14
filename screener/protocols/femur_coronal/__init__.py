"""Protocol ``femur_coronal``: normal / osteopenia / osteoporosis from both femora on coronal CT (Ha et al. 2024).

One folder, found by :func:`screener.protocols.registry` (its :data:`PROTOCOL`):

* ``protocol.py``: :class:`FemurCoronalProtocol`: what the router accepts, the run, the findings it reports
* ``preprocess.py``: the network input, one function for inference and training

Its training spec is ``training/protocols/femur_coronal.py``; its bundle ``models/femur_coronal/`` (the model card
names the network class and input spec).
"""
from screener.protocols.femur_coronal.protocol import FemurCoronalProtocol

#: the protocol class this folder registers
PROTOCOL = FemurCoronalProtocol

__all__ = ["PROTOCOL", "FemurCoronalProtocol"]
