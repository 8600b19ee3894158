"""Where the main job's time goes, and what each speed change saves (issue 17, item 3).

The main job is ``python recipes/digits_sweep.py``: 18 cells (3 digits backbones × 3 λ × 2
seeds) trained and evaluated by 2 one-thread worker processes, then one report. Three modes:

* ``--mode=steps`` (default): the training step of each backbone, at the study's settings
  (read from ``reports/digits/config.json``), with the optimizer update, gradient clipping and
  EMA as they were (per-tensor loops, an EMA walk over the whole ``state_dict``), as they are
  (multi-tensor ``foreach`` kernels, EMA of the parameters only) and with the opt-in fused
  AdamW (``--opt_args.fused=true``), timed in turns on one thread;
  then one cell's evaluation with and without the per-run figures the study never shows.
  Medians over rounds; the ratios are what the changes save on this machine.
* ``--mode=end-to-end --revs A B``: the whole recipe at git revisions ``A`` and ``B`` (each in a
  temporary worktree, timed in turns, ``--rounds`` times each), with every quality number of
  ``B``'s report compared to ``A``'s against the seeds' spread.
* ``--mode=compare --csv A.csv B.csv``: only that comparison, for two ``results.csv`` files.

Results go to ``benchmarks/results/main_job.json`` (merged by mode).

    python benchmarks/main_job.py                                   # ~4 min
    python benchmarks/main_job.py --mode=end-to-end --revs 91e2689 HEAD --rounds=1  # ~20 min
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import RESULTS, cpu_model, environment, load_average

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "reports" / "digits"
OUT = RESULTS / "main_job.json"
# Quality numbers compared between two runs of the study: per cell (backbone × λ) the mean over
# seeds of each, against the seeds' combined spread.
QUALITY = ["accuracy", "bpd", "ece", "class_nll_ts"]
# The training step as it was (per-tensor optimizer loop and clipping, EMA over the whole
# state_dict), as it is (foreach, EMA of the parameters), and with the opt-in fused AdamW.
VARIANTS = ("per_tensor", "current", "fused")


def study_cell_config(backbone: str, lam: str = "1/D", seed: int = 0) -> dict:
    """One cell's training config, rebuilt from the committed study's ``config.json``."""
    from hybridflow.training import resolve_config

    saved = json.loads((STUDY / "config.json").read_text())
    per_backbone = saved.pop("backbone_overrides")[backbone]
    for key in ("lams", "seeds", "grid", "ood"):
        saved.pop(key)
    return resolve_config({**saved, **per_backbone, "backbone": backbone, "lam": lam, "seed": seed})


# --------------------------------------------------------------------------- steps mode


class _StepRunner:
    """A training state at the study's settings, stepped by the trainer's own pieces."""

    def __init__(self, backbone: str, run_root: Path, variant: str) -> None:
        import hybridflow.training.trainer as trainer
        from hybridflow.training.loop import DeferredInterrupts

        self.trainer = trainer
        per_tensor = variant == "per_tensor"
        cfg = study_cell_config(backbone)
        cfg |= {"out_dir": str(run_root), "name": f"{backbone}-{variant}", "progress": False}
        if variant != "current":
            cfg["opt_args"] = {"foreach": False} if per_tensor else {"fused": True}
        self.state = trainer.setup(cfg)
        self.state.ema.exclude_buffers = not per_tensor  # before: averaged the whole state_dict
        self.per_tensor = per_tensor
        self.interrupts = DeferredInterrupts()
        self.step_index = 0

    def steps(self, n: int) -> float:
        """Run ``n`` training steps; their wall seconds."""
        trainer, state = self.trainer, self.state
        clip = trainer.clip_gradients
        if self.per_tensor:
            trainer.clip_gradients = lambda model, max_norm: torch.nn.utils.clip_grad_norm_(
                model.parameters(), max_norm, foreach=False
            )
        try:
            start = time.perf_counter()
            for _ in range(n):
                epoch, into = divmod(self.step_index, state.steps_per_epoch)
                if into == 0 or not hasattr(self, "batches"):
                    self.batches = iter(trainer._epoch_inputs(state, epoch, into))
                batch_idx, images = next(self.batches)
                x, y, noise = trainer._training_batch(state, batch_idx, images)
                stats, grad_norm = trainer._forward_backward(state, x, y, noise)
                stats, finite, _, _ = trainer._agree(state, stats, grad_norm, self.interrupts)
                trainer._apply_step(state, stats, finite, epoch)
                self.step_index += 1
            return time.perf_counter() - start
        finally:
            trainer.clip_gradients = clip


def time_steps(backbones: list[str], rounds: int, steps: int) -> dict:
    """Median step time of each backbone, before and after the trainer changes (in turns)."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backbone in backbones:
            runners = {v: _StepRunner(backbone, Path(tmp), v) for v in VARIANTS}
            for runner in runners.values():
                runner.steps(3)  # warm-up
            times: dict[str, list[float]] = {k: [] for k in runners}
            for r in range(rounds):
                order = list(runners) if r % 2 == 0 else list(reversed(runners))
                for key in order:
                    times[key].append(runners[key].steps(steps) / steps)
            med = {k: statistics.median(v) for k, v in times.items()}
            out[backbone] = {f"step_ms_{v}": round(1e3 * med[v], 2) for v in VARIANTS}
            for v in VARIANTS[1:]:
                out[backbone][f"ratio_{v}_over_per_tensor"] = round(med[v] / med["per_tensor"], 3)
            print(backbone, out[backbone], flush=True)
    return out


