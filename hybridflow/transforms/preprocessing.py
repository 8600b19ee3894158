"""Data-side layers: uniform dequantization and logit preprocessing.

Dequantization turns integer pixel levels ``x ∈ {0, …, K-1}`` into continuous values
``y = (x + u) / K ∈ [0, 1)`` with ``u ~ U[0, 1)^D`` (Theis et al. 2016, "A note on the
evaluation of generative models"). For a density ``p`` on ``[0, 1)^D``,
``E_u[log p(y)] - D log K ≤ log P(x)``: the dequantizer's log-det ``-D log K`` turns the
density of ``y`` into a density on the level scale, so a flow's ``log_prob`` is a lower bound
on the discrete log-likelihood and bits/dim are measured on the K-level alphabet.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import InvertibleModule, sum_except_batch

__all__ = ["LogitTransform", "UniformDequantization"]


class UniformDequantization(InvertibleModule):
    """Integer levels → ``[0, 1)`` by adding uniform noise and dividing by ``K``.

    This layer is a surjection, not a bijection: ``inverse`` rounds down to the level, so
    ``inverse(forward(x)) == x`` holds for integer ``x``. For fixed noise the forward map is
    affine with log|det J| = ``-D log K``, which is what :meth:`forward` returns.

    Args:
        num_levels: Alphabet size ``K`` (17 for scikit-learn digits, 256 for 8-bit images).
    """

    #: Marks layers whose inverse is only a left inverse on the discrete data.
    surjective = True

    def __init__(self, num_levels: int) -> None:
        super().__init__()
        if num_levels < 2:
            raise ValueError(f"num_levels must be >= 2, got {num_levels}")
        self.num_levels = num_levels

    def forward(
        self, x: Tensor, context: Tensor | None = None, *, noise: Tensor | float | None = None
    ) -> tuple[Tensor, Tensor]:
        """Dequantize; ``noise`` fixes ``u`` (a tensor, or a constant: 0.5 gives bin centres)."""
        x = x.to(torch.get_default_dtype()) if not x.is_floating_point() else x
        if bool((x < 0).any()) or bool((x > self.num_levels - 1).any()):
            raise ValueError(
                f"UniformDequantization expects integer levels in [0, {self.num_levels - 1}], got "
                f"values in [{x.min().item():g}, {x.max().item():g}]"
            )
        if noise is None:
            u = torch.rand_like(x)
        elif isinstance(noise, Tensor):
            u = noise.to(x)
        else:
            u = torch.full_like(x, float(noise))
        y = (x + u) / self.num_levels
        dim = x[0].numel()
        logdet = x.new_full((x.shape[0],), -dim * math.log(self.num_levels))
        return y, logdet

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        return torch.floor(z * self.num_levels).clamp_(0, self.num_levels - 1)


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

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if bool((x < 0).any()) or bool((x > 1).any()):
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
