"""Training-step time and peak RSS of the named CPU comparison configuration (``resflow-cpu``).

The configuration compared side by side with the public Residual Flows reference
implementation: hybrid task (CE + λ·NLL, λ = 1/D) on 1×28×28 MNIST, batch 64, ``resflow-cpu``
backbone defaults (3 scales × 2 blocks, no factor-out, width 64, kernels 3-1-3, LipSwish, fully
connected end blocks of width 128, ActNorm, logit preprocessing, Poisson roulette with 2 exact
terms, Neumann gradients in memory-efficient mode), classifier head width 256, one Adam step.
The spectral-norm update happens inside the forward in training mode, so it is timed too.

Reference (public implementation, 2 CPU cores): median 0.94 s per step and 1.43 GiB peak RSS;
1.10 s and 3.32 GiB with naive backprop. Target: ≤ 0.8× the reference for both, per mode.

Default mode: run ``--warmup`` untimed then ``--steps`` timed training steps on consecutive MNIST
batches (random integer levels if the npz is missing) and print the median step time::

    python benchmarks/resflow_cpu_step.py [--steps 30] [--warmup 3] [--threads 2] [--naive]

Driver mode: run the default mode under ``/usr/bin/time -v`` twice (memory-efficient Neumann,
then naive backprop: ``grad="backprop", memory_efficient=False``), read "Maximum resident set
size" and the child's median, and write benchmarks/results/resflow_cpu_step.json::

    python benchmarks/resflow_cpu_step.py --driver [--steps 30] [--warmup 3] [--threads 2]
                                          [--wait-idle 0] [--max-load 0.5]

Other jobs on the same cores make steps several times slower, so every child records the load
average and each step's CPU/wall ratio and also reports the median over steps that had their
cores to themselves ("clean"); pass/fail uses the plain median. ``--wait-idle S`` makes the
driver wait up to S seconds for a quiet machine (1-minute load ≤ ``--max-load``) per mode.
"""

from __future__ import annotations

import argparse
import json
import re
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
    environment,
    load_average,
    load_mnist,
    max_rss_gib,
    source_digest,
    timed_hybrid_steps,
    wait_for_idle,
)

REFERENCE = {
    "memory-efficient": {"median_step_s": 0.94, "peak_rss_gib": 1.43},
    "naive": {"median_step_s": 1.10, "peak_rss_gib": 3.32},
}
TARGET_RATIO = 0.8
NAIVE = {"grad": "backprop", "memory_efficient": False}
TIME_BIN = Path("/usr/bin/time")
RESULT_PREFIX = "RESULT "  # marks the child's JSON line among anything else on stdout


