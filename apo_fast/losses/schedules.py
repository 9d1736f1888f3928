"""The per-sample preference temperature ``beta_t`` (APO_SPEC "Loss": beta_t from dlambda/dt).
"""

from __future__ import annotations

import torch

from apo_fast.config.choices import BETA_SCHEDULES
from apo_fast.ops.apo_loss.checks import check_number

# --------------------------------------------------------------------------- beta_t


def beta_schedule(
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    kind: str = "dlogsnr",
    beta: float = 1.0,
) -> torch.Tensor:
    """Per-sample temperature ``beta_t`` for the timesteps of a batch.

    Args:
        timesteps: (B,) integer tensor of discrete timesteps in [0, T).
        alphas_cumprod: (T,) the scheduler's cumulative alphas, strictly
            decreasing in (0, 1) (``scheduler.alphas_cumprod``).
        kind:
            ``"dlogsnr"`` (default, APO_SPEC): ``beta_t = -0.5 * beta * dlambda/dt``
            with ``lambda_t = log(abar_t / (1 - abar_t))``; the derivative is a
            finite difference over the discrete table (central inside, one-sided
            at t = 0 and t = T-1), per unit timestep.
            ``"constant"``: ``beta_t = beta``.
            ``"snr"``: ``beta_t = beta * SNR_t / (1 + SNR_t) = beta * abar_t``,
            the bounded SNR weight ``sigmoid(lambda_t)``: full temperature at low
            noise, fading towards 0 at high noise (our choice; the paper gives
            no formula for it).
        beta: base temperature (> 0).

    Returns:
        (B,) float32 tensor on ``timesteps``' device, all entries > 0.

    Timesteps out of range raise ValueError on CPU; on CUDA they are not
    checked (no device sync) and trip the indexing assertion instead.
    """
    if kind not in BETA_SCHEDULES:
        raise ValueError(f"kind must be one of {BETA_SCHEDULES}, got {kind!r}")
    beta = check_number("beta", beta)
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not isinstance(timesteps, torch.Tensor) or timesteps.dtype.is_floating_point or timesteps.dtype == torch.bool:
        raise TypeError("timesteps must be an integer tensor of shape (B,)")
    if timesteps.dim() != 1:
        raise ValueError(f"timesteps must have shape (B,), got {tuple(timesteps.shape)}")
    if not isinstance(alphas_cumprod, torch.Tensor) or not alphas_cumprod.is_floating_point():
        raise TypeError("alphas_cumprod must be a floating-point tensor of shape (T,)")
    if alphas_cumprod.dim() != 1 or alphas_cumprod.numel() < 2:
        raise ValueError(f"alphas_cumprod must have shape (T,) with T >= 2, got {tuple(alphas_cumprod.shape)}")
    abar = alphas_cumprod.detach().to(device="cpu", dtype=torch.float64)
    if not bool(((abar > 0) & (abar < 1)).all()) or not bool((abar[1:] < abar[:-1]).all()):
        raise ValueError("alphas_cumprod must lie in (0, 1) and decrease strictly with t")
    n_steps = abar.numel()
    if timesteps.device.type == "cpu" and timesteps.numel():
        lo, hi = int(timesteps.min()), int(timesteps.max())
        if lo < 0 or hi >= n_steps:
            raise ValueError(f"timesteps must lie in [0, {n_steps}), got values in [{lo}, {hi}]")
    if kind == "constant":
        return torch.full(timesteps.shape, beta, dtype=torch.float32, device=timesteps.device)
    if kind == "snr":
        table = beta * abar
    else:
        log_snr = torch.log(abar) - torch.log1p(-abar)
        slope = torch.empty_like(log_snr)
        slope[1:-1] = (log_snr[2:] - log_snr[:-2]) / 2.0
        slope[0] = log_snr[1] - log_snr[0]
        slope[-1] = log_snr[-1] - log_snr[-2]
        table = -0.5 * beta * slope
    table = table.to(device=timesteps.device, dtype=torch.float32)
    return table[timesteps.long()]
