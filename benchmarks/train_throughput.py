"""Training-step throughput per image backbone and precision mode, and the bf16 bits/dim error.

For every image backbone (settings below: 1×28×28, batch 64, λ = 1/D hybrid loss, AdamW) and
every mode, one process builds the same initial model per mode and times full training steps
(forward, backward, optimizer step) in interleaved rounds: round r times one step of every mode
in turn, so a busy neighbour slows all modes alike. Reported: median images/s per mode and its
ratio to float32 eager measured in the same run (and the same over the steps that had the cores
to themselves). Modes:

* ``float32``: eager float32, the baseline;
* ``bf16``: ``autocast_context("bf16")`` (conditioners and head in bfloat16, flow arithmetic
  float32; see :mod:`hybridflow.models.precision`);
* ``channels_last``: ``prepare_model(channels_last=True)`` and channels-last inputs;
* ``compile``: ``prepare_model(compile=True)``, whose compiled ``loss`` the step calls; the
  first steps' extra time is reported as ``compile_s`` (a fresh inductor cache: cold start);
* their combinations ``channels_last+bf16``, ``compile+bf16``, ``compile+channels_last+bf16``.

Per backbone it also records one profiled step of the float32 and bf16 modes (phase times,
self-CPU shares of convolutions / attention / the rest, top operators), and the **bits/dim
difference** between bf16 and float32 evaluation of the same weights (the float32 model after
its timed steps, and any shipped Fashion-MNIST model of that backbone) on test images, with
identical dequantization noise and log-det probes in both precisions.

    python benchmarks/train_throughput.py [--backbones coupling,realnvp] [--modes float32,bf16]
        [--rounds 10] [--threads 2] [--data fashion-mnist | --data npz:/path/mnist.npz]
        [--merge]

Data: ``--data`` names any ``hybridflow`` dataset of 1×28×28 images (default Fashion-MNIST);
when it cannot be loaded the script falls back to random levels and records that. Runs on CUDA
when available (``--device``). Writes benchmarks/results/train_throughput.json; ``--merge``
adds the measured backbones to that file instead of replacing it (e.g. the :data:`VARIANTS`).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# A fresh inductor cache, so compile times are cold-start times (a warm on-disk cache from an
# earlier run would hide them). Set before torch reads it.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor-bench-"))

import torch

# The script's own folder is on sys.path when it runs as `python benchmarks/...`.
from _common import RESULTS, cpu_model, environment, load_average
from torch.profiler import ProfilerActivity, profile

from hybridflow.models import FlowModel, HybridModel, create_backbone
from hybridflow.models.precision import autocast_context, prepare_model
from hybridflow.reports import git_commit

# ---- settings ------------------------------------------------------------------------------
INPUT_SHAPE = (1, 28, 28)
NUM_LEVELS = 256
NUM_CLASSES = 10
BATCH_SIZE = 64
LAMBDA = "1/D"
LR = 1e-3
HEAD = {"head": "resflow", "width": 64}
#: Backbone arguments: defaults, except two scales where 28 = 7·2² allows only two squeezes.
BACKBONES: dict[str, dict[str, Any]] = {
    "coupling": {"num_scales": 2},
    "coupling+1x1": {"num_scales": 2},
    "realnvp": {},
    "resflow-cpu": {},
    "flowpp-cpu": {},
    "naf-coupling": {"num_scales": 2},
}
#: Variants measured on request (``--backbones``) to show what would lift a backbone that misses
#: the 2× target: ``name -> (registered backbone, its arguments)``.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "flowpp-cpu/1-head": ("flowpp-cpu", {"num_heads": 1}),
    "flowpp-cpu/no-attention": ("flowpp-cpu", {"attention": False}),
}
MODES = (
    "float32",
    "bf16",
    "channels_last",
    "channels_last+bf16",
    "compile",
    "compile+bf16",
    "compile+channels_last+bf16",
)
#: Shipped models evaluated in both precisions, by backbone (``hybridflow pretrained``).
PRETRAINED = {
    "coupling": "fashion-mnist/coupling-lam1overD",
    "coupling+1x1": "fashion-mnist/coupling+1x1-lam1overD",
    "resflow-cpu": "fashion-mnist/resflow-lam1overD",
}
#: Provenance kept per backbone when ``--merge`` adds it to an existing result file.
RUN_KEYS = ("command", "commit", "hybridflow_source_sha256_16", "rounds", "load_average_start")
EVAL_EXAMPLES = 1024
EVAL_BATCH = 256
# ---------------------------------------------------------------------------------------------


def load_images(name: str, split: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``n`` images (levels) and labels of ``name``'s ``split``, or seeded random levels."""
    try:
        from hybridflow.data import load_dataset

        data = load_dataset(name, split)
        x, y = data.images[:n], data.labels[:n]
        if tuple(x.shape[1:]) == INPUT_SHAPE and len(x) == n:
            return x.float(), y.long(), f"{name}:{split}[:{n}]"
        reason = f"{name} has shape {tuple(x.shape[1:])}"
    except Exception as err:  # any missing file or unknown name: fall back, and say so
        reason = f"{type(err).__name__}: {err}".splitlines()[0][:200]
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, NUM_LEVELS, (n, *INPUT_SHAPE), generator=g).float()
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return x, y, f"random-levels ({reason})"


