"""Training loop: artifacts, exact resume after interruption, NaN survival, corrupt checkpoints."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_REALNVP

from hybridflow.models import HybridModel
from hybridflow.training import (
    CheckpointError,
    ConfigError,
    TrainingDivergedError,
    load_checkpoint,
    load_run,
    parse_overrides,
    resolve_config,
    train,
)

TINY = {
    "dataset": "digits",
    **TINY_REALNVP,
    "batch_size": 32,
    "max_steps": 12,
    "warmup_steps": 2,
    "log_every": 4,
    "eval_every": 1,
    "progress": False,
    "num_threads": 1,
}


def _cfg(tmp_path: Path, **kw) -> dict:
    return {**TINY, "out_dir": str(tmp_path), **kw}


def test_train_writes_artifacts_and_loads(tmp_path: Path) -> None:
    run_dir = train(_cfg(tmp_path, name="run"))
    assert json.loads((run_dir / "config.json").read_text())["max_steps"] == 12
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    train_rows = [r for r in rows if r["split"] == "train"]
    assert len(train_rows) == 3 and all(float(r["bpd"]) > 0 for r in train_rows)
    # Both loss terms are logged separately (nats and bits/dim).
    assert all(r["ce"] and r["nll_nats"] for r in train_rows)
    model, cfg = load_run(run_dir)
    assert isinstance(model, HybridModel) and not model.training and cfg["max_steps"] == 12


def test_interrupted_run_resumes_to_the_same_weights(tmp_path: Path, monkeypatch) -> None:
    straight = train(_cfg(tmp_path, name="straight"))

    original = HybridModel.loss
    calls = {"n": 0}

    def interrupt_at_step_7(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(HybridModel, "loss", interrupt_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tmp_path, name="resumed"))
    assert load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["step"] == 7
    monkeypatch.setattr(HybridModel, "loss", original)
    resumed = train(_cfg(tmp_path, name="resumed"))

    a = load_checkpoint(straight / "model.pt")["model"]
    b = load_checkpoint(resumed / "model.pt")["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=f"{key} differs after resume")


def test_training_survives_nan_losses(tmp_path: Path, monkeypatch) -> None:
    original = HybridModel.loss
    calls = {"n": 0}

    def nan_every_third(self, *args, **kwargs):
        calls["n"] += 1
        terms = original(self, *args, **kwargs)
        if calls["n"] % 3 == 0:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(HybridModel, "loss", nan_every_third)
    run_dir = train(_cfg(tmp_path, name="nan"))
    state = load_checkpoint(run_dir / "model.pt")
    assert state["nan_skips"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_persistent_nans_stop_with_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    original = HybridModel.loss

    def always_nan(self, *args, **kwargs):
        terms = original(self, *args, **kwargs)
        terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(HybridModel, "loss", always_nan)
    with pytest.raises(TrainingDivergedError, match="consecutive non-finite"):
        train(_cfg(tmp_path, name="diverged", max_nan_skips=3))


def test_corrupt_checkpoint_is_reported(tmp_path: Path) -> None:
    run_dir = tmp_path / "corrupt"
    run_dir.mkdir()
    (run_dir / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        train(_cfg(tmp_path, name="corrupt"))
    with pytest.raises(CheckpointError, match="did not finish"):
        load_run(run_dir)


def test_config_overrides_are_typed_and_checked() -> None:
    cfg = resolve_config(
        parse_overrides(
            [
                "--lr=3e-4",
                "--epochs=7",
                "--lam=1/D",
                "--progress=false",
                "--backbone_args.hidden_channels=16",
                "--data_root=/x",
            ]
        )
    )
    assert cfg["lr"] == 3e-4 and cfg["epochs"] == 7 and cfg["lam"] == "1/D"
    assert cfg["progress"] is False and cfg["backbone_args"]["hidden_channels"] == 16
    assert cfg["data_root"] == "/x"
    with pytest.raises(ConfigError, match="unknown config key"):
        resolve_config(parse_overrides(["--learning_rate=1"]))
    with pytest.raises(ConfigError, match="number"):
        resolve_config(parse_overrides(["--lr=fast"]))
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["--lr"])


FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not FASHION.is_dir(), reason="apt-get install -y dataset-fashion-mnist")
def test_short_fashion_mnist_run_from_debian_files(tmp_path: Path) -> None:
    run_dir = train(
        _cfg(
            tmp_path,
            name="fashion",
            dataset="fashion-mnist",
            max_steps=3,
            batch_size=16,
            eval_every=0,
        )
    )
    state = load_checkpoint(run_dir / "model.pt")
    assert state["data"] == {"shape": [1, 28, 28], "num_levels": 256, "num_classes": 10}


def test_random_shift_translates_with_zero_fill() -> None:
    from hybridflow.training.trainer import random_shift

    x = torch.zeros(200, 1, 5, 5, dtype=torch.uint8)
    x[:, 0, 2, 2] = 7
    shifted = random_shift(x, 1)
    assert shifted.shape == x.shape and shifted.dtype == x.dtype
    assert torch.all(shifted.sum(dim=(1, 2, 3)) == 7)  # the pixel moves, nothing else appears
    rows, cols = (shifted[:, 0] == 7).nonzero()[:, 1:].T
    assert set(rows.tolist()) == {1, 2, 3} and set(cols.tolist()) == {1, 2, 3}
    assert torch.equal(random_shift(x, 0), x)
