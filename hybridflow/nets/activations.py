"""1-Lipschitz activations for contractive residual branches.

Invertible residual blocks ``x + g(x)`` need ``Lip(g) < 1``; since ``Lip(g)`` is bounded by the
product of the layer norms and the activation constants, every activation must be 1-Lipschitz.
The log-determinant estimator also differentiates through ``g``'s Jacobian, so the activations
should have a continuous, non-vanishing derivative (Chen et al. 2019, "Residual Flows for
Invertible Generative Modeling", §4.3).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fused import SWISH_LIPSCHITZ, LipSwishFunction, use_fused_lipswish

__all__ = [
    "LIPSCHITZ_ACTIVATIONS",
    "LipELU",
    "LipSoftplus",
    "LipSwish",
    "create_lipschitz_activation",
]

LIPSCHITZ_ACTIVATIONS: tuple[str, ...] = ("lipswish", "elu", "softplus")


class LipSwish(nn.Module):
    """``x·sigmoid(beta·x) / 1.1`` with learnable ``beta = softplus(raw_beta) > 0``.

    Chen et al. 2019, "Residual Flows", §4.3: unlike ELU/softplus, Swish's second derivative
    does not vanish near the origin, which avoids saturation of the Jacobian-gradient terms.
    Large float32/bfloat16 maps use hand-written, compiled first and second derivatives
    (:mod:`hybridflow.nets.fused`); the values are the same function's.
    """

    def __init__(self) -> None:
        super().__init__()
        self.raw_beta = nn.Parameter(torch.tensor(0.5))

    @property
    def beta(self) -> Tensor:
        return F.softplus(self.raw_beta)

    def forward(self, x: Tensor) -> Tensor:
        # Out-of-place on purpose: residual flows backpropagate through vector-Jacobian
        # products of this function (double backward), which in-place ops would corrupt.
        # x·sigmoid(βx) = silu(βx)/β: one fused op (and fused backward) instead of four
        # elementwise ones, which dominate the cost of the residual branches on CPU.
        beta = self.beta
        if use_fused_lipswish(x):
            return LipSwishFunction.apply(x, beta)
        return F.silu(beta * x) * (1.0 / (SWISH_LIPSCHITZ * beta))


class LipELU(nn.Module):
    """ELU with ``alpha ∈ (0, 1]``, whose derivative lies in ``(0, 1]`` (Chen et al. 2019, §4.3).

    Only ``alpha = 1`` gives a continuous derivative; smaller values are still 1-Lipschitz but
    introduce a kink at 0 that the Jacobian-based log-det gradient does not like.
    """

    def __init__(self, alpha: float = 1.0) -> None:
        super().__init__()
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"LipELU needs alpha in (0, 1] to be 1-Lipschitz, got {alpha}")
        self.alpha = float(alpha)

    def forward(self, x: Tensor) -> Tensor:
        return F.elu(x, alpha=self.alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


class LipSoftplus(nn.Module):
    """``softplus(x) - log 2``: smooth, derivative ``sigmoid(x) ∈ (0, 1)``, and ``f(0) = 0``.

    Centering at zero keeps ``g(0)`` small so a residual block starts close to the identity
    (Behrmann et al. 2019, "Invertible Residual Networks"; Chen et al. 2019, §4.3).
    """

    def forward(self, x: Tensor) -> Tensor:
        return F.softplus(x) - math.log(2.0)


def create_lipschitz_activation(name: str) -> nn.Module:
    """Build a 1-Lipschitz activation by name (one of :data:`LIPSCHITZ_ACTIVATIONS`)."""
    key = name.lower()
    if key == "lipswish":
        return LipSwish()
    if key == "elu":
        return LipELU()
    if key == "softplus":
        return LipSoftplus()
    raise ValueError(
        f"unknown Lipschitz activation {name!r}; choose one of {', '.join(LIPSCHITZ_ACTIVATIONS)}"
    )
