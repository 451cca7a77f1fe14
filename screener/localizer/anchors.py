"""Level anchors: rib articulation (T1-T12) and the sacrum (S1).

Ribs
    A rib articulates with its vertebra: its head lies against the
    posterolateral corner of the body (T11 and T12 have single costal facets
    on the body/pedicle and no costotransverse joint) and the rib then runs
    laterally far beyond any transverse process. For each vertebra and side,
    bone outside the vertebral core is labelled in 3-D inside a slab that
    spans the body and extends 30 mm below it (the lower ribs descend);
    a component counts as a rib of that vertebra when it has bone in the
    posterolateral contact zone *at the vertebra's own levels* and reaches
    at least ``RIB_REACH_MM`` from the canal. Rib shafts of higher ribs that
    merely pass lateral to a lumbar vertebra never touch its contact zone, so
    they are not counted. Known limits: a hypoplastic 12th rib shorter than
    the reach threshold reads as rib-free (then T12 is taken for L1, as a
    human reader counting ribs would also risk); a lumbar rib reads as a 13th
    rib pair. Contrast-enhanced kidneys, bowel and vessels can exceed the bone
    threshold; they are removed first as structures thicker than ~16 mm
    in-plane (they survive an opening with an 8 mm disk; ribs do not).

Sacrum
    In the slices of S1, the bone connected to the vertebral body (the
    sacral alae) is thick far lateral of the body on both sides; a lumbar
    transverse process is thin.

Pelvis
    The iliac crests beside L4-L5 can lie against the vertebra like a rib.
    Lateral bone exists at every level of the rib cage and again from the
    iliac crests down, with a rib-free gap between (the tips of the 11th and
    12th ribs end above the crests); rib-like hits at or below the crest of
    such a bottom run are ignored.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from screener.localizer.column import BONE_HU, Column, ellipse_radius
from screener.preprocess.morphology import dilate_2d, erode_2d, fill_holes, open_2d
from screener.localizer.segments import Segment

#: a rib reaches at least this far (mm) from the canal centre
RIB_REACH_MM = 60.0
#: a rib that leaves the coverage reaches at least this far (mm) from the canal centre
RIB_LEAVING_REACH_MM = 42.0
#: HU threshold (x bone scale) of the short-rib search: faint, thin 12th ribs read far below
#: cortical bone at a ~2 mm grid
SHORT_RIB_HU = 150.0
#: a short rib reaches at least this far (mm) from the canal centre ...
SHORT_RIB_MIN_MM = 40.0
#: ... and this much further than the bone attached to the vertebra below ...
SHORT_RIB_MARGIN_MM = 6.0
#: ... while its lateral part runs at least this much (mm) further back than the one below ...
SHORT_RIB_LONGER_BACK_MM = 8.0
#: ... but no further than this (mm): beyond, the low threshold has joined a long rib passing by
SHORT_RIB_MAX_MM = 75.0
#: lateral distance (mm from the canal) beyond which the course of attached bone is measured ...
POSTERIOR_FROM_MM = 25.0
#: ... a rib's lateral part runs at least this far (mm) behind the canal centre
SHORT_RIB_POSTERIOR_MM = 15.0
#: HU threshold of the rib search: rib cortex reads well above it, contrast-enhanced kidneys
#: and vessels (150-250 HU in portal-venous phase) mostly below
RIB_HU = 280.0
#: structures that survive an opening with a disk of this radius (mm) are organs, not ribs
THICK_MM = 8.0
#: rib heads lie within this distance (mm) of the body outline
CONTACT_MM = 10.0
#: rib heads are looked for from the body's front fifth to this far (mm) behind the canal's
#: centre plus its radius (costotransverse joints lie level with the canal; a small thoracic body's
#: canal is often placed a few mm too far forward)
CONTACT_BEHIND_MM = 4.0
#: how far (mm) below a vertebra its ribs are followed
RIB_DESCENT_MM = 30.0
#: the sacral alae are at least this thick (mm, antero-posterior) beside the S1 body
ALA_AP_MM = 10.0


#: the pelvis's lateral bone may start this far (mm) above the inferior end of the column
PELVIS_BELOW_MM = 40.0
#: no bone threshold of the localizer falls below this (HU): enhancing organs and muscle stay out
MIN_BONE_HU = 100.0
#: the long-rib threshold falls with the skeleton's density to this fraction at most ...
MIN_RIB_SCALE = 0.55
#: ... and the sacral-ala threshold to this (lower, noise and soft tissue join the body laterally)
MIN_SACRAL_SCALE = 0.65


_SQUARE_3 = np.ones((3, 3), bool)
_CROSS_3 = ndi.generate_binary_structure(2, 1)


def _close_2d(mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_closing(mask, structure)`` of a slice, or of each slice of a stack
    with an in-plane ``structure`` (border pixels count as False, as scipy's ``border_value=0``):
    the same masks by shifted ANDs and ORs (:mod:`screener.preprocess.morphology`), ten times
    faster on the working grid's slices."""
    return erode_2d(dilate_2d(mask, structure), structure)


