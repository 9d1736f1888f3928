"""Compile every fused APO-loss kernel variant for sm_80 and sm_90 on the CPU.

Fails on a compile error or register spills. Variants:

* residual sums and gradient: {fp32, fp16, bf16} x mask mode {none, direct,
  channels_last broadcast} (x HAS_SCALE for the gradient), default GPU config,
  arguments specialised as Triton's launcher does for aligned SD shapes
  (16-byte aligned pointers, sizes divisible by 16, ``repeats == 1`` a
  constant); on sm_90 the SASS is checked for 128-bit loads/stores;
* the same kernels with every other autotune candidate (bf16, direct mask) and
  with unaligned sizes (fp16);
* finalize: {unpaired, paired} x {float beta, per-term beta} at a typical
  tile and at the largest tile the launcher uses.

Run as a script to print the per-variant report table:
``python tests/ops/apo_loss/test_compile.py``.
"""

from __future__ import annotations

import functools
import json
import sys

import pytest

from apo_fast.config.choices import LOSS_TYPES

pytest.importorskip("triton")

from apo_fast.kernels import apo_loss as K  # noqa: E402

from apo_fast.aot import compile as aot  # noqa: E402
from apo_fast.ops.apo_loss.fused import (  # noqa: E402
    FINALIZE_TILE,
    FINALIZE_WARPS,
    MAX_CHUNKS,
    finalize_blocks,
)

ARCHS = (80, 90)
DTYPES = ("fp32", "fp16", "bf16")
MASK_MODES = {"nomask": K.MASK_NONE, "direct": K.MASK_DIRECT, "cldiv": K.MASK_DIV}
MAX_DEFAULT_REGISTERS = 72  # keeps >= 7 blocks of 4 warps per SM on the default config


def _stream_signature(kernel: str, dtype: str, mode: str, aligned: bool) -> tuple[dict, dict]:
    p = f"*{dtype}:16" if aligned else f"*{dtype}"
    f32p = "*fp32:16"
    i16 = "i32:16" if aligned else "i32"
    sizes = dict(
        sample_numel=i16, mask_sample_numel=i16, positions=i16, repeats="i32", repeat_stride=i16, chunk="i32:16"
    )
    if kernel == "sums":
        sig = dict(pred_ptr=p, ref_ptr=p, target_ptr=p, mask_ptr=p, partial_ptr=f32p, **sizes, n_chunks="i32")
    else:
        sig = dict(pred_ptr=p, target_ptr=p, mask_ptr=p, coef_ptr=f32p, scale_ptr=f32p, grad_ptr=p, **sizes)
    sig["lambda_minus_one"] = "fp32"
    constexprs = {"MASK_MODE": MASK_MODES[mode], "MASK_DIV": 4 if mode == "cldiv" else 1}
    if mode != "direct":  # a (B,1,H,W) mask on NCHW data is the only case with repeats > 1
        del sig["repeats"]
        constexprs["repeats"] = 1
    return sig, constexprs


def _variants() -> list[tuple]:
    """(kernel, dtype, mode, flag, arch, config index, aligned)."""
    out = []
    for arch in ARCHS:
        for dtype in DTYPES:
            for mode in MASK_MODES:
                out.append(("sums", dtype, mode, False, arch, 0, True))
                out.append(("grad", dtype, mode, False, arch, 0, True))
                out.append(("grad", dtype, mode, True, arch, 0, True))
        for ci in range(1, len(K.GPU_STREAM_CONFIGS)):
            out.append(("sums", "bf16", "direct", False, arch, ci, True))
            out.append(("grad", "bf16", "direct", False, arch, ci, True))
        out.append(("sums", "fp16", "nomask", False, arch, 0, False))
        out.append(("grad", "fp16", "direct", True, arch, 0, False))
        for paired in (False, True):
            for per_term in (False, True):
                out.append(("finalize", "fp32", "typical", (paired, per_term), arch, 0, True))
                out.append(("finalize", "fp32", "largest", (paired, per_term), arch, 0, True))
        # the preference-form finalize kernel: every form, weights on, KTO labels, the largest tile
        for form, name in enumerate(LOSS_TYPES):
            for paired in {"kto": (False,), "margin": (True,)}.get(name, (False, True)):
                out.append(("pref_finalize", "fp32", "largest", (paired, True, form), arch, 0, True))
    return out


