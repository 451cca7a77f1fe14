"""Uncertainty of the model estimates: prediction intervals and the fold-disagreement flag.

A bundle's ``model_card.json`` may hold an ``intervals`` record per regression output, fitted by
:mod:`training.intervals` on the out-of-fold validation predictions (split-conformal)::

    "intervals": {"bmd": {"level": 0.9, "half_width": 0.071, "n": 450,
                          "fold_range_limit": 0.06, "method": "...", "coverage_test": 0.91}}

:func:`annotate` (called once per job, after the T-score references are set) gives every BMD
estimate of a finding whose bundle has such a record the interval ``value +/- half_width`` and its
T-score the same interval on the T scale, flags a finding whose network inputs lie outside the
range the models trained on (``input_stats``: out of distribution), and flags a finding whose
fold models disagree by more
than ``fold_range_limit`` (the spread validation saw), or by more than
:data:`DEFAULT_FOLD_RANGE_G_CM2` when the bundle has no record.  A bundle without a record gives
no interval: the report then says so rather than inventing one.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

from screener.findings import Finding

__all__ = ["DEFAULT_FOLD_RANGE_G_CM2", "annotate", "card_intervals", "fold_values", "input_stats"]

#: fold spread (g/cm2) flagged when a bundle has no validation record of its own
DEFAULT_FOLD_RANGE_G_CM2 = 0.10
#: spread of one class's probability between fold models flagged for a classifier (femur_coronal)
DEFAULT_CLASS_FOLD_RANGE = 0.5


@lru_cache(maxsize=32)
def _card(path: str, mtime: float) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def card_intervals(models_dir: str | Path, protocol: str) -> dict[str, Any]:
    """The ``intervals`` record of ``<models_dir>/<protocol>/model_card.json`` (empty when absent)."""
    path = Path(models_dir) / protocol / "model_card.json"
    if not path.is_file():
        return {}
    return dict(_card(str(path), path.stat().st_mtime).get("intervals") or {})


def fold_values(finding: Finding) -> list[float]:
    """The per-fold BMD estimates a finding recorded (l1_axial ``bmd_per_fold``, lumbar_sagittal
    ``per_fold_patient["bmd"]``); empty when it has none."""
    d = finding.details
    if isinstance(d.get("bmd_per_fold"), list):
        return [float(v) for v in d["bmd_per_fold"]]
    pf = d.get("per_fold_patient")
    if isinstance(pf, dict) and isinstance(pf.get("bmd"), list):
        return [float(v) for v in pf["bmd"]]
    return []


def _bmd_and_t(finding: Finding) -> tuple[Any, list[Any]]:
    from screener.reporting import codes

    bmd = next((m for m in finding.measurements if m.concept == codes.ABMD_ESTIMATE), None)
    return bmd, [m for m in finding.measurements if m.concept == codes.TSCORE_ESTIMATE]


def _out_of_distribution(finding: Finding, stats: dict[str, Any]) -> None:
    """Flag a finding whose network inputs' mean or SD lie outside the training range (card
    ``intervals.input_stats``, :func:`training.intervals.input_stats`) by more than its margin."""
    from screener.scores import flag

    seen = finding.details.get("input_stats") or []
    if not stats or not seen:
        return
    margin = float(stats.get("margin", 0.1))
    out = []
    for key in ("mean", "sd"):
        lo, hi = (float(v) for v in stats[key])
        pad = margin * (hi - lo)
        bad = [float(s[key]) for s in seen if not lo - pad <= float(s[key]) <= hi + pad]
        if bad:
            out.append(f"input {key} {bad[0]:.3g} outside the training range {lo:.3g}-{hi:.3g}")
    finding.details["out_of_distribution"] = bool(out)
    if out:
        finding.flags.append(flag(f"input unlike the training data ({'; '.join(out)}): the estimate "
                                  "may be unreliable"))


def _class_fold_disagreement(finding: Finding, record: dict[str, Any]) -> None:
    """Flag a classifier's finding whose fold models give a class probabilities further apart than
    ``record["class_fold_range_limit"]`` (default :data:`DEFAULT_CLASS_FOLD_RANGE`)."""
    from screener.scores import flag

    per_fold = finding.details.get("per_fold")
    probs = finding.details.get("probabilities")
    if not isinstance(per_fold, dict) or not isinstance(probs, dict):
        return
    spreads = {c: max(v) - min(v) for c, v in per_fold.items() if isinstance(v, list) and len(v) >= 2}
    if not spreads:
        return
    cls = max(spreads, key=spreads.get)
    limit = float(record.get("class_fold_range_limit") or DEFAULT_CLASS_FOLD_RANGE)
    finding.details["fold_range_probability"] = spreads[cls]
    if spreads[cls] > limit:
        finding.details["fold_disagreement"] = True
        finding.flags.append(flag(
            f"ensemble folds disagree: P({cls}) per fold {min(per_fold[cls]):.2f}-{max(per_fold[cls]):.2f} "
            f"(range {spreads[cls]:.2f} > {limit:.2f}); the class is less certain"))


def input_stats(images: Any) -> list[dict[str, float]]:
    """Per-image mean and SD of a network input batch, as a finding records them (``details["input_stats"]``)."""
    import numpy as np

    x = np.asarray(images, dtype=np.float64).reshape(len(images), -1)
    return [{"mean": float(m), "sd": float(s)} for m, s in zip(x.mean(axis=1), x.std(axis=1))]


def annotate(findings: Sequence[Finding], models_dir: str | Path) -> None:
    """Put prediction intervals and the fold-disagreement flag on the findings, in place (module docstring)."""
    from screener.scores import flag

    for f in findings:
        if not f.details.get("bundle_id"):
            continue
        _class_fold_disagreement(f, card_intervals(models_dir, f.protocol))
        bmd, tms = _bmd_and_t(f)
        if bmd is None or not tms:  # patient-level estimates only (lumbar_sagittal's per-vertebra BMDs have none)
            continue
        record = card_intervals(models_dir, f.protocol)
        rec = record.get("bmd") or record.get("femoral_neck_bmd") or {}
        if rec.get("half_width") is not None:
            q, level = float(rec["half_width"]), float(rec.get("level", 0.9))
            method = str(rec.get("method", "split-conformal on validation residuals"))
            bmd.interval, bmd.interval_level, bmd.interval_method = (bmd.value - q, bmd.value + q), level, method
            for t in tms:
                if t.reference:
                    sd = float(t.reference["sd"])
                    t.interval, t.interval_level, t.interval_method = (t.value - q / sd, t.value + q / sd), level, method
        _out_of_distribution(f, record.get("input_stats") or {})
        folds = fold_values(f)
        if len(folds) >= 2:
            spread = max(folds) - min(folds)
            limit = float(rec.get("fold_range_limit") or DEFAULT_FOLD_RANGE_G_CM2)
            f.details["fold_range_g_cm2"] = spread
            f.details["fold_range_limit_g_cm2"] = limit
            if spread > limit:
                source = "validation" if rec.get("fold_range_limit") else "the default limit, no validation record"
                f.flags.append(flag(
                    f"ensemble folds disagree: BMD per fold {min(folds):.3f}-{max(folds):.3f} g/cm2 "
                    f"(range {spread:.3f} > {limit:.3f} g/cm2, {source}); the estimate is less certain"))
                f.details["fold_disagreement"] = True
