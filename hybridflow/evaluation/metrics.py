"""Classification-calibration and out-of-distribution (OOD) detection metrics.

Calibration metrics follow Guo et al. 2017, "On Calibration of Modern Neural Networks"
(ICML): expected calibration error (ECE) with equal-width confidence bins, the Brier score
(Brier 1950) and the negative log-likelihood.

OOD metrics follow Hendrycks & Gimpel 2017 ("A Baseline for Detecting Misclassified and
Out-of-Distribution Examples"), Liang et al. 2018 (ODIN) and Liu et al. 2020 ("Energy-based
Out-of-distribution Detection").

Score convention (applies to EVERY OOD function in this module):
    **higher score = more OOD.** Negate confidence-like scores (max softmax probability,
    log-likelihood, ...) before passing them in.

All functions accept torch tensors or numpy arrays and return Python floats (or dicts of
floats). Computation happens in float64 numpy on the CPU so results do not depend on the
device or on reduced-precision input dtypes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

__all__ = [
    "OOD_METRIC_DESCRIPTIONS",
    "accuracy",
    "brier_score",
    "classification_metrics",
    "expected_calibration_error",
    "negative_log_likelihood",
    "ood_metrics",
    "selective_accuracy",
]

ArrayLike = Any  # torch.Tensor | np.ndarray | sequence of numbers

# Target true-positive rate for the FPR@TPR metrics (the "95" in FPR95).
_TPR_TARGET = 0.95

OOD_METRIC_DESCRIPTIONS: dict[str, str] = {
    "auroc": "Area under the ROC curve, OOD as positive class (1.0 = perfect, 0.5 = chance).",
    "aupr_in": "Average precision with in-distribution as the positive class (score negated).",
    "aupr_out": "Average precision with OOD as the positive class.",
    "fpr95_id": (
        "Fraction of OOD examples accepted as in-distribution at the threshold that accepts "
        "95% of in-distribution examples (ODIN / energy-score convention; lower is better)."
    ),
    "fpr95_ood": (
        "Fraction of in-distribution examples flagged as OOD at the threshold that detects "
        "95% of OOD examples (OpenOOD / pytorch-ood convention; lower is better)."
    ),
}


def _to_numpy(x: ArrayLike, dtype: type | None = None) -> np.ndarray:
    """Convert a tensor / array / sequence to a numpy array on the CPU."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        # bfloat16 / float16 tensors have no (or a lossy) numpy counterpart; upcast first.
        if x.is_floating_point():
            x = x.to(torch.float64)
        x = x.numpy()
    arr = np.asarray(x)
    return arr.astype(dtype, copy=False) if dtype is not None else arr


def _check_classification_inputs(
    values: ArrayLike, labels: ArrayLike
) -> tuple[np.ndarray, np.ndarray]:
    """Validate an (N, C) score matrix and N integer labels; return float64 / int64 arrays."""
    v = _to_numpy(values, np.float64)
    y = _to_numpy(labels)
    if v.ndim != 2:
        raise ValueError(
            f"expected a 2-D (N, C) array of probabilities/logits, got shape {v.shape}"
        )
    if y.ndim != 1 or y.shape[0] != v.shape[0]:
        raise ValueError(f"labels must have shape ({v.shape[0]},), got {y.shape}")
    if v.shape[0] == 0:
        raise ValueError("cannot compute a metric on zero examples")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{int(np.sum(~np.isfinite(v)))} non-finite values in predictions")
    if y.dtype.kind not in "iub" and not np.all(np.equal(np.mod(y, 1), 0)):
        raise ValueError("labels must be integers")
    y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= v.shape[1]:
        raise ValueError(f"labels must lie in [0, {v.shape[1]}), got range [{y.min()}, {y.max()}]")
    return v, y


