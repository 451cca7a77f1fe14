"""Training spec of ``l1_axial``: Kang et al. 2023's L1 BMD regressor on axial CT (seed 000)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from training.metrics import (KANG_T_REFERENCE, binary_scores, mape, paired, pearson_r, t_score,
                              table_row)
from training.protocols import TrainingSpec

#: Kang et al. 2023, Table 2, case 1 (cropped)
PAPER_NUMBERS = {
    "l1_axial": {
        "pearson_r": 0.905, "mape_pct": 5.66, "accuracy": 0.862, "precision": 0.842,
        "specificity": 0.827, "sensitivity": 0.897, "f1": 0.868,
    },
}


def paper_table(y_true: Any, y_pred: Any, *, threshold: float | None = None,
                t_reference: tuple[float, float] | None = None, **_: Any) -> list[dict[str, Any]]:
    """Kang et al. (l1_axial): Pearson r, MAPE and the T < -1 classification."""
    paper = PAPER_NUMBERS["l1_axial"]
    a, b = paired(y_true, y_pred)
    ref = t_reference or KANG_T_REFERENCE
    thr = -1.0 if threshold is None else threshold
    abnormal_true = t_score(a, *ref) < thr
    scores = binary_scores(abnormal_true, t_score(b, *ref), thr, greater=False)
    rows = [table_row("Pearson r", pearson_r(a, b), paper["pearson_r"]), table_row("MAPE", mape(a, b), paper["mape_pct"], "%")]
    for key, label in (("accuracy", "Accuracy"), ("precision", "Precision"),
                       ("specificity", "Specificity"), ("sensitivity", "Sensitivity"), ("f1", "F1")):
        rows.append(table_row(f"{label} (T < {thr:g})", scores[key], paper[key]))
    return rows


def evaluate(y_true: Any, y_pred: np.ndarray, *, patient_ids: Sequence[Any] | None = None,
             outputs: Sequence[str] = (), thresholds: Mapping[str, float] | None = None) -> dict[str, list[dict[str, Any]]]:
    """The paper's table of the BMD column."""
    return {"l1_axial": paper_table(np.asarray(y_true).ravel(), y_pred[:, 0])}


SPEC = TrainingSpec(
    protocol="l1_axial",
    paper="Kang et al. 2023 (seed 000)",
    dataset="training.datasets.l1_axial:build",
    paper_numbers=PAPER_NUMBERS,
    paper_table=paper_table,
    evaluate=evaluate,
    # fits the linear calibration of the BMD on the validation predictions when the recipe asks
    # for it ([bundle] preprocessing = { calibration = "linear" }, training.calibration)
    post_train="training.calibration:calibrate_bundle",
)
