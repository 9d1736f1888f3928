"""What the step benchmark runs: model, batch, rank, precision, steps (:class:``StepBenchConfig``),
checked before anything is built, and the per-model defaults.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from apo_fast.config.choices import (
    BENCH_ATTENTION,
    BENCH_MODELS,
    BENCH_PRECISIONS,
    GATE_KINDS,
)

log = logging.getLogger(__name__)

MIB = 2**20
MODELS = BENCH_MODELS
PRECISIONS = BENCH_PRECISIONS
SIDES = ("apo_fast", "baseline")
PHASES = ("data", "policy_forward", "reference_forward", "loss", "backward", "optimizer", "other")
SCHEMA = "apo-fast-step-bench/1"

#: Pixel resolution per model (SD 1.5 at 512 px -> 64x64 latents, SDXL at 1024 px -> 128x128).
DEFAULT_RESOLUTION = {"tiny": 32, "sd15": 512, "sdxl": 1024}
#: Condition tokens per model: CLIP's 77 for the SD models, the demo's 4 for tiny.
DEFAULT_COND_TOKENS = {"tiny": 4, "sd15": 77, "sdxl": 77}
#: Noise schedules: the demo's for tiny, Stable Diffusion's for the SD models.
NOISE_SCHEDULE = {"tiny": "squaredcos_cap_v2", "sd15": "scaled_linear", "sdxl": "scaled_linear"}


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
        compile: ``torch.compile`` the UNet call on both sides (apo-fast's ``train.compile``,
            fullgraph; the baseline's ``--torch_compile`` style, graph breaks allowed);
            the warmup steps absorb the compile time, reported apart. ``compile_backend``:
            torch.compile's backend for both.
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
    compile: bool = False
    compile_backend: str = "inductor"  # inductor | aot_eager | eager (a quick check of the compiled path)

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
        if self.attention not in BENCH_ATTENTION:
            raise ValueError(f"attention must be 'sdpa' or 'xformers', got {self.attention!r}")
        for name in ("beta_dpo", "learning_rate", "telemetry_period_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile must be a bool, got {self.compile!r}")
        if self.compile_backend not in ("inductor", "aot_eager", "eager"):
            raise ValueError(f"compile_backend must be inductor, aot_eager or eager, got {self.compile_backend!r}")
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


