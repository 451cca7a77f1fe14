"""Radiograph / DXA preprocessing (screener.radiograph): intensity, scale, side handling, crops."""
from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from screener import radiograph as rg


def _dx(pixels: np.ndarray, **attrs) -> Dataset:
    """A minimal single-frame DX dataset around ``pixels`` (uint16)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = np.ascontiguousarray(pixels.astype(np.uint16)).tobytes()
    for k, v in attrs.items():
        setattr(ds, k, v)
    return ds


def _pelvis_with_markers(h: int = 512, w: int = 512) -> np.ndarray:
    """Image with a bright marker near the image's left edge and a dimmer one near the right edge."""
    img = np.zeros((h, w), dtype=np.float32)
    img[200:210, 20:30] = 1.0       # image-left, outer edge
    img[300:310, w - 30:w - 20] = 0.5  # image-right, outer edge
    return img


# --- side handling ------------------------------------------------------------------------------

def test_split_standard_view_puts_image_left_in_right_hip_and_mirrors_left():
    img = _pelvis_with_markers()
    hips = rg.split_hips(img, rg.ImageLayout("L", "F"))
    assert set(hips) == {"R", "L"}
    assert hips["R"].shape == hips["L"].shape == rg.HIP_SHAPE == (512, 256)
    # patient's right = image left: the bright marker, unchanged position
    r = hips["R"]
    assert r[200:210, 20:30].min() == 1.0 and r.max() == 1.0 and np.count_nonzero(r) == 100
    # left hip mirrored: its outer (lateral) marker moves from columns 226..235 to 20..29
    left = hips["L"]
    assert left[300:310, 20:30].min() == 0.5 and np.count_nonzero(left) == 100
    assert left[:, 226:236].max() == 0.0


def test_split_respects_patient_orientation_flip():
    img = _pelvis_with_markers()
    ds = _dx(np.zeros((4, 4)), PatientOrientation=["R", "F"])
    hips = rg.split_hips(img, ds)  # image flipped: patient's right is on the image's right
    assert hips["R"].max() == 0.5 and hips["L"].max() == 1.0
    # after flipping to the standard view both markers are still at the lateral edge (cols 20..29)
    assert hips["R"][300:310, 20:30].min() == 0.5
    assert hips["L"][200:210, 20:30].min() == 1.0


def test_field_of_view_flip_and_rotation_and_transposed_orientation():
    img = _pelvis_with_markers()
    flipped = rg.image_layout(_dx(np.zeros((4, 4)), FieldOfViewHorizontalFlip="YES"))
    assert (flipped.column_toward, flipped.row_toward, flipped.source) == ("R", "F", "FieldOfView")
    assert rg.split_hips(img, flipped)["R"].max() == 0.5
    rot180 = rg.image_layout(_dx(np.zeros((4, 4)), FieldOfViewRotation=180))
    assert (rot180.column_toward, rot180.row_toward) == ("R", "H")
    rot90 = rg.image_layout(_dx(np.zeros((4, 4)), FieldOfViewRotation=90))
    assert (rot90.column_toward, rot90.row_toward) == ("H", "L")
    # a transposed image (columns towards the feet, rows towards the patient's left)
    hips = rg.split_hips(img.T.copy(), rg.ImageLayout("F", "L"))
    assert hips["R"][200:210, 20:30].min() == 1.0
    # PatientOrientation wins over the field-of-view attributes
    both = rg.image_layout(_dx(np.zeros((4, 4)), PatientOrientation=["L", "F"], FieldOfViewHorizontalFlip="YES"))
    assert both.is_standard and both.source == "PatientOrientation"
    assert rg.image_layout(_dx(np.zeros((4, 4)))).source == "assumed"


def test_lateral_view_is_refused_and_unilateral_image_is_one_hip():
    img = _pelvis_with_markers()
    with pytest.raises(rg.RadiographError, match="not a frontal projection"):
        rg.split_hips(img, rg.image_layout(_dx(np.zeros((4, 4)), PatientOrientation=["A", "F"])))
    one = rg.split_hips(img[:, :256], rg.ImageLayout("L", "F", laterality="L"))
    assert list(one) == ["L"]
    # whole image mirrored: the marker at columns 20..29 lands at 226..235
    assert one["L"][200:210, 226:236].min() == 1.0


