"""Tube-voltage (kVp) correction of bone HU, shared by the CT protocols' preprocessing.

Bone HU grow as the tube voltage falls: hydroxyapatite adds about 2.17 HU per
mg/cm^3 at 80 kVp, 1.33 at 120 and 1.16 at 140 kVp.  A network trained on a
mix of tube voltages therefore sees the same bone at different brightness.
:func:`energy_scale` gives the factor that maps a series' HU to their
:data:`REFERENCE_KVP` equivalent (water, 0 HU, is the fixed point):
``HA HU-per-mg at 120 kVp / HA HU-per-mg at the series' kVp``.

The HU-per-mg table :data:`HA_HU_PER_MG` is the virtual cohort's physics
(NIST XCOM hydroxyapatite displacing water at the effective energy of each
kVp: 47, 52, 61, 70, 75, 77, 80 keV at 70, 80, 100, 120, 135, 140, 150 kVp),
interpolated log-linearly in kVp and held constant outside 70-150 kVp.  An
unknown kVp counts as 120 (no correction).  This is a documented difference
from the papers, whose scanners all ran at 120 kVp.
"""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["REFERENCE_KVP", "HA_HU_PER_MG", "energy_constants", "energy_scale", "ha_hu_per_mg"]

#: tube voltage the energy correction maps to (the papers' scanners)
REFERENCE_KVP = 120.0
#: kVp -> HU per mg/cm^3 of hydroxyapatite displacing water, at the effective energy of that kVp
#: (copied from the virtual cohort's physics: training.phantoms.physics.ha_hu_per_mg(effective_energy(kvp)))
HA_HU_PER_MG: dict[float, float] = {70.0: 2.58265, 80.0: 2.16755, 100.0: 1.62009, 120.0: 1.32942,
                                    135.0: 1.20264, 140.0: 1.15690, 150.0: 1.09291}


def ha_hu_per_mg(kvp: float | None) -> float:
    """HU per mg/cm^3 of hydroxyapatite displacing water at a tube voltage: :data:`HA_HU_PER_MG`,
    log-linear in kVp between its points, constant outside 70-150 kVp; an unknown kVp counts as
    :data:`REFERENCE_KVP`.  The one table of this constant (l1_attenuation's vBMD, the models'
    energy correction).

    Raises
    ------
    ValueError
        When ``kvp`` is not a positive finite number.
    """
    k = REFERENCE_KVP if kvp is None else float(kvp)
    if not np.isfinite(k) or k <= 0:
        raise ValueError(f"kVp must be a positive number (got {kvp!r}); pass None when it is unknown")
    xs = np.array(sorted(HA_HU_PER_MG))
    ys = np.log([HA_HU_PER_MG[x] for x in xs])
    return float(np.exp(np.interp(k, xs, ys)))


def energy_scale(kvp: float | None) -> float:
    """Factor that maps a series' bone HU to their :data:`REFERENCE_KVP` equivalent.

    Parameters
    ----------
    kvp : float or None
        Tube voltage of the series; ``None`` (unknown) counts as :data:`REFERENCE_KVP`.

    Returns
    -------
    float
        ``HA HU-per-mg at 120 kVp / HA HU-per-mg at kvp`` (0.61 at 80 kVp, 1.15 at 140 kVp);
        log-linear in kVp between the :data:`HA_HU_PER_MG` points, constant outside them.

    Raises
    ------
    ValueError
        When ``kvp`` is not a positive finite number.
    """
    if kvp is None:
        return 1.0
    return ha_hu_per_mg(REFERENCE_KVP) / ha_hu_per_mg(kvp)


def energy_constants(energy_correction: bool, *, subject: str = "HU", note: str = "") -> dict[str, Any]:
    """The energy-correction entries of a model card's preprocessing constants.

    Parameters
    ----------
    energy_correction : bool
        Whether the inputs were rescaled to 120 kVp equivalents.
    subject : str
        What is rescaled, as the rule names it (e.g. ``"crop HU"``).
    note : str
        Appended to the rule after ``"; "`` (e.g. what is not rescaled).

    Returns
    -------
    dict
        ``{"energy_correction": bool}``, plus the reference kVp, the HU-per-mg table and the
        rule when the correction is on.
    """
    out: dict[str, Any] = {"energy_correction": bool(energy_correction)}
    if energy_correction:
        rule = (f"{subject} x HA_HU_per_mg(120 kVp) / HA_HU_per_mg(series kVp) before windowing "
                "(log-linear in kVp, constant outside 70-150 kVp; unknown kVp = 120)")
        out.update({"reference_kvp": REFERENCE_KVP,
                    "ha_hu_per_mg": {f"{k:g}": v for k, v in HA_HU_PER_MG.items()},
                    "energy_rule": rule + (f"; {note}" if note else "")})
    return out
