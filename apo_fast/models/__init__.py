"""The diffusion model pieces APO trains: UNet, noise scheduler, VAE (:mod:`.build`), the
condition embeddings (:mod:`.conditions`), the built-in UNet configs (:mod:`.presets`) and
CLIP prompt encodings for Stable Diffusion checkpoints (:mod:`.text_encoders`).
"""
from apo_fast.models.build import (
    build_scheduler,
    build_unet,
    build_vae,
    check_attention,
    decode_latents,
    encode_images,
    resolve_device,
    save_unet,
    set_attention,
    vae_scale_factor,
)
from apo_fast.models.conditions import ConditionEmbedding, cat_unet_kwargs, pooled_dim
from apo_fast.models.presets import UNET_PRESETS, VAE_SCALE_FACTOR, unet_config

__all__ = [
    "UNET_PRESETS",
    "VAE_SCALE_FACTOR",
    "ConditionEmbedding",
    "build_scheduler",
    "build_unet",
    "build_vae",
    "cat_unet_kwargs",
    "check_attention",
    "decode_latents",
    "encode_images",
    "pooled_dim",
    "resolve_device",
    "save_unet",
    "set_attention",
    "unet_config",
    "vae_scale_factor",
]
