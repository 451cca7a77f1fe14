"""Projection radiography through the phantom scene: the AP pelvis (hip) radiograph.

Physics
-------
Every point of a :class:`~training.phantoms.anatomy.Scene` is a mixture of basis materials given as
partial densities rho_m (g/cm^3, :data:`training.phantoms.physics.BASIS`).  A ray from the source to
a detector pixel is sampled at planes of constant ``y`` (the AP axis) and the **material line
integrals** ``P_m = integral rho_m dl`` (g/cm^2) are accumulated once.  Any spectrum then costs only
a weighted sum of exponentials (Beer--Lambert)::

    I/I0 = sum_k w_k exp(-sum_m (mu/rho)_m(E_k) P_m)

with ``w_k`` the energy-integrating detector weights of a few-bin tungsten spectrum (Kramers' law,
3 mm Al filtration), or a single energy (``spectrum="mono"``).  Scatter is a low-pass (Gaussian,
sigma 40 mm) fraction of the primary (scatter-to-primary ratio 0.35, anti-scatter grid), quantum noise
is Poisson (Gaussian approximation) at an automatic-exposure-controlled count, then the detector takes
``-ln(I/I0)`` (flat-field corrected); presentation processing (unsharp masking, 25 mm kernel) follows
and the image is stored as 12-bit ``MONOCHROME2`` (bone bright, 500 stored units per unit of
``-ln(I/I0)`` without processing).

Geometry
--------
Cone beam.  The source is anterior (``-y``, the patient faces the tube, supine on the table or
standing against the detector), the detector plane is posterior to the body (``+y``) at
``DistanceSourceToDetector`` (SID).  Columns run towards the patient's left (``+x``), rows towards
the feet, so the image is seen as when facing the patient.  The magnification at the femoral-head
plane gives ``PixelSpacing = ImagerPixelSpacing / magnification``.

Pose
----
Seed 004 (Gu et al. 2023) images the same patients standing, supine, in abduction and in adduction.
A :class:`Pose` tilts the whole scene about the inter-femoral-head axis (pelvic tilt) and rotates
each femur about its head centre (internal rotation about the vertical axis, then abduction in the
coronal plane).  A rotated femur is sampled at the inverse-rotated point; the volume it vacates is
filled with muscle.  Soft tissue does not follow the femur (a limit of the phantom).

Ground truth
------------
On the same pixel grid as the radiograph, the bone-only DRRs of seed 004's hierarchical training, in
g/cm^2 of hydroxyapatite along each ray: the proximal-femur region (PF-DRR, per side: femur above a
cut ``pf_length_mm`` below the head centre, i.e. below the lesser trochanter) and pelvis + both femurs.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Mapping

import numpy as np
import structlog
from scipy import ndimage

from training.phantoms import physics
from training.phantoms import projection_dicom as pdcm

log = structlog.get_logger(__name__)

Sampler = Callable[[np.ndarray, np.ndarray, np.ndarray], dict[str, np.ndarray]]

#: muscle that fills the space a rotated femur leaves (g/cm3 of the "soft" basis)
_FILL = {"soft": 1.05}
#: al filtration mass attenuation (cm2/g, NIST) for the tube spectrum model
_AL_E = np.array([20.0, 30.0, 40.0, 50.0, 60.0, 80.0, 100.0, 150.0])
_AL_MU = np.array([3.441, 1.128, 0.5685, 0.3681, 0.2778, 0.2018, 0.1704, 0.1378])


# ---------------------------------------------------------------------------------------------
# generic projector
# ---------------------------------------------------------------------------------------------
def plane_points(origin: np.ndarray, a: np.ndarray, b: np.ndarray, shape: tuple[int, int],
                 spacing: tuple[float, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Patient coordinates of a plane grid: pixel ``[j, i]`` at ``origin + i dc a + j dr b``.

    ``spacing = (dr, dc)`` (row, column) as DICOM PixelSpacing; the convention of
    ``Scene.label_plane``.
    """
    ii = np.arange(shape[1], dtype=float)[None, :] * spacing[1]
    jj = np.arange(shape[0], dtype=float)[:, None] * spacing[0]
    o, a, b = (np.asarray(t, float) for t in (origin, a, b))
    return tuple(np.broadcast_to(o[k] + a[k] * ii + b[k] * jj, tuple(shape)).copy() for k in range(3))


def _plane_sampler(sampler: Any) -> Callable[..., dict[str, np.ndarray]]:
    """``sampler.plane`` when it has one, else evaluate the sampler at the plane's points."""
    if hasattr(sampler, "plane"):
        return sampler.plane

    def plane(origin: np.ndarray, a: np.ndarray, b: np.ndarray, shape: tuple[int, int],
              spacing: tuple[float, float]) -> dict[str, np.ndarray]:
        return sampler(*plane_points(origin, a, b, shape, spacing))

    return plane


