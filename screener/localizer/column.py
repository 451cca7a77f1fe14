"""Finding the vertebral column in an axial CT: spinal canal and vertebral body per slice.

The canal is the most reliable landmark of the spine in axial CT: a hole of
soft-tissue attenuation ringed by bone (vertebral body in front, pedicles at
the sides, laminae and spinous process behind). A single slice may show an
open ring (intervertebral foramina, disc level), but the union of the bone
masks over a ~30 mm slab always closes it, because every slab contains at
least one complete neural arch. Holes of that union are scored by what a
canal has around it (a deep and wide bony mass in front, bone behind, a
position near the body midline) and the best candidate per slab is tracked
along ``z`` with outlier rejection. The vertebral body is the bony mass in
front of the canal; its depth and half-width are measured on the slab union,
with guards against a contrast-filled aorta touching the body.

All arrays here are working-grid arrays (:mod:`screener.localizer.grid`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from screener.preprocess.morphology import dilate_2d, erode_2d, fill_holes, fill_holes_per_slice, open_2d

#: HU above which a voxel of the working grid counts as bone
BONE_HU = 180.0
#: bone thresholds tried in turn when the column is not tracked (low-density skeletons)
BONE_HU_LADDER: tuple[float, ...] = (BONE_HU, 150.0, 125.0, 105.0)
#: 90th percentile HU of the cortical band of a vertebral body (working grid) below which the
#: thresholds start to fall (adults of the cohort read 480-640 HU; the shared real CT 510)
REFERENCE_RING_HU = 460.0
#: the highest rung of the ladder whose column is at least this share of the longest is kept
LADDER_SHARE = 0.8
#: the lowest bone scale used (thresholds never fall to soft tissue)
MIN_BONE_SCALE = 0.4
#: slab length (mm) used to close the neural arch around the canal
SLAB_MM = 30.0
#: step (mm) between slab centres
STEP_MM = 8.0
#: how far (mm) the column is carried beyond the last slab with a canal
EXTEND_MM = 60.0


@dataclass
class Column:
    """Per-slice geometry of the spine on the working grid (pixel units).

    Arrays have one entry per working slice; ``valid`` says where the column
    was found (elsewhere the values are NaN).
    """

    valid: np.ndarray
    canal_y: np.ndarray
    canal_x: np.ndarray
    canal_r: np.ndarray
    body_y: np.ndarray
    body_x: np.ndarray
    body_hw: np.ndarray
    body_hd: np.ndarray
    slabs: list[dict]
    bone_hu: float = BONE_HU


def ellipse_radius(shape: tuple[int, int], by: float, bx: float, hd: float, hw: float) -> np.ndarray:
    """Normalised elliptical radius of every pixel about the body centre (the row and column
    terms are computed once per row / column and broadcast: the same float64 operations on the
    same operands as on full ``mgrid`` planes, so the same values, 3.5 times faster)."""
    yy = np.arange(shape[0])[:, None]
    xx = np.arange(shape[1])[None, :]
    return np.sqrt(((yy - by) / hd) ** 2 + ((xx - bx) / hw) ** 2)


def body_masks(hu: np.ndarray) -> np.ndarray:
    """Per-slice patient body mask (largest soft-tissue component, holes filled).

    The patient table and a separate arm are excluded because they are not
    part of the largest component; a light opening cuts thin contacts.

    Every step is done on the whole stack at once with in-plane structures (nothing connects
    two slices), which gives exactly the masks of the same steps slice by slice.
    """
    st = np.zeros((3, 3, 3), bool)
    st[1] = ndi.generate_binary_structure(2, 1)
    m = open_2d(hu > -400.0, st[1], iterations=2)
    lab, n = ndi.label(m, structure=st, output=np.intp)  # intp: counted and indexed without a copy
    out = np.zeros(hu.shape, bool)
    if n == 0:
        return out
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    # labels are numbered in raster order, so slice z holds the run of labels after those of the
    # slices above it; the largest of the run (the first of equals, as argmax of the slice's own
    # labelling) is its body
    last = lab.reshape(lab.shape[0], -1).max(axis=1)
    keep = np.zeros(n + 1, bool)
    lo = 1
    for hi in last:
        if hi >= lo:
            keep[lo + int(np.argmax(sizes[lo:hi + 1]))] = True
            lo = int(hi) + 1
    return fill_holes_per_slice(keep[lab])


def _run(line: np.ndarray, start: int, step: int) -> int:
    """Length of the run of True values in ``line`` from ``start`` moving by ``step``."""
    n = 0
    i = start
    while 0 <= i < line.size and line[i]:
        n += 1
        i += step
    return n


def _slab_candidates(U: np.ndarray, body: np.ndarray, dy: float, dx: float) -> list[dict]:
    """Score the holes of one slab's bone union as spinal-canal candidates."""
    Uf = fill_holes(U)
    holes = Uf & ~U
    lab, n = ndi.label(holes)
    if n == 0:
        return []
    px = dy * dx
    ys, xs = np.nonzero(body)
    if ys.size == 0:
        return []
    body_cx = float(xs.mean())
    body_hw = max(1.0, (np.percentile(xs, 98) - np.percentile(xs, 2)) / 2.0)
    out = []
    for idx, sl in enumerate(ndi.find_objects(lab), start=1):
        if sl is None:
            continue
        reg = lab[sl] == idx
        area = reg.sum() * px
        h = (sl[0].stop - sl[0].start) * dy
        w = (sl[1].stop - sl[1].start) * dx
        if not (30.0 <= area <= 900.0 and 5.0 <= h <= 40.0 and 5.0 <= w <= 40.0):
            continue
        ry, rx = np.nonzero(reg)
        cy = float(ry.mean() + sl[0].start)
        cx = float(rx.mean() + sl[1].start)
        y0, y1 = sl[0].start, sl[0].stop - 1
        icx = int(round(cx))
        # bony mass in front (the vertebral body, filled)
        a0 = max(0, y0 - int(round(40.0 / dy)))
        c0, c1 = max(0, icx - int(round(10.0 / dx))), icx + int(round(10.0 / dx)) + 1
        ant = Uf[a0:y0, c0:c1]
        frac_ant = float(ant.mean()) if ant.size else 0.0
        # bone behind (laminae, spinous process)
        p1 = min(U.shape[0], y1 + 1 + int(round(20.0 / dy)))
        d0, d1 = max(0, icx - int(round(4.0 / dx))), icx + int(round(4.0 / dx)) + 1
        post = U[y1 + 1:p1, d0:d1]
        frac_post = float(post.mean()) if post.size else 0.0
        depth = _run(Uf[:, icx], y0 - 1, -1) * dy
        if frac_ant < 0.4 or depth < 12.0:
            continue
        row = int(round(y0 - 1 - min(depth, 30.0) / (2.0 * dy)))
        left = _run(Uf[row], icx, 1) * dx
        right = _run(Uf[row], icx, -1) * dx
        width = left + right
        if width < 16.0:
            continue
        score = (frac_ant + 0.6 * min(1.0, 2.0 * frac_post) + 0.5 * min(depth, 35.0) / 35.0
                 + 0.5 * min(width, 45.0) / 45.0 - 0.8 * abs(cx - body_cx) / body_hw)
        out.append(dict(cy=cy, cx=cx, y0=float(y0), r=float(np.sqrt(area / np.pi)), depth=depth,
                        score=score, Uf=Uf))
    return out


