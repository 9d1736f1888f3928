"""Triton kernel of the gated adapter's base matmul over a packed weight, dequantized in the K loop.

FORMAT 0, bitsandbytes' NF4 (``Linear4bit``, no double quantization): the (N, K) weight
flattened row-major, two 4-bit codes per byte with the even element in the high nibble,
one fp32 absmax per 64-element block, and the 16-entry code table (``quant_state.code``);
a tile is ``code[nibble] * absmax[e // 64]``. FORMAT 2, NF4 with double quantization
(``compress_statistics=True``): the same codes, but each block's absmax is itself a uint8
code of bitsandbytes' 256-entry dynamic map with one fp32 absmax per 256 blocks and the
mean (``offset``) added back: ``absmax[b] = code2[u8[b]] * absmax2[b // 256] + offset``.
The code table then holds ``[code (16), code2 (256), offset (1)]``. FORMAT 1, bitsandbytes'
int8 (``Linear8bitLt`` weights, LLM.int8 row-wise): ``CB[n, k] * SCB[n] / 127``. FORMAT 3,
fp8 e4m3 (``apo_fast.models.fp8``: the OCP ``float8_e4m3fn`` bytes, one fp32 scale per
output row): ``e4m3(byte[n, k]) * scale[n]``, decoded with integer arithmetic, so it needs no
fp8 hardware (sm_80 has none) and is exact. Decoded in registers; no full-precision copy of
W is written to memory.

``out (M, P) = a (M, Q) @ op(W) [+ bias] [+ add]`` with ``op(W) = W^T`` (TRANS=0: the
forward, P = N out-features, Q = K in-features) or ``W`` (TRANS=1: dx = dy W, P = K,
Q = N). ``add`` (M, P) is the low-rank term the host computed. fp32 accumulation.
"""
import triton
import triton.language as tl

NF4_BLOCK = tl.constexpr(64)  # a constexpr global: read inside the jit functions
NESTED_BLOCK = tl.constexpr(256)  # absmax values per second-level absmax (bitsandbytes' nested blocksize)
CODE2_AT = tl.constexpr(16)  # FORMAT 2's code table: [code (16), code2 (256), offset]
OFFSET_AT = tl.constexpr(272)


def packed_configs(interpret: bool) -> list:
    """Launch configs (one per path: the interpreter gets small tiles for odd test shapes)."""
    if interpret:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_P": 16, "BLOCK_Q": 16}, num_warps=1, num_stages=1)]
    return [triton.Config({"BLOCK_M": 64, "BLOCK_P": 64, "BLOCK_Q": 32}, num_warps=4, num_stages=2)]


@triton.jit
def _e4m3(byte):
    """The fp32 value of an e4m3fn byte (sign, 4 exponent bits with bias 7, 3 mantissa bits;
    exponent 0 is subnormal: m / 512). 2^(exp - 7) is built from its fp32 bits, so every
    step is exact. (0x7f / 0xff, the format's NaN, never occurs: the quantizer clamps.)"""
    exp = (byte >> 3) & 15
    man = (byte & 7).to(tl.float32)
    pow2 = ((exp + 120) << 23).to(tl.float32, bitcast=True)
    magnitude = tl.where(exp == 0, man * (1.0 / 512.0), (8.0 + man) * 0.125 * pow2)
    return tl.where(byte >= 128, -magnitude, magnitude)


@triton.jit
def _packed_tile(qw_ptr, absmax_ptr, code_ptr, absmax2_ptr, n_idx, k_idx, valid, K_w, FORMAT: tl.constexpr):
    """W[n, k] for a tile of indices (fp32), decoded from FORMAT (module docstring)."""
    e = n_idx * K_w + k_idx
    if FORMAT == 1:
        value = tl.load(qw_ptr + e, mask=valid, other=0).to(tl.float32)
        scale = tl.load(absmax_ptr + n_idx + 0 * k_idx, mask=valid, other=0.0) * (1.0 / 127.0)
    elif FORMAT == 3:
        value = _e4m3(tl.load(qw_ptr + e, mask=valid, other=0).to(tl.int32))
        scale = tl.load(absmax_ptr + n_idx + 0 * k_idx, mask=valid, other=0.0)
    else:
        byte = tl.load(qw_ptr + e // 2, mask=valid, other=0).to(tl.int32)
        nibble = tl.where(e % 2 == 0, byte >> 4, byte & 15)
        value = tl.load(code_ptr + nibble, mask=valid, other=0.0)
        block = e // NF4_BLOCK
        if FORMAT == 2:
            q = tl.load(absmax_ptr + block, mask=valid, other=0).to(tl.int32)
            scale = (tl.load(code_ptr + CODE2_AT + q, mask=valid, other=0.0)
                     * tl.load(absmax2_ptr + block // NESTED_BLOCK, mask=valid, other=0.0)
                     + tl.load(code_ptr + OFFSET_AT))
        else:
            scale = tl.load(absmax_ptr + block, mask=valid, other=0.0)
    return value * scale


@triton.jit
def packed_matmul_kernel(
    a_ptr, qw_ptr, absmax_ptr, code_ptr, absmax2_ptr, bias_ptr, add_ptr, out_ptr,
    M, P, Q, K_w,
    stride_am, stride_addm, stride_om,
    FORMAT: tl.constexpr, TRANS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ADD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_P) tile of ``out = a @ op(W) (+ bias) (+ add)`` (module docstring)."""
    pid_m = tl.program_id(0)
    pid_p = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = tl.arange(0, BLOCK_Q)
    mask_m = offs_m < M
    mask_p = offs_p < P
    acc = tl.zeros([BLOCK_M, BLOCK_P], dtype=tl.float32)
    for q0 in range(0, tl.cdiv(Q, BLOCK_Q)):
        q = q0 * BLOCK_Q + offs_q
        mask_q = q < Q
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + q[None, :], mask=mask_m[:, None] & mask_q[None, :],
                    other=0.0)
        valid = mask_q[:, None] & mask_p[None, :]
        if TRANS:
            w = _packed_tile(qw_ptr, absmax_ptr, code_ptr, absmax2_ptr, q[:, None], offs_p[None, :], valid, K_w, FORMAT)  # W[q, p]
        else:
            w = _packed_tile(qw_ptr, absmax_ptr, code_ptr, absmax2_ptr, offs_p[None, :], q[:, None], valid, K_w, FORMAT)  # W[p, q]
        if DOT_FP32:  # the interpreter's tl.dot is wrong on bf16: bf16 storage, fp32 math there
            acc = tl.dot(a.to(tl.float32), w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w.to(a.dtype), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_p, mask=mask_p, other=0.0).to(tl.float32)[None, :]
    out_mask = mask_m[:, None] & mask_p[None, :]
    if HAS_ADD:
        acc += tl.load(add_ptr + offs_m[:, None] * stride_addm + offs_p[None, :], mask=out_mask, other=0.0).to(
            tl.float32)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_p[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_mask)
