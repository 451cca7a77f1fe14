"""A bundle names its own network class; networks and input sizes are found, not listed (issue 18)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from screener.bundles import (BundleError, InputSpec, build_network, discovered_networks, load_bundle,
                              network_class_path, save_bundle)

MODELS = Path(__file__).resolve().parents[1] / "models"


def _save(path: Path, model: torch.nn.Module, name: str, kwargs: dict) -> Path:
    return save_bundle(path, protocol="x", models=[model], architecture={"name": name, "kwargs": kwargs},
                       input_spec=InputSpec(shape=(1, 256, 256)), outputs=[f"o{j}" for j in range(6)],
                       task="regression")


def test_every_network_of_screener_nets_is_discovered() -> None:
    from screener import nets
    from screener.nets import bmdgan

    table = discovered_networks()
    for name in ("KangRegressor", "HaClassifier", "ResNet50Regressor", "NissinenCNN"):
        assert table[name] is getattr(nets, name)
    assert table["BMDRegressor"] is bmdgan.BMDRegressor and table["BMDGenerator"] is bmdgan.BMDGenerator
    assert nets.INPUT_SIZES == {"KangRegressor": 256, "HaClassifier": 250, "ResNet50Regressor": 256,
                                "NissinenCNN": 150}


def test_a_new_card_names_its_class_and_loads_without_a_networks_table(tmp_path: Path) -> None:
    from screener.hip_landmarks import HipLandmarkNet

    torch.manual_seed(0)
    kwargs = {"widths": [4, 4, 4, 4, 4, 4], "out_channels": 6}
    net = HipLandmarkNet(**{k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}).eval()
    path = _save(tmp_path / "b", net, "HipLandmarkNet", kwargs)
    card = json.loads((path / "model_card.json").read_text())
    assert card["architecture"]["class"] == "screener.hip_landmarks:HipLandmarkNet" == network_class_path(net)
    b = load_bundle(path, check=False)  # not a built-in of screener.nets: found through the card
    assert type(b.models[0]) is HipLandmarkNet
    x = torch.rand(1, 1, 256, 256)
    with torch.no_grad():
        a, c = net(x), b.models[0](x)
    a, c = (a[0], c[0]) if isinstance(a, (tuple, list)) else (a, c)
    assert torch.allclose(a, c, atol=1e-2)  # float16 weights


def test_old_cards_without_a_class_load_by_name_and_predict_as_before() -> None:
    card = json.loads((MODELS / "l1_axial" / "model_card.json").read_text())
    assert "class" not in card["architecture"]  # the shipped bundles predate the key
    b = load_bundle(MODELS / "l1_axial")
    x = np.random.default_rng(1).uniform(0, 1, (2, *b.input_spec.shape)).astype(np.float32)
    direct = build_network(card["architecture"]["name"], card["architecture"]["kwargs"])
    direct.load_state_dict(b.models[0].state_dict())
    assert type(direct) is type(b.models[0])
    assert np.isfinite(b.predict(x)).all()


def test_a_card_may_not_name_a_class_outside_screener(tmp_path: Path) -> None:
    from screener.nets import KangRegressor

    torch.manual_seed(0)
    path = save_bundle(tmp_path / "k", protocol="x", models=[KangRegressor(input_size=64).eval()],
                       architecture={"name": "KangRegressor", "kwargs": {"input_size": 64}},
                       input_spec=InputSpec(shape=(1, 64, 64)), outputs=["bmd"], task="regression")
    card = json.loads((path / "model_card.json").read_text())
    assert card["architecture"]["class"] == "screener.nets.kang:KangRegressor"
    card["architecture"]["class"] = "os:system"
    (path / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(BundleError, match="not a screener network"):
        load_bundle(path)
