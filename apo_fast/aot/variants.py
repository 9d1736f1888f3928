"""Every kernel variant the C library embeds: arch, dtype, selection key, signature hints and
constexprs (the table :mod:``apo_fast.aot.library`` compiles and the C launchers search).
"""
from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Sequence
from typing import Any

ARCHS = (80, 90)
DTYPES = ("fp32", "fp16", "bf16")  # index = C enum apo_fk_dtype
LOSS_MODULE = "apo_fast.kernels.apo_loss"
GATED_LORA_MODULE = "apo_fast.kernels.gated_lora"

# Streaming-kernel configs of the C library: indices into
# apo_loss.GPU_STREAM_CONFIGS. The launcher uses the first when the chunk is
# shorter than the second's BLOCK (the Python autotuner prunes such configs too).
LOSS_STREAM_CONFIGS = (0, 3)
# channels_last data with a (B, 1, H, W) mask divides the element index by C
# (a compile-time constant): compiled for latents with 4 channels only.
LOSS_MASK_DIV_CHANNELS = 4
# Finalize kernel tiles (BLOCK_CHUNKS, BLOCK_TERMS), 8 warps: the launcher takes the
# smallest BLOCK_CHUNKS >= n_chunks and loops over the terms BLOCK_TERMS at a time.
# (128, 16) spilled on sm_80 when paired; these do not (see the compile report).
LOSS_FINALIZE_TILES = ((16, 64), (128, 8), (1024, 2))
# Gated LoRA: padded ranks (rank <= 16 -> 16, <= 64 -> 64) and storage dtypes.
GATED_LORA_RANK_PADS = (16, 64)
GATED_LORA_DTYPES = ("fp16", "bf16")

# C identifiers of the kernels (enum apo_fk_kernel_id in csrc/apo_fk_internal.h).
KERNEL_IDS = {
    "RESIDUAL_SUMS": ("apo_residual_sums_kernel", LOSS_MODULE),
    "LOSS_FINALIZE": ("apo_loss_finalize_kernel", LOSS_MODULE),
    "LOSS_GRAD": ("apo_grad_kernel", LOSS_MODULE),
    "GL_FORWARD": ("gated_lora_forward_kernel", GATED_LORA_MODULE),
    "GL_PROJECT": ("lowrank_project_kernel", GATED_LORA_MODULE),
    "GL_BACKWARD_DX": ("gated_lora_backward_dx_kernel", GATED_LORA_MODULE),
    "GL_BACKWARD_DADB": ("gated_lora_backward_dadb_kernel", GATED_LORA_MODULE),
}
# What each variant's four-int selection key means (same order in the C launchers).
KEY_FIELDS = {
    "RESIDUAL_SUMS": ("mask_mode", "aligned", "block"),
    "LOSS_FINALIZE": ("paired", "beta_per_term", "block_chunks"),
    "LOSS_GRAD": ("mask_mode", "has_scale", "aligned", "block"),
    "GL_FORWARD": ("r_pad", "has_bias"),
    "GL_PROJECT": ("r_pad", "out_fp32"),
    "GL_BACKWARD_DX": ("r_pad",),
    "GL_BACKWARD_DADB": ("r_pad",),
}
MANIFEST_VERSION = 1


@dataclasses.dataclass(frozen=True)
class LibraryVariant:
    """One kernel variant compiled into the C library.

    ``key`` holds the values of ``KEY_FIELDS[kernel]`` (the C launcher's
    selection key); ``signature`` the Triton type of every runtime argument
    (``":16"`` = promised alignment/divisibility); ``constexprs`` the values
    of the compile-time arguments.
    """

    kernel: str
    arch: int
    dtype: str
    key: tuple[int, ...]
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int

    @property
    def fn_name(self) -> str:
        return KERNEL_IDS[self.kernel][0]

    @property
    def module(self) -> str:
        return KERNEL_IDS[self.kernel][1]

    @property
    def label(self) -> str:
        fields = ",".join(f"{name}={value}" for name, value in zip(KEY_FIELDS[self.kernel], self.key, strict=True))
        return f"{self.kernel.lower()}[{self.dtype},{fields},sm_{self.arch}]"

    def function(self) -> Any:
        """The ``@triton.jit`` kernel (autotune wrappers included) from its module."""
        return getattr(importlib.import_module(self.module), self.fn_name)

    def kernel_spec(self, with_sass: bool = True) -> Any:
        """The variant as an ``apo_fast.aot.compile.KernelSpec`` (for the compile report)."""
        from apo_fast.aot import compile as aot

        return aot.KernelSpec(
            self.function(),
            dict(self.signature),
            dict(self.constexprs),
            self.arch,
            self.num_warps,
            self.num_stages,
            with_sass,
        )


# --------------------------------------------------------------------------- variants


