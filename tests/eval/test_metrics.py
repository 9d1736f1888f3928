"""Evaluation metrics against hand-computed cases and independent plain references."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from apo_fast.eval import metrics, pretrained
from apo_fast.eval import sample_quality as gen_metrics
from apo_fast.eval.metrics import (
    MissingWeightsError,
    UndefinedMetricError,
    auroc,
    average_precision,
    binary_clf_curve,
    f1_max,
    image_metrics,
    inception_score,
    intra_cluster_diversity,
    kid,
    ms_ssim,
    pixel_metrics,
    pro_curve,
    pro_score,
    ssim,
)
from apo_fast.eval.similarity import default_scales

# --------------------------------------------------------------------------- plain references


def ref_auroc(scores, labels):
    """Mann-Whitney by counting all (positive, negative) pairs; ties count 1/2."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def ref_precision_recall(scores, labels):
    """(precision, recall) at every distinct threshold, highest first, by direct counting."""
    out = []
    n_pos = sum(labels)
    for t in sorted(set(scores), reverse=True):
        tp = sum(1 for s, y in zip(scores, labels) if s >= t and y)
        fp = sum(1 for s, y in zip(scores, labels) if s >= t and not y)
        out.append((tp / (tp + fp), tp / n_pos))
    return out


def ref_ap(scores, labels):
    prev_r, ap = 0.0, 0.0
    for p, r in ref_precision_recall(scores, labels):
        ap += (r - prev_r) * p
        prev_r = r
    return ap


def ref_f1_max(scores, labels):
    return max(2 * p * r / (p + r) if p + r else 0.0 for p, r in ref_precision_recall(scores, labels))


def ref_pro(maps, masks, fpr_limit):
    """PRO by looping over thresholds and regions, integrating with an explicit trapezoid loop."""
    regions = []
    for i in range(maps.shape[0]):
        lab, n = ndimage.label(masks[i], structure=np.ones((3, 3)))
        regions += [(i, lab == k) for k in range(1, n + 1)]
    normal = masks == 0
    points = [(0.0, 0.0)]
    for t in sorted(set(maps.ravel().tolist()), reverse=True):
        above = maps >= t
        fpr = above[normal].sum() / normal.sum()
        pro = np.mean([above[i][r].sum() / r.sum() for i, r in regions])
        points.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


def ref_mmd2_unbiased(x, y):
    """Unbiased polynomial-kernel MMD^2 with explicit loops."""
    d = x.shape[1]

    def k(a, b):
        return (float(np.dot(a, b)) / d + 1.0) ** 3

    m, n = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return kxx + kyy - 2 * kxy


def random_tied_scores(rng, n, levels=6):
    """Scores on a coarse grid so ties are frequent, with both classes present."""
    scores = rng.integers(0, levels, n) / levels
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    return scores.tolist(), labels.tolist()


# --------------------------------------------------------------------------- AUROC / AP / F1-max


def test_auroc_ap_f1_hand_case():
    scores, labels = [0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]
    assert auroc(scores, labels) == pytest.approx(0.75)
    # thresholds 0.8 (P=1, R=.5), 0.4 (P=.5), 0.35 (P=2/3, R=1), 0.1 -> AP = .5*1 + .5*(2/3)
    assert average_precision(scores, labels) == pytest.approx(0.5 + 1 / 3)
    f1, thr = f1_max(scores, labels, return_threshold=True)
    assert f1 == pytest.approx(0.8) and thr == pytest.approx(0.35)


