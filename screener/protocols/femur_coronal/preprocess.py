"""Preprocessing of protocol ``femur_coronal`` (Ha et al. 2024, seed 001): one function for both paths.

Training (virtual cohort, site manifest) and inference (the daemon protocol) call the same
:func:`preprocess` with a *plane source* (see :mod:`screener.preprocess.sampling`): a
:class:`~screener.preprocess.sampling.VolumeSampler` over the CT volume at inference, the phantom
renderer in the cohort builder.  The geometry is the femoral-head centres (patient LPS mm) from
:func:`locate_femoral_heads` (real volumes) or the phantom's truth (cohort).

Steps (paper section 2.2, Fig. 2)
---------------------------------
1. Per side, a coronal plane (rows = -z, columns = lateral -> medial) through the femoral neck:
   ``y = head y + NECK_Y_OFFSET_MM`` (the neck runs slightly posterior from the head to the
   trochanters), ``CROP_PX x CROP_PX`` pixels of ``CROP_SPACING_MM``, the head centre
   ``ABOVE_MM`` below the top edge and ``LATERAL_MM`` from the lateral edge (the paper's
   250 x 250 crop "to include the femoral neck and head").  The left side is sampled with
   ``u = -x`` so that both crops show the femur the same way round (lateral at column 0).
   Each crop is the mean of ``SLAB_PLANES`` parallel planes ``SLAB_STEP_MM`` apart (a ~3 mm
   coronal slab, the paper's 2-4 mm slice thickness).
2. Energy correction (a documented difference from the paper, whose scans span 80-140 kVp
   uncorrected): with ``energy_correction`` the slab HU are multiplied by
   :func:`screener.preprocess.energy.energy_scale` of the series' kVp (``KVP`` header at
   inference, the rendered tube voltage in the cohort), so bone reads as its 120 kVp
   equivalent (water, 0 HU, is the fixed point).  Unknown kVp = 120 (no correction).
3. Window C 500 / W 2000 (paper eq. 3-4), scaled to [0, 1] (the paper's 0-255 / 255).
4. ``POOL x POOL`` block mean (network input ``INPUT_PX``); right crop = channel 0, mirrored
   left crop = channel 1.

Demographics (age, sex, height, weight, BMI; :data:`screener.nets.ha.DEMOGRAPHICS` order, sex
1 = M / 0 = F as in the site manifest) are standardised with :data:`DEMO_MEAN` /
:data:`DEMO_SD`.  :func:`header_demographics` reads them from the DICOM header and raises
:class:`MissingDemographics` naming the attribute when one is missing: never defaulted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage

from screener.preprocess.energy import energy_constants, energy_scale
from screener.preprocess.morphology import fill_holes_per_slice
from screener.preprocess.sampling import PlaneSource

__all__ = [
    "ABOVE_MM", "SLAB_PLANES", "SLAB_STEP_MM", "CROP_PX", "CROP_SPACING_MM", "DEMO_MEAN", "DEMO_SD",
    "ENERGY_CORRECTION", "INPUT_PX", "LATERAL_MM", "NECK_Y_OFFSET_MM", "POOL", "SIDES", "WINDOW_CENTER",
    "WINDOW_WIDTH", "MissingDemographics", "PreprocessInfo", "constants", "demographics_vector", "energy_scale",
    "header_demographics", "locate_femoral_heads", "plane_for", "preprocess", "volume_inputs", "window",
]

#: window of the paper (HU)
WINDOW_CENTER = 500.0
WINDOW_WIDTH = 2000.0
#: crop per side (pixels) and its pixel spacing (mm): 250 x 0.8 mm = 200 mm
CROP_PX = 250
CROP_SPACING_MM = 0.8
#: head centre below the crop's top edge / from its lateral edge (mm)
ABOVE_MM = 115.0
LATERAL_MM = 125.0
#: the plane passes this far posterior of the head centre (mm), through the neck
NECK_Y_OFFSET_MM = 5.0
#: coronal slab: mean of SLAB_PLANES planes SLAB_STEP_MM apart in y (a ~3 mm coronal reformat,
#: the paper's 2-4 mm slice thickness; also evens out the noise of thin-slice series)
SLAB_PLANES = 3
SLAB_STEP_MM = 1.0
#: block-mean factor; network input side = CROP_PX // POOL
POOL = 3
INPUT_PX = CROP_PX // POOL
#: channel order
SIDES = ("R", "L")
#: rescale HU to their 120 kVp equivalent before windowing (see module docstring); a model card
#: without ``energy_correction`` predates it and runs without it
ENERGY_CORRECTION = True
#: standardisation of (age y, sex 1=M/0=F, height cm, weight kg, BMI kg/m2)
DEMO_MEAN = (55.0, 0.5, 169.0, 73.0, 25.5)
DEMO_SD = (20.0, 0.5, 10.0, 15.0, 4.5)


class MissingDemographics(ValueError):
    """A demographic the model needs is absent or unusable in the header; ``name`` says which."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


