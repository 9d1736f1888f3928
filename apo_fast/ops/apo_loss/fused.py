"""Fused APO / Diffusion-DPO loss: input plan and Triton launchers (the custom ops that call
them, with their autograd, are in :mod:`apo_fast.ops.apo_loss.op`).

The kernels live in ``apo_fast.kernels.apo_loss``; the PyTorch reference and the
public :func:`apo_fast.losses.apo_loss` (which dispatches here on CUDA) live in
``apo_fast.losses``.

Forward: one pass over (policy, reference, target[, mask]) gives each sample's
chunk partial sums; one single-program kernel turns them into the loss,
metrics and each sample's gradient coefficient; when ``model_pred`` requires
grad, a second pass over (policy, target[, mask]) writes
``grad = coef_i * w * (p - t)`` in ``model_pred``'s dtype (computed during
forward, as Liger-Kernel's fused losses do), and backward only rescales it by
the incoming gradient, in place. ``grad_in_forward=False`` instead runs that
pass in backward with the incoming gradient folded into the coefficient (2N
bytes and one launch fewer; the benchmark measures both). The default is the
forward pass for float32/bfloat16 and the backward pass for float16: an fp16
gradient stored before the loss scale is applied underflows (typical
magnitudes ~1e-5 are fp16 subnormals), while folding the scale in first keeps
the reference's precision. No fp32 temporaries the size of the inputs are
made; the reference prediction and the target get no gradient.

Inputs are not scanned for NaN/Inf (a device sync per call); NaN propagates to
the loss, metrics and gradient.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.library import wrap_triton

from apo_fast.kernels import apo_loss as K
from apo_fast.ops.apo_loss.checks import (
    check_form,
    check_number,
    validate_mask,
    validate_predictions,
)
from apo_fast.ops.apo_loss.naive import (
    FUSED_DTYPES,
    NUM_METRIC_SLOTS,
    SIGMOID,
    PreferenceForm,
    beta_per_term,
)
from apo_fast.ops.backend import interpreter_enabled

MAX_SAMPLE_NUMEL = 2**31 - 2**20  # in-sample offsets are 32-bit
MAX_CHUNKS = 1024  # chunk partials per sample (the finalize kernel holds them in registers)
# The finalize kernel loads (terms x chunks) tiles of at most FINALIZE_TILE
# partials with FINALIZE_WARPS warps: no register spills on sm_80/sm_90
# (checked by tests/ops/apo_loss/test_compile.py; a 4096 tile with 4 warps spilled).
FINALIZE_TILE = 2048
FINALIZE_WARPS = 8
INTERPRETER_TARGET_PROGRAMS = 16


@dataclasses.dataclass(frozen=True)
class StreamPlan:
    """How the streaming kernels walk one sample (see ``apo_fast.kernels.apo_loss``)."""

    n_samples: int
    sample_numel: int
    positions: int
    repeats: int
    repeat_stride: int
    mask_mode: int
    mask_div: int
    mask_sample_numel: int
    chunk: int
    n_chunks: int


from apo_fast.ops.utils import cdiv as _cdiv  # noqa: E402
from apo_fast.ops.utils import next_pow2, sm_count


def _is_channels_last(x: torch.Tensor) -> bool:
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        return x.is_contiguous(memory_format=torch.channels_last_3d)
    return False


def _channels_last_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 else torch.channels_last_3d


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return 8 * sm_count(index)
    return INTERPRETER_TARGET_PROGRAMS


def stream_layout(model_pred, ref_pred, target) -> torch.memory_format:
    """The memory order the kernels stream (and write the gradient in): channels_last when all
    three are channels_last (and not also contiguous), else contiguous (other layouts are copied)."""
    preds = (model_pred, ref_pred, target)
    if not all(x.is_contiguous() for x in preds) and all(_is_channels_last(x) for x in preds):
        return _channels_last_format(model_pred)
    return torch.contiguous_format


def check_sample_numel(model_pred: torch.Tensor) -> int:
    """Elements per sample, refused when the kernels' 32-bit in-sample offsets cannot hold them."""
    numel = model_pred[0].numel() if model_pred.shape[0] else model_pred.numel()
    if numel >= MAX_SAMPLE_NUMEL:
        raise ValueError(
            f"model_pred has {numel} elements per sample; the fused kernels take fewer than {MAX_SAMPLE_NUMEL}"
        )
    return numel


