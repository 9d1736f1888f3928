"""The ``apo-fast`` command line (diffusers/accelerate habits: one subcommand per job,
``--config FILE`` plus ``--set section.key=value`` overrides, ``--output_dir``)."""
from __future__ import annotations

import argparse
import json
import logging
import sys


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="YAML config file (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=100 (repeatable)")
    p.add_argument("--output_dir", "--output-dir", dest="output_dir", default=None, help="run folder (overrides output_dir)")


def _load(args):
    from apo_fast.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.output_dir:
        cfg.output_dir = args.output_dir
    return cfg


def cmd_demo(args) -> int:
    from apo_fast.demo import demo_config, run_demo

    cfg = demo_config(args.output_dir, args.overrides)
    metrics = run_demo(cfg, progress=not args.no_progress)
    print(json.dumps({k: metrics[k] for k in ("loss", "implicit_acc_last10_mean", "timings_s", "files")}, indent=2))
    print(f"\ndemo finished: open {metrics['files']['grid']} and {metrics['files']['plot']}")
    return 0


def cmd_train(args) -> int:
    from apo_fast.train import APOTrainer

    cfg = _load(args)
    if args.no_progress:
        cfg.train.progress = False
    trainer = APOTrainer(cfg, resume=not args.no_resume)
    try:
        summary = trainer.train()
    finally:
        trainer.close()
    if trainer.rank == 0:
        print(json.dumps(summary.get("final", {}), indent=2))
    return 0


def cmd_sample(args) -> int:
    from apo_fast.generate import sample_run

    res = sample_run(
        args.run,
        args.output_dir,
        defects=args.defect or None,
        num=args.num,
        mask_guided=False if args.no_mask_guided else None,
        device=args.device,
        progress=not args.no_progress,
    )
    print(json.dumps(res, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apo-fast", description="Anomaly Preference Optimization: train and sample")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="the whole job on the bundled demo dataset (CPU, minutes)")
    p.add_argument("--output_dir", "--output-dir", dest="output_dir", default=None, help="run folder (default runs/demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("train", help="APO fine-tuning from a config (resumes from the last checkpoint)")
    _add_config_args(p)
    p.add_argument("--no-resume", action="store_true", help="start from step 0 even if checkpoints exist")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("sample", help="generate anomalies with masks from a trained run")
    p.add_argument("--run", required=True, help="run folder written by apo-fast train/demo")
    p.add_argument("--output_dir", "--output-dir", dest="output_dir", default=None, help="default: RUN/samples")
    p.add_argument("--defect", action="append", default=[], help="defect type (repeatable; default all)")
    p.add_argument("--num", type=int, default=None, help="samples per defect type")
    p.add_argument("--no-mask-guided", action="store_true", help="free generation only")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_sample)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from apo_fast.config import ConfigError

    try:
        return args.fn(args)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"apo-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if "torch.distributed" in sys.modules:
            from apo_fast.train import shutdown_distributed

            shutdown_distributed()
        sys.stdout.flush()
        sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
