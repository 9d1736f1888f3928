"""The comparison report: JSON, a Markdown table and figures, written atomically.

Input is what :func:`~apo_fast.eval.downstream.downstream_comparison` returns
(per-source lists of per-seed metric dicts) and, optionally, per-source
generation metrics from :func:`~apo_fast.eval.sample_quality.generation_metrics`
and per-source sample images with masks for the sample grid.

Aggregation: mean over seeds and sample standard deviation (ddof 1; 0 for a
single seed); NaN values (metric undefined for that run) are left out and
``n`` counts the finite ones. JSON writes NaN as ``null``. Figures are drawn
with matplotlib's object API on the Agg canvas (no pyplot, no global backend
switch). Every file is written to a temporary name in the same folder and
renamed into place, so a crash never leaves a half-written report.
"""
from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .detection import DETECTION_METRICS

METRIC_LABELS = {
    "image_auroc": "Image AUROC",
    "image_ap": "Image AP",
    "image_f1_max": "Image F1-max",
    "pixel_auroc": "Pixel AUROC",
    "pixel_ap": "Pixel AP",
    "pixel_f1_max": "Pixel F1-max",
    "pixel_pro": "PRO (FPR<=0.3)",
}


# --------------------------------------------------------------------------- aggregation


def summarize(
    results_by_source: Mapping[str, Sequence[Mapping[str, Any]]], metrics: Sequence[str] | None = None
) -> dict[str, dict[str, dict[str, float]]]:
    """Mean and spread over seeds.

    Args:
        results_by_source: source -> list of per-seed dicts (metric -> value).
        metrics: metric names; None uses the detection metrics present in any run.

    Returns:
        ``{source: {metric: {"mean": float, "std": float, "n": int}}}``.
    """
    if not isinstance(results_by_source, Mapping):
        raise TypeError(
            f"results_by_source must be a mapping source -> list of dicts, got {type(results_by_source).__name__}"
        )
    if metrics is None:
        present = {k for runs in results_by_source.values() for run in runs for k in run}
        metrics = [m for m in DETECTION_METRICS if m in present]
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for source, runs in results_by_source.items():
        summary[source] = {}
        for metric in metrics:
            values = np.array([float(r[metric]) for r in runs if metric in r and r[metric] is not None], dtype=float)
            values = values[np.isfinite(values)]
            n = int(values.size)
            summary[source][metric] = {
                "mean": float(values.mean()) if n else math.nan,
                "std": float(values.std(ddof=1)) if n > 1 else (0.0 if n == 1 else math.nan),
                "n": n,
            }
    return summary


