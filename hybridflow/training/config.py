"""Training configuration: visible defaults, ``--key=value`` overrides, a JSON copy per run.

Configs are plain dicts (not dataclasses) so they load from checkpoints with
``torch.load(weights_only=True)``. Nested keys are addressed with dots:
``--backbone_args.hidden_channels=32``.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..naming import closest_name

__all__ = [
    "DEFAULTS",
    "KEY_TYPES",
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
    # semi-supervised hybrids (Nalisnick et al. 2019, §5): keep this many training labels per
    # class, or this stratified fraction, chosen by a draw seeded with `seed`; the rest become
    # unlabelled (-1) and train only λ·NLL. Validation stays fully labelled. At most one is set.
    "labelled_per_class": None,
    "labelled_fraction": None,
    # "drop" trains on the labelled examples only (the supervised baseline of such a run)
    "unlabelled": "keep",
    # how training batches are read: "auto" (from memory when the dataset is in memory),
    # "memory", or "torch" (a DataLoader with loader_workers workers, same batch order)
    "loader": "auto",
    "loader_workers": 0,
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
    "batch_size": 64,  # examples per optimizer step, over all processes and accumulation steps
    "accum_steps": 1,  # split each batch into this many micro-batches (gradient accumulation)
    "opt": "adamw",
    "opt_args": {},  # more timm optimizer keywords, e.g. --opt_args.betas=[0.9,0.99]
    "lr": 1e-3,
    "weight_decay": 0.0,
    "warmup_steps": 200,
    "min_lr": 1e-5,
    "grad_clip": 50.0,
    "ema_decay": 0.998,
    "ema_warmup": True,
    "max_nan_skips": 50,
    # speed: bf16 autocast of the training forward ("none" | "bf16"), channels-last memory
    # format, torch.compile of the training loss; validation and evaluation stay float32
    "amp": "none",
    "channels_last": False,
    "compile": False,
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
    "tensorboard": False,  # also log to RUN/tensorboard (needs `pip install hybridflow[tb]`)
    "sample_every": 0,  # sample grids every this many epochs, at validation (RUN/train_samples)
}


#: Declared type of every key. Keys whose default is ``None`` also accept ``None``; float keys
#: accept ints; ``lam`` is a number or ``"1/D"``.
KEY_TYPES: dict[str, type | tuple[type, ...]] = {
    "dataset": str,
    "data_root": str,
    "download": bool,
    "val_fraction": float,
    "augment_shift": int,
    "perturb_rate": float,
    "labelled_per_class": int,
    "labelled_fraction": float,
    "unlabelled": str,
    "loader": str,
    "loader_workers": int,
    "backbone": str,
    "backbone_args": dict,
    "head": str,
    "head_args": dict,
    "preprocessing": str,
    "logit_alpha": float,
    "dequantization": str,
    "dequantization_args": dict,
    "lam": (float, str),
    "epochs": int,
    "max_steps": int,
    "batch_size": int,
    "accum_steps": int,
    "opt": str,
    "opt_args": dict,
    "lr": float,
    "weight_decay": float,
    "warmup_steps": int,
    "min_lr": float,
    "grad_clip": float,
    "ema_decay": float,
    "ema_warmup": bool,
    "max_nan_skips": int,
    "amp": str,
    "channels_last": bool,
    "compile": bool,
    "seed": int,
    "device": str,
    "num_threads": int,
    "out_dir": str,
    "name": str,
    "log_every": int,
    "eval_every": int,
    "checkpoint_every_s": float,
    "resume": bool,
    "progress": bool,
    "eval_batch_size": int,
    "eval_dequant_samples": int,
    "tensorboard": bool,
    "sample_every": int,
}

# Names other tools use for the same settings; difflib finds typos but not synonyms.
_SYNONYMS = {"learning_rate": "lr", "lambda": "lam", "model": "backbone", "threads": "num_threads"}
_PATH_KEYS = frozenset({"data_root", "out_dir"})


class ConfigError(ValueError):
    """An unknown key or a value that does not parse or has the wrong type."""


def _type_name(key: str) -> str:
    names = {bool: "a boolean", int: "an int", float: "a number", str: "a string", dict: "a dict"}
    text = names.get(KEY_TYPES[key], "a number >= 0 or '1/D'")  # type: ignore[call-overload]
    return f"{text} or None" if DEFAULTS[key] is None else text


def _wrong(key: str, value: Any) -> ConfigError:
    return ConfigError(
        f"config key {key!r} expects {_type_name(key)}, got {value!r} ({type(value).__name__})"
    )


def _parse_free(text: str) -> Any:
    """A value of a free-form sub-key (``backbone_args.X``): JSON if it parses, else the text."""
    if text.strip().lower() in ("none", "null"):
        return None
    try:
        return json.loads(text)  # numbers, booleans, lists, dicts
    except json.JSONDecodeError:
        return text


def _parse_value(key: str, text: str) -> Any:
    """Parse a command-line string with the declared type of ``key``."""
    kind, lowered = KEY_TYPES[key], text.strip().lower()
    if DEFAULTS[key] is None and lowered in ("none", "null"):
        return None
    if kind is str or key == "lam":
        return text  # "--name=2024" is the name "2024"; λ keeps its spelling ("1/D", "0")
    if kind is bool:
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise _wrong(key, text)
    if kind in (int, float):
        try:
            return int(text) if kind is int else float(text)
        except ValueError:
            try:  # "1e3" is a fine way to write an int; _check_type refuses 2.5
                return float(text)
            except ValueError:
                raise _wrong(key, text) from None
    value = _parse_free(text)
    if not isinstance(value, dict):
        raise _wrong(key, text)
    return value


def _check_type(key: str, value: Any) -> Any:
    """``value`` if it has the declared type of ``key`` (integral floats become ints)."""
    kind = KEY_TYPES[key]
    if value is None and DEFAULTS[key] is None:
        return value
    if key in _PATH_KEYS and isinstance(value, os.PathLike):
        return os.fspath(value)
    if key == "lam":
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise _wrong(key, value)
        # Deferred import (models pull in torch); the trainer parses λ with this same function.
        from ..models.hybrid import resolve_lambda

        try:
            resolve_lambda(value, 1)
        except ValueError:
            raise _wrong(key, value) from None
        return value
    if isinstance(value, bool):
        if kind is bool:
            return value
        raise _wrong(key, value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind is float and isinstance(value, int):
        return value
    if not isinstance(value, kind):
        raise _wrong(key, value)
    return value


def _unknown_key(key: str) -> ConfigError:
    guess = _SYNONYMS.get(key.lower()) or closest_name(key, DEFAULTS)
    hint = f"did you mean {guess!r}?" if guess else f"known keys: {', '.join(DEFAULTS)}"
    return ConfigError(f"unknown config key {key!r}; {hint}")


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
    """Defaults, then ``base`` (e.g. a recipe's dict), then ``overrides``; every key type-checked.

    String values of non-string keys are parsed with the key's declared type (:data:`KEY_TYPES`),
    whatever their source (command line, recipe dict or JSON file). Unknown keys and values of
    the wrong type raise :class:`ConfigError`. Keys below ``backbone_args``, ``head_args`` and
    ``dequantization_args`` are free-form (the builders validate them).
    """
    config = copy.deepcopy(DEFAULTS)
    for source in (base or {}), (overrides or {}):
        for key, value in source.items():
            top, _, sub = key.partition(".")
            if top not in DEFAULTS:
                raise _unknown_key(top)
            if sub:
                if not isinstance(config[top], dict):
                    raise ConfigError(f"{top!r} has no sub-keys")
                config[top][sub] = _parse_free(value) if isinstance(value, str) else value
            elif isinstance(value, str) and (KEY_TYPES[top] is not str or DEFAULTS[top] is None):
                config[top] = _parse_value(top, value)
            else:
                config[top] = copy.deepcopy(value)
    return {key: _check_type(key, value) for key, value in config.items()}


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
