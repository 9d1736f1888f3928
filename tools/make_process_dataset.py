"""Build a second few-shot anomaly dataset, unlike the bundled demo, in the MVTec AD layout.

    python tools/make_process_dataset.py --out data/process_mvtec [--seed 7] [--size 64]

Two procedural textures (nothing downloaded, nothing pasted): ``plank`` (wood grain
from warped growth rings) and ``weave`` (a woven fabric of two thread colours),
both names unknown to apo-fast's built-in category lists. Defects are made by
simulating a process on the clean image, never by pasting a patch, so CutPaste
gets no free match:

* ``scratch``: a tool drags along a curve: the surface is scraped lighter, with a
  thin shadowed edge on one side;
* ``burn``: heat from a point: the surface chars toward black-brown with a
  scorched halo, strongest at an irregular core;
* ``stain``: a liquid spreads by diffusion and dries with a darker rim (coffee ring),
  tinting what is underneath;
* ``dent`` (plank only): a pressed-in hollow, rendered as a height field: lit on one
  side, shaded on the other, the grain displaced inside it.

A mask holds the pixels the process changed by at least ``MIN_DELTA`` (0-255,
largest channel). Layout per category: ``train/good`` 48, ``test/good`` 12,
``test/<defect>`` 12 each, with ``ground_truth/<defect>/NNN_mask.png``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

MIN_DELTA = 14
COUNTS = {"train/good": 48, "test/good": 12}
DEFECTS_PER_KIND = 12


def _smooth_noise(rng, size: int, cells: int) -> np.ndarray:
    """Value noise in [0, 1]: a cells x cells random grid, bicubic-upsampled."""
    grid = rng.random((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(grid).resize((size, size), Image.BICUBIC), dtype=np.float32)


def plank(rng, size: int) -> np.ndarray:
    """Wood grain: rings of a log seen from the side, warped by smooth noise (float RGB 0-255)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    cx, angle = rng.uniform(-1.5, 2.5), rng.uniform(-0.15, 0.15)
    warp = 0.12 * (_smooth_noise(rng, size, 4) - 0.5) + 0.03 * (_smooth_noise(rng, size, 12) - 0.5)
    d = (x - cx) * np.cos(angle) + (y * 0.15) * np.sin(angle) + warp
    rings = 0.5 + 0.5 * np.sin(2 * np.pi * d * rng.uniform(9, 13))
    rings = rings ** 2.2 + 0.15 * (_smooth_noise(rng, size, 32) - 0.5)
    light, dark = np.array([206, 160, 110]), np.array([122, 78, 44])
    img = dark + (light - dark) * np.clip(rings, 0, 1)[..., None]
    return img * rng.uniform(0.92, 1.06)


def weave(rng, size: int) -> np.ndarray:
    """Woven fabric: over/under threads of two colours, with thread-level irregularity."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    period = rng.uniform(5.5, 6.5)
    oy, ox = rng.uniform(0, 2 * period, 2)  # where the crop starts on the cloth
    u = (x + ox) / period + 0.3 * (_smooth_noise(rng, size, 6) - 0.5)
    v = (y + oy) / period
    over = ((np.floor(u) + np.floor(v)) % 2).astype(np.float32)
    warp_thread = 0.5 + 0.5 * np.cos(2 * np.pi * (u % 1 - 0.5))
    weft_thread = 0.5 + 0.5 * np.cos(2 * np.pi * (v % 1 - 0.5))
    a, b = np.array([52, 84, 138]), np.array([196, 190, 170])
    shade = np.where(over[..., None] > 0, a * (0.65 + 0.35 * warp_thread[..., None]),
                     b * (0.65 + 0.35 * weft_thread[..., None]))
    return shade * (0.9 + 0.2 * _smooth_noise(rng, size, 16))[..., None]


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a 2-D float array (edge padding)."""
    r = max(1, int(np.ceil(3 * sigma)))
    k = np.exp(-(np.arange(-r, r + 1) ** 2) / (2 * sigma**2))
    k /= k.sum()
    a = np.pad(a, r, mode="edge")
    a = np.apply_along_axis(lambda row: np.convolve(row, k, mode="valid"), 1, a)
    return np.apply_along_axis(lambda col: np.convolve(col, k, mode="valid"), 0, a).astype(np.float32)


def _erode(m: np.ndarray) -> np.ndarray:
    """3x3 binary erosion."""
    p = np.pad(m, 1, mode="edge")
    h, w = m.shape
    return np.logical_and.reduce([p[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)])


def _curve(rng, size: int, n: int = 80) -> np.ndarray:
    p0, p2 = rng.uniform(0.1, 0.9, 2) * size, rng.uniform(0.1, 0.9, 2) * size
    while np.linalg.norm(p2 - p0) < 0.35 * size:
        p2 = rng.uniform(0.1, 0.9, 2) * size
    p1 = (p0 + p2) / 2 + rng.normal(0, 0.2 * size, 2)
    s = np.linspace(0, 1, n)[:, None]
    return (1 - s) ** 2 * p0 + 2 * (1 - s) * s * p1 + s**2 * p2