@dataclass
class PreprocessInfo:
    """What :func:`preprocess` did (for overlays, ROIs and the model card).

    Attributes
    ----------
    planes : dict
        Side -> plane arguments (``origin``, ``u``, ``v``, ``shape``, ``spacing``) of the crop.
    windowed : numpy.ndarray
        ``(2, CROP_PX, CROP_PX)`` windowed crops in [0, 1] before pooling (same orientation as
        the network input: lateral at column 0 on both sides).
    hu_range : dict
        Side -> (min, max) HU of the crop before the energy correction (a crop with no bone is
        suspicious).
    kvp : float or None
        Tube voltage used by the energy correction (``None`` = unknown, taken as 120 kVp).
    energy_scale : float
        Factor applied to the HU (1.0 without the correction).
    """

    planes: dict[str, dict[str, Any]]
    windowed: np.ndarray
    hu_range: dict[str, tuple[float, float]] = field(default_factory=dict)
    kvp: float | None = None
    energy_scale: float = 1.0


def constants(energy_correction: bool = ENERGY_CORRECTION) -> dict[str, Any]:
    """The preprocessing constants, for the model card (``ds.meta["preprocessing"]``).

    Parameters
    ----------
    energy_correction : bool
        Whether the HU were rescaled to 120 kVp (:func:`preprocess`).

    Returns
    -------
    dict
    """
    energy = energy_constants(energy_correction)
    return {**energy, "window_center": WINDOW_CENTER, "window_width": WINDOW_WIDTH, "crop_px": CROP_PX,
            "crop_spacing_mm": CROP_SPACING_MM, "head_below_top_mm": ABOVE_MM,
            "head_from_lateral_edge_mm": LATERAL_MM, "plane_y_offset_from_head_mm": NECK_Y_OFFSET_MM,
            "slab_planes": SLAB_PLANES, "slab_step_mm": SLAB_STEP_MM, "pool": POOL, "input_px": INPUT_PX, "channels": "0 = right femur, 1 = left femur mirrored",
            "demographics": "age, sex (1=M 0=F), height_cm, weight_kg, bmi",
            "demographics_mean": list(DEMO_MEAN), "demographics_sd": list(DEMO_SD)}


def window(hu: np.ndarray) -> np.ndarray:
    """Window C 500 / W 2000 scaled to [0, 1] (float32)."""
    lo = WINDOW_CENTER - WINDOW_WIDTH / 2.0
    return np.clip((np.asarray(hu, dtype=np.float32) - lo) / WINDOW_WIDTH, 0.0, 1.0).astype(np.float32)


def plane_for(side: str, head_mm: Sequence[float]) -> dict[str, Any]:
    """Plane arguments of one side's coronal crop (see module docstring).

    Parameters
    ----------
    side : {"R", "L"}
    head_mm : sequence of float
        Femoral head centre (patient LPS mm).

    Returns
    -------
    dict
        ``origin``, ``u``, ``v``, ``shape``, ``spacing`` for a plane source.
    """
    if side not in SIDES:
        raise ValueError(f"side must be 'R' or 'L', not {side!r}")
    h = np.asarray(head_mm, dtype=np.float64)
    lateral = -1.0 if side == "R" else 1.0  # patient right is -x in LPS
    u = np.array([-lateral, 0.0, 0.0])  # columns run lateral -> medial
    v = np.array([0.0, 0.0, -1.0])
    origin = np.array([h[0] + lateral * LATERAL_MM, h[1] + NECK_Y_OFFSET_MM, h[2] + ABOVE_MM])
    return {"origin": origin, "u": u, "v": v, "shape": (CROP_PX, CROP_PX),
            "spacing": (CROP_SPACING_MM, CROP_SPACING_MM)}


def preprocess(source: PlaneSource, heads: Mapping[str, Sequence[float]], *, kvp: float | None = None,
               energy_correction: bool = ENERGY_CORRECTION) -> tuple[np.ndarray, PreprocessInfo]:
    """Network input of one study: both femora, coronal, energy-corrected, windowed, pooled.

    Parameters
    ----------
    source : PlaneSource
        ``source(origin, u, v, shape, spacing) -> HU`` (volume sampler or phantom renderer).
    heads : mapping
        ``{"R": (x, y, z), "L": (x, y, z)}`` femoral-head centres (patient mm).
    kvp : float, optional
        The series' tube voltage (``KVP``); ``None`` = unknown (taken as 120 kVp).
    energy_correction : bool
        Multiply the HU by :func:`~screener.preprocess.energy.energy_scale` of ``kvp`` before
        windowing (the bundle card's ``preprocessing.energy_correction`` says which).

    Returns
    -------
    image : numpy.ndarray
        ``float32 (2, INPUT_PX, INPUT_PX)`` in [0, 1].
    info : PreprocessInfo
    """
    missing = [s for s in SIDES if s not in heads]
    if missing:
        raise ValueError(f"femoral head(s) {', '.join(missing)} not given; both sides are needed")
    scale = energy_scale(kvp) if energy_correction else 1.0
    planes: dict[str, dict[str, Any]] = {}
    crops = []
    ranges = {}
    for side in SIDES:
        pl = plane_for(side, heads[side])
        acc = np.zeros((CROP_PX, CROP_PX), np.float64)
        for q in range(SLAB_PLANES):
            o = np.asarray(pl["origin"], dtype=np.float64).copy()
            o[1] += (q - (SLAB_PLANES - 1) / 2.0) * SLAB_STEP_MM
            hu = np.asarray(source(o, pl["u"], pl["v"], pl["shape"], pl["spacing"]), dtype=np.float32)
            if hu.shape != (CROP_PX, CROP_PX):
                raise ValueError(f"plane source returned {hu.shape}, expected {(CROP_PX, CROP_PX)}")
            acc += np.nan_to_num(hu, nan=-1000.0)
        hu = (acc / SLAB_PLANES).astype(np.float32)
        planes[side] = pl
        ranges[side] = (float(hu.min()), float(hu.max()))
        if scale != 1.0:
            hu = (hu * np.float32(scale)).astype(np.float32)
        crops.append(window(hu))
    windowed = np.stack(crops)
    n = INPUT_PX * POOL
    pooled = windowed[:, :n, :n].reshape(2, INPUT_PX, POOL, INPUT_PX, POOL).mean(axis=(2, 4))
    return pooled.astype(np.float32), PreprocessInfo(planes=planes, windowed=windowed, hu_range=ranges,
                                                     kvp=None if kvp is None else float(kvp), energy_scale=scale)


