"""Flow++ ablation at CPU scale (Ho et al. 2019, Table 2) on digits.

Four variants of `flowpp-cpu` trained with the same steps and settings: the full model
(variational dequantization, mixture-of-logistics CDF couplings, self-attention) and one change
each: uniform dequantization, affine couplings, no self-attention (in the flow's and in the
dequantizer's conditioners). λ = 1, so the loss is the joint NLL -log p(x, y). Test bits/dim use
the importance-weighted bound with the same S for every variant, so dequantizations compare fairly.
Writes reports/flowpp_ablation/ (report.md, results.csv). It took 81 minutes on 2 CPU cores
shared with other jobs.
Override any shared setting: `python recipes/flowpp_ablation.py --epochs=10`.
"""

import csv
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from hybridflow.data import load_dataset
from hybridflow.evaluation import evaluate_predictions, predict
from hybridflow.training import load_checkpoint, load_run, parse_overrides, train

NAME = "flowpp_ablation"
SEEDS = [0, 1, 2]
IW_SAMPLES = 128  # the paper evaluates with 4096; 128 keeps evaluation to ~1 min per run here
PAPER = {"full": 3.165, "uniform": 3.292, "affine": 3.200, "no-attention": 3.193}  # 400 epochs
CONFIG = {
    "dataset": "digits",  # 1,797 images, 8×8, 17 levels; stratified 70/10/20 split
    "val_fraction": 0.1,
    "backbone": "flowpp-cpu",  # 2 + 2 + 2 couplings, 2 blocks of 32 filters, 4 logistics
    # the layout the committed report was trained with (the default is "gathered" since issue 25;
    # the report is regenerated with it next)
    "backbone_args": {"checkerboard_layout": "masked"},
    "dequantization": "variational",  # 4 couplings, 16 context channels, same conditioner size
    "dequantization_args": {"checkerboard_layout": "masked"},
    "head": "resflow",
    "head_args": {"width": 64, "dropout": 0.2, "pool": "flatten"},
    "lam": "1",
    "epochs": 40,  # 20 steps per epoch: 800 steps
    "batch_size": 64,
    "opt": "adam",
    "lr": 1e-3,
    "weight_decay": 0.0,
    "warmup_steps": 200,
    "ema_decay": 0.998,
    "eval_every": 10,
    "progress": False,
}
VARIANTS = {
    "full": {},
    "uniform": {"dequantization": "uniform"},
    "affine": {"backbone_args": {"coupling": "affine"}},
    "no-attention": {
        "backbone_args": {"attention": False},
        "dequantization_args": {"attention": False},
    },
}

CONFIG.update(parse_overrides(sys.argv[1:]))
torch.set_num_threads(min(2, torch.get_num_threads()))
start = time.time()
out_dir = Path("reports") / NAME
out_dir.mkdir(parents=True, exist_ok=True)
rows = []
for seed in SEEDS:
    for variant, change in VARIANTS.items():
        cfg = {**CONFIG, "seed": seed, "out_dir": f"runs/{NAME}", "name": f"{variant}-seed{seed}"}
        for key, value in change.items():
            cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
        if cfg["dequantization"] == "uniform":
            cfg["dequantization_args"] = {}
        run_dir = train(cfg)
        model, run_cfg = load_run(run_dir)
        test = load_dataset("digits", "test", seed=seed, val_fraction=cfg["val_fraction"])
        single = evaluate_predictions(predict(model, test, dequant_samples=8))
        bound = evaluate_predictions(predict(model, test, iw_samples=IW_SAMPLES))
        rows.append(
            {
                "variant": variant,
                "seed": seed,
                "bpd_iw": bound["bpd"],
                "bpd_elbo": single["bpd"],
                "accuracy": bound["accuracy"],
                "num_parameters": sum(p.numel() for p in model.parameters()),
                "train_time_s": float(load_checkpoint(run_dir / "model.pt")["train_time_s"]),
            }
        )
        print(rows[-1], flush=True)

with (out_dir / "results.csv").open("w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)


def values(variant, key):
    return [r[key] for r in sorted(rows, key=lambda r: r["seed"]) if r["variant"] == variant]


def mean_sd(xs, scale=1.0, digits=3):
    xs = [scale * x for x in xs]
    sd = statistics.stdev(xs) if len(xs) > 1 else float("nan")
    return f"{statistics.mean(xs):.{digits}f} ± {sd:.{digits}f}"


n = len(SEEDS)
lines = [
    "# Flow++ ablation on digits (CPU scale of Ho et al. 2019, Table 2)",
    "",
    f"`flowpp-cpu` variants, λ = 1, {CONFIG['epochs']} epochs each with identical settings; "
    f"seeds {SEEDS}. Bits/dim on the 17-level test split: importance-weighted bound with "
    f"S = {IW_SAMPLES} (IW) and the mean of 8 single-draw bounds (ELBO). Mean ± sd over seeds.",
    "",
    "| variant | bits/dim (IW) | bits/dim (ELBO) | Δ IW vs full (paired) | accuracy | params "
    "| train time (s) | paper (CIFAR-10) |",
    "|---|---|---|---|---|---|---|---|",
]
verdicts = {}
for variant in VARIANTS:
    pairs = zip(values(variant, "bpd_iw"), values("full", "bpd_iw"), strict=True)
    delta = [a - b for a, b in pairs]
    if variant == "full":
        delta_text = "—"
    else:
        mean = statistics.mean(delta)
        se = statistics.stdev(delta) / math.sqrt(n) if n > 1 else float("nan")
        delta_text = f"{mean:+.3f} ± {se:.3f} (SE)"
        paper_sign = PAPER[variant] > PAPER["full"]
        if abs(mean) <= 2 * se:
            verdicts[variant] = "inconclusive (|Δ| ≤ 2 SE)"
        elif (mean > 0) == paper_sign:
            verdicts[variant] = "reproduced (worse than full, as in the paper)"
        else:
            verdicts[variant] = "not reproduced (better than full, unlike the paper)"
    lines.append(
        f"| {variant} | {mean_sd(values(variant, 'bpd_iw'))} | "
        f"{mean_sd(values(variant, 'bpd_elbo'))} | {delta_text} | "
        f"{mean_sd(values(variant, 'accuracy'), 100, 2)}% | "
        f"{values(variant, 'num_parameters')[0]:,} | "
        f"{mean_sd(values(variant, 'train_time_s'), 1, 0)} | {PAPER[variant]:.3f} |"
    )
lines += [
    "",
    "## Directions of the paper's Table 2",
    "",
    "The paper finds every ablation worse than the full model (uniform dequantization most, then "
    "affine coupling, then no self-attention). Here, Δ is the paired per-seed difference:",
    "",
]
lines += [f"- **{variant}**: {verdict}" for variant, verdict in verdicts.items()]
order = sorted(VARIANTS, key=lambda v: statistics.mean(values(v, "bpd_iw")))
lines += [
    "",
    f"Ranking by IW bits/dim (best first): {' < '.join(order)}; paper: full < no-attention < "
    "affine < uniform.",
    "",
    "Runs: `runs/flowpp_ablation/<variant>-seed<k>/`; per-run numbers in `results.csv`.",
]
(out_dir / "report.md").write_text("\n".join(lines) + "\n")
print((out_dir / "report.md").read_text())
print(f"wall time: {time.time() - start:.0f} s")