def test_ties_count_one_half():
    # positive 0.9 beats both negatives (2), positive 0.5 ties both (2 * 1/2) -> 3/4
    assert auroc([0.5, 0.5, 0.5, 0.9], [0, 1, 0, 1]) == pytest.approx(0.75)
    # all tied -> 1/2
    assert auroc([0.3] * 5, [0, 1, 1, 0, 1]) == pytest.approx(0.5)
    # tied threshold 0.5 moves one TP and one FP together: P=.5 at R=.5, then P=2/3 at R=1
    assert average_precision([0.5, 0.5, 0.2], [1, 0, 1]) == pytest.approx(0.25 + 1 / 3)
    assert f1_max([0.5, 0.5, 0.2], [1, 0, 1]) == pytest.approx(0.8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_detection_metrics_match_plain_reference_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores, labels = random_tied_scores(rng, 37)
    assert auroc(scores, labels) == pytest.approx(ref_auroc(scores, labels), abs=1e-12)
    assert average_precision(scores, labels) == pytest.approx(ref_ap(scores, labels), abs=1e-12)
    assert f1_max(scores, labels) == pytest.approx(ref_f1_max(scores, labels), abs=1e-12)
    # trapezoid area of the tie-grouped ROC curve equals the rank statistic
    tps, fps, thresholds = binary_clf_curve(torch.tensor(scores), torch.tensor(labels))
    assert np.all(np.diff(thresholds) < 0)
    tpr, fpr = np.r_[0, tps / tps[-1]], np.r_[0, fps / fps[-1]]
    assert np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2) == pytest.approx(auroc(scores, labels), abs=1e-12)


def test_metrics_accept_tensors_and_are_rank_based():
    s = torch.tensor([0.1, 0.4, 0.35, 0.8])
    y = torch.tensor([0, 0, 1, 1])
    assert auroc(s, y) == auroc(torch.exp(s) * 7, y)


def test_single_class_is_undefined():
    with pytest.raises(UndefinedMetricError, match="both classes"):
        auroc([0.1, 0.2], [1, 1])
    out = image_metrics([0.1, 0.2], [0, 0])
    assert set(out) == set(metrics.IMAGE_METRICS) and all(math.isnan(v) for v in out.values())


@pytest.mark.parametrize(
    "scores,labels,match",
    [
        ([0.1, 0.2], [0, 1, 1], "same number"),
        ([0.1, float("nan")], [0, 1], "finite"),
        ([0.1, 0.2], [0, 2], "binary"),
        ([], [], "empty"),
    ],
)
def test_bad_inputs_raise_clear_errors(scores, labels, match):
    with pytest.raises(ValueError, match=match):
        auroc(scores, labels)


# --------------------------------------------------------------------------- PRO


