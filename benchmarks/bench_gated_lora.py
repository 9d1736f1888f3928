"""Benchmarks of the fused gated-LoRA linear at UNet attention-projection shapes.

Implementations, each timed forward and forward+backward (grads for x and the
adapter factors; the base layer frozen, as in LoRA training):

* ``fused``: :func:`apo_fast.ops.gated_lora.gated_lora_linear` on the Triton
  path, with a per-sample TACA gate (CUDA only);
* ``base``: the frozen base linear alone (``F.linear``), the floor;
* ``peft``: ``peft.tuners.lora.Linear`` (plain LoRA, no gate), the usual path;
* ``reference``: the PyTorch reference with the gate.

GPU shapes: SD 1.5 self-attention projections at batch 8 (8x4096 tokens at 320
features, 8x1024 at 640, 8x256 at 1280), its cross-attention to_k/to_v
(8x77 at 768 -> 320), and SDXL's (4x4096 at 640, 4x1024 at 1280, cross 4x77 at
2048 -> 640 and 2048 -> 1280); ranks 4, 16, 64; fp16. On the CPU only the torch
implementations run, at tiny shapes, in float32.

Each benchmark's ``extra_info`` carries its own median time, the ratio to
``base`` and to ``peft`` measured in the same run at the same shape, and the
achieved TFLOP/s as a fraction of the device's peak (nominal dense fp16/bf16
tensor-core peak for known GPUs; elsewhere a measured large-matmul throughput).

Run: ``pytest benchmarks/bench_gated_lora.py --benchmark-enable`` (the
project's pytest options disable timing by default, so a plain run only checks
that every case executes). :func:`run_gated_lora_benchmarks` runs the same grid
without pytest and writes JSON (for the GPU suite script).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from apo_fast.bench.timing import time_per_call
from apo_fast.ops.backend import use_triton
from apo_fast.ops.gated_lora import gated_lora_linear, gated_lora_linear_reference

RANKS = (4, 16, 64)
MODES = ("forward", "forward_backward")
IMPLEMENTATIONS = ("fused", "base", "peft", "reference")


@dataclasses.dataclass(frozen=True)
class ProjectionShape:
    """One attention projection: ``batch`` samples of ``tokens`` tokens, in -> out."""

    name: str
    batch: int
    tokens: int
    in_features: int
    out_features: int


GPU_SHAPES = (
    ProjectionShape("sd15-self-64x64", 8, 4096, 320, 320),
    ProjectionShape("sd15-self-32x32", 8, 1024, 640, 640),
    ProjectionShape("sd15-self-16x16", 8, 256, 1280, 1280),
    ProjectionShape("sd15-cross-kv", 8, 77, 768, 320),
    ProjectionShape("sdxl-self-64x64", 4, 4096, 640, 640),
    ProjectionShape("sdxl-self-32x32", 4, 1024, 1280, 1280),
    ProjectionShape("sdxl-cross-kv-640", 4, 77, 2048, 640),
    ProjectionShape("sdxl-cross-kv-1280", 4, 77, 2048, 1280),
)
CPU_SHAPES = (
    ProjectionShape("tiny-self", 2, 64, 64, 64),
    ProjectionShape("tiny-cross-kv", 2, 77, 96, 64),
)

# Nominal dense fp16/bf16 tensor-core TFLOP/s (vendor data sheets, SXM parts).
_NOMINAL_PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10": 125.0}


def _device_setup(device: torch.device) -> tuple[tuple[ProjectionShape, ...], torch.dtype]:
    return (GPU_SHAPES, torch.float16) if device.type == "cuda" else (CPU_SHAPES, torch.float32)


def _available(impl: str, device: torch.device) -> bool:
    if impl == "fused":
        return device.type == "cuda" and use_triton(torch.empty(0, device=device), override="auto")
    return True


@functools.lru_cache(maxsize=None)
def peak_tflops(device_str: str) -> tuple[float, str]:
    """(peak TFLOP/s, how it was obtained) for the device."""
    device = torch.device(device_str)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in _NOMINAL_PEAK_TFLOPS.items():
            if key in name:
                return value, f"nominal dense fp16 ({key})"
        n, dtype = 4096, torch.float16
    else:
        n, dtype = 512, torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = time_per_call(lambda: a @ b, device, warmup=2, reps=5)
    return 2 * n**3 / seconds / 1e12, f"measured {n}^3 {dtype} matmul"


def operation_flops(shape: ProjectionShape, rank: int, mode: str, impl: str) -> int:
    """Useful FLOPs of one call (base matmul, adapter, and their backward with W frozen)."""
    m, k, n = shape.batch * shape.tokens, shape.in_features, shape.out_features
    base = 2 * m * k * n
    lora = 0 if impl == "base" else 2 * m * rank * (k + n)
    if mode == "forward":
        return base + lora
    # backward: dx = dy W (+ dH A); adapters add dy B, dA = dH^T x, dB = (h g)^T dy
    return 2 * (base + lora) + (2 * lora if impl != "base" else 0)


class _Case:
    """Inputs and the callable for one (shape, rank, mode, implementation)."""

    def __init__(self, shape: ProjectionShape, rank: int, mode: str, impl: str,
                 device: torch.device, dtype: torch.dtype):
        gen = torch.Generator(device="cpu").manual_seed(0)

        def rand(*size, scale=1.0):
            return (torch.randn(*size, generator=gen) * scale).to(device=device, dtype=dtype)

        s, t, k, n = shape.batch, shape.tokens, shape.in_features, shape.out_features
        train = mode == "forward_backward"
        self.x = rand(s, t, k).requires_grad_(train)
        self.weight = rand(n, k, scale=k**-0.5)
        self.bias = rand(n, scale=0.1)
        self.lora_A = rand(rank, k, scale=k**-0.5).requires_grad_(train)
        self.lora_B = rand(n, rank, scale=rank**-0.5).requires_grad_(train)
        # TACA prefix gate: sample i keeps the first n_i ranks.
        lengths = torch.linspace(1, rank, s).round()
        self.gate = (torch.arange(rank)[None, :] < lengths[:, None]).to(device=device, dtype=torch.float32)
        self.scaling = 1.0
        self.dy = rand(s, t, n) if train else None
        self.forward = self._forward_fn(impl, rank, device, dtype)
        if impl == "base":
            self.params = [self.x]
        elif impl == "peft":
            self.params = [self.x, self.peft.lora_A["default"].weight, self.peft.lora_B["default"].weight]
        else:
            self.params = [self.x, self.lora_A, self.lora_B]
        self.train = train

    def _forward_fn(self, impl, rank, device, dtype):
        if impl == "fused":
            return lambda: gated_lora_linear(self.x, self.weight, self.bias, self.lora_A, self.lora_B,
                                             self.gate, self.scaling, backend="triton")
        if impl == "base":
            return lambda: F.linear(self.x, self.weight, self.bias)
        if impl == "reference":
            return lambda: gated_lora_linear_reference(self.x, self.weight, self.bias, self.lora_A,
                                                       self.lora_B, self.gate, self.scaling)
        if impl == "peft":
            from peft import LoraConfig
            from peft.tuners.lora import Linear as PeftLoraLinear

            base = torch.nn.Linear(self.weight.shape[1], self.weight.shape[0], device=device, dtype=dtype)
            with torch.no_grad():
                base.weight.copy_(self.weight)
                base.bias.copy_(self.bias)
            base.requires_grad_(False)
            layer = PeftLoraLinear(base, "default", config=LoraConfig(r=rank, lora_alpha=rank),
                                   r=rank, lora_alpha=rank)
            layer.to(device=device, dtype=dtype)
            with torch.no_grad():
                layer.lora_A["default"].weight.copy_(self.lora_A)
                layer.lora_B["default"].weight.copy_(self.lora_B)
            layer.lora_A["default"].weight.requires_grad_(self.lora_A.requires_grad)
            layer.lora_B["default"].weight.requires_grad_(self.lora_B.requires_grad)
            self.peft = layer
            return lambda: layer(self.x)
        raise ValueError(f"unknown implementation {impl!r}")

    def __call__(self):
        y = self.forward()
        if self.train:
            return torch.autograd.grad(y, self.params, self.dy)
        return y


def _measure(shape, rank, mode, impl, device, dtype, reps) -> float:
    with torch.set_grad_enabled(mode == "forward_backward"):
        case = _Case(shape, rank, mode, impl, device, dtype)
        return time_per_call(case, device, reps=reps)


def _record(shape, rank, mode, impl, seconds, base_s, peft_s, device) -> dict:
    peak, peak_source = peak_tflops(str(device))
    flops = operation_flops(shape, rank, mode, impl)
    tflops = flops / seconds / 1e12
    return {
        "shape": shape.name, "tokens": shape.batch * shape.tokens, "in_features": shape.in_features,
        "out_features": shape.out_features, "rank": rank, "mode": mode, "impl": impl,
        "median_ms": seconds * 1e3,
        "time_vs_base": seconds / base_s if base_s else None,
        "time_vs_peft": seconds / peft_s if peft_s else None,
        "tflops": tflops, "fraction_of_peak": tflops / peak, "peak_tflops": peak,
        "peak_source": peak_source, "device": str(device),
    }


def run_gated_lora_benchmarks(device: str | torch.device, out_json: str | Path | None = None,
                              *, reps: int = 20) -> list[dict]:
    """Time the whole grid on ``device`` and write the records to ``out_json``.

    Returns one record per (shape, rank, mode, implementation) with median time,
    ratios to the base linear and to peft, TFLOP/s and fraction of peak.
    """
    device = torch.device(device)
    shapes, dtype = _device_setup(device)
    records = []
    for shape in shapes:
        for rank in RANKS:
            for mode in MODES:
                times = {impl: _measure(shape, rank, mode, impl, device, dtype, reps)
                         for impl in IMPLEMENTATIONS if _available(impl, device)}
                for impl, seconds in times.items():
                    records.append(_record(shape, rank, mode, impl, seconds, times["base"],
                                           times["peft"], device))
    if device.type == "cuda":
        records += time_nf4(shapes, device, dtype, reps)
    if out_json is not None:
        Path(out_json).write_text(json.dumps(records, indent=1))
    return records


PACKED_FORMATS = (("nf4", False), ("nf4_double", True), ("int8", False), ("fp8", False))


def time_nf4(shapes, device: torch.device, dtype: torch.dtype, reps: int = 20, rank: int = 16) -> list[dict]:
    """Forward+backward (dx, dA, dB) of the gated adapter over a packed base (NF4 with and without
    double quantization, int8, fp8 e4m3), the dequantize-in-the-K-loop kernel, against peft's
    LoRA on the same bitsandbytes layer (``peft.tuners.lora.bnb``: bitsandbytes' matmul plus the
    low-rank branch; for NF4 and int8) and against the fused kernel on the bf16/fp16 base, in the
    same run (ratios; no timing is asserted anywhere)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return []
    from peft import LoraConfig, inject_adapter_in_model

    from apo_fast.models.quantize import quantize_linears
    from apo_fast.ops.gated_lora.packed import (
        _format_tensors,
        dequantize_packed,
        fused_packed_format,
        gated_lora_packed_linear,
    )

    records = []
    for shape in shapes:
        dense = torch.nn.Linear(shape.in_features, shape.out_features, device=device, dtype=dtype).requires_grad_(False)
        x = torch.randn(shape.batch, shape.tokens, shape.in_features, device=device, dtype=dtype, requires_grad=True)
        a = (0.02 * torch.randn(rank, shape.in_features, device=device, dtype=dtype)).requires_grad_(True)
        b = (0.02 * torch.randn(shape.out_features, rank, device=device, dtype=dtype)).requires_grad_(True)
        gate = torch.rand(shape.batch, rank, device=device)
        dy = torch.randn(shape.batch, shape.tokens, shape.out_features, device=device, dtype=dtype)

        def dense_fused():
            gated_lora_linear(x, dense.weight, dense.bias, a, b, gate, 1.0).backward(dy)

        dense_s = time_per_call(dense_fused, device, reps=reps)
        for name, double in PACKED_FORMATS:
            holder = torch.nn.Module()
            holder.lin = torch.nn.Linear(shape.in_features, shape.out_features).to(device, dtype)
            holder.lin.load_state_dict(dense.state_dict())
            quantize_linears(holder, name.removesuffix("_double"), double_quant=double, compute_dtype=dtype)
            base = holder.lin

            def fused():
                gated_lora_packed_linear(x, base, a, b, gate, 1.0).backward(dy)

            with torch.no_grad():  # the kernel against its decoded weight (fp32) before timing it
                qweight, scales, code, scales2 = _format_tensors(base, fused_packed_format(base), device)
                w = dequantize_packed(qweight, scales, code, scales2, fused_packed_format(base), *dense.weight.shape)
                want = x.float() @ w.t() + dense.bias.float() + ((x.float() @ a.float().t())
                                                                 * gate[:, None, :]) @ b.float().t()
                got = gated_lora_packed_linear(x, base, a, b, gate, 1.0).float()
                rel_err = float((got - want).abs().max() / want.abs().max())
            times = {f"{name}_fused": time_per_call(fused, device, reps=reps)}
            if name != "fp8":  # peft's LoRA on the same bitsandbytes layer (its own bnb layer class)
                peft_model = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=["lin"]),
                                                     holder).to(device)
                peft_model.lin.lora_A["default"].weight.data.copy_(a.detach())
                peft_model.lin.lora_B["default"].weight.data.copy_(b.detach())

                def peft_lora():
                    peft_model.lin(x).backward(dy)

                times[f"{name}_peft"] = time_per_call(peft_lora, device, reps=reps)
            baseline = times.get(f"{name}_peft")
            for impl, t in times.items():
                records.append({"shape": shape.name, "rank": rank, "mode": "forward_backward", "impl": impl,
                                "seconds": t, "vs_dense_fused": t / dense_s,
                                "vs_peft": t / baseline if baseline else None,
                                "max_rel_err_vs_decoded": rel_err if impl.endswith("_fused") else None})
        records.append({"shape": shape.name, "rank": rank, "mode": "forward_backward", "impl": "dense_fused",
                        "seconds": dense_s, "vs_dense_fused": 1.0, "vs_peft": None})
    return records


