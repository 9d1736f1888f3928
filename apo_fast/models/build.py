"""The diffusion model pieces APO trains: UNet, noise scheduler, condition embeddings, VAE.

Nothing here downloads: a UNet comes from a local diffusers folder (or a hub id
already in the local cache, ``local_files_only``), or is built from a preset
config with random weights.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from apo_fast.config.choices import ATTENTION

if TYPE_CHECKING:  # the config imports this package's presets
    from apo_fast.config import ModelConfig

log = logging.getLogger(__name__)


def build_scheduler(cfg: ModelConfig, kind: str = "ddpm"):
    """A diffusers DDPM or DDIM scheduler for ``cfg``'s noise schedule."""
    from diffusers import DDIMScheduler, DDPMScheduler

    common = dict(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.noise_schedule,
        prediction_type=cfg.prediction_type,
        # Pixel-space models clip the predicted x0 to the image range; without it the
        # first DDIM step (abar ~ 1e-9 at t = T-1) amplifies prediction errors ~1e4x.
        clip_sample=not cfg.latent,
    )
    if cfg.noise_schedule == "scaled_linear":
        common.update(beta_start=0.00085, beta_end=0.012)
    if kind == "ddim":
        return DDIMScheduler(**common, set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing")
    if kind == "ddpm":
        return DDPMScheduler(**common)
    raise ValueError(f"scheduler kind must be 'ddpm' or 'ddim', got {kind!r}")


def build_unet(cfg: ModelConfig, in_channels: int = 3, sample_size: int | None = None, seed: int | None = None):
    """The UNet from ``cfg.pretrained`` or from ``cfg.preset`` + ``cfg.unet`` overrides.

    A UNet built from a preset gets random weights; with ``seed`` they are drawn
    from ``torch.manual_seed(seed)`` on a forked RNG (the global RNG is left as it
    was), so the trainer and :func:`apo_fast.sampling.runs.load_run` build the same
    base UNet from the same config.
    """
    from diffusers import UNet2DConditionModel

    if cfg.pretrained:
        kwargs = dict(subfolder=cfg.subfolder or None, revision=cfg.revision, local_files_only=cfg.local_files_only)
        try:
            return UNet2DConditionModel.from_pretrained(cfg.pretrained, **kwargs)
        except OSError as exc:
            raise FileNotFoundError(
                f"model.pretrained={cfg.pretrained!r}: no UNet found locally "
                f"(subfolder {cfg.subfolder!r}; nothing is downloaded, local_files_only={cfg.local_files_only}): {exc}"
            ) from exc
    from apo_fast.config.unet_presets import UNET_PRESETS

    unet_cfg = dict(UNET_PRESETS[cfg.preset])
    if cfg.preset == "tiny" or not cfg.latent:
        unet_cfg.update(in_channels=in_channels, out_channels=in_channels)
    if sample_size is not None:
        unet_cfg["sample_size"] = sample_size
    unet_cfg.update(cfg.unet)
    if seed is None:
        return UNet2DConditionModel(**unet_cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(**unet_cfg)


def vae_scale_factor(vae) -> int:
    """Pixels per latent of a diffusers ``AutoencoderKL`` (8 for SD and SDXL), computed
    as diffusers' pipelines do: 2 ** (number of encoder blocks - 1)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def build_vae(cfg: ModelConfig):
    """The VAE of ``cfg.vae`` or ``cfg.pretrained`` (subfolder ``vae``), or None in pixel space."""
    if not cfg.latent:
        return None
    from diffusers import AutoencoderKL

    source, sub = (cfg.vae, None) if cfg.vae else (cfg.pretrained, "vae")
    try:
        return AutoencoderKL.from_pretrained(source, subfolder=sub, local_files_only=cfg.local_files_only)
    except OSError as exc:
        raise FileNotFoundError(f"no VAE found locally at {source!r} (subfolder {sub!r}): {exc}") from exc


def check_attention(kind: str, device: torch.device) -> None:
    """Refuse an attention setting that cannot run on ``device`` (cheap; no model needed).

    Raises:
        ValueError: ``kind`` is not auto, xformers or sdpa, or is xformers on a
            non-CUDA device (xformers has no CPU kernels).
    """
    if kind not in ATTENTION:
        raise ValueError(f"train.attention must be auto, xformers or sdpa; got {kind!r}")
    if kind == "xformers" and device.type != "cuda":
        raise ValueError(
            f"train.attention is 'xformers' but it cannot run here (xformers has no kernels for device {device}); "
            "use 'sdpa' or 'auto'"
        )


def set_attention(unet, kind: str, device: torch.device) -> str:
    """Choose the attention kernel of ``unet``: ``xformers`` (CUDA only), ``sdpa`` or ``auto``.

    ``auto`` takes xformers on CUDA when it imports and passes diffusers' probe
    (a small attention call), otherwise PyTorch SDPA (``AttnProcessor2_0``, whose
    fused kernels are memory-efficient too). Logs the choice once (INFO) and
    returns its name, ``"xformers"`` or ``"sdpa"``.

    Raises:
        ValueError: ``kind`` is not one of the three, or ``kind == "xformers"``
            where xformers cannot run (no CUDA device, not installed, probe failed);
            the message says why.
    """
    from diffusers.models.attention_processor import AttnProcessor2_0

    check_attention(kind, device)
    reason = None
    if kind in ("auto", "xformers"):
        if device.type != "cuda":
            reason = f"xformers has no kernels for device {device}"
        else:
            try:
                unet.enable_xformers_memory_efficient_attention()
                log.info("attention: xformers (memory-efficient attention)")
                return "xformers"
            except Exception as exc:  # ImportError, ValueError, or a failing probe
                reason = f"{type(exc).__name__}: {exc}"
        if kind == "xformers":
            raise ValueError(f"train.attention is 'xformers' but it cannot run here ({reason}); use 'sdpa' or 'auto'")
    unet.set_attn_processor(AttnProcessor2_0())
    log.info("attention: PyTorch SDPA%s", f" (xformers unavailable: {reason})" if reason else "")
    return "sdpa"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"train.device is {name!r} but CUDA is not available on this machine; set train.device: cpu "
            "(or auto), and on a CPU use bf16 or no for train.mixed_precision and a small model "
            "(configs/demo.yaml trains the tiny UNet in minutes; an SD-size UNet takes hours per step there)"
        )
    return device


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """VAE latents (mean of the posterior, times the VAE's scaling factor) of images in [-1, 1]."""
    out = []
    for i in range(0, images.shape[0], batch_size):
        chunk = images[i : i + batch_size].to(vae.device, vae.dtype)
        out.append(vae.encode(chunk).latent_dist.mean * vae.config.scaling_factor)
    return torch.cat(out).float().cpu()


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    out = []
    for i in range(0, latents.shape[0], batch_size):
        chunk = latents[i : i + batch_size].to(vae.device, vae.dtype) / vae.config.scaling_factor
        out.append(vae.decode(chunk).sample.float().clamp(-1, 1))
    return torch.cat(out).cpu()


def save_unet(unet, path: Path) -> None:
    """Save a (base) UNet in the diffusers layout, atomically."""
    from apo_fast.io_utils import atomic_directory

    with atomic_directory(path) as tmp:
        unet.save_pretrained(tmp, safe_serialization=True)
