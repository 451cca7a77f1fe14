"""Sampling oblique / orthogonal planes from a CT :class:`~screener.domain.Volume`.

A plane is given like :func:`training.phantoms.ct.render_plane`: the patient position of
pixel ``[0, 0]`` (``origin``), unit vectors ``u`` (increasing column) and ``v`` (increasing
row), ``shape = (rows, columns)`` and ``spacing = (row mm, column mm)``.  A *plane source*
is any callable ``source(origin, u, v, shape, spacing) -> HU array``: :class:`VolumeSampler`
interpolates a volume (inference, site data); the virtual cohort renders the same plane
from its analytic phantom (training), so the protocols' preprocessing functions take a
source and never care which.
"""
from __future__ import annotations

from typing import Protocol as _Protocol, Sequence

import numpy as np
from scipy import ndimage

from screener.domain import Volume

__all__ = ["PlaneSource", "VolumeSampler", "plane_points"]


class PlaneSource(_Protocol):
    """Anything that returns HU on a plane (see module docstring)."""

    def __call__(self, origin: Sequence[float], u: Sequence[float], v: Sequence[float],
                 shape: tuple[int, int], spacing: tuple[float, float]) -> np.ndarray: ...


def plane_points(origin: Sequence[float], u: Sequence[float], v: Sequence[float],
                 shape: tuple[int, int], spacing: tuple[float, float]) -> np.ndarray:
    """Patient coordinates ``(rows, columns, 3)`` of every pixel centre of a plane."""
    o, uu, vv = (np.asarray(a, dtype=np.float64) for a in (origin, u, v))
    jj, ii = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)
    return (o[None, None, :] + (ii * spacing[1])[..., None] * uu[None, None, :]
            + (jj * spacing[0])[..., None] * vv[None, None, :])


class VolumeSampler:
    """Plane source over a :class:`~screener.domain.Volume` (trilinear interpolation).

    Parameters
    ----------
    volume : Volume
    outside : float
        HU returned outside the volume (air).
    order : int
        Spline order of :func:`scipy.ndimage.map_coordinates` (1 = trilinear).
    """

    def __init__(self, volume: Volume, outside: float = -1000.0, order: int = 1) -> None:
        self.volume = volume
        self.outside = float(outside)
        self.order = int(order)
        d = np.asarray(volume.direction, dtype=np.float64)
        self._inv = np.linalg.inv(d)
        self._origin = np.asarray(volume.origin, dtype=np.float64)
        self._spacing = np.asarray(volume.spacing, dtype=np.float64)  # (k, j, i)

    def to_index(self, points: np.ndarray) -> np.ndarray:
        """Fractional voxel indices ``(..., 3)`` as ``(k, j, i)`` of patient points ``(..., 3)``."""
        rel = (np.asarray(points, dtype=np.float64) - self._origin) @ self._inv.T  # (i, j, k) in mm
        return np.stack([rel[..., 2] / self._spacing[0], rel[..., 1] / self._spacing[1],
                         rel[..., 0] / self._spacing[2]], axis=-1)

    def __call__(self, origin: Sequence[float], u: Sequence[float], v: Sequence[float],
                 shape: tuple[int, int], spacing: tuple[float, float]) -> np.ndarray:
        """HU on the plane, ``float32 (rows, columns)``."""
        idx = self.to_index(plane_points(origin, u, v, shape, spacing))
        coords = np.moveaxis(idx, -1, 0)
        out = ndimage.map_coordinates(self.volume.array, coords, order=self.order, mode="constant",
                                      cval=self.outside, prefilter=False)
        return out.astype(np.float32)
