"""Logit preprocessing of dequantized data (Dinh et al. 2017, "Real NVP", §4.1).

Dequantizers live in :mod:`hybridflow.transforms.dequantization`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import InvertibleModule, sum_except_batch

__all__ = ["LogitTransform"]


class LogitTransform(InvertibleModule):
    """``[0, 1] → ℝ`` by ``z = logit(α + (1 - 2α) x)`` (Dinh et al. 2017, "Real NVP", §4.1).

    Args:
        alpha: Boundary margin that keeps the logit finite at 0 and 1.
    """

    def __init__(self, alpha: float = 1e-3) -> None:
        super().__init__()
        if not 0.0 <= alpha < 0.5:
            raise ValueError(f"alpha must lie in [0, 0.5), got {alpha}")
        self.alpha = alpha
        self._lost_by_dtype: dict[torch.dtype, bool] = {}  # see _margin_lost

    def _margin_lost(self, dtype: torch.dtype) -> bool:
        """Whether ``α`` vanishes in ``dtype`` (``s`` rounds to 0 at ``x = 0`` or 1 at ``x = 1``).

        Cached per dtype: the answer depends only on ``α`` and the precision.
        """
        # setdefault: layers unpickled from before this cache existed lack the attribute.
        cache = self.__dict__.setdefault("_lost_by_dtype", {})
        if dtype not in cache:
            at_zero = torch.tensor(self.alpha, dtype=dtype)
            at_one = at_zero + torch.tensor(1 - 2 * self.alpha, dtype=dtype)
            cache[dtype] = bool(at_zero <= 0) or bool(at_one >= 1)
        return cache[dtype]

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self._margin_lost(x.dtype):
            # Without a margin the logit of 0 or 1 is ±∞: refuse rather than return it silently.
            if bool((x <= 0).any()) or bool((x >= 1).any()):
                raise ValueError(
                    f"LogitTransform(alpha={self.alpha:g}) in {x.dtype} expects inputs in (0, 1), "
                    f"got [{x.min().item():g}, {x.max().item():g}]: the logit of 0 or 1 is "
                    "infinite; use a larger alpha to allow the end points"
                )
        elif bool((x < 0).any()) or bool((x > 1).any()):
            raise ValueError(
                f"LogitTransform expects inputs in [0, 1], got [{x.min().item():g}, "
                f"{x.max().item():g}]; dequantize integer levels first"
            )
        s = self.alpha + (1 - 2 * self.alpha) * x
        log_s, log_1ms = torch.log(s), torch.log1p(-s)
        z = log_s - log_1ms
        logdet = sum_except_batch(math.log(1 - 2 * self.alpha) - log_s - log_1ms)
        return z, logdet

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        return ((torch.sigmoid(z) - self.alpha) / (1 - 2 * self.alpha)).clamp(0, 1)
