"""``screener train training/recipes/hip_xray-*.toml``: BMD-GAN (Gu et al. 2023, seed ``004``).

Called by ``screener train`` through :data:`training.plan.CUSTOM_TRAINERS` (the recipe is not a plain
fold ensemble).  One run:

1. data: :func:`training.datasets.hip_xray.build` and the same patient-level split as every protocol
   (:func:`training.plan.split_plan`: test patients and the held-out radiograph profile out first; the
   first fold's train / validation patients);
2. **stage 1** -- generator ``G`` (:class:`screener.nets.bmdgan.BMDGenerator`, light HRNet encoder +
   pix2pixHD decoder) against multi-scale conditional discriminators learns radiograph -> pelvis +
   femur bone DRR with the paper's losses (LSGAN + 10 x feature matching + 100 x L1 + 1 x gradient
   correlation), AdamW + SGDR (:func:`training.bmdgan.run_decomposition_stage`);
3. **stage 2** -- hierarchical learning: ``G`` continues on the proximal-femur PF-DRR
   (:func:`training.bmdgan.start_stage2`);
4. **PF-DRR -> BMD** -- threshold ``t`` maximising the training-set PCC of the mean PF-DRR above
   ``t`` with BMD, and the linear fit (:func:`training.bmdgan.tune_threshold`) on *predicted*
   training PF-DRRs;
5. **stage 3** -- ``R = {M_E, M_R}`` (:class:`screener.nets.bmdgan.BMDRegressor`) inherits the
   encoder, trains the head with the encoder frozen (on the encoder's representation of the
   training radiographs, computed once: many head epochs cost little), then end to end, on the
   distance-weighted L1 (eqs. 9-11); best validation MAE kept;
6. **direct-regression baseline** -- the same ``BMDRegressor`` from random initialisation on the same
   training patients and loss, ``baseline_epochs`` end-to-end epochs (default frozen + end-to-end
   epochs of stage 3), no decomposition: the paper's comparison;
7. evaluation on the test patients and the held-out profile: the paper's table (PCC, ICC, MAE, SEE)
   for decomposition + regression, PF-DRR linear fit and the direct baseline; PCC by pose and after
   JPEG q50 recompression of the radiograph (:func:`robustness_tables`);
8. the bundle ``<out>/hip_xray/`` (:func:`screener.bundles.save_bundle`) -- a documented variant:
   ``weights.pt`` holds the stage-3 regressor (the bundle's prediction, what ``screener evaluate``
   runs), ``decomposition.pt`` the stage-2 generator (PF-DRR for the overlay and the linear BMD),
   ``baseline.pt`` the direct-regression baseline (evaluation only); all float16, same format.
   The card's ``decomposition`` entry says so and holds ``t`` and the line.

Recipe mapping
--------------
``[network] kwargs``: ``width``, ``blocks``, ``stages`` (encoder), ``ndf``, ``n_layers``,
``num_scales`` (discriminators), ``dims``, ``depths``, ``heads`` (regression head),
``stage1_epochs``, ``stage2_epochs``, ``stage3_frozen_epochs``, ``baseline_epochs``, ``baseline_lr`` (the
direct baseline's learning rate, default ``[optimizer] lr``), ``gan_lr``, ``ema_decay`` (stage 2 keeps an
exponential moving average of the generator's weights with this per-step decay, and the average is the
generator used and shipped; default none), ``linear_weight`` (w: the bundle's BMD is (1 - w) x stage 3 +
w x the PF-DRR linear estimate, :func:`screener.protocols.hip_xray.protocol.combine_estimates`; default 0).
``[augmentation]`` (``rotation_deg``, ``scale_frac``, ``shear_deg``, ``shift_frac``, flips, ``brightness``,
``contrast``; the paper's list, section 4.1): the same random geometry of radiograph and target DRR
(GAN stages) or of the radiograph alone (end-to-end regression and the baseline), rigid in pixel
units, radiograph edges replicated; brightness and contrast on the radiograph only; the
frozen-encoder phase is never augmented.
``[training] epochs``: stage-3 end-to-end epochs (the baseline trains ``stage3_frozen_epochs +
epochs``); ``batch_size``; ``split``/``folds``/``val_fraction``/``test_fraction`` as usual.
``[optimizer] lr``: the regression-head / baseline learning rate (end-to-end phase: ``lr / 5``,
the paper's 6e-5 -> 8e-6 ratio is 7.5), ``weight_decay``.
``[loss] name = "distance_weighted_l1"``, ``kwargs``: ``lambda_l1``, ``lambda_gc``, ``lambda_fm``,
``gan_mode``.

Evaluate the comparison and robustness tables of a trained bundle with
``python -m training.hip_xray evaluate models/hip_xray --data test|holdout``.

The daemon feeds BMD-GAN crops cut around the landmark model's femoral heads (issue 15):
``python -m training.hip_xray finetune-landmarks --out DIR --n 600 --epochs 8 --lr 1e-4 --augment --refit-line``
continues the stage-3 regressors on such crops of standard-profile cohort radiographs (seed 1515, cached in
chunks of ``--chunk`` patients), and ``python -m training.hip_xray interval-landmarks DIR --first 1200 --n 200``
refits the bundle's split-conformal interval on crops of patients neither step saw (hip_xray 0.6.0).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from screener.bundles import BUNDLE_FORMAT, InputSpec, load_bundle, load_networks, save_bundle
from screener.nets.bmdgan import BMDGenerator, BMDRegressor, MultiscaleDiscriminator
from screener.protocols.hip_xray.protocol import combine_estimates
from training import bmdgan as B
from training import losses as L
from training.recipes import AugmentationSpec
from training.trainer import apply_augmentation, sample_augmentation

__all__ = ["NETWORKS", "evaluate_main", "load_aux", "predict_all", "robustness_tables", "train_recipe"]

#: Networks of the bundle (pass as ``networks=`` to :func:`screener.bundles.load_bundle`).
NETWORKS = {"BMDRegressor": BMDRegressor, "BMDGenerator": BMDGenerator}
DECOMPOSITION_FILE = "decomposition.pt"
BASELINE_FILE = "baseline.pt"
PF_THRESHOLDS = np.round(np.arange(0.05, 1.51, 0.05), 3)

_GEN_KEYS = ("width", "blocks", "stages", "stem_stride")
_HEAD_KEYS = ("dims", "depths", "heads")


def _kw(recipe: Any) -> dict[str, Any]:
    k = dict(recipe.network.kwargs or {})
    known = set(_GEN_KEYS + _HEAD_KEYS + ("ndf", "n_layers", "num_scales", "stage1_epochs", "stage2_epochs",
                                          "stage3_frozen_epochs", "gan_lr", "baseline_epochs", "baseline_lr",
                                          "channels_last", "stage3_heads", "baseline_stem_stride", "ema_decay",
                                          "linear_weight"))
    if float(k.pop("intensity_aug", 0.0) or 0.0):
        raise ValueError("hip_xray: [network] kwargs intensity_aug is gone; set [augmentation] brightness / "
                         "contrast instead")
    unknown = sorted(set(k) - known)
    if unknown:
        raise ValueError(f"hip_xray: unknown [network] kwargs {unknown}; known: {sorted(known)}")
    return k


def _batches(x: np.ndarray, y: np.ndarray, batch: int, rng: np.random.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    order = rng.permutation(len(x))
    return [(torch.from_numpy(x[order[i:i + batch]]), torch.from_numpy(y[order[i:i + batch]]))
            for i in range(0, len(order), batch)]


def _augment(xb: torch.Tensor, yb: torch.Tensor | None, gen: torch.Generator, spec: AugmentationSpec
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The recipe's ``[augmentation]`` of a radiograph batch and, when given, the same geometry of its
    target DRRs (:func:`training.trainer.apply_augmentation`, rigid in pixel units on the non-square
    hip; edges of the radiograph replicated, the DRR padded with zeros; brightness and contrast on
    the radiograph only, clipped to ``[0, 1]``)."""
    if not spec.enabled:
        return xb, yb
    params = sample_augmentation(len(xb), spec, gen)
    xa = apply_augmentation(xb, params, "border", square_pixels=True, value_range=(0.0, 1.0))
    ya = None if yb is None else apply_augmentation(yb, params, "zeros", square_pixels=True, intensity=False)
    return xa, ya


