"""TID 1500 SR and secondary capture: validity (dciodvfy, dsr2html), round trip, supersede."""
from __future__ import annotations

import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes as pcodes
from pydicom.sr.coding import Code

from screener import scores
from screener.config import Config
from screener.findings import Finding, Measurement, RoiGeometry
from screener.pipeline import OutputObject, PipelineResult, output_series_uid, process_series
from screener.protocols.l1_attenuation.protocol import L1AttenuationProtocol
from screener.reporting import codes
from screener.reporting.sc import build_sc, render_overlay, write_sc
from screener.reporting.sr import DEVICE_UID, build_sr, write_sr
from screener.series import load_volume
from tests.conftest import require_tool
from tests.ct_factory import copy_with_fresh_uids, make_ct_series, make_enhanced_ct

FAST = dict(rows=160, cols=160, pixel_spacing=1.2, n_slices=30, z_start=-36.0)


def assert_valid_dicom(path: Path) -> str:
    """dciodvfy must report no errors (warnings allowed); returns its output."""
    proc = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True, text=True,
                          timeout=60)
    out = proc.stdout + proc.stderr
    errors = [ln for ln in out.splitlines() if ln.startswith("Error")]
    assert proc.returncode == 0 and not errors, f"dciodvfy {path.name}:\n{out}"
    return out


