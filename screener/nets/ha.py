"""Ha et al. (2024) 6-convolution CNN grading normal / osteopenia / osteoporosis from the femur.

Reference: Ha et al., *Multi-classification of osteoporosis grading stages using
abdominal computed tomography with clinical variables* (2024), section 4 and
Fig. 3 (seed ``001`` of the project).

What the paper states, and how this module realises it
------------------------------------------------------
* Image branch: "six convolutional layers (16, 32, 64, 128, 256, 512);
  kernel_size = 3, same padding, and Maxpool2D were applied to each layer ...
  ReLU": ``[Conv3x3(same) -> ReLU -> MaxPool2x2] x 6``.  With the paper's
  250x250 crop the map shrinks 250 -> 125 -> 62 -> 31 -> 15 -> 7 -> 3 (floor,
  Keras' default ``valid`` pooling), so 3*3*512 = 4608 features are flattened.
* "three fully connected layers (4096, 1024, 128)" with ReLU, and "Dropout (0.2)
  was applied to the last hidden layer": dropout after the 128-unit layer.
* Demographics branch: "two fully connected layers (64, 16)" on sex, age,
  height, weight and BMI (order :data:`DEMOGRAPHICS`).  "Each layer uses a ReLU
  activation function and ... batch normalization": ``Linear -> BN -> ReLU``.
* Fusion: "The two generated feature maps were expressed by concatenation and
  classified into normal, osteopenia, and osteoporosis groups through two fully
  connected layers".  The paper does not give the hidden width; this module uses
  64 units (``Linear(128+16, 64) -> BN -> ReLU -> Linear(64, 3)``), the width of
  the first demographics layer.
* Image-only variant (``demographics=False``, the paper's "6-layer CNN", AUC
  0.933): the 128-unit features go straight to a ``Linear(128, 3)`` output.
* The convolutions of the image branch carry no batch normalisation (the paper
  mentions BN only for the fully connected layers of the multimodal model).

The network returns class **logits** (normal, osteopenia, osteoporosis); the
paper's softmax is applied by :meth:`HaClassifier.predict_proba` and inside
``torch.nn.CrossEntropyLoss`` during training.

Grad-CAM (the paper's explanation map) uses the output of the sixth convolution
after its ReLU, exposed as :attr:`HaClassifier.target_layer`.
"""
from __future__ import annotations

from typing import ClassVar, Sequence

import torch
from torch import nn

__all__ = ["CLASSES", "DEMOGRAPHICS", "INPUT_SIZE", "HaClassifier"]

#: Side of the square coronal femur crop (pixels), from the paper.
INPUT_SIZE = 250
#: Output classes, in logit order.
CLASSES = ("normal", "osteopenia", "osteoporosis")
#: Order of the demographic inputs (standardise each before feeding the net).
DEMOGRAPHICS = ("age", "sex", "height", "weight", "bmi")


