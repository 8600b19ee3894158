"""Grids of runs: λ × backbone × seed × any config key, run in sequence or in worker processes.

A *cell* is one training run, named ``<backbone>-lam<λ>-s<seed>[-<key><value>...]`` inside
``runs_root/<study>/``. Cells are resumable: a cell whose ``model.pt`` exists with the same
config is finished and skipped; an interrupted cell resumes from its ``checkpoint.pt``. A cell that
raises is recorded (``cell.json`` with the traceback) and the other cells go on.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..models import Lambda
from ..runs import CONFIG_FILE, ConfigError, finished_config, resolve_config, run_name
from ..training import train
from .cell_eval import evaluate_cell

__all__ = [
    "JOB_FILE",
    "RUNTIME_KEYS",
    "STATUS_FILE",
    "Cell",
    "GridProgress",
    "cell_name",
    "check_reusable",
    "expand_grid",
    "finished_config",
    "parse_grid",
    "read_status",
    "run_cell",
    "run_cells",
    "sweep_status",
    "write_status",
]

#: Config keys that change how a run is executed, not what it computes: a finished cell is
#: reused whatever their values.
RUNTIME_KEYS = frozenset(
    {
        "num_threads",
        "progress",
        "device",
        "eval_batch_size",
        "checkpoint_every_s",
        "resume",
        "out_dir",
        "name",
        "data_root",
        "download",
    }
)


def cell_name(
    backbone: str, lam: str | float | Lambda, seed: int, point: Mapping[str, Any] = ()
) -> str:
    """Folder name of a cell: ``coupling-lam1overD-s0`` or ``coupling-lam0-s1-lr0.0003``."""
    return run_name(backbone, lam, seed, point)


@dataclass(frozen=True)
class Cell:
    """One run of a grid: its coordinates and its full resolved training config."""

    backbone: str
    lam: str
    seed: int
    point: tuple[tuple[str, Any], ...] = ()
    config: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def name(self) -> str:
        return cell_name(self.backbone, self.lam, self.seed, dict(self.point))

    @property
    def group(self) -> tuple[Any, ...]:
        """The cell without its seed: the seeds of one group are averaged in reports."""
        return (self.backbone, self.lam, self.point)

    @property
    def run_dir(self) -> Path:
        return Path(self.config["out_dir"]) / self.config["name"]


def parse_grid(specs: Sequence[str]) -> dict[str, list[str]]:
    """``["lr=1e-3,3e-4", "backbone_args.hidden_channels=16,32"]`` -> ``{key: [values]}``.

    Values stay strings; :func:`expand_grid` parses them with the type of the key's default.
    """
    grid: dict[str, list[str]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip().removeprefix("--")
        items = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not items:
            raise ConfigError(f"expected --grid KEY=V1,V2,..., got {spec!r}")
        if key in grid:
            raise ConfigError(f"grid key {key!r} given twice")
        grid[key] = items
    return grid


def expand_grid(
    base: Mapping[str, Any],
    lams: Sequence[str | float],
    backbones: Sequence[str],
    seeds: Sequence[int] = (0,),
    grid: Mapping[str, Sequence[Any]] | None = None,
    backbone_overrides: Mapping[str, Mapping[str, Any]] | None = None,
    out_dir: str | Path = "runs",
    overrides: Mapping[str, Any] | None = None,
) -> list[Cell]:
    """Every cell of ``backbones × lams × seeds × grid``, configs resolved (errors up front).

    Args:
        base: Training config shared by every cell.
        lams: λ values; loss = CE + λ · NLL (numbers or ``"1/D"``).
        backbones: Backbone names.
        seeds: Seeds; each sets the run's init, data order and the data split.
        grid: Further config keys and their values (``{"lr": [1e-3, 3e-4]}``).
        backbone_overrides: Config entries per backbone, applied over ``base``.
        out_dir: Folder of the cells' run folders.
        overrides: Entries applied last, over the backbone overrides (a command line's
            ``--key=value``; dotted keys address nested entries).
    """
    grid = {k: list(v) for k, v in (grid or {}).items()}
    overrides_last = dict(overrides or {})
    overrides = {k: dict(v) for k, v in (backbone_overrides or {}).items()}
    if not backbones or not lams or not seeds:
        raise ConfigError("a grid needs at least one backbone, one λ and one seed")
    unknown = set(overrides) - set(backbones)
    if unknown:
        raise ConfigError(f"backbone_overrides names backbones not swept: {sorted(unknown)}")
    reserved = {"lam", "backbone", "seed", "name", "out_dir"} & set(grid)
    if reserved:
        raise ConfigError(f"grid keys {sorted(reserved)} have their own options (lams, ...)")
    parsed = [Lambda.parse(lam) for lam in lams]  # fail on a bad λ before training anything
    cells = []
    keys = list(grid)
    for backbone, lam, seed, *values in itertools.product(
        backbones, parsed, seeds, *(grid[k] for k in keys)
    ):
        point = tuple(zip(keys, values, strict=True))
        label = lam.label
        cfg = resolve_config(
            {**(overrides_last or {}), **dict(point)},
            base=resolve_config(overrides.get(backbone, {}), base={**base, "backbone": backbone}),
        )
        cfg |= {"lam": label, "seed": int(seed), "out_dir": str(out_dir)}
        cell = Cell(backbone, label, int(seed), point, cfg)
        cfg["name"] = cell.name
        cells.append(cell)
    names = [c.name for c in cells]
    if len(set(names)) != len(names):
        raise ConfigError("grid values give duplicate cell names; make the values distinct")
    return cells


def _comparable(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in RUNTIME_KEYS}


def check_reusable(cell: Cell) -> None:
    """Refuse a cell folder that holds a run of a different config (never reuse it silently)."""
    saved_path = cell.run_dir / CONFIG_FILE
    if not saved_path.exists():
        return
    saved = resolve_config(base=json.loads(saved_path.read_text()))
    mine, theirs = _comparable(resolve_config(base=cell.config)), _comparable(saved)
    if mine != theirs:
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        raise ConfigError(
            f"{cell.run_dir} holds a run with another config (differs in {', '.join(diff)}); "
            "remove the folder or give the study another name"
        )


# --------------------------------------------------------------------------- running cells

#: File in each cell folder recording the cell's outcome (status, times, error).
STATUS_FILE = "cell.json"
#: File in a cell folder naming the cluster job that runs it (the submitit launcher writes it).
JOB_FILE = "job.json"


def write_status(run_dir: Path, status: Mapping[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f"{STATUS_FILE}.tmp"
    tmp.write_text(json.dumps(dict(status), indent=2) + "\n")
    tmp.replace(run_dir / STATUS_FILE)


def read_status(run_dir: Path) -> dict[str, Any] | None:
    """The recorded outcome of a cell (``status`` = done / failed), or ``None``."""
    path = Path(run_dir) / STATUS_FILE
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def run_cell(
    config: Mapping[str, Any],
    evaluate: Mapping[str, Any] | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Train one cell (resuming or skipping it when finished) and evaluate it; never raises.

    ``evaluate`` holds the keywords of :func:`~hybridflow.experiments.evaluate_cell` (``None``:
    train only).

    Returns (and writes to ``cell.json``) ``{"status": "done" | "failed", "evaluated",
    "train_s", "eval_s", "reused", "error", "traceback"}``. ``KeyboardInterrupt`` is passed on
    (the trainer has saved a checkpoint), so an interrupted grid resumes where it stopped.
    """
    run_dir = Path(config["out_dir"]) / config["name"]
    if threads:
        torch.set_num_threads(threads)
    status: dict[str, Any] = {"name": config["name"], "status": "running", "pid": os.getpid()}
    started = time.time()
    try:
        reused = finished_config(run_dir) is not None
        train({**config, "progress": False, "num_threads": threads or config["num_threads"]})
        status |= {"reused": reused, "train_s": time.time() - started}
        if evaluate is not None:
            t = time.time()
            evaluate_cell(run_dir, **evaluate)
            status["eval_s"] = time.time() - t
        # "done" with evaluated false: trained only (a train_first sweep's first pass)
        status |= {"status": "done", "evaluated": evaluate is not None}
    except (KeyboardInterrupt, SystemExit):
        raise  # Ctrl-C, or submitit requeueing a preempted job: the checkpoint resumes it
    except BaseException as err:  # one failing cell must not stop the others
        status |= {
            "status": "failed",
            "error": f"{type(err).__name__}: {err}",
            "traceback": traceback.format_exc(),
        }
    status["wall_s"] = time.time() - started
    write_status(run_dir, status)
    return status


