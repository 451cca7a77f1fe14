"""BMD-GAN networks and training pieces (screener.nets.bmdgan, training.bmdgan), on tiny tensors."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from screener.nets.bmdgan import BMDGenerator, BMDRegressor, MultiscaleDiscriminator
from training import bmdgan as B
from training import losses as L

SMALL = (64, 32)  # (H, W): portrait like the paper's 512x256


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread is faster and kinder to the shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_models(seed: int = 0) -> tuple[BMDGenerator, MultiscaleDiscriminator]:
    torch.manual_seed(seed)
    return BMDGenerator(width=4), MultiscaleDiscriminator(ndf=8, n_layers=3, num_scales=3)


def _pairs(n: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, *SMALL, generator=g)
    y = torch.rand(n, 1, *SMALL, generator=g)
    return x, y


# --- PF-DRR -> BMD -------------------------------------------------------------------------------

def test_pfdrr_bmd_features_equals_hand_computation():
    a = np.array([[0.0, 0.5, 1.0], [1.5, 0.2, 2.0], [0.3, 0.9, 1.2]])
    # pixels >= 0.9: 1.0, 1.5, 2.0, 0.9, 1.2 -> 6.6 / 5
    assert float(B.pfdrr_bmd_features(a, 0.9)) == pytest.approx(1.32, abs=1e-12)
    batch = np.stack([a, 2 * a])[:, None]  # (N, 1, H, W)
    # 2a >= 0.9: 1.0, 2.0, 3.0, 4.0, 1.8, 2.4 -> 14.2 / 6
    np.testing.assert_allclose(B.pfdrr_bmd_features(batch, 0.9), [1.32, 14.2 / 6], atol=1e-12)
    np.testing.assert_allclose(B.pfdrr_bmd_features(torch.tensor(batch, dtype=torch.float32), 0.9),
                               [1.32, 14.2 / 6], atol=1e-6)
    assert np.isnan(B.pfdrr_bmd_features(a, 5.0))  # nothing above t: a failed decomposition


def test_fit_linear_bmd_recovers_slope_and_intercept():
    rng = np.random.default_rng(3)
    x = rng.uniform(0.4, 1.6, 200)
    slope, intercept = B.fit_linear_bmd(x, 0.37 * x + 0.12)
    assert slope == pytest.approx(0.37, abs=1e-6) and intercept == pytest.approx(0.12, abs=1e-6)
    # with noise (sd 0.02 g/cm^2, n 2000): standard error of the slope ~0.0016
    x = rng.uniform(0.4, 1.6, 2000)
    y = 0.37 * x + 0.12 + rng.normal(0, 0.02, x.size)
    slope, intercept = B.fit_linear_bmd(x, y)
    assert slope == pytest.approx(0.37, abs=0.006) and intercept == pytest.approx(0.12, abs=0.006)
    np.testing.assert_allclose(B.apply_linear_bmd([1.0], slope, intercept), [slope + intercept])
    with pytest.raises(ValueError, match="NaN"):
        B.fit_linear_bmd([1.0, np.nan, 2.0], [0.5, 0.6, 0.7])


def test_threshold_tuning_finds_the_bone_threshold_on_synthetic_pfdrrs():
    """Bone of intensity v_i over a variable area, background < 0.2; BMD = 0.5 v + 0.1."""
    rng = np.random.default_rng(5)
    n = 30
    v = rng.uniform(0.6, 1.4, n)
    imgs = rng.uniform(0.0, 0.2, (n, 40, 20))
    for i in range(n):
        h = int(rng.integers(10, 35))
        imgs[i, :h, 5:15] = v[i]
    bmd = 0.5 * v + 0.1
    res = B.tune_threshold(imgs, bmd, [0.0, 0.1, 0.25, 0.5])
    assert res.threshold in (0.25, 0.5)
    assert res.pcc[0] < 0.95 and np.nanmax(res.pcc) == pytest.approx(1.0, abs=1e-9)
    assert res.slope == pytest.approx(0.5, abs=1e-9) and res.intercept == pytest.approx(0.1, abs=1e-9)


# --- networks --------------------------------------------------------------------------------------

def test_generator_maps_a_paper_size_hip_to_a_drr_of_the_same_size():
    torch.manual_seed(0)
    g = BMDGenerator()  # default width 16
    with torch.no_grad():
        out = g(torch.rand(1, 1, 512, 256))
        rep = g.features(torch.rand(1, 1, 512, 256))
    assert out.shape == (1, 1, 512, 256)
    assert rep.shape == (1, 64, 128, 64)  # the 1/4 representation stage 3 regresses from
    assert sum(p.numel() for p in g.parameters()) < 1_000_000
    with pytest.raises(ValueError, match="multiples of 16"):
        g(torch.rand(1, 1, 100, 50))


def test_stem_stride_2_doubles_the_representation_and_the_regressor_follows():
    torch.manual_seed(0)
    g = BMDGenerator(width=4, stem_stride=2)
    x = torch.rand(2, 1, *SMALL)
    with torch.no_grad():
        assert g.features(x).shape == (2, 16, SMALL[0] // 2, SMALL[1] // 2)  # 4 * width channels at 1/2
        assert g(x).shape == (2, 1, *SMALL)  # one transposed convolution back to full size
    assert len([m for m in g.decoder.up if isinstance(m, torch.nn.ConvTranspose2d)]) == 1
    r = BMDRegressor.from_generator(g, SMALL, dims=(16, 32), depths=(1, 1), heads=2)
    assert r.encoder.stem_stride == 2 and r.head.pool == 2  # the head reads the 1/4 grid either way
    assert all(torch.equal(a, b) for a, b in zip(g.encoder.state_dict().values(), r.encoder.state_dict().values()))
    with torch.no_grad():
        assert r(x).shape == (2,)
    # the default stem keeps the module layout of released bundles (state-dict keys unchanged)
    keys4 = set(BMDGenerator(width=4).state_dict())
    assert "decoder.up.3.weight" in keys4 and "decoder.up.3.weight" not in g.state_dict()
    assert set(g.state_dict()) < keys4
    with pytest.raises(ValueError, match="stem_stride must be 2 or 4"):
        BMDGenerator(width=4, stem_stride=8)


def test_discriminator_returns_features_at_every_scale():
    _, d = _tiny_models()
    x, y = _pairs()
    out = d(x, y)
    assert len(out) == 3
    for k, feats in enumerate(out):
        assert len(feats) == 5  # 3 stride-2 layers, 1 stride-1 layer, the patch map
        assert [f.shape[1] for f in feats] == [8, 16, 32, 64, 1]
        assert all(f.shape[0] == 2 for f in feats)
    # each scale sees the pair pooled by 2: first-layer maps 33x17, 17x9, 9x5
    assert [tuple(o[0].shape[-2:]) for o in out] == [(33, 17), (17, 9), (9, 5)]


# --- losses and steps ----------------------------------------------------------------------------

def test_weighted_total_equals_hand_sum_of_parts():
    g, d = _tiny_models()
    x, y = _pairs()
    w = B.LossWeights()
    assert (w.l1, w.gc, w.fm, w.gan) == (100.0, 1.0, 10.0, 1.0)
    terms, fake = B.generator_losses(g, d, x, y, w)
    hand = terms.gan + 100.0 * terms.l1 + 1.0 * terms.gc + 10.0 * terms.fm
    assert float(terms.total.detach()) == pytest.approx(float(hand.detach()), rel=1e-6)
    # each term by hand
    assert float(terms.l1.detach()) == pytest.approx(float((fake - y).abs().mean().detach()), rel=1e-6)
    assert float(terms.gc.detach()) == pytest.approx(float(1 - L.gradient_correlation(y, fake).mean().detach()), rel=1e-6)
    with torch.no_grad():
        real_f, fake_f = d(x, y), d(x, fake)
    fm = sum(float((rf - ff).abs().mean()) for rs, fs in zip(real_f, fake_f) for rf, ff in zip(rs[:-1], fs[:-1]))
    assert float(terms.fm.detach()) == pytest.approx(fm, rel=1e-5)
    gan = sum(float(((fs[-1] - 1) ** 2).mean()) for fs in fake_f)  # LSGAN, G wants "real"
    assert float(terms.gan.detach()) == pytest.approx(gan, rel=1e-5)
    # other weights change only the total
    t2, _ = B.generator_losses(g, d, x, y, B.LossWeights(l1=1, gc=0, fm=0, gan=0), fake=fake)
    assert float(t2.total.detach()) == pytest.approx(float(terms.l1.detach()), rel=1e-6)


def test_gan_loss_modes_by_hand():
    maps = [[torch.full((1, 1, 2, 2), 0.3)], [torch.full((1, 1, 1, 1), -0.2)]]
    assert float(B.gan_loss(maps, True, "lsgan")) == pytest.approx(0.7 ** 2 + 1.2 ** 2)
    assert float(B.gan_loss(maps, False, "lsgan")) == pytest.approx(0.3 ** 2 + 0.2 ** 2)
    bce = float(F.softplus(torch.tensor(-0.3)) + F.softplus(torch.tensor(0.2)))  # -log sigmoid(z)
    assert float(B.gan_loss(maps, True, "vanilla")) == pytest.approx(bce, rel=1e-6)
    with pytest.raises(ValueError, match="gan_mode"):
        B.gan_loss(maps, True, "hinge")


def test_training_steps_reduce_l1_and_update_both_networks():
    g, d = _tiny_models()
    x, y = _pairs()
    opt_g, opt_d = B.make_optimizers(g, d, lr=2e-3)
    d_before = [p.detach().clone() for p in d.parameters()]
    history = [B.decomposition_step(g, d, opt_g, opt_d, x, y) for _ in range(12)]
    l1 = [h["l1"] for h in history]
    assert all(np.isfinite(list(h.values())).all() for h in history)
    assert l1[-1] < 0.8 * l1[0], l1
    assert {"gan", "fm", "l1", "gc", "total", "d_loss", "d_real", "d_fake"} <= set(history[0])
    assert any(not torch.equal(a, b) for a, b in zip(d_before, d.parameters()))
    assert all(p.requires_grad for p in d.parameters())  # re-enabled after the generator update


def test_run_stage_and_hierarchical_stage2_initialisation():
    g1, d1 = _tiny_models()
    x, y = _pairs()
    hist = B.run_decomposition_stage(g1, d1, [(x, y)], epochs=2, lr=1e-3)
    assert len(hist) == 2 and hist[0]["epoch"] == 0.0
    vanilla = B.run_decomposition_stage(g1, d1, [(x, y)], epochs=1, lr=1e-3, gan_mode="vanilla")
    assert np.isfinite(vanilla[0]["gan"]) and vanilla[0]["gan"] > 0
    g2, d2 = B.start_stage2(g1, d1)
    for a, b in zip(g1.state_dict().values(), g2.state_dict().values()):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(d1.state_dict().values(), d2.state_dict().values()))
    with torch.no_grad():
        next(g2.parameters()).add_(1.0)
    assert not torch.equal(next(g1.parameters()), next(g2.parameters()))  # independent copy
    assert B.STAGE_TARGETS == {1: "bone_drr", 2: "pf_drr"}


def test_channels_last_stage_trains_the_same_networks():
    x, y = _pairs(n=4)
    runs = []
    for cl in (False, True):
        g, d = _tiny_models()
        hist = B.run_decomposition_stage(g, d, [(x[:2], y[:2]), (x[2:], y[2:])], epochs=2, lr=1e-3,
                                         channels_last=cl)
        runs.append((g, hist))
    (g0, h0), (g1, h1) = runs
    # same arithmetic in another memory layout: the losses and weights agree to float32 rounding
    assert h1[-1]["l1"] == pytest.approx(h0[-1]["l1"], rel=1e-3)
    for a, b in zip(g0.parameters(), g1.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=5e-4)  # Adam: steps of ~1e-3
    conv = next(m for m in g1.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous()  # handed back in the default layout (bundles, stage 2 copy)


def test_update_ema_is_the_hand_average_with_warm_up():
    model, avg = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
        avg.weight.copy_(torch.tensor([[0.0, 0.0]]))
    B.update_ema(avg, model, 0.9)
    torch.testing.assert_close(avg.weight, torch.tensor([[0.1, 0.2]]))
    # step 0 of the warm-up: decay min(0.9, 1 / 10) = 0.1, so the average jumps 90 % of the way
    B.update_ema(avg, model, 0.9, step=0)
    torch.testing.assert_close(avg.weight, torch.tensor([[0.91, 1.82]]))
    with pytest.raises(ValueError, match="decay"):
        B.update_ema(avg, model, 1.0)


def test_run_stage_keeps_the_generator_average_when_asked():
    g, d = _tiny_models()
    x, y = _pairs(n=4)
    start = [p.detach().clone() for p in g.parameters()]
    ema = copy.deepcopy(g)
    B.run_decomposition_stage(g, d, [(x[:2], y[:2]), (x[2:], y[2:])], epochs=2, lr=1e-3, ema=ema,
                              ema_decay=0.5)
    # 4 steps; warm-up decays min(0.5, (1 + k) / (10 + k)) = 0.1, 0.18, 0.25, 0.31: the average ends
    # between the start and the trained weights, nearer the trained ones
    moved = [float((p.detach() - p0).abs().sum()) for p, p0 in zip(g.parameters(), start)]
    lag = [float((p.detach() - a.detach()).abs().sum()) for p, a in zip(g.parameters(), ema.parameters())]
    assert sum(moved) > 0
    assert 0 < sum(lag) < 0.5 * sum(moved)


def test_stage3_regressor_inherits_encoder_and_trains_on_weighted_l1():
    g, _ = _tiny_models()
    torch.manual_seed(2)
    r = BMDRegressor.from_generator(g, SMALL, dims=(16, 32), depths=(1, 1), heads=2)
    for a, b in zip(g.encoder.state_dict().values(), r.encoder.state_dict().values()):
        assert torch.equal(a, b)
    x = torch.rand(4, 1, *SMALL, generator=torch.Generator().manual_seed(4))
    bmd = torch.tensor([0.55, 0.70, 0.80, 1.05])
    w = L.distance_weights(bmd)  # mean 0.775: d = .225 .075 .025 .275 -> w = 0.68 1.18 1.5 0.5
    np.testing.assert_allclose(w.numpy(), [1.5 - 0.2 / 0.25, 1.5 - 0.05 / 0.25, 1.5, 0.5], atol=1e-6)
    opt = B.stage3_optimizer(r, "frozen_encoder", lr=3e-3)  # paper 6e-5; faster for 16 steps
    assert not any(p.requires_grad for p in r.encoder.parameters())
    enc_before = [p.detach().clone() for p in r.encoder.parameters()]
    with torch.no_grad():
        expected = float((w * (r(x) - bmd).abs()).mean())
    first = B.regression_step(r, opt, x, bmd, w)
    assert first == pytest.approx(expected, rel=1e-5)
    losses = [B.regression_step(r, opt, x, bmd, w) for _ in range(15)]
    # the untrained head predicts ~0; 16 steps bring the estimates to the BMD range
    assert losses[-1] < 0.85 * first
    with torch.no_grad():
        assert float(r(x).mean()) == pytest.approx(float(bmd.mean()), abs=0.1)
    assert all(torch.equal(a, b) for a, b in zip(enc_before, r.encoder.parameters()))
    opt2 = B.stage3_optimizer(r, "end_to_end")
    assert all(p.requires_grad for p in r.parameters())
    assert opt2.param_groups[0]["lr"] == pytest.approx(8e-6)
