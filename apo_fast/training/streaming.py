"""The training data as the loop reads it: tensors encoded once, the seeded sample stream,
batch augmentation and the noised inputs.

Every draw depends only on ``(seed, position)``, so a resumed run reads exactly what an
uninterrupted one would (see :mod:``apo_fast.training.trainer``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from apo_fast.config import APOConfig
from apo_fast.data import resolve_data_root
from apo_fast.models import (
    encode_images,
)

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- data


@dataclass
class TrainData:
    """Everything the loop samples from, as in-memory tensors (few-shot data is small)."""

    condition_names: list[str]
    anomalies: torch.Tensor  # (N, C, H, W) model space (pixels in [-1, 1] or VAE latents)
    anomaly_masks: torch.Tensor  # (N, 1, h, w) image-resolution masks in {0, 1}
    anomaly_conds: torch.Tensor  # (N,) int64 condition ids
    normals: torch.Tensor  # (M, C, H, W)
    normal_cond: int  # the id of "<category>/good"
    anomaly_images: torch.Tensor  # (N, 3, H, W) pixels, for plots
    normal_images: torch.Tensor


def load_train_data(cfg: APOConfig, vae=None, device: torch.device | None = None) -> TrainData:
    """Scan the dataset, load the few-shot training split, and cache VAE latents once."""
    from apo_fast.data import AnomalyDataset, NormalDataset, condition_names, scan_mvtec

    root = resolve_data_root(cfg.data.root)
    index = scan_mvtec(root, cfg.data.category, cfg.data.defect_types, cfg.data.shots)
    names = condition_names(index)
    anomaly_ds = AnomalyDataset(index, cfg.data.image_size, split="train")
    normal_ds = NormalDataset(index, cfg.data.image_size, split="train")
    if len(anomaly_ds) == 0:
        raise ValueError(f"dataset {root}/{cfg.data.category}: no anomalous training images after the few-shot split")
    if len(normal_ds) == 0:
        raise ValueError(f"dataset {root}/{cfg.data.category}: train/good has no images")
    a_items = [anomaly_ds[i] for i in range(len(anomaly_ds))]
    n_items = [normal_ds[i] for i in range(len(normal_ds))]
    a_img = torch.stack([it["image"] for it in a_items])
    n_img = torch.stack([it["image"] for it in n_items])
    masks = torch.stack([it["mask"] for it in a_items]).float()
    conds = torch.tensor([int(it["cond"]) for it in a_items], dtype=torch.int64)
    normal_cond = names.index(f"{cfg.data.category}/good")
    a_model, n_model = a_img, n_img
    if vae is not None:
        log.info("encoding %d images to VAE latents once (cached for the whole run)", len(a_img) + len(n_img))
        vae.to(device or "cpu")
        a_model, n_model = encode_images(vae, a_img), encode_images(vae, n_img)
        vae.to("cpu")  # latents are cached: the VAE stays off the GPU during training
    return TrainData(names, a_model, masks, conds, n_model, normal_cond, a_img, n_img)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def stream_indices(n: int, seed: int, start: int, count: int) -> torch.Tensor:
    """Items ``start .. start+count`` of the endless stream of per-epoch permutations of ``range(n)``."""
    out = []
    pos = start
    while len(out) < count:
        epoch, offset = divmod(pos, n)
        perm = epoch_permutation(n, seed, epoch)
        take = min(n - offset, count - len(out))
        out.extend(perm[offset : offset + take].tolist())
        pos += take
    return torch.tensor(out, dtype=torch.int64)


def augment(x: torch.Tensor, mask: torch.Tensor | None, g: torch.Generator, mode: str):
    """Random symmetries (``flip`` or ``dihedral``, see :func:`apo_fast.data.augment_pair`)
    drawn from ``g``, applied alike to each image and its mask."""
    from apo_fast.data import AUGMENT_VARIANTS, augment_pair

    variants = torch.randint(AUGMENT_VARIANTS[mode], (x.shape[0],), generator=g).tolist()
    m = mask if mask is not None else torch.zeros_like(x[:, :1])
    pairs = [augment_pair(x[i], m[i], v) for i, v in enumerate(variants)]
    x = torch.stack([p[0] for p in pairs])
    return x, (torch.stack([p[1] for p in pairs]) if mask is not None else None)


def noisy_inputs(x0, noise, t, alphas_cumprod, prediction_type):
    """z_t and the regression target for ``prediction_type`` (float32 math)."""
    a = alphas_cumprod[t].to(torch.float32).view(-1, *([1] * (x0.dim() - 1)))
    z = a.sqrt() * x0 + (1 - a).sqrt() * noise
    if prediction_type == "epsilon":
        return z, noise
    return z, a.sqrt() * noise - (1 - a).sqrt() * x0  # v-prediction


