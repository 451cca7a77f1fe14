"""Kang et al. (2023) residual CNN that regresses DXA BMD from one axial L1 CT slice.

Reference: Kang JW, Park C, Lee DE, Yoo JH, Kim M. *Prediction of bone mineral
density in CT using deep learning with explainability.* Front. Physiol. 13:1061911
(2023), section 2.3 and Figure 3 (seed ``000`` of the project).

What the paper states, and how this module realises it
------------------------------------------------------
* "22 convolutional layers and two fully connected layers; the interim 20
  convolutional layers were placed in 10 residual blocks": one stem
  convolution, 10 residual blocks of two 3x3 convolutions each (blocks per
  stage 2-2-3-3 with 16-32-64-128 filters) and one final 3x3 convolution with
  16 filters; then ``Flatten -> Dense(512, ReLU) -> Dense(1, linear)``.
  The 1x1 projection convolutions on the shortcut of the first block of each
  stage are not counted among the 22 (they are part of the skip connection).
* "feature maps gradually decreased ... by convolution with a stride of two":
  the stem and the first convolution of every stage use stride 2, so a
  256x256 crop becomes 8x8 after five halvings.
* "After every convolution layer, batch normalization was applied ... ReLU":
  blocks are pre-activation residual blocks (BN -> ReLU -> conv, twice) as in
  the authors' public notebook (github.com/soribido/BMD_prediction,
  ``bmd_pred_case1.ipynb``), convolutions carry a bias (Keras default).
* "The total number of trainable parameters were 1,614,273": this module,
  with the paper's 256x256 single-channel input, has exactly 1,614,273
  trainable parameters (``tests/test_nets.py`` asserts it).  The paper's text
  does not give the crop size; the authors' notebook loads ``(N, 256, 256, 1)``
  arrays, which is the size used here (``INPUT_SIZE``).
* "Only the output layer was activated using a linear function": the output is
  the raw BMD estimate in g/cm^2.

Explanation maps (Grad-RAM / Grad-RAMP, equations 2 and 3) use the output of the
last convolution (before its batch normalisation), exposed as
:attr:`KangRegressor.target_layer`; this is the layer the authors' XAI notebook
selects (``layers[-6]``).
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

__all__ = ["INPUT_SIZE", "KangRegressor"]

#: Side of the square input crop (pixels), from the authors' notebook.
INPUT_SIZE = 256

#: (filters, residual blocks) per stage; the first block of each stage has stride 2.
STAGES: tuple[tuple[int, int], ...] = ((16, 2), (32, 2), (64, 3), (128, 3))


class _PreActBlock(nn.Module):
    """Pre-activation residual block: ``x + conv(relu(bn(conv(relu(bn(x))))))``.

    With ``stride > 1`` or a change of width, the shortcut is a strided 1x1
    convolution (the authors' ``res_conv3``); otherwise it is the identity
    (``res_identity3``).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, project: bool) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut: nn.Module
        if project:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride)
        else:
            if stride != 1 or in_channels != out_channels:
                raise ValueError("an identity shortcut needs stride 1 and equal widths")
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(self.relu1(self.bn1(x)))
        y = self.conv2(self.relu2(self.bn2(y)))
        return y + self.shortcut(x)


class KangRegressor(nn.Module):
    """Kang et al.'s 22-convolution residual BMD regressor.

    Parameters
    ----------
    input_size : int
        Side of the square input (pixels); must be a multiple of 32.  The paper's
        network uses 256 (the flattened head then has 8*8*16 = 1024 inputs).
        Smaller sizes only change the first dense layer.
    in_channels : int
        Image channels (1 for a CT slice).

    Attributes
    ----------
    target_layer : torch.nn.Conv2d
        The last convolution (16 filters); its output is the feature map ``A``
        of Grad-RAM / Grad-RAMP.

    Notes
    -----
    Input: ``(B, in_channels, input_size, input_size)`` float tensor (the
    authors min-max scale the cropped HU slice to 0-1).  Output: ``(B, 1)``
    BMD estimate (g/cm^2), linear.
    """

    #: the paper's input side (pixels); :data:`screener.nets.INPUT_SIZES` is read from here
    paper_input_size: ClassVar[int] = INPUT_SIZE

    def __init__(self, input_size: int = INPUT_SIZE, in_channels: int = 1) -> None:
        super().__init__()
        if input_size % 32 != 0 or input_size <= 0:
            raise ValueError(
                f"KangRegressor input_size must be a positive multiple of 32 (got {input_size}); "
                f"the paper uses {INPUT_SIZE}"
            )
        self.input_size = input_size
        self.in_channels = in_channels
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, stride=2, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
        )
        blocks: list[nn.Module] = []
        width = 16
        for filters, n_blocks in STAGES:
            blocks.append(_PreActBlock(width, filters, stride=2, project=True))
            for _ in range(n_blocks - 1):
                blocks.append(_PreActBlock(filters, filters, stride=1, project=False))
            width = filters
        self.blocks = nn.Sequential(*blocks)
        self.last_conv = nn.Conv2d(width, 16, 3, padding=1)
        self.last_bn = nn.BatchNorm2d(16)
        self.last_relu = nn.ReLU()
        side = input_size // 32
        self.fc1 = nn.Linear(16 * side * side, 512)
        self.fc_relu = nn.ReLU()
        self.fc2 = nn.Linear(512, 1)

    @property
    def target_layer(self) -> nn.Module:
        """The last convolution, whose output is Grad-RAM's feature map ``A``."""
        return self.last_conv

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Output of the last convolution (before BN), shape ``(B, 16, S/32, S/32)``."""
        return self.last_conv(self.blocks(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102 - documented on the class
        if x.ndim != 4 or x.shape[1] != self.in_channels or tuple(x.shape[2:]) != (
            self.input_size,
            self.input_size,
        ):
            raise ValueError(
                f"KangRegressor expects (B, {self.in_channels}, {self.input_size}, {self.input_size}) "
                f"input, got {tuple(x.shape)}; crop/resize the L1 slice first"
            )
        a = self.last_relu(self.last_bn(self.features(x)))
        return self.fc2(self.fc_relu(self.fc1(torch.flatten(a, 1))))