class _Shuffled:
    """Re-iterable batches, reshuffled (and augmented) every pass (seeded)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, batch: int, seed: int,
                 augmentation: AugmentationSpec | None = None) -> None:
        self.x, self.y, self.batch = x, y, batch
        self.rng = np.random.default_rng(seed)
        self.gen = torch.Generator().manual_seed(int(seed))
        self.spec = augmentation or AugmentationSpec()

    def __iter__(self):  # noqa: ANN204
        return iter([_augment(xb, yb, self.gen, self.spec) for xb, yb in _batches(self.x, self.y, self.batch, self.rng)])


@torch.no_grad()
def _run(model: nn.Module, x: np.ndarray, batch: int = 32) -> np.ndarray:
    model.eval()
    outs = [model(torch.from_numpy(x[i:i + batch])).cpu().numpy() for i in range(0, len(x), batch)]
    return np.concatenate(outs).astype(np.float64)


def _fit_regressor(model: BMDRegressor, x_tr: np.ndarray, y_tr: np.ndarray, x_va: np.ndarray, y_va: np.ndarray,
                   phases: Sequence[tuple[str, int, float]], batch: int, weight_decay: float, seed: int,
                   tag: str, augmentation: AugmentationSpec | None = None, channels_last: bool = False
                   ) -> tuple[BMDRegressor, list[dict[str, float]]]:
    """Train ``model`` through ``phases`` ((phase, epochs, lr)) on the distance-weighted L1; keep the
    best-validation-MAE weights (``channels_last``: as in :func:`training.bmdgan.run_decomposition_stage`)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    weights = L.distance_weights(y_tr)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(int(seed))
    spec = augmentation or AugmentationSpec()
    best, best_mae, history = copy.deepcopy(model.state_dict()), float("inf"), []
    yt = torch.from_numpy(y_tr.astype(np.float32))
    for phase, epochs, lr in phases:
        if epochs <= 0:
            continue
        if phase == "scratch":
            model.freeze_encoder(False)
            opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        else:
            opt = B.stage3_optimizer(model, phase, lr=lr, weight_decay=weight_decay)
        if phase == "frozen_encoder":
            # the encoder is fixed: its representation of the (un-augmented) training radiographs is
            # computed once and only the head M_R trains (a fraction of the time)
            best, best_mae = _fit_head_cached(model, opt, x_tr, yt, weights, x_va, y_va, epochs, batch, rng,
                                              tag, history, best, best_mae)
            continue
        for epoch in range(epochs):
            t0 = time.time()
            losses = []
            order = rng.permutation(len(x_tr))
            for i in range(0, len(order), batch):
                b = order[i:i + batch]
                if len(b) < 2:
                    continue
                xb, _ = _augment(torch.from_numpy(x_tr[b]), None, gen, spec)
                losses.append(B.regression_step(model, opt, xb.contiguous(memory_format=fmt), yt[b], weights[b]))
            mae = float(np.mean(np.abs(_run(model, x_va) - y_va))) if len(x_va) else float(np.mean(losses))
            if mae < best_mae:
                best_mae, best = mae, copy.deepcopy(model.state_dict())
            history.append({"phase": phase, "epoch": epoch, "loss": float(np.mean(losses)), "val_mae": mae})
            print(f"hip_xray {tag} {phase} epoch {epoch + 1}/{epochs}: loss {np.mean(losses):.4f} "
                  f"val MAE {mae:.4f} ({time.time() - t0:.0f} s)", file=sys.stderr)
    model.to(memory_format=torch.contiguous_format)
    model.load_state_dict(best)
    model.freeze_encoder(False)
    return model.eval(), history


@torch.no_grad()
def _features(model: BMDRegressor, x: np.ndarray, batch: int = 32) -> torch.Tensor:
    model.eval()
    if len(x) == 0:
        return torch.zeros((0,))
    return torch.cat([model.features(torch.from_numpy(x[i:i + batch])) for i in range(0, len(x), batch)])


@torch.no_grad()
def _head_predict(model: BMDRegressor, z: torch.Tensor, batch: int = 64) -> np.ndarray:
    model.head.eval()
    out = [model.head(z[i:i + batch]).reshape(len(z[i:i + batch]), -1)[:, 0] for i in range(0, len(z), batch)]
    return torch.cat(out).double().numpy()


