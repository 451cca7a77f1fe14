"""Training machinery: recipes, patient-level folds, augmentation, the trainer (resume
equivalence, best-validation selection, early stopping), site manifests, and the whole
``screener train`` -> bundle -> ``screener evaluate`` path on a toy protocol."""
from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from training.folds import make_splits, patient_kfold, repeated_patient_kfold, shuffle_splits
from training.manifest import ManifestError, read_manifest, write_manifest
from training.recipes import AugmentationSpec, RecipeError, load_recipe, recipe_from_dict
from training.trainer import (
    ArrayDataset,
    AugParams,
    FitConfig,
    apply_augmentation,
    build_loss,
    fit,
    predict,
    sample_augmentation,
)

# --- a toy protocol: regress a BMD-like value from the mean brightness of noisy images ----------


class ToyNet(nn.Module):
    """Conv + BN + dropout + linear: exercises batch-norm statistics and dropout RNG."""

    def __init__(self, channels: int = 4, dropout: float = 0.2) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        return self.fc(self.drop(h))


def toy_dataset(n: int = 96, seed: int = 1, per_patient: int = 1) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    level = rng.uniform(0, 1, n)
    imgs = (level[:, None, None, None] + 0.2 * rng.standard_normal((n, 1, 16, 16))).astype(np.float32)
    bmd = 0.55 + 0.8 * level
    pid = [f"p{i // per_patient:03d}" for i in range(n)]
    return ArrayDataset(imgs, bmd, pid, strata=(bmd < 0.856).astype(int),
                        attributes={"profile": np.where(np.arange(n) % 4 == 0, "B", "A")})


def toy_factory(recipe) -> ArrayDataset:  # noqa: ANN001 - the DatasetFactory signature
    return toy_dataset(recipe.data.n, recipe.data.seed)


RECIPE = """
protocol = "l1_axial"
variant = "cohort"
seed = 3
description = "toy"

[network]
name = "ToyNet"
kwargs = { channels = 4 }

[loss]
name = "weighted_huber"
kwargs = { delta = 0.1 }

[optimizer]
name = "adam"
lr = 0.02

[training]
epochs = 12
batch_size = 16
folds = 2
test_fraction = 0.25
early_stopping_patience = 6
device = "cpu"

[augmentation]
rotation_deg = 5.0
shift_frac = 0.05
hflip_p = 0.5

[data]
source = "cohort"
n = 80
seed = 1
profiles = ["A"]
holdout_profiles = ["B"]

[bundle]
version = "0.0.1"
outputs = ["bmd"]
units = ["g/cm2"]
t_score_mean = 0.9747
t_score_sd = 0.1185
t_score_reference = "Kang et al. 2023"
changelog = { "0.0.1" = "toy release", "0.0.0" = "never shipped" }
"""


# --- folds ------------------------------------------------------------------------------------

def test_kfold_is_patient_level_complete_and_deterministic() -> None:
    ids = np.repeat([f"p{i}" for i in range(23)], 3)  # 3 samples per patient
    strata = np.repeat(np.arange(23) % 3, 3)
    folds = patient_kfold(ids, 5, seed=11, strata=strata)
    seen_val = []
    for f in folds:
        tr, va = set(ids[f.train]), set(ids[f.val])
        assert not tr & va, "a patient is in training and validation"
        assert tr | va == set(ids)
        seen_val += list(va)
        # every patient's 3 samples travel together
        assert len(f.val) == 3 * len(va)
    assert sorted(seen_val) == sorted(set(ids)), "every patient is validated exactly once"
    sizes = [len(set(ids[f.val])) for f in folds]
    assert max(sizes) - min(sizes) <= 1
    # stratified: each fold's validation patients hold the three strata in near-equal shares
    for f in folds:
        counts = np.bincount(strata[f.val][::3], minlength=3)
        assert counts.max() - counts.min() <= 1
    again = patient_kfold(ids, 5, seed=11, strata=strata)
    assert all(np.array_equal(a.val, b.val) for a, b in zip(folds, again))
    other = patient_kfold(ids, 5, seed=12, strata=strata)
    assert any(not np.array_equal(a.val, b.val) for a, b in zip(folds, other))


