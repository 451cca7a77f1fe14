"""Protocol ``hip_xray``: femoral-neck BMD from an AP pelvis / hip radiograph (Gu et al. 2023, BMD-GAN).

Router: a DX/CR (or DX "for presentation") single-frame greyscale projection radiograph whose
``BodyPartExamined`` / descriptions name the pelvis or hip, in an AP or PA view.  Chest
radiographs, lateral views (``ViewPosition`` LL/RL/LAT, a lateral ``PatientOrientation``) and other
body parts are declined with the reason.

Run (``needs_volume = False``: the file of ``context.info.paths`` is read):

1. :func:`screener.hip_landmarks.find_hips` -- the hip landmark model (``models/hip_landmarks``)
   finds each hip present: femoral-head centre, femoral-neck ROI centre, presence probability;
   its side from ``PatientOrientation``, else ``ImageLaterality`` / ``Laterality`` (one hip), else
   anatomy in the standard display ("side not determined" when these disagree); implant metal in
   the head or neck.  No hip found: a decline ("no hip found in the image").  A hip with metal is
   not measured (named on the other hip's finding, or the decline);
2. per measurable hip, BMD-GAN's input is cut around the femoral head
   (:func:`screener.hip_landmarks.landmark_crop`: the head where the midline-split training put it,
   the same pixel size, a hip whose pelvis lies to the image left mirrored), not a midline half;
3. the bundle's stage-3 regressor ``R = {M_E, M_R}`` gives the femoral-neck BMD of each hip; the
   stage-2 generator decomposes each hip into its proximal-femur DRR (PF-DRR), whose mean above the
   threshold ``t`` gives a second, linear estimate; the reported BMD is
   ``(1 - w) * regression + w * linear`` with the card's ``linear_weight`` ``w``
   (:func:`combine_estimates`; ``w = 0``: the regression alone), both parts in ``details``;
4. one finding per measured hip: BMD (g/cm^2), T-score against NHANES III femoral neck (0.858 / 0.120)
   and the WHO grade; the ROI is a DXA-style 15 x 40 mm femoral-neck box at the landmark model's
   neck point;
5. one overlay for the series (on the first hip's finding): each hip as the network saw it, with the
   decomposed PF-DRR colour-coded on top and the numbers burned in.

The bundle (``models/hip_xray``, :mod:`training.hip_xray`) is the standard format with two extra
float16 weight files named in its card's ``decomposition`` entry.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from screener.findings import Finding, RoiGeometry
from screener.protocols.base import Decision, ProtocolContext, ProtocolDeclined
from screener.devices import resolve_device
from screener.protocols.model import ModelProtocol, model_details
from screener.references import REFERENCES
from screener.validation import PROJECTION_CLASSES
from screener.reporting import codes

log = structlog.get_logger(__name__)

__all__ = ["HipXrayProtocol", "hip_decision"]

#: Body parts / words that identify a pelvis or hip radiograph.
HIP_WORDS = ("PELVIS", "HIP", "FEMUR", "COXA", "HUEFTE", "HÜFTE", "BECKEN")
#: Words of other radiographs, named in the decline.
OTHER_WORDS = ("CHEST", "THORAX", "LUNG", "SKULL", "HAND", "KNEE", "SPINE", "ABDOMEN", "SHOULDER", "FOOT")
LATERAL_VIEWS = ("LL", "RL", "LAT", "LATERAL", "LLO", "RLO", "XTABLE")
_AUX: dict[tuple[str, str], tuple[Any, dict[str, Any]]] = {}
_AUX_LOCK = threading.Lock()


def _text(info: Any, ds: Any) -> str:
    parts = [info.body_part or "", info.series_description or "", str(ds.get("StudyDescription", "") or ""),
             str(ds.get("ProtocolName", "") or "")]
    return " ".join(parts).upper()


def hip_decision(info: Any) -> Decision:
    """Header checks of the ``hip_xray`` router (see the module docstring).

    Parameters
    ----------
    info : screener.series.SeriesInfo

    Returns
    -------
    Decision
    """
    modality = (info.modality or "").upper()
    if modality not in ("DX", "CR"):
        return Decision(False, f"modality {modality or 'missing'} is not a projection radiograph (DX or CR)")
    ds = info.header
    if ds is None:
        return Decision(False, "no header to identify the radiograph")
    if info.sop_class_uid and info.sop_class_uid not in PROJECTION_CLASSES:
        return Decision(False, f"SOP class {info.sop_class_uid} is not a DX or CR image")
    photometric = str(ds.get("PhotometricInterpretation", "") or "").upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return Decision(False, f"{photometric or 'unknown'} image: not a greyscale radiograph")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        return Decision(False, "multi-frame image: expected one radiograph")
    body = (info.body_part or "").upper()
    coded_other = next((w for w in OTHER_WORDS if w in body and w != "ABDOMEN"), "")
    if coded_other and not any(w in body for w in HIP_WORDS):
        # the coded body part outranks free-text descriptions (a chest film described "... hip")
        return Decision(False, f"BodyPartExamined {body}: a {coded_other.lower()} radiograph, not a pelvis or hip "
                               "radiograph")
    text = _text(info, ds)
    hip = any(w in text for w in HIP_WORDS)
    if not hip:
        other = next((w for w in OTHER_WORDS if w in text), "")
        if other:
            return Decision(False, f"{other.lower()} radiograph, not a pelvis or hip radiograph")
        return Decision(False, "cannot tell the body part: BodyPartExamined PELVIS or HIP (or a description "
                               "naming the pelvis or hip) is needed")
    view = str(ds.get("ViewPosition", "") or "").upper().strip()
    if view in LATERAL_VIEWS or "LAT" in text.split() or "LATERAL" in text or "LAUENSTEIN" in text:
        return Decision(False, f"lateral view ({view or 'description'}): the model reads AP hip radiographs")
    if view and view not in ("AP", "PA"):
        return Decision(False, f"ViewPosition {view}: the model reads AP (or PA) hip radiographs")
    try:
        from screener.radiograph import image_layout

        layout = image_layout(ds)
    except ValueError as exc:
        return Decision(False, f"orientation unreadable: {exc}")
    if not layout.is_frontal:
        return Decision(False, f"not a frontal projection (PatientOrientation gives columns towards "
                               f"{layout.column_toward}, rows towards {layout.row_toward}): a lateral view")
    image_type = tuple(info.image_type or ())
    if "LOCALIZER" in image_type:
        return Decision(False, "a localizer image")
    if ds.get("PixelSpacing") is None and ds.get("ImagerPixelSpacing") is None:
        return Decision(False, "no PixelSpacing or ImagerPixelSpacing: the image scale is unknown")
    lat = layout.laterality
    which = {"R": "right hip", "L": "left hip"}.get(lat or "", "both hips")
    return Decision(True, f"{PROJECTION_CLASSES.get(info.sop_class_uid, modality)} {view or 'AP'} pelvis/hip radiograph "
                          f"({which})")


def combine_estimates(stage3: np.ndarray, linear: np.ndarray, weight: float) -> np.ndarray:
    """The bundle's BMD: ``(1 - weight) * stage3 + weight * linear``, the stage-3 value alone where
    the linear estimate is missing (``nan``: the decomposition found no PF-DRR above ``t``).

    Parameters
    ----------
    stage3, linear : numpy.ndarray
        Stage-3 regression (mean of its heads) and PF-DRR linear estimates of the same hips.
    weight : float
        The card's ``decomposition.linear_weight`` in [0, 1] (0: stage 3 alone).
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"linear_weight must be in [0, 1], got {weight}")
    stage3 = np.asarray(stage3, dtype=np.float64)
    linear = np.asarray(linear, dtype=np.float64)
    if weight == 0.0:
        return stage3
    return np.where(np.isfinite(linear), (1.0 - weight) * stage3 + weight * linear, stage3)


