"""The prepared GPU suite: kernel checks and benchmarks, the training-step benchmark and memory, in one run.

Run on one GPU (an H200: about 7 of the 8 minutes it may take)::

    python benchmarks/gpu_suite.py --out "$OUT"          # or: bash benchmarks/gpu_suite.sh

and on a CPU first, to check that nothing crashes before GPU time is spent
(torch paths only, tiny sizes, about a minute)::

    python benchmarks/gpu_suite.py --dry-run --out /tmp/suite

Parts, in order, each with its own time budget (seconds on an H200); a part is
skipped with a message when the suite's remaining budget is below the part's
minimum, and a failing part is recorded and the next one runs:

=====================  ======  ===========================================================
part                   budget  what
=====================  ======  ===========================================================
``env``                15      versions, GPU, copy bandwidth, bf16 matmul rate
``correctness``        40      fused APO loss and gated-LoRA kernels vs float64 reference,
                               and a UNet with fused vs PyTorch adapters (GPU)
``step_sd15``          100     apo-fast vs the diffusers Diffusion-DPO baseline, SD 1.5
                               UNet, 512 px, batch 8 pairs, rank 16, bf16
``memory_sd15``        70      peak memory of the issue-5 config (``configs/sd15_mvtec.yaml``)
                               at SD 1.5 512 px batch 4 vs :func:`apo_fast.bench.memory_plan.plan_memory`,
                               bf16 base and NF4 base (+ fp8 convolutions; target 3 GiB)
``memory_sdxl``        55      the same at SDXL 1024 px batch 1 (a fresh process: nothing
                               of the SD 1.5 run stays allocated); NF4 base target 6 GiB
``loss_kernels``       75      ``benchmarks/bench_loss.py: run_loss_benchmarks``
``gated_lora_kernels`` 75      ``benchmarks/bench_gated_lora.py: run_gated_lora_benchmarks``
                               (also the packed bases: NF4, NF4 double-quant, int8, fp8 vs
                               peft's LoRA on bitsandbytes' layer and vs the bf16 base)
``step_sdxl``          80      the step benchmark with the SDXL UNet, 1024 px, batch 1 pair
``compile_sd15``       150     ``train.compile`` at SD 1.5 512 px batch 8 rank 16: compiled vs
                               eager apo-fast, and vs the compiled peft baseline
=====================  ======  ===========================================================

Each part runs in its own Python process (``--in-process`` runs them in this
one), so a crashed CUDA context or a hang costs one part only. Everything lands
in ``--out`` (``$OUT`` by default), at most eight files: ``suite.json`` (all
results), ``SUMMARY.md`` (the tables), ``suite.log`` (the parts' output),
``step_sd15.png``, ``step_sdxl.png``, ``loss_kernels.json``,
``gated_lora_kernels.json``. A short table is printed last.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20
GIB = 2**30


def ensure_apo_fast_importable() -> None:
    """Import ``apo_fast`` (and ``apo_fast.kernels``) from this checkout when it is not installed.

    ``kernels/`` is installed as ``apo_fast.kernels`` by the package metadata; on a
    machine where the package is not installed (a bare GPU image) the mapping is
    made here by loading the folder under that name.
    """
    try:
        import apo_fast.kernels

        return
    except ImportError:
        pass
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import apo_fast

    spec = importlib.util.spec_from_file_location(
        "apo_fast.kernels", REPO / "kernels" / "__init__.py", submodule_search_locations=[str(REPO / "kernels")]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["apo_fast.kernels"] = module
    spec.loader.exec_module(module)
    apo_fast.kernels = module


def load_benchmark_module(name: str):
    """``benchmarks/<name>.py`` as a module (the folder is not a package)."""
    path = REPO / "benchmarks" / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (yet)")
    spec = importlib.util.spec_from_file_location(f"apo_fast_benchmarks_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(spec.name, None)
        raise
    return module


# --------------------------------------------------------------------------- context


@dataclasses.dataclass
class PartContext:
    """What a part gets: the device, dry-run flag, its scratch folder and its deadline."""

    device: Any
    dry_run: bool
    scratch: Path
    deadline: float  # time.monotonic() value after which the part should wrap up

    def seconds_left(self) -> float:
        return self.deadline - time.monotonic()

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def _copy_gbps(device, nbytes: int) -> float:
    """Device-to-device copy bandwidth, bytes read + written per second."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    from apo_fast.bench.timing import time_per_call

    return 2 * nbytes / time_per_call(lambda: dst.copy_(src), device, warmup=2, reps=10, rounds=3) / 1e9


def _matmul_tflops(device, n: int, dtype) -> float:
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    from apo_fast.bench.timing import time_per_call

    return 2 * n**3 / time_per_call(lambda: a @ b, device, warmup=2, reps=5, rounds=3) / 1e12


