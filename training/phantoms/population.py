"""Synthetic patients: demographics and bone state, deterministic from ``(seed, index)``.

The model follows clinical-physics.md section 6 (suggested model, [C/R]):

* age uniform 20-90, sex 50/50;
* trabecular vBMD (mg/cm3 HA) of L1 for women: 180 at 25, -1.3/yr, an extra
  -2.0/yr during the 7 years after menopause (age N(50, 3)); men: 175 at 25,
  -1.2/yr. Between-person SD 28 mg/cm3 (a latent bone-strength z shared by all
  sites, correlation ~0.8 between spine and hip). Other levels vary by a few %.
* proximal-femur trabecular vBMD (neck, trochanter) follow the same latent z
  with a gentler age slope (DXA femur -0.3 %/yr women, -0.5 %/yr men).
* marrow fat fraction rises from ~0.30 at 25 by ~0.45 %/yr (more after
  menopause) and is higher at low vBMD (it biases single-energy QCT low,
  Laval-Jeantet 1986).
* scoliosis (Cobb > 10 deg, SRS) prevalence rises logistically from ~2 % at
  30 to ~30 % at 85 (degenerative de-novo lumbar scoliosis).
* vertebral fractures: probability of >= 1 prevalent fracture rises at low
  vBMD and with age; the level follows the thoracolumbar predominance
  (T12/L1 most common); Genant grade from height loss (section 5).
* degeneration 0..1 rises with age, mostly L4-L5; it adds osteophytes and
  endplate sclerosis (raising projected aBMD) and narrows discs.

5-year fracture outcome (documented model, FRAX-like hazard):
``lambda = 0.0019/yr x 1.5^(-T) x 1.3^((age-65)/10) x 2.0^[prior vertebral fracture]
x (0.7 if male) x 1.15^[(22-BMI)/4 if BMI < 22]``, with ``T`` the spine-vBMD
T-like score ``(vBMD_L1 - 180) / 28``; relative risks after Marshall et al.
1996 (~1.5 per SD for any fracture), Klotzbuecher 2000 (prior fracture ~2x), Kanis 2007
(age, BMI). ``P(fracture within 5 y) = 1 - exp(-5 lambda)``; the outcome is a
Bernoulli draw of that probability. This gives ~4 % for a 68-year-old woman,
matching the 3.9 % 5-year rate of seed 003's OSTPRE cohort.

Anatomical variants (clinical-physics.md section 7; issue 14): drawn from an
**independent** stream ``default_rng([seed, index, 7919])`` after every other
field, so each older field of each patient is bit-identical to the cohort
before variants existed; each can be forced by a :func:`make_patient` keyword.

* ``transitional``: ``"sacralised_l5"`` 12.3 %, ``"lumbarised_s1"`` 4.0 %,
  else ``"none"`` (Skeletal Radiol 2025, 551 whole-spine CTs).
* ``t12_ribs``: ``"hypoplastic"`` 12.6 % overall, correlated with
  sacralisation (35 % of sacralised patients, ~9.5 % of the others).
* ``lumbar_rib`` (a 13th rib pair on L1's transverse processes): ~2 % overall,
  correlated with lumbarisation (20 % of lumbarised patients, 1.25 % of others).
* ``bone_islands``: ~5 % of patients carry one enostosis in T10-L5 (L1 weighted
  3x): ``{"level", "offset_mm": (dx, dy, dz) from the trabecular centre in the
  vertebra's own frame, "diameter_mm": 3-10, "density": HA g/cm3 (~cortical,
  0.5-1.0, i.e. ~600-1450 HU at 120 kVp)}``.
* ``skeleton_scale`` (default 1.0, never drawn): multiplies every bone mineral
  density of the scene (the "skeleton attenuation x 0.8 / x 0.6" intervention).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

#: vertebral levels carried by every patient, superior to inferior
LEVELS: tuple[str, ...] = ("T6", "T7", "T8", "T9", "T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5")
#: the levels of the issue's contract (T10..L5)
CORE_LEVELS: tuple[str, ...] = ("T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5")
LUMBAR: tuple[str, ...] = ("L1", "L2", "L3", "L4")
#: fields drawn before anatomical variants existed (bit-identical to that cohort)
VARIANT_FIELDS: tuple[str, ...] = ("t12_ribs", "lumbar_rib", "transitional", "bone_islands", "skeleton_scale")
TRANSITIONAL: tuple[str, ...] = ("none", "sacralised_l5", "lumbarised_s1")
T12_RIBS: tuple[str, ...] = ("normal", "hypoplastic")
#: levels that can carry a bone island and their relative weights (L1 enriched)
ISLAND_LEVELS: dict[str, float] = {"T10": 1.0, "T11": 1.0, "T12": 1.0, "L1": 3.0, "L2": 1.0, "L3": 1.0,
                                   "L4": 1.0, "L5": 1.0}
#: variant rates (clinical-physics.md section 7)
P_SACRALISED, P_LUMBARISED = 0.123, 0.040
P_HYPOPLASTIC_12 = 0.126
P_HYPO_GIVEN_SACRAL = 0.35
P_LUMBAR_RIB = 0.02
P_LRIB_GIVEN_LUMBARISED = 0.20
P_BONE_ISLAND = 0.05

#: young-adult (age 25) L1 trabecular vBMD mean and between-person SD (mg/cm3)
VBMD_YOUNG = {"F": 180.0, "M": 175.0}
VBMD_SD = 28.0
#: relative vBMD of each level to L1 (thoracic slightly denser, lower lumbar slightly less)
_LEVEL_FACTOR = {"T6": 1.10, "T7": 1.09, "T8": 1.08, "T9": 1.07, "T10": 1.06, "T11": 1.04,
                 "T12": 1.02, "L1": 1.00, "L2": 0.99, "L3": 0.98, "L4": 0.97, "L5": 0.97}
#: where prevalent osteoporotic vertebral fractures occur (relative weights)
_FX_WEIGHT = {"T6": 0.04, "T7": 0.06, "T8": 0.07, "T9": 0.06, "T10": 0.06, "T11": 0.10,
              "T12": 0.19, "L1": 0.18, "L2": 0.09, "L3": 0.07, "L4": 0.05, "L5": 0.03}
#: share of degeneration by level (lower lumbar first)
_DEG_WEIGHT = {"T6": 0.2, "T7": 0.2, "T8": 0.2, "T9": 0.2, "T10": 0.25, "T11": 0.3, "T12": 0.35,
               "L1": 0.45, "L2": 0.6, "L3": 0.75, "L4": 0.95, "L5": 1.0}


@dataclass
class Patient:
    """One synthetic patient; every field is deterministic from ``(seed, index)``.

    Attributes
    ----------
    patient_id, index, seed : str, int, int
        ``patient_id`` is ``"VC<seed>-<index>"`` (no real identifiers).
    age : float
        Years, 20-90.
    sex : str
        ``"F"`` or ``"M"``.
    height_cm, weight_kg : float
        Body size; ``bmi`` is derived.
    vbmd : dict of str to float
        Trabecular vBMD (mg/cm3 HA) per level ``"T6".."L5"`` plus ``"femur_neck"``
        and ``"femur_troch"``.
    marrow_fat : float
        Fat fraction (0-1) of the marrow filling the trabecular spaces.
    cortical_mm : float
        Vertebral cortical shell thickness as rendered (mm); the femoral neck
        cortex is ``2 x`` and the diaphysis ``6 x`` this.
    texture : float
        Microarchitecture 0 (degraded, coarse, heterogeneous) .. 1 (well connected).
    cobb_deg, scoliosis : float, bool
        Coronal Cobb angle; ``scoliosis`` when > 10 deg.
    scoliosis_apex : str
        Apex level of the curve; ``scoliosis_side`` +1 convex to the patient's left, -1 right.
    fracture_grade : dict of str to int
        Genant grade 0-3 per level.
    height_loss : dict of str to float
        Fractional body height loss per level (drives the grade).
    fracture_shape : dict of str to str
        ``"wedge"``, ``"biconcave"`` or ``"crush"`` for fractured levels.
    degeneration : float
        0-1 overall (osteophytes / sclerosis / disc narrowing); ``degeneration_level``
        per level.
    lordosis_deg : float
        Supine lumbar lordosis T12-S1.
    fracture_5y, fracture_5y_prob : bool, float
        5-year fracture outcome and its modelled probability (module docstring).
    bone_z : float
        Latent bone-strength z-score (shared by all sites).
    menopause_age : float
        For women; NaN for men.
    anatomy_seed, size_factor : int, float
        Seed of the anatomical details; body-size scale of the skeleton.
    arms_down : bool
        Arms lie beside the torso (in the CT field of view) instead of raised (~15 %).
    t12_ribs : str
        ``"normal"`` or ``"hypoplastic"`` (short, thin, faint 12th ribs, sometimes one side only).
    lumbar_rib : bool
        A rudimentary 13th rib pair on L1, articulating with L1's transverse-process tips.
    transitional : str
        ``"none"``, ``"sacralised_l5"`` or ``"lumbarised_s1"`` (:data:`TRANSITIONAL`).
    bone_islands : list of dict
        Enostoses (module docstring); empty for most patients.
    skeleton_scale : float
        Multiplier of every bone mineral density of the scene (1.0 = as drawn).
    """

    patient_id: str
    index: int
    seed: int
    age: float
    sex: str
    height_cm: float
    weight_kg: float
    vbmd: dict[str, float]
    marrow_fat: float
    cortical_mm: float
    texture: float
    cobb_deg: float
    scoliosis: bool
    fracture_grade: dict[str, int]
    degeneration: float
    fracture_5y: bool
    fracture_5y_prob: float = 0.0
    height_loss: dict[str, float] = field(default_factory=dict)
    fracture_shape: dict[str, str] = field(default_factory=dict)
    degeneration_level: dict[str, float] = field(default_factory=dict)
    scoliosis_apex: str = "L2"
    scoliosis_side: int = 1
    lordosis_deg: float = 40.0
    bone_z: float = 0.0
    menopause_age: float = float("nan")
    anatomy_seed: int = 0
    size_factor: float = 1.0
    arms_down: bool = False
    t12_ribs: str = "normal"
    lumbar_rib: bool = False
    transitional: str = "none"
    bone_islands: list[dict[str, Any]] = field(default_factory=list)
    skeleton_scale: float = 1.0

    @property
    def bmi(self) -> float:
        """Body-mass index, kg/m2."""
        return self.weight_kg / (self.height_cm / 100.0) ** 2

    @property
    def prior_vertebral_fracture(self) -> bool:
        """True when any level has Genant grade >= 1."""
        return any(g >= 1 for g in self.fracture_grade.values())

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON view of the patient."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["bmi"] = self.bmi
        return d


def mean_vbmd_l1(age: float | np.ndarray, sex: str, menopause_age: float = 50.0) -> np.ndarray:
    """Population-mean L1 trabecular vBMD (mg/cm3) at ``age`` (module docstring)."""
    a = np.asarray(age, dtype=float)
    if sex == "M":
        return VBMD_YOUNG["M"] - 1.2 * (a - 25.0)
    base = VBMD_YOUNG["F"] - 1.3 * (a - 25.0)
    extra = 2.0 * np.clip(a - menopause_age, 0.0, 7.0)
    return base - extra


def _mean_femur(age: float, sex: str, menopause_age: float) -> tuple[float, float]:
    """Population-mean femoral-neck and trochanteric trabecular vBMD (mg/cm3)."""
    a = age - 25.0
    if sex == "M":
        neck = 168.0 * (1.0 - 0.0045 * a)
        troch = 160.0 * (1.0 - 0.0045 * a)
    else:
        post = np.clip(age - menopause_age, 0.0, 7.0)
        neck = 158.0 * (1.0 - 0.0033 * a - 0.010 * post)
        troch = 150.0 * (1.0 - 0.0033 * a - 0.010 * post)
    return float(neck), float(troch)


def fracture_hazard(age: float, sex: str, t_like: float, prior_fx: bool, bmi: float) -> float:
    """Annual hazard of a major osteoporotic fracture (module docstring's model)."""
    lam = 0.0019 * 1.5 ** (-t_like) * 1.3 ** ((age - 65.0) / 10.0)
    lam *= 2.0 if prior_fx else 1.0
    lam *= 0.7 if sex == "M" else 1.0
    if bmi < 22.0:
        lam *= 1.15 ** ((22.0 - bmi) / 4.0)
    return float(lam)


def make_patient(seed: int, index: int, *, age: float | None = None, sex: str | None = None,
                 vbmd_l1: float | None = None, t12_ribs: str | None = None, lumbar_rib: bool | None = None,
                 transitional: str | None = None, bone_islands: Sequence[Any] | None = None,
                 skeleton_scale: float = 1.0) -> Patient:
    """Draw patient ``index`` of the cohort ``seed``.

    Parameters
    ----------
    seed, index : int
        The patient is a pure function of these.
    age, sex, vbmd_l1 : optional
        Overrides (for tests and controlled sweeps); other fields stay consistent
        with them.
    t12_ribs, lumbar_rib, transitional, bone_islands, skeleton_scale : optional
        Force an anatomical variant (module docstring); ``bone_islands`` items are dicts
        (keys ``level``, ``offset_mm``, ``diameter_mm``, ``density``) or tuples in that order;
        ``[]`` forces none. No override changes any other field.
    """
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index), 0x5C2EE7])
    a = float(rng.uniform(20.0, 90.0))
    s = "F" if rng.random() < 0.5 else "M"
    if age is not None:
        a = float(age)
    if sex is not None:
        if sex not in ("F", "M"):
            raise ValueError(f"sex must be 'F' or 'M', not {sex!r}")
        s = sex
    meno = float(np.clip(rng.normal(50.0, 3.0), 42.0, 58.0)) if s == "F" else float("nan")

    # body size
    h_mean = (162.0 if s == "F" else 176.0) - 0.06 * max(a - 45.0, 0.0)
    height = float(rng.normal(h_mean, 6.5 if s == "F" else 7.0))
    bmi_mean = 24.0 + 0.09 * min(a - 20.0, 40.0) - 0.05 * max(a - 70.0, 0.0)
    bmi = float(np.clip(np.exp(rng.normal(np.log(bmi_mean), 0.17)), 16.5, 48.0))
    weight = bmi * (height / 100.0) ** 2

    # bone state: a latent z shared by all sites
    z = float(rng.normal())
    z_spine = 0.85 * z + 0.527 * float(rng.normal())
    z_hip = 0.80 * z + 0.60 * float(rng.normal())
    l1 = float(mean_vbmd_l1(a, s, meno if s == "F" else 50.0)) + VBMD_SD * z_spine
    l1 += 0.6 * (bmi - 26.0)  # heavier people have slightly denser bone
    if vbmd_l1 is not None:
        l1 = float(vbmd_l1)
    l1 = max(l1, 20.0)
    vbmd: dict[str, float] = {}
    for lev in LEVELS:
        vbmd[lev] = max(15.0, l1 * _LEVEL_FACTOR[lev] * (1.0 + 0.03 * float(rng.normal())))
    vbmd["L1"] = l1
    neck, troch = _mean_femur(a, s, meno if s == "F" else 50.0)
    vbmd["femur_neck"] = max(40.0, neck + 30.0 * z_hip + 0.8 * (bmi - 26.0))
    vbmd["femur_troch"] = max(30.0, troch + 26.0 * z_hip + 0.7 * (bmi - 26.0))

    post = 0.0 if s == "M" else float(np.clip(a - meno, 0.0, 15.0))
    fat = 0.30 + 0.0045 * (a - 25.0) + 0.004 * post - 0.0015 * (l1 - float(mean_vbmd_l1(a, s)))
    fat = float(np.clip(fat + rng.normal(0.0, 0.06), 0.08, 0.85))

    cortical = float(np.clip(1.0 - 0.003 * (a - 25.0) + 0.08 * z + rng.normal(0.0, 0.1), 0.5, 1.5))
    texture = float(1.0 / (1.0 + np.exp(-(0.9 * z_spine - 0.03 * (a - 50.0) + rng.normal(0.0, 0.6)))))

    cobb, apex, side = _scoliosis(rng, a)
    t_like = (l1 - VBMD_YOUNG["F" if s == "F" else "M"]) / VBMD_SD
    grades, loss, shapes = _vertebral_fractures(rng, t_like, a, s)

    deg = float(np.clip(rng.normal((a - 38.0) / 55.0, 0.18), 0.0, 1.0))
    deg_level = {lv: float(np.clip(deg * _DEG_WEIGHT[lv] * rng.uniform(0.6, 1.3), 0.0, 1.0))
                 for lv in LEVELS}
    lordosis = float(np.clip(rng.normal(37.0, 11.0), 12.0, 65.0))

    prior = any(g >= 1 for g in grades.values())
    lam = fracture_hazard(a, s, t_like, prior, bmi)
    p5 = float(1.0 - np.exp(-5.0 * lam))
    fx5 = bool(rng.random() < p5)
    size = float(np.clip(height / (162.0 if s == "F" else 176.0), 0.85, 1.15)) * (1.0 if s == "F" else 1.06)

    anat_seed = int(rng.integers(0, 2**31 - 1))
    arms_down = bool(rng.random() < 0.15)  # arms beside the body in the CT field (drawn last)
    var = _variants_with_overrides(seed, index, t12_ribs=t12_ribs, lumbar_rib=lumbar_rib,
                                   transitional=transitional, bone_islands=bone_islands)
    if not float(skeleton_scale) > 0.0:
        raise ValueError(f"skeleton_scale must be > 0, not {skeleton_scale!r}")
    return Patient(
        patient_id=f"VC{int(seed):04d}-{int(index):05d}", index=int(index), seed=int(seed),
        age=round(a, 2), sex=s, height_cm=round(height, 1), weight_kg=round(weight, 1),
        vbmd=vbmd, marrow_fat=fat, cortical_mm=cortical, texture=texture, cobb_deg=cobb,
        scoliosis=cobb > 10.0, fracture_grade=grades, degeneration=deg, fracture_5y=fx5,
        fracture_5y_prob=p5, height_loss=loss, fracture_shape=shapes, degeneration_level=deg_level,
        scoliosis_apex=apex, scoliosis_side=side, lordosis_deg=lordosis, bone_z=z,
        menopause_age=meno, anatomy_seed=anat_seed, size_factor=size, arms_down=arms_down,
        t12_ribs=var["t12_ribs"], lumbar_rib=var["lumbar_rib"], transitional=var["transitional"],
        bone_islands=var["bone_islands"], skeleton_scale=float(skeleton_scale),
    )


