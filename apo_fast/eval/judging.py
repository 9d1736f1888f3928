"""The fidelity judge in the evaluation: trained on the held-out real crops, scoring each source's
anomalies (right kind, looks like the product, KID), and the picture of every kind beside the real ones.
"""

import logging
from pathlib import Path

import torch

from apo_fast.eval.eval_data import EvalData, held_out_defects
from apo_fast.eval.synthetic import GENERATED_SOURCES

log = logging.getLogger(__name__)

#: the per-kind table's row of real anomalies: the few-shot training third, which the judge never saw
REAL_ROW = "real (training anomalies)"


def judge_sources(data: EvalData, synthetic_by_generator: list[dict], ecfg, generation: dict) -> dict:
    """Train the fidelity judge (:mod:`apo_fast.eval.judge`) once, on the held-out real anomalies
    and test/good images, score every generator's anomalies (per source, and per mode for the
    generated sources) and add the metrics to ``generation``: with several generators their
    mean, ``<metric>_std`` over generators and ``judge_per_generator``. Returns the judge's
    classes, crop size and validation accuracy."""
    from apo_fast.data import category_augment
    from apo_fast.eval.report import mean_over_generators
    from apo_fast.eval.judge import judge_metrics, mask_crops, right_kind_by_kind, train_judge

    held = data.test_labels == 1
    good = data.test_images[~held]
    if good.shape[0] < 2:  # too few test/good images: the normal training images stand in
        good = data.normal_train
    judge = train_judge(data.test_images[held], data.test_masks[held], held_out_defects(data), good, data.defects,
                        steps=ecfg.judge_steps, seed=ecfg.sample_seed,
                        texture=category_augment(data.category, data.normal_train) == "dihedral")
    real = mask_crops(data.test_images[held], data.test_masks[held], judge.crop)
    scored = []
    # "apo (guided)" -> kind -> [right, made], all generators; first the real training anomalies
    # (APO trained on them, the judge never saw them): how often the judge knows a real one
    real_train = right_kind_by_kind(judge, judge.kinds(data.train_anomalies, data.train_masks), data.train_defects)
    by_kind: dict[str, dict[str, list[int]]] = {REAL_ROW: {k: [v["right"], v["n"]] for k, v in real_train.items()}}
    for synthetic in synthetic_by_generator:
        scores: dict[str, dict] = {}
        for source, syn in synthetic.items():
            if syn is None:
                continue
            parts = {source: list(range(len(syn.modes)))}
            if source in GENERATED_SOURCES:
                parts.update({f"{source} ({m})": [i for i, x in enumerate(syn.modes) if x == m]
                              for m in ("guided", "free")})
            for name, rows in parts.items():
                if len(rows) < 2:
                    continue
                defects = [syn.defects[i] for i in rows]
                predicted = judge.kinds(syn.images[rows], syn.masks[rows])
                metrics = judge_metrics(judge, syn.images[rows], syn.masks[rows], defects, real,
                                        kid_subsets=ecfg.kid_subsets, seed=ecfg.sample_seed, predicted=predicted)
                scores[name] = {"metrics": metrics}
                if name.endswith(("(guided)", "(free)")):
                    per = right_kind_by_kind(judge, predicted, defects)
                    for kind, v in per.items():
                        cell = by_kind.setdefault(name, {}).setdefault(kind, [0, 0])
                        cell[0] += v["right"]
                        cell[1] += v["n"]
        scored.append(scores)
    for name, merged in mean_over_generators(scored).items():
        entry = generation.setdefault(name, {"metrics": {}, "skipped": {}})
        entry["metrics"].update(merged["metrics"])
        if "per_generator" in merged:
            entry["judge_per_generator"] = merged["per_generator"]
    return {"classes": judge.classes, "crop": judge.crop, "val_accuracy": judge.val_accuracy,
            "trained_on": {"anomalies": int(held.sum()), "good": int(good.shape[0])},
            "generators": len(synthetic_by_generator), "right_kind_by_kind": by_kind}


def judge_lines(record: dict | None) -> list[str]:
    if not record:
        return []
    acc = ", ".join(f"{k} {v:.2f}" for k, v in record["val_accuracy"].items())
    return [
        "## Fidelity judge", "",
        (f"A classifier of {', '.join(record['classes'])} on {record['crop']} px crops, trained on the "
         f"{record['trained_on']['anomalies']} held-out real anomalies and {record['trained_on']['good']} good "
         "images (never on what APO trained on). `judge_right_kind`: generated anomalies whose mask crop it "
         "calls the kind they were made for; `judge_defect`: any defect kind; `judge_product`: images it "
         "calls the product rather than `other`; `judge_kid`: KID of its features, generated vs real "
         "held-out defect crops (lower is closer)."),
        f"Its accuracy on a held-back quarter of its real crops: {acc}.", "",
        *_by_kind_lines(record.get("right_kind_by_kind") or {}),
    ]


def _by_kind_lines(by_kind: dict) -> list[str]:
    """Right kind per defect kind: which kinds a source draws and which it misses."""
    kinds = sorted({k for per in by_kind.values() for k in per})
    if not kinds:
        return []
    lines = ["Right kind per defect kind (generated anomalies the judge calls the kind they were made for, "
             f"all generators together; `{REAL_ROW}`: the real few-shot anomalies the generators trained on and "
             "the judge never saw, the most a generator can expect from this judge):", "",
             "| Source | " + " | ".join(kinds) + " |", "|---|" + "---:|" * len(kinds)]
    for name, per in by_kind.items():
        cells = [f"{per[k][0]}/{per[k][1]}" if k in per else "-" for k in kinds]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def save_kind_sheet(path: Path, data: EvalData, synthetic: dict, per_row: int = 6) -> Path:
    """One picture per product: for each defect kind, real held-out anomalies, then each source's
    guided and free anomalies of that kind (CutPaste's: any), mask outlines in red."""
    from apo_fast.sampling.images import save_grid

    held = data.test_labels == 1
    kinds = held_out_defects(data)
    rows: dict[str, torch.Tensor] = {}
    outlines: dict[str, torch.Tensor] = {}
    for kind in data.defects:
        idx = [i for i, k in enumerate(kinds) if k == kind][:per_row]
        if idx:
            rows[f"{kind}: real"] = data.test_images[held][idx]
            outlines[f"{kind}: real"] = data.test_masks[held][idx]
        for source, syn in synthetic.items():
            if syn is None:
                continue
            # a generated source (apo, lora, an ablation's variant) has guided and free anomalies
            generated = source in GENERATED_SOURCES or bool({"guided", "free"} & set(syn.modes))
            modes = ("guided", "free") if generated else ("cutpaste",)
            for mode in modes:
                sel = [i for i, (d, m) in enumerate(zip(syn.defects, syn.modes))
                       if m == mode and (d == kind or not generated)][:per_row]
                if sel:
                    label = f"{kind}: {source}" + (f" {mode}" if generated else "")
                    rows[label], outlines[label] = syn.images[sel], syn.masks[sel]
    save_grid(rows, path, outlines=outlines)
    return path


