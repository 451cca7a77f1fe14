"""Protocol ``l1_axial``: DXA-equivalent L1 aBMD from one axial CT slice (Kang et al. 2023, seed ``000``).

Method
------
1. The spine localizer (shared, cached per series) finds L1; without it the
   protocol declines (``"L1 not in view"``).
2. :func:`screener.protocols.l1_axial.preprocess.preprocess_volume` picks the native
   slice with the largest enclosed L1 trabecular area, adds its nearest
   neighbour on each side, and crops/scales each as the bundle was trained
   (constants from the bundle's model card).  When the card says
   ``energy_correction`` the crops' HU are first rescaled to 120 kVp by the
   series' ``KVP`` (not in the paper, which used 120 kVp only; a card without
   the key predates the correction and runs without it).
3. The fold ensemble of :class:`screener.nets.KangRegressor` estimates the L1
   aBMD (g/cm²) of each slice, with the card's linear ``calibration`` (fitted
   on the validation predictions) applied by :meth:`screener.bundles.Bundle.predict`;
   the reported estimate is the mean over the slices (every fold's and
   slice's value is in ``details``, calibrated alike).
4. T-score with the L1 reference of :mod:`screener.references` (default Kang's 0.9747 / 0.1185 g/cm²);
   normal / abnormal at T −1.0 as in the paper, WHO grade as the category.
5. Explanation: Grad-RAM and Grad-RAMP (Kang eqs. 2-3) of the reference slice,
   averaged over the ensemble (their peaks in ``details``); what is shown is
   Grad-RAMP on the deepest feature map of at least 8 x 8 (the last
   convolution's is 2 x 2 for a 64-pixel input: too coarse to tell the body from
   the muscle beside it), fused onto the crop and burned in with the numbers (one
   overlay, on the crop's own pixel grid; the ROI in the SR outlines the crop on
   the source slice), and sent as a Parametric Map and a SEG top decile.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import structlog

from screener.domain import Volume
from screener.findings import Finding, ImageLayer, PlaneMap, RoiGeometry
from screener.protocols.base import Decision, ProtocolContext, ProtocolDeclined, axial_ct_decision
from screener.protocols.model import ModelProtocol, model_details, nearest_slice, spine_localization
from screener.series import SeriesInfo, frame_number

log = structlog.get_logger(__name__)

#: Kang et al. used 3-5 mm reconstructions; thicker slices blur the trabecular body.
MAX_THICKNESS_MM = 5.0
#: T-score below which the paper calls a sample abnormal (osteopenia or osteoporosis).
ABNORMAL_T = -1.0
#: Overlay side (pixels): the crop is resampled to this size for a readable burn-in.
OVERLAY_SIZE = 384
#: the explanation shown is Grad-RAMP on the deepest feature map at least this many pixels a side
EXPLANATION_MIN_SIDE = 8


class L1AxialProtocol(ModelProtocol):
    """Kang et al.'s L1 axial-slice BMD regressor (see module docstring)."""

    name = "l1_axial"
    routing_order = 20
    version = "1.1.0"
    bundle_name = "l1_axial"

    # ------------------------------------------------------------------ routing
    def accepts(self, info: SeriesInfo) -> Decision:
        """Axial CT volume (>= 10 slices, <= 5 mm) of a body part that can hold L1."""
        from screener.protocols.l1_attenuation.protocol import EXCLUDED_BODY_PARTS

        d = axial_ct_decision(info, max_thickness_mm=MAX_THICKNESS_MM, excluded_body_parts=EXCLUDED_BODY_PARTS)
        if not d.accepted:
            if "slice thickness" in d.reason:
                return Decision(False, f"{d.reason} (Kang et al. trained on 3-5 mm slices)")
            return d
        return Decision(True, f"axial CT, {info.n_slices} slices, {info.z_coverage_mm:.0f} mm coverage")

    # --------------------------------------------------------------------- run
    def run(self, volume: Volume, context: ProtocolContext) -> list[Finding]:
        """Estimate L1 aBMD; raises :class:`ProtocolDeclined` when L1 cannot be read."""
        import torch

        from screener import scores
        from screener.reporting import codes

        if not volume.is_axial:
            raise ProtocolDeclined("volume is not axial")
        loc = spine_localization(volume, context)
        l1 = loc.get("L1")
        if l1 is None:
            reason = loc.reason or "L1 not in view"
            raise ProtocolDeclined(reason if "L1" in reason else f"L1 not in view: {reason}")
        bundle = self.load_bundle(context)
        prep = bundle.card.get("preprocessing", {})
        size = int(bundle.input_spec.shape[-1])
        fov = float(prep.get("fov_mm", 150.0))
        # a card without the key predates the energy correction: its model saw uncorrected HU
        energy = bool(prep.get("energy_correction", False))
        kvp = context.info.kvp

        t0 = time.perf_counter()
        images, info = _inputs(volume, l1, size, fov, int(prep.get("n_neighbours", 1)), energy, kvp)
        t1 = time.perf_counter()
        per_slice = bundle.predict(images)[:, 0]
        x = torch.as_tensor(images).to(bundle.device)
        with torch.no_grad():
            raw_fold = np.array([[float(m(x).double().mean())] for m in bundle.models])
        per_fold = [float(v) for v in bundle.apply_calibration(raw_fold)[:, 0]]
        bmd = float(np.mean(per_slice))
        t2 = time.perf_counter()
        maps = _maps(bundle, x[:1])
        t3 = time.perf_counter()

        measurements, t, tref, grade = _scored(bmd, bundle, context)
        category, category_code = scores.grade_category(grade)
        k_src = nearest_slice(volume, (*volume.origin[:2], info.z_reference))
        roi = _roi(volume, info, k_src, size, fov)
        details: dict[str, Any] = {
            **model_details(bundle),
            "bmd_per_fold": per_fold,
            **_details(volume, info, images, per_slice, bundle, maps, (size, fov, kvp), (t, tref),
                       (loc.method, l1.confidence)),
        }
        finding = Finding(
            protocol=self.name, protocol_version=self.version, site="L1", site_code=codes.site_code("L1"),
            measurements=measurements, category=category, category_code=category_code,
            flags=_flags(volume, info, kvp, energy, l1.confidence), roi=roi,
            z_extent_mm=(float(min(l1.z_range_mm)), float(max(l1.z_range_mm))),
            study_uid=context.info.study_uid, series_uid=context.info.series_uid,
            referenced_sop_instance_uids=list(dict.fromkeys(
                [roi.source_sop_instance_uid] + [d["sop_instance_uid"] for d in details["bmd_per_slice"]])),
            details=details)
        finding.overlay = _overlay(volume, info, maps["fine"], fov, bmd, t, grade, len(bundle.models))
        finding.layers.append(_map_layer(volume, info, maps["fine"], k_src, bundle.bundle_id, len(bundle.models)))
        finding.plane_maps.append(PlaneMap.on(maps["fine"], {
            "origin": info.crop_origins[0], "u": info.u, "v": info.v,
            "spacing": (info.spacing_mm[0], info.spacing_mm[-1])}, "L1"))
        t4 = time.perf_counter()
        finding.details["timing_ms"] = {"preprocess": 1000 * (t1 - t0), "model": 1000 * (t2 - t1),
                                        "explain": 1000 * (t4 - t2), "explain_maps": 1000 * (t3 - t2)}
        log.info("l1_axial estimated", series_uid=context.info.series_uid, bmd=round(bmd, 3), t_score=round(t, 2))
        return [finding]


