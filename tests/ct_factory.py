"""Synthetic axial CT series for loader, protocol and report tests.

:func:`make_ct_series` writes a small but DICOM-complete CT series: an elliptic
soft-tissue body in air, a column of vertebral bodies (elliptic cylinders of
trabecular bone with a cortical shell, a low-density basivertebral spot at the
posterior centre) separated by discs, a spinal canal ringed by the neural arch.
The middle vertebra is "L1" with a known trabecular HU; its truth is returned
as a :class:`~screener.domain.SpineLocalization` a fake localizer can hand to
the protocol. Options create the defects the loader must catch.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                         generate_uid)

from screener.domain import SpineLocalization, VertebraLocation

UNCOMPRESSED = {ExplicitVRLittleEndian, ImplicitVRLittleEndian}


@dataclass
class SyntheticCT:
    """A written synthetic series and its truth."""

    paths: list[Path]
    study_uid: str
    series_uid: str
    l1_hu: float
    l1_z_range: tuple[float, float]
    l1_centre_mm: tuple[float, float, float]
    body_rx_mm: float
    body_ry_mm: float
    z_positions: list[float] = field(default_factory=list)
    localization: SpineLocalization | None = None

    def fake_localizer(self):  # noqa: ANN201 - a callable Volume -> SpineLocalization
        """A localizer returning this phantom's truth (index terms of the sorted volume)."""
        truth = self.localization

        def _locate(volume):  # noqa: ANN001, ANN202
            assert truth is not None
            return truth
        return _locate