def test_repeated_kfold_shuffle_splits_and_test_holdout() -> None:
    ids = np.repeat(np.arange(40), 2)
    rep = repeated_patient_kfold(ids, 4, 3, seed=5)
    assert len(rep) == 12 and [f.repeat for f in rep[::4]] == [0, 1, 2]
    assert not np.array_equal(rep[0].val, rep[4].val)
    sh = shuffle_splits(ids, 10, 0.2, seed=5)
    assert len(sh) == 10
    for f in sh:
        assert len(set(f.val)) and not set(ids[f.train]) & set(ids[f.val])
        assert len(set(ids[f.val])) == 8  # 20 % of 40 patients
    excl = np.arange(80) < 10  # patients 0-4 held out (e.g. another scanner)
    plan = make_splits(ids, folds=3, test_fraction=0.25, seed=2, exclude=excl)
    test_p = set(ids[plan.test])
    assert len(test_p) == round(0.25 * 35)
    assert set(ids[plan.excluded]) == {0, 1, 2, 3, 4}
    for f in plan.folds:
        assert not test_p & set(ids[f.train]) and not test_p & set(ids[f.val])
        assert not set(ids[plan.excluded]) & (set(ids[f.train]) | set(ids[f.val]))
    with pytest.raises(ValueError, match="both excluded and included"):
        make_splits(ids, folds=3, exclude=np.arange(80) == 0)
    with pytest.raises(ValueError, match="k-fold needs"):
        patient_kfold(ids, 41, seed=0)


# --- recipes ----------------------------------------------------------------------------------

def test_recipe_loads_and_round_trips(tmp_path: Path) -> None:
    p = tmp_path / "toy.toml"
    p.write_text(RECIPE)
    r = load_recipe(p)
    assert r.protocol == "l1_axial" and r.variant == "cohort" and r.seed == 3
    assert r.training.folds == 2 and r.training.early_stopping_patience == 6
    assert r.augmentation.hflip_p == 0.5 and r.loss.kwargs == {"delta": 0.1}
    assert r.task == "regression" and r.data.holdout_profiles == ("B",)
    again = recipe_from_dict(json.loads(json.dumps(r.to_dict())))
    assert again.to_dict() == r.to_dict()


@pytest.mark.parametrize(
    "edit,message",
    [
        (("lr = 0.02", "lr = \"fast\""), r"\[optimizer\] lr must be a number"),
        (("epochs = 12", "epoch = 12"), r"\[training\] epochs is required \(unknown key 'epoch' here"),
        (("early_stopping_patience = 6", "early_stopping_patience = 6\nshuffle = true"), r"\[training\] unknown key 'shuffle'"),
        (("variant = \"cohort\"", "variant = \"clinic\""), r"variant must be one of paper, cohort"),
        (("name = \"weighted_huber\"", "name = \"hubber\""), r"\[loss\] name must be one of"),
        (("hflip_p = 0.5", "hflip_p = 1.5"), r"\[augmentation\] hflip_p must be <= 1.0"),
        (("[network]\nname = \"ToyNet\"", "[network]\n"), r"\[network\] name is required"),
        (("holdout_profiles = [\"B\"]", "holdout_profiles = [\"A\"]"), r"holdout_profiles repeats"),
        (("folds = 2", "folds = 1"), r"\[training\] folds must be >= 2"),
    ],
)
def test_recipe_errors_name_the_key(tmp_path: Path, edit: tuple[str, str], message: str) -> None:
    assert edit[0] in RECIPE
    p = tmp_path / "bad.toml"
    p.write_text(RECIPE.replace(edit[0], edit[1], 1))
    with pytest.raises(RecipeError, match=message) as exc:
        load_recipe(p)
    assert str(p) in str(exc.value)


def test_recipe_missing_section_and_file(tmp_path: Path) -> None:
    doc = {"protocol": "x", "variant": "paper", "seed": 0}
    with pytest.raises(RecipeError, match=r"missing section \[network\]"):
        recipe_from_dict(doc)
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "none.toml")


# --- augmentation -----------------------------------------------------------------------------