def _inputs(volume: Volume, l1: Any, size: int, fov: float, n_nb: int, energy: bool,
            kvp: float | None) -> tuple[np.ndarray, Any]:
    """The network's input crops around L1 (:func:`screener.protocols.l1_axial.preprocess.preprocess_volume`);
    a :class:`ProtocolDeclined` when L1 cannot be cropped or its crop holds no trabecular body."""
    from screener.protocols.l1_axial.preprocess import preprocess_volume

    try:
        images, info = preprocess_volume(volume, l1, size=size, fov_mm=fov, n_neighbours=n_nb,
                                         energy_correction=energy, kvp=kvp)
    except ValueError as exc:
        raise ProtocolDeclined(f"L1 not in view: {exc}") from exc
    if info.fallback:
        # the network would read a crop that holds no trabecular body (a disc, an endplate, or
        # a vertebra the localizer misplaced): decline rather than estimate from it
        raise ProtocolDeclined("the model's input would hold no L1 trabecular body: no slice in L1's "
                               "z range has a body enclosed by cortex at the localizer's centroid")
    return images, info


def _maps(bundle: Any, ref: Any) -> dict[str, np.ndarray]:
    """The reference slice's explanation maps: the paper's Grad-RAM / Grad-RAMP (last convolution)
    and the map shown and sent (overlay, Parametric Map, SEG top decile): Grad-RAMP on the deepest
    stage of at least 8 x 8 (issue 19: the last convolution's 2 x 2 cannot tell bone from muscle)."""
    from screener.explain import grad_ram, grad_ramp, grad_ramp_fine

    ramp = grad_ramp(bundle.models, ref)[0]
    fine = grad_ramp_fine(bundle.models, ref, min_side=EXPLANATION_MIN_SIDE)[0]
    ram = grad_ram(bundle.models, ref)[0]
    return {"ramp": ramp, "fine": fine, "ram": ram}


