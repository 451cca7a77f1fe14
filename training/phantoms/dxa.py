"""Dual-energy X-ray absorptiometry of the phantom: lumbar-spine DXA image and areal-BMD labels.

Physics (clinical-physics.md section 4)
---------------------------------------
A DXA scanner measures the attenuation ``A_E = -ln(I/I0)`` of a (pencil/fan, here parallel) beam at
two energies, ~40 and ~70 keV (cerium-filtered 80 kV).  With two materials, soft tissue ``s`` and
bone mineral ``b`` (hydroxyapatite), in mass units::

    A_L = (mu/rho)_s,L sigma_s + (mu/rho)_b,L sigma_b
    A_H = (mu/rho)_s,H sigma_s + (mu/rho)_b,H sigma_b

The soft-tissue ratio ``R_s = A_L / A_H`` is measured in bone-free pixels next to the spine (row by
row, as a scanner does along its scan lines), and::

    sigma_b = (A_L - R_s A_H) / ((mu/rho)_b,L - R_s (mu/rho)_b,H)     [g/cm^2 HA]

The phantom's soft tissue is a mixture of fat, muscle-like tissue, organs and gas, so ``R_s`` varies
(fat 1.27, muscle 1.40 at 40/70 keV): a ray through the vertebra crosses marrow fat that the
bone-free reference rays do not, which biases sigma_b slightly low -- the known fat error of DXA
(Mazess 1991), reproduced, not corrected.

Measurement
-----------
Per vertebra the operator's ROI is a horizontal box between the mid-planes of the adjacent discs,
centred on the vertebra, ``roi_halfwidth_mm`` wide each side (the body plus the roots of the
transverse processes, as a scanner's spine ROI).  Bone pixels are those of the ROI where
``sigma_b`` (lightly smoothed) exceeds ``edge_threshold`` (edge detection);
``BMC = sum sigma_b x pixel area`` over them, ``area`` = their count x pixel area,
``aBMD = BMC / area``; L1-L4 aBMD is the total BMC over the total area (the scanners' convention).

:func:`areal_bmd_truth` applies the same ROI rule to the *noise-free projection of the true
hydroxyapatite density* (no decomposition) for the spine, and for both hips measures the
femoral-neck box and the total-hip region on the femur's own mineral projection in the standard
hip-DXA position (leg internally rotated 15 deg): these are the cohort's aBMD labels.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import structlog
from scipy import ndimage

from training.phantoms import physics
from training.phantoms import projection_dicom as pdcm
from training.phantoms.xray import PosedSampler, Pose, plane_points, project

log = structlog.get_logger(__name__)

LUMBAR = ("L1", "L2", "L3", "L4")
#: Lunar Prodigy pixel (row = cranio-caudal, column = lateral), seed 003
DXA_PIXEL_MM = (1.05, 0.60)
DXA_KEV = (40.0, 70.0)


# ---------------------------------------------------------------------------------------------
# geometry helpers
# ---------------------------------------------------------------------------------------------
def _vertebrae(scene: Any) -> dict[str, Any]:
    return {v.label: v for v in scene.vertebrae}


def spine_boxes(scene: Any,
                halfwidth_mm: float | None = None) -> dict[str, tuple[float, float, float, float]]:
    """Operator ROI boxes ``(z_low, z_high, x_low, x_high)`` (mm) of L1..L4.

    Vertical limits are the mid-planes between adjacent vertebral bodies (T12/L1 ... L4/L5);
    horizontally the box is centred on the vertebra's centroid and extends
    ``halfwidth_mm`` (default: half the body width + 12 mm) each side.
    """
    verts = _vertebrae(scene)
    order = ["T12", "L1", "L2", "L3", "L4", "L5"]
    missing = [k for k in order if k not in verts]
    if missing:
        raise ValueError(f"scene lacks vertebrae {missing}: a DXA spine needs T12..L5")
    boxes = {}
    for i in range(1, 5):
        above, this, below = verts[order[i - 1]], verts[order[i]], verts[order[i + 1]]
        z_hi = 0.5 * (min(above.z_range_mm) + max(this.z_range_mm))
        z_lo = 0.5 * (min(this.z_range_mm) + max(below.z_range_mm))
        hw = halfwidth_mm if halfwidth_mm is not None else 0.5 * float(this.width_mm) + 12.0
        cx = float(this.centroid_mm[0])
        boxes[this.label] = (float(z_lo), float(z_hi), cx - hw, cx + hw)
    return boxes


def spine_field(scene: Any, pixel_mm: tuple[float, float] = DXA_PIXEL_MM,
                width_mm: float = 180.0, margin_mm: float = 30.0) -> tuple[np.ndarray, np.ndarray]:
    """Column x coordinates and row z coordinates (row 0 superior) of the DXA spine scan.

    The scan runs from ``margin_mm`` below L4 to ``margin_mm`` above L1 (mid-L5 to mid-T12), and is
    ``width_mm`` wide, centred on the mean x of L1..L4.
    """
    verts = _vertebrae(scene)
    z_top = max(verts["L1"].z_range_mm) + margin_mm
    z_bot = min(verts["L4"].z_range_mm) - margin_mm
    cx = float(np.mean([verts[k].centroid_mm[0] for k in LUMBAR]))
    nrow = int(np.ceil((z_top - z_bot) / pixel_mm[0]))
    ncol = int(round(width_mm / pixel_mm[1]))
    v = z_top - (np.arange(nrow) + 0.5) * pixel_mm[0]
    u = cx + (np.arange(ncol) - (ncol - 1) / 2.0) * pixel_mm[1]
    return u, v


def _box_index(box: tuple[float, float, float, float], u: np.ndarray, v: np.ndarray) -> np.ndarray:
    z_lo, z_hi, x_lo, x_hi = box
    rows = (v >= z_lo) & (v < z_hi)
    cols = (u >= x_lo) & (u < x_hi)
    return rows[:, None] & cols[None, :]


def _bone_pixels(sigma: np.ndarray, threshold: float) -> np.ndarray:
    smooth = ndimage.uniform_filter(sigma, size=3, mode="nearest")
    return smooth > threshold


def measure_rois(sigma_b: np.ndarray, boxes: dict[str, tuple[float, float, float, float]],
                 u: np.ndarray, v: np.ndarray, pixel_mm: tuple[float, float],
                 edge_threshold: float = 0.25) -> dict[str, dict[str, float]]:
    """BMC (g), area (cm^2) and aBMD (g/cm^2) in each ROI box of a bone areal-density image.

    Parameters
    ----------
    sigma_b : numpy.ndarray
        Bone areal density (g/cm^2), rows = ``v`` (z), columns = ``u`` (x).
    boxes : dict
        ``label -> (z_low, z_high, x_low, x_high)`` mm.
    u, v : numpy.ndarray
        Column x and row z coordinates (mm).
    pixel_mm : tuple of float
        Pixel size ``(row, column)`` mm.
    edge_threshold : float
        Bone-edge threshold on the 3x3-smoothed image (g/cm^2).

    Returns
    -------
    dict
        ``label -> {"bmc_g", "area_cm2", "abmd"}`` plus ``"L1-L4"`` (total BMC / total area) when
        all four lumbar boxes are given.
    """
    px_cm2 = pixel_mm[0] * pixel_mm[1] / 100.0
    bone = _bone_pixels(sigma_b, edge_threshold)
    out: dict[str, dict[str, float]] = {}
    for label, box in boxes.items():
        sel = _box_index(box, u, v) & bone
        bmc = float(sigma_b[sel].sum() * px_cm2)
        area = float(sel.sum() * px_cm2)
        out[label] = {"bmc_g": bmc, "area_cm2": area, "abmd": bmc / area if area > 0 else float("nan")}
    if all(k in out for k in LUMBAR):
        bmc = sum(out[k]["bmc_g"] for k in LUMBAR)
        area = sum(out[k]["area_cm2"] for k in LUMBAR)
        out["L1-L4"] = {"bmc_g": bmc, "area_cm2": area, "abmd": bmc / area if area > 0 else float("nan")}
    return out


# ---------------------------------------------------------------------------------------------
# dual-energy decomposition
# ---------------------------------------------------------------------------------------------
def decompose(a_low: np.ndarray, a_high: np.ndarray, kev: tuple[float, float] = DXA_KEV, *,
              x_mm: np.ndarray | None = None, reference_band_mm: float = 30.0,
              bone_free: np.ndarray | None = None, iterations: int = 4, bone_threshold: float = 0.05,
              row_smooth: int = 9, bone_material: str = "ha") -> tuple[np.ndarray, np.ndarray]:
    """Two-material (soft tissue / bone mineral) decomposition of dual-energy attenuation images.

    ``R_s`` is estimated per row as ``sum A_L / sum A_H`` over the bone-free pixels of that row
    that lie within ``reference_band_mm`` of the row's bone (the soft tissue next to the bone, as a
    scanner uses), then median-smoothed over ``row_smooth`` rows.  Bone-free pixels are given, or
    found iteratively: first the quarter of each row with the lowest ``A_L / A_H``, then the pixels
    outside a 5x5 dilation of ``sigma_b > bone_threshold``.

    Parameters
    ----------
    a_low, a_high : numpy.ndarray
        ``-ln(I/I0)`` at the low and high energy, ``(rows, cols)``.
    kev : tuple of float
        The two energies (keV).
    x_mm : numpy.ndarray, optional
        Column coordinates (mm); without them every bone-free pixel of the row is a reference.
    reference_band_mm : float
        Reference pixels are at most this far (along the row) from a bone pixel.
    bone_free : numpy.ndarray of bool, optional
        Reference pixels; when given no iteration is done and the band is not applied.
    iterations : int
        Refinements of the bone-free mask.
    bone_threshold : float
        g/cm^2 above which a pixel is treated as bone when searching bone-free pixels.
    row_smooth : int
        Rows in the running median of ``R_s``.
    bone_material : str
        Basis material the image is calibrated to.

    Returns
    -------
    sigma_b : numpy.ndarray
        Bone areal density (g/cm^2).
    r_s : numpy.ndarray
        ``R_s`` per row.
    """
    mb_l = float(physics.mass_attenuation(bone_material, kev[0]))
    mb_h = float(physics.mass_attenuation(bone_material, kev[1]))
    a_low = np.asarray(a_low, float)
    a_high = np.asarray(a_high, float)
    ratio = a_low / np.maximum(a_high, 1e-9)
    if bone_free is not None:
        free = np.asarray(bone_free, bool)
        n_pass = 1
    else:
        free = ratio <= np.percentile(ratio, 25.0, axis=1, keepdims=True)
        n_pass = iterations + 1
    r_s = np.zeros(a_low.shape[0])
    sigma = np.zeros_like(a_low)
    idx = np.arange(a_low.shape[0])
    for k in range(n_pass):
        ref = free
        if x_mm is not None and bone_free is None and k > 0 and len(x_mm) > 1:
            dx = abs(float(x_mm[1] - x_mm[0]))
            dist = ndimage.distance_transform_edt(free, sampling=(1.0e4, dx))  # along rows only
            has_bone = (~free).any(axis=1, keepdims=True)
            ref = free & ((dist <= reference_band_mm) | ~has_bone)
        num = np.where(ref, a_low, 0.0).sum(axis=1)
        den = np.where(ref, a_high, 0.0).sum(axis=1)
        ok = ref.sum(axis=1) >= 5
        if not ok.any():
            raise ValueError("no bone-free pixels to measure the soft-tissue ratio R_s: "
                             "widen the scan field")
        r_row = np.interp(idx, idx[ok], num[ok] / den[ok])
        r_s = ndimage.median_filter(r_row, size=row_smooth, mode="nearest")
        sigma = (a_low - r_s[:, None] * a_high) / (mb_l - r_s[:, None] * mb_h)
        smooth = ndimage.uniform_filter(sigma, 3)
        free = ~ndimage.binary_dilation(smooth > bone_threshold, structure=np.ones((5, 5), bool))
    return sigma, r_s


# ---------------------------------------------------------------------------------------------
# DXA spine image
# ---------------------------------------------------------------------------------------------
class _MaterialSampler:
    """Plain scene sampler (partial densities only)."""

    def __init__(self, scene: Any, keys: tuple[str, ...] = physics.BASIS) -> None:
        self.scene = scene
        self.keys = keys

    def __call__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> dict[str, np.ndarray]:
        d = self.scene.densities(x, y, z)
        return {k: np.broadcast_to(d[k], np.shape(x)) for k in self.keys if k in d}

    def plane(self, origin: np.ndarray, a: np.ndarray, b: np.ndarray, shape: tuple[int, int],
              spacing: tuple[float, float]) -> dict[str, np.ndarray]:
        """Partial densities on a plane grid (``Scene.label_plane`` fast path when available)."""
        pts = plane_points(origin, a, b, shape, spacing)
        if hasattr(self.scene, "label_plane") and hasattr(self.scene, "densities_from_labels"):
            lab = self.scene.label_plane(origin, a, b, shape, spacing)
            d = self.scene.densities_from_labels(lab, *pts)
        else:
            d = self.scene.densities(*pts)
        return {k: np.broadcast_to(d[k], tuple(shape)) for k in self.keys if k in d}


def render_dxa_spine(scene: Any, seed: int, *, kev: tuple[float, float] = DXA_KEV,
                     pixel_mm: tuple[float, float] = DXA_PIXEL_MM, dy_mm: float = 1.0,
                     noise: bool = True, photons: tuple[float, float] = (4.0e7, 1.0e7),
                     width_mm: float = 180.0, edge_threshold: float = 0.25,
                     roi_halfwidth_mm: float | None = None,
                     supersample: tuple[int, int] = (3, 1)) -> tuple[Any, dict[str, Any]]:
    """Render a lumbar-spine DXA scan (PA, L1-L4) as a bone areal-density image (Modality BMD).

    Parameters
    ----------
    scene : Scene
        From :func:`training.phantoms.anatomy.build_scene`.
    seed : int
        Noise and DICOM UIDs.
    kev : tuple of float
        Low and high effective energies.
    pixel_mm : tuple of float
        ``(row, column)`` pixel size; 1.05 x 0.60 mm as the seed-003 scanner.
    dy_mm : float
        Ray sampling step (AP).
    noise : bool
        Poisson (Gaussian-approximated) quantum noise on both energies.
    photons : tuple of float
        Unattenuated quanta per pixel at the low / high energy.
    width_mm : float
        Scan width.
    edge_threshold : float
        Bone-edge threshold (g/cm^2) for the ROI areas.
    roi_halfwidth_mm : float, optional
        ROI box half-width; default half the body width + 12 mm.
    supersample : tuple of int
        Sub-rays per pixel ``(rows, cols)``; their attenuation line integrals are averaged
        (anti-aliasing: thin endplates seen edge-on would otherwise flicker between rows).

    Returns
    -------
    dataset : pydicom.dataset.Dataset
        Secondary Capture, Modality BMD, stored value x 0.0001 = g/cm^2.
    info : dict
        ``sigma_b`` (float32 image, g/cm^2), ``rois`` (label -> (row0, row1, col0, col1) pixel
        box, end-exclusive), ``boxes_mm``, ``measurement`` (label -> bmc_g/area_cm2/abmd, with
        ``"L1-L4"``), ``abmd`` (label -> g/cm^2), ``r_s`` (per row), ``pixel_mm``, ``kev``,
        ``x_mm``/``z_mm`` (column / row coordinates).
    """
    u, v = spine_field(scene, pixel_mm, width_mm=width_mm)
    (_, _), (ymin, ymax), (_, _) = scene.bounds()
    sz, sx = supersample
    # sub-rays inside each pixel: the detector integrates intensity over the pixel area
    uu = (u[:, None] + (np.arange(sx) + 0.5 - sx / 2.0) * pixel_mm[1] / sx).ravel()
    vv = (v[:, None] - (np.arange(sz) + 0.5 - sz / 2.0) * pixel_mm[0] / sz).ravel()
    proj = project(_MaterialSampler(scene), uu, vv, (float(ymin), float(ymax)), dy_mm)
    a_l = np.zeros((len(vv), len(uu)))
    a_h = np.zeros_like(a_l)
    for m, p in proj.items():
        a_l += float(physics.mass_attenuation(m, kev[0])) * p
        a_h += float(physics.mass_attenuation(m, kev[1])) * p
    shape4 = (len(v), sz, len(u), sx)
    # anti-aliasing of the line integrals (averaging A, not I: no partial-volume non-linearity,
    # which the phantom's flat, edge-on endplates would exaggerate)
    a_l = a_l.reshape(shape4).mean(axis=(1, 3))
    a_h = a_h.reshape(shape4).mean(axis=(1, 3))
    if noise:
        rng = np.random.default_rng([int(seed), 3003])
        for a, n0 in ((a_l, photons[0]), (a_h, photons[1])):
            counts = n0 * np.exp(-a)
            counts = np.maximum(counts + np.sqrt(counts) * rng.standard_normal(a.shape), 1.0)
            a[...] = -np.log(counts / n0)
    sigma, r_s = decompose(a_l, a_h, kev, x_mm=u)
    boxes = spine_boxes(scene, roi_halfwidth_mm)
    meas = measure_rois(sigma, boxes, u, v, pixel_mm, edge_threshold)
    rois = {}
    for label, (z_lo, z_hi, x_lo, x_hi) in boxes.items():
        rows = np.flatnonzero((v >= z_lo) & (v < z_hi))
        cols = np.flatnonzero((u >= x_lo) & (u < x_hi))
        rois[label] = (int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1)
    slope = 1.0e-4
    stored = np.clip(np.round(sigma / slope), 0, 65535).astype(np.uint16)
    abmd = {k: m["abmd"] for k, m in meas.items()}
    ds = pdcm.bmd_dataset(scene.patient, seed, stored, pixel_spacing_mm=pixel_mm,
                          rescale_slope=slope, kev=kev)
    info = {
        "sigma_b": sigma.astype(np.float32),
        "rois": rois,
        "boxes_mm": boxes,
        "measurement": meas,
        "abmd": abmd,
        "r_s": r_s,
        "pixel_mm": pixel_mm,
        "kev": kev,
        "x_mm": u,
        "z_mm": v,
    }
    log.debug("dxa.rendered", sop_instance_uid=str(ds.SOPInstanceUID),
              l1_l4=round(abmd.get("L1-L4", float("nan")), 4))
    return ds, info


# ---------------------------------------------------------------------------------------------
# labels
# ---------------------------------------------------------------------------------------------
def _neck_axis(scene: Any, side: str) -> tuple[np.ndarray, np.ndarray]:
    """Head centre and unit neck axis (head -> shaft) for ``side``."""
    head = np.asarray(scene.femoral_heads[side], float)
    neck = scene.femoral_necks[side] if hasattr(scene, "femoral_necks") else None
    axis = None
    if isinstance(neck, dict):
        for key in ("axis", "direction"):
            if key in neck:
                axis = np.asarray(neck[key], float)
        if axis is None:
            for key in ("base", "end", "junction", "distal", "shaft_point", "p1"):
                if key in neck:
                    axis = np.asarray(neck[key], float) - head
                    break
    elif neck is not None:
        arr = np.asarray(neck, float)
        if arr.ndim == 2 and arr.shape[0] >= 2:
            axis = arr[-1] - arr[0]
            if np.dot(axis, arr[0] - head) > 0:
                axis = -axis
        elif arr.shape == (3,):
            axis = arr - head
    if axis is None:
        # generic: neck-shaft angle 125 deg; the neck runs inferolaterally
        lat = -1.0 if side == "R" else 1.0
        a = np.radians(125.0 - 90.0)
        axis = np.array([lat * np.cos(a), 0.0, -np.sin(a)])
    axis = axis / np.linalg.norm(axis)
    if (axis[0] > 0) != (side == "L"):
        axis = -axis
    return head, axis


def hip_truth(scene: Any, side: str = "L", *, pixel_mm: float = 1.0, dy_mm: float = 1.0,
              internal_rotation_deg: float = 15.0, neck_box_mm: tuple[float, float] = (15.0, 40.0),
              pf_length_mm: float = 70.0, edge_threshold: float = 0.05) -> dict[str, float]:
    """Femoral-neck and total-hip aBMD of one side, hip-DXA style, from the true mineral projection.

    The leg is internally rotated ``internal_rotation_deg`` (standard positioning); the femur's own
    hydroxyapatite is projected PA (parallel) on a ``pixel_mm`` grid.  Femoral neck: a box
    ``neck_box_mm[0]`` wide along the (projected) neck axis, centred at the narrowest part of the
    neck between the head surface and the neck base, and ``neck_box_mm[1]`` long across it; total
    hip (neck + trochanter + intertrochanteric region): femur pixels distal to the neck box's
    head-side edge and above ``pf_length_mm`` below the head centre.  Pixels count as bone where the
    projection exceeds ``edge_threshold`` g/cm^2.
    """
    pose = Pose("dxa_hip", 0.0, (0.0, 0.0),
                (internal_rotation_deg, internal_rotation_deg), False, 1000.0)
    sampler = PosedSampler(scene, pose, pf_length_mm=pf_length_mm, truth=True, materials=False,
                           bone=False)
    head, axis = _neck_axis(scene, side)
    axis = sampler.rot[side] @ axis
    axis2 = np.array([axis[0], axis[2]])
    axis2 /= np.linalg.norm(axis2)
    lat = -1.0 if side == "R" else 1.0
    x0, x1 = head[0] - 45.0 * lat, head[0] + 95.0 * lat
    u = np.arange(min(x0, x1), max(x0, x1), pixel_mm) + pixel_mm / 2
    v = np.arange(head[2] + 40.0, head[2] - pf_length_mm - 20.0, -pixel_mm) - pixel_mm / 2
    proj = project(sampler, u, v, (head[1] - 50.0, head[1] + 50.0), dy_mm)[f"pf_{side}"]
    px_cm2 = pixel_mm * pixel_mm / 100.0
    bone = proj > edge_threshold
    uu, vv = np.meshgrid(u, v)
    # the neck box sits at the narrowest part of the neck (as scanners place it), searched between
    # the head surface and the neck base along the projected axis
    neck_info = scene.femoral_necks.get(side) if hasattr(scene, "femoral_necks") else None
    t0, t1 = 25.0, 45.0
    if isinstance(neck_info, dict) and "length" in neck_info and "head_radius" in neck_info:
        t0, t1 = float(neck_info["head_radius"]) + 4.0, float(neck_info["length"]) - 4.0
    rel0 = np.stack([uu - head[0], vv - head[2]])
    along0 = rel0[0] * axis2[0] + rel0[1] * axis2[1]
    across0 = -rel0[0] * axis2[1] + rel0[1] * axis2[0]
    near_axis = bone & (np.abs(across0) <= neck_box_mm[1] / 2)
    best_t, best_w = 0.5 * (t0 + t1), np.inf
    for t in np.arange(t0, max(t1, t0) + 0.5, 1.0):
        width = np.count_nonzero(near_axis & (np.abs(along0 - t) <= 1.0))
        if 0 < width < best_w:
            best_t, best_w = float(t), width
    along = along0 - best_t
    across = across0
    neck = bone & (np.abs(along) <= neck_box_mm[0] / 2) & (np.abs(across) <= neck_box_mm[1] / 2)
    # total hip = neck + trochanteric + intertrochanteric regions: the femur distal to the neck
    # box's head-side edge (the head is not part of it), down to the proximal-femur cut
    total = bone & (along >= -neck_box_mm[0] / 2)
    out = {}
    for name, sel in (("femoral_neck", neck), ("total_hip", total)):
        area = sel.sum() * px_cm2
        out[name] = float(proj[sel].sum() * px_cm2 / area) if area > 0 else float("nan")
        out[name + "_area_cm2"] = float(area)
    return out


def areal_bmd_truth(scene: Any, *, pixel_mm: float = 1.0, dy_mm: float = 1.0,
                    edge_threshold: float = 0.25) -> dict[str, float]:
    """aBMD labels (g/cm^2 HA) computed as DXA measures them, from noise-free mineral projections.

    Spine: the true hydroxyapatite density projected PA on a ``pixel_mm`` grid, measured with the
    same ROI boxes and edge rule as :func:`render_dxa_spine` (BMC / area per vertebra; L1-L4 = total
    BMC / total area).  Hip: :func:`hip_truth` for both sides; ``femoral_neck``/``total_hip`` are
    the left hip (the side scanners default to), ``*_R``/``*_L`` both.

    Parameters
    ----------
    scene : Scene
        The patient's scene.
    pixel_mm : float
        Projection grid (coarse is fine: the labels are ratios of sums).
    dy_mm : float
        Ray step.
    edge_threshold : float
        Spine bone-edge threshold (g/cm^2).

    Returns
    -------
    dict of str to float
        ``L1``..``L4``, ``L1-L4``, ``femoral_neck``, ``total_hip``, ``femoral_neck_R``,
        ``femoral_neck_L``, ``total_hip_R``, ``total_hip_L``, plus ``*_bmc_g``/``*_area_cm2`` of
        the spine ROIs.
    """
    boxes = spine_boxes(scene)
    z_lo = min(b[0] for b in boxes.values())
    z_hi = max(b[1] for b in boxes.values())
    x_lo = min(b[2] for b in boxes.values())
    x_hi = max(b[3] for b in boxes.values())
    u = np.arange(x_lo, x_hi, pixel_mm) + pixel_mm / 2
    v = np.arange(z_hi, z_lo, -pixel_mm) - pixel_mm / 2
    verts = _vertebrae(scene)
    ys = [verts[k].centroid_mm[1] for k in LUMBAR]
    depth = max(float(verts[k].depth_mm) for k in LUMBAR)
    y_range = (min(ys) - 0.5 * depth - 25.0, max(ys) + 0.5 * depth + 90.0)
    ha = project(_MaterialSampler(scene, ("ha",)), u, v, y_range, dy_mm)["ha"]
    meas = measure_rois(ha, boxes, u, v, (pixel_mm, pixel_mm), edge_threshold)
    out: dict[str, float] = {}
    for label, m in meas.items():
        out[label] = m["abmd"]
        out[f"{label}_bmc_g"] = m["bmc_g"]
        out[f"{label}_area_cm2"] = m["area_cm2"]
    for side in ("R", "L"):
        h = hip_truth(scene, side, pixel_mm=pixel_mm, dy_mm=dy_mm)
        out[f"femoral_neck_{side}"] = h["femoral_neck"]
        out[f"total_hip_{side}"] = h["total_hip"]
    out["femoral_neck"] = out["femoral_neck_L"]
    out["total_hip"] = out["total_hip_L"]
    return out
