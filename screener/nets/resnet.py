"""ResNet-50 regressor for BMD and trabecular bone score from sagittal lumbar CT (Yoshida et al.).

References: He K, Zhang X, Ren S, Sun J. *Deep residual learning for image
recognition* (CVPR 2016) for the network; Yoshida et al., *J Comput Assist
Tomogr* 2023 (seed ``002`` of the project) for its use: one 256x256 mid-vertebral
sagittal slice per vertebra L1-L4 (FOV 300 mm), ResNet50, Huber loss, affine
(linear) outputs for BMD and TBS.

Written without torchvision (which does not import in this environment).  The
architecture is the standard ResNet-50: 7x7/2 stem convolution with 64 filters,
3x3/2 max-pooling, bottleneck stages of 3-4-6-3 blocks (1x1 -> 3x3 -> 1x1,
expansion 4, widths 64-128-256-512), global average pooling and one linear
layer.  The stride of a down-sampling bottleneck sits on its 3x3 convolution
(the common "v1.5" variant used by torchvision; He et al. put it on the first
1x1 convolution -- the parameter count is the same).  With ``width=1``,
one input channel and two outputs, the network has 23,505,858 parameters
(torchvision's 1000-class RGB ResNet-50 has 25,557,032; the difference is
the stem's input channels and the output layer).

Choices where the paper is silent
---------------------------------
* Yoshida et al. trained in Sony's Neural Network Console and show one
  "Affine" output; whether BMD and TBS came from one network or two is not
  stated.  Here one network has one linear output per target
  (``outputs=("bmd", "tbs")``); pass ``outputs=("bmd",)`` to train them apart.
* ``width`` multiplies every stage width (0.25 gives 16-32-64-128 bottleneck
  widths, about 1.5 M parameters) for the narrow ``cohort`` recipe that must
  train on a 2-core CPU; the ``paper`` recipe keeps ``width=1``.

Explanation maps use the output of the last bottleneck block (after its
residual addition and ReLU), exposed as :attr:`ResNet50Regressor.target_layer`.
"""
from __future__ import annotations

from typing import ClassVar, Sequence

import torch
from torch import nn

__all__ = ["INPUT_SIZE", "OUTPUTS", "Bottleneck", "ResNet50Regressor"]

#: Side of the square sagittal input (pixels), from the paper.
INPUT_SIZE = 256
#: Default regression outputs, in column order.
OUTPUTS = ("bmd", "tbs")
#: Bottleneck blocks per stage of ResNet-50.
LAYERS = (3, 4, 6, 3)
EXPANSION = 4


class Bottleneck(nn.Module):
    """ResNet bottleneck block: 1x1 -> 3x3 (stride) -> 1x1 (x4), BN after each, ReLU."""

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = width * EXPANSION
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.relu2 = nn.ReLU()
        self.relu_out = nn.ReLU()
        self.downsample: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.downsample = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu1(self.bn1(self.conv1(x)))
        y = self.relu2(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu_out(y + self.downsample(x))


class ResNet50Regressor(nn.Module):
    """ResNet-50 with linear regression outputs (BMD g/cm^2 and TBS by default).

    Parameters
    ----------
    in_channels : int
        Image channels (1 for a CT slice).
    outputs : sequence of str
        Names of the regression outputs, one linear unit each.
    width : float
        Multiplier of all stage widths (1.0 = ResNet-50; the ``cohort`` recipe
        may use e.g. 0.25).  Widths are rounded to a multiple of 4, minimum 4.
    layers : sequence of int
        Bottleneck blocks per stage (3, 4, 6, 3 for ResNet-50).

    Attributes
    ----------
    target_layer : Bottleneck
        The last bottleneck block; its output is the explanation maps' ``A``.

    Notes
    -----
    Input ``(B, in_channels, H, W)`` with H, W >= 32 (the paper: 256x256, 300 mm
    FOV); output ``(B, len(outputs))``.  Any input size works thanks to global
    average pooling.
    """

    #: the paper's input side (pixels); :data:`screener.nets.INPUT_SIZES` is read from here
    paper_input_size: ClassVar[int] = INPUT_SIZE

    def __init__(
        self,
        *,
        in_channels: int = 1,
        outputs: Sequence[str] = OUTPUTS,
        width: float = 1.0,
        layers: Sequence[int] = LAYERS,
    ) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be positive (got {width})")
        if not outputs:
            raise ValueError("outputs must name at least one regression target")
        self.in_channels = in_channels
        self.outputs = tuple(outputs)
        self.width = width

        def w(base: int) -> int:
            return max(4, int(round(base * width / 4.0)) * 4)

        stem = w(64)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(stem),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        stages: list[nn.Module] = []
        channels = stem
        for i, (base, n_blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks: list[nn.Module] = []
            for j in range(n_blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(Bottleneck(channels, w(base), stride))
                channels = w(base) * EXPANSION
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, len(self.outputs))
        self.feature_channels = channels
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @property
    def target_layer(self) -> nn.Module:
        """The last bottleneck block (output of ``layer4``)."""
        return self.layer4[-1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Output of the last bottleneck block, ``(B, 2048*width, H/32, W/32)``."""
        x = self.stem(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"ResNet50Regressor expects (B, {self.in_channels}, H, W) input, got {tuple(x.shape)}"
            )
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))
