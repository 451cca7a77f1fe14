"""Classical (weight-free) spine localizer for axial CT.

Pipeline (all on a ~2 mm working grid, :mod:`screener.localizer.grid`):

1. **Column** (:mod:`~screener.localizer.column`): body mask (largest
   soft-tissue component per slice: excludes the table and separate arms);
   spinal canal = hole of the bone union over 30 mm slabs with a deep, wide
   bony mass in front; tracked along z with outlier rejection; vertebral body
   geometry in front of the canal (guard against a contrast aorta touching it).
2. **Vertebrae** (:mod:`~screener.localizer.segments`): the per-slice boneness
   of the body footprint (cortical ring band + core) dips at every disc even in
   osteoporotic bodies; prominent minima with spacing priors are the discs.
3. **Levels** (:mod:`~screener.localizer.anchors`): rib articulation per
   vertebra and side; the lowest vertebra of the long-rib run from the top
   is T12 unless the vertebra below it carries a short rib (bone attached to
   it reaching clearly further than the transverse processes of the vertebra
   below: a short, thin, faint or one-sided hypoplastic 12th rib), and the
   next one below T12 is L1. The sacrum (body-connected bone reaching the
   ilia on both sides) gives S1; L5 is the vertebra above it and L1 four
   above that. Agreement of both anchors gives high confidence; one anchor a
   lower one; disagreement the rib-based label with a low confidence and the
   transitional anatomy named (sacralised L5, lumbarised S1, lumbar rib).
4. **Output**: for every labelled complete vertebra its slice range, z range,
   and the centroid of the trabecular body (body ellipse eroded to 60 %, HU
   below 450 to avoid sclerotic endplates and cortex), in source indices and
   patient mm.

Bone thresholds follow the skeleton's own density
(:func:`~screener.localizer.column.find_column_adaptive` lowers the column's
threshold until the canal is tracked; :func:`~screener.localizer.column.bone_scale`
scales every later threshold): an osteoporotic skeleton whose cortex and
ribs read 40 % lower is searched with thresholds 40 % lower.

Declines with a reason containing "L1 not in view" when no column is found,
when no anchor is visible, or when L1 lies outside the coverage or is only
partly covered.

Real-CT features handled: patient table and arms (body mask), contrast-filled
aorta touching the body (depth cut), osteophytes (slab union; disc found from
the cortical ring band), osteoporotic bodies (ring band instead of trabecular
HU), slice thickness 0.6-5 mm (z-binning to >= 1.5 mm, spacing priors in mm),
any in-plane orientation / feet-first (reoriented to LPS), mild scoliosis
(canal tracked per 8 mm slab). Verified on one real CT (the shared 40 mm
upper-abdomen series) and the virtual cohort only (hypoplastic 12th ribs,
lumbar ribs, sacralised L5 / lumbarised S1 and low-density skeletons are
rendered there: ``benchmarks/eval_localizer.py``). NOT verified on real
scans: oblique L5-S1 discs with strong lordosis, bridging osteophytes / DISH
(fused discs), metal (spinal fixation), severe scoliosis with rotation,
vertebra plana, prone scans; counting from T1 is not implemented (the
cohort's spine starts at T6).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import structlog

from screener.domain import SpineLocalization, Volume, VertebraLocation
from screener.localizer.anchors import (RIB_REACH_MM, lateral_reach, pelvis_top, rib_evidence,
                                       sacral_evidence, sacrum_below, short_rib_sides)
from screener.localizer.column import body_masks, bone_scale, find_column_adaptive
from screener.localizer.grid import GeometryError, WorkGrid, make_grid
from screener.localizer.segments import (
    THICK_SLICE_MM,
    Segment,
    core_profile,
    ellipse_radius,
    find_discs,
    split_segments,
)

log = structlog.get_logger(__name__)

METHOD = "classical"
NOT_IN_VIEW = "L1 not in view"
#: fraction of a vertebra's slices that must look sacral (alae reaching the ilia)
SACRAL_MIN = 0.4
#: a counted lumbar body shorter than this fraction of the tallest looks split (see _regular_between)
SPLIT_RATIO = 0.7
#: the median height (mm) of an adult's thoracolumbar bodies is well above this; below it the
#: column was split at false discs
MIN_MEDIAN_BODY_MM = 16.0
#: plausible body height of L1 (mm, endplate to endplate): a grade-3 fracture to a tall L1
L1_HEIGHT_MM = (10.0, 38.0)
#: a count from the sacrum alone needs lumbar bodies (L4-L1 as counted) of at least this median height
#: (mm): shorter, false discs split them all alike and the count runs several levels off
MIN_LUMBAR_BODY_MM = 18.0

_THORACIC = [f"T{i}" for i in range(1, 13)]
_LUMBAR = [f"L{i}" for i in range(1, 6)]
_ORDER = _THORACIC + _LUMBAR + ["S1"]  # superior -> inferior
#: lateral reach of the bone attached to a segment, by index (None when not measurable)
Reach = Callable[[int], "dict[str, float] | None"]


class ClassicalLocalizer:
    """Weight-free spine localizer for axial CT (see module docstring)."""

    name = METHOD

    def locate(self, volume: Volume) -> SpineLocalization:
        """Locate and label the vertebrae of ``volume``.

        Parameters
        ----------
        volume : Volume
            Axial CT in HU.

        Returns
        -------
        SpineLocalization
            ``vertebrae`` holds every labelled, completely covered vertebra; when
            L1 cannot be found or labelled it is absent and ``reason`` contains
            "L1 not in view".
        """
        try:
            grid = make_grid(volume)
        except GeometryError as exc:
            return SpineLocalization({}, METHOD, f"{NOT_IN_VIEW}: {exc}", {})
        return _locate(grid)


def _decline(reason: str, details: dict[str, Any], found: dict[str, VertebraLocation] | None = None
             ) -> SpineLocalization:
    log.info("spine_localizer_declined", reason=reason)
    return SpineLocalization(found or {}, METHOD, f"{NOT_IN_VIEW}: {reason}", details)


def _locate(grid: WorkGrid) -> SpineLocalization:
    hu, spacing = grid.hu, grid.spacing
    dz = spacing[0]
    body = body_masks(hu)
    col = find_column_adaptive(hu, body, spacing)
    details: dict[str, Any] = {"grid_spacing_mm": [round(s, 3) for s in spacing]}
    if not col.valid.any():
        return _decline("no vertebral column found", details)
    zv = np.nonzero(col.valid)[0]
    details["column_z_mm"] = [round(grid.z_mm(zv[0]), 1), round(grid.z_mm(zv[-1]), 1)]
    # every bone threshold below follows this skeleton's own density (never a fixed HU that
    # only young bone passes)
    scale = bone_scale(hu, col)
    details["bone_scale"] = round(scale, 3)
    details["column_bone_hu"] = col.bone_hu
    segs, crest, pelvic, below = _vertebrae_and_anchors(grid, body, col, scale, details)
    details["segments"] = [
        {"z_mm": [round(grid.z_mm(s.lo - 0.5), 1), round(grid.z_mm(s.hi + 0.5), 1)],
         "complete": s.complete, "ribs_mm": {k: round(v, 1) for k, v in s.ribs.items()},
         "sacral": round(s.sacral, 2)} for s in segs]
    if not segs:
        return _decline("no vertebral bodies separated along the column", details)
    heights = [sg.n_slices * dz for sg in segs if sg.complete]
    median_mm = float(np.median(heights)) if heights else 0.0
    if len(heights) >= 5 and median_mm < MIN_MEDIAN_BODY_MM:
        # false discs inside the bodies (thick slices, faint endplates): every count would be off
        return _decline(f"the column split into bodies shorter than vertebrae (median "
                        f"{median_mm:.0f} mm): the discs were not found reliably, so the "
                        "levels cannot be numbered with confidence", details)

    def reach(i: int) -> dict[str, float] | None:
        if not 0 <= i < len(segs) or i in pelvic:
            return None
        return lateral_reach(hu, body, col, segs[i], spacing, scale)

    labels, conf, anchor_info = _assign_levels(segs, reach, crest=crest, dz=dz,
                                               sacrum_below=below is not None)
    details.update(anchor_info)
    found: dict[str, VertebraLocation] = {}
    for i, s in enumerate(segs):
        lab = labels.get(i)
        if lab is None or not s.complete:
            continue
        found[lab] = _vertebra_location(grid, col, s, lab, conf)
    if labels:
        details["labels"] = {labels[i]: details["segments"][i]["z_mm"] for i in labels}
    if "L1" not in found:
        why = anchor_info.get("decline") or "L1 is outside the coverage"
        l1 = [i for i, lab in labels.items() if lab == "L1"]
        if l1 and not segs[l1[0]].complete:
            why = "L1 is only partly covered"
        return _decline(why, details, found)
    l1_seg = next(segs[i] for i, lab in labels.items() if lab == "L1")
    l1_mm = l1_seg.n_slices * dz
    if not L1_HEIGHT_MM[0] <= l1_mm <= L1_HEIGHT_MM[1]:
        # two bodies merged (a disc not seen) or a body split in two: every label would be off
        return _decline(f"the vertebra numbered L1 is {l1_mm:.0f} mm tall, outside "
                        f"{L1_HEIGHT_MM[0]:.0f}-{L1_HEIGHT_MM[1]:.0f} mm: its discs were not both found, "
                        "so the levels cannot be numbered with confidence", details)
    log.info("spine_localized", l1_z_mm=found["L1"].z_range_mm, confidence=round(conf, 2),
             anchors=anchor_info.get("anchors"))
    return SpineLocalization(found, METHOD, None, details)


#: a run of at most this many rib-free vertebrae between rib-bearing ones is looked at again
RIB_GAP_MAX = 2


def _vertebrae_and_anchors(grid: WorkGrid, body: np.ndarray, col, scale: float, details: dict[str, Any]
                           ) -> tuple[list[Segment], int | None, set[int], dict[str, float] | None]:
    """The column split into vertebral bodies, each with its rib and sacral evidence, and the
    pelvic anchors: ``(segments, iliac-crest slice, indices of pelvic segments, sacrum below the
    column)`` (the crest and the sacrum below are noted in ``details``)."""
    hu, spacing = grid.hu, grid.spacing
    dz = spacing[0]
    prof = core_profile(hu, col, scale)
    segs = split_segments(prof, find_discs(prof, dz, scale), col.valid, dz, scale)
    # ribs first (not in the pelvis: the iliac crests lie beside L4-L5 like ribs), then the
    # sacrum among the lowest rib-free vertebrae
    crest = pelvis_top(hu, body, col, spacing, scale)
    if crest is not None:
        details["iliac_crest_z_mm"] = round(grid.z_mm(crest), 1)
    pelvic = {i for i, sg in enumerate(segs) if crest is not None and sg.lo <= crest + int(round(10.0 / dz))}
    for i, s in enumerate(segs):
        s.ribs = {"right": 0.0, "left": 0.0} if i in pelvic else rib_evidence(hu, body, col, s, spacing, scale)
    _recheck_rib_gaps(segs, lambda s: rib_evidence(hu, body, col, s, spacing, scale, close_gaps=True))
    for s in segs[:3]:
        if not _rib_bearing(s):
            s.sacral = sacral_evidence(hu, body, col, s, spacing, scale)
    below = None
    if segs and not segs[0].complete and _sacral_s1(segs) is None:
        # the column stopped inside its lowest body: a steeply tilted sacrum may lie just below
        below = sacrum_below(hu, body, col, spacing, scale)
        if below is not None:
            details["sacrum_below_column"] = below
    return segs, crest, pelvic, below


def _recheck_rib_gaps(segs: list[Segment], evidence: Callable[[Segment], dict[str, float]]) -> None:
    """Look again, with one-pixel gaps closed, at rib-free vertebrae inside the rib cage.

    A faint, thin rib (an osteoporotic chest, partial volume at a 2 mm grid)
    can cross the rib threshold in dots and lose its connection to the
    vertebra; one or two rib-free vertebrae between rib-bearing ones are
    re-examined with ``evidence`` (the rib search with gaps closed). Rib-free
    vertebrae below the cage are left alone: closing gaps there would join
    transverse processes to enhancing organs.
    """
    ribbed = [i for i, s in enumerate(segs) if _rib_bearing(s)]
    for a, b in zip(ribbed[:-1], ribbed[1:]):
        if 1 < b - a <= RIB_GAP_MAX + 1:
            for i in range(a + 1, b):
                segs[i].ribs = evidence(segs[i])


def _rib_bearing(s: Segment) -> bool:
    return max(s.ribs.get("left", 0.0), s.ribs.get("right", 0.0)) > 0.0


def _rib_weight(s: Segment) -> float:
    """Rib evidence of one vertebra: 1 for a long rib, 0.6 for a short separate one, 0 for none."""
    reach = max(s.ribs.get("left", 0.0), s.ribs.get("right", 0.0))
    if reach >= RIB_REACH_MM:
        return 1.0
    return 0.6 if reach > 0.0 else 0.0


def _long_rib_t12(segs: list[Segment], info: dict[str, Any]) -> int | None:
    """Index of the lowest vertebra of the long-rib block from the top (T12 if no rib is short).

    Walk down from the top-most rib-bearing vertebra through the rib-bearing
    block. A single rib-free vertebra inside the block (a missed rib pair) is
    bridged when strong ribs lie on both sides of it; two rib-free vertebrae
    end the block, so rib-like hits further down (iliac crest beside L4-L5, a
    long transverse process) are ignored.
    """
    n = len(segs)
    ribbed = [_rib_bearing(s) for s in segs]
    if not any(ribbed):
        return None
    strong = [_rib_weight(s) >= 1.0 and (s.ribs.get("left", 0.0) > 0 and s.ribs.get("right", 0.0) > 0)
              for s in segs]
    i = max(k for k in range(n) if ribbed[k])
    bridged = 0
    while True:
        if i - 1 >= 0 and ribbed[i - 1]:
            i -= 1
        elif i - 2 >= 0 and not ribbed[i - 1] and strong[i - 2] and strong[i]:
            i -= 2
            bridged += 1
        else:
            break
    lower_hits = sum(ribbed[:max(0, i - 1)])
    if i == 0:
        info["decline"] = "coverage ends at T12 (no rib-free vertebra below the last rib-bearing one)"
        return None
    info["rib_anchor"] = {"T12_segment": i, "both_sides": segs[i].ribs.get("left", 0.0) > 0
                          and segs[i].ribs.get("right", 0.0) > 0,
                          "bridged_gaps": bridged, "ignored_lower_hits": int(lower_hits)}
    return i


def _sacral_s1(segs: list[Segment]) -> int | None:
    """Index of S1 from the sacrum: the highest of the lowest sacral-looking, rib-free segments.

    A sacralised L5 (its transverse processes fused to the sacrum as alae)
    looks sacral too, so the sacral count then names L5 "S1" and puts L1 one
    vertebra too high; :func:`_combine_anchors` resolves that with the ribs.
    """
    n = len(segs)
    first = next((k for k in range(min(n, 3)) if segs[k].sacral >= SACRAL_MIN and not _rib_bearing(segs[k])),
                 None)
    if first is None:
        return None
    s1 = first
    while s1 + 1 < n and segs[s1 + 1].sacral >= SACRAL_MIN and not _rib_bearing(segs[s1 + 1]):
        s1 += 1
    return s1 if s1 + 1 < n else None


def _short_rib(t12: int, l1_sac: int | None, reach: Reach, info: dict[str, Any],
               vote: Callable[[tuple[int, int]], int | None] | None = None) -> int:
    """Move T12 down one vertebra when the vertebra below the long ribs carries a short rib.

    A hypoplastic 12th rib (short, thin, faint, often one-sided: 12.6 % of
    patients) reads as rib-free to the long-rib search, which would then name
    T12 "L1". A short rib on the vertebra below the last long rib is either
    that hypoplastic 12th rib or a lumbar rib on L1 (13 rib pairs, ~1.5 %):
    the sacral count decides when it agrees with one of the two; without it
    the iliac crests decide when they side clearly with one (``vote``, given
    the two candidate L1 indices, :func:`_crest_vote`); failing both, the far
    more common hypoplastic 12th rib is assumed, with a warning.
    """
    below, below2 = reach(t12 - 1), reach(t12 - 2)
    if below is None or below2 is None:
        return t12
    sides = short_rib_sides(below, below2)
    info["short_rib_check"] = {"reach_mm": {k: round(v, 1) for k, v in below.items()},
                               "reach_below_mm": {k: round(v, 1) for k, v in below2.items()},
                               "short_rib_sides": sides}
    if not sides:
        return t12
    if l1_sac is not None and l1_sac == t12 - 1:
        info["transitional"] = ("short rib on the first lumbar vertebra (lumbar rib, 13 rib pairs); "
                                "the sacral count agrees")
        info["lumbar_rib"] = sides
        return t12
    crest = vote((t12 - 1, t12 - 2)) if vote is not None and l1_sac is None else None
    if crest == t12 - 1:
        info["short_rib_not_used"] = {"sides": sides, "why": "the iliac crests put L4 where the long-rib "
                                      "count does (a lumbar rib or a long transverse process on L1)"}
        return t12
    info["short_12th_rib"] = sides
    if crest is None and (l1_sac is None or l1_sac != t12 - 2):
        info["warning_short_rib"] = ("short rib below the last long rib taken as a hypoplastic 12th rib "
                                     "(it could be a lumbar rib)")
    return t12 - 1


def _assign_levels(segs: list[Segment], reach: Reach | None = None, *, crest: int | None = None,
                   dz: float = 1.0, sacrum_below: bool = False) -> tuple[dict[int, str], float, dict[str, Any]]:
    """Label segment indices (ascending z) from the rib and sacral anchors.

    ``reach(i)`` gives the lateral reach of the bone attached to segment ``i``
    (:func:`~screener.localizer.anchors.lateral_reach`, ``None`` when unknown);
    with it a short (hypoplastic) 12th rib is recognised (:func:`_short_rib`).
    ``crest`` is the working slice of the iliac crests (``None`` when not in
    view) and ``dz`` the working slice spacing in mm: the crests break a
    one-level tie between the rib and the sacral count (:func:`_crest_vote`).
    ``sacrum_below``: the sacrum lies just below the column's lowest body
    (:func:`~screener.localizer.anchors.sacrum_below`), which is then L5
    when no rib anchors the count.
    """
    info: dict[str, Any] = {}
    n = len(segs)
    t12 = _long_rib_t12(segs, info)
    s1 = _sacral_s1(segs)
    if s1 is None and sacrum_below and t12 is None and n > 1:
        # the last resort when no rib anchors the count either (bodies split by false discs below
        # the ribs' count would only turn agreement into a decline): the lowest body is L5
        s1 = -1
    if s1 is not None:
        info["sacral_anchor"] = {"S1_segment": s1}
    l1_sac = s1 + 5 if s1 is not None else None

    def vote(cands: tuple[int, int]) -> int | None:
        # the crests count vertebrae only where the bodies counted look single (a body split
        # in two or two merged would shift the count the crests check)
        if crest is None or not _regular_between(segs, min(cands) - 3, max(cands)):
            return None
        return _crest_vote(segs, cands, crest, dz, info)

    if t12 is not None and reach is not None:
        t12 = _short_rib(t12, l1_sac, reach, info, vote)
        if t12 == 0:
            info["decline"] = "coverage ends at T12 (its short rib is the lowest rib)"
            t12 = None
        elif "rib_anchor" in info and info["rib_anchor"]["T12_segment"] != t12:
            info["rib_anchor"].update(T12_segment=t12, both_sides=len(info["short_12th_rib"]) == 2)
    l1_rib = t12 - 1 if t12 is not None else None
    anchors = []
    if l1_rib is not None:
        anchors.append("ribs")
    if l1_sac is not None:
        anchors.append("sacrum")
    info["anchors"] = anchors
    if l1_rib is None and l1_sac is None:
        _no_anchor(segs, info)
        return {}, 0.0, info
    if l1_rib is None and _checked_sacral_count(segs, l1_sac, info, vote, dz, crest) is None:
        return {}, 0.0, info
    regular = (l1_rib is not None and l1_sac is not None and l1_sac < l1_rib
               and _regular_between(segs, l1_sac - 3, l1_rib - 1))
    crest_pick = None
    if l1_rib is not None and l1_sac is not None and abs(l1_rib - l1_sac) == 1:
        crest_pick = vote((l1_rib, l1_sac))
    l1, conf = _combine_anchors(segs, l1_rib, l1_sac, info, sacral_count_regular=regular, crest_pick=crest_pick)
    if conf <= 0.05:
        return {}, 0.0, info
    labels = _labels_from(l1, n)
    if not 0 <= l1 < n:
        info["decline"] = "coverage ends above L1" if l1 < 0 else "coverage ends below L1"
        return {k: v for k, v in labels.items()}, conf, info
    s = segs[l1]
    height = s.n_slices
    info["l1_height_slices"] = int(height)
    return labels, float(np.clip(conf, 0.05, 0.99)), info


def _no_anchor(segs: list[Segment], info: dict[str, Any]) -> None:
    """Word the decline when neither the ribs nor the sacrum anchor the count (``info["decline"]``)."""
    lowest = next((s for s in segs if s.complete), None)
    if "decline" not in info and lowest is not None and lowest.ribs.get("leaving", 0.0) > 0:
        info["decline"] = ("coverage ends at T12 (no rib-free vertebra below the last rib-bearing one; "
                           "its ribs leave the coverage)")
    if "decline" not in info:
        info["decline"] = ("no level anchor in coverage (no rib-bearing vertebra with a rib-free one "
                           "below it, no sacrum)")


def _labels_from(l1: int, n: int) -> dict[int, str]:
    """Level names of segment indices ``0 .. n-1`` when L1 is segment ``l1`` (index ``l1 + k`` is ``k``
    levels above L1; segments below S1, the sacrum and coccyx, get no label)."""
    pos_l1 = _ORDER.index("L1")
    return {i: _ORDER[pos_l1 - (i - l1)] for i in range(n) if 0 <= pos_l1 - (i - l1) < len(_ORDER)}


def _checked_sacral_count(segs: list[Segment], l1_sac: int | None, info: dict[str, Any],
                          vote: Callable[[tuple[int, int]], int | None], dz: float,
                          crest: int | None = None) -> int | None:
    """Check a count from the sacrum alone (no 12th rib in view); ``None`` (and ``info["decline"]``) when
    it cannot be trusted.

    With no rib to check it, the sacral count is used only when every body it
    counted from L4 to L1 looks like a single vertebra (:func:`_regular_between`:
    a body split in two, or two merged, shifts it by a level; their median
    height at least :data:`MIN_LUMBAR_BODY_MM`: all split alike) and the iliac crests, when in
    view, do not put L4 one level away from where the count puts it (a
    lumbarised S1 or a sacralised L5 shifts the count; the crests sit with the
    pelvis). A crest that agrees is noted in ``info["crest_vote"]``. Crests
    in view more than :data:`CREST_SACRAL_MAX_MM` *above* where the count
    puts them (:func:`_crest_offset`) decline it too, even when the bodies
    are too irregular for the crests to vote: the count's L4 is too low (a
    body split in two, a lumbarised S1). Crests far below are not used: a
    faint iliac wing found only from its thicker lower part reads low.
    """
    if l1_sac is None:
        return None
    # L5 itself is left out: its tilted disc with S1 spreads over thick slices and shortens it
    s1 = l1_sac - 5
    counted = [segs[i] for i in range(max(0, s1 + 2), min(l1_sac, len(segs) - 1) + 1)]
    # at thick slices a disc can take one more slice from a body than from its neighbour
    slack = 1 if dz >= THICK_SLICE_MM else 0
    lumbar = [sg.n_slices * dz for sg in counted if sg.complete]
    if not _regular_between(segs, s1 + 2, l1_sac, slack) or (
            lumbar and float(np.median(lumbar)) < MIN_LUMBAR_BODY_MM):
        heights = ", ".join(f"{sg.n_slices * dz:.0f}" for sg in counted)
        info["decline"] = ("only the sacrum anchors the count and a body between it and L1 looks split or "
                           f"merged (heights from L4 upward: {heights} mm): "
                           "the levels cannot be numbered with confidence")
        return None
    for other, what in ((l1_sac + 1, "a lumbarised S1"), (l1_sac - 1, "a sacralised L5")):
        if vote((l1_sac, other)) == other:
            info["transitional"] = f"possible {what[2:]} (sacral count and iliac crests disagree)"
            info["decline"] = (f"only the sacrum anchors the count and the iliac crests put L4 one level "
                               f"{'higher' if other > l1_sac else 'lower'} than it does ({what}?); no 12th rib "
                               "in view to decide, so the levels cannot be numbered with confidence")
            return None
    off = _crest_offset(segs, l1_sac, crest, dz) if crest is not None else None
    if off is not None and off > CREST_SACRAL_MAX_MM:
        info["decline"] = (f"only the sacrum anchors the count and the iliac crests lie {off:.0f} mm above "
                           "where it puts L4 (a body split in two, or a lumbarised S1): the levels cannot be "
                           "numbered with confidence")
        return None
    return l1_sac


def _regular_between(segs: list[Segment], lo: int, hi: int, slack: int = 0) -> bool:
    """Whether the bodies between segment ``lo`` and ``hi`` (inclusive) look like single vertebrae.

    Each must be at least :data:`SPLIT_RATIO` as tall as the tallest of them
    (``slack`` slices added to the shortest): a lumbar body split in two by a
    false disc leaves two short pieces.
    """
    lo = max(0, lo)
    heights = [segs[i].n_slices for i in range(lo, min(hi, len(segs) - 1) + 1) if segs[i].complete]
    return bool(heights) and min(heights) + slack >= SPLIT_RATIO * max(heights)


#: a count from the sacrum alone is declined when the iliac crests lie further than this (mm) above
#: where it puts them (about two thirds of a lumbar level: crests vary between the L3-L4 disc and L5)
CREST_SACRAL_MAX_MM = 20.0
#: the crests must lie this much (mm) nearer one candidate's expected crest level to break a tie ...
CREST_MARGIN_MM = 8.0
#: ... and within this distance (mm) of it: lateral bone far from both expected levels is not a crest
#: that counts (a crest at the top of L5, or bone beside S1 only)
CREST_MAX_MM = 10.0


def _crest_offset(segs: list[Segment], l1: int, crest: int, dz: float) -> float | None:
    """Height (mm) of the iliac crests above where L1 at segment ``l1`` puts them (negative: below),
    ``None`` if L4 is not in view.

    The expected crest level is halfway between the centre of that count's L4
    (three segments lower) and its disc with L5.
    """
    l4, l5 = l1 - 3, l1 - 4
    if not 0 <= l4 < len(segs):
        return None
    centre = 0.5 * (segs[l4].lo + segs[l4].hi)
    disc = 0.5 * (segs[l4].lo + segs[l5].hi) if l5 >= 0 else float(segs[l4].lo)
    return (crest - 0.5 * (centre + disc)) * dz


def _crest_vote(segs: list[Segment], candidates: tuple[int, int], crest: int, dz: float,
                info: dict[str, Any]) -> int | None:
    """The candidate L1 index whose L4 lies where the iliac crests are, or ``None`` when unclear.

    The top of the iliac crests lies at the lower half of L4 or the L4-L5
    disc in most adults (the intercristal line used to count lumbar levels
    at the bedside); it sits with the pelvis, independent of the rib count
    and of whether S1 is fused. Each candidate L1 index puts its L4 three
    segments lower; its expected crest level is halfway between that L4's
    centre and its disc with L5. The nearer candidate wins when it is
    nearer by at least :data:`CREST_MARGIN_MM` and lies within
    :data:`CREST_MAX_MM` of the crests.
    """
    dist = {}
    for c in candidates:
        d = _crest_offset(segs, c, crest, dz)
        if d is None:
            return None
        dist[c] = abs(d)
    best = min(dist, key=dist.get)
    other = max(dist, key=dist.get)
    info["crest_vote"] = {"candidate_l1_segments": list(candidates),
                          "distance_mm": [round(dist[c], 1) for c in candidates]}
    if dist[other] - dist[best] < CREST_MARGIN_MM or dist[best] > CREST_MAX_MM:
        return None
    info["crest_vote"]["agrees_with_segment"] = best
    return best


def _combine_anchors(segs: list[Segment], l1_rib: int | None, l1_sac: int | None, info: dict[str, Any], *,
                     sacral_count_regular: bool = False, crest_pick: int | None = None) -> tuple[int, float]:
    """L1's segment index and the labelling confidence from the two anchors.

    Agreement gives high confidence, one anchor a lower one. When they
    disagree by one level the likelier anatomy decides (rates of
    clinical-physics.md section 7), with a low confidence and the
    transitional anatomy named in ``info["transitional"]``:

    * the sacral count puts L1 one vertebra *lower* than the ribs: a 12th rib
      pair too short or faint to be seen (hypoplastic 12th ribs, 12.6 %) is
      likelier than a lumbarised S1 (4.0 %): the sacral count is used, if the
      bodies it counted look like vertebrae (``sacral_count_regular``,
      :func:`_regular_between`: a tall body split in two also adds a level);
    * the sacral count puts L1 one vertebra *higher*: a sacralised L5
      (12.3 %) is likelier than a lumbar rib (1.5 %): the rib count is used.

    When the iliac crests side with one of the two counts (``crest_pick``,
    :func:`_crest_vote`), that count is used instead of the rates.

    A disagreement of two or more levels is not resolved (``l1 = None`` is
    never returned; the caller declines on ``info["decline"]``).
    """
    short = "short_12th_rib" in info or "lumbar_rib" in info
    if l1_rib is not None and l1_sac is not None:
        if l1_rib == l1_sac:
            return l1_rib, (0.9 if short else 0.95)
        d = l1_sac - l1_rib
        if abs(d) >= 2:
            info["decline"] = (f"rib count and sacral count disagree by {abs(d)} levels: "
                               "the levels cannot be numbered with confidence")
            info["warning"] = info["decline"]
            return l1_rib, 0.05
        if crest_pick is not None:
            return _crest_decides(segs, l1_rib, l1_sac, crest_pick, info)
        if d < 0 and not short and sacral_count_regular:
            info.setdefault("transitional", "12th rib pair not seen (hypoplastic 12th ribs) or lumbarised S1")
            info["warning"] = ("rib count and sacral count disagree by one level: labelled from the sacrum "
                               "(a hypoplastic 12th rib pair is three times as common as a lumbarised S1)")
            return l1_sac, 0.5
        info.setdefault("transitional", "sacralised L5 (4 free lumbar vertebrae above the sacrum)" if d > 0
                        else "lumbarised S1 (6 free lumbar-type vertebrae above the sacrum)")
        info["warning"] = (f"rib count and sacral count disagree by one level ({info['transitional']}): "
                           "labelled from the ribs")
        return l1_rib, 0.5
    if l1_rib is not None:
        ra = info.get("rib_anchor", {})
        conf = 0.85 if ra.get("both_sides") else 0.75
        conf -= 0.1 * ra.get("bridged_gaps", 0) + 0.05 * min(2, ra.get("ignored_lower_hits", 0))
        if "warning_short_rib" in info:
            conf -= 0.15
        return l1_rib, conf
    assert l1_sac is not None
    agree = "agrees_with_segment" in info.get("crest_vote", {})
    return l1_sac, (0.5 if "transitional" in info else 0.75 if agree else 0.7)


def _crest_decides(segs: list[Segment], l1_rib: int, l1_sac: int, pick: int, info: dict[str, Any]
                   ) -> tuple[int, float]:
    """L1 and confidence when the iliac crests side with one of two counts one level apart."""
    lower = l1_sac < l1_rib  # the sacral count puts L1 one vertebra lower than the ribs
    extra = l1_rib - 5  # with ``lower``: the vertebra between the sacrum and the ribs' L5
    heights = [segs[i].n_slices for i in range(max(0, l1_rib - 4), l1_rib + 1)]
    short_extra = (lower and 0 <= extra < len(segs) and bool(heights)
                   and segs[extra].n_slices < SPLIT_RATIO * float(np.median(heights)))
    if pick == l1_rib and short_extra:
        info["transitional"] = ("a short vertebra-like piece above the sacrum (the top of S1 counted "
                                "apart, or a lumbarised S1)")
    elif pick == l1_rib:
        info["transitional"] = ("lumbarised S1 (6 free lumbar-type vertebrae above the sacrum)" if lower
                                else "sacralised L5 (4 free lumbar vertebrae above the sacrum)")
    else:
        info["transitional"] = ("12th rib pair not seen (hypoplastic 12th ribs)" if lower
                                else "rib on the first lumbar vertebra (lumbar rib, 13 rib pairs)")
    source = "ribs" if pick == l1_rib else "sacrum"
    info["warning"] = (f"rib count and sacral count disagree by one level ({info['transitional']}): "
                       f"labelled from the {source}, with which the iliac crests agree")
    return pick, 0.5


def _vertebra_location(grid: WorkGrid, col, s: Segment, label: str, conf: float) -> VertebraLocation:
    """Slice range, z range and trabecular centroid of one segment, in source terms."""
    hu = grid.hu
    n = s.n_slices
    a = s.lo + int(np.floor(0.2 * n))
    b = s.hi - int(np.floor(0.2 * n))
    pts = []
    for z in range(a, b + 1):
        by, bx, hd, hw = col.body_y[z], col.body_x[z], col.body_hd[z], col.body_hw[z]
        y0, x0 = int(max(0, by - hd)), int(max(0, bx - hw))
        win = hu[z, y0:int(by + hd) + 1, x0:int(bx + hw) + 1]
        rho = ellipse_radius(win.shape, by - y0, bx - x0, hd, hw)
        m = (rho <= 0.6) & (win < 450.0) & (win > -100.0)
        if m.sum() < 3:
            m = rho <= 0.6
        yy, xx = np.nonzero(m)
        pts.append((z, yy.mean() + y0, xx.mean() + x0, m.sum()))
    w = np.array([p[3] for p in pts], float)
    cz = float(np.average([p[0] for p in pts], weights=w))
    cy = float(np.average([p[1] for p in pts], weights=w))
    cx = float(np.average([p[2] for p in pts], weights=w))
    k, j, i = grid.to_source_index(cz, cy, cx)
    mm = grid.volume.index_to_patient(k, j, i)
    s0 = grid.source_slices(s.lo)
    s1 = grid.source_slices(s.hi)
    k_lo, k_hi = min(s0 + s1), max(s0 + s1)
    z_a = float(grid.volume.index_to_patient(k_lo, 0, 0)[2])
    z_b = float(grid.volume.index_to_patient(k_hi, 0, 0)[2])
    return VertebraLocation(
        label=label,
        slice_range=(int(k_lo), int(k_hi)),
        z_range_mm=(min(z_a, z_b), max(z_a, z_b)),
        centroid_index=(k, j, i),
        centroid_mm=(float(mm[0]), float(mm[1]), float(mm[2])),
        confidence=float(conf),
    )
