"""Issue 3 acceptance: on virtual-cohort CTs the real localizer + l1_attenuation report L1's mean HU
within 10 HU of the phantom truth, at full resolution, across every scanner profile (one held out)."""
from __future__ import annotations

from pathlib import Path

import pytest

from screener.config import Config
from screener.protocols.base import ProtocolContext, ProtocolDeclined
from screener.protocols.l1_attenuation import L1AttenuationProtocol
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
