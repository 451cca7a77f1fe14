"""Evaluation figures: estimate-vs-reference scatter and Bland-Altman plots (PNG).

matplotlib (the ``train`` extra) is used through its object API with the Agg
canvas -- no pyplot, no global backend switch, safe in a daemon or a test.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from training.metrics import bland_altman, pearson_r

__all__ = ["bland_altman_plot", "scatter_plot"]


def _figure(size: tuple[float, float] = (4.5, 4.5)) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError("plots need matplotlib: pip install 'screener[train]'") from exc
    fig = Figure(figsize=size, dpi=120)
    FigureCanvasAgg(fig)
    return fig


def scatter_plot(y_true: Any, y_pred: Any, path: str | Path, *, title: str = "",
                 xlabel: str = "reference", ylabel: str = "estimate", synthetic: bool = True) -> Path:
    """Estimate against reference with the identity line, the least-squares line and r.

    Parameters
    ----------
    y_true, y_pred : array-like
        Reference (x axis) and estimate (y axis).
    path : path
        Output PNG.
    title, xlabel, ylabel : str
        Labels (give units, e.g. ``"DXA BMD (g/cm²)"``).
    synthetic : bool
        Add "synthetic data" to the title (virtual-cohort results).

    Returns
    -------
    pathlib.Path
        The PNG written.
    """
    a = np.asarray(y_true, dtype=np.float64).ravel()
    b = np.asarray(y_pred, dtype=np.float64).ravel()
    r = pearson_r(a, b)
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter(a, b, s=10, alpha=0.6, color="#1f77b4", edgecolors="none")
    lo, hi = float(min(a.min(), b.min())), float(max(a.max(), b.max()))
    pad = 0.05 * (hi - lo if hi > lo else 1.0)
    lim = (lo - pad, hi + pad)
    ax.plot(lim, lim, "--", color="0.4", lw=1, label="identity")
    if np.ptp(a) > 0:
        slope, icept = np.polyfit(a, b, 1)
        ax.plot(lim, [slope * lim[0] + icept, slope * lim[1] + icept], color="#2ca02c", lw=1.2,
                label=f"fit y = {slope:.2f}x + {icept:.2f}")
    ax.set_xlim(lim)
    ax.set_ylim(lim)
    ax.set_aspect("equal")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title((title + " " if title else "") + f"(r = {r:.3f}, n = {a.size})" + (" — synthetic" if synthetic else ""),
                 fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def bland_altman_plot(y_true: Any, y_pred: Any, path: str | Path, *, title: str = "",
                      unit: str = "", synthetic: bool = True) -> Path:
    """Bland-Altman plot: difference (estimate - reference) against the mean, bias and 95 % limits.

    Parameters
    ----------
    y_true, y_pred : array-like
    path : path
        Output PNG.
    title, unit : str
    synthetic : bool
        Add "synthetic data" to the title.

    Returns
    -------
    pathlib.Path
    """
    ba = bland_altman(y_true, y_pred)
    fig = _figure((5.5, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter(ba.means, ba.diffs, s=10, alpha=0.6, color="#1f77b4", edgecolors="none")
    u = f" ({unit})" if unit else ""
    ax.axhline(ba.bias, color="#d62728", lw=1.2, label=f"bias {ba.bias:+.3f}")
    ax.axhline(ba.upper, color="0.4", ls="--", lw=1, label=f"+1.96 SD {ba.upper:+.3f}")
    ax.axhline(ba.lower, color="0.4", ls="--", lw=1, label=f"-1.96 SD {ba.lower:+.3f}")
    ax.set_xlabel(f"mean of estimate and reference{u}")
    ax.set_ylabel(f"estimate - reference{u}")
    ax.set_title((title + " " if title else "") + f"(n = {ba.means.size}, {ba.outside} outside)"
                 + (" — synthetic" if synthetic else ""), fontsize=9)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
