"""Dataset builder of ``dxa_spine`` (Nissinen et al. 2021, seed ``003``): DXA spine images -> crops.

``build(recipe)`` returns an :class:`~training.trainer.ArrayDataset` with one sample per patient:
the 150 x 150 centre-line crop of the DXA image (:func:`screener.protocols.dxa_spine.preprocess.dxa_spine_input`,
the function the protocol calls at inference) and three binary targets, in the order of
:data:`OUTPUTS`:

* ``scoliosis`` -- the cohort's Cobb-angle flag (paper: Cobb > 10 deg, radiologists' reading);
* ``unreliable`` -- spine BMD unreliable: >= 3 of L1-L4 affected by fracture, degeneration or
  scoliotic rotation (the paper's rule, :func:`training.phantoms.labels.affected_levels`);
* ``fracture`` -- fragility fracture, "ever" as the paper's training label (25-year follow-up,
  14.4 % positives): a prevalent vertebral fracture or an incident one within 5 years
  (``options.fracture_label = "5y"`` uses only the incident 5-year outcome, 1-4 % positives).

Sources
-------
``[data] source = "cohort"``: patients ``0..n-1`` of the virtual cohort ``seed`` with ages drawn
uniformly in ``options.age_min``-``age_max`` (default 50-90: the paper's OSTPRE women were 62-75,
KUH 20-96), each scanned with one of the recipe's DXA ``profiles`` (:data:`DXA_PROFILES`), plus
``options.holdout_n`` more patients (default n / 5) scanned with the ``holdout_profiles``.
``options.supersample_rows`` / ``options.dy_mm`` trade rendering time for anti-aliasing (defaults
3 / 1.0 as ``screener phantom``).

``[data] source = "manifest"``: a site CSV (:mod:`training.manifest`) with ``dicom_path`` (the DXA
image), ``scoliosis``, ``unreliable``, ``fracture`` (0/1) and ``t_score`` (the minimum BMD T-score,
used to match the fracture threshold); ``profile`` optional.

Per-sample attributes: ``profile``, ``t_min`` (minimum T-score: the lowest L1-L4 vertebral T of
the rendered DXA measurement with the L1-L4 reference 1.047 / 0.110 g/cm^2 in the cohort; the
manifest's ``t_score``), ``age``.

The fracture threshold (paper: lowered to 0.15 "to approximately match the sensitivity of the
minimum BMD T-score fracture predictor") is chosen after training by
:func:`calibrate_fracture_threshold` on the out-of-fold predictions of the training patients and
stored in the model card (``preprocessing.fracture_threshold``)::

    python -m training.datasets.dxa_spine calibrate models/dxa_spine
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import structlog

from screener.protocols.dxa_spine.preprocess import dxa_spine_input, preprocessing_constants

log = structlog.get_logger(__name__)

__all__ = ["DXA_PROFILES", "OUTPUTS", "build", "calibrate_fracture_threshold", "matched_threshold",
           "render_patient_dxa"]

#: Output columns, named as :data:`training.metrics.NISSINEN_THRESHOLDS`.
OUTPUTS = ("scoliosis", "unreliable", "fracture")
#: WHO osteoporosis threshold used by the T-score benchmark predictor.
T_OSTEOPOROSIS = -2.5
#: L1-L4 young-adult reference (g/cm^2), as :data:`training.phantoms.labels.SPINE_L1L4`.
SPINE_REF = (1.047, 0.110)

#: DXA acquisition profiles of the cohort: pixel (row, column) mm and quanta per pixel (low, high).
DXA_PROFILES: dict[str, dict[str, Any]] = {
    # the seed-003 scanner (Lunar Prodigy pixel 1.05 x 0.60 mm), the renderer's default dose
    "dxa_prodigy": {"pixel_mm": (1.05, 0.60), "photons": (4.0e7, 1.0e7)},
    # same pixel, a quarter of the quanta (faster scan mode / larger patient)
    "dxa_prodigy_fast": {"pixel_mm": (1.05, 0.60), "photons": (1.0e7, 2.5e6)},
    # a different scanner grid (1.0 x 1.0 mm), resampled by the preprocessing: the held-out scanner
    "heldout_dxa_1mm": {"pixel_mm": (1.0, 1.0), "photons": (4.0e7, 1.0e7)},
}


def _profile(name: str) -> dict[str, Any]:
    if name not in DXA_PROFILES:
        raise ValueError(f"unknown DXA profile {name!r}; [data] profiles / holdout_profiles of a dxa_spine "
                         f"recipe must be among {', '.join(DXA_PROFILES)}")
    return DXA_PROFILES[name]


def render_patient_dxa(seed: int, index: int, profile: str, *, age: float | None = None,
                       supersample_rows: int = 3, dy_mm: float = 1.0) -> tuple[Any, dict[str, Any]]:
    """Render one cohort patient's DXA spine image and its labels.

    Parameters
    ----------
    seed, index : int
        Cohort seed and patient index.
    profile : str
        A key of :data:`DXA_PROFILES`.
    age : float, optional
        Age override (other fields stay consistent with it).
    supersample_rows, dy_mm : int, float
        Renderer anti-aliasing and ray step.

    Returns
    -------
    dataset : pydicom.dataset.Dataset
        The Modality BMD image.
    labels : dict
        ``scoliosis``, ``unreliable``, ``fracture_ever``, ``fracture_5y``, ``t_min``, ``age``,
        ``patient_id``.
    """
    from training.phantoms.anatomy import build_scene
    from training.phantoms.dxa import render_dxa_spine
    from training.phantoms.labels import affected_levels
    from training.phantoms.population import make_patient

    prof = _profile(profile)
    patient = make_patient(seed, index, age=age)
    scene = build_scene(patient)
    ds, info = render_dxa_spine(scene, seed, pixel_mm=tuple(prof["pixel_mm"]), photons=tuple(prof["photons"]),
                                supersample=(int(supersample_rows), 1), dy_mm=float(dy_mm))
    levels = [info["abmd"][k] for k in ("L1", "L2", "L3", "L4") if k in info["abmd"]]
    t_min = min((v - SPINE_REF[0]) / SPINE_REF[1] for v in levels) if levels else float("nan")
    return ds, {
        "patient_id": patient.patient_id, "age": float(patient.age),
        "scoliosis": bool(patient.scoliosis),
        "unreliable": len(affected_levels(scene)) >= 3,
        "fracture_5y": bool(patient.fracture_5y),
        "fracture_ever": bool(patient.fracture_5y or patient.prior_vertebral_fracture),
        "t_min": float(t_min),
    }


def _cohort(recipe: Any) -> Any:
    from training.trainer import ArrayDataset

    d = recipe.data
    opt = dict(d.options)
    known = {"age_min", "age_max", "holdout_n", "supersample_rows", "dy_mm", "fracture_label"}
    unknown = set(opt) - known
    if unknown:
        raise ValueError(f"[data] options: unknown key {sorted(unknown)[0]!r} for dxa_spine "
                         f"(known: {', '.join(sorted(known))})")
    age_min, age_max = float(opt.get("age_min", 50.0)), float(opt.get("age_max", 90.0))
    if not 20.0 <= age_min <= age_max <= 90.0:
        raise ValueError(f"[data] options: need 20 <= age_min <= age_max <= 90 (got {age_min}, {age_max})")
    label = str(opt.get("fracture_label", "ever"))
    if label not in ("ever", "5y"):
        raise ValueError(f"[data] options: fracture_label must be \"ever\" or \"5y\" (got {label!r})")
    profiles = list(d.profiles) or ["dxa_prodigy"]
    hold = list(d.holdout_profiles)
    for name in profiles + hold:
        _profile(name)
    n_hold = int(opt.get("holdout_n", d.n // 5)) if hold else 0
    rng = np.random.default_rng([int(d.seed), 3003])
    ages = rng.uniform(age_min, age_max, size=d.n + n_hold)
    prof_draw = rng.integers(0, len(profiles), size=d.n)
    images, targets, pids, attrs = [], [], [], {"profile": [], "t_min": [], "age": []}
    from tqdm import tqdm

    for i in tqdm(range(d.n + n_hold), desc="dxa_spine cohort", unit="patient", leave=False,
                  disable=not sys.stderr.isatty()):
        prof = profiles[int(prof_draw[i])] if i < d.n else hold[(i - d.n) % len(hold)]
        ds, lab = render_patient_dxa(d.seed, i, prof, age=float(ages[i]),
                                     supersample_rows=int(opt.get("supersample_rows", 3)),
                                     dy_mm=float(opt.get("dy_mm", 1.0)))
        images.append(dxa_spine_input(ds).array)
        targets.append([lab["scoliosis"], lab["unreliable"],
                        lab["fracture_ever"] if label == "ever" else lab["fracture_5y"]])
        pids.append(lab["patient_id"])
        attrs["profile"].append(prof)
        attrs["t_min"].append(lab["t_min"])
        attrs["age"].append(lab["age"])
    y = np.asarray(targets, dtype=np.float32)
    return ArrayDataset(
        images=np.stack(images), targets=y, patient_ids=np.asarray(pids),
        strata=(y[:, 0] + 2 * y[:, 1]).astype(np.int64),
        attributes={"profile": np.asarray(attrs["profile"]), "t_min": np.asarray(attrs["t_min"]),
                    "age": np.asarray(attrs["age"])},
        meta=_meta(f"virtual cohort seed {d.seed}, {d.n} patients aged {age_min:g}-{age_max:g} "
                   f"(+{n_hold} held-out scanner), fracture label {label!r}"),
    )


def _meta(source: str) -> dict[str, Any]:
    return {"outputs": list(OUTPUTS), "units": ["probability"] * 3, "source": source,
            "spacing_mm": [1.05, 0.60], "value_range": [0.0, 2.0],
            "preprocessing": {**preprocessing_constants(),
                              "thresholds": {"scoliosis": 0.5, "unreliable": 0.5,
                                             "fracture": "see fracture_threshold (calibrate)"}}}


def _manifest(recipe: Any) -> Any:
    import pydicom

    from training.manifest import read_manifest
    from training.trainer import ArrayDataset

    man = read_manifest(recipe.data.path, require=("scoliosis", "unreliable", "fracture"))
    images, targets, profs, tmin, ages = [], [], [], [], []
    for r in man.rows:
        path = r.dicom_paths[0]
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file())
            if not files:
                raise ValueError(f"{man.path} row {r.row} column dicom_path: folder {path} is empty")
            path = files[0]
        try:
            ds = pydicom.dcmread(path)
            images.append(dxa_spine_input(ds).array)
        except Exception as exc:  # noqa: BLE001 - name the row, whatever pydicom raised
            raise ValueError(f"{man.path} row {r.row} column dicom_path: cannot use {path} as a DXA "
                             f"spine image ({exc})") from exc
        targets.append([r.scoliosis, r.unreliable, r.fracture])
        profs.append(r.profile or "site")
        tmin.append(float("nan") if r.t_score is None else r.t_score)
        ages.append(float("nan") if r.age is None else r.age)
    y = np.asarray(targets, dtype=np.float32)
    return ArrayDataset(images=np.stack(images), targets=y, patient_ids=man.patient_ids,
                        strata=(y[:, 0] + 2 * y[:, 1]).astype(np.int64),
                        attributes={"profile": np.asarray(profs), "t_min": np.asarray(tmin),
                                    "age": np.asarray(ages)},
                        meta=_meta(f"site manifest {man.path.name}, {len(man)} rows"))


def build(recipe: Any) -> Any:
    """The ``dxa_spine`` data set of a recipe (see the module docstring).

    Parameters
    ----------
    recipe : training.recipes.Recipe

    Returns
    -------
    training.trainer.ArrayDataset
        ``images (N, 1, 150, 150)``, ``targets (N, 3)`` in the order of :data:`OUTPUTS`.
    """
    if recipe.data.source == "manifest":
        return _manifest(recipe)
    return _cohort(recipe)


# --- fracture threshold ---------------------------------------------------------------------------

def matched_threshold(y: np.ndarray, p: np.ndarray, target_sensitivity: float) -> float:
    """Highest probability threshold whose sensitivity (``p >= t``) reaches ``target_sensitivity``.

    Parameters
    ----------
    y : numpy.ndarray
        Binary labels.
    p : numpy.ndarray
        Predicted probabilities.
    target_sensitivity : float
        In (0, 1].

    Returns
    -------
    float

    Raises
    ------
    ValueError
        Without positive samples.
    """
    y = np.asarray(y).astype(bool).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    if not y.any():
        raise ValueError("no positive samples: the fracture threshold cannot be matched")
    pos = np.sort(p[y])[::-1]
    k = max(1, int(math.ceil(target_sensitivity * len(pos) - 1e-9)))
    return float(pos[min(k, len(pos)) - 1])


def calibrate_fracture_threshold(bundle_dir: str | Path, *, device: str = "cpu") -> dict[str, Any]:
    """Match the fracture threshold to the minimum-T-score predictor's sensitivity; store it in the card.

    The recipe in the card rebuilds the data set and the split plan; each fold model of the bundle
    predicts its own validation patients (out-of-fold, training patients only, never the test or
    held-out-scanner set).  The sensitivity of ``t_min <= -2.5`` for the fracture label on those
    patients is the target; the threshold is the highest one whose out-of-fold sensitivity
    reaches it.  ``model_card.json`` gets ``preprocessing.fracture_threshold`` and
    ``fracture_threshold`` (how it was chosen); ``README.md`` is re-rendered.

    Parameters
    ----------
    bundle_dir : path
        ``models/dxa_spine``.
    device : str

    Returns
    -------
    dict
        The ``fracture_threshold`` record written to the card.
    """
    from screener.bundles import CARD, README, load_bundle, render_readme
    from training.plan import build_dataset, split_plan
    from training.recipes import recipe_from_dict
    from training.trainer import predict

    bundle = load_bundle(bundle_dir, device)
    recipe = recipe_from_dict(bundle.card["recipe"], where=f"{bundle_dir}/model_card.json recipe")
    ds = build_dataset(recipe)  # the cached cohort of `screener train`
    plan = split_plan(ds, recipe)
    folds = [f for f in plan.folds if f.repeat == 0]
    if len(folds) != len(bundle.models):
        raise ValueError(f"{bundle_dir}: {len(bundle.models)} fold models but the recipe gives {len(folds)} "
                         "folds of repeat 0; was the bundle trained from this recipe?")
    j = list(bundle.output_names).index("fracture")
    idx, probs = [], []
    for fold, model in zip(folds, bundle.models):
        sub = ds.subset(fold.val)
        probs.append(predict(model, sub, task="binary", device=device)[:, j])
        idx.append(fold.val)
    vi = np.concatenate(idx)
    p = np.concatenate(probs)
    y = ds.targets[vi, j].astype(bool)
    t = np.asarray(ds.attributes["t_min"], dtype=np.float64)[vi]
    ok = np.isfinite(t)
    sens_t = float(np.mean(t[ok & y] <= T_OSTEOPOROSIS)) if (ok & y).any() else float("nan")
    if not math.isfinite(sens_t) or sens_t <= 0:
        sens_t = 0.60  # the paper's min-T-score sensitivity (Table 1) when the data cannot give one
        source = "paper (no osteoporotic T-score among fracture cases here)"
    else:
        source = "out-of-fold training patients"
    thr = matched_threshold(y, p, sens_t)
    pred = p >= thr
    rec = {"value": thr, "matched_to": "sensitivity of minimum T-score <= -2.5 for the fracture label",
           "target_sensitivity": sens_t, "target_source": source,
           "oof_sensitivity": float(pred[y].mean()), "oof_specificity": float((~pred[~y]).mean()),
           "n_oof": int(len(vi)), "n_positive": int(y.sum()), "paper_threshold": 0.15}
    card_path = Path(bundle_dir) / CARD
    card = json.loads(card_path.read_text(encoding="utf-8"))
    card.setdefault("preprocessing", {})["fracture_threshold"] = thr
    card["preprocessing"].setdefault("thresholds", {})["fracture"] = thr
    card["fracture_threshold"] = rec
    card_path.write_text(json.dumps(card, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    (Path(bundle_dir) / README).write_text(render_readme(card), encoding="utf-8")
    log.info("dxa_spine.fracture_threshold", **{k: v for k, v in rec.items() if not isinstance(v, str)})
    return rec


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m training.datasets.dxa_spine calibrate BUNDLE``."""
    ap = argparse.ArgumentParser(prog="python -m training.datasets.dxa_spine")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("calibrate", help="match the fracture threshold and store it in the model card")
    c.add_argument("bundle", help="bundle folder, e.g. models/dxa_spine")
    c.add_argument("--device", default="cpu")
    args = ap.parse_args(list(sys.argv[1:] if argv is None else argv))
    rec = calibrate_fracture_threshold(args.bundle, device=args.device)
    print(json.dumps(rec, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
