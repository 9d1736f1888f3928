"""The plain (mask-weighted) diffusion loss of LoRA fine-tuning: the no-preference baseline."""
from __future__ import annotations

import torch

from apo_fast.ops.apo_loss.naive import METRIC_SLOTS, NUM_METRIC_SLOTS, APOLossOutput


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, lambda_mask: float) -> APOLossOutput:
    """``mean_i mean(w * (pred_i - target_i)^2)`` with ``w = 1 + (lambda_mask - 1) * mask``.

    Args:
        pred, target: (B, C, H, W) prediction and regression target (any (B, ...) works).
        mask: (B, 1, H, W) or (B, C, H, W) defect mask in [0, 1].
        lambda_mask: weight of masked pixels (1 = no weighting).

    Returns an :class:`~apo_fast.losses.APOLossOutput` (float32 math) whose ``e_ref`` is
    NaN: there is no reference pass.
    """
    w = 1.0 + (lambda_mask - 1.0) * mask.float()
    e = (w * (pred.float() - target.float()) ** 2).mean(dim=tuple(range(1, pred.dim())))
    loss = e.mean()
    values = torch.full((NUM_METRIC_SLOTS,), float("nan"), device=e.device)
    values[METRIC_SLOTS["loss"]] = loss.detach()
    values[METRIC_SLOTS["e_theta"]] = e.detach().mean()
    return APOLossOutput(loss, e.detach(), torch.full_like(e, float("nan")), values, ("loss", "e_theta"))
