"""Numerical extremes: every invertible layer stays finite or fails loudly (property-based).

For inputs and parameters at the edges of what each layer meets in practice — magnitudes up to
1e4 in float32 and float64, the ends of the logit/sigmoid paths, mixture-of-logistics tails
(Ho et al. 2019), extreme DSF/DDSF pseudo-parameters (Huang et al. 2018) and residual blocks
at their Lipschitz bound (Chen et al. 2019) — ``forward``, ``inverse`` and the log-det are
finite, or the layer raises a ``ValueError``/``RuntimeError`` that says what is wrong. A NaN or
an infinity returned without an error fails.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from functools import cache

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_conformance import CASES, Case, _prepared
from torch import Tensor

from hybridflow import transforms as T
from hybridflow.nets import LipschitzConvNet, LipschitzMLP, refresh_lipschitz_layers
from hybridflow.transforms.mixlogistic import LOG_SCALE_MIN

# Examples are cheap but layers are not: each test keeps a small budget (the whole file runs in
# well under a minute on one core). No example database: nothing is written to the checkout.
SETTINGS = settings(
    max_examples=12,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
DTYPES = st.sampled_from([torch.float32, torch.float64])
#: Scales of drawn inputs: zero, tiny, ordinary and large magnitudes.
MAGNITUDES = (0.0, 1e-30, 1e-3, 1.0, 40.0, 1e3, 1e4)

pytestmark = pytest.mark.usefixtures("one_thread")


def _finite_or_clear_error(fn: Callable[[], Tensor | tuple[Tensor, ...]]):
    """Run ``fn``: its tensors must be finite, or it must raise with a message; else fail."""
    try:
        out = fn()
    except (ValueError, RuntimeError) as err:
        assert str(err).strip(), f"{type(err).__name__} raised without a message"
        return None
    for t in out if isinstance(out, tuple) else (out,):
        assert torch.isfinite(t).all(), "non-finite values returned without an error"
    return out


@st.composite
def _arrays(draw, shape: tuple[int, ...], dtype: torch.dtype, max_abs: float = 1e4) -> Tensor:
    """A tensor at one drawn magnitude, with some entries pinned at ``±max_abs`` or 0."""
    scale = draw(st.sampled_from([m for m in MAGNITUDES if m <= max_abs]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.randn(shape, generator=gen, dtype=torch.float64).clamp(-3, 3) * (scale / 3)
    pinned = draw(st.lists(st.sampled_from([max_abs, -max_abs, 0.0]), max_size=3))
    flat = x.view(-1)
    flat[: len(pinned)] = torch.tensor(pinned, dtype=torch.float64)
    return x.to(dtype)


def _relax_tolerances(layer: torch.nn.Module, dtype: torch.dtype) -> None:
    """Give iterative inverses tolerances that ``dtype`` can meet (the cases use 1e-12)."""
    if dtype == torch.float64:
        return
    for module in layer.modules():
        if hasattr(module, "inverse_tol"):
            module.inverse_tol = 1e-6
        if isinstance(module, T.ResidualBlock):
            # float32 rounding in g stalls the fixed-point steps near 1e-5 in the deeper cases.
            module.inverse_atol = module.inverse_rtol = 1e-4


@cache
def _layer(name: str, dtype: torch.dtype) -> T.InvertibleModule:
    """The conformance case ``name`` built (deterministically) in ``dtype``, in eval mode."""
    case = next(c for c in CASES if c.name == name)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        layer = _prepared(case)
    finally:
        torch.set_default_dtype(previous)
    _relax_tolerances(layer, dtype)
    return layer


def _example_shape(case: Case) -> tuple[int, ...]:
    return tuple(case.sample(2).shape)


def _check_round(layer: T.InvertibleModule, x: Tensor) -> None:
    """Forward then inverse of the forward's output: finite or a clear error, each."""
    out = _finite_or_clear_error(lambda: layer(x))
    if out is not None:
        z, logdet = out
        assert logdet.shape == (x.shape[0],)
        _finite_or_clear_error(lambda: layer.inverse(z))


