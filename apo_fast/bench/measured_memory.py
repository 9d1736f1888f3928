"""Peak memory of real training steps, measured (CUDA allocator, else RSS), to check the planner.
"""
from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

import torch

from apo_fast.bench.step_config import MIB

# --------------------------------------------------------------------------- training memory


def measure_training_memory(apo_cfg, steps: int = 3, workdir: str | Path | None = None) -> dict:
    """Peak GPU memory of apo-fast training steps for ``apo_cfg`` (an :class:`~apo_fast.config.APOConfig`).

    Builds the trainer (for a latent config without a VAE on disk, pass a config
    whose ``model.vae`` names one, e.g. from :func:`save_random_vae`), runs one
    step, resets the peak counters and runs ``steps`` more. Returns
    ``max_allocated_mib``, ``max_reserved_mib`` and the seconds per step; on a CPU
    the process RSS after the steps instead.
    """
    from apo_fast.telemetry import read_rss_bytes
    from apo_fast.training.trainer import APOTrainer

    before = torch.cuda.memory_allocated() if torch.cuda.is_available() and torch.cuda.is_initialized() else 0
    trainer = APOTrainer(apo_cfg, resume=False).setup()
    device = (
        trainer.engine.device
        if isinstance(trainer.engine.device, torch.device)
        else torch.device(trainer.engine.device)
    )
    cuda = device.type == "cuda"
    _ = trainer.micro_step(0, 0).metrics  # reading the metrics waits for the step
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for i in range(steps):
        _ = trainer.micro_step(i + 1, 0).metrics
    if cuda:
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - t0) / steps
    out: dict[str, Any] = {"steps": steps, "step_s": seconds, "device": str(device)}
    if cuda:
        out["allocated_before_setup_mib"] = before / MIB  # anything else already on the GPU (counted in the peak)
        out["max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / MIB
        out["max_reserved_mib"] = torch.cuda.max_memory_reserved(device) / MIB
    else:
        out["rss_mib"] = read_rss_bytes() / MIB
    out["trainable_parameters"] = sum(p.numel() for p in trainer.engine.module.parameters() if p.requires_grad)
    out["condition_parameters"] = trainer.engine.module.conditions.weight.numel()
    del trainer
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out
