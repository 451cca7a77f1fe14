"""Split-conformal prediction intervals of a regression bundle, fitted on out-of-fold validation
predictions and checked on the test split.

For a nominal level ``1 - alpha`` (0.9), the half-width ``q`` is the
``ceil((n + 1)(1 - alpha))``-th smallest absolute validation residual ``|truth - prediction|``
of the ``n`` validation samples, each predicted by the fold model that did not train on it
(the same samples :mod:`training.calibration` fits on; the calibration, when the card has one,
is applied first, as :meth:`screener.bundles.Bundle.predict` does).  Residuals are taken per
patient -- the mean over the patient's samples, which is what the daemon reports (l1_axial: the
mean of three slices; lumbar_sagittal: the L1-L4 mean of four vertebrae) -- so the interval
belongs to the patient-level estimate.  Under exchangeability the
interval ``prediction +/- q`` covers the truth of a new sample with probability >= 1 - alpha;
:func:`coverage` measures it on the test split (the ensemble mean, as served), which is never
fitted on.

``fold_range_limit`` is the 95th percentile of the spread of the fold models' predictions on
the validation samples: a served estimate whose folds spread wider is flagged
(:mod:`screener.uncertainty`).  On a validation sample every fold but one has seen it in
training, so this spread is an underestimate of the spread on new data; the flag is therefore
conservative (it fires early).

``input_stats`` is the range (0.5th to 99.5th percentile) of the per-image mean and SD of the
network inputs the fold models trained and validated on (never the test split): a served input
outside it, by more than :data:`INPUT_MARGIN` of the range, is flagged out of distribution.

``python -m training.intervals models/l1_axial`` rebuilds the recipe's data set (the cached
cohort of ``screener train``), fits, stores ``card["intervals"][<output>]`` and prints the test
coverage.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from training.calibration import finite_pairs

__all__ = ["coverage", "fit_bundle_intervals", "fit_conformal", "fit_hip_xray_intervals", "input_stats", "main",
           "per_patient"]

#: fraction of the training range an input statistic may lie outside it before it is flagged
INPUT_MARGIN = 0.1

METHOD = ("split-conformal: half-width = the ceil((n+1)(1-alpha))-th smallest |truth - prediction| "
          "of out-of-fold validation predictions")


def fit_conformal(truth: Sequence[float] | np.ndarray, predicted: Sequence[float] | np.ndarray, *,
                  level: float = 0.9) -> dict[str, Any]:
    """Half-width of a split-conformal interval at ``level`` from paired validation values.

    Parameters
    ----------
    truth, predicted : array-like
        Reference values and out-of-fold predictions (1-D, same length, >= 1 finite pair).
    level : float
        Nominal coverage in (0, 1).

    Returns
    -------
    dict
        ``{"level", "half_width", "n", "method"}``.

    Raises
    ------
    ValueError
        Unpaired inputs, ``level`` outside (0, 1), or too few samples for the level
        (``ceil((n + 1) level) > n``).
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"interval level must be in (0, 1) (got {level})")
    t, p = finite_pairs(truth, predicted)
    r = np.sort(np.abs(t - p))
    n = int(r.size)
    k = math.ceil((n + 1) * level)
    if k > n:
        raise ValueError(f"{n} validation samples are too few for a {100 * level:g} % interval "
                         f"(need at least {math.ceil(level / (1 - level))})")
    return {"level": float(level), "half_width": float(r[k - 1]), "n": n, "method": METHOD}


def input_stats(images: np.ndarray) -> dict[str, Any]:
    """Range of the per-image mean and SD of ``images`` (``(n, ...)``): 0.5th and 99.5th percentiles."""
    x = np.asarray(images, dtype=np.float64).reshape(len(images), -1)
    means, sds = x.mean(axis=1), x.std(axis=1)
    return {"mean": [float(np.percentile(means, 0.5)), float(np.percentile(means, 99.5))],
            "sd": [float(np.percentile(sds, 0.5)), float(np.percentile(sds, 99.5))],
            "n": int(len(x)), "margin": INPUT_MARGIN}


