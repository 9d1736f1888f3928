"""Does APO beat the best other source beyond the seeds' spread? One verdict per detection metric.

Two views of the same runs. The unpaired one (:func:`compare_sources`) sets each source's
mean against the sum of the two stds over every (generator, detector seed) run: a
conservative test, since a generator seed that makes a hard synthetic set hurts APO and
plain LoRA alike (they share the base, the training seed and the detector seed). The paired
one (:func:`paired_margins`) takes the difference run by run, matched on (generator seed,
detector seed), so that shared variance cancels; it reports how many matched runs the
target wins, the differences' mean and std, and a one-sided sign test (which takes the runs
as independent: the detector seeds of one generator share its synthetic set, so the test is
optimistic when there are few generators).
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


# --------------------------------------------------------------------------- paired


def _sign_test_p(wins: int, n: int) -> float:
    """One-sided sign test: P(at least ``wins`` of ``n`` fair coin flips come up heads)."""
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2 ** n


def paired_margins(results: dict, target: str = "apo") -> dict:
    """The target minus every other source, run by run, matched on (generator seed, detector seed).

    Args:
        results: ``{source: [{"seed", "generator_seed" (optional, 0), metric: value, ...}]}``
            as :func:`~apo_fast.eval.downstream.downstream_comparison` writes them.

    Returns:
        ``{metric: {source: {"n", "wins", "mean", "std", "p_sign"}}}`` over the matched runs
        whose two values are finite (``std`` is the sample std of the differences, 0 for one
        pair; ``p_sign`` the one-sided sign-test p-value of ``wins`` of ``n``; a tie counts as
        a loss). A source with no matched run is left out.
    """
    from apo_fast.eval.detection import DETECTION_METRICS

    def key(row):
        return (int(row.get("generator_seed", 0)), int(row["seed"]))

    def finite(x):
        return isinstance(x, (int, float)) and math.isfinite(x)

    mine = {key(r): r for r in results.get(target, [])}
    out: dict = {}
    for metric in DETECTION_METRICS:
        for source, runs in results.items():
            if source == target:
                continue
            diffs = [mine[key(r)][metric] - r[metric] for r in runs
                     if key(r) in mine and finite(r.get(metric)) and finite(mine[key(r)].get(metric))]
            if not diffs:
                continue
            n = len(diffs)
            mean = sum(diffs) / n
            std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1)) if n > 1 else 0.0
            wins = sum(d > 0 for d in diffs)
            out.setdefault(metric, {})[source] = {"n": n, "wins": wins, "mean": mean, "std": std,
                                                  "p_sign": _sign_test_p(wins, n)}
    return out


def paired_lines(paired: dict, target: str = "apo") -> list[str]:
    """A markdown table of :func:`paired_margins`: one row per metric, one column per other source."""
    from apo_fast.eval.report import METRIC_LABELS

    sources = sorted({s for by_source in paired.values() for s in by_source})
    if not sources:
        return []
    lines = [f"Paired: {target} minus each source, run by run (same generator seed and detector seed); "
             "mean ± std of the differences, matched runs won, one-sided sign-test p (it takes the runs "
             "as independent; detector seeds of one generator share its synthetic set, so read p as a "
             "lower bound):", "",
             "| Metric | " + " | ".join(f"vs {s}" for s in sources) + " |",
             "|---|" + "---:|" * len(sources)]
    for metric, by_source in paired.items():
        cells = []
        for s in sources:
            c = by_source.get(s)
            cells.append("n/a" if c is None else
                         f"{c['mean']:+.3f} ± {c['std']:.3f} ({c['wins']}/{c['n']}, p={c['p_sign']:.3f})")
        lines.append(f"| {METRIC_LABELS.get(metric, metric)} | " + " | ".join(cells) + " |")
    return lines