def test_pro_hand_case():
    # one row: region A = pixels 0-1, region B = pixel 3, normals 2, 4, 5.
    masks = np.array([[[1, 1, 0, 1, 0, 0]]])
    maps = np.array([[[0.9, 0.3, 0.8, 0.7, 0.1, 0.2]]])
    # curve (fpr, pro): (0,0) (0,.25) (1/3,.25) (1/3,.75) (1/3,1) (2/3,1) (1,1)
    fpr, pro = pro_curve(maps, masks)
    np.testing.assert_allclose(fpr, [0, 0, 1 / 3, 1 / 3, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(pro, [0, 0.25, 0.25, 0.75, 1, 1, 1])
    assert pro_score(maps, masks) == pytest.approx(0.25)  # 0.3 * 0.25 / 0.3
    assert pro_score(maps, masks, fpr_limit=0.5) == pytest.approx((0.25 / 3 + (0.5 - 1 / 3)) / 0.5)
    assert pro_score(maps, masks, fpr_limit=1.0) == pytest.approx(0.25 / 3 + 2 / 3)


def test_pro_ties_and_perfect_map():
    # a region pixel tied with the normal pixel: one diagonal step to (1, 1)
    assert pro_score(np.array([[[0.5, 0.5]]]), np.array([[[1, 0]]])) == pytest.approx(0.15)
    masks = np.zeros((2, 8, 8))
    masks[0, 2:5, 2:5] = 1
    assert pro_score(masks + 0.0, masks) == pytest.approx(1.0)


def test_pro_regions_are_eight_connected():
    masks = np.array([[[1, 1, 0], [0, 0, 1], [0, 0, 0]]])
    maps = np.where(masks == 1, 0.2, 0.5)
    maps[0, 1, 2] = 0.9
    # one region of 3 pixels (diagonal link): overlap 1/3 until every normal pixel is above
    assert pro_score(maps, masks) == pytest.approx(1 / 3)


@pytest.mark.parametrize("seed", [0, 1])
def test_pro_matches_plain_reference(seed):
    rng = np.random.default_rng(seed)
    masks = np.zeros((3, 9, 11))
    masks[0, 1:4, 2:5] = 1
    masks[0, 6:8, 8:10] = 1
    masks[1, 3:7, 0:2] = 1
    maps = np.round(rng.random(masks.shape) * 12) / 12 + 0.3 * masks  # ties on a grid
    for limit in (0.3, 0.05, 1.0):
        assert pro_score(maps, masks, fpr_limit=limit) == pytest.approx(ref_pro(maps, masks, limit), abs=1e-12)
    binned = pro_score(maps, masks, num_thresholds=2000)
    assert binned == pytest.approx(ref_pro(maps, masks, 0.3), abs=2e-3)


def test_pixel_metrics_keys_and_undefined_cases():
    masks = torch.zeros(2, 1, 6, 6)
    masks[1, 0, 2:4, 2:4] = 1
    maps = masks[:, 0] * 0.8 + 0.1
    out = pixel_metrics(maps, masks)
    assert set(out) == set(metrics.PIXEL_METRICS)
    assert all(v == pytest.approx(1.0) for v in out.values())
    empty = pixel_metrics(maps, torch.zeros(2, 1, 6, 6))
    assert all(math.isnan(v) for v in empty.values())
    with pytest.raises(ValueError, match="masks must match"):
        pixel_metrics(maps, torch.zeros(2, 1, 6, 5))
    with pytest.raises(ValueError, match="fpr_limit"):
        pro_score(maps, masks, fpr_limit=0.0)


# --------------------------------------------------------------------------- KID / IS


def test_kid_matches_direct_computation():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(10, 5))
    shifted = rng.normal(size=(10, 5)) + 1.5
    # subset_size clamps to 10 = all rows; the MMD is permutation-invariant, so this is the direct value
    got = kid(torch.tensor(real), shifted, subsets=1, subset_size=100)
    assert got["subset_size"] == 10
    assert got["kid"] == pytest.approx(ref_mmd2_unbiased(real, shifted), rel=1e-10)
    assert got["kid"] > 0.1

    same = kid(real, real, subsets=1, subset_size=10)
    assert same["kid"] == pytest.approx(ref_mmd2_unbiased(real, real), rel=1e-10)
    assert abs(same["kid"]) < 0.05 * got["kid"]


def test_kid_subsets_are_seeded_and_spread():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(40, 6)), rng.normal(size=(40, 6)) + 0.5
    r1 = kid(a, b, subsets=20, subset_size=10, seed=3)
    r2 = kid(a, b, subsets=20, subset_size=10, seed=3)
    assert r1 == r2 and r1["kid_std"] > 0 and r1["kid"] > 0
    with pytest.raises(ValueError, match="same width"):
        kid(a, b[:, :3])
    with pytest.raises(ValueError, match="at least 2"):
        kid(a[:1], b)


def test_inception_score_known_values():
    assert inception_score(torch.zeros(10, 7))["inception_score"] == pytest.approx(1.0, abs=1e-12)
    confident = torch.eye(5, dtype=torch.float64) * 60.0  # five distinct, certain classes
    assert inception_score(confident, splits=1)["inception_score"] == pytest.approx(5.0, rel=1e-9)
    # two splits of two distinct classes each -> 2 +- 0
    res = inception_score(torch.eye(4) * 60.0, splits=2)
    assert res["inception_score"] == pytest.approx(2.0, rel=1e-6) and res["inception_score_std"] == pytest.approx(0.0)


