"""Invertible 1×1 convolution (Kingma & Dhariwal 2018, "Glow"), plain or LU-parametrized."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..nets.amp import autocast_disabled
from .base import InvertibleModule

__all__ = ["InvertibleConv1x1"]


class InvertibleConv1x1(InvertibleModule):
    """Channel mixing ``z = W x`` at every position, a learned generalization of a permutation.

    With ``lu=True`` (Glow, Section 3.2) ``W = P · L · (U + diag(sign · exp(log_s)))`` with a fixed
    permutation ``P``, unit-diagonal lower ``L`` and strictly upper ``U``: the log-det is
    ``H·W·Σ log_s``, O(C) instead of the O(C³) ``slogdet`` of the plain parametrization, and ``W``
    stays invertible by construction. Both start from a random rotation (log-det 0).

    Args:
        num_channels: Channels ``C`` (features for vector inputs).
        lu: Use the LU parametrization.
        spatial: Whether inputs are images ``[N, C, H, W]`` (``True``) or vectors ``[N, C]``.
    """

    def __init__(self, num_channels: int, lu: bool = True, *, spatial: bool = True) -> None:
        super().__init__()
        if num_channels < 1:
            raise ValueError(f"num_channels must be positive, got {num_channels}")
        self.num_channels, self.lu, self.spatial = num_channels, lu, spatial
        rotation = torch.linalg.qr(torch.randn(num_channels, num_channels, dtype=torch.float64))[0]
        if not lu:
            self.weight = nn.Parameter(rotation.to(torch.get_default_dtype()))
            return
        perm, lower, upper = torch.linalg.lu(rotation)
        diag = torch.diagonal(upper)
        dtype = torch.get_default_dtype()
        self.register_buffer("perm", perm.to(dtype))
        self.register_buffer("sign_s", torch.sign(diag).to(dtype))
        self.register_buffer("lower_mask", torch.tril(torch.ones_like(rotation), -1).to(dtype))
        self.lower = nn.Parameter(lower.to(dtype))
        self.upper = nn.Parameter(torch.triu(upper, 1).to(dtype))
        self.log_s = nn.Parameter(diag.abs().log().to(dtype))

    def _weight_and_logdet(self) -> tuple[Tensor, Tensor]:
        """Return ``W`` and ``log|det W|`` (per position)."""
        if not self.lu:
            return self.weight, torch.linalg.slogdet(self.weight)[1]
        eye = torch.eye(self.num_channels, dtype=self.lower.dtype, device=self.lower.device)
        lower = self.lower * self.lower_mask + eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * self.log_s.exp())
        return self.perm @ lower @ upper, self.log_s.sum()

    def _check(self, x: Tensor) -> None:
        want = 4 if self.spatial else 2
        if x.dim() != want or x.shape[1] != self.num_channels:
            shape = "[N, C, H, W]" if self.spatial else "[N, C]"
            raise ValueError(
                f"InvertibleConv1x1 expects {shape} with C={self.num_channels}, "
                f"got {tuple(x.shape)}"
            )

    def _mix(self, x: Tensor, weight: Tensor) -> Tensor:
        if self.spatial:
            return F.conv2d(x, weight.view(*weight.shape, 1, 1))
        return x @ weight.T

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(x)
        # Part of the flow, not of a conditioner: under autocast the products forming W and the
        # mixing itself stay in x's dtype (float32), since z and the log-det depend on them.
        with autocast_disabled(x):
            weight, logdet = self._weight_and_logdet()
            positions = x.shape[2] * x.shape[3] if self.spatial else 1
            return self._mix(x, weight), (logdet * positions).expand(x.shape[0])

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        self._check(z)
        with autocast_disabled(z):
            weight, _ = self._weight_and_logdet()
            return self._mix(z, torch.linalg.inv(weight))
