"""Training: configuration, checkpoints and the training loop."""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import DEFAULTS, ConfigError, load_config, parse_overrides, resolve_config, save_config
from .trainer import (
    TrainingDivergedError,
    build_model_for,
    data_info,
    load_run,
    run_dir_for,
    train,
)

__all__ = [
    "DEFAULTS",
    "CheckpointError",
    "ConfigError",
    "TrainingDivergedError",
    "build_model_for",
    "data_info",
    "load_checkpoint",
    "load_config",
    "load_run",
    "parse_overrides",
    "resolve_config",
    "run_dir_for",
    "save_checkpoint",
    "save_config",
    "train",
]
