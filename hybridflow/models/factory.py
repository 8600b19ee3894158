"""Build a :class:`HybridModel` from a plain config dict (the form saved beside every run)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .flow import FlowModel
from .hybrid import HybridModel
from .registry import create_backbone

__all__ = ["create_hybrid_model"]


def create_hybrid_model(
    config: Mapping[str, Any],
    input_shape: tuple[int, ...],
    num_levels: int | None,
    num_classes: int,
) -> HybridModel:
    """Build the model described by ``config`` for data of the given shape and alphabet.

    Reads ``backbone``, ``backbone_args``, ``head``, ``head_args``, ``preprocessing``,
    ``logit_alpha``, ``dequantization`` and ``dequantization_args``. Continuous data
    (``num_levels=None``) gets no dequantization and no logit.
    """
    backbone = create_backbone(
        config["backbone"], input_shape, **dict(config.get("backbone_args") or {})
    )
    preprocessing = config.get("preprocessing", "logit") if num_levels is not None else "none"
    flow = FlowModel(
        backbone,
        input_shape,
        num_levels=num_levels,
        preprocessing=preprocessing,
        logit_alpha=float(config.get("logit_alpha", 1e-3)),
        dequantization=config.get("dequantization", "uniform"),
        dequantization_args=dict(config.get("dequantization_args") or {}) or None,
    )
    return HybridModel(
        flow, num_classes, head=config.get("head", "resflow"), **dict(config.get("head_args") or {})
    )
