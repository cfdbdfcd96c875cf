"""The typed configuration: ``ExperimentConfig`` and its sections, loaded from TOML + ``--set`` overrides.

The bottom layer of the package: config imports nothing else of feddtl.
"""

from feddtl.config.errors import ConfigError
from feddtl.config.experiment import ExperimentConfig
from feddtl.config.loading import (
    available_presets,
    find_toml,
    load_config,
    loads_config,
    preset_dir,
    resolve_config_path,
    to_toml,
    toml_value,
)

__all__ = [
    "ConfigError",
    "ExperimentConfig",
    "available_presets",
    "find_toml",
    "load_config",
    "loads_config",
    "preset_dir",
    "resolve_config_path",
    "to_toml",
    "toml_value",
]
