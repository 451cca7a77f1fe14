"""Contrast enhancement and phase of a CT, read from the image (and the header).

Archives often lack ``ContrastBolusAgent`` (or keep a stale one), so the
screener looks at the blood itself, on a few axial slices downsampled to
~1.5 mm pixels: with a localization, mid-body and upper-body slices of T12-L3
(8 at most); without one, 10 slices over the upper 4-70 % of the coverage:

* the **spine**: the vertebral body is the largest bone region (cortex
  > 220 HU closed and filled, else > 150 HU) near the midline in the posterior
  part of the trunk (or within 22 mm of the localizer's centroid); its centre is
  the maximum of the distance transform; a candidate needs a cortex brighter
  than its interior or a heterogeneous (trabecular) interior, which a
  contrast-filled vessel or organ lacks;
* the **aorta**: the brightest uniform disc (4 mm radius, low SD, below ~545 HU
  at 120 kVp) anterior / anterior-left of the vertebral body, outside it,
  preferably a round vessel (an edge 6.5-18 mm out where the surroundings are
  darker, no brighter rim inside it); the slice readings are pooled by
  consensus (the largest group of similar readings: a slice that read an
  endplate or bowel stands apart) and their median taken; when no slice shows a
  round vessel (a native aorta amid soft tissue) only an aorta above ~195 HU
  (120 kVp) counts as enhanced; the thresholds rise by 3 SD of a disc's mean on
  a noisy scan;
* the **IVC**: the brightest uniform disc 15-50 mm to the patient's right of
  the aorta, at its depth (L1-L3: infrahepatic or retro-hepatic IVC);
* the **kidneys**: enhancing parenchyma lateral to the spine (cortex = 90th,
  medulla = 20th percentile of its voxels): evidence only.

Decision (``kvp_factor`` rescales iodine enhancement to its 120 kVp value:
iodine reads ~1.7x at 80 kVp, ~1.3x at 100 kVp, ~0.8x at 140 kVp):

* enhanced when the aorta is ``>= 45 HU`` above native blood (~45 HU) at
  120 kVp equivalent (native blood 35-60 HU; any IV contrast phase > 120 HU);
* arterial when the IVC has taken up less than 40 % of the aorta's
  enhancement (``(IVC - 45) / (aorta - 45) < 0.4``: arterial ~0.1-0.3,
  portal venous / nephrographic ~0.5-1.1: the retro-hepatic IVC of the real
  portal-venous CT in ``../shared/data`` reads 0.55, mixing with unenhanced
  blood from the legs); a very bright aorta (> ~245 HU at 120 kVp) adds to the
  arterial side; without an IVC reading an aorta above ~305 HU (120 kVp)
  means arterial;
* delayed when aorta and IVC are alike but only mildly enhanced (< ~125 HU at
  120 kVp) and the renal parenchyma reads brighter than the aorta (nephrographic
  / excretory); the virtual cohort renders no delayed phase, so this rule is
  untested there;
* ``unknown`` when no vertebral body / aorta could be found.

The header (``ContrastBolusAgent``) is combined with the image: an image
reading with confidence >= 0.6 wins, and a disagreement (header says
contrast, image shows native blood, or the reverse) is reported in
``conflict``.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
import structlog
from scipy import ndimage

from screener.domain import SpineLocalization, Volume
from screener.preprocess.morphology import fill_holes
from screener.series import header_contrast_agent, header_kvp

log = structlog.get_logger(__name__)

__all__ = ["ContrastAssessment", "assess_contrast", "trabecular_enhancement_hu", "PHASES",
           "PORTAL_VENOUS_ENHANCEMENT_HU", "ARTERIAL_ENHANCEMENT_HU", "DELAYED_ENHANCEMENT_HU"]

PHASES = ("native", "arterial", "portal_venous", "delayed", "unknown")

#: L1 trabecular HU added by IV contrast in the portal venous phase: +11.2 +- 19.2 HU
#: (Pickhardt et al., Osteoporos Int 2016;27:147-152, n = 157 paired scans; the screener's
#: ``config.contrast_adjust_hu``).
PORTAL_VENOUS_ENHANCEMENT_HU = 11.2
#: Arterial phase: less iodine has reached the marrow. Grunewald et al. (ECR abstract, n = 288,
#: non-contrast / late arterial / portal venous DECT of the same patients; clinical-physics.md
#: section 1) measured +14.4 HU late arterial vs +25.7 HU portal venous at L1, a ratio of 0.56;
#: scaled to Pickhardt's portal venous value: 11.2 x 14.4 / 25.7 = 6.3 HU.
ARTERIAL_ENHANCEMENT_HU = round(PORTAL_VENOUS_ENHANCEMENT_HU * 14.4 / 25.7, 1)
#: Delayed / excretory phase: CT urography at L1 (Acta Radiol 2025, doi 10.1177/02841851251322928,
#: n = 210) excretory 126.2 vs pre-contrast 114.9 HU = +11.3 HU, i.e. the portal venous value.
DELAYED_ENHANCEMENT_HU = PORTAL_VENOUS_ENHANCEMENT_HU

_NATIVE_BLOOD_HU = 45.0
_ENHANCED_MIN = 45.0     # aorta enhancement (120 kVp equivalent) above which a scan is enhanced
_NATIVE_MAX = 25.0       # ... below which it is native; in between the kidneys decide
_ARTERIAL_RATIO = 0.4    # IVC / aorta enhancement ratio below which the phase is arterial
_ARTERIAL_AORTA = 260.0  # aorta enhancement (120 kVp eq.) that alone means arterial
_NEGATIVE_AGENT = re.compile(r"^\s*(none|no|n|0|-+|nil|no contrast|without|non[- ]?contrast|unenhanced|"
                             r"native|nativ)\s*$", re.I)


def trabecular_enhancement_hu(phase: str) -> float:
    """HU that IV contrast adds to L1 trabecular attenuation in ``phase`` (subtract it).

    ``"native"`` 0; ``"arterial"`` :data:`ARTERIAL_ENHANCEMENT_HU` (6.3);
    ``"portal_venous"`` :data:`PORTAL_VENOUS_ENHANCEMENT_HU` (11.2, Pickhardt 2016);
    ``"delayed"`` :data:`DELAYED_ENHANCEMENT_HU` (11.2); ``"unknown"`` (enhanced, phase not
    determined) the portal venous value, the commonest routine phase. Callers apply it only
    when the scan is enhanced (:attr:`ContrastAssessment.trabecular_adjustment_hu` does so).
    """
    values = {"native": 0.0, "arterial": ARTERIAL_ENHANCEMENT_HU,
              "portal_venous": PORTAL_VENOUS_ENHANCEMENT_HU, "delayed": DELAYED_ENHANCEMENT_HU,
              "unknown": PORTAL_VENOUS_ENHANCEMENT_HU}
    try:
        return values[phase]
    except KeyError:
        raise ValueError(f"unknown contrast phase {phase!r}; use one of {PHASES}") from None


@dataclass(frozen=True)
class ContrastAssessment:
    """Contrast enhancement and phase of a CT series.

    Attributes
    ----------
    phase : str
        ``"native"``, ``"arterial"``, ``"portal_venous"``, ``"delayed"`` or ``"unknown"``.
    enhanced : bool
        IV contrast present.
    source : str
        What decided: ``"image"``, ``"header"``, ``"image and header"``,
        ``"header (image inconclusive)"``, ``"image (header disagrees)"``, ``"none"``.
    confidence : float
        0-1.
    evidence : dict
        Image readings (HU at the series' kVp): ``aorta_hu``, ``ivc_hu``, ``ivc_aorta_ratio``,
        ``aorta_enhancement_120kvp_hu``, ``kidney_cortex_hu``, ``kidney_medulla_hu``,
        ``slices_used``, ``kvp_factor``.
    header_agent : str
        ContrastBolusAgent text or ``""``.
    conflict : str or None
        Header and image disagree (e.g. the header names an agent but the aorta reads 40 HU).
    """

    phase: str
    enhanced: bool
    source: str
    confidence: float
    evidence: dict[str, float] = field(default_factory=dict)
    header_agent: str = ""
    conflict: str | None = None

    @property
    def trabecular_adjustment_hu(self) -> float:
        """HU to subtract from L1 trabecular attenuation (0 when not enhanced)."""
        return trabecular_enhancement_hu(self.phase) if self.enhanced else 0.0

    def describe(self) -> str:
        """One line for logs and flags."""
        ev = ", ".join(f"{k} {v:.0f}" for k, v in self.evidence.items() if k.endswith("_hu"))
        s = f"contrast {self.phase} ({self.source}, confidence {self.confidence:.2f}{'; ' + ev if ev else ''})"
        return s + (f"; conflict: {self.conflict}" if self.conflict else "")


# --------------------------------------------------------------------------- header

def _header_agent(volume: Volume, info: object | None) -> str:
    agent = str(getattr(info, "contrast_agent", "") or "") if info is not None else ""
    if not agent and info is None and volume.datasets:
        agent = header_contrast_agent(volume.datasets[0]) or ""
    return agent.strip()


def _header_kvp(volume: Volume, info: object | None) -> float | None:
    kvp = getattr(info, "kvp", None) if info is not None else None
    if kvp is None and volume.datasets:
        try:
            kvp = header_kvp(volume.datasets[0])
        except (TypeError, ValueError):
            kvp = None
    return float(kvp) if kvp else None


def kvp_factor(kvp: float | None) -> float:
    """Iodine HU per mg/mL at ``kvp`` relative to 120 kVp (1 when unknown)."""
    if not kvp or kvp <= 0:
        return 1.0
    return float(np.clip((120.0 / kvp) ** 1.35, 0.6, 2.2))


# --------------------------------------------------------------------------- image

@dataclass
class _Slice:
    hu: np.ndarray        # downsampled HU
    x: np.ndarray         # patient x (mm) of each pixel
    y: np.ndarray         # patient y (mm)
    px: float             # pixel size (mm)
    z: float


def _downsample(volume: Volume, k: int) -> _Slice:
    a = np.asarray(volume.array[k], np.float32)
    _, dj, di = volume.spacing
    f = max(1, int(round(1.5 / max(min(dj, di), 1e-3))))
    if f > 1:
        r, c = (a.shape[0] // f) * f, (a.shape[1] // f) * f
        a = a[:r, :c].reshape(r // f, f, c // f, f).mean(axis=(1, 3))
    a = np.nan_to_num(a, nan=-1000.0)
    jj, ii = np.meshgrid(np.arange(a.shape[0]) * f + (f - 1) / 2.0, np.arange(a.shape[1]) * f + (f - 1) / 2.0,
                         indexing="ij")
    d = np.asarray(volume.direction, float)
    o = np.asarray(volume.origin, float)
    x = o[0] + d[0, 0] * ii * di + d[0, 1] * jj * dj + d[0, 2] * k * volume.spacing[0]
    y = o[1] + d[1, 0] * ii * di + d[1, 1] * jj * dj + d[1, 2] * k * volume.spacing[0]
    z = float(volume.index_to_patient(k, 0, 0)[2])
    return _Slice(a, x, y, float(np.sqrt(dj * di)) * f, z)


def _disc(radius_px: float) -> np.ndarray:
    r = int(np.ceil(radius_px))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    k = (xx ** 2 + yy ** 2 <= radius_px ** 2 + 1e-6).astype(np.float64)
    return k / k.sum()


def _local_stats(a: np.ndarray, radius_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Local mean and SD over a square of the area of a disc of ``radius_px``."""
    size = max(3, int(round(np.sqrt(np.pi) * radius_px)) | 1)
    a64 = a.astype(np.float64)
    m = ndimage.uniform_filter(a64, size, mode="nearest")
    m2 = ndimage.uniform_filter(a64 * a64, size, mode="nearest")
    return m, np.sqrt(np.maximum(m2 - m * m, 0.0))


def _spine(s: _Slice, prior_xy: tuple[float, float] | None) -> tuple[float, float, float] | None:
    """Centre (x, y mm) and inscribed radius (mm) of the vertebral body on one slice.

    Bone = cortex (> 220 HU) closed and filled, so that a low-density trabecular body counts;
    searched near the midline of the trunk in its posterior part (or within 22 mm of the
    localizer's centroid). A candidate must have a rim (cortex) brighter than its interior,
    which tells a vertebral body from a contrast-filled aorta or kidney.
    """
    hu, px = s.hu, s.px
    body = hu > -500
    lab, n = ndimage.label(body)
    if n == 0:
        return None
    sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    body = fill_holes(lab == (1 + int(np.argmax(sizes))))
    if body.sum() * px * px < 5000:  # < 50 cm^2: no trunk
        return None
    bx = float(np.median(s.x[body]))
    ys = s.y[body]
    by, depth = float(np.median(ys)), float(np.percentile(ys, 98) - np.percentile(ys, 2))
    if prior_xy is not None:
        area = (s.x - prior_xy[0]) ** 2 + (s.y - prior_xy[1]) ** 2 < 22.0 ** 2
    else:
        area = (np.abs(s.x - bx) < 35.0) & (s.y > by - 0.15 * depth) & body
    if not area.any():
        return None
    rows, cols = np.nonzero(area)
    pad = int(np.ceil(30.0 / px))
    r0, r1 = max(0, rows.min() - pad), min(hu.shape[0], rows.max() + pad + 1)
    c0, c1 = max(0, cols.min() - pad), min(hu.shape[1], cols.max() + pad + 1)
    h, ar = hu[r0:r1, c0:c1], area[r0:r1, c0:c1]
    xs, ys2 = s.x[r0:r1, c0:c1], s.y[r0:r1, c0:c1]
    for thr, close_mm in ((220.0, 2.0), (150.0, 3.5)):  # dense bone first; then a faint, open cortex
        found = _spine_candidates(h, ar, xs, ys2, px, thr, close_mm)
        if found is not None:
            return found
    return None


def _spine_candidates(h: np.ndarray, ar: np.ndarray, xs: np.ndarray, ys2: np.ndarray, px: float,
                      thr: float, close_mm: float) -> tuple[float, float, float] | None:
    bone = h > thr
    rc = max(1, int(round(close_mm / px)))
    bone = ndimage.binary_closing(bone, structure=np.ones((3, 3)), iterations=rc)
    bone = fill_holes(bone)
    dt = ndimage.distance_transform_edt(bone) * px
    d = np.where(ar, dt, 0.0)
    for _ in range(4):
        idx = np.unravel_index(int(np.argmax(d)), d.shape)
        rb = float(d[idx])
        if rb < 8.0:
            return None
        cx, cy = float(xs[idx]), float(ys2[idx])
        dist = np.hypot(xs - cx, ys2 - cy)
        inner = h[(dist < 0.6 * rb) & bone]
        ring = h[(dist > 0.85 * rb) & (dist < rb + 2.0 * px) & bone]
        if inner.size and ring.size:
            q25, q50, q75 = np.percentile(inner, [25, 50, 75])
            # cortex brighter than the interior, or a heterogeneous (trabecular) interior
            if float(np.percentile(ring, 75)) > q50 + 60.0 or q75 - q25 > 60.0:
                return cx, cy, rb
        d[dist < rb] = 0.0  # a vessel or an organ: try the next candidate
    return None


def _noise(hu: np.ndarray, sd: np.ndarray) -> float:
    soft = (hu > -50) & (hu < 120)
    if soft.sum() < 50:
        return 15.0
    return float(np.percentile(sd[soft], 20))


def _vessel_radius(s: _Slice, r: int, c: int, m: float) -> float | None:
    """Radius (mm) of a round, uniform, darker-surrounded blob centred at pixel (r, c), or None.

    Medians of 1-pixel annuli out to 24 mm: the edge is the first annulus that reads
    ``max(40, 0.3 |m|)`` HU below the centre. A blob with a brighter ring inside its edge (the
    cortex around a vertebral body's trabecular bone) or without an edge by 18 mm (liver,
    spleen, kidney) is not a vessel.
    """
    px = s.px
    w = int(np.ceil(24.0 / px))
    r0, r1, c0, c1 = max(0, r - w), min(s.hu.shape[0], r + w + 1), max(0, c - w), min(s.hu.shape[1], c + w + 1)
    h = s.hu[r0:r1, c0:c1]
    d = np.hypot(s.x[r0:r1, c0:c1] - s.x[r, c], s.y[r0:r1, c0:c1] - s.y[r, c])
    step = max(px, 1.0)
    delta = max(40.0, 0.3 * abs(m))
    rad = 4.0
    while rad < 24.0:
        ring = h[(d >= rad) & (d < rad + step)]
        if ring.size == 0:
            return None
        med = float(np.median(ring))
        if med > m + max(60.0, 0.3 * abs(m)):
            return None  # a bright rim: bone
        if med < m - delta:
            return rad if 6.5 <= rad <= 18.0 else None
        rad += step
    return None


def _best_disc(s: _Slice, win: np.ndarray, mean: np.ndarray, validate: bool,
               n_cand: int = 6) -> tuple[float, tuple[int, int], bool] | None:
    """Median HU of the brightest uniform disc in ``win`` that is a round vessel (else the brightest)."""
    if not win.any():
        return None
    m = np.where(win, mean, -np.inf)
    first = None
    w = int(np.ceil(8.0 / s.px))
    for _ in range(n_cand):
        idx = np.unravel_index(int(np.argmax(m)), m.shape)
        if not np.isfinite(m[idx]):
            break
        r, c = int(idx[0]), int(idx[1])
        sl = (slice(max(0, r - w), r + w + 1), slice(max(0, c - w), c + w + 1))
        d = np.hypot(s.x[sl] - s.x[r, c], s.y[sl] - s.y[r, c])
        val = float(np.median(s.hu[sl][d <= 4.0]))
        if first is None:
            first = (val, (r, c), False)
        if not validate:
            return first
        rad = _vessel_radius(s, r, c, val)
        if rad is not None:
            # read the vessel over most of its lumen: a 4 mm disc picked as the brightest of many
            # reads the noise's upper tail on a noisy scan
            big = min(max(4.0, 0.75 * rad), 10.0)
            w2 = int(np.ceil(big / s.px)) + 1
            sl2 = (slice(max(0, r - w2), r + w2 + 1), slice(max(0, c - w2), c + w2 + 1))
            d2 = np.hypot(s.x[sl2] - s.x[r, c], s.y[sl2] - s.y[r, c])
            return float(np.median(s.hu[sl2][d2 <= big])), (r, c), True
        m[sl][d < 8.0] = -np.inf
    return first


def _vessels(s: _Slice, spine: tuple[float, float, float], mean: np.ndarray, sd: np.ndarray,
             noise: float, fk: float = 1.0) -> tuple[float | None, float | None, bool]:
    """Aorta and IVC HU on one slice (``None`` when not found) and whether the aorta is a round vessel."""
    cx, cy, rb = spine
    dx = s.x - cx
    dist = np.hypot(dx, s.y - cy)
    uniform = sd < (1.3 * noise + 10.0 + 0.04 * np.abs(mean))
    # rb is the half-depth; the body is ~1.25x as wide, its anterolateral corners reach ~1.25 rb
    outside = dist > 1.3 * rb + 3.0
    front = cy - rb  # anterior surface of the body (anterior = -y)
    win_a = (dx > -20.0) & (dx < 45.0) & (s.y > front - 40.0) & (s.y < cy) & outside & uniform
    # blood reads at most ~550 HU at 120 kVp even at the arterial peak: brighter is bone
    win_a &= (mean > -30.0) & (mean < _NATIVE_BLOOD_HU + 500.0 * fk)
    a = _best_disc(s, win_a, mean, validate=True)
    if a is None:
        return None, None, False
    aorta, (r, c), valid = a
    ax, ay = float(s.x[r, c]), float(s.y[r, c])
    win_v = ((s.x - ax) < -15.0) & ((s.x - ax) > -50.0) & (np.abs(s.y - ay) < 15.0) & outside & uniform
    win_v &= (mean > -30.0) & (mean < 1200.0) & (dx < -5.0)
    v = _best_disc(s, win_v, mean, validate=False)
    return aorta, (v[0] if v else None), valid


def _kidneys(s: _Slice, spine: tuple[float, float, float], aorta: float) -> tuple[float, float, float] | None:
    """(cortex p90, medulla p20, p99) HU of enhancing parenchyma lateral to the spine, or None.

    Kidney, spleen and liver parenchyma alike (no organ segmentation): evidence only.
    """
    cx, cy, _ = spine
    ad = np.abs(s.x - cx)
    win = (ad > 35.0) & (ad < 115.0) & (s.y > cy - 45.0) & (s.y < cy + 65.0)
    rows, cols = np.nonzero(win)
    if rows.size == 0:
        return None
    crop = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    win, hu = win[crop], s.hu[crop]
    m = win & (hu > 100.0) & (hu < max(1.25 * aorta + 50.0, 250.0))  # parenchyma, not bone
    m = ndimage.binary_opening(m, iterations=max(1, int(round(3.0 / s.px))))
    lab, n = ndimage.label(m)
    if n == 0:
        return None
    sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:] * s.px * s.px
    keep = [i + 1 for i, a in enumerate(sizes) if a >= 250.0]
    if not keep:
        return None
    vals = hu[np.isin(lab, keep)]
    return float(np.percentile(vals, 90)), float(np.percentile(vals, 20)), float(np.percentile(vals, 99))