def part_env(ctx: PartContext) -> dict:
    """Versions, the device, its copy bandwidth and bf16 matmul rate."""
    import platform

    import torch

    out: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(ctx.device),
        "dry_run": ctx.dry_run,
    }
    for name in ("triton", "diffusers", "peft", "deepspeed", "bitsandbytes", "xformers", "pynvml"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "present")
        except Exception as exc:  # noqa: BLE001 - report what is missing; the parts that need it fail on their own
            out[name] = f"missing ({type(exc).__name__})"
    n_copy, n_mm = (1 << 30, 8192) if ctx.cuda else (16 << 20, 256)
    if ctx.cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        out.update(
            gpu=props.name,
            gpu_memory_gib=props.total_memory / GIB,
            sms=props.multi_processor_count,
            cuda=torch.version.cuda,
            capability=f"{props.major}.{props.minor}",
        )
    out["copy_gbps"] = _copy_gbps(ctx.device, n_copy)
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    out["matmul_tflops"] = _matmul_tflops(ctx.device, n_mm, dtype)
    out["matmul"] = f"{n_mm}^3 {str(dtype).replace('torch.', '')}"
    out["headline"] = (
        f"{out.get('gpu', 'cpu')}: copy {out['copy_gbps']:.0f} GB/s, matmul {out['matmul_tflops']:.0f} TFLOP/s"
    )
    return out