def test_inception_score_matches_numpy():
    logits = np.random.default_rng(2).normal(size=(12, 4)) * 2
    got = inception_score(logits, splits=3)
    vals = []
    for chunk in np.split(logits, 3):
        p = np.exp(chunk) / np.exp(chunk).sum(1, keepdims=True)
        py = p.mean(0)
        vals.append(np.exp(np.mean(np.sum(p * (np.log(p) - np.log(py)), axis=1))))
    assert got["inception_score"] == pytest.approx(np.mean(vals), rel=1e-10)
    assert got["inception_score_std"] == pytest.approx(np.std(vals), rel=1e-8)


# --------------------------------------------------------------------------- clustered diversity


def euclid(a, b):
    return (a - b).double().norm(dim=1)


def test_intra_cluster_diversity_toy_features():
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [100.0, 100.0], [-50.0, 0.0]])
    generated = torch.tensor(
        [[0.0, 1.0], [10.0, 1.0], [0.0, -1.0], [1.0, 0.0], [10.0, 3.0], [-49.0, 0.0]]
    )
    res = intra_cluster_diversity(generated, centers, euclid)
    assert res.cluster_sizes == [3, 2, 0, 1]
    first = (2.0 + 2 * math.sqrt(2.0)) / 3  # pairs of (0,1), (0,-1), (1,0)
    assert res.per_cluster[0] == pytest.approx(first)
    assert res.per_cluster[1] == pytest.approx(2.0)
    assert math.isnan(res.per_cluster[2]) and math.isnan(res.per_cluster[3])  # < 2 members: skipped
    assert res.value == pytest.approx((first + 2.0) / 2)


def test_intra_cluster_diversity_caps_members_and_handles_no_pairs():
    centers = torch.zeros(1, 3)
    generated = torch.randn(9, 3)
    capped = intra_cluster_diversity(
        generated, centers, euclid, max_per_cluster=2, generator=torch.Generator().manual_seed(0)
    )
    assert capped.cluster_sizes == [9]
    d = torch.cdist(generated.double(), generated.double())
    assert any(capped.value == pytest.approx(float(d[i, j])) for i, j in itertools.combinations(range(9), 2))
    assert math.isnan(intra_cluster_diversity(generated[:1], centers, euclid).value)


def test_ic_weight_free_forms_and_pairwise_means():
    gen = torch.Generator().manual_seed(0)
    imgs = torch.rand(6, 3, 32, 32, generator=gen) * 2 - 1
    x = torch.randn(5, 4, generator=gen)
    d = torch.cdist(x.double(), x.double())
    expected = d[torch.triu_indices(5, 5, 1).unbind()].mean()
    assert metrics.mean_pairwise_distance(x, euclid, batch_size=3) == pytest.approx(float(expected))
    assert metrics.l2_diversity(imgs) > 0.5  # independent uniform noise: RMS distance ~ 0.8
    assert 0.9 < metrics.ms_ssim_diversity(imgs) <= 1.0
    res = metrics.ic_l2(imgs, imgs[:2])
    assert sum(res.cluster_sizes) == 6 and res.value > 0
    same = metrics.ic_ms_ssim(imgs[:1].repeat(4, 1, 1, 1), imgs[:2])
    assert same.value == pytest.approx(0.0, abs=1e-6)  # identical members: no diversity


# --------------------------------------------------------------------------- SSIM / MS-SSIM