def _pick_slices(volume: Volume,
                 localization: SpineLocalization | None) -> list[tuple[int, tuple[float, float] | None]]:
    n = volume.array.shape[0]
    zs = np.array([volume.index_to_patient(k, 0, 0)[2] for k in (0, n - 1)])
    dz = (zs[1] - zs[0]) / max(n - 1, 1)
    out: list[tuple[int, tuple[float, float] | None]] = []
    if localization is not None and localization.vertebrae:
        verts = localization.vertebrae
        order = [lv for lv in ("T12", "L1", "L2", "L3", "T11", "L4") if lv in verts]
        for lv in order[:4]:
            v = verts[lv]
            if abs(dz) < 1e-6:
                continue
            lo, hi = sorted(v.z_range_mm)
            zc = float(v.centroid_mm[2])
            for z in (zc, zc + 0.3 * (hi - zc) if hi > lo else zc + 5.0):
                k = int(round((z - zs[0]) / dz))
                if 0 <= k < n and all(k != q for q, _ in out):
                    out.append((k, (float(v.centroid_mm[0]), float(v.centroid_mm[1]))))
        if out:
            return out
    # no localization: 10 slices over the upper 4-70 % of the coverage (superior = +z), where the
    # aorta runs beside the spine on chest, abdomen, abdomen-pelvis and lumbar coverages (the
    # pelvis below the aortic bifurcation is left out)
    top_first = zs[-1] < zs[0]
    ks = np.unique(np.linspace(0.04 * (n - 1), 0.70 * (n - 1), min(n, 10)).round().astype(int))
    for k in ks:
        out.append((int(k) if top_first else int(n - 1 - k), None))
    return out