def _scoliosis(rng: np.random.Generator, a: float) -> tuple[float, str, int]:
    """Cobb angle (degenerative, rising with age), apex level and side, from the patient's stream."""
    p_sc = 1.0 / (1.0 + np.exp(-(a - 78.0) / 9.0)) * 0.45 + 0.02
    if rng.random() < p_sc:
        cobb = float(min(10.5 + rng.exponential(9.0), 45.0))
    else:
        cobb = float(min(abs(rng.normal(0.0, 3.5)), 9.0))
    apex = str(rng.choice(["T12", "L1", "L2", "L2", "L3", "L3"]))
    side = 1 if rng.random() < 0.5 else -1
    return cobb, apex, side


def _vertebral_fractures(rng: np.random.Generator, t_like: float, a: float,
                         s: str) -> tuple[dict[str, int], dict[str, float], dict[str, str]]:
    """Genant grade, height loss and shape per level (osteoporotic fractures by T-score, age, sex)."""
    logit = -3.4 - 0.75 * t_like + 0.03 * (a - 65.0) + (0.3 if s == "F" else 0.0)
    p_fx = 1.0 / (1.0 + np.exp(-logit))
    grades = {lev: 0 for lev in LEVELS}
    loss = {lev: float(np.clip(rng.normal(0.04, 0.035), 0.0, 0.14)) for lev in LEVELS}
    shapes: dict[str, str] = {}
    if rng.random() < p_fx:
        n_fx = 1 + int(rng.poisson(max(0.25, 0.3 - 0.25 * t_like)))
        w = np.array([_FX_WEIGHT[lv] for lv in LEVELS])
        chosen = rng.choice(len(LEVELS), size=min(n_fx, 4), replace=False, p=w / w.sum())
        for ci in chosen:
            lev = LEVELS[int(ci)]
            g = int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15]))
            lo, hi = {1: (0.205, 0.245), 2: (0.255, 0.395), 3: (0.405, 0.55)}[g]
            grades[lev] = g
            loss[lev] = float(rng.uniform(lo, hi))
            shapes[lev] = str(rng.choice(["wedge", "wedge", "biconcave", "crush"]))
    for lev in LEVELS:  # grade follows height loss (Genant)
        grades[lev] = genant_grade(loss[lev])
    return grades, loss, shapes


