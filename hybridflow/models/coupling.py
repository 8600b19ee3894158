"""Coupling backbones laid out like the Residual Flow ones, for the hybrid comparison.

Chen et al. 2019 ("Residual Flows", Table 4) compare hybrid models whose flows differ only in the
block type: "Coupling" and "+1×1 Conv" rows against residual blocks. These backbones therefore
keep the :func:`~hybridflow.models.resflow.resflow` layout (optional squeeze first, scales joined
by squeezes, optional factor-out, features at the end of every scale) and replace each
``ActNorm → ResidualBlock`` with ``ActNorm → [1×1 conv] → affine coupling`` (Glow's step of flow,
Kingma & Dhariwal 2018). Without the 1×1 convolution consecutive couplings alternate the channel
half they transform, so every channel is updated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

from torch import nn

from ..nets import MLP, ConvResNet
from ..transforms import (
    ActNorm,
    AffineCoupling,
    InvertibleConv1x1,
    InvertibleSequential,
    MultiscaleFlow,
)
from ..transforms.coupling import NetFactory
from .registry import register_backbone
from .resflow import _blocks_per_scale, stack_scales

__all__ = ["conditioner_factory", "coupling", "coupling_1x1", "coupling_layout"]


def conditioner_factory(spatial: bool, hidden_channels: int, num_res_blocks: int) -> NetFactory:
    """Coupling conditioners of these backbones: ResNets for images, MLPs for vectors."""
    if spatial:
        return partial(ConvResNet, hidden_channels=hidden_channels, num_blocks=num_res_blocks)
    return partial(MLP, hidden_features=hidden_channels, num_layers=num_res_blocks)


def coupling_layout(
    name: str,
    input_shape: tuple[int, ...],
    step: Callable[[int, int, bool], list[nn.Module]],
    num_scales: int,
    blocks_per_scale: int | Sequence[int],
    squeeze_first: bool,
    factor_out: bool,
    actnorm: bool,
) -> MultiscaleFlow:
    """The coupling backbones' layout around ``step(channels, index, spatial) -> layers``.

    Vectors ``(D,)`` get one scale of steps; images the shared multiscale layout
    (:func:`~hybridflow.models.resflow.stack_scales`) with an ActNorm closing the last scale.
    Also used by the ``naf-coupling`` backbone.
    """
    if len(input_shape) == 1:
        count = _blocks_per_scale(blocks_per_scale, 1)[0]
        layers = [m for i in range(count) for m in step(input_shape[0], i, False)]
        return MultiscaleFlow(
            [InvertibleSequential(layers)], input_shape, [input_shape], factor_out=False
        )
    if len(input_shape) != 3:
        raise ValueError(f"{name} expects (C, H, W) or (D,) inputs, got {input_shape}")
    if input_shape[0] < 2 and not squeeze_first:
        raise ValueError("channel couplings need at least 2 channels: set squeeze_first=True")

    def scale_layers(shape: tuple[int, int, int], count: int, last: bool) -> list[nn.Module]:
        layers = [m for i in range(count) for m in step(shape[0], i, True)]
        return [*layers, ActNorm(shape[0])] if last and actnorm else layers

    counts = _blocks_per_scale(blocks_per_scale, num_scales)
    return stack_scales(input_shape, counts, squeeze_first, factor_out, scale_layers)


def _coupling_flow(
    input_shape: tuple[int, ...],
    conv1x1: bool,
    num_scales: int,
    blocks_per_scale: int | Sequence[int],
    hidden_channels: int,
    num_res_blocks: int,
    squeeze_first: bool,
    factor_out: bool,
    additive: bool,
    actnorm: bool,
) -> MultiscaleFlow:
    def step(c: int, index: int, spatial: bool) -> list[nn.Module]:
        layers: list[nn.Module] = [ActNorm(c)] if actnorm else []
        if conv1x1:
            layers.append(InvertibleConv1x1(c, spatial=spatial))
        factory = conditioner_factory(spatial, hidden_channels, num_res_blocks)
        # The 1x1 convolution mixes channels, so a fixed half suffices; otherwise alternate.
        parity = 0 if conv1x1 else index % 2
        layers.append(
            AffineCoupling(c, "channel", parity, factory, spatial=spatial, additive=additive)
        )
        return layers

    name = "coupling+1x1" if conv1x1 else "coupling"
    return coupling_layout(
        name, input_shape, step, num_scales, blocks_per_scale, squeeze_first, factor_out, actnorm
    )


@register_backbone
def coupling(
    input_shape: tuple[int, ...],
    num_scales: int = 3,
    blocks_per_scale: int | Sequence[int] = 4,
    hidden_channels: int = 64,
    num_res_blocks: int = 1,
    squeeze_first: bool = True,
    factor_out: bool = False,
    additive: bool = False,
    actnorm: bool = True,
) -> MultiscaleFlow:
    """Multiscale flow of ``ActNorm → affine coupling`` steps (the "Coupling" row).

    Args:
        input_shape: ``(C, H, W)`` or ``(D,)``.
        num_scales: Number of scales; squeezes happen between them.
        blocks_per_scale: Coupling steps per scale (an int or one per scale).
        hidden_channels: Width of the conditioners (ResNets for images, MLPs for vectors).
        num_res_blocks: Residual blocks (images) or hidden layers (vectors) per conditioner.
        squeeze_first: Squeeze before the first scale (needed for 1-channel images).
        factor_out: Factor out half the channels after every scale but the last.
        additive: Additive (NICE) instead of affine couplings.
        actnorm: ActNorm before every coupling.
    """
    return _coupling_flow(
        input_shape,
        False,
        num_scales,
        blocks_per_scale,
        hidden_channels,
        num_res_blocks,
        squeeze_first,
        factor_out,
        additive,
        actnorm,
    )


@register_backbone(name="coupling+1x1")
def coupling_1x1(
    input_shape: tuple[int, ...],
    num_scales: int = 3,
    blocks_per_scale: int | Sequence[int] = 4,
    hidden_channels: int = 64,
    num_res_blocks: int = 1,
    squeeze_first: bool = True,
    factor_out: bool = False,
    additive: bool = False,
    actnorm: bool = True,
) -> MultiscaleFlow:
    """Like :func:`coupling` with an LU 1×1 convolution before every coupling (Glow's step).

    Args: as in :func:`coupling`.
    """
    return _coupling_flow(
        input_shape,
        True,
        num_scales,
        blocks_per_scale,
        hidden_channels,
        num_res_blocks,
        squeeze_first,
        factor_out,
        additive,
        actnorm,
    )
