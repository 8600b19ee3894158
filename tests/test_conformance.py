"""Generic conformance suite: every public invertible layer of hybridflow, in float64.

For each registered case: inverse(forward(x)) ≈ x, log|det J| equals ``slogdet`` of the autograd
Jacobian, and in eval mode an example's output does not depend on the rest of the batch. In the
inverse direction: ``Inverse(layer)``'s log-det equals ``slogdet`` of the autograd Jacobian of
``layer.inverse``, and the inverse's gradients (parameters and input) match finite differences.
``test_every_public_layer_is_registered`` fails when a public layer has no case here.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from torch import Tensor, nn

import hybridflow
from hybridflow import transforms as T
from hybridflow.models import create_backbone, list_backbones
from hybridflow.nets import (
    MLP,
    ConvResNet,
    FlowppConditioner,
    LipschitzConvNet,
    LipschitzMLP,
    refresh_lipschitz_layers,
)

# Tiny layers launch many small kernels: one intra-op thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Case:
    """A layer factory and an input sampler for one conformance case."""

    name: str
    make: Callable[[], T.InvertibleModule]
    sample: Callable[[int], Tensor]
    kind: type = field(default=T.InvertibleModule)
    #: Elementwise scale of the latent's finite-difference step (inverse-gradient test), for
    #: latents that sit close to the edge of the inverse's domain.
    latent_step: Callable[[Tensor], Tensor] | None = None


def _images(c: int, h: int, w: int) -> Callable[[int], Tensor]:
    return lambda n: torch.randn(n, c, h, w)


def _small_conv(c_in: int, c_out: int) -> ConvResNet:
    return ConvResNet(c_in, c_out, hidden_channels=8, num_blocks=1)


def _small_mlp(c_in: int, c_out: int) -> MLP:
    return MLP(c_in, c_out, hidden_features=16, num_layers=2)


def _smooth_conv(c_in: int, c_out: int) -> nn.Module:
    """A conditioner without ReLU kinks: a kink within reach of the finite-difference stencil
    (1e-6 along a random direction of every parameter) makes the central difference disagree
    with autograd although both are right; the deeper multiscale cases hit one."""
    return nn.Sequential(
        nn.Conv2d(c_in, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, c_out, 3, padding=1)
    )


def _multiscale(factor_out: bool) -> T.MultiscaleFlow:
    blocks = [
        T.InvertibleSequential(
            T.AffineCoupling(1, "checkerboard", 0, _smooth_conv),
            T.ActNorm(1),
            T.Squeeze(),
            T.AffineCoupling(4, "channel", 1, _smooth_conv),
        ),
        T.InvertibleSequential(
            T.AffineCoupling(2 if factor_out else 4, "channel", 0, _smooth_conv)
        ),
    ]
    shapes = [(4, 2, 2), (2, 2, 2) if factor_out else (4, 2, 2)]
    return T.MultiscaleFlow(blocks, (1, 4, 4), shapes, factor_out=factor_out)


def _residual(net) -> T.ResidualBlock:
    # Exact log-dets here; the stochastic estimators are tested for unbiasedness in
    # test_residual.py. A tight inverse tolerance so the round trip meets 1e-8.
    return T.ResidualBlock(net, logdet="exact", inverse_atol=1e-12, inverse_rtol=0)


def _mixlogistic(*args, **kwargs) -> T.MixLogisticCoupling:
    # A tight bisection tolerance so the round trip meets 1e-8 (the default is 1e-6).
    return T.MixLogisticCoupling(*args, inverse_tol=1e-12, inverse_max_iter=200, **kwargs)


def _small_resflow(factor_out: bool) -> T.MultiscaleFlow:
    return create_backbone(
        "resflow",
        (1, 4, 4),
        num_scales=2,
        blocks_per_scale=1,
        hidden_channels=8,
        fc_blocks=1,
        fc_hidden=8,
        factor_out=factor_out,
        logdet="exact",
        inverse_atol=1e-12,
        inverse_rtol=0,
    )


class _ConstantContext(T.InvertibleModule):
    """Test adaptor: a conditional layer with one context shared by every example."""

    def __init__(self, layer: T.InvertibleModule, context: Tensor) -> None:
        super().__init__()
        self.layer = layer
        self.register_buffer("context", context)  # a buffer: it follows .to(dtype)

    def _ctx(self, x: Tensor) -> Tensor:
        return self.context.expand(x.shape[0], *self.context.shape[1:])

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.layer(x, self._ctx(x))

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        return self.layer.inverse(z, self._ctx(z))

    def inverse_and_logdet(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.layer.inverse_and_logdet(z, self._ctx(z))


def _dequant_noise_flow(checkerboard_layout: str = "masked") -> T.InvertibleModule:
    """The ε → u flow of variational dequantization, with a fixed context."""
    deq = T.VariationalDequantization(
        17,
        (2, 4, 4),
        num_couplings=3,  # two checkerboard and one channel coupling
        context_channels=3,
        hidden_channels=8,
        num_blocks=1,
        num_heads=2,
        num_components=3,
        inverse_tol=1e-12,
        inverse_max_iter=200,
        checkerboard_layout=checkerboard_layout,
    )
    return _ConstantContext(deq.noise_flow, torch.randn(1, 3, 4, 4))


def _vectors(d: int) -> Callable[[int], Tensor]:
    return lambda n: torch.randn(n, d)


CASES: list[Case] = [
    Case(
        "maf",
        lambda: T.MaskedAutoregressiveFlow(5, (16, 16), order="random", seed=1),
        _vectors(5),
        T.MaskedAutoregressiveFlow,
    ),
    Case(
        "iaf",
        lambda: T.InverseAutoregressiveFlow(5, (16, 16), order="reversed"),
        _vectors(5),
        T.InverseAutoregressiveFlow,
    ),
    Case(
        "maf-softplus",
        lambda: T.MaskedAutoregressiveFlow(5, (16, 16), order="random", seed=1, affine="softplus"),
        _vectors(5),
        T.MaskedAutoregressiveFlow,
    ),
    Case(
        "iaf-softplus",
        lambda: T.InverseAutoregressiveFlow(5, (16, 16), order="reversed", affine="softplus"),
        _vectors(5),
        T.InverseAutoregressiveFlow,
    ),
    Case("permutation", lambda: T.Permutation.random(6, seed=3), _vectors(6), T.Permutation),
    # The IAF posteriors of variational inference (NAF paper §5.2; Kingma et al. 2016): layers
    # conditioned on an encoder's context h, with the sampling direction as the cheap one.
    Case(
        "iaf-context",
        lambda: _ConstantContext(
            T.InverseAutoregressiveFlow(5, (16, 16), context_features=3), torch.randn(1, 3)
        ),
        _vectors(5),
    ),
    Case(
        "iaf-dsf-context",
        lambda: _ConstantContext(
            T.Inverse(
                T.NeuralAutoregressiveFlow(
                    4, "dsf", 4, hidden_features=(16,), context_features=3, inverse_tol=1e-12
                )
            ),
            torch.randn(1, 3),
        ),
        _vectors(4),
    ),
    Case(
        "naf-dsf",
        lambda: T.NeuralAutoregressiveFlow(
            4, "dsf", 4, hidden_features=(16, 16), order="random", inverse_tol=1e-12
        ),
        _vectors(4),
        T.NeuralAutoregressiveFlow,
    ),
    Case(
        "naf-ddsf",
        lambda: T.NeuralAutoregressiveFlow(
            3, "ddsf", 3, num_layers=2, hidden_features=(16,), inverse_tol=1e-12
        ),
        _vectors(3),
        T.NeuralAutoregressiveFlow,
    ),
    Case(
        "naf-coupling-checkerboard-masked",
        lambda: T.NAFCoupling(
            2, 4, "checkerboard", 1, _small_conv, inverse_tol=1e-12, checkerboard_layout="masked"
        ),
        _images(2, 4, 4),
        T.NAFCoupling,
    ),
    Case(
        "naf-coupling-checkerboard-gathered",
        lambda: T.NAFCoupling(
            2, 4, "checkerboard", 0, _small_conv, inverse_tol=1e-12, checkerboard_layout="gathered"
        ),
        _images(2, 3, 4),
        T.NAFCoupling,
    ),
    Case(
        "naf-coupling-channel-vector",
        lambda: T.NAFCoupling(4, 3, "channel", 0, _small_mlp, spatial=False, inverse_tol=1e-12),
        _vectors(4),
        T.NAFCoupling,
    ),
    Case(
        "maf-stack",
        lambda: T.autoregressive_stack(
            4, 3, flow="maf", permutation="random", hidden_features=(8,)
        ),
        _vectors(4),
        T.InvertibleSequential,
    ),
    Case("sigmoid", T.Sigmoid, lambda n: 3 * torch.randn(n, 2, 3), T.Sigmoid),
    # Small noise keeps the sigmoid out of saturation, where logit(σ(h)) loses digits (~eps·e^|h|).
    # Its latents (sigmoid outputs) come within 1e-8 of 0 and 1: FD steps scale with u(1 - u).
    Case(
        "variational-dequantization-noise-flow",
        _dequant_noise_flow,
        lambda n: 0.5 * torch.randn(n, 2, 4, 4),
        latent_step=lambda u: u * (1 - u),
    ),
    Case(
        "variational-dequantization-noise-flow-gathered",
        lambda: _dequant_noise_flow("gathered"),
        lambda n: 0.5 * torch.randn(n, 2, 4, 4),
        latent_step=lambda u: u * (1 - u),
    ),
    Case("actnorm-image", lambda: T.ActNorm(3), _images(3, 2, 2), T.ActNorm),
    Case("actnorm-vector", lambda: T.ActNorm(5), lambda n: torch.randn(n, 5), T.ActNorm),
    Case(
        "actnorm-per-feature",
        lambda: T.ActNorm(3, feature_shape=(3, 2, 2)),
        _images(3, 2, 2),
        T.ActNorm,
    ),
    Case("squeeze", lambda: T.Squeeze(2), _images(2, 4, 2), T.Squeeze),
    Case(
        "coupling-checkerboard-masked",
        lambda: T.AffineCoupling(2, "checkerboard", 1, _small_conv, checkerboard_layout="masked"),
        _images(2, 3, 3),
        T.AffineCoupling,
    ),
    Case(
        "coupling-checkerboard-gathered",
        lambda: T.AffineCoupling(2, "checkerboard", 1, _small_conv, checkerboard_layout="gathered"),
        _images(2, 3, 4),
        T.AffineCoupling,
    ),
    Case(
        "coupling-channel-odd",
        lambda: T.AffineCoupling(3, "channel", 1, _small_conv),
        _images(3, 2, 2),
        T.AffineCoupling,
    ),
    Case(
        "coupling-vector",
        lambda: T.AffineCoupling(5, "channel", 0, _small_mlp, spatial=False),
        lambda n: torch.randn(n, 5),
        T.AffineCoupling,
    ),
    Case(
        "coupling-additive",
        lambda: T.AffineCoupling(2, "checkerboard", 0, _small_conv, additive=True),
        _images(2, 3, 4),
        T.AffineCoupling,
    ),
    Case(
        "mixlogistic-checkerboard-masked",
        lambda: _mixlogistic(2, 3, "checkerboard", 1, _small_conv, checkerboard_layout="masked"),
        _images(2, 3, 3),
        T.MixLogisticCoupling,
    ),
    Case(
        "mixlogistic-checkerboard-gathered",
        lambda: _mixlogistic(2, 3, "checkerboard", 0, _small_conv, checkerboard_layout="gathered"),
        _images(2, 3, 4),
        T.MixLogisticCoupling,
    ),
    Case(
        "mixlogistic-flowpp-conditioner",
        lambda: _mixlogistic(
            4,
            2,
            "channel",
            0,
            lambda i, o: FlowppConditioner(
                i, o, (2, 2), hidden_channels=4, num_blocks=1, num_heads=2
            ),
        ),
        _images(4, 2, 2),
        T.MixLogisticCoupling,
    ),
    Case(
        "mixlogistic-vector",
        lambda: _mixlogistic(5, 4, "channel", 1, _small_mlp, spatial=False),
        lambda n: torch.randn(n, 5),
        T.MixLogisticCoupling,
    ),
    Case("conv1x1-lu", lambda: T.InvertibleConv1x1(3), _images(3, 2, 2), T.InvertibleConv1x1),
    Case(
        "conv1x1-plain",
        lambda: T.InvertibleConv1x1(3, lu=False),
        _images(3, 2, 2),
        T.InvertibleConv1x1,
    ),
    Case(
        "conv1x1-vector",
        lambda: T.InvertibleConv1x1(4, spatial=False),
        lambda n: torch.randn(n, 4),
        T.InvertibleConv1x1,
    ),
    Case(
        "logit",
        lambda: T.LogitTransform(0.05),
        lambda n: torch.rand(n, 1, 2, 3) * 0.98 + 0.01,
        T.LogitTransform,
    ),
    Case(
        "sequential",
        lambda: T.InvertibleSequential(
            T.ActNorm(2), T.AffineCoupling(2, "channel", 0, _small_mlp, spatial=False)
        ),
        lambda n: torch.randn(n, 2),
        T.InvertibleSequential,
    ),
    Case(
        "inverse-coupling",
        lambda: T.Inverse(T.AffineCoupling(4, "channel", 1, _small_mlp, spatial=False)),
        lambda n: torch.randn(n, 4),
        T.Inverse,
    ),
    Case(
        "residual-mlp",
        lambda: _residual(LipschitzMLP(4, 8)),
        lambda n: torch.randn(n, 4),
        T.ResidualBlock,
    ),
    Case(
        "residual-conv-induced",
        lambda: _residual(
            LipschitzConvNet(2, 6, (3, 3), activation="elu", norm="induced", norm_ord=3.0)
        ),
        _images(2, 3, 3),
        T.ResidualBlock,
    ),
    Case("resflow", lambda: _small_resflow(False), _images(1, 4, 4), T.MultiscaleFlow),
    Case("resflow-factor-out", lambda: _small_resflow(True), _images(1, 4, 4), T.MultiscaleFlow),
    Case(
        "coupling-backbone-factor-out",
        lambda: create_backbone(
            "coupling",
            (1, 4, 4),
            num_scales=2,
            blocks_per_scale=2,
            hidden_channels=8,
            factor_out=True,
        ),
        _images(1, 4, 4),
        T.MultiscaleFlow,
    ),
    Case(
        "coupling-1x1-backbone",
        lambda: create_backbone(
            "coupling+1x1", (1, 4, 4), num_scales=2, blocks_per_scale=2, hidden_channels=8
        ),
        _images(1, 4, 4),
        T.MultiscaleFlow,
    ),
    Case(
        "coupling-1x1-vector-backbone",
        lambda: create_backbone("coupling+1x1", (5,), blocks_per_scale=3, hidden_channels=8),
        lambda n: torch.randn(n, 5),
        T.MultiscaleFlow,
    ),
    Case(
        "flowpp-backbone",
        lambda: create_backbone(
            "flowpp-cpu",
            (1, 4, 4),
            checkerboard_steps=(1, 1),
            channel_steps=1,
            hidden_channels=4,
            num_blocks=1,
            num_heads=2,
            num_components=2,
            inverse_tol=1e-12,
            inverse_max_iter=200,
        ),
        _images(1, 4, 4),
        T.MultiscaleFlow,
    ),
    Case("multiscale-factor-out", lambda: _multiscale(True), _images(1, 4, 4), T.MultiscaleFlow),
    Case(
        "multiscale-no-factor-out", lambda: _multiscale(False), _images(1, 4, 4), T.MultiscaleFlow
    ),
]


# ---- every registered backbone, tiny ----------------------------------------------------------


def _tight_inverses(flow: T.InvertibleModule) -> T.InvertibleModule:
    """Bisection inverses to 1e-12 (builders without the keyword leave the 1e-6 default), so the
    round trip can meet 1e-8."""
    for module in flow.modules():
        if hasattr(module, "inverse_tol"):
            module.inverse_tol = 1e-12
            module.inverse_max_iter = max(module.inverse_max_iter, 200)
    return flow


def _backbone(name: str, shape: tuple[int, ...], **kwargs) -> Case:
    """A conformance case of ``create_backbone(name, shape, **kwargs)``."""
    return Case(
        name,
        lambda: _tight_inverses(create_backbone(name, shape, **kwargs)),
        lambda n: torch.randn(n, *shape),
        T.MultiscaleFlow,
    )


#: Residual flows with exact log-dets (the paper's roulette estimator is stochastic) and a tight
#: fixed-point inverse; tiny sizes for the named variants sized for MNIST and CIFAR-10.
_RESFLOW_TINY = {
    "num_scales": 2,
    "blocks_per_scale": 1,
    "hidden_channels": 8,
    "fc_blocks": 1,
    "fc_hidden": 8,
    "logdet": "exact",
    "inverse_atol": 1e-12,
    "inverse_rtol": 0,
}
_FLOWPP_TINY = {
    "checkerboard_steps": (1, 1),
    "channel_steps": 1,
    "hidden_channels": 4,
    "num_blocks": 1,
    "num_heads": 2,
    "num_components": 2,
    "dropout": 0.0,
}
_RESFLOW_FC_ONLY = {**_RESFLOW_TINY, "num_scales": 1, "blocks_per_scale": 0}
_COUPLING_TINY = {"num_scales": 2, "blocks_per_scale": 2, "hidden_channels": 8}
_REALNVP_TINY = {
    "couplings_per_scale": 1,
    "final_couplings": 1,
    "hidden_channels": 8,
    "num_res_blocks": 1,
}
_NAF_TINY = {"num_flows": 2, "num_units": 4, "hidden_features": 16, "made_layers": 1}
_AR_TINY = {"num_flows": 2, "hidden_features": (16, 16)}

#: (test id, case) for every name in ``list_backbones()``: images of 1×4×4 or 2×4×4 and vectors
#: of 4 to 6 dimensions, so the autograd Jacobian stays at most 32×32.
BACKBONE_CASES: list[tuple[str, Case]] = [
    ("coupling", _backbone("coupling", (1, 4, 4), **_COUPLING_TINY)),
    ("coupling-additive", _backbone("coupling", (2, 4, 4), additive=True, **_COUPLING_TINY)),
    ("coupling-vector", _backbone("coupling", (5,), blocks_per_scale=2, hidden_channels=8)),
    ("coupling+1x1", _backbone("coupling+1x1", (1, 4, 4), factor_out=True, **_COUPLING_TINY)),
    ("flowpp", _backbone("flowpp", (1, 4, 4), **_FLOWPP_TINY)),
    # Flow++ ablations (Ho et al. 2019, Table 2): affine couplings, no attention, no 1×1 conv.
    ("flowpp-affine", _backbone("flowpp", (1, 4, 4), coupling="affine", **_FLOWPP_TINY)),
    ("flowpp-no-attention", _backbone("flowpp", (1, 4, 4), attention=False, **_FLOWPP_TINY)),
    ("flowpp-no-conv1x1", _backbone("flowpp", (2, 4, 4), conv1x1=False, **_FLOWPP_TINY)),
    ("flowpp-cifar10", _backbone("flowpp-cifar10", (1, 4, 4), **_FLOWPP_TINY)),
    ("flowpp-cpu", _backbone("flowpp-cpu", (1, 4, 4), **_FLOWPP_TINY)),
    ("maf", _backbone("maf", (5,), **_AR_TINY)),
    ("maf-tanh-actnorm", _backbone("maf", (5,), affine="tanh", actnorm=True, **_AR_TINY)),
    ("iaf", _backbone("iaf", (4,), permutation="random", **_AR_TINY)),
    ("iaf-softplus", _backbone("iaf", (4,), affine="softplus", **_AR_TINY)),
    ("naf-dsf", _backbone("naf", (4,), transformer="dsf", **_NAF_TINY)),
    ("naf-ddsf", _backbone("naf", (4,), transformer="ddsf", num_layers=2, **_NAF_TINY)),
    ("naf-coupling", _backbone("naf-coupling", (1, 4, 4), num_units=4, **_COUPLING_TINY)),
    ("naf-coupling-vector", _backbone("naf-coupling", (6,), num_units=4, hidden_channels=8)),
    ("realnvp", _backbone("realnvp", (1, 4, 4), **_REALNVP_TINY)),
    ("realnvp-vector", _backbone("realnvp-vector", (4,), num_couplings=3, hidden_features=8)),
    ("resflow", _backbone("resflow", (1, 4, 4), **_RESFLOW_TINY)),
    ("resflow-vector", _backbone("resflow", (6,), **_RESFLOW_TINY)),
    ("resflow-cifar10", _backbone("resflow-cifar10", (2, 4, 4), **_RESFLOW_TINY)),
    ("resflow-cpu", _backbone("resflow-cpu", (1, 4, 4), **_RESFLOW_TINY)),
    # resflow-digits: fully connected blocks only, on the squeezed input.
    ("resflow-digits", _backbone("resflow-digits", (1, 4, 4), **_RESFLOW_FC_ONLY)),
    ("resflow-mnist", _backbone("resflow-mnist", (1, 4, 4), **_RESFLOW_TINY)),
]


def test_every_registered_backbone_has_a_conformance_case() -> None:
    covered = {case.name for _, case in BACKBONE_CASES}
    missing = sorted(set(list_backbones()) - covered)
    assert not missing, f"backbones without a conformance case: {missing}"
    assert len({key for key, _ in BACKBONE_CASES}) == len(BACKBONE_CASES)


@pytest.mark.parametrize("case", [c for _, c in BACKBONE_CASES], ids=[k for k, _ in BACKBONE_CASES])
def test_backbone_round_trip_and_logdet(case: Case) -> None:
    """Oracle: the input itself, and ``slogdet`` of the autograd Jacobian, in float64."""
    flow = _prepared(case)
    x = case.sample(2)
    assert x[0].numel() <= 64
    z, logdet = flow(x)
    assert logdet.shape == (2,) and torch.isfinite(z).all() and torch.isfinite(logdet).all()
    torch.testing.assert_close(flow.inverse(z), x, atol=1e-8, rtol=1e-6)
    expected = _per_example_jacobian_logdets(lambda v: flow(v)[0], x)
    torch.testing.assert_close(logdet, expected, atol=1e-8, rtol=1e-6)
    one_z, one_logdet = flow(x[1:])  # eval mode: an example's output ignores the batch
    torch.testing.assert_close(one_z, z[1:])
    torch.testing.assert_close(one_logdet, logdet[1:])


# Surjective layers are checked separately below (round trip on the discrete data only).
SURJECTIVE: set[type] = {T.UniformDequantization, T.VariationalDequantization}


def _prepared(case: Case) -> T.InvertibleModule:
    """Build a layer, run data-dependent init, then move parameters away from the identity."""
    layer = case.make()
    layer.train()
    layer.data_init(case.sample(16))
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.2 * torch.randn_like(p))
    refresh_lipschitz_layers(layer)  # moved weights need fresh power-iteration vectors
    return layer.eval()


def _per_example_jacobian_logdets(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``log|det ∂fn(x)_i/∂x_i|`` per example from the autograd Jacobian of a batched map."""

    def flat(inp: Tensor) -> Tensor:
        return fn(inp).reshape(inp.shape[0], -1)

    jac = torch.autograd.functional.jacobian(flat, x)  # [N, Dout, N, *in]
    n, d = x.shape[0], x[0].numel()
    jac = jac.reshape(n, -1, n, d)
    blocks = torch.stack([jac[i, :, i, :] for i in range(n)])
    sign, logabsdet = torch.linalg.slogdet(blocks)
    assert torch.all(sign != 0), "singular Jacobian"
    return logabsdet


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_round_trip(case: Case) -> None:
    layer = _prepared(case)
    x = case.sample(4)
    z, logdet = layer(x)
    assert logdet.shape == (4,)
    assert torch.isfinite(z).all() and torch.isfinite(logdet).all()
    torch.testing.assert_close(layer.inverse(z), x, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_logdet_matches_autograd_slogdet(case: Case) -> None:
    layer = _prepared(case)
    x = case.sample(3)
    _, logdet = layer(x)
    torch.testing.assert_close(
        logdet, _per_example_jacobian_logdets(lambda v: layer(v)[0], x), atol=1e-8, rtol=1e-6
    )


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_eval_output_independent_of_batch(case: Case) -> None:
    layer = _prepared(case)
    x = case.sample(5)
    z_all, ld_all = layer(x)
    z_one, ld_one = layer(x[2:3])
    torch.testing.assert_close(z_all[2:3], z_one)
    torch.testing.assert_close(ld_all[2:3], ld_one)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_inverse_logdet_matches_autograd_slogdet(case: Case) -> None:
    """``Inverse(layer)`` reports ``log|det ∂x/∂z|``: the Jacobian of ``layer.inverse`` must
    agree, which needs the inverse to be differentiable in its input (bisection, fixed point)."""
    layer = _prepared(case)
    z = layer(case.sample(2))[0].detach()
    _, logdet = T.Inverse(layer)(z)
    torch.testing.assert_close(
        logdet, _per_example_jacobian_logdets(layer.inverse, z), atol=1e-8, rtol=1e-6
    )


def directional_derivatives(
    loss: Callable[[], Tensor],
    tensors: list[Tensor],
    eps: float = 1e-6,
    scale: Callable[[Tensor], Tensor] | None = None,
) -> tuple[float, float]:
    """``(autograd, finite difference)`` derivative of ``loss()`` along a random direction.

    Shared by the inverse-gradient tests of other modules. Five-point central stencil (error
    O(ε⁴)): inverses of saturating maps (a sigmoid near 0 or 1) are curved enough that the
    plain central difference is off in the fifth digit. ``scale`` scales the direction
    elementwise (a function of each tensor).
    """
    directions = [
        torch.randn_like(t) * (1 if scale is None else scale(t.detach())) for t in tensors
    ]
    grads = torch.autograd.grad(loss(), tensors, allow_unused=True)
    auto = sum(
        float((g * d).sum()) for g, d in zip(grads, directions, strict=True) if g is not None
    )
    saved = [t.detach().clone() for t in tensors]

    def at(step: float) -> float:
        with torch.no_grad():
            for t, t0, d in zip(tensors, saved, directions, strict=True):
                t.copy_(t0 + step * d)
            return float(loss())

    fd = (8 * (at(eps) - at(-eps)) - (at(2 * eps) - at(-2 * eps))) / (12 * eps)
    at(0.0)
    return auto, fd


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_inverse_and_logdet_matches_the_inverse_and_autograd(case: Case) -> None:
    """``inverse_and_logdet(z)`` (reverse-KL fitting's sampling direction) returns
    ``inverse(z)`` and ``slogdet`` of its autograd Jacobian, whether a layer overrides it (IAF,
    ``Inverse``, containers) or inherits the default."""
    layer = _prepared(case)
    z = layer(case.sample(2))[0].detach()
    x, logdet = layer.inverse_and_logdet(z)
    torch.testing.assert_close(x, layer.inverse(z), atol=1e-8, rtol=1e-6)
    torch.testing.assert_close(
        logdet, _per_example_jacobian_logdets(layer.inverse, z), atol=1e-8, rtol=1e-6
    )


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_inverse_gradients_match_finite_differences(case: Case) -> None:
    """``L = ⟨w, layer.inverse(z)⟩``: autograd against central differences, separately along a
    random direction of all parameters and of ``z`` (implicit gradients of iterative inverses)."""
    layer = _prepared(case)
    x = case.sample(3)
    z = layer(x)[0].detach().requires_grad_(True)
    w = torch.randn_like(x)

    def loss() -> Tensor:
        return (w * layer.inverse(z)).sum()

    out = layer.inverse(z)
    assert out.requires_grad, "the inverse is cut off from the autograd graph"
    params = [p for p in layer.parameters() if p.requires_grad]
    for tensors, scale in ((params, None), ([z], case.latent_step)):
        if not tensors:
            continue
        auto, fd = directional_derivatives(loss, tensors, scale=scale)
        assert auto == pytest.approx(fd, rel=1e-5, abs=1e-6), (
            f"autograd {auto:.10g} vs finite differences {fd:.10g}"
        )


def test_uniform_dequantization_is_a_surjection_with_exact_logdet() -> None:
    layer = T.UniformDequantization(17)
    x = torch.randint(0, 17, (6, 1, 2, 2)).to(torch.get_default_dtype())
    y, _ = layer(x)
    assert torch.all((y >= 0) & (y < 1))
    torch.testing.assert_close(layer.inverse(y), x)
    # For fixed noise the map is affine: compare with the autograd Jacobian on continuous input.
    noise = torch.rand(3, 1, 2, 2)
    xc = torch.rand(3, 1, 2, 2) * 16
    fixed = T.UniformDequantization(17)
    jac_logdet = _per_example_jacobian_logdets(lambda v: _FixedNoise(fixed, noise)(v)[0], xc)
    torch.testing.assert_close(fixed(xc, noise=noise)[1], jac_logdet)
    with pytest.raises(ValueError, match="integer levels"):
        layer(torch.full((1, 1, 2, 2), 17.0))


def test_variational_dequantization_is_a_surjection_and_rejects_bad_levels() -> None:
    layer = T.VariationalDequantization(17, (2, 4, 4), hidden_channels=8, num_blocks=1, num_heads=2)
    x = torch.randint(0, 17, (6, 2, 4, 4))
    y, _ = layer(x)
    assert torch.all((y >= 0) & (y < 1))
    torch.testing.assert_close(layer.inverse(y), x.to(y.dtype))
    with pytest.raises(ValueError, match="integer levels"):
        layer(torch.full((1, 2, 4, 4), -1.0))
    with pytest.raises(ValueError, match="shape"):
        layer(torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="image inputs"):
        T.VariationalDequantization(17, (64,))


class _FixedNoise(T.InvertibleModule):
    """Test adaptor: a dequantizer with its noise held fixed (an affine bijection)."""

    def __init__(self, layer: T.UniformDequantization, noise: Tensor) -> None:
        super().__init__()
        self.layer, self.noise = layer, noise

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.layer(x, noise=self.noise[: x.shape[0]])


def _public_invertible_classes() -> set[type]:
    found: set[type] = set()
    for info in pkgutil.walk_packages(hybridflow.__path__, prefix="hybridflow."):
        module = importlib.import_module(info.name)
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name, None)
            if (
                inspect.isclass(obj)
                and issubclass(obj, T.InvertibleModule)
                and obj is not T.InvertibleModule
                and obj.__module__.startswith("hybridflow.")
            ):
                found.add(obj)
    return found


def test_every_public_layer_is_registered() -> None:
    covered = {case.kind for case in CASES} | SURJECTIVE
    # Shared bases that define no forward of their own (MaskedCoupling) are not layers.
    layers = {c for c in _public_invertible_classes() if "forward" in vars(c)}
    missing = sorted(c.__qualname__ for c in layers - covered)
    assert not missing, f"invertible layers without a conformance case: {missing}"
