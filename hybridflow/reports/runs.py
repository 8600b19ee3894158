"""Evaluate finished run folders: test metrics and OOD tables, written beside the run."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import load_dataset
from ..evaluation import evaluate_predictions, ood_table, predict, selective_accuracy
from ..runs import load_run

__all__ = ["check_compatible", "evaluate_run", "run_data_kwargs", "write_csv"]


def run_data_kwargs(cfg: Mapping[str, Any], data_root: str | None = None) -> dict[str, Any]:
    """``load_dataset`` keywords that reproduce a run's splits (its seed and val fraction)."""
    root = data_root if data_root is not None else cfg["data_root"]
    return {"data_root": root, "seed": cfg["seed"], "val_fraction": cfg["val_fraction"]}


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Write dict rows (the first row's keys are the columns) as a CSV file."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def check_compatible(name: str, dataset, reference) -> None:
    """Refuse an OOD dataset whose alphabet or example shape differs from the model's data."""
    if getattr(dataset, "num_levels", None) != getattr(reference, "num_levels", None):
        raise ValueError(
            f"OOD dataset {name} has {getattr(dataset, 'num_levels', None)} levels per pixel, "
            f"the model reads {getattr(reference, 'num_levels', None)}"
        )
    if tuple(dataset.shape) != tuple(reference.shape):
        raise ValueError(
            f"OOD dataset {name} has examples of shape {tuple(dataset.shape)}, the model reads "
            f"{tuple(reference.shape)}"
        )


def evaluate_run(
    run_dir: str | Path,
    split: str = "test",
    ood: Sequence[str] = (),
    dequant_samples: int = 1,
    iw_samples: int = 0,
    data_root: str | None = None,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Evaluate a run's EMA model on ``split`` and against each OOD dataset.

    Writes ``eval_<split>.json`` (all metrics), ``eval_<split>.npz`` (per-example ``logits``,
    ``log_prob`` in nats and ``labels``) and, with ``ood``, ``ood_<split>.csv`` (one row per
    OOD dataset × score) into the run folder and returns the same dict. For labelled data with
    a classifier the dict has ``selective``: accuracy at 80/90/95% coverage and AURC when the
    least confident inputs are rejected by log p(x) (``density``) or by ``max_softmax``.
    OOD datasets are read whole (split ``"all"``) unless given as ``NAME@SPLIT``. Bits/dim use
    the importance-weighted bound over ``iw_samples`` draws when it is positive, otherwise the
    mean of ``dequant_samples`` single-draw bounds (see :func:`~hybridflow.evaluation.predict`).
    """
    run_dir = Path(run_dir)
    model, cfg = load_run(run_dir, device=device)
    data_kw = run_data_kwargs(cfg, data_root)
    in_set = load_dataset(cfg["dataset"], split, **data_kw)
    bound_kw = {"dequant_samples": dequant_samples, "iw_samples": iw_samples}
    in_pred = predict(model, in_set, batch_size=batch_size, device=device, **bound_kw)
    result: dict[str, Any] = {
        "run": run_dir.name,
        "dataset": cfg["dataset"],
        "split": split,
        "lam": cfg["lam"],
        "backbone": cfg["backbone"],
        "dequantization": cfg["dequantization"],
        "dequant_samples": dequant_samples,
        "iw_samples": iw_samples,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        **evaluate_predictions(in_pred),
        "ood": {},
    }
    labels = in_pred["labels"]
    if model.num_classes and labels.size and labels.min() >= 0:
        correct = in_pred["logits"].argmax(1) == labels
        logits = in_pred["logits"] - in_pred["logits"].max(1, keepdims=True)
        max_softmax = 1.0 / np.exp(logits).sum(1)  # the top class's probability
        # A non-finite likelihood (a diverged input) ranks as the least confident.
        density = np.nan_to_num(in_pred["log_prob"], nan=-1e300, neginf=-1e300, posinf=1e300)
        result["selective"] = {
            "density": selective_accuracy(correct, density),
            "max_softmax": selective_accuracy(correct, max_softmax),
        }
    np.savez_compressed(
        run_dir / f"eval_{split}.npz",
        logits=in_pred["logits"],
        log_prob=in_pred["log_prob"],
        labels=labels,
    )
    rows = []
    for spec in ood:
        name, _, ood_split = spec.partition("@")
        out_set = load_dataset(name, ood_split or "all", **data_kw)
        check_compatible(name, out_set, in_set)
        out_pred = predict(model, out_set, batch_size=batch_size, device=device, **bound_kw)
        table = ood_table(in_pred, out_pred)
        result["ood"][spec] = {"bpd": evaluate_predictions(out_pred)["bpd"], "scores": table}
        rows += [{"ood": spec, "score": score, **metrics} for score, metrics in table.items()]
    (run_dir / f"eval_{split}.json").write_text(json.dumps(result, indent=2) + "\n")
    if rows:
        write_csv(rows, run_dir / f"ood_{split}.csv")
    return result
