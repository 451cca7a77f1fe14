"""Evaluate ``l1_attenuation``'s 3-D L1 segmentation and trabecular ROI on the virtual cohort.

For every CT profile of :data:`training.phantoms.profiles.PROFILES` (training,
held-out and evaluation-only archive profiles reported separately) ``--n`` patients are rendered over a T10..L4 centroid
window and measured twice:

* ``real``: with the real localizer (:func:`screener.localizer.locate_spine`);
  a case where it does not return L1, or returns an L1 centroid outside the
  true L1 body, is a *localizer miss*, counted separately (not a ROI failure).
* ``truth``: with the phantom's true L1 centroid as localizer, so that the ROI's
  numbers do not depend on the localizer.

Error = reported L1 mean - ``labels.trabecular_hu`` (the true mean trabecular HU
for the profile's kVp and phase). The phantom adds a per-series calibration
offset (SD 2 HU) that no ROI can remove; render seeds differ per profile and
patient so that it does not repeat across profiles. Variants (``--variant``) re-render the same
patients as a stress case: ``3mm`` (3 mm pixels, matrix 170, 3 x 3 supersampled), ``6mm`` (6 mm
slices), ``island`` (a 6 mm, +600 HU sphere written into mid-L1 near the ROI
centre; the focus flag is counted), ``lowdens`` (the most osteoporotic patients
of a larger sample).

Usage::

    python benchmarks/eval_l1_roi.py --n 5 [--variant island] [--profiles a,b]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from screener.config import Config  # noqa: E402
from screener.domain import SpineLocalization, VertebraLocation, Volume  # noqa: E402
from screener.protocols.base import ProtocolContext, ProtocolDeclined  # noqa: E402
from screener.protocols.l1_attenuation.protocol import L1AttenuationProtocol  # noqa: E402
from screener.series import load_volume, read_series_info  # noqa: E402

VARIANTS = ("none", "3mm", "6mm", "island", "lowdens")


def profile_for(name: str, variant: str):  # noqa: ANN201
    """The scanner profile, modified for ``variant``."""
    from training.phantoms import profiles
    prof = profiles.get_profile(name)
    if variant == "3mm":   # a real 3 mm reconstruction: each pixel the mean over its area
        prof = prof.with_(pixel_spacing=3.0, matrix=170, supersample=3)
    elif variant == "6mm":
        prof = prof.with_(slice_thickness=6.0, slice_spacing=6.0)
    return prof


def truth_localization(volume: Volume, scene) -> SpineLocalization:  # noqa: ANN001
    """A localizer result built from the phantom's true L1 (centroid and z range)."""
    l1 = scene.vertebra("L1")
    c = np.asarray(l1.centroid_mm, float)
    m = volume.direction * np.array([volume.spacing[2], volume.spacing[1], volume.spacing[0]])
    i, j, k = np.linalg.solve(m, c - volume.origin)
    z = volume.slice_positions()[:, 2]
    lo, hi = sorted(l1.z_range_mm)
    ks = [q for q, zz in enumerate(z) if lo <= zz <= hi] or [int(round(k))]
    return SpineLocalization({"L1": VertebraLocation("L1", (ks[0], ks[-1]), (lo, hi), (k, j, i),
                                                     tuple(c), 1.0)}, "truth")


