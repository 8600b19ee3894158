"""The speed paths of the training step and the study keep their numbers (issue 17).

The multi-tensor optimizer update, the parameters-only EMA and the 2-norm power iteration's
shortcut are claimed to give bitwise the same results as the paths they replace; the main-job
benchmark's quality comparison must flag what moved beyond the seeds' spread.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_REALNVP
from torch import nn

from hybridflow.nets.lipschitz import _dual, _keep_if_degenerate, _unit_or_keep
from hybridflow.training import load_run, train
from hybridflow.training.loop import create_ema, create_optimizer_and_scheduler

__all__: list[str] = []

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

TINY = {
    "dataset": "digits",
    **TINY_REALNVP,
    "batch_size": 32,
    "max_steps": 6,
    "warmup_steps": 2,
    "eval_every": 0,
    "progress": False,
    "num_threads": 1,
}


def _optimizer(opt: str, **opt_args) -> torch.optim.Optimizer:
    optimizer, _ = create_optimizer_and_scheduler(
        nn.Linear(3, 2),
        opt=opt,
        lr=1e-3,
        weight_decay=0.0,
        total_steps=10,
        warmup_steps=1,
        min_lr=0.0,
        warmup_lr_init=0.0,
        opt_args=opt_args,
    )
    return optimizer


def test_optimizers_get_foreach_unless_told_otherwise() -> None:
    assert _optimizer("adamw").defaults["foreach"] is True
    assert _optimizer("sgd").defaults["foreach"] is True
    assert _optimizer("adamw", foreach=False).defaults["foreach"] is False
    fused = _optimizer("adamw", fused=True).defaults
    assert fused["fused"] is True and not fused["foreach"]
    assert "foreach" not in _optimizer("adafactor").defaults  # no multi-tensor path to pick


def test_foreach_training_is_bitwise_the_per_tensor_one(tmp_path: Path) -> None:
    variants = {
        "default": {},
        "loop": {"opt_args": {"foreach": False}},
        "fused": {"opt_args": {"fused": True}},  # the same math, rounded differently
    }
    params = {
        name: dict(
            load_run(train({**TINY, "out_dir": str(tmp_path), "name": name, **extra}))[
                0
            ].named_parameters()
        )
        for name, extra in variants.items()
    }
    default, loop, fused = params["default"], params["loop"], params["fused"]
    assert default.keys() == loop.keys() == fused.keys()
    assert all(torch.equal(default[k], loop[k]) for k in default)
    assert not all(torch.equal(default[k], fused[k]) for k in default)  # the check can fail


def test_ema_averages_parameters_and_copies_buffers() -> None:
    model = nn.BatchNorm1d(3)  # parameters and a floating buffer
    ema = create_ema(model, decay=0.5, use_warmup=False)
    with torch.no_grad():
        model.weight.fill_(3.0)
        model.running_mean.fill_(4.0)
    ema.update(model, step=10)
    assert torch.equal(ema.module.weight, torch.full((3,), 2.0))  # (1 + 3) / 2
    assert torch.equal(ema.module.running_mean, torch.full((3,), 4.0))  # copied


@pytest.mark.parametrize(
    "values",
    [[0.3, -2.0, 1e-30], [0.0, 0.0, 0.0], [1.0, float("inf"), 0.0], [float("nan"), 1.0, 2.0]],
    ids=["regular", "zero", "inf", "nan"],
)
def test_power_iteration_shortcut_matches_dual_then_keep(values: list[float]) -> None:
    y, old = torch.tensor(values), torch.tensor([0.6, 0.8, 0.0])
    expected = _keep_if_degenerate(_dual(y, None), old)
    assert torch.equal(_unit_or_keep(y, old), expected)


def _results(path: Path, bpd: list[float]) -> Path:
    names = ["backbone", "lam", "seed", "accuracy", "bpd", "ece", "class_nll_ts"]
    names += ["ood/noise/nll/auroc", "ood/mean/nll/auroc"]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(names)
        for seed, value in enumerate(bpd):
            writer.writerow(["coupling", "1", seed, 0.9, value, 0.02, 0.3, 0.8, 0.8])
    return path


def test_quality_comparison_flags_moves_beyond_the_seed_spread(tmp_path: Path) -> None:
    from main_job import compare_quality

    before = _results(tmp_path / "a.csv", [2.00, 2.02])
    same = compare_quality(before, _results(tmp_path / "b.csv", [2.00, 2.02]))
    assert same["comparisons"] == 5 and same["identical"] == 5 and not same["outside"]
    noisy = compare_quality(before, _results(tmp_path / "c.csv", [2.01, 2.03]))
    assert noisy["within_seed_noise"] == 5 and noisy["identical"] == 4
    moved = compare_quality(before, _results(tmp_path / "d.csv", [2.10, 2.12]))
    assert [r["metric"] for r in moved["outside"]] == ["bpd"]
