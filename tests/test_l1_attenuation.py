"""Protocol l1_attenuation: ROI placement, statistics, categories, flags, declines."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from screener.config import Config
from screener.domain import SpineLocalization
from screener.pipeline import process_series
from screener.protocols.base import ProtocolContext, ProtocolDeclined
from screener.protocols.l1_attenuation.protocol import L1AttenuationProtocol, categorize, hu_per_mg
from screener.series import load_volume, read_series_info
from tests.ct_factory import copy_with_fresh_uids, make_ct_series

FAST = dict(rows=192, cols=192, pixel_spacing=1.0, n_slices=30, z_start=-36.0)


def run_l1(tmp_path: Path, config: Config | None = None, **kwargs):  # noqa: ANN003, ANN201
    ct = make_ct_series(tmp_path, **{**FAST, **kwargs})
    info = read_series_info(ct.paths)
    vol = load_volume(ct.paths)
    proto = L1AttenuationProtocol(localizer=ct.fake_localizer())
    assert proto.accepts(info).accepted
    (finding,) = proto.run(vol, ProtocolContext(config=config or Config(), info=info))
    return ct, vol, finding


def test_roi_on_synthetic_vertebra(tmp_path: Path) -> None:
    ct, vol, f = run_l1(tmp_path, l1_hu=142.0, noise_sd=12.0, seed=5)
    mean = f.measurement("L1 attenuation mean").value
    assert mean == pytest.approx(142.0, abs=2.0)
    assert f.measurement("L1 attenuation SD").value == pytest.approx(12.0, abs=1.5)
    # the ROI is the trabecular body eroded 1.5 mm (+ half a pixel) minus its posterior quarter:
    # inner ellipse 20.5 x 14.5 mm -> ~18.5 x 12.5 mm, three quarters of it
    area = f.measurement("ROI area").value
    assert 450.0 <= area <= 700.0
    assert f.roi is not None and f.roi.area_mm2 == pytest.approx(area)
    # polygon closed, its shoelace area ~ the ROI's pixel area (1 mm pixels)
    poly = f.roi.polygon
    assert np.array_equal(poly[0], poly[-1])
    x, y = poly[:-1, 0], poly[:-1, 1]
    assert 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))) == pytest.approx(area, rel=0.15)
    # every polygon vertex lies inside the trabecular ellipse (inside the cortex), patient mm
    px = x - 0.5 + (-(192 / 2) + 0.5)  # SCOORD -> index -> patient x (1 mm pixels)
    py = y - 0.5 + (-(192 / 2) + 0.5)
    rx, ry = ct.body_rx_mm - 1.5, ct.body_ry_mm - 1.5
    assert np.all((px / rx) ** 2 + ((py - 35.0) / ry) ** 2 < 1.0)
    # out of the posterior quarter (basivertebral plexus at y = 35 + 0.72 x 16)
    assert py.max() < 35.0 + 0.5 * ct.body_ry_mm
    # anterior/central: ROI centre is anterior of the body centre
    cx, cy, cz = f.roi.centre_mm
    assert cy <= 35.0 and abs(cx) <= 2.0 and abs(cz) <= 1.5
    d = f.details
    assert d["median_hu"] == pytest.approx(142.0, abs=2.0) and d["focus_excluded"] is False
    assert d["excluded_fraction"] < 0.01 and d["slices_used"] == [p["slice_index"] for p in
                                                                   d["per_slice"]]
    assert d["roi_area_mm2_per_slice"][d["slices_used"].index(f.roi.slice_index)] == area
    assert d["body_slices"] == [10, 19]   # z -11 .. 11.5: the ten slices inside L1
    # ~3 central slices pooled, all inside L1, the ROI slice referenced first
    per = f.details["per_slice"]
    assert len(per) == 3 and {p["slice_index"] for p in per} == {f.roi.slice_index - 1,
                                                                 f.roi.slice_index,
                                                                 f.roi.slice_index + 1}
    assert f.referenced_sop_instance_uids[0] == f.roi.source_sop_instance_uid
    assert len(f.referenced_sop_instance_uids) == 3
    assert f.z_extent_mm == (-12.0, 12.0)
    assert f.overlay is not None and f.overlay.shape == (192, 192, 3) and f.overlay.dtype == np.uint8
    rec = f.to_record()
    assert rec["roi_center_mm"] == [pytest.approx(v) for v in f.roi.centre_mm]
    assert rec["z_extent_mm"] == [-12.0, 12.0] and rec["category"] == "indeterminate"
    assert {m["name"]: m["unit"] for m in rec["measurements"]} == {
        "L1 attenuation mean": "[hnsf'U]", "L1 attenuation SD": "[hnsf'U]",
        "L1 vBMD estimate": "mg/cm3", "ROI area": "mm2"}


def test_plexus_and_cortex_do_not_bias_the_mean(tmp_path: Path) -> None:
    # very low trabecular HU: the plexus (20 HU) and cortex (600 HU) must stay out of the ROI
    _, _, f = run_l1(tmp_path, l1_hu=60.0)
    assert f.measurement("L1 attenuation mean").value == pytest.approx(60.0, abs=0.01)
    assert f.measurement("L1 attenuation SD").value == pytest.approx(0.0, abs=0.01)


@pytest.mark.parametrize("hu, category", [(110.0, "likely osteoporosis"), (110.1, "indeterminate"),
                                          (159.9, "indeterminate"), (160.0, "likely normal"),
                                          (-20.0, "likely osteoporosis"), (400.0, "likely normal")])
def test_categorize_thresholds(hu: float, category: str) -> None:
    assert categorize(hu) == category


@pytest.mark.parametrize("l1_hu, category, risk", [(110, "likely osteoporosis", True),
                                                   (111, "indeterminate", True),
                                                   (135, "indeterminate", True),
                                                   (136, "indeterminate", False),
                                                   (159, "indeterminate", False),
                                                   (160, "likely normal", False)])
def test_categories_at_thresholds_end_to_end(tmp_path: Path, l1_hu: int, category: str,
                                             risk: bool) -> None:
    _, _, f = run_l1(tmp_path, l1_hu=float(l1_hu))
    assert f.measurement("L1 attenuation mean").value == pytest.approx(l1_hu, abs=1e-6)
    assert f.category == category
    assert any("135 HU" in x for x in f.flags) is risk
    assert f.measurement("L1 vBMD estimate").value == pytest.approx(l1_hu / 1.32942, rel=1e-5)
    assert not any(x.startswith(("contrast", "kVp")) for x in f.flags)


def _phase(monkeypatch: pytest.MonkeyPatch, phase: str, source: str = "image and header") -> None:
    """Make the image-based contrast reading return ``phase`` (the synthetic series has no vessels)."""
    from screener import contrast

    def fake(volume, localization, info):  # noqa: ANN001, ANN202
        return contrast.ContrastAssessment(phase, phase != "native", source, 0.9, {"aorta_hu": 180.0},
                                           str(getattr(info, "contrast_agent", "") or ""))
    monkeypatch.setattr(contrast, "assess_contrast", fake)


def test_contrast_flag_adjusts_category_and_reports_both(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    _phase(monkeypatch, "portal_venous")
    cfg = Config(contrast_adjust_hu=11.2)
    _, _, f = run_l1(tmp_path, config=cfg, l1_hu=120.0, contrast_agent="IOHEXOL")
    assert f.measurement("L1 attenuation mean").value == pytest.approx(120.0)
    assert f.measurement("L1 attenuation mean, contrast-adjusted").value == pytest.approx(108.8)
    assert f.category == "likely osteoporosis"   # 108.8 <= 110, raw 120 would be indeterminate
    (flag,) = [x for x in f.flags if x.startswith("contrast-enhanced")]
    assert "IOHEXOL, portal-venous phase from the image and header" in flag
    assert "120.0 - 11.2 = 108.8 HU" in flag
    assert f.measurement("L1 vBMD estimate").value == pytest.approx(108.8 / 1.32942, rel=1e-5)
    assert f.details["contrast"]["phase"] == "portal_venous"


def test_arterial_phase_from_the_image_adjusts_less(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Arterial: less iodine has reached the marrow (0.56 of the portal-venous enhancement)."""
    _phase(monkeypatch, "arterial", source="image")
    _, _, f = run_l1(tmp_path, l1_hu=120.0)  # no ContrastBolusAgent in the header
    assert f.measurement("L1 attenuation mean, contrast-adjusted").value == pytest.approx(120.0 - 6.3)
    (flag,) = [x for x in f.flags if x.startswith("contrast-enhanced")]
    assert "arterial phase from the image" in flag


