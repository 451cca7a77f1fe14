"""Model bundles: the fold ensemble of one protocol with its model card.

A bundle is a folder ``models/<protocol>/`` holding

* ``weights.pt`` -- ``{"format": "screener-bundle-1", "folds": [state_dict, ...]}``
  with every floating-point tensor stored as float16 (half the size), read
  with ``torch.load(weights_only=True)`` (no pickled code is ever executed);
* ``model_card.json`` -- architecture (network name, its class as ``"module:Class"``
  and constructor kwargs; a card without the class, written before it was recorded,
  is read by name among the networks :func:`discovered_networks` finds),
  input spec (shape, spacing, window), preprocessing constants, outputs and
  units, T-score reference, training-data statement, recipe, command, seed,
  metrics, intended use, version, changelog and framework versions (after the
  MONAI bundle ``metadata.json`` and nnU-Net ``plans.json``: preprocessing
  travels with the weights); optionally ``calibration``, a linear map of one
  regression output (``{"kind": "linear", "output", "slope", "intercept",
  ...}``, fitted by :mod:`training.calibration`) that :meth:`Bundle.predict`
  applies to the ensemble mean;
* ``README.md`` -- the same card for people, generated from the JSON.

:func:`save_bundle` writes one, :func:`load_bundle` reads it back into a
:class:`Bundle` whose models are in eval mode on the requested device and
whose input spec is checked against the network (a dry forward pass) and
against every batch given to :meth:`Bundle.predict`.
"""
from __future__ import annotations

import datetime as _dt
import functools
import json
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import structlog
import torch
from torch import nn

from screener import __version__ as SCREENER_VERSION
from screener.devices import resolve_device
from screener.jsonable import to_jsonable

log = structlog.get_logger(__name__)

__all__ = [
    "BUNDLE_FORMAT",
    "Bundle",
    "BundleError",
    "InputSpec",
    "NETWORKS",
    "TRAINING_DATA_STATEMENT",
    "INTENDED_USE",
    "build_network",
    "bundle_size",
    "discovered_networks",
    "network_class_path",
    "check_bundle_sizes",
    "load_bundle",
    "save_bundle",
]

BUNDLE_FORMAT = "screener-bundle-1"
WEIGHTS = "weights.pt"
CARD = "model_card.json"
README = "README.md"
TRAINING_DATA_STATEMENT = (
    "trained on the screener virtual cohort (synthetic patients); not clinical accuracy"
)
INTENDED_USE = (
    "Opportunistic osteoporosis screening research; not for diagnostic use without review "
    "by a qualified reader."
)
TASKS = ("regression", "multiclass", "binary")


class BundleError(ValueError):
    """A bundle is missing, malformed, or does not fit its input."""


#: entry-point group through which an installed package offers its own networks (name -> class)
NETWORK_ENTRY_POINTS = "screener.networks"


@functools.lru_cache(maxsize=1)
def discovered_networks() -> dict[str, Callable[..., nn.Module]]:
    """Every network the installation offers, by class name, found rather than listed.

    The ``torch.nn.Module`` classes named in the ``__all__`` of each module of
    :mod:`screener.nets`, then every entry point of the group ``screener.networks``
    (a site package's ``[project.entry-points."screener.networks"]``; it cannot take a
    built-in's name).

    Returns
    -------
    dict
        ``{class name: class}``.
    """
    import importlib
    import pkgutil
    from importlib.metadata import entry_points

    import screener.nets as nets_pkg

    table: dict[str, Callable[..., nn.Module]] = {}
    for info in sorted(pkgutil.iter_modules(nets_pkg.__path__), key=lambda i: i.name):
        mod = importlib.import_module(f"{nets_pkg.__name__}.{info.name}")
        for name in getattr(mod, "__all__", ()):
            obj = getattr(mod, name, None)
            if isinstance(obj, type) and issubclass(obj, nn.Module):
                table.setdefault(name, obj)
    for ep in entry_points(group=NETWORK_ENTRY_POINTS):
        if ep.name in table:
            log.warning("bundle.network_entry_point_ignored", name=ep.name, reason="a built-in has this name")
            continue
        table[ep.name] = ep.load()
    return table


