"""Volume-preserving reshapes of image tensors (Dinh et al. 2017, "Real NVP", §3.6)."""

from __future__ import annotations

from torch import Tensor

from .base import InvertibleModule

__all__ = ["Squeeze"]


class Squeeze(InvertibleModule):
    """Space-to-depth: ``[N, C, H, W] -> [N, C*f*f, H/f, W/f]`` (log-det 0).

    Args:
        factor: Spatial block size ``f``; ``H`` and ``W`` must be divisible by it.
    """

    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        if factor < 1:
            raise ValueError(f"factor must be >= 1, got {factor}")
        self.factor = factor

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if x.dim() != 4:
            raise ValueError(f"Squeeze expects [N, C, H, W], got {tuple(x.shape)}")
        n, c, h, w = x.shape
        f = self.factor
        if h % f or w % f:
            raise ValueError(f"Squeeze(factor={f}) needs H and W divisible by {f}, got {h}x{w}")
        x = x.reshape(n, c, h // f, f, w // f, f).permute(0, 1, 3, 5, 2, 4)
        return x.reshape(n, c * f * f, h // f, w // f), x.new_zeros(n)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        if z.dim() != 4:
            raise ValueError(f"Squeeze.inverse expects [N, C, H, W], got {tuple(z.shape)}")
        n, c, h, w = z.shape
        f = self.factor
        if c % (f * f):
            raise ValueError(f"Squeeze.inverse needs C divisible by {f * f}, got {c}")
        z = z.reshape(n, c // (f * f), f, f, h, w).permute(0, 1, 4, 2, 5, 3)
        return z.reshape(n, c // (f * f), h * f, w * f)
