"""Residual blocks: log-det estimators (exact, truncated, Russian roulette), the Neumann gradient
estimator, the memory-efficient gradient mode and the fixed-point inverse (Chen et al. 2019)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from test_conformance import directional_derivatives
from torch import Tensor, nn

from hybridflow.nets import LipschitzMLP
from hybridflow.transforms import InverseNotConvergedError, ResidualBlock
from hybridflow.transforms.residual import _Draw

D = 4


def _contractive_net(lipschitz: float = 0.9, d: int = D, hidden: int = 8) -> nn.Module:
    """``Linear → ELU → Linear`` scaled so that Lip(g) ≤ ``lipschitz`` (ELU is 1-Lipschitz)."""
    first, second = nn.Linear(d, hidden), nn.Linear(hidden, d)
    with torch.no_grad():
        for layer in (first, second):
            layer.weight.mul_(math.sqrt(lipschitz) / torch.linalg.matrix_norm(layer.weight, 2))
    return nn.Sequential(first, nn.ELU(), second)


def _stiff_net(d: int = D) -> nn.Module:
    """``g(x) = -0.9 · Q ELU(Qᵀx + 3)``: Jacobian ≈ -0.9·I near 0, where truncation hurts most."""
    q = torch.linalg.qr(torch.randn(d, d))[0]
    first, second = nn.Linear(d, d), nn.Linear(d, d)
    with torch.no_grad():
        first.weight.copy_(q.T)
        first.bias.fill_(3.0)
        second.weight.copy_(-0.9 * q)
        second.bias.zero_()
    return nn.Sequential(first, nn.ELU(), second)


def _exact_logdet(net: nn.Module, x: Tensor) -> Tensor:
    return ResidualBlock(net, logdet="exact")(x)[1]


def _projected_grad(net: nn.Module, direction: list[Tensor]) -> float:
    """``<∇θ, direction>``; parameters the loss does not reach (the last bias) count as 0."""
    return sum(
        float((p.grad * u).sum())
        for p, u in zip(net.parameters(), direction, strict=True)
        if p.grad is not None
    )


def _exact_grad(net: nn.Module, x: Tensor, direction: list[Tensor]) -> float:
    net.zero_grad()
    _exact_logdet(net, x).sum().backward()
    value = _projected_grad(net, direction)
    net.zero_grad()
    return value


def _estimates(block: ResidualBlock, x: Tensor, draws: int, batch: int = 25, d: int = D) -> Tensor:
    """Per-call means over ``batch`` copies of ``x`` (one roulette draw per call): i.i.d."""
    with torch.no_grad():
        return torch.stack([block(x.expand(batch, d))[1].mean() for _ in range(draws)])


def _within_three_se(samples: Tensor, exact: float) -> tuple[bool, float]:
    mean, se = float(samples.mean()), float(samples.std() / math.sqrt(len(samples)))
    return abs(mean - exact) <= 3 * se, (mean - exact) / se


@pytest.mark.parametrize("distribution", ["poisson", "geometric"])
@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
def test_russian_roulette_is_unbiased(distribution: str, probe: str) -> None:
    net = _contractive_net(0.9)
    x = torch.randn(1, D)
    exact = float(_exact_logdet(net, x).detach())
    block = ResidualBlock(
        net, "roulette", n_terms=1, distribution=distribution, probe=probe, geometric_p=0.3
    )
    ok, z = _within_three_se(_estimates(block, x, draws=1500), exact)
    assert ok, f"roulette mean is {z:.2f} standard errors from the exact log-det"


def test_eval_mode_roulette_is_unbiased() -> None:
    net = _contractive_net(0.9)
    x = torch.randn(1, D)
    exact = float(_exact_logdet(net, x).detach())
    block = ResidualBlock(net, "roulette", n_terms=1, eval_n_terms=4).eval()
    ok, z = _within_three_se(_estimates(block, x, draws=600), exact)
    assert ok, f"eval-mode roulette mean is {z:.2f} standard errors off"


def test_truncated_series_bias_is_visible() -> None:
    net = _stiff_net()
    x = torch.randn(1, D)
    exact = float(_exact_logdet(net, x).detach())
    block = ResidualBlock(net, "series", n_terms=2)
    samples = _estimates(block, x, draws=400)
    ok, z = _within_three_se(samples, exact)
    assert not ok and abs(z) > 6, f"expected a visible truncation bias, got {z:.2f} SE"
    # With many terms the truncation bias vanishes below the noise.
    long = ResidualBlock(net, "series", n_terms=60)
    ok, z = _within_three_se(_estimates(long, x, draws=300), exact)
    assert ok, f"60-term series is {z:.2f} SE off"


@pytest.mark.parametrize("grad", ["neumann", "backprop"])
def test_gradient_estimators_are_unbiased(grad: str) -> None:
    net = _contractive_net(0.9)
    x = torch.randn(1, D)
    direction = [torch.randn_like(p) for p in net.parameters()]
    exact = _exact_grad(net, x, direction)
    block = ResidualBlock(net, "roulette", n_terms=1, grad=grad, memory_efficient=False)
    samples = []
    for _ in range(1500):
        net.zero_grad()
        block(x.expand(25, D))[1].mean().backward()
        samples.append(_projected_grad(net, direction))
    ok, z = _within_three_se(torch.tensor(samples), exact)
    assert ok, f"{grad} gradient is {z:.2f} standard errors from the exact gradient"


def test_neumann_input_gradient_is_unbiased() -> None:
    net = _contractive_net(0.9)
    x = torch.randn(1, D)
    xr = x.clone().requires_grad_(True)
    _exact_logdet(net, xr).sum().backward()
    exact = float(xr.grad[0, 0])
    block = ResidualBlock(net, "roulette", n_terms=1, grad="neumann")
    samples = []
    for _ in range(1500):
        xs = x.expand(25, D).clone().requires_grad_(True)
        block(xs)[1].mean().backward()
        samples.append(float(xs.grad[:, 0].sum()))
    ok, z = _within_three_se(torch.tensor(samples), exact)
    assert ok, f"Neumann input gradient is {z:.2f} SE off"


@pytest.mark.parametrize("weights", [[1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.7, 4.2]])
def test_neumann_gradient_is_that_of_the_value_with_exact_traces(weights: list[float]) -> None:
    """With exact traces (every basis vector a probe) the Neumann gradient of a draw equals the
    backprop gradient of the same draw's value: the left vector runs to ``vᵀ J^(n-1)`` with the
    value's own term weights (see ``benchmarks/neumann_variance.py`` for the paper's indexing,
    one power more)."""
    torch.manual_seed(0)
    net = _contractive_net(0.9).double()
    x = torch.randn(3, D, dtype=torch.float64)
    basis = [torch.eye(D, dtype=torch.float64)[i].expand(3, D) for i in range(D)]
    draw = _Draw(weights, basis)
    block = ResidualBlock(net, "roulette", grad="neumann")

    def parameter_grads(surrogate_of) -> list[Tensor]:
        x_in = x.clone().requires_grad_(True)
        g_x = net(x_in)
        params = list(net.parameters())  # the last bias does not reach the Jacobian: zeros
        return torch.autograd.grad(
            surrogate_of(g_x, x_in).sum(), params, allow_unused=True, materialize_grads=True
        )

    neumann = parameter_grads(lambda g, xi: block._neumann(g, xi, draw)[1])
    backprop = parameter_grads(lambda g, xi: block._series(g, xi, draw, create_graph=True))
    for a, b in zip(neumann, backprop, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("grad", ["neumann", "backprop"])
@pytest.mark.parametrize("uniform", [True, False])
def test_memory_efficient_mode_matches_plain_autograd(grad: str, uniform: bool) -> None:
    """Same draw, same gradients: per-example upstream weights included (unlike the reference)."""
    net = _contractive_net(0.8)
    x = torch.randn(5, D)
    weights = torch.full((5,), 0.3) if uniform else torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0])
    out_weights = torch.randn(5, D)
    results = []
    for memory_efficient in (False, True):
        block = ResidualBlock(net, "roulette", grad=grad, memory_efficient=memory_efficient)
        torch.manual_seed(3)
        xs = x.clone().requires_grad_(True)
        z, logdet = block(xs)
        ((logdet * weights).sum() + (z * out_weights).sum()).backward()
        results.append([logdet.detach(), xs.grad, *[p.grad.clone() for p in net.parameters()]])
        net.zero_grad()
    for plain, efficient in zip(*results, strict=True):
        torch.testing.assert_close(efficient, plain)


def test_memory_efficient_handles_logdet_or_output_unused() -> None:
    net = _contractive_net(0.8)
    block = ResidualBlock(net, "roulette")
    x = torch.randn(3, D, requires_grad=True)
    block(x)[0].sum().backward()
    torch.testing.assert_close(x.grad, 1 + torch.autograd.functional.jacobian(net, x).sum((0, 1)))
    x.grad = None
    block(x)[1].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_no_grad_estimate_matches_graph_estimate() -> None:
    net = _contractive_net(0.8)
    block = ResidualBlock(net, "roulette")
    x = torch.randn(3, D)
    torch.manual_seed(7)
    with torch.no_grad():
        a = block(x)[1]
    torch.manual_seed(7)
    b = block(x.clone().requires_grad_(True))[1]
    torch.testing.assert_close(a, b.detach())


def test_roulette_parameters_are_buffers() -> None:
    block = ResidualBlock(_contractive_net(), "roulette")
    buffers = dict(block.named_buffers())
    assert {"poisson_rate", "geometric_p"} <= set(buffers)
    assert all("rate" not in n and "geometric" not in n for n, _ in block.named_parameters())
    assert block.tail_survival(0) == 1.0
    assert block.tail_survival(1) == pytest.approx(1 - math.exp(-2.0))


def test_inverse_converges_and_reports() -> None:
    block = ResidualBlock(_contractive_net(0.95), inverse_atol=1e-10, inverse_rtol=0)
    x = torch.randn(8, D)
    z, _ = block(x)
    x_rec = block.inverse(z)
    assert (x_rec - x).abs().max() < 1e-8
    stats = block.last_inverse
    assert stats.converged and stats.max_residual < 1e-9 and stats.iterations > 3


def test_inverse_gradients_are_implicit() -> None:
    """DEQ-style gradients (Bai et al. 2019): ``∂x/∂z = (I + J_g(x))⁻¹`` per example, and the
    parameter gradient matches finite differences; the value is the no-grad solution."""
    net = _contractive_net(0.9)
    block = ResidualBlock(net, inverse_atol=1e-12, inverse_rtol=0)
    z = torch.randn(3, D, requires_grad=True)
    x = block.inverse(z)
    with torch.no_grad():
        assert torch.equal(x.detach(), block.inverse(z))
    w = torch.randn(3, D)
    (grad_z,) = torch.autograd.grad((w * x).sum(), z)
    for i in range(3):
        jac = torch.autograd.functional.jacobian(net, x[i].detach())
        expected = torch.linalg.solve((torch.eye(D) + jac).T, w[i])
        torch.testing.assert_close(grad_z[i], expected, rtol=1e-9, atol=1e-10)
    auto, fd = directional_derivatives(lambda: (w * block.inverse(z)).sum(), [*net.parameters()])
    assert auto == pytest.approx(fd, rel=1e-6, abs=1e-8)


def test_inverse_with_gradients_keeps_state_and_mode() -> None:
    """The implicit gradient uses ``g`` with power iterations frozen, like the solve itself."""
    net = LipschitzMLP(D, 8, coeff=0.9)  # one power iteration per training forward
    block = ResidualBlock(net, inverse_atol=1e-10, inverse_rtol=0).train()
    buffers = {k: b.clone() for k, b in net.named_buffers()}
    z = torch.randn(4, D, requires_grad=True)
    block.inverse(z).square().sum().backward()
    assert net.training and z.grad is not None and torch.isfinite(z.grad).all()
    for name, value in net.named_buffers():
        assert torch.equal(value, buffers[name]), f"{name} changed"
    with torch.no_grad():  # sampling: no graph at all
        assert not block.inverse(z).requires_grad


def test_inverse_failure_warns_or_raises_with_residual() -> None:
    expanding = nn.Linear(D, D, bias=False)
    with torch.no_grad():
        expanding.weight.copy_(-1.5 * torch.eye(D))  # Lip(g) = 1.5: the iteration diverges
    z = torch.randn(2, D)
    block = ResidualBlock(expanding, inverse_max_iter=20, on_inverse_failure="raise")
    with pytest.raises(InverseNotConvergedError, match="residual"):
        block.inverse(z)
    block.on_inverse_failure = "warn"
    with pytest.warns(RuntimeWarning, match="did not converge"):
        block.inverse(z)
    assert not block.last_inverse.converged
    # The implicit gradient iterates with the same J_g: it cannot converge either, and says so.
    zr = z.clone().requires_grad_(True)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        x = block.inverse(zr)
    with pytest.warns(RuntimeWarning, match="implicit gradient"):
        x.sum().backward(retain_graph=True)
    block.on_inverse_failure = "raise"
    with pytest.raises(InverseNotConvergedError, match="implicit gradient"):
        torch.autograd.grad(x.sum(), zr)


def test_bad_options_raise() -> None:
    with pytest.raises(ValueError, match="logdet"):
        ResidualBlock(nn.Identity(), logdet="taylor")
    with pytest.raises(ValueError, match="grad"):
        ResidualBlock(nn.Identity(), grad="adjoint")
    with pytest.raises(ValueError, match="batched"):
        ResidualBlock(_contractive_net())(torch.randn(D))


def _linear_block(coeff: float, d: int = 6) -> tuple[ResidualBlock, Tensor]:
    """``g(x) = W x`` with ``W`` symmetric, eigenvalues in (0, coeff]: a known series."""
    q = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(3)))[0]
    eigenvalues = coeff * torch.linspace(0.4, 1.0, d)
    layer = nn.Linear(d, d, bias=False)
    with torch.no_grad():
        layer.weight.copy_(q @ torch.diag(eigenvalues) @ q.T)
    return ResidualBlock(layer, "series", probe="rademacher"), eigenvalues


@pytest.mark.parametrize("n_terms", [1, 2, 3])
def test_truncated_series_bias_has_the_sign_and_growth_theory_gives(n_terms: int) -> None:
    """With eigenvalues λ ∈ (0, 1) the series' terms alternate and shrink, so stopping after n
    terms leaves a remainder with the sign of term n + 1: the estimate is too high for odd n,
    too low for even n, and the gap grows with the Lipschitz coefficient c."""
    from hybridflow.models import logdet_settings

    biases = []
    for coeff in (0.5, 0.7, 0.9, 0.98):
        block, eigenvalues = _linear_block(coeff)
        exact = float(torch.log1p(eigenvalues).sum())
        truncated = sum((-1) ** (k + 1) * float((eigenvalues**k).sum()) / k
                        for k in range(1, n_terms + 1))  # fmt: skip
        x = torch.randn(1, 6)
        torch.manual_seed(0)
        with logdet_settings(block, n_terms=n_terms, eval_n_terms=n_terms):
            samples = _estimates(block, x.expand(1, 6), draws=300, batch=25, d=6)
        ok, z = _within_three_se(samples, truncated)  # the estimator's mean is the truncation
        assert ok, f"c={coeff}: {z:.2f} SE from the truncated series' value"
        biases.append(truncated - exact)
        assert (truncated - exact > 0) == (n_terms % 2 == 1)
    assert all(abs(a) < abs(b) for a, b in itertools.pairwise(biases)), biases


def test_logdet_settings_switch_and_restore() -> None:
    from hybridflow.models import logdet_settings

    block, eigenvalues = _linear_block(0.9)
    x = torch.randn(3, 6)
    with logdet_settings(block, logdet="exact", poisson_rate=5.0) as blocks:
        assert blocks == [block] and float(block.poisson_rate) == 5.0
        torch.testing.assert_close(block(x)[1], torch.log1p(eigenvalues).sum().expand(3))
    assert block.logdet_estimator == "series" and float(block.poisson_rate) == 2.0
    with (
        pytest.raises(ValueError, match="logdet must be one of"),
        logdet_settings(block, logdet="x"),
    ):
        pass
    with (
        pytest.raises(ValueError, match="unknown log-det settings"),
        logdet_settings(block, terms=3),
    ):
        pass
    with pytest.raises(ValueError, match="no residual"), logdet_settings(nn.Linear(2, 2)):
        pass
    for bad, message in (
        ({"n_terms": 2.5}, "n_terms must be an integer, got 2.5"),
        ({"n_probes": True}, "n_probes must be an integer"),
        ({"memory_efficient": "false"}, "memory_efficient must be True or False, got 'false'"),
    ):
        with pytest.raises(ValueError, match=message), logdet_settings(block, **bad):
            pass


def test_n_terms_alone_switches_a_block_in_eval_mode_too() -> None:
    # A block in eval mode reads eval_n_terms: a switch of n_terms alone must reach it.
    from hybridflow.models import logdet_settings

    block, _ = _linear_block(0.9)
    block.eval()
    before = (block.n_terms, block.eval_n_terms)
    with logdet_settings(block, n_terms=1):
        assert (block.n_terms, block.eval_n_terms) == (1, 1)
    with logdet_settings(block, n_terms=1, eval_n_terms=7):
        assert (block.n_terms, block.eval_n_terms) == (1, 7)
    assert (block.n_terms, block.eval_n_terms) == before
