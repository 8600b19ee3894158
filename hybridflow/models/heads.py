"""Classifier heads that read a flow's per-scale latent features."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
from torch import Tensor, nn

from ..naming import accepted_keywords, unknown_name_message
from ..transforms import ActNorm

__all__ = ["DIGHead", "ResidualFlowsHead", "create_head", "head_keywords", "list_heads"]

Shape = tuple[int, ...]


def _pool(x: Tensor) -> Tensor:
    """Global average pool of ``[N, C, *spatial]`` to ``[N, C]`` (vectors pass through)."""
    return x.flatten(2).mean(dim=2) if x.dim() > 2 else x


class ResidualFlowsHead(nn.Module):
    """Per scale: conv3×3 → ActNorm → ReLU → global average pool; concatenate; linear.

    The hybrid head of Chen et al. 2019 ("Residual Flows", §5.4). Every scale is read, the final
    latent included. Vector features use a linear layer in place of the convolution.
    ``pool="flatten"`` keeps the spatial layout instead of averaging it away, which helps on
    tiny images (8×8 digits) where a 4×4 latent map still carries the digit's shape.

    Args:
        feature_shapes: Shapes of the per-scale features.
        num_classes: Number of classes.
        width: Channels of each per-scale convolution.
        dropout: Dropout before the final linear layer.
        pool: ``"avg"`` (global average pooling, the paper's head) or ``"flatten"``.
    """

    def __init__(
        self,
        feature_shapes: Sequence[Shape],
        num_classes: int,
        width: int = 256,
        dropout: float = 0.0,
        pool: str = "avg",
    ) -> None:
        super().__init__()
        if pool not in ("avg", "flatten"):
            raise ValueError(f"pool must be 'avg' or 'flatten', got {pool!r}")
        self.pool = pool
        self.convs = nn.ModuleList(
            nn.Conv2d(s[0], width, 3, padding=1) if len(s) == 3 else nn.Linear(s[0], width)
            for s in feature_shapes
        )
        self.norms = nn.ModuleList(ActNorm(width) for _ in feature_shapes)
        sites = [math.prod(s[1:]) if pool == "flatten" else 1 for s in feature_shapes]
        self.num_features = width * sum(sites)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def pre_logits(self, features: Sequence[Tensor]) -> Tensor:
        reduce = _pool if self.pool == "avg" else partial(torch.flatten, start_dim=1)
        pooled = [
            reduce(torch.relu(norm(conv(f))[0]))
            for f, conv, norm in zip(features, self.convs, self.norms, strict=True)
        ]
        return torch.cat(pooled, dim=1)

    def forward(self, features: Sequence[Tensor], pre_logits: bool = False) -> Tensor:
        h = self.pre_logits(features)
        return h if pre_logits else self.fc(self.drop(h))

    def reset(self, num_classes: int) -> None:
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


class DIGHead(nn.Module):
    """Linear classifier on the globally pooled latent (Nalisnick et al. 2019, "Hybrid models
    with deep and invertible features": a generalized linear model on the flow's features).

    Args:
        feature_shapes: Shapes of the per-scale features.
        num_classes: Number of classes.
        dropout: Dropout on the pooled features.
    """

    def __init__(
        self, feature_shapes: Sequence[Shape], num_classes: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.num_features = sum(s[0] for s in feature_shapes)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def pre_logits(self, features: Sequence[Tensor]) -> Tensor:
        return torch.cat([_pool(f) for f in features], dim=1)

    def forward(self, features: Sequence[Tensor], pre_logits: bool = False) -> Tensor:
        h = self.pre_logits(features)
        return h if pre_logits else self.fc(self.drop(h))

    def reset(self, num_classes: int) -> None:
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


_HEADS = {"resflow": ResidualFlowsHead, "dig": DIGHead}


def list_heads() -> list[str]:
    """Names accepted by :func:`create_head`."""
    return sorted(_HEADS)


def head_keywords(name: str) -> frozenset[str] | None:
    """Keywords head ``name`` accepts besides ``feature_shapes`` and ``num_classes``."""
    if name not in _HEADS:
        raise ValueError(unknown_name_message("head", name, _HEADS))
    return accepted_keywords(_HEADS[name], skip=2)


def create_head(
    name: str, feature_shapes: Sequence[Shape], num_classes: int, **kwargs
) -> nn.Module:
    """Build the head ``name`` (``"resflow"`` or ``"dig"``)."""
    if name not in _HEADS:
        raise ValueError(unknown_name_message("head", name, _HEADS))
    return _HEADS[name](feature_shapes, num_classes, **kwargs)
