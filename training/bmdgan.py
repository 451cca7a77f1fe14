"""BMD-GAN training pieces (Gu et al. 2023, seed ``004``): decomposition losses, the single
training steps, the hierarchical schedule, the PF-DRR -> BMD conversion and stage-3 regression.

The networks are in :mod:`screener.nets.bmdgan`; data come as tensors ``x`` (hip radiograph halves,
``(B, 1, H, W)``, from :func:`screener.radiograph.split_hips`) and ``y`` (the paired DRR halves on
the same grid, divided by a fixed ``drr_scale``).

Decomposition objective (section 3.2, equations 1-8)
----------------------------------------------------
Generator::

    L_G = sum_k L_GAN(G, D_k) + lambda_L1 L_L1 + lambda_GC L_GC + lambda_FM sum_k L_FM(G, D_k)

with the paper's ``lambda_L1 = 100`` on the L1 term (eq. 4), ``lambda_GC = 1`` on the gradient
correlation term (eqs. 5-6) and ``lambda_FM = 10`` on feature matching (eqs. 2-3) (section 4.2.7:
"We set lambda_L1, lambda_GC, and lambda_FM to 100, 1, and 10"); the adversarial term has weight 1
(eq. 8).

* **Adversarial** -- equation (1) is written in the log-likelihood form inherited from pix2pix,
  but the paper "followed most settings used in Pix2PixHD", whose training uses the least-squares
  GAN objective (its default; ``--no_lsgan`` switches to the log form).  ``gan_mode="lsgan"``
  (default): D minimises ``(D(x, y) - 1)^2 + D(x, G(x))^2``, G minimises ``(D(x, G(x)) - 1)^2``,
  mean over the patch map.  ``gan_mode="vanilla"``: the binary cross-entropy of eq. (1) (G uses the
  non-saturating ``-log D(x, G(x))``).  Summed over the ``k`` scales; the discriminator loss is
  halved as pix2pixHD's ``0.5 (L_fake + L_real)``.
* **Feature matching** -- eq. (2)-(3): ``sum_i 1/N_i || D^(i)(x, y) - D^(i)(x, G(x)) ||_1`` over
  the intermediate layers of each discriminator (the final patch map excluded, as pix2pixHD), the
  real features detached; summed over scales as eq. (7) writes it (pix2pixHD's extra factors
  ``4 / (n_layers + 1)`` and ``1 / num_D`` are not in the paper's equations and not applied).
* **L1** -- eq. (4), mean absolute difference per pixel.
* **Gradient correlation** -- :func:`training.losses.gradient_correlation_loss`, ``1 - GC``
  (GC is a similarity in [-1, 1]; the loss is 0 for identical structure).

Hierarchical learning (HL)
--------------------------
Stage 1 decomposes the radiograph into the pelvis + femur bone DRR (``truth["bone_drr"]`` of
:func:`training.phantoms.xray.render_hip_xray`); stage 2 starts from the stage-1 generator and
learns the proximal-femur DRR (``truth["pf_drr"][side]``) -- :func:`start_stage2`.  "Both stage one
and stage two training use the same loss functions."  Optimiser: AdamW, initial learning rate
6e-5, weight decay 1e-2, SGDR (cosine annealing with warm restarts); 630 epochs in stage 1, 630 in
stage 2 (150 for decomposition only) -- :data:`PAPER_SCHEDULE`.

BMD from the PF-DRR
-------------------
"pixels whose intensities were equal to or greater than the threshold t were averaged ... The
PF-DRR-average of all training datasets was linearly fitted to DXA-BMD and QCT-BMD" --
:func:`pfdrr_bmd_features`, :func:`fit_linear_bmd`, :func:`apply_linear_bmd`; the threshold is
chosen to maximise the PCC on the training set (Fig. 4) -- :func:`tune_threshold`.

Stage 3 (section 3.3)
---------------------
``R = {M_E, M_R}`` (:class:`screener.nets.bmdgan.BMDRegressor`) regresses BMD with the
distance-weighted L1 of eqs. (9)-(11) (:func:`training.losses.distance_weighted_l1` with
:func:`training.losses.distance_weights` of the *training set*); the encoder is frozen for the
first 310 epochs, then ``R`` is tuned end to end for 70 epochs at learning rate 8e-6
(:func:`stage3_optimizer`).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import structlog
import torch
import torch.nn.functional as F
from torch import nn

from training import losses as L

log = structlog.get_logger(__name__)

__all__ = [
    "LAMBDA_FM",
    "LAMBDA_GC",
    "LAMBDA_L1",
    "PAPER_SCHEDULE",
    "STAGE_TARGETS",
    "DecompositionLosses",
    "LossWeights",
    "ThresholdTuning",
    "apply_linear_bmd",
    "decomposition_step",
    "discriminator_loss",
    "feature_matching_loss",
    "fit_linear_bmd",
    "gan_loss",
    "generator_losses",
    "make_optimizers",
    "make_scheduler",
    "pfdrr_bmd_features",
    "regression_step",
    "run_decomposition_stage",
    "stage3_optimizer",
    "start_stage2",
    "tune_threshold",
]

#: Section 4.2.7 of the paper.
LAMBDA_L1 = 100.0
LAMBDA_GC = 1.0
LAMBDA_FM = 10.0
PAPER_LR = 6e-5
PAPER_WEIGHT_DECAY = 1e-2
PAPER_TUNE_LR = 8e-6
#: Epochs per stage (section 4.2.7).
PAPER_SCHEDULE = {
    "stage1": 630,
    "stage2": 630,
    "stage2_decomposition_only": 150,
    "stage3_frozen_encoder": 310,
    "stage3_end_to_end": 70,
}
#: What each decomposition stage learns (keys of ``render_hip_xray``'s truth).
STAGE_TARGETS = {1: "bone_drr", 2: "pf_drr"}
GAN_MODES = ("lsgan", "vanilla")


@dataclass(frozen=True)
class LossWeights:
    """Weights of the generator's loss terms (paper: L1 100, GC 1, FM 10, adversarial 1)."""

    l1: float = LAMBDA_L1
    gc: float = LAMBDA_GC
    fm: float = LAMBDA_FM
    gan: float = 1.0


