"""Issue 3 acceptance: on virtual-cohort CTs the real localizer + l1_attenuation report L1's mean HU
within 10 HU of the phantom truth, at full resolution, across every scanner profile (one held out);
issue 14: mean absolute error <= 5 HU, and one case per failure class (bone island, 3 mm pixels, 6 mm
slices, low density, the real scan's 3 mm / 300 HU island) with the true L1 centroid."""
from __future__ import annotations

from pathlib import Path

import pytest

from screener.config import Config
from screener.protocols.base import ProtocolContext, ProtocolDeclined
from screener.protocols.l1_attenuation.protocol import L1AttenuationProtocol
from screener.series import load_volume, read_series_info

N_PATIENTS = 12


@pytest.mark.slow
def test_l1_mean_hu_matches_phantom_truth_with_the_real_localizer(tmp_path: Path) -> None:
    from training.phantoms import anatomy, ct, physics, population, profiles
    from training.phantoms.labels import trabecular_hu

    names = list(profiles.TRAINING_PROFILES) + list(profiles.HELD_OUT)
    patients = population.sample_population(N_PATIENTS, 31)
    errors, declined = [], []
    for i, p in enumerate(patients):
        prof = profiles.get_profile(names[i % len(names)])
        scene = anatomy.build_scene(p)
        top, bottom = scene.vertebra("T11").centroid_mm[2], scene.vertebra("L3").centroid_mm[2]
        paths = ct.write_series(ct.render_ct(scene, prof, seed=i, z_range=(top, bottom)),
                                tmp_path / str(i))
        info, vol = read_series_info(paths), load_volume(paths)
        truth = trabecular_hu(scene, "L1", physics.effective_energy(prof.kvp), prof.phase)
        try:
            (f,) = L1AttenuationProtocol().run(vol, ProtocolContext(config=Config(), info=info))
        except ProtocolDeclined as exc:
            declined.append((i, prof.name, str(exc)))
            continue
        lo, hi = sorted(scene.vertebra("L1").z_range_mm)
        assert lo <= f.roi.centre_mm[2] <= hi, (i, prof.name, f.roi.centre_mm, (lo, hi))
        errors.append((i, prof.name, f.measurement("L1 attenuation mean").value - truth))
    assert declined == []
    assert all(abs(e) <= 10.0 for _, _, e in errors), errors
    # issue 14: mean absolute error <= 5 HU (the phantom's own calibration offset, SD 2 HU, included)
    assert sum(abs(e) for _, _, e in errors) / len(errors) <= 5.0, errors


# --------------------------------------------------------------------------------------------------
# Issue 14 item 1: one virtual-cohort case per failure class, the true L1 centroid as localizer (so
# the ROI is tested apart from the localizer); error against labels.trabecular_hu within 5 HU.

def _case(tmp_path: Path, profile, patient, seed: int = 3):  # noqa: ANN001, ANN202
    """Render T12..L2 of ``patient`` with ``profile``; returns (volume, info, truth loc, truth HU, scene)."""
    from benchmarks.eval_l1_roi import truth_localization
    from training.phantoms import anatomy, ct, physics
    from training.phantoms.labels import trabecular_hu

    scene = anatomy.build_scene(patient)
    t12, l2 = scene.vertebra("T12"), scene.vertebra("L2")
    paths = ct.write_series(ct.render_ct(scene, profile, seed=seed, z_range=(
        t12.centroid_mm[2] + 5.0, l2.centroid_mm[2] - 5.0)), tmp_path)
    info, vol = read_series_info(paths), load_volume(paths)
    truth = trabecular_hu(scene, "L1", physics.effective_energy(profile.kvp), profile.phase)
    return vol, info, truth_localization(vol, scene), truth, scene


def _run(vol, info, loc):  # noqa: ANN001, ANN202
    (f,) = L1AttenuationProtocol(localizer=lambda v: loc).run(
        vol, ProtocolContext(config=Config(), info=info))
    return f


def _patient(index: int, seed: int = 7):  # noqa: ANN202
    from training.phantoms import population
    return population.sample_population(index + 1, seed)[index]


