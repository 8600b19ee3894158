"""Calibration diagnostics beyond ECE, temperature scaling and reliability diagrams.

* Adaptive (equal-mass) top-label ECE: Nguyen & O'Connor 2015, "Posterior Calibration and
  Exploratory Analysis for Natural Language Processing Models" (EMNLP); Mukhoti et al. 2020,
  "Calibrating Deep Neural Networks using Focal Loss" (NeurIPS), where it is called AdaECE.
* Maximum calibration error: Naeini et al. 2015, "Obtaining Well Calibrated Probabilities Using
  Bayesian Binning" (AAAI); Guo et al. 2017, "On Calibration of Modern Neural Networks" (ICML).
* Classwise ECE: Kull et al. 2019, "Beyond temperature scaling: Obtaining well-calibrated
  multiclass probabilities with Dirichlet calibration" (NeurIPS).
* Temperature scaling and reliability diagrams: Guo et al. 2017, Sec. 4.2 and Fig. 1.

Binning convention (shared with ``metrics.expected_calibration_error``): ``n_bins`` equal-width
bins on [0, 1], right-closed ``(b/n_bins, (b+1)/n_bins]``, with a value of exactly 0 in bin 0.
The top label is ``argmax`` (first index on ties), the confidence its probability.

All functions accept torch tensors or numpy arrays; metrics return Python floats computed in
float64 numpy on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .metrics import (
    _check_classification_inputs,
    _softmax,
    _to_numpy,
    accuracy,
    brier_score,
    expected_calibration_error,
    negative_log_likelihood,
)

__all__ = [
    "adaptive_calibration_error",
    "apply_temperature",
    "calibration_metrics",
    "classwise_calibration_error",
    "fit_temperature",
    "maximum_calibration_error",
    "plot_reliability_diagram",
    "reliability_bins",
]

ArrayLike = Any  # torch.Tensor | np.ndarray | sequence of numbers

# Bounds on log T for temperature scaling: T in [e^-5, e^5] ~ [0.0067, 148]. Outside this range
# the fit is degenerate (separable data drives T -> 0, uninformative logits drive T -> inf).
_LOG_T_MIN = -5.0
_LOG_T_MAX = 5.0


def _check_n_bins(n_bins: int) -> None:
    if isinstance(n_bins, bool) or int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")


def _bin_index(values: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-width bin index of each value in [0, 1]; bins are right-closed ``(lo, hi]``."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Identical to metrics.expected_calibration_error so that every equal-width metric here
    # places an edge value in the same (lower) bin; values <= 0 land in bin 0.
    return np.searchsorted(edges[1:-1], values, side="left")


def _top_label(probs: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Confidence (max probability) and 0/1 correctness of the argmax prediction."""
    p, y = _check_classification_inputs(probs, labels)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    return conf, correct


def _check_temperature(temperature: float) -> float:
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"temperature must be a scalar, got shape {tuple(temperature.shape)}")
        temperature = temperature.item()
    t = float(temperature)
    if not math.isfinite(t) or t <= 0.0:
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
    return t


