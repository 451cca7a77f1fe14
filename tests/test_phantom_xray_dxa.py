"""Virtual-cohort projection renderers: hip radiograph DRR (DX) and DXA spine (BMD).

Real numbers: Beer--Lambert on a known slab, dual-energy decomposition of a slab of known
hydroxyapatite under varying soft-tissue depth, DXA aBMD against the mineral mass / projected area
summed independently in 3-D, physically sensible aBMD labels, dciodvfy, byte-identical re-renders.
"""
from __future__ import annotations

import subprocess
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest

from tests.conftest import require_tool
from training.phantoms import dxa, physics, xray
from training.phantoms import projection_dicom as pdcm


# ------------------------------------------------------------------------------------------------
# slab phantoms (no anatomy needed)
# ------------------------------------------------------------------------------------------------
@dataclass
class SlabScene:
    """Soft tissue between y0 and y1 (optionally a wedge in z), a hydroxyapatite slab where x > 0."""

    y0: float = -100.0
    y1: float = 100.0
    ha_density: float = 1.0  # g/cm3 partial density of mineral in the slab
    ha_y: tuple[float, float] = (-5.0, 5.0)
    wedge: bool = False  # soft-tissue depth grows with z: y1(z) = y1 + 0.5 * (z + 100)
    fat_layer_mm: float = 0.0  # fat replacing soft tissue at the anterior surface, grows with z

    patient = SimpleNamespace(patient_id="SLAB", age=50.0, sex="F", height_cm=165.0, weight_kg=65.0)
    femoral_heads = {"R": (-90.0, 0.0, -40.0), "L": (90.0, 0.0, -40.0)}

    def bounds(self) -> tuple[tuple[float, float], ...]:
        y_hi = self.y1 + (100.0 if self.wedge else 0.0)
        return ((-200.0, 200.0), (self.y0, y_hi), (-200.0, 200.0))

    def _y_back(self, z: np.ndarray) -> np.ndarray:
        return self.y1 + (0.5 * (np.clip(z, -100.0, 100.0) + 100.0) if self.wedge else 0.0)

    def densities(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> dict[str, np.ndarray]:
        x, y, z = np.broadcast_arrays(*map(np.asarray, (x, y, z)))
        inside = (y >= self.y0) & (y < self._y_back(z))
        fat_end = self.y0 + self.fat_layer_mm * (0.5 + 0.5 * np.clip(z, -100, 100) / 100.0)
        fat = inside & (y < fat_end)
        ha = inside & (x > 0) & (y >= self.ha_y[0]) & (y < self.ha_y[1])
        soft = np.where(inside & ~fat, 1.05, 0.0)
        soft = np.where(ha, 1.05 * (1.0 - self.ha_density / 3.16), soft)  # mineral displaces tissue
        return {"soft": soft, "fat": np.where(fat, 0.95, 0.0), "ha": np.where(ha, self.ha_density, 0.0),
                "iodine": np.zeros(x.shape), "air": np.zeros(x.shape)}

    def structure_mask(self, name: str, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        return np.zeros(np.broadcast(x, y, z).shape, bool)


def test_drr_obeys_beer_lambert_on_a_known_slab():
    """-ln(I/I0) of the cone-beam DRR = sum mu_m rho_m x path length through each layer."""
    scene = SlabScene()
    ds, truth = xray.render_hip_xray(scene, 7, "neutral", spectrum="mono", kev=60.0, pixel_mm=2.0,
                                     ray_mm=2.0, dy_mm=0.5, field_mm=(200.0, 160.0), scatter=False,
                                     noise=False, jitter=False, processing=False)
    geom = xray.hip_geometry(scene, xray.POSES["neutral"], pixel_mm=2.0, field_mm=(200.0, 160.0))
    xs, ys, zs = geom.source
    uu, vv = np.meshgrid(geom.u, geom.v)
    obliq = np.sqrt((uu - xs) ** 2 + (vv - zs) ** 2 + geom.sid_mm**2) / geom.sid_mm  # path / depth
    mu_soft = float(physics.mass_attenuation("soft", 60.0)) * 1.05
    mu_ha = float(physics.mass_attenuation("ha", 60.0))
    t_cm = (scene.y1 - scene.y0) / 10.0
    h_cm = (scene.ha_y[1] - scene.ha_y[0]) / 10.0
    # the mineral ray crosses the slab where x(y=0) > 0; x at y=0 along the ray = xs + t0 (u - xs)
    t0 = (0.0 - ys) / geom.sid_mm
    in_ha = xs + t0 * (uu - xs) > 0
    soft_only = mu_soft * t_cm * obliq
    with_ha = (mu_soft * (t_cm - h_cm) + (mu_soft * (1 - 1.0 / 3.16) + mu_ha * 1.0) * h_cm) * obliq
    expected = np.where(in_ha, with_ha, soft_only)
    far = np.abs(xs + t0 * (uu - xs)) > 4.0  # away from the slab edge (partial rays)
    rel = np.abs(truth["log_image"][far] - expected[far]) / expected[far]
    assert rel.max() < 1e-4, rel.max()
    # the corner rays are 0.8 % longer than the central one: the obliquity is really modelled
    assert obliq.max() > 1.007
    # stored 12-bit value = round(500 * -ln(I/I0))
    stored = ds.pixel_array.astype(float)
    assert np.abs(stored[far] - 500.0 * expected[far]).max() <= 0.5 + 1e-6
    # polychromatic: each bin follows Beer-Lambert, the detector sums them
    _, poly = xray.render_hip_xray(scene, 7, "neutral", spectrum="poly", kvp=75.0, pixel_mm=2.0,
                                   ray_mm=2.0, dy_mm=0.5, field_mm=(200.0, 160.0), scatter=False,
                                   noise=False, jitter=False)
    e, w = xray.xray_spectrum(75.0)
    r, c = np.argwhere(far & in_ha)[0]
    soft_cm = (t_cm - h_cm) * obliq[r, c]
    ha_cm = h_cm * obliq[r, c]
    i_expected = sum(wk * np.exp(-(physics.mass_attenuation("soft", ek) * 1.05 * soft_cm
                                   + physics.mass_attenuation("soft", ek) * 1.05 * (1 - 1 / 3.16) * ha_cm
                                   + physics.mass_attenuation("ha", ek) * ha_cm)) for ek, wk in zip(e, w))
    assert poly["log_image"][r, c] == pytest.approx(-np.log(i_expected), rel=1e-4)


def test_decomposition_recovers_known_mineral_under_varying_soft_tissue():
    """sigma_b of an 8 mm x 1.0 g/cm3 HA slab (0.80 g/cm2) under 200-300 mm of tissue + a fat layer."""
    scene = SlabScene(ha_density=1.0, ha_y=(-4.0, 4.0), wedge=True, fat_layer_mm=40.0)
    u = np.arange(-60.0, 60.0, 0.6) + 0.3
    v = np.arange(100.0, -100.0, -1.05) - 0.525
    proj = xray.project(dxa._MaterialSampler(scene), u, v, scene.bounds()[1], 0.5)
    a_l = sum(float(physics.mass_attenuation(m, 40.0)) * p for m, p in proj.items())
    a_h = sum(float(physics.mass_attenuation(m, 70.0)) * p for m, p in proj.items())
    # the soft-tissue depth really varies (200 to 300 mm) and the fat layer changes R_s by row
    depth = proj["soft"][:, 0] / 1.05 + proj["fat"][:, 0] / 0.95
    assert depth.max() - depth.min() > 9.0
    sigma, r_s = dxa.decompose(a_l, a_h, (40.0, 70.0))
    assert r_s.max() - r_s.min() > 0.005
    bone = u[None, :].repeat(len(v), 0) > 2.0
    free = u[None, :].repeat(len(v), 0) < -2.0
    # the slab: 0.8 g/cm2 everywhere, whatever the depth (edge columns excluded)
    assert np.abs(sigma[bone] - 0.8).max() < 0.8 * 0.005
    assert np.abs(sigma[free]).max() < 0.004
    # with quantum noise the mean over the slab stays within 1 %
    rng = np.random.default_rng(3)
    noisy = []
    for a, n0 in ((a_l, 4e7), (a_h, 1e7)):
        counts = n0 * np.exp(-a)
        counts = counts + np.sqrt(counts) * rng.standard_normal(a.shape)
        noisy.append(-np.log(counts / n0))
    s_noisy, _ = dxa.decompose(noisy[0], noisy[1], (40.0, 70.0))
    assert s_noisy[bone].mean() == pytest.approx(0.8, rel=0.01)
    # per-pixel noise of a DXA image: of the order of 0.01-0.05 g/cm2
    assert 0.005 < s_noisy[free].std() < 0.06
    # the same with the scanner-like reference band next to the "spine" (the slab edge)
    s_band, _ = dxa.decompose(a_l, a_h, (40.0, 70.0), x_mm=u, reference_band_mm=40.0)
    assert np.abs(s_band[bone] - 0.8).max() < 0.8 * 0.005


# ------------------------------------------------------------------------------------------------
# the anatomical phantom
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def patients():
    from training.phantoms.population import sample_population

    return sample_population(40, 11)


@pytest.fixture(scope="module")
def scene(patients):
    from training.phantoms.anatomy import build_scene

    return build_scene(patients[0])


class FatAsSoft:
    """The same anatomy with every gram of fat counted as soft tissue (one soft-tissue material).

    Two-material DXA is exact when the soft tissue has one composition; this isolates the
    projection + decomposition + ROI chain from the (real, physical) fat error.
    """

    def __init__(self, scene):
        self._scene = scene

    def __getattr__(self, name):
        return getattr(self._scene, name)

    def densities_from_labels(self, lab, x, y, z, phase="native"):
        d = dict(self._scene.densities_from_labels(lab, x, y, z, phase))
        d["soft"] = d["soft"] + d["fat"]
        d["fat"] = np.zeros_like(d["fat"])
        return d

    def densities(self, x, y, z, phase="native"):
        d = dict(self._scene.densities(x, y, z, phase))
        d["soft"] = d["soft"] + d["fat"]
        d["fat"] = np.zeros_like(d["fat"])
        return d


def _mineral_projection_3d(scene, u, v, pixel_mm, boxes, sub=2, dy=0.7):
    """Bone mineral per DXA pixel (g/cm2), summed voxel by voxel from scene.densities x bone mask.

    Independent of the renderer: no material line integrals, no attenuation, no decomposition; the
    scene is sampled at ``sub x sub`` points per pixel on coronal planes ``dy`` mm apart.
    """
    verts = {t.label: t for t in scene.vertebrae}
    ys = [verts[k].centroid_mm[1] for k in dxa.LUMBAR]
    y_lo, y_hi = min(ys) - 40.0, max(ys) + 110.0
    lo = np.min(list(boxes.values()), axis=0)
    hi = np.max(list(boxes.values()), axis=0)
    rows = np.flatnonzero((v >= lo[0] - 2) & (v <= hi[1] + 2))
    cols = np.flatnonzero((u >= lo[2] - 2) & (u <= hi[3] + 2))
    dr, dc = pixel_mm
    zs = (v[rows][:, None] + (np.arange(sub) + 0.5 - sub / 2) * dr / sub).ravel()
    xs = (u[cols][:, None] + (np.arange(sub) - sub / 2 + 0.5) * dc / sub).ravel()
    X, Z = np.meshgrid(xs, zs)
    mass = np.zeros(X.shape)
    for y in np.arange(y_lo, y_hi, dy) + dy / 2:
        Y = np.full(X.shape, y)
        ha = scene.densities(X, Y, Z)["ha"]
        mass += np.where(scene.structure_mask("bone", X, Y, Z), ha, 0.0)
    mass *= dy / 10.0 / sub**2  # g/cm2 averaged over the sub-samples of each pixel
    out = np.zeros((len(v), len(u)))
    out[np.ix_(rows, cols)] = mass.reshape(len(rows), sub, len(cols), sub).sum(axis=(1, 3))
    return out


def test_dxa_abmd_equals_mineral_mass_over_projected_area(scene):
    """L1-L4 aBMD from the decomposed (noisy) sigma_b image = 3-D mineral mass / projected area, 1 %."""
    one_soft = FatAsSoft(scene)
    ds, info = dxa.render_dxa_spine(one_soft, 5)
    u, v, px = info["x_mm"], info["z_mm"], info["pixel_mm"]
    boxes = info["boxes_mm"]
    mineral = _mineral_projection_3d(one_soft, u, v, px, boxes)
    ref = dxa.measure_rois(mineral, boxes, u, v, px)
    got = info["measurement"]
    for key in ("L1-L4",):
        assert got[key]["bmc_g"] == pytest.approx(ref[key]["bmc_g"], rel=0.01)
        assert got[key]["area_cm2"] == pytest.approx(ref[key]["area_cm2"], rel=0.01)
        assert got[key]["abmd"] == pytest.approx(ref[key]["abmd"], rel=0.01)
    for key in dxa.LUMBAR:
        assert got[key]["abmd"] == pytest.approx(ref[key]["abmd"], rel=0.02)
    # the ROI really holds a vertebra's worth of mineral: L1-L4 BMC 30-90 g over 40-80 cm2
    assert 30.0 < ref["L1-L4"]["bmc_g"] < 90.0 and 40.0 < ref["L1-L4"]["area_cm2"] < 80.0


def test_dxa_of_the_real_anatomy_shows_only_the_fat_error(scene):
    """With fat, muscle, organs and marrow the two-material assumption fails a little: the DXA
    image's L1-L4 aBMD stays within 8 % of the label (true mineral / area, same ROI rule; -0.5 to
    +6 % measured over 6 patients), and
    the soft-tissue background stays near zero (the fat error of DXA, Mazess 1991)."""
    truth = dxa.areal_bmd_truth(scene)
    _, info = dxa.render_dxa_spine(scene, 5)
    assert info["abmd"]["L1-L4"] == pytest.approx(truth["L1-L4"], rel=0.08)
    sig = info["sigma_b"]
    # soft tissue lateral to L2-L3 (beyond the transverse processes, between ribs and iliac crest)
    lateral = np.abs(info["x_mm"] - info["x_mm"].mean()) > 75.0
    rows = slice(info["rois"]["L2"][0], info["rois"]["L3"][1])
    background = sig[rows][:, lateral]
    # ~20 g/cm2 of tissue removed to within the fat-heterogeneity level (a vertebra is ~1 g/cm2)
    assert abs(float(np.median(background))) < 0.12
    # the image is a DXA image: pixel grid 1.05 x 0.60 mm, vertebrae ~0.5-1.5 g/cm2
    assert info["pixel_mm"] == (1.05, 0.60)
    for label, (r0, r1, c0, c1) in info["rois"].items():
        assert 0.4 < info["abmd"][label] < 2.0


def test_areal_bmd_labels_are_physically_sensible(patients):
    """Young adults: L1-L4 ~1.0-1.1 g/cm2 (NHANES 2005-08 21-30 y: 1.06), femoral neck ~0.85
    (NHANES III women 20-29: 0.858; the phantom measures ~0.85 with a ~1.5 mm neck cortex), total hip
    above the neck (NHANES III: +0.08); women >= 70 have a lower femoral neck than young adults."""
    from training.phantoms.anatomy import build_scene

    young = [p for p in patients if p.age < 35][:5]
    old_women = [p for p in patients if p.age >= 70 and p.sex == "F"][:3]
    assert len(young) >= 4 and len(old_women) >= 2
    yl = [dxa.areal_bmd_truth(build_scene(p)) for p in young]
    ol = [dxa.areal_bmd_truth(build_scene(p)) for p in old_women]
    spine_young = np.mean([t["L1-L4"] for t in yl])
    neck_young = np.mean([t["femoral_neck"] for t in yl])
    assert 0.92 < spine_young < 1.20, spine_young
    assert 0.68 < neck_young < 1.00, neck_young
    assert np.mean([t["total_hip"] for t in yl]) > neck_young
    assert np.mean([t["femoral_neck"] for t in ol]) < neck_young - 0.05
    for t in yl + ol:
        assert t["L1-L4"] == pytest.approx(t["L1-L4_bmc_g"] / t["L1-L4_area_cm2"], rel=1e-9)
        assert 35.0 < t["L1-L4_area_cm2"] < 85.0  # clinical L1-L4 areas are ~50-70 cm2
        assert t["femoral_neck_R"] > 0.3 and t["total_hip_L"] > 0.3


def test_hip_pose_moves_the_femur_but_keeps_its_mineral(scene):
    """Abduction swings the femoral shaft laterally; the proximal-femur DRR's mineral (Sum x pixel
    area / magnification^2) is the same in both poses (2 %); bone DRR >= PF-DRR; heads on the PF-DRR."""
    kw = dict(ray_mm=2.0, dy_mm=1.5, pixel_mm=1.0, noise=False, jitter=False)
    _, sup = xray.render_hip_xray(scene, 3, "supine", **kw)
    _, abd = xray.render_hip_xray(scene, 3, "abduction", **kw)
    px = sup["pixel_mm"]
    for side in ("R", "L"):
        m_sup = sup["pf_drr"][side].sum() * (px / 10) ** 2 / sup["magnification"] ** 2
        m_abd = abd["pf_drr"][side].sum() * (px / 10) ** 2 / abd["magnification"] ** 2
        assert m_sup > 5.0  # grams of mineral in a proximal femur: ~10-30 g
        assert m_abd == pytest.approx(m_sup, rel=0.02)
        r, c = (int(round(t)) for t in sup["femoral_heads_px"][side])
        assert sup["pf_drr"][side][r, c] > 0.5  # the head centre projects onto dense bone
        # the lower PF region moves laterally in abduction (right femur -> image left)
        rows = slice(r + 40, r + 60)
        cols = np.arange(sup["pf_drr"][side].shape[1])
        def centroid(img):
            w = img[rows].sum(axis=0)
            return float((w * cols).sum() / w.sum())
        shift = centroid(abd["pf_drr"][side]) - centroid(sup["pf_drr"][side])
        assert (shift < -2.0) if side == "R" else (shift > 2.0), shift
    assert np.all(sup["bone_drr"] >= sup["pf_drr"]["R"] - 1e-6)
    assert sup["bone_drr"].max() > 2.0 and sup["pose"]["name"] == "supine"


def test_painting_from_the_femur_on_gives_the_femur_exactly(scene):
    """``label_plane(from_structure=...)`` (the femur-only truth's fast path) labels every femur pixel
    as the full painting does, and nothing else as femur, on a plane through the hip."""
    h = np.asarray(scene.femoral_heads["L"], float)
    args = (h + np.array([-60.0, 0.0, 40.0]), np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.0, -1.0]),
            (140, 180), (1.0, 1.0))
    ids = scene.structure_ids("femur_L")
    full = scene.label_plane(*args, bone_only=True)
    part = scene.label_plane(*args, bone_only=True, from_structure="femur_L")
    femur = np.isin(full, ids)
    assert femur.sum() > 1500  # the plane cuts head, neck and trochanter
    assert np.array_equal(np.isin(part, ids), femur)
    assert np.array_equal(part[femur], full[femur])
    assert np.isin(full[~femur], scene.structure_ids("pelvis")).any()  # the full painting has more


