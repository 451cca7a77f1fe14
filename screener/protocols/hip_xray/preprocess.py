"""Hip radiograph -> per-hip network inputs (Gu et al. 2023, BMD-GAN, seed ``004``).

The one preprocessing path of the ``hip_xray`` protocol, shared by the training-set builder
(:mod:`training.datasets.hip_xray`) and the protocol (:mod:`screener.protocols.hip_xray.protocol`):

1. :func:`screener.radiograph.read_radiograph` -- Modality + VOI LUT to ``[0, 1]`` (bone bright),
   resampled to square pixels of ``pixel_mm`` at the patient;
2. optionally JPEG recompression at a given quality (the paper's robustness check, section 4.2.4);
3. :func:`screener.radiograph.split_hips` -- standard AP view, split at the vertical midline,
   each half cover-resized and centre-cropped to ``shape`` (the paper's 256x512, W x H), the left
   hip mirrored so that both hips look alike.

Every step is a per-axis affine map, so each hip also carries the 3x3 matrix that takes a
network-input pixel ``(row, col)`` back to the stored radiograph pixel ``(row, col)``
(:meth:`HipInput.to_stored`): the protocol uses it to draw the decomposed PF-DRR's outline on the
radiograph for the SR and the secondary capture.  A ground-truth DRR on the radiograph's stored
grid is split the same way with :func:`hip_halves` (training targets).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from screener.radiograph import (
    HIP_PIXEL_MM,
    HIP_SHAPE,
    ImageLayout,
    Radiograph,
    jpeg_recompress,
    read_radiograph,
    resample_to_spacing,
    split_hips,
)

__all__ = ["HIP_PIXEL_MM", "HIP_SHAPE", "HipInput", "hip_halves", "preprocess_hip_radiograph",
           "tensor_to_stored_matrix"]


@dataclass
class HipInput:
    """One hip, as the network takes it.

    Attributes
    ----------
    side : str
        ``"R"`` or ``"L"`` (patient side).
    image : numpy.ndarray
        ``float32`` ``shape`` array in ``[0, 1]`` (left hips mirrored).
    to_stored_matrix : numpy.ndarray
        ``3x3`` affine: ``[row, col, 1]`` of a network-input pixel centre -> stored-pixel
        ``[row, col, 1]`` (pixel centres at integer indices).
    pixel_mm : float
        Size of one network-input pixel at the patient (mm, approximately square).
    """

    side: str
    image: np.ndarray
    to_stored_matrix: np.ndarray
    pixel_mm: float
    meta: dict[str, Any] = field(default_factory=dict)

    def to_stored(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Map network-input pixel coordinates to stored-radiograph pixel coordinates.

        Parameters
        ----------
        rows, cols : array-like
            Pixel-centre coordinates on the network input (integers = pixel centres).

        Returns
        -------
        (rows, cols) : tuple of numpy.ndarray
            Pixel-centre coordinates on the stored radiograph.
        """
        r = np.asarray(rows, dtype=np.float64).ravel()
        c = np.asarray(cols, dtype=np.float64).ravel()
        p = self.to_stored_matrix @ np.vstack([r, c, np.ones_like(r)])
        return p[0], p[1]


def _axis_map(n_out: int, n_in: int, offset: float = 0.0) -> tuple[float, float]:
    """``grid_mode`` zoom from ``n_in`` to ``n_out`` samples, then ``offset`` samples cropped:
    output index ``j`` -> input coordinate ``a j + b``."""
    a = n_in / n_out
    return a, (offset + 0.5) * a - 0.5


def _cover_geometry(h: int, w: int, shape: tuple[int, int]) -> tuple[tuple[float, float], tuple[float, float]]:
    """Affine per axis of :func:`screener.radiograph.fit_to_shape` ``mode="cover"``:
    output index -> half-image coordinate, ``((a_r, b_r), (a_c, b_c))``."""
    th, tw = int(shape[0]), int(shape[1])
    scale = max(th / h, tw / w)
    new_h = max(th, int(math.ceil(h * scale - 1e-6)))
    new_w = max(tw, int(math.ceil(w * scale - 1e-6)))
    if (new_h, new_w) == (h, w):
        new_h, new_w = h, w
    sy, sx = (new_h - th) // 2, (new_w - tw) // 2
    ar, br = _axis_map(new_h, h)
    ac, bc = _axis_map(new_w, w)
    # crop: output j is resized index j + sy
    return (ar, ar * sy + br), (ac, ac * sx + bc)