def test_ms_ssim_identity_and_scales():
    x = torch.rand(3, 3, 64, 64, dtype=torch.float64) * 2 - 1
    torch.testing.assert_close(ms_ssim(x, x), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(ssim(x, x), torch.ones(3, dtype=torch.float64))
    assert [default_scales(*hw) for hw in ((64, 64), (32, 48), (256, 256), (20, 20))] == [3, 2, 5, 1]
    noisy = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    very_noisy = (x + 1.0 * torch.randn_like(x)).clamp(-1, 1)
    assert torch.all(ms_ssim(x, very_noisy) < ms_ssim(x, noisy)) and torch.all(ms_ssim(x, noisy) < 1)
    torch.testing.assert_close(ms_ssim(x, noisy), ms_ssim(noisy, x))
    odd = torch.rand(2, 3, 37, 45) * 2 - 1
    assert ms_ssim(odd, odd.flip(-1)).shape == (2,)


def test_ssim_constant_images_hand_value():
    a = torch.full((1, 3, 16, 16), 0.5, dtype=torch.float64)
    b = torch.full((1, 3, 16, 16), -0.5, dtype=torch.float64)
    c1 = (0.01 * 2) ** 2
    expected = (2 * 0.5 * -0.5 + c1) / (0.25 + 0.25 + c1)  # zero variance: luminance term only
    assert float(ssim(a, b)) == pytest.approx(expected, rel=1e-12)
    assert float(ms_ssim(a, b)) == 0.0  # negative terms clamp to zero


def test_ssim_matches_scikit_image():
    structural_similarity = pytest.importorskip("skimage.metrics").structural_similarity
    rng = np.random.default_rng(0)
    x = rng.random((24, 30, 3)) * 2 - 1
    y = np.clip(x + 0.2 * rng.normal(size=x.shape), -1, 1)
    want = structural_similarity(
        x, y, data_range=2.0, channel_axis=2, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    to_t = lambda a: torch.tensor(a).permute(2, 0, 1)[None]  # noqa: E731
    assert float(ssim(to_t(x), to_t(y))) == pytest.approx(want, abs=1e-10)


def test_ssim_bad_inputs():
    with pytest.raises(ValueError, match="same shape"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))
    with pytest.raises(ValueError, match="too small"):
        ms_ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8), scales=5)


# --------------------------------------------------------------------------- pretrained weights


def test_missing_inception_weights_raise_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(MissingWeightsError) as info:
        metrics.load_inception()
    msg = str(info.value)
    # either the package is missing, or the file: the message says which and where it looked
    assert ("torchvision" in msg and "not installed" in msg) or "inception_v3_google" in msg
    assert str(tmp_path / "torch_home") in msg
    with pytest.raises(MissingWeightsError, match="does not exist"):
        pretrained.find_weights("Inception-v3", pretrained.INCEPTION_PATTERNS, tmp_path / "nope.pth")


def test_missing_lpips_raises_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    imgs = torch.zeros(4, 3, 32, 32)
    with pytest.raises(MissingWeightsError, match="LPIPS"):
        metrics.ic_lpips(imgs, imgs[:2])


def test_find_weights_searches_hub_cache_and_configured_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(MissingWeightsError) as info:
        pretrained.find_weights("Inception-v3", pretrained.INCEPTION_PATTERNS)
    assert "inception_v3_google-*.pth" in str(info.value) and str(tmp_path / "hub" / "checkpoints") in str(info.value)
    ckpt = tmp_path / "hub" / "checkpoints" / "inception_v3_google-0cc3c7bd.pth"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    assert pretrained.find_weights("Inception-v3", pretrained.INCEPTION_PATTERNS) == ckpt
    assert pretrained.find_weights("Inception-v3", pretrained.INCEPTION_PATTERNS, ckpt.parent) == ckpt
    assert pretrained.find_weights("Inception-v3", pretrained.INCEPTION_PATTERNS, ckpt) == ckpt


def test_generation_metrics_skip_only_what_lacks_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    gen = torch.Generator().manual_seed(0)
    generated = torch.rand(6, 3, 32, 32, generator=gen) * 2 - 1
    train = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    res = gen_metrics.generation_metrics(generated, train)
    assert set(res["metrics"]) == set(gen_metrics.WEIGHT_FREE_METRICS)
    assert all(math.isfinite(v) and v > 0 for v in res["metrics"].values())
    assert set(res["skipped"]) == set(gen_metrics.PRETRAINED_METRICS)
    assert all(isinstance(m, str) and m for m in res["skipped"].values())
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        gen_metrics.generation_metrics(generated * 255, train)