def rib_hu(scale: float = 1.0) -> float:
    """Rib threshold for a skeleton of density ``scale`` (:func:`~screener.localizer.column.bone_scale`).

    It falls with the skeleton down to :data:`MIN_RIB_SCALE` of the default: lower, the shafts of
    the ribs above descend beside L1 and L2 and touch them (read as ribs of those vertebrae);
    fainter ribs are left to :func:`lateral_reach`.
    """
    return max(RIB_HU * max(scale, MIN_RIB_SCALE), 1.3 * MIN_BONE_HU)


def _disk(r: int) -> np.ndarray:
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return (yy ** 2 + xx ** 2) <= r ** 2


def rib_evidence(hu: np.ndarray, body: np.ndarray, col: Column, seg: Segment,
                 spacing: tuple[float, float, float], scale: float = 1.0, *,
                 hu_threshold: float | None = None, min_reach_mm: float | None = None,
                 close_gaps: bool = False) -> dict[str, float]:
    """Rib articulation evidence for one vertebra.

    ``hu_threshold`` and ``min_reach_mm`` default to :func:`rib_hu` of
    ``scale`` and :data:`RIB_REACH_MM`; :func:`lateral_reach` lowers both to
    measure how far any bone attached to the vertebra reaches (short ribs and
    transverse processes alike). ``close_gaps`` closes one-pixel gaps of the
    bone mask in plane first (a thin, faint rib's cortex crosses the
    threshold in dots at a 2 mm grid); the localizer uses it only for a
    vertebra inside the rib cage that showed no rib without it.

    Returns
    -------
    dict
        ``{"right": r, "left": l}`` with the lateral reach (mm) of the longest
        articulating rib on each side, 0 where none was found; plus
        ``"leaving"`` when a rib-like structure articulates here but leaves the
        coverage at its inferior end before it reaches ``RIB_REACH_MM`` (weak
        evidence, used only to word a decline).
    """
    dz, dy, dx = spacing
    win = _rib_window(col, seg, hu.shape, spacing)
    if win is None:
        return {"right": 0.0, "left": 0.0}
    zs, top, (y0, y1), (x0, x1) = win
    thr = rib_hu(scale) if hu_threshold is None else hu_threshold
    sub = hu[zs[0]:zs[-1] + 1, y0:y1, x0:x1] > thr
    if close_gaps:
        sub = _close_2d(sub, _SQUARE_3)  # scipy's closing with ones((1, 3, 3)), border_value=0
    sub &= body[zs[0]:zs[-1] + 1, y0:y1, x0:x1]
    contact, lateral, posterior, side = _rib_geometry(sub, col, seg, zs[0], top, (y0, y1), (x0, x1), spacing)
    _drop_thick(sub, spacing)
    return _reach_by_side(sub, contact, lateral, posterior, side, zs[0], dz,
                          RIB_REACH_MM if min_reach_mm is None else min_reach_mm)


def _rib_window(col: Column, seg: Segment, shape: tuple[int, int, int], spacing: tuple[float, float, float]
                ) -> tuple[list[int], int, tuple[int, int], tuple[int, int]] | None:
    """Slices (from :data:`RIB_DESCENT_MM` below the vertebra to its upper disc), the top slice, and the
    y and x ranges of the box where a vertebra's ribs are looked for; ``None`` without column there."""
    dz, dy, dx = spacing
    nz, ny, nx = shape
    top = seg.hi
    if seg.disc_above is not None:
        top = min(nz - 1, seg.disc_above)
    z0 = max(0, seg.lo - int(round(RIB_DESCENT_MM / dz)))
    zs = [z for z in range(z0, top + 1) if col.valid[z]]
    if not zs:
        return None
    zc = int(np.clip(np.round((seg.lo + seg.hi) / 2), 0, nz - 1))
    cx0 = float(col.canal_x[zc])
    half = int(round(130.0 / dx))
    x0, x1 = max(0, int(cx0) - half), min(nx, int(cx0) + half + 1)
    yb = int(np.nanmin(col.body_y[zs] - 60.0 / dy))
    ye = int(np.nanmax(col.canal_y[zs] + 60.0 / dy))
    return zs, top, (max(0, yb), min(ny, ye)), (x0, x1)


