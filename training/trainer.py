"""Seeded, resumable training loop, torch-side augmentation and the K-fold ensemble.

The data sets are abstract: an :class:`ArrayDataset` holds the preprocessed
input arrays, the targets and the patient of every sample (plus optional extra
inputs such as Ha et al.'s demographics, stratification labels and per-sample
attributes such as the scanner profile).  Protocol-specific builders (virtual
cohort, site manifest) produce them; this module does not know about DICOM.

Reproducibility
---------------
Every random choice of a run comes from three places, all seeded and all saved
in the checkpoint: the global torch RNG at model construction (weights), a
private CPU ``torch.Generator`` for the batch order and the augmentation
parameters, and the global torch (and CUDA) RNG for dropout.  Augmentation
parameters are drawn on the CPU generator whatever the device, so CPU and GPU
runs see the same rotations, shifts and flips.  A checkpoint written at the end
of an epoch therefore resumes to exactly the same weights as a run that never
stopped (tested on CPU).
"""
from __future__ import annotations

import copy
import math
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import structlog
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from screener.devices import resolve_device
from training import losses as L
from training.folds import Fold, SplitPlan
from training.recipes import AugmentationSpec, LossSpec, OptimizerSpec, Recipe, SchedulerSpec

log = structlog.get_logger(__name__)

__all__ = [
    "ArrayDataset",
    "AugParams",
    "FitConfig",
    "FitResult",
    "KFoldResult",
    "LossFn",
    "apply_augmentation",
    "build_loss",
    "fit",
    "predict",
    "sample_augmentation",
    "train_folds",
]

CHECKPOINT_FORMAT = "screener-checkpoint-1"


# --- data -------------------------------------------------------------------------------------

@dataclass
class ArrayDataset:
    """Preprocessed samples of one protocol.

    Attributes
    ----------
    images : numpy.ndarray
        ``(N, C, H, W)`` float32 network inputs (after the protocol's preprocessing).
    targets : numpy.ndarray
        ``(N,)`` or ``(N, K)`` float targets (regression), ``(N,)`` int class
        labels (multiclass) or ``(N,)``/``(N, T)`` {0, 1} labels (binary).
    patient_ids : numpy.ndarray
        ``(N,)`` patient of each sample (splits never separate a patient's samples).
    extras : numpy.ndarray, optional
        ``(N, E)`` float second input (e.g. demographics); the model is then
        called as ``model(images, extras)``.
    strata : numpy.ndarray, optional
        ``(N,)`` label to stratify the splits on.
    attributes : dict of str to numpy.ndarray
        Per-sample attributes (``"profile"``, ``"vertebra"``, ...).
    meta : dict
        Data-set-wide facts for the model card (preprocessing constants, source).
    """

    images: np.ndarray
    targets: np.ndarray
    patient_ids: np.ndarray
    extras: np.ndarray | None = None
    strata: np.ndarray | None = None
    attributes: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.images = np.asarray(self.images, dtype=np.float32)
        self.targets = np.asarray(self.targets)
        self.patient_ids = np.asarray([str(p) for p in self.patient_ids])
        n = len(self.images)
        if self.images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W); got shape {self.images.shape}")
        for name, arr in (("targets", self.targets), ("patient_ids", self.patient_ids),
                          ("extras", self.extras), ("strata", self.strata), *self.attributes.items()):
            if arr is not None and len(arr) != n:
                raise ValueError(f"{name} has {len(arr)} entries for {n} images")
        if self.extras is not None:
            self.extras = np.asarray(self.extras, dtype=np.float32)
            if self.extras.ndim != 2:
                raise ValueError(f"extras must be (N, E); got shape {self.extras.shape}")
        if not np.all(np.isfinite(self.images)):
            raise ValueError("images contain NaN or inf")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: np.ndarray) -> "ArrayDataset":
        """The samples at ``index`` (a copy)."""
        idx = np.asarray(index, dtype=np.int64)
        return ArrayDataset(
            images=self.images[idx],
            targets=self.targets[idx],
            patient_ids=self.patient_ids[idx],
            extras=None if self.extras is None else self.extras[idx],
            strata=None if self.strata is None else self.strata[idx],
            attributes={k: v[idx] for k, v in self.attributes.items()},
            meta=dict(self.meta),
        )

    def save_npz(self, path: str | Path) -> None:
        """Write the arrays to an ``.npz`` file (``screener evaluate BUNDLE --data file.npz``)."""
        arrays: dict[str, np.ndarray] = {"images": self.images, "targets": self.targets,
                                         "patient_ids": self.patient_ids}
        if self.extras is not None:
            arrays["extras"] = self.extras
        if self.strata is not None:
            arrays["strata"] = np.asarray(self.strata)
        for k, v in self.attributes.items():
            arrays[f"attr_{k}"] = np.asarray(v)
        arrays["meta_json"] = np.asarray(json.dumps(self.meta, default=_json_default))
        np.savez_compressed(path, **arrays)

    @classmethod
    def load_npz(cls, path: str | Path) -> "ArrayDataset":
        """Read a data set written by :meth:`save_npz`."""
        with np.load(path, allow_pickle=False) as z:
            missing = {"images", "targets", "patient_ids"} - set(z.files)
            if missing:
                raise ValueError(f"{path}: missing array(s) {sorted(missing)}; write it with ArrayDataset.save_npz")
            return cls(
                images=z["images"], targets=z["targets"], patient_ids=z["patient_ids"],
                extras=z["extras"] if "extras" in z.files else None,
                strata=z["strata"] if "strata" in z.files else None,
                attributes={k[5:]: z[k] for k in z.files if k.startswith("attr_")},
                meta={**(json.loads(str(z["meta_json"])) if "meta_json" in z.files else {}),
                      "source": str(path)},
            )


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


