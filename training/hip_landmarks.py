"""Train the hip landmark network (:mod:`screener.hip_landmarks`) on the virtual cohort's radiographs.

``python -m training.hip_landmarks train --out models/hip_landmarks`` renders (and caches in
``~/.cache/screener/hip_landmarks``) the ``standard`` profile of :mod:`training.phantoms.xray_variety`
-- the paper's four poses, whole pelves, single hips, off-centre pelves, mirrored and inverted
images, markers and text -- runs every image through :func:`screener.hip_landmarks.landmark_input`
(the function the daemon calls) and fits :class:`screener.hip_landmarks.HipLandmarkNet` to Gaussian
heat maps of the femoral-head centre and the femoral-neck ROI centre of each hip present, by
anatomical side (the hip whose pelvis lies towards increasing column, and the other).  The
``variety`` profile (rotation, abduction, implants, children, obesity, low-bit and lossy images) is
never trained on: :mod:`benchmarks.eval_hip_detection` reports it separately.  With ``--wide`` (0.4.0)
the ``wide`` profile (its own sampler over the archive's factors, other patients of the training seed,
splits ``wide_train`` / ``wide_val``) is trained on too, and the network gains two metal maps.

Data split (patients never shared): training ``seed 1515`` patients 0-599 (three acquisitions cut
from each render), validation 600-659 (two); the benchmark's test sets use other seeds.

Training: soft-target binary cross-entropy on the heat maps (positives weighted 20x), AdamW,
cosine learning rate, a wall-clock budget (default 20 min on one thread); augmentation: left-right
flips of the radiograph (the two anatomical sides swap), zoom-out into the square (0.55-1.0),
a bright implant painted at 15 % of the hips (:func:`paste_metal`: prosthesis, nail or screws -- a hip
with metal is still a hip; the variety profile's implants are rendered physically and stay held out),
gamma, contrast, noise.  The presence threshold is the lowest head-map peak that keeps every
validation absent hip below it, checked against the present hips' peaks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from scipy import ndimage

from screener.hip_landmarks import (ANATOMY, CHANNELS, INPUT_SIZE, METAL_CHANNELS, OUTPUT_STRIDE, HipLandmarkNet,
                                    landmark_input)

__all__ = ["build_split", "refine_sample", "sample_arrays", "train", "train_refine", "main"]

CACHE = Path(os.environ.get("SCREENER_DATASET_CACHE_DIR", Path.home() / ".cache" / "screener" / "hip_landmarks"))
SPLITS: dict[str, dict[str, Any]] = {
    "train": {"seed": 1515, "first": 0, "n": 600, "profile": "standard", "views": 3},
    "val": {"seed": 1515, "first": 600, "n": 60, "profile": "standard", "views": 2},
    # the ``wide`` profile (0.4.0): other patients of the training seed, never the variety seed 1517
    "wide_train": {"seed": 1515, "first": 1000, "n": 600, "profile": "wide", "views": 3},
    "wide_val": {"seed": 1515, "first": 1600, "n": 60, "profile": "wide", "views": 2},
}
#: the splits trained on and validated on with ``--wide`` (0.4.0)
WIDE_TRAIN = ("train", "wide_train")
WIDE_VAL = ("val", "wide_val")
RENDER = {"pixel_mm": 1.5, "ray_mm": 5.0, "dy_mm": 5.0}
SIGMA_OUT = 1.5  # heat-map Gaussian (output pixels)


def sample_arrays(case: Any) -> dict[str, Any]:
    """One rendered case -> network input (uint8) and per-anatomical-side targets (input pixels).

    Returns
    -------
    dict
        ``x`` ``(S, S)`` uint8, ``t`` ``(2, 5)`` float32 rows ``[present, head_r, head_c, neck_r,
        neck_c]`` for the plus and minus hips, ``content`` (rows, cols), ``side`` ``(2,)`` patient
        side of each anatomical slot (``""`` when absent), ``metal`` ``(2,)`` bool.
    """
    inp = landmark_input(case.dataset)
    t = np.zeros((2, 5), dtype=np.float32)
    side = ["", ""]
    metal = [False, False]
    for s, h in case.hips.items():
        if not h.present:
            continue
        k = 0 if h.medial_toward_plus_col else 1
        hr, hc = inp.from_stored(h.head_px[0], h.head_px[1])
        nr, nc = inp.from_stored(h.neck_px[0], h.neck_px[1])
        t[k] = (1.0, hr, hc, nr, nc)
        side[k] = s
        metal[k] = h.metal != "none"
    return {"x": np.round(inp.image * 255).astype(np.uint8), "t": t, "content": np.array(inp.content_shape),
            "side": np.array(side), "metal": np.array(metal)}


def hard_weights(name: str, data: dict[str, np.ndarray], factor: float = 3.0) -> np.ndarray:
    """Sampling weight of each image of split ``name`` (0.5.0's ``--oversample-hard``): ``factor`` for a
    patient drawn frog-leg, ``factor`` for one with >= 80 mm extra fat (multiplied when both, capped at
    ``2 * factor``), 1.5 for an image with a single hip present.

    The patient's pose and fat are read by drawing its acquisition again with the generator
    :func:`training.phantoms.xray_variety.render_cases` seeds (the first view's spec; the other views of
    a render share pose and fat), so the cached images need no re-render.
    """
    from training.phantoms.xray_variety import PROFILES, sample_spec

    spec = SPLITS[name]
    w = np.ones(len(data["patient"]), dtype=np.float64)
    memo: dict[int, float] = {}
    for i, p in enumerate(data["patient"]):
        p = int(p)
        if p not in memo:
            rng = np.random.default_rng([int(spec["seed"]), p, 15, PROFILES.index(spec["profile"])])
            s = sample_spec(spec["profile"], rng)
            f = (factor if s.pose.name == "frog_leg" else 1.0) * (factor if s.obese_mm >= 80.0 else 1.0)
            memo[p] = min(f, 2.0 * factor)
        w[i] = memo[p] * (1.5 if int((data["t"][i, :, 0] > 0.5).sum()) == 1 else 1.0)
    return w


def _render_job(job: tuple[int, int, str, int, dict[str, float]]) -> list[dict[str, Any]]:
    seed, index, profile, views, render = job
    torch.set_num_threads(1)
    from training.phantoms.xray_variety import render_cases

    out = []
    for case in render_cases(seed, index, profile, views=views, **render):
        d = sample_arrays(case)
        d["patient"] = index
        out.append(d)
    return out


def build_split(name: str, *, workers: int = 2, cache: Path = CACHE) -> dict[str, np.ndarray]:
    """Render (or load from the cache) one split of :data:`SPLITS`.

    Returns
    -------
    dict
        ``x`` ``(N, S, S)`` uint8, ``t`` ``(N, 2, 5)``, ``content`` ``(N, 2)``, ``side`` ``(N, 2)``,
        ``metal`` ``(N, 2)``, ``patient`` ``(N,)``.
    """
    spec = SPLITS[name]
    key = f"{name}-{spec['seed']}-{spec['first']}-{spec['n']}-{spec['views']}-{spec['profile']}-v1.npz"
    path = cache / key
    if path.is_file():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    jobs = [(spec["seed"], spec["first"] + i, spec["profile"], spec["views"], RENDER) for i in range(spec["n"])]
    t0 = time.time()
    rows: list[dict[str, Any]] = []
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(workers) as pool:
            for i, r in enumerate(pool.imap(_render_job, jobs, chunksize=4)):
                rows.extend(r)
                if i % 50 == 0:
                    print(f"[{name}] {i}/{len(jobs)} rendered ({time.time() - t0:.0f} s)", flush=True)
    else:
        for i, j in enumerate(jobs):
            rows.extend(_render_job(j))
    data = {k: np.stack([r[k] for r in rows]) for k in ("x", "t", "content", "side", "metal", "patient")}
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, **data)
    print(f"[{name}] {len(rows)} images in {time.time() - t0:.0f} s -> {path}", flush=True)
    return data


# ---------------------------------------------------------------------------------------------
# targets and augmentation
# ---------------------------------------------------------------------------------------------
def heat_targets(t: np.ndarray, size: int = INPUT_SIZE // OUTPUT_STRIDE, sigma: float = SIGMA_OUT) -> np.ndarray:
    """``(B, 2, 5)`` targets (input pixels) -> ``(B, 4, size, size)`` Gaussian heat maps.

    ``(B, 2, 6)`` targets (the sixth column: the hip holds metal) add the two
    :data:`~screener.hip_landmarks.METAL_CHANNELS`: the head's Gaussian where the hip holds metal.
    """
    b = t.shape[0]
    metal = t.shape[-1] > 5
    out = np.zeros((b, len(CHANNELS) + (len(METAL_CHANNELS) if metal else 0), size, size), dtype=np.float32)
    g = np.arange(size, dtype=np.float32)
    for i in range(b):
        for k in range(2):
            if t[i, k, 0] < 0.5:
                continue
            for j, (r, c) in enumerate(((t[i, k, 1], t[i, k, 2]), (t[i, k, 3], t[i, k, 4]))):
                ro = (r + 0.5) / OUTPUT_STRIDE - 0.5
                co = (c + 0.5) / OUTPUT_STRIDE - 0.5
                out[i, 2 * k + j] = np.exp(-((g[:, None] - ro) ** 2 + (g[None, :] - co) ** 2) / (2 * sigma**2))
            if metal and t[i, k, 5] > 0.5:
                out[i, len(CHANNELS) + k] = out[i, 2 * k]
    return out


def _capsule_mask(shape: tuple[int, int], p0: np.ndarray, p1: np.ndarray, radius: float) -> np.ndarray:
    rr, cc = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    d = p1 - p0
    l2 = float(d @ d) or 1e-6
    t = np.clip(((rr - p0[0]) * d[0] + (cc - p0[1]) * d[1]) / l2, 0.0, 1.0)
    dist = np.hypot(rr - p0[0] - t * d[0], cc - p0[1] - t * d[1])
    return np.clip(radius + 0.5 - dist, 0.0, 1.0)


def paste_metal(img: np.ndarray, head: np.ndarray, neck: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Paint a bright implant (arthroplasty, nail or screws) at a hip of an input image (training only).

    Teaches the network that a hip with metal is still a hip; the held-out variety profile renders
    its implants physically (:mod:`training.phantoms.xray_variety`).
    """
    d = float(np.linalg.norm(neck - head))
    if d < 2.0:
        return img
    ax = (neck - head) / d
    r = 0.64 * d
    shaft = np.array([1.0, 0.12 * np.sign(ax[1])])
    shaft /= np.linalg.norm(shaft)
    kind = rng.choice(["arthroplasty", "nail", "screws"])
    m = np.zeros(img.shape, dtype=np.float32)
    if kind == "arthroplasty":
        m = np.maximum(m, _capsule_mask(img.shape, head, head, 0.6 * r))
        m = np.maximum(m, _capsule_mask(img.shape, head, neck + 0.5 * d * ax, 0.2 * r))
        m = np.maximum(m, _capsule_mask(img.shape, neck + 0.5 * d * ax, neck + 0.5 * d * ax + 4.0 * d * shaft, 0.28 * r))
        ring = _capsule_mask(img.shape, head, head, 1.3 * r) - _capsule_mask(img.shape, head, head, 1.1 * r)
        rr, cc = np.mgrid[0 : img.shape[0], 0 : img.shape[1]]
        ring = ring * (((rr - head[0]) * ax[0] + (cc - head[1]) * ax[1]) < 0.2 * r)
        m = np.maximum(m, np.clip(ring, 0.0, 1.0))
    elif kind == "nail":
        m = np.maximum(m, _capsule_mask(img.shape, head + 0.2 * d * ax, head + 2.3 * d * ax, 0.22 * r))
        base = head + 1.9 * d * ax
        m = np.maximum(m, _capsule_mask(img.shape, base - 1.5 * d * shaft, base + 4.0 * d * shaft, 0.26 * r))
    else:
        nrm = np.array([-ax[1], ax[0]])
        for off in (-0.35, 0.0, 0.35):
            m = np.maximum(m, _capsule_mask(img.shape, head + 0.2 * d * ax + off * r * nrm,
                                            head + 2.3 * d * ax + off * r * nrm, 0.15 * r))
    v = float(rng.uniform(0.92, 1.0))
    return np.maximum(img, v * m)


def thick_soft_tissue(v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mimic a thick, uneven soft-tissue layer on a ``[0, 1]`` input: bone contrast compressed under a
    smooth random field, more noise, re-stretched to ``[0, 1]`` as :func:`landmark_input` does."""
    h, w = v.shape
    coarse = rng.normal(0.0, 1.0, (4, 4))
    field = ndimage.zoom(coarse, (h / 4.0, w / 4.0), order=3, grid_mode=True, mode="nearest")[:h, :w]
    field = (field - field.min()) / max(float(np.ptp(field)), 1e-6)
    k = rng.uniform(0.25, 0.7)
    out = k * v + rng.uniform(0.2, 0.6) * field + rng.normal(0.0, rng.uniform(0.01, 0.04), v.shape)
    lo, hi = np.percentile(out, [1.0, 99.5])
    return np.clip((out - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0).astype(np.float32)


def augment(x: np.ndarray, t: np.ndarray, content: np.ndarray, rng: np.random.Generator,
            metal_p: float = 0.15, soft_tissue_p: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Random flip / zoom-out / intensity of a batch (``x`` float ``(B, S, S)``); returns copies."""
    x = x.copy()
    t = t.copy()
    s = x.shape[-1]
    for i in range(len(x)):
        h, w = int(content[i][0]), int(content[i][1])
        img = x[i, :h, :w]
        ti = t[i]
        if rng.uniform() < 0.5:  # left-right flip: the anatomical sides swap
            img = img[:, ::-1]
            ti = ti[::-1].copy()
            for k in range(2):
                if ti[k, 0] > 0.5:
                    ti[k, 2] = w - 1 - ti[k, 2]
                    ti[k, 4] = w - 1 - ti[k, 4]
        z = rng.uniform(0.55, 1.0) if rng.uniform() < 0.5 else 1.0
        canvas = np.zeros((s, s), dtype=np.float32)
        if z < 0.999:
            small = ndimage.zoom(img, z, order=1, grid_mode=True, mode="nearest")
            canvas[: small.shape[0], : small.shape[1]] = small
            fr, fc = small.shape[0] / h, small.shape[1] / w
            for k in range(2):
                if ti[k, 0] > 0.5:
                    ti[k, 1:5] = [(ti[k, 1] + 0.5) * fr - 0.5, (ti[k, 2] + 0.5) * fc - 0.5,
                                 (ti[k, 3] + 0.5) * fr - 0.5, (ti[k, 4] + 0.5) * fc - 0.5]
            h, w = small.shape
        else:
            canvas[:h, :w] = img
        for k in range(2):
            if ti[k, 0] > 0.5 and rng.uniform() < metal_p:
                canvas = paste_metal(canvas, ti[k, 1:3].astype(np.float64), ti[k, 3:5].astype(np.float64), rng)
                if ti.shape[-1] > 5:
                    ti[k, 5] = 1.0
                canvas[h:, :] = 0.0
                canvas[:, w:] = 0.0
        v = canvas[:h, :w]
        if rng.uniform() < soft_tissue_p:
            v = thick_soft_tissue(v, rng)
        v = np.clip(v, 0, 1) ** rng.uniform(0.6, 1.6)
        v = v * rng.uniform(0.8, 1.2) + rng.uniform(-0.1, 0.1)
        v = v + rng.normal(0.0, rng.uniform(0.0, 0.03), v.shape)
        canvas[:h, :w] = np.clip(v, 0.0, 1.0)
        x[i] = canvas
        t[i] = ti
    return x, t


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft-target BCE, positives weighted 20x; a metal map is weighted by its hip's head map, so that
    clean and metal heads count alike and the map at a head estimates the chance of metal there."""
    w = 1.0 + 20.0 * target
    if target.shape[1] > len(CHANNELS):
        w = w.clone()
        for k in range(len(METAL_CHANNELS)):
            w[:, len(CHANNELS) + k] = 1.0 + 20.0 * target[:, 2 * k]
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, target, weight=w)


def predict_heat(model: torch.nn.Module, x_u8: np.ndarray, batch: int = 32) -> np.ndarray:
    """Sigmoid heat maps of uint8 inputs ``(N, S, S)``."""
    out = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(x_u8), batch):
            xb = torch.from_numpy(x_u8[i : i + batch].astype(np.float32) / 255.0)[:, None]
            out.append(torch.sigmoid(model(xb)).numpy())
    return np.concatenate(out)


def val_report(heat: np.ndarray, t: np.ndarray, mm_per_input: np.ndarray | None = None) -> dict[str, Any]:
    """Presence peaks and head / neck errors (input pixels) on a labelled set."""
    peaks_pos, peaks_neg, err_head, err_neck = [], [], [], []
    metal_pos, metal_neg = [], []
    has_metal = heat.shape[1] >= len(CHANNELS) + len(METAL_CHANNELS) and t.shape[-1] > 5
    for i in range(len(heat)):
        for k in range(2):
            hm = heat[i, 2 * k]
            p = float(hm.max())
            if t[i, k, 0] > 0.5:
                peaks_pos.append(p)
                r, c = divmod(int(hm.argmax()), hm.shape[1])
                hr, hc = (r + 0.5) * OUTPUT_STRIDE - 0.5, (c + 0.5) * OUTPUT_STRIDE - 0.5
                nm = heat[i, 2 * k + 1]
                r2, c2 = divmod(int(nm.argmax()), nm.shape[1])
                nr, nc = (r2 + 0.5) * OUTPUT_STRIDE - 0.5, (c2 + 0.5) * OUTPUT_STRIDE - 0.5
                err_head.append(float(np.hypot(hr - t[i, k, 1], hc - t[i, k, 2])))
                err_neck.append(float(np.hypot(nr - t[i, k, 3], nc - t[i, k, 4])))
                if has_metal:
                    mp = float(heat[i, len(CHANNELS) + k, max(0, r - 2) : r + 3, max(0, c - 2) : c + 3].max())
                    (metal_pos if t[i, k, 5] > 0.5 else metal_neg).append(mp)
            else:
                peaks_neg.append(p)
    pos, neg = np.array(peaks_pos), np.array(peaks_neg)
    return {"n_present": int(pos.size), "n_absent": int(neg.size),
            "present_peak_p1": float(np.percentile(pos, 1)) if pos.size else None,
            "present_peak_min": float(pos.min()) if pos.size else None,
            "absent_peak_max": float(neg.max()) if neg.size else None,
            "absent_peak_p99": float(np.percentile(neg, 99)) if neg.size else None,
            "head_err_px_median": float(np.median(err_head)) if err_head else None,
            "neck_err_px_median": float(np.median(err_neck)) if err_neck else None,
            "neck_err_px_p95": float(np.percentile(err_neck, 95)) if err_neck else None,
            "neck_within_3px": float(np.mean(np.array(err_neck) <= 3.0)) if err_neck else None,
            "metal_hips": len(metal_pos), "metal_probs": metal_pos, "clean_metal_probs_max": max(metal_neg, default=None),
            "clean_metal_probs_p99": float(np.percentile(metal_neg, 99)) if metal_neg else None}


def _start_model(init: Path | None, widths: Sequence[int], n_out: int
                 ) -> tuple[HipLandmarkNet, tuple[int, ...], list[Any]]:
    """A fresh network, or (``init``) one that starts from that bundle's weights (a 4-map bundle's output
    conv copied into the landmark maps, the metal maps keeping their fresh start); its widths and the
    bundle's training history."""
    if init is None:
        return HipLandmarkNet(tuple(widths), out_channels=n_out), tuple(widths), []
    from screener.hip_landmarks import load_landmark_bundle

    prev = load_landmark_bundle(init)
    widths = tuple(prev.card["architecture"]["kwargs"]["widths"])
    model = HipLandmarkNet(tuple(widths), out_channels=n_out)
    state = prev.models[0].state_dict()
    own = model.state_dict()
    for k, v in state.items():
        if own[k].shape == v.shape:
            own[k] = v
        else:  # the 1x1 output conv: copy the landmark maps, keep the new metal maps' fresh start
            own[k][: v.shape[0]] = v
    model.load_state_dict(own)
    return model, widths, list((prev.card.get("metrics") or {}).get("history", []))


def _fit_landmarks(model: torch.nn.Module, tr: dict[str, np.ndarray], va: dict[str, np.ndarray],
                   rng: np.random.Generator, *, minutes: float, steps: int | None, batch: int, lr: float,
                   oversample_hard: float, metal_p: float, soft_tissue_p: float, run: int) -> list[dict[str, Any]]:
    """The training loop of :func:`train`: epochs of augmented batches (drawn by ``tr["weight"]`` with
    ``oversample_hard``), AdamW with a cosine learning rate over ``steps`` (or as many as ``minutes``
    allow, timed on the first 20 steps), a validation report after each epoch (the history)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    n = len(tr["x"])
    # time one step to plan the schedule inside the budget
    t_start = time.time()
    step, epoch = 0, 0
    total_steps = steps
    history = []
    while True:
        if oversample_hard > 0:
            order = rng.choice(n, size=n, replace=True, p=tr["weight"] / tr["weight"].sum())
        else:
            order = rng.permutation(n)
        model.train()
        ep_loss = []
        for i in range(0, n - batch + 1, batch):
            idx = order[i : i + batch]
            xb, tb = augment(tr["x"][idx].astype(np.float32) / 255.0, tr["t"][idx], tr["content"][idx], rng,
                             metal_p=metal_p, soft_tissue_p=soft_tissue_p)
            yb = torch.from_numpy(heat_targets(tb))
            logits = model(torch.from_numpy(xb)[:, None])
            loss = _loss(logits, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            ep_loss.append(float(loss.detach()))
            if steps is None and step == 20:
                per = (time.time() - t_start) / 20
                total_steps = int(minutes * 60.0 / per)
                print(f"{per:.3f} s/step -> {total_steps} steps ({total_steps * batch / n:.1f} epochs)", flush=True)
            if total_steps:
                frac = min(step / total_steps, 1.0)
                for g in opt.param_groups:
                    g["lr"] = lr * 0.5 * (1 + np.cos(np.pi * frac))
                if step >= total_steps:
                    break
        epoch += 1
        rep = _brief(val_report(predict_heat(model, va["x"]), va["t"]))
        history.append({"run": run, "epoch": epoch, "loss": float(np.mean(ep_loss)), **rep,
                        "elapsed_s": round(time.time() - t_start)})
        print(json.dumps(history[-1]), flush=True)
        if total_steps and step >= total_steps:
            return history


def _decoding(model: torch.nn.Module, va: dict[str, np.ndarray], wide: bool) -> tuple[float, dict[str, Any], dict[str, Any]]:
    """The presence threshold (between every absent validation hip's head peak and the present ones'), with
    ``wide`` the metal threshold (just above every clean validation hip), and the validation report."""
    heat = predict_heat(model, va["x"])
    rep = val_report(heat, va["t"])
    lo, hi = rep["absent_peak_max"] or 0.0, rep["present_peak_min"] or 1.0
    threshold = float(np.clip(0.5 * (lo + hi) if hi > lo else 0.5, 0.2, 0.8))
    decoding: dict[str, Any] = {}
    if wide:
        # metal: just above every clean validation hip (a clean hip declined is a measurement lost)
        mpos = np.array(rep["metal_probs"] or [1.0])
        decoding["metal_threshold"] = float(np.clip((rep["clean_metal_probs_max"] or 0.0) + 0.01, 0.5, 0.95))
        rep["metal_recall_at_threshold"] = float(np.mean(mpos >= decoding["metal_threshold"]))
    return threshold, decoding, _brief(rep)


def _training_data(wide: bool) -> str:
    """The card's ``training_data`` sentence."""
    wt = SPLITS["wide_train"]
    return ("virtual cohort radiographs, profile 'standard' of training.phantoms.xray_variety "
            f"(seed {SPLITS['train']['seed']}, {SPLITS['train']['n']} patients x {SPLITS['train']['views']} "
            "acquisitions)" + (f" and profile 'wide' (seed {wt['seed']}, patients "
                               f"{wt['first']}-{wt['first'] + wt['n'] - 1}"
                               f" x {wt['views']}); the variety profile (seed 1517) is "
                               "never trained on" if wide else "")
            + "; synthetic patients, not clinical accuracy")


def train(out: Path, *, minutes: float = 20.0, seed: int = 1515, batch: int = 16, lr: float = 2e-3,
          widths: Sequence[int] = (16, 24, 32, 48, 64, 96), workers: int = 2, init: Path | None = None,
          version: str = "0.1.0", changelog: dict[str, str] | None = None, steps: int | None = None,
          command: str = "nice -n 5 python -m training.hip_landmarks train --out models/hip_landmarks",
          soft_tissue_p: float = 0.0, wide: bool = False, metal_p: float = 0.15,
          oversample_hard: float = 0.0) -> dict[str, Any]:
    """Build the splits, train, pick the presence threshold and write the bundle to ``out``.

    ``init``: start from this bundle's weights (a continued run; the card's ``history`` says so);
    ``steps``: a fixed number of optimiser steps instead of the wall-clock budget; ``wide``: train on
    the standard and the ``wide`` profile together (:data:`WIDE_TRAIN`) and add the two metal maps
    (a 4-map ``init`` bundle gets them freshly initialised); ``oversample_hard``: draw each epoch's
    images with :func:`hard_weights` (frog-leg, heavy obesity, single hips more often; 0: uniform).
    """
    from screener.bundles import InputSpec, save_bundle

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tr = _joined(WIDE_TRAIN if wide else ("train",), workers, metal=wide, weights=oversample_hard)
    va = _joined(WIDE_VAL if wide else ("val",), workers, metal=wide)
    n_out = len(CHANNELS) + (len(METAL_CHANNELS) if wide else 0)
    model, widths, previous = _start_model(init, widths, n_out)
    history = _fit_landmarks(model, tr, va, rng, minutes=minutes, steps=steps, batch=batch, lr=lr,
                             oversample_hard=oversample_hard, metal_p=metal_p, soft_tissue_p=soft_tissue_p,
                             run=len({h.get("run", 0) for h in previous}) if previous else 0)
    threshold, decoding, rep = _decoding(model, va, wide)
    arch = {"name": "HipLandmarkNet", "kwargs": {"widths": list(widths), "out_channels": n_out}}
    save_bundle(
        out, protocol="hip_landmarks", models=[model.eval()], architecture=arch,
        input_spec=InputSpec(shape=(1, INPUT_SIZE, INPUT_SIZE), value_range=(0.0, 1.0)),
        outputs=list(CHANNELS) + (list(METAL_CHANNELS) if wide else []), task="regression",
        units=["probability"] * n_out,
        preprocessing={"function": "screener.hip_landmarks.landmark_input", "input_size": INPUT_SIZE,
                       "output_stride": OUTPUT_STRIDE, "intensity": "VOI LUT, then 1st-99.5th percentile to [0, 1]",
                       "geometry": "longer side to the input size, top-left, zero padding; not re-oriented"},
        command=command, seed=seed, metrics={"validation": rep, "history": previous + history},
        training_data=_training_data(wide),
        version=version, changelog=changelog or {"0.1.0": "first release (issue 15): head and neck heat maps per anatomical side"},
        differences_from_paper=("not from a paper: a small U-Net heat-map landmark detector that finds the hips "
                                "before BMD-GAN measures them"),
        extra={"decoding": {"presence_threshold": threshold, "ambiguity_limit": 0.6, **decoding,
                            "channels": {"plus": "hip whose pelvis lies towards increasing column",
                                         "minus": "hip whose pelvis lies towards decreasing column"}},
               "outputs_shape": [n_out, INPUT_SIZE // OUTPUT_STRIDE, INPUT_SIZE // OUTPUT_STRIDE]})
    print(json.dumps({"threshold": threshold, **rep}), flush=True)
    return {"threshold": threshold, **rep}


# ---------------------------------------------------------------------------------------------
# refine stage (0.6.0)
# ---------------------------------------------------------------------------------------------
def _glyph(size: int, rng: np.random.Generator) -> np.ndarray:
    """A bright burned-in letter or word (``[0, 1]``, ``(size, size)``) at a random place (augmentation)."""
    from PIL import Image, ImageDraw, ImageFont

    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    k = int(rng.integers(8, 24))
    font = ImageFont.load_default(size=k)
    word = str(rng.choice(["R", "L", "AP", "HIP", "85 kV", "STANDING"]))
    x, y = int(rng.integers(0, size - k)), int(rng.integers(0, size - k))
    if rng.uniform() < 0.5:
        draw.rectangle([x - 2, y - 2, x + k, y + k + 2], outline=int(rng.integers(150, 256)), width=max(1, k // 10))
    draw.text((x + 2, y), word, fill=255, font=font)
    return np.asarray(canvas, dtype=np.float32) / 255.0


def refine_sample(x: np.ndarray, t: np.ndarray, k: int, rng: np.random.Generator, *, jitter: float = 1.5,
                  augment_p: float = 1.0, metal_p: float = 0.1, soft_tissue_p: float = 0.2,
                  marks_p: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """One refine training patch (``REFINE_SIZE`` square, ``[0, 1]``) and its targets ``(4,)`` patch
    pixels ``[head_i, head_j, neck_i, neck_j]`` from a landmark input ``x`` (float) and hip ``k`` of its
    targets ``t``: centred on the true head moved by a Gaussian jitter (the coarse head's error; 10 %
    of patches 3x), turned +-20 deg, zoomed 0.8-1.25; then painted metal, a thick soft-tissue look,
    white collimator margins and burned-in letters, gamma / contrast / noise."""
    from screener.hip_landmarks import REFINE_SIZE, refine_matrix, refine_patch

    aug = rng.uniform() < augment_p
    anat = ANATOMY[k]
    head = t[k, 1:3].astype(np.float64)
    neck = t[k, 3:5].astype(np.float64)
    j = jitter * (3.0 if rng.uniform() < 0.1 else 1.0)
    centre = head + rng.normal(0.0, j, 2)
    m = refine_matrix(tuple(centre), anat, angle_deg=float(rng.uniform(-20.0, 20.0)) if aug else 0.0,
                      zoom=float(rng.uniform(0.8, 1.25)) if aug else 1.0)
    patch = refine_patch(x, m)
    inv = np.linalg.inv(m)
    pts = np.array([(inv @ np.array([p[0], p[1], 1.0]))[:2] for p in (head, neck)])
    if aug:
        if rng.uniform() < metal_p:
            patch = paste_metal(patch, pts[0], pts[1], rng)
        if rng.uniform() < soft_tissue_p:
            patch = thick_soft_tissue(patch, rng)
        if rng.uniform() < marks_p:  # white (unexposed) collimator margin along one side of the patch
            w = int(rng.integers(4, 26))
            side = int(rng.integers(4))
            band = np.zeros_like(patch)
            sl = [(slice(0, w), slice(None)), (slice(-w, None), slice(None)), (slice(None), slice(0, w)),
                  (slice(None), slice(-w, None))][side]
            band[sl] = 1.0
            band = ndimage.gaussian_filter(band, rng.uniform(0.5, 1.5))
            patch = patch * (1.0 - band) + band * rng.uniform(0.9, 1.0)
        if rng.uniform() < marks_p:
            g = _glyph(REFINE_SIZE, rng)
            patch = np.maximum(patch, g * rng.uniform(0.85, 1.0))
        v = np.clip(patch, 0, 1) ** rng.uniform(0.6, 1.6)
        v = v * rng.uniform(0.8, 1.2) + rng.uniform(-0.1, 0.1)
        patch = np.clip(v + rng.normal(0.0, rng.uniform(0.0, 0.03), v.shape), 0.0, 1.0).astype(np.float32)
    return patch, pts.reshape(-1).astype(np.float32)


def refine_targets(p: np.ndarray, sigma: float = SIGMA_OUT) -> np.ndarray:
    """``(B, 4)`` patch-pixel head / neck -> ``(B, 2, S, S)`` Gaussian maps at the refine output grid."""
    from screener.hip_landmarks import REFINE_SIZE

    size = REFINE_SIZE // OUTPUT_STRIDE
    g = np.arange(size, dtype=np.float32)
    out = np.zeros((len(p), 2, size, size), dtype=np.float32)
    for i in range(len(p)):
        for j in range(2):
            ro = (p[i, 2 * j] + 0.5) / OUTPUT_STRIDE - 0.5
            co = (p[i, 2 * j + 1] + 0.5) / OUTPUT_STRIDE - 0.5
            out[i, j] = np.exp(-((g[:, None] - ro) ** 2 + (g[None, :] - co) ** 2) / (2 * sigma**2))
    return out


def _hips_of(d: dict[str, np.ndarray]) -> np.ndarray:
    """``(n, 2)`` (image, anatomical slot) of every present hip."""
    i, k = np.nonzero(d["t"][:, :, 0] > 0.5)
    return np.stack([i, k], axis=1)


def refine_eval(model: torch.nn.Module, d: dict[str, np.ndarray], seed: int = 7) -> dict[str, float]:
    """Neck error (landmark-input pixels) of the refine network on patches around jittered true heads."""
    from screener.hip_landmarks import REFINE_CROP, REFINE_SIZE

    rng = np.random.default_rng(seed)
    hips = _hips_of(d)
    errs = []
    model.eval()
    with torch.no_grad():
        for a in range(0, len(hips), 64):
            xs, ps = [], []
            for i, k in hips[a : a + 64]:
                x, p = refine_sample(d["x"][i].astype(np.float32) / 255.0, d["t"][i], int(k), rng, augment_p=0.0)
                xs.append(x)
                ps.append(p)
            y = torch.sigmoid(model(torch.from_numpy(np.stack(xs)[:, None]))).numpy()
            for yy, p in zip(y, ps):
                r, c = divmod(int(yy[1].argmax()), yy.shape[-1])
                pr, pc = (r + 0.5) * OUTPUT_STRIDE - 0.5, (c + 0.5) * OUTPUT_STRIDE - 0.5
                errs.append(float(np.hypot(pr - p[2], pc - p[3])) * REFINE_CROP / REFINE_SIZE)
    e = np.array(errs)
    return {"n": int(e.size), "neck_err_px_median": float(np.median(e)), "neck_err_px_p95": float(np.percentile(e, 95)),
            "neck_within_3px": float(np.mean(e <= 3.0))}


def train_refine(out: Path, *, minutes: float = 30.0, seed: int = 1516, batch: int = 16, lr: float = 2e-3,
                 widths: Sequence[int] = (16, 24, 32, 48, 64), workers: int = 1, oversample_hard: float = 2.5,
                 init: Path | None = None, version: str = "0.6.0", command: str = "",
                 soft_tissue_p: float = 0.2) -> dict[str, Any]:
    """Train the refine stage on patches of the standard and ``wide`` training splits (never the variety
    profile) and write it as ``<out>/refine`` (a bundle of protocol ``hip_landmarks_refine``)."""
    from screener.bundles import InputSpec, load_bundle, save_bundle
    from screener.hip_landmarks import REFINE_CHANNELS, REFINE_CROP, REFINE_SIZE

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tr = _joined(WIDE_TRAIN, workers, metal=False, weights=oversample_hard)
    va = _joined(WIDE_VAL, workers, metal=False)
    hips = _hips_of(tr)
    w = tr["weight"][hips[:, 0]] if "weight" in tr else np.ones(len(hips))
    w = w / w.sum()
    model = HipLandmarkNet(tuple(widths), out_channels=len(REFINE_CHANNELS))
    if init is not None:
        model.load_state_dict(load_bundle(init, "cpu", networks={"HipLandmarkNet": HipLandmarkNet}, check=False)
                              .models[0].state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    t0 = time.time()
    step, total = 0, None
    history: list[dict[str, Any]] = []
    while True:
        model.train()
        pick = rng.choice(len(hips), size=batch, p=w)
        xs, ps = [], []
        for i, k in hips[pick]:
            x, p = refine_sample(tr["x"][i].astype(np.float32) / 255.0, tr["t"][i], int(k), rng,
                                 soft_tissue_p=soft_tissue_p)
            xs.append(x)
            ps.append(p)
        logits = model(torch.from_numpy(np.stack(xs)[:, None]))
        loss = _loss(logits, torch.from_numpy(refine_targets(np.stack(ps))))
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step == 20:
            per = (time.time() - t0) / 20
            total = int(minutes * 60.0 / per)
            print(f"{per:.3f} s/step -> {total} steps", flush=True)
        if total:
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 * (1 + np.cos(np.pi * min(step / total, 1.0)))
        if step % 500 == 0 or (total and step >= total):
            rep = refine_eval(model, va)
            history.append({"step": step, "loss": float(loss.detach()), **rep, "elapsed_s": round(time.time() - t0)})
            print(json.dumps(history[-1]), flush=True)
        if total and step >= total:
            break
    rep = history[-1]
    arch = {"name": "HipLandmarkNet", "kwargs": {"widths": list(widths), "out_channels": len(REFINE_CHANNELS)}}
    save_bundle(
        out / "refine", protocol="hip_landmarks_refine", models=[model.eval()], architecture=arch,
        input_spec=InputSpec(shape=(1, REFINE_SIZE, REFINE_SIZE), value_range=(0.0, 1.0)),
        outputs=list(REFINE_CHANNELS), task="regression", units=["probability"] * len(REFINE_CHANNELS),
        preprocessing={"function": "screener.hip_landmarks.refine_patch", "crop_input_px": REFINE_CROP,
                       "size": REFINE_SIZE, "output_stride": OUTPUT_STRIDE,
                       "geometry": "landmark input around the coarse femoral head, minus hips mirrored"},
        command=command, seed=seed, metrics={"validation": rep, "history": history},
        training_data=("patches of the hip landmark training splits: profile 'standard' (seed 1515, patients 0-599) "
                       "and 'wide' (seed 1515, patients 1000-1599), frog-leg and >= 80 mm-fat patients drawn "
                       f"{oversample_hard}x; the variety profile (seed 1517) is never trained on; synthetic patients, "
                       "not clinical accuracy"),
        version=version, changelog={version: "first release: the refine stage of hip_landmarks 0.6.0"},
        differences_from_paper="not from a paper: the second (fine) stage of a two-stage heat-map landmark cascade")
    print(json.dumps({"refine": rep, "steps": step}), flush=True)
    return rep


CHANGELOG = {
    "0.5.0": ("continued from 0.4.0 on the standard and 'wide' training profiles with frog-leg, heavily obese "
              "(>= 80 mm extra fat) and single-hip images drawn more often (--oversample-hard)"),
    "0.4.0": ("continued from 0.3.0 on the standard profile and the new 'wide' training profile together "
              "(physically rendered rotation, abduction, frog-leg, implants, children, obesity, 8-16 bit, lossy JPEG; "
              "the variety profile stays held out by seed and sampler) and two metal maps added"),
    "0.3.0": "continued 260 steps with a thick uneven soft-tissue look on 30 % of the training images (thick_soft_tissue)",
    "0.2.0": "continued training (508 steps in two runs) with bright implants painted at 15 % of the training hips",
    "0.1.0": "first release (issue 15): head and neck heat maps per anatomical side, 707 steps",
}


def _joined(names: Sequence[str], workers: int, metal: bool, weights: float = 0.0) -> dict[str, np.ndarray]:
    """Splits concatenated; with ``metal`` the targets gain a sixth column (the hip holds metal); with
    ``weights`` > 0 a ``weight`` per image (:func:`hard_weights` with that factor)."""
    parts = [build_split(n, workers=workers) for n in names]
    d = {k: np.concatenate([p[k] for p in parts]) for k in ("x", "t", "content", "side", "metal", "patient")}
    if weights > 0:
        d["weight"] = np.concatenate([hard_weights(n, p, weights) for n, p in zip(names, parts)])
    if metal:
        d["t"] = np.concatenate([d["t"], d["metal"][..., None].astype(np.float32)], axis=-1)
    return d


def _brief(rep: dict[str, Any]) -> dict[str, Any]:
    """The validation report without its per-hip lists, metal recall at 0.5 instead."""
    out = {k: v for k, v in rep.items() if not isinstance(v, list)}
    if rep.get("metal_probs"):
        out["metal_recall_at_0.5"] = float(np.mean(np.array(rep["metal_probs"]) >= 0.5))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m training.hip_landmarks {data,train}``."""
    ap = argparse.ArgumentParser(prog="python -m training.hip_landmarks", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data", help="render and cache the training and validation splits")
    d.add_argument("--workers", type=int, default=2)
    d.add_argument("splits", nargs="*", help=f"splits to render (default all: {', '.join(SPLITS)})")
    t = sub.add_parser("train", help="train and write the bundle")
    t.add_argument("--out", default="models/hip_landmarks")
    t.add_argument("--minutes", type=float, default=20.0)
    t.add_argument("--workers", type=int, default=2)
    t.add_argument("--init", default="", help="continue from this bundle's weights")
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--version", default="0.1.0")
    t.add_argument("--steps", type=int, default=0, help="fixed optimiser steps (default: the --minutes budget)")
    t.add_argument("--wide", action="store_true",
                   help="train on the standard and the 'wide' profile and add the metal maps (0.4.0)")
    t.add_argument("--metal-paint", type=float, default=0.15, help="share of hips given a painted implant")
    t.add_argument("--oversample-hard", type=float, default=0.0,
                   help="draw frog-leg and >= 80 mm-fat patients this many times as often, single-hip images 1.5x "
                        "(hard_weights; 0: uniform)")
    t.add_argument("--soft-tissue", type=float, default=0.0,
                   help="share of training images given a thick uneven soft-tissue look (thick_soft_tissue)")
    r = sub.add_parser("refine", help="train the refine stage into <out>/refine (0.6.0)")
    r.add_argument("--out", default="models/hip_landmarks")
    r.add_argument("--minutes", type=float, default=30.0)
    r.add_argument("--lr", type=float, default=2e-3)
    r.add_argument("--oversample-hard", type=float, default=2.5)
    r.add_argument("--init", default="", help="continue from this refine bundle")
    r.add_argument("--soft-tissue", type=float, default=0.2, help="share of patches given a thick soft-tissue look")
    args = ap.parse_args(argv)
    if args.cmd == "refine":
        train_refine(Path(args.out), minutes=args.minutes, lr=args.lr, oversample_hard=args.oversample_hard,
                     init=Path(args.init) if args.init else None, soft_tissue_p=args.soft_tissue,
                     command="nice -n 19 python -m training.hip_landmarks " + " ".join(argv if argv is not None else sys.argv[1:]))
        return 0
    if args.cmd == "data":
        for name in (args.splits or list(SPLITS)):
            build_split(name, workers=args.workers)
        return 0
    train(Path(args.out), minutes=args.minutes, workers=args.workers, lr=args.lr,
          init=Path(args.init) if args.init else None, version=args.version, steps=args.steps or None,
          command="nice -n 5 python -m training.hip_landmarks " + " ".join(argv if argv is not None else sys.argv[1:]),
          soft_tissue_p=args.soft_tissue, wide=args.wide, metal_p=args.metal_paint,
          oversample_hard=args.oversample_hard,
          changelog=CHANGELOG if args.version in ("0.4.0", "0.5.0") else {"0.2.0": "continued from 0.1.0 with bright implants painted at 15 % of the training hips",
                     "0.1.0": "first release (issue 15): head and neck heat maps per anatomical side"}
          if args.version == "0.2.0" else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
