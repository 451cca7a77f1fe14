"""Paper losses (training/losses.py) against hand computations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.losses import (
    bmd_histogram_weights,
    distance_weighted_l1,
    distance_weights,
    gradient_correlation,
    gradient_correlation_loss,
    huber,
    weighted_huber,
)


# --- Kang et al. eq. (1): weighted Huber, delta 0.1 ---------------------------------------------

def test_weighted_huber_matches_equation_1_by_hand() -> None:
    pred = torch.tensor([0.50, 0.90, 1.00, 0.70])
    ref = torch.tensor([0.55, 0.70, 1.00, 0.85])
    w = torch.tensor([1.0, 2.0, 3.0, 1.5])
    # d = pred - ref = -0.05, 0.20, 0.00, -0.15 ; delta = 0.1
    # e1 = 0.5 * 1   * 0.05^2             = 0.00125   (|d| <= delta)
    # e2 = 0.1 * 2   * (0.20 - 0.05)      = 0.03      (|d| >  delta)
    # e3 = 0                                           (d = 0)
    # e4 = 0.1 * 1.5 * (0.15 - 0.05)      = 0.015
    expected = (0.00125 + 0.03 + 0.0 + 0.015) / 4
    assert weighted_huber(pred, ref, w).item() == pytest.approx(expected, rel=1e-6)
    # unit weights reduce to the plain Huber loss; (B, 1) predictions are accepted
    ones = torch.ones(4)
    assert weighted_huber(pred[:, None], ref, ones).item() == pytest.approx(
        huber(pred, ref).item(), rel=1e-6
    )
    assert huber(pred, ref).item() == pytest.approx((0.00125 + 0.015 + 0 + 0.01) / 4, rel=1e-6)


def test_huber_is_continuous_at_delta_and_backpropagates() -> None:
    d = 0.1
    below = huber(torch.tensor([d - 1e-7]), torch.tensor([0.0]), delta=d).item()
    above = huber(torch.tensor([d + 1e-7]), torch.tensor([0.0]), delta=d).item()
    assert below == pytest.approx(0.5 * d * d, rel=1e-4)
    assert above == pytest.approx(0.5 * d * d, rel=1e-4)
    p = torch.tensor([0.3, 0.8], requires_grad=True)
    weighted_huber(p, torch.tensor([0.5, 0.79]), torch.tensor([2.0, 1.0])).backward()
    # d/dp: linear branch -> w * delta * sign(d) / B = 2 * 0.1 * -1 / 2 ; quadratic -> w * d / B
    assert p.grad.tolist() == pytest.approx([-0.1, 0.005], rel=1e-4)


def test_weighted_huber_rejects_mismatched_weights() -> None:
    with pytest.raises(ValueError, match="weights"):
        weighted_huber(torch.zeros(3), torch.zeros(3), torch.ones(2))


# --- Kang et al.: weights from the BMD histogram ------------------------------------------------

def test_histogram_weights_authors_method_by_hand() -> None:
    # 3 bins of width 0.1 centred 0.55, 0.65, 0.75 holding 2, 8, 4 samples (N = 14)
    y = np.repeat([0.55, 0.65, 0.75], [2, 8, 4])
    hw = bmd_histogram_weights(y, scale=1.0)
    assert hw.edges.tolist() == pytest.approx([0.5, 0.6, 0.7, 0.8])
    assert hw.counts.tolist() == [2, 8, 4]
    # inverse frequencies v = N / (3 z) = 7/3, 7/12, 7/6; the quadratic through 3 points is exact.
    # with u = (c - 0.65) / 0.1:  p(u) = A u^2 + B u + C, C = 7/12,
    # A = (v(1) + v(-1)) / 2 - C = 7/6, B = (v(1) - v(-1)) / 2 = -7/12
    # vertex u* = -B / 2A = 1/4 (BMD 0.675), p(u*) = C - B^2 / 4A = 0.5104167 -> offset 0.4895833
    assert hw.offset == pytest.approx(1 - (7 / 12 - (7 / 12) ** 2 / (4 * 7 / 6)), rel=1e-9)
    assert hw.bin_weights.tolist() == pytest.approx([2.8229167, 1.0729167, 1.65625], rel=1e-6)
    assert float(hw(np.array([0.675]))[0]) == pytest.approx(1.0, abs=1e-9)
    # outside the training range: clipped to the first / last bin centre
    assert hw(np.array([0.30, 2.0])).tolist() == pytest.approx([2.8229167, 1.65625], rel=1e-6)
    # the notebook's scale 1/8: w = 1 + (p - min p) / 8
    hw8 = bmd_histogram_weights(y)
    assert hw8.bin_weights.tolist() == pytest.approx([1.2278646, 1.0091146, 1.0820313], rel=1e-6)
    card = hw8.to_dict()
    assert card["counts"] == [2, 8, 4] and card["method"] == "inverse_fit"
    assert card["bin_weights"] == pytest.approx(hw8.bin_weights.tolist())


def test_histogram_weights_literal_reading_by_hand() -> None:
    # counts 5, 8, 9, 8, 5 lie on the quadratic 9 - (k - 2)^2, so the fit is exact and
    # w(k) = max z / z(k) = 9/5, 9/8, 1, 9/8, 9/5
    y = np.repeat([0.55, 0.65, 0.75, 0.85, 0.95], [5, 8, 9, 8, 5])
    hw = bmd_histogram_weights(y, method="fit_inverse")
    assert hw.bin_weights.tolist() == pytest.approx([1.8, 1.125, 1.0, 1.125, 1.8], rel=1e-9)
    assert hw(torch.tensor([0.62, 0.99])).tolist() == pytest.approx([1.125, 1.8], rel=1e-6)


@pytest.mark.parametrize("method", ["inverse_fit", "fit_inverse"])
def test_histogram_weights_minimum_one_and_heavier_tails(method: str) -> None:
    rng = np.random.default_rng(4)
    bmd = rng.normal(0.86, 0.12, 3000)
    hw = bmd_histogram_weights(bmd, method=method)
    w = hw(bmd)
    assert w.min() >= 1.0 - 1e-9
    assert w.min() == pytest.approx(1.0, abs=0.02)
    centre = float(hw(np.array([0.86]))[0])
    low, high = (float(v) for v in hw(np.array([0.55, 1.17])))  # +-2.6 SD
    assert low > 1.5 * centre and high > 1.5 * centre
    # a torch batch of targets gets a tensor of weights usable in weighted_huber
    t = torch.tensor([0.55, 0.86, 1.17])
    wt = hw(t)
    assert isinstance(wt, torch.Tensor) and wt.shape == (3,)
    assert weighted_huber(t + 0.2, t, wt).item() > weighted_huber(t + 0.2, t, torch.ones(3)).item()


def test_histogram_weights_validate_input() -> None:
    with pytest.raises(ValueError, match="at least 3"):
        bmd_histogram_weights([0.8, 0.9])
    with pytest.raises(ValueError, match="method"):
        bmd_histogram_weights([0.8, 0.9, 1.0], method="cubic")


# --- Gu et al. eq. (6): gradient correlation ----------------------------------------------------

T = [[0, 1, 3, 2], [1, 4, 2, 0], [2, 0, 5, 1], [3, 1, 2, 4]]
P = [[1, 0, 2, 2], [0, 3, 3, 1], [2, 1, 4, 0], [1, 2, 2, 3]]


def _img(a: list[list[int]]) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64)[None, None]


def test_gradient_correlation_signed_by_hand() -> None:
    # valid 3x3 central differences -> 2x2 maps
    # dx T = I[i+1, j+2] - I[i+1, j] = [[1, -4], [3, 1]]   dx P = [[3, -2], [2, -1]]
    # dy T = I[i+2, j+1] - I[i, j+1] = [[-1, 2], [-3, 0]]  dy P = [[1, 2], [-1, -1]]
    # NCC_x: dev T = .75 -4.25 2.75 .75, dev P = 2.5 -2.5 1.5 -1.5
    #        = 15.5 / sqrt(26.75 * 17) = 0.7268509
    # NCC_y: dev T = -.5 2.5 -2.5 .5, dev P = .75 1.75 -1.25 -1.25
    #        = 6.5 / sqrt(13 * 6.75) = 0.6938887
    gc = gradient_correlation(_img(T), _img(P), absolute=False)
    assert gc.item() == pytest.approx(0.5 * (15.5 / math.sqrt(26.75 * 17) + 6.5 / math.sqrt(13 * 6.75)), rel=1e-7)
    assert gc.item() == pytest.approx(0.7103698, rel=1e-6)


def test_gradient_correlation_magnitudes_by_hand() -> None:
    # |dx T| = 1 4 3 1 (mean 2.25), |dx P| = 3 2 2 1 (mean 2): sum of dev products
    #   (-1.25)(1) + (1.75)(0) + (0.75)(0) + (-1.25)(-1) = 0  -> NCC_x = 0
    # |dy T| = 1 2 3 0 (mean 1.5), |dy P| = 1 2 1 1 (mean 1.25):
    #   (-.5)(-.25) + (.5)(.75) + (1.5)(-.25) + (-1.5)(-.25) = 0.5; 5 and 0.75 squares
    #   NCC_y = 0.5 / sqrt(5 * 0.75) = 0.2581989
    gc = gradient_correlation(_img(T), _img(P))
    assert gc.item() == pytest.approx(0.5 * 0.5 / math.sqrt(3.75), rel=1e-7)
    loss = gradient_correlation_loss(_img(T), _img(P))
    assert loss.item() == pytest.approx(1 - 0.5 * 0.5 / math.sqrt(3.75), rel=1e-7)


def test_gradient_correlation_loss_zero_for_same_structure_and_differentiable() -> None:
    t = _img(T)
    # an affine intensity change keeps the gradient structure: GC = 1, loss = 0
    assert gradient_correlation_loss(t, 3 * t + 7).item() == pytest.approx(0.0, abs=1e-9)
    p = _img(P).clone().requires_grad_(True)
    loss = gradient_correlation_loss(t, p, absolute=False)
    loss.backward()
    assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="equal shape"):
        gradient_correlation(t, torch.zeros(1, 1, 5, 5))


# --- Gu et al. eq. (9)-(11): distance-weighted L1 -------------------------------------------------

def test_distance_weights_and_weighted_l1_by_hand() -> None:
    bmd = [0.6, 0.8, 1.0, 0.9]
    # mean 0.825; d = 0.225, 0.025, 0.175, 0.075; d_min 0.025, d_max 0.225
    # w = 1.5 - (d - 0.025) / 0.2 = 0.5, 1.5, 0.75, 1.25
    w = distance_weights(bmd)
    assert w.tolist() == pytest.approx([0.5, 1.5, 0.75, 1.25], rel=1e-6)
    pred = torch.tensor([0.7, 0.8, 0.9, 1.0])
    # |y - R| = 0.1, 0, 0.1, 0.1 -> mean(w |.|) = (0.05 + 0 + 0.075 + 0.125) / 4 = 0.0625
    assert distance_weighted_l1(pred, torch.tensor(bmd), w).item() == pytest.approx(0.0625, rel=1e-6)
    assert distance_weights([0.7, 0.9]).tolist() == [1.0, 1.0]  # equal distances: formula undefined
