"""The gated adapter as PyTorch custom ops: ``apo_fast::gated_lora_linear`` and its backward.

Registered with ``torch.library.triton_op``, so ``torch.compile`` traces through them
without a graph break and Inductor sees the Triton launches (``wrap_triton``) inside:

* ``apo_fast::gated_lora_linear(x2d, weight, bias, lora_A, lora_B, gate, scaling,
  tokens_per_sample, store_h) -> (y, h)``: ``y (M, N)`` in ``x2d``'s dtype, and
  ``h = x A^T`` ``(M, r)`` when ``store_h`` (the backward reads it for dB and dgate),
  else an empty ``(0, r)`` tensor;
* ``apo_fast::gated_lora_linear_backward(dy, x2d, weight, lora_A, lora_B, gate, h,
  scaling, tokens_per_sample, need_dx, need_da, need_db, need_dgate) -> (dx, dA, dB,
  dgate)``: each gradient in its input's dtype, or an empty ``(0,)`` tensor where not
  asked for.

Shapes and the token-to-gate-row mapping are those of :mod:`apo_fast.ops.gated_lora`
(``x2d (M, K)``, ``gate (G, r)`` or None, rows of ``tokens_per_sample`` tokens). The
autograd formula is registered with ``register_autograd`` (the base ``weight`` and
``bias`` are frozen: no gradient); the fake (meta) implementations give the exact
shapes, dtypes and (contiguous) strides without running anything.

Implementations (:func:`apo_fast.ops.backend.runs_triton`): CUDA tensors run the Triton
kernels; CPU tensors run the plain PyTorch formulas (the eager path and its hand-written
gradients), or the Triton kernels under ``TRITON_INTERPRET=1`` (tests). While being traced for compilation (fake or functional
tensors), CPU tensors take the reference, which Inductor then compiles like any
PyTorch code.
"""
from __future__ import annotations

import torch
from torch.library import triton_op

from apo_fast.ops.backend import runs_triton
from apo_fast.ops.gated_lora.fused import gated_lora_backward, gated_lora_forward
from apo_fast.ops.gated_lora.naive import gate_rows, gated_lora_eager_parts

__all__ = ["gated_lora_linear_op", "gated_lora_linear_backward_op"]


def _empty(like: torch.Tensor, *shape: int, dtype=None) -> torch.Tensor:
    return torch.empty(shape, device=like.device, dtype=dtype or like.dtype)


# --------------------------------------------------------------------------- forward


def _forward_reference(x2d, weight, bias, lora_A, lora_B, gate, scaling, store_h):
    """y and h = x A^T of the PyTorch (eager) path."""
    y, h = gated_lora_eager_parts(x2d, weight, bias, lora_A, lora_B, gate, scaling)
    return y, (h if store_h else _empty(x2d, 0, lora_A.shape[0]))


def _forward_impl(x2d, weight, bias, lora_A, lora_B, gate, scaling, tokens_per_sample, store_h):
    if not runs_triton(x2d):
        return _forward_reference(x2d, weight, bias, lora_A, lora_B, gate, scaling, store_h)
    y, h = gated_lora_forward(x2d, weight, bias, lora_A, lora_B, gate, scaling, tokens_per_sample, store_h)
    if not store_h:
        h = _empty(x2d, 0, lora_A.shape[0])  # large ranks compute h anyway: not returned
    return y, h


