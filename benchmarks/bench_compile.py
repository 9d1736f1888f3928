"""Compiled vs eager apo-fast training step under pytest-benchmark (``train.compile``).

One interleaved run of :func:`apo_fast.bench.compile_step.run_compile_benchmark`: the
ratio of compiled to eager samples/s and each side's compile seconds (apart from the
step times) go to ``benchmark.extra_info``. The tiny demo model runs on the CPU; the SD 1.5
512 px case needs CUDA.

Run: ``pytest benchmarks/bench_compile.py --benchmark-enable``.
"""
from __future__ import annotations

import pytest
import torch

from apo_fast.bench.compile_step import run_compile_benchmark
from apo_fast.bench.step_config import StepBenchConfig

CASES = {
    "tiny_b4_r16": (StepBenchConfig(model="tiny", batch=4, r=16, steps=20, warmup=3, threads=1), False),
    "sd15_512_b8_r16_bf16": (StepBenchConfig(model="sd15", batch=8, r=16, precision="bf16", steps=10, warmup=3),
                             True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_compiled_step(benchmark, name, tmp_path):
    cfg, needs_cuda = CASES[name]
    if needs_cuda and not torch.cuda.is_available():
        pytest.skip("the SD 1.5 step needs a CUDA GPU")
    result = benchmark.pedantic(run_compile_benchmark, args=(cfg, tmp_path), rounds=1, iterations=1)
    benchmark.extra_info.update(
        ratio_samples_per_s=result["ratio_samples_per_s"],
        eager_samples_per_s=result["eager"]["samples_per_s"],
        compiled_samples_per_s=result["compiled"]["samples_per_s"],
        compile_s=result["compiled"]["compile_s"],
    )
    assert result["compiled"]["compile_s"] > 0 and result["eager"]["compile_s"] == 0
