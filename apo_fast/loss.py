"""The APO / Diffusion-DPO preference loss: PyTorch reference, public API and dispatch.

Per sample ``i`` (APO_SPEC "Loss"), with ``w = 1 + (lambda_mask - 1) * m`` (``w = 1``
without a mask) and the mean taken over every non-batch element::

    e_theta_i = mean(w * (model_pred_i - target_i)^2)
    e_ref_i   = mean(w * (ref_pred_i   - target_i)^2)
    delta_i   = e_theta_i - e_ref_i

    unpaired: L = mean_i  -log sigmoid(-beta_t_i * delta_i)
    paired:   L = mean_j  -log sigmoid(-beta_t_j * (delta_w_j - delta_l_j))
              (winners are the first half of the batch, losers the second)
    optional: L += lambda_sft * mean(e_theta over the positives)

:func:`apo_loss` runs the fused Triton kernels (:mod:`apo_fast.ops.apo_loss`) on CUDA
tensors and the PyTorch reference elsewhere (:func:`apo_fast.backend.use_triton`).
:func:`diffusion_dpo_loss` transcribes the two public Diffusion-DPO scripts, and
:func:`beta_schedule` gives the per-sample temperature ``beta_t``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from apo_fast.backend import requested_backend, use_triton

# Layout of the metrics vector written by both paths: name -> slot.
METRIC_SLOTS: Mapping[str, int] = {
    "loss": 0,
    "e_theta": 1,
    "e_ref": 2,
    "reward_w": 3,
    "reward_l": 4,
    "implicit_acc": 5,
    "beta_t": 6,
    "sft": 7,
}
NUM_METRIC_SLOTS = len(METRIC_SLOTS)
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BETA_SCHEDULES = ("dlogsnr", "constant", "snr")
DPO_CONVENTIONS = ("diffusers", "salesforce")


@dataclasses.dataclass
class APOLossOutput:
    """Result of :func:`apo_loss` / :func:`diffusion_dpo_loss`.

    Attributes:
        loss: scalar tensor, differentiable w.r.t. ``model_pred`` only; float32
            (float64 for float64 inputs; the Salesforce convention keeps the
            inputs' dtype, as its script does).
        e_theta: (B,) detached per-sample weighted policy residual error.
        e_ref: (B,) detached, the same for the reference prediction.
        metric_values: (8,) detached, on the inputs' device; the slots
            of :data:`METRIC_SLOTS`.
        metric_names: names of the slots that are meaningful for this call.

    ``metrics`` (a ``dict[str, float]``) is built on first access, so a step
    that does not log never waits for the device.
    """

    loss: torch.Tensor
    e_theta: torch.Tensor
    e_ref: torch.Tensor
    metric_values: torch.Tensor = dataclasses.field(repr=False)
    metric_names: tuple[str, ...] = dataclasses.field(repr=False)

    @functools.cached_property
    def metrics(self) -> dict[str, float]:
        """``loss``, ``e_theta``, ``e_ref``, ``reward_w``, ``reward_l`` (paired),
        ``implicit_acc``, ``beta_t`` (mean), ``sft`` (when ``lambda_sft > 0``)."""
        values = self.metric_values.tolist()  # one device sync
        return {name: float(values[METRIC_SLOTS[name]]) for name in self.metric_names}


@functools.cache
def metric_names_for(paired: bool, with_sft: bool) -> tuple[str, ...]:
    """Names of the meaningful metric slots for this call's options."""
    names = ["loss", "e_theta", "e_ref", "reward_w"]
    if paired:
        names.append("reward_l")
    names += ["implicit_acc", "beta_t"]
    if with_sft:
        names.append("sft")
    return tuple(names)


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


def beta_per_term(beta_t: object, n_samples: int, paired: bool, device: torch.device) -> float | torch.Tensor:
    """``beta_t`` as a float, or a tensor (float32, or float64 if given) with one entry per loss term.

    Loss terms are samples (unpaired) or pairs (paired). A (B,) tensor in
    paired mode gives each pair its winner's value (the first half).
    """
    if paired and n_samples % 2:
        raise ValueError(f"paired=True needs an even batch (winners then losers), got B={n_samples}")
    n_terms = n_samples // 2 if paired else n_samples
    if not isinstance(beta_t, torch.Tensor):
        return check_number("beta_t", beta_t)
    if not beta_t.is_floating_point():
        raise TypeError(f"beta_t must be a float or a floating-point tensor, got {beta_t.dtype}")
    dtype = torch.promote_types(beta_t.dtype, torch.float32)
    if beta_t.dim() == 0:
        return beta_t.reshape(1).expand(n_terms).to(device=device, dtype=dtype)
    allowed = {(n_terms,), (n_samples,)} if paired else {(n_samples,)}
    if beta_t.dim() != 1 or tuple(beta_t.shape) not in allowed:
        expected = f"({n_terms},) or ({n_samples},)" if paired else f"({n_samples},)"
        raise ValueError(f"beta_t must be a float or a tensor of shape {expected}, got {tuple(beta_t.shape)}")
    return beta_t[:n_terms].to(device=device, dtype=dtype)


# --------------------------------------------------------------------------- reference


def apo_loss_reference(
    model_pred: torch.Tensor,
    ref_pred: torch.Tensor,
    target: torch.Tensor,
    beta: float | torch.Tensor,
    mask: torch.Tensor | None = None,
    lambda_mask: float = 1.0,
    paired: bool = False,
    lambda_sft: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain PyTorch APO loss on validated inputs (``beta`` from :func:`beta_per_term`).

    Computes in float32 (float64 inputs stay float64, and so do the outputs);
    free of host syncs and of Python branching on values, so ``torch.compile``
    traces it whole.

    Returns:
        loss (scalar), e_theta (B,), e_ref (B,), metric_values (8,) (slots of
        :data:`METRIC_SLOTS`, zero where unused); all but loss detached.
    """
    compute = torch.promote_types(model_pred.dtype, torch.float32)
    dims = tuple(range(1, model_pred.dim()))
    pred = model_pred.to(compute)
    target = target.detach().to(compute)
    ref = ref_pred.detach().to(compute)
    sq_theta = (pred - target).square()
    sq_ref = (ref - target).square()
    if mask is not None:
        weight = 1.0 + (lambda_mask - 1.0) * mask.detach().to(compute)
        sq_theta = sq_theta * weight
        sq_ref = sq_ref * weight
    e_theta = sq_theta.mean(dim=dims)
    e_ref = sq_ref.mean(dim=dims)
    delta = e_theta - e_ref
    beta = (
        beta.to(compute)
        if isinstance(beta, torch.Tensor)
        else torch.full_like(delta[: len(delta) // 2 if paired else len(delta)], beta)
    )
    if paired:
        delta_w, delta_l = delta.chunk(2)
        reward_w, reward_l = -beta * delta_w, -beta * delta_l
        logits = reward_w - reward_l
        wins = (reward_w > reward_l).to(compute) + 0.5 * (reward_w == reward_l).to(compute)
        positives = e_theta.chunk(2)[0]
    else:
        reward_w = -beta * delta
        reward_l = torch.zeros_like(reward_w)
        logits = reward_w
        wins = (delta < 0).to(compute) + 0.5 * (delta == 0).to(compute)
        positives = e_theta
    loss = -F.logsigmoid(logits).mean()
    sft = positives.mean()
    if lambda_sft:
        loss = loss + lambda_sft * sft
    metric_values = torch.stack(
        [
            loss.detach(),
            e_theta.detach().mean(),
            e_ref.mean(),
            reward_w.detach().mean(),
            reward_l.detach().mean(),
            wins.mean(),
            beta.mean(),
            sft.detach() if lambda_sft else torch.zeros_like(sft),
        ]
    )
    return loss, e_theta.detach(), e_ref, metric_values


# --------------------------------------------------------------------------- public API


def apo_loss(
    model_pred: torch.Tensor,
    ref_pred: torch.Tensor,
    target: torch.Tensor,
    beta_t: float | torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    lambda_mask: float = 1.0,
    paired: bool = False,
    lambda_sft: float = 0.0,
    backend: str | None = None,
) -> APOLossOutput:
    """Anomaly Preference Optimization loss (unpaired) or its Diffusion-DPO form (paired).

    Args:
        model_pred: (B, C, H, W) policy prediction (any (B, ...) works), float32,
            float16 or bfloat16 (float64 on the reference path). Gets the gradient.
        ref_pred: (B, C, H, W) reference prediction; no gradient flows to it.
        target: (B, C, H, W) the regression target (noise for eps-prediction).
            All three share shape, dtype and device. Contiguous NCHW and
            channels_last are read in place; other layouts are copied.
        beta_t: temperature, a float or a tensor: (B,) unpaired; (B/2,) or (B,)
            paired (then the winners' half is used); a 0-dim tensor broadcasts.
            See :func:`beta_schedule`.
        mask: optional (B, 1, H, W) (broadcast over channels) or (B, C, H, W)
            defect mask in [0, 1] (float, bool or integer dtype; values are not
            range-checked); weight ``w = 1 + (lambda_mask - 1) * mask``.
        lambda_mask: weight of masked pixels, >= 0 (1 = no weighting).
        paired: batch holds winners then losers (B even), Diffusion-DPO form.
        lambda_sft: weight of ``mean(e_theta)`` over the positives (winners when
            paired, every sample otherwise), >= 0.
        backend: "auto" (Triton on CUDA, PyTorch elsewhere), "triton" or "torch";
            None reads ``APO_FAST_BACKEND``.

    Returns:
        :class:`APOLossOutput` with a float32 scalar ``loss``, (B,) ``e_theta`` and
        ``e_ref``, and lazily synced ``metrics``.

    NaN/Inf in the inputs are not checked (that would cost a device sync per
    call); they propagate into ``loss`` and the metrics, so check
    ``torch.isfinite(out.loss)`` where you need to.
    """
    validate_predictions(model_pred, ref_pred, target)
    validate_mask(mask, model_pred)
    lambda_mask = check_number("lambda_mask", lambda_mask, minimum=0.0)
    lambda_sft = check_number("lambda_sft", lambda_sft, minimum=0.0)
    if not isinstance(paired, bool):
        raise TypeError(f"paired must be a bool, got {type(paired).__name__}")
    beta = beta_per_term(beta_t, model_pred.shape[0], paired, model_pred.device)
    if lambda_mask == 1.0:
        mask = None  # w == 1 everywhere: skip reading the mask
    fused = use_triton(model_pred, ref_pred, target, mask, override=backend)
    if fused and model_pred.dtype not in FUSED_DTYPES:
        if requested_backend(backend) == "triton":
            raise TypeError(f"the Triton backend supports {FUSED_DTYPES} inputs, got {model_pred.dtype}")
        fused = False
    if fused:
        from apo_fast.ops.apo_loss import apply_fused_apo_loss

        loss, e_theta, e_ref, values = apply_fused_apo_loss(
            model_pred, ref_pred, target, beta, mask, lambda_mask, paired, lambda_sft
        )
    else:
        loss, e_theta, e_ref, values = apo_loss_reference(
            model_pred, ref_pred, target, beta, mask, lambda_mask, paired, lambda_sft
        )
    return APOLossOutput(loss, e_theta, e_ref, values, metric_names_for(paired, lambda_sft > 0))


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


# --------------------------------------------------------------------------- Diffusion-DPO


def diffusion_dpo_loss(
    model_pred: torch.Tensor,
    ref_pred: torch.Tensor,
    target: torch.Tensor,
    beta_dpo: float,
    *,
    convention: str = "diffusers",
) -> APOLossOutput:
    """Diffusion-DPO sigmoid loss exactly as one of the two public scripts computes it.

    The batch holds winners then losers (``chunk(2)``); same shape for all inputs.

    ``convention="diffusers"`` (``examples/research_projects/diffusion_dpo/
    train_diffusion_dpo.py``): per-sample ``F.mse_loss`` of the float32-cast
    inputs, mean over every non-batch dim; ``loss = -logsigmoid(beta_dpo *
    (ref_diff - model_diff)).mean()``; implicit accuracy counts ties as 1/2.

    ``convention="salesforce"`` (``SalesforceAIResearch/DiffusionDPO`` ``train.py``):
    ``(model_pred - target).pow(2).mean(dim=[1, 2, 3])`` in the inputs' own
    dtype (4-D inputs only); ``inside = -0.5 * beta_dpo * (model_diff -
    ref_diff)``; ``loss = -logsigmoid(inside).mean()``; implicit accuracy is
    ``inside > 0`` (ties count 0).

    Equivalent fused call: ``apo_loss(..., beta_t=beta_dpo, paired=True)``
    (diffusers) or ``beta_t=0.5 * beta_dpo`` (Salesforce), equal up to float32
    rounding (and the Salesforce tie rule).

    Metrics: ``loss``; ``e_theta`` = the scripts' ``raw_model_loss`` (0.5 *
    (mean winners + mean losers)); ``e_ref`` = their ref loss (mean over the
    batch); ``reward_w``/``reward_l`` = mean ``-beta * delta`` with the
    convention's effective beta (``beta_dpo`` or ``0.5 * beta_dpo``), logged as
    ``beta_t``; ``implicit_acc`` per the script.
    """
    validate_predictions(model_pred, ref_pred, target)
    beta_dpo = check_number("beta_dpo", beta_dpo)
    if convention not in DPO_CONVENTIONS:
        raise ValueError(f"convention must be one of {DPO_CONVENTIONS}, got {convention!r}")
    n = model_pred.shape[0]
    if n % 2:
        raise ValueError(f"the batch must hold winners then losers (even B), got B={n}")
    if convention == "diffusers":
        dims = list(range(1, model_pred.dim()))
        model_losses = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=dims)
        with torch.no_grad():
            ref_losses = F.mse_loss(ref_pred.float(), target.float(), reduction="none").mean(dim=dims)
        model_w, model_l = model_losses.chunk(2)
        ref_w, ref_l = ref_losses.chunk(2)
        raw_model_loss = 0.5 * (model_w.mean() + model_l.mean())
        raw_ref_loss = ref_losses.mean()
        logits = (ref_w - ref_l) - (model_w - model_l)
        loss = -1 * F.logsigmoid(beta_dpo * logits).mean()
        implicit_acc = (logits > 0).sum().float() / logits.size(0)
        implicit_acc += 0.5 * (logits == 0).sum().float() / logits.size(0)
        beta_eff = beta_dpo
    else:
        if model_pred.dim() != 4:
            raise ValueError(
                f"the salesforce convention takes 4-D inputs (mean over dims 1,2,3), got {model_pred.dim()}-D"
            )
        model_losses = (model_pred - target).pow(2).mean(dim=[1, 2, 3])
        with torch.no_grad():
            ref_losses = (ref_pred - target).pow(2).mean(dim=[1, 2, 3])
        model_w, model_l = model_losses.chunk(2)
        ref_w, ref_l = ref_losses.chunk(2)
        raw_model_loss = 0.5 * (model_w.mean() + model_l.mean())
        raw_ref_loss = ref_losses.mean()
        scale_term = -0.5 * beta_dpo
        inside_term = scale_term * ((model_w - model_l) - (ref_w - ref_l))
        implicit_acc = (inside_term > 0).sum().float() / inside_term.size(0)
        loss = -1 * F.logsigmoid(inside_term).mean()
        beta_eff = 0.5 * beta_dpo
    with torch.no_grad():
        reward_w = (-beta_eff * (model_w - ref_w).float()).mean()
        reward_l = (-beta_eff * (model_l - ref_l).float()).mean()
        values = torch.zeros(NUM_METRIC_SLOTS, dtype=torch.float32, device=model_pred.device)
        for name, v in (
            ("loss", loss),
            ("e_theta", raw_model_loss),
            ("e_ref", raw_ref_loss),
            ("reward_w", reward_w),
            ("reward_l", reward_l),
            ("implicit_acc", implicit_acc),
        ):
            values[METRIC_SLOTS[name]] = v.detach().float()
        values[METRIC_SLOTS["beta_t"]] = beta_eff
    return APOLossOutput(loss, model_losses.detach().float(), ref_losses.float(), values, metric_names_for(True, False))
