"""The adapter's configuration: the user's objects, used unchanged from YAML to kernel.

:class:`AdapterConfig` and :class:`GateConfig` use peft's field names (``r``,
``lora_alpha``, ``target_modules``, ``lora_dropout`` is ``dropout``) and are what the run
config's ``adapter:`` section holds, what :func:`apo_fast.adapters.inject_adapters`
takes, what the saved adapter file records and what the memory planner reads. No torch
import (the CLI checks a config before it loads torch).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from apo_fast.config.choices import BACKENDS, DEFAULT_TARGET_MODULES, GATE_KINDS

__all__ = ["DEFAULT_TARGET_MODULES", "GATE_KINDS", "AdapterConfig", "GateConfig", "default_r_min", "from_mapping", "module_matches"]


def default_r_min(r_max: int) -> int:
    """The rank-prefix gate's active dims at ``t = T`` when ``r_min`` is not set: three
    quarters of ``r_max`` (at least 1). The one place this default is computed.

    A base that never saw a defect must be taught the defect's shape and colour at high
    noise, where they are decided; with a quarter open there (the earlier default) APO's
    guided anomalies stayed faint (``docs/fidelity.md``, session 7)."""
    return max(1, (3 * r_max) // 4)


def module_matches(path: str, targets: tuple[str, ...]) -> bool:
    """peft's ``target_modules`` rule: a module matches if its path equals an entry or ends
    with ``"." + entry``."""
    return any(path == t or path.endswith("." + t) for t in targets)


def from_mapping(cls: type, data: dict[str, Any], what: str):
    """``cls(**data)`` for a dataclass, refusing a non-mapping or unknown keys (ValueError)."""
    if not isinstance(data, dict):
        raise TypeError(f"{what} config must be a mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {what} config keys {unknown}; expected a subset of {sorted(known)}")
    return cls(**data)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class GateConfig:
    """How the adapter's rank dimensions are gated by the timestep.

    Attributes:
        kind: one of ``GATE_KINDS`` (see the module docstring).
        r_min: active dims at ``t = T``; ``None`` means :func:`default_r_min` of ``r_max``.
        r_max: active dims at ``t = 0``; ``None`` means the adapter's rank ``r``.
        num_train_timesteps: ``T``, the scheduler's number of training steps.
        temperature: soft-edge width in rank dims (``sigmoid``, and the
            ``learned`` gate's starting point); must be > 0.
        embedding_dim: sinusoidal timestep embedding size (``learned``; even).
        hidden_size: hidden width of the gate MLP (``learned``).
    """

    kind: str = "rank_prefix"
    r_min: int | None = None
    r_max: int | None = None
    num_train_timesteps: int = 1000
    temperature: float = 1.0
    embedding_dim: int = 64
    hidden_size: int = 64

    def __post_init__(self) -> None:
        if self.kind not in GATE_KINDS:
            raise ValueError(f"GateConfig.kind must be one of {GATE_KINDS}, got {self.kind!r}")
        for name in ("r_min", "r_max"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise ValueError(f"GateConfig.{name} must be an int >= 1 or None, got {value!r}")
        if self.r_min is not None and self.r_max is not None and self.r_min > self.r_max:
            raise ValueError(
                f"GateConfig.r_min ({self.r_min}) must be <= GateConfig.r_max ({self.r_max})"
            )
        if not _is_int(self.num_train_timesteps) or self.num_train_timesteps < 1:
            raise ValueError(
                "GateConfig.num_train_timesteps must be an int >= 1, "
                f"got {self.num_train_timesteps!r}"
            )
        temperature = self.temperature
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, (int, float))
            or not math.isfinite(temperature)
            or temperature <= 0
        ):
            raise ValueError(f"GateConfig.temperature must be a finite number > 0, got {temperature!r}")
        if not _is_int(self.embedding_dim) or self.embedding_dim < 2 or self.embedding_dim % 2:
            raise ValueError(
                f"GateConfig.embedding_dim must be an even int >= 2, got {self.embedding_dim!r}"
            )
        if not _is_int(self.hidden_size) or self.hidden_size < 1:
            raise ValueError(f"GateConfig.hidden_size must be an int >= 1, got {self.hidden_size!r}")

    @property
    def is_constant(self) -> bool:
        return self.kind == "constant"

    def rank_range(self, rank: int) -> tuple[int, int]:
        """``(r_min, r_max)`` resolved for an adapter of rank ``rank``; validated."""
        if not _is_int(rank) or rank < 1:
            raise ValueError(f"rank must be an int >= 1, got {rank!r}")
        r_max = self.r_max if self.r_max is not None else rank
        if r_max > rank:
            raise ValueError(f"GateConfig.r_max ({r_max}) must be <= the adapter rank ({rank})")
        r_min = self.r_min if self.r_min is not None else default_r_min(r_max)
        if r_min > r_max:
            raise ValueError(f"GateConfig.r_min ({r_min}) must be <= r_max ({r_max}) for rank {rank}")
        return r_min, r_max

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GateConfig":
        """Build from a mapping (YAML/JSON); unknown keys raise ValueError."""
        return from_mapping(cls, data, "gate")



@dataclass(frozen=True)
class AdapterConfig:
    """Which layers get adapters and how.

    Attributes:
        r: adapter rank.
        lora_alpha: scaling numerator; ``None`` means ``r`` (scaling 1, the
            diffusers training scripts' choice).
        target_modules: module-path suffixes (peft rule: a module matches if its
            path equals the entry or ends with ``"." + entry``).
        gate: the timestep gate (a ``GateConfig`` or a mapping for one).
        adapter_name: peft adapter name (dropped in saved files).
        dropout: LoRA dropout on the adapter branch's input (0 keeps the fused path).
        backend: ``"auto"`` | ``"triton"`` | ``"torch"`` | ``None`` (environment).
        mask_input: give the policy the defect mask as a spatial input (a zero-initialised
            branch added to ``conv_in``'s output, :mod:`apo_fast.adapters.mask_input`), so it
            knows where the defect goes; off in the reference pass.
        mask_time: the mask input also sees the timestep: its hidden features are scaled by
            ``1 + W emb(t)`` (the UNet's time embedding, ``W`` zero-initialised), so its
            strength can differ between high and low noise. Needs ``mask_input``.
    """

    r: int = 4
    lora_alpha: float | None = None
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    gate: GateConfig = field(default_factory=GateConfig)
    adapter_name: str = "default"
    dropout: float = 0.0
    backend: str | None = None
    mask_input: bool = False
    mask_time: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"AdapterConfig.r must be an int >= 1, got {self.r!r}")
        alpha = self.lora_alpha
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not alpha > 0):
            raise ValueError(f"AdapterConfig.lora_alpha must be a number > 0 or None, got {alpha!r}")
        targets = self.target_modules
        if isinstance(targets, str):
            targets = (targets,)
        if not isinstance(targets, (list, tuple)) or not targets:
            raise ValueError(f"AdapterConfig.target_modules must be a non-empty list of names, got {targets!r}")
        for name in targets:
            if not isinstance(name, str) or not name or name.startswith(".") or name.endswith("."):
                raise ValueError(f"AdapterConfig.target_modules entries must be module-path suffixes, got {name!r}")
        object.__setattr__(self, "target_modules", tuple(targets))
        gate = self.gate
        if isinstance(gate, dict):
            gate = GateConfig.from_dict(gate)
        if not isinstance(gate, GateConfig):
            raise TypeError(f"AdapterConfig.gate must be a GateConfig or a mapping, got {type(gate).__name__}")
        gate.rank_range(self.r)
        object.__setattr__(self, "gate", gate)
        if not isinstance(self.adapter_name, str) or not self.adapter_name or "." in self.adapter_name:
            raise ValueError(
                f"AdapterConfig.adapter_name must be a non-empty name without dots, got {self.adapter_name!r}"
            )
        dropout = self.dropout
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
            raise ValueError(f"AdapterConfig.dropout must be a number in [0, 1), got {dropout!r}")
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"AdapterConfig.backend must be one of {BACKENDS} or None, got {self.backend!r}")
        if not isinstance(self.mask_input, bool):
            raise ValueError(f"AdapterConfig.mask_input must be true or false, got {self.mask_input!r}")
        if not isinstance(self.mask_time, bool):
            raise ValueError(f"AdapterConfig.mask_time must be true or false, got {self.mask_time!r}")
        if self.mask_time and not self.mask_input:
            raise ValueError("AdapterConfig.mask_time needs mask_input: true (it times the mask input)")

    @property
    def alpha(self) -> float:
        """``lora_alpha`` resolved (``r`` when unset)."""
        return self.r if self.lora_alpha is None else self.lora_alpha

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["target_modules"] = list(self.target_modules)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        """Build from a mapping (YAML/JSON); unknown keys raise ValueError."""
        return from_mapping(cls, data, "adapter")
