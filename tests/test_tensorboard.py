"""TensorBoard mirror of metrics.csv and training sample grids (optional extra ``[tb]``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from test_training_scale import EPOCH_RUN, assert_same_run, metric_rows

from hybridflow.training import train


def test_tensorboard_mirrors_metrics_and_gets_sample_grids(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = {**EPOCH_RUN, "tensorboard": True, "sample_every": 1, "out_dir": str(tmp_path)}
    run_dir = train(cfg, name="tb")
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    rows = metric_rows(run_dir)
    for split, column in [("train", "loss"), ("train", "bpd"), ("val", "bpd"), ("val", "ece")]:
        logged = [(int(r["step"]), float(r[column])) for r in rows if r["split"] == split]
        scalars = [(e.step, e.value) for e in events.Scalars(f"{split}/{column}")]
        assert [s for s, _ in scalars] == [s for s, _ in logged]
        assert [v for _, v in scalars] == pytest.approx([v for _, v in logged], rel=1e-5)
    assert [e.step for e in events.Images("samples")] == [4, 8]
    assert sorted(p.name for p in (run_dir / "train_samples").iterdir()) == [
        "step0000004.png",
        "step0000008.png",
    ]


def test_watching_a_run_does_not_change_it(tmp_path: Path) -> None:
    """Sample grids (PNG, and TensorBoard if installed) after each of 2 epochs of 4 steps leave
    weights and metrics unchanged."""
    plain = train({**EPOCH_RUN, "out_dir": str(tmp_path), "name": "plain"})
    watched = train(
        {**EPOCH_RUN, "out_dir": str(tmp_path), "name": "watched", "sample_every": 1},
        tensorboard=True,
    )
    assert_same_run(plain, watched)
    assert len(list((watched / "train_samples").glob("*.png"))) == 2


def test_missing_tensorboard_warns_and_keeps_training(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    cfg = {**EPOCH_RUN, "epochs": 1, "tensorboard": True, "out_dir": str(tmp_path)}
    with pytest.warns(UserWarning, match=r"pip install 'hybridflow\[tb\]'"):
        run_dir = train(cfg, name="no-tb")
    assert (run_dir / "model.pt").exists() and not (run_dir / "tensorboard").exists()