def insert_island(volume: Volume, scene, diameter_mm: float = 6.0, hu: float = 900.0,  # noqa: ANN001
                  anterior_mm: float = 5.0, lateral_mm: float = 3.0) -> tuple[float, float, float]:
    """Write a dense sphere (bone island) into ``volume.array`` near mid-L1's ROI centre.

    Partial volume along the slice is modelled (each pixel gets the fraction of
    its slab the sphere fills); returns the sphere's centre (patient mm).
    """
    l1 = scene.vertebra("L1")
    c = np.asarray(l1.centroid_mm, float) + np.array([lateral_mm, -anterior_mm, 0.0])
    r = diameter_mm / 2.0
    dk, dj, di = volume.spacing
    thick = abs(dk)
    if volume.datasets and "SliceThickness" in volume.datasets[0]:
        thick = float(volume.datasets[0].SliceThickness)
    pos = volume.slice_positions()
    n, rows, cols = volume.array.shape
    jj, ii = np.mgrid[:rows, :cols]
    for k in range(n):
        zk = pos[k, 2]
        if abs(zk - c[2]) > r + thick:
            continue
        p0 = volume.index_to_patient(k, 0, 0)
        x = p0[0] + volume.direction[0, 0] * ii * di + volume.direction[0, 1] * jj * dj
        y = p0[1] + volume.direction[1, 0] * ii * di + volume.direction[1, 1] * jj * dj
        rho2 = (x - c[0]) ** 2 + (y - c[1]) ** 2
        half = np.sqrt(np.clip(r * r - rho2, 0.0, None))
        lo = np.maximum(c[2] - half, zk - thick / 2)
        hi = np.minimum(c[2] + half, zk + thick / 2)
        f = np.clip(hi - lo, 0.0, None) / thick
        f[rho2 > r * r] = 0.0
        sl = volume.array[k]
        volume.array[k] = (sl * (1.0 - f) + hu * f).astype(sl.dtype)
    return tuple(float(v) for v in c)


def measure(volume: Volume, info, loc: SpineLocalization):  # noqa: ANN001, ANN201
    """Run the protocol with a fixed localization; returns (finding or None, decline reason)."""
    try:
        (f,) = L1AttenuationProtocol(localizer=lambda v: loc).run(
            volume, ProtocolContext(config=Config(), info=info))
        return f, ""
    except ProtocolDeclined as exc:
        return None, exc.reason


def patients_for(n: int, seed: int, variant: str) -> list:
    from training.phantoms import anatomy, physics, population
    from training.phantoms.labels import trabecular_hu
    if variant != "lowdens":
        return population.sample_population(n, seed)
    pool = population.sample_population(max(8 * n, 40), seed)
    kev = physics.effective_energy(120.0)
    scored = sorted(pool, key=lambda p: trabecular_hu(anatomy.build_scene(p), "L1", kev))
    return scored[:n]


def evaluate(names: list[str], n: int, seed: int, variant: str, use_localizer: bool,
             verbose: bool) -> list[dict]:
    """One row per case."""
    from training.phantoms import anatomy, ct, physics
    from training.phantoms.labels import trabecular_hu
    from screener.localizer import locate_spine

    rows = []
    pats = patients_for(n, seed, variant)
    for pi, name in enumerate(names):
        prof = profile_for(name, variant)
        for i, p in enumerate(pats):
            scene = anatomy.build_scene(p)
            top, bottom = scene.vertebra("T10").centroid_mm[2], scene.vertebra("L4").centroid_mm[2]
            with tempfile.TemporaryDirectory() as d:
                paths = ct.write_series(ct.render_ct(scene, prof, seed=100 * pi + i, z_range=(top, bottom)),
                                         d)
                info, vol = read_series_info(paths), load_volume(paths)
            truth = trabecular_hu(scene, "L1", physics.effective_energy(prof.kvp), prof.phase)
            if variant == "island":
                insert_island(vol, scene)
            group = ("held-out" if prof.held_out else
                     "evaluation-only" if getattr(prof, "evaluation_only", False) else "training")
            row = {"profile": name, "group": group, "i": i, "truth": truth}
            t = time.process_time()
            f, why = measure(vol, info, truth_localization(vol, scene))
            row["roi_s"] = time.process_time() - t   # CPU s: the shared machine's wall time is noisy
            row["truth_err"] = None if f is None else f.measurement("L1 attenuation mean").value - truth
            row["truth_why"] = why
            row["truth_flag"] = bool(f is not None and f.details.get("focus_excluded"))
            if use_localizer:
                loc = locate_spine(vol)
                l1 = loc.get("L1")
                lo, hi = sorted(scene.vertebra("L1").z_range_mm)
                miss = l1 is None or not lo <= float(l1.centroid_mm[2]) <= hi
                row["loc_miss"] = miss
                row["loc_why"] = (loc.reason or "L1 elsewhere") if miss else ""
                if not miss:
                    f2, why2 = measure(vol, info, loc)
                    row["real_err"] = None if f2 is None else \
                        f2.measurement("L1 attenuation mean").value - truth
                    row["real_why"] = why2
            if verbose:
                print(name, i, f"truth {truth:.1f}", {k: v for k, v in row.items()
                                                    if k not in ("profile", "i", "truth", "group")},
                      flush=True)
            rows.append(row)
    return rows


