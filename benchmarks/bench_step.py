"""Training-step benchmark under pytest-benchmark: apo-fast vs the Diffusion-DPO baseline.

Each case runs :func:`apo_fast.bench.run_step_benchmark` once (both sides,
interleaved, same model, data, batch and precision) and stores in
``benchmark.extra_info`` the samples/s of each side, apo-fast's ratios to the
baseline measured in the same run, and peak memory. The tiny demo model runs on
the CPU; the SD 1.5 / SDXL cases need CUDA and are skipped elsewhere.

Run: ``pytest benchmarks/bench_step.py --benchmark-enable`` (the project's
pytest options disable benchmarks by default; with them disabled each case still
executes once, as a smoke test).
"""
from __future__ import annotations

import pytest
import torch

from apo_fast.bench.step import run_step_benchmark
from apo_fast.bench.step_config import StepBenchConfig

CASES = {
    # name: (config, needs CUDA)
    "tiny_b4_r16": (StepBenchConfig(model="tiny", batch=4, r=16, steps=10, warmup=2, threads=1), False),
    "sd15_512_b8_r16_bf16": (StepBenchConfig(model="sd15", batch=8, r=16, precision="bf16", steps=10, warmup=3), True),
    "sdxl_1024_b1_r16_bf16": (StepBenchConfig(model="sdxl", batch=1, r=16, precision="bf16", steps=5, warmup=2), True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_training_step(benchmark, name, tmp_path):
    cfg, needs_cuda = CASES[name]
    if needs_cuda and not torch.cuda.is_available():
        pytest.skip("SD-size step benchmarks need a CUDA GPU")
    result = benchmark.pedantic(run_step_benchmark, args=(cfg, tmp_path), rounds=1, iterations=1)
    ratios = result["ratios"]
    benchmark.extra_info.update(
        apo_fast_samples_per_s=result["apo_fast"]["samples_per_s"],
        baseline_samples_per_s=result["baseline"]["samples_per_s"],
        ratios=ratios,
        machine=result["machine"],
    )
    assert result["apo_fast"]["samples_per_s"] > 0 and result["baseline"]["samples_per_s"] > 0
