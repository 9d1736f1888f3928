"""The downstream detector: a DRAEM-style discriminative segmentation U-Net.

DRAEM (Zavrtanik et al. 2021) trains a discriminative U-Net on normal images
and synthetic anomalies with their masks, using a focal loss, and scores an
image by the maximum of its mean-filtered anomaly map. This module keeps that
recipe but feeds the image alone (no reconstruction sub-network): the point is
to compare sources of synthetic anomalies, and the image-only network keeps the
comparison direct and small enough to train on a CPU at 32-64 px in a minute
or two. GroupNorm replaces BatchNorm so train and eval behave the same with
the small batches used here.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .detection import image_metrics, pixel_metrics
from .images import check_images, check_masks


class _ConvBlock(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        groups = math.gcd(8, cout)
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.GroupNorm(groups, cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.GroupNorm(groups, cout),
            nn.ReLU(inplace=True),
        )


class DiscriminativeUNet(nn.Module):
    """Small U-Net mapping an image to 2-class (normal, anomalous) logits.

    Args:
        in_channels: image channels.
        base_channels: width of the first level; level i has
            ``base_channels * 2**min(i, 3)`` channels.
        depth: number of 2x downsamplings (any input size works; skips are
            matched by interpolation).
        out_channels: 2 (normal / anomalous logits).

    Shapes: ``forward`` (N,in_channels,H,W) -> (N,out_channels,H,W).
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 16, depth: int = 3, out_channels: int = 2):
        super().__init__()
        if depth < 1 or base_channels < 1:
            raise ValueError(f"depth and base_channels must be >= 1, got {depth} and {base_channels}")
        widths = [base_channels * 2 ** min(i, 3) for i in range(depth + 1)]
        self.encoder = nn.ModuleList([_ConvBlock(in_channels, widths[0])])
        self.encoder.extend(_ConvBlock(widths[i], widths[i + 1]) for i in range(depth))
        self.decoder = nn.ModuleList(_ConvBlock(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(depth)))
        self.head = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(x if i == 0 else F.max_pool2d(x, 2, ceil_mode=True))
            skips.append(x)
        x = skips.pop()
        for block in self.decoder:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.head(x)


def focal_loss(
    logits: torch.Tensor, target: torch.Tensor, *, gamma: float = 2.0, alpha: float | None = None
) -> torch.Tensor:
    """Mean focal loss ``-(1 - p_t)^gamma log p_t`` over pixels.

    Args:
        logits: (N,2,H,W) class logits.
        target: (N,H,W) integer class (0 normal, 1 anomalous).
        gamma: focusing exponent (DRAEM: 2).
        alpha: optional weight of class 1 (class 0 gets 1 - alpha).
    """
    log_p = F.log_softmax(logits.float(), dim=1)
    log_pt = log_p.gather(1, target.unsqueeze(1)).squeeze(1)
    loss = -((1.0 - log_pt.exp()) ** gamma) * log_pt
    if alpha is not None:
        loss = loss * torch.where(target == 1, alpha, 1.0 - alpha)
    return loss.mean()


