"""Dataset builder of protocol ``l1_axial`` (Kang et al. 2023): axial L1 crops -> L1 DXA aBMD.

``build(recipe)`` returns an :class:`~training.trainer.ArrayDataset` with one
sample per slice: the reference slice (largest L1 trabecular area) and its
neighbours, each an ``(1, size, size)`` crop from
:func:`screener.protocols.l1_axial.preprocess.preprocess`; the target is the patient's
L1 aBMD (g/cm^2).

* ``[data] source = "cohort"``: ``n`` virtual-cohort patients
  (:func:`training.phantoms.population.make_patient`, seeded by ``[data] seed``),
  each with a scanner profile drawn from ``profiles + holdout_profiles``
  (attribute ``"profile"``).  Only the anatomy around L1 is built
  (``build_scene(z_window=...)``); the label is the L1 aBMD measured like
  :func:`training.phantoms.dxa.areal_bmd_truth` but on the L1 box alone
  (:func:`l1_abmd`, identical number, ~5x faster).  The plane source renders
  the phantom at the profile's effective energy and contrast phase, averages
  sub-planes across the slice thickness, blurs with the kernel and adds the
  profile's noise; slices lie on the profile's slice grid (random phase).
* ``[data] source = "manifest"``: a site CSV (``patient_id``, ``dicom_path``
  = one axial CT series, ``bmd`` = L1 DXA aBMD); each series goes through the
  daemon's own path -- :func:`screener.series.load_volume`, the spine localizer,
  :func:`screener.protocols.l1_axial.preprocess.preprocess_volume` -- so site training
  sees exactly what inference sees.

``[data] options``: ``size`` (crop pixels = the network's ``input_size``),
``fov_mm``, ``n_neighbours``, ``centroid_jitter_mm`` (cohort: SD of the
localizer-like error added to the true centroid), ``energy_correction``
(rescale the crops' HU to 120 kVp equivalents by the series' kVp: the scanner
profile's ``kvp`` in the cohort, the DICOM ``KVP`` of a manifest row, as the
daemon does; written into the model card's preprocessing constants; off
when the recipe does not say, as in the recipes written before it existed),
``exclude_l1_affected`` (cohort: leave out patients whose L1 has no valid
DXA reference under ISCD practice -- a fracture or marked degeneration, see
:func:`l1_dxa_status` -- as a clinical CT + DXA data set would; their patient
index is still drawn, so the other patients are unchanged).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from screener.protocols.l1_axial import preprocess as P
from training.metrics import KANG_T_REFERENCE
from training.trainer import ArrayDataset

__all__ = ["build", "build_cohort", "build_manifest", "cohort_sample", "l1_abmd", "l1_dxa_status", "options"]

KANG_T = KANG_T_REFERENCE  # Kang et al.'s L1 T-score reference, from the one table
DEFAULT_OPTIONS: dict[str, Any] = {"size": P.SIZE, "fov_mm": P.FOV_MM, "n_neighbours": P.N_NEIGHBOURS,
                                   "centroid_jitter_mm": 1.5, "energy_correction": P.ENERGY_CORRECTION,
                                   "exclude_l1_affected": False}


def options(recipe: Any) -> dict[str, Any]:
    """``[data] options`` merged over the defaults; unknown keys are an error."""
    opts = dict(recipe.data.options)
    unknown = sorted(set(opts) - set(DEFAULT_OPTIONS))
    if unknown:
        raise ValueError(f"l1_axial: unknown [data] options key {unknown[0]!r} "
                         f"(known: {', '.join(sorted(DEFAULT_OPTIONS))})")
    out = {**DEFAULT_OPTIONS, **opts}
    size = int(out["size"])
    kw = dict(recipe.network.kwargs)
    if "input_size" in kw and int(kw["input_size"]) != size:
        raise ValueError(f"l1_axial: [data] options size = {size} but [network] kwargs input_size = "
                         f"{kw['input_size']}: make them equal")
    return out


def l1_abmd(scene: Any, pixel_mm: float = 1.0, dy_mm: float = 1.0, edge_threshold: float = 0.25) -> float:
    """L1 aBMD (g/cm^2) as :func:`training.phantoms.dxa.areal_bmd_truth` measures it, L1 box only."""
    from training.phantoms.dxa import _MaterialSampler, measure_rois, spine_boxes
    from training.phantoms.labels import _BoneOnlyScene
    from training.phantoms.xray import project

    box = spine_boxes(scene)["L1"]
    # the full label projects over all of L1-L4's box extent; keep the same grid origin so pixels coincide
    boxes = spine_boxes(scene)
    x_lo = min(b[2] for b in boxes.values())
    z_hi = max(b[1] for b in boxes.values())
    u_all = np.arange(x_lo, max(b[3] for b in boxes.values()), pixel_mm) + pixel_mm / 2
    v_all = np.arange(z_hi, min(b[0] for b in boxes.values()), -pixel_mm) - pixel_mm / 2
    u = u_all[(u_all >= box[2] - 3 * pixel_mm) & (u_all < box[3] + 3 * pixel_mm)]
    v = v_all[(v_all >= box[0] - 3 * pixel_mm) & (v_all < box[1] + 3 * pixel_mm)]
    verts = {vv.label: vv for vv in scene.vertebrae}
    lumbar = ("L1", "L2", "L3", "L4")
    ys = [verts[k].centroid_mm[1] for k in lumbar]
    depth = max(float(verts[k].depth_mm) for k in lumbar)
    y_range = (min(ys) - 0.5 * depth - 25.0, max(ys) + 0.5 * depth + 90.0)
    ha = project(_MaterialSampler(_BoneOnlyScene(scene), ("ha",)), u, v, y_range, dy_mm)["ha"]
    return float(measure_rois(ha, {"L1": box}, u, v, (pixel_mm, pixel_mm), edge_threshold)["L1"]["abmd"])


def _phantom_source(scene: Any, profile: Any, rng: np.random.Generator) -> Callable[..., np.ndarray]:
    """Plane source rendering ``scene`` as ``profile`` would reconstruct it (see module docstring)."""
    from training.phantoms import physics
    from training.phantoms.ct import render_plane

    kev = physics.effective_energy(profile.kvp)
    thick = float(profile.slice_thickness)
    n_sub = int(min(4, max(1, np.ceil(thick / 1.3))))
    offs = ((np.arange(n_sub) + 0.5) / n_sub - 0.5) * thick
    sd5 = profile.noise_hu * profile.kernel.noise_factor * np.sqrt(5.0 / thick)
    bias = float(rng.normal(0.0, 2.0))
    seeds = iter(rng.integers(0, 2**31 - 1, size=10_000))

    def source(origin: Sequence[float], u: Sequence[float], v: Sequence[float], shape: tuple[int, int],
               spacing: tuple[float, float]) -> np.ndarray:
        acc = None
        for off in offs:
            o = np.asarray(origin, float).copy()
            o[2] += off
            img = render_plane(scene, o, u, v, shape, spacing, kev, phase=profile.phase,
                               blur_mm=profile.kernel.sigma_mm)
            acc = img.astype(np.float64) if acc is None else acc + img
        hu = acc / n_sub
        # the kernel-correlated noise of the native grid, resampled onto this grid, is weaker per pixel
        sd = sd5 * min(1.0, float(profile.pixel_spacing) / float(spacing[0]))
        noise = np.random.default_rng(int(next(seeds))).standard_normal(hu.shape) * sd
        return (hu + noise + bias).astype(np.float32)

    return source


def cohort_sample(seed: int, index: int, profile_name: str, opts: dict[str, Any]
                  ) -> tuple[np.ndarray, float, P.PreprocessInfo, Any]:
    """Images, L1 aBMD, preprocessing info and patient of one virtual-cohort patient."""
    from training.phantoms.anatomy import build_scene
    from training.phantoms.dxa import spine_boxes
    from training.phantoms.population import make_patient
    from training.phantoms.profiles import get_profile

    patient = make_patient(seed, index)
    profile = get_profile(profile_name)
    rng = np.random.default_rng([seed & 0xFFFFFFFF, index, 0x11A])
    truth = build_scene(patient, z_window=(-60.0, 60.0))
    l1 = truth.vertebra("L1")
    box = spine_boxes(truth)["L1"]
    pad = 3 * float(profile.slice_spacing) + 8.0
    z_lo = min(box[0], min(l1.z_range_mm) - pad)
    z_hi = max(box[1], max(l1.z_range_mm) + pad)
    scene = build_scene(patient, z_window=(z_lo - 5.0, z_hi + 5.0))
    abmd = l1_abmd(scene)
    jit = float(opts["centroid_jitter_mm"])
    c = np.asarray(l1.centroid_mm, float) + np.r_[rng.normal(0.0, jit, 2), 0.0]
    geom = P.L1Geometry.from_grid(c, l1.z_range_mm, float(profile.slice_spacing),
                                  phase_mm=float(rng.uniform(0.0, profile.slice_spacing)))
    src = _phantom_source(scene, profile, rng)
    images, info = P.preprocess(src, geom, size=int(opts["size"]), fov_mm=float(opts["fov_mm"]),
                                n_neighbours=int(opts["n_neighbours"]),
                                energy_correction=bool(opts["energy_correction"]), kvp=float(profile.kvp))
    return images, abmd, info, patient


def _meta(opts: dict[str, Any], source: str) -> dict[str, Any]:
    return {"outputs": ["bmd"], "units": ["g/cm2"], "source": source,
            "preprocessing": {**P.CONSTANTS, **P.energy_constants(bool(opts["energy_correction"])),
                              "size": int(opts["size"]), "fov_mm": float(opts["fov_mm"]),
                              "n_neighbours": int(opts["n_neighbours"]),
                              "spacing_mm": float(opts["fov_mm"]) / int(opts["size"])}}


def l1_dxa_status(patient: Any) -> str:
    """``"affected"`` when the patient's L1 DXA value is not a valid reference, else ``"valid"``.

    ISCD practice excludes a vertebra with a fracture or marked degeneration from spine DXA
    analysis: its areal BMD is raised by the collapsed or sclerotic bone.  The cohort's label
    rule (:func:`training.phantoms.labels.structurally_affected`: fracture grade >= 1 or
    degeneration >= 0.5) is applied to L1; the label is kept either way, and ``screener evaluate
    --by l1_dxa`` tabulates both groups.
    """
    from training.phantoms.labels import structurally_affected

    return "affected" if structurally_affected(patient, "L1") else "valid"


def build_cohort(recipe: Any, progress: bool = True) -> ArrayDataset:
    """Virtual-cohort data set of a recipe (see module docstring)."""
    opts = options(recipe)
    d = recipe.data
    names = list(d.profiles) + list(d.holdout_profiles)
    if not names:
        from training.phantoms.profiles import TRAINING_PROFILES

        names = list(TRAINING_PROFILES)
    imgs, tgts, pids, profs, roles, l1_dxa = [], [], [], [], [], []
    t0 = time.time()
    for i in range(d.n):
        rng = np.random.default_rng([d.seed & 0xFFFFFFFF, i, 0x9F0])
        prof = names[int(rng.integers(len(names)))]
        if opts["exclude_l1_affected"]:
            from training.phantoms.population import make_patient

            if l1_dxa_status(make_patient(d.seed, i)) != "valid":
                continue
        images, abmd, info, patient = cohort_sample(d.seed, i, prof, opts)
        for s in range(len(images)):
            imgs.append(images[s])
            tgts.append(abmd)
            pids.append(patient.patient_id)
            profs.append(prof)
            roles.append("reference" if s == 0 else "neighbour")
            l1_dxa.append(l1_dxa_status(patient))
        if progress and (i + 1) % 25 == 0:
            el = time.time() - t0
            print(f"\rl1_axial cohort: {i + 1}/{d.n} patients ({el:.0f} s, ~{el / (i + 1) * (d.n - i - 1):.0f} s left)",
                  end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    targets = np.asarray(tgts, dtype=np.float32)
    t = (targets - KANG_T[0]) / KANG_T[1]
    return ArrayDataset(images=np.stack(imgs), targets=targets, patient_ids=np.asarray(pids),
                        strata=(t < -1.0).astype(np.int64),
                        attributes={"profile": np.asarray(profs), "slice": np.asarray(roles),
                                    "l1_dxa": np.asarray(l1_dxa)},
                        meta=_meta(opts, f"virtual cohort n={d.n} seed={d.seed}"))


def _series_files(paths: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        files.extend(sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p])
    return files


def build_manifest(recipe: Any) -> ArrayDataset:
    """Site-manifest data set: each row's CT series through the daemon's inference path."""
    from screener.localizer import locate_spine
    from screener.series import load_volume, read_series_info
    from training.manifest import read_manifest

    opts = options(recipe)
    man = read_manifest(recipe.data.path, require=("bmd",))
    imgs, tgts, pids, profs, roles = [], [], [], [], []
    problems: list[str] = []
    for row in man.rows:
        try:
            files = _series_files(row.dicom_paths)
            vol = load_volume(files)
            l1 = locate_spine(vol).get("L1")
            if l1 is None:
                raise ValueError("L1 not in view (spine localizer)")
            images, _ = P.preprocess_volume(vol, l1, size=int(opts["size"]), fov_mm=float(opts["fov_mm"]),
                                            n_neighbours=int(opts["n_neighbours"]),
                                            energy_correction=bool(opts["energy_correction"]),
                                            kvp=read_series_info(files).kvp)
        except Exception as exc:  # noqa: BLE001 - reported per row below
            problems.append(f"{man.path} row {row.row}: {exc}")
            continue
        for s in range(len(images)):
            imgs.append(images[s])
            tgts.append(float(row.bmd))
            pids.append(row.patient_id)
            profs.append(row.profile or "site")
            roles.append("reference" if s == 0 else "neighbour")
    if problems:
        print("l1_axial manifest: skipped rows:\n  " + "\n  ".join(problems), file=sys.stderr)
    if not imgs:
        raise ValueError(f"{man.path}: no usable row (every series failed; see the messages above)")
    targets = np.asarray(tgts, dtype=np.float32)
    return ArrayDataset(images=np.stack(imgs), targets=targets, patient_ids=np.asarray(pids),
                        strata=(((targets - KANG_T[0]) / KANG_T[1]) < -1.0).astype(np.int64),
                        attributes={"profile": np.asarray(profs), "slice": np.asarray(roles)},
                        meta=_meta(opts, f"site manifest {man.path.name}"))


def build(recipe: Any) -> ArrayDataset:
    """Dataset builder registered in :data:`training.plan.DATASET_FACTORIES` for ``l1_axial``."""
    if recipe.data.source == "manifest":
        return build_manifest(recipe)
    return build_cohort(recipe)