@triton_op("apo_fast::gated_lora_linear", mutates_args=())
def gated_lora_linear_op(
    x2d: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    gate: torch.Tensor | None,
    scaling: float,
    tokens_per_sample: int,
    store_h: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward_impl(x2d, weight, bias, lora_A, lora_B, gate, scaling, tokens_per_sample, store_h)


@gated_lora_linear_op.register_fake
def _forward_fake(x2d, weight, bias, lora_A, lora_B, gate, scaling, tokens_per_sample, store_h):
    M, rank = x2d.shape[0], lora_A.shape[0]
    return _empty(x2d, M, weight.shape[0]), _empty(x2d, M if store_h else 0, rank)


# --------------------------------------------------------------------------- backward


def _backward_reference(dy, x2d, weight, lora_A, lora_B, gate, h, scaling, need_dx, need_da, need_db, need_dgate):
    """The gradients of the forward in plain PyTorch (fp32 accumulation for dgate)."""
    u = dy @ lora_B  # (M, r)
    ug = u * scaling if gate is None else gate_rows(u, gate, scaling)
    dx = torch.addmm(dy @ weight, ug, lora_A) if need_dx else None
    da = (ug.t() @ x2d).to(lora_A.dtype) if need_da else None
    db = None
    if need_db:
        hg = h * scaling if gate is None else gate_rows(h, gate, scaling)
        db = (dy.t() @ hg).to(lora_B.dtype)
    dgate = None
    if need_dgate:
        groups, rank = gate.shape
        per_group = (u.float() * h.float()).reshape(groups, -1, rank).sum(1)
        dgate = (per_group * scaling).to(gate.dtype)
    return dx, da, db, dgate


def _backward_impl(dy, x2d, weight, lora_A, lora_B, gate, h, scaling, tokens_per_sample,
                   need_dx, need_da, need_db, need_dgate):
    need_dgate = need_dgate and gate is not None
    if runs_triton(dy):
        grads = gated_lora_backward(dy, x2d, weight, lora_A, lora_B, gate, h, scaling, tokens_per_sample,
                                    need_dx, need_da, need_db, need_dgate)
    else:
        grads = _backward_reference(dy, x2d, weight, lora_A, lora_B, gate, h, scaling,
                                    need_dx, need_da, need_db, need_dgate)
    return tuple(g if g is not None else _empty(dy, 0) for g in grads)


@triton_op("apo_fast::gated_lora_linear_backward", mutates_args=())
def gated_lora_linear_backward_op(
    dy: torch.Tensor,
    x2d: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    gate: torch.Tensor | None,
    h: torch.Tensor,
    scaling: float,
    tokens_per_sample: int,
    need_dx: bool,
    need_da: bool,
    need_db: bool,
    need_dgate: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_impl(dy, x2d, weight, lora_A, lora_B, gate, h, scaling, tokens_per_sample,
                          need_dx, need_da, need_db, need_dgate)


@gated_lora_linear_backward_op.register_fake
def _backward_fake(dy, x2d, weight, lora_A, lora_B, gate, h, scaling, tokens_per_sample,
                   need_dx, need_da, need_db, need_dgate):
    M, (N, K), rank = dy.shape[0], weight.shape, lora_A.shape[0]
    need_dgate = need_dgate and gate is not None
    return (
        _empty(dy, M, K) if need_dx else _empty(dy, 0),
        _empty(dy, rank, K, dtype=lora_A.dtype) if need_da else _empty(dy, 0),
        _empty(dy, N, rank, dtype=lora_B.dtype) if need_db else _empty(dy, 0),
        _empty(dy, *gate.shape, dtype=gate.dtype) if need_dgate else _empty(dy, 0),
    )


# --------------------------------------------------------------------------- autograd


def _setup_context(ctx, inputs, output):
    x2d, weight, _bias, lora_A, lora_B, gate, scaling, tokens_per_sample, _store_h = inputs
    _y, h = output
    need = ctx.needs_input_grad
    # x is only read again for dA (or to recompute h when it was not stored: store_h=False with
    # dB or dgate needed); h for dB and dgate.
    recompute_h = h.shape[0] != x2d.shape[0] and (need[4] or need[5])
    ctx.save_for_backward(x2d if need[3] or recompute_h else None, weight, lora_A, lora_B, gate, h)
    ctx.scaling, ctx.tokens_per_sample = scaling, tokens_per_sample
    ctx.mark_non_differentiable(h)


def _backward(ctx, dy, _dh):
    x2d, weight, lora_A, lora_B, gate, h = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_dgate = bool(need[5]) and gate is not None
    if h.shape[0] != dy.shape[0] and (need[4] or need_dgate):
        h = x2d @ lora_A.t()  # called with store_h=False: recompute the low-rank product
    dx, da, db, dgate = torch.ops.apo_fast.gated_lora_linear_backward(
        dy.to(weight.dtype).contiguous(), x2d if x2d is not None else dy, weight, lora_A, lora_B, gate, h,
        ctx.scaling, ctx.tokens_per_sample, bool(need[0]), bool(need[3]), bool(need[4]), need_dgate,
    )
    return (dx if need[0] else None, None, None, da if need[3] else None, db if need[4] else None,
            dgate if need_dgate else None, None, None, None)


gated_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- caller


def gated_lora_linear_triton(x, weight, bias, lora_A, lora_B, gate, scaling):
    """Flatten to (tokens, in), call ``apo_fast::gated_lora_linear``, restore the leading dims."""
    in_features = x.shape[-1]
    x2d = x.reshape(-1, in_features).contiguous()
    M = x2d.shape[0]
    groups = gate.shape[0] if gate is not None else 1
    tokens_per_sample = M // groups if groups > 1 else M
    weight, lora_A, lora_B = weight.contiguous(), lora_A.contiguous(), lora_B.contiguous()
    bias = bias.contiguous() if bias is not None else None
    gate = gate.contiguous() if gate is not None else None
    # dB and dgate need h = x A^T from the forward
    store_h = torch.is_grad_enabled() and (lora_B.requires_grad or (gate is not None and gate.requires_grad))
    y2d, _ = torch.ops.apo_fast.gated_lora_linear(x2d, weight, bias, lora_A, lora_B, gate, float(scaling),
                                                  tokens_per_sample, bool(store_h))
    return y2d.reshape(*x.shape[:-1], weight.shape[0])