def _loss_stream_variant(kernel: str, arch: int, dtype: str, mode: int, flag: bool, aligned: bool, ci: int):
    from apo_fast.kernels import apo_loss as K

    p = f"*{dtype}:16" if aligned else f"*{dtype}"
    f32p = "*fp32:16" if aligned else "*fp32"
    size = "i32:16" if aligned else "i32"
    # chunk is a multiple of GPU_CHUNK_ALIGN (512) in every plan.
    sizes = {
        "sample_numel": size,
        "mask_sample_numel": size,
        "positions": size,
        "repeats": "i32",
        "repeat_stride": size,
        "chunk": "i32:16",
    }
    if kernel == "RESIDUAL_SUMS":
        sig = dict(pred_ptr=p, ref_ptr=p, target_ptr=p, mask_ptr=p, partial_ptr=f32p, **sizes, n_chunks="i32")
    else:
        sig = dict(pred_ptr=p, target_ptr=p, mask_ptr=p, coef_ptr=f32p, scale_ptr=f32p, grad_ptr=p, **sizes)
    sig["lambda_minus_one"] = "fp32"
    config = K.GPU_STREAM_CONFIGS[ci]
    block = config.kwargs["BLOCK"]
    constexprs: dict[str, Any] = {
        "MASK_MODE": mode,
        "MASK_DIV": LOSS_MASK_DIV_CHANNELS if mode == K.MASK_DIV else 1,
        "BLOCK": block,
    }
    if mode != K.MASK_DIRECT:
        # Only a (B, 1, H, W) mask on NCHW data repeats positions over channels.
        del sig["repeats"]
        constexprs["repeats"] = 1
    if kernel == "RESIDUAL_SUMS":
        key = (mode, int(aligned), block)
    else:
        constexprs["HAS_SCALE"] = flag
        key = (mode, int(flag), int(aligned), block)
    return LibraryVariant(kernel, arch, dtype, key, sig, constexprs, config.num_warps, config.num_stages)


def loss_variants(arch: int) -> list[LibraryVariant]:
    """The fused APO-loss variants for one architecture."""
    from apo_fast.kernels import apo_loss as K
    from apo_fast.ops.apo_loss.fused import FINALIZE_TILE, FINALIZE_WARPS

    if any(c * t > FINALIZE_TILE for c, t in LOSS_FINALIZE_TILES):
        raise ValueError(f"finalize tiles {LOSS_FINALIZE_TILES} exceed FINALIZE_TILE={FINALIZE_TILE}")

    out = []
    for dtype in DTYPES:
        for mode in (K.MASK_NONE, K.MASK_DIRECT, K.MASK_DIV):
            combos = [(True, ci) for ci in LOSS_STREAM_CONFIGS] + [(False, LOSS_STREAM_CONFIGS[0])]
            for aligned, ci in combos:
                out.append(_loss_stream_variant("RESIDUAL_SUMS", arch, dtype, mode, False, aligned, ci))
                for has_scale in (False, True):
                    out.append(_loss_stream_variant("LOSS_GRAD", arch, dtype, mode, has_scale, aligned, ci))
    fin_sig = dict.fromkeys(("partial_ptr", "beta_ptr", "stats_ptr", "loss_ptr"), "*fp32")
    fin_sig.update(dict.fromkeys(("n_samples", "n_terms", "n_chunks"), "i32"))
    fin_sig.update(dict.fromkeys(("beta_value", "inv_numel", "inv_terms", "inv_samples", "lambda_sft"), "fp32"))
    for paired in (False, True):
        for per_term in (False, True):
            for block_chunks, block_terms in LOSS_FINALIZE_TILES:
                constexprs = {
                    "PAIRED": paired,
                    "BETA_PER_TERM": per_term,
                    "BLOCK_TERMS": block_terms,
                    "BLOCK_CHUNKS": block_chunks,
                }
                key = (int(paired), int(per_term), block_chunks)
                out.append(
                    LibraryVariant("LOSS_FINALIZE", arch, "fp32", key, dict(fin_sig), constexprs, FINALIZE_WARPS, 3)
                )
    return out


