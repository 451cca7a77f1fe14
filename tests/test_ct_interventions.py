"""Test by intervention (issue 19): the same virtual-cohort patient with only the bone, or only the
soft tissue, changed, through the whole pipeline with every CT protocol and the shipped bundles.

Bone mineral x 0.6 must lower every model's BMD by >= 0.10 g/cm2 (and raise femur_coronal's
P(osteoporosis)); a muscle or fat density change must move no estimate by more than 0.05 g/cm2; next
to no bone must be a decline for every CT protocol; a 25 % heavier body (patient 1 of the cohort)
must move no BMD estimate by more than 0.05 g/cm2 either. lumbar_sagittal 1.0.0 read that body
+0.087 higher (the shortcut issue 19 is about); 1.1.0, trained with habitus copies (the same bone
under another body size and soft tissue), reads it +0.025 (``benchmarks/eval_ct_interventions.py``
gives the whole table). (l1_axial declined on that patient until its slice choice learnt to outline
a dotted cortex; it now moves by -0.009.)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from screener.config import Config
from screener.pipeline import process_series
from tests.conftest import ROOT
from training.phantoms.interventions import intervened_scene, render_for_ct_models

pytestmark = pytest.mark.slow
SEED = 47
CT_PROTOCOLS = ("l1_attenuation", "l1_axial", "femur_coronal", "lumbar_sagittal")


#: (patient, variant) -> (scene, findings, input files) of each run, for the map checks
_FINDINGS: dict[tuple[int, str], tuple[Any, list[Any], list[Path]]] = {}


def _run(tmp: Path, index: int, variant: str) -> tuple[dict[str, float], dict[str, str]]:
    scene, base = intervened_scene(SEED, index, variant)
    folder = tmp / f"p{index}-{variant.replace(' ', '_')}"
    paths = render_for_ct_models(scene, base, folder / "in", seed=SEED)
    res = process_series(paths, config=Config(models_dir=ROOT / "models"), out_dir=folder / "out")
    _FINDINGS[(index, variant)] = (scene, res.findings, paths)
    est: dict[str, float] = {}
    for f in res.findings:
        for m in f.measurements:
            if (f.protocol, f.site, m.name) in (("l1_axial", "L1", "L1 BMD estimate"),
                                               ("femur_coronal", "proximal femur", "P(osteoporosis)"),
                                               ("l1_attenuation", "L1", "L1 attenuation mean")) \
                    or (f.protocol == "lumbar_sagittal" and f.site == "L1" and "BMD" in m.name):
                est[f.protocol] = float(m.value)
    return est, {d[0]: d[2] for d in res.decisions if not d[1]}


@pytest.fixture(scope="module")
def patient0(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("interventions")
    return {v: _run(tmp, 0, v) for v in ("base", "bone x0.6", "muscle +30 HU", "bone x0.05")}


def test_less_bone_lowers_every_estimate(patient0: dict[str, Any]) -> None:
    (base, declined), (thin, _) = patient0["base"], patient0["bone x0.6"]
    assert set(base) == set(CT_PROTOCOLS) and not set(declined) & set(CT_PROTOCOLS), declined
    for p in ("l1_axial", "lumbar_sagittal"):
        assert thin[p] <= base[p] - 0.10, (p, base[p], thin[p])
    assert thin["femur_coronal"] >= base["femur_coronal"] + 50.0  # P(osteoporosis), percent
    assert thin["l1_attenuation"] <= base["l1_attenuation"] - 50.0  # HU


def test_denser_muscle_moves_no_estimate(patient0: dict[str, Any]) -> None:
    (base, _), (muscle, _) = patient0["base"], patient0["muscle +30 HU"]
    for p in ("l1_axial", "lumbar_sagittal"):
        assert abs(muscle[p] - base[p]) <= 0.05, (p, base[p], muscle[p])
    assert abs(muscle["l1_attenuation"] - base["l1_attenuation"]) < 1.0


def test_next_to_no_bone_is_a_decline_for_every_ct_protocol(patient0: dict[str, Any]) -> None:
    est, declined = patient0["bone x0.05"]
    assert not est and set(CT_PROTOCOLS) <= set(declined), (est, declined)
    assert "L1 not in view" in declined["l1_axial"] and "femoral heads" in declined["femur_coronal"]


def test_a_heavier_body_moves_no_estimate(tmp_path: Path) -> None:
    base, _ = _run(tmp_path, 1, "base")
    heavy, declined = _run(tmp_path, 1, "body x1.25")
    assert "l1_axial" not in declined, declined
    for p in ("l1_axial", "lumbar_sagittal"):
        assert abs(heavy[p] - base[p]) <= 0.05, (p, base[p], heavy[p])


def test_each_models_map_is_on_its_input_planes_and_measurable_against_truth(patient0: dict[str, Any]) -> None:
    """Every CT model keeps its explanation map on the planes it read (PlaneMap); l1_axial's share on
    the L1 body is the same whether read there or from the map it sends on the L1 slice (the
    Parametric Map's layer): two independent geometries agree."""
    import numpy as np

    from training.phantoms.interventions import map_mass_on_target

    scene, findings, paths = _FINDINGS[(0, "base")]
    masses = {f.protocol: map_mass_on_target(f, scene) for f in findings if f.plane_maps}
    assert set(masses) == {"l1_axial", "lumbar_sagittal", "femur_coronal"}, masses
    assert all(0.0 < m < 1.0 for m in masses.values()), masses
    axial = next(f for f in findings if f.protocol == "l1_axial")
    [layer] = [x for x in axial.layers if x.kind == "map"]
    [(uid, plane)] = layer.planes.items()
    from screener.series import load_volume

    vol = load_volume(paths)
    k = [vol.sop_instance_uid(i) for i in range(vol.array.shape[0])].index(uid)
    jj, ii = np.nonzero(plane > 0)
    d = np.asarray(vol.direction, float)
    p = vol.index_to_patient(k, 0, 0)[None, :] + (ii * vol.spacing[2])[:, None] * d[:, 0] \
        + (jj * vol.spacing[1])[:, None] * d[:, 1]
    w = plane[jj, ii].astype(float)
    on_slice = float(w[scene.structure_mask("L1_body", p[:, 0], p[:, 1], p[:, 2])].sum() / w.sum())
    assert on_slice == pytest.approx(masses["l1_axial"], abs=0.05), (on_slice, masses["l1_axial"])