def _consensus(values: list[float], valid: list[bool]) -> list[int]:
    """Indices of the largest group of similar readings (within 30 HU or 20 % of one of them):
    the aorta is one tube, a slice that read bone (an endplate) or bowel instead stands apart.
    A reading where the aorta was a round, darker-surrounded vessel counts 1.5, others 1; ties
    go to the tighter group."""
    if len(values) < 3:
        return list(range(len(values)))
    v = np.asarray(values, float)
    w = np.where(np.asarray(valid, bool), 1.5, 1.0)
    groups = [np.nonzero(np.abs(v - x) <= max(30.0, 0.2 * abs(x)))[0] for x in v]
    best = max(groups, key=lambda g: (float(w[g].sum()), -float(np.std(v[g]))))
    return [int(i) for i in best]


def _slice_readings(volume: Volume, localization: SpineLocalization | None, fk: float
                    ) -> tuple[list[float], list[float], list[tuple[float, float, float]], list[float], list[bool]]:
    """Per picked slice with a spine and an aorta: aorta HU, IVC HU (NaN when not found), kidney
    readings (where found), the noise of a 4 mm disc's mean (every slice with a spine) and whether
    the aorta was round."""
    aortas: list[float] = []
    ivcs: list[float] = []
    kid: list[tuple[float, float, float]] = []
    noises: list[float] = []
    valids: list[bool] = []
    for k, prior in _pick_slices(volume, localization):
        s = _downsample(volume, k)
        spine = _spine(s, prior)
        if spine is None and prior is not None:
            spine = _spine(s, None)
        if spine is None:
            continue
        mean, sd = _local_stats(s.hu, 4.0 / s.px)
        noise = _noise(s.hu, sd)
        # SD of a 4 mm disc's mean: the brightest of many discs reads ~3 of these high
        soft = (s.hu > -50) & (s.hu < 120)
        pix_sd = float(np.median(sd[soft])) if soft.sum() >= 50 else noise
        noises.append(pix_sd / np.sqrt(max(np.pi * (4.0 / s.px) ** 2, 1.0)))
        a, v, valid = _vessels(s, spine, mean, sd, noise, fk)
        if a is None:
            continue
        aortas.append(a)
        valids.append(valid)
        ivcs.append(np.nan if v is None else v)
        kr = _kidneys(s, spine, a)
        if kr is not None:
            kid.append(kr)
    return aortas, ivcs, kid, noises, valids


