"""Parity with the reference implementations: our flows and the originals, trained side by side.

Every pair of ``benchmarks/peer_pairs/`` (our model and the peer library's or reference code's,
equal architecture and parameter count within 5%) is trained by one loop that feeds both the same
batches, dequantization noise, optimizer, schedule, clipping and EMA
(``benchmarks/peer_pairs/parity.py``), for several seeds; both are scored by their own
``log_prob`` (whole bits/dim) at ≥ 10 checkpoints and on the test split. Writes
``reports/parity/`` (report.md, report.html, results.json, figures). Runs live in
``runs/parity/<pair>/seed<k>/`` and resume where they stopped; finished ones are not rerun, and
those recorded in the committed results.json are restored into a fresh checkout's runs folder.

    python recipes/parity.py --peer-path residual-flows=../peers/residual-flows \\
        --peer-path flowplusplus=../peers/flowplusplus    # every pair, ~13 h on 2 cores
    python recipes/parity.py --only maf --threads 1            # one family (run one such
                                                               # command per core: a run
                                                               # another process holds is left)
    python recipes/parity.py --report-only                     # the report from finished runs
    python recipes/parity.py --smoke                           # every pair, a few steps (CI)

Peers: zuko, nflows, normflows from ``pip install -e .[bench]``; the Residual Flows reference
(rtqichen/residual-flows) and chrischute/flowplusplus as checkouts (``--peer-path NAME=DIR``; see
``benchmarks/peer_pairs/resflow.py`` and ``flowpp.py`` for the one change the latter needs).
A pair whose peer is missing is skipped with a message.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from peer_pairs import PeerMissing, all_parity_cases, set_peer_paths  # noqa: E402
from peer_pairs.parity import RunClaimed, claim, finished, run_seed  # noqa: E402
from peer_pairs.parity_report import restore_results, write_parity_report  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--only", help="run the pairs whose 'pair setting' contains this text")
parser.add_argument("--peer-path", action="append", default=[], metavar="NAME=DIR")
parser.add_argument("--seeds", type=int, help="seeds per pair (default: each pair's own)")
parser.add_argument("--threads", type=int, default=2, help="torch threads")
parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "parity")
parser.add_argument("--out", type=Path, help="report folder (default reports/parity)")
parser.add_argument("--smoke", action="store_true", help="a few steps per pair (code path)")
parser.add_argument("--report-only", action="store_true", help="no training: report what ran")
args = parser.parse_args()

set_peer_paths(dict(p.split("=", 1) for p in args.peer_path))
torch.set_num_threads(args.threads)
every_case = all_parity_cases()
cases = [c for c in every_case if args.only is None or args.only in c.key]
if not cases:
    sys.exit(f"no pair matches --only {args.only!r}")
runs = args.runs / "smoke" if args.smoke else args.runs
out = args.out or (runs / "report" if args.smoke else ROOT / "reports" / "parity")
if not args.smoke and (restored := restore_results(out / "results.json", runs, every_case)):
    print(f"{restored} finished runs restored from {out / 'results.json'}")
start, skipped = time.time(), {}
for case in cases if not args.report_only else []:
    seeds = range(1 if args.smoke else (args.seeds or case.seeds))
    data = None
    for seed in seeds:
        folder = runs / case.folder_name / f"seed{seed}"
        if finished(case, folder):
            continue
        print(f"{case.key} seed {seed} ({time.time() - start:.0f} s)", flush=True)
        try:
            with claim(folder):
                data = data or case.load_data(args.smoke)
                run_seed(case, seed, folder, smoke=args.smoke, data=data)
        except RunClaimed as claimed:
            print(f"  left to the other process: {claimed}", flush=True)
        except PeerMissing as missing:
            skipped[case.key] = str(missing)
            print(f"  skipped: {missing}", flush=True)
            break
# The report covers every pair (what other invocations ran too), whatever --only selected.
report = write_parity_report(
    cases if args.smoke else every_case,
    runs,
    out,
    skipped=skipped,
    command="python " + " ".join(["recipes/parity.py", *sys.argv[1:]]),
)
print(f"wrote {report} ({time.time() - start:.0f} s)")