def test_augmentation_geometry_and_determinism() -> None:
    img = torch.arange(64, dtype=torch.float32).reshape(1, 1, 8, 8)
    none = AugParams(torch.zeros(1), torch.zeros(1, 2), torch.zeros(1, dtype=torch.bool), torch.zeros(1, dtype=torch.bool))
    torch.testing.assert_close(apply_augmentation(img, none), img)
    flip = AugParams(torch.zeros(1), torch.zeros(1, 2), torch.ones(1, dtype=torch.bool), torch.zeros(1, dtype=torch.bool))
    torch.testing.assert_close(apply_augmentation(img, flip), torch.flip(img, dims=[3]))
    # shift 0.25 of 8 px = 2 px to the right; the 2 columns shifted in are zero
    shift = AugParams(torch.zeros(1), torch.tensor([[0.25, 0.0]]), torch.zeros(1, dtype=torch.bool),
                      torch.zeros(1, dtype=torch.bool))
    out = apply_augmentation(img, shift)
    torch.testing.assert_close(out[..., 2:], img[..., :-2], atol=1e-4, rtol=0)
    assert float(out[..., :2].abs().max()) < 1e-4
    rot = AugParams(torch.tensor([90.0]), torch.zeros(1, 2), torch.zeros(1, dtype=torch.bool),
                    torch.zeros(1, dtype=torch.bool))
    r90 = apply_augmentation(img, rot)
    assert any(torch.allclose(r90, torch.rot90(img, k, dims=(2, 3)), atol=1e-4) for k in (1, 3))
    # parameters come from a CPU generator: same seed, same draws, within the recipe's ranges
    spec = AugmentationSpec(rotation_deg=5, shift_frac=0.1, hflip_p=0.5)
    a = sample_augmentation(500, spec, torch.Generator().manual_seed(4))
    b = sample_augmentation(500, spec, torch.Generator().manual_seed(4))
    assert torch.equal(a.angle_deg, b.angle_deg) and torch.equal(a.hflip, b.hflip)
    assert float(a.angle_deg.abs().max()) <= 5 and float(a.shift.abs().max()) <= 0.1
    assert 0.4 < float(a.hflip.float().mean()) < 0.6 and not bool(a.vflip.any())


# --- trainer ----------------------------------------------------------------------------------

def _config(epochs: int, patience: int = 0) -> FitConfig:
    r = recipe_from_dict(tomllib.loads(RECIPE))
    return dataclasses.replace(FitConfig.from_recipe(r, seed=9), epochs=epochs, early_stopping_patience=patience)


def _fresh(seed: int = 9) -> ToyNet:
    torch.manual_seed(seed)
    return ToyNet()


def test_training_reduces_loss_and_keeps_best_validation_weights(tmp_path: Path) -> None:
    ds = toy_dataset(64)
    train, val = ds.subset(np.arange(48)), ds.subset(np.arange(48, 64))
    model = _fresh()
    loss = build_loss(_config(1).loss, train.targets)
    w = torch.from_numpy(loss.weights(train.targets))
    with torch.no_grad():
        before = float(loss(model.eval()(torch.from_numpy(train.images)), torch.from_numpy(train.targets), w))
    res = fit(model, train, val, _config(10), device="cpu", progress=False)
    with torch.no_grad():
        after = float(loss(model.eval()(torch.from_numpy(train.images)), torch.from_numpy(train.targets), w))
    assert after < 0.5 * before, (before, after)
    assert res.finished and res.epochs_run == 10 and len(res.history) == 10
    vals = [h["val_loss"] for h in res.history]
    assert res.best_epoch == int(np.argmin(vals)) and res.best_val_loss == pytest.approx(min(vals))
    # the returned model holds the best-validation weights, not the last epoch's
    loss_v = build_loss(_config(1).loss, train.targets)
    wv = torch.from_numpy(loss_v.weights(val.targets))
    with torch.no_grad():
        v = float(loss_v(model(torch.from_numpy(val.images)), torch.from_numpy(val.targets), wv))
    assert v == pytest.approx(min(vals), rel=1e-5)
    # Kang's histogram weights were fitted on the training targets (minimum weight 1)
    assert min(res.loss_card["histogram_weights"]["bin_weights"]) == pytest.approx(1.0, abs=1e-2)
    assert float(loss.weights(train.targets).min()) >= 1.0 - 1e-6


