"""Preprocessing of the ``dxa_spine`` protocol (Nissinen et al. 2021, seed ``003``).

One function, :func:`dxa_spine_input`, turns a lumbar-spine DXA image (a pydicom dataset) into the
network input: the paper's 150 x 150 crop around the spine centre line ("searching the centre line
of the spine and including 75 pixels on both sides", section 2.2), as a ``(1, 150, 150)``
``float32`` array.  The training data set builder (:mod:`training.datasets.dxa_spine`) and the
protocol (:mod:`screener.protocols.dxa_spine.protocol`) both call it, so training and inference see
identical tensors.

Steps
-----
1. Intensity: the Modality LUT (``RescaleSlope`` / ``RescaleIntercept``) gives bone areal density
   in g/cm^2 when the image is calibrated (``Modality = BMD`` or ``RescaleType = G/CM2``, as the
   virtual cohort and the Lunar export the paper used).  An uncalibrated export (e.g. Modality OT
   without a g/cm^2 rescale) is mapped from its 1st-99th percentile to 0-:data:`UNCALIBRATED_SPAN`
   g/cm^2 (``MONOCHROME1`` inverted first) and reported as uncalibrated.
2. Resampling to the paper's scanner pixel, 1.05 x 0.60 mm (row x column), when the image's
   ``PixelSpacing`` differs, so that 150 pixels cover the same anatomy.
3. :func:`screener.radiograph.dxa_centerline_crop`: 75 columns either side of the spine centre
   line at the middle row, the central 150 rows (padded with 0 g/cm^2, bone-free).
4. Scaling: ``clip(g/cm^2, -0.5, 3.0) / 1.5`` (:data:`VALUE_SCALE`), vertebral bodies ~0.5-1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from screener.radiograph import (DXA_CROP, DXA_PIXEL_MM, RadiographError, dxa_centerline_crop,
                                 greyscale_problem, pixel_spacing_mm, presentation_inverted,
                                 stored_values)

__all__ = ["CLIP_G_CM2", "DxaInput", "UNCALIBRATED_SPAN", "VALUE_SCALE", "dxa_image_g_cm2",
           "dxa_spine_input", "preprocessing_constants"]

#: g/cm^2 per unit of network input.
VALUE_SCALE = 1.5
#: g/cm^2 clip before scaling.
CLIP_G_CM2 = (-0.5, 3.0)
#: g/cm^2 the 99th percentile of an uncalibrated export is mapped to.
UNCALIBRATED_SPAN = 1.6


@dataclass(frozen=True)
class DxaInput:
    """The network input of one DXA spine image and where it came from.

    Attributes
    ----------
    array : numpy.ndarray
        ``(1, 150, 150)`` float32 network input.
    crop_g_cm2 : numpy.ndarray
        ``(150, 150)`` crop in g/cm^2 (before scaling), on the 1.05 x 0.60 mm grid.
    box_px : tuple of float
        Crop rectangle in the *source* image's pixel-edge coordinates
        ``(col0, row0, col1, row1)`` (DICOM SCOORD convention: the top-left pixel spans 0-1),
        clipped to the image.
    source_shape : tuple of int
        ``(rows, columns)`` of the source image.
    source_spacing_mm : tuple of float
        ``(row, column)`` pixel spacing of the source image.
    calibrated : bool
        True when the pixel values were g/cm^2 through the Modality LUT.
    image_g_cm2 : numpy.ndarray
        The whole source image in g/cm^2 (source grid), for overlays.
    crop_origin_mm : tuple of float
        ``(row, column)`` mm of the crop's top-left pixel edge from the image's top-left edge
        (crop pixel ``[r, c]`` spans ``origin + [r, c] * (1.05, 0.60)`` mm).
    """

    array: np.ndarray
    crop_g_cm2: np.ndarray
    box_px: tuple[float, float, float, float]
    source_shape: tuple[int, int]
    source_spacing_mm: tuple[float, float]
    calibrated: bool
    image_g_cm2: np.ndarray
    crop_origin_mm: tuple[float, float] = (0.0, 0.0)


def preprocessing_constants() -> dict[str, Any]:
    """The constants of :func:`dxa_spine_input`, for the model card."""
    return {"crop_px": DXA_CROP, "pixel_mm_row_col": list(DXA_PIXEL_MM),
            "value": "clip(g/cm2, -0.5, 3.0) / 1.5", "value_scale_g_cm2": VALUE_SCALE,
            "clip_g_cm2": list(CLIP_G_CM2), "crop_fill_g_cm2": 0.0,
            "centre_line": "screener.radiograph.spine_centerline at the middle row, +/- 75 columns",
            "uncalibrated_exports": f"1st-99th percentile -> 0-{UNCALIBRATED_SPAN} g/cm2"}


def _spacing(ds: Any) -> tuple[float, float]:
    try:
        return pixel_spacing_mm(ds)[0]
    except RadiographError as exc:
        raise RadiographError(f"{exc}; the DXA image cannot be scaled to the 1.05 x 0.60 mm grid the "
                              "model was trained on") from None


def dxa_image_g_cm2(ds: Any) -> tuple[np.ndarray, bool]:
    """The DXA image as bone areal density (g/cm^2) and whether it is calibrated.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        Single-frame greyscale DXA spine image.

    Returns
    -------
    image : numpy.ndarray
        ``float32 (rows, columns)``.
    calibrated : bool

    Raises
    ------
    RadiographError
        Colour, multi-frame or undecodable pixel data.
    """
    problem = greyscale_problem(ds)
    if problem:
        raise RadiographError(f"{problem} (a DXA report screenshot cannot be analysed)")
    values = stored_values(ds)
    rescale_type = str(ds.get("RescaleType", "") or "").upper().replace(" ", "")
    calibrated = rescale_type in ("G/CM2", "G/CM^2") or (
        str(ds.get("Modality", "")).upper() == "BMD" and "RescaleSlope" in ds)
    if not calibrated:
        if presentation_inverted(ds):  # MONOCHROME1 (or an INVERSE presentation LUT): bone bright
            values = values.max() - values
        lo, hi = np.percentile(values, [1.0, 99.0])
        values = (values - lo) / (hi - lo) * UNCALIBRATED_SPAN if hi > lo else np.zeros_like(values)
    return values.astype(np.float32), bool(calibrated)


def dxa_spine_input(ds: Any) -> DxaInput:
    """DXA spine image -> Nissinen et al.'s 150 x 150 centre-line crop (network input).

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        A lumbar-spine DXA image (Modality BMD, or an OT export) with ``PixelSpacing``.

    Returns
    -------
    DxaInput
        ``array`` is the ``(1, 150, 150)`` float32 input; ``box_px`` the crop on the source image.

    Raises
    ------
    RadiographError
        When the image cannot be read, has no pixel spacing, or shows no spine.
    """
    image, calibrated = dxa_image_g_cm2(ds)
    spacing = _spacing(ds)
    try:
        crop, (mid_row, c_col) = dxa_centerline_crop(image, pixel_spacing_mm=spacing, fill=0.0,
                                                     return_center=True)
    except ValueError as exc:
        raise RadiographError(f"no spine found in the DXA image: {exc}") from exc
    # crop -> source coordinates: the resampling scales pixel edges by the zoom factors
    zr = spacing[0] / DXA_PIXEL_MM[0]
    zc = spacing[1] / DXA_PIXEL_MM[1]
    half = DXA_CROP / 2.0
    x0 = int(round(c_col - half + 0.5))
    y0 = int(round(mid_row - half + 0.5))
    rows, cols = image.shape
    box = (float(np.clip(x0 / zc, 0, cols)), float(np.clip(y0 / zr, 0, rows)),
           float(np.clip((x0 + DXA_CROP) / zc, 0, cols)), float(np.clip((y0 + DXA_CROP) / zr, 0, rows)))
    x = np.clip(crop, *CLIP_G_CM2) / VALUE_SCALE
    return DxaInput(array=x[None].astype(np.float32), crop_g_cm2=crop.astype(np.float32), box_px=box,
                    source_shape=(int(rows), int(cols)), source_spacing_mm=spacing, calibrated=calibrated,
                    image_g_cm2=image, crop_origin_mm=(y0 * DXA_PIXEL_MM[0], x0 * DXA_PIXEL_MM[1]))
