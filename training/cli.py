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
:class:`~training.trainer.ArrayDataset`).  :data:`DATASET_FACTORIES` is the
default registry; it is empty until the protocols' builders exist.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from training.recipes import DataSpec, Recipe, RecipeError, load_recipe, recipe_from_dict

__all__ = ["CUSTOM_TRAINERS", "DATASET_FACTORIES", "DatasetFactory", "build_dataset", "dataset_cache_dir", "evaluate_main", "evaluation_tables",
           "limit_torch_threads", "train_main"]

DatasetFactory = Callable[[Recipe], Any]  # -> training.trainer.ArrayDataset

#: protocol -> dataset builder, as ``"module:function"`` (imported on first use) or a callable.
#: Each builder lives in ``training/datasets/<protocol>.py``.
DATASET_FACTORIES: dict[str, DatasetFactory | str] = {
    "l1_axial": "training.datasets.l1_axial:build",
    "femur_coronal": "training.datasets.femur_coronal:build",
    "lumbar_sagittal": "training.datasets.lumbar_sagittal:build",
    "hip_xray": "training.datasets.hip_xray:build",
    "dxa_spine": "training.datasets.dxa_spine:build",
}

#: protocol -> its own training entry point (``"module:function"``), for protocols whose recipe
#: is not a plain fold ensemble (the BMD-GAN of ``hip_xray``).  Called as ``fn(recipe, args)``
#: and returns the exit status.
CUSTOM_TRAINERS: dict[str, str] = {
    "hip_xray": "training.hip_xray:train_recipe",
}

#: protocol -> extra tables printed by ``screener evaluate`` after the paper table
#: (``fn(["evaluate", BUNDLE, "--data", DATA]) -> exit status``): ``hip_xray`` compares
#: decomposition + regression with the PF-DRR fit and the direct baseline, by pose and after JPEG.
EXTRA_EVALUATIONS: dict[str, str] = {
    "hip_xray": "training.hip_xray:evaluate_main",
}

#: protocol -> step run on the written bundle after training (``fn(bundle_dir, device=...)``):
#: ``dxa_spine`` matches its fracture threshold to the minimum-T-score sensitivity (Nissinen);
#: ``l1_axial`` fits the linear calibration of its BMD on the validation predictions when the recipe
#: asks for it (``[bundle] preprocessing = { calibration = "linear" }``, :mod:`training.calibration`).
POST_TRAIN: dict[str, str] = {
    "dxa_spine": "training.datasets.dxa_spine:calibrate_fracture_threshold",
    "l1_axial": "training.calibration:calibrate_bundle",
}


def _resolve(ref: Any) -> Any:
    """Import ``"module:attr"`` references; return callables unchanged."""
    if not isinstance(ref, str):
        return ref
    import importlib

    module, _, attr = ref.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise CliError(f"cannot load {ref}: {exc}") from exc

PAPER_PROTOCOLS = ("l1_axial", "femur_coronal", "lumbar_sagittal", "dxa_spine", "hip_xray")


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


def _factory(protocol: str, factories: Mapping[str, DatasetFactory] | None) -> DatasetFactory:
    table = DATASET_FACTORIES if factories is None else factories
    if protocol not in table:
        known = ", ".join(sorted(table)) or "none yet"
        raise CliError(f"protocol {protocol!r} has no dataset builder yet (registered: {known}); "
                       "add one to training.cli.DATASET_FACTORIES")
    return _resolve(table[protocol])


def dataset_cache_dir() -> Path | None:
    """Folder of cached cohort data sets (``SCREENER_DATASET_CACHE``; ``0`` disables caching).

    Default ``~/.cache/screener/datasets``.
    """
    import os

    env = os.environ.get("SCREENER_DATASET_CACHE", "")
    if env == "0":
        return None
    return Path(env).expanduser() if env else Path.home() / ".cache" / "screener" / "datasets"


def build_dataset(recipe: Recipe, factories: Mapping[str, DatasetFactory] | None = None) -> Any:
    """The recipe's data set from its protocol's builder, cached for cohort sources.

    Rendering the virtual cohort is the slow part of ``screener train``; ``screener evaluate
    --data test|holdout`` rebuilds the same samples, so a cohort data set is cached as
    ``.npz`` keyed by the protocol, the ``[data]`` section, the builder's source code and
    the sources of the shared preprocessing (``screener/preprocess``) and the phantom
    (``training/phantoms``), so a changed builder, preprocessing step or phantom never reads
    a stale cache.  Site manifests are never cached.
    """
    import hashlib
    import inspect

    from training.trainer import ArrayDataset

    factory = _factory(recipe.protocol, factories)
    cache = dataset_cache_dir() if recipe.data.source == "cohort" else None
    if cache is None:
        return factory(recipe)
    try:
        code = inspect.getsource(inspect.getmodule(factory))  # type: ignore[arg-type]
    except (OSError, TypeError):
        return factory(recipe)
    roots = [Path(__file__).resolve().parents[1] / "screener" / "preprocess", Path(__file__).resolve().parent / "phantoms"]
    code += "".join(f.read_text() for root in roots for f in sorted(root.rglob("*.py")))
    key = hashlib.sha256(json.dumps([recipe.protocol, dataclasses.asdict(recipe.data), code],
                                    sort_keys=True, default=str).encode()).hexdigest()[:20]
    path = cache / f"{recipe.protocol}-{key}.npz"
    if path.is_file():
        print(f"data set from cache {path}", file=sys.stderr)
        return ArrayDataset.load_npz(path)
    ds = factory(recipe)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    ds.save_npz(tmp)
    tmp.replace(path)
    return ds


