"""The trained module (UNet with adapters + condition embeddings) and the condition file.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from apo_fast.models import (
    ConditionEmbedding,
)

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- model


class APOModel(nn.Module):
    """The UNet (with adapters) and the condition embeddings, as one module for DeepSpeed.

    ``forward(z, t, cond_ids, reference=False)``: z (B, C, H, W), t (B,) int, cond_ids
    (B,) -> noise prediction (B, C, H, W). ``reference=True`` runs the same UNet
    with its adapters disabled (APO's reference), the condition taken without grad.
    """

    def __init__(self, unet: nn.Module, conditions: ConditionEmbedding, pixel_size: int):
        super().__init__()
        self.unet = unet
        self.conditions = conditions
        self.pixel_size = pixel_size

    def forward(self, z, t, cond_ids, reference: bool = False):
        from apo_fast.adapters import adapters_disabled

        cond = self.conditions.unet_kwargs(cond_ids, z.dtype, self.pixel_size, detach=reference)
        if reference:
            with adapters_disabled(self.unet):
                return self.unet(z, t, **cond).sample
        return self.unet(z, t, **cond).sample


def load_conditions(path: Path | None, names: list[str], tokens: int, dim: int, pooled: int | None = None,
                    init: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> ConditionEmbedding:
    """Condition embeddings for ``names``; ``init`` (rows ``(len(names) + 1, tokens, dim)``
    and pooled rows, e.g. CLIP prompt encodings) fills the tables first; then rows found
    by name in ``path`` are copied, and without ``init`` new defect rows start from the
    product's ``good`` row (textual-inversion style init)."""
    from safetensors.torch import load_file

    emb = ConditionEmbedding(len(names), tokens, dim, pooled_dim=pooled)
    if init is not None:
        with torch.no_grad():
            emb.weight.copy_(init[0])
            if emb.pooled is not None:
                emb.pooled.copy_(init[1])
    if path is None:
        return emb
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"condition embeddings file {path} does not exist")
    saved = load_file(str(path))
    good = next((n for n in names if n.endswith("/good")), None)
    tables = [("", emb.weight, (tokens, dim))]
    if emb.pooled is not None:
        tables.append(("pooled/", emb.pooled, (pooled,)))
    with torch.no_grad():
        for prefix, table, shape in tables:
            for row, name in enumerate(["null", *names]):
                src = saved.get(prefix + name)
                if src is None and name != "null" and init is None:
                    src = saved.get(prefix + good) if good else None
                if src is None:
                    continue
                if tuple(src.shape) != shape:
                    raise ValueError(f"{path}: condition {prefix + name!r} has shape {tuple(src.shape)}, expected {shape}")
                table[row].copy_(src)
    return emb


def save_conditions(emb: ConditionEmbedding, names: list[str], path: Path, keep: list[str] | None = None) -> None:
    """Write the condition rows by name (``keep``: only these names and ``null``; a base model
    keeps only the rows it trained, so APO starts each defect row from the ``good`` row)."""
    from safetensors.torch import save_file

    from apo_fast.io_utils import atomic_save

    tensors = {}
    for prefix, table in (("", emb.weight), ("pooled/", emb.pooled)):
        if table is None:
            continue
        for row, name in enumerate(["null", *names]):
            if keep is not None and name != "null" and name not in keep:
                continue
            tensors[prefix + name] = table[row].detach().float().cpu().contiguous()
    saved = [n for n in names if keep is None or n in keep]
    atomic_save(path, lambda tmp: save_file(tensors, str(tmp), metadata={"names": json.dumps(saved)}))