def demographics_vector(age: float, sex: str, height_cm: float, weight_kg: float) -> np.ndarray:
    """Standardised ``(5,)`` float32 demographics (age, sex, height, weight, BMI).

    Parameters
    ----------
    age : float
        Years.
    sex : {"M", "F"}
    height_cm, weight_kg : float

    Returns
    -------
    numpy.ndarray
    """
    if sex not in ("M", "F"):
        raise MissingDemographics("PatientSex", f"PatientSex {sex!r} is neither M nor F; the model needs one of them")
    bmi = weight_kg / (height_cm / 100.0) ** 2
    raw = np.array([age, 1.0 if sex == "M" else 0.0, height_cm, weight_kg, bmi], dtype=np.float64)
    return ((raw - np.asarray(DEMO_MEAN)) / np.asarray(DEMO_SD)).astype(np.float32)


def _age_years(text: str) -> float:
    t = text.strip().upper()
    if len(t) == 4 and t[:3].isdigit() and t[3] in "DWMY":
        return float(t[:3]) / {"D": 365.25, "W": 52.18, "M": 12.0, "Y": 1.0}[t[3]]
    return float(t)


def header_demographics(ds: Any) -> dict[str, Any]:
    """Age, sex, height and weight from a DICOM header (Patient / Patient Study modules).

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        Any image of the series.

    Returns
    -------
    dict
        ``age`` (y), ``sex`` ("M"/"F"), ``height_cm``, ``weight_kg``.

    Raises
    ------
    MissingDemographics
        Naming the first missing or unusable attribute (PatientAge, PatientSex, PatientSize,
        PatientWeight); the model is never fed a default.
    """
    out: dict[str, Any] = {}

    def get(name: str) -> Any:
        val = getattr(ds, name, None)
        if val is None or str(val).strip() == "":
            raise MissingDemographics(name, f"{name} missing from the DICOM header: the femur_coronal model "
                                            "needs age, sex, height and weight")
        return val

    try:
        out["age"] = _age_years(str(get("PatientAge")))
    except ValueError as exc:
        if isinstance(exc, MissingDemographics):
            raise
        raise MissingDemographics("PatientAge", f"PatientAge {ds.PatientAge!r} is not an age string") from None
    sex = str(get("PatientSex")).strip().upper()
    if sex not in ("M", "F"):
        raise MissingDemographics("PatientSex", f"PatientSex {sex!r} is neither M nor F; the model needs one")
    out["sex"] = sex
    try:
        size_m = float(get("PatientSize"))
        weight = float(get("PatientWeight"))
    except MissingDemographics:
        raise
    except (TypeError, ValueError):
        raise MissingDemographics("PatientSize", "PatientSize / PatientWeight are not numbers") from None
    if not (0.5 <= size_m <= 2.5):
        raise MissingDemographics("PatientSize", f"PatientSize {size_m:g} m is outside 0.5-2.5 m")
    if not (10.0 <= weight <= 400.0):
        raise MissingDemographics("PatientWeight", f"PatientWeight {weight:g} kg is outside 10-400 kg")
    out["height_cm"] = size_m * 100.0
    out["weight_kg"] = weight
    return out


def volume_inputs(volume: Any, heads: Mapping[str, Sequence[float]] | None = None, *,
                  kvp: float | None = None, energy_correction: bool = ENERGY_CORRECTION
                  ) -> tuple[np.ndarray, np.ndarray, PreprocessInfo, dict[str, tuple[float, float, float]]]:
    """Network inputs of a CT volume, exactly as the daemon protocol computes them.

    Locates the femoral heads (unless given), samples the crops with a
    :class:`~screener.preprocess.sampling.VolumeSampler`, rescales the HU by the kVp (energy
    correction) and reads the demographics from the first image's header.  The site-manifest dataset builder calls this too, so training and
    inference tensors are identical.

    Parameters
    ----------
    volume : screener.domain.Volume
    heads : mapping, optional
        Precomputed :func:`locate_femoral_heads` result.
    kvp : float, optional
        Tube voltage for the energy correction; default the first image's ``KVP``
        (:func:`screener.series.header_kvp`, the value the daemon's series info carries).
    energy_correction : bool
        See :func:`preprocess`.

    Returns
    -------
    image : numpy.ndarray
        ``(2, INPUT_PX, INPUT_PX)`` float32.
    demographics : numpy.ndarray
        ``(5,)`` standardised float32.
    info : PreprocessInfo
    heads : dict

    Raises
    ------
    LookupError
        "femoral heads not in coverage" (one or both heads not found).
    MissingDemographics
        A header attribute the model needs is missing.
    """
    from screener.preprocess.sampling import VolumeSampler

    if heads is None:
        heads = locate_femoral_heads(volume)
    missing = [s for s in SIDES if s not in heads]
    if missing:
        which = "femoral heads" if len(missing) == 2 else f"{'right' if missing[0] == 'R' else 'left'} femoral head"
        raise LookupError(f"{which} not in coverage")
    if not volume.datasets:
        raise MissingDemographics("PatientAge", "the volume carries no DICOM header to read demographics from")
    d = header_demographics(volume.datasets[0])
    demo = demographics_vector(d["age"], d["sex"], d["height_cm"], d["weight_kg"])
    if kvp is None:
        from screener.series import header_kvp

        kvp = header_kvp(volume.datasets[0])
    image, info = preprocess(VolumeSampler(volume), heads, kvp=kvp, energy_correction=energy_correction)
    return image, demo, info, dict(heads)


