"""Linear output calibration: the fit recovers a known line, Bundle.predict applies the card's record,
a card without one is unchanged, and a malformed record is refused with a clear message."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from screener.bundles import BundleError, InputSpec, load_bundle, save_bundle
from training.calibration import apply_linear, fit_linear


def test_inverse_fit_recovers_a_known_shrinkage() -> None:
    rng = np.random.default_rng(0)
    truth = rng.uniform(0.6, 1.3, 4000)
    # a shrunk estimate: pred = 0.35 + 0.62 * truth + noise -> calibrated = (pred - 0.35) / 0.62
    pred = 0.35 + 0.62 * truth + rng.normal(0.0, 0.03, truth.size)
    rec = fit_linear(truth, pred, fit="inverse")
    assert rec["kind"] == "linear" and rec["n"] == truth.size
    assert rec["raw_fit"]["b"] == pytest.approx(0.62, abs=0.005)
    assert rec["raw_fit"]["a"] == pytest.approx(0.35, abs=0.005)
    assert rec["slope"] == pytest.approx(1 / 0.62, rel=0.01)
    assert rec["intercept"] == pytest.approx(-0.35 / 0.62, abs=0.01)
    cal = apply_linear(rec, pred)
    assert np.mean(cal - truth) == pytest.approx(0.0, abs=1e-9)  # least squares: unbiased on the fitted data
    low = truth < 0.8
    assert abs(np.mean(cal[low] - truth[low])) < 0.005 < abs(np.mean(pred[low] - truth[low]))


def test_direct_fit_is_least_squares_of_truth_on_prediction() -> None:
    pred = np.array([0.7, 0.8, 0.9, 1.0, 1.1])
    truth = 0.1 + 1.25 * pred  # exact line
    rec = fit_linear(truth, pred, fit="direct")
    assert rec["slope"] == pytest.approx(1.25) and rec["intercept"] == pytest.approx(0.1)
    assert apply_linear(rec, pred) == pytest.approx(truth)
    # noiseless: both fits agree
    inv = fit_linear(truth, pred, fit="inverse")
    assert inv["slope"] == pytest.approx(1.25) and inv["intercept"] == pytest.approx(0.1)


@pytest.mark.parametrize("truth, pred, fit, match", [
    ([1.0, 2.0], [1.0, 2.0], "inverse", "at least 3"),
    ([1.0, 1.0, 1.0], [0.9, 1.0, 1.1], "inverse", "do not vary"),
    ([1.0, 2.0, 3.0], [3.0, 2.0, 1.0], "inverse", "not positive"),
    ([1.0, 2.0, 3.0], [1.0, 2.0], "inverse", "pair up"),
    ([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], "isotonic", "inverse, direct"),
])
def test_fit_errors_say_what_to_fix(truth: list[float], pred: list[float], fit: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fit_linear(truth, pred, fit=fit)


class _Affine(nn.Module):
    """out = w * mean(image) + b: a tiny regression 'network' for bundle round trips."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.mean(dim=(1, 2, 3))[:, None])


def _bundle(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    m = _Affine()
    with torch.no_grad():
        m.lin.weight.fill_(0.5)
        m.lin.bias.fill_(0.25)
    return save_bundle(tmp_path / "b", protocol="l1_axial", models=[m], architecture={"name": "Affine"},
                       input_spec=InputSpec(shape=(1, 4, 4)), outputs=["bmd"], units=["g/cm2"], task="regression")


def _set_calibration(path: Path, record: dict | None) -> None:
    card = json.loads((path / "model_card.json").read_text())
    if record is None:
        card.pop("calibration", None)
    else:
        card["calibration"] = record
    (path / "model_card.json").write_text(json.dumps(card))


def test_bundle_predict_applies_the_card_calibration(tmp_path: Path) -> None:
    path = _bundle(tmp_path)
    nets = {"Affine": _Affine}
    x = np.stack([np.full((1, 4, 4), v, np.float32) for v in (0.0, 0.5, 1.0)])
    plain = load_bundle(path, networks=nets)
    assert plain.calibration is None
    raw = plain.predict(x)
    assert raw[:, 0] == pytest.approx([0.25, 0.5, 0.75])
    assert plain.predict(x, calibrated=False) == pytest.approx(raw)  # no record: unchanged either way

    rec = fit_linear([0.2, 0.5, 0.8], [0.35, 0.5, 0.65], fit="inverse")  # shrink 0.5 around 0.5
    assert rec["slope"] == pytest.approx(2.0) and rec["intercept"] == pytest.approx(-0.5)
    _set_calibration(path, {**rec, "output": "bmd"})
    b = load_bundle(path, networks=nets)
    assert b.calibration is not None and b.calibration["slope"] == pytest.approx(2.0)
    assert b.predict(x)[:, 0] == pytest.approx(-0.5 + 2.0 * raw[:, 0])
    assert b.predict(x, calibrated=False) == pytest.approx(raw)
    assert b.apply_calibration(np.array([[0.5]]))[0, 0] == pytest.approx(0.5)


@pytest.mark.parametrize("record, match", [
    ({"kind": "isotonic", "output": "bmd", "slope": 1.0, "intercept": 0.0}, "not supported"),
    ({"kind": "linear", "output": "tbs", "slope": 1.0, "intercept": 0.0}, "not one of the outputs"),
    ({"kind": "linear", "output": "bmd", "slope": -1.0, "intercept": 0.0}, "positive"),
    ({"kind": "linear", "output": "bmd", "intercept": 0.0}, "numeric 'slope'"),
])
def test_a_malformed_calibration_is_refused(tmp_path: Path, record: dict, match: str) -> None:
    path = _bundle(tmp_path)
    _set_calibration(path, record)
    with pytest.raises(BundleError, match=match):
        load_bundle(path, networks={"Affine": _Affine})
