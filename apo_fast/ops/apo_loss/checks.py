"""Input checks of the APO loss op, shared by the public API and the fused entry point.
"""

from __future__ import annotations

import math

import torch

# --------------------------------------------------------------------------- validation


def check_number(name: str, value: object, *, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def validate_predictions(model_pred: object, ref_pred: object, target: object) -> None:
    """Same shape (B, ...) and device, floating dtypes (they may differ); raises TypeError/ValueError."""
    for name, t in (("model_pred", model_pred), ("ref_pred", ref_pred), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if model_pred.dim() < 2:
        raise ValueError(f"model_pred must have shape (B, ...) with at least 2 dims, got {tuple(model_pred.shape)}")
    if model_pred.numel() == 0:
        raise ValueError(f"model_pred must not be empty, got shape {tuple(model_pred.shape)}")
    for name, t in (("ref_pred", ref_pred), ("target", target)):
        if t.shape != model_pred.shape:
            raise ValueError(
                f"{name} must have the shape of model_pred {tuple(model_pred.shape)}, got {tuple(t.shape)}"
            )
        if t.device != model_pred.device:
            raise ValueError(f"{name} must be on the device of model_pred ({model_pred.device}), got {t.device}")


def validate_mask(mask: object, model_pred: torch.Tensor) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.is_complex():
        raise TypeError(f"mask must be a real (float, bool or integer) tensor, got {mask.dtype}")
    shape = tuple(model_pred.shape)
    broadcast = (shape[0], 1, *shape[2:])
    if tuple(mask.shape) not in (shape, broadcast):
        raise ValueError(f"mask must have shape {broadcast} or {shape}, got {tuple(mask.shape)}")
    if mask.device != model_pred.device:
        raise ValueError(f"mask must be on the device of model_pred ({model_pred.device}), got {mask.device}")


def check_form(loss_type: object, labels: object, weights: object, lambda_desirable: object,
               lambda_undesirable: object, model_pred: torch.Tensor, paired: bool):
    """The validated :class:`~apo_fast.ops.apo_loss.naive.PreferenceForm` of an ``apo_loss`` call."""
    from apo_fast.config.choices import LOSS_TYPES
    from apo_fast.ops.apo_loss.naive import PreferenceForm

    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if loss_type == "kto" and paired:
        raise ValueError("loss_type='kto' is unpaired (a label per sample); use paired=False")
    if loss_type == "margin" and not paired:
        raise ValueError("loss_type='margin' compares winners with losers; use paired=True")
    n = model_pred.shape[0]
    n_terms = n // 2 if paired else n
    if labels is not None:
        if loss_type != "kto":
            raise ValueError(f"labels are for loss_type='kto', got loss_type={loss_type!r}")
        if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (n,) or labels.is_complex():
            raise ValueError(f"labels must be a real tensor of shape ({n},), got "
                             f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
        if labels.device != model_pred.device:
            raise ValueError(f"labels must be on the device of model_pred ({model_pred.device}), got {labels.device}")
        if labels.device.type == "cpu" and not bool(((labels == 0) | (labels == 1)).all()):
            raise ValueError("labels must be 0 (undesirable) or 1 (desirable)")
        labels = labels.to(torch.float32)
    if weights is not None:
        if not isinstance(weights, torch.Tensor) or not weights.is_floating_point() or tuple(weights.shape) != (n_terms,):
            raise ValueError(f"weights must be a floating tensor of shape ({n_terms},) (one per loss term), got "
                             f"{tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__}")
        if weights.device != model_pred.device:
            raise ValueError(f"weights must be on the device of model_pred ({model_pred.device}), got {weights.device}")
        if weights.device.type == "cpu" and not bool((torch.isfinite(weights) & (weights >= 0)).all()):
            raise ValueError("weights must be finite and >= 0")
    lam_d = check_number("lambda_desirable", lambda_desirable, minimum=0.0)
    lam_u = check_number("lambda_undesirable", lambda_undesirable, minimum=0.0)
    return PreferenceForm(loss_type, labels, weights, lam_d, lam_u)
