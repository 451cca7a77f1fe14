"""Training spec of ``hip_xray``: Gu et al. 2023's BMD-GAN on hip radiographs (seed 004)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from training.metrics import icc, mae, paired, pearson_r, see, table_row
from training.protocols import TrainingSpec

#: Gu et al. 2023, Table 2, DXA-BMD, decomposition + regression (tune R)
PAPER_NUMBERS = {
    "hip_xray": {"pcc": 0.880, "icc": 0.848, "mae": 0.055, "see": 0.074},
}


def paper_table(y_true: Any, y_pred: Any, **_: Any) -> list[dict[str, Any]]:
    """Gu et al. (hip_xray, BMD-GAN): PCC, ICC(2,1), MAE, SEE."""
    paper = PAPER_NUMBERS["hip_xray"]
    a, b = paired(y_true, y_pred, min_n=3)
    return [table_row("PCC", pearson_r(a, b), paper["pcc"]), table_row("ICC(2,1)", icc(a, b, "2,1"), paper["icc"]),
            table_row("MAE", mae(a, b), paper["mae"], "g/cm²"), table_row("SEE", see(a, b), paper["see"], "g/cm²")]


def evaluate(y_true: Any, y_pred: np.ndarray, *, patient_ids: Sequence[Any] | None = None,
             outputs: Sequence[str] = (), thresholds: Mapping[str, float] | None = None) -> dict[str, list[dict[str, Any]]]:
    """The paper's table of the BMD column."""
    return {"hip_xray": paper_table(np.asarray(y_true).ravel(), y_pred[:, 0])}


SPEC = TrainingSpec(
    protocol="hip_xray",
    paper="Gu et al. 2023 (seed 004)",
    dataset="training.datasets.hip_xray:build",
    paper_numbers=PAPER_NUMBERS,
    paper_table=paper_table,
    evaluate=evaluate,
    # the recipe is not a plain fold ensemble (BMD-GAN's stages)
    trainer="training.hip_xray:train_recipe",
    # decomposition + regression against the PF-DRR fit and the direct baseline, by pose and after JPEG
    extra_evaluation="training.hip_xray:evaluate_main",
)