def __getattr__(name: str) -> Any:
    """``NETWORKS``: the names of the discovered networks (computed on first use)."""
    if name == "NETWORKS":
        return tuple(discovered_networks())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def network_class_path(model: nn.Module) -> str:
    """``"module:Class"`` of ``model``, as a model card's ``architecture.class`` names it."""
    cls = type(model)
    return f"{cls.__module__}:{cls.__qualname__}"


def _class_from_path(path: str) -> Callable[..., nn.Module]:
    """The network class a card names as ``"module:Class"``.

    Only a module of the screener package or of a ``screener.networks`` entry point is
    imported: a card is data, and naming a class must not run an arbitrary module.
    """
    import importlib
    from importlib.metadata import entry_points

    module, _, attr = path.partition(":")
    allowed = module == "screener" or module.startswith("screener.") or any(
        ep.value.partition(":")[0] == module for ep in entry_points(group=NETWORK_ENTRY_POINTS))
    if not (module and attr and allowed):
        raise BundleError(f"network class {path!r} is not a screener network or a '{NETWORK_ENTRY_POINTS}' "
                          "entry point")
    try:
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise BundleError(f"network class {path!r} cannot be imported: {exc}") from exc
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise BundleError(f"network class {path!r} is not a torch.nn.Module")
    return obj


def build_network(name: str, kwargs: Mapping[str, Any] | None = None,
                  networks: Mapping[str, Callable[..., nn.Module]] | None = None, *,
                  class_path: str | None = None) -> nn.Module:
    """Construct a network by name (or by the class its model card names).

    Parameters
    ----------
    name : str
        A discovered network (:func:`discovered_networks`) or a key of ``networks``.
    kwargs : mapping, optional
        Constructor keyword arguments (lists become tuples).
    networks : mapping, optional
        Extra name -> factory entries (they take precedence), e.g. a site's own net.
    class_path : str, optional
        ``"module:Class"`` from the card's ``architecture.class``; used when ``networks``
        has no entry for ``name``. Cards written before that key existed leave it out and
        the name is looked up among the discovered networks.

    Returns
    -------
    torch.nn.Module
    """
    if networks and name in networks:
        factory = networks[name]
    elif class_path:
        factory = _class_from_path(class_path)
    else:
        table = discovered_networks()
        if name not in table:
            known = sorted(set(table) | set(networks or {}))
            raise BundleError(f"unknown network {name!r}; known: {', '.join(known)}")
        factory = table[name]
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in (kwargs or {}).items()}
    try:
        return factory(**kw)
    except TypeError as exc:
        raise BundleError(f"network {name} does not accept kwargs {sorted(kw)}: {exc}") from exc