def test_contrast_adjustment_follows_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _phase(monkeypatch, "portal_venous")
    _, _, f = run_l1(tmp_path, config=Config(contrast_adjust_hu=0.0), l1_hu=120.0,
                     contrast_agent="APPLIED")
    assert f.category == "indeterminate"
    assert f.measurement("L1 attenuation mean, contrast-adjusted").value == pytest.approx(120.0)


def test_a_header_the_image_contradicts_is_flagged_and_not_applied(tmp_path: Path) -> None:
    """The synthetic series' blood reads 40 HU: a ContrastBolusAgent in its header is stale."""
    _, _, f = run_l1(tmp_path, l1_hu=120.0, contrast_agent="IOHEXOL")
    assert not any(x.startswith("contrast-enhanced") for x in f.flags)
    assert any(x.startswith("header and image disagree about contrast") for x in f.flags)
    assert f.category == "indeterminate"


@pytest.mark.parametrize("kvp, slope, phrase", [(100.0, 1.62009, "kVp 100: thresholds assume 120 kVp"),
                                                (140.0, 1.15690, "kVp 140: thresholds assume 120 kVp"),
                                                (None, 1.32942, "kVp unknown")])
def test_kvp_qualifies_category_and_corrects_vbmd(tmp_path: Path, kvp: float | None, slope: float,
                                                  phrase: str) -> None:
    _, _, f = run_l1(tmp_path, l1_hu=100.0, kvp=kvp)
    assert any(phrase in x and "category qualified" in x for x in f.flags)
    assert "148.1 HU at 100 kVp" in " ".join(f.flags)
    assert f.details["category_qualifier"] in ("kVp 100", "kVp 140", "kVp unknown")
    assert f.measurement("L1 vBMD estimate").value == pytest.approx(100.0 / slope, rel=1e-6)
    assert hu_per_mg(120.0) == pytest.approx(1.33, abs=0.005) and 1 / hu_per_mg(120.0) == pytest.approx(0.75, abs=0.01)
    # the one table (issue 18): the models' energy correction reads the same constants
    from screener.preprocess.energy import energy_scale
    assert energy_scale(kvp) == pytest.approx(hu_per_mg(120.0) / slope, rel=1e-5)
    # 80 kVp is inside the table (70-150 kVp), not clamped to 100 kVp's value
    assert hu_per_mg(80.0) == pytest.approx(2.16755, rel=1e-5)


