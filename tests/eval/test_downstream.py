"""CutPaste baseline, the segmentation detector, the downstream comparison and the report."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from apo_fast.eval import report
from apo_fast.eval.cutpaste import cutpaste_anomalies
from apo_fast.eval.detection import DETECTION_METRICS
from apo_fast.eval.downstream import downstream_comparison
from apo_fast.eval.segmentation import (
    DiscriminativeUNet,
    default_smoothing_kernel,
    evaluate_segmenter,
    focal_loss,
    image_scores_from_maps,
    train_segmenter,
)


def stripes(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Toy texture: vertical stripes with a random phase plus noise, in [-1, 1]."""
    xx = torch.arange(size).view(1, 1, 1, size).float()
    phase = torch.rand(n, 1, 1, 1, generator=gen) * 6.28
    img = (0.4 * torch.sin(0.8 * xx + phase)).expand(n, 3, size, size).clone()
    img += 0.1 * torch.randn(n, 3, size, size, generator=gen)
    img[:, 1] -= 0.2
    return img.clamp(-1, 1)


def add_blocks(images: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Clearly visible defects: a flat random-colour rectangle of 4-8 px per image."""
    n, _, h, w = images.shape
    out, masks = images.clone(), torch.zeros(n, 1, h, w)
    for i in range(n):
        bh, bw = (int(torch.randint(4, 9, (), generator=gen)) for _ in range(2))
        y, x = int(torch.randint(0, h - bh, (), generator=gen)), int(torch.randint(0, w - bw, (), generator=gen))
        out[i, :, y:y + bh, x:x + bw] = (torch.rand(3, generator=gen) * 2 - 1)[:, None, None]
        masks[i, 0, y:y + bh, x:x + bw] = 1
    return out, masks


# --------------------------------------------------------------------------- CutPaste


def test_cutpaste_mask_marks_exactly_the_changed_pixels():
    gen = torch.Generator().manual_seed(0)
    normal = torch.rand(1, 3, 24, 20, generator=gen) * 2 - 1
    images, masks = cutpaste_anomalies(normal, 30, torch.Generator().manual_seed(1))
    assert images.shape == (30, 3, 24, 20) and masks.shape == (30, 1, 24, 20)
    assert images.dtype == normal.dtype and images.min() >= -1 and images.max() <= 1
    changed = (images != normal).any(dim=1, keepdim=True)
    assert torch.equal(changed, masks.bool())
    assert set(masks.unique().tolist()) <= {0.0, 1.0} and masks.flatten(1).sum(1).min() > 0


def test_cutpaste_from_other_images_keeps_the_target_outside_the_mask():
    gen = torch.Generator().manual_seed(2)
    normal = torch.rand(5, 3, 16, 16, generator=gen) * 2 - 1
    images, masks = cutpaste_anomalies(normal, 25, torch.Generator().manual_seed(3), same_image_prob=0.0)
    for img, mask in zip(images, masks.bool()):
        same_outside = [j for j in range(5) if torch.equal(img[:, ~mask[0]], normal[j][:, ~mask[0]])]
        assert len(same_outside) == 1  # exactly one target image, untouched outside the mask
        assert torch.equal((img != normal[same_outside[0]]).any(dim=0), mask[0])


def test_cutpaste_patch_masks_are_rectangles_and_draws_are_seeded():
    normal = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    images, masks = cutpaste_anomalies(normal, 10, torch.Generator().manual_seed(5), kinds=("patch",))
    for m in masks[:, 0].bool():
        rows, cols = m.any(dim=1).nonzero().flatten(), m.any(dim=0).nonzero().flatten()
        box = m[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert box.all()  # noise images: every pasted pixel changed
    again = cutpaste_anomalies(normal, 10, torch.Generator().manual_seed(5), kinds=("patch",))
    assert torch.equal(again[0], images) and torch.equal(again[1], masks)
    _, scar = cutpaste_anomalies(normal, 10, torch.Generator().manual_seed(6), kinds=("scar",))
    assert scar.flatten(1).sum(1).max() < 0.2 * 32 * 32  # thin bars


@pytest.mark.parametrize(
    "kwargs,match",
    [({"kinds": ("blob",)}, "kinds"), ({"n": -1}, "n must"), ({"jitter": 1.5}, "jitter")],
)
def test_cutpaste_bad_arguments(kwargs, match):
    normal = torch.zeros(2, 3, 16, 16)
    args = {"n": 2, **kwargs}
    n = args.pop("n")
    with pytest.raises(ValueError, match=match):
        cutpaste_anomalies(normal, n, **args)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        cutpaste_anomalies(normal + 200, 2)


# --------------------------------------------------------------------------- segmenter pieces


def test_unet_shapes_on_odd_sizes():
    net = DiscriminativeUNet(base_channels=4, depth=3)
    assert net(torch.randn(2, 3, 20, 27)).shape == (2, 2, 20, 27)


def test_focal_loss_against_hand_formula():
    logits = torch.randn(2, 2, 3, 5, dtype=torch.float64)
    target = torch.randint(0, 2, (2, 3, 5))
    torch.testing.assert_close(focal_loss(logits, target, gamma=0.0).double(), F.cross_entropy(logits, target))
    p = logits.softmax(dim=1)
    pt = torch.where(target == 1, p[:, 1], p[:, 0])
    want = (-(1 - pt) ** 2 * pt.log()).mean()
    torch.testing.assert_close(focal_loss(logits, target).double(), want, rtol=1e-5, atol=1e-7)


def test_image_score_is_max_of_mean_filtered_map():
    maps = torch.zeros(2, 32, 32)
    maps[0, 10, 10] = 1.0
    maps[1, 4:7, 4:7] = 0.5
    torch.testing.assert_close(image_scores_from_maps(maps, kernel_size=3), torch.tensor([1 / 9, 0.5]))
    assert [default_smoothing_kernel(s, s) for s in (32, 64, 256)] == [3, 5, 21]


class _Oracle(nn.Module):
    """Segmenter that knows the answer: anomalous where channel 0 is 1."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(20.0))

    def forward(self, x):
        hot = (x[:, :1] > 0.99).float()
        return torch.cat([torch.zeros_like(hot), self.scale * (hot - 0.5)], dim=1)


def test_evaluate_segmenter_with_an_oracle_is_perfect():
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(6, 3, 16, 16, generator=gen) * 0.5  # < 0.99 everywhere
    masks = torch.zeros(6, 1, 16, 16)
    masks[3:, 0, 5:9, 6:10] = 1
    images[:, 0][masks[:, 0].bool()] = 1.0
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    out = evaluate_segmenter(_Oracle(), images, masks, labels)
    assert set(out) == set(DETECTION_METRICS)
    assert all(v == pytest.approx(1.0) for v in out.values()), out
    assert evaluate_segmenter(_Oracle(), images, masks) == out  # labels derived from masks
    with pytest.raises(ValueError, match="test_masks must have shape"):
        evaluate_segmenter(_Oracle(), images, masks[:, :, :8])


def test_train_segmenter_validates_before_work():
    normal = torch.zeros(4, 3, 16, 16)
    with pytest.raises(ValueError, match="anomaly_masks is required"):
        train_segmenter(normal, normal, None, steps=1, progress=False)
    with pytest.raises(ValueError, match="anomaly_masks must have shape"):
        train_segmenter(normal, normal, torch.zeros(4, 1, 8, 8), steps=1, progress=False)
    with pytest.raises(ValueError, match="steps"):
        train_segmenter(normal, None, None, steps=0, progress=False)


def test_training_is_seeded_and_leaves_global_rng_alone():
    gen = torch.Generator().manual_seed(0)
    normal = stripes(4, 16, gen)
    anomalies, masks = add_blocks(stripes(4, 16, gen), gen)
    state = torch.get_rng_state()
    kw = dict(steps=3, batch_size=4, seed=7, base_channels=4, depth=2, progress=False, augment=True, dice_weight=0.5)
    a = train_segmenter(normal, anomalies, masks, **kw)
    assert torch.equal(torch.get_rng_state(), state)
    b = train_segmenter(normal, anomalies, masks, **kw)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_downstream_comparison_end_to_end_and_report(tmp_path):
    size = 32
    gen = torch.Generator().manual_seed(0)
    normal_train = stripes(24, size, gen)
    blocks, block_masks = add_blocks(stripes(24, size, gen), gen)
    pasted, pasted_masks = cutpaste_anomalies(normal_train, 24, torch.Generator().manual_seed(1))
    good = stripes(8, size, gen)
    bad, bad_masks = add_blocks(stripes(8, size, gen), gen)
    test_images = torch.cat([good, bad])
    test_masks = torch.cat([torch.zeros(8, 1, size, size), bad_masks])
    test_labels = torch.tensor([0] * 8 + [1] * 8)

    sources = {"none": None, "cutpaste": (pasted, pasted_masks), "blocks": (blocks, block_masks)}
    out = downstream_comparison(
        normal_train, sources, test_images, test_masks, test_labels,
        seeds=[0], steps=60, batch_size=8, segmenter_kwargs={"base_channels": 8, "depth": 2},
    )
    assert list(out["results"]) == list(sources)
    for name, runs in out["results"].items():
        assert len(runs) == 1 and runs[0]["seed"] == 0
        for key in DETECTION_METRICS:
            assert 0.0 <= runs[0][key] <= 1.0, (name, key, runs[0][key])
    assert out["results"]["none"][0]["n_synthetic"] == 0
    blocks_run = out["results"]["blocks"][0]
    assert blocks_run["image_auroc"] > 0.6 and blocks_run["pixel_auroc"] > 0.6, blocks_run

    # a second seed from the same function gives the spread the report shows
    out["results"]["blocks"].append({**blocks_run, "seed": 1, "image_auroc": blocks_run["image_auroc"] - 0.1})
    paths = report.write_report(
        tmp_path / "run", out,
        generation_by_source={"blocks": {"metrics": {"ms_ssim_diversity": 0.5}, "skipped": {"kid": "no weights"}}},
        images_by_source={"none": None, "cutpaste": pasted, "blocks": blocks},
        masks_by_source={"cutpaste": pasted_masks, "blocks": block_masks},
    )
    data = json.loads(paths["json"].read_text())
    assert data["summary"]["blocks"]["image_auroc"]["n"] == 2
    assert data["summary"]["blocks"]["image_auroc"]["std"] == pytest.approx(0.1 / math.sqrt(2))
    md = paths["markdown"].read_text()
    assert all(f"| {name} |" in md for name in sources) and "kid: no weights" in md
    for key in ("metrics_png", "samples_png"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == sorted(p.name for p in paths.values())


def test_downstream_validates_sources_before_training():
    imgs = torch.zeros(4, 3, 16, 16)
    masks = torch.zeros(4, 1, 16, 16)
    with pytest.raises(ValueError, match="non-empty mapping"):
        downstream_comparison(imgs, {}, imgs, masks)
    with pytest.raises(ValueError, match="'bad'"):
        downstream_comparison(imgs, {"bad": (imgs, masks[:, :, :8])}, imgs, masks)
    with pytest.raises(ValueError, match="seeds"):
        downstream_comparison(imgs, {"none": None}, imgs, masks, seeds=[])


# --------------------------------------------------------------------------- report pieces


def test_summarize_mean_std_and_nan():
    runs = {"a": [{"image_auroc": 0.6, "pixel_pro": math.nan}, {"image_auroc": 0.8, "pixel_pro": 0.5}],
            "b": [{"image_auroc": 0.7, "pixel_pro": math.nan}]}
    s = report.summarize(runs)
    assert s["a"]["image_auroc"] == {"mean": pytest.approx(0.7), "std": pytest.approx(math.sqrt(0.02)), "n": 2}
    assert s["a"]["pixel_pro"] == {"mean": 0.5, "std": 0.0, "n": 1}
    assert math.isnan(s["b"]["pixel_pro"]["mean"]) and s["b"]["image_auroc"]["std"] == 0.0
    table = report.markdown_table(s)
    assert "| a | 0.700 ± 0.141 |" in table and "| b | 0.700 | n/a |" in table


def test_json_is_strict_and_writes_are_atomic(tmp_path):
    path = report.write_json(tmp_path / "r.json", {"x": math.nan, "t": torch.tensor([1.5]), "p": tmp_path})
    assert json.loads(path.read_text()) == {"x": None, "t": [1.5], "p": str(tmp_path)}
    with pytest.raises(TypeError, match="cannot write"):
        report.write_json(tmp_path / "bad.json", {"x": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no temp file left behind