def _rel_err(a, b) -> float:
    """max |a - b| / max |b| in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _loss_check(shape, dtype, paired: bool, masked: bool, backend: str, device) -> dict:
    import torch

    from apo_fast.losses import apo_loss
    from apo_fast.ops.apo_loss.naive import apo_loss_reference, beta_per_term

    g = torch.Generator(device="cpu").manual_seed(hash((shape, paired, masked)) % 2**31)
    pred = torch.randn(shape, generator=g).to(device, dtype)
    ref = (pred.float() + 0.1 * torch.randn(shape, generator=g).to(device)).to(dtype)
    target = torch.randn(shape, generator=g).to(device, dtype)
    mask = (torch.rand((shape[0], 1, *shape[2:]), generator=g) > 0.7).to(device, dtype) if masked else None
    n_terms = shape[0] // 2 if paired else shape[0]
    beta = (torch.rand(n_terms, generator=g) * 50 + 1).to(device) if not paired else 30.0
    kwargs = {"mask": mask, "lambda_mask": 2.0 if masked else 1.0, "paired": paired}
    p = pred.detach().clone().requires_grad_(True)
    out = apo_loss(p, ref, target, beta, backend=backend, **kwargs)
    out.loss.backward()
    p64 = pred.detach().double().requires_grad_(True)
    beta64 = beta_per_term(beta.double() if isinstance(beta, torch.Tensor) else beta, shape[0], paired, device)
    loss64, e_theta64, e_ref64, _ = apo_loss_reference(
        p64,
        ref.double(),
        target.double(),
        beta64,
        mask.double() if masked else None,
        kwargs["lambda_mask"],
        paired,
        0.0,
    )
    loss64.backward()
    return {
        "shape": list(shape),
        "dtype": str(dtype).replace("torch.", ""),
        "paired": paired,
        "masked": masked,
        "backend": backend,
        "loss_rel_err": abs(out.loss.item() - loss64.item()) / max(abs(loss64.item()), 1e-30),
        "e_theta_rel_err": _rel_err(out.e_theta, e_theta64),
        "e_ref_rel_err": _rel_err(out.e_ref, e_ref64),
        "grad_rel_err": _rel_err(p.grad, p64.grad),
    }


def _gated_lora_check(batch, tokens, fin, fout, rank, dtype, backend: str, device) -> dict:
    import torch

    from apo_fast.ops.gated_lora import gated_lora_linear, gated_lora_linear_reference

    g = torch.Generator(device="cpu").manual_seed(batch * 7919 + tokens * 31 + rank)
    x = torch.randn(batch, tokens, fin, generator=g)
    w = torch.randn(fout, fin, generator=g) / math.sqrt(fin)
    bias = torch.randn(fout, generator=g) * 0.1
    a = torch.randn(rank, fin, generator=g) / math.sqrt(fin)
    b = torch.randn(fout, rank, generator=g) * 0.1
    gate = (torch.rand(batch, rank, generator=g) > 0.3).float()
    dy = torch.randn(batch, tokens, fout, generator=g)
    args = [t.to(device, dtype) for t in (x, w, bias, a, b)]
    xs, ws, bs, as_, bb = args
    xs.requires_grad_(True)
    as_.requires_grad_(True)
    bb.requires_grad_(True)
    y = gated_lora_linear(xs, ws, bs, as_, bb, gate.to(device), 2.0, backend=backend)
    y.backward(dy.to(device, dtype))
    # the reference sees the same rounded inputs the fast path saw
    xr, wr, br, ar, brr = (t.detach().double() for t in args)
    for t in (xr, ar, brr):
        t.requires_grad_(True)
    yr = gated_lora_linear_reference(xr, wr, br, ar, brr, gate.to(device).double(), 2.0)
    yr.backward(dy.to(device, dtype).double())
    return {
        "shape": f"{batch}x{tokens}x{fin}->{fout}",
        "rank": rank,
        "dtype": str(dtype).replace("torch.", ""),
        "backend": backend,
        "y_rel_err": _rel_err(y, yr),
        "dx_rel_err": _rel_err(xs.grad, xr.grad),
        "dA_rel_err": _rel_err(as_.grad, ar.grad),
        "dB_rel_err": _rel_err(bb.grad, brr.grad),
    }


def _unet_adapter_check(device, dry_run: bool) -> dict:
    """A small UNet with time-gated adapters (linear and conv): fused vs PyTorch adapter path,
    output and LoRA gradients."""
    import copy

    import torch
    from diffusers import UNet2DConditionModel

    from apo_fast.adapters import (
        AdapterConfig,
        GateConfig,
        adapter_parameters,
        freeze_base,
        inject_adapters,
    )
    from apo_fast.config.unet_presets import UNET_PRESETS

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    base = UNet2DConditionModel(**dict(UNET_PRESETS["tiny"])).to(device)
    results = {}
    for backend in ("torch", "torch" if dry_run else "triton"):
        if backend in results:
            continue
        unet = copy.deepcopy(base)
        # attention projections and 1x1 proj_in/proj_out (fused kernel on CUDA), resnet conv1 (PyTorch conv)
        targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1"]
        inject_adapters(unet, AdapterConfig(r=8, target_modules=targets, gate=GateConfig(kind="rank_prefix"),
                                            backend=backend))
        freeze_base(unet)
        torch.manual_seed(1)
        with torch.no_grad():
            for p in adapter_parameters(unet):
                p.normal_(0, 0.05)
        unet.to(dtype)
        z = torch.randn(4, 4, 32, 32, generator=torch.Generator().manual_seed(2)).to(device, dtype)
        t = torch.tensor([10, 300, 600, 950], device=device)
        c = torch.randn(4, 4, 32, generator=torch.Generator().manual_seed(3)).to(device, dtype)
        y = unet(z, t, encoder_hidden_states=c).sample
        y.float().square().mean().backward()
        results[backend] = (y.detach().float(), [p.grad.detach().float() for p in adapter_parameters(unet)])
    other = "torch" if dry_run else "triton"
    y_ref, g_ref = results["torch"]
    y_fast, g_fast = results[other]
    return {
        "backend": other,
        "dtype": str(dtype).replace("torch.", ""),
        "y_rel_err": _rel_err(y_fast, y_ref),
        "grad_rel_err_max": max(_rel_err(a, b) for a, b in zip(g_fast, g_ref)),
    }


def part_correctness(ctx: PartContext) -> dict:
    """Fused kernels vs the float64 reference on the device (the PyTorch path on a CPU dry run)."""
    import torch

    backend = "torch" if ctx.dry_run or not ctx.cuda else "triton"
    if ctx.cuda and not ctx.dry_run:
        loss_cases = [
            ((16, 4, 64, 64), torch.bfloat16, False, True),
            ((16, 4, 64, 64), torch.bfloat16, True, False),
            ((8, 4, 128, 128), torch.bfloat16, False, True),
            ((6, 4, 37, 29), torch.float32, True, True),
            ((5, 3, 33, 17), torch.float16, False, True),
        ]
        lora_cases = [
            (8, 1024, 640, 640, 16, torch.bfloat16),
            (8, 77, 768, 320, 16, torch.bfloat16),
            (3, 50, 96, 72, 5, torch.float16),
            (2, 33, 40, 24, 64, torch.float32),
        ]
    else:
        loss_cases = [((4, 4, 8, 8), torch.float32, False, True), ((4, 4, 8, 8), torch.float32, True, False)]
        lora_cases = [(2, 10, 16, 12, 4, torch.float32)]
    loss = [_loss_check(s, d, p, m, backend, ctx.device) for s, d, p, m in loss_cases]
    lora = [_gated_lora_check(*case, backend=backend, device=ctx.device) for case in lora_cases]
    unet = _unet_adapter_check(ctx.device, ctx.dry_run or not ctx.cuda)
    # bf16/fp16 storage: the fast path rounds its outputs to the storage dtype; the loss math is fp32.
    tol = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2}
    failures = []
    for rec in loss:
        worst = max(rec["loss_rel_err"], rec["e_theta_rel_err"], rec["e_ref_rel_err"], rec["grad_rel_err"])
        rec["pass"] = worst <= tol[rec["dtype"]]
        if not rec["pass"]:
            failures.append(f"loss {rec['shape']} {rec['dtype']}")
    for rec in lora:
        worst = max(rec["y_rel_err"], rec["dx_rel_err"], rec["dA_rel_err"], rec["dB_rel_err"])
        rec["pass"] = worst <= tol[rec["dtype"]] * (10 if rec["dtype"] == "float32" else 1)  # TF32 off: fp32 dots
        if not rec["pass"]:
            failures.append(f"gated_lora {rec['shape']} r{rec['rank']} {rec['dtype']}")
    unet["pass"] = max(unet["y_rel_err"], unet["grad_rel_err_max"]) <= 5e-2
    if not unet["pass"]:
        failures.append("unet adapters")
    n = len(loss) + len(lora) + 1
    headline = f"{n - len(failures)}/{n} checks pass ({backend})" + (
        f"; FAIL: {', '.join(failures)}" if failures else ""
    )
    return {
        "backend": backend,
        "loss": loss,
        "gated_lora": lora,
        "unet": unet,
        "failures": failures,
        "headline": headline,
    }


def _step_part(ctx: PartContext, stem: str, spec: dict) -> dict:
    from apo_fast.bench.step import run_step_benchmark
    from apo_fast.bench.step_config import StepBenchConfig
    from apo_fast.bench.step_report import to_markdown, write_reports

    if ctx.dry_run or not ctx.cuda:  # the same code path on the tiny UNet, as short as it gets
        spec = {
            "model": "tiny",
            "batch": 2,
            "r": 4,
            "resolution": 16,
            "precision": "auto",
            "steps": 2 if stem == "step_sd15" else 1,
            "warmup": 1 if stem == "step_sd15" else 0,
        }
    budget = max(ctx.seconds_left() - 15.0, 10.0)
    cfg = StepBenchConfig(device=str(ctx.device), time_budget_s=budget, **spec)
    result = run_step_benchmark(cfg, workdir=ctx.scratch / stem, progress=True)
    files = write_reports(result, ctx.scratch, stem=stem)
    r = result["ratios"]
    mem = f", memory x{r['peak_memory']:.2f}" if r["peak_memory"] is not None else ""
    headline = (
        f"apo-fast {result['apo_fast']['samples_per_s']:.3g} vs baseline "
        f"{result['baseline']['samples_per_s']:.3g} samples/s: x{r['samples_per_s']:.2f}{mem}"
    )
    return {
        "result": result,
        "markdown": to_markdown(result),
        "copy": {files["png"]: f"{stem}.png"},
        "headline": headline,
    }


def part_step_sd15(ctx: PartContext) -> dict:
    """SD 1.5 UNet, 512 px (64x64 latents), batch 8 pairs, rank 16, bf16: the issue's main target."""
    spec = {"model": "sd15", "batch": 8, "r": 16, "precision": "bf16", "steps": 10, "warmup": 2}
    return _step_part(ctx, "step_sd15", spec)


