"""One training spec per protocol, as data, found by discovery (issue 18).

Each module ``training/protocols/<name>.py`` holds ``SPEC``, a :class:`TrainingSpec`: the
data-set builder, the optional special steps (own trainer, post-train step, extra
evaluation), the paper, its headline numbers and the function that writes its table.
The hyper-parameters (network, targets, folds, losses, optimiser, epochs) are the
protocol's recipes ``training/recipes/<name>-{paper,cohort}.toml``, which
:meth:`TrainingSpec.recipes` finds by name.

:func:`specs` reads every module of this package, then every entry point of the group
``screener.training_protocols`` (a site package's own spec; it cannot take a built-in's
name). The tables the training code used to keep by hand
(:data:`training.plan.DATASET_FACTORIES`, :data:`~training.plan.CUSTOM_TRAINERS`,
:data:`~training.plan.POST_TRAIN`, :data:`~training.plan.EXTRA_EVALUATIONS`,
:data:`training.metrics.PAPER_NUMBERS`, :data:`training.metrics.PAPER_TABLES`) are read
from these specs.

Adding a protocol's training: one module here with ``SPEC``, its data-set builder in
``training/datasets/<name>.py`` and its recipes.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

__all__ = ["ENTRY_POINT_GROUP", "RECIPES", "TrainingSpec", "specs"]

#: entry-point group of site packages' training specs (``name = "package.module:SPEC"``)
ENTRY_POINT_GROUP = "screener.training_protocols"
#: folder of the recipes (``<protocol>-<variant>.toml``)
RECIPES = Path(__file__).resolve().parents[1] / "recipes"

Table = list[dict[str, Any]]


@dataclass(frozen=True)
class TrainingSpec:
    """How one protocol's model is trained and judged.

    Attributes
    ----------
    protocol : str
        The protocol's name (the module's name, the recipes' ``protocol``).
    paper : str
        The paper the model reproduces.
    dataset : str
        ``"module:function"`` of the data-set builder (recipe -> ``ArrayDataset``).
    paper_numbers : mapping
        ``{table key: {metric: the paper's number}}``; the key is the protocol, or
        ``"<protocol>:<task>"`` for a protocol with one table per task.
    paper_table : callable, optional
        ``fn(y_true, y_pred, **options) -> rows``: the paper's metrics with its numbers beside
        (:func:`training.metrics.paper_table` calls it).
    evaluate : callable, optional
        ``fn(y_true, y_pred, *, patient_ids, outputs, thresholds) -> {table name: rows}``
        (:func:`training.plan.evaluation_tables`); task-generic metrics when omitted.
    trainer : str, optional
        ``"module:function"`` replacing the fold-ensemble training (``fn(recipe, args) -> status``).
    post_train : str, optional
        ``"module:function"`` run on the written bundle (``fn(bundle_dir, device=...)``).
    extra_evaluation : str, optional
        ``"module:function"`` printing more tables after ``screener evaluate``'s
        (``fn(["evaluate", BUNDLE, "--data", DATA]) -> status``).
    """

    protocol: str
    paper: str
    dataset: str
    paper_numbers: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    paper_table: Callable[..., Table] | None = None
    evaluate: Callable[..., dict[str, Table]] | None = None
    trainer: str | None = None
    post_train: str | None = None
    extra_evaluation: str | None = None

    def recipes(self) -> dict[str, Path]:
        """``{variant: recipe file}`` of this protocol (``training/recipes/<protocol>-<variant>.toml``)."""
        prefix = f"{self.protocol}-"
        return {f.stem[len(prefix):]: f for f in sorted(RECIPES.glob(f"{prefix}*.toml"))}


@functools.lru_cache(maxsize=1)
def specs() -> dict[str, TrainingSpec]:
    """Every training spec: this package's modules (by name), then the entry points.

    Returns
    -------
    dict
        ``{protocol: TrainingSpec}``.

    Raises
    ------
    TypeError
        When a module's ``SPEC`` is not a :class:`TrainingSpec` or names another protocol.
    """
    import importlib
    import pkgutil
    from importlib.metadata import entry_points

    found: dict[str, TrainingSpec] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        spec = getattr(importlib.import_module(f"{__name__}.{info.name}"), "SPEC", None)
        if not isinstance(spec, TrainingSpec) or spec.protocol != info.name:
            raise TypeError(f"{__name__}.{info.name}.SPEC must be a TrainingSpec for protocol {info.name!r}")
        found[info.name] = spec
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in found:
            continue  # a plug-in cannot replace a built-in's training
        spec = ep.load()
        if not isinstance(spec, TrainingSpec) or spec.protocol != ep.name:
            raise TypeError(f"entry point {ep.name} = {ep.value} must be a TrainingSpec for protocol {ep.name!r}")
        found[ep.name] = spec
    return found