def time_evaluation(rounds: int) -> dict:
    """One cell's study evaluation with and without the per-run figures (in turns)."""
    from hybridflow.reports import study
    from hybridflow.reports.diagnostics import calibrate_run
    from hybridflow.reports.ood import ood_run
    from hybridflow.training import train

    saved = json.loads((STUDY / "config.json").read_text())
    kw = {
        "ood": saved["ood"],
        "dequant_samples": 4,
        "typicality_batch": 10,
        "n_samples": 64,
        "ood_dequant_samples": 1,
    }
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backbone in ("coupling", "resflow-digits"):
            cfg = study_cell_config(backbone) | {"out_dir": tmp, "max_steps": 20, "progress": False}
            run_dir = train(cfg)
            times: dict[str, list[float]] = {"with_figures": [], "without_figures": []}
            for r in range(rounds):
                for figures in (True, False) if r % 2 == 0 else (False, True):
                    (run_dir / study.EVAL_FILE).unlink(missing_ok=True)
                    start = time.perf_counter()
                    study.evaluate_cell(run_dir, **kw)
                    if figures:  # what evaluate_cell drew before: both per-run figures
                        calibrate_run(run_dir)
                        ood_run(run_dir, kw["ood"], typicality_batch=10)
                    key = "with_figures" if figures else "without_figures"
                    times[key].append(time.perf_counter() - start)
            med = {k: statistics.median(v) for k, v in times.items()}
            out[backbone] = {
                "eval_s_with_figures": round(med["with_figures"], 2),
                "eval_s_without_figures": round(med["without_figures"], 2),
                "ratio": round(med["without_figures"] / med["with_figures"], 3),
            }
            print(backbone, "evaluation", out[backbone], flush=True)
    return out


# --------------------------------------------------------------------------- quality comparison


def _cells(path: Path) -> dict[tuple[str, str], dict[str, list[float]]]:
    cells: dict[tuple[str, str], dict[str, list[float]]] = {}
    with path.open() as f:
        rows = list(csv.DictReader(f))
    sets = sorted({k.split("/")[1] for k in rows[0] if k.startswith("ood/") and "mean" not in k})
    keys = QUALITY + [f"ood/{s}/nll/auroc" for s in sets]
    for row in rows:
        cell = cells.setdefault((row["backbone"], row["lam"]), {k: [] for k in keys})
        for k in keys:
            cell[k].append(float(row[k]))
    return cells


