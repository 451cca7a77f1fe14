"""Vertebral body segmentation and trabecular ROI placement on axial CT (pure functions).

Used by :mod:`screener.protocols.l1_attenuation.protocol`; nothing here knows DICOM, only
an HU array ``[k, j, i]`` (slice, row, column), its spacing and a seed.

Method
------
1. **Crop** a box of +-40 mm in-plane and +-32 mm along the slices around the
   seed (the localizer's centroid); every step below works on the crop. Pixels
   finer than 0.75 mm are block-averaged for the outline (not for the ROI).
2. **Adaptive thresholds.** The body's own trabecular level ``T`` (median of
   a 0.8 mm smoothed image within 6 mm of the seed, then inside the outline
   found, re-estimated until stable) sets the barrier: above
   ``T + max(100 HU, 3 robust SD)`` (cortex, endplate, bone island) or below
   ``T - max(150 HU, 3 robust SD)`` (fat, canal, air). A sweep of fixed cortex
   levels is only a fallback to find a first outline, and an outline whose
   inside is not homogeneous (robust SD > 110 HU) is not bone. Nothing assumes
   young, dense bone: a 20-100 HU body in a faint cortex is outlined the same
   way as a 300 HU one.
3. **Outline per slice.** The barrier is closed morphologically (1.5, 3, 4.5,
   6 then 8 mm, at least one pixel: gaps such as the basivertebral foramen;
   free-standing blobs < 80 mm^2 such as a bone island are left out of the
   closing first, so that it cannot weld them to the cortex, unless they then
   lie on the region's edge: a cortical fragment),
   and the enclosed region (a hole of the barrier) containing the seed, else
   the nearest within 10 mm, of 350-3500 mm^2 (the spinal canal is smaller) is
   the trabecular body; its own holes (a bone island, a low focus) are filled.
   When no closing encloses anything (3 mm pixels point-sampling a 1 mm
   cortex leave it a dotted line) the first barrier pixel along 72 rays from
   the seed outlines it (:func:`polar_outline`; gaps take their neighbours'
   radius). No cortical HU peak is required, only enclosure.
4. **Along the slices** the outline is followed from the seed slice up and
   down while it overlaps the previous slice, keeps 60-150 % of the median
   area so far and a median HU within max(40 HU, 1 robust SD) of ``T``; an
   endplate (barrier over the cross-section, or denser content) or a disc (no
   cortex ring, or less dense content) ends the body. Thin slices are walked
   with a stride of ~2 mm.
5. **ROI** (:func:`place_trabecular_roi`): the slices through the middle third
   of the body's height (``round(height / (3 x spacing))`` slices nearest the
   middle, at least one), more (within the middle 60 %) only while the ROI
   holds < 2500 mm^3 (coarse pixels); on each, the outline eroded by ``edge_margin_mm`` plus
   half a pixel (cortex and its partial volume), minus the posterior quarter of
   the body's antero-posterior depth (basivertebral vein).
6. **Focal lesions** (:func:`focal_outliers`): ROI voxels whose 0.8 mm smoothed
   HU lies more than ``max(3.5 robust SD, 60 HU)`` from the ROI median (robust
   SD = 1.4826 x MAD) are outliers; a 3-D connected group of >= 2 of them and
   >= 15 mm^3 is excluded with a 2 mm margin (its partial-volume halo), and is
   a focus (bone island, Schmorl node, lytic focus; flagged) unless it touches
   the ROI's rim (cortex partial volume, a leak into fat or canal). Isolated
   outlier voxels are excluded too but raise no flag.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage

from screener.preprocess.morphology import fill_holes

#: crop half-sizes (mm) around the seed
CROP_XY_MM = 40.0
#: working pixel (mm): finer pixels are block-averaged to at least this for the outline
WORK_PIXEL_MM = 0.75
CROP_Z_MM = 32.0
#: smoothing (Gaussian sigma, mm) of the image the barrier is thresholded on / outliers read on
BARRIER_SIGMA_MM = 0.8
OUTLIER_SIGMA_MM = 0.8
#: cortex threshold = T + max(DELTA_MIN_HU, DELTA_SD x robust SD of the trabecular bone)
DELTA_MIN_HU = 100.0
DELTA_SD = 3.0
#: ... and the low barrier = T - max(DROP_MIN_HU, DELTA_SD x robust SD)
DROP_MIN_HU = 150.0
#: an outline whose inside is less homogeneous than this (robust SD, HU) is not trabecular bone
MAX_SD_HU = 110.0
#: closing radii (mm) tried in turn to bridge gaps in the cortex
CLOSING_MM = (1.5, 3.0, 4.5, 6.0, 8.0)
#: plausible trabecular cross-section of a lumbar body (mm^2)
AREA_MIN_MM2 = 350.0
AREA_MAX_MM2 = 3500.0
#: the body must contain, or lie within this distance of, the seed (mm)
SEED_TOL_MM = 10.0
#: area ratio of overlapping regions to the previous slice's (region picking)
AREA_RATIO = (0.4, 1.7)
#: a further slice continues the body when its area is within this ratio of the median so far ...
SLICE_AREA_RATIO = (0.6, 1.5)
#: ... and its median HU within max(CONTENT_TOL_HU, CONTENT_TOL_SD x robust SD) of the body's
CONTENT_TOL_HU = 40.0
CONTENT_TOL_SD = 1.0
#: longest body accepted along the slices (mm)
MAX_HEIGHT_MM = 45.0
#: free-standing barrier blobs smaller than this (mm^2) are left out of the closing first
BLOB_MAX_MM2 = 80.0
#: ... and must then lie at least this deep (mm) inside the region found
BLOB_EDGE_MM = 2.5
#: a ray outline may hold at most this fraction of barrier pixels
POLAR_MAX_BARRIER = 0.1
#: fixed cortex thresholds swept only when the adaptive one finds no outline
SWEEP_HU = (150.0, 200.0, 250.0, 300.0, 400.0, 500.0, 650.0)
#: the ROI slab grows beyond the middle third (up to +-30 % of the height around the middle)
#: while the ROI volume is below this (coarse scans: few voxels, texture sampling error)
ROI_TARGET_MM3 = 2500.0
SLAB_MAX_FRACTION = 0.3
#: outlier rule and focus definition
OUTLIER_Z = 3.5
OUTLIER_MIN_HU = 60.0
FOCUS_MIN_MM3 = 15.0
FOCUS_MARGIN_MM = 2.0


class BodyNotFound(Exception):
    """No vertebral body could be outlined; ``reason`` says why in plain words."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class BodySegmentation:
    """The trabecular vertebral body found around a seed.

    Attributes
    ----------
    masks : dict of int to numpy.ndarray
        Volume slice index -> boolean mask (crop rows x crop columns) of the
        solid trabecular body on that slice (cortex excluded, enclosed foci
        included). Only the walked slices (stride ``stride``) and the ROI
        slices are present.
    first_slice, last_slice : int
        Volume slice indices of the body's ends (inclusive).
    crop : tuple of slice
        ``(rows, columns)`` slices of the crop in the volume's slice plane.
    trabecular_hu : float
        ``T``: median 0.8 mm smoothed HU inside the outline on the seed slice.
    cortex_threshold_hu, low_threshold_hu : float
        Barrier thresholds used (``trabecular_hu + delta``, ``trabecular_hu - delta``).
    closing_mm : float
        Closing radius that outlined the seed slice (0: outlined by rays, the
        cortex enclosed nothing even closed).
    seed_slice : int
        Volume slice index the outline started from.
    stride : int
        Slice stride of the walk along the body.
    notes : list of str
        Observations worth reporting (e.g. the body reached the crop).
    follow : callable
        ``(k, previous working-grid mask) -> working-grid mask or None``: the
        outline of a further slice (used for ROI slices the walk skipped).
    work_masks : dict of int to numpy.ndarray
        The masks on the working grid; ``upsample`` maps one to crop pixels.
    """

    masks: dict[int, np.ndarray]
    first_slice: int
    last_slice: int
    crop: tuple[slice, slice]
    trabecular_hu: float
    cortex_threshold_hu: float
    low_threshold_hu: float
    closing_mm: float
    seed_slice: int
    stride: int
    notes: list[str] = field(default_factory=list)
    follow: Callable[[int, np.ndarray], np.ndarray | None] | None = field(default=None, repr=False)
    work_masks: dict[int, np.ndarray] = field(default_factory=dict, repr=False)
    upsample: Callable[[np.ndarray], np.ndarray] | None = field(default=None, repr=False)

    def height_mm(self, slice_spacing: float) -> float:
        """Body height along the slices (number of body slices x spacing)."""
        return (self.last_slice - self.first_slice + 1) * float(slice_spacing)


