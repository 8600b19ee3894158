"""``hybridflow calibrate | sample | explain`` on a finished run: files, numbers, bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_RUN_ARGS

from hybridflow.cli import main
from hybridflow.evaluation import calibration_metrics, fit_temperature, predict
from hybridflow.reports import calibrate_run
from hybridflow.training import load_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    previous = torch.get_num_threads()
    out = tmp_path_factory.mktemp("runs")
    assert main(["train", *TINY_RUN_ARGS, "--max_steps=40", f"--out_dir={out}", "--name=m"]) == 0
    torch.set_num_threads(previous)
    return out / "m"


pytestmark = pytest.mark.usefixtures("one_thread")


def test_calibrate_fits_on_val_and_reports_before_and_after(run_dir: Path, capsys) -> None:
    assert main(["calibrate", str(run_dir)]) == 0
    result = json.loads((run_dir / "calibration/calibration_test.json").read_text())
    keys = {"accuracy", "ece", "adaptive_ece", "mce", "classwise_ece", "brier", "nll"}
    assert keys <= result["before"].keys() and keys <= result["after"].keys()
    assert result["temperature"] > 0 and result["n_bins"] == 15
    # Fitted by NLL on val: the val NLL cannot get worse, and argmax (accuracy) cannot change.
    assert result["val_nll_after"] <= result["val_nll_before"] + 1e-9
    assert result["after"]["accuracy"] == result["before"]["accuracy"]
    # The numbers are those of the run's test predictions at the reported temperature.
    model, cfg = load_run(run_dir)
    from hybridflow.data import load_dataset

    test = predict(model, load_dataset("digits", "test", seed=cfg["seed"]))
    expected = calibration_metrics(test["logits"], test["labels"], 15, result["temperature"])
    assert result["after"] == pytest.approx(expected)
    # ... and the temperature is the one fitted on the validation split.
    val = predict(model, load_dataset("digits", "val", seed=cfg["seed"]))
    assert result["temperature"] == pytest.approx(fit_temperature(val["logits"], val["labels"]))
    with pytest.raises(ValueError, match="test split only"):
        calibrate_run(run_dir, split="val")
    rows = list(csv.DictReader((run_dir / "calibration/calibration_test.csv").open()))
    assert [r["scaling"] for r in rows] == ["none", "temperature"]
    assert (run_dir / "calibration/reliability_test.png").read_bytes()[:4] == b"\x89PNG"


def test_sample_writes_grids_and_reconstructs_exactly(run_dir: Path, capsys) -> None:
    assert main(["sample", str(run_dir), "--temperatures=0.5,1", "-n", "9"]) == 0
    result = json.loads((run_dir / "samples/samples.json").read_text())
    assert set(result["temperatures"]) == {"0.5", "1"}
    for t in ("0.5", "1"):
        assert (run_dir / f"samples/samples_T{t}.png").read_bytes()[:4] == b"\x89PNG"
    assert result["reconstruction"]["level_error_rate"] == 0.0
    assert result["reconstruction"]["max_abs_error"] < 1e-3
    capsys.readouterr()
    assert main(["sample", str(run_dir), "--temperatures=0"]) == 1
    assert capsys.readouterr().err == "error: temperatures must be positive, got 0.0\n"


def test_explain_writes_overlays_with_complete_integrated_gradients(
    run_dir: Path, tmp_path: Path, capsys
) -> None:
    noise = tmp_path / "noise.npz"
    rng = np.random.default_rng(0)
    np.savez(noise, x=rng.integers(0, 17, (20, 8, 8), dtype=np.uint8), num_levels=np.int64(17))
    args = ["explain", str(run_dir), "--ood", f"npz:{noise}", "-n", "2", "--steps", "32"]
    assert main(args) == 0
    result = json.loads((run_dir / "explain/explain.json").read_text())
    assert len(result["panels"]) == 2 * 3 * 3  # sets × targets × methods
    for panel in result["panels"]:
        assert (run_dir / "explain" / panel["file"]).read_bytes()[:4] == b"\x89PNG"
        if panel["method"] == "integrated_gradients":
            # Completeness (Sundararajan et al. 2017): Σ attributions = f(x) - f(baseline).
            gap = np.subtract(panel["value_at_input"], panel["value_at_baseline"])
            tol = 0.05 * np.abs(gap) + 0.01
            assert np.all(np.abs(np.asarray(panel["attribution_sum"]) - gap) <= tol), panel
    assert {p["set"] for p in result["panels"]} == {"test", f"npz:{noise}"}
    capsys.readouterr()
    assert main(["explain", str(run_dir), "--targets=nope"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: target must be a callable or one of ('logit', 'log_prob',")
    assert err.endswith("got 'nope'\n") and err.count("\n") == 1
