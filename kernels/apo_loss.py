"""Triton kernels of the fused APO / Diffusion-DPO loss (launched by ``apo_fast.ops.apo_loss``).

Three kernels, all fp32 arithmetic whatever the storage dtype:

1. :func:`apo_residual_sums_kernel`, grid ``(B, n_chunks)``: one pass over
   policy ``p``, reference ``r``, target ``t`` (and mask ``m``); each program
   reduces one chunk of one sample to two partial sums
   ``sum w (p - t)^2`` and ``sum w (r - t)^2``, written to
   ``partial[b, chunk, 0:2]``. Many programs per sample keep a GPU busy at
   small batches; the chunk partials are added in a fixed order by kernel 2,
   so results are deterministic (no atomics).
2. :func:`apo_loss_finalize_kernel`, one program: per-sample errors, the
   sigmoid preference loss (unpaired or paired), metrics, and each sample's
   gradient coefficient ``coef_i = dL/de_i * 2 / N``. It replaces about twenty
   tiny eager launches on (B,) vectors, which at SD shapes would cost more than
   the passes over the latents themselves.
3. :func:`apo_grad_kernel`, grid ``(B, n_chunks)``: ``grad = coef_i * w * (p - t)``
   (times the incoming gradient when ``HAS_SCALE``), stored in ``p``'s dtype.

Memory views. A sample is ``N`` contiguous elements (both NCHW and
channels_last keep each sample contiguous). A program walks ``positions``
("mask positions") and, at each, ``repeats`` elements ``repeat_stride`` apart:

* no mask, or a full (B, C, H, W) mask: positions = N, repeats = 1, the mask
  index is the element index (``MASK_MODE`` 0 or 1);
* a (B, 1, H, W) mask on NCHW data: positions = H*W, repeats = C,
  repeat_stride = H*W; the mask is read once per position for all channels
  (``MASK_MODE`` 1);
* a (B, 1, H, W) mask on channels_last data: positions = N, repeats = 1,
  mask index = element index // C with ``MASK_DIV = C`` a compile-time
  constant (a shift for powers of two) (``MASK_MODE`` 2).

Offsets: the per-sample base is 64-bit (``B * N`` may exceed 2**31); offsets
inside a sample are 32-bit, and the launcher rejects samples of 2**31 - 2**20
elements or more.
"""

import os

import triton
import triton.language as tl

MASK_NONE = 0
MASK_DIRECT = 1
MASK_DIV = 2
NUM_METRICS = 8  # slots: loss, e_theta, e_ref, reward_w, reward_l, implicit_acc, beta_t, sft

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Streaming-kernel configs for a GPU: 8 fp16 / 4 fp32 elements per thread and
# load (128-bit) or twice that. Chunk lengths are multiples of GPU_CHUNK_ALIGN,
# so that SD-size batches (latency-bound, ~1 MB per tensor) still spread over
# a few hundred programs; configs whose BLOCK exceeds the chunk are pruned.
GPU_STREAM_CONFIGS = [
    triton.Config({"BLOCK": 512}, num_warps=2),
    triton.Config({"BLOCK": 1024}, num_warps=4),
    triton.Config({"BLOCK": 2048}, num_warps=4),
    triton.Config({"BLOCK": 2048}, num_warps=8),
    triton.Config({"BLOCK": 4096}, num_warps=8),
]
GPU_CHUNK_ALIGN = 512
# The interpreter cannot benchmark configs (and is slow): one small block, so
# that small test tensors still span several blocks and chunks per sample.
INTERPRETER_STREAM_CONFIGS = [triton.Config({"BLOCK": 64}, num_warps=1)]
INTERPRETER_CHUNK_ALIGN = 128

STREAM_CONFIGS = INTERPRETER_STREAM_CONFIGS if _INTERPRET else GPU_STREAM_CONFIGS
CHUNK_ALIGN = INTERPRETER_CHUNK_ALIGN if _INTERPRET else GPU_CHUNK_ALIGN


def _prune_blocks_longer_than_chunk(configs, named_args, **kwargs):
    """Drop configs whose BLOCK exceeds the chunk (their extra lanes would idle)."""
    kept = [c for c in configs if c.kwargs["BLOCK"] <= named_args["chunk"]]
    return kept or configs[:1]