def _fit_head_cached(model: BMDRegressor, opt: torch.optim.Optimizer, x_tr: np.ndarray, yt: torch.Tensor,
                     weights: torch.Tensor, x_va: np.ndarray, y_va: np.ndarray, epochs: int, batch: int,
                     rng: np.random.Generator, tag: str, history: list[dict[str, float]],
                     best: dict[str, torch.Tensor], best_mae: float) -> tuple[dict[str, torch.Tensor], float]:
    """Frozen-encoder phase of stage 3 on the cached encoder representation (no augmentation)."""
    z_tr, z_va = _features(model, x_tr), _features(model, x_va)
    for epoch in range(epochs):
        t0 = time.time()
        losses = []
        order = rng.permutation(len(z_tr))
        model.head.train()
        for i in range(0, len(order), batch):
            b = order[i:i + batch]
            if len(b) < 2:
                continue
            opt.zero_grad(set_to_none=True)
            pred = model.head(z_tr[b]).reshape(len(b), -1)[:, 0]
            loss = L.distance_weighted_l1(pred, yt[b], weights[b])
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        mae = float(np.mean(np.abs(_head_predict(model, z_va) - y_va))) if len(z_va) else float(np.mean(losses))
        if mae < best_mae:
            best_mae, best = mae, copy.deepcopy(model.state_dict())
        history.append({"phase": "frozen_encoder", "epoch": epoch, "loss": float(np.mean(losses)), "val_mae": mae})
        if (epoch + 1) % 10 == 0 or epoch + 1 == epochs:
            print(f"hip_xray {tag} frozen_encoder epoch {epoch + 1}/{epochs}: loss {np.mean(losses):.4f} "
                  f"val MAE {mae:.4f} ({time.time() - t0:.1f} s, cached representation)", file=sys.stderr)
    return best, best_mae


def _start_at_mean(model: BMDRegressor, mean: float) -> None:
    """Zero the last layer's weights and set its bias to the training mean (start at the mean BMD)."""
    nn.init.zeros_(model.head.fc.weight)
    nn.init.constant_(model.head.fc.bias, mean)


def _state16(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: (v.detach().cpu().half() if v.is_floating_point() else v.detach().cpu().clone())
            for k, v in model.state_dict().items()}


def _save_aux(path: Path, model: nn.Module) -> None:
    torch.save({"format": BUNDLE_FORMAT, "folds": [_state16(model)]}, path)


def load_aux(bundle_dir: str | Path) -> tuple[BMDGenerator, BMDRegressor | None, dict[str, Any]]:
    """The stage-2 generator, the baseline regressor (``None`` if absent) and the card's
    ``decomposition`` entry of a ``hip_xray`` bundle."""
    p = Path(bundle_dir)
    card = json.loads((p / "model_card.json").read_text(encoding="utf-8"))
    dec = card.get("decomposition")
    if not dec:
        raise ValueError(f"{p}: model card has no 'decomposition' entry; not a hip_xray bundle")
    gen = load_networks(p / dec["file"], "BMDGenerator", dec["generator_kwargs"])[0]
    base = None
    if dec.get("baseline_file") and (p / dec["baseline_file"]).is_file():
        kwargs = {**card["architecture"]["kwargs"], **dec.get("baseline_kwargs", {})}
        base = load_networks(p / dec["baseline_file"], "BMDRegressor", kwargs)[0]
    return gen, base, dec


def _run_heads(models: nn.Module | Sequence[nn.Module], x: np.ndarray) -> np.ndarray:
    """Mean estimate of one stage-3 regressor or of an ensemble of them (as the bundle predicts)."""
    heads = [models] if isinstance(models, nn.Module) else list(models)
    return np.mean([_run(m, x) for m in heads], axis=0)


def predict_all(regressor: nn.Module | Sequence[nn.Module], generator: nn.Module, baseline: nn.Module | None,
                dec: dict[str, Any],
                images: np.ndarray) -> dict[str, np.ndarray]:
    """BMD estimates of every method for ``(N, 1, H, W)`` inputs.

    Returns
    -------
    dict
        ``decomposition_regression`` (the bundle's estimate:
        :func:`~screener.protocols.hip_xray.protocol.combine_estimates` of the stage-3 regression and the
        PF-DRR linear estimate with the card's ``linear_weight``),
        ``stage3_regression`` (only when that weight is not 0), ``pfdrr_linear`` (mean PF-DRR above
        ``t``, linear fit) and ``direct_baseline`` (when given).
    """
    x = np.asarray(images, dtype=np.float32)
    stage3 = _run_heads(regressor, x)
    pf = _run(generator, x)
    feats = B.pfdrr_bmd_features(pf, dec["threshold_t"])
    linear = B.apply_linear_bmd(feats, dec["slope"], dec["intercept"])
    w = float(dec.get("linear_weight", 0.0))
    out = {"decomposition_regression": combine_estimates(stage3, linear, w)}
    if w:
        out["stage3_regression"] = stage3
    # a hip with no PF-DRR pixel above t has no linear estimate: the method's column gets the mean one
    # (the line of the mean feature)
    out["pfdrr_linear"] = np.where(np.isfinite(linear), linear, np.nanmean(linear))
    if baseline is not None:
        out["direct_baseline"] = _run(baseline, x)
    return out


def robustness_tables(y: np.ndarray, preds: dict[str, np.ndarray], pred_jpeg: dict[str, np.ndarray] | None,
                      poses: np.ndarray | None) -> dict[str, list[dict[str, Any]]]:
    """The comparison table (paper metrics per method) and the robustness table (PCC by pose and
    after JPEG recompression).

    Parameters
    ----------
    y : numpy.ndarray
        Reference BMD.
    preds, pred_jpeg : dict
        Method -> estimate on the images as rendered / after JPEG recompression.
    poses : numpy.ndarray, optional
        Pose of each sample.

    Returns
    -------
    dict
        ``{"comparison": rows, "robustness": rows}``.
    """
    from training import metrics as M

    comparison = []
    for method, p in preds.items():
        for row in M.paper_table("hip_xray", y, p):
            comparison.append({"method": method, **row})
    robust = []
    for method, p in preds.items():
        row: dict[str, Any] = {"method": method, "all": M.pearson_r(y, p)}
        if poses is not None:
            for pose in sorted(set(map(str, poses))):
                m = np.asarray(poses).astype(str) == pose
                row[f"pose={pose}"] = M.pearson_r(y[m], p[m]) if m.sum() >= 3 else float("nan")
        if pred_jpeg is not None and method in pred_jpeg:
            row["jpeg"] = M.pearson_r(y, pred_jpeg[method])
        robust.append(row)
    return {"comparison": comparison, "robustness": robust}


