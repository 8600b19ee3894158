"""How close each image backbone's training step comes to this machine's limit, and how it scales.

1. **The limit**: the floating-point operations of one hybrid training step (forward and
   backward of ``loss = CE + NLL / D``; counted with ``torch.utils.flop_counter``'s formulas,
   which count convolutions, matrix products and attention, not elementwise work) divided by
   the median step time gives the achieved GFLOP/s, compared with the GFLOP/s of a 2048² matrix
   product measured in the same run, in float32 and bf16. Residual flows draw their number of
   power-series terms at random, so their count is the mean over the counted steps.
2. **Scaling**: median step time against batch size (1×28×28) and against image size
   (1×8×8, 1×28×28, 3×32×32 at one batch size), plotted in ``results/scaling.png``.

Models and training step as in ``train_throughput.py`` (its settings, builder and runner).
Writes ``results/flops_limit.json``::

    python benchmarks/flops_limit.py [--rounds 8] [--threads 2] [--no-scaling]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from typing import Any

import torch

# The script's own folder is on sys.path when it runs as `python benchmarks/...`.
from _common import RESULTS, environment, load_average
from matplotlib.figure import Figure
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry
from train_throughput import BACKBONES, LAMBDA, NUM_CLASSES, NUM_LEVELS, Runner, build

from hybridflow.models import HybridModel
from hybridflow.reports import git_commit

LIMIT_SHAPE, LIMIT_BATCH = (1, 28, 28), 64
SCALING_BATCHES = (8, 32, 128)
SCALING_SHAPES = ((1, 8, 8), (1, 28, 28), (3, 32, 32))
SCALING_BATCH = 32
MATMUL_N = 2048


def batch(shape: tuple[int, ...], n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, NUM_LEVELS, (n, *shape), generator=g).float()
    return x, torch.randint(0, NUM_CLASSES, (n,), generator=g)


def matmul_peak(dtype: torch.dtype, repeats: int = 10) -> float:
    """GFLOP/s of ``A @ A`` for a ``MATMUL_N``² matrix (median of ``repeats``)."""
    a = torch.randn(MATMUL_N, MATMUL_N).to(dtype)
    a @ a
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ a
        times.append(time.perf_counter() - start)
    return 2 * MATMUL_N**3 / statistics.median(times) / 1e9


class FlopCount(TorchDispatchMode):
    """Sum of ``torch.utils.flop_counter``'s formulas over every dispatched operator.

    ``FlopCounterMode`` itself cannot be used: its module tracker registers backward hooks that
    fail when a forward calls ``torch.autograd.grad`` (the residual blocks' Neumann gradients
    are computed inside the forward). The formulas, and so the counts, are the same.
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def step_flops(model: HybridModel, x: torch.Tensor, y: torch.Tensor, steps: int = 3) -> float:
    """Mean FLOPs of the loss's forward and backward over ``steps`` (parameters untouched)."""
    counts = []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        with FlopCount() as counter:
            model.loss(x, y, LAMBDA)["loss"].mean().backward()
        counts.append(counter.total)
    model.zero_grad(set_to_none=True)
    return statistics.mean(counts)


def median_step(runner: Runner, x: torch.Tensor, y: torch.Tensor, rounds: int) -> float:
    runner.step(x, y)  # warm-up
    return statistics.median(runner.step(x, y) for _ in range(rounds))


def limit(backbone: str, rounds: int, peaks: dict[str, float]) -> dict[str, Any]:
    x, y = batch(LIMIT_SHAPE, LIMIT_BATCH)
    base = build(backbone, input_shape=LIMIT_SHAPE)
    base.data_init(x)
    flops = step_flops(copy.deepcopy(base), x, y)
    out: dict[str, Any] = {"gflop_per_step": flops / 1e9}
    for mode in ("float32", "bf16"):
        seconds = median_step(Runner(mode, copy.deepcopy(base), torch.device("cpu")), x, y, rounds)
        achieved = flops / seconds / 1e9
        out[mode] = {
            "median_step_s": seconds,
            "gflop_per_s": achieved,
            "share_of_matmul_peak": achieved / peaks[mode],
        }
    return out


