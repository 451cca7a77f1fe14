"""Issue 14 item 3: every CT storage class gives the findings of the equivalent classic series.

One virtual-cohort CT (T11 centroid to L3 centroid, 80 kVp portal-venous profile, so that a lost
KVP or agent would change the finding's flags) is written as the classic CT Image series, as one
Legacy Converted Enhanced CT file (highdicom; KVP and ContrastBolusAgent only in
UnassignedSharedConvertedAttributesSequence) and as one Enhanced CT file (KVP only in the shared
CT X-Ray Details group, the agent only in the Enhanced Contrast/Bolus module and the shared
Contrast/Bolus Usage group): headers, volume, the ``l1_attenuation`` finding, its SR / SC frame
references and ``screener replay`` must agree.
"""
from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from screener.config import Config, load_config
from screener.db import Database
from screener.pipeline import process_series
from screener.protocols.base import ProtocolContext
from screener.protocols.l1_attenuation.protocol import L1AttenuationProtocol
from screener.replay import replay
from screener.results import finding_records
from screener.series import frame_number, load_volume, read_series_info
from tests.test_reporting import assert_valid_dicom, render_html
from training.phantoms import anatomy, ct, enhanced, population

PROFILE = "siemens_lowkv_80"   # 80 kVp, portal venous (IOHEXOL), 3 mm
KINDS = ("legacy", "enhanced")
SOP = {"classic": "1.2.840.10008.5.1.4.1.1.2", "legacy": "1.2.840.10008.5.1.4.1.1.2.2",
       "enhanced": "1.2.840.10008.5.1.4.1.1.2.1"}


