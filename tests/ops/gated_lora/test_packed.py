"""The gated adapter over a packed base (NF4 with and without double quantization, int8, fp8
e4m3) with the base matmuls dequantizing inside the Triton K loop: forward and every gradient
against float64 with the weight from bitsandbytes' own ``dequantize_4bit`` /
``int8_vectorwise_dequant`` (the decode must be bit-compatible) or torch's own float8
conversion, odd shapes, per-sample / shared / no gate, fp32, fp16 and bf16 storage, through
the Triton interpreter; the layer takes the kernel on the Triton path; compiled for sm_80 and
sm_90 without spills and with tensor-core MMAs."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
pytest.importorskip("triton")

from apo_fast.models.quantize import quantize_linears  # noqa: E402
from apo_fast.ops.gated_lora import packed as nf4_op  # noqa: E402

F64 = torch.float64
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# relative to the largest value: fp32 accumulation over K <= 128 terms; fp16 / bf16 storage
# rounds the inputs and outputs (unit roundoff 2^-11 / 2^-8, a few of them per result)
TOL = {torch.float32: 2e-6, torch.float16: 5e-3, torch.bfloat16: 4e-2}
KINDS = {"nf4": ("nf4", False, 0), "nf4_double": ("nf4", True, 2), "int8": ("int8", False, 1), "fp8": ("fp8", False, 3)}


def _nf4_linear(fin, fout, double=False, seed=0, kind="nf4"):
    torch.manual_seed(seed)
    holder = nn.Module()
    holder.lin = nn.Linear(fin, fout)
    quantize_linears(holder, kind, double_quant=double)
    return holder.lin


def _bnb_weight(base) -> torch.Tensor:
    """The weight as its format's owner decodes it: bitsandbytes (NF4, also nested; int8) or
    torch's float8_e4m3fn conversion (fp8), never the kernel's own decode."""
    w = base.weight
    if getattr(base, "weight_format", None) == "fp8_e4m3":
        return w.data.view(torch.float8_e4m3fn).to(F64) * base.scale.to(F64)[:, None]
    if w.dtype == torch.uint8:
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).to(F64)
    return bnb.functional.int8_vectorwise_dequant(w.data, w.SCB).to(F64)


def _rel(a, b):
    return float((a.detach().to(F64) - b).abs().max() / b.abs().max().clamp_min(1e-30))


_SHAPES = [((3, 7, 40), 3), ((2, 5, 64), 1), ((11, 56), None), ((4, 3, 24), 4), ((2, 3, 128), 2)]
# bf16 storage on one shape: the rounding bound is the dtype's, not the shape's
_CASES = [(d, *sg) for d in (torch.float32, torch.float16) for sg in _SHAPES] + [(torch.bfloat16, *_SHAPES[-1])]


@pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 (set by conftest)")
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("dtype, shape, gate_rows", _CASES)
def test_forward_and_gradients_match_float64(kind, dtype, shape, gate_rows):
    fin = shape[-1]
    # whole 64-element blocks, and sizes bitsandbytes' own CPU decode gets right (see below);
    # 128 x 160 has 320 blocks: two second-level absmax blocks of 256 for double quantization
    fmt_kind, double, fmt = KINDS[kind]
    base = _nf4_linear(fin, {40: 24, 64: 64, 56: 8, 24: 16, 128: 160}[fin], double=double, seed=fin, kind=fmt_kind)
    assert nf4_op.fused_packed_format(base) == fmt
    w = _bnb_weight(base)  # bitsandbytes' own decode
    g = torch.Generator().manual_seed(sum(shape))
    r = 5
    x = torch.randn(shape, generator=g).to(dtype).requires_grad_(True)
    a = (0.3 * torch.randn(r, fin, generator=g)).to(dtype).requires_grad_(True)
    b = (0.3 * torch.randn(base.out_features, r, generator=g)).to(dtype).requires_grad_(True)
    gate = torch.rand(gate_rows, r, generator=g).requires_grad_(True) if gate_rows else None
    y = nf4_op.gated_lora_packed_linear(x, base, a, b, gate, 0.75)
    x64, a64, b64 = (t.detach().to(F64).requires_grad_(True) for t in (x, a, b))
    g64 = gate.detach().to(F64).requires_grad_(True) if gate is not None else None
    h = x64 @ a64.t()
    if g64 is not None:
        rows = g64 if g64.shape[0] == 1 else g64.repeat_interleave(h.reshape(-1, r).shape[0] // g64.shape[0], 0)
        h = (h.reshape(-1, r) * rows).reshape(h.shape)
    y64 = x64 @ w.t() + base.bias.to(F64) + 0.75 * h @ b64.t()
    dy = torch.randn(y64.shape, generator=g, dtype=F64)
    y.backward(dy.to(dtype))
    y64.backward(dy)
    assert y.dtype == dtype and y.shape == y64.shape
    for got, want in [(y, y64), (x.grad, x64.grad), (a.grad, a64.grad), (b.grad, b64.grad)] + (
            [(gate.grad, g64.grad)] if gate is not None else []):
        assert _rel(got, want) < TOL[dtype]


class _ToQ(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q = nn.Linear(64, 32)

    def forward(self, sample, timestep):
        return self.to_q(sample)


def _adapted_packed_net(kind: str) -> nn.Module:
    """A one-projection net with its linear in ``kind`` (a KINDS key) and a rank-4 gated adapter on it."""
    from apo_fast.adapters import AdapterConfig, GateConfig, inject_adapters

    torch.manual_seed(0)
    net = _ToQ()
    quantize_linears(net, KINDS[kind][0], double_quant=KINDS[kind][1])
    inject_adapters(net, AdapterConfig(r=4, target_modules=("to_q",),
                                       gate=GateConfig(kind="rank_prefix", num_train_timesteps=1000)))
    return net


def _flat_block_decode(base) -> torch.Tensor:
    """NF4 as the format defines it: flat row-major blocks of 64, high nibble first."""
    st = base.weight.quant_state
    packed = base.weight.data.view(-1).long()
    e = torch.arange(st.shape[0] * st.shape[1])
    nibble = torch.where(e % 2 == 0, packed[e // 2] >> 4, packed[e // 2] & 15)
    return (st.code[nibble] * st.absmax[e // 64]).reshape(tuple(st.shape))


@pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 (set by conftest)")
def test_the_kernel_decodes_the_format_where_bitsandbytes_cpu_decode_does_not():
    """bitsandbytes 0.50.2's CPU dequantize_4bit (and so its CPU Linear4bit forward) misdecodes
    weights whose in_features is a multiple of 16 but not of 64 (measured for 32 and 48: every
    block read with the first absmax, 5x NF4's error); the kernel follows the format, and its
    weight reconstructs the original as NF4 allows."""
    torch.manual_seed(3)
    holder = nn.Module()
    holder.lin = nn.Linear(32, 16, bias=False)
    original = holder.lin.weight.detach().clone()
    quantize_linears(holder, "nf4")
    base = holder.lin
    eye = torch.eye(32)
    w_kernel = nf4_op.gated_lora_packed_linear(eye, base, torch.zeros(2, 32), torch.zeros(16, 2), None, 1.0).t()
    torch.testing.assert_close(w_kernel, _flat_block_decode(base), rtol=0, atol=1e-7)
    absmax = base.weight.quant_state.absmax.repeat_interleave(64).reshape(16, 32)
    assert ((w_kernel - original).abs() <= 0.2 * absmax).all()  # within NF4's widest half code gap


@pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 (set by conftest)")
def test_a_wrong_nibble_order_would_fail():
    """The check can fail: decoding the low nibble first gives a different weight."""
    base = _nf4_linear(64, 8)
    w = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state)
    packed = base.weight.data.view(-1)
    code, absmax = base.weight.quant_state.code, base.weight.quant_state.absmax
    swapped = torch.stack([packed & 15, packed >> 4], 1).reshape(-1).long()
    wrong = (code[swapped] * absmax.repeat_interleave(64)).reshape(w.shape)
    assert not torch.allclose(wrong, w)
    x = torch.randn(4, 64)
    y = nf4_op.gated_lora_packed_linear(x, base, torch.zeros(2, 64), torch.zeros(8, 2), None, 1.0)
    torch.testing.assert_close(y, x @ w.t() + base.bias, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 (set by conftest)")
def test_the_layer_takes_the_kernel_on_the_triton_path_for_every_format(monkeypatch):
    calls = []
    real = nf4_op._matmul_impl
    monkeypatch.setattr(nf4_op, "_matmul_impl", lambda *a, **k: calls.append((a[7], a[8])) or real(*a, **k))
    monkeypatch.setenv("APO_FAST_BACKEND", "triton")  # CPU tensors take the Triton path (interpreter)
    for kind, (_, _, fmt) in KINDS.items():
        calls.clear()
        net = _adapted_packed_net(kind)
        x = torch.randn(2, 3, 64, requires_grad=True)
        net(x, torch.tensor([3, 700])).sum().backward()
        assert calls == [(fmt, False), (fmt, True)], kind  # forward (TRANS=0) then dx (TRANS=1)


@pytest.mark.parametrize("fmt", [0, 2, 1, 3], ids=["nf4", "nf4_double", "int8", "fp8"])
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("trans", [False, True])
def test_compiles_without_spills_and_uses_tensor_cores(arch, trans, fmt):
    from apo_fast.kernels import gated_lora_packed as k

    from apo_fast.aot import compile as aot

    cfg = k.packed_configs(interpret=False)[0]
    p = "*fp16:16"
    sig = {"a_ptr": p, "qw_ptr": "*i8:16" if fmt == 1 else "*u8:16", "absmax_ptr": "*u8:16" if fmt == 2 else "*fp32:16",
           "code_ptr": "*fp32:16", "absmax2_ptr": "*fp32:16", "bias_ptr": p,
           "add_ptr": p, "out_ptr": p, "M": "i32", "P": "i32:16", "Q": "i32:16", "K_w": "i32:16",
           "stride_am": "i32:16", "stride_addm": "i32:16", "stride_om": "i32:16"}
    constexprs = {"FORMAT": fmt, "TRANS": trans, "HAS_BIAS": not trans, "HAS_ADD": True, "DOT_PRECISION": "tf32",
                  "DOT_FP32": False, **cfg.kwargs}
    spec = aot.KernelSpec(k.packed_matmul_kernel, sig, constexprs, arch, cfg.num_warps, cfg.num_stages, with_sass=True)
    (report,) = aot.compile_kernels([spec])
    assert not report.has_spills, report.summary()
    assert report.count("HMMA") + (report.count("HGMMA") if arch == 90 else 0) > 0, report.key_counts()


@pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 (set by conftest)")
@pytest.mark.parametrize("kind", list(KINDS))
def test_the_reference_pass_runs_the_same_packed_base(kind, monkeypatch):
    """At init (B = 0) the policy and the reference (adapters off) are the same numbers, bit for
    bit: both go through the packed-weight kernel (bitsandbytes' own int8 matmul would also
    quantize the activations, a different base)."""
    from apo_fast.adapters import adapters_disabled

    monkeypatch.setenv("APO_FAST_BACKEND", "triton")  # CPU tensors take the Triton path (interpreter)
    net = _adapted_packed_net(kind)
    x, t = torch.randn(2, 5, 64), torch.tensor([3, 700])
    policy = net(x, t)
    with adapters_disabled(net):
        reference = net(x, t)
    assert torch.equal(policy, reference)
    w = _bnb_weight(net.to_q.base_layer)
    torch.testing.assert_close(reference.to(F64), x.to(F64) @ w.t() + net.to_q.base_layer.bias.to(F64),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 (set by conftest)")
@pytest.mark.parametrize("kind", list(KINDS))
def test_a_packed_layer_compiles_as_one_graph_and_matches_eager(kind, monkeypatch):
    """torch.compile(fullgraph=True) (a graph break would raise) of a gated adapter over every
    packed format: the custom op is traced through its fake, and the compiled forward and dx
    equal eager's."""
    monkeypatch.setenv("APO_FAST_BACKEND", "triton")  # CPU tensors take the Triton path (interpreter)
    net = _adapted_packed_net(kind)
    with torch.no_grad():
        net.to_q.lora_B["default"].weight.normal_()
    x, t = torch.randn(2, 5, 64, requires_grad=True), torch.tensor([3, 700])
    eager = net(x, t)
    (dx_eager,) = torch.autograd.grad(eager.square().sum(), x)
    torch._dynamo.reset()
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")(x, t)
    (dx_compiled,) = torch.autograd.grad(compiled.square().sum(), x)
    # the same kernels in the same order: equal up to fp32 reassociation in the surrounding ops
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx_compiled, dx_eager, rtol=1e-5, atol=1e-5)
