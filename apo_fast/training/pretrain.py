"""Base-model pretraining on a product's normal images: ``apo-fast pretrain``.

A real user starts APO from a pretrained checkpoint (Stable Diffusion). For a
product of its own at CPU scale, or for the demo, this trains the small base
UNet that stands in for it: the plain diffusion loss on the normal images
(condition = the product's ``good`` row, dropped for classifier-free guidance
with ``pretrain.uncond_prob``), AdamW with warmup and a cosine decay, and an EMA
of the weights (``pretrain.ema_decay``), which is what gets saved: at this data
size the EMA weights draw the product long before the raw weights do.

Writes into the output folder:
``base_unet/`` (diffusers layout), ``base_conditions.safetensors``,
``pretrain_log.jsonl``, ``samples.png`` (free samples of the saved base beside
real normals, every ``pretrain.sample_every`` steps as ``samples_step-N.png``
too) and ``pretrain_state.pt`` (atomic, every ``pretrain.checkpoint_every``
steps; a rerun resumes from it and draws exactly what an uninterrupted run does).
"""
from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from apo_fast.config import APOConfig
from apo_fast.training.ema import ema_update

log = logging.getLogger(__name__)

__all__ = ["pretrain_base", "sample_product"]

STATE_FILE = "pretrain_state.pt"


def lr_at(step: int, total: int, warmup: int, schedule: str, lr: float = 1.0) -> float:
    """The learning rate of step ``step`` (from 0) for a peak ``lr`` (1: the factor): a linear
    warmup over ``warmup`` steps, then ``constant`` or ``cosine`` (half a cosine to 0 at ``total``)."""
    ramp = min(1.0, (step + 1) / warmup) if warmup else 1.0
    if schedule != "cosine":
        return lr * ramp
    return lr * ramp * 0.5 * (1 + math.cos(math.pi * step / max(total, 1)))


@torch.no_grad()
def sample_product(unet, conds, cfg: APOConfig, cond_id: int, num: int, *, seed: int = 0,
                   steps: int | None = None, guidance: float = 1.0, progress: bool = False) -> torch.Tensor:
    """Free samples (num, C, H, W) in [-1, 1] of condition ``cond_id`` from a base UNet (no adapters),
    DDIM with classifier-free guidance ``guidance`` (1 = the conditional prediction alone)."""
    from tqdm.auto import tqdm

    from apo_fast.models import build_scheduler

    device = next(unet.parameters()).device
    sched = build_scheduler(cfg.model, "ddim")
    sched.set_timesteps(steps or cfg.sample.num_inference_steps, device=device)
    size = cfg.data.image_size
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((num, unet.config.in_channels, size, size), generator=g).to(device)
    ids = torch.full((num,), cond_id, dtype=torch.long, device=device)
    kw_c = conds.unet_kwargs(ids, z.dtype, size)
    kw_u = conds.unet_kwargs(torch.full_like(ids, -1), z.dtype, size)
    for t in tqdm(sched.timesteps, desc="base samples", disable=not progress, leave=False):
        tb = torch.full((num,), int(t), device=device, dtype=torch.long)
        eps = unet(z, tb, **kw_c).sample
        if guidance != 1.0:
            eps_u = unet(z, tb, **kw_u).sample
            eps = eps_u + guidance * (eps - eps_u)
        z = sched.step(eps, t, z).prev_sample
    return z.clamp(-1, 1).cpu()


def _save_samples(unet, conds, cfg, data, path: Path, num: int = 16) -> None:
    from apo_fast.sampling.images import save_grid

    was_training = unet.training
    unet.eval()
    fake = sample_product(unet, conds, cfg, data.normal_cond, num)
    unet.train(was_training)
    save_grid({"base free": fake, "real": data.normals[:num]}, path)


def _load_state(path: Path, cfg: APOConfig) -> dict | None:
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("pretrain") != cfg.pretrain.__dict__ or state.get("seed") != cfg.train.seed:
        raise ValueError(
            f"{path} was written with other pretrain settings ({state.get('pretrain')}, seed {state.get('seed')}); "
            "remove it or choose another output folder to start over"
        )
    return state


