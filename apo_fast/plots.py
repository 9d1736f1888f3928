"""Training curves as a PNG (matplotlib, no display needed)."""
from __future__ import annotations

import json
from pathlib import Path


def _smooth(values: list[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= k:
            acc -= values[i - k]
        out.append(acc / min(i + 1, k))
    return out


def plot_training(log_path: str | Path, out_png: str | Path, pretrain_log: str | Path | None = None) -> Path:
    """Loss, implicit accuracy, residual errors and implicit reward over the steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    recs = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    if not recs:
        raise ValueError(f"{log_path} holds no training records to plot")
    steps = [r["step"] for r in recs]
    k = max(1, len(recs) // 20)
    panels = 4 + (1 if pretrain_log else 0)
    fig, axes = plt.subplots(1, panels, figsize=(4 * panels, 3.2))
    ax = axes[0]
    ax.plot(steps, [r["loss"] for r in recs], alpha=0.3, color="C0")
    ax.plot(steps, _smooth([r["loss"] for r in recs], k), color="C0")
    ax.set_title("APO loss")
    ax = axes[1]
    ax.plot(steps, _smooth([r["implicit_acc"] for r in recs], k), color="C1")
    ax.axhline(0.5, ls="--", color="gray", lw=0.8)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("implicit accuracy")
    ax = axes[2]
    ax.plot(steps, _smooth([r["e_theta"] for r in recs], k), label="policy e_theta")
    ax.plot(steps, _smooth([r["e_ref"] for r in recs], k), label="reference e_ref")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("weighted residual error")
    ax = axes[3]
    ax.plot(steps, _smooth([r["reward_w"] for r in recs], k), label="reward (anomalies)")
    if "reward_l" in recs[0]:
        ax.plot(steps, _smooth([r["reward_l"] for r in recs], k), label="reward (normals)")
    ax.legend(fontsize=8)
    ax.set_title("implicit reward -beta_t*delta")
    if pretrain_log:
        pre = [json.loads(line) for line in Path(pretrain_log).read_text().splitlines() if line.strip()]
        ax = axes[4]
        ax.plot([r["step"] for r in pre], [r["loss_ema"] for r in pre], color="C2")
        ax.set_yscale("log")
        ax.set_title("base model loss (normals)")
    return _save(fig, axes, out_png)


def plot_pretrain(log_path: str | Path, out_png: str | Path) -> Path:
    """The base model's loss (raw and smoothed) and learning rate over the steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    recs = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    if not recs:
        raise ValueError(f"{log_path} holds no pretraining records to plot")
    steps = [r["step"] for r in recs]
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3.2))
    a.plot(steps, [r["loss"] for r in recs], alpha=0.25, color="C2")
    a.plot(steps, [r["loss_ema"] for r in recs], color="C2")
    a.set_yscale("log")
    a.set_title("base model loss (normal images)")
    b.plot(steps, [r.get("lr", float("nan")) for r in recs], color="C3")
    b.set_title("learning rate")
    return _save(fig, (a, b), out_png)


def _save(fig, axes, out_png: str | Path) -> Path:
    """Label every panel's step axis, add a grid, write the PNG atomically, close the figure."""
    import matplotlib.pyplot as plt

    from apo_fast.io_utils import atomic_save

    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_save(out_png, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return Path(out_png)
