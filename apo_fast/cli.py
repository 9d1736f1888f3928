"""The ``apo-fast`` command line (diffusers/accelerate habits: one subcommand per job,
``--config FILE`` plus ``--set section.key=value`` overrides, ``--output_dir``)."""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

from apo_fast.config.choices import (
    BENCH_ATTENTION,
    BENCH_MODELS,
    BENCH_PRECISIONS,
    GATE_KINDS,
)


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="YAML config file (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=100 (repeatable; KEY= sets '')")
    p.add_argument("--output_dir", "--output-dir", dest="output_dir", default=None, help="run folder (overrides output_dir)")
    _add_threads_arg(p)


def _add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", default=None, metavar="N|auto",
                   help="torch CPU threads (default: train.threads, 'auto' = free cores of this machine)")


def _threads_override(args) -> list[str]:
    value = getattr(args, "threads", None)
    return [] if value is None else [f"train.threads={value}"]


def _load(args):
    """The command's config, validated and its paths checked: all before torch is imported."""
    from apo_fast.config import check_paths, load_config

    cfg = load_config(args.config, list(args.overrides) + _threads_override(args))
    if args.output_dir:
        cfg.output_dir = args.output_dir
    check_paths(cfg)
    return cfg


def _apply_threads(setting) -> None:
    from apo_fast.machine import apply_threads

    apply_threads(setting)


class Interrupted(Exception):
    """Ctrl-C during a command: the message says where it stopped and how to go on."""


def cmd_demo(args) -> int:
    from apo_fast.config import check_paths
    from apo_fast.demo import demo_config

    cfg = demo_config(args.output_dir, list(args.overrides) + _threads_override(args))
    check_paths(cfg)
    from apo_fast.demo import run_demo

    _apply_threads(cfg.train.threads)
    state: dict = {}
    try:
        metrics = run_demo(cfg, progress=not args.no_progress, state=state, rebuild_base=args.rebuild_base)
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted during {state.get('phase', 'start-up')}; run `apo-fast demo"
            f"{' --output_dir ' + args.output_dir if args.output_dir else ''}` again to go on (finished phases "
            "and the last checkpoint are kept)"
        ) from None
    print(json.dumps({k: metrics[k] for k in ("loss", "loss_mean_last20", "implicit_acc_last10_mean", "timings_s",
                                              "files")}, indent=2))
    print(f"\ndemo finished: open {metrics['files']['grid']} and {metrics['files']['plot']}")
    return 0


def cmd_pretrain(args) -> int:
    cfg = _load(args)
    if args.steps is not None:
        cfg.pretrain.steps = args.steps
    if cfg.pretrain.steps < 1:
        raise ValueError("pretrain.steps must be >= 1 for apo-fast pretrain (e.g. --set pretrain.steps=4000)")
    out = Path(args.output_dir or Path(cfg.output_dir) / "base")
    from apo_fast.plots import plot_pretrain
    from apo_fast.training.pretrain import pretrain_base

    _apply_threads(cfg.train.threads)
    print(f"[pretrain] base UNet on the normal images of {cfg.data.category} ({cfg.pretrain.steps} steps) into {out}",
          flush=True)
    try:
        unet_dir, cond_path = pretrain_base(cfg, out, progress=not args.no_progress, resume=not args.no_resume)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; the same command resumes from the last state in {out} "
                          f"(written every {cfg.pretrain.checkpoint_every} steps)") from None
    plot_pretrain(out / "pretrain_log.jsonl", out / "pretrain.png")
    print(json.dumps({"unet": str(unet_dir), "conditions": str(cond_path), "samples": str(out / "samples.png"),
                      "plot": str(out / "pretrain.png"), "log": str(out / "pretrain_log.jsonl")}, indent=2))
    print(f"\nuse it: apo-fast train --config {args.config} --set model.pretrained={unet_dir} "
          f"--set model.subfolder= --set model.conditions={cond_path}")
    return 0


def cmd_train(args) -> int:
    cfg = _load(args)
    if args.no_progress:
        cfg.train.progress = False
    from apo_fast.training.trainer import APOTrainer

    _apply_threads(cfg.train.threads)
    trainer = APOTrainer(cfg, resume=not args.no_resume)
    try:
        summary = trainer.train()
    except KeyboardInterrupt:
        from apo_fast.training.checkpoints import latest_checkpoint

        ckpt = latest_checkpoint(trainer.out)
        resume = "apo-fast train " + " ".join(shlex.quote(a) for a in args.argv if a != "--no-resume")
        where = f"the last checkpoint is {ckpt}" if ckpt else "no checkpoint was written yet"
        raise Interrupted(f"interrupted at step {trainer.step}; {where}; resume with: {resume}") from None
    finally:
        trainer.close()
    if trainer.rank == 0:
        print(json.dumps(summary.get("final", {}), indent=2))
    return 0