def project(sampler: Any, u: np.ndarray, v: np.ndarray, y_range: tuple[float, float],
            dy_mm: float, *, source: tuple[float, float, float] | None = None,
            y_detector: float | None = None) -> dict[str, np.ndarray]:
    """Line integrals of every quantity a sampler returns, over a detector grid.

    Rays are sampled by the midpoint rule at the planes ``y = y0 + (k + 1/2) dy`` between
    ``y_range[0]`` and ``y_range[1]`` (``dy`` adjusted to a whole number of planes).  In a cone
    beam the sample points of one plane form a regular grid scaled by the plane's distance to the
    source, so every plane is one call of the sampler's ``plane`` method (the scene's fast path).

    Parameters
    ----------
    sampler : object
        Either has ``plane(origin, a, b, shape, spacing) -> dict name -> 2-D array`` (see
        :func:`plane_points`) or is a callable ``sampler(x, y, z) -> dict name -> array``
        (values per unit length, e.g. g/cm^3).
    u, v : numpy.ndarray
        Uniformly spaced detector coordinates (mm) of the columns (patient x, ascending) and rows
        (patient z, ascending or descending).
    y_range : tuple of float
        First and last ``y`` (mm) integrated; outside it the sampler is taken as 0.
    dy_mm : float
        Step along ``y`` (mm).
    source : tuple of float, optional
        Source position (x, y, z) mm for a cone beam; ``None`` for parallel rays along ``+y``.
    y_detector : float, optional
        ``y`` of the detector plane (cone beam only).

    Returns
    -------
    dict of str to numpy.ndarray
        ``(len(v), len(u))`` line integrals, in (sampler unit) x cm.
    """
    u = np.asarray(u, float)
    v = np.asarray(v, float)
    du = float(u[1] - u[0]) if len(u) > 1 else 1.0
    dv = float(v[1] - v[0]) if len(v) > 1 else -1.0
    if du <= 0:
        raise ValueError("detector columns must run towards +x")
    b_dir = np.array([0.0, 0.0, 1.0 if dv > 0 else -1.0])
    a_dir = np.array([1.0, 0.0, 0.0])
    shape = (len(v), len(u))
    plane = _plane_sampler(sampler)
    n_planes = max(1, int(round((y_range[1] - y_range[0]) / dy_mm)))
    step = (y_range[1] - y_range[0]) / n_planes
    ys = y_range[0] + (np.arange(n_planes) + 0.5) * step
    if source is None:
        dl = np.full(shape, step / 10.0)
    else:
        if y_detector is None:
            raise ValueError("a cone-beam projection needs y_detector")
        xs, ysrc, zs = source
        sid = y_detector - ysrc
        uu, vv = np.meshgrid(u, v)
        dl = (step / 10.0) * np.sqrt((uu - xs) ** 2 + sid**2 + (vv - zs) ** 2) / sid
    out: dict[str, np.ndarray] = {}
    for yk in ys:
        if source is None:
            origin = np.array([u[0], yk, v[0]])
            spacing = (abs(dv), du)
        else:
            t = (yk - ysrc) / sid
            origin = np.array([xs + t * (u[0] - xs), yk, zs + t * (v[0] - zs)])
            spacing = (abs(dv) * t, du * t)
        vals = plane(origin, a_dir, b_dir, shape, spacing)
        for name, arr in vals.items():
            acc = out.get(name)
            if acc is None:
                out[name] = np.array(arr, dtype=np.float64)
            else:
                acc += arr
    return {name: acc * dl for name, acc in out.items()}


def attenuation(projections: Mapping[str, np.ndarray], kev: float) -> np.ndarray:
    """Total attenuation ``sum_m (mu/rho)_m(E) P_m`` (dimensionless) at one energy."""
    total = 0.0
    for name in physics.BASIS:
        if name in projections:
            total = total + float(physics.mass_attenuation(name, kev)) * projections[name]
    return np.asarray(total, dtype=np.float64)


