"""Gathered and masked checkerboard couplings: the split itself, and one map on the same weights.

A gathered coupling's conditioner convolves the kept sites packed into ``H × W/2``; a masked one
convolves the full board. With a conditioner that gathers its input and scatters its output
(:class:`_GatheringNet`), the masked layer computes exactly the gathered layer's map, so the two
layouts' outputs, log-determinants and inverses must agree on the same weights.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from hybridflow import transforms as T
from hybridflow.models import create_backbone
from hybridflow.transforms.coupling import checkerboard_merge, checkerboard_split


@pytest.mark.parametrize("parity", [0, 1])
@pytest.mark.parametrize("height", [3, 4])
def test_split_gathers_the_kept_sites_row_by_row(parity: int, height: int) -> None:
    x = torch.arange(2 * height * 6, dtype=torch.float64).view(1, 2, height, 6)
    kept, moved = checkerboard_split(x, parity)
    mask = T.checkerboard_mask(height, 6, parity, dtype=torch.bool)[0, 0]
    assert kept.shape == moved.shape == (1, 2, height, 3)
    for c in range(2):
        assert torch.equal(kept[0, c].flatten(), x[0, c][mask])
        assert torch.equal(moved[0, c].flatten(), x[0, c][~mask])
    assert torch.equal(checkerboard_merge(kept, moved, parity), x)


def test_split_refuses_odd_widths() -> None:
    with pytest.raises(ValueError, match="even width"):
        checkerboard_split(torch.zeros(1, 1, 4, 5), 0)
    layer = T.AffineCoupling(1, "checkerboard", 0, checkerboard_layout="gathered")
    with pytest.raises(ValueError, match="checkerboard_layout='masked'"):
        layer(torch.zeros(1, 1, 4, 5))


def test_unknown_layout_is_refused() -> None:
    with pytest.raises(ValueError, match="checkerboard_layout must be one of"):
        T.AffineCoupling(2, "checkerboard", 0, checkerboard_layout="strided")


class _GatheringNet(nn.Module):
    """A masked layer's conditioner that runs a gathered layer's ``net`` on the same sites.

    Input ``[x·m, m, context]`` on the full board: it gathers the kept sites of ``x`` and both
    halves of the context, runs ``net``, and scatters the output onto the moved sites.
    """

    def __init__(self, net: nn.Module, channels: int, parity: int) -> None:
        super().__init__()
        self.net, self.channels, self.parity = net, channels, parity

    def forward(self, inp: Tensor) -> Tensor:
        x, context = inp[:, : self.channels], inp[:, self.channels + 1 :]
        parts = [checkerboard_split(x, self.parity)[0]]
        if context.shape[1]:
            parts += checkerboard_split(context, self.parity)
        out = self.net(torch.cat(parts, dim=1))
        return checkerboard_merge(torch.zeros_like(out), out, self.parity)


def _conv(c_in: int, c_out: int) -> nn.Module:
    torch.manual_seed(3)
    net = nn.Sequential(
        nn.Conv2d(c_in, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, c_out, 3, padding=1)
    )
    nn.init.normal_(net[2].weight, std=0.3)  # not the identity start, so the test can fail
    return net.double()


LAYERS = {
    "affine": lambda **kw: T.AffineCoupling(3, "checkerboard", net_factory=_conv, **kw),
    "additive": lambda **kw: T.AffineCoupling(
        3, "checkerboard", net_factory=_conv, additive=True, **kw
    ),
    "mixlogistic": lambda **kw: T.MixLogisticCoupling(
        3, 3, "checkerboard", net_factory=_conv, inverse_tol=1e-12, inverse_max_iter=200, **kw
    ),
    "naf": lambda **kw: T.NAFCoupling(
        3, 4, "checkerboard", net_factory=_conv, inverse_tol=1e-12, inverse_max_iter=200, **kw
    ),
}


@pytest.mark.parametrize("context_channels", [0, 2])
@pytest.mark.parametrize("parity", [0, 1])
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_gathered_equals_masked_on_the_same_weights(
    kind: str, parity: int, context_channels: int
) -> None:
    kw = dict(parity=parity, context_channels=context_channels)
    gathered = LAYERS[kind](checkerboard_layout="gathered", **kw).double()
    masked = LAYERS[kind](checkerboard_layout="masked", **kw).double()
    masked.load_state_dict(
        {k: v for k, v in gathered.state_dict().items() if not k.startswith("net.")}, strict=False
    )
    masked.net = _GatheringNet(gathered.net, 3, parity)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 6, dtype=torch.float64, generator=generator)
    context = torch.randn(4, context_channels, 5, 6, dtype=torch.float64, generator=generator)
    context = context if context_channels else None
    z_g, ld_g = gathered(x, context)
    z_m, ld_m = masked(x, context)
    assert not torch.allclose(z_g, x)  # the map is not the identity
    torch.testing.assert_close(z_g, z_m, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ld_g, ld_m, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gathered.inverse(z_g, context), masked.inverse(z_g, context))


def test_gathered_conditioner_sees_half_the_positions() -> None:
    seen = []

    def factory(c_in: int, c_out: int) -> nn.Module:
        net = nn.Conv2d(c_in, c_out, 3, padding=1)
        net.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
        return net

    x = torch.randn(2, 3, 4, 8)
    T.AffineCoupling(3, "checkerboard", 0, factory, checkerboard_layout="gathered")(x)
    T.AffineCoupling(3, "checkerboard", 0, factory, checkerboard_layout="masked")(x)
    assert seen == [(2, 3, 4, 4), (2, 4, 4, 8)]


@pytest.mark.parametrize(
    "backbone, shape",
    [("realnvp", (1, 8, 8)), ("flowpp-cpu", (1, 8, 8))],
)
def test_backbones_take_either_layout(backbone: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, *shape, dtype=torch.float64)
    for layout in ("gathered", "masked"):
        flow = create_backbone(backbone, shape, checkerboard_layout=layout).double().eval()
        z, logdet = flow(x)
        assert torch.isfinite(logdet).all()
        torch.testing.assert_close(flow.inverse(z), x, rtol=1e-6, atol=1e-6)


def test_backbones_refuse_gathered_odd_widths() -> None:
    with pytest.raises(ValueError, match="even width at every scale"):
        create_backbone("realnvp", (1, 28, 28), num_scales=3, checkerboard_layout="gathered")
    with pytest.raises(ValueError, match="divisible by 4"):
        create_backbone("flowpp-cpu", (1, 6, 6), checkerboard_layout="gathered")
    with pytest.raises(ValueError, match="even width"):
        T.VariationalDequantization(4, (1, 4, 5), checkerboard_layout="gathered")


@pytest.mark.parametrize(
    "build",
    [
        lambda: T.AffineCoupling(2, "checkerboard", 0),
        lambda: T.MixLogisticCoupling(2, 3, "checkerboard", 0),
        lambda: T.NAFCoupling(2, 4, "checkerboard", 0),
        lambda: T.VariationalDequantization(4, (1, 4, 4), num_couplings=1, context_channels=2),
        lambda: create_backbone("realnvp", (1, 8, 8)),
        lambda: create_backbone("flowpp-cpu", (1, 8, 8)),
    ],
    ids=["affine", "mixlogistic", "naf", "variational-dequantization", "realnvp", "flowpp"],
)
def test_checkerboards_are_gathered_by_default(build) -> None:
    """Issue 25: the gathered layout is every checkerboard's default (the masked one is opt-in)."""
    checkerboards = [
        m
        for m in build().modules()
        if isinstance(getattr(m, "mask", None), str) and m.mask == "checkerboard"
    ]
    assert checkerboards and {m.checkerboard_layout for m in checkerboards} == {"gathered"}
