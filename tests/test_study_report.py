"""Issue 16: one coherent report per study -- the study-level result first, coverage of every
protocol, T-score references, estimate codes with methods, laterality, named probabilities."""
from __future__ import annotations

import re
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from screener import references, scores
from screener.config import Config, ConfigError, load_config
from screener.findings import Finding
from screener.pipeline import process_series
from screener.protocols.l1_attenuation.protocol import L1AttenuationProtocol
from screener.protocols.l1_axial.protocol import L1AxialProtocol
from screener.reporting import codes
from screener.reporting.sr import build_sr, dxa_loinc_codes, write_sr
from screener.study_result import DISCORDANT, study_result
from tests.ct_factory import make_ct_series
from tests.test_reporting import FAST, assert_valid_dicom, render_html


@pytest.fixture(scope="module")
def ct_run(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """A CT whose L1 reads 97 HU, run through l1_attenuation (fake localizer) and l1_axial (which
    declines: its own localizer finds no level anchor in a 72 mm synthetic block)."""
    root = tmp_path_factory.mktemp("study")
    ct = make_ct_series(root / "in", l1_hu=97.0, noise_sd=8.0, seed=11, **FAST)
    res = process_series(ct.paths, config=Config(), out_dir=root / "out",
                         protocols=[L1AttenuationProtocol(localizer=ct.fake_localizer()), L1AxialProtocol()])
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in ct.paths]
    return res, headers, root


def model_finding(protocol: str, site: str, bmd: float, uid: str, *, interval: tuple[float, float] | None = None,
                  side: str | None = None) -> Finding:
    """A model protocol's finding with a BMD estimate and its T-score (default references)."""
    t, ref = scores.t_score_for(bmd, site)
    tm = scores.t_score_measurement(t, site=site, name=f"{site} T-score", reference=ref)
    if interval is not None:
        tm.interval = ((interval[0] - ref["mean"]) / ref["sd"], (interval[1] - ref["mean"]) / ref["sd"])
    grade = scores.who_grade(t)
    site_key = site if site in codes.SITES else "lumbar spine"
    return Finding(protocol, "9.9.9", site, [scores.bmd_measurement(bmd, site=site, name=f"{site} BMD"), tm],
                   category=grade, category_code=codes.category_code(grade), site_code=codes.site_code(site_key),
                   referenced_sop_instance_uids=[uid],
                   details={"bundle_id": f"{protocol}@0.5.0", "bundle_version": "0.5.0",
                            **({"side": side} if side else {})})


def kang_bmd(t: float) -> float:
    return 0.9747 + t * 0.1185


def spine_bmd(t: float) -> float:
    return 1.047 + t * 0.110


# ------------------------------------------------------------------ the rule
def test_agreement_gives_one_category_listing_every_method(ct_run) -> None:  # noqa: ANN001
    res, headers, _ = ct_run
    (hu,) = res.findings
    uid = str(headers[0].SOPInstanceUID)
    found = [hu, model_finding("l1_axial", "L1", kang_bmd(-3.0), uid),
             model_finding("lumbar_sagittal", "L1-L4", spine_bmd(-2.8), uid)]
    r = study_result(found)
    assert r.category == "likely osteoporosis"
    assert r.methods == ["l1_attenuation", "l1_axial", "lumbar_sagittal"]
    assert r.agreement == "all 3 methods agree"
    # two hips of one method are two measurements, not two methods
    hips = [model_finding("hip_xray", f"{s} femoral neck", 0.62, uid, side=s[0].upper()) for s in ("right", "left")]
    assert study_result(hips).agreement == "all 2 measurements (1 method) agree"
    by = {c.protocol: c for c in r.contributions}
    assert by["l1_attenuation"].value.startswith("L1 96.") and by["l1_attenuation"].grade == "osteoporosis"
    # 96.9 HU +/- 15 reaches the 110-160 band: osteopenia stays compatible
    assert by["l1_attenuation"].compatible == ["osteoporosis", "osteopenia"]
    assert by["l1_axial"].compatible == ["osteoporosis"]            # T -3.0 +/- 0.5
    assert by["lumbar_sagittal"].compatible == ["osteoporosis", "osteopenia"]  # T -2.8 +/- 0.5


