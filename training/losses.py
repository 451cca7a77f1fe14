"""Loss functions of the papers the screener reproduces.

* :func:`huber` -- plain Huber loss (Yoshida et al. 2023, ResNet-50 BMD/TBS).
* :func:`weighted_huber` and :func:`bmd_histogram_weights` -- Kang et al. 2023
  (seed ``000``), equation (1): a Huber loss (delta 0.1) whose per-sample weight
  is the inverted, normalised quadratic fit of the BMD histogram.
* :func:`gradient_correlation` and :func:`gradient_correlation_loss` -- the
  gradient-correlation term of Gu et al. 2023 (BMD-GAN, seed ``004``,
  equations 5-6), from Penney et al. 1998 / Hiasa et al. 2018.
* :func:`distance_weights` and :func:`distance_weighted_l1` -- Gu et al. 2023,
  equations (9)-(11), the stage-3 regression objective.

All losses take ``torch`` tensors and return a scalar tensor (mean over the
batch) so that they can be back-propagated.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "HistogramWeights",
    "bmd_histogram_weights",
    "distance_weighted_l1",
    "distance_weights",
    "gradient_correlation",
    "gradient_correlation_loss",
    "huber",
    "weighted_huber",
]

#: Kang et al.'s Huber threshold (g/cm^2).
KANG_DELTA = 0.1
#: Kang et al.'s histogram bin width (g/cm^2).
KANG_BIN_WIDTH = 0.1


def _check_pair(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if pred.shape != target.shape:
        if pred.numel() == target.numel():
            target = target.reshape(pred.shape)
        else:
            raise ValueError(f"prediction shape {tuple(pred.shape)} does not match target {tuple(target.shape)}")
    return pred, target.to(pred.dtype)


def _elementwise_huber(diff: torch.Tensor, delta: float) -> torch.Tensor:
    if delta <= 0:
        raise ValueError(f"Huber delta must be positive (got {delta})")
    a = diff.abs()
    return torch.where(a <= delta, 0.5 * diff * diff, delta * (a - 0.5 * delta))


def huber(pred: torch.Tensor, target: torch.Tensor, delta: float = KANG_DELTA) -> torch.Tensor:
    """Huber loss, mean over all elements.

    ``0.5 d^2`` if ``|d| <= delta`` else ``delta (|d| - 0.5 delta)``, ``d = pred - target``.

    Parameters
    ----------
    pred, target : torch.Tensor
        Same number of elements.
    delta : float
        Threshold between the quadratic and the linear part.

    Returns
    -------
    torch.Tensor
        Scalar.
    """
    pred, target = _check_pair(pred, target)
    return _elementwise_huber(pred - target, delta).mean()


def weighted_huber(
    pred: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor,
    delta: float = KANG_DELTA,
) -> torch.Tensor:
    """Kang et al.'s weighted Huber loss, equation (1), mean over samples.

    ``e_i = 0.5 w_i (yhat_i - y_i)^2`` if ``|yhat_i - y_i| <= delta``, else
    ``delta w_i (|yhat_i - y_i| - 0.5 delta)``.

    Parameters
    ----------
    pred, target : torch.Tensor
        Predicted and reference BMD, ``(B,)`` or ``(B, 1)``.
    weights : torch.Tensor
        Per-sample weights ``w_i`` (e.g. ``bmd_histogram_weights(train)(target)``).
    delta : float
        Huber threshold (paper: 0.1).

    Returns
    -------
    torch.Tensor
        Scalar mean of ``e_i``.
    """
    pred, target = _check_pair(pred, target)
    weights = torch.as_tensor(weights, dtype=pred.dtype, device=pred.device)
    if weights.numel() != pred.numel():
        raise ValueError(f"got {weights.numel()} weights for {pred.numel()} samples")
    return (weights.reshape(pred.shape) * _elementwise_huber(pred - target, delta)).mean()


@dataclass(frozen=True)
class HistogramWeights:
    """Kang et al.'s loss weights as a function of BMD; call it with BMD values.

    Attributes
    ----------
    method : str
        ``"inverse_fit"`` or ``"fit_inverse"`` (see :func:`bmd_histogram_weights`).
    edges : numpy.ndarray
        Histogram bin edges (``n_bins + 1``), multiples of the bin width.
    counts : numpy.ndarray
        Histogram ``z(k)`` of the training BMD.
    coef : numpy.ndarray
        Quadratic coefficients (``numpy.polyfit`` order, highest power first):
        of the inverted histogram (``inverse_fit``) or of the histogram
        (``fit_inverse``).
    scale, offset : float
        ``inverse_fit`` only: ``w(y) = scale * poly(y) + offset``.
    bin_table : numpy.ndarray
        ``fit_inverse`` only: weight per bin.
    """

    method: str
    edges: np.ndarray
    counts: np.ndarray
    coef: np.ndarray
    scale: float = 1.0
    offset: float = 0.0
    bin_table: np.ndarray | None = None

    @property
    def centres(self) -> np.ndarray:
        """Bin centres."""
        return 0.5 * (self.edges[:-1] + self.edges[1:])

    @property
    def bin_weights(self) -> np.ndarray:
        """Weight at each bin centre (for the model card)."""
        return np.asarray(self._weights(self.centres))

    def bin_index(self, bmd: np.ndarray) -> np.ndarray:
        """Bin ``k_y`` of each BMD; values outside the histogram use the edge bins."""
        k = np.searchsorted(self.edges, np.asarray(bmd, dtype=np.float64), side="right") - 1
        return np.clip(k, 0, len(self.counts) - 1)

    def _weights(self, y: np.ndarray) -> np.ndarray:
        y = np.asarray(y, dtype=np.float64)
        if self.method == "fit_inverse":
            assert self.bin_table is not None
            return self.bin_table[self.bin_index(y)]
        c = self.centres
        return self.scale * np.polyval(self.coef, np.clip(y, c[0], c[-1])) + self.offset

    def to_dict(self) -> dict:
        """JSON-able description (histogram, fit, per-bin weights) for a model card."""
        return {
            "method": self.method,
            "bin_edges": [round(float(e), 6) for e in self.edges],
            "counts": [int(c) for c in self.counts],
            "quadratic_coef": [float(c) for c in self.coef],
            "scale": self.scale,
            "offset": self.offset,
            "bin_weights": [float(w) for w in self.bin_weights],
        }

    def __call__(self, bmd: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Weights ``w`` for BMD values (numpy in, numpy out; tensor in, tensor out)."""
        if isinstance(bmd, torch.Tensor):
            w = self._weights(bmd.detach().cpu().double().numpy())
            return torch.as_tensor(w, dtype=bmd.dtype, device=bmd.device)
        return self._weights(bmd)


