"""Training is described per protocol as data and found by discovery (issue 18)."""
from __future__ import annotations

import importlib.metadata
from types import SimpleNamespace

import numpy as np
import pytest

from training import metrics as M
from training import plan
from training.protocols import TrainingSpec, specs

BUILT_IN = {"dxa_spine", "femur_coronal", "hip_xray", "l1_axial", "lumbar_sagittal"}


def test_every_protocol_has_one_spec_with_its_recipes_and_paper_numbers() -> None:
    found = specs()
    assert set(found) == BUILT_IN
    for name, spec in found.items():
        assert spec.protocol == name
        assert set(spec.recipes()) == {"paper", "cohort"}, name
        assert plan.resolve_ref(spec.dataset).__module__ == f"training.datasets.{name}"
        assert spec.paper_numbers and spec.paper_table is not None and spec.evaluate is not None
    assert plan.DATASET_FACTORIES == {n: s.dataset for n, s in found.items()}
    assert plan.CUSTOM_TRAINERS == {"hip_xray": "training.hip_xray:train_recipe"}
    assert plan.POST_TRAIN == {"dxa_spine": "training.datasets.dxa_spine:calibrate_fracture_threshold",
                               "l1_axial": "training.calibration:calibrate_bundle"}
    assert set(M.PAPER_NUMBERS) == {"l1_axial", "femur_coronal", "lumbar_sagittal", "hip_xray",
                                    "dxa_spine:scoliosis", "dxa_spine:unreliable", "dxa_spine:fracture"}
    assert M.PAPER_NUMBERS["l1_axial"]["pearson_r"] == 0.905 and M.NISSINEN_THRESHOLDS["fracture"] == 0.15


def test_each_specs_recipes_name_its_protocol_and_a_discovered_network() -> None:
    from screener.bundles import discovered_networks
    from training.recipes import load_recipe

    for name, spec in specs().items():
        for variant, path in spec.recipes().items():
            r = load_recipe(path)
            assert (r.protocol, r.variant) == (name, variant), path
            assert r.network.name in discovered_networks(), path
            assert r.training.folds >= 1 and r.loss.name


def test_a_site_package_adds_a_training_spec_through_an_entry_point(monkeypatch: pytest.MonkeyPatch) -> None:
    def knee_table(y_true, y_pred, **_):
        return [M.table_row("Pearson r", M.pearson_r(y_true, y_pred), 0.7)]

    knee = TrainingSpec(protocol="knee", paper="a site's own", dataset="site.knee:build",
                        paper_numbers={"knee": {"pearson_r": 0.7}}, paper_table=knee_table)
    eps = [SimpleNamespace(name="knee", value="site.knee:SPEC", load=lambda: knee),
           SimpleNamespace(name="l1_axial", value="site.l1:SPEC", load=lambda: knee)]  # cannot replace a built-in
    real = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda **kw: eps if kw.get("group") == "screener.training_protocols" else real(**kw))
    specs.cache_clear()
    try:
        found = specs()
        assert found["knee"] is knee and found["l1_axial"].paper.startswith("Kang")
        rows = M.paper_table("knee", np.arange(5.0), np.arange(5.0) + 0.1)
        assert rows[0]["paper"] == 0.7 and M.PAPER_NUMBERS["knee"] == {"pearson_r": 0.7}
    finally:
        monkeypatch.undo()
        specs.cache_clear()
    assert "knee" not in specs()