def _softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable row-wise softmax."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable row-wise log-softmax (log-sum-exp with max shift)."""
    z = logits - logits.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def expected_calibration_error(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> float:
    """Expected calibration error with equal-width confidence bins (Guo et al. 2017, eq. 3).

    Confidence is the max predicted probability. Bin ``b`` covers ``(b/n_bins, (b+1)/n_bins]``;
    the first bin also contains confidence 0. ECE = sum_b |B_b|/N * |acc(B_b) - conf(B_b)|.

    Args:
        probs: (N, C) predicted class probabilities.
        labels: (N,) integer targets.
        n_bins: Number of equal-width bins on [0, 1].

    Returns:
        ECE in [0, 1].
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    p, y = _check_classification_inputs(probs, labels)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # side="left" counts the interior edges strictly below conf, which puts a value equal to an
    # edge into the lower bin -> right-closed bins (lo, hi]; conf == 0 lands in bin 0.
    bin_idx = np.searchsorted(edges[1:-1], conf, side="left")
    counts = np.bincount(bin_idx, minlength=n_bins).astype(np.float64)
    conf_sum = np.bincount(bin_idx, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(bin_idx, weights=correct, minlength=n_bins)
    # Weighted |acc - conf| per bin equals |acc_sum - conf_sum| / N, which sidesteps empty bins.
    return float(np.abs(acc_sum - conf_sum).sum() / counts.sum())


def brier_score(probs: ArrayLike, labels: ArrayLike) -> float:
    """Multi-class Brier score (Brier 1950): mean over examples of sum_c (p_c - onehot_c)^2.

    Args:
        probs: (N, C) predicted class probabilities.
        labels: (N,) integer targets.

    Returns:
        Brier score in [0, 2].
    """
    p, y = _check_classification_inputs(probs, labels)
    onehot = np.zeros_like(p)
    onehot[np.arange(p.shape[0]), y] = 1.0
    return float(((p - onehot) ** 2).sum(axis=1).mean())


def negative_log_likelihood(
    probs_or_logits: ArrayLike, labels: ArrayLike, *, from_logits: bool
) -> float:
    """Mean negative log-likelihood of the targets in nats (Guo et al. 2017, Sec. 2).

    Args:
        probs_or_logits: (N, C) logits (``from_logits=True``) or probabilities.
        labels: (N,) integer targets.
        from_logits: Whether the input holds unnormalized logits (log-softmax is applied) or
            probabilities (clamped at the smallest positive float64 to keep the log finite).

    Returns:
        Mean NLL in nats.
    """
    v, y = _check_classification_inputs(probs_or_logits, labels)
    rows = np.arange(v.shape[0])
    if from_logits:
        log_p = _log_softmax(v)[rows, y]
    else:
        log_p = np.log(np.clip(v[rows, y], np.finfo(np.float64).tiny, None))
    return float(-log_p.mean())


def accuracy(probs_or_logits: ArrayLike, labels: ArrayLike) -> float:
    """Top-1 accuracy; argmax is the same for logits and probabilities.

    Args:
        probs_or_logits: (N, C) scores.
        labels: (N,) integer targets.

    Returns:
        Fraction of correct predictions.
    """
    v, y = _check_classification_inputs(probs_or_logits, labels)
    return float((v.argmax(axis=1) == y).mean())


def classification_metrics(
    logits: ArrayLike, labels: ArrayLike, n_bins: int = 15
) -> dict[str, float]:
    """Accuracy, ECE, Brier score and NLL from logits (Guo et al. 2017).

    Args:
        logits: (N, C) unnormalized logits.
        labels: (N,) integer targets.
        n_bins: Number of ECE bins.

    Returns:
        Dict with keys ``"accuracy"``, ``"ece"``, ``"brier"``, ``"nll"``.
    """
    z, y = _check_classification_inputs(logits, labels)
    p = _softmax(z)
    return {
        "accuracy": accuracy(z, y),
        "ece": expected_calibration_error(p, y, n_bins=n_bins),
        "brier": brier_score(p, y),
        "nll": negative_log_likelihood(z, y, from_logits=True),
    }


def _check_scores(scores: ArrayLike, name: str) -> np.ndarray:
    """Flatten OOD scores to float64 and reject empty or non-finite input."""
    s = _to_numpy(scores, np.float64).ravel()
    if s.size == 0:
        raise ValueError(f"{name} is empty")
    n_bad = int(np.sum(~np.isfinite(s)))
    if n_bad:
        raise ValueError(f"{name} contains {n_bad} non-finite value(s) out of {s.size}")
    return s


def _fpr_at_tpr(y_true: np.ndarray, scores: np.ndarray, target: float = _TPR_TARGET) -> float:
    """Smallest FPR on the empirical ROC curve whose TPR reaches ``target`` (no interpolation)."""
    # drop_intermediate=False: sklearn otherwise removes collinear points, which can delete the
    # first point at which TPR crosses the target and inflate the reported FPR.
    fpr, tpr, _ = roc_curve(y_true, scores, drop_intermediate=False)
    return float(fpr[tpr >= target].min())


def ood_metrics(scores_in: ArrayLike, scores_out: ArrayLike) -> dict[str, float]:
    """Threshold-free and FPR@95%TPR OOD detection metrics (higher score = more OOD).

    See ``OOD_METRIC_DESCRIPTIONS`` for the meaning of each key. ``fpr95_id`` treats
    in-distribution as positive (Liang et al. 2018; Liu et al. 2020); ``fpr95_ood`` treats OOD
    as positive (OpenOOD, Yang et al. 2022). Both use the empirical ROC curve without
    interpolation.

    Args:
        scores_in: Scores of in-distribution examples.
        scores_out: Scores of OOD examples.

    Returns:
        Dict with keys ``"auroc"``, ``"aupr_in"``, ``"aupr_out"``, ``"fpr95_id"``,
        ``"fpr95_ood"``.

    Raises:
        ValueError: If either input is empty or contains non-finite scores.
    """
    s_in = _check_scores(scores_in, "scores_in")
    s_out = _check_scores(scores_out, "scores_out")
    scores = np.concatenate([s_in, s_out])
    is_ood = np.concatenate([np.zeros(s_in.size, np.int64), np.ones(s_out.size, np.int64)])
    is_id = 1 - is_ood
    return {
        "auroc": float(roc_auc_score(is_ood, scores)),
        "aupr_in": float(average_precision_score(is_id, -scores)),
        "aupr_out": float(average_precision_score(is_ood, scores)),
        # In-dist positive with score -s: FPR = OOD accepted, TPR = in-dist accepted.
        "fpr95_id": _fpr_at_tpr(is_id, -scores),
        # OOD positive with score s: FPR = in-dist flagged, TPR = OOD detected.
        "fpr95_ood": _fpr_at_tpr(is_ood, scores),
    }


def selective_accuracy(
    correct: ArrayLike, confidence: ArrayLike, coverages: tuple[float, ...] = (0.8, 0.9, 0.95)
) -> dict[str, float]:
    """Accuracy on the most confident fraction of inputs, and the area under the risk curve.

    Selective classification (Geifman & El-Yaniv 2017): reject the least confident inputs and
    classify the rest. ``confidence`` can be any score where higher = keep (max-softmax, or
    log p(x) of a hybrid model, the use Nalisnick et al. 2019 propose for DIG). At coverage ``c``
    the ``ceil(c · N)`` most confident inputs are kept (ties broken by input order).

    Args:
        correct: (N,) booleans, whether each prediction is right.
        confidence: (N,) scores, higher = more confident.
        coverages: Kept fractions in (0, 1].

    Returns:
        ``{"acc@80": ..., "acc@90": ..., "acc@95": ..., "aurc": ...}``: accuracy at each coverage
        (key = percent) and AURC, the mean risk (error rate) over all coverages k/N.
    """
    ok = _to_numpy(correct).astype(bool).ravel()
    conf = _to_numpy(confidence, np.float64).ravel()
    if ok.size == 0 or ok.size != conf.size:
        raise ValueError(
            f"need equally many, non-zero, correct ({ok.size}) and confidences ({conf.size})"
        )
    if not np.all(np.isfinite(conf)):
        raise ValueError("confidence contains non-finite values")
    order = np.argsort(-conf, kind="stable")
    hits = np.cumsum(ok[order])
    kept = np.arange(1, ok.size + 1)
    out = {}
    for c in coverages:
        if not 0.0 < c <= 1.0:
            raise ValueError(f"coverage must lie in (0, 1], got {c}")
        k = int(np.ceil(c * ok.size - 1e-9))
        out[f"acc@{round(100 * c):d}"] = float(hits[k - 1] / k)
    out["aurc"] = float(np.mean(1.0 - hits / kept))
    return out
