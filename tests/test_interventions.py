"""Test by intervention (issue 14): change only the bone, check that L1 is found at the same level
and that its Pickhardt HU falls as the physics says.

The same virtual-cohort patient is rendered with every bone's mineral x 1.0, 0.8 and 0.6
(``Patient.skeleton_scale``; soft tissue untouched). The real localizer and ``l1_attenuation``
run on each (through DICOM files, as in the daemon), also with the series stored feet-first with
scrambled instance numbers.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from screener.config import Config
from screener.protocols.base import ProtocolContext
from screener.protocols.l1_attenuation.protocol import L1AttenuationProtocol
from screener.series import load_volume, read_series_info


def _measure(tmp_path: Path, scale: float, *, feet_first: bool = False):  # noqa: ANN202
    from training.phantoms import anatomy, ct, physics, population, profiles
    from training.phantoms.labels import trabecular_hu

    patient = population.make_patient(43, 2, vbmd_l1=130.0, t12_ribs="normal", transitional="none",
                                      bone_islands=[], skeleton_scale=scale)
    scene = anatomy.build_scene(patient)
    prof = profiles.get_profile("canon_ap_native").with_(slice_thickness=2.5, slice_spacing=2.5)
    zr = (scene.vertebra("T10").centroid_mm[2], scene.vertebra("L3").centroid_mm[2])
    dss = ct.render_ct(scene, prof, seed=2, z_range=zr)
    if feet_first:  # slices stored from the feet up, columns and rows mirrored, numbering scrambled
        order = np.random.default_rng(0).permutation(len(dss))
        for n, ds in zip(order, dss):
            ds.PatientPosition = "FFS"
            ds.InstanceNumber = int(n) + 1
            # feet first: the column direction points to the patient's right; same anatomy
            arr = ds.pixel_array[:, ::-1].copy()
            ds.PixelData = arr.tobytes()
            x0, y0, z0 = (float(v) for v in ds.ImagePositionPatient)
            ds.ImagePositionPatient = [x0 + (ds.Columns - 1) * float(ds.PixelSpacing[1]), y0, z0]
            ds.ImageOrientationPatient = [-1, 0, 0, 0, 1, 0]
    paths = ct.write_series(dss, tmp_path / f"s{scale}{'f' if feet_first else ''}")
    info, vol = read_series_info(paths), load_volume(paths)
    (f,) = L1AttenuationProtocol().run(vol, ProtocolContext(config=Config(), info=info))
    truth = trabecular_hu(scene, "L1", physics.effective_energy(prof.kvp), prof.phase)
    lo, hi = sorted(scene.vertebra("L1").z_range_mm)
    return f, truth, (lo, hi)


@pytest.mark.slow
def test_skeleton_attenuation_scaled_keeps_the_level_and_scales_the_pickhardt_hu(tmp_path: Path) -> None:
    out = {k: _measure(tmp_path, k) for k in (1.0, 0.8, 0.6)}
    for k, (f, truth, (lo, hi)) in out.items():
        # the same level: the ROI lies in the true L1 body
        assert lo <= f.roi.centre_mm[2] <= hi, (k, f.roi.centre_mm, (lo, hi))
        assert f.measurement("L1 attenuation mean").value == pytest.approx(truth, abs=5.0), k
    m = {k: out[k][0].measurement("L1 attenuation mean").value for k in out}
    t = {k: out[k][1] for k in out}
    # the measured drop follows the true drop (HU above the marrow baseline scales with k)
    for k in (0.8, 0.6):
        assert m[1.0] - m[k] == pytest.approx(t[1.0] - t[k], abs=6.0), (m, t)
    assert m[1.0] > m[0.8] > m[0.6]


@pytest.mark.slow
def test_feet_first_series_with_scrambled_numbering_gives_the_same_l1(tmp_path: Path) -> None:
    f0, truth, _ = _measure(tmp_path, 1.0)
    f1, _, (lo, hi) = _measure(tmp_path, 1.0, feet_first=True)
    assert lo <= f1.roi.centre_mm[2] <= hi
    assert f1.measurement("L1 attenuation mean").value == pytest.approx(
        f0.measurement("L1 attenuation mean").value, abs=0.5)
