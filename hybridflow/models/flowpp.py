"""Flow++ backbones (Ho et al. 2019, "Flow++: Improving flow-based generative models with
variational dequantization and architecture design").

Each step is ``ActNorm → [invertible 1×1 conv] → mixture-of-logistics CDF coupling`` whose
conditioner is the gated conv-attention stack. Layout: checkerboard couplings at full resolution,
a squeeze, channel couplings, then checkerboard couplings at half resolution; no factor-out, so a
classifier head sees the whole latent. Features are taken after the full-resolution block and at
the end.

Named configurations:

* ``flowpp-cifar10``: the paper's CIFAR-10 model (§4: 4 checkerboard couplings at 32×32, 2 channel
  couplings and 3 checkerboard couplings at 16×16; 10 conv-attention blocks of 96 filters; 32
  logistics; dropout 0.2). GPU-sized: 27,991,884 parameters at 3×32×32 against the reference
  code's 27,976,464 for its main flow (its 31.4 M include a 3.5 M dequantization flow); the
  difference is our per-channel ActNorm and weight-norm gains (``benchmarks/peer_pairs/flowpp.py``).
  The paper's model adds ``dequantization="variational"`` with
  :data:`FLOWPP_CIFAR10_DEQUANTIZATION` (3.7 M parameters here).
* ``flowpp-cpu``: the same layout with 2 + 2 + 2 couplings, 2 blocks of 32 filters, 4 logistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from torch import nn

from ..nets import FlowppConditioner
from ..transforms import (
    ActNorm,
    AffineCoupling,
    InvertibleConv1x1,
    InvertibleSequential,
    MixLogisticCoupling,
    MultiscaleFlow,
    Squeeze,
)
from .registry import register_backbone

__all__ = ["FLOWPP_CIFAR10_DEQUANTIZATION", "flowpp", "flowpp_cifar10", "flowpp_cpu"]

#: ``dequantization_args`` of the paper's CIFAR-10 dequantization flow (4 couplings, 96 filters,
#: 2 blocks, 32 logistics), for :class:`~hybridflow.transforms.VariationalDequantization`.
FLOWPP_CIFAR10_DEQUANTIZATION = {
    "num_couplings": 4,
    "context_channels": 32,
    "hidden_channels": 96,
    "num_blocks": 2,
    "num_components": 32,
    "dropout": 0.2,
}


@register_backbone
def flowpp(
    input_shape: tuple[int, ...],
    checkerboard_steps: Sequence[int] = (4, 3),
    channel_steps: int = 2,
    hidden_channels: int = 96,
    num_blocks: int = 10,
    num_components: int = 32,
    num_heads: int = 4,
    attention: bool = True,
    dropout: float = 0.2,
    conv1x1: bool = True,
    coupling: str = "mixlogistic",
    float64_mixture: bool = False,
    inverse_tol: float = 1e-6,
    inverse_max_iter: int = 100,
    checkerboard_layout: str = "gathered",
) -> MultiscaleFlow:
    """Flow++ for images ``(C, H, W)`` with even ``H`` and ``W``.

    Args:
        input_shape: ``(C, H, W)``.
        checkerboard_steps: Checkerboard couplings at full and at half resolution.
        channel_steps: Channel couplings right after the squeeze.
        hidden_channels, num_blocks, num_heads, attention, dropout: Conditioner settings, see
            :class:`~hybridflow.nets.FlowppConditioner`.
        num_components: Logistics per mixture.
        conv1x1: Invertible 1×1 convolution in every step.
        coupling: ``"mixlogistic"`` (Flow++) or ``"affine"`` (RealNVP's coupling with the same
            conditioner; the paper's Table 2 ablation).
        float64_mixture, inverse_tol, inverse_max_iter: See
            :class:`~hybridflow.transforms.MixLogisticCoupling`.
        checkerboard_layout: ``"gathered"`` (the reference code's: the conditioner sees the
            kept sites packed into ``H × W/2``) or ``"masked"`` (the full board, moved sites
            zeroed), see :class:`~hybridflow.transforms.coupling.MaskedCoupling`.
    """
    if len(input_shape) != 3 or input_shape[1] % 2 or input_shape[2] % 2:
        raise ValueError(f"flowpp expects image inputs (C, H, W) with even H, W; got {input_shape}")
    if coupling not in ("mixlogistic", "affine"):
        raise ValueError(f"coupling must be 'mixlogistic' or 'affine', got {coupling!r}")
    if len(checkerboard_steps) != 2:
        raise ValueError("checkerboard_steps needs two counts: full and half resolution")
    if checkerboard_layout == "gathered" and input_shape[2] % 4 and checkerboard_steps[1]:
        raise ValueError(
            f"gathered checkerboards at half resolution need a width divisible by 4, got "
            f"{input_shape}: use checkerboard_layout='masked'"
        )
    coupling_kw = dict(
        float64_mixture=float64_mixture,
        inverse_tol=inverse_tol,
        inverse_max_iter=inverse_max_iter,
    )

    def step(c: int, size: tuple[int, int], mask: str, parity: int) -> list[nn.Module]:
        gathered = mask == "checkerboard" and checkerboard_layout == "gathered"
        factory = partial(
            FlowppConditioner,
            input_size=(size[0], size[1] // 2) if gathered else size,
            hidden_channels=hidden_channels,
            num_blocks=num_blocks,
            num_heads=num_heads,
            attention=attention,
            dropout=dropout,
        )
        layers: list[nn.Module] = [ActNorm(c)]
        if conv1x1:
            layers.append(InvertibleConv1x1(c))
        layout = dict(checkerboard_layout=checkerboard_layout)
        if coupling == "affine":
            return [*layers, AffineCoupling(c, mask, parity, factory, **layout)]
        return [
            *layers,
            MixLogisticCoupling(c, num_components, mask, parity, factory, **coupling_kw, **layout),
        ]

    c, h, w = input_shape
    full: list[nn.Module] = []
    for i in range(checkerboard_steps[0]):
        full += step(c, (h, w), "checkerboard", i % 2)
    full.append(Squeeze(2))
    c, h, w = 4 * c, h // 2, w // 2
    half: list[nn.Module] = []
    for i in range(channel_steps):
        half += step(c, (h, w), "channel", i % 2)
    for i in range(checkerboard_steps[1]):
        half += step(c, (h, w), "checkerboard", i % 2)
    half.append(ActNorm(c))
    blocks = [InvertibleSequential(full), InvertibleSequential(half)]
    return MultiscaleFlow(blocks, input_shape, [(c, h, w)] * 2, factor_out=False)


@register_backbone(name="flowpp-cifar10", base=flowpp)
def flowpp_cifar10(input_shape: tuple[int, ...], **overrides) -> MultiscaleFlow:
    """The paper's CIFAR-10 settings (see the module docstring); keywords override them."""
    return flowpp(input_shape, **overrides)


@register_backbone(name="flowpp-cpu", base=flowpp)
def flowpp_cpu(input_shape: tuple[int, ...], **overrides) -> MultiscaleFlow:
    """A CPU-sized Flow++ (2 + 2 + 2 couplings, 2 blocks of 32 filters, 4 logistics)."""
    settings = dict(
        checkerboard_steps=(2, 2),
        channel_steps=2,
        hidden_channels=32,
        num_blocks=2,
        num_components=4,
        dropout=0.0,
    )
    return flowpp(input_shape, **{**settings, **overrides})
