"""Linear calibration (de-shrinkage) of a regression bundle, fitted on out-of-fold validation predictions.

A regressor trained with a (Huber / squared) loss on a unimodal target shrinks
its estimates towards the training mean: low values read too high and high
values too low, which costs sensitivity at a low threshold (Kang's T < -1).
:func:`fit_linear` fits a straight line between the truth and the prediction of
samples the models did not train on -- each split's *validation* patients,
predicted by that split's own model (never the test set or a held-out scanner)
-- and returns the map ``calibrated = intercept + slope * predicted``.

Two fits are offered:

``"inverse"`` (default)
    Least squares of the *prediction on the truth* (``pred ~ a + b * truth``),
    inverted: ``calibrated = (pred - a) / b``.  It undoes the shrinkage
    factor ``b`` itself, and noise in the prediction does not bias ``b``
    (it is on the dependent side), so a line fitted on single-model
    validation predictions also fits the less noisy ensemble mean.
``"direct"``
    Least squares of the *truth on the prediction* (``truth ~ a + b * pred``):
    the minimum-squared-error map for a prediction as noisy as the fitted
    one; with noisy single-model predictions it shrinks again.

A positive linear map leaves Pearson's r unchanged; it moves the estimates
across a fixed threshold (the T-score cut-off) and changes MAPE and the bias.

The record :func:`fit_linear` returns is what the model card stores as
``card["calibration"]``; :meth:`screener.bundles.Bundle.predict` applies it to
the ensemble output.  :func:`calibrate_bundle` is the post-train hook
(:data:`training.plan.POST_TRAIN`): it recomputes the validation predictions
from the bundle's own (float16) fold weights and the recipe's split plan,
fits, writes the card and prints the calibrated test / held-out tables.
It runs only when the recipe asks for it: ``[bundle] preprocessing =
{ calibration = "linear" }`` (optionally ``calibration_fit = "direct"``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["FITS", "apply_linear", "calibrate_bundle", "fit_linear", "main"]

#: supported fits (see the module docstring)
FITS = ("inverse", "direct")
#: what the card's ``fitted_on`` says
FITTED_ON = "validation predictions of each split's model (out-of-fold; no test or held-out-scanner sample)"


def finite_pairs(truth: Sequence[float], predicted: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The (truth, prediction) pairs where both are finite, as float64 arrays.

    Raises
    ------
    ValueError
        When the two do not pair up (different sizes).
    """
    t = np.asarray(truth, dtype=np.float64).ravel()
    p = np.asarray(predicted, dtype=np.float64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"truth and predictions must pair up (got {t.size} and {p.size} values)")
    ok = np.isfinite(t) & np.isfinite(p)
    return t[ok], p[ok]


def fit_linear(truth: Sequence[float] | np.ndarray, predicted: Sequence[float] | np.ndarray, *,
               fit: str = "inverse") -> dict[str, Any]:
    """Fit the linear calibration ``calibrated = intercept + slope * predicted``.

    Parameters
    ----------
    truth, predicted : array-like
        Reference values and the model's estimates of the same samples (1-D, same length,
        at least 3 finite pairs, the truth not constant).
    fit : {"inverse", "direct"}
        ``"inverse"``: least squares of the prediction on the truth, inverted;
        ``"direct"``: least squares of the truth on the prediction.

    Returns
    -------
    dict
        ``{"kind": "linear", "fit", "slope", "intercept", "n", "raw_fit"}``; ``raw_fit`` is
        the fitted line itself (``{"a", "b", "model"}``).

    Raises
    ------
    ValueError
        When the inputs are not paired 1-D arrays with enough spread, ``fit`` is unknown,
        or the fitted slope is not positive (the predictions do not increase with the truth).
    """
    if fit not in FITS:
        raise ValueError(f"calibration fit must be one of {', '.join(FITS)} (got {fit!r})")
    t, p = finite_pairs(truth, predicted)
    if t.size < 3:
        raise ValueError(f"a linear calibration needs at least 3 finite (truth, prediction) pairs (got {t.size})")
    x, y = (t, p) if fit == "inverse" else (p, t)
    vx = float(np.var(x))
    if not vx > 0:
        raise ValueError(f"cannot fit a calibration line: the {'truth' if fit == 'inverse' else 'predictions'} "
                         "do not vary")
    b = float(np.mean((x - x.mean()) * (y - y.mean())) / vx)
    a = float(y.mean() - b * x.mean())
    if not b > 0:
        raise ValueError(f"calibration slope {b:.4g} is not positive: the predictions do not follow the truth; "
                         "check the model before calibrating it")
    if fit == "inverse":
        slope, intercept, model = 1.0 / b, -a / b, "predicted = a + b * truth"
    else:
        slope, intercept, model = b, a, "truth = a + b * predicted"
    return {"kind": "linear", "fit": fit, "slope": slope, "intercept": intercept, "n": int(t.size),
            "raw_fit": {"a": a, "b": b, "model": model}}


