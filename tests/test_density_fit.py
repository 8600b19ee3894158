"""fit_density: maximum-likelihood training of a continuous flow, robust to non-finite steps,
returning a finalized EMA model."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from hybridflow.data import sample_toy, toy_log_density
from hybridflow.models import FlowModel, create_backbone
from hybridflow.nets import lipschitz_layers
from hybridflow.training.density import evaluate_log_likelihood, fit_density
from hybridflow.training.trainer import TrainingDivergedError


def _toy_flow() -> FlowModel:
    backbone = create_backbone("realnvp-vector", (2,), num_couplings=4, hidden_features=32)
    return FlowModel(backbone, (2,), num_levels=None, preprocessing="none")


def test_fit_density_learns_a_toy_density_and_keeps_the_best_weights() -> None:
    torch.set_default_dtype(torch.float32)
    gen = torch.Generator().manual_seed(0)
    train, _ = sample_toy("8gaussians", 4000, gen)
    val, _ = sample_toy("8gaussians", 1000, gen)
    flow = _toy_flow()
    flow.data_init(train[:256])
    before, _ = evaluate_log_likelihood(flow, val)
    fit = fit_density(flow, train, val, steps=250, batch_size=256, lr=3e-3, eval_every=50)
    after, se = evaluate_log_likelihood(fit.model, val)
    truth = toy_log_density("8gaussians", val.double()).mean().item()
    assert after > before + 0.5
    assert after < truth + 4 * se  # no model beats the true density on fresh samples
    assert fit.best_step == max(fit.history, key=lambda h: h["val_ll"])["step"]
    assert after == pytest.approx(max(h["val_ll"] for h in fit.history), abs=1e-4)
    assert not fit.model.training


class _SometimesNaN(nn.Module):
    """A Gaussian with a learnable mean whose log_prob is NaN on chosen calls."""

    def __init__(self, nan_calls: set[int]) -> None:
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(2))
        self.calls, self.nan_calls = 0, nan_calls

    def log_prob(self, x: Tensor) -> Tensor:
        self.calls += 1
        lp = -0.5 * (x - self.mean).pow(2).sum(1)
        return lp * float("nan") if self.calls in self.nan_calls else lp


def test_fit_density_skips_non_finite_steps_and_stops_when_they_persist() -> None:
    data = torch.randn(512, 2) + 3.0
    model = _SometimesNaN({3, 5})
    fit = fit_density(model, data, steps=200, batch_size=64, lr=5e-2, warmup_steps=0)
    assert fit.nan_skips == 2
    assert torch.allclose(fit.model.mean, torch.full((2,), 3.0), atol=0.3)
    with pytest.raises(TrainingDivergedError, match="non-finite"):
        fit_density(_SometimesNaN(set(range(2, 100))), data, steps=50, batch_size=64)


def test_fit_density_finalizes_spectral_norms_of_the_returned_ema_model() -> None:
    """A residual flow's EMA copy averages stale power-iteration vectors with the weights; the
    returned (and the early-stopping-selected) model must have every normalized layer within
    its coefficient c, checked with exact matrix norms."""
    torch.set_default_dtype(torch.float32)
    gen = torch.Generator().manual_seed(0)
    train, _ = sample_toy("8gaussians", 1024, gen)
    val, _ = sample_toy("8gaussians", 256, gen)
    torch.manual_seed(0)
    backbone = create_backbone("resflow", (2,), fc_blocks=2, fc_hidden=32, sn_train_iterations=1)
    flow = FlowModel(backbone, (2,), num_levels=None, preprocessing="none")
    # Large steps and a fast EMA move the weights far from the vectors' estimates.
    fit = fit_density(flow, train, val, steps=60, batch_size=128, lr=2e-2, eval_every=20)
    layers = list(lipschitz_layers(fit.model))
    assert len(layers) == 2 * 3
    for layer in layers:
        weight = layer.normalized_weight().detach()
        assert float(torch.linalg.matrix_norm(weight, 2)) <= layer.coeff + 1e-4
    assert not fit.model.training
