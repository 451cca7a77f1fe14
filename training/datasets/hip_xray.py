"""``hip_xray`` dataset builder: virtual-cohort AP pelvis radiographs -> per-hip samples.

One sample per hip (two per radiograph).  Each patient of the cohort gets one AP pelvis
radiograph (:func:`training.phantoms.xray.render_hip_xray`) in one of the paper's four poses
(``supine``, ``standing``, ``abduction``, ``adduction``, round robin by patient index, with the
renderer's per-image jitter), preprocessed by :func:`screener.protocols.hip_xray.preprocess.preprocess_hip_radiograph`
-- the function the daemon calls.  The paired ground-truth DRRs (pelvis + femur bone DRR for
stage 1, the proximal-femur PF-DRR of that side for stage 2; g/cm^2 of hydroxyapatite) are split
on the same grid with :func:`screener.protocols.hip_xray.preprocess.hip_halves`.

* ``images`` ``(N, 1, H, W)`` in ``[0, 1]``; ``targets`` ``(N,)`` DXA-style femoral-neck aBMD of
  that side (g/cm^2, :func:`training.phantoms.dxa.hip_truth`, the ``abmd_femoral_neck_{R,L}``
  labels of :func:`training.phantoms.labels.areal_bmd`);
* ``attributes``: ``profile``, ``pose``, ``side``, ``pf_drr`` and ``bone_drr`` ``(N, H, W)``
  float32, ``image_jpeg`` ``(N, H, W)`` (the same hip after JPEG recompression of the radiograph at
  ``jpeg_quality``, the paper's robustness check).

Radiograph "profiles" (acquisition techniques, :data:`XRAY_PROFILES`) play the role of the CT
scanner profiles: ``[data] profiles`` are trained on, ``holdout_profiles`` rendered only for
``screener evaluate --data holdout``.

``[data] options`` (all optional): ``shape`` ``[rows, cols]`` of a hip (default ``[512, 256]``,
the paper's), ``pixel_mm`` (resampling before the split, default 0.7), ``detector_mm`` (rendered
detector pitch, default 1.0), ``ray_mm`` / ``dy_mm`` (projector sampling, default 2.0 / 2.0),
``poses`` (list), ``n_holdout`` (patients of the held-out profiles, default ``n // 5``),
``jpeg_quality`` (default 50), ``render_workers`` (processes rendering patients in parallel, default 1;
every patient is seeded by its index, so the samples do not depend on it).

``source = "manifest"`` is not supported (site radiographs have no paired CT DRRs): the builder
says so.
"""
from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np

from screener.protocols.hip_xray.preprocess import hip_halves, preprocess_hip_radiograph

__all__ = ["POSES", "XRAY_PROFILES", "assemble", "build", "render_sample"]

#: The paper's four poses (seed 004, section 4.2.4).
POSES = ("supine", "standing", "abduction", "adduction")

#: Radiograph acquisition techniques of the virtual cohort.
XRAY_PROFILES: dict[str, dict[str, Any]] = {
    # AEC dose, 70-80 kVp, vendor unsharp-mask presentation processing
    "dx_pelvis_standard": {"kvp": (70.0, 80.0), "processing_strength": 1.0, "quanta_per_pixel": 2.0e4},
    # a different room: higher kVp, lower dose, milder processing (held out)
    "dx_pelvis_85kvp_lowdose": {"kvp": (84.0, 90.0), "processing_strength": 0.6, "quanta_per_pixel": 8.0e3},
}
DEFAULT_TRAINING = ("dx_pelvis_standard",)


def _options(recipe: Any) -> dict[str, Any]:
    o = dict(recipe.data.options or {})
    known = {"shape", "pixel_mm", "detector_mm", "ray_mm", "dy_mm", "poses", "n_holdout", "jpeg_quality",
             "render_workers"}
    unknown = sorted(set(o) - known)
    if unknown:
        raise ValueError(f"hip_xray: unknown [data] options {unknown}; known: {sorted(known)}")
    shape = tuple(int(v) for v in o.get("shape", (512, 256)))
    if len(shape) != 2 or shape[0] % 16 or shape[1] % 16:
        raise ValueError(f"hip_xray: [data] options shape must be [rows, cols], multiples of 16 (got {shape})")
    poses = tuple(o.get("poses", POSES))
    return {"shape": shape, "pixel_mm": float(o.get("pixel_mm", 0.7)), "detector_mm": float(o.get("detector_mm", 1.0)),
            "ray_mm": float(o.get("ray_mm", 2.0)), "dy_mm": float(o.get("dy_mm", 2.0)), "poses": poses,
            "n_holdout": int(o.get("n_holdout", -1)), "jpeg_quality": int(o.get("jpeg_quality", 50)),
            "render_workers": max(1, int(o.get("render_workers", 1)))}


