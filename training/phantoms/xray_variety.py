"""Hip radiographs with the variety of real archives, each with its landmark truth.

The AP pelvis of :func:`training.phantoms.xray.render_hip_xray` is one textbook view.  Archives hold
single hips, off-centre and partial pelves, rotated and abducted legs, implants, children, obese
patients, inverted (``MONOCHROME1``) and low-bit images with markers and text burned in.  This
module draws such an acquisition (:class:`RadiographSpec`, :func:`sample_spec`), renders it through
the same 3-D phantom scene and projector, edits the material line integrals for what the scene does
not hold (:func:`edit_projections`: implant metal, extra fat, bowel gas, open physes) and crops,
mirrors and encodes the result (:func:`render_case`).

Every case carries its truth (:class:`HipTruth` per side): present or not, femoral-head centre and
femoral-neck ROI centre (stored pixel ``(row, col)``), femoral-head radius (pixels), metal yes / no.

Profiles
--------
``standard``
    The training distribution of the hip landmark model: the paper's four poses with jitter, whole
    pelves (50 %), single hips collimated (40 %), off-centre pelves with one hip out of the field
    (10 %); a mirrored image (10 %, always with ``PatientOrientation`` R\\F), ``MONOCHROME1`` (20 %),
    header orientation and laterality often left out, side markers and text, mild bowel gas.
``variety``
    Held out of training and reported separately: internal / external rotation +-20 deg per hip,
    abduction up to 40 deg (frog-leg 10 %), pelvic tilt +-8 deg, implant metal in a hip (25 % per
    hip: arthroplasty, cephalomedullary nail or cannulated screws), children (15 %: anatomy scaled
    0.6-0.8, open physes), obese soft tissue (25 %: 80-200 mm of extra fat with a pannus edge), more
    bowel gas, 8/10/12/16-bit storage, lossy JPEG (20 %), more off-centre collimation.
``wide``
    Training only (hip landmarks 0.4.0 on): the archive's variety drawn by its own sampler, wider
    than ``variety`` and with other proportions -- rotation +-25 deg, abduction -15 to 35 deg, frog-leg
    15 % (abduction 30-50 deg, external rotation 15-40 deg), pelvic tilt +-10 deg, implant metal in 20 %
    of hips with implant dimensions scaled 0.75-1.3 (``implant_scale``), children 12 % (0.55-0.85),
    obese 25 % (60-220 mm), 8/10/12/14/16-bit, lossy JPEG 20 % (quality 25-90), off-centre 21 %.  It
    shares the scene, projector and the implant / fat / physis edits with ``variety`` (the only renderer
    there is), so ``variety`` stays held out by seed, patients and sampler, not by the kind of factor.

Metal is modelled as hydroxyapatite-equivalent density (CoCr ~31, steel ~27, Ti ~10 g/cm3 of HA:
linear attenuation at ~60 keV relative to HA; heads CoCr, stems, cups and nails Ti, screws steel), a child's anatomy by scaling the declared pixel spacing
(the scene is an adult's), the physes as radiolucent bands (60 % of the bone removed) across the
head-neck junction and under the greater trochanter.  These are approximations, stated here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from training.phantoms import projection_dicom as pdcm
from training.phantoms.xray import HipGeometry, Pose, _project_point, render_hip_xray, sample_pose

__all__ = ["PROFILES", "HipTruth", "RadiographCase", "RadiographSpec", "edit_projections", "render_case",
           "render_cases", "sample_spec"]

PROFILES = ("standard", "variety", "wide")
#: the rendered detector field (width, height mm) and its centre relative to the head mid-point
FIELD_MM = (440.0, 440.0)
AIM_MM = (0.0, -10.0)
#: metal, hydroxyapatite-equivalent density (g/cm3)
METAL_HA = {"cocr": 31.0, "steel": 27.0, "ti": 10.0}
#: a hip is "present" when its head centre and neck ROI centre lie this far inside the field (mm)
PRESENT_MARGIN_MM = 12.0
#: a hip is "absent" when its head centre lies this far outside the field (mm)
ABSENT_MARGIN_MM = 30.0


@dataclass(frozen=True)
class RadiographSpec:
    """One acquisition of the hip radiograph cohort.

    Attributes
    ----------
    profile : str
        ``"standard"`` or ``"variety"``.
    pose : Pose
        Pelvic tilt, abduction and rotation of each femur.
    collimation : str
        ``"pelvis"``, ``"hip_R"``, ``"hip_L"`` (one hip collimated) or ``"offcentre"`` (a pelvis
        shifted so that one hip leaves the field).
    mirror : bool
        Store the image left-right mirrored (``PatientOrientation`` R\\F).
    orientation_header, laterality_header : bool
        Write ``PatientOrientation`` / ``ImageLaterality`` (a mirrored image always states it).
    monochrome1 : bool
        Store inverted (``MONOCHROME1``, ``PresentationLUTShape`` INVERSE).
    bits : int
        Bits stored (8, 10, 12 or 16).
    metal : dict
        ``{"R": kind, "L": kind}`` with kind ``"none"``, ``"arthroplasty"``, ``"nail"``, ``"screws"``.
    child_scale : float
        1.0 for an adult; < 1 a child (anatomy scaled by declaring a smaller pixel spacing) with open
        physes.
    obese_mm : float
        Extra fat thickness over the body (mm).
    bowel_gas : int
        Number of bowel-gas pockets.
    markers, text : bool
        Burn in a lead side marker / text lines.
    jpeg_quality : int or None
        Lossy JPEG round trip of the stored pixels.
    kvp, quanta_per_pixel, processing_strength : float
        Technique (see :func:`training.phantoms.xray.render_hip_xray`).
    implant_scale : float
        Implant radii and lengths relative to the reference implants (``wide`` profile only).
    shutter_mm : tuple of float or None
        Unexposed collimator margins kept in the stored image ``(top, bottom, left, right)`` in mm,
        rendered white (``variety`` profile only: drawn per view by :func:`_shutter_spec`, ``None``:
        the image ends at the collimated field).
    """

    profile: str
    pose: Pose
    collimation: str = "pelvis"
    mirror: bool = False
    orientation_header: bool = True
    laterality_header: bool = True
    monochrome1: bool = False
    bits: int = 12
    metal: dict[str, str] = field(default_factory=lambda: {"R": "none", "L": "none"})
    child_scale: float = 1.0
    obese_mm: float = 0.0
    bowel_gas: int = 0
    markers: bool = False
    text: bool = False
    jpeg_quality: int | None = None
    kvp: float = 75.0
    quanta_per_pixel: float = 2.0e4
    processing_strength: float = 1.0
    implant_scale: float = 1.0
    shutter_mm: tuple[float, float, float, float] | None = None


@dataclass(frozen=True)
class HipTruth:
    """Truth of one hip on the stored image.

    Attributes
    ----------
    side : str
        Patient side, ``"R"`` or ``"L"``.
    present : bool
        Head and neck ROI centre well inside the field.
    head_px, neck_px : tuple of float
        ``(row, col)`` of the femoral-head centre and the femoral-neck ROI centre (may lie outside
        the image when the hip is absent).
    head_radius_px : float
    metal : str
        ``"none"``, ``"arthroplasty"``, ``"nail"`` or ``"screws"``.
    """

    side: str
    present: bool
    head_px: tuple[float, float]
    neck_px: tuple[float, float]
    head_radius_px: float
    metal: str = "none"

    @property
    def medial_toward_plus_col(self) -> bool:
        """Whether the pelvis (medial) lies towards increasing column from the head."""
        return self.neck_px[1] < self.head_px[1]


@dataclass
class RadiographCase:
    """A rendered case: the DICOM dataset, its spec and the truth of both hips."""

    dataset: Any
    spec: RadiographSpec
    hips: dict[str, HipTruth]
    pixel_spacing_mm: float
    patient_id: str
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def present_sides(self) -> list[str]:
        """Patient sides of the hips present."""
        return [s for s, h in self.hips.items() if h.present]


# ---------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------
def sample_spec(profile: str, rng: np.random.Generator) -> RadiographSpec:
    """Draw one acquisition of ``profile`` (see the module docstring).

    Parameters
    ----------
    profile : str
        ``"standard"`` or ``"variety"``.
    rng : numpy.random.Generator

    Returns
    -------
    RadiographSpec
    """
    if profile not in PROFILES:
        raise ValueError(f"unknown radiograph profile {profile!r}; choose one of {PROFILES}")
    u = rng.uniform
    coll = rng.choice(["pelvis", "hip_R", "hip_L", "offcentre"],
                      p=[0.5, 0.2, 0.2, 0.1] if profile == "standard" else [0.35, 0.2, 0.2, 0.25])
    mirror = bool(u() < 0.1)
    orient = mirror or bool(u() < 0.6)
    common = dict(collimation=str(coll), mirror=mirror, orientation_header=orient,
                  laterality_header=bool(u() < 0.5), monochrome1=bool(u() < (0.2 if profile == "standard" else 0.3)),
                  markers=bool(u() < 0.6), text=bool(u() < 0.5))
    if profile == "standard":
        pose = sample_pose(str(rng.choice(["supine", "standing", "abduction", "adduction"])), rng)
        return RadiographSpec(profile=profile, pose=pose, bits=12, bowel_gas=int(rng.integers(0, 4)),
                              obese_mm=float(u(0.0, 40.0)), kvp=float(np.round(u(70.0, 85.0))),
                              quanta_per_pixel=float(u(1.0e4, 3.0e4)), processing_strength=float(u(0.6, 1.2)),
                              **common)
    if profile == "wide":
        return _sample_wide(rng, common)
    if u() < 0.1:  # frog-leg lateral: abduction 40 deg, external rotation
        abd = (u(35.0, 45.0), u(35.0, 45.0))
        rot = (u(-35.0, -20.0), u(-35.0, -20.0))
        name = "frog_leg"
    else:
        abd = (u(-10.0, 30.0), u(-10.0, 30.0))
        rot = (u(-20.0, 20.0), u(-20.0, 20.0))
        name = "rotated"
    pose = Pose(name, pelvic_tilt_deg=u(-8.0, 8.0), abduction_deg=abd, internal_rotation_deg=rot,
                upright=bool(u() < 0.3), sid_mm=float(u(1000.0, 1200.0)))
    metal = {s: (str(rng.choice(["arthroplasty", "nail", "screws"], p=[0.4, 0.3, 0.3])) if u() < 0.25 else "none")
             for s in ("R", "L")}
    child = float(u(0.6, 0.8)) if u() < 0.15 else 1.0
    return RadiographSpec(profile=profile, pose=pose, metal=metal, child_scale=child,
                          obese_mm=float(u(80.0, 200.0)) if u() < 0.25 else float(u(0.0, 30.0)),
                          bowel_gas=int(rng.integers(0, 8)), bits=int(rng.choice([8, 10, 12, 16])),
                          jpeg_quality=int(rng.integers(30, 80)) if u() < 0.2 else None,
                          kvp=float(np.round(u(65.0, 95.0))), quanta_per_pixel=float(u(5.0e3, 3.0e4)),
                          processing_strength=float(u(0.3, 1.5)), **common)


def _sample_wide(rng: np.random.Generator, common: dict[str, Any]) -> RadiographSpec:
    """The ``wide`` training profile (module docstring): its own ranges and proportions."""
    u = rng.uniform
    common = dict(common)
    common["collimation"] = str(rng.choice(["pelvis", "hip_R", "hip_L", "offcentre"], p=[0.35, 0.22, 0.22, 0.21]))
    common["monochrome1"] = bool(u() < 0.25)
    if u() < 0.15:  # frog-leg
        abd = (u(30.0, 50.0), u(30.0, 50.0))
        rot = (u(-40.0, -15.0), u(-40.0, -15.0))
        name = "frog_leg"
    else:
        abd = (u(-15.0, 35.0), u(-15.0, 35.0))
        rot = (u(-25.0, 25.0), u(-25.0, 25.0))
        name = "rotated"
    pose = Pose(name, pelvic_tilt_deg=u(-10.0, 10.0), abduction_deg=abd, internal_rotation_deg=rot,
                upright=bool(u() < 0.3), sid_mm=float(u(950.0, 1250.0)))
    metal = {s: (str(rng.choice(["arthroplasty", "nail", "screws"], p=[0.4, 0.3, 0.3])) if u() < 0.2 else "none")
             for s in ("R", "L")}
    child = float(u(0.55, 0.85)) if u() < 0.12 else 1.0
    return RadiographSpec(profile="wide", pose=pose, metal=metal, child_scale=child, implant_scale=float(u(0.75, 1.3)),
                          obese_mm=float(u(60.0, 220.0)) if u() < 0.25 else float(u(0.0, 40.0)),
                          bowel_gas=int(rng.integers(0, 9)), bits=int(rng.choice([8, 10, 12, 14, 16])),
                          jpeg_quality=int(rng.integers(25, 90)) if u() < 0.2 else None,
                          kvp=float(np.round(u(60.0, 100.0))), quanta_per_pixel=float(u(4.0e3, 3.5e4)),
                          processing_strength=float(u(0.3, 1.6)), **common)


# ---------------------------------------------------------------------------------------------
# projection edits
# ---------------------------------------------------------------------------------------------
def _capsule_cm(rr: np.ndarray, cc: np.ndarray, p0: np.ndarray, p1: np.ndarray, radius_px: float,
                mm_per_px: float) -> np.ndarray:
    """Chord length (cm) through a capsule (segment ``p0``-``p1`` in pixels, radius in pixels)."""
    d = p1 - p0
    L2 = float(d @ d) or 1e-9
    t = np.clip(((rr - p0[0]) * d[0] + (cc - p0[1]) * d[1]) / L2, 0.0, 1.0)
    dist2 = (rr - p0[0] - t * d[0]) ** 2 + (cc - p0[1] - t * d[1]) ** 2
    return 2.0 * np.sqrt(np.maximum(radius_px**2 - dist2, 0.0)) * mm_per_px / 10.0


def _landmarks(geom: HipGeometry, sampler: Any, side: str) -> dict[str, np.ndarray]:
    """Posed, projected femur landmarks of one side (pixels ``(row, col)``) and pixel scale."""
    neck = sampler.scene.femoral_necks[side]
    head = np.asarray(neck["head"], float)
    base = np.asarray(neck["base"], float)
    shaft = np.asarray(neck["shaft_axis"], float)
    gt = np.asarray(neck.get("greater_trochanter", base), float)
    pts = {"head": head, "base": base, "shaft": base + 150.0 * shaft, "gt": gt,
           "lateral": head + (base - head) * (1.0 + 28.0 / max(float(np.linalg.norm(base - head)), 1.0))}
    out = {k: np.array(_project_point(geom, sampler.posed_point(p, side))) for k, p in pts.items()}
    return out


def edit_projections(proj: dict[str, np.ndarray], geom: HipGeometry, sampler: Any, spec: RadiographSpec,
                     rng: np.random.Generator) -> None:
    """Add what the scene lacks to the material line integrals, in place.

    Parameters
    ----------
    proj : dict
        ``{"soft", "fat", "ha", ...}`` line integrals (g/cm^2) on the stored pixel grid.
    geom : HipGeometry
    sampler : training.phantoms.xray.PosedSampler
    spec : RadiographSpec
    rng : numpy.random.Generator
    """
    shape = proj["soft"].shape
    rr, cc = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    mm = geom.pixel_mm / geom.magnification  # mm at the hip plane per pixel
    heads = {s: np.array(_project_point(geom, sampler.posed_point(sampler.heads[s], s))) for s in ("R", "L")}
    mid = 0.5 * (heads["R"] + heads["L"])
    body = np.clip(proj["soft"] / max(float(np.percentile(proj["soft"], 90)), 1e-6), 0.0, 1.0)
    # extra fat: follows the body outline, a pannus edge across the lower abdomen
    if spec.obese_mm > 0:
        fat = spec.obese_mm / 10.0 * 0.92 * body
        if spec.obese_mm > 60:
            edge_row = mid[0] + rng.uniform(-30.0, 30.0) / mm + 8.0 * np.sin(cc / shape[1] * math.pi)
            fat = fat + 0.35 * spec.obese_mm / 10.0 * 0.92 * body * (1.0 / (1.0 + np.exp((rr - edge_row) / (3.0 / mm))))
        proj["fat"] = proj.get("fat", 0.0) + fat
    # bowel gas: pockets above the heads between the iliac wings
    for _ in range(spec.bowel_gas):
        cr = mid[0] - rng.uniform(10.0, 160.0) / mm
        ccol = mid[1] + rng.uniform(-110.0, 110.0) / mm
        a, b = rng.uniform(8.0, 35.0) / mm, rng.uniform(8.0, 35.0) / mm
        depth = rng.uniform(1.0, 5.0)  # cm of air replacing soft tissue
        q = ((rr - cr) / a) ** 2 + ((cc - ccol) / b) ** 2
        proj["soft"] = np.maximum(proj["soft"] - depth * np.sqrt(np.maximum(1.0 - q, 0.0)), 0.0)
    for side in ("R", "L"):
        kind = spec.metal.get(side, "none")
        child = spec.child_scale < 1.0
        if kind == "none" and not child:
            continue
        lm = _landmarks(geom, sampler, side)
        neck = sampler.scene.femoral_necks[side]
        r_head = float(neck.get("head_radius", 22.0)) / mm
        k = float(spec.implant_scale)  # implant radii (1.0: the reference implants)
        if child:
            # open physes: radiolucent bands across the head-neck junction and the trochanter apophysis
            ax = lm["base"] - lm["head"]
            ax = ax / (np.linalg.norm(ax) or 1.0)
            for centre, half in ((lm["head"] + 0.55 * r_head * ax, 1.0 * r_head),
                                 (lm["gt"] + 0.3 * r_head * (lm["shaft"] - lm["gt"]) / (np.linalg.norm(lm["shaft"] - lm["gt"]) or 1.0),
                                  0.6 * r_head)):
                along = (rr - centre[0]) * ax[0] + (cc - centre[1]) * ax[1]
                across = -(rr - centre[0]) * ax[1] + (cc - centre[1]) * ax[0]
                bent = along - 0.15 * across**2 / max(half, 1.0)
                band = (np.abs(bent) < 1.5 / mm) & (np.abs(across) < half)
                proj["ha"] = np.where(band, 0.4 * proj["ha"], proj["ha"])
        if kind == "arthroplasty":
            ball = _capsule_cm(rr, cc, lm["head"], lm["head"], min(0.6 * k, 0.95) * r_head, mm)
            taper = _capsule_cm(rr, cc, lm["head"], lm["base"], 6.0 * k / mm, mm)
            stem = _capsule_cm(rr, cc, lm["base"], lm["base"] + 0.85 * k * (lm["shaft"] - lm["base"]), 7.0 * k / mm, mm)
            outer = _capsule_cm(rr, cc, lm["head"], lm["head"], r_head + 5.0 / mm, mm)
            inner = _capsule_cm(rr, cc, lm["head"], lm["head"], r_head + 2.0 / mm, mm)
            up = lm["head"] - lm["base"]  # cup opens towards the neck
            cup_side = ((rr - lm["head"][0]) * up[0] + (cc - lm["head"][1]) * up[1]) > -0.2 * r_head * np.linalg.norm(up)
            cup = np.where(cup_side, np.maximum(outer - inner, 0.0), 0.0)
            proj["ha"] = proj["ha"] + METAL_HA["cocr"] * ball + METAL_HA["ti"] * (np.maximum(taper, stem) + cup)
        elif kind == "nail":
            lag = _capsule_cm(rr, cc, lm["head"] + 0.3 * (lm["base"] - lm["head"]) * 0.5, lm["lateral"], 5.5 * k / mm, mm)
            down = lm["shaft"] - lm["base"]
            nail = _capsule_cm(rr, cc, lm["base"] - 0.4 * down, lm["base"] + 1.1 * k * down, 6.0 * k / mm, mm)
            proj["ha"] = proj["ha"] + METAL_HA["ti"] * np.maximum(lag, nail)
        elif kind == "screws":
            ax = lm["lateral"] - lm["head"]
            n = np.array([-ax[1], ax[0]]) / (np.linalg.norm(ax) or 1.0)
            tot = np.zeros(shape)
            for off in (-7.0, 0.0, 7.0):
                p0 = lm["head"] + 0.15 * ax + off / mm * n
                tot = np.maximum(tot, _capsule_cm(rr, cc, p0, lm["lateral"] + off / mm * n, 3.5 * k / mm, mm))
            proj["ha"] = proj["ha"] + METAL_HA["steel"] * tot


# ---------------------------------------------------------------------------------------------
# crop, mirror, encode
# ---------------------------------------------------------------------------------------------
def _crop_box(spec: RadiographSpec, heads: dict[str, np.ndarray], necks: dict[str, np.ndarray],
              shape: tuple[int, int], mm: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """``(r0, r1, c0, c1)`` of the collimated field on the rendered grid."""
    mid = 0.5 * (heads["R"] + heads["L"])
    for _ in range(50):
        if spec.collimation == "pelvis":
            w, h = rng.uniform(360.0, 440.0) / mm, rng.uniform(300.0, 380.0) / mm
            cr = mid[0] - rng.uniform(0.0, 60.0) / mm
            ccol = mid[1] + rng.uniform(-20.0, 20.0) / mm
        elif spec.collimation in ("hip_R", "hip_L"):
            s = spec.collimation[-1]
            w, h = rng.uniform(170.0, 280.0) / mm, rng.uniform(220.0, 330.0) / mm
            lateral = np.sign(heads[s][1] - mid[1])
            cr = necks[s][0] + rng.uniform(-10.0, 50.0) / mm
            ccol = necks[s][1] + lateral * rng.uniform(-40.0, 30.0) / mm
        else:  # offcentre
            s = str(rng.choice(["R", "L"]))
            w, h = rng.uniform(220.0, 340.0) / mm, rng.uniform(260.0, 380.0) / mm
            lateral = np.sign(heads[s][1] - mid[1])
            cr = mid[0] - rng.uniform(-20.0, 50.0) / mm
            ccol = heads[s][1] - lateral * rng.uniform(0.15, 0.35) * w
        r0 = int(round(max(0.0, cr - h / 2)))
        c0 = int(round(max(0.0, ccol - w / 2)))
        r1 = int(round(min(shape[0], cr + h / 2)))
        c1 = int(round(min(shape[1], ccol + w / 2)))
        ok = r1 - r0 > 80 / mm and c1 - c0 > 80 / mm
        for s in ("R", "L"):
            state = _presence(heads[s], necks[s], (r0, r1, c0, c1), mm)
            ok = ok and state != "partial"
            if spec.collimation == f"hip_{s}":
                ok = ok and state == "present"
        if ok:
            return r0, r1, c0, c1
    return 0, shape[0], 0, shape[1]


def _presence(head: np.ndarray, neck: np.ndarray, box: tuple[int, int, int, int], mm: float) -> str:
    """``"present"``, ``"absent"`` or ``"partial"`` of a hip in a crop box."""
    r0, r1, c0, c1 = box

    def inside(p: np.ndarray) -> float:  # signed distance inside the box (mm)
        return min(p[0] - r0, r1 - 1 - p[0], p[1] - c0, c1 - 1 - p[1]) * mm

    if inside(head) >= PRESENT_MARGIN_MM and inside(neck) >= PRESENT_MARGIN_MM:
        return "present"
    if inside(head) <= -ABSENT_MARGIN_MM:
        return "absent"
    return "partial"


#: share of ``variety`` views whose stored image keeps white (unexposed) collimator margins
SHUTTER_P = 0.5


def _shutter_spec(spec: RadiographSpec, uid_seed: int) -> RadiographSpec:
    """A ``variety`` view with white collimator margins drawn (:data:`SHUTTER_P` of views; each side
    8-45 mm with probability 0.7).  Drawn from its own generator (seeded by the view), so that the
    acquisition draws of :func:`sample_spec` -- and every other profile -- stay as they were."""
    if spec.profile != "variety" or spec.shutter_mm is not None:
        return spec
    rng = np.random.default_rng([int(uid_seed) % (2**32), 4242])
    if rng.uniform() >= SHUTTER_P:
        return spec
    m = tuple(float(rng.uniform(8.0, 45.0)) if rng.uniform() < 0.7 else 0.0 for _ in range(4))
    if not any(m):
        m = (0.0, 0.0, float(rng.uniform(8.0, 45.0)), 0.0)
    return replace(spec, shutter_mm=m)


def _apply_shutter(stored: np.ndarray, box: tuple[int, int, int, int], spec: RadiographSpec, mm: float,
                   rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int, int, int], np.ndarray]:
    """Keep the collimator margins of ``spec.shutter_mm`` around the field ``box``, rendered as on a CR
    plate whose shutter was not masked by the workstation: unexposed, hence white (above the brightest
    bone), a blurred edge (penumbra 0.7-2 mm), scatter lowering it near the field (10-40 mm, up to 20 %),
    quantum noise; the collimator turned by up to 1.5 deg.

    Returns
    -------
    (numpy.ndarray, tuple, numpy.ndarray)
        The stored image of the enlarged box, that box, and the exposed-field mask (``True`` in the field).
    """
    from scipy import ndimage as ndi

    r0, r1, c0, c1 = box
    top, bottom, left, right = (float(v) / mm for v in spec.shutter_mm or (0.0, 0.0, 0.0, 0.0))
    R0, R1 = int(max(0, round(r0 - top))), int(min(stored.shape[0], round(r1 + bottom)))
    C0, C1 = int(max(0, round(c0 - left))), int(min(stored.shape[1], round(c1 + right)))
    img = stored[R0:R1, C0:C1].astype(np.float64)
    rr, cc = np.mgrid[R0:R1, C0:C1].astype(np.float64)
    cr, ccn = 0.5 * (r0 + r1 - 1), 0.5 * (c0 + c1 - 1)
    th = math.radians(float(rng.uniform(-1.5, 1.5)))
    u = (rr - cr) * math.cos(th) + (cc - ccn) * math.sin(th)
    v = -(rr - cr) * math.sin(th) + (cc - ccn) * math.cos(th)
    # signed distance inside the (turned) field, pixels; only the sides with a margin are shuttered
    d = np.full(img.shape, np.inf)
    half_r, half_c = 0.5 * (r1 - r0), 0.5 * (c1 - c0)
    if top > 0:
        d = np.minimum(d, u + half_r)
    if bottom > 0:
        d = np.minimum(d, half_r - u)
    if left > 0:
        d = np.minimum(d, v + half_c)
    if right > 0:
        d = np.minimum(d, half_c - v)
    field = d >= 0
    if field.all():
        return img, (R0, R1, C0, C1), field
    body = img[field & (img > 200)]
    bright = float(np.percentile(body, 99.9)) if body.size else 3000.0
    level = min(4095.0, max(bright * rng.uniform(1.08, 1.25), 3000.0))
    scatter = rng.uniform(0.05, 0.2) * np.exp(-np.clip(-d, 0.0, None) * mm / rng.uniform(10.0, 40.0))
    white = level * (1.0 - scatter) + rng.normal(0.0, rng.uniform(5.0, 25.0), img.shape)
    soft = ndi.gaussian_filter(field.astype(np.float64), rng.uniform(0.7, 2.0) / mm)
    out = soft * img + (1.0 - soft) * white
    return np.clip(out, 0.0, 4095.0), (R0, R1, C0, C1), field


def _burn(img: np.ndarray, spec: RadiographSpec, side_letter: str, rng: np.random.Generator,
          value: float) -> np.ndarray:
    """Burn a lead side marker and text lines into ``img`` (float, stored units)."""
    from PIL import Image, ImageDraw, ImageFont

    h, w = img.shape
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    if spec.markers:
        size = max(8, int(round(min(h, w) * rng.uniform(0.05, 0.09))))
        font = ImageFont.load_default(size=size)
        # the marker sits on the patient's side it names (image left for R in the standard view)
        # variety: lead markers anywhere from the corner to beside the hip, over soft tissue or bone
        x = int(rng.uniform(0.03, 0.12 if spec.profile != "variety" else 0.35) * w)
        if (side_letter == "L") != spec.mirror:
            x = w - x - size
        y = int(rng.uniform(0.03, 0.2 if spec.profile != "variety" else 0.6) * h)
        draw.rectangle([x - 2, y - 2, x + size, y + size + 2], outline=180, width=max(1, size // 10))
        draw.text((x + size // 6, y), side_letter, fill=255, font=font)
    if spec.text:
        size = max(7, int(round(min(h, w) * rng.uniform(0.025, 0.045))))
        font = ImageFont.load_default(size=size)
        lines = ["AP" if rng.uniform() < 0.5 else "STANDING", f"{int(rng.integers(60, 95))} kV",
                 f"2026-{int(rng.integers(1, 12)):02d}-{int(rng.integers(1, 28)):02d}"]
        y0 = h - (len(lines) + 1) * size if rng.uniform() < 0.5 else size
        x0 = int(rng.uniform(0.55, 0.75) * w) if rng.uniform() < 0.5 else int(0.03 * w)
        for i, line in enumerate(lines):
            draw.text((x0, y0 + i * size), line, fill=230, font=font)
    ink = np.asarray(canvas, dtype=np.float64) / 255.0
    return np.where(ink > 0, np.maximum(img, ink * value), img)


def _view_spec(spec: RadiographSpec, rng: np.random.Generator) -> RadiographSpec:
    """Another view of the same render: collimation, mirroring, header and encoding redrawn."""
    other = sample_spec(spec.profile, rng)
    return replace(spec, collimation=other.collimation, mirror=other.mirror,
                   orientation_header=other.orientation_header, laterality_header=other.laterality_header,
                   monochrome1=other.monochrome1, bits=other.bits if spec.profile != "standard" else spec.bits,
                   markers=other.markers, text=other.text,
                   jpeg_quality=other.jpeg_quality if spec.profile != "standard" else None)


def render_cases(seed: int, index: int, profile: str, *, views: int = 1, pixel_mm: float = 1.0,
                 ray_mm: float = 4.0, dy_mm: float = 4.0, spec: RadiographSpec | None = None,
                 with_bmd: bool = False) -> list[RadiographCase]:
    """Render one patient's radiograph once and cut ``views`` acquisitions from it, with truth.

    Parameters
    ----------
    seed, index : int
        Cohort seed and patient index (:func:`training.phantoms.population.make_patient`); the
        acquisition is drawn from ``(seed, index, profile)``.
    profile : str
        ``"standard"`` or ``"variety"`` (module docstring).
    views : int
        Acquisitions cut from the one render (the first uses ``spec``; the others redraw
        collimation, mirroring, header and encoding, :func:`_view_spec`).
    pixel_mm : float
        Detector pitch of the rendered field (before a child's scaling).
    ray_mm, dy_mm : float
        Projector sampling (:func:`training.phantoms.xray.render_hip_xray`).
    spec : RadiographSpec, optional
        Use this acquisition instead of drawing one (tests).
    with_bmd : bool
        Also compute the DXA-style femoral-neck aBMD of both sides (``extras["bmd"]``).

    Returns
    -------
    list of RadiographCase
    """
    from training.phantoms.anatomy import build_scene
    from training.phantoms.population import make_patient

    if profile not in PROFILES:
        raise ValueError(f"unknown radiograph profile {profile!r}; choose one of {PROFILES}")
    rng = np.random.default_rng([int(seed), int(index), 15, PROFILES.index(profile)])
    if spec is None:
        spec = sample_spec(profile, rng)
    patient = make_patient(seed, index)
    scene = build_scene(patient)
    bmd: dict[str, float] = {}
    if with_bmd:
        from training.phantoms.dxa import hip_truth
        from training.phantoms.labels import _BoneOnlyScene

        bone_only = _BoneOnlyScene(scene)
        bmd = {s: float(hip_truth(bone_only, s)["femoral_neck"]) for s in ("R", "L")}
    edit_rng = np.random.default_rng(rng.integers(2**32))

    def hook(proj: dict[str, np.ndarray], geom: HipGeometry, sampler: Any) -> None:
        edit_projections(proj, geom, sampler, spec, edit_rng)

    ds0, truth = render_hip_xray(scene, seed * 100003 + index, spec.pose, kvp=spec.kvp, pixel_mm=pixel_mm,
                                 ray_mm=ray_mm, dy_mm=dy_mm, field_mm=FIELD_MM, aim_offset_mm=AIM_MM,
                                 quanta_per_pixel=spec.quanta_per_pixel,
                                 processing_strength=spec.processing_strength, projection_hook=hook)
    stored = ds0.pixel_array.astype(np.float64)
    out = []
    for v in range(max(1, int(views))):
        sp = spec if v == 0 else _view_spec(spec, rng)
        case = _cut_view(stored, truth, sp, patient, seed * 100003 + index + 7919 * v, pixel_mm, rng)
        case.extras["bmd"] = bmd
        out.append(case)
    return out


def render_case(seed: int, index: int, profile: str, *, pixel_mm: float = 1.0, ray_mm: float = 4.0,
                dy_mm: float = 4.0, spec: RadiographSpec | None = None) -> RadiographCase:
    """One acquisition of :func:`render_cases` (see there)."""
    return render_cases(seed, index, profile, pixel_mm=pixel_mm, ray_mm=ray_mm, dy_mm=dy_mm, spec=spec)[0]


def _header_variety(ds: Any, spec: RadiographSpec, present: list[str], rng: np.random.Generator) -> None:
    """The header as this acquisition's device writes it: photometric interpretation, orientation and
    laterality (or their absence), body part, burned-in annotation, lossy compression, a child's age
    (``rng``'s next draw)."""
    if spec.monochrome1:
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.PresentationLUTShape = "INVERSE"
    if spec.mirror:
        ds.PatientOrientation = ["R", "F"]
    elif not spec.orientation_header:
        del ds.PatientOrientation
    if spec.laterality_header and len(present) == 1:
        ds.ImageLaterality = present[0]
    elif spec.laterality_header and len(present) == 2:
        ds.ImageLaterality = "B"
    else:
        del ds.ImageLaterality
    if spec.collimation != "pelvis":
        ds.BodyPartExamined = "HIP"
        ds.SeriesDescription = f"Hip AP ({spec.pose.name})"
    if spec.markers or spec.text:
        ds.BurnedInAnnotation = "YES"
    if spec.jpeg_quality is not None:
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionRatio = "10"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
    if spec.child_scale < 1.0:
        age = int(rng.integers(6, 15))
        ds.PatientAge = f"{age:03d}Y"
        ds.PatientBirthDate = f"{int(str(ds.StudyDate)[:4]) - age}0601"


def _cut_view(stored: np.ndarray, truth: dict[str, Any], spec: RadiographSpec, patient: Any, uid_seed: int,
              pixel_mm: float, rng: np.random.Generator) -> RadiographCase:
    """Collimate, mirror, annotate and encode one acquisition of a rendered field."""
    mm = float(truth["pixel_spacing_mm"])
    heads = {s: np.array(truth["femoral_heads_px"][s]) for s in ("R", "L")}
    necks = {s: np.array(truth["femoral_necks_px"][s]) for s in ("R", "L")}
    box = _crop_box(spec, heads, necks, stored.shape, mm, rng)
    spec = _shutter_spec(spec, uid_seed)
    field_box = box
    field_mask = None
    if spec.shutter_mm is not None:
        img, box, field_mask = _apply_shutter(stored, box, spec, mm, np.random.default_rng([int(uid_seed) % (2**32), 4243]))
    r0, r1, c0, c1 = box
    if field_mask is None:
        img = stored[r0:r1, c0:c1]
    hips: dict[str, HipTruth] = {}
    for s in ("R", "L"):
        state = _presence(heads[s], necks[s], field_box, mm)
        h = heads[s] - (r0, c0)
        n = necks[s] - (r0, c0)
        if spec.mirror:
            h[1] = img.shape[1] - 1 - h[1]
            n[1] = img.shape[1] - 1 - n[1]
        hips[s] = HipTruth(side=s, present=state == "present", head_px=(float(h[0]), float(h[1])),
                           neck_px=(float(n[0]), float(n[1])), head_radius_px=float(truth["head_radius_px"][s]),
                           metal=spec.metal.get(s, "none"))
    if spec.mirror:
        img = img[:, ::-1]
        field_mask = field_mask[:, ::-1] if field_mask is not None else None
    present = [s for s in ("R", "L") if hips[s].present]
    side_letter = present[0] if len(present) == 1 else str(rng.choice(["R", "L"]))
    if spec.markers or spec.text:
        img = _burn(img, spec, side_letter, rng, float(np.percentile(img, 99.5)))
    if spec.jpeg_quality is not None:
        from screener.radiograph import jpeg_recompress

        img = np.clip(jpeg_recompress(img / 4095.0, int(spec.jpeg_quality), value_range=(0.0, 1.0)), 0.0, 1.0) * 4095.0
    # window of the cropped field, then re-encode at the stored bit depth
    # the device's window is set on the exposed field (a white shutter margin lies above it)
    body = img[(img > 200) & (field_mask if field_mask is not None else True)]
    lo, hi = (np.percentile(body, [3.0, 99.8]) if body.size else (0.0, 4095.0))
    scale = (2 ** spec.bits - 1) / 4095.0
    out = np.clip(np.round(img * scale), 0, 2 ** spec.bits - 1)
    window = (0.5 * (lo + hi) * scale, max(hi - lo, 1.0) * scale)
    if spec.monochrome1:
        out = (2 ** spec.bits - 1) - out
        window = ((2 ** spec.bits - 1) - window[0], window[1])
    dtype = np.uint8 if spec.bits <= 8 else np.uint16
    ds = pdcm.dx_dataset(
        patient, uid_seed, out.astype(dtype), imager_pixel_spacing_mm=pixel_mm * spec.child_scale,
        magnification=float(truth["magnification"]), sid_mm=spec.pose.sid_mm,
        sod_mm=spec.pose.sid_mm / float(truth["magnification"]), kvp=spec.kvp, pose=spec.pose.name,
        window=window, upright=spec.pose.upright, bits_stored=spec.bits,
        extra={"AcquisitionDeviceProcessingDescription": "-ln(I/I0), unsharp mask 25 mm"})
    _header_variety(ds, spec, present, rng)
    spacing = mm * spec.child_scale
    log_info = {"box": box, "field_box": field_box, "rendered_shape": stored.shape}
    return RadiographCase(dataset=ds, spec=spec, hips=hips, pixel_spacing_mm=spacing, patient_id=patient.patient_id,
                          extras=log_info)




def spec_summary(spec: RadiographSpec) -> dict[str, Any]:
    """A flat, JSON-able description of an acquisition (for tables and sheets)."""
    p = spec.pose
    return {"profile": spec.profile, "pose": p.name, "collimation": spec.collimation, "mirror": spec.mirror,
            "orientation_header": spec.orientation_header or spec.mirror, "monochrome1": spec.monochrome1,
            "bits": spec.bits, "metal_R": spec.metal.get("R"), "metal_L": spec.metal.get("L"),
            "child": spec.child_scale < 1.0, "obese_mm": round(spec.obese_mm), "bowel_gas": spec.bowel_gas,
            "jpeg": spec.jpeg_quality, "rotation_deg": [round(v) for v in p.internal_rotation_deg],
            "abduction_deg": [round(v) for v in p.abduction_deg]}


__all__ += ["spec_summary"]


# ---------------------------------------------------------------------------------------------
# cohort vs real radiographs (docs/virtual-cohort.md)
# ---------------------------------------------------------------------------------------------
#: detector pitch assumed for a real CR whose header states none (typical CR plates: 0.1-0.2 mm)
ASSUMED_CR_PITCH_MM = 0.2


def image_statistics(ds: Any, pitch_mm: float | None = None, grid_mm: float = 1.0) -> dict[str, float]:
    """Intensity, noise and edge statistics of a radiograph as displayed (its own VOI, bone bright).

    The image goes through the Modality and VOI LUTs to ``[0, 1]`` (``MONOCHROME1`` inverted,
    :mod:`screener.radiograph`), is resampled to ``grid_mm`` pixels (``pitch_mm``: the stored pitch,
    else the header's spacing) and measured inside the exposed field (pixels above the 2nd
    percentile + 0.02, background out; ``shutter``: share of the image in white, unexposed collimator
    regions touching the border, also left out):

    * ``p5`` ... ``p95``: intensity percentiles, ``clip_hi``: share at the top of the window;
    * ``noise``: 1.4826 x the median absolute high-pass residual (image minus its 1-pixel Gaussian)
      in the flattest quarter of 16 x 16 tiles, in display units;
    * ``edge_mm``: 10-90 % edge width at the strongest 1 % of edges, from local contrast over peak
      gradient (a Gaussian-blurred step of contrast ``A`` has peak gradient ``A / (sigma sqrt(2 pi))``
      and 10-90 % width ``2.56 sigma``);
    * ``unique``: distinct stored values (bit depth in use).
    """
    from scipy import ndimage as ndi

    from screener.radiograph import _display_values, pixel_spacing_mm, presentation_inverted, stored_values

    vals, _ = _display_values(ds, "dataset")
    img = np.clip(np.asarray(vals, dtype=np.float64), 0.0, 1.0)
    if presentation_inverted(ds):
        img = 1.0 - img
    if pitch_mm is None:
        pitch_mm = float(pixel_spacing_mm(ds)[0][0])
    f = pitch_mm / grid_mm
    if abs(f - 1.0) > 1e-3:
        img = ndi.zoom(ndi.gaussian_filter(img, 0.4 / f) if f < 1 else img, f, order=1, grid_mode=True, mode="nearest")
    # collimator shutters: white (unexposed) regions at the window top that touch the border
    lab, _ = ndi.label(img >= 0.995)
    edge_labels = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    shutter = np.isin(lab, edge_labels[edge_labels > 0])
    field = (img > np.percentile(img, 2.0) + 0.02) & ~ndi.binary_dilation(shutter, iterations=3)
    field = ndi.binary_erosion(field, iterations=3)
    v = img[field]
    hp = img - ndi.gaussian_filter(img, 1.0)
    grad = np.hypot(ndi.sobel(ndi.gaussian_filter(img, 0.7), 0), ndi.sobel(ndi.gaussian_filter(img, 0.7), 1)) / 8.0
    t = 16
    tiles = []
    for r in range(0, img.shape[0] - t + 1, t):
        for c in range(0, img.shape[1] - t + 1, t):
            if field[r : r + t, c : c + t].all():
                tiles.append((float(np.median(grad[r : r + t, c : c + t])), hp[r : r + t, c : c + t].ravel()))
    tiles.sort(key=lambda x: x[0])
    flat = np.concatenate([h for _, h in tiles[: max(1, len(tiles) // 4)]]) if tiles else hp[field]
    noise = 1.4826 * float(np.median(np.abs(flat - np.median(flat))))
    g = grad.copy()
    g[~field] = 0.0
    strong = g >= np.percentile(g[field], 99.0)
    contrast = ndi.maximum_filter(img, 7) - ndi.minimum_filter(img, 7)
    width_px = 1.02 * contrast[strong] / np.maximum(g[strong], 1e-6)
    pct = np.percentile(v, [5, 25, 50, 75, 95])
    return {"pitch_mm": float(pitch_mm), "p5": pct[0], "p25": pct[1], "p50": pct[2], "p75": pct[3], "p95": pct[4],
            "clip_hi": float(np.mean(v >= 0.995)), "shutter": float(shutter.mean()), "noise": noise, "edge_mm": float(np.median(width_px)) * grid_mm,
            "unique": float(np.unique(stored_values(ds)).size)}


def compare_real(real_dir: str, n: int = 8, seed: int = 1520) -> str:
    """Markdown table: :func:`image_statistics` of cohort radiographs (standard and variety, ``n``
    patients each, seed ``seed``: patients no model was trained on) beside the real CRs in ``real_dir``
    (pitch :data:`ASSUMED_CR_PITCH_MM` where the header has none)."""
    from pathlib import Path

    import pydicom

    rows: list[tuple[str, dict[str, float]]] = []
    for profile in ("standard", "variety"):
        stats = [image_statistics(render_cases(seed, i, profile, pixel_mm=1.0, ray_mm=4.0, dy_mm=4.0)[0].dataset)
                 for i in range(n)]
        rows.append((f"cohort {profile} (median of {n})", {k: float(np.median([s[k] for s in stats])) for k in stats[0]}))
    for f in sorted(Path(real_dir).glob("*.dcm")):
        ds = pydicom.dcmread(f)
        if str(ds.get("Modality", "")) not in ("CR", "DX"):
            continue
        try:
            pitch = None if float(ds.PixelSpacing[0]) > 0 else ASSUMED_CR_PITCH_MM
        except (AttributeError, IndexError, TypeError, ValueError):
            pitch = ASSUMED_CR_PITCH_MM
        rows.append((f"real {f.name}" + (" (pitch assumed)" if pitch else ""), image_statistics(ds, pitch)))
    keys = ["p5", "p25", "p50", "p75", "p95", "clip_hi", "shutter", "noise", "edge_mm", "unique"]
    out = ["| image | pixel (mm) | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for name, st in rows:
        out.append(f"| {name} | {st['pitch_mm']:.2f} | " + " | ".join(
            f"{st[k]:.0f}" if k == "unique" else f"{st[k]:.4f}" if k == "noise" else f"{st[k]:.3f}" for k in keys) + " |")
    return "\n".join(out)


__all__ += ["ASSUMED_CR_PITCH_MM", "compare_real", "image_statistics"]


if __name__ == "__main__":
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m training.phantoms.xray_variety",
                                 description="cohort vs real radiograph statistics (docs/virtual-cohort.md)")
    ap.add_argument("cmd", choices=["compare-real"])
    ap.add_argument("--real", default=str(__import__("pathlib").Path(__file__).resolve().parents[3] / "shared" / "data" / "real-public"))
    ap.add_argument("--n", type=int, default=8)
    args = ap.parse_args()
    print(compare_real(args.real, args.n))
    sys.exit(0)
