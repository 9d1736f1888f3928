"""``apo-fast plan-memory``: the memory planner (:mod:`apo_fast.bench.memory_plan`) for a run config.

:func:`planner_settings` maps an :class:`~apo_fast.config.APOConfig` to the
planner's settings dict:

=============================  ==============================================================
planner key                    from the run config
=============================  ==============================================================
``unet``                       ``model.pretrained``'s local ``config.json`` (subfolder
                               ``model.subfolder``), else ``model.preset`` + ``model.unet``
                               (input channels as :func:`apo_fast.models.build_unet` sets them)
``latent_size``                ``data.image_size`` / the VAE's downsampling (``model.latent``;
                               the VAE config is read when local, else 8) or the image size
``batch_size``, ``paired``     ``train.batch_size``, ``loss.mode == "paired"``
``condition_tokens``           ``model.cond_tokens``
``r``, ``target_modules``      ``adapter.r``, ``adapter.target_modules``
``extra_trainable_params``     condition embeddings (defect types found under
                               ``data.root``, or ``data.defect_types``) + a learned gate
``precision``                  ``train.mixed_precision`` (``no`` is fp32)
``gradient_checkpointing``     ``train.gradient_checkpointing``
``attention``                  ``train.attention``
``optimizer``                  ``optim.name``
``zero_stage``, offload        ``train.zero_stage``, ``train.offload_optimizer``, ``train.offload_params``
``world_size``                 the ``--world-size`` flag (ranks sharing the ZeRO partitions)
bucket sizes                   ``train.deepspeed.zero_optimization.reduce_bucket_size`` and
                               ``stage3_prefetch_bucket_size`` when set
=============================  ==============================================================
"""
from __future__ import annotations

import argparse
import inspect
import json
import logging
from pathlib import Path
from typing import Any

from apo_fast.config import APOConfig

log = logging.getLogger(__name__)

DEFAULT_GPU_GIB = 8.0
_DEFAULT_VAE = {"latent_channels": 4, "scale_factor": 8}


def _local_config(source: str, subfolder: str | None, local_files_only: bool) -> dict | None:
    """A diffusers model's ``config.json`` from a local folder or the local hub cache, or None."""
    from diffusers import ConfigMixin

    try:
        return dict(ConfigMixin.load_config(source, subfolder=subfolder, local_files_only=local_files_only))
    except (OSError, ValueError):
        path = Path(source) / (subfolder or "") / "config.json"
        if path.is_file():
            return json.loads(path.read_text())
        return None


def _vae_geometry(cfg: APOConfig, use_local: bool = True) -> dict:
    """``latent_channels`` and pixels-per-latent of the run's VAE (defaults when it is not local)."""
    m = cfg.model
    source, sub = (m.vae, None) if m.vae else (m.pretrained, "vae")
    vae = _local_config(source, sub, m.local_files_only) if source and use_local else None
    if not vae:
        log.info("plan-memory: no local VAE config at %r; assuming 4 latent channels, 8 pixels per latent", source)
        return dict(_DEFAULT_VAE)
    blocks = vae.get("block_out_channels") or (0,) * 4
    return {"latent_channels": int(vae.get("latent_channels", 4)), "scale_factor": 2 ** (len(blocks) - 1)}


def _unet_config(cfg: APOConfig, in_channels: int, preset: str | None = None) -> dict:
    from diffusers import UNet2DConditionModel

    from apo_fast.config.unet_presets import UNET_PRESETS

    m = cfg.model
    if preset is not None:
        if preset not in UNET_PRESETS:
            raise ValueError(f"--unet must be one of {sorted(UNET_PRESETS)}; got {preset!r}")
        unet = dict(UNET_PRESETS[preset])
        unet.update(in_channels=in_channels, out_channels=in_channels)
        return unet
    if m.pretrained:
        raw = _local_config(m.pretrained, m.subfolder or None, m.local_files_only)
        if raw is None:
            raise FileNotFoundError(
                f"model.pretrained={m.pretrained!r}: no UNet config.json found locally (subfolder {m.subfolder!r}); "
                "to plan without the weights, name the architecture: plan-memory --unet sd15 (or sdxl)"
            )
        accepted = set(inspect.signature(UNet2DConditionModel.__init__).parameters) - {"self"}
        return {k: v for k, v in raw.items() if k in accepted}
    unet = dict(UNET_PRESETS[m.preset])
    if m.preset == "tiny" or not m.latent:
        unet.update(in_channels=in_channels, out_channels=in_channels)
    unet.update(m.unet)
    return unet


def _num_conditions(cfg: APOConfig) -> int:
    """Named conditions (``good`` + defect types); the dataset folder is listed, not read."""
    from apo_fast.data import resolve_data_root

    d = cfg.data
    if d.defect_types:
        return 1 + len(d.defect_types)
    try:
        test = resolve_data_root(d.root) / d.category / "test"
        defects = [p for p in test.iterdir() if p.is_dir() and p.name != "good"]
    except (FileNotFoundError, NotADirectoryError):
        log.info("plan-memory: %s/%s/test not found; counting one defect type", d.root, d.category)
        return 2
    return 1 + max(1, len(defects))


def _extra_trainable(cfg: APOConfig, cross_attention_dim: int) -> int:
    from apo_fast.adapters import build_gate

    conditions = (_num_conditions(cfg) + 1) * cfg.model.cond_tokens * cross_attention_dim  # + the null row
    gate = build_gate(cfg.adapter.gate, cfg.adapter.r)
    return conditions + sum(p.numel() for p in gate.parameters())


