"""Attributions (hybridflow.evaluation.attribution): the continuous level-scale density, the
deterministic residual log-dets captum needs, Integrated Gradients completeness, the attribute()
front end and the overlay figure."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import TINY_REALNVP
from torch import Tensor, nn

from hybridflow.evaluation.attribution import (
    ATTRIBUTION_METHODS,
    EXPLAIN_TARGETS,
    attribute,
    blurred_baseline,
    continuous_log_prob,
    continuous_logits,
    deterministic_logdets,
    mean_baseline,
    save_attribution_overlays,
)
from hybridflow.models import HybridModel
from hybridflow.models.factory import create_hybrid_model
from hybridflow.transforms import ResidualBlock

SHAPE = (1, 8, 8)
LEVELS = 17
REALNVP = {"backbone": "realnvp", "head": "resflow", **TINY_REALNVP}
# Two scales with one conv residual block each and one fully connected end block; the defaults
# give Russian-roulette log-dets with Neumann gradients, as in the paper's configurations.
RESFLOW = {
    "backbone": "resflow",
    "backbone_args": {
        "num_scales": 2,
        "blocks_per_scale": 1,
        "hidden_channels": 8,
        "fc_blocks": 1,
        "fc_hidden": 16,
    },
    "head": "resflow",
    "head_args": {"width": 8},
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _levels(n: int, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, LEVELS, (n, *SHAPE), generator=g).to(torch.get_default_dtype())


def _model(config: dict) -> HybridModel:
    torch.manual_seed(0)
    model = create_hybrid_model(config, SHAPE, LEVELS, 10)
    model.data_init(_levels(16, seed=0))
    return model.eval()


@pytest.fixture
def realnvp() -> HybridModel:
    return _model(REALNVP)


@pytest.fixture
def resflow() -> HybridModel:
    return _model(RESFLOW)


def _blocks(model: nn.Module) -> list[ResidualBlock]:
    return [m for m in model.modules() if isinstance(m, ResidualBlock)]


# ---- continuous density and logits ----------------------------------------------------------


def test_continuous_log_prob_matches_bin_centre_log_prob(realnvp: HybridModel) -> None:
    x = _levels(5)
    with torch.no_grad():
        expected = realnvp.flow.log_prob(x, dequant_noise=0.5)
        out = realnvp(x, dequant_noise=0.5)
        assert torch.allclose(continuous_log_prob(realnvp, x + 0.5), expected, atol=1e-9)
        assert torch.allclose(continuous_logits(realnvp, x + 0.5), out.logits, atol=1e-9)
        # A bare flow is accepted too.
        assert torch.allclose(continuous_log_prob(realnvp.flow, x + 0.5), expected, atol=1e-9)
    # Off the bin centres it is the density at that point, differentiable in x.
    x_cont = (x + 0.3).requires_grad_(True)
    (grad,) = torch.autograd.grad(continuous_log_prob(realnvp, x_cont).sum(), x_cont)
    assert grad.shape == x.shape and bool(grad.ne(0).any())
    with torch.no_grad():
        shifted = realnvp.flow.log_prob(x, dequant_noise=0.3)
        assert torch.allclose(continuous_log_prob(realnvp, x + 0.3), shifted, atol=1e-9)


# ---- deterministic log-dets -----------------------------------------------------------------


def test_deterministic_logdets_is_repeatable_and_batch_independent(resflow: HybridModel) -> None:
    blocks = _blocks(resflow)
    assert blocks and all(b.logdet_estimator == "roulette" for b in blocks)
    before = [
        (b.logdet_estimator, b.n_terms, b.eval_n_terms, b.grad_mode, b.memory_efficient)
        for b in blocks
    ]
    x = _levels(6) + 0.5
    with torch.no_grad(), deterministic_logdets(resflow, n_terms=8):
        assert all(b.logdet_estimator == "series" and b.grad_mode == "backprop" for b in blocks)
        first = continuous_log_prob(resflow, x)
        assert torch.equal(first, continuous_log_prob(resflow, x))
        # One example alone, at another batch position and in a batch of another size.
        alone = continuous_log_prob(resflow, x[3:4])
        assert torch.allclose(alone, first[3:4], rtol=0, atol=1e-10)
        shuffled = continuous_log_prob(resflow, x.flip(0)[1:])
        assert torch.allclose(shuffled, first.flip(0)[1:], rtol=0, atol=1e-10)
    after = [
        (b.logdet_estimator, b.n_terms, b.eval_n_terms, b.grad_mode, b.memory_efficient)
        for b in blocks
    ]
    assert after == before
    assert all("_draw" not in b.__dict__ for b in blocks)
    # Roulette again: fresh probes and series lengths on every call.
    with torch.no_grad():
        a, b = continuous_log_prob(resflow, x), continuous_log_prob(resflow, x)
    assert not torch.allclose(a, b)


def test_deterministic_logdets_restores_after_errors_and_nesting(resflow: HybridModel) -> None:
    blocks = _blocks(resflow)
    with pytest.raises(RuntimeError, match="boom"), deterministic_logdets(resflow):
        raise RuntimeError("boom")
    assert all(b.logdet_estimator == "roulette" and "_draw" not in b.__dict__ for b in blocks)

    with deterministic_logdets(resflow, n_terms=3, seed=1):
        outer = [b._draw for b in blocks]
        with deterministic_logdets(resflow, n_terms=5, seed=2):
            assert all(b.n_terms == 5 for b in blocks)
        assert [b._draw for b in blocks] == outer and all(b.n_terms == 3 for b in blocks)
    assert all(b.n_terms == 2 and "_draw" not in b.__dict__ for b in blocks)

    exact = ResidualBlock(nn.Tanh(), logdet="exact")
    with deterministic_logdets(exact):
        assert exact.logdet_estimator == "exact" and "_draw" not in exact.__dict__


class _Dense(nn.Module):
    """``g(x) = 0.6 · tanh(W x)`` with ``‖W‖₂ = 1``: Lip(g) ≤ 0.6, a dense Jacobian whose
    trace (``W`` near the identity) makes the log-det large against the probe noise."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        noise = torch.randn(dim, dim, generator=torch.Generator().manual_seed(3))
        weight = torch.eye(dim) + 0.5 * noise / torch.linalg.matrix_norm(noise, 2)
        self.register_buffer("weight", weight / torch.linalg.matrix_norm(weight, 2))

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], -1)
        return (0.6 * torch.tanh(flat @ self.weight.T)).reshape(x.shape)


