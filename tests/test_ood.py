"""OOD scores: values, orientation (higher = more OOD), fitted tests, and the run-level table."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_RUN_ARGS
from PIL import Image

from hybridflow.cli import main
from hybridflow.data import load_dataset
from hybridflow.evaluation import ood_metrics, predict
from hybridflow.evaluation.ood import (
    OOD_SCORE_DESCRIPTIONS,
    FisherCombination,
    MahalanobisDetector,
    TypicalityTest,
    bpd_score,
    complexity_score,
    conformal_p_values,
    energy_score,
    likelihood_ratio_score,
    max_softmax_score,
    nll_score,
    png_bits_per_dim,
)
from hybridflow.models import create_hybrid_model
from hybridflow.reports import ood_run
from hybridflow.reports.ood import sanitize_predictions
from hybridflow.training.trainer import perturb_levels

pytestmark = pytest.mark.usefixtures("one_thread")


def test_likelihood_scores_hand_values() -> None:
    lp = np.array([-10.0, -20.0])
    assert nll_score(lp) == pytest.approx([10.0, 20.0])
    assert bpd_score(lp, 5) == pytest.approx([10 / (5 * math.log(2)), 20 / (5 * math.log(2))])
    # Ren et al.: model beats the background by 5 nats -> in-distribution-like, score -5.
    assert likelihood_ratio_score([-10.0], [-15.0]) == pytest.approx([-5.0])
    assert complexity_score([3.0, 2.0], [1.0, 2.5]) == pytest.approx([2.0, -0.5])
    with pytest.raises(ValueError, match="non-finite"):
        nll_score([0.0, np.nan])
    with pytest.raises(ValueError, match="differ"):
        likelihood_ratio_score([1.0, 2.0], [1.0])


def test_classifier_scores_hand_values_and_orientation() -> None:
    logits = np.array([[0.0, 0.0], [10.0, 0.0]])
    assert energy_score(logits) == pytest.approx([-math.log(2), -(10 + math.log1p(math.exp(-10)))])
    assert energy_score(logits, temperature=2.0)[0] == pytest.approx(-2 * math.log(2))
    assert max_softmax_score(logits) == pytest.approx([-0.5, -1 / (1 + math.exp(-10))])
    # An undecided classifier (flat logits) is more OOD than a confident one, for both scores.
    flat, peaked = np.zeros((1, 10)), np.eye(10)[:1] * 8
    for score in (energy_score, max_softmax_score):
        assert score(flat)[0] > score(peaked)[0]
    with pytest.raises(ValueError, match="2-D"):
        energy_score(np.zeros(3))


def test_png_code_length_tracks_complexity() -> None:
    rng = np.random.default_rng(0)
    flat = np.zeros((1, 1, 28, 28), dtype=np.uint8)
    noise = rng.integers(0, 256, (1, 1, 28, 28)).astype(np.uint8)
    bits = png_bits_per_dim(np.concatenate([flat, noise]), 256)
    assert bits[0] < 1.0 < 7.5 < bits[1]  # noise is incompressible: ≥ 8 bits/dim
    # The code length is that of a real, lossless PNG file of the image.
    buf = io.BytesIO()
    Image.fromarray(noise[0, 0]).save(buf, format="PNG", optimize=True)
    assert bits[1] == pytest.approx(8 * buf.tell() / 784)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(buf.getvalue()))), noise[0, 0])
    rgb = png_bits_per_dim(rng.integers(0, 17, (2, 3, 8, 8)), 17)
    assert rgb.shape == (2,)
    with pytest.raises(ValueError, match="levels"):
        png_bits_per_dim(np.full((1, 8, 8), 17), 17)
    with pytest.raises(ValueError, match="expected images"):
        png_bits_per_dim(np.zeros((1, 2, 8, 8)), 17)


def test_typicality_flags_shifted_batches_on_both_sides() -> None:
    rng = np.random.default_rng(0)
    held_out = rng.normal(100.0, 5.0, 4000)
    test = TypicalityTest(batch_size=25, alpha=0.99, seed=1).fit(held_out)
    assert test.entropy == pytest.approx(100.0, abs=0.3)
    # Bootstrap threshold ≈ 2.58 σ/√M for Gaussian NLLs.
    assert test.epsilon == pytest.approx(2.576 * 5 / 5, rel=0.1)
    fresh = rng.normal(100.0, 5.0, 25 * 400)
    assert test.flag(fresh).mean() < 0.03  # about 1 - alpha of in-distribution batches
    # Atypical batches are flagged whether their likelihood is too LOW or too HIGH: the second
    # case is what NLL alone gets wrong (MNIST under a Fashion-MNIST flow).
    for shift in (+4.0, -4.0):
        assert test.flag(rng.normal(100.0 + shift, 5.0, 25 * 40)).mean() > 0.9
    # Batches are random, not consecutive: sorted inputs (e.g. a class-sorted file) must not
    # turn into extreme batches. Consecutive batches of 0..999 would reach |mean - H| ≈ 495.
    ramp = TypicalityTest(batch_size=10).fit(np.arange(1000.0))
    assert ramp.score(np.arange(1000.0)).max() < 300
    single = TypicalityTest().fit(held_out)
    assert single.score(np.array([100.0, 80.0, 120.0])) == pytest.approx(
        [abs(100 - single.entropy), abs(80 - single.entropy), abs(120 - single.entropy)]
    )
    with pytest.raises(RuntimeError, match="fit"):
        TypicalityTest().score([1.0])
    with pytest.raises(ValueError, match="at least"):
        test.score(np.ones(3))


def test_mahalanobis_matches_the_formula_and_orients() -> None:
    rng = np.random.default_rng(0)
    cov = np.array([[2.0, 0.9, 0.0], [0.9, 1.0, 0.3], [0.0, 0.3, 0.5]])
    means = np.array([[0.0, 0.0, 0.0], [4.0, -2.0, 1.0]])
    y = rng.integers(0, 2, 3000)
    f = means[y] + rng.multivariate_normal(np.zeros(3), cov, 3000)
    det = MahalanobisDetector(shrinkage=False).fit(f, y)
    queries = np.array([[0.1, 0.2, -0.1], [4.0, -2.0, 1.0], [20.0, 20.0, 20.0]])
    mu = np.stack([f[y == c].mean(0) for c in (0, 1)])
    centred = f - mu[y]
    precision = np.linalg.inv(centred.T @ centred / len(f))
    expected = [min((q - m) @ precision @ (q - m) for m in mu) for q in queries]
    assert det.score(queries) == pytest.approx(expected, rel=1e-6)
    assert det.score(queries)[2] > 10 * det.score(queries)[0]
    shrunk = MahalanobisDetector().fit(f, y)
    assert shrunk.score(queries)[2] > 10 * shrunk.score(queries)[0]
    with pytest.raises(ValueError, match="features"):
        det.score(np.zeros((1, 4)))


def test_conformal_p_values_and_fisher_combination() -> None:
    cal = np.array([1.0, 2.0, 3.0, 4.0])
    # p = (1 + #{cal >= s}) / (n + 1)
    assert conformal_p_values(cal, [0.0, 2.5, 4.0, 9.0]) == pytest.approx([1, 3 / 5, 2 / 5, 1 / 5])
    fisher = FisherCombination().fit({"a": cal, "b": -cal})
    got = fisher.score({"a": np.array([9.0]), "b": np.array([0.0])})
    assert got == pytest.approx([-2 * (math.log(1 / 5) + math.log(1 / 5))])
    with pytest.raises(ValueError, match="missing"):
        fisher.score({"a": np.array([1.0])})


def test_perturb_levels_replaces_the_given_fraction() -> None:
    x = torch.full((200, 1, 16, 16), 3.0)
    gen = torch.Generator().manual_seed(0)
    out = perturb_levels(x, 0.2, 17, generator=gen)
    changed = (out != x).double().mean().item()
    assert changed == pytest.approx(0.2 * 16 / 17, abs=0.01)  # 1/17 of draws hit level 3 again
    assert out.min() >= 0 and out.max() <= 16 and torch.equal(out, out.round())
    assert torch.equal(perturb_levels(x, 0.0, 17), x)
    with pytest.raises(ValueError, match="perturb_rate"):
        perturb_levels(x, 1.0, 17)


def test_npz_with_its_own_alphabet(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.full((10, 8, 8), 16, np.uint8), num_levels=np.int64(17))
    assert load_dataset(f"npz:{path}", "all").num_levels == 17
    np.savez(path, x=np.full((10, 8, 8), 17, np.uint8), num_levels=np.int64(17))
    with pytest.raises(ValueError, match="num_levels"):
        load_dataset(f"npz:{path}", "all")


# Scores that must rank uniform noise above test digits. max_softmax and energy are checked on
# synthetic logits above instead: far from the data a classifier can be confidently wrong (Hein
# et al. 2019, "Why ReLU networks yield high-confidence predictions far away from the training
# data"), so their ranking of noise is a property of the model, not of our sign convention.
NOISE_DETECTORS = (
    "nll",
    "bpd",
    "typicality",
    "typicality_batch",
    "complexity",
    "likelihood_ratio",
    "mahalanobis",
    "mahalanobis_head",
)


def test_ood_command_scores_noise_as_ood(tmp_path: Path, capsys) -> None:
    out = str(tmp_path)
    TINY = [*TINY_RUN_ARGS, "--max_steps=80"]
    assert main(["train", *TINY, f"--out_dir={out}", "--name=m", "--lam=1/D"]) == 0
    bg = ["--lam=1", "--perturb_rate=0.2"]
    assert main(["train", *TINY, f"--out_dir={out}", "--name=bg", *bg]) == 0
    rng = np.random.default_rng(0)
    noise = tmp_path / "noise.npz"
    np.savez(noise, x=rng.integers(0, 17, (120, 8, 8), dtype=np.uint8), num_levels=np.int64(17))
    few = tmp_path / "few.npz"  # fewer inputs than M: no batch test, but every other score
    np.savez(few, x=rng.integers(0, 17, (3, 8, 8), dtype=np.uint8), num_levels=np.int64(17))
    args = ["ood", f"{out}/m", "--ood", f"npz:{noise}", "--background", f"{out}/bg"]
    args += ["--ood", f"npz:{few}"]
    assert main([*args, "--typicality-batch=5", "--fit-examples=500"]) == 0
    assert "likelihood_ratio" in capsys.readouterr().out

    result = json.loads((tmp_path / "m/ood/ood_test.json").read_text())
    metrics = result["ood"][f"npz:{noise}"]["metrics"]
    assert set(metrics) == set(OOD_SCORE_DESCRIPTIONS)
    for name in NOISE_DETECTORS:
        assert metrics[name]["auroc"] > 0.8, name  # a flipped sign gives < 0.2
    assert result["ood"][f"npz:{noise}"]["typicality_batch_flag_rate"]["out"] > 0.9
    few_entry = result["ood"][f"npz:{few}"]
    assert few_entry["typicality_batch_flag_rate"] is None
    assert set(few_entry["metrics"]) == set(OOD_SCORE_DESCRIPTIONS) - {"typicality_batch"}
    assert "No batch typicality test" in (tmp_path / "m/ood/ood_test.md").read_text()
    rows = list(csv.DictReader((tmp_path / "m/ood/ood_test.csv").open()))
    assert len(rows) == 2 * len(OOD_SCORE_DESCRIPTIONS) - 1
    assert {"auroc", "aupr_in", "aupr_out", "fpr95_id", "fpr95_ood"} <= rows[0].keys()
    for name in ("scores_test.png", "scores_test.npz", "ood_test.md"):
        assert (tmp_path / "m/ood" / name).stat().st_size > 0

    # Refused before any work: an unknown hybrid component, a likelihood ratio without a
    # background model, and scoring the splits the detectors are fitted on.
    capsys.readouterr()
    assert main(["ood", f"{out}/m", "--ood", "digits@val", "--hybrid-components=nope"]) == 1
    assert "nope" in capsys.readouterr().err
    typo = "--hybrid-components=typicality,enrgy"
    assert main(["ood", f"{out}/m", "--ood", "digits@val", typo]) == 1
    assert "did you mean 'energy'?" in capsys.readouterr().err
    lr = "--hybrid-components=likelihood_ratio"
    assert main(["ood", f"{out}/m", "--ood", "digits@val", lr]) == 1
    assert "likelihood_ratio needs --background" in capsys.readouterr().err
    for split in ("val", "train"):
        with pytest.raises(ValueError, match="test split only"):
            ood_run(tmp_path / "m", ["digits@val"], split=split)


def test_predict_gives_no_logits_without_classes() -> None:
    model = create_hybrid_model(
        {"backbone": "realnvp", "backbone_args": {"num_scales": 2, "hidden_channels": 4}},
        (1, 8, 8),
        17,
        10,
    )
    model.data_init(torch.randint(0, 17, (16, 1, 8, 8)).double())
    model.reset_classifier(0)
    pred = predict(model, load_dataset("digits", "val"), features=True)
    assert pred["logits"].shape == (len(pred["labels"]), 0)
    assert pred["latent"].shape == (len(pred["labels"]), 64)  # the flat latent z: D dims


def test_non_finite_outputs_rank_as_ood_instead_of_aborting() -> None:
    pred = {
        "log_prob": np.array([-100.0, -np.inf, np.nan, -90.0]),
        "logits": np.array([[1.0, 0.0], [np.inf, 0.0], [np.nan, 1.0], [0.0, 2.0]]),
        "latent": np.ones((4, 3), np.float32),
    }
    counts = sanitize_predictions(pred)
    assert counts == {"log_prob": 2, "logits": 2, "latent": 0}
    nll = nll_score(pred["log_prob"])  # finite now, and the impossible inputs rank highest
    assert np.all(np.isfinite(nll)) and nll[1] > nll[0] and nll[2] > nll[0]
    assert np.all(np.isfinite(energy_score(pred["logits"])))
    metrics = ood_metrics(nll[[0, 3]], nll[[1, 2]])
    assert metrics["auroc"] == 1.0
