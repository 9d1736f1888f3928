"""SSIM and MS-SSIM in plain PyTorch, with scales adapted to small images.

Standard definitions (Wang et al. 2003/2004): an 11-tap Gaussian window
(sigma 1.5) applied without padding, constants K1 = 0.01, K2 = 0.03 times the
data range, contrast-structure terms at every scale but the coarsest, the full
SSIM at the coarsest, combined by a weighted product. Negative terms are
clamped to zero before the fractional powers (as pytorch-msssim does) so the
result is always defined.

The original five scales need images of at least 161 px. For the small images
this project evaluates at (32-64 px) the number of scales is chosen so the
coarsest scale keeps at least 16 px (64 px -> 3 scales, 32 px -> 2, >= 256 px
-> 5), and the first ``scales`` of the standard weights are renormalised to
sum to one. The window shrinks (odd, at most 11) when an image is smaller than
the window.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MIN_COARSEST_SIZE = 16


def _check_images(x: torch.Tensor, y: torch.Tensor) -> None:
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 4:
            raise ValueError(f"{name} must have shape (N,C,H,W), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating point tensor, got {t.dtype}")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")


def gaussian_window(size: int, sigma: float, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """Normalised 1-D Gaussian of ``size`` taps (size,)."""
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2.0
    g = torch.exp(-(coords**2) / (2.0 * sigma**2))
    return g / g.sum()


def _blur(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' Gaussian filter per channel: (N,C,H,W) -> (N,C,H-k+1,W-k+1)."""
    c = x.shape[1]
    k = window.numel()
    x = F.conv2d(x, window.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
    return F.conv2d(x, window.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)


def _ssim_and_cs(
    x: torch.Tensor, y: torch.Tensor, window: torch.Tensor, data_range: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image, per-channel SSIM and contrast-structure term, each (N,C)."""
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    mu_x, mu_y = _blur(x, window), _blur(y, window)
    sxx = _blur(x * x, window) - mu_x * mu_x
    syy = _blur(y * y, window) - mu_y * mu_y
    sxy = _blur(x * y, window) - mu_x * mu_y
    cs_map = (2.0 * sxy + c2) / (sxx + syy + c2)
    ssim_map = (2.0 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1) * cs_map
    return ssim_map.mean(dim=(2, 3)), cs_map.mean(dim=(2, 3))


def _window_size(min_side: int, window_size: int) -> int:
    size = min(window_size, min_side)
    return size if size % 2 == 1 else size - 1


def ssim(
    x: torch.Tensor, y: torch.Tensor, *, data_range: float = 2.0, window_size: int = 11, sigma: float = 1.5
) -> torch.Tensor:
    """Mean SSIM per image.

    Args:
        x, y: (N,C,H,W) images; [-1, 1] images have ``data_range`` 2.
        data_range: max - min of the pixel range.
        window_size: Gaussian window taps (odd; reduced for images smaller than it).
        sigma: Gaussian standard deviation.

    Returns:
        (N,) SSIM, channels averaged; 1 for identical images.
    """
    _check_images(x, y)
    size = _window_size(min(x.shape[-2:]), window_size)
    window = gaussian_window(size, sigma, dtype=x.dtype, device=x.device)
    s, _ = _ssim_and_cs(x, y, window, data_range)
    return s.mean(dim=1)


def default_scales(height: int, width: int) -> int:
    """Number of MS-SSIM scales keeping the coarsest scale >= 16 px (1..5)."""
    side = min(height, width)
    scales = 1
    while scales < len(MS_SSIM_WEIGHTS) and side // 2**scales >= MIN_COARSEST_SIZE:
        scales += 1
    return scales


def ms_ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    data_range: float = 2.0,
    scales: int | None = None,
    weights: tuple[float, ...] | None = None,
    window_size: int = 11,
    sigma: float = 1.5,
) -> torch.Tensor:
    """Multi-scale SSIM per image.

    Args:
        x, y: (N,C,H,W) images.
        data_range: max - min of the pixel range (2 for [-1, 1]).
        scales: number of scales; None picks :func:`default_scales`.
        weights: per-scale exponents (len == scales); None takes the first
            ``scales`` standard weights, renormalised to sum to 1.
        window_size, sigma: Gaussian window (window shrinks at the coarsest scale if needed).

    Returns:
        (N,) MS-SSIM in [0, 1], channels averaged; 1 for identical images.
    """
    _check_images(x, y)
    if scales is None:
        scales = default_scales(*x.shape[-2:])
    if not isinstance(scales, int) or scales < 1:
        raise ValueError(f"scales must be a positive int, got {scales!r}")
    if min(x.shape[-2:]) // 2 ** (scales - 1) < 1:
        raise ValueError(f"images of size {tuple(x.shape[-2:])} are too small for {scales} scales")
    if weights is None:
        if scales > len(MS_SSIM_WEIGHTS):
            raise ValueError(f"scales > {len(MS_SSIM_WEIGHTS)} needs explicit weights")
        weights = MS_SSIM_WEIGHTS[:scales]
        total = sum(weights)
        weights = tuple(w / total for w in weights)
    if len(weights) != scales:
        raise ValueError(f"weights must have {scales} entries (one per scale), got {len(weights)}")

    coarsest = min(x.shape[-2:]) // 2 ** (scales - 1)
    size = _window_size(coarsest, window_size)
    window = gaussian_window(size, sigma, dtype=x.dtype, device=x.device)
    result = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device)
    for level, w in enumerate(weights):
        s, cs = _ssim_and_cs(x, y, window, data_range)
        term = s if level == scales - 1 else cs
        result = result * term.clamp(min=0.0) ** w
        if level < scales - 1:
            pad = (0, x.shape[-1] % 2, 0, x.shape[-2] % 2)
            x = F.avg_pool2d(F.pad(x, pad, mode="replicate"), 2)
            y = F.avg_pool2d(F.pad(y, pad, mode="replicate"), 2)
    return result.mean(dim=1)