def test_fit_to_shape_cover_resizes_to_shorter_edge_and_centres():
    img = np.zeros((300, 200), dtype=np.float32)
    img[148:152, 98:102] = 1.0  # centre blob
    out = rg.fit_to_shape(img, (512, 256), mode="cover")
    assert out.shape == (512, 256)
    # scale = max(512/300, 256/200) = 1.7067: rows fill exactly, columns 341 -> cropped to 256
    ys, xs = np.nonzero(out > 0.5)
    assert abs(ys.mean() - 255.5) < 1.0 and abs(xs.mean() - 127.5) < 1.0
    assert 5 <= len(np.unique(ys)) <= 8  # 4 rows x 1.71
    crop = rg.fit_to_shape(img, (512, 256), mode="crop", fill=-1.0)
    assert crop[0, 0] == -1.0 and crop[106 + 150, 28 + 100] == 1.0


# --- reading DX datasets ---------------------------------------------------------------------------

def test_read_radiograph_window_rescale_and_monochrome1_agree():
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 4096, size=(40, 60)).astype(np.float64)
    m2 = _dx(raw, WindowCenter=2000, WindowWidth=2001, PixelSpacing=[0.7, 0.7])
    a = rg.read_radiograph(m2)
    # hand VOI LINEAR: (x - (c - 0.5)) / (w - 1) + 0.5, clipped
    expected = np.clip((raw - 1999.5) / 2000.0 + 0.5, 0, 1)
    np.testing.assert_allclose(a.image, expected, atol=1e-6)
    assert a.intensity_source == "window" and not a.inverted and a.image.shape == (40, 60)
    # the same image stored MONOCHROME1 (values inverted) with a rescale: identical display
    stored = 4095 - raw
    m1 = _dx(stored, PhotometricInterpretation="MONOCHROME1", PresentationLUTShape="INVERSE",
             RescaleSlope=2, RescaleIntercept=-100, WindowCenter=2 * (4095 - 2000) - 100,
             WindowWidth=4001, PixelSpacing=[0.7, 0.7])
    b = rg.read_radiograph(m1)
    assert b.inverted
    # windows differ slightly in slope (2000 vs 4000/2 units per width) -> within 1e-3
    np.testing.assert_allclose(b.image, a.image, atol=1e-3)
    assert np.corrcoef(a.image.ravel(), b.image.ravel())[0, 1] > 0.9999


def test_read_radiograph_resamples_with_imager_spacing_and_magnification():
    raw = np.zeros((200, 100))
    raw[90:110, 40:60] = 4000
    ds = _dx(raw, ImagerPixelSpacing=[0.42, 0.42], EstimatedRadiographicMagnificationFactor=1.2)
    r = rg.read_radiograph(ds, pixel_mm=0.7)  # 0.42 / 1.2 = 0.35 mm -> 0.7 mm halves the grid
    assert r.spacing_source == "ImagerPixelSpacing / EstimatedRadiographicMagnificationFactor"
    assert r.source_spacing_mm == pytest.approx((0.35, 0.35))
    assert r.image.shape == (100, 50)
    assert r.intensity_source == "percentile"  # no window in the dataset
    ys, xs = np.nonzero(r.image > 0.5)
    assert abs(ys.mean() - 49.5) < 0.6 and abs(xs.mean() - 24.5) < 0.6
    with pytest.raises(rg.RadiographError, match="no usable pixel spacing .PixelSpacing absent; ImagerPixelSpacing absent."):
        rg.read_radiograph(_dx(raw))
    with pytest.raises(rg.RadiographError, match="not greyscale"):
        rg.read_radiograph(_dx(raw, PhotometricInterpretation="RGB", PixelSpacing=[1, 1]))


def test_read_then_split_dicom_end_to_end_flipped_image():
    img = _pelvis_with_markers(256, 256)
    ds = _dx(img * 4000, PatientOrientation=["R", "F"], PixelSpacing=[0.7, 0.7],
             WindowCenter=2000, WindowWidth=4001)
    rad = rg.read_radiograph(ds)
    hips = rg.split_hips(rad.image, rad)
    # stored image is flipped: the bright (1.0) marker at image-left is the patient's LEFT hip
    assert hips["L"].max() > 0.9 and hips["R"].max() < 0.6