def _samples_folder(args) -> Path:
    """Where ``sample`` writes: never over earlier samples unless ``--overwrite``."""
    import shutil

    out = Path(args.output_dir) if args.output_dir else Path(args.run) / "samples"
    if not out.exists() or not any(out.iterdir()):
        return out
    if args.overwrite:
        if not (out / "samples.json").is_file():
            raise ValueError(f"--overwrite: {out} is not an apo-fast samples folder (no samples.json); "
                             "remove it yourself or choose another --output_dir")
        shutil.rmtree(out)
        return out
    if args.output_dir:
        raise ValueError(f"{out} already holds files; pass --overwrite to replace them or choose another --output_dir")
    n = 1
    while (out.parent / f"{out.name}-{n}").exists():
        n += 1
    fresh = out.parent / f"{out.name}-{n}"
    print(f"{out} already holds samples; writing to {fresh} (--overwrite replaces them)", file=sys.stderr)
    return fresh


def cmd_sample(args) -> int:
    run = Path(args.run)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"--run {run} is not an apo-fast run folder (no config.yaml); "
                                "train one with apo-fast train or apo-fast demo")
    out = _samples_folder(args)
    from apo_fast.sampling.runs import sample_run

    _apply_threads("auto" if args.threads is None else _threads_value(args.threads))
    try:
        res = sample_run(
            args.run,
            out,
            defects=args.defect or None,
            num=args.num,
            mask_guided=False if args.no_mask_guided else None,
            device=args.device,
            progress=not args.no_progress,
            compile=True if args.compile else None,
        )
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; {out} may hold part of the samples (run again with --overwrite)") from None
    print(json.dumps(res, indent=2))
    return 0


def _threads_value(raw: str):
    if raw == "auto":
        return raw
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"--threads must be auto or an integer >= 1; got {raw!r}") from None


def cmd_eval(args) -> int:
    cfg = _load(args)
    if args.run and not Path(args.run).is_dir():
        raise FileNotFoundError(f"--run {args.run} is not a folder")
    from apo_fast.eval.evaluate import evaluate

    _apply_threads(cfg.train.threads)
    try:
        result = evaluate(cfg, args.run, train_missing=not args.no_train, progress=not args.no_progress, log=print)
    except KeyboardInterrupt:
        raise Interrupted("interrupted; run the same command again: trained runs and their checkpoints are kept, "
                          "the evaluation starts over") from None
    print("\n" + result["markdown"])
    print(json.dumps(result["files"], indent=2))
    return 0


def cmd_bench(args) -> int:
    from apo_fast.bench.step import run_step_benchmark
    from apo_fast.bench.step_config import StepBenchConfig
    from apo_fast.bench.step_report import to_markdown, write_reports

    cfg = StepBenchConfig(
        model=args.model, batch=args.batch, r=args.rank, precision=args.precision, steps=args.steps,
        warmup=args.warmup, device=args.device, resolution=args.resolution, cond_tokens=args.cond_tokens,
        gate=args.gate, gradient_checkpointing=args.gradient_checkpointing, use_8bit_adam=args.use_8bit_adam,
        attention=args.attention, seed=args.seed, threads=args.threads, compile=args.compile,
    )
    try:
        result = run_step_benchmark(cfg, workdir=args.output_dir, progress=not args.no_progress)
    except KeyboardInterrupt:
        raise Interrupted("interrupted before a whole step per side was measured; nothing written") from None
    files = write_reports(result, args.output_dir)
    print(to_markdown(result))
    print(json.dumps(files, indent=2))
    if result["config"].get("interrupted"):
        print(f"apo-fast bench: interrupted after {result['config']['steps_done']} step(s) per side; "
              f"wrote what was measured to {files['json']}", file=sys.stderr)
        return 130
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apo-fast", description="Anomaly Preference Optimization: train and sample")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # The deepspeed launcher passes --local_rank=N before the subcommand (the rank is read from LOCAL_RANK).
    parser.add_argument("--local_rank", "--local-rank", dest="launcher_local_rank", type=int, default=None,
                        help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_demo, _add_pretrain, _add_train, _add_sample, _add_eval, _add_bench):
        add(sub)
    from apo_fast.bench.plan_cli import add_plan_memory_parser

    add_plan_memory_parser(sub, _add_config_args)
    return parser


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the whole job on the bundled demo dataset (CPU, minutes)")
    p.add_argument("--output_dir", "--output-dir", dest="output_dir", default=None, help="run folder (default runs/demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a demo config value, e.g. --set train.steps=100 (repeatable; KEY= sets '')")
    _add_threads_arg(p)
    p.add_argument("--rebuild-base", action="store_true",
                   help="train the base model here instead of using the one shipped for the category")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_demo)


