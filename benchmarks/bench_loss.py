"""Benchmarks of the APO / Diffusion-DPO loss, forward + backward.

Versions, each timed as one training step's loss work (forward, then
``loss.backward()`` into the policy prediction):

* ``eager``: the public :func:`apo_fast.loss.apo_loss` on the PyTorch reference;
* ``compiled``: ``torch.compile`` of the reference core
  (:func:`apo_fast.loss.apo_loss_reference`, validation skipped);
* ``fused``: :func:`apo_fast.loss.apo_loss` on the Triton kernels (gradient
  written during forward, backward rescales it in place; CUDA only);
* ``fused_grad_in_backward``: the same kernels with the gradient pass run in
  backward instead (one launch and 2N bytes fewer; CUDA only).

Cases (``config``): ``apo`` = unpaired, (B,1,H,W) mask with lambda_mask 2,
per-sample beta_t; ``dpo`` = paired (winners then losers), no mask, float beta.
GPU shapes in bf16: SD 1.5 latents (2B=16, 4x64x64), SDXL latents (2B=8,
4x128x128) and a large bandwidth-bound shape (64, 4x256x256: 34 MB per tensor,
the passes do not fit in L2). On the CPU only the torch versions run, at a tiny
shape in float32 (the compile takes ~20 s of the ~40 s run).

Each record (``benchmark.extra_info`` under pytest) holds the time per call,
the achieved GB/s counted from the bytes the loss must move (read policy,
reference, target and mask, write the gradient: ``compulsory_bytes``), for the
fused versions also from the bytes their passes actually move
(``traffic_bytes``) and that as a fraction of the device-to-device copy
bandwidth measured in the same run, the speed-up over eager, over compiled and
over the best of the two, and on CUDA the peak memory allocated during the call
beyond its inputs.

Run: ``pytest benchmarks/bench_loss.py --benchmark-enable`` (the project's
pytest options disable timing by default, so a plain run only checks that each
version executes). :func:`run_loss_benchmarks` runs the grid without pytest,
checks the fused results against eager, and writes JSON (for the GPU suite).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path

import pytest
import torch

from apo_fast.bench.timing import synchronize, time_per_call
from apo_fast.losses import apo_loss
from apo_fast.ops.apo_loss.naive import apo_loss_reference, beta_per_term
from apo_fast.ops.backend import use_triton

VERSIONS = ("eager", "compiled", "fused", "fused_grad_in_backward")
BASELINES = ("eager", "compiled")


@dataclasses.dataclass(frozen=True)
class LossCase:
    name: str
    shape: tuple[int, ...]
    config: str  # "apo" | "dpo"

    @property
    def paired(self) -> bool:
        return self.config == "dpo"

    @property
    def masked(self) -> bool:
        return self.config == "apo"


GPU_CASES = (
    LossCase("sd15-apo", (16, 4, 64, 64), "apo"),
    LossCase("sd15-dpo", (16, 4, 64, 64), "dpo"),
    LossCase("sdxl-apo", (8, 4, 128, 128), "apo"),
    LossCase("sdxl-dpo", (8, 4, 128, 128), "dpo"),
    LossCase("large-apo", (64, 4, 256, 256), "apo"),
)
CPU_CASES = (LossCase("tiny-apo", (4, 4, 32, 32), "apo"),)


def _device_setup(device: torch.device) -> tuple[tuple[LossCase, ...], torch.dtype]:
    return (GPU_CASES, torch.bfloat16) if device.type == "cuda" else (CPU_CASES, torch.float32)


def _available(version: str, device: torch.device) -> bool:
    if version.startswith("fused"):
        return device.type == "cuda" and use_triton(torch.empty(0, device=device), override="auto")
    return True


@functools.cache
def copy_bandwidth_gbps(device_str: str) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + written per second)."""
    device = torch.device(device_str)
    nbytes = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = time_per_call(lambda: dst.copy_(src), device, warmup=2, reps=10, rounds=3)
    return 2 * nbytes / seconds / 1e9


@functools.cache
def _compiled_reference():
    return torch.compile(apo_loss_reference, dynamic=False)


def loss_bytes(case: LossCase, dtype: torch.dtype, version: str) -> tuple[int, int | None]:
    """(compulsory bytes, bytes the version's passes move or None if unknown).

    Compulsory: read policy, reference, target (and the (B,1,H,W) mask), write
    the gradient. Fused, gradient in forward: pass 1 reads p, r, t, m; pass 2
    reads p, t, m and writes g; backward reads and writes g. Gradient in
    backward: the same without the last read and write.
    """
    numel = math.prod(case.shape)
    size = torch.empty((), dtype=dtype).element_size()
    b, _, *spatial = case.shape
    mask = b * math.prod(spatial) * size if case.masked else 0
    compulsory = 4 * numel * size + mask
    if version == "fused":
        return compulsory, 8 * numel * size + 2 * mask
    if version == "fused_grad_in_backward":
        return compulsory, 6 * numel * size + 2 * mask
    return compulsory, None


