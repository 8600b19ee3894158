"""Why our MAF-DSF is behind zuko's NAF on the breast-cancer table: ours against ours on that
parity case, one setting apart.

``recipes/parity.py``'s ``maf-dsf/zuko-naf sk:breast_cancer`` finished 0.267 bits/dim behind
(test, 3 seeds, early stopping on 57 validation points), while the same pair is ahead on the
other table and the three toys. Our side there is matched to zuko's parameter count (996,720
parameters: a MADE of width 124 whose output layer emits the 3 × 16 DSF pseudo-parameters per
feature); the table has 398 training points. This trains that model (``ours``) against one
variant (``peer`` slot) in the parity loop: the same seed and settings, the same batches,
checkpoints and selection, so the two columns differ only by the variant:

* ``--variant width=64``: the library's default MADE width (a third of the parameters);
* ``--variant units=8``: 8 sigmoid units instead of 16 at the matched width (fewer
  pseudo-parameters per feature);
* ``--variant evals=60``: not ours against ours but the pair itself (zuko's NAF in the peer slot)
  with 60 checkpoints instead of 12, so early stopping can find a minimum between two of the
  pair's checkpoints.

Compare both columns with zuko's NAF in ``reports/parity`` (test bits/dim 0.036 ± 0.051).

    python recipes/parity_dsf_trace.py --variant width=64   # 3 seeds, ~10 min on 1 core
"""

import argparse
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("width", "units", "evals")
parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--variant", required=True, help="width=N, units=N or evals=N")
parser.add_argument("--seeds", type=int, default=3)
parser.add_argument("--threads", type=int, default=1)
parser.add_argument("--out", type=Path, default=ROOT / "runs" / "parity_dsf_trace")
parser.add_argument("--smoke", action="store_true", help="a few steps (use another --out)")
args = parser.parse_args()
key, _, value = args.variant.partition("=")
if key not in VARIANTS or not value.isdigit() or int(value) < 1:
    parser.error(
        f"--variant must be one of {', '.join(k + '=...' for k in VARIANTS)}, a positive int"
    )
value = int(value)

import torch  # noqa: E402  (after the arguments: a wrong one fails fast)

sys.path.insert(0, str(ROOT / "benchmarks"))
from peer_pairs import autoregressive as ar  # noqa: E402
from peer_pairs.parity import run_seed  # noqa: E402

torch.set_num_threads(args.threads)

case = next(
    c for c in ar.parity_cases() if c.pair == "maf-dsf/zuko-naf" and c.setting == "sk:breast_cancer"
)


def variant(data, seed, smoke):
    if key == "width":
        width, units = value, ar.DSF_UNITS
    else:  # the matched width, fewer units
        width = ar._matched_dsf_model(data.dim, ar.dsf_target(data.dim), seed)[1]
        units = value
    model = ar._ours(data.dim, "naf", seed, transformer="dsf", num_units=units,
                     hidden_features=width)  # fmt: skip
    label = f"hybridflow naf (DSF, {units} units, MADE width {width})"
    return ar._density_side(label, model, ar._flow_log_prob)


if key == "evals":
    settings = replace(case.settings, evals=value)
    trace = replace(case, pair=f"maf-dsf/zuko-naf evals={value}", settings=settings)
else:
    trace = replace(case, pair=f"maf-dsf/{key}={value}", build_peer=variant)
trace = replace(trace, seeds=args.seeds)
for seed in range(args.seeds):
    folder = args.out / trace.folder_name / f"seed{seed}"
    result = run_seed(trace, seed, folder, smoke=args.smoke)
    print(seed, {side: round(result["test"][side]["bpd"], 4) for side in ("ours", "peer")})
