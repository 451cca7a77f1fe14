"""Virtual-cohort rendering speed (issue 2 targets: full CT < 20 s, >= 50 L1-axial samples/s).

Prints

* seconds to render one abdomen-pelvis CT series (512 x 512) at 1.25 mm and at 5 mm
  slices (scene build + physics + partial volume + blur + noise + DICOM datasets; writing
  the files is timed separately), and
* two-dimensional L1-axial training samples per second with :func:`render_plane`
  (256 x 256 at 0.8 mm): for new patients (population draw + scene build limited to
  ``z_window=(-45, 45)`` around L1 + plane) and for
  new planes of an already built patient (slice jitter around L1, as a training loader
  samples several planes per patient),

with the ratios to the targets. Run from the project root::

    python benchmarks/bench_phantom.py [--samples 200]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.phantoms.anatomy import build_scene  # noqa: E402
from training.phantoms.ct import axial_through, render_ct, render_plane, write_series  # noqa: E402
from training.phantoms.population import make_patient  # noqa: E402
from training.phantoms.profiles import PROFILES  # noqa: E402


def bench_ct(thickness: float) -> tuple[float, float, int]:
    prof = PROFILES["ge_ap_pv"].with_(slice_thickness=thickness, slice_spacing=thickness)
    t0 = time.perf_counter()
    scene = build_scene(make_patient(1, 0))
    dss = render_ct(scene, prof, seed=1)
    t_render = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        t1 = time.perf_counter()
        write_series(dss, Path(d))
        t_write = time.perf_counter() - t1
    return t_render, t_write, len(dss)


def bench_planes(n: int, new_patient: bool) -> float:
    scene = build_scene(make_patient(3, 0))
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for i in range(n):
        if new_patient:
            scene = build_scene(make_patient(3, i + 1), z_window=(-45.0, 45.0))
        a = axial_through(scene, "L1", fov_mm=204.8, matrix=256, offset_mm=float(rng.uniform(-4, 4)))
        a["origin"] = a["origin"] + np.array([0.0, 30.0, 0.0])
        render_plane(scene, kev=70.0, noise_hu=12.0, blur_mm=0.5, seed=i, **a)
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=200)
    args = ap.parse_args(argv)
    for th in (1.25, 5.0):
        t, w, n = bench_ct(th)
        print(f"abdomen-pelvis CT {th:g} mm: {n} slices 512x512, render {t:.1f} s, write {w:.1f} s; "
              f"target 20 s -> ratio {(t + w) / 20.0:.2f}")
    for new in (True, False):
        sps = bench_planes(args.samples, new)
        what = "new patient each" if new else "same patient, jittered slice"
        print(f"L1-axial 256x256 samples/s ({what}): {sps:.0f}; target 50 -> ratio {sps / 50.0:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