# --------------------------------------------------------------------------- femoral-head locator

#: bone threshold (HU) of the locator and the plausible head radius range (mm)
_BONE_HU = 180.0
_HEAD_RADIUS_MM = (15.0, 34.0)
_GRID_MM = 2.0
#: distance-transform maxima tried per side (the best sphere wins)
_N_CANDIDATES = 3
#: minimum sphere score (HU: cortex shell minus joint-space shell)
_MIN_SPHERE_SCORE = 150.0
#: fraction of medial / superior rays that cross a joint space into the acetabulum
_MIN_SOCKET = 0.3


def locate_femoral_heads(volume: Any) -> dict[str, tuple[float, float, float]]:
    """Classical femoral-head locator for an axial CT volume.

    Method: resample the volume on a ``2 mm`` isotropic grid, threshold bone (``> 180 HU``), fill
    each axial slice's holes (marrow), and take the Euclidean distance transform; the femoral head
    is the thickest round bone lateral to the midline (the body's bone centre of mass in x), so
    on each side the distance maximum with ``40 mm < |x - midline| < 160 mm`` in the lower part
    of the bone is the candidate.  The centre is refined to the sphere whose cortex is brightest
    over its joint space (:func:`_refine_sphere`, 1.5 mm grid), and accepted when its radius is
    15-34 mm, it sits in an acetabulum (:func:`_socket_fraction`) and it is not on the volume's
    top or bottom edge (a head cut by the coverage).

    Coarse before fine, with the same result: the distance transform is needed only where it can
    be 15-34 mm (a head), so it is first taken on 4 mm blocks (cheap; a bound on the 2 mm one
    within ``sqrt(3) * 2 mm``) and then exactly, at 2 mm, only in boxes around the lateral blocks
    that can hold such a value (:func:`_head_sized_distances`).  An axis-aligned volume is resampled
    one axis at a time (:func:`_grid_hu`).

    Parameters
    ----------
    volume : screener.domain.Volume

    Returns
    -------
    dict
        ``{"R": (x, y, z), "L": (x, y, z)}`` patient mm; sides not found are absent (an empty
        dict: femoral heads not in coverage).
    """
    from screener.preprocess.sampling import VolumeSampler

    arr = volume.array
    pts0 = np.array([volume.index_to_patient(k, j, i) for k in (0, arr.shape[0] - 1)
                     for j in (0, arr.shape[1] - 1) for i in (0, arr.shape[2] - 1)])
    lo, hi = pts0.min(axis=0), pts0.max(axis=0)
    g = _GRID_MM
    xs = np.arange(lo[0] + g / 2, hi[0], g)
    ys = np.arange(lo[1] + g / 2, hi[1], g)
    zs = np.arange(lo[2], hi[2] + 1e-6, g)
    if len(zs) < 10 or len(xs) < 20:
        return {}
    sampler = VolumeSampler(volume)
    vol = _grid_hu(volume, sampler, xs, ys, zs, floor=_BONE_HU)  # (z, y, x); exact above the bone threshold
    bone = vol > _BONE_HU
    if bone.sum() < 50:
        return {}
    filled = fill_holes_per_slice(bone)
    mid_x = _median_of_counts(xs, bone.sum(axis=(0, 1)))  # median x of the bone voxels
    offs = {side: sgn * (xs - mid_x) for side, sgn in (("R", -1.0), ("L", 1.0))}
    lateral = np.zeros(len(xs), dtype=bool)
    for off in offs.values():
        lateral |= (off > 40.0) & (off < 160.0)
    flat, values = _head_sized_distances(filled, g, lateral, _HEAD_RADIUS_MM)
    kk, jj, ii = np.unravel_index(flat, filled.shape)
    interior = (kk > 0) & (kk < filled.shape[0] - 1)
    out: dict[str, tuple[float, float, float]] = {}
    zlim = (float(zs[0]), float(zs[-1]))
    cands: dict[str, list[np.ndarray]] = {}
    r_sup = int(np.ceil(30.0 / g))
    for side in ("R", "L"):
        off = offs[side]
        xmask = (off > 40.0) & (off < 160.0)
        keep = interior & xmask[ii]
        ck, cj, ci, cv = kk[keep], jj[keep], ii[keep], values[keep]  # flat (C) order, as argmax ties break
        cands[side] = []
        for _ in range(_N_CANDIDATES):
            if not len(cv):
                break
            n = int(np.argmax(cv))
            k, j, i = int(ck[n]), int(cj[n]), int(ci[n])
            cands[side].append(np.array([xs[i], ys[j], zs[k]]))
            # suppress this candidate's neighbourhood before the next one
            near = (np.abs(ck - k) <= r_sup) & (np.abs(cj - j) <= r_sup) & (np.abs(ci - i) <= r_sup)
            ck, cj, ci, cv = ck[~near], cj[~near], ci[~near], cv[~near]
    memo: dict[tuple[str, int], tuple[float, float, float] | None] = {}

    def refined(side: str, n: int) -> tuple[float, float, float] | None:
        if (side, n) not in memo:
            _, c, r = _refine_sphere(sampler, cands[side][n], zlim)
            if c is not None and _socket_fraction(sampler, np.asarray(c), r, mid_x) < _MIN_SOCKET:
                c = None
            memo[(side, n)] = c
        return memo[(side, n)]

    # thickest accepted spheres first, preferring a left-right symmetric pair
    pairs = sorted(((a, b) for a in range(len(cands["R"])) for b in range(len(cands["L"]))), key=lambda t: (sum(t), t))
    for a, b in pairs:
        cr, cl = refined("R", a), refined("L", b)
        if cr is None or cl is None:
            continue
        if (abs(cr[2] - cl[2]) < 25.0 and abs(cr[1] - cl[1]) < 25.0
                and abs((cr[0] + cl[0]) / 2.0 - mid_x) < 30.0):
            return {"R": cr, "L": cl}
    for side in ("R", "L"):
        acc = [c for c in (refined(side, n) for n in range(len(cands[side]))) if c is not None]
        if acc:
            out[side] = acc[0]
    if len(out) == 2:
        return {}  # two heads that do not pair up: do not guess
    return out


