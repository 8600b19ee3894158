"""Training at scale in one process: gradient accumulation, sharded validation predictions,
bf16 / channels-last / compile wiring and the checks of the new config keys."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_REALNVP

import hybridflow.training.setup as training_setup
import hybridflow.training.trainer as trainer
from hybridflow.data import load_dataset
from hybridflow.evaluation import predict
from hybridflow.evaluation.evaluate import merge_predictions
from hybridflow.training import load_checkpoint, load_run, train
from hybridflow.training.distributed import LossModule

#: Shared by the scale tests: 1257 digits // 256 = 4 steps per epoch, validation after each.
EPOCH_RUN = {
    **TINY_REALNVP,
    "dataset": "digits",
    "batch_size": 256,
    "epochs": 2,
    "warmup_steps": 2,
    "log_every": 2,
    "eval_every": 1,
    "progress": False,
    "num_threads": 1,
}
#: 1257 digits // 128 = 9 steps per epoch; random shifts and level perturbation.
CONFIG = {
    **EPOCH_RUN,
    "batch_size": 128,
    "max_steps": 6,
    "log_every": 3,
    "eval_every": 0,
    "augment_shift": 1,
    "perturb_rate": 0.1,
}


def metric_rows(run_dir: Path) -> list[dict[str, str]]:
    """The rows of a run's ``metrics.csv`` without ``elapsed_s`` (the one column that varies)."""
    with (run_dir / "metrics.csv").open() as f:
        return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in csv.DictReader(f)]


def assert_same_run(a: Path, b: Path) -> None:
    """Bit-identical ``model.pt`` weights and the same metrics (but ``elapsed_s``)."""
    wa, wb = load_checkpoint(a / "model.pt"), load_checkpoint(b / "model.pt")
    assert wa["step"] == wb["step"] and wa["nan_skips"] == wb["nan_skips"]
    for key, tensor in wa["model"].items():
        assert torch.equal(tensor, wb["model"][key]), f"{key} differs"
    assert metric_rows(a) == metric_rows(b)


def test_accumulation_matches_one_bigger_batch(tmp_path: Path) -> None:
    """``accum_steps`` splits the same global batch: the same inputs, noise and update."""
    one = train({**CONFIG, "out_dir": str(tmp_path), "name": "one"})
    four = train({**CONFIG, "accum_steps": 4, "out_dir": str(tmp_path), "name": "four"})
    a, b = load_checkpoint(one / "model.pt")["model"], load_checkpoint(four / "model.pt")["model"]
    for key, tensor in a.items():
        torch.testing.assert_close(b[key], tensor, msg=f"{key} differs")
    for r1, r4 in zip(metric_rows(one), metric_rows(four), strict=True):
        for key in ("loss", "ce", "nll_nats", "bpd", "accuracy"):
            assert float(r4[key]) == pytest.approx(float(r1[key]), rel=1e-5), key


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"accum_steps": 3}, "must divide into 1 process(es) × 3 accumulation step(s)"),
        ({"accum_steps": 0}, "accum_steps must be >= 1"),
        ({"loader": "disk"}, "loader must be one of auto, memory, torch"),
        ({"amp": "fp16"}, "amp must be one of none, bf16"),
    ],
)
def test_bad_scale_options_are_refused(tmp_path: Path, override: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train({**CONFIG, **override, "out_dir": str(tmp_path), "name": "x"})


def test_sharded_predictions_merge_to_the_unsharded_ones(tmp_path: Path) -> None:
    """What DDP validation does: each rank predicts every world-th batch of the split."""
    model, _ = load_run(train({**CONFIG, "out_dir": str(tmp_path), "name": "run"}))
    val = load_dataset("digits", "val")
    whole = predict(model, val, batch_size=32, dequant_samples=2)
    for world in (2, 3):
        parts = [
            predict(model, val, batch_size=32, dequant_samples=2, shard=(r, world))
            for r in range(world)
        ]
        merged = merge_predictions(parts)
        assert merged.keys() == whole.keys() and merged["dim"] == whole["dim"]
        for key in ("logits", "log_prob", "labels"):
            np.testing.assert_array_equal(merged[key], whole[key])
    # A shard with no batch at all still merges.
    parts = [predict(model, val, batch_size=512, shard=(r, 2)) for r in range(2)]
    assert len(parts[1]["labels"]) == 0
    np.testing.assert_array_equal(
        merge_predictions(parts)["log_prob"], predict(model, val)["log_prob"]
    )


def test_bf16_and_channels_last_train(tmp_path: Path) -> None:
    cfg = {**CONFIG, "amp": "bf16", "channels_last": True, "eval_every": 1, "max_steps": 9}
    rows = metric_rows(train({**cfg, "out_dir": str(tmp_path), "name": "fast"}))
    assert [r["split"] for r in rows] == ["train"] * 3 + ["val"]
    assert all(np.isfinite(float(r["bpd"])) for r in rows) and rows[-1]["ece"]


def test_compile_compiles_the_training_loss(tmp_path: Path, monkeypatch) -> None:
    """``compile=true`` hands ``prepare_model`` a module whose forward is the loss (compiling
    ``model`` alone would leave ``model.loss`` eager)."""
    calls = []

    def spy(module, **kwargs):
        calls.append((module, kwargs))
        return module

    monkeypatch.setattr(training_setup, "prepare_model", spy)
    train({**CONFIG, "compile": True, "max_steps": 1, "out_dir": str(tmp_path), "name": "c"})
    assert [kw for _, kw in calls] == [{"channels_last": False}, {"compile": True}]
    assert all(isinstance(module, LossModule) for module, _ in calls)


@pytest.mark.parametrize("accum_steps", [1, 2])
def test_a_step_reads_one_value_back_to_the_host(
    tmp_path: Path, monkeypatch, accum_steps: int
) -> None:
    """The loop's own host reads (a sync each on a GPU): one per step, whether to apply it."""
    reads, inside = [], [False]
    for name in ("__bool__", "item", "tolist", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_code
            if inside[0] and "hybridflow/training" in caller.co_filename.replace("\\", "/"):
                reads.append((_name, caller.co_name))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    epoch = trainer.train_one_epoch

    def watched_epoch(*args, **kwargs):
        inside[0] = True
        try:
            return epoch(*args, **kwargs)
        finally:
            inside[0] = False

    monkeypatch.setattr(trainer, "train_one_epoch", watched_epoch)
    cfg = {**CONFIG, "accum_steps": accum_steps, "max_steps": 4, "log_every": 1000}
    train({**cfg, "out_dir": str(tmp_path), "name": "run"})
    assert reads == [("__bool__", "_agree")] * 4


@pytest.mark.slow
def test_compiled_training_runs(tmp_path: Path) -> None:
    rows = metric_rows(train({**CONFIG, "compile": True, "out_dir": str(tmp_path), "name": "c"}))
    assert rows and all(np.isfinite(float(r["loss"])) for r in rows)
