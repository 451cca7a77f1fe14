"""The localizer's working grid: the strided block means equal numpy's block reduction."""
from __future__ import annotations

import numpy as np
import pytest

from screener.domain import Volume
from screener.localizer.grid import _block_mean, _slab_mean, make_grid


@pytest.mark.parametrize("fz,fy,fx", [(1, 1, 1), (2, 2, 2), (1, 2, 2), (3, 3, 3), (4, 2, 2), (1, 3, 2),
                                      (2, 4, 4), (1, 7, 7), (1, 8, 8), (2, 1, 9)])
def test_slab_mean_equals_block_reduction_bit_for_bit(fz: int, fy: int, fx: int) -> None:
    rng = np.random.default_rng(fz * 100 + fy * 10 + fx)
    slab = (rng.standard_normal((fz, 61, 67)) * 300 + 40).astype(np.float32)
    ref = _block_mean(slab, fy, fx).mean(axis=0)
    got = _slab_mean(slab, fy, fx)
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert np.array_equal(got, ref)
    # a strided, flipped view (a feet-first or rotated source) gives what its C-ordered copy gives
    view = np.flip(np.transpose(slab, (0, 2, 1)), axis=1)
    if max(fy, fx) < 8:
        assert np.array_equal(_slab_mean(view, fy, fx), _block_mean(np.ascontiguousarray(view), fy, fx).mean(axis=0))


def test_make_grid_block_means_and_nan_as_air() -> None:
    rng = np.random.default_rng(3)
    arr = (rng.standard_normal((9, 40, 44)) * 200).astype(np.float32)
    arr[4, 10, 10] = np.nan
    vol = Volume(array=arr, spacing=(0.75, 0.9, 0.9), origin=np.zeros(3), direction=np.eye(3),
                 datasets=[], paths=[], warnings=[])
    grid = make_grid(vol)
    assert grid.factors == (2, 2, 2)
    src = np.nan_to_num(arr, nan=-1000.0)
    for z in range(grid.hu.shape[0]):
        ref = _block_mean(src[2 * z:2 * z + 2], 2, 2).mean(axis=0)
        assert np.array_equal(grid.hu[z], ref)
    assert np.isfinite(grid.hu).all()
