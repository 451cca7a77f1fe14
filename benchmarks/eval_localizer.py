"""Level numbering of the classical spine localizer on the virtual cohort, by profile.

For every rendered CT the truth is the phantom's L1 (z range of its body). A
case counts as

* ``correct`` -- L1 found and its centroid lies inside the true L1 body;
* ``wrong level`` -- a vertebra labelled L1 that is not L1 (the failure that
  matters: an ROI in T12 or L2 reported as L1);
* ``missed`` -- L1 fully in the coverage but declined;
* ``declined`` -- L1 not (fully) in the coverage and declined (correct).

Usage::

    python benchmarks/eval_localizer.py --n 6 --seed 31 [--profiles a,b] [--scale 1.0,0.8,0.6]
        [--coarse] [--windows]

``--scale`` renders every patient again with its skeleton's attenuation scaled
(``Patient.skeleton_scale``; soft tissue untouched). ``--coarse`` adds 3 mm
pixels / 3 and 6 mm slices of each case. ``--windows`` renders partial
coverages (ends above the sacrum, starts mid-lumbar) instead of the profile's.
Prints one table row per (profile, variant) and the list of wrong or missed
cases.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from screener.domain import Volume  # noqa: E402
from screener.localizer import locate_spine  # noqa: E402


def volume_from_render(r: dict) -> Volume:
    """A :class:`Volume` from :func:`training.phantoms.ct.render_volume`'s dict (no DICOM)."""
    hu = np.nan_to_num(r["hu"][::-1], nan=-1024.0).astype(np.float32)  # ascending z
    zs = np.asarray(r["z"])[::-1]
    ps = float(r["pixel_spacing"])
    ox, oy = r["origin_xy"]
    dz = float(np.median(np.diff(zs))) if zs.size > 1 else 1.0
    return Volume(array=hu, spacing=(dz, ps, ps), origin=np.array([ox, oy, float(zs[0])]),
                  direction=np.eye(3))


def truth_l1(scene) -> tuple[float, float]:
    lo, hi = sorted(scene.vertebra("L1").z_range_mm)
    return lo, hi


def score(loc, scene, z_lo: float, z_hi: float) -> str:
    """Outcome of one localisation (see module docstring)."""
    lo, hi = truth_l1(scene)
    in_view = z_lo <= lo and hi <= z_hi
    l1 = loc.get("L1")
    if l1 is None:
        return "missed" if in_view else "declined"
    return "correct" if lo <= l1.centroid_mm[2] <= hi else "wrong level"


def _render(cache: str, key: str, render) -> dict:
    """``render()``, or its volume from ``cache`` (hu, z, pixel_spacing, origin_xy only)."""
    if not cache:
        return render()
    f = Path(cache) / (key.replace("/", "_").replace(" ", "_") + ".npz")
    if f.exists():
        z = np.load(f)
        return {"hu": z["hu"].astype(np.float32), "z": z["z"], "pixel_spacing": float(z["ps"]), "origin_xy": tuple(z["oxy"])}
    r = render()
    f.parent.mkdir(parents=True, exist_ok=True)
    hu = np.nan_to_num(r["hu"], nan=-1024.0)
    np.savez(f, hu=np.clip(np.rint(hu), -32768, 32767).astype(np.int16), z=np.asarray(r["z"]), ps=float(r["pixel_spacing"]),
             oxy=np.asarray(r["origin_xy"], float))
    return r


