"""Training: configuration, checkpoints, the training loop and its shared pieces."""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import (
    DEFAULTS,
    KEY_CHOICES,
    KEY_RANGES,
    KEY_TYPES,
    ConfigError,
    load_config,
    parse_overrides,
    read_config_file,
    resolve_config,
    save_config,
)
from .loop import TrainingDivergedError, finalize_ema
from .trainer import build_model_for, data_info, load_run, run_dir_for, train

__all__ = [
    "DEFAULTS",
    "KEY_CHOICES",
    "KEY_RANGES",
    "KEY_TYPES",
    "CheckpointError",
    "ConfigError",
    "TrainingDivergedError",
    "build_model_for",
    "data_info",
    "finalize_ema",
    "load_checkpoint",
    "load_config",
    "load_run",
    "parse_overrides",
    "read_config_file",
    "resolve_config",
    "run_dir_for",
    "save_checkpoint",
    "save_config",
    "train",
]
