"""Preprocessing of protocol ``l1_axial`` (Kang et al. 2023, seed ``000``), shared by training and inference.

Kang et al. (section 2.1): "We determined a reference axial CT section that
contained the maximum trabecular area of the L1 vertebral body from each CT
volume ... we added data samples to the dataset by selecting one or two of the
nearest axial images from the reference for simple augmentation."  Every
image was "cropped" around L1 (Case 1, the best case: r 0.905).

Here
----
1. **Candidate slices** are the axial planes of the series' own slice grid
   whose centre lies in L1's z range (:class:`L1Geometry`): the native slices
   of a DICOM volume (:func:`geometry_from_volume`), or the same grid at the
   scanner profile's slice spacing in the virtual cohort.
2. **Trabecular area** of each candidate (:func:`trabecular_area`): on a
   ``SELECT_FOV_MM`` square at ``SELECT_SPACING_MM`` around the L1 centroid
   (smoothed by ``SELECT_SMOOTH_MM``), the cortex is where HU exceeds
   ``max(CORTEX_MIN_HU, centre median + CORTEX_STEP_HU)``; the region it
   encloses (holes of the closed cortex mask) that contains the centroid is the
   trabecular body.  Endplate and disc slices enclose nothing.  The slice with
   the largest area is the reference (ties and "no slice encloses a body":
   the slice nearest the centroid).  References whose neighbours also enclose a
   body are preferred, so that no neighbour sample shows the disc.
3. **Neighbours**: the ``n_neighbours`` nearest grid slices on each side of the
   reference.  They are separate *samples* (the paper's augmentation), not
   channels: the network takes one channel, and at inference the protocol
   reports the mean over the reference and its neighbours.
4. **Crop** ("Case 1"): an axial square of ``fov_mm`` centred
   ``CROP_POSTERIOR_MM`` posterior of the body centroid (so the body, pedicles,
   laminae and spinous process are in view), resampled to ``size`` x ``size``
   pixels, columns towards patient left, rows towards posterior (radiological
   display), independent of the series' own orientation.  The crop is area-sampled
   (sampled at <= ``SAMPLE_MM`` and block-averaged), so the thin cortex is not
   aliased into a dotted ring.
5. **Energy correction** (``energy_correction``, a documented difference from
   the paper, whose scanner ran at 120 kVp only): the crop's HU are multiplied
   by :func:`screener.preprocess.energy.energy_scale` of the series' tube
   voltage (``KVP`` header at inference, the scanner profile's kVp in the
   cohort), so bone reads as its 120 kVp equivalent (water is the fixed
   point; an unknown kVp counts as 120).  Only the network input is rescaled:
   the slice choice (step 2) works on the series' own HU.
6. **Scaling**: HU clipped to ``[WINDOW_LO_HU, WINDOW_HI_HU]`` and mapped to
   0-1 (a fixed window, so absolute attenuation survives; the authors' per-image
   min-max scaling would discard it).

A *plane source* (:class:`screener.preprocess.sampling.PlaneSource`) supplies
the HU, so the very same function runs on a DICOM volume
(:class:`~screener.preprocess.sampling.VolumeSampler`) and on the virtual
cohort's analytic phantom.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from screener.domain import VertebraLocation, Volume
from screener.preprocess.energy import energy_scale
from screener.preprocess.energy import energy_constants as _energy_constants
from screener.preprocess.morphology import fill_holes
from screener.preprocess.sampling import PlaneSource

__all__ = ["CONSTANTS", "ENERGY_CORRECTION", "L1Geometry", "PreprocessInfo", "energy_constants",
           "geometry_from_volume", "preprocess", "preprocess_volume", "trabecular_area"]

#: HU window mapped to 0-1 (centre 550, width 1500: fat to dense cortex).
WINDOW_LO_HU = -200.0
WINDOW_HI_HU = 1300.0
#: Default crop: 100 mm square (body, pedicles, laminae, processes), 64 px (1.56 mm pixels);
#: the paper recipe uses 256 px.
FOV_MM = 100.0
SIZE = 64
#: The crop centre lies this far posterior (+y, LPS) of the vertebral-body centroid.
CROP_POSTERIOR_MM = 25.0
#: The crop is area-sampled: sampled at <= this pixel size, then block-averaged to ``size``.
SAMPLE_MM = 0.8
#: Slice selection plane (around the body centroid).
SELECT_FOV_MM = 70.0
SELECT_SPACING_MM = 0.7
SELECT_SMOOTH_MM = 0.6
CORTEX_MIN_HU = 150.0
CORTEX_STEP_HU = 80.0
CENTRE_RADIUS_MM = 4.0
MAX_BODY_AREA_MM2 = 3000.0
N_NEIGHBOURS = 1
#: An enclosed area above this multiple of the median over L1's slices is a leak (canal).
LEAK_FACTOR = 1.3
#: Default of the energy correction (rescale the crop's HU to their 120 kVp equivalent before
#: windowing) where a recipe or model card does not say: off, as before it existed (a card without
#: the ``energy_correction`` key runs without it); the cohort recipe turns it on.
ENERGY_CORRECTION = False

#: Constants written to the model card (``ds.meta["preprocessing"]``).
CONSTANTS: dict[str, Any] = {
    "slice_choice": "largest enclosed trabecular L1 area among the series' slices in L1's z range",
    "neighbours": "nearest slice on each side of the reference, as separate samples (Kang 2.1)",
    "window_hu": [WINDOW_LO_HU, WINDOW_HI_HU],
    "scaling": "clip(HU, lo, hi) -> (HU - lo) / (hi - lo)",
    "crop_posterior_mm": CROP_POSTERIOR_MM,
    "area_sampling": f"sampled at <= {SAMPLE_MM:g} mm, block-averaged to the crop pixel",
    "plane_axes": "columns +x (patient left), rows +y (posterior)",
    "select_fov_mm": SELECT_FOV_MM, "select_spacing_mm": SELECT_SPACING_MM,
    "cortex_hu": f"max({CORTEX_MIN_HU:g}, centre median + {CORTEX_STEP_HU:g})",
}

_U = (1.0, 0.0, 0.0)
_V = (0.0, 1.0, 0.0)


def energy_constants(energy_correction: bool) -> dict[str, Any]:
    """The energy-correction entries of the model card's preprocessing constants.

    Parameters
    ----------
    energy_correction : bool
        Whether the crops were rescaled to 120 kVp equivalents.

    Returns
    -------
    dict
        ``{"energy_correction": bool}``, plus the reference kVp, the HU-per-mg table and the
        rule when the correction is on.
    """
    return _energy_constants(energy_correction, subject="crop HU", note="slice choice on the series' own HU")


@dataclass(frozen=True)
class L1Geometry:
    """Where L1 is and which axial planes the series has there.

    Attributes
    ----------
    centroid_mm : tuple of float
        L1 vertebral-body centroid (patient LPS mm).
    z_range_mm : tuple of float
        Inferior and superior z (mm) of the L1 body.
    slice_z : tuple of float
        z (mm) of the series' slice centres near L1, ascending (the candidates
        are those within ``z_range_mm``; the others can serve as neighbours).
    """

    centroid_mm: tuple[float, float, float]
    z_range_mm: tuple[float, float]
    slice_z: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.slice_z) == 0:
            raise ValueError("L1Geometry needs at least one slice position (slice_z is empty)")

    @classmethod
    def from_grid(cls, centroid_mm: Sequence[float], z_range_mm: Sequence[float], spacing_mm: float,
                  phase_mm: float = 0.0, margin_slices: int = 3) -> "L1Geometry":
        """A regular slice grid ``z = phase + k * spacing`` covering L1 (virtual cohort).

        Parameters
        ----------
        centroid_mm, z_range_mm : sequence of float
        spacing_mm : float
            Slice spacing (mm) of the scanner profile.
        phase_mm : float
            Offset of the grid (where the series happens to put its slices).
        margin_slices : int
            Grid slices kept beyond each end of the z range (neighbours).
        """
        if spacing_mm <= 0:
            raise ValueError(f"slice spacing must be > 0 (got {spacing_mm})")
        lo, hi = float(min(z_range_mm)), float(max(z_range_mm))
        k0 = int(np.floor((lo - phase_mm) / spacing_mm)) - margin_slices
        k1 = int(np.ceil((hi - phase_mm) / spacing_mm)) + margin_slices
        zs = tuple(float(phase_mm + k * spacing_mm) for k in range(k0, k1 + 1))
        return cls(tuple(float(c) for c in centroid_mm), (lo, hi), zs)


@dataclass
class PreprocessInfo:
    """What :func:`preprocess` did (for the finding's ROI, details and the model card).

    Attributes
    ----------
    z_reference : float
        z (mm) of the reference slice (largest trabecular area).
    z_samples : list of float
        z of every returned sample, reference first.
    areas_mm2 : dict
        Candidate z -> enclosed trabecular area (mm^2).
    crop_origins : list of tuple
        Patient position of pixel ``[0, 0]`` of each sample's crop.
    u, v : tuple of float
        Column and row directions of the crops.
    spacing_mm : tuple of float
        Crop pixel spacing (row, column).
    shape : tuple of int
        Crop size (rows, columns).
    fallback : bool
        True when no candidate enclosed a trabecular body (nearest-centroid slice used).
    """

    z_reference: float
    z_samples: list[float]
    areas_mm2: dict[float, float]
    crop_origins: list[tuple[float, float, float]]
    u: tuple[float, float, float] = _U
    v: tuple[float, float, float] = _V
    spacing_mm: tuple[float, float] = (FOV_MM / SIZE, FOV_MM / SIZE)
    shape: tuple[int, int] = (SIZE, SIZE)
    fallback: bool = False
    extras: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        d = asdict(self)
        d["areas_mm2"] = {f"{k:.2f}": v for k, v in self.areas_mm2.items()}
        return d

    def to_pixel(self, points_mm: np.ndarray, sample: int = 0) -> np.ndarray:
        """(column, row) crop pixel coordinates of patient points ``(N, 3)`` (in-plane part)."""
        o = np.asarray(self.crop_origins[sample], float)
        rel = np.asarray(points_mm, float) - o
        return np.stack([rel @ np.asarray(self.u) / self.spacing_mm[1],
                         rel @ np.asarray(self.v) / self.spacing_mm[0]], axis=-1)


def geometry_from_volume(volume: Volume, l1: VertebraLocation, margin_slices: int = 3) -> L1Geometry:
    """:class:`L1Geometry` of a DICOM volume: its native slice centres near the localizer's L1.

    Parameters
    ----------
    volume : Volume
        Axial CT volume.
    l1 : VertebraLocation
        L1 from the spine localizer (``centroid_mm``, ``z_range_mm``).
    margin_slices : int
        Native slices kept beyond each end of L1's z range (neighbours).

    Raises
    ------
    ValueError
        If no slice of the volume lies within L1's z range.
    """
    z = np.sort(volume.slice_positions()[:, 2])
    lo, hi = float(min(l1.z_range_mm)), float(max(l1.z_range_mm))
    inside = np.flatnonzero((z >= lo) & (z <= hi))
    if inside.size == 0:
        raise ValueError(f"no slice of the series lies within L1 (z {lo:.1f} to {hi:.1f} mm)")
    a = max(0, int(inside[0]) - margin_slices)
    b = min(len(z), int(inside[-1]) + margin_slices + 1)
    return L1Geometry(tuple(float(c) for c in l1.centroid_mm), (lo, hi), tuple(float(x) for x in z[a:b]))


def _centre_level(hu: np.ndarray, spacing_mm: float
                  ) -> tuple[np.ndarray, tuple[float, float], np.ndarray, float]:
    """The smoothed image, its centre (row, column), the pixels within :data:`CENTRE_RADIUS_MM` of it
    and their median HU (the trabecular level when the centre lies in a body)."""
    sm = ndimage.gaussian_filter(hu.astype(np.float64), SELECT_SMOOTH_MM / spacing_mm)
    rows, cols = sm.shape
    cj, ci = (rows - 1) / 2.0, (cols - 1) / 2.0
    jj, ii = np.ogrid[:rows, :cols]
    near = ((jj - cj) ** 2 + (ii - ci) ** 2) * spacing_mm ** 2 <= CENTRE_RADIUS_MM ** 2
    return sm, (cj, ci), near, float(np.median(sm[near]))


def trabecular_area(hu: np.ndarray, spacing_mm: float) -> float:
    """Area (mm^2) of the trabecular region enclosed by cortex around the image centre.

    Parameters
    ----------
    hu : numpy.ndarray
        Axial HU image centred on the vertebral-body centroid.
    spacing_mm : float
        Square pixel size.

    Returns
    -------
    float
        0 when the centre is not enclosed by cortex (disc, endplate) or the
        enclosed region is implausibly large.
    """
    sm, (cj, ci), near, t_c = _centre_level(hu, spacing_mm)
    cortex = sm > max(CORTEX_MIN_HU, t_c + CORTEX_STEP_HU)
    cortex = ndimage.binary_closing(cortex, structure=np.ones((3, 3), bool), iterations=1)
    inner = fill_holes(cortex) & ~cortex
    lab, n = ndimage.label(inner)
    if n == 0:
        return 0.0
    hits = np.unique(lab[near])
    hits = hits[hits > 0]
    if hits.size == 0:
        return 0.0
    sizes = ndimage.sum(np.ones_like(lab), lab, hits)
    area = float(np.max(sizes)) * spacing_mm ** 2
    return area if area <= MAX_BODY_AREA_MM2 else 0.0


def outlined_trabecular_area(hu: np.ndarray, spacing_mm: float) -> float:
    """Area (mm^2) of the trabecular body around the image centre as
    :func:`screener.vertebral_body.outline_slice` outlines it (closings up to 8 mm, then rays from
    the centre): the fallback of :func:`trabecular_area` for a gapped cortex. 0 when nothing
    body-sized is outlined.
    """
    from screener.vertebral_body import DROP_MIN_HU, outline_slice

    sm, (cj, ci), _, t_c = _centre_level(hu, spacing_mm)
    got = outline_slice(sm, (t_c - DROP_MIN_HU, max(CORTEX_MIN_HU, t_c + CORTEX_STEP_HU)),
                        (spacing_mm, spacing_mm), (cj, ci))
    if got is None:
        return 0.0
    area = float(got[0].sum()) * spacing_mm ** 2
    return area if area <= MAX_BODY_AREA_MM2 else 0.0


def _plane(source: PlaneSource, centre: Sequence[float], fov_mm: float, size: int, factor: int = 1
           ) -> tuple[np.ndarray, tuple[float, float, float]]:
    """HU on a ``size`` x ``size`` axial square of side ``fov_mm`` centred on ``centre``.

    With ``factor > 1`` the plane is sampled ``factor`` times finer and block-averaged
    (area sampling: a thin cortex is not hit-or-missed by point samples).  Returns the
    image and the patient position of its pixel ``[0, 0]``.
    """
    ps = fov_mm / size
    o = (float(centre[0]) - fov_mm / 2 + ps / 2, float(centre[1]) - fov_mm / 2 + ps / 2, float(centre[2]))
    if factor <= 1:
        return np.asarray(source(o, _U, _V, (size, size), (ps, ps)), dtype=np.float32), o
    fs = ps / factor
    of = (float(centre[0]) - fov_mm / 2 + fs / 2, float(centre[1]) - fov_mm / 2 + fs / 2, float(centre[2]))
    fine = np.asarray(source(of, _U, _V, (size * factor, size * factor), (fs, fs)), dtype=np.float64)
    img = fine.reshape(size, factor, size, factor).mean(axis=(1, 3))
    return img.astype(np.float32), o


def preprocess(source: PlaneSource, geometry: L1Geometry, *, size: int = SIZE, fov_mm: float = FOV_MM,
               n_neighbours: int = N_NEIGHBOURS, energy_correction: bool = ENERGY_CORRECTION,
               kvp: float | None = None) -> tuple[np.ndarray, PreprocessInfo]:
    """Network inputs of one series: the reference L1 slice and its neighbours, cropped and scaled.

    Parameters
    ----------
    source : PlaneSource
        ``source(origin, u, v, shape, spacing) -> HU``: a
        :class:`~screener.preprocess.sampling.VolumeSampler` at inference, the
        phantom renderer in the cohort builder.
    geometry : L1Geometry
        L1 centroid, z range and the series' slice positions.
    size : int
        Crop side in pixels (the network's ``input_size``).
    fov_mm : float
        Crop side in mm.
    n_neighbours : int
        Slices taken on each side of the reference (0, 1 or 2 in the paper).
    energy_correction : bool
        Multiply the crops' HU by :func:`~screener.preprocess.energy.energy_scale` of ``kvp``
        before windowing (the model card's ``energy_correction``).
    kvp : float, optional
        The series' tube voltage (``KVP``); ``None`` = unknown (treated as 120 kVp).

    Returns
    -------
    images : numpy.ndarray
        ``float32 (S, 1, size, size)`` in [0, 1]; sample 0 is the reference,
        then its neighbours (nearest first, inferior before superior).
    info : PreprocessInfo
        ``extras["energy_scale"]`` is the factor applied to the HU (1.0 without correction).

    Raises
    ------
    ValueError
        When the crop size or FOV is not positive, or ``kvp`` is not a positive number.
    """
    if size <= 0 or fov_mm <= 0:
        raise ValueError(f"crop size and FOV must be positive (got {size} px, {fov_mm} mm)")
    scale = np.float32(energy_scale(kvp) if energy_correction else 1.0)
    cx, cy, cz = (float(c) for c in geometry.centroid_mm)
    zs = np.asarray(sorted(geometry.slice_z), dtype=np.float64)
    lo, hi = geometry.z_range_mm
    cand = np.flatnonzero((zs >= lo) & (zs <= hi))
    if cand.size == 0:  # a thick-slice series can straddle a short body: take the nearest slice
        cand = np.array([int(np.argmin(np.abs(zs - cz)))])
    nsel = int(round(SELECT_FOV_MM / SELECT_SPACING_MM))
    areas: dict[float, float] = {}
    for k in cand:
        img, _ = _plane(source, (cx, cy, zs[k]), SELECT_FOV_MM, nsel)
        areas[float(zs[k])] = trabecular_area(img, SELECT_FOV_MM / nsel)
    if max(areas.values()) <= 0.0:
        # no slice's cortex closes with the one-pixel closing (coarse pixels point-sampling a thin
        # shell leave it a dotted line): outline each as l1_attenuation does, with wider closings
        # and rays from the centre; a slice the simple test already enclosed is never re-read
        for k in cand:
            img, _ = _plane(source, (cx, cy, zs[k]), SELECT_FOV_MM, nsel)
            areas[float(zs[k])] = outlined_trabecular_area(img, SELECT_FOV_MM / nsel)
    best_area = max(areas.values())
    fallback = best_area <= 0.0

    def enclosed(k: int) -> bool:
        return areas.get(float(zs[k]), 0.0) > 0.0 if 0 <= k < len(zs) else False

    # prefer references whose neighbours also cut through the body (not the disc / endplate)
    inner = [k for k in cand if all(enclosed(k + s) for s in range(-n_neighbours, n_neighbours + 1))]
    pool = inner or list(cand)
    if not fallback:  # an outline leaking into the canal reads far above its neighbours: skip it
        med = float(np.median([a for a in areas.values() if a > 0]))
        pool = [k for k in pool if areas[float(zs[k])] <= LEAK_FACTOR * med] or pool
    top = max(areas[float(zs[k])] for k in pool)
    # largest area; ties (within 1 %) go to the slice nearest the centroid
    order = sorted(pool, key=lambda k: (-round(areas[float(zs[k])] / max(top, 1e-9), 2), abs(zs[k] - cz)))
    ref = int(order[0])
    picks = [ref]
    for step in range(1, n_neighbours + 1):
        for k in (ref - step, ref + step):
            if 0 <= k < len(zs):
                picks.append(k)
    centre_y = cy + CROP_POSTERIOR_MM
    out, origins = [], []
    factor = max(1, int(np.ceil(fov_mm / size / SAMPLE_MM - 1e-9)))
    for k in picks:
        img, o = _plane(source, (cx, centre_y, zs[k]), fov_mm, size, factor)
        if scale != 1.0:
            img = img * scale
        out.append(np.clip((img - WINDOW_LO_HU) / (WINDOW_HI_HU - WINDOW_LO_HU), 0.0, 1.0))
        origins.append(o)
    images = np.stack(out)[:, None].astype(np.float32)
    ps = fov_mm / size
    info = PreprocessInfo(z_reference=float(zs[ref]), z_samples=[float(zs[k]) for k in picks],
                          areas_mm2=areas, crop_origins=origins, spacing_mm=(ps, ps), shape=(size, size),
                          fallback=fallback, extras={"energy_scale": float(scale)})
    return images, info


def preprocess_volume(volume: Volume, l1: VertebraLocation, *, size: int = SIZE, fov_mm: float = FOV_MM,
                      n_neighbours: int = N_NEIGHBOURS, energy_correction: bool = ENERGY_CORRECTION,
                      kvp: float | None = None) -> tuple[np.ndarray, PreprocessInfo]:
    """The inference path (daemon protocol and site-manifest builder): :func:`preprocess` on a volume.

    Parameters
    ----------
    volume : Volume
        Axial CT volume (HU).
    l1 : VertebraLocation
        L1 from the spine localizer.
    size, fov_mm, n_neighbours, energy_correction
        As :func:`preprocess` (the bundle card's values).
    kvp : float, optional
        The series' ``KVP`` (for the energy correction).

    Returns
    -------
    images, info
        As :func:`preprocess`.
    """
    from screener.preprocess.sampling import VolumeSampler

    return preprocess(VolumeSampler(volume), geometry_from_volume(volume, l1), size=size, fov_mm=fov_mm,
                      n_neighbours=n_neighbours, energy_correction=energy_correction, kvp=kvp)
