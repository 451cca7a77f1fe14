"""Splitting the vertebral column into vertebral bodies along ``z``.

A vertebral body seen in an axial slice has a bony cortical ring (and, near
its ends, a bony endplate that covers the whole footprint); an intervertebral
disc has neither: its annulus and nucleus read ~70-120 HU. The per-slice
"boneness" of the body footprint, weighted towards the outer band where the
cortical ring lies, therefore dips at every disc even when the trabecular
bone of an osteoporotic body reads no higher than the disc. Disc positions
are the prominent minima of that profile, chosen with a minimum spacing and
a gap-filling pass that uses the median vertebral period (priors: body
24-30 mm, disc 5-13 mm; fractured bodies down to ~12 mm).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from screener.localizer.column import Column, ellipse_radius

MIN_DISC_SPACING_MM = 18.0
#: with a median core below this (HU) a trabecular core may read darker than a disc
#: (see :func:`disc_score`)
DARK_CORE_HU = 90.0
#: disc tissue (annulus / nucleus) reads about this, whatever the skeleton's density (HU) ...
DISC_HU = 80.0
#: ... within this much
DISC_HU_TOL = 30.0
#: a bony endplate's core reads at least this much above the trabecular bodies (HU)
ENDPLATE_LIFT_HU = 120.0
#: percentile of the core profile taken as the trabecular bodies' level at thick slices (dips at the
#: discs lie below it, endplates well above)
BODY_PERCENTILE = 30.0
#: at thick slices, an endplate slice reads this much above the bodies' level (HU) ...
THICK_ENDPLATE_LIFT_HU = 100.0
#: ... and a disc slice of a dense spine this much below it
THICK_DIP_HU = 60.0
#: a run of endplate / disc slices longer than this (mm) is not one disc
MAX_DISC_RUN_MM = 20.0
#: slices at least this thick (mm) are split by :func:`_discs_between_endplates`
#: (or, failing that, :func:`_discs_by_spacing`)
THICK_SLICE_MM = 5.5
#: shortest and longest vertebral period, body + disc (mm): a grade-3 fracture to a large L5
PERIOD_MM = (16.0, 44.0)
#: a disc in a chain earns its score minus this
DISC_SCORE_OFFSET = 0.25
#: cost per unit |log| of the ratio of successive periods
PERIOD_CHANGE_PENALTY = 1.0
#: a gap between two discs longer than this many median periods holds a disc not seen (a thin
#: disc between two bright endplates at 5 mm slices; a tall L5 with oblique discs spans ~1.25)
SPLIT_PERIODS = 1.45
#: smallest disc score (core dip of 30 HU, or a band drop of 0.075 bone fraction) for a disc
MIN_DISC_SCORE = 0.3


@dataclass
class Segment:
    """One vertebra (or a partial one at the edge of the coverage), working-grid slices.

    ``lo``/``hi`` are the first and last body slice (inclusive, ascending z =
    inferior to superior); ``complete`` is False when a bounding disc lies
    outside the coverage.
    """

    lo: int
    hi: int
    complete: bool
    disc_below: int | None
    disc_above: int | None
    ribs: dict[str, float] = field(default_factory=dict)
    sacral: float = 0.0
    label: str | None = None

    @property
    def n_slices(self) -> int:
        """Body height in working slices (``hi - lo + 1``)."""
        return self.hi - self.lo + 1


def core_profile(hu: np.ndarray, col: Column, scale: float = 1.0) -> np.ndarray:
    """Per-slice profiles of the body footprint, shape ``(2, n_slices)`` (NaN outside the column).

    Row 0: median HU of the central half of the footprint: trabecular bone in
    a body, bony endplate next to a disc, disc tissue at a disc; it ignores the
    osteophyte rim around degenerated discs. Row 1: soft bone fraction
    (0 at 120 HU, 1 at 370 HU) of the outer band where the cortical ring lies:
    low at a disc even when an osteoporotic body reads no higher than the disc.
    ``scale`` (:func:`~screener.localizer.column.bone_scale`) multiplies both
    band limits for a low-density skeleton.
    """
    nz = hu.shape[0]
    prof = np.full((2, nz), np.nan)
    for z in np.nonzero(col.valid)[0]:
        by, bx, hd, hw = col.body_y[z], col.body_x[z], col.body_hd[z], col.body_hw[z]
        y0, y1 = int(max(0, by - hd)), int(min(hu.shape[1], by + hd + 1))
        x0, x1 = int(max(0, bx - hw)), int(min(hu.shape[2], bx + hw + 1))
        win = hu[z, y0:y1, x0:x1]
        rho = ellipse_radius(win.shape, by - y0, bx - x0, hd, hw)
        core = rho < 0.5
        band = (rho >= 0.6) & (rho <= 1.05)
        if core.sum() < 4 or band.sum() < 4:
            continue
        prof[0, z] = float(np.median(win[core]))
        prof[1, z] = float(np.clip((win[band] - 120.0 * scale) / (250.0 * scale), 0.0, 1.0).mean())
    return prof


def sandwich(p: np.ndarray, dz: float, edge_max: float = np.inf) -> np.ndarray:
    """Depth of each slice below the brighter endplates on both sides (HU).

    ``S(z) = min(max p[z-W:z], max p[z+1:z+W+1]) - p(z)`` with ``W`` at most
    8 mm (at least one slice): large at a disc (bony endplates within a few mm
    on both sides), small in the middle of a body (its endplates are >= 10 mm
    away). At the
    ends of the coverage only one side is available; it counts at 80 %.
    """
    n = p.size
    w = max(1, int(np.floor(8.0 / dz + 1e-6)))
    out = np.full(n, -np.inf)
    for z in range(n):
        # a disc seen in one slice, or (slices >= 3.5 mm) shared by two
        for k in ((1, 2) if dz >= 3.5 else (1,)):
            if z + k > n:
                continue
            mid = p[z:z + k].max()
            left = p[max(0, z - w):z]
            right = p[z + k:z + k + w]
            if left.size and right.size:
                val = min(left.max(), right.max()) - mid
            elif (left.size or right.size) and mid <= edge_max:
                side = left if left.size else right
                val = 0.6 * (side.max() - mid)
            else:
                continue
            out[z] = max(out[z], val)
            if k == 2:
                out[z + 1] = max(out[z + 1], val)
    return out


def disc_score(prof: np.ndarray, dz: float, scale: float = 1.0) -> np.ndarray:
    """Disc likelihood per slice from both profiles of :func:`core_profile`.

    The larger of the core sandwich depth (per 100 HU) and the band sandwich
    depth (per 0.25 bone fraction); the band term is dropped where a slice
    within 10 mm has a core at least 40 HU darker (the disc is there, this is
    a short body). NaN-free over the column's extent. HU depths are per
    ``100 x scale`` HU (``scale``: :func:`~screener.localizer.column.bone_scale`).
    """
    out = []
    for row, unit in ((0, 100.0 * scale), (1, 0.25)):
        p = prof[row].copy()
        med = float(np.nanmedian(p))
        p[~np.isfinite(p)] = med
        if 0.8 / dz >= 0.5:
            p = ndi.gaussian_filter1d(p, 0.8 / dz, mode="nearest")
        edge_max = med - 30.0 * scale if row == 0 else 0.5 * med
        out.append(sandwich(p, dz, edge_max) / unit)
        if row == 0:
            core = p
    # a band dip with a clearly darker core slice within 10 mm is the middle of a short
    # body between two discs, not a disc -- unless the ring has (almost) no bone left there:
    # in an osteoporotic spine the trabecular core reads darker than the disc itself, and
    # only the missing cortical ring marks the disc
    w2 = max(1, int(round(10.0 / dz)))
    n = core.size
    ring = prof[1].copy()
    ring[~np.isfinite(ring)] = np.nanmedian(ring)
    no_ring = ring < 0.35 * float(np.nanmedian(ring))
    darker = np.array([core[max(0, z - w2):z + w2 + 1].min() < core[z] - 40.0 * scale for z in range(n)])
    band = np.where(darker & ~no_ring, 0.0, out[1])
    core_term = out[0]
    if float(np.nanmedian(prof[0])) < DARK_CORE_HU:
        # low-density bodies read darker than disc tissue: between two bright endplates a
        # body's core dips like a disc does (at thick slices both are one or two slices), so
        # the core dip counts only where the cortical ring is weak too; the disc itself reads
        # as disc tissue (a soft-tissue value that does not fall with the skeleton's density),
        # above the dark bodies around it
        core_term = np.where(ring >= 0.6 * float(np.nanmedian(ring)), 0.0, core_term)
        # a ring dip with no bony endplate within 8 mm is the thin-walled middle of a tall body
        # (a severely osteoporotic L5 reads like a disc along its waist), not a disc
        band = np.where(_near_endplate(core, dz), band, 0.0)
        return np.maximum(np.maximum(core_term, band), _disc_tissue_score(prof[0], dz))
    return np.maximum(core_term, band)


def _near_endplate(core: np.ndarray, dz: float) -> np.ndarray:
    """Whether a bony endplate (a core :data:`ENDPLATE_LIFT_HU` above the darkest core within
    10 mm) lies within 8 mm of each slice."""
    n = core.size
    w = max(1, int(round(10.0 / dz)))
    we = max(1, int(np.floor(8.0 / dz)))
    return np.array([core[max(0, z - we):z + we + 1].max()
                     >= core[max(0, z - w):z + w + 1].min() + ENDPLATE_LIFT_HU for z in range(n)])


def _disc_tissue_score(core: np.ndarray, dz: float) -> np.ndarray:
    """Disc likelihood of each slice of a low-density spine from the core HU alone.

    A slice scores when its core reads as disc tissue (:data:`DISC_HU`, within
    :data:`DISC_HU_TOL`), at least 15 HU above the darkest core within 10 mm
    on both sides (the trabecular bodies) and next to a bony endplate (a core
    :data:`ENDPLATE_LIFT_HU` above those bodies within 8 mm); up to 2 for a
    perfect match.
    """
    c = core.copy()
    c[~np.isfinite(c)] = np.nanmedian(c)
    n = c.size
    w = max(1, int(round(10.0 / dz)))
    # a disc lies against a bony endplate: a bright core within 8 mm on at least one side (with the
    # slice above both bodies, the darkest core within 10 mm is theirs)
    endplate = _near_endplate(c, dz)
    out = np.zeros(n)
    for z in range(n):
        left = c[max(0, z - w):z]
        right = c[z + 1:z + 1 + w]
        if not left.size or not right.size:
            continue
        lift = min(c[z] - left.min(), c[z] - right.min())
        if lift < 15.0 or not endplate[z]:
            continue
        out[z] = 2.0 * max(0.0, 1.0 - abs(c[z] - DISC_HU) / DISC_HU_TOL)
    return out


def find_discs(prof: np.ndarray, dz: float, scale: float = 1.0) -> list[int]:
    """Working slices of the intervertebral discs (ascending); ``scale`` as in :func:`disc_score`."""
    valid = np.isfinite(prof[0])
    if valid.sum() < 3:
        return []
    idx = np.nonzero(valid)[0]
    lo, hi = int(idx[0]), int(idx[-1])
    s = disc_score(prof[:, lo:hi + 1], dz, scale)
    if dz >= THICK_SLICE_MM:
        discs = _discs_between_endplates(prof[0, lo:hi + 1], dz, scale)
        if len(discs) >= 2:
            discs = _drop_close(discs, s)
            # a gap filled next to a disc already found splits off a one-slice sliver: drop again
            discs = _drop_close(_fill_gaps(discs, s, prof[0, lo:hi + 1], dz, scale), s)
            return [d + lo for d in discs]
        dp = _discs_by_spacing(s, dz)
        if dp is not None:
            return [d + lo for d in dp]
    min_gap = max(1, int(round(MIN_DISC_SPACING_MM / dz)))
    order = np.argsort(-s)
    chosen: list[int] = []
    for z in order:
        if s[z] <= 0.15:
            break
        if all(abs(int(z) - c) >= min_gap for c in chosen):
            chosen.append(int(z))
    if not chosen:
        return []
    discs = sorted(c for c in chosen if s[c] >= MIN_DISC_SCORE)
    discs = _fill_gaps(discs, s, prof[0, lo:hi + 1], dz, scale)
    return [d + lo for d in _drop_close(discs, s)]


def _drop_close(discs: list[int], s: np.ndarray) -> list[int]:
    """Two "discs" much closer than the typical period: the weaker one is a dip inside a body."""
    discs = list(discs)
    while len(discs) >= 3:
        gaps = np.diff(discs)
        period = float(np.median(gaps))
        i = int(np.argmin(gaps))
        if gaps[i] >= 0.55 * period:
            break
        a, b = discs[i], discs[i + 1]
        discs.remove(a if s[a] < s[b] else b)
    return discs


def _discs_between_endplates(core: np.ndarray, dz: float, scale: float = 1.0) -> list[int]:
    """Discs at thick slices: the centres of the runs of slices that are not trabecular body.

    With slices of :data:`THICK_SLICE_MM` or more a thin disc is averaged into
    the bony endplates on both sides of it, so the slice at a disc often does
    not dip; what marks every disc is a run of one to three slices that do not
    read as trabecular body: bright endplates (core at least
    :data:`THICK_ENDPLATE_LIFT_HU` x ``scale`` above the bodies' level, the
    :data:`BODY_PERCENTILE` th percentile of the core profile), a
    dip (:data:`THICK_DIP_HU` x ``scale`` below it) and, in a low-density
    spine whose bodies read darker than disc tissue, a slice of disc tissue
    between two bright ones. The trabecular slices of the bodies separate the
    runs; a vertebral body's own two endplates are a body's height apart, so
    they never fall in one run.
    """
    c = np.where(np.isfinite(core), core, np.nanmedian(core))
    # the trabecular level: at thick slices endplate (and disc) slices can be half of all slices,
    # so the median may fall between bodies and endplates; the bodies fill the lower-middle
    level = float(np.percentile(c, BODY_PERCENTILE))
    bright = c >= level + THICK_ENDPLATE_LIFT_HU * scale
    dip = c <= level - THICK_DIP_HU * scale
    tissue = np.abs(c - DISC_HU) <= DISC_HU_TOL
    n = c.size
    # a disc-tissue slice between two bright ones belongs to the disc's run
    fill = np.zeros(n, bool)
    fill[1:-1] = tissue[1:-1] & bright[:-2] & bright[2:]
    runs, _ = ndi.label(bright | dip | fill)
    discs = []
    for (sl,) in ndi.find_objects(runs):
        first, last = sl.start, sl.stop - 1
        if (last - first + 1) * dz <= MAX_DISC_RUN_MM and first > 0 and last < n - 1:  # not the ends
            discs.append(int(round((first + last) / 2.0)))
    return discs


def _discs_by_spacing(s: np.ndarray, dz: float) -> list[int] | None:
    """Discs of a thick-slice column as the best-scoring chain that a spine can have.

    With slices of :data:`THICK_SLICE_MM` or more a disc spans one or two
    slices and noise or a basivertebral dip can look like one. Candidates are
    the local maxima of the disc score; a chain of discs is scored by the sum
    of ``score - DISC_SCORE_OFFSET`` over its discs, minus
    :data:`PERIOD_CHANGE_PENALTY` per unit of ``|log|`` of the ratio of
    successive vertebral periods, subject to every period (and the partial
    vertebrae at both ends of the coverage) lying within
    :data:`PERIOD_MM`. The best chain (dynamic programming over pairs of
    consecutive discs) is returned; ``None`` when no chain fits (a column
    shorter than one vertebra, say).
    """
    n = s.size
    cand = [z for z in range(n) if np.isfinite(s[z]) and s[z] >= (s[z - 1] if z > 0 else -np.inf)
            and s[z] >= (s[z + 1] if z + 1 < n else -np.inf)]
    if not cand:
        return None
    pmin, pmax = PERIOD_MM
    reward = {c: float(s[c]) - DISC_SCORE_OFFSET for c in cand}
    # best[(i, j)]: best chain score whose last two discs are cand i < j (i = -1: j is the first)
    best: dict[tuple[int, int], float] = {}
    back: dict[tuple[int, int], tuple[int, int] | None] = {}
    for j, cj in enumerate(cand):
        if (cj + 0.5) * dz <= pmax:
            best[(-1, j)] = reward[cj]
            back[(-1, j)] = None
    for k, ck in enumerate(cand):
        for (i, j), val in list(best.items()):
            if j >= k:
                continue
            gap = (ck - cand[j]) * dz
            if not pmin <= gap <= pmax:
                continue
            pen = 0.0
            if i >= 0:
                pen = PERIOD_CHANGE_PENALTY * abs(np.log(gap / ((cand[j] - cand[i]) * dz)))
            v = val + reward[ck] - pen
            if v > best.get((j, k), -np.inf):
                best[(j, k)] = v
                back[(j, k)] = (i, j)
    ends = [(v, key) for key, v in best.items() if (n - 0.5 - cand[key[1]]) * dz <= pmax]
    if not ends:
        return None
    _, key = max(ends)
    chain = []
    cur: tuple[int, int] | None = key
    while cur is not None:
        chain.append(cand[cur[1]])
        cur = back[cur]
    return sorted(chain)


def _fill_gaps(discs: list[int], s: np.ndarray, core: np.ndarray, dz: float, scale: float = 1.0
               ) -> list[int]:
    """Split gaps between discs that are too long for one vertebra.

    With thick slices a thin disc can hide between two bright endplate
    slices. A gap longer than :data:`SPLIT_PERIODS` vertebral periods (median of the other gaps,
    or 36 mm) is split in its middle half where the disc score, a dip of the
    core HU or a very bright core (merged endplates, >= 250 HU) is best,
    preferring the centre of the gap. Between a disc and the end of the
    coverage (a partial vertebra is never longer than one period) a gap longer
    than 1.3 periods is split only where a disc score or merged endplates show.
    """
    if not discs:
        return discs
    core = np.where(np.isfinite(core), core, np.nanmedian(core))
    merged = 250.0 * scale  # merged bony endplates
    n = core.size
    changed = True
    while changed:
        changed = False
        gaps = np.diff(discs)
        normal = [g for g in gaps if g * dz <= 50.0]
        period = float(np.median(normal)) if normal else 36.0 / dz
        # the ends of the coverage count as edges too (a partial vertebra beyond them)
        edges = [-1] + list(discs) + [n]
        for a, b in zip(edges[:-1], edges[1:]):
            if a == -1 or b == n:
                # a partial vertebra at the end of the coverage is never longer than one period;
                # split only where a disc or merged endplates actually show
                if (b - a) <= 1.3 * period or (b - a) * dz < 40.0:
                    continue
                half = int(round(0.5 * period))
                seg = np.arange(a + 1, b - half + 1) if a == -1 else np.arange(a + half, b)
                seg = seg[(seg >= 0) & (seg < n)]
                if seg.size == 0:
                    continue
                ev = np.maximum(s[seg], 0.0) + 3.0 * (core[seg] >= merged)
                ev[(s[seg] < MIN_DISC_SCORE) & (core[seg] < merged)] = 0.0
                if ev.max() <= 0.0:
                    continue
                discs = sorted(discs + [int(seg[np.argmax(ev)])])
                changed = True
                break
            if (b - a) <= SPLIT_PERIODS * period or (b - a) * dz < 40.0:
                continue
            m0, m1 = max(0, a + int(round(0.25 * (b - a)))), min(n - 1, b - int(round(0.25 * (b - a))))
            if m1 < m0:
                continue
            seg = np.arange(m0, m1 + 1)
            mid = (a + b) / 2.0
            med = float(np.median(core[max(0, a):min(n, b)]))
            cand = (np.maximum(s[seg], 0.0) + np.maximum(0.0, (med - core[seg]) / (100.0 * scale))
                    + (core[seg] >= merged) - 0.5 * np.abs(seg - mid) / (0.25 * (b - a)))
            z = int(seg[np.argmax(cand)])
            discs = sorted(discs + [z])
            changed = True
            break
    return discs


def disc_extent(score: np.ndarray, z: int, dz: float) -> tuple[int, int]:
    """Slices around disc centre ``z`` that still read as disc (at most ~7 mm each side)."""
    w = int(np.floor(7.0 / dz))
    thr = 0.5 * score[z]
    a = z
    while a - 1 >= max(0, z - w) and score[a - 1] >= thr:
        a -= 1
    b = z
    while b + 1 <= min(score.size - 1, z + w) and score[b + 1] >= thr:
        b += 1
    return a, b


def split_segments(prof: np.ndarray, discs: list[int], valid: np.ndarray, dz: float, scale: float = 1.0
                   ) -> list[Segment]:
    """Vertebral bodies between consecutive discs, plus partial ones at the coverage ends."""
    idx = np.nonzero(valid)[0]
    if idx.size == 0:
        return []
    lo, hi = int(idx[0]), int(idx[-1])
    score = np.zeros(valid.size)
    score[lo:hi + 1] = disc_score(prof[:, lo:hi + 1], dz, scale)
    # at thick slices a disc is one slice (the centre of its run, :func:`_discs_between_endplates`):
    # the endplate slices around it belong to the bodies
    ext = {z: (z, z) if dz >= THICK_SLICE_MM else disc_extent(score, z, dz) for z in discs}
    segs = []
    edges: list[tuple[int | None, int]] = [(None, lo)] + [(z, z) for z in discs] + [(None, hi)]
    for (d0, z0), (d1, z1) in zip(edges[:-1], edges[1:]):
        a = ext[d0][1] + 1 if d0 is not None else z0
        b = ext[d1][0] - 1 if d1 is not None else z1
        if b < a:
            continue
        segs.append(Segment(lo=a, hi=b, complete=d0 is not None and d1 is not None,
                            disc_below=d0, disc_above=d1))
    return segs