def run_steps(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    n_batches = args.warmup + args.steps
    x_all, y_all, source = load_mnist(args.batch_size * n_batches, seed=args.seed)
    batches = list(zip(x_all.split(args.batch_size), y_all.split(args.batch_size), strict=True))
    backbone_kw = dict(NAIVE) if args.naive else {}  # {} = the resflow-cpu defaults
    model = build_hybrid(backbone_kw, seed=args.seed, head_width=args.head_width)
    model.data_init(batches[0][0])
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    torch.manual_seed(args.seed + 1)  # same probes, roulette draws and noise in both modes

    load_start = load_average()
    times, cpu_over_wall, losses = timed_hybrid_steps(model, opt, batches, args.warmup)
    return {
        "mode": "naive" if args.naive else "memory-efficient",
        "hybridflow_source_sha256_16": source_digest(),
        "backbone": "resflow-cpu",
        "backbone_overrides": backbone_kw,
        "data": source,
        "parameters": sum(p.numel() for p in model.parameters()),
        "median_step_s": statistics.median(times),
        "min_step_s": min(times),
        "max_step_s": max(times),
        "step_times_s": times,
        **contention_summary(times, cpu_over_wall, args.threads),
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "self_peak_rss_gib": max_rss_gib(),
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


def drive(args: argparse.Namespace) -> None:
    if not TIME_BIN.exists():
        raise SystemExit(f"{TIME_BIN} not found (GNU time; apt-get install time)")
    modes: dict[str, dict] = {}
    for naive in (False, True):
        cmd = [
            str(TIME_BIN),
            "-v",
            sys.executable,
            str(Path(__file__).resolve()),
            *("--steps", str(args.steps), "--warmup", str(args.warmup)),
            *("--threads", str(args.threads), "--batch-size", str(args.batch_size)),
            *("--head-width", str(args.head_width), "--lr", str(args.lr), "--seed", str(args.seed)),
            *(["--naive"] if naive else []),
        ]
        name = "naive" if naive else "memory-efficient"
        idle = wait_for_idle(args.max_load, args.wait_idle)
        print(f"running {name} (load {idle['load_average']}) ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout + proc.stderr)
            raise SystemExit(f"child {name} failed with exit code {proc.returncode}")
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
        child = json.loads(lines[-1][len(RESULT_PREFIX) :])
        match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
        if match is None:
            raise SystemExit(f"no max RSS in /usr/bin/time output:\n{proc.stderr}")
        peak = int(match.group(1)) / 2**20
        ref = REFERENCE[name]
        time_ratio = child["median_step_s"] / ref["median_step_s"]
        rss_ratio = peak / ref["peak_rss_gib"]
        clean = child["median_step_s_uncontended"]
        clean_ratio = None if clean is None else clean / ref["median_step_s"]
        modes[name] = {
            **child,
            "wait_for_idle": idle,
            "peak_rss_gib": peak,
            "reference": ref,
            "ratio_to_reference": {
                "step_time": time_ratio,
                "step_time_uncontended": clean_ratio,
                "peak_rss": rss_ratio,
            },
            "target": {
                "ratio": TARGET_RATIO,
                "step_time_pass": time_ratio <= TARGET_RATIO,
                "step_time_uncontended_pass": clean_ratio is not None
                and clean_ratio <= TARGET_RATIO,
                "peak_rss_pass": rss_ratio <= TARGET_RATIO,
            },
        }
    result = {
        "what": "hybrid training step of resflow-cpu (batch 64, 1x28x28, Adam), vs reference",
        "batch_size": args.batch_size,
        "head_width": args.head_width,
        "lambda": "1/D",
        "optimizer": f"Adam(lr={args.lr})",
        "steps": args.steps,
        "warmup": args.warmup,
        "seed": args.seed,
        "peak_rss_source": "/usr/bin/time -v, Maximum resident set size of the child",
        **environment(args.threads),
        "modes": modes,
        "all_targets_pass": all(
            m["target"]["step_time_pass"] and m["target"]["peak_rss_pass"] for m in modes.values()
        ),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "resflow_cpu_step.json"
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(
        f"{'mode':<18}{'step s':>8}{'clean s':>8}{'ref s':>7}{'ratio':>7}"
        f"{'RSS GiB':>9}{'ref':>6}{'ratio':>7}  target ≤ {TARGET_RATIO}x reference"
    )
    for name, m in modes.items():
        r, ok = m["ratio_to_reference"], m["target"]
        clean = m["median_step_s_uncontended"]
        print(
            f"{name:<18}{m['median_step_s']:>8.3f}{'-' if clean is None else f'{clean:.3f}':>8}"
            f"{m['reference']['median_step_s']:>7.2f}{r['step_time']:>7.2f}"
            f"{m['peak_rss_gib']:>9.3f}{m['reference']['peak_rss_gib']:>6.2f}{r['peak_rss']:>7.2f}"
            f"  time {'PASS' if ok['step_time_pass'] else 'FAIL'}"
            f", RSS {'PASS' if ok['peak_rss_pass'] else 'FAIL'}"
            f" ({m['uncontended_steps']}/{len(m['step_times_s'])} steps uncontended)"
        )
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="timed steps after the warmup")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--head-width", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--naive", action="store_true", help="grad=backprop, no memory-efficient")
    parser.add_argument("--driver", action="store_true", help="both modes under /usr/bin/time -v")
    parser.add_argument(
        "--wait-idle", type=float, default=0.0, help="driver: wait ≤ this many s for a quiet box"
    )
    parser.add_argument("--max-load", type=float, default=0.5, help="'quiet': 1-min load average")
    args = parser.parse_args()
    if args.driver:
        drive(args)
        return
    result = run_steps(args)
    print(f"median step time: {result['median_step_s']:.4f} s ({result['mode']})")
    print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
