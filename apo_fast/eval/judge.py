"""A fidelity judge that needs no downloaded weights: a small per-product classifier.

It is trained on real crops that APO never trains on (the held-out anomalies and
the ``test/good`` images) to tell the classes

    ``other`` (not this product), ``good``, and each defect kind.

``other`` is made from the product's own good crops by processes that destroy
what a person recognises: strong pixel noise, a smooth random colour field, and a
heavy blur under a global colour cast. Its predictions then give

* ``judge_right_kind``: for each generated anomaly, is the crop around its mask
  classified as the defect kind it was generated for? (``judge_defect``: as any
  defect kind, for sources such as CutPaste whose anomalies have no kind.)
* ``judge_product``: is a generated image (five crops, mean probability) judged
  the product (good or any defect) rather than ``other``?
* ``judge_kid``: a KID (:func:`apo_fast.eval.fidelity.kid`) between the judge's
  penultimate features of generated defect crops and of real held-out ones.

The judge's own accuracy on a validation split of its real crops is reported
beside them, so a low rate can be read against what the judge can tell apart.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .fidelity import kid

OTHER, GOOD = "other", "good"

__all__ = ["Judge", "JudgeNet", "five_crops", "judge_metrics", "mask_crops", "right_kind_by_kind", "train_judge"]


class JudgeNet(nn.Module):
    """Three conv blocks (GroupNorm, SiLU, stride 2), global average pooling, a linear head."""

    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()
        chans = (3, width, 2 * width, 2 * width)
        layers: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                       nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(chans[-1], num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def mask_crops(images: torch.Tensor, masks: torch.Tensor, size: int, *, jitter: int = 0,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """(N, 3, size, size) crops centred on each mask's centroid (the image centre for an empty
    mask), shifted by up to ``jitter`` pixels, kept inside the image."""
    n, _, h, w = images.shape
    if size > min(h, w):
        raise ValueError(f"crop size {size} is larger than the images ({h}x{w})")
    ys, xs = torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32)
    out = []
    for i in range(n):
        m = masks[i, 0].float()
        total = m.sum()
        cy = float((m.sum(1) * ys).sum() / total) if total > 0 else (h - 1) / 2
        cx = float((m.sum(0) * xs).sum() / total) if total > 0 else (w - 1) / 2
        if jitter:
            dy, dx = torch.randint(-jitter, jitter + 1, (2,), generator=generator).tolist()
            cy, cx = cy + dy, cx + dx
        top = int(min(max(round(cy - size / 2 + 0.5), 0), h - size))
        left = int(min(max(round(cx - size / 2 + 0.5), 0), w - size))
        out.append(images[i, :, top:top + size, left:left + size])
    return torch.stack(out) if out else images.new_zeros(0, images.shape[1], size, size)


def five_crops(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N * 5, 3, size, size): the four corners and the centre of each image."""
    _, _, h, w = images.shape
    top, left = (h - size) // 2, (w - size) // 2
    boxes = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size), (top, left)]
    return torch.stack([images[:, :, y:y + size, x:x + size] for y, x in boxes], 1).flatten(0, 1)


def random_crops(images: torch.Tensor, size: int, num: int, generator: torch.Generator) -> torch.Tensor:
    n, _, h, w = images.shape
    idx = torch.randint(n, (num,), generator=generator)
    ys = torch.randint(h - size + 1, (num,), generator=generator)
    xs = torch.randint(w - size + 1, (num,), generator=generator)
    return torch.stack([images[i, :, y:y + size, x:x + size] for i, y, x in zip(idx.tolist(), ys.tolist(), xs.tolist())])


