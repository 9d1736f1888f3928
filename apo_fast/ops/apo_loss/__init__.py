"""The APO / Diffusion-DPO preference loss op: public functional API and dispatch.

:func:``apo_loss`` checks its inputs (:mod:``.checks``), then runs the fused Triton kernels
(:mod:``.fused``) on CUDA tensors and the PyTorch reference (:mod:``.naive``) elsewhere
(:func:``apo_fast.ops.backend.use_triton``). The loss family built on it (Diffusion-DPO
conventions, the beta schedules, the plain diffusion loss) is in :mod:``apo_fast.losses``.
"""

from __future__ import annotations

import torch

from apo_fast.ops.apo_loss.checks import (
    check_form,
    check_number,
    validate_mask,
    validate_predictions,
)
from apo_fast.ops.apo_loss.naive import (
    FUSED_DTYPES,
    METRIC_SLOTS,
    NUM_METRIC_SLOTS,
    APOLossOutput,
    PreferenceForm,
    apo_loss_reference,
    beta_per_term,
    metric_names_for,
)
from apo_fast.ops.backend import requested_backend, use_triton

__all__ = [
    "APOLossOutput",
    "METRIC_SLOTS",
    "NUM_METRIC_SLOTS",
    "apo_loss",
    "PreferenceForm",
    "apo_loss_reference",
]


# --------------------------------------------------------------------------- public API


def apo_loss(
    model_pred: torch.Tensor,
    ref_pred: torch.Tensor,
    target: torch.Tensor,
    beta_t: float | torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    lambda_mask: float = 1.0,
    paired: bool = False,
    lambda_sft: float = 0.0,
    loss_type: str = "sigmoid",
    labels: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    lambda_desirable: float = 1.0,
    lambda_undesirable: float = 1.0,
    backend: str | None = None,
) -> APOLossOutput:
    """Anomaly Preference Optimization loss (unpaired) or its Diffusion-DPO form (paired),
    in any preference form of :class:`~apo_fast.ops.apo_loss.naive.PreferenceForm`.

    Args:
        model_pred: (B, C, H, W) policy prediction (any (B, ...) works), float32,
            float16 or bfloat16 (float64 on the reference path). Gets the gradient,
            in its own dtype.
        ref_pred: (B, C, H, W) reference prediction; no gradient flows to it.
        target: (B, C, H, W) the regression target (noise for eps-prediction).
            All three share shape and device; their floating dtypes may differ
            (accelerate hands back an fp32 prediction beside a bf16 target): the
            math is float32 (float64 if any input is float64, reference path),
            as the public scripts' ``.float()`` does. Contiguous NCHW and
            channels_last are read in place; other layouts are copied.
        beta_t: temperature, a float or a tensor: (B,) unpaired; (B/2,) or (B,)
            paired (then the winners' half is used); a 0-dim tensor broadcasts.
            See :func:`beta_schedule`.
        mask: optional (B, 1, H, W) (broadcast over channels) or (B, C, H, W)
            defect mask in [0, 1] (float, bool or integer dtype; values are not
            range-checked); weight ``w = 1 + (lambda_mask - 1) * mask``.
        lambda_mask: weight of masked pixels, >= 0 (1 = no weighting).
        paired: batch holds winners then losers (B even), Diffusion-DPO form.
        lambda_sft: weight of ``mean(e_theta)`` over the positives (winners when
            paired, every sample otherwise), >= 0.
        loss_type: the preference form, one of ``sigmoid`` (default), ``hinge``,
            ``ipo``, ``kto`` (unpaired only), ``margin`` (reference-free, paired only);
            diffusers' ``--loss_type`` names where they overlap.
        labels: ``kto``: (B,) 1 desirable / 0 undesirable (bool, int or float);
            default: every sample desirable.
        weights: optional per-term weights of the preference term: (B,) unpaired,
            (B/2,) paired; finite, >= 0 (not checked on CUDA: no device sync).
        lambda_desirable, lambda_undesirable: ``kto``'s weights of the two labels (> 0).
        backend: "auto" (Triton on CUDA, PyTorch elsewhere), "triton" or "torch";
            None reads ``APO_FAST_BACKEND``.

    Returns:
        :class:`APOLossOutput` with a float32 scalar ``loss``, (B,) ``e_theta`` and
        ``e_ref``, and lazily synced ``metrics``.

    NaN/Inf in the inputs are not checked (that would cost a device sync per
    call); they propagate into ``loss`` and the metrics, so check
    ``torch.isfinite(out.loss)`` where you need to.
    """
    validate_predictions(model_pred, ref_pred, target)
    validate_mask(mask, model_pred)
    lambda_mask = check_number("lambda_mask", lambda_mask, minimum=0.0)
    lambda_sft = check_number("lambda_sft", lambda_sft, minimum=0.0)
    if not isinstance(paired, bool):
        raise TypeError(f"paired must be a bool, got {type(paired).__name__}")
    beta = beta_per_term(beta_t, model_pred.shape[0], paired, model_pred.device)
    form = check_form(loss_type, labels, weights, lambda_desirable, lambda_undesirable, model_pred, paired)
    if lambda_mask == 1.0:
        mask = None  # w == 1 everywhere: skip reading the mask
    fused = use_triton(model_pred, ref_pred, target, mask, override=backend)
    dtypes = {model_pred.dtype, ref_pred.dtype, target.dtype}
    if fused and not dtypes <= set(FUSED_DTYPES):
        if requested_backend(backend) == "triton":
            raise TypeError(f"the Triton backend supports {FUSED_DTYPES} inputs, got {sorted(map(str, dtypes))}")
        fused = False
    if fused:
        from apo_fast.ops.apo_loss.fused import apply_fused_apo_loss

        loss, e_theta, e_ref, values = apply_fused_apo_loss(
            model_pred, ref_pred, target, beta, mask, lambda_mask, paired, lambda_sft, form=form
        )
    else:
        loss, e_theta, e_ref, values = apo_loss_reference(
            model_pred, ref_pred, target, beta, mask, lambda_mask, paired, lambda_sft, form
        )
    return APOLossOutput(loss, e_theta, e_ref, values, metric_names_for(paired, lambda_sft > 0))

