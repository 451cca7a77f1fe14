"""Dataset builder of ``lumbar_sagittal`` (Yoshida et al. 2023): sagittal L1-L4 -> BMD, TBS.

One sample per vertebra: the input is its mid-vertebral sagittal image made by
:func:`screener.protocols.lumbar_sagittal.preprocess.preprocess`, the targets are
``[aBMD of that vertebra (g/cm^2), the patient's TBS]``; the four samples of a
patient share its id (splits never separate them; the patient value is the
mean of L1-L4).

Sources (``[data] source``)
---------------------------
``cohort``
    The virtual cohort: ``n`` patients of cohort ``seed``; each patient gets a
    scanner profile drawn from ``profiles + holdout_profiles`` (attribute
    ``"profile"``).  The sagittal planes are rendered from the analytic phantom
    through the vertebral centroids of the phantom's truth, imitating the
    profile (effective energy of its kVp, contrast phase, kernel blur, the
    slice-thickness profile along z, noise scaled to its slice thickness and
    the patient's size; outside the profile's z coverage the plane is air, as in
    a reformat of a series that stops there).  Targets: the phantom's DXA-style per-vertebra aBMD
    (``abmd_L1``..``abmd_L4`` of :func:`training.phantoms.labels.patient_labels`,
    computed here from the spine projection only, which is what those labels
    are) and :func:`training.phantoms.labels.tbs_score`.
``manifest``
    A site CSV (``training/manifest.py``) with ``bmd`` (DXA L1-L4, g/cm^2) and
    ``tbs`` per CT series: the series is loaded, the spine located with
    :func:`screener.localizer.locate_spine` and preprocessed exactly as the
    daemon protocol does.  The manifest has one BMD per study, so every vertebra
    gets the L1-L4 value (the paper used each vertebra's own DXA value).

``[data] options``: ``fov_mm``, ``size``, ``slab_mm``, ``slab_planes``, ``windows``,
``energy_correction`` (the preprocessing constants, written into the model card).  With
``energy_correction`` the HU are rescaled to 120 kVp by the kVp of the sample's series: the
scanner profile's ``kvp`` in the cohort, the DICOM ``KVP`` of a manifest row (as in the daemon).
``habitus_copies`` (cohort only, default 0): the share of patients rendered a second time with
another habitus and the same bone -- weight x 0.8-1.35 (body size, fat, noise), muscle and fat
density x 0.97-1.03 -- and the same targets, so that body size and soft tissue stop predicting
BMD (issue 19: the model read a 25 % heavier patient's L1 0.087 g/cm² higher). A copy keeps its
patient's id (the splits keep it with the original) and has attribute ``habitus`` ``"copy"``.
"""
from __future__ import annotations

import dataclasses
import sys
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from screener.protocols.lumbar_sagittal import preprocess as pp

__all__ = ["OUTPUTS", "UNITS", "build", "build_cohort", "build_manifest", "phantom_source", "spine_abmd"]

OUTPUTS = ("bmd", "tbs")
UNITS = ("g/cm2", "")
_OPTION_KEYS = {"fov_mm", "size", "slab_mm", "slab_planes", "windows", "energy_correction", "habitus_copies"}
#: range of the weight factor and of the muscle / fat density factors of a habitus copy
HABITUS_WEIGHT = (0.8, 1.35)
HABITUS_DENSITY = (0.97, 1.03)


def _pp_options(options: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - _OPTION_KEYS)
    if unknown:
        raise ValueError(f"lumbar_sagittal [data] options: unknown key(s) {unknown}; "
                         f"known: {', '.join(sorted(_OPTION_KEYS))}")
    return {"fov_mm": float(options.get("fov_mm", pp.FOV_MM)), "size": int(options.get("size", pp.SIZE)),
            "habitus_copies": float(options.get("habitus_copies", 0.0)),
            "slab_mm": float(options.get("slab_mm", pp.SLAB_MM)),
            "slab_planes": int(options.get("slab_planes", pp.SLAB_PLANES)),
            "windows": tuple((float(c), float(w)) for c, w in options.get("windows", pp.WINDOWS)),
            "energy_correction": bool(options.get("energy_correction", pp.ENERGY_CORRECTION))}


