"""Putting time-gated adapters into a model, switching them off, freezing the rest.

``inject_adapters(unet, AdapterConfig(...))`` replaces every ``nn.Linear`` whose
module path ends with one of ``target_modules`` by a :class:`GatedLoRALinear`
(an ``nn.Conv2d``, e.g. SD 1.5's 1x1 ``proj_in``/``proj_out`` or a resnet's
``conv1``, by a :class:`GatedLoRAConv2d`),
registers one gate module as ``unet.taca_gate`` (non-constant gates; learned parameters are
model parameters, seen by optimizers and DeepSpeed) and hooks on ``unet`` that
turn the ``timestep`` argument of each call into per-sample gates for all
layers. A caller then just calls ``unet(sample, timestep, encoder_hidden_states)``
with a scalar or per-sample ``(S,)`` timestep (CFG-style doubled batches too).

Typical training use::

    names = inject_adapters(unet, AdapterConfig(r=16, lora_alpha=16))
    freeze_base(unet)
    optimizer = torch.optim.AdamW(adapter_parameters(unet), lr=1e-4)
    eps_theta = unet(z_t, t, c).sample
    with torch.no_grad(), adapters_disabled(unet):   # reference model, same weights
        eps_ref = unet(z_t, t, c).sample
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import torch.nn as nn
from peft.tuners.tuners_utils import BaseTunerLayer

from apo_fast.adapters.gates import build_gate
from apo_fast.adapters.layer import (
    GatedLoRAConv2d,
    GatedLoRALinear,
    is_packed_base,
)
from apo_fast.adapters.mask_input import attach_mask_input, get_mask_input
from apo_fast.adapters.state import (
    GATE_MODULE_NAME,
    attach_gate,
    get_gate_state,
    install_gate,
)
from apo_fast.config.adapter import (
    DEFAULT_TARGET_MODULES,
    AdapterConfig,
    GateConfig,
    module_matches,
)

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "AdapterConfig",
    "inject_adapters",
    "gated_layers",
    "adapter_parameters",
    "freeze_base",
    "set_adapters_enabled",
    "adapters_disabled",
    "set_gate",
]

# The adapter layer for each base layer type that takes one.
LAYER_FOR = {nn.Linear: GatedLoRALinear, nn.Conv2d: GatedLoRAConv2d}


def _layer_class(module: nn.Module):
    """The adapter layer for ``module``: exact types, plus the packed layers of a
    ``model.base_quantization`` base (bitsandbytes' Linear4bit / Linear8bitLt and apo_fast's
    Float8Linear subclass nn.Linear; Float8Conv2d subclasses nn.Conv2d)."""
    if type(module) in LAYER_FOR:
        return LAYER_FOR[type(module)]
    if is_packed_base(module):
        return GatedLoRAConv2d if isinstance(module, nn.Conv2d) else GatedLoRALinear
    return None


def _split_parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, child = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), child


def inject_adapters(model: nn.Module, config: AdapterConfig | None = None) -> list[str]:
    """Wrap the target ``nn.Linear`` / ``nn.Conv2d`` layers of ``model`` in
    :class:`GatedLoRALinear` / :class:`GatedLoRAConv2d`.

    Args:
        model: a diffusers ``UNet2DConditionModel`` or any module whose
            ``forward(sample, timestep, ...)`` takes a ``timestep`` (a constant
            gate needs no timestep).
        config: the adapters (default ``AdapterConfig()``: r 4, rank-prefix gate,
            to_q/to_k/to_v/to_out.0).

    Returns:
        The module paths that were wrapped, in ``named_modules`` order.

    The base weights keep their ``requires_grad``; call :func:`freeze_base`.
    Adapter weights are created on each base layer's device and dtype.
    """
    config = AdapterConfig() if config is None else config
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be an AdapterConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if get_gate_state(model) is not None or hasattr(model, GATE_MODULE_NAME):
        raise ValueError(f"{type(model).__name__} already has time-gated adapters")
    targets = []
    for path, module in model.named_modules():
        if not path or not module_matches(path, config.target_modules):
            continue
        if isinstance(module, BaseTunerLayer):
            raise ValueError(
                f"module {path!r} is already an adapter layer ({type(module).__name__}); "
                "use convert_peft_to_gated for models that already carry peft LoRA"
            )
        if _layer_class(module) is None:
            raise TypeError(
                f"target module {path!r} is a {type(module).__name__}; only nn.Linear (also bitsandbytes' 4/8-bit "
                "linears) and nn.Conv2d layers take time-gated adapters"
            )
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            raise TypeError(f"target module {path!r} is a grouped convolution (groups={module.groups}); "
                            "only groups=1 takes an adapter")
        if not module.weight.is_floating_point() and not is_packed_base(module):
            raise TypeError(f"target module {path!r} has a non-floating-point weight in a format the adapters do "
                            "not read (bitsandbytes' Linear4bit / Linear8bitLt and apo_fast's fp8 layers are read)")
        targets.append(path)
    if not targets:
        raise ValueError(
            f"no module of {type(model).__name__} matches target_modules {list(config.target_modules)}"
        )
    state = attach_gate(model, build_gate(config.gate, config.r), ranks={config.r})
    state.adapter_config = config
    for path in targets:
        parent, child = _split_parent(model, path)
        base = getattr(parent, child)
        layer = _layer_class(base)(
            base,
            adapter_name=config.adapter_name,
            r=config.r,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            gate_state=state,
            backend=config.backend,
        )
        setattr(parent, child, layer)
    if config.mask_input:
        attach_mask_input(model, time=config.mask_time)
    return targets


def set_gate(model: nn.Module, gate: GateConfig) -> None:
    """Give every :class:`GatedLoRALinear` of ``model`` the gate ``gate``.

    Replaces ``model.taca_gate`` (or attaches one, with the timestep hooks, to
    a model that has none; a constant gate registers nothing). A replaced
    learned gate starts fresh: build optimizers after calling this.
    """
    if not isinstance(gate, GateConfig):
        raise TypeError(f"gate must be a GateConfig, got {type(gate).__name__}")
    layers = [layer for _, layer in gated_layers(model)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no time-gated adapter layers")
    ranks = sorted({rank for layer in layers for rank in layer.r.values()})
    for rank in ranks:
        gate.rank_range(rank)
    if any(layer.merged for layer in layers) and not gate.is_constant:
        raise ValueError("cannot attach a non-constant gate to merged adapter layers; unmerge them first")
    module = build_gate(gate, max(ranks))
    state = get_gate_state(model)
    if state is None:
        state = attach_gate(model, module, ranks=ranks)
    else:
        install_gate(model, state, module, ranks=ranks)
        if state.adapter_config is not None:
            state.adapter_config = dataclasses.replace(state.adapter_config, gate=gate)
    for layer in layers:
        layer.gate_state = state


def gated_layers(model: nn.Module) -> list[tuple[str, GatedLoRALinear]]:
    """``(path, layer)`` for every :class:`GatedLoRALinear` in ``model``."""
    return [(path, m) for path, m in model.named_modules() if isinstance(m, GatedLoRALinear)]


def _adapter_layers(model: nn.Module) -> list[BaseTunerLayer]:
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no adapter layers")
    return layers


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable adapter parameters: ``lora_A``/``lora_B`` of each adapter
    layer's active adapters, the learned gate's parameters and the mask input's (if any)."""
    params: list[nn.Parameter] = []
    seen: set[int] = set()

    def add(p: nn.Parameter) -> None:
        if id(p) not in seen:
            seen.add(id(p))
            params.append(p)

    for layer in _adapter_layers(model):
        for name in layer.active_adapters:
            for dict_name in ("lora_A", "lora_B"):
                modules = getattr(layer, dict_name, {})
                if name in modules:
                    for p in modules[name].parameters():
                        add(p)
    gate = getattr(model, GATE_MODULE_NAME, None)
    if isinstance(gate, nn.Module):
        for p in gate.parameters():
            add(p)
    mask_input = get_mask_input(model)
    if mask_input is not None:
        for p in mask_input.parameters():
            add(p)
    return params


