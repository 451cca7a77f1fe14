"""Training spec of ``lumbar_sagittal``: Yoshida et al. 2023's BMD / TBS regressor on sagittal CT (seed 002)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from training.metrics import binary_scores, pearson_r, safe_auc, table_row
from training.protocols import TrainingSpec

#: Yoshida et al. 2023, Results
PAPER_NUMBERS = {
    "lumbar_sagittal": {
        "bmd_r_vertebra": 0.81, "tbs_r_vertebra": 0.54, "auc_osteopenia": 0.921,
        "auc_osteoporosis": 0.969, "auc_tbs_impaired": 0.768,
        "osteopenia_sensitivity": 0.93, "osteopenia_specificity": 0.90,
        "osteoporosis_sensitivity": 1.00, "osteoporosis_specificity": 0.94,
    },
}


def paper_table(y_true: Any, y_pred: Any, *, patient_ids: Sequence[Any] | None = None, yam: float = 1.18,
                **_: Any) -> list[dict[str, Any]]:
    """Yoshida et al. (lumbar_sagittal): BMD / TBS r per vertebra and patient, %YAM and TBS AUCs."""
    paper = PAPER_NUMBERS["lumbar_sagittal"]
    t = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_pred, dtype=np.float64)
    if t.ndim != 2 or t.shape[1] != 2 or p.shape != t.shape:
        raise ValueError("lumbar_sagittal y_true and y_pred must both be (n, 2): BMD, TBS per vertebra")
    rows = [table_row("BMD r", pearson_r(t[:, 0], p[:, 0]), paper["bmd_r_vertebra"], level="vertebra"),
            table_row("TBS r", pearson_r(t[:, 1], p[:, 1]), paper["tbs_r_vertebra"], level="vertebra")]
    ids = np.asarray(patient_ids if patient_ids is not None else np.arange(len(t)))
    if ids.shape[0] != len(t):
        raise ValueError(f"{ids.shape[0]} patient ids for {len(t)} vertebrae")
    uniq, inv = np.unique(ids, return_inverse=True)
    counts = np.bincount(inv).astype(np.float64)
    pt = np.stack([np.bincount(inv, weights=t[:, j]) / counts for j in range(2)], axis=1)
    pp = np.stack([np.bincount(inv, weights=p[:, j]) / counts for j in range(2)], axis=1)
    rows.append(table_row("BMD r", pearson_r(pt[:, 0], pp[:, 0]), None, level="patient"))
    rows.append(table_row("TBS r", pearson_r(pt[:, 1], pp[:, 1]), None, level="patient"))
    yam_true, yam_pred = 100 * pt[:, 0] / yam, 100 * pp[:, 0] / yam
    for name, cut in (("osteopenia", 80.0), ("osteoporosis", 70.0)):
        truth = yam_true < cut
        rows.append(table_row(f"AUC {name} (%YAM < {cut:g})", safe_auc(truth, -pp[:, 0]),
                         paper[f"auc_{name}"], level="patient"))
        s = binary_scores(truth, yam_pred, cut, greater=False)
        rows.append(table_row(f"Sensitivity {name}", s["sensitivity"], paper[f"{name}_sensitivity"], level="patient"))
        rows.append(table_row(f"Specificity {name}", s["specificity"], paper[f"{name}_specificity"], level="patient"))
    rows.append(table_row("AUC TBS impaired (<= 1.31)", safe_auc(pt[:, 1] <= 1.31, -pp[:, 1]),
                     paper["auc_tbs_impaired"], level="patient"))
    return rows


def evaluate(y_true: Any, y_pred: np.ndarray, *, patient_ids: Sequence[Any] | None = None,
             outputs: Sequence[str] = (), thresholds: Mapping[str, float] | None = None) -> dict[str, list[dict[str, Any]]]:
    """The paper's table, %YAM against the young-adult mean the cohort's labels use."""
    from training.phantoms.labels import YAM_L1L4  # the young-adult mean the labels use

    return {"lumbar_sagittal": paper_table(y_true, y_pred, patient_ids=patient_ids, yam=YAM_L1L4)}


SPEC = TrainingSpec(
    protocol="lumbar_sagittal",
    paper="Yoshida et al. 2023 (seed 002)",
    dataset="training.datasets.lumbar_sagittal:build",
    paper_numbers=PAPER_NUMBERS,
    paper_table=paper_table,
    evaluate=evaluate,
)
