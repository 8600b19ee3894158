"""MADE masks, MAF/IAF layers, permutations and the autoregressive backbones."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn
from torch.autograd.functional import jacobian

import hybridflow.models.autoregressive  # noqa: F401  (registers "maf" and "iaf")
from hybridflow.data import sample_toy
from hybridflow.models import create_backbone
from hybridflow.nets.made import MADE, MaskedLinear
from hybridflow.transforms.autoregressive import (
    InverseAutoregressiveFlow,
    MaskedAutoregressiveFlow,
    Permutation,
    autoregressive_stack,
)
from hybridflow.transforms.base import standard_normal_log_prob

D = 5


pytestmark = pytest.mark.usefixtures("one_thread")


ORDERS = ["natural", "reversed", "random", [2, 0, 3, 1, 4]]


def _randomize(module: nn.Module, std: float = 0.5) -> None:
    """Random weights everywhere, so zero-initialised outputs cannot hide a dependency."""
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)


def _made_jacobians(made: MADE, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Per-example Jacobians ``[N, D, P, D]`` w.r.t. ``x`` and ``[N, D, P, C]`` w.r.t. context."""
    n = x.shape[0]
    idx = torch.arange(n)
    jx = jacobian(lambda v: made(v, context), x)[idx, :, :, idx]
    if context is None:
        return jx, None
    jc = jacobian(lambda c: made(x, c), context)[idx, :, :, idx]
    return jx, jc


# --------------------------------------------------------------------------- MADE
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("context_features", [0, 3])
@pytest.mark.parametrize("hidden", [(), (3,), (8,), (5, 7), (16, 16, 4)])
def test_made_is_autoregressive(order, context_features, hidden):
    made = MADE(D, 3, hidden, order=order, context_features=context_features, seed=4)
    _randomize(made)
    x = torch.randn(6, D)
    ctx = torch.randn(6, context_features) if context_features else None
    jx, _ = _made_jacobians(made, x, ctx)
    pos = made.order
    forbidden = pos[None, :] >= pos[:, None]  # [i, j]: order[j] >= order[i]
    assert jx.abs().amax(dim=(0, 2))[forbidden].max() == 0
    if isinstance(order, list):
        assert made.order.tolist() == order


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("context_features", [0, 2])
def test_made_keeps_every_allowed_dependency(order, context_features):
    made = MADE(
        D, 2, (D, D + 3), order=order, context_features=context_features, activation=nn.Tanh
    )
    _randomize(made)
    x = torch.randn(8, D)
    ctx = torch.randn(8, context_features) if context_features else None
    jx, jc = _made_jacobians(made, x, ctx)
    pos = made.order
    allowed = pos[None, :] < pos[:, None]
    strength = jx.abs().amax(dim=(0, 2))  # [D, D]
    assert (strength[allowed] > 1e-8).all()
    assert (strength[~allowed] == 0).all()
    if context_features:
        # Every output, including the first in the order, sees the context.
        assert (jc.abs().amax(dim=(0, 3)) > 1e-8).all()


def test_made_orders_and_output_shape():
    assert MADE(4, 1, order="natural").order.tolist() == [0, 1, 2, 3]
    assert MADE(4, 1, order="reversed").order.tolist() == [3, 2, 1, 0]
    a = MADE(6, 1, order="random", seed=3).order
    b = MADE(6, 1, order="random", seed=3).order
    assert torch.equal(a, b) and sorted(a.tolist()) == list(range(6))
    assert not torch.equal(a, MADE(6, 1, order="random", seed=4).order)
    made = MADE(4, 7, (10,))
    out = made(torch.randn(3, 4))
    assert out.shape == (3, 4, 7)
    assert out.abs().max() == 0  # zero-initialised output layer
    assert isinstance(made.output, MaskedLinear)


def test_made_random_degrees_still_autoregressive():
    made = MADE(D, 2, (9, 9), order="random", random_degrees=True, seed=7)
    _randomize(made)
    jx, _ = _made_jacobians(made, torch.randn(4, D), None)
    pos = made.order
    assert jx.abs().amax(dim=(0, 2))[pos[None, :] >= pos[:, None]].max() == 0


