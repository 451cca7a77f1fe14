"""Protocol ``dxa_spine``: scoliosis, unreliable spine BMD and fracture risk from a DXA spine image.

Nissinen et al., Bone Reports 14:101070 (2021), seed ``003``: a 4-convolution network
(:class:`screener.nets.NissinenCNN`) reads the 150 x 150 crop around the spine centre line of the
lumbar-spine DXA image (:func:`screener.protocols.dxa_spine.preprocess.dxa_spine_input`) and gives three
probabilities: scoliosis, "BMD measurement unreliable" (3-4 of L1-L4 affected by degeneration,
fracture or other structural change, so that the spine BMD of that scan should not be used) and
fracture.  Decision thresholds are the paper's: 0.5 for scoliosis and unreliability, and for
fracture a lowered threshold matched to the sensitivity of the minimum BMD T-score predictor
(stored in the bundle's model card, ``preprocessing.fracture_threshold``).

Routing: one greyscale DXA spine image per series, Modality ``BMD`` (the virtual cohort, vendor
exports as Secondary Capture) or ``OT`` when a description or comment names DXA / bone density;
the image must show the lumbar spine in the PA view (body part ``LSPINE``/``SPINE`` or a description
naming the lumbar spine), have ``PixelSpacing``, and not be a screener output.  Hip or forearm DXA,
lateral views (VFA), colour report screenshots and any other modality are declined with a reason.

Output: one :class:`~screener.findings.Finding` (site "lumbar spine") with the three probabilities,
a category ``"spine BMD unreliable"`` / ``"spine BMD usable"``, flags (scoliosis suspected; spine BMD
not to be trusted; raised fracture risk; uncalibrated image), the crop rectangle as the ROI on the
DXA image, and one secondary capture: the DXA image with the Grad-CAM map of the explained task
(left) and the vanilla-gradient map (right) inside the crop, on a 0.5 mm square-pixel grid.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from screener.findings import Finding, RoiGeometry
from screener.protocols.base import Decision, ProtocolContext, ProtocolDeclined
from screener.protocols.model import ModelProtocol, model_details
from screener.reporting import codes

log = structlog.get_logger(__name__)

__all__ = ["DxaSpineProtocol", "UNRELIABLE_STATEMENT", "render_dxa_overlay"]

TASK_LABELS = {"scoliosis": "Scoliosis", "unreliable": "Spine BMD unreliable", "fracture": "Fracture risk"}
MEASUREMENT_NAMES = {"scoliosis": "Scoliosis probability",
                     "unreliable": "Spine BMD unreliable probability",
                     "fracture": "Fracture probability"}
#: The paper's thresholds (fracture: 0.15 in the paper; the bundle's matched value takes precedence).
PAPER_THRESHOLDS = {"scoliosis": 0.5, "unreliable": 0.5, "fracture": 0.15}
#: What the SR says when the model flags the spine BMD as unreliable.
UNRELIABLE_STATEMENT = ("Spine BMD from this DXA should not be trusted: structural change (degeneration, "
                        "fracture or scoliotic rotation) likely affects 3-4 of L1-L4")
SPINE_BODY_PARTS = {"LSPINE", "SPINE", "LUMBARSPINE", "L-SPINE", "LUMBAR", "TLSPINE"}
SPINE_WORDS = ("spine", "lumbar", "l1-l4", "l1-4", "l2-l4", "ap spine", "pa spine")
OTHER_SITE_WORDS = ("hip", "femur", "femoral", "forearm", "radius", "wrist", "total body", "whole body")
LATERAL_WORDS = ("lateral", "vfa", "vertebral fracture assessment", "lva")
DXA_WORDS = ("dxa", "dexa", "densitometr", "bone density", "bmd", "absorptiometry")
OVERLAY_MM = 0.5
GREY_RANGE_G_CM2 = (0.0, 1.6)


def _text(info: Any, ds: Any) -> str:
    parts = [info.series_description, str(ds.get("StudyDescription", "") or ""),
             str(ds.get("ImageComments", "") or ""), str(ds.get("ProtocolName", "") or "")]
    return " ".join(parts).lower()


class DxaSpineProtocol(ModelProtocol):
    """Nissinen et al.'s DXA spine image reader (see the module docstring)."""

    name = "dxa_spine"
    routing_order = 60
    version = "1.0.0"
    bundle_name = "dxa_spine"
    needs_volume = False
    accepts_derived = True  # vendor exports and the cohort's images are DERIVED secondary captures

    # ------------------------------------------------------------------ routing
    def accepts(self, info: Any) -> Decision:
        """A single greyscale PA lumbar-spine DXA image (Modality BMD, or an OT DXA export)."""
        modality = (info.modality or "").upper()
        if modality not in ("BMD", "OT"):
            return Decision(False, f"modality {modality or 'missing'} is not a DXA image (BMD, or an OT DXA export)")
        ds = info.header
        if ds is None:
            return Decision(False, "no header to identify a DXA spine image")
        if (info.manufacturer or "").strip().lower() == "screener" or \
                (info.series_description or "").startswith("Bone density screening"):
            return Decision(False, "a screener output (overlay), not a DXA acquisition")
        text = _text(info, ds)
        if modality == "OT" and not any(w in text for w in DXA_WORDS):
            return Decision(False, "OT image not identified as a DXA export (no DXA / bone density in its "
                                   "series or study description or comments)")
        photometric = str(ds.get("PhotometricInterpretation", "") or "").upper()
        if photometric not in ("MONOCHROME1", "MONOCHROME2"):
            return Decision(False, f"{photometric or 'unknown'} image: a DXA report screenshot, not the "
                                   "greyscale DXA image")
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            return Decision(False, "multi-frame image: expected one DXA spine image")
        body = (info.body_part or "").upper().replace(" ", "")
        view = str(ds.get("ViewPosition", "") or "").upper()
        if view in ("LL", "RL", "LAT", "LATERAL") or any(w in text for w in LATERAL_WORDS):
            return Decision(False, "lateral DXA view (VFA): the model reads the PA lumbar spine")
        spine = body in SPINE_BODY_PARTS or any(w in text for w in SPINE_WORDS)
        if not spine:
            other = body or next((w for w in OTHER_SITE_WORDS if w in text), "")
            if other:
                return Decision(False, f"DXA of {other}, not the lumbar spine")
            return Decision(False, "cannot tell the DXA site: BodyPartExamined LSPINE or a description "
                                   "naming the lumbar spine is needed")
        if ds.get("PixelSpacing") is None:
            return Decision(False, "no PixelSpacing: the image cannot be scaled to the 1.05 x 0.60 mm grid")
        n = info.n_instances
        return Decision(True, f"DXA lumbar spine image ({modality}"
                              f"{f', {n} images: the first is read' if n > 1 else ''})")

    # --------------------------------------------------------------------- run
    def run(self, volume: Any, context: ProtocolContext) -> list[Finding]:
        """Read the DXA image of ``context.info.paths``; one finding with an overlay."""
        import pydicom

        from screener.protocols.dxa_spine.preprocess import dxa_spine_input
        from screener.radiograph import RadiographError
        from screener.scores import flag, probability_measurement

        info = context.info
        if not info.paths:
            raise ProtocolDeclined("no DXA image file in the series")
        bundle = self.load_bundle(context)
        path = Path(info.paths[0])
        t0 = time.perf_counter()
        ds = pydicom.dcmread(path)
        try:
            inp = dxa_spine_input(ds)
        except RadiographError as exc:
            raise ProtocolDeclined(str(exc)) from exc
        t1 = time.perf_counter()
        names = list(bundle.output_names)
        missing = [t for t in TASK_LABELS if t not in names]
        if missing:
            raise ProtocolDeclined(f"model bundle {bundle.path} lacks output(s) {missing}")
        probs = bundle.predict(inp.array[None])[0]
        t2 = time.perf_counter()
        p = {t: float(np.clip(probs[names.index(t)], 0.0, 1.0)) for t in TASK_LABELS}
        thr, thr_source = self._thresholds(bundle)
        positive = {t: p[t] >= thr[t] for t in TASK_LABELS}

        flags: list[str] = []
        if positive["unreliable"]:
            flags.append(flag(f"{UNRELIABLE_STATEMENT} (model probability {100 * p['unreliable']:.0f} % >= "
                              f"{100 * thr['unreliable']:.0f} %); use the hip or unaffected vertebrae"))
        if positive["scoliosis"]:
            flags.append(flag(f"scoliosis suspected (model probability {100 * p['scoliosis']:.0f} % >= "
                              f"{100 * thr['scoliosis']:.0f} %)"))
        if positive["fracture"]:
            flags.append(flag(f"raised fracture risk (model probability {100 * p['fracture']:.0f} % >= "
                              f"{100 * thr['fracture']:.0f} %, threshold {thr_source})"))
        if not inp.calibrated:
            flags.append(flag("image not calibrated in g/cm2 (no bone-density Modality LUT): intensities "
                              "were normalised, probabilities less reliable"))
        if info.n_instances > 1:
            flags.append(flag(f"{info.n_instances} images in the series: only the first was read"))
        category = "spine BMD unreliable" if positive["unreliable"] else "spine BMD usable"
        measurements = [probability_measurement(MEASUREMENT_NAMES[t], p[t], of=t) for t in TASK_LABELS]

        explained = max(TASK_LABELS, key=lambda t: p[t] / max(thr[t], 1e-6))
        overlay, spacing = render_dxa_overlay(bundle, inp, names.index(explained), p, thr, explained)
        t3 = time.perf_counter()
        c0, r0, c1, r1 = inp.box_px
        polygon = np.array([[c0, r0], [c1, r0], [c1, r1], [c0, r1], [c0, r0]], dtype=np.float64)
        sr_, sc_ = inp.source_spacing_mm
        roi = RoiGeometry(source_sop_instance_uid=str(ds.SOPInstanceUID),
                          source_sop_class_uid=str(ds.SOPClassUID), polygon=polygon,
                          centre_mm=(0.5 * (c0 + c1) * sc_, 0.5 * (r0 + r1) * sr_, 0.0),
                          area_mm2=float((c1 - c0) * sc_ * (r1 - r0) * sr_), slice_index=0)
        details: dict[str, Any] = {
            **model_details(bundle),
            "probabilities": p, "thresholds": thr, "fracture_threshold_source": thr_source,
            "positive": positive, "crop_box_px": [c0, r0, c1, r1],
            "roi_centre_note": "roi centre is image-plane mm (column, row, 0) of the projection, not patient LPS",
            "calibrated_g_cm2": inp.calibrated, "explained_task": explained,
            "overlay_description": (f"DXA spine image with the 150x150 model crop; Grad-CAM ({TASK_LABELS[explained]}) "
                                    "left, vanilla gradient right, resampled to 0.5 mm square pixels"),
            "overlay_pixel_spacing_mm": [spacing, spacing],
            "timing_ms": {"preprocess": 1000 * (t1 - t0), "model": 1000 * (t2 - t1), "explain": 1000 * (t3 - t2)},
        }
        if positive["unreliable"]:
            details["statement"] = UNRELIABLE_STATEMENT
        finding = Finding(
            protocol=self.name, protocol_version=self.version, site="lumbar spine",
            site_code=codes.site_code("lumbar spine"), measurements=measurements, category=category,
            category_code=codes.category_code(category), flags=flags, roi=roi,
            study_uid=info.study_uid, series_uid=info.series_uid,
            referenced_sop_instance_uids=[str(ds.SOPInstanceUID)], overlay=overlay, details=details)
        log.info("dxa_spine read", series_uid=info.series_uid, category=category,
                 **{f"p_{t}": round(v, 3) for t, v in p.items()})
        return [finding]

    @staticmethod
    def _thresholds(bundle: Any) -> tuple[dict[str, float], str]:
        pre = bundle.card.get("preprocessing", {}) or {}
        thr = {"scoliosis": float(pre.get("scoliosis_threshold", PAPER_THRESHOLDS["scoliosis"])),
               "unreliable": float(pre.get("unreliable_threshold", PAPER_THRESHOLDS["unreliable"]))}
        if isinstance(pre.get("fracture_threshold"), (int, float)):
            thr["fracture"] = float(pre["fracture_threshold"])
            return thr, "matched to the minimum T-score sensitivity"
        thr["fracture"] = PAPER_THRESHOLDS["fracture"]
        return thr, "the paper's 0.15 (bundle not calibrated)"


