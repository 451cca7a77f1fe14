"""Metrics against hand computations, scipy and a textbook ICC example; the papers' tables."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from training import metrics as M


def test_pearson_r_matches_scipy_and_hand_value() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(1.0, 0.15, 200)
    b = a + rng.normal(0, 0.07, 200)
    assert M.pearson_r(a, b) == pytest.approx(stats.pearsonr(a, b)[0], abs=1e-12)
    # hand: x = 1,2,3,4, y = 2,4,5,4: Sxy = 3.5, Sxx = 5, Syy = 4.75
    x, y = np.array([1.0, 2, 3, 4]), np.array([2.0, 4, 5, 4])
    assert M.pearson_r(x, y) == pytest.approx(3.5 / np.sqrt(5.0 * 4.75), abs=1e-12)
    assert np.isnan(M.pearson_r([1, 1, 1], [1, 2, 3]))


def test_mape_mae_see_by_hand() -> None:
    t = np.array([1.0, 0.8, 0.5, 1.2])
    p = np.array([1.1, 0.8, 0.45, 1.0])
    assert M.mae(t, p) == pytest.approx((0.1 + 0 + 0.05 + 0.2) / 4)
    assert M.mape(t, p) == pytest.approx(100 * (0.1 / 1.0 + 0 + 0.05 / 0.5 + 0.2 / 1.2) / 4)
    # SEE = residual SD of the regression of t on p, with n - 2 degrees of freedom
    fit = stats.linregress(p, t)
    resid = t - (fit.intercept + fit.slope * p)
    assert M.see(t, p) == pytest.approx(np.sqrt((resid ** 2).sum() / 2), rel=1e-12)
    # a perfect linear relation has SEE 0 even if biased
    assert M.see(t, 2 * t + 1) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="zero reference"):
        M.mape([0.0, 1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="one estimate per reference"):
        M.mae([1, 2, 3], [1, 2])


def test_icc_shrout_fleiss_textbook_example() -> None:
    # Shrout & Fleiss (1979), Table 2: 6 targets rated by 4 judges.
    x = np.array([[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]], float)
    assert M.icc(x, kind="1,1") == pytest.approx(0.17, abs=0.005)
    assert M.icc(x, kind="2,1") == pytest.approx(0.29, abs=0.005)
    assert M.icc(x, kind="3,1") == pytest.approx(0.71, abs=0.005)
    # two methods: a constant offset lowers absolute agreement (2,1) but not consistency (3,1)
    t = np.array([0.7, 0.8, 0.9, 1.0, 1.1, 1.2])
    assert M.icc(t, t + 0.1, "3,1") == pytest.approx(1.0)
    # by hand: BMS = 2 var(t) = 0.07, EMS = 0, JMS = 6 * 2 * 0.05^2 = 0.03 -> 0.07 / (0.07 + 2 * 0.03 / 6)
    assert M.icc(t, t + 0.1, "2,1") == pytest.approx(0.875)
    assert M.icc(t, t) == pytest.approx(1.0)


def test_bland_altman_bias_and_limits() -> None:
    t = np.array([1.0, 2.0, 3.0, 4.0])
    p = np.array([1.1, 2.3, 2.9, 4.1])
    ba = M.bland_altman(t, p)
    d = p - t
    assert ba.bias == pytest.approx(d.mean())
    assert ba.sd == pytest.approx(d.std(ddof=1))
    assert ba.upper == pytest.approx(d.mean() + 1.96 * d.std(ddof=1))
    assert ba.lower == pytest.approx(d.mean() - 1.96 * d.std(ddof=1))
    np.testing.assert_allclose(ba.means, (t + p) / 2)
    assert ba.outside == 0


def test_binary_scores_by_hand_and_kang_counts() -> None:
    y = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    s = np.array([0.9, 0.6, 0.4, 0.7, 0.1, 0.2, 0.3, 0.5])
    r = M.binary_scores(y, s, 0.5)  # predicted positive: 0.9, 0.6, 0.7, 0.5 -> tp 3, fp 1, fn 1, tn 3
    assert (r["tp"], r["fp"], r["tn"], r["fn"]) == (3, 1, 3, 1)
    assert r["accuracy"] == pytest.approx(6 / 8)
    assert r["precision"] == pytest.approx(3 / 4)
    assert r["sensitivity"] == pytest.approx(3 / 4)
    assert r["specificity"] == pytest.approx(3 / 4)
    assert r["f1"] == pytest.approx(0.75)
    # Kang et al. Table 2 case 1: TP 208, FP 39, TN 186, FN 24 -> the published .862/.842/.827/.897/.868
    y = np.r_[np.ones(232), np.zeros(225)]
    pred = np.r_[np.ones(208), np.zeros(24), np.ones(39), np.zeros(186)]
    k = M.binary_scores(y, pred, 0.5)
    assert round(k["accuracy"], 3) == 0.862
    assert round(k["precision"], 3) == 0.842
    assert round(k["specificity"], 3) == 0.827
    assert round(k["sensitivity"], 3) == 0.897
    assert round(k["f1"], 3) == 0.868
    # direction "less than": T-score below -1.0 is positive, exactly -1.0 is not
    assert M.binary_scores([1, 0], [-1.5, -1.0], -1.0, greater=False)["accuracy"] == 1.0


def test_auc_with_ties_equals_mann_whitney() -> None:
    y = np.array([0, 0, 1, 1, 0, 1, 0, 1, 1, 0])
    s = np.array([0.1, 0.4, 0.4, 0.8, 0.4, 0.3, 0.2, 0.8, 0.9, 0.8])  # ties across classes
    u = stats.mannwhitneyu(s[y == 1], s[y == 0], alternative="two-sided").statistic
    assert M.roc_auc(y, s) == pytest.approx(u / (5 * 5), abs=1e-12)
    # hand count: pairs (pos > neg) + 0.5 ties
    pos, neg = s[y == 1], s[y == 0]
    hand = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    assert M.roc_auc(y, s) == pytest.approx(hand)
    assert M.roc_auc([0, 1], [0.5, 0.5]) == 0.5
    assert M.roc_auc([0, 0, 1, 1], [1, 2, 3, 4]) == 1.0
    with pytest.raises(ValueError, match="both classes"):
        M.roc_auc([1, 1], [0.1, 0.2])
    fpr, tpr, _ = M.roc_curve(y, s)
    assert np.trapezoid(tpr, fpr) == pytest.approx(M.roc_auc(y, s))


def test_one_vs_rest_macro_auc_and_confusion() -> None:
    y = np.array([0, 0, 1, 1, 2, 2])
    p = np.array([[0.8, 0.1, 0.1], [0.4, 0.5, 0.1], [0.2, 0.6, 0.2],
                  [0.3, 0.3, 0.4], [0.1, 0.2, 0.7], [0.2, 0.5, 0.3]])
    r = M.one_vs_rest_auc(y, p)
    expect = [M.roc_auc(y == k, p[:, k]) for k in range(3)]
    assert r["per_class"] == pytest.approx(expect)
    assert r["macro"] == pytest.approx(np.mean(expect))
    # class 0 vs rest: positives 0.8, 0.4 vs negatives 0.2, 0.3, 0.1, 0.2 -> all pairs won -> 1.0
    assert r["per_class"][0] == 1.0
    c = M.confusion_matrix(y, p.argmax(axis=1), 3)
    assert c.tolist() == [[1, 1, 0], [0, 1, 1], [0, 1, 1]]
    ms = M.multiclass_scores(y, p.argmax(axis=1), 3)
    assert ms["accuracy"] == pytest.approx(3 / 6)
    # weighted sensitivity equals accuracy (as in Ha et al.'s table)
    assert ms["weighted_sensitivity"] == pytest.approx(ms["accuracy"])
    assert ms["macro_precision"] == pytest.approx(np.mean([1.0, 1 / 3, 0.5]))


def test_paper_tables_compute_each_papers_metrics() -> None:
    rng = np.random.default_rng(2)
    bmd = rng.normal(0.95, 0.15, 300)
    est = bmd + rng.normal(0, 0.05, 300)
    rows = M.paper_table("l1_axial", bmd, est)
    by = {r["metric"]: r for r in rows}
    assert by["Pearson r"]["value"] == pytest.approx(M.pearson_r(bmd, est))
    assert by["Pearson r"]["paper"] == 0.905
    assert by["F1 (T < -1)"]["paper"] == 0.868
    ab_t = (bmd - 0.9747) / 0.1185 < -1
    ab_p = (est - 0.9747) / 0.1185 < -1
    f1 = 2 * np.sum(ab_t & ab_p) / (2 * np.sum(ab_t & ab_p) + np.sum(ab_p & ~ab_t) + np.sum(~ab_p & ab_t))
    assert by["F1 (T < -1)"]["value"] == pytest.approx(f1)
    md = M.markdown_table(rows, title="Kang")
    assert "| Pearson r | " in md and "0.905" in md and md.count("\n") == len(rows) + 4

    gu = {r["metric"]: r for r in M.paper_table("hip_xray", bmd, est)}
    assert gu["ICC(2,1)"]["value"] == pytest.approx(M.icc(bmd, est, "2,1"))
    assert gu["SEE"]["paper"] == 0.074

    # Yoshida: vertebra rows -> patient means
    ids = np.repeat(np.arange(75), 4)
    tbs = rng.normal(1.36, 0.1, 300)
    y = np.stack([bmd, tbs], 1)
    yp = np.stack([est, tbs + rng.normal(0, 0.08, 300)], 1)
    yo = M.paper_table("lumbar_sagittal", y, yp, patient_ids=ids, yam=1.0)
    pat = [r for r in yo if r["level"] == "patient" and r["metric"] == "BMD r"][0]
    pm_t = y[:, 0].reshape(75, 4).mean(1)
    pm_p = yp[:, 0].reshape(75, 4).mean(1)
    assert pat["value"] == pytest.approx(M.pearson_r(pm_t, pm_p))
    auc = [r for r in yo if r["metric"].startswith("AUC osteopenia")][0]
    assert auc["value"] == pytest.approx(M.roc_auc(pm_t < 0.8, -pm_p))

    labels = rng.integers(0, 2, 100)
    prob = np.clip(labels * 0.6 + rng.uniform(0, 0.5, 100), 0, 1)
    ni = {r["metric"]: r for r in M.paper_table("dxa_spine", labels, prob, task="fracture")}
    assert ni["AUC fracture"]["value"] == pytest.approx(M.roc_auc(labels, prob))
    assert "Accuracy (p >= 0.15)" in ni  # the paper's lowered fracture threshold
    with pytest.raises(ValueError, match="no paper table"):
        M.paper_table("knee", bmd, est)