def _stats(errs: list[float | None]) -> tuple[int, float, float, float]:
    got = [abs(e) for e in errs if e is not None]
    n = len(errs)
    pct = 100.0 * len(got) / n if n else float("nan")
    mae = float(np.mean(got)) if got else float("nan")
    mx = float(np.max(got)) if got else float("nan")
    return n, pct, mae, mx


def print_table(rows: list[dict], use_localizer: bool, variant: str) -> None:
    print(f"\nvariant: {variant}   (truth = true L1 centroid as seed; real = real localizer, "
          "localizer misses counted apart)")
    head = f"{'profile':26s} {'n':>3s} {'meas%':>6s} {'MAE':>5s} {'max':>5s}"
    if variant == "island":
        head += f" {'flag%':>6s}"
    if use_localizer:
        head += f" | {'locmiss':>7s} {'n':>3s} {'meas%':>6s} {'MAE':>5s} {'max':>5s}"
    head += f" | {'cpu s':>5s}"
    print(head)
    for title in ("training", "held-out", "evaluation-only"):
        sub = [r for r in rows if r["group"] == title]
        if not sub:
            continue
        for name in dict.fromkeys(r["profile"] for r in sub):
            _line(name, [r for r in sub if r["profile"] == name], use_localizer, variant)
        _line(f"ALL {title}", sub, use_localizer, variant)
    if len({r["group"] for r in rows}) > 1:
        _line("ALL", rows, use_localizer, variant)


def _line(name: str, rs: list[dict], use_localizer: bool, variant: str) -> None:
    n, pct, mae, mx = _stats([r["truth_err"] for r in rs])
    s = f"{name:26s} {n:3d} {pct:6.1f} {mae:5.1f} {mx:5.1f}"
    if variant == "island":
        s += f" {100.0 * np.mean([r['truth_flag'] for r in rs]):6.1f}"
    if use_localizer:
        misses = sum(r["loc_miss"] for r in rs)
        n2, pct2, mae2, mx2 = _stats([r.get("real_err") for r in rs if not r["loc_miss"]])
        s += f" | {misses:7d} {n2:3d} {pct2:6.1f} {mae2:5.1f} {mx2:5.1f}"
    s += f" | {max(r['roi_s'] for r in rs):5.2f}"
    print(s, flush=True)


def main(argv: list[str] | None = None) -> int:
    from training.phantoms import profiles
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=5, help="patients per profile")
    ap.add_argument("--seed", type=int, default=31)
    ap.add_argument("--variant", choices=VARIANTS, default="none")
    ap.add_argument("--profiles", default="", help="comma-separated subset (default: all)")
    ap.add_argument("--no-localizer", action="store_true", help="truth centroid only")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    names = [s for s in a.profiles.split(",") if s] or list(profiles.PROFILES)
    t = time.time()
    rows = evaluate(names, a.n, a.seed, a.variant, not a.no_localizer, a.verbose)
    print_table(rows, not a.no_localizer, a.variant)
    fails = [(r["profile"], r["i"], r["truth_why"]) for r in rows if r["truth_err"] is None]
    for fl in fails:
        print("declined (truth seed):", *fl)
    for r in rows:
        if r.get("loc_miss"):
            print("localizer miss:", r["profile"], r["i"], r["loc_why"])
        elif r.get("real_why"):
            print("declined (real localizer):", r["profile"], r["i"], r["real_why"])
    print(f"{len(rows)} cases in {time.time() - t:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