class LossRunner:
    """Inputs and the forward+backward callable of one (case, version)."""

    def __init__(self, case: LossCase, version: str, device: torch.device, dtype: torch.dtype):
        gen = torch.Generator(device="cpu").manual_seed(0)

        def rand(*size):
            return torch.randn(*size, generator=gen)

        b, c, *spatial = case.shape
        base = rand(*case.shape)
        self.pred = base.to(device=device, dtype=dtype).requires_grad_()
        self.ref = (base + 0.1 * rand(*case.shape)).to(device=device, dtype=dtype)
        self.target = rand(*case.shape).to(device=device, dtype=dtype)
        self.mask = None
        if case.masked:
            self.mask = (torch.rand(b, 1, *spatial, generator=gen) > 0.7).to(device=device, dtype=dtype)
        if case.paired:
            self.beta_t = 250.0
        else:
            self.beta_t = (torch.rand(b, generator=gen) * 50 + 1).to(device)
        self.case, self.version, self.device = case, version, device
        self.kwargs = dict(mask=self.mask, lambda_mask=2.0 if case.masked else 1.0, paired=case.paired)
        self.beta = beta_per_term(self.beta_t, b, case.paired, device)

    def loss(self) -> torch.Tensor:
        v = self.version
        if v == "eager":
            return apo_loss(self.pred, self.ref, self.target, self.beta_t, backend="torch", **self.kwargs).loss
        if v == "compiled":
            k = self.kwargs
            return _compiled_reference()(
                self.pred, self.ref, self.target, self.beta, k["mask"], k["lambda_mask"], k["paired"], 0.0
            )[0]
        if v == "fused":
            return apo_loss(self.pred, self.ref, self.target, self.beta_t, backend="triton", **self.kwargs).loss
        if v == "fused_grad_in_backward":
            from apo_fast.ops.apo_loss.fused import fused_apo_loss

            return fused_apo_loss(self.pred, self.ref, self.target, self.beta_t, grad_in_forward=False, **self.kwargs)[
                0
            ]
        raise ValueError(f"unknown version {v!r}")

    def __call__(self) -> torch.Tensor:
        self.pred.grad = None
        loss = self.loss()
        loss.backward()
        return loss

    def peak_extra_bytes(self) -> int | None:
        """Peak CUDA memory allocated during one call beyond what was allocated before it."""
        if self.device.type != "cuda":
            return None
        self.pred.grad = None
        synchronize(self.device)
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self()
        synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - before


def _measure(case: LossCase, version: str, device: torch.device, dtype: torch.dtype, reps: int) -> float:
    runner = LossRunner(case, version, device, dtype)
    return time_per_call(runner, device, reps=reps)


def _record(case, version, dtype, seconds, baseline_s: dict, device, peak_extra=None) -> dict:
    compulsory, traffic = loss_bytes(case, dtype, version)
    copy_bw = copy_bandwidth_gbps(str(device))
    best = min(baseline_s.values()) if baseline_s else None
    record = {
        "case": case.name,
        "shape": list(case.shape),
        "config": case.config,
        "dtype": str(dtype).replace("torch.", ""),
        "version": version,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "time_us": seconds * 1e6,
        "compulsory_bytes": compulsory,
        "gbps_compulsory": compulsory / seconds / 1e9,
        "copy_gbps": copy_bw,
        "fraction_of_copy_bw_compulsory": compulsory / seconds / 1e9 / copy_bw,
    }
    if traffic is not None:
        record["traffic_bytes"] = traffic
        record["gbps_traffic"] = traffic / seconds / 1e9
        record["fraction_of_copy_bw_traffic"] = traffic / seconds / 1e9 / copy_bw
    for name, base in baseline_s.items():
        record[f"speedup_vs_{name}"] = base / seconds
    if best is not None:
        record["speedup_vs_best_baseline"] = best / seconds
    if peak_extra is not None:
        input_bytes = math.prod(case.shape) * torch.empty((), dtype=dtype).element_size()
        record["peak_extra_bytes"] = peak_extra
        record["peak_extra_vs_input"] = peak_extra / input_bytes
    return record