def prepare_inputs(
    model_pred: torch.Tensor,
    ref_pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, StreamPlan]:
    """Pick the memory order (NCHW or channels_last, copying only other layouts)
    and the streaming plan. Inputs must already be validated."""
    layout = stream_layout(model_pred, ref_pred, target)
    channels_last = layout != torch.contiguous_format
    preds = (model_pred, ref_pred, target)
    if not channels_last:
        preds = tuple(x.contiguous() for x in preds)  # a no-op for contiguous inputs
    p, r, t = preds
    n_samples = p.shape[0]
    numel = check_sample_numel(p)
    channels = p.shape[1]
    spatial = numel // channels if channels else 0
    positions, repeats, stride, mode, div, mask_numel = numel, 1, numel, K.MASK_NONE, 1, numel
    m = None
    if mask is not None:
        if mask.dtype not in FUSED_DTYPES:
            m = mask.to(torch.float32 if mask.dtype == torch.float64 else p.dtype)
        else:
            m = mask
        broadcast = mask.shape[1] == 1 and channels != 1
        if not broadcast:
            m = m.contiguous(memory_format=_channels_last_format(p)) if channels_last else m.contiguous()
            mode = K.MASK_DIRECT
        elif channels_last:
            m = m.contiguous()
            mode, div, mask_numel = K.MASK_DIV, channels, spatial
        else:
            m = m.contiguous()
            positions, repeats, stride, mode, mask_numel = spatial, channels, spatial, K.MASK_DIRECT, spatial
    per_sample = max(1, min(MAX_CHUNKS, _cdiv(_target_programs(p.device), n_samples), _cdiv(positions, K.CHUNK_ALIGN)))
    chunk = _cdiv(_cdiv(positions, per_sample), K.CHUNK_ALIGN) * K.CHUNK_ALIGN
    plan = StreamPlan(
        n_samples=n_samples,
        sample_numel=numel,
        positions=positions,
        repeats=repeats,
        repeat_stride=stride,
        mask_mode=mode,
        mask_div=div,
        mask_sample_numel=mask_numel,
        chunk=chunk,
        n_chunks=_cdiv(positions, chunk),
    )
    return p, r, t, m, plan


# --------------------------------------------------------------------------- launchers


def launch_residual_sums(p, r, t, m, plan: StreamPlan, lambda_mask: float) -> torch.Tensor:
    """(B, n_chunks, 2) float32 partial sums of w (p - t)^2 and w (r - t)^2."""
    partials = torch.empty((plan.n_samples, plan.n_chunks, 2), dtype=torch.float32, device=p.device)
    wrap_triton(K.apo_residual_sums_kernel)[(plan.n_samples, plan.n_chunks)](
        p,
        r,
        t,
        m if m is not None else p,
        partials,
        plan.sample_numel,
        plan.mask_sample_numel,
        plan.positions,
        plan.repeats,
        plan.repeat_stride,
        plan.chunk,
        plan.n_chunks,
        float(lambda_mask - 1.0),
        MASK_MODE=plan.mask_mode,
        MASK_DIV=plan.mask_div,
    )
    return partials