@pytest.fixture(scope="module")
def cohort_ct(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """{"classic": 1 file per slice, "legacy": [one file], "enhanced": [one file]}."""
    root = tmp_path_factory.mktemp("every_ct_class")
    patient = population.sample_population(1, 14)[0]
    scene = anatomy.build_scene(patient)
    top, bottom = scene.vertebra("T11").centroid_mm[2], scene.vertebra("L3").centroid_mm[2]
    dss = ct.render_ct(scene, PROFILE, seed=14, z_range=(top, bottom))
    classic = ct.write_series(dss, root / "classic")
    src = [pydicom.dcmread(p) for p in classic]
    legacy = enhanced.write_multiframe(
        enhanced.to_legacy_converted(src, contrast_unassigned=True), root / "legacy")
    enh = enhanced.write_multiframe(enhanced.to_enhanced_ct(src), root / "enhanced")
    return {"classic": classic, "legacy": [legacy], "enhanced": [enh]}


def _kvp_places(ds: pydicom.Dataset) -> list[str]:
    """Where KVP sits in a multi-frame header (test-data guard)."""
    out = ["top"] if "KVP" in ds else []
    for name, seq in (("shared", ds.SharedFunctionalGroupsSequence),
                      ("per-frame", ds.PerFrameFunctionalGroupsSequence)):
        for item in seq:
            for elem in item:
                if elem.VR == "SQ" and elem.value and "KVP" in elem.value[0]:
                    out.append(f"{name}:{elem.keyword}")
    return sorted(set(out))


def test_test_data_hold_kvp_and_agent_only_in_the_functional_groups(cohort_ct) -> None:  # noqa: ANN001
    lce = pydicom.dcmread(cohort_ct["legacy"][0], stop_before_pixels=True)
    ect = pydicom.dcmread(cohort_ct["enhanced"][0], stop_before_pixels=True)
    assert _kvp_places(lce) == ["shared:UnassignedSharedConvertedAttributesSequence"]
    assert _kvp_places(ect) == ["shared:CTXRayDetailsSequence"]
    for ds in (lce, ect):
        assert "ContrastBolusAgent" not in ds and "SliceThickness" not in ds
        assert "ImageOrientationPatient" not in ds and "ImagePositionPatient" not in ds
    assert lce.SharedFunctionalGroupsSequence[0].UnassignedSharedConvertedAttributesSequence[0] \
        .ContrastBolusAgent == "IOHEXOL 350"
    assert ect.ContrastBolusAgentSequence[0].CodeMeaning == "IOHEXOL 350"
    assert ect.SharedFunctionalGroupsSequence[0].ContrastBolusUsageSequence[0] \
        .ContrastBolusAgentAdministered == "YES"
    assert_valid_dicom(cohort_ct["enhanced"][0])   # the Enhanced CT test object is a valid IOD


@pytest.mark.parametrize("kind", KINDS)
def test_series_info_matches_the_classic_series(cohort_ct, kind: str) -> None:  # noqa: ANN001
    ref, info = read_series_info(cohort_ct["classic"]), read_series_info(cohort_ct[kind])
    assert ref.kvp == 80.0 and ref.contrast_agent == "IOHEXOL 350" and ref.slice_thickness == 3.0
    assert info.sop_class_uid == SOP[kind] and ref.sop_class_uid == SOP["classic"]
    assert (info.n_instances, info.is_multiframe) == (1, True)
    for attr in ("kvp", "slice_thickness", "orientation", "contrast_agent", "contrast_enhanced",
                 "n_frames", "z_range_mm", "is_axial", "modality", "body_part", "study_uid"):
        assert getattr(info, attr) == getattr(ref, attr), attr
    assert info.image_type[:2] == ("ORIGINAL", "PRIMARY")
    assert L1AttenuationProtocol().accepts(info).accepted, L1AttenuationProtocol().accepts(info)


@pytest.mark.parametrize("kind", KINDS)
def test_volume_is_identical_to_the_classic_series(cohort_ct, kind: str) -> None:  # noqa: ANN001
    ref, vol = load_volume(cohort_ct["classic"]), load_volume(cohort_ct[kind])
    np.testing.assert_array_equal(vol.array, ref.array)
    assert vol.spacing == ref.spacing
    np.testing.assert_array_equal(vol.origin, ref.origin)
    np.testing.assert_array_equal(vol.direction, ref.direction)
    np.testing.assert_array_equal(vol.slice_positions(), ref.slice_positions())
    assert vol.warnings == ref.warnings == []
    n = ref.array.shape[0]
    # frames are stored superior first: the lowest slice is the last frame
    assert [frame_number(d) for d in vol.datasets] == list(range(n, 0, -1))
    # every frame header reads like the classic slice header
    for d, r in zip(vol.datasets, ref.datasets):
        assert (float(d.KVP), d.ContrastBolusAgent, float(d.SliceThickness)) == \
            (float(r.KVP), r.ContrastBolusAgent, float(r.SliceThickness))
        assert d.ConvolutionKernel == r.ConvolutionKernel


def _l1(paths: list[Path]):  # noqa: ANN202
    info, vol = read_series_info(paths), load_volume(paths)
    (f,) = L1AttenuationProtocol().run(vol, ProtocolContext(config=Config(), info=info))
    return f, vol


@pytest.fixture(scope="module")
def l1_findings(cohort_ct) -> dict:  # noqa: ANN001
    return {k: _l1(p) for k, p in cohort_ct.items()}


@pytest.mark.parametrize("kind", KINDS)
def test_l1_attenuation_gives_the_classic_finding(l1_findings, kind: str) -> None:  # noqa: ANN001
    (ref, ref_vol), (f, vol) = l1_findings["classic"], l1_findings[kind]
    assert f.measurement("L1 attenuation mean").value == ref.measurement("L1 attenuation mean").value
    assert [(m.name, m.value, m.unit) for m in f.measurements] == \
        [(m.name, m.value, m.unit) for m in ref.measurements]
    assert (f.category, f.flags, f.site) == (ref.category, ref.flags, ref.site)
    assert any("kVp 80" in fl for fl in f.flags) and any("IOHEXOL 350" in fl for fl in f.flags)
    assert f.roi.slice_index == ref.roi.slice_index
    np.testing.assert_array_equal(f.roi.polygon, ref.roi.polygon)
    # references name the multi-frame object and its frame (the classic one: the slice's file)
    assert ref.roi.frame_number is None
    assert f.roi.source_sop_instance_uid == str(vol.datasets[0].SOPInstanceUID)
    assert f.roi.frame_number == ref_vol.array.shape[0] - f.roi.slice_index


@pytest.mark.parametrize("kind", KINDS)
def test_sr_and_sc_reference_the_frame_and_are_valid(cohort_ct, l1_findings, kind: str,  # noqa: ANN001
                                                      tmp_path: Path) -> None:
    res = process_series(cohort_ct[kind], config=Config(), out_dir=tmp_path,
                         protocols=[L1AttenuationProtocol()])
    assert res.status == "done", res.reason
    (f,) = res.findings
    ref, _ = l1_findings["classic"]
    assert f.measurement("L1 attenuation mean").value == ref.measurement("L1 attenuation mean").value
    sr_path, sc_path = (o.path for o in res.outputs)
    assert_valid_dicom(sr_path)
    assert_valid_dicom(sc_path)
    render_html(sr_path)
    (group,) = hd.sr.srread(sr_path).content.get_planar_roi_measurement_groups()
    refd = group.roi.ContentSequence[0].ReferencedSOPSequence[0]
    assert refd.ReferencedSOPInstanceUID == cohort_ct[kind][0].stem
    assert refd.ReferencedSOPClassUID == SOP[kind]
    assert int(refd.ReferencedFrameNumber) == f.roi.frame_number
    src = pydicom.dcmread(sc_path).SourceImageSequence[0]
    assert (src.ReferencedSOPInstanceUID, int(src.ReferencedFrameNumber)) == \
        (cohort_ct[kind][0].stem, f.roi.frame_number)


def test_replay_of_the_multiframe_files_ends_with_the_classic_finding(
        cohort_ct, l1_findings, tmp_path: Path) -> None:  # noqa: ANN001
    """``screener replay`` (in process) of a folder holding both multi-frame files."""
    study = tmp_path / "study"
    for kind in KINDS:
        (study / kind).mkdir(parents=True)
        src = cohort_ct[kind][0]
        (study / kind / src.name).write_bytes(src.read_bytes())
    cfg = load_config(env={"SCREENER_PROTOCOLS": "l1_attenuation"}, data_dir=tmp_path / "data")
    rows, found = replay(study, cfg, progress=False)
    assert found.unusable == [] and len(rows) == 2
    assert all(r["status"] == "done" for r in rows), rows
    every = finding_records(Database(cfg.db_path))
    studies = [r for r in every if r["protocol"] == "study result"]  # each study's result first (issue 16)
    assert studies and every[0] is studies[0] and all(s["methods"] == ["l1_attenuation"] for s in studies)
    recs = [r for r in every if r["protocol"] != "study result"]
    assert len(recs) == 2 and {r["protocol"] for r in recs} == {"l1_attenuation"}
    ref, _ = l1_findings["classic"]
    for r in recs:
        means = {m["name"]: m["value"] for m in r["measurements"]}
        assert means["L1 attenuation mean"] == pytest.approx(
            ref.measurement("L1 attenuation mean").value, abs=1e-6)
        assert r["category"] == ref.category and r["flags"] == ref.flags
    # the stored finding names the frame (``screener results`` does not list it)
    data = [row["data"] for row in Database(cfg.db_path).findings()]
    assert {d["roi_source_sop_instance_uid"] for d in data} == {cohort_ct[k][0].stem for k in KINDS}
    assert all(d["roi_source_frame_number"] for d in data)
    srs = [pydicom.dcmread(f) for f in cfg.outbox_dir.rglob("*.dcm")]
    srs = [d for d in srs if d.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"]
    assert len(srs) == 2


def _route(paths: list[Path]) -> list[tuple[str, bool, str]]:
    from screener.protocols import default_protocols
    from screener.router import Router

    return [(p.name, d.accepted, d.reason)
            for p, d in Router(default_protocols()).route(read_series_info(paths))]


def test_every_protocol_decides_alike_on_every_ct_class(cohort_ct) -> None:  # noqa: ANN001
    """Header-only routing: each registered protocol accepts or refuses the multi-frame objects
    as it does the classic series, for the same reason (its slice count aside: see below)."""
    import re

    def norm(reason: str) -> str:
        return re.sub(r"\b\d+ slices\b", "N slices", reason)

    classic = _route(cohort_ct["classic"])
    assert [a for _, a, _ in classic] == [True, True, True, True, False, False]
    for kind in KINDS:
        assert [(n, a, norm(r)) for n, a, r in _route(cohort_ct[kind])] == \
            [(n, a, norm(r)) for n, a, r in classic], kind


def test_accept_reasons_count_the_frames_of_a_multiframe_object(cohort_ct) -> None:  # noqa: ANN001
    n = len(cohort_ct["classic"])
    for kind in KINDS:
        for name, accepted, reason in _route(cohort_ct[kind]):
            if accepted:
                assert f"{n} slices" in reason, (kind, name, reason)


@pytest.mark.slow
def test_every_protocol_finds_the_same_on_every_ct_class(tmp_path: Path) -> None:
    """Abdomen-pelvis coverage (L1-L4 and the femoral heads, 3 mm arterial, 100 kVp): all
    registered protocols through the pipeline give the classic series' findings (~3 min)."""
    scene = anatomy.build_scene(population.sample_population(1, 14)[0])
    classic = ct.write_series(ct.render_ct(scene, "philips_ap_arterial", seed=14),
                              tmp_path / "classic")
    src = [pydicom.dcmread(p) for p in classic]
    files = {"classic": classic,
             "legacy": [enhanced.write_multiframe(enhanced.to_legacy_converted(src),
                                                  tmp_path / "legacy")],
             "enhanced": [enhanced.write_multiframe(enhanced.to_enhanced_ct(src),
                                                    tmp_path / "enhanced")]}
    del src
    got = {}
    for kind, paths in files.items():
        res = process_series(paths, config=Config(), out_dir=tmp_path / "out" / kind)
        assert res.status == "done", (kind, res.reason)
        got[kind] = ([(n, a) for n, a, _ in res.decisions],
                     [(f.protocol, f.site, [(m.name, m.value, m.unit) for m in f.measurements],
                       f.category, f.flags) for f in res.findings])
    assert {p for p, _, _, _, _ in got["classic"][1]} == \
        {"l1_attenuation", "l1_axial", "femur_coronal", "lumbar_sagittal"}
    for kind in KINDS:
        assert got[kind] == got["classic"], kind
