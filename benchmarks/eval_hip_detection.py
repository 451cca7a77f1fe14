"""Hip detection on held-out cohort radiographs (issue 15): presence, neck ROI, side, metal, BMD.

``python benchmarks/eval_hip_detection.py [--n-standard 100] [--n-variety 150] [--flip off] [--sheet sheet.png]``

Renders held-out patients (:mod:`training.phantoms.xray_variety`; patients and seeds the landmark
model never saw: standard profile seed 1516, variety profile seed 1517, two acquisitions per
patient), runs :func:`screener.hip_landmarks.find_hips` with the committed bundle
``models/hip_landmarks`` and reports per profile:

* hip presence recall and precision (a predicted hip matches a true one when their femoral-head
  centres lie within 20 mm), invented hips on single-hip images;
* femoral-neck ROI centre error (mm at the patient, the header's pixel spacing), share within 5 mm;
* side correct, with ``PatientOrientation`` in the header and without ("side not determined" counts
  as not correct and is reported apart);
* implant metal: hips with metal declined, hips without metal wrongly declined;
* femoral-neck BMD PCC of BMD-GAN (``models/hip_xray``) fed the landmark crop, on the measured hips,
  against the phantom's DXA-style truth (``--bmd``; standard profile at the resolution BMD-GAN was
  trained at; variety stated too).

These are synthetic cohort numbers, not clinical accuracy.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROFILES = {
    "standard": {"seed": 1516, "render": {"pixel_mm": 1.5, "ray_mm": 5.0, "dy_mm": 5.0}},
    "variety": {"seed": 1517, "render": {"pixel_mm": 1.0, "ray_mm": 4.0, "dy_mm": 4.0}},
}
MATCH_MM = 20.0


def _cases(profile: str, n: int, views: int, bmd: bool, workers: int, cache: str = "") -> list[Any]:
    p = PROFILES[profile]
    if cache:
        import pickle

        f = Path(cache) / f"{profile}-{p['seed']}-{n}-{views}-{int(bmd)}.pkl"
        if f.is_file():
            return pickle.loads(f.read_bytes())
        cases = _cases(profile, n, views, bmd, workers)
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(pickle.dumps(cases))
        return cases
    jobs = [(p["seed"], i, profile, views, p["render"], bmd) for i in range(n)]
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(workers) as pool:
            parts = pool.map(_render, jobs, chunksize=2)
    else:
        parts = [_render(j) for j in jobs]
    return [c for part in parts for c in part]


def _render(job: tuple[Any, ...]) -> list[Any]:
    from training.phantoms.xray_variety import render_cases

    seed, i, profile, views, render, bmd = job
    cases = render_cases(seed, i, profile, views=views, with_bmd=bmd, **render)
    for c in cases:
        c.extras["index"] = i
    return cases


def _factors(spec: Any, side: str) -> list[str]:
    """The variety factors of one hip's acquisition (for the breakdown table)."""
    p = spec.pose
    i = 0 if side == "R" else 1
    out = [f"collimation {spec.collimation}"]
    if p.name == "frog_leg":
        out.append("frog-leg")
    elif abs(p.internal_rotation_deg[i]) > 10.0:
        out.append("rotation > 10 deg")
    if p.abduction_deg[i] > 20.0 and p.name != "frog_leg":
        out.append("abduction > 20 deg")
    if spec.metal.get(side, "none") != "none":
        out.append(f"metal: {spec.metal[side]}")
    if spec.child_scale < 1.0:
        out.append("child")
    if spec.obese_mm >= 80.0:
        out.append("obese (>= 80 mm fat)")
    if spec.monochrome1:
        out.append("MONOCHROME1")
    if spec.jpeg_quality is not None:
        out.append("lossy JPEG")
    if spec.bits == 8:
        out.append("8-bit")
    if getattr(spec, "shutter_mm", None) is not None:
        out.append("white collimator margins")
    if spec.markers:
        out.append("side marker burned in")
    return out


