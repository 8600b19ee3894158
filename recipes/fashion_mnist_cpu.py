"""Fashion-MNIST hybrid on a CPU budget: ≥ 90% test accuracy in under an hour on 2 cores.

A coupling + 1×1 flow (2 scales of 4 steps, 32-wide conditioners, 0.23 M parameters with the
head) trained as a hybrid at λ = 1/D (Nalisnick et al. 2019), so it stays a density model, with
the toolkit's CPU fast path: bf16 autocast of the conditioners and the head (flow arithmetic in
float32) and channels-last tensors. The head keeps the latent maps' layout (`pool: flatten`).
Writes reports/fashion_mnist_cpu/ (report.md: test accuracy, bits/dim, calibration and the
validation accuracy against wall time; curve.png; results.json).

Data: `apt-get install -y dataset-fashion-mnist` (or `--download=true` with internet).
Override any setting: `python recipes/fashion_mnist_cpu.py --epochs=10 --amp=none`.
"""

import csv
import json
import sys
import time
from pathlib import Path

from matplotlib.figure import Figure

from hybridflow.reports import evaluate_run, git_commit, package_versions
from hybridflow.training import load_checkpoint, parse_overrides, train

NAME = "fashion_mnist_cpu"
TARGET_ACCURACY, BUDGET_S = 0.90, 3600
CONFIG = {
    "dataset": "fashion-mnist",  # 54,000 train, 6,000 validation, 10,000 test
    "val_fraction": 0.1,
    "backbone": "coupling+1x1",
    "backbone_args": {
        "num_scales": 2,
        "blocks_per_scale": 4,
        "hidden_channels": 32,
        "num_res_blocks": 1,
    },
    "head": "resflow",  # per scale conv3×3 → ActNorm → ReLU, maps flattened; concat; linear
    "head_args": {"width": 32, "dropout": 0.3, "pool": "flatten"},
    "preprocessing": "logit",
    "lam": "1/D",
    "epochs": 24,  # ≈ 85 s each here with bf16 + channels-last
    "batch_size": 64,
    "opt": "adamw",
    "lr": 1e-3,
    "weight_decay": 5e-4,
    "warmup_steps": 200,
    "ema_decay": 0.999,
    "amp": "bf16",
    "channels_last": True,
    "num_threads": 2,
    "eval_every": 1,  # validation accuracy after every epoch: the curve against wall time
    "log_every": 100,
    "out_dir": f"runs/{NAME}",
    "name": "coupling+1x1-lam1overD",
    "progress": False,
}

commit = git_commit()  # before the report folder is written
run_dir = train(CONFIG, **parse_overrides(sys.argv[1:]))
started = time.time()
test = evaluate_run(run_dir, "test", dequant_samples=1)
eval_s = time.time() - started
train_s = float(load_checkpoint(run_dir / "model.pt")["train_time_s"])  # also on a rerun
wall_s = train_s + eval_s

with (run_dir / "metrics.csv").open() as f:
    curve = [r for r in csv.DictReader(f) if r["split"] == "val"]
minutes = [float(r["elapsed_s"]) / 60 for r in curve]
accuracy = [100 * float(r["accuracy"]) for r in curve]
out = Path("reports") / NAME
out.mkdir(parents=True, exist_ok=True)
fig = Figure(figsize=(6, 3.5), layout="constrained")
ax = fig.add_subplot()
ax.plot(minutes, accuracy, marker="o")
ax.axhline(100 * TARGET_ACCURACY, color="gray", linestyle="--", label="target 90%")
ax.set(xlabel="training wall time (minutes, 2 CPU cores)", ylabel="validation accuracy (%)")
ax.legend()
fig.savefig(out / "curve.png", dpi=100)

cfg = json.loads((run_dir / "config.json").read_text())
met = test["accuracy"] >= TARGET_ACCURACY and wall_s <= BUDGET_S
results = {
    "command": "python " + " ".join(["recipes/fashion_mnist_cpu.py", *sys.argv[1:]]),
    "wall_time_s": wall_s,
    "train_time_s": train_s,
    "test_eval_s": eval_s,
    "commit": commit,
    "versions": package_versions(),
    "test": {k: test[k] for k in ("accuracy", "bpd", "nll_nats", "ece", "brier", "class_nll")},
    "target": {"accuracy": TARGET_ACCURACY, "wall_time_s": BUDGET_S, "met": met},
    "validation_curve": [
        {"minutes": m, "accuracy_pct": a} for m, a in zip(minutes, accuracy, strict=True)
    ],
    "config": cfg,
}
(out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
rows = "\n".join(
    f"| {r['epoch']} | {m:.1f} | {a:.2f} | {float(r['bpd']):.3f} |"
    for r, m, a in zip(curve, minutes, accuracy, strict=True)
)
(out / "report.md").write_text(
    f"""# Fashion-MNIST hybrid on a CPU budget

- Regenerate: `{results["command"]}`
- Commit: `{commit}`
- Versions: {", ".join(f"{k} {v}" for k, v in results["versions"].items())}
- Wall time, training and test evaluation: **{wall_s / 60:.1f} minutes** on 2 CPU cores
  (budget 60): training {train_s / 60:.1f} minutes (2 threads), test evaluation {eval_s:.0f} s
- Target ≥ 90% test accuracy in ≤ 60 minutes: **{"met" if met else "missed"}**

Coupling + 1×1 hybrid at λ = 1/D (loss = CE + NLL / D), {cfg["epochs"]} epochs, bf16 autocast
of conditioners and head with float32 flow arithmetic, channels-last. Test split (10,000):

| accuracy % | bits/dim (single draw) | ECE % (15 bins) | Brier | NLL |
|---|---|---|---|---|
| **{100 * test["accuracy"]:.2f}** | {test["bpd"]:.3f} | {100 * test["ece"]:.2f} | \
{test["brier"]:.4f} | {test["class_nll"]:.4f} |

For reference: an independent per-pixel categorical model gives 4.588 bits/dim on this test
split (reports/fashion_mnist/); 2-conv CNN classifiers reach 91.6% (93.4% with batch norm).

![validation accuracy against wall time](curve.png)

| epoch | minutes | validation accuracy % | validation bits/dim |
|---|---|---|---|
{rows}
"""
)
print(
    f"test accuracy {100 * test['accuracy']:.2f}%, {test['bpd']:.3f} bits/dim, "
    f"{wall_s / 60:.1f} min -> {out / 'report.md'}"
)
