"""Training configuration: visible defaults, ``--key=value`` overrides, a JSON copy per run.

Configs are plain dicts (not dataclasses) so they load from checkpoints with
``torch.load(weights_only=True)``. Nested keys are addressed with dots:
``--backbone_args.hidden_channels=32``. :func:`resolve_config` checks every value once, where a
config enters (command line, recipe, JSON or YAML file): its type, its range or allowed names
(:data:`KEY_RANGES`, :data:`KEY_CHOICES`), and the keys under ``*_args`` against the
constructor they go to, so a wrong value fails before any data is read or cell is started.
One idea over 500 lines: what a config may hold.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from timm.optim import get_optimizer_class, list_optimizers

from ..data import check_dataset_name
from ..models import Lambda, backbone_keywords, head_keywords, list_backbones, list_heads
from ..models.flow import DEQUANTIZERS
from ..models.precision import AMP_MODES
from ..naming import accepted_keywords, closest_name, unknown_name_message
from ..transforms import VariationalDequantization

__all__ = [
    "DEFAULTS",
    "KEY_CHOICES",
    "KEY_RANGES",
    "KEY_TYPES",
    "LOADERS",
    "ConfigError",
    "load_config",
    "optimizer_keywords",
    "parse_free_value",
    "parse_overrides",
    "read_config_file",
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
    "epochs": 50,  # the schedule's length: the most a run trains
    "max_steps": None,
    # convergence (hybridflow.training.stopping): stop when the validation metric the loss
    # optimizes improved by less than this relative amount over the last quarter of training,
    # or after this many minutes of training; None: off
    "stop_rel_improvement": None,
    "budget_minutes": None,
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
    "eval_every": 10,  # validate every this many epochs (0: no validation while training)
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
    "stop_rel_improvement": float,
    "budget_minutes": float,
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

#: Values of the ``loader`` config key.
LOADERS = ("auto", "memory", "torch")


#: Allowed interval of every numeric key, in interval notation (``None`` passes where the
#: default is ``None``). Checked by :func:`resolve_config`.
KEY_RANGES: dict[str, str] = {
    "val_fraction": "[0, 1)",
    "augment_shift": "[0, inf)",
    "perturb_rate": "[0, 1)",
    "labelled_per_class": "[1, inf)",
    "labelled_fraction": "(0, 1]",
    "loader_workers": "[0, inf)",
    "logit_alpha": "[0, 0.5)",
    "epochs": "[1, inf)",
    "max_steps": "[1, inf)",
    "stop_rel_improvement": "(0, inf)",
    "budget_minutes": "(0, inf)",
    "batch_size": "[1, inf)",
    "accum_steps": "[1, inf)",
    "lr": "(0, inf)",
    "weight_decay": "[0, inf)",
    "warmup_steps": "[0, inf)",
    "min_lr": "[0, inf)",
    "grad_clip": "(0, inf)",
    "ema_decay": "[0, 1)",
    "max_nan_skips": "[0, inf)",
    "num_threads": "[1, inf)",
    "log_every": "[1, inf)",
    "eval_every": "[0, inf)",
    "checkpoint_every_s": "[0, inf)",
    "eval_batch_size": "[1, inf)",
    "eval_dequant_samples": "[1, inf)",
    "sample_every": "[0, inf)",
    "seed": "[0, inf)",
}


def _optimizer_class(opt: str) -> type | None:
    """timm optimizer ``opt``'s class, or ``None`` if timm has none of that name."""
    try:  # timm's create_optimizer_v2 wraps "lookahead_NAME" around NAME
        return get_optimizer_class(opt.removeprefix("lookahead_"), bind_defaults=False)
    except (ValueError, ImportError):
        return None


def optimizer_keywords(opt: str) -> set[str]:
    """The keyword arguments of timm optimizer ``opt``'s class (empty if unknown)."""
    cls = _optimizer_class(opt)
    return set(inspect.signature(cls).parameters) if cls is not None else set()


def _optimizer_name(name: str) -> list[str] | None:
    return list_optimizers() if _optimizer_class(name) is None else None


def _device_name(name: str) -> list[str] | None:
    try:
        torch.device(name) if name != "auto" else None
    except RuntimeError:
        return ["auto", "cpu", "cuda", "cuda:N", "mps"]
    return None


def _dataset_name(name: str) -> str | None:
    try:
        check_dataset_name(name)
    except ValueError as err:
        return str(err)
    return None


#: Allowed values of every choice key: a tuple of names, or a function that returns ``None``
#: for a valid value and else the valid names (or the whole message). Checked by
#: :func:`resolve_config`.
KEY_CHOICES: dict[str, tuple[str, ...] | Callable[[str], list[str] | str | None]] = {
    "dataset": _dataset_name,
    "unlabelled": ("keep", "drop"),
    "loader": LOADERS,
    "backbone": lambda name: None if name in list_backbones() else list_backbones(),
    "head": lambda name: None if name in list_heads() else list_heads(),
    "preprocessing": ("logit", "none"),
    "dequantization": DEQUANTIZERS,
    "opt": _optimizer_name,
    "amp": AMP_MODES,
    "device": _device_name,
}

#: What ``dequantization_args`` may hold: the keywords of the variational dequantizer.
_DEQUANTIZATION_KEYWORDS = accepted_keywords(VariationalDequantization, skip=2)

# Names other tools use for the same settings; difflib finds typos but not synonyms.
_SYNONYMS = {
    "max_epochs": "epochs",
    "learning_rate": "lr",
    "lambda": "lam",
    "model": "backbone",
    "threads": "num_threads",
}
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