@pytest.mark.parametrize("island_hu", ["+300", "1000"])
def test_bone_island_in_mid_l1_is_excluded_and_flagged(tmp_path: Path, island_hu: str) -> None:
    """A 6 mm dense focus (bone island) near the ROI centre of mid-L1: measured, not declined, the
    focus left out (flag, details) and the mean within 5 HU of the trabecular truth."""
    from benchmarks.eval_l1_roi import insert_island
    from training.phantoms import profiles

    prof = profiles.get_profile("canon_ap_native").with_(slice_thickness=2.0, slice_spacing=2.0)
    vol, info, loc, truth, scene = _case(tmp_path, prof, _patient(1))
    hu = truth + 300.0 if island_hu.startswith("+") else float(island_hu)
    insert_island(vol, scene, diameter_mm=6.0, hu=hu)
    f = _run(vol, info, loc)
    assert f.measurement("L1 attenuation mean").value == pytest.approx(truth, abs=5.0)
    d = f.details
    assert d["focus_excluded"] is True and d["foci"][0]["kind"] == "dense"
    assert 0.0 < d["excluded_fraction"] < 0.3
    assert any(x.startswith("focal lesion excluded from the L1 ROI") for x in f.flags)
    assert len(d["slices_used"]) >= 2


@pytest.mark.parametrize("supersample", [3, 1])
def test_three_mm_pixels(tmp_path: Path, supersample: int) -> None:
    """3 mm pixels (matrix 170): the cortex is one pixel; a real reconstruction averages each pixel
    over its area (supersample 3), point sampling (1) leaves the cortex a dotted line."""
    from training.phantoms import profiles

    prof = profiles.get_profile("siemens_ap_pv").with_(pixel_spacing=3.0, matrix=170,
                                                       supersample=supersample)
    vol, info, loc, truth, _ = _case(tmp_path, prof, _patient(3))
    assert vol.spacing[1] == pytest.approx(3.0)
    f = _run(vol, info, loc)
    assert f.measurement("L1 attenuation mean").value == pytest.approx(truth, abs=5.0)
    assert f.measurement("ROI area").value >= 200.0


@pytest.mark.parametrize("index", [1, 4])
def test_the_real_scan_case_3_mm_pixels_3_mm_slices_and_a_300_hu_island(tmp_path: Path,
                                                                       index: int) -> None:
    """The scan of issue 14: 3 mm pixels and slices, a ~5 mm, ~300 HU bone island in mid-L1, where
    the one-slice ray caster declined. Measured, the focus flagged, within 5 HU."""
    from benchmarks.eval_l1_roi import insert_island
    from training.phantoms import profiles

    vol, info, loc, truth, scene = _case(tmp_path, profiles.get_profile("coarse_ap_native_3mm"),
                                         _patient(index))
    insert_island(vol, scene, diameter_mm=5.0, hu=300.0, anterior_mm=2.0, lateral_mm=0.0)
    f = _run(vol, info, loc)
    assert f.measurement("L1 attenuation mean").value == pytest.approx(truth, abs=5.0)
    assert f.details["focus_excluded"] is True
    assert any(x.startswith("focal lesion excluded") for x in f.flags)


def test_six_mm_slices(tmp_path: Path) -> None:
    from training.phantoms import profiles

    prof = profiles.get_profile("ge_ap_pv").with_(slice_thickness=6.0, slice_spacing=6.0)
    vol, info, loc, truth, _ = _case(tmp_path, prof, _patient(2))
    assert vol.spacing[0] == pytest.approx(6.0)
    f = _run(vol, info, loc)
    assert f.measurement("L1 attenuation mean").value == pytest.approx(truth, abs=5.0)
    lo, hi = sorted(loc.get("L1").z_range_mm)
    assert lo + 5.0 <= f.roi.centre_mm[2] <= hi - 5.0   # mid-L1, away from the endplates


def test_low_density_l1(tmp_path: Path) -> None:
    """The most osteoporotic of 40 virtual patients (L1 below 100 HU, thin faint cortex)."""
    from training.phantoms import anatomy, physics, population, profiles
    from training.phantoms.labels import trabecular_hu

    pool = population.sample_population(40, 7)
    kev = physics.effective_energy(120.0)
    p = min(pool, key=lambda q: trabecular_hu(anatomy.build_scene(q), "L1", kev))
    vol, info, loc, truth, _ = _case(tmp_path, profiles.get_profile("canon_ap_native"), p)
    assert truth < 100.0
    f = _run(vol, info, loc)
    assert f.measurement("L1 attenuation mean").value == pytest.approx(truth, abs=5.0)
    assert f.category == "likely osteoporosis"