def _errors(path) -> list[str]:
    proc = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True, text=True)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]


def test_dicoms_pass_dciodvfy_and_rerender_byte_identical(scene, tmp_path):
    ds_x, _ = xray.render_hip_xray(scene, 9, "standing", ray_mm=4.0, dy_mm=3.0)
    ds_d, _ = dxa.render_dxa_spine(scene, 9, dy_mm=2.0, supersample=(1, 1))
    px = pdcm.write_dataset(ds_x, tmp_path / "hip.dcm")
    pd = pdcm.write_dataset(ds_d, tmp_path / "dxa.dcm")
    assert _errors(px) == [] and _errors(pd) == []
    assert ds_x.SOPClassUID == pdcm.DX_PRESENTATION_SOP and ds_x.Modality == "DX"
    assert ds_x.ViewPosition == "AP" and ds_x.BodyPartExamined == "PELVIS"
    assert float(ds_x.PixelSpacing[0]) < float(ds_x.ImagerPixelSpacing[0])  # magnified at the detector
    assert ds_d.Modality == "BMD" and ds_d.SOPClassUID == pdcm.SECONDARY_CAPTURE_SOP
    assert [float(t) for t in ds_d.PixelSpacing] == [1.05, 0.6]
    # the BMD image carries g/cm2 through its Modality LUT
    assert float(ds_d.RescaleSlope) == pytest.approx(1e-4)
    # same seed -> identical bytes; another seed -> other UIDs and pixels
    again_x, _ = xray.render_hip_xray(scene, 9, "standing", ray_mm=4.0, dy_mm=3.0)
    again_d, _ = dxa.render_dxa_spine(scene, 9, dy_mm=2.0, supersample=(1, 1))
    assert pdcm.dataset_bytes(again_x) == px.read_bytes()
    assert pdcm.dataset_bytes(again_d) == pd.read_bytes()
    other, _ = dxa.render_dxa_spine(scene, 10, dy_mm=2.0, supersample=(1, 1))
    assert other.SOPInstanceUID != ds_d.SOPInstanceUID and other.PixelData != ds_d.PixelData
    # all studies of a patient share the patient identity, never a real one
    assert ds_x.PatientID == ds_d.PatientID == scene.patient.patient_id
    assert ds_x.StudyInstanceUID != ds_d.StudyInstanceUID
