"""Input checks of the gated adapter op (one place, used before any work).
"""
from __future__ import annotations

import numbers

import torch


def check_inputs(x, weight, bias, lora_A, lora_B, gate, scaling, autocasting: bool) -> None:
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
        check_dtypes(x, weight, bias, lora_A, lora_B)


def check_dtypes(x, weight, bias, lora_A, lora_B) -> None:
    for name, t in (("weight", weight), ("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(
                f"{name} has dtype {t.dtype} but x has {x.dtype}; cast them to one dtype "
                "or run under torch.autocast"
            )


def autocast_to(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Cast like autocast casts F.linear's inputs: float16/bfloat16/float32 only."""
    if t is None or t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return t
    return t.to(dtype)