def _phase(enh: float, aorta: float, ratio: float | None, kid_cortex: float | None, n_round: int,
           noises: list[float], fk: float, ev: dict[str, float]) -> tuple[str, float]:
    """Native or enhanced, and which phase, with a confidence (adds ``disc_noise_hu`` to ``ev``)."""
    # enhanced or native
    # on a noisy scan the brightest disc of a native scan reads high: raise the bar by 3 SD
    bias = 3.0 * float(np.median(noises)) / fk if noises else 0.0
    ev["disc_noise_hu"] = round(float(np.median(noises)), 1) if noises else 0.0
    lo_t, hi_t = _NATIVE_MAX + bias, _ENHANCED_MIN + bias
    if n_round == 0:  # no round vessel anywhere (a native aorta amid soft tissue): only a bright reading counts
        lo_t, hi_t = max(lo_t, 150.0), max(hi_t, 150.0)
    if enh < lo_t or (enh < hi_t and (kid_cortex is None or (kid_cortex - _NATIVE_BLOOD_HU) / fk < 80.0)):
        conf = float(np.clip(0.6 + (hi_t - enh) / 50.0, 0.5, 0.99))
        return "native", conf
    p_enh = float(np.clip(0.6 + (enh - hi_t) / 60.0, 0.5, 0.99))
    if ratio is not None:
        margin = (_ARTERIAL_RATIO - ratio) / 0.25
        # the aorta's absolute enhancement adds a little evidence
        margin += 0.3 * float(np.clip((enh - 200.0) / 80.0, -1.5, 1.5))
    else:
        margin = (enh - _ARTERIAL_AORTA) / 60.0
    if margin > 0:
        phase = "arterial"
    else:
        phase = "portal_venous"
        if (ratio is not None and ratio > 0.7 and enh < 80.0 and kid_cortex is not None
                and kid_cortex > aorta + 30.0 * fk):
            phase = "delayed"
    conf = p_enh * float(np.clip(0.5 + 0.25 * abs(margin), 0.5, 0.99))
    return phase, round(conf, 3)