def part_compile_sd15(ctx: PartContext) -> dict:
    """train.compile on the SD 1.5 512 px batch-8 rank-16 bf16 step: compiled vs eager apo-fast
    (one interleaved run), then compiled apo-fast vs the compiled peft baseline; compile
    seconds apart from the step times. Target: compiled >= 1.25x eager, ahead of the baseline."""
    from apo_fast.bench.compile_step import run_compile_benchmark
    from apo_fast.bench.step import run_step_benchmark
    from apo_fast.bench.step_config import StepBenchConfig

    checks = _compiled_op_checks(ctx.device)
    spec = {"model": "sd15", "batch": 8, "r": 16, "precision": "bf16", "steps": 8, "warmup": 2}
    if ctx.dry_run or not ctx.cuda:
        spec = {"model": "tiny", "batch": 2, "r": 4, "resolution": 16, "precision": "auto", "steps": 2, "warmup": 2,
                "compile_backend": "eager"}  # the code path, not Inductor's CPU compile minutes
    own = run_compile_benchmark(StepBenchConfig(device=str(ctx.device), **spec), ctx.scratch / "compile_own")
    budget = max(ctx.seconds_left() - 15.0, 10.0)
    versus = run_step_benchmark(StepBenchConfig(device=str(ctx.device), time_budget_s=budget, compile=True, **spec),
                                workdir=ctx.scratch / "compile_vs", progress=True)
    ratio = versus["ratios"]["samples_per_s"]
    headline = (f"compiled/eager x{own['ratio_samples_per_s']:.2f} (compile {own['compiled']['compile_s']:.0f} s); "
                f"compiled apo-fast vs compiled baseline x{ratio:.2f}")
    return {"result": {"op_checks": checks, "compiled_vs_eager": own, "compiled_vs_baseline": versus},
            "headline": f"{headline}; compiled ops vs eager max rel err {max(checks.values()):.1e}"}


def _compiled_op_checks(device) -> dict:
    """Inductor-compiled (fullgraph) gated LoRA linear and APO loss vs the same ops eager, outputs and
    gradients: on CUDA this runs the user Triton kernels (autotuned) inside the compiled graph."""
    import torch

    from apo_fast.losses import apo_loss
    from apo_fast.ops.gated_lora import gated_lora_linear

    backend = "triton" if device.type == "cuda" else "torch"
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device)

    x, w, b = rand(4, 77, 320).requires_grad_(), rand(640, 320), rand(640)
    A, B, gate = (rand(16, 320) * 0.05).requires_grad_(), rand(640, 16).requires_grad_(), rand(4, 16).sigmoid()
    gate.requires_grad_()

    def lora(x, A, B, gate):
        return gated_lora_linear(x, w, b, A, B, gate, 1.0, backend=backend)

    p, r, t = rand(4, 4, 16, 16).requires_grad_(), rand(4, 4, 16, 16), rand(4, 4, 16, 16)

    def loss(p):
        return apo_loss(p, r, t, 50.0, backend=backend).loss

    out = {}
    for name, fn, args in (("gated_lora_linear", lora, (x, A, B, gate)), ("apo_loss", loss, (p,))):
        results = []
        for f in (fn, torch.compile(fn, fullgraph=True)):
            for a in args:
                a.grad = None
            y = f(*args)
            (y.float() * torch.linspace(-1, 1, y.numel(), device=device).reshape(y.shape)).sum().backward()
            results.append([y.detach()] + [a.grad.clone() for a in args])
        out[name] = max(float((c - e).abs().max() / e.abs().max().clamp_min(1e-30)) for e, c in zip(*results))
    return out


