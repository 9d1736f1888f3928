"""Anomaly detection and segmentation metrics: AUROC, AP, F1-max and PRO.

Pure numpy/scipy, no downloads. Conventions of the field (MVTec AD):

* a higher score means "more anomalous"; label/mask 1 marks an anomaly;
* thresholds sweep the distinct score values, so tied scores move together
  (AUROC with ties equals the Mann-Whitney statistic counting a tie as 1/2);
* image-level metrics use one score per image, pixel-level metrics pool every
  pixel of every test image;
* PRO (per-region overlap) averages, over every connected defect region
  (8-connectivity, as MVTec's reference code), the fraction of the region above
  the threshold, and integrates that curve over the false positive rate of
  normal pixels up to ``fpr_limit`` (0.3), divided by ``fpr_limit``.

The core functions raise ``UndefinedMetricError`` (a ``ValueError``) when a
metric is undefined (one class only); the ``image_metrics``/``pixel_metrics``
wrappers return NaN instead, so a report can show "n/a".
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from scipy import ndimage, stats

IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1_max")
PIXEL_METRICS = ("pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_pro")
DETECTION_METRICS = IMAGE_METRICS + PIXEL_METRICS


def _to_numpy(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().to(torch.float64).numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a tensor or array of numbers, got {type(x).__name__}") from exc


def _scores_and_labels(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    s = _to_numpy(scores, "scores").reshape(-1)
    y = _to_numpy(labels, "labels").reshape(-1)
    if s.size != y.size:
        raise ValueError(f"scores and labels must have the same number of elements, got {s.size} and {y.size}")
    if s.size == 0:
        raise ValueError("scores must not be empty")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite (found NaN or inf)")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("labels must be binary (0 or 1)")
    return s, y.astype(bool)


class UndefinedMetricError(ValueError):
    """The metric is undefined for these inputs (e.g. only one class present)."""


def _require_both_classes(y: np.ndarray) -> tuple[int, int]:
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise UndefinedMetricError(
            f"labels must contain both classes to define this metric, got {n_pos} positives and {n_neg} negatives"
        )
    return n_pos, n_neg


def binary_clf_curve(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True/false positive counts at every distinct threshold, highest first.

    Args:
        scores: (N,) anomaly scores (any shape; flattened).
        labels: (N,) binary labels.

    Returns:
        ``(tps, fps, thresholds)``, each (K,) with K the number of distinct
        scores; entry k counts samples with ``score >= thresholds[k]``.
    """
    return _clf_curve(*_scores_and_labels(scores, labels))


