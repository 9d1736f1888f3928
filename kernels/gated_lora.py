"""Triton kernels of the time-gated LoRA linear (APO_SPEC "TACA").

    y = x W^T + b + s * ((x A^T) * g[sample]) B^T

Names used in every kernel: ``M`` tokens (rows of the flattened input), ``K``
in-features, ``N`` out-features, ``rank`` the LoRA rank padded to ``R_PAD``
(a power of two >= 16 so it can feed ``tl.dot``). Row ``m`` belongs to sample
``m // tokens_per_sample``; its gate row is read from ``gate`` with the sample
stride (0 for one gate shared by all rows), so no tokens x rank gate tensor is
ever built. All matmuls accumulate in fp32; the inner (last) dimension of every
2-D tensor is contiguous, and row strides are passed.

Host launchers, autotuning and the autograd Function live in
``apo_fast/ops/gated_lora.py``.
"""
import triton
import triton.language as tl


@triton.jit
def _grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Map a linear program id to (pid_m, pid_n), GROUP_M row tiles at a time (L2 reuse)."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _gate_scale(gate_ptr, offs_m, mask_m, offs_r, mask_r, tokens_per_sample, stride_gs, scaling,
                HAS_GATE: tl.constexpr):
    """fp32 factor ``s * g[row // tokens_per_sample, j]`` (0 beyond rank), (BLOCK_M, R_PAD)."""
    if HAS_GATE:
        sample = offs_m // tokens_per_sample
        g = tl.load(gate_ptr + sample[:, None] * stride_gs + offs_r[None, :],
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
        return g * scaling
    else:
        # No gate: a (1, R_PAD) row that broadcasts over the tile.
        return tl.where(mask_r, scaling, 0.0).to(tl.float32)[None, :]


@triton.jit
def gated_lora_forward_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, gate_ptr, y_ptr, h_ptr,
    M, N, K, rank, tokens_per_sample, scaling,
    stride_xm, stride_wn, stride_am, stride_bn, stride_gs, stride_ym, stride_hm,
    HAS_BIAS: tl.constexpr, HAS_GATE: tl.constexpr, STORE_H: tl.constexpr,
    R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of y, base and low-rank terms in one K loop.

    x (M, K), W (N, K), A (rank, K), B (N, rank), gate (S, rank), bias (N,),
    y (M, N); h = x A^T (M, rank) is stored by the pid_n == 0 programs when
    STORE_H (the backward reuses it).
    """
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_r = offs_r < rank
    # Out-of-range rows/columns wrap onto valid ones (loads stay unmasked along
    # them); their results are never stored.
    rows = offs_m % M
    cols = offs_n % N

    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + cols[None, :] * stride_wn + offs_k[:, None]  # (BLOCK_K, BLOCK_N) of W^T
    a_ptrs = a_ptr + offs_r[None, :] * stride_am + offs_k[:, None]  # (BLOCK_K, R_PAD) of A^T
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    h = tl.zeros([BLOCK_M, R_PAD], dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        mask_k = offs_k < K - k0 * BLOCK_K
        x = tl.load(x_ptrs, mask=mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_k[:, None], other=0.0)
        a = tl.load(a_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        h = tl.dot(x, a, h, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
        a_ptrs += BLOCK_K

    gs = _gate_scale(gate_ptr, offs_m, mask_m, offs_r, mask_r, tokens_per_sample, stride_gs,
                     scaling, HAS_GATE)
    b_ptrs = b_ptr + cols[None, :] * stride_bn + offs_r[:, None]  # (R_PAD, BLOCK_N) of B^T
    b = tl.load(b_ptrs, mask=mask_r[:, None], other=0.0)
    acc = tl.dot((h * gs).to(b.dtype), b, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]

    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
    if STORE_H:
        if pid_n == 0:
            h_ptrs = h_ptr + offs_m[:, None] * stride_hm + offs_r[None, :]
            tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def gated_lora_backward_dx_kernel(
    dy_ptr, w_ptr, a_ptr, b_ptr, gate_ptr, dx_ptr, u_ptr,
    M, N, K, rank, tokens_per_sample, scaling,
    stride_dym, stride_wn, stride_am, stride_bn, stride_gs, stride_dxm, stride_um,
    HAS_GATE: tl.constexpr, COMPUTE_DX: tl.constexpr, STORE_U: tl.constexpr,
    R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_K) tile of dx = dy W + (u * s * g) A with u = dy B.

    dy (M, N), W (N, K), A (rank, K), B (N, rank), dx (M, K). The loop over N
    accumulates both dy W and u = dy B (complete at the end of the loop, so the
    low-rank term is one more tl.dot: a concatenated-K product). u (M, rank,
    fp32) is stored by the pid_k == 0 programs when STORE_U (dA and the gate
    gradient need it). Without COMPUTE_DX the grid has one column and only u
    is computed.
    """
    if COMPUTE_DX:
        pid_m, pid_k = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    else:
        pid_m = tl.program_id(0)
        pid_k = 0
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_k = offs_k < K
    mask_r = offs_r < rank
    rows = offs_m % M
    cols = offs_k % K

    dy_ptrs = dy_ptr + rows[:, None] * stride_dym + offs_n[None, :]
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + cols[None, :]  # (BLOCK_N, BLOCK_K) of W
    b_ptrs = b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :]  # (BLOCK_N, R_PAD) of B
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    u = tl.zeros([BLOCK_M, R_PAD], dtype=tl.float32)
    for n0 in range(0, tl.cdiv(N, BLOCK_N)):
        mask_n = offs_n < N - n0 * BLOCK_N
        dy = tl.load(dy_ptrs, mask=mask_n[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        u = tl.dot(dy, b, u, input_precision=DOT_PRECISION)
        if COMPUTE_DX:
            w = tl.load(w_ptrs, mask=mask_n[:, None], other=0.0)
            acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION)
            w_ptrs += BLOCK_N * stride_wn
        dy_ptrs += BLOCK_N
        b_ptrs += BLOCK_N * stride_bn

    if COMPUTE_DX:
        gs = _gate_scale(gate_ptr, offs_m, mask_m, offs_r, mask_r, tokens_per_sample, stride_gs,
                         scaling, HAS_GATE)
        a_ptrs = a_ptr + offs_r[:, None] * stride_am + cols[None, :]  # (R_PAD, BLOCK_K) of A
        a = tl.load(a_ptrs, mask=mask_r[:, None], other=0.0)
        acc = tl.dot((u * gs).to(a.dtype), a, acc, input_precision=DOT_PRECISION)
        dx_ptrs = dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :]
        tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_k[None, :])
    if STORE_U:
        if pid_k == 0:
            u_ptrs = u_ptr + offs_m[:, None] * stride_um + offs_r[None, :]
            tl.store(u_ptrs, u, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _lowrank_weight_grad_tile(
    p_ptr, q_ptr, out_ptr, gate_ptr, pid_c, pid_s,
    M, C, rank, tokens_per_sample, scaling, tokens_per_split,
    stride_pm, stride_qm, stride_gs, stride_os, stride_or,
    HAS_GATE: tl.constexpr, R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Partial sum over this split's tokens of (p * s * g)^T q: an (R_PAD, BLOCK_C) tile.

    p (M, rank), q (M, C); the fp32 partial goes to out[pid_s, :rank, tile].
    """
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, R_PAD)
    mask_c = offs_c < C
    mask_r = offs_r < rank
    acc = tl.zeros([R_PAD, BLOCK_C], dtype=tl.float32)
    start = pid_s * tokens_per_split
    end = min(start + tokens_per_split, M)
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < end
        p = tl.load(p_ptr + offs_m[:, None] * stride_pm + offs_r[None, :],
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
        gs = _gate_scale(gate_ptr, offs_m, mask_m, offs_r, mask_r, tokens_per_sample, stride_gs,
                         scaling, HAS_GATE)
        q = tl.load(q_ptr + offs_m[:, None] * stride_qm + offs_c[None, :],
                    mask=mask_m[:, None] & mask_c[None, :], other=0.0)
        acc = tl.dot(tl.trans((p * gs).to(q.dtype)), q, acc, input_precision=DOT_PRECISION)
    out_ptrs = out_ptr + pid_s * stride_os + offs_r[:, None] * stride_or + offs_c[None, :]
    tl.store(out_ptrs, acc, mask=mask_r[:, None] & mask_c[None, :])


@triton.jit
def gated_lora_backward_dadb_kernel(
    u_ptr, x_ptr, h_ptr, dy_ptr, gate_ptr, da_part_ptr, dbt_part_ptr,
    M, N, K, rank, tokens_per_sample, scaling, tokens_per_split,
    stride_um, stride_xm, stride_hm, stride_dym, stride_gs,
    stride_das, stride_dar, stride_dbs, stride_dbr,
    HAS_GATE: tl.constexpr, COMPUTE_DA: tl.constexpr, COMPUTE_DB: tl.constexpr,
    R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Split-token partials of dA = (u s g)^T x and dB^T = (h s g)^T dy in one launch.

    Grid (column tiles, splits): the first cdiv(K, BLOCK_C) column tiles (when
    COMPUTE_DA) are dA's (rank, K), the rest dB^T's (rank, N). Split ``pid_s``
    reduces tokens [pid_s * tokens_per_split, +tokens_per_split) into its own
    fp32 slice of the partial buffers (summed on the host: deterministic, no
    atomics).
    """
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    if COMPUTE_DA:
        tiles_a = tl.cdiv(K, BLOCK_C)
    else:
        tiles_a = 0
    if pid_c < tiles_a:
        _lowrank_weight_grad_tile(
            u_ptr, x_ptr, da_part_ptr, gate_ptr, pid_c, pid_s,
            M, K, rank, tokens_per_sample, scaling, tokens_per_split,
            stride_um, stride_xm, stride_gs, stride_das, stride_dar,
            HAS_GATE, R_PAD, DOT_PRECISION, BLOCK_M, BLOCK_C,
        )
    elif COMPUTE_DB:
        _lowrank_weight_grad_tile(
            h_ptr, dy_ptr, dbt_part_ptr, gate_ptr, pid_c - tiles_a, pid_s,
            M, N, rank, tokens_per_sample, scaling, tokens_per_split,
            stride_hm, stride_dym, stride_gs, stride_dbs, stride_dbr,
            HAS_GATE, R_PAD, DOT_PRECISION, BLOCK_M, BLOCK_C,
        )