def render_sample(seed: int, index: int, profile: str, pose: str, opts: dict[str, Any]) -> list[dict[str, Any]]:
    """Render one patient's radiograph and return its two hip samples.

    Parameters
    ----------
    seed, index : int
        Cohort seed and patient index (:func:`training.phantoms.population.make_patient`).
    profile : str
        Key of :data:`XRAY_PROFILES`.
    pose : str
        One of :data:`POSES`.
    opts : dict
        Parsed ``[data] options``.

    Returns
    -------
    list of dict
        Per hip: ``image``, ``image_jpeg``, ``pf_drr``, ``bone_drr``, ``bmd``, ``side``, ``patient``,
        ``profile``, ``pose``, ``kvp``, and ``dataset`` (the DX DICOM, first hip only).
    """
    from training.phantoms.anatomy import build_scene
    from training.phantoms.dxa import hip_truth
    from training.phantoms.labels import _BoneOnlyScene
    from training.phantoms.population import make_patient
    from training.phantoms.xray import render_hip_xray

    if profile not in XRAY_PROFILES:
        raise ValueError(f"hip_xray: unknown radiograph profile {profile!r}; choose from {sorted(XRAY_PROFILES)}")
    prof = XRAY_PROFILES[profile]
    patient = make_patient(seed, index)
    scene = build_scene(patient)
    bone_only = _BoneOnlyScene(scene)  # same hydroxyapatite map, ~2x cheaper (labels.areal_bmd does the same)
    abmd = {f"femoral_neck_{s}": hip_truth(bone_only, s)["femoral_neck"] for s in ("R", "L")}
    rng = np.random.default_rng([seed, index, 4005])
    kvp = float(np.round(rng.uniform(*prof["kvp"])))
    ds, truth = render_hip_xray(scene, seed * 100003 + index, pose, kvp=kvp, pixel_mm=opts["detector_mm"],
                                ray_mm=opts["ray_mm"], dy_mm=opts["dy_mm"],
                                processing_strength=prof["processing_strength"],
                                quanta_per_pixel=prof["quanta_per_pixel"])
    rad, hips = preprocess_hip_radiograph(ds, shape=opts["shape"], pixel_mm=opts["pixel_mm"])
    _, hips_jpeg = preprocess_hip_radiograph(ds, shape=opts["shape"], pixel_mm=opts["pixel_mm"],
                                             jpeg_quality=opts["jpeg_quality"])
    kw = {"shape": opts["shape"], "pixel_mm": opts["pixel_mm"]}
    bone = hip_halves(truth["bone_drr"], rad.source_spacing_mm, rad.layout, **kw)
    out = []
    for side in ("R", "L"):
        pf = hip_halves(truth["pf_drr"][side], rad.source_spacing_mm, rad.layout, **kw)[side]
        out.append({"image": hips[side].image, "image_jpeg": hips_jpeg[side].image, "pf_drr": pf,
                    "bone_drr": bone[side], "bmd": float(abmd[f"femoral_neck_{side}"]), "side": side,
                    "patient": patient.patient_id, "profile": profile, "pose": pose, "kvp": kvp,
                    "dataset": ds if side == "R" else None})
    return out


