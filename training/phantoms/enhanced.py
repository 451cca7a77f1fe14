"""Classic cohort CT series -> one multi-frame file: Legacy Converted Enhanced CT or Enhanced CT.

Archives and modern scanners store CT as multi-frame objects; the screener
must give the same findings for them as for the classic single-frame series
(issue 14, item 3). These converters make that test data from a rendered
cohort series (:func:`training.phantoms.ct.render_ct`):

* :func:`to_legacy_converted` -- Legacy Converted Enhanced CT Image Storage
  (1.2.840.10008.5.1.4.1.1.2.2), made by highdicom's
  :class:`highdicom.legacy.LegacyConvertedEnhancedCTImage`. Geometry and
  rescale go into the Plane Position / Plane Orientation / Pixel Measures /
  Pixel Value Transformation functional groups; attributes without an
  enhanced home -- ``KVP`` among them -- go into
  UnassignedSharedConvertedAttributesSequence (or the per-frame one when they
  differ between slices). ``contrast_unassigned=True`` also moves
  ``ContrastBolusAgent`` / ``ContrastBolusRoute`` there (some converters do).
* :func:`to_enhanced_ct` -- Enhanced CT Image Storage
  (1.2.840.10008.5.1.4.1.1.2.1): the Legacy Converted object restructured the
  way a scanner writes it: ``KVP`` in the shared CT X-Ray Details functional
  group, collimation / data collection diameter in CT Acquisition Details,
  kernel and reconstruction diameter in CT Reconstruction, tube current and
  mAs in CT Exposure, the agent in the Enhanced Contrast/Bolus module with a
  shared Contrast/Bolus Usage group; no unassigned sequences.

Pixel data are copied unchanged, so both objects decode to the classic
series' stored values (same HU, same geometry).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import EnhancedCTImageStorage

from training.phantoms.ct import uid

__all__ = ["LEGACY_CONVERTED_CT", "ENHANCED_CT", "to_legacy_converted", "to_enhanced_ct",
           "write_multiframe"]

LEGACY_CONVERTED_CT = "1.2.840.10008.5.1.4.1.1.2.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"

#: SNOMED-CT code for the generic iodinated agent (the Enhanced Contrast/Bolus module needs a code)
_IODINE = ("C-B0322", "SRT", "Iodine and iodine compound")
#: intravenous route
_IV = ("G-D101", "SRT", "Intravenous route")


def _unassigned(item: Dataset, kw: str) -> Dataset | None:
    seq = item.get(kw)
    return seq[0] if seq else None


def to_legacy_converted(datasets: Sequence[Dataset], *, series_uid: str | None = None,
                        sop_uid: str | None = None, series_number: int = 102,
                        contrast_unassigned: bool = False) -> Dataset:
    """Convert a classic CT series into one Legacy Converted Enhanced CT Image.

    Parameters
    ----------
    datasets : sequence of pydicom.dataset.Dataset
        CT Image Storage instances of one series, with pixel data (the order
        does not matter: highdicom sorts them by position).
    series_uid, sop_uid : str, optional
        Default: deterministic UIDs derived from the source series UID.
    series_number : int
    contrast_unassigned : bool
        Move ``ContrastBolusAgent`` / ``ContrastBolusRoute`` from the top level
        (where highdicom puts the Contrast/Bolus module) into
        UnassignedSharedConvertedAttributesSequence.

    Returns
    -------
    pydicom.dataset.Dataset
        With file meta; ``KVP`` and ``SliceThickness`` are not at the top level.
    """
    from highdicom.legacy import LegacyConvertedEnhancedCTImage

    src_series = str(datasets[0].SeriesInstanceUID)
    lce = LegacyConvertedEnhancedCTImage(
        [copy.deepcopy(d) for d in datasets],
        series_instance_uid=series_uid or uid("lce-series", src_series),
        series_number=series_number,
        sop_instance_uid=sop_uid or uid("lce-sop", src_series),
        instance_number=1)
    shared = lce.SharedFunctionalGroupsSequence[0]
    if contrast_unassigned:
        moved = {kw: lce.get(kw) for kw in ("ContrastBolusAgent", "ContrastBolusRoute") if kw in lce}
        if moved:
            if not shared.get("UnassignedSharedConvertedAttributesSequence"):
                shared.UnassignedSharedConvertedAttributesSequence = DicomSequence([Dataset()])
            un = shared.UnassignedSharedConvertedAttributesSequence[0]
            for kw, value in moved.items():
                setattr(un, kw, value)
                delattr(lce, kw)
    for kw in ("KVP", "SliceThickness", "ImageOrientationPatient", "ImagePositionPatient",
               "PixelSpacing", "RescaleSlope", "RescaleIntercept"):
        assert kw not in lce, f"highdicom left {kw} at the top level"
    return lce


def _code_item(code: tuple[str, str, str]) -> Dataset:
    it = Dataset()
    it.CodeValue, it.CodingSchemeDesignator, it.CodeMeaning = code
    return it


def _move(src: Dataset | None, dst: Dataset, keywords: Sequence[str]) -> None:
    if src is None:
        return
    for kw in keywords:
        if kw in src:
            setattr(dst, kw, src[kw].value)
            delattr(src, kw)


def to_enhanced_ct(datasets: Sequence[Dataset], *, series_uid: str | None = None,
                   sop_uid: str | None = None, series_number: int = 103) -> Dataset:
    """Convert a classic CT series into one Enhanced CT Image with scanner-like functional groups.

    ``KVP`` lives only in SharedFunctionalGroupsSequence > CTXRayDetailsSequence;
    ``SliceThickness`` only in Pixel Measures; the agent (when the source has
    ``ContrastBolusAgent``) only in ContrastBolusAgentSequence (its CodeMeaning
    is the source's agent text) and the shared ContrastBolusUsageSequence.

    Parameters
    ----------
    datasets : sequence of pydicom.dataset.Dataset
        CT Image Storage instances of one series, with pixel data.
    series_uid, sop_uid : str, optional
        Default: deterministic UIDs derived from the source series UID.
    series_number : int

    Returns
    -------
    pydicom.dataset.Dataset
        With file meta.
    """
    src_series = str(datasets[0].SeriesInstanceUID)
    ds = to_legacy_converted(datasets, series_uid=series_uid or uid("ect-series", src_series),
                             sop_uid=sop_uid or uid("ect-sop", src_series),
                             series_number=series_number)
    first = datasets[0]
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    shared = ds.SharedFunctionalGroupsSequence[0]
    un = _unassigned(shared, "UnassignedSharedConvertedAttributesSequence") or Dataset()

    _ct_shared_groups(shared, un, first, src_series)
    _contrast_groups(ds, shared)
    _drop_conversion_groups(ds, shared, first)

    # CT Image module / Enhanced General Equipment / Acquisition attributes of the Enhanced IOD
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]  # value 3 as Enhanced CT scanners write it
    ft = _unassigned(shared, "CTImageFrameTypeSequence")
    if ft is not None:
        ft.FrameType = list(ds.ImageType)
    ds.AcquisitionNumber = first.get("AcquisitionNumber", 1)
    ds.AcquisitionDuration = 5.0
    ds.ManufacturerModelName = first.get("ManufacturerModelName", "virtual")
    ds.DeviceSerialNumber = first.get("DeviceSerialNumber", "0000")
    ds.SoftwareVersions = first.get("SoftwareVersions", "screener virtual cohort")
    ds.ContentQualification = "PRODUCT"
    ds.ImageComments = first.get("ImageComments", "")
    ds.IsocenterPosition = [0.0, 0.0, 0.0]
    ds.LossyImageCompression = "00"
    if "ReferencedSeriesSequence" in ds:  # Legacy Converted's Common Instance Reference to the source
        delattr(ds, "ReferencedSeriesSequence")
    if "ContributingEquipmentSequence" in ds:
        delattr(ds, "ContributingEquipmentSequence")
    return ds


def _ct_shared_groups(shared: Dataset, un: Dataset, first: Dataset, src_series: str) -> None:
    """The Enhanced CT shared functional groups (X-ray details, acquisition, reconstruction, exposure,
    table dynamics, irradiation event, geometry), moving their attributes out of ``un``."""
    # CT X-Ray Details: the only home of KVP in the Enhanced CT IOD
    xr = Dataset()
    _move(un, xr, ["KVP"])
    if "KVP" not in xr:
        raise ValueError("source series has no KVP shared by all slices")
    xr.FocalSpots = first.get("FocalSpots", "1.2")
    xr.FilterType = first.get("FilterType", "FLAT")
    xr.FilterMaterial = "ALUMINUM"
    shared.CTXRayDetailsSequence = DicomSequence([xr])

    acq = Dataset()
    _move(un, acq, ["DataCollectionDiameter"])
    acq.RotationDirection = "CW"
    acq.RevolutionTime = 0.5
    acq.SingleCollimationWidth = 0.625
    acq.TotalCollimationWidth = 40.0
    acq.TableHeight = first.get("TableHeight", "150")
    acq.GantryDetectorTilt = first.get("GantryDetectorTilt", "0")
    shared.CTAcquisitionDetailsSequence = DicomSequence([acq])

    at = Dataset()
    at.AcquisitionType = "SPIRAL"
    at.ConstantVolumeFlag = "NO"
    at.FluoroscopyFlag = "NO"
    shared.CTAcquisitionTypeSequence = DicomSequence([at])

    rec = Dataset()
    _move(un, rec, ["ConvolutionKernel", "ReconstructionDiameter"])
    rec.ReconstructionAlgorithm = "FILTER_BACK_PROJ"
    rec.ConvolutionKernelGroup = "SOFT_TISSUE"
    ps = [float(v) for v in first.PixelSpacing]
    rec.ReconstructionPixelSpacing = ps
    rec.ReconstructionAngle = 360.0
    rec.ImageFilter = "NONE"
    shared.CTReconstructionSequence = DicomSequence([rec])

    exp = Dataset()
    mas = float(un.get("Exposure", first.get("Exposure", 100)) or 100)
    ma = float(un.get("XRayTubeCurrent", first.get("XRayTubeCurrent", 200)) or 200)
    for kw in ("Exposure", "XRayTubeCurrent", "ExposureTime"):
        if kw in un:
            delattr(un, kw)
    exp.ExposureInmAs = mas
    exp.XRayTubeCurrentInmA = ma
    exp.ExposureTimeInms = 1000.0 * mas / ma if ma else 500.0
    exp.ExposureModulationType = "NONE"
    shared.CTExposureSequence = DicomSequence([exp])

    dyn = Dataset()
    dyn.TableSpeed = 80.0
    dyn.TableFeedPerRotation = 40.0
    dyn.SpiralPitchFactor = 1.0
    shared.CTTableDynamicsSequence = DicomSequence([dyn])
    irr = Dataset()
    irr.IrradiationEventUID = uid("ect-irradiation", src_series)
    shared.IrradiationEventIdentificationSequence = DicomSequence([irr])

    geo = Dataset()
    geo.DistanceSourceToDetector = 1085.6
    geo.DistanceSourceToDataCollectionCenter = 595.0
    shared.CTGeometrySequence = DicomSequence([geo])


def _contrast_groups(ds: Dataset, shared: Dataset) -> None:
    """The Enhanced Contrast/Bolus module and the shared Contrast/Bolus Usage group (when there is an agent)."""
    agent = str(ds.get("ContrastBolusAgent", "") or "")
    for kw in ("ContrastBolusAgent", "ContrastBolusRoute"):
        if kw in ds:
            delattr(ds, kw)
    if agent:
        item = _code_item((_IODINE[0], _IODINE[1], agent[:64]))
        item.ContrastBolusAgentNumber = 1
        item.ContrastBolusAdministrationRouteSequence = DicomSequence([_code_item(_IV)])
        ing = _code_item(_IODINE)
        item.ContrastBolusIngredientCodeSequence = DicomSequence([ing])
        item.ContrastBolusVolume = 100.0
        item.ContrastBolusIngredientConcentration = 300.0
        item.ContrastBolusIngredientOpaque = "YES"
        ds.ContrastBolusAgentSequence = DicomSequence([item])
        use = Dataset()
        use.ContrastBolusAgentNumber = 1
        use.ContrastBolusAgentAdministered = "YES"
        use.ContrastBolusAgentDetected = "NO"
        shared.ContrastBolusUsageSequence = DicomSequence([use])


def _drop_conversion_groups(ds: Dataset, shared: Dataset, first: Dataset) -> None:
    """Drop what Legacy Converted leaves unassigned (no place in Enhanced CT); per-frame CT position and timing."""
    for kw in ("UnassignedSharedConvertedAttributesSequence",):
        if kw in shared:
            delattr(shared, kw)
    for item in ds.PerFrameFunctionalGroupsSequence:
        for kw in ("UnassignedPerFrameConvertedAttributesSequence",
                   "ConversionSourceAttributesSequence"):
            if kw in item:
                delattr(item, kw)
        fc = _unassigned(item, "FrameContentSequence")
        if fc is not None:
            if "FrameComments" in fc:
                delattr(fc, "FrameComments")
            fc.FrameReferenceDateTime = fc.get("FrameAcquisitionDateTime") or \
                f"{first.get('AcquisitionDate', '20000101')}{first.get('AcquisitionTime', '000000')}"
            fc.FrameAcquisitionDuration = 500.0
        z = float(item.PlanePositionSequence[0].ImagePositionPatient[2])
        pos = Dataset()
        pos.TablePosition = -z
        pos.ReconstructionTargetCenterPatient = [0.0, 0.0, z]
        pos.DataCollectionCenterPatient = [0.0, 0.0, z]
        item.CTPositionSequence = DicomSequence([pos])
    if "ConversionSourceAttributesSequence" in shared:
        delattr(shared, "ConversionSourceAttributesSequence")


def write_multiframe(ds: Dataset, folder: str | Path) -> Path:
    """Write ``ds`` as ``<folder>/<SOPInstanceUID>.dcm``; returns the path."""
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def stored_frames(ds: Dataset) -> np.ndarray:
    """Stored pixel values, one frame per row of the first axis (for tests and debugging)."""
    arr = np.asarray(ds.pixel_array)
    return arr[None] if arr.ndim == 2 else arr
