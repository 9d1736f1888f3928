"""The diffusion model pieces APO trains: UNet, noise scheduler, VAE (:mod:`.build`), the
condition embeddings and their file (:mod:`.conditions`) and CLIP prompt encodings for
Stable Diffusion checkpoints (:mod:`.text_encoders`). The built-in UNet configs are plain
dicts in :mod:`apo_fast.config.unet_presets` (re-exported here).

Names are imported on first use, so ``import apo_fast.models`` stays cheap.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    **dict.fromkeys(
        ("build_scheduler", "build_unet", "build_vae", "check_attention", "decode_latents", "encode_images",
         "resolve_device", "save_unet", "set_attention", "vae_scale_factor"),
        "apo_fast.models.build",
    ),
    **dict.fromkeys(("ConditionEmbedding", "cat_unet_kwargs", "load_conditions", "pooled_dim", "save_conditions"),
                    "apo_fast.models.conditions"),
    **dict.fromkeys(("UNET_PRESETS", "VAE_SCALE_FACTOR", "unet_config"), "apo_fast.config.unet_presets"),
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