@dataclass
class RoiSlice:
    """The ROI on one slice (crop coordinates).

    ``candidate``: the eroded body without its posterior quarter; ``roi``: the
    candidate without outliers and foci; ``area_mm2`` of ``roi``;
    ``excluded_fraction`` of ``candidate`` left out.
    """

    slice_index: int
    candidate: np.ndarray
    roi: np.ndarray
    area_mm2: float
    excluded_fraction: float


@dataclass
class TrabecularRoi:
    """A multi-slice trabecular ROI and its statistics.

    Attributes
    ----------
    slices : list of RoiSlice
        One per slice used, ascending slice index.
    values : numpy.ndarray
        Raw HU of every ROI voxel (all slices pooled), float64.
    mean_hu, sd_hu, median_hu : float
        Statistics of ``values`` (SD with ddof = 1).
    excluded_fraction : float
        Fraction of the candidate voxels excluded as outliers or foci.
    foci : list of dict
        One per focal lesion excluded: ``kind`` ("dense" / "low"), ``volume_mm3``,
        ``delta_hu`` (its median minus the ROI median), ``slice_index`` (centre).
    representative : int
        Position in ``slices`` of the slice nearest the body's middle.
    robust_sd_hu, median_all_hu : float
        Robust SD and median of the smoothed candidate voxels (the outlier rule's).
    """

    slices: list[RoiSlice]
    values: np.ndarray
    mean_hu: float
    sd_hu: float
    median_hu: float
    excluded_fraction: float
    foci: list[dict]
    representative: int
    robust_sd_hu: float = 0.0
    median_all_hu: float = 0.0


# ---------------------------------------------------------------------- helpers
def _sigma_px(sigma_mm: float, spacing: Sequence[float]) -> tuple[float, ...]:
    return tuple(sigma_mm / max(float(s), 1e-6) for s in spacing)


def _dilate(mask: np.ndarray, radius_mm: float, spacing: tuple[float, float]) -> np.ndarray:
    if not mask.any():
        return mask.copy()
    return ndimage.distance_transform_edt(~mask, sampling=spacing) <= radius_mm + 1e-6


def _erode(mask: np.ndarray, radius_mm: float, spacing: tuple[float, float]) -> np.ndarray:
    return ndimage.distance_transform_edt(mask, sampling=spacing) > radius_mm + 1e-6


def _disk_se(radius_mm: float, spacing: tuple[float, float]) -> np.ndarray:
    nj, ni = int(radius_mm / spacing[0]), int(radius_mm / spacing[1])
    yy, xx = np.mgrid[-nj:nj + 1, -ni:ni + 1]
    return (yy * spacing[0]) ** 2 + (xx * spacing[1]) ** 2 <= radius_mm ** 2 + 1e-6


