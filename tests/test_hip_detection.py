"""Hip detection (issue 15): the hip_xray protocol reports only the hips in the image, of the right side.

Cohort radiographs (:mod:`training.phantoms.xray_variety`) through the committed bundles
``models/hip_landmarks`` and ``models/hip_xray``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from screener.hip_landmarks import HeaderSides, HipLandmark, decide_side, header_sides, landmark_input
from training.phantoms.xray import sample_pose
from training.phantoms.xray_variety import RadiographSpec, render_case

torch.set_num_threads(1)
MODELS = Path(__file__).resolve().parents[1] / "models"
RENDER = {"pixel_mm": 1.5, "ray_mm": 5.0, "dy_mm": 5.0}
SEED = 1519  # patients no model was trained on


def _case(index: int, **spec_kw: object):
    spec = RadiographSpec(profile="standard", pose=sample_pose("supine"), **spec_kw)
    return render_case(SEED, index, "standard", spec=spec, **RENDER)


def _run(ds, tmp_path: Path):
    from screener.config import Config
    from screener.protocols.base import ProtocolContext
    from screener.protocols.hip_xray.protocol import HipXrayProtocol
    from screener.series import read_series_info

    f = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(f, enforce_file_format=True)
    info = read_series_info([f])
    proto = HipXrayProtocol()
    decision = proto.accepts(info)
    assert decision.accepted, decision.reason
    return proto.run(None, ProtocolContext(config=Config(models_dir=MODELS, device="cpu"), info=info))


@pytest.mark.parametrize("variant", ["orientation", "no_orientation", "mirrored"])
def test_single_left_hip_gives_exactly_one_left_hip(tmp_path, variant):
    kw = {"orientation": {"orientation_header": True, "laterality_header": False},
          "no_orientation": {"orientation_header": False, "laterality_header": False},
          "mirrored": {"mirror": True, "laterality_header": False}}[variant]
    case = _case(3, collimation="hip_L", **kw)
    ds = case.dataset
    assert case.present_sides == ["L"]
    if variant == "no_orientation":
        assert "PatientOrientation" not in ds and "ImageLaterality" not in ds
    if variant == "mirrored":
        assert list(ds.PatientOrientation) == ["R", "F"]
    findings = _run(ds, tmp_path)
    assert [f.site for f in findings] == ["left femoral neck"]
    f = findings[0]
    source = f.details["side_source"]
    assert source.startswith("anatomy" if variant == "no_orientation" else "PatientOrientation"), source
    # the ROI centre (image-plane mm) is the femoral-neck point, within 5 mm of the truth
    truth = case.hips["L"].neck_px
    sr, sc = (float(v) for v in ds.PixelSpacing)
    cx, cy = f.roi.centre_mm[0] / sc - 0.5, f.roi.centre_mm[1] / sr - 0.5
    assert np.hypot((cy - truth[0]) * sr, (cx - truth[1]) * sc) < 5.0


def test_two_hip_ap_pelvis_gives_both_hips_at_their_necks(tmp_path):
    case = _case(4, collimation="pelvis")
    assert case.present_sides == ["R", "L"]
    findings = _run(case.dataset, tmp_path)
    assert [f.site for f in findings] == ["right femoral neck", "left femoral neck"]
    sr, sc = (float(v) for v in case.dataset.PixelSpacing)
    for f, side in zip(findings, "RL"):
        truth = case.hips[side].neck_px
        cx, cy = f.roi.centre_mm[0] / sc - 0.5, f.roi.centre_mm[1] / sr - 0.5
        assert np.hypot((cy - truth[0]) * sr, (cx - truth[1]) * sc) < 5.0
        assert 0.3 < f.measurements[0].value < 1.4  # g/cm2


def test_arthroplasty_hip_is_declined_for_that_hip_with_its_reason(tmp_path):
    from screener.protocols.base import ProtocolDeclined

    case = _case(5, collimation="pelvis", metal={"R": "arthroplasty", "L": "none"})
    findings = _run(case.dataset, tmp_path)
    assert [f.site for f in findings] == ["left femoral neck"]
    assert any("right hip not measured: metal in the femoral head or neck" in fl for fl in findings[0].flags)
    one = _case(5, collimation="hip_R", metal={"R": "arthroplasty", "L": "none"})
    with pytest.raises(ProtocolDeclined, match="right hip not measured: metal"):
        _run(one.dataset, tmp_path)


def test_no_hip_in_the_image_is_a_recorded_decline(tmp_path):
    from screener.protocols.base import ProtocolDeclined

    case = _case(6, collimation="pelvis")
    ds = case.dataset
    top = ds.pixel_array[: int(ds.Rows) * 3 // 10].copy()  # the abdomen above the iliac crests
    ds.Rows = top.shape[0]
    ds.PixelData = top.tobytes()
    with pytest.raises(ProtocolDeclined, match="no hip found in the image"):
        _run(ds, tmp_path)


def test_training_samples_use_the_inference_preprocessing():
    """One preprocessing: the training builder's input is landmark_input's, quantised to 8 bits."""
    from training.hip_landmarks import sample_arrays

    case = _case(7, collimation="hip_R", monochrome1=True)
    d = sample_arrays(case)
    ref = landmark_input(case.dataset).image
    assert np.abs(d["x"].astype(np.float32) / 255.0 - ref).max() <= 0.5 / 255.0 + 1e-6
    # MONOCHROME1 is shown bone-bright: the femoral head is brighter than the image median
    inp = landmark_input(case.dataset)
    hr, hc = (int(round(v)) for v in case.hips["R"].head_px)
    assert inp.display[hr, hc] > np.median(inp.display)


def test_header_sides_read_leniently():
    from pydicom.dataset import Dataset

    ds = Dataset()
    assert header_sides(ds) == HeaderSides(None, None, "")
    ds.PatientOrientation = ""
    assert header_sides(ds).column_toward is None
    ds.PatientOrientation = ["R", "F"]
    ds.ImageLaterality = "L"
    assert header_sides(ds) == HeaderSides("R", "L", "PatientOrientation")
    ds.PatientOrientation = ["F", "L"]  # rotated: columns do not run left-right
    assert header_sides(ds).column_toward is None


def test_side_rules_orientation_laterality_anatomy_and_not_determined():
    def hip(anatomy: str, ambiguity: float = 0.0) -> HipLandmark:
        return HipLandmark(anatomy=anatomy, probability=0.9, head_px=(0, 0), neck_px=(0, 0), confidence=0.9,
                           ambiguity=ambiguity, present=True)

    h = [hip("plus")]
    decide_side(h, HeaderSides("R", None, "PatientOrientation"))
    assert h[0].side == "L"  # columns towards the patient's right: the plus hip is the left one
    h = [hip("plus")]
    decide_side(h, HeaderSides(None, "L"))
    assert h[0].side == "L" and "side_note" in h[0].details  # laterality wins, the mirror is noted
    h = [hip("minus")]
    decide_side(h, HeaderSides(None, None))
    assert h[0].side == "L" and h[0].side_source.startswith("anatomy")
    h = [hip("minus", ambiguity=0.9)]
    decide_side(h, HeaderSides(None, None))
    assert h[0].side is None and "side not determined" in h[0].side_source
    h = [hip("plus")]
    decide_side(h, HeaderSides("L", "L", "PatientOrientation"))
    assert h[0].side is None and "disagree" in h[0].side_source


def test_metal_maps_are_read_at_the_head_the_network_found():
    """A six-map bundle's metal map is read within 6 mm of the found head; a four-map one reports 0."""
    from screener.hip_landmarks import CHANNELS, METAL_CHANNELS, decode_heatmaps

    case = _case(8, collimation="pelvis")
    inp = landmark_input(case.dataset)
    s = inp.image.shape[0] // 2
    heat = np.zeros((len(CHANNELS) + len(METAL_CHANNELS), s, s))
    g = np.arange(s)
    blob = lambda r, c: np.exp(-((g[:, None] - r) ** 2 + (g[None, :] - c) ** 2) / 4.0)  # noqa: E731
    heat[0], heat[1] = blob(40, 30), blob(46, 24)  # plus hip: head, neck
    heat[2], heat[3] = blob(40, 90), blob(46, 96)  # minus hip
    heat[4] = 0.9 * blob(40, 30)  # metal at the plus head only
    heat[5] = 0.9 * blob(40, 30)  # ... not the minus hip's (that one is far from its head)
    both = decode_heatmaps(heat, inp, threshold=0.5)
    assert both["plus"].metal_probability > 0.85
    assert both["minus"].metal_probability < 0.05
    four = decode_heatmaps(heat[: len(CHANNELS)], inp, threshold=0.5)
    assert four["plus"].metal_probability == 0.0