def _body_geometry(Uf: np.ndarray, cand: dict, dy: float, dx: float) -> tuple[float, float, float, float]:
    """Body centre (y, x) and half-width / half-depth (mm) in front of a canal candidate."""
    icx = int(round(cand["cx"]))
    y0 = int(cand["y0"])
    depth = cand["depth"]
    if depth > 42.0:
        # something bright (contrast aorta, calcification) touches the body in front:
        # cut at the narrowest row between 20 mm and the end of the run
        n = int(round(depth / dy))
        widths = []
        for s in range(n):
            r = y0 - 1 - s
            widths.append((_run(Uf[r], icx, 1) + _run(Uf[r], icx, -1)) * dx)
        lo = int(round(20.0 / dy))
        hi = min(n, int(round(50.0 / dy)))
        if hi > lo:
            cut = lo + int(np.argmin(widths[lo:hi]))
            depth = cut * dy
        depth = min(depth, 45.0)
    depth = float(np.clip(depth, 16.0, 45.0))
    by = y0 - 0.5 - depth / (2.0 * dy)
    row = int(round(by))
    left = _run(Uf[row], icx, 1) * dx
    right = _run(Uf[row], icx, -1) * dx
    hw = float(np.clip(min(left, right), 10.0, 32.0))
    # centre x: canal x, nudged by the asymmetry of the two runs (rotation) within 5 mm
    bx = cand["cx"] + float(np.clip((min(left, 2 * hw) - min(right, 2 * hw)) / 2.0, -5.0, 5.0)) / dx
    return by, bx, hw, depth / 2.0