def test_disagreement_beyond_the_intervals_is_discordant(ct_run) -> None:  # noqa: ANN001
    res, headers, _ = ct_run
    uid = str(headers[0].SOPInstanceUID)
    r = study_result([res.findings[0], model_finding("l1_axial", "L1", kang_bmd(0.5), uid)])
    assert r.category == DISCORDANT == "discordant \u2014 review" and r.grade is None
    assert "l1_attenuation (osteoporosis) and l1_axial (normal)" in r.agreement


def test_an_interval_that_reaches_the_other_grade_is_not_discordant(ct_run) -> None:  # noqa: ANN001
    res, headers, _ = ct_run
    uid = str(headers[0].SOPInstanceUID)
    # T -1.5 (osteopenia) with a 90 % interval T -2.7 .. -0.4: compatible with the HU's osteoporosis
    f = model_finding("l1_axial", "L1", kang_bmd(-1.5), uid, interval=(kang_bmd(-2.7), kang_bmd(-0.4)))
    r = study_result([res.findings[0], f])
    assert r.category == "likely osteoporosis"   # the measured HU ranks first
    assert "differ in grade" in r.agreement
    # an estimate with no interval (T -1.6 +/- 0.5) reaches osteopenia only: the HU's own
    # range (96.9 +/- 15 HU) reaches osteopenia too, so the one grade both allow is osteopenia
    g = model_finding("l1_axial", "L1", kang_bmd(-1.6), uid)
    r2 = study_result([res.findings[0], g])
    assert r2.contributions[1].compatible == ["osteopenia"] and r2.category == "likely osteopenia"


def test_hu_between_thresholds_alone_is_indeterminate() -> None:
    from screener.findings import Measurement

    f = Finding("l1_attenuation", "0.2.0", "L1",
                [Measurement("L1 attenuation mean", 135.0, codes.UNIT_HU[0], codes.ATTENUATION)],
                category="indeterminate")
    r = study_result([f])
    assert r.category == "indeterminate" and r.contributions[0].compatible == ["osteopenia"]
    assert study_result([]).category == "no bone density grade"


