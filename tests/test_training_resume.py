"""Exact resumption: after a crash at any point, the resumed run ends with the same ``model.pt``
weights (bit for bit) and the same ``metrics.csv`` (but ``elapsed_s``) as a run never stopped.

Crashes are simulated deterministically: a ``BaseException`` raised from a chosen call stands in
for SIGKILL (none of the trainer's clean-up runs), plus one real SIGKILL of a subprocess.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import TINY_REALNVP
from timm.utils import ModelEmaV3

import hybridflow.training.trainer as trainer
from hybridflow.models import HybridModel
from hybridflow.training import CheckpointError, load_checkpoint, train

#: 1257 digits // 128 = 9 steps per epoch: validations at steps 9 and 18, train rows every 4.
CONFIG = {
    **TINY_REALNVP,
    "dataset": "digits",
    "batch_size": 128,
    "epochs": 2,
    "warmup_steps": 2,
    "log_every": 4,
    "eval_every": 1,
    "augment_shift": 1,  # draws from the global RNG before the loss: resume must replay it
    "progress": False,
    "num_threads": 1,
}


class _Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, not a KeyboardInterrupt, so nothing is saved."""


def _call_hook(target, name: str, monkeypatch, at: int, action) -> None:
    """Run ``action()`` instead of ``target.name`` on its ``at``-th call (1-based)."""
    original, calls = getattr(target, name), {"n": 0}

    def hooked(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at:
            action(*args, **kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, hooked)


def _kill(*args, **kwargs):
    raise _Killed


_STRAIGHT: dict[str, Path] = {}


def _straight(tmp_path_factory, **kw) -> Path:
    """An uninterrupted run of ``CONFIG | kw`` (trained once per session)."""
    key = repr(sorted(kw.items()))
    if key not in _STRAIGHT:
        out = tmp_path_factory.mktemp("straight")
        _STRAIGHT[key] = train({**CONFIG, **kw, "out_dir": str(out), "name": "run"})
    return _STRAIGHT[key]


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open() as f:
        return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in csv.DictReader(f)]


def _assert_same_run(resumed: Path, straight: Path) -> None:
    a = load_checkpoint(straight / "model.pt")
    b = load_checkpoint(resumed / "model.pt")
    assert a["step"] == b["step"] and a["nan_skips"] == b["nan_skips"]
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), f"{key} differs after resume"
    assert _rows(resumed) == _rows(straight)
    assert not list(resumed.glob("*.tmp"))


def test_kill_during_checkpoint_write(tmp_path: Path, tmp_path_factory, monkeypatch) -> None:
    """Killed while writing the step-8 checkpoint, after step 8's train row was logged."""
    cfg = {**CONFIG, "checkpoint_every_s": 0, "out_dir": str(tmp_path), "name": "run"}
    _call_hook(torch, "save", monkeypatch, at=8, action=_kill_leaving_empty_file)
    with pytest.raises(_Killed):
        train(cfg)
    run_dir = tmp_path / "run"
    assert (run_dir / "checkpoint.pt.tmp").stat().st_size == 0
    assert load_checkpoint(run_dir / "checkpoint.pt")["step"] == 7
    assert _rows(run_dir)[-1]["step"] == "8"  # logged after the checkpoint's step
    monkeypatch.undo()
    _assert_same_run(train(cfg), _straight(tmp_path_factory, checkpoint_every_s=0))


def _kill_leaving_empty_file(payload, f, *args, **kwargs):
    if isinstance(f, str | Path):  # a writer that opens the path itself
        Path(f).touch()
    raise _Killed


