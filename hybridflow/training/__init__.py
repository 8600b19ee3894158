"""Training: the loop and its shared pieces (inputs, distributed, logs, monitoring).

The config, checkpoint format and run-folder read side live in :mod:`hybridflow.runs`; their
names are re-exported here, where code written before that package found them.
"""

from ..runs import (
    DEFAULTS,
    KEY_CHOICES,
    KEY_RANGES,
    KEY_TYPES,
    CheckpointError,
    ConfigError,
    build_model_for,
    data_info,
    load_checkpoint,
    load_config,
    load_run,
    parse_overrides,
    read_config_file,
    resolve_config,
    run_dir_for,
    save_checkpoint,
    save_config,
)
from .density import fit_density
from .loop import TrainingDivergedError, finalize_ema
from .target import fit_target, target_diagnostics
from .trainer import train

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
    "fit_density",
    "fit_target",
    "load_checkpoint",
    "load_config",
    "load_run",
    "parse_overrides",
    "read_config_file",
    "resolve_config",
    "run_dir_for",
    "save_checkpoint",
    "save_config",
    "target_diagnostics",
    "train",
]
