"""The fidelity judge: crops, the `other` class, and that its verdicts separate real
anomalies from noise and from normal images (on the bundled demo data)."""
from __future__ import annotations

import pytest
import torch

from apo_fast.eval.judge import (
    five_crops,
    judge_metrics,
    mask_crops,
    not_the_product,
    right_kind_by_kind,
    train_judge,
)


def test_mask_crops_centre_on_the_mask_and_stay_inside():
    images = torch.arange(2 * 3 * 10 * 12, dtype=torch.float32).view(2, 3, 10, 12)
    masks = torch.zeros(2, 1, 10, 12)
    masks[0, 0, 1:3, 9:11] = 1  # near the top-right corner: the crop is clamped inside
    crops = mask_crops(images, masks, 4)
    assert crops.shape == (2, 3, 4, 4)
    torch.testing.assert_close(crops[0], images[0, :, 0:4, 8:12], rtol=0, atol=0)
    torch.testing.assert_close(crops[1], images[1, :, 3:7, 4:8], rtol=0, atol=0)  # empty mask: the centre
    with pytest.raises(ValueError, match="larger than the images"):
        mask_crops(images, masks, 11)
    fc = five_crops(images, 4)
    assert fc.shape == (10, 3, 4, 4)
    torch.testing.assert_close(fc[4], images[0, :, 3:7, 4:8], rtol=0, atol=0)
    torch.testing.assert_close(fc[3], images[0, :, 6:10, 8:12], rtol=0, atol=0)


def test_not_the_product_changes_every_crop():
    g = torch.Generator().manual_seed(0)
    good = torch.rand(30, 3, 8, 8, generator=g) * 0.2 - 0.5
    other = not_the_product(good, g)
    assert other.shape == good.shape and other.abs().max() <= 1
    assert ((other - good).abs().mean(dim=(1, 2, 3)) > 0.1).all()


@pytest.fixture(scope="module")
def brick():
    from apo_fast.demo import demo_config
    from apo_fast.eval.eval_data import held_out_defects, load_eval_data

    data = load_eval_data(demo_config(None, ["data.image_size=32"]))
    held = data.test_labels == 1
    judge = train_judge(data.test_images[held], data.test_masks[held], held_out_defects(data),
                        data.test_images[~held], data.defects, steps=150, seed=0)
    return data, judge, mask_crops(data.test_images[held], data.test_masks[held], judge.crop)


def test_the_judge_tells_real_anomalies_from_noise_and_from_normals(brick):
    data, judge, real = brick
    assert judge.classes == ["other", "good", "crack", "hole", "stain"] and judge.crop == 16
    assert judge.val_accuracy["mean"] >= 0.8, judge.val_accuracy
    # the training third (never seen by the judge) is mostly the right kind and the product
    ok = judge_metrics(judge, data.train_anomalies, data.train_masks, data.train_defects, real, kid_subsets=5)
    assert ok["judge_right_kind"] >= 0.7 and ok["judge_product"] >= 0.9, ok
    n = len(data.train_defects)
    noise = (torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 0.5).clamp(-1, 1)
    bad = judge_metrics(judge, noise, data.train_masks, data.train_defects, real, kid_subsets=5)
    assert bad["judge_product"] <= 0.2 and bad["judge_right_kind"] <= 0.2, bad
    assert bad["judge_kid"] > ok["judge_kid"]
    normals = judge_metrics(judge, data.normal_train[:n], data.train_masks, data.train_defects, real, kid_subsets=5)
    assert normals["judge_defect"] <= 0.3 and normals["judge_product"] >= 0.9, normals


def test_right_kind_by_kind_splits_the_overall_rate(brick):
    """Per kind: the rows' share the judge calls that kind, with what it called them; weighted by
    rows, the rates give judge_right_kind back, and a kind's rows called otherwise show up."""
    data, judge, real = brick
    n = len(data.train_defects)
    # half the training anomalies, half normal images under the same masks: the normals' rows miss
    images = torch.cat([data.train_anomalies[: n // 2], data.normal_train[n // 2 : n]])
    predicted = judge.kinds(images, data.train_masks)
    per = right_kind_by_kind(judge, predicted, data.train_defects)
    overall = judge_metrics(judge, images, data.train_masks, data.train_defects)["judge_right_kind"]
    # the predictions given once give the same metrics as computed inside
    assert judge_metrics(judge, images, data.train_masks, data.train_defects, predicted=predicted) == \
        judge_metrics(judge, images, data.train_masks, data.train_defects)
    assert set(per) == set(data.train_defects)
    assert sum(v["n"] for v in per.values()) == n
    for kind, v in per.items():
        assert sum(v["called"].values()) == v["n"] == data.train_defects.count(kind)
        assert v["right"] == v["called"].get(kind, 0) and v["rate"] == v["right"] / v["n"]
    assert sum(v["rate"] * v["n"] for v in per.values()) / n == pytest.approx(overall)
    assert any(set(v["called"]) - {k} for k, v in per.items())  # some rows were called something else
    with pytest.raises(ValueError, match="one entry per image"):
        right_kind_by_kind(judge, predicted, data.train_defects[:-1])


def test_judge_input_errors_are_named():
    g = torch.Generator().manual_seed(0)
    imgs, masks = torch.rand(4, 3, 16, 16, generator=g), torch.ones(4, 1, 16, 16)
    with pytest.raises(ValueError, match="no real images of the defect kind"):
        train_judge(imgs, masks, ["a"] * 4, imgs, ["a", "b"], steps=1)
    with pytest.raises(ValueError, match="one entry per image"):
        train_judge(imgs, masks, ["a"] * 3, imgs, ["a"], steps=1)
    with pytest.raises(ValueError, match="at least 2 good"):
        train_judge(imgs, masks, ["a"] * 4, imgs[:1], ["a"], steps=1)
    judge = train_judge(imgs, masks, ["a"] * 4, imgs, ["a"], steps=1)
    with pytest.raises(ValueError, match="one entry per image"):
        judge_metrics(judge, imgs, masks, ["a"] * 3)


def test_kind_sheet_shows_every_generated_source_by_mode(tmp_path, monkeypatch):
    """An ablation's variant name (not 'apo' or 'lora') is still a generated source: its guided
    and free anomalies of each kind get rows (they were silently left out)."""
    import types

    import apo_fast.sampling.images as images
    from apo_fast.eval.judging import save_kind_sheet

    seen = {}
    monkeypatch.setattr(images, "save_grid", lambda rows, path, **kwargs: seen.update(rows))
    img = torch.zeros(4, 3, 8, 8)
    data = types.SimpleNamespace(test_labels=torch.tensor([1, 1, 0, 0]), test_images=img, test_masks=img[:, :1],
                                 test_paths=["x/hole/0.png", "x/stain/0.png", "g/0.png", "g/1.png"],
                                 defects=["hole", "stain"])
    syn = types.SimpleNamespace(images=img, masks=img[:, :1], defects=["hole", "hole", "stain", "stain"],
                                modes=["guided", "free", "guided", "free"])
    cut = types.SimpleNamespace(images=img[:2], masks=img[:2, :1], defects=["any", "any"], modes=["cutpaste"] * 2)
    save_kind_sheet(tmp_path / "k.png", data, {"lmask6": syn, "cutpaste": cut})
    assert {"hole: lmask6 guided", "hole: lmask6 free", "stain: lmask6 guided", "stain: lmask6 free",
            "hole: real", "stain: real", "hole: cutpaste", "stain: cutpaste"} == set(seen)
