"""Cells of a grid as cluster jobs through submitit (SLURM; its local executor for tests).

Each cell becomes one job, submitted as a job array where the scheduler has them
(``executor.batch()``). A job runs :func:`~hybridflow.experiments.grid.run_cell`, the same
function the local worker processes run, so a cell trains, evaluates and records ``cell.json``
the same way. A job with several tasks (``tasks_per_node``, ``nodes``) trains its cell with DDP
across them, as ``torchrun`` would (rank 0 records and evaluates it). On preemption or timeout
submitit calls :meth:`CellJob.checkpoint`, which resubmits the same cell: the trainer resumes
from its last ``checkpoint.pt`` (resumption is bit-identical), so the job's lost work is at most
``checkpoint_every_s``. A job that dies without recording its cell is reported with the
scheduler's state and its log path. This is the one module that knows a scheduler;
``pip install -e .[cluster]`` brings submitit.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..runs import MODEL_FILE, ConfigError
from ..runs.config import parse_free_value
from ..training import train
from .grid import (
    JOB_FILE,
    Cell,
    GridProgress,
    check_reusable,
    read_status,
    run_cell,
    write_status,
)

__all__ = ["LAUNCHER_ARGS", "CellJob", "parse_launcher_args", "run_cells_submitit"]

#: ``--launcher_args.KEY`` -> submitit's AutoExecutor parameter (its SLURM names).
LAUNCHER_ARGS = {
    "cluster": None,  # "slurm", "local" or "debug"; default: SLURM where it is, else local
    "partition": "slurm_partition",
    "timeout_min": "timeout_min",
    "gpus_per_node": "gpus_per_node",
    "cpus_per_task": "cpus_per_task",
    "mem_gb": "mem_gb",
    "array_parallelism": "slurm_array_parallelism",
    "tasks_per_node": "tasks_per_node",
    "nodes": "nodes",
}


def parse_launcher_args(args: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """Split ``--launcher_args.KEY=VALUE`` options (values parsed as JSON where they are) from
    the other command-line arguments."""
    launcher_args, rest = {}, []
    for arg in args:
        if not arg.startswith("--launcher_args."):
            rest.append(arg)
            continue
        key, sep, text = arg.removeprefix("--launcher_args.").partition("=")
        if not sep:
            raise ConfigError(f"expected --launcher_args.KEY=VALUE, got {arg!r}")
        launcher_args[key] = parse_free_value(text)
    return launcher_args, rest


def _submitit():
    try:
        import submitit  # optional dependency: the cluster extra
    except ImportError:
        raise ConfigError(
            "--launcher=submitit needs submitit: pip install -e '.[cluster]' (or pip install "
            "submitit)"
        ) from None
    return submitit


class CellJob:
    """One cell as a picklable submitit job; resubmits itself when preempted or timed out."""

    def __init__(self, config: Mapping[str, Any], evaluate: Mapping[str, Any] | None, threads):
        self.config, self.evaluate, self.threads = dict(config), evaluate, threads

    def __call__(self) -> dict[str, Any]:
        # submitit's preemption handler resubmits the job (checkpoint() below) and then raises
        # SystemExit wherever the signal lands, e.g. inside a checkpoint write, where it would
        # surface as a failed cell. End the process at once instead: a run killed at any moment
        # resumes bit-identically from its last checkpoint.pt.
        usr_signal = _submitit().JobEnvironment._usr_sig()
        requeue = signal.getsignal(usr_signal)
        if callable(requeue):

            def requeue_and_exit(signum: int, frame) -> None:
                try:
                    requeue(signum, frame)
                except SystemExit as done:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(done.code if isinstance(done.code, int) else 1)

            signal.signal(usr_signal, requeue_and_exit)
        job = _submitit().JobEnvironment()
        if job.num_tasks > 1:  # one cell over the job's tasks: DDP, as under torchrun
            _submitit().helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
            if job.global_rank != 0:  # rank 0 records the cell and evaluates it
                threads = self.threads or self.config["num_threads"]
                train({**self.config, "progress": False, "num_threads": threads})
                return {"name": self.config["name"], "rank": job.global_rank}
        return run_cell(self.config, self.evaluate, self.threads)

    def checkpoint(self, *args: Any, **kwargs: Any):
        """submitit's hook on preemption or timeout: run the same cell again; it resumes."""
        return _submitit().helpers.DelayedSubmission(
            CellJob(self.config, self.evaluate, self.threads)
        )