def test_small_body_measured_with_small_roi_flag(tmp_path: Path) -> None:
    _, _, f = run_l1(tmp_path, l1_hu=150.0, body_rx_mm=13.5, body_ry_mm=11.5)
    area = f.measurement("ROI area").value
    assert 80.0 <= area < 300.0
    assert any(x.startswith("ROI shrunk to") and "below 200 mm2" in x for x in f.flags) is (area < 200.0)
    assert f.measurement("L1 attenuation mean").value == pytest.approx(150.0, abs=0.01)


def test_flat_body_declines_and_never_measures_the_canal(tmp_path: Path) -> None:
    """A body too flat to hold trabecular bone: the spinal canal (enclosed by the arch) is no
    substitute."""
    with pytest.raises(ProtocolDeclined, match="could not outline the L1 vertebral body"):
        run_l1(tmp_path, body_rx_mm=24.0, body_ry_mm=5.0)


def test_tiny_body_declines(tmp_path: Path) -> None:
    with pytest.raises(ProtocolDeclined, match="could not outline the L1 vertebral body: no region "
                                               "enclosed by cortical bone"):
        run_l1(tmp_path, body_rx_mm=7.0, body_ry_mm=6.0)


@pytest.mark.parametrize("dj, di", [(0.0, 0.0), (-8.0, 0.0), (6.0, 5.0), (0.0, -9.0)])
def test_roi_robust_to_localizer_centroid_error(tmp_path: Path, dj: float, di: float) -> None:
    """A centroid up to ~10 mm off (even on the cortex) still gives the same ROI mean."""
    ct = make_ct_series(tmp_path, l1_hu=88.0, noise_sd=10.0, seed=4, **FAST)
    loc = ct.localization
    l1 = loc.vertebrae["L1"]
    k, j, i = l1.centroid_index
    moved = SpineLocalization({"L1": type(l1)(l1.label, l1.slice_range, l1.z_range_mm,
                                              (k, j + dj, i + di), l1.centroid_mm, 0.9)}, "fake")
    info, vol = read_series_info(ct.paths), load_volume(ct.paths)
    (f,) = L1AttenuationProtocol(localizer=lambda v: moved).run(
        vol, ProtocolContext(config=Config(), info=info))
    assert f.measurement("L1 attenuation mean").value == pytest.approx(88.0, abs=2.0)
    assert 450.0 <= f.measurement("ROI area").value <= 700.0