def _check_against_eager(case, device, dtype) -> dict:
    """Loss, gradient and metrics of the fused path vs eager on the same inputs."""
    eager, fused = LossRunner(case, "eager", device, dtype), LossRunner(case, "fused", device, dtype)
    out_e = apo_loss(eager.pred, eager.ref, eager.target, eager.beta_t, backend="torch", **eager.kwargs)
    out_f = apo_loss(fused.pred, fused.ref, fused.target, fused.beta_t, backend="triton", **fused.kwargs)
    out_e.loss.backward()
    out_f.loss.backward()
    g_e, g_f = eager.pred.grad.float(), fused.pred.grad.float()
    return {
        "loss_abs_err": abs(float(out_f.loss) - float(out_e.loss)),
        "e_theta_max_rel_err": float(((out_f.e_theta - out_e.e_theta).abs() / out_e.e_theta.abs()).max()),
        "grad_max_abs_err_over_max": float((g_f - g_e).abs().max() / g_e.abs().max().clamp_min(1e-30)),
        "implicit_acc_match": out_f.metrics["implicit_acc"] == out_e.metrics["implicit_acc"],
    }


def run_loss_benchmarks(
    device: str | torch.device,
    out_json: str | Path | None = None,
    *,
    cases: tuple[LossCase, ...] | None = None,
    reps: int = 20,
) -> list[dict]:
    """Time every (case, version) on ``device``; write the records to ``out_json``.

    One record per (case, version) (see the module docstring), plus on CUDA a
    ``check`` dict on the fused records comparing them with eager.
    """
    device = torch.device(device)
    default_cases, dtype = _device_setup(device)
    records = []
    for case in cases or default_cases:
        times, peaks = {}, {}
        for version in VERSIONS:
            if not _available(version, device):
                continue
            runner = LossRunner(case, version, device, dtype)
            times[version] = time_per_call(runner, device, reps=reps)
            peaks[version] = runner.peak_extra_bytes()
            del runner
        baselines = {v: times[v] for v in BASELINES if v in times}
        check = _check_against_eager(case, device, dtype) if "fused" in times else None
        for version, seconds in times.items():
            record = _record(case, version, dtype, seconds, baselines, device, peaks[version])
            if check is not None and version.startswith("fused"):
                record["check"] = check
            records.append(record)
    if device.type == "cuda":
        for case in cases or default_cases:
            records += time_forms(case, device, dtype, reps)
    if out_json is not None:
        Path(out_json).write_text(json.dumps(records, indent=1))
    return records


def time_forms(case: LossCase, device: torch.device, dtype: torch.dtype, reps: int = 20) -> list[dict]:
    """Fused forward+backward of every preference form on ``case``, as a ratio to the sigmoid
    form measured in the same run (target: within 10%). Forms that do not apply to the case's
    pairing (kto: unpaired, margin: paired) are skipped."""
    from apo_fast.config.choices import LOSS_TYPES

    runner = LossRunner(case, "fused", device, dtype)
    times = {}
    for form in LOSS_TYPES:
        if (form == "kto" and case.paired) or (form == "margin" and not case.paired):
            continue

        def step(form=form):
            out = apo_loss(runner.pred, runner.ref, runner.target, runner.beta_t, backend="triton",
                           loss_type=form, **runner.kwargs)
            out.loss.backward()
            runner.pred.grad = None

        times[form] = time_per_call(step, device, reps=reps)
    return [{"case": case.name, "version": f"fused_form:{form}", "dtype": str(dtype).replace("torch.", ""),
             "seconds": t, "ratio_to_sigmoid": t / times["sigmoid"]} for form, t in times.items()]


# --- pytest-benchmark ---------------------------------------------------------------

_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_CASES, _DTYPE = _device_setup(_DEVICE)


@pytest.fixture(scope="module")
def baseline_times():
    """Time per call of the baselines per case, measured once in this run."""
    cache: dict = {}

    def get(case: LossCase) -> dict:
        if case not in cache:
            cache[case] = {v: _measure(case, v, _DEVICE, _DTYPE, reps=5) for v in BASELINES}
        return cache[case]

    return get


@pytest.mark.benchmark(group="apo_loss", min_rounds=5, max_time=0.5, warmup=False)
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("case", _CASES, ids=lambda c: c.name)
def test_apo_loss_forward_backward(benchmark, baseline_times, case, version):
    if not _available(version, _DEVICE):
        pytest.skip(f"{version} needs a CUDA device with Triton")
    runner = LossRunner(case, version, _DEVICE, _DTYPE)
    runner()  # compile / autotune outside the timing

    def step():
        loss = runner()
        synchronize(_DEVICE)
        return loss

    loss = benchmark(step)
    assert torch.isfinite(loss) and runner.pred.grad is not None
    seconds = time_per_call(runner, _DEVICE, reps=5)
    record = _record(case, version, _DTYPE, seconds, baseline_times(case), _DEVICE, runner.peak_extra_bytes())
    benchmark.extra_info.update(record)
