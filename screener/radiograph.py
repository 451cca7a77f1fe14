"""Radiograph and DXA-image preprocessing shared by training and inference.

Everything here is numpy / scipy / pydicom / Pillow (no torch): the same functions prepare the
virtual cohort's training arrays and the images a hospital sends, so that a model sees the same
kind of input in both.

Hip radiographs (Gu et al. 2023, BMD-GAN, seed ``004``)
------------------------------------------------------
* :func:`read_radiograph` -- a DX/CR dataset to a float image in ``[0, 1]``, bone bright: Modality
  LUT (:func:`stored_values`), then the VOI LUT (the VOI LUT sequence, or the first window; the
  percentiles when neither is usable), then the one inversion for ``MONOCHROME1``
  (:func:`presentation_inverted`); resampled to square pixels of ``pixel_mm``.

Header concepts, one function each (every radiograph and DXA reader uses these):

* :func:`pixel_spacing_mm` -- patient-plane spacing from ``PixelSpacing`` (with
  ``PixelSpacingCalibrationType``), ``ImagerPixelSpacing`` and
  ``EstimatedRadiographicMagnificationFactor`` (:func:`magnification_factor`); a
  :class:`RadiographError` naming what is missing when none is usable (absent, 0, negative,
  non-finite, not two numbers).  :func:`detector_pixel_spacing_mm` -- the detector-plane spacing
  a report states for the image.
* :func:`greyscale_problem` -- colour (``SamplesPerPixel`` 3, RGB, YBR) and other
  non-greyscale images, with the reason.
* :func:`patient_orientation` -- ``PatientOrientation`` when it is two valid direction codes (absent
  or empty: ``None``, tolerated); :func:`image_layout` -- the patient directions used.
* :func:`image_layout` / :func:`to_standard_view` -- where the patient's left and feet are in the
  stored pixels (``PatientOrientation``; failing that ``FieldOfViewRotation`` /
  ``FieldOfViewHorizontalFlip`` relative to a detector read out in the standard view; failing that
  the standard AP display is assumed) and the flips/transposition that give the standard view:
  columns towards the patient's **left** (so the patient's right hip is on the image's left), rows
  towards the **feet**.
* :func:`split_hips` -- the paper's section 3.1: "We first split them horizontally in half at the
  center.  Then the side with the target hip was reshaped to a predefined image size (256x512 in
  this experiment) by aligning the center of the image and cropping the region outside the image
  after resizing to fit the shorter edge".  The paper's 256x512 is width x height: a hip half of an
  AP pelvis (aspect ratio 0.880-1.228 w/h, so a half is ~0.44-0.61) is portrait, and Fig. 8 gives
  the image size as "512x256".  Here arrays are ``(H, W) = (512, 256)``
  (:data:`HIP_SHAPE`).  The left hip is mirrored so that both hips are presented alike (lateral
  side on the image's left, as a right hip in the standard view) -- the paper trains one model for
  both sides; the mirroring lets its horizontal-flip augmentation stay an augmentation.
* :func:`jpeg_recompress` -- the paper's robustness check (section 4.2.4): 8-bit quantisation and
  JPEG at a given quality (100, 50, 10).

DXA spine images (Nissinen et al. 2021, seed ``003``)
----------------------------------------------------
* :func:`spine_centerline` / :func:`dxa_centerline_crop` -- "The raw images of 300 pixels in width
  and 150-178 pixels in height were automatically cropped to an input size of 150x150 pixels.  This
  was done by searching the centre line of the spine and including 75 pixels on both sides".
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import structlog
from scipy import ndimage

log = structlog.get_logger(__name__)

__all__ = [
    "DXA_CROP",
    "DXA_PIXEL_MM",
    "HIP_PIXEL_MM",
    "PROJECTION_MODALITIES",
    "HIP_SHAPE",
    "ImageLayout",
    "Radiograph",
    "RadiographError",
    "detector_pixel_spacing_mm",
    "dxa_centerline_crop",
    "fit_to_shape",
    "greyscale_problem",
    "image_layout",
    "jpeg_recompress",
    "magnification_factor",
    "patient_orientation",
    "pixel_spacing_mm",
    "presentation_inverted",
    "read_radiograph",
    "resample_to_spacing",
    "spine_centerline",
    "split_hips",
    "stored_values",
    "to_standard_view",
    "voi_normalise",
]

#: One hip half as the network takes it, ``(rows, columns)`` -- the paper's "256x512" (W x H).
HIP_SHAPE = (512, 256)
#: Square pixel size (mm) the radiograph is resampled to before splitting.  A 430 x 350 mm
#: detector field at magnification ~1.15 is ~0.7 mm per pixel at 512 rows; the split's
#: cover-resize (as the paper) then rescales each half to :data:`HIP_SHAPE` anyway.
HIP_PIXEL_MM = 0.7
#: Side of Nissinen et al.'s DXA crop (pixels).
DXA_CROP = 150
#: Lunar Prodigy DXA pixel (row = cranio-caudal, column = lateral), mm (Nissinen, Fig. 6 caption).
DXA_PIXEL_MM = (1.05, 0.60)

_OPPOSITE = {"L": "R", "R": "L", "H": "F", "F": "H", "A": "P", "P": "A"}


class RadiographError(ValueError):
    """The dataset cannot be read as the radiograph a protocol needs (says what is missing)."""


# ---------------------------------------------------------------------------------------------
# intensity
# ---------------------------------------------------------------------------------------------
def _first(value: Any) -> float:
    """First value of a (possibly multi-valued) DICOM number."""
    if value is None:
        raise TypeError("no value")
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return float(value[0])
    return float(value)


def voi_normalise(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """Apply a DICOM VOI window and scale the output to ``[0, 1]``.

    PS3.3 C.11.2.1.2: ``LINEAR`` (the default), ``LINEAR_EXACT`` and ``SIGMOID``.

    Parameters
    ----------
    values : numpy.ndarray
        Modality-LUT output (e.g. rescaled stored values).
    center, width : float
        ``WindowCenter`` and ``WindowWidth``.
    function : str
        ``VOILUTFunction``.

    Returns
    -------
    numpy.ndarray
        ``float32`` in ``[0, 1]``.
    """
    x = np.asarray(values, dtype=np.float64)
    fn = (function or "LINEAR").upper()
    if fn == "SIGMOID":
        if width <= 0:
            raise RadiographError(f"WindowWidth must be positive for SIGMOID (got {width})")
        out = 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    elif fn == "LINEAR_EXACT":
        if width <= 0:
            raise RadiographError(f"WindowWidth must be positive for LINEAR_EXACT (got {width})")
        out = (x - (center - width / 2.0)) / width
    elif fn == "LINEAR":
        if width < 1:
            raise RadiographError(f"WindowWidth must be >= 1 for LINEAR (got {width})")
        if width == 1:
            out = (x > center - 0.5).astype(np.float64)
        else:
            out = (x - (center - 0.5)) / (width - 1.0) + 0.5
    else:
        raise RadiographError(f"unknown VOILUTFunction {function!r} (LINEAR, LINEAR_EXACT or SIGMOID)")
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _percentile_normalise(x: np.ndarray, lo: float = 1.0, hi: float = 99.0) -> np.ndarray:
    a, b = np.percentile(x, [lo, hi])
    if b <= a:
        return np.zeros_like(x, dtype=np.float32)
    return np.clip((x - a) / (b - a), 0.0, 1.0).astype(np.float32)


def _voi_window(ds: Any) -> tuple[float, float, str] | None:
    """First ``WindowCenter`` / ``WindowWidth`` / ``VOILUTFunction`` when usable, else ``None``."""
    try:
        center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    except Exception:  # noqa: BLE001 - absent, empty or not a number
        return None
    fn = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if not (math.isfinite(center) and math.isfinite(width)) or width < 1 or \
            fn not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        return None
    return center, width, fn


def _voi_lut_sequence(ds: Any, values: np.ndarray) -> np.ndarray | None:
    """The first VOI LUT sequence item applied and scaled to ``[0, 1]``, or ``None`` when unusable."""
    from pydicom.pixels import apply_voi_lut

    try:
        if "VOILUTSequence" not in ds or not len(ds.VOILUTSequence):
            return None
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        # a LUT is indexed by integers: the Modality LUT output is integral unless rescaled
        index = values.astype(np.int64) if np.array_equal(values, np.round(values)) else values
        out = np.asarray(apply_voi_lut(index, ds, index=0), dtype=np.float64)
    except Exception:  # noqa: BLE001 - a malformed LUT is ignored (the window is tried next)
        return None
    if not 1 <= bits <= 16 or not np.isfinite(out).all():
        return None
    return np.clip(out / float(2 ** bits - 1), 0.0, 1.0).astype(np.float32)


def stored_values(ds: Any) -> np.ndarray:
    """The stored pixels through the Modality LUT (rescale or LUT sequence), ``float64 (H, W)``.

    Raises
    ------
    RadiographError
        Undecodable pixel data, several frames or planes, non-finite rescaled values.
    """
    from pydicom.pixels import apply_modality_lut

    try:
        stored = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds
        raise RadiographError(f"cannot decode the pixel data ({type(exc).__name__}); send the image "
                              "uncompressed or in a standard transfer syntax") from exc
    if stored.ndim != 2:
        raise RadiographError(
            f"expected a single-frame greyscale image, got a pixel array of shape {stored.shape}")
    try:
        values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    except Exception as exc:  # noqa: BLE001 - e.g. a non-numeric RescaleSlope
        raise RadiographError("RescaleSlope / RescaleIntercept (or the Modality LUT) unusable; fix the "
                              "header") from exc
    if not np.isfinite(values).all():
        raise RadiographError("the Modality LUT (RescaleSlope / RescaleIntercept) gives non-finite "
                              "values; fix the header")
    return values


def _display_values(ds: Any, window: str) -> tuple[np.ndarray, str]:
    """Pixel data through the Modality and VOI LUTs, scaled to [0, 1] (not yet inverted).

    The VOI is the dataset's first VOI LUT sequence item, else its first window; a malformed one
    is skipped, and without a usable VOI the 1st-99th percentiles map to ``[0, 1]`` (the source
    says which: ``"voi_lut_sequence"``, ``"window"``, ``"percentile"``).
    """
    values = stored_values(ds)
    if window == "dataset":
        lut = _voi_lut_sequence(ds, values)
        if lut is not None:
            return lut, "voi_lut_sequence"
        win = _voi_window(ds)
        if win is not None:
            return voi_normalise(values, *win), "window"
    elif window != "percentile":
        raise ValueError(f"window must be 'dataset' or 'percentile' (got {window!r})")
    return _percentile_normalise(values), "percentile"


def presentation_inverted(ds: Any) -> bool:
    """Whether display values must be inverted to show bone bright.

    ``MONOCHROME1`` (minimum = white; DX requires ``PresentationLUTShape`` INVERSE there, which is
    the same single inversion, not a second one), or ``MONOCHROME2`` with ``PresentationLUTShape``
    INVERSE.
    """
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    return photometric == "MONOCHROME1" or (photometric == "MONOCHROME2" and shape == "INVERSE")


# ---------------------------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------------------------
#: Modalities whose images are projections (PS3.16 TID 1603 descriptors apply).
PROJECTION_MODALITIES = ("CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA")
#: Plausible pixel spacing of a radiograph or DXA image (mm); others count as unusable (a 1e6 mm
#: pixel would make the resampled image absurdly large).
SPACING_RANGE_MM = (0.01, 10.0)
#: ``PixelSpacingCalibrationType`` values that put ``PixelSpacing`` in the patient plane (PS3.3 C.8.11.4).
CALIBRATED_TYPES = ("GEOMETRY", "FIDUCIAL")


def _number_pair(ds: Any, keyword: str) -> tuple[tuple[float, float] | None, str]:
    """Two positive finite numbers within :data:`SPACING_RANGE_MM` from ``keyword``, or ``None`` and why not.

    Returns ``(None, "")`` when the attribute is absent or empty, ``(None, problem)`` when it holds
    something else than two positive finite numbers (the problem names the attribute, never quotes
    its value).
    """
    try:
        raw = ds.get(keyword, None)
    except Exception:  # noqa: BLE001 - an undecodable value is a problem, not a crash
        return None, f"{keyword} unreadable"
    if raw is None or (isinstance(raw, (str, bytes)) and not raw.strip()):
        return None, ""
    values = list(raw) if isinstance(raw, (list, tuple)) or type(raw).__name__ == "MultiValue" else [raw]
    if not values:
        return None, ""
    try:
        pair = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        return None, f"{keyword} is not two numbers"
    if len(pair) != 2:
        return None, f"{keyword} has {len(pair)} value(s), not two (row\\column mm)"
    if not all(math.isfinite(v) and v > 0 for v in pair):
        return None, f"{keyword} is not two positive finite numbers"
    if not all(SPACING_RANGE_MM[0] <= v <= SPACING_RANGE_MM[1] for v in pair):
        return None, (f"{keyword} is outside {SPACING_RANGE_MM[0]:g}-{SPACING_RANGE_MM[1]:g} mm, not a "
                      "radiograph's pixel")
    return (pair[0], pair[1]), ""


def magnification_factor(ds: Any) -> float | None:
    """``EstimatedRadiographicMagnificationFactor`` when it is a finite number >= 1, else ``None``.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset or mapping
        A projection radiograph's header.

    Returns
    -------
    float or None
        Source-to-detector over source-to-object distance (PS3.3 C.8.11.7); ``None`` when absent,
        empty, unreadable, below 1 or not finite.
    """
    try:
        value = float(_first(ds.get("EstimatedRadiographicMagnificationFactor", None)))
    except Exception:  # noqa: BLE001 - absent ("no value"), empty or not a number
        return None
    return value if math.isfinite(value) and value >= 1.0 else None


def pixel_spacing_mm(ds: Any) -> tuple[tuple[float, float], str]:
    """Pixel spacing (row, column) in mm in the patient plane, and which attributes gave it.

    In order (PS3.3 C.8.11.4 / 10.7.1.3, the Pixel Spacing of projection images):

    1. ``PixelSpacing`` with ``PixelSpacingCalibrationType`` GEOMETRY or FIDUCIAL: calibrated to
       the patient plane, used as is;
    2. ``ImagerPixelSpacing`` (the detector plane) divided by
       ``EstimatedRadiographicMagnificationFactor`` when that is a number >= 1;
    3. ``PixelSpacing`` without a calibration type that differs from ``ImagerPixelSpacing``: it
       was corrected somehow (the standard's reading), used as is;
    4. ``ImagerPixelSpacing`` alone: the detector plane (image ~10-20 % larger than the patient);
    5. ``PixelSpacing`` alone, without a calibration type (older CR): used as is, not divided by a
       magnification factor (it may already be corrected).

    An attribute that is present but not two positive finite numbers within
    :data:`SPACING_RANGE_MM` (``0``, ``"abc"``, ``"0.2\\"``, negative, NaN, 1e6) counts as absent;
    the next source is tried.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset or mapping
        A projection radiograph's (or DXA image's) header.

    Returns
    -------
    ((row_mm, column_mm), source) : tuple
        ``source`` names the attributes, e.g. ``"ImagerPixelSpacing / EstimatedRadiographicMagnificationFactor"``.

    Raises
    ------
    RadiographError
        When no attribute gives a usable spacing; the message says what each one lacked and what
        to send instead.
    """
    ps, ps_problem = _number_pair(ds, "PixelSpacing")
    ips, ips_problem = _number_pair(ds, "ImagerPixelSpacing")
    calibration = str(ds.get("PixelSpacingCalibrationType", "") or "").strip().upper()
    mag = magnification_factor(ds)
    if ps is not None and calibration in CALIBRATED_TYPES:
        return ps, f"PixelSpacing (calibrated: {calibration})"
    if ips is not None and mag is not None:
        return (ips[0] / mag, ips[1] / mag), "ImagerPixelSpacing / EstimatedRadiographicMagnificationFactor"
    if ps is not None and ips is not None and any(abs(a - b) > 1e-6 * b for a, b in zip(ps, ips)):
        return ps, "PixelSpacing (corrected, calibration type not stated)"
    if ips is not None:
        return ips, "ImagerPixelSpacing (detector plane: no magnification factor)"
    if ps is not None:
        return ps, "PixelSpacing (calibration not stated)"
    why = [ps_problem or "PixelSpacing absent", ips_problem or "ImagerPixelSpacing absent"]
    raise RadiographError(
        f"no usable pixel spacing ({'; '.join(why)}): the image scale is unknown, so nothing can be "
        "measured; send the image with ImagerPixelSpacing or PixelSpacing")


def detector_pixel_spacing_mm(ds: Any) -> tuple[float, float] | None:
    """Pixel spacing (row, column) in the detector plane, from whatever the header states.

    ``ImagerPixelSpacing`` when usable; else the patient-plane spacing of :func:`pixel_spacing_mm`
    times ``EstimatedRadiographicMagnificationFactor`` (1 when unknown).  ``None`` when the header
    gives no spacing at all.  This is what a report's image library states as the image's pixel
    spacing (PS3.16 TID 1603) when the source lacks ``ImagerPixelSpacing``.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset or mapping

    Returns
    -------
    tuple of float or None
    """
    ips, _ = _number_pair(ds, "ImagerPixelSpacing")
    if ips is not None:
        return ips
    try:
        (row, col), _source = pixel_spacing_mm(ds)
    except RadiographError:
        return None
    mag = magnification_factor(ds) or 1.0
    return row * mag, col * mag


def patient_orientation(ds: Any) -> tuple[str, str] | None:
    """``PatientOrientation`` as two direction codes (row direction, column direction), or ``None``.

    PS3.3 C.7.6.1.1.1: each value is one to three of ``L R A P H F``.  Absent, empty, one-valued
    or otherwise malformed values give ``None`` (the orientation is then not stated).

    Parameters
    ----------
    ds : pydicom.dataset.Dataset or mapping

    Returns
    -------
    tuple of str or None
        The direction of the rows (increasing column index) and of the columns (increasing row
        index), e.g. ``("L", "F")`` for the standard AP display.
    """
    try:
        po = ds.get("PatientOrientation", None)
    except Exception:  # noqa: BLE001
        return None
    if po is None:
        return None
    values = po.split("\\") if isinstance(po, str) else [str(v) for v in po]
    if len(values) != 2:
        return None
    out = tuple(v.strip().upper() for v in values)
    if not all(1 <= len(v) <= 3 and set(v) <= set(_OPPOSITE) for v in out):
        return None
    return out[0], out[1]


def greyscale_problem(ds: Any) -> str | None:
    """Why the image is not a single greyscale plane a radiograph protocol can read, or ``None``.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset or mapping

    Returns
    -------
    str or None
        E.g. ``"image is not greyscale (SamplesPerPixel 3, RGB): ..."``.
    """
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    try:
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except (TypeError, ValueError):
        samples = 1
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        kind = f"SamplesPerPixel {samples}, {photometric or 'PhotometricInterpretation missing'}"
        return (f"image is not greyscale ({kind}): a colour image or screenshot cannot be measured; "
                "send the original MONOCHROME1 / MONOCHROME2 image")
    return None


def resample_to_spacing(image: np.ndarray, spacing_mm: tuple[float, float], pixel_mm: float | tuple[float, float],
                        *, order: int = 1) -> np.ndarray:
    """Resample a 2-D image from ``spacing_mm`` (row, column) to ``pixel_mm``.

    Downsampling is preceded by a Gaussian anti-aliasing filter of ``sigma = (factor - 1) / 2``
    pixels per axis (``factor`` = output / input pixel size), as ``skimage.transform.resize``.

    Parameters
    ----------
    image : numpy.ndarray
        ``(H, W)`` image.
    spacing_mm : tuple of float
        Input pixel spacing (row, column), mm.
    pixel_mm : float or tuple of float
        Output pixel spacing (one value: square pixels).
    order : int
        Spline order of the interpolation (1: bilinear).

    Returns
    -------
    numpy.ndarray
        ``float32`` image; its extent in mm equals the input's (to one pixel).
    """
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError(f"resample_to_spacing needs a 2-D image, got shape {img.shape}")
    out_sp = (float(pixel_mm), float(pixel_mm)) if np.isscalar(pixel_mm) else tuple(map(float, pixel_mm))  # type: ignore[arg-type]
    factors = (out_sp[0] / float(spacing_mm[0]), out_sp[1] / float(spacing_mm[1]))
    if abs(factors[0] - 1) < 1e-6 and abs(factors[1] - 1) < 1e-6:
        return img.copy()
    sigma = tuple(max(0.0, (f - 1.0) / 2.0) for f in factors)
    if max(sigma) > 0:
        img = ndimage.gaussian_filter(img, sigma, mode="nearest")
    shape = tuple(max(1, int(round(n / f))) for n, f in zip(img.shape, factors))
    zoom = (shape[0] / img.shape[0], shape[1] / img.shape[1])
    out = ndimage.zoom(img, zoom, order=order, mode="nearest", grid_mode=True)
    return out[: shape[0], : shape[1]].astype(np.float32)


@dataclass(frozen=True)
class ImageLayout:
    """Where the patient's directions lie in the stored pixels.

    Attributes
    ----------
    column_toward : str
        Patient direction of increasing column index (``"L"``, ``"R"``, ``"H"``, ``"F"``,
        ``"A"``, ``"P"``), PS3.3 C.7.6.1.1.1.
    row_toward : str
        Patient direction of increasing row index.
    laterality : str or None
        ``ImageLaterality`` (``"R"``, ``"L"``, ``"B"``, ``"U"``) or ``None``.
    source : str
        Which attribute decided the directions: ``"PatientOrientation"``,
        ``"FieldOfView"`` or ``"assumed"``.
    """

    column_toward: str = "L"
    row_toward: str = "F"
    laterality: str | None = None
    source: str = "assumed"

    def __post_init__(self) -> None:
        for name in ("column_toward", "row_toward"):
            v = getattr(self, name)
            if v not in _OPPOSITE:
                raise ValueError(f"{name} must be one of L, R, H, F, A, P (got {v!r})")
        if _axis(self.column_toward) == _axis(self.row_toward):
            raise ValueError(f"rows and columns cannot both run along {_axis(self.row_toward)}")

    @property
    def is_frontal(self) -> bool:
        """True when the image plane is coronal (an AP or PA projection)."""
        return {_axis(self.column_toward), _axis(self.row_toward)} == {"LR", "HF"}

    @property
    def is_standard(self) -> bool:
        """True when the patient's right is on the image's left and the head at the top."""
        return self.column_toward == "L" and self.row_toward == "F"


def _axis(letter: str) -> str:
    return {"L": "LR", "R": "LR", "H": "HF", "F": "HF", "A": "AP", "P": "AP"}[letter]


def _rotate_layout(col: str, row: str, degrees: int) -> tuple[str, str]:
    """Directions after rotating the displayed image clockwise by ``degrees`` (multiple of 90)."""
    for _ in range((degrees // 90) % 4):
        # clockwise: content at screen-right moves to screen-down, screen-down to screen-left
        col, row = _OPPOSITE[row], col
    return col, row


def image_layout(ds: Any) -> ImageLayout:
    """Patient directions of the stored pixels of a radiograph.

    In order of trust:

    1. ``PatientOrientation`` (PS3.3 C.7.6.1.1.1): the first letter of each value (the dominant
       direction of an oblique one) gives the direction of increasing column, then of increasing row.
    2. ``FieldOfViewRotation`` (clockwise degrees) and ``FieldOfViewHorizontalFlip`` (PS3.3
       C.8.11.7): these are relative to the detector; the detector is assumed to read out in the
       standard view (patient's left towards increasing column, feet towards increasing row).
    3. Nothing: the standard AP display is assumed (also for a PA view, which is displayed as if
       facing the patient by convention).

    Parameters
    ----------
    ds : pydicom.dataset.Dataset or mapping
        The radiograph's header (pixel data not needed).

    Returns
    -------
    ImageLayout
    """
    get = ds.get
    laterality = _laterality(ds)
    po = patient_orientation(ds)
    if po is not None:
        col, row = po[0][0], po[1][0]
        if _axis(col) == _axis(row):
            raise RadiographError(f"PatientOrientation {po[0]}\\{po[1]} gives rows and columns along the "
                                  "same axis; fix the header")
        return ImageLayout(col, row, laterality, "PatientOrientation")
    stated = get("PatientOrientation", None)
    parts = stated.split("\\") if isinstance(stated, str) else list(stated or [])
    if len(parts) == 2 and all(str(v).strip() for v in parts):
        raise RadiographError("PatientOrientation is not made of L, R, H, F, A, P; fix or remove it")
    rot = get("FieldOfViewRotation", None)
    flip = str(get("FieldOfViewHorizontalFlip", "") or "").upper()
    if rot not in (None, "") or flip:
        try:
            degrees = int(round(float(rot or 0)))
        except (TypeError, ValueError, OverflowError):
            raise RadiographError("FieldOfViewRotation is not a number; fix or remove it") from None
        if degrees % 90:
            raise RadiographError(f"FieldOfViewRotation must be a multiple of 90 (got {degrees})")
        col, row = _rotate_layout("L", "F", degrees)
        if flip == "YES":
            col = _OPPOSITE[col]
        return ImageLayout(col, row, laterality, "FieldOfView")
    return ImageLayout("L", "F", laterality, "assumed")


def _laterality(ds: Any) -> str | None:
    """``ImageLaterality`` or (series) ``Laterality``: ``"R"``, ``"L"``, ``"B"``, ``"U"``, or ``None``
    when absent, empty or another value."""
    for keyword in ("ImageLaterality", "Laterality"):
        try:
            value = str(ds.get(keyword, "") or "").strip().upper()
        except Exception:  # noqa: BLE001
            continue
        if value in ("R", "L", "B", "U"):
            return value
    return None


def to_standard_view(image: np.ndarray, layout: ImageLayout) -> np.ndarray:
    """Flip/transpose an image so that columns run towards the patient's left and rows to the feet.

    Parameters
    ----------
    image : numpy.ndarray
        ``(H, W)`` stored pixels (or anything on the same grid, e.g. a DRR).
    layout : ImageLayout
        From :func:`image_layout`.

    Returns
    -------
    numpy.ndarray
        A view or copy in the standard AP display (patient's right on the image's left).

    Raises
    ------
    RadiographError
        When the image is not a frontal (coronal) projection, e.g. a lateral view.
    """
    if not layout.is_frontal:
        raise RadiographError(
            f"not a frontal projection: columns run towards {layout.column_toward}, rows towards "
            f"{layout.row_toward} (from {layout.source}); the hip protocol needs an AP or PA view")
    img = np.asarray(image)
    col, row = layout.column_toward, layout.row_toward
    if _axis(col) == "HF":
        img = img.T
        col, row = row, col
    if col == "R":
        img = img[:, ::-1]
    if row == "H":
        img = img[::-1, :]
    return img


@dataclass
class Radiograph:
    """A radiograph read for a protocol.

    Attributes
    ----------
    image : numpy.ndarray
        ``float32`` ``(H, W)`` in ``[0, 1]``, bone bright, on square ``pixel_mm`` pixels, in the
        stored orientation (see ``layout``).
    pixel_mm : float
        Pixel size of ``image`` (mm at the patient).
    layout : ImageLayout
        Patient directions of ``image``'s rows and columns.
    source_spacing_mm : tuple of float
        Pixel spacing (row, column) of the stored image.
    spacing_source : str
        ``"PixelSpacing"`` or ``"ImagerPixelSpacing"``.
    intensity_source : str
        ``"window"``, ``"voi_lut_sequence"`` or ``"percentile"``.
    inverted : bool
        Whether the display values were inverted (``MONOCHROME1``).
    sop_instance_uid : str
        For logging and provenance.
    """

    image: np.ndarray
    pixel_mm: float
    layout: ImageLayout
    source_spacing_mm: tuple[float, float]
    spacing_source: str
    intensity_source: str
    inverted: bool
    sop_instance_uid: str = ""


def read_radiograph(ds: Any, pixel_mm: float | None = HIP_PIXEL_MM, *, window: str = "dataset") -> Radiograph:
    """Read a DX/CR dataset into a float image in ``[0, 1]`` with bone bright.

    Steps: Modality LUT (``RescaleSlope``/``Intercept`` or the Modality LUT sequence); VOI LUT
    (first ``WindowCenter``/``WindowWidth`` with ``VOILUTFunction``, or the first VOI LUT sequence
    item) scaled to ``[0, 1]`` -- ``window="percentile"`` instead maps the 1st-99th percentile to
    ``[0, 1]``, and is used when the dataset has no VOI; inversion when ``PhotometricInterpretation``
    is ``MONOCHROME1`` (DX requires ``PresentationLUTShape`` INVERSE there: the same single
    inversion) or when a ``MONOCHROME2`` image carries ``PresentationLUTShape`` INVERSE; resampling
    to square pixels of ``pixel_mm``.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        A single-frame greyscale projection radiograph.
    pixel_mm : float or None
        Output pixel size (mm at the patient); ``None`` keeps the stored grid.
    window : {"dataset", "percentile"}
        Intensity normalisation (see above).

    Returns
    -------
    Radiograph

    Raises
    ------
    RadiographError
        Colour or multi-frame images, undecodable pixel data, missing pixel spacing, an unknown
        photometric interpretation.
    """
    problem = greyscale_problem(ds)
    if problem:
        raise RadiographError(problem)
    spacing, spacing_source = pixel_spacing_mm(ds)
    layout = image_layout(ds)
    values, intensity_source = _display_values(ds, window)
    inverted = presentation_inverted(ds)
    if inverted:
        values = 1.0 - values
    out_mm = float(pixel_mm) if pixel_mm is not None else None
    if out_mm is None:
        if abs(spacing[0] - spacing[1]) > 1e-6 * max(spacing):
            out_mm = min(spacing)
        else:
            out_mm = spacing[0]
    image = resample_to_spacing(values, spacing, out_mm)
    image = np.clip(image, 0.0, 1.0).astype(np.float32)
    uid = str(ds.get("SOPInstanceUID", "") or "")
    log.debug("radiograph.read", sop_instance_uid=uid, shape=image.shape, pixel_mm=out_mm,
              spacing_source=spacing_source, intensity_source=intensity_source, inverted=inverted,
              layout_source=layout.source)
    return Radiograph(image=image, pixel_mm=out_mm, layout=layout, source_spacing_mm=spacing,
                      spacing_source=spacing_source, intensity_source=intensity_source,
                      inverted=inverted, sop_instance_uid=uid)


# ---------------------------------------------------------------------------------------------
# hips
# ---------------------------------------------------------------------------------------------
def _crop_or_pad(image: np.ndarray, shape: tuple[int, int], fill: float) -> np.ndarray:
    """Centre crop / pad to ``shape`` (centres aligned)."""
    out = np.full(shape, fill, dtype=np.float32)
    h, w = image.shape
    th, tw = shape
    sy, sx = (h - th) // 2, (w - tw) // 2  # source offset (negative: pad)
    y0, x0 = max(sy, 0), max(sx, 0)
    y1, x1 = min(sy + th, h), min(sx + tw, w)
    out[y0 - sy:y1 - sy, x0 - sx:x1 - sx] = image[y0:y1, x0:x1]
    return out


def fit_to_shape(image: np.ndarray, shape: tuple[int, int] = HIP_SHAPE, *, mode: str = "cover",
                 fill: float | None = None) -> np.ndarray:
    """Bring an image to ``shape`` with the centres aligned.

    Parameters
    ----------
    image : numpy.ndarray
        ``(H, W)``.
    shape : tuple of int
        ``(rows, columns)``.
    mode : {"cover", "crop"}
        ``"cover"`` (the paper): resize uniformly so that the image covers ``shape`` ("resizing to
        fit the shorter edge"), then crop what lies outside.  ``"crop"``: no resizing, centre
        crop and pad with ``fill`` (keeps the physical scale set by :func:`read_radiograph`).
    fill : float, optional
        Padding value for ``"crop"`` (default: the image minimum).

    Returns
    -------
    numpy.ndarray
        ``float32`` array of ``shape``.
    """
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 2 or min(img.shape) < 1:
        raise ValueError(f"fit_to_shape needs a non-empty 2-D image, got shape {img.shape}")
    th, tw = int(shape[0]), int(shape[1])
    if mode == "cover":
        scale = max(th / img.shape[0], tw / img.shape[1])
        new = (max(th, int(math.ceil(img.shape[0] * scale - 1e-6))), max(tw, int(math.ceil(img.shape[1] * scale - 1e-6))))
        if new != img.shape:
            if scale < 1:
                img = ndimage.gaussian_filter(img, max(0.0, (1.0 / scale - 1.0) / 2.0), mode="nearest")
            img = ndimage.zoom(img, (new[0] / img.shape[0], new[1] / img.shape[1]), order=1,
                               mode="nearest", grid_mode=True)[: new[0], : new[1]]
        return _crop_or_pad(img, (th, tw), float(img.min()))
    if mode == "crop":
        return _crop_or_pad(img, (th, tw), float(img.min()) if fill is None else float(fill))
    raise ValueError(f"mode must be 'cover' or 'crop' (got {mode!r})")


def _as_layout(layout: ImageLayout | Any | None) -> ImageLayout:
    if layout is None:
        return ImageLayout()
    if isinstance(layout, ImageLayout):
        return layout
    if isinstance(layout, Radiograph):
        return layout.layout
    if hasattr(layout, "get"):
        return image_layout(layout)
    raise TypeError(f"layout must be an ImageLayout, a Radiograph or a DICOM dataset, not {type(layout).__name__}")


def split_hips(image: np.ndarray, layout: ImageLayout | Radiograph | Mapping[str, Any] | None = None, *,
               shape: tuple[int, int] = HIP_SHAPE, mode: str = "cover",
               mirror_left: bool = True) -> dict[str, np.ndarray]:
    """Split an AP pelvis image at the vertical midline into the patient's right and left hip.

    The image is first brought to the standard view (:func:`to_standard_view`: patient's right on
    the image's left, head up), split "horizontally in half at the center" (Gu et al. 2023,
    section 3.1), and each half is fitted to ``shape`` (:func:`fit_to_shape`, the paper's
    cover-resize and centre crop by default).  The left hip is mirrored (``mirror_left``) so that
    both hips are presented alike: lateral side on the image's left, pubic symphysis on the right.

    A unilateral image (``ImageLaterality`` ``R`` or ``L``) is not split: the whole image is that
    hip (mirrored when it is the left one).

    Apply the same call to a ground-truth DRR on the radiograph's grid to get its target halves.

    Parameters
    ----------
    image : numpy.ndarray
        ``(H, W)`` image in its stored orientation.
    layout : ImageLayout, Radiograph, pydicom Dataset or None
        Patient directions of ``image`` (``None``: standard AP display).
    shape : tuple of int
        Output ``(rows, columns)`` per hip (:data:`HIP_SHAPE`).
    mode : {"cover", "crop"}
        See :func:`fit_to_shape`.
    mirror_left : bool
        Mirror the left hip (default, as the paper presents both sides alike).

    Returns
    -------
    dict
        ``{"R": array, "L": array}`` (or one key for a unilateral image), ``float32`` of ``shape``.

    Raises
    ------
    RadiographError
        For a non-frontal (e.g. lateral) image.
    """
    lay = _as_layout(layout)
    std = np.asarray(to_standard_view(np.asarray(image), lay), dtype=np.float32)
    if std.ndim != 2 or std.shape[1] < 2:
        raise ValueError(f"split_hips needs a 2-D image at least 2 columns wide, got shape {std.shape}")
    if lay.laterality in ("R", "L"):
        halves = {lay.laterality: std}
    else:
        mid = std.shape[1] // 2
        # odd width: the centre column belongs to neither half
        halves = {"R": std[:, :mid], "L": std[:, std.shape[1] - mid:]}
    out: dict[str, np.ndarray] = {}
    for side, half in halves.items():
        if side == "L" and mirror_left:
            half = half[:, ::-1]
        out[side] = fit_to_shape(np.ascontiguousarray(half), shape, mode=mode)
    return out


# ---------------------------------------------------------------------------------------------
# JPEG robustness
# ---------------------------------------------------------------------------------------------
def jpeg_recompress(image: np.ndarray, quality: int, *, value_range: tuple[float, float] | None = None,
                    return_nbytes: bool = False) -> np.ndarray | tuple[np.ndarray, int]:
    """Quantise an image to 8 bits, JPEG-compress it at ``quality`` and decode it back.

    Gu et al. 2023, section 4.2.4 / Fig. 8: the trained model is evaluated on X-ray images
    "compressed by the JPEG lossy method" at qualities 100, 50 (PCC 0.880 -> 0.877) and 10.

    Parameters
    ----------
    image : numpy.ndarray
        ``(H, W)`` float image.
    quality : int
        JPEG quality, 1-100 (Pillow's scale, baseline 8-bit greyscale, 4:4:4).
    value_range : tuple of float, optional
        Range mapped to 0-255 (default: the image's min and max; ``(0, 1)`` for
        :func:`read_radiograph` output).
    return_nbytes : bool
        Also return the size of the JPEG stream (the paper plots PCC against file size).

    Returns
    -------
    numpy.ndarray or (numpy.ndarray, int)
        ``float32`` image in the input's range (and the byte count).
    """
    from PIL import Image

    q = int(quality)
    if not 1 <= q <= 100:
        raise ValueError(f"JPEG quality must be in 1..100 (got {quality})")
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 2:
        raise ValueError(f"jpeg_recompress needs a 2-D image, got shape {img.shape}")
    lo, hi = (float(img.min()), float(img.max())) if value_range is None else map(float, value_range)
    span = hi - lo if hi > lo else 1.0
    u8 = np.clip(np.round((img - lo) / span * 255.0), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(u8, mode="L").save(buf, format="JPEG", quality=q, subsampling=0)
    nbytes = buf.tell()
    buf.seek(0)
    back = np.asarray(Image.open(buf).convert("L"), dtype=np.float64)
    out = (back / 255.0 * span + lo).astype(np.float32)
    return (out, nbytes) if return_nbytes else out


# ---------------------------------------------------------------------------------------------
# DXA spine centre line
# ---------------------------------------------------------------------------------------------
def spine_centerline(image: np.ndarray, *, smooth_px: float = 2.0, min_rows: int = 10) -> tuple[float, float]:
    """The spine's centre line in a DXA spine image: ``column = slope * row + intercept``.

    Per row (the cranio-caudal scan line), after light smoothing, the bone pixels are those above
    the mid-level between the row's median (soft tissue) and its maximum; the row's centre is the
    intensity-weighted centroid of the connected run containing the maximum.  A straight line is
    fitted to the row centres by least squares, twice: the second fit drops rows whose residual
    exceeds 3 x the median absolute residual (rows through artefacts or the pelvis).

    Parameters
    ----------
    image : numpy.ndarray
        ``(H, W)`` DXA image (bone bright, e.g. the BMD image), spine roughly vertical.
    smooth_px : float
        Gaussian smoothing (pixels) before the search.
    min_rows : int
        Fewest rows with a detectable spine.

    Returns
    -------
    (slope, intercept) : tuple of float
        Column of the centre line as a function of the row index.

    Raises
    ------
    ValueError
        When fewer than ``min_rows`` rows show a bright structure.
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 2:
        raise ValueError(f"spine_centerline needs a 2-D image, got shape {img.shape}")
    sm = ndimage.gaussian_filter(img, smooth_px, mode="nearest") if smooth_px > 0 else img
    rows, cols = [], []
    cidx = np.arange(sm.shape[1], dtype=np.float64)
    global_span = float(sm.max() - sm.min())
    for r in range(sm.shape[0]):
        line = sm[r]
        base, peak = float(np.median(line)), float(line.max())
        if peak - base <= 0.1 * global_span:
            continue
        above = line > 0.5 * (base + peak)
        labels, _ = ndimage.label(above)
        run = labels == labels[int(np.argmax(line))]
        w = (line - base) * run
        if w.sum() <= 0:
            continue
        rows.append(r)
        cols.append(float((w * cidx).sum() / w.sum()))
    if len(rows) < min_rows:
        raise ValueError(
            f"found the spine on only {len(rows)} rows (need {min_rows}); is this a DXA spine image "
            "with bone bright?")
    r_arr, c_arr = np.asarray(rows, float), np.asarray(cols, float)
    slope, intercept = np.polyfit(r_arr, c_arr, 1)
    resid = np.abs(c_arr - (slope * r_arr + intercept))
    mad = float(np.median(resid))
    keep = resid <= max(3.0 * mad, 1.0)
    if keep.sum() >= min_rows and not keep.all():
        slope, intercept = np.polyfit(r_arr[keep], c_arr[keep], 1)
    return float(slope), float(intercept)


def dxa_centerline_crop(bmd_image: np.ndarray, *, size: int = DXA_CROP,
                        pixel_spacing_mm: tuple[float, float] | None = None,
                        target_spacing_mm: tuple[float, float] = DXA_PIXEL_MM,
                        fill: float | None = None, return_center: bool = False
                        ) -> np.ndarray | tuple[np.ndarray, tuple[float, float]]:
    """Nissinen et al.'s 150x150 crop around the spine centre line of a DXA spine image.

    The crop spans ``size // 2`` columns on both sides of the centre line's column at the image's
    middle row (:func:`spine_centerline`), and the central ``size`` rows (the paper's raw images are
    150-178 rows high; shorter images are padded with ``fill``).  The spine is not straightened: a
    curved or tilted spine stays so, which is what the scoliosis task sees.

    Parameters
    ----------
    bmd_image : numpy.ndarray
        ``(H, W)`` DXA image, bone bright.
    size : int
        Side of the square crop (paper: 150).
    pixel_spacing_mm : tuple of float, optional
        (row, column) spacing of ``bmd_image``; when given and different from
        ``target_spacing_mm`` the image is first resampled to it (the paper's scanner pixel,
        1.05 x 0.60 mm), so that 150 pixels cover the same anatomy.
    target_spacing_mm : tuple of float
        See above.
    fill : float, optional
        Padding value (default: the image's minimum).
    return_center : bool
        Also return the crop centre ``(row, column)`` in the (resampled) input.

    Returns
    -------
    numpy.ndarray or (numpy.ndarray, tuple)
        ``float32`` ``(size, size)`` crop (and its centre).
    """
    img = np.asarray(bmd_image, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError(f"dxa_centerline_crop needs a 2-D image, got shape {img.shape}")
    if pixel_spacing_mm is not None and any(
            abs(a - b) > 1e-6 for a, b in zip(pixel_spacing_mm, target_spacing_mm)):
        img = resample_to_spacing(img, pixel_spacing_mm, target_spacing_mm)
    slope, intercept = spine_centerline(img)
    mid_row = (img.shape[0] - 1) / 2.0
    c_col = slope * mid_row + intercept
    half = size / 2.0
    x0 = int(round(c_col - half + 0.5))  # columns x0 .. x0+size-1, centre at x0 + (size-1)/2
    y0 = int(round(mid_row - half + 0.5))
    pad = float(img.min()) if fill is None else float(fill)
    out = np.full((size, size), pad, dtype=np.float32)
    ys0, xs0 = max(y0, 0), max(x0, 0)
    ys1, xs1 = min(y0 + size, img.shape[0]), min(x0 + size, img.shape[1])
    if ys1 > ys0 and xs1 > xs0:
        out[ys0 - y0:ys1 - y0, xs0 - x0:xs1 - x0] = img[ys0:ys1, xs0:xs1]
    if return_center:
        return out, (float(mid_row), float(c_col))
    return out
