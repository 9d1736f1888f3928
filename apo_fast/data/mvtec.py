"""The MVTec AD folder layout: scanning a category, the few-shot split, condition names.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from PIL import Image, UnidentifiedImageError

from apo_fast.data.images import IMAGE_EXTENSIONS, DatasetError, MissingDataError

GOOD = "good"


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
    return Path(__file__).resolve().parent.parent / "assets" / "demo_mvtec"


def resolve_data_root(root: str) -> Path:
    """``data.root`` as a folder: ``builtin:demo`` is :func:`demo_root`."""
    if root == "builtin:demo":
        return demo_root()
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"data.root {root!r} is not a folder")
    return path


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


