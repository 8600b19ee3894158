"""Our flows against the libraries a user would pick instead, side by side in one process.

For every pair in ``benchmarks/peer_pairs/`` (our model and a peer's at equal architecture and
parameter count) this times, at each batch size of the pair: evaluation ``log_prob`` without
gradients, a training step (loss, backward, Adam step) and sampling. Both models of a pair are
timed in turns in the same process (the order alternates every round), so machine load hits them
alike, and every pair gets a fresh process (state left by earlier pairs moved later ratios); the
result is the median over ``--rounds`` rounds after ``--warmup`` untimed ones, and the ratio
ours / peer (< 1: ours is faster). Peak memory of a training step is measured for each
model in a fresh subprocess (peak RSS, ``VmHWM``). For every mode that misses its target
the json holds a ``torch.profiler`` table of both models (top operators by self CPU time).
With ``--bf16`` each pair is also timed at its training batch under bfloat16 autocast, ours
(log-dets kept float32) against the peer under plain ``torch.autocast``, with the bits/dim error
each side's autocast makes and the CPU's bf16 flags (``peer_pairs/mixed_precision.py``).

Peers: ``pip install -e .[bench]`` installs zuko, nflows and normflows; the Residual Flows
reference and chrischute/flowplusplus are not on the registry and are given as checkouts with
``--peer-path residual-flows=DIR --peer-path flowplusplus=DIR`` (or ``HYBRIDFLOW_PEER_<NAME>``).
A missing peer skips its pairs with a message.

    python benchmarks/peers.py --peer-path residual-flows=../peers/residual-flows \\
        --peer-path flowplusplus=../peers/flowplusplus      # every pair → results/peers.json
    python benchmarks/peers.py --only maf-affine --merge   # some pairs, merged into the json
    python benchmarks/peers.py --table                     # the README table from the json
    python benchmarks/peers.py --tiny --out /tmp/p.json    # CI: one round at batch 2
    python benchmarks/peers.py --bf16 --only realnvp --merge  # + bf16 autocast, both sides
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch

# The script's own folder is on sys.path when it runs as `python benchmarks/...`.
from _common import RESULTS, cpu_model, environment, load_average, timed
from _common import peak_rss_of_this_process_gib as peak_rss_gib
from peer_pairs import (
    Case,
    PeerMissing,
    Side,
    all_cases,
    count_parameters,
    set_peer_paths,
    target_at,
)
from peer_pairs.mixed_precision import bf16_comparison, cpu_bf16_flags

from hybridflow.reports import git_commit

MODES = ("eval", "train", "sample")
RESULT_PREFIX = "RESULT "
TINY_BATCH = 2


def build(case: Case) -> tuple[Side, Side]:
    """Both sides of ``case``, each built from the same seed."""
    torch.manual_seed(0)
    ours = case.build_ours()
    torch.manual_seed(0)
    peer = case.build_peer()
    return ours, peer


def make_step(side: Side, x: torch.Tensor) -> Callable[[], None]:
    """One training step of ``side`` on ``x`` (its own Adam optimizer, small learning rate)."""
    opt = torch.optim.Adam(side.module.parameters(), lr=1e-5)

    def step() -> None:
        side.module.train()
        opt.zero_grad(set_to_none=True)
        side.loss(x).backward()
        opt.step()

    return step


def mode_calls(case: Case, side: Side, x: torch.Tensor, batch: int, tiny: bool) -> dict:
    """The callables timed for ``side`` at ``batch``: eval, train and (where timed) sample."""

    def evaluate() -> None:
        side.module.eval()
        with torch.no_grad():
            side.log_prob(x)

    calls = {"eval": evaluate, "train": make_step(side, x)}
    sample_batches = (TINY_BATCH,) if tiny and case.sample_batches else case.sample_batches
    if side.sample is not None and batch in sample_batches:

        def sample() -> None:
            side.module.eval()
            with torch.no_grad():
                side.sample(batch)

        calls["sample"] = sample
    return calls


def time_pair(
    case: Case, sides: dict[str, Side], batch: int, rounds: int, warmup: int, tiny: bool
) -> dict:
    """Median seconds per mode of both sides at ``batch``, timed in turns."""
    x = case.make_input(batch)
    calls = {name: mode_calls(case, side, x, batch, tiny) for name, side in sides.items()}
    modes = [m for m in MODES if all(m in c for c in calls.values())]
    times: dict[str, dict[str, list[float]]] = {n: {m: [] for m in modes} for n in sides}
    order = list(sides)
    for r in range(warmup + rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            for mode in modes:
                t = timed(calls[name][mode])
                if r >= warmup:
                    times[name][mode].append(t)
    out: dict = {}
    for mode in modes:
        ours, peer = (statistics.median(times[n][mode]) for n in ("ours", "peer"))
        out[mode] = {"ours_s": ours, "peer_s": peer, "ratio": ours / peer}
    return out


def profile_table(fn: Callable[[], None], rows: int = 12) -> list[dict]:
    """Top operators of one call of ``fn`` by self CPU time (after one untimed call)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [
        {
            "op": e.key,
            "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 3),
            "share": round(e.self_cpu_time_total / total, 3),
            "calls": e.count,
        }
        for e in events[:rows]
    ]


