"""CutPaste-style synthetic anomalies: the "pasted patches" baseline.

Following CutPaste (Li et al. 2021): a region is cut from a normal image,
colour-jittered (brightness, contrast, saturation; no hue), and pasted at
another place of the same or another normal image. Two shapes: ``"patch"``
(an axis-aligned rectangle of 2-15 % of the image, aspect 0.3-3.3) and
``"scar"`` (a thin rotated bar). Sizes are fractions of the image side so the
defects stay visible at demo resolutions; the original pixel sizes (scar 2-16
by 10-25 px at 256 px) are reachable through the arguments.

The mask marks exactly the pixels that changed: the pasted region, minus any
pixel whose pasted value equals the original. If no draw changes a pixel in
``MAX_ATTEMPTS`` tries (e.g. a constant image), the sample is an unchanged
normal image with an empty mask.
"""
from __future__ import annotations

import math

import torch

from .images import check_images

KINDS = ("patch", "scar")
MAX_ATTEMPTS = 10
_LUMA = (0.299, 0.587, 0.114)


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=gen))


def _randint(gen: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in [low, high] inclusive."""
    return int(torch.randint(low, high + 1, (), generator=gen))


def _patch_offsets(gen, height, width, area, aspect) -> tuple[torch.Tensor, torch.Tensor]:
    a = _uniform(gen, *area) * height * width
    r = math.exp(_uniform(gen, math.log(aspect[0]), math.log(aspect[1])))
    h = min(max(1, round(math.sqrt(a / r))), height - 1)
    w = min(max(1, round(math.sqrt(a * r))), width - 1)
    dy, dx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return dy.reshape(-1), dx.reshape(-1)


def _scar_offsets(gen, height, width, width_frac, length_frac, max_angle) -> tuple[torch.Tensor, torch.Tensor]:
    side = min(height, width)
    bar_w = max(1.0, _uniform(gen, *width_frac) * side)
    bar_l = max(2.0, _uniform(gen, *length_frac) * side)
    theta = math.radians(_uniform(gen, -max_angle, max_angle))
    radius = math.ceil(math.hypot(bar_w, bar_l) / 2)
    dy, dx = torch.meshgrid(torch.arange(-radius, radius + 1), torch.arange(-radius, radius + 1), indexing="ij")
    along = dy * math.cos(theta) + dx * math.sin(theta)
    across = -dy * math.sin(theta) + dx * math.cos(theta)
    inside = (along.abs() <= bar_l / 2) & (across.abs() <= bar_w / 2)
    return dy[inside], dx[inside]


def _color_jitter(pixels: torch.Tensor, gen: torch.Generator, strength: float) -> torch.Tensor:
    """Brightness, contrast, saturation jitter of (3,P) pixels in [-1, 1] (torchvision-like factors)."""
    u = (pixels + 1.0) / 2.0
    luma = torch.tensor(_LUMA, dtype=u.dtype, device=u.device)[:, None]
    u = (u * _uniform(gen, 1 - strength, 1 + strength)).clamp(0, 1)
    mean = (u * luma).sum(0).mean()
    u = ((u - mean) * _uniform(gen, 1 - strength, 1 + strength) + mean).clamp(0, 1)
    gray = (u * luma).sum(0, keepdim=True)
    u = ((u - gray) * _uniform(gen, 1 - strength, 1 + strength) + gray).clamp(0, 1)
    return u * 2.0 - 1.0


def cutpaste_anomalies(
    normal_images: torch.Tensor,
    n: int,
    generator: torch.Generator | None = None,
    *,
    kinds: tuple[str, ...] = KINDS,
    patch_area: tuple[float, float] = (0.02, 0.15),
    patch_aspect: tuple[float, float] = (0.3, 3.3),
    scar_width: tuple[float, float] = (0.03, 0.08),
    scar_length: tuple[float, float] = (0.15, 0.4),
    scar_angle: float = 45.0,
    jitter: float = 0.1,
    same_image_prob: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Make ``n`` CutPaste anomalies from normal images.

    Args:
        normal_images: (N,3,H,W) normal images in [-1, 1], H and W >= 4.
        n: number of anomalies to make.
        generator: CPU ``torch.Generator`` for every random choice (None: a fresh
            one seeded 0, so results are reproducible).
        kinds: shapes to draw from, among ``("patch", "scar")``.
        patch_area: patch area as a fraction of H*W.
        patch_aspect: patch width/height ratio range (log-uniform).
        scar_width, scar_length: scar size as fractions of min(H, W).
        scar_angle: scar rotation drawn from [-scar_angle, scar_angle] degrees.
        jitter: colour jitter strength (factors in [1 - jitter, 1 + jitter]).
        same_image_prob: probability to cut from the image being pasted into
            (else from another random normal image).

    Returns:
        ``(images, masks)``: (n,3,H,W) in [-1, 1] and (n,1,H,W) float 0/1
        marking exactly the changed pixels, both on the input's device and dtype.
    """
    check_images(normal_images, "normal_images")
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if normal_images.shape[0] == 0:
        raise ValueError("normal_images must hold at least one image")
    height, width = normal_images.shape[-2:]
    if min(height, width) < 4:
        raise ValueError(f"normal_images must be at least 4x4, got {height}x{width}")
    if not kinds or any(k not in KINDS for k in kinds):
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {kinds!r}")
    for name, (lo, hi) in (("patch_area", patch_area), ("scar_width", scar_width), ("scar_length", scar_length)):
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"{name} must satisfy 0 < low <= high <= 1, got {(lo, hi)}")
    if not 0 < patch_aspect[0] <= patch_aspect[1]:
        raise ValueError(f"patch_aspect must satisfy 0 < low <= high, got {patch_aspect}")
    if not 0 <= jitter < 1:
        raise ValueError(f"jitter must be in [0, 1), got {jitter}")
    if not 0 <= same_image_prob <= 1:
        raise ValueError(f"same_image_prob must be in [0, 1], got {same_image_prob}")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)

    images = torch.empty(n, *normal_images.shape[1:], dtype=normal_images.dtype, device=normal_images.device)
    masks = torch.zeros(n, 1, height, width, dtype=normal_images.dtype, device=normal_images.device)
    num = normal_images.shape[0]
    for i in range(n):
        images[i] = normal_images[_randint(gen, 0, num - 1)]  # kept only if no attempt changes a pixel
        for _attempt in range(MAX_ATTEMPTS):
            target_idx = _randint(gen, 0, num - 1)
            same = num == 1 or float(torch.rand((), generator=gen)) < same_image_prob
            source_idx = target_idx if same else _randint(gen, 0, num - 1)
            kind = kinds[_randint(gen, 0, len(kinds) - 1)]
            if kind == "patch":
                dy, dx = _patch_offsets(gen, height, width, patch_area, patch_aspect)
            else:
                dy, dx = _scar_offsets(gen, height, width, scar_width, scar_length, scar_angle)
            y_lo, y_hi = -int(dy.min()), height - 1 - int(dy.max())
            x_lo, x_hi = -int(dx.min()), width - 1 - int(dx.max())
            if y_lo > y_hi or x_lo > x_hi:
                continue  # shape larger than the image; draw again
            sy, sx = _randint(gen, y_lo, y_hi), _randint(gen, x_lo, x_hi)
            ty, tx = _randint(gen, y_lo, y_hi), _randint(gen, x_lo, x_hi)
            if source_idx == target_idx and (sy, sx) == (ty, tx):
                continue  # pasting onto itself changes only the colour; draw a real move
            target = normal_images[target_idx]
            patch = _color_jitter(normal_images[source_idx][:, sy + dy, sx + dx], gen, jitter)
            out = target.clone()
            out[:, ty + dy, tx + dx] = patch.to(out.dtype)
            changed = (out != target).any(dim=0)
            if changed.any():
                images[i] = out
                masks[i, 0] = changed.to(masks.dtype)
                break
    return images, masks
