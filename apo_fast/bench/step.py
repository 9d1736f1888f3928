"""Training-step benchmark: apo-fast against the diffusers Diffusion-DPO baseline, side by side.

``run_step_benchmark(StepBenchConfig(model="tiny"))`` builds both trainers on the
same UNet config (random weights, :data:`apo_fast.models.presets.UNET_PRESETS`),
the same data (the bundled demo dataset), batch and precision, and times their
training steps interleaved (A B B A ...), so that a machine whose speed drifts
(a shared CPU, GPU clocks) affects both alike:

* apo-fast: its real step, :meth:`apo_fast.training.trainer.APOTrainer.micro_step`, on the
  DeepSpeed engine that :meth:`~apo_fast.training.trainer.APOTrainer.setup` builds (time-gated
  adapters, fused loss and adapter kernels on CUDA, cached latents), in paired
  mode with a constant ``beta_t = beta_dpo``: the Diffusion-DPO objective;
* baseline: :class:`apo_fast.bench.baseline_dpo.DiffusionDPOBaseline`, the approach of
  diffusers' ``train_diffusion_dpo.py`` (peft LoRA, eager loss, adapters disabled
  for the reference, the VAE encoding every step).

Reported per side: samples/s (UNet images: a pair counts two), step time and its
breakdown (``data``, ``policy_forward``, ``reference_forward``, ``loss``,
``backward``, ``optimizer``, ``other``; CUDA events on a GPU, ``perf_counter`` on
the CPU), peak memory (``torch.cuda.max_memory_allocated`` of the side's own
steps minus what the other side keeps resident; process RSS from
:class:`apo_fast.telemetry.Telemetry` on a CPU) and telemetry; then apo-fast's
ratios to the baseline. :func:`write_reports` writes ``bench.json``,
``bench.md`` and ``bench.png``.

Latent models (``sd15``, ``sdxl``): nothing is downloaded. A randomly initialised
``AutoencoderKL`` with the Stable Diffusion VAE config is saved to a scratch
folder; apo-fast's setup encodes the demo images with it once (its latent
cache) and the baseline encodes pixels with the same VAE every step, so the
baseline pays the real VAE cost.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import itertools
import logging
import math
import os
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from apo_fast.config.choices import GATE_KINDS

log = logging.getLogger(__name__)

MIB = 2**20
MODELS = ("tiny", "sd15", "sdxl")
PRECISIONS = ("auto", "no", "fp32", "bf16", "fp16")
SIDES = ("apo_fast", "baseline")
PHASES = ("data", "policy_forward", "reference_forward", "loss", "backward", "optimizer", "other")
SCHEMA = "apo-fast-step-bench/1"

#: Pixel resolution per model (SD 1.5 at 512 px -> 64x64 latents, SDXL at 1024 px -> 128x128).
DEFAULT_RESOLUTION = {"tiny": 32, "sd15": 512, "sdxl": 1024}
#: Condition tokens per model: CLIP's 77 for the SD models, the demo's 4 for tiny.
DEFAULT_COND_TOKENS = {"tiny": 4, "sd15": 77, "sdxl": 77}
#: Noise schedules: the demo's for tiny, Stable Diffusion's for the SD models.
NOISE_SCHEDULE = {"tiny": "squaredcos_cap_v2", "sd15": "scaled_linear", "sdxl": "scaled_linear"}


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


# --------------------------------------------------------------------------- config


@dataclass
class StepBenchConfig:
    """What to benchmark.

    Attributes:
        model: ``tiny`` (pixel space, the CPU demo UNet), ``sd15`` or ``sdxl`` (latents).
        batch: preference pairs per step (each UNet pass sees ``2 * batch`` images).
        r: adapter / LoRA rank (lora_alpha = r on both sides; the CLI flag is ``--rank``).
        precision: ``auto`` (bf16 on CUDA, fp32 elsewhere), ``no``/``fp32``, ``bf16``, ``fp16``.
        steps: timed steps per side; warmup: untimed steps per side first.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        resolution: pixels (default per model: 32, 512, 1024).
        cond_tokens: condition tokens (default 77 for SD, 4 for tiny).
        gate: apo-fast's timestep gate (``rank_prefix`` is APO's default,
            ``constant`` the exact LoRA the baseline trains).
        gradient_checkpointing, use_8bit_adam, attention: memory flags, set alike on both sides.
        beta_dpo: the DPO temperature (both sides).
        seed: seeds the model weights and the data draws.
        threads: ``torch.set_num_threads`` for the run (None: leave it).
        telemetry_period_s: sampling period of the telemetry thread.
        time_budget_s: optional seconds from the start of the run after which no
            further timed step starts (at least two per side always run); the
            steps done are reported as ``config.steps_done``.
    """

    model: str = "tiny"
    batch: int = 4
    r: int = 16
    precision: str = "auto"
    steps: int = 20
    warmup: int = 3
    device: str = "auto"
    resolution: int | None = None
    cond_tokens: int | None = None
    gate: str = "rank_prefix"
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = False
    attention: str = "sdpa"
    beta_dpo: float = 2500.0
    learning_rate: float = 5e-4
    seed: int = 0
    threads: int | None = None
    telemetry_period_s: float = 0.05
    time_budget_s: float | None = None

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name, low in (("batch", 1), ("r", 1), ("steps", 1), ("warmup", 0), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        for name in ("resolution", "cond_tokens", "threads"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")
        if self.resolution is not None and self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8, got {self.resolution}")
        if self.gate not in GATE_KINDS:
            raise ValueError(f"gate must be rank_prefix, constant, sigmoid or learned, got {self.gate!r}")
        if self.attention not in ("sdpa", "xformers"):
            raise ValueError(f"attention must be 'sdpa' or 'xformers', got {self.attention!r}")
        for name in ("beta_dpo", "learning_rate", "telemetry_period_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        budget = self.time_budget_s
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0):
            raise ValueError(f"time_budget_s must be None or a number > 0, got {budget!r}")

    @property
    def pixel_size(self) -> int:
        return self.resolution or DEFAULT_RESOLUTION[self.model]

    @property
    def tokens(self) -> int:
        return self.cond_tokens or DEFAULT_COND_TOKENS[self.model]

    @property
    def latent(self) -> bool:
        return self.model != "tiny"

    def resolved_device(self) -> torch.device:
        from apo_fast.models import resolve_device

        return resolve_device(self.device)

    def mixed_precision(self, device: torch.device) -> str:
        """The ``no`` / ``fp16`` / ``bf16`` setting both trainers use."""
        if self.precision == "auto":
            return "bf16" if device.type == "cuda" else "no"
        return "no" if self.precision == "fp32" else self.precision


# --------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_per_call(fn, device: torch.device, *, warmup: int = 3, reps: int = 20, rounds: int = 5) -> float:
    """Seconds per call of ``fn``: the median over ``rounds`` of the mean of ``reps``
    back-to-back calls (what the kernel benchmarks and the GPU suite time with).

    On CUDA the calls are not synchronised one by one (as in a training loop)
    and CUDA events time each round, so host launch overhead counts only where
    it exceeds the device time; elsewhere ``perf_counter`` times each round.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    per_round = []
    for _ in range(rounds):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            end.synchronize()
            per_round.append(start.elapsed_time(end) / 1e3 / reps)
        else:
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            per_round.append((time.perf_counter() - t0) / reps)
    return statistics.median(per_round)



