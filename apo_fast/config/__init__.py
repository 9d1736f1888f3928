"""The run configuration: typed sections (:mod:`.schema`; the adapter section is the
adapters package's own :class:`~apo_fast.config.adapter.AdapterConfig`), YAML loading with
``--set`` overrides (:mod:`.loading`), the checks that refuse a bad value before any work
(:mod:`.checks`) and every choice list (:mod:`.choices`). Nothing here imports torch.
"""
from apo_fast.config.adapter import AdapterConfig, GateConfig
from apo_fast.config.checks import validate_config
from apo_fast.config.choices import EVAL_SOURCES
from apo_fast.config.loading import (
    LEGACY_KEYS,
    check_paths,
    config_from_dict,
    load_config,
    save_config,
)
from apo_fast.config.schema import (
    RUN_DEFAULTS,
    APOConfig,
    ConfigError,
    DataConfig,
    EvalConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    PretrainConfig,
    SampleConfig,
    TrainConfig,
)

__all__ = [
    "EVAL_SOURCES", "LEGACY_KEYS", "RUN_DEFAULTS", "APOConfig", "AdapterConfig", "ConfigError", "DataConfig",
    "EvalConfig", "GateConfig", "LossConfig", "ModelConfig", "OptimConfig", "PretrainConfig", "SampleConfig",
    "TrainConfig", "check_paths", "config_from_dict", "load_config", "save_config", "validate_config",
]
