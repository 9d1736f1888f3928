"""The gated adapter over a packed base (bitsandbytes ``Linear4bit`` NF4 with or without double
quantization, ``Linear8bitLt`` int8 weights, or :class:`apo_fast.models.fp8.Float8Linear`
e4m3 weights), with the base matmuls of the forward and of dx dequantizing the packed weight
inside the Triton K loop (``apo_fast.kernels.gated_lora_packed``): no full-precision copy of W
is ever written. (For int8 this is weight-only int8: the activations stay in the compute
dtype, where bitsandbytes' own LLM.int8 matmul also quantizes them.)

    y  = x Wq^T + b + ((x A^T) * s g) B^T
    dx = dy Wq + ((dy B) * s g) A,  dA = ((dy B) * s g)^T x,  dB = dy^T ((x A^T) * s g),
    dgate = s * sum over a sample's tokens of (dy B) * (x A^T)

The low-rank products are skinny (rank <= 128) and run as PyTorch matmuls; the base weight
is frozen (no dW). The kernel is the custom op ``apo_fast::packed_matmul`` (fake
implementation, autograd for ``a``, ``bias`` and ``add``; on CPU tensors it decodes the
weight in PyTorch and multiplies), so ``torch.compile`` traces the quantized layer without a
break.
"""
from __future__ import annotations

import functools

import torch
from torch.library import triton_op, wrap_triton

from apo_fast.ops.backend import interpreter_enabled, runs_triton
from apo_fast.ops.utils import cdiv

