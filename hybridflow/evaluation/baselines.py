"""Reference likelihood baselines in bits per dimension for discrete image data.

Bits per dimension (bpd) is the standard likelihood unit of image flows (Dinh et al. 2017,
"Density estimation using Real NVP"; Kingma & Dhariwal 2018, "Glow"). The baselines here give
the floor any learned model must beat: the uniform model, and an independent per-pixel
categorical model with additive (Laplace / Lidstone) smoothing (Chen & Goodman 1999,
"An Empirical Study of Smoothing Techniques for Language Modeling").
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = ["categorical_bits_per_dim", "uniform_bits_per_dim"]

ArrayLike = Any  # torch.Tensor | np.ndarray | sequence of ints

# Number of (image, pixel) entries handled per chunk; bounds the int64 index buffers at
# ~64 MiB so full CIFAR/ImageNet-sized training sets do not need an N*D int64 copy at once.
_CHUNK_ELEMS = 1 << 23


def uniform_bits_per_dim(num_levels: int) -> float:
    """Bits per dimension of the uniform distribution over ``num_levels`` values: log2(K)."""
    if num_levels < 1:
        raise ValueError(f"num_levels must be >= 1, got {num_levels}")
    return math.log2(num_levels)


def _as_level_array(x: ArrayLike, num_levels: int, name: str) -> np.ndarray:
    """Convert images to an (N, D) int64 array and check values lie in [0, num_levels)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim < 1 or arr.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty N x ... array, got shape {arr.shape}")
    if arr.dtype.kind == "f":
        # Accept float storage of integer levels, but not continuous (dequantized) values.
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError(f"{name} must hold integer pixel levels, found non-integer values")
    elif arr.dtype.kind not in "iub":
        raise ValueError(f"{name} must be an integer array, got dtype {arr.dtype}")
    arr = arr.reshape(arr.shape[0], -1)
    if arr.shape[1] == 0:
        raise ValueError(f"{name} has zero dimensions per example")
    lo, hi = arr.min(), arr.max()
    if lo < 0 or hi >= num_levels:
        raise ValueError(f"{name} values must lie in [0, {num_levels}), found range [{lo}, {hi}]")
    return arr.astype(np.int64, copy=False)


def categorical_bits_per_dim(
    train_images: ArrayLike,
    test_images: ArrayLike,
    num_levels: int,
    alpha: float = 1.0,
) -> float:
    """Test bpd of an independent per-pixel categorical model with additive smoothing.

    For each position d, P_d(k) = (count_d(k) + alpha) / (N_train + alpha * K), fitted on the
    training images. The result is mean_n [-sum_d log2 P_d(x_nd)] / D over the test images.

    Args:
        train_images: (N_train, ...) integer levels in [0, num_levels).
        test_images: (N_test, ...) integer levels with the same trailing shape.
        num_levels: Number of discrete levels K (e.g. 256 for 8-bit images).
        alpha: Additive smoothing pseudo-count (1.0 = Laplace); must be > 0 so every level
            has non-zero probability.

    Returns:
        Bits per dimension on the test images.

    Raises:
        ValueError: On out-of-range or non-integer values, mismatched shapes, or alpha <= 0.
    """
    if num_levels < 1:
        raise ValueError(f"num_levels must be >= 1, got {num_levels}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    train = _as_level_array(train_images, num_levels, "train_images")
    test = _as_level_array(test_images, num_levels, "test_images")
    if train.shape[1] != test.shape[1]:
        raise ValueError(
            f"train and test images have different sizes: {train.shape[1]} vs {test.shape[1]}"
        )
    n_train, dim = train.shape
    K = num_levels

    # Counts via one bincount over flat (position, level) indices d * K + x.
    offsets = np.arange(dim, dtype=np.int64) * K
    rows_per_chunk = max(1, _CHUNK_ELEMS // dim)
    counts = np.zeros(dim * K, dtype=np.int64)
    for start in range(0, n_train, rows_per_chunk):
        flat = (train[start : start + rows_per_chunk] + offsets).ravel()
        counts += np.bincount(flat, minlength=dim * K)

    log2_probs = np.log2(counts + alpha) - np.log2(n_train + alpha * K)

    total_bits = 0.0
    for start in range(0, test.shape[0], rows_per_chunk):
        flat = (test[start : start + rows_per_chunk] + offsets).ravel()
        total_bits -= float(log2_probs[flat].sum())
    return total_bits / (test.shape[0] * dim)