def _close(mask: np.ndarray, radius_mm: float, spacing: tuple[float, float]) -> np.ndarray:
    """Binary closing by a disk of ``radius_mm`` (at least one pixel)."""
    r = max(radius_mm, max(spacing) * 1.01)
    pad = int(np.ceil(r / min(spacing))) + 1
    m = np.pad(mask, pad)
    if r / min(spacing) <= 4.0:   # small disks: direct morphology is faster than two EDTs
        se = _disk_se(r, spacing)
        out = ndimage.binary_erosion(ndimage.binary_dilation(m, structure=se), structure=se,
                                     border_value=1)
    else:
        out = _erode(_dilate(m, r, spacing), r, spacing)
    return out[pad:-pad, pad:-pad]


def robust_sd(values: np.ndarray) -> float:
    """1.4826 x median absolute deviation of ``values``."""
    if values.size == 0:
        return 0.0
    med = float(np.median(values))
    return 1.4826 * float(np.median(np.abs(values - med)))


def enclosed_regions(barrier: np.ndarray) -> tuple[np.ndarray, int]:
    """Label the regions enclosed by ``barrier`` (its holes; border-touching background excluded)."""
    holes = fill_holes(barrier) & ~barrier
    return ndimage.label(holes)


def _pick_region(labels: np.ndarray, n: int, target: np.ndarray | tuple[float, float],
                 spacing: tuple[float, float], ref_area: float | None) -> np.ndarray | None:
    """Enclosed region for a seed point (first slice) or overlapping a previous mask.

    ``target`` is a (row, column) seed: the plausible region containing it, else
    the nearest within :data:`SEED_TOL_MM`. Or a boolean mask: the union of
    regions that overlap it by >= 20 % of their own area, if its area is within
    :data:`AREA_RATIO` of ``ref_area``.
    """
    if n == 0:
        return None
    px = spacing[0] * spacing[1]
    sizes = np.bincount(labels.ravel(), minlength=n + 1) * px
    if isinstance(target, np.ndarray):
        ov = np.bincount(labels[target].ravel(), minlength=n + 1) * px
        keep = [q for q in range(1, n + 1) if ov[q] >= 0.2 * sizes[q] and sizes[q] >= 0.02 * AREA_MIN_MM2]
        if not keep:
            return None
        region = np.isin(labels, keep)
        area = float(region.sum() * px)
        if ref_area is not None and not AREA_RATIO[0] * ref_area <= area <= AREA_RATIO[1] * ref_area:
            return None
        return fill_holes(region)
    sj, si = target
    rows, cols = labels.shape
    jj, ii = np.nonzero(labels)
    d = np.hypot((jj - sj) * spacing[0], (ii - si) * spacing[1])
    best, best_d = None, SEED_TOL_MM + 1e-6
    order = np.argsort(d)
    seen: set[int] = set()
    for idx in order:
        if d[idx] > best_d:
            break
        q = int(labels[jj[idx], ii[idx]])
        if q in seen:
            continue
        seen.add(q)
        region = fill_holes(labels == q)
        area = float(region.sum() * px)
        if AREA_MIN_MM2 <= area <= AREA_MAX_MM2:
            best, best_d = region, float(d[idx])
            break
    # the seed may sit on a focus or the cortex: a filled region containing it also counts
    if best is None:
        j0, i0 = int(round(sj)), int(round(si))
        if 0 <= j0 < rows and 0 <= i0 < cols:
            for q in range(1, n + 1):
                region = fill_holes(labels == q)
                if region[j0, i0] and AREA_MIN_MM2 <= region.sum() * px <= AREA_MAX_MM2:
                    return region
    return best


def outline_slice(smooth: np.ndarray, threshold: tuple[float, float], spacing: tuple[float, float],
                  target: np.ndarray | tuple[float, float], ref_area: float | None = None,
                  closings: Sequence[float] = CLOSING_MM) -> tuple[np.ndarray, float] | None:
    """Trabecular body on one slice: the region enclosed by the closed barrier (outside ``threshold``).

    Parameters
    ----------
    smooth : numpy.ndarray
        2-D HU image (0.5 mm smoothed).
    threshold : tuple of float
        ``(low, high)``: pixels above ``high`` (cortex) or below ``low`` (fat,
        canal, air; only where far below the body's own level) are barrier.
    spacing : tuple of float
        (row, column) pixel spacing, mm.
    target : tuple of float or numpy.ndarray
        Seed (row, column) for the first slice, or the previous slice's mask.
    ref_area : float, optional
        Previous slice's area (mm^2) when ``target`` is a mask.
    closings : sequence of float
        Closing radii (mm) tried in turn.

    Returns
    -------
    (mask, closing_mm) or None
        ``closing_mm`` 0 when the ray outline (:func:`polar_outline`) was used.
    """
    raw = (smooth > threshold[1]) | (smooth < threshold[0])
    # small free-standing barrier blobs (a bone island, a low focus inside the body) must not be
    # closed onto the cortex and cut the body in two: each closing is tried without them first
    # (they are inside the region found and filled with it), then with them (a dotted cortex)
    lab, n = ndimage.label(raw)
    sizes = np.bincount(lab.ravel(), minlength=n + 1) * spacing[0] * spacing[1]
    small = np.flatnonzero(sizes < BLOB_MAX_MM2)
    small = small[small > 0]
    blobs = np.isin(lab, small) if small.size else None
    variants = [raw & ~blobs, raw] if blobs is not None else [raw]
    for r in closings:
        for q, bar in enumerate(variants):
            barrier = _close(bar, r, spacing)
            labels, n_h = enclosed_regions(barrier)
            region = _pick_region(labels, n_h, target, spacing, ref_area)
            if region is None:
                continue
            if q == 0 and blobs is not None and (region & blobs).any():
                # a blob left out must lie well inside the region (a focus), not on its edge (a
                # fragment of a gapped cortex the region then leaks through)
                depth = ndimage.distance_transform_edt(region, sampling=spacing)
                if depth[region & blobs].min() < BLOB_EDGE_MM:
                    continue
            return region, float(r)
    # a cortex too sparse to enclose anything (coarse pixels point-sampling a thin shell, wide
    # gaps): the star-shaped outline of the first barrier pixel along rays from the centre
    if isinstance(target, np.ndarray):
        jj, ii = np.nonzero(target)
        centres = [(float(jj.mean()), float(ii.mean()))]
    else:
        centres = [(target[0] + oj / spacing[0], target[1] + oi / spacing[1])
                   for oj in (-6.0, -3.0, 0.0, 3.0, 6.0) for oi in (-6.0, -3.0, 0.0, 3.0, 6.0)
                   if oj * oj + oi * oi <= 40.0]
    best: tuple[float, np.ndarray] | None = None
    for c in centres:
        got = polar_outline(raw, c, spacing)
        if got is None:
            continue
        frac, region = got
        if raw[region].mean() > POLAR_MAX_BARRIER:
            continue   # the star cuts through cortex: not a body outline (too flat, or a leak)
        area = float(region.sum() * spacing[0] * spacing[1])
        if not AREA_MIN_MM2 <= area <= AREA_MAX_MM2:
            continue
        if ref_area is not None and not AREA_RATIO[0] * ref_area <= area <= AREA_RATIO[1] * ref_area:
            continue
        if isinstance(target, np.ndarray) and (region & target).sum() < 0.5 * region.sum():
            continue
        if best is None or frac > best[0] + 1e-9:
            best = (frac, region)
    if best is not None:
        return best[1], 0.0
    return None