class HipXrayProtocol(ModelProtocol):
    """Femoral-neck BMD, T-score and WHO grade per hip from an AP pelvis radiograph."""

    name = "hip_xray"
    routing_order = 50
    version = "0.2.0"
    bundle_name = "hip_xray"
    needs_volume = False
    accepts_derived = True  # DX "for presentation" images are often DERIVED\PRIMARY

    def accepts(self, info: Any) -> Decision:
        """See :func:`hip_decision`."""
        return hip_decision(info)

    # ----------------------------------------------------------------- bundle
    # the stage-3 bundle: ModelProtocol.load_bundle (its BMD-GAN networks are built-ins of bundles.py)

    def load_generator(self, bundle: Any) -> tuple[Any, dict[str, Any]]:
        """The stage-2 generator and the card's ``decomposition`` entry (cached)."""
        from screener.bundles import BundleError, load_networks

        key = (str(Path(bundle.path).resolve()), str(bundle.device))
        with _AUX_LOCK:
            if key in _AUX:
                return _AUX[key]
            dec = bundle.card.get("decomposition") or {}
            f = Path(bundle.path) / str(dec.get("file", ""))
            if not dec or not f.is_file():
                raise ProtocolDeclined(f"model bundle {bundle.path} has no decomposition generator "
                                       "(card 'decomposition' entry / file missing): retrain it")
            try:
                gen = load_networks(f, "BMDGenerator", dec["generator_kwargs"], bundle.device)[0]
            except BundleError as exc:
                raise ProtocolDeclined(f"model bundle {bundle.path} unusable: {exc}") from exc
            _AUX[key] = (gen, dec)
            return gen, dec

    def load_landmarks(self, context: ProtocolContext) -> Any:
        """The hip landmark bundle (``<models_dir>/hip_landmarks``), cached."""
        from screener.bundles import BundleError
        from screener.hip_landmarks import load_landmark_bundle

        path = Path(context.config.models_dir) / "hip_landmarks"
        if not (path / "model_card.json").is_file():
            raise ProtocolDeclined(f"hip landmark bundle {path} not installed: run python -m training.hip_landmarks "
                                   f"train --out {path}")
        try:
            return load_landmark_bundle(path, resolve_device(context.config.device))
        except BundleError as exc:
            raise ProtocolDeclined(f"hip landmark bundle {path} unusable: {exc}") from exc

    # -------------------------------------------------------------------- run
    def run(self, volume: Any, context: ProtocolContext) -> list[Finding]:
        """Find the hips (landmark model), then one finding per measurable hip, one overlay.

        A hip with implant metal in its head or neck is not measured (its reason is on the other
        hip's finding, or the decline when no hip is left); no hip found is a decline.
        """
        import pydicom
        import torch

        from screener.hip_landmarks import landmark_crop, neck_box
        from screener.protocols.hip_xray.preprocess import HIP_PIXEL_MM
        from screener.scores import bmd_measurement, grade_category, t_score, t_score_measurement, who_grade

        info = context.info
        if not info.paths:
            raise ProtocolDeclined("no radiograph file in the series")
        bundle = self.load_bundle(context)
        gen, dec = self.load_generator(bundle)
        landmarks = self.load_landmarks(context)
        t0 = time.perf_counter()
        ds = pydicom.dcmread(Path(info.paths[0]))
        shape = tuple(int(v) for v in bundle.input_spec.shape[1:])
        pixel_mm = float((bundle.card.get("preprocessing") or {}).get("pixel_mm", HIP_PIXEL_MM))
        present, hips, not_measured, inp, rad = _measurable_hips(ds, landmarks, pixel_mm)
        crops = [landmark_crop(rad, h, inp.spacing_mm, shape) for h in hips]
        x = np.stack([c.image for c in crops])[:, None].astype(np.float32)
        t1 = time.perf_counter()
        bmd = bundle.predict(x)[:, 0]
        with torch.no_grad():
            pf = gen(torch.from_numpy(x).to(bundle.device)).float().cpu().numpy()[:, 0]
        t2 = time.perf_counter()
        thr = float(dec["threshold_t"])
        w_lin = float(dec.get("linear_weight", 0.0))
        ref = bundle.card.get("t_score_reference") or {}
        fallback = REFERENCES["nhanes3_fn_women"]  # the one table's default femoral-neck reference
        mean, sd = float(ref.get("mean") or fallback.mean), float(ref.get("sd") or fallback.sd)
        uid, sop_class = str(ds.SOPInstanceUID), str(ds.SOPClassUID)
        sr_mm, sc_mm = inp.spacing_mm
        findings: list[Finding] = []
        results = []
        for i, (h, crop) in enumerate(zip(hips, crops)):
            mask = pf[i] >= thr
            linear = float(dec["slope"] * pf[i][mask].mean() + dec["intercept"]) if mask.any() else float("nan")
            stage3 = float(bmd[i])
            value = float(combine_estimates(np.array([stage3]), np.array([linear]), w_lin)[0])
            t = t_score(value, mean, sd)
            grade = who_grade(t)
            category, category_code = grade_category(grade)
            flags = _hip_flags(h, not_measured, bool(mask.any()), thr, linear, stage3)
            poly = neck_box(h, inp.spacing_mm) + 0.5  # pixel centres -> SR image coordinates
            roi = RoiGeometry(source_sop_instance_uid=uid, source_sop_class_uid=sop_class, polygon=poly,
                              centre_mm=(float(h.neck_px[1] + 0.5) * sc_mm, float(h.neck_px[0] + 0.5) * sr_mm, 0.0),
                              area_mm2=15.0 * 40.0, slice_index=0)
            site = f"{_SIDE_NAMES[h.side]} femoral neck" if h.side else "femoral neck"
            label = site if h.side else "femoral neck (side not determined)"
            details: dict[str, Any] = {
                **model_details(bundle), **_hip_details(h, landmarks.bundle_id),
                "hips_not_measured": not_measured,
                "bmd_regression_g_cm2": stage3, "bmd_pfdrr_linear_g_cm2": linear, "bmd_linear_weight": w_lin,
                "pfdrr_threshold_t": thr, "pfdrr_pixels_above_t": int(mask.sum()),
                "t_score_reference": {"mean": mean, "sd": sd, "source": ref.get("source", "NHANES III femoral neck")},
                "input_shape": list(shape), "input_pixel_mm": crop.pixel_mm,
                "roi_note": "ROI = 15 x 40 mm femoral-neck box at the landmark model's neck point (DXA-style), on the "
                            "stored radiograph; BMD-GAN's crop is placed on the femoral head; centre in image-plane mm "
                            "(column, row, 0), not patient LPS",
            }
            findings.append(Finding(
                protocol=self.name, protocol_version=self.version, site=site, site_code=codes.site_code(site),
                measurements=[bmd_measurement(value, site="femur", name=f"{label} BMD"),
                              t_score_measurement(t, site="femur", name=f"{label} T-score")],
                category=category, category_code=category_code, flags=flags, roi=roi,
                study_uid=info.study_uid, series_uid=info.series_uid, referenced_sop_instance_uids=[uid],
                details=details))
            results.append((h.side or "?", value, t, grade, linear))
        _overlay_and_timing(findings, crops, pf, thr, results, (t0, t1, t2))
        log.info("hip_xray read", series_uid=info.series_uid, hips=len(present), measured=len(hips),
                 **{f"bmd_{s}": round(v, 3) for s, v, *_ in results})
        return findings


