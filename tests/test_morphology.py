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


@pytest.mark.parametrize("structure", [
    ndimage.generate_binary_structure(2, 1), np.ones((3, 3), bool), np.ones((1, 3), bool), np.ones((3, 1), bool),
    np.array([[0, 1, 0], [0, 1, 1], [0, 0, 0]], bool),  # not symmetric: dilation reflects it
    (np.mgrid[-2:3, -2:3] ** 2).sum(axis=0) <= 4, (np.mgrid[-5:6, -5:6] ** 2).sum(axis=0) <= 25])
def test_shifted_erosion_dilation_opening_equal_scipy(structure: np.ndarray) -> None:
    from screener.preprocess.morphology import dilate_2d, erode_2d, open_2d

    rng = np.random.default_rng(int(structure.sum()))
    for _ in range(25):
        shape = (int(rng.integers(1, 4)), int(rng.integers(1, 30)), int(rng.integers(1, 30)))
        mask = rng.random(shape) < rng.uniform(0.2, 0.97)
        st3 = structure[None]
        assert np.array_equal(erode_2d(mask, structure), ndimage.binary_erosion(mask, structure=st3))
        assert np.array_equal(dilate_2d(mask, structure), ndimage.binary_dilation(mask, structure=st3))
        # scipy's binary_opening(iterations=2) itself corrupts the heap on such small masks (scipy
        # 1.17.1, found here): its two erosions and two dilations are called one by one instead
        want = mask
        for op in (ndimage.binary_erosion, ndimage.binary_erosion, ndimage.binary_dilation, ndimage.binary_dilation):
            want = op(want, structure=st3)
        assert np.array_equal(open_2d(mask, structure, 2), want)
        assert np.array_equal(erode_2d(mask[0], structure), ndimage.binary_erosion(mask[0], structure=structure))
