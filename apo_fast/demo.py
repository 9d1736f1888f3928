"""``apo-fast demo``: the whole APO job on the bundled demo dataset, on a CPU in minutes.

1. train a tiny base UNet on the normal images (it stands in for a pretrained
   Stable Diffusion: it knows the product, never saw a defect);
2. APO fine-tune time-gated adapters and defect condition embeddings on the
   few-shot real anomalies (reference = the same UNet, adapters off);
3. hierarchical sampling: free and mask-guided anomalies with masks;
4. plots, a sample grid and ``metrics.json`` in the run folder;
5. a short downstream comparison (:func:`short_comparison`): detectors trained
   with no, CutPaste, plain-LoRA and APO anomalies, the report in ``<run>/eval``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from apo_fast.config import APOConfig, config_from_dict

# The bundled default; configs/demo.yaml holds the same values (a test keeps them equal).
DEMO_CONFIG: dict = {
    "output_dir": "runs/demo",
    "model": {"preset": "tiny", "num_train_timesteps": 1000, "noise_schedule": "squaredcos_cap_v2", "cond_tokens": 4,
              "prediction_type": "v_prediction"},
    "data": {"root": "builtin:demo", "category": "brick", "shots": "third", "image_size": 32, "augment": True},
    "adapter": {"r": 8, "lora_alpha": 8.0, "gate": {"kind": "rank_prefix"}, "mask_input": True},
    "loss": {"mode": "unpaired", "beta": 5000.0, "beta_schedule": "dlogsnr", "lambda_mask": 2.0, "lambda_sft": 0.25},
    "optim": {"name": "adamw", "lr": 2e-3, "cond_lr": 1e-2},
    "train": {"steps": 400, "batch_size": 8, "seed": 0, "log_every": 10, "checkpoint_every": 100, "device": "auto"},
    "pretrain": {"steps": 3000, "batch_size": 16, "lr": 2e-3, "warmup_steps": 100, "ema_decay": 0.999,
                 "sample_every": 1000},
    "sample": {"num_inference_steps": 25, "s_text": 3.0, "s_align": 1.0, "guide_dilate": 2, "num_per_defect": 8,
               "batch_size": 8},
}


def demo_config(output_dir: str | None = None, overrides: list[str] | None = None) -> APOConfig:
    data = json.loads(json.dumps(DEMO_CONFIG))
    if output_dir:
        data["output_dir"] = output_dir
    return config_from_dict(data, overrides)


def run_demo(cfg: APOConfig, progress: bool = True, state: dict | None = None, rebuild_base: bool = False) -> dict:
    """Run the demo end to end into ``cfg.output_dir``; returns the metrics written to metrics.json.

    The base model is the one shipped for the category when it was built with this
    config's settings (:func:`apo_fast.training.base.shipped_base`), else (or with ``rebuild_base``) trained
    here. ``state["phase"]`` names the phase running (for the CLI's message on Ctrl-C).
    """
    from apo_fast.io_utils import atomic_write_json
    from apo_fast.plots import plot_training
    from apo_fast.sampling.runs import sample_run
    from apo_fast.training.base import prepare_base
    from apo_fast.training.trainer import APOTrainer

    state = {} if state is None else state
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}

    def phase(number: int, name: str, what: str) -> None:
        state["phase"] = name
        print(f"[demo {number}/5] {name}: {what}", flush=True)

    t0 = time.perf_counter()
    prepare_base(cfg, out / "base", progress=progress, rebuild=rebuild_base,
                 say=lambda what: phase(1, "base model", what))
    timings["pretrain_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    if not progress:
        cfg.train.progress = False
    phase(2, "APO", f"{cfg.train.steps} steps of time-gated adapters on the few-shot anomalies")
    trainer = APOTrainer(cfg)
    try:
        summary = trainer.train()
    finally:
        trainer.close()
    timings["apo_train_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    phase(3, "sampling", f"{cfg.sample.num_per_defect} free and mask-guided anomalies per defect type")
    samples = sample_run(out, progress=progress)
    timings["sample_s"] = time.perf_counter() - t2
    plot_training(out / "train_log.jsonl", out / "training.png", pretrain_log=out / "base" / "pretrain_log.jsonl")
    final = summary.get("final", {})
    metrics = {
        "final_step": final.get("step"),
        "loss": final.get("loss"),  # the last step's loss alone; loss_mean_last20 is the steadier number
        "loss_mean_last20": _tail_mean(out / "train_log.jsonl", "loss", 20),
        "implicit_acc_last": final.get("implicit_acc"),
        "implicit_acc_last10_mean": _tail_mean(out / "train_log.jsonl", "implicit_acc", 10),
        "e_theta": final.get("e_theta"),
        "e_ref": final.get("e_ref"),
        "attention": summary.get("attention"),
        "adapted_modules": summary.get("adapted_modules"),
        "samples": samples["defects"],
        "timings_s": timings,
        "files": {
            "grid": str(out / "samples" / "grid.png"),
            "plot": str(out / "training.png"),
            "adapters": str(out / "adapters" / "pytorch_lora_weights.safetensors"),
            "log": str(out / "train_log.jsonl"),
        },
    }
    t3 = time.perf_counter()
    phase(4, "comparison", "plain-LoRA baseline, then detectors trained on none / CutPaste / plain-LoRA / APO data")
    metrics["comparison"] = short_comparison(cfg, out, progress=progress)
    timings["eval_s"] = time.perf_counter() - t3
    metrics["files"]["eval_report"] = metrics["comparison"]["report"]
    phase(5, "report", f"writing {out / 'metrics.json'}")
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


def short_comparison(cfg: APOConfig, run_dir: Path, progress: bool = True) -> dict:
    """The evaluation at demo size (:func:`apo_fast.eval.runs.demo_eval_config`): detectors trained
    with no / CutPaste / plain-LoRA / APO anomalies, tested on the held-out real ones. Prints the table."""
    import copy

    from apo_fast.eval.evaluate import evaluate
    from apo_fast.eval.report import markdown_table
    from apo_fast.eval.runs import demo_eval_config

    short = copy.deepcopy(cfg)
    short.eval = demo_eval_config(cfg.eval)
    result = evaluate(short, run_dir, progress=progress)
    print("\nDetectors trained on each synthetic-data source, tested on held-out real anomalies "
          f"(seeds {short.eval.seeds}, {short.eval.segmenter_steps} steps):")
    print(markdown_table(result["summary"]))
    print(result["verdict"]["sentence"])
    return {"summary": result["summary"], "verdict": result["verdict"]["sentence"],
            "timings_s": result["timings_s"], "report": result["files"]["markdown"]}


def _tail_mean(path: Path, key: str, n: int) -> float | None:
    recs = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    vals = [r[key] for r in recs[-n:] if key in r]
    return sum(vals) / len(vals) if vals else None
