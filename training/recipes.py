"""Training recipes: one TOML file per protocol and variant, validated when it is loaded.

A recipe says everything a training run needs -- network, loss, optimizer,
schedule, splits, augmentation, seed, data source -- so that ``screener train
RECIPE.toml`` is reproducible from the file alone, and the model card can
quote it.  ``training/recipes/README.md`` documents every key with an example.

Loading is strict: an unknown section or key, a missing key or a value of the
wrong type or range raises :class:`RecipeError` whose message names the file,
the ``[section] key`` and what to write instead.
"""
from __future__ import annotations

import difflib
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "AugmentationSpec",
    "BundleSpec",
    "DataSpec",
    "LossSpec",
    "NetworkSpec",
    "OptimizerSpec",
    "Recipe",
    "RecipeError",
    "SchedulerSpec",
    "TrainingSpec",
    "load_recipe",
    "recipe_from_dict",
]

VARIANTS = ("paper", "cohort")
LOSSES = ("huber", "weighted_huber", "mse", "l1", "distance_weighted_l1", "cross_entropy", "bce")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("none", "plateau", "exponential", "cosine")
SPLIT_MODES = ("kfold", "shuffle")
SOURCES = ("cohort", "manifest")
DEVICES = ("auto", "cpu", "cuda")


class RecipeError(ValueError):
    """The recipe is invalid; the message names the file, section and key."""


@dataclass(frozen=True)
class NetworkSpec:
    """``[network]``: ``name`` of a registered network class and its constructor ``kwargs``."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LossSpec:
    """``[loss]``: ``name`` (one of :data:`LOSSES`) and its ``kwargs`` (e.g. ``delta``)."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def task(self) -> str:
        """``"multiclass"`` (cross-entropy), ``"binary"`` (BCE) or ``"regression"``."""
        return {"cross_entropy": "multiclass", "bce": "binary"}.get(self.name, "regression")


@dataclass(frozen=True)
class OptimizerSpec:
    """``[optimizer]``: Adam, AdamW or SGD with learning rate, weight decay (L2) and momentum."""

    name: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9


@dataclass(frozen=True)
class SchedulerSpec:
    """``[scheduler]``: learning-rate schedule.

    ``plateau`` multiplies the rate by ``factor`` after ``patience`` epochs
    without a better validation loss (Ha et al.: 0.7 after 30); ``exponential``
    by ``gamma`` each epoch (Ha's decay 0.96); ``cosine`` anneals to 0 over the
    epochs.
    """

    name: str = "none"
    factor: float = 0.7
    patience: int = 30
    gamma: float = 0.96


@dataclass(frozen=True)
class TrainingSpec:
    """``[training]``: schedule and splits.

    Attributes
    ----------
    epochs, batch_size : int
    folds : int
        K of K-fold, or the number of random splits (``split = "shuffle"``);
        the fold models form the ensemble.
    repeats : int
        Repeated K-fold (Nissinen et al.); the bundle keeps the folds of repeat 0.
    split : {"kfold", "shuffle"}
    val_fraction : float
        Validation patients per split for ``split = "shuffle"``.
    test_fraction : float
        Patients held out as the test set before any fold is made.
    early_stopping_patience : int
        Stop after this many epochs without a better validation loss; 0 = off.
    stratify : bool
        Stratify splits by the data set's strata (classes, BMD bins).
    device : {"auto", "cpu", "cuda"}
    checkpoint_every : int
        Write the resumable checkpoint every this many epochs.
    torch_threads : int
        torch intra-op threads for this recipe (a recipe meant to run alone on the machine);
        0 = the default of :func:`training.plan.limit_torch_threads`.  ``SCREENER_TORCH_THREADS``
        overrides it.
    """

    epochs: int
    batch_size: int
    folds: int = 5
    repeats: int = 1
    split: str = "kfold"
    val_fraction: float = 0.2
    test_fraction: float = 0.15
    early_stopping_patience: int = 0
    stratify: bool = True
    device: str = "auto"
    checkpoint_every: int = 1
    torch_threads: int = 0


@dataclass(frozen=True)
class AugmentationSpec:
    """``[augmentation]``: random rotation (degrees, +-), shift (fraction of the side, +-), flips,
    scaling (fraction, +-), shear (degrees, +-), brightness and contrast (factor ``1 +- value``)."""

    rotation_deg: float = 0.0
    shift_frac: float = 0.0
    hflip_p: float = 0.0
    vflip_p: float = 0.0
    scale_frac: float = 0.0
    shear_deg: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0

    @property
    def enabled(self) -> bool:
        """True when any augmentation is active."""
        return bool(self.rotation_deg or self.shift_frac or self.hflip_p or self.vflip_p or self.scale_frac
                    or self.shear_deg or self.brightness or self.contrast)