def part_step_sdxl(ctx: PartContext) -> dict:
    """SDXL UNet, 1024 px (128x128 latents), batch 1 pair, rank 16, bf16."""
    spec = {"model": "sdxl", "batch": 1, "r": 16, "precision": "bf16", "steps": 8, "warmup": 2}
    return _step_part(ctx, "step_sdxl", spec)


def _issue5_config(model: str, vae_dir, device, dry_run: bool, optimizer: str):
    """``configs/sd15_mvtec.yaml`` on a random-weight UNet preset and the demo data (nothing downloaded)."""
    from apo_fast.config import load_config

    overrides = [
        "model.pretrained=null",
        f"model.preset={model}",
        "data.root=builtin:demo",
        "data.category=brick",
        "train.progress=false",
        f"train.device={device}",
        f"optim.name={optimizer}",
        "optim.warmup_steps=0",
    ]
    if dry_run:
        overrides += [
            "model.latent=false",
            "model.vae=null",
            "data.image_size=32",
            "train.batch_size=2",
            "adapter.r=4",
            "train.mixed_precision='no'",
            "train.gradient_checkpointing=true",
            "model.noise_schedule=squaredcos_cap_v2",
        ]
    else:
        size, batch = (512, 4) if model == "sd15" else (1024, 1)
        overrides += [f"model.vae={vae_dir}", f"data.image_size={size}", f"train.batch_size={batch}"]
        if model == "sdxl":
            overrides.append("model.unet={addition_embed_type: null}")
    return load_config(REPO / "configs" / "sd15_mvtec.yaml", overrides)


