"""Inference time per study for each model protocol, split into preprocessing / model / explanation.

Renders one virtual-cohort abdomen-pelvis CT (for ``l1_axial``, ``femur_coronal``,
``lumbar_sagittal``), one AP pelvis radiograph (``hip_xray``) and one DXA spine image
(``dxa_spine``), loads them as the daemon does, then runs each protocol ``--repeats`` times
with the shipped bundles (``models/``) and prints the median milliseconds per study and the
share of each stage, as the protocol measured it (``Finding.details["timing_ms"]``).  The
spine localizer, shared by the spine protocols and run once per series, is timed on its own.
Runs on the GPU when one is present (``--device auto``), else on the CPU::

    python benchmarks/bench_inference.py [--repeats 3] [--device auto|cpu|cuda]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CT = ("l1_axial", "femur_coronal", "lumbar_sagittal")
RADIOGRAPHS = {"hip_xray": "hip", "dxa_spine": "dxa"}
STAGES = ("preprocess", "model", "explain")


def render_inputs(out: Path) -> dict[str, list[Path]]:
    """Write the three studies; returns kind -> files."""
    from training.phantoms.anatomy import build_scene
    from training.phantoms.ct import render_ct, write_series
    from training.phantoms.dxa import render_dxa_spine
    from training.phantoms.population import make_patient
    from training.phantoms.xray import render_hip_xray

    scene = build_scene(make_patient(21, 4))
    files = {"ct": write_series(render_ct(scene, "canon_ap_native", 21), out / "ct")}
    for kind, (ds, _) in (("hip", render_hip_xray(scene, 21)), ("dxa", render_dxa_spine(scene, 21))):
        (out / kind).mkdir(parents=True, exist_ok=True)
        path = out / kind / "image.dcm"
        ds.save_as(path, enforce_file_format=True)
        files[kind] = [path]
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = ap.parse_args(argv)

    import torch

    from screener.config import Config
    from screener.localizer import locate_spine
    from screener.protocols import default_protocols
    from screener.protocols.base import ProtocolContext
    from screener.series import load_volume, read_series_info

    cfg = Config(device=args.device)
    device = "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        files = render_inputs(Path(tmp))
        info_ct = read_series_info(files["ct"])
        t0 = time.perf_counter()
        volume = load_volume(files["ct"])
        load_ms = 1000 * (time.perf_counter() - t0)
        t0 = time.perf_counter()
        loc = locate_spine(volume)
        loc_ms = 1000 * (time.perf_counter() - t0)
        print(f"device {device} ({torch.get_num_threads()} CPU threads); CT {volume.array.shape} "
              f"load {load_ms:.0f} ms, spine localizer {loc_ms:.0f} ms (once per series, shared)")
        print(f"{'protocol':<16}{'ms/study':>10}" + "".join(f"{s:>12}" for s in STAGES))
        protocols = {p.name: p for p in default_protocols(list(CT) + list(RADIOGRAPHS))}
        for name, p in protocols.items():
            if name in CT:
                info, vol = info_ct, volume
            else:
                info, vol = read_series_info(files[RADIOGRAPHS[name]]), None
            totals, stages = [], {s: [] for s in STAGES}
            for r in range(args.repeats + 1):  # the first run loads the bundle: not counted
                ctx = ProtocolContext(config=cfg, info=info, extras={"spine_localization": loc})
                t0 = time.perf_counter()
                findings = p.run(vol, ctx)
                if device == "cuda":
                    torch.cuda.synchronize()
                ms = 1000 * (time.perf_counter() - t0)
                if r == 0:
                    continue
                totals.append(ms)
                timing = next((f.details["timing_ms"] for f in findings if "timing_ms" in f.details), {})
                for s in STAGES:
                    stages[s].append(float(timing.get(s, 0.0)))
            total = statistics.median(totals)
            shares = "".join(f"{statistics.median(stages[s]) / total:>12.0%}" for s in STAGES)
            print(f"{name:<16}{total:>10.0f}{shares}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