def _extend(hu: np.ndarray, valid: np.ndarray, arrays: dict[str, np.ndarray], dz: float, dy: float,
            dx: float, bone_hu: float = BONE_HU) -> None:
    """Carry the column past its tracked ends while bone stays in the body footprint.

    The canal is not always a closed hole (e.g. the lower sacrum, or a canal
    opened by laminectomy); up to ``EXTEND_MM`` beyond the tracked range the
    last geometry is kept as long as the body footprint holds bone.
    """
    idx = np.nonzero(valid)[0]
    lo, hi = int(idx[0]), int(idx[-1])
    n_max = int(round(EXTEND_MM / dz))
    for start, step in ((lo, -1), (hi, 1)):
        ref = start
        z = start + step
        misses = 0
        while 0 <= z < hu.shape[0] and abs(z - ref) <= n_max:
            by, bx = arrays["by"][ref], arrays["bx"][ref]
            hd, hw = arrays["hd"][ref] / dy, arrays["hw"][ref] / dx
            y0, y1 = int(max(0, by - hd)), int(by + hd) + 1
            x0, x1 = int(max(0, bx - hw)), int(bx + hw) + 1
            if (hu[z, y0:y1, x0:x1] > bone_hu).mean() < 0.25:
                misses += 1
                if misses * dz >= 10.0:
                    break
            else:
                misses = 0
            for k in arrays:
                arrays[k][z] = arrays[k][ref]
            valid[z] = True
            z += step
        # drop trailing slices without bone
        z -= step
        while misses > 0 and z != start:
            valid[z] = False
            for k in arrays:
                arrays[k][z] = np.nan
            z -= step
            misses -= 1


_CLOSE = np.ones((3, 3), bool)

#: the canal moves at most this far (mm) in plane between neighbouring slabs, plus :data:`MAX_CANAL_SLOPE`
#: times their distance in z: a scoliotic or lordotic spine bends, it does not jump
MAX_CANAL_SHIFT_MM = 15.0
MAX_CANAL_SLOPE = 0.6


def _jump(a: dict, b: dict, dz: float, dy: float, dx: float) -> bool:
    """Whether the canal of slab ``b`` lies further from slab ``a``'s than a spine can bend."""
    shift = float(np.hypot((a["cy"] - b["cy"]) * dy, (a["cx"] - b["cx"]) * dx))
    return shift > MAX_CANAL_SHIFT_MM + MAX_CANAL_SLOPE * abs(b["z"] - a["z"]) * dz