def main(argv: list[str] | None = None) -> int:
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    from training.phantoms import anatomy, ct, population, profiles

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=6, help="patients per profile")
    ap.add_argument("--seed", type=int, default=31)
    ap.add_argument("--profiles", default="", help="comma-separated profile names (default: all)")
    ap.add_argument("--scale", default="1.0", help="skeleton attenuation scales, e.g. 1.0,0.8,0.6")
    ap.add_argument("--coarse", action="store_true", help="also 3 mm pixels with 3 and 6 mm slices")
    ap.add_argument("--windows", action="store_true", help="partial coverages instead of the profile's")
    ap.add_argument("--first", type=int, default=0, help="index of the first patient")
    ap.add_argument("-v", "--verbose", action="store_true", help="one line per case as it is done")
    ap.add_argument("--force", default="", help="variant overrides for make_patient, k=v,k=v")
    ap.add_argument("--cache", default="", help="folder for rendered volumes (npz): a second run with the "
                    "same arguments only re-runs the localizer")
    args = ap.parse_args(argv)
    names = [p for p in args.profiles.split(",") if p] or list(profiles.PROFILES)
    scales = [float(s) for s in args.scale.split(",")]
    force: dict[str, object] = {}
    for kv in filter(None, args.force.split(",")):
        k, v = kv.split("=")
        force[k] = {"true": True, "false": False}.get(v.lower(), v)
    rows: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    bad: list[str] = []
    t0 = time.time()
    for pi, name in enumerate(names):
        base = profiles.get_profile(name)
        variants = [("", base)]
        if args.coarse:
            variants += [("3mm px 3mm", base.with_(pixel_spacing=3.0, matrix=170, slice_thickness=3.0,
                                                    slice_spacing=3.0, coverage="abdomen_pelvis")),
                         ("3mm px 6mm", base.with_(pixel_spacing=3.0, matrix=170, slice_thickness=6.0,
                                                    slice_spacing=6.0, coverage="abdomen_pelvis"))]
        for i in range(args.n):
            idx = args.first + pi * args.n + i
            for scale in scales:
                kw = dict(force)
                if scale != 1.0:
                    kw["skeleton_scale"] = scale
                patient = population.make_patient(args.seed, idx, **kw)
                scene = anatomy.build_scene(patient)
                for vname, prof in variants:
                    z_range = None
                    wname = ""
                    if args.windows:
                        rng = np.random.default_rng([args.seed, idx])
                        if rng.random() < 0.5:  # ends above the sacrum (mid L3-L4)
                            top = scene.vertebra("T10").centroid_mm[2]
                            bot = scene.vertebra(rng.choice(["L3", "L4"])).centroid_mm[2]
                            wname = "ends mid-lumbar"
                        else:  # starts below the ribs' articulation of T11, reaches the sacrum
                            top = scene.vertebra(rng.choice(["T12", "L1"])).z_range_mm[1] + 8.0
                            bot = scene.landmarks["z_s1"] - 40.0
                            wname = "starts mid-spine"
                        z_range = (float(top), float(bot))
                    r = _render(args.cache, f"{args.seed}-{idx}-{name}-{vname}-{wname}-{scale:g}",
                                lambda: ct.render_volume(scene, prof, seed=idx, z_range=z_range))
                    vol = volume_from_render(r)
                    loc = locate_spine(vol)
                    zs = r["z"]
                    half = prof.slice_thickness / 2.0
                    out = score(loc, scene, float(min(zs)) - half, float(max(zs)) + half)
                    label = "/".join(x for x in (name, vname, wname, f"x{scale:g}" if scale != 1 else "") if x)
                    key = (name, "/".join(x for x in (vname, wname, f"x{scale:g}") if x))
                    rows[key][out] += 1
                    if args.verbose:
                        print(f"{label} patient {idx}: {out} ({time.time() - t0:.0f} s)", flush=True)
                    if out in ("wrong level", "missed"):
                        var = getattr(patient, "variants", None) or {
                            k: getattr(patient, k) for k in ("t12_ribs", "lumbar_rib", "transitional")
                            if hasattr(patient, k)}
                        bad.append(f"{label} patient {idx}: {out}; {loc.reason or ''} "
                                   f"anchors={loc.details.get('anchors')} variants={var}")
    print(f"{'profile':28s} {'variant':26s} {'n':>4s} {'correct':>8s} {'wrong':>6s} {'missed':>7s} "
          f"{'declined':>9s} {'numbered %':>10s}")
    tot = defaultdict(int)
    for (name, var), c in sorted(rows.items()):
        n = sum(c.values())
        judged = c["correct"] + c["wrong level"] + c["missed"]
        pct = 100.0 * c["correct"] / judged if judged else float("nan")
        for k, v in c.items():
            tot[k] += v
        print(f"{name:28s} {var:26s} {n:4d} {c['correct']:8d} {c['wrong level']:6d} {c['missed']:7d} "
              f"{c['declined']:9d} {pct:10.1f}")
    judged = tot["correct"] + tot["wrong level"] + tot["missed"]
    print(f"{'all':28s} {'':26s} {sum(tot.values()):4d} {tot['correct']:8d} {tot['wrong level']:6d} "
          f"{tot['missed']:7d} {tot['declined']:9d} {100.0 * tot['correct'] / max(1, judged):10.1f}")
    print(f"({time.time() - t0:.0f} s)")
    for b in bad:
        print("  ", b)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
