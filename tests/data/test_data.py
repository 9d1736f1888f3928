"""Data layer: the MVTec-layout loader on the bundled demo data and on broken
datasets built in tmp_path, the few-shot split, augmentation, paired batches,
and the demo-data script reproducing the committed files."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apo_fast.data import (
    AnomalyDataset,
    DatasetError,
    MissingDataError,
    NormalDataset,
    RandomAugmentSampler,
    augment_pair,
    condition_id,
    condition_names,
    default_augment,
    demo_root,
    few_shot_split,
    load_image,
    load_mask,
    paired_batches,
    scan_mvtec,
)

DEMO = demo_root()


# --------------------------------------------------------------------------- helpers

def _save(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _make_tree(root: Path, size: int = 8, n_scratch: int = 6, n_dent: int = 3) -> Path:
    """A tiny valid MVTec-layout category 'widget' with defects 'scratch' and 'dent'."""
    rng = np.random.default_rng(0)
    cat = root / "widget"

    def img():
        return rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)

    for i in range(3):
        _save(cat / "train" / "good" / f"{i:03d}.png", img())
    for i in range(2):
        _save(cat / "test" / "good" / f"{i:03d}.png", img())
    for defect, n in (("scratch", n_scratch), ("dent", n_dent)):
        for i in range(n):
            _save(cat / "test" / defect / f"{i:03d}.png", img())
            mask = np.zeros((size, size), dtype=np.uint8)
            mask[1 : 3 + i % 3, 2:5] = 255
            _save(cat / "ground_truth" / defect / f"{i:03d}_mask.png", mask)
    return cat


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    _make_tree(tmp_path)
    return tmp_path


# --------------------------------------------------------------------------- bundled demo data

@pytest.mark.parametrize("category, defects", [("brick", ["crack", "hole", "stain"]), ("gravel", ["hole", "stain"])])
def test_demo_scan_counts_and_split(category, defects):
    index = scan_mvtec(DEMO, category)
    assert index.category == category
    assert len(index.train_good) == 48 and len(index.test_good) == 12
    assert list(index.defects) == defects
    for name, d in index.defects.items():
        assert len(d.train) == 4 and len(d.heldout) == 8  # first third of 12
        assert [p.name for p in d.train] == [f"{i:03d}.png" for i in range(4)]
        assert [p.name for p in d.heldout] == [f"{i:03d}.png" for i in range(4, 12)]
        assert set(d.masks) == set(d.train) | set(d.heldout)
        for img, mask in d.masks.items():
            assert mask == DEMO / category / "ground_truth" / name / f"{img.stem}_mask.png"
    assert condition_names(index) == [f"{category}/good"] + [f"{category}/{d}" for d in defects]


@pytest.mark.parametrize("size", [64, 32, (24, 40)])
def test_demo_datasets_shapes_ranges(size):
    index = scan_mvtec(DEMO, "brick")
    h, w = (size, size) if isinstance(size, int) else size
    names = condition_names(index)
    for split in ("train", "heldout"):
        ds = AnomalyDataset(index, size, split=split)
        assert len(ds) == (4 if split == "train" else 8) * 3
        for i in range(len(ds)):
            item = ds[i]
            assert item["image"].shape == (3, h, w) and item["image"].dtype == torch.float32
            assert item["image"].min() >= -1.0 and item["image"].max() <= 1.0
            assert item["mask"].shape == (1, h, w) and item["mask"].dtype == torch.float32
            assert set(item["mask"].unique().tolist()) == {0.0, 1.0}
            assert item["cond"].dtype == torch.int64 and item["cond"].shape == ()
            assert names[int(item["cond"])] == f"brick/{item['defect']}"
            assert f"/test/{item['defect']}/" in item["path"]
    for split, n in (("train", 48), ("test", 12)):
        ds = NormalDataset(index, size, split=split)
        assert len(ds) == n
        item = ds[n - 1]
        assert item["image"].shape == (3, h, w)
        assert item["mask"].shape == (1, h, w) and not item["mask"].any()
        assert int(item["cond"]) == 0 and item["defect"] == "good"


def test_demo_loader_matches_files_and_masks_mark_the_defect():
    """At the native size the loader returns the file's pixels exactly; inside each mask
    the anomaly image is far from the normal images' colours, outside it is not."""
    index = scan_mvtec(DEMO, "brick")
    ds = AnomalyDataset(index, 64, split="heldout")
    normal = NormalDataset(index, 64, split="train")
    normal_mean = torch.stack([normal[i]["image"] for i in range(len(normal))]).mean(dim=(0, 2, 3))
    for i in range(len(ds)):
        item = ds[i]
        raw = np.asarray(Image.open(item["path"]).convert("RGB"), dtype=np.float32)
        ref = torch.from_numpy(raw).permute(2, 0, 1) / 127.5 - 1.0
        torch.testing.assert_close(item["image"], ref, rtol=0, atol=1e-6)
        m = item["mask"][0].bool()
        assert 0.01 < m.float().mean() < 0.35
        dev = (item["image"] - normal_mean[:, None, None]).abs().amax(dim=0)
        assert dev[m].mean() > 1.5 * dev[~m].mean(), item["path"]


