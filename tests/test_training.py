"""Training loop: artifacts, exact resume after interruption, NaN survival, corrupt checkpoints."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_REALNVP

from hybridflow.data import load_dataset
from hybridflow.models import HybridModel
from hybridflow.training import (
    CheckpointError,
    ConfigError,
    TrainingDivergedError,
    load_checkpoint,
    load_config,
    load_run,
    parse_overrides,
    resolve_config,
    run_dir_for,
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


def _value(row: dict[str, str], key: str) -> float | None:
    """A metrics.csv cell as a float, ``None`` where it is empty."""
    return float(row[key]) if row[key] else None


@pytest.mark.parametrize(("lam", "weight"), [("1/D", 1 / 64), (0.25, 0.25)])
def test_every_metrics_row_obeys_the_loss_and_bits_per_dim_definitions(
    tmp_path: Path, lam: str | float, weight: float, one_thread
) -> None:
    """Oracle: the definitions ``loss = ce + λ·nll_nats`` and ``bpd = nll_nats / (D ln 2)``, with
    D = 64 from the data's shape and λ written out by hand, on every row that has the columns;
    the last validation row against ``model.pt`` scored directly on the validation split
    (``F.cross_entropy``, a numpy Brier score, ``flow.log_prob`` with predict's noise seed)."""
    val = load_dataset("digits", "val")
    dim = math.prod(val.shape)
    assert dim == 64
    # 1257 // 256 = 4 steps per epoch: two epochs end with a validation row each.
    cfg = _cfg(tmp_path, name="rows", lam=lam, batch_size=256, max_steps=8, log_every=2)
    run_dir = train(cfg)
    with (run_dir / "metrics.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        header = set(reader.fieldnames or ())
        rows = list(reader)
    assert {"split", "loss", "ce", "nll_nats", "bpd"} <= header
    checked = {"loss": 0, "bpd": 0}
    for row in rows:
        loss, ce, nll, bpd = (_value(row, k) for k in ("loss", "ce", "nll_nats", "bpd"))
        assert nll is not None and bpd is not None, row
        # Cells keep 6 significant digits: each is off by at most 5e-6 of itself.
        assert bpd == pytest.approx(nll / (dim * math.log(2)), rel=2e-5), row
        checked["bpd"] += 1
        if loss is not None:
            assert ce is not None, row
            tol = 1e-5 * (abs(loss) + abs(ce) + weight * abs(nll))
            assert loss == pytest.approx(ce + weight * nll, abs=tol), row
            checked["loss"] += 1
    train_rows = [r for r in rows if r["split"] == "train"]
    val_rows = [r for r in rows if r["split"] == "val"]
    assert len(train_rows) == 4 and checked["loss"] == 4  # every train row has a loss
    assert [r["step"] for r in val_rows] == ["4", "8"] and checked["bpd"] == 6
    assert all(r["loss"] == "" for r in val_rows)  # validation logs no training loss

    # The last validation ran on the weights model.pt holds (finalized EMA at step 8).
    model, _ = load_run(run_dir)
    x, y = val.images, val.labels
    assert len(x) <= 512  # predict's one batch: its generator draws the noise for all of x
    with torch.no_grad():
        logits = model(x, dequant_noise=0.5).logits
        log_prob = model.flow.log_prob(x, generator=torch.Generator().manual_seed(0))
    probs = logits.double().softmax(1).numpy()
    onehot = np.eye(probs.shape[1])[y.numpy()]
    expected = {
        "accuracy": (logits.argmax(1) == y).double().mean().item(),
        "class_nll": torch.nn.functional.cross_entropy(logits.double(), y).item(),
        "brier": float(((probs - onehot) ** 2).sum(1).mean()),
        "nll_nats": -log_prob.mean().item(),
        "bpd": -log_prob.mean().item() / (dim * math.log(2)),
    }
    last = val_rows[-1]
    for key, value in expected.items():
        assert _value(last, key) == pytest.approx(value, rel=1e-5, abs=1e-6), key


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
    with pytest.raises(ConfigError, match="unknown config key 'learning_rate'; did you mean 'lr'"):
        resolve_config(parse_overrides(["--learning_rate=1"]))
    with pytest.raises(ConfigError, match="did you mean 'eval_every'"):
        resolve_config(parse_overrides(["--eval_evry=1"]))
    with pytest.raises(ConfigError, match="number"):
        resolve_config(parse_overrides(["--lr=fast"]))
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["--lr"])


def test_keys_with_none_defaults_have_declared_types() -> None:
    """``--name=2024`` is a name, not an int (it crashed run_dir_for with a TypeError)."""
    cfg = resolve_config(
        parse_overrides(["--name=2024", "--data_root=7", "--max_steps=30", "--num_threads=2"])
    )
    assert cfg["name"] == "2024" and cfg["data_root"] == "7"
    assert cfg["max_steps"] == 30 and cfg["num_threads"] == 2
    assert run_dir_for({**cfg, "out_dir": "runs"}).name == "2024"
    assert resolve_config(parse_overrides(["--name=none", "--max_steps=null"]))["name"] is None
    assert resolve_config({"max_steps": 1e3})["max_steps"] == 1000  # an integral float is an int
    assert resolve_config(base={"out_dir": Path("/tmp/x")})["out_dir"] == "/tmp/x"


@pytest.mark.parametrize(
    ("source", "entry", "message"),
    [
        ("base", {"name": 2024}, "'name' expects a string or None, got 2024 (int)"),
        ("base", {"max_steps": "many"}, "'max_steps' expects an int or None, got 'many'"),
        ("base", {"num_threads": 1.5}, "'num_threads' expects an int or None, got 1.5 (float)"),
        ("base", {"epochs": True}, "'epochs' expects an int, got True (bool)"),
        ("base", {"lr": [1]}, "'lr' expects a number, got [1] (list)"),
        ("base", {"backbone_args": "wide"}, "'backbone_args' expects a dict, got 'wide'"),
        ("base", {"lam": -1}, "'lam' expects a number >= 0 or '1/D', got -1"),
        ("cli", {"lam": "1/E"}, "'lam' expects a number >= 0 or '1/D', got '1/E'"),
        ("cli", {"epochs": "2.5"}, "'epochs' expects an int, got 2.5 (float)"),
        ("cli", {"progress": "maybe"}, "'progress' expects a boolean, got 'maybe'"),
        ("json", {"seed": "zero"}, "'seed' expects an int, got 'zero'"),
        ("json", {"dataset": 3}, "'dataset' expects a string, got 3 (int)"),
    ],
)
def test_wrong_types_name_key_type_and_value(
    tmp_path: Path, source: str, entry: dict, message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        if source == "base":
            resolve_config(base=entry)
        elif source == "cli":
            resolve_config(parse_overrides([f"--{k}={v}" for k, v in entry.items()]))
        else:
            path = tmp_path / "config.json"
            path.write_text(json.dumps(entry))
            load_config(path)


def test_command_line_reports_a_wrong_type_in_one_line(tmp_path: Path, capsys) -> None:
    from hybridflow.cli import main

    assert main(["train", f"--out_dir={tmp_path}", "--epochs=many"]) == 1
    err = capsys.readouterr().err
    assert "'epochs' expects an int, got 'many'" in err and "Traceback" not in err


class _Pickled:
    """Any class instance makes a file unloadable with ``weights_only=True``."""


@pytest.mark.parametrize("filename", ["checkpoint.pt", "model.pt"])
def test_file_with_python_objects_is_refused_in_one_clear_line(
    tmp_path: Path, filename: str
) -> None:
    run_dir = tmp_path / "unsafe"
    run_dir.mkdir()
    torch.save({"model": _Pickled(), "config": {}}, run_dir / filename)
    with pytest.raises(CheckpointError) as info:
        if filename == "checkpoint.pt":
            train(_cfg(tmp_path, name="unsafe"))
        else:
            load_run(run_dir)
    text = str(info.value)
    assert "\n" not in text and len(text) < 450
    assert "arbitrary Python objects" in text and "refused for safety" in text
    assert "_Pickled" in text and "nothing in it was run" in text
    assert f"writes a valid {filename}" in text and "torch.save" in text


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
