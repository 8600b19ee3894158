"""Tests of the Flow++ mixture-of-logistics CDF coupling (Ho et al. 2019)."""

from __future__ import annotations

import math

import pytest
import torch
from test_conformance import directional_derivatives

from hybridflow.nets import MLP, ConvResNet
from hybridflow.transforms.mixlogistic import (
    MixLogisticCoupling,
    mixture_inverse_cdf,
    mixture_log_cdf,
    mixture_log_pdf,
)

D = torch.float64


def _randomize(layer: torch.nn.Module, std: float = 0.5) -> None:
    # Move far from the zero-initialised identity so the test exercises the mixture.
    torch.manual_seed(1)
    for p in layer.parameters():
        p.data.normal_(0, std)
    if isinstance(layer, MixLogisticCoupling):
        layer.scale.data.fill_(1.0)  # let |a| reach O(1) rather than shrink with std


def _layers():
    # Conv nets amplify random weights far more than MLPs (std 0.5 gives outputs ~1e2, i.e.
    # mixture scales ~e^100, which no float64 inverse can resolve), hence the per-case std.
    conv = lambda i, o: ConvResNet(i, o, hidden_channels=8, num_blocks=1)  # noqa: E731
    mlp = lambda i, o: MLP(i, o, hidden_features=16, num_layers=2)  # noqa: E731
    return [
        (MixLogisticCoupling(2, 3, "checkerboard", p, conv), (3, 2, 4, 4), 0.2) for p in (0, 1)
    ] + [(MixLogisticCoupling(4, 3, "channel", p, mlp, spatial=False), (3, 4), 0.5) for p in (0, 1)]


@pytest.mark.parametrize("case", range(4))
def test_coupling_inverse_and_logdet_float64(case: int) -> None:
    layer, shape, std = _layers()[case]
    layer = layer.to(D)
    _randomize(layer, std)
    torch.manual_seed(2)
    x = torch.randn(shape, dtype=D)
    z, logdet = layer(x)
    assert logdet.shape == (shape[0],)
    assert torch.isfinite(z).all() and torch.isfinite(logdet).all()
    assert not torch.allclose(z, x, atol=1e-2)  # far from identity
    torch.testing.assert_close(layer.inverse(z), x, atol=1e-5, rtol=0)

    x0 = x[:1]
    jac = torch.autograd.functional.jacobian(lambda v: layer(v)[0].flatten(), x0)
    jac = jac.reshape(x0.numel(), x0.numel())
    sign, logabs = torch.linalg.slogdet(jac)
    assert sign.item() == 1.0
    assert abs(logabs.item() - logdet[0].item()) < 1e-6


def test_coupling_identity_at_init() -> None:
    layer = MixLogisticCoupling(4, 2, "channel", 0, spatial=False).to(D)
    x = torch.randn(5, 4, dtype=D)
    z, logdet = layer(x)
    torch.testing.assert_close(z, x)
    torch.testing.assert_close(logdet, torch.zeros(5, dtype=D))


def test_coupling_float64_mixture_float32_io() -> None:
    layer = MixLogisticCoupling(4, 3, "channel", 1, spatial=False, float64_mixture=True)
    layer = layer.float()  # float32 weights whatever the default dtype is
    _randomize(layer, 0.3)
    x = torch.randn(6, 4, dtype=torch.float32)
    z, logdet = layer(x)
    assert z.dtype == torch.float32 and logdet.dtype == torch.float32
    torch.testing.assert_close(layer.inverse(z), x, atol=1e-4, rtol=0)


def _params(shape, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(*shape, k, generator=g, dtype=D),
        3 * torch.randn(*shape, k, generator=g, dtype=D),
        torch.randn(*shape, k, generator=g, dtype=D),
    )