def _rib_geometry(sub: np.ndarray, col: Column, seg: Segment, z_first: int, top: int, yr: tuple[int, int],
                  xr: tuple[int, int], spacing: tuple[float, float, float]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per voxel of the rib box: the rib-head contact zone beside the body, lateral and posterior
    distance from the canal (mm) and side (+1 left, -1 right); the body and canal are removed from
    ``sub`` in place."""
    dz, dy, dx = spacing
    (y0, y1), (x0, x1) = yr, xr
    contact = np.zeros_like(sub)
    lateral = np.zeros(sub.shape, np.float32)
    posterior = np.zeros(sub.shape, np.float32)
    side = np.zeros(sub.shape, np.int8)
    xx = np.arange(x0, x1)[None, :]
    yy = np.arange(y0, y1)[:, None]
    for n in range(sub.shape[0]):
        z = z_first + n
        if not col.valid[z]:
            sub[n] = False
            continue
        by, bx, hd, hw = col.body_y[z], col.body_x[z], col.body_hd[z], col.body_hw[z]
        rho = ellipse_radius((y1 - y0, x1 - x0), by - y0, bx - x0, hd, hw)
        cyz, cxz, crz = col.canal_y[z], col.canal_x[z], col.canal_r[z]
        canal = ((yy - cyz) ** 2 + (xx - cxz) ** 2) <= (crz + 1.0) ** 2
        core = (rho <= 1.1) | canal
        sub[n] &= ~core
        lateral[n] = np.abs(xx - cxz) * dx + 0 * yy
        posterior[n] = (yy - cyz) * dy + 0 * xx
        side[n] = np.where(xx > cxz, 1, -1) + 0 * yy
        if seg.lo <= z <= top:
            contact[n] = ((rho > 1.1) & (rho <= 1.1 + CONTACT_MM / (hw * dx))
                          & (yy >= by - 0.2 * hd) & (yy <= cyz + crz + CONTACT_BEHIND_MM / dy)
                          & (np.abs(xx - bx) >= 0.5 * hw))
    return contact, lateral, posterior, side


def _drop_thick(sub: np.ndarray, spacing: tuple[float, float, float]) -> None:
    """Remove thick structures (and a 3 mm margin) from every slice of ``sub``, in place:
    contrast-enhanced organs (kidneys, bowel, vessels) can read above the bone threshold; they are
    thick (survive an opening by :data:`THICK_MM`), ribs and transverse processes are not."""
    dz, dy, dx = spacing
    disk = _disk(max(1, int(round(THICK_MM / min(dy, dx)))))
    margin = _disk(max(1, int(round(3.0 / min(dy, dx)))))
    if sub.any():  # every slice at once (in-plane structures: the same as slice by slice)
        sub &= ~dilate_2d(open_2d(sub, disk), margin)


def _reach_by_side(sub: np.ndarray, contact: np.ndarray, lateral: np.ndarray, posterior: np.ndarray,
                   side: np.ndarray, z_first: int, dz: float, reach_min: float) -> dict[str, float]:
    """Lateral reach (mm) of the longest bone touching the contact zone on each side (see
    :func:`rib_evidence` for the keys)."""
    lab, n = ndi.label(sub, structure=np.ones((3, 3, 3), bool))
    out = {"right": 0.0, "left": 0.0}
    touching = np.unique(lab[contact & sub])
    touching = touching[touching > 0]
    for comp in touching:
        m = lab == comp
        for s, name in ((1, "left"), (-1, "right")):
            ms = m & (side == s)
            touch = ms & contact
            if not touch.any():
                continue
            reach = float(lateral[ms].max())
            # a rib that leaves the coverage at its inferior end before it gets far: it
            # articulates well above the end of the coverage (a transverse process is level
            # with its root) and is still lateral in the last slice
            zt = np.nonzero(touch.any(axis=(1, 2)))[0]
            leaves = (z_first == 0 and reach >= RIB_LEAVING_REACH_MM and zt.size > 0
                      and (z_first + zt.min()) * dz >= 12.0
                      and bool((lateral[0][ms[0]] >= 35.0).any()))
            if reach >= reach_min:
                out[name] = max(out[name], reach)
                far = ms & (lateral >= POSTERIOR_FROM_MM)
                if far.any():  # how far behind the canal the lateral part runs (a rib's course)
                    out[f"{name}_posterior"] = max(out.get(f"{name}_posterior", 0.0),
                                                   float(posterior[far].max()))
            elif leaves:
                out["leaving"] = max(out.get("leaving", 0.0), reach)
    return out


def lateral_reach(hu: np.ndarray, body: np.ndarray, col: Column, seg: Segment,
                  spacing: tuple[float, float, float], scale: float = 1.0) -> dict[str, float]:
    """How far (mm from the canal) bone attached to one vertebra reaches, per side.

    The search of :func:`rib_evidence` at a low threshold (:data:`SHORT_RIB_HU`
    x ``scale``, never below :data:`MIN_BONE_HU`) and without a minimum reach:
    a transverse process, a short, thin or faint (hypoplastic) 12th rib and a
    lumbar rib all show up here. Lumbar transverse processes lengthen from L1
    to L3, so a vertebra whose attached bone reaches clearly further than the
    vertebra below it carries a short rib (:func:`short_rib_sides`).
    """
    thr = max(SHORT_RIB_HU * scale, MIN_BONE_HU + 20.0)
    return rib_evidence(hu, body, col, seg, spacing, scale, hu_threshold=thr, min_reach_mm=0.0)


def short_rib_sides(reach: dict[str, float], reach_below: dict[str, float]) -> list[str]:
    """Sides on which a vertebra carries a short rib (see :func:`lateral_reach`).

    A side counts when its attached bone reaches at least
    :data:`SHORT_RIB_MIN_MM` from the canal and at least
    :data:`SHORT_RIB_MARGIN_MM` further than the same side of the vertebra
    below (whose transverse process, in a lumbar spine, is the longer one)
    while running at least :data:`SHORT_RIB_LONGER_BACK_MM` further back, or
    when its lateral part (beyond :data:`POSTERIOR_FROM_MM`) runs at least
    :data:`SHORT_RIB_POSTERIOR_MM` behind the canal centre and 10 mm further
    back than the vertebra below's (a rib's posterolateral course; lumbar
    transverse processes project laterally at the level of the canal). Bone
    reaching beyond :data:`SHORT_RIB_MAX_MM` is a long rib passing by.
    """
    out = []
    for side in ("right", "left"):
        r, rb = reach.get(side, 0.0), reach_below.get(side, 0.0)
        p, pb = reach.get(f"{side}_posterior", -np.inf), reach_below.get(f"{side}_posterior", 0.0)
        if r > SHORT_RIB_MAX_MM:  # attached to a long rib passing by, not a short rib of its own
            continue
        longer = r >= SHORT_RIB_MIN_MM and r >= rb + SHORT_RIB_MARGIN_MM
        # a rib runs posterolaterally from its costovertebral joint; a transverse process
        # projects laterally at the level of the canal
        backward = r >= POSTERIOR_FROM_MM + 8.0 and p >= SHORT_RIB_POSTERIOR_MM and p >= pb + 10.0
        # a transverse process that merely reaches further (a long L1 process, or one joined at a
        # low threshold to a rib passing by) is not a rib: the posterolateral course must show too
        if backward or (longer and p >= pb + SHORT_RIB_LONGER_BACK_MM):
            out.append(side)
    return out


def _sacral_bone(hu_z: np.ndarray, body_z: np.ndarray, scale: float) -> np.ndarray:
    """One slice's bone for the sacral tests (closed, holes filled; threshold follows the skeleton)."""
    return fill_holes(_close_2d((hu_z > BONE_HU * max(scale, MIN_SACRAL_SCALE)) & body_z, _CROSS_3))


