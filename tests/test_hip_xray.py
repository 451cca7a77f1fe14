"""hip_xray: preprocessing geometry, router, evaluation tables, and a tiny train -> bundle -> protocol run."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from screener.protocols.hip_xray.preprocess import preprocess_hip_radiograph
from training.phantoms.population import make_patient
from training.phantoms.projection_dicom import dx_dataset

torch.set_num_threads(1)


def _dx(image: np.ndarray, **extra: object):
    ds = dx_dataset(make_patient(1, 0), 1, image.astype(np.uint16), imager_pixel_spacing_mm=0.5,
                    magnification=1.25, sid_mm=1000.0, sod_mm=800.0, kvp=75.0, pose="supine", upright=False,
                    window=(2048.0, 4096.0))
    for k, v in extra.items():
        setattr(ds, k, v)
    return ds


def _dot_image(rows: int = 300, cols: int = 400, at: tuple[int, int] = (150, 80)) -> np.ndarray:
    img = np.full((rows, cols), 1000, dtype=np.uint16)
    img[at[0] - 2:at[0] + 3, at[1] - 2:at[1] + 3] = 4000
    return img


def _peak(a: np.ndarray) -> tuple[int, int]:
    r, c = np.unravel_index(int(np.argmax(a)), a.shape)
    return int(r), int(c)


@pytest.mark.parametrize("orientation,dot,side", [
    (None, (150, 80), "R"),            # standard view: image-left column is the patient's right hip
    (None, (100, 330), "L"),           # image right = left hip (mirrored in the tensor)
    (["R", "F"], (150, 80), "L"),      # columns towards the patient's right: image-left is the LEFT hip
])
def test_hip_pixel_maps_back_to_the_stored_radiograph(orientation, dot, side):
    extra = {"PatientOrientation": orientation} if orientation else {}
    ds = _dx(_dot_image(at=dot), **extra)
    rad, hips = preprocess_hip_radiograph(ds, shape=(128, 64), pixel_mm=0.7)
    assert set(hips) == {"R", "L"}
    other = "L" if side == "R" else "R"
    assert hips[side].image.max() > 0.9 and hips[other].image.max() < 0.5  # the dot is in the right half
    r, c = _peak(hips[side].image)
    pr, pc = hips[side].to_stored(np.array([r]), np.array([c]))
    # one network pixel is ~2.5 stored pixels here; the mapped dot lies within 3 stored pixels
    assert abs(pr[0] - dot[0]) <= 3.0 and abs(pc[0] - dot[1]) <= 3.0


def test_left_hip_is_mirrored_like_the_right_and_unilateral_image_is_one_hip():
    img = np.full((300, 400), 1000, dtype=np.uint16)
    img[140:160, 20:40] = 4000    # patient's right, lateral edge (image left)
    img[140:160, 360:380] = 4000  # patient's left, lateral edge (image right)
    _, hips = preprocess_hip_radiograph(_dx(img), shape=(128, 64), pixel_mm=0.7)
    # both lateral marks land on the tensor's left edge (left hip mirrored)
    for side in ("R", "L"):
        assert _peak(hips[side].image)[1] < 16
    _, one = preprocess_hip_radiograph(_dx(img, ImageLaterality="L"), shape=(128, 64), pixel_mm=0.7)
    assert list(one) == ["L"]


def test_robustness_tables_pcc_by_pose_and_jpeg_equal_hand_computation():
    from training.hip_xray import robustness_tables

    rng = np.random.default_rng(0)
    y = rng.normal(0.8, 0.1, 40)
    p = y + rng.normal(0, 0.03, 40)
    pj = y + rng.normal(0, 0.06, 40)
    poses = np.array(["supine", "standing"] * 20)
    t = robustness_tables(y, {"m": p}, {"m": pj}, poses)
    row = t["robustness"][0]
    m = poses == "standing"
    assert row["all"] == pytest.approx(np.corrcoef(y, p)[0, 1], abs=1e-12)
    assert row["pose=standing"] == pytest.approx(np.corrcoef(y[m], p[m])[0, 1], abs=1e-12)
    assert row["jpeg"] == pytest.approx(np.corrcoef(y, pj)[0, 1], abs=1e-12)
    mae = next(r for r in t["comparison"] if r["metric"] == "MAE")
    assert mae["value"] == pytest.approx(np.mean(np.abs(y - p)), abs=1e-12)


def _info(path: Path):
    from screener.series import read_series_info

    return read_series_info([path])


def test_router_accepts_ap_pelvis_and_declines_chest_lateral_and_ct(tmp_path):
    from screener.protocols.hip_xray.protocol import HipXrayProtocol

    proto = HipXrayProtocol()
    cases = {"ap": {}, "chest": {"BodyPartExamined": "CHEST", "SeriesDescription": "PA chest",
                                 "StudyDescription": "Chest", "ProtocolName": "Chest PA"},
             "chest_described_hip": {"BodyPartExamined": "CHEST", "SeriesDescription": "AP hip"},
             "pelvis_described_chest": {"BodyPartExamined": "PELVIS", "StudyDescription": "Chest and pelvis"},
             "lateral": {"ViewPosition": "LL"}, "lateral_po": {"PatientOrientation": ["A", "F"]}}
    out = {}
    for name, extra in cases.items():
        ds = _dx(_dot_image(), **extra)
        f = tmp_path / f"{name}.dcm"
        ds.save_as(f, enforce_file_format=True)
        out[name] = proto.accepts(_info(f))
    assert out["ap"].accepted, out["ap"].reason
    assert not out["chest"].accepted and "chest" in out["chest"].reason
    # the coded body part outranks the free-text description
    assert not out["chest_described_hip"].accepted and "BodyPartExamined CHEST" in out["chest_described_hip"].reason
    assert out["pelvis_described_chest"].accepted, out["pelvis_described_chest"].reason
    assert not out["lateral"].accepted and "lateral" in out["lateral"].reason
    assert not out["lateral_po"].accepted and "lateral" in out["lateral_po"].reason


def test_combined_estimate_weights_stage3_and_linear_by_hand():
    from screener.protocols.hip_xray.protocol import combine_estimates

    stage3, linear = np.array([0.80, 0.60, 0.70]), np.array([0.90, np.nan, 0.50])
    # w = 0.25: 0.75 x 0.80 + 0.25 x 0.90 = 0.825; no linear estimate -> stage 3; 0.75 x 0.70 + 0.25 x 0.50
    assert combine_estimates(stage3, linear, 0.25) == pytest.approx([0.825, 0.60, 0.65])
    assert combine_estimates(stage3, linear, 0.0) == pytest.approx(stage3)
    with pytest.raises(ValueError, match="linear_weight"):
        combine_estimates(stage3, linear, 1.5)


def test_tiny_training_run_writes_a_bundle_the_protocol_reads(tmp_path, monkeypatch):
    """Render 5 + 1 patients, train every stage for one epoch, then run the protocol on a radiograph."""
    monkeypatch.setenv("SCREENER_DATASET_CACHE", str(tmp_path / "cache"))
    from screener.config import Config
    from screener.protocols.base import ProtocolContext
    from screener.protocols.hip_xray.protocol import HipXrayProtocol
    from training.datasets.hip_xray import render_sample
    from training.hip_xray import load_aux, train_recipe
    from training.recipes import load_recipe

    recipe = load_recipe(Path(__file__).parents[1] / "training/recipes/hip_xray-cohort.toml")
    net = dataclasses.replace(recipe.network, kwargs={
        **recipe.network.kwargs, "width": 4, "ndf": 4, "dims": [8, 16], "heads": 2, "stage1_epochs": 1,
        "stage2_epochs": 1, "stage3_frozen_epochs": 1, "stem_stride": 2, "stage3_heads": 2, "channels_last": True,
        "baseline_stem_stride": 4, "ema_decay": 0.9, "linear_weight": 0.5})
    opts = {**recipe.data.options, "shape": [64, 32], "n_holdout": 1, "ray_mm": 6.0, "dy_mm": 6.0, "detector_mm": 2.0}
    recipe = dataclasses.replace(recipe, network=net, data=dataclasses.replace(recipe.data, n=5, options=opts),
                                 training=dataclasses.replace(recipe.training, epochs=1, test_fraction=0.4,
                                                              val_fraction=0.34))
    args = argparse.Namespace(out=str(tmp_path / "models"), recipe="tiny.toml", device="cpu")
    assert train_recipe(recipe, args) == 0
    bundle_dir = tmp_path / "models" / "hip_xray"
    gen, base, dec = load_aux(bundle_dir)
    assert base is not None and dec["threshold_t"] > 0 and np.isfinite(dec["slope"])
    assert dec["generator_kwargs"]["stem_stride"] == 2 and gen.encoder.stem_stride == 2
    assert base.encoder.stem_stride == 4 and dec["baseline_kwargs"] == {"stem_stride": 4}
    assert "ensemble of 2 heads" in dec["holds"]["weights.pt"]
    assert "moving average of its stage-2 weights, decay 0.9;" in dec["holds"]["decomposition.pt"]
    from screener.bundles import load_bundle
    from training.hip_xray import NETWORKS

    assert len(load_bundle(bundle_dir, "cpu", networks=NETWORKS).models) == 2
    assert sum(f.stat().st_size for f in bundle_dir.iterdir()) < 12 * 2 ** 20

    from training.datasets.hip_xray import _options

    sample = render_sample(recipe.data.seed, 0, "dx_pelvis_standard", "supine", _options(recipe))
    f = tmp_path / "pelvis.dcm"
    sample[0]["dataset"].save_as(f, enforce_file_format=True)
    # the protocol finds the hips with the committed landmark bundle before BMD-GAN measures them
    import shutil

    shutil.copytree(Path(__file__).parents[1] / "models/hip_landmarks", tmp_path / "models" / "hip_landmarks")
    cfg = Config(models_dir=tmp_path / "models", device="cpu")
    proto = HipXrayProtocol()
    info = _info(f)
    assert proto.accepts(info).accepted
    findings = proto.run(None, ProtocolContext(config=cfg, info=info))
    assert [x.site for x in findings] == ["right femoral neck", "left femoral neck"]
    assert sum(x.overlay is not None for x in findings) == 1
    ds = sample[0]["dataset"]
    assert dec["linear_weight"] == 0.5
    for x in findings:
        bmd = x.measurement("right femoral neck BMD" if x.details["side"] == "R" else "left femoral neck BMD").value
        parts = (x.details["bmd_regression_g_cm2"], x.details["bmd_pfdrr_linear_g_cm2"])
        assert bmd == pytest.approx(0.5 * parts[0] + 0.5 * parts[1] if np.isfinite(parts[1]) else parts[0], abs=1e-9)
        t = x.measurements[1].value
        assert t == pytest.approx((bmd - 0.858) / 0.120, abs=1e-9)
        poly = x.roi.polygon
        assert np.allclose(poly[0], poly[-1])
        assert poly[:, 0].min() >= -1 and poly[:, 0].max() <= ds.Columns + 1
        assert poly[:, 1].min() >= -1 and poly[:, 1].max() <= ds.Rows + 1
    # right hip ROI on the image's left half, left hip ROI on the right half (standard AP view)
    assert findings[0].roi.polygon[:, 0].mean() < ds.Columns / 2 < findings[1].roi.polygon[:, 0].mean()
    ov = findings[0].overlay
    assert ov.dtype == np.uint8 and ov.ndim == 3 and ov.shape[2] == 3


def test_augmentation_moves_radiograph_and_target_together():
    """One geometry for the radiograph and its target DRR; brightness / contrast on the radiograph only."""
    from training.hip_xray import _augment
    from training.recipes import AugmentationSpec

    x = torch.zeros(3, 1, 32, 16)
    x[:, :, 9:12, 4:7] = 1.0
    y = x.clone() * 2.0
    geo = AugmentationSpec(rotation_deg=20.0, scale_frac=0.2, shift_frac=0.2, shear_deg=9.0)
    xa, ya = _augment(x, y, torch.Generator().manual_seed(3), geo)
    torch.testing.assert_close(ya, 2.0 * xa)  # same resampling grid
    rows = torch.arange(32.0)[:, None]
    moved = [abs(float((xa[i, 0] * rows).sum() / xa[i, 0].sum()) - 10.0) for i in range(3)]
    assert max(moved) > 1.0
    xr = torch.rand(3, 1, 32, 16)
    xi, yi = _augment(xr, y, torch.Generator().manual_seed(3), AugmentationSpec(brightness=0.3, contrast=0.3))
    assert float(xi.min()) >= 0.0 and float(xi.max()) <= 1.0 and not torch.equal(xi, xr)
    torch.testing.assert_close(yi, y)  # the target keeps its g/cm2


def test_frozen_stage3_on_cached_representation_trains_only_the_head():
    """The frozen-encoder phase runs the head on the cached representation: same prediction as the
    full network, encoder untouched, head fitted (training loss falls below the mean predictor's)."""
    from screener.nets.bmdgan import BMDRegressor
    from training.hip_xray import _features, _fit_regressor, _head_predict, _run, _start_at_mean

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (24, 1, 32, 16)).astype(np.float32)
    y = 0.8 + 0.5 * (x[:, 0, 8:24, 4:12].mean(axis=(1, 2)) - 0.5)
    model = BMDRegressor((32, 16), width=4, dims=(8, 16), depths=(1, 1), heads=2)
    _start_at_mean(model, float(y.mean()))
    assert np.allclose(_head_predict(model, _features(model, x)), _run(model, x), atol=1e-6)
    enc0 = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    model, hist = _fit_regressor(model, x, y, x[:6], y[:6], [("frozen_encoder", 30, 3e-3)], 8, 0.0, 1, "test")
    assert len(hist) == 30 and all(h["phase"] == "frozen_encoder" for h in hist)
    assert all(torch.equal(v, enc0[k]) for k, v in model.encoder.state_dict().items())
    assert hist[-1]["loss"] < 0.8 * hist[0]["loss"]
    assert np.allclose(_head_predict(model, _features(model, x)), _run(model, x), atol=1e-6)