def scratch(img: np.ndarray, rng) -> np.ndarray:
    size = img.shape[0]
    pts = _curve(rng, size)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    d = np.min(np.hypot(x[..., None] - pts[:, 0], y[..., None] - pts[:, 1]), axis=-1)
    width = rng.uniform(0.7, 1.3)
    core = np.exp(-((d / width) ** 2))
    tangent = np.gradient(pts, axis=0)
    normal = np.stack([-tangent[:, 1], tangent[:, 0]], 1)
    idx = np.argmin(np.hypot(x[..., None] - pts[:, 0], y[..., None] - pts[:, 1]), axis=-1)
    side = (x - pts[idx, 0]) * normal[idx, 0] + (y - pts[idx, 1]) * normal[idx, 1]
    shadow = np.exp(-(((d - 1.6 * width) / 0.8) ** 2)) * (side > 0)
    scraped = img + (255 - img) * 0.55 * core[..., None]
    return scraped * (1 - 0.35 * shadow[..., None])


def _blob(rng, size: int, radius: float, rough: float) -> tuple[np.ndarray, tuple[float, float]]:
    """An irregular soft region in [0, 1] (distance field of a noisy circle)."""
    cy, cx = rng.uniform(0.25, 0.75, 2) * size
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    theta = np.arctan2(y - cy, x - cx)
    r = radius * (1 + sum(rough / k * np.sin(k * theta + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5)))
    return np.clip((r - np.hypot(x - cx, y - cy)) / max(radius * 0.35, 1.0), 0, 1), (cy, cx)


def burn(img: np.ndarray, rng) -> np.ndarray:
    size = img.shape[0]
    region, _ = _blob(rng, size, rng.uniform(0.08, 0.16) * size, 0.25)
    halo = _blur(region, 2.5)
    char = np.array([38, 24, 16]) * (0.8 + 0.4 * _smooth_noise(rng, size, 20))[..., None]
    scorched = img * (1 - 0.45 * halo[..., None]) + np.array([60, 30, 0]) * 0.25 * halo[..., None]
    return scorched * (1 - region[..., None]) + char * region[..., None]


def stain(img: np.ndarray, rng) -> np.ndarray:
    size = img.shape[0]
    field, _ = _blob(rng, size, rng.uniform(0.07, 0.12) * size, 0.2)
    for _ in range(int(rng.integers(3, 6))):  # the liquid spreads: diffusion with a noisy threshold
        blurred = _blur(field, 1.5)
        field = np.clip(blurred * 1.9 - 0.3 * _smooth_noise(rng, size, 10), 0, 1)
    wet = field > 0.35
    edge = wet & ~_erode(wet)
    tint = np.array(rng.choice([[0.95, 0.75, 0.35], [0.55, 0.75, 0.45], [0.45, 0.55, 0.95]]))
    out = img.copy()
    out[wet] = out[wet] * (0.4 + 0.6 * tint)
    out[edge] = out[edge] * 0.6
    return out


def dent(img: np.ndarray, rng) -> np.ndarray:
    size = img.shape[0]
    cy, cx = rng.uniform(0.25, 0.75, 2) * size
    sy, sx = rng.uniform(0.05, 0.1, 2) * size
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    h = -np.exp(-(((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2) / 2)  # a hollow
    gy, gx = np.gradient(h)
    light = np.array([-0.7, -0.7])
    shade = 1 + 5.0 * (gx * light[0] + gy * light[1])
    ys = np.clip(np.round(y + 3.0 * gy * size / 8), 0, size - 1).astype(int)
    xs = np.clip(np.round(x + 3.0 * gx * size / 8), 0, size - 1).astype(int)
    return img[ys, xs] * np.clip(shade, 0.4, 1.6)[..., None]


CATEGORIES = {"plank": (plank, {"scratch": scratch, "burn": burn, "stain": stain, "dent": dent}),
              "weave": (weave, {"scratch": scratch, "burn": burn, "stain": stain})}


def _save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def make_dataset(out: str | Path, seed: int = 7, size: int = 64) -> dict[str, int]:
    """Write both categories under ``out``; returns the number of files per category."""
    out = Path(out)
    counts = {}
    for ci, (name, (texture, defects)) in enumerate(CATEGORIES.items()):
        n = 0
        for si, (split, num) in enumerate(COUNTS.items()):
            for i in range(num):
                rng = np.random.default_rng([seed, ci, si, i])
                _save(out / name / split / f"{i:03d}.png", np.clip(texture(rng, size), 0, 255).astype(np.uint8))
                n += 1
        for di, (defect, process) in enumerate(defects.items()):
            i = 0
            attempt = 0
            while i < DEFECTS_PER_KIND:
                rng = np.random.default_rng([seed, ci, 100 + di, attempt])
                attempt += 1
                clean = np.clip(texture(rng, size), 0, 255)
                bad = np.clip(process(clean.copy(), rng), 0, 255)
                clean8, bad8 = clean.astype(np.uint8), bad.astype(np.uint8)
                mask = np.abs(bad8.astype(int) - clean8.astype(int)).max(-1) >= MIN_DELTA
                if mask.sum() < 6:  # the process barely touched the surface: draw again
                    continue
                _save(out / name / "test" / defect / f"{i:03d}.png", bad8)
                _save(out / name / "ground_truth" / defect / f"{i:03d}_mask.png", mask.astype(np.uint8) * 255)
                i += 1
                n += 2
        counts[name] = n
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args(argv)
    counts = make_dataset(args.out, args.seed, args.size)
    print(f"wrote {sum(counts.values())} files under {args.out}: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
