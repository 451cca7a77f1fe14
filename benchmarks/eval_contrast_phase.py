"""Contrast phase from the image on the virtual cohort (issue 14 item 4; acceptance >= 95 % per profile).

For every CT profile and every phase the phantom renders (native, arterial, portal venous)
it renders ``--n`` cohort patients with that profile (the profile's pixel size, slice
thickness, kVp, kernel and noise; z from the profile's coverage clipped to T11-L3, the part
of the coverage :func:`screener.contrast.assess_contrast` reads; ``--full-coverage`` renders
all of it), writes the DICOM series,
reads it back with :func:`screener.series.read_series_info` / ``load_volume`` and runs
``assess_contrast`` four ways:

* ``img``: no ContrastBolusAgent, no localization (image alone, the spine found in the image);
* ``img+loc``: no ContrastBolusAgent, the phantom's true vertebra centroids as localization;
* ``hdr``: the rendered ContrastBolusAgent kept (arterial / portal venous) and no localization;
* ``stale``: a stale ContrastBolusAgent ("IOHEXOL 350") on every series, no localization
  (native series must come out native and flagged as a conflict).

Prints accuracy per profile and per phase, the time per assessment, and the misses. Run
from the project root::

    python benchmarks/eval_contrast_phase.py --n 8 [--profiles a,b] [--seed 140]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from screener.contrast import assess_contrast  # noqa: E402
from screener.domain import SpineLocalization, VertebraLocation  # noqa: E402
from screener.series import load_volume, read_series_info  # noqa: E402
from training.phantoms import anatomy, ct, population, profiles  # noqa: E402

PHASES = ("native", "arterial", "portal_venous")
MODES = ("img", "img+loc", "hdr", "stale")


def truth_localization(scene: anatomy.Scene) -> SpineLocalization:
    """The phantom's vertebra centroids as a (perfect) localizer result."""
    verts = {}
    for lv in ("T10", "T11", "T12", "L1", "L2", "L3", "L4"):
        v = scene.vertebra(lv)
        verts[lv] = VertebraLocation(lv, (0, 0), tuple(v.z_range_mm), (0.0, 0.0, 0.0), tuple(v.centroid_mm), 1.0)
    return SpineLocalization(verts, "phantom truth")


def z_range(scene: anatomy.Scene, prof: profiles.ScannerProfile, seed: int,
            full: bool = False) -> tuple[float, float]:
    """The profile's coverage; clipped to T11-L3 unless ``full``."""
    rng = np.random.default_rng([seed, 0xC0])
    top, bot = ct.coverage_range(scene, prof.coverage, rng)
    if full:
        return top, bot
    t11, l3 = scene.vertebra("T11").centroid_mm[2], scene.vertebra("L3").centroid_mm[2]
    return min(top, t11), max(bot, l3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=6, help="patients per profile and phase")
    ap.add_argument("--seed", type=int, default=140)
    ap.add_argument("--profiles", default=",".join(profiles.PROFILES))
    ap.add_argument("--full-coverage", action="store_true",
                    help="render the profile's whole coverage (default: clipped to T11-L3)")
    args = ap.parse_args()
    names = [p for p in args.profiles.split(",") if p]
    patients = population.sample_population(args.n * len(PHASES) * len(names), args.seed)
    hits: dict[tuple[str, str, str], list[int]] = defaultdict(list)
    misses, times = [], []
    i = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            base = profiles.get_profile(name)
            for phase in PHASES:
                prof = base.with_(phase=phase)
                for _ in range(args.n):
                    p = patients[i]
                    i += 1
                    scene = anatomy.build_scene(p)
                    dss = ct.render_ct(scene, prof, seed=i, z_range=z_range(scene, prof, i, args.full_coverage))
                    paths = ct.write_series(dss, Path(tmp) / f"{i}")
                    info, vol = read_series_info(paths), load_volume(paths)
                    loc = truth_localization(scene)
                    runs = {
                        "img": (None, dataclasses.replace(info, contrast_agent="")),
                        "img+loc": (loc, dataclasses.replace(info, contrast_agent="")),
                        "hdr": (None, info),
                        "stale": (None, dataclasses.replace(info, contrast_agent="IOHEXOL 350")),
                    }
                    for mode, (lo, inf) in runs.items():
                        t0 = time.perf_counter()
                        a = assess_contrast(vol, lo, inf)
                        times.append((time.perf_counter() - t0, name, mode, vol.array.shape[0]))
                        ok = a.phase == phase
                        if mode == "stale" and phase == "native":
                            ok = ok and a.conflict is not None
                        hits[(name, phase, mode)].append(int(ok))
                        if not ok:
                            misses.append((name, phase, mode, p.patient_id, vol.array.shape[0], a.phase,
                                           a.source, {k: round(v, 2) for k, v in a.evidence.items()}))
                    for f in paths:
                        f.unlink()
                print(f"  {name} {phase}: done ({vol.array.shape[0]} slices) "
                      + " ".join(f"{m} {sum(hits[(name, phase, m)])}/{args.n}" for m in MODES),
                      file=sys.stderr, flush=True)
    print(f"\ncontrast phase from the image, virtual cohort: n = {args.n} per profile and phase "
          f"(seed {args.seed}; z: {'full coverage' if args.full_coverage else 'coverage clipped to T11-L3'})\n")
    hdr = f"{'profile':28s} {'kVp':>4s} {'px/slice mm':>12s} " + " ".join(f"{m:>8s}" for m in MODES) + \
        "   image-only by phase (nat/art/pv)"
    print(hdr)
    print("-" * len(hdr))
    tot = defaultdict(list)
    for name in names:
        pr = profiles.get_profile(name)
        cells = []
        for m in MODES:
            v = [x for ph in PHASES for x in hits[(name, ph, m)]]
            tot[m] += v
            cells.append(f"{100.0 * np.mean(v):7.1f}%")
        by = "/".join(f"{sum(hits[(name, ph, 'img')])}" for ph in PHASES)
        print(f"{name:28s} {pr.kvp:4.0f} {pr.pixel_spacing:5.2f}/{pr.slice_thickness:<5g}  " + " ".join(cells)
              + f"   {by} of {args.n} each")
    print(f"{'all':28s} {'':4s} {'':12s} " + " ".join(f"{100.0 * np.mean(tot[m]):7.1f}%" for m in MODES)
          + f"   ({len(tot['img'])} CTs)")
    ts = np.array([t[0] for t in times])
    slow = max(times)
    print(f"\nassess_contrast: median {1000 * np.median(ts):.0f} ms, "
          f"95th percentile {1000 * np.percentile(ts, 95):.0f} ms, "
          f"max {1000 * slow[0]:.0f} ms ({slow[1]}, {slow[2]}, {slow[3]} slices; 2 shared cores)")
    if misses:
        print("\nmisses:")
        for m in misses:
            print("  ", *m)


if __name__ == "__main__":
    main()