def part_memory(ctx: PartContext, which: str) -> dict:
    """Measured peak memory of an issue-5 config (``which``: sd15 or sdxl) vs the planner's estimate."""
    from apo_fast.bench.measured_memory import measure_training_memory
    from apo_fast.bench.memory_plan import plan_memory
    from apo_fast.bench.sides import save_random_vae
    from apo_fast.config.unet_presets import UNET_PRESETS

    try:
        import bitsandbytes  # noqa: F401

        optimizer = "adamw8bit"
    except Exception:  # noqa: BLE001 - not carried to this machine: the 8-bit state is a few MiB of a multi-GiB peak
        optimizer = "adamw"
    dry = ctx.dry_run or not ctx.cuda
    # (name, preset, pixels, batch, target GiB (issue 5; issue 14 for the NF4 base), minimum seconds
    # to try, base quantization)
    cases = {
        "sd15": [("sd15_512_b4", "sd15", 512, 4, 6.0, 30.0, "none"),
                 ("sd15_512_b4_nf4", "sd15", 512, 4, 3.0, 30.0, "nf4")],
        "sdxl": [("sdxl_1024_b1", "sdxl", 1024, 1, 12.0, 40.0, "none"),
                 ("sdxl_1024_b1_nf4", "sdxl", 1024, 1, 6.0, 40.0, "nf4")],
    }
    cases = cases[which]
    if dry:
        cases = [("tiny_32_b2", "tiny", 32, 2, None, 5.0, "none"), ("tiny_32_b2_nf4", "tiny", 32, 2, None, 5.0, "nf4")]
    records = []
    for name, model, size, batch, target_gib, need, quant in cases:
        if ctx.seconds_left() < need:
            records.append({"case": name, "status": f"skipped: {ctx.seconds_left():.0f} s left, needs {need:.0f} s"})
            continue
        try:
            vae_dir = None if dry else save_random_vae(model, ctx.scratch / f"vae_{model}")
            cfg = _issue5_config(model, vae_dir, ctx.device, dry, optimizer)
            cfg.model.base_quantization = quant
            cfg.output_dir = str(ctx.scratch / f"run_{name}")
            measured = measure_training_memory(cfg, steps=2)
            unet_cfg = dict(UNET_PRESETS[model])
            unet_cfg.update(cfg.model.unet)
            plan_cfg = {
                "unet": unet_cfg,
                "batch_size": cfg.train.batch_size,
                "paired": cfg.loss.mode == "paired",
                "condition_tokens": cfg.model.cond_tokens,
                "r": cfg.adapter.r,
                "precision": cfg.train.mixed_precision,
                "gradient_checkpointing": cfg.train.gradient_checkpointing,
                "attention": "sdpa",
                "optimizer": optimizer,
                "extra_trainable_params": measured["condition_parameters"],
                "base_quantization": quant,
            }
            if dry:
                unet_cfg.update(in_channels=3, out_channels=3)
                plan_cfg["latent_size"] = size
            else:
                plan_cfg["resolution"] = size
            plan = plan_memory(plan_cfg)
            rec = {
                "case": name,
                "status": "ok",
                "optimizer": optimizer,
                "measured": measured,
                "plan_allocated_mib": plan.allocated / MIB,
                "plan_total_mib": plan.total / MIB,
                "plan_breakdown_mib": {k: v / MIB for k, v in plan.breakdown().items()},
            }
            if "max_allocated_mib" in measured:
                got = measured["max_allocated_mib"]
                rec["plan_error_pct"] = 100.0 * (rec["plan_allocated_mib"] - got) / got
                rec["within_15pct"] = abs(rec["plan_error_pct"]) <= 15.0
                if target_gib is not None:
                    rec["target_gib"] = target_gib
                    rec["meets_target_allocated"] = got / 1024 < target_gib
                    rec["meets_target_reserved"] = measured["max_reserved_mib"] / 1024 < target_gib
            records.append(rec)
        except Exception as exc:  # noqa: BLE001 - one failing case must not lose the other
            records.append(
                {"case": name, "status": f"error: {type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            )
    parts = []
    for rec in records:
        if rec["status"] != "ok":
            parts.append(f"{rec['case']}: {rec['status'][:60]}")
        elif "plan_error_pct" in rec:
            parts.append(
                f"{rec['case']}: {rec['measured']['max_allocated_mib'] / 1024:.2f} GiB "
                f"(plan {rec['plan_error_pct']:+.0f}%)"
            )
        else:
            parts.append(
                f"{rec['case']}: rss {rec['measured']['rss_mib']:.0f} MiB, plan {rec['plan_allocated_mib']:.0f} MiB"
            )
    return {"cases": records, "headline": "; ".join(parts)}


def _kernel_part(ctx: PartContext, module_name: str, function: str, stem: str) -> dict:
    import torch
    import torch._dynamo

    module = load_benchmark_module(module_name)
    run = getattr(module, function)
    out_json = ctx.scratch / f"{stem}.json"
    kwargs = {"reps": 2} if ctx.dry_run else {}
    # A CPU dry run only checks that the grid runs: no torch.compile wait.
    guard = torch._dynamo.config.patch(disable=True) if ctx.dry_run else contextlib.nullcontext()
    with guard:
        records = run(ctx.device, out_json, **kwargs)
    return {
        "records": records,
        "copy": {str(out_json): f"{stem}.json"} if out_json.is_file() else {},
        "headline": _kernel_headline(stem, records),
    }


def _kernel_headline(stem: str, records: list[dict]) -> str:
    """One line from the other engineers' records; tolerant of changes in their keys."""
    try:
        if stem == "loss_kernels":
            fused = [r for r in records if r.get("version") == "fused"]
            if not fused:
                return f"{len(records)} records (no fused version on this device)"
            forms = [r for r in records if str(r.get("version", "")).startswith("fused_form:")]
            worst = max(forms, key=lambda r: r["ratio_to_sigmoid"]) if forms else None
            form_note = (f"; slowest preference form {worst['version'][11:]} on {worst['case']}: "
                         f"x{worst['ratio_to_sigmoid']:.2f} of sigmoid (target <= 1.10)") if worst else ""
            return "fused speed-up vs best baseline: " + ", ".join(
                f"{r['case']} x{r.get('speedup_vs_best_baseline', float('nan')):.2f}" for r in fused
            ) + form_note
        fused = [
            r
            for r in records
            if r.get("impl") == "fused" and r.get("rank") == 16 and r.get("mode") == "forward_backward"
        ]
        if not fused:
            return f"{len(records)} records (no fused version on this device)"
        worst_base = max(r["time_vs_base"] for r in fused)
        best_peft = min(1 / r["time_vs_peft"] for r in fused)
        return f"rank 16 fwd+bwd: fused <= x{worst_base:.2f} of base linear, >= x{best_peft:.2f} faster than peft"
    except Exception as exc:  # noqa: BLE001 - a headline must never fail the part
        return f"{len(records)} records ({type(exc).__name__} summarising them)"


def part_loss_kernels(ctx: PartContext) -> dict:
    return _kernel_part(ctx, "bench_loss", "run_loss_benchmarks", "loss_kernels")


def part_gated_lora_kernels(ctx: PartContext) -> dict:
    return _kernel_part(ctx, "bench_gated_lora", "run_gated_lora_benchmarks", "gated_lora_kernels")


@dataclasses.dataclass(frozen=True)
class Part:
    name: str
    budget_s: float  # the most this part may take
    min_s: float  # skipped when less than this is left of the suite's budget
    fn: Callable[[PartContext], dict]


PARTS = (
    Part("env", 15, 5, part_env),
    Part("correctness", 40, 10, part_correctness),
    Part("step_sd15", 100, 50, part_step_sd15),
    Part("memory_sd15", 70, 30, lambda ctx: part_memory(ctx, "sd15")),
    Part("memory_sdxl", 55, 40, lambda ctx: part_memory(ctx, "sdxl")),
    Part("loss_kernels", 75, 30, part_loss_kernels),
    Part("gated_lora_kernels", 75, 30, part_gated_lora_kernels),
    Part("step_sdxl", 80, 50, part_step_sdxl),
    Part("compile_sd15", 150, 90, part_compile_sd15),
)
PART_NAMES = tuple(p.name for p in PARTS)


# --------------------------------------------------------------------------- running parts


def _resolve_device(dry_run: bool):
    import torch

    if dry_run or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _jsonable(obj):
    """Results as JSON: tensors and other objects become floats or strings."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    try:
        return float(obj)
    except (TypeError, ValueError, RuntimeError):
        return str(obj)


def run_part(name: str, scratch: Path, seconds: float, dry_run: bool) -> dict:
    """Run one part here; returns ``{"status", "seconds", "result" | "error"}`` and writes it to
    ``scratch/<name>.result.json``."""
    part = {p.name: p for p in PARTS}[name]
    start = time.monotonic()
    record: dict[str, Any]
    try:
        ensure_apo_fast_importable()
        ctx = PartContext(_resolve_device(dry_run), dry_run, scratch, start + seconds)
        result = part.fn(ctx)
        record = {"status": "ok", "result": result}
    except Exception as exc:  # noqa: BLE001 - the part's failure is its result
        traceback.print_exc()
        record = {"status": "error", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    record["seconds"] = time.monotonic() - start
    record = _jsonable(record)
    (scratch / f"{name}.result.json").write_text(json.dumps(record, indent=1))
    return record


def _run_part_isolated(name: str, scratch: Path, seconds: float, dry_run: bool, log_file) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--part",
        name,
        "--scratch",
        str(scratch),
        "--part-seconds",
        f"{seconds:.1f}",
    ] + (["--dry-run"] if dry_run else [])
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    start = time.monotonic()
    result_file = scratch / f"{name}.result.json"
    result_file.unlink(missing_ok=True)
    try:
        proc = subprocess.run(
            cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, timeout=seconds + 10, check=False
        )
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = None
    if result_file.is_file():
        return json.loads(result_file.read_text())
    status = "timeout" if rc is None else "crashed"
    return {
        "status": status,
        "error": f"{status} (exit code {rc}) after {time.monotonic() - start:.0f} s; see suite.log",
        "seconds": time.monotonic() - start,
    }


def run_suite(
    out: Path, budget_s: float, dry_run: bool, only: tuple[str, ...] | None = None, in_process: bool = False
) -> dict:
    """Run the parts in order within ``budget_s`` seconds; write the suite's files into ``out``."""
    start = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="apo_gpu_suite_"))
    log_path = out / "suite.log"
    suite: dict[str, Any] = {
        "schema": "apo-fast-gpu-suite/1",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dry_run": dry_run,
        "budget_s": budget_s,
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "parts": {},
    }
    try:
        with open(log_path, "w") as log_file:
            for part in PARTS:
                if only and part.name not in only:
                    continue
                left = budget_s - (time.monotonic() - start)
                if left < part.min_s:
                    rec = {
                        "status": "skipped",
                        "error": f"{left:.0f} s of the suite's budget left, the part needs at least {part.min_s:.0f} s",
                        "seconds": 0.0,
                    }
                else:
                    seconds = min(part.budget_s, left)
                    print(f"[suite] {part.name}: up to {seconds:.0f} s ...", flush=True)
                    log_file.write(f"\n===== {part.name} ({seconds:.0f} s) =====\n")
                    log_file.flush()
                    if in_process:
                        with contextlib.redirect_stdout(log_file), contextlib.redirect_stderr(log_file):
                            rec = run_part(part.name, scratch, seconds, dry_run)
                    else:
                        rec = _run_part_isolated(part.name, scratch, seconds, dry_run, log_file)
                result = rec.get("result") or {}
                for src, dst in (result.get("copy") or {}).items():
                    if Path(src).is_file():
                        shutil.copyfile(src, out / dst)
                suite["parts"][part.name] = rec
                print(
                    f"[suite] {part.name}: {rec['status']} in {rec.get('seconds', 0):.0f} s"
                    + (f" ({rec['error'][:200]})" if rec.get("error") else ""),
                    flush=True,
                )
                _write_outputs(suite, out, start)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    suite["total_s"] = time.monotonic() - start
    _write_outputs(suite, out, start)
    print(short_table(suite), flush=True)
    return suite


