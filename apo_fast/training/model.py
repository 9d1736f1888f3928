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

    ``forward(z, t, cond_ids, reference=False, masks=None)``: z (B, C, H, W), t (B,) int,
    cond_ids (B,), masks (B, 1, H', W') the defect masks (read by the policy when the
    UNet has a mask input, ``adapter.mask_input``) -> noise prediction (B, C, H, W).
    ``reference=True`` runs the same UNet with its adapters disabled (APO's reference),
    the condition taken without grad.
    """

    def __init__(self, unet: nn.Module, conditions: ConditionEmbedding, pixel_size: int):
        super().__init__()
        self.unet = unet
        self.conditions = conditions
        self.pixel_size = pixel_size
        self.unet_call = None  # set by compile_unet: the (compiled) unet(z, t, **cond).sample

    def compile_unet(self, cfg, device) -> None:
        """Run the UNet call through ``torch.compile`` (``train.compile``; see
        :mod:`apo_fast.models.compile`): the policy and the reference pass share its code."""
        from apo_fast.models.compile import compiled_unet_call

        self.__dict__["unet_call"] = compiled_unet_call(self.unet, cfg, device)  # not a submodule

    def forward(self, z, t, cond_ids, reference: bool = False, masks=None):
        from apo_fast.adapters import adapters_disabled
        from apo_fast.adapters.mask_input import MASK_KWARG, get_mask_input

        cond = self.conditions.unet_kwargs(cond_ids, z.dtype, self.pixel_size, detach=reference)
        if masks is not None and get_mask_input(self.unet) is not None:
            cond[MASK_KWARG] = masks  # the reference pass ignores it (adapters_disabled)
        if reference:
            with adapters_disabled(self.unet):
                return self._unet_forward(z, t, cond)
        return self._unet_forward(z, t, cond)

    def _unet_forward(self, z, t, cond):
        if self.unet_call is not None:
            return self.unet_call(z, t, cond)
        return self.unet(z, t, **cond).sample