def _maps(bundle: Any, x: np.ndarray, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM (ensemble) and mean vanilla-gradient maps ``(150, 150)`` in [0, 1] for one output."""
    import torch

    from screener.explain import grad_cam, vanilla_gradient

    t = torch.as_tensor(x, dtype=torch.float32, device=bundle.device)
    cam = grad_cam(bundle.models, t, class_index=index)[0]
    vg = np.mean([vanilla_gradient(m, t, output_index=index)[0] for m in bundle.models], axis=0)
    vg = vg / vg.max() if vg.max() > 0 else vg
    return cam.astype(np.float32), vg.astype(np.float32)


def render_dxa_overlay(bundle: Any, inp: Any, index: int, p: dict[str, float], thr: dict[str, float],
                       explained: str) -> tuple[np.ndarray, float]:
    """The secondary-capture image: DXA image with Grad-CAM (left) and vanilla gradient (right).

    Parameters
    ----------
    bundle : screener.bundles.Bundle
    inp : screener.protocols.dxa_spine.preprocess.DxaInput
    index : int
        Output column explained.
    p, thr : dict
        Probabilities and thresholds per task (burned in).
    explained : str
        Name of the explained task.

    Returns
    -------
    overlay : numpy.ndarray
        ``uint8 (rows, cols, 3)``.
    pixel_mm : float
        Square pixel size of the overlay (mm).
    """
    from PIL import Image, ImageDraw
    from scipy import ndimage

    from screener.explain import fuse_overlay
    from screener.radiograph import DXA_PIXEL_MM, resample_to_spacing
    from screener.reporting.sc import DISCLAIMER, _font

    cam, vg = _maps(bundle, inp.array[None], index)
    grey = resample_to_spacing(inp.image_g_cm2, inp.source_spacing_mm, OVERLAY_MM)
    rows, cols = grey.shape
    rr, cc = np.mgrid[0:rows, 0:cols].astype(np.float64)
    # overlay pixel centre (mm) -> crop pixel index
    cr = ((rr + 0.5) * OVERLAY_MM - inp.crop_origin_mm[0]) / DXA_PIXEL_MM[0] - 0.5
    ccol = ((cc + 0.5) * OVERLAY_MM - inp.crop_origin_mm[1]) / DXA_PIXEL_MM[1] - 0.5
    n = cam.shape[0]
    inside = (cr >= -0.5) & (cr <= n - 0.5) & (ccol >= -0.5) & (ccol <= n - 0.5)
    panels = []
    for heat, alpha in ((cam, 0.4), (vg, 0.6)):
        h = ndimage.map_coordinates(heat, [cr, ccol], order=1, mode="nearest")
        fused = fuse_overlay(grey, np.where(inside, h, 0.0), alpha=alpha,
                             vmin=GREY_RANGE_G_CM2[0], vmax=GREY_RANGE_G_CM2[1])
        plain = fuse_overlay(grey, np.zeros_like(grey), alpha=0.0,
                             vmin=GREY_RANGE_G_CM2[0], vmax=GREY_RANGE_G_CM2[1])
        panels.append(np.where(inside[..., None], fused, plain))
    body = np.concatenate(panels, axis=1)
    size = 13
    font = _font(size)
    lines = [f"{TASK_LABELS[t]}: {100 * p[t]:.0f} % (threshold {100 * thr[t]:.0f} %)"
             f"{'  POSITIVE' if p[t] >= thr[t] else ''}" for t in TASK_LABELS]
    lines.append(f"left: Grad-CAM ({TASK_LABELS[explained]}); right: vanilla gradient")
    head_h = (size + 5) * len(lines) + 6
    foot_h = size + 10
    canvas = Image.new("RGB", (body.shape[1], head_h + body.shape[0] + foot_h), (0, 0, 0))
    canvas.paste(Image.fromarray(body, mode="RGB"), (0, head_h))
    draw = ImageDraw.Draw(canvas)
    y = 4
    for text in lines:
        colour = (255, 80, 80) if "POSITIVE" in text else (255, 255, 0)
        draw.text((4, y), text, fill=colour, font=font)
        y += size + 5
    # crop rectangle on both panels
    r0 = inp.crop_origin_mm[0] / OVERLAY_MM
    c0 = inp.crop_origin_mm[1] / OVERLAY_MM
    r1 = r0 + n * DXA_PIXEL_MM[0] / OVERLAY_MM
    c1 = c0 + n * DXA_PIXEL_MM[1] / OVERLAY_MM
    for k in range(2):
        off = k * cols
        draw.rectangle((off + max(c0, 0), head_h + max(r0, 0), off + min(c1, cols - 1),
                        head_h + min(r1, rows - 1)), outline=(255, 255, 0), width=1)
    draw.text((4, head_h + body.shape[0] + 4), DISCLAIMER, fill=(255, 80, 80), font=font)
    return np.asarray(canvas, dtype=np.uint8).copy(), OVERLAY_MM
