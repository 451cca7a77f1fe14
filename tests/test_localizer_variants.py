"""Spine localizer on the cohort cases of issue 14: each failure class real CTs showed, built for it.

Every case renders one virtual-cohort patient (``training.phantoms``) with a
forced variant and checks that the classical localizer puts L1 inside the
true L1 body (the phantom's labels count from the top: a 13th rib sits on L1,
a sacralised L5 stays L5), or declines with a reason:

* low-density skeleton: the same patient with every bone's attenuation x 0.8
  and x 0.6 is numbered at the same levels (the old fixed 180 / 280 HU
  thresholds lost the column or the ribs);
* hypoplastic 12th ribs (short, thin, faint, one-sided): T12 is not named L1;
* lumbar rib (13 rib pairs), sacralised L5, lumbarised S1: L1 right, the
  transitional anatomy named, confidence lowered;
* 3 mm pixels, 6 mm slices (the issue's real abdomen-pelvis scan);
* a scan that ends above the sacrum, one that starts below the ribs' joints.
"""
from __future__ import annotations

import numpy as np
import pytest

from screener.domain import SpineLocalization, Volume
from screener.localizer import locate_spine

SEED = 41


def _volume(r: dict) -> Volume:
    """A Volume from ``training.phantoms.ct.render_volume`` (ascending z, air outside the FOV)."""
    hu = np.nan_to_num(r["hu"][::-1], nan=-1024.0).astype(np.float32)
    zs = np.asarray(r["z"])[::-1]
    ps = float(r["pixel_spacing"])
    ox, oy = r["origin_xy"]
    return Volume(array=hu, spacing=(float(np.median(np.diff(zs))), ps, ps),
                  origin=np.array([ox, oy, float(zs[0])]), direction=np.eye(3))


def _case(index: int, profile: str = "canon_ap_native", window: str = "t10_sacrum", fast: bool = True,
          seed: int = SEED, arms_down: bool | None = None, lordosis_deg: float | None = None,
          **variant: object) -> tuple[SpineLocalization, object]:
    import dataclasses

    from training.phantoms import anatomy, ct, population, profiles

    patient = population.make_patient(seed, index, **variant)
    if arms_down is not None:
        patient = dataclasses.replace(patient, arms_down=arms_down)
    if lordosis_deg is not None:
        patient = dataclasses.replace(patient, lordosis_deg=lordosis_deg)
    scene = anatomy.build_scene(patient)
    prof = profiles.get_profile(profile)
    if fast and prof.pixel_spacing < 2.0:  # 2.5 mm pixels keep the test inside its budget
        prof = prof.with_(matrix=170, pixel_spacing=2.5)
    v = scene.vertebra
    z_sacrum = scene.landmarks["z_s1"] - 40.0
    zr = {"t10_sacrum": (v("T10").centroid_mm[2], z_sacrum),
          "ends_mid_lumbar": (v("T10").centroid_mm[2], v("L4").centroid_mm[2]),
          "starts_at_l1": (v("L1").z_range_mm[1] + 14.0, z_sacrum),
          "sacrum_only": (v("L1").z_range_mm[1] + 6.0, z_sacrum)}[window]
    return locate_spine(_volume(ct.render_volume(scene, prof, seed=index, z_range=zr))), scene


def _l1_right(loc: SpineLocalization, scene) -> bool:
    l1 = loc.get("L1")
    lo, hi = sorted(scene.vertebra("L1").z_range_mm)
    return l1 is not None and lo <= l1.centroid_mm[2] <= hi


@pytest.mark.parametrize("index", [0, 1])
def test_low_density_skeleton_is_numbered_at_the_same_levels(index: int) -> None:
    ref, scene = _case(index, vbmd_l1=70.0)
    assert _l1_right(ref, scene), ref.reason
    for k in (0.8, 0.6):
        loc, _ = _case(index, vbmd_l1=70.0, skeleton_scale=k)
        assert _l1_right(loc, scene), (k, loc.reason, loc.details.get("labels"))
        assert abs(loc.vertebrae["L1"].centroid_mm[2] - ref.vertebrae["L1"].centroid_mm[2]) < 6.0
        # the thresholds followed the bone: the measured bone scale fell with the skeleton
        assert loc.details["bone_scale"] < ref.details["bone_scale"]


@pytest.mark.parametrize("index", [2, 3, 4])
def test_hypoplastic_12th_ribs_do_not_make_t12_l1(index: int) -> None:
    loc, scene = _case(index, t12_ribs="hypoplastic", transitional="none")
    assert _l1_right(loc, scene), (scene.variants.get("t12_rib_free_length_mm"), loc.details.get("labels"),
                                   loc.details.get("short_rib_check"))
    # seen as a short rib on T12, or (too faint to see) resolved by the sacral count and named
    assert (loc.details.get("short_12th_rib") or "hypoplastic" in loc.details.get("transitional", "")), \
        loc.details.get("short_rib_check")
    assert loc.vertebrae["L1"].confidence < 0.95


