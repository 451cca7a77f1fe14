"""What a training run is made of: the protocols' data-set builders and special steps, the data
set (cached), the split plan and the evaluation tables.

The command line (:mod:`training.cli`: ``screener train`` / ``screener evaluate``) and the
library modules that rebuild a bundle's data (:mod:`training.calibration`,
:mod:`training.intervals`, :mod:`training.hip_xray`, the data-set builders) all use these.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from training.protocols import specs
from training.recipes import Recipe

__all__ = ["CUSTOM_TRAINERS", "DATASET_FACTORIES", "DatasetFactory", "EXTRA_EVALUATIONS", "PAPER_PROTOCOLS",
           "POST_TRAIN", "SetupError", "build_dataset", "dataset_cache_dir", "evaluation_tables",
           "limit_torch_threads", "markdown_sections", "resolve_ref", "split_plan"]

DatasetFactory = Callable[[Recipe], Any]  # -> training.trainer.ArrayDataset

# The registries below are read from the training specs (training/protocols/<name>.py and the
# site packages' ``screener.training_protocols`` entry points, found by training.protocols.specs)
# each time they are asked for, so a spec installed after this import is seen; no protocol is
# listed here by hand.
#
# DATASET_FACTORIES: protocol -> data-set builder, ``"module:function"`` (imported on first use) or a
#   callable; each builder lives in ``training/datasets/<protocol>.py`` (or the site's package).
# CUSTOM_TRAINERS: protocol -> its own training entry point (``"module:function"``) for protocols whose
#   recipe is not a plain fold ensemble (the BMD-GAN of ``hip_xray``); ``fn(recipe, args)`` -> exit status.
# EXTRA_EVALUATIONS: protocol -> extra tables printed by ``screener evaluate`` after the paper table
#   (``fn(["evaluate", BUNDLE, "--data", DATA])`` -> exit status): ``hip_xray`` compares decomposition +
#   regression with the PF-DRR fit and the direct baseline, by pose and after JPEG.
# POST_TRAIN: protocol -> step run on the written bundle after training (``fn(bundle_dir, device=...)``):
#   ``dxa_spine`` matches its fracture threshold to the minimum-T-score sensitivity (Nissinen);
#   ``l1_axial`` fits the linear calibration of its BMD when the recipe asks for it.
# PAPER_PROTOCOLS: protocols whose spec carries a paper table.
_REGISTRIES: dict[str, Callable[[], Any]] = {
    "DATASET_FACTORIES": lambda: {n: s.dataset for n, s in specs().items()},
    "CUSTOM_TRAINERS": lambda: {n: s.trainer for n, s in specs().items() if s.trainer},
    "EXTRA_EVALUATIONS": lambda: {n: s.extra_evaluation for n, s in specs().items() if s.extra_evaluation},
    "POST_TRAIN": lambda: {n: s.post_train for n, s in specs().items() if s.post_train},
    "PAPER_PROTOCOLS": lambda: tuple(n for n, s in specs().items() if s.paper_table is not None),
}


def __getattr__(name: str) -> Any:
    """The registries of ``_REGISTRIES``, read from the training specs when asked for."""
    if name in _REGISTRIES:
        return _REGISTRIES[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def resolve_ref(ref: Any) -> Any:
    """Import ``"module:attr"`` references; return callables unchanged."""
    if not isinstance(ref, str):
        return ref
    import importlib

    module, _, attr = ref.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise SetupError(f"cannot load {ref}: {exc}") from exc


class SetupError(Exception):
    """A user-facing error in a recipe, a registry entry or the environment (the command line prints it
    without a traceback, exit status 2)."""


def _factory(protocol: str, factories: Mapping[str, DatasetFactory] | None) -> DatasetFactory:
    table = _REGISTRIES["DATASET_FACTORIES"]() if factories is None else factories
    if protocol not in table:
        known = ", ".join(sorted(table)) or "none yet"
        raise SetupError(f"protocol {protocol!r} has no dataset builder yet (registered: {known}); "
                       "add a training spec training/protocols/<protocol>.py naming one")
    return resolve_ref(table[protocol])


def dataset_cache_dir() -> Path | None:
    """Folder of cached cohort data sets (``SCREENER_DATASET_CACHE``; ``0`` disables caching).

    Default ``~/.cache/screener/datasets``.
    """
    env = os.environ.get("SCREENER_DATASET_CACHE", "")
    if env == "0":
        return None
    return Path(env).expanduser() if env else Path.home() / ".cache" / "screener" / "datasets"


def _preprocessing_sources() -> list[Path]:
    """The files a cached cohort data set depends on besides its builder: the shared preprocessing
    (``screener/preprocess``), every protocol's own (``screener/protocols/<name>/preprocess.py``)
    and the phantom (``training/phantoms``)."""
    screener_root = Path(__file__).resolve().parents[1] / "screener"
    return (sorted((screener_root / "preprocess").rglob("*.py"))
            + sorted((screener_root / "protocols").glob("*/preprocess.py"))
            + sorted((Path(__file__).resolve().parent / "phantoms").rglob("*.py")))


def build_dataset(recipe: Recipe, factories: Mapping[str, DatasetFactory] | None = None) -> Any:
    """The recipe's data set from its protocol's builder, cached for cohort sources.

    Rendering the virtual cohort is the slow part of ``screener train``; ``screener evaluate
    --data test|holdout`` rebuilds the same samples, so a cohort data set is cached as
    ``.npz`` keyed by the protocol, the ``[data]`` section, the builder's source code and
    the sources of the preprocessing (``screener/preprocess``, ``screener/protocols/*/preprocess.py``)
    and the phantom (``training/phantoms``), so a changed builder, preprocessing step or phantom never reads
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
    code += "".join(f.read_text() for f in _preprocessing_sources())
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
        raise SetupError(f"[data] holdout_profiles is set but the {recipe.protocol} dataset builder "
                       "gives no per-sample 'profile' attribute")
    return np.isin(np.asarray(ds.attributes["profile"]).astype(str), list(hold))


def split_plan(ds: Any, recipe: Recipe) -> Any:
    """The recipe's folds and test split of ``ds`` (held-out profiles excluded first)."""
    from training.folds import make_splits

    t = recipe.training
    return make_splits(ds.patient_ids, mode=t.split, folds=t.folds, repeats=t.repeats,
                       val_fraction=t.val_fraction, test_fraction=t.test_fraction, seed=recipe.seed,
                       strata=ds.strata if t.stratify else None, exclude=_holdout_mask(ds, recipe))


def evaluation_tables(protocol: str, task: str, y_true: np.ndarray, y_pred: np.ndarray, *,
                      patient_ids: Sequence[Any] | None = None,
                      outputs: Sequence[str] = (),
                      thresholds: Mapping[str, float] | None = None) -> dict[str, list[dict[str, Any]]]:
    """The paper's table(s) for a protocol (its training spec's ``evaluate``), or task-generic
    metrics for a protocol whose spec has none.

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
    spec = specs().get(protocol)
    if spec is not None and spec.evaluate is not None:
        return spec.evaluate(y_true, y_pred, patient_ids=patient_ids, outputs=outputs, thresholds=thresholds)
    return {protocol: M.generic_table(task, y_true, y_pred, outputs=outputs or None)}


def markdown_sections(tables: Mapping[str, list[dict[str, Any]]], heading: str) -> dict[str, str]:
    """``{"<table> — <heading>": markdown}`` of :func:`evaluation_tables`' tables."""
    from training.metrics import markdown_table

    return {f"{name} — {heading}": markdown_table(rows) for name, rows in tables.items()}


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
        raise SetupError(f"SCREENER_TORCH_THREADS must be a whole number of threads (got {env!r})") from None
    torch.set_num_threads(max(1, n))
    return max(1, n)