# --- augmentation -----------------------------------------------------------------------------

@dataclass(frozen=True)
class AugParams:
    """Per-sample augmentation parameters (CPU tensors).

    Attributes
    ----------
    angle_deg : torch.Tensor
        ``(B,)`` rotation about the image centre, degrees.
    shift : torch.Tensor
        ``(B, 2)`` translation (x, y) as a fraction of the image side; positive
        moves the content right (x) / down (y).
    hflip, vflip : torch.Tensor
        ``(B,)`` bool.
    scale : torch.Tensor, optional
        ``(B,)`` zoom factor (``> 1`` enlarges the content); ``None``: 1.
    shear_deg : torch.Tensor, optional
        ``(B,)`` horizontal shear angle, degrees; ``None``: 0.
    brightness, contrast : torch.Tensor, optional
        ``(B,)`` intensity factors: ``x * brightness``, then ``mean + (x - mean) * contrast``
        (per image); ``None``: 1.
    """

    angle_deg: torch.Tensor
    shift: torch.Tensor
    hflip: torch.Tensor
    vflip: torch.Tensor
    scale: torch.Tensor | None = None
    shear_deg: torch.Tensor | None = None
    brightness: torch.Tensor | None = None
    contrast: torch.Tensor | None = None


def sample_augmentation(n: int, spec: AugmentationSpec, generator: torch.Generator) -> AugParams:
    """Draw augmentation parameters for ``n`` samples from a CPU generator.

    Rotation is uniform in ``[-rotation_deg, rotation_deg]``, each shift
    component uniform in ``[-shift_frac, shift_frac]``, flips Bernoulli(p), the zoom
    factor uniform in ``1 +- scale_frac``.  The same number of draws is made whatever
    these are, so the generator's stream does not depend on which of them are on.
    Shear (``+- shear_deg``), brightness and contrast (factors ``1 +- value``) take
    three more draws per sample, only when one of them is on.
    """
    u = torch.rand(n, 6, generator=generator, dtype=torch.float64)
    extra: dict[str, torch.Tensor] = {}
    if spec.scale_frac:
        extra["scale"] = (1.0 + (2 * u[:, 5] - 1) * spec.scale_frac).float()
    if spec.shear_deg or spec.brightness or spec.contrast:
        v = 2 * torch.rand(n, 3, generator=generator, dtype=torch.float64) - 1
        extra["shear_deg"] = (v[:, 0] * spec.shear_deg).float()
        extra["brightness"] = (1.0 + v[:, 1] * spec.brightness).float()
        extra["contrast"] = (1.0 + v[:, 2] * spec.contrast).float()
    return AugParams(
        angle_deg=((2 * u[:, 0] - 1) * spec.rotation_deg).float(),
        shift=((2 * u[:, 1:3] - 1) * spec.shift_frac).float(),
        hflip=u[:, 3] < spec.hflip_p,
        vflip=u[:, 4] < spec.vflip_p,
        **extra,
    )


