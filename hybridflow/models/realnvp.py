"""RealNVP-style affine coupling backbones (Dinh et al. 2017, "Density estimation using Real NVP").

Images: each scale but the last applies checkerboard couplings, a squeeze and channel
couplings, then factors out half the channels (§3.6); the last scale applies checkerboard
couplings. Every coupling is followed by ActNorm (Glow §3.1) in place of RealNVP's batch norm,
so log-dets never depend on the batch. Vectors (2-D toy data, tabular data): alternating
channel couplings with MLP conditioners.
"""

from __future__ import annotations

from functools import partial

from ..nets import MLP, ConvResNet
from ..transforms import ActNorm, AffineCoupling, InvertibleSequential, MultiscaleFlow, Squeeze
from .registry import register_backbone

__all__ = ["realnvp", "realnvp_vector"]


def _coupling(
    channels: int, mask: str, parity: int, factory, actnorm: bool, checkerboard_layout: str
) -> list:
    layers = [
        AffineCoupling(channels, mask, parity, factory, checkerboard_layout=checkerboard_layout)
    ]
    return [*layers, ActNorm(channels)] if actnorm else layers


@register_backbone
def realnvp(
    input_shape: tuple[int, ...],
    num_scales: int = 2,
    couplings_per_scale: int = 3,
    final_couplings: int = 4,
    hidden_channels: int = 64,
    num_res_blocks: int = 2,
    dropout: float = 0.0,
    factor_out: bool = True,
    actnorm: bool = True,
    checkerboard_layout: str = "gathered",
) -> MultiscaleFlow:
    """Multiscale affine coupling flow for images ``(C, H, W)``.

    Args:
        input_shape: ``(C, H, W)``; ``H`` and ``W`` must be divisible by ``2**(num_scales-1)``.
        num_scales: Number of scales (squeezes happen between them).
        couplings_per_scale: Checkerboard couplings before, and channel couplings after, each
            squeeze.
        final_couplings: Checkerboard couplings of the last scale.
        hidden_channels: Width of the conditioner ResNets.
        num_res_blocks: Residual blocks per conditioner.
        dropout: Dropout inside conditioners.
        factor_out: Factor out half the channels after every scale but the last.
        actnorm: Follow every coupling with ActNorm.
        checkerboard_layout: ``"gathered"`` (the conditioner convolves the kept sites packed
            into ``H × W/2``, as the Flow++ reference code does; every checkerboard scale needs
            an even width) or ``"masked"`` (RealNVP's own: the full board, moved sites zeroed),
            see :class:`~hybridflow.transforms.coupling.MaskedCoupling`.
    """
    if len(input_shape) != 3:
        raise ValueError(f"realnvp expects image inputs (C, H, W), got {input_shape}")
    c, h, w = input_shape
    if h % 2 ** (num_scales - 1) or w % 2 ** (num_scales - 1):
        raise ValueError(f"{h}x{w} inputs cannot be squeezed {num_scales - 1} times")
    if checkerboard_layout == "gathered" and (w // 2 ** (num_scales - 1)) % 2:
        raise ValueError(
            f"gathered checkerboards need an even width at every scale; {w} is "
            f"{w // 2 ** (num_scales - 1)} wide at scale {num_scales}: use "
            "checkerboard_layout='masked' or fewer scales"
        )
    factory = partial(
        ConvResNet, hidden_channels=hidden_channels, num_blocks=num_res_blocks, dropout=dropout
    )
    layout = checkerboard_layout
    blocks, shapes = [], []
    for scale in range(num_scales):
        layers: list = []
        if scale == num_scales - 1:
            for i in range(final_couplings):
                layers += _coupling(c, "checkerboard", i % 2, factory, actnorm, layout)
        else:
            for i in range(couplings_per_scale):
                layers += _coupling(c, "checkerboard", i % 2, factory, actnorm, layout)
            layers.append(Squeeze(2))
            c, h, w = 4 * c, h // 2, w // 2
            for i in range(couplings_per_scale):
                layers += _coupling(c, "channel", i % 2, factory, actnorm, layout)
        blocks.append(InvertibleSequential(layers))
        shapes.append((c, h, w))
        if factor_out and scale < num_scales - 1:
            c = c // 2
    return MultiscaleFlow(blocks, input_shape, shapes, factor_out=factor_out)


@register_backbone(name="realnvp-vector")
def realnvp_vector(
    input_shape: tuple[int, ...],
    num_couplings: int = 8,
    hidden_features: int = 64,
    num_layers: int = 2,
    actnorm: bool = True,
) -> MultiscaleFlow:
    """Affine coupling flow for vectors ``(D,)`` with alternating halves and MLP conditioners."""
    if len(input_shape) != 1 or input_shape[0] < 2:
        raise ValueError(
            f"realnvp-vector expects vector inputs (D,) with D >= 2, got {input_shape}"
        )
    d = input_shape[0]
    factory = partial(MLP, hidden_features=hidden_features, num_layers=num_layers)
    layers: list = []
    for i in range(num_couplings):
        layers.append(AffineCoupling(d, "channel", i % 2, factory, spatial=False))
        if actnorm:
            layers.append(ActNorm(d))
    return MultiscaleFlow(
        [InvertibleSequential(layers)], input_shape, [input_shape], factor_out=False
    )