def _ellipse(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0


def render_slice(z: float, xx: np.ndarray, yy: np.ndarray, *, levels: list[tuple[str, float, float, float]],
                 body_cy: float, rx: float, ry: float, cortex_mm: float, cortex_hu: float,
                 disc_hu: float, soft_hu: float, plexus_hu: float) -> np.ndarray:
    """HU image of one axial slice at patient z (mm)."""
    img = np.full(xx.shape, -1000.0, np.float32)
    img[_ellipse(xx, yy, 0.0, 10.0, 150.0, 110.0)] = soft_hu      # body outline (~300 x 220 mm)
    img[_ellipse(xx, yy, -60.0, 0.0, 40.0, 30.0)] = 55.0            # an organ
    canal_cy = body_cy + ry + 12.0
    arch = _ellipse(xx, yy, 0.0, canal_cy, 14.0, 12.0)
    canal = _ellipse(xx, yy, 0.0, canal_cy, 9.0, 7.5)
    for _label, z_lo, z_hi, hu in levels:
        if z_lo <= z <= z_hi:
            outer = _ellipse(xx, yy, 0.0, body_cy, rx, ry)
            inner = _ellipse(xx, yy, 0.0, body_cy, rx - cortex_mm, ry - cortex_mm)
            img[outer] = cortex_hu
            img[inner] = hu
            img[_ellipse(xx, yy, 0.0, body_cy + 0.72 * ry, 3.5, 2.5)] = plexus_hu
            img[arch] = cortex_hu
            img[canal] = 10.0
            return img
    # disc level
    img[_ellipse(xx, yy, 0.0, body_cy, rx, ry)] = disc_hu
    img[canal] = 10.0
    return img


def make_ct_series(out_dir: Path, *, n_slices: int = 36, slice_spacing: float = 2.5,
                   rows: int = 256, cols: int = 256, pixel_spacing: float = 1.25,
                   l1_hu: float = 150.0, other_hu: tuple[float, float] = (190.0, 120.0),
                   cortex_hu: float = 600.0, cortex_mm: float = 1.5, body_rx_mm: float = 22.0,
                   body_ry_mm: float = 16.0, noise_sd: float = 0.0, seed: int = 0,
                   shuffle_instance_numbers: bool = True, drop_slices: Iterable[int] = (),
                   tilt_header_deg: float = 0.0, shear_deg: float = 0.0,
                   spacing_jitter: dict[int, float] | None = None,
                   photometric: str = "MONOCHROME2",
                   transfer_syntax: str = ExplicitVRLittleEndian, kvp: float | None = 120.0,
                   contrast_agent: str | None = None,
                   image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL"),
                   modality: str = "CT", body_part: str = "ABDOMEN",
                   orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0),
                   mixed_orientation_slice: int | None = None,
                   mixed_size_slice: int | None = None,
                   study_uid: str | None = None, series_uid: str | None = None,
                   patient_sex: str = "F", z_start: float = -45.0) -> SyntheticCT:
    """Write a synthetic axial CT series to ``out_dir``; returns the files and the truth.

    The phantom has three vertebral bodies (T12, L1, L2, 24 mm tall) separated
    by 8 mm discs, L1 centred at z = 0 with trabecular HU ``l1_hu``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    for_uid = generate_uid()
    body_cy = 35.0  # mm posterior of the isocentre
    levels = [("T12", 20.0, 44.0, other_hu[0]), ("L1", -12.0, 12.0, l1_hu),
              ("L2", -44.0, -20.0, other_hu[1])]
    jc = (np.arange(cols) - cols / 2 + 0.5) * pixel_spacing
    jr = (np.arange(rows) - rows / 2 + 0.5) * pixel_spacing
    xx, yy = np.meshgrid(jc, jr)
    x0 = float(jc[0])
    y0 = float(jr[0])
    drop = set(drop_slices)
    order = rng.permutation(n_slices) if shuffle_instance_numbers else np.arange(n_slices)
    paths: list[Path] = []
    zs: list[float] = []
    now = datetime.datetime(2024, 5, 6, 10, 30, 0)
    for k in range(n_slices):
        if k in drop:
            continue
        z = z_start + k * slice_spacing + (spacing_jitter or {}).get(k, 0.0)
        zs.append(z)
        hu = render_slice(z, xx, yy, levels=levels, body_cy=body_cy, rx=body_rx_mm, ry=body_ry_mm,
                          cortex_mm=cortex_mm, cortex_hu=cortex_hu, disc_hu=80.0, soft_hu=40.0,
                          plexus_hu=20.0)
        if noise_sd:
            hu = hu + rng.normal(0.0, noise_sd, hu.shape).astype(np.float32)
        r, c = rows, cols
        if mixed_size_slice == k:
            hu = hu[:-16, :-16]
            r, c = hu.shape
        stored = np.clip(np.round(hu + 1024.0), 0, 4095).astype(np.uint16)
        shift = z * np.tan(np.deg2rad(shear_deg or tilt_header_deg))
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.ImageType = list(image_type)
        ds.StudyDate = now.strftime("%Y%m%d")
        ds.StudyTime = now.strftime("%H%M%S")
        ds.SeriesDate = ds.StudyDate
        ds.SeriesTime = ds.StudyTime
        ds.AccessionNumber = "ACC0001"
        ds.Modality = modality
        ds.Manufacturer = "ScreenerTest"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "CT ABDOMEN"
        ds.SeriesDescription = "Synthetic spine phantom"
        ds.PatientName = "Phantom^Test"
        ds.PatientID = "PH0001"
        ds.PatientBirthDate = "19500101"
        ds.PatientSex = patient_sex
        ds.BodyPartExamined = body_part
        ds.SliceThickness = f"{slice_spacing:g}"
        if kvp is not None:
            ds.KVP = f"{kvp:g}"
        if contrast_agent is not None:
            ds.ContrastBolusAgent = contrast_agent
        ds.GantryDetectorTilt = f"{tilt_header_deg:g}"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 3
        ds.InstanceNumber = int(order[k]) + 1
        ds.ImagePositionPatient = [f"{x0:.4f}", f"{y0 + shift:.4f}", f"{z:.4f}"]
        iop = orientation
        if mixed_orientation_slice == k:
            iop = (1, 0, 0, 0, 0.9986295, -0.0523360)
        ds.ImageOrientationPatient = [f"{v:.7g}" for v in iop]
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{z:.4f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.Rows = r
        ds.Columns = c
        ds.PixelSpacing = [f"{pixel_spacing:g}", f"{pixel_spacing:g}"]
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.PixelData = stored.tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        if transfer_syntax == ImplicitVRLittleEndian:
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        elif transfer_syntax not in UNCOMPRESSED:
            ds.compress(transfer_syntax)
        path = out_dir / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    # truth in the index terms of the sorted volume (ascending z; no drops assumed)
    zs_sorted = sorted(zs)
    ks = [k for k, z in enumerate(zs_sorted) if -12.0 <= z <= 12.0]
    k_mid = float(np.interp(0.0, zs_sorted, np.arange(len(zs_sorted))))
    j_c = (body_cy - y0) / pixel_spacing
    i_c = (0.0 - x0) / pixel_spacing
    loc = None
    if ks:
        loc = SpineLocalization(
            vertebrae={"L1": VertebraLocation(
                label="L1", slice_range=(ks[0], ks[-1]), z_range_mm=(-12.0, 12.0),
                centroid_index=(k_mid, j_c, i_c), centroid_mm=(0.0, body_cy, 0.0),
                confidence=1.0)},
            method="phantom-truth")
    return SyntheticCT(paths=paths, study_uid=study_uid, series_uid=series_uid, l1_hu=l1_hu,
                       l1_z_range=(-12.0, 12.0), l1_centre_mm=(0.0, body_cy, 0.0),
                       body_rx_mm=body_rx_mm, body_ry_mm=body_ry_mm, z_positions=zs,
                       localization=loc)


def copy_with_fresh_uids(src_dir: Path, dst_dir: Path) -> list[Path]:
    """Copy a series giving it Study/Series/SOP Instance UIDs (the shared real CT has none).

    Pixel data stay as they are (JPEG 2000 stays JPEG 2000); SOPClassUID is
    taken from the file meta when the data set's is empty.
    """
    dst_dir.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    out = []
    for p in sorted(src_dir.iterdir()):
        ds = pydicom.dcmread(p)
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = generate_uid()
        if not ds.get("SOPClassUID"):
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        if not ds.get("SeriesNumber"):
            ds.SeriesNumber = 1
        path = dst_dir / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path)
        out.append(path)
    return out


def make_enhanced_ct(paths: list[Path], out_dir: Path, *, superior_first: bool = True) -> Path:
    """Pack a single-frame series into one Enhanced CT Image (multi-frame) file.

    Geometry goes into the functional groups: Pixel Measures, Plane
    Orientation and Pixel Value Transformation shared, Plane Position per
    frame; frames are stored superior first (the loader must sort them).
    """
    from pydicom.sequence import Sequence
    from pydicom.uid import EnhancedCTImageStorage

    dss = [pydicom.dcmread(p) for p in paths]
    dss.sort(key=lambda d: float(d.ImagePositionPatient[2]), reverse=superior_first)
    f0 = dss[0]
    ds = Dataset()
    for kw in ("SpecificCharacterSet", "StudyDate", "StudyTime", "AccessionNumber", "Modality",
               "Manufacturer", "ReferringPhysicianName", "StudyDescription", "SeriesDescription",
               "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "BodyPartExamined",
               "KVP", "ContrastBolusAgent", "StudyInstanceUID", "SeriesInstanceUID", "StudyID",
               "SeriesNumber", "FrameOfReferenceUID", "PositionReferenceIndicator",
               "SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated",
               "BitsStored", "HighBit", "PixelRepresentation"):
        if kw in f0:
            setattr(ds, kw, f0.get(kw))
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.InstanceNumber = 1
    ds.NumberOfFrames = len(dss)
    ds.ContentDate, ds.ContentTime = f0.StudyDate, f0.StudyTime
    shared = Dataset()
    pm = Dataset()
    pm.PixelSpacing = f0.PixelSpacing
    pm.SliceThickness = f0.SliceThickness
    po = Dataset()
    po.ImageOrientationPatient = f0.ImageOrientationPatient
    pvt = Dataset()
    pvt.RescaleIntercept, pvt.RescaleSlope, pvt.RescaleType = f0.RescaleIntercept, f0.RescaleSlope, "HU"
    shared.PixelMeasuresSequence = Sequence([pm])
    shared.PlaneOrientationSequence = Sequence([po])
    shared.PixelValueTransformationSequence = Sequence([pvt])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per = []
    for n, d in enumerate(dss, start=1):
        item = Dataset()
        pp = Dataset()
        pp.ImagePositionPatient = d.ImagePositionPatient
        fc = Dataset()
        fc.InStackPositionNumber = n
        item.PlanePositionSequence = Sequence([pp])
        item.FrameContentSequence = Sequence([fc])
        per.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per)
    ds.PixelData = b"".join(d.pixel_array.astype(np.uint16).tobytes() for d in dss)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path
