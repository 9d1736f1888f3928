"""Where a free anomaly goes, for a policy with a mask input (``adapter.mask_input``).

A free sample of such a policy needs a mask to draw its defect into. The run keeps the
masks of its training anomalies per condition (``adapters/mask_bank.safetensors``, written
with the adapters); a free sample draws one of its kind's masks and moves it by the
symmetries its training augmentation used (``flip``: horizontal flips; ``dihedral``: the 8
square symmetries, plus a random circular shift, since a texture has no fixed place). The
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
        shifts = torch.randint(max(h, w), (num, 2), generator=generator).tolist()
        out = []
        for i, v, (dy, dx) in zip(pick, variants, shifts):
            m = augment_pair(bank[i], bank[i], v)[1] if h == w else bank[i]
            if self.augment == "dihedral":
                m = torch.roll(m, shifts=(dy % h, dx % w), dims=(-2, -1))
            out.append(m)
        return torch.stack(out).float()


def save_mask_bank(path: str | Path, masks: torch.Tensor, cond_ids: torch.Tensor, names: list[str],
                   augment: str) -> Path:
    """Write the training masks (N, 1, H, W) of conditions ``cond_ids`` (N,) as a mask bank
    (atomically; uint8)."""
    from safetensors.torch import save_file

    if masks.dim() != 4 or masks.shape[1] != 1 or cond_ids.shape != (masks.shape[0],):
        raise ValueError(f"masks must be (N, 1, H, W) with cond_ids (N,), got {tuple(masks.shape)} and "
                         f"{tuple(cond_ids.shape)}")
    tensors = {}
    for cid in sorted(set(cond_ids.tolist())):
        tensors[names[cid]] = (masks[cond_ids == cid] > 0.5).to(torch.uint8).contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"augment": augment, "names": json.dumps(sorted(tensors))})
    tmp.replace(path)
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
