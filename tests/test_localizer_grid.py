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


# --------------------------------------------------------------------------- body masks and trunk


def _body_masks_slice_by_slice(hu: np.ndarray) -> np.ndarray:
    """body_masks as it was: every slice opened, labelled and filled on its own."""
    from scipy import ndimage as ndi

    from screener.preprocess.morphology import fill_holes

    out = np.zeros(hu.shape, bool)
    st = ndi.generate_binary_structure(2, 1)
    for z in range(hu.shape[0]):
        m = hu[z] > -400.0
        for op in (ndi.binary_erosion, ndi.binary_erosion, ndi.binary_dilation, ndi.binary_dilation):
            m = op(m, structure=st)  # binary_opening(iterations=2), one step at a time (see test_morphology)
        lab, n = ndi.label(m)
        if n == 0:
            continue
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        out[z] = fill_holes(lab == int(np.argmax(sizes)))
    return out


def _trunk_whole_slice(body: np.ndarray, canal_yx: tuple[float, float], r: int) -> np.ndarray:
    """The arm cut-off as it was (anchors._trunk): both distance transforms over the whole slice."""
    from scipy import ndimage as ndi

    inside = ndi.distance_transform_edt(np.pad(body, 1))[1:-1, 1:-1] > r
    lab, _ = ndi.label(inside)
    y, x = int(round(canal_yx[0])), int(round(canal_yx[1]))
    keep = lab[y, x] if 0 <= y < body.shape[0] and 0 <= x < body.shape[1] else 0
    if keep == 0:
        return body
    return body & (ndi.distance_transform_edt(lab != keep) <= r)