def test_series_with_many_terms_is_close_to_the_exact_logdet() -> None:
    block = ResidualBlock(_Dense(4 * 8 * 8), logdet="roulette")
    reference = copy.deepcopy(block)
    reference.logdet_estimator = "exact"
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        exact = reference(x)[1]
        series, one_term = torch.zeros(3), torch.zeros(3)
        for seed in range(16):  # average the single fixed probe over seeds
            with deterministic_logdets(block, n_terms=30, seed=seed):
                series += block(x)[1] / 16
            with deterministic_logdets(block, n_terms=1, seed=seed):
                one_term += block(x)[1] / 16  # tr(J) only: biased upwards
    assert bool((exact > 20).all())  # a log-det well above the probe noise
    assert torch.allclose(series, exact, rtol=0.05)
    assert bool((one_term > 1.1 * exact).all())


# ---- Integrated Gradients completeness ------------------------------------------------------


@pytest.mark.parametrize("name", ["realnvp", "resflow"])
def test_integrated_gradients_completeness_for_log_prob(name: str, request) -> None:
    model = request.getfixturevalue(name)
    x = _levels(3)
    attributions = attribute(model, x, target="log_prob", n_steps=64)
    x_cont = x + 0.5
    with torch.no_grad(), deterministic_logdets(model):
        gap = continuous_log_prob(model, x_cont) - continuous_log_prob(
            model, blurred_baseline(x_cont)
        )
    total = attributions.sum(dim=(1, 2, 3))
    assert bool((gap.abs() > 0.1).all())
    assert torch.allclose(total, gap, rtol=0.03, atol=0)


# ---- attribute() front end ------------------------------------------------------------------


@pytest.mark.parametrize("method", ATTRIBUTION_METHODS)
@pytest.mark.parametrize("target", EXPLAIN_TARGETS)
def test_attribute_shapes_for_every_method_and_target(
    realnvp: HybridModel, resflow: HybridModel, method: str, target: str
) -> None:
    x = _levels(2).long()  # integer levels are accepted
    for model in (realnvp, resflow):
        model.train()
        model.head.eval()  # a mixed mode must survive too
        out = attribute(model, x, target=target, method=method, n_steps=8, nt_samples=3)
        assert out.shape == x.shape and out.dtype == torch.get_default_dtype()
        assert out.device.type == "cpu" and not out.requires_grad
        assert bool(torch.isfinite(out).all()) and bool(out.ne(0).any())
        if method != "integrated_gradients":
            assert bool((out >= 0).all())  # absolute gradients
        assert model.training and model.flow.training and not model.head.training


def test_saliency_is_the_absolute_input_gradient(realnvp: HybridModel) -> None:
    x = _levels(2)
    x_cont = (x + 0.5).requires_grad_(True)
    (grad,) = torch.autograd.grad(continuous_log_prob(realnvp, x_cont).sum(), x_cont)
    out = attribute(realnvp, x, target="log_prob", method="saliency")
    assert torch.allclose(out, grad.abs(), atol=1e-10)


