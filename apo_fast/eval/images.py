"""Input checks shared by the evaluation modules."""
from __future__ import annotations

import torch


def check_images(x, name: str, *, channels: int | None = 3) -> torch.Tensor:
    """Validate an image batch: (N,C,H,W), floating point, values in [-1, 1].

    Raises:
        TypeError / ValueError naming ``name`` and what was expected.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4 or (channels is not None and x.shape[1] != channels):
        want = f"(N,{channels},H,W)" if channels is not None else "(N,C,H,W)"
        raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point in [-1, 1], got {x.dtype}")
    if x.numel() and (x.min() < -1.001 or x.max() > 1.001):
        raise ValueError(f"{name} must lie in [-1, 1], got range [{float(x.min()):.3f}, {float(x.max()):.3f}]")
    return x


def check_masks(masks, images: torch.Tensor, name: str) -> torch.Tensor:
    """Validate masks (N,1,H,W) in [0, 1] matching ``images`` (N,C,H,W)."""
    if not isinstance(masks, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(masks).__name__}")
    want = (images.shape[0], 1, *images.shape[-2:])
    if tuple(masks.shape) != want:
        raise ValueError(f"{name} must have shape {want} to match the images, got {tuple(masks.shape)}")
    if masks.numel() and (masks.min() < 0 or masks.max() > 1):
        raise ValueError(f"{name} must lie in [0, 1]")
    return masks
