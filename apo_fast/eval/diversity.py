"""Diversity of generated samples: mean pairwise distance and its clustered form.

The anomaly-generation papers (AnomalyDiffusion, DualAnoDiff, SeaS, APO) report
IC-LPIPS, the intra-cluster distance of Ojha et al. (2021): every generated
image joins the cluster of its closest training anomaly image, the mean
pairwise distance between the members of each cluster is taken, and those
per-cluster means are averaged over the clusters that have at least two
members. Here that procedure is distance-agnostic
(:func:`intra_cluster_diversity`), so it runs with LPIPS when its weights are
present (``apo_fast.eval.pretrained``), and always with weight-free distances:
pixel RMS distance and 1 - MS-SSIM.

A distance function takes two batches of equal shape (N, ...) and returns the
(N,) distances between matching rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .similarity import ms_ssim

DistanceFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def l2_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Root-mean-square difference per row: (N, ...) x (N, ...) -> (N,)."""
    diff = (a - b).flatten(1).to(torch.float64)
    return diff.pow(2).mean(dim=1).sqrt()


def ms_ssim_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 - MS-SSIM per image pair for [-1, 1] images (N,C,H,W) -> (N,)."""
    return 1.0 - ms_ssim(a, b, data_range=2.0)


def _check_batch(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim < 2:
        raise ValueError(f"{name} must have shape (N, ...) with at least 2 dims, got {tuple(x.shape)}")


def pairwise_distance_matrix(
    x: torch.Tensor, y: torch.Tensor, distance_fn: DistanceFn, *, batch_size: int = 256
) -> torch.Tensor:
    """All distances between rows of ``x`` and rows of ``y``.

    Args:
        x: (N, ...) samples (features or images).
        y: (M, ...) samples of the same trailing shape.
        distance_fn: paired distance, see the module docstring.
        batch_size: pairs per call of ``distance_fn``.

    Returns:
        (N, M) float64 distance matrix.
    """
    _check_batch(x, "x")
    _check_batch(y, "y")
    if x.shape[1:] != y.shape[1:]:
        raise ValueError(f"x and y must share trailing shape, got {tuple(x.shape[1:])} and {tuple(y.shape[1:])}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ii, jj = torch.meshgrid(torch.arange(x.shape[0]), torch.arange(y.shape[0]), indexing="ij")
    ii, jj = ii.reshape(-1), jj.reshape(-1)
    out = torch.empty(ii.numel(), dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, ii.numel(), batch_size):
            sl = slice(start, start + batch_size)
            d = distance_fn(x[ii[sl].to(x.device)], y[jj[sl].to(y.device)])
            out[sl] = d.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
    return out.view(x.shape[0], y.shape[0])


def mean_pairwise_distance(
    x: torch.Tensor,
    distance_fn: DistanceFn,
    *,
    max_pairs: int | None = None,
    generator: torch.Generator | None = None,
    batch_size: int = 256,
) -> float:
    """Mean distance over unordered pairs i < j of ``x`` (N, ...); NaN if N < 2.

    ``max_pairs`` samples that many distinct pairs (with ``generator``) instead of all N(N-1)/2.
    """
    _check_batch(x, "x")
    n = x.shape[0]
    if n < 2:
        return math.nan
    ii, jj = torch.triu_indices(n, n, offset=1)
    if max_pairs is not None and ii.numel() > max_pairs:
        pick = torch.randperm(ii.numel(), generator=generator)[:max_pairs]
        ii, jj = ii[pick], jj[pick]
    total = 0.0
    with torch.no_grad():
        for start in range(0, ii.numel(), batch_size):
            sl = slice(start, start + batch_size)
            d = distance_fn(x[ii[sl].to(x.device)], x[jj[sl].to(x.device)])
            total += float(d.detach().to(torch.float64).sum())
    return total / ii.numel()


def assign_to_clusters(
    samples: torch.Tensor, centers: torch.Tensor, distance_fn: DistanceFn, *, batch_size: int = 256
) -> torch.Tensor:
    """Index (N,) of the closest center (M, ...) for each sample (N, ...); ties go to the lower index."""
    return pairwise_distance_matrix(samples, centers, distance_fn, batch_size=batch_size).argmin(dim=1)


@dataclass
class ClusteredDiversity:
    """Result of :func:`intra_cluster_diversity`.

    ``value`` is the mean of ``per_cluster`` over clusters with >= 2 members
    (NaN when none has); ``per_cluster[k]`` is NaN for such small clusters.
    """

    value: float
    per_cluster: list[float] = field(default_factory=list)
    cluster_sizes: list[int] = field(default_factory=list)


def intra_cluster_diversity(
    generated: torch.Tensor,
    centers: torch.Tensor,
    distance_fn: DistanceFn,
    *,
    max_per_cluster: int | None = None,
    generator: torch.Generator | None = None,
    batch_size: int = 256,
) -> ClusteredDiversity:
    """Clustered diversity (the IC-LPIPS procedure with any distance).

    Args:
        generated: (N, ...) generated samples (images or features).
        centers: (M, ...) training anomaly samples, one cluster each.
        distance_fn: paired distance (N, ...) x (N, ...) -> (N,).
        max_per_cluster: keep at most this many members of a cluster (a random
            subset drawn with ``generator``), as the reference code caps
            clusters to bound the cost.
        batch_size: pairs per ``distance_fn`` call.

    Returns:
        :class:`ClusteredDiversity` with the average over clusters of the mean
        pairwise distance between members.
    """
    _check_batch(generated, "generated")
    _check_batch(centers, "centers")
    if centers.shape[0] == 0:
        raise ValueError("centers must hold at least one training sample")
    if max_per_cluster is not None and max_per_cluster < 2:
        raise ValueError(f"max_per_cluster must be None or >= 2, got {max_per_cluster}")
    assignment = assign_to_clusters(generated, centers, distance_fn, batch_size=batch_size)
    per_cluster: list[float] = []
    sizes: list[int] = []
    for k in range(centers.shape[0]):
        members = torch.nonzero(assignment == k).flatten()
        sizes.append(int(members.numel()))
        if max_per_cluster is not None and members.numel() > max_per_cluster:
            members = members[torch.randperm(members.numel(), generator=generator)[:max_per_cluster]]
        per_cluster.append(
            mean_pairwise_distance(generated[members.to(generated.device)], distance_fn, batch_size=batch_size)
        )
    valid = [d for d in per_cluster if not math.isnan(d)]
    value = sum(valid) / len(valid) if valid else math.nan
    return ClusteredDiversity(value=value, per_cluster=per_cluster, cluster_sizes=sizes)


def ms_ssim_diversity(images: torch.Tensor, *, max_pairs: int | None = None, generator=None) -> float:
    """Mean 1 - MS-SSIM over pairs of [-1, 1] images (N,3,H,W); higher = more diverse."""
    return mean_pairwise_distance(images, ms_ssim_distance, max_pairs=max_pairs, generator=generator, batch_size=64)


def l2_diversity(images: torch.Tensor, *, max_pairs: int | None = None, generator=None) -> float:
    """Mean pixel RMS distance over pairs of images (N, ...); higher = more diverse."""
    return mean_pairwise_distance(images, l2_distance, max_pairs=max_pairs, generator=generator)


def ic_l2(generated: torch.Tensor, train_images: torch.Tensor, **kwargs) -> ClusteredDiversity:
    """Intra-cluster pixel RMS distance (IC-LPIPS procedure, weight-free distance)."""
    return intra_cluster_diversity(generated, train_images, l2_distance, **kwargs)


def ic_ms_ssim(generated: torch.Tensor, train_images: torch.Tensor, **kwargs) -> ClusteredDiversity:
    """Intra-cluster 1 - MS-SSIM (IC-LPIPS procedure, weight-free distance)."""
    kwargs.setdefault("batch_size", 64)
    return intra_cluster_diversity(generated, train_images, ms_ssim_distance, **kwargs)


def ic_lpips(
    generated: torch.Tensor,
    train_images: torch.Tensor,
    distance_fn: DistanceFn | None = None,
    *,
    net: str = "alex",
    backbone_weights=None,
    device: str | torch.device = "cpu",
    **kwargs,
) -> ClusteredDiversity:
    """IC-LPIPS: intra-cluster LPIPS of generated images around the training anomalies.

    Args:
        generated: (N,3,H,W) generated images in [-1, 1].
        train_images: (M,3,H,W) training anomaly images in [-1, 1] (cluster centers).
        distance_fn: a paired distance to use instead of LPIPS (e.g. a model
            already loaded with :func:`apo_fast.eval.pretrained.lpips_distance`).
        net, backbone_weights, device: passed to
            :func:`apo_fast.eval.pretrained.load_lpips` when ``distance_fn`` is None.
        **kwargs: ``max_per_cluster``, ``generator``, ``batch_size`` of
            :func:`intra_cluster_diversity`.

    Raises:
        MissingWeightsError: LPIPS or its weights are not available locally.
    """
    if distance_fn is None:
        from .pretrained import load_lpips, lpips_distance

        distance_fn = lpips_distance(load_lpips(net, backbone_weights=backbone_weights, device=device))
    kwargs.setdefault("batch_size", 32)
    return intra_cluster_diversity(generated, train_images, distance_fn, **kwargs)
