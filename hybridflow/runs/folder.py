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

import copy
import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..models import HybridModel, Lambda, backbone_keywords, create_hybrid_model
from ..naming import path_slug
from .checkpoint import CheckpointError, load_checkpoint
from .config import resolve_config

__all__ = [
    "CHECKPOINT_FILE",
    "CONFIG_FILE",
    "LEGACY_BUILD_DEFAULTS",
    "METRICS_FILE",
    "MODEL_FILE",
    "build_model_for",
    "data_info",
    "finished_config",
    "legacy_config",
    "legacy_flags",
    "load_run",
    "restore_model",
    "run_dir_for",
    "run_name",
]

CONFIG_FILE = "config.json"
CHECKPOINT_FILE = "checkpoint.pt"
MODEL_FILE = "model.pt"
METRICS_FILE = "metrics.csv"

#: Builder keywords whose default changed (or will: issue 25 switches checkerboards to the
#: gathered layout), with the value a model saved before the change was built with. A saved
#: model that does not fit the model its config describes is rebuilt with these where the
#: config leaves them unset (:func:`restore_model`): the layouts' weights have different
#: shapes, so a wrong guess cannot load.
LEGACY_BUILD_DEFAULTS: dict[str, Any] = {"checkerboard_layout": "masked"}


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


def legacy_config(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """``config`` with :data:`LEGACY_BUILD_DEFAULTS` filled in where its builders take them and
    it leaves them unset, or ``None`` when there is nothing to fill."""
    legacy = copy.deepcopy(dict(config))
    changed = False
    accepted = backbone_keywords(config["backbone"]) or frozenset()
    args = {"backbone_args": accepted}
    if config.get("dequantization") == "variational":
        args["dequantization_args"] = frozenset(LEGACY_BUILD_DEFAULTS)  # its couplings take all
    for key, keywords in args.items():
        for name, value in LEGACY_BUILD_DEFAULTS.items():
            if name in keywords and name not in legacy[key]:
                legacy[key] = {**legacy[key], name: value}
                changed = True
    return legacy if changed else None


def legacy_flags(config: Mapping[str, Any], legacy: Mapping[str, Any]) -> str:
    """The command-line flags that turn ``config`` into ``legacy`` (:func:`legacy_config`)."""
    return " ".join(
        f"--{key}.{name}={value}"
        for key in ("backbone_args", "dequantization_args")
        for name, value in legacy[key].items()
        if name not in config[key]
    )


def restore_model(
    config: Mapping[str, Any], info: Mapping[str, Any], weights: Mapping[str, Any], source: Path
) -> tuple[HybridModel, dict[str, Any]]:
    """The model ``config`` describes with ``weights`` loaded, and the config it was built with.

    A model saved before a default of :data:`LEGACY_BUILD_DEFAULTS` changed is rebuilt with the
    old value (with a warning naming the keyword to set); anything else that does not fit
    raises :class:`CheckpointError`.
    """
    model = build_model_for(config, info)
    try:
        model.load_state_dict(weights)
        return model, dict(config)
    except RuntimeError as err:
        mismatch = err
    legacy = legacy_config(config)
    if legacy is not None:
        model = build_model_for(legacy, info)
        try:
            model.load_state_dict(weights)
        except RuntimeError:
            pass
        else:
            warnings.warn(
                f"{source} was saved before a default layout changed; rebuilt with "
                f"{legacy_flags(config, legacy)} (set it in the config to silence this)",
                UserWarning,
                stacklevel=2,
            )
            return model, legacy
    raise CheckpointError(
        f"{source} does not match the model its config describes: {mismatch}"
    ) from mismatch


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
    model, cfg = restore_model(cfg, state["data"], state["model"], path)
    return model.to(device).eval(), cfg