@pytest.mark.parametrize("checkpoint_every_s", [0, 120])
def test_kill_at_epoch_boundary_before_validation(
    tmp_path: Path, tmp_path_factory, monkeypatch, checkpoint_every_s: float
) -> None:
    """Killed at the end of epoch 1, after its last step's checkpoint, before its validation."""
    cfg = {**CONFIG, "checkpoint_every_s": checkpoint_every_s}
    cfg |= {"out_dir": str(tmp_path), "name": "run"}
    _call_hook(trainer, "predict", monkeypatch, at=1, action=_kill)
    with pytest.raises(_Killed):
        train(cfg)
    run_dir = tmp_path / "run"
    assert load_checkpoint(run_dir / "checkpoint.pt")["step"] == 9
    assert [r["split"] for r in _rows(run_dir)] == ["train", "train"]
    monkeypatch.undo()
    _assert_same_run(train(cfg), _straight(tmp_path_factory, checkpoint_every_s=0))


def test_interrupt_inside_a_step_saves_the_step_boundary(
    tmp_path: Path, tmp_path_factory, monkeypatch
) -> None:
    """Ctrl-C in the forward pass of step 7 (its random shift already drawn) and mid log window:
    the checkpoint holds step 6 with the RNG and running statistics of that boundary."""
    cfg = {**CONFIG, "out_dir": str(tmp_path), "name": "run"}

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    _call_hook(HybridModel, "loss", monkeypatch, at=7, action=interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 6
    monkeypatch.undo()
    _assert_same_run(train(cfg), _straight(tmp_path_factory, checkpoint_every_s=0))


def test_sigterm_during_an_update_waits_for_the_step_to_finish(
    tmp_path: Path, tmp_path_factory, monkeypatch
) -> None:
    """SIGTERM between the optimizer step and the EMA update of step 5 stops after step 5."""
    cfg = {**CONFIG, "out_dir": str(tmp_path), "name": "run"}

    def sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)

    _call_hook(ModelEmaV3, "update", monkeypatch, at=5, action=sigterm)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    assert signal.getsignal(signal.SIGTERM) is not None  # the handler was restored
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 5
    monkeypatch.undo()
    _assert_same_run(train(cfg), _straight(tmp_path_factory, checkpoint_every_s=0))


def test_sigkill_of_a_training_process(tmp_path: Path, tmp_path_factory) -> None:
    """A real ``kill -9`` of a training process at step 13, then an in-process resume."""
    cfg = {**CONFIG, "checkpoint_every_s": 0, "out_dir": str(tmp_path), "name": "run"}
    script = textwrap.dedent(
        f"""
        import os, signal, torch
        from hybridflow.models import HybridModel
        from hybridflow.training import train

        torch.set_default_dtype(torch.{str(torch.get_default_dtype()).split(".")[1]})
        original, calls = HybridModel.loss, [0]

        def loss(self, *args, **kwargs):
            calls[0] += 1
            if calls[0] == 14:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, *args, **kwargs)

        HybridModel.loss = loss
        train({cfg!r})
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 13
    _assert_same_run(train(cfg), _straight(tmp_path_factory, checkpoint_every_s=0))


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """A 4 MiB tmpfs (needs root and permission to mount)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        # Lazily: a file a failed test left open must not keep the mount alive.
        subprocess.run(["umount", "--lazy", str(mount)], check=False)


def test_full_disk_keeps_the_previous_checkpoint(
    small_tmpfs: Path, tmp_path_factory, monkeypatch
) -> None:
    cfg = {**CONFIG, "checkpoint_every_s": 0, "out_dir": str(small_tmpfs), "name": "run"}
    filler = small_tmpfs / "filler"

    def fill_disk(*args, **kwargs):
        with filler.open("wb", buffering=0) as f, pytest.raises(OSError):
            while True:  # until ENOSPC
                f.write(b"\0" * 65536)

    _call_hook(HybridModel, "loss", monkeypatch, at=6, action=fill_disk)
    with pytest.raises(CheckpointError, match=r"could not write .*checkpoint\.pt \(no space left"):
        train(cfg)
    run_dir = small_tmpfs / "run"
    assert load_checkpoint(run_dir / "checkpoint.pt")["step"] == 5  # the previous one, intact
    assert not list(run_dir.glob("*.tmp"))
    monkeypatch.undo()
    filler.unlink()
    _assert_same_run(train(cfg), _straight(tmp_path_factory, checkpoint_every_s=0))
