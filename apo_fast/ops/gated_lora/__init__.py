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
:func:`gated_lora_linear` runs the fused Triton path or the PyTorch path
(chosen by :func:`apo_fast.ops.backend.use_triton`: Triton for CUDA tensors); the
PyTorch path is :func:`gated_lora_linear_eager`, the reference's value with the
scaling folded into the gate and ``addmm`` accumulating into the base output.
The PyTorch path is also used when ``weight`` or ``bias`` requires grad (the
kernels assume a frozen base layer), for float64, and for ranks above 128.

Custom ops
----------
The Triton path is the custom op ``torch.ops.apo_fast.gated_lora_linear`` (and its
backward op), registered in :mod:`.op` with fake implementations and autograd, so
``torch.compile(..., fullgraph=True)`` traces through it; on CPU tensors the op's
kernel is the PyTorch reference.

Triton path (kernels in ``apo_fast.kernels.gated_lora``)
--------------------------------------------------------
Forward: one kernel per output tile computes ``x W^T`` and, for padded ranks
up to :data:`IN_LOOP_MAX_R_PAD`, ``h = x A^T`` in the same K loop from the
same x tiles, applies each row's gate (row -> sample by integer division, the
gate read per tile, never expanded to tokens x r), adds ``(h g s) B^T`` and the
bias, and keeps ``h`` for the backward. Larger ranks compute ``h`` once by a
skinny product and read it back in rank chunks. Backward (W frozen): one
kernel for ``dx = dy W + (u g s) A`` with ``u = dy B`` (again in-loop or
precomputed by rank), one launch for both ``dA = (u g s)^T x`` and
``dB = ((h g s)^T dy)^T`` as split-token fp32 partials summed on the host (no
atomics: deterministic), and ``dgate = s * sum_tokens(u * h)`` per gate row.
fp16/bf16 storage with fp32 accumulation; fp32 inputs use IEEE fp32 dots
unless ``torch.backends.cuda.matmul.allow_tf32`` is set.
"""
from __future__ import annotations

import contextlib

import torch

from apo_fast.ops.backend import use_triton
from apo_fast.ops.gated_lora.checks import autocast_to, check_dtypes, check_inputs
from apo_fast.ops.gated_lora.fused import gated_lora_backward, gated_lora_forward
from apo_fast.ops.gated_lora.op import (
    gated_lora_linear_backward_op,
    gated_lora_linear_op,
    gated_lora_linear_triton,
)
from apo_fast.ops.gated_lora.naive import (
    gate_rows,
    gated_lora_linear_eager,
    gated_lora_linear_reference,
)

__all__ = [
    "MAX_TRITON_RANK",
    "gate_rows",
    "gated_lora_backward",
    "gated_lora_forward",
    "gated_lora_linear",
    "gated_lora_linear_op",
    "gated_lora_linear_backward_op",
    "gated_lora_linear_eager",
    "gated_lora_linear_reference",
]

MAX_TRITON_RANK = 128
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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
    check_inputs(x, weight, bias, lora_A, lora_B, gate, scaling, autocasting)
    scaling = float(scaling)
    if autocasting:
        dtype = torch.get_autocast_dtype(device_type)
        x, weight, bias, lora_A, lora_B = (autocast_to(t, dtype) for t in (x, weight, bias, lora_A, lora_B))
        check_dtypes(x, weight, bias, lora_A, lora_B)
    with torch.autocast(device_type, enabled=False) if autocasting else contextlib.nullcontext():
        if _wants_triton(x, weight, bias, lora_A, backend):
            return gated_lora_linear_triton(x, weight, bias, lora_A, lora_B, gate, scaling)
        return gated_lora_linear_eager(x, weight, bias, lora_A, lora_B, gate, scaling)


