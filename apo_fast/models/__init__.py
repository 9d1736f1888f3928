"""The diffusion model pieces APO trains: UNet, noise scheduler, VAE (:mod:`.build`), the
condition embeddings (:mod:`.conditions`), the built-in UNet configs (:mod:`.presets`) and
CLIP prompt encodings for Stable Diffusion checkpoints (:mod:`.text_encoders`).

Names are imported on first use: the config checks read :mod:`.presets` and
:mod:`.text_encoders` without loading torch.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    **dict.fromkeys(
        ("build_scheduler", "build_unet", "build_vae", "check_attention", "decode_latents", "encode_images",
         "resolve_device", "save_unet", "set_attention", "vae_scale_factor"),
        "apo_fast.models.build",
    ),
    **dict.fromkeys(("ConditionEmbedding", "cat_unet_kwargs", "pooled_dim"), "apo_fast.models.conditions"),
    **dict.fromkeys(("UNET_PRESETS", "VAE_SCALE_FACTOR", "unet_config"), "apo_fast.models.presets"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'apo_fast.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