@dataclass
class _Base:
    """What the pretraining updates and checkpoints: the base, its conditions, their EMA."""

    unet: torch.nn.Module
    conds: torch.nn.Module
    ema_unet: torch.nn.Module
    ema_conds: torch.nn.Module
    opt: torch.optim.Optimizer

    @property
    def params(self) -> list[torch.Tensor]:
        return list(self.unet.parameters()) + list(self.conds.parameters())

    @property
    def ema_params(self) -> list[torch.Tensor]:
        return list(self.ema_unet.parameters()) + list(self.ema_conds.parameters())

    def state_dict(self) -> dict:
        return {name: getattr(self, name).state_dict() for name in ("unet", "conds", "ema_unet", "ema_conds", "opt")}

    def load_state_dict(self, state: dict) -> None:
        for name in ("unet", "conds", "ema_unet", "ema_conds", "opt"):
            getattr(self, name).load_state_dict(state[name])

    def saved(self, ema: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
        return (self.ema_unet, self.ema_conds) if ema else (self.unet, self.conds)


def _build_base(cfg: APOConfig, data, device: torch.device) -> _Base:
    from apo_fast.models import (
        ConditionEmbedding,
        build_unet,
        pooled_dim,
        set_attention,
    )

    unet = build_unet(cfg.model, in_channels=data.normals.shape[1], sample_size=data.normals.shape[-1],
                      seed=cfg.train.seed).to(device)
    set_attention(unet, "sdpa", device)
    conds = ConditionEmbedding(len(data.condition_names), cfg.model.cond_tokens, unet.config.cross_attention_dim,
                               pooled_dim(unet)).to(device)
    opt = torch.optim.AdamW(list(unet.parameters()) + list(conds.parameters()), lr=cfg.pretrain.lr, weight_decay=0.0)
    return _Base(unet, conds, copy.deepcopy(unet).eval(), copy.deepcopy(conds), opt)


def _base_step(base: _Base, cfg: APOConfig, data, step: int, mode: str, ac: torch.Tensor, device) -> float:
    """One optimisation step; every draw seeded by ``(seed, step)`` (a resumed run matches)."""
    from apo_fast.training.streaming import augment, noisy_inputs, stream_indices

    p = cfg.pretrain
    g = torch.Generator().manual_seed(cfg.train.seed * 104_729 + step)
    idx = stream_indices(data.normals.shape[0], cfg.train.seed + 2, step * p.batch_size, p.batch_size)
    x0, _ = augment(data.normals[idx], None, g, mode)
    t = torch.randint(0, cfg.model.num_train_timesteps, (p.batch_size,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    ids = torch.full((p.batch_size,), data.normal_cond, dtype=torch.int64)
    ids[torch.rand(p.batch_size, generator=g) < p.uncond_prob] = -1  # classifier-free guidance's null row
    x0, t, noise, ids = x0.to(device), t.to(device), noise.to(device), ids.to(device)
    z, target = noisy_inputs(x0, noise, t, ac, cfg.model.prediction_type)
    pred = base.unet(z, t, **base.conds.unet_kwargs(ids, z.dtype, cfg.data.image_size)).sample
    loss = F.mse_loss(pred.float(), target.float())
    if not torch.isfinite(loss):
        raise FloatingPointError(f"base model step {step + 1}: the loss is {loss.item()}; lower pretrain.lr")
    base.opt.zero_grad(set_to_none=True)
    loss.backward()
    params = base.params
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    for group in base.opt.param_groups:
        group["lr"] = lr_at(step, p.steps, p.warmup_steps, "cosine", lr=p.lr)
    base.opt.step()
    if p.ema_decay > 0:
        ema_update(base.ema_params, params, step, p.ema_decay)
    return loss.item()


def _write_log(path: Path, records: list[dict]) -> None:
    from apo_fast.io_utils import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def pretrain_base(cfg: APOConfig, out_dir: Path, progress: bool = True, resume: bool = True) -> tuple[Path, Path]:
    """Train the base UNet on the normal images of ``cfg.data``; returns (unet folder, conditions file).

    The base knows the product but has never seen a defect. ``resume``: continue
    from ``out_dir/pretrain_state.pt`` if present (same settings only).
    """
    from tqdm.auto import tqdm

    from apo_fast.data import category_augment
    from apo_fast.io_utils import atomic_save
    from apo_fast.models import build_scheduler, resolve_device
    from apo_fast.training.streaming import load_train_data

    p = cfg.pretrain
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)  # the condition table's initial draw
    data = load_train_data(cfg)
    base = _build_base(cfg, data, device)
    state_path, log_path = out_dir / STATE_FILE, out_dir / "pretrain_log.jsonl"
    start, records = 0, []
    state = _load_state(state_path, cfg) if resume else None
    if state is not None:
        base.load_state_dict(state)
        start, records = state["step"], state["records"]
        log.info("base model: resumed from %s at step %d", state_path, start)
    ac = build_scheduler(cfg.model, "ddpm").alphas_cumprod.to(device=device, dtype=torch.float64)
    mode = category_augment(cfg.data.category, data.normals, log) if cfg.data.augment else "none"
    smooth = records[-1]["loss_ema"] if records else None
    base.unet.train()
    bar = tqdm(total=p.steps, initial=start, desc="base model", disable=not progress, dynamic_ncols=True)
    for step in range(start, p.steps):
        loss = _base_step(base, cfg, data, step, mode, ac, device)
        smooth = loss if smooth is None else 0.95 * smooth + 0.05 * loss
        records.append({"step": step + 1, "loss": loss, "loss_ema": smooth, "lr": base.opt.param_groups[0]["lr"]})
        bar.set_postfix_str(f"loss {smooth:.4f}")
        bar.update(1)
        done = step + 1
        if p.sample_every and done % p.sample_every == 0 and done < p.steps:
            _save_samples(*base.saved(p.ema_decay > 0), cfg, data, out_dir / f"samples_step-{done:06d}.png")
        if done % p.checkpoint_every == 0 and done < p.steps:
            snapshot = {"step": done, "records": records, "pretrain": p.__dict__, "seed": cfg.train.seed,
                        **base.state_dict()}
            atomic_save(state_path, lambda tmp, s=snapshot: torch.save(s, tmp))
            _write_log(log_path, records)
    bar.close()
    _write_log(log_path, records)
    return _save_base(base, cfg, data, out_dir, state_path)


def _save_base(base: _Base, cfg: APOConfig, data, out_dir: Path, state_path: Path) -> tuple[Path, Path]:
    from apo_fast.models import save_unet
    from apo_fast.models.conditions import save_conditions

    final_unet, final_conds = base.saved(cfg.pretrain.ema_decay > 0)
    _save_samples(final_unet, final_conds, cfg, data, out_dir / "samples.png")
    unet_dir, cond_path = out_dir / "base_unet", out_dir / "base_conditions.safetensors"
    save_unet(copy.deepcopy(final_unet).cpu(), unet_dir)
    # Only the rows the base trained (null, good): a defect row saved untrained would be a random
    # vector the base never saw, and APO would start from it instead of from the good row.
    save_conditions(final_conds.cpu(), data.condition_names, cond_path, keep=[data.condition_names[data.normal_cond]])
    state_path.unlink(missing_ok=True)  # the finished base replaces the resumable state
    return unet_dir, cond_path