def _circular_median(rad: np.ndarray, window: int) -> np.ndarray | None:
    """Median of each ray's ``window`` neighbours (NaN ignored); None where a window is all NaN."""
    h = window // 2
    ext = np.concatenate([rad[-h:], rad, rad[:h]])
    win = np.lib.stride_tricks.sliding_window_view(ext, window)
    if not np.isfinite(win).any(axis=1).all():
        return None
    return np.nanmedian(win, axis=1)


def polar_outline(barrier: np.ndarray, centre: tuple[float, float], spacing: tuple[float, float],
                  n_rays: int = 72, r_max_mm: float = 32.0) -> tuple[float, np.ndarray] | None:
    """Star-shaped region bounded by the first ``barrier`` pixel along rays from ``centre``.

    Along each ray the entry into the barrier nearest its neighbours' radius
    is the edge (a focus inside the body is passed over); rays that meet no
    barrier within ``r_max_mm`` (gaps) or still end far from their neighbours
    (leaks to other structures) take the circular median of their 9 neighbours.
    Needs >= 60 % of the rays bounded. Returns ``(fraction of rays bounded,
    mask)`` or None.
    """
    rows, cols = barrier.shape
    if not (0 <= centre[0] < rows and 0 <= centre[1] < cols):
        return None
    step = 0.25 * min(spacing)
    r = np.arange(step, r_max_mm + 1e-6, step)
    th = np.linspace(0.0, 2 * np.pi, n_rays, endpoint=False)
    pj = np.rint(centre[0] + np.outer(np.sin(th), r) / spacing[0]).astype(int)
    pi_ = np.rint(centre[1] + np.outer(np.cos(th), r) / spacing[1]).astype(int)
    inside = (pj >= 0) & (pj < rows) & (pi_ >= 0) & (pi_ < cols)
    hit = np.zeros(pj.shape, bool)
    hit[inside] = barrier[pj[inside], pi_[inside]]
    # every entry into the barrier along a ray (beyond 2 mm; a focus around the centre is no
    # entry) is a candidate edge: the first one unless the ray meets a focus (bone island) or a
    # stray pixel before the cortex -- then the entry nearest its neighbours' radius
    starts = hit & ~np.concatenate([np.zeros((n_rays, 1), bool), hit[:, :-1]], axis=1)
    starts[:, r < 2.0] = False
    any_hit = starts.any(axis=1)
    frac = float(any_hit.mean())
    if frac < 0.6:
        return None
    rad = np.where(any_hit, r[starts.argmax(axis=1)], np.nan)
    for it in range(4):
        # first reference: the median over all rays (a focus near the centre can fill a whole
        # window of neighbours); then the neighbours' median of the entries picked
        med = np.full(n_rays, float(np.nanmedian(rad))) if it == 0 else _circular_median(rad, 9)
        if med is None:
            return None
        cand = np.where(starts, r[None, :], np.inf)
        pick = np.abs(cand - med[:, None]).argmin(axis=1)
        new = np.where(any_hit, r[pick], np.nan)
        if np.array_equal(new, rad, equal_nan=True):
            break
        rad = new
    med = _circular_median(rad, 9)
    if med is None:
        return None
    bad = ~np.isfinite(rad) | (rad > 1.25 * med) | (rad < 0.75 * med)
    rad[bad] = med[bad]
    jj, ii = np.mgrid[:rows, :cols]
    y = (jj - centre[0]) * spacing[0]
    x = (ii - centre[1]) * spacing[1]
    k = np.mod(np.arctan2(y, x), 2 * np.pi) / (2 * np.pi / n_rays)
    k0 = np.floor(k).astype(int) % n_rays
    w = k - np.floor(k)
    rr = rad[k0] * (1 - w) + rad[(k0 + 1) % n_rays] * w
    return frac, np.hypot(x, y) < rr


