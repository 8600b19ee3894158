"""The run folder: its files, its name, and reading a model back from it.

One training run lives in ``out_dir/NAME/``:

* ``config.json``: the resolved config (:mod:`hybridflow.runs.config`), written before training;
* ``checkpoint.pt``: the resumable state, replaced atomically every ``checkpoint_every_s``;
* ``model.pt``: the finished run's EMA model with its config and data info (what
  :func:`load_run` and ``hybridflow eval`` read);
* ``metrics.csv``: one row per logged step and per validation.

Every folder name comes from :func:`run_name`: ``[<dataset>-]<backbone>-lam<λ>[-s<seed>]`` and a
``-<key><value>`` part per swept config value (grid cells, pretrained models, single runs).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..models import HybridModel, Lambda, create_hybrid_model
from ..naming import path_slug
from .checkpoint import CheckpointError, load_checkpoint
from .config import resolve_config

__all__ = [
    "CHECKPOINT_FILE",
    "CONFIG_FILE",
    "METRICS_FILE",
    "MODEL_FILE",
    "build_model_for",
    "data_info",
    "finished_config",
    "load_run",
    "run_dir_for",
    "run_name",
]

CONFIG_FILE = "config.json"
CHECKPOINT_FILE = "checkpoint.pt"
MODEL_FILE = "model.pt"
METRICS_FILE = "metrics.csv"


def _part(value: Any) -> str:
    return path_slug(
        json.dumps(value, sort_keys=True) if isinstance(value, dict | list) else str(value)
    )


def run_name(
    backbone: str,
    lam: str | float | Lambda,
    seed: int | None = None,
    point: Mapping[str, Any] = (),
    dataset: str | None = None,
) -> str:
    """The one naming scheme of run folders: ``fashion-mnist-resflow-lam1overD-s0``,
    ``coupling-lam0-s1-lr0.0003`` (a grid cell), ``coupling-lam1overD`` (a pretrained model)."""
    # A dataset name keeps its characters but ":" and "/" (``npz:/data/x.npz``: a path).
    parts = [dataset.replace(":", "_").replace("/", "_"), backbone] if dataset else [backbone]
    parts.append(f"lam{Lambda.parse(lam).slug}")
    if seed is not None:
        parts.append(f"s{seed}")
    parts += [f"{_part(k)}{_part(v)}" for k, v in dict(point).items()]
    return "-".join(parts)


def run_dir_for(config: Mapping[str, Any]) -> Path:
    """``out_dir/name``; the name defaults to :func:`run_name` of the dataset, backbone, λ, seed."""
    name = config.get("name") or run_name(
        config["backbone"], config["lam"], config["seed"], dataset=config["dataset"]
    )
    return Path(config["out_dir"]) / name


def data_info(dataset) -> dict[str, Any]:
    """What a model needs to know of its data: example shape, alphabet size, class count."""
    return {
        "shape": list(dataset.shape),
        "num_levels": dataset.num_levels,
        "num_classes": dataset.num_classes,
    }


def build_model_for(config: Mapping[str, Any], info: Mapping[str, Any]) -> HybridModel:
    """The model a config describes, sized by :func:`data_info`."""
    return create_hybrid_model(
        config, tuple(info["shape"]), info["num_levels"], info["num_classes"]
    )


def finished_config(run_dir: Path) -> dict[str, Any] | None:
    """The config of a finished run folder (``model.pt`` present), else ``None``."""
    if not (run_dir / MODEL_FILE).exists():
        return None
    return resolve_config(base=load_checkpoint(run_dir / MODEL_FILE)["config"])


def load_run(
    run_dir: str | Path, device: str | torch.device = "cpu"
) -> tuple[HybridModel, dict[str, Any]]:
    """Load a finished run's EMA model (``model.pt``) in eval mode, with its config."""
    run_dir = Path(run_dir)
    path = run_dir / MODEL_FILE
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir} is not a folder: give a run folder (runs/NAME)")
    if not path.exists() and not (run_dir / CONFIG_FILE).exists():
        raise CheckpointError(
            f"{run_dir} is not a run folder (no {CONFIG_FILE} or {MODEL_FILE}): give the folder "
            "`hybridflow train` printed, e.g. runs/NAME, or pretrained:NAME"
        )
    if not path.exists():
        raise CheckpointError(
            f"{run_dir} has no {MODEL_FILE}: the run did not finish (resume it with "
            f"`hybridflow train --config {run_dir / CONFIG_FILE}`)"
        )
    state = load_checkpoint(path, map_location=device)
    cfg = resolve_config(base=state["config"])
    if "data" not in state:
        raise CheckpointError(f"{path} lacks the 'data' entry (shape, levels, classes)")
    model = build_model_for(cfg, state["data"]).to(device)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointError(
            f"{path} does not match the model its config describes: {err}"
        ) from err
    return model.eval(), cfg