def not_the_product(good: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Crops of the ``other`` class from good crops (N, 3, s, s), one process each: strong pixel
    noise, a smooth random colour field, or a heavy blur under a global colour cast (the
    product's detail gone, a colour it never has)."""
    n, c, s, _ = good.shape
    kind = torch.randint(3, (n,), generator=generator).view(-1, 1, 1, 1)
    sigma = 0.35 + 0.4 * torch.rand(n, 1, 1, 1, generator=generator)
    noisy = good + torch.randn(good.shape, generator=generator) * sigma
    field_ = F.interpolate(torch.rand(n, c, 4, 4, generator=generator) * 2 - 1, size=(s, s), mode="bilinear",
                           align_corners=False)
    field_ = field_ + 0.25 * torch.randn(good.shape, generator=generator)
    blurred = F.interpolate(F.avg_pool2d(good, 4, ceil_mode=True), size=(s, s), mode="bilinear", align_corners=False)
    cast = (torch.rand(n, c, 1, 1, generator=generator) * 2 - 1) * 0.8
    blurred = 0.5 * blurred + cast
    out = torch.where(kind == 0, noisy, torch.where(kind == 1, field_, blurred))
    return out.clamp(-1, 1)


def _dihedral(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    k = int(torch.randint(4, (), generator=generator))
    x = torch.rot90(x, k, dims=(-2, -1))
    return x.flip(-1) if bool(torch.randint(2, (), generator=generator)) else x


@dataclass
class Judge:
    """A trained :class:`JudgeNet` with its classes, crop size and validation accuracy."""

    net: JudgeNet
    classes: list[str]
    crop: int
    val_accuracy: dict[str, float] = field(default_factory=dict)

    @torch.no_grad()
    def probs(self, crops: torch.Tensor) -> torch.Tensor:
        self.net.eval()
        return torch.cat([F.softmax(self.net(c), dim=1) for c in crops.split(256)]) if len(crops) else \
            crops.new_zeros(0, len(self.classes))

    def kinds(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """(N,) the class index it gives the crop around each image's mask."""
        return self.probs(mask_crops(images, masks, self.crop)).argmax(1)

    @torch.no_grad()
    def features(self, crops: torch.Tensor) -> torch.Tensor:
        self.net.eval()
        return torch.cat([self.net.features(c) for c in crops.split(256)])


def train_judge(defect_images: torch.Tensor, defect_masks: torch.Tensor, defect_labels: list[str],
                good_images: torch.Tensor, defects: list[str], *, crop: int | None = None, steps: int = 400,
                batch_size: int = 48, lr: float = 2e-3, val_fraction: float = 0.25, seed: int = 0,
                texture: bool = True) -> Judge:
    """Train the judge on real anomalies (images (N,3,H,W), masks, the defect name of each) and
    good images (M,3,H,W); ``val_fraction`` of each class's images is kept out for the accuracy.

    Raises:
        ValueError: a defect kind without images, no good images, or mismatched lengths.
    """
    if len(defect_labels) != defect_images.shape[0] or defect_masks.shape[0] != defect_images.shape[0]:
        raise ValueError("defect_images, defect_masks and defect_labels must have one entry per image")
    if good_images.shape[0] < 2:
        raise ValueError(f"the judge needs at least 2 good images, got {good_images.shape[0]}")
    missing = [d for d in defects if d not in defect_labels]
    if missing:
        raise ValueError(f"the judge has no real images of the defect kind(s) {missing}")
    size = crop or max(8, defect_images.shape[-1] // 2)
    classes = [OTHER, GOOD, *defects]
    g = torch.Generator().manual_seed(seed)

    def split(n: int) -> tuple[list[int], list[int]]:
        order = torch.randperm(n, generator=g).tolist()
        k = min(n - 1, max(1, int(round(n * val_fraction)))) if n > 1 else 0
        return order[k:], order[:k]

    per_class = {}
    for d in defects:
        rows = [i for i, lab in enumerate(defect_labels) if lab == d]
        tr, va = split(len(rows))
        per_class[d] = ([rows[i] for i in tr], [rows[i] for i in va])
    good_tr, good_va = split(good_images.shape[0])
    torch.manual_seed(seed)
    net = JudgeNet(len(classes))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    per = max(1, batch_size // len(classes))
    net.train()
    for step in range(steps):
        xs, ys = [], []
        for ci, d in enumerate(defects, start=2):
            rows = torch.tensor(per_class[d][0])[torch.randint(len(per_class[d][0]), (per,), generator=g)]
            xs.append(mask_crops(defect_images[rows], defect_masks[rows], size, jitter=max(1, size // 6), generator=g))
            ys += [ci] * per
        good = random_crops(good_images[good_tr], size, 2 * per, g)
        xs += [good[:per], not_the_product(good[per:], g)]
        ys += [1] * per + [0] * per
        x = torch.cat(xs)
        if texture:
            x = torch.stack([_dihedral(c, g) for c in x])
        else:
            x = torch.where(torch.rand(len(x), 1, 1, 1, generator=g) < 0.5, x.flip(-1), x)
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss = F.cross_entropy(net(x), torch.tensor(ys))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    judge = Judge(net.eval(), classes, size)
    judge.val_accuracy = _validate(judge, defect_images, defect_masks, per_class, good_images, good_va, g)
    return judge


def _validate(judge, defect_images, defect_masks, per_class, good_images, good_va, g) -> dict[str, float]:
    acc = {}
    for ci, (d, (_, va)) in enumerate(per_class.items(), start=2):
        if va:
            crops = mask_crops(defect_images[va], defect_masks[va], judge.crop)
            acc[d] = float((judge.probs(crops).argmax(1) == ci).float().mean())
    if good_va:
        crops = five_crops(good_images[good_va], judge.crop)
        acc[GOOD] = float((judge.probs(crops).argmax(1) == 1).float().mean())
        acc[OTHER] = float((judge.probs(not_the_product(crops, g)).argmax(1) == 0).float().mean())
    acc["mean"] = sum(acc.values()) / len(acc) if acc else float("nan")
    return acc


def _right_kind_hits(judge: Judge, predicted: torch.Tensor, defects: list[str]) -> dict[int, bool]:
    """Row -> whether the judge called it the kind it was made for, for the rows of a kind the
    judge knows (CutPaste's rows carry no defect kind)."""
    return {i: int(predicted[i]) == judge.classes.index(d) for i, d in enumerate(defects) if d in judge.classes[2:]}


def right_kind_by_kind(judge: Judge, predicted: torch.Tensor, defects: list[str]) -> dict:
    """Per defect kind, from the judge's classes for the rows (``judge.kinds(images, masks)``) and
    the kind each was made for: ``{"right": rows called that kind, "n": rows, "rate": right / n,
    "called": {class: count}}``, for the kinds the judge knows."""
    if predicted.shape != (len(defects),):
        raise ValueError("predicted and defects must have one entry per image")
    hits = _right_kind_hits(judge, predicted, defects)
    out: dict[str, dict] = {}
    for kind in judge.classes[2:]:
        rows = [i for i in hits if defects[i] == kind]
        if rows:
            called = [judge.classes[int(predicted[i])] for i in rows]
            right = sum(hits[i] for i in rows)
            out[kind] = {"right": right, "n": len(rows), "rate": right / len(rows),
                         "called": {c: called.count(c) for c in sorted(set(called))}}
    return out


def judge_metrics(judge: Judge, images: torch.Tensor, masks: torch.Tensor, defects: list[str],
                  real_defect_crops: torch.Tensor | None = None, *, kid_subsets: int = 100,
                  seed: int = 0, predicted: torch.Tensor | None = None) -> dict[str, float]:
    """The judge's verdict on generated anomalies (images (N,3,H,W), masks (N,1,H,W), the defect
    kind each was generated for): ``judge_right_kind``, ``judge_product``, and with
    ``real_defect_crops`` ``judge_kid`` (and ``judge_kid_std``)."""
    if images.shape[0] != len(defects) or masks.shape[0] != images.shape[0]:
        raise ValueError("images, masks and defects must have one entry per image")
    crops = mask_crops(images, masks, judge.crop)
    if predicted is None:  # given: judge.kinds(images, masks), computed once for several uses
        predicted = judge.probs(crops).argmax(1)
    hits = _right_kind_hits(judge, predicted, defects)
    right = torch.tensor(list(hits.values())).float().mean().item() if hits else float("nan")
    p_other = judge.probs(five_crops(images, judge.crop))[:, 0].view(-1, 5).mean(1)
    out = {"judge_right_kind": right, "judge_defect": (predicted >= 2).float().mean().item(),
           "judge_product": (p_other < 0.5).float().mean().item()}
    if real_defect_crops is not None and len(crops) >= 2 and len(real_defect_crops) >= 2:
        res = kid(judge.features(real_defect_crops), judge.features(crops), subsets=kid_subsets,
                  subset_size=min(len(crops), len(real_defect_crops)), seed=seed)
        out["judge_kid"], out["judge_kid_std"] = res["kid"], res["kid_std"]
    return out
