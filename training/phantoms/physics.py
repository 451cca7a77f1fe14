"""X-ray attenuation of the phantom's basis materials.

The virtual cohort describes every point of a patient by *partial densities*
(g/cm3) of five basis materials, :data:`BASIS`:

``fat``
    adipose tissue (ICRU-44 composition),
``soft``
    water-like soft tissue (ICRU-44 skeletal muscle composition),
``ha``
    bone mineral, hydroxyapatite Ca10(PO4)6(OH)2 (density of the crystal 3.16),
``iodine``
    iodinated contrast (elemental iodine),
``air``
    air (dry, near sea level).

The linear attenuation coefficient of a mixture is the sum of partial
density x mass attenuation coefficient; CT numbers follow from
``HU = 1000 (mu - mu_water) / mu_water`` (clinical-physics.md section 4).

Mass attenuation tables (cm2/g, total with coherent scattering) are
NIST XCOM / ICRU-44 values at 20-150 keV. The 40-100 keV values of water,
adipose, muscle and hydroxyapatite are those of clinical-physics.md section 4;
iodine includes its K edge at 33.17 keV. Between table energies the
coefficients are interpolated log-log, which reproduces e.g. 1.33 HU per
mg/cm3 of hydroxyapatite displacing water at 70 keV (section 2).
"""
from __future__ import annotations

import numpy as np

#: basis materials of the partial-density description (g/cm3)
BASIS: tuple[str, ...] = ("fat", "soft", "ha", "iodine", "air")

#: density (g/cm3) of each pure material, used to convert partial density to volume fraction
PURE_DENSITY: dict[str, float] = {
    "fat": 0.95, "soft": 1.05, "ha": 3.16, "iodine": 4.93, "air": 0.001205, "water": 1.0,
}

_E = np.array([20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 100.0, 150.0])

# cm2/g; 40/60/80/100 keV columns of water, adipose, muscle, HA match clinical-physics.md section 4.
_TABLES: dict[str, np.ndarray] = {
    "water": np.array([0.8096, 0.3756, 0.2683, 0.2269, 0.2059, 0.1940, 0.1837, 0.1707, 0.1505]),
    "fat": np.array([0.6447, 0.3260, 0.2400, 0.2117, 0.1979, 0.1884, 0.1800, 0.1684, 0.1489]),
    "soft": np.array([0.8205, 0.3783, 0.2686, 0.2265, 0.2048, 0.1924, 0.1819, 0.1695, 0.1494]),
    "ha": np.array([6.020, 1.942, 0.9877, 0.6002, 0.4066, 0.3193, 0.2589, 0.2019, 0.1486]),
    "air": np.array([0.7779, 0.3538, 0.2485, 0.2080, 0.1875, 0.1757, 0.1662, 0.1541, 0.1356]),
}
# iodine: piecewise log-log on either side of the K edge (33.17 keV)
_I_E_LO = np.array([20.0, 25.0, 30.0, 33.169])
_I_MU_LO = np.array([25.39, 13.98, 8.51, 6.55])
_I_E_HI = np.array([33.169, 40.0, 50.0, 60.0, 80.0, 100.0, 150.0])
_I_MU_HI = np.array([36.50, 22.10, 12.32, 7.583, 3.510, 1.942, 0.7179])

MATERIALS: tuple[str, ...] = tuple(_TABLES) + ("iodine",)


def _loglog(e: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    return np.exp(np.interp(np.log(e), np.log(xs), np.log(ys)))


def mass_attenuation(material: str, kev: float | np.ndarray) -> np.ndarray:
    """Mass attenuation coefficient of a basis material.

    Parameters
    ----------
    material : str
        One of :data:`BASIS` or ``"water"``.
    kev : float or numpy.ndarray
        Photon energy in keV, 20-150.

    Returns
    -------
    numpy.ndarray
        mu/rho in cm2/g, same shape as ``kev``.
    """
    e = np.asarray(kev, dtype=float)
    if np.any(e < 20.0) or np.any(e > 150.0):
        raise ValueError(f"energy {kev!r} keV outside the tabulated 20-150 keV range")
    if material == "iodine":
        lo = _loglog(np.minimum(e, 33.169), _I_E_LO, _I_MU_LO)
        hi = _loglog(np.maximum(e, 33.169), _I_E_HI, _I_MU_HI)
        return np.where(e < 33.169, lo, hi)
    if material not in _TABLES:
        raise ValueError(f"unknown material {material!r}; expected one of {MATERIALS}")
    return _loglog(e, _E, _TABLES[material])


def linear_attenuation(densities: dict[str, np.ndarray], kev: float) -> np.ndarray:
    """Linear attenuation coefficient (cm^-1) of a mixture given as partial densities.

    Parameters
    ----------
    densities : dict of str to numpy.ndarray
        Partial density (g/cm3) per basis material; missing materials count as 0.
    kev : float
        Photon energy in keV.
    """
    mu: np.ndarray | float = 0.0
    for name, rho in densities.items():
        mu = mu + np.asarray(rho, dtype=float) * float(mass_attenuation(name, kev))
    return np.asarray(mu, dtype=float)


def mu_water(kev: float) -> float:
    """Linear attenuation coefficient of water (cm^-1) at ``kev``."""
    return float(mass_attenuation("water", kev))


def hu(densities: dict[str, np.ndarray], kev: float) -> np.ndarray:
    """CT number of a mixture: ``1000 (mu - mu_water) / mu_water`` at ``kev``."""
    mw = mu_water(kev)
    return 1000.0 * (linear_attenuation(densities, kev) - mw) / mw


_KVP = np.array([70.0, 80.0, 100.0, 120.0, 135.0, 140.0, 150.0])
_KEV = np.array([47.0, 52.0, 61.0, 70.0, 75.0, 77.0, 80.0])


def effective_energy(kvp: float) -> float:
    """Effective (monoenergetic-equivalent) energy of a filtered CT beam.

    A typical clinical spectrum (tungsten anode, ~6-9 mm Al + bow-tie) behaves
    like ~52 keV at 80 kVp, ~61 at 100, ~70 at 120 and ~77 at 140 kVp.
    """
    if not 60.0 <= kvp <= 150.0:
        raise ValueError(f"kVp {kvp} outside 60-150")
    return float(np.interp(kvp, _KVP, _KEV))


def ha_hu_per_mg(kev: float, displaced: dict[str, float] | None = None) -> float:
    """HU added by 1 mg/cm3 of hydroxyapatite that displaces a background material.

    Parameters
    ----------
    kev : float
        Energy in keV.
    displaced : dict of str to float, optional
        Partial densities (g/cm3) of the background (marrow) that the mineral
        displaces by volume; default water (1 g/cm3).

    Returns
    -------
    float
        HU per mg/cm3: ``1000 (mu_ha/rho - mu_bg / 3.16) / mu_water / 1000``.
    """
    mw = mu_water(kev)
    mu_bg = mw if displaced is None else float(linear_attenuation(displaced, kev))
    per_g = float(mass_attenuation("ha", kev)) - mu_bg / PURE_DENSITY["ha"]
    return per_g / mw  # (1000 HU * per_g/mw) per g/cm3 == per_g/mw HU per mg/cm3
