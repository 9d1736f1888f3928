"""Timestep gates of the time-gated adapters (APO_SPEC "TACA").

A gate maps each sample's diffusion timestep to a vector over the adapter's
rank, ``k(t) in [0, 1]^r``, that multiplies the low-rank features::

    y = W x + (alpha / r) * B diag(k(t)) A x

Kinds (``GateConfig.kind``):

* ``"rank_prefix"`` (default, the paper's gate): the first ``n(t)`` rank
  dimensions are on, the rest off, with
  ``n(t) = floor(r_min + (r_max - r_min) * (T - t) / T)``: ``r_max`` dims at
  ``t = 0`` (low noise, fine detail), ``r_min`` at ``t = T`` (high noise).
* ``"constant"``: all ones; the adapter is exactly a plain (peft) LoRA.
* ``"sigmoid"``: a smooth prefix,
  ``k_j(t) = sigmoid((n_c(t) - j - 0.5) / temperature)`` with the continuous
  ``n_c(t) = r_min + (r_max - r_min) * (T - t) / T``. ``temperature`` is the
  width of the soft edge in rank dimensions: dimension ``j`` is half on where
  ``n_c(t) = j + 0.5``; within one dimension of that point the gate moves from
  ``sigmoid(-1 / temperature)`` to ``sigmoid(1 / temperature)`` (0.27..0.73 at
  1.0, 0.12..0.88 at 0.5). As ``temperature -> 0`` it becomes a hard prefix of
  ``round(n_c(t))`` dims (the ``rank_prefix`` gate rounds down instead).
* ``"learned"``: ``k(t) = sigmoid(prior(t) + MLP(emb(t)))`` where ``emb`` is a
  sinusoidal timestep embedding, ``MLP`` is Linear-SiLU-Linear and ``prior``
  are the fixed logits of the ``sigmoid`` gate. The MLP's last layer starts at
  zero, so the learned gate starts exactly at the sigmoid gate (near the
  rank-prefix default) and learns a per-timestep correction.

Timesteps outside ``[0, T]`` are clamped into it (no device sync to check them).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from apo_fast.config.adapter import GATE_KINDS, GateConfig

__all__ = [
    "GATE_KINDS",
    "GateConfig",
    "TimestepGate",
    "ConstantGate",
    "RankPrefixGate",
    "SigmoidGate",
    "LearnedGate",
    "build_gate",
    "rank_prefix_lengths",
    "timestep_embedding",
]



def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _timesteps_as_float(timesteps: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    if not isinstance(timesteps, torch.Tensor):
        raise TypeError(f"timesteps must be a torch.Tensor, got {type(timesteps).__name__}")
    if timesteps.dim() != 1:
        raise ValueError(f"timesteps must be (S,), got shape {tuple(timesteps.shape)}")
    if timesteps.dtype == torch.bool or timesteps.is_complex():
        raise TypeError(f"timesteps must be integer or floating point, got dtype {timesteps.dtype}")
    return timesteps.to(torch.float64).clamp(0, num_train_timesteps)


def _continuous_prefix(timesteps, r_min, r_max, num_train_timesteps) -> torch.Tensor:
    """``n_c(t) = r_min + (r_max - r_min) (T - t) / T`` in float64, shape (S,)."""
    t = _timesteps_as_float(timesteps, num_train_timesteps)
    return r_min + (r_max - r_min) * (num_train_timesteps - t) / num_train_timesteps


def rank_prefix_lengths(
    timesteps: torch.Tensor, r_min: int, r_max: int, num_train_timesteps: int
) -> torch.Tensor:
    """Active rank dims of the rank-prefix gate, ``n(t)``, as int64 of shape (S,).

    ``n(t) = floor(r_min + (r_max - r_min) * (T - t) / T)``; exact for integer
    timesteps (integer arithmetic), float64 for fractional ones.
    """
    if not (_is_int(r_min) and _is_int(r_max) and 1 <= r_min <= r_max):
        raise ValueError(f"need ints 1 <= r_min <= r_max, got r_min={r_min!r}, r_max={r_max!r}")
    if not _is_int(num_train_timesteps) or num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be an int >= 1, got {num_train_timesteps!r}")
    if isinstance(timesteps, torch.Tensor) and not timesteps.is_floating_point() and timesteps.dtype != torch.bool:
        if timesteps.dim() != 1:
            raise ValueError(f"timesteps must be (S,), got shape {tuple(timesteps.shape)}")
        t = timesteps.to(torch.int64).clamp(0, num_train_timesteps)
        steps = (r_max - r_min) * (num_train_timesteps - t)
        return r_min + torch.div(steps, num_train_timesteps, rounding_mode="floor")
    n = _continuous_prefix(timesteps, r_min, r_max, num_train_timesteps)
    return torch.floor(n).to(torch.int64)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[sin(t f_k), cos(t f_k)]`` of shape (S, dim), float32.

    ``f_k = max_period ** (-k / (dim / 2))`` for ``k < dim / 2`` (the DDPM/
    Transformer embedding).
    """
    if dim % 2:
        raise ValueError(f"dim must be even, got {dim}")
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    angles = timesteps.to(torch.float32)[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


class TimestepGate(nn.Module):
    """Base class: ``forward(timesteps (S,), rank) -> (S, rank)`` gate values in [0, 1].

    ``is_constant`` gates are all ones; callers may skip them entirely (plain
    LoRA). Gates are computed in float32 (or the learned gate's parameter
    dtype), outside autocast.
    """

    is_constant = False

    def __init__(self, config: GateConfig) -> None:
        super().__init__()
        if not isinstance(config, GateConfig):
            raise TypeError(f"config must be a GateConfig, got {type(config).__name__}")
        self.config = config

    def extra_repr(self) -> str:
        return f"kind={self.config.kind!r}"


class ConstantGate(TimestepGate):
    """All ones: the adapter is a plain LoRA."""

    is_constant = True

    def forward(self, timesteps: torch.Tensor, rank: int) -> torch.Tensor:
        self.config.rank_range(rank)
        t = _timesteps_as_float(timesteps, self.config.num_train_timesteps)
        return torch.ones(t.shape[0], rank, dtype=torch.float32, device=t.device)


class RankPrefixGate(TimestepGate):
    """``k_j(t) = 1 if j < n(t) else 0`` (the paper's default gate)."""

    def forward(self, timesteps: torch.Tensor, rank: int) -> torch.Tensor:
        r_min, r_max = self.config.rank_range(rank)
        n = rank_prefix_lengths(timesteps, r_min, r_max, self.config.num_train_timesteps)
        j = torch.arange(rank, device=n.device)
        return (j[None, :] < n[:, None]).to(torch.float32)


def _sigmoid_prefix_logits(timesteps, rank, r_min, r_max, num_train_timesteps, temperature):
    n_c = _continuous_prefix(timesteps, r_min, r_max, num_train_timesteps)
    j = torch.arange(rank, dtype=torch.float64, device=n_c.device)
    return ((n_c[:, None] - j[None, :] - 0.5) / temperature).to(torch.float32)


class SigmoidGate(TimestepGate):
    """Smooth prefix ``sigmoid((n_c(t) - j - 0.5) / temperature)``."""

    def forward(self, timesteps: torch.Tensor, rank: int) -> torch.Tensor:
        r_min, r_max = self.config.rank_range(rank)
        cfg = self.config
        return torch.sigmoid(
            _sigmoid_prefix_logits(timesteps, rank, r_min, r_max, cfg.num_train_timesteps, cfg.temperature)
        )


class LearnedGate(TimestepGate):
    """``sigmoid(prior(t) + MLP(emb(t)))``; starts equal to the sigmoid gate.

    ``max_rank`` is the largest adapter rank served; an adapter of rank
    ``r <= max_rank`` uses the first ``r`` MLP outputs.
    """

    def __init__(self, config: GateConfig, max_rank: int) -> None:
        super().__init__(config)
        if not _is_int(max_rank) or max_rank < 1:
            raise ValueError(f"max_rank must be an int >= 1, got {max_rank!r}")
        self.max_rank = max_rank
        self.mlp = nn.Sequential(
            nn.Linear(config.embedding_dim, config.hidden_size),
            nn.SiLU(),
            nn.Linear(config.hidden_size, max_rank),
        )
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, timesteps: torch.Tensor, rank: int) -> torch.Tensor:
        if rank > self.max_rank:
            raise ValueError(f"rank {rank} exceeds the learned gate's max_rank {self.max_rank}")
        r_min, r_max = self.config.rank_range(rank)
        cfg = self.config
        prior = _sigmoid_prefix_logits(timesteps, rank, r_min, r_max, cfg.num_train_timesteps, cfg.temperature)
        weight = self.mlp[0].weight
        emb = timestep_embedding(timesteps.to(weight.device), cfg.embedding_dim).to(weight.dtype)
        residual = self.mlp(emb)[:, :rank]
        return torch.sigmoid(prior.to(residual.dtype) + residual)

    def extra_repr(self) -> str:
        return f"kind='learned', max_rank={self.max_rank}"


def build_gate(config: GateConfig, max_rank: int) -> TimestepGate:
    """The gate module for ``config``; ``max_rank`` sizes the learned gate's MLP."""
    if not isinstance(config, GateConfig):
        raise TypeError(f"config must be a GateConfig, got {type(config).__name__}")
    config.rank_range(max_rank)
    if config.kind == "constant":
        return ConstantGate(config)
    if config.kind == "rank_prefix":
        return RankPrefixGate(config)
    if config.kind == "sigmoid":
        return SigmoidGate(config)
    return LearnedGate(config, max_rank)
