"""The run folder and its config: what a run is, below the code that trains one.

:mod:`~hybridflow.runs.config` (keys, types, ranges, allowed values, files),
:mod:`~hybridflow.runs.checkpoint` (the atomic, ``weights_only`` checkpoint format) and
:mod:`~hybridflow.runs.folder` (file names, the naming scheme, reading a model back). Training
(:mod:`hybridflow.training`) writes run folders; reports, pretrained models and the command line
read them through this package, never through the trainer.
"""

from .checkpoint import (
    CheckpointError,
    file_sha256,
    load_checkpoint,
    remove_temporaries,
    save_checkpoint,
)
from .config import (
    DEFAULTS,
    KEY_CHOICES,
    KEY_RANGES,
    KEY_TYPES,
    LOADERS,
    ConfigError,
    load_config,
    parse_overrides,
    read_config_file,
    resolve_config,
    save_config,
)
from .folder import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    LEGACY_BUILD_DEFAULTS,
    METRICS_FILE,
    MODEL_FILE,
    build_model_for,
    data_info,
    finished_config,
    legacy_config,
    legacy_flags,
    load_run,
    restore_model,
    run_dir_for,
    run_name,
)

__all__ = [
    "CHECKPOINT_FILE",
    "CONFIG_FILE",
    "DEFAULTS",
    "KEY_CHOICES",
    "KEY_RANGES",
    "KEY_TYPES",
    "LEGACY_BUILD_DEFAULTS",
    "LOADERS",
    "METRICS_FILE",
    "MODEL_FILE",
    "CheckpointError",
    "ConfigError",
    "build_model_for",
    "data_info",
    "file_sha256",
    "finished_config",
    "legacy_config",
    "legacy_flags",
    "load_checkpoint",
    "load_config",
    "load_run",
    "parse_overrides",
    "read_config_file",
    "remove_temporaries",
    "resolve_config",
    "restore_model",
    "run_dir_for",
    "run_name",
    "save_checkpoint",
    "save_config",
]
