"""Time-gated adapters (APO_SPEC "TACA"): LoRA whose rank dims are gated by each sample's timestep.

Public API:

* :class:`GateConfig`, :func:`build_gate`, :func:`rank_prefix_lengths` and the
  gate modules (``gates.py``);
* :class:`GatedLoRALinear` (``layer.py``), a peft-layout LoRA layer whose
  forward is the fused ``gated_lora_linear`` op, and :class:`GatedLoRAConv2d`
  for convolutions (PyTorch ops);
* :class:`AdapterConfig`, :func:`inject_adapters`, :func:`adapters_disabled`,
  :func:`set_adapters_enabled`, :func:`adapter_parameters`, :func:`freeze_base`,
  :func:`set_gate`, :func:`gated_layers` (``inject.py``);
* :func:`save_adapters`, :func:`load_adapters`, :func:`read_adapter_metadata` (``io.py``);
* :func:`convert_peft_to_gated` (``peft_swap.py``), the drop-in path for peft users.
"""
from apo_fast.adapters.gates import (
    GATE_KINDS,
    ConstantGate,
    GateConfig,
    LearnedGate,
    RankPrefixGate,
    SigmoidGate,
    TimestepGate,
    build_gate,
    rank_prefix_lengths,
    timestep_embedding,
)
from apo_fast.adapters.inject import (
    DEFAULT_TARGET_MODULES,
    AdapterConfig,
    adapter_parameters,
    adapters_disabled,
    freeze_base,
    gated_layers,
    inject_adapters,
    set_adapters_enabled,
    set_gate,
)
from apo_fast.adapters.io import (
    GATE_WEIGHT_NAME,
    LORA_WEIGHT_NAME,
    load_adapters,
    read_adapter_metadata,
    save_adapters,
)
from apo_fast.adapters.layer import GatedLoRAConv2d, GatedLoRALinear
from apo_fast.adapters.peft_swap import convert_peft_to_gated
from apo_fast.adapters.state import GateState, get_gate_state

__all__ = [
    "GATE_KINDS",
    "GateConfig",
    "TimestepGate",
    "ConstantGate",
    "RankPrefixGate",
    "SigmoidGate",
    "LearnedGate",
    "build_gate",
    "rank_prefix_lengths",
    "timestep_embedding",
    "DEFAULT_TARGET_MODULES",
    "AdapterConfig",
    "inject_adapters",
    "gated_layers",
    "adapter_parameters",
    "freeze_base",
    "set_adapters_enabled",
    "adapters_disabled",
    "set_gate",
    "LORA_WEIGHT_NAME",
    "GATE_WEIGHT_NAME",
    "save_adapters",
    "load_adapters",
    "read_adapter_metadata",
    "GatedLoRALinear",
    "GatedLoRAConv2d",
    "convert_peft_to_gated",
    "GateState",
    "get_gate_state",
]
