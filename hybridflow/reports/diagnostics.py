"""Per-run diagnostics written beside the run: calibration, samples and attributions.

Each function reads a finished run folder (``model.pt``), writes JSON plus PNGs into a
subfolder of it (``calibration/``, ``samples/``, ``explain/``) and returns the JSON dict.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import dataset_tensors, load_dataset
from ..evaluation import negative_log_likelihood, predict
from ..evaluation.calibration import (
    apply_temperature,
    calibration_metrics,
    fit_temperature,
    plot_reliability_diagram,
)
from ..evaluation.samples import (
    DEFAULT_TEMPERATURES,
    reconstruct,
    sample_at_temperatures,
    save_image_grid,
)
from ..runs import load_run
from .runs import check_compatible, run_data_kwargs, write_csv

__all__ = ["calibrate_run", "explain_run", "sample_run"]


def _slug(dataset_spec: str) -> str:
    """A file-name-safe name for a dataset spec (``npz:/a/b.npz@val`` -> ``npz_b_val``)."""
    name, _, split = dataset_spec.partition("@")
    if name.startswith("npz:"):
        name = "npz_" + Path(name[4:]).stem
    return "_".join(filter(None, [name.replace(":", "_"), split]))


def calibrate_run(
    run_dir: str | Path,
    split: str = "test",
    n_bins: int = 15,
    data_root: str | None = None,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
    figures: bool = True,
) -> dict[str, Any]:
    """Fit temperature scaling on the validation split; calibration metrics before and after.

    Guo et al. 2017, "On Calibration of Modern Neural Networks": one temperature ``T`` fitted by
    NLL on held-out data, applied to ``split``. Writes ``calibration/calibration_<split>.json``,
    ``.csv`` (one row per before/after) and, with ``figures``, ``reliability_<split>.png`` (a
    study leaves it out: it draws its own diagrams for all cells at once).
    """
    if split != "test":
        # The temperature is fitted on val; reporting on val (or on data containing it) would
        # score the fit on its own data.
        raise ValueError(f"calibration is reported on the test split only, got split={split!r}")
    run_dir = Path(run_dir)
    model, cfg = load_run(run_dir, device=device)
    if model.num_classes < 2:
        raise ValueError("calibration needs a classifier head with at least 2 classes")
    data_kw = run_data_kwargs(cfg, data_root)
    val_set = load_dataset(cfg["dataset"], "val", **data_kw)
    if len(val_set) == 0:
        raise ValueError(
            f"temperature scaling is fitted on the validation split, and {cfg['dataset']} has "
            f"none (val_fraction={cfg['val_fraction']})"
        )
    val = predict(model, val_set, batch_size, device=device)
    test = predict(model, load_dataset(cfg["dataset"], split, **data_kw), batch_size, device=device)
    temperature = fit_temperature(val["logits"], val["labels"])
    before = calibration_metrics(test["logits"], test["labels"], n_bins=n_bins)
    after = calibration_metrics(test["logits"], test["labels"], n_bins, temperature)
    out_dir = run_dir / "calibration"
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {
        "run": run_dir.name,
        "dataset": cfg["dataset"],
        "split": split,
        "fitted_on": "val",
        "n_bins": n_bins,
        "temperature": temperature,
        "val_nll_before": negative_log_likelihood(val["logits"], val["labels"], from_logits=True),
        "val_nll_after": negative_log_likelihood(
            apply_temperature(val["logits"], temperature), val["labels"], from_logits=True
        ),
        "before": before,
        "after": after,
    }
    (out_dir / f"calibration_{split}.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = [
        {"scaling": "none", "temperature": 1.0, **before},
        {"scaling": "temperature", "temperature": temperature, **after},
    ]
    write_csv(rows, out_dir / f"calibration_{split}.csv")
    if not figures:
        return result
    plot_reliability_diagram(
        {
            "before": (test["logits"], test["labels"]),
            f"after temperature scaling (T = {temperature:.3f})": (
                apply_temperature(test["logits"], temperature),
                test["labels"],
            ),
        },
        out_dir / f"reliability_{split}.png",
        n_bins=n_bins,
        title=f"{cfg['dataset']} {split}, λ = {cfg['lam']}",
    )
    return result


def sample_run(
    run_dir: str | Path,
    temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
    n: int = 64,
    n_reconstruct: int = 32,
    seed: int = 0,
    data_root: str | None = None,
    device: str | torch.device = "cpu",
    fid_samples: int = 0,
    fid_features: str = "classifier",
    fid_weights: str | None = None,
) -> dict[str, Any]:
    """Sample grids at several temperatures and test-image reconstructions.

    Writes ``samples/samples_T<T>.png`` per temperature, ``samples/reconstructions.png`` (input
    rows above their reconstructions) and ``samples/samples.json`` (the bits/dim the model gives
    its own samples at each temperature, and reconstruction errors). With ``fid_samples > 0``
    also the Fréchet distance of that many samples per temperature to the test split
    (:mod:`hybridflow.evaluation.fid`; ``fid_features`` ``"classifier"`` or ``"inception"`` with
    ``fid_weights``), labelled by its feature network, and the best temperature.
    """
    run_dir = Path(run_dir)
    model, cfg = load_run(run_dir, device=device)
    flow = model.flow
    if len(flow.input_shape) != 3:
        raise ValueError(f"sample grids need image data, the model reads {flow.input_shape}")
    out_dir = run_dir / "samples"
    levels = flow.num_levels
    result: dict[str, Any] = {"run": run_dir.name, "temperatures": {}, "seed": seed}
    for t, x in sample_at_temperatures(flow, temperatures, n, seed).items():
        path = save_image_grid(x, out_dir / f"samples_T{t:g}.png", levels)
        with torch.no_grad():
            bpd = flow.bits_per_dim(x.to(next(flow.parameters())), 0.5)
        result["temperatures"][f"{t:g}"] = {
            "file": path.name,
            "bpd_at_bin_centres": float(bpd.mean()),
        }
    images = dataset_tensors(
        load_dataset(cfg["dataset"], "test", **run_data_kwargs(cfg, data_root))
    )[0]
    rows = max(1, min(8, n_reconstruct))
    # Whole rows of `rows` inputs, each above its reconstructions.
    x = images[: max(rows, n_reconstruct // rows * rows)].to(torch.float64)
    x_rec, stats = reconstruct(flow, x)
    chunks = zip(x.split(rows), x_rec.split(rows), strict=True)
    pairs = torch.cat([torch.stack([a, b]) for a, b in chunks])
    save_image_grid(pairs.flatten(0, 1), out_dir / "reconstructions.png", levels, nrow=rows)
    result["reconstruction"] = {"n": len(x), **stats}
    if fid_samples:
        result["fid"] = _fid_by_temperature(
            flow, images, temperatures, fid_samples, seed, cfg["dataset"], fid_features, fid_weights
        )
    (out_dir / "samples.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _fid_by_temperature(
    flow: Any,
    real: torch.Tensor,
    temperatures: Sequence[float],
    n: int,
    seed: int,
    dataset: str,
    kind: str,
    weights: str | None,
) -> dict[str, Any]:
    """Fréchet distance of ``n`` samples per temperature to ``real`` (the test split)."""
    from ..evaluation.fid import fid_feature_network, frechet_distance

    features, label = fid_feature_network(kind, dataset, flow.num_levels, weights)
    by_t = {}
    for t in temperatures:
        draws = [
            flow.sample(min(500, n - i), t, torch.Generator().manual_seed(seed * 7919 + i))
            for i in range(0, n, 500)
        ]
        fake = torch.cat(draws).clamp(0, flow.num_levels - 1).round().cpu()
        by_t[f"{t:g}"] = frechet_distance(real, fake, features)
    best = min(by_t, key=by_t.get)
    return {
        "label": label,
        "features": kind,
        "samples": n,
        "real": len(real),
        "by_temperature": by_t,
        "best_temperature": float(best),
        "best": by_t[best],
    }


def _explained(
    model, target: str, x_cont: torch.Tensor, classes: torch.Tensor, seed: int
) -> np.ndarray:
    """The value an attribution explains, with the same deterministic log-dets as the
    attributions (so that completeness can be checked)."""
    from ..evaluation import attribution  # start-up time: captum is a heavy import

    with torch.no_grad(), attribution.deterministic_logdets(model, seed=seed):
        if target == "log_prob":
            return attribution.continuous_log_prob(model, x_cont).double().cpu().numpy()
        logits = attribution.continuous_logits(model, x_cont)
        if target == "energy":
            return (-torch.logsumexp(logits, 1)).double().cpu().numpy()
        return logits.gather(1, classes[:, None])[:, 0].double().cpu().numpy()


def explain_run(
    run_dir: str | Path,
    ood: Sequence[str] = (),
    n: int = 6,
    targets: Sequence[str] = ("logit", "log_prob", "energy"),
    methods: Sequence[str] = ("integrated_gradients", "saliency", "noise_tunnel"),
    baseline: str = "blur",
    n_steps: int = 32,
    seed: int = 0,
    data_root: str | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Attributions (captum) for in-distribution test images and each OOD set.

    Writes ``explain/<set>_<target>_<method>.png`` overlays and ``explain/explain.json`` with,
    per panel, the explained value at the input and at the baseline and the sum of the
    attributions (for integrated gradients the two differences agree: completeness).
    """
    from ..evaluation import attribution  # start-up time: captum is a heavy import

    run_dir = Path(run_dir)
    model, cfg = load_run(run_dir, device=device)
    if model.flow.num_levels is None or len(model.flow.input_shape) != 3:
        raise ValueError(
            f"attribution overlays need image data with levels; the model reads "
            f"{model.flow.input_shape} with num_levels={model.flow.num_levels}"
        )
    if model.num_classes == 0 and set(targets) & {"logit", "energy"}:
        raise ValueError("the logit and energy targets need a classifier with classes")
    if baseline not in ("blur", "mean"):
        raise ValueError(f"baseline must be 'blur' or 'mean', got {baseline!r}")
    data_kw = run_data_kwargs(cfg, data_root)
    in_set = load_dataset(cfg["dataset"], "test", **data_kw)
    sets = {"test": in_set}
    for spec in ood:
        name, _, ood_split = spec.partition("@")
        sets[spec] = load_dataset(name, ood_split or "all", **data_kw)
        check_compatible(name, sets[spec], in_set)
    data_mean = None
    if baseline == "mean":  # bin centres of the training mean image
        train_images = dataset_tensors(load_dataset(cfg["dataset"], "train", **data_kw))[0]
        data_mean = train_images.double().mean(0) + 0.5
    dtype = next(model.parameters()).dtype
    gen = torch.Generator().manual_seed(seed)
    out_dir = run_dir / "explain"
    result: dict[str, Any] = {"run": run_dir.name, "baseline": baseline, "panels": []}
    for set_name, dataset in sets.items():
        images = dataset_tensors(dataset)[0]
        x = images[torch.randperm(len(images), generator=gen)[:n]].to(device=device, dtype=dtype)
        x_cont = x + 0.5
        if data_mean is None:
            base = attribution.blurred_baseline(x_cont)
        else:
            base = attribution.mean_baseline(x_cont, data_mean.to(x_cont))
        with torch.no_grad(), attribution.deterministic_logdets(model, seed=seed):
            predicted = attribution.continuous_logits(model, x_cont).argmax(1)  # class explained
        for target in targets:
            f_x = _explained(model, target, x_cont, predicted, seed).tolist()
            f_b = _explained(model, target, base, predicted, seed).tolist()
            for method in methods:
                # The baseline tensor itself, so f(baseline) above is exactly what IG integrates.
                attr = attribution.attribute(
                    model,
                    x,
                    target=target,
                    method=method,
                    baseline=base,
                    class_index=predicted,
                    n_steps=n_steps,
                    seed=seed,
                )
                path = out_dir / f"{_slug(set_name)}_{target}_{method}.png"
                attribution.save_attribution_overlays(
                    x.cpu(), attr, path, num_levels=model.flow.num_levels
                )
                result["panels"].append(
                    {
                        "set": set_name,
                        "target": target,
                        "class_index": predicted.tolist() if target == "logit" else None,
                        "method": method,
                        "file": path.name,
                        "value_at_input": f_x,
                        "value_at_baseline": f_b,
                        "attribution_sum": attr.flatten(1).sum(1).double().tolist(),
                    }
                )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "explain.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
