"""Issue 20 item 2: the explanation map as a DICOM Parametric Map, its top decile as a SEG segment.

The pipeline writes every map layer a protocol made on CT slices (l1_axial's Grad-RAMP; the daemon
test ``test_model_protocols_daemon`` checks it with the shipped bundle) as a float Parametric Map
referencing its slice, and the map's top decile as a segment of the outlines SEG (what stock OHIF 3.13.2
can show: its Parametric Map loader needs a frame for every slice of the series).  Here a protocol
that adds a known map to l1_attenuation's finding checks the geometry and values exactly.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest

from screener.config import Config
from screener.explain import map_onto_slice
from screener.findings import ImageLayer
from screener.pipeline import process_series
from screener.protocols.l1_attenuation.protocol import L1AttenuationProtocol
from screener.reporting.pmap import PMAP_SERIES_DESCRIPTION, build_pmap
from screener.reporting.seg import top_decile
from screener.series import load_volume
from tests.ct_factory import make_ct_series
from tests.test_reporting import assert_valid_dicom

SMALL = dict(rows=160, cols=160, pixel_spacing=1.2, n_slices=30, z_start=-36.0)


def blob_on(rows: int, cols: int, centre: tuple[float, float], sigma: float = 12.0) -> np.ndarray:
    """A Gaussian map in [0, 1] peaking at ``centre`` (row, column), 0 beyond 3 sigma."""
    jj, ii = np.mgrid[0:rows, 0:cols]
    r2 = (jj - centre[0]) ** 2 + (ii - centre[1]) ** 2
    out = np.exp(-0.5 * r2 / sigma ** 2).astype(np.float32)
    out[r2 > (3 * sigma) ** 2] = 0.0
    return out


class WithMap(L1AttenuationProtocol):
    """l1_attenuation, plus a Gaussian "explanation map" centred on its ROI (a stand-in for a
    model's map: the writers do not care where a map comes from)."""

    def run(self, volume: Any, context: Any) -> list[Any]:
        findings = super().run(volume, context)
        f = findings[0]
        src = pydicom.dcmread(next(p for p in context.info.paths if pydicom.dcmread(
            p, stop_before_pixels=True).SOPInstanceUID == f.roi.source_sop_instance_uid), stop_before_pixels=True)
        col, row = np.asarray(f.roi.polygon[:-1], float).mean(axis=0) - 0.5
        f.layers.append(ImageLayer("map", "Test map", {f.roi.source_sop_instance_uid:
                                                      blob_on(int(src.Rows), int(src.Columns), (row, col))},
                                   method="a Gaussian on the ROI (test)"))
        return findings


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Path]:
    root = tmp_path_factory.mktemp("pmap")
    ct = make_ct_series(root / "in", l1_hu=97.0, noise_sd=8.0, seed=11, **SMALL)
    res = process_series(ct.paths, config=Config(), out_dir=root / "job",
                         protocols=[WithMap(localizer=ct.fake_localizer())])
    assert res.status == "done", res.reason
    return res, ct, root


def test_the_map_is_a_parametric_map_on_its_slice_with_its_values(run) -> None:  # noqa: ANN001
    res, ct, _ = run
    assert [o.kind for o in res.outputs] == ["SR", "SC", "SEG", "SEG", "PMAP"]
    [out] = [o for o in res.outputs if o.kind == "PMAP"]
    assert_valid_dicom(Path(out.path))
    pm = pydicom.dcmread(out.path)
    [finding] = res.findings
    [layer] = [x for x in finding.layers if x.kind == "map"]
    [uid] = layer.planes
    assert pm.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30" and pm.SOPInstanceUID == out.sop_instance_uid
    assert pm.StudyInstanceUID == ct.study_uid and pm.SeriesDescription == PMAP_SERIES_DESCRIPTION
    assert pm.NumberOfFrames == 1 and (pm.Rows, pm.Columns) == layer.planes[uid].shape
    frame = pm.PerFrameFunctionalGroupsSequence[0]
    assert frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID == uid
    # the frame lies where its slice lies
    src = load_volume(ct.paths)
    k = [src.sop_instance_uid(i) for i in range(src.array.shape[0])].index(uid)
    ipp = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
    np.testing.assert_allclose(ipp, src.index_to_patient(k, 0, 0), atol=1e-3)
    # the values, as floats, with an identity real-world value mapping (no units)
    np.testing.assert_array_equal(pm.pixel_array.astype(np.float32), layer.planes[uid])
    rwvm = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert (float(rwvm.RealWorldValueSlope), float(rwvm.RealWorldValueIntercept)) == (1.0, 0.0)
    assert rwvm.MeasurementUnitsCodeSequence[0].CodeValue == "1"
    # the algorithm is identified (IHE AIR): the finding's, and how the map was made
    [eq] = [e for e in pm.ContributingEquipmentSequence if e.Manufacturer == "screener"]
    assert eq.ManufacturerModelName == "screener l1_attenuation" and "Gaussian" in eq.ContributionDescription
    assert pm.ContentDescription.startswith("Test map of screener l1_attenuation")
    anatomy = pm.SharedFunctionalGroupsSequence[0].FrameAnatomySequence[0]
    assert anatomy.AnatomicRegionSequence[0].CodeValue == finding.site_code.value and anatomy.FrameLaterality == "U"


