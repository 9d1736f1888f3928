"""Ablations for "does APO learn the defect?": train variants from one base, judge their anomalies.

    python tools/fidelity_ablation.py --base apo_fast/assets/demo_base/brick --out runs/ablate \\
        --variant default --variant "sft=loss.lambda_sft=1.0" --variant "lora=loss.mode=diffusion,adapter.gate.kind=constant"

Each ``--variant NAME=KEY=VALUE,KEY=VALUE`` (``default``: no override) trains an APO
run on the demo config from the given base, generates ``--num`` anomalies per defect
kind (half mask-guided on normal images, half free, as ``apo-fast eval`` does), and
scores them with the fidelity judge (:mod:`apo_fast.eval.judge`, trained once on the
held-out real anomalies). Writes ``<out>/ablation.md`` (one row per variant: right-kind
rate guided/free, looks-like-the-product rate, judge KID, the last-20 training loss,
wall time, right-kind counts per kind) and ``<out>/<variant>/kinds.png`` (real and generated anomalies per kind).

``sample.*`` overrides change sampling only: a variant whose other overrides equal an
earlier variant's (same seed) samples that variant's trained run instead of training
again (``train_s`` is then 0), e.g. ``--variant const600=... --variant
"const600_sa4=...,sample.s_align=4"``. A run folder that already holds trained adapters
is reused too.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def parse_variant(text: str) -> tuple[str, list[str]]:
    if "=" not in text:
        return text, []
    name, rest = text.split("=", 1)
    parts, depth, cur = [], 0, ""
    for ch in rest:  # split on the commas outside brackets: a [list]'s (or [[a, b], ...]'s) stay
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return name, [kv for kv in [*parts, cur] if kv]


def base_product_rate(cfg, base: Path, data, judge, num: int = 32) -> float:
    """The share of the base's own free samples (normal condition, no adapters) the judge calls the product."""
    import torch
    from diffusers import UNet2DConditionModel

    from apo_fast.eval.judge import judge_metrics
    from apo_fast.models import pooled_dim
    from apo_fast.models.conditions import load_conditions
    from apo_fast.training.pretrain import sample_product

    unet = UNet2DConditionModel.from_pretrained(str(base / "base_unet")).eval()
    names = [f"{data.category}/good", *[f"{data.category}/{d}" for d in data.defects]]
    conds = load_conditions(base / "base_conditions.safetensors", names, cfg.model.cond_tokens,
                            unet.config.cross_attention_dim, pooled_dim(unet))
    images = sample_product(unet, conds, cfg, 0, num, seed=123)
    masks = torch.zeros(num, 1, *images.shape[-2:])
    return judge_metrics(judge, images, masks, [data.defects[0]] * num)["judge_product"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="a pretrained base folder (base_unet/, base_conditions.safetensors)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--variant", action="append", required=True, help="NAME or NAME=KEY=VALUE,KEY=VALUE")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="applied to every variant")
    ap.add_argument("--num", type=int, default=8, help="anomalies per defect kind (half guided, half free)")
    ap.add_argument("--seed", type=int, action="append", help="training seeds (repeatable; default 0)")
    args = ap.parse_args(argv)

    import torch

    from apo_fast.demo import _tail_mean, demo_config
    from apo_fast.eval.eval_data import held_out_defects, load_eval_data
    from apo_fast.eval.judge import judge_metrics, mask_crops, right_kind_by_kind, train_judge
    from apo_fast.eval.judging import save_kind_sheet
    from apo_fast.eval.synthetic import generate_synthetic
    from apo_fast.training.trainer import APOTrainer

    torch.set_num_threads(1)
    base = Path(args.base)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    judge = data = real = None
    trained: dict[tuple, Path] = {}  # (training overrides, seed) -> the run folder trained with them
    for text in args.variant:
        name, sets = parse_variant(text)
        train_key = tuple(sorted(kv for kv in sets if not kv.startswith("sample.")))
        for seed in args.seed or [0]:
            run = trained.get((train_key, seed), out / f"{name}-seed{seed}")
            trained.setdefault((train_key, seed), run)
            cfg = demo_config(str(run), [f"model.pretrained={base / 'base_unet'}", "model.subfolder=",
                                         f"model.conditions={base / 'base_conditions.safetensors'}",
                                         "train.progress=false", f"train.seed={seed}", *args.overrides, *sets])
            if data is None:
                data = load_eval_data(cfg)
                held = data.test_labels == 1
                judge = train_judge(data.test_images[held], data.test_masks[held], held_out_defects(data),
                                    data.test_images[~held], data.defects, steps=400, seed=0)
                real = mask_crops(data.test_images[held], data.test_masks[held], judge.crop)
                base_rate = base_product_rate(cfg, base, data, judge)
                print(json.dumps({"base_product_rate": base_rate, "judge_val_accuracy": judge.val_accuracy}),
                      flush=True)
            start = time.perf_counter()
            if not (run / "adapters" / "conditions.safetensors").is_file():
                trainer = APOTrainer(cfg)
                try:
                    trainer.train()
                finally:
                    trainer.close()
            train_s = time.perf_counter() - start
            ecfg = cfg.eval
            ecfg.num_per_defect = args.num
            syn = generate_synthetic(run, data, ecfg, device="cpu", sample=cfg.sample)
            row = {"variant": name, "seed": seed, "overrides": sets, "train_s": round(train_s, 1),
                   "loss_last20": _tail_mean(run / "train_log.jsonl", "loss", 20),
                   "acc_last20": _tail_mean(run / "train_log.jsonl", "implicit_acc", 20)}
            for mode in ("guided", "free"):
                sel = [i for i, m in enumerate(syn.modes) if m == mode]
                defects = [syn.defects[i] for i in sel]
                predicted = judge.kinds(syn.images[sel], syn.masks[sel])
                m = judge_metrics(judge, syn.images[sel], syn.masks[sel], defects, real, kid_subsets=20,
                                  predicted=predicted)
                row.update({f"{k}_{mode}": v for k, v in m.items()})
                per = right_kind_by_kind(judge, predicted, defects)
                row[f"per_kind_{mode}"] = per
                row[f"right_of_{mode}"] = ", ".join(f"{k} {v['right']}/{v['n']}" for k, v in per.items())
            sheet = out / f"{name}-seed{seed}" / "kinds.png"
            sheet.parent.mkdir(parents=True, exist_ok=True)
            save_kind_sheet(sheet, data, {name: syn})
            rows.append(row)
            print(json.dumps(row), flush=True)
    (out / "ablation.json").write_text(json.dumps({"judge_val_accuracy": judge.val_accuracy,
                                                   "base_product_rate": base_rate, "rows": rows}, indent=2))
    cols = ["judge_right_kind_guided", "judge_right_kind_free", "judge_product_free", "judge_kid_guided",
            "loss_last20", "acc_last20", "train_s", "right_of_guided", "right_of_free"]
    lines = ["| variant | seed | " + " | ".join(cols) + " |", "|---|---:|" + "---:|" * len(cols)]
    for r in rows:
        cells = [f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c)) for c in cols]
        lines.append(f"| {r['variant']} | {r['seed']} | " + " | ".join(cells) + " |")
    lines += ["", f"Free samples of the base itself judged the product: {base_rate:.3f} (of 32); the judge's "
              f"validation accuracy: {judge.val_accuracy}."]
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
