"""Unlabelled data (label -1): density-only and semi-supervised training, and evaluation that
reports density metrics without inventing classification numbers."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_REALNVP
from sklearn.datasets import load_digits
from sklearn.metrics import log_loss

import hybridflow.training.setup as training_setup
from hybridflow.data import load_dataset
from hybridflow.evaluation import evaluate_predictions, predict
from hybridflow.models import FlowModel, HybridModel, create_backbone
from hybridflow.training import load_run, train

TINY = {
    **TINY_REALNVP,
    "batch_size": 64,
    "max_steps": 20,
    "warmup_steps": 2,
    "log_every": 5,
    "eval_every": 1,
    "progress": False,
    "num_threads": 1,
}


@pytest.fixture
def unlabelled_npz(tmp_path: Path) -> Path:
    path = tmp_path / "digits_unlabelled.npz"
    np.savez(path, x=load_digits().images.astype(np.uint8), num_levels=17)
    return path


def _rows(run_dir: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((run_dir / "metrics.csv").open()))


def test_unlabelled_npz_trains_density_only_and_evaluates(
    tmp_path: Path, unlabelled_npz: Path, one_thread
) -> None:
    dataset = f"npz:{unlabelled_npz}"
    run_dir = train(TINY, dataset=dataset, lam=1, out_dir=str(tmp_path), name="unlabelled")
    rows = _rows(run_dir)
    train_rows = [r for r in rows if r["split"] == "train"]
    val_rows = [r for r in rows if r["split"] == "val"]
    assert len(train_rows) == 4 and len(val_rows) == 1  # 1257 // 64 = 19 steps per epoch
    for row in rows:
        assert math.isfinite(float(row["bpd"])) and float(row["bpd"]) > 0
        assert row["accuracy"] == "" and row["ce"] == ""  # no fake numbers
    assert all(r["ece"] == "" and r["brier"] == "" for r in val_rows)

    model, cfg = load_run(run_dir)
    assert cfg["dataset"] == dataset and model.num_classes == 0
    test_set = load_dataset(dataset, "test")
    metrics = evaluate_predictions(predict(model, test_set))
    assert set(metrics) == {"nll_nats", "bpd"} and metrics["bpd"] > 0


def test_lambda_zero_without_labels_is_refused_before_training(
    tmp_path: Path, unlabelled_npz: Path
) -> None:
    with pytest.raises(ValueError, match="has no labels, and λ = 0 trains only the classifier"):
        train(TINY, dataset=f"npz:{unlabelled_npz}", lam=0, out_dir=str(tmp_path), name="x")
    assert not (tmp_path / "x" / "checkpoint.pt").exists()


def test_unlabelled_examples_contribute_only_the_weighted_nll() -> None:
    backbone = create_backbone("realnvp", (1, 8, 8), **TINY_REALNVP["backbone_args"])
    model = HybridModel(FlowModel(backbone, (1, 8, 8), num_levels=17), 10, width=8)
    x = torch.randint(0, 17, (6, 1, 8, 8)).to(torch.get_default_dtype())
    model.data_init(x)
    y = torch.tensor([3, -1, 5, -1, 0, 9])
    torch.manual_seed(1)  # the same dequantization noise for both calls
    mixed = model.loss(x, y, lam=0.5)
    torch.manual_seed(1)
    full = model.loss(x, y.clamp(min=0), lam=0.5)
    unlabelled, labelled = y < 0, y >= 0
    assert torch.all(mixed["ce"][unlabelled] == 0)
    torch.testing.assert_close(mixed["loss"][unlabelled], 0.5 * mixed["nll"][unlabelled])
    torch.testing.assert_close(mixed["loss"][labelled], full["loss"][labelled])
    mixed["loss"].mean().backward()  # gradients stay finite through the ignored labels
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_partly_labelled_training_logs_accuracy_of_the_labelled_part(
    tmp_path: Path, monkeypatch, one_thread
) -> None:
    """Semi-supervised training: every other training label is hidden (-1)."""
    tensors = training_setup.dataset_tensors

    def hide_half(dataset):
        images, labels = tensors(dataset)
        if dataset.split != "train":
            return images, labels
        return images, torch.where(torch.arange(len(labels)) % 2 == 0, labels, -1)

    monkeypatch.setattr(training_setup, "dataset_tensors", hide_half)
    run_dir = train(TINY, dataset="digits", lam="1/D", out_dir=str(tmp_path), name="semi")
    train_rows = [r for r in _rows(run_dir) if r["split"] == "train"]
    assert train_rows and all(0 <= float(r["accuracy"]) <= 1 for r in train_rows)
    assert all(float(r["ce"]) > 0 for r in train_rows)
    assert load_run(run_dir)[0].num_classes == 10


def test_evaluation_scores_only_the_labelled_examples() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(8, 3))
    labels = np.array([0, 1, 2, -1, 0, -1, 1, 2])
    pred = {"logits": logits, "labels": labels, "log_prob": -rng.random(8) * 50, "dim": 64}
    part = evaluate_predictions(pred)
    known = labels >= 0
    labelled = evaluate_predictions(
        {**pred, "logits": logits[known], "labels": labels[known], "log_prob": pred["log_prob"]}
    )
    assert part["accuracy"] == labelled["accuracy"] and part["ece"] == labelled["ece"]
    none = evaluate_predictions({**pred, "labels": np.full(8, -1)})
    assert set(none) == {"nll_nats", "bpd"}


def test_partly_labelled_evaluation_against_references() -> None:
    """Oracle: numpy and scikit-learn on the labelled rows alone for the classification metrics
    (argmax hit rate, ``log_loss``, the multi-class Brier sum), and the mean of ``-log_prob``
    over all rows, labelled or not, for the density metrics (nats and bits/dim, D = 64)."""
    rng = np.random.default_rng(1)
    logits = 2.0 * rng.normal(size=(12, 4))
    labels = np.array([0, -1, 3, 1, -1, -1, 2, 0, 3, -1, 1, 2])
    log_prob = -rng.uniform(50, 150, size=12)
    pred = {"logits": logits, "labels": labels, "log_prob": log_prob, "dim": 64}
    out = evaluate_predictions(pred)
    known = labels >= 0
    probs = np.exp(logits[known]) / np.exp(logits[known]).sum(1, keepdims=True)
    y = labels[known]
    assert out["accuracy"] == pytest.approx(np.mean(probs.argmax(1) == y))
    assert out["accuracy"] != pytest.approx(np.mean(logits.argmax(1) == labels))
    assert out["class_nll"] == pytest.approx(log_loss(y, probs, labels=range(4)), rel=1e-10)
    assert out["brier"] == pytest.approx(np.mean(np.sum((probs - np.eye(4)[y]) ** 2, 1)))
    assert out["nll_nats"] == pytest.approx(-log_prob.mean())
    assert out["bpd"] == pytest.approx(-log_prob.mean() / (64 * math.log(2)))
