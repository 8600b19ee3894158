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
    With ``feature_shape`` it keeps one ``bias`` and ``log_scale`` per feature of an example
    instead (inputs ``[N, *feature_shape]``), as the Residual Flows code's ``ActNorm1d`` on the
    flattened features after its fully connected blocks (Chen et al. 2019).

    Args:
        num_channels: Number of channels ``C`` (dimension 1 of the input).
        eps: Added to the standard deviation at initialisation.
        feature_shape: Per-feature parameters for examples of this shape (its first entry must
            be ``num_channels``); ``None``: per channel.
    """

    def __init__(
        self, num_channels: int, eps: float = 1e-6, *, feature_shape: tuple[int, ...] | None = None
    ) -> None:
        super().__init__()
        if feature_shape is not None and (not feature_shape or feature_shape[0] != num_channels):
            raise ValueError(
                f"feature_shape must start with num_channels={num_channels}, got {feature_shape}"
            )
        self.num_channels = num_channels
        self.feature_shape = None if feature_shape is None else tuple(feature_shape)
        self.eps = eps
        shape = self.feature_shape or (num_channels,)
        self.bias = nn.Parameter(torch.zeros(shape))
        self.log_scale = nn.Parameter(torch.zeros(shape))
        # A buffer, not a Python bool, so EMA copies and checkpoints carry the state.
        self.register_buffer("initialized", torch.tensor(False))

    def _view(self, p: Tensor, x: Tensor) -> Tensor:
        if self.feature_shape is not None:
            return p.unsqueeze(0)
        return p.view(1, -1, *([1] * (x.dim() - 2)))

    def _check(self, x: Tensor) -> None:
        if self.feature_shape is not None:
            if tuple(x.shape[1:]) != self.feature_shape:
                raise ValueError(
                    f"ActNorm(feature_shape={self.feature_shape}) expects "
                    f"[N, {', '.join(map(str, self.feature_shape))}], got {tuple(x.shape)}"
                )
        elif x.dim() < 2 or x.shape[1] != self.num_channels:
            raise ValueError(
                f"ActNorm({self.num_channels}) expects [N, {self.num_channels}, ...], got "
                f"{tuple(x.shape)}"
            )

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> None:
        dims = [0] if self.feature_shape is not None else [0, *range(2, x.dim())]
        mean = x.mean(dim=dims)
        # One example gives no spread: keep the unit scale then.
        std = (
            x.std(dim=dims, unbiased=False)
            if x.numel() > self.bias.numel()
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
        sites = 1 if self.feature_shape is not None else x[0, 0].numel()
        logdet = (self.log_scale.sum() * sites).expand(x.shape[0])
        return z, logdet

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        self._check(z)
        return z * self._view(-self.log_scale, z).exp() - self._view(self.bias, z)