def test_made_errors():
    with pytest.raises(ValueError, match="permutation"):
        MADE(3, 2, order=[0, 0, 1])
    with pytest.raises(ValueError, match="3 positions"):
        MADE(3, 2, order=[0, 1])
    with pytest.raises(ValueError, match="permutation"):
        MADE(3, 2, order=[1, 2, 3])
    with pytest.raises(ValueError, match="order"):
        MADE(3, 2, order="sideways")
    with pytest.raises(ValueError, match="mask must have shape"):
        MaskedLinear(3, 2, torch.ones(3, 2))
    made = MADE(3, 2, context_features=2)
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        made(torch.randn(4, 5), torch.randn(4, 2))
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        made(torch.randn(4, 3, 1), torch.randn(4, 2))
    with pytest.raises(ValueError, match="context"):
        made(torch.randn(4, 3))
    with pytest.raises(ValueError, match="context"):
        made(torch.randn(4, 3), torch.randn(4, 3))


def test_made_single_dimension():
    made = MADE(1, 2, (4, 4), context_features=2)
    _randomize(made)
    x, ctx = torch.randn(5, 1), torch.randn(5, 2)
    out = made(x, ctx)
    assert out.shape == (5, 1, 2)
    # Depends on the context only, not on x.
    assert torch.equal(out, made(torch.randn(5, 1), ctx))
    assert not torch.allclose(out, made(x, torch.randn(5, 2)))


# --------------------------------------------------------------------------- MAF / IAF
FLOWS = [MaskedAutoregressiveFlow, InverseAutoregressiveFlow]


def _check_flow(flow, x: Tensor, context: Tensor | None) -> None:
    z, logdet = flow(x, context)
    assert z.shape == x.shape and logdet.shape == (x.shape[0],)
    assert (flow.inverse(z, context) - x).abs().max() <= 1e-10
    assert (flow(flow.inverse(x, context), context)[0] - x).abs().max() <= 1e-10
    for n in range(x.shape[0]):
        c = None if context is None else context[n : n + 1]
        jac = jacobian(lambda v, c=c: flow(v, c)[0], x[n : n + 1])[0, :, 0, :]
        sign, logabs = torch.linalg.slogdet(jac)
        assert sign != 0
        assert torch.allclose(logdet[n], logabs, atol=1e-10, rtol=0)


@pytest.mark.parametrize("cls", FLOWS)
@pytest.mark.parametrize("order", ["natural", "random", [3, 1, 0, 2]])
@pytest.mark.parametrize("context_features", [0, 2])
def test_flow_round_trip_and_logdet(cls, order, context_features):
    flow = cls(4, (8, 8), order=order, context_features=context_features, seed=2)
    _randomize(flow, std=0.4)
    x = torch.randn(5, 4)
    ctx = torch.randn(5, context_features) if context_features else None
    _, logdet = flow(x, ctx)
    assert logdet.abs().min() > 1e-3  # randomised: not the identity
    _check_flow(flow, x, ctx)


@pytest.mark.parametrize("cls", FLOWS)
@pytest.mark.parametrize("affine", ["tanh", "softplus"])
def test_flow_starts_at_identity_and_ignores_unused_context(cls, affine):
    flow = cls(3, identity_init=True, affine=affine)
    x = torch.randn(4, 3)
    z, logdet = flow(x, torch.randn(4, 9))  # unconditional: context is ignored
    assert torch.allclose(z, x, atol=1e-6) and torch.allclose(logdet, torch.zeros(4), atol=1e-6)
    z, logdet = cls(3)(x)  # the default: PyTorch's initialisation of the MADE output layer
    assert not torch.equal(z, x) and logdet.abs().min() > 0


@pytest.mark.parametrize("cls", FLOWS)
def test_flow_log_scale_is_bounded(cls):
    flow = cls(3, (8,), affine="tanh")
    with torch.no_grad():
        flow.made.output.bias.fill_(1e4)  # huge raw log-scales
    z, logdet = flow(torch.randn(4, 3))
    assert torch.isfinite(z).all()
    assert torch.allclose(logdet, torch.full((4,), -3.0))  # -Σ scale·tanh(∞), scale = 1


@pytest.mark.parametrize("cls", FLOWS)
def test_flow_single_dimension(cls):
    flow = cls(1, (4,), context_features=2)
    _randomize(flow)
    _check_flow(flow, torch.randn(3, 1), torch.randn(3, 2))


@pytest.mark.parametrize("cls", FLOWS)
def test_flow_errors(cls):
    flow = cls(3, context_features=2)
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        flow(torch.randn(4, 2), torch.randn(4, 2))
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        flow.inverse(torch.randn(4, 3, 2), torch.randn(4, 2))
    with pytest.raises(ValueError, match="context"):
        flow(torch.randn(4, 3))
    with pytest.raises(ValueError, match="permutation"):
        cls(3, order=[0, 1, 1])


