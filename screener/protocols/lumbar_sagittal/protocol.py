"""Protocol ``lumbar_sagittal``: BMD and TBS from mid-vertebral sagittal L1-L4 (Yoshida et al. 2023).

Method (seed 002)
-----------------
1. The spine localizer (shared with the other spine protocols of the series)
   finds L1-L4; without all four the protocol declines naming the missing levels.
2. :func:`screener.protocols.lumbar_sagittal.preprocess.preprocess` samples a 5 mm sagittal
   slab through each vertebral centroid (FOV / size from the bundle's card;
   the paper: 300 mm, 256 x 256), windowed to 0..1 -- the very function the
   training data set was made with.  When the bundle's card says
   ``energy_correction`` the HU are first rescaled to 120 kVp by the series'
   ``KVP`` (hydroxyapatite HU-per-mg ratio; not in the paper, which used
   120 kVp only).
3. The bundle's fold ensemble (ResNet-50 regressor, outputs BMD g/cm^2 and
   TBS) estimates each vertebra; the patient value is the mean of L1-L4 (as in
   the paper).  T-score with the L1-L4 reference of
   :mod:`screener.references` (default 1.047 / 0.110 g/cm^2), WHO grade from it, %YAM = 100 x BMD / 1.047 with the
   JOS grade (< 80 % low bone mass, <= 70 % osteoporosis), TBS <= 1.31 =
   impaired microarchitecture.
4. Grad-RAMP (Kang et al. eq. 3) of the BMD output, averaged over the
   ensemble, fused onto the four sagittal inputs (2 x 2 mosaic, L1 L2 / L3
   L4) is the one overlay, on the patient-level ``L1-L4`` finding.

Findings: one per vertebra (BMD, TBS) and one ``L1-L4`` finding (mean BMD,
T-score, %YAM, TBS, WHO category, flags).
"""
from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import structlog

from screener import scores
from screener.domain import Volume
from screener.findings import Finding, PlaneMap, RoiGeometry
from screener.protocols.lumbar_sagittal import preprocess as pp
from screener.protocols.base import Decision, ProtocolContext, ProtocolDeclined, axial_ct_decision
from screener.protocols.model import (ModelProtocol, axial_rectangle_roi, model_details, nearest_slice,
                                      spine_localization)
from screener.reporting import codes
from screener.series import SeriesInfo

log = structlog.get_logger(__name__)

__all__ = ["LumbarSagittalProtocol", "TBS_IMPAIRED", "YAM_BMD", "MIN_COVERAGE_MM", "preprocessing_options"]

#: TBS at or below which microarchitecture counts as impaired (Yoshida et al., McCloskey 2016)
TBS_IMPAIRED = 1.31
#: young-adult mean L1-L4 BMD (g/cm^2) for %YAM (the cohort's spine reference)
YAM_BMD = 1.047
#: L1-L4 span about 130 mm: a shorter series cannot hold them
MIN_COVERAGE_MM = 100.0
#: thicker axial slices blur the sagittal reformat beyond the paper's 0.5-1 mm reconstructions
THICK_SLICE_MM = 3.0

EXCLUDED_BODY_PARTS = frozenset({"HEAD", "BRAIN", "SKULL", "NECK", "CSPINE", "HAND", "WRIST",
                                 "FOOT", "ANKLE", "KNEE", "ELBOW", "SHOULDER", "ARM", "LEG",
                                 "EXTREMITY", "HEART", "IAC", "ORBIT", "SINUS", "CHEST", "THORAX",
                                 "TSPINE", "PELVIS", "HIP"})


def preprocessing_options(card: dict[str, Any]) -> dict[str, Any]:
    """``preprocess`` keyword arguments from a bundle card (module defaults where absent)."""
    p = card.get("preprocessing") or {}
    return {"fov_mm": float(p.get("fov_mm", pp.FOV_MM)), "size": int(p.get("size", pp.SIZE)),
            "slab_mm": float(p.get("slab_mm", pp.SLAB_MM)), "slab_planes": int(p.get("slab_planes", pp.SLAB_PLANES)),
            "windows": tuple((float(c), float(w)) for c, w in p.get("windows", pp.WINDOWS)),
            # a card without the key predates the energy correction: its model saw uncorrected HU
            "energy_correction": bool(p.get("energy_correction", False))}


