"""Protocol ``l1_attenuation``: trabecular attenuation of L1 on axial CT (Pickhardt).

Method (clinical-physics.md sections 1-2)
-----------------------------------------
1. A spine localizer (default :func:`screener.localizer.locate_spine`) finds
   L1; without it the protocol declines (``"L1 not in view"``).
2. On the slice through the L1 centroid the trabecular body is outlined by
   ray casting from candidate centres within 9 mm of the localizer's
   centroid: 72 rays stop at the cortex (a rise of >= 100 HU over the
   centre that peaks at >= 250 HU) or where HU drops >= 150 HU (soft tissue,
   canal); rays leaking through cortical gaps take their neighbours' radius.
   The outline with the most rays ending on cortex wins (>= 60 %, 350-2500
   mm^2), otherwise the protocol declines rather than measure soft tissue.
3. A circular ROI of 200 mm^2 (radius 8.0 mm) is placed inside that outline
   at least 1.5 mm from its edge (the cortex) and out of the posterior quarter
   of the body (basivertebral plexus), as close as possible to a point 10 %
   of the body's AP depth anterior of its centroid (anterior / central
   trabecular bone). When it does not fit, the largest circle that fits is
   used (>= 80 mm^2) and flagged; smaller bodies decline.
4. Mean and SD HU over the ROI pooled over the central slices: every slice of
   L1 whose centre lies within max(3 mm, one slice spacing) of the ROI
   slice (1.25 mm slices: 5 slices; 2.5-5 mm: 3). Per-slice means are in
   ``details``. A neighbour slice is dropped when > 10 % of its ROI pixels
   fall outside the trabecular HU range (endplate, disc).
5. Category from the Pickhardt thresholds on the categorised value (raw mean,
   minus ``config.contrast_adjust_hu`` on contrast-enhanced CT): <= 110 HU
   likely osteoporosis, >= 160 HU likely normal, between indeterminate;
   <= 135 HU adds the risk flag. Non-120 kVp qualifies the category (flag).
6. vBMD estimate (mg/cm^3) = categorised HU / (HU per mg/cm^3 of
   hydroxyapatite), 1.33 at 120 kVp (~70 keV, i.e. 0.75 x HU), 1.66 at 100
   and 1.09 at 140 kVp, interpolated in kVp and clamped outside 100-140;
   a phantomless estimate, flagged as such.

Demographics are never used, so none is ever defaulted.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import structlog
from scipy import ndimage

from screener.domain import SpineLocalization, Volume
from screener.findings import Finding, Measurement, RoiGeometry
from screener.protocols.base import Decision, Protocol, ProtocolContext, ProtocolDeclined, \
    axial_ct_decision
from screener.reporting import codes
from screener.series import SeriesInfo, frame_number

log = structlog.get_logger(__name__)

Localizer = Callable[[Volume], SpineLocalization]

OSTEOPOROSIS_HU = 110.0
NORMAL_HU = 160.0
RISK_HU = 135.0
#: HU per mg/cm^3 hydroxyapatite by kVp (clinical-physics.md section 2: 60/70/80 keV)
HU_PER_MG = ((100.0, 1.66), (120.0, 1.33), (140.0, 1.09))
#: mean L1 HU by kVp, cohort > 60 y (clinical-physics.md section 1)
KVP_MEANS = "mean L1 148.1 HU at 100 kVp, 140.9 at 120, 131.3 at 140"

EXCLUDED_BODY_PARTS = frozenset({"HEAD", "BRAIN", "SKULL", "NECK", "CSPINE", "HAND", "WRIST",
                                 "FOOT", "ANKLE", "KNEE", "ELBOW", "SHOULDER", "ARM", "LEG",
                                 "EXTREMITY", "HEART", "IAC", "ORBIT", "SINUS"})


def categorize(hu: float) -> str:
    """Pickhardt category of an L1 attenuation (HU at 120 kVp, unenhanced-equivalent)."""
    if hu <= OSTEOPOROSIS_HU:
        return "likely osteoporosis"
    if hu >= NORMAL_HU:
        return "likely normal"
    return "indeterminate"


def hu_per_mg(kvp: float | None) -> float:
    """HU per mg/cm^3 hydroxyapatite at a tube voltage (120 kVp when unknown)."""
    k = 120.0 if kvp is None else float(kvp)
    xs, ys = zip(*HU_PER_MG)
    return float(np.interp(k, xs, ys))


def _disk(radius_px: tuple[float, float]) -> np.ndarray:
    ry, rx = radius_px
    ny, nx = int(np.ceil(ry)), int(np.ceil(rx))
    yy, xx = np.mgrid[-ny:ny + 1, -nx:nx + 1]
    return (yy / max(ry, 1e-6)) ** 2 + (xx / max(rx, 1e-6)) ** 2 <= 1.0


class L1AttenuationProtocol(Protocol):
    """Pickhardt L1 trabecular attenuation screening (see module docstring).

    Parameters
    ----------
    localizer : callable, optional
        ``Volume -> SpineLocalization``; default :func:`screener.localizer.locate_spine`.
    roi_area_mm2 : float
        Target ROI area (200 mm^2).
    min_roi_area_mm2 : float
        Smallest acceptable ROI when the body is small (flagged).
    edge_margin_mm : float
        Minimum distance of the ROI from the trabecular outline (cortex).
    slab_half_mm : float
        Half-thickness of the slab of central slices averaged.
    """

    name = "l1_attenuation"
    version = "0.1.0"

    def __init__(self, localizer: Localizer | None = None, *, roi_area_mm2: float = 200.0,
                 min_roi_area_mm2: float = 80.0, edge_margin_mm: float = 1.5,
                 slab_half_mm: float = 3.0) -> None:
        self.localizer = localizer
        self.roi_area_mm2 = roi_area_mm2
        self.min_roi_area_mm2 = min_roi_area_mm2
        self.edge_margin_mm = edge_margin_mm
        self.slab_half_mm = slab_half_mm

    # ------------------------------------------------------------------ routing
    def accepts(self, info: SeriesInfo) -> Decision:
        """Axial CT of >= 10 slices, <= 6 mm thick, >= 20 mm coverage, plausible body part."""
        d = axial_ct_decision(info, excluded_body_parts=EXCLUDED_BODY_PARTS)
        if not d.accepted:
            return d
        return Decision(True, f"axial CT, {info.n_instances} slices, "
                              f"{info.z_coverage_mm:.0f} mm coverage")

    # --------------------------------------------------------------------- run
    def run(self, volume: Volume, context: ProtocolContext) -> list[Finding]:
        """Measure L1; raises :class:`ProtocolDeclined` when L1 cannot be measured."""
        if not volume.is_axial:
            raise ProtocolDeclined("volume is not axial")
        if self.localizer is not None:
            loc = self.localizer(volume)
        else:  # shared with the other spine protocols of this series (one localizer run)
            from screener.protocols.model import spine_localization
            loc = spine_localization(volume, context)
        l1 = loc.get("L1")
        if l1 is None:
            reason = loc.reason or "L1 not in view"
            raise ProtocolDeclined(reason if "L1" in reason else f"L1 not in view: {reason}")
        n = volume.array.shape[0]
        k_lo, k_hi = (max(0, int(l1.slice_range[0])), min(n - 1, int(l1.slice_range[1])))
        k_mid = int(np.clip(round(float(l1.centroid_index[0])), k_lo, k_hi))
        _, dj, di = volume.spacing
        img = volume.array[k_mid].astype(np.float32)
        smooth = ndimage.gaussian_filter(img, sigma=(1.0 / dj, 1.0 / di))
        seed = (float(l1.centroid_index[1]), float(l1.centroid_index[2]))
        sharp = ndimage.gaussian_filter(img, sigma=(0.5 / dj, 0.5 / di))
        body, thr_hi, thr_lo = self._trabecular_outline(smooth, seed, (dj, di), sharp)

        roi_mask, centre, radius_mm, shrunk = self._place_roi(body, volume, (dj, di))
        # pooled statistics over the central slab
        z = volume.slice_positions()
        dz = abs(volume.spacing[0])
        half = max(self.slab_half_mm, dz * 1.01)
        slab, per_slice = [], []
        for k in range(k_lo, k_hi + 1):
            if abs(float((z[k] - z[k_mid]) @ volume.direction[:, 2])) > half:
                continue
            vals = volume.array[k][roi_mask]
            sm = ndimage.gaussian_filter(volume.array[k], sigma=(1.0 / dj, 1.0 / di))[roi_mask]
            outside = np.mean((sm >= thr_hi) | (sm <= thr_lo))
            if k != k_mid and outside > 0.10:
                continue
            slab.append(vals)
            per_slice.append({"slice_index": k,
                              "sop_instance_uid": volume.sop_instance_uid(k),
                              "frame_number": frame_number(volume.datasets[k])
                              if volume.datasets else None,
                              "mean_hu": float(vals.mean()), "sd_hu": float(vals.std())})
        pooled = np.concatenate(slab).astype(np.float64)
        mean_hu, sd_hu = float(pooled.mean()), float(pooled.std(ddof=1)) if pooled.size > 1 else 0.0
        area_mm2 = float(roi_mask.sum() * dj * di)

        info = context.info
        flags: list[str] = list(volume.warnings)
        measurements = [
            Measurement("L1 attenuation mean", mean_hu, codes.UNIT_HU[0], codes.ATTENUATION,
                        codes.UNIT_HU[1], derivation=codes.MEAN),
            Measurement("L1 attenuation SD", sd_hu, codes.UNIT_HU[0], codes.ATTENUATION,
                        codes.UNIT_HU[1], derivation=codes.STANDARD_DEVIATION),
        ]
        cat_hu = mean_hu
        if info.contrast_enhanced:
            adj = float(context.config.contrast_adjust_hu)
            cat_hu = mean_hu - adj
            flags.append(f"contrast-enhanced ({info.contrast_agent.strip()}): L1 reads ~+11 HU "
                         f"higher (Pickhardt 2016); category uses {mean_hu:.1f} - {adj:g} = "
                         f"{cat_hu:.1f} HU")
            measurements.append(Measurement("L1 attenuation mean, contrast-adjusted", cat_hu,
                                            codes.UNIT_HU[0], codes.HU_ADJUSTED, codes.UNIT_HU[1],
                                            derivation=codes.MEAN))
        category = categorize(cat_hu)
        qualifier = ""
        if info.kvp is None:
            qualifier = "kVp unknown"
            flags.append(f"kVp unknown: thresholds assume 120 kVp ({KVP_MEANS}); category "
                         "qualified")
        elif abs(info.kvp - 120.0) > 5.0:
            qualifier = f"kVp {info.kvp:g}"
            flags.append(f"kVp {info.kvp:g}: thresholds assume 120 kVp ({KVP_MEANS}); "
                         "category qualified")
        if cat_hu <= RISK_HU:
            flags.append(f"L1 {cat_hu:.0f} HU <= 135 HU: below the risk-of-osteoporosis threshold")
        slope = hu_per_mg(info.kvp)
        vbmd = cat_hu / slope
        measurements.append(Measurement("L1 vBMD estimate", vbmd, codes.UNIT_MG_CM3[0], codes.VBMD,
                                        codes.UNIT_MG_CM3[1]))
        kvp_txt = f"{info.kvp:g}" if info.kvp is not None else "unknown (120 assumed)"
        if info.kvp is not None and not HU_PER_MG[0][0] <= info.kvp <= HU_PER_MG[-1][0]:
            kvp_txt += f", outside the {HU_PER_MG[0][0]:g}-{HU_PER_MG[-1][0]:g} kVp table: clamped"
        source = "contrast-adjusted HU" if info.contrast_enhanced else "HU"
        flags.append(f"vBMD is an estimate: {1 / slope:.2f} mg/cm3 per {source} (hydroxyapatite, "
                     f"kVp {kvp_txt}), not a calibrated QCT measurement")
        measurements.append(Measurement("ROI area", area_mm2, codes.UNIT_MM2[0], codes.AREA,
                                        codes.UNIT_MM2[1]))
        if shrunk:
            flags.append(f"ROI shrunk to {area_mm2:.0f} mm2 (the trabecular body is too small "
                         f"for {self.roi_area_mm2:.0f} mm2)")
        if l1.confidence < 0.7:
            flags.append(f"L1 level label uncertain (localizer confidence {l1.confidence:.2f})")

        polygon = _circle_polygon(centre, radius_mm, (dj, di))
        centre_mm = volume.index_to_patient(k_mid, centre[0], centre[1])
        roi = RoiGeometry(source_sop_instance_uid=volume.sop_instance_uid(k_mid),
                          source_sop_class_uid=volume.sop_class_uid(k_mid),
                          polygon=polygon, centre_mm=tuple(float(v) for v in centre_mm),
                          area_mm2=area_mm2, slice_index=k_mid,
                          frame_number=frame_number(volume.datasets[k_mid])
                          if volume.datasets else None)
        finding = Finding(
            protocol=self.name, protocol_version=self.version, site="L1",
            site_code=codes.site_code("L1"), measurements=measurements, category=category,
            category_code=codes.category_code(category), flags=flags, roi=roi,
            z_extent_mm=(float(min(l1.z_range_mm)), float(max(l1.z_range_mm))),
            study_uid=info.study_uid, series_uid=info.series_uid,
            referenced_sop_instance_uids=[roi.source_sop_instance_uid] + [
                p["sop_instance_uid"] for p in per_slice
                if p["sop_instance_uid"] != roi.source_sop_instance_uid],
            details={"per_slice": per_slice, "roi_radius_mm": radius_mm,
                     "categorised_hu": cat_hu, "category_qualifier": qualifier,
                     "hu_per_mg_cm3": slope, "cortex_threshold_hu": thr_hi,
                     "localizer": loc.method, "localizer_confidence": l1.confidence,
                     "pooling": "ROI pixels pooled over the central slices listed in per_slice"},
        )
        finding.overlay = self._overlay(volume, k_mid, polygon, finding, mean_hu, sd_hu, cat_hu)
        log.info("l1 measured", series_uid=info.series_uid, mean_hu=round(mean_hu, 1),
                 category=category, slices=len(per_slice), roi_mm2=round(area_mm2))
        return [finding]

    # -------------------------------------------------------------- internals
    def _trabecular_outline(self, smooth: np.ndarray, seed: tuple[float, float],
                            spacing: tuple[float, float],
                            sharp: np.ndarray | None = None) -> tuple[np.ndarray, float, float]:
        """Outline the trabecular vertebral body around ``seed`` (row, column) by ray casting.

        From candidate centres on a 3 mm grid within 9 mm of the seed, 72 rays
        are cast outwards; each stops where the 1 mm smoothed HU first rises to
        the centre's trabecular value (median within 5 mm) + 100 HU, or falls
        150 HU below it (soft tissue, fat, canal). A rise counts as cortex when
        it peaks at >= 250 HU and >= centre + 150 HU within 3 mm (read on a
        0.5 mm smoothed image so that a thin cortex keeps its contrast). Rays
        that find no boundary within 35 mm leaked through a gap and take their
        neighbours' radius; radii are median-filtered over 35 degrees. A
        candidate's score is the fraction of rays ending on cortex minus 0.02
        per mm of distance from the seed; it must reach 0.6 with an outline of
        350-2500 mm^2. The winner is re-cast from its own centroid (up to 3
        times). On the shared real CT, seeds up to ~15 mm off the body centre
        gave the same ROI mean within 1 HU; seeds in soft tissue declined.

        Returns
        -------
        body : numpy.ndarray
            Boolean mask of the outlined trabecular body.
        cortex_hu, low_hu : float
            Body median + 100 HU and - 150 HU, used to drop neighbour slices
            whose ROI hits endplate or disc.
        """
        dj, di = spacing
        rows, cols = smooth.shape
        if not (0 <= seed[0] < rows and 0 <= seed[1] < cols):
            raise ProtocolDeclined("L1 centroid from the localizer lies outside the image")
        best: tuple[float, tuple[float, float], np.ndarray] | None = None
        offsets = [(a, b) for a in np.arange(-9.0, 9.01, 3.0) for b in np.arange(-9.0, 9.01, 3.0)
                   if a * a + b * b <= 81.0 + 1e-6]
        for oj, oi in offsets:
            c = (seed[0] + oj / dj, seed[1] + oi / di)
            got = _cast_outline(smooth, c, spacing, sharp)
            if got is None or not _plausible_area(got[1]):
                continue
            score = got[0] - 0.02 * float(np.hypot(oj, oi))
            if best is None or score > best[0] + 1e-9:
                best = (score, c, got[1])
        if best is None or best[0] < MIN_ENCLOSURE:
            raise ProtocolDeclined("could not outline the L1 vertebral body around the localizer's "
                                   "centroid (no region bounded by cortex within 9 mm)")
        centre, radii = best[1], best[2]
        for _ in range(3):  # re-cast from the outline's own centroid while that is sound
            jj, ii = np.nonzero(_outline_mask(smooth.shape, centre, radii, spacing))
            c = (float(jj.mean()), float(ii.mean()))
            if np.hypot((c[0] - centre[0]) * dj, (c[1] - centre[1]) * di) < 0.5:
                break
            got = _cast_outline(smooth, c, spacing, sharp)
            if got is None or got[0] < MIN_ENCLOSURE or not _plausible_area(got[1]):
                break
            centre, radii = c, got[2 - 1]
        body = _outline_mask(smooth.shape, centre, radii, spacing)
        t_body = float(np.median(smooth[body]))
        return body, t_body + CORTEX_STEP_HU, t_body - DROP_STEP_HU

    def _place_roi(self, body: np.ndarray, volume: Volume, spacing: tuple[float, float]
                   ) -> tuple[np.ndarray, tuple[float, float], float, bool]:
        """Circle of ``roi_area_mm2`` inside ``body`` (see module docstring, step 3).

        Returns the ROI mask, its centre (row, column), radius (mm) and
        whether it had to shrink.
        """
        dj, di = spacing
        r_target = float(np.sqrt(self.roi_area_mm2 / np.pi))
        # anterior direction in (row, column) mm space
        ant = np.array([0.0, -1.0, 0.0])
        a = np.array([ant @ volume.direction[:, 1], ant @ volume.direction[:, 0]])
        a = a / (np.linalg.norm(a) or 1.0)
        jj, ii = np.nonzero(body)
        cj, ci = jj.mean() * dj, ii.mean() * di
        proj = jj * dj * a[0] + ii * di * a[1]
        ap_depth = float(proj.max() - proj.min())
        tj, ti = cj + 0.10 * ap_depth * a[0], ci + 0.10 * ap_depth * a[1]
        rows, cols = body.shape
        gj, gi = np.mgrid[:rows, :cols]
        # the posterior quarter of the body holds the basivertebral plexus: keep out
        ant_offset = (gj * dj - cj) * a[0] + (gi * di - ci) * a[1]
        allowed = body & (ant_offset >= -0.25 * ap_depth)
        dist = ndimage.distance_transform_edt(allowed, sampling=(dj, di))
        shrunk = False
        feasible = dist >= r_target + self.edge_margin_mm
        radius = r_target
        if not feasible.any():
            best = float(dist.max())
            radius = best - self.edge_margin_mm
            if np.pi * radius ** 2 < self.min_roi_area_mm2:
                raise ProtocolDeclined(
                    f"L1 trabecular body too small for a {self.min_roi_area_mm2:.0f} mm2 ROI "
                    f"(largest inscribed radius {best:.1f} mm)")
            feasible = dist >= best - 1e-6
            shrunk = True
        fj, fi = np.nonzero(feasible)
        d2 = (fj * dj - tj) ** 2 + (fi * di - ti) ** 2
        b = int(np.argmin(d2))
        centre = (float(fj[b]), float(fi[b]))
        roi = ((gj - centre[0]) * dj) ** 2 + ((gi - centre[1]) * di) ** 2 <= radius ** 2
        return roi, centre, float(radius), shrunk

    def _overlay(self, volume: Volume, k: int, polygon: np.ndarray, finding: Finding,
                 mean_hu: float, sd_hu: float, cat_hu: float) -> np.ndarray | None:
        try:
            from screener.reporting.sc import render_overlay
        except ImportError:  # pragma: no cover
            return None
        lines = [f"L1 {mean_hu:.0f} HU (SD {sd_hu:.0f}), ROI {finding.roi.area_mm2:.0f} mm2"
                 if finding.roi else f"L1 {mean_hu:.0f} HU"]
        if abs(cat_hu - mean_hu) > 1e-6:
            lines.append(f"contrast-adjusted {cat_hu:.0f} HU")
        qual = finding.details.get("category_qualifier")
        lines.append(f"{finding.category}" + (f" ({qual})" if qual else ""))
        lines.append(f"vBMD ~{finding.measurement('L1 vBMD estimate').value:.0f} mg/cm3 (estimate)")
        return render_overlay(volume.array[k], polygon, lines)


CORTEX_STEP_HU = 100.0   # a ray meets cortex where HU rises this much above the centre
DROP_STEP_HU = 150.0     # ... or leaves bone where HU falls this much below it
N_RAYS = 72
CORTEX_MIN_HU = 250.0        # a cortex hit peaks at least this high (0.5 mm smoothed) ...
CORTEX_PEAK_STEP_HU = 150.0  # ... and this much above the centre, within 3 mm of the hit
RISE_MIN_HU = 0.0
MIN_ENCLOSURE = 0.6          # fraction of rays that must end on cortex (minus distance penalty)
CENTRE_RADIUS_MM = 5.0       # the centre's trabecular value: median within this radius


def _cast_outline(smooth: np.ndarray, centre: tuple[float, float], spacing: tuple[float, float],
                  sharp: np.ndarray | None = None, r_max_mm: float = 35.0
                  ) -> tuple[float, np.ndarray, float] | None:
    """Cast rays from ``centre``; returns (fraction of rays bounded, radii in mm, centre HU)."""
    dj, di = spacing
    rows, cols = smooth.shape
    if not (2 <= centre[0] < rows - 2 and 2 <= centre[1] < cols - 2):
        return None
    jj, ii = np.ogrid[:rows, :cols]
    near = ((jj - centre[0]) * dj) ** 2 + ((ii - centre[1]) * di) ** 2 <= CENTRE_RADIUS_MM ** 2
    t_c = float(np.median(smooth[near]))
    if not -30.0 <= t_c <= 700.0:
        return None
    theta = np.linspace(0.0, 2 * np.pi, N_RAYS, endpoint=False)
    r = np.arange(1.0, r_max_mm + 1e-6, 0.5)
    pj = centre[0] + np.outer(np.sin(theta), r) / dj
    pi_ = centre[1] + np.outer(np.cos(theta), r) / di
    vals = ndimage.map_coordinates(smooth, [pj, pi_], order=1, mode="nearest")
    rise = vals >= max(t_c + CORTEX_STEP_HU, RISE_MIN_HU)
    stop = rise | (vals <= t_c - DROP_STEP_HU)
    stop[:, :2] = False  # ignore the first 2 mm (noise at the centre)
    hit = stop.any(axis=1)
    first = np.where(hit, stop.argmax(axis=1), len(r) - 1)
    radii = r[first].astype(float)
    # stopped by cortex (not soft tissue): the rise peaks at bone values within 3 mm
    idx = np.clip(first[:, None] + np.arange(7)[None, :], 0, len(r) - 1)
    pvals = vals if sharp is None else \
        ndimage.map_coordinates(sharp, [pj, pi_], order=1, mode="nearest")
    peak = pvals[np.arange(N_RAYS)[:, None], idx].max(axis=1)
    cortex = hit & rise[np.arange(N_RAYS), first] & \
        (peak >= max(t_c + CORTEX_PEAK_STEP_HU, CORTEX_MIN_HU))
    if hit.sum() < N_RAYS // 2:
        return float(cortex.mean()), radii, t_c
    # leaked rays take the median radius of their bounded neighbours
    good = np.flatnonzero(hit)
    for k in np.flatnonzero(~hit):
        d = np.abs((good - k + N_RAYS // 2) % N_RAYS - N_RAYS // 2)
        radii[k] = float(np.median(radii[good[np.argsort(d)[:6]]]))
    ext = np.concatenate([radii[-3:], radii, radii[:3]])
    smooth_r = np.array([np.median(ext[k:k + 7]) for k in range(N_RAYS)])
    return float(cortex.mean()), smooth_r, t_c


def _plausible_area(radii: np.ndarray) -> bool:
    """A trabecular L1 cross-section of 350-2500 mm^2 (canal and small vessels are smaller)."""
    area = 0.5 * float(np.sum(radii ** 2)) * (2 * np.pi / len(radii))
    return 350.0 <= area <= 2500.0


def _outline_mask(shape: tuple[int, int], centre: tuple[float, float], radii: np.ndarray,
                  spacing: tuple[float, float]) -> np.ndarray:
    """Pixels inside the star-shaped outline ``radii`` (mm, one per ray) around ``centre``."""
    dj, di = spacing
    rows, cols = shape
    jj, ii = np.mgrid[:rows, :cols]
    y = (jj - centre[0]) * dj
    x = (ii - centre[1]) * di
    ang = np.mod(np.arctan2(y, x), 2 * np.pi)
    step = 2 * np.pi / len(radii)
    k = ang / step
    k0 = np.floor(k).astype(int) % len(radii)
    k1 = (k0 + 1) % len(radii)
    w = k - np.floor(k)
    rr = radii[k0] * (1 - w) + radii[k1] * w
    return np.hypot(x, y) < rr


def _circle_polygon(centre: tuple[float, float], radius_mm: float,
                    spacing: tuple[float, float], n: int = 48) -> np.ndarray:
    """Closed polygon (column, row) in SCOORD image coordinates (pixel centre = index + 0.5)."""
    dj, di = spacing
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    cols = centre[1] + 0.5 + radius_mm / di * np.cos(t)
    rows = centre[0] + 0.5 + radius_mm / dj * np.sin(t)
    pts = np.stack([cols, rows], axis=1)
    return np.vstack([pts, pts[:1]])