class _FakeInception(nn.Module):
    """Inception-shaped stand-in: pooled features -> fc, as torchvision's eval forward."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        assert x.shape[-2:] == (299, 299)
        return self.fc(self.proj(x.mean(dim=(2, 3))))


def test_inception_wrapper_returns_pool_and_logits():
    fake = _FakeInception()
    images = torch.rand(5, 3, 20, 20) * 2 - 1
    with torch.no_grad():
        resized = torch.nn.functional.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
        want_logits = fake(resized)
        want_pool = fake.proj(resized.mean(dim=(2, 3)))
    extractor = pretrained.InceptionFeatureExtractor(fake)
    pool, logits = pretrained.inception_features(images, extractor, batch_size=2)
    torch.testing.assert_close(pool, want_pool.double())
    torch.testing.assert_close(logits, want_logits.double())


def test_lpips_backbone_mapping_from_torchvision_layout():
    sliced = nn.Module()
    sliced.slice1 = nn.Sequential()
    sliced.slice1.add_module("0", nn.Conv2d(3, 4, 3))
    sliced.slice1.add_module("1", nn.ReLU())
    sliced.slice2 = nn.Sequential()
    sliced.slice2.add_module("2", nn.Conv2d(4, 5, 3))
    state = {"features.0.weight": torch.randn(4, 3, 3, 3), "features.0.bias": torch.randn(4),
             "features.2.weight": torch.randn(5, 4, 3, 3), "features.2.bias": torch.randn(5),
             "classifier.1.weight": torch.randn(2, 2)}
    pretrained._load_backbone(sliced, state, "ckpt.pth")
    torch.testing.assert_close(sliced.slice2[0].weight, state["features.2.weight"])
    torch.testing.assert_close(sliced.slice1[0].bias, state["features.0.bias"])
    with pytest.raises(RuntimeError, match="does not match"):
        pretrained._load_backbone(sliced, {"features.0.weight": torch.randn(4, 3, 3, 3)}, "ckpt.pth")


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except Exception:  # a torchvision built for another torch raises RuntimeError, not ImportError
        return False
    return True


def _plant(tmp_path, monkeypatch, name: str, state: dict) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / name)


@pytest.mark.skipif(not _importable("torchvision.models"), reason="torchvision not importable here")
def test_inception_loads_from_hub_cache_file(tmp_path, monkeypatch):
    from torchvision import models

    net = models.inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=False).eval()
    _plant(tmp_path, monkeypatch, "inception_v3_google-0cc3c7bd.pth", net.state_dict())
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    pool, logits = pretrained.inception_features(images, metrics.load_inception())
    with torch.no_grad():
        want = net(torch.nn.functional.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False))
    assert pool.shape == (2, 2048)
    torch.testing.assert_close(logits, want.double(), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(
    not (_importable("torchvision.models") and _importable("lpips")), reason="lpips not importable here"
)
def test_lpips_loads_backbone_from_hub_cache_file(tmp_path, monkeypatch):
    from torchvision import models

    state = models.alexnet(weights=None).state_dict()
    _plant(tmp_path, monkeypatch, "alexnet-owt-7be5be79.pth", state)
    model = metrics.load_lpips("alex")
    torch.testing.assert_close(model.net.slice2[1].weight, state["features.3.weight"])  # slice2 = features 2..4
    imgs = torch.rand(5, 3, 32, 32) * 2 - 1
    distance = metrics.lpips_distance(model)
    assert torch.all(distance(imgs, imgs) == 0) and torch.all(distance(imgs, imgs.flip(0))[[0, 1]] > 0)
    assert metrics.ic_lpips(imgs, imgs[:2], distance).value > 0