def backbone_spec(name: str) -> tuple[str, dict[str, Any]]:
    """``(registered backbone, arguments)`` of a name of :data:`BACKBONES` or :data:`VARIANTS`."""
    return VARIANTS[name] if name in VARIANTS else (name, BACKBONES[name])


def build(backbone: str, seed: int = 0, input_shape: tuple[int, ...] = INPUT_SHAPE) -> HybridModel:
    torch.manual_seed(seed)
    registered, kwargs = backbone_spec(backbone)
    flow = FlowModel(
        create_backbone(registered, input_shape, **kwargs),
        input_shape,
        num_levels=NUM_LEVELS,
    )
    return HybridModel(flow, NUM_CLASSES, **HEAD)


class Runner:
    """One mode's model, optimizer and step function."""

    def __init__(self, mode: str, model: HybridModel, device: torch.device) -> None:
        self.mode, self.device = mode, device
        parts = mode.split("+")
        self.amp = "bf16" if "bf16" in parts else "none"
        self.channels_last = "channels_last" in parts
        self.model = model
        self.prepared = prepare_model(
            model, channels_last=self.channels_last, compile="compile" in parts
        )
        self.opt = torch.optim.AdamW(model.parameters(), lr=LR)
        self.times: list[float] = []
        self.cpu_over_wall: list[float] = []
        self.first_steps_s: list[float] = []
        self.error: str | None = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One training step; returns its wall time (and records its CPU/wall ratio)."""
        self._sync()
        start, cpu = time.perf_counter(), time.process_time()
        self.phases(x, y)
        elapsed = time.perf_counter() - start
        self.cpu_over_wall.append((time.process_time() - cpu) / elapsed)
        return elapsed

    def phases(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """One training step, timed by phase: forward (the loss), backward, optimizer."""
        if self.channels_last:
            x = x.to(memory_format=torch.channels_last)
        times = [time.perf_counter()]
        self.model.train()
        with autocast_context(self.amp, self.device):
            loss = self.prepared.loss(x, y, LAMBDA)["loss"].mean()
        self._sync()
        times.append(time.perf_counter())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self._sync()
        times.append(time.perf_counter())
        self.opt.step()
        self._sync()
        times.append(time.perf_counter())
        names = ("forward_s", "backward_s", "optimizer_s")
        return {n: b - a for n, a, b in zip(names, times, times[1:], strict=False)}


def _category(op: str) -> str:
    if "convolution" in op:
        return "convolution"
    if "scaled_dot_product" in op:
        return "attention"
    if op.startswith("aten::") and any(k in op for k in ("mm", "addmm", "bmm", "linear")):
        return "matmul"
    return "other"


def profile_step(runner: Runner, x: torch.Tensor, y: torch.Tensor, top: int = 8) -> dict:
    """Phase times and the top operators (self CPU time) of one more training step."""
    activities = [ProfilerActivity.CPU]
    if runner.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        phases = runner.phases(x, y)
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    shares: dict[str, float] = {}
    for e in events:
        shares[_category(e.key)] = shares.get(_category(e.key), 0.0) + e.self_cpu_time_total
    events.sort(key=lambda e: -e.self_cpu_time_total)
    return {
        **{k: round(v, 4) for k, v in phases.items()},
        "self_cpu_share": {k: round(v / total, 3) for k, v in sorted(shares.items())},
        "top_ops": [
            {"op": e.key, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 2), "calls": e.count}
            for e in events[:top]
        ],
    }


@torch.no_grad()
def eval_bpd(model: HybridModel, x: torch.Tensor, amp: str, device: torch.device) -> torch.Tensor:
    """Per-example bits/dim in eval mode; the same seed gives the same noise and probes."""
    model.eval()
    torch.manual_seed(1234)
    out = []
    for i in range(0, len(x), EVAL_BATCH):
        with autocast_context(amp, device):
            out.append(model.flow.bits_per_dim(x[i : i + EVAL_BATCH].to(device)).float().cpu())
    return torch.cat(out)


def bpd_difference(model: HybridModel, x: torch.Tensor, device: torch.device) -> dict:
    f32 = eval_bpd(model, x, "none", device)
    bf16 = eval_bpd(model, x, "bf16", device)
    diff = bf16 - f32
    return {
        "bpd_float32": f32.mean().item(),
        "bpd_bf16": bf16.mean().item(),
        "mean_difference": diff.mean().item(),
        "max_abs_difference_per_example": diff.abs().max().item(),
        "within_0.01": abs(diff.mean().item()) <= 0.01,
    }


def run_backbone(
    backbone: str,
    modes: list[str],
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    rounds: int,
    warmup: int,
    x_eval: torch.Tensor,
    device: torch.device,
    threads: int,
    profile_modes: list[str],
) -> dict:
    base = build(backbone).to(device)
    base.data_init(batches[0][0].to(device))
    runners = [Runner(m, copy.deepcopy(base), device) for m in modes]
    for r in range(warmup + rounds):
        x, y = (t.to(device) for t in batches[r % len(batches)])
        for runner in runners:
            if runner.error is not None:
                continue
            try:
                elapsed = runner.step(x, y)
            except Exception as err:  # e.g. torch.compile refusing a graph: record, go on
                runner.error = f"{type(err).__name__}: {err}".splitlines()[0][:300]
                print(f"  {runner.mode} failed: {runner.error}", flush=True)
                continue
            if r < warmup:
                runner.first_steps_s.append(elapsed)
            else:
                runner.times.append(elapsed)
        print(f"  {backbone} round {r + 1}/{warmup + rounds}", flush=True)
    result: dict[str, Any] = {
        "backbone": backbone_spec(backbone)[0],
        "backbone_args": backbone_spec(backbone)[1],
        "parameters": sum(p.numel() for p in base.parameters()),
        "modes": {},
    }
    baseline = baseline_clean = None
    for runner in runners:
        if runner.error is not None:
            result["modes"][runner.mode] = {"error": runner.error}
            continue
        median = statistics.median(runner.times)
        # Steps that had the cores to themselves (CPU: ~threads CPU-seconds per wall second);
        # a neighbour on the shared cores slows a step several-fold.
        ratios = runner.cpu_over_wall[warmup:]
        clean = [
            t
            for t, c in zip(runner.times, ratios, strict=True)
            if device.type != "cpu" or c >= 0.85 * threads
        ]
        entry = {
            "median_step_s": median,
            "images_per_s": BATCH_SIZE / median,
            "median_step_s_uncontended": statistics.median(clean) if clean else None,
            "uncontended_steps": len(clean),
            "cpu_over_wall_median": statistics.median(ratios),
            "step_times_s": [round(t, 4) for t in runner.times],
        }
        if "compile" in runner.mode.split("+"):
            # Time of the first steps beyond what steady-state steps cost: tracing + codegen.
            entry["compile_s"] = sum(runner.first_steps_s) - warmup * median
        if runner.mode == "float32":
            baseline, baseline_clean = median, entry["median_step_s_uncontended"]
        result["modes"][runner.mode] = entry
    for entry in result["modes"].values():
        if baseline is not None and "median_step_s" in entry:
            entry["speedup_vs_float32"] = baseline / entry["median_step_s"]
            clean = entry["median_step_s_uncontended"]
            if baseline_clean and clean:
                entry["speedup_vs_float32_uncontended"] = baseline_clean / clean
    profiles = {}
    for runner in runners:
        if runner.mode in profile_modes and runner.error is None:
            profiles[runner.mode] = profile_step(runner, *(t.to(device) for t in batches[0]))
    if profiles:
        result["profile"] = profiles
    # Same weights in both precisions: the float32 model after its timed (training) steps.
    trained = next(r.model for r in runners if r.mode == modes[0])
    result["bpd_bf16_vs_float32"] = {
        "weights": f"{modes[0]} model after {warmup + rounds} training steps",
        **bpd_difference(trained, x_eval, device),
    }
    if backbone in PRETRAINED:
        try:
            from hybridflow import load_pretrained

            shipped = load_pretrained(PRETRAINED[backbone]).to(device)
            result["bpd_bf16_vs_float32_pretrained"] = {
                "weights": PRETRAINED[backbone],
                **bpd_difference(shipped, x_eval, device),
            }
        except Exception as err:  # weights missing or refused: say so, keep the timings
            result["bpd_bf16_vs_float32_pretrained"] = {"error": str(err)[:200]}
    return result


def markdown_table(result: dict) -> str:
    """The README table of a result file: images/s and speedup per backbone and mode."""
    modes = [m for m in MODES if any(m in b["modes"] for b in result["backbones"].values())]
    lines = [
        "| backbone | " + " | ".join(m.replace("+", " + ") for m in modes) + " | Δ bits/dim |",
        "|---" * (len(modes) + 2) + "|",
    ]
    for name, entry in result["backbones"].items():
        cells = []
        for mode in modes:
            m = entry["modes"].get(mode)
            if m is None:
                cells.append("")
            elif "error" in m:
                cells.append("fails")
            else:
                cells.append(f"{m['images_per_s']:.0f} (×{m['speedup_vs_float32']:.2f})")
        diff = entry["bpd_bf16_vs_float32"]["mean_difference"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {diff:+.1e} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default=",".join(BACKBONES))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--eval-examples", type=int, default=EVAL_EXAMPLES)
    parser.add_argument(
        "--profile",
        default="float32,bf16",
        help="modes whose top operators are recorded (one extra profiled step each; '' skips)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=RESULTS / "train_throughput.json")
    parser.add_argument("--merge", action="store_true", help="add to --out, do not replace it")
    parser.add_argument("--table", action="store_true", help="print --out as markdown and exit")
    args = parser.parse_args()
    if args.table:
        print(markdown_table(json.loads(args.out.read_text())))
        return
    torch.set_num_threads(args.threads)
    # Dynamo warns at every graph break it takes (input validation, the roulette's .item());
    # they are expected, and reported in benchmarks/README.md instead.
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    device = torch.device(args.device)
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {MODES}")
    steps = args.warmup + args.rounds
    x_train, y_train, train_source = load_images(args.data, "train", steps * BATCH_SIZE, 0)
    x_eval, _, eval_source = load_images(args.data, "test", args.eval_examples, 1)
    batches = [
        (x_train[i : i + BATCH_SIZE], y_train[i : i + BATCH_SIZE])
        for i in range(0, len(x_train), BATCH_SIZE)
    ]
    result: dict[str, Any] = {
        "what": "images/s of a hybrid training step (forward + backward + AdamW) per mode",
        "commit": git_commit(),
        **environment(args.threads),
        "cpu_model": cpu_model(),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "input_shape": list(INPUT_SHAPE),
        "batch_size": BATCH_SIZE,
        "lambda": LAMBDA,
        "optimizer": f"AdamW(lr={LR})",
        "head": HEAD,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "train_data": train_source,
        "eval_data": eval_source,
        "load_average_start": load_average(),
        "backbones": {},
    }
    for name in [b for b in args.backbones.split(",") if b]:
        print(f"{name}:", flush=True)
        result["backbones"][name] = run_backbone(
            name,
            modes,
            batches,
            args.rounds,
            args.warmup,
            x_eval,
            device,
            args.threads,
            [m for m in args.profile.split(",") if m],
        )
        for mode, entry in result["backbones"][name]["modes"].items():
            if "error" in entry:
                print(f"  {mode:28s} failed: {entry['error']}", flush=True)
                continue
            print(
                f"  {mode:28s} {entry['images_per_s']:8.1f} img/s  "
                f"x{entry.get('speedup_vs_float32', math.nan):.2f}",
                flush=True,
            )
        print(f"  bpd: {result['backbones'][name]['bpd_bf16_vs_float32']}", flush=True)
    result["load_average_end"] = load_average()
    result["command"] = "python benchmarks/train_throughput.py " + " ".join(sys.argv[1:])
    if args.merge and args.out.exists():
        merged = json.loads(args.out.read_text())
        for name, entry in result["backbones"].items():
            merged["backbones"][name] = {**entry, "run": {k: result[k] for k in RUN_KEYS}}
        result = merged
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
