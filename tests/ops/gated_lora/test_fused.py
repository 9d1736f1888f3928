"""The fused gated-LoRA linear (Triton, through TRITON_INTERPRET=1 on CPU tensors)
against the plain PyTorch reference in float64: output and every gradient.

bf16 is not run here: the interpreter's tl.dot on bf16 is wrong (see
ENGINEERING.md); tests/ops/gated_lora/test_compile.py covers the bf16 kernels.
Every buffer the Triton path allocates is filled with NaN first (the
``nan_allocations`` fixture), so an element a kernel fails to write shows up.
"""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

import apo_fast.ops.gated_lora.fused as gl  # noqa: E402
import apo_fast.ops.gated_lora.op as gl_op  # noqa: E402
from apo_fast.ops.gated_lora import gated_lora_linear, gated_lora_linear_reference  # noqa: E402

TOL = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}
SCALING = 0.75


class _NanAllocTorch:
    """``torch`` for the op module, except that empty/empty_like return NaN-filled tensors."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def _poison(t):
        return t.fill_(math.nan) if t.is_floating_point() else t

    def empty(self, *args, **kwargs):
        return self._poison(torch.empty(*args, **kwargs))

    def empty_like(self, *args, **kwargs):
        return self._poison(torch.empty_like(*args, **kwargs))


@pytest.fixture(autouse=True)
def nan_allocations(monkeypatch):
    monkeypatch.setattr(gl, "torch", _NanAllocTorch())
    monkeypatch.delenv("APO_FAST_BACKEND", raising=False)


@pytest.fixture
def triton_calls(monkeypatch):
    """Count launches of the fused forward (to see which path ran)."""
    calls = []
    real = gl_op.gated_lora_forward

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(gl_op, "gated_lora_forward", spy)
    return calls


def _gate(kind: str, samples: int, rank: int) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "learned":  # per-sample values in [0, 1], trained
        return torch.rand(samples, rank).requires_grad_()
    if kind == "shared":  # one (1, r) gate for every sample, trained
        return torch.rand(1, rank).requires_grad_()
    if kind == "prefix":  # TACA default: rank prefixes of different lengths per sample
        lengths = [1 + (s * rank) // samples for s in range(samples)]
        lengths[-1] = rank
        return torch.stack([(torch.arange(rank) < n).float() for n in lengths])
    raise ValueError(kind)


def _inputs(S, T, K, N, r, dtype, *, bias=True, gate="learned", grads=("x", "A", "B")):
    x = torch.randn(S, T, K, dtype=dtype)
    weight = (torch.randn(N, K) / math.sqrt(K)).to(dtype)
    b = torch.randn(N).to(dtype) if bias else None
    A = (torch.randn(r, K) / math.sqrt(K)).to(dtype)
    B = (torch.randn(N, r) / math.sqrt(r)).to(dtype)
    g = _gate(gate, S, r)
    for name, t in (("x", x), ("A", A), ("B", B)):
        t.requires_grad_(name in grads)
    return x, weight, b, A, B, g


def _grad_targets(x, A, B, g):
    return [t for t in (x, A, B, g) if t is not None and t.requires_grad]


def _assert_close(actual, expected, dtype, what):
    assert actual.dtype == dtype or what == "dgate", f"{what}: dtype {actual.dtype}"
    actual = actual.double()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (unwritten output?)"
    tol = TOL[dtype]
    scale = expected.abs().max().item() + 1e-6
    torch.testing.assert_close(actual, expected, atol=tol * scale, rtol=tol, msg=lambda m: f"{what}: {m}")


def _check_against_reference(x, weight, bias, A, B, g, *, backend="triton"):
    """Run the op and the float64 reference, compare the output and every gradient."""
    dtype = x.dtype
    y = gated_lora_linear(x, weight, bias, A, B, g, SCALING, backend=backend)
    dy = torch.randn_like(y)
    targets = _grad_targets(x, A, B, g)
    grads = torch.autograd.grad(y, targets, dy) if targets else ()

    leaves = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None
              for t in (x, A, B, g)]
    x64, A64, B64, g64 = leaves
    y64 = gated_lora_linear_reference(x64, weight.double(), bias.double() if bias is not None else None,
                                      A64, B64, g64, SCALING)
    targets64 = _grad_targets(x64, A64, B64, g64)
    grads64 = torch.autograd.grad(y64, targets64, dy.double()) if targets64 else ()

    assert y.shape == y64.shape
    _assert_close(y, y64, dtype, "y")
    names = [n for n, t in zip(("dx", "dA", "dB", "dgate"), (x, A, B, g))
             if t is not None and t.requires_grad]
    for name, got, want in zip(names, grads, grads64):
        assert got.shape == want.shape, name
        _assert_close(got, want, dtype, name)


# --- correctness against float64 ------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("rank", [1, 3, 16, 33])
@pytest.mark.parametrize("gate", ["learned", "prefix", "shared", "none"])
def test_matches_float64_reference(dtype, rank, gate, triton_calls):
    x, w, b, A, B, g = _inputs(3, 13, 19, 23, rank, dtype, gate=gate)
    _check_against_reference(x, w, b, A, B, g)
    assert triton_calls, "the Triton path did not run"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("rank", [3, 33])
def test_without_bias_and_seven_tokens_per_sample(dtype, rank):
    x, w, b, A, B, g = _inputs(3, 7, 19, 23, rank, dtype, bias=False)
    _check_against_reference(x, w, b, A, B, g)


def test_max_rank_and_block_multiple_shapes():
    x, w, b, A, B, g = _inputs(2, 16, 32, 48, 128, torch.float32)
    _check_against_reference(x, w, b, A, B, g)


@pytest.mark.parametrize("rank", [5, 40])  # in-loop and rank-chunked low-rank products
@pytest.mark.parametrize("grads", [("x",), ("A",), ("B",), ("gate",), ("A", "gate"), ()],
                         ids=lambda g: "+".join(g) or "nothing")
def test_each_gradient_subset(rank, grads):
    x, w, b, A, B, g = _inputs(3, 5, 17, 21, rank, torch.float32, grads=grads)
    g.requires_grad_("gate" in grads)
    _check_against_reference(x, w, b, A, B, g)


def test_four_dim_input_and_one_token_per_sample():
    x, w, b, A, B, g = _inputs(2, 15, 11, 9, 4, torch.float32)
    _check_against_reference(x.detach().reshape(2, 3, 5, 11).requires_grad_(), w, b, A, B, g)
    x1, w1, b1, A1, B1, g1 = _inputs(6, 1, 11, 9, 4, torch.float32)
    _check_against_reference(x1.detach().reshape(6, 11).requires_grad_(), w1, b1, A1, B1, g1)


def test_two_dim_input_maps_contiguous_token_blocks_to_gate_rows():
    x, w, b, A, B, g = _inputs(4, 6, 10, 12, 3, torch.float32)
    y3 = gated_lora_linear(x, w, b, A, B, g, SCALING, backend="triton")
    y2 = gated_lora_linear(x.reshape(24, 10), w, b, A, B, g, SCALING, backend="triton")
    torch.testing.assert_close(y2.reshape(4, 6, 12), y3, rtol=0, atol=0)
    _check_against_reference(x.detach().reshape(24, 10).requires_grad_(), w, b, A, B, g)


def test_samples_with_different_gates_get_different_updates():
    x, w, b, A, B, _ = _inputs(2, 4, 8, 8, 4, torch.float32, grads=())
    x = torch.cat([x[:1], x[:1]])  # same tokens in both samples
    g = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    y = gated_lora_linear(x, w, b, A, B, g, SCALING, backend="triton")
    assert not torch.allclose(y[0], y[1])
    y_full = gated_lora_linear(x[:1], w, b, A, B, None, SCALING, backend="triton")
    torch.testing.assert_close(y[:1], y_full, rtol=1e-6, atol=1e-6)


def test_no_grad_forward_matches():
    x, w, b, A, B, g = _inputs(3, 13, 19, 23, 6, torch.float32)
    with torch.no_grad():
        y = gated_lora_linear(x, w, b, A, B, g, SCALING, backend="triton")
        ref = gated_lora_linear_reference(x, w, b, A, B, g, SCALING)
    assert not y.requires_grad
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


# --- the PyTorch path (CPU, float64 args, ranks > 128) -------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("rank", [1, 5, 33, 130])
@pytest.mark.parametrize("gate", ["learned", "prefix", "shared", "none"])
def test_eager_path_matches_float64_reference(dtype, rank, gate, triton_calls):
    x, w, b, A, B, g = _inputs(3, 7, 19, 23, rank, dtype, gate=gate)
    _check_against_reference(x, w, b, A, B, g, backend="torch")
    assert not triton_calls, "backend='torch' ran the Triton path"


@pytest.mark.parametrize("shape", [(24, 10), (2, 3, 4, 10), (6, 10)], ids=["2d-blocks", "4d", "1-token"])
def test_eager_path_token_layouts_and_gradient_subsets(shape):
    samples = 4 if len(shape) == 2 and shape[0] == 24 else shape[0]
    x, w, b, A, B, g = _inputs(samples, 1, 10, 12, 3, torch.float32, grads=("A",))
    x = torch.randn(shape).requires_grad_()
    _check_against_reference(x, w, b, A, B, g, backend="torch")
    g.requires_grad_(False)
    _check_against_reference(x, w, None, A, B, g, backend="torch")


def test_nan_poisoning_is_active():
    assert torch.isnan(gl.torch.empty(3)).all()
    assert torch.isnan(gl.torch.empty_like(torch.zeros(2))).all()


# --- autocast, checkpointing, determinism ----------------------------------------------

def test_autocast_casts_like_f_linear_and_grads_reach_fp32_params():
    x, w, b, A, B, g = _inputs(2, 9, 16, 20, 4, torch.float32)
    A, B = torch.nn.Parameter(A.detach()), torch.nn.Parameter(B.detach())
    with torch.autocast("cpu", dtype=torch.float16):
        y = gated_lora_linear(x, w, b, A, B, g, SCALING, backend="triton")
        ref = gated_lora_linear_reference(x, w, b, A, B, g, SCALING)
    assert y.dtype == ref.dtype == torch.float16
    torch.testing.assert_close(y, ref, rtol=1e-2, atol=1e-2)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, A, B, g), dy)
    want = torch.autograd.grad(ref, (x, A, B, g), dy)
    for name, a, e in zip(("dx", "dA", "dB", "dgate"), got, want):
        assert a.dtype == e.dtype == torch.float32, name
        torch.testing.assert_close(a, e, rtol=2e-2, atol=2e-2 * e.abs().max().item())


def test_gradient_checkpointing_recomputes_identically():
    from torch.utils.checkpoint import checkpoint

    x, w, b, A, B, g = _inputs(3, 7, 12, 10, 5, torch.float32)

    def layer(inp):
        return torch.tanh(gated_lora_linear(inp, w, b, A, B, g, SCALING, backend="triton"))

    leaves = (x, A, B, g)

    def grads_of(out):
        for t in leaves:
            t.grad = None
        out.sum().backward()  # reentrant checkpointing does not support autograd.grad
        return [t.grad.clone() for t in leaves]

    plain = grads_of(layer(x))
    for reentrant in (False, True):
        ckpt = grads_of(checkpoint(layer, x, use_reentrant=reentrant))
        for a, e in zip(ckpt, plain):
            torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_deterministic_across_calls():
    x, w, b, A, B, g = _inputs(3, 11, 13, 17, 20, torch.float32)
    runs = []
    for _ in range(2):
        y = gated_lora_linear(x, w, b, A, B, g, SCALING, backend="triton")
        runs.append((y, *torch.autograd.grad(y.square().sum(), (x, A, B, g))))
    for a, e in zip(*runs):
        assert torch.equal(a, e)


# --- dispatch -------------------------------------------------------------------------

def test_backend_override_and_environment(monkeypatch, triton_calls):
    x, w, b, A, B, g = _inputs(2, 3, 8, 8, 2, torch.float32)
    gated_lora_linear(x, w, b, A, B, g, SCALING)  # auto on CPU tensors: reference
    gated_lora_linear(x, w, b, A, B, g, SCALING, backend="torch")
    assert not triton_calls
    gated_lora_linear(x, w, b, A, B, g, SCALING, backend="triton")
    assert len(triton_calls) == 1
    monkeypatch.setenv("APO_FAST_BACKEND", "triton")
    gated_lora_linear(x, w, b, A, B, g, SCALING)
    assert len(triton_calls) == 2
    gated_lora_linear(x, w, b, A, B, g, SCALING, backend="torch")  # argument beats environment
    assert len(triton_calls) == 2
    monkeypatch.setenv("APO_FAST_BACKEND", "cuda")
    with pytest.raises(ValueError, match="APO_FAST_BACKEND"):
        gated_lora_linear(x, w, b, A, B, g, SCALING)
    with pytest.raises(ValueError, match="backend"):
        gated_lora_linear(x, w, b, A, B, g, SCALING, backend="fast")


def test_trainable_base_or_float64_uses_reference(triton_calls):
    x, w, b, A, B, g = _inputs(2, 3, 8, 8, 2, torch.float32)
    w.requires_grad_()
    y = gated_lora_linear(x, w, b, A, B, g, SCALING, backend="triton")
    (dw,) = torch.autograd.grad(y.sum(), (w,))
    assert dw.shape == w.shape and not triton_calls
    x64, w64, b64, A64, B64, g64 = _inputs(2, 3, 8, 8, 2, torch.float64)
    gated_lora_linear(x64, w64, b64, A64, B64, g64, SCALING, backend="triton")
    assert not triton_calls


# --- validation -----------------------------------------------------------------------

def _valid():
    return dict(zip(("x", "weight", "bias", "lora_A", "lora_B", "gate"),
                    _inputs(3, 4, 8, 6, 2, torch.float32)))


@pytest.mark.parametrize("change, error, match", [
    (dict(x=torch.randn(3, 4, 7)), ValueError, "in_features"),
    (dict(x=torch.randn(8)), ValueError, "at least 2 dims"),
    (dict(weight=torch.randn(6, 8, 1)), ValueError, "weight must be"),
    (dict(bias=torch.randn(5)), ValueError, "bias must be"),
    (dict(lora_A=torch.randn(2, 7)), ValueError, "lora_A must be"),
    (dict(lora_B=torch.randn(6, 3)), ValueError, "lora_B must be"),
    (dict(gate=torch.rand(3, 5)), ValueError, "gate must be"),
    (dict(gate=torch.rand(2, 2)), ValueError, "gate has 2 rows but x has 3 samples"),
    (dict(x=torch.randn(10, 8), gate=torch.rand(3, 2)), ValueError, "not divisible"),
    (dict(weight=torch.randn(6, 8, dtype=torch.float16)), TypeError, "weight has dtype"),
    (dict(lora_B=torch.randn(6, 2, dtype=torch.float64)), TypeError, "lora_B has dtype"),
    (dict(x=torch.ones(3, 4, 8, dtype=torch.int32)), TypeError, "x must be a floating-point"),
    (dict(gate=torch.ones(3, 2, dtype=torch.int64)), TypeError, "gate must be a floating-point"),
    (dict(x=[[1.0] * 8]), TypeError, "x must be a torch.Tensor"),
])
def test_bad_inputs_raise_clear_errors(change, error, match):
    args = {**_valid(), **change}
    with pytest.raises(error, match=match):
        gated_lora_linear(*args.values(), SCALING, backend="triton")


@pytest.mark.parametrize("scaling", ["1.0", None, True, torch.tensor(1.0)])
def test_scaling_must_be_a_real_number(scaling):
    with pytest.raises(TypeError, match="scaling"):
        gated_lora_linear(*_valid().values(), scaling)
