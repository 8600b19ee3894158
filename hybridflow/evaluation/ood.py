"""Out-of-distribution (OOD) scores for flows, classifiers and hybrids.

Score convention (applies to EVERY score in this module and to :func:`ood_metrics`):
    **higher score = more OOD.** Likelihoods and confidences are negated here, once.

Likelihood alone fails as an OOD score: flows trained on Fashion-MNIST give MNIST digits higher
likelihood (Nalisnick et al. 2019, "Do Deep Generative Models Know What They Don't Know?"). The
scores below show that failure next to the fixes:

- ``nll`` / ``bpd``: negative log-likelihood (nats) and bits/dim of the model's bound.
- ``typicality``: distance of the NLL from the model's entropy, for single inputs or batches of
  M, with a bootstrap threshold (Nalisnick et al. 2019b, "Detecting Out-of-Distribution Inputs
  to Deep Generative Models Using Typicality").
- ``complexity``: bits/dim minus the bits/dim of a lossless PNG encoding of the same image
  (Serrà et al. 2020, "Input Complexity and Out-of-Distribution Detection with Likelihood-based
  Generative Models").
- ``likelihood_ratio``: log-likelihood ratio against a background model trained on perturbed
  inputs (Ren et al. 2019, "Likelihood Ratios for Out-of-Distribution Detection").
- ``max_softmax`` (Hendrycks & Gimpel 2017), ``energy`` (Liu et al. 2020) and ``mahalanobis``
  with class means and one tied covariance (Lee et al. 2018) on trunk or head features.
- ``hybrid``: Fisher's combination of conformal p-values of a density score and a classifier
  score, both calibrated on held-out in-distribution data (Fisher 1925; Vovk et al. 2005).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image
from sklearn.covariance import empirical_covariance, ledoit_wolf

from .metrics import _check_scores, _to_numpy

__all__ = [
    "OOD_SCORE_DESCRIPTIONS",
    "FisherCombination",
    "MahalanobisDetector",
    "TypicalityTest",
    "bpd_score",
    "complexity_score",
    "conformal_p_values",
    "energy_score",
    "likelihood_ratio_score",
    "max_softmax_score",
    "nll_score",
    "png_bits_per_dim",
]

ArrayLike = Any  # torch.Tensor | np.ndarray | sequence of numbers

OOD_SCORE_DESCRIPTIONS: dict[str, str] = {
    "nll": "Negative log-likelihood in nats (the model's bound); fails when OOD data is simpler.",
    "bpd": "Bits per dimension, NLL / (D ln 2): the same ranking as nll.",
    "typicality": "|NLL - H| for single inputs, H = mean in-distribution NLL (Nalisnick 2019b).",
    "typicality_batch": "|mean NLL of a batch of M - H|, per batch of M inputs (Nalisnick 2019b).",
    "complexity": "bits/dim minus PNG bits/dim of the image (Serrà et al. 2020).",
    "likelihood_ratio": "-(log p(x) - log p_bg(x)), background on perturbed data (Ren 2019).",
    "max_softmax": "Negated maximum softmax probability (Hendrycks & Gimpel 2017).",
    "energy": "Energy -T logsumexp(logits / T) (Liu et al. 2020).",
    "mahalanobis": "Min over classes of the Mahalanobis distance², tied covariance, on the flow "
    "latent (trunk) features (Lee et al. 2018).",
    "mahalanobis_head": "The same on the classifier head's pre-logit features.",
    "hybrid": "Fisher combination -2 Σ log p of conformal p-values of a density score and a "
    "classifier score, calibrated on in-distribution validation data.",
}


def _as_array(x: ArrayLike, name: str, ndim: int | None = None) -> np.ndarray:
    """Float64 numpy copy of ``x``; rejects empty, non-finite or wrongly shaped input."""
    arr = _to_numpy(x, np.float64)
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    _check_scores(arr, name)  # empty or non-finite
    return arr


def nll_score(log_prob: ArrayLike) -> np.ndarray:
    """Negative log-likelihood (nats) from per-example ``log_prob``."""
    return -_as_array(log_prob, "log_prob", 1)


def bpd_score(log_prob: ArrayLike, dim: int) -> np.ndarray:
    """Bits per dimension ``-log_prob / (D ln 2)``."""
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    return nll_score(log_prob) / (dim * math.log(2))


def max_softmax_score(logits: ArrayLike) -> np.ndarray:
    """Negated maximum softmax probability (Hendrycks & Gimpel 2017)."""
    z = _as_array(logits, "logits", 2)
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return -(p.max(axis=1) / p.sum(axis=1))


def energy_score(logits: ArrayLike, temperature: float = 1.0) -> np.ndarray:
    """Free energy ``E(x) = -T logsumexp(f(x) / T)`` (Liu et al. 2020); high energy = OOD."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = _as_array(logits, "logits", 2) / temperature
    top = z.max(axis=1)
    return -temperature * (top + np.log(np.exp(z - top[:, None]).sum(axis=1)))


