"""Built-in ``UNet2DConditionModel`` configs: the tiny demo UNet, Stable Diffusion 1.5 and SDXL.

Each preset is a plain dict of ``diffusers.UNet2DConditionModel`` constructor
arguments, so ``UNet2DConditionModel(**UNET_PRESETS["sd15"])`` builds the
architecture with random weights (nothing is downloaded). Copy a preset before
changing it: ``cfg = dict(UNET_PRESETS["tiny"], in_channels=3)``.

Parameter counts (checked in ``tests/bench/test_memory_plan.py``):

========  ==============  ==========================================================
preset    parameters      architecture
========  ==============  ==========================================================
``tiny``  985,444         channels (32, 64), cross-attention at the low resolution
``sd15``  859,520,964     the Stable Diffusion 1.x UNet (latent 64x64 at 512 px)
``sdxl``  2,567,463,684   the SDXL base UNet (latent 128x128 at 1024 px)
========  ==============  ==========================================================

Note on naming: diffusers' ``attention_head_dim`` of SD 1.x is the number of
heads (8 heads of ``channels / 8``), a historical misnomer kept by diffusers.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

_TINY = {
    # The demo UNet: two resolution levels, self/cross-attention only at the lower
    # one (and in the mid block), which keeps a CPU training step well under 0.1 s
    # at 32x32 (see ENGINEERING.md).
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}

_SD15 = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}

_SDXL = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 2048,
    "attention_head_dim": (5, 10, 20),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
}


def _frozen(cfg: dict) -> Mapping:
    return MappingProxyType(dict(cfg))


#: Read-only preset configs by name; ``dict(UNET_PRESETS[name])`` gives a mutable copy.
UNET_PRESETS: Mapping[str, Mapping] = MappingProxyType(
    {"tiny": _frozen(_TINY), "sd15": _frozen(_SD15), "sdxl": _frozen(_SDXL)}
)

#: Pixel-to-latent downsampling of the Stable Diffusion VAEs (512 px -> 64 latents).
VAE_SCALE_FACTOR = 8


def unet_config(name_or_config: str | Mapping) -> dict:
    """A mutable copy of a preset (by name) or of a given config mapping.

    Raises:
        ValueError: an unknown preset name.
        TypeError: neither a string nor a mapping.
    """
    if isinstance(name_or_config, str):
        if name_or_config not in UNET_PRESETS:
            raise ValueError(f"unknown UNet preset {name_or_config!r}; expected one of {sorted(UNET_PRESETS)}")
        return dict(UNET_PRESETS[name_or_config])
    if isinstance(name_or_config, Mapping):
        return dict(name_or_config)
    raise TypeError(f"unet must be a preset name or a config mapping, got {type(name_or_config).__name__}")