def scaling(backbone: str, rounds: int) -> dict[str, Any]:
    out: dict[str, Any] = {"batch": {}, "shape": {}}
    points = [("batch", str(n), LIMIT_SHAPE, n) for n in SCALING_BATCHES]
    points += [("shape", "x".join(map(str, s)), s, SCALING_BATCH) for s in SCALING_SHAPES]
    for kind, key, shape, n in points:
        x, y = batch(shape, n)
        try:
            model = build(backbone, input_shape=shape)
        except ValueError as err:  # a layout that does not fit this image size
            out[kind][key] = {"error": str(err)}
            continue
        model.data_init(x)
        seconds = median_step(Runner("float32", model, torch.device("cpu")), x, y, rounds)
        out[kind][key] = {"median_step_s": seconds, "ms_per_example": 1e3 * seconds / n}
        print(f"  {backbone} {kind} {key}: {seconds:.3f} s", flush=True)
    return out


def plot(result: dict) -> None:
    fig = Figure(figsize=(10, 4), layout="constrained")
    left, right = fig.subplots(1, 2)
    for backbone, entry in result["scaling"].items():
        pts = [(int(k), v["ms_per_example"]) for k, v in entry["batch"].items() if "error" not in v]
        left.plot(*zip(*pts, strict=True), marker="o", label=backbone)
        dims = {k: v for k, v in entry["shape"].items() if "error" not in v}
        xs = [math.prod(map(int, k.split("x"))) for k in dims]  # D of "CxHxW"
        right.plot(xs, [v["median_step_s"] for v in dims.values()], marker="o", label=backbone)
    left.set(
        xscale="log",
        yscale="log",
        xlabel="batch size (1×28×28)",
        ylabel="training step, ms per example",
        title="Batch size",
    )
    right.set(
        xscale="log",
        yscale="log",
        xlabel=f"dimensions D (8×8, 28×28, 3×32×32; batch {SCALING_BATCH})",
        ylabel="training step, s",
        title="Image size",
    )
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    fig.savefig(RESULTS / "scaling.png", dpi=110)


def table(result: dict) -> str:
    peaks = result["matmul_peak_gflop_per_s"]
    lines = [
        f"Matmul peak ({MATMUL_N}², same run): float32 {peaks['float32']:.0f} GFLOP/s, "
        f"bf16 {peaks['bf16']:.0f} GFLOP/s.",
        "",
        "| backbone | GFLOP per step | float32 step s | float32 GFLOP/s | % of float32 peak "
        "| bf16 step s | bf16 GFLOP/s | % of bf16 peak |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, e in result["limit"].items():
        f, b = e["float32"], e["bf16"]
        lines.append(
            f"| {name} | {e['gflop_per_step']:.1f} | {f['median_step_s']:.3f} | "
            f"{f['gflop_per_s']:.0f} | {100 * f['share_of_matmul_peak']:.0f}% | "
            f"{b['median_step_s']:.3f} | {b['gflop_per_s']:.0f} | "
            f"{100 * b['share_of_matmul_peak']:.0f}% |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8, help="timed steps per measurement")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backbones", default=",".join(BACKBONES))
    parser.add_argument("--no-scaling", action="store_true")
    parser.add_argument("--table", action="store_true", help="print the json's table and exit")
    args = parser.parse_args()
    out = RESULTS / "flops_limit.json"
    if args.table:
        print(table(json.loads(out.read_text())))
        return
    torch.set_num_threads(args.threads)
    started, load_start = time.time(), load_average()
    peaks = {"float32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    result: dict[str, Any] = {
        "what": "achieved GFLOP/s of a hybrid training step vs the matmul peak; scaling",
        "command": "python benchmarks/flops_limit.py",
        "commit": git_commit(),
        "batch": LIMIT_BATCH,
        "shape": LIMIT_SHAPE,
        "rounds": args.rounds,
        "matmul_peak_gflop_per_s": peaks,
        "limit": {},
        "scaling": {},
    }
    names = args.backbones.split(",")
    for name in names:
        result["limit"][name] = limit(name, args.rounds, peaks)
        print(f"{name}: {result['limit'][name]}", flush=True)
    if not args.no_scaling:
        for name in names:
            result["scaling"][name] = scaling(name, max(2, args.rounds // 3))
    peaks_end = {"float32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    result.update(
        matmul_peak_at_end_gflop_per_s=peaks_end,
        load_average_start=load_start,
        load_average_end=load_average(),
        wall_s=round(time.time() - started, 1),
        environment=environment(args.threads),
    )
    out.write_text(json.dumps(result, indent=1) + "\n")
    if result["scaling"]:
        plot(result)
    print(table(result))


if __name__ == "__main__":
    main()
