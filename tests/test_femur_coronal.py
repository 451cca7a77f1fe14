"""Protocol ``femur_coronal`` (Ha et al. 2024): preprocessing, locator, dataset builder, protocol, bundle."""
from __future__ import annotations

import copy
import csv
from pathlib import Path

import numpy as np
import pytest

from screener.config import Config
from screener.preprocess import femur_coronal as P
from screener.protocols.base import ProtocolContext, ProtocolDeclined
from screener.protocols.femur_coronal import CLASSES, FemurCoronalProtocol
from screener.series import load_volume, read_series_info

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "models" / "femur_coronal"
SEED = 11


def _render(out: Path, index: int, profile: str, z_range: tuple[float, float] | None) -> tuple[list[Path], object]:
    from training.phantoms.anatomy import build_scene
    from training.phantoms.ct import render_ct, write_series
    from training.phantoms.population import make_patient

    scene = build_scene(make_patient(SEED, index))
    zh = scene.landmarks["z_hip"]
    zr = None if z_range is None else (zh + z_range[0], zh + z_range[1])
    return write_series(render_ct(scene, profile, SEED, z_range=zr), out), scene


@pytest.fixture(scope="module")
def hip_ct(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], object]:
    """Patient 2 of cohort 11 (osteoporotic hip), GE 2.5 mm, hips only (fast)."""
    return _render(tmp_path_factory.mktemp("hip"), 2, "ge_ap_pv", (110.0, -80.0))


@pytest.fixture(scope="module")
def hip_volume(hip_ct: tuple[list[Path], object]):
    return load_volume(hip_ct[0])


def _context(paths: list[Path]) -> ProtocolContext:
    return ProtocolContext(config=Config(models_dir=REPO / "models", device="cpu"), info=read_series_info(paths))


def test_locator_finds_both_heads_within_2mm(hip_ct, hip_volume) -> None:
    _, scene = hip_ct
    heads = P.locate_femoral_heads(hip_volume)
    assert set(heads) == {"R", "L"}
    for side in ("R", "L"):
        err = np.linalg.norm(np.asarray(heads[side]) - np.asarray(scene.femoral_heads[side]))
        assert err < 2.0, (side, err)


def test_manifest_builder_and_protocol_give_identical_tensors(tmp_path: Path, hip_ct, hip_volume) -> None:
    from training.datasets.femur_coronal import build
    from training.recipes import load_recipe

    paths, _ = hip_ct
    man = tmp_path / "manifest.csv"
    with man.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patient_id", "dicom_path", "grade"])
        w.writerow(["p1", str(paths[0].parent), "osteoporosis"])
    import dataclasses

    from training.recipes import DataSpec

    recipe = load_recipe(REPO / "training" / "recipes" / "femur_coronal-cohort.toml")
    recipe = dataclasses.replace(recipe, data=DataSpec(source="manifest", path=str(man)))
    ds = build(recipe)
    image, demo, _, _ = FemurCoronalProtocol.inputs(hip_volume)
    assert ds.images.shape == (1, 2, P.INPUT_PX, P.INPUT_PX)
    assert np.array_equal(ds.images[0], image)
    assert np.array_equal(ds.extras[0], demo)
    assert ds.targets.tolist() == [2]


def test_phantom_source_looks_like_the_reformat(hip_ct, hip_volume) -> None:
    """The cohort's rendered crops match the crops sampled from the written CT (same heads)."""
    from training.datasets.femur_coronal import PhantomCoronalSource
    from training.phantoms.profiles import get_profile

    _, scene = hip_ct
    real, _ = P.preprocess(__import__("screener.preprocess.sampling", fromlist=["x"]).VolumeSampler(hip_volume),
                           scene.femoral_heads)
    z_bottom = float(hip_volume.slice_positions()[:, 2].min())
    synth, _ = P.preprocess(PhantomCoronalSource(scene, get_profile("ge_ap_pv"), 3, z_bottom), scene.femoral_heads)
    r = np.corrcoef(real.ravel(), synth.ravel())[0, 1]
    assert r > 0.93, r
    assert abs(float(real.mean() - synth.mean())) < 0.02


