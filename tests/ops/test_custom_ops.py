"""The fused ops as torch.library custom ops (``apo_fast::``): ``torch.library.opcheck`` (schema,
fake implementation, autograd registration, AOT dispatch) on CPU tensors for their PyTorch
reference path and, under ``TRITON_INTERPRET=1``, for the Triton implementations; and both
against float64 autograd of the plain references."""
from __future__ import annotations

import pytest
import torch

import apo_fast.ops.apo_loss.op  # noqa: F401  (registers apo_fast::apo_loss, apo_loss_grad)
import apo_fast.ops.gated_lora.op  # noqa: F401  (registers apo_fast::gated_lora_linear and its backward)
from apo_fast.ops.apo_loss import apo_loss_reference
from apo_fast.ops.apo_loss.naive import PreferenceForm
from apo_fast.ops.backend import interpreter_enabled
from apo_fast.ops.gated_lora import gated_lora_linear_reference

IMPLS = ["reference", "triton"]


@pytest.fixture(params=IMPLS)
def impl(request, monkeypatch):
    """Which implementation the ops run on CPU tensors: the PyTorch reference (the interpreter
    switched off for ``ops.backend.runs_triton``) or the Triton kernels in the interpreter."""
    import apo_fast.ops.backend as backend

    if request.param == "triton":
        if not interpreter_enabled():
            pytest.fail("TRITON_INTERPRET=1 is set by conftest; the Triton implementations need it")
    else:
        monkeypatch.setattr(backend, "interpreter_enabled", lambda: False)
    assert backend.runs_triton(torch.zeros(1)) == (request.param == "triton")
    return request.param


def _lora_args(M=15, K=24, N=20, r=5, groups=3, gate=True, bias=True):
    torch.manual_seed(M * 131 + r)
    x = torch.randn(M, K, requires_grad=True)
    A = (torch.randn(r, K) / K**0.5).requires_grad_()
    B = torch.randn(N, r).requires_grad_()
    g = torch.rand(groups, r, requires_grad=True) if gate else None
    return x, torch.randn(N, K), torch.randn(N) if bias else None, A, B, g


def _fp32_atol(impl, tensors, terms: int) -> dict:
    """opcheck tolerances. Its AOT check compares eager with the traced op, which on CPU tensors
    is the reference: for the Triton implementation that is a second fp32 implementation, equal
    within the rounding of ``terms`` multiply-adds at the values' scale (both sides round)."""
    if impl == "reference":
        return {}
    scale = max(float(t.detach().abs().max()) for t in tensors if t is not None and t.numel())
    eps = torch.finfo(torch.float32).eps  # (opcheck ignores a zero rtol: give it one ulp)
    return {"atol": 2 * terms * eps * scale, "rtol": eps}