@dataclass(frozen=True)
class InputSpec:
    """What a bundle's networks take.

    Attributes
    ----------
    shape : tuple of int
        ``(C, H, W)`` of one image.
    spacing_mm : tuple of float
        Pixel spacing (row, column) in mm after preprocessing; empty if not applicable.
    window : dict
        CT window ``{"center": C, "width": W}`` applied before scaling; empty if none.
    extras : tuple of str
        Names of the second input's columns (e.g. Ha's demographics); empty if none.
    value_range : tuple of float
        Expected range of the preprocessed pixel values (e.g. ``(0.0, 1.0)``).
    """

    shape: tuple[int, ...]
    spacing_mm: tuple[float, ...] = ()
    window: dict[str, float] = field(default_factory=dict)
    extras: tuple[str, ...] = ()
    value_range: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or not all(isinstance(s, int) and s > 0 for s in self.shape):
            raise BundleError(f"input shape must be (C, H, W) positive integers (got {self.shape})")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "InputSpec":
        """Inverse of :meth:`to_dict`."""
        try:
            return cls(shape=tuple(int(s) for s in d["shape"]),
                       spacing_mm=tuple(float(s) for s in d.get("spacing_mm", ())),
                       window=dict(d.get("window", {})),
                       extras=tuple(d.get("extras", ())),
                       value_range=tuple(float(v) for v in d.get("value_range", ())))
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"model card input_spec is malformed ({exc}): {dict(d)}") from exc

    def check(self, images: np.ndarray | torch.Tensor, extras: np.ndarray | torch.Tensor | None = None) -> None:
        """Raise :class:`BundleError` unless ``images`` is ``(B, *shape)`` (and ``extras`` ``(B, E)``)."""
        shp = tuple(images.shape)
        if len(shp) != 4 or shp[1:] != tuple(self.shape):
            raise BundleError(
                f"input of shape {shp} does not match the bundle's input spec (B, {', '.join(map(str, self.shape))}); "
                "preprocess with the protocol's function first"
            )
        if self.extras:
            if extras is None or tuple(extras.shape) != (shp[0], len(self.extras)):
                raise BundleError(f"this bundle needs extras of shape (B, {len(self.extras)}) "
                                  f"({', '.join(self.extras)}); got {None if extras is None else tuple(extras.shape)}")
        elif extras is not None:
            raise BundleError("this bundle takes no extra inputs")


@dataclass
class Bundle:
    """A loaded model bundle.

    Attributes
    ----------
    path : pathlib.Path
    card : dict
        The parsed ``model_card.json``.
    models : list of torch.nn.Module
        The fold ensemble, eval mode, on ``device``.
    input_spec : InputSpec
    device : torch.device
    """

    path: Path
    card: dict[str, Any]
    models: list[nn.Module]
    input_spec: InputSpec
    device: torch.device

    @property
    def protocol(self) -> str:
        """Protocol the bundle serves."""
        return str(self.card["protocol"])

    @property
    def version(self) -> str:
        """Bundle version."""
        return str(self.card["version"])

    @property
    def task(self) -> str:
        """``regression``, ``multiclass`` or ``binary``."""
        return str(self.card["outputs"]["task"])

    @property
    def output_names(self) -> list[str]:
        """Names of the output columns."""
        return [str(n) for n in self.card["outputs"]["names"]]

    @property
    def calibration(self) -> dict[str, Any] | None:
        """The card's linear output calibration (``None`` when the card has none)."""
        cal = self.card.get("calibration")
        return dict(cal) if cal else None

    def apply_calibration(self, outputs: np.ndarray) -> np.ndarray:
        """The card's calibration applied to ``(B, n_outputs)`` ensemble outputs (a copy; unchanged without one).

        ``calibrated = intercept + slope * output`` on the calibrated output column.
        """
        out = np.array(outputs, dtype=np.float64)
        cal = self.calibration
        if cal is None:
            return out
        j = self.output_names.index(str(cal["output"]))
        out[:, j] = float(cal["intercept"]) + float(cal["slope"]) * out[:, j]
        return out

    @property
    def bundle_id(self) -> str:
        """``<protocol>@<version>`` (recorded with every finding)."""
        return f"{self.protocol}@{self.version}"

    def predict(self, images: np.ndarray | torch.Tensor, extras: np.ndarray | torch.Tensor | None = None,
                batch_size: int = 16, calibrated: bool = True) -> np.ndarray:
        """Ensemble estimate (mean of fold outputs, or of their probabilities), calibrated as the card says.

        Parameters
        ----------
        images : array
            ``(B, C, H, W)`` preprocessed inputs matching :attr:`input_spec`.
        extras : array, optional
            ``(B, E)`` second input when the spec names extras.
        batch_size : int
        calibrated : bool
            Apply the card's ``calibration`` (:meth:`apply_calibration`); a card without one
            gives the plain ensemble mean either way.

        Returns
        -------
        numpy.ndarray
            ``(B, n_outputs)`` float64.
        """
        self.input_spec.check(images, extras)
        x = torch.as_tensor(np.asarray(images, dtype=np.float32) if not isinstance(images, torch.Tensor) else images)
        e = None if extras is None else torch.as_tensor(np.asarray(extras, dtype=np.float32))
        acc = None
        with torch.no_grad():
            for m in self.models:
                parts = []
                for idx in torch.split(torch.arange(len(x)), batch_size):
                    xb = x[idx].float().to(self.device)
                    out = m(xb) if e is None else m(xb, e[idx].float().to(self.device))
                    out = out.double()
                    if self.task == "multiclass":
                        out = torch.softmax(out, dim=1)
                    elif self.task == "binary":
                        out = torch.sigmoid(out)
                    parts.append(out.reshape(len(idx), -1).cpu())
                o = torch.cat(parts)
                acc = o if acc is None else acc + o
        assert acc is not None
        mean = (acc / len(self.models)).numpy()
        return self.apply_calibration(mean) if calibrated else mean