def spine_abmd(scene: Any) -> dict[str, float]:
    """Per-vertebra DXA-style aBMD (g/cm^2) of L1..L4 and L1-L4.

    The spine half of :func:`training.phantoms.dxa.areal_bmd_truth` (same ROI
    boxes, projection and edge rule, 1 mm grid), without the two hip
    projections that this protocol does not need (3x faster).
    """
    from training.phantoms import dxa
    from training.phantoms.labels import _BoneOnlyScene

    s = _BoneOnlyScene(scene)
    boxes = dxa.spine_boxes(s)
    z_lo = min(b[0] for b in boxes.values())
    z_hi = max(b[1] for b in boxes.values())
    x_lo = min(b[2] for b in boxes.values())
    x_hi = max(b[3] for b in boxes.values())
    u = np.arange(x_lo, x_hi, 1.0) + 0.5
    v = np.arange(z_hi, z_lo, -1.0) - 0.5
    verts = {vt.label: vt for vt in scene.vertebrae}
    ys = [verts[k].centroid_mm[1] for k in pp.LEVELS]
    depth = max(float(verts[k].depth_mm) for k in pp.LEVELS)
    y_range = (min(ys) - 0.5 * depth - 25.0, max(ys) + 0.5 * depth + 90.0)
    ha = dxa.project(dxa._MaterialSampler(s, ("ha",)), u, v, y_range, 1.0)["ha"]
    meas = dxa.measure_rois(ha, boxes, u, v, (1.0, 1.0), 0.25)
    return {k: float(m["abmd"]) for k, m in meas.items()}


def phantom_source(scene: Any, profile: Any, seed: int) -> Callable[..., np.ndarray]:
    """A plane source that renders the phantom the way ``profile``'s axial series would look.

    Parameters
    ----------
    scene : training.phantoms.anatomy.Scene
    profile : training.phantoms.profiles.ScannerProfile
    seed : int
        Noise seed; successive calls draw successive noise fields.

    Returns
    -------
    callable
        ``source(origin, u, v, shape, spacing) -> HU float32``.
    """
    from training.phantoms import physics
    from screener.preprocess.sampling import plane_points
    from training.phantoms.ct import coverage_range, render_plane

    kev = physics.effective_energy(profile.kvp)
    rng = np.random.default_rng(seed)
    size_factor = float(np.clip(np.sqrt(scene.patient.bmi / 25.0), 0.8, 1.5))
    sd = profile.noise_hu * profile.kernel.noise_factor * np.sqrt(5.0 / profile.slice_thickness) * size_factor
    bias = float(rng.normal(0.0, 2.0))
    z_top, z_bottom = coverage_range(scene, profile.coverage, rng)

    def source(origin: Sequence[float], u: Sequence[float], v: Sequence[float], shape: tuple[int, int],
               spacing: tuple[float, float]) -> np.ndarray:
        hu = render_plane(scene, origin, u, v, shape, spacing, kev, phase=profile.phase,
                          blur_mm=profile.kernel.sigma_mm).astype(np.float64)
        dz = float(spacing[0])
        # slice sensitivity profile along z (rows run along -z): a box of the slice thickness
        k = profile.slice_thickness / dz
        if k > 1.0:
            hu = ndimage.uniform_filter1d(hu, size=max(1, int(round(k))), axis=0, mode="nearest")
        wn = rng.standard_normal(shape)
        sig_col = profile.kernel.noise_sigma_px * profile.pixel_spacing / float(spacing[1])
        sig_row = max(profile.slice_thickness / dz / 2.5, sig_col)
        if sig_col > 0.05 or sig_row > 0.05:
            wn = ndimage.gaussian_filter(wn, (sig_row, sig_col))
            wn /= max(float(wn.std()), 1e-6)
        hu = hu + sd * wn + bias
        # outside the series' z coverage a reformat has no data (the sampler's air)
        z = plane_points(origin, u, v, shape, spacing)[..., 2]
        hu[(z > z_top) | (z < z_bottom)] = -1000.0
        return hu.astype(np.float32)

    return source


def _profile_for(seed: int, index: int, names: Sequence[str]) -> str:
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index), 0x5A6])
    return str(names[int(rng.integers(len(names)))])


