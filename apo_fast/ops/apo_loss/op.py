"""The fused APO loss as PyTorch custom ops: ``apo_fast::apo_loss`` and ``apo_fast::apo_loss_grad``.

Registered with ``torch.library.triton_op`` (the Triton launches go through
``wrap_triton``), so ``torch.compile`` traces through the loss without a graph break:

* ``apo_fast::apo_loss(model_pred, ref_pred, target, mask, beta, beta_value, lambda_mask,
  paired, lambda_sft, loss_type, labels, weights, lambda_desirable, lambda_undesirable,
  grad_mode) -> (loss, stats, grad)``: the scalar float32 loss; ``stats`` float32
  ``[e_theta (B), e_ref (B), coef (B), metrics (8)]`` with ``coef_i = dL/de_theta_i * 2 / N``;
  ``grad`` = ``coef_i * w * (p - t)`` in ``model_pred``'s dtype when ``grad_mode == 1``
  (the gradient written during forward; backward rescales it), else empty ``(0,)``.
  ``beta`` is the ``(n_terms,)`` float32 tensor, or None with the float ``beta_value``.
  ``grad_mode``: 0 no gradient, 1 during forward, 2 during backward (the fp16 default).
* ``apo_fast::apo_loss_grad(model_pred, target, mask, coef, lambda_mask, scale) -> grad``:
  ``coef_i * scale * w * (p - t)``, the backward pass of ``grad_mode == 2``.

The gradient reaches ``model_pred`` only (``register_autograd``). CUDA tensors run the
Triton kernels; CPU tensors run the PyTorch reference (:func:`apo_loss_reference` for the
values, :func:`~apo_fast.ops.apo_loss.naive.gradient_coefficients`, the closed-form
derivative, for ``coef``) or, under ``TRITON_INTERPRET=1``, the kernels
(:func:`apo_fast.ops.backend.runs_triton`). The fake implementations give exact shapes, dtypes
and strides (``grad`` in the memory order the kernels use).
"""
from __future__ import annotations

import torch
from torch.library import triton_op

from apo_fast.ops.apo_loss.naive import (
    NUM_METRIC_SLOTS,
    PreferenceForm,
    apo_loss_reference,
    gradient_coefficients,
)
from apo_fast.ops.backend import runs_triton

__all__ = ["apo_loss_grad_op", "apo_loss_op", "call_apo_loss_op"]

GRAD_NONE, GRAD_IN_FORWARD, GRAD_IN_BACKWARD = 0, 1, 2


def _grad_layout(model_pred, ref_pred, target) -> torch.memory_format:
    from apo_fast.ops.apo_loss.fused import stream_layout

    return stream_layout(model_pred, ref_pred, target)


def _empty(like: torch.Tensor) -> torch.Tensor:
    return torch.empty((0,), device=like.device, dtype=like.dtype)


# --------------------------------------------------------------------------- reference


def _reference(model_pred, ref_pred, target, mask, beta, lambda_mask, paired, lambda_sft, form, grad_mode):
    loss, e_theta, e_ref, metrics = apo_loss_reference(model_pred, ref_pred, target, beta, mask, lambda_mask,
                                                       paired, lambda_sft, form)
    coef = gradient_coefficients(e_theta, e_ref, beta, paired, lambda_sft, form, model_pred[0].numel())
    stats = torch.cat([e_theta, e_ref, coef, metrics]).to(torch.float32)
    grad = _empty(model_pred)
    if grad_mode == GRAD_IN_FORWARD:
        grad = _reference_grad(model_pred, target, mask, coef, lambda_mask, None,
                               _grad_layout(model_pred, ref_pred, target))
    return loss.detach().to(torch.float32), stats, grad


def _reference_grad(model_pred, target, mask, coef, lambda_mask, scale, layout):
    compute = torch.promote_types(model_pred.dtype, torch.float32)
    shape = (-1,) + (1,) * (model_pred.dim() - 1)
    c = coef.to(compute).reshape(shape)
    if scale is not None:
        c = c * scale.to(compute)
    g = c * (model_pred.to(compute) - target.to(compute))
    if mask is not None:
        g = g * (1.0 + (lambda_mask - 1.0) * mask.to(compute))
    return g.to(model_pred.dtype).contiguous(memory_format=layout)


# --------------------------------------------------------------------------- ops


def _loss_impl(model_pred, ref_pred, target, mask, beta, beta_value, lambda_mask, paired, lambda_sft,
               loss_type, labels, weights, lambda_desirable, lambda_undesirable, grad_mode):
    form = PreferenceForm(loss_type, labels, weights, lambda_desirable, lambda_undesirable)
    beta_arg = beta if beta is not None else beta_value
    if not runs_triton(model_pred):
        return _reference(model_pred, ref_pred, target, mask, beta_arg, lambda_mask, paired, lambda_sft, form,
                          grad_mode)
    from apo_fast.ops.apo_loss import fused

    p, r, t, m, plan = fused.prepare_inputs(model_pred, ref_pred, target, mask)
    partials = fused.launch_residual_sums(p, r, t, m, plan, lambda_mask)
    loss, stats = fused.launch_finalize(partials, plan, beta_arg, paired, lambda_sft, form)
    grad = _empty(model_pred)
    if grad_mode == GRAD_IN_FORWARD:
        n = plan.n_samples
        grad = fused.launch_grad(p, t, m, stats[2 * n: 3 * n], plan, lambda_mask)
    return loss, stats, grad