def memory_child(args: argparse.Namespace) -> None:
    """Build one side of one case, run three training steps, print the peak RSS."""
    torch.set_num_threads(args.threads)
    (case,) = [c for c in all_cases(tiny=False) if c.key == args.case]
    torch.manual_seed(0)
    side = case.build_ours() if args.side == "ours" else case.build_peer()
    x = case.make_input(args.batch)
    built = peak_rss_gib()
    if built is None:
        raise SystemExit("peak memory needs /proc/self/status (Linux); run with --no-memory")
    step = make_step(side, x)
    for _ in range(3):
        step()
    print(RESULT_PREFIX + json.dumps({"peak_rss_gib": peak_rss_gib(), "built_rss_gib": built}))


def case_child(args: argparse.Namespace) -> None:
    """Time one case (``--case-child KEY``) and print its entry: :func:`isolated_case`'s child."""
    torch.set_num_threads(args.threads)
    (case,) = [c for c in all_cases(args.tiny) if c.key == args.case_child]
    print(RESULT_PREFIX + json.dumps(run_case(case, args)))


def isolated_case(case: Case, args: argparse.Namespace) -> dict:
    """:func:`run_case` in a fresh process. In one process the pairs timed earlier changed the
    later ones' ratios (the Flow++ pair at 1×28×28: train 0.74× after the other pairs, 0.59×
    alone, same machine and commit); the cause was not isolated, a process per pair removes it."""
    flags = ("tiny", "no_memory", "no_profile", "bf16")
    result, failure, log = run_child(
        args,
        *("--case-child", case.key, "--rounds", str(args.rounds), "--warmup", str(args.warmup)),
        *("--" + flag.replace("_", "-") for flag in flags if getattr(args, flag)),
    )
    sys.stderr.write(log)
    if result is None:
        return {"pair": case.pair, "setting": case.setting, "note": case.note, "error": failure}
    return result