_STREAM_PRUNE = {"early_config_prune": _prune_blocks_longer_than_chunk}


@triton.jit
def _mask_weight(mask_ptr, pos, live, lambda_minus_one, MASK_MODE: tl.constexpr, MASK_DIV: tl.constexpr):
    if MASK_MODE == 2:
        m = tl.load(mask_ptr + pos // MASK_DIV, mask=live, other=0.0)
    else:
        m = tl.load(mask_ptr + pos, mask=live, other=0.0)
    return 1.0 + lambda_minus_one * m.to(tl.float32)


@triton.autotune(
    configs=STREAM_CONFIGS, key=["positions", "repeats", "chunk", "MASK_MODE"], prune_configs_by=_STREAM_PRUNE
)
@triton.jit
def apo_residual_sums_kernel(
    pred_ptr,
    ref_ptr,
    target_ptr,
    mask_ptr,
    partial_ptr,
    sample_numel,
    mask_sample_numel,
    positions,
    repeats,
    repeat_stride,
    chunk,
    n_chunks,
    lambda_minus_one,
    MASK_MODE: tl.constexpr,
    MASK_DIV: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """partial[b, c] = (sum w (p - t)^2, sum w (r - t)^2) over chunk c of sample b."""
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    base = pid_b.to(tl.int64) * sample_numel
    pred_ptr += base
    ref_ptr += base
    target_ptr += base
    if MASK_MODE != 0:
        mask_ptr += pid_b.to(tl.int64) * mask_sample_numel
    start = pid_c * chunk
    lanes = tl.arange(0, BLOCK)
    acc_p = tl.zeros([BLOCK], dtype=tl.float32)
    acc_r = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(0, chunk, BLOCK):
        pos = start + k + lanes
        live = (pos < positions) & (k + lanes < chunk)
        if MASK_MODE != 0:
            w = _mask_weight(mask_ptr, pos, live, lambda_minus_one, MASK_MODE, MASK_DIV)
        for rep in range(repeats):
            offs = pos + rep * repeat_stride
            # p and t stay cached for the gradient pass; r is read once.
            p = tl.load(pred_ptr + offs, mask=live, other=0.0).to(tl.float32)
            t = tl.load(target_ptr + offs, mask=live, other=0.0).to(tl.float32)
            r = tl.load(ref_ptr + offs, mask=live, other=0.0, eviction_policy="evict_first").to(tl.float32)
            dp = p - t
            dr = r - t
            if MASK_MODE != 0:
                acc_p += w * dp * dp
                acc_r += w * dr * dr
            else:
                acc_p += dp * dp
                acc_r += dr * dr
    out = partial_ptr + (pid_b * n_chunks + pid_c) * 2
    tl.store(out, tl.sum(acc_p, axis=0))
    tl.store(out + 1, tl.sum(acc_r, axis=0))


@triton.autotune(
    configs=STREAM_CONFIGS,
    key=["positions", "repeats", "chunk", "MASK_MODE", "HAS_SCALE"],
    prune_configs_by=_STREAM_PRUNE,
)
@triton.jit
def apo_grad_kernel(
    pred_ptr,
    target_ptr,
    mask_ptr,
    coef_ptr,
    scale_ptr,
    grad_ptr,
    sample_numel,
    mask_sample_numel,
    positions,
    repeats,
    repeat_stride,
    chunk,
    lambda_minus_one,
    MASK_MODE: tl.constexpr,
    MASK_DIV: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """grad[b] = coef[b] (* scale) * w * (p - t), stored in grad's dtype."""
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    coef = tl.load(coef_ptr + pid_b)
    if HAS_SCALE:
        coef = coef * tl.load(scale_ptr).to(tl.float32)
    base = pid_b.to(tl.int64) * sample_numel
    pred_ptr += base
    target_ptr += base
    grad_ptr += base
    if MASK_MODE != 0:
        mask_ptr += pid_b.to(tl.int64) * mask_sample_numel
    start = pid_c * chunk
    lanes = tl.arange(0, BLOCK)
    for k in range(0, chunk, BLOCK):
        pos = start + k + lanes
        live = (pos < positions) & (k + lanes < chunk)
        if MASK_MODE != 0:
            scale = coef * _mask_weight(mask_ptr, pos, live, lambda_minus_one, MASK_MODE, MASK_DIV)
        for rep in range(repeats):
            offs = pos + rep * repeat_stride
            p = tl.load(pred_ptr + offs, mask=live, other=0.0, eviction_policy="evict_first").to(tl.float32)
            t = tl.load(target_ptr + offs, mask=live, other=0.0, eviction_policy="evict_first").to(tl.float32)
            if MASK_MODE != 0:
                g = scale * (p - t)
            else:
                g = coef * (p - t)
            tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=live)


@triton.jit
def _sample_errors(partial_ptr, rows, live, n_chunks, chunk_lanes, inv_numel):
    """(e_theta, e_ref) of samples ``rows``: chunk partials summed in chunk order."""
    ptrs = partial_ptr + (rows[:, None] * n_chunks + chunk_lanes[None, :]) * 2
    ok = live[:, None] & (chunk_lanes[None, :] < n_chunks)
    sum_p = tl.sum(tl.load(ptrs, mask=ok, other=0.0), axis=1)
    sum_r = tl.sum(tl.load(ptrs + 1, mask=ok, other=0.0), axis=1)
    return sum_p * inv_numel, sum_r * inv_numel


@triton.jit
def _softplus(z):
    """log(1 + exp(z)), accurate for large |z| and for tiny exp(-|z|)."""
    e = tl.exp(-tl.abs(z))
    log1p_e = tl.where(e < 1e-4, e * (1.0 - 0.5 * e), tl.log(1.0 + e))
    return tl.maximum(z, 0.0) + log1p_e


@triton.jit
def apo_loss_finalize_kernel(
    partial_ptr,
    beta_ptr,
    stats_ptr,
    loss_ptr,
    n_samples,
    n_terms,
    n_chunks,
    beta_value,
    inv_numel,
    inv_terms,
    inv_samples,
    lambda_sft,
    PAIRED: tl.constexpr,
    BETA_PER_TERM: tl.constexpr,
    BLOCK_TERMS: tl.constexpr,
    BLOCK_CHUNKS: tl.constexpr,
):
    """Loss, metrics and gradient coefficients from the chunk partials.

    stats layout (float32): e_theta[n_samples], e_ref[n_samples],
    coef[n_samples], metrics[8]. A loss term is a sample (unpaired) or a pair
    (paired: sample j wins against sample j + n_terms). ``inv_*`` are the
    host's reciprocals of N, n_terms and n_samples (integer arguments equal to
    1 become compile-time constants, so no arithmetic is done on them here).
    """
    _finalize(partial_ptr, beta_ptr, beta_ptr, beta_ptr, stats_ptr, loss_ptr, n_samples, n_terms, n_chunks,
              beta_value, inv_numel, inv_terms, inv_samples, lambda_sft, 1.0, 1.0,
              0, PAIRED, BETA_PER_TERM, False, False, BLOCK_TERMS, BLOCK_CHUNKS)


@triton.jit
def _kto_reference_point(partial_ptr, n_terms, n_chunks, inv_numel, inv_terms, lanes, chunk_lanes,
                         BLOCK_TERMS: tl.constexpr):
    """KTO's reference point ``max(0, mean_i(e_ref_i - e_theta_i))`` (a first pass over the terms)."""
    g_sum = 0.0
    for j0 in range(0, n_terms, BLOCK_TERMS):
        j = j0 + lanes
        live = j < n_terms
        e_w, r_w = _sample_errors(partial_ptr, j, live, n_chunks, chunk_lanes, inv_numel)
        g_sum += tl.sum(tl.where(live, r_w - e_w, 0.0), axis=0)
    return tl.maximum(g_sum * inv_terms, 0.0)


@triton.jit
def _term_value(ptr, j, live, constant, other, PER_TERM: tl.constexpr, BLOCK_TERMS: tl.constexpr):
    """A per-term float32 vector: loaded from ``ptr`` (PER_TERM) or the scalar ``constant``."""
    if PER_TERM:
        value = tl.load(ptr + j, mask=live, other=other).to(tl.float32)
    else:
        value = tl.zeros([BLOCK_TERMS], dtype=tl.float32) + constant
    return value


@triton.jit
def _store_metrics(metrics_ptr, loss_ptr, loss_sum, e_theta_w_sum, e_theta_l_sum, e_ref_sum, reward_w_sum,
                   reward_l_sum, wins_sum, beta_sum, inv_terms, inv_samples, lambda_sft):
    """The loss (with the SFT term on the positives) and the 8 metric slots."""
    sft = e_theta_w_sum * inv_terms
    loss = loss_sum * inv_terms + lambda_sft * sft
    tl.store(loss_ptr, loss)
    tl.store(metrics_ptr + 0, loss)
    tl.store(metrics_ptr + 1, (e_theta_w_sum + e_theta_l_sum) * inv_samples)
    tl.store(metrics_ptr + 2, e_ref_sum * inv_samples)
    tl.store(metrics_ptr + 3, reward_w_sum * inv_terms)
    tl.store(metrics_ptr + 4, reward_l_sum * inv_terms)
    tl.store(metrics_ptr + 5, wins_sum * inv_terms)
    tl.store(metrics_ptr + 6, beta_sum * inv_terms)
    tl.store(metrics_ptr + 7, tl.where(lambda_sft > 0.0, sft, 0.0))


@triton.jit
def _preference_term(d, beta, label, weight, lambda_d, lambda_u, kl, FORM: tl.constexpr):
    """(loss, d loss / d d, implicit win) of one term of preference form FORM
    (0 sigmoid, 1 hinge, 2 ipo, 3 kto, 4 margin; see PreferenceForm in apo_fast.ops.apo_loss.naive)."""
    z = beta * d
    if FORM == 1:
        h = 1.0 + z
        loss = tl.maximum(h, 0.0)
        grad = tl.where(h > 0.0, beta, 0.0)
        win = tl.where(d < 0.0, 1.0, tl.where(d == 0.0, 0.5, 0.0))
    elif FORM == 2:
        q = d + 0.5 / beta
        loss = q * q
        grad = 2.0 * q
        win = tl.where(d < 0.0, 1.0, tl.where(d == 0.0, 0.5, 0.0))
    elif FORM == 3:
        sign = 2.0 * label - 1.0
        u = sign * beta * (-d - kl)
        s = tl.sigmoid(u)
        lam = label * lambda_d + (1.0 - label) * lambda_u
        loss = lam * (1.0 - s)
        grad = lam * s * (1.0 - s) * sign * beta
        win = tl.where(u > 0.0, 1.0, 0.0)
    else:
        loss = _softplus(z)
        grad = beta * tl.sigmoid(z)
        win = tl.where(d < 0.0, 1.0, tl.where(d == 0.0, 0.5, 0.0))
    return loss * weight, grad * weight, win


@triton.jit
def _finalize(
    partial_ptr,
    beta_ptr,
    labels_ptr,
    weights_ptr,
    stats_ptr,
    loss_ptr,
    n_samples,
    n_terms,
    n_chunks,
    beta_value,
    inv_numel,
    inv_terms,
    inv_samples,
    lambda_sft,
    lambda_d,
    lambda_u,
    FORM: tl.constexpr,
    PAIRED: tl.constexpr,
    BETA_PER_TERM: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    BLOCK_TERMS: tl.constexpr,
    BLOCK_CHUNKS: tl.constexpr,
):
    """The one finalize body: the C library's sigmoid kernel and the Python launcher's
    preference-form kernel are this code with other constexprs. KTO's reference point
    ``max(0, mean(-delta))`` takes a first pass."""
    e_theta_ptr = stats_ptr
    e_ref_ptr = stats_ptr + n_samples
    coef_ptr = stats_ptr + 2 * n_samples
    metrics_ptr = stats_ptr + 3 * n_samples
    grad_scale = 2.0 * inv_numel
    lanes = tl.arange(0, BLOCK_TERMS)
    chunk_lanes = tl.arange(0, BLOCK_CHUNKS)
    kl = 0.0
    if FORM == 3:
        kl = _kto_reference_point(partial_ptr, n_terms, n_chunks, inv_numel, inv_terms, lanes, chunk_lanes,
                                  BLOCK_TERMS)
    loss_sum = 0.0
    e_theta_w_sum = 0.0
    e_theta_l_sum = 0.0
    e_ref_sum = 0.0
    reward_w_sum = 0.0
    reward_l_sum = 0.0
    wins_sum = 0.0
    beta_sum = 0.0
    for j0 in range(0, n_terms, BLOCK_TERMS):
        j = j0 + lanes
        live = j < n_terms
        beta = _term_value(beta_ptr, j, live, beta_value, 1.0, BETA_PER_TERM, BLOCK_TERMS)
        label = _term_value(labels_ptr, j, live, 1.0, 1.0, HAS_LABELS, BLOCK_TERMS)
        weight = _term_value(weights_ptr, j, live, 1.0, 0.0, HAS_WEIGHTS, BLOCK_TERMS)
        e_w, r_w = _sample_errors(partial_ptr, j, live, n_chunks, chunk_lanes, inv_numel)
        reward_w = -beta * (e_w - r_w)
        if PAIRED:
            e_l, r_l = _sample_errors(partial_ptr, j + n_terms, live, n_chunks, chunk_lanes, inv_numel)
            reward_l = -beta * (e_l - r_l)
            if FORM == 4:
                d = e_w - e_l  # reference-free
            else:
                d = (e_w - r_w) - (e_l - r_l)
        else:
            d = e_w - r_w
        term, dl_dd, win = _preference_term(d, beta, label, weight, lambda_d, lambda_u, kl, FORM)
        tl.store(e_theta_ptr + j, e_w, mask=live)
        tl.store(e_ref_ptr + j, r_w, mask=live)
        tl.store(coef_ptr + j, (dl_dd + lambda_sft) * inv_terms * grad_scale, mask=live)
        loss_sum += tl.sum(tl.where(live, term, 0.0), axis=0)
        e_theta_w_sum += tl.sum(tl.where(live, e_w, 0.0), axis=0)
        e_ref_sum += tl.sum(tl.where(live, r_w, 0.0), axis=0)
        reward_w_sum += tl.sum(tl.where(live, reward_w, 0.0), axis=0)
        wins_sum += tl.sum(tl.where(live, win, 0.0), axis=0)
        beta_sum += tl.sum(tl.where(live, beta, 0.0), axis=0)
        if PAIRED:
            tl.store(e_theta_ptr + n_terms + j, e_l, mask=live)
            tl.store(e_ref_ptr + n_terms + j, r_l, mask=live)
            tl.store(coef_ptr + n_terms + j, -dl_dd * inv_terms * grad_scale, mask=live)
            e_theta_l_sum += tl.sum(tl.where(live, e_l, 0.0), axis=0)
            e_ref_sum += tl.sum(tl.where(live, r_l, 0.0), axis=0)
            reward_l_sum += tl.sum(tl.where(live, reward_l, 0.0), axis=0)
    _store_metrics(metrics_ptr, loss_ptr, loss_sum, e_theta_w_sum, e_theta_l_sum, e_ref_sum, reward_w_sum,
                   reward_l_sum, wins_sum, beta_sum, inv_terms, inv_samples, lambda_sft)


@triton.jit
def apo_preference_finalize_kernel(
    partial_ptr,
    beta_ptr,
    labels_ptr,
    weights_ptr,
    stats_ptr,
    loss_ptr,
    n_samples,
    n_terms,
    n_chunks,
    beta_value,
    inv_numel,
    inv_terms,
    inv_samples,
    lambda_sft,
    lambda_d,
    lambda_u,
    FORM: tl.constexpr,
    PAIRED: tl.constexpr,
    BETA_PER_TERM: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    BLOCK_TERMS: tl.constexpr,
    BLOCK_CHUNKS: tl.constexpr,
):
    """:func:`apo_loss_finalize_kernel` for every preference form (FORM: 0 sigmoid, 1 hinge, 2 ipo,
    3 kto, 4 margin), per-term weights and KTO labels; same stats layout. The Python launcher
    uses it for every form; the C library's ABI keeps the sigmoid kernel."""
    _finalize(partial_ptr, beta_ptr, labels_ptr, weights_ptr, stats_ptr, loss_ptr, n_samples, n_terms, n_chunks,
              beta_value, inv_numel, inv_terms, inv_samples, lambda_sft, lambda_d, lambda_u,
              FORM, PAIRED, BETA_PER_TERM, HAS_LABELS, HAS_WEIGHTS, BLOCK_TERMS, BLOCK_CHUNKS)
