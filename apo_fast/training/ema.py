"""Exponential moving average of trained weights (``train.ema_decay``, ``pretrain.ema_decay``).

:func:`ema_update` is the update both trainers use: ``e <- d e + (1 - d) w`` with the
usual warm start ``d = min(decay, (1 + k) / (10 + k))`` after step ``k`` (from 0), so the
first steps are not averaged with the untrained start.

:class:`ParameterEMA` keeps the average of the parameters an adapter export reads, each
rank over the data it holds: the whole parameter under ZeRO stages 0-2, its partition
(``ds_tensor``) under stage 3, so nothing is gathered to update it. The average is kept
in float32 whatever the parameters' dtype, saved beside every checkpoint (one file per
rank) and written in place of the raw weights for the export
(:meth:`ParameterEMA.applied`).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

__all__ = ["ParameterEMA", "ema_update", "ema_file"]


@torch.no_grad()
def ema_update(ema_params: list[torch.Tensor], params: list[torch.Tensor], step: int, decay: float) -> None:
    """EMA after step ``step`` (from 0) with the warm start: the decay ramps up as (1 + step) / (10 + step)."""
    d = min(decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(ema_params, [p.detach().to(e.dtype) for p, e in zip(params, ema_params)], 1 - d)


def _local(p: nn.Parameter) -> torch.Tensor:
    """The data this rank holds of ``p``: its ZeRO-3 partition, else the parameter itself."""
    return p.ds_tensor.data if hasattr(p, "ds_tensor") else p.data


def ema_file(folder: Path, rank: int) -> Path:
    """Where rank ``rank`` keeps its average in a checkpoint folder."""
    return Path(folder) / f"ema-rank{rank:03d}.safetensors"


class ParameterEMA:
    """The float32 average of ``params`` (what this rank holds of each), decay ``decay`` in (0, 1)."""

    def __init__(self, params: list[nn.Parameter], decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"the EMA decay must be in (0, 1); got {decay}")
        self.params = list(params)
        self.decay = decay
        self.shadow = [_local(p).detach().float().clone() for p in self.params]

    def update(self, step: int) -> None:
        """Average in the weights after step ``step`` (from 0)."""
        ema_update(self.shadow, [_local(p) for p in self.params], step, self.decay)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Inside the block the parameters hold the average (in their own dtype); the
        raw weights are put back bit for bit when it ends, also after an error."""
        raw = [_local(p).detach().clone() for p in self.params]
        try:
            with torch.no_grad():
                for p, e in zip(self.params, self.shadow):
                    _local(p).copy_(e)
            yield
        finally:
            with torch.no_grad():
                for p, r in zip(self.params, raw):
                    _local(p).copy_(r)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{i:05d}": e for i, e in enumerate(self.shadow)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Take a saved average; refuses one of other parameters (count or shapes)."""
        if len(state) != len(self.shadow):
            raise ValueError(f"the saved EMA holds {len(state)} tensors; this model trains {len(self.shadow)}")
        for i, e in enumerate(self.shadow):
            saved = state.get(f"{i:05d}")
            if saved is None or saved.shape != e.shape:
                got = None if saved is None else tuple(saved.shape)
                raise ValueError(f"the saved EMA's tensor {i} has shape {got}; this model's is {tuple(e.shape)}")
            e.copy_(saved)

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path))

    def load(self, path: Path) -> None:
        from safetensors.torch import load_file

        self.load_state_dict(load_file(str(path)))
