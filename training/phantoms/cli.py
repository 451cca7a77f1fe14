"""``screener phantom``: render a virtual cohort of synthetic patients.

    screener phantom --n 4 --seed 1 --out /tmp/cohort [--kinds ct,hip_xray,dxa] [--profile NAME]

writes ``OUT/<patient_id>/ct/*.dcm``, ``OUT/<patient_id>/hip_xray/*.dcm``,
``OUT/<patient_id>/dxa/*.dcm`` (each study with its own ``labels.json``) and
``OUT/labels.csv`` (one row per patient). Everything is a pure function of
``--seed``: running it twice gives identical files. These are synthetic
patients, not real people; phantom metrics are not clinical accuracy.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import structlog

from training.phantoms.anatomy import build_scene
from training.phantoms.labels import areal_bmd, patient_labels, study_json, write_json, write_labels_csv
from training.phantoms.population import make_patient
from training.phantoms.profiles import PROFILES, TRAINING_PROFILES, get_profile

log = structlog.get_logger(__name__)
KINDS = ("ct", "hip_xray", "dxa")


def profile_for(index: int, seed: int, name: str | None) -> str:
    """The CT profile of patient ``index``: ``name`` or a deterministic pick among training profiles."""
    if name and name != "random":
        get_profile(name)
        return name
    return TRAINING_PROFILES[(index * 7 + seed * 3) % len(TRAINING_PROFILES)]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="screener phantom", description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, required=True, help="number of patients")
    ap.add_argument("--seed", type=int, required=True, help="cohort seed (same seed -> same files)")
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma list of ct, hip_xray, dxa (default all)")
    ap.add_argument("--profile", default="random",
                    help=f"CT profile for every patient, or 'random' (default); one of {sorted(PROFILES)}")
    ap.add_argument("--start", type=int, default=0, help="index of the first patient (to extend a cohort)")
    ap.add_argument("--no-abmd", action="store_true", help="skip the DXA-style aBMD labels (faster)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def render_patient(index: int, seed: int, out: Path, kinds: Sequence[str], profile: str | None,
                   with_abmd: bool = True) -> dict[str, Any]:
    """Render one patient's studies under ``out/<patient_id>/`` and return its labels row."""
    patient = make_patient(seed, index)
    scene = build_scene(patient)
    prof_name = profile_for(index, seed, profile)
    prof = get_profile(prof_name)
    abmd = areal_bmd(scene) if with_abmd else {}
    from training.phantoms.physics import effective_energy
    row = patient_labels(scene, kev=effective_energy(prof.kvp) if "ct" in kinds else None,
                         phase=prof.phase if "ct" in kinds else "native", abmd=abmd, compute_abmd=with_abmd)
    pdir = out / patient.patient_id
    if "ct" in kinds:
        from training.phantoms.ct import render_ct, write_series
        dss = render_ct(scene, prof, seed)
        write_series(dss, pdir / "ct")
        row["ct_profile"] = prof_name
        row["ct_study_uid"] = str(dss[0].StudyInstanceUID)
        row["ct_slices"] = len(dss)
        write_json(study_json(scene, row, {"kind": "ct", "profile": prof_name, "kvp": prof.kvp,
                                           "study_uid": str(dss[0].StudyInstanceUID),
                                           "series_uid": str(dss[0].SeriesInstanceUID),
                                           "pixel_spacing": float(dss[0].PixelSpacing[0]),
                                           "slice_thickness": prof.slice_thickness,
                                           "z_top": float(dss[0].ImagePositionPatient[2]),
                                           "z_bottom": float(dss[-1].ImagePositionPatient[2]),
                                           "phase": prof.phase, "held_out": prof.held_out}),
                   pdir / "ct" / "labels.json")
    for kind, modname, fname in (("hip_xray", "training.phantoms.xray", "render_hip_xray"),
                                 ("dxa", "training.phantoms.dxa", "render_dxa_spine")):
        if kind not in kinds:
            continue
        try:
            mod = __import__(modname, fromlist=[fname])
            render = getattr(mod, fname)
        except (ImportError, AttributeError) as exc:  # pragma: no cover - A2's renderers ship with the package
            raise RuntimeError(f"cannot render {kind}: {modname}.{fname} unavailable ({exc})") from exc
        ds, info = render(scene, seed)
        d = pdir / kind
        d.mkdir(parents=True, exist_ok=True)
        ds.save_as(d / "0001.dcm", enforce_file_format=True)
        row[f"{kind}_study_uid"] = str(ds.StudyInstanceUID)
        write_json(study_json(scene, row, {"kind": kind, "study_uid": str(ds.StudyInstanceUID),
                                           "series_uid": str(ds.SeriesInstanceUID),
                                           "render": {k: v for k, v in info.items() if _small_json_value(v)}}),
                   d / "labels.json")
    return row


def _small_json_value(v: Any) -> bool:
    """Whether a render-info value is small and plain enough to go into labels.json."""
    import numpy as np
    if isinstance(v, np.ndarray):
        return v.size <= 64
    return isinstance(v, (int, float, str, bool, list, tuple, dict, type(None), np.floating, np.integer))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``screener phantom``; returns the exit status."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        print(f"screener phantom: unknown kind(s) {bad}; choose from {list(KINDS)}", file=sys.stderr)
        return 2
    if args.n < 1:
        print("screener phantom: --n must be >= 1", file=sys.stderr)
        return 2
    try:
        profile_for(0, args.seed, args.profile)
    except ValueError as exc:
        print(f"screener phantom: {exc}", file=sys.stderr)
        return 2
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    from tqdm import tqdm
    rows = []
    for i in tqdm(range(args.start, args.start + args.n), desc="phantom", unit="patient", disable=args.quiet):
        rows.append(render_patient(i, args.seed, out, kinds, args.profile, with_abmd=not args.no_abmd))
    write_labels_csv(rows, out / "labels.csv")
    log.info("phantom_cohort_written", n=len(rows), seed=args.seed, out=str(out), kinds=kinds)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
