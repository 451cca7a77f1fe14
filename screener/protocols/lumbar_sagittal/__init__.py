"""Protocol ``lumbar_sagittal``: BMD and TBS from mid-vertebral sagittal L1-L4 (Yoshida et al. 2023).

One folder, found by :func:`screener.protocols.registry` (its :data:`PROTOCOL`):

* ``protocol.py``: :class:`LumbarSagittalProtocol`: what the router accepts, the run, the findings it reports
* ``preprocess.py``: the network input, one function for inference and training

Its training spec is ``training/protocols/lumbar_sagittal.py``; its bundle ``models/lumbar_sagittal/`` (the model card
names the network class and input spec).
"""
from screener.protocols.lumbar_sagittal.protocol import LumbarSagittalProtocol

#: the protocol class this folder registers
PROTOCOL = LumbarSagittalProtocol

__all__ = ["PROTOCOL", "LumbarSagittalProtocol"]
