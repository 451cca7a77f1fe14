"""Domain types shared by the pipeline operators.

These are the values that flow between the steps of the pipeline
(ingest -> store -> complete -> load -> route -> protocol -> report -> export).
They hold no behaviour beyond small conveniences, so that every module can
import them without pulling in networking, torch or highdicom.

Coordinate conventions
----------------------
All patient coordinates are DICOM patient coordinates (LPS, millimetres):
+x towards the patient's left, +y posterior, +z superior (head).
A :class:`Volume` array is indexed ``[k, j, i]`` = ``[slice, row, column]``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset


@dataclass
class Volume:
    """A 3-D image in Hounsfield units built from one CT series.

    Attributes
    ----------
    array : numpy.ndarray
        ``float32`` HU values, shape ``(n_slices, rows, columns)``; slices are
        sorted by position along the slice normal (ascending), not by
        InstanceNumber.
    spacing : tuple of float
        ``(slice_spacing, row_spacing, column_spacing)`` in mm, i.e. the
        distance between slices, between rows (PixelSpacing[0]) and between
        columns (PixelSpacing[1]).
    origin : numpy.ndarray
        Patient position (mm) of the centre of voxel ``[0, 0, 0]``
        (ImagePositionPatient of the first slice).
    direction : numpy.ndarray
        ``3 x 3`` matrix whose columns are the unit patient-space directions of
        increasing column index ``i``, row index ``j`` and slice index ``k``.
    datasets : list of pydicom.dataset.Dataset
        Header of each slice (pixel data removed), same order as ``array``.
    paths : list of pathlib.Path
        File of each slice, same order as ``array``.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: np.ndarray
    direction: np.ndarray
    datasets: list[Dataset] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def index_to_patient(self, k: float, j: float, i: float) -> np.ndarray:
        """Return the patient coordinate (mm) of a (possibly fractional) voxel index."""
        dk, dj, di = self.spacing
        offs = np.array([i * di, j * dj, k * dk], dtype=float)
        return np.asarray(self.origin, float) + np.asarray(self.direction, float) @ offs

    def slice_points(self, k: float, rows: slice = slice(None), cols: slice = slice(None)) -> np.ndarray:
        """Patient coordinates (mm) of the pixel centres of slice ``k`` (``rows`` x ``cols`` of it):
        ``(n_rows, n_cols, 3)`` float64, :meth:`index_to_patient` of every pixel at once."""
        dk, dj, di = self.spacing
        n_rows, n_cols = self.array.shape[1:]
        jj = np.arange(n_rows, dtype=np.float64)[rows]
        ii = np.arange(n_cols, dtype=np.float64)[cols]
        d = np.asarray(self.direction, dtype=np.float64)
        start = np.asarray(self.origin, dtype=np.float64) + d[:, 2] * (k * dk)
        return (start[None, None, :] + (jj * dj)[:, None, None] * d[:, 1]
                + (ii * di)[None, :, None] * d[:, 0])

    def slice_positions(self) -> np.ndarray:
        """Return the patient-space centre of each slice (``n_slices x 3``)."""
        return np.array([self.index_to_patient(k, 0, 0) for k in range(self.array.shape[0])])

    def sop_instance_uid(self, k: int) -> str:
        """SOPInstanceUID of slice ``k`` (``""`` when the volume has no headers)."""
        return str(self.datasets[k].SOPInstanceUID) if self.datasets else ""

    def sop_class_uid(self, k: int) -> str:
        """SOPClassUID of slice ``k`` (from the file meta when the dataset lacks it; ``""`` without headers)."""
        if not self.datasets:
            return ""
        ds = self.datasets[k]
        uid = str(ds.get("SOPClassUID", "") or "")
        if not uid and hasattr(ds, "file_meta"):
            uid = str(ds.file_meta.get("MediaStorageSOPClassUID", ""))
        return uid

    @property
    def is_axial(self) -> bool:
        """True when the slice normal is within 10 degrees of the patient z axis."""
        normal = np.asarray(self.direction, float)[:, 2]
        return abs(normal[2]) >= np.cos(np.deg2rad(10.0))


@dataclass
class VertebraLocation:
    """Where one vertebra lies in a :class:`Volume`.

    Attributes
    ----------
    label : str
        Level name, e.g. ``"L1"``.
    slice_range : tuple of int
        First and last slice index (inclusive) of the vertebral body.
    z_range_mm : tuple of float
        Inferior and superior patient z (mm) of the vertebral body.
    centroid_index : tuple of float
        ``(k, j, i)`` centroid of the vertebral body (trabecular part).
    centroid_mm : tuple of float
        Patient coordinate (mm) of that centroid.
    confidence : float
        0-1; how sure the localizer is of this level label.
    """

    label: str
    slice_range: tuple[int, int]
    z_range_mm: tuple[float, float]
    centroid_index: tuple[float, float, float]
    centroid_mm: tuple[float, float, float]
    confidence: float


@dataclass
class SpineLocalization:
    """Result of a spine localizer.

    ``vertebrae`` maps labels (``"T12"``, ``"L1"``, ...) to locations; when the
    localizer could not find or label the spine ``vertebrae`` may be empty and
    ``reason`` says why (e.g. ``"L1 not in view"``).
    """

    vertebrae: dict[str, VertebraLocation]
    method: str
    reason: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def get(self, label: str) -> VertebraLocation | None:
        """Return the location of ``label`` or ``None``."""
        return self.vertebrae.get(label)
