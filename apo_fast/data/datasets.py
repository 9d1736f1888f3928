"""Datasets of decoded images (cached as uint8), the augmentation sampler and paired batches.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterator

import torch

from apo_fast.data.augment import AUGMENT_VARIANTS, augment_mode, augment_pair
from apo_fast.data.images import (
    MASK_THRESHOLD,
    DatasetError,
    check_image_size,
    read_image_uint8,
    read_mask_bool,
)
from apo_fast.data.mvtec import GOOD, MVTecIndex, condition_id

# --------------------------------------------------------------------------- datasets

def _check_mask_not_empty(mask: Path, image: Path, hw: tuple[int, int]) -> None:
    """An anomaly's mask must mark its defect: refuse an all-black one, warn when the
    defect vanishes at the working resolution (it then counts as defect-free there)."""
    if not read_mask_bool(mask, None).any():
        raise DatasetError(
            f"mask {mask} of anomaly image {image} is empty (no pixel > {MASK_THRESHOLD}); expected the defect "
            "region in white. Fix the mask, or move the image out of the defect folder"
        )
    warnings.warn(
        f"the defect in {mask} is smaller than one pixel at {hw[0]}x{hw[1]} and vanishes there; "
        "a larger data.image_size keeps it", stacklevel=3,
    )


class _CachedImages(torch.utils.data.Dataset):
    """Decodes every image (and mask) once at construction and keeps uint8 tensors."""

    def __init__(self, paths: list[Path], masks: list[Path | None], conds: list[int], defects: list[str],
                 image_size, augment, what: str):
        hw = check_image_size(image_size)
        if hw is None:
            raise ValueError("image_size must be a positive int or (height, width), got None")
        self.image_size = hw
        self.augment = augment_mode(augment)
        if self.augment == "dihedral" and hw[0] != hw[1]:
            raise ValueError(f"augment='dihedral' needs a square image_size, got {hw}")
        self.what = what
        self.paths = [str(p) for p in paths]
        self.defects = defects
        self.cond = torch.tensor(conds, dtype=torch.int64)
        # uint8 (N, 3, H, W) and bool (N, 1, H, W); N may be 0 (e.g. no test/good folder)
        self._images = torch.zeros((len(paths), 3, *hw), dtype=torch.uint8)
        self._masks = torch.zeros((len(paths), 1, *hw), dtype=torch.bool)
        for i, (p, m) in enumerate(zip(paths, masks)):
            self._images[i] = torch.from_numpy(read_image_uint8(p, hw)).permute(2, 0, 1)
            if m is not None:
                self._masks[i, 0] = torch.from_numpy(read_mask_bool(m, hw))
                if not self._masks[i].any():
                    _check_mask_not_empty(Path(m), Path(p), hw)

    @property
    def num_variants(self) -> int:
        return AUGMENT_VARIANTS[self.augment]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key):
        """``ds[i]`` (random augmentation variant from torch's global generator, which
        DataLoader workers seed from the loader's generator) or ``ds[(i, variant)]``."""
        if isinstance(key, tuple):
            i, variant = key
        else:
            i = key
            variant = int(torch.randint(self.num_variants, ())) if self.num_variants > 1 else 0
        if not 0 <= variant < self.num_variants:
            raise ValueError(f"variant {variant} out of range for augment={self.augment!r}")
        image = self._images[i].float().div_(127.5).sub_(1.0)
        mask = self._masks[i].float()
        if variant:
            image, mask = augment_pair(image, mask, variant)
        return {"image": image, "mask": mask, "cond": self.cond[i].clone(),
                "defect": self.defects[i], "path": self.paths[i]}


class AnomalyDataset(_CachedImages):
    """Anomalous images with masks of one category, all defect types together.

    Args:
        index: from :func:`scan_mvtec`.
        image_size: int or (height, width).
        split: ``"train"`` (few-shot images) or ``"heldout"``.
        augment: False / ``"none"``, True / ``"flip"`` (horizontal flip), or
            ``"dihedral"`` (flips and 90 degree rotations, for textures).

    Items (dict): ``image`` float32 (3, H, W) in [-1, 1]; ``mask`` float32 (1, H, W)
    in {0, 1}; ``cond`` int64 scalar, id into :func:`condition_names`; ``defect`` str;
    ``path`` str. Everything is decoded once, at construction (errors name the file).
    A split with no images gives an empty dataset (``len(ds) == 0``).
    """

    def __init__(self, index: MVTecIndex, image_size, split: str = "train", augment=False):
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        paths, masks, conds, defects = [], [], [], []
        for name, d in index.defects.items():
            for p in (d.train if split == "train" else d.heldout):
                paths.append(p)
                masks.append(d.masks[p])
                conds.append(condition_id(index, name))
                defects.append(name)
        super().__init__(paths, masks, conds, defects, image_size, augment,
                         what=f"split {split!r} of the anomalies of {index.category!r}")
        self.split = split


class NormalDataset(_CachedImages):
    """Normal (defect-free) images of one category: the negatives of the paired loss.

    Args:
        index: from :func:`scan_mvtec`.
        image_size: int or (height, width).
        split: ``"train"`` (``train/good``) or ``"test"`` (``test/good``).
        augment: as for :class:`AnomalyDataset`.

    Items: as :class:`AnomalyDataset`, with an all-zero ``mask``, ``cond`` the id of
    ``<category>/good`` (0) and ``defect`` ``"good"``. Empty (``len(ds) == 0``) for
    ``split="test"`` when the category has no ``test/good`` folder.
    """

    def __init__(self, index: MVTecIndex, image_size, split: str = "train", augment=False):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        paths = index.train_good if split == "train" else index.test_good
        n = len(paths)
        super().__init__(list(paths), [None] * n, [0] * n, [GOOD] * n, image_size, augment,
                         what=f"split {split!r} of the normal images of {index.category!r}")
        self.split = split


class RandomAugmentSampler(torch.utils.data.Sampler):
    """Yields ``(index, variant)`` keys: a random permutation per epoch and a random
    augmentation variant per item, both drawn from ``generator`` (so a seeded
    generator fixes the whole stream, whatever the number of DataLoader workers).

    Use as ``DataLoader(ds, batch_size=..., sampler=RandomAugmentSampler(ds, g))``.
    """

    def __init__(self, dataset: _CachedImages, generator: torch.Generator | None = None):
        self.dataset = dataset
        self.generator = generator

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        n = len(self.dataset)
        order = torch.randperm(n, generator=self.generator)
        variants = torch.randint(self.dataset.num_variants, (n,), generator=self.generator)
        for i, v in zip(order.tolist(), variants.tolist()):
            yield i, v


def _stream(n: int, generator: torch.Generator) -> Iterator[int]:
    """Endless index stream: one fresh random permutation of range(n) after another."""
    while True:
        yield from torch.randperm(n, generator=generator).tolist()


def paired_batches(
    anomaly_ds: AnomalyDataset,
    normal_ds: NormalDataset,
    batch_pairs: int,
    generator: torch.Generator,
    num_batches: int | None = None,
) -> Iterator[dict]:
    """Batches for the paired (Diffusion-DPO form) loss: anomalies (winners) first,
    normal images of the same product (losers) second.

    Each dataset is walked in fresh random permutations (every anomaly is used
    equally often); augmentation variants come from ``generator`` too.

    Args:
        anomaly_ds, normal_ds: same ``image_size``.
        batch_pairs: P, pairs per batch.
        generator: the only randomness used.
        num_batches: stop after this many batches (None: endless).

    Yields:
        dict with ``image`` (2P, 3, H, W), ``mask`` (2P, 1, H, W) (losers all zero),
        ``cond`` (2P,) int64, where loser ``i`` gets winner ``i``'s condition (the pair
        is compared under the same condition), ``defect`` and ``path`` (lists of 2P
        str; losers' defect is ``"good"``).
    """
    if not isinstance(batch_pairs, int) or isinstance(batch_pairs, bool) or batch_pairs < 1:
        raise ValueError(f"batch_pairs must be a positive int, got {batch_pairs!r}")
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 0):
        raise ValueError(f"num_batches must be None or a non-negative int, got {num_batches!r}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if anomaly_ds.image_size != normal_ds.image_size:
        raise ValueError(
            f"anomaly_ds.image_size {anomaly_ds.image_size} != normal_ds.image_size {normal_ds.image_size}"
        )
    for name, ds in (("anomaly_ds", anomaly_ds), ("normal_ds", normal_ds)):
        if len(ds) == 0:
            raise ValueError(f"{name} is empty ({ds.what})")
    wins, losses = _stream(len(anomaly_ds), generator), _stream(len(normal_ds), generator)
    made = 0
    while num_batches is None or made < num_batches:
        w_idx = [next(wins) for _ in range(batch_pairs)]
        l_idx = [next(losses) for _ in range(batch_pairs)]
        w_var = torch.randint(anomaly_ds.num_variants, (batch_pairs,), generator=generator).tolist()
        l_var = torch.randint(normal_ds.num_variants, (batch_pairs,), generator=generator).tolist()
        items = [anomaly_ds[(i, v)] for i, v in zip(w_idx, w_var)]
        items += [normal_ds[(i, v)] for i, v in zip(l_idx, l_var)]
        cond = torch.stack([it["cond"] for it in items[:batch_pairs]])
        yield {
            "image": torch.stack([it["image"] for it in items]),
            "mask": torch.stack([it["mask"] for it in items]),
            "cond": torch.cat([cond, cond]),
            "defect": [it["defect"] for it in items],
            "path": [it["path"] for it in items],
        }
        made += 1