def _histogram(y: np.ndarray, width: float) -> tuple[np.ndarray, np.ndarray]:
    lo = np.floor(y.min() / width + 1e-9) * width
    n_bins = max(1, int(np.floor((y.max() - lo) / width + 1e-9)) + 1)
    edges = lo + width * np.arange(n_bins + 1)
    k = np.clip(np.searchsorted(edges, y, side="right") - 1, 0, n_bins - 1)
    return edges, np.bincount(k, minlength=n_bins)


def bmd_histogram_weights(
    bmd_train: np.ndarray | torch.Tensor,
    bins: float = KANG_BIN_WIDTH,
    *,
    method: str = "inverse_fit",
    scale: float = 1.0 / 8.0,
    floor: float | None = None,
) -> HistogramWeights:
    """Per-sample loss weights from the BMD histogram (Kang et al. 2023, eq. 1).

    The paper (section 2.3): "Figure 4 shows a histogram of the reference BMD,
    where the bin size is .1 ... Let the histogram (frequency number) be
    ``z(k_y)`` ... We fitted the histogram curve to a simple quadratic curve,
    inverted and normalized the curve ... ``w = f(1 / z(k_{y_i}))`` where ...
    ``f`` denotes the normalization function with a minimum weight of 1.0."

    Both steps start from the histogram of ``bmd_train`` with bins of width
    ``bins`` aligned to multiples of the width (0.4-0.5, 0.5-0.6, ... as in the
    paper's Fig. 4), spanning the training range (empty interior bins count 0).

    ``method="inverse_fit"`` (default) -- the authors' published implementation
    (github.com/soribido/BMD_prediction, ``bmd_pred_case1.ipynb``: ``poly2c`` used
    by ``poly2huber``):

    1. invert the histogram into relative inverse frequencies
       ``v_k = N / (n_bins * z_k)`` (1 for a uniform histogram);
    2. fit a quadratic ``p`` to ``v`` against the bin centres (least squares);
    3. normalise: ``w(y) = scale * p(y) - min_{[c_0, c_last]} scale * p + 1`` --
       the minimum over the range of bin centres is exactly 1; ``scale`` is the
       notebook's 1/8.  ``p`` is evaluated at the sample's BMD clipped to
       ``[c_0, c_last]`` (the notebook evaluates it at the BMD itself).

    Empty bins cannot be inverted; they are left out of the fit.

    ``method="fit_inverse"`` -- the sentence read literally: fit the quadratic
    to the counts, invert the fitted curve per bin, divide by the smallest
    inverse (``w(k) = max_j z_fit(j) / z_fit(k)``).  On the paper's own
    histogram (counts 9, 31, 210, 474, 562, 542, 230, 132, 35, 14 from the
    authors' notebook) the fitted counts of both end bins are negative (-46.9
    and -105.3), so the inversion is undefined there; the fitted counts are
    floored at ``floor`` (default: the smallest non-zero observed count).  This
    is why ``inverse_fit`` is the default.

    Parameters
    ----------
    bmd_train : array-like
        Reference BMD of the training samples (g/cm^2).
    bins : float
        Bin width (paper: 0.1 g/cm^2).
    method : {"inverse_fit", "fit_inverse"}
        See above.
    scale : float
        ``inverse_fit`` scale of the fitted curve before the shift (1/8).
    floor : float, optional
        ``fit_inverse`` lower bound of the fitted counts.

    Returns
    -------
    HistogramWeights
        Callable mapping BMD values to weights (minimum 1, larger in the sparse
        tails); also holds the histogram and the fit for the model card.
    """
    y = np.asarray(
        bmd_train.detach().cpu().numpy() if isinstance(bmd_train, torch.Tensor) else bmd_train,
        dtype=np.float64,
    ).ravel()
    if y.size < 3 or not np.all(np.isfinite(y)):
        raise ValueError("bmd_histogram_weights needs at least 3 finite training BMD values")
    if bins <= 0:
        raise ValueError(f"bin width must be positive (got {bins})")
    edges, counts = _histogram(y, bins)
    centres = 0.5 * (edges[:-1] + edges[1:])
    n_bins = len(counts)
    if method == "inverse_fit":
        if scale <= 0:
            raise ValueError(f"scale must be positive (got {scale})")
        used = counts > 0
        inverse = y.size / (n_bins * counts[used].astype(np.float64))
        degree = min(2, int(used.sum()) - 1)
        coef = np.polyfit(centres[used], inverse, degree) if degree > 0 else np.array([inverse[0]])
        grid = np.linspace(centres[0], centres[-1], 1001)
        candidates = [scale * np.polyval(coef, grid).min()]
        if len(coef) == 3 and coef[0] != 0:
            vertex = -coef[1] / (2 * coef[0])
            if centres[0] <= vertex <= centres[-1]:
                candidates.append(scale * np.polyval(coef, vertex))
        offset = 1.0 - float(min(candidates))
        return HistogramWeights(method, edges, counts, coef, scale=float(scale), offset=offset)
    if method == "fit_inverse":
        degree = min(2, n_bins - 1)
        coef = np.polyfit(centres, counts.astype(np.float64), degree) if degree > 0 else np.array([float(counts[0])])
        lowest = float(counts[counts > 0].min()) if floor is None else float(floor)
        if lowest <= 0:
            raise ValueError(f"floor must be positive (got {lowest})")
        inverted = 1.0 / np.maximum(np.polyval(coef, centres), lowest)
        return HistogramWeights(method, edges, counts, coef, bin_table=inverted / inverted.min())
    raise ValueError(f"method must be 'inverse_fit' or 'fit_inverse' (got {method!r})")


