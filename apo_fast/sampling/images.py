"""Generated images on disk and on screen: uint8 files with their masks, mask overlays, grids.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from apo_fast.sampling.hierarchical import grow_mask


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_images(images: torch.Tensor, masks: torch.Tensor, folder: Path, prefix: str = "") -> list[Path]:
    """Write ``NNNN.png`` and ``NNNN_mask.png`` for each sample."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (img, m) in enumerate(zip(to_uint8(images), masks)):
        p = folder / f"{prefix}{i:04d}.png"
        Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img).save(p)
        Image.fromarray((m[0].numpy() > 0.5).astype(np.uint8) * 255).save(folder / f"{prefix}{i:04d}_mask.png")
        paths.append(p)
    return paths


def overlay(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Images with the mask's outline drawn in red (for grids)."""
    m = masks.float()
    edge = (grow_mask(m, 1) - m).clamp(0, 1)
    out = images.clone()
    if out.shape[1] == 1:
        out = out.repeat(1, 3, 1, 1)
    red = torch.tensor([1.0, -1.0, -1.0]).view(1, 3, 1, 1)
    return out * (1 - edge) + red * edge


def save_grid(rows: dict[str, torch.Tensor], path: Path, scale: int = 3,
              outlines: dict[str, torch.Tensor] | None = None) -> None:
    """A labelled grid: one row per key, each row (N, 3, H, W) in [-1, 1].

    ``outlines[key]`` (N, 1, H, W): masks whose outline is drawn in red around each tile's
    region at the grid's resolution (one screen pixel wide, outside the mask), so a 1-2 px
    defect inside it stays visible; rows without an entry are drawn as they are."""
    from PIL import Image, ImageDraw

    outlines = outlines or {}

    names = list(rows)
    n_cols = max(r.shape[0] for r in rows.values())
    h, w = next(iter(rows.values())).shape[-2:]
    h, w = h * scale, w * scale
    label_w = 8 + 7 * max(len(k) for k in names)
    canvas = Image.new("RGB", (label_w + n_cols * (w + 2), len(names) * (h + 2)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, name in enumerate(names):
        y = r * (h + 2)
        draw.text((4, y + h // 2 - 6), name, fill="black")
        images = rows[name]
        if name in outlines:
            big = F.interpolate(images.float(), size=(h, w), mode="nearest")
            masks = F.interpolate(outlines[name].float(), size=(h, w), mode="nearest")
            images = overlay(big, masks)
        for c, img in enumerate(to_uint8(images)):
            tile = Image.fromarray(img).resize((w, h), Image.NEAREST)
            canvas.paste(tile, (label_w + c * (w + 2), y))
    from apo_fast.io_utils import atomic_save

    atomic_save(path, lambda tmp: canvas.save(tmp, format="PNG"))