def test_centroid_in_soft_tissue_declines(tmp_path: Path) -> None:
    """A localizer centroid 30 mm anterior of the body must not yield a soft-tissue 'L1' value."""
    ct = make_ct_series(tmp_path, l1_hu=150.0, **FAST)
    l1 = ct.localization.vertebrae["L1"]
    k, j, i = l1.centroid_index
    wrong = SpineLocalization({"L1": type(l1)(l1.label, l1.slice_range, l1.z_range_mm,
                                              (k, j - 30.0, i), l1.centroid_mm, 0.9)}, "fake")
    info, vol = read_series_info(ct.paths), load_volume(ct.paths)
    with pytest.raises(ProtocolDeclined, match="could not outline"):
        L1AttenuationProtocol(localizer=lambda v: wrong).run(
            vol, ProtocolContext(config=Config(), info=info))


def test_localizer_without_l1_declines(tmp_path: Path) -> None:
    ct = make_ct_series(tmp_path, **FAST)
    info, vol = read_series_info(ct.paths), load_volume(ct.paths)
    proto = L1AttenuationProtocol(localizer=lambda v: SpineLocalization({}, "fake", None))
    with pytest.raises(ProtocolDeclined) as exc:
        proto.run(vol, ProtocolContext(config=Config(), info=info))
    assert exc.value.reason == "L1 not in view"
    res = process_series(ct.paths, config=Config(), out_dir=tmp_path / "out", protocols=[
        L1AttenuationProtocol(localizer=lambda v: SpineLocalization(
            {}, "fake", "L1 not in view: coverage ends at T12"))])
    assert res.status == "skipped" and res.outputs == []
    assert res.reason == "no protocol applies: l1_attenuation: L1 not in view: coverage ends at T12"
    assert res.decisions == [("l1_attenuation", False, "L1 not in view: coverage ends at T12")]


def test_real_ct_with_fresh_uids_is_declined_l1_not_in_view(real_ct_dir: Path, tmp_path: Path) -> None:
    """Uses the real spine localizer (screener.localizer): the shared CT covers ~T11-T12 only."""
    paths = copy_with_fresh_uids(real_ct_dir, tmp_path / "in")
    res = process_series(paths, config=Config(), out_dir=tmp_path / "out")
    assert res.status == "skipped"
    assert "L1 not in view" in res.reason
    assert res.decisions[0][0] == "l1_attenuation" and res.decisions[0][1] is False
    assert "L1 not in view" in res.decisions[0][2]
    assert res.findings == [] and res.outputs == []


def test_osteoporotic_vertebra_with_faint_cortex(tmp_path: Path) -> None:
    """Trabecular 55 HU inside a 1 mm, 400 HU cortex (next to 40 HU soft tissue), noisy."""
    _, _, f = run_l1(tmp_path, l1_hu=55.0, cortex_hu=400.0, cortex_mm=1.0, noise_sd=15.0, seed=9)
    assert f.measurement("L1 attenuation mean").value == pytest.approx(55.0, abs=2.0)
    assert f.category == "likely osteoporosis"
    assert 400.0 <= f.measurement("ROI area").value <= 700.0


@pytest.mark.parametrize("index, profile", [(0, "siemens_ap_pv"), (1, "siemens_abd_native_thin"),
                                            (3, "ge_lspine_bone"), (5, "philips_ap_arterial")])
def test_virtual_cohort_l1_mean_matches_phantom_truth(tmp_path: Path, index: int, profile: str) -> None:
    """Virtual-cohort CT (training.phantoms, realistic anatomy, noise, kernels) around L1 with the
    true L1 centroid as localizer: the ROI mean is within 8 HU of the trabecular truth."""
    from training.phantoms import anatomy, ct, physics, population, profiles
    from training.phantoms.labels import trabecular_hu

    patient = population.sample_population(index + 1, 7)[index]
    prof = profiles.get_profile(profile)
    scene = anatomy.build_scene(patient)
    l1, t12, l2 = (scene.vertebra(v) for v in ("L1", "T12", "L2"))
    paths = ct.write_series(ct.render_ct(scene, prof, seed=7, z_range=(
        t12.centroid_mm[2] + 5.0, l2.centroid_mm[2] - 5.0)), tmp_path)
    info, vol = read_series_info(paths), load_volume(paths)
    truth = trabecular_hu(scene, "L1", physics.effective_energy(prof.kvp), prof.phase)
    c = np.asarray(l1.centroid_mm, float)
    # patient mm -> (k, j, i) index of the sorted volume
    m = vol.direction * np.array([vol.spacing[2], vol.spacing[1], vol.spacing[0]])
    i, j, k = np.linalg.solve(m, c - vol.origin)
    z = vol.slice_positions()[:, 2]
    ks = [q for q, zz in enumerate(z) if l1.z_range_mm[0] <= zz <= l1.z_range_mm[1]]
    from screener.domain import VertebraLocation
    loc = SpineLocalization({"L1": VertebraLocation("L1", (ks[0], ks[-1]), l1.z_range_mm,
                                                    (k, j, i), tuple(c), 1.0)}, "truth")
    (f,) = L1AttenuationProtocol(localizer=lambda v: loc).run(
        vol, ProtocolContext(config=Config(), info=info))
    assert f.measurement("L1 attenuation mean").value == pytest.approx(truth, abs=8.0)
    assert 400.0 <= f.measurement("ROI area").value <= 1400.0
    assert (prof.kvp == 120) == (not any(x.startswith("kVp") for x in f.flags))
    assert (prof.phase != "native") == any(x.startswith("contrast-enhanced") for x in f.flags)


