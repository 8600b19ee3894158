"""Multiscale architecture with factor-out (Dinh et al. 2017, "Real NVP", §3.6)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .base import InvertibleModule

__all__ = ["MultiscaleFlow"]

Shape = tuple[int, ...]


class MultiscaleFlow(InvertibleModule):
    """Scale blocks applied in turn, optionally factoring out half the channels after each.

    ``forward(x)`` returns the whole latent as a flat ``[N, D]`` tensor: the factored-out
    pieces of every scale followed by the output of the last scale, so a flow's prior and its
    inverse see one vector. :meth:`forward_features` also returns the per-scale latent tensors
    that classifier heads read: with factor-out, the pieces ``z_1, …, z_L`` (the last one is
    the final scale's output, which a head must not skip); without factor-out, the activation
    at the end of every scale (the last one is the latent itself).

    Args:
        blocks: One invertible module per scale.
        input_shape: Shape ``(C, H, W)`` (or ``(D,)``) of one input example.
        block_shapes: Output shape of each block for an input of ``input_shape``.
        factor_out: Factor out ``C - C // 2`` channels after every block but the last.
    """

    def __init__(
        self,
        blocks: Sequence[InvertibleModule],
        input_shape: Shape,
        block_shapes: Sequence[Shape],
        factor_out: bool = True,
    ) -> None:
        super().__init__()
        if len(blocks) != len(block_shapes) or not blocks:
            raise ValueError("blocks and block_shapes must be non-empty and of equal length")
        self.blocks = nn.ModuleList(blocks)
        self.input_shape = tuple(input_shape)
        self.factor_out = factor_out
        self.block_shapes = [tuple(s) for s in block_shapes]
        # Shapes of the latent pieces and of what flows into the next block.
        latent_shapes: list[Shape] = []
        self._next_shapes: list[Shape] = []
        for i, shape in enumerate(self.block_shapes):
            last = i == len(self.block_shapes) - 1
            if factor_out and not last:
                c = shape[0]
                if c < 2:
                    raise ValueError(f"cannot factor out channels of a {shape} block output")
                latent_shapes.append((c - c // 2, *shape[1:]))
                self._next_shapes.append((c // 2, *shape[1:]))
            else:
                latent_shapes.append(shape)
                self._next_shapes.append(shape)
        self.latent_shapes = latent_shapes
        dims = [math.prod(s) for s in (latent_shapes if factor_out else latent_shapes[-1:])]
        self.latent_dim = sum(dims)
        if self.latent_dim != math.prod(self.input_shape):
            raise ValueError(
                f"latent dimension {self.latent_dim} differs from input dimension "
                f"{math.prod(self.input_shape)}: check block_shapes"
            )

    @property
    def feature_shapes(self) -> list[Shape]:
        """Shapes of the per-scale features returned by :meth:`forward_features`."""
        return list(self.latent_shapes)

    def forward_features(
        self, x: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Return ``(z_flat, logdet, features)``."""
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"expected inputs of shape [N, {', '.join(map(str, self.input_shape))}], got "
                f"{tuple(x.shape)}"
            )
        logdet = x.new_zeros(x.shape[0])
        features: list[Tensor] = []
        h = x
        for i, block in enumerate(self.blocks):
            h, ld = block(h, context)
            logdet = logdet + ld
            if self.factor_out and i < len(self.blocks) - 1:
                z_i, h = h[:, : self.latent_shapes[i][0]], h[:, self.latent_shapes[i][0] :]
                features.append(z_i)
            else:
                features.append(h)
        return self.flatten_features(features), logdet, features

    def flatten_features(self, features: list[Tensor]) -> Tensor:
        """The flat latent ``z`` that :meth:`forward_features` returns with ``features``.

        With factor-out ``z`` concatenates every scale's factored piece; without, every scale's
        features are full-size activations and ``z`` is the last of them.
        """
        pieces = features if self.factor_out else features[-1:]
        return torch.cat([p.reshape(p.shape[0], -1) for p in pieces], dim=1)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        z, logdet, _ = self.forward_features(x, context)
        return z, logdet

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"expected a flat latent [N, {self.latent_dim}], got {tuple(z.shape)}")
        n = z.shape[0]
        if not self.factor_out:
            h = z.reshape(n, *self.latent_shapes[-1])
            for block in reversed(self.blocks):
                h = block.inverse(h, context)
            return h
        sizes = [math.prod(s) for s in self.latent_shapes]
        pieces = [
            p.reshape(n, *s) for p, s in zip(z.split(sizes, dim=1), self.latent_shapes, strict=True)
        ]
        h = pieces[-1]
        for i in range(len(self.blocks) - 1, -1, -1):
            if i < len(self.blocks) - 1:
                h = torch.cat([pieces[i], h], dim=1)
            h = self.blocks[i].inverse(h, context)
        return h
