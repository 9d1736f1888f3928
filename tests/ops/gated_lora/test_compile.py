"""Compile every gated-LoRA kernel variant for sm_80 and sm_90 on the CPU.

Fails on a compile error or register spills, and checks the SASS uses tensor
cores (HMMA on sm_80; HGMMA or HMMA on sm_90). bf16 is only checked here: the
Triton interpreter's tl.dot on bf16 is wrong, so the interpreter tests cover
fp32 and fp16. Variants: every kernel x {fp16, bf16} x {sm_80, sm_90} x its padded ranks
(both sides of the in-loop / rank-chunked switch), with the first (default)
GPU config of its autotune list; the test marked ``slow`` checks every other
autotune candidate (fp16, both archs) too.

Run as a script to print the per-variant report table:
``python tests/ops/gated_lora/test_compile.py [--all]``.
"""
from __future__ import annotations

import functools
import json
import sys

import pytest

triton = pytest.importorskip("triton")

from apo_fast.kernels import gated_lora as kernels  # noqa: E402
from apo_fast.kernels.gated_lora import autotune_configs  # noqa: E402

from apo_fast.aot import compile as aot  # noqa: E402
from apo_fast.ops.gated_lora.fused import IN_LOOP_MAX_R_PAD, R_CHUNK  # noqa: E402

DTYPES = ("fp16", "bf16")
ARCHS = (80, 90)
# Padded ranks each kernel is launched with (the in-loop variants only up to IN_LOOP_MAX_R_PAD).
RANK_PADS = {
    "forward": (16, 128),  # in-loop h (up to IN_LOOP_MAX_R_PAD) and rank-chunked h
    "backward_dx": (16, 128),
    "backward_dadb": (16, 64, 128),
    "project": (64, 128),
}
KERNEL_FNS = {
    "forward": kernels.gated_lora_forward_kernel,
    "backward_dx": kernels.gated_lora_backward_dx_kernel,
    "backward_dadb": kernels.gated_lora_backward_dadb_kernel,
    "project": kernels.lowrank_project_kernel,
}


def _signature(kernel: str, dtype: str) -> dict[str, str]:
    """Argument types as Triton's launcher specialises them for aligned shapes
    (pointers 16-byte aligned; in/out features and row strides divisible by 16;
    token count, rank and gate stride left unconstrained)."""
    p, f32p, i, i16 = f"*{dtype}:16", "*fp32:16", "i32", "i32:16"
    if kernel == "forward":
        sig = dict.fromkeys(["x_ptr", "w_ptr", "bias_ptr", "a_ptr", "b_ptr", "y_ptr", "h_ptr"], p)
        sig.update(gate_ptr=f32p, M=i, N=i16, K=i16, rank=i, tokens_per_sample=i, scaling="fp32",
                   stride_xm=i16, stride_wn=i16, stride_am=i16, stride_bn=i, stride_gs=i,
                   stride_ym=i16, stride_hm=i)
    elif kernel == "backward_dx":
        sig = dict.fromkeys(["dy_ptr", "w_ptr", "a_ptr", "b_ptr", "dx_ptr"], p)
        sig.update(gate_ptr=f32p, u_ptr=f32p, M=i, N=i16, K=i16, rank=i, tokens_per_sample=i,
                   scaling="fp32", stride_dym=i16, stride_wn=i16, stride_am=i16, stride_bn=i,
                   stride_gs=i, stride_dxm=i16, stride_um=i)
    elif kernel == "backward_dadb":
        sig = dict.fromkeys(["x_ptr", "h_ptr", "dy_ptr"], p)
        sig.update(u_ptr=f32p, gate_ptr=f32p, da_part_ptr=f32p, dbt_part_ptr=f32p, M=i, N=i16,
                   K=i16, rank=i, tokens_per_sample=i, scaling="fp32", tokens_per_split=i16,
                   stride_um=i, stride_xm=i16, stride_hm=i, stride_dym=i16, stride_gs=i,
                   stride_das=i16, stride_dar=i16, stride_dbs=i16, stride_dbr=i16)
    else:  # project: h = x A^T (F = A, rank stride K) as the forward launches it
        sig = {"x_ptr": p, "f_ptr": p, "out_ptr": p, "M": i, "C": i16, "rank": i,
               "stride_xm": i16, "stride_fr": i16, "stride_fc": i, "stride_om": i}
    return sig


