"""The two sides of the step benchmark on the same model, data, batch and precision: apo-fast's real
training step (APOTrainer on DeepSpeed) and the Diffusion-DPO baseline (diffusers' script as a class).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from apo_fast.bench.step_config import (
    DEFAULT_RESOLUTION,
    NOISE_SCHEDULE,
    StepBenchConfig,
)
from apo_fast.bench.timing import PhaseTimer, _TimedEngine

log = logging.getLogger(__name__)


def sd_vae_config(model: str) -> dict:
    """The Stable Diffusion (``sd15``) / SDXL (``sdxl``) ``AutoencoderKL`` architecture as constructor arguments."""
    if model not in ("sd15", "sdxl"):
        raise ValueError(f"model must be 'sd15' or 'sdxl' for a VAE config, got {model!r}")
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (128, 256, 512, 512),
        "layers_per_block": 2,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": DEFAULT_RESOLUTION[model],
        "scaling_factor": 0.18215 if model == "sd15" else 0.13025,
    }


# --------------------------------------------------------------------------- the two sides


def apo_config_for(cfg: StepBenchConfig, device: torch.device, workdir: Path, vae_dir: Path | None):
    """The :class:`apo_fast.config.APOConfig` of the apo-fast side (paired mode, constant beta)."""
    from apo_fast.config import config_from_dict

    data = {
        "output_dir": str(workdir / "apo_run"),
        "model": {
            "preset": cfg.model,
            "latent": cfg.latent,
            "vae": str(vae_dir) if vae_dir is not None else None,
            "num_train_timesteps": 1000,
            "noise_schedule": NOISE_SCHEDULE[cfg.model],
            "cond_tokens": cfg.tokens,
            # APOModel calls the UNet without SDXL's added_cond_kwargs: drop that (small) embedding on both sides.
            "unet": {"addition_embed_type": None} if cfg.model == "sdxl" else {},
        },
        "data": {"root": "builtin:demo", "category": "brick", "image_size": cfg.pixel_size, "augment": False},
        "adapter": {"r": cfg.r, "lora_alpha": float(cfg.r), "gate": {"kind": cfg.gate}},
        "loss": {
            "mode": "paired",
            "beta": cfg.beta_dpo,
            "beta_schedule": "constant",
            "lambda_mask": 1.0,
            "lambda_sft": 0.0,
            "backend": "auto",
        },
        "optim": {
            "name": "adamw8bit" if cfg.use_8bit_adam else "adamw",
            "lr": cfg.learning_rate,
            "weight_decay": 1e-2,
            "max_grad_norm": 1.0,
            "warmup_steps": 0,
        },
        "train": {
            "steps": 1,
            "batch_size": cfg.batch,
            "seed": cfg.seed,
            "mixed_precision": cfg.mixed_precision(device),
            "gradient_checkpointing": cfg.gradient_checkpointing,
            "attention": cfg.attention,
            "allow_tf32": False,
            "device": str(device),
            "progress": False,
            "compile": {"enabled": cfg.compile, "backend": cfg.compile_backend},
        },
    }
    return config_from_dict(data)


def save_random_vae(model: str, path: Path, seed: int = 0) -> Path:
    """Save a randomly initialised SD/SDXL ``AutoencoderKL`` to ``path`` (diffusers layout)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**sd_vae_config(model))
    vae.save_pretrained(str(path), safe_serialization=True)
    return path


class APOFastSide:
    """apo-fast's trainer, stepped through its own ``micro_step``."""

    name = "apo_fast"

    def __init__(self, cfg: StepBenchConfig, device: torch.device, workdir: Path, vae_dir: Path | None):
        from apo_fast.training.trainer import APOTrainer

        self.apo_cfg = apo_config_for(cfg, device, workdir, vae_dir)
        self.trainer = APOTrainer(self.apo_cfg, resume=False).setup()
        self.engine = _TimedEngine(self.trainer.engine)
        self.trainer.engine = self.engine  # the trainer instance's own attribute: micro_step calls the proxy
        self.step_index = 0

    @property
    def data(self):
        return self.trainer.data

    def step(self, timer: PhaseTimer | None) -> float:
        self.engine.timer = timer
        try:
            out = self.trainer.micro_step(self.step_index, 0)
            loss = out.metrics["loss"]  # the training loop reads the metrics each step (one sync)
        finally:
            self.engine.timer = None
        self.step_index += 1
        return loss

    def describe(self) -> dict:
        t = self.trainer
        model = self.engine.module
        return {
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "adapted_modules": len(t.adapter_names),
            "attention": t.attention,
            "loss_backend": self.apo_cfg.loss.backend,
            "mixed_precision": self.apo_cfg.train.mixed_precision,
            "optimizer": self.apo_cfg.optim.name,
            "gate": self.apo_cfg.adapter.gate.kind,
            "engine": "deepspeed",
            "latent_cache": self.apo_cfg.model.latent,
        }