@dataclass
class DecompositionLosses:
    """The generator's loss terms (unweighted) and their weighted total, as tensors.

    ``total = weights.gan * gan + weights.l1 * l1 + weights.gc * gc + weights.fm * fm``.
    """

    gan: torch.Tensor
    fm: torch.Tensor
    l1: torch.Tensor
    gc: torch.Tensor
    total: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        """Plain numbers for logs and histories."""
        return {k: float(getattr(self, k).detach()) for k in ("gan", "fm", "l1", "gc", "total")}


def _check_mode(gan_mode: str) -> None:
    if gan_mode not in GAN_MODES:
        raise ValueError(f"gan_mode must be one of {GAN_MODES} (got {gan_mode!r})")


def gan_loss(outputs: Sequence[Sequence[torch.Tensor]], target_is_real: bool, gan_mode: str = "lsgan") -> torch.Tensor:
    """Adversarial loss summed over the discriminator scales (last layer of each = patch scores).

    Parameters
    ----------
    outputs : list of list of torch.Tensor
        :class:`~screener.nets.bmdgan.MultiscaleDiscriminator` output.
    target_is_real : bool
        Label the patches real (1) or fake (0).
    gan_mode : {"lsgan", "vanilla"}
        Least squares (pix2pixHD's default) or binary cross-entropy (eq. 1).

    Returns
    -------
    torch.Tensor
        Scalar: ``sum_k mean(loss(D_k patches, label))``.
    """
    _check_mode(gan_mode)
    total = outputs[0][-1].new_zeros(())
    for scale in outputs:
        pred = scale[-1]
        target = torch.full_like(pred, 1.0 if target_is_real else 0.0)
        if gan_mode == "lsgan":
            total = total + F.mse_loss(pred, target)
        else:
            total = total + F.binary_cross_entropy_with_logits(pred, target)
    return total


