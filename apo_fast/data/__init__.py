"""Few-shot anomaly data in the MVTec AD folder layout.

Layout read (per category)::

    <root>/<category>/train/good/*.png               normal training images
    <root>/<category>/test/good/*.png                normal test images (optional folder)
    <root>/<category>/test/<defect>/*.png            anomalous images, one folder per defect type
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png   their binary masks

Rules (documented choices):

* Image files: extensions in :data:`IMAGE_EXTENSIONS` (case-insensitive); other
  files and hidden files (``.DS_Store``) are ignored. A folder that exists but
  holds no image is an error.
* Order: file names in natural order (``2.png`` before ``10.png``; identical to
  plain name order for MVTec's zero-padded ``000.png`` names).
* Few-shot split (``shots="third"``): for each defect type the first
  ``n // 3`` images (at least 1) train, the other ``n - n // 3`` are held out.
  The held-out set is exactly the one AnomalyDiffusion and DualAnoDiff
  evaluate on (``files[n // 3:]``). Their training readers differ by one image
  (AnomalyDiffusion reads ``files[:n // 3 + 1]``, overlapping the held-out set
  by one; DualAnoDiff reads ``files[:n // 3]``, plus one when ``(n // 3) % 3``);
  we keep train and held-out disjoint. ``shots=k`` takes the first ``k``.
* Masks: converted to 8-bit gray; a pixel is defect iff its value is > 127
  (:data:`MASK_THRESHOLD`; 16-bit masks are scaled to 8 bits first). A mask
  must have its image's size.
* Images: converted to RGB (grayscale repeated over 3 channels, alpha dropped,
  16-bit scaled to 8 bits), resized with PIL bilinear (antialiased when
  shrinking), returned as float32 (3, H, W) in [-1, 1]. Masks are resized with
  nearest neighbour and returned as float32 (1, H, W) in {0, 1}.

Problems raise :class:`DatasetError` (a ``ValueError``) or
:class:`MissingDataError` (also a ``FileNotFoundError``) naming the file or
folder, before any training starts.
"""

from apo_fast.data.augment import (
    AUGMENT_VARIANTS,
    OBJECT_CATEGORIES,
    TEXTURE_CATEGORIES,
    augment_pair,
    category_augment,
    default_augment,
    looks_like_texture,
)
from apo_fast.data.datasets import (
    AnomalyDataset,
    NormalDataset,
    RandomAugmentSampler,
    paired_batches,
)
from apo_fast.data.images import (
    IMAGE_EXTENSIONS,
    MASK_THRESHOLD,
    DatasetError,
    MissingDataError,
    load_image,
    load_mask,
)
from apo_fast.data.mvtec import (
    GOOD,
    DefectIndex,
    MVTecIndex,
    condition_id,
    condition_names,
    demo_root,
    few_shot_split,
    resolve_data_root,
    scan_mvtec,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "MASK_THRESHOLD",
    "AUGMENT_VARIANTS",
    "TEXTURE_CATEGORIES",
    "OBJECT_CATEGORIES",
    "GOOD",
    "DatasetError",
    "MissingDataError",
    "DefectIndex",
    "MVTecIndex",
    "demo_root",
    "resolve_data_root",
    "scan_mvtec",
    "few_shot_split",
    "condition_names",
    "condition_id",
    "load_image",
    "load_mask",
    "augment_pair",
    "category_augment",
    "default_augment",
    "looks_like_texture",
    "AnomalyDataset",
    "NormalDataset",
    "RandomAugmentSampler",
    "paired_batches",
]
