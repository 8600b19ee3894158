"""Fashion-MNIST λ study: coupling, coupling + 1×1 and residual hybrids at λ ∈ {0, 1/D, 1}.

The rows of the Residual Flows hybrid table (Chen et al. 2019, Table 4) on Fashion-MNIST at a
CPU budget: one epoch per cell, one seed, nine cells of ≈200 k parameters each. Every cell is
scored on the test split against MNIST and three OOD sets made in code (uniform noise, constant
images, inverted Fashion-MNIST). Writes reports/fashion_mnist/ (report.md, report.html,
results.csv, results.json, figures).

Data: Fashion-MNIST from `apt-get install -y dataset-fashion-mnist` (or torchvision with
`--download=true`); MNIST from `--mnist=PATH` (an npz with keys x, y), by default
../shared/data/mnist10k.npz where present, else torchvision's MNIST test split (needs internet).
Budget of the committed run: 5,207 s of training (about 87 core-minutes: 338–822 s per cell on
one thread) and about 2.5 core-hours of evaluation (the residual flows' 10-term log-det series
over ≈ 50,000 test, validation, training and OOD images per cell dominates), in single-thread
processes two at a time: about 2 hours on 2 CPU cores. Override any setting: `--epochs=2`.
"""

import argparse
from pathlib import Path

from hybridflow.experiments import run_sweep
from hybridflow.reports.study import RESIDUAL_FLOWS_TABLE4
from hybridflow.training import parse_overrides

NAME = "fashion_mnist"
LAMS = ["0", "1/D", "1"]
SEEDS = [0]
CONFIG = {
    "dataset": "fashion-mnist",  # 60,000 train (10% held out for validation), 10,000 test
    "val_fraction": 0.1,
    "head": "resflow",  # per scale conv → ActNorm → ReLU → global average pool; concat; linear
    "head_args": {"width": 64, "dropout": 0.2},
    "preprocessing": "logit",
    "logit_alpha": 1e-3,
    "epochs": 1,
    "batch_size": 64,
    "opt": "adamw",
    "lr": 1e-3,
    "weight_decay": 5e-4,
    "warmup_steps": 200,
    "ema_decay": 0.999,
    "eval_every": 1,
    "log_every": 40,
    "progress": False,
}
COUPLING = {  # squeeze to 4×14×14; 2 scales of 4 steps with 32-wide ResNet conditioners
    "num_scales": 2,
    "blocks_per_scale": 4,
    "hidden_channels": 32,
    "num_res_blocks": 1,
}
BACKBONES = {
    "coupling": {"backbone_args": COUPLING},
    "coupling+1x1": {"backbone_args": COUPLING},
    "resflow": {  # squeeze; 2 scales × 2 conv residual blocks of width 32; 2 fc blocks of 48
        "backbone_args": {
            "squeeze_first": True,
            "num_scales": 2,
            "blocks_per_scale": 2,
            "hidden_channels": 32,
            "fc_blocks": 2,
            "fc_hidden": 48,
        },
        "weight_decay": 0.0,  # decay would shrink the spectrally normalized weights
    },
}
MNIST = Path("../shared/data/mnist10k.npz")
SCORING = {"dequant_samples": 1, "iw_samples": 0, "typicality_batch": 10}
# ---- run ----

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
parser.add_argument("--workers", type=int, default=2, help="cells trained at once")
parser.add_argument("--mnist", help="MNIST npz for the OOD set (default: ../shared's, if there)")
args, rest = parser.parse_known_args()  # the rest are --key=value config overrides
workers, mnist = args.workers, args.mnist
OVERRIDES = parse_overrides(rest)  # win over the per-backbone settings
mnist_spec = f"npz:{mnist or MNIST}" if mnist or MNIST.exists() else "mnist@test"
OOD = [mnist_spec, "noise:fashion-mnist", "constant:fashion-mnist", "inverted:fashion-mnist"]
out = run_sweep(
    NAME,
    LAMS,
    list(BACKBONES),
    config=CONFIG,
    seeds=SEEDS,
    backbone_overrides=BACKBONES,
    ood=OOD,
    workers=workers,
    threads=workers,
    overrides=OVERRIDES,
    **SCORING,
    checks=[RESIDUAL_FLOWS_TABLE4],  # the seed paper's table, checked on this grid
)
print(f"report: {out / 'report.md'}")