def dice_loss(prob: torch.Tensor, mask: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice between anomaly probability (N,H,W) and mask (N,H,W), over the batch."""
    inter = (prob * mask).sum()
    return 1.0 - (2.0 * inter + eps) / (prob.sum() + mask.sum() + eps)


def train_segmenter(
    normal_images: torch.Tensor,
    anomaly_images: torch.Tensor | None,
    anomaly_masks: torch.Tensor | None,
    *,
    steps: int = 300,
    batch_size: int = 8,
    lr: float = 1e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    anomaly_fraction: float = 0.5,
    base_channels: int = 16,
    depth: int = 3,
    focal_gamma: float = 2.0,
    dice_weight: float = 0.0,
    smooth_l1_weight: float = 0.0,
    augment: bool = False,
) -> DiscriminativeUNet:
    """Train a :class:`DiscriminativeUNet` from scratch.

    Every sample of a batch is, with probability ``anomaly_fraction``, a
    synthetic anomaly with its mask, else a normal image with an all-zero mask
    (DRAEM's mix). With no anomalies (``anomaly_images`` None or empty) every
    sample is normal: the honest "no synthetic data" baseline, a weak detector.

    Args:
        normal_images: (N,3,H,W) normal images in [-1, 1].
        anomaly_images: (M,3,H,W) synthetic anomalies in [-1, 1], or None.
        anomaly_masks: (M,1,H,W) their masks in [0, 1] (thresholded at 0.5), or None.
        steps, batch_size, lr: Adam optimisation schedule.
        seed: seeds initialisation and batch sampling (global RNG untouched).
        device: training device.
        progress: show a tqdm bar.
        anomaly_fraction: probability a batch sample is anomalous.
        base_channels, depth: network size.
        focal_gamma: focal loss exponent.
        dice_weight, smooth_l1_weight: optional extra losses on the anomaly probability.
        augment: random horizontal/vertical flips (textures; avoid for oriented objects).

    Returns:
        The trained model, in eval mode, on ``device``.
    """
    has_anomalies = _check_segmenter_inputs(normal_images, anomaly_images, anomaly_masks, steps, batch_size,
                                            anomaly_fraction)
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DiscriminativeUNet(3, base_channels, depth).to(device)
    gen = torch.Generator().manual_seed(seed)
    normals = normal_images.detach().float().to(device)
    if has_anomalies:
        anomalies = anomaly_images.detach().float().to(device)
        masks = (anomaly_masks.detach().float() > 0.5).float().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    model.train()
    bar = tqdm(range(steps), desc="segmenter", disable=not progress, leave=False)
    for _ in bar:
        images, target = _draw_batch(normals, anomalies if has_anomalies else None, masks if has_anomalies else None,
                                     batch_size, anomaly_fraction, augment, gen)
        logits = model(images)
        loss = focal_loss(logits, target.long(), gamma=focal_gamma)
        if dice_weight or smooth_l1_weight:
            prob = logits.float().softmax(dim=1)[:, 1]
            if dice_weight:
                loss = loss + dice_weight * dice_loss(prob, target)
            if smooth_l1_weight:
                loss = loss + smooth_l1_weight * F.smooth_l1_loss(prob, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if progress:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return model.eval()


def _check_segmenter_inputs(normal_images, anomaly_images, anomaly_masks, steps, batch_size, anomaly_fraction) -> bool:
    """Refuse malformed training inputs; True when there are synthetic anomalies."""
    check_images(normal_images, "normal_images")
    if normal_images.shape[0] == 0:
        raise ValueError("normal_images must hold at least one image")
    has_anomalies = anomaly_images is not None and anomaly_images.shape[0] > 0
    if has_anomalies:
        check_images(anomaly_images, "anomaly_images")
        if anomaly_images.shape[-2:] != normal_images.shape[-2:]:
            raise ValueError(
                f"anomaly_images must have the normal images' size {tuple(normal_images.shape[-2:])}, "
                f"got {tuple(anomaly_images.shape[-2:])}"
            )
        if anomaly_masks is None:
            raise ValueError("anomaly_masks is required when anomaly_images are given")
        check_masks(anomaly_masks, anomaly_images, "anomaly_masks")
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not 0.0 <= anomaly_fraction <= 1.0:
        raise ValueError(f"anomaly_fraction must be in [0, 1], got {anomaly_fraction}")

    return has_anomalies


def _draw_batch(normals, anomalies, masks, batch_size: int, anomaly_fraction: float, augment: bool,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One DRAEM mix batch: each sample an anomaly with its mask (probability
    ``anomaly_fraction``) or a normal image with an empty mask, optionally flipped."""
    device = normals.device
    height, width = normals.shape[-2:]
    images = normals[torch.randint(normals.shape[0], (batch_size,), generator=gen).to(device)]
    target = torch.zeros(batch_size, height, width, device=device)
    if anomalies is not None:
        is_anomaly = (torch.rand(batch_size, generator=gen) < anomaly_fraction).to(device)
        picks = torch.randint(anomalies.shape[0], (batch_size,), generator=gen).to(device)
        images = torch.where(is_anomaly[:, None, None, None], anomalies[picks], images)
        target = torch.where(is_anomaly[:, None, None], masks[picks, 0], target)
    if augment:
        flips = torch.rand(batch_size, 2, generator=gen).to(device) < 0.5
        images = torch.where(flips[:, 0, None, None, None], images.flip(-1), images)
        target = torch.where(flips[:, 0, None, None], target.flip(-1), target)
        images = torch.where(flips[:, 1, None, None, None], images.flip(-2), images)
        target = torch.where(flips[:, 1, None, None], target.flip(-2), target)
    return images, target


@torch.no_grad()
def predict_anomaly_maps(model: nn.Module, images: torch.Tensor, *, batch_size: int = 32) -> torch.Tensor:
    """Anomaly probability per pixel: (N,3,H,W) in [-1, 1] -> (N,H,W) float32 on the CPU."""
    check_images(images, "images")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    maps = [
        model(images[i:i + batch_size].float().to(device)).float().softmax(dim=1)[:, 1].cpu()
        for i in range(0, images.shape[0], batch_size)
    ]
    model.train(was_training)
    return torch.cat(maps) if maps else images.new_zeros(0, *images.shape[-2:])


def default_smoothing_kernel(height: int, width: int) -> int:
    """DRAEM's 21-px mean filter at 256 px, scaled to the image size (odd, >= 3)."""
    k = max(3, int(round(21 * min(height, width) / 256)))
    return k if k % 2 == 1 else k + 1


def image_scores_from_maps(maps: torch.Tensor, *, kernel_size: int | None = None) -> torch.Tensor:
    """Image score = max of the mean-filtered anomaly map (DRAEM). (N,H,W) -> (N,)."""
    if maps.ndim != 3:
        raise ValueError(f"maps must have shape (N,H,W), got {tuple(maps.shape)}")
    k = kernel_size or default_smoothing_kernel(*maps.shape[-2:])
    if k < 1 or k % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd int, got {k}")
    smoothed = F.avg_pool2d(maps[:, None].float(), k, stride=1, padding=k // 2)
    return smoothed.flatten(1).amax(dim=1)


def evaluate_segmenter(
    model: nn.Module,
    test_images: torch.Tensor,
    test_masks: torch.Tensor,
    test_labels: Any = None,
    *,
    batch_size: int = 32,
    smoothing_kernel: int | None = None,
    pro: bool = True,
    fpr_limit: float = 0.3,
    pro_thresholds: int | None = None,
) -> dict[str, float]:
    """Image- and pixel-level detection metrics of a trained segmenter on real test data.

    Args:
        model: a trained :class:`DiscriminativeUNet` (or any (N,3,H,W) -> (N,2,H,W) net).
        test_images: (N,3,H,W) held-out test images in [-1, 1] (good and anomalous).
        test_masks: (N,1,H,W) ground-truth masks in [0, 1], binarised at 0.5 (zeros for good images).
        test_labels: (N,) image labels (1 anomalous); None derives them from the masks.
        batch_size: inference batch.
        smoothing_kernel: mean-filter size for image scores (None: scaled DRAEM 21/256).
        pro, fpr_limit, pro_thresholds: PRO options, see :func:`apo_fast.eval.detection.pro_score`.

    Returns:
        ``image_auroc, image_ap, image_f1_max, pixel_auroc, pixel_ap,
        pixel_f1_max, pixel_pro`` as floats in [0, 1]; NaN where undefined
        (e.g. no good images, or no defect pixel).
    """
    check_images(test_images, "test_images")
    check_masks(test_masks, test_images, "test_masks")
    binary_masks = (test_masks[:, 0] > 0.5).float()
    if test_labels is None:
        test_labels = binary_masks.flatten(1).any(dim=1).long()
    labels = torch.as_tensor(test_labels).reshape(-1)
    if labels.numel() != test_images.shape[0]:
        raise ValueError(f"test_labels must hold one label per image ({test_images.shape[0]}), got {labels.numel()}")
    maps = predict_anomaly_maps(model, test_images, batch_size=batch_size)
    scores = image_scores_from_maps(maps, kernel_size=smoothing_kernel)
    out = image_metrics(scores, labels)
    out.update(
        pixel_metrics(maps, binary_masks, pro=pro, fpr_limit=fpr_limit, num_thresholds=pro_thresholds)
    )
    return out