# ------------------------------------------------------------------ segmentation
def segment_body(hu: np.ndarray, spacing: tuple[float, float, float],
                 seed: tuple[float, float, float]) -> BodySegmentation:
    """Segment the trabecular vertebral body around ``seed`` (see module docstring, steps 1-4).

    Parameters
    ----------
    hu : numpy.ndarray
        Volume ``[k, j, i]`` in HU.
    spacing : tuple of float
        ``(slice, row, column)`` spacing, mm.
    seed : tuple of float
        ``(k, j, i)`` index near the body's centre (the localizer's centroid).

    Returns
    -------
    BodySegmentation

    Raises
    ------
    BodyNotFound
        With a plain-words reason.
    """
    g = _WorkGrid(hu, spacing, seed)
    sm, dj, di, sp2, seed2, sk = g.sm, g.dj, g.di, g.sp2, g.seed2, g.sk
    # trabecular level near the seed, then the outline, then the level inside the outline
    jj, ii = np.ogrid[:g.nj, :g.ni]
    near = ((jj - seed2[0]) * dj) ** 2 + ((ii - seed2[1]) * di) ** 2 <= 6.0 ** 2
    t0 = float(np.median(sm(g.k0)[near]))
    # the seed slice itself, else the nearest slices within 6 mm (a bad slice, the seed on an endplate)
    tries = sorted((k for k in g.ks if abs(k - sk) * g.dk <= 6.0 + 1e-6), key=lambda k: (abs(k - sk), k))
    found = None
    for k in tries:
        found = _first_outline(sm(k), t0, sp2, seed2)
        if found is not None:
            k_seed = k
            break
    if found is None:
        raise BodyNotFound("no region enclosed by cortical bone within "
                           f"{SEED_TOL_MM:.0f} mm of the localizer's L1 centroid (it lies in soft "
                           "tissue, or the body's cortex is not visible)")
    mask0, t_body, thr, r_close = found
    _, sd_body, _ = _threshold(sm(k_seed), mask0, sp2)
    area0 = float(mask0.sum() * dj * di)
    areas = [area0]
    closings = (r_close,) + tuple(c for c in CLOSING_MM if c > r_close) if r_close > 0 else CLOSING_MM
    tol_hu = max(CONTENT_TOL_HU, CONTENT_TOL_SD * sd_body)

    def follow(k: int, ref: np.ndarray) -> np.ndarray | None:
        """The body on slice ``k`` continuing ``ref``: enclosed, of similar area and content."""
        ref_area = float(np.median(areas))
        got = outline_slice(sm(k), thr, sp2, ref, ref_area, closings=closings)
        if got is None:
            return None
        region = got[0]
        area = float(region.sum() * dj * di)
        if not SLICE_AREA_RATIO[0] * ref_area <= area <= SLICE_AREA_RATIO[1] * ref_area:
            return None   # an endplate, the disc or a neighbouring structure
        if abs(float(np.median(sm(k)[region])) - t_body) > tol_hu:
            return None   # endplate (denser) or disc (less dense) in the slice
        return region

    masks = {k_seed: mask0}
    ends, notes, stride = _track(follow, masks, areas, k_seed, g.ks, g.dk, (dj, di))
    seg = BodySegmentation(masks={k: g.up(m) for k, m in masks.items()}, first_slice=min(ends),
                           last_slice=max(ends), crop=(g.rs, g.cs), trabecular_hu=t_body,
                           cortex_threshold_hu=thr[1], low_threshold_hu=thr[0], closing_mm=r_close,
                           seed_slice=k_seed, stride=stride, notes=notes, follow=follow,
                           work_masks=masks, upsample=g.up)
    return seg


def _track(follow: Callable[[int, np.ndarray], np.ndarray | None], masks: dict[int, np.ndarray],
           areas: list[float], k_seed: int, ks: range, dk: float,
           pixel_mm: tuple[float, float]) -> tuple[list[int], list[str], int]:
    """Follow the body up and down from the seed slice (step 3), filling ``masks`` and ``areas``.

    Every ``stride``-th slice (about 2 mm) until ``follow`` loses the body, the crop ends or
    :data:`MAX_HEIGHT_MM` is reached; then the slices the stride skipped past each end.
    Returns ``(last slice each way, notes, stride)``.
    """
    dj, di = pixel_mm
    stride = max(1, int(np.floor(2.0 / dk + 1e-6)))
    ends = []
    notes: list[str] = []
    max_steps = int(MAX_HEIGHT_MM / dk)
    for direction in (1, -1):
        k, last = k_seed, k_seed
        while True:
            k = k + direction * stride
            if k < ks.start or k >= ks.stop:
                notes.append("the body reaches the edge of the scan or crop")
                break
            if abs(k - k_seed) > max_steps:
                break
            region = follow(k, masks[last])
            if region is None:
                break
            masks[k], last = region, k
            areas.append(float(region.sum() * dj * di))
        ends.append(last)
        # a stride > 1 leaves the last stride - 1 slices past the end unexamined: try them
        for k in range(last + direction, last + direction * stride, direction):
            if not ks.start <= k < ks.stop:
                break
            region = follow(k, masks[ends[-1]])
            if region is None:
                break
            masks[k], ends[-1] = region, k
    return ends, notes, stride


