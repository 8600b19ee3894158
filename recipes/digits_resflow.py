"""Residual Flow vs affine coupling on digits at λ = 1/D, same parameter count and time budget.

The coupling run uses the main job's RealNVP settings (recipes/digits_sweep.py); the Residual
Flow (Chen et al. 2019) is sized to the same number of parameters (≈225 k with the head), and
both get about the same training wall-clock on 2 CPU cores (epochs set per backbone; the report
records each run's measured train time). Writes reports/digits_resflow/. About 13 minutes.
Override any shared setting: `python recipes/digits_resflow.py --seed=1`.
"""

import sys
import time

import torch

from hybridflow.reports import run_sweep
from hybridflow.training import parse_overrides

NAME = "digits_resflow"
LAMS = ["1/D"]
CONFIG = {
    "dataset": "digits",  # 1,797 images, 8×8, 17 levels; stratified 70/10/20 split
    "val_fraction": 0.1,
    "head": "resflow",
    "head_args": {"width": 64, "dropout": 0.2, "pool": "flatten"},
    "preprocessing": "logit",
    "logit_alpha": 1e-3,
    "batch_size": 64,
    "opt": "adamw",
    "warmup_steps": 200,
    "ema_decay": 0.998,
    "eval_every": 50,
    "seed": 0,
}
BACKBONES = {
    "realnvp": {  # the main job's coupling flow, trained for the same budget
        "backbone_args": {
            "num_scales": 2,
            "couplings_per_scale": 3,
            "final_couplings": 4,
            "hidden_channels": 32,
            "num_res_blocks": 1,
        },
        "epochs": 350,
        "lr": 1e-3,
        "weight_decay": 5e-4,
    },
    "resflow-digits": {  # squeeze; 2 scales × 5 residual blocks (3-1-3, width 64); 2 fc blocks
        "backbone_args": {
            "squeeze_first": True,
            "num_scales": 2,
            "blocks_per_scale": 5,
            "hidden_channels": 64,
            "fc_hidden": 96,
        },
        "epochs": 100,
        "lr": 2e-3,
        "weight_decay": 0.0,  # decay would shrink the spectrally normalized weights' Lipschitz
    },
}

CONFIG.update(parse_overrides(sys.argv[1:]))
torch.set_num_threads(min(2, torch.get_num_threads()))
start = time.time()
out = run_sweep(
    NAME,
    LAMS,
    list(BACKBONES),
    config=CONFIG,
    dequant_samples=8,
    backbone_overrides=BACKBONES,
)
print((out / "report.md").read_text())
print(f"wall time: {time.time() - start:.0f} s")