def test_attribute_classes_callables_baselines_and_noise(realnvp: HybridModel) -> None:
    x = _levels(3)
    with torch.no_grad():
        predicted = continuous_logits(realnvp, x + 0.5).argmax(dim=1)
    default = attribute(realnvp, x, method="saliency")
    assert torch.allclose(default, attribute(realnvp, x, method="saliency", class_index=predicted))
    other = (predicted + 1) % 10
    assert not torch.allclose(default, attribute(realnvp, x, method="saliency", class_index=other))
    per_class = attribute(realnvp, x[:1], method="saliency", class_index=int(other[0]))
    assert torch.allclose(
        per_class, attribute(realnvp, x[:1], method="saliency", class_index=other[:1])
    )

    def neg_log_prob(model: nn.Module, x_cont: Tensor) -> Tensor:
        return -continuous_log_prob(model, x_cont)

    via_callable = attribute(realnvp, x, target=neg_log_prob, n_steps=8)
    assert torch.allclose(via_callable, -attribute(realnvp, x, target="log_prob", n_steps=8))

    mean = torch.full(SHAPE, 8.0)
    by_name = attribute(realnvp, x, target="log_prob", baseline="mean", data_mean=mean, n_steps=8)
    by_tensor = attribute(realnvp, x, target="log_prob", baseline=mean, n_steps=8)
    assert torch.allclose(by_name, by_tensor)
    zero = attribute(realnvp, x, target="log_prob", baseline="zero", n_steps=8)
    assert not torch.allclose(zero, by_name)

    kw = {"target": "log_prob", "method": "noise_tunnel", "nt_samples": 4}
    assert torch.equal(attribute(realnvp, x, **kw), attribute(realnvp, x, **kw))
    assert not torch.allclose(attribute(realnvp, x, **kw), attribute(realnvp, x, **kw, seed=1))


def test_attribute_validates_its_arguments(realnvp: HybridModel) -> None:
    x = _levels(2)
    with pytest.raises(ValueError, match="integrated_gradients"):
        attribute(realnvp, x, method="gradcam")
    with pytest.raises(ValueError, match="log_prob"):
        attribute(realnvp, x, target="entropy")
    with pytest.raises(ValueError, match="shape"):
        attribute(realnvp, x[:, 0])
    with pytest.raises(ValueError, match="shape"):
        attribute(realnvp, torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match="data_mean"):
        attribute(realnvp, x, baseline="mean")
    with pytest.raises(ValueError, match="blur"):
        attribute(realnvp, x, baseline="black")
    with pytest.raises(ValueError, match=r"\[0, 16\]"):
        attribute(realnvp, x + 1)
    with pytest.raises(ValueError, match="class_index"):
        attribute(realnvp, x, class_index=10)
    with pytest.raises(ValueError, match="HybridModel"):
        attribute(realnvp.flow, x, target="logit")
    assert not realnvp.training  # restored after the failures inside attribute() too


# ---- baselines ------------------------------------------------------------------------------


def test_baselines() -> None:
    x = _levels(2) + 0.5
    blurred = blurred_baseline(x)
    assert blurred.shape == x.shape
    assert (blurred.diff(dim=-1).abs().sum()) < 0.5 * x.diff(dim=-1).abs().sum()
    flat = torch.full((1, 3, 4, 4), 7.5)  # kernel clipped to 3 on a 4×4 image
    assert torch.allclose(blurred_baseline(flat, kernel_size=9), flat)
    assert blurred_baseline(x[:, 0]).shape == x[:, 0].shape
    with pytest.raises(ValueError, match="images"):
        blurred_baseline(torch.zeros(2, 5))
    mean = torch.arange(64.0).reshape(SHAPE)
    assert torch.equal(mean_baseline(x, mean), mean.expand_as(x))
    with pytest.raises(ValueError, match="broadcast"):
        mean_baseline(x, torch.zeros(3))


# ---- figure ---------------------------------------------------------------------------------


def test_save_attribution_overlays_writes_png(tmp_path: Path) -> None:
    images, attributions = _levels(2), torch.randn(2, *SHAPE)
    path = save_attribution_overlays(
        images, attributions, tmp_path / "sub" / "ig.png", titles=["a", "b"], num_levels=LEVELS
    )
    assert path == tmp_path / "sub" / "ig.png"
    assert path.read_bytes().startswith(b"\x89PNG")
    rgb = save_attribution_overlays(
        torch.rand(1, 3, 8, 8), torch.randn(1, 3, 8, 8), tmp_path / "c.png"
    )
    assert rgb.read_bytes().startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="differ"):
        save_attribution_overlays(images, attributions[:1], tmp_path / "bad.png")