def _holdout_mask(ds: Any, recipe: Recipe) -> np.ndarray | None:
    hold = recipe.data.holdout_profiles
    if not hold:
        return None
    if "profile" not in ds.attributes:
        raise CliError(f"[data] holdout_profiles is set but the {recipe.protocol} dataset builder "
                       "gives no per-sample 'profile' attribute")
    return np.isin(np.asarray(ds.attributes["profile"]).astype(str), list(hold))


def _plan(ds: Any, recipe: Recipe) -> Any:
    from training.folds import make_splits

    t = recipe.training
    return make_splits(ds.patient_ids, mode=t.split, folds=t.folds, repeats=t.repeats,
                       val_fraction=t.val_fraction, test_fraction=t.test_fraction, seed=recipe.seed,
                       strata=ds.strata if t.stratify else None, exclude=_holdout_mask(ds, recipe))


def evaluation_tables(protocol: str, task: str, y_true: np.ndarray, y_pred: np.ndarray, *,
                      patient_ids: Sequence[Any] | None = None,
                      outputs: Sequence[str] = (),
                      thresholds: Mapping[str, float] | None = None) -> dict[str, list[dict[str, Any]]]:
    """The paper's table(s) for a protocol, or task-generic metrics for any other protocol.

    Parameters
    ----------
    protocol, task : str
    y_true : numpy.ndarray
        Targets as in the data set.
    y_pred : numpy.ndarray
        ``(N, K)`` ensemble output (values or probabilities).
    patient_ids : sequence, optional
    outputs : sequence of str
        Output names (``dxa_spine``: the task of each column).
    thresholds : mapping, optional
        ``dxa_spine``: task -> probability threshold (the bundle's calibrated fracture threshold).

    Returns
    -------
    dict
        Table name -> rows (see :func:`training.metrics.paper_table`).
    """
    from training import metrics as M

    y_pred = np.asarray(y_pred, dtype=np.float64)
    if protocol == "dxa_spine":
        t = np.asarray(y_true).reshape(len(y_true), -1)
        names = list(outputs) or ["scoliosis"]
        return {f"dxa_spine {n}": M.paper_table("dxa_spine", t[:, j], y_pred[:, j], task=n,
                                                threshold=(thresholds or {}).get(n))
                for j, n in enumerate(names)}
    if protocol in ("l1_axial", "hip_xray"):
        return {protocol: M.paper_table(protocol, np.asarray(y_true).ravel(), y_pred[:, 0])}
    if protocol == "femur_coronal":
        return {protocol: M.paper_table(protocol, y_true, y_pred)}
    if protocol == "lumbar_sagittal":
        from training.phantoms.labels import YAM_L1L4  # the young-adult mean the labels use

        return {protocol: M.paper_table(protocol, y_true, y_pred, patient_ids=patient_ids, yam=YAM_L1L4)}
    return {protocol: M.generic_table(task, y_true, y_pred, outputs=outputs or None)}


def _markdown(tables: Mapping[str, list[dict[str, Any]]], heading: str) -> dict[str, str]:
    from training.metrics import markdown_table

    return {f"{name} — {heading}": markdown_table(rows) for name, rows in tables.items()}


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


def limit_torch_threads(default: int = 0) -> int:
    """Cap torch's intra-op threads for training and evaluation; returns the number set.

    The small networks here gain little from many threads, and on a shared 2-core machine
    torch's default (one thread per core, spinning) made an epoch about 4x slower than one
    thread.  ``SCREENER_TORCH_THREADS`` overrides ``default`` (a recipe's ``[training]
    torch_threads``), and that overrides half the CPU cores (at least 1).
    """
    import torch

    env = os.environ.get("SCREENER_TORCH_THREADS", "").strip()
    try:
        n = int(env) if env else (int(default) if default > 0 else max(1, (os.cpu_count() or 2) // 2))
    except ValueError:
        raise CliError(f"SCREENER_TORCH_THREADS must be a whole number of threads (got {env!r})") from None
    torch.set_num_threads(max(1, n))
    return max(1, n)


def _train(args: argparse.Namespace, factories: Mapping[str, DatasetFactory] | None,
           networks: Mapping[str, Callable[..., Any]] | None) -> int:
    from screener.bundles import InputSpec, build_network, save_bundle
    from training.trainer import predict, train_folds

    recipe = load_recipe(args.recipe)
    if recipe.training.torch_threads:
        limit_torch_threads(recipe.training.torch_threads)
    if factories is None and recipe.protocol in CUSTOM_TRAINERS:
        return int(_resolve(CUSTOM_TRAINERS[recipe.protocol])(recipe, args))
    ds = build_dataset(recipe, factories)
    plan = _plan(ds, recipe)
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
        metrics["tables"].update(_markdown(tables, f"{label} ({idx.size} samples, synthetic)"))
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
    if factories is None and recipe.protocol in POST_TRAIN:
        _resolve(POST_TRAIN[recipe.protocol])(bundle_dir, device="cpu")
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
        Protocol -> dataset builder (default :data:`DATASET_FACTORIES`).
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
            plan = _plan(full, recipe)
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
        md.update(_markdown(tables, f"{glabel} ({idx.size} samples)"))
    text = "".join(f"## {name}\n\n{table}\n" for name, table in md.items())
    header = (f"# {bundle.bundle_id} evaluation\n\n{card.get('training_data', '')}. "
              "Numbers on synthetic data are not clinical accuracy.\n\n")
    print(header + text)
    if factories is None and bundle.protocol in EXTRA_EVALUATIONS and data in ("test", "holdout"):
        sys.stdout.flush()
        status = _resolve(EXTRA_EVALUATIONS[bundle.protocol])(["evaluate", str(args.bundle), "--data", data])
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