def feature_matching_loss(real: Sequence[Sequence[torch.Tensor]], fake: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """Feature-matching loss, eqs. (2)-(3) summed over scales (eq. 7).

    ``sum_k sum_i mean |D_k^(i)(x, y) - D_k^(i)(x, G(x))|`` over the intermediate layers ``i``
    (every layer but the final patch-score map); the real features are detached.

    Returns
    -------
    torch.Tensor
        Scalar.
    """
    if len(real) != len(fake):
        raise ValueError(f"{len(real)} real scales vs {len(fake)} fake scales")
    total = fake[0][-1].new_zeros(())
    for r_scale, f_scale in zip(real, fake):
        for r, f in zip(r_scale[:-1], f_scale[:-1]):
            total = total + F.l1_loss(f, r.detach())
    return total


def generator_losses(generator: nn.Module, discriminator: nn.Module, x: torch.Tensor, y: torch.Tensor,
                     weights: LossWeights = LossWeights(), gan_mode: str = "lsgan",
                     fake: torch.Tensor | None = None) -> tuple[DecompositionLosses, torch.Tensor]:
    """The generator's decomposition loss ``L_G`` (eqs. 7-8) and the generated DRR.

    Parameters
    ----------
    generator, discriminator : torch.nn.Module
        ``G`` and the multi-scale ``D``.
    x, y : torch.Tensor
        Radiographs and ground-truth DRRs, ``(B, 1, H, W)``.
    weights : LossWeights
        Term weights (paper defaults).
    gan_mode : {"lsgan", "vanilla"}
        See :func:`gan_loss`.
    fake : torch.Tensor, optional
        ``G(x)`` if already computed.

    Returns
    -------
    (DecompositionLosses, torch.Tensor)
        Terms with the graph attached, and ``G(x)``.
    """
    if fake is None:
        fake = generator(x)
    y = y.to(fake.dtype)
    if fake.shape != y.shape:
        raise ValueError(f"generator output {tuple(fake.shape)} does not match target DRR {tuple(y.shape)}")
    d_fake = discriminator(x, fake)
    with torch.no_grad():
        d_real = discriminator(x, y)
    gan = gan_loss(d_fake, True, gan_mode)
    fm = feature_matching_loss(d_real, d_fake)
    l1 = F.l1_loss(fake, y)
    gc = L.gradient_correlation_loss(y, fake)
    total = weights.gan * gan + weights.l1 * l1 + weights.gc * gc + weights.fm * fm
    return DecompositionLosses(gan=gan, fm=fm, l1=l1, gc=gc, total=total), fake


def discriminator_loss(discriminator: nn.Module, x: torch.Tensor, y: torch.Tensor, fake: torch.Tensor,
                       gan_mode: str = "lsgan") -> tuple[torch.Tensor, dict[str, float]]:
    """pix2pixHD's discriminator loss ``0.5 (L_GAN(real) + L_GAN(fake))`` (fake detached).

    Returns
    -------
    (torch.Tensor, dict)
        The loss and ``{"d_real": ..., "d_fake": ...}``.
    """
    real = gan_loss(discriminator(x, y.to(x.dtype)), True, gan_mode)
    fake_l = gan_loss(discriminator(x, fake.detach()), False, gan_mode)
    return 0.5 * (real + fake_l), {"d_real": float(real.detach()), "d_fake": float(fake_l.detach())}


def decomposition_step(generator: nn.Module, discriminator: nn.Module, opt_g: torch.optim.Optimizer,
                       opt_d: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, *,
                       weights: LossWeights = LossWeights(), gan_mode: str = "lsgan") -> dict[str, float]:
    """One GAN training step (pix2pixHD order: generator update, then discriminator update).

    Returns
    -------
    dict
        ``gan``, ``fm``, ``l1``, ``gc``, ``total`` (generator, before its update), ``d_loss``,
        ``d_real``, ``d_fake``.
    """
    generator.train()
    discriminator.train()
    for p in discriminator.parameters():
        p.requires_grad_(False)
    opt_g.zero_grad(set_to_none=True)
    terms, fake = generator_losses(generator, discriminator, x, y, weights, gan_mode)
    terms.total.backward()
    opt_g.step()
    for p in discriminator.parameters():
        p.requires_grad_(True)
    opt_d.zero_grad(set_to_none=True)
    d_loss, parts = discriminator_loss(discriminator, x, y, fake, gan_mode)
    d_loss.backward()
    opt_d.step()
    out = terms.as_floats()
    out.update(d_loss=float(d_loss.detach()), **parts)
    return out


def make_optimizers(generator: nn.Module, discriminator: nn.Module, *, lr: float = PAPER_LR,
                    weight_decay: float = PAPER_WEIGHT_DECAY, betas: tuple[float, float] = (0.5, 0.999)
                    ) -> tuple[torch.optim.AdamW, torch.optim.AdamW]:
    """AdamW for ``G`` and ``D`` (paper: lr 6e-5, weight decay 1e-2; betas (0.5, 0.999) as
    pix2pixHD -- the paper does not give them)."""
    return (torch.optim.AdamW(generator.parameters(), lr=lr, weight_decay=weight_decay, betas=betas),
            torch.optim.AdamW(discriminator.parameters(), lr=lr, weight_decay=weight_decay, betas=betas))


def make_scheduler(optimizer: torch.optim.Optimizer, first_cycle_epochs: int = 10, cycle_mult: int = 2
                   ) -> torch.optim.lr_scheduler.CosineAnnealingWarmRestarts:
    """SGDR (Loshchilov & Hutter 2017), stepped once per epoch.  The paper does not give the cycle
    lengths; 10 epochs doubling (10, 20, 40, 80, 160, 320: 630 epochs end at a cycle's end) is a
    choice."""
    return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=first_cycle_epochs, T_mult=cycle_mult)


