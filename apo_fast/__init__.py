"""apo-fast: a kernel-level training engine for Anomaly Preference Optimization (APO).

Public API (imported lazily, so ``import apo_fast`` stays cheap):

Loss (``apo_fast.losses``)
    ``apo_loss``, ``APOLossOutput``, ``beta_schedule``, ``diffusion_dpo_loss``
Fused ops (``apo_fast.ops``)
    ``gated_lora_linear``
Time-gated adapters (``apo_fast.adapters``)
    ``GateConfig``, ``AdapterConfig``, ``GatedLoRALinear``, ``GatedLoRAConv2d``, ``inject_adapters``,
    ``adapters_disabled``, ``save_adapters``, ``load_adapters``, ``convert_peft_to_gated``
Data (``apo_fast.data``)
    ``scan_mvtec``, ``AnomalyDataset``, ``NormalDataset``, ``condition_names``
Training and sampling
    ``APOConfig``, ``load_config``, ``APOTrainer``, ``hierarchical_sample``,
    ``load_run``, ``sample_run``
Evaluation
    ``evaluate`` (``apo_fast.eval.evaluate``), metrics in ``apo_fast.eval``
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "apo_loss": "apo_fast.losses",
    "APOLossOutput": "apo_fast.losses",
    "beta_schedule": "apo_fast.losses",
    "diffusion_dpo_loss": "apo_fast.losses",
    "gated_lora_linear": "apo_fast.ops.gated_lora",
    "GateConfig": "apo_fast.adapters",
    "AdapterConfig": "apo_fast.adapters",
    "GatedLoRALinear": "apo_fast.adapters",
    "GatedLoRAConv2d": "apo_fast.adapters",
    "inject_adapters": "apo_fast.adapters",
    "adapters_disabled": "apo_fast.adapters",
    "save_adapters": "apo_fast.adapters",
    "load_adapters": "apo_fast.adapters",
    "convert_peft_to_gated": "apo_fast.adapters",
    "scan_mvtec": "apo_fast.data",
    "AnomalyDataset": "apo_fast.data",
    "NormalDataset": "apo_fast.data",
    "condition_names": "apo_fast.data",
    "APOConfig": "apo_fast.config",
    "load_config": "apo_fast.config",
    "APOTrainer": "apo_fast.training.trainer",
    "hierarchical_sample": "apo_fast.sampling.hierarchical",
    "load_run": "apo_fast.sampling.runs",
    "sample_run": "apo_fast.sampling.runs",
    "evaluate": "apo_fast.eval.evaluate",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'apo_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
