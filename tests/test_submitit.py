"""Sweeps through submitit (issue 29), tested with its local executor: real subprocess jobs and
real pickling of the cell, no cluster."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_REALNVP

from hybridflow.cli import main
from hybridflow.experiments import run_sweep, sweep_status
from hybridflow.experiments.submitit_launcher import CellJob
from hybridflow.runs import load_checkpoint, resolve_config
from hybridflow.training import train

submitit = pytest.importorskip("submitit", reason="pip install -e .[cluster]")

TINY = {
    "dataset": "digits",
    **TINY_REALNVP,
    "batch_size": 32,
    "max_steps": 6,
    "warmup_steps": 1,
    "progress": False,
    "eval_every": 0,
    "num_threads": 1,
}
LOCAL_JOBS = {"cluster": "local", "timeout_min": 10}


def _sweep(tmp_path: Path, name: str, **kw) -> Path:
    return run_sweep(
        name,
        ["0", "1/D"],
        ["realnvp"],
        TINY,
        seeds=[0, 1],
        report_root=tmp_path / "reports",
        runs_root=tmp_path / "runs",
        n_samples=0,
        threads=1,
        **kw,
    )


def _numbers(out: Path) -> list[dict]:
    cells = json.loads((out / "results.json").read_text())["cells"]
    return [{m: s["values"] for m, s in c["metrics"].items() if m != "train_time_s"} for c in cells]


def test_submitit_jobs_give_the_local_launchers_report(tmp_path: Path) -> None:
    torch.set_default_dtype(torch.float32)  # what a job process has (the suite's may be float64)
    local = _sweep(tmp_path, "local")
    jobs = _sweep(tmp_path, "jobs", launcher="submitit", launcher_args=LOCAL_JOBS)
    assert _numbers(jobs) == _numbers(local)  # every metric of 2 λ × 2 seeds, to the last digit
    rows = sweep_status(tmp_path / "runs" / "jobs")
    assert [r["status"] for r in rows] == ["done"] * 4 and all(r["job_id"] for r in rows)
    # A rerun submits nothing: every cell is finished.
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs" / "jobs").rglob("model.pt")}
    _sweep(tmp_path, "jobs", launcher="submitit", launcher_args=LOCAL_JOBS)
    assert {p: p.stat().st_mtime_ns for p in before} == before


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
        except OSError:
            continue
        if fields[1] == str(pid):
            kids.append(int(stat.parent.name))
    return kids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the job's process through /proc")
def test_a_preempted_job_is_requeued_and_resumes_to_identical_weights(tmp_path: Path) -> None:
    torch.set_default_dtype(torch.float32)  # the reference is trained in this process
    config = {**TINY, "max_steps": 300, "checkpoint_every_s": 0.0, "lam": "1/D"}
    cell = resolve_config(base={**config, "out_dir": str(tmp_path), "name": "cell"})
    executor = submitit.AutoExecutor(folder=tmp_path / "jobs", cluster="local")
    executor.update_parameters(timeout_min=10)
    job = executor.submit(CellJob(cell, None, 1))
    checkpoint = tmp_path / "cell" / "checkpoint.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    step = load_checkpoint(checkpoint)["step"]
    assert 0 < step < 300, "preempt mid-training"
    # What SLURM does before preempting: the job's signal to the task (the controller requeues).
    for task in _children(job._process.pid):
        os.kill(task, submitit.JobEnvironment._usr_sig())
    status = job.result()
    log = Path(job.paths.stdout).read_text()
    assert "Requeued job" in log and log.count("Loading pickle") == 2
    assert status["status"] == "done"
    uninterrupted = train(resolve_config(base={**config, "out_dir": str(tmp_path), "name": "ref"}))
    resumed = load_checkpoint(tmp_path / "cell" / "model.pt")["model"]
    reference = load_checkpoint(uninterrupted / "model.pt")["model"]
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in resumed)


def test_a_failing_cell_carries_its_job_log_and_the_sweep_exits_nonzero(
    tmp_path: Path, capsys
) -> None:
    argv = ["sweep", "--name=broken", "--lams=1", "--backbones=coupling", "--seeds=0"]
    roots = [f"--runs-root={tmp_path / 'runs'}", f"--report-root={tmp_path / 'reports'}"]
    launcher = ["--launcher=submitit", "--launcher_args.cluster=local"]
    # num_scales=0 passes every config check; the builder refuses it inside the job.
    code = main([*argv, *roots, *launcher, "--max_steps=2", "--backbone_args.num_scales=0"])
    assert code == 1
    assert "1 of 1 cells failed (coupling-lam1-s0)" in capsys.readouterr().err
    report = (tmp_path / "reports" / "broken" / "report.md").read_text()
    assert "## Failures" in report and "must be non-empty" in report and "_log.err" in report

    assert main(["sweep", "--status", "broken", *roots]) == 0
    out = capsys.readouterr().out
    assert "coupling-lam1-s0" in out and "failed" in out and "_log.err" in out
    assert "1 failed" in out


def test_status_reads_without_side_effects(tmp_path: Path, capsys) -> None:
    study = tmp_path / "runs" / "study"
    (study / "a").mkdir(parents=True)
    (study / "a" / "cell.json").write_text(json.dumps({"name": "a", "status": "running"}))
    (study / "b").mkdir()
    (study / "b" / "job.json").write_text(json.dumps({"job_id": "7", "log": "7.err"}))
    before = sorted((p, p.stat().st_mtime_ns) for p in study.rglob("*"))
    assert main(["sweep", "--status", "study", f"--runs-root={tmp_path / 'runs'}"]) == 0
    out = capsys.readouterr().out
    assert "running" in out and "queued" in out and "job 7 (7.err)" in out
    assert "1 running, 1 queued" in out
    assert sorted((p, p.stat().st_mtime_ns) for p in study.rglob("*")) == before
    assert main(["sweep", "--status", "nope", f"--runs-root={tmp_path / 'runs'}"]) == 1
    assert "no study at" in capsys.readouterr().err


def test_unknown_launcher_settings_are_refused_before_anything_runs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown --launcher_args"):
        _sweep(tmp_path, "bad", launcher="submitit", launcher_args={"partion": "gpu"})
    with pytest.raises(ValueError, match="launcher must be one of local, submitit"):
        _sweep(tmp_path, "bad", launcher="slurm")
    assert not (tmp_path / "runs").exists()


def test_without_submitit_the_launcher_says_how_to_install_it(tmp_path: Path, monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_submitit(name, *args, **kwargs):
        if name == "submitit":
            raise ImportError("No module named 'submitit'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_submitit)
    with pytest.raises(ValueError, match=r"pip install -e '\.\[cluster\]'"):
        _sweep(tmp_path, "none", launcher="submitit", launcher_args=LOCAL_JOBS)


def test_a_job_with_two_tasks_trains_its_cell_with_ddp(tmp_path: Path) -> None:
    """tasks_per_node=2: the cell's two ranks train it as torchrun's would (gloo on CPU); the
    result matches one process up to the order of DDP's gradient sums."""
    torch.set_default_dtype(torch.float32)
    kw = {"seeds": [0], "report_root": tmp_path / "reports", "runs_root": tmp_path / "runs"}
    kw |= {"n_samples": 0, "threads": 1}
    one = run_sweep("one", ["1/D"], ["realnvp"], TINY, **kw)
    two = run_sweep(
        "two",
        ["1/D"],
        ["realnvp"],
        TINY,
        launcher="submitit",
        launcher_args={**LOCAL_JOBS, "tasks_per_node": 2},
        **kw,
    )
    (a,), (b,) = _numbers(one), _numbers(two)
    assert a["accuracy"] == b["accuracy"]
    assert b["bpd"] == pytest.approx(a["bpd"], rel=1e-6)
    log = next((tmp_path / "runs" / "two" / "submitit").glob("*_1_log.out")).read_text()
    assert "global_rank=1(2)" in log  # the second task ran


def test_cells_trained_by_a_train_first_pass_are_submitted_to_be_evaluated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hybridflow.experiments.grid as grid

    def interrupted(run_dir, **kw):
        raise KeyboardInterrupt  # the sitting ends after training, before any evaluation

    monkeypatch.setattr(grid, "evaluate_cell", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _sweep(tmp_path, "moved", train_first=True)
    monkeypatch.undo()
    out = _sweep(tmp_path, "moved", launcher="submitit", launcher_args=LOCAL_JOBS)
    numbers = _numbers(out)  # both λ cells evaluated, 2 seeds each: none skipped as "done"
    assert len(numbers) == 2 and all(len(cell["accuracy"]) == 2 for cell in numbers)
