"""The femoral heads femur_coronal found, as masks on the axial slices (for the outlines SEG).

:func:`screener.protocols.femur_coronal.preprocess.locate_femoral_heads` gives each head's centre.  The head's
radius is read from the image around it: the joint space is the thin shell around the head with the
least bone, so the radius is the inner edge of the sphere shell (1.5 mm thick, radii 15-32 mm) whose
voxels are least often bone.  The mask is then the bone (HU >= :data:`BONE_HU`)
inside that sphere, its marrow holes filled slice by slice -- the head, not the acetabulum around it.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from screener.domain import Volume
from screener.findings import ImageLayer
from screener.preprocess.morphology import fill_holes

#: HU above which a voxel counts as bone (the trabecular head of an osteoporotic adult included)
BONE_HU = 120.0
#: radii tried for the head's surface (adult femoral heads are 19-28 mm in radius)
RADII_MM = np.arange(15.0, 32.01, 0.5)
#: thickness of the shell whose bone fraction finds the joint space
SHELL_MM = 1.5
#: femur_coronal's side keys -> the words of the segment label
SIDES = {"R": "right", "L": "left"}


def _distances(volume: Volume, centre: np.ndarray, ks: np.ndarray, rows: slice, cols: slice) -> np.ndarray:
    """Distance (mm) from ``centre`` of every voxel of slices ``ks`` in the ``rows x cols`` box."""
    return np.stack([np.linalg.norm(volume.slice_points(k, rows, cols) - centre, axis=-1) for k in ks])


def head_radius(bone: np.ndarray, dist: np.ndarray) -> float | None:
    """The radius (mm) whose shell ``[r, r + SHELL_MM)`` holds the least bone: the joint space around
    the head; ``None`` when no shell has less bone than the head inside it (no head there)."""
    fractions = []
    for r in RADII_MM:
        shell = (dist >= r) & (dist < r + SHELL_MM)
        fractions.append(float(bone[shell].mean()) if shell.any() else 1.0)
    best = int(np.argmin(fractions))
    inside = bone[dist < RADII_MM[best]]
    if inside.size == 0 or inside.mean() <= fractions[best] + 0.2:
        return None
    return float(RADII_MM[best])


def femoral_head_layers(volume: Volume, heads: Mapping[str, Sequence[float]]) -> list[ImageLayer]:
    """One mask layer per located head (``"right femoral head"``, ``"left femoral head"``) on the
    axial slices it spans; a head whose surface cannot be read from the image is left out.

    Parameters
    ----------
    volume : Volume
        Axial CT (single-frame slices: a SEG references each slice by its SOP Instance UID).
    heads : mapping of str to sequence of float
        Side (``"R"``/``"L"``) -> head centre (patient mm), as femur_coronal located them.

    Returns
    -------
    list of ImageLayer
    """
    if not volume.datasets or len({volume.sop_instance_uid(k) for k in range(volume.array.shape[0])}) \
            != volume.array.shape[0]:
        return []  # a multi-frame image: its frames share one SOP Instance UID
    from screener.preprocess.sampling import VolumeSampler

    sampler = VolumeSampler(volume)
    n_k, n_j, n_i = volume.array.shape
    dk, dj, di = (abs(float(s)) for s in volume.spacing)
    reach = float(RADII_MM[-1] + SHELL_MM)
    layers = []
    for side, word in SIDES.items():
        if side not in heads:
            continue
        centre = np.asarray(heads[side], dtype=np.float64)
        k0, j0, i0 = sampler.to_index(centre[None, :])[0]
        ks = np.arange(max(0, int(np.floor(k0 - reach / dk))), min(n_k, int(np.ceil(k0 + reach / dk)) + 1))
        rows = slice(max(0, int(j0 - reach / dj)), min(n_j, int(j0 + reach / dj) + 1))
        cols = slice(max(0, int(i0 - reach / di)), min(n_i, int(i0 + reach / di) + 1))
        if len(ks) == 0 or rows.start >= rows.stop or cols.start >= cols.stop:
            continue
        dist = _distances(volume, centre, ks, rows, cols)
        bone = volume.array[ks, rows, cols] >= BONE_HU
        radius = head_radius(bone, dist)
        if radius is None:
            continue
        planes = {}
        for n, k in enumerate(ks):
            plane = np.zeros((n_j, n_i), dtype=bool)
            plane[rows, cols] = fill_holes(bone[n] & (dist[n] < radius))
            if plane.any():
                planes[volume.sop_instance_uid(int(k))] = plane
        if planes:
            layers.append(ImageLayer("mask", f"{word} femoral head", planes,
                                     method=f"bone (>= {BONE_HU:g} HU) within {radius:.1f} mm of the centre "
                                            "femur_coronal located, the radius read at the joint space"))
    return layers