class BaselineSide:
    """The diffusers Diffusion-DPO step on the same UNet config, data and precision."""

    name = "baseline"

    def __init__(self, cfg: StepBenchConfig, device: torch.device, apo: APOFastSide, vae_dir: Path | None):
        from apo_fast.bench.baseline_dpo import BaselineDPOConfig, DiffusionDPOBaseline
        from apo_fast.models import build_scheduler, build_unet

        model_cfg = apo.apo_cfg.model
        data = apo.data
        torch.manual_seed(cfg.seed)
        unet = _build_unet_on(
            device,
            lambda: build_unet(model_cfg, in_channels=data.anomalies.shape[1], sample_size=data.anomalies.shape[-1]),
        )
        if cfg.attention == "sdpa":
            from diffusers.models.attention_processor import AttnProcessor2_0

            unet.set_attn_processor(AttnProcessor2_0())
        vae = None
        if vae_dir is not None:
            from diffusers import AutoencoderKL

            vae = AutoencoderKL.from_pretrained(str(vae_dir), local_files_only=True)
        bcfg = BaselineDPOConfig(
            rank=cfg.r,  # the diffusers script's --rank
            beta_dpo=cfg.beta_dpo,
            learning_rate=cfg.learning_rate,
            mixed_precision=apo.apo_cfg.train.mixed_precision,
            gradient_checkpointing=cfg.gradient_checkpointing,
            enable_xformers_memory_efficient_attention=cfg.attention == "xformers",
            use_8bit_adam=cfg.use_8bit_adam,
            lr_warmup_steps=0,
            torch_compile=cfg.compile,
            torch_compile_backend=cfg.compile_backend,
        )
        self.baseline = DiffusionDPOBaseline(unet, build_scheduler(model_cfg, "ddpm"), vae, bcfg, device)
        conditions = apo.engine.module.conditions.weight.detach()
        # Stands in for the frozen text encoder's output (the script recomputes it every step).
        self.cond_table = conditions.to(device=device, dtype=bcfg.weight_dtype).clone()
        self.anomaly_images = data.anomaly_images
        self.normal_images = data.normal_images
        self.anomaly_conds = data.anomaly_conds
        self.batch = cfg.batch
        self.seed = cfg.seed
        self.step_index = 0

    def batch_for_step(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 6, H, W) pixel pairs (anomaly = winner, normal = loser) and (B, L, D) conditions."""
        g = torch.Generator().manual_seed(self.seed * 6_700_417 + step)
        ai = torch.randint(self.anomaly_images.shape[0], (self.batch,), generator=g)
        ni = torch.randint(self.normal_images.shape[0], (self.batch,), generator=g)
        pixel_values = torch.cat([self.anomaly_images[ai], self.normal_images[ni]], dim=1)
        ehs = self.cond_table[self.anomaly_conds[ai].to(self.cond_table.device) + 1]
        return pixel_values, ehs

    def step(self, timer: PhaseTimer | None) -> float:
        pixel_values, ehs = self.batch_for_step(self.step_index)
        out = self.baseline.step(pixel_values, ehs, timer=timer)
        self.step_index += 1
        return out.logs["loss"]

    def describe(self) -> dict:
        return {
            **self.baseline.describe(),
            "engine": "plain torch optimizer (accelerate-style)",
            "attention": "xformers" if self.baseline.config.enable_xformers_memory_efficient_attention else "sdpa",
        }


def _build_unet_on(device: torch.device, build):
    """Build a module with its parameters created on ``device`` (fast random init on a GPU)."""
    if device.type != "cuda":
        return build()
    try:
        with torch.device(device):
            return build()
    except (RuntimeError, TypeError, NotImplementedError) as exc:  # a constructor that insists on the CPU
        log.warning("building on %s failed (%s: %s); building on the CPU", device, type(exc).__name__, exc)
        return build()