def _ala_thickness(comp: np.ndarray, canal_x: float, body_hw: float, dy: float, dx: float) -> float:
    """Thinner of the two antero-posterior extents (mm) of ``comp`` beside the canal.

    Measured at ``max(30 mm, 1.5 x body half-width)`` from the canal on each
    side: sacral alae are thick there, lumbar transverse processes (~10 mm)
    and ribs are not. 0 when a side lies outside the image.
    """
    off = max(30.0, 1.5 * body_hw * dx) / dx
    out = np.inf
    for sgn in (-1, 1):
        xcol = int(round(canal_x + sgn * off))
        if not 0 <= xcol < comp.shape[1]:
            return 0.0
        out = min(out, np.count_nonzero(comp[:, xcol]) * dy)
    return float(out)


def sacral_evidence(hu: np.ndarray, body: np.ndarray, col: Column, seg: Segment,
                    spacing: tuple[float, float, float], scale: float = 1.0) -> float:
    """Fraction of a vertebra's slices that look like S1 (thick alae on both sides).

    In such a slice the bone connected to the vertebral body (holes filled)
    is still thick (>= ``ALA_AP_MM`` antero-posterior) beside the canal on
    both sides (:func:`_ala_thickness`).
    """
    dz, dy, dx = spacing
    hits, total = 0, 0
    for z in range(seg.lo, seg.hi + 1):
        if not col.valid[z]:
            continue
        total += 1
        bone = _sacral_bone(hu[z], body[z], scale)
        lab, n = ndi.label(bone)
        rho = ellipse_radius(bone.shape, col.body_y[z], col.body_x[z], col.body_hd[z], col.body_hw[z])
        ids = lab[(rho <= 1.0) & (lab > 0)]
        if ids.size == 0:
            continue
        comp = lab == np.bincount(ids).argmax()
        hits += _ala_thickness(comp, col.canal_x[z], col.body_hw[z], dy, dx) >= ALA_AP_MM
    return hits / total if total else 0.0