def test_header_demographics_and_missing_ones(hip_volume) -> None:
    ds = hip_volume.datasets[0]
    d = P.header_demographics(ds)
    assert d["sex"] in ("M", "F") and 20 <= d["age"] <= 90 and 140 < d["height_cm"] < 210
    v = P.demographics_vector(d["age"], d["sex"], d["height_cm"], d["weight_kg"])
    bmi = d["weight_kg"] / (d["height_cm"] / 100) ** 2
    assert v[4] == pytest.approx((bmi - P.DEMO_MEAN[4]) / P.DEMO_SD[4], rel=1e-5)
    for name in ("PatientAge", "PatientSex", "PatientSize", "PatientWeight"):
        bad = copy.deepcopy(ds)
        delattr(bad, name)
        with pytest.raises(P.MissingDemographics) as exc:
            P.header_demographics(bad)
        assert exc.value.name == name and name in str(exc.value)


def test_accepts_and_declines_with_reasons(tmp_path: Path, hip_ct, hip_volume) -> None:
    proto = FemurCoronalProtocol()
    info = read_series_info(hip_ct[0])
    assert proto.accepts(info).accepted
    chest = type(info)(**{**info.__dict__, "body_part": "CHEST"})
    d = proto.accepts(chest)
    assert not d.accepted and "CHEST" in d.reason
    # no PatientWeight in the header: declined, naming it
    vol = load_volume(hip_ct[0])
    for ds in vol.datasets:
        del ds.PatientWeight
    with pytest.raises(ProtocolDeclined, match="PatientWeight"):
        proto.run(vol, _context(hip_ct[0]))
    # a series that ends above the hips
    paths, _ = _render(tmp_path / "abd", 2, "ge_ap_pv", (200.0, 40.0))
    with pytest.raises(ProtocolDeclined, match="femoral heads not in coverage"):
        proto.run(load_volume(paths), _context(paths))


def test_dataset_builder_cohort_shapes_and_targets() -> None:
    import dataclasses

    from training.datasets.femur_coronal import build, grade_index
    from training.recipes import load_recipe

    recipe = load_recipe(REPO / "training" / "recipes" / "femur_coronal-cohort.toml")
    recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, n=4, seed=5))
    ds = build(recipe)
    assert ds.images.shape == (4, 2, P.INPUT_PX, P.INPUT_PX) and ds.extras.shape == (4, 5)
    assert ds.images.min() >= 0.0 and ds.images.max() <= 1.0
    assert ds.targets.tolist() == [grade_index(t) for t in ds.attributes["t_score"]]
    assert set(ds.attributes["profile"]) <= set(recipe.data.profiles) | set(recipe.data.holdout_profiles)
    assert grade_index(-1.0) == 0 and grade_index(-1.01) == 1 and grade_index(-2.5) == 2


@pytest.mark.skipif(not (BUNDLE / "model_card.json").is_file(), reason="bundle not trained yet")
def test_shipped_bundle_grades_a_rendered_series(hip_ct, hip_volume) -> None:
    from training.datasets.femur_coronal import _hip_t, grade_index

    paths, scene = hip_ct
    (f,) = FemurCoronalProtocol().run(hip_volume, _context(paths))
    probs = [m.value for m in f.measurements]
    assert [m.name for m in f.measurements] == [f"P({c})" for c in CLASSES]
    assert sum(probs) == pytest.approx(100.0, abs=1e-3)
    truth = grade_index(_hip_t(scene, "hip"))
    assert abs(CLASSES.index(f.category) - truth) <= 1
    assert probs[truth] > 20.0
    assert f.overlay is not None and f.overlay.ndim == 3 and f.overlay.shape[2] == 3
    assert f.roi is not None and np.array_equal(f.roi.polygon[0], f.roi.polygon[-1])
    assert f.roi.source_sop_instance_uid in {str(d.SOPInstanceUID) for d in hip_volume.datasets}
    assert set(f.details["timing_ms"]) == {"preprocess", "model", "explain"}
    assert f.details["bundle_id"] == "femur_coronal@1.0.0"
