"""Protocol ``femur_coronal`` (Ha et al. 2024): preprocessing, locator, dataset builder, protocol, bundle."""
from __future__ import annotations

import copy
import csv
from pathlib import Path

import numpy as np
import pytest

from screener.config import Config
from screener.protocols.femur_coronal import preprocess as P
from screener.protocols.base import ProtocolContext, ProtocolDeclined
from screener.protocols.femur_coronal.protocol import CLASSES, FemurCoronalProtocol
from screener.series import load_volume, read_series_info

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "models" / "femur_coronal"
SEED = 11


def _render(out: Path, index: int, profile: str, z_range: tuple[float, float] | None) -> tuple[list[Path], object]:
    from training.phantoms.anatomy import build_scene
    from training.phantoms.ct import render_ct, write_series
    from training.phantoms.population import make_patient

    scene = build_scene(make_patient(SEED, index))
    zh = scene.landmarks["z_hip"]
    zr = None if z_range is None else (zh + z_range[0], zh + z_range[1])
    return write_series(render_ct(scene, profile, SEED, z_range=zr), out), scene


@pytest.fixture(scope="module")
def hip_ct(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], object]:
    """Patient 2 of cohort 11 (osteoporotic hip), GE 2.5 mm, hips only (fast)."""
    return _render(tmp_path_factory.mktemp("hip"), 2, "ge_ap_pv", (110.0, -80.0))


@pytest.fixture(scope="module")
def hip_volume(hip_ct: tuple[list[Path], object]):
    return load_volume(hip_ct[0])


def _context(paths: list[Path]) -> ProtocolContext:
    return ProtocolContext(config=Config(models_dir=REPO / "models", device="cpu"), info=read_series_info(paths))


def test_locator_finds_both_heads_within_2mm(hip_ct, hip_volume) -> None:
    _, scene = hip_ct
    heads = P.locate_femoral_heads(hip_volume)
    assert set(heads) == {"R", "L"}
    for side in ("R", "L"):
        err = np.linalg.norm(np.asarray(heads[side]) - np.asarray(scene.femoral_heads[side]))
        assert err < 2.0, (side, err)


def test_manifest_builder_and_protocol_give_identical_tensors(tmp_path: Path, hip_ct) -> None:
    import pydicom

    from training.datasets.femur_coronal import build
    from training.recipes import load_recipe

    # the series rewritten with KVP 100, so that the energy correction (scale != 1) is on both paths
    series = tmp_path / "series"
    series.mkdir()
    paths = []
    for src in hip_ct[0]:
        ds = pydicom.dcmread(src)
        ds.KVP = 100
        ds.save_as(series / src.name)
        paths.append(series / src.name)
    hip_volume = load_volume(paths)
    man = tmp_path / "manifest.csv"
    with man.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patient_id", "dicom_path", "grade"])
        w.writerow(["p1", str(series), "osteoporosis"])
    import dataclasses

    from training.recipes import DataSpec

    recipe = load_recipe(REPO / "training" / "recipes" / "femur_coronal-cohort.toml")
    recipe = dataclasses.replace(recipe, data=DataSpec(source="manifest", path=str(man)))
    ds = build(recipe)
    assert ds.meta["preprocessing"]["energy_correction"] is True
    info = read_series_info(paths)
    assert info.kvp == 100.0
    image, demo, pinfo, _ = FemurCoronalProtocol.inputs(hip_volume, kvp=info.kvp)
    assert pinfo.energy_scale == pytest.approx(P.energy_scale(100.0)) and pinfo.energy_scale < 0.9
    assert ds.images.shape == (1, 2, P.INPUT_PX, P.INPUT_PX)
    assert np.array_equal(ds.images[0], image)
    assert np.array_equal(ds.extras[0], demo)
    assert ds.targets.tolist() == [2]


def test_phantom_source_looks_like_the_reformat(hip_ct, hip_volume) -> None:
    """The cohort's rendered crops match the crops sampled from the written CT (same heads)."""
    from training.datasets.femur_coronal import PhantomCoronalSource
    from training.phantoms.profiles import get_profile

    _, scene = hip_ct
    real, _ = P.preprocess(__import__("screener.preprocess.sampling", fromlist=["x"]).VolumeSampler(hip_volume),
                           scene.femoral_heads)
    z_bottom = float(hip_volume.slice_positions()[:, 2].min())
    synth, _ = P.preprocess(PhantomCoronalSource(scene, get_profile("ge_ap_pv"), 3, z_bottom), scene.femoral_heads)
    r = np.corrcoef(real.ravel(), synth.ravel())[0, 1]
    assert r > 0.93, r
    assert abs(float(real.mean() - synth.mean())) < 0.02


