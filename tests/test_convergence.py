"""Convergence: the plateau rule, the time budget, their records in runs, sweeps and pretrained
models, and the equal-wall-time comparison."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from hybridflow.experiments import run_sweep
from hybridflow.reports.study import CellResult
from hybridflow.reports.study.convergence import equal_time_table, read_validation_curve
from hybridflow.runs import MODEL_FILE, load_checkpoint
from hybridflow.training import ConfigError, train
from hybridflow.training.stopping import (
    StopRecord,
    convergence_status,
    last_quarter_improvement,
    monitored_metric,
)

COUPLING = {"backbone_args": {"num_scales": 2, "blocks_per_scale": 1, "hidden_channels": 8}}
SHARED = {
    "dataset": "digits",
    "backbone": "coupling",
    "head_args": {"width": 8},
    "batch_size": 128,
    "warmup_steps": 1,
    "log_every": 2,
    "eval_every": 1,
    "eval_batch_size": 512,
    "progress": False,
    **COUPLING,
}
# A plateau made by a learning rate of (practically) zero: nothing changes after the first
# validations, so the rule fires at its first chance (the fourth validation).
PLATEAU = {"lr": 1e-12, "min_lr": 0.0, "stop_rel_improvement": 0.01, "epochs": 20}
BUDGET = {"budget_minutes": 1e-4, "epochs": 20}  # 6 ms: spent by the first logged step


def test_last_quarter_improvement_by_hand() -> None:
    history = [(100, 4.0), (200, 3.0), (300, 2.9), (400, 2.88)]
    # best up to 300 (= 0.75 · 400) is 2.9, best now 2.88
    assert last_quarter_improvement(history, 400) == pytest.approx((2.9 - 2.88) / 2.9)
    assert last_quarter_improvement(history[:3], 300) is None  # fewer than 4 validations
    assert last_quarter_improvement([(300, 1.0)] * 4, 200) is None  # none before 0.75 · step
    worse = [(100, 3.0), (200, 2.0), (300, 2.5), (400, 2.6)]
    assert last_quarter_improvement(worse, 400) == 0.0  # overfitting is no improvement
    with_nan = [(100, 3.0), (200, float("nan")), (300, 3.0), (400, 2.0), (500, 2.0)]
    assert last_quarter_improvement(with_nan, 500) == pytest.approx(1 / 3)
    assert last_quarter_improvement(with_nan[:4], 400) is None  # 3 finite validations
    diverged = [(100, 3.0), (200, 2.0), (300, float("nan")), (400, float("nan"))]
    assert last_quarter_improvement([*history, (500, float("nan"))], 500) is None
    assert last_quarter_improvement(diverged, 400) is None  # not "converged"
    assert convergence_status(0.001, 0.005) == "converged"
    assert convergence_status(0.02, None) == "budget-limited"
    assert convergence_status(None, 0.01) == "unknown"
    assert monitored_metric(0.0) == "class_nll" and monitored_metric(1 / 64) == "bpd"
    with pytest.raises(ValueError, match="unknown stop reason"):
        StopRecord.make("tired", 1, 1.0, "bpd", history, None)


def test_plateau_rule_needs_validations() -> None:
    with pytest.raises(ConfigError, match="eval_every"):
        train({**SHARED, **PLATEAU, "eval_every": 0})
    with pytest.raises(ConfigError, match="budget_minutes"):
        train({**SHARED, "budget_minutes": 0})
    with pytest.raises(ConfigError, match="stop_rel_improvement"):
        train({**SHARED, "stop_rel_improvement": 0})  # the rule could never fire
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        train({**SHARED, "max_epochs": 3})


def test_plateau_stops_a_run_and_resuming_it_trains_no_further(tmp_path: Path, one_thread) -> None:
    run = train({**SHARED, **PLATEAU, "out_dir": str(tmp_path), "name": "flat"})
    saved = load_checkpoint(run / MODEL_FILE)
    stop = saved["stopped"]
    steps_per_epoch = saved["step"] // 4
    assert stop["reason"] == "plateau" and stop["status"] == "converged"
    assert stop["step"] == saved["step"] == 4 * steps_per_epoch  # the 4th validation
    assert stop["improvement"] < 0.01 and stop["metric"] == "bpd"
    before = (run / "metrics.csv").read_text()
    train({**SHARED, **PLATEAU, "out_dir": str(tmp_path), "name": "flat"})  # resume: done
    assert (run / "metrics.csv").read_text() == before
    checkpoint = load_checkpoint(run / "checkpoint.pt")
    assert checkpoint["stopped"] == stop and len(checkpoint["val_history"]) == 4


def test_budget_stops_a_run_and_validates_where_it_stopped(tmp_path: Path, one_thread) -> None:
    run = train({**SHARED, **BUDGET, "lam": 0, "out_dir": str(tmp_path), "name": "budget"})
    stop = load_checkpoint(run / MODEL_FILE)["stopped"]
    assert stop["reason"] == "budget_minutes" and stop["step"] == 2  # the first logged step
    assert stop["status"] == "unknown" and stop["metric"] == "class_nll"
    curve = read_validation_curve(run)
    assert [row["step"] for row in curve] == [2.0]  # the curve ends where training did
    assert stop["elapsed_s"] >= 60 * BUDGET["budget_minutes"]


def test_a_run_killed_after_its_budget_stops_where_it_did(tmp_path: Path, one_thread) -> None:
    from hybridflow.runs import save_checkpoint

    cfg = {**SHARED, **BUDGET, "out_dir": str(tmp_path), "name": "budget"}
    run = train(cfg)
    stop = load_checkpoint(run / MODEL_FILE)["stopped"]
    # A kill after the budget fired, before the stop was saved: the resume point has no record.
    saved = load_checkpoint(run / "checkpoint.pt")
    save_checkpoint({**saved, "stopped": None}, run / "checkpoint.pt")
    (run / MODEL_FILE).unlink()
    train(cfg)
    again = load_checkpoint(run / MODEL_FILE)["stopped"]
    assert again["reason"] == "budget_minutes" and again["step"] == stop["step"] == 2


def test_a_finished_run_trains_on_with_a_longer_schedule(tmp_path: Path, one_thread) -> None:
    run = train({**SHARED, "epochs": 1, "out_dir": str(tmp_path), "name": "short"})
    stop = load_checkpoint(run / MODEL_FILE)["stopped"]
    assert stop["reason"] == "max_epochs" and stop["improvement"] is None
    (run / MODEL_FILE).unlink()  # a longer run in the same folder: the user's --epochs=2
    (run / "config.json").unlink()
    train({**SHARED, "epochs": 2, "out_dir": str(tmp_path), "name": "short"})
    longer = load_checkpoint(run / MODEL_FILE)["stopped"]
    assert longer["reason"] == "max_epochs" and longer["step"] == 2 * stop["step"]


def test_sweep_report_marks_plateau_and_budget_cells(tmp_path: Path) -> None:
    from hybridflow.pretrained import export_pretrained

    out = run_sweep(
        "conv",
        lams=["1/D"],
        backbones=["coupling", "coupling+1x1"],
        config=SHARED,
        backbone_overrides={"coupling": {**COUPLING, **PLATEAU}, "coupling+1x1": BUDGET},
        report_root=tmp_path / "reports",
        runs_root=tmp_path / "runs",
        threads=2,
        n_samples=0,
        typicality_batch=5,
    )
    result = json.loads((out / "results.json").read_text())
    reasons = {c["backbone"]: c["stopped"][0]["reason"] for c in result["cells"]}
    assert reasons == {"coupling": "plateau", "coupling+1x1": "budget_minutes"}
    coupling = next(c for c in result["cells"] if c["backbone"] == "coupling")
    assert coupling["metrics"]["converged"]["values"] == [1.0]
    md = (out / "report.md").read_text()
    assert "## Convergence" in md and "converged" in md and "plateau" in md
    assert "time budget" in md and "At equal training time" in md
    assert (out / "convergence.png").exists()
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {r["backbone"]: r["converged"] for r in rows}["coupling"] == "1"
    entry = export_pretrained(
        tmp_path / "runs" / "conv" / "coupling-lam1overD-s0", "digits/x", tmp_path / "weights"
    )
    assert entry["convergence"]["status"] == "converged"
    assert entry["convergence"]["reason"] == "plateau"


def _write_curve(run_dir: Path, rows: list[tuple[int, float, float, float]]) -> None:
    run_dir.mkdir(parents=True)
    with (run_dir / "metrics.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "split", "bpd", "accuracy", "elapsed_s"])
        writer.writerow([1, "train", 9.0, 0.1, 0.5])  # train rows are not validation points
        for step, elapsed, bpd, acc in rows:
            writer.writerow([step, "val", bpd, acc, elapsed])


def test_equal_time_table_reads_logged_times(tmp_path: Path) -> None:
    fast, fast2, slow = tmp_path / "fast", tmp_path / "fast2", tmp_path / "slow"
    _write_curve(fast, [(100, 10.0, 3.0, 0.80), (200, 20.0, 2.5, 0.85), (300, 30.0, 2.4, 0.86)])
    _write_curve(fast2, [(100, 12.0, 3.2, 0.78), (200, 24.0, 2.7, 0.83), (300, 36.0, 2.6, 0.84)])
    _write_curve(slow, [(100, 25.0, 2.8, 0.82), (200, 50.0, 2.2, 0.90), (300, 75.0, 2.1, 0.91)])
    cells = [
        CellResult("a", "1/D", (), seeds=[0, 1], runs=[{}, {}], run_dirs=[fast, fast2],
                   stops=[None, None]),
        CellResult("b", "1/D", (), seeds=[0], runs=[{}], run_dirs=[slow], stops=[None]),
    ]  # fmt: skip
    table, times = equal_time_table(cells)
    assert times == {"1/D": 33.0}  # the shorter cell's training time: median of 30 and 36 s
    # a: seed 0 at its 30 s row, seed 1 at its 24 s row, averaged; b: its row at 25 s
    assert table.rows[0][2:] == ["33.0", "84.50", "2.550", "300, 200"]
    assert table.rows[1][2:] == ["33.0", "82.00", "2.800", "100"]
    assert equal_time_table(cells[:1]) is None  # one backbone: nothing to compare


def test_table4_claims_say_whether_their_cells_converged() -> None:
    from hybridflow.reports.study.checks import convergence_note

    def cell(backbone, lam, *statuses):
        stops = [{"status": s} if s else None for s in statuses]
        return CellResult(backbone, lam, (), seeds=list(range(len(stops))), runs=[{}], stops=stops)

    done = [cell("coupling", "1", "converged", "converged"), cell("resflow", "1", "converged")]
    assert convergence_note(done) == "all converged"
    short = [*done, cell("resflow", "1/D", "converged", "budget-limited")]
    assert convergence_note(short) == "not converged: residual λ=1/D (1 of 2 seeds)"
    assert convergence_note([cell("coupling", "0", None)]) == "not recorded"


def test_floors_read_the_best_or_every_cell() -> None:
    from hybridflow.reports.study import Floor, floor_check

    def cell(backbone, lam, acc, bpd, status="converged"):
        runs = [{"accuracy": acc, "bpd": bpd}]
        return CellResult(backbone, lam, (), seeds=[0], runs=runs, stops=[{"status": status}])

    def stat(metric):
        return lambda r: r.stat(metric)["mean"] if r.stat(metric) else None

    cells = [
        cell("coupling", "0", 0.93, 9.0),
        cell("resflow", "0", 0.90, 9.0, "budget-limited"),
        cell("coupling", "1", 0.80, 3.3),
        cell("resflow", "1", 0.85, 3.9, "budget-limited"),
    ]
    best = Floor("λ = 0 accuracy", stat("accuracy"), 0.925, cells=lambda r: r.lam == "0")
    claim = best.evaluate(cells)
    assert claim["reproduced"] and claim["detail"] == "coupling λ=0 0.930"
    assert claim["convergence"] == "all converged" and claim["paper"] == "≥ 0.925"
    every = Floor("bpd", stat("bpd"), 3.8, higher=False, cells=lambda r: r.lam == "1", every=True)
    claim = every.evaluate(cells)
    assert not claim["reproduced"] and "resflow λ=1 3.900" in claim["detail"]
    assert claim["convergence"] == "not converged: residual λ=1 (1 of 1 seeds)"
    nothing = Floor("none", stat("accuracy"), 0.5, cells=lambda r: r.lam == "2")
    assert nothing.evaluate(cells) is None
    failed = CellResult("coupling+1x1", "1", (), failed=[(0, "crashed")])
    claim = every.evaluate([*cells[2:3], failed])  # the passing cell and one without a value
    assert not claim["reproduced"] and claim["detail"].endswith("no value: coupling+1x1 λ=1")
    check = floor_check("Floors", "intro", [best, every])
    assert [c["reproduced"] for c in check.evaluate(cells)] == [True, False]
    assert check.verdicts == ("met", "missed")
