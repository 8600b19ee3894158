"""Pretrained hybrid models shipped with the package, loadable by name.

Names are ``<dataset>/<backbone>-lam<λ>`` with λ written ``0``, ``1overD`` or ``1`` (e.g.
``digits/coupling-lam1overD``, ``fashion-mnist/resflow-lam1overD``). Each weight file in
``hybridflow/weights/`` has its SHA-256 recorded in ``index.json``; a file whose checksum
differs is refused, and every file loads with ``torch.load(weights_only=True)`` (tensors and
plain containers only, no code). The index also records each model's test metrics and the
command that trained it.

>>> model = load_pretrained("digits/coupling-lam1overD")      # doctest: +SKIP
>>> model.flow.log_prob(x)                                      # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .naming import unknown_name_message
from .runs import (
    CONFIG_FILE,
    MODEL_FILE,
    CheckpointError,
    build_model_for,
    file_sha256,
    load_checkpoint,
    resolve_config,
    restore_model,
    save_checkpoint,
    save_config,
)

__all__ = [
    "PRETRAINED_PREFIX",
    "WEIGHTS_DIR",
    "export_pretrained",
    "list_pretrained",
    "load_pretrained",
    "pretrained_run_dir",
    "resolve_run_dir",
]

#: Where the weight files and their index live (installed with the package).
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
#: Prefix that makes a run-folder argument of the CLI name a pretrained model.
PRETRAINED_PREFIX = "pretrained:"


def _index(weights_dir: Path = WEIGHTS_DIR) -> dict[str, dict[str, Any]]:
    path = weights_dir / "index.json"
    return json.loads(path.read_text()) if path.exists() else {}


def list_pretrained(weights_dir: Path = WEIGHTS_DIR) -> dict[str, dict[str, Any]]:
    """Every pretrained model by name, with its file, SHA-256, size and test metrics."""
    return _index(weights_dir)


def _entry(name: str, weights_dir: Path) -> dict[str, Any]:
    index = _index(weights_dir)
    name = name.replace("lam1/D", "lam1overD")  # λ as the configs write it
    if name not in index:
        raise ValueError(unknown_name_message("pretrained model", name, index))
    return index[name]


def _verified_file(name: str, weights_dir: Path) -> Path:
    entry = _entry(name, weights_dir)
    path = weights_dir / entry["file"]
    if not path.exists():
        raise CheckpointError(f"pretrained model {name!r}: weight file {path} is missing")
    digest = file_sha256(path)
    if digest != entry["sha256"]:
        raise CheckpointError(
            f"pretrained model {name!r}: {path} has SHA-256 {digest}, the index records "
            f"{entry['sha256']}; the file is corrupt or was replaced, refusing to load it"
        )
    return path


def load_pretrained(
    name: str, device: str | torch.device = "cpu", weights_dir: Path = WEIGHTS_DIR
) -> torch.nn.Module:
    """The pretrained :class:`~hybridflow.models.HybridModel` ``name`` in eval mode.

    Ready for ``model.flow.log_prob(x)`` (``x``: integer levels) and ``model(x).logits``;
    ``hybridflow.evaluation.predict(model, dataset)`` gives both for a whole dataset.

    Raises:
        ValueError: Unknown name (the message suggests the closest one).
        CheckpointError: Missing file, or a checksum that differs from the index.
    """
    path = _verified_file(name, weights_dir)
    state = load_checkpoint(path, map_location=device)
    config = resolve_config(base=state["config"])
    model, _ = restore_model(config, state["data"], state["model"], path)
    return model.to(device).eval()


def _cache_root() -> Path:
    root = os.environ.get("HYBRIDFLOW_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "hybridflow"


def pretrained_run_dir(name: str, weights_dir: Path = WEIGHTS_DIR) -> Path:
    """A run folder holding the verified pretrained model, for every run-folder command.

    Made under ``$HYBRIDFLOW_CACHE`` (default ``~/.cache/hybridflow``)
    ``/pretrained/<name>/``; ``model.pt`` is re-copied whenever its checksum differs, and the
    commands write their outputs (``ood/``, ``calibration/``, ...) into that folder.
    """
    source = _verified_file(name, weights_dir)
    run_dir = _cache_root() / "pretrained" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / MODEL_FILE
    if not target.exists() or file_sha256(target) != _entry(name, weights_dir)["sha256"]:
        shutil.copyfile(source, target)
    save_config(load_checkpoint(target)["config"], run_dir / CONFIG_FILE)
    return run_dir


def resolve_run_dir(spec: str | Path) -> Path:
    """A run folder, or the cached run folder of ``pretrained:NAME``."""
    text = str(spec)
    if text.startswith(PRETRAINED_PREFIX):
        return pretrained_run_dir(text[len(PRETRAINED_PREFIX) :])
    return Path(spec)


def export_pretrained(
    run_dir: str | Path,
    name: str,
    weights_dir: Path = WEIGHTS_DIR,
    metrics: Mapping[str, Any] | None = None,
    source: str | None = None,
    max_bytes: int = 5_000_000,
) -> dict[str, Any]:
    """Copy a finished run's EMA weights to ``weights_dir`` as ``name`` and index them.

    The file holds only the weights, the resolved config and the data description
    (``weights_only``-loadable), saved in float32. The entry records the run's convergence
    (:class:`~hybridflow.training.stopping.StopRecord`: status, why it stopped, last-quarter
    improvement; ``None`` for runs trained before runs recorded it). Returns the index entry.
    """
    state = load_checkpoint(Path(run_dir) / MODEL_FILE)
    weights = {k: v.float() if v.is_floating_point() else v for k, v in state["model"].items()}
    file = name.replace("/", "__") + ".pt"
    weights_dir.mkdir(parents=True, exist_ok=True)
    path = weights_dir / file
    save_checkpoint({"model": weights, "config": state["config"], "data": state["data"]}, path)
    size = path.stat().st_size
    if size > max_bytes:
        path.unlink()
        raise ValueError(f"{name}: {size:,} bytes exceeds the {max_bytes:,}-byte limit")
    entry = {
        "file": file,
        "sha256": file_sha256(path),
        "bytes": size,
        "dataset": state["config"]["dataset"],
        "backbone": state["config"]["backbone"],
        "lam": state["config"]["lam"],
        "num_parameters": sum(
            p.numel()
            for p in build_model_for(
                resolve_config(base=state["config"]), state["data"]
            ).parameters()
        ),
        "metrics": dict(metrics or {}),
        "convergence": state.get("stopped"),
        "train_time_s": state.get("train_time_s"),
        "source": source,
    }
    index = _index(weights_dir)
    index[name] = entry
    (weights_dir / "index.json").write_text(
        json.dumps(dict(sorted(index.items())), indent=2) + "\n"
    )
    return entry
