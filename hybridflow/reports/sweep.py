"""λ (and backbone) sweeps: train every combination, evaluate, write a comparison report.

The report folder holds ``results.csv`` (one row per run), ``report.md`` (tables, baselines and
the settings), ``config.json`` (the shared training config) and ``sweep.png`` (accuracy and
bits/dim against λ).
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from ..data import load_dataset
from ..evaluation import OOD_METRIC_DESCRIPTIONS, categorical_bits_per_dim, uniform_bits_per_dim
from ..models import resolve_lambda
from ..training import load_checkpoint, resolve_config, save_config, train
from .runs import evaluate_run

__all__ = ["RESULT_COLUMNS", "run_sweep", "write_report"]

RESULT_COLUMNS = (
    "backbone",
    "lam",
    "lam_value",
    "accuracy",
    "bpd",
    "nll_nats",
    "ece",
    "brier",
    "class_nll",
    "num_parameters",
    "train_time_s",
)


def _lam_label(lam: str | float) -> str:
    return str(lam).replace(" ", "")


def run_sweep(
    name: str,
    lams: Sequence[str | float] = ("0", "1/D", "1"),
    backbones: Sequence[str] | None = None,
    config: Mapping[str, Any] | None = None,
    ood: Sequence[str] = (),
    report_root: str | Path = "reports",
    runs_root: str | Path = "runs",
    dequant_samples: int = 1,
    backbone_overrides: Mapping[str, Mapping[str, Any]] | None = None,
    iw_samples: int = 0,
) -> Path:
    """Train and evaluate one run per (backbone, λ) and write ``report_root/name``.

    Args:
        name: Sweep name; runs go to ``runs_root/name/<backbone>-lam<λ>``.
        lams: λ values (numbers or ``"1/D"``); loss = CE + λ · NLL.
        backbones: Backbone names (default: the config's backbone).
        config: Training config shared by every run (see ``hybridflow.training.DEFAULTS``).
        ood: OOD datasets evaluated against every run.
        report_root: Folder of reports.
        runs_root: Folder of run folders.
        dequant_samples: Single-draw dequantization bounds averaged for test bits/dim.
        iw_samples: If positive, test bits/dim use the importance-weighted bound over this many
            draws instead (Flow++ eq. 13), comparable across uniform and variational
            dequantization.
        backbone_overrides: Per-backbone config entries (e.g. ``backbone_args``, ``epochs``)
            applied over ``config``; the report lists them beside the shared settings.
    """
    base = resolve_config(base=config)
    backbones = list(backbones or [base["backbone"]])
    overrides = {k: dict(v) for k, v in (backbone_overrides or {}).items()}
    unknown = set(overrides) - set(backbones)
    if unknown:
        raise ValueError(f"backbone_overrides names backbones not swept: {sorted(unknown)}")
    for entries in overrides.values():
        resolve_config(entries, base=base)  # fail on unknown keys before training anything
    for lam in lams:
        resolve_lambda(lam, 1)  # fail before training anything
    test_set = load_dataset(
        base["dataset"],
        "test",
        data_root=base["data_root"],
        seed=base["seed"],
        val_fraction=base["val_fraction"],
        download=base["download"],
    )
    dim = math.prod(test_set.shape)
    started = time.time()
    rows: list[dict[str, Any]] = []
    ood_rows: list[dict[str, Any]] = []
    for backbone in backbones:
        for lam in lams:
            label = _lam_label(lam)
            cfg = {
                **base,
                **overrides.get(backbone, {}),
                "backbone": backbone,
                "lam": label,
                "out_dir": str(Path(runs_root) / name),
                "name": f"{backbone}-lam{label.replace('/', 'over')}",
            }
            run_dir = train(cfg)
            result = evaluate_run(
                run_dir, "test", ood=ood, dequant_samples=dequant_samples, iw_samples=iw_samples
            )
            train_time = float(load_checkpoint(run_dir / "model.pt")["train_time_s"])
            rows.append(
                {
                    "backbone": backbone,
                    "lam": label,
                    "lam_value": resolve_lambda(label, dim),
                    **{k: result.get(k, float("nan")) for k in RESULT_COLUMNS[3:-2]},
                    "num_parameters": result["num_parameters"],
                    "train_time_s": train_time,
                }
            )
            for spec, ood_result in result["ood"].items():
                for score, metrics in ood_result["scores"].items():
                    ood_rows.append(
                        {"backbone": backbone, "lam": label, "ood": spec, "score": score, **metrics}
                    )
    # Settings common to every run: λ always varies, the backbone only when several are swept.
    varying = {"lam", "name"} | ({"backbone"} if len(backbones) > 1 else set())
    # Keys overridden for any backbone are listed per backbone (base value where not overridden).
    override_keys = sorted({k for entries in overrides.values() for k in entries})
    per_backbone = {
        b: {k: overrides.get(b, {}).get(k, base.get(k)) for k in override_keys} for b in backbones
    }
    varying |= set(override_keys)
    shared = {k: v for k, v in base.items() if k not in varying}
    return write_report(
        name,
        rows,
        shared,
        ood_rows=ood_rows,
        report_root=report_root,
        wall_time_s=time.time() - started,
        backbone_overrides=per_backbone if override_keys else None,
        bound=(
            f"the importance-weighted bound over {iw_samples} draws"
            if iw_samples
            else f"the mean of {dequant_samples} single-draw bounds"
        ),
    )


def _baselines(config: Mapping[str, Any]) -> dict[str, float]:
    kw = {
        "data_root": config["data_root"],
        "seed": config["seed"],
        "val_fraction": config["val_fraction"],
    }
    train_set = load_dataset(config["dataset"], "train", **kw)
    test_set = load_dataset(config["dataset"], "test", **kw)
    if getattr(train_set, "num_levels", None) is None:
        return {}
    k = train_set.num_levels
    return {
        f"independent per-pixel categorical (add-one smoothing, fit on train), {k} levels": (
            categorical_bits_per_dim(train_set.images, test_set.images, k, alpha=1.0)
        ),
        f"uniform over {k} levels": uniform_bits_per_dim(k),
    }


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def write_report(
    name: str,
    rows: Sequence[Mapping[str, Any]],
    config: Mapping[str, Any],
    ood_rows: Sequence[Mapping[str, Any]] = (),
    report_root: str | Path = "reports",
    wall_time_s: float | None = None,
    backbone_overrides: Mapping[str, Mapping[str, Any]] | None = None,
    bound: str = "a single-draw bound",
) -> Path:
    """Write ``results.csv``, ``report.md``, ``config.json`` and ``sweep.png`` for a sweep.

    ``config.json`` holds the shared settings, plus ``backbone_overrides`` when given.
    ``bound`` says how test bits/dim were estimated.
    """
    out = Path(report_root) / name
    out.mkdir(parents=True, exist_ok=True)
    saved = dict(config)
    if backbone_overrides:
        saved["backbone_overrides"] = {k: dict(v) for k, v in backbone_overrides.items()}
    save_config(saved, out / "config.json")
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(RESULT_COLUMNS))
        writer.writeheader()
        writer.writerows([{k: _fmt(r[k], 6) for k in RESULT_COLUMNS} for r in rows])
    if ood_rows:
        with (out / "ood.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(ood_rows[0]))
            writer.writeheader()
            writer.writerows([{k: _fmt(v, 6) for k, v in r.items()} for r in ood_rows])
    baselines = _baselines({k: v for k, v in config.items() if k != "backbone_overrides"})
    dequantizers = config.get("dequantization") or ", ".join(
        sorted({f"{b}: {o.get('dequantization')}" for b, o in (backbone_overrides or {}).items()})
    )

    lines = [
        f"# Hybrid λ sweep: {name}",
        "",
        f"Dataset `{config['dataset']}` (test split, seed {config['seed']}). Loss per example = "
        "CE + λ · NLL in nats, so λ = 1 is the joint likelihood and λ = 1/D weighs NLL per "
        "dimension (Nalisnick et al. 2019). Bits/dim are lower bounds on the dataset's own pixel "
        f"alphabet from each run's dequantizer (`dequantization`: {dequantizers}), estimated by "
        f"{bound}; accuracy and calibration use bin-centre inputs; all numbers from the EMA "
        "weights.",
        "",
        "| backbone | λ | accuracy | bits/dim | ECE (15 bins) | Brier | class NLL | params "
        "| train time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['backbone']} | {r['lam']} | {100 * r['accuracy']:.2f}% | {r['bpd']:.3f} | "
            f"{100 * r['ece']:.2f}% | {r['brier']:.4f} | {r['class_nll']:.4f} | "
            f"{r['num_parameters']:,} | {r['train_time_s']:.0f} |"
        )
    if baselines:
        lines += ["", "Baselines on the same split (bits/dim):", ""]
        lines += [f"- {label}: **{value:.3f}**" for label, value in baselines.items()]
    if ood_rows:
        lines += [
            "",
            "## OOD detection (higher score = more OOD)",
            "",
            "| backbone | λ | OOD set | score | AUROC | AUPR-in | AUPR-out "
            "| FPR@95 (95% ID accepted) | FPR@95 (95% OOD caught) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in ood_rows:
            lines.append(
                f"| {r['backbone']} | {r['lam']} | {r['ood']} | {r['score']} | {r['auroc']:.3f} | "
                f"{r['aupr_in']:.3f} | {r['aupr_out']:.3f} | {r['fpr95_id']:.3f} | "
                f"{r['fpr95_ood']:.3f} |"
            )
        lines += [""] + [f"- `{k}`: {v}" for k, v in OOD_METRIC_DESCRIPTIONS.items()]
    lines += ["", "## Settings shared by every run (λ as in the table)", "", "```json"]
    lines += [json.dumps(dict(config), indent=2, sort_keys=True), "```"]
    for backbone, entries in (backbone_overrides or {}).items():
        lines += ["", f"Settings of `{backbone}` runs:", "", "```json"]
        lines += [json.dumps(dict(entries), indent=2, sort_keys=True), "```"]
    if wall_time_s is not None:
        lines += ["", f"Wall time of the whole sweep: {wall_time_s:.0f} s."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    _plot(rows, out / "sweep.png")
    return out


def _plot(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    fig, (ax_acc, ax_bpd) = plt.subplots(1, 2, figsize=(8, 3.2))
    for backbone in dict.fromkeys(r["backbone"] for r in rows):
        sub = [r for r in rows if r["backbone"] == backbone]
        xs = range(len(sub))
        ax_acc.plot(xs, [100 * r["accuracy"] for r in sub], "o-", label=backbone)
        ax_bpd.plot(xs, [r["bpd"] for r in sub], "o-", label=backbone)
        for ax in (ax_acc, ax_bpd):
            ax.set_xticks(list(xs), [r["lam"] for r in sub])
            ax.set_xlabel("λ")
    ax_acc.set_ylabel("test accuracy (%)")
    ax_bpd.set_ylabel("test bits/dim")
    ax_bpd.set_yscale("log")
    ax_acc.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
