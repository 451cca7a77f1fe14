"""Standard vs ``realism`` profile (issue 19): the shipped CT models on the same virtual-cohort
patients rendered once in a training profile and once in the never-trained ``realism`` profile.

Each patient (no transitional anatomy, normal 12th ribs, no bone islands, as in
``training/phantoms/interventions.py``) is rendered from T11 to 60 mm below the femoral heads:

* ``standard``: ``siemens_ap_pv`` (a training profile: Siemens 120 kVp portal-venous, B30f) at the
  ``realism`` profile's slice geometry (3 mm every 2 mm), so the two differ only in what the
  realism profile adds: kernel-shaped noise spectrum and level, the blurrier Br38f-like kernel,
  fat / muscle / organ / trabecular texture and 2 x 2 in-plane partial volume
  (``training/phantoms/profiles.py``);
* ``realism``.

Every CT protocol runs through ``screener.pipeline.process_series`` with the shipped bundles.
Per model: the estimate against the phantom's truth label (l1_axial and lumbar_sagittal L1 BMD vs
``abmd_l1``, g/cm2; femur_coronal P(osteoporosis) (per cent) beside the hip WHO class (lower of femoral-neck and
total-hip T, the recipe's default label); l1_attenuation's L1 HU vs the L1 trabecular HU of the
composition at 120 kVp portal-venous, ``labels.trabecular_hu``), the declines, and the change
standard -> realism on the same patient.  Synthetic patients: not clinical accuracy.

Run: ``OMP_NUM_THREADS=1 python benchmarks/eval_ct_realism.py --n 5 [--seed 53] [--json out.json]``
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# the estimate of each protocol (protocol, site, measurement name contains), as
# benchmarks/eval_ct_interventions.py reads them
from training.phantoms.interventions import ESTIMATES, estimates  # noqa: E402

PROFILES = ("standard", "realism")
#: ablations of the realism profile (``--profiles``): which of its additions moves the models
ABLATIONS = ("realism_no_texture", "realism_no_bone_texture")


def _profile(kind: str) -> Any:
    from training.phantoms import profiles

    if kind == "standard":
        return profiles.get_profile("siemens_ap_pv").with_(slice_thickness=3.0, slice_spacing=2.0)
    real = profiles.get_profile("realism")
    if kind == "realism_no_texture":  # kernel, noise spectrum and level, supersampling only
        return real.with_(tissue_texture=())
    if kind == "realism_no_bone_texture":  # everything but the added trabecular texture
        return real.with_(tissue_texture=tuple(t for t in real.tissue_texture if t[0] != "trabecular"))
    return real


def truth(scene: Any) -> dict[str, float]:
    from training.phantoms import labels, physics

    ab = labels.areal_bmd(scene)
    row = labels.patient_labels(scene, kev=physics.effective_energy(120.0), phase="portal_venous", abmd=ab)
    t_hip = min(float(row["t_femoral_neck"]), float(row["t_total_hip"]))
    return {"abmd_l1": float(ab["L1"]), "t_hip": t_hip, "hip_osteoporosis": float(t_hip <= -2.5),
            "l1_hu_pv": float(labels.trabecular_hu(scene, "L1", physics.effective_energy(120.0), "portal_venous"))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5, help="patients (default 5)")
    ap.add_argument("--seed", type=int, default=53, help="cohort seed (default 53)")
    ap.add_argument("--json", default="", help="also write the per-patient numbers here")
    ap.add_argument("--profiles", default=",".join(PROFILES),
                    help=f"renders to compare, the first is the base (default standard,realism; also {', '.join(ABLATIONS)})")
    ap.add_argument("--indices", default="", help="patient indices instead of 0..n-1 (comma-separated)")
    args = ap.parse_args()
    args.kinds = [k for k in args.profiles.split(",") if k]
    args.indices = [int(i) for i in args.indices.split(",") if i] or list(range(args.n))
    from screener.config import Config
    from screener.pipeline import process_series
    from training.phantoms import anatomy, ct, population

    cfg = Config(models_dir=ROOT / "models")
    rows: list[dict[str, Any]] = []
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for index in args.indices:
            patient = population.make_patient(args.seed, index, t12_ribs="normal", transitional="none",
                                              bone_islands=[])
            scene = anatomy.build_scene(patient)
            tr = truth(scene)
            z_lo = min(c[2] for c in scene.femoral_heads.values()) - 60.0
            z_hi = scene.vertebra("T11").centroid_mm[2]
            for kind in args.kinds:
                folder = Path(tmp) / f"p{index}-{kind}"
                dss = ct.render_ct(scene, _profile(kind), seed=args.seed, z_range=(z_hi, z_lo))
                paths = ct.write_series(dss, folder / "in")
                res = process_series(paths, config=cfg, out_dir=folder / "out")
                declined = {d[0]: d[2] for d in res.decisions if not d[1]}
                rows.append({"patient": index, "profile": kind, "age": patient.age, "sex": patient.sex,
                             "truth": tr, "estimates": estimates(res.findings), "declined": declined})
                print(f"# patient {index} {kind}: {rows[-1]['estimates']} declined {sorted(declined)} "
                      f"({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    print(report(rows, args))
    print(f"\npatients {args.indices} of cohort seed {args.seed}; {time.time() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=float) + "\n")
    return 0


def _truth_key(protocol: str) -> str:
    return {"l1_axial": "abmd_l1", "lumbar_sagittal": "abmd_l1", "femur_coronal": "hip_osteoporosis",
            "l1_attenuation": "l1_hu_pv"}[protocol]


def report(rows: list[dict[str, Any]], args: Any) -> str:
    lines = [("| model | truth | profile | estimates (per patient) | error vs truth: mean (MAE) | declined | "
              f"change {args.kinds[0]} → profile (per patient) |"), "|---|---|---|---|---|---|---|"]
    idx = args.indices
    for protocol, _, _ in ESTIMATES:
        key = _truth_key(protocol)
        for kind in args.kinds:
            rs = [next(r for r in rows if r["patient"] == i and r["profile"] == kind) for i in idx]
            est = [r["estimates"].get(protocol) for r in rs]
            tru = [r["truth"][key] for r in rs]
            fmt = "{:.0f}" if protocol == "l1_attenuation" else ("{:.2f}" if protocol == "femur_coronal" else "{:.3f}")
            cells = ", ".join("–" if e is None else fmt.format(e) for e in est)
            errs = [e - t for e, t in zip(est, tru) if e is not None]
            err = (f"{np.mean(errs):+.3f} ({np.mean(np.abs(errs)):.3f})" if errs and protocol != "l1_attenuation"
                   else (f"{np.mean(errs):+.1f} ({np.mean(np.abs(errs)):.1f})" if errs else "–"))
            n_dec = sum(protocol in r["declined"] for r in rs)
            change = ""
            if kind != args.kinds[0]:
                base = [next(r for r in rows if r["patient"] == i and r["profile"] == args.kinds[0])["estimates"].get(protocol)
                        for i in idx]
                change = ", ".join("–" if (a is None or b is None) else
                                   (f"{b - a:+.0f}" if protocol == "l1_attenuation" else
                                    (f"{b - a:+.2f}" if protocol == "femur_coronal" else f"{b - a:+.3f}"))
                                   for a, b in zip(base, est))
            if protocol == "femur_coronal":  # P(osteoporosis) in %: show the hip T-scores, no error
                tru_t = [r["truth"]["t_hip"] for r in rs]
                truth_txt = ("hip T " + ", ".join(f"{t:+.1f}" for t in tru_t)) if kind == args.kinds[0] else ""
                err = f"{sum(r['truth']['hip_osteoporosis'] for r in rs):.0f} osteoporotic by hip T"
            else:
                truth_txt = ", ".join(fmt.format(t) for t in tru) if kind == args.kinds[0] else ""
            lines.append(f"| {protocol} | {truth_txt} | {kind} | {cells} | {err} | {n_dec} | {change} |")
    reasons = sorted({f"{r['profile']} p{r['patient']} {p}: {why}" for r in rows for p, why in r["declined"].items()
                      if p in {q for q, _, _ in ESTIMATES}})
    return "\n".join(lines) + ("\n\nDeclines:\n" + "\n".join(f"- {x}" for x in reasons) if reasons else "")


if __name__ == "__main__":
    raise SystemExit(main())
