"""Protocol ``l1_attenuation``: trabecular attenuation of L1 on axial CT (Pickhardt).

Method (clinical-physics.md sections 1-2)
-----------------------------------------
1. A spine localizer (default :func:`screener.localizer.locate_spine`) finds
   L1; without it the protocol declines (``"L1 not in view"``).
2. The L1 body is segmented in 3-D around the localizer's centroid
   (:func:`screener.vertebral_body.segment_body`): the region enclosed by the
   cortex, with thresholds adapted to the body's own trabecular HU (an
   osteoporotic 20-100 HU body is found the same way as a dense one), gaps in
   the cortex closed, a ray outline where a coarse (3 mm) pixel grid leaves the
   cortex too sparse to enclose anything; it is followed slice by slice until
   an endplate or disc ends it. 0.5-3 mm pixels, 0.6-6 mm slices.
3. The trabecular ROI (:func:`screener.vertebral_body.place_trabecular_roi`)
   lies on the slices through the middle third of the body's height (one
   slice at 6 mm, ~3 at 2.5 mm, ~8 at 1 mm), on each the body eroded 1.5 mm
   (+ half a pixel) from the cortex, without the posterior quarter of its depth
   (basivertebral vein); its voxels far from the ROI median (robust z > 3.5 on a
   0.8 mm smoothed image, >= 60 HU) are outliers, and outlier groups of
   >= 4 mm^3 are focal lesions (bone island, Schmorl node, lytic focus) left out
   with a 2 mm margin and flagged.
4. Mean, SD and median HU over the ROI voxels of all those slices (raw HU);
   ``details`` lists the slices used, the per-slice means and ROI areas, the
   excluded fraction and any focus. ``ROI area`` and the SR polyline are the
   ROI on the representative (middle) slice; a body whose ROI there is under
   80 mm^2 declines, under 200 mm^2 is flagged (``ROI shrunk``).
5. Contrast from the image and the header
   (:func:`screener.contrast.assess_contrast`: aorta, IVC and kidneys beside
   the localised spine); the categorised value is the raw mean minus the
   phase's enhancement (portal-venous and delayed ``config.contrast_adjust_hu``,
   11.2 HU; arterial 0.56 of it, 6.3 HU), flagged with the phase and where it
   was read; a header that contradicts the image is flagged too.
   Category from the Pickhardt thresholds on the categorised value: <= 110 HU
   likely osteoporosis, >= 160 HU likely normal, between indeterminate;
   <= 135 HU adds the risk flag. Non-120 kVp qualifies the category (flag).
6. vBMD estimate (mg/cm^3) = categorised HU / (HU per mg/cm^3 of
   hydroxyapatite), 1.33 at 120 kVp (~70 keV, i.e. 0.75 x HU), 1.66 at 100
   and 1.09 at 140 kVp, interpolated in kVp and clamped outside 100-140;
   a phantomless estimate, flagged as such.

Declines say why in plain words: L1 not in view, no region enclosed by cortex
near the localizer's centroid, too little trabecular bone for an ROI.

Demographics are never used, so none is ever defaulted.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import structlog

from screener import contrast, vertebral_body
from screener.domain import SpineLocalization, Volume
from screener.findings import Finding, ImageLayer, Measurement, RoiGeometry
from screener.preprocess.energy import HA_HU_PER_MG, ha_hu_per_mg
from screener.protocols.base import Decision, Protocol, ProtocolContext, ProtocolDeclined, \
    axial_ct_decision
from screener.reporting import codes
from screener.series import SeriesInfo, frame_number

log = structlog.get_logger(__name__)

Localizer = Callable[[Volume], SpineLocalization]

OSTEOPOROSIS_HU = 110.0
NORMAL_HU = 160.0
RISK_HU = 135.0
#: mean L1 HU by kVp, cohort > 60 y (clinical-physics.md section 1)
KVP_MEANS = ("published cohort means, not this patient: adults over 60 read a mean L1 of 148.1 HU at "
             "100 kVp, 140.9 at 120, 131.3 at 140")

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
    """HU per mg/cm^3 hydroxyapatite at a tube voltage (120 kVp when unknown): the screener's one
    table, :func:`screener.preprocess.energy.ha_hu_per_mg` (70-150 kVp)."""
    return ha_hu_per_mg(kvp)


class L1AttenuationProtocol(Protocol):
    """Pickhardt L1 trabecular attenuation screening (see module docstring).

    Parameters
    ----------
    localizer : callable, optional
        ``Volume -> SpineLocalization``; default :func:`screener.localizer.locate_spine`.
    roi_area_mm2 : float
        ROI area (mm^2, representative slice) under which the ROI is flagged as
        shrunk (a small body).
    min_roi_area_mm2 : float
        Smallest acceptable ROI on the representative slice; below it, decline.
    edge_margin_mm : float
        Minimum distance of the ROI from the trabecular outline (inner cortex
        edge), plus half a pixel.
    """

    name = "l1_attenuation"
    routing_order = 10
    version = "0.2.0"

    def __init__(self, localizer: Localizer | None = None, *, roi_area_mm2: float = 200.0,
                 min_roi_area_mm2: float = 80.0, edge_margin_mm: float = 1.5) -> None:
        self.localizer = localizer
        self.roi_area_mm2 = roi_area_mm2
        self.min_roi_area_mm2 = min_roi_area_mm2
        self.edge_margin_mm = edge_margin_mm

    # ------------------------------------------------------------------ routing
    def accepts(self, info: SeriesInfo) -> Decision:
        """Axial CT of >= 10 slices, <= 6 mm thick, >= 20 mm coverage, plausible body part."""
        d = axial_ct_decision(info, excluded_body_parts=EXCLUDED_BODY_PARTS)
        if not d.accepted:
            return d
        return Decision(True, f"axial CT, {info.n_slices} slices, "
                              f"{info.z_coverage_mm:.0f} mm coverage")

    # --------------------------------------------------------------------- run
    def run(self, volume: Volume, context: ProtocolContext) -> list[Finding]:
        """Measure L1; raises :class:`ProtocolDeclined` when L1 cannot be measured."""
        loc, l1, seg, tr, rep = self._outline(volume, context)
        _, dj, di = volume.spacing
        rs, cs = seg.crop
        k_mid = rep.slice_index
        per_slice = _per_slice(volume, tr, rs, cs)
        mean_hu, sd_hu, median_hu = tr.mean_hu, tr.sd_hu, tr.median_hu
        area_mm2 = rep.area_mm2
        info = context.info
        flags: list[str] = list(volume.warnings)
        measurements = [
            Measurement("L1 attenuation mean", mean_hu, codes.UNIT_HU[0], codes.ATTENUATION,
                        codes.UNIT_HU[1], derivation=codes.MEAN),
            Measurement("L1 attenuation SD", sd_hu, codes.UNIT_HU[0], codes.ATTENUATION,
                        codes.UNIT_HU[1], derivation=codes.STANDARD_DEVIATION),
        ]
        cat_hu, ca, qualifier, slope = _categorised(volume, loc, context, mean_hu, measurements, flags)
        category = categorize(cat_hu)
        measurements.append(Measurement("ROI area", area_mm2, codes.UNIT_MM2[0], codes.AREA,
                                        codes.UNIT_MM2[1]))
        flags += self._roi_flags(area_mm2, tr, l1.confidence, loc.details.get("transitional"))

        roi_full = np.zeros(volume.array.shape[1:], bool)
        roi_full[rs, cs] = rep.roi
        polygon = vertebral_body.outline_polygon(roi_full)
        jj, ii = np.nonzero(roi_full)
        centre_mm = volume.index_to_patient(k_mid, float(jj.mean()), float(ii.mean()))
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
            details={"per_slice": per_slice, "median_hu": median_hu,
                     "slices_used": [p["slice_index"] for p in per_slice],
                     "roi_area_mm2_per_slice": [p["roi_area_mm2"] for p in per_slice],
                     "roi_volume_mm3": float(tr.values.size * dj * di * abs(volume.spacing[0])),
                     "excluded_fraction": float(tr.excluded_fraction), "foci": tr.foci,
                     "focus_excluded": bool(tr.foci),
                     "body_slices": [seg.first_slice, seg.last_slice],
                     "body_height_mm": seg.height_mm(abs(volume.spacing[0])),
                     "trabecular_hu_estimate": seg.trabecular_hu,
                     "categorised_hu": cat_hu, "category_qualifier": qualifier,
                     "hu_per_mg_cm3": slope, "cortex_threshold_hu": seg.cortex_threshold_hu,
                     "closing_mm": seg.closing_mm, "segmentation_notes": seg.notes,
                     "localizer": loc.method, "localizer_confidence": l1.confidence,
                     "localizer_transitional": loc.details.get("transitional"),
                     "contrast": {"phase": ca.phase, "enhanced": ca.enhanced, "source": ca.source,
                                  "confidence": ca.confidence, "evidence": ca.evidence,
                                  "header_agent": ca.header_agent, "conflict": ca.conflict,
                                  "adjustment_hu": cat_hu - mean_hu},
                     "pooling": "ROI voxels (raw HU) pooled over the mid-L1 slices in per_slice; "
                                "focal outliers excluded"},
        )
        finding.overlay = self._overlay(volume, k_mid, polygon, finding, mean_hu, sd_hu, cat_hu)
        finding.layers.append(_body_layer(volume, seg))
        log.info("l1 measured", series_uid=info.series_uid, mean_hu=round(mean_hu, 1),
                 category=category, slices=len(per_slice), roi_mm2=round(area_mm2))
        return [finding]

    def _roi_flags(self, area_mm2: float, tr: Any, confidence: float, transitional: Any) -> list[str]:
        """Caveats about the ROI (shrunk, a focal lesion left out) and an uncertain level label."""
        flags = []
        if area_mm2 < self.roi_area_mm2:
            flags.append(f"ROI shrunk to {area_mm2:.0f} mm2 on the representative slice, below "
                         f"{self.roi_area_mm2:.0f} mm2 (small trabecular body)")
        if tr.foci:
            # (worded so that no number is followed by "HU": the SR codes flags by their text)
            desc = "; ".join(f"{f['kind']} focus of {f['volume_mm3']:.0f} mm3 on slice "
                             f"{f['slice_index']} ({f['delta_hu']:+.0f} from the body's median)"
                             for f in tr.foci)
            flags.append(f"focal lesion excluded from the L1 ROI (bone island, Schmorl node or "
                         f"lytic focus): {desc}; {100 * tr.excluded_fraction:.1f} % of the ROI "
                         "left out")
        if confidence < 0.7:
            flags.append(f"L1 level label uncertain (localizer confidence {confidence:.2f}"
                         + (f"; {transitional}" if transitional else "") + ")")
        return flags

    def _outline(self, volume: Volume, context: ProtocolContext) -> tuple[SpineLocalization, Any, Any, Any, Any]:
        """L1 located, its body outlined and its trabecular ROI placed: ``(localization, L1,
        body segmentation, ROI, the representative ROI slice nearest mid-body)``; a
        :class:`ProtocolDeclined` with the reason when any step cannot be done."""
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
        try:
            seg = vertebral_body.segment_body(volume.array, volume.spacing, l1.centroid_index)
            tr = vertebral_body.place_trabecular_roi(
                volume.array, volume.spacing, seg, _anterior(volume),
                edge_margin_mm=self.edge_margin_mm)
        except vertebral_body.BodyNotFound as exc:
            raise ProtocolDeclined(f"could not outline the L1 vertebral body: {exc.reason}") \
                from None
        big = [q for q, s in enumerate(tr.slices) if s.area_mm2 >= self.min_roi_area_mm2]
        if not big:
            raise ProtocolDeclined(
                f"L1 trabecular body too small for a {self.min_roi_area_mm2:.0f} mm2 ROI (largest "
                f"ROI {max(s.area_mm2 for s in tr.slices):.0f} mm2 once the cortex margin, the "
                "posterior quarter and any focal lesion are left out)")
        # the representative slice (SR polyline, overlay): nearest mid-body among those with an ROI
        mid = 0.5 * (seg.first_slice + seg.last_slice)
        rep = tr.slices[min(big, key=lambda q: (abs(tr.slices[q].slice_index - mid), q))]
        return loc, l1, seg, tr, rep

    # -------------------------------------------------------------- internals
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



def _categorised(volume: Volume, loc: SpineLocalization, context: ProtocolContext, mean_hu: float,
                 measurements: list[Measurement], flags: list[str]) -> tuple[float, Any, str, float]:
    """The HU the Pickhardt category is read from, with what qualifies it: contrast from the image
    (adjusted by phase), the tube voltage, the vBMD estimate; the measurements and flags these add
    are appended. Returns ``(categorised HU, contrast assessment, kVp qualifier, HU per mg/cm3)``."""
    info, config = context.info, context.config
    kvp = info.kvp
    cat_hu = mean_hu
    # contrast from the image (aorta, IVC, kidneys beside the localised spine), checked
    # against the header: archives often lack ContrastBolusAgent
    ca = contrast.assess_contrast(volume, loc, info)
    if ca.enhanced:
        # config.contrast_adjust_hu is the portal-venous value; other phases scale with it
        adj = round(ca.trabecular_adjustment_hu * float(config.contrast_adjust_hu)
                    / contrast.PORTAL_VENOUS_ENHANCEMENT_HU, 1)
        cat_hu = mean_hu - adj
        agent = f"{ca.header_agent.strip()}, " if ca.header_agent.strip() else ""
        flags.append(f"contrast-enhanced ({agent}{ca.phase.replace('_', '-')} phase from the "
                     f"{ca.source}): L1 reads ~{adj:g} higher in this phase; category uses "
                     f"{mean_hu:.1f} - {adj:g} = {cat_hu:.1f} HU")
        measurements.append(Measurement("L1 attenuation mean, contrast-adjusted", cat_hu,
                                        codes.UNIT_HU[0], codes.HU_ADJUSTED, codes.UNIT_HU[1],
                                        derivation=codes.MEAN))
    if ca.conflict:
        flags.append(f"header and image disagree about contrast: {ca.conflict}")
    qualifier = ""
    if kvp is None:
        qualifier = "kVp unknown"
        flags.append(f"kVp unknown: thresholds assume 120 kVp ({KVP_MEANS}); category "
                     "qualified")
    elif abs(kvp - 120.0) > 5.0:
        qualifier = f"kVp {kvp:g}"
        flags.append(f"kVp {kvp:g}: thresholds assume 120 kVp ({KVP_MEANS}); "
                     "category qualified")
    if cat_hu <= RISK_HU:
        flags.append(f"L1 {cat_hu:.0f} HU <= 135 HU: below the risk-of-osteoporosis threshold")
    slope = hu_per_mg(kvp)
    vbmd = cat_hu / slope
    measurements.append(Measurement("L1 vBMD estimate", vbmd, codes.UNIT_MG_CM3[0], codes.VBMD,
                                    codes.UNIT_MG_CM3[1]))
    kvp_txt = f"{kvp:g}" if kvp is not None else "unknown (120 assumed)"
    if kvp is not None and not min(HA_HU_PER_MG) <= kvp <= max(HA_HU_PER_MG):
        kvp_txt += f", outside the {min(HA_HU_PER_MG):g}-{max(HA_HU_PER_MG):g} kVp table: clamped"
    source = "contrast-adjusted HU" if ca.enhanced else "HU"
    flags.append(f"vBMD is an estimate: {1 / slope:.2f} mg/cm3 per {source} (hydroxyapatite, "
                 f"kVp {kvp_txt}), not a calibrated QCT measurement")
    return cat_hu, ca, qualifier, slope


def _body_layer(volume: Volume, seg: Any) -> ImageLayer:
    """The outlined L1 trabecular body (inside the cortex) on each slice the outline walked, on the
    slices' pixel grid: a mask layer for the SEG (:mod:`screener.reporting.seg`)."""
    rs, cs = seg.crop
    planes: dict[str, np.ndarray] = {}
    for k in sorted(seg.masks):
        full = np.zeros(volume.array.shape[1:], dtype=bool)
        full[rs, cs] = seg.masks[k]
        if full.any():
            planes[volume.sop_instance_uid(k)] = full
    return ImageLayer("mask", "L1 trabecular body", planes,
                      method="the body enclosed by cortex, followed from the localizer's L1 centroid "
                             "(screener.vertebral_body.segment_body)")


def _per_slice(volume: Volume, tr: Any, rs: slice, cs: slice) -> list[dict[str, Any]]:
    """Mean, SD and area of the ROI on each slice it was placed on (the SR's per-slice record)."""
    out = []
    for s in tr.slices:
        vals = volume.array[s.slice_index, rs, cs][s.roi].astype(np.float64)
        out.append({"slice_index": s.slice_index,
                    "sop_instance_uid": volume.sop_instance_uid(s.slice_index),
                    "frame_number": frame_number(volume.datasets[s.slice_index]) if volume.datasets else None,
                    "mean_hu": float(vals.mean()) if vals.size else None,
                    "sd_hu": float(vals.std()) if vals.size else None,
                    "roi_area_mm2": s.area_mm2,
                    "excluded_fraction": float(s.excluded_fraction)})
    return out

def _anterior(volume: Volume) -> tuple[float, float]:
    """Unit (row, column) vector of the slice plane pointing to the patient's anterior (-y)."""
    ant = np.array([0.0, -1.0, 0.0])
    d = np.asarray(volume.direction, float)
    a = np.array([ant @ d[:, 1], ant @ d[:, 0]])
    a = a / (np.linalg.norm(a) or 1.0)
    return float(a[0]), float(a[1])