def compare_quality(before: Path, after: Path) -> dict:
    """Every quality number of ``after`` against ``before``, cell by cell.

    A difference is within seed noise when ``|mean_after - mean_before|`` is at most the seeds'
    combined standard deviation, ``sqrt(std_before² + std_after²)`` (sample std over seeds).
    """
    a, b = _cells(before), _cells(after)
    rows, within, identical = [], 0, 0
    for cell, metrics in a.items():
        for key, va in metrics.items():
            vb = b[cell][key]
            ma, mb = statistics.fmean(va), statistics.fmean(vb)
            sa = statistics.stdev(va) if len(va) > 1 else 0.0
            sb = statistics.stdev(vb) if len(vb) > 1 else 0.0
            noise = math.hypot(sa, sb)
            ok = abs(mb - ma) <= noise
            within += ok
            identical += va == vb
            rows.append(
                {
                    "backbone": cell[0],
                    "lam": cell[1],
                    "metric": key,
                    "before": round(ma, 6),
                    "after": round(mb, 6),
                    "combined_std": round(noise, 6),
                    "within_noise": ok,
                    "identical": va == vb,
                }
            )
    return {
        "comparisons": len(rows),
        "within_seed_noise": within,
        "identical": identical,
        "outside": [r for r in rows if not r["within_noise"]],
        "rows": rows,
    }


# --------------------------------------------------------------------------- end-to-end mode


def _study_wall_s(report: Path) -> float | None:
    for line in report.read_text().splitlines():
        if "wall time of this invocation" in line:
            return float(line.split("wall time of this invocation")[1].split("s")[0])
    return None


def end_to_end(revs: list[str], rounds: int) -> dict:
    """The recipe at each revision, in turns, from temporary worktrees; wall times and quality."""
    out: dict = {"revisions": {}, "rounds": rounds}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {}
        for rev in revs:
            sha = subprocess.check_output(["git", "rev-parse", rev], cwd=ROOT, text=True).strip()
            tree = Path(tmp) / sha[:12]
            subprocess.run(
                ["git", "worktree", "add", "--detach", str(tree), sha], cwd=ROOT, check=True
            )
            trees[rev] = (sha, tree)
            out["revisions"][rev] = {"commit": sha, "wall_s": [], "study_wall_s": []}
        try:
            for r in range(rounds):
                for rev in revs if r % 2 == 0 else list(reversed(revs)):
                    sha, tree = trees[rev]
                    shutil.rmtree(tree / "runs", ignore_errors=True)
                    env = {"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin", "HOME": str(tmp)}
                    env |= {k: v for k, v in __import__("os").environ.items() if k not in env}
                    load = load_average()
                    start = time.perf_counter()
                    subprocess.run(
                        [sys.executable, "recipes/digits_sweep.py"], cwd=tree, env=env, check=True
                    )
                    wall = time.perf_counter() - start
                    entry = out["revisions"][rev]
                    entry["wall_s"].append(round(wall, 1))
                    entry["study_wall_s"].append(_study_wall_s(tree / "reports/digits/report.md"))
                    entry.setdefault("load_average_before", []).append(load)
                    print(rev, f"{wall:.1f} s", flush=True)
            for rev, (_, tree) in trees.items():
                entry = out["revisions"][rev]
                entry["median_wall_s"] = statistics.median(entry["wall_s"])
                shutil.copy(tree / "reports/digits/results.csv", Path(tmp) / f"{rev}.csv")
            first, last = revs[0], revs[-1]
            out["speedup"] = round(
                out["revisions"][first]["median_wall_s"] / out["revisions"][last]["median_wall_s"],
                3,
            )
            out["quality"] = compare_quality(Path(tmp) / f"{first}.csv", Path(tmp) / f"{last}.csv")
            out["quality"].pop("rows")
        finally:
            for _, tree in trees.values():
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["steps", "end-to-end", "compare"], default="steps")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10, help="training steps per round")
    parser.add_argument("--revs", nargs="+", default=["HEAD"])
    parser.add_argument("--csv", nargs=2, type=Path)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as each of the study's two worker processes
    result: dict = {"machine": cpu_model(), **environment(1)}
    if args.mode == "steps":
        result["steps"] = time_steps(
            ["coupling", "coupling+1x1", "resflow-digits"], args.rounds, args.steps
        )
        result["evaluation"] = time_evaluation(max(3, args.rounds // 2))
    elif args.mode == "end-to-end":
        result |= end_to_end(args.revs, args.rounds)
    else:
        result["quality"] = compare_quality(*args.csv)
        result["quality"].pop("rows")
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))
    if not args.no_save:
        saved = json.loads(OUT.read_text()) if OUT.exists() else {}
        saved[args.mode] = result
        OUT.write_text(json.dumps(saved, indent=1) + "\n")


if __name__ == "__main__":
    main()
