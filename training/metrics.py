"""Evaluation metrics of the five papers, in numpy only, and the papers' result tables.

Regression (BMD, TBS): :func:`pearson_r`, :func:`mape`, :func:`mae`,
:func:`see` (standard error of estimate), :func:`icc` (Shrout & Fleiss
ICC(2,1) by default, ICC(3,1) or ICC(1,1) on request), :func:`bland_altman`.

Classification: :func:`confusion_matrix`, :func:`binary_scores` (accuracy,
precision, sensitivity, specificity, F1, NPV at a threshold), :func:`roc_auc`
(rank-based: the Mann-Whitney U statistic / (n1 n2), ties counted one half),
:func:`roc_curve`, :func:`one_vs_rest_auc` (per class and macro),
:func:`multiclass_scores` (macro- and support-weighted averages).

Tables: :func:`paper_table` computes the metrics a paper reports, for a
protocol, and puts the paper's own headline numbers (``/work/shared/seeds``)
beside them; :func:`markdown_table` formats the rows.

Choices
-------
* **ICC**: Gu et al. 2023 (seed 004) report "intraclass correlation coefficient"
  without saying which form.  The screener reports ICC(2,1) -- two-way random
  effects, absolute agreement, single measurement (Shrout & Fleiss 1979; the
  form Koo & Li 2016 recommend for agreement between two measurement methods):
  a systematic offset between estimate and DXA lowers it, unlike Pearson r.
* **SEE**: the standard error of estimate of the linear regression of the
  reference on the estimate, ``sqrt(sum (y - (a + b yhat))^2 / (n - 2))``,
  as used in the BMD-estimation literature Gu et al. compare with.
* **Multiclass sensitivity/specificity/precision/F1** (Ha et al. 2024, seed 001):
  the paper's table has sensitivity == accuracy (0.802/0.802), which only a
  support-weighted average of the per-class recalls gives; the table uses the
  support-weighted averages and :func:`multiclass_scores` also returns the macro ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from screener.references import REFERENCES
from screener.scores import t_score

__all__ = [
    "KANG_T_REFERENCE",
    "PAPER_NUMBERS",
    "BlandAltman",
    "bland_altman",
    "binary_scores",
    "confusion_matrix",
    "generic_table",
    "icc",
    "mae",
    "mape",
    "markdown_table",
    "multiclass_scores",
    "one_vs_rest_auc",
    "paired",
    "paper_table",
    "pearson_r",
    "roc_auc",
    "roc_curve",
    "safe_auc",
    "see",
    "table_row",
]

#: Kang et al.'s T-score reference (mean, SD) in g/cm^2, "used as the paper states" (from the one
#: reference table, :mod:`screener.references`)
KANG_T_REFERENCE = (REFERENCES["kang_l1"].mean, REFERENCES["kang_l1"].sd)
#: NHANES III femoral-neck reference (white women 20-29, Hologic), g/cm^2 (Gu et al. / hip_xray).
FEMORAL_NECK_REFERENCE = (REFERENCES["nhanes3_fn_women"].mean, REFERENCES["nhanes3_fn_women"].sd)


def paired(y_true: Any, y_pred: Any, *, min_n: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """``y_true`` and ``y_pred`` as flat float64 arrays of the same length, at least ``min_n`` long."""
    a = np.asarray(y_true, dtype=np.float64).ravel()
    b = np.asarray(y_pred, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"y_true has {a.size} values but y_pred has {b.size}; pass one estimate per reference")
    if a.size < min_n:
        raise ValueError(f"need at least {min_n} pairs (got {a.size})")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("y_true and y_pred must be finite (drop NaN/inf samples first)")
    return a, b


# --- regression -------------------------------------------------------------------------------

def pearson_r(y_true: Any, y_pred: Any) -> float:
    """Pearson correlation coefficient.

    Parameters
    ----------
    y_true, y_pred : array-like
        Reference and estimate, same length (>= 2).

    Returns
    -------
    float
        r in [-1, 1]; NaN when either input is constant.
    """
    a, b = paired(y_true, y_pred)
    a = a - a.mean()
    b = b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else float("nan")


def mae(y_true: Any, y_pred: Any) -> float:
    """Mean absolute error ``mean |yhat - y|`` (units of the inputs)."""
    a, b = paired(y_true, y_pred, min_n=1)
    return float(np.mean(np.abs(b - a)))


def mape(y_true: Any, y_pred: Any) -> float:
    """Mean absolute percentage error, percent: ``100 mean |yhat - y| / |y|`` (Kang et al.).

    Raises
    ------
    ValueError
        If a reference value is zero.
    """
    a, b = paired(y_true, y_pred, min_n=1)
    if np.any(a == 0):
        raise ValueError("MAPE is undefined for a zero reference value")
    return float(100.0 * np.mean(np.abs(b - a) / np.abs(a)))


def see(y_true: Any, y_pred: Any) -> float:
    """Standard error of estimate: residual SD of the regression of ``y_true`` on ``y_pred``.

    ``sqrt(sum (y - (a + b yhat))^2 / (n - 2))`` with ``a, b`` the least-squares
    fit (Gu et al.'s SEE; units of ``y_true``).  Needs n >= 3.
    """
    a, b = paired(y_true, y_pred, min_n=3)
    bc = b - b.mean()
    sxx = float((bc * bc).sum())
    if sxx == 0:
        resid = a - a.mean()
    else:
        slope = float((bc * (a - a.mean())).sum()) / sxx
        resid = a - (a.mean() + slope * bc)
    return float(np.sqrt((resid * resid).sum() / (a.size - 2)))


def icc(y_true: Any, y_pred: Any = None, kind: str = "2,1") -> float:
    """Intraclass correlation coefficient (Shrout & Fleiss 1979), single measurement.

    Parameters
    ----------
    y_true : array-like
        Reference values ``(n,)``, or an ``(n targets, k raters)`` matrix when
        ``y_pred`` is None.
    y_pred : array-like, optional
        Estimates ``(n,)``; with ``y_true`` they form the ``(n, 2)`` matrix.
    kind : {"2,1", "3,1", "1,1"}
        ``"2,1"``: two-way random, absolute agreement (default, see module notes);
        ``"3,1"``: two-way mixed, consistency; ``"1,1"``: one-way random.

    Returns
    -------
    float
        The ICC (can be negative for poor agreement).
    """
    if y_pred is None:
        x = np.asarray(y_true, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] < 2:
            raise ValueError("icc needs an (n, k>=2) matrix, or y_true and y_pred")
    else:
        a, b = paired(y_true, y_pred)
        x = np.stack([a, b], axis=1)
    n, k = x.shape
    if n < 2:
        raise ValueError("icc needs at least 2 targets")
    grand = x.mean()
    ss_rows = k * ((x.mean(axis=1) - grand) ** 2).sum()
    ss_cols = n * ((x.mean(axis=0) - grand) ** 2).sum()
    ss_total = ((x - grand) ** 2).sum()
    ss_err = ss_total - ss_rows - ss_cols
    bms = ss_rows / (n - 1)
    jms = ss_cols / (k - 1)
    ems = ss_err / ((n - 1) * (k - 1))
    wms = (ss_cols + ss_err) / (n * (k - 1))
    if kind == "2,1":
        den = bms + (k - 1) * ems + k * (jms - ems) / n
        return float((bms - ems) / den) if den != 0 else float("nan")
    if kind == "3,1":
        den = bms + (k - 1) * ems
        return float((bms - ems) / den) if den != 0 else float("nan")
    if kind == "1,1":
        den = bms + (k - 1) * wms
        return float((bms - wms) / den) if den != 0 else float("nan")
    raise ValueError(f"icc kind must be '2,1', '3,1' or '1,1' (got {kind!r})")


@dataclass(frozen=True)
class BlandAltman:
    """Bland-Altman agreement of an estimate with a reference (difference = estimate - reference).

    Attributes
    ----------
    bias : float
        Mean difference.
    sd : float
        Sample SD of the differences (ddof 1).
    lower, upper : float
        95 % limits of agreement, ``bias -/+ 1.96 sd``.
    means, diffs : numpy.ndarray
        Per-sample mean of the two methods and difference (for the plot).
    """

    bias: float
    sd: float
    lower: float
    upper: float
    means: np.ndarray
    diffs: np.ndarray

    @property
    def outside(self) -> int:
        """Number of samples outside the limits of agreement."""
        return int(np.sum((self.diffs < self.lower) | (self.diffs > self.upper)))


def bland_altman(y_true: Any, y_pred: Any) -> BlandAltman:
    """Bland-Altman bias and 95 % limits of agreement (mean +- 1.96 SD, as Gu et al. Fig. 9)."""
    a, b = paired(y_true, y_pred)
    d = b - a
    bias = float(d.mean())
    sd = float(d.std(ddof=1))
    return BlandAltman(bias, sd, bias - 1.96 * sd, bias + 1.96 * sd, 0.5 * (a + b), d)


# --- classification ---------------------------------------------------------------------------

def confusion_matrix(y_true: Any, y_pred: Any, n_classes: int | None = None) -> np.ndarray:
    """Confusion matrix ``C[i, j]`` = number of samples of true class i predicted as j.

    Parameters
    ----------
    y_true, y_pred : array-like of int
        Class labels 0..n_classes-1.
    n_classes : int, optional
        Default: 1 + the largest label seen.

    Returns
    -------
    numpy.ndarray
        ``(n_classes, n_classes)`` int64.
    """
    t = np.asarray(y_true).ravel().astype(np.int64)
    p = np.asarray(y_pred).ravel().astype(np.int64)
    if t.shape != p.shape:
        raise ValueError(f"{t.size} true labels but {p.size} predictions")
    if t.size and (t.min() < 0 or p.min() < 0):
        raise ValueError("class labels must be non-negative integers")
    n = int(n_classes if n_classes is not None else (max(t.max(initial=-1), p.max(initial=-1)) + 1))
    if t.size and max(t.max(), p.max()) >= n:
        raise ValueError(f"a label >= n_classes={n}")
    return np.bincount(t * n + p, minlength=n * n).reshape(n, n)


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else float("nan")


def binary_scores(y_true: Any, score: Any, threshold: float = 0.5, *, greater: bool = True) -> dict[str, float]:
    """Accuracy, precision, sensitivity, specificity, F1 and NPV at a threshold.

    Parameters
    ----------
    y_true : array-like of {0, 1} or bool
        1 = positive (e.g. abnormal, scoliosis).
    score : array-like
        Score per sample; positive when ``score >= threshold`` (``greater=True``)
        or when ``score < threshold`` (``greater=False``, e.g. a T-score below -1.0).
    threshold : float
        Decision threshold.
    greater : bool
        Direction of the decision.

    Returns
    -------
    dict
        ``accuracy, precision, sensitivity, specificity, f1, npv`` and the counts
        ``tp, fp, tn, fn``.  Undefined ratios are NaN.
    """
    t = np.asarray(y_true).ravel().astype(bool)
    s = np.asarray(score, dtype=np.float64).ravel()
    if t.shape != s.shape:
        raise ValueError(f"{t.size} labels but {s.size} scores")
    p = s >= threshold if greater else s < threshold
    tp = int(np.sum(p & t))
    fp = int(np.sum(p & ~t))
    tn = int(np.sum(~p & ~t))
    fn = int(np.sum(~p & t))
    precision = _ratio(tp, tp + fp)
    sensitivity = _ratio(tp, tp + fn)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    return {
        "accuracy": _ratio(tp + tn, t.size),
        "precision": precision,
        "sensitivity": sensitivity,
        "specificity": _ratio(tn, tn + fp),
        "f1": f1,
        "npv": _ratio(tn, tn + fn),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(x.size, dtype=np.float64)
    # boundaries of runs of equal values
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], x.size]
    avg = 0.5 * (starts + ends - 1) + 1.0  # average 1-based rank of each run
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def roc_auc(y_true: Any, score: Any) -> float:
    """Area under the ROC curve from ranks: Mann-Whitney ``U / (n_pos n_neg)``.

    Tied scores between a positive and a negative count one half.  Higher
    scores mean "more likely positive" (pass ``-bmd`` to detect low BMD).

    Parameters
    ----------
    y_true : array-like of {0, 1} or bool
    score : array-like of float

    Returns
    -------
    float
        AUC in [0, 1].

    Raises
    ------
    ValueError
        If only one class is present.
    """
    t = np.asarray(y_true).ravel().astype(bool)
    s = np.asarray(score, dtype=np.float64).ravel()
    if t.shape != s.shape:
        raise ValueError(f"{t.size} labels but {s.size} scores")
    n_pos = int(t.sum())
    n_neg = t.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"ROC AUC needs both classes (got {n_pos} positives, {n_neg} negatives)")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    ranks = _average_ranks(s)
    u = ranks[t].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_curve(y_true: Any, score: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve points (false-positive rate, true-positive rate, thresholds), from (0, 0) to (1, 1)."""
    t = np.asarray(y_true).ravel().astype(bool)
    s = np.asarray(score, dtype=np.float64).ravel()
    order = np.argsort(-s, kind="mergesort")
    s, t = s[order], t[order]
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), s.size - 1]
    tps = np.cumsum(t)[last]
    fps = (last + 1) - tps
    n_pos = max(int(t.sum()), 1)
    n_neg = max(int((~t).sum()), 1)
    fpr = np.r_[0.0, fps / n_neg]
    tpr = np.r_[0.0, tps / n_pos]
    return fpr, tpr, np.r_[np.inf, s[last]]


