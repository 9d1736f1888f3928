"""The gated adapter over a packed base (bitsandbytes ``Linear4bit`` NF4, or ``Linear8bitLt``
int8 weights), with the base matmuls of the forward and of dx dequantizing the packed weight
inside the Triton K loop (``apo_fast.kernels.gated_lora_packed``): no full-precision copy of W
is ever written. (For int8 this is weight-only int8: the activations stay in the compute
dtype, where bitsandbytes' own LLM.int8 matmul also quantizes them.)

    y  = x Wq^T + b + ((x A^T) * s g) B^T
    dx = dy Wq + ((dy B) * s g) A,  dA = ((dy B) * s g)^T x,  dB = dy^T ((x A^T) * s g),
    dgate = s * sum over a sample's tokens of (dy B) * (x A^T)

The low-rank products are skinny (rank <= 128) and run as PyTorch matmuls; the base weight
is frozen (no dW). NF4 with double quantization does not take this path; the layer falls
back to bitsandbytes' own matmul + the PyTorch branch there.
"""
from __future__ import annotations

import functools

import torch

from apo_fast.ops.backend import interpreter_enabled
from apo_fast.ops.utils import cdiv

__all__ = ["fused_packed_format", "gated_lora_packed_linear", "packed_base_linear"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def fused_packed_format(base) -> int | None:
    """The kernel's FORMAT for ``base`` (0: NF4 without double quantization, 1: int8 weights with
    row scales), or None when the kernel does not read its weight."""
    weight = base.weight
    state = getattr(weight, "quant_state", None)
    if (weight.dtype == torch.uint8 and state is not None and state.quant_type == "nf4" and not state.nested
            and state.blocksize == 64 and tuple(state.shape) == (base.out_features, base.in_features)):
        return 0
    scb = getattr(weight, "SCB", None)
    if (weight.dtype == torch.int8 and scb is not None and tuple(weight.shape) == (base.out_features, base.in_features)
            and scb.numel() == base.out_features):
        return 1
    return None


@functools.cache
def _kernel(interpret: bool):

    from apo_fast.kernels import gated_lora_packed as k

    return k, k.packed_configs(interpret)[0]


def _launch(a: torch.Tensor, base, fmt: int, trans: bool, bias, add, out_features: int) -> torch.Tensor:
    """``a @ op(W) (+ bias) (+ add)`` through the packed-weight kernel (``fmt`` from
    :func:`fused_packed_format`); ``out_features`` = P."""
    k, cfg = _kernel(interpreter_enabled())
    if fmt == 0:
        state = base.weight.quant_state
        scales, code = state.absmax, state.code.to(a.device, torch.float32)
    else:
        scales, code = base.weight.SCB.to(torch.float32), base.weight.SCB  # no code table for int8
    M, Q = a.shape
    out = torch.empty((M, out_features), dtype=a.dtype, device=a.device)
    blocks = cfg.kwargs
    grid = (cdiv(M, blocks["BLOCK_M"]), cdiv(out_features, blocks["BLOCK_P"]))
    k.packed_matmul_kernel[grid](
        a, base.weight.data, scales, code,
        bias if bias is not None else a, add if add is not None else a, out,
        M, out_features, Q, base.in_features,
        a.stride(0), add.stride(0) if add is not None else 0, out.stride(0),
        FORMAT=fmt, TRANS=trans, HAS_BIAS=bias is not None, HAS_ADD=add is not None,
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **blocks,
    )
    return out


def _gate_rows(gate, M: int, tokens_per_sample: int, scaling: float, dtype) -> torch.Tensor | float:
    """``s * g`` per token (M, r), or the scalar ``s`` for no gate."""
    if gate is None:
        return scaling
    rows = gate.to(dtype) * scaling
    return rows.repeat_interleave(tokens_per_sample, dim=0) if rows.shape[0] > 1 else rows.expand(M, -1)


class _PackedGatedLoRA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, base, fmt, bias, lora_A, lora_B, gate, scaling, tokens_per_sample):
        gs = _gate_rows(gate, x2d.shape[0], tokens_per_sample, scaling, x2d.dtype)
        h = x2d @ lora_A.t()
        low = (h * gs) @ lora_B.t()
        y = _launch(x2d, base, fmt, False, bias, low, base.out_features)
        ctx.save_for_backward(x2d, h, lora_A, lora_B, gate)
        ctx.base, ctx.fmt, ctx.scaling, ctx.tokens = base, fmt, scaling, tokens_per_sample
        return y

    @staticmethod
    def backward(ctx, dy):
        x2d, h, lora_A, lora_B, gate = ctx.saved_tensors
        dy = dy.contiguous()
        gs = _gate_rows(gate, x2d.shape[0], ctx.tokens, ctx.scaling, dy.dtype)
        u = dy @ lora_B
        ug = u * gs
        dx = (_launch(dy, ctx.base, ctx.fmt, True, None, ug @ lora_A, ctx.base.in_features)
              if ctx.needs_input_grad[0] else None)
        d_a = ug.t() @ x2d if ctx.needs_input_grad[4] else None
        d_b = dy.t() @ (h * gs) if ctx.needs_input_grad[5] else None
        d_gate = None
        if gate is not None and ctx.needs_input_grad[6]:
            per_token = (u * h).float() * ctx.scaling
            groups = gate.shape[0]
            d_gate = per_token.reshape(groups, -1, per_token.shape[-1]).sum(1).to(gate.dtype)
        return dx, None, None, None, d_a, d_b, d_gate, None, None


def gated_lora_packed_linear(x, base, lora_A, lora_B, gate, scaling: float) -> torch.Tensor:
    """``(S, ..., in) -> (S, ..., out)``: the gated adapter over the packed layer ``base``
    (:func:`fused_packed_format` not None), on CUDA or under ``TRITON_INTERPRET=1``."""
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must be one of {_DTYPES} for the packed-weight kernel, got {x.dtype}")
    fmt = fused_packed_format(base)
    if fmt is None:
        raise ValueError(f"the packed-weight kernel does not read {type(base).__name__}'s weight format")
    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    groups = gate.shape[0] if gate is not None else 1
    tokens = x2d.shape[0] // groups if groups > 1 else x2d.shape[0]
    bias = base.bias.to(x.dtype) if base.bias is not None else None
    y = _PackedGatedLoRA.apply(x2d, base, fmt, bias, lora_A.to(x.dtype), lora_B.to(x.dtype),
                            gate.contiguous() if gate is not None else None, float(scaling), tokens)
    return y.reshape(*x.shape[:-1], base.out_features)


class _PackedBase(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, base, fmt, bias):
        ctx.base, ctx.fmt = base, fmt
        return _launch(x2d, base, fmt, False, bias, None, base.out_features)

    @staticmethod
    def backward(ctx, dy):
        return _launch(dy.contiguous(), ctx.base, ctx.fmt, True, None, None, ctx.base.in_features), None, None, None


def packed_base_linear(x, base) -> torch.Tensor:
    """``x Wq^T + b`` through the same kernel as :func:`gated_lora_packed_linear`: the reference
    pass (adapters off) then sees exactly the base the policy pass sees."""
    fmt = fused_packed_format(base)
    if fmt is None:
        raise ValueError(f"the packed-weight kernel does not read {type(base).__name__}'s weight format")
    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    bias = base.bias.to(x.dtype) if base.bias is not None else None
    return _PackedBase.apply(x2d, base, fmt, bias).reshape(*x.shape[:-1], base.out_features)