# --- pytest-benchmark ---------------------------------------------------------------

_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_SHAPES, _DTYPE = _device_setup(_DEVICE)


@pytest.fixture(scope="module")
def baseline_times():
    """Median times of base and peft per (shape, rank, mode), measured once in this run."""
    cache: dict = {}

    def get(shape, rank, mode, impl):
        key = (shape, rank, mode, impl)
        if key not in cache:
            cache[key] = _measure(shape, rank, mode, impl, _DEVICE, _DTYPE, reps=5)
        return cache[key]

    return get


@pytest.mark.benchmark(group="gated_lora", min_rounds=3, max_time=0.2, warmup=False)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("shape", _SHAPES, ids=lambda s: s.name)
def test_gated_lora_projection(benchmark, baseline_times, shape, rank, mode, impl):
    if not _available(impl, _DEVICE):
        pytest.skip(f"{impl} needs a CUDA device with Triton")
    with torch.set_grad_enabled(mode == "forward_backward"):
        case = _Case(shape, rank, mode, impl, _DEVICE, _DTYPE)
        out = benchmark(case)
    assert all(torch.isfinite(t).all() for t in (out if isinstance(out, tuple) else (out,)))
    seconds = _measure(shape, rank, mode, impl, _DEVICE, _DTYPE, reps=5)
    record = _record(shape, rank, mode, impl, seconds, baseline_times(shape, rank, mode, "base"),
                     baseline_times(shape, rank, mode, "peft"), _DEVICE)
    benchmark.extra_info.update(
        {k: v for k, v in record.items() if not isinstance(v, float) or math.isfinite(v)})
