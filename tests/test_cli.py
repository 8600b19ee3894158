"""The ``hybridflow`` command line: train → eval (with OOD) → sweep report."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_RUN_ARGS

from hybridflow.cli import main
from hybridflow.data import load_dataset
from hybridflow.training import load_run

TINY = [*TINY_RUN_ARGS, "--max_steps=6"]


def test_train_then_eval_with_ood(tmp_path: Path, capsys) -> None:
    assert main(["train", *TINY, f"--out_dir={tmp_path}", "--name=run", "--lam=1"]) == 0
    run_dir = tmp_path / "run"
    assert json.loads((run_dir / "config.json").read_text())["lam"] == "1"

    # An OOD set on the same 17-level 8x8 alphabet: uniform noise images.
    rng = np.random.default_rng(0)
    noise = tmp_path / "noise.npz"
    np.savez(noise, x=rng.integers(0, 17, (50, 8, 8), dtype=np.uint8))
    capsys.readouterr()
    # npz data has 256 levels, so the digits model must refuse it rather than mis-score it.
    assert main(["eval", str(run_dir), "--ood", f"npz:{noise}"]) == 1
    err = capsys.readouterr().err
    assert "levels" in err
    assert f"error: OOD dataset npz:{noise} has 256 levels per pixel, the model reads 17" in err

    assert main(["eval", str(run_dir), "--ood", "digits@val"]) == 0
    result = json.loads((run_dir / "eval_test.json").read_text())
    assert {"bpd", "accuracy", "ece", "brier", "class_nll"} <= result.keys()
    scores = result["ood"]["digits@val"]["scores"]
    assert set(scores) == {"bpd", "max_softmax", "energy"}
    assert {"auroc", "aupr_in", "aupr_out", "fpr95_id", "fpr95_ood"} <= scores["bpd"].keys()
    rows = list(csv.DictReader((run_dir / "ood_test.csv").open()))
    assert len(rows) == 3


def test_eval_prints_the_bits_per_dim_of_flow_log_prob(tmp_path: Path, capsys, one_thread) -> None:
    """Oracle: ``-flow.log_prob`` of the test split computed directly from ``model.pt``.

    With predict's noise seed (0, one batch) the printed bits/dim and the per-example log-densities
    of eval_test.npz are equal to it; against eight independent noise seeds the printed value
    lies within 5 standard errors of the dequantization noise (the spread of the eight means).
    """
    assert main(["train", *TINY, f"--out_dir={tmp_path}", "--name=run", "--lam=1/D"]) == 0
    run_dir = tmp_path / "run"
    capsys.readouterr()
    assert main(["eval", str(run_dir)]) == 0
    printed = json.loads(capsys.readouterr().out)
    model, _ = load_run(run_dir)
    test = load_dataset("digits", "test")
    x, y = test.images, test.labels
    dim = math.prod(test.shape)
    assert dim == 64 and len(x) <= 512  # one batch of predict: one draw of the noise
    nats_per_bit = dim * math.log(2)
    with torch.no_grad():
        log_prob = model.flow.log_prob(x, generator=torch.Generator().manual_seed(0)).double()
        logits = model(x, dequant_noise=0.5).logits
        other = torch.stack(
            [
                model.flow.log_prob(x, generator=torch.Generator().manual_seed(seed)).double()
                for seed in range(1, 9)
            ]
        )
    assert printed["nll_nats"] == pytest.approx(-log_prob.mean().item(), rel=1e-9)
    assert printed["bpd"] == pytest.approx(-log_prob.mean().item() / nats_per_bit, rel=1e-9)
    saved = np.load(run_dir / "eval_test.npz")
    np.testing.assert_allclose(saved["log_prob"], log_prob.numpy(), rtol=1e-9)
    np.testing.assert_array_equal(saved["labels"], y.numpy())
    assert printed["accuracy"] == pytest.approx((logits.argmax(1) == y).double().mean().item())
    means = -other.mean(1) / nats_per_bit  # bits/dim under each independent noise draw
    noise_se = means.std().item()
    assert 0 < noise_se < 0.05  # the bound is noisy, but only a little
    assert abs(printed["bpd"] - means.mean().item()) <= 5 * noise_se * math.sqrt(1 + 1 / 8)


def test_sweep_writes_report(tmp_path: Path) -> None:
    args = [
        "sweep",
        "--name=tiny",
        "--lams=0,1/D",
        f"--report-root={tmp_path / 'reports'}",
        f"--runs-root={tmp_path / 'runs'}",
        "--grid",
        "lr=1e-3,2e-3",
        "--n-samples=4",
        "--train-first",  # a flag of the sweep, not a config override
        *TINY,
    ]
    assert main(args) == 0
    out = tmp_path / "reports" / "tiny"
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["lam"], float(r["lr"])) for r in rows] == [
        ("0", 1e-3),
        ("0", 2e-3),
        ("1/D", 1e-3),
        ("1/D", 2e-3),
    ]
    assert all(0 <= float(r["accuracy"]) <= 1 and float(r["bpd"]) > 0 for r in rows)
    report = (out / "report.md").read_text()
    assert "independent per-pixel categorical" in report and "| realnvp | 1/D | lr=" in report
    assert "Regenerate: `hybridflow sweep --name=tiny" in report and "--train-first" in report
    assert (out / "tradeoff.png").stat().st_size > 0 and (out / "report.html").exists()


def test_bad_options_fail_with_a_message(tmp_path: Path, capsys) -> None:
    assert main(["train", "--no_such_key=1", f"--out_dir={tmp_path}"]) == 1
    assert "unknown config key" in capsys.readouterr().err
    assert main(["train", *TINY, "--dataset=cifar", f"--out_dir={tmp_path}"]) == 1
    err = capsys.readouterr().err
    assert "error: config key 'dataset': unknown dataset 'cifar'; did you mean 'cifar10'?" in err
    assert main(["bogus"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: hybridflow {train, eval, sweep,") and "Traceback" not in err
    assert "error: unknown command 'bogus' (valid: calibrate, eval, explain," in err
    assert main(["trian"]) == 2
    assert "did you mean 'train'?" in capsys.readouterr().err
    assert main(["eval", str(tmp_path)]) == 1  # a folder, but no run in it
    assert "is not a run folder" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing")]) == 1
    assert "is not a folder" in capsys.readouterr().err


def test_sweep_compares_backbones_with_their_own_settings(tmp_path: Path) -> None:
    from hybridflow.experiments import run_sweep

    shared = {
        "dataset": "digits",
        "backbone_args": {"num_scales": 2, "couplings_per_scale": 1, "final_couplings": 1},
        "head_args": {"width": 8},
        "batch_size": 64,
        "max_steps": 3,
        "warmup_steps": 1,
        "progress": False,
        "eval_every": 0,
        "num_threads": 1,
    }
    resflow = {
        "backbone_args": {"num_scales": 2, "blocks_per_scale": 1, "hidden_channels": 8},
        "max_steps": 2,
    }
    with pytest.raises(ValueError, match="not swept"):
        run_sweep("bad", ["1/D"], ["realnvp"], shared, backbone_overrides={"resflow": resflow})
    out = run_sweep(
        "cmp",
        ["1/D"],
        ["realnvp", "resflow"],
        shared,
        report_root=tmp_path / "reports",
        runs_root=tmp_path / "runs",
        backbone_overrides={"resflow": resflow},
        n_samples=4,
    )
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["backbone"] for r in rows] == ["realnvp", "resflow"]
    saved = json.loads((out / "config.json").read_text())
    assert saved["backbone_overrides"]["resflow"]["max_steps"] == 2
    assert saved["backbone_overrides"]["realnvp"]["max_steps"] == 3  # the shared value
    assert "max_steps" not in saved and "backbone_args" not in saved  # they vary by backbone
    assert "Settings of `resflow` runs" in (out / "report.md").read_text()
    resflow_cfg = json.loads(
        (tmp_path / "runs" / "cmp" / "resflow-lam1overD-s0" / "config.json").read_text()
    )
    assert resflow_cfg["backbone_args"]["blocks_per_scale"] == 1