def _overlay_and_timing(findings: list[Finding], crops: list[Any], pf: np.ndarray, thr: float,
                        results: list[tuple[str, float, float, str, float]], times: tuple[float, float, float]) -> None:
    """The overlay on the first finding (:func:`render_hip_overlay`) and every finding's timing: the
    model stage includes the decomposition; the overlay is the explanation."""
    t0, t1, t2 = times
    overlay, ov_mm = render_hip_overlay([c.image for c in crops], list(pf), ["R"] * len(crops), thr, results,
                                        crops[0].pixel_mm)
    findings[0].overlay = overlay
    t3 = time.perf_counter()
    for f in findings:
        f.details["timing_ms"] = {"preprocess": 1000 * (t1 - t0), "model": 1000 * (t2 - t1),
                                  "explain": 1000 * (t3 - t2)}
    findings[0].details["overlay_description"] = (
        "each hip as BMD-GAN saw it (cut around the femoral head the landmark model found; a hip whose pelvis "
        "lies to the image left is mirrored) with the decomposed proximal-femur DRR (BMD-GAN stage 2) "
        "colour-coded, and the BMD estimates")
    findings[0].details["overlay_pixel_spacing_mm"] = [ov_mm, ov_mm]


#: side -> the word of a finding's site and laterality
_SIDE_NAMES = {"R": "right", "L": "left", None: "side not determined"}