def test_sacralised_l5_is_named_and_labelled_from_the_ribs() -> None:
    for index in (5, 10):
        loc, scene = _case(index, transitional="sacralised_l5", t12_ribs="normal")
        assert _l1_right(loc, scene), loc.details.get("labels")
        if loc.details.get("warning"):  # the fused L5 looked sacral: the sacral count was one off
            assert "sacralised L5" in loc.details.get("transitional", "")
            assert loc.vertebrae["L1"].confidence <= 0.5


def test_lumbarised_s1_keeps_l1_from_the_ribs_with_lower_confidence() -> None:
    loc, scene = _case(6, transitional="lumbarised_s1", t12_ribs="normal", lumbar_rib=False)
    assert _l1_right(loc, scene), loc.details.get("labels")
    if "sacrum" in loc.details["anchors"]:
        assert loc.vertebrae["L1"].confidence <= 0.5
        assert loc.details.get("transitional")


@pytest.mark.parametrize("profile", ["coarse_ap_native_3mm", "coarse_ap_native_6mm"])
def test_coarse_reconstructions_3mm_pixels_and_6mm_slices(profile: str) -> None:
    for index in (7, 8):
        loc, scene = _case(index, profile=profile, fast=False, vbmd_l1=150.0, t12_ribs="normal",
                           transitional="none")
        assert _l1_right(loc, scene), (profile, index, loc.reason, loc.details.get("labels"))


def test_scan_ending_above_the_sacrum_is_numbered_from_the_ribs() -> None:
    loc, scene = _case(9, window="ends_mid_lumbar", t12_ribs="normal", transitional="none")
    assert _l1_right(loc, scene), loc.reason
    assert loc.details["anchors"] == ["ribs"]


def test_arms_beside_the_pelvis_do_not_hide_the_iliac_crests() -> None:
    # a humerus beside the abdomen is lateral bone at every level: read as pelvis it put the crests
    # at the top of the coverage, and the ilia below were taken for ribs ("coverage ends at T12")
    loc, scene = _case(12, window="starts_at_l1", arms_down=True, t12_ribs="normal", transitional="none")
    crest = scene.landmarks["z_iliac_crest"]
    assert abs(loc.details["iliac_crest_z_mm"] - crest) < 6.0, (loc.details.get("iliac_crest_z_mm"), crest)
    assert _l1_right(loc, scene), (loc.reason, loc.details.get("labels"))


def test_sacrum_only_count_is_used_when_the_crests_agree_and_declined_when_they_do_not() -> None:
    # coverage from just below the 12th ribs to the sacrum: only the sacral count numbers the levels.
    # Normal anatomy is numbered; a lumbarised S1 shifts the count by one, and the iliac crests (L4 one
    # level higher than the count puts it) expose it: declined with that reason, never labelled one off
    for index in (14, 15):
        loc, scene = _case(index, window="sacrum_only", transitional="none", t12_ribs="normal", lumbar_rib=False)
        assert _l1_right(loc, scene), (index, loc.reason, loc.details.get("labels"))
        assert loc.details["anchors"] == ["sacrum"]
    for index in (14, 18):
        loc, scene = _case(index, window="sacrum_only", transitional="lumbarised_s1", t12_ribs="normal",
                           lumbar_rib=False)
        assert "L1" not in loc.vertebrae, (index, loc.details.get("labels"))
        assert "iliac crests put L4 one level higher" in loc.reason, loc.reason
        assert "lumbarised S1" in loc.details["transitional"]


def test_steep_sacrum_below_the_column_end_still_anchors_the_count() -> None:
    # strong lordosis turns the sacrum away from the column's axis: the column tracker stops inside L5
    # and no sacral vertebra is among its bodies. The sacrum just below the column's end (thick alae
    # beside the canal) names the lowest body L5; without that search these cases had no anchor at all
    for index in (14, 16):
        loc, scene = _case(index, window="sacrum_only", transitional="none", t12_ribs="normal",
                           lumbar_rib=False, lordosis_deg=62.0)
        assert loc.details["column_z_mm"][0] > scene.vertebra("L5").z_range_mm[0] + 5.0  # stops in L5
        assert "sacrum_below_column" in loc.details, loc.reason
        assert _l1_right(loc, scene), (index, loc.reason, loc.details.get("labels"))
    # a lumbarised S1 under the same sacrum: never numbered one level off
    loc, scene = _case(14, window="sacrum_only", transitional="lumbarised_s1", t12_ribs="normal",
                       lumbar_rib=False, lordosis_deg=62.0)
    assert "L1" not in loc.vertebrae or _l1_right(loc, scene), loc.details.get("labels")
