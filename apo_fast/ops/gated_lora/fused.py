"""Fused gated adapter: the Triton launchers (kernels and their autotune configs in
``apo_fast.kernels.gated_lora``; the algorithm is described in :mod:``apo_fast.ops.gated_lora``).
Every launch goes through ``torch.library.wrap_triton``, so the custom ops of
:mod:``apo_fast.ops.gated_lora.op`` that call these are traceable by ``torch.compile``.
"""
from __future__ import annotations

import functools
import types

import torch
from torch.library import wrap_triton

from apo_fast.ops.utils import cdiv as _cdiv
from apo_fast.ops.utils import sm_count

# Ranks padded to at most this are accumulated inside the base matmul's loop
# (h in the forward, u = dy B in the backward), from the tiles already loaded.
# Larger ranks are computed once by a skinny product and read back in rank
# chunks: recomputing them per output tile would cost more MMA work than a
# second read of x, and would not fit in registers (see the compile test).
IN_LOOP_MAX_R_PAD = 16
R_CHUNK = 16




def _rank_pad(rank: int) -> int:
    """Rank padded for tl.dot: a power of two, at least 16."""
    return max(16, 1 << (rank - 1).bit_length())


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's matmul TF32 switch, like F.linear does."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"



@functools.lru_cache(maxsize=None)
def _tuned_kernels(interpret: bool, r_pad: int, fp32: bool):
    """The kernels wrapped in triton.autotune over ``apo_fast.kernels.gated_lora.autotune_configs``."""
    import triton

    from apo_fast.kernels import gated_lora as k

    configs = k.autotune_configs(interpret, r_pad, fp32)
    return types.SimpleNamespace(
        forward=triton.autotune(configs["forward"], key=["M", "N", "K", "HAS_GATE", "H_IN_LOOP", "STORE_H"])(
            k.gated_lora_forward_kernel),
        backward_dx=triton.autotune(configs["backward_dx"], key=["M", "N", "K", "U_IN_LOOP", "STORE_U"])(
            k.gated_lora_backward_dx_kernel),
        backward_dadb=triton.autotune(configs["backward_dadb"],
                                      key=["M", "N", "K", "COMPUTE_DA", "COMPUTE_DB"])(
            k.gated_lora_backward_dadb_kernel),
        project=triton.autotune(configs["project"], key=["M", "C"])(k.lowrank_project_kernel),
        split_granule=max(c.kwargs["BLOCK_M"] for c in configs["backward_dadb"]),
    )


def _kernels(r_pad: int, dtype: torch.dtype):
    from apo_fast.ops.backend import interpreter_enabled

    return _tuned_kernels(interpreter_enabled(), r_pad, dtype == torch.float32)


def _gate_args(gate: torch.Tensor | None, anchor: torch.Tensor):
    """(pointer tensor, sample stride, has_gate) for the kernels; a (1, r) gate gets stride 0."""
    if gate is None:
        return anchor, 0, False
    return gate, (0 if gate.shape[0] == 1 else gate.stride(0)), True


def _project(x2d, factor, factor_rank_stride, factor_col_stride, rank, out_dtype):
    """(M, rank) = x2d @ F^T with F[j, c] = factor[j * rank_stride + c * col_stride]."""
    M, C = x2d.shape
    out = torch.empty((M, rank), device=x2d.device, dtype=out_dtype)
    kernel = wrap_triton(_kernels(_rank_pad(rank), x2d.dtype).project)
    kernel[lambda meta: (_cdiv(M, meta["BLOCK_M"]),)](
        x2d, factor, out, M, C, rank, x2d.stride(0), factor_rank_stride, factor_col_stride,
        out.stride(0), R_PAD=_rank_pad(rank), DOT_PRECISION=_dot_precision(x2d.dtype),
    )
    return out


def gated_lora_forward(x2d, weight, bias, lora_A, lora_B, gate, scaling, tokens_per_sample, store_h):
    """Launch the fused forward.

    Args: x2d (M, K); weight (N, K); bias (N,) or None; lora_A (r, K);
    lora_B (N, r); gate (G, r) or None, rows of ``tokens_per_sample`` tokens
    (G == 1: shared by all). All contiguous, one dtype except the gate.

    Returns: y (M, N) and, when ``store_h`` (or for large ranks, where it is
    computed anyway), h = x A^T (M, r) in x's dtype; else None.
    """
    M, K = x2d.shape
    N = weight.shape[0]
    rank = lora_A.shape[0]
    r_pad = _rank_pad(rank)
    in_loop = r_pad <= IN_LOOP_MAX_R_PAD
    y = torch.empty((M, N), device=x2d.device, dtype=x2d.dtype)
    if in_loop:
        h = torch.empty((M, rank), device=x2d.device, dtype=x2d.dtype) if store_h else None
    else:
        h = _project(x2d, lora_A, lora_A.stride(0), 1, rank, x2d.dtype)
    gate_t, stride_gs, has_gate = _gate_args(gate, x2d)
    kernel = wrap_triton(_kernels(r_pad, x2d.dtype).forward)
    kernel[lambda meta: (_cdiv(M, meta["BLOCK_M"]) * _cdiv(N, meta["BLOCK_N"]),)](
        x2d, weight, bias if bias is not None else y, lora_A, lora_B, gate_t, y,
        h if h is not None else y,
        M, N, K, rank, tokens_per_sample, scaling,
        x2d.stride(0), weight.stride(0), lora_A.stride(0), lora_B.stride(0), stride_gs,
        y.stride(0), rank,
        HAS_BIAS=bias is not None, HAS_GATE=has_gate, H_IN_LOOP=in_loop,
        STORE_H=in_loop and store_h, R_PAD=r_pad, R_CHUNK=R_CHUNK,
        DOT_PRECISION=_dot_precision(x2d.dtype),
    )
    return y, h