def _build_demo_data():
    """tools/build_demo_data.py (a script outside the package), loaded by path."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "tools" / "build_demo_data.py"
    spec = importlib.util.spec_from_file_location("tools_build_demo_data", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_demo_render_masks_are_exactly_the_changed_pixels():
    pytest.importorskip("skimage")
    demo_data = _build_demo_data()
    MIN_DEFECT_DELTA, render_demo = demo_data.MIN_DEFECT_DELTA, demo_data.render_demo

    samples = render_demo()
    anomalies = [s for s in samples if s.mask_relpath is not None]
    assert len(anomalies) == 12 * 5
    for s in anomalies:
        delta = np.abs(s.image.astype(np.int16) - s.clean.astype(np.int16)).max(axis=-1)
        assert (delta[~s.mask] == 0).all(), s.relpath
        assert (delta[s.mask] >= MIN_DEFECT_DELTA).all(), s.relpath
    for s in samples:
        if s.mask_relpath is None:
            assert not s.mask.any() and (s.image == s.clean).all()


def test_demo_script_reproduces_committed_files(tmp_path):
    """Regenerate into tmp_path and compare every file: decoded pixels for images and
    masks (PNG bytes can differ between zlib builds of Pillow), text for LICENSE.md."""
    pytest.importorskip("skimage")
    main = _build_demo_data().main

    assert main(["--out", str(tmp_path)]) == 0
    committed = sorted(p.relative_to(DEMO) for p in DEMO.rglob("*") if p.is_file())
    regenerated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert committed == regenerated
    assert len(committed) == 241
    assert sum((DEMO / p).stat().st_size for p in committed) < 2_000_000
    for rel in committed:
        if rel.suffix == ".png":
            a, b = Image.open(DEMO / rel), Image.open(tmp_path / rel)
            assert a.mode == b.mode and a.size == b.size, rel
            assert np.array_equal(np.asarray(a), np.asarray(b)), rel
        else:
            assert (DEMO / rel).read_bytes() == (tmp_path / rel).read_bytes(), rel
    # masks are stored as 0/255 gray images
    mask = np.asarray(Image.open(DEMO / "brick/ground_truth/hole/000_mask.png"))
    assert mask.ndim == 2 and set(np.unique(mask).tolist()) == {0, 255}


# --------------------------------------------------------------------------- split rules

def test_few_shot_split_third_and_k():
    for n in range(1, 16):
        paths = [Path(f"{i:03d}.png") for i in range(n)]
        train, held = few_shot_split(paths)
        assert len(train) == max(1, n // 3)
        assert train + held == paths
    paths = [Path(f"{i}.png") for i in range(5)]
    assert few_shot_split(paths, 2) == (paths[:2], paths[2:])
    assert few_shot_split(paths, 5) == (paths, [])
    with pytest.raises(ValueError, match="only 5 images"):
        few_shot_split(paths, 6)
    for bad in (0, -1, "half"):
        with pytest.raises(ValueError, match="shots"):
            few_shot_split(paths, bad)
    for bad in (True, 1.5, None):
        with pytest.raises(TypeError, match="shots"):
            few_shot_split(paths, bad)


def test_scan_order_natural_and_shots(tmp_path):
    _make_tree(tmp_path, n_scratch=0, n_dent=3)
    cat = tmp_path / "widget"
    rng = np.random.default_rng(1)
    for stem in ("10", "2", "1"):
        _save(cat / "test" / "scratch" / f"{stem}.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        _save(cat / "ground_truth" / "scratch" / f"{stem}_mask.png", np.full((8, 8), 255, np.uint8))
    index = scan_mvtec(tmp_path, "widget", shots=2)
    assert [p.name for p in index.defects["scratch"].train] == ["1.png", "2.png"]
    assert [p.name for p in index.defects["scratch"].heldout] == ["10.png"]
    with pytest.raises(ValueError, match="shots=4 but only 3"):
        scan_mvtec(tmp_path, "widget", shots=4)


def test_scan_defect_types_subset_and_errors(tree):
    index = scan_mvtec(tree, "widget", defect_types=["scratch"])
    assert list(index.defects) == ["scratch"]
    assert condition_names(index) == ["widget/good", "widget/scratch"]
    full = scan_mvtec(tree, "widget", defect_types=["scratch", "dent"])
    assert list(full.defects) == ["dent", "scratch"]  # stable sorted order whatever was asked
    assert condition_id(full, "good") == 0 and condition_id(full, "scratch") == 2
    with pytest.raises(ValueError, match="'rust'"):
        condition_id(full, "rust")
    with pytest.raises(MissingDataError, match=r"'rust'.*found: \['dent', 'scratch'\]"):
        scan_mvtec(tree, "widget", defect_types=["rust"])
    with pytest.raises(ValueError, match="not 'good'"):
        scan_mvtec(tree, "widget", defect_types=["good"])
    with pytest.raises(ValueError, match="duplicates"):
        scan_mvtec(tree, "widget", defect_types=["dent", "dent"])
    with pytest.raises(TypeError, match="list of names"):
        scan_mvtec(tree, "widget", defect_types="dent")


# --------------------------------------------------------------------------- bad data

def test_missing_root_and_category(tree):
    with pytest.raises(MissingDataError, match="dataset root not found"):
        scan_mvtec(tree / "nope", "widget")
    with pytest.raises(MissingDataError, match=r"'bottle' not found.*categories found: \['widget'\]") as err:
        scan_mvtec(tree, "bottle")
    assert str(tree / "bottle") in str(err.value)
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, ValueError)
    with pytest.raises(ValueError, match="category"):
        scan_mvtec(tree, "a/b")


def test_missing_train_good(tree):
    folder = tree / "widget" / "train" / "good"
    for p in folder.iterdir():
        p.unlink()
    folder.rmdir()
    with pytest.raises(MissingDataError, match="missing folder") as err:
        scan_mvtec(tree, "widget")
    assert str(folder) in str(err.value)


@pytest.mark.parametrize("folder", ["train/good", "test/good", "test/dent"])
def test_empty_folder_named(tree, folder):
    path = tree / "widget" / folder
    for p in path.iterdir():
        p.unlink()
    (path / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetError, match="empty folder") as err:
        scan_mvtec(tree, "widget")
    assert str(path) in str(err.value)


def test_missing_mask_named(tree):
    image = tree / "widget" / "test" / "scratch" / "004.png"
    mask = tree / "widget" / "ground_truth" / "scratch" / "004_mask.png"
    mask.unlink()
    with pytest.raises(MissingDataError, match="missing mask") as err:
        scan_mvtec(tree, "widget")
    assert str(image) in str(err.value) and str(mask) in str(err.value)


def test_missing_mask_folder_named(tree):
    gt = tree / "widget" / "ground_truth" / "dent"
    for p in gt.iterdir():
        p.unlink()
    gt.rmdir()
    with pytest.raises(MissingDataError, match="missing mask folder") as err:
        scan_mvtec(tree, "widget")
    assert str(gt) in str(err.value)


@pytest.mark.parametrize("where", ["train/good/001.png", "test/dent/002.png", "ground_truth/dent/000_mask.png"])
def test_corrupt_image_named(tree, where):
    path = tree / "widget" / where
    path.write_bytes(b"this is not a png file at all")
    with pytest.raises(DatasetError, match="cannot read image") as err:
        scan_mvtec(tree, "widget")
    assert str(path) in str(err.value)


def test_truncated_image_named_when_decoded(tree):
    path = tree / "widget" / "test" / "scratch" / "000.png"
    rng = np.random.default_rng(3)
    _save(path, rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # header intact, pixel data cut
    index = scan_mvtec(tree, "widget")  # headers are fine
    with pytest.raises(DatasetError, match="cannot read image") as err:
        AnomalyDataset(index, 8, split="train")
    assert str(path) in str(err.value)
    with pytest.raises(DatasetError, match="cannot read image"):
        load_image(path, 8)


def test_mask_size_mismatch_named(tree):
    image = tree / "widget" / "test" / "dent" / "001.png"
    mask = tree / "widget" / "ground_truth" / "dent" / "001_mask.png"
    _save(mask, np.zeros((8, 9), dtype=np.uint8))
    with pytest.raises(DatasetError, match=r"mask size 9x8") as err:
        scan_mvtec(tree, "widget")
    assert str(image) in str(err.value) and str(mask) in str(err.value)


def test_no_defect_types(tmp_path):
    _make_tree(tmp_path, n_scratch=0, n_dent=0)
    with pytest.raises(DatasetError, match="no defect types"):
        scan_mvtec(tmp_path, "widget")


def test_unsupported_files_ignored_and_test_good_optional(tree):
    cat = tree / "widget"
    (cat / "train" / "good" / "readme.txt").write_text("x")
    (cat / "train" / "good" / ".DS_Store").write_bytes(b"\x00\x01")
    Image.new("RGB", (8, 8)).save(cat / "train" / "good" / "003.gif")
    (cat / "ground_truth" / "dent" / "extra_mask.png").write_bytes(b"unused")
    (cat / "LICENSE.txt").write_text("x")
    for p in (cat / "test" / "good").iterdir():
        p.unlink()
    (cat / "test" / "good").rmdir()
    index = scan_mvtec(tree, "widget")
    assert [p.name for p in index.train_good] == ["000.png", "001.png", "002.png"]
    assert index.test_good == []
    empty = NormalDataset(index, 8, split="test")
    assert len(empty) == 0
    with pytest.raises(ValueError, match="normal_ds is empty"):
        next(paired_batches(AnomalyDataset(index, 8), empty, 2, torch.Generator()))


def test_heldout_empty_and_bad_arguments(tree):
    index = scan_mvtec(tree, "widget", shots=3)  # dent has 3 images: none held out
    assert index.defects["dent"].heldout == []
    held = AnomalyDataset(index, 8, split="heldout")
    assert {held[i]["defect"] for i in range(len(held))} == {"scratch"}
    assert len(AnomalyDataset(scan_mvtec(tree, "widget", ["dent"], shots=3), 8, split="heldout")) == 0
    with pytest.raises(ValueError, match="split"):
        AnomalyDataset(index, 8, split="test")
    with pytest.raises(ValueError, match="split"):
        NormalDataset(index, 8, split="heldout")
    for bad in (0, -4, "8", (8,), (8, 0), None, True):
        with pytest.raises(ValueError, match="size"):
            NormalDataset(index, bad)
    with pytest.raises(ValueError, match="augment"):
        NormalDataset(index, 8, augment="rotate")
    with pytest.raises(ValueError, match="square"):
        NormalDataset(index, (8, 6), augment="dihedral")


# --------------------------------------------------------------------------- decoding rules

def test_load_mask_threshold_modes_and_nearest_resize(tmp_path):
    values = np.array([[0, 100, 127, 128], [200, 255, 1, 254]], dtype=np.uint8)
    expected = (values > 127).astype(np.float32)
    gray = _save(tmp_path / "gray_mask.png", values)
    torch.testing.assert_close(load_mask(gray), torch.from_numpy(expected)[None])
    rgb = _save(tmp_path / "rgb_mask.png", np.repeat(values[..., None], 3, axis=-1))
    torch.testing.assert_close(load_mask(rgb), torch.from_numpy(expected)[None])
    wide = tmp_path / "mask16.png"
    Image.fromarray(values.astype(np.uint16) * 257).save(wide)
    torch.testing.assert_close(load_mask(wide), torch.from_numpy(expected)[None])
    # nearest resize of a block pattern is exact and stays binary
    blocks = np.kron(np.array([[1, 0], [0, 1]], dtype=np.uint8) * 255, np.ones((4, 4), np.uint8))
    path = _save(tmp_path / "blocks_mask.png", blocks)
    small = load_mask(path, 2)
    torch.testing.assert_close(small, torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]))
    big = load_mask(path, (16, 12))
    assert big.shape == (1, 16, 12) and set(big.unique().tolist()) == {0.0, 1.0}


def test_load_image_gray_to_rgb_range_and_resize(tmp_path):
    ramp = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1))  # 16x16, values 0..240
    path = _save(tmp_path / "gray.png", ramp)
    x = load_image(path)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    torch.testing.assert_close(x[0], x[1])
    torch.testing.assert_close(x[0], x[2])
    torch.testing.assert_close(x[0], torch.from_numpy(ramp).float() / 127.5 - 1.0)
    flat = _save(tmp_path / "flat.png", np.full((10, 10, 3), (255, 0, 128), dtype=np.uint8))
    y = load_image(flat, (5, 7))
    assert y.shape == (3, 5, 7)
    torch.testing.assert_close(y[:, 2, 3], torch.tensor([1.0, -1.0, 128 / 127.5 - 1.0]))
    rgba = _save(tmp_path / "rgba.png", np.full((4, 4, 4), 200, dtype=np.uint8))
    assert load_image(rgba).shape == (3, 4, 4)
    with pytest.raises(MissingDataError, match="not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="size"):
        load_image(path, 0)


# --------------------------------------------------------------------------- augmentation and batching

def test_augment_pair_eight_distinct_symmetries_applied_together():
    image = torch.arange(3 * 5 * 5, dtype=torch.float32).reshape(3, 5, 5)
    mask = (image[:1] % 7 == 0).float()
    seen = set()
    for v in range(8):
        im, m = augment_pair(image, mask, v)
        assert im.shape == image.shape and m.shape == mask.shape
        torch.testing.assert_close(m, (im[:1] % 7 == 0).float())  # moved with the image
        seen.add(tuple(im.flatten().tolist()))
    assert len(seen) == 8
    torch.testing.assert_close(augment_pair(image, mask, 1)[0], image.flip(-1))
    with pytest.raises(ValueError, match="variant"):
        augment_pair(image, mask, 8)
    with pytest.raises(ValueError, match="square"):
        augment_pair(torch.zeros(3, 4, 6), torch.zeros(1, 4, 6), 4)
    assert default_augment("carpet") == "dihedral" and default_augment("bottle") == "flip"


def test_dataset_augmentation_variants(tree):
    index = scan_mvtec(tree, "widget")
    plain = AnomalyDataset(index, 8)
    flip = AnomalyDataset(index, 8, augment=True)
    dihedral = AnomalyDataset(index, 8, augment="dihedral")
    assert (plain.num_variants, flip.num_variants, dihedral.num_variants) == (1, 2, 8)
    base = plain[2]
    for v in range(8):
        item = dihedral[(2, v)]
        im, m = augment_pair(base["image"], base["mask"], v)
        torch.testing.assert_close(item["image"], im)
        torch.testing.assert_close(item["mask"], m)
    with pytest.raises(ValueError, match="variant"):
        flip[(0, 2)]
    torch.testing.assert_close(plain[0]["image"], plain[(0, 0)]["image"])


def test_random_augment_sampler_deterministic_with_dataloader(tree):
    index = scan_mvtec(tree, "widget")
    ds = AnomalyDataset(index, 8, augment="dihedral")

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        loader = torch.utils.data.DataLoader(ds, batch_size=2, sampler=RandomAugmentSampler(ds, g))
        return [b for b in loader]

    a, b, c = run(1), run(1), run(2)
    assert sum(len(x["path"]) for x in a) == len(ds)
    assert all(torch.equal(x["image"], y["image"]) and x["path"] == y["path"] for x, y in zip(a, b))
    assert not all(torch.equal(x["image"], y["image"]) for x, y in zip(a, c))
    assert a[0]["image"].shape == (2, 3, 8, 8) and a[0]["cond"].shape == (2,)


def test_paired_batches_layout_and_determinism():
    index = scan_mvtec(DEMO, "brick")
    anomalies = AnomalyDataset(index, 32, augment="dihedral")
    normals = NormalDataset(index, 32, augment="dihedral")
    P = 4
    batches = list(paired_batches(anomalies, normals, P, torch.Generator().manual_seed(0), num_batches=3))
    again = list(paired_batches(anomalies, normals, P, torch.Generator().manual_seed(0), num_batches=3))
    assert len(batches) == 3
    for b, b2 in zip(batches, again):
        assert b["image"].shape == (2 * P, 3, 32, 32) and b["mask"].shape == (2 * P, 1, 32, 32)
        assert b["cond"].shape == (2 * P,) and b["cond"].dtype == torch.int64
        assert (b["mask"][:P].flatten(1).amax(1) == 1).all()  # winners: anomalies with masks
        assert not b["mask"][P:].any()  # losers: normal images
        assert torch.equal(b["cond"][P:], b["cond"][:P]) and (b["cond"][:P] > 0).all()
        assert b["defect"][P:] == ["good"] * P and all(d != "good" for d in b["defect"][:P])
        assert all("/train/good/" in p for p in b["path"][P:])
        assert torch.equal(b["image"], b2["image"]) and b["path"] == b2["path"]
    # 3 batches of 4 = one epoch over the 12 training anomalies: each used once
    used = [p for b in batches for p in b["path"][:P]]
    assert sorted(used) == sorted(anomalies.paths)
    with pytest.raises(ValueError, match="image_size"):
        next(paired_batches(anomalies, NormalDataset(index, 16), P, torch.Generator()))
    with pytest.raises(ValueError, match="batch_pairs"):
        next(paired_batches(anomalies, normals, 0, torch.Generator()))
    with pytest.raises(TypeError, match="generator"):
        next(paired_batches(anomalies, normals, 2, 0))


def test_unknown_categories_get_augmentation_from_their_images(caplog):
    """A category the built-in lists do not name: a stationary texture gets dihedral
    augmentation, a centred object flips only, and the log says which and why."""
    import logging

    from apo_fast.data import category_augment, looks_like_texture

    g = torch.Generator().manual_seed(0)
    texture = torch.randn(12, 3, 32, 32, generator=g).clamp(-1, 1)  # stationary noise texture
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    disk = (((yy - 15.5) ** 2 + (xx - 15.5) ** 2) < 100).float() * 2 - 1
    objects = (disk + 0.1 * torch.randn(12, 3, 32, 32, generator=g)).clamp(-1, 1)
    assert looks_like_texture(texture)[0] and not looks_like_texture(objects)[0]
    log = logging.getLogger("test_augment")
    with caplog.at_level(logging.INFO, logger="test_augment"):
        assert category_augment("my_fabric", texture, log) == "dihedral"
        assert category_augment("my_part", objects, log) == "flip"
    said = caplog.text
    assert "'my_fabric' is not in the built-in lists" in said and "dihedral" in said and "an object" in said
    # the built-in lists decide without looking; too few images to tell: an object
    assert category_augment("carpet", objects) == "dihedral" and category_augment("bottle", texture) == "flip"
    assert looks_like_texture(texture[:3]) == (False, pytest.approx(float("nan"), nan_ok=True))
