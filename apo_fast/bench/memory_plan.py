"""Peak GPU memory per rank of an APO training step, planned before anything is allocated.

``plan_memory(cfg)`` builds the UNet on the ``meta`` device (shapes, no storage),
counts its parameters exactly, runs one traced APO policy forward on meta
tensors to measure what autograd would keep for the backward pass, and adds the
weights, adapter, gradient and optimizer bytes under the chosen ZeRO stage,
offload and precision. The result is a :class:`MemoryPlan` with a breakdown in
bytes, ``fits(gpu_gib)`` and ``to_markdown()``.

Config keys (a plain dict; every key is optional)
-------------------------------------------------
=========================  =====================  ===============================================
key                        default                meaning
=========================  =====================  ===============================================
``unet``                   ``"sd15"``             preset name (:data:`UNET_PRESETS`) or a
                                                  ``UNet2DConditionModel`` config dict
``resolution``             preset size x 8        image size in pixels, int or (H, W); latents are
                                                  ``resolution / vae_scale_factor``
``latent_size``            None                   latent size int or (H, W); replaces ``resolution``
``vae_scale_factor``       8                      pixels per latent
``batch_size``             1                      samples per rank per micro-batch
``paired``                 False                  paired (Diffusion-DPO) mode: the UNet sees 2x batch
``condition_tokens``       77                     sequence length of ``encoder_hidden_states``
``r``                      16                     adapter (LoRA) rank (``AdapterConfig.r``;
                                                  ``rank`` is read as ``r``)
``target_modules``         to_q,to_k,to_v,to_out.0  module-name suffixes that get an adapter
                                                  (``nn.Linear`` or ``nn.Conv2d``)
``extra_trainable_params`` 0                      other trainable parameters (condition embeddings)
``precision``              ``"bf16"``             ``fp32`` (alias ``no``), ``fp16`` or ``bf16``
``gradient_checkpointing`` False                  diffusers' checkpointing of resnets and
                                                  transformer blocks
``attention``              ``"sdpa"``             ``sdpa``/``xformers``/``auto`` (fused, memory
                                                  efficient) or ``naive`` (materialises scores)
``optimizer``              ``"adamw"``            ``adamw``, ``adamw8bit``, ``paged_adamw8bit``,
                                                  ``lion8bit`` or ``ds_cpu_adam`` (needs offload)
``zero_stage``             0                      DeepSpeed ZeRO stage 0..3
``world_size``             1                      ranks sharing the ZeRO partitions
``offload_optimizer``      False                  optimizer state to CPU (stage >= 2)
``offload_params``         False                  parameters to CPU (stage 3)
``reduce_bucket_elements`` 5e8                    DeepSpeed ``reduce_bucket_size`` (grad buckets)
``prefetch_elements``      5e7                    DeepSpeed ``stage3_prefetch_bucket_size``
``cuda_context_mib``       500                    CUDA context + kernels (not in the allocator)
``kernel_workspace_mib``   128                    cuBLAS/cuDNN workspaces
``fragmentation``          1.10                   caching-allocator reserve / allocated ratio
``extra_mib``              0                      anything else on the GPU (VAE, text encoder)
``base_quantization``      ``"none"``             the frozen base's linears in ``nf4`` / ``int8``
                                                  (bitsandbytes formats) or ``fp8`` (e4m3, row
                                                  scales); with ``nf4`` / ``fp8`` the convolutions
                                                  in fp8 too (``model.base_quantization``)
``base_double_quant``      False                  NF4 with double-quantized absmax
=========================  =====================  ===============================================

How activations are estimated
-----------------------------
The UNet runs once on ``meta`` tensors of the real batch, latent size and dtype,
with the adapter emulated exactly as peft computes it (``y = W x + B A x``, only
``A``/``B`` trainable) and a ``saved_tensors_hooks`` pair that records every
tensor autograd keeps for backward, keyed by storage so views and tensors saved
by several ops count once; parameter storages are excluded. This is the sum of
what each leaf module keeps, with PyTorch's own rules deciding what is kept: a
frozen ``Linear`` keeps nothing, a frozen conv keeps its input, layers before
the first adapter keep nothing at all. Memory-efficient attention (SDPA's fused
kernels, xformers) is traced as a kernel that keeps q, k, v, the output and the
fp32 log-sum-exp per query; ``naive`` runs diffusers' ``AttnProcessor``, which
keeps the (batch*heads, Nq, Nk) probabilities.

With gradient checkpointing, each checkpoint unit (the modules diffusers passes
to its checkpoint function: resnets and transformer blocks) keeps only its
inputs; at the peak one unit is recomputed, so the estimate is

    kept outside units  U  inputs of units that build a graph  +  max over units of their own saved tensors.

Peak = static state (weights, adapter, grads, optimizer, communication and ZeRO-3
gather buffers) + max(backward phase, reference phase), where the backward phase
is the saved activations plus a transient of two largest activations (gradient
in and out of one op) and the attention backward buffers, and the reference
phase (no-grad forward of the reference, before the policy forward) is the live
skip connections plus two largest activations and the attention forward buffers.
``overhead`` = CUDA context + (fragmentation - 1) x allocated + ``extra_mib``.
The VAE and text encoders are not counted (latents and conditions are cached).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from apo_fast.bench.activation_trace import (
    ActivationTrace,
    adapter_shapes,
    build_meta_unet,
    context_dim,
    count_params_by_module_type,
    trace_activations,
)
from apo_fast.config.choices import (
    BASE_QUANTIZATIONS,
    DEFAULT_TARGET_MODULES,
    OPTIMIZERS,
)
from apo_fast.config.unet_presets import UNET_PRESETS, VAE_SCALE_FACTOR, unet_config
from apo_fast.models.quantize import NF4_BLOCKSIZE, quantized_bytes

MIB = 2**20
GIB = 2**30

PRECISIONS = {"fp32": torch.float32, "no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ATTENTION_KINDS = ("sdpa", "xformers", "auto", "naive")

# Optimizer state per trainable element: (number of moment tensors, 8-bit?).
_OPTIMIZER_STATES = {
    "adamw": (2, False),
    "adamw8bit": (2, True),
    "paged_adamw8bit": (2, True),
    "lion8bit": (1, True),
    "ds_cpu_adam": (2, False),
}
# bitsandbytes keeps tensors below this size in 32-bit state, and one fp32
# absmax per block of 256 elements per 8-bit state (bitsandbytes 0.4x/0.5x).
BNB_MIN_8BIT_SIZE = 4096
BNB_BLOCKSIZE = 256

_DEFAULTS: dict[str, Any] = {
    "unet": "sd15",
    "resolution": None,
    "latent_size": None,
    "vae_scale_factor": VAE_SCALE_FACTOR,
    "batch_size": 1,
    "paired": False,
    "condition_tokens": 77,
    "r": 16,
    "target_modules": DEFAULT_TARGET_MODULES,
    "extra_trainable_params": 0,
    "precision": "bf16",
    "gradient_checkpointing": False,
    "attention": "sdpa",
    "optimizer": "adamw",
    "zero_stage": 0,
    "world_size": 1,
    "offload_optimizer": False,
    "offload_params": False,
    "reduce_bucket_elements": 500_000_000,
    "prefetch_elements": 50_000_000,
    "cuda_context_mib": 500.0,
    "kernel_workspace_mib": 128.0,
    "fragmentation": 1.10,
    "extra_mib": 0.0,
    "base_quantization": "none",
    "base_double_quant": False,
}

BREAKDOWN_FIELDS = ("weights", "trainable", "grads", "optimizer", "activations", "workspace", "overhead", "total")


@dataclass(frozen=True)
class MemoryPlan:
    """Estimated peak GPU memory of one rank, in bytes.

    ``weights`` frozen base UNet (this rank's share), ``trainable`` adapter
    weights in compute precision, ``grads`` their gradients, ``optimizer``
    optimizer state plus fp32 master weights, ``activations`` tensors saved for
    backward, ``workspace`` transient buffers at the peak, ``overhead`` CUDA
    context, allocator fragmentation and extras; ``total`` is their sum.
    ``cpu_offload`` is what ZeRO-Offload keeps in host memory instead.
    """

    weights: int
    trainable: int
    grads: int
    optimizer: int
    activations: int
    workspace: int
    overhead: int
    total: int
    cpu_offload: int
    params_base: int
    params_trainable: int
    params_by_module_type: dict[str, int]
    activations_by_block: dict[str, int]
    activations_no_checkpointing: int
    activations_checkpointing: int
    config: dict[str, Any] = field(repr=False)

    @property
    def allocated(self) -> int:
        """Predicted ``torch.cuda.max_memory_allocated`` (total without context, fragmentation, extras)."""
        return self.total - self.overhead

    def breakdown(self) -> dict[str, int]:
        """The breakdown lines in bytes, in display order."""
        return {name: getattr(self, name) for name in BREAKDOWN_FIELDS}

    def fits(self, gpu_gib: float) -> bool:
        """Whether ``total`` fits in a GPU of ``gpu_gib`` GiB (2**30 bytes)."""
        if isinstance(gpu_gib, bool) or not isinstance(gpu_gib, (int, float)) or not gpu_gib > 0:
            raise ValueError(f"gpu_gib must be a positive number of GiB, got {gpu_gib!r}")
        return self.total <= gpu_gib * GIB

    def to_markdown(self, gpu_gib: float | None = None) -> str:
        """A Markdown report: the config, a table of every breakdown line (MiB and GiB), the verdict."""
        c = self.config
        lh, lw = c["latent_hw"]
        lines = [
            f"### Memory plan: {c['unet_name']}, latent {lh}x{lw}, batch {c['batch_size']}"
            f"{' (paired: x2)' if c['paired'] else ''}, rank {c['r']}, {c['precision']}",
            "",
            f"- parameters: base {self.params_base:,}, trainable {self.params_trainable:,}"
            + ("" if c["base_quantization"] == "none" else
               f"; the base's linear layers in {c['base_quantization']}"
               f"{' (double-quantized absmax)' if c['base_double_quant'] else ''}"
               f"{', convolutions in fp8 e4m3' if c['base_quantization'] in ('nf4', 'fp8') else ''}"
               f", the rest in {c['precision']}"),
            f"- attention {c['attention']}, gradient checkpointing {'on' if c['gradient_checkpointing'] else 'off'}, "
            f"optimizer {c['optimizer']}",
            f"- ZeRO stage {c['zero_stage']} on {c['world_size']} rank(s), offload optimizer "
            f"{c['offload_optimizer']}, offload params {c['offload_params']}",
            f"- activations without / with checkpointing: {self.activations_no_checkpointing / MIB:,.1f} / "
            f"{self.activations_checkpointing / MIB:,.1f} MiB",
            "",
            "| component | MiB | GiB |",
            "|---|---:|---:|",
        ]
        for name, value in self.breakdown().items():
            label = f"**{name}**" if name == "total" else name
            lines.append(f"| {label} | {value / MIB:,.1f} | {value / GIB:.2f} |")
        lines.append(f"| cpu_offload (host) | {self.cpu_offload / MIB:,.1f} | {self.cpu_offload / GIB:.2f} |")
        if gpu_gib is not None:
            verdict = "fits" if self.fits(gpu_gib) else "does NOT fit"
            lines += ["", f"Verdict: {self.total / GIB:.2f} GiB {verdict} in a {gpu_gib:g} GiB GPU."]
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- config


def _as_hw(key: str, value: Any) -> tuple[int, int]:
    if isinstance(value, bool):
        raise TypeError(f"{key} must be an int or a pair (H, W), got {value!r}")
    if isinstance(value, int):
        value = (value, value)
    if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise TypeError(f"{key} must be an int or a pair (H, W) of ints, got {value!r}")
    if min(value) <= 0:
        raise ValueError(f"{key} must be positive, got {value!r}")
    return int(value[0]), int(value[1])


def _check_int(cfg: dict, key: str, low: int, high: int | None = None) -> None:
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{key} must be an int, got {type(v).__name__} {v!r}")
    if v < low or (high is not None and v > high):
        raise ValueError(f"{key} must be in [{low}, {high if high is not None else 'inf'}], got {v}")


def _check_number(cfg: dict, key: str, low: float) -> None:
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < low:
        raise ValueError(f"{key} must be a finite number >= {low}, got {v!r}")


def _check_bool(cfg: dict, key: str) -> None:
    if not isinstance(cfg[key], bool):
        raise TypeError(f"{key} must be a bool, got {type(cfg[key]).__name__} {cfg[key]!r}")


def _check_choice(cfg: dict, key: str, choices) -> None:
    if cfg[key] not in choices:
        raise ValueError(f"{key} must be one of {list(choices)}, got {cfg[key]!r}")


def normalize_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Fill defaults and validate a planner config (see the module docstring for the keys).

    Adds ``unet_config`` (dict), ``unet_name`` and ``latent_hw`` (H, W). Raises
    ``TypeError``/``ValueError`` naming the key on a bad value, and on unknown keys.
    """
    if not isinstance(cfg, Mapping):
        raise TypeError(f"cfg must be a mapping of planner settings, got {type(cfg).__name__}")
    if "rank" in cfg:  # the 0.1 name of ``r``
        if "r" in cfg:
            raise ValueError("give the adapter rank once: r (rank is its old name)")
        cfg = {("r" if k == "rank" else k): v for k, v in cfg.items()}
    unknown = sorted(set(cfg) - set(_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown memory-plan keys {unknown}; expected a subset of {sorted(_DEFAULTS)}")
    out = {**_DEFAULTS, **cfg}
    out["unet_config"] = unet_config(out["unet"])
    out["unet_name"] = out["unet"] if isinstance(out["unet"], str) else "custom UNet"
    for key, low in (("batch_size", 1), ("condition_tokens", 1), ("r", 1), ("extra_trainable_params", 0),
                     ("vae_scale_factor", 1), ("world_size", 1), ("reduce_bucket_elements", 1), ("prefetch_elements", 0)):
        _check_int(out, key, low)
    _check_int(out, "zero_stage", 0, 3)
    for key in ("paired", "gradient_checkpointing", "offload_optimizer", "offload_params"):
        _check_bool(out, key)
    for key, low in (("cuda_context_mib", 0.0), ("kernel_workspace_mib", 0.0), ("extra_mib", 0.0), ("fragmentation", 1.0)):
        _check_number(out, key, low)
    _check_choice(out, "precision", PRECISIONS)
    out["precision"] = "fp32" if out["precision"] == "no" else out["precision"]
    _check_choice(out, "attention", ATTENTION_KINDS)
    _check_choice(out, "optimizer", OPTIMIZERS)
    _check_choice(out, "base_quantization", BASE_QUANTIZATIONS)
    _check_bool(out, "base_double_quant")
    if out["base_double_quant"] and out["base_quantization"] != "nf4":
        raise ValueError("base_double_quant is an NF4 option (base_quantization: nf4)")
    if out["base_quantization"] != "none" and out["zero_stage"] == 3:
        raise ValueError("a quantized base (base_quantization) cannot be partitioned by ZeRO-3; use zero_stage 0-2")
    targets = out["target_modules"]
    if isinstance(targets, str) or not all(isinstance(t, str) and t for t in targets) or not targets:
        raise TypeError(f"target_modules must be a non-empty list of module-name suffixes, got {targets!r}")
    out["target_modules"] = tuple(targets)
    if out["offload_optimizer"] and out["zero_stage"] < 2:
        raise ValueError(f"offload_optimizer needs zero_stage 2 or 3, got zero_stage {out['zero_stage']}")
    if out["offload_params"] and out["zero_stage"] != 3:
        raise ValueError(f"offload_params needs zero_stage 3, got zero_stage {out['zero_stage']}")
    if out["optimizer"] == "ds_cpu_adam" and not out["offload_optimizer"]:
        raise ValueError("optimizer 'ds_cpu_adam' needs offload_optimizer: true (ZeRO-Offload)")
    if out["latent_size"] is not None:
        out["latent_hw"] = _as_hw("latent_size", out["latent_size"])
    elif out["resolution"] is not None:
        h, w = _as_hw("resolution", out["resolution"])
        f = out["vae_scale_factor"]
        if h % f or w % f:
            raise ValueError(f"resolution {h}x{w} must be a multiple of vae_scale_factor {f}")
        out["latent_hw"] = (h // f, w // f)
    else:
        size = out["unet_config"].get("sample_size", 64)
        out["latent_hw"] = _as_hw("unet sample_size", size)
    return out


# --------------------------------------------------------------------------- planner


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def optimizer_state_bytes(name: str, param_sizes: list[int], flat: bool) -> int:
    """Optimizer state bytes (moments only, no master weights) for trainable tensors of ``param_sizes``.

    8-bit optimizers (bitsandbytes) keep one uint8 per element per moment and one
    fp32 absmax per 256-element block, but 32-bit state for tensors under 4096
    elements; ``flat`` means ZeRO handed the optimizer one flattened partition.
    """
    moments, eight_bit = _OPTIMIZER_STATES[name]
    sizes = [sum(param_sizes)] if flat else param_sizes
    total = 0
    for n in sizes:
        if eight_bit and n >= BNB_MIN_8BIT_SIZE:
            total += moments * (n + 4 * _ceil_div(n, BNB_BLOCKSIZE))
        else:
            total += moments * 4 * n
    return total


def _base_weight_bytes(unet: nn.Module, c: dict, wb: int) -> tuple[int, int]:
    """(bytes of the frozen base, the largest transient dequantized weight): linear weights in the
    ``base_quantization`` format (apo_fast.models.quantize: what NF4 cannot hold stays), the
    convolutions in fp8 e4m3 for ``nf4`` and ``fp8``, the rest in the compute dtype.
    bitsandbytes dequantizes one layer's weight at a time for its matmul, and an fp8 convolution
    decodes its weight for its call."""
    kind = c["base_quantization"]
    total = sum(p.numel() for p in unet.parameters()) * wb
    if kind == "none":
        return total, 0
    buffer = 0
    for module in unet.modules():
        if type(module) is nn.Linear and not (kind == "nf4" and module.weight.numel() % NF4_BLOCKSIZE):
            n, rows, fmt = module.weight.numel(), module.out_features, kind
        elif type(module) is nn.Conv2d and kind in ("nf4", "fp8"):
            n, rows, fmt = module.weight.numel(), module.out_channels, "fp8"
        else:
            continue
        total += quantized_bytes(n, rows, fmt, c["base_double_quant"] and fmt == "nf4") - n * wb
        buffer = max(buffer, n * wb)
    return total, buffer


def plan_memory(cfg: Mapping[str, Any]) -> MemoryPlan:
    """Plan the peak GPU memory of one rank for an APO training config.

    Args:
        cfg: planner settings (keys and defaults in the module docstring), e.g.
            ``{"unet": "sd15", "resolution": 512, "batch_size": 4, "r": 16,
            "precision": "bf16", "gradient_checkpointing": True, "optimizer": "adamw8bit"}``.

    Returns:
        A :class:`MemoryPlan` (bytes per rank).

    Raises:
        TypeError, ValueError: a key is unknown or a value has the wrong type or range.
    """
    c = normalize_config(cfg)
    dtype = PRECISIONS[c["precision"]]
    wb = torch.empty((), dtype=dtype).element_size()
    mixed = c["precision"] != "fp32"
    stage, world = c["zero_stage"], c["world_size"]

    unet = build_meta_unet(c["unet_config"], dtype)
    params_by_type = count_params_by_module_type(unet)
    params_base = sum(params_by_type.values())
    base_bytes, dequant_buffer = _base_weight_bytes(unet, c, wb)
    largest_module = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in unet.modules()), default=0)
    shapes = adapter_shapes(unet, c["target_modules"], c["r"])
    del unet
    adapter_sizes = [math.prod(s) for pair in shapes.values() for s in pair]
    if c["extra_trainable_params"]:
        adapter_sizes.append(c["extra_trainable_params"])
    params_trainable = sum(adapter_sizes)

    batch = c["batch_size"] * (2 if c["paired"] else 1)
    trace = trace_activations(
        c["unet_config"], batch=batch, latent_hw=c["latent_hw"], condition_tokens=c["condition_tokens"],
        dtype=dtype, attention=c["attention"], targets=c["target_modules"], r=c["r"],
    )

    # Parameters: ZeRO-3 partitions every parameter, the frozen base included.
    train_share = _ceil_div(params_trainable, world) if stage == 3 else params_trainable
    cpu = 0
    base_share = _ceil_div(base_bytes, world) if stage == 3 else base_bytes
    if c["offload_params"]:
        cpu += base_share + train_share * wb
        weights, trainable = 0, 0
    else:
        weights, trainable = base_share, train_share * wb
    grads = (_ceil_div(params_trainable, world) if stage >= 2 else params_trainable) * wb

    # Optimizer: moments plus fp32 master weights under mixed precision, partitioned from stage 1.
    opt_sizes = [_ceil_div(params_trainable, world)] if stage >= 1 else adapter_sizes
    optimizer = optimizer_state_bytes(c["optimizer"], opt_sizes, flat=stage >= 1)
    if mixed:
        optimizer += sum(opt_sizes) * 4
    if c["offload_optimizer"]:
        cpu += optimizer
        optimizer = 0

    activations = trace.checkpointed if c["gradient_checkpointing"] else trace.saved
    backward_transient = 2 * trace.largest_output + trace.attention_backward
    reference_live = trace.skip_live + 2 * trace.largest_output + trace.attention_forward
    dynamic = max(backward_transient, reference_live - activations)
    h, w = c["latent_hw"]
    io = 6 * batch * 4 * h * w * 4 + batch * c["condition_tokens"] * context_dim(c["unet_config"]) * wb
    comm = min(c["reduce_bucket_elements"], params_trainable) * wb if world > 1 else 0
    gather = 0
    if stage == 3 and (world > 1 or c["offload_params"]):
        gather = min(params_base + params_trainable, largest_module + c["prefetch_elements"]) * wb
    workspace = dynamic + io + comm + gather + dequant_buffer + int(c["kernel_workspace_mib"] * MIB)

    allocated = weights + trainable + grads + optimizer + activations + workspace
    overhead = int(c["cuda_context_mib"] * MIB + (c["fragmentation"] - 1.0) * allocated + c["extra_mib"] * MIB)
    return MemoryPlan(
        weights=weights, trainable=trainable, grads=grads, optimizer=optimizer, activations=activations,
        workspace=workspace, overhead=overhead, total=allocated + overhead, cpu_offload=cpu,
        params_base=params_base, params_trainable=params_trainable, params_by_module_type=params_by_type,
        activations_by_block=trace.by_block, activations_no_checkpointing=trace.saved,
        activations_checkpointing=trace.checkpointed, config=c,
    )


__all__ = [
    "ATTENTION_KINDS", "ActivationTrace", "DEFAULT_TARGET_MODULES", "MemoryPlan", "OPTIMIZERS", "UNET_PRESETS",
    "adapter_shapes", "build_meta_unet", "context_dim", "count_params_by_module_type", "normalize_config",
    "optimizer_state_bytes", "plan_memory", "trace_activations",
]
