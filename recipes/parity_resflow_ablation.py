"""Which layout difference kept ``resflow-cpu`` behind the Residual Flows reference: ours against
ours on the parity density task, one difference apart.

The resflow pair of ``recipes/parity.py`` (revision 0) finished 0.058 bits/dim behind the
reference. This runs its density case with both sides ours, built exactly as that pair builds
ours (same seed, so the same initialisation; the loop feeds both the same batches and noise),
and one side changed: the first puts back the LipSwish in front of the first block (revision
0's layout). ``--neumann theorem2`` gives both sides the reference's Neumann indexing
(``benchmarks/neumann_variance.py``). The reference's own curve is in ``reports/parity`` (same
batches and noise: step for step comparable).

Issue 24's run (an earlier copy of this script with ``--neumann theorem2``, written before the
library had ``first_preact``; it removed the activation instead of adding it, and its smoke
numbers differ from this script's in the fourth decimal), validation bits/dim with / without
the first pre-activation: step 300 4.3786 / 4.3785, 600 4.2617 / 4.2538, 750 4.1898 / 4.1740,
900 4.1273 / 4.0996; the reference 4.3794, 4.2482, 4.1731, 4.0978.

    python recipes/parity_resflow_ablation.py --neumann theorem2   # 1,500 steps: ~1.8 h, 1 core
"""

import argparse
import sys
import types
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from neumann_variance import neumann_theorem2  # noqa: E402
from peer_pairs import resflow  # noqa: E402
from peer_pairs.parity import run_seed  # noqa: E402

from hybridflow.nets import LipschitzConvNet, LipSwish  # noqa: E402
from hybridflow.transforms import ResidualBlock  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--neumann", choices=["library", "theorem2"], default="library")
parser.add_argument("--threads", type=int, default=1)
parser.add_argument("--out", type=Path, default=ROOT / "runs" / "parity_resflow_ablation")
parser.add_argument("--smoke", action="store_true", help="a few steps (use another --out)")
args = parser.parse_args()
torch.set_num_threads(args.threads)


def ours(first_preact: bool):
    build = resflow._parity_ours(hybrid=False)

    def build_arm(data, seed, smoke):
        side = build(data, seed, smoke)
        if args.neumann == "theorem2":
            for block in side.module.modules():
                if isinstance(block, ResidualBlock):
                    block._neumann = types.MethodType(neumann_theorem2, block)
        if first_preact:  # revision 0's layout: a LipSwish in front of the first block
            first = next(m for m in side.module.modules() if isinstance(m, LipschitzConvNet))
            first.net.insert(0, LipSwish())
        side.label += (" with" if first_preact else " without") + " first pre-activation"
        return side

    return build_arm


density = resflow.parity_cases()[0]
case = replace(
    density,
    pair="resflow-cpu/first-preact",
    setting=f"fashion-mnist density neumann-{args.neumann}",
    build_ours=ours(first_preact=True),
    build_peer=ours(first_preact=False),
    seeds=1,
)
folder = args.out / case.folder_name / "seed0"
result = run_seed(case, 0, folder, smoke=args.smoke)
print({side: result["test"][side]["bpd"] for side in ("ours", "peer")})