def apply_linear(record: dict[str, Any], predicted: np.ndarray | float) -> np.ndarray:
    """``intercept + slope * predicted`` of a :func:`fit_linear` record (any shape)."""
    return float(record["intercept"]) + float(record["slope"]) * np.asarray(predicted, dtype=np.float64)


def _settings(recipe: Any) -> tuple[str, str]:
    pp = dict(getattr(recipe.bundle, "preprocessing", {}) or {})
    kind = str(pp.get("calibration", "none")).lower()
    fit = str(pp.get("calibration_fit", "inverse")).lower()
    if kind not in ("none", "linear"):
        raise ValueError(f"[bundle] preprocessing calibration = {kind!r}: use \"linear\" or \"none\"")
    if fit not in FITS:
        raise ValueError(f"[bundle] preprocessing calibration_fit = {fit!r}: use one of {', '.join(FITS)}")
    return kind, fit


def calibrate_bundle(bundle_dir: str | Path, *, device: str = "cpu", dataset: Any = None,
                     fit: str | None = None, output: str | None = None) -> dict[str, Any]:
    """Post-train hook: fit the linear calibration on out-of-fold validation predictions, store it in the card.

    The recipe in the card rebuilds the data set (the cached cohort of ``screener train``) and
    the split plan; each fold model of the bundle (its float16 weights, as served) predicts its
    own validation patients.  The pooled (truth, prediction) pairs give the line
    (:func:`fit_linear`); ``model_card.json`` gets ``calibration`` and ``README.md`` is
    re-rendered.  The uncalibrated and calibrated tables of the validation, test and held-out
    samples are printed and stored with the record (the test and held-out samples are only
    reported, never fitted).

    Parameters
    ----------
    bundle_dir : path
        A regression bundle, e.g. ``models/l1_axial``.
    device : str
    dataset : ArrayDataset, optional
        The recipe's full data set (default: :func:`training.plan.build_dataset` of the card's recipe).
    fit : {"inverse", "direct"}, optional
        Overrides the recipe's ``calibration_fit``; giving it also calibrates a recipe without
        ``calibration = "linear"``.
    output : str, optional
        Output column to calibrate (default: the first).

    Returns
    -------
    dict
        The ``calibration`` record written to the card (empty when the recipe does not ask for one).

    Raises
    ------
    ValueError
        When the bundle is not a regression bundle, or its folds do not match the recipe's plan.
    """
    from screener.bundles import CARD, README, load_bundle, render_readme
    from training.plan import build_dataset, evaluation_tables, markdown_sections, split_plan
    from training.recipes import recipe_from_dict
    from training.trainer import predict

    bundle = load_bundle(bundle_dir, device)
    recipe = recipe_from_dict(bundle.card["recipe"], where=f"{bundle_dir}/model_card.json recipe")
    kind, recipe_fit = _settings(recipe)
    if fit is None and kind == "none":
        print(f"{bundle_dir}: no output calibration ([bundle] preprocessing calibration = \"none\")", file=sys.stderr)
        return {}
    fit = fit or recipe_fit
    if bundle.task != "regression":
        raise ValueError(f"{bundle_dir}: a linear calibration needs a regression bundle (task {bundle.task!r})")
    names = bundle.output_names
    name = output or names[0]
    if name not in names:
        raise ValueError(f"{bundle_dir}: no output {name!r} to calibrate (outputs: {', '.join(names)})")
    j = names.index(name)
    ds = build_dataset(recipe) if dataset is None else dataset
    plan = split_plan(ds, recipe)
    folds = [f for f in plan.folds if f.repeat == 0]
    if len(folds) != len(bundle.models):
        raise ValueError(f"{bundle_dir}: {len(bundle.models)} fold models but the recipe gives {len(folds)} folds "
                         "of repeat 0; was the bundle trained from this recipe?")
    bs = recipe.training.batch_size
    idx, preds = [], []
    for fold, model in zip(folds, bundle.models):
        preds.append(predict(model, ds.subset(fold.val), task="regression", device=device, batch_size=bs))
        idx.append(fold.val)
    vi = np.concatenate(idx)
    pv = np.concatenate(preds)
    tv = np.asarray(ds.targets, dtype=np.float64).reshape(len(ds), -1)[vi, j]
    rec = fit_linear(tv, pv[:, j], fit=fit)
    rec.update({"output": name, "fitted_on": FITTED_ON,
                "n_patients": len(np.unique(np.asarray(ds.patient_ids)[vi])),
                "applied": f"{name} = intercept + slope x ensemble mean (screener.bundles.Bundle.predict)"})

    bundle.card["calibration"] = rec  # the tables below apply it exactly as Bundle.predict will

    groups = [("validation (out-of-fold, single models)", ds.targets[vi], pv, np.asarray(ds.patient_ids)[vi])]
    evals = [("test", plan.test)]
    if plan.excluded.size:
        evals.append(("holdout profile " + ",".join(recipe.data.holdout_profiles), plan.excluded))
    for label, ix in evals:
        if ix.size:
            sub = ds.subset(ix)
            groups.append((label, sub.targets, predict(bundle.models, sub, task="regression", device=device,
                                                        batch_size=bs), sub.patient_ids))
    tables: dict[str, str] = {}
    for label, y, p, pid in groups:
        for tag, q in (("uncalibrated", p), ("calibrated", bundle.apply_calibration(p))):
            t = evaluation_tables(bundle.protocol, "regression", y, q, patient_ids=pid, outputs=names)
            tables.update(markdown_sections(t, f"{label}, {tag} ({len(y)} samples, synthetic)"))
    rec["tables"] = tables
    card_path = Path(bundle_dir) / CARD
    card = json.loads(card_path.read_text(encoding="utf-8"))
    card["calibration"] = rec
    card_path.write_text(json.dumps(card, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    (Path(bundle_dir) / README).write_text(render_readme(card), encoding="utf-8")
    print(f"\ncalibration of {name} ({fit} fit on {rec['n']} validation samples of {rec['n_patients']} patients): "
          f"calibrated = {rec['intercept']:+.5f} + {rec['slope']:.5f} x predicted", file=sys.stderr)
    for title, md in tables.items():
        print(f"\n## {title}\n\n{md}")
    return rec


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m training.calibration BUNDLE [--fit inverse|direct]``: (re)fit and store a bundle's calibration."""
    ap = argparse.ArgumentParser(prog="python -m training.calibration",
                                 description="fit a regression bundle's linear calibration on its validation predictions")
    ap.add_argument("bundle", help="bundle folder, e.g. models/l1_axial")
    ap.add_argument("--fit", choices=FITS, default=None, help="default: the recipe's calibration_fit (inverse)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(list(sys.argv[1:] if argv is None else argv))
    rec = calibrate_bundle(args.bundle, device=args.device, fit=args.fit)
    if not rec:
        print(f"{args.bundle}: the recipe does not ask for a calibration ([bundle] preprocessing calibration); "
              "pass --fit to fit one anyway", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
