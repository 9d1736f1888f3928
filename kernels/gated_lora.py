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


def autotune_configs(interpret: bool, r_pad: int, fp32: bool = False) -> dict:
    """Candidate launch configs per kernel for a padded rank (and fp32 storage).

    Returns ``{"forward" | "backward_dx" | "backward_dadb" | "project": [triton.Config]}``.
    Under the Triton interpreter a single small config is used (the autotuner
    times its candidates through a GPU driver, which the interpreter lacks), and
    its tiles are small so the tests' odd shapes span several tiles. The first
    GPU config of each list is the one the compile test checks at every rank;
    the fp16/bf16 lists are chosen so that none spills on sm_80 or sm_90.
    fp32 inputs (IEEE fp32 dots, a correctness path rather than a fast one)
    get one small config per kernel: the fp16 tiles would spill and exceed
    sm_80's shared memory.
    """
    def cfg(num_warps, num_stages, **blocks):
        return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)

    if interpret:
        return {
            "forward": [cfg(1, 1, BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2)],
            "backward_dx": [cfg(1, 1, BLOCK_M=16, BLOCK_K=16, BLOCK_N=16, GROUP_M=2)],
            "backward_dadb": [cfg(1, 1, BLOCK_M=16, BLOCK_C=16)],
            "project": [cfg(1, 1, BLOCK_M=16, BLOCK_C=16)],
        }
    if fp32:
        return {
            "forward": [cfg(4, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8)],
            "backward_dx": [cfg(8, 3, BLOCK_M=64, BLOCK_K=64, BLOCK_N=32, GROUP_M=8)],
            "backward_dadb": [cfg(8, 2, BLOCK_M=32, BLOCK_C=64 if r_pad <= 64 else 32)],
            "project": [cfg(8, 3, BLOCK_M=64, BLOCK_C=32)],
        }
    matmul = [  # (BLOCK_M, BLOCK_N, BLOCK_K) of the output-tiled kernels
        cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        cfg(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
        cfg(4, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
        cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        cfg(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
    ]
    # The dx kernel tiles (tokens, in) and loops over out: BLOCK_K is its tile width.
    dx = [cfg(c.num_warps, c.num_stages, BLOCK_M=c.kwargs["BLOCK_M"], BLOCK_K=c.kwargs["BLOCK_N"],
              BLOCK_N=c.kwargs["BLOCK_K"], GROUP_M=8) for c in matmul]
    if r_pad <= 32:
        dadb = [cfg(4, 3, BLOCK_M=64, BLOCK_C=128), cfg(4, 4, BLOCK_M=64, BLOCK_C=64),
                cfg(8, 3, BLOCK_M=128, BLOCK_C=128), cfg(4, 3, BLOCK_M=128, BLOCK_C=64)]
    elif r_pad == 64:
        dadb = [cfg(8, 3, BLOCK_M=64, BLOCK_C=64), cfg(8, 2, BLOCK_M=64, BLOCK_C=128),
                cfg(8, 3, BLOCK_M=32, BLOCK_C=128), cfg(4, 3, BLOCK_M=64, BLOCK_C=64)]
    else:
        dadb = [cfg(8, 3, BLOCK_M=32, BLOCK_C=128), cfg(8, 2, BLOCK_M=64, BLOCK_C=128),
                cfg(8, 3, BLOCK_M=64, BLOCK_C=64)]
    project = [cfg(8, 3, BLOCK_M=128, BLOCK_C=64), cfg(4, 4, BLOCK_M=64, BLOCK_C=64),
               cfg(4, 3, BLOCK_M=128, BLOCK_C=32)]
    return {"forward": matmul, "backward_dx": dx, "backward_dadb": dadb, "project": project}


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
def _add_gated_lowrank(acc, p_ptrs, q_ptrs, q_rank_stride, gate_ptr, offs_m, mask_m, rank,
                       tokens_per_sample, stride_gs, scaling,
                       HAS_GATE: tl.constexpr, R_PAD: tl.constexpr, R_CHUNK: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    """acc += (p * s * g) q, read from memory R_CHUNK ranks at a time.

    p_ptrs: (BLOCK_M, R_CHUNK) pointers to ranks [0, R_CHUNK) of a row-major
    (tokens, rank) tensor; q_ptrs: (R_CHUNK, BLOCK) pointers to the same ranks
    of the right factor, whose rank stride is q_rank_stride. Chunking bounds
    the registers whatever the rank.
    """
    offs_rc = tl.arange(0, R_CHUNK)
    for r0 in range(0, R_PAD, R_CHUNK):
        mask_r = offs_rc < rank - r0
        p = tl.load(p_ptrs, mask=mask_r[None, :], other=0.0).to(tl.float32)
        gs = _gate_scale(gate_ptr + r0, offs_m, mask_m, offs_rc, mask_r, tokens_per_sample,
                         stride_gs, scaling, HAS_GATE)
        q = tl.load(q_ptrs, mask=mask_r[:, None], other=0.0)
        acc = tl.dot((p * gs).to(q.dtype), q, acc, input_precision=DOT_PRECISION)
        p_ptrs += R_CHUNK
        q_ptrs += R_CHUNK * q_rank_stride
    return acc


@triton.jit
def gated_lora_forward_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, gate_ptr, y_ptr, h_ptr,
    M, N, K, rank, tokens_per_sample, scaling,
    stride_xm, stride_wn, stride_am, stride_bn, stride_gs, stride_ym, stride_hm,
    HAS_BIAS: tl.constexpr, HAS_GATE: tl.constexpr, H_IN_LOOP: tl.constexpr,
    STORE_H: tl.constexpr, R_PAD: tl.constexpr, R_CHUNK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of y = x W^T + b + s ((x A^T) * g) B^T.

    x (M, K), W (N, K), A (rank, K), B (N, rank), gate (S, rank), bias (N,),
    y (M, N), h = x A^T (M, rank).

    H_IN_LOOP (small ranks): h is accumulated in the same K loop as the base
    product, from the same x tiles (one read of x), and stored by the
    pid_n == 0 programs when STORE_H. Otherwise (large ranks, where
    recomputing h per output tile would cost more than it saves) h was
    computed beforehand and is read R_CHUNK ranks at a time in the epilogue.
    """
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # Out-of-range rows/columns wrap onto valid ones (loads stay unmasked along
    # them); their results are never stored.
    rows = offs_m % M
    cols = offs_n % N

    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + cols[None, :] * stride_wn + offs_k[:, None]  # (BLOCK_K, BLOCK_N) of W^T
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if H_IN_LOOP:
        offs_r = tl.arange(0, R_PAD)
        mask_r = offs_r < rank
        a_ptrs = a_ptr + offs_r[None, :] * stride_am + offs_k[:, None]  # (BLOCK_K, R_PAD) of A^T
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
        if STORE_H:
            if pid_n == 0:
                h_ptrs = h_ptr + offs_m[:, None] * stride_hm + offs_r[None, :]
                tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])
    else:
        for k0 in range(0, tl.cdiv(K, BLOCK_K)):
            mask_k = offs_k < K - k0 * BLOCK_K
            x = tl.load(x_ptrs, mask=mask_k[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=mask_k[:, None], other=0.0)
            acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        offs_rc = tl.arange(0, R_CHUNK)
        h_ptrs = h_ptr + rows[:, None] * stride_hm + offs_rc[None, :]
        b_ptrs = b_ptr + cols[None, :] * stride_bn + offs_rc[:, None]  # (R_CHUNK, BLOCK_N) of B^T
        acc = _add_gated_lowrank(acc, h_ptrs, b_ptrs, 1, gate_ptr, offs_m, mask_m, rank,
                                 tokens_per_sample, stride_gs, scaling,
                                 HAS_GATE, R_PAD, R_CHUNK, DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def lowrank_project_kernel(
    x_ptr, f_ptr, out_ptr,
    M, C, rank,
    stride_xm, stride_fr, stride_fc, stride_om,
    R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out (M, rank) = x (M, C) F^T with F[j, c] at f_ptr + j * stride_fr + c * stride_fc.

    The skinny product of the large-rank paths: h = x A^T (F = A) in the
    forward and u = dy B (F = B^T) in the backward. fp32 accumulation, stored
    in out's dtype.
    """
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    offs_c = tl.arange(0, BLOCK_C)
    mask_m = offs_m < M
    mask_r = offs_r < rank
    rows = offs_m % M
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_c[None, :]
    f_ptrs = f_ptr + offs_r[None, :] * stride_fr + offs_c[:, None] * stride_fc  # (BLOCK_C, R_PAD) of F^T
    acc = tl.zeros([BLOCK_M, R_PAD], dtype=tl.float32)
    for c0 in range(0, tl.cdiv(C, BLOCK_C)):
        mask_c = offs_c < C - c0 * BLOCK_C
        x = tl.load(x_ptrs, mask=mask_c[None, :], other=0.0)
        f = tl.load(f_ptrs, mask=mask_c[:, None] & mask_r[None, :], other=0.0)
        acc = tl.dot(x, f, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_C
        f_ptrs += BLOCK_C * stride_fc
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_r[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def gated_lora_backward_dx_kernel(
    dy_ptr, w_ptr, a_ptr, b_ptr, gate_ptr, dx_ptr, u_ptr,
    M, N, K, rank, tokens_per_sample, scaling,
    stride_dym, stride_wn, stride_am, stride_bn, stride_gs, stride_dxm, stride_um,
    HAS_GATE: tl.constexpr, U_IN_LOOP: tl.constexpr, STORE_U: tl.constexpr,
    R_PAD: tl.constexpr, R_CHUNK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_K) tile of dx = dy W + (u * s * g) A with u = dy B.

    dy (M, N), W (N, K), A (rank, K), B (N, rank), dx (M, K), u (M, rank) fp32.
    U_IN_LOOP (small ranks): the loop over N accumulates both dy W and u from
    the same dy tiles; u is complete after the loop, so the low-rank term is
    one more tl.dot (a concatenated-K product), and the pid_k == 0 programs
    store u when STORE_U (dA and the gate gradient need it). Otherwise u was
    computed beforehand and is read R_CHUNK ranks at a time.
    """
    pid_m, pid_k = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_k = offs_k < K
    rows = offs_m % M
    cols = offs_k % K

    dy_ptrs = dy_ptr + rows[:, None] * stride_dym + offs_n[None, :]
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + cols[None, :]  # (BLOCK_N, BLOCK_K) of W
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    if U_IN_LOOP:
        offs_r = tl.arange(0, R_PAD)
        mask_r = offs_r < rank
        b_ptrs = b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :]  # (BLOCK_N, R_PAD) of B
        u = tl.zeros([BLOCK_M, R_PAD], dtype=tl.float32)
        for n0 in range(0, tl.cdiv(N, BLOCK_N)):
            mask_n = offs_n < N - n0 * BLOCK_N
            dy = tl.load(dy_ptrs, mask=mask_n[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=mask_n[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=mask_n[:, None] & mask_r[None, :], other=0.0)
            acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION)
            u = tl.dot(dy, b, u, input_precision=DOT_PRECISION)
            dy_ptrs += BLOCK_N
            w_ptrs += BLOCK_N * stride_wn
            b_ptrs += BLOCK_N * stride_bn
        gs = _gate_scale(gate_ptr, offs_m, mask_m, offs_r, mask_r, tokens_per_sample, stride_gs,
                         scaling, HAS_GATE)
        a_ptrs = a_ptr + offs_r[:, None] * stride_am + cols[None, :]  # (R_PAD, BLOCK_K) of A
        a = tl.load(a_ptrs, mask=mask_r[:, None], other=0.0)
        acc = tl.dot((u * gs).to(a.dtype), a, acc, input_precision=DOT_PRECISION)
        if STORE_U:
            if pid_k == 0:
                u_ptrs = u_ptr + offs_m[:, None] * stride_um + offs_r[None, :]
                tl.store(u_ptrs, u, mask=mask_m[:, None] & mask_r[None, :])
    else:
        for n0 in range(0, tl.cdiv(N, BLOCK_N)):
            mask_n = offs_n < N - n0 * BLOCK_N
            dy = tl.load(dy_ptrs, mask=mask_n[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=mask_n[:, None], other=0.0)
            acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION)
            dy_ptrs += BLOCK_N
            w_ptrs += BLOCK_N * stride_wn
        offs_rc = tl.arange(0, R_CHUNK)
        u_ptrs = u_ptr + rows[:, None] * stride_um + offs_rc[None, :]
        a_ptrs = a_ptr + offs_rc[:, None] * stride_am + cols[None, :]  # (R_CHUNK, BLOCK_K) of A
        acc = _add_gated_lowrank(acc, u_ptrs, a_ptrs, stride_am, gate_ptr, offs_m, mask_m, rank,
                                 tokens_per_sample, stride_gs, scaling,
                                 HAS_GATE, R_PAD, R_CHUNK, DOT_PRECISION)
    dx_ptrs = dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :]
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_k[None, :])


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