def apply_augmentation(images: torch.Tensor, params: AugParams, padding_mode: str = "zeros", *,
                       square_pixels: bool = False, intensity: bool = True,
                       value_range: tuple[float, float] | None = None) -> torch.Tensor:
    """Flip, shear, rotate, zoom and shift a batch ``(B, C, H, W)`` with bilinear resampling
    (on its device), then scale brightness and contrast.

    Parameters
    ----------
    images : torch.Tensor
        Batch on any device.
    params : AugParams
        From :func:`sample_augmentation` (CPU); moved to the batch's device.
    padding_mode : str
        ``grid_sample`` padding for pixels shifted in from outside (``"zeros"``).
    square_pixels : bool
        Rotate and shear in pixel units, so that a non-square image turns rigidly (the default
        works in normalised coordinates, where a rotation of a non-square image also stretches it).
    intensity : bool
        Apply the brightness / contrast factors (``False`` for a target image that must follow the
        geometry only).
    value_range : tuple of float, optional
        Clip the result to this range.

    Returns
    -------
    torch.Tensor
        Augmented batch, same shape, dtype and device.
    """
    b = images.shape[0]
    if params.angle_deg.shape[0] != b:
        raise ValueError(f"augmentation parameters for {params.angle_deg.shape[0]} samples, batch of {b}")
    dev, dt = images.device, images.dtype

    def per_sample(t: torch.Tensor | None, default: float) -> torch.Tensor:
        return torch.full((b,), default, device=dev) if t is None else t.to(device=dev, dtype=torch.float32)

    a = torch.deg2rad(params.angle_deg.to(device=dev, dtype=torch.float32))
    fx = torch.where(params.hflip.to(dev), -1.0, 1.0)
    fy = torch.where(params.vflip.to(dev), -1.0, 1.0)
    cos, sin = torch.cos(a), torch.sin(a)
    # output pixel p samples the input at M p + t (normalised coordinates, align_corners=False);
    # M = R(angle) Shear F / zoom
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    tan = torch.tan(torch.deg2rad(per_sample(params.shear_deg, 0.0)))
    shear = torch.stack([torch.stack([torch.ones_like(tan), tan], -1),
                         torch.stack([torch.zeros_like(tan), torch.ones_like(tan)], -1)], -2)
    flip = torch.diag_embed(torch.stack([fx, fy], -1))
    m = rot @ shear @ flip / per_sample(params.scale, 1.0)[:, None, None]
    if square_pixels:
        h, w = images.shape[-2:]
        d = torch.tensor([w / 2.0, h / 2.0], device=dev)
        m = m * d[None, None, :] / d[None, :, None]  # D^-1 M D, D = diag(W/2, H/2)
    theta = torch.zeros(b, 2, 3, device=dev, dtype=torch.float32)
    theta[:, :, :2] = m
    theta[:, :, 2] = -2.0 * params.shift.to(device=dev, dtype=torch.float32)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)
    if intensity and (params.brightness is not None or params.contrast is not None):
        out = out * per_sample(params.brightness, 1.0)[:, None, None, None]
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = mean + (out - mean) * per_sample(params.contrast, 1.0)[:, None, None, None]
    if value_range is not None:
        out = out.clamp(float(value_range[0]), float(value_range[1]))
    return out.to(dt)


# --- losses -----------------------------------------------------------------------------------

_LOSS_KWARGS: dict[str, set[str]] = {
    "huber": {"delta"},
    "weighted_huber": {"delta", "bins", "method", "scale"},
    "mse": set(),
    "l1": set(),
    "distance_weighted_l1": set(),
    "cross_entropy": {"class_weights", "label_smoothing"},
    "bce": {"pos_weight"},
}


