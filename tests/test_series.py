"""Series loading: sorting, rescale, geometry checks, decoding (screener.series)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import (ImplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless)

from screener.series import SeriesUnusable, frame_number, load_volume, read_series_info
from tests.ct_factory import copy_with_fresh_uids, make_ct_series, make_enhanced_ct

SMALL = dict(rows=96, cols=96, pixel_spacing=3.4, n_slices=24)


def expected_body_hu(z: float) -> float:
    """Trabecular HU of the phantom column at patient z (see ct_factory levels)."""
    if -12.0 <= z <= 12.0:
        return 150.0
    if 20.0 <= z <= 44.0:
        return 190.0
    if -44.0 <= z <= -20.0:
        return 120.0
    return 80.0  # disc


def test_sorted_by_position_not_instance_number(tmp_path: Path) -> None:
    ct = make_ct_series(tmp_path, shuffle_instance_numbers=True, seed=3, **SMALL)
    inst = [int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber) for p in ct.paths]
    assert inst != sorted(inst)  # the factory really shuffled them
    vol = load_volume(list(reversed(ct.paths)))
    z = vol.slice_positions()[:, 2]
    assert np.all(np.diff(z) > 0)
    np.testing.assert_allclose(z, sorted(ct.z_positions), atol=1e-3)
    assert vol.spacing == pytest.approx((2.5, 3.4, 3.4))
    assert vol.array.dtype == np.float32
    # the pixel at the vertebral body centre follows the z of each slice
    j = int(round((35.0 - (-(96 / 2) + 0.5) * 3.4) / 3.4))
    i = 48
    for k, zk in enumerate(z):
        assert vol.array[k, j, i] == pytest.approx(expected_body_hu(zk), abs=0.5)
    assert vol.array[0, 0, 0] == -1000.0  # rescale applied: air
    assert [str(d.SOPInstanceUID) for d in vol.datasets] == [p.stem for p in vol.paths]
    assert "PixelData" not in vol.datasets[0]


@pytest.mark.parametrize("ts", [ImplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless,
                                RLELossless])
def test_transfer_syntaxes_decode_to_same_hu(tmp_path: Path, ts: str) -> None:
    ref = load_volume(make_ct_series(tmp_path / "ref", seed=1, noise_sd=15, **SMALL).paths)
    ct = make_ct_series(tmp_path / "ts", seed=1, noise_sd=15, transfer_syntax=ts, **SMALL)
    info = read_series_info(ct.paths)
    assert info.transfer_syntaxes == [ts]
    vol = load_volume(ct.paths)
    np.testing.assert_array_equal(vol.array, ref.array)


@pytest.mark.parametrize("kwargs, phrase", [
    (dict(drop_slices=[10]), "missing slices: gap of 5.00 mm"),
    (dict(spacing_jitter={10: 0.6}), "uneven slice spacing"),
    (dict(tilt_header_deg=15.0), "gantry tilt 15 degrees"),
    (dict(shear_deg=10.0), "deviate 10.0 degrees from the slice normal"),
    (dict(mixed_orientation_slice=5), "mixed orientations"),
    (dict(mixed_size_slice=5), "mixed image sizes"),
])
def test_unusable_geometry_is_declined_with_reason(tmp_path: Path, kwargs: dict, phrase: str) -> None:
    ct = make_ct_series(tmp_path, **SMALL, **kwargs)
    with pytest.raises(SeriesUnusable) as exc:
        load_volume(ct.paths)
    assert phrase in exc.value.reason


def test_duplicate_positions_and_mixed_series_declined(tmp_path: Path) -> None:
    a = make_ct_series(tmp_path / "a", **SMALL)
    b = make_ct_series(tmp_path / "b", **SMALL)
    with pytest.raises(SeriesUnusable, match="2 different series"):
        load_volume(a.paths + b.paths[:3])
    assert read_series_info(a.paths + b.paths[:3]).mixed_series
    dup = make_ct_series(tmp_path / "c", series_uid=a.series_uid, **SMALL)
    with pytest.raises(SeriesUnusable, match="duplicate slice positions"):
        load_volume(a.paths + dup.paths[:2])


def test_enhanced_ct_frames_load_like_the_single_frame_series(tmp_path: Path) -> None:
    ct = make_ct_series(tmp_path / "sf", seed=6, noise_sd=10, **SMALL)
    enh = make_enhanced_ct(ct.paths, tmp_path / "mf")
    info = read_series_info([enh])
    assert (info.n_instances, info.n_frames, info.is_multiframe) == (1, 24, True)
    assert info.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2.1" and info.is_axial
    assert info.z_coverage_mm == pytest.approx(23 * 2.5)
    ref, vol = load_volume(ct.paths), load_volume([enh])
    np.testing.assert_array_equal(vol.array, ref.array)
    np.testing.assert_allclose(vol.slice_positions(), ref.slice_positions(), atol=1e-4)
    assert vol.spacing == pytest.approx(ref.spacing)
    # frames were stored superior first: the lowest slice is the last frame
    assert [frame_number(d) for d in vol.datasets] == list(range(24, 0, -1))
    assert {str(d.SOPInstanceUID) for d in vol.datasets} == {enh.stem}
    assert frame_number(ref.datasets[0]) is None


def test_enhanced_ct_without_positions_is_declined(tmp_path: Path) -> None:
    ct = make_ct_series(tmp_path / "sf", **SMALL)
    enh = make_enhanced_ct(ct.paths, tmp_path / "mf")
    ds = pydicom.dcmread(enh)
    del ds.PerFrameFunctionalGroupsSequence[3].PlanePositionSequence
    ds.save_as(enh)
    with pytest.raises(SeriesUnusable, match="frame 4 lacks Plane Position"):
        load_volume([enh])


def test_monochrome1_values_are_rescaled_hu_with_warning(tmp_path: Path) -> None:
    m2 = load_volume(make_ct_series(tmp_path / "m2", seed=2, noise_sd=5, **SMALL).paths)
    m1 = load_volume(make_ct_series(tmp_path / "m1", seed=2, noise_sd=5,
                                    photometric="MONOCHROME1", **SMALL).paths)
    np.testing.assert_array_equal(m1.array, m2.array)
    assert any("MONOCHROME1" in w for w in m1.warnings)
    assert not m2.warnings


def test_undecodable_pixel_data_names_transfer_syntax_and_fix(tmp_path: Path) -> None:
    ct = make_ct_series(tmp_path, transfer_syntax=JPEG2000Lossless, **SMALL)
    ds = pydicom.dcmread(ct.paths[4])
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 60])  # broken J2K codestream
    ds.save_as(ct.paths[4])
    with pytest.raises(SeriesUnusable) as exc:
        load_volume(ct.paths)
    assert "JPEG 2000" in exc.value.reason and "1.2.840.10008.1.2.4.90" in exc.value.reason
    assert "pip install pylibjpeg-openjpeg" in exc.value.reason


@pytest.mark.parametrize("data", [b"\x00" * 10, b"hello, not DICOM at all " * 20])
def test_not_dicom_is_declined(tmp_path: Path, data: bytes) -> None:
    bad = tmp_path / "x.dcm"
    bad.write_bytes(data)
    for fn in (load_volume, read_series_info):
        with pytest.raises(SeriesUnusable, match=r"^x.dcm: not a (readable )?DICOM file"):
            fn([bad])


def test_truncated_file_is_declined(tmp_path: Path) -> None:
    ct = make_ct_series(tmp_path, **SMALL)
    data = ct.paths[5].read_bytes()
    ct.paths[5].write_bytes(data[: len(data) // 2])
    assert read_series_info(ct.paths).n_instances == 24   # headers still readable
    with pytest.raises(SeriesUnusable) as exc:
        load_volume(ct.paths)
    assert exc.value.reason.startswith(f"pixel data of {ct.paths[5].name} cannot be read")
    assert "Explicit VR Little Endian" in exc.value.reason
    assert "the file is truncated or damaged; resend the instance" in exc.value.reason


def test_real_jpeg2000_ct_with_fresh_uids(real_ct_dir: Path, tmp_path: Path) -> None:
    paths = copy_with_fresh_uids(real_ct_dir, tmp_path)
    info = read_series_info(paths)
    assert (info.modality, info.n_instances, info.kvp) == ("CT", 20, 120.0)
    assert info.contrast_enhanced and info.contrast_agent == "APPLIED"
    assert info.transfer_syntaxes == ["1.2.840.10008.1.2.4.90"]
    assert info.is_axial and 36.0 <= info.z_coverage_mm <= 40.0
    vol = load_volume(paths)
    assert vol.array.shape == (20, 512, 512)
    assert vol.spacing[0] == pytest.approx(2.0) and vol.spacing[1] == pytest.approx(0.9765625)
    a = vol.array
    assert a.min() == -1024.0                      # outside the reconstruction circle / air
    assert 1000.0 < a.max() < 3100.0               # cortical bone / contrast, 12-bit range
    body = a[(a > -200) & (a < 200)]
    assert 0.0 < float(np.median(body)) < 100.0   # soft tissue around water
    assert np.all(np.diff(vol.slice_positions()[:, 2]) > 0)


def test_real_ct_as_published_has_no_uids(real_ct_dir: Path) -> None:
    info = read_series_info(sorted(real_ct_dir.iterdir()))
    assert info.study_uid == "" and info.series_uid == ""
    assert info.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"  # from the file meta


def test_scout_inside_the_axial_series_is_left_out(tmp_path: Path) -> None:
    ct = make_ct_series(tmp_path / "ax", **SMALL)
    scout = make_ct_series(tmp_path / "sc", series_uid=ct.series_uid, n_slices=1, rows=96, cols=96,
                           pixel_spacing=3.4, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
                           orientation=(0, 1, 0, 0, 0, -1))
    paths = scout.paths + ct.paths
    info = read_series_info(paths)
    assert info.n_instances == 24 and info.n_scouts_excluded == 1
    assert info.image_type == ("ORIGINAL", "PRIMARY", "AXIAL") and info.is_axial
    vol = load_volume(paths)
    assert vol.array.shape[0] == 24
    assert vol.warnings == ["1 localizer/scout image(s) in the series left out"]
    only = read_series_info(scout.paths)
    assert only.image_type[2] == "LOCALIZER" and only.n_instances == 1


def test_kvp_is_a_positive_number_or_none() -> None:
    from pydicom.dataset import Dataset

    from screener.series import header_kvp

    for raw, want in (("120", 120.0), (80, 80.0), ("", None), ("0", None), ("-100", None)):
        ds = Dataset()
        if raw != "":
            ds.KVP = raw
        assert header_kvp(ds) == want, raw
    assert header_kvp(Dataset()) is None


def _converted(tmp_path: Path, kind: str, n_slices: int = 24, **kwargs) -> tuple[list[Path], Path]:
    """A small classic series and its Legacy Converted ("legacy") or Enhanced CT ("enhanced") file."""
    from training.phantoms import enhanced

    ct = make_ct_series(tmp_path / "sf", seed=4, noise_sd=10, **{**SMALL, "n_slices": n_slices},
                        **kwargs)
    src = [pydicom.dcmread(p) for p in ct.paths]
    ds = enhanced.to_legacy_converted(src) if kind == "legacy" else enhanced.to_enhanced_ct(src)
    return ct.paths, enhanced.write_multiframe(ds, tmp_path / kind)


@pytest.mark.parametrize("kind", ["legacy", "enhanced"])
def test_multiframe_ct_reads_kvp_agent_thickness_and_body_part_from_functional_groups(
        tmp_path: Path, kind: str) -> None:
    from screener.protocols.l1_attenuation.protocol import L1AttenuationProtocol
    from screener.series import header_kvp

    classic, mf = _converted(tmp_path, kind, kvp=100.0, contrast_agent="IOPAMIDOL")
    hdr = pydicom.dcmread(mf, stop_before_pixels=True)
    assert "KVP" not in hdr and "SliceThickness" not in hdr and "BodyPartExamined" not in hdr
    assert header_kvp(hdr) == 100.0
    ref, info = read_series_info(classic), read_series_info([mf])
    assert (info.kvp, info.contrast_agent, info.slice_thickness, info.body_part) == \
        (100.0, "IOPAMIDOL", 2.5, "ABDOMEN") == \
        (ref.kvp, ref.contrast_agent, ref.slice_thickness, ref.body_part)
    assert info.orientation == ref.orientation and info.n_frames == 24
    assert L1AttenuationProtocol().accepts(info).accepted
    vol = load_volume([mf])
    assert {(float(d.KVP), d.ContrastBolusAgent, d.BodyPartExamined) for d in vol.datasets} == \
        {(100.0, "IOPAMIDOL", "ABDOMEN")}
    assert {header_kvp(d) for d in vol.datasets} == {100.0}


def test_enhanced_contrast_usage_not_administered_is_no_agent(tmp_path: Path) -> None:
    from screener.series import header_contrast_agent

    _, mf = _converted(tmp_path, "enhanced", contrast_agent="IOPAMIDOL")
    ds = pydicom.dcmread(mf, stop_before_pixels=True)
    assert header_contrast_agent(ds) == "IOPAMIDOL"
    use = ds.SharedFunctionalGroupsSequence[0].ContrastBolusUsageSequence[0]
    use.ContrastBolusAgentAdministered = "NO"
    assert header_contrast_agent(ds) == ""
    del ds.SharedFunctionalGroupsSequence[0].ContrastBolusUsageSequence  # no usage: agent listed
    assert header_contrast_agent(ds) == "IOPAMIDOL"
    ds.save_as(mf)
    assert read_series_info([mf]).contrast_enhanced


def test_legacy_converted_kvp_per_frame_and_tilt_in_acquisition_details(tmp_path: Path) -> None:
    """KVP in the per-frame unassigned group (it differed between slices) is read per frame;
    a gantry tilt in CT Acquisition Details still declines the volume."""
    from pydicom.dataset import Dataset

    from screener.series import header_kvp

    _, mf = _converted(tmp_path, "legacy")
    ds = pydicom.dcmread(mf)
    shared = ds.SharedFunctionalGroupsSequence[0]
    del shared.UnassignedSharedConvertedAttributesSequence[0].KVP
    for k, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        item.UnassignedPerFrameConvertedAttributesSequence[0].KVP = 100 if k % 2 else 140
    ds.save_as(mf)
    assert read_series_info([mf]).kvp == 140.0           # the first frame's, as for a classic series
    assert [header_kvp(d) for d in load_volume([mf]).datasets][:2] == [100.0, 140.0]
    acq = Dataset()
    acq.GantryDetectorTilt = 12
    shared.CTAcquisitionDetailsSequence = [acq]
    ds.save_as(mf)
    with pytest.raises(SeriesUnusable, match="gantry tilt 12 degrees"):
        load_volume([mf])


def test_few_frame_multiframe_ct_is_not_a_volume(tmp_path: Path) -> None:
    from screener.protocols.base import axial_ct_decision

    _, mf = _converted(tmp_path, "legacy", n_slices=5)
    info = read_series_info([mf])
    assert info.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2.2"
    d = axial_ct_decision(info)
    assert not d.accepted and d.reason.startswith("only 5 frames (< 10)")


def test_series_read_once_loads_the_volume_read_twice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """read_series_info(with_pixels=True) + load_volume(datasets=...) read every file once and give
    the info and volume of the two separate reads (a scout left out, an enhanced CT's frames)."""
    import screener.series as series

    ct = make_ct_series(tmp_path / "ax", seed=4, noise_sd=10, shuffle_instance_numbers=True, **SMALL)
    scout = make_ct_series(tmp_path / "sc", series_uid=ct.series_uid, n_slices=1, rows=96, cols=96,
                           pixel_spacing=3.4, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
                           orientation=(0, 1, 0, 0, 0, -1))
    enh = make_enhanced_ct(ct.paths, tmp_path / "mf")
    for paths in (scout.paths + ct.paths, [enh]):
        ref_info, ref_vol = read_series_info(paths), load_volume(read_series_info(paths).paths)
        reads: list[Path] = []
        real = pydicom.dcmread
        monkeypatch.setattr(series.pydicom, "dcmread", lambda p, *a, **k: reads.append(Path(p)) or real(p, *a, **k))
        info = read_series_info(paths, with_pixels=True)
        vol = load_volume(info.paths, datasets=info.datasets)
        monkeypatch.setattr(series.pydicom, "dcmread", real)
        assert sorted(reads) == sorted(paths)  # once each
        assert info == ref_info and ref_info.datasets is None
        np.testing.assert_array_equal(vol.array, ref_vol.array)
        assert vol.spacing == ref_vol.spacing and vol.paths == ref_vol.paths and vol.warnings == ref_vol.warnings
        assert [d.SOPInstanceUID for d in vol.datasets] == [d.SOPInstanceUID for d in ref_vol.datasets]
        assert "PixelData" not in vol.datasets[0]
    with pytest.raises(ValueError, match="datasets given"):
        load_volume(ct.paths, datasets=[])


def test_volume_buffer_is_reused_only_when_nothing_refers_to_it() -> None:
    import gc

    from screener import series
    a = series._volume_buffer((3, 4, 5))
    b = series._volume_buffer((3, 4, 5))
    assert not np.shares_memory(a, b)           # the kept one is in use: a new one
    view = b[1]
    del b
    c = series._volume_buffer((3, 4, 5))
    assert not np.shares_memory(c, view)        # a view of it is alive: a new one
    del view, a, c
    gc.collect()
    kept = id(series._spare)
    d = series._volume_buffer((2, 4, 5))        # free and large enough: reused
    assert id(d.base) == kept and d.shape == (2, 4, 5) and d.dtype == np.float32


@pytest.mark.parametrize("ts", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"])
@pytest.mark.parametrize("signed,stored", [(0, 16), (0, 12), (1, 16), (1, 12), (1, 13), (0, 10)])
def test_native_frame_is_pydicoms_pixel_array(tmp_path: Path, ts: str, signed: int, stored: int) -> None:
    from pydicom.dataset import FileMetaDataset

    from screener import series
    rng = np.random.default_rng(signed * 100 + stored)
    raw = rng.integers(0, 65536, (37, 29), dtype=np.uint16)  # high bits set: they must be corrected
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Rows, ds.Columns, ds.SamplesPerPixel = 37, 29, 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, stored, stored - 1
    ds.PixelRepresentation, ds.PhotometricInterpretation = signed, "MONOCHROME2"
    ds.PixelData = raw.astype("<u2").tobytes()
    path = tmp_path / "x.dcm"
    ds.save_as(path, enforce_file_format=True, implicit_vr=ts == "1.2.840.10008.1.2")
    back = pydicom.dcmread(path)
    fast = series._native_frame(back, ts)
    want = pydicom.dcmread(path).pixel_array
    assert fast is not None and fast.dtype == want.dtype and np.array_equal(fast, want)
    back.PixelData = back.PixelData + b"\0\0"      # not exactly Rows x Columns x 2: pydicom's
    assert series._native_frame(back, ts) is None
    assert series._native_frame(back, "1.2.840.10008.1.2.4.90") is None
