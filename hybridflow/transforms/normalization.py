"""Activation normalization (Kingma & Dhariwal 2018, "Glow", §3.1)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..nets.datainit import DataInitFlag
from .base import InvertibleModule

__all__ = ["ActNorm"]


class ActNorm(DataInitFlag, InvertibleModule):
    """Per-channel affine map ``z = (x + bias) * exp(log_scale)`` with data-dependent init.

    On its first forward in training mode the layer sets ``bias`` and ``log_scale`` so that the
    output has zero mean and unit variance per channel on that batch (Glow §3.1). In eval mode an
    uninitialised layer is left as it is, so eval outputs never depend on the rest of the batch.
    Works on ``[N, C]`` and ``[N, C, *spatial]`` inputs; the log-det counts every spatial site.

    Args:
        num_channels: Number of channels ``C`` (dimension 1 of the input).
        eps: Added to the standard deviation at initialisation.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.eps = eps
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.log_scale = nn.Parameter(torch.zeros(num_channels))
        # A buffer, not a Python bool, so EMA copies and checkpoints carry the state.
        self.register_buffer("initialized", torch.tensor(False))

    def _view(self, p: Tensor, x: Tensor) -> Tensor:
        return p.view(1, -1, *([1] * (x.dim() - 2)))

    def _check(self, x: Tensor) -> None:
        if x.dim() < 2 or x.shape[1] != self.num_channels:
            raise ValueError(
                f"ActNorm({self.num_channels}) expects [N, {self.num_channels}, ...], got "
                f"{tuple(x.shape)}"
            )

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> None:
        dims = [0, *range(2, x.dim())]
        mean = x.mean(dim=dims)
        std = (
            x.std(dim=dims, unbiased=False)
            if x.numel() > self.num_channels
            else torch.ones_like(mean)
        )
        self.bias.copy_(-mean)
        self.log_scale.copy_(-torch.log(std + self.eps))
        self._mark_initialized()

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(x)
        if self.training and self._init_pending():
            self._initialize(x)
        z = (x + self._view(self.bias, x)) * self._view(self.log_scale, x).exp()
        sites = x[0, 0].numel()
        logdet = (self.log_scale.sum() * sites).expand(x.shape[0])
        return z, logdet

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        self._check(z)
        return z * self._view(-self.log_scale, z).exp() - self._view(self.bias, z)