def test_log_cdf_pdf_match_direct_formula_and_finite_differences() -> None:
    lw, mu, ls = _params((50,), 4)
    x = 6 * torch.randn(50, dtype=D)
    w = torch.softmax(lw, -1)
    t = (x.unsqueeze(-1) - mu) / ls.exp()
    cdf = (w * torch.sigmoid(t)).sum(-1)
    pdf = (w * torch.sigmoid(t) * torch.sigmoid(-t) / ls.exp()).sum(-1)
    log_cdf, log_sf = mixture_log_cdf(x, lw, mu, ls)
    torch.testing.assert_close(log_cdf, cdf.log())
    torch.testing.assert_close(log_sf, torch.log1p(-cdf))
    torch.testing.assert_close(mixture_log_pdf(x, lw, mu, ls), pdf.log())

    h = 1e-5
    lo, _ = mixture_log_cdf(x - h, lw, mu, ls)
    hi, _ = mixture_log_cdf(x + h, lw, mu, ls)
    fd = (hi.exp() - lo.exp()) / (2 * h)
    torch.testing.assert_close(fd, mixture_log_pdf(x, lw, mu, ls).exp(), rtol=1e-6, atol=1e-10)


def test_log_survival_far_tail() -> None:
    # Two unit-scale components at 0 and 1, weights 0.25/0.75, x = 70:
    # 1 - F = 0.25 σ(-70) + 0.75 σ(-69) ≈ 0.25 e^-70 + 0.75 e^-69 ≈ 1e-30 (rel. error ~1e-30).
    lw = torch.tensor([math.log(0.25), math.log(0.75)], dtype=D)
    mu = torch.tensor([0.0, 1.0], dtype=D)
    ls = torch.zeros(2, dtype=D)
    x = torch.tensor(70.0, dtype=D)
    log_cdf, log_sf = mixture_log_cdf(x, lw, mu, ls)
    expected = math.log(0.25 * math.exp(-70) + 0.75 * math.exp(-69))
    assert abs(log_sf.item() - expected) < 1e-10
    assert abs(log_cdf.item()) < 1e-25
    # Left tail mirrors it: F(-70) ≈ 0.25 e^-70 + 0.75 e^-71.
    log_cdf, _ = mixture_log_cdf(-x, lw, mu, ls)
    assert abs(log_cdf.item() - math.log(0.25 * math.exp(-70) + 0.75 * math.exp(-71))) < 1e-10


def test_bad_parameter_shapes() -> None:
    with pytest.raises(ValueError):
        mixture_log_cdf(torch.zeros(3), torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3, 3))


@pytest.mark.parametrize("mean", [-1e3, 0.0, 1e3])
@pytest.mark.parametrize("log_scale", [-7.0, 0.0, 7.0])
def test_inverse_single_component_analytic(mean: float, log_scale: float) -> None:
    # One component: logit F(x) = (x - μ)/s, so x = μ + s·y exactly.
    y = torch.linspace(-30, 30, 61, dtype=D)
    lw = torch.zeros(61, 1, dtype=D)
    mu = torch.full((61, 1), mean, dtype=D)
    ls = torch.full((61, 1), log_scale, dtype=D)
    x = mixture_inverse_cdf(y, lw, mu, ls)
    assert torch.isfinite(x).all()
    assert (x - (mean + math.exp(log_scale) * y)).abs().max() <= 1e-5


def test_inverse_extreme_mixture_round_trip() -> None:
    # Means ±1e3, scales e^-7 and e^7, random weights per row; the wide component keeps F
    # strictly increasing everywhere so x is identifiable from logit F(x).
    g = torch.Generator().manual_seed(3)
    n = 600
    mu = torch.tensor([-1e3, 0.0, 1e3], dtype=D).expand(n, 3)
    ls = torch.tensor([-7.0, 0.0, 7.0], dtype=D).expand(n, 3)
    lw = torch.randn(n, 3, generator=g, dtype=D)
    comp = torch.randint(0, 3, (n,), generator=g)
    noise = torch.empty(n, dtype=D).uniform_(-25, 25, generator=g)
    x_true = mu[torch.arange(n), comp] + ls[torch.arange(n), comp].exp() * noise
    log_cdf, log_sf = mixture_log_cdf(x_true, lw, mu, ls)
    y = log_cdf - log_sf
    assert y.abs().max() > 25  # CDF within ~1e-11 of 0 and 1 is exercised
    x = mixture_inverse_cdf(y, lw, mu, ls)
    assert torch.isfinite(x).all()
    assert (x - x_true).abs().max() <= 1e-5


