"""Condition embeddings (one learned row per (product, defect type)) and the UNet's condition kwargs.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)


class ConditionEmbedding(nn.Module):
    """A learned embedding per condition (product/defect type), used as ``encoder_hidden_states``.

    Row 0 is the null condition (classifier-free guidance); condition ``i`` of
    :func:`apo_fast.data.condition_names` is row ``i + 1``. For SDXL-style UNets
    (``addition_embed_type="text_time"``) each condition also has a learned pooled
    vector (``text_embeds``); see :func:`pooled_dim`.

    Args:
        num_conditions: number of named conditions.
        tokens: tokens per condition (the sequence length the UNet cross-attends to).
        dim: the UNet's ``cross_attention_dim``.
        pooled_dim: size of the pooled vector, or None (SD 1.x/2.x, small UNets).

    ``forward(ids)``: ids (B,) int64 with -1 meaning null -> (tokens (B, tokens, dim), pooled or None).
    """

    def __init__(self, num_conditions: int, tokens: int, dim: int, pooled_dim: int | None = None, init_std: float = 1.0):
        super().__init__()
        if num_conditions < 1:
            raise ValueError(f"num_conditions must be >= 1, got {num_conditions}")
        self.num_conditions, self.tokens, self.dim = num_conditions, tokens, dim
        self.weight = nn.Parameter(torch.randn(num_conditions + 1, tokens, dim) * init_std)
        self.pooled = nn.Parameter(torch.zeros(num_conditions + 1, pooled_dim)) if pooled_dim else None
        with torch.no_grad():
            self.weight[0].zero_()

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype not in (torch.int32, torch.int64) or ids.dim() != 1:
            raise TypeError(f"condition ids must be a 1-D integer tensor, got {ids.dtype} of shape {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= self.num_conditions):
            raise ValueError(f"condition ids must be in [-1, {self.num_conditions}); got {ids.tolist()}")
        return ids.long() + 1

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ids (B,) -> (token embeddings (B, tokens, dim), pooled vectors (B, pooled_dim) or None).

        The tables are read only here, so ZeRO-3's module hooks gather them."""
        rows = self._rows(ids)
        return self.weight[rows], (self.pooled[rows] if self.pooled is not None else None)

    def unet_kwargs(self, ids: torch.Tensor, dtype: torch.dtype, pixel_size: int, detach: bool = False) -> dict:
        """The condition part of a UNet call for ids (B,) (-1 = null): ``encoder_hidden_states``
        and, for SDXL-style UNets, ``added_cond_kwargs`` (pooled vector and the
        size/crop ``time_ids`` of an uncropped ``pixel_size`` square image)."""
        enc, pooled = self(ids)
        kwargs = {"encoder_hidden_states": (enc.detach() if detach else enc).to(dtype)}
        if pooled is not None:
            s = float(pixel_size)
            time_ids = torch.tensor([s, s, 0.0, 0.0, s, s], device=enc.device, dtype=dtype).expand(ids.shape[0], -1)
            kwargs["added_cond_kwargs"] = {"text_embeds": (pooled.detach() if detach else pooled).to(dtype), "time_ids": time_ids}
        return kwargs


def pooled_dim(unet) -> int | None:
    """Size of the pooled condition vector an SDXL-style UNet expects (``text_embeds``), else None."""
    cfg = unet.config
    if getattr(cfg, "addition_embed_type", None) != "text_time":
        return None
    return int(cfg.projection_class_embeddings_input_dim) - 6 * int(cfg.addition_time_embed_dim)


def cat_unet_kwargs(a: dict, b: dict) -> dict:
    """Two condition kwargs (:meth:`ConditionEmbedding.unet_kwargs`) batched together."""
    out = {"encoder_hidden_states": torch.cat([a["encoder_hidden_states"], b["encoder_hidden_states"]])}
    if "added_cond_kwargs" in a:
        out["added_cond_kwargs"] = {k: torch.cat([a["added_cond_kwargs"][k], b["added_cond_kwargs"][k]]) for k in a["added_cond_kwargs"]}
    return out


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


