"""Hybrid classifier–generative model (Nalisnick et al. 2019, "Hybrid models with deep and
invertible features").

Loss per example, all in nats:

    loss = CE(y | x) + λ · NLL(x),   NLL(x) = -log_prob(x)

so λ = 1 is the exact joint negative log-likelihood ``-log p(y, x)`` and λ = 1/D weighs the
per-dimension NLL (Chen et al. 2019, "Residual Flows", §5.4); λ = 0 trains a plain classifier
on the flow's features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .flow import FlowModel
from .heads import create_head
from .lam import Lambda

__all__ = ["HybridModel", "HybridOutput"]


@dataclass
class HybridOutput:
    """Per-example outputs of :class:`HybridModel`."""

    logits: Tensor
    log_prob: Tensor
    features: list[Tensor]


class HybridModel(nn.Module):
    """Flow trunk + classifier head on its latent features.

    Follows timm's split: :meth:`forward_features` (the flow), :meth:`forward_head` (the head),
    ``num_features`` and :meth:`reset_classifier`.

    Args:
        flow: The density model whose latents feed the head.
        num_classes: Number of classes.
        head: ``"resflow"`` (Chen et al. 2019) or ``"dig"`` (Nalisnick et al. 2019).
        head_kwargs: Extra arguments of the head (``width``, ``dropout``).
    """

    def __init__(
        self, flow: FlowModel, num_classes: int, head: str = "resflow", **head_kwargs
    ) -> None:
        super().__init__()
        self.flow = flow
        self.num_classes = num_classes
        self.head = create_head(head, flow.feature_shapes, num_classes, **head_kwargs)

    @property
    def num_features(self) -> int:
        return self.head.num_features

    @property
    def dim(self) -> int:
        return self.flow.dim

    def forward_features(self, x: Tensor, dequant_noise=None) -> tuple[list[Tensor], Tensor]:
        """Run the flow: per-scale latent features and per-example ``log_prob`` (nats)."""
        return self.flow.forward_features(x, dequant_noise)

    def forward_head(self, features: list[Tensor], pre_logits: bool = False) -> Tensor:
        """Run the head on the flow's features; the result comes back in the features' dtype.

        Under bf16 autocast the head's convolutions and linear layers compute in bfloat16; the
        cast keeps logits (and the cross-entropy read from them) float32. A no-op otherwise.
        """
        return self.head(features, pre_logits=pre_logits).to(features[0].dtype)

    def forward(self, x: Tensor, dequant_noise=None) -> HybridOutput:
        features, log_prob = self.forward_features(x, dequant_noise)
        return HybridOutput(self.forward_head(features), log_prob, features)

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes)

    def data_init(self, x: Tensor) -> None:
        """Data-dependent initialisation of every ActNorm, flow and head."""
        was_training = self.training
        self.train()
        with torch.no_grad():
            self.forward(x)
        self.train(was_training)

    def loss(self, x: Tensor, y: Tensor, lam: float | str | Lambda) -> dict[str, Tensor]:
        """Hybrid loss terms, each a per-example tensor in nats.

        Unlabelled examples (label -1) have ``ce = 0`` and contribute only λ·NLL (semi-supervised
        training); a model without classes (``num_classes = 0``) is a pure density model.

        Returns a dict with ``loss`` (CE + λ·NLL), ``ce``, ``nll`` and ``bpd`` (NLL in bits/dim),
        plus ``logits``.
        """
        # A float is the weight itself (the trainer resolves λ once); else parse "1/D", "0.5", ...
        valid_float = isinstance(lam, float) and math.isfinite(lam) and lam >= 0
        weight = lam if valid_float else Lambda.parse(lam).value(self.dim)
        out = self(x)
        if self.num_classes:
            ce = F.cross_entropy(out.logits, y, reduction="none", ignore_index=-1)
        else:  # the head's output is features, not logits: there is nothing to classify
            ce = torch.zeros_like(out.log_prob)
        nll = -out.log_prob
        bpd = nll / (self.dim * math.log(2))
        return {"loss": ce + weight * nll, "ce": ce, "nll": nll, "bpd": bpd, "logits": out.logits}