@pytest.mark.parametrize("flow", ["maf", "iaf"])
@pytest.mark.parametrize("permutation", ["reversed", "random", "none"])
def test_stack_round_trip_and_logdet(flow, permutation):
    stack = autoregressive_stack(3, 3, flow=flow, permutation=permutation, hidden_features=(6,))
    n_perm = sum(isinstance(m, Permutation) for m in stack)
    assert n_perm == (0 if permutation == "none" else 2) and len(stack) == 3 + n_perm
    _randomize(stack, std=0.4)
    _check_flow(stack, torch.randn(4, 3), None)


def test_stack_errors():
    with pytest.raises(ValueError, match="flow"):
        autoregressive_stack(3, 2, flow="naf")
    with pytest.raises(ValueError, match="permutation"):
        autoregressive_stack(3, 2, permutation="shuffle")
    with pytest.raises(ValueError, match="num_flows"):
        autoregressive_stack(3, 0)


# --------------------------------------------------------------------------- Permutation
def test_permutation_round_trip():
    perm = Permutation([2, 0, 1])
    x = torch.randn(4, 3)
    z, logdet = perm(x)
    assert torch.equal(z, x[:, [2, 0, 1]]) and torch.equal(logdet, torch.zeros(4))
    assert torch.equal(perm.inverse(z), x)
    img = torch.randn(2, 3, 4, 4)  # permutes dimension 1 of any-rank inputs
    assert torch.equal(perm.inverse(perm(img)[0]), img)
    assert Permutation.reversed(4).permutation.tolist() == [3, 2, 1, 0]
    r = Permutation.random(7, seed=5).permutation
    assert torch.equal(r, Permutation.random(7, seed=5).permutation)
    assert sorted(r.tolist()) == list(range(7))
    assert not torch.equal(r, Permutation.random(7, seed=6).permutation)


def test_reversal_fast_path_matches_the_gather_and_follows_loaded_state():
    # A reversal is applied as a flip: the same values and gradients as the gather it replaces.
    for perm in (Permutation.reversed(6), Permutation.random(6, seed=1)):
        x = torch.randn(3, 6, 2, requires_grad=True)
        z, _ = perm(x)
        assert torch.equal(z, x[:, perm.permutation]) and torch.equal(perm.inverse(z), x)
        (z * torch.arange(6.0).view(1, 6, 1)).sum().backward()
        assert torch.equal(x.grad[0, :, 0], perm.inverse_permutation.float())
    # Loading another permutation's buffers switches the path with them.
    loaded = Permutation.random(6, seed=1)
    loaded.load_state_dict(Permutation.reversed(6).state_dict())
    x = torch.randn(2, 6)
    assert torch.equal(loaded(x)[0], x.flip(1))
    back = Permutation.reversed(6)
    back.load_state_dict(Permutation.random(6, seed=1).state_dict())
    assert torch.equal(back(x)[0], x[:, Permutation.random(6, seed=1).permutation])


def test_permutation_errors():
    for bad in ([0, 0, 1], [1, 2, 3], [], [[0, 1]], [0.0, 1.0]):
        with pytest.raises(ValueError):
            Permutation(bad)
    perm = Permutation([1, 0])
    with pytest.raises(ValueError, match=r"\[N, 2"):
        perm(torch.randn(3, 3))
    with pytest.raises(ValueError, match=r"\[N, 2"):
        perm.inverse(torch.randn(3))


# --------------------------------------------------------------------------- backbones
@pytest.mark.parametrize("name", ["maf", "iaf"])
@pytest.mark.parametrize("kwargs", [{}, {"permutation": "random", "actnorm": True}])
def test_backbones_build(name, kwargs):
    flow = create_backbone(name, (3,), num_flows=3, hidden_features=(16, 16), **kwargs)
    x = torch.randn(10, 3)
    z, logdet = flow(x)
    log_prob = standard_normal_log_prob(z) + logdet
    assert log_prob.shape == (10,) and torch.isfinite(log_prob).all()
    assert torch.allclose(flow.inverse(z), x, atol=1e-10)
    single = create_backbone(name, (1,), num_flows=2)
    assert torch.isfinite(single(torch.randn(4, 1))[1]).all()
    with pytest.raises(ValueError, match="vector"):
        create_backbone(name, (1, 4, 4))


