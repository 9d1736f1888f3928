"""How the defect mask weighs a sample's residual error (``loss.mask_weight``)."""
from __future__ import annotations

import torch

from apo_fast.config.choices import MASK_WEIGHTS

#: the smallest mask area (share of the image) ``area`` weighting divides by: a mask of a few
#: pixels is weighted as one of 1% of the image, so its weight stays <= 100 per pixel.
MIN_AREA = 0.01


def mask_weights(mask: torch.Tensor, kind: str = "pixel") -> torch.Tensor:
    """The ``m`` of ``w = 1 + (lambda_mask - 1) * m`` for a (B, 1, H, W) mask in [0, 1].

    ``"pixel"``: the mask itself (every defect pixel weighs ``lambda_mask``). ``"area"``: each
    sample's mask divided by its mean over the image (at least :data:`MIN_AREA`), so that
    ``mean(w * r^2) = mean(r^2) + (lambda_mask - 1) * (mean of r^2 over the mask)``: the defect's
    region weighs ``lambda_mask - 1`` times the whole image, a thin crack as much as a wide stain.
    An all-zero mask (a normal image) stays zero.
    """
    if kind not in MASK_WEIGHTS:
        raise ValueError(f"mask weighting must be one of {MASK_WEIGHTS}, got {kind!r}")
    if mask.dim() != 4:
        raise ValueError(f"mask must have shape (B, C, H, W), got {tuple(mask.shape)}")
    if kind == "pixel":
        return mask
    area = mask.float().mean(dim=(1, 2, 3), keepdim=True).clamp_min(MIN_AREA)
    return (mask.float() / area).to(mask.dtype)
