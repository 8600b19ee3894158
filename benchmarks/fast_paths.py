"""Each fast path of issue 25 against the path it would replace, and against the peer.

The fast paths change a model's numbers (layout or rounding); this script is the evidence for
switching them on (gathered checkerboards and the fused LipSwish kernels are the defaults since
issue 25).
Every variant of a pair is built from the same seed and timed in turns in one process (order
alternating every round), medians, float32:

* ``realnvp``: ``checkerboard_layout="masked"`` (the former default), ``"gathered"``, and gathered
  with channels-last conditioner convolutions (both defaults since issue 25; the first two run
  the conditioners NCHW), against normflows (``peer_pairs/coupling.py``, NCHW conditioners as a
  normflows user's own) and normflows handed our channels-last conditioners (``peer+cl``: what
  the layout alone is worth), batch 64: a training step and eval ``log_prob``.
* ``flowpp``: masked and gathered ``flowpp-cpu`` against chrischute/flowplusplus
  (``peer_pairs/flowpp.py``), batch 16: training step, eval and sampling.
* ``resflow``: the ``resflow-cpu`` hybrid training step (λ = 1/D, batch 64) with LipSwish
  differentiated by autograd and by the fused kernels (``hybridflow.nets.fused``).

    python benchmarks/fast_paths.py [--rounds 8] [--threads 2] [--only realnvp]
        [--peer-path flowplusplus=DIR] [--out results/fast_paths.json]

Ratios are variant / baseline (< 1: faster); the CPU and its bf16 flags are recorded.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

# The script's own folder is on sys.path when it runs as `python benchmarks/...`.
from _common import RESULTS, build_hybrid, cpu_model, environment, load_average, timed
from peer_pairs import PeerMissing, set_peer_paths
from peer_pairs import coupling as coupling_pairs
from peer_pairs import flowpp as flowpp_pairs
from peer_pairs.mixed_precision import cpu_bf16_flags
from peers import make_step

from hybridflow.nets import ConvResNet, fused
from hybridflow.reports import git_commit

Variant = dict[str, Callable[[], None]]  # mode -> one timed call


def _in_turns(variants: dict[str, Variant], rounds: int, warmup: int) -> dict[str, dict]:
    """Median seconds of every variant and mode, the variants taking turns."""
    names = list(variants)
    times = {n: {m: [] for m in variants[n]} for n in names}
    for r in range(warmup + rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            for mode, call in variants[name].items():
                t = timed(call)
                if r >= warmup:
                    times[name][mode].append(t)
    return {n: {m: statistics.median(v) for m, v in modes.items()} for n, modes in times.items()}


def _side_calls(side, x: torch.Tensor, sample_batch: int | None = None) -> Variant:
    def evaluate() -> None:
        side.module.eval()
        with torch.no_grad():
            side.log_prob(x)

    calls = {"train": make_step(side, x), "eval": evaluate}
    if sample_batch:

        def sample() -> None:
            side.module.eval()
            with torch.no_grad():
                side.sample(sample_batch)

        calls["sample"] = sample
    return calls


def _conditioner_layout(module: torch.nn.Module, channels_last: bool) -> None:
    """Run every ConvResNet of ``module`` channels-last (our default) or in the NCHW layout."""
    for net in module.modules():
        if isinstance(net, ConvResNet):
            net.channels_last = channels_last
            net.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def realnvp_variants() -> dict[str, Variant]:
    x = coupling_pairs._image_input(64)
    out = {}
    for name, layout, channels_last in (
        ("masked", "masked", False),
        ("gathered", "gathered", False),
        ("gathered+cl", "gathered", True),
    ):
        torch.manual_seed(0)
        side = coupling_pairs._our_side(
            "realnvp", {**coupling_pairs.REALNVP, "checkerboard_layout": layout}
        )
        _conditioner_layout(side.module, channels_last)
        out[name] = _side_calls(side, x)
    for name, channels_last in (("peer", False), ("peer+cl", True)):
        torch.manual_seed(0)
        side = coupling_pairs._peer_side(*coupling_pairs._peer_realnvp())
        _conditioner_layout(side.module, channels_last)
        out[name] = _side_calls(side, x)
    return out


def flowpp_variants() -> dict[str, Variant]:
    shape = (1, 28, 28)
    ours_width, peer_width = flowpp_pairs.SETTINGS[shape]
    x = flowpp_pairs._levels(shape, 16)
    out = {}
    build = flowpp_pairs.create_backbone
    try:
        for layout in ("masked", "gathered"):
            flowpp_pairs.create_backbone = functools.partial(build, checkerboard_layout=layout)
            torch.manual_seed(0)
            out[layout] = _side_calls(flowpp_pairs._ours(shape, ours_width, 16), x, 16)
    finally:
        flowpp_pairs.create_backbone = build
    torch.manual_seed(0)
    out["peer"] = _side_calls(flowpp_pairs._peer(shape, peer_width, 16), x, 16)
    return out


def resflow_variants() -> dict[str, Variant]:
    x, y = torch.randint(0, 256, (64, 1, 28, 28)).float(), torch.randint(0, 10, (64,))
    out = {}
    for name, on in (("autograd", False), ("fused", True)):
        torch.manual_seed(0)
        model = build_hybrid({})
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def train(model=model, opt=opt, on=on) -> None:
            was = fused.fused_kernels_enabled()
            fused.set_fused_kernels(on)
            try:
                model.train()
                loss = model.loss(x, y, "1/D")["loss"].mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            finally:
                fused.set_fused_kernels(was)

        out[name] = {"train": train}
    out["fused"]["train"]()  # compile the kernels outside the timed rounds
    return out


GROUPS = {
    "realnvp": (realnvp_variants, "masked"),
    "flowpp": (flowpp_variants, "masked"),
    "resflow": (resflow_variants, "autograd"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=sorted(GROUPS))
    parser.add_argument("--peer-path", action="append", default=[], metavar="NAME=DIR")
    parser.add_argument("--out", type=Path, default=RESULTS / "fast_paths.json")
    args = parser.parse_args()
    set_peer_paths(dict(p.split("=", 1) for p in args.peer_path))
    torch.set_num_threads(args.threads)
    started, load_start = time.time(), load_average()
    groups = {}
    for name, (build, baseline) in GROUPS.items():
        if args.only and name != args.only:
            continue
        try:
            medians = _in_turns(build(), args.rounds, args.warmup)
        except PeerMissing as missing:
            groups[name] = {"skipped": str(missing)}
            print(f"skip {name}: {missing}", flush=True)
            continue
        ratios = {
            v: {m: t / medians[baseline][m] for m, t in modes.items() if m in medians[baseline]}
            for v, modes in medians.items()
        }
        to_peer = {
            v: {m: t / medians["peer"][m] for m, t in modes.items() if m in medians["peer"]}
            for v, modes in medians.items()
            if "peer" in medians
        }
        groups[name] = {"baseline": baseline, "seconds": medians, "ratio_to_baseline": ratios}
        if to_peer:
            groups[name]["ratio_to_peer"] = to_peer
        for v, r in ratios.items():
            shown = "  ".join(f"{m} {x:.2f}x" for m, x in r.items())
            peer = "  ".join(f"{m} {x:.2f}x" for m, x in to_peer.get(v, {}).items())
            print(
                f"{name:<8} {v:<12} vs {baseline}: {shown}"
                + (f" | vs peer: {peer}" if peer else "")
            )
    result = {
        "what": "fast paths of issue 25 / the path they replace (and / the peer), float32",
        "command": "python benchmarks/fast_paths.py "
        + " ".join(
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if v and k != "out"
        ),
        "commit": git_commit(),
        "cpu": cpu_model(),
        "cpu_bf16_flags": cpu_bf16_flags(),
        "rounds": args.rounds,
        "warmup": args.warmup,
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "wall_s": round(time.time() - started, 1),
        "environment": environment(args.threads),
        "groups": groups,
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
