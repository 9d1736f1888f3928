"""Time-gated low-rank adapter on a frozen linear layer (APO_SPEC "TACA").

    y = x W^T + b + scaling * ((x A^T) * gate[sample]) B^T

``A`` (r x in) and ``B`` (out x r) use peft's layout (``lora_A.weight``,
``lora_B.weight``); ``scaling`` is peft's ``lora_alpha / r``. ``gate`` holds one
vector over the rank per sample (the timestep gate k(t)), and every token of a
sample uses its sample's row.

Token-to-sample mapping
-----------------------
``x`` is ``(S, ..., in)``: the leading dimension is the sample dimension and
each sample owns ``x[0].numel() // in`` consecutive tokens of the flattened
``(tokens, in)`` view. ``gate`` is ``(S, r)``, or ``(1, r)`` for one gate shared
by every token, or ``None`` (all ones: a plain LoRA). A 2-D ``x`` of shape
``(tokens, in)`` with a ``(G, r)`` gate maps contiguous blocks of
``tokens // G`` tokens to the gate rows (``tokens % G == 0`` is required);
``(S, in)`` with an ``(S, r)`` gate is therefore one token per sample.

Dispatch
--------
:func:`gated_lora_linear` runs the fused Triton path or the PyTorch path
(chosen by :func:`apo_fast.backend.use_triton`: Triton for CUDA tensors); the
PyTorch path is :func:`gated_lora_linear_eager`, the reference's value with the
scaling folded into the gate and ``addmm`` accumulating into the base output.
The PyTorch path is also used when ``weight`` or ``bias`` requires grad (the
kernels assume a frozen base layer), for float64, and for ranks above 128.

Triton path (kernels in ``apo_fast.kernels.gated_lora``)
--------------------------------------------------------
Forward: one kernel per output tile computes ``x W^T`` and, for padded ranks
up to :data:`IN_LOOP_MAX_R_PAD`, ``h = x A^T`` in the same K loop from the
same x tiles, applies each row's gate (row -> sample by integer division, the
gate read per tile, never expanded to tokens x r), adds ``(h g s) B^T`` and the
bias, and keeps ``h`` for the backward. Larger ranks compute ``h`` once by a
skinny product and read it back in rank chunks. Backward (W frozen): one
kernel for ``dx = dy W + (u g s) A`` with ``u = dy B`` (again in-loop or
precomputed by rank), one launch for both ``dA = (u g s)^T x`` and
``dB = ((h g s)^T dy)^T`` as split-token fp32 partials summed on the host (no
atomics: deterministic), and ``dgate = s * sum_tokens(u * h)`` per gate row.
fp16/bf16 storage with fp32 accumulation; fp32 inputs use IEEE fp32 dots
unless ``torch.backends.cuda.matmul.allow_tf32`` is set.
"""
from __future__ import annotations

import contextlib
import functools
import numbers
import types

import torch
import torch.nn.functional as F

from apo_fast.backend import use_triton

__all__ = [
    "gated_lora_linear",
    "gated_lora_linear_reference",
    "gated_lora_linear_eager",
    "gate_rows",
    "gated_lora_forward",
    "gated_lora_backward",
    "GatedLoRALinearFunction",
    "MAX_TRITON_RANK",
]

MAX_TRITON_RANK = 128
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def gated_lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    gate: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """Plain PyTorch gated LoRA linear; differentiable in every tensor argument.

    Shapes as in :func:`gated_lora_linear`. No input validation (callers that
    want it go through :func:`gated_lora_linear`).
    """
    y = F.linear(x, weight, bias)
    h = F.linear(x, lora_A)  # (..., r)
    if gate is not None:
        r = h.shape[-1]
        groups = gate.shape[0]
        gated = h.reshape(groups, -1, r) * gate.to(h.dtype).unsqueeze(1)
        h = gated.reshape(h.shape)
    return y + F.linear(h, lora_B) * scaling