def _image_reading(volume: Volume, localization: SpineLocalization | None,
                   kvp: float | None) -> tuple[str, float, dict[str, float]]:
    """Phase, confidence and evidence from the pixels alone."""
    ev: dict[str, float] = {}
    if not volume.is_axial or volume.array.ndim != 3:
        return "unknown", 0.0, ev
    fk = kvp_factor(kvp)
    ev["kvp_factor"] = round(fk, 3)
    aortas, ivcs, kid, noises, valids = _slice_readings(volume, localization, fk)
    keep = _consensus(aortas, valids)
    n_round = sum(valids[i] for i in keep)
    aortas = [aortas[i] for i in keep]
    ivcs = [ivcs[i] for i in keep]
    ivcs_ok = [(v, a) for v, a in zip(ivcs, aortas) if np.isfinite(v)]
    ivcs = [v for v, _ in ivcs_ok]
    ratios = [(v - _NATIVE_BLOOD_HU) / max(a - _NATIVE_BLOOD_HU, 1.0) for v, a in ivcs_ok]
    ev["slices_used"] = float(len(aortas))
    ev["aorta_round_slices"] = float(sum(valids))
    if not aortas:
        return "unknown", 0.0, ev
    aorta = float(np.median(aortas))
    enh = (aorta - _NATIVE_BLOOD_HU) / fk
    ev["aorta_hu"] = round(aorta, 1)
    ev["aorta_enhancement_120kvp_hu"] = round(enh, 1)
    kid_cortex = None
    if kid:
        ka = np.array(kid)
        kid_cortex = float(np.median(ka[:, 0]))
        ev["kidney_cortex_hu"] = round(kid_cortex, 1)
        ev["kidney_medulla_hu"] = round(float(np.median(ka[:, 1])), 1)
    ratio = None
    if ivcs:
        ev["ivc_hu"] = round(float(np.median(ivcs)), 1)
        # without a localization some slices lie above the IVC's entry into the liver or in
        # the liver's dome, where the right-hand window reads liver: lean to the upper readings
        ratio = float(np.percentile(ratios, 75)) if localization is None else float(np.median(ratios))
        ev["ivc_aorta_ratio"] = round(ratio, 3)
    phase, conf = _phase(enh, aorta, ratio, kid_cortex, n_round, noises, fk, ev)
    return phase, conf, ev