def planner_settings(cfg: APOConfig, world_size: int = 1, unet_preset: str | None = None) -> dict[str, Any]:
    """The :func:`apo_fast.bench.memory_plan.plan_memory` settings for run config ``cfg``
    (see the module docstring for the mapping).

    ``unet_preset`` (``tiny``/``sd15``/``sdxl``) replaces ``model.pretrained``/``model.preset``:
    plan a Stable Diffusion config on a machine without its weights (latents: 4 channels,
    8 pixels per latent).
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    vae = _vae_geometry(cfg, use_local=unet_preset is None) if cfg.model.latent else None
    in_channels = vae["latent_channels"] if vae else 3
    unet = _unet_config(cfg, in_channels, unet_preset)
    size = cfg.data.image_size
    if vae:
        if size % vae["scale_factor"]:
            raise ValueError(
                f"data.image_size {size} is not a multiple of the VAE's {vae['scale_factor']} pixels per latent"
            )
        size //= vae["scale_factor"]
    cross = unet.get("cross_attention_dim", 1280)
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    from apo_fast.config.unet_presets import UNET_PRESETS

    preset_name = next((n for n, c in UNET_PRESETS.items() if dict(c) == unet), None)  # named in the report
    t = cfg.train
    settings: dict[str, Any] = {
        "unet": preset_name or unet,
        "latent_size": size,
        "batch_size": t.batch_size,
        "paired": cfg.loss.mode == "paired",
        "condition_tokens": cfg.model.cond_tokens,
        "r": cfg.adapter.r,
        "base_quantization": cfg.model.base_quantization,
        "base_double_quant": cfg.model.base_double_quant,
        "target_modules": list(cfg.adapter.target_modules),
        "extra_trainable_params": _extra_trainable(cfg, int(cross)),
        "precision": "fp32" if t.mixed_precision == "no" else t.mixed_precision,
        "gradient_checkpointing": t.gradient_checkpointing,
        "attention": t.attention,
        "optimizer": cfg.optim.name,
        "zero_stage": t.zero_stage,
        "world_size": world_size,
        "offload_optimizer": t.offload_optimizer,
        "offload_params": t.offload_params,
    }
    zero = (t.deepspeed or {}).get("zero_optimization", {}) or {}
    if "reduce_bucket_size" in zero:
        settings["reduce_bucket_elements"] = int(float(zero["reduce_bucket_size"]))
    if "stage3_prefetch_bucket_size" in zero:
        settings["prefetch_elements"] = int(float(zero["stage3_prefetch_bucket_size"]))
    return settings


def plan_for_config(cfg: APOConfig, world_size: int = 1, unet_preset: str | None = None):
    """``(MemoryPlan, model name)`` for run config ``cfg`` on ``world_size`` ranks."""
    from apo_fast.bench.memory_plan import plan_memory

    if unet_preset is not None:
        name = f"preset {unet_preset}"
    else:
        name = cfg.model.pretrained or f"preset {cfg.model.preset}"
    return plan_memory(planner_settings(cfg, world_size, unet_preset)), name


def default_gpu_gib() -> tuple[float, str]:
    """This machine's GPU 0 size in GiB, or :data:`DEFAULT_GPU_GIB`; and where it came from."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return props.total_memory / 2**30, props.name
    return DEFAULT_GPU_GIB, "default (no GPU here)"


def add_plan_memory_parser(sub, add_config_args) -> None:
    """Register ``plan-memory`` on the CLI's subparsers."""
    p = sub.add_parser("plan-memory", help="estimate peak GPU memory per rank for a config and whether it fits")
    add_config_args(p)
    p.add_argument("--gpu-gib", "--gpu_gib", dest="gpu_gib", type=float, default=None,
                   help=f"GPU size in GiB (default: this machine's GPU 0, else {DEFAULT_GPU_GIB:g})")
    p.add_argument("--world-size", "--world_size", dest="world_size", type=int, default=1,
                   help="ranks sharing the ZeRO partitions (default 1)")
    p.add_argument("--unet", default=None, choices=("tiny", "sd15", "sdxl"),
                   help="plan this UNet preset instead of model.pretrained (weights not on this machine)")
    p.add_argument("--json", dest="json_out", default=None, metavar="FILE", help="also write the plan as JSON")
    p.set_defaults(fn=cmd_plan_memory)


def cmd_plan_memory(args: argparse.Namespace) -> int:
    """Print the Markdown breakdown and the verdict; exit code 0 whether or not it fits."""
    from apo_fast.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.gpu_gib is not None and not args.gpu_gib > 0:
        raise ValueError(f"--gpu-gib must be > 0, got {args.gpu_gib}")
    gpu_gib, source = (args.gpu_gib, "--gpu-gib") if args.gpu_gib is not None else default_gpu_gib()
    plan, name = plan_for_config(cfg, args.world_size, args.unet)
    fits = plan.fits(gpu_gib)
    print(plan.to_markdown(gpu_gib))
    print(
        f"\n{name}: peak {plan.total / 2**30:.2f} GiB per rank "
        f"({'fits' if fits else 'does NOT fit'} in {gpu_gib:.1f} GiB, {source})"
        + (f"; {plan.cpu_offload / 2**30:.2f} GiB offloaded to CPU memory" if plan.cpu_offload else "")
    )
    if args.json_out:
        from apo_fast.io_utils import atomic_write_json

        record = {"model": name, "gpu_gib": gpu_gib, "fits": fits, "world_size": args.world_size,
                  "breakdown_bytes": plan.breakdown(), "cpu_offload_bytes": plan.cpu_offload,
                  "params_base": plan.params_base, "params_trainable": plan.params_trainable}
        atomic_write_json(args.json_out, record)
    return 0
