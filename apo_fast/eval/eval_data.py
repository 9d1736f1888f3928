"""The real images of a category, split for the evaluation: detector training normals, the
few-shot training anomalies (the only masks guidance may use), and the held-out test set.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from apo_fast.config import APOConfig
from apo_fast.config.choices import GUIDE_NORMALS

log = logging.getLogger(__name__)



# --------------------------------------------------------------------------- data


@dataclass
class EvalData:
    """The real images of one category, split for the evaluation.

    Shapes: images (N,3,H,W) in [-1, 1], masks (N,1,H,W) in {0, 1}; every
    ``*_paths`` list matches its tensor row by row.
    """

    category: str
    defects: list[str]
    normal_train: torch.Tensor  # train/good: the segmenter's normals
    normal_train_paths: list[str]
    train_anomalies: torch.Tensor  # the few-shot third: IC cluster centres, KID reference, guide masks
    train_masks: torch.Tensor
    train_defects: list[str]
    train_anomaly_paths: list[str]
    train_mask_paths: list[str]
    guide_normals: torch.Tensor  # normal images the mask-guided generation paints into
    guide_normal_paths: list[str]
    test_images: torch.Tensor  # held-out anomalies, then good test images
    test_masks: torch.Tensor
    test_labels: torch.Tensor  # (T,) 1 anomalous, 0 good
    test_paths: list[str]
    test_mask_paths: list[str]  # masks of the held-out anomalies

    def summary(self) -> dict:
        n_anomalous = int(self.test_labels.sum())
        return {
            "category": self.category, "defects": self.defects, "image_size": list(self.normal_train.shape[-2:]),
            "normal_train": len(self.normal_train_paths), "train_anomalies": len(self.train_anomaly_paths),
            "guide_normals": len(self.guide_normal_paths), "test_anomalous": n_anomalous,
            "test_good": len(self.test_paths) - n_anomalous,
        }


def load_eval_data(cfg: APOConfig, guide_normals: str = "train") -> EvalData:
    """Scan ``cfg.data`` and split it for the evaluation (see the module docstring).

    Args:
        cfg: the run's config (its ``data`` section names the dataset and split).
        guide_normals: ``"train"`` or ``"test_split"``.

    Raises:
        ValueError: bad ``guide_normals``, no held-out anomalies, or too few
            ``test/good`` images for ``test_split``.
    """
    from apo_fast.data import (
        AnomalyDataset,
        NormalDataset,
        resolve_data_root,
        scan_mvtec,
    )

    if guide_normals not in GUIDE_NORMALS:
        raise ValueError(f"guide_normals must be 'train' or 'test_split', got {guide_normals!r}")
    d = cfg.data
    index = scan_mvtec(resolve_data_root(d.root), d.category, d.defect_types, d.shots)
    size = d.image_size

    def stack(ds, key):
        return torch.stack([ds[(i, 0)][key] for i in range(len(ds))]) if len(ds) else torch.zeros(0, 3, size, size)

    def mask_of(path: str) -> str:
        for defect in index.defects.values():
            if Path(path) in defect.masks:
                return str(defect.masks[Path(path)])
        raise KeyError(path)

    normals = NormalDataset(index, size, split="train")
    train = AnomalyDataset(index, size, split="train")
    held = AnomalyDataset(index, size, split="heldout")
    good = NormalDataset(index, size, split="test")
    if len(held) == 0:
        raise ValueError(
            f"{d.category}: no held-out anomalies to test on (data.shots={d.shots!r} leaves none); "
            "the downstream test needs the few-shot split's held-out images"
        )
    good_images, good_paths = stack(good, "image"), list(good.paths)
    if guide_normals == "train":
        guides, guide_paths = stack(normals, "image"), list(normals.paths)
    else:
        if len(good) < 2:
            raise ValueError(f"guide_normals 'test_split' needs at least 2 test/good images, found {len(good)}")
        half = len(good) // 2
        guides, guide_paths = good_images[:half], good_paths[:half]
        good_images, good_paths = good_images[half:], good_paths[half:]
    held_images = stack(held, "image")
    return EvalData(
        category=d.category,
        defects=list(index.defects),
        normal_train=stack(normals, "image"),
        normal_train_paths=list(normals.paths),
        train_anomalies=stack(train, "image"),
        train_masks=stack(train, "mask"),
        train_defects=list(train.defects),
        train_anomaly_paths=list(train.paths),
        train_mask_paths=[mask_of(p) for p in train.paths],
        guide_normals=guides,
        guide_normal_paths=guide_paths,
        test_images=torch.cat([held_images, good_images]),
        test_masks=torch.cat([stack(held, "mask"), torch.zeros(len(good_paths), 1, size, size)]),
        test_labels=torch.tensor([1] * len(held) + [0] * len(good_paths), dtype=torch.int64),
        test_paths=list(held.paths) + good_paths,
        test_mask_paths=[mask_of(p) for p in held.paths],
    )




def held_out_defects(data: EvalData) -> list[str]:
    """The defect kind of each held-out anomaly (its folder name), in ``test_images`` order."""
    n = int(data.test_labels.sum())
    return [Path(p).parent.name for p in data.test_paths[:n]]