def tensor_to_stored_matrix(side: str, std_shape: tuple[int, int], stored_shape: tuple[int, int],
                            layout: ImageLayout, shape: tuple[int, int], resample_factor: tuple[float, float],
                            *, unilateral: bool = False, mirror_left: bool = True) -> np.ndarray:
    """The 3x3 affine from a hip's network-input pixel to the stored radiograph pixel.

    Parameters
    ----------
    side : str
        ``"R"`` or ``"L"``.
    std_shape : tuple of int
        Shape of the resampled image in the standard view.
    stored_shape : tuple of int
        Shape of the stored pixel array.
    layout : ImageLayout
        Patient directions of the stored pixels.
    shape : tuple of int
        Network input ``(rows, cols)``.
    resample_factor : tuple of float
        Stored pixels per resampled pixel, ``(rows, cols)`` of the stored orientation.
    unilateral : bool
        The image is one hip (not split).
    mirror_left : bool
        As :func:`screener.radiograph.split_hips`.

    Returns
    -------
    numpy.ndarray
        ``(3, 3)`` float64.
    """
    hs, ws = std_shape
    mid = ws // 2
    if unilateral:
        c0, hw = 0, ws
    else:
        c0, hw = (0, mid) if side == "R" else (ws - mid, mid)
    (ar, br), (ac, bc) = _cover_geometry(hs, hw, shape)
    m = np.array([[ar, 0, br], [0, ac, bc], [0, 0, 1.0]])  # input -> (mirrored) half
    if side == "L" and mirror_left:
        m = np.array([[1, 0, 0], [0, -1, hw - 1.0], [0, 0, 1]]) @ m
    m = np.array([[1, 0, 0], [0, 1, float(c0)], [0, 0, 1]]) @ m  # half -> standard view
    # standard view -> resampled stored orientation (undo to_standard_view)
    col, row = layout.column_toward, layout.row_toward
    transposed = col in ("H", "F")
    if transposed:
        col, row = row, col
    if row == "H":
        m = np.array([[-1, 0, hs - 1.0], [0, 1, 0], [0, 0, 1]]) @ m
    if col == "R":
        m = np.array([[1, 0, 0], [0, -1, ws - 1.0], [0, 0, 1]]) @ m
    if transposed:
        m = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1.0]]) @ m
    # resampled -> stored (grid_mode zoom)
    fr, fc = resample_factor
    m = np.array([[fr, 0, 0.5 * fr - 0.5], [0, fc, 0.5 * fc - 0.5], [0, 0, 1]]) @ m
    del stored_shape
    return m


def hip_halves(image: np.ndarray, spacing_mm: tuple[float, float], layout: ImageLayout, *,
               shape: tuple[int, int] = HIP_SHAPE, pixel_mm: float = HIP_PIXEL_MM) -> dict[str, np.ndarray]:
    """Split any image on the radiograph's stored grid (e.g. a ground-truth DRR) like the radiograph.

    Parameters
    ----------
    image : numpy.ndarray
        ``(H, W)`` on the stored pixel grid.
    spacing_mm : tuple of float
        The radiograph's pixel spacing at the patient (``Radiograph.source_spacing_mm``).
    layout : ImageLayout
        The radiograph's layout.
    shape, pixel_mm
        As :func:`preprocess_hip_radiograph`.

    Returns
    -------
    dict
        ``{"R": array, "L": array}`` (``float32``, ``shape``; left mirrored).
    """
    res = resample_to_spacing(np.asarray(image, dtype=np.float32), spacing_mm, pixel_mm)
    return split_hips(res, layout, shape=shape)


def preprocess_hip_radiograph(ds: Any, *, shape: tuple[int, int] = HIP_SHAPE, pixel_mm: float = HIP_PIXEL_MM,
                              jpeg_quality: int | None = None) -> tuple[Radiograph, dict[str, HipInput]]:
    """Radiograph dataset -> per-hip network inputs (the ``hip_xray`` preprocessing).

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        A DX/CR AP pelvis (or unilateral hip) radiograph with pixel data.
    shape : tuple of int
        Network input ``(rows, cols)`` (paper ``(512, 256)``; the cohort bundle uses a smaller one,
        read it from the bundle's input spec).
    pixel_mm : float
        Square pixel size the radiograph is resampled to before splitting.
    jpeg_quality : int, optional
        Recompress the ``[0, 1]`` image as an 8-bit JPEG at this quality first (robustness check).

    Returns
    -------
    (Radiograph, dict)
        The read radiograph and ``{"R": HipInput, "L": HipInput}`` (one key for a unilateral image).

    Raises
    ------
    screener.radiograph.RadiographError
        Not a greyscale frontal radiograph with a known pixel spacing.
    """
    rad = read_radiograph(ds, pixel_mm)
    img = rad.image
    if jpeg_quality is not None:
        img = np.clip(jpeg_recompress(img, int(jpeg_quality), value_range=(0.0, 1.0)), 0.0, 1.0)
    halves = split_hips(img, rad.layout, shape=shape)
    from screener.radiograph import to_standard_view

    std_shape = tuple(to_standard_view(img, rad.layout).shape)
    stored_shape = (int(ds.Rows), int(ds.Columns))
    factor = (rad.pixel_mm / rad.source_spacing_mm[0], rad.pixel_mm / rad.source_spacing_mm[1])
    unilateral = rad.layout.laterality in ("R", "L")
    out: dict[str, HipInput] = {}
    for side, arr in halves.items():
        m = tensor_to_stored_matrix(side, std_shape, stored_shape, rad.layout, shape, factor,
                                    unilateral=unilateral)
        scale = abs(m[0, 0]) + abs(m[0, 1])  # stored pixels per input pixel (rows)
        out[side] = HipInput(side=side, image=np.ascontiguousarray(arr, dtype=np.float32), to_stored_matrix=m,
                             pixel_mm=float(scale * rad.source_spacing_mm[0]),
                             meta={"std_shape": std_shape, "unilateral": unilateral})
    return rad, out