def test_energy_correction_brings_80_kvp_to_120(hip_ct) -> None:
    """The same phantom rendered at 80 and 120 kVp: closer tensors with the correction than without."""
    from training.datasets.femur_coronal import PhantomCoronalSource
    from training.phantoms.profiles import get_profile

    _, scene = hip_ct
    prof = get_profile("ge_ap_pv")
    z_bottom = float(scene.femoral_heads["R"][2]) - 90.0

    def tensor(kvp: float, correct: bool) -> np.ndarray:
        src = PhantomCoronalSource(scene, prof.with_(kvp=kvp), 3, z_bottom)  # same noise / slice phase
        img, info = P.preprocess(src, scene.femoral_heads, kvp=kvp, energy_correction=correct)
        assert info.energy_scale == (P.energy_scale(kvp) if correct else 1.0)
        return img

    ref = tensor(120.0, True)
    assert np.array_equal(ref, tensor(120.0, False))  # 120 kVp is the reference: no change
    raw, corr = tensor(80.0, False), tensor(80.0, True)
    err_raw, err_corr = float(np.abs(raw - ref).mean()), float(np.abs(corr - ref).mean())
    assert err_corr < 0.5 * err_raw, (err_corr, err_raw)
    # bone (bright pixels) is what the correction is for
    bone = ref > 0.45
    assert abs(float((corr - ref)[bone].mean())) < 0.5 * abs(float((raw - ref)[bone].mean()))


def test_energy_correction_on_the_card_and_backward_compatible() -> None:
    from screener.protocols.femur_coronal.protocol import preprocessing_options

    c = P.constants()
    assert c["energy_correction"] is True and c["reference_kvp"] == 120.0
    assert P.constants(False) == {**{k: v for k, v in c.items() if k not in
                                     ("energy_correction", "reference_kvp", "ha_hu_per_mg", "energy_rule")},
                                  "energy_correction": False}
    assert preprocessing_options({"preprocessing": c}) == {"energy_correction": True}
    # a card written before the correction existed: its model saw uncorrected HU
    old = {k: v for k, v in c.items() if k not in ("energy_correction", "reference_kvp", "ha_hu_per_mg", "energy_rule")}
    assert preprocessing_options({"preprocessing": old}) == {"energy_correction": False}
    assert preprocessing_options({}) == {"energy_correction": False}
    assert P.energy_scale(None) == 1.0 and P.energy_scale(80.0) == pytest.approx(0.613, abs=0.002)


def test_header_demographics_and_missing_ones(hip_volume) -> None:
    ds = hip_volume.datasets[0]
    d = P.header_demographics(ds)
    assert d["sex"] in ("M", "F") and 20 <= d["age"] <= 90 and 140 < d["height_cm"] < 210
    v = P.demographics_vector(d["age"], d["sex"], d["height_cm"], d["weight_kg"])
    bmi = d["weight_kg"] / (d["height_cm"] / 100) ** 2
    assert v[4] == pytest.approx((bmi - P.DEMO_MEAN[4]) / P.DEMO_SD[4], rel=1e-5)
    for name in ("PatientAge", "PatientSex", "PatientSize", "PatientWeight"):
        bad = copy.deepcopy(ds)
        delattr(bad, name)
        with pytest.raises(P.MissingDemographics) as exc:
            P.header_demographics(bad)
        assert exc.value.name == name and name in str(exc.value)


def test_accepts_and_declines_with_reasons(tmp_path: Path, hip_ct, hip_volume) -> None:
    proto = FemurCoronalProtocol()
    info = read_series_info(hip_ct[0])
    assert proto.accepts(info).accepted
    chest = type(info)(**{**info.__dict__, "body_part": "CHEST"})
    d = proto.accepts(chest)
    assert not d.accepted and "CHEST" in d.reason
    # no PatientWeight in the header: declined, naming it
    vol = load_volume(hip_ct[0])
    for ds in vol.datasets:
        del ds.PatientWeight
    with pytest.raises(ProtocolDeclined, match="PatientWeight"):
        proto.run(vol, _context(hip_ct[0]))
    # a series that ends above the hips
    paths, _ = _render(tmp_path / "abd", 2, "ge_ap_pv", (200.0, 40.0))
    with pytest.raises(ProtocolDeclined, match="femoral heads not in coverage"):
        proto.run(load_volume(paths), _context(paths))


