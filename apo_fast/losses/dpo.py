"""Diffusion-DPO's sigmoid loss exactly as the public scripts compute it, in the APO output contract.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from apo_fast.config.choices import DPO_CONVENTIONS
from apo_fast.ops.apo_loss.checks import check_number, validate_predictions
from apo_fast.ops.apo_loss.naive import (
    METRIC_SLOTS,
    NUM_METRIC_SLOTS,
    APOLossOutput,
    metric_names_for,
)

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
