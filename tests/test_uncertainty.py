"""Issue 16 item 2: split-conformal intervals, their use in findings / SR / study result, the
fold-disagreement flag."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from screener import references, scores
from screener.findings import Finding
from screener.reporting import codes
from screener.reporting.sr import build_sr, write_sr
from screener.study_result import study_result
from screener.uncertainty import DEFAULT_FOLD_RANGE_G_CM2, annotate
from tests.ct_factory import make_ct_series
from tests.test_reporting import FAST, assert_valid_dicom, render_html
from training.intervals import coverage, fit_conformal


def test_conformal_half_width_is_the_right_order_statistic() -> None:
    truth = np.zeros(9)
    pred = np.arange(1, 10) / 10.0          # residuals 0.1 .. 0.9
    rec = fit_conformal(truth, pred, level=0.9)
    assert rec["half_width"] == pytest.approx(0.9) and rec["n"] == 9   # ceil(10 x 0.9) = 9th
    assert fit_conformal(truth, pred, level=0.5)["half_width"] == pytest.approx(0.5)  # ceil(5) = 5th
    with pytest.raises(ValueError, match="too few"):
        fit_conformal(truth[:5], pred[:5], level=0.9)
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        fit_conformal(truth, pred, level=1.0)


def test_conformal_interval_covers_90_percent_of_new_samples() -> None:
    """On exchangeable synthetic residuals (heavy-tailed, as a model's are) the 90 % interval
    fitted on 500 validation samples covers 88-92 % of 20,000 test samples."""
    rng = np.random.default_rng(16)
    cov = []
    for _ in range(20):
        val = rng.standard_t(4, 500) * 0.04
        rec = fit_conformal(np.zeros(500), val, level=0.9)
        test = rng.standard_t(4, 20000) * 0.04
        cov.append(coverage(np.zeros(20000), test, rec["half_width"]))
    assert 0.88 <= float(np.mean(cov)) <= 0.92
    assert min(cov) > 0.86 and max(cov) < 0.94


@pytest.fixture(scope="module")
def header(tmp_path_factory: pytest.TempPathFactory) -> pydicom.Dataset:
    ct = make_ct_series(tmp_path_factory.mktemp("unc") / "in", l1_hu=140.0, noise_sd=8.0, seed=3, **FAST)
    return pydicom.dcmread(ct.paths[0], stop_before_pixels=True)


def _l1_axial(bmd: float, uid: str, folds: list[float]) -> Finding:
    t, ref = scores.t_score_for(bmd, "L1")
    return Finding("l1_axial", "1.1.0", "L1",
                   [scores.bmd_measurement(bmd, site="L1", name="L1 BMD estimate"),
                    scores.t_score_measurement(t, site="L1", name="L1 T-score estimate", reference=ref)],
                   category=scores.who_grade(t), site_code=codes.site_code("L1"),
                   referenced_sop_instance_uids=[uid],
                   details={"bundle_id": "l1_axial@1.1.0", "bundle_version": "1.1.0", "bmd_per_fold": folds})


def _models_with_interval(tmp_path: Path, half_width: float | None) -> Path:
    models = tmp_path / "models"
    (models / "l1_axial").mkdir(parents=True)
    card = json.loads((Path(__file__).resolve().parents[1] / "models/l1_axial/model_card.json").read_text())
    card.pop("intervals", None)
    if half_width is not None:
        card["intervals"] = {"bmd": {"level": 0.9, "half_width": half_width, "n": 450,
                                     "fold_range_limit": 0.05, "method": "split-conformal (test)"}}
    (models / "l1_axial" / "model_card.json").write_text(json.dumps(card))
    return models


def test_card_interval_reaches_the_finding_the_sr_and_the_study_result(header, tmp_path: Path) -> None:  # noqa: ANN001
    uid = str(header.SOPInstanceUID)
    f = _l1_axial(0.80, uid, [0.79, 0.80, 0.81])
    annotate([f], _models_with_interval(tmp_path, 0.071))
    bmd, t = f.measurements
    assert bmd.interval == pytest.approx((0.729, 0.871)) and bmd.interval_level == 0.9
    assert t.interval == pytest.approx(((0.729 - 0.9747) / 0.1185, (0.871 - 0.9747) / 0.1185))
    assert "fold_disagreement" not in f.details and f.details["fold_range_g_cm2"] == pytest.approx(0.02)
    rec = bmd.to_record()
    assert rec["interval"] == pytest.approx([0.729, 0.871]) and rec["interval_level"] == 0.9
    from screener.results import BASE_FIELDS, _measurement, to_csv

    row = {**{k: None for k in BASE_FIELDS}, "flags": [], "measurements": [_measurement(rec)]}
    head, line = to_csv([row]).splitlines()
    cols = dict(zip(head.split(","), line.split(",")))
    assert float(cols["L1 BMD estimate interval low"]) == pytest.approx(0.729)
    assert float(cols["L1 BMD estimate interval high"]) == pytest.approx(0.871)
    vote = study_result([f]).contributions[0]
    # T -1.48, interval -2.07 .. -0.88: osteopenia and normal
    assert vote.compatible == ["osteopenia", "normal"] and vote.uncertainty.startswith("90 % prediction interval")
    path = write_sr(build_sr([f], [header]), tmp_path / "sr")
    assert_valid_dicom(path)
    assert "90 % prediction interval 0.729 to 0.871 g/cm2 (split-conformal (test))" in render_html(path)
    sr = pydicom.dcmread(path)
    found = []

    def walk(items):  # noqa: ANN001, ANN202
        for i in items:
            if i.get("ValueType") == "NUM" and i.ConceptNameCodeSequence[0].CodeValue == "371886008":
                found.append((float(i.MeasuredValueSequence[0].NumericValue),
                              i.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue))
            walk(i.get("ContentSequence") or [])
    walk(sr.ContentSequence)
    assert found[0] == (pytest.approx(0.071), "g/cm2") and found[1] == (pytest.approx(0.071 / 0.1185), "1")


def test_folds_that_disagree_are_flagged_and_noted_in_the_study_result(header, tmp_path: Path) -> None:  # noqa: ANN001
    uid = str(header.SOPInstanceUID)
    f = _l1_axial(0.685, uid, [0.61, 0.685, 0.76])     # the 0.15 g/cm2 spread
    annotate([f], _models_with_interval(tmp_path, None))  # no record: default limit, no interval
    assert f.measurements[0].interval is None
    assert f.details["fold_disagreement"] is True and f.details["fold_range_limit_g_cm2"] == DEFAULT_FOLD_RANGE_G_CM2
    (flag,) = [x for x in f.flags if x.startswith("ensemble folds disagree")]
    assert "0.610-0.760 g/cm2 (range 0.150 > 0.100 g/cm2, the default limit" in flag
    r = study_result([f])
    assert any("ensemble folds disagree" in n for n in r.notes)
    shutil.rmtree(tmp_path / "models")


def test_an_input_outside_the_training_range_is_flagged_out_of_distribution(header, tmp_path: Path) -> None:  # noqa: ANN001
    from training.intervals import input_stats as training_stats

    rng = np.random.default_rng(3)
    train = rng.normal(0.4, 0.1, (300, 1, 16, 16)) * rng.uniform(0.8, 1.2, (300, 1, 1, 1))
    stats = training_stats(train)
    models = _models_with_interval(tmp_path, 0.071)
    card_path = models / "l1_axial" / "model_card.json"
    card = json.loads(card_path.read_text())
    card["intervals"]["input_stats"] = stats
    card_path.write_text(json.dumps(card))
    uid = str(header.SOPInstanceUID)
    from screener.uncertainty import input_stats

    usual = _l1_axial(0.80, uid, [0.8, 0.8, 0.8])
    usual.details["input_stats"] = input_stats(train[:3])
    odd = _l1_axial(0.80, uid, [0.8, 0.8, 0.8])
    odd.details["input_stats"] = input_stats(train[:3] * 3.0)     # three times as bright
    annotate([usual, odd], models)
    assert usual.details["out_of_distribution"] is False and not any("unlike" in f for f in usual.flags)
    assert odd.details["out_of_distribution"] is True
    (flag,) = [f for f in odd.flags if f.startswith("input unlike the training data")]
    assert "input mean" in flag and f"{stats['mean'][1]:.3g}" in flag
    assert any("unlike the training data" in n for n in study_result([odd]).notes)


def test_classifier_folds_that_disagree_are_flagged(tmp_path: Path) -> None:
    from screener.uncertainty import DEFAULT_CLASS_FOLD_RANGE

    def femur(per_fold: dict) -> Finding:
        probs = {c: float(np.mean(v)) for c, v in per_fold.items()}
        return Finding("femur_coronal", "1.1.0", "proximal femur", [], category=max(probs, key=probs.get),
                       details={"bundle_id": "femur_coronal@1.1.0", "probabilities": probs, "per_fold": per_fold})

    calm = femur({"normal": [0.7, 0.8], "osteopenia": [0.25, 0.15], "osteoporosis": [0.05, 0.05]})
    split = femur({"normal": [0.9, 0.2], "osteopenia": [0.08, 0.7], "osteoporosis": [0.02, 0.1]})
    annotate([calm, split], tmp_path / "no-models")
    assert calm.details["fold_range_probability"] == pytest.approx(0.1) and "fold_disagreement" not in calm.details
    assert split.details["fold_disagreement"] is True and DEFAULT_CLASS_FOLD_RANGE == 0.5
    (flag,) = split.flags
    assert flag.startswith("ensemble folds disagree: P(normal) per fold 0.20-0.90 (range 0.70 > 0.50)")