def _half_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: (v.detach().cpu().half() if v.is_floating_point() else v.detach().cpu().clone())
            for k, v in model.state_dict().items()}


def _framework_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
           "screener": SCREENER_VERSION}
    return out


def save_bundle(
    out_dir: str | Path,
    *,
    protocol: str,
    models: Sequence[nn.Module],
    architecture: Mapping[str, Any],
    input_spec: InputSpec,
    outputs: Sequence[str],
    task: str,
    units: Sequence[str] = (),
    preprocessing: Mapping[str, Any] | None = None,
    t_score_reference: Mapping[str, Any] | None = None,
    recipe: Mapping[str, Any] | None = None,
    command: str = "",
    seed: int | None = None,
    metrics: Mapping[str, Any] | None = None,
    training_data: str = TRAINING_DATA_STATEMENT,
    intended_use: str = INTENDED_USE,
    version: str = "0.1.0",
    changelog: Mapping[str, str] | None = None,
    differences_from_paper: str = "",
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a model bundle: float16 fold weights, ``model_card.json`` and ``README.md``.

    Parameters
    ----------
    out_dir : path
        The bundle folder (``models/<protocol>``); created if needed.
    protocol : str
        Protocol name (``l1_axial``, ...).
    models : sequence of torch.nn.Module
        The fold ensemble (all the same architecture).
    architecture : mapping
        ``{"name": network name, "kwargs": {...}}`` to rebuild each model.
    input_spec : InputSpec
    outputs : sequence of str
        Output column names.
    task : {"regression", "multiclass", "binary"}
    units : sequence of str
        Unit per output (``g/cm2``, ``probability``, ``""``).
    preprocessing : mapping, optional
        Constants of the protocol's preprocessing (crop, FOV, scaling).
    t_score_reference : mapping, optional
        ``{"mean": .., "sd": .., "source": ..}`` (g/cm^2).
    recipe : mapping, optional
        The recipe (``Recipe.to_dict()``).
    command, seed
        How the bundle was produced.
    metrics : mapping, optional
        Evaluation results (tables, per-fold summaries).
    training_data, intended_use, version, changelog, differences_from_paper, extra
        Card fields.

    Returns
    -------
    pathlib.Path
        The bundle folder.
    """
    if not models:
        raise BundleError("a bundle needs at least one model")
    if task not in TASKS:
        raise BundleError(f"task must be one of {TASKS} (got {task!r})")
    if "name" not in architecture:
        raise BundleError("architecture must name the network: {'name': ..., 'kwargs': {...}}")
    if units and len(units) != len(outputs):
        raise BundleError(f"{len(units)} units for {len(outputs)} outputs")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_params = sum(p.numel() for p in models[0].parameters())
    torch.save({"format": BUNDLE_FORMAT, "folds": [_half_state(m) for m in models]}, out / WEIGHTS)
    card: dict[str, Any] = {
        "format": BUNDLE_FORMAT,
        "protocol": protocol,
        "version": version,
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "architecture": {"name": architecture["name"],
                         "class": str(architecture.get("class") or network_class_path(models[0])),
                         "kwargs": dict(architecture.get("kwargs", {})),
                         "parameters": int(n_params), "folds": len(models), "weights_dtype": "float16"},
        "input_spec": input_spec.to_dict(),
        "preprocessing": dict(preprocessing or {}),
        "outputs": {"task": task, "names": list(outputs), "units": list(units) or [""] * len(outputs),
                    "ensemble": "mean of fold outputs" if task == "regression" else "mean of fold probabilities"},
        "t_score_reference": dict(t_score_reference or {}),
        "training_data": training_data,
        "intended_use": intended_use,
        "differences_from_paper": differences_from_paper,
        "recipe": dict(recipe or {}),
        "command": command,
        "seed": seed,
        "metrics": dict(metrics or {}),
        "changelog": dict(changelog or {version: "first release"}),
        "framework_versions": _framework_versions(),
    }
    if extra:
        card.update(dict(extra))
    card = to_jsonable(card)
    (out / CARD).write_text(json.dumps(card, indent=2, sort_keys=False, allow_nan=False) + "\n", encoding="utf-8")
    (out / README).write_text(render_readme(card), encoding="utf-8")
    log.info("bundle.saved", protocol=protocol, version=version, path=str(out), folds=len(models),
             bytes=bundle_size(out))
    return out


def render_readme(card: Mapping[str, Any]) -> str:
    """The human-readable model card (``README.md``) for a card dict."""
    arch = card["architecture"]
    spec = card["input_spec"]
    outs = card["outputs"]
    lines = [
        f"# Model card: `{card['protocol']}` v{card['version']}",
        "",
        f"> **Intended use.** {card['intended_use']}",
        "",
        f"> **Training data.** {card['training_data']}",
        "",
        "## Architecture",
        "",
        f"- Network: `{arch['name']}` with `{json.dumps(arch['kwargs'])}`",
        f"- Parameters per model: {arch['parameters']:,}; fold ensemble of {arch['folds']} "
        f"({outs['ensemble']}); weights stored as {arch['weights_dtype']}",
        "",
        "## Input",
        "",
        f"- Shape (C, H, W): {tuple(spec['shape'])}",
    ]
    if spec.get("spacing_mm"):
        lines.append(f"- Pixel spacing: {spec['spacing_mm']} mm")
    if spec.get("window"):
        lines.append(f"- Window: centre {spec['window'].get('center')} / width {spec['window'].get('width')} HU")
    if spec.get("extras"):
        lines.append(f"- Extra inputs: {', '.join(spec['extras'])}")
    if spec.get("value_range"):
        lines.append(f"- Value range: {spec['value_range']}")
    for k, v in (card.get("preprocessing") or {}).items():
        lines.append(f"- {k}: {v}")
    lines += ["", "## Outputs", ""]
    for name, unit in zip(outs["names"], outs["units"]):
        lines.append(f"- `{name}`" + (f" ({unit})" if unit else ""))
    lines.append(f"- Task: {outs['task']}")
    ref = card.get("t_score_reference") or {}
    if ref:
        lines.append(f"- T-score reference: mean {ref.get('mean')} g/cm², SD {ref.get('sd')}"
                     + (f" ({ref['source']})" if ref.get("source") else ""))
    cal = card.get("calibration") or {}
    if cal:
        line = (f"- `{cal.get('output')}` = {cal.get('intercept'):+.5f} + {cal.get('slope'):.5f} x ensemble mean "
                f"({cal.get('kind')}, {cal.get('fit')} fit, {cal.get('n')} samples)")
        lines += ["", "## Output calibration", "", line, f"- Fitted on: {cal.get('fitted_on')}"]
        for name, md in (cal.get("tables") or {}).items():
            lines += ["", f"### {name}", "", str(md)]
    if card.get("differences_from_paper"):
        lines += ["", "## Differences from the paper", "", str(card["differences_from_paper"])]
    lines += ["", "## Provenance", ""]
    if card.get("command"):
        lines.append(f"- Command: `{card['command']}`")
    lines.append(f"- Seed: {card.get('seed')}")
    recipe = card.get("recipe") or {}
    if recipe:
        lines.append(f"- Recipe: protocol `{recipe.get('protocol')}`, variant `{recipe.get('variant')}`")
    fv = card.get("framework_versions") or {}
    lines.append("- Frameworks: " + ", ".join(f"{k} {v}" for k, v in fv.items()))
    lines.append(f"- Created: {card.get('created')}")
    metrics = card.get("metrics") or {}
    tables = metrics.get("tables") if isinstance(metrics, Mapping) else None
    if tables:
        lines += ["", "## Evaluation (synthetic test data)", ""]
        for name, md in tables.items():
            lines += [f"### {name}", "", str(md), ""]
    lines += ["", "## Changelog", ""]
    for v, msg in (card.get("changelog") or {}).items():
        lines.append(f"- {v}: {msg}")
    return "\n".join(lines).rstrip() + "\n"


def _check_calibration(card: Mapping[str, Any], card_path: Path) -> None:
    """Raise :class:`BundleError` unless the card's optional ``calibration`` is a usable linear map."""
    cal = card.get("calibration")
    if not cal:
        return
    if not isinstance(cal, Mapping) or cal.get("kind") != "linear":
        raise BundleError(f"{card_path}: calibration kind {cal.get('kind') if isinstance(cal, Mapping) else cal!r} "
                          "is not supported (only 'linear'); refit with python -m training.calibration or remove it")
    names = [str(n) for n in card["outputs"].get("names", [])]
    if str(cal.get("output")) not in names:
        raise BundleError(f"{card_path}: calibration output {cal.get('output')!r} is not one of the outputs {names}")
    try:
        slope, intercept = float(cal["slope"]), float(cal["intercept"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{card_path}: calibration needs numeric 'slope' and 'intercept' ({exc})") from exc
    if not (np.isfinite(slope) and slope > 0 and np.isfinite(intercept)):
        raise BundleError(f"{card_path}: calibration slope must be a positive number and the intercept finite "
                          f"(got {slope}, {intercept})")


def load_networks(weights_path: str | Path, name: str, kwargs: Mapping[str, Any] | None,
                  device: str | torch.device = "cpu", *,
                  networks: Mapping[str, Callable[..., nn.Module]] | None = None,
                  class_path: str | None = None) -> list[nn.Module]:
    """The networks of one weights file of a bundle (one per fold), float32, eval mode.

    The one reader of a bundle's weight files: :func:`load_bundle` reads ``weights.pt`` with it,
    and a protocol whose card names a further network (``hip_xray``'s decomposition generator)
    reads that file with it too.

    Parameters
    ----------
    weights_path : path
        A ``{"format": BUNDLE_FORMAT, "folds": [state dict, ...]}`` file (float16 tensors).
    name, kwargs : str, mapping
        The network and its constructor arguments (:func:`build_network`).
    device : str or torch.device
        Where the networks go.
    networks : mapping, optional
        Extra network factories.
    class_path : str, optional
        ``"module:Class"`` as a model card's ``architecture.class`` names it.

    Raises
    ------
    BundleError
        When the file is not plain tensors in the bundle format or a fold does not fit the network.
    """
    try:
        blob = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling errors vary by torch version
        raise BundleError(f"{weights_path}: cannot be read with torch.load(weights_only=True) -- "
                          f"only plain tensors are accepted ({type(exc).__name__})") from exc
    if not isinstance(blob, dict) or blob.get("format") != BUNDLE_FORMAT or not blob.get("folds"):
        raise BundleError(f"{weights_path}: not a {BUNDLE_FORMAT} weights file")
    dev = torch.device(resolve_device(device)) if isinstance(device, str) else device
    models: list[nn.Module] = []
    for i, state in enumerate(blob["folds"]):
        m = build_network(name, kwargs or {}, networks, class_path=class_path)
        try:
            m.load_state_dict({k: (v.float() if v.is_floating_point() else v) for k, v in state.items()})
        except RuntimeError as exc:
            raise BundleError(f"{weights_path}: fold {i} does not fit {name}: {exc}") from exc
        models.append(m.eval().to(dev))
    return models


def load_bundle(path: str | Path, device: str | torch.device = "cpu", *,
                networks: Mapping[str, Callable[..., nn.Module]] | None = None,
                check: bool = True) -> Bundle:
    """Load a bundle: rebuild each fold's network, load its float16 weights as float32, eval mode.

    Parameters
    ----------
    path : path
        The bundle folder.
    device : str or torch.device
        ``"cpu"``, ``"cuda"`` or ``"auto"``.
    networks : mapping, optional
        Extra network factories (for non-built-in architectures).
    check : bool
        Run one zero input of the spec's shape through every model and check
        the number of outputs against the card.

    Returns
    -------
    Bundle

    Raises
    ------
    BundleError
        If a file is missing, the format is unknown, or the spec does not fit the network.
    """
    p = Path(path)
    card_path, weights_path = p / CARD, p / WEIGHTS
    for f in (card_path, weights_path):
        if not f.is_file():
            raise BundleError(f"bundle {p}: {f.name} missing")
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BundleError(f"{card_path}: not valid JSON ({exc})") from exc
    if card.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{card_path}: format {card.get('format')!r} is not {BUNDLE_FORMAT!r}")
    for key in ("protocol", "version", "architecture", "input_spec", "outputs"):
        if key not in card:
            raise BundleError(f"{card_path}: model card lacks {key!r}")
    spec = InputSpec.from_dict(card["input_spec"])
    _check_calibration(card, card_path)
    dev = torch.device(resolve_device(device))
    arch = card["architecture"]
    models = load_networks(weights_path, arch["name"], arch.get("kwargs", {}), dev, networks=networks,
                           class_path=arch.get("class"))
    bundle = Bundle(path=p, card=card, models=models, input_spec=spec, device=dev)
    if check:
        n_out = len(card["outputs"]["names"])
        x = torch.zeros((1, *spec.shape), device=dev)
        e = torch.zeros((1, len(spec.extras)), device=dev) if spec.extras else None
        with torch.no_grad():
            for i, m in enumerate(models):
                try:
                    out = m(x) if e is None else m(x, e)
                except Exception as exc:  # noqa: BLE001 - reported with the bundle's name
                    raise BundleError(f"bundle {p}: fold {i} rejects its own input spec {spec.shape}: {exc}") from exc
                if out.reshape(1, -1).shape[1] != n_out:
                    raise BundleError(f"bundle {p}: fold {i} gives {out.reshape(1, -1).shape[1]} outputs, "
                                      f"card names {n_out}")
    log.info("bundle.loaded", protocol=bundle.protocol, version=bundle.version, folds=len(models), device=str(dev))
    return bundle


def bundle_size(path: str | Path) -> int:
    """Bytes of all files in a bundle folder."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def check_bundle_sizes(models_root: str | Path, limit_mb: float) -> dict[str, int]:
    """Sizes of every bundle under ``models_root``; raise if together they exceed ``limit_mb``.

    Parameters
    ----------
    models_root : path
        Folder holding ``<protocol>/`` bundles.
    limit_mb : float
        Budget in MiB (issue 4: 40; with issue 5: 60).

    Returns
    -------
    dict
        ``{protocol: bytes}`` plus ``"total"``.

    Raises
    ------
    BundleError
        When the total is over the limit (the message lists the largest bundle).
    """
    root = Path(models_root)
    sizes = {d.name: bundle_size(d) for d in sorted(root.iterdir()) if d.is_dir() and (d / CARD).is_file()} \
        if root.is_dir() else {}
    total = sum(sizes.values())
    if total > limit_mb * 1024 * 1024:
        biggest = max(sizes, key=sizes.get)  # type: ignore[arg-type]
        raise BundleError(f"bundles under {root} take {total / 2**20:.1f} MiB > {limit_mb} MiB "
                          f"(largest: {biggest}, {sizes[biggest] / 2**20:.1f} MiB); use fewer folds or a narrower network")
    return {**sizes, "total": total}
