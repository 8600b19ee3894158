"""Residual Flow backbones: named configurations, buffers vs parameters, spectral norms after
training with EMA, inverse accuracy on trained-size blocks, and the hybrid model end to end."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor

from hybridflow.models import FlowModel, HybridModel, create_backbone, list_backbones
from hybridflow.nets import (
    LipschitzConvNet,
    LipschitzMLP,
    LipSwish,
    SpectralNormConv2d,
    SpectralNormLinear,
    lipschitz_layers,
    refresh_lipschitz_layers,
)
from hybridflow.training import load_run, train
from hybridflow.transforms import ResidualBlock

SMALL = {
    "num_scales": 2,
    "blocks_per_scale": 1,
    "hidden_channels": 8,
    "fc_blocks": 1,
    "fc_hidden": 16,
}


def _hybrid(**backbone_kw) -> HybridModel:
    backbone = create_backbone("resflow", (1, 8, 8), **{**SMALL, **backbone_kw})
    flow = FlowModel(backbone, (1, 8, 8), num_levels=17)
    return HybridModel(flow, 10, head="resflow", width=8)


def _batch(n: int = 6) -> tuple[Tensor, Tensor]:
    return torch.randint(0, 17, (n, 1, 8, 8)).to(torch.get_default_dtype()), torch.arange(n) % 10


def _exact_operator_norm(layer) -> float:
    """2-norm of the normalized layer as a dense matrix (the conv operator on its input size)."""
    weight = layer.normalized_weight().detach()
    if isinstance(layer, SpectralNormLinear):
        return float(torch.linalg.matrix_norm(weight, 2))
    c, (h, w) = layer.in_channels, layer.input_size
    basis = torch.eye(c * h * w).reshape(-1, c, h, w)
    out = torch.nn.functional.conv2d(
        basis, weight, stride=layer.stride, padding=layer.padding
    ).reshape(c * h * w, -1)
    return float(torch.linalg.matrix_norm(out, 2))


def test_named_configurations_are_registered_and_build() -> None:
    names = set(list_backbones())
    assert {"resflow", "resflow-mnist", "resflow-cifar10", "resflow-cpu", "resflow-digits"} <= names
    cpu = create_backbone("resflow-cpu", (1, 28, 28))
    blocks = [m for m in cpu.modules() if isinstance(m, ResidualBlock)]
    assert len(blocks) == 3 * 2 + 4  # 3 scales × 2 conv blocks + 4 fully connected end blocks
    assert cpu.feature_shapes == [(4, 14, 14), (16, 7, 7), (16, 7, 7)]
    first = blocks[0]
    assert (first.logdet_estimator, first.n_terms, first.distribution) == ("roulette", 2, "poisson")
    assert first.grad_mode == "neumann" and first.memory_efficient
    with pytest.raises(ValueError, match="squeezed"):
        create_backbone("resflow", (1, 6, 6), num_scales=3)


@pytest.mark.parametrize(
    ("name", "kwargs", "first_has_preact"),
    [
        ("resflow-cpu", {}, False),  # the named configurations: the reference's first_resblock
        ("resflow", {}, True),  # the generic builder: as the shipped Fashion-MNIST models
        ("resflow", {"first_preact": False, "squeeze_first": True}, False),
        ("resflow", {"first_preact": False, "preact": False}, False),
    ],
)
def test_first_block_pre_activation(name: str, kwargs: dict, first_has_preact: bool) -> None:
    flow = create_backbone(name, (1, 8, 8), num_scales=2, blocks_per_scale=2, **kwargs)
    convs = [m for m in flow.modules() if isinstance(m, LipschitzConvNet)]
    starts_with_activation = [isinstance(c.net[0], LipSwish) for c in convs]
    later = kwargs.get("preact", True)
    assert starts_with_activation == [first_has_preact] + [later] * (len(convs) - 1)
    fc = [m for m in flow.modules() if isinstance(m, LipschitzMLP)]
    assert all(isinstance(m.net[0], LipSwish) == later for m in fc)  # fully connected: as before


@pytest.mark.slow
def test_paper_mnist_configuration_size() -> None:
    model = create_backbone("resflow-mnist", (1, 28, 28))
    blocks = [m for m in model.modules() if isinstance(m, ResidualBlock)]
    assert len(blocks) == 3 * 16 + 4
    # The paper's MNIST model has ~16.7 M parameters (Chen et al. 2019; NOTES.md).
    assert 16.0e6 < sum(p.numel() for p in model.parameters()) < 17.0e6


def test_untrained_quantities_are_buffers_and_every_parameter_gets_a_gradient() -> None:
    """DDP needs every parameter to reach the loss through autograd (no `.item()` reads)."""
    model = _hybrid()
    x, y = _batch()
    model.data_init(x)
    buffers = {name.rsplit(".", 1)[-1] for name, _ in model.named_buffers()}
    assert {"poisson_rate", "geometric_p", "u", "v"} <= buffers
    model.loss(x, y, "1/D")["loss"].mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"


def test_memory_efficient_model_gradients_match_plain_autograd() -> None:
    grads = []
    for memory_efficient in (False, True):
        torch.manual_seed(0)
        model = _hybrid(memory_efficient=memory_efficient)
        x, y = _batch()
        model.data_init(x)
        torch.manual_seed(1)
        terms = model.loss(x, y, 0.5)
        # Per-example weights: the case the reference implementation gets wrong.
        (terms["loss"] * torch.linspace(0.5, 2.0, len(x))).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def test_inverse_round_trip_on_trained_size_block() -> None:
    """Width-64 block at 14×14, every layer saturated at c = 0.98 (Lip(g) up to 0.94)."""
    net = LipschitzConvNet(4, 64, (14, 14))
    with torch.no_grad():
        for layer in lipschitz_layers(net):
            layer.weight.mul_(10.0)
    refresh_lipschitz_layers(net)
    block = ResidualBlock(net).eval()  # default tolerances
    x = torch.randn(4, 4, 14, 14) * 2
    z, _ = block(x)
    assert (block.inverse(z) - x).abs().max() <= 1e-5
    assert block.last_inverse.converged


def test_whole_model_inverse_and_sampling() -> None:
    model = _hybrid().eval()
    x, _ = _batch(4)
    model.data_init(x)
    model.eval()
    flow = model.flow
    h, _ = flow._to_flow_input(x, 0.5)
    z, _ = flow.backbone(h)
    assert (flow.backbone.inverse(z) - h).abs().max() <= 1e-5
    samples = flow.sample(3, temperature=0.7, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (3, 1, 8, 8) and samples.min() >= 0 and samples.max() <= 16


def test_trained_ema_model_has_spectral_norms_within_coefficient(tmp_path: Path) -> None:
    """After training (EMA, stale power-iteration vectors refreshed at save time) every
    normalized layer of the saved model is within c + 1e-3, checked with exact matrix norms."""
    run_dir = train(
        {
            "dataset": "digits",
            "backbone": "resflow",
            "backbone_args": {**SMALL, "sn_train_iterations": 1},
            "head_args": {"width": 8},
            "lam": "1/D",
            "batch_size": 256,
            "max_steps": 8,
            "warmup_steps": 2,
            "eval_every": 1,
            "log_every": 4,
            "lr": 3e-2,  # large steps move the weights far from the vectors' estimates
            "ema_decay": 0.5,
            "progress": False,
            "num_threads": 1,
            "out_dir": str(tmp_path),
            "name": "resflow",
        }
    )
    model, _ = load_run(run_dir)
    layers = list(lipschitz_layers(model))
    assert len(layers) == 3 * 1 + 3 * 1 + 3  # two conv blocks and one fc block, 3 layers each
    for layer in layers:
        assert isinstance(layer, SpectralNormConv2d | SpectralNormLinear)
        assert _exact_operator_norm(layer) <= layer.coeff + 1e-3
    assert math.isfinite(float(model.flow.log_prob(_batch(2)[0]).sum().detach()))


@pytest.mark.parametrize(
    ("name", "closing_shape"),
    [("resflow-cpu", (16, 2, 2)), ("resflow-mnist", (16, 2, 2)), ("resflow", (16,))],
)
def test_named_configurations_close_with_the_reference_actnorm(
    name: str, closing_shape: tuple[int, ...]
) -> None:
    """The named image configurations take the reference's per-feature ActNorm1d after their
    fully connected blocks; the generic builder keeps per-channel ones (the shipped models)."""
    from hybridflow.transforms import ActNorm

    flow = create_backbone(name, (1, 8, 8), blocks_per_scale=1, hidden_channels=8)
    closing = [m for m in flow.modules() if isinstance(m, ActNorm)][-1]
    assert tuple(closing.bias.shape) == closing_shape


def test_per_feature_actnorm_after_the_fully_connected_blocks() -> None:
    """``fc_actnorm="feature"``: the ActNorms that follow a fully connected block keep one scale
    per feature (the reference code's ``ActNorm1d``), the others one per channel; data-init
    whitens every feature of the closing one; the model stays invertible."""
    from hybridflow.transforms import ActNorm

    torch.manual_seed(0)
    kw = dict(num_scales=2, blocks_per_scale=1, hidden_channels=8, fc_blocks=2, fc_hidden=16)
    per_channel = create_backbone("resflow", (1, 4, 4), **kw)
    per_feature = create_backbone("resflow", (1, 4, 4), fc_actnorm="feature", **kw)
    shapes = [tuple(m.bias.shape) for m in per_feature.modules() if isinstance(m, ActNorm)]
    # before: conv blocks, the first fc block (after a conv block); after an fc block: 2
    assert shapes == [(1,), (4,), (4,), (4, 2, 2), (4, 2, 2)]
    n_params = [sum(p.numel() for p in m.parameters()) for m in (per_channel, per_feature)]
    assert n_params[1] - n_params[0] == 2 * 2 * (16 - 4)
    x = torch.rand(256, 1, 4, 4) * 0.8 + 0.1
    x[:, :, 0] *= 0.1  # position-dependent spread: what a per-feature scale can fix
    per_feature.train()
    with torch.no_grad():
        per_feature(x)
    closing = [m for m in per_feature.modules() if isinstance(m, ActNorm)][-1]
    assert bool(closing.initialized) and closing.log_scale.std() > 0  # one value per feature
    per_feature.eval()
    with torch.no_grad():
        z, _ = per_feature(x[:4])
        assert torch.allclose(per_feature.inverse(z), x[:4], atol=1e-4)
    with pytest.raises(ValueError, match="fc_actnorm"):
        create_backbone("resflow", (1, 4, 4), fc_actnorm="pixel", **kw)
    with pytest.raises(ValueError, match="feature_shape"):
        ActNorm(2, feature_shape=(3, 2, 2))
    with pytest.raises(ValueError, match=r"expects \[N, 3, 2, 2\]"):
        ActNorm(3, feature_shape=(3, 2, 2))(torch.zeros(2, 3, 4, 4))