def render_html(path: Path) -> str:
    proc = subprocess.run([require_tool("dsr2html"), "+U8", str(path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[PipelineResult, object, Path]:
    root = tmp_path_factory.mktemp("report")
    ct = make_ct_series(root / "in", l1_hu=97.0, noise_sd=8.0, seed=11, kvp=100.0,
                        contrast_agent="IOPAMIDOL", **FAST)
    from screener import contrast

    def portal_venous(volume, localization, info):  # noqa: ANN001, ANN202
        # the synthetic series has no vessels: the header's phase stands (the SR carries the
        # contrast-adjusted mean and its flag)
        return contrast.ContrastAssessment("portal_venous", True, "header (image inconclusive)", 0.6,
                                           {}, "IOPAMIDOL")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(contrast, "assess_contrast", portal_venous)
        res = process_series(ct.paths, config=Config(), out_dir=root / "job-1",
                             protocols=[L1AttenuationProtocol(localizer=ct.fake_localizer())])
    return res, ct, root


def test_pipeline_writes_sr_and_sc(first_run) -> None:  # noqa: ANN001
    res, ct, root = first_run
    assert res.status == "done" and res.reason == ""
    assert [o.kind for o in res.outputs] == ["SR", "SC", "SEG", "SEG"]  # ROIs, outlines: seg_output is on by default
    for o in res.outputs:
        assert isinstance(o, OutputObject) and o.path.parent == root / "job-1"
        assert o.path.name == f"{o.sop_instance_uid}.dcm" and o.supersedes == ""
    assert res.outputs[0].sop_class_uid == "1.2.840.10008.5.1.4.1.1.88.33"
    assert res.outputs[1].sop_class_uid == "1.2.840.10008.5.1.4.1.1.7"
    assert res.decisions == [("l1_attenuation", True,
                              "axial CT, 30 slices, 72 mm coverage; 1 finding(s)")]


def test_sr_is_valid_renders_and_round_trips(first_run) -> None:  # noqa: ANN001
    res, ct, _ = first_run
    (finding,) = res.findings
    sr_path = res.outputs[0].path
    out = assert_valid_dicom(sr_path)
    assert "ComprehensiveSR" in out
    html = render_html(sr_path)
    for text in ("L1 vertebra", "Not for diagnostic use without review", "Bone density scan",
                 "Likely osteoporosis (screening)", "mg/cm3", "Polyline", "Image Library",
                 f"{finding.measurement('L1 attenuation mean').value:.6g}"[:6]):
        assert text in html
    sr = hd.sr.srread(sr_path)
    src = pydicom.dcmread(ct.paths[0], stop_before_pixels=True)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"
    assert sr.StudyInstanceUID == ct.study_uid and sr.PatientID == src.PatientID
    assert sr.PatientName == src.PatientName and sr.AccessionNumber == src.AccessionNumber
    assert sr.SeriesInstanceUID == output_series_uid(ct.series_uid, "SR")
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    assert "PredecessorDocumentsSequence" not in sr
    # references to the source instances (evidence) = the pooled slices
    ev = {i.ReferencedSOPInstanceUID
          for s in sr.CurrentRequestedProcedureEvidenceSequence
          for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}
    assert ev == set(finding.referenced_sop_instance_uids) and len(ev) == 3
    # observation context: device observer with the stable UID
    (obs,) = sr.content.get_observer_contexts()
    assert obs.observer_identifying_attributes.uid == DEVICE_UID
    # one TID 1410 group: tracking ids, closed polyline on the ROI slice, measurement values
    (group,) = sr.content.get_planar_roi_measurement_groups()
    assert group.tracking_identifier == "L1 l1_attenuation" and group.tracking_uid
    assert group.reference_type == pcodes.DCM.ImageRegion
    roi = group.roi
    assert roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
    data = roi.value
    assert np.array_equal(data[0], data[-1])
    np.testing.assert_allclose(data, finding.roi.polygon, atol=1e-3)
    assert roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == \
        finding.roi.source_sop_instance_uid
    got = [(m.name.value, m.value, m.unit.value,
            m.derivation.value if m.derivation is not None else None)
           for m in group.get_measurements()]
    want = [(c.value, pytest.approx(m.value, abs=1e-6), m.unit, d.value if d is not None else None)
            for m in finding.measurements for c, d in [codes.sr_concept(m.concept, m.derivation)]]
    assert got == want
    names = {m.name for m in finding.measurements}
    assert names == {"L1 attenuation mean", "L1 attenuation SD", "L1 vBMD estimate", "ROI area",
                     "L1 attenuation mean, contrast-adjusted"}
    # issue 20: the ROI statistics carry PS3.16's own concepts, so a viewer that shows only the
    # concept name (OHIF) reads "Standard Deviation of Attenuation Coefficient", not a second
    # "Attenuation Coefficient"
    assert ("112181", pytest.approx(finding.measurement("L1 attenuation mean").value),
            "[hnsf'U]", None) in got
    assert ("112183", pytest.approx(finding.measurement("L1 attenuation SD").value),
            "[hnsf'U]", None) in got
    assert "112031" not in {g[0] for g in got}
    meanings = {m.name.meaning for m in group.get_measurements()}
    assert {"Mean Attenuation Coefficient", "Standard Deviation of Attenuation Coefficient"} <= meanings
    evals = {(e.name.value, e.value.value) for e in group.get_qualitative_evaluations()}
    assert ("BMDCAT", "LIKELYOP") in evals and ("INTUSE", "NODXREV") in evals
    assert ("FLAG", "CONTRAST") in evals and ("FLAG", "KVPNOT120") in evals
    assert group.finding_sites[0].value == pcodes.SCT.L1Vertebra
    assert group.finding_type == codes.FINDING_TYPE_BONE


def test_sc_is_valid_and_linked_to_the_ct(first_run) -> None:  # noqa: ANN001
    res, ct, _ = first_run
    (finding,) = res.findings
    sc_path = res.outputs[1].path
    assert_valid_dicom(sc_path)
    sc = pydicom.dcmread(sc_path)
    src = pydicom.dcmread(ct.paths[0], stop_before_pixels=True)
    assert sc.StudyInstanceUID == ct.study_uid and sc.PatientID == src.PatientID
    assert sc.SeriesInstanceUID == output_series_uid(ct.series_uid, "SC")
    assert sc.BurnedInAnnotation == "YES" and sc.BodyPartExamined == "ABDOMEN"
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == finding.roi.source_sop_instance_uid
    assert "bone window" in sc.DerivationDescription
    assert sc.PhotometricInterpretation == "RGB" and sc.Modality == "OT"
    px = sc.pixel_array
    assert px.shape == (160, 160, 3)
    # the ROI outline is burned in yellow at the polygon's leftmost vertex
    c, r = finding.roi.polygon[np.argmin(finding.roi.polygon[:, 0])]
    patch = px[int(r) - 2:int(r) + 3, int(c) - 2:int(c) + 3]
    assert np.any((patch[..., 0] > 200) & (patch[..., 1] > 200) & (patch[..., 2] < 80))


def test_ct_sr_and_sc_are_one_consistent_study(first_run) -> None:  # noqa: ANN001
    """dcentvfy: patient/study attributes agree across the CT, the SR and the SC."""
    res, ct, _ = first_run
    proc = subprocess.run([require_tool("dcentvfy"), *map(str, ct.paths[:3]),
                           *(str(o.path) for o in res.outputs)],
                          capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Error" not in out, out
    assert "StudyDescription" not in out, out


def test_superseding_sr_references_the_previous_one(first_run) -> None:  # noqa: ANN001
    res, ct, root = first_run
    old = res.outputs[0]
    res2 = process_series(ct.paths, config=Config(), out_dir=root / "job-2", supersedes=old.path,
                          protocols=[L1AttenuationProtocol(localizer=ct.fake_localizer())])
    assert res2.status == "done"
    new = res2.outputs[0]
    assert new.supersedes == old.sop_instance_uid and new.sop_instance_uid != old.sop_instance_uid
    assert_valid_dicom(new.path)
    sr = pydicom.dcmread(new.path)
    pre = sr.PredecessorDocumentsSequence[0]
    assert pre.StudyInstanceUID == ct.study_uid
    ref = pre.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == output_series_uid(ct.series_uid, "SR")
    assert ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == old.sop_instance_uid
    assert sr.SeriesInstanceUID == pydicom.dcmread(old.path).SeriesInstanceUID
    assert int(sr.InstanceNumber) == 2
    assert "Imaging Measurement Report" in render_html(new.path)


def test_reports_from_real_ct_headers_with_missing_type2(real_ct_dir: Path, tmp_path: Path) -> None:
    """The real CT lacks PatientSex, StudyID, AccessionNumber values: outputs stay valid."""
    paths = copy_with_fresh_uids(real_ct_dir, tmp_path / "in")
    vol = load_volume(paths[:3])
    k = 1
    src = vol.datasets[k]
    poly = np.array([[250, 300], [262, 300], [262, 312], [250, 312], [250, 300]], float)
    f = Finding(protocol="l1_attenuation", protocol_version="0.1.0", site="L1",
                site_code=codes.site_code("L1"),
                measurements=[Measurement("L1 attenuation mean", 180.5, "[hnsf'U]",
                                          codes.ATTENUATION, "Hounsfield unit", codes.MEAN)],
                category="likely normal", category_code=codes.category_code("likely normal"),
                flags=["contrast-enhanced (APPLIED): L1 reads ~+11 HU higher (Pickhardt 2016)"],
                roi=RoiGeometry(str(src.SOPInstanceUID), str(src.SOPClassUID), poly,
                                (0.0, 0.0, 0.0), 144.0, k),
                referenced_sop_instance_uids=[str(src.SOPInstanceUID)])
    f.overlay = render_overlay(vol.array[k], poly, ["L1 180 HU", "likely normal"])
    sr_path = write_sr(build_sr([f], vol.datasets), tmp_path / "out")
    assert_valid_dicom(sr_path)
    render_html(sr_path)
    sr = hd.sr.srread(sr_path)
    assert sr.PatientSex == "" and sr.StudyInstanceUID == str(src.StudyInstanceUID)
    (m,) = sr.content.get_planar_roi_measurement_groups()[0].get_measurements()
    assert m.value == pytest.approx(180.5)
    sc = build_sc(f, src, series_uid=pydicom.uid.generate_uid(),
                  sop_instance_uid=pydicom.uid.generate_uid())
    sc_path = write_sc(sc, tmp_path / "out")
    assert_valid_dicom(sc_path)
    assert pydicom.dcmread(sc_path).BodyPartExamined == "PARTIALBODY"


def test_generic_builder_accepts_findings_without_geometry(first_run, tmp_path: Path) -> None:  # noqa: ANN001
    """A later protocol's patient-level result (aBMD, T-score) becomes a TID 1501 group: an
    estimate concept with the "estimated by algorithm from CT" method, never a DXA LOINC code."""
    res, ct, _ = first_run
    vol_headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in ct.paths[:2]]
    dl = Finding(protocol="dxa_from_ct", protocol_version="2.0", site="lumbar spine",
                 site_code=codes.site_code("lumbar spine"),
                 measurements=[scores.bmd_measurement(0.812, site="L1-L4", name="L1-L4 aBMD"),
                               scores.t_score_measurement(-2.7, name="T-score")],
                 category="osteoporosis",
                 referenced_sop_instance_uids=[str(d.SOPInstanceUID) for d in vol_headers])
    sr_path = write_sr(build_sr(res.findings + [dl], list(pydicom.dcmread(p, stop_before_pixels=True)
                                                          for p in ct.paths)), tmp_path)
    assert_valid_dicom(sr_path)
    render_html(sr_path)
    sr = hd.sr.srread(sr_path)
    assert len(sr.content.get_planar_roi_measurement_groups()) == 1
    (g1501,) = sr.content.get_image_measurement_groups()
    assert g1501.tracking_identifier == "lumbar spine dxa_from_ct"
    vals = {m.name.value: (m.value, m.unit.value, m.method.value) for m in g1501.get_measurements()}
    assert vals == {"ABMDEST": (pytest.approx(0.812), "g/cm2", "ALGCT"),
                    "TSCOREEST": (pytest.approx(-2.7), "1", "ALGCT")}
    evals = {(e.name.value, e.value.value) for e in g1501.get_qualitative_evaluations()}
    assert ("BMDCAT", "64859006") in evals and ("INTUSE", "NODXREV") in evals


def test_build_sr_refuses_bad_input(first_run) -> None:  # noqa: ANN001
    res, ct, _ = first_run
    with pytest.raises(ValueError, match="at least one finding"):
        build_sr([], [])
    with pytest.raises(ValueError, match="not among the source datasets"):
        build_sr(res.findings, [pydicom.dcmread(ct.paths[0], stop_before_pixels=True)])
    f = Finding("x", "1", "L1", [], overlay=None)
    with pytest.raises(ValueError, match="has no overlay"):
        build_sc(f, pydicom.dcmread(ct.paths[0], stop_before_pixels=True), series_uid="1.2",
                 sop_instance_uid="1.2.3")
    assert Code("VBMD", "99SCRNR", "Volumetric bone mineral density") == codes.VBMD


def test_enhanced_ct_reports_reference_the_frame(tmp_path: Path) -> None:
    """Multi-frame source: the SR's SCOORD and the SC's source reference name the frame."""
    ct = make_ct_series(tmp_path / "sf", l1_hu=140.0, noise_sd=8.0, seed=3, **FAST)
    enh = make_enhanced_ct(ct.paths, tmp_path / "mf")
    res = process_series([enh], config=Config(), out_dir=tmp_path / "out",
                         protocols=[L1AttenuationProtocol(localizer=ct.fake_localizer())])
    assert res.status == "done", res.reason
    (f,) = res.findings
    assert f.measurement("L1 attenuation mean").value == pytest.approx(140.0, abs=2.0)
    # 30 frames stored superior first; the ROI slice index k is frame 30 - k
    assert f.roi.source_sop_instance_uid == enh.stem
    assert f.roi.frame_number == 30 - f.roi.slice_index
    assert f.to_record()["roi_source_frame_number"] == f.roi.frame_number
    sr_path, sc_path = (o.path for o in res.outputs)
    assert_valid_dicom(sr_path)
    assert_valid_dicom(sc_path)
    render_html(sr_path)
    (group,) = hd.sr.srread(sr_path).content.get_planar_roi_measurement_groups()
    ref = group.roi.ContentSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == enh.stem
    assert int(ref.ReferencedFrameNumber) == f.roi.frame_number
    src = pydicom.dcmread(sc_path).SourceImageSequence[0]
    assert src.ReferencedSOPInstanceUID == enh.stem
    assert int(src.ReferencedFrameNumber) == f.roi.frame_number


def test_seg_of_the_l1_roi_references_its_slice_and_round_trips(first_run, tmp_path: Path) -> None:  # noqa: ANN001
    """Issue 20 item 2: the L1 ROI as a binary DICOM SEG on its source slice: dciodvfy-clean, the
    segment labelled and coded with the site and the algorithm, its pixels those of the ROI."""
    from screener.reporting.seg import build_seg, roi_mask

    res, ct, _ = first_run
    (finding,) = res.findings
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in ct.paths]
    seg = build_seg(res.findings, headers, series_uid=output_series_uid(ct.series_uid, "SEG"))
    assert seg is not None
    path = tmp_path / "seg.dcm"
    seg.save_as(path)
    assert_valid_dicom(path)
    back = hd.seg.segread(path)
    assert back.StudyInstanceUID == ct.study_uid and back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    (desc,) = back.SegmentSequence
    assert desc.SegmentLabel == "L1 ROI (l1_attenuation)"
    assert desc.SegmentedPropertyTypeCodeSequence[0].CodeValue == pcodes.SCT.L1Vertebra.value
    assert desc.SegmentAlgorithmName == "screener l1_attenuation"
    refs = {i.ReferencedSOPInstanceUID for s in back.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence}
    assert refs == {finding.roi.source_sop_instance_uid}
    src = next(h for h in headers if str(h.SOPInstanceUID) == finding.roi.source_sop_instance_uid)
    mask = back.get_pixels_by_source_instance([finding.roi.source_sop_instance_uid],
                                              segment_numbers=[1])[0, :, :, 0].astype(bool)
    np.testing.assert_array_equal(mask, roi_mask(finding.roi.polygon, int(src.Rows), int(src.Columns)))
    # the polygon is the outline of the measured pixels: the mask's area is the ROI's area
    px = float(src.PixelSpacing[0]) * float(src.PixelSpacing[1])
    assert mask.sum() * px == pytest.approx(finding.roi.area_mm2, rel=0.15)
    # the second SEG: the L1 trabecular body the protocol outlined, on every slice it walked
    outlines = build_seg(res.findings, headers, content="layers")
    assert outlines is not None
    outlines.save_as(tmp_path / "outlines.dcm")
    assert_valid_dicom(tmp_path / "outlines.dcm")
    (body_desc,) = outlines.SegmentSequence
    assert body_desc.SegmentLabel == "L1 trabecular body (l1_attenuation)"
    assert body_desc.SegmentedPropertyTypeCodeSequence[0].CodeValue == pcodes.SCT.L1Vertebra.value
    [body] = finding.layers
    refs = {i.ReferencedSOPInstanceUID for s in outlines.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence}
    assert refs == set(body.planes) and finding.roi.source_sop_instance_uid in refs and len(refs) >= 5
    for uid, plane in body.planes.items():
        got = outlines.get_pixels_by_source_instance([uid], segment_numbers=[1])[0, :, :, 0].astype(bool)
        np.testing.assert_array_equal(got, plane)
    # the ROI lies inside the trabecular body (its margin from the cortex), which is larger
    in_body = body.planes[finding.roi.source_sop_instance_uid]
    assert (mask & in_body).sum() >= 0.95 * mask.sum() and in_body.sum() > 1.3 * mask.sum()
    # nothing to segment: no SEG
    assert build_seg([Finding("x", "1", "L1", [])], headers) is None


def test_the_roi_seg_is_switchable_and_marks_the_measured_pixels(first_run, tmp_path: Path) -> None:  # noqa: ANN001
    # issue 20: the ROI SEG (on by default, first_run) covers exactly the pixels inside the SR's ROI
    # polygon on the ROI's slice, and seg_output = false leaves it out
    from screener.reporting.seg import roi_mask

    res, ct, _ = first_run
    roi_out, outlines_out = [o for o in res.outputs if o.kind == "SEG"]
    seg = pydicom.dcmread(roi_out.path)
    [finding] = res.findings
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.StudyInstanceUID == finding.study_uid
    assert seg.SegmentSequence[0].SegmentLabel == "L1 ROI (l1_attenuation)"
    src = pydicom.dcmread(next(p for p in ct.paths if pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
                               == finding.roi.source_sop_instance_uid), stop_before_pixels=True)
    want = roi_mask(finding.roi.polygon, int(src.Rows), int(src.Columns))
    assert np.array_equal(seg.pixel_array.astype(bool), want) and want.sum() > 100
    outlines = pydicom.dcmread(outlines_out.path)
    assert [d.SegmentLabel for d in outlines.SegmentSequence] == ["L1 trabecular body (l1_attenuation)"]
    assert outlines.SeriesNumber == 905 and seg.SeriesNumber == 903
    res2 = process_series(ct.paths, config=Config(seg_output=False), out_dir=tmp_path / "no-seg",
                          protocols=[L1AttenuationProtocol(localizer=ct.fake_localizer())])
    assert [o.kind for o in res2.outputs] == ["SR", "SC"]