def test_parallel_rendering_gives_the_same_samples_as_one_process():
    """``[data] options render_workers`` only speeds rendering up: every patient is seeded by its index."""
    from training.datasets.hip_xray import build
    from training.recipes import load_recipe

    recipe = load_recipe(Path(__file__).parents[1] / "training/recipes/hip_xray-cohort.toml")
    opts = {**recipe.data.options, "shape": [64, 32], "n_holdout": 1, "ray_mm": 6.0, "dy_mm": 6.0}

    def run(workers: int):
        data = dataclasses.replace(recipe.data, n=2, options={**opts, "render_workers": workers})
        return build(dataclasses.replace(recipe, data=data))

    one, two = run(1), run(2)
    assert len(one) == len(two) == 6
    assert np.array_equal(one.images, two.images) and np.array_equal(one.targets, two.targets)
    assert list(one.patient_ids) == list(two.patient_ids)
    for key in ("pf_drr", "bone_drr", "image_jpeg", "pose", "side", "profile"):
        assert np.array_equal(one.attributes[key], two.attributes[key]), key


def test_landmark_crop_data_cuts_bmdgan_inputs_around_true_heads_with_dxa_truth():
    """BMD-GAN's fine-tuning data (issue 15): standard-profile renders of the training seed, one crop per
    present hip, the head where the landmark crop puts it, and the femoral-neck aBMD truth of that side."""
    from training.hip_xray import _crop_job

    rows = _crop_job((1515, 3, 1, 0.7, 0.0))
    assert 1 <= len(rows) <= 2
    for img, bmd, index in rows:
        assert img.shape == (128, 64) and 0.0 <= img.min() and img.max() <= 1.0
        assert 0.3 < bmd < 1.5 and index == 3
        # the femoral head (bright disc) sits where the crop places it: brighter there than at the crop's top corner
        assert img[78:85, 28:35].mean() > img[:8, :8].mean()


def test_finetune_data_is_read_in_cached_chunks_of_patients(monkeypatch):
    """finetune-landmarks --n 600 --chunk 240 reads patients 0-239, 240-479 and 480-599 (each its own cache
    file, so a larger run reuses a smaller one's crops) and concatenates them in that order."""
    import training.hip_xray as hx

    calls = []

    def fake(seed, first, n, **kw):
        calls.append((seed, first, n))
        return {"x": np.zeros((n, 2, 2), np.float16), "y": np.arange(first, first + n, dtype=float),
                "patient": np.arange(first, first + n)}

    monkeypatch.setattr(hx, "landmark_crop_data", fake)
    args = hx._finetune_parser().parse_args(["finetune-landmarks", "--out", "x", "--n", "600", "--chunk", "240"])
    data = hx._finetune_data(args)
    assert calls == [(1515, 0, 240), (1515, 240, 240), (1515, 480, 120)]
    assert np.array_equal(data["patient"], np.arange(600)) and data["x"].shape == (600, 2, 2)
