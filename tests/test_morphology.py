"""Hole filling by one labelling gives scipy's binary_fill_holes, slice by slice."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from screener.preprocess.morphology import fill_holes, fill_holes_per_slice


def _masks(seed: int) -> np.ndarray:
    """Random blobs with rings (holes), holes touching the edge, and diagonal-only gaps."""
    rng = np.random.default_rng(seed)
    m = ndimage.gaussian_filter(rng.random((6, 64, 80)), 2.0) > 0.5
    yy, xx = np.mgrid[:64, :80]
    r = np.hypot(yy - 30, xx - 40)
    m[1] |= (r > 10) & (r < 14)                      # a ring: its inside is a hole
    m[2] |= (np.abs(yy - xx) < 1) | (np.abs(yy + xx - 70) < 1)  # diagonal lines: 8- but not 4-closed
    m[3, :, :5] = True                               # a band on the edge
    m[4] = False                                     # empty
    m[5] = True                                      # full
    return m


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_same_as_scipy_on_every_slice_and_in_one_labelling(seed: int) -> None:
    m = _masks(seed)
    expected = np.stack([ndimage.binary_fill_holes(s) for s in m])
    assert expected[1].sum() > m[1].sum()            # the ring's inside was filled: a real check
    assert all(np.array_equal(fill_holes(s), e) for s, e in zip(m, expected))
    assert np.array_equal(fill_holes_per_slice(m), expected)


def test_a_3d_mask_is_refused_by_the_2d_fill() -> None:
    with pytest.raises(ValueError, match="2-D"):
        fill_holes(np.zeros((2, 4, 4), bool))


def test_fill_holes_per_slice_equals_scipy_on_random_masks() -> None:
    """The femoral-head locator's one-labelling hole fill (random masks) is scipy's ``binary_fill_holes`` of each axial slice."""
    rng = np.random.default_rng(3)
    for shape, p in (((12, 40, 50), 0.55), ((6, 30, 30), 0.7), ((5, 20, 25), 0.4)):
        m = rng.random(shape) < p
        m[:, 0, :] = False if p < 0.6 else m[:, 0, :]  # some masks touch the slice edges, some do not
        want = np.stack([ndimage.binary_fill_holes(s) for s in m])
        np.testing.assert_array_equal(fill_holes_per_slice(m), want)
    assert not fill_holes_per_slice(np.zeros((3, 5, 5), dtype=bool)).any()
