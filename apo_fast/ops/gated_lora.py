"""Time-gated low-rank adapter on a frozen linear layer (APO_SPEC "TACA").

    y = x W^T + b + scaling * ((x A^T) * gate[sample]) B^T

``A`` (r x in) and ``B`` (out x r) use peft's layout (``lora_A.weight``,
``lora_B.weight``); ``scaling`` is peft's ``lora_alpha / r``. ``gate`` holds one
vector over the rank per sample (the timestep gate k(t)), and every token of a
sample uses its sample's row.

Token-to-sample mapping
-----------------------
``x`` is ``(S, ..., in)``: the leading dimension is the sample dimension and
each sample owns ``x[0].numel() // in`` consecutive tokens of the flattened
``(tokens, in)`` view. ``gate`` is ``(S, r)``, or ``(1, r)`` for one gate shared
by every token, or ``None`` (all ones: a plain LoRA). A 2-D ``x`` of shape
``(tokens, in)`` with a ``(G, r)`` gate maps contiguous blocks of
``tokens // G`` tokens to the gate rows (``tokens % G == 0`` is required);
``(S, in)`` with an ``(S, r)`` gate is therefore one token per sample.

Dispatch
--------
:func:`gated_lora_linear` runs the PyTorch reference or the fused Triton path
(chosen by :func:`apo_fast.backend.use_triton`: Triton for CUDA tensors). The
reference path is also used when ``weight`` or ``bias`` requires grad (the
kernels assume a frozen base layer), for float64, and for ranks above 128.
"""
from __future__ import annotations

import contextlib
import numbers

import torch
import torch.nn.functional as F

from apo_fast.backend import use_triton

__all__ = ["gated_lora_linear", "gated_lora_linear_reference", "MAX_TRITON_RANK"]

MAX_TRITON_RANK = 128
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def gated_lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    gate: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """Plain PyTorch gated LoRA linear; differentiable in every tensor argument.

    Shapes as in :func:`gated_lora_linear`. No input validation (callers that
    want it go through :func:`gated_lora_linear`).
    """
    y = F.linear(x, weight, bias)
    h = F.linear(x, lora_A)  # (..., r)
    if gate is not None:
        r = h.shape[-1]
        groups = gate.shape[0]
        gated = h.reshape(groups, -1, r) * gate.to(h.dtype).unsqueeze(1)
        h = gated.reshape(h.shape)
    return y + F.linear(h, lora_B) * scaling


def _check_inputs(x, weight, bias, lora_A, lora_B, gate, scaling, autocasting: bool) -> None:
    """Raise a clear error for a malformed call, before any work is done."""
    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    for name, t in (("bias", bias), ("gate", gate)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t is not None and not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise TypeError(f"scaling must be a real number (peft lora_alpha / r), got {scaling!r}")
    if x.dim() < 2:
        raise ValueError(f"x must be (S, ..., in) with at least 2 dims, got shape {tuple(x.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be (out, in), got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(
            f"x's last dim ({x.shape[-1]}) must equal weight's in_features ({in_features})"
        )
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must be ({out_features},), got shape {tuple(bias.shape)}")
    if lora_A.dim() != 2 or lora_A.shape[1] != in_features or lora_A.shape[0] < 1:
        raise ValueError(
            f"lora_A must be (r, {in_features}) with r >= 1, got shape {tuple(lora_A.shape)}"
        )
    rank = lora_A.shape[0]
    if tuple(lora_B.shape) != (out_features, rank):
        raise ValueError(
            f"lora_B must be ({out_features}, {rank}) (out, r), got shape {tuple(lora_B.shape)}"
        )
    if gate is not None:
        if gate.dim() != 2 or gate.shape[1] != rank or gate.shape[0] < 1:
            raise ValueError(f"gate must be (S, {rank}) or (1, {rank}), got shape {tuple(gate.shape)}")
        groups = gate.shape[0]
        if groups != 1:
            if x.dim() > 2 and groups != x.shape[0]:
                raise ValueError(
                    f"gate has {groups} rows but x has {x.shape[0]} samples (leading dim); "
                    f"expected gate of shape ({x.shape[0]}, {rank}) or (1, {rank})"
                )
            tokens = x.numel() // in_features if in_features else 0
            if x.dim() == 2 and tokens % groups != 0:
                raise ValueError(
                    f"2-D x has {tokens} tokens, not divisible by the gate's {groups} rows"
                )
    tensors = {"x": x, "weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B, "gate": gate}
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if not autocasting:
        for name in ("weight", "bias", "lora_A", "lora_B"):
            t = tensors[name]
            if t is not None and t.dtype != x.dtype:
                raise TypeError(
                    f"{name} has dtype {t.dtype} but x has {x.dtype}; cast them to one dtype "
                    "or run under torch.autocast"
                )


def _wants_triton(x, weight, bias, lora_A, backend) -> bool:
    if not use_triton(x, weight, lora_A, override=backend):
        return False
    frozen_base = not weight.requires_grad and (bias is None or not bias.requires_grad)
    return (
        frozen_base
        and x.dtype in _TRITON_DTYPES
        and lora_A.shape[0] <= MAX_TRITON_RANK
        and x.numel() > 0
        and weight.shape[0] > 0
    )


def gated_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    gate: torch.Tensor | None,
    scaling: float,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Frozen linear layer plus a per-sample gated low-rank update.

    Args:
        x: ``(S, ..., in)`` input; the leading dim is the sample dim (see the
            module docstring for 2-D inputs).
        weight: ``(out, in)`` frozen base weight.
        bias: ``(out,)`` frozen base bias, or ``None``.
        lora_A: ``(r, in)`` down projection (peft ``lora_A.weight``).
        lora_B: ``(out, r)`` up projection (peft ``lora_B.weight``).
        gate: ``(S, r)`` per-sample gate in [0, 1] (may require grad for a
            learned gate), ``(1, r)`` shared by all samples, or ``None`` (ones).
        scaling: peft's ``lora_alpha / r``.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"`` | ``None`` (environment).

    Returns:
        ``(S, ..., out)``: ``x W^T + b + scaling * ((x A^T) * gate[sample]) B^T``
        in ``x``'s dtype (the autocast dtype under ``torch.autocast``, cast the
        way ``F.linear`` casts; ``gate`` keeps its own dtype and its gradient is
        returned in it).

    Differentiable in ``x``, ``lora_A``, ``lora_B``, ``gate`` (and ``weight``,
    ``bias`` through the reference path when they require grad). Deterministic,
    so gradient checkpointing recomputes the same values.
    """
    device_type = x.device.type if isinstance(x, torch.Tensor) else "cpu"
    autocasting = isinstance(x, torch.Tensor) and torch.is_autocast_enabled(device_type)
    _check_inputs(x, weight, bias, lora_A, lora_B, gate, scaling, autocasting)
    scaling = float(scaling)
    if autocasting:
        dtype = torch.get_autocast_dtype(device_type)
        x, weight, lora_A, lora_B = (t.to(dtype) for t in (x, weight, lora_A, lora_B))
        bias = bias.to(dtype) if bias is not None else None
    with torch.autocast(device_type, enabled=False) if autocasting else contextlib.nullcontext():
        return gated_lora_linear_reference(x, weight, bias, lora_A, lora_B, gate, scaling)
