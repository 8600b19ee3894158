"""Evaluating one cell of a λ study: every run-level evaluation, collected in ``study_eval.json``.

Test metrics with selective classification (:func:`~hybridflow.reports.evaluate_run`),
temperature scaling (:func:`~hybridflow.reports.calibrate_run`), every OOD score against every
OOD set (:func:`~hybridflow.reports.ood_run`) and samples (:func:`~hybridflow.reports.sample_run`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..data import load_dataset
from ..evaluation import evaluate_predictions, predict
from ..reports.diagnostics import calibrate_run, sample_run
from ..reports.ood import ood_run
from ..reports.runs import evaluate_run, run_data_kwargs
from ..runs import MODEL_FILE, load_checkpoint, load_run

__all__ = ["EVAL_FILE", "evaluate_cell"]

#: The file in each cell folder that holds its evaluation (reused when its settings match).
EVAL_FILE = "study_eval.json"
#: Temperatures at which a study cell's Fréchet distance is measured (the best is reported too).
FID_TEMPERATURES = (1.0, 0.85, 0.7)


def _stop_record(run_dir: Path) -> dict[str, Any] | None:
    """Why the run stopped (``model.pt``; ``None`` for models saved before runs recorded it)."""
    return load_checkpoint(run_dir / MODEL_FILE).get("stopped")


def evaluate_cell(
    run_dir: str | Path,
    ood: Sequence[str] = (),
    dequant_samples: int = 1,
    iw_samples: int = 0,
    typicality_batch: int = 10,
    n_samples: int = 64,
    ood_dequant_samples: int = 1,
    fid_samples: int = 0,
) -> dict[str, Any]:
    """Evaluate one finished run with the full suite; write and return ``study_eval.json``.

    Bits/dim on test are the mean of ``dequant_samples`` single-draw bounds, plus the
    importance-weighted bound over ``iw_samples`` draws when positive; the likelihood-based
    OOD scores use the mean of ``ood_dequant_samples`` draws for test and OOD inputs alike. A
    result on disk with the same settings and model is reused. The per-run reliability and OOD
    histogram figures are not drawn (a third of a digits cell's evaluation): the study report
    draws its own, for every cell at once.
    """
    run_dir = Path(run_dir)
    settings = {
        "ood": list(ood),
        "dequant_samples": dequant_samples,
        "iw_samples": iw_samples,
        "typicality_batch": typicality_batch,
        "n_samples": n_samples,
        "ood_dequant_samples": ood_dequant_samples,
        "model_mtime_ns": (run_dir / MODEL_FILE).stat().st_mtime_ns,
    }
    if fid_samples:  # only then: evaluations written without it stay reusable
        settings["fid_samples"] = fid_samples
    path = run_dir / EVAL_FILE
    if path.exists():
        cached = json.loads(path.read_text())
        if cached.get("settings") == settings:
            stopped = cached["stopped"] if "stopped" in cached else _stop_record(run_dir)
            return cached | {"stopped": stopped}
    # Residual flows estimate log-dets with random probes from the global generator: seed it so
    # that a cell evaluates to the same numbers whether it was just trained or reused.
    torch.manual_seed(0)
    model, cfg = load_run(run_dir)
    test = evaluate_run(run_dir, "test", dequant_samples=dequant_samples)
    saved = load_checkpoint(run_dir / MODEL_FILE)
    train_time = float(saved.get("train_time_s", float("nan")))
    result: dict[str, Any] = {"settings": settings, "train_time_s": train_time, "test": test}
    result["stopped"] = saved.get("stopped")
    if iw_samples:
        test_set = load_dataset(cfg["dataset"], "test", **run_data_kwargs(cfg))
        iw = evaluate_predictions(predict(model, test_set, iw_samples=iw_samples))
        result["iw"] = {"samples": iw_samples, "bpd": iw["bpd"], "nll_nats": iw["nll_nats"]}
    if model.num_classes >= 2:
        result["calibration"] = calibrate_run(run_dir, figures=False)
    if ood:
        result["ood"] = ood_run(
            run_dir,
            ood,
            dequant_samples=ood_dequant_samples,
            typicality_batch=typicality_batch,
            figures=False,
        )
    if len(model.flow.input_shape) == 3 and (n_samples or fid_samples):
        temperatures = FID_TEMPERATURES if fid_samples else (1.0, 0.7)
        result["samples"] = sample_run(
            run_dir, temperatures=temperatures, n=max(n_samples, 1), fid_samples=fid_samples
        )
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result
