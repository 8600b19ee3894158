"""λ studies: train a grid of λ × backbone × seed × config values, evaluate every cell, report.

``run_sweep`` is the one command behind ``hybridflow sweep`` and the study recipes: it expands the
grid (:mod:`hybridflow.experiments.grid`), trains the cells in sequence or in worker processes
(resumable; a failing cell is reported and the others go on), evaluates each with the full
suite (:func:`~hybridflow.experiments.evaluate_cell`) and writes ``report_root/name/``
(:func:`~hybridflow.reports.study.write_study_report`).
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..data import load_dataset
from ..evaluation import categorical_bits_per_dim, uniform_bits_per_dim
from ..reports.runs import check_compatible
from ..reports.study import (
    CellResult,
    ReproductionCheck,
    aggregate,
    git_commit,
    write_study_report,
)
from ..runs import ConfigError, resolve_config, save_config
from .cell_eval import EVAL_FILE
from .grid import RUNTIME_KEYS, Cell, expand_grid, run_cells
from .submitit_launcher import run_cells_submitit

__all__ = ["SweepFailedError", "run_sweep", "sweep_baselines"]


class SweepFailedError(RuntimeError):
    """Some cells of a sweep failed; the report of the others was written to ``out``."""

    def __init__(self, out: Path, failed: Sequence[str], total: int) -> None:
        self.out, self.failed = out, list(failed)
        super().__init__(
            f"{len(self.failed)} of {total} cells failed ({', '.join(self.failed)}): see the "
            f"Failures section of {out / 'report.md'} and each cell's cell.json"
        )


def sweep_baselines(config: Mapping[str, Any]) -> dict[str, float]:
    """Reference bits/dim on the test split: per-pixel categorical (fit on train) and uniform."""
    kw = {
        "data_root": config["data_root"],
        "seed": config["seed"],
        "val_fraction": config["val_fraction"],
    }
    train_set = load_dataset(config["dataset"], "train", **kw)
    if getattr(train_set, "num_levels", None) is None or not getattr(train_set, "in_memory", True):
        return {}  # continuous data has no level baseline; file-backed sets are not read whole
    test_set = load_dataset(config["dataset"], "test", **kw)
    k = train_set.num_levels
    return {
        f"independent per-pixel categorical (add-one smoothing, fit on train), {k} levels": (
            categorical_bits_per_dim(train_set.images, test_set.images, k, alpha=1.0)
        ),
        f"uniform over {k} levels": uniform_bits_per_dim(k),
    }


def _check_ood_sets(base: Mapping[str, Any], ood: Sequence[str]) -> None:
    """Every OOD set must load and match the data's shape and alphabet."""
    test_set = load_dataset(
        base["dataset"],
        "test",
        data_root=base["data_root"],
        seed=base["seed"],
        val_fraction=base["val_fraction"],
        download=base["download"],
    )
    for spec in ood:
        set_name, _, split = spec.partition("@")
        check_compatible(
            set_name,
            load_dataset(
                set_name,
                split or "all",
                data_root=base["data_root"],
                seed=base["seed"],
                val_fraction=base["val_fraction"],
            ),
            test_set,
        )


