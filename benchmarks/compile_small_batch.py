"""torch.compile where Python overhead dominates: affine MAF at batch 1 and 64 (issue 17).

At batch 1 a MAF step is a few hundred small operators, so per-operator overhead (Python, the
dispatcher, autograd bookkeeping) sets its time, not arithmetic. This times, in turns in one
process, three sides per setting: our eager MAF, the same model under ``torch.compile`` (default
inductor backend, static shapes, one compiled function per batch size) and zuko's ``MAF`` at the
same architecture (the peer pair of ``peers.py``), for evaluation ``log_prob`` and a training
step (loss, backward, Adam step). It records the medians, the ratios to zuko and to our eager
model, and how long the first compiled call took (the compile itself).

    python benchmarks/compile_small_batch.py          # → results/compile_small_batch.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from _common import RESULTS, cpu_model, environment, timed
from peer_pairs import PeerMissing
from peer_pairs.autoregressive import _our_maf, _vector_input, _zuko_maf

OUT = RESULTS / "compile_small_batch.json"


def _calls(
    module: torch.nn.Module, log_prob: Callable, loss: Callable, x: torch.Tensor, repeat: int
) -> dict:
    """Eval and train callables; each runs ``repeat`` times (a sub-millisecond call is too short
    to time alone)."""
    opt = torch.optim.Adam(module.parameters(), lr=1e-5)

    def evaluate() -> None:
        module.eval()
        with torch.no_grad():
            for _ in range(repeat):
                log_prob(x)

    def train() -> None:
        module.train()
        for _ in range(repeat):
            opt.zero_grad(set_to_none=True)
            loss(x).backward()
            opt.step()

    return {"eval": evaluate, "train": train}


def run_setting(d: int, batch: int, rounds: int, warmup: int) -> dict:
    x = _vector_input(d)(batch)
    repeat = max(1, 16 // batch)
    eager = _our_maf(d)
    compiled = _our_maf(d)  # a second, identical model: compiled code never runs the eager one
    sides = {
        "ours_eager": _calls(eager.module, eager.log_prob, eager.loss, x, repeat),
        "ours_compiled": _calls(
            compiled.module,
            torch.compile(compiled.log_prob, dynamic=False),
            torch.compile(compiled.loss, dynamic=False),
            x,
            repeat,
        ),
    }
    try:
        peer = _zuko_maf(d)
        sides["zuko"] = _calls(peer.module, peer.log_prob, peer.loss, x, repeat)
        peer_label = peer.label
    except PeerMissing as err:
        print(f"zuko missing ({err}); timing our two sides only")
        peer_label = None
    # The first call compiles (its time is mostly the compile; later calls hit the cache).
    compile_s = {mode: round(timed(fn), 1) for mode, fn in sides["ours_compiled"].items()}
    times: dict[str, dict[str, list[float]]] = {n: {"eval": [], "train": []} for n in sides}
    order = list(sides)
    for r in range(warmup + rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            for mode, fn in sides[name].items():
                t = timed(fn)
                if r >= warmup:
                    times[name][mode].append(t)
    out: dict = {"peer": peer_label, "first_compiled_call_s": compile_s}
    for mode in ("eval", "train"):
        med = {n: statistics.median(times[n][mode]) for n in sides}
        entry = {f"{n}_ms": round(1e3 * v / repeat, 4) for n, v in med.items()}
        entry["compiled_over_eager"] = round(med["ours_compiled"] / med["ours_eager"], 3)
        if "zuko" in med:
            entry["eager_over_zuko"] = round(med["ours_eager"] / med["zuko"], 3)
            entry["compiled_over_zuko"] = round(med["ours_compiled"] / med["zuko"], 3)
        out[mode] = entry
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = {"machine": cpu_model(), **environment(args.threads), "settings": {}}
    start = time.time()
    for d in args.dims:
        for batch in args.batches:
            key = f"D={d} batch={batch}"
            result["settings"][key] = run_setting(d, batch, args.rounds, args.warmup)
            print(key, json.dumps(result["settings"][key]), flush=True)
    result["wall_s"] = round(time.time() - start, 1)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