def _md(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    keys = list(rows[0].keys())
    for r in rows[1:]:
        keys += [k for k in r if k not in keys]

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "nan" if not np.isfinite(v) else f"{v:.3f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def _evaluate_sets(ds: Any, plan: Any, regressor: nn.Module | Sequence[nn.Module], generator: nn.Module, baseline: nn.Module | None,
                   dec: dict[str, Any], holdout_label: str
                   ) -> tuple[dict[str, Any], dict[str, str], dict[str, np.ndarray]]:
    """Comparison and robustness tables of the test and held-out sets, and the bundle's own
    (decomposition + regression) estimates of each set."""
    rows: dict[str, Any] = {}
    md: dict[str, str] = {}
    estimates: dict[str, np.ndarray] = {}
    for label, idx in (("test", plan.test), (holdout_label, plan.excluded)):
        if idx.size < 3:
            continue
        sub = ds.subset(idx)
        y = np.asarray(sub.targets, dtype=np.float64)
        preds = predict_all(regressor, generator, baseline, dec, sub.images)
        pj = predict_all(regressor, generator, baseline, dec, sub.attributes["image_jpeg"][:, None]) \
            if "image_jpeg" in sub.attributes else None
        t = robustness_tables(y, preds, pj, sub.attributes.get("pose"))
        rows[label] = t
        estimates[label] = preds["decomposition_regression"]
        n = idx.size
        md[f"hip_xray — {label} ({n} hips, synthetic): methods"] = _md(t["comparison"])
        md[f"hip_xray — {label} ({n} hips, synthetic): PCC by pose and after JPEG q{dec.get('jpeg_quality', 50)}"] = _md(t["robustness"])
    return rows, md, estimates


@dataclass
class _Settings:
    """What one ``hip_xray`` recipe sets for :func:`train_recipe` (module docstring: Recipe mapping)."""

    seed: int
    kw: dict[str, Any]
    weights: Any
    gan_mode: str
    batch: int
    gen_kw: dict[str, int]
    disc_kw: dict[str, int]
    head_kw: dict[str, Any]
    gan_lr: float
    epochs: tuple[int, int, int, int]  # stage 1, stage 2, stage 3 frozen encoder, stage 3 end to end
    lr: float
    wd: float
    aug: Any
    channels_last: bool
    linear_weight: float


def _settings(recipe: Any) -> _Settings:
    """The recipe read into :class:`_Settings` (``[network] kwargs`` checked by :func:`_kw`)."""
    kw = _kw(recipe)
    lk = dict(recipe.loss.kwargs or {})
    weights = B.LossWeights(l1=float(lk.get("lambda_l1", B.LAMBDA_L1)), gc=float(lk.get("lambda_gc", B.LAMBDA_GC)),
                            fm=float(lk.get("lambda_fm", B.LAMBDA_FM)))
    w_lin = float(kw.get("linear_weight", 0.0))
    if not 0.0 <= w_lin <= 1.0:
        raise ValueError(f"hip_xray: [network] kwargs linear_weight must be in [0, 1], got {w_lin}")
    return _Settings(
        seed=int(recipe.seed), kw=kw, weights=weights, gan_mode=str(lk.get("gan_mode", "lsgan")),
        batch=int(recipe.training.batch_size), gen_kw={k: int(kw[k]) for k in _GEN_KEYS if k in kw},
        disc_kw={"ndf": int(kw.get("ndf", 16)), "n_layers": int(kw.get("n_layers", 3)),
                 "num_scales": int(kw.get("num_scales", 3))},
        head_kw={k: (tuple(kw[k]) if isinstance(kw[k], list) else kw[k]) for k in _HEAD_KEYS if k in kw},
        gan_lr=float(kw.get("gan_lr", B.PAPER_LR)),
        epochs=(int(kw.get("stage1_epochs", 10)), int(kw.get("stage2_epochs", 10)),
                int(kw.get("stage3_frozen_epochs", 5)), int(recipe.training.epochs)),
        lr=float(recipe.optimizer.lr), wd=float(recipe.optimizer.weight_decay), aug=recipe.augmentation,
        channels_last=bool(kw.get("channels_last", False)), linear_weight=w_lin)


def _decompose(st: _Settings, x: np.ndarray, bone: np.ndarray, pf: np.ndarray
               ) -> tuple[BMDGenerator, dict[str, Any], bool]:
    """Stages 1 and 2 (hierarchical decomposition) on the training radiographs ``x``: the generator
    everything after stage 2 uses (with ``ema_decay``: the moving average of its stage-2 weights), the
    last epochs' histories and wall times, and whether it is the moving average."""
    e1, e2 = st.epochs[0], st.epochs[1]
    g1, d1 = BMDGenerator(**st.gen_kw), MultiscaleDiscriminator(2, **st.disc_kw)
    t0 = time.time()
    h1 = B.run_decomposition_stage(g1, d1, _Shuffled(x, bone, st.batch, st.seed + 1, st.aug), e1, lr=st.gan_lr,
                                   weights=st.weights, gan_mode=st.gan_mode, first_cycle_epochs=max(1, e1),
                                   channels_last=st.channels_last)
    t1 = time.time() - t0
    g2, d2 = B.start_stage2(g1, d1)
    # ema_decay: stage 2 keeps an exponential moving average of the generator's weights, and the
    # average is the generator everything after stage 2 uses (and the bundle ships)
    ema_decay = st.kw.get("ema_decay")
    ema = copy.deepcopy(g2) if ema_decay is not None else None
    t0 = time.time()
    h2 = B.run_decomposition_stage(g2, d2, _Shuffled(x, pf, st.batch, st.seed + 2, st.aug), e2, lr=st.gan_lr,
                                   weights=st.weights, gan_mode=st.gan_mode, first_cycle_epochs=max(1, e2),
                                   channels_last=st.channels_last, ema=ema, ema_decay=float(ema_decay or 0.0))
    t2 = time.time() - t0
    if ema is not None:
        g2 = ema
    print(f"hip_xray: stage 1 L1 {h1[-1]['l1']:.4f} ({t1:.0f} s), stage 2 L1 {h2[-1]['l1']:.4f} ({t2:.0f} s)",
          file=sys.stderr)
    return g2, {"stage1": h1[-1], "stage2": h2[-1], "t1": t1, "t2": t2}, ema is not None


