"""Decoding images and masks (8-bit RGB, binary masks), with clear errors for corrupt files.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MASK_THRESHOLD = 127


class DatasetError(ValueError):
    """Bad or unreadable anomaly data; the message names the file or folder."""


class MissingDataError(DatasetError, FileNotFoundError):
    """A required file or folder of the dataset does not exist."""


# --------------------------------------------------------------------------- decoding

def check_image_size(size) -> tuple[int, int] | None:
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


def read_image_uint8(path: Path, size) -> np.ndarray:
    hw = check_image_size(size)
    im = _to_8bit(_decode(path)).convert("RGB")
    if hw is not None and (im.height, im.width) != hw:
        im = im.resize((hw[1], hw[0]), Image.Resampling.BILINEAR)
    return np.array(im, dtype=np.uint8)  # (H, W, 3), a writable copy


def read_mask_bool(path: Path, size) -> np.ndarray:
    hw = check_image_size(size)
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
    arr = read_image_uint8(Path(path), size)
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(127.5).sub_(1.0).contiguous()


def load_mask(path: str | Path, size=None) -> torch.Tensor:
    """Read a defect mask as float32 (1, H, W) in {0, 1}: gray value > 127 is defect,
    resized with nearest neighbour. Same ``size`` and errors as :func:`load_image`."""
    return torch.from_numpy(read_mask_bool(Path(path), size)).float().unsqueeze(0)