class PhaseTimer:
    """Times the named phases of one step: CUDA events on a GPU, ``perf_counter`` on a CPU.

    ``start()``, then ``phase(name)`` whenever a new phase begins (a name may come
    back; its times add up), then ``stop()`` -> ``(wall_seconds, {phase: seconds})``.
    On CUDA no phase boundary synchronises; ``stop`` synchronises once.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self._marks: list[tuple[str, Any]] = []
        self._t0 = 0.0

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self._marks = []
        self._t0 = time.perf_counter()
        self.phase("data")

    def phase(self, name: str) -> None:
        if self._marks and self._marks[-1][0] == name:
            return
        self._marks.append((name, self._now()))

    def stop(self) -> tuple[float, dict[str, float]]:
        end = self._now()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        wall = time.perf_counter() - self._t0
        phases: dict[str, float] = {}
        bounds = self._marks + [("_end", end)]
        for (name, a), (_, b) in itertools.pairwise(bounds):
            seconds = a.elapsed_time(b) / 1e3 if self.cuda else b - a
            phases[name] = phases.get(name, 0.0) + seconds
        return wall, phases


class _TimedEngine:
    """Stands in for the DeepSpeed engine inside ``APOTrainer.micro_step`` and tells a
    :class:`PhaseTimer` where the forward passes, the backward and the optimizer step begin."""

    def __init__(self, engine, timer: PhaseTimer | None = None):
        self._engine = engine
        self.timer = timer
        self.calls = 0

    def _phase(self, name: str) -> None:
        if self.timer is not None:
            self.timer.phase(name)

    def __call__(self, *args, reference: bool = False, **kwargs):
        self.calls += 1
        self._phase("reference_forward" if reference else "policy_forward")
        out = self._engine(*args, reference=reference, **kwargs)
        self._phase("loss")
        return out

    def backward(self, loss, *args, **kwargs):
        self._phase("backward")
        out = self._engine.backward(loss, *args, **kwargs)
        self._phase("optimizer")  # gradient clipping (the trainer's own at ZeRO 0 in fp32) onwards
        return out

    def step(self, *args, **kwargs):
        self._phase("optimizer")
        out = self._engine.step(*args, **kwargs)
        self._phase("other")
        return out

    def __getattr__(self, name):
        return getattr(self._engine, name)


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


# --------------------------------------------------------------------------- the run


def _cuda_allocated(device: torch.device) -> int:
    gc.collect()
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device)


def _summarize_side(records: list[dict], images_per_step: int, tel_records: list[dict], cuda: bool) -> dict:
    walls = [r["wall_s"] for r in records]
    phases = {p: statistics.fmean(r["phases"].get(p, 0.0) for r in records) for p in PHASES}
    out: dict[str, Any] = {
        "steps": len(records),
        "samples_per_s": images_per_step * len(walls) / sum(walls),
        "pairs_per_s": images_per_step / 2 * len(walls) / sum(walls),
        "step_time_s": {
            "mean": statistics.fmean(walls),
            "median": statistics.median(walls),
            "min": min(walls),
            "max": max(walls),
            "stdev": statistics.stdev(walls) if len(walls) > 1 else 0.0,
        },
        "breakdown_s": phases,
        "breakdown_sum_s": sum(phases.values()),
        "loss_last": records[-1]["loss"],
    }
    side_tel = [t for t in tel_records if any(r["t0"] <= t["t"] <= r["t1"] for r in records)]
    if cuda:
        out["peak_memory_mib"] = max(r["peak_own_bytes"] for r in records) / MIB
        out["peak_memory_total_mib"] = max(r["peak_total_bytes"] for r in records) / MIB
        out["peak_memory_kind"] = (
            "torch.cuda.max_memory_allocated during this side's steps, minus the other side's resident memory"
        )
    else:
        rss = [t["rss_mib"] for t in side_tel if "rss_mib" in t]
        out["peak_memory_mib"] = max(rss) if rss else None
        out["peak_memory_kind"] = "process RSS (both sides resident), max of telemetry samples during this side's steps"
    for key in ("util_pct", "power_w", "sm_clock_mhz", "mem_used_mib"):
        vals = [t[key] for t in side_tel if key in t]
        if vals:
            out[f"telemetry_{key}_mean"] = statistics.fmean(vals)
    out["telemetry_samples"] = len(side_tel)
    return out


def _load_average() -> list[float] | None:
    from apo_fast.machine import loadavg

    return loadavg()


def _machine(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    info["load_avg_1_5_15"] = _load_average()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
        info["cuda"] = torch.version.cuda
    for name in ("triton", "diffusers", "peft", "deepspeed"):
        try:
            info[name] = __import__(name).__version__
        except Exception as exc:  # noqa: BLE001 - a missing optional package is reported as such
            info[name] = f"missing ({type(exc).__name__})"
    info["APO_FAST_BACKEND"] = os.environ.get("APO_FAST_BACKEND", "auto")
    return info


def _notes(cfg: StepBenchConfig, device: torch.device) -> list[str]:
    notes = [
        (
            "baseline: apo_fast.bench.baseline_dpo, a re-implementation of the diffusers train_diffusion_dpo.py step "
            "(peft LoRA on to_k/to_q/to_v/to_out.0, eager loss, disable_adapters() reference under no_grad, "
            "autocast + frozen weights cast to the weight dtype, plain torch optimizer step)"
        ),
        (
            f"apo-fast: APOTrainer.micro_step on its DeepSpeed engine, paired mode, constant beta_t = beta_dpo "
            f"(the Diffusion-DPO objective), gate {cfg.gate!r}, trainable condition embeddings"
        ),
        (
            f"same UNet config ({cfg.model}, random weights, seed {cfg.seed}), batch {cfg.batch} pairs "
            f"({2 * cfg.batch} images per UNet pass), rank {cfg.r}, {cfg.pixel_size} px, "
            f"{cfg.tokens} condition tokens"
        ),
        "steps interleaved A B B A ...; samples/s counts UNet images (2 per pair)",
        (
            "text encoder left out on both sides: fixed condition embeddings stand in for the baseline's prompt "
            "embeddings (the script recomputes them with CLIP every step); no image decoding or augmentation "
            "on either side"
        ),
    ]
    if cfg.latent:
        notes.append(
            "latents: apo-fast encodes the demo images once at setup with a randomly initialised AutoencoderKL "
            "(SD VAE config) and trains on the cached latents; the baseline encodes pixels with the same VAE "
            "every step (posterior sample), as the script does"
        )
    else:
        notes.append("pixel-space tiny UNet: no VAE on either side")
    if cfg.model == "sdxl":
        notes.append(
            "SDXL: addition_embed_type 'text_time' removed from the UNet config on both sides "
            "(apo-fast's APOModel passes no added_cond_kwargs)"
        )
    if device.type != "cuda":
        notes.append(
            "CPU: peak memory is the process RSS with both sides resident, not a per-side figure; "
            "the memory ratio is not reported"
        )
    return notes


def run_step_benchmark(cfg: StepBenchConfig, workdir: str | Path | None = None, progress: bool = False) -> dict:
    """Build both sides, run ``warmup`` then ``steps`` interleaved steps each, return the result dict.

    ``workdir`` holds scratch files (the random VAE); a temporary folder by default.
    The result has ``config``, ``machine``, ``date``, ``notes``, one dict per side
    (``apo_fast``, ``baseline``: samples/s, step time, breakdown, peak memory,
    telemetry means), ``ratios`` (apo-fast / baseline) and ``telemetry``.
    """
    from apo_fast.telemetry import Telemetry

    if not isinstance(cfg, StepBenchConfig):
        raise TypeError(f"cfg must be a StepBenchConfig, got {type(cfg).__name__}")
    device = cfg.resolved_device()
    previous_threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    own_tmp = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="apo_bench_")) if own_tmp else Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cuda = device.type == "cuda"
    t_build = time.perf_counter()
    load_start = _load_average()
    try:
        vae_dir = save_random_vae(cfg.model, workdir / "random_vae", cfg.seed) if cfg.latent else None
        m0 = _cuda_allocated(device) if cuda else 0
        apo = APOFastSide(cfg, device, workdir, vae_dir)
        for _ in range(cfg.warmup):
            apo.step(None)
        resident = {}
        if cuda:
            resident["apo_fast"] = _cuda_allocated(device) - m0
        base = BaselineSide(cfg, device, apo, vae_dir)
        for _ in range(cfg.warmup):
            base.step(None)
        if cuda:
            resident["baseline"] = _cuda_allocated(device) - m0 - resident["apo_fast"]
        build_s = time.perf_counter() - t_build
        if apo.engine.calls == 0 and cfg.warmup:
            raise RuntimeError("APOTrainer.micro_step did not call trainer.engine; the step breakdown cannot be timed")
        sides = {"apo_fast": apo, "baseline": base}
        records: dict[str, list[dict]] = {name: [] for name in SIDES}
        timer = PhaseTimer(device)
        origin = time.monotonic()

        def _timed_rounds() -> None:
            nonlocal steps_done
            for i in range(cfg.steps):
                if cfg.time_budget_s is not None and i >= 2 and time.perf_counter() - t_build > cfg.time_budget_s:
                    log.warning(
                        "step benchmark: time budget of %.0f s reached after %d steps per side", cfg.time_budget_s, i
                    )
                    break
                steps_done = i + 1
                order = SIDES if i % 2 == 0 else SIDES[::-1]
                for name in order:
                    other = "baseline" if name == "apo_fast" else "apo_fast"
                    if cuda:
                        torch.cuda.reset_peak_memory_stats(device)
                    t0 = time.monotonic() - origin
                    timer.start()
                    loss = sides[name].step(timer)
                    wall, phases = timer.stop()
                    rec = {"wall_s": wall, "phases": phases, "loss": loss, "t0": t0, "t1": time.monotonic() - origin}
                    if cuda:
                        peak = torch.cuda.max_memory_allocated(device)
                        rec["peak_total_bytes"] = peak
                        rec["peak_own_bytes"] = peak - resident[other]
                    records[name].append(rec)
                if progress:
                    print(
                        f"step {i + 1}/{cfg.steps}: apo-fast {records['apo_fast'][-1]['wall_s'] * 1e3:.1f} ms, "
                        f"baseline {records['baseline'][-1]['wall_s'] * 1e3:.1f} ms",
                        flush=True,
                    )

        interrupted = False
        with Telemetry(device if cuda else "cpu", period_s=cfg.telemetry_period_s) as tel:
            steps_done = 0
            try:
                _timed_rounds()
            except KeyboardInterrupt:  # keep what was measured: whole rounds (both sides) only
                if min(len(r) for r in records.values()) == 0:
                    raise
                interrupted = True
                steps_done = min(len(r) for r in records.values())
                for recs in records.values():
                    del recs[steps_done:]
                log.warning("step benchmark interrupted: reporting the %d step(s) per side measured", steps_done)
            tel_records = tel.records
            tel_summary = tel.summary()
        images = 2 * cfg.batch
        result: dict[str, Any] = {
            "schema": SCHEMA,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "config": {
                **dataclasses.asdict(cfg),
                "device": str(device),
                "mixed_precision": cfg.mixed_precision(device),
                "pixel_size": cfg.pixel_size,
                "cond_tokens": cfg.tokens,
                "images_per_step": images,
                "steps_done": steps_done,
                "interrupted": interrupted,
            },
            "machine": {**_machine(device), "load_avg_at_start": load_start},
            "notes": _notes(cfg, device),
            "build_and_warmup_s": build_s,
            "apo_fast": {**_summarize_side(records["apo_fast"], images, tel_records, cuda), "setup": apo.describe()},
            "baseline": {**_summarize_side(records["baseline"], images, tel_records, cuda), "setup": base.describe()},
            "telemetry": tel_summary,
            "per_step": {
                name: [{k: v for k, v in r.items() if k not in ("t0", "t1")} for r in recs]
                for name, recs in records.items()
            },
        }
        if cuda:
            result["resident_mib"] = {k: v / MIB for k, v in resident.items()}
        result["ratios"] = _ratios(result["apo_fast"], result["baseline"], cuda)
        result["ratios"]["step_time_paired"] = _paired_ratios(records["apo_fast"], records["baseline"])
        return result
    finally:
        if cfg.threads is not None:
            torch.set_num_threads(previous_threads)
        if own_tmp:
            shutil.rmtree(workdir, ignore_errors=True)
        elif (workdir / "random_vae").exists():
            shutil.rmtree(workdir / "random_vae", ignore_errors=True)


def _ratio(a, b):
    return a / b if a is not None and b else None


def _paired_ratios(apo: list[dict], base: list[dict]) -> dict:
    """Per-round ratios apo-fast / baseline of the step times of the same round (adjacent in
    time, so a drifting machine cancels out): median and quartiles."""
    ratios = sorted(a["wall_s"] / b["wall_s"] for a, b in zip(apo, base))
    if len(ratios) < 2:
        return {"median": ratios[0], "p25": ratios[0], "p75": ratios[0], "rounds": len(ratios)}
    p25, _, p75 = statistics.quantiles(ratios, n=4, method="inclusive")
    return {"median": statistics.median(ratios), "p25": p25, "p75": p75, "rounds": len(ratios)}


def _ratios(apo: dict, base: dict, cuda: bool) -> dict:
    """apo-fast / baseline: ``samples_per_s`` > 1 and the others < 1 favour apo-fast."""
    out = {
        "samples_per_s": _ratio(apo["samples_per_s"], base["samples_per_s"]),
        "step_time_median": _ratio(apo["step_time_s"]["median"], base["step_time_s"]["median"]),
        "step_time_mean": _ratio(apo["step_time_s"]["mean"], base["step_time_s"]["mean"]),
        "peak_memory": _ratio(apo["peak_memory_mib"], base["peak_memory_mib"]) if cuda else None,
    }
    out["breakdown"] = {p: _ratio(apo["breakdown_s"][p], base["breakdown_s"][p]) for p in PHASES}
    return out


# --------------------------------------------------------------------------- reports


def _precision_label(mixed_precision: str) -> str:
    """``no`` (the trainers' setting) reads as ``fp32`` in reports."""
    return "fp32" if mixed_precision == "no" else mixed_precision


def _fmt(value, spec: str = ".3g") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and not math.isfinite(value):
        return "n/a"
    return format(value, spec)


def to_markdown(result: dict) -> str:
    """A Markdown report: the setup, one table of both sides and the ratios, the notes."""
    c, m = result["config"], result["machine"]
    a, b, r = result["apo_fast"], result["baseline"], result["ratios"]
    where = m.get("gpu") or f"{m.get('cpu_count')}-core CPU ({m.get('platform')})"
    load = ""
    if m.get("load_avg_at_start") and m.get("load_avg_1_5_15"):
        load = f"; load average {m['load_avg_at_start'][0]:.1f} at start, {m['load_avg_1_5_15'][0]:.1f} at end"
    sa, sb = a["step_time_s"], b["step_time_s"]
    lines = [
        (
            f"### Step benchmark: {c['model']}, {c['pixel_size']} px, batch {c['batch']} pairs, rank {c['r']}, "
            f"{_precision_label(c['mixed_precision'])}"
        ),
        "",
        (
            f"- {result['date']} on {where}; torch {m.get('torch')}, {c.get('steps_done', c['steps'])} timed steps "
            f"per side after {c['warmup']} warmup, interleaved; torch threads {m.get('torch_threads')}{load}"
        ),
        "",
        "| metric | apo-fast | baseline | apo-fast / baseline |",
        "|---|---:|---:|---:|",
        (
            f"| samples/s (images) | {_fmt(a['samples_per_s'])} | {_fmt(b['samples_per_s'])} | "
            f"**{_fmt(r['samples_per_s'])}** |"
        ),
        (
            f"| step time median (ms) | {_fmt(sa['median'] * 1e3)} | {_fmt(sb['median'] * 1e3)} | "
            f"{_fmt(r['step_time_median'])} |"
        ),
        (
            f"| step time mean +- sd (ms) | {_fmt(sa['mean'] * 1e3)} +- {_fmt(sa['stdev'] * 1e3, '.2g')} | "
            f"{_fmt(sb['mean'] * 1e3)} +- {_fmt(sb['stdev'] * 1e3, '.2g')} | {_fmt(r['step_time_mean'])} |"
        ),
    ]
    pr = r.get("step_time_paired")
    if pr:
        lines.append(
            f"| step time, per-round ratio median [quartiles] | | | {_fmt(pr['median'])} "
            f"[{_fmt(pr['p25'])}, {_fmt(pr['p75'])}] |"
        )
    for p in PHASES:
        lines.append(
            f"| - {p} (ms) | {_fmt(a['breakdown_s'][p] * 1e3)} | {_fmt(b['breakdown_s'][p] * 1e3)} | "
            f"{_fmt(r['breakdown'][p])} |"
        )
    lines.append(
        f"| peak memory (MiB) | {_fmt(a['peak_memory_mib'], '.1f')} | {_fmt(b['peak_memory_mib'], '.1f')} | "
        f"{_fmt(r['peak_memory'])} |"
    )
    for key, label in (("telemetry_util_pct_mean", "GPU util (%)"), ("telemetry_power_w_mean", "power (W)")):
        if key in a or key in b:
            lines.append(f"| {label} | {_fmt(a.get(key))} | {_fmt(b.get(key))} | |")
    lines += ["", f"Peak memory: {a['peak_memory_kind']}.", "", "Notes:"]
    lines += [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def plot_result(result: dict, path: str | Path) -> Path:
    """Bar chart PNG: stacked step-time breakdown, samples/s and peak memory of both sides."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["apo-fast", "baseline"]
    sides = [result["apo_fast"], result["baseline"]]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    ax = axes[0]
    left = [0.0, 0.0]
    for i, p in enumerate(PHASES):
        widths = [s["breakdown_s"][p] * 1e3 for s in sides]
        ax.barh(labels, widths, left=left, color=f"C{i}", label=p)
        left = [lft + w for lft, w in zip(left, widths)]
    ax.set_xlabel("ms per step")
    ax.set_title("step time breakdown")
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    ax = axes[1]
    ax.bar(labels, [s["samples_per_s"] for s in sides], color=["C0", "C7"])
    ax.set_title(f"samples/s (x{result['ratios']['samples_per_s']:.2f})")
    ax = axes[2]
    mem = [s["peak_memory_mib"] or 0.0 for s in sides]
    ax.bar(labels, mem, color=["C0", "C7"])
    ax.set_title("peak memory (MiB)" + ("" if result["ratios"]["peak_memory"] is not None else ", process RSS"))
    c = result["config"]
    fig.suptitle(
        f"{c['model']} {c['pixel_size']}px, batch {c['batch']} pairs, rank {c['r']}, "
        f"{_precision_label(c['mixed_precision'])}, "
        f"{result['machine'].get('gpu') or 'CPU'}",
        fontsize=10,
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_reports(result: dict, output_dir: str | Path, stem: str = "bench") -> dict[str, str]:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` into ``output_dir``; returns their paths."""
    from apo_fast.io_utils import atomic_write_json, atomic_write_text

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": str(out / f"{stem}.json"), "markdown": str(out / f"{stem}.md"), "png": str(out / f"{stem}.png")}
    result = {**result, "files": files}
    atomic_write_json(Path(files["json"]), result)
    atomic_write_text(Path(files["markdown"]), to_markdown(result))
    plot_result(result, files["png"])
    return files


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


__all__ = [
    "MODELS",
    "PHASES",
    "PhaseTimer",
    "StepBenchConfig",
    "measure_training_memory",
    "plot_result",
    "run_step_benchmark",
    "save_random_vae",
    "sd_vae_config",
    "to_markdown",
    "write_reports",
]
