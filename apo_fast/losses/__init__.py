"""The loss family, all under one output contract (:class:`APOLossOutput`).

| loss | where | what |
|---|---|---|
| :func:`apo_loss` | :mod:`apo_fast.ops.apo_loss` (the fused op) | APO (unpaired) and its Diffusion-DPO form (paired), in every preference form (``loss_type``: sigmoid, hinge, ipo, kto, margin; :class:`PreferenceForm`) |
| :func:`diffusion_dpo_loss` | :mod:`.dpo` | the public Diffusion-DPO scripts' numbers, convention by convention (diffusers SD with its ``--loss_type``, diffusers SDXL, Salesforce) |
| :func:`diffusion_loss` | :mod:`.diffusion` | plain mask-weighted diffusion loss (the LoRA baseline) |
| :func:`loss_mask` | :mod:`.mask_weight` | the mask the weight ``w`` is built from (``pixel`` or ``area``-normalised) |
| :func:`beta_schedule` | :mod:`.schedules` | the per-sample temperature ``beta_t`` |

Every form returns ``loss``, per-sample ``e_theta`` / ``e_ref`` and the metrics vector laid
out by :data:`METRIC_SLOTS`; a new form adds a module here and fills the same contract.
"""
from apo_fast.config.choices import LOSS_TYPES
from apo_fast.losses.diffusion import diffusion_loss
from apo_fast.losses.dpo import DPO_CONVENTIONS, diffusion_dpo_loss
from apo_fast.losses.mask_weight import MASK_WEIGHTS, area_normalized_mask, loss_mask
from apo_fast.losses.schedules import BETA_SCHEDULES, beta_schedule
from apo_fast.ops.apo_loss import apo_loss
from apo_fast.ops.apo_loss.naive import (
    METRIC_SLOTS,
    NUM_METRIC_SLOTS,
    APOLossOutput,
    PreferenceForm,
    metric_names_for,
)

__all__ = [
    "APOLossOutput",
    "BETA_SCHEDULES",
    "DPO_CONVENTIONS",
    "LOSS_TYPES",
    "MASK_WEIGHTS",
    "METRIC_SLOTS",
    "NUM_METRIC_SLOTS",
    "PreferenceForm",
    "apo_loss",
    "area_normalized_mask",
    "beta_schedule",
    "diffusion_dpo_loss",
    "diffusion_loss",
    "loss_mask",
    "metric_names_for",
]