def _blobs(seed: int, shape: tuple[int, int, int]) -> np.ndarray:
    """HU-like slices: a few soft-tissue ellipses (some touching, some with air holes, equal-sized
    pairs), a thin table, empty slices."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    hu = np.full(shape, -1000.0, np.float32)
    for z in range(nz):
        if z % 7 == 3:
            continue  # nothing in this slice
        for _ in range(int(rng.integers(1, 5))):
            cy, cx = rng.uniform(5, ny - 5), rng.uniform(5, nx - 5)
            a, b = rng.uniform(3, ny / 2), rng.uniform(3, nx / 2)
            hu[z][((yy - cy) / a) ** 2 + ((xx - cx) / b) ** 2 <= 1] = 40.0
            if rng.random() < 0.5:
                hu[z][((yy - cy) / (a / 3)) ** 2 + ((xx - cx) / (b / 3)) ** 2 <= 1] = -900.0
        if z % 5 == 0:  # two equal squares: the first one wins
            hu[z] = -1000.0
            hu[z, 2:12, 2:12] = 40.0
            hu[z, 20:30, 20:30] = 40.0
        hu[z, ny - 3, 5:nx - 5] = 100.0  # table, removed by the opening
    return hu


def test_body_masks_of_the_stack_equal_slice_by_slice() -> None:
    from screener.localizer.column import body_masks

    for seed in range(3):
        hu = _blobs(seed, (23, 48, 57))
        assert np.array_equal(body_masks(hu), _body_masks_slice_by_slice(hu))
    assert not body_masks(np.full((3, 10, 10), -1000.0, np.float32)).any()


def test_trunk_of_one_slice_equals_the_whole_slice_transforms() -> None:
    from types import SimpleNamespace

    from screener.localizer.anchors import ARM_CUT_MM, _trunks

    def _trunk(body: np.ndarray, col: SimpleNamespace, z: int, dx: float) -> np.ndarray:
        return _trunks(body[None], SimpleNamespace(canal_y={0: col.canal_y[z]}, canal_x={0: col.canal_x[z]}),
                       [0], dx)[0]

    dx = 1.5
    r = max(1, int(round(ARM_CUT_MM / dx)))
    hu = _blobs(7, (30, 64, 80))
    yy, xx = np.mgrid[0:64, 0:80]
    n_cut = 0
    for z in range(hu.shape[0]):
        body = hu[z] > -400.0
        # a trunk with an arm joined by a narrow neck, besides the random blobs
        body |= ((yy - 32) / 25.0) ** 2 + ((xx - 30) / 24.0) ** 2 <= 1
        body |= ((yy - 32) / 12.0) ** 2 + ((xx - 70) / 9.0) ** 2 <= 1
        body[30:34, 50:64] = True
        for canal in ((32.0, 30.0), (2.0, 2.0), (32.0, 70.0), (-5.0, 3.0)):
            col = SimpleNamespace(canal_y={z: canal[0]}, canal_x={z: canal[1]})
            got = _trunk(body, col, z, dx)
            want = _trunk_whole_slice(body, canal, r)
            assert np.array_equal(got, want)
            n_cut += int((got != body).any())
    assert n_cut > 0  # the arm was cut off somewhere
    empty = np.zeros((20, 20), bool)
    assert not _trunk(empty, SimpleNamespace(canal_y={0: 5.0}, canal_x={0: 5.0}), 0, dx).any()


def test_trunks_of_the_stack_equal_each_slice_alone() -> None:
    from types import SimpleNamespace

    from screener.localizer.anchors import ARM_CUT_MM, _trunks

    dx = 1.5
    r = max(1, int(round(ARM_CUT_MM / dx)))
    hu = _blobs(11, (24, 64, 80))
    yy, xx = np.mgrid[0:64, 0:80]
    body = hu > -400.0
    body |= (((yy - 32) / 25.0) ** 2 + ((xx - 30) / 24.0) ** 2 <= 1)[None]
    body |= (((yy - 32) / 12.0) ** 2 + ((xx - 70) / 9.0) ** 2 <= 1)[None]
    body[:, 30:34, 50:64] = True
    body[5] = False  # an empty slice
    canals = [(32.0, 30.0), (2.0, 2.0), (32.0, 70.0), (-5.0, 3.0), (70.0, 10.0)]
    col = SimpleNamespace(canal_y={z: canals[z % 5][0] for z in range(24)},
                          canal_x={z: canals[z % 5][1] for z in range(24)})
    zs = [z for z in range(24) if z % 4 != 1]
    got = _trunks(body, col, zs, dx)
    assert len(got) == len(zs)
    for z, trunk in zip(zs, got):
        assert np.array_equal(trunk, _trunk_whole_slice(body[z], canals[z % 5], r)), z
    assert _trunks(body, col, [], dx) == []


def test_ellipse_radius_equals_the_mgrid_form_bit_for_bit() -> None:
    from screener.localizer.column import ellipse_radius
    rng = np.random.default_rng(3)
    for _ in range(300):
        shape = (int(rng.integers(1, 120)), int(rng.integers(1, 120)))
        by, bx = rng.uniform(-20, 140, size=2)
        hd, hw = rng.uniform(0.5, 60, size=2)
        yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
        want = np.sqrt(((yy - by) / hd) ** 2 + ((xx - bx) / hw) ** 2)
        got = ellipse_radius(shape, float(by), float(bx), float(hd), float(hw))
        assert got.shape == want.shape and got.dtype == want.dtype and np.array_equal(got, want)


def test_closings_equal_scipys_binary_closing() -> None:
    import scipy.ndimage as ndi

    from screener.localizer.anchors import _CROSS_3, _SQUARE_3, _close_2d
    rng = np.random.default_rng(11)
    for _ in range(200):
        shape = (int(rng.integers(1, 40)), int(rng.integers(1, 40)))
        m = rng.random(shape) < rng.uniform(0.05, 0.95)
        assert np.array_equal(_close_2d(m, _CROSS_3), ndi.binary_closing(m, iterations=1))
        assert np.array_equal(_close_2d(m, _SQUARE_3),
                              ndi.binary_closing(m, structure=np.ones((3, 3), bool), iterations=1))
        stack = rng.random((int(rng.integers(1, 5)),) + shape) < rng.uniform(0.05, 0.95)
        assert np.array_equal(_close_2d(stack, _SQUARE_3),
                              ndi.binary_closing(stack, structure=np.ones((1, 3, 3), bool), border_value=0))