def _variants_with_overrides(seed: int, index: int, *, t12_ribs: str | None, lumbar_rib: bool | None,
                             transitional: str | None, bone_islands: Sequence[Any] | None) -> dict[str, Any]:
    """:func:`draw_variants` with the forced ones of :func:`make_patient` applied (checked)."""
    var = draw_variants(seed, index)
    if t12_ribs is not None:
        if t12_ribs not in T12_RIBS:
            raise ValueError(f"t12_ribs must be one of {T12_RIBS}, not {t12_ribs!r}")
        var["t12_ribs"] = t12_ribs
    if lumbar_rib is not None:
        var["lumbar_rib"] = bool(lumbar_rib)
    if transitional is not None:
        if transitional not in TRANSITIONAL:
            raise ValueError(f"transitional must be one of {TRANSITIONAL}, not {transitional!r}")
        var["transitional"] = transitional
    if bone_islands is not None:
        var["bone_islands"] = [_island(b) for b in bone_islands]
    return var


def _island(b: Any) -> dict[str, Any]:
    """A bone island as a plain dict (accepts the dict form or a ``(level, offset, diameter, density)`` tuple)."""
    if isinstance(b, dict):
        lev, off, dia, den = b["level"], b.get("offset_mm", (0.0, 0.0, 0.0)), b["diameter_mm"], b.get("density", 0.9)
    else:
        lev, off, dia = b[0], b[1], b[2]
        den = b[3] if len(b) > 3 else 0.9
    if lev not in LEVELS:
        raise ValueError(f"bone island level {lev!r} is not one of {LEVELS}")
    off = tuple(float(q) for q in off)
    if len(off) != 3:
        raise ValueError(f"bone island offset_mm must be (dx, dy, dz), not {off!r}")
    return {"level": str(lev), "offset_mm": off, "diameter_mm": float(dia), "density": float(den)}


