"""Model bundles: float16 fold weights loaded with weights_only, the model card, input checks, size budget."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from screener.bundles import (
    INTENDED_USE,
    TRAINING_DATA_STATEMENT,
    BundleError,
    InputSpec,
    build_network,
    bundle_size,
    check_bundle_sizes,
    load_bundle,
    save_bundle,
)

KANG = {"name": "KangRegressor", "kwargs": {"input_size": 64}}


def _kang_folds(n: int = 3) -> list[torch.nn.Module]:
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        out.append(build_network(KANG["name"], KANG["kwargs"]).eval())
    return out


def _save_kang(path: Path, models: list[torch.nn.Module]) -> Path:
    return save_bundle(
        path, protocol="l1_axial", models=models, architecture=KANG,
        input_spec=InputSpec(shape=(1, 64, 64), spacing_mm=(0.7, 0.7), window={"center": 400, "width": 1800},
                             value_range=(0.0, 1.0)),
        outputs=["bmd"], units=["g/cm2"], task="regression",
        preprocessing={"crop_mm": 90, "scaling": "min-max to 0-1"},
        t_score_reference={"mean": 0.9747, "sd": 0.1185, "source": "Kang et al. 2023"},
        recipe={"protocol": "l1_axial", "variant": "cohort"}, command="screener train x.toml", seed=7,
        metrics={"tables": {"test": "| Metric | Screener | Paper |\n|---|---|---|\n| Pearson r | 0.9 | 0.905 |\n"}},
        version="1.2.0", differences_from_paper="64 px input instead of 256",
    )


def test_round_trip_fp16_weights_only_and_card(tmp_path: Path) -> None:
    models = _kang_folds(3)
    path = _save_kang(tmp_path / "l1_axial", models)
    # the weights file is plain tensors in float16 and loads with weights_only=True
    blob = torch.load(path / "weights.pt", weights_only=True)
    assert blob["format"] == "screener-bundle-1" and len(blob["folds"]) == 3
    floats = [v for v in blob["folds"][0].values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)
    n_params = sum(p.numel() for p in models[0].parameters())
    assert (path / "weights.pt").stat().st_size < 3 * (2 * n_params) * 1.15 + 100_000  # ~2 bytes per weight

    b = load_bundle(path, "cpu")
    assert b.protocol == "l1_axial" and b.version == "1.2.0" and b.bundle_id == "l1_axial@1.2.0"
    assert len(b.models) == 3 and all(not m.training for m in b.models)
    assert all(p.dtype == torch.float32 for m in b.models for p in m.parameters())
    x = torch.rand(4, 1, 64, 64)
    with torch.no_grad():
        expected = torch.stack([m(x) for m in models]).mean(0).double().numpy()
    got = b.predict(x.numpy())
    assert got.shape == (4, 1)
    np.testing.assert_allclose(got, expected, rtol=2e-2, atol=2e-2)  # float16 storage
    # the card says everything the brief lists
    card = json.loads((path / "model_card.json").read_text())
    assert card["architecture"]["name"] == "KangRegressor" and card["architecture"]["folds"] == 3
    assert card["architecture"]["parameters"] == n_params
    assert card["input_spec"]["shape"] == [1, 64, 64] and card["input_spec"]["window"]["width"] == 1800
    assert card["outputs"] == {"task": "regression", "names": ["bmd"], "units": ["g/cm2"],
                               "ensemble": "mean of fold outputs"}
    assert card["t_score_reference"]["sd"] == 0.1185
    assert card["training_data"] == TRAINING_DATA_STATEMENT and "synthetic" in card["training_data"]
    assert "not for diagnostic use without review" in card["intended_use"] == INTENDED_USE
    assert card["seed"] == 7 and card["command"] == "screener train x.toml"
    assert set(card["framework_versions"]) >= {"torch", "numpy", "python", "screener"}
    assert card["preprocessing"]["crop_mm"] == 90
    readme = (path / "README.md").read_text()
    for needle in ("# Model card: `l1_axial` v1.2.0", "not for diagnostic use without review",
                   "synthetic patients", "KangRegressor", "T-score reference: mean 0.9747",
                   "64 px input instead of 256", "| Pearson r | 0.9 | 0.905 |", "Seed: 7"):
        assert needle in readme, needle


def test_classifier_bundle_with_demographics(tmp_path: Path) -> None:
    arch = {"name": "HaClassifier", "kwargs": {"input_size": 64, "channels": [4, 4, 8, 8, 8, 8],
                                                "fc": [16], "demo_fc": [8, 4], "head_hidden": 8}}
    torch.manual_seed(0)
    m = build_network(arch["name"], arch["kwargs"]).eval()
    names = ["age", "sex", "height", "weight", "bmi"]
    save_bundle(tmp_path / "femur", protocol="femur_coronal", models=[m], architecture=arch,
                input_spec=InputSpec(shape=(1, 64, 64), extras=tuple(names)),
                outputs=["normal", "osteopenia", "osteoporosis"], task="multiclass")
    b = load_bundle(tmp_path / "femur")
    img, demo = np.random.rand(2, 1, 64, 64), np.random.rand(2, 5)
    p = b.predict(img, demo)
    assert p.shape == (2, 3)
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-9)
    with pytest.raises(BundleError, match=r"needs extras of shape \(B, 5\)"):
        b.predict(img)


def test_input_spec_is_checked(tmp_path: Path) -> None:
    path = _save_kang(tmp_path / "b", _kang_folds(1))
    b = load_bundle(path)
    with pytest.raises(BundleError, match=r"does not match the bundle's input spec \(B, 1, 64, 64\)"):
        b.predict(np.zeros((1, 1, 32, 32), np.float32))
    # a card whose input spec does not fit the network is refused at load time
    card = json.loads((path / "model_card.json").read_text())
    card["input_spec"]["shape"] = [1, 48, 48]
    (path / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(BundleError, match="rejects its own input spec"):
        load_bundle(path)
    card["input_spec"]["shape"] = [1, 64, 64]
    card["outputs"]["names"] = ["bmd", "tbs"]
    (path / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(BundleError, match="gives 1 outputs, card names 2"):
        load_bundle(path)


def test_broken_bundles_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="model_card.json missing"):
        load_bundle(tmp_path)
    path = _save_kang(tmp_path / "b", _kang_folds(1))
    card = json.loads((path / "model_card.json").read_text())
    card["architecture"]["kwargs"] = {"input_size": 96}
    (path / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(BundleError, match="fold 0 does not fit KangRegressor"):
        load_bundle(path)
    card["architecture"] = {"name": "NoSuchNet", "kwargs": {}}
    (path / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(BundleError, match="unknown network 'NoSuchNet'"):
        load_bundle(path)
    # a pickled object (not plain tensors) is refused by weights_only loading
    torch.save({"format": "screener-bundle-1", "folds": [{"w": torch.zeros(1)}], "x": Path("/")},
               path / "weights.pt")
    with pytest.raises(BundleError, match=r"weights_only=True"):
        load_bundle(path)
    with pytest.raises(BundleError, match="regression"):
        save_bundle(tmp_path / "c", protocol="x", models=_kang_folds(1), architecture=KANG,
                    input_spec=InputSpec(shape=(1, 64, 64)), outputs=["bmd"], task="ranking")


def test_size_check_helper(tmp_path: Path) -> None:
    root = tmp_path / "models"
    _save_kang(root / "l1_axial", _kang_folds(2))
    (root / "not_a_bundle").mkdir()
    sizes = check_bundle_sizes(root, limit_mb=40)
    assert set(sizes) == {"l1_axial", "total"}
    assert sizes["total"] == bundle_size(root / "l1_axial") > 0
    with pytest.raises(BundleError, match=r"> 0.001 MiB \(largest: l1_axial"):
        check_bundle_sizes(root, limit_mb=0.001)
