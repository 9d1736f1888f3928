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

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "MASK_THRESHOLD",
    "AUGMENT_VARIANTS",
    "TEXTURE_CATEGORIES",
    "DatasetError",
    "MissingDataError",
    "DefectIndex",
    "MVTecIndex",
    "demo_root",
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

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MASK_THRESHOLD = 127
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

GOOD = "good"


class DatasetError(ValueError):
    """Bad or unreadable anomaly data; the message names the file or folder."""


class MissingDataError(DatasetError, FileNotFoundError):
    """A required file or folder of the dataset does not exist."""


@dataclass
class DefectIndex:
    """The images of one defect type of one category.

    Attributes:
        category: product category (``bottle``).
        defect: defect type (``broken_large``).
        train: few-shot training images, in name order.
        heldout: the remaining images of this defect type, in name order.
        masks: image path -> its mask path, for every image in train and heldout.
    """

    category: str
    defect: str
    train: list[Path]
    heldout: list[Path]
    masks: dict[Path, Path] = field(default_factory=dict)


@dataclass
class MVTecIndex:
    """A validated scan of one category (see :func:`scan_mvtec`).

    Attributes:
        root: dataset root (the folder holding the category folders).
        category: category name.
        train_good: normal training images (``train/good``).
        test_good: normal test images (``test/good``; empty if that folder is absent).
        defects: defect type -> :class:`DefectIndex`, in sorted defect order.
    """

    root: Path
    category: str
    train_good: list[Path]
    test_good: list[Path]
    defects: dict[str, DefectIndex]

    def summary(self) -> dict[str, int]:
        """Image counts: ``train_good``, ``test_good``, ``<defect>/train``, ``<defect>/heldout``."""
        out = {"train_good": len(self.train_good), "test_good": len(self.test_good)}
        for name, d in self.defects.items():
            out[f"{name}/train"] = len(d.train)
            out[f"{name}/heldout"] = len(d.heldout)
        return out


def demo_root() -> Path:
    """Root of the bundled demo dataset (categories ``brick`` and ``gravel``)."""
    return Path(__file__).resolve().parent / "assets" / "demo_mvtec"


# --------------------------------------------------------------------------- scanning

def _natural_key(name: str) -> tuple:
    parts = re.split(r"(\d+)", name)
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p.lower()) for p in parts if p), name


def _list_images(folder: Path) -> list[Path]:
    """Image files in ``folder`` (natural name order). Raises if the folder has none."""
    if not folder.is_dir():
        raise MissingDataError(f"missing folder: {folder}")
    files = [
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    ]
    if not files:
        raise DatasetError(
            f"empty folder: {folder} holds no image files (looked for {', '.join(IMAGE_EXTENSIONS)})"
        )
    return sorted(files, key=lambda p: _natural_key(p.name))


def _image_size_of(path: Path) -> tuple[int, int]:
    """(width, height) read from the file header; raises DatasetError naming the file."""
    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from exc


