"""Networks of the papers (screener/nets): shapes, parameter counts, one training step."""
from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch import nn

from screener.nets import (
    INPUT_SIZES,
    HaClassifier,
    KangRegressor,
    NissinenCNN,
    ResNet50Regressor,
    count_parameters,
)
from training.losses import bmd_histogram_weights, huber, weighted_huber


def _conv_count(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in model.modules())


def _step_reduces_loss(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
) -> tuple[float, float]:
    """One optimiser step on a fixed batch; BN in training mode, dropout off for a fair compare."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    before = loss_fn(model(*inputs))
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = loss_fn(model(*inputs))
    return before.item(), after.item()


# --- Kang et al. 2023 ----------------------------------------------------------------------------

def test_kang_regressor_matches_paper_parameter_count_and_layout() -> None:
    net = KangRegressor()
    # the paper: "The total number of trainable parameters were 1,614,273"
    assert count_parameters(net) == 1_614_273
    # 22 convolutions (stem + 10 blocks x 2 + last) + 4 strided 1x1 projection shortcuts
    assert _conv_count(net) == 22 + 4
    assert sum(isinstance(m, nn.Linear) for m in net.modules()) == 2
    assert INPUT_SIZES["KangRegressor"] == net.input_size == 256
    net.eval()
    x = torch.rand(2, 1, 256, 256)
    assert net(x).shape == (2, 1)
    assert net.features(x).shape == (2, 16, 8, 8)  # five stride-2 halvings: 256 -> 8
    with pytest.raises(ValueError, match="expects"):
        net(torch.rand(1, 1, 128, 128))


def test_kang_regressor_step_with_weighted_huber_reduces_loss() -> None:
    torch.manual_seed(0)
    net = KangRegressor()
    x = torch.rand(6, 1, 256, 256)
    y = torch.tensor([0.62, 0.75, 0.86, 0.93, 1.05, 1.21])
    w = bmd_histogram_weights(torch.tensor([0.55, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0, 1.1, 1.3]))(y)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    before, after = _step_reduces_loss(net, (x,), lambda out: weighted_huber(out, y, w), opt)
    assert after < before


# --- Ha et al. 2024 ------------------------------------------------------------------------------

def test_ha_classifier_paper_sizes_and_counts() -> None:
    mm = HaClassifier()
    image_only = HaClassifier(demographics=False)
    # 6 convs (16..512, 3x3): 1,572,480; FC 4608-4096-1024-128: 23,204,992
    conv = 160 + 4_640 + 18_496 + 73_856 + 295_168 + 1_180_160
    fc = (4_608 * 4_096 + 4_096) + (4_096 * 1_024 + 1_024) + (1_024 * 128 + 128)
    assert count_parameters(image_only) == conv + fc + (128 * 3 + 3)
    # demographics 5-64-16 with BN (1,584) and fusion 144-64-3 with BN (9,603)
    assert count_parameters(mm) == conv + fc + 1_584 + 9_603
    assert _conv_count(mm) == 6
    assert INPUT_SIZES["HaClassifier"] == mm.input_size == 250
    mm.eval()
    image_only.eval()
    img = torch.rand(2, 1, 250, 250)
    assert mm(img, torch.rand(2, 5)).shape == (2, 3)
    assert image_only(img).shape == (2, 3)
    assert mm.features(img).shape == (2, 512, 7, 7)
    probs = mm.predict_proba(img, torch.rand(2, 5))
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(2))
    with pytest.raises(ValueError, match="demographics"):
        mm(img)


def test_ha_classifier_step_reduces_cross_entropy() -> None:
    torch.manual_seed(1)
    net = HaClassifier()  # full paper size: the image branch dominates the step's cost
    x = torch.rand(4, 1, 250, 250)
    demo = torch.randn(4, 5)
    y = torch.tensor([0, 1, 2, 1])
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    before, after = _step_reduces_loss(net, (x, demo), lambda out: nn.functional.cross_entropy(out, y), opt)
    assert after < before


# --- Yoshida et al. 2023 (ResNet-50) ---------------------------------------------------------------

def test_resnet50_is_resnet50() -> None:
    net = ResNet50Regressor()
    # torchvision's 1000-class RGB ResNet-50 has 25,557,032 parameters; here the stem sees 1 channel
    # (-2 * 64 * 49) and the head has 2 outputs (-(2048 * 998 + 998))
    assert count_parameters(net) == 25_557_032 - 2 * 64 * 49 - (2_048 * 998 + 998) == 23_505_858
    assert _conv_count(net) == 1 + 3 * (3 + 4 + 6 + 3) + 4  # stem + bottleneck convs + projections
    assert net.outputs == ("bmd", "tbs")
    assert INPUT_SIZES["ResNet50Regressor"] == 256
    narrow = ResNet50Regressor(width=0.25)
    assert 1_000_000 < count_parameters(narrow) < 2_000_000
    narrow.eval()
    x = torch.rand(2, 1, 256, 256)
    assert narrow(x).shape == (2, 2)
    assert narrow.features(x).shape == (2, 512, 8, 8)
    assert ResNet50Regressor(outputs=("bmd",), width=0.25).eval()(x).shape == (2, 1)


def test_resnet_step_with_huber_reduces_loss() -> None:
    torch.manual_seed(2)
    net = ResNet50Regressor(width=0.25)
    x = torch.rand(4, 1, 64, 64)
    y = torch.tensor([[0.8, 1.30], [1.0, 1.25], [0.7, 1.40], [1.1, 1.20]])
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    before, after = _step_reduces_loss(net, (x,), lambda out: huber(out, y), opt)
    assert after < before


# --- Nissinen et al. 2021 ---------------------------------------------------------------------------

def test_nissinen_cnn_shapes_counts_and_l2_groups() -> None:
    net = NissinenCNN(n_tasks=3)
    assert INPUT_SIZES["NissinenCNN"] == net.input_size == 150
    assert _conv_count(net) == 4
    assert all(m.kernel_size == (5, 5) for m in net.modules() if isinstance(m, nn.Conv2d))
    # convs 5x5: 1-32-32-64-64; 150 -> 75 -> 37 -> 18 -> 9; FC 5184-128-3
    conv = (25 * 32 + 32) + (25 * 32 * 32 + 32) + (25 * 32 * 64 + 64) + (25 * 64 * 64 + 64)
    assert count_parameters(net) == conv + (9 * 9 * 64 * 128 + 128) + (128 * 3 + 3)
    net.eval()
    x = torch.rand(2, 1, 150, 150)
    assert net(x).shape == (2, 3)
    assert net.features(x).shape == (2, 64, 18, 18)
    p = net.predict_proba(x)
    assert bool(((p > 0) & (p < 1)).all())
    groups = net.param_groups(1e-4)
    assert [g["weight_decay"] for g in groups] == [1e-4, 0.0]
    assert sum(t.numel() for t in groups[0]["params"]) == conv - (32 + 32 + 64 + 64)  # kernels only
    assert sum(t.numel() for g in groups for t in g["params"]) == count_parameters(net)


def test_nissinen_step_with_l2_reduces_bce() -> None:
    torch.manual_seed(3)
    net = NissinenCNN()
    y = torch.tensor([[1.0], [0.0], [0.0], [1.0], [0.0], [1.0]])
    x = 0.5 * torch.rand(6, 1, 150, 150) + 0.5 * y.view(6, 1, 1, 1)  # positives brighter
    opt = torch.optim.Adam(net.param_groups(2e-4), lr=1e-4)
    before, after = _step_reduces_loss(
        net, (x,), lambda out: nn.functional.binary_cross_entropy_with_logits(out, y), opt
    )
    assert after < before


# --- bundles store float16 state dicts loaded with weights_only=True -----------------------------

@pytest.mark.parametrize(
    "build,shape",
    [
        (lambda: KangRegressor(input_size=64), (2, 1, 64, 64)),
        (lambda: NissinenCNN(), (2, 1, 150, 150)),
        (lambda: ResNet50Regressor(width=0.25), (2, 1, 64, 64)),
    ],
)
def test_float16_state_dict_round_trip(build: Callable[[], nn.Module], shape: tuple[int, ...]) -> None:
    import io

    torch.manual_seed(5)
    net = build().eval()
    buf = io.BytesIO()
    torch.save({k: (v.half() if v.is_floating_point() else v) for k, v in net.state_dict().items()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    clone = build()
    clone.load_state_dict({k: (v.float() if v.is_floating_point() else v) for k, v in state.items()})
    clone.eval()
    x = torch.rand(*shape)
    with torch.no_grad():
        a, b = net(x), clone(x)
    assert b.shape == a.shape
    # float16 keeps ~3 significant digits of every weight
    torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-2)
    assert len(buf.getvalue()) < 0.6 * 4 * count_parameters(net) + 200_000