def _regressors(st: _Settings, g2: BMDGenerator, shape: tuple[int, ...], x_tr: np.ndarray, y_tr: np.ndarray,
                x_va: np.ndarray, y_va: np.ndarray) -> tuple[list[BMDRegressor], list[Any], BMDRegressor, Any, int]:
    """Stage 3 and the direct baseline: the stage-3 regressors (one, or an ensemble of ``stage3_heads``
    from the same encoder with other seeds, head k > 0 drawing from seed + 100 k; the bundle predicts
    their mean) with their histories, the baseline, its history and its stem stride."""
    e3a, e3b = st.epochs[2], st.epochs[3]
    regs, h3 = [], []
    for k in range(int(st.kw.get("stage3_heads", 1))):
        if k:
            torch.manual_seed(st.seed + 100 * k)
        reg = BMDRegressor.from_generator(g2, shape, **st.head_kw)
        _start_at_mean(reg, float(y_tr.mean()))
        reg, hk = _fit_regressor(reg, x_tr, y_tr, x_va, y_va,
                                 [("frozen_encoder", e3a, st.lr), ("end_to_end", e3b, st.lr / 5.0)], st.batch, st.wd,
                                 st.seed + 3 + 100 * k, f"stage3 head {k + 1}" if k else "stage3", st.aug,
                                 channels_last=st.channels_last)
        regs.append(reg)
        h3.append(hk)
    torch.manual_seed(st.seed + 4)
    # the baseline is the stage-3 regressor's architecture, but may keep HRNet's stride-4 stem
    # (baseline_stem_stride), which is cheaper to train from random weights
    stem = int(st.kw.get("baseline_stem_stride", st.gen_kw.get("stem_stride", 4)))
    base = BMDRegressor(shape, **{**st.gen_kw, "stem_stride": stem}, **st.head_kw)
    _start_at_mean(base, float(y_tr.mean()))
    e_base = int(st.kw.get("baseline_epochs", e3a + e3b))
    lr_base = float(st.kw.get("baseline_lr", st.lr))
    base, hb = _fit_regressor(base, x_tr, y_tr, x_va, y_va, [("scratch", e_base, lr_base)], st.batch, st.wd,
                              st.seed + 5, "baseline", st.aug, channels_last=st.channels_last)
    return regs, h3, base, hb, stem


def _decomposition_entry(st: _Settings, tun: Any, n_heads: int, ema: bool, stem: int, jpeg_quality: int
                         ) -> dict[str, Any]:
    """The model card's ``decomposition`` entry: the extra weight files, the PF-DRR -> BMD line, what each file holds."""
    w_lin = st.linear_weight
    ema_decay = st.kw.get("ema_decay")
    return {"file": DECOMPOSITION_FILE, "baseline_file": BASELINE_FILE, "generator_kwargs": st.gen_kw,
            "baseline_kwargs": {"stem_stride": stem},
            "threshold_t": tun.threshold, "slope": tun.slope, "intercept": tun.intercept,
            "linear_weight": w_lin,
            "drr_units": "g/cm2 hydroxyapatite (drr_scale 1)",
            "jpeg_quality": jpeg_quality,
            "holds": {"weights.pt": "stage-3 regressor R = {M_E, M_R} (BMDRegressor): the bundle's BMD"
                                    + (f" (an ensemble of {n_heads} heads on the same encoder; their mean)"
                                       if n_heads > 1 else "")
                                    + (" together with the PF-DRR linear estimate (linear_weight)" if w_lin else ""),
                      DECOMPOSITION_FILE: "stage-2 generator G (BMDGenerator): radiograph half -> PF-DRR"
                                          + (f" (exponential moving average of its stage-2 weights, decay {ema_decay:g}"
                                             "; stage 3 starts from it)" if ema else ""),
                      BASELINE_FILE: "direct-regression baseline (BMDRegressor from scratch), evaluation only"}}


def _recipe_metrics(ds: Any, plan: Any, hold_label: str, rows: dict[str, Any], md: dict[str, str],
                    estimates: dict[str, np.ndarray], run: dict[str, Any]) -> dict[str, Any]:
    """The card's ``metrics``: the split, the paper tables of the test and held-out sets, the method
    comparison, wall times, the last epochs' histories and the threshold search (``run``)."""
    from training.plan import evaluation_tables, markdown_sections

    metrics: dict[str, Any] = {"split": plan.to_dict(), "tables": {}, "rows": {}, "comparison": rows, **run}
    for label, idx in (("test", plan.test), (hold_label, plan.excluded)):
        if label not in estimates:
            continue
        tables = evaluation_tables("hip_xray", "regression", ds.subset(idx).targets, estimates[label][:, None])
        metrics["rows"][label] = tables
        metrics["tables"].update(markdown_sections(tables, f"{label} ({idx.size} hips, synthetic)"))
    metrics["tables"].update(md)
    return metrics


def _write_recipe_bundle(recipe: Any, args: argparse.Namespace, st: _Settings, ds: Any, shape: tuple[int, ...],
                         regs: list[BMDRegressor], g2: BMDGenerator, base: BMDRegressor, dec: dict[str, Any],
                         metrics: dict[str, Any]) -> Path:
    """Write ``<out>/hip_xray/``: the card and ``weights.pt`` (:func:`screener.bundles.save_bundle`), the
    stage-2 generator and the baseline beside them, the file list in the README."""
    out_dir = Path(args.out) / "hip_xray"
    b = recipe.bundle
    spec = InputSpec(shape=(1, *shape), spacing_mm=(), window={}, extras=(), value_range=(0.0, 1.0))
    arch_kw = {"input_shape": list(shape), **st.gen_kw, **{k: list(v) if isinstance(v, tuple) else v
                                                          for k, v in st.head_kw.items()}}
    save_bundle(
        out_dir, protocol="hip_xray", models=regs, architecture={"name": "BMDRegressor", "kwargs": arch_kw},
        input_spec=spec, outputs=list(b.outputs) or ["femoral_neck_bmd"], units=list(b.units) or ["g/cm2"],
        task="regression", preprocessing={**ds.meta.get("preprocessing", {}), **b.preprocessing},
        t_score_reference={"mean": b.t_score_mean or 0.858, "sd": b.t_score_sd or 0.120,
                           "source": b.t_score_reference or "NHANES III femoral neck, white women 20-29"},
        recipe=recipe.to_dict(), command=f"screener train {args.recipe} --out {args.out}", seed=st.seed,
        metrics=metrics, version=b.version, differences_from_paper=b.differences_from_paper,
        changelog={str(k): str(v) for k, v in b.changelog.items()} or None,
        extra={"decomposition": dec,
               "data_source": {"source": recipe.data.source, "n": recipe.data.n, "seed": recipe.data.seed,
                               "profiles": list(recipe.data.profiles),
                               "holdout_profiles": list(recipe.data.holdout_profiles)}},
    )
    _save_aux(out_dir / DECOMPOSITION_FILE, g2)
    _save_aux(out_dir / BASELINE_FILE, base)
    append_files_section(out_dir, dec)
    return out_dir


