"""Neural autoregressive flows (Huang et al. 2018): DSF/DDSF transformers, bisection, NAF layers."""

from __future__ import annotations

import math

import pytest
import torch
from test_conformance import directional_derivatives
from torch import Tensor

import hybridflow.models.naf  # noqa: F401  (registers the "naf" and "naf-coupling" backbones)
from hybridflow.models import FlowModel
from hybridflow.models.registry import create_backbone, list_backbones
from hybridflow.training import load_run, train
from hybridflow.transforms.base import Inverse, standard_normal_log_prob
from hybridflow.transforms.naf import (
    NAFCoupling,
    NeuralAutoregressiveFlow,
    ddsf_num_params,
    ddsf_transform,
    dsf_num_params,
    dsf_transform,
    monotone_bisection,
)

pytestmark = pytest.mark.usefixtures("one_thread")


K, L = 4, 3  # DDSF size used throughout: 3 layers, so a K×K hidden layer is exercised.
GRID = torch.linspace(-50.0, 50.0, 20_001, dtype=torch.float64)


def _transform(kind: str, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
    if kind == "dsf":
        return dsf_transform(x, params)
    return ddsf_transform(x, params, K, L)


def _num_params(kind: str) -> int:
    return dsf_num_params(K) if kind == "dsf" else ddsf_num_params(K, L)


def _slots(kind: str) -> dict[str, list[int]]:
    """Indices of the a_raw, b and logit slots in the packed parameter vector."""
    if kind == "dsf":
        return {"a": list(range(K)), "b": list(range(K, 2 * K)), "w": list(range(2 * K, 3 * K))}
    slots: dict[str, list[int]] = {"a": [], "b": [], "w": []}
    start = 0
    for layer in range(L):
        d_in = 1 if layer == 0 else K
        d_out = 1 if layer == L - 1 else K
        slots["a"] += range(start, start + K)
        slots["b"] += range(start + K, start + 2 * K)
        start += 2 * K
        n_logits = (K * d_in if d_in > 1 else 0) + d_out * K
        slots["w"] += range(start, start + n_logits)
        start += n_logits
    return slots


CASES = ["random", "wide", "huge_scale", "tiny_scale", "peaked", "far_steps"]


def _params(kind: str, case: str) -> Tensor:
    """One parameter vector: random, or an extreme configuration."""
    gen = torch.Generator().manual_seed(CASES.index(case))
    p = torch.randn(_num_params(kind), generator=gen, dtype=torch.float64)
    s = _slots(kind)
    if case == "wide":
        p = 5.0 * p
    elif case == "huge_scale":
        p[s["a"]] = 1e3  # a ≈ 1000: near step functions
    elif case == "tiny_scale":
        p[s["a"]] = -60.0  # softplus ≈ 1e-26: a sits on its floor
    elif case == "peaked":
        p[s["w"]] = 60.0 * torch.sign(p[s["w"]])  # softmax weights ≈ one-hot
    elif case == "far_steps":
        # Two steep units far apart with equal weight: every sigmoid saturates in between, so only
        # the linear leak keeps the map strictly increasing there.
        p[s["a"]] = 50.0
        p[s["b"]] = 50.0 * 20.0 * torch.tensor([1.0, -1.0]).repeat(len(s["b"]) // 2)
        p[s["w"]] = 0.0
    return p


def test_param_counts_and_packing() -> None:
    assert dsf_num_params(5) == 15
    assert ddsf_num_params(5, 1) == 15  # a one-layer DDSF is a DSF (no u for a single input)
    assert ddsf_num_params(3, 2) == 2 * 2 * 3 + 2 * 3**2 + 3
    assert ddsf_num_params(K, L) == max(max(v) for v in _slots("ddsf").values()) + 1
    p = torch.randn(7, 15)
    x = torch.randn(7)
    for got, want in zip(ddsf_transform(x, p, 5, 1), dsf_transform(x, p), strict=True):
        torch.testing.assert_close(got, want)


def test_dsf_matches_naive_formula() -> None:
    """Log-space DSF equals σ⁻¹(Σ w σ(a x + b)) + δx evaluated directly (moderate params)."""
    x = torch.linspace(-3, 3, 101)
    p = torch.randn(101, 3 * K)
    a = torch.nn.functional.softplus(p[:, :K]) + 1e-3
    w = torch.softmax(p[:, 2 * K :], dim=-1)
    s = (w * torch.sigmoid(a * x[:, None] + p[:, K : 2 * K])).sum(-1)
    y, _ = dsf_transform(x, p, delta=1e-2)
    torch.testing.assert_close(y, torch.logit(s) + 1e-2 * x)


def test_ddsf_matches_naive_formula() -> None:
    """Two-layer DDSF with explicit matrices.

    ``h = σ⁻¹(w1 σ(a1 x + b1))``, ``y = σ⁻¹(w2 σ(a2 ⊙ (u2 h) + b2))``.
    """
    k, n = 3, 11
    x = torch.linspace(-2, 2, n)
    p = torch.randn(n, ddsf_num_params(k, 2))
    sp = torch.nn.functional.softplus
    a1, b1 = sp(p[:, :k]) + 1e-3, p[:, k : 2 * k]
    w1 = torch.softmax(p[:, 2 * k : 2 * k + k * k].view(n, k, k), dim=-1)
    o = 2 * k + k * k
    a2, b2 = sp(p[:, o : o + k]) + 1e-3, p[:, o + k : o + 2 * k]
    u2 = torch.softmax(p[:, o + 2 * k : o + 2 * k + k * k].view(n, k, k), dim=-1)
    w2 = torch.softmax(p[:, o + 2 * k + k * k :], dim=-1)
    h = torch.logit((w1 * torch.sigmoid(a1 * x[:, None] + b1)[:, None, :]).sum(-1))
    c2 = a2 * (u2 * h[:, None, :]).sum(-1) + b2
    y_naive = torch.logit((w2 * torch.sigmoid(c2)).sum(-1))
    y, _ = ddsf_transform(x, p, k, 2, delta=0.0)
    torch.testing.assert_close(y, y_naive)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", ["dsf", "ddsf"])
def test_transformer_monotone_finite_and_exact_log_derivative(kind: str, case: str) -> None:
    p = _params(kind, case)
    y, log_d = _transform(kind, GRID, p)
    assert torch.isfinite(y).all() and torch.isfinite(log_d).all()
    assert (y.diff() > 0).all(), f"not strictly increasing: min step {y.diff().min()}"
    # Log-derivative against autograd on a sub-grid (every 100th point, incl. both ends).
    x = GRID[::100].clone().requires_grad_(True)
    y_sub, log_d_sub = _transform(kind, x, p)
    (grad,) = torch.autograd.grad(y_sub.sum(), x)
    assert (grad > 0).all()
    # Both sides lose ~eps·|pre-activation| in absolute terms when huge scales push the hidden
    # pre-activations (and y) to ~1e10; hence the |y|-proportional slack.
    err = (log_d_sub.detach() - grad.log()).abs()
    assert (err <= 1e-9 + 1e-14 * y_sub.detach().abs()).all(), f"max error {err.max()}"
    # Gradients with respect to the parameters are finite too (training never sees NaN).
    pp = p.clone().requires_grad_(True)
    y2, ld2 = _transform(kind, GRID[::50], pp)
    (gp,) = torch.autograd.grad((y2 + ld2).sum(), pp)
    assert torch.isfinite(gp).all()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", ["dsf", "ddsf"])
def test_bisection_round_trip(kind: str, case: str) -> None:
    p = _params(kind, case)
    x = torch.cat([GRID[::400], torch.tensor([-1e4, -300.0, 300.0, 1e4])])
    y, _ = _transform(kind, x, p)

    def fn(t: Tensor) -> Tensor:
        return _transform(kind, t, p)[0]

    x_back = monotone_bisection(fn, y, tol=1e-7)
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-5)
    # Targets far in the tails (beyond any sigmoid's range) still have a finite solution.
    targets = torch.tensor([-1e6, -1e3, -40.0, 0.0, 40.0, 1e3, 1e6])
    sol = monotone_bisection(fn, targets, tol=1e-7)
    assert torch.isfinite(sol).all() and (sol.diff() > 0).all()
    # The root is bracketed to within the tolerance (a residual in y would scale with the slope).
    # Beyond |x| ~ 1e9 float64 spacing exceeds 1e-6, hence the relative part of the slack.
    slack = 1e-6 + 1e-15 * sol.abs()
    assert (fn(sol - slack) < targets).all() and (fn(sol + slack) > targets).all()


def test_bisection_errors_and_warnings() -> None:
    with pytest.raises(ValueError, match="finite"):
        monotone_bisection(torch.sinh, torch.tensor([0.0, math.inf]))
    with pytest.raises(ValueError, match="NaN"):
        monotone_bisection(lambda t: t * math.nan, torch.zeros(3))
    with pytest.raises(RuntimeError, match="bracket"):  # bounded map: 2 is never reached
        monotone_bisection(torch.sigmoid, torch.tensor([0.5, 2.0]), max_expand=20)
    with pytest.warns(RuntimeWarning, match="wider than tol"):
        out = monotone_bisection(torch.sinh, torch.tensor([0.3, 5.0]), max_iter=3)
    assert torch.isfinite(out).all()
    with pytest.raises(RuntimeError, match="wider than tol"):
        monotone_bisection(torch.sinh, torch.tensor([0.3]), max_iter=3, on_failure="raise")
    with pytest.raises(ValueError, match="on_failure"):
        monotone_bisection(torch.sinh, torch.tensor([0.3]), on_failure="ignore")
    torch.testing.assert_close(
        monotone_bisection(torch.sinh, torch.tensor([-3.0, 0.0, 1e3])),
        torch.asinh(torch.tensor([-3.0, 0.0, 1e3])),
        rtol=0,
        atol=1e-6,
    )


def test_bisection_gradients_are_implicit() -> None:
    """x(a, y) solving sinh(a·x) = y: dx/dy = 1/(a cosh(a x)), dx/da = -x/a, via autograd."""
    a = torch.tensor([0.5, 2.0, 3.0], requires_grad=True)
    y = torch.tensor([-2.0, 0.3, 40.0], requires_grad=True)
    for fn in (
        lambda t: torch.sinh(a * t),  # value only: the slope comes from autograd
        lambda t: (torch.sinh(a * t), torch.log(a * torch.cosh(a * t))),
    ):
        x = monotone_bisection(fn, y, tol=1e-14, max_iter=200)
        with torch.no_grad():
            assert torch.equal(x.detach(), monotone_bisection(fn, y, tol=1e-14, max_iter=200))
        grad_a, grad_y = torch.autograd.grad(x.sum(), (a, y))
        exact_x = torch.asinh(y) / a
        torch.testing.assert_close(grad_y, 1 / torch.sqrt(1 + y**2) / a.detach())
        torch.testing.assert_close(grad_a, -(exact_x / a).detach())


def _randomize(module: torch.nn.Module, std: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(std * torch.randn(param.shape, generator=gen, dtype=param.dtype))


def _check_logdet(flow, x: Tensor, logdet: Tensor, context: Tensor | None = None) -> None:
    for i in range(x.shape[0]):
        ctx = None if context is None else context[i : i + 1]
        jac = torch.autograd.functional.jacobian(
            lambda v, ctx=ctx: flow(v.unsqueeze(0), ctx)[0][0], x[i]
        )
        jac = jac.reshape(x[i].numel(), x[i].numel())
        torch.testing.assert_close(logdet[i], torch.linalg.slogdet(jac)[1])


@pytest.mark.parametrize(
    ("transformer", "order", "context_features"),
    [("dsf", "natural", 0), ("ddsf", "random", 0), ("dsf", "reversed", 2), ("ddsf", "natural", 2)],
)
def test_naf_round_trip_logdet_and_triangularity(
    transformer: str, order: str, context_features: int
) -> None:
    d = 4
    flow = NeuralAutoregressiveFlow(
        d, transformer, 3, 2, (12, 12), order=order, context_features=context_features, seed=3
    )
    _randomize(flow)
    x = 2.0 * torch.randn(3, d)
    ctx = torch.randn(3, context_features) if context_features else None
    z, logdet = flow(x, ctx)
    assert z.shape == x.shape and logdet.shape == (3,)
    torch.testing.assert_close(flow.inverse(z, ctx), x, rtol=0, atol=1e-5)
    _check_logdet(flow, x, logdet, ctx)
    # dz_i/dx_j = 0 unless order[j] <= order[i] (autoregressive structure).
    jac = torch.autograd.functional.jacobian(
        lambda v: flow(v[None], None if ctx is None else ctx[:1])[0][0], x[0]
    )
    o = flow.made.order
    assert (jac[o[:, None] < o[None, :]] == 0).all()
    assert (jac.diagonal() > 0).all()


def test_naf_starts_near_identity() -> None:
    for transformer in ("dsf", "ddsf"):
        flow = NeuralAutoregressiveFlow(3, transformer, 8, 2, (16,))
        x = torch.linspace(-6, 6, 60).view(20, 3)
        z, logdet = flow(x)
        slope_log = logdet / 3
        assert (slope_log < 1e-5).all() and (slope_log > math.log(0.8)).all()
        assert (z - x).abs().max() < 0.5


def test_iaf_dsf_round_trip_both_directions() -> None:
    naf = NeuralAutoregressiveFlow(3, "dsf", 4, hidden_features=(10, 10), order="random", seed=2)
    _randomize(naf)
    iaf = Inverse(naf)
    x = torch.randn(4, 3)
    z, logdet = iaf(x)  # density direction: D bisection passes
    torch.testing.assert_close(iaf.inverse(z), x, rtol=0, atol=1e-5)
    u = torch.randn(4, 3)
    torch.testing.assert_close(iaf(iaf.inverse(u))[0], u, rtol=0, atol=1e-5)
    # log|det dz/dx| of the IAF is minus that of its inverse, the NAF at z.
    for i in range(4):
        jac = torch.autograd.functional.jacobian(lambda v: naf(v[None])[0][0], z[i])
        torch.testing.assert_close(logdet[i], -torch.linalg.slogdet(jac)[1])


@pytest.mark.parametrize(
    ("mask", "parity", "spatial", "context_channels"),
    [
        ("checkerboard", 0, True, 0),
        ("channel", 1, True, 0),
        ("checkerboard", 1, True, 2),
        ("channel", 0, False, 0),
    ],
)
def test_naf_coupling_round_trip_and_logdet(
    mask: str, parity: int, spatial: bool, context_channels: int
) -> None:
    layer = NAFCoupling(
        3 if spatial else 5,
        num_units=3,
        mask=mask,
        parity=parity,
        spatial=spatial,
        context_channels=context_channels,
    )
    _randomize(layer, 0.2)
    shape = (2, 3, 4, 4) if spatial else (2, 5)
    x = 2.0 * torch.randn(shape)
    ctx = torch.randn(2, context_channels, 4, 4) if context_channels else None
    z, logdet = layer(x, ctx)
    assert z.shape == x.shape and logdet.shape == (2,)
    assert not torch.allclose(z, x)
    torch.testing.assert_close(layer.inverse(z, ctx), x, rtol=0, atol=1e-5)
    _check_logdet(layer, x, logdet, ctx)


def test_backbones_build_and_give_finite_log_probs() -> None:
    assert {"naf", "naf-coupling"} <= set(list_backbones())
    for kw in ({"transformer": "dsf"}, {"transformer": "ddsf", "num_layers": 2}):
        flow = create_backbone("naf", (3,), num_flows=2, num_units=4, hidden_features=16, **kw)
        _randomize(flow, 0.1)
        x = torch.randn(5, 3)
        z, logdet = flow(x)
        assert torch.isfinite(standard_normal_log_prob(z) + logdet).all()
        torch.testing.assert_close(flow.inverse(z), x, rtol=0, atol=1e-5)
    small = {"num_scales": 2, "blocks_per_scale": 1, "hidden_channels": 8, "num_units": 3}
    image_flow = create_backbone("naf-coupling", (1, 4, 4), **small)
    vector_flow = create_backbone("naf-coupling", (4,), blocks_per_scale=2, hidden_channels=8)
    for flow, x in ((image_flow, torch.rand(3, 1, 4, 4)), (vector_flow, torch.randn(3, 4))):
        _randomize(flow, 0.05)
        z, logdet = flow(x)
        assert torch.isfinite(standard_normal_log_prob(z) + logdet).all()
        torch.testing.assert_close(flow.inverse(z), x, rtol=0, atol=1e-5)


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="3K"):
        dsf_transform(torch.zeros(2), torch.zeros(2, 7))
    with pytest.raises(ValueError, match="needs params"):
        ddsf_transform(torch.zeros(2), torch.zeros(2, 12), 3, 2)
    with pytest.raises(ValueError, match="delta"):
        dsf_transform(torch.zeros(2), torch.zeros(2, 6), delta=-1.0)
    with pytest.raises(ValueError, match="num_units"):
        dsf_num_params(0)
    with pytest.raises(ValueError, match="num_layers"):
        ddsf_num_params(2, 0)
    with pytest.raises(ValueError, match="transformer"):
        NeuralAutoregressiveFlow(3, "affine")
    flow = NeuralAutoregressiveFlow(3, hidden_features=(8,))
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        flow(torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        flow.inverse(torch.zeros(2, 3, 1))
    with pytest.raises(ValueError, match="context"):
        NeuralAutoregressiveFlow(3, hidden_features=(8,), context_features=2)(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="expects"):
        NAFCoupling(3)(torch.zeros(2, 4, 4, 4))
    with pytest.raises(ValueError, match="vector inputs"):
        create_backbone("naf", (1, 4, 4))
    with pytest.raises(ValueError, match="naf-coupling expects"):
        create_backbone("naf-coupling", (4, 4))


def test_maf_dsf_flow_model_samples_and_reencodes_its_samples() -> None:
    flow = FlowModel(
        create_backbone("naf", (3,), num_flows=2, num_units=4, hidden_features=16),
        (3,),
        num_levels=None,
        preprocessing="none",
    )
    _randomize(flow, 0.1)
    flow.eval()
    z = torch.randn(6, 3)
    x = flow.decode(z)  # sampling runs the D-pass bisection inverse of every flow
    assert torch.isfinite(x).all()
    torch.testing.assert_close(flow.backbone(x)[0], z, rtol=0, atol=1e-5)
    assert torch.isfinite(flow.log_prob(flow.sample(4))).all()


def test_naf_coupling_digits_hybrid_run_trains_and_reloads(tmp_path) -> None:
    torch.set_default_dtype(torch.float32)
    run_dir = train(
        {
            "dataset": "digits",
            "backbone": "naf-coupling",
            "backbone_args": {"num_scales": 1, "blocks_per_scale": 2, "hidden_channels": 8},
            "head_args": {"width": 8},
            "lam": "1/D",
            "batch_size": 128,
            "max_steps": 10,
            "warmup_steps": 2,
            "eval_every": 1,
            "lr": 3e-3,
            "progress": False,
            "num_threads": 1,
            "out_dir": str(tmp_path),
            "name": "naf-coupling",
        }
    )
    model, cfg = load_run(run_dir)
    assert cfg["backbone"] == "naf-coupling"
    x = torch.randint(0, 17, (4, 1, 8, 8)).float()
    assert torch.isfinite(model.flow.log_prob(x)).all()


@pytest.mark.parametrize("transformer", ["dsf", "ddsf"])
def test_iaf_naf_training_gradients_match_finite_differences(transformer: str) -> None:
    """Regression (issue 15): ``Inverse(NAF)`` is trained through ``NAF.inverse``, whose
    bisection ran under ``no_grad``; autograd then disagreed with finite differences."""
    naf = NeuralAutoregressiveFlow(
        3, transformer, 4, 2, (10, 10), order="random", seed=2, inverse_tol=1e-13
    )
    _randomize(naf)
    iaf = Inverse(naf)
    x = torch.randn(8, 3)

    def nll() -> Tensor:
        z, logdet = iaf(x)
        return -(standard_normal_log_prob(z) + logdet).mean()

    auto, fd = directional_derivatives(nll, list(naf.parameters()))
    assert auto == pytest.approx(fd, rel=1e-6, abs=1e-8)
    # Every coordinate is reached, including through θ(x_<j) of later coordinates.
    out = naf.made.output.bias
    (grad,) = torch.autograd.grad(nll(), out)
    per_dim = grad.view(3, -1).abs().sum(1)
    assert (per_dim > 0).all()


def test_naf_inverse_gradient_wrt_input_is_inverse_jacobian() -> None:
    naf = NeuralAutoregressiveFlow(4, "dsf", 3, hidden_features=(12,), order="random", seed=1)
    _randomize(naf)
    naf.inverse_tol = 1e-13
    z = torch.randn(4)
    jac_inv = torch.autograd.functional.jacobian(lambda v: naf.inverse(v[None])[0], z)
    x = naf.inverse(z[None]).detach()[0]
    jac = torch.autograd.functional.jacobian(lambda v: naf(v[None])[0][0], x)
    torch.testing.assert_close(jac_inv @ jac, torch.eye(4), atol=1e-9, rtol=0)


@pytest.mark.parametrize(("mask", "spatial"), [("checkerboard", True), ("channel", False)])
def test_naf_coupling_inverse_gradients_match_finite_differences(mask: str, spatial: bool) -> None:
    layer = NAFCoupling(
        3 if spatial else 5, 3, mask, 1, spatial=spatial, inverse_tol=1e-13, inverse_max_iter=200
    )
    _randomize(layer, 0.2)
    z = torch.randn((2, 3, 4, 4) if spatial else (2, 5)).requires_grad_()
    w = torch.randn_like(z)
    auto, fd = directional_derivatives(
        lambda: (w * layer.inverse(z)).sum(), [*layer.parameters(), z]
    )
    assert auto == pytest.approx(fd, rel=1e-6, abs=1e-8)
