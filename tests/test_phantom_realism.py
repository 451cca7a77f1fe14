"""The ``realism`` CT profile (issue 19): it renders, it is never trained on, and adding it left
every existing profile's rendering byte-identical."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import tomllib

from training.phantoms import anatomy, ct, population, profiles

ROOT = Path(__file__).resolve().parents[1]

#: sha256 (first 16 hex) of the PixelData of a 6 mm render (z = L1 centroid +- 3 mm) of cohort
#: seed 7 patient 2 in each profile, made with the code before the realism profile existed
#: (commit ff6db9e) and equal after it; stored integers, so no float formatting is involved.
PIXEL_HASHES = {
    "canon_ap_native": "533bcb4aeed764a7",
    "chest_abd_arterial_noagent": "aecd34f2e098cb95",
    "coarse_ap_native_3mm": "1abdb6fa5c700651",
    "coarse_ap_native_6mm": "5b2adf462ca8a0b9",
    "coarse_ap_pv_3mm_noagent": "4e84ebce04a645aa",
    "ge_ap_pv": "2961ff920bf16507",
    "ge_lspine_bone": "f920014e70964b0c",
    "heldout_fujifilm_135": "1dc42ad502aca9fe",
    "philips_ap_arterial": "29dd6e81d2bcd3ee",
    "philips_chest": "4c74b2ecf32e4db3",
    "siemens_abd_native_thin": "019ebba6cf8daa01",
    "siemens_ap_pv": "9dfa9a2a2a6ddbfa",
    "siemens_lowkv_80": "38248754fd6b834e",
}


@pytest.fixture(scope="module")
def scene():
    return anatomy.build_scene(population.make_patient(7, 2))


def test_existing_profiles_render_byte_identically(scene) -> None:
    assert set(PIXEL_HASHES) == set(profiles.PROFILES) - set(profiles.REALISM_PROFILES)
    z = scene.vertebra("L1").centroid_mm[2]
    for name, digest in PIXEL_HASHES.items():
        prof = profiles.PROFILES[name]
        assert (prof.noise_nps, prof.tissue_texture, prof.likeness) == ((), (), False), name
        dss = ct.render_ct(scene, name, 7, z_range=(z + 3.0, z - 3.0))
        assert hashlib.sha256(b"".join(d.PixelData for d in dss)).hexdigest()[:16] == digest, name


def test_realism_is_never_trained_on() -> None:
    assert profiles.REALISM_PROFILES == ("realism",)
    for group in (profiles.TRAINING_PROFILES, profiles.HELD_OUT, profiles.LOCALIZER_PROFILES):
        assert "realism" not in group
    from training.datasets.femur_coronal import HIP_PROFILES

    assert "realism" not in HIP_PROFILES
    recipes = sorted((ROOT / "training" / "recipes").glob("*.toml"))
    assert recipes
    for path in recipes:
        data = tomllib.loads(path.read_text()).get("data", {})
        for key in ("profiles", "holdout_profiles"):
            assert "realism" not in data.get(key, []), (path.name, key)
    # `screener phantom` without --profile draws from TRAINING_PROFILES only
    from training.phantoms.cli import profile_for

    assert all(profile_for(i, s, None) != "realism" for i in range(40) for s in range(5))


def test_realism_renders_with_kernel_noise_and_texture(scene) -> None:
    real = profiles.get_profile("realism")
    std = profiles.get_profile("siemens_ap_pv").with_(slice_thickness=3.0, slice_spacing=2.0)
    z = scene.vertebra("L1").centroid_mm[2]
    out = {}
    for key, prof in (("standard", std), ("realism", real)):
        vol = ct.render_volume(scene, prof, 7, z_range=(z + 2.0, z - 2.0))
        hu = vol["hu"]
        assert hu.shape[0] == 3 and np.isfinite(hu[:, 256, 256]).all()
        ox, oy = vol["origin_xy"]
        ps = vol["pixel_spacing"]
        lab = scene.label_plane(np.array([ox, oy, vol["z"][1]]), np.array([1.0, 0, 0]), np.array([0, 1.0, 0]),
                                hu.shape[1:], (ps, ps))
        from scipy import ndimage

        fat = ndimage.binary_erosion(np.isin(lab, scene.structure_ids("subcutaneous_fat")), iterations=2)
        # noise alone: air inside the field of view, outside the body and the couch
        air = ndimage.binary_erosion((lab == 0) & np.isfinite(hu).all(axis=0), iterations=3)
        d = hu[0] - hu[2]
        pair = air[:, :-1] & air[:, 1:]
        out[key] = {"fat_mean": float(hu[1][fat].mean()), "fat_sd": float(hu[1][fat].std()),
                    # lag-1 autocorrelation of the noise: the FBP spectrum makes a finer grain
                    "rho1": float(np.corrcoef(d[:, :-1][pair], d[:, 1:][pair])[0, 1])}
    # same tissue HU (texture has zero mean), more structure and a finer noise grain
    assert abs(out["realism"]["fat_mean"] - out["standard"]["fat_mean"]) < 8.0
    assert out["realism"]["fat_sd"] > 1.8 * out["standard"]["fat_sd"]
    assert out["realism"]["rho1"] < out["standard"]["rho1"] - 0.1