def test_maf_learns_toy_density():
    torch.manual_seed(0)
    x = sample_toy("8gaussians", 256, torch.Generator().manual_seed(0))[0]
    x = x.to(torch.get_default_dtype())
    flow = create_backbone("maf", (2,), num_flows=3, hidden_features=(24, 24))

    def mean_log_prob() -> Tensor:
        z, logdet = flow(x)
        return (standard_normal_log_prob(z) + logdet).mean()

    with torch.no_grad():
        before = mean_log_prob().item()
    opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        loss = -mean_log_prob()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = mean_log_prob().item()
    assert after > before + 0.7, (before, after)


@pytest.mark.parametrize("params, context_features", [(2, 0), (3, 5)])
def test_made_split_output_is_the_interleaved_output_per_parameter(params, context_features):
    torch.manual_seed(0)
    made = MADE(6, params, (16, 16), context_features=context_features, zero_init_output=False)
    made = made.double()
    x = torch.randn(4, 6, dtype=torch.float64)
    context = torch.randn(4, context_features, dtype=torch.float64) if context_features else None
    whole = made(x, context)
    parts = made.forward_split(x, context)
    assert len(parts) == params and all(p.is_contiguous() for p in parts)
    for p, part in enumerate(parts):
        torch.testing.assert_close(part, whole[..., p], rtol=1e-12, atol=1e-12)


def test_softplus_affine_is_nflows_scale_and_shift():
    """``affine="softplus"``: ``z = s·x + t`` with ``s = softplus(raw) + 1e-3`` and ``(t, raw)``
    the MADE's two outputs per dimension (nflows' form), log-det ``Σ log s``; unknown forms are
    refused."""
    torch.manual_seed(0)
    flow = MaskedAutoregressiveFlow(4, (8, 8), affine="softplus").double()
    x = torch.randn(6, 4, dtype=torch.float64)
    out = flow.made(x)
    s = nn.functional.softplus(out[..., 1]) + 1e-3
    z, logdet = flow(x)
    assert torch.allclose(z, s * x + out[..., 0], atol=1e-12)
    assert torch.allclose(logdet, s.log().sum(1), atol=1e-12)
    with pytest.raises(ValueError, match="affine must be one of softplus, tanh"):
        MaskedAutoregressiveFlow(4, affine="exp")
    with pytest.raises(ValueError, match="affine"):
        create_backbone("maf", (4,), affine="sigmoid")


@pytest.mark.parametrize("cls", FLOWS)
def test_softplus_scale_never_falls_below_its_floor(cls):
    flow = cls(3, (8,), affine="softplus")
    with torch.no_grad():
        flow.made.output.bias.fill_(-1e4)  # raw scales far below zero: s = 1e-3
    z, logdet = flow(torch.randn(4, 3))
    assert torch.isfinite(z).all()
    assert torch.allclose(logdet, torch.full((4,), 3 * math.log(1e-3)), rtol=1e-5)


def test_default_affine_forms():
    assert MaskedAutoregressiveFlow(3).affine == "softplus"
    assert InverseAutoregressiveFlow(3).affine == "tanh"
    for name, form in (("maf", "softplus"), ("iaf", "tanh")):
        layers = [m for m in create_backbone(name, (3,)).modules() if hasattr(m, "affine")]
        assert layers and {m.affine for m in layers} == {form}


def test_checkpoint_of_the_other_affine_form_is_refused():
    """The forms share the MADE's keys: loading one as the other must fail loudly, not give
    wrong densities; the softplus form has no parameter without a gradient."""
    softplus, tanh = MaskedAutoregressiveFlow(3), MaskedAutoregressiveFlow(3, affine="tanh")
    assert "scale" not in dict(softplus.named_parameters())
    softplus(torch.randn(4, 3))[1].sum().backward()
    assert all(p.grad is not None for p in softplus.parameters())
    with pytest.raises(ValueError, match="'tanh'-form affine layer, this one is 'softplus'"):
        softplus.load_state_dict(tanh.state_dict())
    with pytest.raises(ValueError, match="'softplus'-form affine layer, this one is 'tanh'"):
        tanh.load_state_dict(softplus.state_dict())
    MaskedAutoregressiveFlow(3).load_state_dict(softplus.state_dict())
    stack = create_backbone("maf", (3,), affine="tanh")
    with pytest.raises(ValueError, match="build it with affine='tanh'"):
        create_backbone("maf", (3,)).load_state_dict(stack.state_dict())