def _gradient_kernels(kind: str, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if kind == "central":
        k = torch.tensor([[0.0, 0.0, 0.0], [-1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    elif kind == "sobel":
        k = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    else:
        raise ValueError(f"gradient kernel must be 'central' or 'sobel' (got {kind!r})")
    k = k.to(dtype=dtype, device=device)
    return k.view(1, 1, 3, 3), k.t().contiguous().view(1, 1, 3, 3)


def _ncc(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    a = a.flatten(1)
    b = b.flatten(1)
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / torch.sqrt((a * a).sum(dim=1) * (b * b).sum(dim=1) + eps)


def gradient_correlation(
    target: torch.Tensor,
    pred: torch.Tensor,
    *,
    kernel: str = "central",
    absolute: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Gradient correlation ``GC = 1/2 [NCC(dx T, dx P) + NCC(dy T, dy P)]`` per sample.

    Gu et al. 2023, equation (6), after Penney et al. 1998 and Hiasa et al.
    2018.  Details follow the reference implementation published with BMD-GAN
    (``GradientCorrelationLoss2D``): the x-gradient is the 3x3 central difference
    ``I[i, j+1] - I[i, j-1]`` (``kernel="central"``; ``"sobel"`` for Penney's
    Sobel operator) applied without padding ("valid"), the y-gradient its
    transpose ``I[i+1, j] - I[i-1, j]``; ``absolute=True`` correlates gradient
    magnitudes ``|dI|`` as that implementation does (``False``: signed
    gradients, as equation 6 is written); NCC is the Pearson correlation over all
    pixels of a sample, ``sum(a'b') / sqrt(sum a'^2 sum b'^2 + eps)`` with
    ``a' = a - mean(a)``; the 1/2 (Hiasa's definition) keeps GC in [-1, 1]
    (equation 6 of Gu et al. omits it).

    Parameters
    ----------
    target, pred : torch.Tensor
        ``(B, 1, H, W)`` images (H, W >= 3), e.g. the ground-truth DRR and the
        generator's output.
    kernel : {"central", "sobel"}
        Gradient operator.
    absolute : bool
        Correlate gradient magnitudes (default, as BMD-GAN's code) or signed gradients.
    eps : float
        Stabiliser inside the square root.

    Returns
    -------
    torch.Tensor
        ``(B,)`` gradient correlations.
    """
    if target.shape != pred.shape or target.ndim != 4 or target.shape[1] != 1:
        raise ValueError(
            f"gradient_correlation needs two (B, 1, H, W) tensors of equal shape, got "
            f"{tuple(target.shape)} and {tuple(pred.shape)}"
        )
    if min(target.shape[-2:]) < 3:
        raise ValueError("images must be at least 3x3 for a 3x3 gradient operator")
    kx, ky = _gradient_kernels(kernel, pred.dtype, pred.device)
    target = target.to(pred.dtype)
    grads = []
    for k in (kx, ky):
        gt = F.conv2d(target, k)
        gp = F.conv2d(pred, k)
        if absolute:
            gt, gp = gt.abs(), gp.abs()
        grads.append(_ncc(gt, gp, eps))
    return 0.5 * (grads[0] + grads[1])


def gradient_correlation_loss(
    target: torch.Tensor,
    pred: torch.Tensor,
    *,
    kernel: str = "central",
    absolute: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Gradient-correlation loss ``L_GC = mean_batch(1 - GC)`` (0 for identical structure).

    Gu et al. 2023 weight it with ``lambda_GC = 1`` (``lambda_L1 = 100``,
    ``lambda_FM = 10``).  Parameters as :func:`gradient_correlation`.

    Returns
    -------
    torch.Tensor
        Scalar in [0, 2].
    """
    return (1.0 - gradient_correlation(target, pred, kernel=kernel, absolute=absolute, eps=eps)).mean()


def distance_weights(bmd: np.ndarray | torch.Tensor, mean: float | None = None) -> torch.Tensor:
    """Gu et al.'s sample weights, equations (9)-(10): ``w = 1.5 - (d - d_min) / (d_max - d_min)``.

    ``d = |y - mean(y)|`` is the distance of a sample's BMD from the training
    mean; ``d_min`` and ``d_max`` are the smallest and largest distances in the
    data set.  Weights therefore run from 1.5 (closest to the mean) to 0.5
    (farthest), exactly as the paper writes them.  When all distances are equal
    the formula is undefined and every weight is 1.

    Parameters
    ----------
    bmd : array-like
        Training BMD values (g/cm^2).
    mean : float, optional
        The average BMD ``yhat`` (default: the mean of ``bmd``).

    Returns
    -------
    torch.Tensor
        ``float32`` weights, same length as ``bmd``.
    """
    y = torch.as_tensor(
        np.asarray(bmd.detach().cpu().numpy() if isinstance(bmd, torch.Tensor) else bmd, dtype=np.float64)
    ).flatten()
    if y.numel() == 0:
        raise ValueError("distance_weights needs at least one BMD value")
    centre = y.mean() if mean is None else torch.tensor(float(mean), dtype=torch.float64)
    d = (y - centre).abs()
    span = d.max() - d.min()
    if span <= 1e-12 * max(1.0, float(d.max())):
        return torch.ones_like(y, dtype=torch.float32)
    return (1.5 - (d - d.min()) / span).to(torch.float32)


def distance_weighted_l1(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Gu et al.'s regression objective, equation (11): ``mean(w |y - R(I)|)``.

    Parameters
    ----------
    pred, target : torch.Tensor
        Predicted and reference BMD, ``(B,)`` or ``(B, 1)``.
    weights : torch.Tensor
        Per-sample weights from :func:`distance_weights`.

    Returns
    -------
    torch.Tensor
        Scalar.
    """
    pred, target = _check_pair(pred, target)
    weights = torch.as_tensor(weights, dtype=pred.dtype, device=pred.device)
    if weights.numel() != pred.numel():
        raise ValueError(f"got {weights.numel()} weights for {pred.numel()} samples")
    return (weights.reshape(pred.shape) * (pred - target).abs()).mean()