def _scored(bmd: float, bundle: Any, context: ProtocolContext) -> tuple[list[Any], float, dict, str]:
    """The BMD and T-score measurements with their caveats, the T-score, its reference and the WHO
    grade."""
    from screener import scores
    from screener.references import describe, patient_sex

    t, tref = scores.t_score_for(bmd, "L1", patient_sex(context.info.header), context.config)
    grade = scores.who_grade(t)
    abnormal = t < ABNORMAL_T
    measurements = [scores.bmd_measurement(bmd, site="L1", name="L1 BMD estimate"),
                    scores.t_score_measurement(t, site="L1", name="L1 T-score estimate", reference=tref)]
    measurements[0].caveats.append(scores.flag(
        f"L1 aBMD estimated by a deep-learning model ({bundle.bundle_id}, {len(bundle.models)}-model "
        f"ensemble; {bundle.card.get('training_data', 'training data not stated')}); not a DXA measurement"))
    measurements[1].caveats.append(scores.flag(
        f"T-score against {describe(tref)}; {'abnormal' if abnormal else 'normal'} at T {ABNORMAL_T:g} "
        "as in the paper"))
    return measurements, t, tref, grade


def _roi(volume: Volume, info: Any, k_src: int, size: int, fov: float) -> RoiGeometry:
    """The crop's outline on the source slice nearest the reference slice."""
    polygon = _crop_outline(volume, info, k_src)
    centre = np.asarray(info.crop_origins[0]) + 0.5 * (size - 1) * info.spacing_mm[0] * (
        np.asarray(info.u) + np.asarray(info.v))
    return RoiGeometry(source_sop_instance_uid=volume.sop_instance_uid(k_src),
                       source_sop_class_uid=volume.sop_class_uid(k_src),
                       polygon=polygon, centre_mm=tuple(float(c) for c in centre),
                       area_mm2=float(fov * fov), slice_index=k_src,
                       frame_number=frame_number(volume.datasets[k_src]) if volume.datasets else None)


def _flags(volume: Volume, info: Any, kvp: float | None, energy: bool, confidence: float) -> list[str]:
    """The series' warnings, the tube voltage's caveat and an uncertain level label."""
    from screener import scores

    flags = [scores.flag(w) for w in volume.warnings]
    if kvp is None:
        flags.append(scores.flag("kVp unknown: the paper used 120 kVp only"
                                 + ("; no energy correction (treated as 120 kVp)" if energy else "")))
    elif abs(kvp - 120.0) > 5.0:
        flags.append(scores.flag(f"kVp {kvp:g}: the paper used 120 kVp only; "
                                 + (f"HU rescaled to 120 kVp (x{info.extras.get('energy_scale', 1.0):.3f})"
                                    if energy else "estimate less certain")))
    if confidence < 0.7:
        flags.append(scores.flag(f"L1 level label uncertain (localizer confidence {confidence:.2f})"))
    return flags