def _flags(kernel: str, r_pad: int) -> dict:
    """The fullest variant of each kernel at this rank (every optional term on)."""
    in_loop = r_pad <= IN_LOOP_MAX_R_PAD
    if kernel == "forward":
        return {"HAS_BIAS": True, "HAS_GATE": True, "H_IN_LOOP": in_loop, "STORE_H": in_loop,
                "R_CHUNK": R_CHUNK}
    if kernel == "backward_dx":
        return {"HAS_GATE": True, "U_IN_LOOP": in_loop, "STORE_U": in_loop, "R_CHUNK": R_CHUNK}
    if kernel == "backward_dadb":
        return {"HAS_GATE": True, "COMPUTE_DA": True, "COMPUTE_DB": True}
    return {}


def _config(kernel: str, dtype: str, r_pad: int, index: int):
    return autotune_configs(interpret=False, r_pad=r_pad, fp32=dtype == "fp32")[kernel][index]


def _spec(kernel: str, dtype: str, arch: int, r_pad: int, config) -> aot.KernelSpec:
    precision = "ieee" if dtype == "fp32" else "tf32"
    constexprs = {**_flags(kernel, r_pad), "R_PAD": r_pad, "DOT_PRECISION": precision, **config.kwargs}
    return aot.KernelSpec(KERNEL_FNS[kernel], _signature(kernel, dtype), constexprs, arch,
                          config.num_warps, config.num_stages)


def _variants(all_configs: bool = False) -> list[tuple[str, str, int, int, int]]:
    """(kernel, dtype, arch, r_pad, config index) of the checked variants: the
    default config of each kernel at each padded rank, dtype and arch; with
    ``all_configs`` also the other autotune candidates (fp16, both archs) and
    the fp32 configs (IEEE dots, the GPU correctness path)."""
    out = []
    for k, r_pads in RANK_PADS.items():
        for r in r_pads:
            n_configs = len(autotune_configs(interpret=False, r_pad=r)[k])
            for a in ARCHS:
                out.extend((k, d, a, r, 0) for d in DTYPES)
                if all_configs:
                    out.extend((k, "fp16", a, r, ci) for ci in range(1, n_configs))
                    out.append((k, "fp32", a, r, 0))
    return out


@functools.lru_cache(maxsize=2)
def _reports(all_configs: bool = False) -> dict:
    """Compile the variants once (one child process for the lot)."""
    variants = _variants(all_configs)
    specs = [_spec(k, d, a, r, _config(k, d, r, ci)) for k, d, a, r, ci in variants]
    return dict(zip(variants, aot.compile_kernels(specs)))


def _label(v) -> str:
    k, d, a, r, ci = v
    return f"{k}-{d}-sm{a}-r{r}-cfg{ci}"


def _check(variant, report) -> None:
    assert not report.has_spills, f"{_label(variant)} spills: {report.summary()}"
    arch = variant[2]
    mma = report.count("HMMA") + (report.count("HGMMA") if arch == 90 else 0)
    if variant[1] != "fp32":  # IEEE fp32 dots run on the FMA units by design
        assert mma > 0, f"{_label(variant)} has no tensor-core MMA: {report.key_counts()}"
    limit = 232_448 if arch == 90 else 166_912  # opt-in shared memory per block (H100, A100)
    assert report.shared_bytes <= limit, f"{_label(variant)} needs {report.shared_bytes} B shared"


@pytest.mark.parametrize("variant", _variants(), ids=_label)
def test_default_config_compiles_without_spills_and_uses_tensor_cores(variant):
    _check(variant, _reports()[variant])


@pytest.mark.exhaustive
def test_every_autotune_candidate_compiles_without_spills():
    """The whole candidate lists (about 100 compiles; several minutes on 2 cores)."""
    reports = _reports(all_configs=True)
    for variant, report in reports.items():
        _check(variant, report)


def _table(all_configs: bool) -> list[dict]:
    rows = []
    for variant, report in _reports(all_configs).items():
        s = report.summary()
        rows.append({
            "variant": _label(variant),
            "registers": s["registers"],
            "shared_bytes": s["shared_bytes"],
            "spills": s["spill_stores"] + s["spill_loads"] + s["local_bytes"] + s["stack_bytes"],
            "HMMA": report.count("HMMA"),
            "HGMMA": report.count("HGMMA"),
            "sass_instructions": s["sass_instructions"],
        })
    return rows


if __name__ == "__main__":
    json.dump(_table(all_configs="--all" in sys.argv), sys.stdout, indent=1)
