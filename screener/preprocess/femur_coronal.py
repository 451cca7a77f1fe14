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
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage

from screener.preprocess.energy import energy_constants, energy_scale
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
    of the bone is the candidate.  The centre is refined to the mean of the grid points whose
    distance is within 1 mm of the maximum, and accepted when the inscribed radius is 15-34 mm
    and the candidate is not on the volume's top or bottom edge (a head cut by the coverage).

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
    # coronal-free sampling: axial planes on the grid (rows = y, columns = x)
    vol = np.stack([sampler((xs[0], ys[0], z), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (len(ys), len(xs)), (g, g))
                    for z in zs])  # (z, y, x)
    bone = vol > _BONE_HU
    if bone.sum() < 50:
        return {}
    filled = np.stack([ndimage.binary_fill_holes(b) for b in bone])
    dist = _distance_in_bounding_box(filled) * g
    zz, yy, xx = np.nonzero(bone)
    mid_x = float(np.median(xs[xx]))
    out: dict[str, tuple[float, float, float]] = {}
    zlim = (float(zs[0]), float(zs[-1]))
    cands: dict[str, list[np.ndarray]] = {}
    for side, sgn in (("R", -1.0), ("L", 1.0)):
        off = sgn * (xs - mid_x)
        xmask = (off > 40.0) & (off < 160.0)
        d = dist.copy()
        d[:, :, ~xmask] = 0.0
        d[0] = d[-1] = 0.0
        d[d > _HEAD_RADIUS_MM[1]] = 0.0  # organs / enhanced vessels thicker than any head
        cands[side] = []
        for _ in range(_N_CANDIDATES):
            if d.max() < _HEAD_RADIUS_MM[0]:
                break
            k, j, i = np.unravel_index(int(np.argmax(d)), d.shape)
            cands[side].append(np.array([xs[i], ys[j], zs[k]]))
            # suppress this candidate's neighbourhood before the next one
            r_sup = int(np.ceil(30.0 / g))
            d[max(0, k - r_sup):k + r_sup + 1, max(0, j - r_sup):j + r_sup + 1, max(0, i - r_sup):i + r_sup + 1] = 0.0
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


def _refine_sphere(sampler: Any, c0: np.ndarray, z_limits: tuple[float, float],
                   g: float = 1.5, half: float = 42.0, search: float = 18.0
                   ) -> tuple[float, tuple[float, float, float] | None, float]:
    """Refine a head centre: the sphere whose inner shell (cortex) is brightest over its outer
    shell (joint space / soft tissue), searched within ``search`` mm of ``c0``."""
    from scipy.signal import fftconvolve

    ax = np.arange(-half, half + 1e-6, g)
    n = len(ax)
    zs = c0[2] + ax
    cube = np.stack([sampler((c0[0] + ax[0], c0[1] + ax[0], z), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (n, n), (g, g))
                     for z in zs])  # (z, y, x)
    cube = np.clip(np.nan_to_num(cube, nan=-1000.0), -200.0, 1500.0)
    best = (-np.inf, None, 0.0)
    inside = np.abs(ax) <= search
    for r in np.arange(_HEAD_RADIUS_MM[0] + 2.0, 31.0, 2.0):
        s_in = fftconvolve(cube, _shell(r - 3.0, r, g), mode="same")
        s_out = fftconvolve(cube, _shell(r + 0.75, r + 4.0, g), mode="same")
        score = s_in - s_out
        sub = score[np.ix_(inside, inside, inside)]
        kk, jj, ii = np.unravel_index(int(np.argmax(sub)), sub.shape)
        if sub[kk, jj, ii] > best[0]:
            idx = np.flatnonzero(inside)
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
