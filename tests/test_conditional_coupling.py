"""Conditional couplings (``context_channels > 0``): with the context held fixed each layer is an
invertible map of x whose log-det equals ``slogdet`` of the autograd Jacobian; the context changes
the map; a missing or misshapen context is a clear error."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from hybridflow.nets import MLP, ConvResNet
from hybridflow.transforms import AffineCoupling, MixLogisticCoupling


def _conv(i: int, o: int) -> ConvResNet:
    return ConvResNet(i, o, hidden_channels=8, num_blocks=1)


def _mlp(i: int, o: int) -> MLP:
    return MLP(i, o, hidden_features=16, num_layers=2)


def _mixlogistic_checkerboard(layout: str) -> MixLogisticCoupling:
    return MixLogisticCoupling(
        1,
        2,
        "checkerboard",
        1,
        _conv,
        context_channels=1,
        inverse_tol=1e-12,
        inverse_max_iter=200,
        checkerboard_layout=layout,
    )


# Checkerboards: gathered (the default) needs even widths; masked runs on odd ones too.
LAYERS: dict[str, tuple[Callable, tuple[int, ...], tuple[int, ...]]] = {
    "affine-checkerboard": (
        lambda: AffineCoupling(2, "checkerboard", 1, _conv, context_channels=3),
        (2, 3, 4),
        (3, 3, 4),
    ),
    "affine-checkerboard-masked": (
        lambda: AffineCoupling(
            2, "checkerboard", 1, _conv, context_channels=3, checkerboard_layout="masked"
        ),
        (2, 3, 3),
        (3, 3, 3),
    ),
    "affine-vector": (
        lambda: AffineCoupling(4, "channel", 0, _mlp, spatial=False, context_channels=2),
        (4,),
        (2,),
    ),
    "mixlogistic-channel": (
        lambda: MixLogisticCoupling(
            4, 3, "channel", 1, _conv, context_channels=2, inverse_tol=1e-12, inverse_max_iter=200
        ),
        (4, 2, 2),
        (2, 2, 2),
    ),
    "mixlogistic-checkerboard": (
        lambda: _mixlogistic_checkerboard("gathered"),
        (1, 3, 4),
        (1, 3, 4),
    ),
    "mixlogistic-checkerboard-masked": (
        lambda: _mixlogistic_checkerboard("masked"),
        (1, 3, 3),
        (1, 3, 3),
    ),
}


def _build(name: str) -> tuple[torch.nn.Module, tuple[int, ...], tuple[int, ...]]:
    torch.manual_seed(0)
    make, x_shape, c_shape = LAYERS[name]
    layer = make().double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return layer.eval(), x_shape, c_shape


@pytest.mark.parametrize("name", list(LAYERS))
def test_fixed_context_gives_an_exact_invertible_map(name: str) -> None:
    layer, x_shape, c_shape = _build(name)
    x = torch.randn(3, *x_shape, dtype=torch.float64)
    context = torch.randn(3, *c_shape, dtype=torch.float64)
    z, logdet = layer(x, context)
    assert torch.allclose(layer.inverse(z, context), x, atol=1e-8)
    for i in range(3):

        def flat(inp: torch.Tensor, i: int = i) -> torch.Tensor:
            return layer(inp.view(1, *x_shape), context[i : i + 1])[0].flatten()

        jac = torch.autograd.functional.jacobian(flat, x[i].flatten())
        assert torch.allclose(torch.linalg.slogdet(jac)[1], logdet[i], atol=1e-8)


@pytest.mark.parametrize("name", list(LAYERS))
def test_context_changes_the_map(name: str) -> None:
    layer, x_shape, c_shape = _build(name)
    x = torch.randn(2, *x_shape, dtype=torch.float64)
    context = torch.randn(2, *c_shape, dtype=torch.float64)
    z1, _ = layer(x, context)
    z2, _ = layer(x, context + 1.0)
    assert not torch.allclose(z1, z2)


@pytest.mark.parametrize("name", list(LAYERS))
def test_missing_or_misshapen_context_is_an_error(name: str) -> None:
    layer, x_shape, c_shape = _build(name)
    x = torch.randn(2, *x_shape, dtype=torch.float64)
    with pytest.raises(ValueError, match="needs a context"):
        layer(x)
    wrong = torch.randn(2, c_shape[0] + 1, *c_shape[1:], dtype=torch.float64)
    with pytest.raises(ValueError, match="needs a context"):
        layer(x, wrong)
    with pytest.raises(ValueError, match="needs a context"):
        layer.inverse(x, None)
