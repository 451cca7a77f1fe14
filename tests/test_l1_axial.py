"""Protocol ``l1_axial`` (Kang et al. 2023): slice choice, cohort builder, identical training/inference
tensors, routing, and the shipped bundle on a rendered virtual-cohort CT."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from screener.protocols.l1_axial import preprocess as P

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "models" / "l1_axial"
COHORT_RECIPE = ROOT / "training" / "recipes" / "l1_axial-cohort.toml"


# ------------------------------------------------------------------------------ slice choice
def _ring_source(radius_of_z: Any) -> Any:
    """A plane source drawing a vertebra-like ring (cortex 600 HU, inside 150 HU) around (0, 0)."""

    def source(origin: Any, u: Any, v: Any, shape: tuple[int, int], spacing: tuple[float, float]) -> np.ndarray:
        jj, ii = np.mgrid[0:shape[0], 0:shape[1]].astype(float)
        x = origin[0] + ii * spacing[1] * u[0] + jj * spacing[0] * v[0]
        y = origin[1] + ii * spacing[1] * u[1] + jj * spacing[0] * v[1]
        r = np.hypot(x, y)
        r0 = radius_of_z(origin[2])
        img = np.full(shape, 0.0, np.float32)
        if r0 > 0:
            img[r < r0] = 150.0
            img[(r >= r0) & (r < r0 + 1.5)] = 600.0
        return img

    return source


def test_reference_slice_is_the_largest_enclosed_trabecular_area() -> None:
    # radius 14 mm at z = 4 mm, smaller elsewhere; no body (disc) beyond |z| > 11 mm
    radius = lambda z: 0.0 if abs(z) > 11.0 else 14.0 - 0.15 * abs(z - 4.0)  # noqa: E731
    geom = P.L1Geometry.from_grid((0.0, 0.0, 0.0), (-12.0, 12.0), spacing_mm=2.0)
    images, info = P.preprocess(_ring_source(radius), geom, size=64, fov_mm=100.0, n_neighbours=1)
    assert info.z_reference == pytest.approx(4.0)
    assert info.z_samples == pytest.approx([4.0, 2.0, 6.0])
    assert images.shape == (3, 1, 64, 64) and images.dtype == np.float32
    # enclosed area of the 14 mm disc: the 0.6 mm smoothing moves the cortex edge ~0.6 mm inwards
    assert info.areas_mm2[4.0] == pytest.approx(np.pi * 13.4 ** 2, rel=0.03)
    assert info.areas_mm2[-12.0] == 0.0 and not info.fallback
    # fixed window: 150 HU inside the body -> (150 + 200) / 1500
    c = images[0, 0, 64 // 2 - int(P.CROP_POSTERIOR_MM / (100.0 / 64)), 32]
    assert c == pytest.approx(350.0 / 1500.0, abs=1e-6)


def test_reference_prefers_slices_whose_neighbours_cut_the_body() -> None:
    # the largest ring is at the last slice before the disc: its neighbour would be the disc
    radius = lambda z: 0.0 if z > 10.5 or z < -10.5 else 12.0 + (4.0 if z > 9.0 else 0.0) + 0.1 * z  # noqa: E731
    geom = P.L1Geometry.from_grid((0.0, 0.0, 0.0), (-12.0, 12.0), spacing_mm=2.0)
    _, info = P.preprocess(_ring_source(radius), geom, size=32, fov_mm=100.0, n_neighbours=1)
    assert info.areas_mm2[10.0] > info.areas_mm2[8.0] > 0
    assert info.z_reference == pytest.approx(8.0)


def test_energy_correction_rescales_the_crop_not_the_slice_choice() -> None:
    from screener.preprocess.energy import energy_scale

    radius = lambda z: 0.0 if abs(z) > 11.0 else 14.0 - 0.15 * abs(z - 4.0)  # noqa: E731
    geom = P.L1Geometry.from_grid((0.0, 0.0, 0.0), (-12.0, 12.0), spacing_mm=2.0)
    off, i0 = P.preprocess(_ring_source(radius), geom, size=64, fov_mm=100.0, energy_correction=False, kvp=80.0)
    unknown, _ = P.preprocess(_ring_source(radius), geom, size=64, fov_mm=100.0, energy_correction=True, kvp=None)
    at120, _ = P.preprocess(_ring_source(radius), geom, size=64, fov_mm=100.0, energy_correction=True, kvp=120.0)
    on, i1 = P.preprocess(_ring_source(radius), geom, size=64, fov_mm=100.0, energy_correction=True, kvp=80.0)
    assert np.array_equal(off, unknown) and np.array_equal(off, at120)  # unknown kVp / 120 kVp: no change
    assert i1.z_samples == i0.z_samples and i1.extras["energy_scale"] == pytest.approx(energy_scale(80.0))
    c = 64 // 2 - int(P.CROP_POSTERIOR_MM / (100.0 / 64))
    assert on[0, 0, c, 32] == pytest.approx((150.0 * energy_scale(80.0) + 200.0) / 1500.0, abs=1e-6)
    assert P.energy_constants(True)["energy_correction"] and P.energy_constants(False) == {"energy_correction": False}
    with pytest.raises(ValueError, match="kVp must be a positive"):
        P.preprocess(_ring_source(radius), geom, size=32, fov_mm=100.0, energy_correction=True, kvp=-1.0)


def test_no_enclosed_body_falls_back_to_the_centroid_slice() -> None:
    geom = P.L1Geometry.from_grid((0.0, 0.0, 1.0), (-6.0, 6.0), spacing_mm=3.0)
    _, info = P.preprocess(_ring_source(lambda z: 0.0), geom, size=32, fov_mm=100.0, n_neighbours=0)
    assert info.fallback and info.z_reference == pytest.approx(0.0) and len(info.z_samples) == 1


# ------------------------------------------------------------------------------ cohort builder
def test_l1_abmd_equals_the_cohort_label() -> None:
    from training.datasets.l1_axial import l1_abmd
    from training.phantoms import anatomy, labels, population

    p = population.make_patient(11, 2)
    full = labels.areal_bmd(anatomy.build_scene(p))["L1"]
    fast = l1_abmd(anatomy.build_scene(p, z_window=(-60.0, 60.0)))
    assert fast == pytest.approx(full, rel=1e-9)


def test_cohort_builder_n4_shapes_targets_profiles() -> None:
    from training.datasets.l1_axial import build, l1_abmd
    from training.phantoms import anatomy, population
    from training.recipes import load_recipe

    r = load_recipe(COHORT_RECIPE)
    r = dataclasses.replace(r, data=dataclasses.replace(r.data, n=4, seed=5,
                                                        options={**r.data.options, "size": 32}),
                            network=dataclasses.replace(r.network, kwargs={"input_size": 32}))
    ds = build(r)
    assert ds.images.shape == (12, 1, 32, 32)
    assert float(ds.images.min()) >= 0.0 and float(ds.images.max()) <= 1.0
    assert list(ds.attributes["slice"][:3]) == ["reference", "neighbour", "neighbour"]
    assert len(set(ds.patient_ids)) == 4 and set(ds.attributes["profile"]) <= set(r.data.profiles) | set(
        r.data.holdout_profiles)
    truth = l1_abmd(anatomy.build_scene(population.make_patient(5, 0), z_window=(-60.0, 60.0)))
    assert ds.targets[:3] == pytest.approx([truth] * 3, rel=1e-6)
    assert ds.meta["preprocessing"]["size"] == 32 and ds.meta["outputs"] == ["bmd"]
    assert ds.meta["preprocessing"]["energy_correction"] is True and ds.meta["preprocessing"]["reference_kvp"] == 120
    with pytest.raises(ValueError, match="input_size"):
        build(dataclasses.replace(r, network=dataclasses.replace(r.network, kwargs={"input_size": 64})))


def test_both_recipes_load() -> None:
    from training.recipes import load_recipe

    paper = load_recipe(ROOT / "training" / "recipes" / "l1_axial-paper.toml")
    cohort = load_recipe(COHORT_RECIPE)
    assert paper.training.folds == 10 and paper.training.epochs == 150 and paper.training.batch_size == 15
    assert paper.network.kwargs["input_size"] == 256 and paper.loss.kwargs["delta"] == 0.1
    assert cohort.bundle.version == "1.1.0" and cohort.bundle.t_score_mean == 0.9747
    assert cohort.data.holdout_profiles == ("heldout_fujifilm_135",)
    assert cohort.data.options["energy_correction"] is True
    assert cohort.bundle.preprocessing["calibration"] in ("none", "linear")


# ------------------------------------------------------------------------------ routing
def _info(**kw: Any) -> Any:
    from screener.series import CT_IMAGE_STORAGE, SeriesInfo

    base = dict(modality="CT", sop_class_uid=CT_IMAGE_STORAGE, orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
                n_instances=60, slice_thickness=3.0, body_part="ABDOMEN", z_range_mm=(-150.0, 150.0))
    return SeriesInfo(**{**base, **kw})


def test_accepts_and_declines_with_reasons() -> None:
    from screener.protocols.l1_axial.protocol import L1AxialProtocol

    proto = L1AxialProtocol()
    assert proto.accepts(_info()).accepted, proto.accepts(_info()).reason
    thick = proto.accepts(_info(slice_thickness=6.0))
    assert not thick.accepted and "3-5 mm" in thick.reason
    mr = proto.accepts(_info(modality="MR"))
    assert not mr.accepted and "not CT" in mr.reason
    head = proto.accepts(_info(body_part="HEAD"))
    assert not head.accepted and "HEAD" in head.reason
    sag = proto.accepts(_info(orientation=(0.0, 1.0, 0.0, 0.0, 0.0, -1.0)))
    assert not sag.accepted and "axial" in sag.reason


# ------------------------------------------------------------------------------ volume path + bundle
@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from training.datasets.l1_axial import l1_abmd
    from training.phantoms import anatomy, ct, population

    p = population.make_patient(77, 0)
    scene = anatomy.build_scene(p)
    top, bottom = scene.vertebra("T11").centroid_mm[2], scene.vertebra("L3").centroid_mm[2]
    folder = tmp_path_factory.mktemp("l1ax") / "ct"
    # an 80 kVp series, so that the energy correction (x0.61) is part of both paths
    paths = ct.write_series(ct.render_ct(scene, "siemens_lowkv_80", seed=0, z_range=(top, bottom)), folder)
    return {"paths": paths, "folder": folder, "abmd": l1_abmd(scene), "patient": p.patient_id}


@pytest.mark.skipif(not (BUNDLE / "model_card.json").is_file(), reason="models/l1_axial not trained yet")
def test_manifest_and_protocol_give_identical_tensors_and_a_sane_estimate(rendered: dict[str, Any],
                                                                          tmp_path: Path) -> None:
    from screener.bundles import Bundle
    from screener.config import Config
    from screener.protocols.base import ProtocolContext
    from screener.protocols.l1_axial.protocol import L1AxialProtocol
    from screener.series import load_volume, read_series_info
    from training.datasets.l1_axial import build
    from training.recipes import recipe_from_dict

    card = json.loads((BUNDLE / "model_card.json").read_text())
    recipe = recipe_from_dict(card["recipe"])
    csv = tmp_path / "manifest.csv"
    csv.write_text(f"patient_id,dicom_path,bmd\n{rendered['patient']},{rendered['folder']},"
                   f"{rendered['abmd']:.4f}\n")
    r = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, source="manifest", path=str(csv)))
    ds = build(r)

    seen: list[np.ndarray] = []
    orig = Bundle.predict

    def spy(self: Bundle, images: Any, extras: Any = None, batch_size: int = 16) -> np.ndarray:
        seen.append(np.array(images))
        return orig(self, images, extras, batch_size)

    cfg = Config()
    cfg = dataclasses.replace(cfg, models_dir=str(ROOT / "models"), device="cpu") if dataclasses.is_dataclass(
        cfg) else cfg
    paths = rendered["paths"]
    ctx = ProtocolContext(config=cfg, info=read_series_info(paths))
    Bundle.predict = spy  # type: ignore[method-assign]
    try:
        (finding,) = L1AxialProtocol().run(load_volume(paths), ctx)
    finally:
        Bundle.predict = orig  # type: ignore[method-assign]
    assert np.array_equal(seen[0], ds.images), "training (manifest) and inference tensors differ"
    assert ctx.info.kvp == pytest.approx(80.0)
    assert ds.targets[0] == pytest.approx(rendered["abmd"], abs=1e-4)

    bmd = finding.measurement("L1 BMD estimate").value
    assert abs(bmd - rendered["abmd"]) < 0.15, (bmd, rendered["abmd"])
    t = finding.measurement("L1 T-score estimate").value
    assert t == pytest.approx((bmd - 0.9747) / 0.1185, abs=1e-9)
    d = finding.details
    assert len(d["bmd_per_fold"]) == d["ensemble_size"] and len(d["bmd_per_slice"]) == 3
    assert set(d["timing_ms"]) >= {"preprocess", "model", "explain"}
    assert finding.overlay is not None and finding.overlay.shape == (384, 384, 3)
    poly = finding.roi.polygon
    assert np.array_equal(poly[0], poly[-1]) and len(poly) == 5
    assert finding.roi.source_sop_instance_uid == finding.referenced_sop_instance_uids[0]
    assert finding.category in ("normal", "osteopenia", "osteoporosis")
    assert d["kvp"] == pytest.approx(80.0)
    if card["preprocessing"].get("energy_correction"):
        assert d["energy_scale"] == pytest.approx(0.6133, abs=1e-3)
        assert any("rescaled to 120 kVp" in f for f in finding.flags)
    if card.get("calibration"):  # the estimate is the calibrated ensemble mean, per fold alike
        cal = card["calibration"]
        assert d["calibration"]["slope"] == pytest.approx(cal["slope"])
        assert bmd == pytest.approx(float(np.mean([s["bmd"] for s in d["bmd_per_slice"]])))
        assert float(np.mean(d["bmd_per_fold"])) == pytest.approx(bmd, abs=1e-9)


@pytest.mark.skipif(not (BUNDLE / "model_card.json").is_file(), reason="models/l1_axial not trained yet")
def test_a_card_without_energy_correction_or_calibration_runs_without_them(rendered: dict[str, Any],
                                                                            tmp_path: Path) -> None:
    import shutil

    from screener.bundles import Bundle
    from screener.config import Config
    from screener.localizer import locate_spine
    from screener.protocols.l1_axial.preprocess import preprocess_volume
    from screener.protocols.base import ProtocolContext
    from screener.protocols.l1_axial.protocol import L1AxialProtocol
    from screener.series import load_volume, read_series_info

    old = tmp_path / "models" / "l1_axial"
    shutil.copytree(BUNDLE, old)
    card = json.loads((old / "model_card.json").read_text())
    card["preprocessing"].pop("energy_correction", None)  # a round-2 card
    card.pop("calibration", None)
    (old / "model_card.json").write_text(json.dumps(card))

    seen: list[np.ndarray] = []
    raw: list[np.ndarray] = []
    orig = Bundle.predict

    def spy(self: Bundle, images: Any, extras: Any = None, batch_size: int = 16) -> np.ndarray:
        seen.append(np.array(images))
        out = orig(self, images, extras, batch_size)
        raw.append(out)
        return out

    cfg = Config()
    cfg = dataclasses.replace(cfg, models_dir=str(tmp_path / "models"), device="cpu")
    paths = rendered["paths"]
    vol = load_volume(paths)
    Bundle.predict = spy  # type: ignore[method-assign]
    try:
        (finding,) = L1AxialProtocol().run(vol, ProtocolContext(config=cfg, info=read_series_info(paths)))
    finally:
        Bundle.predict = orig  # type: ignore[method-assign]
    expected, _ = preprocess_volume(vol, locate_spine(vol).get("L1"), size=card["input_spec"]["shape"][-1],
                                    fov_mm=card["preprocessing"]["fov_mm"], energy_correction=False)
    assert np.array_equal(seen[0], expected), "a card without energy_correction must see uncorrected HU"
    d = finding.details
    assert d["energy_scale"] == 1.0 and d["calibration"] is None
    assert finding.measurement("L1 BMD estimate").value == pytest.approx(float(np.mean(raw[0][:, 0])))


@pytest.mark.skipif(not (BUNDLE / "model_card.json").is_file(), reason="models/l1_axial not trained yet")
def test_an_input_without_an_enclosed_trabecular_body_is_declined_not_estimated(tmp_path: Path) -> None:
    # issue 19: a model input that does not contain the target bone is a decline, not a flagged
    # estimate. L1 without a cortical ring (cortex as dense as the trabecular bone): nothing is
    # enclosed, so the preprocessing can only fall back to the centroid slice; the protocol says why
    from screener.config import Config
    from screener.protocols.base import ProtocolContext, ProtocolDeclined
    from screener.protocols.l1_axial.protocol import L1AxialProtocol
    from screener.series import load_volume, read_series_info
    from tests.ct_factory import make_ct_series

    cfg = dataclasses.replace(Config(), models_dir=str(ROOT / "models"), device="cpu")
    for cortex_hu, declined in ((150.0, True), (600.0, False)):
        syn = make_ct_series(tmp_path / f"c{cortex_hu:g}", n_slices=24, slice_spacing=3.0, l1_hu=150.0,
                             cortex_hu=cortex_hu)
        ctx = ProtocolContext(config=cfg, info=read_series_info(syn.paths))
        ctx.extras["spine_localization"] = syn.localization
        if declined:
            with pytest.raises(ProtocolDeclined, match="no L1 trabecular body"):
                L1AxialProtocol().run(load_volume(syn.paths), ctx)
        else:  # the same phantom with its cortex: measured (the decline is about the missing body)
            (finding,) = L1AxialProtocol().run(load_volume(syn.paths), ctx)
            assert finding.measurement("L1 BMD estimate").value > 0


def test_a_dotted_cortex_is_outlined_rather_than_declined() -> None:
    """Coarse pixels point-sampling a thin cortex leave it a dotted line (a 25 % heavier cohort
    patient at 0.94 mm pixels): the one-pixel closing finds no enclosed body, the outline with
    wider closings and rays (as l1_attenuation's) does -- and l1_axial measures instead of declining."""
    from screener.protocols.l1_axial.preprocess import outlined_trabecular_area, trabecular_area

    sp = 0.7
    n = 100
    jj, ii = np.mgrid[0:n, 0:n]
    y, x = (jj - (n - 1) / 2) * sp, (ii - (n - 1) / 2) * sp
    r = np.hypot(x / 20.0, y / 15.0)
    img = np.full((n, n), 40.0)
    img[r < 1.0] = 165.0
    shell = (r >= 1.0) & (r < 1.06)
    angle = np.degrees(np.arctan2(y, x)) % 30.0
    img[shell & (angle < 22.0)] = 450.0  # the cortex, with a 4-5 mm gap every 30 degrees
    assert trabecular_area(img, sp) == 0.0
    area = outlined_trabecular_area(img, sp)
    assert area == pytest.approx(np.pi * 20.0 * 15.0, rel=0.15)
    # nothing body-like: still nothing
    assert outlined_trabecular_area(np.full((n, n), 40.0), sp) == 0.0
