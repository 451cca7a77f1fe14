"""Dataset builder of protocol ``femur_coronal`` (Ha et al. 2024): cohort or site manifest -> ArrayDataset.

Both sources go through :func:`screener.protocols.femur_coronal.preprocess.preprocess`:

* ``source = "cohort"``: patients from :func:`training.phantoms.population.sample_population`
  (``[data] n``, ``seed``), one scanner profile each drawn from ``profiles`` +
  ``holdout_profiles``; the two coronal crops are rendered from the analytic phantom by
  :class:`PhantomCoronalSource`, which imitates a coronal reformat of that profile's axial
  series (slices of the profile's thickness and spacing, linear interpolation between slice
  centres, kernel blur, per-slice correlated noise, air below the coverage).  Geometry = the
  phantom's femoral-head truth.  Demographics are rounded as the DICOM header writes them.
* ``source = "manifest"``: each row's DICOM series is loaded, the heads located and the inputs
  computed by :func:`screener.protocols.femur_coronal.preprocess.volume_inputs` (the daemon's path).

Label (``[data] options.label``): the WHO class of a DXA T-score.  Ha et al. label with "the
T-score from DXA" without naming the site; the default ``"hip"`` is the lower of the left
femoral-neck and total-hip T-scores (hip DXA, NHANES III references of the cohort), the site
the images show.  ``"femoral_neck"`` and ``"total_hip"`` use one site.  Classes: 0 normal
(T >= -1), 1 osteopenia, 2 osteoporosis (T <= -2.5).

``[data] options.kvp_range = [low, high]``: each training-profile patient is rendered at a tube
voltage drawn uniformly from the range (Ha et al.'s scans span 80-140 kVp); the held-out
profiles keep their own kVp.

``[data] options.energy_correction`` (default
:data:`screener.protocols.femur_coronal.preprocess.ENERGY_CORRECTION`, written into the model card's
preprocessing constants): the HU are rescaled to their 120 kVp equivalent by the tube voltage
of the sample's series before windowing -- the rendered kVp in the cohort (attribute ``kvp``),
the first image's ``KVP`` of a manifest row, as the daemon reads it.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import structlog

from screener.protocols.femur_coronal import preprocess as P
from screener.scores import who_grade

log = structlog.get_logger(__name__)

__all__ = ["CLASSES", "PhantomCoronalSource", "build", "cohort_sample", "grade_index"]

CLASSES = ("normal", "osteopenia", "osteoporosis")
#: profiles whose coverage includes the femoral heads (abdomen-pelvis)
HIP_PROFILES = ("siemens_ap_pv", "ge_ap_pv", "philips_ap_arterial", "canon_ap_native")
LABELS = ("hip", "femoral_neck", "total_hip")
#: scene window around the hip joints (mm)
Z_BELOW_MM, Z_ABOVE_MM = 130.0, 140.0
#: hip-DXA truth grid (mm); 1.5 mm keeps the label within ~0.01 g/cm2 of the 1 mm value, 2x faster
HIP_TRUTH_GRID_MM = 1.5


def grade_index(t: float) -> int:
    """WHO class index of a T-score (0 normal, 1 osteopenia, 2 osteoporosis)."""
    return ("normal", "osteopenia", "osteoporosis").index(who_grade(t))  # who_grade refuses a non-finite T


class PhantomCoronalSource:
    """Plane source that imitates a coronal reformat of a profile's axial series of a phantom.

    Parameters
    ----------
    scene : training.phantoms.anatomy.Scene
    profile : training.phantoms.profiles.ScannerProfile
    seed : int
        Noise / slice-phase seed.
    z_bottom : float
        Centre of the series' last (most inferior) slice; below it the reformat is air (-1000).
    """

    def __init__(self, scene: Any, profile: Any, seed: int, z_bottom: float) -> None:
        from training.phantoms import physics

        self.scene = scene
        self.profile = profile
        self.rng = np.random.default_rng(seed)
        self.kev = physics.effective_energy(profile.kvp)
        self.z_bottom = float(z_bottom)
        self.phase_mm = float(self.rng.uniform(0.0, profile.slice_spacing))
        self.bias = float(self.rng.normal(0.0, 2.0))
        self.noise_sd = (profile.noise_hu * profile.kernel.noise_factor
                         * math.sqrt(5.0 / profile.slice_thickness) * self._size_factor())

    def _size_factor(self) -> float:
        from training.phantoms.ct import _size_factor

        z = float(np.mean([h[2] for h in self.scene.femoral_heads.values()]))
        ps = 4.0
        lab = self.scene.label_plane(np.array([-300.0 + ps / 2, -300.0 + ps / 2, z]), np.array([1.0, 0, 0]),
                                     np.array([0, 1.0, 0]), (150, 150), (ps, ps), table=True)
        return _size_factor(lab, self.scene.tissues.ids("table"), ps)

    def __call__(self, origin: Sequence[float], u: Sequence[float], v: Sequence[float],
                 shape: tuple[int, int], spacing: tuple[float, float]) -> np.ndarray:
        """HU of a coronal plane (``v`` must be ``(0, 0, -1)``) as a reformat of axial slices."""
        from scipy import ndimage

        from training.phantoms.ct import render_plane

        o = np.asarray(origin, dtype=np.float64)
        if not np.allclose(np.asarray(v, float), (0.0, 0.0, -1.0)):
            raise ValueError("PhantomCoronalSource renders coronal/sagittal planes with v = (0, 0, -1) only")
        prof = self.profile
        sp = prof.slice_spacing
        z_top, z_low = o[2], o[2] - (shape[0] - 1) * spacing[0]
        # slice centres covering the plane (a grid of the series' spacing with a random phase)
        k0 = math.floor((z_low - self.phase_mm) / sp) - 1
        k1 = math.ceil((z_top - self.phase_mm) / sp) + 1
        zc = self.phase_mm + sp * np.arange(k1, k0 - 1, -1, dtype=np.float64)  # superior first
        n_sub = int(min(4, max(1, math.ceil(prof.slice_thickness / 1.3))))
        offs = ((np.arange(n_sub) + 0.5) / n_sub - 0.5) * prof.slice_thickness
        acc = np.zeros((len(zc), shape[1]), np.float64)
        for off in offs:
            # one coronal pass per sub-offset: rows at the slice centres (+ offset)
            o2 = o.copy()
            o2[2] = zc[0] + off
            acc += render_plane(self.scene, o2, u, v, (len(zc), shape[1]), (sp, spacing[1]), self.kev,
                                phase=prof.phase)
        hu = acc / n_sub
        sig = prof.kernel.sigma_mm / spacing[1]
        if sig > 0.05:
            hu = ndimage.gaussian_filter1d(hu, sig, axis=1, mode="nearest")
        wn = self.rng.standard_normal(hu.shape)
        ns = prof.kernel.noise_sigma_px * prof.pixel_spacing / spacing[1]
        if ns > 0.05:
            wn = ndimage.gaussian_filter1d(wn, ns, axis=1)
            wn /= max(float(wn.std()), 1e-6)
        hu = hu + self.noise_sd * wn + self.bias
        hu[zc < self.z_bottom - 1e-6] = np.nan
        # linear interpolation between slice centres onto the plane's rows (as a trilinear sampler)
        zr = z_top - spacing[0] * np.arange(shape[0])
        f = (zc[0] - zr) / sp
        i0 = np.clip(np.floor(f).astype(int), 0, len(zc) - 2)
        w = (f - i0)[:, None]
        out = (1.0 - w) * hu[i0] + w * hu[i0 + 1]
        out[zr < self.z_bottom - 1e-6] = -1000.0
        return np.nan_to_num(out, nan=-1000.0).astype(np.float32)


def _hip_t(scene: Any, label: str) -> float:
    from training.phantoms.dxa import hip_truth
    from training.phantoms.labels import NHANES_FN, NHANES_TH, _BoneOnlyScene

    # bone-only view: identical mineral projection, ~2x cheaper
    h = hip_truth(_BoneOnlyScene(scene), "L", pixel_mm=HIP_TRUTH_GRID_MM, dy_mm=HIP_TRUTH_GRID_MM)
    t_fn = (h["femoral_neck"] - NHANES_FN[0]) / NHANES_FN[1]
    t_th = (h["total_hip"] - NHANES_TH[0]) / NHANES_TH[1]
    return {"hip": min(t_fn, t_th), "femoral_neck": t_fn, "total_hip": t_th}[label]


def cohort_sample(patient: Any, profile_name: str, seed: int, label: str = "hip", kvp: float | None = None,
                  energy_correction: bool = P.ENERGY_CORRECTION
                  ) -> tuple[np.ndarray, np.ndarray, float, dict[str, Any]]:
    """One virtual-cohort sample.

    Parameters
    ----------
    patient : training.phantoms.population.Patient
    profile_name : str
    seed : int
        Cohort seed (noise, coverage jitter).
    label : str
        T-score site (module docstring).
    kvp : float, optional
        Tube voltage instead of the profile's (the cohort's kVp randomisation).
    energy_correction : bool
        Rescale the HU to 120 kVp by the rendered tube voltage (:func:`P.preprocess`).

    Returns
    -------
    image, demographics, t_score, info
        ``info`` holds ``heads``, ``planes`` and the rendered ``kvp``.
    """
    from training.phantoms.anatomy import build_scene
    from training.phantoms.profiles import get_profile

    prof = get_profile(profile_name)
    if kvp is not None:
        prof = prof.with_(kvp=float(kvp))
    z_hip = build_scene(patient, z_window=(0.0, 0.0)).landmarks["z_hip"]
    # only the hip region (the crops reach 115 mm above and 85 mm below the heads): faster
    scene = build_scene(patient, z_window=(z_hip - Z_BELOW_MM, z_hip + Z_ABOVE_MM))
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, patient.index, 0xFE3])
    z_bottom = scene.landmarks["z_hip"] - 70.0 + float(rng.normal(0.0, 8.0))  # coverage_range's abdomen_pelvis
    src = PhantomCoronalSource(scene, prof, int(rng.integers(2**31)), z_bottom)
    image, info = P.preprocess(src, scene.femoral_heads, kvp=float(prof.kvp), energy_correction=energy_correction)
    # demographics exactly as the DICOM header carries them
    age = float(min(int(patient.age), 999))
    height = float(f"{patient.height_cm / 100.0:.2f}") * 100.0
    weight = float(f"{patient.weight_kg:.1f}")
    demo = P.demographics_vector(age, patient.sex, height, weight)
    t = _hip_t(scene, label)
    return image, demo, t, {"heads": scene.femoral_heads, "planes": info.planes, "kvp": float(prof.kvp)}


def _profiles(recipe: Any) -> tuple[list[str], list[str]]:
    prof = list(recipe.data.profiles) or list(HIP_PROFILES)
    hold = list(recipe.data.holdout_profiles)
    from training.phantoms.profiles import get_profile

    for name in prof + hold:
        if get_profile(name).coverage != "abdomen_pelvis":
            raise ValueError(f"[data] profile {name!r} covers {get_profile(name).coverage}, not the hips; "
                             f"use abdomen-pelvis profiles such as {', '.join(HIP_PROFILES)}")
    return prof, hold


def _build_cohort(recipe: Any) -> Any:
    from training.phantoms.population import sample_population
    from training.trainer import ArrayDataset

    d = recipe.data
    label = str(d.options.get("label", "hip"))
    if label not in LABELS:
        raise ValueError(f"[data] options.label = {label!r}: choose one of {', '.join(LABELS)}")
    prof, hold = _profiles(recipe)
    names = prof + hold
    kvp_range = d.options.get("kvp_range")
    if kvp_range is not None and (len(kvp_range) != 2 or not 70.0 <= kvp_range[0] <= kvp_range[1] <= 150.0):
        raise ValueError(f"[data] options.kvp_range = {kvp_range!r}: give [low, high] kVp within 70-150")
    energy = bool(d.options.get("energy_correction", P.ENERGY_CORRECTION))
    rng = np.random.default_rng([int(d.seed) & 0xFFFFFFFF, 0xFC0])
    rng_kvp = np.random.default_rng([int(d.seed) & 0xFFFFFFFF, 0xFC1])
    patients = sample_population(int(d.n), int(d.seed))
    images, demos, ts, pids, profs, kvps = [], [], [], [], [], []
    show = bool(d.options.get("progress", True)) and len(patients) > 20
    for k, p in enumerate(patients):
        pname = str(names[int(rng.integers(len(names)))])
        kv = float(rng_kvp.uniform(*kvp_range)) if kvp_range is not None else None
        if pname in hold:
            kv = None  # the held-out scanner keeps its own kVp
        img, demo, t, info = cohort_sample(p, pname, int(d.seed), label, kvp=kv, energy_correction=energy)
        images.append(img)
        demos.append(demo)
        ts.append(t)
        pids.append(p.patient_id)
        profs.append(pname)
        kvps.append(info["kvp"])
        if show and (k + 1) % max(1, len(patients) // 10) == 0:
            log.info("femur_coronal_dataset", rendered=k + 1, of=len(patients))
    t_arr = np.asarray(ts, dtype=np.float64)
    y = np.array([grade_index(t) for t in t_arr], dtype=np.int64)
    return ArrayDataset(
        images=np.stack(images), targets=y, patient_ids=np.asarray(pids), extras=np.stack(demos), strata=y,
        attributes={"profile": np.asarray(profs), "t_score": t_arr, "kvp": np.asarray(kvps, dtype=np.float64)},
        meta=_meta(f"virtual cohort seed {d.seed}, n {d.n}, label {label} T-score (left hip, NHANES III)", energy))


def _meta(source: str, energy_correction: bool) -> dict[str, Any]:
    return {"preprocessing": P.constants(energy_correction), "outputs": list(CLASSES), "units": ["", "", ""],
            "extras": ["age", "sex", "height", "weight", "bmi"],
            "spacing_mm": [P.CROP_SPACING_MM * P.POOL] * 2,
            "window": {"center": P.WINDOW_CENTER, "width": P.WINDOW_WIDTH}, "value_range": [0.0, 1.0],
            "source": source}


def _series_files(paths: Sequence[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith("."))
        else:
            out.append(p)
    return out


def _build_manifest(recipe: Any) -> Any:
    from screener.series import load_volume
    from training.manifest import read_manifest
    from training.trainer import ArrayDataset

    man = read_manifest(recipe.data.path, require=("grade",))
    energy = bool(recipe.data.options.get("energy_correction", P.ENERGY_CORRECTION))
    images, demos, ys, pids, profs, skipped = [], [], [], [], [], []
    for row in man.rows:
        vol = load_volume(_series_files(list(row.dicom_paths)))
        try:
            img, demo, _, _ = P.volume_inputs(vol, energy_correction=energy)  # kVp from the header
        except (LookupError, P.MissingDemographics) as exc:
            skipped.append(f"row {row.row}: {exc}")
            continue
        images.append(img)
        demos.append(demo)
        ys.append(int(row.grade_index))
        pids.append(row.patient_id)
        profs.append(row.profile or "site")
    if skipped:
        log.warning("femur_coronal_manifest_rows_skipped", n=len(skipped), reasons=skipped[:10])
    if not images:
        raise ValueError(f"{man.path}: no usable row ({'; '.join(skipped[:5])})")
    y = np.asarray(ys, dtype=np.int64)
    return ArrayDataset(images=np.stack(images), targets=y, patient_ids=np.asarray(pids), extras=np.stack(demos),
                        strata=y, attributes={"profile": np.asarray(profs)},
                        meta=_meta(f"site manifest {Path(man.path).name} ({len(images)} studies)", energy))


def build(recipe: Any) -> Any:
    """``femur_coronal`` dataset of a recipe (``[data] source`` = ``cohort`` or ``manifest``).

    Parameters
    ----------
    recipe : training.recipes.Recipe

    Returns
    -------
    training.trainer.ArrayDataset
        images ``(N, 2, 83, 83)``, targets class index ``(N,)``, extras ``(N, 5)``
        standardised demographics, attribute ``profile`` (and ``t_score`` for the cohort).
    """
    src = recipe.data.source
    if src == "cohort":
        return _build_cohort(recipe)
    if src == "manifest":
        return _build_manifest(recipe)
    raise ValueError(f"[data] source {src!r}: femur_coronal builds from 'cohort' or 'manifest'")