class _ConvReLUPool(nn.Module):
    """``Conv3x3(same) -> ReLU -> MaxPool2x2``; ``relu`` output is the Grad-CAM map."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.relu(self.conv(x)))


def _dense_bn_relu(n_in: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, n_out), nn.BatchNorm1d(n_out), nn.ReLU())


class HaClassifier(nn.Module):
    """Ha et al.'s 3-class femur CNN, with or without the demographics branch.

    Parameters
    ----------
    input_size : int
        Side of the square input (pixels); the paper uses 250.  Must be at
        least 64 so that six 2x2 poolings leave a feature map.
    demographics : bool
        ``True`` for the multimodal model (image + 5 demographics, AUC 0.939),
        ``False`` for the image-only model.
    in_channels : int
        Image channels (1: windowed CT, C 500 / W 2000).
    channels : sequence of int
        Filters of the six convolutions (paper: 16 ... 512).  A narrower
        sequence (e.g. ``(8, 16, 32, 64, 64, 64)``) may be used by a CPU-sized
        ``cohort`` recipe; the model card must say so.
    fc : sequence of int
        Widths of the image branch's fully connected layers (paper: 4096, 1024,
        128).
    demo_fc : sequence of int
        Widths of the demographics branch (paper: 64, 16).
    head_hidden : int
        Hidden width of the fusion head (not in the paper; 64).
    dropout : float
        Dropout on the last hidden image layer (paper: 0.2).
    n_classes : int
        Number of classes (3).

    Attributes
    ----------
    target_layer : torch.nn.ReLU
        ReLU after the sixth convolution (Grad-CAM's feature map).

    Notes
    -----
    ``forward(image)`` for the image-only model, ``forward(image, demo)`` for the
    multimodal one, where ``image`` is ``(B, in_channels, S, S)`` and ``demo``
    is ``(B, 5)`` in :data:`DEMOGRAPHICS` order.  Returns ``(B, n_classes)``
    logits.
    """

    #: the paper's input side (pixels); :data:`screener.nets.INPUT_SIZES` is read from here
    paper_input_size: ClassVar[int] = INPUT_SIZE

    def __init__(
        self,
        input_size: int = INPUT_SIZE,
        *,
        demographics: bool = True,
        in_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64, 128, 256, 512),
        fc: Sequence[int] = (4096, 1024, 128),
        demo_fc: Sequence[int] = (64, 16),
        head_hidden: int = 64,
        dropout: float = 0.2,
        n_classes: int = len(CLASSES),
    ) -> None:
        super().__init__()
        if len(channels) != 6:
            raise ValueError(f"Ha's image branch has six convolutions; got channels={tuple(channels)}")
        if input_size < 64:
            raise ValueError(f"input_size must be >= 64 for six 2x2 poolings (got {input_size})")
        if not fc:
            raise ValueError("fc must list at least one fully connected width")
        self.input_size = input_size
        self.in_channels = in_channels
        self.uses_demographics = demographics
        convs: list[nn.Module] = []
        width = in_channels
        for c in channels:
            convs.append(_ConvReLUPool(width, c))
            width = c
        self.convs = nn.Sequential(*convs)
        side = input_size
        for _ in range(6):
            side //= 2
        layers: list[nn.Module] = [nn.Flatten()]
        n_in = width * side * side
        for n_out in fc:
            layers += [nn.Linear(n_in, n_out), nn.ReLU()]
            n_in = n_out
        layers.append(nn.Dropout(dropout))
        self.image_fc = nn.Sequential(*layers)
        self.image_features = n_in
        self.demo: nn.Module | None
        if demographics:
            demo_layers: list[nn.Module] = []
            d_in = len(DEMOGRAPHICS)
            for d_out in demo_fc:
                demo_layers.append(_dense_bn_relu(d_in, d_out))
                d_in = d_out
            self.demo = nn.Sequential(*demo_layers)
            self.head = nn.Sequential(
                _dense_bn_relu(n_in + d_in, head_hidden), nn.Linear(head_hidden, n_classes)
            )
        else:
            self.demo = None
            self.head = nn.Linear(n_in, n_classes)

    @property
    def target_layer(self) -> nn.Module:
        """ReLU after the sixth convolution (Grad-CAM's ``A``)."""
        return self.convs[-1].relu

    def features(self, image: torch.Tensor) -> torch.Tensor:
        """Activated output of the sixth convolution (before its pooling)."""
        x = image
        for block in list(self.convs)[:-1]:
            x = block(x)
        last = self.convs[-1]
        return last.relu(last.conv(x))

    def forward(self, image: torch.Tensor, demo: torch.Tensor | None = None) -> torch.Tensor:  # noqa: D102
        if image.ndim != 4 or image.shape[1] != self.in_channels or tuple(image.shape[2:]) != (
            self.input_size,
            self.input_size,
        ):
            raise ValueError(
                f"HaClassifier expects (B, {self.in_channels}, {self.input_size}, {self.input_size}) "
                f"images, got {tuple(image.shape)}"
            )
        f = self.image_fc(self.convs(image))
        if self.demo is None:
            if demo is not None:
                raise ValueError("this HaClassifier is image-only; build it with demographics=True")
            return self.head(f)
        if demo is None or demo.ndim != 2 or demo.shape[1] != len(DEMOGRAPHICS):
            raise ValueError(
                f"the multimodal HaClassifier needs demographics of shape (B, {len(DEMOGRAPHICS)}) "
                f"in order {DEMOGRAPHICS}; got {None if demo is None else tuple(demo.shape)}"
            )
        return self.head(torch.cat([f, self.demo(demo)], dim=1))

    @torch.no_grad()
    def predict_proba(self, image: torch.Tensor, demo: torch.Tensor | None = None) -> torch.Tensor:
        """Softmax class probabilities ``(B, n_classes)`` in :data:`CLASSES` order."""
        return torch.softmax(self(image, demo), dim=1)
