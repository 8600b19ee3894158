"""Log-prob throughput of autoregressive flows: MAF-affine, MAF-DSF, MAF-DDSF and zuko's MAF.

Issue target: our affine MAF is at least as fast as an equally sized affine MAF from an
established library (zuko; install it for this script only: ``pip install zuko``). Every model has
the same number of flows and about the same parameter count (the hidden width of the DSF/DDSF
conditioners is chosen to match the affine MAF's count). Models are timed in turns inside one
process, so machine load hits them alike; the result is the median examples/s per model, for
``log_prob`` without gradients (evaluation) and with a backward pass (training). Writes
``results/naf_throughput.json``.

    python benchmarks/naf_throughput.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

# The script's own folder is on sys.path when it runs as `python benchmarks/...`.
from _common import RESULTS, environment, load_average, wait_for_idle

from hybridflow.models import FlowModel, create_backbone

TARGET = 1.0  # ours / zuko examples-per-second, affine MAF


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def ours(features: int, name: str, flows: int, hidden: int, **kw) -> FlowModel:
    backbone = create_backbone(
        name, (features,), num_flows=flows, hidden_features=(hidden, hidden), **kw
    )
    return FlowModel(backbone, (features,), num_levels=None, preprocessing="none")


def matched_width(features: int, name: str, flows: int, target: int, **kw) -> int:
    """Hidden width whose parameter count is closest to ``target``."""
    return min(
        range(4, 257), key=lambda h: abs(count(ours(features, name, flows, h, **kw)) - target)
    )


def main() -> None:
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--features", type=int, default=8, help="D (GAS has 8)")
    parser.add_argument("--flows", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=64, help="affine MAF hidden width (2 layers)")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-units", type=int, default=8, help="DSF hidden units")
    parser.add_argument(
        "--ddsf-units", type=int, default=4, help="DDSF hidden units (2 layers; K² weights)"
    )
    parser.add_argument("--wait-idle-s", type=float, default=600.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    idle = wait_for_idle(max_load=0.5, timeout_s=args.wait_idle_s)

    d, flows = args.features, args.flows
    models: dict[str, tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor]]] = {}
    maf = ours(d, "maf", flows, args.hidden)
    target = count(maf)
    models["maf-affine"] = (maf, maf.log_prob)
    for transformer, units in (("dsf", args.num_units), ("ddsf", args.ddsf_units)):
        kw = {"transformer": transformer, "num_units": units}
        width = matched_width(d, "naf", flows, target, **kw)
        model = ours(d, "naf", flows, width, **kw)
        models[f"maf-{transformer}"] = (model, model.log_prob)
    peer = None
    try:
        import zuko

        flow = zuko.flows.MAF(d, transforms=flows, hidden_features=(args.hidden, args.hidden))
        models["zuko-maf-affine"] = (flow, lambda x, flow=flow: flow().log_prob(x))
        peer = f"zuko {zuko.__version__}"
    except ImportError:
        print("zuko is not installed (pip install zuko): timing hybridflow models only")

    x = torch.randn(args.batch_size, d)
    times: dict[str, dict[str, list[float]]] = {k: {"eval": [], "train": []} for k in models}
    for r in range(args.repeats + 1):  # the first round warms up and is dropped
        for name, (module, log_prob) in models.items():
            with torch.no_grad():
                start = time.perf_counter()
                log_prob(x)
                eval_s = time.perf_counter() - start
            module.zero_grad(set_to_none=True)
            start = time.perf_counter()
            (-log_prob(x).mean()).backward()
            train_s = time.perf_counter() - start
            if r:
                times[name]["eval"].append(eval_s)
                times[name]["train"].append(train_s)

    rows = {}
    for name, (module, _) in models.items():
        rows[name] = {
            "parameters": count(module),
            **{
                f"{mode}_examples_per_s": args.batch_size / statistics.median(t)
                for mode, t in times[name].items()
            },
            **{f"{mode}_median_s": statistics.median(t) for mode, t in times[name].items()},
        }
    result = {
        "what": f"log_prob throughput, D={d}, {flows} flows, batch {args.batch_size}, float32",
        "peer": peer,
        "models": rows,
        "idle_wait": idle,
        "load_average_after": load_average(),
        "repeats": args.repeats,
        "target_ours_over_peer": TARGET,
        "environment": environment(args.threads),
    }
    if peer:
        for mode in ("eval", "train"):
            ratio = (
                rows["maf-affine"][f"{mode}_examples_per_s"]
                / rows["zuko-maf-affine"][f"{mode}_examples_per_s"]
            )
            result[f"{mode}_ours_over_peer"] = ratio
            result[f"{mode}_pass"] = ratio >= TARGET
    out = RESULTS / "naf_throughput.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "environment"}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