def likelihood_ratio_score(log_prob: ArrayLike, background_log_prob: ArrayLike) -> np.ndarray:
    """``-(log p(x) - log p_bg(x))`` (Ren et al. 2019): the background model explains away the
    population-level statistics (smooth backgrounds, pixel counts) that dominate ``log p``."""
    lp = _as_array(log_prob, "log_prob", 1)
    bg = _as_array(background_log_prob, "background_log_prob", 1)
    if lp.shape != bg.shape:
        raise ValueError(f"log_prob {lp.shape} and background_log_prob {bg.shape} differ")
    return bg - lp


def png_bits_per_dim(images: ArrayLike, num_levels: int) -> np.ndarray:
    """Bits per dimension of each image's lossless PNG file (Serrà et al. 2020, §3).

    ``images`` are integer levels ``[N, C, H, W]`` (C = 1 or 3) or ``[N, H, W]``. Levels are
    stored as 8-bit values unchanged, so the code length measures the image's own complexity on
    the model's alphabet; the constant PNG header cancels in every comparison between inputs.
    Uses the maximum zlib compression level (Pillow's ``optimize=True``).
    """
    if not 1 < num_levels <= 256:
        raise ValueError(f"PNG stores at most 256 levels per channel, got num_levels={num_levels}")
    arr = _to_numpy(images)
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim != 4 or arr.shape[1] not in (1, 3) or arr.shape[0] == 0:
        raise ValueError(f"expected images [N, 1|3, H, W] or [N, H, W], got {arr.shape}")
    if not np.all(arr == np.round(arr)) or arr.min() < 0 or arr.max() >= num_levels:
        raise ValueError(f"images must hold integer levels in [0, {num_levels})")
    dim = arr[0].size
    pixels = arr.astype(np.uint8).transpose(0, 2, 3, 1)
    bits = np.empty(arr.shape[0])
    for i, img in enumerate(pixels):
        buf = io.BytesIO()
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(
            buf, format="PNG", optimize=True
        )
        bits[i] = 8 * buf.tell()
    return bits / dim


def complexity_score(bpd: ArrayLike, complexity_bpd: ArrayLike) -> np.ndarray:
    """Input-complexity-corrected score ``S(x) = bpd(x) - L(x)/D`` (Serrà et al. 2020, eq. 2).

    ``L(x)`` is a generic lossless code length (e.g. :func:`png_bits_per_dim`): simple inputs get
    short codes, so subtracting it removes the complexity bias of the likelihood.
    """
    a = _as_array(bpd, "bpd", 1)
    b = _as_array(complexity_bpd, "complexity_bpd", 1)
    if a.shape != b.shape:
        raise ValueError(f"bpd {a.shape} and complexity_bpd {b.shape} differ")
    return a - b


class TypicalityTest:
    """Typicality test of Nalisnick et al. 2019b for single inputs or batches of ``M``.

    A batch is atypical when its mean NLL is far from the model's entropy ``H``, estimated by the
    mean NLL of held-out in-distribution data. The threshold ``epsilon`` is the ``alpha``
    quantile of ``|mean NLL - H|`` over bootstrap batches of ``M`` drawn from the same held-out
    data (§4 of the paper), so in-distribution batches are flagged at rate about ``1 - alpha``.

    Args:
        batch_size: ``M``; 1 scores single inputs.
        alpha: Bootstrap quantile of the threshold.
        n_bootstrap: Number of bootstrap batches.
        seed: Seed of the bootstrap draws.
    """

    def __init__(
        self, batch_size: int = 1, alpha: float = 0.99, n_bootstrap: int = 5000, seed: int = 0
    ) -> None:
        if batch_size < 1 or n_bootstrap < 1 or not 0 < alpha < 1:
            raise ValueError("need batch_size >= 1, n_bootstrap >= 1 and 0 < alpha < 1")
        self.batch_size, self.alpha, self.n_bootstrap, self.seed = (
            batch_size,
            alpha,
            n_bootstrap,
            seed,
        )
        self.entropy: float | None = None
        self.epsilon: float | None = None

    def fit(self, nll: ArrayLike) -> TypicalityTest:
        """Estimate ``H`` and the bootstrap threshold from held-out in-distribution NLLs."""
        values = _as_array(nll, "nll", 1)
        if values.size < 2:
            raise ValueError("the typicality test needs at least 2 held-out examples")
        self.entropy = float(values.mean())
        rng = np.random.default_rng(self.seed)
        idx = rng.integers(0, values.size, size=(self.n_bootstrap, self.batch_size))
        gaps = np.abs(values[idx].mean(axis=1) - self.entropy)
        self.epsilon = float(np.quantile(gaps, self.alpha))
        return self

    def score(self, nll: ArrayLike) -> np.ndarray:
        """``|mean NLL - H|`` of disjoint random batches of ``M`` (ragged tail dropped).

        For ``M > 1`` the inputs are shuffled (seeded) before batching, so batches are random
        like the bootstrap batches behind ``epsilon`` even when the data are stored sorted (by
        class, say). For ``M = 1`` the scores keep the input order.
        """
        if self.entropy is None:
            raise RuntimeError("call fit() on held-out in-distribution NLLs first")
        values = _as_array(nll, "nll", 1)
        if self.batch_size > 1:
            values = np.random.default_rng(self.seed).permutation(values)
        n, size = values.size // self.batch_size, values.size
        if n == 0:
            raise ValueError(f"need at least batch_size={self.batch_size} inputs, got {size}")
        means = values[: n * self.batch_size].reshape(n, self.batch_size).mean(axis=1)
        return np.abs(means - self.entropy)

    def flag(self, nll: ArrayLike) -> np.ndarray:
        """Whether each batch is rejected as OOD at the bootstrap threshold."""
        scores = self.score(nll)
        return scores > self.epsilon


