"""The λ study: grid runner (workers, resume, failures), the report files, OOD sets made in code,
selective classification, the reproduction checks and pretrained models."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_REALNVP

from hybridflow.data import load_dataset
from hybridflow.evaluation import selective_accuracy
from hybridflow.experiments import SweepFailedError, expand_grid, parse_grid, run_sweep
from hybridflow.experiments.grid import check_reusable, read_status
from hybridflow.reports import reproduction_checks
from hybridflow.reports.study import CellResult
from hybridflow.training import CheckpointError, ConfigError

SHARED = {
    "dataset": "digits",
    "head_args": {"width": 8},
    "batch_size": 32,
    "max_steps": 4,
    "warmup_steps": 1,
    "eval_every": 0,
    "log_every": 2,
}
BACKBONES = {
    "realnvp": {"backbone_args": TINY_REALNVP["backbone_args"]},
    "coupling": {"backbone_args": {"num_scales": 2, "blocks_per_scale": 1, "hidden_channels": 8}},
}
FAST_EVAL = {"n_samples": 4, "typicality_batch": 5}


def _sweep(tmp_path: Path, name: str, **kw):
    kw = {
        "lams": ["0", "1/D"],
        "backbones": list(BACKBONES),
        "config": SHARED,
        "backbone_overrides": BACKBONES,
        "report_root": tmp_path / "reports",
        "runs_root": tmp_path / "runs",
        "ood": ["noise:digits"],
        "threads": 2,
        **FAST_EVAL,
        **kw,
    }
    return run_sweep(name, **kw)


def test_tiny_sweep_with_two_workers_writes_self_contained_report(tmp_path: Path) -> None:
    out = _sweep(tmp_path, "tiny", workers=2)
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["backbone"], r["lam"]) for r in rows] == [
        ("realnvp", "0"),
        ("realnvp", "1/D"),
        ("coupling", "0"),
        ("coupling", "1/D"),
    ]
    for column in (
        "accuracy",
        "bpd",
        "ece_ts",
        "selective/density/acc@90",
        "ood/noise:digits/nll/auroc",
        "ood/mean/energy/fpr95_ood",
    ):
        assert all(np.isfinite(float(r[column])) for r in rows), column
    result = json.loads((out / "results.json").read_text())
    acc = result["cells"][0]["metrics"]["accuracy"]
    assert set(acc) == {"mean", "std", "n", "values", "seeds"} and acc["seeds"] == [0]
    assert result["provenance"]["workers"] == 2

    md = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    figures = re.findall(r"!\[[^]]*\]\(([^)]+)\)", md)
    assert {
        "tradeoff.png",
        "ood_auroc.png",
        "reliability.png",
        "bpd_hist.png",
        "samples.png",
        "curves.png",
    } <= set(figures)
    assert all((out / f).stat().st_size > 1000 for f in figures)
    # Self-contained: every image embedded, nothing fetched from anywhere.
    sources = re.findall(r"<img[^>]*src=\"([^\"]*)\"", page)
    assert len(sources) == len(figures)
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r"<script|<link|@import|https?://|src=\"(?!data:)|url\(", page)
    assert "↑" in md and "**" in md  # directions and best values marked
    assert "Regenerate:" in md and "Commit:" in md and "torch " in md
    # The study draws its figures once, for all cells: no per-run figures in the cells' folders.
    runs = tmp_path / "runs" / "tiny"
    assert list(runs.glob("*/ood/scores_test.npz")) and not list(runs.glob("*/**/*_test.png"))


def test_resume_skips_finished_cells_and_resumes_interrupted_ones(tmp_path: Path) -> None:
    out = _sweep(tmp_path, "resume", lams=["1/D"])
    runs = tmp_path / "runs" / "resume"
    done, partial = runs / "realnvp-lam1overD-s0", runs / "coupling-lam1overD-s0"
    mtime = (done / "model.pt").stat().st_mtime_ns
    (partial / "model.pt").unlink()  # as if killed after its last checkpoint
    (partial / "study_eval.json").unlink()
    _sweep(tmp_path, "resume", lams=["1/D"])
    assert (done / "model.pt").stat().st_mtime_ns == mtime  # not retrained
    assert read_status(done)["reused"] is True
    assert read_status(partial)["reused"] is False and (partial / "model.pt").exists()
    assert (out / "report.md").exists()


@pytest.mark.parametrize("train_first", [False, True])
def test_train_first_trains_every_cell_before_evaluating_any(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, train_first: bool
) -> None:
    # A study spanning sittings evaluates nothing that the next sitting would evaluate again.
    import hybridflow.experiments.grid as grid

    trained_when_evaluated = []

    def evaluate_cell(run_dir, **kw):
        models = sorted((tmp_path / "runs" / "order").glob("*/model.pt"))
        trained_when_evaluated.append(len(models))
        return real_evaluate(run_dir, **kw)

    real_evaluate = grid.evaluate_cell
    monkeypatch.setattr(grid, "evaluate_cell", evaluate_cell)
    out = _sweep(tmp_path, "order", lams=["1/D"], workers=1, train_first=train_first)
    assert trained_when_evaluated == ([2, 2] if train_first else [1, 2])
    assert len(list(csv.DictReader((out / "results.csv").open()))) == 2
    with pytest.raises(ConfigError, match="local launcher"):
        _sweep(tmp_path, "order", lams=["1/D"], launcher="submitit", train_first=True)


def test_cells_trained_but_not_evaluated_say_so(tmp_path: Path, monkeypatch) -> None:
    # A train_first sweep stopped during its evaluations: its cells are "trained", not "done",
    # and the cluster launcher would submit them again (to evaluate them).
    import hybridflow.experiments.grid as grid
    from hybridflow.experiments import sweep_status

    def interrupted(run_dir, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(grid, "evaluate_cell", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _sweep(tmp_path, "cut", lams=["1/D"], workers=1, train_first=True)
    rows = sweep_status(tmp_path / "runs" / "cut")
    assert [(r["cell"], r["status"]) for r in rows] == [
        ("coupling-lam1overD-s0", "trained"),
        ("realnvp-lam1overD-s0", "trained"),
    ]
    monkeypatch.undo()
    _sweep(tmp_path, "cut", lams=["1/D"], workers=1, train_first=True)  # evaluates, trains nothing
    rows = sweep_status(tmp_path / "runs" / "cut")
    assert {r["status"] for r in rows} == {"done"}


def test_a_failing_cell_is_reported_and_the_others_finish(tmp_path: Path, capsys) -> None:
    # A value every config check accepts but the builder refuses: the cell fails in its worker.
    bad = {**BACKBONES, "coupling": {"backbone_args": {"num_scales": 0}}}
    with pytest.raises(SweepFailedError, match="1 of 2 cells failed") as failed:
        _sweep(tmp_path, "fail", lams=["1/D"], backbone_overrides=bad)
    assert failed.value.failed == ["coupling-lam1overD-s0"]
    out = failed.value.out
    assert "FAILED" in capsys.readouterr().out
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["backbone"] for r in rows] == ["realnvp"]
    md = (out / "report.md").read_text()
    assert "## Failures" in md and "must be non-empty" in md
    status = read_status(tmp_path / "runs" / "fail" / "coupling-lam1overD-s0")
    assert status["status"] == "failed" and "Traceback" in status["traceback"]


def test_grid_expansion_names_and_errors(tmp_path: Path) -> None:
    grid = parse_grid(["lr=1e-3,3e-4", "backbone_args.hidden_channels=8,16"])
    cells = expand_grid(SHARED, ["1/D"], ["realnvp"], [0, 1], grid, out_dir=tmp_path)
    assert len(cells) == 8
    assert cells[0].name == "realnvp-lam1overD-s0-lr1e-3-backbone_args.hidden_channels8"
    assert cells[0].config["lr"] == pytest.approx(1e-3)
    assert cells[1].config["backbone_args"]["hidden_channels"] == 16
    assert cells[0].group == cells[4].group != cells[1].group  # seeds share a group
    with pytest.raises(ConfigError, match="unknown config key"):
        expand_grid(SHARED, ["1"], ["realnvp"], grid={"no_such_key": [1]})
    with pytest.raises(ConfigError, match="own options"):
        expand_grid(SHARED, ["1"], ["realnvp"], grid={"lam": [0, 1]})
    with pytest.raises(ConfigError, match="expected --grid"):
        parse_grid(["lr"])
    with pytest.raises(ValueError):
        expand_grid(SHARED, ["half"], ["realnvp"])
    # A folder holding a run of another config is refused, not silently reused.
    cell = cells[0]
    cell.run_dir.mkdir(parents=True)
    (cell.run_dir / "config.json").write_text(json.dumps({**cell.config, "lr": 0.5}))
    with pytest.raises(ConfigError, match="differs in lr"):
        check_reusable(cell)


def test_selective_accuracy_by_hand() -> None:
    correct = np.array([1, 1, 0, 1, 0, 0, 1, 1, 1, 1], bool)
    confidence = np.arange(10, 0, -1.0)  # already sorted, most confident first
    out = selective_accuracy(correct, confidence, coverages=(0.5, 0.8, 1.0))
    assert out["acc@50"] == pytest.approx(3 / 5)
    assert out["acc@80"] == pytest.approx(5 / 8)
    assert out["acc@100"] == pytest.approx(7 / 10)
    risks = [1 - np.cumsum(correct)[k - 1] / k for k in range(1, 11)]
    assert out["aurc"] == pytest.approx(np.mean(risks))
    # Rejecting by a confidence that ranks the errors last gives perfect kept accuracy.
    assert selective_accuracy(correct, correct.astype(float), (0.7,))["acc@70"] == 1.0
    with pytest.raises(ValueError):
        selective_accuracy(correct, confidence, (0.0,))


@pytest.mark.parametrize("kind", ["noise", "constant", "photos", "inverted", "hflip", "vflip"])
def test_ood_sets_made_in_code(kind: str) -> None:
    test = load_dataset("digits", "test")
    a, b = load_dataset(f"{kind}:digits", "all"), load_dataset(f"{kind}:digits", "test")
    assert a.shape == test.shape and a.num_levels == 17 and len(a) == len(test)
    assert torch.equal(a.images, b.images)  # the same set on every call
    assert int(a.images.max()) < 17 and a.num_classes == 0
    if kind == "inverted":
        assert torch.equal(a.images, 16 - test.images)
    if kind == "constant":
        flat = a.images.flatten(1)
        assert torch.equal(flat.min(1).values, flat.max(1).values)
    if kind == "photos":
        assert a.images.float().std() > 1  # textured crops, not blank


def test_ood_set_errors() -> None:
    with pytest.raises(ValueError, match="no 'train' split"):
        load_dataset("noise:digits", "train")
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("noise:nope", "all")


def _cell(backbone: str, accs: dict[str, float], bpds: dict[str, float]) -> CellResult:
    return [
        CellResult(backbone, lam, (), [0], [{"accuracy": accs[lam], "bpd": bpds[lam]}])
        for lam in ("0", "1/D", "1")
    ]


def test_reproduction_checks_follow_the_numbers() -> None:
    good = (
        _cell("coupling", {"0": 0.99, "1/D": 0.97, "1": 0.90}, {"0": 9, "1/D": 2.1, "1": 2.0})
        + _cell("coupling+1x1", {"0": 0.99, "1/D": 0.97, "1": 0.91}, {"0": 9, "1/D": 2.1, "1": 2.0})
        + _cell(
            "resflow-digits", {"0": 0.99, "1/D": 0.98, "1": 0.97}, {"0": 9, "1/D": 2.0, "1": 1.9}
        )
    )
    checks = reproduction_checks(good)
    assert [c["reproduced"] for c in checks] == [True, True, True]
    assert "resflow" not in checks[0]["detail"] and "residual" in checks[0]["detail"]
    bad = (
        _cell("coupling", {"0": 0.99, "1/D": 0.99, "1": 0.99}, {"0": 9, "1/D": 1.0, "1": 1.0})
        + _cell("coupling+1x1", {"0": 0.99, "1/D": 0.97, "1": 0.91}, {"0": 9, "1/D": 2.1, "1": 2.0})
        + _cell("resflow", {"0": 0.99, "1/D": 0.98, "1": 0.97}, {"0": 9, "1/D": 2.0, "1": 1.9})
    )
    assert [c["reproduced"] for c in reproduction_checks(bad)] == [False, False, False]
    assert reproduction_checks(good[:6]) is None  # no residual backbone: no statement


def test_pretrained_export_load_and_checksum(tmp_path: Path, one_thread) -> None:
    from hybridflow.evaluation import predict
    from hybridflow.pretrained import export_pretrained, load_pretrained, pretrained_run_dir
    from hybridflow.training import load_run, train

    run = train(
        {**SHARED, **BACKBONES["realnvp"], "out_dir": str(tmp_path), "name": "r", "progress": False}
    )
    weights = tmp_path / "weights"
    entry = export_pretrained(run, "digits/realnvp-lam1overD", weights, metrics={"bpd": 3.0})
    assert entry["bytes"] < 5e6 and len(entry["sha256"]) == 64
    model = load_pretrained("digits/realnvp-lam1overD", weights_dir=weights)
    reference, _ = load_run(run)
    test = load_dataset("digits", "test")
    torch.manual_seed(0)
    a = predict(model, test)
    b = predict(reference, test)
    np.testing.assert_allclose(a["logits"], b["logits"], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="did you mean 'digits/realnvp-lam1overD'"):
        load_pretrained("digits/realnvp-lam1overd", weights_dir=weights)
    # λ written as configs write it names the same model.
    assert load_pretrained("digits/realnvp-lam1/D", weights_dir=weights).num_classes == 10
    path = weights / entry["file"]
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_pretrained("digits/realnvp-lam1overD", weights_dir=weights)
    with pytest.raises(CheckpointError, match="SHA-256"):
        pretrained_run_dir("digits/realnvp-lam1overD", weights_dir=weights)


SHIPPED = sorted(__import__("hybridflow.pretrained").pretrained.list_pretrained())


def _check_shipped_model(name: str) -> None:
    from hybridflow.evaluation import evaluate_predictions, predict
    from hybridflow.pretrained import WEIGHTS_DIR, list_pretrained, load_pretrained

    torch.set_default_dtype(torch.float32)  # as trained and evaluated (noise draws are dtype's)
    entry = list_pretrained()[name]
    assert (WEIGHTS_DIR / entry["file"]).stat().st_size <= 5_000_000
    model = load_pretrained(name)
    draws = entry["metrics"]["dequant_samples"]
    test = load_dataset(entry["dataset"], "test")
    metrics = evaluate_predictions(predict(model, test, dequant_samples=draws, seed=0))
    assert metrics["accuracy"] == pytest.approx(entry["metrics"]["accuracy"], abs=1e-9)
    # Coupling flows reproduce it exactly; residual flows' log-det estimates draw fresh probes.
    exact = not entry["backbone"].startswith("resflow")
    assert metrics["bpd"] == pytest.approx(entry["metrics"]["bpd"], rel=1e-6 if exact else 3e-3)


@pytest.mark.parametrize("name", [n for n in SHIPPED if n.startswith("digits/")])
def test_shipped_digits_models_load_and_match_their_metrics(name: str, one_thread) -> None:
    _check_shipped_model(name)


# One model per block family (λ = 1/D) runs in CI, where .ci/run installs Fashion-MNIST (~1 min
# on 2 cores); the other λ are marked slow.
@pytest.mark.parametrize(
    "name",
    [
        n if n.endswith("-lam1overD") else pytest.param(n, marks=pytest.mark.slow)
        for n in SHIPPED
        if not n.startswith("digits/")
    ],
)
def test_shipped_models_of_other_datasets_match_their_metrics(name: str, one_thread) -> None:
    from hybridflow.data.images import DatasetNotFoundError

    try:
        load_dataset(name.split("/")[0], "test")
    except DatasetNotFoundError as exc:
        pytest.skip(str(exc).splitlines()[0])
    _check_shipped_model(name)


def test_every_shipped_model_loads_with_its_checksum() -> None:
    from hybridflow.pretrained import list_pretrained, load_pretrained

    for name in list_pretrained():
        model = load_pretrained(name)
        assert (
            sum(p.numel() for p in model.parameters()) == list_pretrained()[name]["num_parameters"]
        )


def test_shipped_weights_stay_small() -> None:
    from hybridflow.pretrained import WEIGHTS_DIR

    sizes = [p.stat().st_size for p in WEIGHTS_DIR.glob("*.pt")]
    assert sum(sizes) <= 30_000_000


def test_cli_lists_and_uses_pretrained_models(capsys, tmp_path, monkeypatch) -> None:
    from hybridflow.cli import main

    assert main(["pretrained"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in SHIPPED)
    assert main(["eval", "pretrained:digits/no-such-model"]) == 1
    assert "unknown pretrained model" in capsys.readouterr().err
    if "digits/coupling-lam1overD" in SHIPPED:
        monkeypatch.setenv("HYBRIDFLOW_CACHE", str(tmp_path))
        assert main(["eval", "pretrained:digits/coupling-lam1overD", "--ood", "noise:digits"]) == 0
        assert (
            tmp_path / "pretrained" / "digits" / "coupling-lam1overD" / "eval_test.json"
        ).exists()


def test_tradeoff_axis_is_log_only_when_bits_per_dim_span_more_than_a_few_times() -> None:
    from hybridflow.reports.study.figures import bits_per_dim_axis_is_log

    assert not bits_per_dim_axis_is_log([2.025, 2.031, 1.98])  # one λ: log ticks were unreadable
    assert bits_per_dim_axis_is_log([1.9, 2.1, 14.2])  # a λ = 0 cell far above the others
    assert not bits_per_dim_axis_is_log([])
