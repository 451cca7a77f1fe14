"""Test by intervention (issue 19): change only the bone, or only the soft tissue, of virtual-cohort
patients and see how every CT estimate moves; and how much of l1_axial's explanation map lies on
the L1 vertebral body.

For each patient the same scene is rendered (same noise seed) as:

* ``base``;
* ``bone x0.6``: every bone's mineral x 0.6 (``Patient.skeleton_scale``), soft tissue untouched --
  the issue asks every model's BMD to fall by >= 0.10 g/cm2;
* ``muscle +30 HU``: the muscles' soft-tissue density x 1.03 (about +30 HU), nothing else;
* ``fat -30 HU``: the subcutaneous and visceral fat's density x 0.97 (about -30 HU);
* ``body x1.25``: the patient drawn 25 % heavier (body size and fat), the header's weight left at
  the base's (femur_coronal reads the weight as an input, and it is not soft tissue);
  the issue asks each soft-tissue change to move no estimate by more than 0.05 g/cm2;
* ``bone x0.05``: next to no bone -- a model input without its target bone must be a decline.

Each series goes through the pipeline with every CT protocol (``process_series``, the shipped
bundles).  Printed: each model's estimate per variant and its change from ``base`` (femur_coronal,
a classifier: its P(osteoporosis)); l1_attenuation's HU; which protocols declined; and, for each
model, the share of its explanation map's mass (on the planes the network read,
:class:`screener.findings.PlaneMap`) that lies on the phantom's target bone: each level's vertebral
body (cortex and trabecular bone) for l1_axial and lumbar_sagittal, each side's femur for
femur_coronal -- the issue's "map mass inside the target bone".  Synthetic patients: not clinical
accuracy.

Run: ``OMP_NUM_THREADS=1 python benchmarks/eval_ct_interventions.py --n 2 [--json out.json]``
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.phantoms.interventions import (ESTIMATES, VARIANTS, estimates, intervened_scene,  # noqa: E402
                                             map_mass_on_target, render_for_ct_models)
#: estimate read from each protocol's findings: (protocol, site, measurement name contains)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2, help="patients (default 2)")
    ap.add_argument("--seed", type=int, default=47, help="cohort seed (default 47)")
    ap.add_argument("--json", default="", help="also write the per-patient numbers here")
    args = ap.parse_args()
    from screener.config import Config
    from screener.pipeline import process_series

    cfg = Config(models_dir=ROOT / "models")
    rows: list[dict[str, Any]] = []
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(args.n):
            for variant in VARIANTS:
                scene, base = intervened_scene(args.seed, index, variant)
                folder = Path(tmp) / f"p{index}-{variant.replace(' ', '_')}"
                paths = render_for_ct_models(scene, base, folder / "in", seed=args.seed)
                res = process_series(paths, config=cfg, out_dir=folder / "out")
                est = estimates(res.findings)
                mass = {f.protocol: map_mass_on_target(f, scene) for f in res.findings if f.plane_maps}
                declined = {d[0]: d[2] for d in res.decisions if not d[1]}
                rows.append({"patient": index, "variant": variant, "estimates": est, "map_mass": mass,
                             "declined": declined})
                print(f"# patient {index} {variant}: {est} map mass {mass} "
                      f"declined {sorted(declined)} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    protocols = [p for p, _, _ in ESTIMATES]
    mapped = ("l1_axial", "lumbar_sagittal", "femur_coronal")
    print(f"| variant | {' | '.join(f'{p} change' for p in protocols)} | "
          + " | ".join(f"{p} map mass on target bone" for p in mapped) + " |")
    print("|---|" + "---|" * (len(protocols) + len(mapped)))
    for variant in VARIANTS:
        cells = []
        for p in protocols:
            deltas = []
            for index in range(args.n):
                b = next(r for r in rows if r["patient"] == index and r["variant"] == "base")["estimates"].get(p)
                v = next(r for r in rows if r["patient"] == index and r["variant"] == variant)["estimates"].get(p)
                if b is not None and v is not None:
                    deltas.append(v - b)
            n_declined = sum(p in r["declined"] for r in rows if r["variant"] == variant)
            text = ", ".join(f"{x:+.3f}" for x in deltas)
            cells.append(f"{text}{'; ' if text and n_declined else ''}{f'declined x{n_declined}' if n_declined else ''}"
                         or "-")
        for p in mapped:
            masses = [r["map_mass"].get(p) for r in rows if r["variant"] == variant]
            cells.append(", ".join(f"{m:.2f}" for m in masses if m is not None) or "-")
        print(f"| {variant} | " + " | ".join(cells) + " |")
    print(f"\n{args.n} patients of cohort seed {args.seed}; changes per patient from its base render "
          "(g/cm2 for the BMD models, probability for femur_coronal, HU for l1_attenuation); "
          f"{time.time() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
