"""Core-package timings on the configuration of the digits main job (CPU).

The model settings are read from the committed report (``reports/digits/config.json``), so the
benchmark measures exactly what the main job trains.

Measures, in one process, the median wall time of: a hybrid training step (forward, backward,
AdamW step), an eval forward (log_prob + logits), and sampling (the inverse). Ratios are taken
against the eval forward of the same run, so they are comparable across machines.

    python benchmarks/core_throughput.py [--threads 2] [--repeats 30]

Writes benchmarks/results/core_throughput.json. Run the main job first (it writes the config).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from hybridflow.data import load_dataset
from hybridflow.models import create_hybrid_model
from hybridflow.training import load_config

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "reports" / "digits" / "config.json"


def median_time(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    data = load_dataset("digits", "train")
    x, y = data.images[: args.batch_size], data.labels[: args.batch_size]
    config = load_config(args.config)
    model = create_hybrid_model(config, data.shape, data.num_levels, data.num_classes)
    model.data_init(data.images[:512])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step() -> None:
        model.train()
        loss = model.loss(x, y, "1/D")["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    @torch.no_grad()
    def eval_forward() -> None:
        model.eval()
        model(x)

    @torch.no_grad()
    def sample() -> None:
        model.eval()
        model.flow.sample(args.batch_size)

    t_train = median_time(train_step, args.repeats)
    t_eval = median_time(eval_forward, args.repeats)
    t_sample = median_time(sample, args.repeats)
    result = {
        "config": {k: config[k] for k in ("backbone", "backbone_args", "head", "head_args")},
        "batch_size": args.batch_size,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "median_s": {"train_step": t_train, "eval_forward": t_eval, "sample_inverse": t_sample},
        "ratio_to_eval_forward": {
            "train_step": t_train / t_eval,
            "sample_inverse": t_sample / t_eval,
        },
        "train_examples_per_s": args.batch_size / t_train,
    }
    out = Path(__file__).parent / "results" / "core_throughput.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