def finalize_blocks(n_terms: int, n_chunks: int) -> tuple[int, int]:
    """(BLOCK_CHUNKS, BLOCK_TERMS) of the finalize kernel: all chunks of a term at once."""
    block_chunks = max(2, next_pow2(n_chunks))
    return block_chunks, max(2, min(next_pow2(n_terms), FINALIZE_TILE // block_chunks))


def launch_finalize(
    partials: torch.Tensor,
    plan: StreamPlan,
    beta: float | torch.Tensor,
    paired: bool,
    lambda_sft: float,
    form: PreferenceForm = SIGMOID,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scalar float32 loss and the stats vector [e_theta(B), e_ref(B), coef(B), metrics(8)]."""
    n = plan.n_samples
    n_terms = n // 2 if paired else n
    stats = torch.empty(3 * n + NUM_METRIC_SLOTS, dtype=torch.float32, device=partials.device)
    loss = torch.empty((), dtype=torch.float32, device=partials.device)
    block_chunks, block_terms = finalize_blocks(n_terms, plan.n_chunks)
    per_term = isinstance(beta, torch.Tensor)
    if form != SIGMOID:
        labels = form.labels.to(torch.float32).contiguous() if form.labels is not None else None
        weights = form.weights.to(torch.float32).contiguous() if form.weights is not None else None
        wrap_triton(K.apo_preference_finalize_kernel)[(1,)](
            partials,
            beta if per_term else partials,
            labels if labels is not None else partials,
            weights if weights is not None else partials,
            stats,
            loss,
            n,
            n_terms,
            plan.n_chunks,
            0.0 if per_term else float(beta),
            1.0 / plan.sample_numel,
            1.0 / n_terms,
            1.0 / n,
            float(lambda_sft),
            float(form.lambda_desirable),
            float(form.lambda_undesirable),
            FORM=form.form_id,
            PAIRED=paired,
            BETA_PER_TERM=per_term,
            HAS_LABELS=labels is not None,
            HAS_WEIGHTS=weights is not None,
            BLOCK_TERMS=block_terms,
            BLOCK_CHUNKS=block_chunks,
            num_warps=FINALIZE_WARPS,
        )
        return loss, stats
    wrap_triton(K.apo_loss_finalize_kernel)[(1,)](
        partials,
        beta if per_term else partials,
        stats,
        loss,
        n,
        n_terms,
        plan.n_chunks,
        0.0 if per_term else float(beta),
        1.0 / plan.sample_numel,
        1.0 / n_terms,
        1.0 / n,
        float(lambda_sft),
        PAIRED=paired,
        BETA_PER_TERM=per_term,
        BLOCK_TERMS=block_terms,
        BLOCK_CHUNKS=block_chunks,
        num_warps=FINALIZE_WARPS,
    )
    return loss, stats


def launch_grad(
    p, t, m, coef: torch.Tensor, plan: StreamPlan, lambda_mask: float, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """grad = coef_i (* scale) * w * (p - t) in p's dtype and memory order."""
    grad = torch.empty_like(p)
    wrap_triton(K.apo_grad_kernel)[(plan.n_samples, plan.n_chunks)](
        p,
        t,
        m if m is not None else p,
        coef,
        scale if scale is not None else coef,
        grad,
        plan.sample_numel,
        plan.mask_sample_numel,
        plan.positions,
        plan.repeats,
        plan.repeat_stride,
        plan.chunk,
        float(lambda_mask - 1.0),
        MASK_MODE=plan.mask_mode,
        MASK_DIV=plan.mask_div,
        HAS_SCALE=scale is not None,
    )
    return grad


# --------------------------------------------------------------------------- entry points


def fused_apo_loss(
    model_pred: torch.Tensor,
    ref_pred: torch.Tensor,
    target: torch.Tensor,
    beta_t: float | torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    lambda_mask: float = 1.0,
    paired: bool = False,
    lambda_sft: float = 0.0,
    grad_in_forward: bool | None = None,
    loss_type: str = "sigmoid",
    labels: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    lambda_desirable: float = 1.0,
    lambda_undesirable: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The APO loss through the Triton kernels; arguments as :func:`apo_fast.losses.apo_loss`.

    Inputs: CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``), float32,
    float16 or bfloat16, contiguous NCHW or channels_last (other layouts are copied).
    ``grad_in_forward``: write the gradient during forward (backward rescales it)
    or during backward; None picks forward except for float16 (module docstring).

    Returns:
        loss: scalar float32, differentiable w.r.t. ``model_pred``;
        e_theta, e_ref: (B,) float32, detached;
        metric_values: (8,) float32, slots of ``apo_fast.losses.METRIC_SLOTS``.
    """
    validate_predictions(model_pred, ref_pred, target)
    validate_mask(mask, model_pred)
    for name, tensor in (("model_pred", model_pred), ("ref_pred", ref_pred), ("target", target)):
        if tensor.dtype not in FUSED_DTYPES:
            raise TypeError(f"{name} must be one of {FUSED_DTYPES} for the fused loss, got {tensor.dtype}")
    if not model_pred.is_cuda and not interpreter_enabled():
        raise RuntimeError("the fused APO loss needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tests)")
    lambda_mask = check_number("lambda_mask", lambda_mask, minimum=0.0)
    lambda_sft = check_number("lambda_sft", lambda_sft, minimum=0.0)
    beta = beta_per_term(beta_t, model_pred.shape[0], bool(paired), model_pred.device)
    form = check_form(loss_type, labels, weights, lambda_desirable, lambda_undesirable, model_pred, bool(paired))
    if lambda_mask == 1.0:
        mask = None  # w == 1 everywhere: skip reading the mask
    return apply_fused_apo_loss(
        model_pred, ref_pred, target, beta, mask, lambda_mask, bool(paired), lambda_sft, grad_in_forward, form
    )


def apply_fused_apo_loss(
    model_pred: torch.Tensor,
    ref_pred: torch.Tensor,
    target: torch.Tensor,
    beta: float | torch.Tensor,
    mask: torch.Tensor | None,
    lambda_mask: float,
    paired: bool,
    lambda_sft: float,
    grad_in_forward: bool | None = None,
    form: PreferenceForm = SIGMOID,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`fused_apo_loss` on inputs already validated (``beta`` from
    ``apo_fast.ops.apo_loss.naive.beta_per_term``), as :func:`apo_fast.losses.apo_loss` calls it:
    no second round of Python checks on the hot path. Runs the custom op
    ``apo_fast::apo_loss`` (:mod:`apo_fast.ops.apo_loss.op`)."""
    from apo_fast.ops.apo_loss.op import call_apo_loss_op

    check_sample_numel(model_pred)
    loss, stats = call_apo_loss_op(model_pred, ref_pred, target, beta, mask, lambda_mask, paired, lambda_sft,
                                   grad_in_forward, form)
    n = model_pred.shape[0]
    return loss, stats[:n], stats[n : 2 * n], stats[3 * n :]
