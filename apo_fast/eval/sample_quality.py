"""All generation metrics of one set of generated anomalies, skipping what lacks weights.

Weight-free metrics always run (MS-SSIM and pixel-L2 diversity, and their
clustered IC forms); IC-LPIPS, IS and KID run when their pretrained networks
are available locally. A :class:`~apo_fast.eval.pretrained.MissingWeightsError`
skips only the metric that needs the weights; its message is kept under
``"skipped"`` so the report says why.
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import diversity
from .fidelity import inception_score, kid
from .images import check_images
from .pretrained import MissingWeightsError, inception_features, load_inception

WEIGHT_FREE_METRICS = ("ms_ssim_diversity", "l2_diversity", "ic_ms_ssim", "ic_l2")
PRETRAINED_METRICS = ("ic_lpips", "inception_score", "kid")
GENERATION_METRICS = WEIGHT_FREE_METRICS + PRETRAINED_METRICS


def generation_metrics(
    generated: torch.Tensor,
    train_anomalies: torch.Tensor,
    *,
    real_images: torch.Tensor | None = None,
    metrics: tuple[str, ...] = GENERATION_METRICS,
    lpips_net: str = "alex",
    lpips_backbone_weights: str | Path | None = None,
    inception_weights: str | Path | None = None,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    is_splits: int = 10,
    max_pairs: int | None = 4000,
    max_per_cluster: int | None = 50,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict:
    """Generation metrics for generated anomaly images.

    Args:
        generated: (N,3,H,W) generated images in [-1, 1].
        train_anomalies: (M,3,H,W) real training anomalies (IC cluster centers).
        real_images: (R,3,H,W) real anomalies for KID; default ``train_anomalies``.
        metrics: names to compute, from ``GENERATION_METRICS``.
        lpips_net, lpips_backbone_weights: LPIPS backbone and its local checkpoint.
        inception_weights: local Inception-v3 checkpoint (file or folder).
        kid_subsets, kid_subset_size: KID subset sampling.
        is_splits: IS splits.
        max_pairs: pair cap for the plain diversity metrics.
        max_per_cluster: member cap per cluster for the IC metrics.
        seed: seeds every random subset.
        device: where pretrained networks run.

    Returns:
        ``{"metrics": {name: float}, "skipped": {name: reason}, "n_generated": N, "n_train": M}``;
        IS and KID add ``inception_score_std`` and ``kid_std``.
    """
    check_images(generated, "generated")
    check_images(train_anomalies, "train_anomalies")
    if real_images is None:
        real_images = train_anomalies
    check_images(real_images, "real_images")
    unknown = set(metrics) - set(GENERATION_METRICS)
    if unknown:
        raise ValueError(f"metrics must be among {GENERATION_METRICS}, got unknown {sorted(unknown)}")
    if generated.shape[0] < 2:
        raise ValueError(f"generated must hold at least 2 images, got {generated.shape[0]}")

    def gen() -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    out: dict[str, float] = {}
    skipped: dict[str, str] = {}
    generated = generated.detach().float().cpu()
    train = train_anomalies.detach().float().cpu()
    if "ms_ssim_diversity" in metrics:
        out["ms_ssim_diversity"] = diversity.ms_ssim_diversity(generated, max_pairs=max_pairs, generator=gen())
    if "l2_diversity" in metrics:
        out["l2_diversity"] = diversity.l2_diversity(generated, max_pairs=max_pairs, generator=gen())
    if "ic_ms_ssim" in metrics:
        out["ic_ms_ssim"] = diversity.ic_ms_ssim(
            generated, train, max_per_cluster=max_per_cluster, generator=gen()
        ).value
    if "ic_l2" in metrics:
        out["ic_l2"] = diversity.ic_l2(generated, train, max_per_cluster=max_per_cluster, generator=gen()).value
    if "ic_lpips" in metrics:
        try:
            out["ic_lpips"] = diversity.ic_lpips(
                generated, train, net=lpips_net, backbone_weights=lpips_backbone_weights, device=device,
                max_per_cluster=max_per_cluster, generator=gen(),
            ).value
        except MissingWeightsError as exc:
            skipped["ic_lpips"] = str(exc)
    if "inception_score" in metrics or "kid" in metrics:
        try:
            extractor = load_inception(inception_weights, device=device)
        except MissingWeightsError as exc:
            for name in ("inception_score", "kid"):
                if name in metrics:
                    skipped[name] = str(exc)
        else:
            gen_pool, gen_logits = inception_features(generated, extractor)
            if "inception_score" in metrics:
                out.update(inception_score(gen_logits, splits=is_splits))
            if "kid" in metrics:
                real_pool, _ = inception_features(real_images.detach().float().cpu(), extractor)
                res = kid(real_pool, gen_pool, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed)
                out["kid"], out["kid_std"] = res["kid"], res["kid_std"]
    return {"metrics": out, "skipped": skipped, "n_generated": int(generated.shape[0]), "n_train": int(train.shape[0])}
