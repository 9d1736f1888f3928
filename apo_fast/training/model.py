"""The trained module (UNet with adapters + condition embeddings) and the condition file.
"""
from __future__ import annotations

import logging

from torch import nn

from apo_fast.models import (
    ConditionEmbedding,
)

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- model


class APOModel(nn.Module):
    """The UNet (with adapters) and the condition embeddings, as one module for DeepSpeed.

    ``forward(z, t, cond_ids, reference=False)``: z (B, C, H, W), t (B,) int, cond_ids
    (B,) -> noise prediction (B, C, H, W). ``reference=True`` runs the same UNet
    with its adapters disabled (APO's reference), the condition taken without grad.
    """

    def __init__(self, unet: nn.Module, conditions: ConditionEmbedding, pixel_size: int):
        super().__init__()
        self.unet = unet
        self.conditions = conditions
        self.pixel_size = pixel_size

    def forward(self, z, t, cond_ids, reference: bool = False):
        from apo_fast.adapters import adapters_disabled

        cond = self.conditions.unet_kwargs(cond_ids, z.dtype, self.pixel_size, detach=reference)
        if reference:
            with adapters_disabled(self.unet):
                return self.unet(z, t, **cond).sample
        return self.unet(z, t, **cond).sample