def draw_variants(seed: int, index: int) -> dict[str, Any]:
    """The anatomical variants of patient ``(seed, index)`` from their own stream (module docstring).

    Every draw is made whatever the earlier outcomes, so the stream's use is fixed.
    """
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index), 7919])
    u_tr, u_hypo, u_lr, u_isl = rng.random(4)
    lev_w = np.array(list(ISLAND_LEVELS.values()))
    lev = list(ISLAND_LEVELS)[int(rng.choice(len(lev_w), p=lev_w / lev_w.sum()))]
    off = (float(rng.uniform(-11.0, 11.0)), float(rng.uniform(-8.0, 8.0)), float(rng.uniform(-5.0, 5.0)))
    dia = float(rng.uniform(3.0, 10.0))
    den = float(rng.uniform(0.5, 1.0))
    if u_tr < P_SACRALISED:
        trans = "sacralised_l5"
    elif u_tr < P_SACRALISED + P_LUMBARISED:
        trans = "lumbarised_s1"
    else:
        trans = "none"
    p_h = P_HYPO_GIVEN_SACRAL if trans == "sacralised_l5" else (
        (P_HYPOPLASTIC_12 - P_SACRALISED * P_HYPO_GIVEN_SACRAL) / (1.0 - P_SACRALISED))
    p_l = P_LRIB_GIVEN_LUMBARISED if trans == "lumbarised_s1" else (
        (P_LUMBAR_RIB - P_LUMBARISED * P_LRIB_GIVEN_LUMBARISED) / (1.0 - P_LUMBARISED))
    islands = [{"level": lev, "offset_mm": off, "diameter_mm": dia, "density": den}] if u_isl < P_BONE_ISLAND else []
    return {"t12_ribs": "hypoplastic" if u_hypo < p_h else "normal", "lumbar_rib": bool(u_lr < p_l),
            "transitional": trans, "bone_islands": islands}


def genant_grade(height_loss: float) -> int:
    """Genant semi-quantitative grade from fractional height loss (section 5)."""
    if height_loss < 0.20:
        return 0
    if height_loss <= 0.25:
        return 1
    if height_loss <= 0.40:
        return 2
    return 3


def sample_population(n: int, seed: int) -> list[Patient]:
    """The first ``n`` patients of cohort ``seed`` (patient ``i`` is independent of ``n``)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [make_patient(seed, i) for i in range(int(n))]
