"""Augmentation: dihedral / flip variants of an image and its mask, chosen per category.
"""
from __future__ import annotations

import torch

# Number of distinct augmentation variants per mode (see augment_pair).
AUGMENT_VARIANTS = {"none": 1, "flip": 2, "dihedral": 8}
# Categories without a canonical orientation (MVTec textures and the demo
# textures): all flips and 90 degree rotations keep them realistic.
TEXTURE_CATEGORIES = frozenset({"carpet", "grid", "leather", "tile", "wood", "brick", "gravel"})
# MVTec AD objects: centred, with an up and a down (horizontal flips only).
OBJECT_CATEGORIES = frozenset({"bottle", "cable", "capsule", "hazelnut", "metal_nut", "pill", "screw",
                               "toothbrush", "transistor", "zipper"})
# A stationary texture's mean over many images is nearly flat; a centred object's is not.
TEXTURE_CONTRAST_RATIO = 0.35
# --------------------------------------------------------------------------- augmentation

def augment_mode(augment) -> str:
    if augment is False or augment is None:
        return "none"
    if augment is True:
        return "flip"
    if isinstance(augment, str) and augment in AUGMENT_VARIANTS:
        return augment
    raise ValueError(f"augment must be a bool or one of {sorted(AUGMENT_VARIANTS)}, got {augment!r}")


def default_augment(category: str) -> str:
    """``"dihedral"`` for texture categories (:data:`TEXTURE_CATEGORIES`), else ``"flip"``."""
    return "dihedral" if category in TEXTURE_CATEGORIES else "flip"


def looks_like_texture(images: torch.Tensor) -> tuple[bool, float]:
    """Whether normal images (N, C, H, W) of an unknown category look like a texture, and the
    measure: the spatial contrast (std over pixels) of their mean image divided by the mean
    contrast of the single images. A stationary texture averages out to a flat image (ratio
    near 0); a centred object keeps its outline in the mean (ratio near 1). Texture below
    :data:`TEXTURE_CONTRAST_RATIO`; fewer than 4 images are too few to tell (object)."""
    if images.dim() != 4 or images.shape[0] < 4:
        return False, float("nan")
    x = images.float().mean(1, keepdim=True)  # gray
    x = torch.nn.functional.adaptive_avg_pool2d(x, (min(16, x.shape[-2]), min(16, x.shape[-1])))
    single = x.flatten(1).std(1).mean().item()
    mean_image = x.mean(0).flatten().std().item()
    ratio = mean_image / max(single, 1e-8)
    return ratio < TEXTURE_CONTRAST_RATIO, ratio


def category_augment(category: str, normals: torch.Tensor | None = None, log=None) -> str:
    """The augmentation for ``category``: from the built-in lists, or for a category they do not
    name, from the normal images (:func:`looks_like_texture`), with a log line saying which
    was chosen and why (``log``: a logger; ``data.augment`` in the config overrides it)."""
    if category in TEXTURE_CATEGORIES:
        return "dihedral"
    if category in OBJECT_CATEGORIES or normals is None:
        return "flip"
    texture, ratio = looks_like_texture(normals)
    mode = "dihedral" if texture else "flip"
    if log is not None:
        log.info(
            "category %r is not in the built-in lists: its %d normal images look like %s (mean-image contrast "
            "%.2f of the single images', texture below %.2f), so %s augmentation is used; set data.augment to "
            "none or true (flips) to choose", category, normals.shape[0], "a texture" if texture else "an object",
            ratio, TEXTURE_CONTRAST_RATIO, "dihedral (flips and 90-degree rotations)" if texture else "flip")
    return mode


def augment_pair(image: torch.Tensor, mask: torch.Tensor, variant: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply one of the 8 square symmetries to an image and its mask together.

    Args:
        image: (C, H, W); mask: (1, H, W) (same H, W).
        variant: int in [0, 8): bit 0 = horizontal flip, bit 1 = vertical flip,
            bit 2 = transpose (with the flips this gives the 90 degree rotations;
            needs H == W). Variant 0 is the identity, 1 is the plain horizontal flip.
    """
    if not 0 <= int(variant) < 8:
        raise ValueError(f"variant must be in [0, 8), got {variant}")
    variant = int(variant)
    if variant & 1:
        image, mask = image.flip(-1), mask.flip(-1)
    if variant & 2:
        image, mask = image.flip(-2), mask.flip(-2)
    if variant & 4:
        if image.shape[-1] != image.shape[-2]:
            raise ValueError(f"transpose variants need square images, got {tuple(image.shape[-2:])}")
        image, mask = image.transpose(-1, -2), mask.transpose(-1, -2)
    return image.contiguous(), mask.contiguous()