def run_child(args: argparse.Namespace, *child_args: str) -> tuple[dict | None, str, str]:
    """Run this script with ``child_args`` (plus ``--threads`` and the peer paths) in a fresh
    process; return ``(its RESULT json or None, the failure's output tail, its stderr)``."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *child_args]
    cmd += ["--threads", str(args.threads)]
    cmd += [a for name, path in args.peer_paths.items() for a in ("--peer-path", f"{name}={path}")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode or not lines:
        return None, (proc.stderr or proc.stdout)[-3000:], proc.stderr
    return json.loads(lines[-1][len(RESULT_PREFIX) :]), "", proc.stderr


def measure_memory(case: Case, args: argparse.Namespace) -> dict:
    """Peak RSS of a training step of each side, each in its own subprocess."""
    out: dict = {"batch": case.memory_batch}
    for side in ("ours", "peer"):
        result, failure, _ = run_child(
            args,
            *("--memory-child", "--case", case.key, "--side", side),
            *("--batch", str(case.memory_batch)),
        )
        if result is None:
            return {**out, "error": failure}
        out[side] = result
    out["ratio"] = out["ours"]["peak_rss_gib"] / out["peer"]["peak_rss_gib"]
    out["ratio_above_build"] = (out["ours"]["peak_rss_gib"] - out["ours"]["built_rss_gib"]) / max(
        out["peer"]["peak_rss_gib"] - out["peer"]["built_rss_gib"], 1e-9
    )
    return out


def measured_on() -> dict:
    """Where and when one pair was timed: ``--merge`` keeps entries from earlier runs, which may
    have run on another CPU or commit, so every entry carries its own."""
    return {
        "cpu": cpu_model(),
        "cpu_bf16_flags": cpu_bf16_flags(),
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d"),
        "load_average": load_average(),
    }


def run_case(case: Case, args: argparse.Namespace) -> dict:
    entry: dict = {"pair": case.pair, "setting": case.setting, "note": case.note}
    entry["measured_on"] = measured_on()
    try:
        ours, peer = build(case)
    except PeerMissing as missing:
        print(f"skip {case.key}: {missing}", file=sys.stderr)
        return {**entry, "skipped": str(missing)}
    except Exception:  # a broken peer must not lose the other pairs' results
        print(f"error building {case.key}", file=sys.stderr)
        return {**entry, "error": traceback.format_exc(limit=6)}
    sides = {"ours": ours, "peer": peer}
    params = {n: count_parameters(s.module) for n, s in sides.items()}
    entry.update(
        ours=ours.label,
        peer=peer.label,
        parameters=params,
        parameter_ratio=params["ours"] / params["peer"],
        targets=case.targets,
        batches={},
    )
    batches = (TINY_BATCH,) if args.tiny else case.batches
    rounds, warmup = (1, 0) if args.tiny else (args.rounds, args.warmup)
    for batch in batches:
        started = time.perf_counter()
        try:
            result = time_pair(case, sides, batch, rounds, warmup, args.tiny)
        except Exception:  # a crash of one pair must not lose the others' results
            entry["batches"][str(batch)] = {"error": traceback.format_exc(limit=4)}
            print(f"error {case.key} batch {batch}", file=sys.stderr)
            continue
        entry["batches"][str(batch)] = result
        shown = "  ".join(f"{m} {v['ratio']:.2f}x" for m, v in result.items())
        print(
            f"{case.key:<40} batch {batch:<5} {shown}  ({time.perf_counter() - started:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
    if args.bf16:
        # The training batch: 64 where the pair times it (images), else its largest.
        batch = TINY_BATCH if args.tiny else (64 if 64 in case.batches else max(case.batches))
        try:
            entry["bf16"] = bf16_comparison(sides, case.make_input(batch), rounds, warmup, timed)
        except Exception:  # e.g. a peer op without a bf16 kernel: recorded, not fatal
            entry["bf16"] = {"error": traceback.format_exc(limit=4)}
    if case.memory_batch and not args.tiny and not args.no_memory:
        entry["memory"] = measure_memory(case, args)
    entry["misses"] = misses(entry)
    if entry["misses"] and not args.tiny and not args.no_profile:
        entry["profiles"] = profiles(case, sides, entry["misses"])
    return entry


def misses(entry: dict) -> list[str]:
    """``"mode@batch"`` for every timed mode above its target (and ``"memory"``)."""
    out = []
    targets = entry.get("targets", {})
    for mode in targets:
        if mode == "memory":
            ratio = entry.get("memory", {}).get("ratio")
            if ratio is not None and ratio > targets[mode]:
                out.append("memory")
            continue
        for batch, result in entry["batches"].items():
            target = target_at(targets, mode, batch)
            if mode in result and target is not None and result[mode]["ratio"] > target:
                out.append(f"{mode}@{batch}")
    return out


def profiles(case: Case, sides: dict[str, Side], missed: list[str]) -> dict:
    """One profile per missed mode (at its largest missed batch) of both sides."""
    largest: dict[str, int] = {}
    for item in missed:
        if "@" in item:
            mode, batch = item.split("@")
            largest[mode] = max(largest.get(mode, 0), int(batch))
    out: dict = {}
    for mode, batch in largest.items():
        x = case.make_input(batch)
        out[f"{mode}@{batch}"] = {
            name: profile_table(mode_calls(case, side, x, batch, False)[mode])
            for name, side in sides.items()
        }
    return out


def peer_versions() -> dict:
    out = {}
    for name in ("zuko", "nflows", "normflows"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def table(result: dict) -> str:
    """Markdown table of the ratios (ours / peer time; < 1: ours is faster)."""

    def cell(value: float | None, target: float | None) -> str:
        if value is None:
            return ""
        mark = "" if target is None else (" ✓" if value <= target else " ✗")
        return f"{value:.2f}{mark}"

    lines = [
        "| pair | setting | parameters ours / peer | batch | eval | train | sample | peak memory |",
        "|---|---|---|---|---|---|---|---|",
    ]
    cpus = sorted({e.get("measured_on", {}).get("cpu", "unrecorded") for e in result["cases"]})
    for entry in result["cases"]:
        if "skipped" in entry:
            lines.append(
                f"| {entry['pair']} | {entry['setting']} | skipped: {entry['skipped']} | | | | | |"
            )
            continue
        p, t = entry["parameters"], entry.get("targets", {})
        memory = entry.get("memory", {}).get("ratio")
        where = entry.get("measured_on", {}).get("cpu", "unrecorded")
        setting = f"{entry['setting']} ({where})" if len(cpus) > 1 else entry["setting"]
        for i, (batch, res) in enumerate(entry["batches"].items()):
            head = (
                f"| {entry['pair']} | {setting} | {p['ours']:,} / {p['peer']:,}"
                if i == 0
                else "| | |"
            )
            if "error" in res:
                lines.append(f"{head} | {batch} | error | | | |")
                continue
            cells = [cell(res.get(m, {}).get("ratio"), target_at(t, m, batch)) for m in MODES]
            mem = cell(memory, t.get("memory")) if i == 0 else ""
            lines.append(f"{head} | {batch} | {' | '.join(cells)} | {mem} |")
    if len(cpus) == 1:
        lines.append(f"\nAll pairs measured on: {cpus[0]}.")
    return "\n".join(lines)


def bf16_table(result: dict) -> str:
    """Markdown table of the ``--bf16`` comparisons (empty when the run had none)."""
    lines = [
        "| pair | setting | batch | ours: bf16 / float32 time | peer: bf16 / float32 time "
        "| ours bf16 / peer float32 | ours bits/dim error, median / max "
        "| peer bits/dim error, median / max |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def slowdown(side: dict) -> str:
        if "train_s_bf16" not in side:
            return "fails"
        return f"{side['train_s_bf16'] / side['train_s_float32']:.2f}"

    def error(side: dict) -> str:
        if "median_abs_bpd_error" not in side:
            return "fails: " + side.get("bf16_error", "?").split(",")[0].replace("|", "/")[:70]
        return f"{side['median_abs_bpd_error']:.1e} / {side['max_abs_bpd_error']:.1e}"

    for entry in result["cases"]:
        bf16 = entry.get("bf16")
        if not bf16 or "error" in bf16:
            continue
        ours, peer = bf16["ours"], bf16["peer"]
        ratio = bf16.get("ratio_ours_bf16_to_peer_float32")
        lines.append(
            f"| {entry['pair']} | {entry['setting']} | {bf16['batch']} | {slowdown(ours)} "
            f"| {slowdown(peer)} | {'' if ratio is None else f'{ratio:.2f}'} | {error(ours)} "
            f"| {error(peer)} |"
        )
    return "\n".join(lines) if len(lines) > 2 else ""


def parse_peer_paths(items: list[str]) -> dict[str, str]:
    paths = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--peer-path expects NAME=DIR, got {item!r}")
        paths[name] = path
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds per batch size")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", help="pairs whose name contains this text")
    parser.add_argument("--peer-path", action="append", default=[], metavar="NAME=DIR")
    parser.add_argument("--out", type=Path, default=RESULTS / "peers.json")
    parser.add_argument("--merge", action="store_true", help="replace these pairs in --out only")
    parser.add_argument("--tiny", action="store_true", help="one round at batch 2 (CI)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--bf16", action="store_true", help="also time bf16 autocast, both sides")
    parser.add_argument("--table", action="store_true", help="print the table of --out and exit")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="time every pair in this process (default: each in a fresh one; --tiny: in process)",
    )
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--case-child", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=("ours", "peer"), help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.peer_paths = parse_peer_paths(args.peer_path)
    set_peer_paths(args.peer_paths)
    if args.table:
        result = json.loads(args.out.read_text())
        print(table(result))
        if bf16 := bf16_table(result):
            print("\n" + bf16)
        return
    if args.memory_child:
        memory_child(args)
        return
    if args.case_child:
        case_child(args)
        return

    torch.set_num_threads(args.threads)
    started = time.time()
    load_start = load_average()
    timing = run_case if args.in_process or args.tiny else isolated_case
    entries = [timing(case, args) for case in all_cases(args.tiny, args.only)]
    result = {
        "what": "ours / peer median time per mode (< 1: ours faster), float32, both models of a "
        "pair in one process (each pair in its own unless --in-process or --tiny)",
        "command": " ".join(["python", "benchmarks/peers.py", *sys.argv[1:]]),
        "commit": git_commit(),
        "cpu": cpu_model(),  # of this invocation; merged entries carry their own "measured_on"
        "cpu_bf16_flags": cpu_bf16_flags(),
        "peer_versions": peer_versions(),
        "peer_paths": args.peer_paths,
        "rounds": 1 if args.tiny else args.rounds,
        "warmup": 0 if args.tiny else args.warmup,
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "wall_s": round(time.time() - started, 1),
        "environment": environment(args.threads),
        "cases": entries,
    }
    if args.merge and args.out.exists():
        old = json.loads(args.out.read_text())
        merged = {(e["pair"], e["setting"]): e for e in old["cases"] + entries}  # new ones win
        order = {(c.pair, c.setting): i for i, c in enumerate(all_cases(tiny=False))}
        result["cases"] = sorted(
            merged.values(), key=lambda e: order.get((e["pair"], e["setting"]), len(order))
        )  # the pairs' own order, as in a full run
        result["merged_runs"] = [*old.get("merged_runs", [old.get("command")]), result["command"]]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
