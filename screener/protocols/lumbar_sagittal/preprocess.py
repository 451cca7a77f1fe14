"""Mid-vertebral sagittal reformats of L1-L4 (Yoshida et al. 2023, seed 002).

One function, :func:`preprocess`, turns a *plane source* and the vertebral
centroids into the network input; training (virtual cohort, site manifests)
and inference (the daemon protocol) both call it, so the tensors are the same
by construction.

Method
------
For each level L1..L4 a sagittal plane is sampled through the vertebral
body's centroid (patient x = the centroid's x): columns run anterior ->
posterior (``u = +y``), rows superior -> inferior (``v = -z``), centred on the
centroid, ``fov_mm`` wide with ``size x size`` pixels (paper: 300 mm FOV,
256 x 256, i.e. 1.17 mm pixels).  The paper's images are 5 mm thick: the
slab is the mean of ``slab_planes`` planes spread evenly across ``slab_mm``
in x.  HU are windowed and scaled to 0..1 (the paper exported JPEGs, i.e.
windowed 8-bit images), once per window of :data:`WINDOWS` -- one channel
each; the default is one bone window (trabecular contrast).

Energy correction (a documented difference from the paper, which used 120 kVp
only): before windowing the slab HU are multiplied by
:func:`screener.preprocess.energy.energy_scale` of the series' kVp (``KVP``
header at inference, the scanner profile's kVp in the cohort), so bone reads
as its 120 kVp equivalent (see :mod:`screener.preprocess.energy`).

The output is ``(4, C, size, size)`` float32, one image per level (the
network sees one vertebra per sample; the patient value is the mean of
L1-L4).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from screener.preprocess.energy import HA_HU_PER_MG, REFERENCE_KVP, energy_constants, energy_scale
from screener.preprocess.sampling import PlaneSource

__all__ = ["LEVELS", "FOV_MM", "SIZE", "SLAB_MM", "SLAB_PLANES", "WINDOWS", "ENERGY_CORRECTION",
           "REFERENCE_KVP", "HA_HU_PER_MG", "PreprocessError", "PreprocessInfo", "constants", "energy_scale",
           "sagittal_plane", "window", "preprocess"]

#: levels, in the order of the output stack
LEVELS: tuple[str, ...] = ("L1", "L2", "L3", "L4")
#: field of view (mm) of each sagittal image (paper: 300 x 300 mm)
FOV_MM = 300.0
#: pixels per side (paper: 256 x 256)
SIZE = 256
#: slab thickness (mm) across x (paper: 5 mm sagittal images)
SLAB_MM = 5.0
#: planes averaged across the slab
SLAB_PLANES = 5
#: windows (centre, width) HU, one input channel each; default one bone window (HU -100 .. 500).
#: A second, soft-tissue window (40, 400) was tried on the cohort and did not help (val r 0.62 vs 0.65).
WINDOWS: tuple[tuple[float, float], ...] = ((200.0, 600.0),)
#: rescale HU to their 120 kVp equivalent before windowing (see module docstring)
ENERGY_CORRECTION = True
class PreprocessError(ValueError):
    """The geometry does not allow the sagittal inputs (e.g. a level is missing)."""


@dataclass
class PreprocessInfo:
    """How the inputs were made (for overlays, ROIs and the model card).

    Attributes
    ----------
    levels : tuple of str
        Level of each output image.
    planes : list of dict
        Per level, the central plane ``{"origin", "u", "v", "shape", "spacing"}``
        (patient mm), e.g. to map an overlay back to the patient.
    centroids_mm : dict
        Level -> centroid used.
    constants : dict
        The constants (FOV, size, slab, window).
    hu_mean : dict
        Level -> mean HU of the 10 x 10 mm square at the centroid (a sanity value).
    """

    levels: tuple[str, ...]
    planes: list[dict[str, Any]]
    centroids_mm: dict[str, tuple[float, float, float]]
    constants: dict[str, Any]
    hu_mean: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)


def constants(*, fov_mm: float = FOV_MM, size: int = SIZE, slab_mm: float = SLAB_MM,
              slab_planes: int = SLAB_PLANES, windows: Sequence[Sequence[float]] = WINDOWS,
              energy_correction: bool = ENERGY_CORRECTION) -> dict[str, Any]:
    """The preprocessing constants as written into the model card.

    Parameters
    ----------
    fov_mm, size, slab_mm, slab_planes, windows, energy_correction
        See the module docstring and :func:`preprocess`.

    Returns
    -------
    dict
    """
    energy = energy_constants(energy_correction)
    return {**energy, "levels": list(LEVELS), "fov_mm": float(fov_mm), "size": int(size),
            "pixel_mm": float(fov_mm) / int(size), "slab_mm": float(slab_mm),
            "slab_planes": int(slab_planes), "windows": [[float(c), float(w)] for c, w in windows],
            "scaling": "one channel per window (C, W): clip((HU - (C - W/2)) / W, 0, 1)",
            "orientation": "columns anterior->posterior (+y), rows superior->inferior (-z), "
                           "centred on the vertebral-body centroid"}


def sagittal_plane(centroid_mm: Sequence[float], *, fov_mm: float = FOV_MM, size: int = SIZE,
                   x_offset_mm: float = 0.0) -> dict[str, Any]:
    """Plane arguments (``origin, u, v, shape, spacing``) of the sagittal image through a centroid.

    Parameters
    ----------
    centroid_mm : sequence of float
        Vertebral-body centroid (patient LPS mm).
    fov_mm, size : float, int
        Field of view and pixels per side.
    x_offset_mm : float
        Shift of the plane along patient x (slab sub-planes).

    Returns
    -------
    dict
        Keyword arguments for a :class:`~screener.preprocess.sampling.PlaneSource`.
    """
    c = np.asarray(centroid_mm, dtype=np.float64)
    if c.shape != (3,) or not np.all(np.isfinite(c)):
        raise PreprocessError(f"centroid must be 3 finite patient coordinates (got {centroid_mm!r})")
    ps = float(fov_mm) / int(size)
    half = (int(size) - 1) / 2.0 * ps
    u = np.array([0.0, 1.0, 0.0])
    v = np.array([0.0, 0.0, -1.0])
    origin = c + np.array([float(x_offset_mm), 0.0, 0.0]) - half * u - half * v
    return {"origin": origin, "u": u, "v": v, "shape": (int(size), int(size)), "spacing": (ps, ps)}


def window(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """Window ``(center, width)`` HU and scale to 0..1 (float32; NaN reads as air)."""
    lo = float(center) - float(width) / 2.0
    out = (np.nan_to_num(np.asarray(hu, dtype=np.float32), nan=-1000.0) - np.float32(lo)) / np.float32(width)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _centroids(geometry: Any) -> dict[str, tuple[float, float, float]]:
    """Level -> centroid from a mapping or a :class:`~screener.domain.SpineLocalization`."""
    verts = getattr(geometry, "vertebrae", geometry)
    if not isinstance(verts, Mapping):
        raise PreprocessError("geometry must map levels to centroids (or be a SpineLocalization)")
    out: dict[str, tuple[float, float, float]] = {}
    for lv in LEVELS:
        g = verts.get(lv)
        if g is None:
            continue
        c = getattr(g, "centroid_mm", g)
        out[lv] = tuple(float(x) for x in c)  # type: ignore[assignment]
    missing = [lv for lv in LEVELS if lv not in out]
    if missing:
        raise PreprocessError(f"{', '.join(missing)} not located: the sagittal inputs need all of "
                              f"{'-'.join((LEVELS[0], LEVELS[-1]))}")
    return out


def preprocess(source: PlaneSource, geometry: Any, *, fov_mm: float = FOV_MM, size: int = SIZE,
               slab_mm: float = SLAB_MM, slab_planes: int = SLAB_PLANES,
               windows: Sequence[Sequence[float]] = WINDOWS, energy_correction: bool = ENERGY_CORRECTION,
               kvp: float | None = None) -> tuple[np.ndarray, PreprocessInfo]:
    """Sagittal L1-L4 network inputs from a plane source.

    Parameters
    ----------
    source : PlaneSource
        ``source(origin, u, v, shape, spacing) -> HU``: a
        :class:`~screener.preprocess.sampling.VolumeSampler` at inference, a phantom
        renderer in the cohort builder.
    geometry : mapping or SpineLocalization
        Level -> centroid (patient mm), or a localization whose ``vertebrae`` have
        ``centroid_mm``; L1..L4 are required.
    fov_mm, size : float, int
        Field of view (mm) and pixels per side (the bundle card says which).
    slab_mm, slab_planes : float, int
        Slab thickness across x and planes averaged (1 plane = a thin reformat).
    windows : sequence of (center, width)
        One output channel per HU window.
    energy_correction : bool
        Multiply the HU by :func:`energy_scale` of ``kvp`` before windowing.
    kvp : float, optional
        The series' tube voltage (``KVP``); ``None`` = unknown (treated as 120 kVp).

    Returns
    -------
    images : numpy.ndarray
        ``(4, len(windows), size, size)`` float32 in 0..1, levels in :data:`LEVELS` order.
    info : PreprocessInfo

    Raises
    ------
    PreprocessError
        When a level is missing or the parameters are invalid.
    """
    windows = [(float(c), float(w)) for c, w in windows]
    if not windows or any(w <= 0 for _, w in windows):
        raise PreprocessError(f"windows must be a non-empty list of (center, width > 0) pairs (got {windows})")
    if size < 32 or fov_mm <= 0 or slab_planes < 1 or slab_mm < 0:
        raise PreprocessError(f"invalid preprocessing parameters: size {size} (>= 32), fov {fov_mm} mm (> 0), "
                              f"slab {slab_mm} mm (>= 0) with {slab_planes} plane(s) (>= 1)")
    cents = _centroids(geometry)
    try:
        scale = energy_scale(kvp) if energy_correction else 1.0
    except ValueError as exc:
        raise PreprocessError(str(exc)) from exc
    if slab_planes == 1:
        offsets = np.zeros(1)
    else:
        offsets = ((np.arange(slab_planes) + 0.5) / slab_planes - 0.5) * float(slab_mm)
    images = np.empty((len(LEVELS), len(windows), int(size), int(size)), dtype=np.float32)
    planes: list[dict[str, Any]] = []
    hu_mean: dict[str, float] = {}
    ps = float(fov_mm) / int(size)
    r = max(1, int(round(5.0 / ps)))
    mid = int(size) // 2
    for i, lv in enumerate(LEVELS):
        acc = np.zeros((int(size), int(size)), dtype=np.float64)
        for off in offsets:
            pl = sagittal_plane(cents[lv], fov_mm=fov_mm, size=size, x_offset_mm=float(off))
            acc += np.asarray(source(pl["origin"], pl["u"], pl["v"], pl["shape"], pl["spacing"]), dtype=np.float64)
        hu = (acc / len(offsets)).astype(np.float32)
        for c, (wc, ww) in enumerate(windows):
            images[i, c] = window(hu * np.float32(scale) if scale != 1.0 else hu, wc, ww)
        hu_mean[lv] = float(np.nanmean(hu[mid - r:mid + r, mid - r:mid + r]))
        centre = sagittal_plane(cents[lv], fov_mm=fov_mm, size=size)
        planes.append({k: (v.tolist() if isinstance(v, np.ndarray) else list(v)) for k, v in centre.items()})
    info = PreprocessInfo(levels=LEVELS, planes=planes, centroids_mm=cents,
                          constants=constants(fov_mm=fov_mm, size=size, slab_mm=slab_mm, slab_planes=slab_planes,
                                              windows=windows, energy_correction=energy_correction),
                          hu_mean=hu_mean)
    return images, info