def test_early_stopping_stops_after_patience() -> None:
    ds = toy_dataset(48)
    cfg = _config(200, patience=2)
    cfg = dataclasses.replace(cfg, optimizer=dataclasses.replace(cfg.optimizer, lr=0.3))
    res = fit(_fresh(), ds.subset(np.arange(32)), ds.subset(np.arange(32, 48)), cfg, device="cpu", progress=False)
    assert res.stopped_early and res.epochs_run < 200
    assert res.epochs_run == res.best_epoch + 1 + 2  # stopped two epochs after the last improvement


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path: Path) -> None:
    ds = toy_dataset(56)
    train, val = ds.subset(np.arange(40)), ds.subset(np.arange(40, 56))
    cfg = _config(6)
    full = _fresh()
    r_full = fit(full, train, val, cfg, device="cpu", progress=False, checkpoint=tmp_path / "full.pt")
    part = _fresh()
    r1 = fit(part, train, val, cfg, device="cpu", progress=False, checkpoint=tmp_path / "part.pt", stop_after=2)
    assert not r1.finished and r1.epochs_run == 2
    state = torch.load(tmp_path / "part.pt", weights_only=True)
    assert state["epoch"] == 2 and {"model", "optimizer", "rng", "best_state"} <= set(state)
    torch.manual_seed(12345)  # disturb the global RNG: the checkpoint must restore it
    resumed = _fresh()
    r2 = fit(resumed, train, val, cfg, device="cpu", progress=False, checkpoint=tmp_path / "part.pt", resume=True)
    assert r2.finished and r2.epochs_run == 6
    assert [h["val_loss"] for h in r2.history] == [h["val_loss"] for h in r_full.history]
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    # a finished checkpoint resumes to the same model without training again
    again = _fresh(1)
    r3 = fit(again, train, val, cfg, device="cpu", progress=False, checkpoint=tmp_path / "full.pt", resume=True)
    assert r3.epochs_run == 6 and r3.best_epoch == r_full.best_epoch
    for a, b in zip(full.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_predict_averages_the_ensemble() -> None:
    x = np.random.default_rng(0).random((5, 1, 16, 16)).astype(np.float32)
    m1, m2 = _fresh(1).eval(), _fresh(2).eval()
    p1, p2 = predict(m1, x, device="cpu"), predict(m2, x, device="cpu")
    np.testing.assert_allclose(predict([m1, m2], x, device="cpu"), (p1 + p2) / 2, rtol=1e-6)
    # classification ensembles average probabilities
    lin = nn.Sequential(nn.Flatten(), nn.Linear(256, 3)).eval()
    pr = predict(lin, x, task="multiclass", device="cpu")
    np.testing.assert_allclose(pr.sum(axis=1), 1.0, rtol=1e-9)


# --- manifest ---------------------------------------------------------------------------------

def test_manifest_parses_and_derives(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b.dcm").write_bytes(b"")
    rows = [
        {"patient_id": "P1", "dicom_path": "a", "bmd": 0.9, "t_score": -0.6, "age": 64, "sex": "f",
         "height_cm": 160, "weight_kg": 64},
        {"patient_id": "P2", "dicom_path": "a;b.dcm", "t_score": -2.7, "tbs": 1.21},
    ]
    m = read_manifest(write_manifest(tmp_path / "site.csv", rows))
    assert len(m) == 2 and m.rows[0].row == 2
    assert m.rows[0].grade == "normal" and m.rows[1].grade == "osteoporosis"  # derived from T (WHO)
    assert m.rows[0].bmi == pytest.approx(25.0) and m.rows[0].sex == "F"
    assert m.rows[1].dicom_paths == (tmp_path / "a", tmp_path / "b.dcm")
    np.testing.assert_allclose(m.column("grade"), [0, 2])
    np.testing.assert_allclose(m.rows[0].demographics(), [64, 0, 160, 64, 25.0])
    # the WHO cut-offs as the reports grade them (screener.scores.who_grade): T = -1.0 is still
    # normal, T = -2.5 osteoporosis (the manifest's own copy graded -1.0 osteopenia)
    edge = [{"patient_id": f"E{k}", "dicom_path": "a", "t_score": t} for k, t in enumerate((-1.0, -2.5, -1.01))]
    assert [r.grade for r in read_manifest(write_manifest(tmp_path / "edge.csv", edge)).rows] == [
        "normal", "osteoporosis", "osteopenia"]


def test_manifest_errors_are_row_numbered(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    text = ("patient_id,dicom_path,bmd,grade,sex\n"
            "P1,a,0.9,normal,F\n"
            "P2,a,abc,,F\n"
            "P3,missing,0.8,,F\n"
            "P4,a,0.7,severe,X\n"
            ",a,0.8,,M\n")
    (tmp_path / "m.csv").write_text(text)
    with pytest.raises(ManifestError) as exc:
        read_manifest(tmp_path / "m.csv")
    msg = str(exc.value)
    assert "row 3 column bmd: 'abc' is not a number" in msg
    assert "row 4 column dicom_path" in msg and "does not exist" in msg
    assert "row 5 column grade: 'severe' must be one of" in msg
    assert "row 6 column patient_id: is empty but required" in msg
    assert "row 2" not in msg
    (tmp_path / "h.csv").write_text("patient_id,dicom_path,bmd,shoe_size\nP1,a,0.9,42\n")
    with pytest.raises(ManifestError, match=r"row 1: unknown column\(s\) \['shoe_size'\]"):
        read_manifest(tmp_path / "h.csv")
    (tmp_path / "c.csv").write_text("patient_id,dicom_path,t_score,grade\nP1,a,-3.0,normal\n")
    with pytest.raises(ManifestError, match="row 2 column grade: 'normal' contradicts t_score -3"):
        read_manifest(tmp_path / "c.csv")
    (tmp_path / "r.csv").write_text("patient_id,dicom_path,bmd\nP1,a,0.9\n")
    with pytest.raises(ManifestError, match=r"missing column\(s\) \['tbs'\]"):
        read_manifest(tmp_path / "r.csv", require=("tbs",))


# --- the CLI: train -> bundle -> load -> evaluate ---------------------------------------------

def test_train_bundle_evaluate_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from screener.bundles import load_bundle
    from training.cli import evaluate_main, train_main

    recipe = tmp_path / "toy.toml"
    recipe.write_text(RECIPE)
    kw = {"dataset_factories": {"l1_axial": toy_factory}, "networks": {"ToyNet": ToyNet}}
    out = tmp_path / "models"
    # no builder registered for the protocol: a clear error, exit status 2
    assert train_main([str(recipe), "--out", str(out)], dataset_factories={}) == 2
    assert "protocol 'l1_axial' has no dataset builder yet" in capsys.readouterr().err

    assert train_main([str(recipe), "--out", str(out), "--no-progress"], **kw) == 0
    printed = capsys.readouterr().out
    assert "| Pearson r | " in printed and "holdout profile B" in printed
    b = load_bundle(out / "l1_axial", "cpu", networks={"ToyNet": ToyNet})
    assert len(b.models) == 2 and all(not m.training for m in b.models)
    assert b.card["seed"] == 3 and "screener train" in b.card["command"]
    assert b.card["t_score_reference"]["mean"] == 0.9747
    assert b.card["changelog"] == {"0.0.1": "toy release", "0.0.0": "never shipped"}
    rows = b.card["metrics"]["rows"]["test"]["l1_axial"]
    r_test = [r for r in rows if r["metric"] == "Pearson r"][0]["value"]
    assert r_test > 0.8, r_test  # brightness -> BMD is learnable in 12 epochs
    assert (out / "l1_axial" / "evaluation" / "test-bmd-scatter.png").stat().st_size > 5000

    # evaluate the rebuilt test split: the same numbers as at training time
    ev = tmp_path / "eval"
    assert evaluate_main([str(out / "l1_axial"), "--data", "test", "--out", str(ev)], **kw) == 0
    res = json.loads((ev / "results.json").read_text())
    r_eval = [r for r in res["test"]["l1_axial"] if r["metric"] == "Pearson r"][0]["value"]
    assert r_eval == pytest.approx(r_test, abs=0.01)  # float16 weights vs float32 at training
    assert (ev / "eval-bmd-bland-altman.png").is_file() and "synthetic" in (ev / "results.md").read_text()
    # an .npz data set grouped by an attribute
    ds = toy_dataset(40, seed=7)
    ds.save_npz(tmp_path / "ext.npz")
    assert evaluate_main([str(out / "l1_axial"), "--data", str(tmp_path / "ext.npz"), "--by", "profile"], **kw) == 0
    text = capsys.readouterr().out
    assert "profile=A" in text and "profile=B" in text
    # resume after completion re-uses the checkpoints and rewrites the same bundle
    assert train_main([str(recipe), "--out", str(out), "--no-progress", "--resume"], **kw) == 0
    b2 = load_bundle(out / "l1_axial", "cpu", networks={"ToyNet": ToyNet})
    for m1, m2 in zip(b.models, b2.models):
        for t1, t2 in zip(m1.state_dict().values(), m2.state_dict().values()):
            assert torch.equal(t1, t2)


def test_paper_networks_train_with_extras_and_multitask_heads() -> None:
    """Ha's classifier takes demographics as a second input; Nissinen's net two sigmoid tasks."""
    from screener.bundles import build_network
    from training.recipes import LossSpec, OptimizerSpec

    rng = np.random.default_rng(3)
    n = 24
    imgs = rng.random((n, 1, 64, 64)).astype(np.float32)
    demo = rng.normal(size=(n, 5)).astype(np.float32)
    ds = ArrayDataset(imgs, rng.integers(0, 3, n), np.arange(n), extras=demo)
    torch.manual_seed(0)
    ha = build_network("HaClassifier", {"input_size": 64, "channels": [4, 4, 8, 8, 8, 8], "fc": [16],
                                        "demo_fc": [8, 4], "head_hidden": 8})
    cfg = FitConfig(epochs=2, batch_size=8, optimizer=OptimizerSpec(lr=1e-3), loss=LossSpec("cross_entropy"))
    res = fit(ha, ds.subset(np.arange(16)), ds.subset(np.arange(16, 24)), cfg, device="cpu", progress=False)
    assert res.finished and len(res.history) == 2 and np.isfinite(res.best_val_loss)
    p = predict(ha, ds, task="multiclass", device="cpu")
    assert p.shape == (n, 3)
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-9)

    labels = rng.integers(0, 2, (n, 2))
    ds2 = ArrayDataset(rng.random((n, 1, 32, 32)), labels, np.arange(n))
    torch.manual_seed(0)
    nis = build_network("NissinenCNN", {"input_size": 32, "n_tasks": 2, "channels": [4, 4, 8, 8], "fc_units": 8})
    cfg2 = FitConfig(epochs=2, batch_size=8, optimizer=OptimizerSpec(lr=1e-3, weight_decay=1e-3), loss=LossSpec("bce"))
    res2 = fit(nis, ds2.subset(np.arange(16)), ds2.subset(np.arange(16, 24)), cfg2, device="cpu", progress=False)
    assert res2.finished
    q = predict(nis, ds2, task="binary", device="cpu")
    assert q.shape == (n, 2) and float(q.min()) > 0 and float(q.max()) < 1


def test_square_pixel_rotation_is_rigid_on_a_non_square_image() -> None:
    """``square_pixels=True`` turns a disc on a 2:1 image into the same disc; normalised coordinates
    stretch it, and zoom / shear change its moments as expected."""
    rr, cc = torch.meshgrid(torch.arange(64.0), torch.arange(32.0), indexing="ij")
    disc = (((rr - 31.5) ** 2 + (cc - 15.5) ** 2) <= 36.0).float()[None, None]

    def moments(img: torch.Tensor) -> tuple[float, float, float]:
        w = img[0, 0]
        m = float(w.sum())
        r0, c0 = float((w * rr).sum()) / m, float((w * cc).sum()) / m
        return m, float((w * (rr - r0) ** 2).sum()) / m, float((w * (cc - c0) ** 2).sum()) / m

    z = torch.zeros(1)
    p = AugParams(torch.tensor([30.0]), torch.zeros(1, 2), z.bool(), z.bool())
    m0, vr0, vc0 = moments(disc)
    m1, vr1, vc1 = moments(apply_augmentation(disc, p, square_pixels=True))
    assert abs(m1 - m0) / m0 < 0.03 and abs(vr1 - vc1) / vr0 < 0.05
    _, vr2, vc2 = moments(apply_augmentation(disc, p))
    assert abs(vr2 - vc2) / vr0 > 0.3  # normalised coordinates stretch a non-square image
    zoom = AugParams(z, torch.zeros(1, 2), z.bool(), z.bool(), scale=torch.tensor([1.25]))
    m3, _, _ = moments(apply_augmentation(disc, zoom, square_pixels=True))
    assert abs(m3 / m0 - 1.25 ** 2) < 0.1


def test_torch_threads_recipe_default_and_environment_override(monkeypatch) -> None:
    """A recipe's ``[training] torch_threads`` sets the threads; ``SCREENER_TORCH_THREADS`` wins."""
    from training.cli import CliError
    from training.plan import limit_torch_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("SCREENER_TORCH_THREADS", raising=False)
        assert limit_torch_threads(3) == 3 and torch.get_num_threads() == 3
        monkeypatch.setenv("SCREENER_TORCH_THREADS", "1")
        assert limit_torch_threads(3) == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("SCREENER_TORCH_THREADS", "two")
        with pytest.raises(CliError, match="whole number"):
            limit_torch_threads(3)
    finally:
        torch.set_num_threads(before)