# ------------------------------------------------------------------ the SR
def _imaging_measurements(sr: pydicom.Dataset) -> list[pydicom.Dataset]:
    (container,) = [i for i in sr.ContentSequence
                    if i.ValueType == "CONTAINER" and i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    return list(container.ContentSequence)


def _tracking(group: pydicom.Dataset) -> str:
    return next(str(i.TextValue) for i in group.ContentSequence
                if i.ConceptNameCodeSequence[0].CodeValue == "112039")


def _qualitative(sr: pydicom.Dataset) -> list[pydicom.Dataset]:
    """TID 1500's Qualitative Evaluations (UMLS C0034375): the study result and the coverage."""
    (container,) = [i for i in sr.ContentSequence
                    if i.ValueType == "CONTAINER" and i.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
    return list(container.ContentSequence)


def test_sr_of_three_protocols_gives_the_study_result_outside_the_measurement_groups(
        ct_run, tmp_path: Path) -> None:  # noqa: ANN001
    """Issue 20: the study result and the coverage have no image region, so they are TID 1500
    Qualitative Evaluations, not measurement groups (OHIF 3.13 fails on a group it cannot draw)."""
    res, headers, _ = ct_run
    uid = str(headers[0].SOPInstanceUID)
    found = [res.findings[0], model_finding("l1_axial", "L1", kang_bmd(-3.0), uid),
             model_finding("lumbar_sagittal", "L1-L4", spine_bmd(-2.8), uid)]
    decisions = [("l1_attenuation", True, "1 finding(s)"), ("l1_axial", True, "1 finding(s)"),
                 ("lumbar_sagittal", True, "1 finding(s)"),
                 ("femur_coronal", False, "femoral heads not in coverage: the scan ends above the hips")]
    path = write_sr(build_sr(found, headers, decisions=decisions), tmp_path)
    assert_valid_dicom(path)
    sr = pydicom.dcmread(path)
    groups = _imaging_measurements(sr)
    assert [_tracking(g) for g in groups] == ["L1 l1_attenuation", "L1 l1_axial", "L1-L4 lumbar_sagittal"]
    top = [i.ConceptNameCodeSequence[0].CodeValue for i in sr.ContentSequence]
    assert top.index("126010") < top.index("C0034375")  # TID 1500 row order
    qual = _qualitative(sr)
    coded = [(i.ConceptNameCodeSequence[0].CodeValue, i.ConceptCodeSequence[0].CodeValue)
             for i in qual if i.ValueType == "CODE"]
    assert coded[:2] == [("STUDYRES", "LIKELYOP"), ("INTUSE", "NODXREV")]
    assert [c for c in coded if c[0] == "PROTOUT"] == [("PROTOUT", "PROTRAN")] * 3 + [("PROTOUT", "PROTNOTRUN")]
    html = render_html(path)
    at = html.index("Study result: likely osteoporosis; all 3 methods agree")
    for method in ("L1 attenuation measured on CT", "L1 BMD estimated by algorithm from CT",
                   "L1-L4 BMD estimated by algorithm from CT"):
        assert at < html.index(method, at), method
    assert at < html.index("femur WHO class from CT (femur_coronal) not measured: femoral heads not in coverage")
    assert not dxa_loinc_codes(sr)


def test_discordant_sr_says_review_and_gives_no_grade(ct_run, tmp_path: Path) -> None:  # noqa: ANN001
    res, headers, _ = ct_run
    uid = str(headers[0].SOPInstanceUID)
    path = write_sr(build_sr([res.findings[0], model_finding("l1_axial", "L1", kang_bmd(0.5), uid)], headers),
                    tmp_path)
    assert_valid_dicom(path)
    qual = _qualitative(pydicom.dcmread(path))
    values = {i.ConceptCodeSequence[0].CodeValue for i in qual if i.ValueType == "CODE"}
    assert "DISCORDANT" in values and not values & {"LIKELYOP", "LIKELYNORM", "LIKELYPENIA"}
    assert "Study result: discordant - review" in render_html(path)


def test_declined_protocol_and_its_reason_are_in_the_sr(ct_run) -> None:  # noqa: ANN001
    res, _, _ = ct_run
    assert res.status == "done"
    assert [(n, a) for n, a, _ in res.decisions] == [("l1_attenuation", True), ("l1_axial", False)]
    reason = res.decisions[1][2]
    assert reason.startswith("L1 not in view")
    sr_path = res.outputs[0].path
    assert_valid_dicom(sr_path)
    html = render_html(sr_path)
    assert f"L1 BMD estimate from CT (l1_axial) not measured: {reason}" in html
    assert "L1 attenuation (CT) (l1_attenuation): measured" in html
    assert html.index("Study result: likely osteoporosis") < html.index("(l1_axial) not measured")
    # the study result is also recorded with the finding for `screener results`
    assert res.findings[0].details["study_result"]["category"] == "likely osteoporosis"


def test_estimates_carry_method_reference_and_no_dxa_code(ct_run, tmp_path: Path) -> None:  # noqa: ANN001
    _, headers, _ = ct_run
    uid = str(headers[0].SOPInstanceUID)
    f = model_finding("l1_axial", "L1", 0.685, uid)
    path = write_sr(build_sr([f], headers), tmp_path)
    assert_valid_dicom(path)
    sr = hd.sr.srread(path)
    (group,) = [g for g in sr.content.get_image_measurement_groups() if g.tracking_identifier == "L1 l1_axial"]
    ms = {m.name.value: m for m in group.get_measurements()}
    assert set(ms) == {"ABMDEST", "TSCOREEST"}
    assert {m.method.value for m in ms.values()} == {"ALGCT"}
    assert ms["TSCOREEST"].value == pytest.approx((0.685 - 0.9747) / 0.1185, abs=1e-6)   # -2.445
    html = render_html(path)
    assert "T-score reference: Kang et al. 2023 L1 DXA young-adult reference (as the paper states), " \
           "mean 0.9747 g/cm2, SD 0.1185" in html
    assert 'Algorithm Name = "screener l1_axial model bundle l1_axial"' in html
    assert 'Algorithm Version = "0.5.0"' in html


def test_left_and_right_femoral_necks_differ_by_laterality(ct_run, tmp_path: Path) -> None:  # noqa: ANN001
    _, headers, _ = ct_run
    uid = str(headers[0].SOPInstanceUID)
    right = model_finding("hip_xray", "right femoral neck", 0.70, uid, side="R")
    left = model_finding("hip_xray", "left femoral neck", 0.66, uid, side="L")
    path = write_sr(build_sr([right, left], headers), tmp_path)
    assert_valid_dicom(path)
    sr = pydicom.dcmread(path)
    lat = {}
    for g in _imaging_measurements(sr):
        site = next(i for i in g.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "363698007")
        assert site.ConceptCodeSequence[0].CodeValue == "29627003"
        (mod,) = site.ContentSequence
        lat[_tracking(g)] = (mod.ConceptNameCodeSequence[0].CodeValue, mod.ConceptCodeSequence[0].CodeValue)
    assert lat == {"right femoral neck hip_xray": ("272741003", "24028007"),
                   "left femoral neck hip_xray": ("272741003", "7771000")}


def test_probabilities_name_their_event() -> None:
    ms = [scores.probability_measurement(n, p, of=e) for n, p, e in
          (("Scoliosis probability", 0.2, "scoliosis"), ("Spine BMD unreliable probability", 0.7, "unreliable"),
           ("Fracture probability", 0.1, "fracture"))]
    assert [m.concept.meaning for m in ms] == ["Probability of scoliosis",
                                               "Probability that spine DXA BMD is unreliable",
                                               "Probability of raised fracture risk"]
    assert len({m.concept.value for m in ms}) == 3
    with pytest.raises(ValueError, match="unknown event"):
        scores.probability_measurement("P", 0.5, of="anything")


def test_vbmd_caveat_sits_under_the_vbmd_and_not_under_a_bmd_estimate(ct_run) -> None:  # noqa: ANN001
    res, _, _ = ct_run
    sr = pydicom.dcmread(res.outputs[0].path)
    (group,) = _imaging_measurements(sr)
    nums = {i.ConceptNameCodeSequence[0].CodeValue: i for i in group.ContentSequence if i.ValueType == "NUM"}
    under = [c for c in nums["VBMD"].ContentSequence if c.ValueType in ("CODE", "TEXT")]
    assert any(c.ValueType == "CODE" and c.ConceptCodeSequence[0].CodeValue == "VBMDEST" for c in under)
    assert any(c.ValueType == "TEXT" and str(c.TextValue).startswith("vBMD is an estimate") for c in under)
    group_codes = [i.ConceptCodeSequence[0].CodeValue for i in group.ContentSequence if i.ValueType == "CODE"]
    assert "VBMDEST" not in group_codes
    assert codes.flag_code("L1 aBMD estimated by a deep-learning model (x); not a DXA measurement") is None


# ------------------------------------------------------------------ references
def test_one_reference_per_site_selectable_and_sex_specific() -> None:
    t, rec = scores.t_score_for(0.70, "left femoral neck", "M")
    assert rec["key"] == "nhanes3_fn_women" and t == pytest.approx((0.70 - 0.858) / 0.120)  # default: women's
    cfg = load_config(env={"SCREENER_REFERENCE_FEMORAL_NECK": "nhanes3_fn"})
    t_m, rec_m = scores.t_score_for(0.70, "right femoral neck", "M", cfg)
    assert rec_m["key"] == "nhanes3_fn_men" and t_m == pytest.approx((0.70 - 0.934) / 0.137)
    _, rec_f = scores.t_score_for(0.70, "femoral neck", "F", cfg)
    _, rec_u = scores.t_score_for(0.70, "femoral neck", "", cfg)
    assert rec_f["key"] == rec_u["key"] == "nhanes3_fn_women" and rec_u["sex_used"] == "F (sex not stated)"
    with pytest.raises(ConfigError, match="reference_l1 = 'nhanes3_fn' is a femoral neck reference"):
        load_config(env={"SCREENER_REFERENCE_L1": "nhanes3_fn"})


def test_two_protocols_at_the_same_site_get_the_same_reference(ct_run) -> None:  # noqa: ANN001
    _, headers, _ = ct_run
    uid = str(headers[0].SOPInstanceUID)
    a = model_finding("hip_xray", "left femoral neck", 0.70, uid)
    b = model_finding("other_hip_model", "femoral neck", 0.70, uid)
    for m in b.measurements:  # a protocol that used its own numbers
        if m.concept == codes.TSCORE_ESTIMATE:
            m.value, m.reference = -9.0, {"population": "made up", "mean": 1.0, "sd": 0.01}
    cfg = Config(reference_femoral_neck="nhanes3_fn")
    scores.apply_references([a, b], sex="M", config=cfg)
    ta, tb = (next(m for m in f.measurements if m.concept == codes.TSCORE_ESTIMATE) for f in (a, b))
    assert ta.reference == tb.reference and ta.reference["key"] == "nhanes3_fn_men"
    assert ta.value == tb.value == pytest.approx((0.70 - 0.934) / 0.137)
    assert a.category == b.category == "osteopenia"


def test_every_sr_this_module_wrote_is_free_of_dxa_loinc_codes(ct_run) -> None:  # noqa: ANN001
    """The conftest hook checks each test's SRs; this checks the module's pipeline output directly."""
    _, _, root = ct_run
    srs = [p for p in root.rglob("*.dcm") if pydicom.dcmread(p, stop_before_pixels=True).Modality == "SR"]
    assert srs and all(not dxa_loinc_codes(pydicom.dcmread(p)) for p in srs)
    text = "".join(p.read_bytes().decode("latin-1") for p in srs)
    assert not re.search("|".join(map(re.escape, codes.DXA_LOINC_CODES)), text)


# ------------------------------------------------------------------ screener results
def test_results_start_each_study_with_one_result_over_all_its_series(ct_run, tmp_path: Path) -> None:  # noqa: ANN001
    """A CT series (L1 96.9 HU) and a hip radiograph series (both necks normal) of ONE study: the
    study record combines both series and says "discordant — review"; a second study that has
    only the CT gets its own record."""
    from screener.db import Database
    from screener.results import finding_records, to_csv

    res, headers, _ = ct_run
    uid = str(headers[0].SOPInstanceUID)
    (hu,) = res.findings
    hips = [model_finding("hip_xray", f"{side} femoral neck", 0.95, uid, side=side[0].upper())
            for side in ("right", "left")]
    db = Database(tmp_path / "screener.db")
    for job, series, f in ((1, "1.2.3.1", hu), (2, "1.2.3.2", hips[0]), (2, "1.2.3.2", hips[1]),
                           (3, "1.2.9.1", hu)):
        study = "1.2.9" if series.startswith("1.2.9") else "1.2.3"
        rec = f.to_record()
        rec.update(study_uid=study, series_uid=series)
        db.record_finding(job, series, study, f.protocol, f.site, f.category, rec)
    recs = finding_records(db)
    assert [(r["study_uid"], r["protocol"]) for r in recs] == [
        ("1.2.3", "study result"), ("1.2.3", "l1_attenuation"), ("1.2.3", "hip_xray"), ("1.2.3", "hip_xray"),
        ("1.2.9", "study result"), ("1.2.9", "l1_attenuation")]
    first, second = recs[0], recs[4]
    assert first["category"] == "discordant \u2014 review" and first["series_uid"] == "1.2.3.1|1.2.3.2"
    assert first["methods"] == ["l1_attenuation", "hip_xray"]
    assert "l1_attenuation (osteoporosis) and hip_xray (normal)" in first["flags"][0]
    assert second["category"] == "likely osteoporosis" and second["methods"] == ["l1_attenuation"]
    hip_rec = recs[2]
    t = next(m for m in hip_rec["measurements"] if m["name"].endswith("T-score"))
    assert t["reference"]["key"] == "nhanes3_fn_women" and t["value"] == pytest.approx((0.95 - 0.858) / 0.120)
    csv_text = to_csv(recs)
    assert csv_text.splitlines()[1].startswith("1.2.3,1.2.3.1|1.2.3.2,,study result,,study,discordant")
    import csv as _csv
    import io

    rows = list(_csv.DictReader(io.StringIO(csv_text)))
    assert rows[2]["right femoral neck T-score reference"] == "nhanes3_fn_women"
    assert float(rows[2]["right femoral neck T-score"]) == pytest.approx((0.95 - 0.858) / 0.120)


def test_a_series_sr_combines_the_findings_of_earlier_series_of_its_study(tmp_path: Path) -> None:
    """A hip radiograph of the same study was processed first (both necks normal, T +0.77); the CT
    series then measures L1 at 97 HU: its SR's study result is "discordant — review" and lists both."""
    from screener.db import Database

    ct = make_ct_series(tmp_path / "in", l1_hu=97.0, noise_sd=8.0, seed=12, **FAST)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in ct.paths]
    cfg = Config(data_dir=tmp_path / "data")
    db = Database(cfg.db_path)
    for side in ("right", "left"):
        f = model_finding("hip_xray", f"{side} femoral neck", 0.95, str(headers[0].SOPInstanceUID), side=side[0].upper())
        rec = f.to_record()
        rec.update(study_uid=ct.study_uid, series_uid="1.2.826.0.1.99")
        db.record_finding(1, "1.2.826.0.1.99", ct.study_uid, f.protocol, f.site, f.category, rec)
    db.close()
    res = process_series(ct.paths, config=cfg, out_dir=tmp_path / "out",
                         protocols=[L1AttenuationProtocol(localizer=ct.fake_localizer())])
    assert res.status == "done"
    study = res.findings[0].details["study_result"]
    assert study["category"] == DISCORDANT and study["methods"] == ["l1_attenuation", "hip_xray"]
    assert "of 1 other series of the study processed earlier" in study["notes"][-1]
    html = render_html(res.outputs[0].path)
    assert html.index("Study result: discordant - review") < html.index("(l1_attenuation): measured")
    assert "femoral neck BMD estimated by algorithm from radiograph (BMD-GAN), left femoral neck" in html


def test_every_group_is_drawn_per_vertebra_values_as_a_point_on_their_slice(ct_run, tmp_path: Path) -> None:  # noqa: ANN001
    """Issue 20: a per-vertebra value (no ROI of its own) and a protocol that reads sagittal
    reformats get a SCOORD POINT at the vertebra's centre on the axial slice through it (INFERRED
    FROM under every NUM), so stock OHIF draws every group; the L1 ROI stays a closed polyline."""
    import numpy as np

    from screener.findings import RoiGeometry

    res, headers, _ = ct_run
    h = headers[5]
    ipp = np.array([float(v) for v in h.ImagePositionPatient])
    iop = np.array([float(v) for v in h.ImageOrientationPatient])
    dr, dc = (float(v) for v in h.PixelSpacing)
    centre = ipp + 20.0 * iop[:3] + 30.0 * iop[3:]
    uid = str(h.SOPInstanceUID)
    vertebra = model_finding("lumbar_sagittal", "L1", spine_bmd(-1.0), uid)
    vertebra.site, vertebra.site_code = "L2", codes.site_code("L2")
    vertebra.details["centroid_mm"] = centre.tolist()
    column = model_finding("lumbar_sagittal", "L1-L4", spine_bmd(-1.0), uid)
    column.roi = RoiGeometry(uid, str(h.SOPClassUID), np.array([[1.0, 1.0], [5.0, 1.0], [5.0, 90.0], [1.0, 1.0]]),
                             tuple(centre.tolist()), 25.0)
    path = write_sr(build_sr([res.findings[0], vertebra, column], headers), tmp_path)
    assert_valid_dicom(path)
    sr = pydicom.dcmread(path)
    groups = _imaging_measurements(sr)
    assert [_tracking(g) for g in groups] == ["L1 l1_attenuation", "L2 lumbar_sagittal", "L1-L4 lumbar_sagittal"]
    want = [20.0 / dc + 0.5, 30.0 / dr + 0.5]
    for g in groups[1:]:
        assert not [i for i in g.ContentSequence if i.ValueType == "SCOORD"]
        for num in (i for i in g.ContentSequence if i.ValueType == "NUM"):
            (sc,) = [c for c in num.ContentSequence if c.ValueType == "SCOORD"]
            assert sc.RelationshipType == "INFERRED FROM" and sc.GraphicType == "POINT"
            np.testing.assert_allclose([float(v) for v in sc.GraphicData], want, atol=1e-3)
            assert sc.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == uid
    (roi,) = [i for i in groups[0].ContentSequence if i.ValueType == "SCOORD"]
    assert roi.GraphicType == "POLYLINE"
    assert "Point" in render_html(path)