def _clf_curve(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tps = np.cumsum(y, dtype=np.float64)[last_of_tie]
    fps = (last_of_tie + 1).astype(np.float64) - tps
    return tps, fps, s[last_of_tie]


def auroc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve (Mann-Whitney U / (P*N), ties count 1/2).

    Args:
        scores: (N,) anomaly scores, higher = more anomalous.
        labels: (N,) binary labels, 1 = anomalous.
    """
    s, y = _scores_and_labels(scores, labels)
    n_pos, n_neg = _require_both_classes(y)
    ranks = stats.rankdata(s, method="average")
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def average_precision(scores: Any, labels: Any) -> float:
    """Average precision: sum over thresholds of (R_k - R_{k-1}) * P_k (step rule, no interpolation).

    Args:
        scores: (N,) anomaly scores.
        labels: (N,) binary labels.
    """
    s, y = _scores_and_labels(scores, labels)
    n_pos, _ = _require_both_classes(y)
    tps, fps, _ = _clf_curve(s, y)
    precision = tps / (tps + fps)
    recall = tps / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def f1_max(scores: Any, labels: Any, *, return_threshold: bool = False) -> float | tuple[float, float]:
    """Best F1 = 2TP / (2TP + FP + FN) over all thresholds ``score >= t``.

    Args:
        scores: (N,) anomaly scores.
        labels: (N,) binary labels.
        return_threshold: also return the threshold reaching the maximum.
    """
    s, y = _scores_and_labels(scores, labels)
    n_pos, _ = _require_both_classes(y)
    tps, fps, thresholds = _clf_curve(s, y)
    f1 = 2.0 * tps / (tps + fps + n_pos)
    best = int(np.argmax(f1))
    if return_threshold:
        return float(f1[best]), float(thresholds[best])
    return float(f1[best])


def _maps_and_masks(anomaly_maps: Any, masks: Any) -> tuple[np.ndarray, np.ndarray]:
    a = _to_numpy(anomaly_maps, "anomaly_maps")
    m = _to_numpy(masks, "masks")
    if a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if a.ndim == 2:
        a = a[None]
    if m.ndim == 2:
        m = m[None]
    if a.ndim != 3:
        raise ValueError(f"anomaly_maps must have shape (N,H,W) or (N,1,H,W), got {tuple(a.shape)}")
    if a.shape != m.shape:
        raise ValueError(f"masks must match anomaly_maps' shape {tuple(a.shape)}, got {tuple(m.shape)}")
    if not np.all(np.isfinite(a)):
        raise ValueError("anomaly_maps must be finite (found NaN or inf)")
    if not np.all((m == 0) | (m == 1)):
        raise ValueError("masks must be binary (0 or 1)")
    return a, m.astype(bool)


def pro_curve(
    anomaly_maps: Any, masks: Any, *, num_thresholds: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-region-overlap curve: (FPR of normal pixels, mean region overlap) per threshold.

    Args:
        anomaly_maps: (N,H,W) or (N,1,H,W) pixel scores.
        masks: same shape, binary ground truth.
        num_thresholds: None for the exact curve (every distinct score is a
            threshold); an int K >= 2 for K thresholds evenly spaced between
            the lowest and highest score (less memory on large test sets).

    Returns:
        ``(fpr, pro)``, each (K+1,), starting at (0, 0), FPR non-decreasing.
    """
    a, m = _maps_and_masks(anomaly_maps, masks)
    if num_thresholds is not None and (not isinstance(num_thresholds, int) or num_thresholds < 2):
        raise ValueError(f"num_thresholds must be None or an int >= 2, got {num_thresholds!r}")
    eight_connected = np.ones((3, 3), dtype=int)
    weight = np.zeros(a.shape, dtype=np.float64)  # per-pixel contribution to the PRO sum
    num_regions = 0
    for i in range(a.shape[0]):
        labelled, count = ndimage.label(m[i], structure=eight_connected)
        if count:
            sizes = np.bincount(labelled.ravel())
            inside = labelled > 0
            weight[i][inside] = 1.0 / sizes[labelled[inside]]
            num_regions += count
    num_normal = int((~m).sum())
    if num_regions == 0:
        raise UndefinedMetricError("masks contain no anomalous region; PRO is undefined")
    if num_normal == 0:
        raise UndefinedMetricError("masks contain no normal pixel; the false positive rate is undefined")

    scores = a.ravel()
    if num_thresholds is None:
        thresholds = np.unique(scores)
    else:
        thresholds = np.linspace(scores.min(), scores.max(), num_thresholds)
    # Pixel p is above thresholds[0..j-1] where j = #thresholds <= score.
    above = np.searchsorted(thresholds, scores, side="right")
    k = thresholds.size
    fp_hist = np.bincount(above, weights=(~m).ravel().astype(np.float64), minlength=k + 1)
    pro_hist = np.bincount(above, weights=weight.ravel(), minlength=k + 1)
    # count at threshold index t = sum of hist[j] for j > t; walk thresholds from high to low.
    fpr = np.cumsum(fp_hist[::-1])[:-1] / num_normal
    pro = np.cumsum(pro_hist[::-1])[:-1] / num_regions
    return np.r_[0.0, fpr], np.r_[0.0, pro]


def _integrate_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under y(x) from 0 to x_max, x non-decreasing, linear at the cut."""
    keep = x <= x_max
    xs, ys = x[keep], y[keep]
    beyond = np.flatnonzero(~keep)
    if beyond.size and xs[-1] < x_max:
        j = beyond[0]
        x0, y0, x1, y1 = x[j - 1], y[j - 1], x[j], y[j]
        y_cut = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        xs, ys = np.r_[xs, x_max], np.r_[ys, y_cut]
    return float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2.0))


def pro_score(
    anomaly_maps: Any, masks: Any, fpr_limit: float = 0.3, num_thresholds: int | None = None
) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (1.0 = perfect).

    Args:
        anomaly_maps: (N,H,W) or (N,1,H,W) pixel scores.
        masks: same shape, binary ground truth; needs at least one region and one normal pixel.
        fpr_limit: integration limit on the normal-pixel false positive rate, in (0, 1].
        num_thresholds: None for the exact curve, else K evenly spaced thresholds.
    """
    if not (isinstance(fpr_limit, (int, float)) and 0.0 < fpr_limit <= 1.0):
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit!r}")
    fpr, pro = pro_curve(anomaly_maps, masks, num_thresholds=num_thresholds)
    return _integrate_to(fpr, pro, float(fpr_limit)) / float(fpr_limit)


def _or_nan(fn, *args, **kwargs) -> float:
    try:
        return fn(*args, **kwargs)
    except UndefinedMetricError:
        return math.nan


def image_metrics(scores: Any, labels: Any) -> dict[str, float]:
    """Image-level AUROC, AP and F1-max; NaN where the labels hold one class only.

    Args:
        scores: (N,) image anomaly scores.
        labels: (N,) binary image labels.
    """
    _scores_and_labels(scores, labels)
    return {
        "image_auroc": _or_nan(auroc, scores, labels),
        "image_ap": _or_nan(average_precision, scores, labels),
        "image_f1_max": _or_nan(f1_max, scores, labels),
    }


def pixel_metrics(
    anomaly_maps: Any,
    masks: Any,
    *,
    pro: bool = True,
    fpr_limit: float = 0.3,
    num_thresholds: int | None = None,
) -> dict[str, float]:
    """Pixel-level AUROC, AP, F1-max and PRO; NaN where undefined (no defect pixel).

    Args:
        anomaly_maps: (N,H,W) or (N,1,H,W) pixel scores.
        masks: same shape, binary ground truth.
        pro: compute PRO (set False to skip it; the key is then NaN).
        fpr_limit, num_thresholds: see :func:`pro_score`.
    """
    a, m = _maps_and_masks(anomaly_maps, masks)
    out = {
        "pixel_auroc": _or_nan(auroc, a, m),
        "pixel_ap": _or_nan(average_precision, a, m),
        "pixel_f1_max": _or_nan(f1_max, a, m),
        "pixel_pro": math.nan,
    }
    if pro:
        out["pixel_pro"] = _or_nan(pro_score, a, m, fpr_limit=fpr_limit, num_thresholds=num_thresholds)
    return out
