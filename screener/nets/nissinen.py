"""Nissinen et al. (2021) 4-convolution CNN for lumbar-spine DXA images.

Reference: Nissinen T, Suoranta S, Saavalainen T, et al. *Detecting pathological
features and predicting fractures in lumbar spine DXA images using deep learning.*
Bone Reports 14:101070 (2021), section 2.4 and Fig. 3 (seed ``003``).

What the paper states, and how this module realises it
------------------------------------------------------
* "4 convolutional layers, 4 pooling layers, and 1 fully connected layer";
  "kernel size of 5x5 pixels, 'same' padding, and ReLU"; "max-pooling layer,
  with a pooling size of 2x2 pixels, after each convolutional layer"; input
  150x150 (the spine centre line +/- 75 pixels).  150 -> 75 -> 37 -> 18 -> 9.
* "The output from the last pooling layer was flattened and fed to a fully
  connected layer for classification ... Dropout regularization on the fully
  connected layer.  The output layer contained a single neuron with a sigmoid".
* "L2 regularization was applied on all the convolutional layers": that is
  an optimiser concern here -- :meth:`NissinenCNN.param_groups` returns
  parameter groups where only convolution kernels get ``weight_decay`` (with
  ``torch.optim.Adam``, ``weight_decay = 2 * lambda`` reproduces a Keras
  ``l2(lambda)`` kernel regulariser).
* The same architecture serves all three tasks (scoliosis, unreliable BMD,
  fracture); ``n_tasks`` gives one sigmoid unit per task so that three heads can
  share one trunk, or ``n_tasks=1`` for one bundle per task as in the paper.

Choices where the paper is silent (its supplementary material has them)
-----------------------------------------------------------------------
* Filters per convolution: Fig. 6 shows "8 out of 64" kernels of the last
  convolutional layer, so the last has 64; the others are not given in the
  text.  Default ``(32, 32, 64, 64)``.
* Width of the fully connected layer: 128; dropout rate: 0.5 (Srivastava et
  al.'s default).

The network returns **logits**, one per task; :meth:`NissinenCNN.predict_proba`
applies the paper's sigmoid (training uses ``BCEWithLogitsLoss``, which is the
same objective computed stably).  Grad-CAM uses the ReLU output of the fourth
convolution (:attr:`NissinenCNN.target_layer`).
"""
from __future__ import annotations

from typing import ClassVar, Sequence

import torch
from torch import nn

__all__ = ["INPUT_SIZE", "TASKS", "NissinenCNN"]

#: Side of the square DXA crop (pixels), from the paper.
INPUT_SIZE = 150
#: The paper's three tasks.
TASKS = ("scoliosis", "unreliable_bmd", "fracture")


class _ConvReLUPool(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.relu(self.conv(x)))


class NissinenCNN(nn.Module):
    """Nissinen et al.'s DXA-image classifier: 4 x (Conv5x5 -> ReLU -> MaxPool) -> FC -> sigmoid.

    Parameters
    ----------
    input_size : int
        Side of the square input (paper: 150).  At least 16.
    n_tasks : int
        Number of sigmoid outputs (one per task).
    in_channels : int
        Image channels (1).
    channels : sequence of int
        Filters of the four convolutions (default ``(32, 32, 64, 64)``).
    fc_units : int
        Width of the fully connected layer (default 128).
    dropout : float
        Dropout on the fully connected layer (default 0.5).
    kernel_size : int
        Convolution kernel (paper: 5).

    Attributes
    ----------
    target_layer : torch.nn.ReLU
        ReLU after the fourth convolution (Grad-CAM's feature map).

    Notes
    -----
    Input ``(B, in_channels, S, S)``; output ``(B, n_tasks)`` logits.
    """

    #: the paper's input side (pixels); :data:`screener.nets.INPUT_SIZES` is read from here
    paper_input_size: ClassVar[int] = INPUT_SIZE

    def __init__(
        self,
        input_size: int = INPUT_SIZE,
        *,
        n_tasks: int = 1,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 32, 64, 64),
        fc_units: int = 128,
        dropout: float = 0.5,
        kernel_size: int = 5,
    ) -> None:
        super().__init__()
        if len(channels) != 4:
            raise ValueError(f"Nissinen's network has four convolutions; got channels={tuple(channels)}")
        if input_size < 16:
            raise ValueError(f"input_size must be >= 16 for four 2x2 poolings (got {input_size})")
        if n_tasks < 1:
            raise ValueError("n_tasks must be at least 1")
        self.input_size = input_size
        self.in_channels = in_channels
        self.n_tasks = n_tasks
        blocks: list[nn.Module] = []
        width = in_channels
        for c in channels:
            blocks.append(_ConvReLUPool(width, c, kernel_size))
            width = c
        self.convs = nn.Sequential(*blocks)
        side = input_size
        for _ in range(4):
            side //= 2
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(width * side * side, fc_units),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(fc_units, n_tasks),
        )

    @property
    def target_layer(self) -> nn.Module:
        """ReLU after the fourth convolution (Grad-CAM's ``A``)."""
        return self.convs[-1].relu

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Activated output of the fourth convolution (before its pooling)."""
        for block in list(self.convs)[:-1]:
            x = block(x)
        last = self.convs[-1]
        return last.relu(last.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if x.ndim != 4 or x.shape[1] != self.in_channels or tuple(x.shape[2:]) != (
            self.input_size,
            self.input_size,
        ):
            raise ValueError(
                f"NissinenCNN expects (B, {self.in_channels}, {self.input_size}, {self.input_size}) "
                f"input, got {tuple(x.shape)}; crop the DXA image around the spine centre line first"
            )
        return self.classifier(self.convs(x))

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Sigmoid probabilities ``(B, n_tasks)``."""
        return torch.sigmoid(self(x))

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Optimizer parameter groups with L2 (``weight_decay``) on convolution kernels only.

        Parameters
        ----------
        weight_decay : float
            Decay for the convolution kernels; everything else gets 0.

        Returns
        -------
        list of dict
            ``[{"params": conv kernels, "weight_decay": weight_decay},
            {"params": the rest, "weight_decay": 0.0}]`` for ``torch.optim``.
        """
        conv = [m.conv.weight for m in self.convs]
        conv_ids = {id(p) for p in conv}
        rest = [p for p in self.parameters() if id(p) not in conv_ids]
        return [
            {"params": conv, "weight_decay": float(weight_decay)},
            {"params": rest, "weight_decay": 0.0},
        ]