def train_recipe(recipe: Any, args: argparse.Namespace) -> int:
    """Train the BMD-GAN pipeline of a ``hip_xray`` recipe and write the bundle (module docstring).

    Parameters
    ----------
    recipe : training.recipes.Recipe
    args : argparse.Namespace
        From ``screener train`` (``out``, ``device``, ``recipe``).

    Returns
    -------
    int
        Exit status (0).
    """
    from training.plan import build_dataset, split_plan

    t_start = time.time()
    st = _settings(recipe)
    torch.manual_seed(st.seed)
    ds = build_dataset(recipe)  # training.datasets.hip_xray.build, cached like every cohort data set
    plan = split_plan(ds, recipe)
    fold = plan.folds[0]
    t_data = time.time() - t_start
    print(f"hip_xray ({recipe.variant}): {len(ds)} hips, {len(np.unique(ds.patient_ids))} patients; train {fold.train.size}, "
          f"val {fold.val.size}, test {plan.test.size}, held-out profile {plan.excluded.size} "
          f"(data {t_data:.0f} s)", file=sys.stderr)
    x = ds.images.astype(np.float32)
    y = np.asarray(ds.targets, dtype=np.float64)
    bone = ds.attributes["bone_drr"][:, None].astype(np.float32)
    pf = ds.attributes["pf_drr"][:, None].astype(np.float32)
    tr, va = fold.train, fold.val
    shape = tuple(int(s) for s in x.shape[2:])
    g2, hist, ema = _decompose(st, x[tr], bone[tr], pf[tr])
    # PF-DRR -> BMD on predicted training PF-DRRs
    pf_pred = _run(g2, x[tr])
    tun = B.tune_threshold(pf_pred, y[tr], PF_THRESHOLDS)
    print(f"hip_xray: threshold t = {tun.threshold:g} (training PCC {np.nanmax(tun.pcc):.3f})", file=sys.stderr)
    regs, h3, base, hb, stem = _regressors(st, g2, shape, x[tr], y[tr], x[va], y[va])
    dec = _decomposition_entry(st, tun, len(regs), ema, stem, int(ds.meta.get("render", {}).get("jpeg_quality", 50)))
    hold_label = "holdout profile " + ",".join(recipe.data.holdout_profiles)
    rows, md, estimates = _evaluate_sets(ds, plan, regs, g2, base, dec, hold_label)
    wall = time.time() - t_start
    run = {"wall_s": {"total": wall, "data": t_data, "stage1": hist["t1"], "stage2": hist["t2"]},
           "history": {"stage1": hist["stage1"], "stage2": hist["stage2"], "stage3": h3[0] if len(h3) == 1 else h3,
                       "baseline": hb},
           "threshold_pcc": {"t": tun.thresholds.tolist(), "pcc": tun.pcc.tolist()}}
    metrics = _recipe_metrics(ds, plan, hold_label, rows, md, estimates, run)
    out_dir = _write_recipe_bundle(recipe, args, st, ds, shape, regs, g2, base, dec, metrics)
    for name, text in metrics["tables"].items():
        print(f"\n## {name}\n\n{text}")
    print(f"bundle written to {out_dir} (wall {wall:.0f} s)")
    return 0


def append_files_section(bundle_dir: str | Path, dec: dict[str, Any]) -> None:
    """Add the bundle's file list and the PF-DRR -> BMD line to its ``README.md`` (the standard card
    does not know the two extra weight files)."""
    lines = ["", "## Files (hip_xray bundle variant)", ""]
    lines += [f"- `{name}`: {what}" for name, what in dec["holds"].items()]
    lines += ["", f"PF-DRR -> BMD: BMD = {dec['slope']:.4f} x mean(PF-DRR >= t) + {dec['intercept']:.4f} g/cm2, "
              f"t = {dec['threshold_t']:g} g/cm2 (training set).  All weights float16, format "
              f"`{BUNDLE_FORMAT}`; the model card's `decomposition` entry holds the same.", ""]
    w = float(dec.get("linear_weight", 0.0))
    if w:
        lines += [f"Reported BMD = {1 - w:g} x stage-3 regression (`weights.pt`) + {w:g} x the PF-DRR linear "
                  "estimate above (stage 3 alone where the decomposition finds no PF-DRR above t).", ""]
    readme = Path(bundle_dir) / "README.md"
    readme.write_text(readme.read_text(encoding="utf-8").rstrip() + "\n" + "\n".join(lines), encoding="utf-8")


def evaluate_main(argv: Sequence[str] | None = None) -> int:
    """``python -m training.hip_xray evaluate BUNDLE --data test|holdout``: the paper table of the
    bundle (as ``screener evaluate``) plus the method comparison and the robustness table."""
    ap = argparse.ArgumentParser(prog="python -m training.hip_xray evaluate")
    ap.add_argument("command", choices=["evaluate"])
    ap.add_argument("bundle")
    ap.add_argument("--data", default="test", choices=["test", "holdout"])
    args = ap.parse_args(list(sys.argv[1:] if argv is None else argv))
    from training.plan import build_dataset, split_plan
    from training.recipes import recipe_from_dict

    bundle = load_bundle(args.bundle, "cpu", networks=NETWORKS)
    recipe = recipe_from_dict(bundle.card["recipe"], where=f"{args.bundle}/model_card.json recipe")
    gen, base, dec = load_aux(args.bundle)
    ds = build_dataset(recipe)
    plan = split_plan(ds, recipe)
    idx = plan.test if args.data == "test" else plan.excluded
    if idx.size == 0:
        print(f"the recipe has no {args.data} set", file=sys.stderr)
        return 2
    sub = ds.subset(idx)
    y = np.asarray(sub.targets, dtype=np.float64)
    preds = predict_all(bundle.models, gen, base, dec, sub.images)
    pj = predict_all(bundle.models, gen, base, dec, sub.attributes["image_jpeg"][:, None])
    t = robustness_tables(y, preds, pj, sub.attributes["pose"])
    print(f"# {bundle.bundle_id} — {args.data} ({idx.size} hips, synthetic; not clinical accuracy)\n")
    print("## methods\n\n" + _md(t["comparison"]) + "\n")
    print(f"## PCC by pose and after JPEG q{dec.get('jpeg_quality', 50)}\n\n" + _md(t["robustness"]))
    return 0


