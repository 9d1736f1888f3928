"""DeepSpeed plumbing of the training loop: the engine config, ZeRO-3 parameter access,
per-rank data slices, metrics averaged over ranks, and the optimizer inside the engine.

No module-level state: functions take what they work on, and the one stateful helper
(:class:`UNetOutputKeeper`) belongs to a trainer.

ZeRO-3 and the adapter layers
-----------------------------
ZeRO-3 keeps each parameter as a flat 1/world shard and gathers the full tensor
only around the ``forward``/``backward`` of the module that *owns* it.
:class:`~apo_fast.adapters.GatedLoRALinear` runs one fused op on the frozen base
weight and the adapter weights (``gated_lora_linear(x, base.weight, ...)``),
reading parameters of its submodules (``base_layer``, ``lora_A``, ``lora_B``)
without calling them. :func:`register_adapter_params_for_zero3` declares those
parameters external parameters of the adapter layer, so ZeRO-3 gathers them in
the layer's own pre-forward (and pre-backward) hook and releases them after:
the fused path stays one op, and the frozen base weights stay partitioned
between uses (DeepSpeed partitions every parameter of the model it is given,
trainable or not). The reference pass (adapters disabled) calls
``base_layer`` itself and uses the same gathered weights. Gradient checkpointing
under ZeRO-3 needs :class:`UNetOutputKeeper` (see there).
"""
from __future__ import annotations

import contextlib
import copy
import os
import socket
import sys
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from apo_fast.config.choices import MIXED_PRECISIONS

if TYPE_CHECKING:
    from apo_fast.config import APOConfig
    from apo_fast.training.model import APOModel

__all__ = [
    "OWNED_DEEPSPEED_KEYS",
    "UNetOutputKeeper",
    "average_over_ranks",
    "check_precision_supported",
    "client_optimizer",
    "export_parameters",
    "gathered",
    "merge_deepspeed_overrides",
    "rank_slice",
    "register_adapter_params_for_zero3",
]

#: DeepSpeed config entries set from ``train.*`` fields; ``train.deepspeed`` may not override them.
OWNED_DEEPSPEED_KEYS = {
    "train_batch_size": "train.batch_size",
    "train_micro_batch_size_per_gpu": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_clipping": "optim.max_grad_norm",
    "zero_optimization.stage": "train.zero_stage",
    "zero_optimization.offload_optimizer": "train.offload_optimizer",
    "zero_optimization.offload_param": "train.offload_params",
    "bf16.enabled": "train.mixed_precision",
    "fp16.enabled": "train.mixed_precision",
    "optimizer": "optim.name (the client optimizer is built from optim.*)",
    "scheduler": "optim.warmup_steps",
}