def freeze_base(model: nn.Module) -> int:
    """Make only :func:`adapter_parameters` trainable; return their element count."""
    trainable = {id(p) for p in adapter_parameters(model)}
    count = 0
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
        count += p.numel() if id(p) in trainable else 0
    return count


def set_adapters_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every adapter layer of ``model`` (ours and peft's) on or off.

    Unlike peft's ``enable_adapters``, this leaves ``requires_grad`` alone, so
    it is safe between the policy and reference passes of one training step.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    for layer in _adapter_layers(model):
        layer._disable_adapters = not enabled
    mask_input = get_mask_input(model)
    if mask_input is not None:
        mask_input.enabled = enabled


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Context in which ``model`` runs without adapters (the reference model,
    same weights); each layer's previous state is restored on exit.

    Unmerged time-gated layers are switched off as data (their ``adapter_switch``
    buffer), so a ``torch.compile``-d model runs its policy and reference passes
    through the same traced code; other adapter layers (peft's, merged ones) get
    peft's ``disable_adapters`` flag."""
    switched, flagged = [], []
    for layer in _adapter_layers(model):
        (switched if isinstance(layer, GatedLoRALinear) and not layer.merged else flagged).append(layer)
    previous_flags = [layer._disable_adapters for layer in flagged]
    previous_switches = [layer._switched_off for layer in switched]
    mask_input = get_mask_input(model)
    previous_mask = mask_input.enabled if mask_input is not None else None
    if mask_input is not None:
        mask_input.enabled = False
    for layer in flagged:
        layer._disable_adapters = True
    for layer in switched:
        layer.set_switch(False)
    try:
        yield model
    finally:
        for layer, flag in zip(flagged, previous_flags):
            layer._disable_adapters = flag
        for layer, off in zip(switched, previous_switches):
            layer.set_switch(not off)
        if mask_input is not None:
            mask_input.enabled = previous_mask
