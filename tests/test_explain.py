"""Explanation maps (screener/explain.py) against hand computations on a tiny fixed network."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from screener.explain import (
    fuse_overlay,
    grad_cam,
    grad_ram,
    grad_ramp,
    jet_colormap,
    vanilla_gradient,
)
from screener.nets import HaClassifier, KangRegressor, NissinenCNN, ResNet50Regressor

# Tiny network: x (1x2x2) -> conv1x1 with 2 filters (w = 2, -1; b = 0, 1.5) = A
#               -> ReLU -> flatten -> linear (no bias) -> y
X = [[1.0, -2.0], [3.0, 0.5]]
V0 = [[1.0, 2.0], [-1.0, 0.5]]  # linear weights on ReLU(A_0)
V1 = [[0.5, -1.0], [2.0, 3.0]]  # linear weights on ReLU(A_1)


class Tiny(nn.Module):
    def __init__(self, rows: list[tuple[list[list[float]], list[list[float]]]]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(8, len(rows), bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([2.0, -1.0]).view(2, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([0.0, 1.5]))
            self.fc.weight.copy_(torch.tensor([[*np.ravel(a), *np.ravel(b)] for a, b in rows]))

    @property
    def target_layer(self) -> nn.Module:
        return self.conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.relu(self.conv(x)), 1))


def _x() -> torch.Tensor:
    return torch.tensor(X).view(1, 1, 2, 2)


# Hand arithmetic shared by the tests:
#   A_0 = 2x       = [[2, -4], [6, 1]]      A_1 = -x + 1.5 = [[0.5, 3.5], [-1.5, 1]]
#   ReLU'(A_0)     = [[1, 0], [1, 1]]       ReLU'(A_1)     = [[1, 1], [0, 1]]
# Model 1 (y = V0.ReLU(A_0) + V1.ReLU(A_1)):
#   y = (2 - 6 + 0.5) + (0.25 - 3.5 + 3) = -3.75
#   g_0 = V0 * ReLU'(A_0) = [[1, 0], [-1, 0.5]]    alpha_0 = 0.5 / 4 = 0.125
#   g_1 = V1 * ReLU'(A_1) = [[0.5, -1], [0, 3]]    alpha_1 = 2.5 / 4 = 0.625
#   Grad-RAM  = |0.125 A_0 + 0.625 A_1| = |[[0.5625, 1.6875], [-0.1875, 0.75]]|  -> / 1.6875
#   Grad-RAMP = |g_0 A_0 + g_1 A_1| = |[[2 + 0.25, 0 - 3.5], [-6 + 0, 0.5 + 3]]| -> / 6
# Model 2 (V0 and V1 swapped):
#   g_0 = V1 * ReLU'(A_0) = [[0.5, 0], [2, 3]]     alpha_0 = 5.5 / 4 = 1.375
#   g_1 = V0 * ReLU'(A_1) = [[1, 2], [0, 0.5]]     alpha_1 = 3.5 / 4 = 0.875
#   Grad-RAM  = |1.375 A_0 + 0.875 A_1| = |[[3.1875, -2.4375], [6.9375, 2.25]]| -> / 6.9375
RAM_1 = np.array([[0.5625, 1.6875], [0.1875, 0.75]]) / 1.6875
RAMP_1 = np.array([[2.25, 3.5], [6.0, 3.5]]) / 6.0
RAM_2 = np.array([[3.1875, 2.4375], [6.9375, 2.25]]) / 6.9375


def test_tiny_network_output_matches_hand_value() -> None:
    assert Tiny([(V0, V1)])(_x()).item() == pytest.approx(-3.75)


def test_grad_ram_equals_hand_computation() -> None:
    m = grad_ram(Tiny([(V0, V1)]), _x())
    assert m.shape == (1, 2, 2) and m.dtype == np.float32
    np.testing.assert_allclose(m[0], RAM_1, rtol=1e-6)
    np.testing.assert_allclose(m[0], [[1 / 3, 1.0], [1 / 9, 4 / 9]], rtol=1e-6)


def test_grad_ramp_equals_hand_computation() -> None:
    m = grad_ramp(Tiny([(V0, V1)]), _x())
    np.testing.assert_allclose(m[0], RAMP_1, rtol=1e-6)
    np.testing.assert_allclose(m[0], [[0.375, 7 / 12], [1.0, 7 / 12]], rtol=1e-6)


def test_grad_ram_averages_the_ensemble() -> None:
    # each model's map is normalised to max 1, the mean renormalised (Kang: ten fold models)
    m = grad_ram([Tiny([(V0, V1)]), Tiny([(V1, V0)])], _x())
    expected = (RAM_1 + RAM_2) / 2
    np.testing.assert_allclose(m[0], expected / expected.max(), rtol=1e-6)
    np.testing.assert_allclose(m[0].max(), 1.0)


def test_grad_ram_uses_absolute_value_where_grad_cam_uses_relu() -> None:
    # two-output "classifier": logit 0 = model 1, logit 1 = model 2
    net = Tiny([(V0, V1), (V1, V0)])
    # logit 0: 0.125 A_0 + 0.625 A_1 has -0.1875 at (1, 0): Grad-CAM zeroes it, Grad-RAM keeps 0.1875
    cam0 = grad_cam(net, _x(), class_index=0)
    np.testing.assert_allclose(cam0[0], [[1 / 3, 1.0], [0.0, 4 / 9]], rtol=1e-6)
    np.testing.assert_allclose(grad_ram(net, _x(), output_index=0)[0], RAM_1, rtol=1e-6)
    # logit 1: [[3.1875, -2.4375], [6.9375, 2.25]] -> ReLU -> / 6.9375
    cam1 = grad_cam(net, _x(), class_index=1)
    np.testing.assert_allclose(cam1[0], [[3.1875 / 6.9375, 0.0], [1.0, 2.25 / 6.9375]], rtol=1e-6)
    # default = predicted class; logits are -3.75 and (1 + 0 - 12 + 1.5) + (0.5 + 7 + 0 + 0.5) = -1.5
    assert net(_x()).argmax().item() == 1
    np.testing.assert_allclose(grad_cam(net, _x())[0], cam1[0], rtol=1e-6)


def test_vanilla_gradient_equals_hand_computation() -> None:
    # dy/dx(i,j) = sum_k g_k(i,j) * w_k = 2 g_0 - g_1 = [[1.5, 1], [-2, -2]]
    net = Tiny([(V0, V1)])
    np.testing.assert_allclose(vanilla_gradient(net, _x())[0], [[0.75, 0.5], [1.0, 1.0]], rtol=1e-6)
    signed = vanilla_gradient(net, _x(), signed=True)[0]
    np.testing.assert_allclose(signed, 0.5 + np.array([[1.5, 1.0], [-2.0, -2.0]]) / 4.0, rtol=1e-6)


def test_maps_are_upsampled_to_input_and_mode_restored() -> None:
    torch.manual_seed(0)
    net = KangRegressor(input_size=64)
    net.train()
    x = torch.rand(2, 1, 64, 64)
    for fn in (grad_ram, grad_ramp):
        m = fn([net, net], x)
        assert m.shape == (2, 64, 64)
        assert m.min() >= 0.0 and m.max() == pytest.approx(1.0)
    assert net.training  # explain() evaluates in eval mode and restores the mode
    # multi-input classifier (image + demographics), per-sample class indices
    ha = HaClassifier(64, channels=(4, 4, 8, 8, 8, 8), fc=(16, 8))
    cam = grad_cam(ha, torch.rand(2, 1, 64, 64), torch.rand(2, 5), class_index=[0, 2])
    assert cam.shape == (2, 64, 64) and np.all((cam >= 0) & (cam <= 1))
    # TBS output of the ResNet regressor; sigmoid task head of Nissinen's net
    rn = ResNet50Regressor(width=0.0625, layers=(1, 1, 1, 1))
    assert grad_ramp(rn, torch.rand(1, 1, 64, 64), output_index=1).shape == (1, 64, 64)
    ni = NissinenCNN(32, channels=(4, 4, 8, 8), fc_units=8)
    assert vanilla_gradient(ni, torch.rand(1, 1, 32, 32)).shape == (1, 32, 32)


def test_explain_errors_tell_what_to_fix() -> None:
    with pytest.raises(ValueError, match="target_layer"):
        grad_ram(nn.Sequential(nn.Conv2d(1, 1, 1), nn.Flatten()), torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="out of range"):
        grad_cam(Tiny([(V0, V1)]), _x(), class_index=3)


def test_jet_colormap_anchor_points() -> None:
    rgb = jet_colormap(np.array([0.0, 0.25, 0.5, 0.75, 1.0]))
    np.testing.assert_allclose(
        rgb,
        [[0, 0, 0.5], [0, 0.5, 1], [0.5, 1, 0.5], [1, 0.5, 0], [0.5, 0, 0]],
        atol=1e-12,
    )


def test_fuse_overlay_blends_grey_and_jet() -> None:
    gray = np.array([[-1000.0, 0.0], [1000.0, 500.0]])
    heat = np.array([[0.0, 1.0], [0.5, 0.25]])
    out = fuse_overlay(gray, heat, alpha=0.4)
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    # grey 0..1 = 0, .5, 1, .75 ; out = 255 * (0.6 grey + 0.4 jet)
    assert out[0, 0].tolist() == [0, 0, 51]  # 0.4 * (0, 0, 0.5)
    assert out[0, 1].tolist() == [np.round(255 * (0.3 + 0.2)), np.round(255 * 0.3), np.round(255 * 0.3)]
    assert out[1, 0].tolist() == [np.round(255 * 0.8), 255, np.round(255 * 0.8)]
    assert out[1, 1].tolist() == [np.round(255 * 0.45), np.round(255 * 0.65), np.round(255 * 0.85)]
    # a window clips: everything >= 0 HU is white before blending
    win = fuse_overlay(gray, np.zeros((2, 2)), alpha=0.0, vmin=-100, vmax=0)
    assert win[:, :, 0].tolist() == [[0, 255], [255, 255]]
    with pytest.raises(ValueError, match="upsample"):
        fuse_overlay(gray, np.zeros((4, 4)))


def test_grad_ramp_fine_uses_the_deepest_stage_of_at_least_8x8() -> None:
    """Issue 19: the explanation shown is Grad-RAMP on an 8 x 8 (or finer) feature map -- for
    Kang's 64-pixel regressor the fourth stage, not the 2 x 2 last convolution."""
    from screener.explain import grad_ramp, grad_ramp_fine, stage_for_side

    torch.manual_seed(0)
    nets = [KangRegressor(input_size=64).eval() for _ in range(2)]
    x = torch.randn(1, 1, 64, 64)
    assert stage_for_side(nets[0], x, 8) is nets[0].blocks[3]
    assert stage_for_side(nets[0], x, 2) is nets[0].blocks[9]
    assert stage_for_side(nets[0], x, 64) is nets[0].target_layer  # no stage that large
    fine = grad_ramp_fine(nets, x)
    assert fine.shape == (1, 64, 64) and fine.dtype == np.float32 and fine.max() == pytest.approx(1.0)
    # the ensemble mean of each model's map on its own fourth stage, normalised
    each = [grad_ramp(n, x, target_layer=n.blocks[3])[0] for n in nets]
    want = np.mean(each, axis=0)
    np.testing.assert_allclose(fine[0], want / want.max(), atol=1e-6)
    # finer than the last layer's: more than 4 distinct 16-pixel blocks
    blocks = fine[0].reshape(4, 16, 4, 16).mean(axis=(1, 3))
    assert len(np.unique(np.round(fine[0], 4))) > 64 and blocks.std() > 0