def _executor(folder: Path, launcher_args: Mapping[str, Any]):
    unknown = set(launcher_args) - set(LAUNCHER_ARGS)
    if unknown:
        raise ConfigError(
            f"unknown --launcher_args {sorted(unknown)}; valid: {', '.join(LAUNCHER_ARGS)}"
        )
    submitit = _submitit()
    executor = submitit.AutoExecutor(folder=folder, cluster=launcher_args.get("cluster"))
    executor.update_parameters(
        name="hybridflow-cell",
        **{LAUNCHER_ARGS[k]: v for k, v in launcher_args.items() if LAUNCHER_ARGS[k]},
    )
    return executor


def _job_failure(cell: Cell, job, error: Exception | None) -> dict[str, Any]:
    """The status of a cell whose job ended without recording one (killed, out of memory)."""
    if error is None:
        reason = "the job finished but recorded no status"
    else:  # submitit's FailedJobError, UncompletedJobError, ...
        lines = str(error).strip().splitlines()
        reason = f"{type(error).__name__}: {lines[-1] if lines else ''}"
    return {
        "name": cell.name,
        "status": "failed",
        "error": f"job {job.job_id} ended in state {job.state} ({reason}); log: {job.paths.stderr}",
        "job_id": job.job_id,
        "log": str(job.paths.stderr),
    }


def run_cells_submitit(
    cells: Sequence[Cell],
    evaluate: Mapping[str, Any] | None,
    launcher_args: Mapping[str, Any],
    threads: int | None = None,
    stream=None,
) -> dict[str, dict[str, Any]]:
    """Submit every unfinished cell as a job, wait for all, return each cell's status.

    Cells finished earlier are not submitted (their ``cell.json`` says done and evaluated, and
    ``model.pt`` exists); ``threads`` torch threads per job (default: the job's
    ``cpus_per_task``, else 1).
    """
    for cell in cells:
        check_reusable(cell)
    log_dir = cells[0].run_dir.parent / "submitit"
    executor = _executor(log_dir, launcher_args)
    per_job = threads or int(launcher_args.get("cpus_per_task") or 1)
    results: dict[str, dict[str, Any]] = {}
    todo = []
    for cell in cells:
        status = read_status(cell.run_dir)
        evaluated = status and status.get("evaluated", True)  # not after a train_first pass
        if evaluated and status.get("status") == "done" and (cell.run_dir / MODEL_FILE).exists():
            results[cell.name] = status
        else:
            todo.append(cell)
    progress = GridProgress(len(cells), len(todo) or 1, stream)
    jobs = []
    if todo:
        with executor.batch():  # one job array where the scheduler has them
            jobs = [executor.submit(CellJob(c.config, evaluate, per_job)) for c in todo]
    for cell, job in zip(todo, jobs, strict=True):
        cell.run_dir.mkdir(parents=True, exist_ok=True)
        record = {"job_id": job.job_id, "log": str(job.paths.stderr), "folder": str(log_dir)}
        (cell.run_dir / JOB_FILE).write_text(json.dumps(record, indent=2) + "\n")
        progress.started(cell.name)
    for cell, job in zip(todo, jobs, strict=True):
        error = None
        try:
            job.result()  # blocks until the job (and any requeued run of it) has ended
        except Exception as err:  # the job died; its cell may not have recorded why
            error = err
        status = read_status(cell.run_dir)
        if status is None or status.get("status") == "running":
            status = _job_failure(cell, job, error)
            write_status(cell.run_dir, status)
        elif status.get("status") == "failed" and "log" not in status:
            log = f"job {job.job_id}, log {job.paths.stderr}"
            status |= {"error": f"{status.get('error')} ({log})", "log": str(job.paths.stderr)}
            write_status(cell.run_dir, status)
        results[cell.name] = status
        progress.finished(cell.name, status)
    return {c.name: results[c.name] for c in cells}