def short_table(suite: dict) -> str:
    """The final table: one line per part with its status, time and headline."""
    rows = [("part", "status", "s", "result")]
    for name, rec in suite["parts"].items():
        headline = (rec.get("result") or {}).get("headline") or rec.get("error") or ""
        rows.append((name, rec["status"], f"{rec.get('seconds', 0):.0f}", headline[:150]))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}" for r in rows]
    total = suite.get("total_s")
    title = f"== apo-fast GPU suite{' (dry run)' if suite['dry_run'] else ''}" + (
        f": {total:.0f} s of {suite['budget_s']:.0f} ==" if total is not None else " =="
    )
    return "\n".join([title, *lines])


def summary_markdown(suite: dict) -> str:
    """SUMMARY.md: the short table, then each part's tables."""
    lines = [
        f"# apo-fast GPU suite, {suite['date']}{' (dry run)' if suite['dry_run'] else ''}",
        "",
        f"Command: `{suite['command']}`",
        "",
        "```",
        short_table(suite),
        "```",
        "",
    ]
    env = (suite["parts"].get("env") or {}).get("result")
    if env:
        lines += ["## Machine", "", "| key | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in env.items() if k != "headline"]
        lines.append("")
    corr = (suite["parts"].get("correctness") or {}).get("result")
    if corr:
        lines += [
            "## Correctness (max |fast - ref| / max |ref|, float64 reference)",
            "",
            "| op | shape | dtype | errors | pass |",
            "|---|---|---|---|---|",
        ]
        for r in corr["loss"]:
            lines.append(
                f"| apo_loss {'paired' if r['paired'] else 'unpaired'}{' mask' if r['masked'] else ''} | "
                f"{r['shape']} | {r['dtype']} | loss {r['loss_rel_err']:.1e}, e {r['e_theta_rel_err']:.1e}, "
                f"grad {r['grad_rel_err']:.1e} | {r['pass']} |"
            )
        for r in corr["gated_lora"]:
            lines.append(
                f"| gated_lora r{r['rank']} | {r['shape']} | {r['dtype']} | y {r['y_rel_err']:.1e}, "
                f"dx {r['dx_rel_err']:.1e}, dA {r['dA_rel_err']:.1e}, dB {r['dB_rel_err']:.1e} | {r['pass']} |"
            )
        u = corr["unet"]
        lines += [
            (
                f"| tiny UNet adapters ({u['backend']} vs torch) | 4x4x32x32 | {u['dtype']} | "
                f"y {u['y_rel_err']:.1e}, grads {u['grad_rel_err_max']:.1e} | {u['pass']} |"
            ),
            "",
        ]
    for name in ("step_sd15", "step_sdxl"):
        res = (suite["parts"].get(name) or {}).get("result")
        if res and res.get("markdown"):
            lines += [f"## {name}", "", res["markdown"], ""]
    mem_cases = [
        c
        for n in ("memory_sd15", "memory_sdxl")
        for c in ((suite["parts"].get(n) or {}).get("result") or {}).get("cases", [])
    ]
    if mem_cases:
        lines += [
            "## Memory (issue 5 configs) vs plan_memory",
            "",
            "| case | max allocated (MiB) | max reserved (MiB) | plan allocated (MiB) | plan error | target |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for r in mem_cases:
            if r.get("status") != "ok":
                lines.append(f"| {r['case']} | {r['status']} | | | | |")
                continue
            m = r["measured"]
            target = f"< {r['target_gib']:g} GiB: {r['meets_target_allocated']}" if "target_gib" in r else "n/a"
            lines.append(
                f"| {r['case']} ({r['optimizer']}) | {m.get('max_allocated_mib', float('nan')):.0f} | "
                f"{m.get('max_reserved_mib', float('nan')):.0f} | {r['plan_allocated_mib']:.0f} | "
                f"{r.get('plan_error_pct', float('nan')):+.1f}% | "
                f"{target} |"
            )
        lines.append("")
    for name in ("loss_kernels", "gated_lora_kernels"):
        res = (suite["parts"].get(name) or {}).get("result")
        if res:
            lines += [f"## {name}", "", res.get("headline", ""), "", f"Records: `{name}.json`.", ""]
    return "\n".join(lines) + "\n"


def _write_outputs(suite: dict, out: Path, start: float) -> None:
    public = json.loads(json.dumps(suite))
    for rec in public["parts"].values():  # suite.json carries no scratch paths
        if isinstance(rec.get("result"), dict):
            rec["result"].pop("copy", None)
    (out / "suite.json").write_text(json.dumps(public, indent=1))
    (out / "SUMMARY.md").write_text(summary_markdown(suite))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_suite", help="output folder ($OUT)")
    parser.add_argument("--budget-s", type=float, default=440.0, help="the whole suite's time budget in seconds")
    parser.add_argument("--dry-run", action="store_true", help="CPU, torch paths only, tiny sizes")
    parser.add_argument("--only", default=None, help=f"comma-separated parts of {','.join(PART_NAMES)}")
    parser.add_argument("--in-process", action="store_true", help="run the parts in this process")
    parser.add_argument("--part", choices=PART_NAMES, help=argparse.SUPPRESS)  # a child process runs one part
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    parser.add_argument("--part-seconds", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part:
        if not args.scratch or args.part_seconds is None:
            parser.error("--part needs --scratch and --part-seconds")
        rec = run_part(args.part, Path(args.scratch), args.part_seconds, args.dry_run)
        return 0 if rec["status"] == "ok" else 1
    only = None
    if args.only:
        only = tuple(s.strip() for s in args.only.split(",") if s.strip())
        unknown = sorted(set(only) - set(PART_NAMES))
        if unknown:
            parser.error(f"--only: unknown part(s) {unknown}; choose from {list(PART_NAMES)}")
    if not args.budget_s > 0:
        parser.error(f"--budget-s must be > 0, got {args.budget_s}")
    suite = run_suite(Path(args.out), args.budget_s, args.dry_run, only, args.in_process)
    failed = [n for n, r in suite["parts"].items() if r["status"] not in ("ok", "skipped")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