def _add_pretrain(sub) -> None:
    p = sub.add_parser("pretrain", help="train a small base UNet on a product's normal images (resumable)")
    _add_config_args(p)
    p.add_argument("--steps", type=int, default=None, help="pretraining steps (default: pretrain.steps)")
    p.add_argument("--no-resume", action="store_true", help="start over even if a saved state exists")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_pretrain)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="APO fine-tuning from a config (resumes from the last checkpoint)")
    _add_config_args(p)
    p.add_argument("--no-resume", action="store_true", help="start from step 0 even if checkpoints exist")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.set_defaults(fn=cmd_train)


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="generate anomalies with masks from a trained run")
    p.add_argument("--run", required=True, help="run folder written by apo-fast train/demo")
    p.add_argument("--output_dir", "--output-dir", dest="output_dir", default=None,
                   help="default: RUN/samples (RUN/samples-N when that holds earlier samples)")
    p.add_argument("--defect", action="append", default=[], help="defect type (repeatable; default all)")
    p.add_argument("--num", type=int, default=None, help="samples per defect type")
    p.add_argument("--no-mask-guided", action="store_true", help="free generation only")
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet call (sample.compile)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace earlier samples in the output folder (default: write to a new samples-N folder)")
    _add_threads_arg(p)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_sample)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="generation metrics and the downstream detector test: none/cutpaste/lora/apo")
    _add_config_args(p)
    p.add_argument("--run", default=None,
                   help="trained APO run folder (default: the config's output_dir; trained there if missing)")
    p.add_argument("--no-train", action="store_true", help="fail instead of training a missing APO or LoRA run")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_eval)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="training-step benchmark: apo-fast vs the diffusers Diffusion-DPO baseline")
    p.add_argument("--model", choices=BENCH_MODELS, default="tiny", help="UNet preset (random weights)")
    p.add_argument("--batch", type=int, default=4, help="preference pairs per step (2x images per UNet pass)")
    p.add_argument("--rank", type=int, default=16, help="adapter rank r (the diffusers scripts' --rank)")
    p.add_argument("--precision", choices=BENCH_PRECISIONS, default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--steps", type=int, default=20, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side first")
    p.add_argument("--device", default="auto")
    p.add_argument("--resolution", type=int, default=None, help="pixels (default: tiny 32, sd15 512, sdxl 1024)")
    p.add_argument("--cond-tokens", type=int, default=None, help="condition tokens (default: SD 77, tiny 4)")
    p.add_argument("--gate", choices=GATE_KINDS, default="rank_prefix",
                   help="apo-fast's timestep gate (constant = the baseline's plain LoRA)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="on both sides")
    p.add_argument("--use-8bit-adam", action="store_true", help="bitsandbytes AdamW8bit on both sides")
    p.add_argument("--attention", choices=BENCH_ATTENTION, default="sdpa", help="on both sides")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet call on both sides (compile time reported apart)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads during the run")
    p.add_argument("--output_dir", "--output-dir", dest="output_dir", default="runs/bench",
                   help="folder for bench.json, bench.md, bench.png")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_bench)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv[argv.index(args.command) + 1:] if args.command in argv else []
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from apo_fast.config import ConfigError

    group_before = _group_initialized()
    try:
        return args.fn(args)
    except Interrupted as exc:
        print(f"\napo-fast {args.command}: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"\napo-fast {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and not _is_user_error(exc):
            raise
        print(f"apo-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if not group_before and "torch" in sys.modules:  # end only the process group this command started
            from apo_fast.training.distributed import shutdown_distributed

            shutdown_distributed()
        sys.stdout.flush()
        sys.stderr.flush()


def _group_initialized() -> bool:
    """Whether a torch.distributed group exists already (without importing torch for it)."""
    if "torch" not in sys.modules:
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _is_user_error(exc: RuntimeError) -> bool:
    """RuntimeErrors that are about the user's settings (shown as one line, not a traceback)."""
    return "CUDA is not available" in str(exc)


if __name__ == "__main__":
    sys.exit(main())
