"""``screener train`` and ``screener evaluate``.

``screener train RECIPE.toml [--out models/] [--resume]`` builds the recipe's
data set with the protocol's dataset builder, holds out the test patients (and
any held-out scanner profile), trains the folds, evaluates the fold ensemble on
the test set with the paper's table, and writes the bundle ``<out>/<protocol>/``.

``screener evaluate BUNDLE --data DATA`` prints the paper's table for a bundle
(and writes scatter / Bland-Altman PNGs and ``results.md`` with ``--out``).
``DATA`` is one of

* ``test`` -- the bundle's own held-out test patients, rebuilt from the recipe
  in its model card (same seed, same split);
* ``holdout`` -- the samples of the recipe's ``holdout_profiles`` (a scanner
  profile the training never saw);
* a ``.npz`` file written by :meth:`training.trainer.ArrayDataset.save_npz`;
* a site manifest ``.csv`` (built by the protocol's dataset builder).

Dataset builders are passed in as ``dataset_factories`` (protocol -> callable
taking the :class:`~training.recipes.Recipe` and returning an
:class:`~training.trainer.ArrayDataset`).  :data:`training.plan.DATASET_FACTORIES` is the
default registry, read from the protocols' training specs (``training/protocols/<name>.py``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from training import plan as registries
from training.plan import (DatasetFactory, SetupError, build_dataset, evaluation_tables, limit_torch_threads,
                           markdown_sections, resolve_ref, split_plan)
from training.recipes import DataSpec, Recipe, RecipeError, load_recipe, recipe_from_dict

__all__ = ["CliError", "evaluate_main", "train_main"]

#: the user-facing error of training's command line (printed without a traceback, exit status 2)
CliError = SetupError

def _plots(out: Path, tag: str, task: str, y_true: np.ndarray, y_pred: np.ndarray,
           outputs: Sequence[str], units: Sequence[str]) -> list[Path]:
    if task != "regression":
        return []
    from training.plots import bland_altman_plot, scatter_plot

    t = np.asarray(y_true, dtype=np.float64).reshape(len(y_true), -1)
    files = []
    for j in range(t.shape[1]):
        name = outputs[j] if j < len(outputs) else f"output{j}"
        unit = units[j] if j < len(units) else ""
        u = f" ({unit})" if unit else ""
        files.append(scatter_plot(t[:, j], y_pred[:, j], out / f"{tag}-{name}-scatter.png",
                                  title=f"{name} {tag}", xlabel=f"reference {name}{u}", ylabel=f"estimate {name}{u}"))
        files.append(bland_altman_plot(t[:, j], y_pred[:, j], out / f"{tag}-{name}-bland-altman.png",
                                       title=f"{name} {tag}", unit=unit))
    return files


def _outputs(recipe: Recipe, ds: Any, n_out: int) -> tuple[list[str], list[str]]:
    names = list(recipe.bundle.outputs) or list(ds.meta.get("outputs", [])) or [f"output{j}" for j in range(n_out)]
    units = list(recipe.bundle.units) or list(ds.meta.get("units", [])) or [""] * len(names)
    return names, units


def _train(args: argparse.Namespace, factories: Mapping[str, DatasetFactory] | None,
           networks: Mapping[str, Callable[..., Any]] | None) -> int:
    from screener.bundles import InputSpec, build_network, save_bundle
    from training.trainer import predict, train_folds

    recipe = load_recipe(args.recipe)
    if recipe.training.torch_threads:
        limit_torch_threads(recipe.training.torch_threads)
    custom = registries.CUSTOM_TRAINERS
    if factories is None and recipe.protocol in custom:
        return int(resolve_ref(custom[recipe.protocol])(recipe, args))
    ds = build_dataset(recipe, factories)
    plan = split_plan(ds, recipe)
    out_root = Path(args.out)
    ckpt_dir = Path(args.checkpoints) if args.checkpoints else out_root / ".checkpoints" / f"{recipe.protocol}-{recipe.variant}"
    device = args.device or recipe.training.device

    def build() -> Any:
        return build_network(recipe.network.name, recipe.network.kwargs, networks)

    print(f"{recipe.protocol} ({recipe.variant}): {len(ds)} samples, {len(np.unique(ds.patient_ids))} patients; "
          f"test {plan.test.size} samples, held-out profile {plan.excluded.size}; {len(plan.folds)} folds",
          file=sys.stderr)
    kf = train_folds(recipe, ds, plan, build, checkpoint_dir=ckpt_dir, resume=args.resume, device=device,
                     progress=not args.no_progress, stop_after=args.stop_after)
    if not all(r.finished for r in kf.results):
        print(f"stopped after {args.stop_after} epoch(s) per fold; continue with --resume "
              f"(checkpoints in {ckpt_dir})", file=sys.stderr)
        return 3
    ensemble = kf.ensemble
    n_out = next(iter(kf.val_predictions.values())).shape[1]
    names, units = _outputs(recipe, ds, n_out)
    bundle_dir = out_root / recipe.protocol
    metrics: dict[str, Any] = {"split": plan.to_dict(), "folds": kf.summary(), "tables": {}, "rows": {}}
    evaluations = [("test", plan.test)]
    if plan.excluded.size:
        evaluations.append(("holdout profile " + ",".join(recipe.data.holdout_profiles), plan.excluded))
    for label, idx in evaluations:
        if idx.size == 0:
            continue
        sub = ds.subset(idx)
        pred = predict(ensemble, sub, task=recipe.task, device=device, batch_size=recipe.training.batch_size)
        tables = evaluation_tables(recipe.protocol, recipe.task, sub.targets, pred,
                                   patient_ids=sub.patient_ids, outputs=names)
        metrics["rows"][label] = tables
        metrics["tables"].update(markdown_sections(tables, f"{label} ({idx.size} samples, synthetic)"))
        _plots(bundle_dir / "evaluation", label.split()[0], recipe.task, sub.targets, pred, names, units)
    b = recipe.bundle
    spec = InputSpec(
        shape=tuple(int(s) for s in ds.images.shape[1:]),
        spacing_mm=tuple(b.spacing_mm) or tuple(ds.meta.get("spacing_mm", ())),
        window=({"center": b.window_center, "width": b.window_width} if b.window_width
                else dict(ds.meta.get("window", {}))),
        extras=tuple(ds.meta.get("extras", ())) or (tuple(f"extra{j}" for j in range(ds.extras.shape[1]))
                                                    if ds.extras is not None else ()),
        value_range=tuple(ds.meta.get("value_range", ())),
    )
    tref = {"mean": b.t_score_mean, "sd": b.t_score_sd, "source": b.t_score_reference} if b.t_score_sd else {}
    loss_card = kf.results[0].loss_card if kf.results else {}
    save_bundle(
        bundle_dir, protocol=recipe.protocol, models=ensemble,
        architecture={"name": recipe.network.name, "kwargs": recipe.network.kwargs},
        input_spec=spec, outputs=names, units=units, task=recipe.task,
        preprocessing={**ds.meta.get("preprocessing", {}), **b.preprocessing},
        t_score_reference=tref, recipe=recipe.to_dict(),
        command=f"screener train {args.recipe} --out {args.out}", seed=recipe.seed,
        metrics={**metrics, "loss_fit_fold0": loss_card}, version=b.version,
        differences_from_paper=b.differences_from_paper, changelog={str(k): str(v) for k, v in b.changelog.items()} or None,
        extra={"data_source": {"source": recipe.data.source, "n": recipe.data.n, "seed": recipe.data.seed,
                               "profiles": list(recipe.data.profiles),
                               "holdout_profiles": list(recipe.data.holdout_profiles)}},
    )
    post_train = registries.POST_TRAIN
    if factories is None and recipe.protocol in post_train:
        resolve_ref(post_train[recipe.protocol])(bundle_dir, device="cpu")
    for name, md in metrics["tables"].items():
        print(f"\n## {name}\n\n{md}")
    print(f"bundle written to {bundle_dir}")
    return 0


def train_main(argv: Sequence[str] | None = None, *,
               dataset_factories: Mapping[str, DatasetFactory] | None = None,
               networks: Mapping[str, Callable[..., Any]] | None = None) -> int:
    """``screener train RECIPE.toml [--out models/] [--resume]``; returns the exit status.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments after ``train`` (default ``sys.argv[1:]``).
    dataset_factories : mapping, optional
        Protocol -> dataset builder (default :data:`training.plan.DATASET_FACTORIES`).
    networks : mapping, optional
        Extra network factories by name (besides ``screener.nets``).

    Returns
    -------
    int
        0 on success, 2 on a usage/recipe error, 3 when stopped by ``--stop-after``.
    """
    ap = argparse.ArgumentParser(prog="screener train", description="train a protocol's fold ensemble from a recipe")
    ap.add_argument("recipe", help="recipe TOML, e.g. training/recipes/l1_axial-cohort.toml")
    ap.add_argument("--out", default="models", help="bundle root; the bundle goes to OUT/<protocol>/ (default models)")
    ap.add_argument("--resume", action="store_true", help="continue from the checkpoints of an interrupted run")
    ap.add_argument("--checkpoints", default="", help="checkpoint folder (default OUT/.checkpoints/<protocol>-<variant>)")
    ap.add_argument("--device", default="", help="auto, cpu or cuda (default: the recipe's)")
    ap.add_argument("--stop-after", type=int, default=None, help="train at most this many epochs per fold, then stop")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        limit_torch_threads()
        return _train(args, dataset_factories, networks)
    except (CliError, RecipeError) as exc:
        print(f"screener train: {exc}", file=sys.stderr)
        return 2


def _evaluate(args: argparse.Namespace, factories: Mapping[str, DatasetFactory] | None,
              networks: Mapping[str, Callable[..., Any]] | None) -> int:
    from screener.bundles import load_bundle
    from training.trainer import ArrayDataset

    bundle = load_bundle(args.bundle, args.device, networks=networks)
    card = bundle.card
    data = args.data
    recipe: Recipe | None = None
    if card.get("recipe"):
        try:
            recipe = recipe_from_dict(card["recipe"], where=f"{args.bundle}/model_card.json recipe")
        except RecipeError as exc:
            raise CliError(str(exc)) from exc
    if data.endswith(".npz"):
        ds = ArrayDataset.load_npz(data)
        label = Path(data).name
    elif data in ("test", "holdout") or data.endswith(".csv"):
        if recipe is None:
            raise CliError(f"{args.bundle}: the model card has no recipe; pass --data FILE.npz")
        if data.endswith(".csv"):
            r = dataclasses.replace(recipe, data=DataSpec(source="manifest", path=str(Path(data).resolve())))
            ds = build_dataset(r, factories)
            label = Path(data).name
        else:
            full = build_dataset(recipe, factories)
            plan = split_plan(full, recipe)
            idx = plan.test if data == "test" else plan.excluded
            if idx.size == 0:
                raise CliError(f"the recipe has no {'test set' if data == 'test' else 'holdout_profiles'}")
            ds = full.subset(idx)
            label = "test" if data == "test" else "holdout profile " + ",".join(recipe.data.holdout_profiles)
    else:
        raise CliError(f"--data {data!r}: give test, holdout, a .npz file or a manifest .csv")
    pred = bundle.predict(ds.images, ds.extras)
    names = bundle.output_names
    calibrated = card.get("preprocessing", {}).get("fracture_threshold")
    thresholds = {"fracture": float(calibrated)} if calibrated is not None else None
    units = list(card["outputs"].get("units", []))
    groups: list[tuple[str, np.ndarray]] = [(label, np.arange(len(ds)))]
    if args.by:
        if args.by not in ds.attributes:
            raise CliError(f"--by {args.by}: the data set has no such attribute (has: {sorted(ds.attributes)})")
        vals = np.asarray(ds.attributes[args.by]).astype(str)
        groups += [(f"{label}, {args.by}={v}", np.flatnonzero(vals == v)) for v in np.unique(vals)]
    md: dict[str, str] = {}
    rows_out: dict[str, Any] = {}
    for glabel, idx in groups:
        try:
            tables = evaluation_tables(bundle.protocol, bundle.task, ds.targets[idx], pred[idx],
                                       patient_ids=ds.patient_ids[idx], outputs=names,
                                       thresholds=thresholds)
        except ValueError as exc:
            print(f"{glabel}: no table ({exc})", file=sys.stderr)
            continue
        rows_out[glabel] = tables
        md.update(markdown_sections(tables, f"{glabel} ({idx.size} samples)"))
    text = "".join(f"## {name}\n\n{table}\n" for name, table in md.items())
    header = (f"# {bundle.bundle_id} evaluation\n\n{card.get('training_data', '')}. "
              "Numbers on synthetic data are not clinical accuracy.\n\n")
    print(header + text)
    extra = registries.EXTRA_EVALUATIONS
    if factories is None and bundle.protocol in extra and data in ("test", "holdout"):
        sys.stdout.flush()
        status = resolve_ref(extra[bundle.protocol])(["evaluate", str(args.bundle), "--data", data])
        if status:
            return int(status)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.md").write_text(header + text, encoding="utf-8")
        (out / "results.json").write_text(json.dumps(rows_out, indent=2, default=float) + "\n", encoding="utf-8")
        _plots(out, "eval", bundle.task, ds.targets, pred, names, units)
    return 0


def evaluate_main(argv: Sequence[str] | None = None, *,
                  dataset_factories: Mapping[str, DatasetFactory] | None = None,
                  networks: Mapping[str, Callable[..., Any]] | None = None) -> int:
    """``screener evaluate BUNDLE --data {test,holdout,FILE.npz,MANIFEST.csv} [--out DIR]``.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments after ``evaluate``.
    dataset_factories, networks : mapping, optional
        As :func:`train_main`.

    Returns
    -------
    int
        0 on success, 2 on a usage error.
    """
    ap = argparse.ArgumentParser(prog="screener evaluate", description="print a bundle's evaluation table")
    ap.add_argument("bundle", help="bundle folder, e.g. models/l1_axial")
    ap.add_argument("--data", required=True, help="test | holdout | FILE.npz | MANIFEST.csv")
    ap.add_argument("--out", default="", help="write results.md, results.json and PNG plots here")
    ap.add_argument("--by", default="", help="also tabulate per value of this sample attribute (e.g. profile)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    args = ap.parse_args(list(sys.argv[1:] if argv is None else argv))
    from screener.bundles import BundleError

    try:
        limit_torch_threads()
        return _evaluate(args, dataset_factories, networks)
    except (CliError, RecipeError, BundleError) as exc:
        print(f"screener evaluate: {exc}", file=sys.stderr)
        return 2
