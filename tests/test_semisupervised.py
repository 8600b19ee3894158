"""Semi-supervised hybrids: K labels per class (or a stratified fraction) kept, the rest −1."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from conftest import TINY_REALNVP
from torch.nn import functional as F

from hybridflow.data import load_dataset
from hybridflow.models import HybridModel
from hybridflow.training import resolve_config, train
from hybridflow.training.semisupervised import keep_labels
from hybridflow.training.trainer import setup

TINY = {
    **TINY_REALNVP,
    "dataset": "digits",
    "batch_size": 64,
    "max_steps": 6,
    "warmup_steps": 1,
    "log_every": 3,
    "eval_every": 0,
    "progress": False,
    "num_threads": 1,
}


@pytest.fixture(scope="module")
def labels() -> torch.Tensor:
    return load_dataset("digits", "train").labels


def _counts(labels: torch.Tensor) -> list[int]:
    return torch.bincount(labels[labels >= 0], minlength=10).tolist()


def test_exactly_k_labels_per_class_are_kept(labels: torch.Tensor) -> None:
    kept = keep_labels(labels, per_class=5, seed=0)
    assert _counts(kept) == [5] * 10 and int((kept == -1).sum()) == len(labels) - 50
    assert torch.all((kept == -1) | (kept == labels))  # kept labels are the true ones
    # A class with fewer than K examples keeps them all.
    assert _counts(keep_labels(labels, per_class=10_000, seed=0)) == _counts(labels)


def test_a_fraction_is_stratified(labels: torch.Tensor) -> None:
    kept = keep_labels(labels, fraction=0.1, seed=0)
    expected = [int(n * 0.1 + 0.5) for n in _counts(labels)]
    assert _counts(kept) == expected


def test_the_draw_is_seeded(labels: torch.Tensor) -> None:
    a, b = keep_labels(labels, per_class=5, seed=0), keep_labels(labels, per_class=5, seed=0)
    assert torch.equal(a, b)
    assert not torch.equal(a, keep_labels(labels, per_class=5, seed=1))
    rng = torch.get_rng_state()
    keep_labels(labels, fraction=0.5, seed=3)
    assert torch.equal(rng, torch.get_rng_state())  # the global stream is not touched


def test_unlabelled_examples_stay_unlabelled() -> None:
    labels = torch.tensor([0, 0, -1, 1, 1, -1, 0])
    kept = keep_labels(labels, per_class=2, seed=0)
    assert torch.all(kept[labels == -1] == -1) and _counts(kept)[:2] == [2, 2]


def test_both_keys_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mutually exclusive"):
        train(TINY, labelled_per_class=5, labelled_fraction=0.1, out_dir=str(tmp_path), name="x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="labelled_fraction must lie in"):
        keep_labels(torch.zeros(3, dtype=torch.int64), fraction=1.5)


def test_semi_supervised_training_runs(tmp_path: Path, one_thread) -> None:
    cfg = {**TINY, "labelled_per_class": 5, "out_dir": str(tmp_path), "name": "semi"}
    state = setup(resolve_config(cfg))
    assert _counts(state.data.labels) == [5] * 10 and state.data.labelled == "some"
    assert bool((state.data.val_set.labels >= 0).all())  # validation stays fully labelled
    cfg |= {"eval_every": 1, "max_steps": None, "epochs": 1, "batch_size": 256, "name": "run"}
    run_dir = train(cfg)
    with (run_dir / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    train_rows = [r for r in rows if r["split"] == "train"]
    val_rows = [r for r in rows if r["split"] == "val"]
    assert train_rows and all(r["ce"] and r["accuracy"] for r in train_rows)
    assert len(val_rows) == 1 and val_rows[0]["accuracy"]


def test_train_rows_score_the_labelled_examples_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread
) -> None:
    """Oracle: every step's logits and labels, recorded as ``HybridModel.loss`` returns them. With
    one row per step, accuracy is the argmax hit rate among the batch's labelled examples (an
    empty cell when it has none, not 0) and ``ce`` is ``F.cross_entropy`` summed over them and
    divided by the batch size (unlabelled examples add 0 to the mean loss); the loss row keeps
    ``loss = ce + nll_nats / D``."""
    steps: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = HybridModel.loss

    def recording(self, x, y, lam):
        terms = original(self, x, y, lam)
        steps.append((terms["logits"].detach().clone(), y.clone()))
        return terms

    monkeypatch.setattr(HybridModel, "loss", recording)
    cfg = {**TINY, "labelled_per_class": 3, "max_steps": 12, "log_every": 1}
    run_dir = train({**cfg, "out_dir": str(tmp_path), "name": "semi"})
    with (run_dir / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "train"]
    assert len(rows) == len(steps) == 12
    counts = []
    for row, (logits, y) in zip(rows, steps, strict=True):
        labelled = y >= 0
        counts.append(int(labelled.sum()))
        assert counts[-1] < len(y)  # 30 of 1257 labels kept: every batch is mostly unlabelled
        if labelled.any():
            hits = (logits[labelled].argmax(1) == y[labelled]).double().mean().item()
            assert float(row["accuracy"]) == pytest.approx(hits, rel=1e-5, abs=1e-6), row
            ce = F.cross_entropy(logits[labelled], y[labelled], reduction="sum").item() / len(y)
        else:
            assert row["accuracy"] == "", row
            ce = 0.0
        assert float(row["ce"]) == pytest.approx(ce, rel=1e-5, abs=1e-6), row
        nll = float(row["nll_nats"])
        assert float(row["loss"]) == pytest.approx(float(row["ce"]) + nll / 64, rel=1e-5), row
    assert 0 in counts and max(counts) >= 2  # both kinds of batch were met
    # Some labelled example was classified right: a rate over the whole batch would differ there.
    assert any(float(r["accuracy"]) > 0 for r in rows if r["accuracy"])


def test_dropping_unlabelled_examples_gives_the_supervised_baseline(tmp_path: Path) -> None:
    """unlabelled=drop trains on exactly the labelled examples a semi-supervised run keeps."""
    cfg = {**TINY, "labelled_per_class": 7, "out_dir": str(tmp_path), "batch_size": 32}
    semi = setup(resolve_config({**cfg, "name": "semi"}))
    alone = setup(resolve_config({**cfg, "name": "alone", "unlabelled": "drop"}))
    assert alone.data.labelled == "all" and alone.data.size == 70
    kept = semi.data.labels >= 0
    assert torch.equal(alone.data.labels, semi.data.labels[kept])
    assert torch.equal(alone.data.images, semi.data.images[kept])
    run_dir = train({**cfg, "name": "alone-run", "unlabelled": "drop", "max_steps": 4})
    assert (run_dir / "model.pt").exists()  # batches index the 70 kept examples only
    with pytest.raises(ValueError, match="unlabelled must be one of keep, drop"):
        train(TINY, unlabelled="ignore", out_dir=str(tmp_path), name="bad")