def _gated_lora_signature(kernel: str, dtype: str, out_fp32: bool = False) -> dict[str, str]:
    """Aligned signatures, as Triton's launcher specialises aligned shapes: pointers
    16-byte aligned, in/out features and the x/W/A/y/dy/dx row strides divisible
    by 16; token count, rank, tokens per sample, B and gate strides unconstrained."""
    p, f32p, i, i16 = f"*{dtype}:16", "*fp32:16", "i32", "i32:16"
    if kernel == "GL_FORWARD":
        sig = dict.fromkeys(["x_ptr", "w_ptr", "bias_ptr", "a_ptr", "b_ptr", "y_ptr", "h_ptr"], p)
        sig.update(gate_ptr=f32p, M=i, N=i16, K=i16, rank=i, tokens_per_sample=i, scaling="fp32")
        sig.update(stride_xm=i16, stride_wn=i16, stride_am=i16, stride_bn=i, stride_gs=i, stride_ym=i16, stride_hm=i)
    elif kernel == "GL_BACKWARD_DX":
        sig = dict.fromkeys(["dy_ptr", "w_ptr", "a_ptr", "b_ptr", "dx_ptr"], p)
        sig.update(gate_ptr=f32p, u_ptr=f32p, M=i, N=i16, K=i16, rank=i, tokens_per_sample=i, scaling="fp32")
        sig.update(stride_dym=i16, stride_wn=i16, stride_am=i16, stride_bn=i, stride_gs=i, stride_dxm=i16, stride_um=i)
    elif kernel == "GL_BACKWARD_DADB":
        # u is fp32 (M, rank); h is (M, rank) in the storage dtype.
        sig = {
            "u_ptr": f32p,
            "x_ptr": p,
            "h_ptr": p,
            "dy_ptr": p,
            "gate_ptr": f32p,
            "da_part_ptr": f32p,
            "dbt_part_ptr": f32p,
        }
        sig.update(M=i, N=i16, K=i16, rank=i, tokens_per_sample=i, scaling="fp32", tokens_per_split=i16)
        sig.update(stride_um=i, stride_xm=i16, stride_hm=i, stride_dym=i16, stride_gs=i)
        sig.update(stride_das=i16, stride_dar=i16, stride_dbs=i16, stride_dbr=i16)
    elif kernel == "GL_PROJECT":
        # h = x A^T (F = A, column stride 1) or u = dy B (F = B^T, rank stride 1).
        sig = {"x_ptr": p, "f_ptr": p, "out_ptr": f32p if out_fp32 else p}
        sig.update(M=i, C=i16, rank=i, stride_xm=i16, stride_fr=i, stride_fc=i, stride_om=i)
    else:
        raise ValueError(f"not a gated-LoRA kernel: {kernel!r}")
    return sig


def _gated_lora_variant(kernel: str, arch: int, dtype: str, key: tuple, flags: dict, r_pad: int, config, **sig_opts):
    constexprs = {**flags, "R_PAD": r_pad, "DOT_PRECISION": "tf32", **config.kwargs}
    sig = _gated_lora_signature(kernel, dtype, **sig_opts)
    return LibraryVariant(kernel, arch, dtype, key, sig, constexprs, config.num_warps, config.num_stages)


def gated_lora_variants(arch: int) -> list[LibraryVariant]:
    """The gated-LoRA variants for one architecture: every optional term the C
    API exposes (bias on/off) at each padded rank, the gate always read (a
    (1, r) gate of ones with row stride 0 is a plain LoRA), h and u always
    stored, each kernel with its first (default) autotune config."""
    from apo_fast.kernels.gated_lora import autotune_configs
    from apo_fast.ops.gated_lora.fused import IN_LOOP_MAX_R_PAD, R_CHUNK

    out = []
    for dtype in GATED_LORA_DTYPES:
        for r_pad in GATED_LORA_RANK_PADS:
            configs = autotune_configs(interpret=False, r_pad=r_pad, fp32=False)
            in_loop = r_pad <= IN_LOOP_MAX_R_PAD
            for has_bias in (False, True):
                flags = {"HAS_BIAS": has_bias, "HAS_GATE": True, "H_IN_LOOP": in_loop, "STORE_H": in_loop}
                flags["R_CHUNK"] = R_CHUNK
                key = (r_pad, int(has_bias))
                out.append(_gated_lora_variant("GL_FORWARD", arch, dtype, key, flags, r_pad, configs["forward"][0]))
            flags = {"HAS_GATE": True, "U_IN_LOOP": in_loop, "STORE_U": in_loop, "R_CHUNK": R_CHUNK}
            config = configs["backward_dx"][0]
            out.append(_gated_lora_variant("GL_BACKWARD_DX", arch, dtype, (r_pad,), flags, r_pad, config))
            flags = {"HAS_GATE": True, "COMPUTE_DA": True, "COMPUTE_DB": True}
            config = configs["backward_dadb"][0]
            out.append(_gated_lora_variant("GL_BACKWARD_DADB", arch, dtype, (r_pad,), flags, r_pad, config))
            if not in_loop:
                for out_fp32 in (False, True):
                    key, config = (r_pad, int(out_fp32)), configs["project"][0]
                    out.append(
                        _gated_lora_variant("GL_PROJECT", arch, dtype, key, {}, r_pad, config, out_fp32=out_fp32)
                    )
    return out


def gated_lora_split_granules() -> dict[int, int]:
    """Token-split granule of the dA/dB reduction per padded rank, as the Python
    launcher computes it (the largest BLOCK_M among the dA/dB configs)."""
    from apo_fast.kernels.gated_lora import autotune_configs

    return {
        r: max(c.kwargs["BLOCK_M"] for c in autotune_configs(interpret=False, r_pad=r)["backward_dadb"])
        for r in GATED_LORA_RANK_PADS
    }


def library_variants(archs: Sequence[int] = ARCHS) -> list[LibraryVariant]:
    """Every variant of the C library, for each architecture in ``archs``."""
    out = []
    for arch in archs:
        out.extend(loss_variants(arch))
        out.extend(gated_lora_variants(arch))
    return out