class _WorkGrid:
    """The crop around the seed, block-averaged to >= :data:`WORK_PIXEL_MM` and smoothed per slice.

    Smoothing is in-plane (:data:`BARRIER_SIGMA_MM`) and, on thin slices, with Gaussian weights
    of the neighbouring slices; both are cached per slice.

    Raises
    ------
    BodyNotFound
        When the seed lies outside the image.
    """

    def __init__(self, hu: np.ndarray, spacing: tuple[float, float, float],
                 seed: tuple[float, float, float]) -> None:
        self.hu = hu
        n_k, rows, cols = hu.shape
        dk, dj, di = (abs(float(s)) for s in spacing)
        sk, sj, si = (float(v) for v in seed)
        if not (-0.5 <= sk <= n_k - 0.5 and 0 <= sj < rows and 0 <= si < cols):
            raise BodyNotFound("the localizer's L1 centroid lies outside the image")
        k0 = int(np.clip(round(sk), 0, n_k - 1))
        hj, hi_ = int(np.ceil(CROP_XY_MM / dj)), int(np.ceil(CROP_XY_MM / di))
        # fine pixels are block-averaged to a working grid of >= WORK_PIXEL_MM (speed, noise)
        fj, fi = max(1, int(round(WORK_PIXEL_MM / dj))), max(1, int(round(WORK_PIXEL_MM / di)))
        r0, c0 = max(0, int(sj) - hj), max(0, int(si) - hi_)
        r1, c1 = min(rows, int(sj) + hj + 1), min(cols, int(si) + hi_ + 1)
        r1, c1 = r0 + (r1 - r0) // fj * fj, c0 + (c1 - c0) // fi * fi
        rs, cs = slice(r0, r1), slice(c0, c1)
        hk = int(np.ceil(CROP_Z_MM / dk))
        ks = range(max(0, k0 - hk), min(n_k, k0 + hk + 1))
        nj, ni = (r1 - r0) // fj, (c1 - c0) // fi
        dj, di = dj * fj, di * fi
        sp2 = (dj, di)
        sig = _sigma_px(BARRIER_SIGMA_MM, sp2)

        # along the slices: Gaussian weights of the neighbouring slices (thin slices only)
        sz = BARRIER_SIGMA_MM / dk
        m = int(np.ceil(3 * sz)) if sz > 0.3 else 0
        wz = np.exp(-0.5 * (np.arange(-m, m + 1) / max(sz, 1e-6)) ** 2) if m else np.ones(1)
        self.n_k, self.k0, self.sk, self.ks, self.nj, self.ni = n_k, k0, sk, ks, nj, ni
        self.fj, self.fi, self.dk, self.dj, self.di, self.sp2 = fj, fi, dk, dj, di, sp2
        self.rs, self.cs, self.sig, self.m, self.wz = rs, cs, sig, m, wz
        self.seed2 = ((sj - r0 + 0.5) / fj - 0.5, (si - c0 + 0.5) / fi - 0.5)
        self._cache2: dict[int, np.ndarray] = {}
        self._cache: dict[int, np.ndarray] = {}

    def block(self, a: np.ndarray) -> np.ndarray:
        """Block-average crop pixels to the working grid."""
        if self.fj == 1 and self.fi == 1:
            return a
        return a.reshape(self.nj, self.fj, self.ni, self.fi).mean(axis=(1, 3))

    def up(self, m: np.ndarray) -> np.ndarray:
        """A working-grid mask repeated back to crop pixels."""
        if self.fj == 1 and self.fi == 1:
            return m
        return np.repeat(np.repeat(m, self.fj, axis=0), self.fi, axis=1)

    def sm2(self, k: int) -> np.ndarray:
        """Slice ``k`` on the working grid, smoothed in-plane."""
        if k not in self._cache2:
            self._cache2[k] = ndimage.gaussian_filter(self.block(self.hu[k, self.rs, self.cs].astype(np.float32)),
                                                      sigma=self.sig)
        return self._cache2[k]

    def sm(self, k: int) -> np.ndarray:
        """Slice ``k`` smoothed in-plane and across the neighbouring slices."""
        if k not in self._cache:
            m, wz = self.m, self.wz
            ws = [(w, k + o) for w, o in zip(wz, range(-m, m + 1)) if 0 <= k + o < self.n_k]
            tot = sum(w for w, _ in ws)
            self._cache[k] = sum(w * self.sm2(q) for w, q in ws) / tot
        return self._cache[k]


def _threshold(smooth: np.ndarray, mask: np.ndarray, spacing: tuple[float, float]
               ) -> tuple[float, float, tuple[float, float]]:
    """Trabecular level (median inside ``mask`` eroded by 1 mm), its robust SD, and the barrier thresholds."""
    inner = _erode(mask, 1.0, spacing)
    vals = smooth[inner] if inner.sum() > 10 else smooth[mask]
    t, sd = float(np.median(vals)), robust_sd(vals)
    return t, sd, (t - max(DROP_MIN_HU, DELTA_SD * sd), t + max(DELTA_MIN_HU, DELTA_SD * sd))


def _first_outline(smooth: np.ndarray, t0: float, spacing: tuple[float, float],
                   seed: tuple[float, float]
                   ) -> tuple[np.ndarray, float, tuple[float, float], float] | None:
    """Outline on the seed slice with thresholds adapted to the body (step 2).

    Tries the thresholds from the seed's neighbourhood first, then a sweep of
    fixed cortex levels (no low barrier); an outline counts when its inside is
    homogeneous enough to be trabecular bone (robust SD <= :data:`MAX_SD_HU`).
    Each outline re-estimates ``T`` from its inside and is redone at the
    thresholds ``T`` implies until they are stable. Returns ``(mask, T,
    (low, high), closing_mm)``.
    """
    cands = [(t0 - DROP_MIN_HU, t0 + DELTA_MIN_HU)] + [(-2000.0, s) for s in SWEEP_HU]
    for thr in cands:
        got = outline_slice(smooth, thr, spacing, seed)
        if got is None:
            continue
        mask, r = got
        t, sd, thr_new = _threshold(smooth, mask, spacing)
        if sd > MAX_SD_HU:
            continue
        for _ in range(4):
            if abs(thr_new[1] - thr[1]) < 10.0 and abs(thr_new[0] - thr[0]) < 10.0:
                break
            again = outline_slice(smooth, thr_new, spacing, seed)
            if again is None:
                break
            t2, sd2, thr2 = _threshold(smooth, again[0], spacing)
            if sd2 > MAX_SD_HU:
                break
            (mask, r), thr, (t, sd, thr_new) = again, thr_new, (t2, sd2, thr2)
        return mask, t, thr_new, r
    return None