def one_vs_rest_auc(y_true: Any, proba: Any) -> dict[str, Any]:
    """Per-class one-vs-rest ROC AUC and their unweighted (macro) mean.

    Parameters
    ----------
    y_true : array-like of int
        Class labels 0..K-1.
    proba : array-like
        ``(n, K)`` class probabilities (or scores).

    Returns
    -------
    dict
        ``{"per_class": [AUC_0, ..., AUC_{K-1}], "macro": mean}``; a class absent
        from ``y_true`` gets NaN and is left out of the mean.
    """
    t = np.asarray(y_true).ravel().astype(np.int64)
    p = np.asarray(proba, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != t.size:
        raise ValueError(f"proba must be (n, K) with n={t.size}; got {p.shape}")
    per: list[float] = []
    for k in range(p.shape[1]):
        pos = t == k
        per.append(roc_auc(pos, p[:, k]) if 0 < pos.sum() < t.size else float("nan"))
    valid = [a for a in per if np.isfinite(a)]
    return {"per_class": per, "macro": float(np.mean(valid)) if valid else float("nan")}


def multiclass_scores(y_true: Any, y_pred: Any, n_classes: int | None = None) -> dict[str, Any]:
    """Accuracy and per-class / macro / support-weighted sensitivity, specificity, precision, F1.

    Returns
    -------
    dict
        ``accuracy``, ``confusion`` (list of lists), ``per_class`` (dict of lists)
        and for each of sensitivity, specificity, precision, f1 a ``macro_*``
        and a ``weighted_*`` entry (weights = class support).
    """
    c = confusion_matrix(y_true, y_pred, n_classes).astype(np.float64)
    total = c.sum()
    tp = np.diag(c)
    fn = c.sum(axis=1) - tp
    fp = c.sum(axis=0) - tp
    tn = total - tp - fn - fp
    with np.errstate(invalid="ignore", divide="ignore"):
        sens = tp / (tp + fn)
        spec = tn / (tn + fp)
        prec = tp / (tp + fp)
        f1 = 2 * tp / (2 * tp + fp + fn)
    support = c.sum(axis=1)
    w = support / total if total > 0 else support
    out: dict[str, Any] = {
        "accuracy": _ratio(float(tp.sum()), float(total)),
        "confusion": c.astype(np.int64).tolist(),
        "per_class": {"sensitivity": sens.tolist(), "specificity": spec.tolist(),
                      "precision": prec.tolist(), "f1": f1.tolist(), "support": support.astype(int).tolist()},
    }
    for name, v in (("sensitivity", sens), ("specificity", spec), ("precision", prec), ("f1", f1)):
        ok = np.isfinite(v)
        out[f"macro_{name}"] = float(np.mean(v[ok])) if ok.any() else float("nan")
        out[f"weighted_{name}"] = float(np.sum(w[ok] * v[ok]) / np.sum(w[ok])) if ok.any() else float("nan")
    return out


# --- the papers' tables -----------------------------------------------------------------------
# Each paper's table and headline numbers live in its protocol's training spec
# (training/protocols/<name>.py); PAPER_NUMBERS and PAPER_TABLES are read from those.


def table_row(metric: str, value: float, paper: float | None, unit: str = "", level: str = "") -> dict[str, Any]:
    """One row of a metrics table: ``{"metric", "value", "paper", "unit", "level"}``."""
    return {"metric": metric, "value": float(value), "paper": paper, "unit": unit, "level": level}


def safe_auc(y: np.ndarray, s: np.ndarray) -> float:
    """:func:`roc_auc`, or NaN when one class is missing."""
    try:
        return roc_auc(y, s)
    except ValueError:
        return float("nan")


def paper_table(
    protocol: str,
    y_true: Any,
    y_pred: Any,
    *,
    patient_ids: Sequence[Any] | None = None,
    task: str | None = None,
    threshold: float | None = None,
    t_reference: tuple[float, float] | None = None,
    yam: float = 1.18,
) -> list[dict[str, Any]]:
    """The metrics a paper reports for ``protocol``, with the paper's numbers beside.

    Parameters
    ----------
    protocol : str
        ``l1_axial`` (Kang), ``femur_coronal`` (Ha), ``lumbar_sagittal``
        (Yoshida), ``dxa_spine`` (Nissinen; give ``task``) or ``hip_xray`` (Gu).
    y_true, y_pred : array-like
        ``l1_axial``/``hip_xray``: BMD ``(n,)`` reference and estimate (g/cm^2).
        ``femur_coronal``: class labels ``(n,)`` (0 normal, 1 osteopenia,
        2 osteoporosis) and probabilities ``(n, 3)``.
        ``lumbar_sagittal``: ``(n, 2)`` per-vertebra BMD and TBS.
        ``dxa_spine``: labels ``(n,)`` in {0, 1} and probabilities ``(n,)``.
    patient_ids : sequence, optional
        ``lumbar_sagittal``: patient of each vertebra (patient value = mean of
        its vertebrae); default: every row is its own patient.
    task : {"scoliosis", "unreliable", "fracture"}, optional
        ``dxa_spine`` task.
    threshold : float, optional
        ``dxa_spine`` probability threshold (default: the paper's, 0.5 / 0.15);
        ``l1_axial`` T-score threshold (default -1.0).
    t_reference : (float, float), optional
        ``l1_axial`` T-score reference (default Kang's 0.9747 / 0.1185).
    yam : float
        ``lumbar_sagittal`` young-adult-mean BMD (g/cm^2) for %YAM; default 1.18
        (GE Lunar L1-L4, the scanner of Yoshida et al.; not verified, see
        clinical-physics.md) -- pass the cohort's own reference.

    Returns
    -------
    list of dict
        Rows ``{"metric", "value", "paper", "unit", "level"}``; ``paper`` is None
        where the paper reports no number.
    """
    tables = _paper_tables()
    table = tables.get(protocol)
    if table is None:
        raise ValueError(f"no paper table for protocol {protocol!r}; known: {', '.join(tables)}")
    return table(y_true, y_pred, patient_ids=patient_ids, task=task, threshold=threshold,
                 t_reference=t_reference, yam=yam)


def _paper_tables() -> dict[str, Callable[..., list[dict[str, Any]]]]:
    """protocol -> the function writing its paper's table, from the training specs."""
    from training.protocols import specs

    return {name: spec.paper_table for name, spec in specs().items() if spec.paper_table is not None}


def _paper_numbers() -> dict[str, dict[str, float]]:
    """Headline numbers of the papers by table key (``protocol`` or ``protocol:task``), from the specs."""
    from training.protocols import specs

    return {key: dict(nums) for spec in specs().values() for key, nums in spec.paper_numbers.items()}


def __getattr__(name: str) -> Any:
    """``PAPER_NUMBERS``, ``PAPER_TABLES`` and ``NISSINEN_THRESHOLDS``, read from the training specs."""
    if name == "PAPER_NUMBERS":
        return _paper_numbers()
    if name == "PAPER_TABLES":
        return _paper_tables()
    if name == "NISSINEN_THRESHOLDS":
        from training.protocols.dxa_spine import NISSINEN_THRESHOLDS

        return NISSINEN_THRESHOLDS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def generic_table(task: str, y_true: Any, y_pred: Any, *, outputs: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Task-generic metrics for a protocol without a paper table.

    Parameters
    ----------
    task : {"regression", "multiclass", "binary"}
        Kind of model output.
    y_true, y_pred : array-like
        Regression: ``(n,)`` or ``(n, K)`` values; multiclass: labels and ``(n, K)``
        probabilities; binary: ``(n,)`` or ``(n, T)`` labels and probabilities.
    outputs : sequence of str, optional
        Names of the output columns (for the metric labels).

    Returns
    -------
    list of dict
        Rows as :func:`paper_table` (``paper`` is None).
    """
    rows: list[dict[str, Any]] = []
    if task == "multiclass":
        t = np.asarray(y_true).ravel().astype(np.int64)
        p = np.asarray(y_pred, dtype=np.float64)
        ovr = one_vs_rest_auc(t, p)
        rows.append(table_row("Macro AUC", ovr["macro"], None))
        rows.append(table_row("Accuracy", multiclass_scores(t, p.argmax(axis=1), p.shape[1])["accuracy"], None))
        return rows
    t = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_pred, dtype=np.float64)
    t = t.reshape(len(t), -1)
    p = p.reshape(len(p), -1)
    if t.shape != p.shape:
        raise ValueError(f"y_true {t.shape} and y_pred {p.shape} differ")
    names = list(outputs) if outputs is not None else [f"output {j}" for j in range(t.shape[1])]
    for j in range(t.shape[1]):
        name = names[j] if j < len(names) else f"output {j}"
        if task == "binary":
            rows.append(table_row(f"AUC {name}", safe_auc(t[:, j].astype(bool), p[:, j]), None))
            rows.append(table_row(f"Accuracy {name} (p >= 0.5)", binary_scores(t[:, j], p[:, j])["accuracy"], None))
        elif task == "regression":
            rows.append(table_row(f"Pearson r {name}", pearson_r(t[:, j], p[:, j]), None))
            rows.append(table_row(f"MAE {name}", mae(t[:, j], p[:, j]), None))
            if len(t) >= 3:
                rows.append(table_row(f"ICC(2,1) {name}", icc(t[:, j], p[:, j]), None))
            rows.append(table_row(f"Bias {name}", bland_altman(t[:, j], p[:, j]).bias, None))
        else:
            raise ValueError(f"task must be 'regression', 'multiclass' or 'binary' (got {task!r})")
    return rows


def _fmt(v: float | None) -> str:
    if v is None:
        return "—"
    if not np.isfinite(v):
        return "n/a"
    return f"{v:.3f}"


def markdown_table(rows: Sequence[dict[str, Any]], *, title: str | None = None) -> str:
    """Format :func:`paper_table` rows as a markdown table (value beside the paper's number)."""
    with_level = any(r.get("level") for r in rows)
    head = ["Metric"] + (["Level"] if with_level else []) + ["Screener", "Paper"]
    lines = []
    if title:
        lines += [f"**{title}**", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        unit = f" ({r['unit']})" if r.get("unit") else ""
        cells = [f"{r['metric']}{unit}"] + ([r.get("level", "")] if with_level else [])
        cells += [_fmt(r["value"]), _fmt(r["paper"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
