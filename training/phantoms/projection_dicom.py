"""DICOM writing for the virtual cohort's projection images (hip radiograph DX, DXA spine BMD).

Two objects are written:

* **DX** -- *Digital X-Ray Image Storage - For Presentation* (PS3.3 A.26): the AP pelvis
  radiograph, ``uint16`` ``MONOCHROME2`` with ``ImagerPixelSpacing`` (detector plane) and
  ``PixelSpacing`` (calibrated to the patient plane through the magnification factor).
* **BMD** -- *Secondary Capture Image Storage* (PS3.3 A.8.1) with ``Modality = BMD`` and
  ``ConversionType = SYN`` (synthetic image): the DXA bone areal-density image, ``uint16`` with a
  Modality LUT (``RescaleSlope``) that maps stored values to g/cm^2 of hydroxyapatite.

Everything is deterministic: UIDs are derived from the render seed and the patient id
(:func:`uid_for`), dates come from the seed, there are no timestamps, so rendering the same patient
with the same seed twice gives byte-identical files.  No real person is described: names are
``PHANTOM^<patient_id>``.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID

DX_PRESENTATION_SOP = "1.2.840.10008.5.1.4.1.1.1.1"
SECONDARY_CAPTURE_SOP = "1.2.840.10008.5.1.4.1.1.7"
MANUFACTURER = "screener virtual cohort"
SOFTWARE_VERSION = "screener-phantom 0.1"

__all__ = [
    "DX_PRESENTATION_SOP",
    "SECONDARY_CAPTURE_SOP",
    "uid_for",
    "study_date_for",
    "patient_dataset",
    "dx_dataset",
    "bmd_dataset",
    "dataset_bytes",
    "write_dataset",
]


def _attr(obj: Any, name: str, default: Any) -> Any:
    value = getattr(obj, name, default)
    return default if value is None else value


def uid_for(seed: int, patient_id: str, *parts: object) -> str:
    """Return a deterministic UID (``2.25.<int>``) for one object of one rendered patient.

    Parameters
    ----------
    seed : int
        Render seed.
    patient_id : str
        The synthetic patient's id.
    *parts : object
        What the UID names, e.g. ``("hip_xray", "study")``.

    Returns
    -------
    str
        A valid DICOM UID, the same for the same arguments.
    """
    # 2.25.<128-bit integer> (UUID-derived form, PS3.5 B.2), here from a hash rather than a random
    # UUID: pydicom's generate_uid(prefix=None) ignores entropy_srcs and is random.
    text = "/".join([str(seed), str(patient_id), *map(str, parts)])
    return "2.25." + str(int.from_bytes(hashlib.sha256(text.encode()).digest()[:16], "big"))


def study_date_for(seed: int, patient_id: str, kind: str) -> _dt.date:
    """Deterministic study date in 2018-2024 for one patient and study kind."""
    h = hashlib.sha256(f"{seed}/{patient_id}/{kind}".encode()).digest()
    return _dt.date(2018, 1, 1) + _dt.timedelta(days=int.from_bytes(h[:4], "little") % 2500)


def patient_dataset(patient: Any, seed: int, kind: str, *, study_description: str,
                    series_description: str, modality: str, body_part: str) -> Dataset:
    """Patient, General Study, Patient Study, General Series and General Equipment modules.

    Parameters
    ----------
    patient : training.phantoms.population.Patient
        Source of id, age, sex, height and weight (read with ``getattr`` so stand-ins work).
    seed : int
        Render seed (drives UIDs and dates).
    kind : str
        Study kind, part of every UID (``"hip_xray"``, ``"dxa"``).
    study_description, series_description, modality, body_part : str
        Header values.

    Returns
    -------
    pydicom.dataset.Dataset
        A dataset without pixel modules.
    """
    pid = str(_attr(patient, "patient_id", "PH000000"))
    age = float(_attr(patient, "age", 50.0))
    sex = str(_attr(patient, "sex", "O"))
    date = study_date_for(seed, pid, kind)
    birth = date - _dt.timedelta(days=int(round(age * 365.25)))

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    # Patient module (synthetic identity only)
    ds.PatientName = f"PHANTOM^{pid}"
    ds.PatientID = pid
    ds.PatientBirthDate = birth.strftime("%Y%m%d")
    ds.PatientSex = sex if sex in ("M", "F", "O") else "O"
    ds.PatientIdentityRemoved = "NO"
    # General Study
    ds.StudyInstanceUID = uid_for(seed, pid, kind, "study")
    ds.StudyDate = date.strftime("%Y%m%d")
    ds.StudyTime = "093000"
    ds.ReferringPhysicianName = ""
    ds.StudyID = hashlib.sha256(f"{seed}/{pid}/{kind}".encode()).hexdigest()[:8].upper()
    ds.AccessionNumber = "PH" + hashlib.sha256(f"acc/{seed}/{pid}/{kind}".encode()).hexdigest()[:10].upper()
    ds.StudyDescription = study_description
    # Patient Study
    ds.PatientAge = f"{min(int(age), 999):03d}Y"
    height = _attr(patient, "height_cm", None)
    weight = _attr(patient, "weight_kg", None)
    if height is not None:
        ds.PatientSize = f"{float(height) / 100.0:.2f}"
    if weight is not None:
        ds.PatientWeight = f"{float(weight):.1f}"
    # General Series
    ds.Modality = modality
    ds.SeriesInstanceUID = uid_for(seed, pid, kind, "series")
    ds.SeriesNumber = 1
    ds.SeriesDate = ds.StudyDate
    ds.SeriesTime = "093100"
    ds.SeriesDescription = series_description
    ds.BodyPartExamined = body_part
    # General Equipment
    ds.Manufacturer = MANUFACTURER
    ds.InstitutionName = "Virtual cohort"
    ds.ManufacturerModelName = "phantom-" + kind
    ds.SoftwareVersions = SOFTWARE_VERSION
    # SOP Common
    ds.InstanceCreationDate = ds.StudyDate
    ds.InstanceCreationTime = "093200"
    ds.SOPInstanceUID = uid_for(seed, pid, kind, "instance", 1)
    ds.InstanceNumber = 1
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = "093200"
    return ds


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _set_pixels(ds: Dataset, image: np.ndarray, bits_stored: int) -> None:
    arr = np.ascontiguousarray(image, dtype="<u2")
    if arr.ndim != 2:
        raise ValueError(f"projection image must be 2-D, got shape {arr.shape}")
    if int(arr.max(initial=0)) >= (1 << bits_stored):
        raise ValueError(f"pixel values exceed {bits_stored} bits: clip before writing")
    ds.SamplesPerPixel = 1
    ds.Rows, ds.Columns = int(arr.shape[0]), int(arr.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = arr.tobytes()


def dx_dataset(patient: Any, seed: int, image: np.ndarray, *, imager_pixel_spacing_mm: float,
               magnification: float, sid_mm: float, sod_mm: float, kvp: float, pose: str,
               upright: bool, window: tuple[float, float], bits_stored: int = 12,
               extra: dict[str, Any] | None = None) -> Dataset:
    """Build an AP pelvis DX (For Presentation) dataset.

    Parameters
    ----------
    patient : Patient
        The synthetic patient.
    seed : int
        Render seed.
    image : numpy.ndarray
        ``(rows, cols)`` unsigned integer image, bright = attenuating (MONOCHROME2), row 0 superior,
        column 0 at the patient's right (the image is viewed as if facing the patient).
    imager_pixel_spacing_mm : float
        Detector pixel pitch.
    magnification : float
        Source-detector over source-patient (hip-centre plane) distance; ``PixelSpacing`` =
        ``ImagerPixelSpacing / magnification`` (``PixelSpacingCalibrationType = GEOMETRY``).
    sid_mm, sod_mm : float
        Source-to-detector and source-to-patient distances.
    kvp : float
        Tube voltage.
    pose : str
        Pose label, written to ``ImageComments`` and ``SeriesDescription``.
    upright : bool
        Standing (erect) or supine (recumbent): ``PatientOrientationCodeSequence``.
    window : tuple of float
        ``(center, width)`` for presentation.
    bits_stored : int
        Stored bits (12 by default).
    extra : dict, optional
        More attributes to set (keyword -> value).

    Returns
    -------
    pydicom.dataset.Dataset
        A dataset that ``dciodvfy`` accepts without errors.
    """
    ds = patient_dataset(patient, seed, "hip_xray", study_description="XR PELVIS AP",
                         series_description=f"Pelvis AP ({pose})", modality="DX",
                         body_part="PELVIS")
    ds.SOPClassUID = DX_PRESENTATION_SOP
    # DX Series
    ds.PresentationIntentType = "FOR PRESENTATION"
    # General / DX image
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.AcquisitionDate = ds.StudyDate
    ds.AcquisitionTime = "093130"
    _set_pixels(ds, image, bits_stored)
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = -1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "IDENTITY"
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "NO"
    ds.WindowCenter = f"{window[0]:.1f}"
    ds.WindowWidth = f"{window[1]:.1f}"
    ds.QualityControlImage = "NO"
    ds.PatientOrientation = ["L", "F"]
    ds.ImageComments = f"Synthetic DRR, pose={pose}"
    ds.AcquisitionContextSequence = Sequence()
    # DX Anatomy Imaged
    ds.ImageLaterality = "B"
    ds.AnatomicRegionSequence = Sequence([_code("12921003", "SCT", "Pelvis")])
    # DX Detector
    ds.DetectorType = "SCINTILLATOR"
    ds.DetectorID = "PHANTOM-FPD"
    ds.DetectorConfiguration = "AREA"
    ds.ImagerPixelSpacing = [f"{imager_pixel_spacing_mm:.4f}", f"{imager_pixel_spacing_mm:.4f}"]
    ds.PixelSpacing = [f"{imager_pixel_spacing_mm / magnification:.6f}",
                       f"{imager_pixel_spacing_mm / magnification:.6f}"]
    ds.PixelSpacingCalibrationType = "GEOMETRY"
    ds.PixelSpacingCalibrationDescription = "magnification at the femoral-head plane"
    ds.EstimatedRadiographicMagnificationFactor = f"{magnification:.5f}"
    # DX Positioning / X-Ray Acquisition Dose
    ds.ViewPosition = "AP"
    orient = _code("10904000", "SCT", "orthostatic position") if upright else \
        _code("102538003", "SCT", "recumbent")
    if not upright:
        orient.PatientOrientationModifierCodeSequence = Sequence([_code("40199007", "SCT", "supine")])
    ds.PatientOrientationCodeSequence = Sequence([orient])
    ds.ViewCodeSequence = Sequence([_code("399348003", "SCT", "antero-posterior")])
    ds.DistanceSourceToDetector = f"{sid_mm:.1f}"
    ds.DistanceSourceToPatient = f"{sod_mm:.1f}"
    ds.KVP = f"{kvp:.1f}"
    ds.Grid = "FOCUSED"
    ds.PositionerType = "NONE"
    for key, value in (extra or {}).items():
        setattr(ds, key, value)
    return _with_meta(ds)


def bmd_dataset(patient: Any, seed: int, image: np.ndarray, *, pixel_spacing_mm: tuple[float, float],
                rescale_slope: float, kev: tuple[float, float],
                extra: dict[str, Any] | None = None) -> Dataset:
    """Build the DXA lumbar-spine bone areal-density image as a Secondary Capture (Modality BMD).

    Parameters
    ----------
    patient : Patient
        The synthetic patient.
    seed : int
        Render seed.
    image : numpy.ndarray
        ``(rows, cols)`` unsigned integer image; ``value * rescale_slope`` = g/cm^2 HA.
        Row 0 superior, column 0 at the patient's right (PA scan displayed like an AP image).
    pixel_spacing_mm : tuple of float
        ``(row spacing, column spacing)`` = ``(1.05, 0.60)`` for the seed-003 scanner.
    rescale_slope : float
        g/cm^2 per stored unit.
    kev : tuple of float
        The two effective energies, recorded in ``ImageComments``.
    extra : dict, optional
        More attributes.

    Returns
    -------
    pydicom.dataset.Dataset
        A dataset that ``dciodvfy`` accepts without errors.
    """
    ds = patient_dataset(patient, seed, "dxa", study_description="DXA LUMBAR SPINE",
                         series_description="AP spine L1-L4 bone areal density", modality="BMD",
                         body_part="LSPINE")
    ds.SOPClassUID = SECONDARY_CAPTURE_SOP
    # SC Equipment
    ds.ConversionType = "SYN"
    # General Image / SC Image
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.PatientOrientation = ["L", "F"]
    ds.ImageLaterality = "U"
    ds.PixelSpacing = [f"{pixel_spacing_mm[0]:.4f}", f"{pixel_spacing_mm[1]:.4f}"]
    ds.PixelSpacingCalibrationType = "GEOMETRY"
    ds.PixelSpacingCalibrationDescription = "parallel-beam scan geometry"
    ds.ImageComments = (f"Synthetic DXA: dual-energy {kev[0]:g}/{kev[1]:g} keV, two-material "
                        f"decomposition; pixel value x {rescale_slope:g} = g/cm2 hydroxyapatite")
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    _set_pixels(ds, image, 16)
    ds.PhotometricInterpretation = "MONOCHROME2"
    # Modality LUT: stored -> g/cm2
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = f"{rescale_slope:g}"
    ds.RescaleType = "G/CM2"
    ds.WindowCenter = f"{0.8 / rescale_slope:.1f}"
    ds.WindowWidth = f"{1.8 / rescale_slope:.1f}"
    for key, value in (extra or {}).items():
        setattr(ds, key, value)
    return _with_meta(ds)


def _with_meta(ds: Dataset) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "SCREENER_PH01"
    ds.file_meta = meta
    return ds


def dataset_bytes(ds: Dataset) -> bytes:
    """Serialise a dataset as a Part-10 file (explicit VR little endian) to bytes."""
    buf = BytesIO()
    _with_meta(ds).save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def write_dataset(ds: Dataset, path: str | Path) -> Path:
    """Write a dataset as a Part-10 file; parent folders are created.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        A dataset from :func:`dx_dataset` or :func:`bmd_dataset`.
    path : str or pathlib.Path
        Destination file.

    Returns
    -------
    pathlib.Path
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(dataset_bytes(ds))
    return path
