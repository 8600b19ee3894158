"""Peak memory and step time of the Residual Flow log-det gradient modes (CPU MNIST).

One training step of the CPU MNIST configuration (``resflow-cpu``, 1×28×28, batch 64, hybrid
loss CE + λ·NLL with λ = 1/D, head width 256, Adam), with a 10-term power series
(``logdet="series", n_terms=10``), in three gradient modes:

* ``naive``: backprop through every series term (``grad="backprop", memory_efficient=False``);
* ``neumann``: Neumann-series gradient (``grad="neumann", memory_efficient=False``);
* ``memory-efficient``: Neumann gradient computed in the forward (``memory_efficient=True``).

Every mode runs in its own subprocess (the script re-invokes itself with ``--child MODE``) so
peak RSS (``ru_maxrss``) belongs to that mode alone. The child reports peak RSS before the first
step (baseline: imports, data, model, ActNorm init, optimizer) and after ``--warmup`` + ``--steps``
steps, their difference ("peak over baseline", what the training step itself added), and the
median step time after the warmup.

Targets: memory-efficient peak RSS ≤ 0.5× naive, and its step time no worse than naive.

Step times are only comparable on an otherwise idle machine: other jobs on the same cores make
steps several times slower. Each child records the load average and every step's CPU/wall
ratio, and reports a second median over the steps that had their cores to themselves
("clean"); ``--wait-idle S`` makes the parent wait up to S seconds for a quiet machine
(1-minute load ≤ ``--max-load``) before each mode.

    python benchmarks/resflow_memory.py [--threads 2] [--steps 5] [--warmup 1] [--batch-size 64]
                                        [--wait-idle 0] [--max-load 0.5]

Writes benchmarks/results/resflow_memory.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

# The script's own folder is on sys.path when it runs as `python benchmarks/...`.
from _common import (
    RESULTS,
    build_hybrid,
    contention_summary,
    current_rss_gib,
    environment,
    load_average,
    load_mnist,
    max_rss_gib,
    source_digest,
    timed_hybrid_steps,
    wait_for_idle,
)

SERIES = {"logdet": "series", "n_terms": 10}
MODES: dict[str, dict] = {
    "naive": {"grad": "backprop", "memory_efficient": False},
    "neumann": {"grad": "neumann", "memory_efficient": False},
    "memory-efficient": {"grad": "neumann", "memory_efficient": True},
}
MEMORY_TARGET = 0.5  # memory-efficient peak RSS over naive
TIME_TARGET = 1.0  # memory-efficient step time over naive


def run_child(args: argparse.Namespace) -> dict:
    """Measure one mode in this process; return what the parent records."""
    torch.set_num_threads(args.threads)
    n_batches = args.warmup + args.steps
    x_all, y_all, source = load_mnist(args.batch_size * n_batches, seed=args.seed)
    batches = list(zip(x_all.split(args.batch_size), y_all.split(args.batch_size), strict=True))
    backbone_kw = {**SERIES, **MODES[args.child]}
    model = build_hybrid(backbone_kw, seed=args.seed, head_width=args.head_width)
    model.data_init(batches[0][0])
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    # Same RNG state in every mode from here on: the probes and dequantization noise match.
    torch.manual_seed(args.seed + 1)
    baseline_peak, baseline_now = max_rss_gib(), current_rss_gib()

    load_start = load_average()
    times, cpu_over_wall, losses = timed_hybrid_steps(model, opt, batches, args.warmup)
    peak = max_rss_gib()
    return {
        "mode": args.child,
        "hybridflow_source_sha256_16": source_digest(),
        "backbone_args": backbone_kw,
        "data": source,
        "parameters": sum(p.numel() for p in model.parameters()),
        "baseline_peak_rss_gib": baseline_peak,
        "baseline_current_rss_gib": baseline_now,
        "peak_rss_gib": peak,
        "peak_over_baseline_gib": peak - baseline_peak,
        "median_step_s": statistics.median(times),
        "step_times_s": times,
        **contention_summary(times, cpu_over_wall, args.threads),
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "losses": losses,
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def child_command(args: argparse.Namespace, mode: str) -> list[str]:
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        mode,
        *("--threads", str(args.threads), "--steps", str(args.steps)),
        *("--warmup", str(args.warmup), "--batch-size", str(args.batch_size)),
        *("--head-width", str(args.head_width), "--lr", str(args.lr), "--seed", str(args.seed)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps after the warmup")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--head-width", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument(
        "--wait-idle", type=float, default=0.0, help="wait ≤ this many s for a quiet box per mode"
    )
    parser.add_argument("--max-load", type=float, default=0.5, help="'quiet': 1-min load average")
    parser.add_argument("--child", choices=list(MODES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        # The parent reads the last stdout line; anything the package prints goes before it.
        print(json.dumps(run_child(args)), flush=True)
        return

    modes: dict[str, dict] = {}
    for mode in args.modes:
        idle = wait_for_idle(args.max_load, args.wait_idle)
        print(f"running {mode} (load {idle['load_average']}) ...", file=sys.stderr, flush=True)
        proc = subprocess.run(child_command(args, mode), capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout + proc.stderr)
            raise SystemExit(f"child {mode} failed with exit code {proc.returncode}")
        modes[mode] = {**json.loads(proc.stdout.strip().splitlines()[-1]), "wait_for_idle": idle}

    result: dict = {
        "what": "one hybrid training step of resflow-cpu with a 10-term series log-det",
        "batch_size": args.batch_size,
        "head_width": args.head_width,
        "lambda": "1/D",
        "optimizer": f"Adam(lr={args.lr})",
        "steps": args.steps,
        "warmup": args.warmup,
        "seed": args.seed,
        **environment(args.threads),
        "modes": modes,
    }
    if "naive" in modes:
        naive = modes["naive"]
        result["ratio_to_naive"] = {
            mode: {
                "peak_rss": m["peak_rss_gib"] / naive["peak_rss_gib"],
                "peak_over_baseline": m["peak_over_baseline_gib"] / naive["peak_over_baseline_gib"],
                "step_time": m["median_step_s"] / naive["median_step_s"],
                "step_time_uncontended": _ratio(
                    m["median_step_s_uncontended"], naive["median_step_s_uncontended"]
                ),
            }
            for mode, m in modes.items()
        }
        if "memory-efficient" in modes:
            ratios = result["ratio_to_naive"]["memory-efficient"]
            result["targets"] = {
                "memory_efficient_peak_rss_le_0.5x_naive": {
                    "target": MEMORY_TARGET,
                    "ratio": ratios["peak_rss"],
                    "pass": ratios["peak_rss"] <= MEMORY_TARGET,
                },
                "memory_efficient_step_time_le_naive": {
                    "target": TIME_TARGET,
                    "ratio": ratios["step_time"],
                    "pass": ratios["step_time"] <= TIME_TARGET,
                },
            }

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "resflow_memory.json"
    out.write_text(json.dumps(result, indent=2) + "\n")

    header = (
        f"{'mode':<18}{'base GiB':>10}{'peak GiB':>10}{'peak-base':>11}{'step s':>9}{'clean s':>9}"
    )
    print(header + ("  ratios vs naive (peak, peak-base, time)" if "naive" in modes else ""))
    for mode, m in modes.items():
        clean = m["median_step_s_uncontended"]
        line = (
            f"{mode:<18}{m['baseline_peak_rss_gib']:>10.3f}{m['peak_rss_gib']:>10.3f}"
            f"{m['peak_over_baseline_gib']:>11.3f}{m['median_step_s']:>9.3f}"
            f"{'-' if clean is None else f'{clean:.3f}':>9}"
        )
        if "naive" in modes:
            r = result["ratio_to_naive"][mode]
            line += f"  {r['peak_rss']:.2f}, {r['peak_over_baseline']:.2f}, {r['step_time']:.2f}"
        print(line)
    for name, target in result.get("targets", {}).items():
        print(f"{name}: ratio {target['ratio']:.3f} -> {'PASS' if target['pass'] else 'FAIL'}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