# ------------------------------------------------------------------------ the ROI
def roi_slices(seg: BodySegmentation, slice_spacing: float) -> list[int]:
    """Slices through the middle third of the body: ``round(h / (3 dz))`` nearest its middle (>= 1)."""
    n_body = seg.last_slice - seg.first_slice + 1
    n_use = max(1, int(np.floor(n_body / 3.0 + 0.5)))
    mid = 0.5 * (seg.first_slice + seg.last_slice)
    ks = sorted(range(seg.first_slice, seg.last_slice + 1), key=lambda k: (abs(k - mid), k))
    return sorted(ks[:n_use])


def _mask_for(seg: BodySegmentation, k: int, spacing2: tuple[float, float]) -> np.ndarray | None:
    if k in seg.masks:
        return seg.masks[k]
    if seg.follow is None or seg.upsample is None or not seg.work_masks:
        return None
    near = min(seg.work_masks, key=lambda q: abs(q - k))
    region = seg.follow(k, seg.work_masks[near])
    if region is None:
        return None
    seg.work_masks[k] = region
    seg.masks[k] = seg.upsample(region)
    return seg.masks[k]


def candidate_roi(body: np.ndarray, spacing: tuple[float, float], anterior: tuple[float, float],
                  edge_margin_mm: float, posterior_fraction: float = 0.25) -> np.ndarray:
    """Body eroded by ``edge_margin_mm`` + half a pixel, minus its posterior ``posterior_fraction``.

    Parameters
    ----------
    body : numpy.ndarray
        Solid trabecular body on one slice.
    spacing : tuple of float
        (row, column) spacing, mm.
    anterior : tuple of float
        Unit vector (row, column) pointing to the patient's anterior.
    edge_margin_mm : float
        Distance kept from the outline (inner cortex edge).
    posterior_fraction : float
        Fraction of the body's antero-posterior depth excluded posteriorly.
    """
    dj, di = spacing
    inner = _erode(body, edge_margin_mm + 0.5 * max(dj, di), spacing)
    jj, ii = np.nonzero(body)
    if jj.size == 0:
        return inner
    rows, cols = body.shape
    gj, gi = np.mgrid[:rows, :cols]
    proj = gj * dj * anterior[0] + gi * di * anterior[1]
    pb = proj[body]
    lo, hi = float(pb.min()), float(pb.max())
    return inner & (proj >= lo + posterior_fraction * (hi - lo))


def focal_outliers(smooth: np.ndarray, candidate: np.ndarray, spacing: tuple[float, float, float],
                   *, z: float = OUTLIER_Z, min_dev_hu: float = OUTLIER_MIN_HU,
                   focus_min_mm3: float = FOCUS_MIN_MM3, margin_mm: float = FOCUS_MARGIN_MM
                   ) -> tuple[np.ndarray, list[dict], float, float]:
    """Outlier voxels and focal lesions among the ``candidate`` voxels (module docstring, step 6).

    Parameters
    ----------
    smooth : numpy.ndarray
        3-D stack (slices, rows, columns) of the 0.8 mm smoothed HU.
    candidate : numpy.ndarray
        Boolean stack of the candidate ROI voxels.
    spacing : tuple of float
        (slice, row, column) spacing, mm, of the stack.

    Returns
    -------
    excluded : numpy.ndarray
        Boolean stack: voxels to leave out (outliers, outlier groups and their margin).
    foci : list of dict
        ``kind``, ``volume_mm3``, ``delta_hu``, ``stack_index`` of each focus
        (an outlier group clear of the ROI's rim).
    median, sd : float
        Median and robust SD of the candidate voxels.
    """
    vals = smooth[candidate]
    med = float(np.median(vals))
    sd = robust_sd(vals)
    lim = max(z * sd, min_dev_hu)
    dev = smooth - med
    out = candidate & (np.abs(dev) > lim)
    foci: list[dict] = []
    excluded = out.copy()
    if out.any():
        vox = float(np.prod(spacing))
        lab, n = ndimage.label(out, structure=np.ones((3, 3, 3), bool))
        focus = np.zeros_like(out)
        # the candidate's rim (one pixel in-plane): a group touching it is the cortex's partial
        # volume or a leak into fat / canal at the ROI's edge -- excluded, but not called a focus
        rim = candidate & ~ndimage.binary_erosion(candidate, structure=np.array(
            [[[0, 0, 0], [0, 1, 0], [0, 0, 0]], [[0, 1, 0], [1, 1, 1], [0, 1, 0]],
             [[0, 0, 0], [0, 1, 0], [0, 0, 0]]], bool), border_value=1)
        for q in range(1, n + 1):
            comp = lab == q
            vol = float(comp.sum() * vox)
            if vol < focus_min_mm3 or comp.sum() < 2:
                continue
            focus |= comp
            if (comp & rim).any():
                continue
            d = float(np.median(dev[comp]))
            ks = np.nonzero(comp)[0]
            foci.append({"kind": "dense" if d > 0 else "low", "volume_mm3": round(vol, 1),
                         "delta_hu": round(d, 1), "stack_index": int(np.median(ks))})
        if focus.any():
            dist = ndimage.distance_transform_edt(~focus, sampling=spacing)
            excluded |= dist <= margin_mm + 1e-6
    return excluded & candidate, foci, med, sd


