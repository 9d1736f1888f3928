"""Diffusion-DPO's sigmoid loss exactly as the public scripts compute it, in the APO output contract.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from apo_fast.config.choices import DIFFUSERS_LOSS_TYPES, DPO_CONVENTIONS
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
    loss_type: str = "sigmoid",
) -> APOLossOutput:
    """Diffusion-DPO loss exactly as one of the public scripts computes it.

    The batch holds winners then losers (``chunk(2)``); same shape for all inputs.

    ``convention="diffusers"`` (``examples/research_projects/diffusion_dpo/
    train_diffusion_dpo.py``): per-sample ``F.mse_loss`` of the float32-cast
    inputs, mean over every non-batch dim; ``loss = -logsigmoid(beta_dpo *
    (ref_diff - model_diff)).mean()``; implicit accuracy counts ties as 1/2.

    ``loss_type`` (``convention="diffusers"`` only, the script's ``--loss_type``):
    ``sigmoid`` as above; ``hinge``: ``relu(1 - beta_dpo * logits).mean()``; ``ipo``:
    ``(logits - 1 / (2 * beta_dpo))^2`` averaged. The script's ``ipo`` branch reads
    ``args.beta``, which it never defines (it raises); we follow the IPO paper's formula with
    ``tau = beta_dpo``, the only temperature the script has.

    ``convention="diffusers_sdxl"`` (``train_diffusion_dpo_sdxl.py``): the float32 MSE of
    ``diffusers``, then ``inside = -0.5 * beta_dpo * (model_diff - ref_diff)``, ``loss =
    -logsigmoid(inside).mean()``, implicit accuracy ``inside > 0`` with ties counting 1/2.

    ``convention="salesforce"`` (``SalesforceAIResearch/DiffusionDPO`` ``train.py``):
    ``(model_pred - target).pow(2).mean(dim=[1, 2, 3])`` in the inputs' own
    dtype (4-D inputs only); ``inside = -0.5 * beta_dpo * (model_diff -
    ref_diff)``; ``loss = -logsigmoid(inside).mean()``; implicit accuracy is
    ``inside > 0`` (ties count 0).

    The predictions and the target may have different floating dtypes (accelerate's fp32
    prediction beside a bf16 target): the diffusers conventions cast each to float32 as
    the scripts do; the Salesforce one lets PyTorch promote, as its script does.

    Equivalent fused call: ``apo_loss(..., beta_t=beta_dpo, paired=True, loss_type=...)``
    (diffusers) or ``beta_t=0.5 * beta_dpo`` (SDXL and Salesforce), equal up to float32
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
    if loss_type not in DIFFUSERS_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {DIFFUSERS_LOSS_TYPES} (diffusers' --loss_type), got {loss_type!r}")
    if loss_type != "sigmoid" and convention != "diffusers":
        raise ValueError(f"loss_type={loss_type!r} exists only in the diffusers SD script (convention='diffusers')")
    n = model_pred.shape[0]
    if n % 2:
        raise ValueError(f"the batch must hold winners then losers (even B), got B={n}")
    if convention in ("diffusers", "diffusers_sdxl"):
        dims = list(range(1, model_pred.dim()))
        model_losses = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=dims)
        with torch.no_grad():
            ref_losses = F.mse_loss(ref_pred.float(), target.float(), reduction="none").mean(dim=dims)
        model_w, model_l = model_losses.chunk(2)
        ref_w, ref_l = ref_losses.chunk(2)
        raw_model_loss = 0.5 * (model_w.mean() + model_l.mean())
        raw_ref_loss = ref_losses.mean()
        if convention == "diffusers_sdxl":
            logits = -0.5 * beta_dpo * ((model_w - model_l) - (ref_w - ref_l))  # the script's inside_term
            loss = -1 * F.logsigmoid(logits).mean()
            beta_eff = 0.5 * beta_dpo
        else:
            logits = (ref_w - ref_l) - (model_w - model_l)
            if loss_type == "sigmoid":
                loss = -1 * F.logsigmoid(beta_dpo * logits).mean()
            elif loss_type == "hinge":
                loss = torch.relu(1 - beta_dpo * logits).mean()
            else:
                loss = ((logits - 1 / (2 * beta_dpo)) ** 2).mean()
            beta_eff = beta_dpo
        implicit_acc = (logits > 0).sum().float() / logits.size(0)
        implicit_acc += 0.5 * (logits == 0).sum().float() / logits.size(0)
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
