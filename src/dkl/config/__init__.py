"""Typed run configuration: YAML presets + dotted ``key=value`` overrides, validated.

``import dkl.config`` needs only PyYAML: it never imports torch, the training loop or a recipe.
See :mod:`dkl.config.loader` for how a config is assembled, :mod:`dkl.config.schema` for the
shared sections and :mod:`dkl.config.sections` for the built-in recipes' own sections.
"""

from dkl.config.loader import (
    PRESET_DIR,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    known_recipes,
    list_presets,
    load_config,
    preset_description,
    preset_file,
    preset_for_run,
    register_recipe_config,
    save_config,
)
from dkl.config.ranges import RANGES, config_warnings
from dkl.config.schema import (
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    OptimConfig,
    SchedConfig,
    TrainConfig,
)
from dkl.config.sections import (
    AdversarialConfig,
    AttackConfig,
    AWPConfig,
    DistillConfig,
    EMAConfig,
    RobustEvalConfig,
    SemiSupConfig,
    TeacherConfig,
)

__all__ = [
    "PRESET_DIR",
    "RANGES",
    "AWPConfig",
    "AdversarialConfig",
    "AttackConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DistillConfig",
    "EMAConfig",
    "ModelConfig",
    "OptimConfig",
    "RobustEvalConfig",
    "SchedConfig",
    "SemiSupConfig",
    "TeacherConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "config_warnings",
    "known_recipes",
    "list_presets",
    "load_config",
    "preset_description",
    "preset_file",
    "preset_for_run",
    "register_recipe_config",
    "save_config",
]
