"""Flows for variational inference: the targets, reverse-KL fitting and its diagnostics."""

from __future__ import annotations

import math

import pytest
import torch

from hybridflow.data import gaussian_target, list_targets, load_target
from hybridflow.data.energies import quadrature_log_normalizer
from hybridflow.models import iaf_flow, iterative_sampling_layers
from hybridflow.models.variational import VariationalFlow
from hybridflow.training import fit_target, target_diagnostics
from hybridflow.training.target import mode_coverage
from hybridflow.transforms import autoregressive_stack

pytestmark = pytest.mark.usefixtures("one_thread")


def test_targets_normalizers_and_samplers() -> None:
    assert list_targets() == ["banana", "mixture8", "ring"]
    with pytest.raises(ValueError, match=r"unknown target 'rings'.*did you mean 'ring'"):
        load_target("rings")
    mixture = load_target("mixture8")
    assert mixture.log_normalizer == pytest.approx(math.log(8))
    # the exact normalizer against the quadrature that the ring's comes from
    assert quadrature_log_normalizer("mixture8", 12.0, 2400) == pytest.approx(math.log(8), abs=1e-9)
    ring = load_target("ring")
    assert ring.log_normalizer == pytest.approx(
        quadrature_log_normalizer("ring", 6.0, 3000), abs=1e-9
    )
    gen = torch.Generator().manual_seed(0)
    x = mixture.sample(200_000, gen)
    assert x.pow(2).sum(1).mean() == pytest.approx(16 + 2 * 0.25, rel=0.01)  # R² + 2σ²
    banana = load_target("banana").sample(200_000, gen)
    assert banana[:, 0].pow(2).mean() == pytest.approx(4.0, rel=0.02)
    assert banana[:, 1].mean() == pytest.approx(0.0, abs=0.02)
    with pytest.raises(ValueError, match="no exact sampler"):
        ring.sample(3)
    with pytest.raises(ValueError, match=r"expects \[N, 2\]"):
        mixture.log_prob(torch.zeros(3, 3))


def test_variational_flow_scores_its_draws_as_its_density() -> None:
    for transformer in ("affine", "dsf", "ddsf"):
        q = iaf_flow(3, 2, transformer, (16,), context_features=2)
        h = torch.randn(5, 2)
        x, log_q = q.rsample_and_log_prob(5, h)
        # the density direction of IAF-DSF bisects (tolerance 1e-6); the affine IAF's is exact
        tol = 1e-10 if transformer == "affine" else 1e-5
        torch.testing.assert_close(log_q, q.log_prob(x, h), atol=tol, rtol=0)
        assert iterative_sampling_layers(q.transform) == []
    with pytest.raises(ValueError, match="context has 4 rows for 5 draws"):
        q.rsample_and_log_prob(5, torch.randn(4, 2))
    with pytest.raises(ValueError, match="transformer must be one of"):
        iaf_flow(2, transformer="spline")


def test_reverse_kl_fits_a_gaussian_that_an_affine_flow_represents() -> None:
    torch.manual_seed(0)
    mean, cov = torch.tensor([1.0, -2.0]), torch.tensor([[2.0, 1.2], [1.2, 1.0]])
    target = gaussian_target(mean, cov)
    fit = fit_target(iaf_flow(2, 2, "affine", (16,)), target, steps=1500, lr=5e-3, eval_every=500)
    final = fit.history[-1]
    assert final["kl_reverse"] < 0.01 and final["ess"] > 0.98
    x = fit.model.sample(100_000, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(x.mean(0), mean, atol=0.03, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), cov, atol=0.06, rtol=0)


def test_elbo_bounds_the_log_normalizer_and_importance_weighting_tightens_it() -> None:
    torch.manual_seed(0)
    target = load_target("mixture8")
    q = iaf_flow(2, 2, "affine", (16,))  # untrained: far from the target
    diag = target_diagnostics(q, target, samples=20_000)
    assert diag["elbo"] < target.log_normalizer and diag["kl_reverse"] > 0.5
    bounds = {}
    for s in (4, 64, 1024):
        gen = torch.Generator().manual_seed(s)
        runs = [
            target_diagnostics(q, target, samples=s, generator=gen)["iw_bound"] for _ in range(40)
        ]
        bounds[s] = sum(runs) / len(runs)
    assert diag["elbo"] < bounds[4] < bounds[64] < bounds[1024] < target.log_normalizer + 0.05


def test_mode_coverage_counts_modes_with_their_share() -> None:
    modes = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    x = torch.cat([torch.zeros(90, 2), torch.full((9, 2), 10.0), torch.tensor([[10.0, 0.0]])])
    cover = mode_coverage(x, modes)  # shares 0.90, 0.01, 0, 0.09: min share 1/16
    assert cover["modes_covered"] == 2 and cover["modes"] == 4
    assert mode_coverage(x, modes, min_share=0.005)["modes_covered"] == 3


def test_iterative_sampling_flows_train_with_a_warning() -> None:
    maf = VariationalFlow(autoregressive_stack(2, 2, "maf", hidden_features=(8,)), 2)
    assert len(iterative_sampling_layers(maf.transform)) == 2
    with pytest.warns(RuntimeWarning, match="samples iteratively.*MaskedAutoregressiveFlow"):
        fit = fit_target(maf, load_target("banana"), steps=4, batch_size=8, eval_every=2)
    assert [h["step"] for h in fit.history] == [2, 4] and fit.slow_sampling