def build(recipe: Any) -> Any:
    """Recipe -> :class:`training.trainer.ArrayDataset` of per-hip samples (see module docstring).

    Parameters
    ----------
    recipe : training.recipes.Recipe
        ``protocol = "hip_xray"``; ``[data] source = "cohort"``.

    Returns
    -------
    training.trainer.ArrayDataset
    """
    from training.trainer import ArrayDataset

    data = recipe.data
    if data.source != "cohort":
        raise ValueError("hip_xray: only [data] source = \"cohort\" is supported -- BMD-GAN needs the CT-derived "
                         "DRRs paired with each radiograph, which a site manifest of radiographs does not have")
    opts = _options(recipe)
    train_profiles = tuple(data.profiles) or DEFAULT_TRAINING
    hold = tuple(data.holdout_profiles)
    for p in train_profiles + hold:
        if p not in XRAY_PROFILES:
            raise ValueError(f"hip_xray: unknown radiograph profile {p!r} in [data]; choose from {sorted(XRAY_PROFILES)}")
    n_hold = (data.n // 5 if opts["n_holdout"] < 0 else opts["n_holdout"]) if hold else 0
    plan = [(i, train_profiles[i % len(train_profiles)]) for i in range(data.n)]
    plan += [(data.n + k, hold[k % len(hold)]) for k in range(n_hold)]
    samples: list[dict[str, Any]] = []
    t0 = time.time()
    jobs = [(data.seed, index, prof, opts["poses"][index % len(opts["poses"])], opts) for index, prof in plan]
    workers = min(opts["render_workers"], max(1, len(jobs)))
    if workers > 1:
        import multiprocessing

        # fork: the workers inherit the imported phantom modules; results come back in plan order
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for j, pair in enumerate(pool.imap(_render_job, jobs, chunksize=4)):
                samples += pair
                if (j + 1) % 20 == 0:
                    print(f"hip_xray: rendered {j + 1}/{len(plan)} radiographs ({time.time() - t0:.0f} s, "
                          f"{workers} processes)", file=sys.stderr)
        return assemble(samples, opts)
    for j, job in enumerate(jobs):
        samples += render_sample(*job)
        if (j + 1) % 20 == 0:
            print(f"hip_xray: rendered {j + 1}/{len(plan)} radiographs ({time.time() - t0:.0f} s)", file=sys.stderr)
    return assemble(samples, opts)


def _render_job(job: tuple[int, int, str, str, dict[str, Any]]) -> list[dict[str, Any]]:
    """:func:`render_sample` in a worker process, without the DICOM dataset (not needed by
    :func:`assemble`, and costly to send back)."""
    out = render_sample(*job)
    for s in out:
        s["dataset"] = None
    return out


def assemble(samples: list[dict[str, Any]], opts: dict[str, Any]) -> Any:
    """Per-hip samples of :func:`render_sample` -> :class:`training.trainer.ArrayDataset`.

    Parameters
    ----------
    samples : list of dict
        From :func:`render_sample`.
    opts : dict
        Parsed ``[data] options``.

    Returns
    -------
    training.trainer.ArrayDataset
    """
    from training.trainer import ArrayDataset

    bmd = np.array([s["bmd"] for s in samples], dtype=np.float64)
    edges = np.quantile(bmd, [1 / 3, 2 / 3])
    return ArrayDataset(
        images=np.stack([s["image"] for s in samples])[:, None],
        targets=bmd.astype(np.float32),
        patient_ids=np.array([s["patient"] for s in samples]),
        strata=np.digitize(bmd, edges),
        attributes={
            "profile": np.array([s["profile"] for s in samples]),
            "pose": np.array([s["pose"] for s in samples]),
            "side": np.array([s["side"] for s in samples]),
            "pf_drr": np.stack([s["pf_drr"] for s in samples]).astype(np.float32),
            "bone_drr": np.stack([s["bone_drr"] for s in samples]).astype(np.float32),
            "image_jpeg": np.stack([s["image_jpeg"] for s in samples]).astype(np.float32),
        },
        meta={"outputs": ["femoral_neck_bmd"], "units": ["g/cm2"], "value_range": (0.0, 1.0),
              "spacing_mm": (), "source": "virtual cohort (synthetic)",
              "preprocessing": {"function": "screener.protocols.hip_xray.preprocess.preprocess_hip_radiograph",
                                "shape": list(opts["shape"]), "pixel_mm": opts["pixel_mm"],
                                "split": "midline, left hip mirrored (Gu et al. 2023 section 3.1)",
                                "intensity": "DICOM VOI window to [0, 1], bone bright"},
              "render": {k: opts[k] for k in ("detector_mm", "ray_mm", "dy_mm", "jpeg_quality")},
              "poses": list(opts["poses"])},
    )