def _measurable_hips(ds: Any, landmarks: Any, pixel_mm: float) -> tuple[list[Any], list[Any], list[str], Any, Any]:
    """The hips the landmark model found, those without implant metal in head or neck (from the
    image's right to left), the reasons the others are not measured, the landmark input and the
    radiograph; a :class:`ProtocolDeclined` when no hip is found or none can be measured."""
    from screener.hip_landmarks import find_hips
    from screener.radiograph import RadiographError, read_radiograph

    try:
        present, both, inp = find_hips(ds, landmarks)
        rad = read_radiograph(ds, pixel_mm)
    except RadiographError as exc:
        raise ProtocolDeclined(str(exc)) from exc
    if not present:
        best = max(h.probability for h in both.values())
        raise ProtocolDeclined(f"no hip found in the image (hip landmark model: highest femoral-head "
                               f"probability {best:.2f})")
    not_measured = []
    hips = []
    for h in sorted(present, key=lambda h: h.head_px[1]):
        if h.metal:
            how = h.details.get("metal_by") or f"{h.metal_fraction:.0%} of the head/neck ROI"
            not_measured.append(f"{_SIDE_NAMES[h.side]} hip not measured: metal in the femoral head or neck "
                                f"(arthroplasty, nail or screw; found by {how})")
        else:
            hips.append(h)
    if not hips:
        raise ProtocolDeclined("; ".join(not_measured))
    return present, hips, not_measured, inp, rad


