"""Training configuration: visible defaults, ``--key=value`` overrides, a JSON copy per run.

Configs are plain dicts (not dataclasses) so they load from checkpoints with
``torch.load(weights_only=True)``. Nested keys are addressed with dots:
``--backbone_args.hidden_channels=32``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULTS",
    "ConfigError",
    "load_config",
    "parse_overrides",
    "resolve_config",
    "save_config",
]

DEFAULTS: dict[str, Any] = {
    # data
    "dataset": "digits",
    "data_root": None,
    "download": False,
    "val_fraction": 0.1,
    "augment_shift": 0,  # random translations of up to this many pixels (zero fill), train only
    # replace each pixel by a uniformly random level with this probability, train only; 0.1-0.2
    # trains the background model of the likelihood-ratio OOD score (Ren et al. 2019)
    "perturb_rate": 0.0,
    # model
    "backbone": "realnvp",
    "backbone_args": {},
    "head": "resflow",
    "head_args": {},
    "preprocessing": "logit",
    "logit_alpha": 1e-3,
    "dequantization": "uniform",  # or "variational" (Flow++)
    "dequantization_args": {},
    # objective: loss = CE + lam * NLL (nats); lam is a number or "1/D"
    "lam": "1/D",
    # optimisation (timm optimizer, warmup + cosine schedule, EMA)
    "epochs": 50,
    "max_steps": None,
    "batch_size": 64,
    "opt": "adamw",
    "lr": 1e-3,
    "weight_decay": 0.0,
    "warmup_steps": 200,
    "min_lr": 1e-5,
    "grad_clip": 50.0,
    "ema_decay": 0.998,
    "ema_warmup": True,
    "max_nan_skips": 50,
    # bookkeeping
    "seed": 0,
    "device": "auto",
    "num_threads": None,
    "out_dir": "runs",
    "name": None,
    "log_every": 20,
    "eval_every": 10,
    "checkpoint_every_s": 120.0,
    "resume": True,
    "progress": True,
    "eval_batch_size": 512,
    "eval_dequant_samples": 1,  # bound draws averaged for validation bits/dim
}


class ConfigError(ValueError):
    """An unknown key or a value that does not parse."""


def _parse_value(text: str, default: Any) -> Any:
    lowered = text.strip().lower()
    if lowered in ("none", "null"):
        return None
    if isinstance(default, bool):
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"expected a boolean, got {text!r}")
    if isinstance(default, int) and not isinstance(default, bool):
        try:
            return int(text)
        except ValueError:
            pass
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"expected a number, got {text!r}") from None
    try:
        return json.loads(text)  # numbers, lists, dicts for free-form keys
    except json.JSONDecodeError:
        return text


def parse_overrides(args: Iterable[str]) -> dict[str, str]:
    """Parse ``--key=value`` (or ``key=value``) strings into a flat dict of raw strings."""
    out: dict[str, str] = {}
    for arg in args:
        body = arg[2:] if arg.startswith("--") else arg
        if "=" not in body:
            raise ConfigError(f"expected --key=value, got {arg!r}")
        key, value = body.split("=", 1)
        out[key.replace("-", "_") if "." not in key else key] = value
    return out


def resolve_config(
    overrides: Mapping[str, Any] | None = None, base: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Defaults, then ``base`` (e.g. a recipe's dict), then ``overrides``; unknown keys are errors.

    String values in ``overrides`` are parsed with the type of the default they replace.
    Keys below ``backbone_args`` and ``head_args`` are free-form (the builders validate them).
    """
    config = copy.deepcopy(DEFAULTS)
    for source in (base or {}), (overrides or {}):
        for key, value in source.items():
            top, _, sub = key.partition(".")
            if top not in DEFAULTS:
                raise ConfigError(f"unknown config key {top!r}; known keys: {', '.join(DEFAULTS)}")
            if sub:
                if not isinstance(config[top], dict):
                    raise ConfigError(f"{top!r} has no sub-keys")
                config[top][sub] = _parse_value(value, None) if isinstance(value, str) else value
            elif isinstance(value, str) and not isinstance(DEFAULTS[top], str):
                config[top] = _parse_value(value, DEFAULTS[top])
            else:
                config[top] = copy.deepcopy(value)
    return config


def save_config(config: Mapping[str, Any], path: str | Path) -> None:
    """Write a config as indented JSON."""
    Path(path).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a config saved by :func:`save_config`, filling keys added since with defaults."""
    try:
        saved = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no config at {path}: is this a hybridflow run folder?") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"config {path} is not valid JSON: {err}") from None
    return resolve_config(base={k: v for k, v in saved.items() if k in DEFAULTS})