def gated_lora_linear_eager(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    gate: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """The PyTorch (non-Triton) path: the reference's value in fewer passes.

    ``scaling`` is folded into the small ``(S, r)`` gate (or into ``addmm``'s
    ``alpha``), the gate multiplies the ``(tokens, r)`` product, and the
    up-projection accumulates straight into the base output with ``addmm``. A
    peft-style ``base(x) + B(A(x)) * scaling`` makes two extra passes over the
    ``(tokens, out)`` output, forward and backward; this makes none. Same
    shapes and gradients as :func:`gated_lora_linear_reference` (rounding aside).
    """
    y = F.linear(x, weight, bias)
    h = F.linear(x, lora_A)
    rank, out_features = h.shape[-1], y.shape[-1]
    y2d = y.reshape(-1, out_features)
    if gate is None:
        return torch.addmm(y2d, h.reshape(-1, rank), lora_B.t(), alpha=scaling).reshape(y.shape)
    return torch.addmm(y2d, gate_rows(h, gate, scaling).reshape(-1, rank), lora_B.t()).reshape(y.shape)


def gate_rows(h: torch.Tensor, gate: torch.Tensor, scaling: float) -> torch.Tensor:
    """``h * scaling * gate[sample]`` for the low-rank product ``h`` of shape ``(S, ..., r)``
    (or ``(tokens, r)`` in ``G`` contiguous blocks) and a ``(G, r)`` gate; the scaling is
    folded into the small gate (``G * r`` multiplies)."""
    g = gate.to(h.dtype) * scaling
    return (h.reshape(g.shape[0], -1, h.shape[-1]) * g.unsqueeze(1)).reshape(h.shape)


def _check_inputs(x, weight, bias, lora_A, lora_B, gate, scaling, autocasting: bool) -> None:
    """Raise a clear error for a malformed call, before any work is done."""
    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    for name, t in (("bias", bias), ("gate", gate)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t is not None and not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise TypeError(f"scaling must be a real number (peft lora_alpha / r), got {scaling!r}")
    if x.dim() < 2:
        raise ValueError(f"x must be (S, ..., in) with at least 2 dims, got shape {tuple(x.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be (out, in), got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(
            f"x's last dim ({x.shape[-1]}) must equal weight's in_features ({in_features})"
        )
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must be ({out_features},), got shape {tuple(bias.shape)}")
    if lora_A.dim() != 2 or lora_A.shape[1] != in_features or lora_A.shape[0] < 1:
        raise ValueError(
            f"lora_A must be (r, {in_features}) with r >= 1, got shape {tuple(lora_A.shape)}"
        )
    rank = lora_A.shape[0]
    if tuple(lora_B.shape) != (out_features, rank):
        raise ValueError(
            f"lora_B must be ({out_features}, {rank}) (out, r), got shape {tuple(lora_B.shape)}"
        )
    if gate is not None:
        if gate.dim() != 2 or gate.shape[1] != rank or gate.shape[0] < 1:
            raise ValueError(f"gate must be (S, {rank}) or (1, {rank}), got shape {tuple(gate.shape)}")
        groups = gate.shape[0]
        if groups != 1:
            if x.dim() > 2 and groups != x.shape[0]:
                raise ValueError(
                    f"gate has {groups} rows but x has {x.shape[0]} samples (leading dim); "
                    f"expected gate of shape ({x.shape[0]}, {rank}) or (1, {rank})"
                )
            tokens = x.numel() // in_features if in_features else 0
            if x.dim() == 2 and tokens % groups != 0:
                raise ValueError(
                    f"2-D x has {tokens} tokens, not divisible by the gate's {groups} rows"
                )
    tensors = {"x": x, "weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B, "gate": gate}
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if not autocasting:
        _check_dtypes(x, weight, bias, lora_A, lora_B)


def _check_dtypes(x, weight, bias, lora_A, lora_B) -> None:
    for name, t in (("weight", weight), ("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(
                f"{name} has dtype {t.dtype} but x has {x.dtype}; cast them to one dtype "
                "or run under torch.autocast"
            )


def _autocast_to(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Cast like autocast casts F.linear's inputs: float16/bfloat16/float32 only."""
    if t is None or t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return t
    return t.to(dtype)


def _wants_triton(x, weight, bias, lora_A, backend) -> bool:
    if not use_triton(x, weight, lora_A, override=backend):
        return False
    frozen_base = not weight.requires_grad and (bias is None or not bias.requires_grad)
    return (
        frozen_base
        and x.dtype in _TRITON_DTYPES
        and lora_A.shape[0] <= MAX_TRITON_RANK
        and x.numel() > 0
        and weight.shape[0] > 0
    )


def gated_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    gate: torch.Tensor | None,
    scaling: float,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Frozen linear layer plus a per-sample gated low-rank update.

    Args:
        x: ``(S, ..., in)`` input; the leading dim is the sample dim (see the
            module docstring for 2-D inputs).
        weight: ``(out, in)`` frozen base weight.
        bias: ``(out,)`` frozen base bias, or ``None``.
        lora_A: ``(r, in)`` down projection (peft ``lora_A.weight``).
        lora_B: ``(out, r)`` up projection (peft ``lora_B.weight``).
        gate: ``(S, r)`` per-sample gate in [0, 1] (may require grad for a
            learned gate), ``(1, r)`` shared by all samples, or ``None`` (ones).
        scaling: peft's ``lora_alpha / r``.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"`` | ``None`` (environment).

    Returns:
        ``(S, ..., out)``: ``x W^T + b + scaling * ((x A^T) * gate[sample]) B^T``
        in ``x``'s dtype (the autocast dtype under ``torch.autocast``, cast the
        way ``F.linear`` casts; ``gate`` keeps its own dtype and its gradient is
        returned in it).

    Differentiable in ``x``, ``lora_A``, ``lora_B``, ``gate`` (and ``weight``,
    ``bias`` through the reference path when they require grad). Deterministic,
    so gradient checkpointing recomputes the same values.
    """
    device_type = x.device.type if isinstance(x, torch.Tensor) else "cpu"
    autocasting = isinstance(x, torch.Tensor) and torch.is_autocast_enabled(device_type)
    _check_inputs(x, weight, bias, lora_A, lora_B, gate, scaling, autocasting)
    scaling = float(scaling)
    if autocasting:
        dtype = torch.get_autocast_dtype(device_type)
        x, weight, bias, lora_A, lora_B = (_autocast_to(t, dtype) for t in (x, weight, bias, lora_A, lora_B))
        _check_dtypes(x, weight, bias, lora_A, lora_B)
    with torch.autocast(device_type, enabled=False) if autocasting else contextlib.nullcontext():
        if _wants_triton(x, weight, bias, lora_A, backend):
            return _gated_lora_linear_triton(x, weight, bias, lora_A, lora_B, gate, scaling)
        return gated_lora_linear_eager(x, weight, bias, lora_A, lora_B, gate, scaling)


# --------------------------------------------------------------------------------------
# Triton path: autotuned kernels, host launchers, autograd Function.
# --------------------------------------------------------------------------------------

from apo_fast.ops.utils import cdiv as _cdiv  # noqa: E402


def _rank_pad(rank: int) -> int:
    """Rank padded for tl.dot: a power of two, at least 16."""
    return max(16, 1 << (rank - 1).bit_length())


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's matmul TF32 switch, like F.linear does."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


# Ranks padded to at most this are accumulated inside the base matmul's loop
# (h in the forward, u = dy B in the backward), from the tiles already loaded.
# Larger ranks are computed once by a skinny product and read back in rank
# chunks: recomputing them per output tile would cost more MMA work than a
# second read of x, and would not fit in registers (see the compile test).
IN_LOOP_MAX_R_PAD = 16
R_CHUNK = 16


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
    import triton

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


@functools.lru_cache(maxsize=None)
def _tuned_kernels(interpret: bool, r_pad: int, fp32: bool):
    """The kernels wrapped in triton.autotune over :func:`autotune_configs`."""
    import triton

    from apo_fast.kernels import gated_lora as k

    configs = autotune_configs(interpret, r_pad, fp32)
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
    from apo_fast.backend import interpreter_enabled

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
    kernel = _kernels(_rank_pad(rank), x2d.dtype).project
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
    kernel = _kernels(r_pad, x2d.dtype).forward
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
        programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count
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
        kernels.backward_dx[lambda meta: (_cdiv(M, meta["BLOCK_M"]) * _cdiv(K, meta["BLOCK_K"]),)](
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

        kernels.backward_dadb[grid](
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


class GatedLoRALinearFunction(torch.autograd.Function):
    """Autograd wrapper of the fused kernels; the base ``weight`` and ``bias`` are frozen."""

    @staticmethod
    def forward(ctx, x2d, weight, bias, lora_A, lora_B, gate, scaling, tokens_per_sample):
        need = ctx.needs_input_grad
        store_h = need[4] or need[5]  # dB and dgate need h = x A^T
        y, h = gated_lora_forward(x2d, weight, bias, lora_A, lora_B, gate, scaling,
                                  tokens_per_sample, store_h)
        # x is only read again for dA; h only for dB and dgate.
        ctx.save_for_backward(x2d if need[3] else None, weight, lora_A, lora_B, gate,
                              h if store_h else None)
        ctx.scaling = scaling
        ctx.tokens_per_sample = tokens_per_sample
        return y

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, lora_A, lora_B, gate, h = ctx.saved_tensors
        need = ctx.needs_input_grad
        dy = dy.to(weight.dtype).contiguous()
        dx, da, db, dgate = gated_lora_backward(
            dy, x2d, weight, lora_A, lora_B, gate, h, ctx.scaling, ctx.tokens_per_sample,
            need_dx=need[0], need_da=need[3], need_db=need[4], need_dgate=need[5],
        )
        return dx, None, None, da, db, dgate, None, None


def _gated_lora_linear_triton(x, weight, bias, lora_A, lora_B, gate, scaling):
    """Flatten to (tokens, in), run the fused kernels, restore the leading dims."""
    in_features = x.shape[-1]
    x2d = x.reshape(-1, in_features).contiguous()
    M = x2d.shape[0]
    groups = gate.shape[0] if gate is not None else 1
    tokens_per_sample = M // groups if groups > 1 else M
    weight, lora_A, lora_B = weight.contiguous(), lora_A.contiguous(), lora_B.contiguous()
    bias = bias.contiguous() if bias is not None else None
    gate = gate.contiguous() if gate is not None else None
    grads = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, lora_A, lora_B, gate)
    )
    if grads:
        y2d = GatedLoRALinearFunction.apply(x2d, weight, bias, lora_A, lora_B, gate, scaling,
                                            tokens_per_sample)
    else:
        y2d, _ = gated_lora_forward(x2d, weight, bias, lora_A, lora_B, gate, scaling,
                                    tokens_per_sample, store_h=False)
    return y2d.reshape(*x.shape[:-1], weight.shape[0])