def merge_deepspeed_overrides(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` merged in recursively (mappings merge, other values replace).

    Raises:
        TypeError: ``overrides`` (``train.deepspeed``) is not a mapping.
        ValueError: an override sets an entry that a ``train.*``/``optim.*`` field owns
            (:data:`OWNED_DEEPSPEED_KEYS`).
    """
    if not isinstance(overrides, dict):
        raise TypeError(
            f"train.deepspeed must be a mapping of DeepSpeed config entries, got {type(overrides).__name__}"
        )
    for dotted, owner in OWNED_DEEPSPEED_KEYS.items():
        node = overrides
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            raise ValueError(f"train.deepspeed.{dotted} is set from {owner}; change that instead")
    out = copy.deepcopy(base)

    def merge(dst: dict, src: dict) -> None:
        for key, value in src.items():
            if isinstance(value, dict) and isinstance(dst.get(key), dict):
                merge(dst[key], value)
            else:
                dst[key] = copy.deepcopy(value)

    merge(out, overrides)
    return out


def check_precision_supported(mixed_precision: str, device: torch.device) -> None:
    """Raise a clear error for a precision the device cannot train in, before any work.

    fp16 training needs CUDA: DeepSpeed's CPU accelerator refuses fp16 ("Type fp16
    is not supported"). bf16 runs on CPU and on CUDA GPUs with bf16 support (Ampere+).
    """
    if mixed_precision not in MIXED_PRECISIONS:
        raise ValueError(f"train.mixed_precision must be no, fp16 or bf16; got {mixed_precision!r}")
    if mixed_precision == "fp16" and device.type != "cuda":
        raise ValueError(
            f"train.mixed_precision fp16 needs a CUDA device (DeepSpeed has no fp16 training on {device.type}); "
            "use bf16 or no there"
        )
    if mixed_precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"train.mixed_precision bf16: {torch.cuda.get_device_name(device)} has no bf16 support; use fp16"
        )


def register_adapter_params_for_zero3(model: nn.Module) -> int:
    """Declare each adapter layer's base and adapter weights external ZeRO-3 parameters of it
    (and a learned gate's parameters those of the gate module), so that DeepSpeed never has to
    discover them on access (a synchronous gather, only inside the engine's forward).

    Call after ``deepspeed.initialize`` with ZeRO stage 3 (see the module docstring).
    Returns the number of parameters registered.
    """
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    from apo_fast.adapters import gated_layers
    from apo_fast.adapters.state import GATE_MODULE_NAME

    count = 0
    gate = getattr(model, GATE_MODULE_NAME, None)
    if isinstance(gate, nn.Module):  # a learned gate reads its MLP's weight for device/dtype
        for p in gate.parameters():
            register_external_parameter(gate, p)
            count += 1
    for _, layer in gated_layers(model):
        params = [p for _, p in layer.base_layer.named_parameters()]
        for dict_name in ("lora_A", "lora_B"):
            for module in getattr(layer, dict_name).values():
                params.extend(module.parameters())
        for p in params:
            register_external_parameter(layer, p)
            count += 1
    return count


class UNetOutputKeeper:
    """Keeps the UNet's own output tensors alive from its forward until :meth:`clear`.

    ZeRO-3 hooks each module's backward by replacing the module's output tensors
    with fresh ones (``detach`` + an autograd function) in a forward hook. The time
    gate of the adapters tracks a grad-enabled forward by a weak reference to the
    UNet's output, to know which forward a gradient-checkpointing recompute belongs
    to; under ZeRO-3 that tensor would die as soon as DeepSpeed replaced it, and a
    recompute would find no pending forward. This forward hook runs before the
    gate's and DeepSpeed's (``prepend``) and holds that tensor (a view of the same
    storage: no extra memory) until the step's backward is done.

    Usage: ``keeper = UNetOutputKeeper.attach(unet)``; ``keeper.clear()`` after backward.
    """

    def __init__(self) -> None:
        self.held: list[torch.Tensor] = []

    @classmethod
    def attach(cls, unet: nn.Module) -> UNetOutputKeeper:
        keeper = cls()
        unet.register_forward_hook(keeper, prepend=True)
        return keeper

    def __call__(self, module: nn.Module, args, output) -> None:
        if not torch.is_grad_enabled():
            return
        if isinstance(output, dict):
            values = list(output.values())
        else:
            values = list(output) if isinstance(output, (tuple, list)) else [output]
        self.held.extend(v for v in values if isinstance(v, torch.Tensor) and v.requires_grad)

    def clear(self) -> None:
        self.held.clear()


def export_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What an adapter export reads: every ``lora_A``/``lora_B`` weight, the learned gate
    (``unet.taca_gate``), the mask input (``unet.apo_mask_input``) and the condition embeddings of an :class:`APOModel`-like model
    (``model.unet``, ``model.conditions``); not the frozen base weights."""
    from apo_fast.adapters import gated_layers
    from apo_fast.adapters.mask_input import get_mask_input
    from apo_fast.adapters.state import GATE_MODULE_NAME

    unet = model.unet
    params: list[nn.Parameter] = []
    for _, layer in gated_layers(unet):
        for dict_name in ("lora_A", "lora_B"):
            for module in getattr(layer, dict_name).values():
                params.extend(module.parameters())
    gate = getattr(unet, GATE_MODULE_NAME, None)
    if isinstance(gate, nn.Module):
        params.extend(gate.parameters())
    mask_input = get_mask_input(unet)
    if mask_input is not None:
        params.extend(mask_input.parameters())
    params.extend(model.conditions.parameters())
    seen: set[int] = set()
    return [p for p in params if not (id(p) in seen or seen.add(id(p)))]


@contextlib.contextmanager
def gathered(params: Iterable[nn.Parameter], zero_stage: int) -> Iterator[None]:
    """Full tensors of ``params`` on every rank inside the block (ZeRO-3 gathers its
    partitions, read-only); other stages keep full parameters and need nothing."""
    if zero_stage != 3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(params), modifier_rank=None):
        yield


def rank_slice(tensor: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rows ``rank * n / world .. (rank + 1) * n / world`` of a global batch of ``n`` rows."""
    n = tensor.shape[0]
    if n % world:
        raise ValueError(f"a global batch of {n} rows does not split over {world} ranks")
    per = n // world
    return tensor[rank * per : (rank + 1) * per]


def average_over_ranks(metrics: dict[str, float]) -> dict[str, float]:
    """Each metric averaged over the ranks (every rank holds the same keys and an equal
    share of the global batch, so this is the global batch's value)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return dict(metrics)
    world = torch.distributed.get_world_size()
    if world == 1 or not metrics:
        return dict(metrics)
    keys = sorted(metrics)
    values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        values = values.cuda()
    torch.distributed.all_reduce(values)
    return {k: float(v) / world for k, v in zip(keys, values.cpu().tolist())}


def client_optimizer(optimizer) -> torch.optim.Optimizer:
    """The client optimizer (e.g. bitsandbytes ``AdamW8bit``) inside DeepSpeed's wrappers
    (ZeRO, fp16/bf16 optimizers), whose ``state`` holds the moments."""
    seen = 0
    while type(optimizer).__module__.startswith("deepspeed.runtime") and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
        seen += 1
        if seen > 8:
            break
    return optimizer
# --------------------------------------------------------------------------- DeepSpeed


def ensure_distributed_env() -> bool:
    """Set the single-process rendezvous variables when no launcher did. Returns True if set here."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return False
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return True


def rank_device(device: torch.device) -> torch.device:
    """``cuda`` without an index means this rank's GPU (``LOCAL_RANK`` of the launcher)."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


def clips_outside_deepspeed(cfg: APOConfig) -> bool:
    """Whether the trainer clips the gradient norm itself rather than DeepSpeed.

    At ZeRO stage 0 in fp32, DeepSpeed clips with a Python loop over every module
    parameter (the frozen base UNet included); the trainer then clips the
    trainable parameters with torch's foreach ``clip_grad_norm_`` instead (the
    same rule: scale by ``max_norm / (norm + 1e-6)`` when the norm exceeds
    ``max_norm``). ZeRO 1-3 and the bf16/fp16 optimizers keep DeepSpeed's
    clipping: there the gradients are partitioned or held by DeepSpeed.
    """
    return cfg.train.zero_stage == 0 and cfg.train.mixed_precision == "no" and cfg.optim.max_grad_norm > 0


def deepspeed_config(cfg: APOConfig, micro_batch: int) -> dict:
    """The DeepSpeed config of a run: ZeRO stage, offload, precision and batch from
    ``cfg.train``, then ``cfg.train.deepspeed`` merged over it (bucket sizes, ZeRO-3
    prefetch/persistence, loss-scale settings...; entries that ``train.*`` fields
    own are refused with a ValueError naming the field).

    The optimizer is always the client optimizer of :func:`build_optimizer`; with
    ZeRO, bitsandbytes' 8-bit optimizers are "untested" to DeepSpeed and need
    ``zero_allow_untested_optimizer``, and a client optimizer other than
    DeepSpeedCPUAdam under ZeRO-Offload needs ``zero_force_ds_cpu_optimizer: false``.
    """
    t = cfg.train
    zero: dict = {"stage": t.zero_stage}
    if t.zero_stage >= 2:
        zero.update(contiguous_gradients=True, overlap_comm=False, reduce_scatter=True)
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if t.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if t.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True)
    base = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": 0.0 if clips_outside_deepspeed(cfg) else max(cfg.optim.max_grad_norm, 0.0),
        "zero_optimization": zero,
        "bf16": {"enabled": t.mixed_precision == "bf16"},
        # fp16: dynamic loss scaling (loss_scale 0), starting at 2**12.
        "fp16": {"enabled": t.mixed_precision == "fp16", "loss_scale": 0, "initial_scale_power": 12},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return merge_deepspeed_overrides(base, t.deepspeed)


def build_optimizer(cfg: APOConfig, model: APOModel):
    """The client optimizer over the trainable parameters (adapters, gates, conditions)."""
    o = cfg.optim
    cond_params = [p for p in model.conditions.parameters() if p.requires_grad]
    cond_ids = {id(p) for p in cond_params}
    other = [p for p in model.parameters() if p.requires_grad and id(p) not in cond_ids]
    groups = [{"params": other, "lr": o.lr}]
    if cond_params and (o.cond_lr is None or o.cond_lr > 0):
        groups.append({"params": cond_params, "lr": o.cond_lr if o.cond_lr is not None else o.lr})
    kwargs = dict(betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    if o.name == "adamw":
        # torch's fused AdamW (one kernel over all tensors, CPU and CUDA): same update as the loop.
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    if o.name == "ds_cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    import bitsandbytes as bnb

    if o.name == "adamw8bit":
        return bnb.optim.AdamW8bit(groups, **kwargs)
    if o.name == "paged_adamw8bit":
        return bnb.optim.PagedAdamW8bit(groups, **kwargs)
    if o.name == "lion8bit":
        return bnb.optim.Lion8bit(groups, betas=tuple(o.betas), weight_decay=o.weight_decay)
    raise ValueError(f"optim.name {o.name!r} is not supported")


def shutdown_distributed() -> None:
    """Tear down the process group at the end of a program (two-rank gloo runs can abort at
    interpreter exit otherwise).

    Goes through DeepSpeed when it set the group up, so DeepSpeed also drops its cached
    groups and a later trainer in the same process starts cleanly on a new group.
    """
    if not torch.distributed.is_initialized():
        return
    torch.distributed.barrier()
    ds_comm = sys.modules.get("deepspeed.comm.comm")
    if ds_comm is not None and ds_comm.cdb is not None and ds_comm.cdb.is_initialized():
        ds_comm.destroy_process_group()
    else:
        torch.distributed.destroy_process_group()