def _reset_parameters(module: nn.Module) -> None:
    for m in module.modules():
        if m is not module and hasattr(m, "reset_parameters"):
            m.reset_parameters()  # type: ignore[operator]


def start_stage2(stage1_generator: nn.Module, stage1_discriminator: nn.Module, *,
                 keep_discriminator: bool = False) -> tuple[nn.Module, nn.Module]:
    """Hierarchical learning: the stage-2 (PF-DRR) models, initialised from stage 1.

    The generator is a copy of the stage-1 generator (the paper: "the target is transferred to the
    proximal femur region").  The discriminator judges a new target distribution, so by default it
    is a freshly initialised copy of the stage-1 architecture (``keep_discriminator=True`` copies
    its weights too; the paper does not say).

    Returns
    -------
    (generator, discriminator)
        New modules; the stage-1 ones are untouched.
    """
    g2 = copy.deepcopy(stage1_generator)
    d2 = copy.deepcopy(stage1_discriminator)
    if not keep_discriminator:
        _reset_parameters(d2)
    return g2, d2


def run_decomposition_stage(generator: nn.Module, discriminator: nn.Module,
                            batches: Any, epochs: int, *, lr: float = PAPER_LR,
                            weight_decay: float = PAPER_WEIGHT_DECAY, weights: LossWeights = LossWeights(),
                            gan_mode: str = "lsgan", device: str | torch.device = "cpu",
                            first_cycle_epochs: int = 10, channels_last: bool = False,
                            ema: nn.Module | None = None, ema_decay: float = 0.999) -> list[dict[str, float]]:
    """Train one decomposition stage: ``epochs`` passes over ``batches`` with AdamW + SGDR.

    Parameters
    ----------
    batches : iterable of (x, y), re-iterable (e.g. a ``DataLoader`` or a list)
        Radiograph halves and target DRRs (stage 1: bone DRR; stage 2: PF-DRR).
    epochs : int
        Passes (paper: :data:`PAPER_SCHEDULE`).
    channels_last : bool
        Run the networks and batches in ``torch.channels_last`` memory format (the same arithmetic;
        about a fifth faster per step on a CPU's oneDNN convolutions); the networks are returned to
        the default format afterwards.
    ema : torch.nn.Module, optional
        A copy of ``generator`` that is kept as the exponential moving average of its weights
        (:func:`update_ema` after every step, ``ema_decay``); the caller decides which to keep.
    ema_decay : float
        Per-step decay of the average.

    Returns
    -------
    list of dict
        Mean of every step's terms per epoch.
    """
    dev = torch.device(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    generator.to(dev, memory_format=fmt)
    discriminator.to(dev, memory_format=fmt)
    opt_g, opt_d = make_optimizers(generator, discriminator, lr=lr, weight_decay=weight_decay)
    sch_g, sch_d = make_scheduler(opt_g, first_cycle_epochs), make_scheduler(opt_d, first_cycle_epochs)
    history: list[dict[str, float]] = []
    steps = 0
    if ema is not None:
        ema.to(dev)
    for epoch in range(int(epochs)):
        sums: dict[str, float] = {}
        n = 0
        for x, y in batches:
            step = decomposition_step(generator, discriminator, opt_g, opt_d, x.to(dev, memory_format=fmt),
                                      y.to(dev, memory_format=fmt), weights=weights, gan_mode=gan_mode)
            if ema is not None:
                update_ema(ema, generator, ema_decay, steps)
            steps += 1
            for k, v in step.items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
        sch_g.step()
        sch_d.step()
        if n == 0:
            raise ValueError("run_decomposition_stage got no batches")
        row = {k: v / n for k, v in sums.items()}
        row["epoch"] = float(epoch)
        history.append(row)
        log.info("bmdgan.epoch", epoch=epoch, l1=round(row["l1"], 6), total=round(row["total"], 5))
    generator.to(memory_format=torch.contiguous_format)
    discriminator.to(memory_format=torch.contiguous_format)
    return history


def update_ema(average: nn.Module, model: nn.Module, decay: float, step: int | None = None) -> None:
    """Move ``average``'s weights toward ``model``'s: ``a <- d a + (1 - d) p`` (buffers are copied).

    Parameters
    ----------
    average, model : torch.nn.Module
        Same architecture; ``average`` starts as a copy of ``model``.
    decay : float
        ``d`` in [0, 1).
    step : int, optional
        Steps taken so far; when given the decay warms up as ``min(d, (1 + step) / (10 + step))`` so the
        first steps do not drag the random start along.
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
    d = decay if step is None else min(decay, (1.0 + step) / (10.0 + step))
    with torch.no_grad():
        for a, p in zip(average.parameters(), model.parameters(), strict=True):
            a.lerp_(p.detach(), 1.0 - d)
        for a, b in zip(average.buffers(), model.buffers(), strict=True):
            a.copy_(b)


# ---------------------------------------------------------------------------------------------
# PF-DRR -> BMD
# ---------------------------------------------------------------------------------------------
def _as_numpy(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().double().numpy()
    return np.asarray(a, dtype=np.float64)


def pfdrr_bmd_features(pfdrr: Any, threshold_t: float) -> np.ndarray:
    """Mean PF-DRR intensity over the pixels ``>= threshold_t`` ("PF-DRR-average"), per image.

    Parameters
    ----------
    pfdrr : array-like or torch.Tensor
        One ``(H, W)`` PF-DRR or a batch ``(N, H, W)`` / ``(N, 1, H, W)``.
    threshold_t : float
        The binarisation threshold ``t`` (same units as ``pfdrr``).

    Returns
    -------
    numpy.ndarray
        ``float64``: a 0-d array for one image, ``(N,)`` for a batch; ``nan`` for an image with no
        pixel ``>= t`` (a failed decomposition: the caller declines rather than report a BMD).
    """
    if isinstance(pfdrr, torch.Tensor):
        a = pfdrr.detach().cpu().numpy()
    else:
        a = np.asarray(pfdrr)
    if not np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
    single = a.ndim == 2
    if a.ndim == 4:
        if a.shape[1] != 1:
            raise ValueError(f"expected one channel, got shape {a.shape}")
        a = a[:, 0]
    elif single:
        a = a[None]
    elif a.ndim != 3:
        raise ValueError(f"pfdrr must be (H, W), (N, H, W) or (N, 1, H, W); got shape {a.shape}")
    # compare in the image's own precision (a float32 0.9 is below the float64 0.9)
    mask = a >= a.dtype.type(threshold_t)
    count = mask.sum(axis=(1, 2))
    total = np.where(mask, a.astype(np.float64), 0.0).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        feats = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return feats[0] if single else feats


def fit_linear_bmd(x: Any, bmd: Any) -> tuple[float, float]:
    """Least-squares line ``bmd = slope * x + intercept`` over the training set.

    Parameters
    ----------
    x : array-like
        PF-DRR averages (:func:`pfdrr_bmd_features`) of the training images.
    bmd : array-like
        Their reference BMD (DXA, g/cm^2, or QCT, mg/cm^3).

    Returns
    -------
    (slope, intercept) : tuple of float

    Raises
    ------
    ValueError
        Fewer than 2 samples, non-finite values, or constant ``x``.
    """
    xa, ya = _as_numpy(x).ravel(), _as_numpy(bmd).ravel()
    if xa.size != ya.size:
        raise ValueError(f"{xa.size} PF-DRR averages for {ya.size} BMD values")
    if xa.size < 2:
        raise ValueError("fit_linear_bmd needs at least 2 samples")
    if not (np.all(np.isfinite(xa)) and np.all(np.isfinite(ya))):
        raise ValueError("PF-DRR averages or BMD contain NaN/inf (an empty PF-DRR above the threshold?); "
                         "drop those samples or lower the threshold")
    xm, ym = xa.mean(), ya.mean()
    sxx = float(((xa - xm) ** 2).sum())
    if sxx <= 1e-300:
        raise ValueError("all PF-DRR averages are equal; the line is undefined")
    slope = float(((xa - xm) * (ya - ym)).sum() / sxx)
    return slope, float(ym - slope * xm)


def apply_linear_bmd(x: Any, slope: float, intercept: float) -> np.ndarray:
    """BMD from PF-DRR averages with the training-set line (``nan`` stays ``nan``)."""
    return slope * _as_numpy(x) + intercept


@dataclass(frozen=True)
class ThresholdTuning:
    """Result of :func:`tune_threshold`: chosen ``t``, the PCC per candidate, and the line at ``t``."""

    threshold: float
    thresholds: np.ndarray
    pcc: np.ndarray
    slope: float
    intercept: float


def tune_threshold(pfdrrs: Any, bmd: Any, thresholds: Sequence[float]) -> ThresholdTuning:
    """Choose ``t`` that maximises the PCC between BMD and the PF-DRR average (paper Fig. 4).

    Use ground-truth or predicted training PF-DRRs; never the test set.

    Parameters
    ----------
    pfdrrs : array-like
        ``(N, H, W)`` PF-DRRs.
    bmd : array-like
        ``(N,)`` reference BMD.
    thresholds : sequence of float
        Candidates for ``t``.

    Returns
    -------
    ThresholdTuning
    """
    ya = _as_numpy(bmd).ravel()
    ts = np.asarray(list(thresholds), dtype=np.float64)
    if ts.size == 0:
        raise ValueError("tune_threshold needs at least one candidate threshold")
    pcc = np.full(ts.shape, np.nan)
    for i, t in enumerate(ts):
        f = pfdrr_bmd_features(pfdrrs, t)
        if np.all(np.isfinite(f)) and f.std() > 0 and ya.std() > 0:
            pcc[i] = float(np.corrcoef(f, ya)[0, 1])
    if not np.any(np.isfinite(pcc)):
        raise ValueError("no candidate threshold leaves every PF-DRR with pixels above it")
    best = int(np.nanargmax(pcc))
    slope, intercept = fit_linear_bmd(pfdrr_bmd_features(pfdrrs, ts[best]), ya)
    return ThresholdTuning(float(ts[best]), ts, pcc, slope, intercept)


# ---------------------------------------------------------------------------------------------
# stage 3
# ---------------------------------------------------------------------------------------------
def stage3_optimizer(regressor: nn.Module, phase: str, *, lr: float | None = None,
                     weight_decay: float = PAPER_WEIGHT_DECAY) -> torch.optim.AdamW:
    """AdamW for a stage-3 phase, freezing or releasing the encoder.

    Parameters
    ----------
    regressor : BMDRegressor
        Needs ``freeze_encoder(bool)``.
    phase : {"frozen_encoder", "end_to_end"}
        ``"frozen_encoder"``: encoder fixed, head trained at 6e-5 (310 epochs in the paper);
        ``"end_to_end"``: everything at 8e-6 (70 epochs).
    lr : float, optional
        Override the phase's learning rate.

    Returns
    -------
    torch.optim.AdamW
    """
    if phase == "frozen_encoder":
        regressor.freeze_encoder(True)  # type: ignore[operator]
        rate = PAPER_LR
    elif phase == "end_to_end":
        regressor.freeze_encoder(False)  # type: ignore[operator]
        rate = PAPER_TUNE_LR
    else:
        raise ValueError(f"phase must be 'frozen_encoder' or 'end_to_end' (got {phase!r})")
    params = [p for p in regressor.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=rate if lr is None else float(lr), weight_decay=weight_decay)


def regression_step(regressor: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                    bmd: torch.Tensor, sample_weights: torch.Tensor) -> float:
    """One stage-3 step on the distance-weighted L1 of eq. (11): ``mean(w |y - R(x)|)``.

    ``sample_weights`` come from :func:`training.losses.distance_weights` computed over the whole
    training set (its mean and its d_min, d_max), indexed for the batch.

    Returns
    -------
    float
        The batch loss before the update.
    """
    regressor.train()
    optimizer.zero_grad(set_to_none=True)
    pred = regressor(x)
    loss = L.distance_weighted_l1(pred, bmd.to(pred.dtype), sample_weights)
    if not math.isfinite(float(loss.detach())):
        raise FloatingPointError("stage-3 loss is not finite; check the BMD targets and the learning rate")
    loss.backward()
    optimizer.step()
    return float(loss.detach())