class LumbarSagittalProtocol(ModelProtocol):
    """Yoshida et al. 2023 BMD / TBS from sagittal L1-L4 reformats (see module docstring)."""

    name = "lumbar_sagittal"
    routing_order = 40
    version = "1.0.0"
    bundle_name = "lumbar_sagittal"

    # ------------------------------------------------------------------ routing
    def accepts(self, info: SeriesInfo) -> Decision:
        """Axial CT volume (<= 6 mm slices) long enough to hold L1-L4 (>= 100 mm)."""
        d = axial_ct_decision(info, excluded_body_parts=EXCLUDED_BODY_PARTS)
        if not d.accepted:
            return d
        if not info.is_multiframe and info.z_coverage_mm < MIN_COVERAGE_MM:
            return Decision(False, f"z coverage {info.z_coverage_mm:.0f} mm < {MIN_COVERAGE_MM:g} mm: "
                                   "L1-L4 (about 130 mm) cannot all be in view")
        return Decision(True, f"axial CT, {info.n_slices} slices, {info.z_coverage_mm:.0f} mm coverage")

    # --------------------------------------------------------------- inference
    def inputs(self, volume: Volume, context: ProtocolContext,
               options: dict[str, Any] | None = None) -> tuple[np.ndarray, pp.PreprocessInfo, Any]:
        """Localize L1-L4 and build the network inputs exactly as the training builder does.

        Parameters
        ----------
        volume : Volume
        context : ProtocolContext
        options : dict, optional
            ``preprocess`` keyword arguments (default: from the installed bundle's card).

        Returns
        -------
        images : numpy.ndarray
            ``(4, channels, size, size)`` float32.
        info : PreprocessInfo
        localization : SpineLocalization

        Raises
        ------
        ProtocolDeclined
            When a level of L1-L4 is not located.
        """
        from screener.preprocess.sampling import VolumeSampler

        loc = spine_localization(volume, context)
        missing = [lv for lv in pp.LEVELS if loc.get(lv) is None]
        if missing:
            why = f" ({loc.reason})" if loc.reason else ""
            raise ProtocolDeclined(f"{', '.join(missing)} not in view: the sagittal inputs need L1-L4{why}")
        if options is None:
            options = preprocessing_options(self.load_bundle(context).card)
        try:
            images, info = pp.preprocess(VolumeSampler(volume), loc, kvp=context.info.kvp, **options)
        except pp.PreprocessError as exc:
            raise ProtocolDeclined(str(exc)) from exc
        return images, info, loc

    def run(self, volume: Volume, context: ProtocolContext) -> list[Finding]:
        """Estimate BMD and TBS of L1-L4; raises :class:`ProtocolDeclined` when L1-L4 are not all in view."""
        import torch

        from screener.explain import grad_ramp

        if not volume.is_axial:
            raise ProtocolDeclined("volume is not axial")
        bundle = self.load_bundle(context)
        t0 = time.perf_counter()
        images, pinfo, loc = self.inputs(volume, context, preprocessing_options(bundle.card))
        t1 = time.perf_counter()
        bundle.input_spec.check(images)
        x = torch.from_numpy(images).to(bundle.device)
        with torch.no_grad():
            folds = np.stack([m(x).double().cpu().numpy() for m in bundle.models])  # (F, 4, outputs)
        names = bundle.output_names
        ib, it = names.index("bmd"), names.index("tbs")
        pred = folds.mean(axis=0)
        t2 = time.perf_counter()
        heat = grad_ramp(bundle.models, x, output_index=ib)  # (4, H, W)
        t3 = time.perf_counter()

        info = context.info
        common_flags = self._flags(volume, info, loc)
        findings = self._vertebra_findings(volume, loc, bundle, folds, pred, (ib, it), common_flags, info)

        bmd = float(pred[:, ib].mean())
        tbs = float(pred[:, it].mean())
        from screener.references import patient_sex
        from screener.uncertainty import input_stats

        t, tref = scores.t_score_for(bmd, "L1-L4", patient_sex(info.header), context.config)
        grade = scores.who_grade(t)
        yam = 100.0 * bmd / YAM_BMD
        jos = scores.jos_grade(yam)
        impaired = tbs <= TBS_IMPAIRED
        flags = list(common_flags) + self._patient_flags(tbs, impaired, yam, jos)
        category, ccode = scores.grade_category(grade)
        timing = {"preprocess": 1000 * (t1 - t0), "model": 1000 * (t2 - t1), "explain": 1000 * (t3 - t2)}
        patient = Finding(
            protocol=self.name, protocol_version=self.version, site="L1-L4",
            site_code=codes.site_code("lumbar spine"),
            measurements=[scores.bmd_measurement(bmd, site="L1-L4", name="L1-L4 BMD"),
                          scores.t_score_measurement(t, site="L1-L4", name="L1-L4 T-score", reference=tref),
                          scores.yam_percent_measurement(yam, name="L1-L4 %YAM"),
                          scores.tbs_measurement(tbs, name="L1-L4 TBS")],
            category=category, category_code=ccode, flags=flags,
            z_extent_mm=(float(min(min(loc.get(lv).z_range_mm) for lv in pp.LEVELS)),
                         float(max(max(loc.get(lv).z_range_mm) for lv in pp.LEVELS))),
            study_uid=info.study_uid, series_uid=info.series_uid,
            details={**model_details(bundle), "who_grade": grade, "jos_grade": jos, "yam_pct": yam,
                     "tbs_impaired": bool(impaired), "t_score_reference": tref,
                     "per_vertebra": {lv: {"bmd": float(pred[j, ib]), "tbs": float(pred[j, it])}
                                      for j, lv in enumerate(pp.LEVELS)},
                     "input_stats": input_stats(images),
                     "per_fold_patient": {"bmd": folds[:, :, ib].mean(axis=1).tolist(),
                                          "tbs": folds[:, :, it].mean(axis=1).tolist()},
                     "preprocessing": pinfo.constants, "localizer": loc.method, "timing_ms": timing},
        )
        roi, k_roi = self._roi(volume, pinfo)
        patient.roi = roi
        patient.referenced_sop_instance_uids = [roi.source_sop_instance_uid] + [
            u for f in findings for u in f.referenced_sop_instance_uids if u != roi.source_sop_instance_uid]
        overlay, spacing = self._overlay(images, heat, pred, ib, it, bmd, t, tbs, grade, pinfo)
        patient.overlay = overlay
        patient.plane_maps = [PlaneMap.on(heat[j], pinfo.planes[j], lv) for j, lv in enumerate(pp.LEVELS)]
        patient.details["overlay_description"] = (
            f"Grad-RAMP of the BMD output (mean of {len(bundle.models)} fold models) on the mid-vertebral "
            f"sagittal {pinfo.constants['slab_mm']:g} mm reformats, 2x2 mosaic L1 L2 / L3 L4, "
            f"FOV {pinfo.constants['fov_mm']:g} mm each")
        patient.details["overlay_pixel_spacing_mm"] = [spacing, spacing]
        findings.append(patient)
        log.info("lumbar_sagittal measured", series_uid=info.series_uid, bmd=round(bmd, 3), tbs=round(tbs, 3),
                 grade=grade, ms={k: round(v) for k, v in timing.items()})
        return findings

    # ----------------------------------------------------------------- helpers
    def _vertebra_findings(self, volume: Volume, loc: Any, bundle: Any, folds: np.ndarray, pred: np.ndarray,
                           columns: tuple[int, int], common_flags: list[str],
                           info: SeriesInfo) -> list[Finding]:
        """One finding per level of L1-L4: its BMD and TBS (fold mean ``pred``), per-fold values, centroid."""
        ib, it = columns
        findings: list[Finding] = []
        for j, lv in enumerate(pp.LEVELS):
            v = loc.get(lv)
            k = nearest_slice(volume, v.centroid_mm)
            f = Finding(
                protocol=self.name, protocol_version=self.version, site=lv, site_code=codes.site_code(lv),
                measurements=[scores.bmd_measurement(pred[j, ib], site=lv, name=f"{lv} BMD"),
                              scores.tbs_measurement(pred[j, it], name=f"{lv} TBS")],
                flags=list(common_flags),
                z_extent_mm=(float(min(v.z_range_mm)), float(max(v.z_range_mm))),
                study_uid=info.study_uid, series_uid=info.series_uid,
                referenced_sop_instance_uids=[u for u in [volume.sop_instance_uid(k)] if u],
                details={**model_details(bundle), "level": lv,
                         "per_fold": {"bmd": folds[:, j, ib].tolist(), "tbs": folds[:, j, it].tolist()},
                         "centroid_mm": list(map(float, v.centroid_mm)),
                         "localizer_confidence": float(v.confidence)},
            )
            findings.append(f)
        return findings

    @staticmethod
    def _patient_flags(tbs: float, impaired: bool, yam: float, jos: str) -> list[str]:
        """The L1-L4 finding's own flags: impaired TBS, low %YAM (JOS)."""
        flags: list[str] = []
        if impaired:
            flags.append(scores.flag(f"TBS {tbs:.3f} <= {TBS_IMPAIRED}: bone microarchitecture impairment "
                                     "suggested (Yoshida et al. 2023 threshold)"))
        if jos != "normal":
            flags.append(scores.flag(f"%YAM {yam:.0f} %: JOS {jos} (< 80 % low bone mass, <= 70 % osteoporosis)"))
        return flags

    @staticmethod
    def _flags(volume: Volume, info: SeriesInfo, loc: Any) -> list[str]:
        out = [scores.flag("BMD and TBS are deep-learning estimates from CT (Yoshida et al. 2023), "
                           "not DXA measurements; this bundle was trained on the synthetic virtual cohort")]
        out += [scores.flag(w) for w in volume.warnings]
        if info.contrast_enhanced:
            out.append(scores.flag(f"contrast-enhanced ({(info.contrast_agent or '').strip() or 'agent unknown'}): "
                                   "the paper excluded enhanced CT; BMD may read high"))
        if info.kvp is None:
            out.append(scores.flag("kVp unknown: the paper used 120 kVp only"))
        elif abs(info.kvp - 120.0) > 5.0:
            out.append(scores.flag(f"kVp {info.kvp:g}: the paper used 120 kVp only; estimate less certain"))
        if info.slice_thickness is not None and info.slice_thickness > THICK_SLICE_MM:
            out.append(scores.flag(f"slice thickness {info.slice_thickness:g} mm: the sagittal reformat is "
                                   f"blurred along z (the paper reconstructed 0.5-1 mm)"))
        low = [lv for lv in pp.LEVELS if loc.get(lv).confidence < 0.7]
        if low:
            out.append(scores.flag(f"level labels uncertain for {', '.join(low)} (localizer confidence < 0.7)"))
        return out

    def _roi(self, volume: Volume, pinfo: pp.PreprocessInfo) -> tuple[RoiGeometry, int]:
        """Footprint of the L1-L4 sagittal slabs on the axial slice nearest their mean centroid."""
        from screener.preprocess.sampling import VolumeSampler

        sampler = VolumeSampler(volume)
        cents = np.array([pinfo.centroids_mm[lv] for lv in pp.LEVELS])
        c = cents.mean(axis=0)
        k = nearest_slice(volume, c)
        z = float(volume.index_to_patient(k, 0, 0)[2])
        half_x = max(pinfo.constants["slab_mm"], 1.0) / 2.0
        half_y = pinfo.constants["fov_mm"] / 2.0
        corners = np.array([[c[0] - half_x, c[1] - half_y, z], [c[0] + half_x, c[1] - half_y, z],
                            [c[0] + half_x, c[1] + half_y, z], [c[0] - half_x, c[1] + half_y, z]])
        roi = axial_rectangle_roi(volume, sampler, corners, k, (float(c[0]), float(c[1]), z))
        return roi, k

    @staticmethod
    def _overlay(images: np.ndarray, heat: np.ndarray, pred: np.ndarray, ib: int, it: int, bmd: float,
                 t: float, tbs: float, grade: str, pinfo: pp.PreprocessInfo) -> tuple[np.ndarray, float]:
        """2 x 2 mosaic of the inputs with Grad-RAMP, labelled, upscaled to >= 512 px; and its pixel mm."""
        from PIL import Image, ImageDraw

        from screener.explain import fuse_overlay
        from screener.reporting.sc import DISCLAIMER, _font

        size = images.shape[-1]
        tiles = [fuse_overlay(images[j, 0], heat[j], vmin=0.0, vmax=1.0) for j in range(len(pp.LEVELS))]  # bone window
        mosaic = np.concatenate([np.concatenate(tiles[0:2], axis=1), np.concatenate(tiles[2:4], axis=1)], axis=0)
        factor = max(1, int(math.ceil(256 / size)))
        img = Image.fromarray(mosaic, mode="RGB")
        if factor > 1:
            img = img.resize((mosaic.shape[1] * factor, mosaic.shape[0] * factor), Image.BILINEAR)
        draw = ImageDraw.Draw(img)
        tile = size * factor
        font = _font(max(10, min(16, tile // 20)))
        for j, lv in enumerate(pp.LEVELS):
            x0, y0 = (j % 2) * tile + 4, (j // 2) * tile + 4
            text = f"{lv}  BMD {pred[j, ib]:.3f}  TBS {pred[j, it]:.3f}"
            box = draw.textbbox((x0, y0), text, font=font)
            draw.rectangle(box, fill=(0, 0, 0))
            draw.text((x0, y0), text, fill=(255, 255, 0), font=font)
        summary = f"L1-L4 BMD {bmd:.3f} g/cm2  T {t:+.1f} ({grade})  TBS {tbs:.3f}"
        for text, y in ((summary, img.height // 2 - 20), (DISCLAIMER, img.height - 22)):
            box = draw.textbbox((4, y), text, font=font)
            draw.rectangle(box, fill=(0, 0, 0))
            draw.text((4, y), text, fill=(255, 255, 0) if text is summary else (255, 80, 80), font=font)
        spacing = float(pinfo.constants["pixel_mm"]) / factor
        return np.asarray(img, dtype=np.uint8).copy(), spacing