# --------------------------------------------------------------------------- public

def assess_contrast(volume: Volume, localization: SpineLocalization | None,
                    info: object | None) -> ContrastAssessment:
    """Enhancement and phase of ``volume`` from its image, checked against its header.

    Parameters
    ----------
    volume : Volume
        Axial CT in HU.
    localization : SpineLocalization or None
        Vertebra centroids (slices through T12-L3 are read); without it 10 slices over the
        upper 70 % of the coverage are searched for the vertebral body.
    info : SeriesInfo or None
        Header summary (``contrast_agent``, ``kvp``); without it the first slice's header is read.

    Returns
    -------
    ContrastAssessment
    """
    agent = _header_agent(volume, info)
    header_neg = bool(agent) and bool(_NEGATIVE_AGENT.match(agent))
    header_pos = bool(agent) and not header_neg
    try:
        phase, conf, ev = _image_reading(volume, localization, _header_kvp(volume, info))
    except Exception as exc:  # noqa: BLE001 - a reading failure must not stop the protocol
        log.warning("contrast from the image failed", error=repr(exc))
        phase, conf, ev = "unknown", 0.0, {}
    img_known = phase != "unknown"
    img_enh = phase not in ("native", "unknown")
    conflict = None
    if img_known and (header_pos or header_neg) and img_enh != header_pos:
        a = ev.get("aorta_hu", math.nan)
        conflict = (f"header ContrastBolusAgent {agent!r} but the image shows "
                    f"{'enhanced' if img_enh else 'unenhanced'} blood (aorta {a:.0f} HU, {phase})")
    if img_known and conf >= 0.6:
        if conflict:
            source = "image (header disagrees)"
        elif header_pos or header_neg:
            source = "image and header"
            conf = min(0.99, conf + 0.1)
        else:
            source = "image"
        return ContrastAssessment(phase, img_enh, source, round(conf, 3), ev, agent, conflict)
    if header_pos:
        p = phase if (img_known and img_enh) else "unknown"
        src = "header (image inconclusive)" if not img_known else (
            "image and header" if img_enh else "header (image disagrees, low confidence)")
        return ContrastAssessment(p, True, src, 0.6, ev, agent, conflict)
    if header_neg:
        src = "header (image inconclusive)" if not img_known else (
            "image and header" if not img_enh else "header (image disagrees, low confidence)")
        return ContrastAssessment("native", False, src, 0.6, ev, agent, conflict)
    if img_known:
        return ContrastAssessment(phase, img_enh, "image", round(conf, 3), ev, agent, None)
    return ContrastAssessment("unknown", False, "none", 0.0, ev, agent, None)