def test_wide_training_profile_is_its_own_sampler_and_leaves_variety_unchanged():
    """The 'wide' training profile varies implant size and bit depth; the held-out variety profile keeps
    the reference implants, and its acquisitions are drawn exactly as before the wide profile existed."""
    from training.phantoms.xray_variety import sample_spec

    wide = [sample_spec("wide", np.random.default_rng(i)) for i in range(300)]
    assert {w.profile for w in wide} == {"wide"}
    assert min(w.implant_scale for w in wide) < 0.85 and max(w.implant_scale for w in wide) > 1.2
    assert 14 in {w.bits for w in wide} and any(w.pose.name == "frog_leg" for w in wide)
    variety = [sample_spec("variety", np.random.default_rng(i)) for i in range(50)]
    assert all(v.implant_scale == 1.0 for v in variety)
    assert 14 not in {v.bits for v in variety}
    v0 = sample_spec("variety", np.random.default_rng(1517))
    assert (v0.collimation, v0.bits, v0.metal, round(v0.pose.abduction_deg[0], 6)) == V0_SPEC


#: the variety profile's first acquisition of seed 1517 as drawn before the wide profile was added (0.3.0)
V0_SPEC = ("pelvis", 16, {"R": "none", "L": "none"}, 15.617439)


def test_flip_average_reads_a_mirrored_radiograph_as_the_mirror_of_the_original():
    """Test-time flip averaging (0.5.0): maps of a mirrored input go back exactly about the radiograph's own
    width with the plus and minus hips swapped, so a mirrored radiograph's averaged maps are the mirror of
    the original's (the network is not symmetric; the average is)."""
    from screener.hip_landmarks import (CHANNELS, heatmaps, load_landmark_bundle, mirror_input,
                                        unmirror_heatmaps)

    rng = np.random.default_rng(0)
    w = 200  # even: output column j of the input is column (w - 2) / 2 - j of the mirrored input's maps
    maps = rng.uniform(size=(len(CHANNELS), 128, 128))
    mirrored = np.zeros_like(maps)
    for a, b in enumerate((2, 3, 0, 1)):
        mirrored[a, :, : w // 2] = maps[b, :, : w // 2][:, ::-1]
    assert np.allclose(unmirror_heatmaps(mirrored, w)[:, :, : w // 2], maps[:, :, : w // 2])

    bundle = load_landmark_bundle(MODELS / "hip_landmarks")
    inp = landmark_input(_case(5, collimation="pelvis").dataset)
    if inp.content_shape[1] % 2:
        pytest.skip("odd content width: the mirror is interpolated, not exact")
    flipped = type(inp)(**{**inp.__dict__, "image": mirror_input(inp.image, inp.content_shape)})
    a = heatmaps(bundle, inp, flip=True)
    b = heatmaps(bundle, flipped, flip=True)
    assert np.allclose(unmirror_heatmaps(b, inp.content_shape[1]), a, atol=1e-4)


def test_oversampled_training_weights_follow_the_hard_factors():
    """--oversample-hard (0.5.0) draws frog-leg and heavily obese patients of the wide profile more often,
    single-hip images 1.5x; the standard profile has neither pose nor fat, only single hips."""
    from training.hip_landmarks import hard_weights
    from training.phantoms.xray_variety import PROFILES, sample_spec

    patients = np.arange(1000, 1040)
    t = np.zeros((len(patients), 2, 5), dtype=np.float32)
    t[:, 0, 0] = 1.0
    t[::2, 1, 0] = 1.0  # even rows: both hips, odd rows: one
    w = hard_weights("wide_train", {"patient": patients, "t": t}, factor=2.5)
    for i, p in enumerate(patients):
        s = sample_spec("wide", np.random.default_rng([1515, int(p), 15, PROFILES.index("wide")]))
        f = min((2.5 if s.pose.name == "frog_leg" else 1.0) * (2.5 if s.obese_mm >= 80 else 1.0), 5.0)
        assert w[i] == pytest.approx(f * (1.5 if i % 2 else 1.0))
    assert w.max() > 2.0
    ws = hard_weights("train", {"patient": np.arange(10), "t": t[:10]}, factor=2.5)
    assert set(np.round(ws, 3)) <= {1.0, 1.5}


def test_variety_white_collimator_margins_keep_the_truth_and_the_window_on_the_field():
    """Variety views may keep white (unexposed) collimator margins: brighter than any bone, outside the
    device's window, and the hips' truth follows the enlarged image."""
    from training.phantoms.xray_variety import _apply_shutter, _shutter_spec

    spec = RadiographSpec(profile="variety", pose=sample_pose("supine"), collimation="hip_L",
                          shutter_mm=(30.0, 0.0, 25.0, 0.0), markers=False, text=False)
    plain = render_case(SEED, 3, "variety", spec=replace_spec(spec, shutter_mm=None), **RENDER)
    case = render_case(SEED, 3, "variety", spec=spec, **RENDER)
    ds = case.dataset
    img = ds.pixel_array.astype(np.float64)
    assert case.spec.shutter_mm == (30.0, 0.0, 25.0, 0.0)
    r0, r1, c0, c1 = case.extras["box"]
    f0 = case.extras["field_box"]
    mm = case.pixel_spacing_mm  # at the patient
    assert abs((f0[0] - r0) - 30.0 / mm) <= 1.0 and abs((f0[2] - c0) - 25.0 / mm) <= 1.0
    # the margin (top-left corner band) is above the window and above the field's bone
    centre, width = float(ds.WindowCenter), float(ds.WindowWidth)
    band = img[:10, 30:-30]
    assert np.median(band) > centre + width / 2
    assert np.median(band) > np.percentile(img[30:, 30:], 99)
    # the truth moved with the image: the same hip, offset by the margin
    assert case.present_sides == plain.present_sides == ["L"]
    h, p = case.hips["L"].head_px, plain.hips["L"].head_px
    pb = plain.extras["box"]  # (its view may draw margins of its own)
    assert plain.extras["field_box"] == f0
    assert abs((h[0] - p[0]) - (pb[0] - r0)) < 1e-6 and abs((h[1] - p[1]) - (pb[2] - c0)) < 1e-6
    # only the variety profile draws margins, from its own generator (standard and wide unchanged)
    std = RadiographSpec(profile="standard", pose=sample_pose("supine"))
    assert _shutter_spec(std, 123).shutter_mm is None
    drawn = [_shutter_spec(replace_spec(spec, shutter_mm=None), k).shutter_mm for k in range(200)]
    assert 0.3 < np.mean([d is not None for d in drawn]) < 0.7
    assert _apply_shutter  # noqa: B018 - exported for the renderer


def replace_spec(spec, **kw):
    from dataclasses import replace

    return replace(spec, **kw)


def test_refine_crop_maps_back_and_mirrors_minus_hips():
    """The refine stage's patch is centred on the head, shows every hip as a plus hip, and its matrix
    maps patch pixels back to the landmark input."""
    from screener.hip_landmarks import REFINE_CROP, REFINE_SIZE, refine_matrix, refine_patch

    img = np.zeros((256, 256), dtype=np.float32)
    img[100, 150] = 1.0  # a dot 30 px towards increasing column from the head at (100, 120)
    c = (REFINE_SIZE - 1) / 2.0
    for anat, col in (("plus", 120.0), ("minus", 180.0)):
        m = refine_matrix((100.0, col), anat)
        assert np.allclose(m @ np.array([c, c, 1.0]), [100.0, col, 1.0])
        patch = refine_patch(ndimage_blur(img), m)
        i, j = divmod(int(patch.argmax()), REFINE_SIZE)
        step = REFINE_CROP / REFINE_SIZE
        assert abs(i - c) <= 1.5
        # plus: the dot lies towards increasing patch column; minus (mirrored): also, seen from its head
        assert abs((j - c) * step - 30.0) <= 1.5


def ndimage_blur(img):
    from scipy import ndimage

    out = ndimage.gaussian_filter(img, 2.0)
    return out / out.max()


def test_refine_stage_moves_the_neck_only_with_a_refine_bundle():
    """A bundle without the refine sub-bundle reads the coarse maps as before; the shipped bundle, when it
    has one, records the coarse neck it replaced."""
    from screener.hip_landmarks import find_hips, load_landmark_bundle, refine_hips

    bundle = load_landmark_bundle(MODELS / "hip_landmarks")
    case = _case(4, collimation="pelvis")
    present, both, inp = find_hips(case.dataset, bundle)
    assert len(present) == 2
    has = getattr(bundle, "_hip_refine", None) is not None
    for h in present:
        assert ("coarse_neck_px" in h.details) == has
    if has:
        for h in present:
            truth = case.hips[h.side]
            sp = inp.spacing_mm
            assert np.hypot((h.neck_px[0] - truth.neck_px[0]) * sp[0], (h.neck_px[1] - truth.neck_px[1]) * sp[1]) < 5.0
    class NoRefine:  # a bundle without the refine stage: nothing changes
        pass
    before = {k: v.neck_px for k, v in both.items()}
    refine_hips(NoRefine(), inp, both)
    assert {k: v.neck_px for k, v in both.items()} == before


def test_refine_views_map_back_onto_the_plain_crop():
    """A turned / zoomed refine view's map, resampled onto the plain crop's grid (_map_on_grid), puts a
    landmark where the plain crop's map has it; the identity view is returned as it is."""
    from screener.hip_landmarks import OUTPUT_STRIDE, REFINE_SIZE, _map_on_grid, refine_matrix, refine_patch

    img = np.zeros((256, 256), dtype=np.float32)
    img[110, 150] = 1.0
    img = ndimage_blur(img)
    m0 = refine_matrix((100.0, 120.0), "plus")
    s = REFINE_SIZE // OUTPUT_STRIDE

    def as_map(m):  # a stand-in refine map: the patch at the map's stride
        return refine_patch(img, m)[OUTPUT_STRIDE // 2 - 1 :: OUTPUT_STRIDE, OUTPUT_STRIDE // 2 - 1 :: OUTPUT_STRIDE][:s, :s]

    plain = as_map(m0).astype(np.float64)
    assert np.allclose(_map_on_grid(plain, m0, m0), plain, atol=1e-9)
    p0 = np.array(divmod(int(plain.argmax()), s))
    for angle, zoom in ((-10.0, 1.0), (10.0, 1.0), (0.0, 1.1), (15.0, 0.9)):
        m = refine_matrix((100.0, 120.0), "plus", angle_deg=angle, zoom=zoom)
        back = _map_on_grid(as_map(m).astype(np.float64), m, m0)
        assert np.hypot(*(np.array(divmod(int(back.argmax()), s)) - p0)) <= 1.0


def test_refine_tta_of_the_card_and_its_default():
    """decoding.refine.tta: no entry reads the plain crop alone; entries give (angle, zoom, stretch) views;
    a bundle read with views keeps every hip within 5 mm on an AP pelvis."""
    import copy

    from screener.hip_landmarks import _refine_views, find_hips, load_landmark_bundle

    assert _refine_views({}) == [(0.0, 1.0, 0.0)]
    assert _refine_views({"decoding": {"refine": {"tta": [[0, 1], [-10, 1, 1]]}}}) == [(0.0, 1.0, 0.0), (-10.0, 1.0, 1.0)]
    bundle = load_landmark_bundle(MODELS / "hip_landmarks")
    if getattr(bundle, "_hip_refine", None) is None:
        pytest.skip("bundle without a refine stage")
    case = _case(4, collimation="pelvis")
    card = copy.deepcopy(bundle.card)
    try:
        bundle.card["decoding"]["refine"]["tta"] = [[0, 1, 0], [-10, 1, 0], [10, 1, 0], [0, 1, 1]]
        present, _, inp = find_hips(case.dataset, bundle)
    finally:
        bundle.card.clear()
        bundle.card.update(card)
    assert len(present) == 2
    for h in present:
        truth = case.hips[h.side]
        sp = inp.spacing_mm
        assert np.hypot((h.neck_px[0] - truth.neck_px[0]) * sp[0], (h.neck_px[1] - truth.neck_px[1]) * sp[1]) < 5.0