def _split_settings(
    base: Mapping[str, Any], cells: Sequence[Cell], grid: Mapping[str, Any] | None
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The settings shared by every cell, and per backbone those that differ between backbones
    (λ, seed, name and grid keys vary per cell and are in neither)."""
    cfgs = {c.backbone: c.config for c in cells}
    varying = {"lam", "seed", "name", "backbone", *(grid or {})}
    varying |= {
        k for k in base if len({json.dumps(c[k], sort_keys=True) for c in cfgs.values()}) > 1
    }
    shared = {k: v for k, v in base.items() if k not in varying | RUNTIME_KEYS}
    per_backbone = {
        b: {
            k: c[k]
            for k in sorted(varying - {"lam", "seed", "name", "backbone"})
            if k in c and k not in (grid or {})
        }
        for b, c in cfgs.items()
    }
    return shared, {b: v for b, v in per_backbone.items() if v}


def run_sweep(
    name: str,
    lams: Sequence[str | float] = ("0", "1/D", "1"),
    backbones: Sequence[str] | None = None,
    config: Mapping[str, Any] | None = None,
    ood: Sequence[str] = (),
    report_root: str | Path = "reports",
    runs_root: str | Path = "runs",
    dequant_samples: int = 1,
    backbone_overrides: Mapping[str, Mapping[str, Any]] | None = None,
    iw_samples: int = 0,
    seeds: Sequence[int] | None = None,
    grid: Mapping[str, Sequence[Any]] | None = None,
    workers: int = 1,
    threads: int | None = None,
    typicality_batch: int = 10,
    n_samples: int = 64,
    ood_dequant_samples: int = 1,
    fid_samples: int = 0,
    overrides: Mapping[str, Any] | None = None,
    command: str | None = None,
    notes: Sequence[str | Callable[[Sequence[CellResult]], str]] = (),
    checks: Sequence[ReproductionCheck] = (),
    launcher: str = "local",
    launcher_args: Mapping[str, Any] | None = None,
    train_first: bool = False,
    stream=None,
) -> Path:
    """Train and evaluate every cell of ``backbones × lams × seeds × grid``; write the report.

    Args:
        name: Study name; runs go to ``runs_root/name/<cell>``, the report to
            ``report_root/name/``.
        lams: λ values (numbers or ``"1/D"``); loss = CE + λ · NLL.
        backbones: Backbone names (default: the config's backbone).
        config: Training config shared by every cell (see ``hybridflow.training.DEFAULTS``).
        ood: OOD datasets every cell is scored against (``NAME`` or ``NAME@SPLIT``).
        dequant_samples: Single-draw dequantization bounds averaged for test bits/dim.
        backbone_overrides: Config entries per backbone (``backbone_args``, ``epochs``, ...).
        iw_samples: If positive, also the importance-weighted bound over this many draws.
        seeds: Seeds of every cell (default: the config's seed).
        grid: Further config keys to cross (``{"lr": ["1e-3", "3e-4"]}``).
        workers: Cells trained at once, each in its own process.
        threads: Torch threads in all, divided among the workers (default: the current count).
        typicality_batch: ``M`` of the batch typicality test.
        n_samples: Samples drawn per cell for the sample grids (0: none).
        ood_dequant_samples: Single-draw bounds averaged for the likelihood-based OOD scores.
        fid_samples: If positive, the Fréchet distance of this many samples per cell to the test
            split, at temperatures 1, 0.85 and 0.7 (:mod:`hybridflow.evaluation.fid`, the
            dataset's shipped CNN features): columns ``FD (T=1)`` and ``FD (best T)``.
        overrides: Config entries applied last, over ``backbone_overrides`` (command-line
            ``--key=value`` strings, parsed by the type of each key's default).
        command: The command line that regenerates the report (default: this process's).
        notes: Paragraphs added to the report under its introduction; a callable note is
            computed from the aggregated results (``CellResult`` per cell).
        checks: A paper's claims checked on the results, one report section each (e.g.
            :data:`~hybridflow.reports.study.RESIDUAL_FLOWS_TABLE4`).
        launcher: ``"local"`` (``workers`` processes on this machine) or ``"submitit"`` (one
            cluster job per cell; see :mod:`~hybridflow.experiments.submitit_launcher`).
        launcher_args: submitit settings: ``cluster``, ``partition``, ``timeout_min``,
            ``gpus_per_node``, ``cpus_per_task``, ``mem_gb``, ``array_parallelism``,
            ``tasks_per_node``, ``nodes`` (``threads`` is then the torch threads per job).
        train_first: Train every cell before evaluating any. For a study that spans sittings
            whose evaluations are not carried over (``hybridflow sweep --pack`` keeps models,
            not evaluations), so no sitting evaluates cells that the next one evaluates again.

    Returns:
        The report folder, when every cell finished.

    Raises:
        ConfigError: A config value, λ or backbone name is wrong (before any cell starts).
        SweepFailedError: Some cells failed; the report of the others is written first.
    """
    if launcher not in ("local", "submitit"):
        raise ConfigError(f"launcher must be one of local, submitit; got {launcher!r}")
    if train_first and launcher != "local":  # a cluster's run folders outlive the sweep
        raise ConfigError("train_first is for the local launcher (cluster run folders persist)")
    threads_per_job = threads
    started = time.time()
    commit = git_commit()  # before anything is written into the (tracked) report folder
    # Overrides reach every cell; the checks below (data_root, download, ...) must see them too.
    base = resolve_config(overrides, base=config)
    backbones = list(backbones or [base["backbone"]])
    seeds = list(seeds if seeds is not None else [base["seed"]])
    runs_dir = Path(runs_root) / name
    cells = expand_grid(
        base, lams, backbones, seeds, grid, backbone_overrides, runs_dir, overrides=overrides
    )
    threads = threads or torch.get_num_threads()
    evaluate = dict(
        ood=list(ood),
        dequant_samples=dequant_samples,
        iw_samples=iw_samples,
        typicality_batch=typicality_batch,
        n_samples=n_samples,
        ood_dequant_samples=ood_dequant_samples,
    )
    if fid_samples:
        evaluate["fid_samples"] = fid_samples
    _check_ood_sets(base, ood)  # before hours of training
    if launcher == "submitit":
        statuses = run_cells_submitit(
            cells, evaluate, launcher_args or {}, threads=threads_per_job, stream=stream
        )
    else:  # with train_first, every cell trains first; a cell that failed keeps its status
        local = {"workers": workers, "threads": threads, "stream": stream}
        statuses = run_cells(cells, None if train_first else evaluate, **local)
        trained = [c for c in cells if statuses[c.name].get("status") == "done"]
        if train_first and trained:
            statuses |= run_cells(trained, evaluate, **local)
    evaluations = {}
    for cell in cells:
        path = cell.run_dir / EVAL_FILE
        if statuses[cell.name].get("status") == "done" and path.exists():
            evaluations[cell.name] = json.loads(path.read_text())
    results = aggregate(cells, statuses, evaluations)
    shared, per_backbone = _split_settings(base, cells, grid)
    out = Path(report_root) / name
    out.mkdir(parents=True, exist_ok=True)
    save_config(
        {
            **shared,
            "backbone_overrides": per_backbone,
            "lams": [str(x) for x in lams],
            "seeds": seeds,
            "grid": dict(grid or {}),
            "ood": list(ood),
        },
        out / "config.json",
    )
    bound = f"mean of {dequant_samples} single-draw bound(s)" + (
        f", and the importance-weighted bound over {iw_samples} draws (IW)" if iw_samples else ""
    )
    out = write_study_report(
        name,
        results,
        out,
        command=command or " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
        shared_config=shared,
        backbone_settings=per_backbone,
        baselines=sweep_baselines(base),
        wall_time_s=time.time() - started,
        threads=threads,
        workers=min(workers, len(cells)),
        seeds=seeds,
        bound=bound,
        notes=notes,
        checks=checks,
        commit=commit,
    )
    failed = [c.name for c in cells if statuses[c.name].get("status") != "done"]
    if failed:
        raise SweepFailedError(out, failed, len(cells))
    return out
