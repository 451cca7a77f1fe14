"""Contact sheet of the virtual cohort: every modality of a few synthetic patients side by side.

``python -m training.phantoms.contact_sheet --out docs/img/contact_sheet.png`` renders, for 4
patients chosen to show the range of the cohort (a young adult, an older woman with scoliosis, a
patient with a vertebral fracture, an older man), one row of:

1. axial CT through the centre of L1 (window L 40 / W 400),
2. coronal CT through the femoral heads (L 300 / W 1500),
3. mid-sagittal CT of the spine (L 300 / W 1500),
4. the AP pelvis radiograph (DX, supine, its own window),
5. the DXA lumbar-spine bone areal-density image (0-1.6 g/cm^2) with the L1-L4 ROI boxes.

CT planes come from :func:`training.phantoms.ct.render_plane` at 120 kVp's effective energy, the
projections from :mod:`training.phantoms.xray` and :mod:`training.phantoms.dxa`.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

PANEL_H = 240
CT_KVP = 120.0


def _window(img: np.ndarray, level: float, width: float) -> np.ndarray:
    return np.clip((np.asarray(img, float) - (level - width / 2.0)) / width * 255.0, 0, 255).astype(np.uint8)


def _panel(img8: np.ndarray, aspect: float = 1.0, height: int = PANEL_H) -> Image.Image:
    """Resize an 8-bit image to ``height`` rows; ``aspect`` = row spacing / column spacing."""
    h, w = img8.shape
    width = max(1, int(round(height * (w / (h * aspect)))))
    return Image.fromarray(img8).resize((width, height), Image.BILINEAR)


def pick_patients(seed: int = 7, n_pool: int = 60) -> list[Any]:
    """Four patients that show the cohort's range (deterministic for ``seed``)."""
    from training.phantoms.population import sample_population

    pool = sample_population(n_pool, seed)
    chosen: list[Any] = []

    def take(pred: Any) -> None:
        for p in pool:
            if p not in chosen and pred(p):
                chosen.append(p)
                return
        for p in pool:  # fall back to anyone not yet chosen
            if p not in chosen:
                chosen.append(p)
                return

    take(lambda p: p.age < 40)
    take(lambda p: p.sex == "F" and p.age >= 60 and getattr(p, "scoliosis", False))
    take(lambda p: any(g >= 2 for k, g in p.fracture_grade.items() if k in ("T12", "L1", "L2", "L3", "L4")))
    take(lambda p: p.sex == "M" and p.age >= 60)
    return chosen


def render_row(patient: Any, seed: int) -> list[tuple[str, Image.Image]]:
    """The five panels of one patient."""
    from training.phantoms import ct, physics
    from training.phantoms.anatomy import build_scene
    from training.phantoms.dxa import render_dxa_spine
    from training.phantoms.xray import render_hip_xray

    scene = build_scene(patient)
    kev = physics.effective_energy(CT_KVP)
    verts = {v.label: v for v in scene.vertebrae}
    l1 = np.asarray(verts["L1"].centroid_mm, float)
    heads = np.array([scene.femoral_heads["R"], scene.femoral_heads["L"]], float)
    hc = heads.mean(axis=0)
    (x0, x1), (y0, y1), (z0, z1) = scene.bounds()
    panels = []
    # axial through L1: columns +x (patient left on the right of the image, radiological view shows
    # patient's right on the viewer's left), rows +y (anterior at the top)
    sp = 0.9
    shape = (int((y1 - y0 + 40) / sp), int((x1 - x0 + 40) / sp))
    origin = np.array([x0 - 20, y0 - 20, l1[2]])
    ax = ct.render_plane(scene, origin, (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), shape, (sp, sp), kev)
    panels.append(("axial L1", _panel(_window(ax, 40, 400))))
    # coronal through the femoral heads: rows from superior to inferior
    zc0, zc1 = hc[2] + 170.0, hc[2] - 130.0
    shape = (int((zc0 - zc1) / sp), int((x1 - x0 + 20) / sp))
    origin = np.array([x0 - 10, hc[1], zc0])
    co = ct.render_plane(scene, origin, (1.0, 0.0, 0.0), (0.0, 0.0, -1.0), shape, (sp, sp), kev)
    panels.append(("coronal hips", _panel(_window(co, 300, 1500))))
    # mid-sagittal through the lumbar spine: columns anterior -> posterior
    zs0 = max(v.z_range_mm[1] for v in scene.vertebrae) + 15.0
    zs1 = hc[2] - 20.0
    shape = (int((zs0 - zs1) / sp), int((y1 - y0 + 20) / sp))
    origin = np.array([l1[0], y0 - 10, zs0])
    sa = ct.render_plane(scene, origin, (0.0, 1.0, 0.0), (0.0, 0.0, -1.0), shape, (sp, sp), kev)
    panels.append(("sagittal", _panel(_window(sa, 300, 1500))))
    # hip radiograph
    ds, _ = render_hip_xray(scene, seed, "supine", ray_mm=1.5, dy_mm=1.5)
    xr = ds.pixel_array.astype(float)
    panels.append(("hip radiograph", _panel(_window(xr, float(ds.WindowCenter), float(ds.WindowWidth)))))
    # DXA
    _, info = render_dxa_spine(scene, seed)
    img = _window(info["sigma_b"], 0.8, 1.6)
    rgb = Image.fromarray(img).convert("RGB")
    draw = ImageDraw.Draw(rgb)
    for label, (r0, r1, c0, c1) in info["rois"].items():
        draw.rectangle([c0, r0, c1 - 1, r1 - 1], outline=(255, 200, 0))
    ratio = info["pixel_mm"][0] / info["pixel_mm"][1]
    h, w = img.shape
    width = int(round(PANEL_H * w / (h * ratio)))
    label = f"DXA L1-L4 {info['abmd']['L1-L4']:.2f} g/cm2"
    panels.append((label, rgb.resize((width, PANEL_H), Image.BILINEAR)))
    return panels


def contact_sheet(patients: Sequence[Any], seed: int = 7) -> Image.Image:
    """Compose the rows of :func:`render_row` into one image with captions."""
    rows = []
    for p in patients:
        panels = render_row(p, seed)
        caption = (f"{p.patient_id}  {p.sex} {p.age:.0f} y  L1 vBMD {p.vbmd['L1']:.0f} mg/cm3  "
                   f"Cobb {getattr(p, 'cobb_deg', 0.0):.0f} deg  "
                   f"fractures {','.join(f'{k}:{g}' for k, g in p.fracture_grade.items() if g) or 'none'}")
        rows.append((caption, panels))
    gap, cap_h = 6, 16
    width = max(sum(im.width for _, im in panels) + gap * (len(panels) + 1) for _, panels in rows)
    height = sum(PANEL_H + cap_h + gap for _ in rows) + gap
    sheet = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    y = gap
    for caption, panels in rows:
        draw.text((gap, y), caption, fill=(230, 230, 230))
        x = gap
        for label, im in panels:
            sheet.paste(im.convert("RGB"), (x, y + cap_h))
            draw.text((x + 3, y + cap_h + 2), label, fill=(255, 220, 0))
            x += im.width + gap
        y += PANEL_H + cap_h + gap
    return sheet


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: write the contact sheet PNG."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/img/contact_sheet.png"))
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    sheet = contact_sheet(pick_patients(args.seed), args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out, optimize=True)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
