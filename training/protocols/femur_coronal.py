"""Training spec of ``femur_coronal``: Ha et al. 2024's three-class femur CNN on coronal CT (seed 001)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from training.metrics import multiclass_scores, one_vs_rest_auc, table_row
from training.protocols import TrainingSpec

#: Ha et al. 2024, Table 2, multi-modality
PAPER_NUMBERS = {
    "femur_coronal": {
        "accuracy": 0.802, "sensitivity": 0.802, "specificity": 0.901, "precision": 0.804,
        "f1": 0.803, "macro_auc": 0.939,
    },
}


def paper_table(y_true: Any, y_pred: Any, **_: Any) -> list[dict[str, Any]]:
    """Ha et al. (femur_coronal): per-class and macro AUC, weighted three-class scores."""
    paper = PAPER_NUMBERS["femur_coronal"]
    t = np.asarray(y_true).ravel().astype(np.int64)
    p = np.asarray(y_pred, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError("femur_coronal y_pred must be (n, 3) class probabilities")
    ovr = one_vs_rest_auc(t, p)
    ms = multiclass_scores(t, p.argmax(axis=1), n_classes=p.shape[1])
    rows = [table_row(f"AUC {name} vs rest", ovr["per_class"][k], None)
            for k, name in enumerate(("normal", "osteopenia", "osteoporosis")[: p.shape[1]])]
    rows.append(table_row("Macro AUC", ovr["macro"], paper["macro_auc"]))
    rows.append(table_row("Accuracy", ms["accuracy"], paper["accuracy"]))
    for key, label in (("sensitivity", "Sensitivity"), ("specificity", "Specificity"),
                       ("precision", "Precision"), ("f1", "F1")):
        rows.append(table_row(f"{label} (weighted)", ms[f"weighted_{key}"], paper[key]))
    return rows


def evaluate(y_true: Any, y_pred: np.ndarray, *, patient_ids: Sequence[Any] | None = None,
             outputs: Sequence[str] = (), thresholds: Mapping[str, float] | None = None) -> dict[str, list[dict[str, Any]]]:
    """The paper's table of the class probabilities."""
    return {"femur_coronal": paper_table(y_true, y_pred)}


SPEC = TrainingSpec(
    protocol="femur_coronal",
    paper="Ha et al. 2024 (seed 001)",
    dataset="training.datasets.femur_coronal:build",
    paper_numbers=PAPER_NUMBERS,
    paper_table=paper_table,
    evaluate=evaluate,
)