def test_inverse_graph_only_with_grad_and_never_nans() -> None:
    lw, mu, ls = (p.requires_grad_() for p in _params((40,), 3, seed=4))
    mu_far = (mu * 300).detach().requires_grad_()
    ls_far = (ls * 7).detach().requires_grad_()  # some clamp at -7, some near +7 and beyond
    y = torch.linspace(-30, 30, 40, dtype=D)
    with torch.no_grad():
        x = mixture_inverse_cdf(y, lw, mu_far, ls_far)
    assert not x.requires_grad and x.grad_fn is None
    assert torch.isfinite(x).all()
    # With autograd on, the value is the same bisection result, now attached to the parameters.
    x_graph = mixture_inverse_cdf(y, lw, mu_far, ls_far)
    assert x_graph.requires_grad and torch.equal(x_graph.detach(), x)
    grads = torch.autograd.grad(x_graph.sum(), (lw, mu_far, ls_far))
    assert all(torch.isfinite(g).all() for g in grads)
    # The answer hits the target logit to the accuracy the local slope allows.
    lc, lsf = mixture_log_cdf(x, lw.detach(), mu_far.detach(), ls_far.detach())
    slope = (mixture_log_pdf(x, lw, mu_far, ls_far) - lc - lsf).exp().detach()
    assert ((lc - lsf - y).abs() <= slope * 2e-6 + 1e-9).all()
    # float32 too: finite for the same extreme inputs.
    x32 = mixture_inverse_cdf(y.float(), lw.float(), mu_far.float(), ls_far.float())
    assert torch.isfinite(x32).all()


@pytest.mark.parametrize(
    ("kwargs", "shape"),
    [
        ({"mask": "checkerboard"}, (2, 3, 4, 4)),  # wrong channel count
        ({"mask": "checkerboard"}, (2, 2, 4)),  # not an image
        ({"mask": "channel", "spatial": False}, (2, 2, 1, 1)),  # image given to vector layer
        ({"mask": "channel", "spatial": False}, (2, 3)),
    ],
)
def test_bad_input_shape_raises(kwargs: dict, shape: tuple) -> None:
    c = 2 if kwargs["mask"] == "checkerboard" else 4
    layer = MixLogisticCoupling(c, 2, **kwargs)
    with pytest.raises(ValueError):
        layer(torch.zeros(shape))
    with pytest.raises(ValueError):
        layer.inverse(torch.zeros(shape))


def test_bad_constructor_args() -> None:
    with pytest.raises(ValueError):
        MixLogisticCoupling(4, mask="stripes")
    with pytest.raises(ValueError):
        MixLogisticCoupling(4, mask="checkerboard", spatial=False)
    with pytest.raises(ValueError):
        MixLogisticCoupling(4, parity=2)


def test_inverse_cdf_gradients_match_finite_differences() -> None:
    """Implicit gradients of the bisection inverse (issue 15): parameters and targets."""
    lw, mu, ls = (p.requires_grad_() for p in _params((30,), 3, seed=6))
    y = torch.linspace(-8, 8, 30, dtype=D).requires_grad_()
    w = torch.randn(30, dtype=D)

    def loss() -> torch.Tensor:
        return (w * mixture_inverse_cdf(y, lw, mu, ls, tol=1e-13, max_iter=200)).sum()

    auto, fd = directional_derivatives(loss, [lw, mu, ls, y])
    assert auto == pytest.approx(fd, rel=1e-6, abs=1e-8)


@pytest.mark.parametrize("case", [0, 3])
def test_coupling_inverse_gradients_match_finite_differences(case: int) -> None:
    """Regression (issue 15): the inverse was cut off from the parameters by ``no_grad``."""
    layer, shape, std = _layers()[case]
    layer = layer.to(D)
    layer.inverse_tol, layer.inverse_max_iter = 1e-13, 200
    _randomize(layer, std)
    torch.manual_seed(2)
    z = torch.randn(shape, dtype=D).requires_grad_()
    w = torch.randn(shape, dtype=D)
    auto, fd = directional_derivatives(
        lambda: (w * layer.inverse(z)).sum(), [*layer.parameters(), z]
    )
    assert auto == pytest.approx(fd, rel=1e-6, abs=1e-8)