# The logit layer only takes [0, 1] (tested at its edges below); every other case gets large
# magnitudes. Inputs of at most 1e4 keep the fixed-point and bisection inverses cheap.
LARGE_INPUT_CASES = [c.name for c in CASES if c.kind is not T.LogitTransform]


@pytest.mark.parametrize("name", LARGE_INPUT_CASES)
@SETTINGS
@given(data=st.data(), dtype=DTYPES)
def test_every_layer_at_large_magnitudes(name: str, data: st.DataObject, dtype) -> None:
    layer = _layer(name, dtype)
    case = next(c for c in CASES if c.name == name)
    shape = _example_shape(case)
    with torch.no_grad():
        _check_round(layer, data.draw(_arrays(shape, dtype)))
        # The inverse also meets latents it did not produce: large ones, directly.
        z_shape = tuple(layer(case.sample(2).to(dtype))[0].shape)
        _finite_or_clear_error(lambda: layer.inverse(data.draw(_arrays(z_shape, dtype))))


# ---- required round trips at moderate magnitudes ----------------------------------------------

#: Layers that must invert every input with |x| ≤ 40: all but the logit (defined on [0, 1]) and
#: the ones that end in a sigmoid, which rounds to exactly 1 beyond x ≈ 37 in float64 (≈ 17 in
#: float32), where no inverse exists (``test_sigmoid_at_saturation`` requires the error there).
SATURATING = {
    "logit",
    "sigmoid",
    "variational-dequantization-noise-flow",
    "variational-dequantization-noise-flow-gathered",
}
ROUND_TRIP_CASES = [c.name for c in CASES if c.name not in SATURATING]
MODERATE = 40.0


def _iterative_tolerance(layer: torch.nn.Module) -> tuple[float, float]:
    """``(absolute, relative)`` stopping tolerance of the bisection / fixed-point inverses inside
    ``layer`` (zero for closed-form inverses)."""
    atol = rtol = 0.0
    for module in layer.modules():
        atol = max(atol, getattr(module, "inverse_tol", 0.0), getattr(module, "inverse_atol", 0.0))
        rtol = max(rtol, getattr(module, "inverse_rtol", 0.0))
    return float(atol), float(rtol)


@cache
def _layer64(name: str, dtype: torch.dtype) -> T.InvertibleModule:
    """The layer ``_layer(name, dtype)`` with its parameters cast (exactly) to float64."""
    return copy.deepcopy(_layer(name, dtype)).double()


def _jacobians(layer: T.InvertibleModule, x: Tensor) -> Tensor:
    """Per-example autograd Jacobians ``∂z_i/∂x_i`` of ``layer`` at ``x``, shape ``[N, D, D]``."""

    def flat(v: Tensor) -> Tensor:
        return layer(v)[0].reshape(v.shape[0], -1)

    n, d = x.shape[0], x[0].numel()
    jac = torch.autograd.functional.jacobian(flat, x).reshape(n, -1, n, d)
    return torch.stack([jac[i, :, i, :] for i in range(n)])


