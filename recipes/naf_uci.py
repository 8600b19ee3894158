"""MAF-DDSF on the five UCI density benchmarks at the NAF paper's settings (Huang et al. 2018).

Neural autoregressive flows with deep dense sigmoidal transformers on POWER, GAS, HEPMASS,
MINIBOONE and BSDS300 (the MAF paper's preprocessing and splits, Papamakarios et al. 2017),
fitted by maximum likelihood with `fit_density`, early stopping on validation, and the test
log-likelihood (nats per example ± standard error) set against the paper's Table. Settings are
those of the NAF reference code's UCI script (maf_experiments.py) as far as the toolkit supports
them: 5 flows with reversals between them, MADE conditioners of one hidden layer of 100 units,
DDSF of 1 layer × 16 units, Adam 1e-4 at a constant rate, batch 100, gradient-norm clip 5, up
to 400 epochs with patience 30 epochs, no weight averaging (EMA decay 0). The reference's MADEs
use ELU and it ends with a learned linear flow; ours use the toolkit's MADE and no linear layer.
Writes reports/naf_uci/ (report.md, results.json). GPU-sized: see recipes/README.md for the cost.

Data: `--data_root=DIR` holding the MAF data archive (Zenodo record 1161203; see
hybridflow/data/tabular.py); `--sets=uci:power,uci:gas` runs some of them.
`--smoke` fits 20 steps on random Gaussian tables of each set's dimensionality (6, 8, 21, 43,
63; 512 / 128 / 128 rows) made here, with the model SHRUNK (2 flows, MADE width 16, DDSF 1 × 4
units): a check that the recipe runs, not a result. `--out=DIR` writes DIR/reports/...
"""

import json
import sys
import time
from pathlib import Path

import torch

from hybridflow.data import load_dataset
from hybridflow.models import FlowModel, create_backbone
from hybridflow.training.density import evaluate_log_likelihood, fit_density

NAME = "naf_uci"
SETS = ["uci:power", "uci:gas", "uci:hepmass", "uci:miniboone", "uci:bsds300"]
PAPER = {  # MAF-DDSF (5 flows), test log-likelihood in nats (Huang et al. 2018, Table 3)
    "uci:power": 0.62,
    "uci:gas": 11.91,
    "uci:hepmass": -15.09,
    "uci:miniboone": -8.86,
    "uci:bsds300": 157.73,
}
MODEL = {  # the `naf` backbone
    "transformer": "ddsf",
    "num_flows": 5,
    "num_units": 16,
    "num_layers": 1,
    "hidden_features": 100,
    "made_layers": 1,
}
EPOCHS, PATIENCE_EPOCHS, BATCH = 400, 30, 100
FIT = {"opt": "adam", "lr": 1e-4, "min_lr": 1e-4, "warmup_steps": 0, "grad_clip": 5.0}
FIT |= {"weight_decay": 0.0, "ema_decay": 0.0}
SEED = 0
COLUMNS = {  # report table: header -> cell of a results row
    "dataset": "{dataset}",
    "D": "{dim}",
    "params": "{parameters:,}",
    "test log-lik (nats)": "{test_ll:.3f} ± {test_ll_se:.3f}",
    "paper": "{paper_ll:.2f}",
    "best step": "{best_step}",
    "train s": "{train_time_s:.0f}",
}

# ---- smoke: random tables of the same dimensionality, model shrunk ----
DIMS = {"uci:power": 6, "uci:gas": 8, "uci:hepmass": 21, "uci:miniboone": 43, "uci:bsds300": 63}
SMOKE_MODEL = {**MODEL, "num_flows": 2, "num_units": 4, "hidden_features": 16}
SMOKE_ROWS = {"train": 512, "val": 128, "test": 128}
SMOKE_STEPS, SMOKE_BATCH = 20, 64

OPTIONS = ("--out", "--data_root", "--sets")
args = sys.argv[1:]
smoke = "--smoke" in args
option = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in args if "=" in a}
if unknown := [a for a in args if a != "--smoke" and a.split("=")[0] not in OPTIONS]:
    sys.exit(f"unknown option(s) {unknown}; use --smoke, {'=..., '.join(OPTIONS)}=...")
out, root = Path(option.get("--out", ".")), option.get("--data_root")
sets = option.get("--sets", ",".join(SETS)).split(",")
torch.set_num_threads(1 if smoke else torch.get_num_threads())
device = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
start = time.time()
rows = []
for name in sets:
    if smoke:  # standard-normal tables: shapes are all the recipe needs from the data
        gen = torch.Generator().manual_seed(SEED)
        splits = {s: torch.randn(n, DIMS[name], generator=gen) for s, n in SMOKE_ROWS.items()}
        model_args, batch = SMOKE_MODEL, SMOKE_BATCH
        steps, eval_every, patience = SMOKE_STEPS, SMOKE_STEPS // 2, None
    else:
        splits = {
            s: load_dataset(name, s, data_root=root, seed=SEED).points
            for s in ("train", "val", "test")
        }
        model_args, batch = MODEL, BATCH
        eval_every = len(splits["train"]) // batch  # validate once per epoch, as the reference
        steps, patience = EPOCHS * eval_every, PATIENCE_EPOCHS
    dim = splits["train"].shape[1]
    torch.manual_seed(SEED)
    backbone = create_backbone("naf", (dim,), seed=SEED, **model_args)
    model = FlowModel(backbone, (dim,), num_levels=None, preprocessing="none").to(device)
    fit = fit_density(
        model,
        splits["train"],
        splits["val"],
        steps=steps,
        batch_size=batch,
        eval_every=eval_every,
        patience=patience,
        seed=SEED,
        **FIT,
    )
    ll, se = evaluate_log_likelihood(fit.model, splits["test"])
    rows.append(
        {
            "dataset": name,
            "dim": dim,
            "parameters": sum(p.numel() for p in fit.model.parameters()),
            "test_ll": ll,
            "test_ll_se": se,
            "paper_ll": PAPER[name],
            "best_step": fit.best_step,
            "steps_per_epoch": eval_every,
            "nan_skips": fit.nan_skips,
            "train_time_s": fit.train_time_s,
        }
    )
    print(rows[-1], flush=True)

out_dir = out / "reports" / (f"{NAME}-smoke" if smoke else NAME)
out_dir.mkdir(parents=True, exist_ok=True)
(out_dir / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
lines = [
    "# MAF-DDSF on the UCI benchmarks (Huang et al. 2018)" + (" — SMOKE RUN" if smoke else ""),
    "",
    f"Command: `python {' '.join(['recipes/naf_uci.py', *args])}`; seed {SEED}; "
    f"model {SMOKE_MODEL if smoke else MODEL}; fit {FIT}.",
    "",
    "| " + " | ".join(COLUMNS) + " |",
    "|" + "---|" * len(COLUMNS),
    *("| " + " | ".join(cell.format(**r) for cell in COLUMNS.values()) + " |" for r in rows),
    "",
    f"Wall time: {time.time() - start:.0f} s.",
]
(out_dir / "report.md").write_text("\n".join(lines) + "\n")
print((out_dir / "report.md").read_text())