class MahalanobisDetector:
    """Class-conditional Gaussians with one tied covariance on features (Lee et al. 2018).

    The score is ``min_c (f - μ_c)ᵀ Σ⁻¹ (f - μ_c)``. ``Σ`` is estimated from class-centred
    training features with Ledoit-Wolf shrinkage by default, which keeps it well conditioned
    when features are high-dimensional (the flow latent has D dimensions).

    Args:
        shrinkage: ``True`` for Ledoit-Wolf, ``False`` for the empirical covariance.
    """

    def __init__(self, shrinkage: bool = True) -> None:
        self.shrinkage = shrinkage
        self.means: np.ndarray | None = None
        self.whitener: np.ndarray | None = None

    def fit(self, features: ArrayLike, labels: ArrayLike) -> MahalanobisDetector:
        f = _as_array(features, "features", 2)
        y = _to_numpy(labels).astype(int)
        if y.shape != (f.shape[0],):
            raise ValueError(f"labels must have shape ({f.shape[0]},), got {y.shape}")
        classes = np.unique(y)
        self.means = np.stack([f[y == c].mean(axis=0) for c in classes])
        centred = f - self.means[np.searchsorted(classes, y)]
        # sklearn's functions, not its estimators: LedoitWolf().fit also inverts Σ by an
        # eigendecomposition (pinvh) that is thrown away here, 100 of a Fashion-MNIST cell's
        # 440 s of evaluation (a 6,272-feature head); the covariance is the same.
        if self.shrinkage:
            cov = ledoit_wolf(centred, assume_centered=True)[0]
        else:
            cov = empirical_covariance(centred, assume_centered=True)
        # Σ⁻¹ = W Wᵀ with W = L⁻ᵀ from Σ = L Lᵀ: distances become Euclidean after f ↦ f W.
        chol = np.linalg.cholesky(cov + 1e-10 * np.trace(cov) / cov.shape[0] * np.eye(len(cov)))
        self.whitener = np.linalg.inv(chol).T
        return self

    def score(self, features: ArrayLike) -> np.ndarray:
        if self.whitener is None:
            raise RuntimeError("call fit() on in-distribution training features first")
        f = _as_array(features, "features", 2)
        if f.shape[1] != self.whitener.shape[0]:
            raise ValueError(f"expected {self.whitener.shape[0]} features, got {f.shape[1]}")
        g, m = f @ self.whitener, self.means @ self.whitener
        d2 = (g**2).sum(1)[:, None] - 2 * g @ m.T + (m**2).sum(1)[None, :]
        return np.maximum(d2.min(axis=1), 0.0)


def conformal_p_values(calibration: ArrayLike, scores: ArrayLike) -> np.ndarray:
    """Conformal p-values ``(1 + #{s_cal >= s}) / (n + 1)`` (Vovk et al. 2005).

    Under the in-distribution hypothesis each p-value is (super-)uniform, whatever the score's
    scale, which makes scores of different units combinable.
    """
    cal = np.sort(_as_array(calibration, "calibration", 1))
    s = _as_array(scores, "scores", 1)
    at_least = cal.size - np.searchsorted(cal, s, side="left")
    return (1.0 + at_least) / (cal.size + 1.0)


class FisherCombination:
    """Fisher's method on conformal p-values of several scores: ``-2 Σ_k log p_k``.

    Each component is calibrated on held-out in-distribution scores. Higher = more OOD. The
    hybrid model's own evidence is two-fold, density and class posterior, so the hybrid score
    combines one of each (see :data:`OOD_SCORE_DESCRIPTIONS`).
    """

    def __init__(self) -> None:
        self.calibration: dict[str, np.ndarray] = {}

    def fit(self, calibration: Mapping[str, ArrayLike]) -> FisherCombination:
        if not calibration:
            raise ValueError("need at least one component score")
        self.calibration = {k: _as_array(v, k, 1) for k, v in calibration.items()}
        return self

    def score(self, scores: Mapping[str, ArrayLike]) -> np.ndarray:
        missing = set(self.calibration) - set(scores)
        if missing:
            raise ValueError(f"missing component scores: {sorted(missing)}")
        logs: Sequence[np.ndarray] = [
            np.log(conformal_p_values(cal, scores[k])) for k, cal in self.calibration.items()
        ]
        return -2.0 * np.sum(logs, axis=0)