def find_column(hu: np.ndarray, body: np.ndarray, spacing: tuple[float, float, float],
                bone_hu: float = BONE_HU) -> Column:
    """Track the spinal canal and vertebral body through the working grid.

    Parameters
    ----------
    hu : numpy.ndarray
        Working-grid HU array ``[z, y, x]``.
    body : numpy.ndarray
        Body mask from :func:`body_masks`.
    spacing : tuple of float
        ``(dz, dy, dx)`` mm.
    bone_hu : float
        HU above which a voxel counts as bone (:func:`find_column_adaptive`
        lowers it for low-density skeletons).

    Returns
    -------
    Column
    """
    dz, dy, dx = spacing
    nz = hu.shape[0]
    bone = (hu > bone_hu) & body
    half = max(1, int(round(SLAB_MM / dz / 2.0)))
    step = max(1, int(round(STEP_MM / dz)))
    centres = list(range(min(half, nz // 2), max(nz - half, nz // 2 + 1), step))
    if centres and centres[-1] != max(nz - half - 1, nz // 2) and nz - half - 1 > centres[-1]:
        centres.append(nz - half - 1)
    slabs: list[dict] = []
    for c in centres:
        a, b = max(0, c - half), min(nz, c + half + 1)
        U = bone[a:b].any(axis=0)
        cands = _slab_candidates(U, body[c], dy, dx)
        if not cands:
            # thin laminae of a small or osteoporotic patient leave the arch open by a pixel or two
            # at the working grid's resolution: close gaps up to ~2 pixels and look again
            cands = _slab_candidates(erode_2d(dilate_2d(U, _CLOSE), _CLOSE), body[c], dy, dx)  # closing
        if not cands:
            continue
        best = max(cands, key=lambda d: d["score"])
        by, bx, hw, hd = _body_geometry(best["Uf"], best, dy, dx)
        slabs.append(dict(z=float(c), a=a, b=b - 1, cy=best["cy"], cx=best["cx"], r=best["r"] / dy,
                          by=by, bx=bx, hw=hw, hd=hd, score=best["score"]))
    # outlier rejection against the median of neighbouring slabs
    keep = []
    for i, s in enumerate(slabs):
        nb = [t for j, t in enumerate(slabs) if j != i and abs(j - i) <= 3]
        if len(nb) >= 2:
            my = np.median([t["cy"] for t in nb])
            mx = np.median([t["cx"] for t in nb])
            if abs(s["cy"] - my) * dy > 20.0 or abs(s["cx"] - mx) * dx > 20.0:
                continue
        keep.append(s)
    valid = np.zeros(nz, bool)
    arrays = {k: np.full(nz, np.nan) for k in ("cy", "cx", "r", "by", "bx", "hw", "hd")}
    if keep:
        zs = np.array([s["z"] for s in keep])
        # a gap of more than 45 mm between kept slabs, or a jump of the canal no spine makes (a run
        # of false canals in bowel or vessels at one end), breaks the column: keep the longest piece
        pieces, start = [], 0
        for i in range(1, len(keep) + 1):
            if i == len(keep) or (zs[i] - zs[i - 1]) * dz > 45.0 or _jump(keep[i - 1], keep[i], dz, dy, dx):
                pieces.append((start, i))
                start = i
        p0, p1 = max(pieces, key=lambda p: p[1] - p[0])
        keep = keep[p0:p1]
        zs = zs[p0:p1]
        lo = keep[0]["a"]
        hi = keep[-1]["b"]
        zz = np.arange(lo, hi + 1)
        for k in arrays:
            arrays[k][lo:hi + 1] = np.interp(zz, zs, [s[k] for s in keep])
        valid[lo:hi + 1] = True
        _extend(hu, valid, arrays, dz, dy, dx, bone_hu)
    return Column(valid=valid, canal_y=arrays["cy"], canal_x=arrays["cx"], canal_r=arrays["r"],
                  body_y=arrays["by"], body_x=arrays["bx"], body_hw=arrays["hw"] / dx,
                  body_hd=arrays["hd"] / dy, slabs=keep, bone_hu=float(bone_hu))


def find_column_adaptive(hu: np.ndarray, body: np.ndarray, spacing: tuple[float, float, float]
                         ) -> Column:
    """:func:`find_column` with the bone threshold lowered until the column is tracked.

    A severely osteoporotic skeleton can read below :data:`BONE_HU` even in
    its cortex and posterior elements: the bone union then never closes the
    canal. The thresholds of :data:`BONE_HU_LADDER` are tried from the
    highest; the highest whose column is at least :data:`LADDER_SHARE` as
    long as the longest any rung tracks is kept (a dense skeleton's column is
    as long at the highest threshold; a faint one's lumbar canal closes only
    lower down). The search stops once the whole coverage is tracked. The
    kept threshold is :attr:`Column.bone_hu`.
    """
    nz = hu.shape[0]
    cols: list[Column] = []
    for thr in BONE_HU_LADDER:
        cols.append(find_column(hu, body, spacing, bone_hu=thr))
        kept = _ladder_pick(cols)
        # no column is longer than the coverage: a pick that holds against that bound is final
        if kept.valid.sum() >= LADDER_SHARE * nz or cols[-1].valid.sum() >= 0.95 * nz:
            return kept
    return _ladder_pick(cols)


def _ladder_pick(cols: list[Column]) -> Column:
    """The highest rung whose column is at least :data:`LADDER_SHARE` as long as the longest."""
    longest = max(int(c.valid.sum()) for c in cols)
    return next(c for c in cols if c.valid.sum() >= LADDER_SHARE * longest)


def bone_scale(hu: np.ndarray, col: Column) -> float:
    """How dense this skeleton is relative to an average adult one (0.35-1.0).

    The 90th percentile of HU in the outer band of the vertebral-body ellipse
    (where the cortical ring lies), median over the column, divided by
    :data:`REFERENCE_RING_HU` (the value below which the defaults start to
    fall; 1.0 above it). Every bone threshold of the localizer that follows is
    multiplied by it, so a thin, faint skeleton is searched with thresholds in
    proportion to its own bone; it is never raised above the defaults.
    """

    vals = []
    for z in np.nonzero(col.valid)[0]:
        by, bx, hd, hw = col.body_y[z], col.body_x[z], col.body_hd[z], col.body_hw[z]
        y0, y1 = int(max(0, by - hd - 1)), int(min(hu.shape[1], by + hd + 2))
        x0, x1 = int(max(0, bx - hw - 1)), int(min(hu.shape[2], bx + hw + 2))
        win = hu[z, y0:y1, x0:x1]
        rho = ellipse_radius(win.shape, by - y0, bx - x0, hd, hw)
        band = (rho >= 0.6) & (rho <= 1.05)
        if band.sum() >= 4:
            vals.append(float(np.percentile(win[band], 90)))
    if not vals:
        return 1.0
    return float(np.clip(np.median(vals) / REFERENCE_RING_HU, MIN_BONE_SCALE, 1.0))
