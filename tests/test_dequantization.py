"""Dequantization: q(u | x) is a density, and the bounds built on it behave as the theory says.

The 1-D cases integrate numerically: the discrete likelihood ``P(x) = ∫_0^1 p(x + u) du`` is the
exact value every bound is compared with (Theis et al. 2016; Ho et al. 2019, eqs. 12-13).
"""

from __future__ import annotations

import math

import pytest
import torch

from hybridflow import transforms as T
from hybridflow.data import ImageDataset, load_dataset
from hybridflow.evaluation import evaluate_predictions, predict
from hybridflow.models import FlowModel, create_hybrid_model
from hybridflow.nets import ConvResNet

LEVELS = 5

# Tiny flows launch many small kernels: one intra-op thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _perturb(module: torch.nn.Module, std: float = 0.3) -> None:
    """Move every parameter off its (identity) initialisation so q and p are not trivial."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn_like(p))


def _variational(shape=(1, 1, 1), std: float = 0.3) -> T.VariationalDequantization:
    deq = T.VariationalDequantization(
        LEVELS,
        shape,
        num_couplings=3,
        context_channels=4,
        hidden_channels=8,
        num_blocks=1,
        num_heads=2,
        num_components=3,
        inverse_tol=1e-12,
        inverse_max_iter=200,
        checkerboard_layout="masked",  # 1 pixel wide: the gathered layout needs even widths
    )
    deq.train()
    deq(torch.randint(0, LEVELS, (16, *shape)))  # weight-norm data-dependent init
    _perturb(deq, std)
    return deq.eval()


def _one_dim_flow(dequantization: str) -> FlowModel:
    """A 1-pixel flow: logit, ActNorm and a mixture-of-logistics CDF transform."""

    def net(c_in: int, c_out: int) -> ConvResNet:
        return ConvResNet(c_in, c_out, hidden_channels=4, num_blocks=1)

    layers = T.InvertibleSequential(
        T.ActNorm(1),
        T.MixLogisticCoupling(
            1, 3, "checkerboard", 1, net, inverse_tol=1e-12, checkerboard_layout="masked"
        ),
    )
    backbone = T.MultiscaleFlow([layers], (1, 1, 1), [(1, 1, 1)], factor_out=False)
    args = (
        dict(
            num_couplings=3,
            context_channels=4,
            hidden_channels=8,
            num_blocks=1,
            num_heads=2,
            num_components=3,
            checkerboard_layout="masked",  # 1 pixel wide
        )
        if dequantization == "variational"
        else None
    )
    flow = FlowModel(
        backbone,
        (1, 1, 1),
        num_levels=LEVELS,
        dequantization=dequantization,
        dequantization_args=args,
    )
    flow.data_init(torch.randint(0, LEVELS, (32, 1, 1, 1)))
    _perturb(flow)
    return flow.eval()


def _level_log_density(flow: FlowModel):
    uniform = T.UniformDequantization(LEVELS)

    def at(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        y, logdet = uniform(x, noise=u)
        h, ld = flow.preprocess(y)
        z, ld2 = flow.backbone(h)
        return T.standard_normal_log_prob(z) + logdet + ld + ld2

    return at


@pytest.mark.parametrize("level", [0, 2, LEVELS - 1])
def test_variational_log_q_integrates_to_one(level: int) -> None:
    torch.manual_seed(level)
    deq = _variational()
    # Integrate q over u ∈ (0, 1) with u = σ(t): ∫ q(σ(t)) σ'(t) dt on a fine grid.
    t = torch.linspace(-30, 30, 60001)
    u = torch.sigmoid(t).view(-1, 1, 1, 1)
    x = torch.full_like(u, float(level))
    with torch.no_grad():
        _, logdet = deq(x, noise=u)
    log_q = -(logdet + math.log(LEVELS))  # logdet = -D log K - log q
    log_sigmoid_prime = -torch.nn.functional.softplus(-t) - torch.nn.functional.softplus(t)
    integrand = (log_q + log_sigmoid_prime).exp()
    total = torch.trapezoid(integrand, t).item()
    assert total == pytest.approx(1.0, abs=1e-4)
    assert integrand.max() < 1e3  # a smooth density, not a spike the grid could miss


def test_variational_q_depends_on_the_level() -> None:
    torch.manual_seed(0)
    deq = _variational()
    u = torch.full((2, 1, 1, 1), 0.3)
    with torch.no_grad():
        _, logdet = deq(torch.tensor([0.0, 3.0]).view(2, 1, 1, 1), noise=u)
    assert abs(logdet[0] - logdet[1]) > 1e-3


def test_sampled_and_evaluated_log_q_agree() -> None:
    torch.manual_seed(1)
    # Moderate weights keep σ(h) out of saturation, where u no longer determines h to 1e-7.
    deq = _variational((2, 4, 4), std=0.1)
    x = torch.randint(0, LEVELS, (6, 2, 4, 4))
    with torch.no_grad():
        y, logdet = deq(x, generator=torch.Generator().manual_seed(0))
        eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
        u, _ = deq.noise_flow(eps, deq.context(x.double()))
        y_at_u, logdet_at_u = deq(x, noise=u)  # evaluates q at u by inverting the couplings
    torch.testing.assert_close(y_at_u, y)
    torch.testing.assert_close(logdet_at_u, logdet, atol=1e-7, rtol=1e-9)
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        deq(x, noise=1.0)


def _exact_log_prob(flow: FlowModel, level: int, points: int = 20001) -> float:
    """``log P(x) = log ∫_0^1 p(x + u) du`` by the midpoint rule."""
    u = ((torch.arange(points) + 0.5) / points).view(-1, 1, 1, 1)
    with torch.no_grad():
        log_p = _level_log_density(flow)(torch.full_like(u, float(level)), u)
    return (torch.logsumexp(log_p, 0) - math.log(points)).item()


def _elbo_by_quadrature(flow: FlowModel, level: int) -> float:
    """``E_q[log p(x + u) - log q(u | x)]`` by quadrature (in ``t = logit u`` for variational q)."""
    with torch.no_grad():
        if flow.dequantization == "uniform":
            u = ((torch.arange(20001) + 0.5) / 20001).view(-1, 1, 1, 1)
            x = torch.full_like(u, float(level))
            return _level_log_density(flow)(x, u).mean().item()
        t = torch.linspace(-30, 30, 60001)
        u = torch.sigmoid(t).view(-1, 1, 1, 1)
        x = torch.full_like(u, float(level))
        _, logdet = flow.dequantize(x, noise=u)
        log_q = -(logdet + math.log(LEVELS))
        log_jac = -torch.nn.functional.softplus(-t) - torch.nn.functional.softplus(t)
        integrand = (log_q + log_jac).exp() * (_level_log_density(flow)(x, u) - log_q)
        return torch.trapezoid(integrand, t).item()


@pytest.mark.parametrize("dequantization", ["uniform", "variational"])
def test_bounds_against_the_exact_discrete_likelihood(dequantization: str) -> None:
    torch.manual_seed(3)
    flow = _one_dim_flow(dequantization)
    exact_and_elbo = [
        (_exact_log_prob(flow, k), _elbo_by_quadrature(flow, k)) for k in range(LEVELS)
    ]
    assert all(elbo < exact for exact, elbo in exact_and_elbo)  # Jensen: lower bounds
    # Test the level with the widest gap, where IW's gain is largest and easiest to resolve.
    level = max(range(LEVELS), key=lambda k: exact_and_elbo[k][0] - exact_and_elbo[k][1])
    exact, elbo = exact_and_elbo[level]
    assert exact - elbo > 0.02
    reps, draws = 1000, 64
    x = torch.full((reps, 1, 1, 1), float(level))
    with torch.no_grad():
        # log w = log p(x + u) - log q(u | x) for 64 draws of each of 1000 replicas.
        log_w = flow.log_prob(x.repeat(draws, 1, 1, 1)).view(draws, reps)
    # One draw is an unbiased estimate of the bound: checks the sampler and its log q together.
    assert log_w.mean().item() == pytest.approx(elbo, abs=4 * _se(log_w.flatten()))
    if dequantization == "uniform":
        # Importance sampling is unbiased for P(x): E_q[p(x + u) / q(u | x)] = P(x). (For the
        # variational q the weights p/q are unbounded at the bin edges, so no finite-variance
        # check exists; its bounds are checked through the quadrature ELBO above.)
        ratio = (log_w - exact).exp().flatten()
        assert ratio.mean().item() == pytest.approx(1.0, abs=4 * _se(ratio))
    # IW_S on nested draws (IW_1 ⊂ IW_8 ⊂ IW_64), so differences are paired.
    iw = {s: torch.logsumexp(log_w[:s], 0) - math.log(s) for s in (1, 8, 64)}
    assert (iw[64] - iw[1]).mean() > 3 * _se(iw[64] - iw[1])
    assert (iw[64] - iw[8]).mean() > -3 * _se(iw[64] - iw[8])
    assert iw[64].mean() < exact + 3 * _se(iw[64])


def test_log_prob_iw_is_the_log_mean_weight_of_its_draws() -> None:
    torch.manual_seed(5)
    flow = _one_dim_flow("variational")
    x = torch.tensor([0.0, 1.0, 4.0]).view(3, 1, 1, 1)
    with torch.no_grad():
        bound = flow.log_prob_iw(x, 10, generator=torch.Generator().manual_seed(7))
        draws = flow.log_prob(x.repeat(10, 1, 1, 1), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(bound, torch.logsumexp(draws.view(10, 3), 0) - math.log(10))
    with torch.no_grad():  # chunking does not change the estimator, only the batching
        chunked = flow.log_prob_iw(x, 10, chunk_size=7, generator=torch.Generator().manual_seed(7))
    assert torch.isfinite(chunked).all() and chunked.shape == (3,)


_IW_CHUNKING_BUG = (
    "log_prob_iw depends on chunk_size under variational dequantization: q(u | x) draws its "
    "noise with torch.randn(generator=...) per chunk, and torch's CPU normal sampler gives "
    "another stream for one draw of n >= 16 values than for several smaller draws (uniform "
    "noise, torch.rand, is chunk-invariant), so the same generator gives a different bound "
    "for each chunk size"
)


@pytest.mark.parametrize(
    "dequantization",
    [
        "uniform",
        pytest.param("variational", marks=pytest.mark.xfail(strict=True, reason=_IW_CHUNKING_BUG)),
    ],
)
def test_log_prob_iw_chunk_by_chunk_equals_one_shot(dequantization: str) -> None:
    """Oracle: the one-shot evaluation (all S·N draws in one forward) from the same generator, and
    for uniform noise the bound by hand from that draw, ``log (1/S) Σ_s p(x + u_s)`` with the
    ``u_s`` passed explicitly (sample-major, as documented)."""
    torch.manual_seed(5)
    flow = _one_dim_flow(dequantization)
    x = torch.tensor([0.0, 1.0, 4.0, 2.0]).view(4, 1, 1, 1)
    samples, n = 10, 4
    with torch.no_grad():
        one_shot = flow.log_prob_iw(
            x, samples, chunk_size=samples * n, generator=torch.Generator().manual_seed(7)
        )
        if dequantization == "uniform":
            noise = torch.rand(samples, n, 1, 1, 1, generator=torch.Generator().manual_seed(7))
            log_w = torch.stack([flow.log_prob(x, dequant_noise=u) for u in noise])
            by_hand = torch.logsumexp(log_w, 0) - math.log(samples)
            torch.testing.assert_close(one_shot, by_hand)
        # chunk_size // N samples per forward: 1, 2, 3 and 7 (the last chunk 3)
        for chunk_size in (1, 8, 12, 28):
            chunked = flow.log_prob_iw(
                x, samples, chunk_size=chunk_size, generator=torch.Generator().manual_seed(7)
            )
            torch.testing.assert_close(chunked, one_shot, msg=f"chunk_size={chunk_size}")


def _se(values: torch.Tensor) -> float:
    return values.std().item() / math.sqrt(values.numel())


def test_discrete_probabilities_and_the_mass_beyond_the_logit_margin_sum_to_one() -> None:
    torch.manual_seed(4)
    flow = _one_dim_flow("uniform")
    total = sum(math.exp(_exact_log_prob(flow, k)) for k in range(LEVELS))
    # The logit margin α maps [0, 1] onto [logit α, logit(1 - α)]: the backbone's mass outside
    # that interval is what the discrete probabilities miss.
    edge = math.log(flow.preprocess.alpha) - math.log1p(-flow.preprocess.alpha)
    beyond = 0.0
    for lo, hi in ((-80.0, edge), (-edge, 80.0)):
        h = torch.linspace(lo, hi, 200001)
        with torch.no_grad():
            z, logdet = flow.backbone(h.view(-1, 1, 1, 1))
        beyond += torch.trapezoid((T.standard_normal_log_prob(z) + logdet).exp(), h).item()
    assert total < 1.0
    assert total + beyond == pytest.approx(1.0, abs=1e-4)


def test_flow_model_rejects_bad_dequantization_settings() -> None:
    backbone = T.MultiscaleFlow([T.ActNorm(1)], (1, 2, 2), [(1, 2, 2)], factor_out=False)
    with pytest.raises(ValueError, match="dequantization must be one of"):
        FlowModel(backbone, (1, 2, 2), num_levels=17, dequantization="gaussian")
    with pytest.raises(ValueError, match="only read by variational"):
        FlowModel(backbone, (1, 2, 2), num_levels=17, dequantization_args={"num_couplings": 2})
    flow = FlowModel(backbone, (1, 2, 2), num_levels=17)
    with pytest.raises(ValueError, match="num_samples"):
        flow.log_prob_iw(torch.zeros(1, 1, 2, 2), 0)


def test_variational_hybrid_model_trains_and_evaluates() -> None:
    torch.set_default_dtype(torch.float32)
    data = load_dataset("digits", "test")
    dataset = ImageDataset(
        data.images[:64],
        data.labels[:64],
        num_levels=17,
        num_classes=10,
        name="digits",
        split="test",
    )
    x, y = dataset.images, dataset.labels
    config = {
        "backbone": "coupling",
        "backbone_args": {"num_scales": 1, "blocks_per_scale": 2, "hidden_channels": 8},
        "dequantization": "variational",
        "dequantization_args": {"hidden_channels": 8, "num_blocks": 1, "num_couplings": 2},
    }
    model = create_hybrid_model(config, (1, 8, 8), 17, 10)
    model.data_init(x)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        model.loss(x, y, lam=1.0)["loss"].mean().backward()
        opt.step()
    deq_grads = [p.grad for p in model.flow.dequantize.parameters()]
    assert all(g is not None for g in deq_grads)
    assert any(g.abs().sum() > 0 for g in model.flow.dequantize.context_net.parameters())
    single = predict(model, dataset, dequant_samples=1)
    bound = predict(model, dataset, iw_samples=16)
    assert evaluate_predictions(bound)["bpd"] < evaluate_predictions(single)["bpd"]
