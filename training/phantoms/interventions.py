"""Interventions on virtual-cohort CT patients (issue 19): the same patient with only the bone, or
only the soft tissue, changed -- for checking that every CT estimate moves as the physics says.

Used by ``benchmarks/eval_ct_interventions.py`` and ``tests/test_ct_interventions.py``; also the
share of a model's explanation map on the target bone (:func:`map_mass_on_target`).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

#: the variants :func:`intervened_scene` makes
VARIANTS = ("base", "bone x0.6", "muscle +30 HU", "fat -30 HU", "body x1.25", "bone x0.05")
#: the estimate :func:`estimates` reads from each CT protocol's findings: (protocol, site or None,
#: a word of the measurement's name)
ESTIMATES = (("l1_axial", "L1", "BMD"), ("lumbar_sagittal", "L1", "BMD"), ("femur_coronal", None, "P(osteoporosis)"),
             ("l1_attenuation", "L1", "attenuation mean"))


def estimates(findings: list[Any]) -> dict[str, float]:
    """Protocol -> its headline value among ``findings`` (:data:`ESTIMATES`): L1 BMD (g/cm2) of
    l1_axial and lumbar_sagittal, femur_coronal's P(osteoporosis) (percent), l1_attenuation's mean HU."""
    out: dict[str, float] = {}
    for protocol, site, name in ESTIMATES:
        for f in findings:
            if f.protocol == protocol and (site is None or f.site == site):
                for m in f.measurements:
                    if name.lower() in m.name.lower():
                        out[protocol] = float(m.value)
                        break
                break
    return out


def intervened_scene(seed: int, index: int, variant: str) -> tuple[Any, Any]:
    """Patient ``index`` of cohort ``seed`` (no transitional anatomy, no bone islands) as ``variant``:

    * ``"base"``;
    * ``"bone x0.6"`` / ``"bone x0.05"``: every bone's mineral scaled (``skeleton_scale``);
    * ``"muscle +30 HU"``: the muscles' soft-tissue density x 1.03, nothing else;
    * ``"fat -30 HU"``: the subcutaneous and visceral fat's density x 0.97, nothing else;
    * ``"body x1.25"``: the patient 25 % heavier (body size and fat; the bone as drawn).

    Returns
    -------
    tuple
        ``(scene, base_patient)``: the scene to render and the unchanged patient (whose header
        demographics a render should keep).

    Raises
    ------
    ValueError
        ``variant`` is not one of :data:`VARIANTS`.
    """
    from training.phantoms import anatomy, population

    if variant not in VARIANTS:
        raise ValueError(f"intervention {variant!r} unknown; use one of {VARIANTS}")
    kw: dict[str, Any] = dict(t12_ribs="normal", transitional="none", bone_islands=[])
    scale = {"bone x0.6": 0.6, "bone x0.05": 0.05}.get(variant, 1.0)
    patient = population.make_patient(seed, index, **kw, skeleton_scale=scale)
    base = population.make_patient(seed, index, **kw)
    if variant == "body x1.25":
        patient = dataclasses.replace(patient, weight_kg=patient.weight_kg * 1.25)
    scene = anatomy.build_scene(patient)
    changes = {"muscle +30 HU": ("muscle", 1.03), "fat -30 HU": ("fat", 0.97)}
    if variant in changes:
        scale_tissue_density(scene, *changes[variant])
    return scene, base


#: the basis material whose partial density :func:`scale_tissue_density` scales, per soft tissue
TISSUE_MATERIAL = {"muscle": "soft", "fat": "fat"}


def scale_tissue_density(scene: Any, tissue: str, factor: float) -> None:
    """Multiply the density of every ``tissue`` (``"muscle"`` or ``"fat"``: its
    :data:`TISSUE_MATERIAL` partial density) of ``scene`` by ``factor``, in place; nothing else
    changes (the soft-tissue interventions, and the habitus copies of a training cohort)."""
    key = TISSUE_MATERIAL[tissue]
    for i in scene.tissues.ids(tissue):
        scene.tissues.comp[int(i)][key] = scene.tissues.comp[int(i)].get(key, 0.0) * factor


def render_for_ct_models(scene: Any, base: Any, out: Path, seed: int) -> list[Path]:
    """A 2.5 mm abdomen-pelvis CT (``canon_ap_native``) from T11 to 60 mm below the femoral heads --
    what every CT protocol needs -- with the base patient's weight in the header (femur_coronal reads
    it as an input; it is not soft tissue). Returns the written files."""
    from training.phantoms import ct, profiles

    prof = profiles.get_profile("canon_ap_native").with_(slice_thickness=2.5, slice_spacing=2.5)
    z_lo = min(c[2] for c in scene.femoral_heads.values()) - 60.0
    z_hi = scene.vertebra("T11").centroid_mm[2]
    dss = ct.render_ct(scene, prof, seed=seed, z_range=(z_hi, z_lo))  # (superior, inferior)
    for ds in dss:
        ds.PatientWeight = f"{base.weight_kg:.1f}"
    return ct.write_series(dss, out)


def target_structure(label: str) -> str:
    """The phantom structure a map on a plane labelled ``label`` should lie on: the vertebral body
    (cortex and trabecular bone) of a level (``"L1"``), or the femur of a side (``"R"``, ``"L"``)."""
    return f"femur_{label}" if label in ("R", "L") else f"{label}_body"


def map_mass_on_target(finding: Any, scene: Any) -> float | None:
    """Share of a finding's explanation-map mass (:class:`screener.findings.PlaneMap`, on the planes
    the network read) that lies on the phantom's target bone (:func:`target_structure`); ``None``
    when the finding has no map."""
    import numpy as np

    from screener.preprocess.sampling import plane_points

    total = inside = 0.0
    for pm in finding.plane_maps:
        pts = plane_points(pm.origin, pm.u, pm.v, pm.values.shape, pm.spacing)
        w = np.asarray(pm.values, dtype=np.float64)
        mask = scene.structure_mask(target_structure(pm.label), pts[..., 0], pts[..., 1], pts[..., 2])
        total += float(w.sum())
        inside += float(w[mask].sum())
    return inside / total if total > 0 else None