def test_the_maps_top_decile_is_a_segment_of_the_outlines_seg(run) -> None:  # noqa: ANN001
    res, _, _ = run
    [finding] = res.findings
    [layer] = [x for x in finding.layers if x.kind == "map"]
    [uid] = layer.planes
    _, out = [o for o in res.outputs if o.kind == "SEG"]  # the ROIs' SEG, then the outlines'
    seg = hd.seg.segread(out.path)
    labels = [d.SegmentLabel for d in seg.SegmentSequence]
    assert labels == ["L1 trabecular body (l1_attenuation)", "Test map top decile (l1_attenuation)"]
    got = seg.get_pixels_by_source_instance([uid], segment_numbers=[2])[0, :, :, 0].astype(bool)
    plane = layer.planes[uid]
    np.testing.assert_array_equal(got, top_decile(layer.planes)[uid])
    # a tenth of the pixels the map covers, and they are its highest
    covered = int((plane > 0).sum())
    assert got.sum() == pytest.approx(0.1 * covered, rel=0.05)
    assert plane[got].min() >= plane[(plane > 0) & ~got].max()


def test_each_output_is_switchable(run) -> None:  # noqa: ANN001
    _, ct, root = run
    for cfg, want in ((Config(pmap_output=False), ["SR", "SC", "SEG", "SEG"]),
                      (Config(seg_output=False), ["SR", "SC", "PMAP"])):
        res = process_series(ct.paths, config=cfg, out_dir=root / f"switch-{len(want)}-{want[-1]}",
                             protocols=[WithMap(localizer=ct.fake_localizer())])
        assert [o.kind for o in res.outputs] == want


def test_build_pmap_refuses_a_mask_or_an_unknown_image(run) -> None:  # noqa: ANN001
    res, ct, _ = run
    [finding] = res.findings
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in ct.paths]
    [body] = [x for x in finding.layers if x.kind == "mask"]
    with pytest.raises(ValueError, match="map layer"):
        build_pmap(finding, body, headers)
    stray = ImageLayer("map", "x", {"1.2.3.4": np.zeros((4, 4), np.float32)})
    with pytest.raises(ValueError, match="not among the source headers"):
        build_pmap(finding, stray, headers)


def test_a_crop_map_lands_on_the_slice_pixels_it_was_made_on(tmp_path: Path) -> None:
    """:func:`map_onto_slice`: a map on a finer crop plane (0.5 px) returns to the slice pixels it
    covers, the right way round (a marked corner stays in its corner), also with rows and columns
    swapped (u along the slice's rows)."""
    ct = make_ct_series(tmp_path / "in", l1_hu=97.0, noise_sd=8.0, seed=3, **SMALL)
    vol = load_volume(ct.paths)
    k, (dj, di) = 10, vol.spacing[1:]
    d = np.asarray(vol.direction, float)
    j0, i0, n = 40, 60, 40  # the crop: slice pixels [40, 60) x [60, 80), sampled every half pixel
    values = np.zeros((n, n), np.float32)
    values[:10, :4] = 1.0  # the crop's first 5 rows and 2 columns of slice pixels
    origin = vol.index_to_patient(k, j0 - 0.25, i0 - 0.25)
    got = map_onto_slice(values, origin, d[:, 0], d[:, 1], (dj / 2, di / 2), vol, k)
    assert got.shape == vol.array.shape[1:]
    hot = got > 0.99
    assert hot[j0:j0 + 5, i0:i0 + 2].all() and hot.sum() == 10
    assert got[:, :i0 - 1].max() == 0 and got[j0 + n // 2 + 1:, :].max() == 0
    # the same crop described with u and v swapped: the values transposed come back the same way
    got_t = map_onto_slice(values.T, origin, d[:, 1], d[:, 0], (di / 2, dj / 2), vol, k)
    np.testing.assert_allclose(got_t, got, atol=1e-6)
