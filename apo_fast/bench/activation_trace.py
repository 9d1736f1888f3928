"""What autograd keeps during one APO policy forward of a UNet, traced on meta tensors (no
memory is allocated): the planner's activation estimate. See :mod:``apo_fast.bench.memory_plan``
("How activations are estimated") for the method.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from apo_fast.config.adapter import module_matches

# --------------------------------------------------------------------------- meta model


def build_meta_unet(unet_cfg: Mapping, dtype: torch.dtype = torch.float32) -> nn.Module:
    """``UNet2DConditionModel(**unet_cfg)`` on the meta device in ``dtype``, all parameters frozen."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**dict(unet_cfg))
    nn.Module.to(unet, dtype)  # plain cast: diffusers' own .to() warns about fp32-kept modules
    unet.requires_grad_(False)
    return unet


def count_params_by_module_type(model: nn.Module) -> dict[str, int]:
    """Parameter count per module class (each parameter counted once, by the module that owns it)."""
    counts: dict[str, int] = {}
    for module in model.modules():
        n = sum(p.numel() for p in module.parameters(recurse=False))
        if n:
            name = type(module).__name__
            counts[name] = counts.get(name, 0) + n
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def context_dim(unet_cfg: Mapping) -> int:
    """The width of ``encoder_hidden_states`` a UNet config expects (``cross_attention_dim``)."""
    dim = unet_cfg.get("cross_attention_dim", 1280)  # diffusers' default
    if isinstance(dim, (list, tuple)):
        if len(set(dim)) != 1:
            raise ValueError(f"unet cross_attention_dim must be one width for every block, got {dim!r}")
        dim = dim[0]
    return int(dim)


