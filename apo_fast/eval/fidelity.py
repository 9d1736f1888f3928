"""Feature-statistics metrics: KID and Inception Score, from features/logits.

Both take what a pretrained classifier produced (see
:mod:`apo_fast.eval.pretrained`), so they are testable on any numbers.

* KID (Binkowski et al. 2018, as torch-fidelity and clean-fid compute it):
  the unbiased squared MMD with the polynomial kernel
  ``k(x, y) = (x . y / d + 1) ** 3``, averaged over random subsets of
  ``subset_size`` real and generated feature rows drawn without replacement.
* IS (Salimans et al. 2016): ``exp(E_x KL(p(y|x) || p(y)))`` per split of the
  samples, mean and (population) std over splits.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def _as_2d_float64(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().to(torch.float64).numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must have shape (N, D), got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite (found NaN or inf)")
    return arr


def polynomial_mmd2_unbiased(x: np.ndarray, y: np.ndarray, *, degree: int = 3, coef0: float = 1.0) -> float:
    """Unbiased squared MMD between rows of x (m, D) and y (n, D), kernel (x.y/D + coef0)^degree."""
    d = x.shape[1]
    kxx = (x @ x.T / d + coef0) ** degree
    kyy = (y @ y.T / d + coef0) ** degree
    kxy = (x @ y.T / d + coef0) ** degree
    m, n = x.shape[0], y.shape[0]
    term_xx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    term_yy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(term_xx + term_yy - 2.0 * kxy.mean())


def kid(
    feats_real,
    feats_gen,
    subsets: int = 100,
    subset_size: int = 1000,
    *,
    degree: int = 3,
    coef0: float = 1.0,
    seed: int = 0,
) -> dict[str, float]:
    """Kernel Inception Distance.

    Args:
        feats_real: (N_real, D) features of real images.
        feats_gen: (N_gen, D) features of generated images.
        subsets: number of random subsets.
        subset_size: rows per subset; clamped to ``min(N_real, N_gen)`` (the
            clamp is reported back as ``subset_size``).
        degree, coef0: polynomial kernel ``(x.y/D + coef0) ** degree``.
        seed: subset sampling seed (numpy ``default_rng``).

    Returns:
        ``{"kid": mean, "kid_std": std over subsets, "subset_size": used}``.
    """
    real = _as_2d_float64(feats_real, "feats_real")
    gen = _as_2d_float64(feats_gen, "feats_gen")
    if real.shape[1] != gen.shape[1]:
        raise ValueError(f"feats_real and feats_gen must have the same width, got {real.shape[1]} and {gen.shape[1]}")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    size = min(subset_size, real.shape[0], gen.shape[0])
    if size < 2:
        raise ValueError(f"KID needs at least 2 real and 2 generated rows, got {real.shape[0]} and {gen.shape[0]}")
    rng = np.random.default_rng(seed)
    values = np.empty(subsets)
    for k in range(subsets):
        xr = real[rng.choice(real.shape[0], size, replace=False)]
        xg = gen[rng.choice(gen.shape[0], size, replace=False)]
        values[k] = polynomial_mmd2_unbiased(xr, xg, degree=degree, coef0=coef0)
    return {"kid": float(values.mean()), "kid_std": float(values.std()), "subset_size": int(size)}


def inception_score(logits, splits: int = 10, *, shuffle_seed: int | None = None) -> dict[str, float]:
    """Inception Score from classifier logits.

    Args:
        logits: (N, K) unnormalised class scores.
        splits: number of equal chunks (as ``torch.chunk``); clamped to N.
        shuffle_seed: permute samples before splitting (torch-fidelity does);
            None keeps the given order.

    Returns:
        ``{"inception_score": mean over splits, "inception_score_std": population std}``.
    """
    lg = torch.as_tensor(_as_2d_float64(logits, "logits"))
    if lg.shape[0] < 1:
        raise ValueError("logits must hold at least one row")
    if splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    if shuffle_seed is not None:
        lg = lg[torch.randperm(lg.shape[0], generator=torch.Generator().manual_seed(shuffle_seed))]
    log_p = torch.log_softmax(lg, dim=1)
    scores = []
    for chunk in log_p.chunk(min(splits, lg.shape[0])):
        log_py = torch.logsumexp(chunk, dim=0) - math.log(chunk.shape[0])  # log of mean p(y|x)
        kl = (chunk.exp() * (chunk - log_py)).sum(dim=1).mean()
        scores.append(math.exp(float(kl)))
    arr = np.asarray(scores)
    return {"inception_score": float(arr.mean()), "inception_score_std": float(arr.std())}