# ---------------------------------------------------------------------------------------------
# fine-tuning on landmark crops of the radiograph cohort's standard profile (issue 15)
# ---------------------------------------------------------------------------------------------
def landmark_crop_data(seed: int, first: int, n: int, *, views: int = 3, workers: int = 2, pixel_mm: float = 0.7,
                       jitter_mm: float = 0.7, cache: Path | None = None) -> dict[str, np.ndarray]:
    """BMD-GAN inputs cut by :func:`screener.hip_landmarks.landmark_crop` around the true femoral heads
    (moved by a Gaussian ``jitter_mm``, the landmark model's head error) of ``standard``-profile
    radiographs (:mod:`training.phantoms.xray_variety`, the renders the hip landmark benchmark uses), with
    the DXA-style femoral-neck aBMD truth.  Cached as ``hip_xray_landmark-<seed>-<first>-<n>-<views>.npz``."""
    cache = cache or Path.home() / ".cache" / "screener" / "datasets"
    f = cache / f"hip_xray_landmark-{seed}-{first}-{n}-{views}.npz"
    if f.is_file():
        with np.load(f) as z:
            return {k: z[k] for k in z.files}
    jobs = [(seed, first + i, views, pixel_mm, jitter_mm) for i in range(n)]
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(workers) as pool:
            parts = pool.map(_crop_job, jobs, chunksize=2)
    else:
        parts = [_crop_job(j) for j in jobs]
    rows = [r for part in parts for r in part]
    data = {"x": np.stack([r[0] for r in rows]).astype(np.float16), "y": np.array([r[1] for r in rows]),
            "patient": np.array([r[2] for r in rows])}
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(f, **data)
    return data


def _crop_job(job: tuple[int, int, int, float, float]) -> list[tuple[np.ndarray, float, int]]:
    seed, index, views, pixel_mm, jitter_mm = job
    torch.set_num_threads(1)
    from screener.hip_landmarks import HipLandmark, landmark_crop
    from screener.radiograph import read_radiograph
    from training.phantoms.xray_variety import render_cases

    rng = np.random.default_rng([seed, index, 77])
    out = []
    for case in render_cases(seed, index, "standard", views=views, pixel_mm=1.5, ray_mm=5.0, dy_mm=5.0, with_bmd=True):
        ds = case.dataset
        sp = tuple(float(v) for v in ds.PixelSpacing)
        rad = read_radiograph(ds, pixel_mm)
        for s, h in case.hips.items():
            if not h.present or s not in case.extras["bmd"]:
                continue
            head = (h.head_px[0] + rng.normal(0, jitter_mm) / sp[0], h.head_px[1] + rng.normal(0, jitter_mm) / sp[1])
            hip = HipLandmark(anatomy="plus" if h.medial_toward_plus_col else "minus", probability=1.0, head_px=head,
                              neck_px=h.neck_px, confidence=1.0, side=s)
            out.append((landmark_crop(rad, hip, sp).image, float(case.extras["bmd"][s]), index))
    return out


def _pcc(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


def _finetune_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m training.hip_xray finetune-landmarks")
    ap.add_argument("command", choices=["finetune-landmarks"])
    ap.add_argument("--bundle", default="models/hip_xray")
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=300, help="patients of seed 1515 (from --first), 3 views each")
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=240, help="patients per cached crop file")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--augment", action="store_true",
                    help="the bundle recipe's [augmentation] on the crops (rotation, scale, shift, brightness, contrast)")
    ap.add_argument("--refit-line", action="store_true",
                    help="refit the PF-DRR -> BMD line (slope, intercept; t kept) on the training crops")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--version", default="0.6.0")
    return ap


def _finetune_data(args: argparse.Namespace) -> dict[str, np.ndarray]:
    """Landmark crops of patients ``first .. first + n - 1`` of seed 1515, cached in ``--chunk``-patient files."""
    parts = []
    for a in range(args.first, args.first + args.n, args.chunk):
        parts.append(landmark_crop_data(1515, a, min(args.chunk, args.first + args.n - a), workers=args.workers))
    return {k: np.concatenate([d[k] for d in parts]) for k in parts[0]}


