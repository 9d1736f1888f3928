"""Does APO beat the best other source beyond the seeds' spread? One verdict per detection metric.
"""

import logging
import math

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- verdict


def compare_sources(summary: dict, target: str = "apo") -> dict:
    """How ``target`` fares against the best other source on every detection metric (higher is better).

    Returns:
        ``{"target": target, "metrics": {metric: {target_mean, target_std, best_other,
        best_other_mean, best_other_std, margin, wins, beyond_spread}}, "wins": k, "of": n,
        "sentence": str}``;
        ``beyond_spread``: the margin exceeds the sum of the two stds over seeds.
    """
    from apo_fast.eval.detection import DETECTION_METRICS

    if target not in summary or len(summary) < 2:
        return {"target": target, "metrics": {}, "wins": 0, "of": 0,
                "sentence": f"no comparison: {target!r} and another source needed"}
    rows = {}
    for metric in DETECTION_METRICS:
        mine = summary[target].get(metric, {})
        others = [(s, v[metric]) for s, v in summary.items() if s != target and metric in v
                  and v[metric].get("mean") is not None and math.isfinite(v[metric]["mean"])]
        if mine.get("mean") is None or not math.isfinite(mine["mean"]) or not others:
            continue
        best, stat = max(others, key=lambda kv: kv[1]["mean"])
        margin = mine["mean"] - stat["mean"]
        spread = (mine.get("std") or 0.0) + (stat.get("std") or 0.0)
        rows[metric] = {
            "target_mean": mine["mean"], "target_std": mine.get("std"), "best_other": best,
            "best_other_mean": stat["mean"], "best_other_std": stat.get("std"), "margin": margin,
            "wins": margin > 0, "beyond_spread": abs(margin) > spread and mine.get("n", 0) > 1,
        }
    wins = [m for m, r in rows.items() if r["wins"]]
    clear = [m for m in wins if rows[m]["beyond_spread"]]
    losses_clear = [m for m, r in rows.items() if not r["wins"] and r["beyond_spread"]]
    if not rows:
        sentence = "no comparison: no finite metric"
    else:
        sentence = f"{target} has the best mean on {len(wins)} of {len(rows)} detection metrics"
        sentence += f" ({', '.join(wins)})" if wins else ""
        if any(summary[target][m].get("n", 0) > 1 for m in rows):
            sentence += f"; beyond the seed spread on {len(clear)}" if wins else ""
        else:
            sentence += " (one seed: no spread to judge the margins by)"
        if losses_clear:
            behind = ", ".join(f"{m} ({rows[m]['best_other']})" for m in losses_clear)
            sentence += f"; clearly behind on {behind}"
        sentence += "."
    return {"target": target, "metrics": rows, "wins": len(wins), "of": len(rows), "sentence": sentence}


def margin_lines(verdict: dict) -> list[str]:
    from apo_fast.eval.report import METRIC_LABELS

    lines = []
    for metric, r in verdict["metrics"].items():
        note = ", beyond the seed spread" if r["beyond_spread"] else ""
        lines.append(
            f"- {METRIC_LABELS.get(metric, metric)}: {verdict['target']} {r['target_mean']:.3f} ± {r['target_std'] or 0:.3f}, "
            f"best other {r['best_other']} {r['best_other_mean']:.3f} ± {r['best_other_std'] or 0:.3f} "
            f"({r['margin']:+.3f}{note})"
        )
    return lines