# --------------------------------------------------------------------------- writing


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file, fsync and an atomic rename."""
    from apo_fast.io_utils import atomic_write_bytes as write

    return write(path, data)


def to_jsonable(obj: Any) -> Any:
    """Plain JSON types: NaN/inf -> None, tensors/arrays -> lists, paths -> str, dataclasses -> dicts."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, (Path, torch.device, torch.dtype)):
        return str(obj)
    if hasattr(obj, "__dataclass_fields__"):
        return to_jsonable({k: getattr(obj, k) for k in obj.__dataclass_fields__})
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def write_json(path: str | Path, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON (NaN becomes null)."""
    text = json.dumps(to_jsonable(obj), indent=2, allow_nan=False)
    return atomic_write_bytes(path, (text + "\n").encode())


def _fmt(stat: Mapping[str, float], digits: int) -> str:
    mean = stat.get("mean")
    if mean is None or not math.isfinite(mean):
        return "n/a"
    if stat.get("n", 0) > 1:
        return f"{mean:.{digits}f} ± {stat['std']:.{digits}f}"
    return f"{mean:.{digits}f}"


def markdown_table(
    summary: Mapping[str, Mapping[str, Mapping[str, float]]], metrics: Sequence[str] | None = None, *, digits: int = 3
) -> str:
    """Markdown table, one row per source, ``mean ± std`` over seeds per metric."""
    if metrics is None:
        metrics = [m for m in DETECTION_METRICS if any(m in s for s in summary.values())]
    header = "| Source | " + " | ".join(METRIC_LABELS.get(m, m) for m in metrics) + " |"
    rule = "|---|" + "---:|" * len(metrics)
    rows = [
        f"| {source} | " + " | ".join(_fmt(stats.get(m, {}), digits) for m in metrics) + " |"
        for source, stats in summary.items()
    ]
    return "\n".join([header, rule, *rows])


def mean_over_generators(per_generator: list[dict[str, dict]]) -> dict[str, dict]:
    """Generation / judge metrics of each generator merged: per source the mean over generators,
    ``<metric>_std`` (over generators, ddof 1; it replaces a metric's own ``_std``, e.g. KID's
    over subsets) when more than one has it, and the per-generator values under
    ``per_generator``; ``skipped`` from the first."""
    if len(per_generator) == 1:
        return per_generator[0]
    merged: dict[str, dict] = {}
    for name in dict.fromkeys(n for g in per_generator for n in g):
        parts = [g[name] for g in per_generator if name in g]
        keys = dict.fromkeys(k for p in parts for k in p.get("metrics", {}) if not k.endswith("_std"))
        metrics = {}
        for key in keys:
            values = np.array([p["metrics"][key] for p in parts
                               if isinstance(p.get("metrics", {}).get(key), (int, float))], dtype=float)
            values = values[np.isfinite(values)]  # none left: e.g. CutPaste's right-kind rate (no kind)
            metrics[key] = float(values.mean()) if values.size else math.nan
            if values.size > 1:
                metrics[f"{key}_std"] = float(values.std(ddof=1))
        merged[name] = {"metrics": metrics, "skipped": parts[0].get("skipped", {}),
                        "per_generator": [p.get("metrics", {}) for p in parts]}
    return merged


def generation_table(generation_by_source: Mapping[str, Mapping[str, Any]], *, digits: int = 3) -> str:
    """Markdown table of generation metrics, one row per source; skipped metrics show "skipped"."""
    names: list[str] = []
    for result in generation_by_source.values():
        for name in [*result.get("metrics", {}), *result.get("skipped", {})]:
            if name not in names and not name.endswith("_std"):
                names.append(name)
    header = "| Source | " + " | ".join(names) + " |"
    rule = "|---|" + "---:|" * len(names)
    rows = []
    for source, result in generation_by_source.items():
        cells = []
        for name in names:
            value = result.get("metrics", {}).get(name)
            if name in result.get("skipped", {}):
                cells.append("skipped")
            elif value is None or not math.isfinite(value):
                cells.append("n/a")
            else:
                std = result["metrics"].get(f"{name}_std")
                cells.append(f"{value:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else ""))
        rows.append(f"| {source} | " + " | ".join(cells) + " |")
    return "\n".join([header, rule, *rows])


# --------------------------------------------------------------------------- figures


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save_figure(fig, path: str | Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    return atomic_write_bytes(path, buffer.getvalue())


def save_metric_bars(
    summary: Mapping[str, Mapping[str, Mapping[str, float]]], path: str | Path, metrics: Sequence[str] | None = None
) -> Path:
    """Grouped bar chart: one group per metric, one bar per source, error bars = std over seeds."""
    if metrics is None:
        metrics = [m for m in DETECTION_METRICS if any(m in s for s in summary.values())]
    sources = list(summary)
    if not sources or not metrics:
        raise ValueError("summary must hold at least one source and one metric")
    fig = _figure(max(6.0, 1.3 * len(metrics) + 2), 4.0)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(sources)
    x = np.arange(len(metrics))
    for k, source in enumerate(sources):
        means = [summary[source].get(m, {}).get("mean", math.nan) for m in metrics]
        stds = [summary[source].get(m, {}).get("std", 0.0) for m in metrics]
        means = [0.0 if v is None or not math.isfinite(v) else v for v in means]
        stds = [0.0 if v is None or not math.isfinite(v) else v for v in stds]
        ax.bar(x + (k - (len(sources) - 1) / 2) * width, means, width, yerr=stds, capsize=2, label=source)
    ax.set_xticks(x)
    ax.set_xticklabels([METRIC_LABELS.get(m, m) for m in metrics], rotation=30, ha="right")
    ax.set_ylim(0.0, 1.05)
    ax.axhline(0.5, color="gray", linewidth=0.6, linestyle="--")
    ax.set_ylabel("mean over seeds (± std)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", title="source")
    ax.set_title("Downstream detector trained on each synthetic-data source")
    return _save_figure(fig, path)


def _to_display(image: torch.Tensor) -> np.ndarray:
    """(3,H,W) in [-1, 1] -> (H,W,3) in [0, 1]."""
    return ((image.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()


def save_sample_grid(
    images_by_source: Mapping[str, torch.Tensor | None],
    masks_by_source: Mapping[str, torch.Tensor | None] | None,
    path: str | Path,
    *,
    max_per_source: int = 8,
    overlay_alpha: float = 0.2,
) -> Path:
    """Grid of samples, one row per source, masks overlaid in red with their outline.

    Args:
        images_by_source: source -> (N,3,H,W) images in [-1, 1] (None/empty rows are skipped).
        masks_by_source: source -> (N,1,H,W) masks in [0, 1], or None (no overlay).
        path: PNG to write.
        max_per_source: columns (first images of each source).
        overlay_alpha: opacity of the red mask fill.
    """
    from matplotlib.colors import ListedColormap

    rows = [(s, x) for s, x in images_by_source.items() if x is not None and x.shape[0] > 0]
    if not rows:
        raise ValueError("images_by_source must hold at least one non-empty source")
    for source, x in rows:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"images_by_source[{source!r}] must have shape (N,3,H,W), got {tuple(x.shape)}")
    cols = min(max_per_source, max(x.shape[0] for _, x in rows))
    fig = _figure(1.3 * cols + 1.2, 1.3 * len(rows) + 0.3)
    red = ListedColormap(["red"])
    for r, (source, x) in enumerate(rows):
        masks = None if masks_by_source is None else masks_by_source.get(source)
        for c in range(cols):
            ax = fig.add_subplot(len(rows), cols, r * cols + c + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(source, rotation=0, ha="right", va="center")
            if c >= x.shape[0]:
                ax.axis("off")
                continue
            ax.imshow(_to_display(x[c]), interpolation="nearest")
            if masks is not None and c < masks.shape[0]:
                m = masks[c, 0].detach().float().cpu().numpy()
                if m.max() > 0.5:
                    ax.imshow(np.ma.masked_less(m, 0.5), cmap=red, alpha=overlay_alpha, vmin=0, vmax=1,
                              interpolation="nearest")
                    if m.min() < 0.5:
                        ax.contour(m, levels=[0.5], colors="red", linewidths=0.6)
    fig.subplots_adjust(wspace=0.05, hspace=0.05)
    return _save_figure(fig, path)


# --------------------------------------------------------------------------- the whole report


def write_report(
    out_dir: str | Path,
    downstream: Mapping[str, Any],
    *,
    generation_by_source: Mapping[str, Mapping[str, Any]] | None = None,
    images_by_source: Mapping[str, torch.Tensor | None] | None = None,
    masks_by_source: Mapping[str, torch.Tensor | None] | None = None,
    title: str = "Synthetic anomalies: downstream comparison",
    prefix: str = "eval",
) -> dict[str, Path]:
    """Write ``<prefix>_report.json``, ``<prefix>_report.md``, ``<prefix>_metrics.png``
    and (with samples) ``<prefix>_samples.png`` into ``out_dir``.

    Args:
        out_dir: run folder (created if needed).
        downstream: ``downstream_comparison`` output, or a bare ``{source: [per-seed dict]}``.
        generation_by_source: source -> ``generation_metrics`` output (optional).
        images_by_source, masks_by_source: samples for the grid (optional).
        title: Markdown heading.
        prefix: file name prefix.

    Returns:
        name -> written path (keys "json", "markdown", "metrics_png", "samples_png").
    """
    out_dir = Path(out_dir)
    results = downstream.get("results", downstream) if isinstance(downstream, Mapping) else None
    if not isinstance(results, Mapping) or not results:
        raise ValueError("downstream must be downstream_comparison's output or a non-empty {source: [runs]} mapping")
    settings = downstream.get("settings", {}) if "results" in downstream else {}
    summary = summarize(results)
    paths = {}
    paths["json"] = write_json(out_dir / f"{prefix}_report.json", {
        "summary": summary, "results": results, "settings": settings,
        "generation": generation_by_source or {},
    })
    lines = [f"# {title}", ""]
    if settings:
        lines += [
            f"Seeds {settings.get('seeds')}, {settings.get('steps')} steps, batch {settings.get('batch_size')}, "
            f"{settings.get('n_normal_train')} normal training images, {settings.get('n_test')} test images "
            f"at {settings.get('image_size')} px.", "",
        ]
    gens = settings.get("generator_seeds", 1)
    over = f"{gens} generators x detector seeds" if gens > 1 else "seeds"
    lines += [f"## Downstream detector (mean ± std over {over})", "", markdown_table(summary), ""]
    if generation_by_source:
        lines += [f"## Generation metrics{f' (mean ± std over {gens} generators)' if gens > 1 else ''}", "",
                  generation_table(generation_by_source), ""]
        notes = {(n, msg) for g in generation_by_source.values() for n, msg in g.get("skipped", {}).items()}
        if notes:
            lines += ["Skipped:", ""] + [f"- {n}: {msg}" for n, msg in sorted(notes)] + [""]
    paths["markdown"] = atomic_write_bytes(out_dir / f"{prefix}_report.md", "\n".join(lines).encode())
    paths["metrics_png"] = save_metric_bars(summary, out_dir / f"{prefix}_metrics.png")
    if images_by_source:
        paths["samples_png"] = save_sample_grid(images_by_source, masks_by_source, out_dir / f"{prefix}_samples.png")
    return paths