def build_cohort(n: int, seed: int, profiles: Sequence[str], holdout_profiles: Sequence[str] = (), *,
                 fov_mm: float = pp.FOV_MM, size: int = pp.SIZE, slab_mm: float = pp.SLAB_MM,
                 slab_planes: int = pp.SLAB_PLANES, windows: Sequence[Sequence[float]] = pp.WINDOWS,
                 energy_correction: bool = pp.ENERGY_CORRECTION, habitus_copies: float = 0.0,
                 progress: bool = False) -> Any:
    """Virtual-cohort data set (see module docstring).

    Parameters
    ----------
    n, seed : int
        Patients and cohort seed.
    profiles, holdout_profiles : sequence of str
        Scanner profiles (``training.phantoms.profiles``); each patient gets one of
        either list (the held-out ones are kept out of training by ``screener train``).
    fov_mm, size, slab_mm, slab_planes, windows, energy_correction
        Preprocessing constants (:mod:`screener.protocols.lumbar_sagittal.preprocess`); the energy
        correction uses each profile's kVp.
    habitus_copies : float
        Share of patients rendered again with another habitus and the same bone (module docstring).
    progress : bool
        Print a line every 50 patients (stderr).

    Returns
    -------
    training.trainer.ArrayDataset
        ``4 n`` samples (and 4 per habitus copy) ``(len(windows), size, size)``; targets ``(4 n, 2)``;
        attributes ``profile``, ``vertebra``, ``grade_jos`` (of the patient's L1-L4 %YAM), ``habitus``
        (``"drawn"`` or ``"copy"``).
    """
    from training.phantoms.labels import YAM_L1L4, jos_grade
    from training.phantoms.population import make_patient
    from training.phantoms.profiles import get_profile
    from training.trainer import ArrayDataset

    names = list(profiles) + list(holdout_profiles)
    if not names:
        raise ValueError("lumbar_sagittal cohort: [data] profiles is empty; name at least one CT profile")
    for nm in names:
        get_profile(nm)  # fails with the list of valid names
    pp_kwargs = dict(fov_mm=fov_mm, size=size, slab_mm=slab_mm, slab_planes=slab_planes, windows=windows,
                     energy_correction=energy_correction)
    images, targets, pids, prof, level, grade, habitus = [], [], [], [], [], [], []
    for i in range(int(n)):
        name = _profile_for(seed, i, names)
        patient = make_patient(int(seed), i)
        variants = [("drawn", patient, None)]
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, i, 0x4AB])
        if rng.uniform() < habitus_copies:
            factors = (float(rng.uniform(*HABITUS_DENSITY)), float(rng.uniform(*HABITUS_DENSITY)))
            variants.append(("copy", dataclasses.replace(patient, weight_kg=patient.weight_kg
                                                         * float(rng.uniform(*HABITUS_WEIGHT))), factors))
        for tag, who, densities in variants:
            x, abmd, tbs = _patient_samples(who, get_profile(name), f"{seed}:{i}:{name}" + ("" if tag == "drawn" else ":copy"),
                                            densities, pp_kwargs)
            g = jos_grade(100.0 * abmd["L1-L4"] / YAM_L1L4)
            for j, lv in enumerate(pp.LEVELS):
                images.append(x[j])
                targets.append((abmd[lv], tbs))
                pids.append(patient.patient_id)
                prof.append(name)
                level.append(lv)
                grade.append(g)
                habitus.append(tag)
        if progress and (i + 1) % 50 == 0:
            print(f"lumbar_sagittal cohort: {i + 1}/{n} patients rendered", file=sys.stderr)
    return ArrayDataset(
        images=np.stack(images), targets=np.asarray(targets, dtype=np.float32), patient_ids=np.asarray(pids),
        strata=np.asarray(grade),
        attributes={"profile": np.asarray(prof), "vertebra": np.asarray(level), "grade_jos": np.asarray(grade),
                    "habitus": np.asarray(habitus)},
        meta={"source": f"virtual cohort seed {seed}, {n} patients (synthetic)", "outputs": list(OUTPUTS),
              "units": list(UNITS),
              "preprocessing": pp.constants(fov_mm=fov_mm, size=size, slab_mm=slab_mm, slab_planes=slab_planes,
                                            windows=windows, energy_correction=energy_correction),
              "targets": "per-vertebra DXA-style aBMD (phantom truth) and the patient's TBS-like score"},
    )


