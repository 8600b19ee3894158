"""Flows for variational inference: the targets, reverse-KL fitting and its diagnostics."""

from __future__ import annotations

import json
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
    # The trimmed ELBO drops the 20 draws of lowest log-weight, which an independent
    # recomputation with the same generator finds too.
    gen = torch.Generator().manual_seed(3)
    trimmed = target_diagnostics(q, target, samples=20_000, generator=gen)["elbo_trimmed"]
    with torch.no_grad():
        x, log_q = q.rsample_and_log_prob(20_000, generator=torch.Generator().manual_seed(3))
        log_w = (target.log_prob(x) - log_q).double().sort().values
    assert trimmed == pytest.approx(float(log_w[20:].mean()), abs=1e-9)
    assert float(log_w.mean()) < trimmed < float(log_w[21:].mean())
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


@pytest.mark.parametrize("posterior", ["diagonal", "iaf", "iaf-dsf", "iaf-ddsf"])
def test_vae_bounds_and_gradients(posterior: str) -> None:
    from hybridflow.models import FlowVAE

    torch.manual_seed(0)
    vae = FlowVAE((1, 8, 8), latent_dim=4, posterior=posterior, num_flows=2, context_dim=6,
                  width=4, made_hidden=(16,), num_units=4)  # fmt: skip
    x = (torch.rand(5, 1, 8, 8) < 0.3).to(torch.get_default_dtype())
    loss = -vae.elbo(x).mean()
    loss.backward()
    assert all(p.grad is not None for p in vae.parameters())  # encoder, decoder and flow train
    # With the same draws, log mean exp ≥ mean (Jensen): the IW estimate never exceeds −ELBO.
    torch.manual_seed(1)
    log_w = vae.log_weights(x, 64)
    assert torch.all(torch.logsumexp(log_w, 0) - math.log(64) >= log_w.mean(0))
    torch.manual_seed(2)
    nll = -vae.log_likelihood(x, samples=200, chunk=64)
    torch.manual_seed(2)
    assert torch.all(nll <= -vae.elbo(x, samples=200) + 1e-9)
    # log q of a draw matches the density of the posterior's flow at that draw
    if vae.flow is not None:
        mu, log_sigma, h = vae.encoder(x)
        z0 = mu + log_sigma.exp() * torch.randn_like(mu)
        z, logdet = vae.flow.inverse_and_logdet(z0, h)
        back, fwd = vae.flow(z, h)
        torch.testing.assert_close(back, z0, atol=1e-5, rtol=0)
        torch.testing.assert_close(fwd, -logdet, atol=1e-5, rtol=0)
    assert vae.sample(3).shape == (3, 1, 8, 8)


def test_vae_refuses_non_binary_images_and_bad_names() -> None:
    from hybridflow.data import binarize
    from hybridflow.models import FlowVAE

    vae = FlowVAE((1, 8, 8), latent_dim=2, width=4)
    with pytest.raises(ValueError, match="every value must be 0 or 1"):
        vae.elbo(torch.full((2, 1, 8, 8), 0.5))
    with pytest.raises(ValueError, match=r"expected binary images \[N, 1, 8, 8\]"):
        vae.elbo(torch.zeros(2, 1, 7, 7))
    with pytest.raises(ValueError, match="posterior must be one of"):
        FlowVAE(posterior="maf")
    levels = torch.tensor([[0.0, 16.0, 8.0]]).expand(20_000, 3)
    binary = binarize(levels, 17, seed=3)
    assert set(binary.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(binary.mean(0), torch.tensor([0.0, 1.0, 0.5]), atol=0.02, rtol=0)
    torch.testing.assert_close(binarize(levels, 17, seed=3), binary)  # static: the same draw
    with pytest.raises(ValueError, match="levels must lie in"):
        binarize(levels, 8)


VAE_TINY = {
    "dataset": "digits", "latent_dim": 4, "num_flows": 2, "context_dim": 6, "width": 4,
    "made_hidden": (16,), "num_units": 4, "batch_size": 64, "max_steps": 20, "warmup_steps": 2,
    "log_every": 5, "progress": False, "checkpoint_every_s": 0.0,
}  # fmt: skip


def test_vae_run_resumes_exactly_and_evaluates(tmp_path, monkeypatch) -> None:
    from hybridflow.runs import load_checkpoint
    from hybridflow.training import vae as vae_runs

    cfg = {**VAE_TINY, "posterior": "iaf-dsf", "out_dir": str(tmp_path)}
    whole = vae_runs.train_vae(cfg, name="whole")
    calls = {"n": 0}
    real = vae_runs.backward_and_clip

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 11:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(vae_runs, "backward_and_clip", interrupted)
    with pytest.raises(KeyboardInterrupt):
        vae_runs.train_vae(cfg, name="killed")
    monkeypatch.setattr(vae_runs, "backward_and_clip", real)
    resumed = vae_runs.train_vae(cfg, name="killed")
    a, b = (load_checkpoint(r / "model.pt")["model"] for r in (whole, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)

    def rows(run):  # every logged number but the wall-clock column
        return [line.rsplit(",", 1)[0] for line in (run / "metrics.csv").read_text().splitlines()]

    assert rows(whole) == rows(resumed) and len(rows(whole)) == 1 + 4 + 1  # header, 4 train, val
    result = vae_runs.evaluate_vae(whole, samples=50, nll_images=20)
    assert result["neg_log_likelihood"] <= result["neg_elbo_on_nll_images"] + 0.5
    assert (whole / "eval_test.json").exists()


def test_vae_config_is_typed() -> None:
    from hybridflow.runs import ConfigError
    from hybridflow.training.vae import VAEConfig

    cfg = VAEConfig.from_overrides(
        {"latent_dim": "8", "made_hidden": "[32, 32]", "max_steps": "none"}
    )
    assert cfg.latent_dim == 8 and cfg.made_hidden == (32, 32) and cfg.max_steps is None
    with pytest.raises(ConfigError, match="did you mean 'latent_dim'"):
        VAEConfig.from_overrides({"latent_dims": "8"})
    with pytest.raises(ConfigError, match="expects"):
        VAEConfig.from_overrides({"latent_dim": "eight"})
    with pytest.raises(ConfigError, match="posterior must be one of"):
        VAEConfig.from_overrides({"posterior": "maf"})
    with pytest.raises(ConfigError, match="epochs must be >= 1"):
        VAEConfig.from_overrides({"epochs": "0"})


def test_vae_command_line(tmp_path, capsys) -> None:
    from hybridflow.cli import main

    args = [f"--{k}={list(v) if isinstance(v, tuple) else v}" for k, v in VAE_TINY.items()]
    args = [a.replace("(", "[").replace(")", "]") for a in args]
    assert (
        main(["vae", "train", *args, "--posterior=iaf", f"--out_dir={tmp_path}", "--name=r"]) == 0
    )
    run = tmp_path / "r"
    assert capsys.readouterr().out.strip() == str(run)
    assert main(["vae", "eval", str(run), "--samples", "20", "--nll-images", "10"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["posterior"] == "iaf" and result["samples"] == 20 and result["nll_images"] == 10
    assert main(["vae", "sample", str(run), "--n", "8"]) == 0
    assert (run / "samples.png").exists()
    assert main(["vae", "train", "--posterior=maf", f"--out_dir={tmp_path}"]) == 1
    assert "posterior must be one of" in capsys.readouterr().err
    assert main(["vae"]) == 2