def xray_spectrum(kvp: float, al_mm: float = 3.0, n_bins: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """A few-bin tungsten spectrum for an energy-integrating detector.

    Kramers' law ``N(E) ~ (kVp - E) / E`` filtered by ``al_mm`` of aluminium; each bin is weighted
    by its deposited energy ``E N(E)``.

    Parameters
    ----------
    kvp : float
        Tube voltage (40-150).
    al_mm : float
        Total filtration (mm Al).
    n_bins : int
        Energy bins between 20 keV and kVp.

    Returns
    -------
    energies, weights : numpy.ndarray
        Bin centres (keV) and weights summing to 1.
    """
    if not 40.0 <= kvp <= 150.0:
        raise ValueError(f"kVp {kvp} outside 40-150")
    edges = np.linspace(20.0, kvp, n_bins + 1)
    e = 0.5 * (edges[1:] + edges[:-1])
    mu_al = np.exp(np.interp(np.log(e), np.log(_AL_E), np.log(_AL_MU))) * 2.699
    w = (kvp - e) * np.exp(-mu_al * al_mm / 10.0)  # E * N(E) with N ~ (kVp-E)/E
    return e, w / w.sum()


def transmission(projections: Mapping[str, np.ndarray], energies: np.ndarray,
                 weights: np.ndarray) -> np.ndarray:
    """Detected intensity ``I/I0`` for a spectrum (Beer--Lambert per energy bin)."""
    out = 0.0
    for e, w in zip(np.atleast_1d(energies), np.atleast_1d(weights)):
        out = out + float(w) * np.exp(-attenuation(projections, float(e)))
    return np.asarray(out, dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# pose
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pose:
    """Patient pose for an AP pelvis radiograph (seed 004's four poses).

    Attributes
    ----------
    name : str
        ``"supine"``, ``"standing"``, ``"abduction"`` or ``"adduction"``.
    pelvic_tilt_deg : float
        Rotation of the whole body about the left-right axis through the femoral heads;
        positive = anterior tilt (iliac crests forward).
    abduction_deg : tuple of float
        ``(right, left)`` hip abduction (+) / adduction (-) in the coronal plane.
    internal_rotation_deg : tuple of float
        ``(right, left)`` internal (+) / external (-) rotation about the vertical axis through the
        head centre.
    upright : bool
        Standing (detector against the back) or supine (detector in the table bucky).
    sid_mm : float
        Source-to-detector distance.
    """

    name: str
    pelvic_tilt_deg: float = 0.0
    abduction_deg: tuple[float, float] = (0.0, 0.0)
    internal_rotation_deg: tuple[float, float] = (0.0, 0.0)
    upright: bool = False
    sid_mm: float = 1000.0


#: nominal poses; :func:`sample_pose` adds per-image jitter
POSES: dict[str, Pose] = {
    # supine AP pelvis technique: feet internally rotated 15 deg so the necks lie in the image plane
    "supine": Pose("supine", 0.0, (0.0, 0.0), (15.0, 15.0), False, 1000.0),
    "standing": Pose("standing", 4.0, (3.0, 3.0), (0.0, 0.0), True, 1150.0),
    "abduction": Pose("abduction", 0.0, (20.0, 20.0), (0.0, 0.0), False, 1000.0),
    "adduction": Pose("adduction", 0.0, (-8.0, -8.0), (5.0, 5.0), False, 1000.0),
    "neutral": Pose("neutral", 0.0, (0.0, 0.0), (0.0, 0.0), False, 1000.0),
}


def sample_pose(name: str, rng: np.random.Generator | None = None) -> Pose:
    """Return the nominal pose ``name`` with per-image jitter (none when ``rng`` is None).

    Jitter: pelvic tilt +-3 deg, abduction +-3 deg and rotation +-5 deg per hip (uniform).
    """
    if name not in POSES:
        raise ValueError(f"unknown pose {name!r}; choose one of {sorted(POSES)}")
    p = POSES[name]
    if rng is None or name == "neutral":
        return p
    j = rng.uniform(-1.0, 1.0, size=5)
    return replace(p, pelvic_tilt_deg=p.pelvic_tilt_deg + 3.0 * j[0],
                   abduction_deg=(p.abduction_deg[0] + 3.0 * j[1], p.abduction_deg[1] + 3.0 * j[2]),
                   internal_rotation_deg=(p.internal_rotation_deg[0] + 5.0 * j[3],
                                          p.internal_rotation_deg[1] + 5.0 * j[4]))


def _rot_x(deg: float) -> np.ndarray:
    a = math.radians(deg)
    c, s = math.cos(a), math.sin(a)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def _rot_y(deg: float) -> np.ndarray:
    a = math.radians(deg)
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _rot_z(deg: float) -> np.ndarray:
    a = math.radians(deg)
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def femur_rotation(side: str, abduction_deg: float, internal_rotation_deg: float) -> np.ndarray:
    """Rotation matrix (posed = R @ neutral, about the head centre) of one femur.

    Internal rotation turns the anterior femur medially (about +z for the right femur, -z for the
    left); abduction then swings the shaft laterally in the coronal plane (about the AP axis).
    """
    sign = 1.0 if side == "R" else -1.0
    r_int = _rot_z(sign * internal_rotation_deg)
    # abduction: distal point (0,0,-1) moves laterally (-x on the right, +x on the left)
    r_abd = _rot_y(sign * abduction_deg)
    return r_abd @ r_int


def _has_structure(scene: Any, name: str) -> bool:
    try:
        scene.structure_mask(name, np.zeros(1), np.zeros(1), np.zeros(1))
        return True
    except (KeyError, ValueError, NotImplementedError):
        return False


class PosedSampler:
    """Sample a scene in a pose: partial densities plus bone-only ground-truth integrands.

    Parameters
    ----------
    scene : Scene
        The neutral (supine, as built) scene.
    pose : Pose
        Pelvic tilt and femur rotations.
    pf_length_mm : float
        The proximal-femur region is the femur above ``head_z - pf_length_mm`` (in the femur's own
        frame): head, neck, trochanters and the shaft to just below the lesser trochanter.
    truth : bool
        Also return ``pf_R``, ``pf_L`` and ``bone`` (hydroxyapatite g/cm^3 inside the proximal-femur
        regions and inside pelvis + both femurs).
    materials : bool
        Return the partial densities (False when only the truth is wanted).
    bone : bool
        With ``truth``, also the pelvis + femurs integrand ``bone``.
    """

    def __init__(self, scene: Any, pose: Pose, *, pf_length_mm: float = 70.0, truth: bool = True,
                 materials: bool = True, bone: bool = True) -> None:
        self.scene = scene
        self.want_bone = bone
        self.pose = pose
        self.truth = truth
        self.materials = materials
        heads = {s: np.asarray(scene.femoral_heads[s], float) for s in ("R", "L")}
        self.heads = heads
        self.centre = 0.5 * (heads["R"] + heads["L"])
        self.tilt = _rot_x(pose.pelvic_tilt_deg)
        self.rot = {
            "R": femur_rotation("R", pose.abduction_deg[0], pose.internal_rotation_deg[0]),
            "L": femur_rotation("L", pose.abduction_deg[1], pose.internal_rotation_deg[1]),
        }
        self.pf_length_mm = pf_length_mm
        self.has_pelvis = _has_structure(scene, "pelvis")

    def untilt(self, p: np.ndarray) -> np.ndarray:
        """Posed -> scene coordinates for everything that moves with the pelvis (``(3, n)``)."""
        c = self.centre[:, None]
        return c + self.tilt.T @ (p - c)

    def posed_point(self, q: np.ndarray, side: str | None = None) -> np.ndarray:
        """Scene point (3,) -> posed point; femur points rotate about their head first."""
        q = np.asarray(q, float)
        if side is not None:
            h = self.heads[side]
            q = h + self.rot[side] @ (q - h)
        return self.centre + self.tilt @ (q - self.centre)

    # ---------------------------------------------------------------- fast path (label planes)
    def _fast(self) -> bool:
        return all(hasattr(self.scene, n) for n in ("label_plane", "densities_from_labels", "structure_ids"))

    def _ids(self, name: str) -> np.ndarray:
        cache = self.__dict__.setdefault("_id_cache", {})
        if name not in cache:
            try:
                cache[name] = np.asarray(self.scene.structure_ids(name))
            except (KeyError, ValueError):
                cache[name] = np.zeros(0, dtype=np.int64)
        return cache[name]

    def _fill_label(self) -> int:
        names = list(getattr(getattr(self.scene, "tissues", None), "names", []))
        return names.index("muscle") if "muscle" in names else 0

    def _femur_window(self, side: str, p0: np.ndarray, a0: np.ndarray, b0: np.ndarray, shape: tuple[int, int],
                      spacing: tuple[float, float]) -> tuple[np.ndarray, ...]:
        """Labels, femur mask and scene points of a posed-plane window whose first pixel is the
        untilted point ``p0`` (directions ``a0``, ``b0``), with ``side``'s femur rotated into its pose.

        Painting from the femur's first primitive on gives its pixels exactly (a pixel's label is
        the last primitive holding it); other pixels may read 0.
        """
        h, rot = self.heads[side], self.rot[side]
        o_r = h + rot.T @ (p0 - h)
        a_r, b_r = rot.T @ a0, rot.T @ b0
        lab_r = self.scene.label_plane(o_r, a_r, b_r, shape, spacing, from_structure=f"femur_{side}")
        xr, yr, zr = plane_points(o_r, a_r, b_r, shape, spacing)
        return lab_r, np.isin(lab_r, self._ids(f"femur_{side}")), xr, yr, zr

    def plane(self, origin: np.ndarray, a: np.ndarray, b: np.ndarray, shape: tuple[int, int],
              spacing: tuple[float, float]) -> dict[str, np.ndarray]:
        """Sample a posed plane grid (see :func:`plane_points`); uses ``Scene.label_plane``."""
        if not self._fast():
            return self(*plane_points(origin, a, b, shape, spacing))
        scene = self.scene
        c = self.centre
        o0 = c + self.tilt.T @ (np.asarray(origin, float) - c)
        a0 = self.tilt.T @ np.asarray(a, float)
        b0 = self.tilt.T @ np.asarray(b, float)
        femur_only = not self.materials and not (self.truth and self.want_bone)
        X, Y, Z = plane_points(o0, a0, b0, shape, spacing)
        lab = None if femur_only else scene.label_plane(o0, a0, b0, shape, spacing)
        pf_ha = {"R": np.zeros(shape), "L": np.zeros(shape)}
        femur_any = np.zeros(shape, bool)
        pf_masks = {}
        for side in ("R", "L"):
            h = self.heads[side]
            box = ((np.abs(X - h[0]) < 120.0) & (np.abs(Y - h[1]) < 90.0)
                   & (Z - h[2] < 50.0) & (Z - h[2] > -480.0))
            pf = np.zeros(shape, bool)
            pf_masks[side] = pf
            if not box.any():
                continue
            rows = np.flatnonzero(box.any(axis=1))
            cols = np.flatnonzero(box.any(axis=0))
            j0, j1, i0, i1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
            ids = self._ids(f"femur_{side}")
            rot = self.rot[side]
            p0 = np.array([X[j0, i0], Y[j0, i0], Z[j0, i0]])
            sub_shape = (j1 - j0, i1 - i0)
            if femur_only:
                # only the proximal-femur truth is wanted: label just the (rotated) femur window;
                # densities only where they are kept
                lab_r, in_new, xr, yr, zr = self._femur_window(side, p0, a0, b0, sub_shape, spacing)
                keep = in_new & (zr >= h[2] - self.pf_length_mm)
                if keep.any():
                    ha = scene.densities_from_labels(lab_r[keep], xr[keep], yr[keep], zr[keep])["ha"]
                    pf_ha[side][j0:j1, i0:i1][keep] = ha
                continue
            sub_old = lab[j0:j1, i0:i1]
            in_old = np.isin(sub_old, ids)
            if np.allclose(rot, np.eye(3)):
                in_new = in_old
                zq = Z[j0:j1, i0:i1]
            else:
                lab_r, in_new, xr, yr, zr = self._femur_window(side, p0, a0, b0, sub_shape, spacing)
                if self.materials or self.truth:
                    new_lab = sub_old.copy()
                    new_lab[in_old & ~in_new] = self._fill_label()
                    new_lab[in_new] = lab_r[in_new]
                    lab[j0:j1, i0:i1] = new_lab
                    for full, part in ((X, xr), (Y, yr), (Z, zr)):
                        full[j0:j1, i0:i1][in_new] = part[in_new]
                zq = zr
            femur_any[j0:j1, i0:i1] |= in_new
            pf[j0:j1, i0:i1] = in_new & (zq >= h[2] - self.pf_length_mm)
        if femur_only:
            return {"pf_R": pf_ha["R"], "pf_L": pf_ha["L"]} if self.truth else {}
        dens = scene.densities_from_labels(lab, X, Y, Z)
        out: dict[str, np.ndarray] = {}
        if self.materials:
            out = {m: dens[m] for m in physics.BASIS if m in dens}
        if self.truth:
            ha = dens["ha"]
            out["pf_R"] = np.where(pf_masks["R"], ha, 0.0)
            out["pf_L"] = np.where(pf_masks["L"], ha, 0.0)
            if self.want_bone:
                bone = femur_any | np.isin(lab, self._ids("pelvis"))
                out["bone"] = np.where(bone, ha, 0.0)
        return out

    # ---------------------------------------------------------------- generic path (points)
    def __call__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> dict[str, np.ndarray]:
        shape = np.shape(x)
        p = np.stack([np.ravel(x), np.ravel(y), np.ravel(z)]).astype(float)
        q0 = self.untilt(p)
        n = q0.shape[1]
        out: dict[str, np.ndarray] = {}
        if self.materials:
            dens = self.scene.densities(q0[0], q0[1], q0[2])
            out = {m: np.array(np.ravel(np.broadcast_to(dens[m], (n,)) if np.ndim(dens[m]) == 0
                                        else dens[m]), dtype=np.float64, copy=True)
                   for m in physics.BASIS if m in dens}
        if self.truth:
            out["pf_R"] = np.zeros(n)
            out["pf_L"] = np.zeros(n)
            bone = np.zeros(n, dtype=bool)
        for side in ("R", "L"):
            h = self.heads[side]
            d = q0 - h[:, None]
            sel = np.flatnonzero((np.abs(d[0]) < 120.0) & (np.abs(d[1]) < 90.0)
                                 & (d[2] < 50.0) & (d[2] > -480.0))
            if sel.size == 0:
                continue
            qs = q0[:, sel]
            rot = self.rot[side]
            moved = not np.allclose(rot, np.eye(3))
            q_new = h[:, None] + rot.T @ (qs - h[:, None]) if moved else qs
            in_new = np.asarray(self.scene.structure_mask(f"femur_{side}", *q_new), bool).ravel()
            if moved and self.materials:
                in_old = np.asarray(self.scene.structure_mask(f"femur_{side}", *qs), bool).ravel()
                vacated = sel[in_old & ~in_new]
                for m in out:
                    if m in physics.BASIS:
                        out[m][vacated] = _FILL.get(m, 0.0)
                idx = sel[in_new]
                if idx.size:
                    dn = self.scene.densities(*q_new[:, in_new])
                    for m in physics.BASIS:
                        if m in out:
                            out[m][idx] = np.ravel(np.broadcast_to(dn[m], (idx.size,)))
            if self.truth:
                idx = sel[in_new]
                if idx.size:
                    ha = (out["ha"][idx] if "ha" in out
                          else np.ravel(self.scene.densities(*q_new[:, in_new])["ha"]))
                    pf = q_new[2, in_new] >= h[2] - self.pf_length_mm
                    out[f"pf_{side}"][idx] = np.where(pf, ha, 0.0)
                    bone[idx] = True
        if self.truth and self.want_bone:
            if self.has_pelvis:
                in_pelvis = np.asarray(self.scene.structure_mask("pelvis", *q0), bool).ravel()
                bone |= in_pelvis
            ha_all = out["ha"] if "ha" in out else np.ravel(self.scene.densities(*q0)["ha"])
            out["bone"] = np.where(bone, ha_all, 0.0)
        return {k: v.reshape(shape) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# hip radiograph
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HipGeometry:
    """Where source, patient and detector are for one radiograph (mm, patient LPS)."""

    source: tuple[float, float, float]
    y_detector: float
    sid_mm: float
    sod_mm: float
    magnification: float
    u: np.ndarray
    v: np.ndarray
    pixel_mm: float


def hip_geometry(scene: Any, pose: Pose, *, pixel_mm: float = 0.5,
                 field_mm: tuple[float, float] = (430.0, 350.0),
                 detector_gap_mm: float | None = None,
                 aim_offset_mm: tuple[float, float] = (0.0, 40.0)) -> HipGeometry:
    """Source/detector placement for an AP pelvis radiograph of ``scene`` in ``pose``.

    The central ray passes 40 mm above the mid-point of the femoral heads; the detector lies
    ``detector_gap_mm`` (70 supine: table + bucky, 30 standing) behind the back.

    Parameters
    ----------
    scene : Scene
        Needs ``femoral_heads`` and ``bounds()``.
    pose : Pose
        Gives the SID and upright/supine.
    pixel_mm : float
        Detector pixel pitch (ImagerPixelSpacing).
    field_mm : tuple of float
        Detector field (width along x, height along z).
    detector_gap_mm : float, optional
        Gap between the posterior skin and the detector plane.
    aim_offset_mm : tuple of float
        Where the central ray passes, relative to the mid-point of the femoral heads:
        ``(x, z)`` mm (patient left, head); default 40 mm above it.
    """
    heads = np.array([scene.femoral_heads["R"], scene.femoral_heads["L"]], float)
    centre = heads.mean(axis=0)
    (_, _), (_, ymax), (_, _) = scene.bounds()
    gap = detector_gap_mm if detector_gap_mm is not None else (30.0 if pose.upright else 70.0)
    y_det = float(ymax) + gap
    y_src = y_det - pose.sid_mm
    sod = float(centre[1]) - y_src
    mag = pose.sid_mm / sod
    aim = np.array([centre[0] + float(aim_offset_mm[0]), centre[2] + float(aim_offset_mm[1])])
    ncol = int(round(field_mm[0] / pixel_mm))
    nrow = int(round(field_mm[1] / pixel_mm))
    # detector coordinates centred on the projection of the aim point (central ray is perpendicular)
    u = aim[0] + (np.arange(ncol) - (ncol - 1) / 2.0) * pixel_mm
    v = aim[1] - (np.arange(nrow) - (nrow - 1) / 2.0) * pixel_mm  # row 0 superior
    return HipGeometry(source=(float(aim[0]), y_src, float(aim[1])), y_detector=y_det,
                       sid_mm=pose.sid_mm, sod_mm=sod, magnification=mag, u=u, v=v, pixel_mm=pixel_mm)


def _project_point(geom: HipGeometry, p: np.ndarray) -> tuple[float, float]:
    """(row, col) (fractional pixel index) where point ``p`` projects."""
    xs, ys, zs = geom.source
    t = (geom.y_detector - ys) / (p[1] - ys)
    u = xs + t * (p[0] - xs)
    w = zs + t * (p[2] - zs)
    col = (u - geom.u[0]) / geom.pixel_mm
    row = (geom.v[0] - w) / geom.pixel_mm
    return float(row), float(col)


def _zoom_to(arr: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if arr.shape == shape:
        return arr
    fy, fx = shape[0] / arr.shape[0], shape[1] / arr.shape[1]
    out = ndimage.zoom(arr, (fy, fx), order=1, mode="nearest", grid_mode=True)
    return out[: shape[0], : shape[1]]


def _detector_image(proj: dict[str, np.ndarray], kvp: float, rng: np.random.Generator, out_shape: tuple[int, int],
                    *, pixel_mm: float, spectrum: str, kev: float | None, scatter: bool, noise: bool,
                    quanta_per_pixel: float, processing: bool, processing_strength: float
                    ) -> tuple[np.ndarray, np.ndarray]:
    """What the detector records from the material line integrals ``proj``: the spectrum's
    transmission, scatter, quantum noise at the automatic-exposure level (``rng``'s next normal
    draws), scintillator blur and the presentation processing of a DX "for presentation" image.
    Returns the noise-free ``-ln(I/I0)`` and the processed log image (see :func:`render_hip_xray`)."""
    if spectrum == "mono":
        energies = np.array([float(kev) if kev is not None else float(physics.effective_energy(kvp)
                                                                        if kvp >= 60 else 50.0)])
        weights = np.array([1.0])
    elif spectrum == "poly":
        energies, weights = xray_spectrum(kvp)
    else:
        raise ValueError(f"spectrum must be 'poly' or 'mono', not {spectrum!r}")
    primary = transmission(proj, energies, weights)
    log_clean = -np.log(np.maximum(primary, 1e-12))
    intensity = primary
    if scatter:
        sigma_px = 40.0 / pixel_mm
        small = ndimage.zoom(primary, 0.125, order=1)
        blurred = ndimage.gaussian_filter(small, sigma_px * 0.125, mode="nearest")
        intensity = primary + 0.35 * _zoom_to(blurred, out_shape)
    if noise:
        r0, r1 = out_shape[0] // 3, 2 * out_shape[0] // 3
        c0, c1 = out_shape[1] // 3, 2 * out_shape[1] // 3
        level = float(np.median(intensity[r0:r1, c0:c1]))
        n0 = quanta_per_pixel / max(level, 1e-9)
        counts = intensity * n0
        counts = counts + np.sqrt(np.maximum(counts, 0.0)) * rng.standard_normal(out_shape)
        intensity = np.maximum(counts, 0.5) / n0
        intensity = ndimage.gaussian_filter(intensity, 0.6)  # detector blur (scintillator MTF)
    log_img = -np.log(np.maximum(intensity, 1e-12))
    if processing:
        # presentation processing of a DX "for presentation" image: large-kernel unsharp masking
        # (dynamic-range compression) so bone shows over the soft-tissue thickness gradient
        low = ndimage.gaussian_filter(ndimage.zoom(log_img, 0.125, order=1), 25.0 / pixel_mm * 0.125,
                                      mode="nearest")
        log_img = log_img + processing_strength * (log_img - _zoom_to(low, out_shape))
    return log_clean, log_img


def render_hip_xray(scene: Any, seed: int, pose: str | Pose = "supine", *, kvp: float | None = None,
                    pixel_mm: float = 0.5, ray_mm: float = 1.0, dy_mm: float = 1.0,
                    field_mm: tuple[float, float] = (430.0, 350.0), spectrum: str = "poly",
                    kev: float | None = None, scatter: bool = True, noise: bool = True,
                    jitter: bool = True, pf_length_mm: float = 70.0,
                    quanta_per_pixel: float = 2.0e4, processing: bool = True,
                    processing_strength: float = 1.0,
                    projection_hook: Callable[[dict[str, np.ndarray], HipGeometry, "PosedSampler"], None] | None = None,
                    aim_offset_mm: tuple[float, float] = (0.0, 40.0)) -> tuple[Any, dict[str, Any]]:
    """Render an AP pelvis radiograph (DX DICOM) and its bone-only ground-truth DRRs.

    Parameters
    ----------
    scene : Scene
        From :func:`training.phantoms.anatomy.build_scene`.
    seed : int
        Drives pose jitter, kVp, noise and the DICOM UIDs.
    pose : str or Pose
        ``"supine"``, ``"standing"``, ``"abduction"``, ``"adduction"`` (seed 004) or ``"neutral"``.
    kvp : float, optional
        Tube voltage; default drawn in 70-80 kVp.
    pixel_mm : float
        Detector pixel pitch of the stored image (ImagerPixelSpacing).
    ray_mm : float
        Spacing of the traced rays at the detector; the material line integrals are linearly
        interpolated to ``pixel_mm``.
    dy_mm : float
        Sampling step along the AP axis.
    field_mm : tuple of float
        Detector field (width, height).
    spectrum : str
        ``"poly"`` (few-bin Kramers spectrum) or ``"mono"`` (at ``kev``, default the spectrum's mean).
    kev : float, optional
        Energy for ``spectrum="mono"``.
    scatter, noise : bool
        Add the scatter fraction / quantum noise.
    jitter : bool
        Jitter the pose (seeded); False gives the nominal pose.
    pf_length_mm : float
        Proximal-femur region: femur above ``head_z - pf_length_mm``.
    quanta_per_pixel : float
        Detected quanta per pixel at the automatic-exposure-control level (median of the central
        third of the field).
    processing : bool
        Apply presentation processing (unsharp masking, 25 mm kernel) to the stored image; False
        stores the plain detector log signal ``-ln(I/I0)``.
    processing_strength : float
        Gain of the unsharp mask.
    projection_hook : callable, optional
        ``hook(projections, geometry, sampler)`` edits the material line integrals (g/cm^2 per basis
        material, on the stored pixel grid) in place before the spectrum is applied: implant metal,
        extra soft tissue, bowel gas, open physes (:mod:`training.phantoms.xray_variety`).  The
        ground-truth DRRs are not changed.
    aim_offset_mm : tuple of float
        Central ray relative to the mid-point of the femoral heads (:func:`hip_geometry`).

    Returns
    -------
    dataset : pydicom.dataset.Dataset
        DX For Presentation.
    truth : dict
        ``pf_drr`` ({"R", "L"} -> g/cm^2 HA images), ``bone_drr`` (pelvis + femurs, g/cm^2),
        ``femoral_heads_px`` ({"R", "L"} -> (row, col)), ``log_image`` (noise-free ``-ln(I/I0)``),
        ``pose`` (dict), ``kvp``, ``pixel_mm``, ``pixel_spacing_mm`` (at the head plane),
        ``magnification``, ``log_scale`` (stored value per unit of ``-ln(I/I0)``),
        ``femoral_necks_px`` ({"R", "L"} -> (row, col) of the femoral-neck ROI centre, mid-way
        between the head surface and the neck base), ``head_radius_px``.
    """
    rng = np.random.default_rng([int(seed), 4004])
    pose_obj = pose if isinstance(pose, Pose) else sample_pose(pose, rng if jitter else None)
    if kvp is None:
        kvp = float(np.round(rng.uniform(70.0, 80.0)))
    geom = hip_geometry(scene, pose_obj, pixel_mm=pixel_mm, field_mm=field_mm, aim_offset_mm=aim_offset_mm)
    out_shape = (len(geom.v), len(geom.u))
    # traced (coarser) ray grid spanning the same field
    ncol = max(2, int(round(field_mm[0] / ray_mm)))
    nrow = max(2, int(round(field_mm[1] / ray_mm)))
    u_r = np.linspace(geom.u[0], geom.u[-1], ncol)
    v_r = np.linspace(geom.v[0], geom.v[-1], nrow)
    (_, _), (ymin, ymax), (_, _) = scene.bounds()
    margin = 250.0 * abs(math.sin(math.radians(pose_obj.pelvic_tilt_deg)))  # tilted body sticks out
    sampler = PosedSampler(scene, pose_obj, pf_length_mm=pf_length_mm, truth=True)
    proj = project(sampler, u_r, v_r, (float(ymin) - margin, float(ymax) + margin), dy_mm,
                   source=geom.source, y_detector=geom.y_detector)
    proj = {k: _zoom_to(a, out_shape) for k, a in proj.items()}
    if projection_hook is not None:
        projection_hook(proj, geom, sampler)

    log_clean, log_img = _detector_image(proj, kvp, rng, out_shape, pixel_mm=pixel_mm, spectrum=spectrum, kev=kev,
                                         scatter=scatter, noise=noise, quanta_per_pixel=quanta_per_pixel,
                                         processing=processing, processing_strength=processing_strength)
    log_scale = 500.0
    stored = np.clip(np.round(log_img * log_scale), 0, 4095).astype(np.uint16)
    body = stored[stored > 200]
    lo, hi = (np.percentile(body, [3.0, 99.8]) if body.size else (0.0, 4095.0))
    window = (0.5 * (lo + hi), max(hi - lo, 1.0))

    pose_dict = asdict(pose_obj)
    ds = pdcm.dx_dataset(
        scene.patient, seed, stored, imager_pixel_spacing_mm=pixel_mm,
        magnification=geom.magnification, sid_mm=geom.sid_mm, sod_mm=geom.sod_mm, kvp=kvp,
        pose=pose_obj.name, window=window, upright=pose_obj.upright,
        extra={"AcquisitionDeviceProcessingDescription":
               "-ln(I/I0), unsharp mask 25 mm" if processing else "-ln(I/I0)"})
    heads_px, necks_px, radius_px = {}, {}, {}
    for side in ("R", "L"):
        heads_px[side] = _project_point(geom, sampler.posed_point(sampler.heads[side], side))
        neck = getattr(scene, "femoral_necks", {}).get(side)
        if neck:
            # neck ROI centre: mid-way between the head surface and the neck base (where hip DXA
            # searches the narrowest part, training.phantoms.dxa.hip_truth)
            head_c, base = np.asarray(neck["head"], float), np.asarray(neck["base"], float)
            length = float(np.linalg.norm(base - head_c))
            t = 0.5 * (float(neck.get("head_radius", 0.4 * length)) + length) / max(length, 1e-6)
            mid = head_c + min(max(t, 0.3), 0.9) * (base - head_c)
            necks_px[side] = _project_point(geom, sampler.posed_point(mid, side))
            radius_px[side] = float(neck.get("head_radius", 22.0)) * geom.magnification / pixel_mm
    truth = {
        "pf_drr": {"R": proj["pf_R"].astype(np.float32), "L": proj["pf_L"].astype(np.float32)},
        "bone_drr": proj["bone"].astype(np.float32),
        "femoral_heads_px": heads_px,
        "femoral_necks_px": necks_px,
        "head_radius_px": radius_px,
        "log_image": log_clean.astype(np.float32),
        "pose": pose_dict,
        "kvp": kvp,
        "pixel_mm": pixel_mm,
        "pixel_spacing_mm": pixel_mm / geom.magnification,
        "magnification": geom.magnification,
        "log_scale": log_scale,
        "pf_length_mm": pf_length_mm,
    }
    log.debug("hip_xray.rendered", sop_instance_uid=str(ds.SOPInstanceUID), pose=pose_obj.name,
              kvp=kvp, shape=out_shape)
    return ds, truth