def _linear_estimate(gen: nn.Module, dec: dict[str, Any], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PF-DRR feature (mean PF-DRR above ``t``) and the card line's BMD (the mean estimate where no pixel is above ``t``)."""
    feats = B.pfdrr_bmd_features(_run(gen, x), dec["threshold_t"])
    linear = B.apply_linear_bmd(feats, dec["slope"], dec["intercept"])
    return feats, np.where(np.isfinite(linear), linear, np.nanmean(linear))


def landmark_finetune_main(argv: Sequence[str] | None = None) -> int:
    """``python -m training.hip_xray finetune-landmarks --out DIR``: continue the stage-3 regressors of a
    hip_xray bundle end to end on landmark crops of standard-profile cohort radiographs (training seed
    1515 only; the landmark benchmark's seed 1516 stays held out), optionally refit the PF-DRR line on
    the training crops, pick the PF-DRR linear weight on the validation patients, and write the bundle
    to ``--out`` (with its split-conformal interval refitted on the validation patients' crops) when its
    validation PCC beats the input bundle's."""
    args = _finetune_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    torch.set_num_threads(1)
    torch.manual_seed(4)
    data = _finetune_data(args)
    x = data["x"].astype(np.float32)[:, None]
    y = data["y"].astype(np.float64)
    pats = np.unique(data["patient"])
    val_p = set(pats[np.random.default_rng(4).permutation(len(pats))[: max(1, len(pats) // 6)]].tolist())
    va = np.array([p in val_p for p in data["patient"]])
    bundle = load_bundle(args.bundle, "cpu", networks=NETWORKS)
    gen, _, dec = load_aux(args.bundle)
    dec = copy.deepcopy(dec)
    feats, linear = _linear_estimate(gen, dec, x)
    w0 = float(dec.get("linear_weight", 0.0))
    before = _run_heads(bundle.models, x)
    report: dict[str, Any] = {"hips": int(len(y)), "val_hips": int(va.sum()), "patients": int(len(pats)),
                              "val_pcc_before": _pcc(combine_estimates(before[va], linear[va], w0), y[va]),
                              "val_pcc_stage3_before": _pcc(before[va], y[va]), "val_pcc_linear": _pcc(linear[va], y[va])}
    if args.refit_line:
        ok = ~va & np.isfinite(feats)
        slope, intercept = np.polyfit(feats[ok], y[ok], 1)
        dec.update(slope=float(slope), intercept=float(intercept))
        feats, linear = _linear_estimate(gen, dec, x)
        report["refit_line"] = {"slope": float(slope), "intercept": float(intercept)}
    print(json.dumps(report), flush=True)
    spec = None
    if args.augment:
        from training.recipes import recipe_from_dict

        spec = recipe_from_dict(bundle.card["recipe"], where="recipe").augmentation
    models = []
    for k, m in enumerate(bundle.models):
        m = copy.deepcopy(m)
        m, hist = _fit_regressor(m, x[~va], y[~va], x[va], y[va], [("end_to_end", args.epochs, args.lr)], batch=32,
                                 weight_decay=1e-4, seed=4 + k, tag=f"landmark fold {k}", augmentation=spec)
        models.append(m)
        report[f"fold{k}_history"] = hist
    after = _run_heads(models, x)
    best_w, best = w0, -1.0
    for w in (0.0, 0.25, 0.5, 0.75):
        p = _pcc(combine_estimates(after[va], linear[va], w), y[va])
        report[f"val_pcc_after_w{w}"] = p
        if p > best:
            best_w, best = w, p
    report.update(val_pcc_after=best, linear_weight=best_w, val_pcc_stage3_after=_pcc(after[va], y[va]))
    print(json.dumps({k: v for k, v in report.items() if "history" not in k}), flush=True)
    if best <= report["val_pcc_before"]:
        print("not better on the validation patients: no bundle written", flush=True)
        return 1
    from training.intervals import fit_conformal

    dec["linear_weight"] = best_w
    interval = fit_conformal(y[va], combine_estimates(after[va], linear[va], best_w), level=0.9)
    interval["unit"] = "hip (one estimate per femoral neck, as the daemon reports it)"
    interval["fitted_on"] = (f"landmark crops (true heads, 0.7 mm jitter) of the {len(val_p)} validation patients' "
                             f"{int(va.sum())} hips (seed 1515, standard profile; not trained on)")
    _write_finetuned(args, models, dec, report, interval, argv)
    return 0


def _write_finetuned(args: argparse.Namespace, models: list[nn.Module], dec: dict[str, Any], report: dict[str, Any],
                     interval: dict[str, Any], argv: Sequence[str] | None) -> None:
    """Copy the input bundle to ``--out`` with the continued regressors, the new ``decomposition`` entry
    (linear weight, the line when refitted), interval, version, changelog and command."""
    import shutil

    out = Path(args.out)
    if out.resolve() != Path(args.bundle).resolve():
        shutil.copytree(args.bundle, out, dirs_exist_ok=True)
    torch.save({"format": BUNDLE_FORMAT, "folds": [_state16(m) for m in models]}, out / "weights.pt")
    card = json.loads((out / "model_card.json").read_text(encoding="utf-8"))
    card["version"] = args.version
    card["decomposition"] = dec
    card.setdefault("intervals", {})["femoral_neck_bmd"] = interval
    card.setdefault("metrics", {})["landmark_finetune"] = {k: v for k, v in report.items() if "history" not in k}
    line = (f"; PF-DRR -> BMD line refitted on the training crops (slope {dec['slope']:.4f}, intercept "
            f"{dec['intercept']:.4f})" if "refit_line" in report else "")
    card["changelog"] = {args.version: (
        f"stage-3 regressors continued end to end ({args.epochs} epochs, lr {args.lr:g}"
        f"{', recipe augmentation' if args.augment else ''}) on BMD-GAN crops cut around the "
        f"femoral head (screener.hip_landmarks.landmark_crop) of {report['hips']} hips of {report['patients']} "
        f"standard-profile cohort radiographs (training.phantoms.xray_variety, seed 1515){line}; PF-DRR linear weight "
        f"{dec['linear_weight']:g}; validation patients' PCC {report['val_pcc_before']:.3f} -> {report['val_pcc_after']:.3f}; "
        f"interval refitted on those patients' crops (half-width {interval['half_width']:.3f} g/cm2)"),
        **card.get("changelog", {})}
    card["command"] = "nice -n 19 python -m training.hip_xray " + " ".join(list(sys.argv[1:] if argv is None else argv)) \
        + f" (after: {card.get('command', '')})"
    (out / "model_card.json").write_text(json.dumps(card, indent=2), encoding="utf-8")
    from screener.bundles import render_readme

    (out / "README.md").write_text(render_readme(card), encoding="utf-8")
    append_files_section(out, card["decomposition"])
    print(f"bundle written to {out}", flush=True)


def landmark_interval_main(argv: Sequence[str] | None = None) -> int:
    """``python -m training.hip_xray interval-landmarks BUNDLE --first 1200 --n 200``: refit the bundle's
    split-conformal interval (``intervals.femoral_neck_bmd``) on landmark crops of standard-profile patients
    of seed 1515 that neither its training nor its validation saw (a calibration set of its own), with the
    estimate as served (:func:`predict_all`'s decomposition + regression)."""
    ap = argparse.ArgumentParser(prog="python -m training.hip_xray interval-landmarks")
    ap.add_argument("command", choices=["interval-landmarks"])
    ap.add_argument("bundle")
    ap.add_argument("--first", type=int, default=1200)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--level", type=float, default=0.9)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args(list(sys.argv[1:] if argv is None else argv))
    from training.intervals import fit_conformal

    torch.set_num_threads(1)
    data = landmark_crop_data(1515, args.first, args.n, workers=args.workers)
    bundle = load_bundle(args.bundle, "cpu", networks=NETWORKS)
    gen, _, dec = load_aux(args.bundle)
    served = predict_all(bundle.models, gen, None, dec, data["x"].astype(np.float32)[:, None])["decomposition_regression"]
    rec = fit_conformal(data["y"].astype(np.float64), served, level=args.level)
    rec["unit"] = "hip (one estimate per femoral neck, as the daemon reports it)"
    rec["fitted_on"] = (f"landmark crops (true heads, 0.7 mm jitter) of {len(data['y'])} hips of standard-profile patients "
                        f"{args.first}-{args.first + args.n - 1} of seed 1515 (training.phantoms.xray_variety), neither "
                        "trained nor validated on")
    rec["calibration_pcc"] = _pcc(served, data["y"])
    card_path = Path(args.bundle) / "model_card.json"
    card = json.loads(card_path.read_text(encoding="utf-8"))
    card.setdefault("intervals", {})["femoral_neck_bmd"] = rec
    card_path.write_text(json.dumps(card, indent=2), encoding="utf-8")
    print(json.dumps({k: v for k, v in rec.items() if k != "method"}), flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    if len(sys.argv) > 1 and sys.argv[1] == "finetune-landmarks":
        sys.exit(landmark_finetune_main())
    if len(sys.argv) > 1 and sys.argv[1] == "interval-landmarks":
        sys.exit(landmark_interval_main())
    sys.exit(evaluate_main())