def breakdown(res: dict[str, Any]) -> str:
    """Markdown table: recall and neck ROI within 5 mm per variety factor."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for h in res["hips"]:
        for f in h.get("factors", []):
            groups.setdefault(f, []).append(h)
    lines = ["| factor | hips | recall | neck ROI within 5 mm | side correct |", "|---|---|---|---|---|"]
    for f in sorted(groups):
        hs = groups[f]
        m = [h for h in hs if h["matched"]]
        neck = [h["neck_err_mm"] <= 5.0 for h in m]
        side = [h["side_pred"] == h["side"] for h in m]
        lines.append(f"| {f} | {len(hs)} | {len(m) / len(hs):.3f} | "
                     f"{(sum(neck) / len(neck)) if neck else float('nan'):.3f} | "
                     f"{(sum(side) / len(side)) if side else float('nan'):.3f} |")
    return "\n".join(lines)


def evaluate_cases(cases: list[Any], landmarks: Any, bmdgan: tuple[Any, Any, dict[str, Any]] | None) -> dict[str, Any]:
    """Detection (and BMD) records of every hip of ``cases``."""
    import torch

    from screener.hip_landmarks import find_hips, landmark_crop
    from screener.protocols.hip_xray.protocol import combine_estimates
    from screener.radiograph import read_radiograph

    rows: list[dict[str, Any]] = []
    images: list[dict[str, Any]] = []
    for ci, case in enumerate(cases):
        ds = case.dataset
        present, both, inp = find_hips(ds, landmarks)
        sp = inp.spacing_mm
        has_po = str(ds.get("PatientOrientation", "") or "") != ""
        truth = [h for h in case.hips.values() if h.present]
        used = set()
        rec: dict[str, Any] = {"case": ci, "n_true": len(truth), "n_pred": len(present), "orientation": has_po,
                               "collimation": case.spec.collimation, "pred": [], "truth": []}
        for h in truth:
            best, dmin = None, MATCH_MM
            for j, p in enumerate(present):
                if j in used:
                    continue
                d = float(np.hypot((p.head_px[0] - h.head_px[0]) * sp[0], (p.head_px[1] - h.head_px[1]) * sp[1]))
                if d < dmin:
                    best, dmin = j, d
            row: dict[str, Any] = {"case": ci, "side": h.side, "metal": h.metal != "none", "orientation": has_po,
                                   "matched": best is not None, "profile": case.spec.profile,
                                   "collimation": case.spec.collimation, "bmd_true": case.extras.get("bmd", {}).get(h.side),
                                   "factors": _factors(case.spec, h.side)}
            if best is not None:
                used.add(best)
                p = present[best]
                row.update(head_err_mm=dmin,
                           neck_err_mm=float(np.hypot((p.neck_px[0] - h.neck_px[0]) * sp[0],
                                                      (p.neck_px[1] - h.neck_px[1]) * sp[1])),
                           side_pred=p.side, pred_metal=bool(p.metal), prob=p.probability,
                           metal_prob=p.metal_probability, metal_by=p.details.get("metal_by", ""))
                if bmdgan is not None and not p.metal:
                    row["_hip"] = p
            rows.append(row)
        rec["invented"] = len(present) - len(used)
        rec["pred"] = [(p.anatomy, p.side, p.head_px, p.neck_px, p.probability, p.metal) for p in present]
        rec["truth"] = [(h.side, h.head_px, h.neck_px, h.metal) for h in truth]
        images.append(rec)
        if bmdgan is not None:
            todo = [r for r in rows if r["case"] == ci and "_hip" in r]
            if todo:
                bundle, (gen, dec) = bmdgan
                pixel_mm = float((bundle.card.get("preprocessing") or {}).get("pixel_mm", 0.7))
                rad = read_radiograph(ds, pixel_mm)
                shape = tuple(int(v) for v in bundle.input_spec.shape[1:])
                x = np.stack([landmark_crop(rad, r["_hip"], sp, shape).image for r in todo])[:, None]
                stage3 = bundle.predict(x)[:, 0]
                with torch.no_grad():
                    pf = gen(torch.from_numpy(x.astype(np.float32))).float().numpy()[:, 0]
                thr = float(dec["threshold_t"])
                for k, r in enumerate(todo):
                    m = pf[k] >= thr
                    lin = float(dec["slope"] * pf[k][m].mean() + dec["intercept"]) if m.any() else float("nan")
                    r["bmd_pred"] = float(combine_estimates(np.array([stage3[k]]), np.array([lin]),
                                                            float(dec.get("linear_weight", 0.0)))[0])
            # reference: the old midline split on whole AP pelves (both hips present)
            if case.spec.collimation == "pelvis" and len(truth) == 2:
                from screener.protocols.hip_xray.preprocess import preprocess_hip_radiograph

                bundle, (gen, dec) = bmdgan
                shape = tuple(int(v) for v in bundle.input_spec.shape[1:])
                pixel_mm = float((bundle.card.get("preprocessing") or {}).get("pixel_mm", 0.7))
                _, halves = preprocess_hip_radiograph(ds, shape=shape, pixel_mm=pixel_mm)
                sides = [s for s in ("R", "L") if s in halves]
                x = np.stack([halves[s].image for s in sides])[:, None]
                stage3 = bundle.predict(x)[:, 0]
                with torch.no_grad():
                    pf = gen(torch.from_numpy(x.astype(np.float32))).float().numpy()[:, 0]
                thr = float(dec["threshold_t"])
                for k, side in enumerate(sides):
                    m = pf[k] >= thr
                    lin = float(dec["slope"] * pf[k][m].mean() + dec["intercept"]) if m.any() else float("nan")
                    val = float(combine_estimates(np.array([stage3[k]]), np.array([lin]),
                                                  float(dec.get("linear_weight", 0.0)))[0])
                    for r in rows:
                        if r["case"] == ci and r["side"] == side:
                            r["bmd_midline"] = val
        for r in rows:
            r.pop("_hip", None)
    return {"hips": rows, "images": images}


def summarise(res: dict[str, Any]) -> dict[str, Any]:
    """The table row of one profile."""
    hips, images = res["hips"], res["images"]
    n_true = len(hips)
    matched = [h for h in hips if h["matched"]]
    n_pred = sum(im["n_pred"] for im in images)
    invented = sum(im["invented"] for im in images)
    single = [im for im in images if im["n_true"] == 1]
    measurable = [h for h in matched if not h["metal"]]
    neck = np.array([h["neck_err_mm"] for h in measurable]) if measurable else np.zeros(0)
    head = np.array([h["head_err_mm"] for h in matched]) if matched else np.zeros(0)

    def side_rate(sel: list[dict[str, Any]]) -> tuple[float | None, int, int]:
        if not sel:
            return None, 0, 0
        ok = sum(h["side_pred"] == h["side"] for h in sel)
        nd = sum(h["side_pred"] is None for h in sel)
        return ok / len(sel), len(sel), nd

    s_po, n_po, nd_po = side_rate([h for h in matched if h["orientation"]])
    s_no, n_no, nd_no = side_rate([h for h in matched if not h["orientation"]])
    metal = [h for h in matched if h["metal"]]
    clean = [h for h in matched if not h["metal"]]
    bmd = [(h["bmd_true"], h["bmd_pred"]) for h in measurable if h.get("bmd_pred") is not None
           and h.get("bmd_true") is not None and np.isfinite(h["bmd_pred"])]
    pcc = float(np.corrcoef(np.array(bmd).T)[0, 1]) if len(bmd) > 3 else None
    pairs = [(h["bmd_true"], h["bmd_pred"], h["bmd_midline"]) for h in measurable if h.get("bmd_midline") is not None
             and h.get("bmd_pred") is not None and h.get("bmd_true") is not None and np.isfinite(h["bmd_pred"])]
    pp = np.array(pairs).T if len(pairs) > 3 else None
    mae = float(np.mean([abs(a - b) for a, b in bmd])) if bmd else None
    return {
        "images": len(images), "hips_true": n_true, "hips_pred": n_pred,
        "recall": len(matched) / max(n_true, 1), "precision": len(matched) / max(n_pred, 1),
        "invented_hips": invented, "single_hip_images": len(single),
        "invented_on_single_hip_images": sum(im["invented"] for im in single),
        "empty_images_with_a_hip": 0,
        "head_err_mm_median": float(np.median(head)) if head.size else None,
        "neck_err_mm_median": float(np.median(neck)) if neck.size else None,
        "neck_err_mm_p95": float(np.percentile(neck, 95)) if neck.size else None,
        "neck_within_5mm": float(np.mean(neck <= 5.0)) if neck.size else None,
        "side_correct_with_orientation": s_po, "hips_with_orientation": n_po, "side_not_determined_with": nd_po,
        "side_correct_without_orientation": s_no, "hips_without_orientation": n_no, "side_not_determined_without": nd_no,
        "metal_hips": len(metal), "metal_declined": sum(h["pred_metal"] for h in metal) / max(len(metal), 1) if metal else None,
        "clean_hips_declined_as_metal": sum(h["pred_metal"] for h in clean),
        "metal_declined_by_pixels": (sum("stored values" in h.get("metal_by", "") for h in metal) / len(metal)) if metal else None,
        "metal_declined_by_network": (sum("metal map" in h.get("metal_by", "") for h in metal) / len(metal)) if metal else None,
        "bmd_hips": len(bmd), "bmd_pcc": pcc, "bmd_mae": mae,
        "bmd_pelvis_hips": len(pairs),
        "bmd_pcc_pelvis_landmark": float(np.corrcoef(pp[0], pp[1])[0, 1]) if pp is not None else None,
        "bmd_pcc_pelvis_midline": float(np.corrcoef(pp[0], pp[2])[0, 1]) if pp is not None else None,
    }


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def table(summaries: dict[str, dict[str, Any]]) -> str:
    """Markdown table, one column per profile."""
    keys = [("images", "images"), ("hips_true", "hips present (truth)"), ("hips_pred", "hips reported"),
            ("recall", "presence recall (goal >= 0.99)"), ("precision", "presence precision (goal >= 0.995)"),
            ("invented_on_single_hip_images", "invented hips on single-hip images"),
            ("single_hip_images", "single-hip images"),
            ("head_err_mm_median", "femoral-head centre error, median (mm)"),
            ("neck_err_mm_median", "neck ROI centre error, median (mm)"),
            ("neck_err_mm_p95", "neck ROI centre error, 95th percentile (mm)"),
            ("neck_within_5mm", "neck ROI centre within 5 mm (goal >= 0.95)"),
            ("side_correct_with_orientation", "side correct, PatientOrientation in header (goal 1.0)"),
            ("hips_with_orientation", "  hips"), ("side_not_determined_with", "  side not determined"),
            ("side_correct_without_orientation", "side correct, no orientation (goal >= 0.98)"),
            ("hips_without_orientation", "  hips"), ("side_not_determined_without", "  side not determined"),
            ("metal_hips", "hips with metal"), ("metal_declined", "  declined for metal"),
            ("metal_declined_by_pixels", "    by the stored-value check"),
            ("metal_declined_by_network", "    by the network's metal map"),
            ("clean_hips_declined_as_metal", "hips without metal declined for metal"),
            ("bmd_hips", "hips measured by BMD-GAN"), ("bmd_pcc", "femoral-neck BMD PCC (landmark crop)"),
            ("bmd_mae", "femoral-neck BMD MAE (g/cm2)"),
            ("bmd_pelvis_hips", "whole AP pelves: hips"),
            ("bmd_pcc_pelvis_landmark", "  BMD PCC, landmark crop"),
            ("bmd_pcc_pelvis_midline", "  BMD PCC, old midline split")]
    names = list(summaries)
    out = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for k, label in keys:
        out.append(f"| {label} | " + " | ".join(_fmt(summaries[n].get(k)) for n in names) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table (and JSON with ``--json``)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-standard", type=int, default=100, help="standard-profile patients (2 images each)")
    ap.add_argument("--n-variety", type=int, default=150, help="variety-profile patients (2 images each)")
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--bmd", action="store_true", help="also BMD-GAN on the landmark crops (needs the DXA truth)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--models", default=str(ROOT / "models"))
    ap.add_argument("--landmarks", default="", help="landmark bundle to evaluate (default <models>/hip_landmarks)")
    ap.add_argument("--flip", choices=["card", "on", "off"], default="card",
                    help="test-time flip averaging of the landmark maps: as the bundle's card says (default), or forced")
    ap.add_argument("--cache", default="", help="folder to keep the rendered cases in (re-runs skip rendering)")
    ap.add_argument("--render-only", action="store_true", help="render (into --cache) and stop")
    ap.add_argument("--json", default="", help="write the summaries and per-hip records here")
    ap.add_argument("--sheet", default="", help="contact sheet PNG of variety images (truth and prediction)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    if args.render_only:
        for profile, n in (("standard", args.n_standard), ("variety", args.n_variety)):
            if n > 0:
                _cases(profile, n, args.views, args.bmd, args.workers, args.cache)
        return 0
    from screener.hip_landmarks import load_landmark_bundle

    landmarks = load_landmark_bundle(Path(args.landmarks) if args.landmarks else Path(args.models) / "hip_landmarks")
    if args.flip != "card":  # the loaded bundle is cached per process: this run only
        landmarks.card.setdefault("decoding", {})["flip_average"] = args.flip == "on"
    bmdgan = None
    if args.bmd:
        from screener.bundles import load_bundle
        from training.hip_xray import NETWORKS, load_aux

        hb = load_bundle(Path(args.models) / "hip_xray", "cpu", networks=NETWORKS)
        gen, _, dec = load_aux(Path(args.models) / "hip_xray")
        bmdgan = (hb, (gen.eval(), dec))
    summaries, records = {}, {}
    for profile, n in (("standard", args.n_standard), ("variety", args.n_variety)):
        if n <= 0:
            continue
        t0 = time.time()
        cases = _cases(profile, n, args.views, args.bmd, args.workers, args.cache)
        t1 = time.time()
        res = evaluate_cases(cases, landmarks, bmdgan)
        summaries[profile] = summarise(res)
        records[profile] = res
        print(f"[{profile}] {len(cases)} images rendered in {t1 - t0:.0f} s, evaluated in {time.time() - t1:.0f} s",
              file=sys.stderr, flush=True)
        if args.sheet and profile == "variety":
            contact_sheet(cases[:24], landmarks, args.sheet)
    print(table(summaries))
    if "variety" in records:
        print()
        print(breakdown(records["variety"]))
    if args.json:
        Path(args.json).write_text(json.dumps({"summaries": summaries, "records": records}, default=str, indent=1))
    return 0


def contact_sheet(cases: list[Any], landmarks: Any, path: str, tile: int = 320, cols: int = 6) -> None:
    """Variety images with truth (green: head, neck) and prediction (red / blue by side) drawn."""
    from PIL import Image, ImageDraw

    from screener.hip_landmarks import find_hips
    from training.phantoms.xray_variety import spec_summary

    tiles = []
    for case in cases:
        present, _, inp = find_hips(case.dataset, landmarks)
        img = Image.fromarray((inp.display * 255).astype(np.uint8)).convert("RGB")
        d = ImageDraw.Draw(img)
        r = max(3, int(min(img.size) / 60))
        for h in case.hips.values():
            if not h.present:
                continue
            for (pr, pc), rad in ((h.head_px, 2 * r), (h.neck_px, r)):
                d.ellipse([pc - rad, pr - rad, pc + rad, pr + rad], outline=(0, 255, 0), width=2)
        for p in present:
            col = {"R": (255, 60, 60), "L": (80, 140, 255)}.get(p.side or "", (255, 255, 0))
            for (pr, pc), rad in ((p.head_px, 2 * r), (p.neck_px, r)):
                d.line([pc - rad, pr, pc + rad, pr], fill=col, width=2)
                d.line([pc, pr - rad, pc, pr + rad], fill=col, width=2)
            d.line([p.head_px[1], p.head_px[0], p.neck_px[1], p.neck_px[0]], fill=col, width=1)
            d.text((p.head_px[1] + 2 * r, p.head_px[0] - 2 * r), f"{p.side or '?'}{' metal' if p.metal else ''}",
                   fill=col)
        img.thumbnail((tile, tile - 30))
        t = Image.new("RGB", (tile, tile), (20, 20, 20))
        t.paste(img, (0, 0))
        s = spec_summary(case.spec)
        dd = ImageDraw.Draw(t)
        dd.text((2, tile - 29), f"{s['collimation']} {s['pose']} rot {s['rotation_deg']} abd {s['abduction_deg']}",
                fill=(255, 255, 255))
        dd.text((2, tile - 15), f"metal {s['metal_R']}/{s['metal_L']} child {int(s['child'])} obese {s['obese_mm']} "
                                f"{'M1 ' if s['monochrome1'] else ''}{s['bits']}b {'PO' if s['orientation_header'] else 'noPO'}"
                                f"{' mirror' if s['mirror'] else ''}", fill=(255, 255, 255))
        tiles.append(t)
    rows = (len(tiles) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * tile, rows * tile))
    for k, t in enumerate(tiles):
        sheet.paste(t, ((k % cols) * tile, (k // cols) * tile))
    sheet.save(path)


if __name__ == "__main__":
    sys.exit(main())