@pytest.mark.parametrize("name", ROUND_TRIP_CASES)
@SETTINGS
@given(data=st.data(), dtype=DTYPES)
def test_every_layer_inverts_inputs_up_to_40(name: str, data: st.DataObject, dtype) -> None:
    """Up to |x| = 40 forward and inverse must succeed, with a round trip as exact as the
    problem allows. Oracle: forward-error analysis with the autograd Jacobian ``J`` of the layer,
    ``‖x̂ - x‖ ≤ 100 ε ((1 + ‖z‖) / σ_min(J) + 1 + ‖x‖) + 20 √D (atol + rtol (1 + ‖x‖))`` (the
    second term: the stopping tolerance of iterative inverses), and ``slogdet(J)`` for the
    reported log-det. ``J`` is taken in float64 (the layer's parameters cast exactly), so that it
    does not underflow where the layer's log-space log-det does not; where it still does (a map
    numerically flat at that x), σ_min = 0 leaves that example's round trip unconstrained and
    its log-det unchecked."""
    layer = _layer(name, dtype)
    case = next(c for c in CASES if c.name == name)
    x = data.draw(_arrays(_example_shape(case), dtype, max_abs=MODERATE))
    with torch.no_grad():
        z, logdet = layer(x)
        back = layer.inverse(z)
    assert torch.isfinite(z).all() and torch.isfinite(logdet).all() and torch.isfinite(back).all()
    jac = _jacobians(_layer64(name, dtype), x.double())
    n, d = x.shape[0], x[0].numel()
    x_norm = x.double().reshape(n, -1).norm(dim=1)
    z_norm = z.double().reshape(n, -1).norm(dim=1)
    sigma_min = torch.linalg.svdvals(jac)[:, -1]
    eps = torch.finfo(dtype).eps
    atol, rtol = _iterative_tolerance(layer)
    bound = 100 * eps * ((1 + z_norm) / sigma_min + 1 + x_norm)
    bound += 20 * math.sqrt(d) * (atol + rtol * (1 + x_norm))
    error = (back - x).double().reshape(n, -1).norm(dim=1)
    assert (error <= bound).all(), f"round-trip error {error.tolist()} > bound {bound.tolist()}"
    tol = 1e-7 if dtype == torch.float64 else 1e-3
    expected = torch.linalg.slogdet(jac)[1]
    resolved = torch.isfinite(expected)
    torch.testing.assert_close(logdet.double()[resolved], expected[resolved], atol=tol, rtol=tol)


EDGES_01 = (0.0, 1e-45, 1e-30, 1e-12, 1e-7, 0.5, 1 - 1e-7, 1 - 1e-12, 1.0, 1 + 1e-12, -1e-12)


@SETTINGS
@given(
    edges=st.lists(st.sampled_from(EDGES_01), min_size=1, max_size=6),
    alpha=st.sampled_from([0.0, 1e-12, 1e-6, 1e-3, 0.05]),
    dtype=DTYPES,
)
def test_logit_transform_at_zero_and_one(edges: list[float], alpha: float, dtype) -> None:
    layer = T.LogitTransform(alpha)
    x = torch.tensor(edges, dtype=dtype).view(1, 1, 1, -1)
    out = _finite_or_clear_error(lambda: layer(x))
    if out is not None:
        assert ((x >= 0) & (x <= 1)).all()
        back = _finite_or_clear_error(lambda: layer.inverse(out[0]))
        assert back is not None and ((back >= 0) & (back <= 1)).all()
    else:  # it refuses only what it cannot map: outside [0, 1], or the ends without a margin
        assert (x < 0).any() or (x > 1).any() or (x == 0).any() or (x == 1).any()
    # Any latent maps back into [0, 1].
    z = torch.tensor([-1e4, -40.0, 0.0, 40.0, 1e4], dtype=dtype).view(1, 1, 1, -1)
    back = _finite_or_clear_error(lambda: layer.inverse(z))
    assert back is not None and ((back >= 0) & (back <= 1)).all()


@SETTINGS
@given(values=st.lists(st.sampled_from([-1e4, -40.0, -1.0, 0.0, 1.0, 40.0, 1e4])), dtype=DTYPES)
def test_sigmoid_at_saturation(values: list[float], dtype) -> None:
    layer = T.Sigmoid()
    x = torch.tensor([0.0, *values], dtype=dtype).view(1, -1)
    out = _finite_or_clear_error(lambda: layer(x))
    assert out is not None, "the sigmoid is defined everywhere"
    u, logdet = out
    # Saturated outputs (exactly 0 or 1) have no inverse: that must be an error, never ±∞.
    back = _finite_or_clear_error(lambda: layer.inverse(u))
    assert (back is None) == bool(((u == 0) | (u == 1)).any())
    assert (logdet <= 0).all()


