"""Neural networks of the papers the screener reproduces (torch, no torchvision).

Every network exposes ``target_layer`` (the module whose output is the feature
map ``A`` used by :mod:`screener.explain`) and ``features(x)`` (that map for an
input).  Classifiers return logits; regressors return their estimates.

=====================  ==================================  =============  =============
class                   paper (seed)                        input          output
=====================  ==================================  =============  =============
``KangRegressor``       Kang 2023 (000), ``l1_axial``       1x256x256      BMD (g/cm^2)
``HaClassifier``        Ha 2024 (001), ``femur_coronal``    1x250x250 + 5  3 logits
``ResNet50Regressor``   Yoshida 2023 (002), sagittal L1-L4  1x256x256      BMD, TBS
``NissinenCNN``         Nissinen 2021 (003), ``dxa_spine``  1x150x150      1 logit/task
=====================  ==================================  =============  =============
"""
from __future__ import annotations

from torch import nn

from .ha import HaClassifier
from .kang import KangRegressor
from .nissinen import NissinenCNN
from .resnet import ResNet50Regressor

__all__ = [
    "INPUT_SIZES",
    "HaClassifier",
    "KangRegressor",
    "NissinenCNN",
    "ResNet50Regressor",
    "count_parameters",
]

#: Paper input sizes (square side, pixels) by network class name, read from each network's
#: ``paper_input_size`` (a network describes itself; a new one needs no line here).
INPUT_SIZES: dict[str, int] = {
    name: int(obj.paper_input_size) for name, obj in sorted(globals().items())
    if isinstance(obj, type) and issubclass(obj, nn.Module) and hasattr(obj, "paper_input_size")
}


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters of ``model``.

    Parameters
    ----------
    model : torch.nn.Module
        The network.
    trainable_only : bool
        Count only parameters with ``requires_grad`` (Keras' "trainable params").

    Returns
    -------
    int
        Total number of scalar parameters.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
