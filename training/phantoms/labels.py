"""Ground-truth labels of a synthetic patient, computed the way the real measurements are made.

* aBMD (g/cm2): DXA-style projections of the scene's true hydroxyapatite
  density (:func:`training.phantoms.dxa.areal_bmd_truth`): L1, L1-L4 (total
  BMC / total area), femoral neck and total hip.
* QCT vBMD: mean trabecular vBMD of L1-L2 (mg/cm3), ACR category
  (> 120 normal, 80-120 low, < 80 osteoporosis; clinical-physics.md section 2).
* L1 trabecular HU at the 120 kVp effective energy (native) and at the
  series' own energy and contrast phase: the mean of the trabecular
  composition (the texture field has zero mean).
* T-scores with the reference each seed paper uses:
  ``t_l1_kang`` (seed 000, Kang: 0.9747 / 0.1185 on L1 aBMD),
  ``t_femoral_neck`` (NHANES III white women 20-29, 0.858 / 0.120 [V]),
  ``t_total_hip`` (NHANES III 0.942 / 0.122 [R]),
  ``t_spine`` (L1-L4, Hologic young-adult 1.047 / 0.110 [R]);
  ``yam_pct`` = 100 x L1-L4 / 1.047 (seed 002's %YAM with the same spine reference).
* WHO grade from the lowest of the spine, femoral-neck and total-hip T
  (``"severe"`` = osteoporosis + prevalent fragility vertebral fracture);
  JOS grade from %YAM (< 80 low bone mass, <= 70 osteoporosis).
* TBS-like score ``1.10 + 0.30 x texture + 0.0006 x (vBMD L1-L4 - 120)``,
  clipped to 0.9-1.6 (texture = the scene's microarchitecture parameter).
* DXA-unreliable (seed 003): >= 3 of L1-L4 affected, a level being affected
  when it has a Genant >= 1 fracture, visible degeneration (level
  degeneration >= 0.5: osteophytes and sclerosis are rendered) or scoliotic
  rotation >= 4 deg.
* localization truth: z-range of each vertebral body, L1 centroid, femoral
  head centres (patient LPS mm, scene frame); :func:`level_truth` adds, for
  scoring a level localizer, whether each vertebra bears ribs (true,
  hypoplastic or lumbar ribs), a free lumbarised ``"S1"`` and the patient's
  anatomical variants (``scene.variants``, issue 14).

Bone islands and skeleton scale: :func:`trabecular_hu` is the composition of
the ``<level>_trabecular`` tissue label. A bone island is painted with its own
label (``<level>_bone_island``, part of ``<level>_body``), so its voxels are
excluded from that truth by construction -- the truth is the HU an ROI that
avoids the focus should read. ``Patient.skeleton_scale`` scales the mineral
of every bone tissue when the scene is built, so the truth follows it.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import structlog

from screener import scores
from screener.references import REFERENCES
from training.phantoms import physics
from training.phantoms.anatomy import Scene
from training.phantoms.population import CORE_LEVELS, LUMBAR

log = structlog.get_logger(__name__)

def _ref(key: str) -> tuple[float, float]:
    return REFERENCES[key].mean, REFERENCES[key].sd


# the label's T-score references (mean, SD), from the one table the reports use
KANG_L1 = _ref("kang_l1")
NHANES_FN = _ref("nhanes3_fn_women")
NHANES_TH = _ref("nhanes3_th_women")
SPINE_L1L4 = _ref("spine_l1l4_young_adult")
YAM_L1L4 = REFERENCES["spine_l1l4_young_adult"].mean  # the %YAM base (seed 002), one table
KEV_120 = physics.effective_energy(120.0)


def who_grade(t: float, fragility_fracture: bool = False) -> str:
    """WHO category of a T-score (:func:`screener.scores.who_grade`), ``"severe"`` for osteoporosis with a
    fragility fracture, ``""`` for a non-finite T-score (clinical-physics.md section 3)."""
    if not math.isfinite(t):
        return ""
    grade = scores.who_grade(t)
    return "severe" if fragility_fracture and grade == "osteoporosis" else grade


def jos_grade(yam_pct: float) -> str:
    """Japanese (JOS 2012) category of a %YAM as a label (:func:`screener.scores.jos_grade`, spaces as
    underscores: ``"low_bone_mass"``), ``""`` for a non-finite %YAM."""
    return scores.jos_grade(yam_pct).replace(" ", "_") if math.isfinite(yam_pct) else ""


def acr_category(vbmd: float) -> str:
    """ACR QCT category for the mean trabecular vBMD of two lumbar vertebrae."""
    if vbmd > 120.0:
        return "normal"
    if vbmd >= 80.0:
        return "low_bone_density"
    return "osteoporosis"


def trabecular_hu(scene: Scene, level: str, kev: float, phase: str = "native") -> float:
    """Mean HU of a vertebra's trabecular bone (marrow + mineral, iodine for the phase).

    Excludes bone-island voxels (their own label) and follows ``patient.skeleton_scale``
    (module docstring); ``level`` may be ``"S1"`` for a lumbarised (free) S1.
    """
    tab = scene.composition(phase)
    lab = int(scene.structure_ids(f"{level}_trabecular")[0])
    return float(physics.hu({b: tab[b][lab] for b in physics.BASIS}, kev))


def level_truth(scene: Scene) -> dict[str, Any]:
    """Truth for scoring a level localizer (issue 14).

    Returns ``{"levels": [...], "variants": {...}}``: ``levels`` is
    :meth:`Scene.level_truth` (per vertebra, superior to inferior: anatomical ``label`` counted
    from the top, ``z_range_mm``, ``centroid_mm``, ``has_ribs``, ``rib_kind``, ``rib_sides``,
    ``sacral_like``, ``free``); ``variants`` is ``scene.variants`` (``t12_ribs``,
    ``lumbar_rib``, ``transitional``, ``skeleton_scale``, ``bone_islands`` with their centres,
    ``n_rib_pairs``, ``lowest_rib_level``, ``n_free_lumbar_type``, ``castellvi`` and the drawn
    details such as ``t12_rib_free_length_mm``).
    """
    return {"levels": scene.level_truth(), "variants": dict(scene.variants)}


def tbs_score(scene: Scene) -> float:
    """TBS-like score from the texture parameter and lumbar vBMD (module docstring)."""
    p = scene.patient
    v = float(np.mean([p.vbmd[k] for k in LUMBAR]))
    return float(np.clip(1.10 + 0.30 * p.texture + 0.0006 * (v - 120.0), 0.9, 1.6))


def structurally_affected(patient: Any, level: str) -> bool:
    """True when ``level`` of ``patient`` has a fracture (Genant grade >= 1) or marked degeneration
    (>= 0.5): DXA of that vertebra measures the collapse or sclerosis, not bone density."""
    return patient.fracture_grade.get(level, 0) >= 1 or patient.degeneration_level.get(level, 0.0) >= 0.5


def affected_levels(scene: Scene) -> list[str]:
    """L1-L4 levels that make spine DXA unreliable (fracture, degeneration, scoliotic rotation)."""
    p = scene.patient
    out = []
    for lv in LUMBAR:
        rot = abs(scene.vertebra(lv).rotation_deg)
        if structurally_affected(p, lv) or (p.scoliosis and rot >= 4.0):
            out.append(lv)
    return out


class _BoneOnlyScene:
    """A view of a scene that paints only the skeleton layer.

    Bone labels are exact (everything painted over bone is in the same
    layer), soft tissue reads as air: the hydroxyapatite map is identical and
    ~2x cheaper, which is all the aBMD projections need.
    """

    def __init__(self, scene: Scene) -> None:
        self._scene = scene

    def __getattr__(self, name: str) -> Any:
        return getattr(self._scene, name)

    def label_plane(self, *args: Any, **kw: Any) -> np.ndarray:
        kw["bone_only"] = True
        return self._scene.label_plane(*args, **kw)

    def label_points(self, *args: Any, **kw: Any) -> np.ndarray:
        kw["bone_only"] = True
        return self._scene.label_points(*args, **kw)

    def densities(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, phase: str = "native",
                  table: bool = False) -> dict[str, np.ndarray]:
        x, y, z = np.broadcast_arrays(np.asarray(x, float), np.asarray(y, float), np.asarray(z, float))
        lab = self.label_points(x, y, z)
        return self._scene.densities_from_labels(lab, x, y, z, phase)


def areal_bmd(scene: Scene) -> dict[str, float]:
    """DXA-style aBMD truth from :func:`training.phantoms.dxa.areal_bmd_truth` (mineral-only projection)."""
    try:
        from training.phantoms.dxa import areal_bmd_truth
    except ImportError:  # pragma: no cover - the DXA module ships with the package
        log.warning("dxa_module_missing", patient=scene.patient.patient_id)
        return {k: float("nan") for k in ("L1", "L1-L4", "femoral_neck", "total_hip")}
    return dict(areal_bmd_truth(_BoneOnlyScene(scene)))


def patient_labels(scene: Scene, *, kev: float | None = None, phase: str = "native",
                   abmd: dict[str, float] | None = None, compute_abmd: bool = True) -> dict[str, Any]:
    """All labels of one patient as a flat dict (one ``labels.csv`` row).

    Parameters
    ----------
    scene : Scene
    kev, phase : float, str
        The CT series' effective energy and contrast phase for ``l1_hu_series``
        (default: the 120 kVp energy, native).
    abmd : dict, optional
        Precomputed :func:`areal_bmd` result.
    compute_abmd : bool
        When False and ``abmd`` is None, the aBMD-based labels are NaN / empty (fast path).
    """
    p = scene.patient
    if abmd is None:
        abmd = areal_bmd(scene) if compute_abmd else {}
    nan = float("nan")
    l1 = float(abmd.get("L1", nan))
    l14 = float(abmd.get("L1-L4", nan))
    fn = float(abmd.get("femoral_neck", nan))
    th = float(abmd.get("total_hip", nan))
    t_kang = (l1 - KANG_L1[0]) / KANG_L1[1]
    t_fn = (fn - NHANES_FN[0]) / NHANES_FN[1]
    t_th = (th - NHANES_TH[0]) / NHANES_TH[1]
    t_sp = (l14 - SPINE_L1L4[0]) / SPINE_L1L4[1]
    ts = [t for t in (t_fn, t_th, t_sp) if math.isfinite(t)]
    t_min = min(ts) if ts else nan
    yam = 100.0 * l14 / YAM_L1L4
    qct = 0.5 * (p.vbmd["L1"] + p.vbmd["L2"])
    aff = affected_levels(scene)
    kev_s = KEV_120 if kev is None else float(kev)
    l1v = scene.vertebra("L1")
    row: dict[str, Any] = {
        "patient_id": p.patient_id, "seed": p.seed, "index": p.index, "age": p.age, "sex": p.sex,
        "height_cm": p.height_cm, "weight_kg": p.weight_kg, "bmi": round(p.bmi, 2),
        "abmd_l1": l1, "abmd_l1_l4": l14, "abmd_femoral_neck": fn, "abmd_total_hip": th,
        "qct_vbmd_l1_l2": qct, "acr_category": acr_category(qct),
        "vbmd_l1": p.vbmd["L1"], "vbmd_femur_neck": p.vbmd["femur_neck"], "vbmd_femur_troch": p.vbmd["femur_troch"],
        "l1_hu_120kvp": trabecular_hu(scene, "L1", KEV_120, "native"),
        "l1_hu_series": trabecular_hu(scene, "L1", kev_s, phase), "series_kev": kev_s, "series_phase": phase,
        "t_l1_kang": t_kang, "kang_abnormal": bool(t_kang < -1.0) if math.isfinite(t_kang) else "",
        "t_femoral_neck": t_fn, "t_total_hip": t_th, "t_spine": t_sp, "t_min": t_min,
        "who_grade": who_grade(t_min, p.prior_vertebral_fracture), "yam_pct": yam, "jos_grade": jos_grade(yam),
        "tbs": tbs_score(scene), "texture": p.texture, "marrow_fat": p.marrow_fat,
        "cobb_deg": p.cobb_deg, "scoliosis": p.scoliosis,
        "degeneration": p.degeneration, "dxa_affected_levels": "|".join(aff),
        "dxa_unreliable": len(aff) >= 3,
        "any_vertebral_fracture": p.prior_vertebral_fracture,
        "max_fracture_grade": max(p.fracture_grade[k] for k in CORE_LEVELS),
        "fracture_5y": p.fracture_5y, "fracture_5y_prob": p.fracture_5y_prob,
        "l1_centroid_x": l1v.centroid_mm[0], "l1_centroid_y": l1v.centroid_mm[1], "l1_centroid_z": l1v.centroid_mm[2],
    }
    for lv in CORE_LEVELS:
        row[f"fx_grade_{lv}"] = p.fracture_grade[lv]
    for v in scene.vertebrae:
        row[f"z_lo_{v.label}"] = v.z_range_mm[0]
        row[f"z_hi_{v.label}"] = v.z_range_mm[1]
    for side in ("R", "L"):
        for ax, val in zip("xyz", scene.femoral_heads[side]):
            row[f"femoral_head_{side}_{ax}"] = val
    for k in ("L1", "L2", "L3", "L4", "femoral_neck_R", "femoral_neck_L", "total_hip_R", "total_hip_L"):
        if k in abmd:
            row[f"abmd_{k}"] = float(abmd[k])
    # anatomical variants (issue 14): columns for grouping cohort evaluations
    row["transitional"] = p.transitional
    row["t12_ribs"] = p.t12_ribs
    row["lumbar_rib"] = p.lumbar_rib
    row["bone_island_levels"] = "|".join(b["level"] for b in p.bone_islands)
    row["skeleton_scale"] = p.skeleton_scale
    return row


def study_json(scene: Scene, row: dict[str, Any], study: dict[str, Any]) -> dict[str, Any]:
    """Per-study JSON: the patient's labels, the full localization truth and the study's own facts."""
    return {
        "synthetic": True,
        "patient": scene.patient.to_dict(),
        "labels": row,
        "vertebrae": [{"label": v.label, "z_range_mm": list(v.z_range_mm), "centroid_mm": list(v.centroid_mm),
                       "body_height_mm": v.body_height_mm, "width_mm": v.width_mm, "depth_mm": v.depth_mm,
                       "has_ribs": v.has_ribs, "axis": list(v.axis), "rotation_deg": v.rotation_deg,
                       "rib_kind": v.rib_kind, "rib_sides": list(v.rib_sides), "sacral_like": v.sacral_like}
                      for v in scene.all_vertebrae],
        "variants": scene.variants,
        "femoral_heads": {k: list(v) for k, v in scene.femoral_heads.items()},
        "femoral_necks": scene.femoral_necks,
        "study": study,
    }


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return "" if not math.isfinite(v) else f"{v:.6g}"
    if isinstance(v, (bool, np.bool_)):
        return int(bool(v))
    return v


def write_labels_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write ``labels.csv`` (union of the rows' keys, first row's order first)."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    out = Path(path)
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k, "")) for k in keys})
    return out


def write_json(obj: Any, path: str | Path) -> Path:
    """Write JSON with stable key order (deterministic bytes)."""
    out = Path(path)
    out.write_text(json.dumps(obj, indent=1, sort_keys=True, default=_json_default) + "\n")
    return out


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.bool_,)):
        return bool(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def prevalence(rows: Iterable[dict[str, Any]], key: str = "who_grade") -> dict[str, float]:
    """Fraction of rows in each category of ``key``."""
    vals = [r[key] for r in rows]
    n = max(len(vals), 1)
    return {c: vals.count(c) / n for c in sorted(set(vals))}
