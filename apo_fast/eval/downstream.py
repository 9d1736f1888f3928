"""The downstream test: does a source of synthetic anomalies make a better detector?

For every data source (e.g. "none", "cutpaste", "lora", "apo") and every seed,
a fresh :class:`~apo_fast.eval.segmentation.DiscriminativeUNet` is trained on
the normal training images plus that source's synthetic anomalies and masks,
then evaluated on the held-out real test set. The same seed gives every source
the same initial weights and the same batch-sampling stream, so the sources
differ only in their data. Source "none" (value ``None``) trains on normals
with all-zero masks only: the honest no-synthetic-data baseline.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Sequence

import torch

from .images import check_images, check_masks
from .segmentation import evaluate_segmenter, train_segmenter


def downstream_comparison(
    normal_train: torch.Tensor,
    synthetic_by_source: Mapping[str, tuple[torch.Tensor, torch.Tensor] | None],
    test_images: torch.Tensor,
    test_masks: torch.Tensor,
    test_labels: Any = None,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    steps: int = 300,
    batch_size: int = 8,
    lr: float = 1e-3,
    device: str | torch.device = "cpu",
    progress: bool = False,
    segmenter_kwargs: Mapping[str, Any] | None = None,
    eval_kwargs: Mapping[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Train and evaluate one segmenter per (source, seed).

    Args:
        normal_train: (N,3,H,W) normal training images in [-1, 1].
        synthetic_by_source: source name -> ``(images (M,3,H,W), masks (M,1,H,W))``
            of synthetic anomalies, or ``None`` for normals only.
        test_images: (T,3,H,W) held-out real test images (good and anomalous).
        test_masks: (T,1,H,W) their masks in [0, 1] (binarised at 0.5).
        test_labels: (T,) image labels; None derives them from the masks.
        seeds: one run per seed and source.
        steps, batch_size, lr, device, progress: see
            :func:`~apo_fast.eval.segmentation.train_segmenter`.
        segmenter_kwargs: extra arguments for ``train_segmenter`` (network size, losses).
        eval_kwargs: extra arguments for ``evaluate_segmenter`` (PRO options).
        log: called with one line per finished run (e.g. ``print``).

    Returns:
        ``{"results": {source: [per-seed dict]}, "settings": {...}}``; each
        per-seed dict has ``seed``, ``n_synthetic``, ``train_seconds`` and the
        metrics of :func:`~apo_fast.eval.segmentation.evaluate_segmenter`.
    """
    check_images(normal_train, "normal_train")
    check_images(test_images, "test_images")
    check_masks(test_masks, test_images, "test_masks")
    if not isinstance(synthetic_by_source, Mapping) or not synthetic_by_source:
        raise ValueError("synthetic_by_source must be a non-empty mapping of source name -> (images, masks) or None")
    for name, data in synthetic_by_source.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"source names must be non-empty strings, got {name!r}")
        if data is None:
            continue
        if not (isinstance(data, (tuple, list)) and len(data) == 2):
            raise ValueError(f"synthetic_by_source[{name!r}] must be (images, masks) or None")
        check_images(data[0], f"synthetic_by_source[{name!r}] images")
        check_masks(data[1], data[0], f"synthetic_by_source[{name!r}] masks")
        if data[0].shape[-2:] != normal_train.shape[-2:]:
            raise ValueError(
                f"synthetic_by_source[{name!r}] images must be {tuple(normal_train.shape[-2:])}, "
                f"got {tuple(data[0].shape[-2:])}"
            )
    seeds = list(seeds)
    if not seeds or not all(isinstance(s, int) for s in seeds):
        raise ValueError(f"seeds must be a non-empty sequence of ints, got {seeds!r}")
    segmenter_kwargs = dict(segmenter_kwargs or {})
    eval_kwargs = dict(eval_kwargs or {})

    results: dict[str, list[dict]] = {}
    for name, data in synthetic_by_source.items():
        images, masks = (None, None) if data is None else data
        runs = []
        for seed in seeds:
            start = time.perf_counter()
            model = train_segmenter(
                normal_train, images, masks, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                device=device, progress=progress, **segmenter_kwargs,
            )
            seconds = time.perf_counter() - start
            metrics = evaluate_segmenter(model, test_images, test_masks, test_labels, **eval_kwargs)
            run = {"seed": seed, "n_synthetic": 0 if images is None else int(images.shape[0]),
                   "train_seconds": seconds, **metrics}
            runs.append(run)
            if log is not None:
                log(f"[downstream] {name} seed {seed}: image AUROC {metrics['image_auroc']:.3f}, "
                    f"pixel AUROC {metrics['pixel_auroc']:.3f}, pixel AP {metrics['pixel_ap']:.3f} ({seconds:.1f}s)")
        results[name] = runs
    settings = {
        "seeds": seeds, "steps": steps, "batch_size": batch_size, "lr": lr,
        "n_normal_train": int(normal_train.shape[0]), "n_test": int(test_images.shape[0]),
        "image_size": list(normal_train.shape[-2:]), "segmenter_kwargs": segmenter_kwargs,
        "eval_kwargs": eval_kwargs,
    }
    return {"results": results, "settings": settings}