def place_trabecular_roi(hu: np.ndarray, spacing: tuple[float, float, float], seg: BodySegmentation,
                         anterior: tuple[float, float], *, edge_margin_mm: float = 1.5,
                         posterior_fraction: float = 0.25) -> TrabecularRoi:
    """The multi-slice trabecular ROI through mid-body, foci excluded (module docstring, steps 5-6).

    Parameters
    ----------
    hu : numpy.ndarray
        Volume ``[k, j, i]`` in HU (the one ``seg`` was made from).
    spacing : tuple of float
        ``(slice, row, column)`` spacing, mm.
    seg : BodySegmentation
    anterior : tuple of float
        Unit (row, column) vector towards the patient's anterior.
    edge_margin_mm : float
        Distance kept from the inner cortex edge.
    posterior_fraction : float
        Posterior fraction of the body's depth left out (basivertebral vein).

    Raises
    ------
    BodyNotFound
        When no slice keeps any ROI.
    """
    dk, dj, di = (abs(float(s)) for s in spacing)
    rs, cs = seg.crop
    core = set(roi_slices(seg, dk))
    mid = 0.5 * (seg.first_slice + seg.last_slice)
    half = SLAB_MAX_FRACTION * seg.height_mm(dk)
    order = sorted(range(seg.first_slice, seg.last_slice + 1), key=lambda k: (abs(k - mid), k))
    picked: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    volume = 0.0
    for k in order:
        # the middle third; beyond it (up to the middle 60 %) only while the ROI is small
        if k not in core and (volume >= ROI_TARGET_MM3 or abs(k - mid) * dk > half + 1e-6):
            continue
        body = _mask_for(seg, k, (dj, di))
        if body is None:
            continue
        cand = candidate_roi(body, (dj, di), anterior, edge_margin_mm, posterior_fraction)
        if not cand.any():
            continue
        picked[k] = (body, cand)
        volume += float(cand.sum() * dj * di * dk)
    bodies, cands, raws, smooths, used = [], [], [], [], []
    sig = _sigma_px(OUTLIER_SIGMA_MM, (dj, di))
    for k in sorted(picked):
        raw = hu[k, rs, cs].astype(np.float32)
        used.append(k)
        bodies.append(picked[k][0])
        cands.append(picked[k][1])
        raws.append(raw)
        smooths.append(ndimage.gaussian_filter(raw, sigma=sig))
    if not used:
        raise BodyNotFound("no trabecular bone left once the cortex margin and the posterior "
                           "quarter are left out (the body is too small or too thin)")
    cand3 = np.stack(cands)
    # along the slices: light smoothing only when the slices are thin enough to share a focus
    sm3 = np.stack(smooths)
    if dk < 2.0 and len(used) > 2:
        sm3 = ndimage.gaussian_filter1d(sm3, sigma=OUTLIER_SIGMA_MM / dk, axis=0)
    stack_dk = dk if all(b - a == 1 for a, b in zip(used, used[1:])) else dk * 2
    excluded, foci, med_all, sd_all = focal_outliers(sm3, cand3, (stack_dk, dj, di))
    for f in foci:
        f["slice_index"] = used[f.pop("stack_index")]
    slices, pooled = [], []
    n_cand = int(cand3.sum())
    for q, k in enumerate(used):
        roi = cands[q] & ~excluded[q]
        nc = int(cands[q].sum())
        slices.append(RoiSlice(k, cands[q], roi, float(roi.sum() * dj * di),
                               1.0 - roi.sum() / nc if nc else 0.0))
        pooled.append(raws[q][roi])
    values = np.concatenate(pooled).astype(np.float64)
    if values.size == 0:
        raise BodyNotFound("the trabecular ROI is entirely focal lesion")
    mid = 0.5 * (seg.first_slice + seg.last_slice)
    rep = min(range(len(slices)), key=lambda q: (slices[q].area_mm2 <= 0, abs(slices[q].slice_index - mid)))
    return TrabecularRoi(slices=slices, values=values, mean_hu=float(values.mean()),
                         sd_hu=float(values.std(ddof=1)) if values.size > 1 else 0.0,
                         median_hu=float(np.median(values)),
                         excluded_fraction=1.0 - values.size / n_cand if n_cand else 0.0,
                         foci=foci, representative=rep, robust_sd_hu=sd_all, median_all_hu=med_all)


def outline_polygon(mask: np.ndarray, n: int = 72) -> np.ndarray:
    """Closed star-shaped outline ``(n + 1, 2)`` of ``mask`` as (column, row) SCOORD (pixel centre = index + 0.5).

    For each of ``n`` directions from the mask's centroid, the farthest mask
    pixel edge within +-half a sector; directions without pixels take the
    nearest neighbour's radius.
    """
    jj, ii = np.nonzero(mask)
    if jj.size == 0:
        raise ValueError("empty mask")
    cj, ci = float(jj.mean()), float(ii.mean())
    dy, dx = jj - cj, ii - ci
    ang = np.mod(np.arctan2(dy, dx), 2 * np.pi)
    sector = np.floor(ang / (2 * np.pi / n)).astype(int) % n
    rad = np.hypot(dy, dx) + 0.5
    radii = np.full(n, np.nan)
    for s in range(n):
        sel = sector == s
        if sel.any():
            radii[s] = float(rad[sel].max())
    if np.isnan(radii).all():
        radii[:] = 0.5
    good = np.flatnonzero(~np.isnan(radii))
    for s in np.flatnonzero(np.isnan(radii)):
        d = np.abs((good - s + n // 2) % n - n // 2)
        radii[s] = radii[good[np.argmin(d)]]
    t = (np.arange(n) + 0.5) * (2 * np.pi / n)
    cols = ci + 0.5 + radii * np.cos(t)
    rows = cj + 0.5 + radii * np.sin(t)
    pts = np.stack([cols, rows], axis=1)
    return np.vstack([pts, pts[:1]])
