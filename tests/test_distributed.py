"""Data-parallel training: ``torchrun`` with 2 CPU processes (gloo) against one process.

One straight 2-process run (DDP, 2 accumulation steps, the DataLoader reader, random shifts and
level perturbation, a NaN loss on rank 1 only at step 2) must match a single process with the
same global batch, and a 2-process run killed by SIGKILL right after a checkpoint must resume to
the straight run's weights and metrics exactly.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from test_training_scale import EPOCH_RUN, assert_same_run, metric_rows

from hybridflow.training import load_checkpoint, train

#: Validations at steps 4 and 8 (3 batches of the 180 validation digits: ranks share them);
#: random shifts and level perturbation; a checkpoint every step.
CONFIG = {
    **EPOCH_RUN,
    "eval_batch_size": 64,
    "augment_shift": 1,
    "perturb_rate": 0.1,
    "checkpoint_every_s": 0,
}
#: What the 2-process runs change: nothing that moves the numbers beyond float rounding.
DDP = {"accum_steps": 2, "loader": "torch"}
NAN_STEP, KILL_STEP = 2, 5


def _inject(nan_step: int, kill_step: int, setattr: Callable = setattr) -> None:
    """Poison the last rank's loss at step ``nan_step`` (so only its gradients are NaN), and
    SIGKILL rank 0 right after it saved the checkpoint of step ``kill_step``."""
    import os
    import signal

    import hybridflow.training.trainer as trainer
    from hybridflow.models import HybridModel

    forward_backward, loss, save = (
        trainer._forward_backward,
        HybridModel.loss,
        trainer.save_training_checkpoint,
    )
    poisoned = [False]

    def poisoned_forward_backward(state, *args):
        poisoned[0] = state.step == nan_step and state.dist.rank == state.dist.world_size - 1
        return forward_backward(state, *args)

    def poisoned_loss(self, *args, **kwargs):
        terms = loss(self, *args, **kwargs)
        if poisoned[0]:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    def save_then_die(state):
        save(state)
        if state.step == kill_step and state.dist.rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)

    setattr(trainer, "_forward_backward", poisoned_forward_backward)
    setattr(HybridModel, "loss", poisoned_loss)
    setattr(trainer, "save_training_checkpoint", save_then_die)


def _torchrun(
    tmp_path: Path, out_dir: Path, dtype: str, kill_step: int = -1
) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2`` of ``hybridflow train`` with the injections,
    models in ``dtype`` (the suite's ``--dtype``)."""
    script = tmp_path / "worker.py"
    script.write_text(
        "from __future__ import annotations\n\n"
        + textwrap.dedent(inspect.getsource(_inject))
        + textwrap.dedent(
            f"""
            import sys
            import torch
            from hybridflow.cli import main

            torch.set_default_dtype(torch.{dtype})
            _inject({NAN_STEP}, {kill_step})
            sys.exit(main(sys.argv[1:]))
            """
        )
    )
    args = [f"--{k}={v}" for k, v in {**CONFIG, **DDP}.items() if not isinstance(v, dict)]
    args += [f"--{g}.{k}={v}" for g in ("backbone_args", "head_args") for k, v in CONFIG[g].items()]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node=2", str(script), "train", f"--out_dir={out_dir}", "--name=run"]
    return subprocess.run(command + args, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, request) -> Path:
    """An uninterrupted 2-process run."""
    tmp = tmp_path_factory.mktemp("ddp")
    proc = _torchrun(tmp, tmp / "runs", request.config.getoption("--dtype"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "runs" / "run"


def test_two_processes_match_one_with_the_same_global_batch(
    straight: Path, tmp_path: Path, monkeypatch
) -> None:
    _inject(NAN_STEP, -1, monkeypatch.setattr)
    one = train({**CONFIG, "out_dir": str(tmp_path), "name": "one"})
    a, b = load_checkpoint(one / "model.pt"), load_checkpoint(straight / "model.pt")
    assert a["step"] == b["step"] == 8 and a["nan_skips"] == b["nan_skips"] == 1
    for key, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][key], tensor, msg=f"{key} differs")
    rows_one, rows_two = metric_rows(one), metric_rows(straight)
    assert [r["split"] for r in rows_two] == ["train", "train", "val"] * 2
    for r1, r2 in zip(rows_one, rows_two, strict=True):
        assert r1.keys() == r2.keys()
        for key in r1:  # logged with 6 significant digits
            if r1[key] and key not in ("step", "epoch", "split", "nan_skips"):
                assert float(r2[key]) == pytest.approx(float(r1[key]), rel=2e-5, abs=1e-7), key
            else:
                assert r1[key] == r2[key], key


def test_killed_two_process_run_resumes_exactly(straight: Path, tmp_path: Path, request) -> None:
    dtype = request.config.getoption("--dtype")
    proc = _torchrun(tmp_path, tmp_path / "runs", dtype, kill_step=KILL_STEP)
    assert proc.returncode != 0, proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "run"
    saved = load_checkpoint(run_dir / "checkpoint.pt")
    assert saved["step"] == KILL_STEP and len(saved["rng_ranks"]) == 2
    assert not (run_dir / "model.pt").exists()
    proc = _torchrun(tmp_path, tmp_path / "runs", dtype)  # the same command resumes
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(run_dir, straight)