def test_focal_outliers_find_a_dense_focus_and_not_noise() -> None:
    """Robust z (median/MAD) on the smoothed trabecular voxels: a 6 mm, +300 HU sphere is one dense
    focus, excluded with its margin; noise alone gives no focus."""
    from scipy import ndimage

    from screener.vertebral_body import focal_outliers

    rng = np.random.default_rng(0)
    sp = (1.0, 0.8, 0.8)
    img = rng.normal(150.0, 25.0, (12, 60, 60)).astype(np.float32)
    cand = np.zeros(img.shape, bool)
    cand[1:-1, 5:-5, 5:-5] = True
    sm = ndimage.gaussian_filter(img, sigma=(0.8, 1.0, 1.0))
    excluded, foci, med, sd = focal_outliers(sm, cand, sp)
    assert foci == [] and excluded.mean() < 0.001 and med == pytest.approx(150.0, abs=2.0)
    kk, jj, ii = np.mgrid[:12, :60, :60]
    ball = ((kk - 6) * sp[0]) ** 2 + ((jj - 30) * sp[1]) ** 2 + ((ii - 30) * sp[2]) ** 2 <= 9.0
    img[ball] += 300.0
    sm = ndimage.gaussian_filter(img, sigma=(0.8, 1.0, 1.0))
    excluded, foci, _, _ = focal_outliers(sm, cand, sp)
    assert len(foci) == 1 and foci[0]["kind"] == "dense" and foci[0]["delta_hu"] > 100.0
    assert excluded[ball].all()                      # the focus and its 2 mm margin are out
    assert excluded.sum() < 8 * ball.sum()           # (3 mm radius + halo + 2 mm)^3


def test_bone_island_in_synthetic_l1_is_excluded_and_flagged(tmp_path: Path) -> None:
    """A 6 mm, 900 HU sphere in mid-L1 of the synthetic series: same mean as without it, flagged."""
    ct = make_ct_series(tmp_path, l1_hu=95.0, noise_sd=10.0, seed=2, **FAST)
    info, vol = read_series_info(ct.paths), load_volume(ct.paths)
    proto = L1AttenuationProtocol(localizer=ct.fake_localizer())
    ctx = ProtocolContext(config=Config(), info=info)
    (f0,) = proto.run(vol, ctx)
    k, j, i = ct.localization.vertebrae["L1"].centroid_index
    kk, jj, ii = np.mgrid[:vol.array.shape[0], :vol.array.shape[1], :vol.array.shape[2]]
    dk, dj, di = vol.spacing
    ball = ((kk - k) * dk) ** 2 + ((jj - (j - 5.0)) * dj) ** 2 + ((ii - (i + 3.0)) * di) ** 2 <= 9.0
    vol.array[ball] = 900.0
    (f,) = proto.run(vol, ctx)
    assert f.measurement("L1 attenuation mean").value == pytest.approx(95.0, abs=1.5)
    assert f.measurement("L1 attenuation mean").value == pytest.approx(
        f0.measurement("L1 attenuation mean").value, abs=1.0)
    assert f.details["focus_excluded"] and not f0.details["focus_excluded"]
    assert 0.0 < f.details["excluded_fraction"] < 0.25 and f0.details["excluded_fraction"] < 0.01
    (flag,) = [x for x in f.flags if x.startswith("focal lesion excluded")]
    assert "dense focus" in flag