def parse_free_value(text: str) -> Any:
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
    value = parse_free_value(text)
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
        try:
            Lambda.parse(value)
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


def _range_error(key: str, value: float) -> ConfigError | None:
    """The refusal of ``value`` outside :data:`KEY_RANGES` ``[key]``, else ``None``."""
    interval = KEY_RANGES[key]
    low, high = interval[1:-1].split(", ")
    above = value >= float(low) if interval[0] == "[" else value > float(low)
    below = value <= float(high) if interval[-1] == "]" else value < float(high)
    if math.isfinite(value) and above and below:
        return None
    bound = (
        f"be {'>=' if interval[0] == '[' else '>'} {low}" if high == "inf" else f"lie in {interval}"
    )
    return ConfigError(f"{key} must {bound}, got {value}")


def _check_choice(key: str, value: str) -> None:
    rule = KEY_CHOICES[key]
    if isinstance(rule, tuple):  # a few fixed values: name them all, in their order
        if value not in rule:
            guess = closest_name(value, rule)
            hint = f" (did you mean {guess!r}?)" if guess else ""
            raise ConfigError(f"{key} must be one of {', '.join(rule)}; got {value!r}{hint}")
        return
    valid = rule(value)
    if isinstance(valid, str):
        raise ConfigError(f"config key {key!r}: {valid}")
    if valid is not None:
        raise ConfigError(f"config key {key!r}: {unknown_name_message(key, value, valid)}")


def _check_keywords(key: str, given: Mapping[str, Any], accepted: Iterable[str] | None, of: str):
    """Refuse keys under ``key`` (``backbone_args``, ...) that ``of`` does not take."""
    if accepted is None:
        return
    for name in given:
        if name not in accepted:
            guess = closest_name(name, accepted)
            hint = f"; did you mean {guess!r}?" if guess else ""
            raise ConfigError(
                f"config key {key!r}: {of} takes no keyword {name!r}{hint} "
                f"(valid: {', '.join(sorted(accepted))})"
            )


def _check_values(config: Mapping[str, Any]) -> None:
    """Ranges, allowed names and nested keywords of a type-checked config (see the docstring)."""
    for key in KEY_RANGES:
        if config[key] is not None and (error := _range_error(key, config[key])):
            raise error
    for key in KEY_CHOICES:
        _check_choice(key, config[key])
    if config["labelled_per_class"] is not None and config["labelled_fraction"] is not None:
        raise ConfigError(
            "labelled_per_class and labelled_fraction are mutually exclusive: set only one"
        )
    if config["stop_rel_improvement"] is not None and not config["eval_every"]:
        raise ConfigError(
            "stop_rel_improvement needs validations to watch: set eval_every >= 1 (epochs "
            "between validations)"
        )
    if config["min_lr"] > config["lr"]:
        raise ConfigError(f"min_lr {config['min_lr']} exceeds lr {config['lr']}")
    backbone, keywords = config["backbone"], backbone_keywords(config["backbone"])
    coeff = config["backbone_args"].get("coeff")
    contraction = isinstance(coeff, int | float) and not isinstance(coeff, bool) and 0 < coeff < 1
    if coeff is not None and "coeff" in (keywords or ()) and not contraction:
        raise ConfigError(
            f"config key 'backbone_args.coeff' must lie in (0, 1), got {coeff!r}: a residual "
            "block x + g(x) is invertible, and its log-det series converges, only when "
            "Lip(g) < 1 (Behrmann et al. 2019)"
        )
    _check_keywords(
        "backbone_args",
        config["backbone_args"],
        keywords,
        f"backbone {backbone!r}",
    )
    _check_keywords(
        "head_args", config["head_args"], head_keywords(config["head"]), f"head {config['head']!r}"
    )
    if config["dequantization_args"] and config["dequantization"] != "variational":
        raise ConfigError("dequantization_args are read only by --dequantization=variational")
    _check_keywords(
        "dequantization_args",
        config["dequantization_args"],
        _DEQUANTIZATION_KEYWORDS,
        "VariationalDequantization",
    )
    _check_keywords("opt_args", config["opt_args"], _opt_keywords(config["opt"]), config["opt"])


def _opt_keywords(opt: str) -> set[str] | None:
    """The optimizer class's keywords besides those the trainer sets (None: not declared)."""
    names = optimizer_keywords(opt) - {"params", "lr", "weight_decay"}
    return names or None


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
                config[top][sub] = parse_free_value(value) if isinstance(value, str) else value
            elif isinstance(value, str) and (KEY_TYPES[top] is not str or DEFAULTS[top] is None):
                config[top] = _parse_value(top, value)
            else:
                config[top] = copy.deepcopy(value)
    config = {key: _check_type(key, value) for key, value in config.items()}
    _check_values(config)
    return config


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The raw entries of a config file, JSON (``.json``) or YAML (``.yaml``/``.yml``, the format
    of timm's ``train.py`` configs), for :func:`resolve_config` to check.

    Raises:
        FileNotFoundError: No such file.
        ConfigError: The file does not parse, or does not hold a mapping of keys to values.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path} not found") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            entries = yaml.safe_load(text)
        else:
            entries = json.loads(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        kind = "YAML" if path.suffix.lower() in (".yaml", ".yml") else "JSON"
        raise ConfigError(f"config file {path} is not valid {kind}: {err}") from None
    if entries is None:
        return {}
    if not isinstance(entries, dict):
        raise ConfigError(
            f"config file {path} must hold key: value entries, got {type(entries).__name__}"
        )
    return entries


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
