"""The run configuration (typed dataclasses loaded from YAML, checked before any work)."""
from apo_fast.config.schema import (
    EVAL_SOURCES,
    AdapterSettings,
    APOConfig,
    ConfigError,
    DataConfig,
    EvalConfig,
    GateSettings,
    LossConfig,
    ModelConfig,
    OptimConfig,
    PretrainConfig,
    SampleConfig,
    TrainConfig,
    check_paths,
    config_from_dict,
    load_config,
    save_config,
    validate_config,
)

__all__ = [
    "EVAL_SOURCES", "APOConfig", "AdapterSettings", "ConfigError", "DataConfig", "EvalConfig", "GateSettings",
    "LossConfig", "ModelConfig", "OptimConfig", "PretrainConfig", "SampleConfig", "TrainConfig", "check_paths",
    "config_from_dict", "load_config", "save_config", "validate_config",
]