def _details(volume: Volume, info: Any, images: np.ndarray, per_slice: np.ndarray, bundle: Any,
             maps: dict[str, np.ndarray], crop: tuple[int, float, float | None], score: tuple[float, dict],
             localizer: tuple[str, float]) -> dict[str, Any]:
    """The finding's details about its input, slices, T-score reference, calibration, explanation
    and localizer; ``crop`` is ``(size, fov, kvp)``, ``score`` ``(t, reference)``, ``localizer``
    ``(method, confidence)``."""
    from screener.uncertainty import input_stats

    size, fov, kvp = crop
    t, tref = score
    return {
        "input_stats": input_stats(images),
        "bmd_per_slice": [{"z_mm": z, "bmd": float(b),
                           "sop_instance_uid": volume.sop_instance_uid(nearest_slice(volume, (*volume.origin[:2], z)))}
                          for z, b in zip(info.z_samples, per_slice)],
        "t_score_reference": tref,
        "abnormal_t_below": ABNORMAL_T, "abnormal": bool(t < ABNORMAL_T),
        "reference_slice_z_mm": info.z_reference,
        "trabecular_area_mm2": {f"{z:.2f}": a for z, a in info.areas_mm2.items()},
        "slice_fallback": info.fallback,
        "kvp": kvp, "energy_scale": float(info.extras.get("energy_scale", 1.0)),
        "calibration": ({k: bundle.calibration[k] for k in ("kind", "fit", "slope", "intercept")
                         if k in bundle.calibration} if bundle.calibration else None),
        "explanation": {"burned_in": f"Grad-RAMP on a {EXPLANATION_MIN_SIDE}x{EXPLANATION_MIN_SIDE} feature map",
                        "grad_ram_peak_rc": _peak(maps["ram"]), "grad_ramp_peak_rc": _peak(maps["ramp"]),
                        "grad_ramp_fine_peak_rc": _peak(maps["fine"]),
                        "feature_map_px": int(size // 32)},
        "localizer": localizer[0], "localizer_confidence": localizer[1],
        "overlay_description": (f"Grad-RAMP (Kang et al. 2023, eq. 3; ensemble mean) on the deepest "
                                f"{EXPLANATION_MIN_SIDE}x{EXPLANATION_MIN_SIDE} feature map, fused onto the "
                                f"{fov:g} mm L1 crop of the reference slice"),
        "overlay_pixel_spacing_mm": [fov / OVERLAY_SIZE, fov / OVERLAY_SIZE],
    }


def _map_layer(volume: Volume, info: Any, ramp: np.ndarray, k: int, bundle_id: str, n_models: int) -> ImageLayer:
    """The reference crop's Grad-RAMP on source slice ``k``'s pixel grid (0 outside the crop), for
    the Parametric Map (:mod:`screener.reporting.pmap`)."""
    from screener.explain import map_onto_slice

    plane = map_onto_slice(ramp, info.crop_origins[0], info.u, info.v,
                           (float(info.spacing_mm[0]), float(info.spacing_mm[-1])), volume, k)
    return ImageLayer("map", "Grad-RAMP", {volume.sop_instance_uid(k): plane},
                      method=f"Grad-RAMP (Kang et al. 2023, eq. 3) on the deepest {EXPLANATION_MIN_SIDE}x"
                             f"{EXPLANATION_MIN_SIDE} feature map, mean of the {n_models}-model ensemble "
                             f"of {bundle_id}, on the model's {info.shape[0]}-pixel L1 crop")


def _peak(heat: np.ndarray) -> list[float]:
    """(row, column) of a map's maximum as fractions of the crop side."""
    j, i = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return [float(j) / heat.shape[0], float(i) / heat.shape[1]]


def _crop_outline(volume: Volume, info: Any, k: int) -> np.ndarray:
    """The crop square of sample 0 as a closed SCOORD polygon on source slice ``k`` (clipped to the image)."""
    from screener.preprocess.sampling import VolumeSampler

    rows, cols = volume.array.shape[1:]
    o = np.asarray(info.crop_origins[0], float)
    u, v = np.asarray(info.u), np.asarray(info.v)
    half = 0.5 * info.spacing_mm[0]
    side = info.shape[0] * info.spacing_mm[0]
    corners = [o - half * (u + v) + a * side * u + b * side * v for a, b in ((0, 0), (1, 0), (1, 1), (0, 1))]
    idx = VolumeSampler(volume).to_index(np.asarray(corners))  # (k, j, i) voxel indices of the corners
    pts = np.stack([idx[:, 2] + 0.5, idx[:, 1] + 0.5], axis=1)
    pts[:, 0] = np.clip(pts[:, 0], 0.0, float(cols))
    pts[:, 1] = np.clip(pts[:, 1], 0.0, float(rows))
    return np.vstack([pts, pts[:1]])


def _overlay(volume: Volume, info: Any, ramp: np.ndarray, fov: float, bmd: float, t: float, grade: str,
             n_models: int) -> np.ndarray:
    """Grad-RAMP fused onto the reference crop (resampled to :data:`OVERLAY_SIZE`) with the numbers."""
    import torch
    import torch.nn.functional as F
    from PIL import Image, ImageDraw

    from screener.explain import fuse_overlay
    from screener.preprocess.sampling import VolumeSampler
    from screener.reporting.sc import burn_text

    n = OVERLAY_SIZE
    ps = fov / n
    o = np.asarray(info.crop_origins[0], float)
    o = o - 0.5 * info.spacing_mm[0] * (np.asarray(info.u) + np.asarray(info.v)) + 0.5 * ps * (
        np.asarray(info.u) + np.asarray(info.v))
    hu = VolumeSampler(volume)(o, info.u, info.v, (n, n), (ps, ps))
    heat = F.interpolate(torch.as_tensor(ramp, dtype=torch.float32)[None, None], size=(n, n), mode="bilinear",
                         align_corners=False)[0, 0].numpy()
    rgb = fuse_overlay(hu, heat, alpha=0.4, vmin=-450.0, vmax=1050.0)
    img = Image.fromarray(rgb, mode="RGB")
    draw = ImageDraw.Draw(img)
    lines = [f"L1 BMD estimate {bmd:.3f} g/cm2", f"T-score {t:.1f}: {grade}",
             f"Grad-RAMP ({EXPLANATION_MIN_SIDE}x{EXPLANATION_MIN_SIDE}), {n_models}-model ensemble"]
    burn_text(draw, lines, 14, n)
    return np.asarray(img, dtype=np.uint8).copy()