@pytest.mark.parametrize("shape", [(15, 24, 20, 5, 3), (7, 19, 23, 1, 1), (32, 48, 33, 16, 4)])
@pytest.mark.parametrize("gate", [True, False])
def test_opcheck_gated_lora_linear(impl, shape, gate):
    M, K, N, r, groups = shape
    x, w, b, A, B, g = _lora_args(M, K, N, r, groups, gate=gate)
    y = gated_lora_linear_reference(x, w, b, A, B, g, 2.0)
    y.sum().backward()  # the gradients' scale, for the tolerance
    tol = _fp32_atol(impl, [y, x.grad, A.grad, B.grad, g.grad if gate else None], M + K + N + r)
    for v in (x, A, B, g):
        if v is not None:
            v.grad = None
    torch.library.opcheck(torch.ops.apo_fast.gated_lora_linear.default, (x, w, b, A, B, g, 0.5, M // groups, True),
                          **tol)
    torch.library.opcheck(torch.ops.apo_fast.gated_lora_linear.default,
                          (x, w, None, A, B, g, 2.0, M // groups, False), **tol)
    h = (x @ A.t()).detach()
    dy = torch.randn(M, N)
    for needs in ((True, True, True, gate), (True, False, False, False), (False, True, True, gate)):
        torch.library.opcheck(torch.ops.apo_fast.gated_lora_linear_backward.default,
                              (dy, x.detach(), w, A.detach(), B.detach(), g.detach() if gate else None, h, 0.5,
                               M // groups, *needs))


def test_gated_lora_op_matches_float64_autograd(impl):
    """The op (reference or Triton kernel) vs float64 autograd of the plain reference."""
    x, w, b, A, B, g = _lora_args(21, 19, 23, 3, 3)
    y, h = torch.ops.apo_fast.gated_lora_linear(x, w, b, A, B, g, 0.7, 7, True)
    torch.manual_seed(1)
    proj = torch.randn_like(y)
    (y * proj).sum().backward()
    got = [y.detach(), x.grad, A.grad, B.grad, g.grad]
    leaves = [v.detach().double().requires_grad_() for v in (x, A, B, g)]
    want_y = gated_lora_linear_reference(leaves[0], w.double(), b.double(), leaves[1], leaves[2], leaves[3], 0.7)
    (want_y * proj.double()).sum().backward()
    want = [want_y.detach()] + [v.grad for v in leaves]
    for name, a, e in zip(["y", "dx", "dA", "dB", "dgate"], got, want):
        err = (a.double() - e).abs().max() / e.abs().max()
        assert err < 1e-5, f"{name}: relative error {err:.2e}"
    torch.testing.assert_close(h, (x @ A.t()).detach(), rtol=1e-5, atol=1e-5)


PACKED_KINDS = ["nf4", "nf4_double", "int8", "fp8"]


def _packed_args(kind: str):
    from apo_fast.models.quantize import quantize_linears
    from apo_fast.ops.gated_lora.packed import _format_tensors, fused_packed_format

    pytest.importorskip("bitsandbytes")
    torch.manual_seed(4)
    holder = torch.nn.Module()
    holder.lin = torch.nn.Linear(64, 24)
    quantize_linears(holder, kind.removesuffix("_double"), double_quant=kind.endswith("_double"))
    layer = holder.lin
    fmt = fused_packed_format(layer)
    assert fmt is not None
    return layer, fmt, _format_tensors(layer, fmt, torch.device("cpu"))


@pytest.mark.parametrize("kind", PACKED_KINDS)
def test_opcheck_packed_matmul(impl, kind):
    layer, fmt, (qweight, scales, code, scales2) = _packed_args(kind)
    a = torch.randn(5, layer.in_features, requires_grad=True)
    add = torch.randn(5, layer.out_features, requires_grad=True)
    bias = layer.bias.detach().clone().requires_grad_()
    args = (a, qweight, scales, code, scales2, bias, add, fmt, False, layer.out_features, layer.in_features)
    torch.library.opcheck(torch.ops.apo_fast.packed_matmul.default, args)
    dy = torch.randn(5, layer.out_features, requires_grad=True)
    torch.library.opcheck(torch.ops.apo_fast.packed_matmul.default,
                          (dy, qweight, scales, code, scales2, None, None, fmt, True, layer.out_features,
                           layer.in_features))


@pytest.mark.parametrize("kind", PACKED_KINDS)
def test_packed_matmul_equals_the_decoded_weight_product(impl, kind):
    from apo_fast.ops.gated_lora.packed import dequantize_packed

    layer, fmt, (qweight, scales, code, scales2) = _packed_args(kind)
    weight = dequantize_packed(qweight, scales, code, scales2, fmt, layer.out_features, layer.in_features).double()
    a = torch.randn(6, layer.in_features, requires_grad=True)
    y = torch.ops.apo_fast.packed_matmul(a, qweight, scales, code, scales2, None, None, fmt, False,
                                         layer.out_features, layer.in_features)
    want = a.detach().double() @ weight.t()
    assert ((y.double() - want).abs().max() / want.abs().max()) < 1e-5
    y.sum().backward()
    want_dx = torch.ones(6, layer.out_features, dtype=torch.float64) @ weight
    assert ((a.grad.double() - want_dx).abs().max() / want_dx.abs().max()) < 1e-5


def _loss_args(shape=(4, 3, 5, 7), paired=False, mask=True, dtype=torch.float32):
    torch.manual_seed(sum(shape))
    p = torch.randn(shape, dtype=dtype, requires_grad=True)
    r, t = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    m = (torch.rand(shape[0], 1, *shape[2:]) > 0.6).to(dtype) if mask else None
    return p, r, t, m


FORMS = [("sigmoid", False), ("sigmoid", True), ("hinge", False), ("ipo", True), ("kto", False), ("margin", True)]


@pytest.mark.parametrize("loss_type,paired", FORMS)
@pytest.mark.parametrize("grad_mode", [1, 2])
def test_opcheck_apo_loss(impl, loss_type, paired, grad_mode):
    p, r, t, m = _loss_args(paired=paired)
    n_terms = p.shape[0] // 2 if paired else p.shape[0]
    beta = torch.linspace(50.0, 150.0, n_terms)
    labels = torch.tensor([1.0, 0.0, 1.0, 1.0]) if loss_type == "kto" else None
    weights = torch.rand(n_terms) + 0.5
    args = (p, r, t, m, beta, 0.0, 2.0, paired, 0.1, loss_type, labels, weights, 1.0, 1.5, grad_mode)
    torch.library.opcheck(torch.ops.apo_fast.apo_loss.default, args)
    torch.library.opcheck(torch.ops.apo_fast.apo_loss.default,
                          (p, r, t, None, None, 80.0, 1.0, paired, 0.0, loss_type, labels, None, 1.0, 1.0, grad_mode))
    coef = torch.randn(p.shape[0])
    torch.library.opcheck(torch.ops.apo_fast.apo_loss_grad.default,
                          (p.detach(), t, m, coef, 2.0, torch.tensor([3.0])))


@pytest.mark.parametrize("loss_type,paired", FORMS)
def test_apo_loss_op_gradient_matches_float64_autograd(impl, loss_type, paired):
    """``coef`` (closed-form slopes on the reference path, the finalize kernel on the Triton path)
    gives the gradient float64 autograd of the plain reference gives."""
    p, r, t, m = _loss_args((6, 2, 4, 5) if paired else (5, 2, 4, 5), paired=paired)
    n_terms = p.shape[0] // 2 if paired else p.shape[0]
    # moderate beta: beta times the fp32 rounding of e_theta stays far below the 1e-5 checked here
    beta = torch.linspace(2.0, 9.0, n_terms)
    labels = (torch.arange(p.shape[0]) % 2 == 0).float() if loss_type == "kto" else None
    weights = torch.rand(n_terms) + 0.5
    for grad_mode in (1, 2):
        p.grad = None
        loss, stats, _ = torch.ops.apo_fast.apo_loss(p, r, t, m, beta, 0.0, 3.0, paired, 0.2, loss_type, labels,
                                                     weights, 1.0, 1.7, grad_mode)
        (loss * 2.5).backward()
        p64 = p.detach().double().requires_grad_()
        form = PreferenceForm(loss_type, labels.double() if labels is not None else None, weights.double(), 1.0, 1.7)
        want, e_theta, e_ref, _ = apo_loss_reference(p64, r.double(), t.double(), beta.double(), m.double(), 3.0,
                                                     paired, 0.2, form)
        (want * 2.5).backward()
        assert abs(float(loss.detach()) - float(want.detach())) <= 1e-5 * max(1.0, abs(float(want.detach())))
        n = p.shape[0]
        torch.testing.assert_close(stats[:n].double(), e_theta, rtol=1e-5, atol=1e-7)
        err = (p.grad.double() - p64.grad).abs().max() / p64.grad.abs().max()
        assert err < 1e-5, f"grad_mode {grad_mode}: relative gradient error {err:.2e}"


def test_op_fake_outputs_have_the_real_strides(impl):
    """channels_last inputs: the gradient comes back channels_last, the fake says so too."""
    p, r, t, _ = _loss_args((2, 3, 4, 4))
    p, r, t = (v.detach().contiguous(memory_format=torch.channels_last) for v in (p, r, t))
    p.requires_grad_()
    _, _, grad = torch.ops.apo_fast.apo_loss(p, r, t, None, None, 50.0, 1.0, False, 0.0, "sigmoid", None, None,
                                             1.0, 1.0, 1)
    assert grad.is_contiguous(memory_format=torch.channels_last) and not grad.is_contiguous()
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fp, fr, ft = (mode.from_tensor(v) for v in (p, r, t))
        _, _, fgrad = torch.ops.apo_fast.apo_loss(fp, fr, ft, None, None, 50.0, 1.0, False, 0.0, "sigmoid", None,
                                                  None, 1.0, 1.0, 1)
    assert fgrad.stride() == grad.stride()
