"""Carrying a study between sittings: pack its cells' state, unpack it elsewhere, go on exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_training_resume import CONFIG as RESUME_CONFIG

import hybridflow.training.trainer as trainer
from hybridflow.cli import main
from hybridflow.experiments.carry import MANIFEST_FILE, pack_study, unpack_study
from hybridflow.runs import CheckpointError, load_checkpoint
from hybridflow.training import train

#: The exact-resumption tests' run (9 steps per epoch, 2 epochs, random shifts drawn from the
#: global RNG), checkpointed at every step so that a kill can land after any of them.
CONFIG = {**RESUME_CONFIG, "checkpoint_every_s": 0}


class _Killed(BaseException):
    """Stands in for the end of a sitting: nothing of the trainer's clean-up runs."""


def _study(runs: Path, monkeypatch, kill_at: int = 12, finished: bool = True) -> None:
    """Cell ``done`` finished; cell ``half`` killed after the checkpoint of step 12 of 18."""
    if finished:
        train({**CONFIG, "out_dir": str(runs), "name": "done"})
    original = trainer.save_checkpoint

    def save_then_die(payload, path):
        original(payload, path)
        if payload.get("step") == kill_at:
            raise _Killed

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        train({**CONFIG, "out_dir": str(runs), "name": "half"})
    monkeypatch.undo()


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "model.pt")["model"]


def test_a_packed_study_resumes_exactly_on_another_machine(tmp_path: Path, monkeypatch) -> None:
    runs, state, elsewhere = tmp_path / "runs", tmp_path / "state", tmp_path / "elsewhere"
    _study(runs, monkeypatch)
    manifest = pack_study(runs, state)
    assert {n: (c["state"], c["step"]) for n, c in manifest["cells"].items()} == {
        "done": ("finished", 18),
        "half": ("training", 12),
    }
    assert sorted(p.name for p in (state / "done").iterdir()) == [
        "config.json",
        "metrics.csv",
        "model.pt",  # no checkpoint.pt for a finished cell: a quarter of the bytes
    ]
    assert (state / "half" / "checkpoint.pt").exists()
    assert unpack_study(state, elsewhere) == {
        "done": "restored (finished)",
        "half": "restored (training, step 12)",
    }
    before = (elsewhere / "done" / "metrics.csv").read_text()
    train({**CONFIG, "out_dir": str(elsewhere), "name": "done"})  # finished: trains no further
    assert (elsewhere / "done" / "metrics.csv").read_text() == before
    resumed = train({**CONFIG, "out_dir": str(elsewhere), "name": "half"})
    straight = _weights(runs / "done")  # the same config, never interrupted
    for key, tensor in _weights(resumed).items():
        assert torch.equal(tensor, straight[key]), f"{key} differs after the carried resume"


def test_pack_and_unpack_never_go_backwards(tmp_path: Path, monkeypatch) -> None:
    runs, state = tmp_path / "runs", tmp_path / "state"
    _study(runs, monkeypatch)
    pack_study(runs, state)
    # A fresh machine that never unpacked: packing its lone cell keeps the others' state.
    fresh = tmp_path / "fresh"
    train({**CONFIG, "epochs": 1, "out_dir": str(fresh), "name": "other"})
    cells = pack_study(fresh, state)["cells"]
    assert set(cells) == {"done", "half", "other"} and cells["half"]["step"] == 12
    # A finished cell here is kept; a later checkpoint in the state replaces an earlier one.
    outcome = unpack_study(state, runs)
    assert outcome["done"] == "kept (finished)" and outcome["half"] == "kept (training, step 12)"
    train({**CONFIG, "out_dir": str(runs), "name": "half"})  # finishes here
    half = pack_study(runs, state)["cells"]["half"]
    assert half["state"] == "finished"
    assert [(s["state"], s["step"]) for s in half["sittings"]] == [
        ("training", 12),
        ("finished", 18),
    ]
    assert not (state / "half" / "checkpoint.pt").exists()