def adapter_shapes(model: nn.Module, targets: tuple[str, ...], r: int) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """LoRA ``(A shape, B shape)`` per adapted module: Linear ``A (r, in)``, ``B (out, r)``;
    Conv2d ``A (r, in/groups, kh, kw)``, ``B (out, r, 1, 1)`` (peft's layouts).

    Raises ValueError when no ``nn.Linear``/``nn.Conv2d`` matches ``targets``.
    """
    shapes = {}
    for name, module in model.named_modules():
        if not module_matches(name, targets):
            continue
        if isinstance(module, nn.Linear):
            shapes[name] = ((r, module.in_features), (module.out_features, r))
        elif isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            shapes[name] = ((r, module.in_channels // module.groups, kh, kw), (module.out_channels, r, 1, 1))
    if not shapes:
        raise ValueError(f"target_modules {list(targets)} match no nn.Linear or nn.Conv2d in the UNet")
    return shapes


# --------------------------------------------------------------------------- activation trace


class _FusedAttentionTrace(torch.autograd.Function):
    """What a memory-efficient attention kernel (flash, xformers) keeps: q, k, v, out, fp32 lse."""

    @staticmethod
    def forward(ctx, q, k, v):  # q (B, h, Nq, d), k (B, h, Nk, d), v (B, h, Nk, dv)
        # The kernels write the output token-major, (B, Nq, h, dv), and return a transposed view,
        # so the processor's transpose(1, 2).reshape back to (B, Nq, h*dv) is a view too.
        b, h, nq, _ = q.shape
        out = q.new_empty(b, nq, h, v.shape[-1]).transpose(1, 2)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        raise RuntimeError("_FusedAttentionTrace only traces memory on the meta device; it has no backward")


class _FusedAttentionMode(TorchFunctionMode):
    """Routes ``F.scaled_dot_product_attention`` to :class:`_FusedAttentionTrace` inside the trace only."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v = (args + tuple(kwargs[n] for n in ("query", "key", "value") if n in kwargs))[:3]
            return _FusedAttentionTrace.apply(q, k, v)
        return func(*args, **kwargs)


@dataclass(frozen=True)
class ActivationTrace:
    """What one traced policy forward keeps (bytes, for the traced batch).

    ``saved``: tensors kept for backward without checkpointing; ``checkpointed``:
    with diffusers' checkpointing; ``largest_output``: the largest leaf-module
    output; ``skip_live``: skip connections alive during a no-grad forward;
    ``attention_forward``/``attention_backward``: the largest transient buffers of
    one attention call; ``by_block``: ``saved`` split by top-level UNet block.
    """

    saved: int
    checkpointed: int
    largest_output: int
    skip_live: int
    attention_forward: int
    attention_backward: int
    by_block: dict[str, int]
    checkpoint_units: int


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    storage = t.untyped_storage()
    return storage._cdata, storage.nbytes()


def _tensors_in(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in _tensors_in(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in _tensors_in(item)]
    return []


def _attention_buffers(attn, args, kwargs, naive: bool, elt: int) -> tuple[int, int]:
    """(forward, backward) transient bytes of one diffusers ``Attention`` call."""
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
    if hidden is None:
        return 0, 0
    if hidden.dim() == 4:
        batch, nq = hidden.shape[0], hidden.shape[2] * hidden.shape[3]
    else:
        batch, nq = hidden.shape[0], hidden.shape[1]
    nk = nq if context is None else context.shape[1]
    heads, inner = attn.heads, attn.inner_dim
    qkv = batch * (nq + 2 * nk) * inner * elt
    if naive:
        scores = batch * heads * nq * nk * elt
        return 2 * scores, 2 * scores + qkv  # scores + probs; d_probs + d_scores + dq, dk, dv
    # flash / memory-efficient backward: dq, dk, dv plus an fp32 dq accumulator and row sums.
    return batch * heads * nq * 4, qkv + batch * nq * inner * 4 + batch * heads * nq * 4


def trace_activations(
    unet_cfg: Mapping,
    *,
    batch: int,
    latent_hw: tuple[int, int],
    condition_tokens: int,
    dtype: torch.dtype,
    attention: str,
    targets: tuple[str, ...],
    r: int,
) -> ActivationTrace:
    """Trace one APO policy forward of the UNet on meta tensors (see the module docstring).

    Args:
        unet_cfg: ``UNet2DConditionModel`` config.
        batch: samples the policy forward sees (already doubled in paired mode).
        latent_hw: (H, W) of the latents.
        condition_tokens: ``encoder_hidden_states`` length.
        dtype: weights and activations dtype.
        attention: ``naive`` or a fused kind (``sdpa``, ``xformers``, ``auto``).
        targets, r: the adapter (LoRA) placement and rank.
    """
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    unet = build_meta_unet(unet_cfg, dtype)
    naive = attention == "naive"
    unet.set_attn_processor(AttnProcessor() if naive else AttnProcessor2_0())
    tracer = _Tracer(unet, naive, torch.empty((), dtype=dtype).element_size())
    tracer.add_adapters(targets, r, dtype)
    tracer.add_hooks()
    inputs = _meta_inputs(unet, unet_cfg, batch, latent_hw, condition_tokens, dtype)
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(tracer.pack, lambda t: t):
            with _FusedAttentionMode() if not naive else contextlib.nullcontext():
                unet(*inputs[:3], added_cond_kwargs=inputs[3])
    finally:
        for handle in tracer.handles:
            handle.remove()
    return tracer.summary()


def _meta_inputs(unet, unet_cfg, batch, latent_hw, condition_tokens, dtype) -> tuple:
    """(sample, timesteps, encoder_hidden_states, added_cond_kwargs) on the meta device."""
    cfg = unet.config
    h, w = latent_hw
    meta = dict(device="meta", dtype=dtype)
    sample = torch.empty(batch, cfg.in_channels, h, w, **meta)
    context = torch.empty(batch, condition_tokens, context_dim(unet_cfg), **meta)
    timesteps = torch.zeros(batch, device="meta", dtype=torch.long)
    added = None
    if cfg.addition_embed_type == "text_time":
        text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        added = {"text_embeds": torch.empty(batch, text_dim, **meta), "time_ids": torch.empty(batch, 6, **meta)}
    elif cfg.addition_embed_type is not None:
        raise ValueError(f"unet addition_embed_type {cfg.addition_embed_type!r} is not supported (None or 'text_time')")
    return sample, timesteps, context, added


class _Tracer:
    """The hooks of one trace and what they record: every tensor autograd saves (by storage,
    with its checkpoint unit and top-level block), checkpoint units' inputs, skip connections,
    the largest activation and the attention buffers."""

    def __init__(self, unet: nn.Module, naive: bool, elt: int):
        self.unet, self.naive, self.elt = unet, naive, elt
        self.param_keys = {p.untyped_storage()._cdata for p in unet.parameters()}
        self.handles: list = []
        self.records: list[tuple[int, int, int | None, str]] = []  # (storage key, bytes, unit, block)
        self.keep_alive: list[torch.Tensor] = []  # storage keys stay unique while the trace lives
        self.unit: int | None = None
        self.block = "other"
        self.largest = self.attn_fwd = self.attn_bwd = 0
        self.units: list[list[tuple[int, int]]] = []
        self.skips: dict[int, int] = {}

    def add_adapters(self, targets: tuple[str, ...], r: int, dtype: torch.dtype) -> None:
        """Adapters exactly as peft computes them: y = base(x) + B(A(x)), only A and B trainable."""
        for name, (a_shape, b_shape) in adapter_shapes(self.unet, targets, r).items():
            module = self.unet.get_submodule(name)
            a = torch.empty(a_shape, device="meta", dtype=dtype, requires_grad=True)
            b = torch.empty(b_shape, device="meta", dtype=dtype, requires_grad=True)
            self.param_keys.update({a.untyped_storage()._cdata, b.untyped_storage()._cdata})
            if isinstance(module, nn.Linear):
                def adapter_hook(mod, inputs, output, a=a, b=b):
                    return output + F.linear(F.linear(inputs[0], a), b)
            else:
                def adapter_hook(mod, inputs, output, a=a, b=b):
                    down = F.conv2d(inputs[0], a, None, mod.stride, mod.padding, mod.dilation, mod.groups)
                    return output + F.conv2d(down, b)
            self.handles.append(module.register_forward_hook(adapter_hook))

    def add_hooks(self) -> None:
        from diffusers.models.attention_processor import Attention

        for name, module in self.unet.named_modules():
            if not list(module.children()):
                self.handles.append(module.register_forward_hook(self._leaf_output))
            if isinstance(module, Attention):
                self.handles.append(module.register_forward_pre_hook(self._attention_pre, with_kwargs=True))
            parts = name.split(".")
            top_level = (len(parts) == 1 and parts[0] and not isinstance(module, nn.ModuleList)) or (
                len(parts) == 2 and parts[0] in ("down_blocks", "up_blocks")
            )
            if top_level:
                self.handles.append(module.register_forward_pre_hook(self._block_enter(name)))
            if len(parts) == 2 and parts[0] == "down_blocks":
                self.handles.append(module.register_forward_hook(self._skip_output))
        self.handles.append(self.unet.conv_in.register_forward_hook(self._skip_output))
        self.unet.enable_gradient_checkpointing(gradient_checkpointing_func=self._checkpoint)

    def pack(self, t: torch.Tensor):
        key, nbytes = _storage_key(t)
        if key not in self.param_keys:
            self.keep_alive.append(t)
            self.records.append((key, nbytes, self.unit, self.block))
        return t

    def _checkpoint(self, module, *args):
        tensors = [t for t in _tensors_in(args) if t is not None]
        self.keep_alive.extend(tensors)
        self.units.append([_storage_key(t) for t in tensors])
        outer, self.unit = self.unit, len(self.units) - 1
        try:
            return module(*args)
        finally:
            self.unit = outer

    def _leaf_output(self, mod, inputs, output):
        for t in _tensors_in(output):
            self.largest = max(self.largest, t.numel() * t.element_size())

    def _attention_pre(self, mod, args, kwargs):
        fwd, bwd = _attention_buffers(mod, args, kwargs, self.naive, self.elt)
        self.attn_fwd, self.attn_bwd = max(self.attn_fwd, fwd), max(self.attn_bwd, bwd)

    def _block_enter(self, name):
        def hook(mod, args):
            self.block = name
        return hook

    def _skip_output(self, mod, inputs, output):
        for t in _tensors_in(output):
            self.keep_alive.append(t)
            key, nbytes = _storage_key(t)
            self.skips[key] = nbytes

    def summary(self) -> ActivationTrace:
        saved: dict[int, int] = {}
        by_block: dict[str, int] = {}
        outside: dict[int, int] = {}
        inside: dict[int, dict[int, int]] = {}
        for key, nbytes, unit, block in self.records:
            if key not in saved:
                saved[key] = nbytes
                by_block[block] = by_block.get(block, 0) + nbytes
            if unit is None:
                outside[key] = nbytes
            else:
                inside.setdefault(unit, {})[key] = nbytes
        kept = dict(outside)
        for unit in inside:  # a unit that builds no graph lets checkpoint drop its inputs
            kept.update(dict(self.units[unit]))
        recompute = max((sum(v for k, v in own.items() if k not in kept) for own in inside.values()), default=0)
        return ActivationTrace(
            saved=sum(saved.values()),
            checkpointed=sum(kept.values()) + recompute,
            largest_output=self.largest,
            skip_live=sum(self.skips.values()),
            attention_forward=self.attn_fwd,
            attention_backward=self.attn_bwd,
            by_block=by_block,
            checkpoint_units=len(self.units),
        )