def test_dataset_builder_cohort_shapes_and_targets() -> None:
    import dataclasses

    from training.datasets.femur_coronal import build, grade_index
    from training.recipes import load_recipe

    recipe = load_recipe(REPO / "training" / "recipes" / "femur_coronal-cohort.toml")
    recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, n=4, seed=5))
    ds = build(recipe)
    assert ds.images.shape == (4, 2, P.INPUT_PX, P.INPUT_PX) and ds.extras.shape == (4, 5)
    assert ds.images.min() >= 0.0 and ds.images.max() <= 1.0
    assert ds.targets.tolist() == [grade_index(t) for t in ds.attributes["t_score"]]
    assert set(ds.attributes["profile"]) <= set(recipe.data.profiles) | set(recipe.data.holdout_profiles)
    # rendered kVp: drawn from kvp_range for the training profiles, the profile's own for the held-out one
    lo, hi = recipe.data.options["kvp_range"]
    for prof, kvp in zip(ds.attributes["profile"], ds.attributes["kvp"]):
        assert (kvp == 135.0) if prof in recipe.data.holdout_profiles else (lo <= kvp <= hi)
    assert ds.meta["preprocessing"]["energy_correction"] is True
    assert grade_index(-1.0) == 0 and grade_index(-1.01) == 1 and grade_index(-2.5) == 2


@pytest.mark.skipif(not (BUNDLE / "model_card.json").is_file(), reason="bundle not trained yet")
def test_shipped_bundle_grades_a_rendered_series(hip_ct, hip_volume) -> None:
    from training.datasets.femur_coronal import _hip_t, grade_index

    paths, scene = hip_ct
    (f,) = FemurCoronalProtocol().run(hip_volume, _context(paths))
    probs = [m.value for m in f.measurements]
    assert [m.name for m in f.measurements] == [f"P({c})" for c in CLASSES]
    assert sum(probs) == pytest.approx(100.0, abs=1e-3)
    truth = grade_index(_hip_t(scene, "hip"))
    assert abs(CLASSES.index(f.category) - truth) <= 1
    assert probs[truth] > 20.0
    assert f.overlay is not None and f.overlay.ndim == 3 and f.overlay.shape[2] == 3
    assert f.roi is not None and np.array_equal(f.roi.polygon[0], f.roi.polygon[-1])
    assert f.roi.source_sop_instance_uid in {str(d.SOPInstanceUID) for d in hip_volume.datasets}
    assert set(f.details["timing_ms"]) == {"preprocess", "model", "explain"}
    assert f.details["bundle_id"] == "femur_coronal@1.1.0"
    assert f.details["kvp"] == 120.0 and f.details["energy_scale"] == 1.0


def test_bounding_box_distance_transform_equals_full_one():
    """The locator's cropped distance transform is exactly scipy's on the whole array, also when the
    mask touches the array's faces (no background is invented there)."""
    from scipy import ndimage

    from screener.protocols.femur_coronal.preprocess import _distance_in_bounding_box

    rng = np.random.default_rng(7)
    cases = [((40, 50, 60), (slice(5, 30), slice(10, 40), slice(0, 60))),
             ((30, 30, 30), (slice(0, 30), slice(0, 30), slice(0, 30))),
             ((20, 40, 30), (slice(3, 10), slice(30, 40), slice(2, 5)))]
    for shape, box in cases:
        m = np.zeros(shape, dtype=bool)
        m[box] = rng.random(m[box].shape) > 0.2
        np.testing.assert_array_equal(_distance_in_bounding_box(m), ndimage.distance_transform_edt(m))
    assert not _distance_in_bounding_box(np.zeros((4, 4, 4), dtype=bool)).any()