# ---- mixture-of-logistics CDF (Flow++) ----------------------------------------------------------


@st.composite
def _mixture(draw, dtype: torch.dtype, n: int = 16, k: int = 3):
    """Mixture parameters with log-scales at the clamp and large, peaked or flat weights."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    big_log_scale = 15.0 if dtype == torch.float32 else 50.0
    log_scales = torch.empty(n, k, dtype=torch.float64).uniform_(
        LOG_SCALE_MIN - 3, big_log_scale, generator=gen
    )
    pinned = draw(st.sampled_from([None, LOG_SCALE_MIN, LOG_SCALE_MIN - 50, big_log_scale]))
    if pinned is not None:
        log_scales[:, draw(st.integers(0, k - 1))] = pinned
    means = draw(st.sampled_from([1.0, 1e3])) * torch.randn(
        n, k, generator=gen, dtype=torch.float64
    )
    logits = draw(st.sampled_from([0.0, 1.0, 60.0])) * torch.randn(
        n, k, generator=gen, dtype=torch.float64
    )
    targets = torch.empty(n, dtype=torch.float64).uniform_(-1, 1, generator=gen) * draw(
        st.sampled_from([1.0, 30.0, 1e3])
    )
    return [t.to(dtype) for t in (targets, logits, means, log_scales)]


@SETTINGS
@given(data=st.data(), dtype=DTYPES)
def test_mixture_inverse_cdf_in_the_tails(data: st.DataObject, dtype) -> None:
    y, *params = data.draw(_mixture(dtype))
    params = [p.requires_grad_(True) for p in params]
    x = _finite_or_clear_error(lambda: T.mixture_inverse_cdf(y, *params, tol=1e-6))
    if x is None:
        return
    # The forward map (logit-CDF and log-density) and the implicit gradients are finite there.
    log_cdf, log_sf = T.mixture_log_cdf(x.detach(), *params)
    log_pdf = T.mixture_log_pdf(x.detach(), *params)
    assert torch.isfinite(log_cdf - log_sf).all() and torch.isfinite(log_pdf).all()
    grads = torch.autograd.grad(x.sum(), params)
    assert all(torch.isfinite(g).all() for g in grads)


@SETTINGS
@given(data=st.data(), dtype=DTYPES)
def test_mixture_inverse_cdf_rejects_non_finite_targets(data: st.DataObject, dtype) -> None:
    y, *params = data.draw(_mixture(dtype))
    y[data.draw(st.integers(0, len(y) - 1))] = data.draw(st.sampled_from([math.inf, math.nan]))
    with pytest.raises(ValueError, match="finite"):
        T.mixture_inverse_cdf(y, *params)


# ---- DSF / DDSF transformers (NAF) --------------------------------------------------------------

K, L = 3, 2


@st.composite
def _pseudo_params(draw, kind: str, dtype: torch.dtype, n: int) -> Tensor:
    """Packed DSF/DDSF pseudo-parameters with large ``a``, large ``b`` and peaked weights."""
    size = T.dsf_num_params(K) if kind == "dsf" else T.ddsf_num_params(K, L)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    p = draw(st.sampled_from([1.0, 5.0, 60.0, 1e3])) * torch.randn(
        n, size, generator=gen, dtype=torch.float64
    )
    # Per layer: a_raw (K) | b (K) | mixing logits; push the a and b blocks to extremes.
    a_value = draw(st.sampled_from([None, -60.0, 50.0, 1e3]))
    b_value = draw(st.sampled_from([None, -1e3, 1e3]))
    start = 0
    for layer in range(1 if kind == "dsf" else L):
        if a_value is not None:
            p[:, start : start + K] = a_value
        if b_value is not None:
            p[:, start + K : start + 2 * K] = b_value * torch.linspace(-1, 1, K)
        d_in = 1 if layer == 0 else K
        d_out = 1 if kind == "dsf" or layer == L - 1 else K
        start += 2 * K + (K * d_in if d_in > 1 else 0) + d_out * K
    return p.to(dtype)


def _transformer(kind: str, params: Tensor) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    if kind == "dsf":
        return lambda x: T.dsf_transform(x, params)
    return lambda x: T.ddsf_transform(x, params, K, L)


@pytest.mark.parametrize("kind", ["dsf", "ddsf"])
@SETTINGS
@given(data=st.data(), dtype=DTYPES)
def test_dsf_ddsf_extreme_pseudo_parameters(kind: str, data: st.DataObject, dtype) -> None:
    n = 8
    params = data.draw(_pseudo_params(kind, dtype, n)).requires_grad_(True)
    fn = _transformer(kind, params)
    x = data.draw(_arrays((n,), dtype))
    out = _finite_or_clear_error(lambda: fn(x))
    assert out is not None, "the transformers are finite for every finite input"
    y = out[0].detach()
    # Inverse by bisection, with implicit gradients: finite, or a clear error.
    x_back = _finite_or_clear_error(lambda: T.monotone_bisection(fn, y, tol=1e-6))
    if x_back is not None:
        (grad,) = torch.autograd.grad(x_back.sum(), params)
        assert torch.isfinite(grad).all()


# ---- residual blocks at the Lipschitz bound ----------------------------------------------------


@cache
def _residual_at_bound(kind: str, coeff: float, dtype: torch.dtype) -> T.ResidualBlock:
    """A block whose normalized layers sit exactly at ``coeff`` (weights scaled far beyond)."""
    torch.manual_seed(0)
    if kind == "mlp":
        net = LipschitzMLP(4, 8, coeff=coeff)
    else:
        net = LipschitzConvNet(2, 4, (3, 3), coeff=coeff)
    net = net.to(dtype)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("weight"):
                p.mul_(1e3)
    refresh_lipschitz_layers(net)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    block = T.ResidualBlock(
        net, logdet="exact", inverse_atol=tol, inverse_rtol=tol, on_inverse_failure="raise"
    )
    return block.eval()


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@SETTINGS
@given(data=st.data(), coeff=st.sampled_from([0.9, 0.98, 0.99]), dtype=DTYPES)
def test_residual_block_at_lipschitz_bound(kind: str, data: st.DataObject, coeff, dtype) -> None:
    block = _residual_at_bound(kind, coeff, dtype)
    shape = (2, 4) if kind == "mlp" else (2, 2, 3, 3)
    x = data.draw(_arrays(shape, dtype))
    with torch.no_grad():
        _check_round(block, x)
        _finite_or_clear_error(lambda: block.inverse(data.draw(_arrays(shape, dtype))))
    # The implicit (DEQ) gradient of the inverse is finite too.
    z = data.draw(_arrays(shape, dtype)).requires_grad_(True)
    x_back = _finite_or_clear_error(lambda: block.inverse(z))
    if x_back is not None:
        (grad,) = torch.autograd.grad(x_back.sum(), z)
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@SETTINGS
@given(data=st.data(), coeff=st.sampled_from([0.9, 0.98, 0.99]), dtype=DTYPES)
def test_residual_block_at_lipschitz_bound_inverts_inputs_up_to_40(
    kind: str, data: st.DataObject, coeff, dtype
) -> None:
    """The fixed-point inverse of a contraction converges from any start, so up to |x| = 40 it
    must succeed (these blocks raise instead of warning). Oracle: the float64 autograd Jacobian
    ``J = I + J_g``, whose singular values lie in ``[1 - L, 1 + L]`` for ``L = coeff``; the
    Banach bound on a fixed point stopped at steps ≤ atol + rtol·|x|,
    ``‖x̂ - x‖ ≤ L/(1 - L) · √D · (atol + rtol · max|x|)``, plus rounding
    ``100 ε (1 + ‖z‖) / (1 - L)``; and ``slogdet(J)`` for the exact log-det."""
    block = _residual_at_bound(kind, coeff, dtype)
    shape = (2, 4) if kind == "mlp" else (2, 2, 3, 3)
    x = data.draw(_arrays(shape, dtype, max_abs=MODERATE))
    with torch.no_grad():
        z, logdet = block(x)
        back = block.inverse(z)
    assert torch.isfinite(z).all() and torch.isfinite(logdet).all() and torch.isfinite(back).all()
    jac = _jacobians(_residual64(kind, coeff, dtype), x.double())
    singular = torch.linalg.svdvals(jac)
    assert singular.min() >= 1 - coeff - 1e-6 and singular.max() <= 1 + coeff + 1e-6
    n, d = shape[0], math.prod(shape[1:])
    step = block.inverse_atol + block.inverse_rtol * x.double().reshape(n, -1).abs().amax(1)
    z_norm = z.double().reshape(n, -1).norm(dim=1)
    eps = torch.finfo(dtype).eps
    bound = (coeff * math.sqrt(d) * step + 100 * eps * (1 + z_norm)) / (1 - coeff)
    error = (back - x).double().reshape(n, -1).norm(dim=1)
    assert (error <= bound).all(), f"round-trip error {error.tolist()} > bound {bound.tolist()}"
    tol = 1e-7 if dtype == torch.float64 else 1e-3
    torch.testing.assert_close(logdet.double(), torch.linalg.slogdet(jac)[1], atol=tol, rtol=tol)


@cache
def _residual64(kind: str, coeff: float, dtype: torch.dtype) -> T.ResidualBlock:
    """``_residual_at_bound(kind, coeff, dtype)`` with its parameters cast (exactly) to float64."""
    return copy.deepcopy(_residual_at_bound(kind, coeff, dtype)).double()


# ---- dequantization ---------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [2, 17, 256, 1000, 65536])
@pytest.mark.parametrize("noise", [0.0, 1e-12, 0.5, 1 - 1e-7, 1 - 1e-16, 1.0, -1e-12])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_uniform_dequantization_at_level_edges(levels: int, noise: float, dtype) -> None:
    layer = T.UniformDequantization(levels)
    x = torch.tensor([0.0, levels // 2, levels - 1.0], dtype=dtype).view(3, 1)
    out = _finite_or_clear_error(lambda: layer(x, noise=noise))
    if out is None:  # noise outside [0, 1) once cast to dtype: the next level, refused
        assert not 0 <= torch.tensor(noise, dtype=dtype) < 1
        return
    y, _ = out
    assert ((y >= 0) & (y <= 1)).all()
    # floor(y·K) may land one level off only where u sits within rounding of a bin edge.
    back = layer.inverse(y)
    assert ((back - x).abs() <= (0 if noise == 0.5 else 1)).all()


@SETTINGS
@given(noise=st.sampled_from([1e-300, 1e-30, 1e-8, 0.5, 1 - 1e-8, 1 - 1e-16]), dtype=DTYPES)
def test_variational_dequantization_at_noise_edges(noise: float, dtype) -> None:
    layer = _variational(dtype)
    x = torch.tensor([0.0, 16.0], dtype=dtype).view(2, 1, 1, 1).expand(2, 2, 4, 4)
    with torch.no_grad():
        out = _finite_or_clear_error(lambda: layer(x, noise=noise))
    if out is not None:
        assert ((out[0] >= 0) & (out[0] <= 1)).all()


@cache
def _variational(dtype: torch.dtype) -> T.VariationalDequantization:
    torch.manual_seed(0)
    layer = T.VariationalDequantization(
        17, (2, 4, 4), num_couplings=2, hidden_channels=8, num_blocks=1, num_heads=2
    )
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return layer.to(dtype).eval()
