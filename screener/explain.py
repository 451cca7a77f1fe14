"""Explanation maps for the screener's networks, and their fusion onto the input image.

* :func:`grad_ram` and :func:`grad_ramp` -- Kang et al. 2023 (seed ``000``),
  equations (2) and (3), for regressors::

      L_Grad-RAM(i,j)  = | sum_k alpha_k A_k(i,j) |,  alpha_k = 1/Z sum_ij dy/dA_k(i,j)
      L_Grad-RAMP(i,j) = | sum_k g_k(i,j) A_k(i,j) |,  g_k(i,j) = dy/dA_k(i,j)

  ``A`` is the feature map of the last convolution layer (each network's
  ``target_layer``), ``y`` the estimate, ``Z`` the number of pixels of the map.
  "We obtained ten localization maps from ten predictive models for every
  sample and averaged them": pass the fold ensemble as a list of models.
* :func:`grad_cam` -- Selvaraju et al. 2017 for classifiers (Ha et al. 2024,
  Nissinen et al. 2021): ``ReLU(sum_k alpha_k A_k)`` for the score (logit) of a
  class.
* :func:`vanilla_gradient` -- Simonyan et al. 2014 as used by Nissinen et al.:
  the gradient of the output with respect to the input pixels.
* :func:`fuse_overlay` -- a jet-coloured heat map blended onto a grey image
  (RGB ``uint8``), with the colormap written out in :func:`jet_colormap` so
  that no plotting library is needed at run time.

Normalisation and ensembling (choices, following the authors' public XAI
notebook, github.com/soribido/BMD_prediction ``XAI/XAI.ipynb``): each model's
map is upsampled bilinearly to the input size and divided by its maximum (so
every model contributes a map in [0, 1]); the ensemble mean is divided by its
maximum again.  Every function returns a ``float32`` numpy array of shape
``(B, H, W)`` with values in [0, 1] (an all-zero map stays zero).  Maps are
computed with the models in ``eval()`` mode (batch-norm running statistics, no
dropout); each model's previous mode is restored afterwards.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from screener.domain import Volume

__all__ = [
    "fuse_overlay",
    "grad_cam",
    "grad_ram",
    "grad_ramp",
    "grad_ramp_fine",
    "jet_colormap",
    "map_onto_slice",
    "vanilla_gradient",
]

Models = Union[nn.Module, Sequence[nn.Module]]
ClassIndex = Union[int, Sequence[int], torch.Tensor, None]


def _as_list(models: Models) -> list[nn.Module]:
    if isinstance(models, nn.Module):
        return [models]
    out = list(models)
    if not out:
        raise ValueError("an explanation needs at least one model (got an empty ensemble)")
    return out


def _target_of(model: nn.Module, target_layer: nn.Module | None) -> nn.Module:
    if target_layer is not None:
        return target_layer
    layer = getattr(model, "target_layer", None)
    if not isinstance(layer, nn.Module):
        raise ValueError(
            f"{type(model).__name__} has no `target_layer`; pass target_layer= the module whose "
            "output is the last convolutional feature map"
        )
    return layer


def _select(out: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Per-sample scalar from a model output: ``out[b, index[b]]``."""
    if out.ndim == 1:
        return out
    out = out.reshape(out.shape[0], -1)
    return out.gather(1, index.view(-1, 1).to(out.device)).squeeze(1)


def _indices(out: torch.Tensor, index: ClassIndex, default_argmax: bool) -> torch.Tensor:
    batch = out.shape[0]
    if index is None:
        if default_argmax and out.ndim == 2 and out.shape[1] > 1:
            return out.detach().argmax(dim=1)
        return torch.zeros(batch, dtype=torch.long)
    t = torch.as_tensor(index, dtype=torch.long).flatten()
    if t.numel() == 1:
        t = t.expand(batch)
    if t.numel() != batch:
        raise ValueError(f"got {t.numel()} class/output indices for a batch of {batch}")
    width = 1 if out.ndim == 1 else int(np.prod(out.shape[1:]))
    if int(t.min()) < 0 or int(t.max()) >= width:
        raise ValueError(f"index {t.tolist()} out of range for a model with {width} outputs")
    return t