def test_head_sized_distances_are_the_full_transform_ones():
    """Coarse-then-boxed distance transform: the same head-sized voxels and values as the whole one."""
    from screener.protocols.femur_coronal.preprocess import _distance_in_bounding_box, _head_sized_distances

    g, radius = 2.0, (15.0, 34.0)
    zz, yy, xx = np.mgrid[0:61, 0:70, 0:90]
    m = np.zeros((61, 70, 90), dtype=bool)
    for cz, cy, cx, r in ((30, 35, 20, 12.5), (22, 30, 68, 11.0), (45, 40, 70, 19.0), (10, 10, 45, 6.0)):
        m |= (zz - cz) ** 2 + (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r  # balls of 12-38 mm radius
    m[:, 50:52, :] = True  # a slab touching the faces
    rng = np.random.default_rng(5)
    m &= rng.random(m.shape) > 0.0001  # a few pinholes
    lateral = np.zeros(90, dtype=bool)
    lateral[5:40] = lateral[55:88] = True
    full = _distance_in_bounding_box(m) * g
    want = (full >= radius[0]) & (full <= radius[1]) & lateral[None, None, :]
    flat, dist = _head_sized_distances(m, g, lateral, radius)
    assert len(flat) > 1000
    np.testing.assert_array_equal(flat, np.flatnonzero(want))
    np.testing.assert_array_equal(dist, full.ravel()[flat])


def test_grid_resampling_equals_the_volume_sampler(hip_volume):
    """Axis by axis interpolation of an axial volume = the sampler's trilinear one, also with a flipped
    slice axis, and air outside the volume."""
    import dataclasses

    from screener.protocols.femur_coronal.preprocess import _grid_hu
    from screener.preprocess.sampling import VolumeSampler

    vol = dataclasses.replace(hip_volume, array=hip_volume.array[::3, ::4, ::4].copy(),
                              spacing=(hip_volume.spacing[0] * 3, hip_volume.spacing[1] * 4, hip_volume.spacing[2] * 4))
    flipped = dataclasses.replace(vol, array=vol.array[::-1].copy(),
                                  origin=vol.index_to_patient(vol.array.shape[0] - 1, 0, 0),
                                  direction=np.asarray(vol.direction, float) @ np.diag([1.0, 1.0, -1.0]))
    for v in (vol, flipped):
        s = VolumeSampler(v)
        lo = v.index_to_patient(0, 0, 0)
        xs = lo[0] - 7.0 + 9.7 * np.arange(42)  # past both sides of the field of view
        ys = lo[1] + 5.0 + 11.3 * np.arange(35)
        zs = float(min(lo[2], v.index_to_patient(v.array.shape[0] - 1, 0, 0)[2])) - 4.0 + 2.3 * np.arange(30)
        want = np.stack([s((xs[0], ys[0], z), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (len(ys), len(xs)),
                           (ys[1] - ys[0], xs[1] - xs[0])) for z in zs])
        got = _grid_hu(v, s, xs, ys, zs)
        assert got.shape == want.shape and (want == -1000.0).any()
        np.testing.assert_allclose(got, want, atol=0.02)
        bone = _grid_hu(v, s, xs, ys, zs, floor=180.0) > 180.0  # the box of the bone only
        assert bone.any() and np.array_equal(bone, want > 180.0)


def test_sphere_refinement_equals_per_radius_fftconvolve(hip_ct, hip_volume):
    """The cached-spectrum, one-kernel-per-radius sphere search scores and picks what fftconvolve of
    the inner and outer shells did (the locator before it was made fast)."""
    from scipy.signal import fftconvolve

    from screener.protocols.femur_coronal.preprocess import _REFINE_RADII, _refine_sphere, _shell
    from screener.preprocess.sampling import VolumeSampler

    _, scene = hip_ct
    sampler = VolumeSampler(hip_volume)
    g, half, search = 1.5, 42.0, 18.0
    for side in ("R", "L"):
        c0 = np.asarray(scene.femoral_heads[side]) + np.array([4.0, -3.0, 6.0])
        ax = np.arange(-half, half + 1e-6, g)
        n = len(ax)
        cube = np.stack([sampler((c0[0] + ax[0], c0[1] + ax[0], z), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (n, n), (g, g))
                         for z in c0[2] + ax])
        cube = np.clip(np.nan_to_num(cube, nan=-1000.0), -200.0, 1500.0)
        inside = np.abs(ax) <= search
        best = (-np.inf, None, 0.0)
        for r in _REFINE_RADII:
            score = fftconvolve(cube, _shell(r - 3.0, r, g), mode="same") - fftconvolve(cube, _shell(r + 0.75, r + 4.0, g), mode="same")
            sub = score[np.ix_(inside, inside, inside)]
            kk, jj, ii = np.unravel_index(int(np.argmax(sub)), sub.shape)
            if sub[kk, jj, ii] > best[0]:
                idx = np.flatnonzero(inside)
                best = (float(sub[kk, jj, ii]), (idx[kk], idx[jj], idx[ii]), r)
        k, j, i = best[1]
        score, c, r = _refine_sphere(sampler, c0, (-1e9, 1e9))
        assert score == pytest.approx(best[0], rel=1e-5) and r == best[2]
        assert c == (float(c0[0] + ax[i]), float(c0[1] + ax[j]), float(c0[2] + ax[k]))
        assert np.linalg.norm(np.subtract(c, scene.femoral_heads[side])) < 2.0


def test_grid_interpolation_in_chunks_equals_whole_array_passes():
    """The slab-by-slab interpolation of two axes gives the float32 values of one pass per axis
    over the whole array (what _grid_hu did before), for every axis order."""
    from itertools import permutations

    from screener.protocols.femur_coronal.preprocess import _lerp_axis, _lerp_two_axes_in_chunks

    rng = np.random.default_rng(5)
    a = (rng.standard_normal((11, 23, 19)) * 400.0).astype(np.float32)
    ts = {0: np.linspace(-0.5, 10.2, 7), 1: np.linspace(0.0, 22.0, 9), 2: np.linspace(0.3, 18.6, 8)}
    for order in permutations(range(3)):
        want = _lerp_axis(_lerp_axis(a, ts[order[0]], order[0], -1000.0), ts[order[1]], order[1], -1000.0)
        got = _lerp_two_axes_in_chunks(a, ts, order, -1000.0)
        assert got.dtype == np.float32 and np.array_equal(got, want)


def _grid_hu_whole_array(volume, sampler, xs, ys, zs):
    """_grid_hu as it was before the chunks and the cut (no floor): one pass per axis over the
    whole array, the axis that shrinks it most first."""
    from screener.protocols.femur_coronal.preprocess import _axis_map, _lerp_axis

    amap = _axis_map(volume)
    a = np.asarray(volume.array, dtype=np.float32)
    coords = (xs, ys, zs)
    patient_of = {axis: m for m, (axis, _, _) in enumerate(amap)}
    out = np.full((len(zs), len(ys), len(xs)), sampler.outside, dtype=np.float32)
    inside = {}
    todo = [0, 1, 2]
    while todo:
        axis = min(todo, key=lambda ax: len(coords[patient_of[ax]]) / a.shape[ax])
        todo.remove(axis)
        m = patient_of[axis]
        _, origin, step = amap[m]
        t = (np.asarray(coords[m], dtype=np.float64) - origin) / step
        ok = np.flatnonzero((t >= 0.0) & (t <= a.shape[axis] - 1))
        if not len(ok):
            return out
        inside[m] = slice(int(ok[0]), int(ok[-1]) + 1)
        a = _lerp_axis(a, t[inside[m]], axis, sampler.outside)
    order = [next(ax for ax in range(3) if patient_of[ax] == m) for m in (2, 1, 0)]
    out[inside[2], inside[1], inside[0]] = np.transpose(a, order)
    return out


def test_grid_of_a_small_cube_reads_only_its_part_of_the_volume(hip_volume):
    """The sphere refinement's cube: _grid_hu cut to the part of the volume it reads gives the
    float32 values of the passes over the whole volume (cubes inside, across an edge, outside)."""
    from screener.protocols.femur_coronal.preprocess import _grid_hu
    from screener.preprocess.sampling import VolumeSampler

    s = VolumeSampler(hip_volume)
    ax = np.arange(-42.0, 42.0 + 1e-6, 1.5)
    lo = np.asarray(hip_volume.index_to_patient(0, 0, 0))
    hi = np.asarray(hip_volume.index_to_patient(*(n - 1 for n in hip_volume.array.shape)))
    mid = (lo + hi) / 2.0
    for c in (mid, mid + np.array([13.3, -7.1, 4.9]), np.where(np.arange(3) == 2, lo, mid), hi + 100.0):
        want = _grid_hu_whole_array(hip_volume, s, c[0] + ax, c[1] + ax, c[2] + ax)
        got = _grid_hu(hip_volume, s, c[0] + ax, c[1] + ax, c[2] + ax)
        assert np.array_equal(got, want)
