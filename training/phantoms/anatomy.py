"""Parametric anatomy of one synthetic patient: a scene that renderers sample.

Coordinates are DICOM patient coordinates (LPS, mm): +x patient left,
+y posterior, +z head. The origin is the **centre of the L1 vertebral body**
(its trabecular centroid): ``x = 0`` is the mid-sagittal plane (a scoliotic
L1 may sit off it), ``y = 0`` the L1 body centre, ``z = 0`` the L1 mid-height.

The scene is a list of analytic solids (:mod:`training.phantoms.primitives`)
painted in order into a tissue label image; each tissue has a composition
in partial densities of :data:`training.phantoms.physics.BASIS` (g/cm3),
which depends on the contrast phase (iodine in blood and enhancing organs).
Trabecular bone holds hydroxyapatite at the patient's vBMD, modulated by a
band-limited noise field whose wavelength and amplitude follow the patient's
``texture``, with marrow (red + yellow by ``marrow_fat``) filling the rest of
the volume.

Built: skin/subcutaneous fat, abdominal wall and back muscles, visceral fat,
psoas, quadratus lumborum, gluteal and thigh muscles, lungs above a
diaphragm dome, heart, liver, spleen, stomach (with gas), kidneys (with
sinus fat), small bowel and colon (fluid / stool / gas), bladder, aorta
with iliac arteries, IVC, vertebrae T6-L5 (cortical shell, trabecular core,
pedicles, laminae, spinous, transverse and articular processes, discs,
canal with thecal sac, lordosis, scoliotic curve and rotation, fractures as
height loss, osteophytes and endplate sclerosis with degeneration), ribs on
T6-T12 (T11 short, T12 floating), sacrum, ilium (wings as curved plates,
acetabula), pubic and ischial rami, both femurs (head, neck at the patient's
neck-shaft angle and anteversion, greater and lesser trochanters, shaft with
thick cortex and fatty medulla). Dimensions follow clinical-physics.md
section 5, scaled by the patient's size and varied per patient. Rib mineral
and rib cortical thickness fall with the spine's vBMD and ``cortical_mm``
(faint, thin ribs in osteoporotic patients).

Anatomical variants (issue 14; the patient's fields, clinical-physics.md
section 7), whose details come from their own stream
``default_rng([anatomy_seed, 7919])`` so that the main stream, and every
solid of a patient without variants, is unchanged:

* ``t12_ribs="hypoplastic"``: each 12th rib still has its costovertebral
  joint at the body but ends 15-40 mm lateral of the tubercle, with 55-70 %
  of the radius and 45-70 % of the mineral; 30 % have it on one side only.
* ``lumbar_rib``: a rudimentary 13th rib (15-45 mm, 25 % one-sided) that
  starts ~1 mm beyond the tip of L1's transverse process (a pseudo-joint) and
  never touches the vertebral body; L1 keeps its label and ``has_ribs``.
* ``transitional="sacralised_l5"``: L5's transverse processes widen into alae
  that reach the sacral ala and the ilium (Castellvi III, a/b = one/both sides).
  ``"lumbarised_s1"``: S1 is a free lumbar-like vertebra (label ``"S1"``) with a
  disc below it; the fused sacrum starts at S2 (``landmarks["z_sacrum_top"]``);
  the pelvis (``landmarks["z_s1"]``, hips, ilia) stays where it was.
* ``bone_islands``: a sphere of compact bone with its own label
  ``<level>_bone_island`` (part of ``<level>_body``, not of ``<level>_trabecular``).
* ``skeleton_scale``: every bone tissue's mineral x the factor (freed volume
  filled with marrow, or soft tissue in compact bone); soft tissue untouched.

:attr:`Scene.variants` summarises them and :meth:`Scene.level_truth` gives the
per-vertebra truth a level localizer is scored against.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from training.phantoms import physics
from training.phantoms.population import CORE_LEVELS, LEVELS, Patient
from training.phantoms.primitives import (DomeCut, Ellipsoid, HalfSpaceCut, Prim, Prism, Segment, Shell, TableSlab,
                                          ZStack, chain, frame_from_axis)

Arr = np.ndarray
PHASES: tuple[str, ...] = ("native", "arterial", "portal_venous")

# nominal vertebral dimensions (mm) for a size factor of 1
_H = {"T6": 20.0, "T7": 20.5, "T8": 21.0, "T9": 21.5, "T10": 22.0, "T11": 23.0, "T12": 24.0,
      "L1": 25.5, "L2": 26.5, "L3": 27.0, "L4": 27.0, "L5": 28.0, "S1": 24.0}
_W = {"T6": 30.0, "T7": 31.0, "T8": 32.0, "T9": 33.0, "T10": 35.0, "T11": 37.0, "T12": 39.0,
      "L1": 41.0, "L2": 44.0, "L3": 47.0, "L4": 49.0, "L5": 50.0, "S1": 48.0}
_D = {"T6": 26.0, "T7": 27.0, "T8": 28.0, "T9": 29.0, "T10": 30.0, "T11": 31.0, "T12": 32.0,
      "L1": 33.0, "L2": 34.0, "L3": 35.0, "L4": 35.0, "L5": 35.5, "S1": 34.0}
#: disc height below each level (mm)
_DISC = {"T6": 5.0, "T7": 5.0, "T8": 5.5, "T9": 5.5, "T10": 6.0, "T11": 6.5, "T12": 7.0,
         "L1": 8.0, "L2": 9.0, "L3": 10.0, "L4": 11.0, "L5": 11.5, "S1": 6.0}
#: pedicle radius and transverse-process length (mm)
_PED = {"T6": 3.0, "T7": 3.0, "T8": 3.2, "T9": 3.3, "T10": 3.5, "T11": 3.8, "T12": 4.0,
        "L1": 4.2, "L2": 4.6, "L3": 5.0, "L4": 5.5, "L5": 6.5, "S1": 6.0}
_TP = {"T6": 24.0, "T7": 24.0, "T8": 23.0, "T9": 22.0, "T10": 20.0, "T11": 14.0, "T12": 10.0,
       "L1": 18.0, "L2": 24.0, "L3": 30.0, "L4": 26.0, "L5": 24.0, "S1": 20.0}
#: rib extent: azimuth of the anterior end (deg from posterior) and drop of the anterior end (mm)
_RIB = {"T6": (175.0, 95.0), "T7": (172.0, 105.0), "T8": (165.0, 110.0), "T9": (155.0, 112.0),
        "T10": (140.0, 105.0), "T11": (100.0, 70.0), "T12": (62.0, 35.0)}

# iodine (mg/mL) added to each tissue group per contrast phase
_IODINE = {
    "native": {},
    "arterial": {"blood_art": 12.0, "blood_ven": 2.0, "liver": 0.8, "spleen": 4.0, "kidney": 8.0,
                 "heart": 9.0, "bowel_wall": 1.0, "muscle": 0.2, "marrow": 0.5},
    "portal_venous": {"blood_art": 6.0, "blood_ven": 6.0, "liver": 2.2, "spleen": 3.0, "kidney": 6.5,
                      "heart": 6.0, "bowel_wall": 1.5, "muscle": 0.4, "marrow": 0.8},
}


@dataclass
class VertebraTruth:
    """Ground truth of one vertebra.

    Attributes
    ----------
    label : str
        ``"T10"`` ... ``"L5"``.
    z_range_mm : tuple of float
        Inferior and superior patient z (mm) of the vertebral body (cortex included).
    centroid_mm : tuple of float
        Centre of the trabecular body (patient LPS mm).
    body_height_mm : float
        Smallest of anterior / middle / posterior body height (after fracture).
    width_mm, depth_mm : float
        Endplate width (left-right) and depth (antero-posterior).
    has_ribs : bool
        True for T-levels (ribs articulate), False for L-levels.
    axis : tuple of float
        Unit vector of the body's cranio-caudal axis (lordosis / scoliosis tilt).
    rotation_deg : float
        Axial rotation (scoliosis).
    cortical_mm : float
        Cortical shell thickness as rendered.
    rib_kind : str
        ``"true"`` (rib with a costovertebral joint at the body), ``"hypoplastic"`` (a short,
        thin, faint 12th rib, still jointed at the body), ``"lumbar"`` (a rudimentary rib on
        L1 articulating with the transverse-process tip only) or ``"none"``.
    rib_sides : tuple of str
        Sides (``"R"``, ``"L"``) that carry the rib (one-sided hypoplastic / lumbar ribs).
    sacral_like : bool
        A sacralised L5 (alae reaching the sacrum / ilia).
    """

    label: str
    z_range_mm: tuple[float, float]
    centroid_mm: tuple[float, float, float]
    body_height_mm: float
    width_mm: float
    depth_mm: float
    has_ribs: bool
    axis: tuple[float, float, float] = (0.0, 0.0, 1.0)
    rotation_deg: float = 0.0
    cortical_mm: float = 1.0
    nominal_height_mm: float = 0.0
    rib_kind: str = "none"
    rib_sides: tuple[str, ...] = ()
    sacral_like: bool = False


class _Tissues:
    """Registry of tissue labels: name, base composition, iodine group, structure tags."""

    def __init__(self) -> None:
        self.names: list[str] = ["air"]
        self.comp: list[dict[str, float]] = [{"air": 0.0012}]
        self.group: list[str] = [""]
        self.tags: list[set[str]] = [set()]

    def add(self, name: str, comp: dict[str, float], group: str = "", tags: set[str] | None = None) -> int:
        self.names.append(name)
        self.comp.append(dict(comp))
        self.group.append(group)
        self.tags.append(set(tags or ()) | {name})
        return len(self.names) - 1

    def table(self, phase: str) -> dict[str, Arr]:
        if phase not in PHASES:
            raise ValueError(f"contrast phase {phase!r} unknown; use one of {PHASES}")
        io = _IODINE[phase]
        out = {b: np.zeros(len(self.names)) for b in physics.BASIS}
        for i, c in enumerate(self.comp):
            for b, v in c.items():
                out[b][i] = v
            out["iodine"][i] += io.get(self.group[i], 0.0) / 1000.0
        return out

    def ids(self, tag: str) -> Arr:
        return np.array([i for i, t in enumerate(self.tags) if tag in t], dtype=np.int64)


def _marrow(ha: float, ff: float) -> dict[str, float]:
    v = max(0.0, 1.0 - ha / physics.PURE_DENSITY["ha"])
    return {"ha": ha, "fat": v * ff * 0.93, "soft": v * (1.0 - ff) * 1.03}


@dataclass(eq=False)
class Scene:
    """The anatomy of one patient, sampled by the renderers.

    Attributes
    ----------
    patient : Patient
    vertebrae : list of VertebraTruth
        T10 ... L5, **superior to inferior** (the issue's core levels);
        ``all_vertebrae`` adds T6-T9.
    femoral_heads : dict
        ``"R"``/``"L"`` -> head centre (LPS mm).
    femoral_necks : dict
        ``"R"``/``"L"`` -> ``{"head": xyz, "base": xyz, "axis": unit vector from base to
        head, "radius": mm, "length": mm, "shaft_axis": unit vector distal, "neck_shaft_deg": deg}``.
    """

    patient: Patient
    vertebrae: list[VertebraTruth]
    femoral_heads: dict[str, tuple[float, float, float]]
    femoral_necks: dict[str, dict[str, Any]]
    all_vertebrae: list[VertebraTruth] = field(default_factory=list)
    landmarks: dict[str, Any] = field(default_factory=dict)
    prims: list[Prim] = field(default_factory=list, repr=False)
    table_prims: list[Prim] = field(default_factory=list, repr=False)
    tissues: _Tissues = field(default_factory=_Tissues, repr=False)
    trabecular: dict[int, tuple[float, float]] = field(default_factory=dict, repr=False)
    waves: tuple[Arr, Arr, float] = field(default=(np.zeros((0, 3)), np.zeros(0), 0.0), repr=False)
    bone_start: int = 0
    _body_bounds: tuple[tuple[float, float], ...] = ((0, 0), (0, 0), (0, 0))
    _tables: dict[str, Any] = field(default_factory=dict, repr=False)
    variants: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ labels
    def _prims(self, table: bool, bone_only: bool = False) -> list[Prim]:
        if bone_only:
            return self.prims[self.bone_start:]
        return self.table_prims + self.prims if table else self.prims

    def label_points(self, x: Arr, y: Arr, z: Arr, table: bool = False, bone_only: bool = False) -> Arr:
        """Tissue label (uint16) at arbitrary patient points (arrays of one shape).

        ``bone_only`` paints only the skeleton layer (bones, discs, canal, joint spaces): labels
        of soft tissue become 0, but every bone label is exact -- enough for mineral (``ha``) maps
        at a fraction of the cost.
        """
        x, y, z = np.broadcast_arrays(np.asarray(x, float), np.asarray(y, float), np.asarray(z, float))
        shape = x.shape
        x, y, z = x.ravel(), y.ravel(), z.ravel()
        lab = np.zeros(x.shape, np.uint16)
        if x.size == 0:
            return lab.reshape(shape)
        pmin = np.array([x.min(), y.min(), z.min()])
        pmax = np.array([x.max(), y.max(), z.max()])
        for p in self._prims(table, bone_only):
            if np.any(p.hi < pmin) or np.any(p.lo > pmax):
                continue
            sel = np.nonzero((x >= p.lo[0]) & (x <= p.hi[0]) & (y >= p.lo[1]) & (y <= p.hi[1])
                             & (z >= p.lo[2]) & (z <= p.hi[2]))[0]
            if sel.size == 0:
                continue
            m = p.test(x[sel], y[sel], z[sel])
            lab[sel[m]] = p.tissue
        return lab.reshape(shape)

    def label_plane(self, origin: Arr, u: Arr, v: Arr, shape: tuple[int, int],
                    spacing: tuple[float, float], table: bool = False, bone_only: bool = False,
                    from_structure: str | None = None) -> Arr:
        """Tissue labels on a plane grid.

        Pixel ``[j, i]`` is at ``origin + i * spacing[1] * u + j * spacing[0] * v``
        (rows along ``v``, columns along ``u``; ``spacing = (row, column)`` as
        DICOM PixelSpacing).  ``from_structure`` paints only the primitives from the first one of
        that structure on (later primitives overwrite earlier ones, so the structure's own pixels
        and labels come out exactly as in the full painting; other pixels may read 0).
        """
        o = np.asarray(origin, float)
        u = np.asarray(u, float)
        v = np.asarray(v, float)
        H, W = int(shape[0]), int(shape[1])
        dr, dc = float(spacing[0]), float(spacing[1])
        lab = np.zeros((H, W), np.uint16)
        # plane coordinates of a world point: ((p - o) . u / dc, (p - o) . v / dr) for orthonormal u, v;
        # a primitive's window is the plane-projection of its bounding box (vectorised culling)
        prims = self._prims(table, bone_only)
        lo, hi = self._bbox_arrays(table, bone_only)
        if from_structure is not None:
            k0 = self._first_prim(from_structure, table, bone_only)
            prims, lo, hi = prims[k0:], lo[k0:], hi[k0:]
        n = np.cross(u, v)
        c8 = np.stack([np.where(np.array(m, bool)[None, :], hi, lo) for m in
                       ((0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1))],
                      axis=1) - o[None, None, :]
        dn = c8 @ n
        ci = c8 @ u / dc
        cj = c8 @ v / dr
        ok = (dn.min(axis=1) <= 1e-6) & (dn.max(axis=1) >= -1e-6)
        I0 = np.maximum(np.floor(ci.min(axis=1)).astype(np.int64), 0)
        I1 = np.minimum(np.ceil(ci.max(axis=1)).astype(np.int64) + 1, W)
        J0 = np.maximum(np.floor(cj.min(axis=1)).astype(np.int64), 0)
        J1 = np.minimum(np.ceil(cj.max(axis=1)).astype(np.int64) + 1, H)
        ok &= (I0 < I1) & (J0 < J1)
        for k in np.nonzero(ok)[0]:
            p = prims[k]
            i0, i1, j0, j1 = int(I0[k]), int(I1[k]), int(J0[k]), int(J1[k])
            ii = np.arange(i0, i1, dtype=float)[None, :] * dc
            jj = np.arange(j0, j1, dtype=float)[:, None] * dr
            xs = self._coord(o[0], u[0], v[0], ii, jj)
            ys = self._coord(o[1], u[1], v[1], ii, jj)
            zs = self._coord(o[2], u[2], v[2], ii, jj)
            m = p.test(xs, ys, zs)
            if np.ndim(m) < 2 or m.shape != (j1 - j0, i1 - i0):
                m = np.broadcast_to(m, (j1 - j0, i1 - i0))
            lab[j0:j1, i0:i1][m] = p.tissue
        return lab

    def _first_prim(self, name: str, table: bool, bone_only: bool) -> int:
        """Index (in :meth:`_prims` order) of the first primitive painting structure ``name``."""
        key = f"first:{name}:{int(table)}:{int(bone_only)}"
        if key not in self._tables:
            ids = set(self.structure_ids(name).tolist())
            hits = [k for k, p in enumerate(self._prims(table, bone_only)) if p.tissue in ids]
            self._tables[key] = hits[0] if hits else len(self._prims(table, bone_only))
        return self._tables[key]

    def _bbox_arrays(self, table: bool, bone_only: bool = False) -> tuple[Arr, Arr]:
        key = "bbox_b" if bone_only else ("bbox_t" if table else "bbox")
        if key not in self._tables:
            prims = self._prims(table, bone_only)
            self._tables[key] = {"lo": np.array([q.lo for q in prims]), "hi": np.array([q.hi for q in prims])}
        d = self._tables[key]
        return d["lo"], d["hi"]

    @staticmethod
    def _coord(o: float, uc: float, vc: float, ii: Arr, jj: Arr) -> Arr | float:
        out: Any = o
        if uc != 0.0:
            out = out + uc * ii
        if vc != 0.0:
            out = out + vc * jj
        return out

    # --------------------------------------------------------------- materials
    def composition(self, phase: str = "native") -> dict[str, Arr]:
        """Partial density (g/cm3) of each basis material per tissue label."""
        if phase not in self._tables:
            self._tables[phase] = self.tissues.table(phase)
        return self._tables[phase]

    def texture_field(self, x: Arr, y: Arr, z: Arr) -> Arr:
        """Relative trabecular HA modulation (zero mean) at points: ``amp * n(p)``."""
        k, phi, amp = self.waves
        acc = np.zeros(np.broadcast(x, y, z).shape)
        for i in range(len(phi)):
            acc += np.cos(k[i, 0] * x + k[i, 1] * y + k[i, 2] * z + phi[i])
        return acc * (amp * np.sqrt(2.0 / max(len(phi), 1)))

    def _trab_arrays(self) -> tuple[Arr, Arr]:
        n = len(self.tissues.names)
        vb = np.zeros(n)
        ff = np.zeros(n)
        for lab, (v, f) in self.trabecular.items():
            vb[lab], ff[lab] = v, f
        return vb, ff

    def densities_from_labels(self, lab: Arr, x: Arr, y: Arr, z: Arr, phase: str = "native") -> dict[str, Arr]:
        """Partial densities at points whose labels are already known (texture applied)."""
        tab = self.composition(phase)
        out = {b: tab[b][lab] for b in physics.BASIS}
        vb, ff = self._trab_arrays()
        tmask = vb[lab] > 0
        if np.any(tmask):
            xs, ys, zs = (np.broadcast_to(np.asarray(a, float), lab.shape)[tmask] for a in (x, y, z))
            dha = vb[lab[tmask]] / 1000.0 * self.texture_field(xs, ys, zs)
            f = ff[lab[tmask]]
            dvol = dha / physics.PURE_DENSITY["ha"]
            out["ha"] = out["ha"].copy()
            out["fat"] = out["fat"].copy()
            out["soft"] = out["soft"].copy()
            out["ha"][tmask] += dha
            out["fat"][tmask] -= dvol * f * 0.93
            out["soft"][tmask] -= dvol * (1.0 - f) * 1.03
        return out

    def densities(self, x: Arr, y: Arr, z: Arr, phase: str = "native", table: bool = False) -> dict[str, Arr]:
        """Partial densities (g/cm3) per :data:`~training.phantoms.physics.BASIS` at patient points.

        Parameters
        ----------
        x, y, z : numpy.ndarray
            Patient LPS coordinates (mm), arrays of one (broadcastable) shape.
        phase : str
            ``"native"``, ``"arterial"`` or ``"portal_venous"`` (iodine in blood and organs).
        table : bool
            Include the CT couch.
        """
        x, y, z = np.broadcast_arrays(np.asarray(x, float), np.asarray(y, float), np.asarray(z, float))
        lab = self.label_points(x, y, z, table=table)
        return self.densities_from_labels(lab, x, y, z, phase)

    def mu_lut(self, kev: float, phase: str = "native") -> Arr:
        """Linear attenuation (cm^-1) of each tissue label at ``kev`` (texture not included)."""
        tab = self.composition(phase)
        return sum(tab[b] * float(physics.mass_attenuation(b, kev)) for b in physics.BASIS)

    def mu_from_labels(self, lab: Arr, coords: tuple[Arr, Arr, Arr] | None, kev: float,
                       phase: str = "native") -> Arr:
        """Linear attenuation (cm^-1) image from labels, texture added at trabecular labels.

        ``coords`` gives the patient coordinates of each pixel (broadcastable to
        ``lab``), or is a callable ``(jj, ii) -> (x, y, z)`` for the trabecular pixels.
        """
        mu = self.mu_lut(kev, phase)[lab]
        vb, ff = self._trab_arrays()
        tm = vb[lab] > 0
        if np.any(tm):
            if callable(coords):
                xs, ys, zs = coords(*np.nonzero(tm))
            else:
                xs, ys, zs = (np.broadcast_to(np.asarray(a, float), lab.shape)[tm] for a in coords)
            lt = lab[tm]
            dha = vb[lt] / 1000.0 * self.texture_field(xs, ys, zs)
            f = ff[lt]
            mha = float(physics.mass_attenuation("ha", kev))
            mmar = (f * 0.93 * float(physics.mass_attenuation("fat", kev))
                    + (1 - f) * 1.03 * float(physics.mass_attenuation("soft", kev)))
            mu[tm] += dha * (mha - mmar / physics.PURE_DENSITY["ha"])
        return mu

    # -------------------------------------------------------------- structures
    def structure_ids(self, name: str) -> Arr:
        """Tissue labels that make up a named structure (see :meth:`structure_mask`)."""
        ids = self.tissues.ids(name)
        if ids.size == 0:
            raise ValueError(f"unknown structure {name!r}; known: {sorted(self.structure_names())}")
        return ids

    def structure_names(self) -> set[str]:
        """All structure names usable with :meth:`structure_mask`."""
        out: set[str] = set()
        for t in self.tissues.tags:
            out |= t
        return out

    def structure_mask(self, name: str, x: Arr, y: Arr, z: Arr) -> Arr:
        """Boolean mask of a structure at patient points.

        Names: ``"L1"`` ... (whole vertebra), ``"L1_body"`` (cortex + trabecular),
        ``"L1_trabecular"``, ``"L1_posterior"``, ``"T12_rib"``..., ``"femur_R"``,
        ``"femur_L"``, ``"femur_R_neck_trabecular"``, ``"pelvis"``, ``"sacrum"``,
        ``"ribs"``, ``"spine"``, ``"bone"``, ``"disc"``, organs (``"liver"``,
        ``"kidney_R"``, ``"aorta"``, ...), ``"body"`` (everything but air).
        """
        lab = self.label_points(x, y, z)
        if name == "body":
            return lab != 0
        return np.isin(lab, self.structure_ids(name))

    def bounds(self) -> tuple[tuple[float, float], ...]:
        """Extent of the body (skin) in x, y, z (mm): ``((x0, x1), (y0, y1), (z0, z1))``."""
        return self._body_bounds

    def level_truth(self) -> list[dict[str, Any]]:
        """Truth for scoring a level localizer, superior to inferior (``all_vertebrae``).

        One dict per vertebra with its **anatomical** label counted from the top (T6 ... T12,
        L1 ... L5, then ``"S1"`` for a lumbarised S1, which is a free vertebra):
        ``label``, ``z_range_mm`` (body, cortex included), ``centroid_mm``, ``has_ribs``,
        ``rib_kind`` (``"true"``, ``"hypoplastic"``, ``"lumbar"``, ``"none"``), ``rib_sides``,
        ``sacral_like`` (sacralised L5) and ``free`` (True: a mobile vertebra with a disc below,
        i.e. not part of the fused sacrum). The variant summary is :attr:`variants`.
        """
        return [{"label": v.label, "z_range_mm": tuple(v.z_range_mm), "centroid_mm": tuple(v.centroid_mm),
                 "has_ribs": v.has_ribs, "rib_kind": v.rib_kind, "rib_sides": tuple(v.rib_sides),
                 "sacral_like": v.sacral_like, "free": True} for v in self.all_vertebrae]

    def vertebra(self, label: str) -> VertebraTruth:
        """Truth of one level (T6 ... L5, plus ``"S1"`` when it is a free lumbarised vertebra)."""
        for v in self.all_vertebrae:
            if v.label == label:
                return v
        raise KeyError(f"no vertebra {label!r} in the scene; levels are {[v.label for v in self.all_vertebrae]}")


# =============================================================================== builder
class _Builder:
    def __init__(self, p: Patient) -> None:
        self.p = p
        self.rng = np.random.default_rng([p.anatomy_seed, 77])
        self.t = _Tissues()
        self.prims: list[Prim] = []
        self.trab: dict[int, tuple[float, float]] = {}
        self.s = p.size_factor
        self.layer = 0
        self._seq: list[tuple[int, int, Prim]] = []
        self.window: tuple[float, float] | None = None

    def near(self, z0: float, z1: float) -> bool:
        """False when ``[z0, z1]`` misses the build window (nothing there needs building)."""
        return self.window is None or (z1 >= self.window[0] and z0 <= self.window[1])

    # tissues --------------------------------------------------------------------
    def tissue(self, name: str, comp: dict[str, float], group: str = "", tags: set[str] | None = None) -> int:
        return self.t.add(name, comp, group, tags)

    def add(self, *ps: Prim) -> None:
        for q in ps:
            if self.window is not None and (q.hi[2] < self.window[0] or q.lo[2] > self.window[1]):
                continue
            self._seq.append((self.layer, len(self._seq), q))

    def chain(self, tissue: int, pts: Arr, radii: Arr | float, clip: Prim | None = None) -> list[Segment]:
        """:func:`primitives.chain` limited to the build window."""
        return chain(tissue, pts, radii, clip=clip, zwin=self.window)

    def ordered(self) -> list[Prim]:
        """Primitives in paint order: by layer, then in the order added."""
        return [q for _, _, q in sorted(self._seq, key=lambda t: (t[0], t[1]))]

    def n_below(self, layer: int) -> int:
        """Number of primitives painted before ``layer``."""
        return sum(1 for lay, _, _ in self._seq if lay < layer)


def _truncate(pts: Arr, radii: Arr, length: float) -> tuple[Arr, Arr]:
    """A polyline (and its radii) cut at arc ``length`` from its first point (interpolated end)."""
    seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    if length >= cum[-1]:
        return pts, radii
    j = int(np.searchsorted(cum, length, side="right"))  # cum[j-1] <= length < cum[j]
    f = (length - cum[j - 1]) / max(seg[j - 1], 1e-9)
    end = pts[j - 1] + f * (pts[j] - pts[j - 1])
    r_end = radii[j - 1] + f * (radii[j] - radii[j - 1])
    return np.vstack([pts[:j], end[None, :]]), np.concatenate([radii[:j], [r_end]])


def _scale_skeleton(b: "_Builder", k: float, ff: float) -> None:
    """Multiply the mineral (``ha``) of every bone tissue by ``k`` (the intervention of issue 14).

    The volume the mineral frees (or takes) is marrow (fat + red marrow by ``ff``) in marrow
    tissues and soft tissue in compact bone, as :func:`_marrow` does; soft tissue, cartilage and
    the table are untouched. Trabecular vBMD (texture amplitude included) scales with ``k``.
    """
    pure = physics.PURE_DENSITY["ha"]
    for i, tags in enumerate(b.t.tags):
        comp = b.t.comp[i]
        if "bone" not in tags or comp.get("ha", 0.0) <= 0.0:
            continue
        ha0 = comp["ha"]
        dv = ha0 * (1.0 - k) / pure
        comp["ha"] = ha0 * k
        if b.t.group[i] == "marrow":
            comp["fat"] = max(comp.get("fat", 0.0) + dv * ff * 0.93, 0.0)
            comp["soft"] = max(comp.get("soft", 0.0) + dv * (1.0 - ff) * 1.03, 0.0)
        else:
            comp["soft"] = max(comp.get("soft", 0.0) + dv * 1.03, 0.0)
    for lab, (v, f) in list(b.trab.items()):
        b.trab[lab] = (v * k, f)


def _spine_curve(p: Patient, s_grid: Arr) -> dict[str, Arr]:
    """Spine centre line as a function of arc length ``s`` (0 at L1 centre, + upward)."""
    L = p.lordosis_deg
    ks = np.array([-330.0, -250.0, -180.0, -150.0, -111.0, -73.0, 0.0, 36.0, 100.0, 165.0, 230.0, 300.0])
    kt = np.array([-1.25 * L, -1.05 * L, -0.85 * L, -0.5 * L, -0.15 * L, -0.05 * L, 0.08 * L, 0.15 * L,
                   0.18 * L, 0.08 * L, -0.05 * L, -0.1 * L])
    theta = np.deg2rad(np.interp(s_grid, ks, kt))
    # coronal curve (scoliosis), apex at the chosen level, span ~ +-95 mm
    apex_s = {"T12": 36.0, "L1": 0.0, "L2": -36.0, "L3": -73.0}.get(p.scoliosis_apex, -36.0)
    span = 190.0
    A = span / np.pi * np.tan(np.deg2rad(p.cobb_deg) / 2.0) * p.scoliosis_side
    ph = (s_grid - (apex_s - span / 2)) / span
    inside = (ph >= 0) & (ph <= 1)
    dxds = np.where(inside, A * np.pi / span * np.cos(np.pi * ph), 0.0)
    dyds = np.sin(theta)
    dzds = np.sqrt(np.maximum(1.0 - dyds ** 2 - dxds ** 2, 0.05))
    ds = np.gradient(s_grid)
    def integ(d: Arr) -> Arr:
        c = np.concatenate([[0.0], np.cumsum(0.5 * (d[1:] + d[:-1]) * ds[1:])])
        return c - np.interp(0.0, s_grid, c)
    x, y, z = integ(dxds), integ(dyds), integ(dzds)
    rot = np.where(inside, np.sin(np.pi * ph), 0.0) * p.cobb_deg / 3.0 * p.scoliosis_side
    t = np.stack([dxds, dyds, dzds], axis=1)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    return {"s": s_grid, "x": x, "y": y, "z": z, "t": t, "rot": rot}


def build_scene(patient: Patient, z_window: tuple[float, float] | None = None) -> Scene:
    """Build the deterministic anatomy of ``patient`` (see module docstring for the frame).

    Parameters
    ----------
    patient : Patient
    z_window : tuple of float, optional
        ``(z_min, z_max)`` in mm: only solids reaching into this slab are built (the fast
        2-D training path, e.g. ``(-40, 40)`` around L1). Truth (vertebrae, femoral heads,
        landmarks) is complete either way; densities outside the window are not.

    Notes
    -----
    Built in stages that share one :class:`_Parts`: the body (habitus and tissues, variants,
    torso, limbs, chest and upper abdomen, kidneys and vessels, bowel, muscles), then the
    skeleton (spine levels, each vertebra with its posterior elements and ribs, sacrum,
    pelvis and femurs), then the scene the renderers sample (:func:`_finish`).
    """
    p = patient
    b = _Builder(p)
    b.window = None if z_window is None else (float(min(z_window)), float(max(z_window)))
    ns = _Parts(p=p, b=b)
    _habitus_and_tissues(ns)
    _variants(ns)
    _spine_levels(ns)
    _torso(ns)
    _limbs(ns)
    _chest_and_upper_abdomen(ns)
    _kidneys_and_vessels(ns)
    _bowel(ns)
    _spinal_muscles(ns)
    _vertebrae(ns)
    _sacrum_and_pelvis(ns)
    return _finish(ns)


class _Parts:
    """What the stages of :func:`build_scene` hand on to the next, under the names the stages use.

    Each stage reads what it needs at its top and stores what later stages read at its end, so
    the stages run the statements of the one long function they came from, in its order (the
    main random stream's draws, the tissues' ids and the solids' paint order are unchanged).
    """

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


def _vertebra(ns: _Parts, lv: str) -> None:
    """One vertebra: tissues and truth always; its solids only where they reach the build window."""
    _vertebra_tissues(ns, lv)
    _vertebra_truth(ns, lv)
    if not ns.b.near(float(ns.c[2]) - ns.reach, float(ns.c[2]) + 45.0):
        return
    _vertebra_solids(ns, lv)
    _posterior_elements(ns, lv)
    _ribs(ns, lv)


def _habitus_and_tissues(ns: _Parts) -> None:
    """Body habitus (fat, muscle) from the main stream, the soft tissues, and the bones' mineral."""
    b, p = ns.b, ns.p
    rng = b.rng
    s = b.s
    bmi = p.bmi
    female = p.sex == "F"
    fat_scale = (bmi / 25.0)
    t_sc = float(np.clip(6.0 + 1.9 * (bmi - 17.0) + (6.0 if female else 0.0) + rng.normal(0, 3), 4.0, 75.0))
    muscle_k = float(np.clip((1.12 if not female else 0.95) * (1.0 - 0.004 * max(p.age - 40.0, 0.0))
                             * rng.uniform(0.9, 1.1), 0.6, 1.35))
    visc = float(np.clip((bmi - 18.0) / 14.0 + (0.25 if not female else 0.0) + rng.normal(0, 0.1), 0.05, 1.6))

    # ---------------------------------------------------------------- tissues
    T = b.tissue
    FAT = T("subcutaneous_fat", {"fat": 0.93}, tags={"fat"})
    VFAT = T("visceral_fat", {"fat": 0.86, "soft": 0.08}, tags={"fat"})
    SKIN = T("skin", {"soft": 1.09})
    MUS = T("muscle", {"soft": 1.05}, "muscle")
    PSOAS = {sd: T(f"psoas_{sd}", {"soft": 1.05}, "muscle", {"psoas", "muscle"}) for sd in "RL"}
    PARA = T("paraspinal_muscle", {"soft": 1.045, "fat": 0.01 + 0.0012 * max(p.age - 40, 0)}, "muscle",
             {"muscle"})
    LIVER = T("liver", {"soft": 1.066}, "liver")
    SPLEEN = T("spleen", {"soft": 1.055}, "spleen")
    KID = {sd: T(f"kidney_{sd}", {"soft": 1.045}, "kidney", {"kidney"}) for sd in "RL"}
    BLOOD_A = T("aorta", {"soft": 1.06}, "blood_art", {"vessel"})
    BLOOD_V = T("ivc", {"soft": 1.055}, "blood_ven", {"vessel"})
    HEART = T("heart", {"soft": 1.06}, "heart")
    BOWEL_W = T("bowel_wall", {"soft": 1.045}, "bowel_wall", {"bowel"})
    FLUID = T("bowel_fluid", {"soft": 1.012}, "", {"bowel"})
    STOOL = T("stool", {"soft": 0.72, "fat": 0.18, "air": 0.0002}, "", {"bowel"})
    GAS = T("bowel_gas", {"air": 0.0012}, "", {"bowel", "gas"})
    BLADDER = T("bladder", {"soft": 1.012})
    LUNG = T("lung", {"soft": 0.14, "air": 0.001}, "", {"lung"})
    CSF = T("csf", {"soft": 1.005})
    DISC = T("disc", {"soft": 1.085}, "", {"disc"})
    CART = T("cartilage", {"soft": 1.10, "ha": 0.02 + 0.002 * max(p.age - 40.0, 0.0)}, "", {"cartilage"})
    JOINT = T("joint_space", {"soft": 1.06})
    TABLE_SHELL = T("table_shell", {"soft": 1.25}, "", {"table"})
    TABLE_FOAM = T("table_foam", {"fat": 0.08}, "", {"table"})

    vbase = p.vbmd
    ff = p.marrow_fat
    cort_ha = 0.85 + 0.15 * min(vbase["L1"] / 180.0, 1.3)
    post_ha = 0.10 + 0.9 * vbase["L1"] / 1000.0
    vb_lv = dict(vbase)
    vb_lv.setdefault("S1", vbase["L5"])
    # ribs lose mineral and cortex with the spine (age and bone_z act through vBMD and cortical_mm)
    rib_k = float(np.clip(0.70 + 0.30 * vbase["T12"] / (1.02 * 180.0), 0.70, 1.06))
    rib_t = 1.3 * float(np.clip(p.cortical_mm, 0.5, 1.5))
    rib_mar = 0.16 * float(np.clip(vbase["T12"] / (1.02 * 180.0), 0.25, 1.2))
    ns.BLADDER, ns.BLOOD_A, ns.BLOOD_V, ns.BOWEL_W, ns.CART = BLADDER, BLOOD_A, BLOOD_V, BOWEL_W, CART
    ns.CSF, ns.DISC, ns.FAT, ns.FLUID, ns.GAS, ns.HEART, ns.JOINT = CSF, DISC, FAT, FLUID, GAS, HEART, JOINT
    ns.KID, ns.LIVER, ns.LUNG, ns.MUS, ns.PARA, ns.PSOAS, ns.SKIN = KID, LIVER, LUNG, MUS, PARA, PSOAS, SKIN
    ns.SPLEEN, ns.STOOL, ns.T, ns.TABLE_FOAM, ns.TABLE_SHELL = SPLEEN, STOOL, T, TABLE_FOAM, TABLE_SHELL
    ns.VFAT, ns.cort_ha, ns.fat_scale, ns.female, ns.ff = VFAT, cort_ha, fat_scale, female, ff
    ns.muscle_k, ns.post_ha, ns.rib_k, ns.rib_mar, ns.rib_t = muscle_k, post_ha, rib_k, rib_mar, rib_t
    ns.rng, ns.s, ns.t_sc, ns.vb_lv, ns.vbase = rng, s, t_sc, vb_lv, vbase


def _variants(ns: _Parts) -> None:
    """Anatomical variants (issue 14), drawn from their own stream so the main one is untouched."""
    p = ns.p
    # anatomical variants: details from their own stream (the main rng's draws are untouched)
    trans = p.transitional
    vrng = np.random.default_rng([int(p.anatomy_seed), 7919])
    vd = vrng.random(12)
    variants: dict[str, Any] = {"t12_ribs": p.t12_ribs, "lumbar_rib": bool(p.lumbar_rib), "transitional": trans,
                                "skeleton_scale": float(p.skeleton_scale)}
    hypo_len: dict[str, float] = {}
    hypo_r, hypo_faint = 1.0, 1.0
    if p.t12_ribs == "hypoplastic":
        # length of the shaft lateral to the tubercle (transverse-process tip), mm; 30 % one side only
        hypo_len = {"R": 15.0 + 25.0 * float(vd[2]), "L": 15.0 + 25.0 * float(vd[3])}
        if vd[0] < 0.3:
            hypo_len["R" if vd[1] < 0.5 else "L"] = 0.0
        hypo_r = 0.55 + 0.15 * float(vd[4])
        hypo_faint = 0.45 + 0.25 * float(vd[5])
        variants.update(t12_rib_free_length_mm=dict(hypo_len), t12_rib_radius_factor=hypo_r,
                        t12_rib_density_factor=hypo_faint)
    lrib_len: dict[str, float] = {}
    if p.lumbar_rib:
        lrib_len = {"R": 15.0 + 30.0 * float(vd[6]), "L": 15.0 + 30.0 * float(vd[7])}
        if vd[8] >= 0.75:
            lrib_len["R" if vd[9] < 0.5 else "L"] = 0.0
        variants["lumbar_rib_length_mm"] = dict(lrib_len)
    sac_sides: tuple[str, ...] = ()
    if trans == "sacralised_l5":
        sac_sides = ("R", "L") if vd[10] < 0.6 else (("R",) if vd[11] < 0.5 else ("L",))
        variants["sacralised_sides"] = sac_sides
    sd_name = {-1.0: "R", 1.0: "L"}

    ns.hypo_faint, ns.hypo_len, ns.hypo_r, ns.lrib_len = hypo_faint, hypo_len, hypo_r, lrib_len
    ns.sac_sides, ns.sd_name, ns.trans, ns.variants, ns.vrng = sac_sides, sd_name, trans, variants, vrng


def _spine_levels(ns: _Parts) -> None:
    """The spine's centre line and each level's position along it (L1 at arc length 0)."""
    p, s, trans = ns.p, ns.s, ns.trans
    # ---------------------------------------------------------------- spine curve
    sg = np.arange(-420.0, 360.0, 1.0)
    curve = _spine_curve(p, sg)

    table_s = np.column_stack([curve["x"], curve["y"], curve["z"], curve["t"], curve["rot"]])

    def at(s_: float) -> tuple[Arr, Arr, float]:
        """Centre, unit tangent and axial rotation of the spine curve at arc length ``s_`` (1 mm grid)."""
        f = float(np.clip(s_ - sg[0], 0.0, len(sg) - 1.000001))
        i = int(f)
        f -= i
        row = table_s[i] * (1.0 - f) + table_s[i + 1] * f
        t = row[3:6]
        return row[0:3].copy(), t / np.sqrt(t @ t), float(row[6])

    # level positions by arc length (L1 at s = 0)
    heights = {}
    for lv in LEVELS:
        loss = p.height_loss.get(lv, 0.0)
        shape = p.fracture_shape.get(lv, "wedge" if loss < 0.2 else "crush")
        mean_loss = {"wedge": 0.55, "biconcave": 0.4, "crush": 0.95}[shape] * loss
        heights[lv] = _H[lv] * s * (1.0 - mean_loss)
    discs = {lv: _DISC[lv] * s * (1.0 - 0.45 * p.degeneration_level.get(lv, 0.0)) for lv in LEVELS}
    pos: dict[str, float] = {"L1": 0.0}
    i1 = LEVELS.index("L1")
    for i in range(i1 + 1, len(LEVELS)):
        a, c = LEVELS[i - 1], LEVELS[i]
        pos[c] = pos[a] - (heights[a] / 2 + discs[a] + heights[c] / 2)
    for i in range(i1 - 1, -1, -1):
        a, c = LEVELS[i + 1], LEVELS[i]
        pos[c] = pos[a] + (heights[a] / 2 + discs[c] + heights[c] / 2)
    s_s1 = pos["L5"] - heights["L5"] / 2 - discs["L5"]
    levels_b = list(LEVELS)
    s_sac = s_s1  # top of the fused sacrum
    if trans == "lumbarised_s1":  # S1 stays a free vertebra with a (thin) disc below it
        heights["S1"] = _H["S1"] * s
        discs["S1"] = _DISC["S1"] * s
        pos["S1"] = s_s1 - heights["S1"] / 2
        s_sac = s_s1 - heights["S1"] - discs["S1"]
        levels_b.append("S1")

    c_s1, t_s1, _ = at(s_s1)
    c_l1, _, _ = at(0.0)
    c_l3, _, _ = at(pos["L3"])

    ns.at, ns.c_l3, ns.c_s1, ns.curve, ns.discs, ns.heights = at, c_l3, c_s1, curve, discs, heights
    ns.levels_b, ns.pos, ns.s_sac = levels_b, pos, s_sac


def _torso(ns: _Parts) -> None:
    """Key heights, the torso outline: skin, subcutaneous fat, abdominal wall, visceral cavity."""
    FAT, MUS, SKIN, VFAT, at, b, c_l3, c_s1 = ns.FAT, ns.MUS, ns.SKIN, ns.VFAT, ns.at, ns.b, ns.c_l3, ns.c_s1
    curve, fat_scale, female, muscle_k, pos, s = ns.curve, ns.fat_scale, ns.female, ns.muscle_k, ns.pos, ns.s
    t_sc = ns.t_sc
    # ---------------------------------------------------------------- torso outline
    # key z levels
    z_s1 = float(c_s1[2])
    z_hip = z_s1 - 92.0 * s
    z_crest = float(at(pos["L4"])[0][2]) - 8.0 * s
    z_crotch = z_hip - 55.0 * s
    z_top = float(at(pos["T6"])[0][2]) + 60.0
    z_bot = z_hip - 230.0

    def spine_y(z: float) -> float:
        return float(np.interp(z, curve["z"], curve["y"]))

    def spine_x(z: float) -> float:
        return float(np.interp(z, curve["z"], curve["x"]))

    wk = 1.0 + 0.55 * (fat_scale - 1.0)
    hip_k = 1.0 + 0.5 * (fat_scale - 1.0) + (0.06 if female else 0.0)
    dk = 1.0 + 0.9 * (fat_scale - 1.0) * (1.15 if not female else 0.9)
    zs_ = np.array([z_bot, z_crotch - 20, z_crotch, z_hip, z_crest, float(c_l3[2]), 0.0, 100.0, 200.0, z_top])
    half_w = np.array([0, 0, 175, 178, 160, 150, 150, 158, 165, 165]) * s
    half_w[2:4] *= hip_k
    half_w[4:] *= np.array([0.5 * (hip_k + wk), wk, wk, wk, 0.5 * (1 + wk), 0.5 * (1 + wk)])
    depth = np.array([0, 0, 215, 225, 215, 205, 205, 220, 225, 225]) * s
    depth[2:] *= np.array([hip_k, hip_k, 0.5 * (hip_k + dk), dk, dk, 0.5 * (1 + dk), 0.9 + 0.1 * dk, 1.0])
    # posterior skin: behind the spine by muscle + fat (deeper over the sacrum/buttocks)
    # supine on the couch: the back is flat on the table except a small lumbar hollow
    y_table = spine_y(0.0) + 17.0 * s + 68.0 * s * muscle_k + t_sc + 1.0
    lum_top = float(at(pos["T12"])[0][2])
    back = np.array([y_table - 0.5 - (3.0 * s if z_crest < z_ < lum_top else 0.0) for z_ in zs_])
    cy = back - depth / 2
    body_bounds_z = (z_bot, z_top)
    torso = ZStack(FAT, zs_[2:], np.zeros(len(zs_) - 2), cy[2:], half_w[2:], depth[2:] / 2, n=2.3)
    skin = ZStack(SKIN, zs_[2:], np.zeros(len(zs_) - 2), cy[2:], half_w[2:], depth[2:] / 2, n=2.3)
    b.add(skin)
    inner = ZStack(FAT, zs_[2:], np.zeros(len(zs_) - 2), cy[2:], half_w[2:] - 1.8, depth[2:] / 2 - 1.8, n=2.3)
    b.add(inner)
    wall_t = 11.0 * s * muscle_k
    mus_r = (half_w[2:] - t_sc * 0.9, depth[2:] / 2 - t_sc)
    muscle_wall = ZStack(MUS, zs_[2:], np.zeros(len(zs_) - 2), cy[2:] + 0.1 * t_sc,
                         np.maximum(mus_r[0], 20), np.maximum(mus_r[1], 20), n=2.2)
    b.add(muscle_wall)
    cav = ZStack(VFAT, zs_[3:], np.zeros(len(zs_) - 3), cy[3:] - 8.0,
                 np.maximum(mus_r[0][1:] - wall_t, 15), np.maximum(mus_r[1][1:] - wall_t - 8.0, 15), n=2.2)
    b.add(cav)
    del torso

    ns.back, ns.body_bounds_z, ns.cav, ns.cy, ns.depth, ns.dk = back, body_bounds_z, cav, cy, depth, dk
    ns.half_w, ns.hip_k, ns.spine_x, ns.spine_y, ns.wall_t, ns.wk = half_w, hip_k, spine_x, spine_y, wall_t, wk
    ns.y_table, ns.z_bot, ns.z_crest, ns.z_crotch, ns.z_hip = y_table, z_bot, z_crest, z_crotch, z_hip
    ns.z_s1, ns.z_top, ns.zs_ = z_s1, z_top, zs_


def _limbs(ns: _Parts) -> None:
    """Thighs below the crotch and, when down, the arms beside the body."""
    FAT, MUS, SKIN, T, b, cy, depth = ns.FAT, ns.MUS, ns.SKIN, ns.T, ns.b, ns.cy, ns.depth
    fat_scale, half_w, hip_k, p, rng, s = ns.fat_scale, ns.half_w, ns.hip_k, ns.p, ns.rng, ns.s
    y_table, z_bot, z_crest, z_crotch, z_hip = ns.y_table, ns.z_bot, ns.z_crest, ns.z_crotch, ns.z_hip
    z_top, zs_ = ns.z_top, ns.zs_
    # thighs below the crotch
    x_th = 95.0 * s * hip_k
    r_th = 85.0 * s * (1 + 0.5 * (fat_scale - 1))
    y_th = float(cy[2]) + 5.0
    for sd in (-1, 1):
        b.add(ZStack(SKIN, [z_bot, z_crotch + 10], [sd * x_th] * 2, [y_th] * 2, [r_th * 0.95, r_th],
                     [r_th * 0.95, r_th]))
        b.add(ZStack(FAT, [z_bot, z_crotch + 10], [sd * x_th] * 2, [y_th] * 2, [r_th * 0.95 - 2, r_th - 2],
                     [r_th * 0.95 - 2, r_th - 2]))

    # arms beside the body (when not raised above the head)
    arm_r = 0.0
    if p.arms_down:
        arm_r = float(np.clip(38.0 * s * (1.0 + 0.45 * (fat_scale - 1.0)), 28.0, 70.0))
        HUM_C = T("arm_bone_cortex", {"ha": 1.0, "soft": 0.75}, "", {"arm", "bone", "cortical"})
        HUM_M = T("arm_bone_marrow", {"fat": 0.88, "soft": 0.1}, "", {"arm", "bone"})
        z_elbow = -30.0 * s + rng.normal(0, 10)
        z_wrist = z_hip + 10.0
        z_sh = z_top + 60.0
        for sd in (-1, 1):
            zk = np.array([z_wrist - 30.0, z_elbow, z_sh])
            ax_ = np.array([np.interp(z, zs_, half_w) for z in zk])
            xk = sd * (0.93 * np.maximum(ax_, float(np.max(half_w[2:4])) * (zk < z_crest)) + arm_r)
            yk = min(y_table - arm_r - 4.0, float(np.interp(0.0, zs_, cy)) + 0.15 * float(np.interp(0.0, zs_, depth)))
            rk = np.array([0.7, 0.85, 1.0]) * arm_r
            b.add(ZStack(SKIN, zk, xk, [yk] * 3, rk, rk))
            b.add(ZStack(FAT, zk, xk, [yk] * 3, rk - 1.8, rk - 1.8))
            b.add(ZStack(MUS, zk, xk, [yk] * 3, rk * 0.72, rk * 0.72))
            hum = np.array([[xk[2], yk, z_sh], [xk[1], yk, z_elbow]])
            b.add(*b.chain(HUM_C, hum, 11.0 * s))
            b.add(*b.chain(HUM_M, hum, 6.5 * s))
            for dx, dy in ((-7.0, -4.0), (7.0, 3.0)):
                fo = np.array([[xk[1] + dx, yk + dy, z_elbow], [xk[0] + dx * 0.9, yk - 6.0 + dy, z_wrist]])
                b.add(*b.chain(HUM_C, fo, 6.5 * s))
                b.add(*b.chain(HUM_M, fo, 3.5 * s))

    ns.arm_r, ns.r_th, ns.x_th, ns.y_th = arm_r, r_th, x_th, y_th


def _chest_and_upper_abdomen(ns: _Parts) -> None:
    """Diaphragm dome, lungs and heart; liver, spleen and stomach under the dome."""
    BOWEL_W, FLUID, GAS, HEART, LIVER, LUNG = ns.BOWEL_W, ns.FLUID, ns.GAS, ns.HEART, ns.LIVER, ns.LUNG
    SPLEEN, at, b, cav, cy, depth, dk = ns.SPLEEN, ns.at, ns.b, ns.cav, ns.cy, ns.depth, ns.dk
    half_w, pos, rng, s, t_sc, wall_t, wk = ns.half_w, ns.pos, ns.rng, ns.s, ns.t_sc, ns.wall_t, ns.wk
    z_top, zs_ = ns.z_top, ns.zs_
    # ---------------------------------------------------------------- diaphragm and chest
    b.layer = 1
    zd_r = float(at(pos["T9"])[0][2]) + rng.normal(0, 6)
    zd_l = zd_r - 15.0
    yc_l1 = float(np.interp(0.0, zs_, cy))

    def dome(x: Arr, y: Arr) -> Arr:
        r2r = (x + 55.0 * s) ** 2 + (y - yc_l1) ** 2
        r2l = (x - 55.0 * s) ** 2 + (y - yc_l1) ** 2
        post = np.maximum(y - yc_l1, 0.0) * 0.35
        return np.maximum(zd_r - r2r / 260.0, zd_l - r2l / 260.0) - post

    chest_z = [zd_l - 90.0, zd_r + 10.0, z_top]
    for sd in (-1, 1):
        lung = ZStack(LUNG, chest_z, [sd * 72.0 * s * wk] * 3, [yc_l1 + 12.0] * 3,
                      [62.0 * s * wk, 75.0 * s * wk, 78.0 * s], [70.0 * s * dk, 82.0 * s * dk, 85.0 * s],
                      clip=cav)
        b.add(DomeCut(lung, lambda x, y: dome(x, y) + 4.0, above=True))
    heart_c = np.array([22.0 * s, yc_l1 - 45.0 * s * dk, zd_l + 55.0])
    b.add(DomeCut(Ellipsoid(HEART, heart_c, np.array([62.0, 48.0, 58.0]) * s, clip=cav),
                  lambda x, y: dome(x, y) + 3.0, above=True))

    # ---------------------------------------------------------------- abdominal organs
    a_l1 = float(np.interp(0.0, zs_, half_w)) - t_sc - wall_t
    d_l1 = float(np.interp(0.0, zs_, depth)) / 2 - t_sc - wall_t
    y_front = yc_l1 - d_l1
    b.layer = 2
    liver = ZStack(LIVER, [-75.0 * s, -25.0, 30.0, 80.0, zd_r + 8.0],
                   [-0.62 * a_l1, -0.50 * a_l1, -0.36 * a_l1, -0.25 * a_l1, -0.35 * a_l1],
                   [yc_l1 + 18, yc_l1 + 5, yc_l1 - 2, yc_l1 - 4, yc_l1 + 5],
                   [0.30 * a_l1, 0.45 * a_l1, 0.62 * a_l1, 0.70 * a_l1, 0.45 * a_l1],
                   [0.32 * d_l1, 0.52 * d_l1, 0.66 * d_l1, 0.7 * d_l1, 0.5 * d_l1], clip=cav)
    b.add(DomeCut(liver, lambda x, y: dome(x, y) - 3.0, above=False))
    spl_c = np.array([0.62 * a_l1, yc_l1 + 0.45 * d_l1, 45.0 + rng.normal(0, 6)])
    b.add(DomeCut(Ellipsoid(SPLEEN, spl_c, np.array([22.0, 0.42 * d_l1, 52.0]) * np.array([1, 1, s]),
                            R=frame_from_axis(np.array([0.0, 0.0, 1.0]), -35.0), clip=cav),
                  lambda x, y: dome(x, y) - 3.0, above=False))
    st_c = np.array([0.30 * a_l1, y_front + 0.38 * d_l1, 55.0])
    b.add(DomeCut(Ellipsoid(BOWEL_W, st_c, np.array([0.32 * a_l1, 0.34 * d_l1, 55.0]), clip=cav),
                  lambda x, y: dome(x, y) - 3.0, above=False))
    b.add(DomeCut(Ellipsoid(FLUID, st_c, np.array([0.32 * a_l1 - 4, 0.34 * d_l1 - 4, 51.0]), clip=cav),
                  lambda x, y: dome(x, y) - 6.0, above=False))
    b.add(DomeCut(Ellipsoid(GAS, st_c + np.array([0, -0.16 * d_l1, 22.0]),
                            np.array([0.26 * a_l1, 0.2 * d_l1, 26.0]), clip=cav),
                  lambda x, y: dome(x, y) - 6.0, above=False))

    ns.a_l1, ns.d_l1, ns.yc_l1, ns.zd_l, ns.zd_r = a_l1, d_l1, yc_l1, zd_l, zd_r


def _kidneys_and_vessels(ns: _Parts) -> None:
    """Kidneys with perirenal and sinus fat; aorta, IVC and the iliac vessels."""
    BLOOD_A, BLOOD_V, KID, VFAT, at, b, c_s1 = ns.BLOOD_A, ns.BLOOD_V, ns.KID, ns.VFAT, ns.at, ns.b, ns.c_s1
    cav, female, p, pos, rng, s, spine_x = ns.cav, ns.female, ns.p, ns.pos, ns.rng, ns.s, ns.spine_x
    spine_y, z_hip, z_s1 = ns.spine_y, ns.z_hip, ns.z_s1
    # kidneys
    b.layer = 3
    kid_truth = {}
    for sd, name in ((-1, "R"), (1, "L")):
        zc = (-42.0 if name == "R" else -28.0) * s + rng.normal(0, 6)
        sx = spine_x(zc)
        c = np.array([sx + sd * (52.0 * s + 0.5 * _W["L1"] * s), spine_y(zc) + 14.0 * s, zc])
        R = frame_from_axis(np.array([-sd * 0.22, 0.28, 1.0]), sd * 30.0)
        b.add(Ellipsoid(VFAT, c, np.array([36.0, 38.0, 66.0]) * s, R=R, clip=cav))  # perirenal fat
        b.add(Ellipsoid(KID[name], c, np.array([27.0, 30.0, 56.0]) * s, R=R, clip=cav))
        b.add(Ellipsoid(VFAT, c + R @ np.array([-sd * 14.0, -6.0, 0.0]) * s, np.array([10.0, 13.0, 26.0]) * s,
                        R=R))
        kid_truth[name] = c.tolist()

    # vessels
    y_ant = [spine_y(z) - 0.5 * _D["L1"] * s - 13.0 * s for z in (150.0, 0.0, -100.0)]
    bif_z = float(at(pos["L4"])[0][2])
    aorta_pts = np.array([[spine_x(150.0) + 14.0, y_ant[0] + 3, 150.0],
                          [spine_x(60.0) + 12.0, spine_y(60.0) - 0.5 * _D["T12"] * s - 12.0, 60.0],
                          [spine_x(0.0) + 12.0, y_ant[1], 0.0],
                          [spine_x(-60.0) + 10.0, spine_y(-60.0) - 0.5 * _D["L3"] * s - 13.0, -60.0],
                          [spine_x(bif_z) + 5.0, spine_y(bif_z) - 0.5 * _D["L4"] * s - 14.0, bif_z]])
    r_ao = (10.5 + 0.05 * (p.age - 50) + (1.0 if not female else 0.0)) * s
    b.add(*b.chain(BLOOD_A, aorta_pts, r_ao))
    ivc_pts = aorta_pts.copy()
    ivc_pts[:, 0] = [spine_x(z) - 24.0 * s for z in ivc_pts[:, 2]]
    ivc_pts[:, 1] += 2.0
    ivc_pts[-1, 2] = bif_z - 15.0
    b.add(*b.chain(BLOOD_V, ivc_pts[1:], 11.0 * s))
    hx = (86.0 + (5.0 if female else 0.0)) * s
    y_s1 = float(c_s1[1])
    hy = y_s1 - 24.0 * s
    for sd in (-1, 1):
        il = np.array([aorta_pts[-1], [sd * 30.0 * s, y_s1 - 40.0 * s, z_s1 + 5.0],
                       [sd * (hx - 15.0 * s), hy - 35.0 * s, z_hip + 5.0], [sd * (hx - 8.0 * s), hy - 38.0 * s,
                                                                           z_hip - 60.0]])
        b.add(*b.chain(BLOOD_A, il, [r_ao * 0.65, 5.5 * s, 4.5 * s, 4.0 * s]))
        ilv = il.copy()
        ilv[:, 0] -= sd * 4.0
        ilv[:, 1] += 6.0
        ilv[0] = ivc_pts[-1]
        b.add(*b.chain(BLOOD_V, ilv, [9.0 * s, 7.0 * s, 6.0 * s, 5.5 * s]))

    ns.hx, ns.hy, ns.kid_truth, ns.y_s1 = hx, hy, kid_truth, y_s1


def _bowel(ns: _Parts) -> None:
    """Colon along a fixed route, bladder, and small-bowel loops at random."""
    BLADDER, BOWEL_W, FLUID, GAS, STOOL, a_l1 = ns.BLADDER, ns.BOWEL_W, ns.FLUID, ns.GAS, ns.STOOL, ns.a_l1
    b, cav, cy, d_l1, depth, half_w, hy, rng = ns.b, ns.cav, ns.cy, ns.d_l1, ns.depth, ns.half_w, ns.hy, ns.rng
    s, t_sc, wall_t, y_s1, yc_l1, z_hip, z_s1 = ns.s, ns.t_sc, ns.wall_t, ns.y_s1, ns.yc_l1, ns.z_hip, ns.z_s1
    zs_ = ns.zs_
    # bowel: colon along a fixed route, small-bowel loops at random
    yc_mid = float(np.interp(-90.0, zs_, cy))
    a_mid = float(np.interp(-90.0, zs_, half_w)) - t_sc - wall_t
    d_mid = float(np.interp(-90.0, zs_, depth)) / 2 - t_sc - wall_t
    b.layer = 1
    colon = np.array([
        [-0.60 * a_mid, yc_mid + 0.05 * d_mid, z_s1 + 10.0], [-0.62 * a_mid, yc_mid + 0.15 * d_mid, -60.0],
        [-0.58 * a_l1, yc_l1 + 0.0, -15.0], [-0.3 * a_l1, yc_l1 - 0.6 * d_l1, -40.0],
        [0.1 * a_l1, yc_mid - 0.70 * d_mid, -75.0], [0.45 * a_l1, yc_l1 - 0.55 * d_l1, -20.0],
        [0.62 * a_l1, yc_l1 + 0.2 * d_l1, 25.0], [0.66 * a_mid, yc_mid + 0.25 * d_mid, -60.0],
        [0.62 * a_mid, yc_mid + 0.15 * d_mid, z_s1 + 10.0], [0.30 * a_mid, y_s1 - 35.0, z_hip + 20.0],
        [0.0, y_s1 + 10.0, z_hip + 10.0], [0.0, y_s1 + 25.0, z_hip - 40.0]])
    colon[:, :2] += rng.normal(0, 5.0, (len(colon), 2))
    r_col = 22.0 * s
    contents = rng.choice([GAS, STOOL, STOOL, GAS, FLUID], size=len(colon) - 1)
    for i in range(len(colon) - 1):
        b.add(Segment(BOWEL_W, colon[i], colon[i + 1], r_col, clip=cav))
    for i in range(len(colon) - 1):
        b.add(Segment(int(contents[i]), colon[i], colon[i + 1], r_col - 3.0, clip=cav))
    b.layer = 1
    bl_c = np.array([0.0, hy - 40.0 * s, z_hip + 5.0])
    bl_r = rng.uniform(25, 45) * s
    b.add(Ellipsoid(BOWEL_W, bl_c, np.array([bl_r + 3, bl_r * 0.8 + 3, bl_r * 0.8 + 3]), clip=cav))
    b.add(Ellipsoid(BLADDER, bl_c, np.array([bl_r, bl_r * 0.8, bl_r * 0.8]), clip=cav))
    for k in range(7):
        start = np.array([rng.uniform(-0.45, 0.45) * a_mid, yc_mid - rng.uniform(0.1, 0.6) * d_mid,
                          rng.uniform(z_s1, -20.0)])
        pts = [start]
        d = rng.normal(size=3)
        for _ in range(8):
            d = 0.6 * d + 0.8 * rng.normal(size=3)
            d /= np.linalg.norm(d)
            nxt = pts[-1] + d * 28.0
            nxt[0] = np.clip(nxt[0], -0.55 * a_mid, 0.55 * a_mid)
            nxt[1] = np.clip(nxt[1], yc_mid - 0.8 * d_mid, yc_mid + 0.1 * d_mid)
            nxt[2] = np.clip(nxt[2], z_hip + 30.0, -5.0)
            pts.append(nxt)
        parr = np.array(pts)
        r_sb = rng.uniform(10.0, 14.0) * s
        b.add(*b.chain(BOWEL_W, parr, r_sb, clip=cav))
        lum = [FLUID, FLUID, GAS, STOOL][int(rng.integers(0, 4))]
        b.add(*b.chain(lum, parr, r_sb - 2.5, clip=cav))


def _spinal_muscles(ns: _Parts) -> None:
    """Paraspinal, quadratus lumborum, psoas, gluteal and thigh muscles."""
    MUS, PARA, PSOAS, at, b, hx, hy = ns.MUS, ns.PARA, ns.PSOAS, ns.at, ns.b, ns.hx, ns.hy
    muscle_k, pos, s, spine_x, spine_y, x_th = ns.muscle_k, ns.pos, ns.s, ns.spine_x, ns.spine_y, ns.x_th
    y_th, z_bot, z_crest, z_crotch, z_hip, z_s1 = ns.y_th, ns.z_bot, ns.z_crest, ns.z_crotch, ns.z_hip, ns.z_s1
    z_top = ns.z_top
    # muscles along the spine
    b.layer = 4
    zz = np.arange(z_s1 - 40.0, z_top + 1.0, 20.0)
    zz_all = zz
    for sd, name in ((-1, "R"), (1, "L")):
        # paraspinal (erector spinae + multifidus), behind the transverse processes
        px = [spine_x(z) + sd * (30.0 * s + 2.0) for z in zz_all]
        py = []
        rx = []
        ry = []
        for z in zz_all:
            sy = spine_y(z)
            grow = np.clip((z_top - 60.0 - z) / 150.0, 0.3, 1.0)
            py.append(sy + 0.5 * _D["L1"] * s + 46.0 * s * muscle_k)
            rx.append((20.0 + 8.0 * grow) * s * muscle_k)
            ry.append((17.0 + 9.0 * grow) * s * muscle_k)
        b.add(ZStack(PARA, zz_all, px, py, rx, ry, n=2.2))
        # quadratus lumborum
        qz = np.array([z_crest, -60.0, 10.0])
        b.add(ZStack(MUS, qz, [spine_x(z) + sd * (55.0 * s + 0.5 * _W["L3"] * s) for z in qz],
                     [spine_y(z) + 22.0 * s for z in qz], np.array([16.0, 14.0, 6.0]) * s * muscle_k,
                     np.array([11.0, 10.0, 5.0]) * s * muscle_k))
        # psoas: from T12 down to the lesser trochanter, in front of the hip joint
        pz = np.array([float(at(pos["T12"])[0][2]), 0.0, float(at(pos["L3"])[0][2]), float(at(pos["L5"])[0][2]),
                       z_s1 - 30.0, z_hip, z_hip - 45.0])
        pxs = []
        pys = []
        for j, z in enumerate(pz[:4]):
            lv = ("T12", "L1", "L3", "L5")[j]
            pxs.append(spine_x(z) + sd * (0.5 * _W[lv] * s + (6.0 + 5.0 * j) * s * muscle_k))
            pys.append(spine_y(z) - 2.0 * s - 2.0 * j)
        pxs += [sd * (hx * 0.62), sd * (hx - 22.0 * s), sd * (hx - 18.0 * s)]
        pys += [hy - 5.0 * s, hy - 32.0 * s, hy - 18.0 * s]
        prx = np.array([5.0, 9.0, 16.0, 21.0, 24.0, 19.0, 14.0]) * s * muscle_k
        pry = np.array([5.0, 9.0, 15.0, 19.0, 20.0, 17.0, 14.0]) * s * muscle_k
        b.add(ZStack(PSOAS[name], pz, pxs, pys, prx, pry))
        # gluteal muscles behind / beside the pelvis
        gz = np.array([z_crotch - 15.0, z_hip - 20.0, z_s1 - 40.0, z_crest + 5.0])
        b.add(ZStack(MUS, gz, [sd * hx * 0.75, sd * hx * 0.8, sd * (hx + 10.0), sd * (hx + 25.0)],
                     [hy + 70.0 * s, hy + 65.0 * s, hy + 50.0 * s, hy + 35.0],
                     np.array([50.0, 58.0, 50.0, 22.0]) * s * muscle_k, np.array([38.0, 42.0, 32.0, 15.0]) * s
                     * muscle_k, n=2.2))
        # thigh muscles around the femur
        b.add(ZStack(MUS, [z_bot, z_crotch + 5.0, z_hip - 15.0], [sd * x_th * 0.97, sd * x_th * 0.97, sd * hx],
                     [y_th] * 3, np.array([70.0, 68.0, 40.0]) * s * muscle_k,
                     np.array([70.0, 68.0, 45.0]) * s * muscle_k))


def _vertebrae(ns: _Parts) -> None:
    """Every vertebra T6-L5 (and a lumbarised S1), superior to inferior."""
    b, p = ns.b, ns.p
    # ---------------------------------------------------------------- vertebrae
    verts: list[VertebraTruth] = []
    b.layer = 6
    deg = p.degeneration_level
    ns.deg, ns.verts = deg, verts
    for lv in ns.levels_b:
        _vertebra(ns, lv)


def _vertebra_tissues(ns: _Parts, lv: str) -> None:
    """A vertebra's frame, size, endplate shape (``hfun``) and tissues (cortex, core, islands, posterior)."""
    T, at, b, cort_ha, deg, ff, p, pos = ns.T, ns.at, ns.b, ns.cort_ha, ns.deg, ns.ff, ns.p, ns.pos
    post_ha, rng, s, variants, vb_lv, vrng = ns.post_ha, ns.rng, ns.s, ns.variants, ns.vb_lv, ns.vrng
    c, tan, rot = at(pos[lv])
    R = frame_from_axis(tan, rot)
    h0 = _H[lv] * s
    r_lv = vrng if lv == "S1" else rng  # the extra S1 never shifts the main stream
    a = 0.5 * _W[lv] * s * r_lv.uniform(0.96, 1.04)
    bb = 0.5 * _D[lv] * s * r_lv.uniform(0.96, 1.04)
    loss = p.height_loss.get(lv, 0.0)
    shape = p.fracture_shape.get(lv, "none")
    tc = p.cortical_mm * r_lv.uniform(0.9, 1.1)
    t_end = tc * (1.0 + 0.5 * deg.get(lv, 0.0))

    def hfun(un: Arr, vn: Arr, h0: float = h0, loss: float = loss, shape: str = shape,
             shrink: float = 0.0) -> tuple[Arr, Arr]:
        r2 = np.minimum(un * un + vn * vn, 1.0)
        if shape == "wedge":
            lf = loss * np.clip(0.5 - 0.5 * vn, 0.0, 1.0) + 0.1 * loss
        elif shape == "biconcave":
            lf = loss * (1.0 - r2) + 0.1 * loss
        elif shape == "crush":
            lf = loss + 0.0 * r2
        else:
            lf = loss * (1.0 - 0.5 * r2)
        hh = 0.5 * h0 * (1.0 - lf) - 0.6 * (1.0 - r2) * (1.0 + 2.0 * (shape == "biconcave")) - shrink
        return hh, hh

    tag = {lv, "spine", "bone"}
    CORT = T(f"{lv}_cortex", {"ha": cort_ha * (1.0 + 0.15 * deg.get(lv, 0.0)), "soft": 0.75}, "",
             tag | {f"{lv}_body", "cortical"})
    ha = vb_lv[lv] / 1000.0
    TRAB = T(f"{lv}_trabecular", _marrow(ha, ff), "marrow", tag | {f"{lv}_body", "trabecular"})
    b.trab[TRAB] = (vb_lv[lv], ff)
    islands = []
    for isl in p.bone_islands:
        if isl["level"] != lv:
            continue
        # its own label: ``<lv>_trabecular`` (hence the trabecular truth) never includes it
        ISL = T(f"{lv}_bone_island", {"ha": float(isl["density"]), "soft": 0.8}, "",
                tag | {f"{lv}_body", f"{lv}_bone_island", "bone_island", "cortical"})
        r_i = 0.5 * float(isl["diameter_mm"])
        lim = np.array([a - tc, bb - tc, 0.5 * h0 * (1.0 - loss) - tc]) - r_i - 1.0
        off = np.clip(np.asarray(isl["offset_mm"], float), -np.maximum(lim, 0.0), np.maximum(lim, 0.0))
        ctr = c + R @ off
        islands.append((ISL, ctr, r_i))
        variants.setdefault("bone_islands", []).append(
            {"level": lv, "centre_mm": tuple(float(q) for q in ctr), "offset_mm": tuple(float(q) for q in off),
             "diameter_mm": 2.0 * r_i, "density": float(isl["density"])})
    POST = T(f"{lv}_posterior", {"ha": post_ha, "soft": 0.95}, "", tag | {f"{lv}_posterior"})
    ns.CORT, ns.POST, ns.R, ns.TRAB, ns.a, ns.bb, ns.c, ns.h0 = CORT, POST, R, TRAB, a, bb, c, h0
    ns.hfun, ns.islands, ns.loss, ns.rot, ns.t_end, ns.tag, ns.tc = hfun, islands, loss, rot, t_end, tag, tc


def _vertebra_truth(ns: _Parts, lv: str) -> None:
    """A vertebra's truth (extent, heights, ribs) and the tissues of its ribs or alae."""
    R, T, a, bb, c, ff, h0, hfun = ns.R, ns.T, ns.a, ns.bb, ns.c, ns.ff, ns.h0, ns.hfun
    hypo_faint, hypo_len, lrib_len, post_ha = ns.hypo_faint, ns.hypo_len, ns.lrib_len, ns.post_ha
    rib_k, rib_mar, rot, sac_sides, tag, tc = ns.rib_k, ns.rib_mar, ns.rot, ns.sac_sides, ns.tag, ns.tc
    verts = ns.verts
    # truth
    thor_ = lv.startswith("T")
    corners = []
    for un, vn in ((1, 0), (-1, 0), (0, 1), (0, -1), (0.7, 0.7), (-0.7, -0.7), (0.7, -0.7), (-0.7, 0.7)):
        hh = hfun(np.array(float(un)), np.array(float(vn)))[0]
        for sg_ in (-1, 1):
            corners.append(c + R @ np.array([un * a, vn * bb, sg_ * float(hh)]))
    cz = np.array(corners)[:, 2]
    h_ant = 2 * float(hfun(np.array(0.0), np.array(-1.0))[0])
    h_mid = 2 * float(hfun(np.array(0.0), np.array(0.0))[0])
    h_post = 2 * float(hfun(np.array(0.0), np.array(0.9))[0])
    if thor_:
        kind = "hypoplastic" if (lv == "T12" and hypo_len) else "true"
        sides = tuple(k for k in ("R", "L") if hypo_len.get(k, 1.0) > 0.0) if kind == "hypoplastic" else ("R", "L")
    elif lv == "L1" and any(v > 0 for v in lrib_len.values()):
        kind, sides = "lumbar", tuple(k for k in ("R", "L") if lrib_len[k] > 0.0)
    else:
        kind, sides = "none", ()
    verts.append(VertebraTruth(label=lv, z_range_mm=(float(cz.min()), float(cz.max())),
                               centroid_mm=(float(c[0]), float(c[1]), float(c[2])),
                               body_height_mm=min(h_ant, h_mid, h_post), width_mm=2 * a, depth_mm=2 * bb,
                               has_ribs=bool(sides), axis=tuple(float(q) for q in R[:, 2]), rotation_deg=rot,
                               cortical_mm=tc, nominal_height_mm=h0, rib_kind=kind, rib_sides=sides,
                               sacral_like=bool(lv == "L5" and sac_sides)))

    RIBC = RIBT = LRC = LRT = ALA = None  # the rib / lumbar-rib / ala tissues of the levels that have them
    if thor_ and lv in _RIB:
        fnt = hypo_faint if (lv == "T12" and hypo_len) else 1.0
        RIBC = T(f"{lv}_rib_cortex", {"ha": 0.85 * rib_k * fnt, "soft": 0.8}, "", {f"{lv}_rib", "ribs", "bone"})
        RIBT = T(f"{lv}_rib_marrow", _marrow(rib_mar * fnt, ff), "marrow", {f"{lv}_rib", "ribs", "bone"})
    if lv == "L1" and lrib_len:
        LRC = T("L1_rib_cortex", {"ha": 0.85 * rib_k, "soft": 0.8}, "",
                {"L1_rib", "lumbar_rib", "ribs", "bone"})
        LRT = T("L1_rib_marrow", _marrow(rib_mar, ff), "marrow", {"L1_rib", "lumbar_rib", "ribs", "bone"})
    if lv == "L5" and sac_sides:
        ALA = T("L5_ala", {"ha": post_ha, "soft": 0.95}, "", tag | {"L5_posterior", "L5_ala", "sacral_ala"})
    reach = 130.0 if thor_ else 45.0  # ribs descend ~ 1-4 levels
    ns.ALA, ns.LRC, ns.LRT, ns.RIBC, ns.RIBT, ns.reach = ALA, LRC, LRT, RIBC, RIBT, reach


def _vertebra_solids(ns: _Parts, lv: str) -> None:
    """The disc below, the canal's contents, osteophytes, the body's cortex and core, bone islands."""
    CORT, CSF, DISC, R, TRAB, VFAT, a, at = ns.CORT, ns.CSF, ns.DISC, ns.R, ns.TRAB, ns.VFAT, ns.a, ns.at
    b, bb, c, deg, discs, h0, heights, hfun = ns.b, ns.bb, ns.c, ns.deg, ns.discs, ns.h0, ns.heights, ns.hfun
    islands, loss, pos, s, t_end, tc = ns.islands, ns.loss, ns.pos, ns.s, ns.t_end, ns.tc
    # disc below (fills gaps), canal contents, then bone
    dh = discs[lv]
    c_disc, tan_d, rot_d = at(pos[lv] - heights[lv] / 2 - dh / 2)
    Rd = frame_from_axis(tan_d, rot_d)
    b.layer = 5
    b.add(Prism(DISC, c_disc, Rd, a * 0.98, bb * 0.98, dh / 2 + 2.5, n=2.4, posterior_flat=0.12))
    canal_v = bb + 9.0 * s
    b.add(Prism(VFAT, c, R, 11.0 * s, 8.5 * s, h0 / 2 + dh + 1.0, v_offset=canal_v))
    b.add(Prism(CSF, c, R, 7.5 * s, 6.5 * s, h0 / 2 + dh + 1.0, v_offset=canal_v + 0.5))
    b.layer = 6
    if deg.get(lv, 0.0) > 0.5:  # osteophyte rims at both endplates
        osz = (deg[lv] - 0.5) * 7.0 * s
        for sgn in (-1.0, 1.0):
            co = c + R @ np.array([0.0, 0.0, sgn * (0.5 * h0 * (1 - 0.3 * loss) - 1.5)])
            b.add(Prism(CORT, co, R, a + osz, bb + 0.6 * osz, 2.2, n=2.4))
    b.add(Prism(CORT, c, R, a, bb, hfun, n=2.4, posterior_flat=0.12))
    b.add(Prism(TRAB, c, R, a - tc, bb - tc, lambda un, vn, hf=hfun, te=t_end: hf(un, vn, shrink=te),
                n=2.4, posterior_flat=0.12))
    for ISL, ctr, r_i in islands:
        b.add(Ellipsoid(ISL, ctr, np.full(3, r_i)))


def _posterior_elements(ns: _Parts, lv: str) -> None:
    """Pedicles, laminae, articular and transverse processes (lumbar rib, sacral ala), spinous process."""
    ALA, LRC, LRT, POST, R, a, at, b, bb = ns.ALA, ns.LRC, ns.LRT, ns.POST, ns.R, ns.a, ns.at, ns.b, ns.bb
    c, h0, lrib_len, rib_t, s, s_sac = ns.c, ns.h0, ns.lrib_len, ns.rib_t, ns.s, ns.s_sac
    sac_sides, sd_name = ns.sac_sides, ns.sd_name
    # posterior elements (local coordinates -> world)
    def W(u_: float, v_: float, w_: float, c: Arr = c, R: Arr = R) -> Arr:
        return c + R @ np.array([u_, v_, w_])
    rp = _PED[lv] * s
    pu = a * 0.62
    thor = lv.startswith("T")
    for sd in (-1.0, 1.0):
        for dw in (-0.24 * h0, 0.0, 0.2 * h0):
            b.add(Segment(POST, W(sd * pu, bb * 0.7, dw), W(sd * pu, bb + 13.0 * s, dw), rp))
        lam_a = W(sd * pu, bb + 14.0 * s, 0.0)
        lam_b = W(sd * 2.0, bb + 24.0 * s, -2.0)
        for dw in (-0.3 * h0, 0.0, 0.3 * h0):
            b.add(Segment(POST, lam_a + R[:, 2] * dw, lam_b + R[:, 2] * dw, 3.6 * s))
        # articular processes
        b.add(Ellipsoid(POST, W(sd * (pu + 2.0 * s), bb + 17.0 * s, 0.55 * h0), np.array([5.0, 6.5, 8.0]) * s,
                        R=R))
        b.add(Ellipsoid(POST, W(sd * (pu - 1.0 * s), bb + 21.0 * s, -0.55 * h0 - 2.0),
                        np.array([5.0, 6.0, 8.0]) * s, R=R))
        # transverse process
        if thor:
            tp_end = W(sd * (pu + _TP[lv] * s), bb + 25.0 * s, 2.0)
            b.add(Segment(POST, W(sd * pu, bb + 14.0 * s, 2.0), tp_end, 5.0 * s, 4.0 * s))
        else:
            tp_root = W(sd * pu, bb + 13.0 * s, 0.0)
            tp_end = W(sd * (pu + _TP[lv] * s), bb + 9.0 * s, 0.0)
            b.add(Segment(POST, tp_root, tp_end, 4.5 * s, 3.2 * s))
            if lv == "L1" and lrib_len.get(sd_name[sd], 0.0) > 0.0:
                # lumbar rib: starts beyond the transverse-process tip (a pseudo-joint ~1 mm wide),
                # runs laterally, a little down and forward; no joint with the vertebral body
                tdir = (tp_end - tp_root) / max(float(np.linalg.norm(tp_end - tp_root)), 1e-6)
                r_lr = 3.4 * s
                st = tp_end + tdir * (3.2 * s + 1.0 + r_lr)
                ldir = np.array([sd * 0.86, -0.22, -0.46])
                ldir /= np.linalg.norm(ldir)
                L_ = lrib_len[sd_name[sd]]
                lpts = np.array([st, st + ldir * 0.5 * L_, st + ldir * L_ + np.array([0.0, -0.12 * L_, 0.0])])
                b.add(*b.chain(LRC, lpts, np.array([r_lr, 3.0 * s, 2.4 * s])))
                b.add(*b.chain(LRT, lpts, np.maximum(np.array([r_lr, 3.0 * s, 2.4 * s]) - rib_t, 0.6)))
            if lv == "L5" and sd_name[sd] in sac_sides:
                # sacralised L5: the transverse process widens into an ala that reaches the sacral
                # ala and the ilium at the sacro-iliac joint (Castellvi type III on this side)
                c_top, _, _ = at(s_sac - 9.0 * s)
                tgt = np.array([c_top[0] + sd * (52.0 * s + 4.0), c_top[1] + 9.0 * s, c_top[2] + 8.0 * s])
                b.add(Segment(ALA, tp_root, tgt, 8.0 * s, 10.0 * s))
                b.add(Ellipsoid(ALA, tgt, np.array([15.0, 11.0, 9.0]) * s))
    # spinous process: a tall plate (three stacked capsules)
    if thor:
        sp_a, sp_b = W(0.0, bb + 24.0 * s, -2.0), W(0.0, bb + 52.0 * s, -28.0 * s)
    else:
        sp_a, sp_b = W(0.0, bb + 24.0 * s, -2.0), W(0.0, bb + 52.0 * s, -6.0 * s)
    for dw, rr in ((-6.0, 3.4), (0.0, 3.8), (6.0, 3.2)):
        b.add(Segment(POST, sp_a + R[:, 2] * dw * s, sp_b + R[:, 2] * dw * s, rr * s))
    ns.W, ns.pu, ns.thor = W, pu, thor


def _ribs(ns: _Parts, lv: str) -> None:
    """A thoracic level's ribs: head at the body, neck to the transverse process, shaft around the chest."""
    CART, RIBC, RIBT, W, a, b, bb, cy = ns.CART, ns.RIBC, ns.RIBT, ns.W, ns.a, ns.b, ns.bb, ns.cy
    depth, h0, half_w, hypo_len, hypo_r, pu = ns.depth, ns.h0, ns.half_w, ns.hypo_len, ns.hypo_r, ns.pu
    rib_t, s, sd_name, spine_x, t_sc, thor = ns.rib_t, ns.s, ns.sd_name, ns.spine_x, ns.t_sc, ns.thor
    zs_ = ns.zs_
    # ribs (T-levels): head at the body, neck to the transverse process, shaft around the chest
    if thor and lv in _RIB:
        az_end, drop = _RIB[lv]
        for sd in (-1.0, 1.0):
            head = W(sd * (a * 0.92), bb * 0.55, 0.35 * h0)
            tub = W(sd * (pu + _TP[lv] * s - 2.0), bb + 24.0 * s, 4.0)
            zr = float(tub[2])
            z_end = zr - drop * s
            hw = min(float(np.interp(zr, zs_, half_w)), float(np.interp(z_end, zs_, half_w))) - t_sc - 14.0 * s
            hd = min(float(np.interp(zr, zs_, depth)), float(np.interp(z_end, zs_, depth))) / 2 - t_sc - 16.0 * s
            ycr = float(np.interp(zr, zs_, cy)) - 6.0
            # posterior angle of the rib cage: start where the cage passes the tubercle
            az0 = float(np.arctan2(abs(tub[0]) / hw, max((tub[1] - ycr) / hd, 0.05)))
            azs = np.deg2rad(np.linspace(np.rad2deg(az0) + 8.0, az_end, 9))
            frac = (azs - azs[0]) / max(azs[-1] - azs[0], 1e-6)
            ribpts = [head, tub]
            for az, fr in zip(azs, frac):
                bulge = 1.0 + 0.06 * np.sin(np.pi * fr)
                zi = zr - drop * s * fr ** 1.9 - 4.0 * fr
                # the cage follows the body outline at the rib's current height
                hwi = min(hw, float(np.interp(zi, zs_, half_w)) - t_sc - 14.0 * s)
                hdi = min(hd, float(np.interp(zi, zs_, depth)) / 2 - t_sc - 16.0 * s)
                yci = float(np.interp(zi, zs_, cy)) - 6.0
                yc_ = ycr * (1 - fr) + yci * fr
                ribpts.append(np.array([spine_x(zr) * (1 - fr) + sd * hwi * bulge * np.sin(az),
                                        yc_ + hdi * bulge * np.cos(az), zi]))
            rp_ = np.array(ribpts)
            rr = np.full(len(rp_), 4.6 * s)
            rr[0] = 5.5 * s
            rr[-1] = 3.8 * s
            if lv == "T12" and hypo_len:
                free = hypo_len[sd_name[sd]]
                if free <= 0.0:
                    continue  # one-sided hypoplasia: no rib on this side
                rp_, rr = _truncate(rp_, rr, float(np.linalg.norm(tub - head)) + free)
                rr = rr * hypo_r
            b.add(*b.chain(RIBC, rp_, rr))
            b.add(*b.chain(RIBT, rp_, np.maximum(rr - rib_t, 0.5)))
            if az_end > 120.0:  # costal cartilage toward the sternum
                end = rp_[-1]
                tip = np.array([sd * 25.0 * s, end[1] + 4.0, end[2] + 35.0])
                b.add(*b.chain(CART, np.array([end, tip]), 4.0 * s))


def _sacrum_and_pelvis(ns: _Parts) -> None:
    """The sacrum, the pelvis' tissues, the hip joints' shared draws; then each side's ilium and femur."""
    CSF, T, at, b, cort_ha, female, ff, rng = ns.CSF, ns.T, ns.at, ns.b, ns.cort_ha, ns.female, ns.ff, ns.rng
    s, s_sac, trans, vbase = ns.s, ns.s_sac, ns.trans, ns.vbase
    # ---------------------------------------------------------------- sacrum and pelvis
    SAC_C = T("sacrum_cortex", {"ha": cort_ha * 0.85, "soft": 0.8}, "", {"sacrum", "pelvis", "bone"})
    SAC_T = T("sacrum_trabecular", _marrow(vbase["L5"] * 0.85 / 1000.0, ff), "marrow",
              {"sacrum", "pelvis", "bone", "trabecular"})
    b.trab[SAC_T] = (vbase["L5"] * 0.85, ff)
    sac_w = [52.0, 46.0, 36.0, 26.0, 17.0, 10.0]
    sac_d = [19.0, 16.0, 13.0, 10.0, 8.0, 6.0]
    k0 = 1 if trans == "lumbarised_s1" else 0  # lumbarised: S1 is free, the sacrum starts at S2
    for k in range(k0, 6):
        sk = s_sac - 9.0 * s - (k - k0) * 19.0 * s
        ck, tk, _ = at(sk)
        Rk = frame_from_axis(tk, 0.0)
        b.add(Prism(SAC_C, ck, Rk, sac_w[k] * s, sac_d[k] * s, 10.5 * s, n=2.6))
        b.add(Prism(SAC_T, ck, Rk, sac_w[k] * s - 1.8, sac_d[k] * s - 1.8, 9.0 * s, n=2.6))
        if k < 4:
            b.layer = 7
            b.add(Prism(CSF, ck, Rk, 9.0 * s * (1 - 0.2 * k), 4.5 * s, 10.6 * s, v_offset=sac_d[k] * s * 0.45))
            b.layer = 6
    PEL_C = T("pelvis_cortex", {"ha": cort_ha * 0.9, "soft": 0.8}, "", {"pelvis", "bone", "cortical"})
    PEL_T = T("pelvis_trabecular", _marrow(vbase["femur_troch"] * 0.75 / 1000.0, ff), "marrow",
              {"pelvis", "bone", "trabecular"})
    b.trab[PEL_T] = (vbase["femur_troch"] * 0.75, ff)
    PLATE = T("iliac_wing", {"ha": 0.30 + 0.9 * vbase["femur_troch"] / 1000.0, "soft": 0.95}, "",
              {"pelvis", "bone"})
    heads: dict[str, tuple[float, float, float]] = {}
    necks: dict[str, dict[str, Any]] = {}
    rh = (23.8 if not female else 21.6) * s * rng.uniform(0.96, 1.04)
    nsa = float(np.clip(rng.normal(125.5, 5.5), 112.0, 140.0))
    version = float(np.clip(rng.normal(12.0, 7.0), -5.0, 30.0))
    ns.PEL_C, ns.PEL_T, ns.PLATE, ns.heads, ns.necks, ns.nsa = PEL_C, PEL_T, PLATE, heads, necks, nsa
    ns.rh, ns.sac_w, ns.version = rh, sac_w, version
    for sd, name in ((-1, "R"), (1, "L")):
        _hip_bone(ns, sd, name)
        _femur(ns, sd, name)


def _hip_bone(ns: _Parts, sd: int, name: str) -> None:
    """One side's iliac wing, ilium, acetabulum, rami and hip joint space."""
    JOINT, PEL_C, PEL_T, PLATE, b, hx, hy = ns.JOINT, ns.PEL_C, ns.PEL_T, ns.PLATE, ns.b, ns.hx, ns.hy
    rh, s, sac_w, y_s1, z_crest, z_hip, z_s1 = ns.rh, ns.s, ns.sac_w, ns.y_s1, ns.z_crest, ns.z_hip, ns.z_s1
    H = np.array([sd * hx, hy, z_hip])
    b.layer = 6
    # iliac wing: part of an ellipsoidal shell, from the sacro-iliac joint to the ASIS
    wc = np.array([sd * 22.0 * s, hy + 8.0 * s, z_hip + 10.0 * s])
    wr = np.array([hx + 38.0 * s, 78.0 * s, (z_crest - z_hip) + 10.0 * s])
    zr_w = (z_hip + 22.0, z_crest)
    if sd < 0:  # arctan2 wraps at +-180 deg: the right wing's sector is split in two
        b.add(Shell(PLATE, wc, wr, 7.0 * s, (float(np.deg2rad(108.0)), float(np.pi)), zr_w))
        b.add(Shell(PLATE, wc, wr, 7.0 * s, (float(-np.pi), float(np.deg2rad(-168.0))), zr_w))
    else:
        b.add(Shell(PLATE, wc, wr, 7.0 * s, (float(np.deg2rad(-12.0)), float(np.deg2rad(72.0))), zr_w))
    # posterior ilium near the SI joint and the ilium body above the acetabulum
    si = np.array([sd * (sac_w[0] * s + 8.0), y_s1 + 12.0 * s, z_s1 - 22.0 * s])
    b.add(Segment(PEL_C, si + np.array([0, 0, 30.0 * s]), si - np.array([0, 0, 28.0 * s]), 13.0 * s))
    b.add(Segment(PEL_T, si + np.array([0, 0, 30.0 * s]), si - np.array([0, 0, 28.0 * s]), 10.5 * s))
    body_pts = np.array([si - np.array([0, 0, 10.0 * s]), H + np.array([-sd * 2.0, 10.0 * s, 28.0 * s])])
    b.add(*b.chain(PEL_C, body_pts, [14.0 * s, 20.0 * s]))
    b.add(*b.chain(PEL_T, body_pts, [11.5 * s, 17.5 * s]))
    # acetabulum: a cup open laterally-inferiorly (the neck leaves through the opening)
    cup_n = np.array([sd * 0.85, 0.0, -0.55])
    b.add(HalfSpaceCut(Ellipsoid(PEL_C, H + np.array([sd * -4.0, 3.0, 6.0]),
                                 np.array([rh + 11.0, rh + 13.0, rh + 14.0])), H, cup_n, 0.45 * rh))
    b.add(HalfSpaceCut(Ellipsoid(PEL_T, H + np.array([sd * -4.0, 3.0, 6.0]),
                                 np.array([rh + 8.5, rh + 10.5, rh + 11.5])), H, cup_n, 0.45 * rh - 2.5))
    # rami
    sym = np.array([sd * 9.0 * s, hy - 58.0 * s, z_hip - 28.0 * s])
    tub = np.array([sd * (hx - 30.0 * s), hy + 22.0 * s, z_hip - 58.0 * s])
    for pts, r in ((np.array([H + np.array([-sd * 18.0, -20.0, -6.0]) * s, sym]), 9.0 * s),
                   (np.array([sym + np.array([0, 5.0, -14.0 * s]), tub]), 7.0 * s),
                   (np.array([H + np.array([-sd * 10.0, 22.0, -18.0]) * s, tub]), 11.0 * s)):
        b.add(*b.chain(PEL_C, pts, r))
        b.add(*b.chain(PEL_T, pts, r - 2.0))
    b.layer = 7
    b.add(Ellipsoid(JOINT, H, np.array([rh + 2.2] * 3)))
    ns.H = H


def _femur(ns: _Parts, sd: int, name: str) -> None:
    """One side's femur (head, neck, trochanters, shaft) and its truth."""
    H, T, b, female, ff, heads, necks, nsa = ns.H, ns.T, ns.b, ns.female, ns.ff, ns.heads, ns.necks, ns.nsa
    p, rh, rng, s, vbase, version = ns.p, ns.rh, ns.rng, ns.s, ns.vbase, ns.version
    b.layer = 8
    # femur
    FC = T(f"femur_{name}_cortex", {"ha": 0.80 + 0.12 * min(vbase["femur_neck"] / 180.0, 1.2), "soft": 0.75},
           "", {f"femur_{name}", "femur", "bone", "cortical"})
    FN = T(f"femur_{name}_neck_trabecular", _marrow(vbase["femur_neck"] / 1000.0, ff), "marrow",
           {f"femur_{name}", "femur", "bone", "trabecular", f"femur_{name}_neck"})
    FT = T(f"femur_{name}_troch_trabecular", _marrow(vbase["femur_troch"] / 1000.0, ff), "marrow",
           {f"femur_{name}", "femur", "bone", "trabecular", f"femur_{name}_troch"})
    FM = T(f"femur_{name}_medullary", {"fat": 0.90, "soft": 0.08}, "", {f"femur_{name}", "femur", "bone"})
    b.trab[FN] = (vbase["femur_neck"], ff)
    b.trab[FT] = (vbase["femur_troch"], ff)
    beta = np.deg2rad(8.0)
    u_dist = np.array([-sd * np.sin(beta), 0.0, -np.cos(beta)])
    ang = np.deg2rad(180.0 - nsa) - beta  # neck axis from vertical, toward medial
    vv = np.deg2rad(version)
    n_ax = np.array([-sd * np.sin(ang) * np.cos(vv), -np.sin(vv), np.cos(ang) * np.cos(vv)])
    n_ax /= np.linalg.norm(n_ax)
    Ln = 52.0 * s * rng.uniform(0.94, 1.06)
    B = H - Ln * n_ax
    rn = (16.0 if not female else 14.5) * s
    tcort = p.cortical_mm
    shaft_top = B - u_dist * 12.0
    shaft_end = B + u_dist * 420.0
    rs = (14.5 if not female else 13.0) * s
    gt = B + np.array([sd * 22.0 * s, 6.0 * s, 12.0 * s])
    lt = B + u_dist * 38.0 * s + np.array([-sd * 14.0 * s, 10.0 * s, 0.0])
    outer = [Ellipsoid(FC, H, np.array([rh] * 3)), Segment(FC, H, B, rn * 0.95, rn * 1.1),
             Ellipsoid(FC, B + u_dist * 8.0, np.array([24.0, 21.0, 28.0]) * s),
             Ellipsoid(FC, gt, np.array([15.0, 17.0, 24.0]) * s),
             Ellipsoid(FC, lt, np.array([9.0, 9.0, 12.0]) * s),
             Segment(FC, shaft_top, B + u_dist * 60.0 * s, 20.0 * s, rs),
             Segment(FC, B + u_dist * 60.0 * s, shaft_end, rs, rs * 0.95)]
    b.add(*outer)
    # intertrochanteric / trochanteric cortex thickened like the neck's (total hip > neck)
    b.add(Segment(FT, shaft_top, B + u_dist * 60.0 * s, 20.0 * s - 3.5 * tcort, rs - 4.0 * tcort),
          Ellipsoid(FT, B + u_dist * 8.0, np.array([24.0, 21.0, 28.0]) * s - 2.3 * tcort),
          Ellipsoid(FT, gt, np.array([15.0, 17.0, 24.0]) * s - 2.0 * tcort),
          Ellipsoid(FT, lt, np.array([9.0, 9.0, 12.0]) * s - 1.8 * tcort))
    b.add(Segment(FM, B + u_dist * 75.0 * s, shaft_end, rs - 5.5 * tcort, rs * 0.95 - 5.5 * tcort))
    # femoral-neck cortex ~1.5 mm (inferior 2-4 mm, superior thinner): ~1.8x the vertebral shell,
    # which puts young-adult femoral-neck aBMD near the NHANES III mean (0.858 g/cm2)
    b.add(Segment(FN, H, B + n_ax * 8.0, rn * 0.95 - 1.7 * tcort, rn * 1.1 - 1.9 * tcort),
          Ellipsoid(FN, H, np.array([rh - 1.4 * tcort] * 3)))
    heads[name] = (float(H[0]), float(H[1]), float(H[2]))
    necks[name] = {"head": H.tolist(), "base": B.tolist(), "axis": n_ax.tolist(), "radius": rn,
                   "length": Ln, "shaft_axis": u_dist.tolist(), "neck_shaft_deg": nsa,
                   "version_deg": version, "head_radius": rh,
                   "greater_trochanter": gt.tolist(), "lesser_trochanter": lt.tolist()}


def _finish(ns: _Parts) -> Scene:
    """Skeleton scaling, texture waves, the couch, and the Scene with its truth and variants."""
    TABLE_FOAM, TABLE_SHELL, arm_r, at, b, back = ns.TABLE_FOAM, ns.TABLE_SHELL, ns.arm_r, ns.at, ns.b, ns.back
    body_bounds_z, cy, depth, ff, half_w, heads = ns.body_bounds_z, ns.cy, ns.depth, ns.ff, ns.half_w, ns.heads
    kid_truth, lrib_len, necks, p, r_th, rng = ns.kid_truth, ns.lrib_len, ns.necks, ns.p, ns.r_th, ns.rng
    s_sac, sac_sides, t_sc, trans, variants = ns.s_sac, ns.sac_sides, ns.t_sc, ns.trans, ns.variants
    verts, x_th, y_table, yc_l1, z_bot, z_crest = ns.verts, ns.x_th, ns.y_table, ns.yc_l1, ns.z_bot, ns.z_crest
    z_crotch, z_hip, z_s1, z_top, zd_l, zd_r = ns.z_crotch, ns.z_hip, ns.z_s1, ns.z_top, ns.zd_l, ns.zd_r
    zs_ = ns.zs_
    # ---------------------------------------------------------------- skeleton attenuation intervention
    k_sk = float(p.skeleton_scale)
    if k_sk != 1.0:
        _scale_skeleton(b, k_sk, ff)
    # ---------------------------------------------------------------- texture waves
    lam_lo = 2.2 + 1.5 * (1.0 - p.texture)
    lam_hi = 3.8 + 3.5 * (1.0 - p.texture)
    K = 10
    dirs = rng.normal(size=(K, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    kk = dirs * (2 * np.pi / rng.uniform(lam_lo, lam_hi, size=K))[:, None]
    phi = rng.uniform(0, 2 * np.pi, size=K)
    amp = 0.10 + 0.22 * (1.0 - p.texture)

    # CT couch under the back
    table = [TableSlab(TABLE_SHELL, y_table, 48.0, 230.0, 900.0, (z_bot - 200.0, z_top + 200.0)),
             TableSlab(TABLE_FOAM, y_table + 3.0, 42.0, 226.0, 900.0, (z_bot - 200.0, z_top + 200.0))]

    xb = float(max(np.max(half_w), x_th + r_th))
    if p.arms_down:
        xb = float(max(xb, 0.93 * float(np.max(half_w[2:])) + 2.0 * arm_r + 4.0))
    scene = Scene(patient=p, vertebrae=[v for v in verts if v.label in CORE_LEVELS],
                  femoral_heads=heads, femoral_necks=necks, all_vertebrae=verts,
                  landmarks={"z_s1": z_s1, "z_hip": z_hip, "z_iliac_crest": z_crest, "z_crotch": z_crotch,
                             "y_table": y_table, "diaphragm_z": (zd_r, zd_l), "kidneys": kid_truth,
                             "subcutaneous_fat_mm": t_sc, "body_half_width_l1": float(np.interp(0.0, zs_, half_w)),
                             "body_depth_l1": float(np.interp(0.0, zs_, depth)),
                             "body_centre_y_l1": yc_l1, "z_sacrum_top": float(at(s_sac)[0][2])},
                  prims=b.ordered(), table_prims=table, bone_start=b.n_below(5), tissues=b.t, trabecular=b.trab, waves=(kk, phi, amp),
                  variants=variants)
    variants.setdefault("bone_islands", [])
    variants["n_rib_pairs"] = 12 + int(any(v > 0 for v in lrib_len.values()))
    variants["lowest_rib_level"] = "L1" if any(v > 0 for v in lrib_len.values()) else "T12"
    variants["n_free_lumbar_type"] = 6 if trans == "lumbarised_s1" else 5
    variants["castellvi"] = ("III" + ("b" if len(sac_sides) == 2 else "a")) if sac_sides else ""
    scene._body_bounds = ((-xb, xb), (float(np.min((cy - depth / 2)[2:])), float(np.max(back[2:]))),
                          body_bounds_z)
    return scene