def reliability_bins(
    probs: ArrayLike, labels: ArrayLike, n_bins: int = 15
) -> dict[str, np.ndarray]:
    """Per-bin statistics of a reliability diagram (Guo et al. 2017, Fig. 1).

    Args:
        probs: (N, C) predicted class probabilities.
        labels: (N,) integer targets.
        n_bins: Number of equal-width confidence bins on [0, 1].

    Returns:
        Dict with ``"edges"`` (n_bins + 1,), ``"count"`` (n_bins,) int64, and per-bin mean
        ``"confidence"`` and ``"accuracy"`` (n_bins,) float64, NaN for empty bins.
    """
    _check_n_bins(n_bins)
    conf, correct = _top_label(probs, labels)
    idx = _bin_index(conf, n_bins)
    count = np.bincount(idx, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(idx, weights=correct, minlength=n_bins)
    nonempty = count > 0
    mean_conf = np.full(n_bins, np.nan)
    mean_acc = np.full(n_bins, np.nan)
    mean_conf[nonempty] = conf_sum[nonempty] / count[nonempty]
    mean_acc[nonempty] = acc_sum[nonempty] / count[nonempty]
    return {
        "edges": np.linspace(0.0, 1.0, n_bins + 1),
        "count": count.astype(np.int64),
        "confidence": mean_conf,
        "accuracy": mean_acc,
    }


def maximum_calibration_error(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> float:
    """Maximum calibration error (Naeini et al. 2015; Guo et al. 2017, eq. 5).

    MCE = max over non-empty equal-width bins of ``|acc(B_b) - conf(B_b)|``.

    Args:
        probs: (N, C) predicted class probabilities.
        labels: (N,) integer targets.
        n_bins: Number of equal-width confidence bins on [0, 1].

    Returns:
        MCE in [0, 1].
    """
    bins = reliability_bins(probs, labels, n_bins=n_bins)
    nonempty = bins["count"] > 0
    return float(np.max(np.abs(bins["accuracy"][nonempty] - bins["confidence"][nonempty])))


def adaptive_calibration_error(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> float:
    """Top-label ECE with equal-mass (adaptive) bins: AdaECE (Nguyen & O'Connor 2015;
    Mukhoti et al. 2020).

    Examples are sorted by confidence and split with ``np.array_split`` into ``n_bins`` bins of
    (nearly) equal count; ``ECE = sum_b |B_b|/N * |acc(B_b) - conf(B_b)|``. Ties in confidence
    keep the input order (stable sort). This is the top-label equal-mass variant, not the
    classwise "ACE" of Nixon et al. 2019. With fewer than ``n_bins`` examples, N bins are used.

    Args:
        probs: (N, C) predicted class probabilities.
        labels: (N,) integer targets.
        n_bins: Number of equal-mass bins.

    Returns:
        Adaptive ECE in [0, 1].
    """
    _check_n_bins(n_bins)
    conf, correct = _top_label(probs, labels)
    n = conf.shape[0]
    order = np.argsort(conf, kind="stable")
    # |B|/N * |mean(acc) - mean(conf)| = |sum(acc) - sum(conf)| / N for each bin.
    total = sum(
        abs(correct[b].sum() - conf[b].sum()) for b in np.array_split(order, min(n_bins, n))
    )
    return float(total / n)


def classwise_calibration_error(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> float:
    """Classwise ECE (Kull et al. 2019): equal-width ECE of every class's probability, averaged.

    For class k, all N values ``p_k`` are binned and
    ``ECE_k = sum_b |B_b|/N * |mean_{B_b} 1[y = k] - mean_{B_b} p_k|``; the result is
    ``mean_k ECE_k``.

    Args:
        probs: (N, C) predicted class probabilities.
        labels: (N,) integer targets.
        n_bins: Number of equal-width bins on [0, 1].

    Returns:
        Classwise ECE in [0, 1].
    """
    _check_n_bins(n_bins)
    p, y = _check_classification_inputs(probs, labels)
    n, c = p.shape
    onehot = np.zeros_like(p)
    onehot[np.arange(n), y] = 1.0
    # One joint bincount over (class, bin) pairs instead of a Python loop over classes.
    joint = (np.arange(c)[None, :] * n_bins + _bin_index(p, n_bins)).ravel()
    p_sum = np.bincount(joint, weights=p.ravel(), minlength=c * n_bins)
    hit_sum = np.bincount(joint, weights=onehot.ravel(), minlength=c * n_bins)
    per_class = np.abs(hit_sum - p_sum).reshape(c, n_bins).sum(axis=1) / n
    return float(per_class.mean())


def apply_temperature(logits: ArrayLike, temperature: float) -> np.ndarray:
    """Temperature-scaled logits ``logits / T`` (Guo et al. 2017, Sec. 4.2) as float64 numpy.

    Args:
        logits: Unnormalized logits, any shape.
        temperature: Finite T > 0.

    Returns:
        float64 array ``logits / temperature``.

    Raises:
        ValueError: If the temperature is not finite and positive.
    """
    t = _check_temperature(temperature)
    return _to_numpy(logits, np.float64) / t


def calibration_metrics(
    logits: ArrayLike, labels: ArrayLike, n_bins: int = 15, temperature: float = 1.0
) -> dict[str, float]:
    """Accuracy and calibration metrics of ``softmax(logits / temperature)``.

    Args:
        logits: (N, C) unnormalized logits.
        labels: (N,) integer targets.
        n_bins: Number of bins for the binned calibration errors.
        temperature: Temperature T > 0 applied before the softmax (Guo et al. 2017).

    Returns:
        Dict with keys ``"accuracy"``, ``"ece"``, ``"adaptive_ece"``, ``"mce"``,
        ``"classwise_ece"``, ``"brier"`` and ``"nll"`` (nats).
    """
    z, y = _check_classification_inputs(logits, labels)
    z = apply_temperature(z, temperature)
    p = _softmax(z)
    return {
        "accuracy": accuracy(z, y),
        "ece": expected_calibration_error(p, y, n_bins=n_bins),
        "adaptive_ece": adaptive_calibration_error(p, y, n_bins=n_bins),
        "mce": maximum_calibration_error(p, y, n_bins=n_bins),
        "classwise_ece": classwise_calibration_error(p, y, n_bins=n_bins),
        "brier": brier_score(p, y),
        # From logits rather than probabilities: no clamping of tiny probabilities.
        "nll": negative_log_likelihood(z, y, from_logits=True),
    }


def fit_temperature(logits: ArrayLike, labels: ArrayLike, *, max_iter: int = 100) -> float:
    """Fit the temperature of temperature scaling (Guo et al. 2017, Sec. 4.2).

    Minimizes the mean NLL of ``softmax(logits / T)`` over T > 0 with L-BFGS (strong Wolfe line
    search) on ``log T``, starting from T = 1, in float64 regardless of the global torch
    default dtype. ``log T`` is clamped to [-5, 5]. Use held-out (validation) logits, never the
    test set. Argmax predictions, hence accuracy, do not change with T.

    Args:
        logits: (N, C) unnormalized validation logits.
        labels: (N,) integer validation targets.
        max_iter: Maximum number of L-BFGS iterations.

    Returns:
        The fitted temperature; 1.0 if the optimizer did not improve on T = 1.

    Raises:
        ValueError: On empty or non-finite logits, bad label shape/range, or ``max_iter < 1``.
    """
    if isinstance(max_iter, bool) or int(max_iter) != max_iter or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
    z_np, y_np = _check_classification_inputs(logits, labels)
    # Explicit dtype/device: independent of torch's global default dtype and of input devices.
    z = torch.from_numpy(z_np).to(dtype=torch.float64, device="cpu")
    y = torch.from_numpy(y_np)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [log_t], lr=1.0, max_iter=int(max_iter), line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        # Clamping in the forward pass zeroes the gradient beyond the bounds, so the line
        # search cannot run off to T = 0 or T = inf (overflow) on degenerate data.
        t = torch.exp(log_t.clamp(_LOG_T_MIN, _LOG_T_MAX))
        loss = F.cross_entropy(z / t, y)
        loss.backward()
        return loss

    # The caller may be inside torch.no_grad() (e.g. an evaluation loop).
    with torch.enable_grad():
        optimizer.step(closure)

    log_t_final = float(log_t.detach().item())
    if not math.isfinite(log_t_final):
        return 1.0
    temperature = math.exp(min(max(log_t_final, _LOG_T_MIN), _LOG_T_MAX))
    # Guard against a failed line search: never return a T worse than leaving logits untouched.
    nll_fit = negative_log_likelihood(z_np / temperature, y_np, from_logits=True)
    nll_one = negative_log_likelihood(z_np, y_np, from_logits=True)
    if not math.isfinite(nll_fit) or nll_fit > nll_one:
        return 1.0
    return temperature


def _draw_panel(ax: Any, ax_hist: Any, name: str, logits: ArrayLike, labels: Any, n_bins: int):
    """Reliability bars with gap shading on ``ax`` and a confidence histogram on ``ax_hist``."""
    z, y = _check_classification_inputs(logits, labels)
    p = _softmax(z)
    bins = reliability_bins(p, y, n_bins=n_bins)
    ece = expected_calibration_error(p, y, n_bins=n_bins)
    edges = bins["edges"]
    centres = 0.5 * (edges[:-1] + edges[1:])
    width = 1.0 / n_bins
    nonempty = bins["count"] > 0
    acc = bins["accuracy"][nonempty]
    conf = bins["confidence"][nonempty]
    ax.bar(
        centres[nonempty],
        acc,
        width=width,
        color="tab:blue",
        edgecolor="black",
        linewidth=0.5,
        label="accuracy",
    )
    # Gap between per-bin accuracy and mean confidence: the quantity ECE averages.
    ax.bar(
        centres[nonempty],
        conf - acc,
        bottom=acc,
        width=width,
        color="tab:red",
        alpha=0.3,
        edgecolor="tab:red",
        hatch="//",
        linewidth=0.5,
        label="gap",
    )
    ax.plot([0.0, 1.0], [0.0, 1.0], linestyle="--", color="gray", label="perfect calibration")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("accuracy")
    ax.set_title(f"{name}\nECE = {100.0 * ece:.2f}%")
    ax.legend(loc="upper left", fontsize="small")
    ax_hist.bar(
        centres,
        bins["count"] / y.shape[0],
        width=width,
        color="gray",
        edgecolor="black",
        linewidth=0.5,
    )
    ax_hist.set_xlim(0.0, 1.0)
    ax_hist.set_xlabel("confidence")
    ax_hist.set_ylabel("fraction")


def plot_reliability_diagram(
    curves: Mapping[str, tuple[ArrayLike, ArrayLike]],
    path: str | Path,
    n_bins: int = 15,
    title: str | None = None,
) -> Path:
    """Save reliability diagrams (Guo et al. 2017, Fig. 1) as a PNG, one column per entry.

    Each column shows per-bin accuracy bars at the bin centres, the diagonal, the
    accuracy/confidence gap shaded, the ECE in the title, and below it a histogram of the
    confidences. Uses ``matplotlib.figure.Figure`` directly, so no pyplot state or global
    backend is touched.

    Args:
        curves: Panel name -> (logits, labels), e.g.
            ``{"before": (z, y), "after temperature scaling": (z / T, y)}``.
        path: Output file; parent directories are created.
        n_bins: Number of equal-width confidence bins.
        title: Optional figure title.

    Returns:
        The path written.
    """
    from matplotlib.figure import Figure  # deferred: matplotlib is only needed for plotting

    _check_n_bins(n_bins)
    if len(curves) == 0:
        raise ValueError("curves must contain at least one (logits, labels) entry")
    n_panels = len(curves)
    fig = Figure(figsize=(4.0 * n_panels, 5.5), layout="constrained")
    axes = fig.subplots(2, n_panels, squeeze=False, sharex="col", height_ratios=[3, 1])
    for col, (name, (logits, labels)) in enumerate(curves.items()):
        _draw_panel(axes[0, col], axes[1, col], str(name), logits, labels, n_bins)
    if title is not None:
        fig.suptitle(title)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=100)
    return out