def _token_splits(M: int, col_tiles: int, granule: int, device: torch.device) -> tuple[int, int]:
    """(splits, tokens_per_split) for the dA/dB reductions: about two programs per SM."""
    programs = 4
    if device.type == "cuda":
        programs = 2 * sm_count(device.index if device.index is not None else torch.cuda.current_device())
    splits = max(1, min(_cdiv(programs, max(col_tiles, 1)), _cdiv(M, granule)))
    tokens_per_split = _cdiv(_cdiv(M, splits), granule) * granule
    return _cdiv(M, tokens_per_split), tokens_per_split


def gated_lora_backward(dy, x2d, weight, lora_A, lora_B, gate, h, scaling, tokens_per_sample,
                        need_dx, need_da, need_db, need_dgate):
    """Launch the backward kernels. Returns (dx, dA, dB, dgate), None where not needed.

    dy (M, N) contiguous in the base weight's dtype; x2d (M, K) the input
    (only read for dA, may be None otherwise); h = x A^T (M, r) from the
    forward (needed for dB and dgate). dgate = s * sum over each gate row's
    tokens of (dy B) * h, in the gate's dtype; dx in dy's dtype; dA, dB in the
    factors' dtypes.
    """
    M = dy.shape[0]
    N, K = weight.shape
    rank = lora_A.shape[0]
    r_pad = _rank_pad(rank)
    in_loop = r_pad <= IN_LOOP_MAX_R_PAD
    precision = _dot_precision(dy.dtype)
    gate_t, stride_gs, has_gate = _gate_args(gate, dy)
    kernels = _kernels(r_pad, dy.dtype)
    dx = da = db = dgate = None

    need_u = need_da or need_dgate
    u = None
    # u = dy B: in the dx kernel's loop for small ranks, else by a skinny product
    # (which the rank-chunked dx kernel then reads).
    if (need_u and not (need_dx and in_loop)) or (need_dx and not in_loop):
        u = _project(dy, lora_B, 1, lora_B.stride(0), rank, torch.float32)
    if need_dx:
        dx = torch.empty((M, K), device=dy.device, dtype=dy.dtype)
        if u is None and need_u:
            u = torch.empty((M, rank), device=dy.device, dtype=torch.float32)
        wrap_triton(kernels.backward_dx)[lambda meta: (_cdiv(M, meta["BLOCK_M"]) * _cdiv(K, meta["BLOCK_K"]),)](
            dy, weight, lora_A, lora_B, gate_t, dx, u if u is not None else dx,
            M, N, K, rank, tokens_per_sample, scaling,
            dy.stride(0), weight.stride(0), lora_A.stride(0), lora_B.stride(0), stride_gs,
            dx.stride(0), rank,
            HAS_GATE=has_gate, U_IN_LOOP=in_loop, STORE_U=in_loop and need_u,
            R_PAD=r_pad, R_CHUNK=R_CHUNK, DOT_PRECISION=precision,
        )

    if need_da or need_db:
        col_tiles = (_cdiv(K, 64) if need_da else 0) + (_cdiv(N, 64) if need_db else 0)
        splits, tokens_per_split = _token_splits(M, col_tiles, kernels.split_granule, dy.device)
        f32 = dict(device=dy.device, dtype=torch.float32)
        da_part = torch.empty((splits, rank, K), **f32) if need_da else None
        dbt_part = torch.empty((splits, rank, N), **f32) if need_db else None
        anchor = da_part if need_da else dbt_part

        def grid(meta):
            block = meta["BLOCK_C"]
            return ((_cdiv(K, block) if need_da else 0) + (_cdiv(N, block) if need_db else 0), splits)

        wrap_triton(kernels.backward_dadb)[grid](
            u if need_da else dy, x2d if need_da else dy, h if need_db else dy, dy, gate_t,
            da_part if need_da else anchor, dbt_part if need_db else anchor,
            M, N, K, rank, tokens_per_sample, scaling, tokens_per_split,
            rank, K, rank, dy.stride(0), stride_gs,
            rank * K if need_da else 0, K if need_da else 0,
            rank * N if need_db else 0, N if need_db else 0,
            HAS_GATE=has_gate, COMPUTE_DA=need_da, COMPUTE_DB=need_db,
            R_PAD=r_pad, DOT_PRECISION=precision,
        )
        if need_da:
            da = da_part.sum(0).to(lora_A.dtype)
        if need_db:
            db = dbt_part.sum(0).t().contiguous().to(lora_B.dtype)

    if need_dgate:
        groups = gate.shape[0]
        per_group = (u * h.float()).reshape(groups, M // groups, rank).sum(1)
        dgate = (per_group * scaling).to(gate.dtype)
    return dx, da, db, dgate