def test_a_later_packed_checkpoint_replaces_an_earlier_one_here(tmp_path, monkeypatch) -> None:
    runs, state, behind = tmp_path / "runs", tmp_path / "state", tmp_path / "behind"
    _study(runs, monkeypatch)
    pack_study(runs, state)
    _study(behind, monkeypatch, kill_at=6, finished=False)  # this machine got to step 6 only
    assert unpack_study(state, behind) == {
        "done": "restored (finished)",
        "half": "restored (training, step 12)",
    }
    assert load_checkpoint(behind / "half" / "checkpoint.pt")["step"] == 12


def test_a_pack_cut_short_leaves_a_state_that_unpacks(tmp_path: Path, monkeypatch) -> None:
    import hybridflow.experiments.carry as carry

    runs, state = tmp_path / "runs", tmp_path / "state"
    _study(runs, monkeypatch)
    pack_study(runs, state)
    train({**CONFIG, "out_dir": str(runs), "name": "half"})  # finishes
    copy = carry.shutil.copy2

    def copy_then_die(source, target):
        if Path(source).name == "model.pt" and Path(source).parent.name == "half":
            raise _Killed  # the sitting ends while the finished cell's model is copied
        return copy(source, target)

    monkeypatch.setattr(carry.shutil, "copy2", copy_then_die)
    with pytest.raises(_Killed):
        pack_study(runs, state)
    monkeypatch.undo()
    # The earlier state of the cell is intact and listed: it unpacks and resumes.
    assert unpack_study(state, tmp_path / "elsewhere")["half"] == "restored (training, step 12)"
    # The next pack finishes the job (and clears the half-copied folder).
    assert pack_study(runs, state)["cells"]["half"]["state"] == "finished"
    assert sorted(p.name for p in state.iterdir()) == [MANIFEST_FILE, "done", "half"]


def test_packing_before_any_checkpoint_writes_an_empty_state(tmp_path: Path) -> None:
    cell = tmp_path / "runs" / "fresh"
    cell.mkdir(parents=True)
    (cell / "config.json").write_text("{}")  # started, nothing saved yet
    assert pack_study(tmp_path / "runs", tmp_path / "state") == {"cells": {}}
    assert unpack_study(tmp_path / "state", tmp_path / "elsewhere") == {}


def test_unpack_refuses_a_damaged_copy(tmp_path: Path, monkeypatch) -> None:
    runs, state = tmp_path / "runs", tmp_path / "state"
    _study(runs, monkeypatch)
    pack_study(runs, state)
    model = state / "half" / "checkpoint.pt"  # the second cell: the first must not be copied
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged"):
        unpack_study(state, tmp_path / "elsewhere")
    assert not (tmp_path / "elsewhere").exists()  # checked before anything was restored
    with pytest.raises(FileNotFoundError, match=MANIFEST_FILE):
        unpack_study(tmp_path / "nothing", tmp_path / "elsewhere")


def test_a_model_without_its_checkpoint_cannot_train_further(tmp_path: Path) -> None:
    run = train({**CONFIG, "epochs": 1, "out_dir": str(tmp_path), "name": "short"})
    (run / "checkpoint.pt").unlink()
    train({**CONFIG, "epochs": 1, "out_dir": str(tmp_path), "name": "short"})  # finished
    with pytest.raises(CheckpointError, match=r"no checkpoint\.pt"):
        train({**CONFIG, "epochs": 3, "out_dir": str(tmp_path), "name": "short"})


def test_sweep_pack_and_unpack_commands(tmp_path: Path, monkeypatch, capsys) -> None:
    runs = tmp_path / "runs"
    _study(runs / "study", monkeypatch)
    state = tmp_path / "state"
    args = ["sweep", "--name", "study", "--runs-root", str(runs)]
    assert main([*args, "--pack", str(state)]) == 0
    assert "packed 2 cells" in capsys.readouterr().out
    manifest = json.loads((state / MANIFEST_FILE).read_text())
    assert manifest["cells"]["half"]["cpu"]  # the CPU it was packed on, for wall-time readers
    elsewhere = ["sweep", "--name", "study", "--runs-root", str(tmp_path / "elsewhere")]
    assert main([*elsewhere, "--unpack", str(state)]) == 0
    assert "restored (training, step 12)" in capsys.readouterr().out
    (state / "half" / "metrics.csv").write_text("damaged")
    assert main([*elsewhere, "--unpack", str(state)]) == 1
    assert "damaged" in capsys.readouterr().err
