"""Protocol ``femur_coronal``: normal / osteopenia / osteoporosis from both femora on coronal CT.

Ha et al. 2024 (seed 001): a 6-convolution CNN reads a 250 x 250 coronal crop of the proximal
femur (window C 500 / W 2000) together with age, sex, height, weight and BMI, and outputs the
three WHO classes of the DXA T-score.

Steps
-----
1. Headers (:meth:`FemurCoronalProtocol.accepts`): an axial CT volume (``axial_ct_decision``)
   of a body part that can contain the hips, covering at least 100 mm.
2. :func:`screener.protocols.femur_coronal.preprocess.locate_femoral_heads` finds both femoral heads or the
   protocol declines ``"femoral heads not in coverage"``; the demographics come from the DICOM
   header (PatientAge, PatientSex, PatientSize, PatientWeight) and a missing one declines with
   its name -- never defaulted.
3. :func:`screener.protocols.femur_coronal.preprocess.volume_inputs` (the function the training builder
   uses): per side a coronal crop through the femoral neck, windowed, pooled; right = channel 0,
   left mirrored = channel 1.  When the bundle card's preprocessing says ``energy_correction``
   the HU are first rescaled to 120 kVp by the series' ``KVP`` (hydroxyapatite HU-per-mg
   ratio; not in the paper, whose scans span 80-140 kVp uncorrected); a card without the key
   predates the correction and runs without it.
4. The bundle's fold ensemble gives the class probabilities (mean of the folds' softmax).
5. Grad-CAM of the predicted class (mean over the folds) on the last convolution, drawn on both
   crops side by side (patient right on the viewer's left, as radiologists view coronal CT).

One finding (site ``proximal femur``): the three probabilities (%) as measurements and the
predicted class as the category; the overlay is its secondary capture, the ROI the footprint of
the two coronal crops on the axial slice through the femoral heads.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import structlog

from screener import scores
from screener.domain import Volume
from screener.findings import Finding, PlaneMap, RoiGeometry
from screener.protocols.femur_coronal import preprocess as pp
from screener.protocols.base import Decision, ProtocolContext, ProtocolDeclined, axial_ct_decision
from screener.protocols.model import ModelProtocol, axial_rectangle_roi, model_details, nearest_slice
from screener.reporting import codes
from screener.series import SeriesInfo

log = structlog.get_logger(__name__)

__all__ = ["CLASSES", "FemurCoronalProtocol", "preprocessing_options"]

CLASSES = ("normal", "osteopenia", "osteoporosis")
#: the crops reach from 115 mm above to 85 mm below the head centre; a shorter volume cannot hold a hip
MIN_COVERAGE_MM = 100.0
EXCLUDED_BODY_PARTS = frozenset({"HEAD", "BRAIN", "SKULL", "NECK", "CSPINE", "CHEST", "THORAX", "TSPINE",
                                 "HEART", "BREAST", "HAND", "WRIST", "ELBOW", "SHOULDER", "ARM", "FOOT",
                                 "ANKLE", "KNEE", "IAC", "ORBIT", "SINUS", "LSPINE"})


def preprocessing_options(card: dict[str, Any]) -> dict[str, Any]:
    """``volume_inputs`` keyword arguments from a bundle card.

    Parameters
    ----------
    card : dict
        The bundle's model card.

    Returns
    -------
    dict
        ``energy_correction``: the card's value; ``False`` when the card predates the key (its
        model saw uncorrected HU).
    """
    p = card.get("preprocessing") or {}
    return {"energy_correction": bool(p.get("energy_correction", False))}


class FemurCoronalProtocol(ModelProtocol):
    """Ha et al. 2024 3-class grading from coronal femur crops + demographics (module docstring)."""

    name = "femur_coronal"
    routing_order = 30
    version = "1.0.0"
    bundle_name = "femur_coronal"

    # ------------------------------------------------------------------ routing
    def accepts(self, info: SeriesInfo) -> Decision:
        """Axial CT volume (<= 6 mm slices) of a body part that can hold the hips, >= 100 mm long."""
        d = axial_ct_decision(info, excluded_body_parts=frozenset())
        if not d.accepted:
            return d
        if info.body_part and info.body_part.upper() in EXCLUDED_BODY_PARTS:
            return Decision(False, f"body part {info.body_part} does not include the hips")
        if not info.is_multiframe and info.z_coverage_mm < MIN_COVERAGE_MM:
            return Decision(False, f"z coverage {info.z_coverage_mm:.0f} mm < {MIN_COVERAGE_MM:g} mm: "
                                   "too short for the femoral head and neck crops")
        return Decision(True, f"axial CT, {info.n_slices} slices, {info.z_coverage_mm:.0f} mm coverage")

    # --------------------------------------------------------------- inference
    @staticmethod
    def inputs(volume: Volume, kvp: float | None = None, energy_correction: bool = pp.ENERGY_CORRECTION
               ) -> tuple[np.ndarray, np.ndarray, pp.PreprocessInfo, dict[str, Any]]:
        """Network inputs exactly as the manifest builder computes them, or :class:`ProtocolDeclined`.

        Parameters
        ----------
        volume : Volume
        kvp : float, optional
            The series' tube voltage (``SeriesInfo.kvp``); default the first image's ``KVP``.
        energy_correction : bool
            Rescale the HU to 120 kVp (the bundle card says which; see :func:`preprocessing_options`).

        Returns
        -------
        image : numpy.ndarray
            ``(2, 83, 83)`` float32.
        demographics : numpy.ndarray
            ``(5,)`` standardised.
        info : PreprocessInfo
        heads : dict
            Femoral-head centres (patient mm).
        """
        try:
            return pp.volume_inputs(volume, kvp=kvp, energy_correction=energy_correction)
        except LookupError as exc:
            raise ProtocolDeclined(str(exc.args[0]) if exc.args else "femoral heads not in coverage") from exc
        except pp.MissingDemographics as exc:
            raise ProtocolDeclined(str(exc)) from exc

    def run(self, volume: Volume, context: ProtocolContext) -> list[Finding]:
        """Grade the bone density of the proximal femora; raises :class:`ProtocolDeclined` when it cannot."""
        import torch

        from screener.explain import grad_cam

        if not volume.is_axial:
            raise ProtocolDeclined("volume is not axial")
        try:  # the card says how the model's inputs were made; no bundle: decline after the inputs
            options = preprocessing_options(self.load_bundle(context).card)
        except ProtocolDeclined:
            options = {"energy_correction": pp.ENERGY_CORRECTION}
        t0 = time.perf_counter()
        # declines first: no femur / no demographics
        image, demo, pinfo, heads = self.inputs(volume, kvp=context.info.kvp, **options)
        t1 = time.perf_counter()
        bundle = self.load_bundle(context)
        t1b = time.perf_counter()
        x = torch.from_numpy(image[None]).to(bundle.device)
        e = torch.from_numpy(demo[None]).to(bundle.device)
        bundle.input_spec.check(x, e)
        with torch.no_grad():
            folds = np.stack([torch.softmax(m(x, e), dim=1).double().cpu().numpy()[0] for m in bundle.models])
        prob = folds.mean(axis=0)
        k_cls = int(np.argmax(prob))
        grade = CLASSES[k_cls]
        t2 = time.perf_counter() - (t1b - t1)  # bundle loading (cached) is not model time
        heat = grad_cam(bundle.models, x, e, class_index=k_cls)[0]  # (H, W) in the network frame
        t3 = time.perf_counter() - (t1b - t1)

        info = context.info
        category, ccode = scores.grade_category(grade)
        timing = {"preprocess": 1000 * (t1 - t0), "model": 1000 * (t2 - t1), "explain": 1000 * (t3 - t2)}
        demo_raw = pp.header_demographics(volume.datasets[0])
        roi, k_roi = self._roi(volume, pinfo, heads)
        finding = Finding(
            protocol=self.name, protocol_version=self.version, site="proximal femur",
            site_code=codes.site_code("proximal femur"),
            measurements=[scores.probability_measurement(f"P({c})", float(prob[j]), of=c) for j, c in enumerate(CLASSES)],
            category=category, category_code=ccode, flags=self._flags(volume, info, options["energy_correction"]),
            z_extent_mm=self._z_extent(heads),
            study_uid=info.study_uid, series_uid=info.series_uid, roi=roi,
            referenced_sop_instance_uids=[u for u in [roi.source_sop_instance_uid] if u],
            details={**model_details(bundle), "who_grade": grade,
                     "probabilities": {c: float(prob[j]) for j, c in enumerate(CLASSES)},
                     "per_fold": {c: folds[:, j].tolist() for j, c in enumerate(CLASSES)},
                     "femoral_heads_mm": {s: [float(v) for v in c] for s, c in heads.items()},
                     "demographics": {k: (round(v, 2) if isinstance(v, float) else v) for k, v in demo_raw.items()},
                     "label_definition": str(bundle.card.get("t_score_reference", {}).get("source", "")),
                     "preprocessing": pp.constants(options["energy_correction"]),
                     "kvp": info.kvp, "energy_scale": round(float(pinfo.energy_scale), 4), "localizer": "classical femoral-head sphere detection",
                     "timing_ms": timing},
        )
        finding.overlay = self._overlay(pinfo, heat, prob, grade)
        finding.details["overlay_description"] = (
            f"Grad-CAM of the {grade} class (mean of {len(bundle.models)} fold models) on the coronal femur "
            f"crops through the femoral necks, right femur left, left femur right, window C {pp.WINDOW_CENTER:g} / "
            f"W {pp.WINDOW_WIDTH:g}")
        finding.details["overlay_pixel_spacing_mm"] = [pp.CROP_SPACING_MM / 2.0, pp.CROP_SPACING_MM / 2.0]
        from screener.preprocess.femoral_head import femoral_head_layers
        finding.layers += femoral_head_layers(volume, heads)  # the heads on their slices: the outlines SEG
        finding.plane_maps = _plane_maps(heat, pinfo)
        log.info("femur_coronal measured", series_uid=info.series_uid, grade=grade,
                 p=[round(float(p), 3) for p in prob], ms={k: round(v) for k, v in timing.items()})
        return [finding]

    # ----------------------------------------------------------------- helpers
    @staticmethod
    def _flags(volume: Volume, info: SeriesInfo, energy_correction: bool = False) -> list[str]:
        out = [scores.flag("WHO class is a deep-learning estimate from CT and demographics (Ha et al. 2024), "
                           "not a DXA measurement; this bundle was trained on the synthetic virtual cohort")]
        out += [scores.flag(w) for w in volume.warnings]
        if not info.contrast_enhanced:
            out.append(scores.flag("non-contrast CT: the paper trained on contrast-enhanced abdominal CT"))
        if info.kvp is None:
            if energy_correction:
                out.append(scores.flag("kVp unknown: HU taken as 120 kVp (no energy correction); estimate less certain"))
        elif not (80.0 <= info.kvp <= 140.0):
            out.append(scores.flag(f"kVp {info.kvp:g} outside the paper's 80-140 kVp"))
        return out

    @staticmethod
    def _z_extent(heads: dict[str, Any]) -> tuple[float, float]:
        z = [float(c[2]) for c in heads.values()]
        return (min(z) - pp.CROP_PX * pp.CROP_SPACING_MM + pp.ABOVE_MM, max(z) + pp.ABOVE_MM)

    def _roi(self, volume: Volume, pinfo: pp.PreprocessInfo, heads: dict[str, Any]) -> tuple[RoiGeometry, int]:
        """Footprint of both coronal crops (plane +- 2 mm) on the axial slice through the femoral heads."""
        from screener.preprocess.sampling import VolumeSampler

        sampler = VolumeSampler(volume)
        c = np.mean([np.asarray(h, dtype=np.float64) for h in heads.values()], axis=0)
        k = nearest_slice(volume, c)
        z = float(volume.index_to_patient(k, 0, 0)[2])
        xs = []
        for side in pp.SIDES:
            pl = pinfo.planes[side]
            o, u = np.asarray(pl["origin"]), np.asarray(pl["u"])
            xs += [o[0], o[0] + u[0] * (pp.CROP_PX - 1) * pp.CROP_SPACING_MM]
        y = float(np.mean([pinfo.planes[s]["origin"][1] for s in pp.SIDES]))
        x0, x1 = min(xs), max(xs)
        corners = np.array([[x0, y - 2.0, z], [x1, y - 2.0, z], [x1, y + 2.0, z], [x0, y + 2.0, z]])
        roi = axial_rectangle_roi(volume, sampler, corners, k, (float(c[0]), y, z))
        return roi, k

    @staticmethod
    def _overlay(pinfo: pp.PreprocessInfo, heat: np.ndarray, prob: np.ndarray, grade: str) -> np.ndarray:
        """Right and left crops side by side (left un-mirrored) with Grad-CAM, labelled."""
        from PIL import Image, ImageDraw
        from scipy import ndimage

        from screener.explain import fuse_overlay
        from screener.reporting.sc import burn_text

        n = pp.CROP_PX
        h = np.asarray(heat, dtype=np.float64)
        h = ndimage.zoom(h, (n / h.shape[0], n / h.shape[1]), order=1)[:n, :n]
        right = fuse_overlay(pinfo.windowed[0], h, vmin=0.0, vmax=1.0)
        left = fuse_overlay(pinfo.windowed[1], h, vmin=0.0, vmax=1.0)[:, ::-1]
        sep = np.zeros((n, 2, 3), np.uint8)
        img = Image.fromarray(np.concatenate([right, sep, left], axis=1), mode="RGB")
        img = img.resize((img.width * 2, img.height * 2), Image.BILINEAR)
        draw = ImageDraw.Draw(img)
        lines = [f"femur_coronal: {grade}",
                 "  ".join(f"{c} {100 * p:.0f}%" for c, p in zip(CLASSES, prob))]
        font = burn_text(draw, lines, 14, img.height)
        for text, x in (("R", img.width // 2 - 20), ("L", img.width - 16)):
            draw.text((x, img.height // 2), text, fill=(255, 255, 255), font=font)
        return np.asarray(img, dtype=np.uint8).copy()


def _plane_maps(heat: np.ndarray, pinfo: pp.PreprocessInfo) -> list[PlaneMap]:
    """The Grad-CAM map (one for the two-channel input) on each side's coronal crop plane, upsampled
    from the network frame (the pooled crop's top-left ``INPUT_PX * POOL`` pixels) to crop pixels."""
    from scipy import ndimage

    n = pp.INPUT_PX * pp.POOL
    h = np.asarray(heat, dtype=np.float64)
    h = ndimage.zoom(h, (n / h.shape[0], n / h.shape[1]), order=1)[:n, :n]
    full = np.zeros((pp.CROP_PX, pp.CROP_PX), np.float32)
    full[:n, :n] = h
    return [PlaneMap.on(full, pinfo.planes[side], side) for side in pp.SIDES]
