"""The step benchmark's reports: Markdown table, bar chart, JSON (atomic writes).
"""
from __future__ import annotations

import math
from pathlib import Path

from apo_fast.bench.step_config import PHASES
from apo_fast.io_utils import atomic_save

# --------------------------------------------------------------------------- reports


def _precision_label(mixed_precision: str) -> str:
    """``no`` (the trainers' setting) reads as ``fp32`` in reports."""
    return "fp32" if mixed_precision == "no" else mixed_precision


def _fmt(value, spec: str = ".3g") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and not math.isfinite(value):
        return "n/a"
    return format(value, spec)


def to_markdown(result: dict) -> str:
    """A Markdown report: the setup, one table of both sides and the ratios, the notes."""
    c, m = result["config"], result["machine"]
    a, b, r = result["apo_fast"], result["baseline"], result["ratios"]
    where = m.get("gpu") or f"{m.get('cpu_count')}-core CPU ({m.get('platform')})"
    load = ""
    if m.get("load_avg_at_start") and m.get("load_avg_1_5_15"):
        load = f"; load average {m['load_avg_at_start'][0]:.1f} at start, {m['load_avg_1_5_15'][0]:.1f} at end"
    sa, sb = a["step_time_s"], b["step_time_s"]
    lines = [
        (
            f"### Step benchmark: {c['model']}, {c['pixel_size']} px, batch {c['batch']} pairs, rank {c['r']}, "
            f"{_precision_label(c['mixed_precision'])}"
        ),
        "",
        (
            f"- {result['date']} on {where}; torch {m.get('torch')}, {c.get('steps_done', c['steps'])} timed steps "
            f"per side after {c['warmup']} warmup, interleaved; torch threads {m.get('torch_threads')}{load}"
        ),
        "",
        "| metric | apo-fast | baseline | apo-fast / baseline |",
        "|---|---:|---:|---:|",
        (
            f"| samples/s (images) | {_fmt(a['samples_per_s'])} | {_fmt(b['samples_per_s'])} | "
            f"**{_fmt(r['samples_per_s'])}** |"
        ),
        (
            f"| step time median (ms) | {_fmt(sa['median'] * 1e3)} | {_fmt(sb['median'] * 1e3)} | "
            f"{_fmt(r['step_time_median'])} |"
        ),
        (
            f"| step time mean +- sd (ms) | {_fmt(sa['mean'] * 1e3)} +- {_fmt(sa['stdev'] * 1e3, '.2g')} | "
            f"{_fmt(sb['mean'] * 1e3)} +- {_fmt(sb['stdev'] * 1e3, '.2g')} | {_fmt(r['step_time_mean'])} |"
        ),
    ]
    pr = r.get("step_time_paired")
    if pr:
        lines.append(
            f"| step time, per-round ratio median [quartiles] | | | {_fmt(pr['median'])} "
            f"[{_fmt(pr['p25'])}, {_fmt(pr['p75'])}] |"
        )
    for p in PHASES:
        lines.append(
            f"| - {p} (ms) | {_fmt(a['breakdown_s'][p] * 1e3)} | {_fmt(b['breakdown_s'][p] * 1e3)} | "
            f"{_fmt(r['breakdown'][p])} |"
        )
    lines.append(
        f"| peak memory (MiB) | {_fmt(a['peak_memory_mib'], '.1f')} | {_fmt(b['peak_memory_mib'], '.1f')} | "
        f"{_fmt(r['peak_memory'])} |"
    )
    for key, label in (("telemetry_util_pct_mean", "GPU util (%)"), ("telemetry_power_w_mean", "power (W)")):
        if key in a or key in b:
            lines.append(f"| {label} | {_fmt(a.get(key))} | {_fmt(b.get(key))} | |")
    lines += ["", f"Peak memory: {a['peak_memory_kind']}.", "", "Notes:"]
    lines += [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def plot_result(result: dict, path: str | Path) -> Path:
    """Bar chart PNG: stacked step-time breakdown, samples/s and peak memory of both sides."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["apo-fast", "baseline"]
    sides = [result["apo_fast"], result["baseline"]]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    ax = axes[0]
    left = [0.0, 0.0]
    for i, p in enumerate(PHASES):
        widths = [s["breakdown_s"][p] * 1e3 for s in sides]
        ax.barh(labels, widths, left=left, color=f"C{i}", label=p)
        left = [lft + w for lft, w in zip(left, widths)]
    ax.set_xlabel("ms per step")
    ax.set_title("step time breakdown")
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    ax = axes[1]
    ax.bar(labels, [s["samples_per_s"] for s in sides], color=["C0", "C7"])
    ax.set_title(f"samples/s (x{result['ratios']['samples_per_s']:.2f})")
    ax = axes[2]
    mem = [s["peak_memory_mib"] or 0.0 for s in sides]
    ax.bar(labels, mem, color=["C0", "C7"])
    ax.set_title("peak memory (MiB)" + ("" if result["ratios"]["peak_memory"] is not None else ", process RSS"))
    c = result["config"]
    fig.suptitle(
        f"{c['model']} {c['pixel_size']}px, batch {c['batch']} pairs, rank {c['r']}, "
        f"{_precision_label(c['mixed_precision'])}, "
        f"{result['machine'].get('gpu') or 'CPU'}",
        fontsize=10,
    )
    fig.tight_layout()
    path = Path(path)
    atomic_save(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def write_reports(result: dict, output_dir: str | Path, stem: str = "bench") -> dict[str, str]:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` into ``output_dir``; returns their paths."""
    from apo_fast.io_utils import atomic_write_json, atomic_write_text

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": str(out / f"{stem}.json"), "markdown": str(out / f"{stem}.md"), "png": str(out / f"{stem}.png")}
    result = {**result, "files": files}
    atomic_write_json(Path(files["json"]), result)
    atomic_write_text(Path(files["markdown"]), to_markdown(result))
    plot_result(result, files["png"])
    return files


