"""A canonical, coarse working grid for the classical spine localizer.

The localizer works on a copy of the CT reoriented to ``[z, y, x]`` with
``z`` increasing superior, ``y`` increasing posterior and ``x`` increasing
towards the patient's left (DICOM LPS), and block-averaged to about 2 mm
pixels in-plane and at least ~1.5 mm along ``z``. Block averaging lowers the
noise of thin, sharp-kernel reconstructions and keeps the work per study
small. :class:`WorkGrid` converts working-grid indices back to indices and
patient coordinates of the source :class:`~screener.domain.Volume`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from screener.domain import Volume

#: Target in-plane pixel size (mm) of the working grid.
TARGET_INPLANE_MM = 2.0
#: Target slice spacing (mm) of the working grid (thin slices are averaged).
TARGET_SLICE_MM = 1.5


class GeometryError(ValueError):
    """The volume's geometry does not allow axial spine localization."""


@dataclass
class WorkGrid:
    """Reoriented, block-averaged HU array with the mapping back to the source.

    Attributes
    ----------
    hu : numpy.ndarray
        ``float32`` array ``[z, y, x]`` (superior, posterior, left increasing).
    spacing : tuple of float
        ``(dz, dy, dx)`` of ``hu`` in mm.
    factors : tuple of int
        Block sizes ``(fz, fy, fx)`` in source voxels.
    perm : tuple of int
        Source array axis that became working axis 0, 1, 2.
    flip : tuple of bool
        Whether that source axis runs opposite to the working axis.
    shape_src : tuple of int
        Shape of the source array.
    """

    hu: np.ndarray
    spacing: tuple[float, float, float]
    factors: tuple[int, int, int]
    perm: tuple[int, int, int]
    flip: tuple[bool, bool, bool]
    shape_src: tuple[int, int, int]
    volume: Volume

    def to_source_index(self, z: float, y: float, x: float) -> tuple[float, float, float]:
        """Source ``(k, j, i)`` index (fractional) of a working-grid point."""
        src = [0.0, 0.0, 0.0]
        for a, w in enumerate((z, y, x)):
            f = self.factors[a]
            c = w * f + (f - 1) / 2.0
            ax = self.perm[a]
            src[ax] = (self.shape_src[ax] - 1 - c) if self.flip[a] else c
        return float(src[0]), float(src[1]), float(src[2])

    def source_slices(self, z: int) -> tuple[int, int]:
        """First and last source slice index (inclusive) covered by working slice ``z``."""
        f = self.factors[0]
        a, b = z * f, z * f + f - 1
        if self.flip[0]:
            n = self.shape_src[0]
            a, b = n - 1 - b, n - 1 - a
        return int(a), int(b)

    def z_mm(self, z: float) -> float:
        """Patient z (mm) of working slice ``z`` (fractional allowed)."""
        k, j, i = self.to_source_index(z, 0.0, 0.0)
        return float(self.volume.index_to_patient(k, j, i)[2])


def _block_mean(a: np.ndarray, fy: int, fx: int) -> np.ndarray:
    ny, nx = a.shape[-2] // fy, a.shape[-1] // fx
    a = a[..., : ny * fy, : nx * fx]
    return a.reshape(a.shape[:-2] + (ny, fy, nx, fx)).mean(axis=(-3, -1), dtype=np.float32)


#: below this block width the strided sums of :func:`_slab_mean` add in numpy's order (longer
#: contiguous runs are summed pairwise by numpy: :func:`_block_mean` is used for them)
_STRIDED_MAX = 8


def _slab_mean(slab: np.ndarray, fy: int, fx: int) -> np.ndarray:
    """Mean of ``fz x fy x fx`` blocks of a slab of ``fz`` slices (any strides): the same float32
    values as ``_block_mean(slab, fy, fx).mean(axis=0)`` of a C-ordered slab, summed in the same
    order (along x within a block row, then the rows, then the slices), but as whole-plane adds of
    strided views: about 20 times faster than numpy's reduction over two interleaved axes."""
    if fx >= _STRIDED_MAX or fy >= _STRIDED_MAX:
        return _block_mean(np.array(slab, dtype=np.float32), fy, fx).mean(axis=0)
    ny, nx = slab.shape[-2] // fy, slab.shape[-1] // fx
    total: np.ndarray | None = None
    for plane in slab:
        acc: np.ndarray | None = None
        for i in range(fy):
            row: np.ndarray | None = None
            for j in range(fx):
                part = plane[i:ny * fy:fy, j:nx * fx:fx]
                row = np.array(part, dtype=np.float32) if row is None else np.add(row, part, out=row)
            acc = row if acc is None else np.add(acc, row, out=acc)
        assert acc is not None
        acc /= np.float32(fy * fx)
        total = acc if total is None else np.add(total, acc, out=total)
    assert total is not None
    total /= np.float32(slab.shape[0])
    return total


def make_grid(volume: Volume) -> WorkGrid:
    """Build the working grid of ``volume``.

    Parameters
    ----------
    volume : Volume
        Axial CT volume in HU.

    Returns
    -------
    WorkGrid

    Raises
    ------
    GeometryError
        When the slices are not axial (the localizer reads axial anatomy) or the
        volume has fewer than 3 slices.
    """
    arr = np.asarray(volume.array)
    if arr.ndim != 3 or arr.shape[0] < 3:
        raise GeometryError("need an axial CT volume with at least 3 slices")
    d = np.asarray(volume.direction, float)
    if abs(d[2, 2]) < np.cos(np.deg2rad(15.0)):
        raise GeometryError("slices are not axial (slice normal more than 15 degrees from patient z)")
    # source axes: 0 = k (d[:, 2]), 1 = j (d[:, 1]), 2 = i (d[:, 0])
    src_dirs = {0: d[:, 2], 1: d[:, 1], 2: d[:, 0]}
    if abs(src_dirs[2][0]) >= abs(src_dirs[1][0]):
        x_ax, y_ax = 2, 1
    else:
        x_ax, y_ax = 1, 2
    perm = (0, y_ax, x_ax)
    flip = (src_dirs[0][2] < 0, src_dirs[y_ax][1] < 0, src_dirs[x_ax][0] < 0)
    view = np.transpose(arr, perm)
    for a in range(3):
        if flip[a]:
            view = np.flip(view, axis=a)
    sp_src = {0: float(volume.spacing[0]), 1: float(volume.spacing[1]), 2: float(volume.spacing[2])}
    dz, dy, dx = abs(sp_src[perm[0]]), sp_src[perm[1]], sp_src[perm[2]]
    if min(dz, dy, dx) <= 0:
        raise GeometryError("voxel spacing must be positive")
    fy = max(1, int(round(TARGET_INPLANE_MM / dy)))
    fx = max(1, int(round(TARGET_INPLANE_MM / dx)))
    fz = max(1, int(round(TARGET_SLICE_MM / dz)))
    nz = view.shape[0] // fz
    if nz < 3:
        raise GeometryError("too few slices for spine localization")
    out = np.empty((nz, view.shape[1] // fy, view.shape[2] // fx), np.float32)
    for z in range(nz):
        block = view[z * fz:(z + 1) * fz]
        if block.dtype != np.float32 or np.isnan(block).any():
            block = np.nan_to_num(np.asarray(block, dtype=np.float32), nan=-1000.0)
        out[z] = _slab_mean(block, fy, fx)
    return WorkGrid(hu=out, spacing=(dz * fz, dy * fy, dx * fx), factors=(fz, fy, fx),
                    perm=perm, flip=flip, shape_src=tuple(arr.shape), volume=volume)