@dataclass
class LossFn:
    """A loss fitted to a training set: ``loss(pred, target, weight)`` plus the sample weighting.

    Attributes
    ----------
    spec : LossSpec
    weighter : callable or None
        Maps target arrays to per-sample weights (fitted on the training targets).
    card : dict
        What the model card records about the fit (histogram weights, means).
    """

    spec: LossSpec
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
    weighter: Callable[[np.ndarray], np.ndarray] | None = None
    card: dict[str, Any] = field(default_factory=dict)

    def weights(self, targets: np.ndarray) -> np.ndarray | None:
        """Per-sample weights for ``targets`` (None for unweighted losses)."""
        if self.weighter is None:
            return None
        return np.asarray(self.weighter(np.asarray(targets, dtype=np.float64).reshape(len(targets), -1)[:, 0]),
                          dtype=np.float32)

    def __call__(self, pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        return self.fn(pred, target, weight)


def build_loss(spec: LossSpec, train_targets: np.ndarray) -> LossFn:
    """Build the recipe's loss, fitting sample weights on the training targets.

    Parameters
    ----------
    spec : LossSpec
        ``[loss]`` of the recipe.
    train_targets : numpy.ndarray
        Targets of the training samples (Kang's histogram and Gu's mean come from them).

    Returns
    -------
    LossFn

    Raises
    ------
    ValueError
        For an unknown loss or keyword (named).
    """
    if spec.name not in _LOSS_KWARGS:
        raise ValueError(f"[loss] name {spec.name!r} unknown; choose one of {sorted(_LOSS_KWARGS)}")
    unknown = set(spec.kwargs) - _LOSS_KWARGS[spec.name]
    if unknown:
        raise ValueError(f"[loss] kwargs: {sorted(unknown)[0]!r} is not an option of {spec.name} "
                         f"(options: {sorted(_LOSS_KWARGS[spec.name]) or 'none'})")
    kw = dict(spec.kwargs)
    y = np.asarray(train_targets, dtype=np.float64)
    if spec.name == "huber":
        delta = float(kw.get("delta", L.KANG_DELTA))
        return LossFn(spec, lambda p, t, w: L.huber(p, t, delta))
    if spec.name == "weighted_huber":
        delta = float(kw.get("delta", L.KANG_DELTA))
        hw = L.bmd_histogram_weights(y.reshape(len(y), -1)[:, 0], float(kw.get("bins", L.KANG_BIN_WIDTH)),
                                     method=str(kw.get("method", "inverse_fit")),
                                     scale=float(kw.get("scale", 1.0 / 8.0)))

        def _wh(p: torch.Tensor, t: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
            if w is None:
                raise ValueError("weighted_huber needs per-sample weights")
            return L.weighted_huber(p, t, w, delta)

        return LossFn(spec, _wh, weighter=hw, card={"histogram_weights": hw.to_dict()})
    if spec.name == "mse":
        return LossFn(spec, lambda p, t, w: F.mse_loss(p, t.reshape(p.shape).to(p.dtype)))
    if spec.name == "l1":
        return LossFn(spec, lambda p, t, w: F.l1_loss(p, t.reshape(p.shape).to(p.dtype)))
    if spec.name == "distance_weighted_l1":
        col = y.reshape(len(y), -1)[:, 0]
        mean = float(col.mean())
        d = np.abs(col - mean)
        dmin, dmax = float(d.min()), float(d.max())

        def _dw(values: np.ndarray) -> np.ndarray:
            if dmax - dmin <= 1e-12:
                return np.ones_like(values)
            return np.clip(1.5 - (np.abs(values - mean) - dmin) / (dmax - dmin), 0.5, 1.5)

        def _dl1(p: torch.Tensor, t: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
            if w is None:
                raise ValueError("distance_weighted_l1 needs per-sample weights")
            return L.distance_weighted_l1(p, t, w)

        return LossFn(spec, _dl1, weighter=_dw, card={"mean": mean, "d_min": dmin, "d_max": dmax})
    if spec.name == "cross_entropy":
        cw = kw.get("class_weights")
        smoothing = float(kw.get("label_smoothing", 0.0))

        def _ce(p: torch.Tensor, t: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
            weight = None if cw is None else torch.as_tensor(cw, dtype=p.dtype, device=p.device)
            return F.cross_entropy(p, t.reshape(-1).long(), weight=weight, label_smoothing=smoothing)

        return LossFn(spec, _ce)
    pw = kw.get("pos_weight")

    def _bce(p: torch.Tensor, t: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        pos = None if pw is None else torch.as_tensor(pw, dtype=p.dtype, device=p.device)
        return F.binary_cross_entropy_with_logits(p, t.reshape(p.shape).to(p.dtype), pos_weight=pos)

    return LossFn(spec, _bce)


# --- optimisation -----------------------------------------------------------------------------

def _optimizer(model: nn.Module, spec: OptimizerSpec) -> torch.optim.Optimizer:
    groups: Any
    if hasattr(model, "param_groups") and callable(model.param_groups):
        groups = model.param_groups(spec.weight_decay)  # e.g. NissinenCNN: L2 on conv kernels only
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": spec.weight_decay}]
    if spec.name == "adam":
        return torch.optim.Adam(groups, lr=spec.lr)
    if spec.name == "adamw":
        return torch.optim.AdamW(groups, lr=spec.lr)
    if spec.name == "sgd":
        return torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum)
    raise ValueError(f"[optimizer] name {spec.name!r} unknown (adam, adamw, sgd)")


def _scheduler(opt: torch.optim.Optimizer, spec: SchedulerSpec, epochs: int) -> Any:
    if spec.name == "none":
        return None
    if spec.name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=spec.factor, patience=spec.patience)
    if spec.name == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(opt, gamma=spec.gamma)
    if spec.name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    raise ValueError(f"[scheduler] name {spec.name!r} unknown (none, plateau, exponential, cosine)")


@dataclass(frozen=True)
class FitConfig:
    """Everything :func:`fit` needs besides the model and the data (a recipe's training part)."""

    epochs: int
    batch_size: int
    optimizer: OptimizerSpec
    loss: LossSpec
    augmentation: AugmentationSpec = field(default_factory=AugmentationSpec)
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    early_stopping_patience: int = 0
    seed: int = 0
    checkpoint_every: int = 1

    @classmethod
    def from_recipe(cls, recipe: Recipe, seed: int | None = None) -> "FitConfig":
        """The training part of a recipe (``seed`` overrides the recipe's, e.g. per fold)."""
        t = recipe.training
        return cls(epochs=t.epochs, batch_size=t.batch_size, optimizer=recipe.optimizer, loss=recipe.loss,
                   augmentation=recipe.augmentation, scheduler=recipe.scheduler,
                   early_stopping_patience=t.early_stopping_patience,
                   seed=recipe.seed if seed is None else seed, checkpoint_every=t.checkpoint_every)


@dataclass
class FitResult:
    """Outcome of :func:`fit`.

    Attributes
    ----------
    best_epoch : int
        0-based epoch with the lowest validation loss (its weights are loaded).
    best_val_loss : float
    epochs_run : int
        Epochs completed (all calls together).
    stopped_early : bool
    finished : bool
        False when the call stopped because of ``stop_after`` (resume to continue).
    history : list of dict
        Per epoch: ``epoch``, ``train_loss``, ``val_loss``, ``lr``.
    loss_card : dict
        What the loss fitted on the training targets (for the model card).
    """

    best_epoch: int
    best_val_loss: float
    epochs_run: int
    stopped_early: bool
    finished: bool
    history: list[dict[str, float]]
    loss_card: dict[str, Any] = field(default_factory=dict)


def _call(model: nn.Module, x: torch.Tensor, extras: torch.Tensor | None) -> torch.Tensor:
    return model(x) if extras is None else model(x, extras)


def _batches(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    chunks = list(torch.split(order, batch_size))
    # a last batch of one sample breaks batch norm in training mode: fold it into the previous batch
    if len(chunks) > 1 and chunks[-1].numel() == 1:
        chunks[-2] = torch.cat([chunks[-2], chunks[-1]])
        chunks.pop()
    return chunks


def _rng_state(gen: torch.Generator) -> dict[str, Any]:
    state: dict[str, Any] = {"generator": gen.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(gen: torch.Generator, state: Mapping[str, Any]) -> None:
    gen.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _mean_loss(model: nn.Module, loss: LossFn, x: torch.Tensor, y: torch.Tensor, e: torch.Tensor | None,
               w: torch.Tensor | None, batch_size: int, device: torch.device) -> float:
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for idx in torch.split(torch.arange(len(x)), max(batch_size, 1)):
            xb = x[idx].to(device)
            eb = None if e is None else e[idx].to(device)
            out = _call(model, xb, eb)
            wb = None if w is None else w[idx].to(device)
            total += float(loss(out, y[idx].to(device), wb)) * len(idx)
            count += len(idx)
    return total / max(count, 1)


def _fit_tensors(ds: ArrayDataset, loss: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                                      torch.Tensor | None]:
    """Images, targets, extras and the loss's sample weights of ``ds`` as CPU tensors."""
    x = torch.from_numpy(np.ascontiguousarray(ds.images))
    y = torch.from_numpy(np.ascontiguousarray(ds.targets))
    e = None if ds.extras is None else torch.from_numpy(ds.extras)
    w_np = loss.weights(ds.targets)
    w = None if w_np is None else torch.from_numpy(w_np)
    return x, y, e, w


def _resume(ckpt: Path, model: nn.Module, opt: Any, sched: Any, gen: torch.Generator) -> tuple[Any, ...]:
    """Load a :func:`fit` checkpoint into ``model``, ``opt``, ``sched`` and ``gen``.

    Returns ``(start epoch, best_val, best_epoch, wait, best_state, history, stopped_early)``.
    """
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{ckpt} is not a screener training checkpoint; delete it or train without --resume")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    if sched is not None and state.get("scheduler") is not None:
        sched.load_state_dict(state["scheduler"])
    start = int(state["epoch"])
    best_val, best_epoch, wait = float(state["best_val"]), int(state["best_epoch"]), int(state["wait"])
    best_state = state["best_state"]
    history = [dict(h) for h in state["history"]]
    stopped = bool(state["stopped_early"])
    _set_rng_state(gen, state["rng"])
    log.info("training.resume", checkpoint=str(ckpt), epoch=start)
    return start, best_val, best_epoch, wait, best_state, history, stopped


def _train_epoch(model: nn.Module, loss: Any, opt: Any, data: tuple[Any, Any, Any, Any], config: "FitConfig",
                 gen: torch.Generator, dev: torch.device, desc: str, epoch: int) -> float:
    """One pass over the training samples in a shuffled order (augmented as configured); mean loss."""
    x, y, e, w = data
    model.train()
    order = torch.randperm(len(x), generator=gen)
    total, count = 0.0, 0
    for idx in _batches(order, config.batch_size):
        xb = x[idx].to(dev)
        if config.augmentation.enabled:
            xb = apply_augmentation(xb, sample_augmentation(len(idx), config.augmentation, gen))
        eb = None if e is None else e[idx].to(dev)
        wb = None if w is None else w[idx].to(dev)
        opt.zero_grad(set_to_none=True)
        out = _call(model, xb, eb)
        lv = loss(out, y[idx].to(dev), wb)
        if not torch.isfinite(lv):
            raise FloatingPointError(f"{desc}: loss became {float(lv)} at epoch {epoch}; lower [optimizer] lr")
        lv.backward()
        opt.step()
        total += float(lv.detach()) * len(idx)
        count += len(idx)
    return total / max(count, 1)


def fit(
    model: nn.Module,
    train: ArrayDataset,
    val: ArrayDataset | None,
    config: FitConfig,
    *,
    device: str | torch.device = "auto",
    checkpoint: str | Path | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
    desc: str = "train",
) -> FitResult:
    """Train ``model`` with best-validation selection, early stopping and resumable checkpoints.

    Parameters
    ----------
    model : torch.nn.Module
        Freshly built (seeded) network; trained in place.  On return it holds
        the best-validation weights and is in ``eval()`` mode.
    train, val : ArrayDataset
        Training and validation samples (``val`` None: select on training loss).
    config : FitConfig
        Epochs, batch size, optimizer, loss, augmentation, scheduler, patience, seed.
    device : str or torch.device
        ``"auto"`` uses CUDA when available.
    checkpoint : path, optional
        File rewritten at the end of every ``checkpoint_every`` epochs with the
        model, optimizer, scheduler, epoch, best weights, history and RNG states.
    resume : bool
        Continue from ``checkpoint`` when it exists (a finished checkpoint is
        returned as is).
    stop_after : int, optional
        Stop after this many epochs in this call (time-boxed runs; resume later).
    progress : bool
        Show a tqdm bar (stderr).
    desc : str
        Bar label.

    Returns
    -------
    FitResult
    """
    dev = torch.device(resolve_device(device))
    loss = build_loss(config.loss, train.targets)
    x, y, e, w = _fit_tensors(train, loss)
    vx, vy, ve, vw = _fit_tensors(val, loss) if val is not None and len(val) else (x, y, e, w)

    model.to(dev)
    opt = _optimizer(model, config.optimizer)
    sched = _scheduler(opt, config.scheduler, config.epochs)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(config.seed))
    start = 0
    best_val, best_epoch, wait = math.inf, -1, 0
    best_state: dict[str, torch.Tensor] | None = None
    history: list[dict[str, float]] = []
    stopped = False
    ckpt = Path(checkpoint) if checkpoint is not None else None

    if resume and ckpt is not None and ckpt.is_file():
        start, best_val, best_epoch, wait, best_state, history, stopped = _resume(ckpt, model, opt, sched, gen)

    def _save(next_epoch: int) -> None:
        if ckpt is None:
            return
        _atomic_save({
            "format": CHECKPOINT_FORMAT,
            "model": _cpu_state(model),
            "optimizer": opt.state_dict(),
            "scheduler": None if sched is None else sched.state_dict(),
            "epoch": next_epoch,
            "best_val": best_val,
            "best_epoch": best_epoch,
            "wait": wait,
            "best_state": best_state,
            "history": history,
            "stopped_early": stopped,
            "rng": _rng_state(gen),
        }, ckpt)

    done_now = 0
    bar = tqdm(total=config.epochs, initial=start, desc=desc, disable=not progress, leave=False, unit="epoch")
    try:
        epoch = start
        while epoch < config.epochs and not stopped:
            if stop_after is not None and done_now >= stop_after:
                break
            train_loss = _train_epoch(model, loss, opt, (x, y, e, w), config, gen, dev, desc, epoch)
            val_loss = _mean_loss(model, loss, vx, vy, ve, vw, config.batch_size, dev)
            if sched is not None:
                sched.step(val_loss) if config.scheduler.name == "plateau" else sched.step()
            history.append({"epoch": float(epoch), "train_loss": train_loss, "val_loss": val_loss,
                            "lr": float(opt.param_groups[0]["lr"])})
            if val_loss < best_val:
                best_val, best_epoch, wait = val_loss, epoch, 0
                best_state = _cpu_state(model)
            else:
                wait += 1
            if config.early_stopping_patience and wait >= config.early_stopping_patience:
                stopped = True
            epoch += 1
            done_now += 1
            finished_now = epoch >= config.epochs or stopped
            if finished_now or epoch % config.checkpoint_every == 0 or (stop_after is not None and done_now >= stop_after):
                _save(epoch)
            bar.update(1)
            bar.set_postfix(train=f"{train_loss:.4g}", val=f"{val_loss:.4g}", best=best_epoch)
    finally:
        bar.close()
    finished = len(history) >= config.epochs or stopped
    if finished and best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    if finished:
        log.info("training.fit_done", desc=desc, best_epoch=best_epoch, best_val_loss=best_val,
                 epochs=len(history), stopped_early=stopped)
    return FitResult(best_epoch=best_epoch, best_val_loss=best_val, epochs_run=len(history),
                     stopped_early=stopped, finished=finished, history=history, loss_card=loss.card)


# --- prediction and the K-fold ensemble -------------------------------------------------------

def predict(
    models: nn.Module | Sequence[nn.Module],
    images: np.ndarray | ArrayDataset,
    *,
    extras: np.ndarray | None = None,
    task: str = "regression",
    device: str | torch.device = "auto",
    batch_size: int = 32,
) -> np.ndarray:
    """Ensemble prediction: the mean over models of the outputs (regression) or probabilities.

    Parameters
    ----------
    models : module or sequence of modules
        The fold ensemble (put in ``eval()`` mode here).
    images : numpy.ndarray or ArrayDataset
        ``(N, C, H, W)`` inputs (an ArrayDataset also supplies ``extras``).
    extras : numpy.ndarray, optional
        ``(N, E)`` second input.
    task : {"regression", "multiclass", "binary"}
        Averages raw outputs, softmax probabilities or sigmoid probabilities.
    device : str or torch.device
    batch_size : int

    Returns
    -------
    numpy.ndarray
        ``(N, K)`` float64.
    """
    if isinstance(images, ArrayDataset):
        extras = images.extras if extras is None else extras
        images = images.images
    ms = [models] if isinstance(models, nn.Module) else list(models)
    if not ms:
        raise ValueError("predict needs at least one model")
    if task not in ("regression", "multiclass", "binary"):
        raise ValueError(f"task must be regression, multiclass or binary (got {task!r})")
    dev = torch.device(resolve_device(device))
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    e = None if extras is None else torch.from_numpy(np.asarray(extras, dtype=np.float32))
    acc: torch.Tensor | None = None
    with torch.no_grad():
        for m in ms:
            m.eval().to(dev)
            outs = []
            for idx in torch.split(torch.arange(len(x)), batch_size):
                out = _call(m, x[idx].to(dev), None if e is None else e[idx].to(dev)).double()
                if task == "multiclass":
                    out = torch.softmax(out, dim=1)
                elif task == "binary":
                    out = torch.sigmoid(out)
                outs.append(out.reshape(len(idx), -1).cpu())
            o = torch.cat(outs)
            acc = o if acc is None else acc + o
    assert acc is not None
    return (acc / len(ms)).numpy()


@dataclass
class KFoldResult:
    """The trained folds of a recipe.

    Attributes
    ----------
    folds : list of Fold
    models : list of torch.nn.Module
        One per fold, best-validation weights, eval mode.
    results : list of FitResult
    val_predictions : dict of str to numpy.ndarray
        Out-of-fold predictions per fold name (same order as ``fold.val``).
    """

    folds: list[Fold]
    models: list[nn.Module]
    results: list[FitResult]
    val_predictions: dict[str, np.ndarray]

    @property
    def ensemble(self) -> list[nn.Module]:
        """The models of repeat 0: the fold ensemble that goes into the bundle."""
        return [m for f, m in zip(self.folds, self.models) if f.repeat == 0]

    def summary(self) -> list[dict[str, Any]]:
        """Per fold: name, best epoch, best validation loss, epochs run."""
        return [{"fold": f.name, "best_epoch": r.best_epoch, "best_val_loss": r.best_val_loss,
                 "epochs": r.epochs_run, "stopped_early": r.stopped_early}
                for f, r in zip(self.folds, self.results)]


def fold_seed(seed: int, fold: Fold) -> int:
    """Seed of one fold's run (weights, batch order, augmentation, dropout)."""
    return int(seed) * 10_007 + fold.repeat * 101 + fold.index


def train_folds(
    recipe: Recipe,
    dataset: ArrayDataset,
    plan: SplitPlan,
    build_model: Callable[[], nn.Module],
    *,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    device: str | torch.device = "auto",
    progress: bool = True,
    stop_after: int | None = None,
) -> KFoldResult:
    """Train one model per fold of ``plan`` (the K-fold loop producing the fold ensemble).

    Parameters
    ----------
    recipe : Recipe
    dataset : ArrayDataset
        All samples; ``plan`` indexes into it.
    plan : SplitPlan
    build_model : callable
        Returns a new network; called after seeding the global RNG with the
        fold's seed, so initial weights are reproducible.
    checkpoint_dir : path, optional
        ``<dir>/<fold name>.pt`` checkpoints.
    resume : bool
        Continue each fold from its checkpoint (finished folds are not retrained).
    device, progress
        As :func:`fit`.
    stop_after : int, optional
        Epoch budget per fold for this call (see :func:`fit`).

    Returns
    -------
    KFoldResult
    """
    dev = torch.device(resolve_device(device))
    models, results, preds = [], [], {}
    for fold in plan.folds:
        seed = fold_seed(recipe.seed, fold)
        torch.manual_seed(seed)
        model = build_model()
        ck = None if checkpoint_dir is None else Path(checkpoint_dir) / f"{fold.name}.pt"
        res = fit(model, dataset.subset(fold.train), dataset.subset(fold.val),
                  FitConfig.from_recipe(recipe, seed=seed), device=dev, checkpoint=ck, resume=resume,
                  stop_after=stop_after, progress=progress, desc=f"{recipe.protocol} {fold.name}")
        models.append(model)
        results.append(res)
        preds[fold.name] = predict(model, dataset.subset(fold.val), task=recipe.task, device=dev,
                                   batch_size=recipe.training.batch_size)
    return KFoldResult(folds=list(plan.folds), models=models, results=results, val_predictions=preds)


def clone_model(model: nn.Module) -> nn.Module:
    """Deep copy of a model on the CPU (for ensembles built from one trained object)."""
    return copy.deepcopy(model).cpu()
