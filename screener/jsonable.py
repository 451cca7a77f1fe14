"""Plain JSON values from what the pipeline holds (numpy scalars and arrays, tuples, paths).

One converter for everything the screener writes as JSON: finding details
(:meth:`screener.findings.Finding.to_dict`) and model cards
(:func:`screener.bundles.save_bundle`).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np

__all__ = ["to_jsonable"]


def to_jsonable(value: Any) -> Any:
    """``value`` with every nested numpy scalar / array, tuple and path made a plain JSON type.

    Mappings become dicts with string keys, tuples and arrays lists, numpy
    scalars Python numbers, paths strings; a non-finite float (NaN, inf)
    becomes ``None`` (JSON has no NaN). Other values are returned unchanged.
    """
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value