def _spec(variant) -> aot.KernelSpec:
    kernel, dtype, mode, flag, arch, ci, aligned = variant
    if kernel == "pref_finalize":
        return _pref_finalize_spec(flag, arch)
    if kernel == "finalize":
        paired, per_term = flag
        n_terms, n_chunks = (8, 16) if mode == "typical" else (2, MAX_CHUNKS)
        block_chunks, block_terms = finalize_blocks(n_terms, n_chunks)
        assert block_chunks * block_terms <= FINALIZE_TILE
        sig = dict(
            partial_ptr="*fp32:16",
            beta_ptr="*fp32:16",
            stats_ptr="*fp32:16",
            loss_ptr="*fp32:16",
            n_samples="i32",
            n_terms="i32",
            n_chunks="i32",
            beta_value="fp32",
            inv_numel="fp32",
            inv_terms="fp32",
            inv_samples="fp32",
            lambda_sft="fp32",
        )
        constexprs = dict(PAIRED=paired, BETA_PER_TERM=per_term, BLOCK_TERMS=block_terms, BLOCK_CHUNKS=block_chunks)
        return aot.KernelSpec(
            K.apo_loss_finalize_kernel, sig, constexprs, arch, FINALIZE_WARPS, 3, with_sass=arch == 90
        )
    sig, constexprs = _stream_signature(kernel, dtype, mode, aligned)
    config = K.GPU_STREAM_CONFIGS[ci]
    constexprs["BLOCK"] = config.kwargs["BLOCK"]
    if kernel == "grad":
        constexprs["HAS_SCALE"] = flag
    fn = K.apo_residual_sums_kernel if kernel == "sums" else K.apo_grad_kernel
    with_sass = arch == 90 and ci == 0
    return aot.KernelSpec(fn, sig, constexprs, arch, config.num_warps, config.num_stages, with_sass=with_sass)


def _pref_finalize_spec(flag, arch) -> aot.KernelSpec:
    paired, per_term, form = flag
    n_terms, n_chunks = 2, MAX_CHUNKS
    block_chunks, block_terms = finalize_blocks(n_terms, n_chunks)
    sig = dict(
        partial_ptr="*fp32:16", beta_ptr="*fp32:16", labels_ptr="*fp32:16", weights_ptr="*fp32:16",
        stats_ptr="*fp32:16", loss_ptr="*fp32:16", n_samples="i32", n_terms="i32", n_chunks="i32",
        beta_value="fp32", inv_numel="fp32", inv_terms="fp32", inv_samples="fp32", lambda_sft="fp32",
        lambda_d="fp32", lambda_u="fp32",
    )
    constexprs = dict(FORM=form, PAIRED=paired, BETA_PER_TERM=per_term, HAS_LABELS=LOSS_TYPES[form] == "kto",
                      HAS_WEIGHTS=True, BLOCK_TERMS=block_terms, BLOCK_CHUNKS=block_chunks)
    return aot.KernelSpec(K.apo_preference_finalize_kernel, sig, constexprs, arch, FINALIZE_WARPS, 3,
                          with_sass=arch == 90)


@functools.lru_cache(maxsize=1)
def _reports() -> dict:
    """Compile every variant once (one child process for the lot)."""
    variants = _variants()
    return dict(zip(variants, aot.compile_kernels([_spec(v) for v in variants]), strict=True))


def _label(variant) -> str:
    kernel, dtype, mode, flag, arch, ci, aligned = variant
    if kernel == "pref_finalize":
        extra = f"-{LOSS_TYPES[flag[2]]}" + "-paired" * flag[0]
    else:
        extra = (
            {False: "", True: "-scale"}.get(flag, "")
            if kernel != "finalize"
            else "-paired" * flag[0] + "-betavec" * flag[1]
        )
    return f"{kernel}-{dtype}-{mode}{extra}-sm{arch}-cfg{ci}" + ("" if aligned else "-unaligned")


@pytest.mark.parametrize("variant", _variants(), ids=_label)
def test_compiles_without_spills(variant):
    report = _reports()[variant]
    assert not report.has_spills, f"{_label(variant)} spills: {report.summary()}"
    kernel, dtype, mode, flag, arch, ci, aligned = variant
    if kernel not in ("finalize", "pref_finalize") and ci == 0 and aligned:
        assert report.registers <= MAX_DEFAULT_REGISTERS, report.summary()
    if report.sass and kernel not in ("finalize", "pref_finalize") and aligned:
        # Every streamed tensor (p, r, t for the sums; p, t for the gradient)
        # moves in 128-bit accesses; a direct mask too.
        streamed = (3 if kernel == "sums" else 2) + (mode == "direct")
        per_tensor = K.GPU_STREAM_CONFIGS[ci].kwargs["BLOCK"] // (32 * report.num_warps * (4 if dtype == "fp32" else 8))
        assert report.count("LDG.E.128") >= streamed * per_tensor, report.key_counts()
        if kernel == "grad":
            assert report.count("STG.E.128") >= per_tensor, report.key_counts()


def _table() -> list[dict]:
    rows = []
    for variant, report in _reports().items():
        s = report.summary()
        rows.append(
            {
                "variant": _label(variant),
                "registers": s["registers"],
                "spills": (s["spill_stores"] or 0) + (s["spill_loads"] or 0) + s["local_bytes"] + s["stack_bytes"],
                "LDG.E.128": report.count("LDG.E.128") if report.sass else None,
                "LDG.E(all)": report.count("LDG.E") if report.sass else None,
                "STG.E.128": report.count("STG.E.128") if report.sass else None,
                "sass_instructions": s["sass_instructions"],
            }
        )
    return rows


if __name__ == "__main__":
    json.dump(_table(), sys.stdout, indent=1)