#: the sacrum is looked for below the end of the column when it starts within this distance (mm)
SACRUM_BELOW_START_MM = 20.0
#: ... and its alae stay at least twice :data:`ALA_AP_MM` thick over this height (mm)
SACRUM_BELOW_MIN_MM = 10.0
#: ... near the column's axis: the bone within this distance (mm) of the canal's last position
SACRUM_BELOW_NEAR_MM = 30.0


def sacrum_below(hu: np.ndarray, body: np.ndarray, col: Column, spacing: tuple[float, float, float],
                 scale: float = 1.0) -> dict[str, float] | None:
    """The sacrum just below the inferior end of the column, when the column stopped above it.

    A steeply tilted sacrum turns its body away from the column's axis and
    the column tracker stops at L5. Below the column's last slice, the bone
    near the canal's last position whose alae are at least twice
    :data:`ALA_AP_MM` thick beside the canal (:func:`_ala_thickness`, the
    same test as :func:`sacral_evidence`, with a doubled margin: a
    transverse process is ~10 mm) is the sacrum when it starts within
    :data:`SACRUM_BELOW_START_MM` of the column's end and goes on for at
    least :data:`SACRUM_BELOW_MIN_MM`. Returns its start below the column's
    end and height (mm), or ``None``.
    """
    dz, dy, dx = spacing
    valid = np.nonzero(col.valid)[0]
    if valid.size == 0:
        return None
    z0 = int(valid[0])
    cy, cx, hw = col.canal_y[z0], col.canal_x[z0], col.body_hw[z0]
    yy, xx = np.ogrid[:hu.shape[1], :hu.shape[2]]
    near = ((yy - cy) * dy) ** 2 + ((xx - cx) * dx) ** 2 <= SACRUM_BELOW_NEAR_MM ** 2
    start, run = None, 0
    for z in range(z0 - 1, -1, -1):
        below_mm = (z0 - z) * dz
        if start is None and below_mm > SACRUM_BELOW_START_MM:
            return None
        bone = _sacral_bone(hu[z], body[z], scale)
        lab, _ = ndi.label(bone)
        ids = lab[near & (lab > 0)]
        thick = (_ala_thickness(lab == np.bincount(ids).argmax(), cx, hw, dy, dx) if ids.size else 0.0)
        if thick >= 2.0 * ALA_AP_MM:
            start = below_mm if start is None else start
            run += 1
            if run * dz >= SACRUM_BELOW_MIN_MM:
                return {"start_below_column_mm": round(start, 1), "height_mm": round(run * dz, 1)}
        elif start is not None:
            start, run = None, 0
    return None


#: rib-free column above the ilia, when no rib is in view above them, for the run to count as the pelvis
#: (about one and a half lumbar bodies: lower rib tips at the end of a chest coverage have ribs above them)
PELVIS_OPEN_GAP_MM = 45.0


#: arms lying against the trunk are cut off by an erosion of this radius (mm) before lateral bone is
#: looked for (a humerus beside the abdomen is lateral bone at every level)
ARM_CUT_MM = 15.0


