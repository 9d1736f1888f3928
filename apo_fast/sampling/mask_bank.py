"""Where a free anomaly goes, for a policy with a mask input (``adapter.mask_input``).

A free sample of such a policy needs a mask to draw its defect into. The run keeps the
masks of its training anomalies per condition (``adapters/mask_bank.safetensors``, written
with the adapters); a free sample draws one of its kind's masks and moves it by the
symmetries its training augmentation used (``flip``: horizontal flips; ``dihedral``: the 8
square symmetries, plus a random shift that keeps the mask whole inside the image, since a
texture has no fixed place). The
drawn mask is the free sample's mask, as a user's mask is a guided sample's.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = ["MASK_BANK_NAME", "MaskBank", "save_mask_bank", "load_mask_bank"]

MASK_BANK_NAME = "mask_bank.safetensors"


class MaskBank:
    """Training masks per condition name: ``masks[name]`` (N, 1, H, W) float {0, 1}.

    Attributes:
        augment: ``"none"`` | ``"flip"`` | ``"dihedral"``, the run's augmentation.
    """

    def __init__(self, masks: dict[str, torch.Tensor], augment: str) -> None:
        from apo_fast.data import AUGMENT_VARIANTS

        if augment not in AUGMENT_VARIANTS:
            raise ValueError(f"augment must be one of {sorted(AUGMENT_VARIANTS)}, got {augment!r}")
        for name, m in masks.items():
            if m.dim() != 4 or m.shape[1] != 1 or m.shape[0] == 0:
                raise ValueError(f"mask bank entry {name!r} must be (N>0, 1, H, W), got {tuple(m.shape)}")
        self.masks = masks
        self.augment = augment

    def draw(self, name: str, num: int, generator: torch.Generator) -> torch.Tensor:
        """``num`` masks (num, 1, H, W) for condition ``name``, each a random training mask of
        that kind under a random symmetry of the run's augmentation."""
        from apo_fast.data import AUGMENT_VARIANTS, augment_pair

        if name not in self.masks:
            raise ValueError(f"the mask bank has no masks for {name!r}; it holds {sorted(self.masks)}")
        bank = self.masks[name]
        pick = torch.randint(bank.shape[0], (num,), generator=generator).tolist()
        variants = torch.randint(AUGMENT_VARIANTS[self.augment], (num,), generator=generator).tolist()
        h, w = bank.shape[-2:]
        places = torch.rand((num, 2), generator=generator).tolist()
        out = []
        for i, v, (fy, fx) in zip(pick, variants, places):
            m = augment_pair(bank[i], bank[i], v)[1] if h == w else bank[i]
            if self.augment == "dihedral":
                m = _move_inside(m, fy, fx)
            out.append(m)
        return torch.stack(out).float()


def _move_inside(mask: torch.Tensor, fy: float, fx: float) -> torch.Tensor:
    """``mask`` (1, H, W) shifted so that its bounding box lands at fraction ``(fy, fx)`` of the
    room it has inside the image (never wrapped across a border)."""
    rows = mask[0].amax(1).nonzero().flatten()
    cols = mask[0].amax(0).nonzero().flatten()
    if rows.numel() == 0:
        return mask
    h, w = mask.shape[-2:]
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
    dy = int(fy * (h - (y1 - y0))) - y0  # new top in [0, h - height]
    dx = int(fx * (w - (x1 - x0))) - x0
    return torch.roll(mask, shifts=(dy, dx), dims=(-2, -1))


def save_mask_bank(path: str | Path, masks: torch.Tensor, cond_ids: torch.Tensor, names: list[str],
                   augment: str) -> Path:
    """Write the training masks (N, 1, H, W) of conditions ``cond_ids`` (N,) as a mask bank
    (atomically; uint8)."""
    from safetensors.torch import save_file

    from apo_fast.io_utils import atomic_save

    if masks.dim() != 4 or masks.shape[1] != 1 or cond_ids.shape != (masks.shape[0],):
        raise ValueError(f"masks must be (N, 1, H, W) with cond_ids (N,), got {tuple(masks.shape)} and "
                         f"{tuple(cond_ids.shape)}")
    tensors = {}
    for cid in sorted(set(cond_ids.tolist())):
        tensors[names[cid]] = (masks[cond_ids == cid] > 0.5).to(torch.uint8).contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"augment": augment, "names": json.dumps(sorted(tensors))}
    atomic_save(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return path


def load_mask_bank(path: str | Path) -> MaskBank:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a run with adapter.mask_input keeps its training masks there "
                                "for free samples (train it again, or sample mask-guided only)")
    with safe_open(str(path), "pt") as fh:
        augment = (fh.metadata() or {}).get("augment", "none")
        masks = {k: fh.get_tensor(k).float() for k in fh.keys()}
    return MaskBank(masks, augment)