@dataclass(frozen=True)
class DataSpec:
    """``[data]``: where the samples come from.

    ``source = "cohort"``: the virtual cohort, ``n`` patients drawn with
    ``seed`` from the scanner ``profiles``; ``holdout_profiles`` are rendered
    too but kept out of training (the held-out scanner test).
    ``source = "manifest"``: a site manifest CSV at ``path`` (relative to the
    recipe file).
    """

    source: str
    n: int = 0
    seed: int = 0
    profiles: tuple[str, ...] = ()
    holdout_profiles: tuple[str, ...] = ()
    path: str = ""
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BundleSpec:
    """``[bundle]``: what the model card says beyond the recipe.

    Attributes
    ----------
    version : str
        Bundle version (semantic).
    outputs : tuple of str
        Output names (e.g. ``("bmd",)``, ``("normal", "osteopenia", "osteoporosis")``).
    units : tuple of str
        Unit of each output (``"g/cm2"``, ``""``, ``"probability"``).
    t_score_mean, t_score_sd : float
        T-score reference (0 = none).
    t_score_reference : str
        Where the reference comes from.
    spacing_mm : tuple of float
        Pixel spacing of the input (empty = not applicable).
    window_center, window_width : float
        CT window applied before scaling (width 0 = none).
    preprocessing : dict
        Further constants (crop size, FOV, scaling) for the card.
    differences_from_paper : str
        What this variant changes with respect to the paper.
    changelog : dict
        Version -> what changed (the card's changelog; default ``{version: "first release"}``).
    """

    version: str = "0.1.0"
    outputs: tuple[str, ...] = ()
    units: tuple[str, ...] = ()
    t_score_mean: float = 0.0
    t_score_sd: float = 0.0
    t_score_reference: str = ""
    spacing_mm: tuple[float, ...] = ()
    window_center: float = 0.0
    window_width: float = 0.0
    preprocessing: dict[str, Any] = field(default_factory=dict)
    differences_from_paper: str = ""
    changelog: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    """A validated training recipe (see :func:`load_recipe`)."""

    protocol: str
    variant: str
    seed: int
    network: NetworkSpec
    loss: LossSpec
    optimizer: OptimizerSpec
    training: TrainingSpec
    data: DataSpec
    augmentation: AugmentationSpec = field(default_factory=AugmentationSpec)
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    bundle: BundleSpec = field(default_factory=BundleSpec)
    description: str = ""
    path: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-able) of the recipe, for the model card."""
        d = asdict(self)
        d.pop("path", None)
        return d

    @property
    def task(self) -> str:
        """``regression``, ``multiclass`` or ``binary`` (from the loss)."""
        return self.loss.task


# --- validation -------------------------------------------------------------------------------

class _Section:
    """Reads one TOML table, remembering which keys were used."""

    def __init__(self, where: str, name: str, table: Any, required: bool = True) -> None:
        self.where = where
        self.name = name
        if table is None:
            if required:
                raise RecipeError(f"{where}: missing section [{name}]")
            table = {}
        if not isinstance(table, dict):
            raise RecipeError(f"{where}: [{name}] must be a table, got {type(table).__name__}")
        self.table = table
        self.used: set[str] = set()

    def _err(self, key: str, msg: str) -> RecipeError:
        label = f"[{self.name}] {key}" if self.name else key
        return RecipeError(f"{self.where}: {label} {msg}")

    def get(self, key: str, kind: str, default: Any = ..., *, choices: tuple[str, ...] | None = None,
            lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> Any:
        self.used.add(key)
        if key not in self.table:
            if default is ...:
                typo = difflib.get_close_matches(key, [k for k in self.table if isinstance(k, str)], n=1)
                hint = f" (unknown key {typo[0]!r} here: a typo?)" if typo else ""
                raise self._err(key, "is required" + hint)
            return default
        v = self.table[key]
        if kind == "str":
            if not isinstance(v, str) or not v.strip():
                raise self._err(key, f"must be a non-empty string (got {v!r})")
            if choices and v not in choices:
                raise self._err(key, f"must be one of {', '.join(choices)} (got {v!r})")
            return v
        if kind == "text":
            if not isinstance(v, str):
                raise self._err(key, f"must be a string (got {v!r})")
            return v
        if kind == "bool":
            if not isinstance(v, bool):
                raise self._err(key, f"must be true or false (got {v!r})")
            return v
        if kind in ("int", "float"):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind == "int" and not isinstance(v, int)):
                want = "an integer" if kind == "int" else "a number"
                raise self._err(key, f"must be {want} (got {v!r} of type {type(v).__name__})")
            if lo is not None and (v < lo or (lo_open and v == lo)):
                raise self._err(key, f"must be {'>' if lo_open else '>='} {lo} (got {v})")
            if hi is not None and v > hi:
                raise self._err(key, f"must be <= {hi} (got {v})")
            return int(v) if kind == "int" else float(v)
        if kind == "strlist":
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise self._err(key, f"must be a list of strings (got {v!r})")
            return tuple(v)
        if kind == "floatlist":
            if not isinstance(v, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
                raise self._err(key, f"must be a list of numbers (got {v!r})")
            return tuple(float(x) for x in v)
        if kind == "table":
            if not isinstance(v, dict):
                raise self._err(key, f"must be a table, e.g. {key} = {{ a = 1 }} (got {v!r})")
            return dict(v)
        raise AssertionError(kind)

    def done(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            label = f"[{self.name}]" if self.name else "top level"
            typo = difflib.get_close_matches(unknown[0], sorted(self.used), n=1)
            hint = f"did you mean {typo[0]!r}? " if typo else ""
            raise RecipeError(
                f"{self.where}: {label} unknown key {unknown[0]!r} ({hint}known keys: {', '.join(sorted(self.used))})"
            )


def recipe_from_dict(doc: Mapping[str, Any], where: str = "recipe") -> Recipe:
    """Validate a parsed recipe document and build a :class:`Recipe`.

    Parameters
    ----------
    doc : mapping
        The TOML document as a dict.
    where : str
        Name used in error messages (the file path).

    Returns
    -------
    Recipe

    Raises
    ------
    RecipeError
        Naming the section and key at fault.
    """
    sections = ("network", "loss", "optimizer", "scheduler", "training", "augmentation", "data", "bundle")
    top = _Section(where, "", {k: v for k, v in doc.items() if k not in sections})
    protocol = top.get("protocol", "str")
    variant = top.get("variant", "str", choices=VARIANTS)
    seed = top.get("seed", "int", lo=0)
    description = top.get("description", "text", "")
    top.done()

    s = _Section(where, "network", doc.get("network"))
    network = NetworkSpec(s.get("name", "str"), s.get("kwargs", "table", {}))
    s.done()

    s = _Section(where, "loss", doc.get("loss"))
    loss = LossSpec(s.get("name", "str", choices=LOSSES), s.get("kwargs", "table", {}))
    s.done()

    s = _Section(where, "optimizer", doc.get("optimizer"))
    optimizer = OptimizerSpec(
        name=s.get("name", "str", "adam", choices=OPTIMIZERS),
        lr=s.get("lr", "float", lo=0.0, lo_open=True),
        weight_decay=s.get("weight_decay", "float", 0.0, lo=0.0),
        momentum=s.get("momentum", "float", 0.9, lo=0.0, hi=1.0),
    )
    s.done()

    s = _Section(where, "scheduler", doc.get("scheduler"), required=False)
    scheduler = SchedulerSpec(
        name=s.get("name", "str", "none", choices=SCHEDULERS),
        factor=s.get("factor", "float", 0.7, lo=0.0, hi=1.0, lo_open=True),
        patience=s.get("patience", "int", 30, lo=0),
        gamma=s.get("gamma", "float", 0.96, lo=0.0, hi=1.0, lo_open=True),
    )
    s.done()

    training = _training_spec(where, doc)
    augmentation = _augmentation_spec(where, doc)
    data = _data_spec(where, doc)
    bundle = _bundle_spec(where, doc)
    return Recipe(protocol=protocol, variant=variant, seed=seed, network=network, loss=loss,
                  optimizer=optimizer, training=training, data=data, augmentation=augmentation,
                  scheduler=scheduler, bundle=bundle, description=description, path=where)


def _training_spec(where: str, doc: Mapping[str, Any]) -> "TrainingSpec":
    """The ``[training]`` section, checked (folds and repeats against the split mode)."""
    s = _Section(where, "training", doc.get("training"))
    training = TrainingSpec(
        epochs=s.get("epochs", "int", lo=1),
        batch_size=s.get("batch_size", "int", lo=1),
        folds=s.get("folds", "int", 5, lo=1),
        repeats=s.get("repeats", "int", 1, lo=1),
        split=s.get("split", "str", "kfold", choices=SPLIT_MODES),
        val_fraction=s.get("val_fraction", "float", 0.2, lo=0.0, hi=0.9, lo_open=True),
        test_fraction=s.get("test_fraction", "float", 0.15, lo=0.0, hi=0.9),
        early_stopping_patience=s.get("early_stopping_patience", "int", 0, lo=0),
        stratify=s.get("stratify", "bool", True),
        device=s.get("device", "str", "auto", choices=DEVICES),
        checkpoint_every=s.get("checkpoint_every", "int", 1, lo=1),
        torch_threads=s.get("torch_threads", "int", 0, lo=0, hi=256),
    )
    s.done()
    if training.split == "kfold" and training.folds < 2:
        raise RecipeError(f"{where}: [training] folds must be >= 2 for split = \"kfold\" "
                          f"(got {training.folds}); use split = \"shuffle\" for a single split")
    if training.split == "shuffle" and training.repeats != 1:
        raise RecipeError(f"{where}: [training] repeats must be 1 for split = \"shuffle\" (folds counts the splits)")

    return training


def _augmentation_spec(where: str, doc: Mapping[str, Any]) -> "AugmentationSpec":
    """The optional ``[augmentation]`` section."""
    s = _Section(where, "augmentation", doc.get("augmentation"), required=False)
    augmentation = AugmentationSpec(
        rotation_deg=s.get("rotation_deg", "float", 0.0, lo=0.0, hi=180.0),
        shift_frac=s.get("shift_frac", "float", 0.0, lo=0.0, hi=0.5),
        hflip_p=s.get("hflip_p", "float", 0.0, lo=0.0, hi=1.0),
        vflip_p=s.get("vflip_p", "float", 0.0, lo=0.0, hi=1.0),
        scale_frac=s.get("scale_frac", "float", 0.0, lo=0.0, hi=0.9),
        shear_deg=s.get("shear_deg", "float", 0.0, lo=0.0, hi=45.0),
        brightness=s.get("brightness", "float", 0.0, lo=0.0, hi=0.9),
        contrast=s.get("contrast", "float", 0.0, lo=0.0, hi=0.9),
    )
    s.done()

    return augmentation


def _data_spec(where: str, doc: Mapping[str, Any]) -> "DataSpec":
    """The ``[data]`` section, checked (cohort size, manifest path, held-out profiles apart)."""
    s = _Section(where, "data", doc.get("data"))
    source = s.get("source", "str", choices=SOURCES)
    data = DataSpec(
        source=source,
        n=s.get("n", "int", 0, lo=0),
        seed=s.get("seed", "int", 0, lo=0),
        profiles=s.get("profiles", "strlist", ()),
        holdout_profiles=s.get("holdout_profiles", "strlist", ()),
        path=s.get("path", "text", ""),
        options=s.get("options", "table", {}),
    )
    s.done()
    if source == "cohort" and data.n < 2:
        raise RecipeError(f"{where}: [data] n is required for source = \"cohort\" (number of patients, >= 2)")
    if source == "manifest" and not data.path:
        raise RecipeError(f"{where}: [data] path is required for source = \"manifest\" (the site CSV)")
    overlap = set(data.profiles) & set(data.holdout_profiles)
    if overlap:
        raise RecipeError(f"{where}: [data] holdout_profiles repeats training profile {sorted(overlap)[0]!r}")

    return data


def _bundle_spec(where: str, doc: Mapping[str, Any]) -> "BundleSpec":
    """The optional ``[bundle]`` section, checked (one unit per output)."""
    s = _Section(where, "bundle", doc.get("bundle"), required=False)
    bundle = BundleSpec(
        version=s.get("version", "str", "0.1.0"),
        outputs=s.get("outputs", "strlist", ()),
        units=s.get("units", "strlist", ()),
        t_score_mean=s.get("t_score_mean", "float", 0.0, lo=0.0),
        t_score_sd=s.get("t_score_sd", "float", 0.0, lo=0.0),
        t_score_reference=s.get("t_score_reference", "text", ""),
        spacing_mm=s.get("spacing_mm", "floatlist", ()),
        window_center=s.get("window_center", "float", 0.0),
        window_width=s.get("window_width", "float", 0.0, lo=0.0),
        preprocessing=s.get("preprocessing", "table", {}),
        differences_from_paper=s.get("differences_from_paper", "text", ""),
        changelog=s.get("changelog", "table", {}),
    )
    s.done()
    if bundle.units and len(bundle.units) != len(bundle.outputs):
        raise RecipeError(f"{where}: [bundle] units must list one unit per output "
                          f"({len(bundle.outputs)} outputs, {len(bundle.units)} units)")
    if (bundle.t_score_mean > 0) != (bundle.t_score_sd > 0):
        raise RecipeError(f"{where}: [bundle] t_score_mean and t_score_sd go together (give both or neither)")
    return bundle


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe TOML file.

    Parameters
    ----------
    path : str or pathlib.Path
        The recipe, e.g. ``training/recipes/l1_axial-cohort.toml``.

    Returns
    -------
    Recipe

    Raises
    ------
    RecipeError
        If the file is missing, is not TOML, or a key is missing/unknown/invalid.
    """
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"recipe {p} not found")
    try:
        doc = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{p}: not valid TOML: {exc}") from exc
    recipe = recipe_from_dict(doc, str(p))
    if recipe.data.source == "manifest" and not Path(recipe.data.path).is_absolute():
        data = DataSpec(**{**asdict(recipe.data), "path": str((p.parent / recipe.data.path).resolve())})
        recipe = Recipe(**{**{f: getattr(recipe, f) for f in recipe.__dataclass_fields__}, "data": data})
    return recipe
