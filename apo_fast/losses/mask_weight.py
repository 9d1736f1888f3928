"""How the defect mask weights the residual: ``w = 1 + (lambda_mask - 1) * m``.

``pixel`` passes the mask as it is, so a defect's share of a sample's error is its area
(a thin crack, ~2% of the image, barely moves the per-sample mean). ``area`` divides each
sample's mask by its area fraction first: the masked region then adds ``lambda_mask - 1``
times the whole image's weight, the same for a crack as for a large hole. ``sqrt_area``
divides by the square root of the area fraction: between the two, a defect's extra weight
grows as the square root of its area (a crack 7x thinner than a hole gets ~2.6x less, not 7x).
"""
from __future__ import annotations

import torch

from apo_fast.config.choices import MASK_WEIGHTS

__all__ = ["MASK_WEIGHTS", "area_normalized_mask", "loss_mask"]


def area_normalized_mask(mask: torch.Tensor, power: float = 1.0) -> torch.Tensor:
    """``mask / mean(mask) ** power`` per sample (mean over every dim but the first); all-zero
    masks (normal images) stay zero. Float masks keep their dtype (float16 / bfloat16 computed
    in float32); bool and integer masks come back float32."""
    if mask.dim() < 2:
        raise ValueError(f"mask must be (B, ...) with at least 2 dims; got shape {tuple(mask.shape)}")
    m = mask.double() if mask.dtype == torch.float64 else mask.float()
    area = m.mean(dim=tuple(range(1, m.dim())), keepdim=True)
    out = m / area.clamp_min(torch.finfo(m.dtype).tiny) ** power  # an empty mask: 0 / tiny = 0
    return out.to(mask.dtype) if mask.is_floating_point() else out


def loss_mask(mask: torch.Tensor, kind: str = "pixel") -> torch.Tensor:
    """The mask the loss's weight is built from, for ``loss.mask_weight`` = ``kind``."""
    if kind == "pixel":
        return mask
    if kind == "area":
        return area_normalized_mask(mask)
    if kind == "sqrt_area":
        return area_normalized_mask(mask, 0.5)
    raise ValueError(f"mask_weight must be one of {', '.join(MASK_WEIGHTS)}; got {kind!r}")
