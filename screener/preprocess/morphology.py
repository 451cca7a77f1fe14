"""Binary morphology shared by the image steps: hole filling by one labelling.

``scipy.ndimage.binary_fill_holes`` floods the background from the border by
repeated dilation, which costs many passes over a large slice. Labelling the
background once and keeping the components that touch the border gives the
same mask (the same 4-connected background: scipy's default structure)
in one pass.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["fill_holes", "fill_holes_per_slice"]


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_fill_holes(mask)`` of a 2-D mask, by one labelling of the background.

    Parameters
    ----------
    mask : numpy.ndarray
        2-D boolean mask.

    Returns
    -------
    numpy.ndarray
        The mask with every background region that does not reach the image's edge
        (4-connected) filled.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"fill_holes takes a 2-D mask (got {mask.ndim}-D); use fill_holes_per_slice")
    lab, n = ndimage.label(~mask)
    if n == 0:
        return mask.copy()
    edge = np.zeros(n + 1, dtype=bool)
    for border in (lab[0, :], lab[-1, :], lab[:, 0], lab[:, -1]):
        edge[border] = True
    edge[0] = True  # the mask itself
    return mask | ~edge[lab]


def fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """:func:`fill_holes` of every slice ``mask[k]`` of a 3-D ``(z, y, x)`` mask, in one labelling.

    Background 4-connected within its slice and not reaching the slice's edge is a hole. Only
    the mask's bounding box grown by one voxel is labelled (the background around it reaches
    the edge in every slice).
    """
    mask = np.asarray(mask, dtype=bool)
    box = ndimage.find_objects(mask.astype(np.int8))
    out = mask.copy()
    if not box or box[0] is None:
        return out
    grown = tuple(slice(max(0, sl.start - 1), min(n, sl.stop + 1)) for sl, n in zip(box[0], mask.shape))
    sub = mask[grown]
    st = np.zeros((3, 3, 3), dtype=bool)
    st[1] = ndimage.generate_binary_structure(2, 1)
    lab, n = ndimage.label(~sub, structure=st)
    edge = np.zeros(n + 1, dtype=bool)
    for face in (lab[:, 0, :], lab[:, -1, :], lab[:, :, 0], lab[:, :, -1]):
        edge[face] = True
    edge[0] = True
    out[grown] |= ~edge[lab]
    return out