class _Worker:
    """A ``python -m hybridflow.experiments.cell_worker`` process fed one job file per line."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.log = log_path.open("a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hybridflow.experiments.cell_worker"],
            stdin=subprocess.PIPE,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.cell: Cell | None = None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def submit(self, cell: Cell, evaluate: Mapping[str, Any] | None, threads: int) -> None:
        cell.run_dir.mkdir(parents=True, exist_ok=True)
        (cell.run_dir / STATUS_FILE).unlink(missing_ok=True)
        job = cell.run_dir / "cell_job.json"
        job.write_text(
            json.dumps({"config": dict(cell.config), "evaluate": evaluate, "threads": threads})
        )
        self.cell = cell
        try:
            self.proc.stdin.write(f"{job}\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # the worker died; the poll loop reports the cell as failed

    def close(self) -> None:
        if self.alive():
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
            self.proc.wait()
        self.log.close()


def _fmt_s(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class GridProgress:
    """One line per change for the whole grid: done / running / failed, elapsed and ETA."""

    def __init__(self, total: int, workers: int, stream=None) -> None:
        self.total, self.workers = total, workers
        self.stream = stream or sys.stdout
        self.start = time.time()
        self.done: list[str] = []
        self.failed: list[str] = []
        self.running: list[str] = []
        self.cell_times: list[float] = []
        self.started_at: dict[str, float] = {}

    def eta(self) -> float | None:
        left = self.total - len(self.done) - len(self.failed)
        if not self.cell_times or left == 0:
            return None if left else 0.0
        per_cell = sum(self.cell_times) / len(self.cell_times)
        return per_cell * math.ceil(left / max(1, self.workers))

    def line(self) -> str:
        eta = self.eta()
        text = (
            f"[grid] {len(self.done)}/{self.total} done · {len(self.running)} running · "
            f"{len(self.failed)} failed · elapsed {_fmt_s(time.time() - self.start)}"
        )
        if eta is not None:
            text += f" · ETA {_fmt_s(eta)}"
        if self.running:
            text += f" · now: {', '.join(self.running)}"
        return text

    def show(self, note: str = "") -> None:
        print(self.line() + (f"  ({note})" if note else ""), file=self.stream, flush=True)

    def started(self, name: str) -> None:
        self.started_at[name] = time.time()
        self.running.append(name)
        self.show()

    def finished(self, name: str, status: Mapping[str, Any]) -> None:
        if name in self.running:
            self.running.remove(name)
        took = time.time() - self.started_at.get(name, time.time())
        if status.get("status") == "done":
            self.done.append(name)
            if not status.get("reused"):  # reused cells say nothing of the time left
                self.cell_times.append(took)
            self.show(f"{name} done in {_fmt_s(took)}")
        else:
            self.failed.append(name)
            self.show(f"{name} FAILED: {status.get('error')}")


def run_cells(
    cells: Sequence[Cell],
    evaluate: Mapping[str, Any] | None = None,
    workers: int = 1,
    threads: int | None = None,
    stream=None,
) -> dict[str, dict[str, Any]]:
    """Run every cell, in sequence (``workers=1``) or in ``workers`` processes at a time.

    Each process gets ``threads // workers`` torch threads (``threads`` defaults to
    ``torch.get_num_threads()``). A cell that raises, or whose process dies, is reported and
    the others go on. ``evaluate`` holds the keywords of
    :func:`~hybridflow.experiments.evaluate_cell`, run after training in the same process.
    With workers, cells run in ``python -m hybridflow.experiments.cell_worker`` processes (so a
    hard crash loses one cell, and linear recipe scripts are never re-imported) whose output
    goes to ``worker<i>.log`` beside the cells.

    Returns:
        The status of every cell by name (see :func:`run_cell`).
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    for cell in cells:
        check_reusable(cell)
    total_threads = threads or torch.get_num_threads()
    workers = min(workers, len(cells)) or 1
    per_worker = max(1, total_threads // workers)
    progress = GridProgress(len(cells), workers, stream)
    results: dict[str, dict[str, Any]] = {}
    if workers == 1:
        for cell in cells:
            progress.started(cell.name)
            results[cell.name] = run_cell(cell.config, evaluate, per_worker)
            progress.finished(cell.name, results[cell.name])
        return results

    # Long-lived worker processes (importing torch and the package costs seconds per
    # process); each takes one cell at a time through its stdin. A worker that dies (segfault,
    # out-of-memory kill) fails its cell only and is replaced.
    log_dir = cells[0].run_dir.parent
    log_dir.mkdir(parents=True, exist_ok=True)
    pool = [_Worker(log_dir / f"worker{i}.log") for i in range(workers)]
    pending = list(cells)
    try:
        while pending or any(w.cell for w in pool):
            for i, worker in enumerate(pool):
                if worker.cell is None and pending:
                    if not worker.alive():
                        worker = pool[i] = _Worker(worker.log_path)
                    cell = pending.pop(0)
                    worker.submit(cell, evaluate, per_worker)
                    progress.started(cell.name)
            time.sleep(0.2)
            for worker in pool:
                cell = worker.cell
                if cell is None:
                    continue
                status = read_status(cell.run_dir)
                if status is None or status.get("status") == "running":
                    if worker.alive():
                        continue
                    status = {
                        "name": cell.name,
                        "status": "failed",
                        "error": f"worker process died (exit code {worker.proc.returncode}); "
                        f"see {worker.log_path}",
                    }
                    write_status(cell.run_dir, status)
                worker.cell = None
                results[cell.name] = status
                progress.finished(cell.name, status)
    except KeyboardInterrupt:
        for worker in pool:
            worker.proc.terminate()  # SIGTERM: the trainer checkpoints before exiting
        raise
    finally:
        for worker in pool:
            worker.close()
    return {c.name: results[c.name] for c in cells}


def sweep_status(runs_dir: str | Path) -> list[dict[str, Any]]:
    """The state of every cell folder of a study (``runs_root/NAME``), read without side effects:
    ``done``, ``trained`` (not yet evaluated: a ``train_first`` sweep), ``running``, ``failed``
    (with the error) or ``queued`` (a submitted job that has not started), with the job id and
    log of submitit cells."""
    if not Path(runs_dir).is_dir():
        raise FileNotFoundError(f"no study at {runs_dir}: give the name a sweep ran under")
    rows = []
    for folder in sorted(p for p in Path(runs_dir).iterdir() if p.is_dir()):
        job_file = folder / JOB_FILE
        if not any((folder / f).exists() for f in (CONFIG_FILE, STATUS_FILE, JOB_FILE)):
            continue
        status = read_status(folder) or {}
        job = json.loads(job_file.read_text()) if job_file.exists() else {}
        rows.append(
            {
                "cell": folder.name,
                "status": (
                    "trained"
                    if status.get("evaluated") is False and status["status"] == "done"
                    else status.get("status", "queued" if job else "not started")
                ),
                "error": status.get("error"),
                "job_id": job.get("job_id"),
                "log": job.get("log"),
            }
        )
    return rows
