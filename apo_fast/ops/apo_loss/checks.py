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
    """Same shape (B, ...), same floating dtype, same device; raises TypeError/ValueError."""
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
        if t.dtype != model_pred.dtype:
            raise TypeError(f"{name} must have the dtype of model_pred ({model_pred.dtype}), got {t.dtype}")
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