__all__ = ["FP8_FORMAT", "decode_e4m3", "dequantize_packed", "fused_packed_format", "gated_lora_packed_linear",
           "is_fp8_layer", "packed_base_linear", "packed_matmul_op"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


FP8_FORMAT = "fp8_e4m3"  # the ``weight_format`` of apo_fast.models.fp8's layers


def is_fp8_layer(module) -> bool:
    """A layer of :mod:`apo_fast.models.fp8` (uint8 e4m3 bytes in ``weight``, fp32 row scales
    from ``module.scale``)."""
    return getattr(module, "weight_format", None) == FP8_FORMAT and module.weight.dtype == torch.uint8


def decode_e4m3(qbytes: torch.Tensor) -> torch.Tensor:
    """fp32 values of e4m3fn bytes (torch's own float8 conversion: the reference decode)."""
    return qbytes.view(torch.float8_e4m3fn).to(torch.float32)


def fused_packed_format(base) -> int | None:
    """The kernel's FORMAT for ``base`` (0: NF4, 2: NF4 with double quantization, 1: int8
    weights with row scales, 3: fp8 e4m3 with row scales), or None when the kernel does not
    read its weight."""
    weight = base.weight
    if is_fp8_layer(base):
        return 3 if isinstance(base, torch.nn.Linear) else None
    state = getattr(weight, "quant_state", None)
    if getattr(state, "packing_format_for_cpu", False):
        return None  # bitsandbytes' CPU eval forward repacked the weight in place (its own layout)
    if (weight.dtype == torch.uint8 and state is not None and state.quant_type == "nf4"
            and state.blocksize == 64 and tuple(state.shape) == (base.out_features, base.in_features)):
        if not state.nested:
            return 0
        nested = state.state2
        if (state.absmax.dtype == torch.uint8 and nested.blocksize == 256 and nested.code.numel() == 256
                and nested.absmax.dtype == torch.float32):
            return 2
        return None
    scb = getattr(weight, "SCB", None)
    if (weight.dtype == torch.int8 and scb is not None and tuple(weight.shape) == (base.out_features, base.in_features)
            and scb.numel() == base.out_features):
        return 1
    return None


@functools.cache
def _kernel(interpret: bool):

    from apo_fast.kernels import gated_lora_packed as k

    return k, k.packed_configs(interpret)[0]


def _format_tensors(base, fmt: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(packed weight, scales, fp32 code table, second-level scales or None) of ``base`` for the
    op. int8 and fp8 have no code table (their scales stand in, unread); FORMAT 2's scales are
    the uint8 absmax codes and its table is ``[code, code2, offset]`` (the kernel's docstring)."""
    if fmt in (0, 2):
        state = base.weight.quant_state
        code = state.code.to(device, torch.float32)
        if fmt == 0:
            return base.weight.data, state.absmax, code, None
        nested = state.state2
        table = torch.cat([code, nested.code.to(device, torch.float32),
                           torch.as_tensor(state.offset, dtype=torch.float32, device=device).reshape(1)])
        return base.weight.data, state.absmax, table, nested.absmax
    scales = base.scale if fmt == 3 else base.weight.SCB.to(torch.float32)
    return base.weight.data, scales, scales, None


def dequantize_packed(qweight, scales, code, scales2, fmt: int, out_features: int, in_features: int) -> torch.Tensor:
    """The (N, K) fp32 weight the kernel decodes (its module docstring): the reference."""
    if fmt in (0, 2):
        byte = qweight.reshape(-1).to(torch.int32)
        nibbles = torch.stack([byte >> 4, byte & 15], dim=1).reshape(-1)[: out_features * in_features]
        values = code[:16].to(torch.float32)[nibbles.long()]
        blocks = torch.arange(values.numel(), device=values.device) // 64
        absmax = scales.to(torch.float32)
        if fmt == 2:
            index = torch.arange(scales.numel(), device=scales.device)
            absmax = code[16:272][scales.long()] * scales2.to(torch.float32)[index // 256] + code[272]
        return (values * absmax[blocks]).reshape(out_features, in_features)
    weight = qweight.reshape(out_features, in_features)
    if fmt == 3:
        return decode_e4m3(weight) * scales.to(torch.float32)[:, None]
    return weight.to(torch.float32) * (scales.to(torch.float32)[:, None] / 127.0)


def _matmul_impl(a, qweight, scales, code, scales2, bias, add, fmt, trans, out_features, in_features):
    P = in_features if trans else out_features
    if not runs_triton(a):
        weight = dequantize_packed(qweight, scales, code, scales2, fmt, out_features, in_features)
        out = a.float() @ (weight if trans else weight.t())
        if bias is not None:
            out = out + bias.float()
        if add is not None:
            out = out + add.float()
        return out.to(a.dtype)
    interpret = interpreter_enabled()
    k, cfg = _kernel(interpret)
    M, Q = a.shape
    out = torch.empty((M, P), dtype=a.dtype, device=a.device)
    blocks = cfg.kwargs
    grid = (cdiv(M, blocks["BLOCK_M"]), cdiv(P, blocks["BLOCK_P"]))
    wrap_triton(k.packed_matmul_kernel)[grid](
        a, qweight, scales, code, scales2 if scales2 is not None else scales,
        bias if bias is not None else a, add if add is not None else a, out,
        M, P, Q, in_features,
        a.stride(0), add.stride(0) if add is not None else 0, out.stride(0),
        FORMAT=fmt, TRANS=trans, HAS_BIAS=bias is not None, HAS_ADD=add is not None,
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        DOT_FP32=interpret and a.dtype == torch.bfloat16,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **blocks,
    )
    return out


@triton_op("apo_fast::packed_matmul", mutates_args=())
def packed_matmul_op(
    a: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    code: torch.Tensor,
    scales2: torch.Tensor | None,
    bias: torch.Tensor | None,
    add: torch.Tensor | None,
    fmt: int,
    trans: bool,
    out_features: int,
    in_features: int,
) -> torch.Tensor:
    """``a (M, Q) @ op(W) [+ bias] [+ add]`` with W (out_features, in_features) decoded from
    the packed format ``fmt``; ``op(W) = W^T`` (Q = in) or, ``trans``, ``W`` (Q = out)."""
    return _matmul_impl(a, qweight, scales, code, scales2, bias, add, fmt, trans, out_features, in_features)


@packed_matmul_op.register_fake
def _packed_matmul_fake(a, qweight, scales, code, scales2, bias, add, fmt, trans, out_features, in_features):
    return a.new_empty((a.shape[0], in_features if trans else out_features))


def _packed_setup(ctx, inputs, output):
    _a, qweight, scales, code, scales2, bias, add, fmt, trans, out_features, in_features = inputs
    ctx.save_for_backward(qweight, scales, code, scales2)
    ctx.fmt, ctx.trans, ctx.features = fmt, trans, (out_features, in_features)
    ctx.has_bias, ctx.add_dtype = bias is not None, add.dtype if add is not None else None


def _packed_backward(ctx, dy):
    qweight, scales, code, scales2 = ctx.saved_tensors
    need = ctx.needs_input_grad
    dy = dy.contiguous()
    da = (torch.ops.apo_fast.packed_matmul(dy, qweight, scales, code, scales2, None, None, ctx.fmt, not ctx.trans,
                                           *ctx.features) if need[0] else None)
    dbias = dy.sum(0) if ctx.has_bias and need[5] else None
    dadd = dy.to(ctx.add_dtype) if ctx.add_dtype is not None and need[6] else None
    return da, None, None, None, None, dbias, dadd, None, None, None, None


packed_matmul_op.register_autograd(_packed_backward, setup_context=_packed_setup)


def _packed_matmul(a, base, fmt: int, trans: bool, bias=None, add=None) -> torch.Tensor:
    qweight, scales, code, scales2 = _format_tensors(base, fmt, a.device)
    return torch.ops.apo_fast.packed_matmul(a, qweight, scales, code, scales2, bias, add, fmt, trans,
                                            base.out_features, base.in_features)


def _gate_rows(gate, M: int, tokens_per_sample: int, scaling: float, dtype) -> torch.Tensor | float:
    """``s * g`` per token (M, r), or the scalar ``s`` for no gate."""
    if gate is None:
        return scaling
    rows = gate.to(dtype) * scaling
    return rows.repeat_interleave(tokens_per_sample, dim=0) if rows.shape[0] > 1 else rows.expand(M, -1)


def gated_lora_packed_linear(x, base, lora_A, lora_B, gate, scaling: float) -> torch.Tensor:
    """``(S, ..., in) -> (S, ..., out)``: the gated adapter over the packed layer ``base``
    (:func:`fused_packed_format` not None), on CUDA or under ``TRITON_INTERPRET=1``.

    The low-rank term runs as PyTorch matmuls and is added in the kernel's epilogue
    (``apo_fast::packed_matmul``'s ``add``); autograd composes the rest."""
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must be one of {_DTYPES} for the packed-weight kernel, got {x.dtype}")
    fmt = fused_packed_format(base)
    if fmt is None:
        raise ValueError(f"the packed-weight kernel does not read {type(base).__name__}'s weight format")
    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    groups = gate.shape[0] if gate is not None else 1
    tokens = x2d.shape[0] // groups if groups > 1 else x2d.shape[0]
    bias = base.bias.to(x.dtype) if base.bias is not None else None
    gs = _gate_rows(gate.contiguous() if gate is not None else None, x2d.shape[0], tokens, float(scaling), x.dtype)
    low = ((x2d @ lora_A.to(x.dtype).t()) * gs) @ lora_B.to(x.dtype).t()
    y = _packed_matmul(x2d, base, fmt, False, bias, low.contiguous())
    return y.reshape(*x.shape[:-1], base.out_features)


def packed_base_linear(x, base) -> torch.Tensor:
    """``x Wq^T + b`` through the same kernel as :func:`gated_lora_packed_linear`: the reference
    pass (adapters off) then sees exactly the base the policy pass sees."""
    fmt = fused_packed_format(base)
    if fmt is None:
        raise ValueError(f"the packed-weight kernel does not read {type(base).__name__}'s weight format")
    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    bias = base.bias.to(x.dtype) if base.bias is not None else None
    return _packed_matmul(x2d, base, fmt, False, bias).reshape(*x.shape[:-1], base.out_features)
