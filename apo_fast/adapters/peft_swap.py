"""Drop-in path for code that already uses peft LoRA: swap its layers for the fused ones.

A script that adds LoRA through peft (for example diffusers'
``train_diffusion_dpo.py``: ``unet.add_adapter(LoraConfig(...))``) gains the
fused gated kernels with one more line::

    unet.add_adapter(unet_lora_config)
    convert_peft_to_gated(unet)          # constant gate: the same LoRA, fused

Every ``peft.tuners.lora.Linear`` becomes a :class:`GatedLoRALinear` (every
``lora.Conv2d`` a :class:`GatedLoRAConv2d`) that keeps
the base layer, the adapter modules and their parameter objects (an optimizer
built before the swap keeps training them), the module names and state-dict
keys, ``scaling``, the active adapter and the disabled/merged state. The new
layers are peft ``LoraLayer`` instances, so these keep working unchanged:
diffusers' ``unet.disable_adapters()`` / ``enable_adapters()`` /
``set_adapters(names, weights)`` / ``fuse_lora`` / ``scale_lora_layers``, peft's
``PeftModel.disable_adapter()`` context, and saving through
``get_peft_model_state_dict`` (or ``unet.save_lora_adapter``). Note that peft's
and diffusers' enable/disable also toggle ``requires_grad`` of the adapter
weights, as they always do; :func:`~apo_fast.adapters.inject.adapters_disabled`
switches adapters off without touching it.

With ``gate=GateConfig(kind="rank_prefix")`` (or another kind) the layers get a
timestep gate and ``model`` gets the timestep hooks, so ``model`` must be the
module called with ``timestep`` (the UNet itself, not a pipeline or a
``PeftModel`` wrapper). ``lora.Conv2d`` layers become :class:`GatedLoRAConv2d`
(PyTorch ops, no fused kernel); other layer types (LoRA on embeddings or 1-D/3-D
convolutions, quantized layers) are left as they are.
"""
from __future__ import annotations

import torch.nn as nn

from apo_fast.adapters.gates import GateConfig, build_gate
from apo_fast.adapters.inject import gated_layers
from apo_fast.adapters.layer import GatedLoRAConv2d, GatedLoRALinear
from apo_fast.adapters.state import attach_gate, get_gate_state

__all__ = ["convert_peft_to_gated"]


def convert_peft_to_gated(model: nn.Module, gate: GateConfig | None = None, *, backend: str | None = None) -> int:
    """Replace every peft LoRA ``Linear`` / ``Conv2d`` layer of ``model`` by a
    :class:`GatedLoRALinear` / :class:`GatedLoRAConv2d`.

    Args:
        model: any module holding ``peft.tuners.lora.Linear`` layers.
        gate: the timestep gate; ``None`` is the constant gate (exactly the
            peft LoRA computation, fused).
        backend: op backend override for the new layers.

    Returns:
        The number of layers replaced.
    """
    from peft.tuners.lora import Conv2d as PeftLoraConv2d
    from peft.tuners.lora import Linear as PeftLoraLinear

    converters = {PeftLoraLinear: GatedLoRALinear, PeftLoraConv2d: GatedLoRAConv2d}

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if gate is not None and not isinstance(gate, GateConfig):
        raise TypeError(f"gate must be a GateConfig or None, got {type(gate).__name__}")
    if get_gate_state(model) is not None or gated_layers(model):
        raise ValueError(f"{type(model).__name__} already has time-gated adapter layers")
    targets = [(path, m) for path, m in model.named_modules() if type(m) in converters]
    if not targets:
        raise ValueError(f"{type(model).__name__} has no peft LoRA Linear or Conv2d layers to convert")
    replacements = [(path, converters[type(layer)].from_peft(layer, backend=backend)) for path, layer in targets]
    if gate is not None and not gate.is_constant:
        ranks = sorted({rank for _, layer in targets for rank in layer.r.values()})
        for rank in ranks:
            gate.rank_range(rank)
        merged = [path for path, layer in targets if layer.merged]
        if merged:
            raise ValueError(f"cannot gate merged LoRA layers {merged[:3]}; unmerge them first")
        state = attach_gate(model, build_gate(gate, max(ranks)), ranks=ranks)
        for _, new in replacements:
            new.gate_state = state
    for path, new in replacements:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, new)
    return len(replacements)
