"""Binary morphology shared by the image steps: hole filling by one labelling, in-plane erosion
and dilation by whole-array shifts.

``scipy.ndimage.binary_fill_holes`` floods the background from the border by
repeated dilation, which costs many passes over a large slice. Labelling the
background once and keeping the components that touch the border gives the
same mask (the same 4-connected background: scipy's default structure)
in one pass.

``scipy.ndimage.binary_erosion`` / ``binary_dilation`` visit every pixel and every structure
element in turn; with a small structure the same result is one boolean AND (OR) of the whole
array per structure element, a shifted view of it (:func:`erode_2d`, :func:`dilate_2d`): several
times faster, and applied to every slice of a stack in one go.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["dilate_2d", "erode_2d", "fill_holes", "fill_holes_per_slice", "open_2d"]


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
    lab, n = ndimage.label(~mask, output=np.intp)
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
    lab, n = ndimage.label(~sub, structure=st, output=np.intp)  # intp: indexed without a copy
    edge = np.zeros(n + 1, dtype=bool)
    for face in (lab[:, 0, :], lab[:, -1, :], lab[:, :, 0], lab[:, :, -1]):
        edge[face] = True
    edge[0] = True
    out[grown] |= ~edge[lab]
    return out


def _offsets(structure: np.ndarray) -> list[tuple[int, int]]:
    """The ``(dy, dx)`` of the true elements of a 2-D structure, relative to its centre."""
    st = np.asarray(structure, dtype=bool)
    if st.ndim != 2 or st.shape[0] % 2 == 0 or st.shape[1] % 2 == 0:
        raise ValueError(f"a 2-D structure of odd sizes is needed (got shape {st.shape})")
    cy, cx = st.shape[0] // 2, st.shape[1] // 2
    return [(int(y) - cy, int(x) - cx) for y, x in zip(*np.nonzero(st))]


def _row_widths(offsets: list[tuple[int, int]]) -> dict[int, int] | None:
    """``{dy: w}`` when every row of the offsets is the run ``dx = -w .. w`` (a disk, a cross, a
    square), else ``None``."""
    rows: dict[int, list[int]] = {}
    for dy, dx in offsets:
        rows.setdefault(dy, []).append(dx)
    widths = {}
    for dy, dxs in rows.items():
        w = max(dxs)
        if sorted(dxs) != list(range(-w, w + 1)):
            return None
        widths[dy] = w
    return widths


def _combine_by_rows(mask: np.ndarray, widths: dict[int, int], erode: bool) -> np.ndarray:
    """:func:`_combine_shifted` of a structure made of centred runs (``widths``, :func:`_row_widths`):
    the runs first (the run of half-width ``w`` from that of ``w - 1`` and the two shifts ``+-w``),
    then one shift per row: 2 max(w) + (rows) operations instead of one per element (21 instead of
    81 for a disk of radius 5)."""
    runs = [mask]
    for w in range(1, max(widths.values()) + 1):
        runs.append(_combine_shifted(mask, [(0, -w), (0, w)], erode, into=runs[-1].copy()))
    out = np.full(mask.shape, erode, dtype=bool)
    for dy, w in widths.items():
        _combine_shifted(runs[w], [(dy, 0)], erode, into=out)
    return out


def _combine_shifted(mask: np.ndarray, offsets: list[tuple[int, int]], erode: bool,
                     into: np.ndarray | None = None) -> np.ndarray:
    """AND (``erode``) or OR of ``mask[..., y + dy, x + dx]`` over ``offsets``, outside the array
    False; combined into ``into`` (in place) when given."""
    if into is None:
        widths = _row_widths(offsets)
        if widths is not None and 2 * max(widths.values()) + len(widths) < len(offsets):
            return _combine_by_rows(mask, widths, erode)
    ny, nx = mask.shape[-2:]
    if into is not None:
        out = into
    elif erode:
        out = np.ones(mask.shape, dtype=bool)
    else:
        out = np.zeros(mask.shape, dtype=bool)
    for dy, dx in offsets:
        if abs(dy) >= ny or abs(dx) >= nx:  # reads only outside the array: all False
            if erode:
                out[...] = False
            continue
        dst = (Ellipsis, slice(max(0, -dy), ny - max(0, dy)), slice(max(0, -dx), nx - max(0, dx)))
        src = (Ellipsis, slice(max(0, dy), ny - max(0, -dy)), slice(max(0, dx), nx - max(0, -dx)))
        if erode:
            out[dst] &= mask[src]
            # the rows / columns whose neighbour at this offset is outside the array
            if dy > 0:
                out[..., ny - dy:, :] = False
            elif dy < 0:
                out[..., :-dy, :] = False
            if dx > 0:
                out[..., :, nx - dx:] = False
            elif dx < 0:
                out[..., :, :-dx] = False
        else:
            out[dst] |= mask[src]
    return out


def erode_2d(mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_erosion(mask, structure)`` of a 2-D mask, or of every slice
    ``mask[..., :, :]`` of a stack with the same 2-D ``structure`` (pixels outside the image count
    as False: scipy's ``border_value=0``).

    Parameters
    ----------
    mask : numpy.ndarray
        Boolean, 2-D or more (the last two axes are the plane).
    structure : numpy.ndarray
        2-D structuring element of odd sizes, centred.

    Returns
    -------
    numpy.ndarray
    """
    return _combine_shifted(np.asarray(mask, dtype=bool), _offsets(structure), erode=True)


def dilate_2d(mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_dilation(mask, structure)`` of a 2-D mask or of every slice of a stack
    (see :func:`erode_2d`): a pixel is set when the structure reflected about its centre and put on
    the pixel meets the mask."""
    return _combine_shifted(np.asarray(mask, dtype=bool), [(-dy, -dx) for dy, dx in _offsets(structure)],
                            erode=False)


def open_2d(mask: np.ndarray, structure: np.ndarray, iterations: int = 1) -> np.ndarray:
    """``scipy.ndimage.binary_opening(mask, structure, iterations)`` of a 2-D mask or of every slice
    of a stack: ``iterations`` erosions, then as many dilations (:func:`erode_2d`,
    :func:`dilate_2d`)."""
    out = np.asarray(mask, dtype=bool)
    for _ in range(iterations):
        out = erode_2d(out, structure)
    for _ in range(iterations):
        out = dilate_2d(out, structure)
    return out