# --- JPEG -----------------------------------------------------------------------------------------

def test_jpeg_recompress_degrades_with_quality():
    yy, xx = np.mgrid[0:256, 0:128]
    img = (0.5 + 0.3 * np.sin(xx / 9.0) * np.cos(yy / 13.0)).astype(np.float32)
    img[100:140, 40:80] += 0.15
    errs, sizes = {}, {}
    for q in (100, 50, 10):
        out, n = rg.jpeg_recompress(img, q, value_range=(0.0, 1.0), return_nbytes=True)
        assert out.shape == img.shape and out.dtype == np.float32
        errs[q], sizes[q] = float(np.abs(out - img).mean()), n
    assert errs[100] < 2.0 / 255  # 8-bit quantisation + near-lossless JPEG
    assert errs[100] < errs[50] < errs[10]
    assert sizes[100] > sizes[50] > sizes[10]
    with pytest.raises(ValueError, match="1..100"):
        rg.jpeg_recompress(img, 0)


# --- DXA centre line ------------------------------------------------------------------------------

def _tilted_spine(h: int = 165, w: int = 300, centre: float = 190.0, slope: float = 0.2,
                  seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = np.arange(h)[:, None]
    cols = np.arange(w)[None, :]
    line = centre + slope * (rows - (h - 1) / 2.0)
    img = 0.3 + 0.05 * rng.standard_normal((h, w))          # soft tissue
    img += 1.0 * (np.abs(cols - line) <= 18)                  # vertebral column, 37 px wide
    img[::20, :] -= 0.5 * (np.abs(cols - line[::20]) <= 18)   # disc spaces (darker rows)
    return img.astype(np.float32)


def test_dxa_centerline_crop_centres_tilted_off_centre_spine():
    img = _tilted_spine()
    slope, intercept = rg.spine_centerline(img)
    assert slope == pytest.approx(0.2, abs=0.02)
    assert slope * 82 + intercept == pytest.approx(190.0, abs=1.0)
    crop, (cy, cx) = rg.dxa_centerline_crop(img, return_center=True)
    assert crop.shape == (rg.DXA_CROP, rg.DXA_CROP) == (150, 150)
    assert cx == pytest.approx(190.0, abs=1.0) and cy == 82.0
    # in the crop the spine is centred at the middle row: bright columns symmetric about 74.5
    mid = crop[70:80].mean(axis=0)
    bright = np.nonzero(mid > 0.8)[0]
    assert abs(0.5 * (bright[0] + bright[-1]) - 74.5) <= 1.0
    # the tilt is kept (not straightened): top rows are left of the bottom rows
    top = np.nonzero(crop[5] > 0.8)[0].mean()
    bottom = np.nonzero(crop[144] > 0.8)[0].mean()
    assert bottom - top == pytest.approx(0.2 * 139, abs=3.0)
    # a naive centre crop would have cut the spine off-centre by ~40 columns
    naive = img[7:157, 75:225][70:80].mean(axis=0)
    assert abs(0.5 * (np.nonzero(naive > 0.8)[0][[0, -1]].sum()) - 74.5) > 30


def test_dxa_crop_pads_short_images_and_resamples_other_spacing():
    img = _tilted_spine(h=120, w=300, centre=150.0, slope=0.0)
    crop = rg.dxa_centerline_crop(img, fill=0.0)
    assert crop.shape == (150, 150)
    assert np.all(crop[:15] == 0.0) and np.all(crop[-15:] == 0.0)  # 30 rows of padding
    # same anatomy on 0.525 mm rows (240 rows): resampled to 1.05 mm first -> 120 rows, padded to 150
    fine = np.repeat(img, 2, axis=0)
    crop2 = rg.dxa_centerline_crop(fine, pixel_spacing_mm=(0.525, 0.6), fill=0.0)
    assert np.count_nonzero(crop2.any(axis=1)) == 120
    with pytest.raises(ValueError, match="found the spine on only"):
        rg.spine_centerline(np.zeros((100, 100)))