def _activation_and_gradient(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    target_layer: nn.Module | None,
    index: ClassIndex,
    default_argmax: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature map ``A`` of the target layer and ``dy/dA`` for the selected output."""
    layer = _target_of(model, target_layer)
    captured: dict[str, torch.Tensor] = {}

    def hook(_module: nn.Module, _inp: tuple, out: torch.Tensor) -> torch.Tensor:
        if not isinstance(out, torch.Tensor):
            raise ValueError("target_layer must return a single tensor")
        leaf = out.detach().requires_grad_(True)
        captured["A"] = leaf
        return leaf

    handle = layer.register_forward_hook(hook)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            out = model(*inputs)
            if "A" not in captured:
                raise ValueError(f"target_layer of {type(model).__name__} was not called in forward()")
            idx = _indices(out, index, default_argmax)
            y = _select(out, idx)
            (grad,) = torch.autograd.grad(y.sum(), captured["A"])
    finally:
        handle.remove()
        model.train(was_training)
    return captured["A"].detach(), grad.detach()


def _normalise(maps: torch.Tensor) -> torch.Tensor:
    """Divide each ``(H, W)`` map of a ``(B, H, W)`` stack by its maximum (zeros stay zero)."""
    peak = maps.flatten(1).max(dim=1).values.clamp_min(0)
    scale = torch.where(peak > 0, peak, torch.ones_like(peak))
    return maps.clamp_min(0) / scale.view(-1, 1, 1)


def _upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def _ensemble_map(
    models: Models,
    inputs: tuple[torch.Tensor, ...],
    combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    target_layer: nn.Module | None,
    index: ClassIndex,
    default_argmax: bool,
) -> np.ndarray:
    if not inputs or inputs[0].ndim != 4:
        raise ValueError("the first input must be an image batch of shape (B, C, H, W)")
    size = (int(inputs[0].shape[-2]), int(inputs[0].shape[-1]))
    total: torch.Tensor | None = None
    model_list = _as_list(models)
    if target_layer is not None and len(model_list) > 1:
        raise ValueError(
            "target_layer= names one module of one model; for an ensemble give each model "
            "a `target_layer` attribute instead"
        )
    for model in model_list:
        a, g = _activation_and_gradient(model, inputs, target_layer, index, default_argmax)
        if a.ndim != 4:
            raise ValueError(f"target_layer output must be (B, K, h, w), got {tuple(a.shape)}")
        m = _normalise(_upsample(combine(a, g).float(), size))
        total = m if total is None else total + m
    assert total is not None
    return _normalise(total / len(model_list)).cpu().numpy().astype(np.float32)


def _ram(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    alpha = g.mean(dim=(2, 3), keepdim=True)  # 1/Z sum_ij dy/dA_k(i,j)
    return (alpha * a).sum(dim=1).abs()


def _ramp(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return (g * a).sum(dim=1).abs()


def _cam(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    alpha = g.mean(dim=(2, 3), keepdim=True)
    return torch.relu((alpha * a).sum(dim=1))


def grad_ram(
    models: Models,
    *inputs: torch.Tensor,
    output_index: int = 0,
    target_layer: nn.Module | None = None,
) -> np.ndarray:
    """Grad-RAM (Kang et al. 2023, eq. 2) averaged over an ensemble.

    Parameters
    ----------
    models : torch.nn.Module or sequence of torch.nn.Module
        One regressor or the fold ensemble; each needs a ``target_layer``
        attribute unless ``target_layer`` is given.
    *inputs : torch.Tensor
        The model inputs; the first is the image batch ``(B, C, H, W)`` whose
        size the map is upsampled to.
    output_index : int
        Which regression output ``y`` to explain (e.g. 0 = BMD, 1 = TBS).
    target_layer : torch.nn.Module, optional
        Overrides ``model.target_layer`` (only sensible for a single model).

    Returns
    -------
    numpy.ndarray
        ``float32`` maps ``(B, H, W)`` in [0, 1].
    """
    return _ensemble_map(models, inputs, _ram, target_layer, output_index, False)


def grad_ramp(
    models: Models,
    *inputs: torch.Tensor,
    output_index: int = 0,
    target_layer: nn.Module | None = None,
) -> np.ndarray:
    """Grad-RAMP (Kang et al. 2023, eq. 3): pixel-wise gradients times activations.

    Parameters and return value as :func:`grad_ram`.
    """
    return _ensemble_map(models, inputs, _ramp, target_layer, output_index, False)


def stage_for_side(model: nn.Module, x: torch.Tensor, min_side: int) -> nn.Module:
    """The deepest stage of ``model.blocks`` (a sequence of stages) whose output is at least
    ``min_side`` pixels on each side for input ``x``; ``model.target_layer`` when the model has no
    ``blocks`` or no stage is that large."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential):
        return _target_of(model, None)
    sides: list[tuple[nn.Module, int]] = []
    hooks = [b.register_forward_hook(lambda mod, _i, out: sides.append((mod, min(out.shape[-2:]))))
             for b in blocks]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    fine = [mod for mod, side in sides if side >= min_side]
    return fine[-1] if fine else _target_of(model, None)


def grad_ramp_fine(models: Models, x: torch.Tensor, *, min_side: int = 8, output_index: int = 0) -> np.ndarray:
    """Grad-RAMP (:func:`grad_ramp`) on a feature map of at least ``min_side`` x ``min_side``: each
    model's deepest stage that large (:func:`stage_for_side`), the maps averaged over the ensemble and
    divided by their maximum.  Issue 19: a 64-pixel input's last convolution is 2 x 2, too coarse to
    say whether the model reads the vertebral body or the muscle beside it.

    Returns
    -------
    numpy.ndarray
        ``float32 (B, H, W)`` in [0, 1].
    """
    maps = [grad_ramp(m, x, output_index=output_index, target_layer=stage_for_side(m, x, min_side))
            for m in _as_list(models)]
    mean = torch.as_tensor(np.mean(maps, axis=0))
    return _normalise(mean).numpy().astype(np.float32)


def grad_cam(
    models: Models,
    *inputs: torch.Tensor,
    class_index: ClassIndex = None,
    target_layer: nn.Module | None = None,
) -> np.ndarray:
    """Grad-CAM (Selvaraju et al. 2017) for a classifier's class score.

    Parameters
    ----------
    models : torch.nn.Module or sequence of torch.nn.Module
        Classifier(s) returning logits ``(B, n_classes)`` (or ``(B, n_tasks)``
        for sigmoid multi-task heads).
    *inputs : torch.Tensor
        Model inputs; the first is the image batch ``(B, C, H, W)``.
    class_index : int, sequence of int or tensor, optional
        Class (or task) whose logit is explained, one for all samples or one per
        sample.  Default: each sample's predicted class for multi-class outputs,
        output 0 for single-output (sigmoid) models.
    target_layer : torch.nn.Module, optional
        Overrides ``model.target_layer``.

    Returns
    -------
    numpy.ndarray
        ``float32`` maps ``(B, H, W)`` in [0, 1].
    """
    return _ensemble_map(models, inputs, _cam, target_layer, class_index, True)


def vanilla_gradient(
    model: nn.Module,
    *inputs: torch.Tensor,
    output_index: ClassIndex = None,
    signed: bool = False,
) -> np.ndarray:
    """Vanilla gradient map (Simonyan et al. 2014; Nissinen et al. 2021, Fig. 6 III).

    Parameters
    ----------
    model : torch.nn.Module
        Any network; its first input is the image batch ``(B, C, H, W)``.
    *inputs : torch.Tensor
        Model inputs.
    output_index : int, sequence of int or tensor, optional
        Output (logit) to differentiate; default the predicted class of a
        multi-class model, output 0 otherwise.
    signed : bool
        ``False`` (default): ``|dy/dx|`` (maximum over channels) divided by its
        maximum.  ``True``: ``0.5 + dy/dx / (2 max|dy/dx|)`` so that 0.5 means no
        effect, 1 the largest positive and 0 the largest negative gradient (the
        paper's white/black rendering).

    Returns
    -------
    numpy.ndarray
        ``float32`` maps ``(B, H, W)`` in [0, 1].
    """
    if not inputs or inputs[0].ndim != 4:
        raise ValueError("the first input must be an image batch of shape (B, C, H, W)")
    image = inputs[0].detach().clone().requires_grad_(True)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            out = model(image, *inputs[1:])
            idx = _indices(out, output_index, True)
            (grad,) = torch.autograd.grad(_select(out, idx).sum(), image)
    finally:
        model.train(was_training)
    grad = grad.detach().float()
    if signed:
        # channel with the largest magnitude keeps its sign
        pick = grad.abs().argmax(dim=1, keepdim=True)
        g = grad.gather(1, pick)[:, 0]
        peak = g.abs().flatten(1).max(dim=1).values
        scale = torch.where(peak > 0, peak, torch.ones_like(peak)).view(-1, 1, 1)
        return (0.5 + g / (2 * scale)).cpu().numpy().astype(np.float32)
    return _normalise(grad.abs().max(dim=1).values).cpu().numpy().astype(np.float32)


def jet_colormap(values: np.ndarray) -> np.ndarray:
    """Jet colormap: [0, 1] -> RGB floats in [0, 1] (dark blue - cyan - yellow - dark red).

    The classic piecewise-linear definition:
    ``r = clip(1.5 - |4v - 3|)``, ``g = clip(1.5 - |4v - 2|)``,
    ``b = clip(1.5 - |4v - 1|)``, each clipped to [0, 1].

    Parameters
    ----------
    values : numpy.ndarray
        Any shape; values are clipped to [0, 1].

    Returns
    -------
    numpy.ndarray
        ``values.shape + (3,)`` float64 RGB.
    """
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    rgb = [np.clip(1.5 - np.abs(4.0 * v - c), 0.0, 1.0) for c in (3.0, 2.0, 1.0)]
    return np.stack(rgb, axis=-1)


def fuse_overlay(
    gray_image: np.ndarray,
    heat_map: np.ndarray,
    *,
    alpha: float = 0.4,
    vmin: float | None = None,
    vmax: float | None = None,
) -> np.ndarray:
    """Blend a jet-coloured heat map onto a grey image.

    Parameters
    ----------
    gray_image : numpy.ndarray
        ``(H, W)`` image, any dtype (e.g. HU or the network input).  Scaled
        linearly from ``[vmin, vmax]`` (default: its minimum and maximum) to
        0-255 and clipped.
    heat_map : numpy.ndarray
        ``(H, W)`` map in [0, 1] (values outside are clipped), e.g. one slice of
        :func:`grad_ramp`'s output.
    alpha : float
        Weight of the colour map: ``out = (1 - alpha) * grey + alpha * jet(heat)``.
    vmin, vmax : float, optional
        Grey window (e.g. ``-160, 240`` for a soft-tissue CT window).

    Returns
    -------
    numpy.ndarray
        ``(H, W, 3)`` RGB ``uint8``.
    """
    gray = np.asarray(gray_image, dtype=np.float64)
    heat = np.asarray(heat_map, dtype=np.float64)
    if gray.ndim != 2:
        raise ValueError(f"gray_image must be a 2-D (H, W) array, got shape {gray.shape}")
    if heat.shape != gray.shape:
        raise ValueError(
            f"heat_map shape {heat.shape} differs from gray_image shape {gray.shape}; "
            "upsample the map to the image size first (the explain functions already do)"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (got {alpha})")
    lo = float(np.nanmin(gray)) if vmin is None else float(vmin)
    hi = float(np.nanmax(gray)) if vmax is None else float(vmax)
    if hi > lo:
        g = np.clip((gray - lo) / (hi - lo), 0.0, 1.0)
    else:
        g = np.zeros_like(gray)
    g = np.nan_to_num(g)
    rgb = (1.0 - alpha) * g[..., None] + alpha * jet_colormap(np.nan_to_num(heat))
    return np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)


def map_onto_slice(values: np.ndarray, origin: Sequence[float], u: Sequence[float], v: Sequence[float],
                   spacing: tuple[float, float], volume: "Volume", k: int) -> np.ndarray:
    """A map made on an oblique or cropped plane, resampled onto slice ``k``'s pixel grid.

    The plane is the one :func:`screener.preprocess.sampling.plane_points` describes: pixel
    ``[j, i]`` of ``values`` has its centre at ``origin + i * spacing[1] * u + j * spacing[0] * v``
    (patient mm; ``u`` and ``v`` orthonormal).  Each pixel centre of slice ``k`` is projected onto
    that plane and the map read there (bilinear); pixels outside the plane's square get 0.

    Parameters
    ----------
    values : numpy.ndarray
        ``(H, W)`` map, e.g. a network input's Grad-RAMP.
    origin, u, v : sequence of float
        The plane's first pixel centre and its column (``u``) and row (``v``) directions.
    spacing : tuple of float
        ``(row, column)`` pixel spacing of the plane (mm).
    volume : screener.domain.Volume
    k : int
        Slice of ``volume`` to resample onto.

    Returns
    -------
    numpy.ndarray
        ``float32 (rows, columns)`` of slice ``k``.
    """
    from scipy import ndimage

    # patient position of every pixel centre of slice k, relative to the plane's origin
    rel = volume.slice_points(k) - np.asarray(origin, dtype=np.float64)
    col = rel @ np.asarray(u, dtype=np.float64) / float(spacing[1])
    row = rel @ np.asarray(v, dtype=np.float64) / float(spacing[0])
    out = ndimage.map_coordinates(np.asarray(values, dtype=np.float32), [row, col], order=1,
                                  mode="constant", cval=0.0, prefilter=False)
    return out.astype(np.float32)