def few_shot_split(paths: Sequence[Path], shots: str | int = "third") -> tuple[list[Path], list[Path]]:
    """Split name-ordered ``paths`` into (train, heldout).

    ``shots="third"``: the first ``max(1, n // 3)`` train (the published few-shot
    protocol, see the module docstring); ``shots=k`` (int >= 1): the first ``k``.
    """
    _check_shots(shots)
    n = len(paths)
    if shots == "third":
        k = max(1, n // 3)
    else:
        if shots > n:
            raise ValueError(f"shots={shots} but only {n} images are available")
        k = shots
    return list(paths[:k]), list(paths[k:])


def _check_shots(shots) -> None:
    if isinstance(shots, str):
        if shots != "third":
            raise ValueError(f"shots must be 'third' or a positive int, got {shots!r}")
    elif isinstance(shots, int) and not isinstance(shots, bool):
        if shots < 1:
            raise ValueError(f"shots must be 'third' or a positive int, got {shots}")
    else:
        raise TypeError(f"shots must be 'third' or an int, got {type(shots).__name__}")


def _find_mask(gt_dir: Path, image: Path) -> Path:
    expected = gt_dir / f"{image.stem}_mask.png"
    if expected.is_file():
        return expected
    for ext in IMAGE_EXTENSIONS:
        alt = gt_dir / f"{image.stem}_mask{ext}"
        if alt.is_file():
            return alt
    raise MissingDataError(f"missing mask for anomaly image {image}: expected {expected}")


def scan_mvtec(
    root: str | Path,
    category: str,
    defect_types: Sequence[str] | None = None,
    shots: str | int = "third",
) -> MVTecIndex:
    """Scan and validate one category of an MVTec-AD-layout dataset.

    Args:
        root: folder holding the category folders.
        category: category folder name.
        defect_types: defect folders under ``test/`` to use (default: all but ``good``).
            Stored in sorted order whatever order is given.
        shots: ``"third"`` (published few-shot split) or an int k (first k per defect).

    Checks every listed image header (readable, mask present and the same size as
    its image). Pixel data is decoded later by the datasets, which report
    truncated files by name.

    Returns:
        :class:`MVTecIndex`.

    Raises:
        MissingDataError: missing root, category, ``train/good``, ``test``, a
            requested defect folder, or a mask.
        DatasetError: empty folder, unreadable image, mask size != image size,
            no defect types.
        ValueError / TypeError: bad ``category``, ``defect_types`` or ``shots``.
    """
    if not isinstance(category, str) or not category or "/" in category or "\\" in category:
        raise ValueError(f"category must be a folder name (non-empty str without '/'), got {category!r}")
    _check_shots(shots)

    root = Path(root)
    if not root.is_dir():
        raise MissingDataError(f"dataset root not found: {root}")
    cat_dir = root / category
    if not cat_dir.is_dir():
        available = sorted(p.name for p in root.iterdir() if (p / "train").is_dir())
        raise MissingDataError(
            f"category {category!r} not found: no folder {cat_dir} (categories found: {available or 'none'})"
        )

    train_good = _list_images(cat_dir / "train" / GOOD)
    for p in train_good:
        _image_size_of(p)
    test_dir = cat_dir / "test"
    if not test_dir.is_dir():
        raise MissingDataError(f"missing folder: {test_dir} (it must hold one folder per defect type)")
    test_good: list[Path] = []
    if (test_dir / GOOD).exists():
        test_good = _list_images(test_dir / GOOD)
        for p in test_good:
            _image_size_of(p)

    available = sorted(p.name for p in test_dir.iterdir() if p.is_dir() and p.name != GOOD
                       and not p.name.startswith("."))
    if defect_types is None:
        names = available
    else:
        if isinstance(defect_types, str):
            raise TypeError(f"defect_types must be a list of names, got the string {defect_types!r}")
        names = list(defect_types)
        for name in names:
            if not isinstance(name, str) or not name or name == GOOD:
                raise ValueError(f"defect_types entries must be defect folder names (not 'good'), got {name!r}")
            if name not in available:
                raise MissingDataError(
                    f"defect type {name!r} not found: no folder {test_dir / name} (found: {available or 'none'})"
                )
        if len(set(names)) != len(names):
            raise ValueError(f"defect_types has duplicates: {names}")
        names = sorted(names)
    if not names:
        raise DatasetError(f"no defect types: {test_dir} has no folder besides 'good'")

    defects: dict[str, DefectIndex] = {}
    for name in names:
        images = _list_images(test_dir / name)
        gt_dir = cat_dir / "ground_truth" / name
        if not gt_dir.is_dir():
            raise MissingDataError(f"missing mask folder {gt_dir} for the images in {test_dir / name}")
        masks: dict[Path, Path] = {}
        for img in images:
            mask = _find_mask(gt_dir, img)
            isize, msize = _image_size_of(img), _image_size_of(mask)
            if isize != msize:
                raise DatasetError(
                    f"mask size {msize[0]}x{msize[1]} of {mask} != image size {isize[0]}x{isize[1]} of {img}"
                )
            masks[img] = mask
        try:
            train, heldout = few_shot_split(images, shots)
        except ValueError as exc:
            raise ValueError(f"{test_dir / name}: {exc}") from exc
        defects[name] = DefectIndex(category, name, train, heldout, masks)
    return MVTecIndex(root, category, train_good, test_good, defects)


def condition_names(index: MVTecIndex) -> list[str]:
    """Condition names ``["<category>/good", "<category>/<defect>", ...]`` (defects sorted).
    A condition's integer id is its position in this list."""
    return [f"{index.category}/{GOOD}"] + [f"{index.category}/{d}" for d in index.defects]


def condition_id(index: MVTecIndex, defect: str) -> int:
    """Id of ``defect`` (or ``"good"``) in :func:`condition_names`."""
    if defect == GOOD:
        return 0
    names = list(index.defects)
    if defect not in names:
        raise ValueError(f"defect {defect!r} is not in this index (has {names})")
    return 1 + names.index(defect)


# --------------------------------------------------------------------------- decoding

def _check_size(size) -> tuple[int, int] | None:
    """size -> (height, width); None keeps the file's size."""
    if size is None:
        return None
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
        raise ValueError(f"size must be a positive int or (height, width) of positive ints, got {size!r}")
    return int(size[0]), int(size[1])


def _decode(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError as exc:
        raise MissingDataError(f"image file not found: {path}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from exc


def _to_8bit(im: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer modes -> 8-bit 'L' (value / 257); others unchanged."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        if arr.max(initial=0.0) <= 1.0:
            arr = arr * 255.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    return im


def _image_uint8(path: Path, size) -> np.ndarray:
    hw = _check_size(size)
    im = _to_8bit(_decode(path)).convert("RGB")
    if hw is not None and (im.height, im.width) != hw:
        im = im.resize((hw[1], hw[0]), Image.Resampling.BILINEAR)
    return np.array(im, dtype=np.uint8)  # (H, W, 3), a writable copy


def _mask_bool(path: Path, size) -> np.ndarray:
    hw = _check_size(size)
    gray = np.asarray(_to_8bit(_decode(path)).convert("L"), dtype=np.uint8)  # alpha is ignored
    binary = Image.fromarray((gray > MASK_THRESHOLD).astype(np.uint8) * 255)
    if hw is not None and (binary.height, binary.width) != hw:
        binary = binary.resize((hw[1], hw[0]), Image.Resampling.NEAREST)
    return np.array(binary, dtype=np.uint8) > MASK_THRESHOLD  # (H, W)


def load_image(path: str | Path, size=None) -> torch.Tensor:
    """Read an image as float32 (3, H, W) in [-1, 1].

    Args:
        path: image file.
        size: int (square), (height, width), or None (keep the file's size).
            Resized with PIL bilinear (antialiased when shrinking).

    Raises:
        MissingDataError / DatasetError naming the file if it is missing or unreadable.
    """
    arr = _image_uint8(Path(path), size)
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(127.5).sub_(1.0).contiguous()


def load_mask(path: str | Path, size=None) -> torch.Tensor:
    """Read a defect mask as float32 (1, H, W) in {0, 1}: gray value > 127 is defect,
    resized with nearest neighbour. Same ``size`` and errors as :func:`load_image`."""
    return torch.from_numpy(_mask_bool(Path(path), size)).float().unsqueeze(0)


# --------------------------------------------------------------------------- augmentation

def _augment_mode(augment) -> str:
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


# --------------------------------------------------------------------------- datasets

def _check_mask_not_empty(mask: Path, image: Path, hw: tuple[int, int]) -> None:
    """An anomaly's mask must mark its defect: refuse an all-black one, warn when the
    defect vanishes at the working resolution (it then counts as defect-free there)."""
    if not _mask_bool(mask, None).any():
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
        hw = _check_size(image_size)
        if hw is None:
            raise ValueError("image_size must be a positive int or (height, width), got None")
        self.image_size = hw
        self.augment = _augment_mode(augment)
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
            self._images[i] = torch.from_numpy(_image_uint8(p, hw)).permute(2, 0, 1)
            if m is not None:
                self._masks[i, 0] = torch.from_numpy(_mask_bool(m, hw))
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
