"""The gated adapter op's plain PyTorch reference and its eager (addmm) form.

    y = x W^T + b + scaling * ((x A^T) * gate[sample]) B^T

See :mod:``apo_fast.ops.gated_lora`` for the token-to-sample mapping of ``gate``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


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


def gated_lora_linear_eager(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    gate: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """The PyTorch (non-Triton) path: the reference's value in fewer passes.

    ``scaling`` is folded into the small ``(S, r)`` gate (or into ``addmm``'s
    ``alpha``), the gate multiplies the ``(tokens, r)`` product, and the
    up-projection accumulates straight into the base output with ``addmm``. A
    peft-style ``base(x) + B(A(x)) * scaling`` makes two extra passes over the
    ``(tokens, out)`` output, forward and backward; this makes none. Same
    shapes and gradients as :func:`gated_lora_linear_reference` (rounding aside).
    """
    return gated_lora_eager_parts(x, weight, bias, lora_A, lora_B, gate, scaling)[0]


def gated_lora_eager_parts(x, weight, bias, lora_A, lora_B, gate, scaling) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`gated_lora_linear_eager`'s output and its low-rank product ``h = x A^T`` (the custom
    op's backward reads ``h``)."""
    y = F.linear(x, weight, bias)
    h = F.linear(x, lora_A)
    rank, out_features = h.shape[-1], y.shape[-1]
    y2d = y.reshape(-1, out_features)
    if gate is None:
        return torch.addmm(y2d, h.reshape(-1, rank), lora_B.t(), alpha=scaling).reshape(y.shape), h
    return torch.addmm(y2d, gate_rows(h, gate, scaling).reshape(-1, rank), lora_B.t()).reshape(y.shape), h


def gate_rows(h: torch.Tensor, gate: torch.Tensor, scaling: float) -> torch.Tensor:
    """``h * scaling * gate[sample]`` for the low-rank product ``h`` of shape ``(S, ..., r)``
    (or ``(tokens, r)`` in ``G`` contiguous blocks) and a ``(G, r)`` gate; the scaling is
    folded into the small gate (``G * r`` multiplies)."""
    g = gate.to(h.dtype) * scaling
    return (h.reshape(g.shape[0], -1, h.shape[-1]) * g.unsqueeze(1)).reshape(h.shape)


