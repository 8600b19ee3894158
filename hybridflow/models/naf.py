"""Neural-autoregressive-flow backbones (Huang et al. 2018, "Neural Autoregressive Flows").

* ``naf`` (vectors ``(D,)``): a stack of
  :class:`~hybridflow.transforms.naf.NeuralAutoregressiveFlow` layers with a reversing
  :class:`~hybridflow.transforms.autoregressive.Permutation` between consecutive flows, so
  that every dimension is eventually conditioned on every other (as in
  MAF, Papamakarios et al. 2017, and the NAF experiments).
* ``naf-coupling`` (images ``(C, H, W)`` or vectors): the layout of the ``coupling`` backbone
  (:mod:`hybridflow.models.coupling`, built with the shared ``stack_scales`` helper) with each
  ``ActNorm → affine coupling`` step replaced by ``ActNorm → NAF coupling`` (an elementwise DSF
  whose pseudo-parameters come from a conditioner on the kept channel half).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..transforms import ActNorm, InvertibleSequential, MultiscaleFlow
from ..transforms.autoregressive import Permutation
from ..transforms.naf import NAFCoupling, NeuralAutoregressiveFlow
from .coupling import conditioner_factory, coupling_layout
from .registry import register_backbone

__all__ = ["naf", "naf_coupling"]


@register_backbone
def naf(
    input_shape: tuple[int, ...],
    transformer: str = "dsf",
    num_flows: int = 5,
    num_units: int = 16,
    num_layers: int = 2,
    hidden_features: int | Sequence[int] = 64,
    made_layers: int = 2,
    seed: int = 0,
) -> MultiscaleFlow:
    """Stack of NAF layers (MADE conditioner + DSF/DDSF transformer) for vector inputs.

    Args:
        input_shape: ``(D,)``.
        transformer: ``"dsf"`` or ``"ddsf"``.
        num_flows: Number of NAF layers; a reversal permutation sits between consecutive ones.
        num_units: Sigmoid units ``K`` of the transformer (per layer for DDSF).
        num_layers: DDSF layers ``L`` (ignored for DSF).
        hidden_features: MADE hidden width (an int, repeated ``made_layers`` times) or widths.
        made_layers: Number of MADE hidden layers when ``hidden_features`` is an int.
        seed: Base seed of the MADEs (flow ``i`` uses ``seed + i``).
    """
    if len(input_shape) != 1:
        raise ValueError(f"the naf backbone expects vector inputs (D,), got {input_shape}")
    if num_flows < 1:
        raise ValueError(f"num_flows must be >= 1, got {num_flows}")
    d = input_shape[0]
    hidden = (
        (hidden_features,) * made_layers
        if isinstance(hidden_features, int)
        else tuple(hidden_features)
    )
    layers: list[nn.Module] = []
    for i in range(num_flows):
        if i > 0:
            layers.append(Permutation.reversed(d))
        layers.append(
            NeuralAutoregressiveFlow(d, transformer, num_units, num_layers, hidden, seed=seed + i)
        )
    return MultiscaleFlow(
        [InvertibleSequential(layers)], input_shape, [input_shape], factor_out=False
    )


@register_backbone(name="naf-coupling")
def naf_coupling(
    input_shape: tuple[int, ...],
    num_scales: int = 3,
    blocks_per_scale: int | Sequence[int] = 4,
    hidden_channels: int = 64,
    num_res_blocks: int = 1,
    num_units: int = 8,
    squeeze_first: bool = True,
    factor_out: bool = False,
    actnorm: bool = True,
) -> MultiscaleFlow:
    """Multiscale flow of ``ActNorm → NAF (DSF) coupling`` steps, laid out like ``coupling``.

    Consecutive couplings alternate the channel half they transform, so every channel is
    updated. For vector inputs ``(D,)`` it is a single scale of such steps with MLP conditioners.

    Args:
        input_shape: ``(C, H, W)`` or ``(D,)``.
        num_scales: Number of scales; squeezes happen between them.
        blocks_per_scale: Coupling steps per scale (an int or one per scale).
        hidden_channels: Width of the conditioners (ResNets for images, MLPs for vectors).
        num_res_blocks: Residual blocks (images) or hidden layers (vectors) per conditioner.
        num_units: Sigmoid units ``K`` of each DSF.
        squeeze_first: Squeeze before the first scale (needed for 1-channel images).
        factor_out: Factor out half the channels after every scale but the last.
        actnorm: ActNorm before every coupling (and at the end of the last scale).
    """

    def step(c: int, index: int, spatial: bool) -> list[nn.Module]:
        layers: list[nn.Module] = [ActNorm(c)] if actnorm else []
        factory = conditioner_factory(spatial, hidden_channels, num_res_blocks)
        layers.append(NAFCoupling(c, num_units, "channel", index % 2, factory, spatial=spatial))
        return layers

    return coupling_layout(
        "naf-coupling",
        input_shape,
        step,
        num_scales,
        blocks_per_scale,
        squeeze_first,
        factor_out,
        actnorm,
    )
