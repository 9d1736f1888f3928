"""Compiled vs eager apo-fast training step, one interleaved run (``train.compile``).

Two apo-fast trainers on the same config, data and seed, one with the UNet call compiled
(:mod:`apo_fast.models.compile`), step alternately (order swapped every round, so drift
in machine load hits both); the compiled side's warmup absorbs its compilation, whose
seconds are reported apart (Dynamo's own timers) and never enter the step times.

``python -m apo_fast.bench.compile_step --steps 20`` prints the result as JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from apo_fast.bench.sides import APOFastSide
from apo_fast.bench.step_config import StepBenchConfig

__all__ = ["run_compile_benchmark"]


def run_compile_benchmark(cfg: StepBenchConfig, workdir: str | Path | None = None) -> dict:
    """``{"eager": {...}, "compiled": {...}, "ratio_samples_per_s": compiled / eager, ...}``."""
    from apo_fast.models.compile import compile_seconds
    from apo_fast.machine import loadavg

    device = cfg.resolved_device()
    previous = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    workdir = Path(workdir or tempfile.mkdtemp(prefix="apo_compile_bench_"))
    try:
        load_start = loadavg()
        sides, compile_s = {}, {}
        for name, flag in (("eager", False), ("compiled", True)):
            side_cfg = dataclasses.replace(cfg, compile=flag)
            side = APOFastSide(side_cfg, device, workdir / name, None)
            c0 = compile_seconds()
            for _ in range(max(cfg.warmup, 2)):  # the compiled side: the policy and reference graphs
                side.step(None)
            compile_s[name] = compile_seconds() - c0
            sides[name] = side
        times: dict[str, list[float]] = {name: [] for name in sides}
        losses: dict[str, list[float]] = {name: [] for name in sides}
        for step in range(cfg.steps):
            order = list(sides) if step % 2 == 0 else list(reversed(sides))
            for name in order:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                losses[name].append(sides[name].step(None))
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times[name].append(time.perf_counter() - t0)
        images = 2 * cfg.batch
        result = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "config": {**dataclasses.asdict(cfg), "device": str(device), "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "load_avg_at_start": load_start},
        }
        for name in sides:
            med = statistics.median(times[name])
            result[name] = {"median_step_s": med, "samples_per_s": images / med, "compile_s": compile_s[name],
                            "step_s": times[name], "loss": losses[name]}
        result["ratio_samples_per_s"] = result["compiled"]["samples_per_s"] / result["eager"]["samples_per_s"]
        pairs = [e / c for e, c in zip(times["eager"], times["compiled"])]
        result["ratio_paired_median"] = statistics.median(pairs)
        return result
    finally:
        if cfg.threads is not None:
            torch.set_num_threads(previous)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precision", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--gate", default="rank_prefix")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    cfg = StepBenchConfig(model=args.model, batch=args.batch, r=args.rank, steps=args.steps, warmup=args.warmup,
                          precision=args.precision, device=args.device, threads=args.threads, gate=args.gate)
    result = run_compile_benchmark(cfg)
    text = json.dumps({k: v for k, v in result.items()}, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    summary = {k: result[k] for k in ("ratio_samples_per_s", "ratio_paired_median")}
    for name in ("eager", "compiled"):
        summary[name] = {k: result[name][k] for k in ("median_step_s", "samples_per_s", "compile_s")}
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
