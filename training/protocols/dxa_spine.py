"""Training spec of ``dxa_spine``: Nissinen et al. 2021's DXA-image classifier, one table per task (seed 003)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from training.metrics import binary_scores, safe_auc, table_row
from training.protocols import TrainingSpec

#: Nissinen et al. 2021, per task
PAPER_NUMBERS = {
    "dxa_spine:scoliosis": {"auc": 0.96, "accuracy": 0.941, "sensitivity": 0.705, "specificity": 0.976},
    "dxa_spine:unreliable": {"auc": 0.91, "accuracy": 0.824, "sensitivity": 0.783, "specificity": 0.857},
    "dxa_spine:fracture": {"auc": 0.63, "accuracy": 0.589, "sensitivity": 0.600, "specificity": 0.589},
}

#: Nissinen et al.'s decision thresholds per task (fracture lowered to match min-T-score sensitivity).
NISSINEN_THRESHOLDS = {"scoliosis": 0.5, "unreliable": 0.5, "fracture": 0.15}


def paper_table(y_true: Any, y_pred: Any, *, task: str | None = None, threshold: float | None = None,
                **_: Any) -> list[dict[str, Any]]:
    """Nissinen et al. (dxa_spine): AUC, accuracy, sensitivity, specificity of one task."""
    if task not in NISSINEN_THRESHOLDS:
        raise ValueError(f"dxa_spine needs task= one of {sorted(NISSINEN_THRESHOLDS)} (got {task!r})")
    paper = PAPER_NUMBERS[f"dxa_spine:{task}"]
    t = np.asarray(y_true).ravel()
    p = np.asarray(y_pred, dtype=np.float64).ravel()
    thr = NISSINEN_THRESHOLDS[task] if threshold is None else threshold
    s = binary_scores(t, p, thr)
    rows = [table_row(f"AUC {task}", safe_auc(t.astype(bool), p), paper["auc"])]
    for key, label in (("accuracy", "Accuracy"), ("sensitivity", "Sensitivity"), ("specificity", "Specificity")):
        rows.append(table_row(f"{label} (p >= {thr:g})", s[key], paper[key]))
    return rows


def evaluate(y_true: Any, y_pred: np.ndarray, *, patient_ids: Sequence[Any] | None = None,
             outputs: Sequence[str] = (), thresholds: Mapping[str, float] | None = None) -> dict[str, list[dict[str, Any]]]:
    """One paper table per output column (task), at the bundle's thresholds where given."""
    t = np.asarray(y_true).reshape(len(y_true), -1)
    names = list(outputs) or ["scoliosis"]
    return {f"dxa_spine {n}": paper_table(t[:, j], y_pred[:, j], task=n, threshold=(thresholds or {}).get(n))
            for j, n in enumerate(names)}


SPEC = TrainingSpec(
    protocol="dxa_spine",
    paper="Nissinen et al. 2021 (seed 003)",
    dataset="training.datasets.dxa_spine:build",
    paper_numbers=PAPER_NUMBERS,
    paper_table=paper_table,
    evaluate=evaluate,
    # matches the fracture threshold to the minimum-T-score sensitivity (Nissinen)
    post_train="training.datasets.dxa_spine:calibrate_fracture_threshold",
)