def _median_of_counts(values: np.ndarray, counts: np.ndarray) -> float:
    """``numpy.median`` of ``values`` (ascending) each repeated ``counts`` times, without the repeats."""
    c = np.cumsum(counts)
    total = int(c[-1])
    if total == 0:
        raise ValueError("no values to take the median of")
    lo = float(values[int(np.searchsorted(c, (total - 1) // 2, side="right"))])
    hi = float(values[int(np.searchsorted(c, total // 2, side="right"))])
    return lo if total % 2 else (lo + hi) / 2.0


def _axis_map(volume: Any) -> list[tuple[int, float, float]] | None:
    """For an axis-aligned volume, per patient axis (x, y, z): ``(array axis, origin mm, mm per
    index step with sign)``; ``None`` when the volume is oblique (its direction is not a signed
    permutation)."""
    d = np.asarray(volume.direction, dtype=np.float64)
    if not np.allclose(np.abs(d), np.round(np.abs(d)), atol=1e-9):
        return None
    spacing = {0: volume.spacing[2], 1: volume.spacing[1], 2: volume.spacing[0]}  # column of d -> mm
    array_axis = {0: 2, 1: 1, 2: 0}  # column of d (i, j, k) -> array axis (k, j, i)
    out = []
    for m in range(3):
        cols = np.flatnonzero(np.abs(d[m]) > 0.5)
        if len(cols) != 1:
            return None
        c = int(cols[0])
        out.append((array_axis[c], float(np.asarray(volume.origin, dtype=np.float64)[m]), float(d[m, c]) * spacing[c]))
    if len({a for a, _, _ in out}) != 3:
        return None
    return out


def _lerp_axis(a: np.ndarray, t: np.ndarray, axis: int, cval: float) -> np.ndarray:
    """Linear interpolation of ``a`` along ``axis`` at fractional indices ``t``; ``cval`` outside
    ``[0, n - 1]`` (``scipy.ndimage.map_coordinates(order=1, mode="constant")`` along one axis)."""
    n = a.shape[axis]
    t = np.asarray(t, dtype=np.float64)
    valid = (t >= 0.0) & (t <= n - 1)
    tc = np.clip(t, 0.0, n - 1)
    i0 = np.minimum(np.floor(tc).astype(np.intp), max(n - 2, 0))
    i1 = np.minimum(i0 + 1, n - 1)
    shape = [1] * a.ndim
    shape[axis] = len(t)
    w = (tc - i0).astype(np.float32).reshape(shape)
    a0 = np.take(a, i0, axis=axis)
    out = np.take(a, i1, axis=axis)
    out -= a0
    out *= w
    out += a0
    if not valid.all():
        idx = [slice(None)] * a.ndim
        idx[axis] = ~valid
        out[tuple(idx)] = cval
    return out


def _grid_hu(volume: Any, sampler: Any, xs: np.ndarray, ys: np.ndarray, zs: np.ndarray,
             floor: float | None = None) -> np.ndarray:
    """HU on the patient grid ``zs x ys x xs`` (trilinear, air outside the volume), ``(z, y, x)``.

    An axis-aligned volume (every CT acquired axially) is interpolated one axis at a time, which
    is the trilinear interpolation of the sampler at a fraction of the cost; an oblique one goes
    through the sampler plane by plane.  With ``floor`` only the values above it are needed:
    the volume is first cut to the box of its voxels above ``floor - 1`` (grown by one voxel),
    and the grid outside that box reads air (an interpolation of voxels at or below
    ``floor - 1`` cannot exceed ``floor``)."""
    amap = _axis_map(volume)
    if amap is None:
        g = (float(xs[1] - xs[0]) if len(xs) > 1 else 1.0, float(ys[1] - ys[0]) if len(ys) > 1 else 1.0)
        return np.stack([sampler((xs[0], ys[0], z), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (len(ys), len(xs)), (g[1], g[0]))
                         for z in zs])
    a = np.asarray(volume.array, dtype=np.float32)
    start = [0, 0, 0]
    if floor is not None:
        plane = a.max(axis=0) > floor - 1.0
        rows, cols = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
        slices = np.flatnonzero(a.reshape(a.shape[0], -1).max(axis=1) > floor - 1.0)
        if not len(slices):
            return np.full((len(zs), len(ys), len(xs)), sampler.outside, dtype=np.float32)
        box = [(max(0, int(r[0]) - 1), min(n, int(r[-1]) + 2)) for r, n in zip((slices, rows, cols), a.shape)]
        a = a[box[0][0]:box[0][1], box[1][0]:box[1][1], box[2][0]:box[2][1]]
        start = [lo for lo, _ in box]
    coords = (xs, ys, zs)
    patient_of = {axis: m for m, (axis, _, _) in enumerate(amap)}  # array axis -> patient axis
    out = np.full((len(zs), len(ys), len(xs)), sampler.outside, dtype=np.float32)
    inside: dict[int, slice] = {}  # patient axis -> the grid points inside the (cut) volume
    ts: dict[int, np.ndarray] = {}  # array axis -> the fractional indices of those grid points
    for axis in range(3):
        m = patient_of[axis]
        _, origin, step = amap[m]
        t = (np.asarray(coords[m], dtype=np.float64) - origin) / step - start[axis]
        ok = np.flatnonzero((t >= 0.0) & (t <= a.shape[axis] - 1))  # one run: t is monotonic
        if not len(ok):
            return out
        inside[m] = slice(int(ok[0]), int(ok[-1]) + 1)
        ts[axis] = t[inside[m]]
    # the axis that shrinks the array most first: it makes every later step cheaper (a stable sort:
    # ties in axis order); then only the part of the array the grid reads
    order = sorted(range(3), key=lambda ax: len(coords[patient_of[ax]]) / a.shape[ax])
    a, ts = _cut_to_reach(a, ts)
    a = _lerp_two_axes_in_chunks(a, ts, order, sampler.outside)
    a = _lerp_axis(a, ts[order[2]], order[2], sampler.outside)
    to_zyx = [next(ax for ax in range(3) if patient_of[ax] == m) for m in (2, 1, 0)]
    out[inside[2], inside[1], inside[0]] = np.transpose(a, to_zyx)
    return out


def _cut_to_reach(a: np.ndarray, ts: Mapping[int, np.ndarray]) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """``a`` cut, along each axis, to the indices that the interpolation at ``ts[axis]`` (fractional
    indices inside ``[0, n - 1]``) reads, and the indices shifted to the cut: :func:`_lerp_axis`
    gives the same values on the cut (a small cube of a large volume: the sphere refinement).

    The cut runs from ``floor(min t)`` to ``floor(max t) + 1`` (or the array's end), so every
    point keeps its two neighbours and its weight (``t - lo`` and ``i0 - lo`` are exact in float64
    for an integer ``lo <= t``)."""
    idx: list[slice] = []
    out: dict[int, np.ndarray] = {}
    for axis in range(a.ndim):
        t = np.asarray(ts[axis], dtype=np.float64)
        lo = int(np.floor(t.min()))
        hi = min(a.shape[axis] - 1, int(np.floor(t.max())) + 1)
        idx.append(slice(lo, hi + 1))
        out[axis] = t - lo
    return a[tuple(idx)], out


#: slabs of the array interpolated at a time along its first two axes (:func:`_lerp_two_axes_in_chunks`)
_LERP_CHUNK = 4


def _lerp_two_axes_in_chunks(a: np.ndarray, ts: Mapping[int, np.ndarray], order: Sequence[int],
                             cval: float) -> np.ndarray:
    """``_lerp_axis`` along ``order[0]`` then ``order[1]`` (at fractional indices ``ts[axis]``), a
    few slabs across ``order[2]`` at a time: the same values as on the whole array (each output
    value is the same float32 operations on the same inputs), with the slabs' intermediate arrays
    in the cache instead of two passes over the whole volume (about 7 times faster)."""
    first, second, across = order
    shape = list(a.shape)
    shape[first], shape[second] = len(ts[first]), len(ts[second])
    out = np.empty(shape, dtype=np.float32)
    for lo in range(0, a.shape[across], _LERP_CHUNK):
        idx = [slice(None)] * 3
        idx[across] = slice(lo, lo + _LERP_CHUNK)
        part = _lerp_axis(a[tuple(idx)], ts[first], first, cval)
        out[tuple(idx)] = _lerp_axis(part, ts[second], second, cval)
    return out


def _head_sized_distances(filled: np.ndarray, g: float, lateral: np.ndarray, radius_mm: tuple[float, float]
                          ) -> tuple[np.ndarray, np.ndarray]:
    """The voxels in the ``lateral`` columns (``x`` mask) of ``filled`` whose distance to the
    background is ``radius_mm[0]`` to ``radius_mm[1]`` (a head's), and those distances (mm),
    exactly as ``_distance_in_bounding_box(filled) * g`` gives them, at the cost of a coarse
    transform.

    How: the mask min-pooled onto ``2 x 2 x 2`` blocks (a block is bone when all 8 voxels are)
    has a distance transform within ``sqrt(3) * g`` of the fine one of each of its voxels; the
    fine transform is computed only in boxes around the lateral blocks whose coarse distance
    allows a head-sized fine one, each box grown by ``radius_mm[1]`` (plus a voxel) so that the
    nearest background of every voxel within ``radius_mm[1]`` of it lies inside the box: there
    the box's transform is the whole array's.

    Returns
    -------
    flat : numpy.ndarray
        Flat (C order) indices into ``filled``, ascending.
    distance : numpy.ndarray
        Their distances (mm).
    """
    m = np.pad(filled, [(0, n % 2) for n in filled.shape], constant_values=True)  # nothing beyond the faces
    core = m[0::2, 0::2, 0::2].copy()
    for dz, dy, dx in ((0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)):
        core &= m[dz::2, dy::2, dx::2]
    if core.all():  # no background at all: the fine transform over the whole array
        boxes = [tuple(slice(0, n) for n in filled.shape)]
    else:
        coarse = _distance_in_bounding_box(core) * (2.0 * g)
        slack = np.sqrt(3.0) * g + 1e-6
        lat = np.pad(lateral, (0, len(lateral) % 2)).reshape(-1, 2).any(axis=1)
        candidate = ((coarse >= radius_mm[0] - slack) & (coarse <= radius_mm[1] + slack)) & lat[None, None, :]
        labels, _ = ndimage.label(candidate, structure=np.ones((3, 3, 3), dtype=bool))
        boxes = [tuple(slice(2 * s.start, min(n, 2 * s.stop)) for s, n in zip(sl, filled.shape))
                 for sl in ndimage.find_objects(labels) if sl is not None]
    margin = int(np.ceil(radius_mm[1] / g)) + 1
    flats, dists = [np.zeros(0, dtype=np.intp)], [np.zeros(0, dtype=np.float64)]
    xmask = np.asarray(lateral, dtype=bool)
    for inner in _merge_boxes(boxes, margin, filled.shape):
        box = tuple(slice(max(0, s.start - margin), min(n, s.stop + margin)) for s, n in zip(inner, filled.shape))
        sub = filled[box]
        if sub.all():  # no background within radius_mm[1] + a voxel: every distance here is larger
            continue
        e = ndimage.distance_transform_edt(sub) * g
        rel = tuple(slice(i.start - b.start, i.stop - b.start) for i, b in zip(inner, box))
        d = e[rel]
        keep = (d >= radius_mm[0]) & (d <= radius_mm[1]) & xmask[inner[2]][None, None, :]
        k, j, i = np.nonzero(keep)
        flats.append(np.ravel_multi_index((k + inner[0].start, j + inner[1].start, i + inner[2].start), filled.shape))
        dists.append(d[k, j, i])
    flat, first = np.unique(np.concatenate(flats), return_index=True)  # boxes overlap: same values
    return flat, np.concatenate(dists)[first]


def _merge_boxes(boxes: list[tuple[slice, ...]], margin: int, shape: tuple[int, ...]) -> list[tuple[slice, ...]]:
    """Boxes whose grown (by ``margin``, clipped to ``shape``) versions cost no more as one box than
    as two are merged into their bounding box, until no pair is."""
    def grown_size(b: tuple[slice, ...]) -> int:
        return int(np.prod([min(n, s.stop + margin) - max(0, s.start - margin) for s, n in zip(b, shape)]))

    out = list(boxes)
    merged = True
    while merged and len(out) > 1:
        merged = False
        for p in range(len(out)):
            for q in range(p + 1, len(out)):
                u = tuple(slice(min(a.start, b.start), max(a.stop, b.stop)) for a, b in zip(out[p], out[q]))
                if grown_size(u) <= grown_size(out[p]) + grown_size(out[q]):
                    out[p] = u
                    del out[q]
                    merged = True
                    break
            if merged:
                break
    return out


def _distance_in_bounding_box(mask: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.distance_transform_edt(mask)``, computed only inside the mask's bounding box
    grown by one voxel (clipped to the array): that layer is all background, so every voxel's
    nearest background voxel is inside the box and the result is identical, at a fraction of
    the cost (the body's bone fills a small part of a CT's field of view)."""
    box = ndimage.find_objects(mask.astype(np.int8))
    out = np.zeros(mask.shape, dtype=np.float64)
    if not box or box[0] is None:
        return out
    grown = tuple(slice(max(0, sl.start - 1), min(n, sl.stop + 1)) for sl, n in zip(box[0], mask.shape))
    out[grown] = ndimage.distance_transform_edt(mask[grown])
    return out


def _shell(radius_lo: float, radius_hi: float, g: float) -> np.ndarray:
    n = int(np.ceil(radius_hi / g))
    ax = np.arange(-n, n + 1) * g
    r = np.sqrt(ax[:, None, None] ** 2 + ax[None, :, None] ** 2 + ax[None, None, :] ** 2)
    k = ((r >= radius_lo) & (r < radius_hi)).astype(np.float32)
    return k / max(float(k.sum()), 1.0)


#: sphere radii tried by :func:`_refine_sphere` (mm)
_REFINE_RADII = tuple(float(r) for r in np.arange(_HEAD_RADIUS_MM[0] + 2.0, 31.0, 2.0))


@lru_cache(maxsize=4)
def _shell_spectra(g: float, n_cube: int, n_fft: int) -> tuple[np.ndarray, int]:
    """Spectra (``rfftn`` at ``n_fft``) of the :func:`_refine_sphere` kernels, one per radius of
    :data:`_REFINE_RADII`: inner shell minus outer shell, centred in a common odd size ``m``;
    returns them stacked and ``m``.  Computed once per grid."""
    from scipy import fft

    m = 2 * int(np.ceil((max(_REFINE_RADII) + 4.0) / g)) + 1
    kernels = np.zeros((len(_REFINE_RADII), m, m, m), dtype=np.float64)
    for q, r in enumerate(_REFINE_RADII):
        for sign, (lo_r, hi_r) in ((1.0, (r - 3.0, r)), (-1.0, (r + 0.75, r + 4.0))):
            k = _shell(lo_r, hi_r, g).astype(np.float64)
            p = (m - k.shape[0]) // 2
            kernels[q, p:p + k.shape[0], p:p + k.shape[1], p:p + k.shape[2]] += sign * k
    return fft.rfftn(kernels, s=(n_fft,) * 3, axes=(1, 2, 3)), m


def _refine_sphere(sampler: Any, c0: np.ndarray, z_limits: tuple[float, float],
                   g: float = 1.5, half: float = 42.0, search: float = 18.0
                   ) -> tuple[float, tuple[float, float, float] | None, float]:
    """Refine a head centre: the sphere whose inner shell (cortex) is brightest over its outer
    shell (joint space / soft tissue), searched within ``search`` mm of ``c0``.

    The score of every radius is ``fftconvolve(cube, inner shell, "same") - fftconvolve(cube,
    outer shell, "same")``, evaluated as one convolution with their difference and only where
    it is searched: a circular convolution just long enough that nothing wraps onto the
    searched centres (the cube's spectrum once, the kernels' spectra cached)."""
    from scipy import fft

    ax = np.arange(-half, half + 1e-6, g)
    n = len(ax)
    zs = c0[2] + ax
    cube = _grid_hu(sampler.volume, sampler, c0[0] + ax, c0[1] + ax, zs)  # (z, y, x)
    cube = np.clip(np.nan_to_num(cube, nan=-1000.0), -200.0, 1500.0)
    inside = np.abs(ax) <= search
    idx = np.flatnonzero(inside)
    # "same" output t is full output t + (m - 1) // 2; a circular convolution of length L equals
    # the full one at output o when o + L exceeds the last full index (n + m - 2)
    m = 2 * int(np.ceil((max(_REFINE_RADII) + 4.0) / g)) + 1
    o_lo, o_hi = idx[0] + (m - 1) // 2, idx[-1] + (m - 1) // 2
    n_fft = fft.next_fast_len(max(n + m - 1 - o_lo, o_hi + 1), real=True)
    spectra, _ = _shell_spectra(float(g), n, n_fft)
    cube_f = fft.rfftn(cube.astype(np.float64), s=(n_fft,) * 3)
    best = (-np.inf, None, 0.0)
    for q, r in enumerate(_REFINE_RADII):
        score = fft.irfftn(cube_f * spectra[q], s=(n_fft,) * 3)
        sub = score[o_lo:o_hi + 1, o_lo:o_hi + 1, o_lo:o_hi + 1]
        kk, jj, ii = np.unravel_index(int(np.argmax(sub)), sub.shape)
        if sub[kk, jj, ii] > best[0]:
            best = (float(sub[kk, jj, ii]), (idx[kk], idx[jj], idx[ii]), float(r))
    if best[1] is None or best[0] < _MIN_SPHERE_SCORE:
        return best[0], None, 0.0
    k, j, i = best[1]
    c = (float(c0[0] + ax[i]), float(c0[1] + ax[j]), float(c0[2] + ax[k]))
    r = best[2]
    # the whole head and the top of the neck must be in coverage (a cut sphere is not a head)
    if c[2] - z_limits[0] < r + 10.0 or z_limits[1] - c[2] < r:
        return best[0], None, r
    return best[0], c, r


def _socket_fraction(sampler: Any, c: np.ndarray, r: float, mid_x: float) -> float:
    """Ball-in-socket test: the fraction of rays from the centre toward the acetabulum (medial,
    0-60 degrees up, +-30 degrees antero-posterior) that leave the head's cortex through a dark
    joint space into bright acetabular bone within ``r + 14`` mm."""
    sgn = 1.0 if mid_x > c[0] else -1.0  # toward the midline
    radii = np.arange(r - 1.0, r + 14.0, 0.5)
    dirs = []
    for elev in (0.0, 25.0, 50.0):
        for az in (-30.0, 0.0, 30.0):
            e, a = np.deg2rad(elev), np.deg2rad(az)
            dirs.append((sgn * np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.sin(e)))
    pts = c[None, None, :] + radii[None, :, None] * np.asarray(dirs)[:, None, :]
    idx = sampler.to_index(pts)
    hu = ndimage.map_coordinates(sampler.volume.array, np.moveaxis(idx, -1, 0), order=1, mode="constant",
                                 cval=-1000.0, prefilter=False)
    hu = np.nan_to_num(hu, nan=-1000.0)
    ok = 0
    for prof in hu:
        jmin = int(np.argmin(prof[:14]))  # joint space within r - 1 .. r + 6
        gap = float(prof[jmin])
        cup = float(prof[jmin:].max())
        if cup - gap > 120.0 and cup > 250.0 and gap < 250.0:
            ok += 1
    return ok / len(hu)