def _patient_samples(patient: Any, profile: Any, noise_key: str, densities: tuple[float, float] | None,
                     pp_kwargs: Mapping[str, Any]) -> tuple[np.ndarray, dict[str, float], float]:
    """One patient's four sagittal inputs, per-vertebra aBMD and TBS, rendered in ``profile``.

    ``densities`` = (muscle, fat) factors on those tissues' densities (a habitus copy), or None.
    """
    from training.phantoms.anatomy import build_scene
    from training.phantoms.interventions import scale_tissue_density
    from training.phantoms.labels import tbs_score

    full = build_scene(patient)
    verts = {v.label: v for v in full.vertebrae}
    cz = [verts[lv].centroid_mm[2] for lv in pp.LEVELS]
    half = float(pp_kwargs["fov_mm"]) / 2.0 + 10.0
    scene = build_scene(patient, z_window=(min(cz) - half, max(cz) + half))
    if densities is not None:
        scale_tissue_density(scene, "muscle", densities[0])
        scale_tissue_density(scene, "fat", densities[1])
    src = phantom_source(scene, profile, zlib.crc32(noise_key.encode()))
    geom = {lv: verts[lv].centroid_mm for lv in pp.LEVELS}
    x, _ = pp.preprocess(src, geom, kvp=float(profile.kvp), **pp_kwargs)
    return x, spine_abmd(full), tbs_score(full)


def _series_files(paths: Sequence[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file())
        else:
            out.append(p)
    return out


def build_manifest(path: str | Path, *, fov_mm: float = pp.FOV_MM, size: int = pp.SIZE,
                   slab_mm: float = pp.SLAB_MM, slab_planes: int = pp.SLAB_PLANES,
                   windows: Sequence[Sequence[float]] = pp.WINDOWS,
                   energy_correction: bool = pp.ENERGY_CORRECTION) -> Any:
    """Site-manifest data set: each row's CT series, located and preprocessed as in the daemon.

    Parameters
    ----------
    path : path
        Manifest CSV with ``bmd`` (DXA L1-L4) and ``tbs`` filled on every row.
    fov_mm, size, slab_mm, slab_planes, windows, energy_correction
        Preprocessing constants (the energy correction reads the series' ``KVP``).

    Returns
    -------
    training.trainer.ArrayDataset

    Raises
    ------
    ValueError
        When no row could be used (each row's problem is listed).
    """
    from screener.localizer import locate_spine
    from screener.preprocess.sampling import VolumeSampler
    from screener.series import load_volume, read_series_info
    from training.manifest import read_manifest
    from training.trainer import ArrayDataset

    man = read_manifest(path, require=("bmd", "tbs"))
    images, targets, pids, prof, level = [], [], [], [], []
    problems: list[str] = []
    for row in man.rows:
        try:
            files = _series_files(row.dicom_paths)
            vol = load_volume(files)
            kvp = read_series_info(files).kvp
            loc = locate_spine(vol)
            x, _ = pp.preprocess(VolumeSampler(vol), loc, fov_mm=fov_mm, size=size, slab_mm=slab_mm,
                                 slab_planes=slab_planes, windows=windows, energy_correction=energy_correction,
                                 kvp=kvp)
        except Exception as exc:  # noqa: BLE001 - reported per row, the row is skipped
            problems.append(f"{man.path} row {row.row}: skipped ({exc})")
            continue
        for j, lv in enumerate(pp.LEVELS):
            images.append(x[j])
            targets.append((float(row.bmd), float(row.tbs)))  # type: ignore[arg-type]
            pids.append(row.patient_id)
            prof.append(row.profile or "")
            level.append(lv)
    for msg in problems:
        print(msg, file=sys.stderr)
    if not images:
        raise ValueError(f"{man.path}: no usable row ({len(problems)} skipped): " + "; ".join(problems[:5]))
    return ArrayDataset(
        images=np.stack(images), targets=np.asarray(targets, dtype=np.float32), patient_ids=np.asarray(pids),
        attributes={"profile": np.asarray(prof), "vertebra": np.asarray(level)},
        meta={"source": f"site manifest {Path(path).name}, {len(man.rows) - len(problems)} series",
              "outputs": list(OUTPUTS), "units": list(UNITS), "skipped_rows": problems,
              "preprocessing": pp.constants(fov_mm=fov_mm, size=size, slab_mm=slab_mm, slab_planes=slab_planes,
                                            windows=windows, energy_correction=energy_correction),
              "targets": "DXA L1-L4 BMD (every vertebra) and TBS of the manifest"},
    )


def build(recipe: Any) -> Any:
    """Data-set builder (:data:`training.plan.DATASET_FACTORIES`): the recipe's ``[data]`` -> :class:`~training.trainer.ArrayDataset`."""
    d = recipe.data
    opts = _pp_options(d.options)
    if d.source == "manifest":
        opts.pop("habitus_copies")
        return build_manifest(d.path, **opts)
    if d.source != "cohort":
        raise ValueError(f"lumbar_sagittal: [data] source {d.source!r} unknown (cohort or manifest)")
    return build_cohort(d.n, d.seed, d.profiles, d.holdout_profiles, progress=True, **opts)
