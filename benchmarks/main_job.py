"""Where the main job's time goes, and what each speed change saves (issue 17, item 3).

The main job is ``python recipes/digits_sweep.py``: 18 cells (3 digits backbones × 3 λ × 2
seeds) trained and evaluated by 2 one-thread worker processes, then one report. Three modes:

* ``--mode=steps`` (default): on each backbone's model at the study's settings (read from
  ``reports/digits/config.json``), what a training step does after its backward pass, as it
  was (per-tensor optimizer loop and clipping, an EMA walk over the whole ``state_dict``), as it
  is (``foreach`` kernels, EMA of the parameters) and with the opt-in fused AdamW, timed in turns
  on one thread, with the median full step for scale; then one cell's evaluation with and
  without the per-run figures the study never shows. (Whole steps timed in turns differ by
  ±15% on this shared machine, more than these changes save, so the pieces are timed alone.)
* ``--mode=end-to-end --revs A B``: the whole recipe at git revisions ``A`` and ``B`` (each in a
  temporary worktree, timed in turns, ``--rounds`` times each), with every quality number of
  ``B``'s report compared to ``A``'s against the seeds' spread.
* ``--mode=compare --csv A.csv B.csv``: only that comparison, for two ``results.csv`` files.

Results go to ``benchmarks/results/main_job.json`` (merged by mode).

    python benchmarks/main_job.py                                   # ~3 min
    python benchmarks/main_job.py --mode=end-to-end --revs 91e2689 HEAD --rounds=1  # ~20 min
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
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


def study_cell_config(backbone: str, lam: str = "1/D", seed: int = 0) -> dict:
    """One cell's training config, rebuilt from the committed study's ``config.json``."""
    from hybridflow.training import resolve_config

    saved = json.loads((STUDY / "config.json").read_text())
    per_backbone = saved.pop("backbone_overrides")[backbone]
    for key in ("lams", "seeds", "grid", "ood"):
        saved.pop(key)
    return resolve_config({**saved, **per_backbone, "backbone": backbone, "lam": lam, "seed": seed})


# --------------------------------------------------------------------------- steps mode


def _step_ms(backbone: str, run_root: Path, steps: int) -> float:
    """Median time of the study's training step for ``backbone`` (trainer's own pieces)."""
    import hybridflow.training.trainer as trainer
    from hybridflow.training.loop import DeferredInterrupts

    cfg = study_cell_config(backbone) | {"out_dir": str(run_root), "progress": False}
    state = trainer.setup(cfg)
    interrupts, times = DeferredInterrupts(), []
    batches = iter(trainer._epoch_inputs(state, 0, 0))
    for i in range(min(steps, state.steps_per_epoch)):
        start = time.perf_counter()
        x, y, noise = trainer._training_batch(state, *next(batches))
        stats, grad_norm = trainer._forward_backward(state, x, y, noise)
        stats, finite, _, _ = trainer._agree(state, stats, grad_norm, interrupts)
        trainer._apply_step(state, stats, finite, 0)
        if i >= 3:  # warm-up
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def time_update(backbones: list[str], rounds: int, calls: int = 20) -> dict:
    """What a step does after its backward pass, each way, timed in turns on the study's models.

    Optimizer update (AdamW: per-tensor loop, ``foreach``, ``fused``), gradient clipping
    (per-tensor, ``foreach``) and the EMA update (whole ``state_dict``, parameters only), on each
    backbone's hybrid model with random gradients; with the median full step for scale.
    """
    from timm.utils import ModelEmaV3

    from hybridflow.data import load_dataset
    from hybridflow.runs import build_model_for, data_info

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backbone in backbones:
            cfg = study_cell_config(backbone)
            info = data_info(load_dataset("digits", "train", seed=0, val_fraction=0.1))
            model = build_model_for(cfg, info)
            params = list(model.parameters())
            for p in params:
                p.grad = torch.randn_like(p)
            adamw = {
                name: torch.optim.AdamW(params, lr=1e-3, weight_decay=5e-4, **kw)
                for name, kw in (
                    ("per_tensor", {"foreach": False}),
                    ("foreach", {"foreach": True}),
                    ("fused", {"fused": True}),
                )
            }
            emas = {
                "state_dict": ModelEmaV3(model, decay=0.998),
                "parameters": ModelEmaV3(model, decay=0.998, exclude_buffers=True),
            }
            pieces = {f"adamw_{k}": opt.step for k, opt in adamw.items()}
            for foreach in (False, True):
                name = f"clip_{'foreach' if foreach else 'per_tensor'}"
                pieces[name] = lambda f=foreach, ps=params: torch.nn.utils.clip_grad_norm_(
                    ps, 50.0, foreach=f
                )
            for name, ema in emas.items():
                pieces[f"ema_{name}"] = lambda e=ema, m=model: e.update(m, step=100)
            times: dict[str, list[float]] = {k: [] for k in pieces}
            for r in range(rounds + 1):
                for name in list(pieces) if r % 2 == 0 else list(reversed(pieces)):
                    start = time.perf_counter()
                    for _ in range(calls):
                        pieces[name]()
                    if r:  # round 0 warms up
                        times[name].append((time.perf_counter() - start) / calls)
            entry = {f"{k}_ms": round(1e3 * statistics.median(v), 3) for k, v in times.items()}
            before = entry["adamw_per_tensor_ms"] + entry["clip_per_tensor_ms"]
            before += entry["ema_state_dict_ms"]
            after = entry["adamw_foreach_ms"] + entry["clip_foreach_ms"]
            after += entry["ema_parameters_ms"]
            entry |= {
                "tensors": len(params),
                "parameters": sum(p.numel() for p in params),
                "update_ms_before": round(before, 3),
                "update_ms_now": round(after, 3),
                "step_ms_now": round(_step_ms(backbone, Path(tmp), 24), 1),
            }
            out[backbone] = entry
            print(backbone, entry, flush=True)
    return out


def time_evaluation(rounds: int) -> dict:
    """One cell's study evaluation as it is, and as it was: drawing the per-run reliability and
    OOD histogram figures (in turns)."""
    from hybridflow.experiments import cell_eval
    from hybridflow.training import train

    saved = json.loads((STUDY / "config.json").read_text())
    kw = {
        "ood": saved["ood"],
        "dequant_samples": 4,
        "typicality_batch": 10,
        "n_samples": 64,
        "ood_dequant_samples": 1,
    }
    plain = {"calibrate": cell_eval.calibrate_run, "ood": cell_eval.ood_run}

    def evaluate(run_dir: Path, figures: bool) -> float:
        (run_dir / cell_eval.EVAL_FILE).unlink(missing_ok=True)
        if figures:  # the names evaluate_cell calls: its figures=False is overridden
            drawn = {"figures": True}
            cell_eval.calibrate_run = lambda *a, **k: plain["calibrate"](*a, **k | drawn)
            cell_eval.ood_run = lambda *a, **k: plain["ood"](*a, **k | drawn)
        try:
            start = time.perf_counter()
            cell_eval.evaluate_cell(run_dir, **kw)
            return time.perf_counter() - start
        finally:
            cell_eval.calibrate_run, cell_eval.ood_run = plain["calibrate"], plain["ood"]

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backbone in ("coupling", "resflow-digits"):
            cfg = study_cell_config(backbone) | {"out_dir": tmp, "max_steps": 20, "progress": False}
            run_dir = train(cfg)
            times: dict[bool, list[float]] = {True: [], False: []}
            for r in range(rounds):
                for figures in (True, False) if r % 2 == 0 else (False, True):
                    times[figures].append(evaluate(run_dir, figures))
            with_figures, without = (statistics.median(times[f]) for f in (True, False))
            out[backbone] = {
                "eval_s_with_figures": round(with_figures, 2),
                "eval_s_without_figures": round(without, 2),
                "ratio": round(without / with_figures, 3),
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
                    env = {**os.environ, "PYTHONPATH": str(tree)}  # that revision's package
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
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--revs", nargs="+", default=["HEAD"])
    parser.add_argument("--csv", nargs=2, type=Path)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as each of the study's two worker processes
    result: dict = {"machine": cpu_model(), **environment(1)}
    if args.mode == "steps":
        result["update"] = time_update(["coupling", "coupling+1x1", "resflow-digits"], args.rounds)
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
