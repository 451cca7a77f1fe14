"""Protocol ``hip_xray``: femoral-neck BMD from an AP pelvis / hip radiograph (Gu et al. 2023, BMD-GAN).

Router: a DX/CR (or DX "for presentation") single-frame greyscale projection radiograph whose
``BodyPartExamined`` / descriptions name the pelvis or hip, in an AP or PA view.  Chest
radiographs, lateral views (``ViewPosition`` LL/RL/LAT, a lateral ``PatientOrientation``) and other
body parts are declined with the reason.

Run (``needs_volume = False``: the file of ``context.info.paths`` is read):

1. :func:`screener.preprocess.hip_xray.preprocess_hip_radiograph` -- window to ``[0, 1]``, square
   pixels, split at the midline into the patient's right and left hip (the left mirrored), each
   fitted to the bundle's input shape;
2. the bundle's stage-3 regressor ``R = {M_E, M_R}`` gives the femoral-neck BMD of each hip; the
   stage-2 generator decomposes each hip into its proximal-femur DRR (PF-DRR), whose mean above the
   threshold ``t`` gives a second, linear estimate; the reported BMD is
   ``(1 - w) * regression + w * linear`` with the card's ``linear_weight`` ``w``
   (:func:`combine_estimates`; ``w = 0``: the regression alone), both parts in ``details``;
3. one finding per hip: BMD (g/cm^2), T-score against NHANES III femoral neck (0.858 / 0.120) and
   the WHO grade; the ROI is the PF-DRR region (above ``t``) mapped back onto the radiograph;
4. one overlay for the series (on the first hip's finding): the two radiograph halves as the
   network saw them, with the decomposed PF-DRRs colour-coded on top and the numbers burned in.

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
from screener.protocols.model import ModelProtocol, model_details, resolve_device
from screener.reporting import codes

log = structlog.get_logger(__name__)

__all__ = ["HipXrayProtocol", "hip_decision"]

#: Body parts / words that identify a pelvis or hip radiograph.
HIP_WORDS = ("PELVIS", "HIP", "FEMUR", "COXA", "HUEFTE", "HÜFTE", "BECKEN")
#: Words of other radiographs, named in the decline.
OTHER_WORDS = ("CHEST", "THORAX", "LUNG", "SKULL", "HAND", "KNEE", "SPINE", "ABDOMEN", "SHOULDER", "FOOT")
LATERAL_VIEWS = ("LL", "RL", "LAT", "LATERAL", "LLO", "RLO", "XTABLE")
SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1.1": "DX for presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "DX for processing",
    "1.2.840.10008.5.1.4.1.1.1": "CR",
}
NHANES_FN = (0.858, 0.120)
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
    if info.sop_class_uid and info.sop_class_uid not in SOP_CLASSES:
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
    return Decision(True, f"{SOP_CLASSES.get(info.sop_class_uid, modality)} {view or 'AP'} pelvis/hip radiograph "
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
    version = "0.1.0"
    bundle_name = "hip_xray"
    needs_volume = False
    accepts_derived = True  # DX "for presentation" images are often DERIVED\PRIMARY

    def accepts(self, info: Any) -> Decision:
        """See :func:`hip_decision`."""
        return hip_decision(info)

    # ----------------------------------------------------------------- bundle
    def load_bundle(self, context: ProtocolContext) -> Any:
        """The stage-3 bundle (cached), loaded with the BMD-GAN networks."""
        from screener.bundles import BundleError, load_bundle
        from screener.nets.bmdgan import BMDGenerator, BMDRegressor
        from screener.protocols import model as M

        path = self.bundle_path(context)
        device = resolve_device(context.config.device)
        key = (str(path.resolve()), device)
        with M._LOCK:
            if key in M._CACHE:
                return M._CACHE[key]
            if not (path / "model_card.json").is_file():
                raise ProtocolDeclined(f"model bundle {path} not installed: run screener train "
                                       f"training/recipes/{self.name}-cohort.toml --out {path.parent}")
            try:
                bundle = load_bundle(path, device, networks={"BMDRegressor": BMDRegressor,
                                                             "BMDGenerator": BMDGenerator})
            except BundleError as exc:
                raise ProtocolDeclined(f"model bundle {path} unusable: {exc}") from exc
            if bundle.protocol != self.name:
                raise ProtocolDeclined(f"model bundle {path} is for {bundle.protocol}, not {self.name}")
            M._CACHE[key] = bundle
            return bundle

    def load_generator(self, bundle: Any) -> tuple[Any, dict[str, Any]]:
        """The stage-2 generator and the card's ``decomposition`` entry (cached)."""
        import torch

        from screener.bundles import BUNDLE_FORMAT
        from screener.nets.bmdgan import BMDGenerator

        key = (str(Path(bundle.path).resolve()), str(bundle.device))
        with _AUX_LOCK:
            if key in _AUX:
                return _AUX[key]
            dec = bundle.card.get("decomposition") or {}
            f = Path(bundle.path) / str(dec.get("file", ""))
            if not dec or not f.is_file():
                raise ProtocolDeclined(f"model bundle {bundle.path} has no decomposition generator "
                                       "(card 'decomposition' entry / file missing): retrain it")
            blob = torch.load(f, map_location="cpu", weights_only=True)
            if not isinstance(blob, dict) or blob.get("format") != BUNDLE_FORMAT:
                raise ProtocolDeclined(f"{f}: not a {BUNDLE_FORMAT} weights file")
            gen = BMDGenerator(**dec["generator_kwargs"])
            gen.load_state_dict({k: (v.float() if v.is_floating_point() else v) for k, v in blob["folds"][0].items()})
            gen = gen.eval().to(bundle.device)
            _AUX[key] = (gen, dec)
            return gen, dec

    # -------------------------------------------------------------------- run
    def run(self, volume: Any, context: ProtocolContext) -> list[Finding]:
        """Read the radiograph of ``context.info.paths``; one finding per hip, one overlay."""
        import pydicom
        import torch

        from screener.preprocess.hip_xray import HIP_PIXEL_MM, preprocess_hip_radiograph
        from screener.radiograph import RadiographError
        from screener.scores import bmd_measurement, flag, grade_category, t_score, t_score_measurement, who_grade

        info = context.info
        if not info.paths:
            raise ProtocolDeclined("no radiograph file in the series")
        bundle = self.load_bundle(context)
        gen, dec = self.load_generator(bundle)
        t0 = time.perf_counter()
        ds = pydicom.dcmread(Path(info.paths[0]))
        shape = tuple(int(v) for v in bundle.input_spec.shape[1:])
        pixel_mm = float((bundle.card.get("preprocessing") or {}).get("pixel_mm", HIP_PIXEL_MM))
        try:
            rad, hips = preprocess_hip_radiograph(ds, shape=shape, pixel_mm=pixel_mm)
        except RadiographError as exc:
            raise ProtocolDeclined(str(exc)) from exc
        sides = [s for s in ("R", "L") if s in hips]
        x = np.stack([hips[s].image for s in sides])[:, None].astype(np.float32)
        t1 = time.perf_counter()
        bmd = bundle.predict(x)[:, 0]
        with torch.no_grad():
            pf = gen(torch.from_numpy(x).to(bundle.device)).float().cpu().numpy()[:, 0]
        t2 = time.perf_counter()
        thr = float(dec["threshold_t"])
        w_lin = float(dec.get("linear_weight", 0.0))
        ref = bundle.card.get("t_score_reference") or {}
        mean, sd = float(ref.get("mean") or NHANES_FN[0]), float(ref.get("sd") or NHANES_FN[1])
        uid, sop_class = str(ds.SOPInstanceUID), str(ds.SOPClassUID)
        sr_mm, sc_mm = rad.source_spacing_mm
        findings: list[Finding] = []
        results = []
        for i, side in enumerate(sides):
            hip = hips[side]
            mask = pf[i] >= thr
            linear = float(dec["slope"] * pf[i][mask].mean() + dec["intercept"]) if mask.any() else float("nan")
            stage3 = float(bmd[i])
            value = float(combine_estimates(np.array([stage3]), np.array([linear]), w_lin)[0])
            t = t_score(value, mean, sd)
            grade = who_grade(t)
            category, category_code = grade_category(grade)
            flags = [flag("BMD estimated from a plain radiograph by a model (BMD-GAN), not measured by DXA; "
                          "trained on a synthetic virtual cohort")]
            if not mask.any():
                flags.append(flag(f"the decomposition found no proximal femur (PF-DRR below t = {thr:g}): "
                                  "hip not in view or image atypical; do not use this estimate"))
            elif abs(linear - stage3) > 0.1:
                flags.append(flag(f"the PF-DRR linear estimate ({linear:.3f} g/cm2) differs from the regression "
                                  f"by {abs(linear - stage3):.3f} g/cm2: atypical image, review"))
            rows, cols = np.nonzero(mask) if mask.any() else (np.array([0, shape[0] - 1]), np.array([0, shape[1] - 1]))
            r0, r1, c0, c1 = rows.min() - 0.5, rows.max() + 0.5, cols.min() - 0.5, cols.max() + 0.5
            pr, pc = hip.to_stored(np.array([r0, r0, r1, r1]), np.array([c0, c1, c1, c0]))
            poly = np.stack([pc + 0.5, pr + 0.5], axis=1)
            poly = np.vstack([poly, poly[:1]])
            roi = RoiGeometry(source_sop_instance_uid=uid, source_sop_class_uid=sop_class, polygon=poly,
                              centre_mm=(float(pc.mean() + 0.5) * sc_mm, float(pr.mean() + 0.5) * sr_mm, 0.0),
                              area_mm2=float(mask.sum()) * hip.pixel_mm ** 2, slice_index=0)
            name = {"R": "right", "L": "left"}[side]
            site = f"{name} femoral neck"
            details: dict[str, Any] = {
                **model_details(bundle), "side": side, "laterality": name,
                "bmd_regression_g_cm2": stage3, "bmd_pfdrr_linear_g_cm2": linear, "bmd_linear_weight": w_lin,
                "pfdrr_threshold_t": thr, "pfdrr_pixels_above_t": int(mask.sum()),
                "t_score_reference": {"mean": mean, "sd": sd, "source": ref.get("source", "NHANES III femoral neck")},
                "input_shape": list(shape), "input_pixel_mm": hip.pixel_mm,
                "roi_note": "ROI = bounding box of the decomposed PF-DRR above t, on the stored radiograph; "
                            "centre in image-plane mm (column, row, 0), not patient LPS",
            }
            findings.append(Finding(
                protocol=self.name, protocol_version=self.version, site=site, site_code=codes.site_code(site),
                measurements=[bmd_measurement(value, site="femur", name=f"{site} BMD"),
                              t_score_measurement(t, site="femur", name=f"{site} T-score")],
                category=category, category_code=category_code, flags=flags, roi=roi,
                study_uid=info.study_uid, series_uid=info.series_uid, referenced_sop_instance_uids=[uid],
                details=details))
            results.append((side, value, t, grade, linear))
        overlay, ov_mm = render_hip_overlay([hips[s].image for s in sides], list(pf), sides, thr, results,
                                            hips[sides[0]].pixel_mm)
        findings[0].overlay = overlay
        t3 = time.perf_counter()
        for f in findings:  # the model stage includes the decomposition; the overlay is the explanation
            f.details["timing_ms"] = {"preprocess": 1000 * (t1 - t0), "model": 1000 * (t2 - t1),
                                      "explain": 1000 * (t3 - t2)}
        findings[0].details["overlay_description"] = (
            "hip radiograph halves as the network saw them (left hip unmirrored) with the decomposed "
            "proximal-femur DRR (BMD-GAN stage 2) colour-coded, and the BMD estimates")
        findings[0].details["overlay_pixel_spacing_mm"] = [ov_mm, ov_mm]
        log.info("hip_xray read", series_uid=info.series_uid,
                 **{f"bmd_{s}": round(v, 3) for s, v, *_ in results})
        return findings


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
    lines = [f"{'right' if s == 'R' else 'left'} femoral neck: BMD {b:.3f} g/cm2, T {t:.1f} ({g}); "
             f"PF-DRR fit {lin:.3f}" for s, b, t, g, lin in results]
    lines.append("BMD-GAN: radiograph -> PF-DRR (colour) -> BMD")
    burn_text(draw, lines, max(10, min(16, body.shape[1] // 40)), body.shape[0])
    return np.asarray(img, dtype=np.uint8).copy(), float(pixel_mm) / k