def per_patient(patient_ids: np.ndarray, truth: np.ndarray, predicted: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """Mean truth and mean prediction per patient (in order of first appearance): the daemon reports
    the mean over a patient's samples (l1_axial's slices, lumbar_sagittal's L1-L4)."""
    ids = np.asarray(patient_ids)
    _, first, inv = np.unique(ids, return_index=True, return_inverse=True)
    order = np.argsort(first)
    n = len(first)
    counts = np.bincount(inv, minlength=n)
    t = np.bincount(inv, weights=np.asarray(truth, dtype=np.float64), minlength=n) / counts
    p = np.bincount(inv, weights=np.asarray(predicted, dtype=np.float64), minlength=n) / counts
    return t[order], p[order]


def coverage(truth: Sequence[float] | np.ndarray, predicted: Sequence[float] | np.ndarray,
             half_width: float) -> float:
    """Fraction of samples whose truth lies within ``predicted +/- half_width``."""
    t = np.asarray(truth, dtype=np.float64).ravel()
    p = np.asarray(predicted, dtype=np.float64).ravel()
    ok = np.isfinite(t) & np.isfinite(p)
    if not ok.any():
        raise ValueError("no finite (truth, prediction) pair to check the coverage on")
    return float(np.mean(np.abs(t[ok] - p[ok]) <= half_width))


def fit_bundle_intervals(bundle_dir: str | Path, *, level: float = 0.9, device: str = "cpu",
                         dataset: Any = None, output: str | None = None) -> dict[str, Any]:
    """Fit a regression bundle's interval on its validation predictions; store it in the card.

    Parameters
    ----------
    bundle_dir : path
        A regression bundle (``models/l1_axial``).
    level : float
    device : str
    dataset : ArrayDataset, optional
        The recipe's full data set (default: :func:`training.plan.build_dataset` of the card's recipe).
    output : str, optional
        Output column (default: the first).

    Returns
    -------
    dict
        The record written to ``card["intervals"][output]``, with ``coverage_test`` and
        ``n_test`` (and ``coverage_holdout`` when the recipe holds a profile out).
    """
    from screener.bundles import CARD, README, load_bundle, render_readme
    from training.plan import build_dataset, split_plan
    from training.recipes import recipe_from_dict
    from training.trainer import predict

    bundle = load_bundle(bundle_dir, device)
    if bundle.task != "regression":
        raise ValueError(f"{bundle_dir}: prediction intervals need a regression bundle (task {bundle.task!r})")
    recipe = recipe_from_dict(bundle.card["recipe"], where=f"{bundle_dir}/model_card.json recipe")
    names = bundle.output_names
    name = output or names[0]
    j = names.index(name)
    ds = build_dataset(recipe) if dataset is None else dataset
    plan = split_plan(ds, recipe)
    folds = [f for f in plan.folds if f.repeat == 0]
    if len(folds) != len(bundle.models):
        raise ValueError(f"{bundle_dir}: {len(bundle.models)} fold models but the recipe gives {len(folds)} folds")
    bs = recipe.training.batch_size
    targets = np.asarray(ds.targets, dtype=np.float64).reshape(len(ds), -1)
    pids = np.asarray(ds.patient_ids)
    own, spread = [], []
    for k, fold in enumerate(folds):
        sub = ds.subset(fold.val)
        per_model = [bundle.apply_calibration(predict(m, sub, task="regression", device=device,
                                                      batch_size=bs))[:, j] for m in bundle.models]
        ids = pids[fold.val]
        own.append(per_patient(ids, targets[fold.val, j], per_model[k]))
        if len(per_model) > 1:
            spread.append(np.ptp(np.stack([per_patient(ids, targets[fold.val, j], pm)[1] for pm in per_model]),
                                 axis=0))
    tv = np.concatenate([t for t, _ in own])
    pv = np.concatenate([p for _, p in own])
    rec = fit_conformal(tv, pv, level=level)
    rec["unit"] = "patient (mean of the patient's samples, as the daemon reports it)"
    if spread:
        rec["fold_range_limit"] = float(np.percentile(np.concatenate(spread), 95))
    for label, ix in (("test", plan.test), ("holdout", plan.excluded)):
        if ix.size:
            sub = ds.subset(ix)
            pred = bundle.apply_calibration(predict(bundle.models, sub, task="regression", device=device,
                                                    batch_size=bs))[:, j]
            t_p, p_p = per_patient(pids[ix], targets[ix, j], pred)
            rec[f"coverage_{label}"] = coverage(t_p, p_p, rec["half_width"])
            rec[f"n_{label}"] = int(t_p.size)
    seen = np.setdiff1d(np.arange(len(ds)), np.concatenate([plan.test, plan.excluded]).astype(int))
    card_path = Path(bundle_dir) / CARD
    card = json.loads(card_path.read_text(encoding="utf-8"))
    card.setdefault("intervals", {})[name] = rec
    card["intervals"]["input_stats"] = input_stats(np.asarray(ds.images)[seen])
    card_path.write_text(json.dumps(card, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    (Path(bundle_dir) / README).write_text(render_readme(card), encoding="utf-8")
    return rec


def fit_hip_xray_intervals(bundle_dir: str | Path, *, level: float = 0.9) -> dict[str, Any]:
    """The hip_xray bundle's interval: its served estimate is the decomposition + regression
    combination (:func:`training.hip_xray.predict_all`), one per hip, so residuals are per hip on
    the recipe's validation hips; coverage on the test and held-out hips.  Stored as
    ``card["intervals"]["femoral_neck_bmd"]``."""
    from screener.bundles import CARD, load_bundle
    from training.plan import build_dataset, split_plan
    from training.hip_xray import NETWORKS, load_aux, predict_all
    from training.recipes import recipe_from_dict

    bundle = load_bundle(bundle_dir, "cpu", networks=NETWORKS)
    recipe = recipe_from_dict(bundle.card["recipe"], where=f"{bundle_dir}/model_card.json recipe")
    gen, base, dec = load_aux(bundle_dir)
    ds = build_dataset(recipe)
    plan = split_plan(ds, recipe)
    folds = [f for f in plan.folds if f.repeat == 0]
    y = np.asarray(ds.targets, dtype=np.float64).reshape(len(ds), -1)[:, 0]

    def served(ix: np.ndarray) -> np.ndarray:
        return np.asarray(predict_all(bundle.models, gen, None, dec, ds.subset(ix).images)
                          ["decomposition_regression"], dtype=np.float64).ravel()

    val = np.concatenate([f.val for f in folds])
    rec = fit_conformal(y[val], served(val), level=level)
    rec["unit"] = "hip (one estimate per femoral neck, as the daemon reports it)"
    for label, ix in (("test", plan.test), ("holdout", plan.excluded)):
        if ix.size:
            rec[f"coverage_{label}"] = coverage(y[ix], served(ix), rec["half_width"])
            rec[f"n_{label}"] = int(ix.size)
    card_path = Path(bundle_dir) / CARD
    card = json.loads(card_path.read_text(encoding="utf-8"))
    card.setdefault("intervals", {})["femoral_neck_bmd"] = rec
    card_path.write_text(json.dumps(card, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return rec


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m training.intervals BUNDLE [--level 0.9]``: fit, store and print the coverage."""
    ap = argparse.ArgumentParser(prog="python -m training.intervals", description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--level", type=float, default=0.9)
    ap.add_argument("--output", default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(list(sys.argv[1:] if argv is None else argv))
    if Path(args.bundle).name == "hip_xray":
        rec = fit_hip_xray_intervals(args.bundle, level=args.level)
    else:
        rec = fit_bundle_intervals(args.bundle, level=args.level, device=args.device, output=args.output)
    print(json.dumps({k: v for k, v in rec.items() if k != "method"}, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