@triton_op("apo_fast::apo_loss", mutates_args=())
def apo_loss_op(
    model_pred: torch.Tensor,
    ref_pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None,
    beta: torch.Tensor | None,
    beta_value: float,
    lambda_mask: float,
    paired: bool,
    lambda_sft: float,
    loss_type: str,
    labels: torch.Tensor | None,
    weights: torch.Tensor | None,
    lambda_desirable: float,
    lambda_undesirable: float,
    grad_mode: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _loss_impl(model_pred, ref_pred, target, mask, beta, beta_value, lambda_mask, paired, lambda_sft,
                      loss_type, labels, weights, lambda_desirable, lambda_undesirable, grad_mode)


@apo_loss_op.register_fake
def _loss_fake(model_pred, ref_pred, target, mask, beta, beta_value, lambda_mask, paired, lambda_sft,
               loss_type, labels, weights, lambda_desirable, lambda_undesirable, grad_mode):
    f32 = dict(device=model_pred.device, dtype=torch.float32)
    n = model_pred.shape[0]
    grad = _empty(model_pred)
    if grad_mode == GRAD_IN_FORWARD:
        grad = torch.empty_like(model_pred, memory_format=_grad_layout(model_pred, ref_pred, target))
    return torch.empty((), **f32), torch.empty((3 * n + NUM_METRIC_SLOTS,), **f32), grad


def _grad_impl(model_pred, target, mask, coef, lambda_mask, scale):
    if not runs_triton(model_pred):
        return _reference_grad(model_pred, target, mask, coef, lambda_mask, scale,
                               _grad_layout(model_pred, model_pred, target))
    from apo_fast.ops.apo_loss import fused

    p, _r, t, m, plan = fused.prepare_inputs(model_pred, model_pred, target, mask)
    return fused.launch_grad(p, t, m, coef.contiguous(), plan, lambda_mask, scale=scale.float().contiguous())


@triton_op("apo_fast::apo_loss_grad", mutates_args=())
def apo_loss_grad_op(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None,
    coef: torch.Tensor,
    lambda_mask: float,
    scale: torch.Tensor,
) -> torch.Tensor:
    return _grad_impl(model_pred, target, mask, coef, lambda_mask, scale)


@apo_loss_grad_op.register_fake
def _grad_fake(model_pred, target, mask, coef, lambda_mask, scale):
    return torch.empty_like(model_pred, memory_format=_grad_layout(model_pred, model_pred, target))


def _setup_context(ctx, inputs, output):
    model_pred, _ref, target, mask, *_rest = inputs
    lambda_mask, grad_mode = inputs[6], inputs[14]
    _loss, stats, grad = output
    ctx.grad_mode, ctx.lambda_mask = grad_mode, lambda_mask
    if grad_mode == GRAD_IN_FORWARD:
        ctx.save_for_backward(grad)
    else:
        ctx.save_for_backward(model_pred, target, mask, stats)
    ctx.mark_non_differentiable(stats, grad)


def _backward(ctx, grad_loss, _grad_stats, _grad_grad):
    grad = None
    if ctx.needs_input_grad[0] and grad_loss is not None:
        if ctx.grad_mode == GRAD_IN_FORWARD:
            (saved,) = ctx.saved_tensors
            grad = saved * grad_loss  # a 0-dim fp32 factor: fp16 math in fp32, no overflow of the scale
        elif ctx.grad_mode == GRAD_IN_BACKWARD:
            model_pred, target, mask, stats = ctx.saved_tensors
            n = model_pred.shape[0]
            grad = torch.ops.apo_fast.apo_loss_grad(model_pred, target, mask, stats[2 * n: 3 * n], ctx.lambda_mask,
                                                    grad_loss.float().reshape(1))
        else:
            raise RuntimeError("apo_fast::apo_loss was called with grad_mode=0 but a gradient was asked for")
    return (grad,) + (None,) * 14


apo_loss_op.register_autograd(_backward, setup_context=_setup_context)


def call_apo_loss_op(model_pred, ref_pred, target, beta, mask, lambda_mask, paired, lambda_sft,
                     grad_in_forward: bool | None, form: PreferenceForm):
    """``(loss, stats)`` of ``apo_fast::apo_loss`` on validated inputs (``beta`` a float or a
    (n_terms,) tensor); the gradient mode from grad mode, ``requires_grad`` and the dtype."""
    if grad_in_forward is None:
        grad_in_forward = model_pred.dtype != torch.float16
    grad_mode = GRAD_NONE
    if torch.is_grad_enabled() and model_pred.requires_grad:
        grad_mode = GRAD_IN_FORWARD if grad_in_forward else GRAD_IN_BACKWARD
    beta_tensor = beta.to(torch.float32).contiguous() if isinstance(beta, torch.Tensor) else None
    beta_value = 0.0 if beta_tensor is not None else float(beta)
    loss, stats, _ = torch.ops.apo_fast.apo_loss(
        model_pred, ref_pred, target, mask, beta_tensor, beta_value, float(lambda_mask), bool(paired),
        float(lambda_sft), form.loss_type, form.labels, form.weights, float(form.lambda_desirable),
        float(form.lambda_undesirable), grad_mode,
    )
    return loss, stats