def _trunks(body: np.ndarray, col: Column, zs: list[int], dx: float) -> list[np.ndarray]:
    """The part of each slice ``z`` in ``zs`` of the body mask that holds the spine, with arms
    touching it cut off.

    Erode by a disk of radius ``r`` (:data:`ARM_CUT_MM`), keep the spine's component (the one at
    the canal), grow it back by the same disk: an arm joined by a neck narrower than the disk falls
    away (an opening would keep the two touching).  Pixels outside the image count as outside the
    body, so the erosion is exactly "the distance transform exceeds ``r``" and the growth "the
    spine's component lies within ``r``"; all slices at once, as in-plane morphology of the stack
    (:func:`~screener.preprocess.morphology.erode_2d`), the components labelled in plane.  A slice
    whose canal is off the image or in no component keeps its whole body mask."""
    if not zs:
        return []
    r = max(1, int(round(ARM_CUT_MM / dx)))
    disk = _disk(r)
    stack = body[zs]
    st = np.zeros((3, 3, 3), bool)
    st[1] = ndi.generate_binary_structure(2, 1)
    lab, _ = ndi.label(erode_2d(stack, disk), structure=st, output=np.intp)
    keep = np.zeros(len(zs), dtype=np.intp)
    for n, z in enumerate(zs):
        y, x = int(round(col.canal_y[z])), int(round(col.canal_x[z]))
        if 0 <= y < body.shape[1] and 0 <= x < body.shape[2]:
            keep[n] = lab[n, y, x]
    chosen = np.zeros(int(lab.max()) + 1, dtype=bool)
    chosen[keep[keep > 0]] = True
    chosen[0] = False
    grown = dilate_2d(chosen[lab], disk) & stack
    return [grown[n] if keep[n] else stack[n] for n in range(len(zs))]


def pelvis_top(hu: np.ndarray, body: np.ndarray, col: Column, spacing: tuple[float, float, float],
               scale: float = 1.0) -> int | None:
    """Working slice of the iliac crests, when the ilia are in view below a rib-free gap.

    Lateral bone (beyond 50 mm from the canal on both sides, inside the trunk:
    arms cut off, :func:`_trunks`) is present at every level
    of the rib cage and again from the iliac crests down. The run of lateral
    bone that reaches the inferior end of the column (or starts within
    :data:`PELVIS_BELOW_MM` of it: the column may run on along the sacrum and
    coccyx below the ilia) and is separated from anything above by at least
    15 mm without lateral bone is the pelvis; when nothing lateral lies
    above it (the coverage starts below the ribs) the rib-free gap up to the
    end of the column must be at least :data:`PELVIS_OPEN_GAP_MM`.
    Returns ``None`` when there is no such run (e.g. a chest CT whose rib
    shafts reach the end of the coverage).
    """
    dz, dy, dx = spacing
    nz = hu.shape[0]
    present = np.zeros(nz, bool)
    xs = np.arange(hu.shape[2])
    def lateral_both(bone: np.ndarray, lat: np.ndarray) -> bool:
        return min(bone[:, lat >= 50.0].sum(), bone[:, lat <= -50.0].sum()) * dy * dx >= 40.0

    # the trunk is a part of the body: a slice without lateral bone in the body has none in it
    need = [z for z in range(nz) if col.valid[z]
            and lateral_both((hu[z] > rib_hu(scale)) & body[z], (xs - col.canal_x[z]) * dx)]
    for z, trunk in zip(need, _trunks(body, col, need, dx)):
        bone = (hu[z] > rib_hu(scale)) & body[z]
        present[z] = lateral_both(bone & trunk, (xs - col.canal_x[z]) * dx)
    valid = np.nonzero(col.valid)[0]
    if valid.size == 0:
        return None
    z = valid[0]
    # the column may run on below the ilia (sacrum and coccyx with no lateral bone beside them)
    while z < valid[-1] and not present[z] and (z - valid[0]) * dz < PELVIS_BELOW_MM:
        z += 1
    if not present[z]:
        return None
    while z + 1 <= valid[-1] and present[z + 1]:
        z += 1
    top = z
    gap = 0
    k = z + 1
    while k <= valid[-1] and not present[k]:
        gap += 1
        k += 1
    if gap * dz < 15.0 or (k > valid[-1] and gap * dz < PELVIS_OPEN_GAP_MM):
        return None
    return int(top)