def _hip_flags(h: Any, not_measured: list[str], femur_found: bool, thr: float, linear: float,
               stage3: float) -> list[str]:
    """The caveats of one hip's estimate: its method, an undetermined side, the hips not measured,
    and a decomposition that found no femur or disagrees with the regression."""
    from screener.scores import flag

    flags = [flag("BMD estimated from a plain radiograph by a model (BMD-GAN), not measured by DXA; "
                  "trained on a synthetic virtual cohort")]
    if h.side is None:
        flags.append(flag(f"side not determined ({h.side_source.split(': ', 1)[-1]}): the reader must "
                          "say which hip this is"))
    flags.extend(flag(n) for n in not_measured)
    if not femur_found:
        flags.append(flag(f"the decomposition found no proximal femur (PF-DRR below t = {thr:g}): "
                          "hip not in view or image atypical; do not use this estimate"))
    elif abs(linear - stage3) > 0.1:
        flags.append(flag(f"the PF-DRR linear estimate ({linear:.3f} g/cm2) differs from the regression "
                          f"by {abs(linear - stage3):.3f} g/cm2: atypical image, review"))
    return flags


def _hip_details(h: Any, landmarks_bundle: str) -> dict[str, Any]:
    """One hip's side (and how it was decided) and what the landmark model found."""
    return {"side": h.side, "laterality": _SIDE_NAMES[h.side], "side_source": h.side_source,
            "hip_landmarks": {"bundle": landmarks_bundle, "anatomy": h.anatomy,
                              "probability": round(h.probability, 4), "confidence": round(h.confidence, 4),
                              "femoral_head_px": [round(v, 1) for v in h.head_px],
                              "femoral_neck_px": [round(v, 1) for v in h.neck_px],
                              "metal_fraction": round(h.metal_fraction, 4), **h.details}}


def render_hip_overlay(images: list[np.ndarray], pfdrrs: list[np.ndarray], sides: list[str], threshold: float,
                       results: list[tuple[str, float, float, str, float]], pixel_mm: float,
                       height: int = 512) -> tuple[np.ndarray, float]:
    """The secondary-capture image: per hip the radiograph half and the half with its PF-DRR.

    Parameters
    ----------
    images, pfdrrs : list of numpy.ndarray
        Network inputs and generator outputs per hip (left hips mirrored, as the network sees them).
    sides : list of str
        ``"R"`` / ``"L"`` per entry.
    threshold : float
        PF-DRR threshold ``t`` (the colour scale runs from 0 to ``max(2 t, max PF-DRR)``).
    results : list of tuple
        ``(side, bmd, t_score, grade, linear_bmd)`` per hip, burned in.
    pixel_mm : float
        Pixel size of the inputs (mm).
    height : int
        Rows of the overlay body.

    Returns
    -------
    (numpy.ndarray, float)
        ``uint8 (rows, cols, 3)`` and its pixel size (mm).
    """
    from PIL import Image, ImageDraw

    from screener.explain import fuse_overlay
    from screener.reporting.sc import burn_text

    k = max(1, int(round(height / images[0].shape[0])))
    blocks = []
    top = max(float(np.max(p)) for p in pfdrrs)
    vmax = max(2.0 * threshold, top, 1e-6)
    for img, pf, side in zip(images, pfdrrs, sides):
        if side == "L":
            img, pf = img[:, ::-1], pf[:, ::-1]
        heat = np.where(pf >= 0.5 * threshold, np.clip(pf / vmax, 0.0, 1.0), 0.0)
        plain = fuse_overlay(img, np.zeros_like(img), alpha=0.0, vmin=0.0, vmax=1.0)
        fused = fuse_overlay(img, heat, alpha=0.5, vmin=0.0, vmax=1.0)
        fused = np.where((heat > 0)[..., None], fused, plain)
        pair = [plain, fused] if side == "R" else [fused, plain]
        blocks.append(np.concatenate(pair, axis=1))
    body = np.concatenate(blocks, axis=1)
    body = np.repeat(np.repeat(body, k, axis=0), k, axis=1)
    img = Image.fromarray(np.ascontiguousarray(body), mode="RGB")
    draw = ImageDraw.Draw(img)
    lines = [f"{ {'R': 'right', 'L': 'left'}.get(s, 'side not determined:')} femoral neck: BMD {b:.3f} g/cm2, T {t:.1f} ({g}); "
             f"PF-DRR fit {lin:.3f}" for s, b, t, g, lin in results]
    lines.append("BMD-GAN: radiograph -> PF-DRR (colour) -> BMD")
    burn_text(draw, lines, max(10, min(16, body.shape[1] // 40)), body.shape[0])
    return np.asarray(img, dtype=np.uint8).copy(), float(pixel_mm) / k
