"""The fused Triton APO loss (run by the Triton interpreter on the CPU) against the
float64 PyTorch reference: loss, e_theta/e_ref, metrics and the gradient, over
dtypes, memory layouts, masks, paired/unpaired, beta forms, SFT and odd shapes.
Every buffer the kernels write is NaN-poisoned before the call."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

pytest.importorskip("triton")

from apo_fast.losses import METRIC_SLOTS, apo_loss, metric_names_for  # noqa: E402
from apo_fast.ops.apo_loss import fused as ops  # noqa: E402
from apo_fast.ops.apo_loss.naive import apo_loss_reference, beta_per_term  # noqa: E402
from apo_fast.ops.backend import interpreter_enabled  # noqa: E402

pytestmark = pytest.mark.skipif(not interpreter_enabled(), reason="needs TRITON_INTERPRET=1 (set by conftest)")

F64 = torch.float64
GRAD_RTOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@contextlib.contextmanager
def nan_poisoned_allocations():
    """torch.empty / torch.empty_like hand out NaN-filled memory while active."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(x):
        if x.is_floating_point():
            x.fill_(math.nan)
        return x

    torch.empty = lambda *a, **k: poison(real_empty(*a, **k))
    torch.empty_like = lambda *a, **k: poison(real_empty_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like


def _make(shape, dtype, layout="nchw", spread=0.4):
    p = torch.randn(shape)
    r = p + spread * torch.randn(shape)
    t = torch.randn(shape)
    out = []
    for x in (p, r, t):
        x = x.to(dtype)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
        out.append(x)
    return out


def _mask(kind, shape, dtype=torch.float32):
    if kind is None:
        return None
    mshape = (shape[0], 1, *shape[2:]) if kind == "broadcast" else shape
    m = torch.rand(mshape)
    m = torch.where(m > 0.6, m, torch.zeros_like(m))
    return m.to(dtype)


def _reference(p, r, t, beta_t, mask, lambda_mask, paired, lambda_sft):
    p64 = p.detach().to(F64).requires_grad_()
    beta = beta_per_term(beta_t.to(F64) if isinstance(beta_t, torch.Tensor) else beta_t, p.shape[0], paired, p.device)
    m64 = None if mask is None else mask.to(F64)
    loss, e_th, e_rf, values = apo_loss_reference(p64, r.to(F64), t.to(F64), beta, m64, lambda_mask, paired, lambda_sft)
    loss.backward()
    return loss.detach(), e_th, e_rf, values, p64.grad


def check_fused(p, r, t, beta_t, *, mask=None, lambda_mask=1.0, paired=False, lambda_sft=0.0, grad_in_forward=True):
    """Run the fused op on NaN-poisoned buffers and compare everything with float64."""
    pf = p.detach().clone().requires_grad_()
    with nan_poisoned_allocations():
        loss, e_th, e_rf, values = ops.fused_apo_loss(
            pf,
            r,
            t,
            beta_t,
            mask=mask,
            lambda_mask=lambda_mask,
            paired=paired,
            lambda_sft=lambda_sft,
            grad_in_forward=grad_in_forward,
        )
        loss.backward()
    want_loss, want_th, want_rf, want_values, want_grad = _reference(
        p, r, t, beta_t, mask, lambda_mask, paired, lambda_sft
    )
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert e_th.dtype == torch.float32 and e_th.shape == (p.shape[0],)
    assert not e_th.requires_grad and not values.requires_grad
    torch.testing.assert_close(e_th.double(), want_th, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(e_rf.double(), want_rf, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-6)
    for name in metric_names_for(paired, lambda_sft > 0):
        slot = METRIC_SLOTS[name]
        torch.testing.assert_close(values[slot].double(), want_values[slot], rtol=1e-5, atol=1e-6, msg=name)
    grad = pf.grad
    assert grad is not None and grad.dtype == p.dtype and grad.shape == p.shape
    assert not torch.isnan(grad).any()
    scale = float(want_grad.abs().max()) or 1.0
    torch.testing.assert_close(grad.double(), want_grad, rtol=0, atol=GRAD_RTOL[p.dtype] * scale)
    return loss, e_th, e_rf, values, grad


@pytest.mark.parametrize("paired", [False, True], ids=["unpaired", "paired"])
@pytest.mark.parametrize("mask_kind", [None, "broadcast", "full"], ids=["nomask", "bmask", "fullmask"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_fused_matches_reference(dtype, layout, mask_kind, paired):
    shape = (4, 3, 6, 10)
    p, r, t = _make(shape, dtype, layout)
    beta = torch.rand(shape[0]) + 0.5
    check_fused(p, r, t, beta, mask=_mask(mask_kind, shape), lambda_mask=3.0, paired=paired, lambda_sft=0.2 * paired)


@pytest.mark.parametrize(
    "shape, layout, mask_kind, paired",
    [
        ((2, 4, 32, 32), "channels_last", "broadcast", True),  # SD-latent-like, several chunks per sample
        ((2, 4, 32, 32), "nchw", "broadcast", False),
        ((3, 3, 7, 5), "nchw", "full", False),
        ((1, 1, 1, 1), "nchw", None, False),
        ((2, 1, 1, 1), "nchw", "broadcast", True),
        ((5, 1, 3, 3), "channels_last", "broadcast", False),  # C == 1: the mask is full-shaped
        ((2, 7, 1, 1), "channels_last", "broadcast", True),
        ((3, 5, 17), "nchw", "broadcast", False),  # (B, C, L)
        ((2, 3, 4, 5, 6), "channels_last", "broadcast", True),  # channels_last_3d
        ((6, 2, 9), "nchw", None, True),
        ((5, 7), "nchw", "broadcast", False),  # (B, C)
    ],
)
def test_odd_and_realistic_shapes(shape, layout, mask_kind, paired):
    p, r, t = _make(shape, torch.bfloat16, layout)
    check_fused(p, r, t, 2.0, mask=_mask(mask_kind, shape), lambda_mask=5.0, paired=paired)


def test_realistic_shape_spans_several_chunks_and_blocks():
    p, r, t = _make((2, 4, 32, 32), torch.float16)
    *_, plan = ops.prepare_inputs(p, r, t, _mask("broadcast", (2, 4, 32, 32)))
    assert plan.n_chunks > 1 and plan.chunk > ops.K.STREAM_CONFIGS[0].kwargs["BLOCK"]
    assert plan.repeats == 4 and plan.positions == 32 * 32


@pytest.mark.parametrize("mask_kind", [None, "broadcast"])
def test_chunks_not_a_multiple_of_the_block(monkeypatch, mask_kind):
    """On a GPU a tuned BLOCK may exceed or not divide the chunk; the kernels
    must stop at the chunk's end (forced here with a 48-element alignment)."""
    monkeypatch.setattr(ops.K, "CHUNK_ALIGN", 48)
    shape = (2, 3, 10, 13)
    p, r, t = _make(shape, torch.float32, "channels_last")
    *_, plan = ops.prepare_inputs(p, r, t, None)
    assert plan.chunk % ops.K.STREAM_CONFIGS[0].kwargs["BLOCK"] != 0 and plan.n_chunks > 1
    check_fused(p, r, t, 1.0, mask=_mask(mask_kind, shape), lambda_mask=2.0, paired=True)


def test_gpu_configs_longer_than_the_chunk_are_pruned():
    prune = ops.K._prune_blocks_longer_than_chunk
    kept = prune(ops.K.GPU_STREAM_CONFIGS, {"chunk": 1024})
    assert kept and all(c.kwargs["BLOCK"] <= 1024 for c in kept)
    assert len(prune(ops.K.GPU_STREAM_CONFIGS, {"chunk": 4096})) == len(ops.K.GPU_STREAM_CONFIGS)
    assert prune(ops.K.GPU_STREAM_CONFIGS, {"chunk": 16}) == ops.K.GPU_STREAM_CONFIGS[:1]
    assert ops.K.GPU_CHUNK_ALIGN >= min(c.kwargs["BLOCK"] for c in ops.K.GPU_STREAM_CONFIGS)


@pytest.mark.parametrize(
    "beta, paired",
    [
        (0.7, False),
        (torch.tensor(1.5), False),
        ("per_sample", False),
        (3.0, True),
        ("per_pair", True),
        ("per_sample", True),
        (torch.tensor(0.25), True),
    ],
)
def test_beta_forms(beta, paired):
    shape = (6, 2, 5, 5)
    p, r, t = _make(shape, torch.float32)
    if beta == "per_sample":
        beta = torch.rand(6) * 4 + 0.1
    elif beta == "per_pair":
        beta = torch.rand(3) * 4 + 0.1
    check_fused(p, r, t, beta, paired=paired, lambda_sft=0.5)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.float64, torch.float16])
def test_mask_dtypes(mask_dtype):
    shape = (2, 3, 5, 6)
    p, r, t = _make(shape, torch.float32)
    mask = (torch.rand(2, 1, 5, 6) > 0.5).to(mask_dtype)
    check_fused(p, r, t, 1.0, mask=mask, lambda_mask=10.0)


def test_mixed_and_strided_layouts_are_copied():
    shape = (2, 3, 4, 5)
    p, r, t = _make(shape, torch.float32)
    p_cl = p.contiguous(memory_format=torch.channels_last)
    t_strided = torch.randn(2, 3, 5, 4).transpose(2, 3)
    check_fused(p_cl, r, t_strided, 1.0, mask=_mask("full", shape), lambda_mask=2.0)
    check_fused(p, r.contiguous(memory_format=torch.channels_last), t, 1.0, mask=_mask("broadcast", shape))


@pytest.mark.parametrize("paired", [False, True])
def test_finalize_loops_over_term_blocks(monkeypatch, paired):
    monkeypatch.setattr(ops, "FINALIZE_TILE", 8)
    shape = (10, 2, 8, 16)
    p, r, t = _make(shape, torch.float32)
    *_, plan = ops.prepare_inputs(p, r, t, None)
    n_terms = 5 if paired else 10
    assert ops.finalize_blocks(n_terms, plan.n_chunks)[1] < n_terms
    check_fused(
        p, r, t, torch.rand(10) + 0.5, mask=_mask("full", shape), lambda_mask=2.0, paired=paired, lambda_sft=0.1
    )


def test_fp16_gradient_under_loss_scaling():
    """fp16 training scales the loss (here 2**16): the default folds the scale in
    before storing the fp16 gradient; storing it first (grad_in_forward=True)
    leaves ~1e-5 gradients as fp16 subnormals and loses precision."""
    shape = (2, 4, 16, 16)
    p, r, t = _make(shape, torch.float16)
    scale = 2.0**16
    *_, want = _reference(p, r, t, 0.002, None, 1.0, False, 0.0)
    want = want * scale
    errors = {}
    for mode in (None, True):
        pp = p.clone().requires_grad_()
        loss, *_ = ops.fused_apo_loss(pp, r, t, 0.002, grad_in_forward=mode)
        (loss * scale).backward()
        errors[mode] = float((pp.grad.double() - want).abs().max() / want.abs().max())
    assert errors[None] < GRAD_RTOL[torch.float16]
    assert errors[True] > 5 * errors[None], errors


def test_grad_in_backward_mode_matches():
    shape = (4, 3, 6, 5)
    p, r, t = _make(shape, torch.bfloat16, "channels_last")
    check_fused(p, r, t, 2.0, mask=_mask("broadcast", shape), lambda_mask=2.0, paired=True, grad_in_forward=False)


@pytest.mark.parametrize("grad_in_forward", [True, False])
def test_incoming_gradient_scales(grad_in_forward):
    p, r, t = _make((2, 2, 4, 4), torch.float32)
    grads = []
    for factor in (1.0, -3.0):
        pp = p.clone().requires_grad_()
        loss, *_ = ops.fused_apo_loss(pp, r, t, 1.0, grad_in_forward=grad_in_forward)
        (loss * factor).backward()
        grads.append(pp.grad)
    torch.testing.assert_close(grads[1], -3.0 * grads[0])


@pytest.mark.parametrize("grad_in_forward", [True, False])
def test_retained_graph_second_backward_accumulates_the_same_gradient(grad_in_forward):
    """The stored gradient is rescaled out of place: a second backward through a retained
    graph adds the same gradient again (not a gradient rescaled twice)."""
    p, r, t = _make((2, 2, 4, 4), torch.float32)
    pp = p.clone().requires_grad_()
    loss, *_ = ops.fused_apo_loss(pp, r, t, 1.0, grad_in_forward=grad_in_forward)
    (loss * 3.0).backward(retain_graph=True)
    first = pp.grad.clone()
    (loss * 3.0).backward()
    torch.testing.assert_close(pp.grad, 2 * first, rtol=1e-6, atol=0)
    assert first.abs().max() > 0


def test_no_gradient_pass_without_grad(monkeypatch):
    calls = []
    real = ops.launch_grad
    monkeypatch.setattr(ops, "launch_grad", lambda *a, **k: calls.append(1) or real(*a, **k))
    p, r, t = _make((2, 2, 4, 4), torch.float32)
    ops.fused_apo_loss(p, r, t, 1.0)
    with torch.no_grad():
        ops.fused_apo_loss(p.clone().requires_grad_(), r, t, 1.0)
    assert calls == []
    ops.fused_apo_loss(p.clone().requires_grad_(), r, t, 1.0)
    assert calls == [1]


def test_no_gradient_to_reference_or_target():
    p, r, t = _make((2, 2, 4, 4), torch.float32)
    pp, rr, tt = (x.clone().requires_grad_() for x in (p, r, t))
    out = apo_loss(pp, rr, tt, 1.0, paired=True, backend="triton")
    out.loss.backward()
    assert pp.grad is not None and rr.grad is None and tt.grad is None


def test_deterministic():
    p, r, t = _make((3, 4, 8, 8), torch.float16)
    m = _mask("broadcast", (3, 4, 8, 8))
    first = ops.fused_apo_loss(p, r, t, 1.0, mask=m, lambda_mask=2.0)
    second = ops.fused_apo_loss(p, r, t, 1.0, mask=m, lambda_mask=2.0)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_ties_count_half():
    p, _, t = _make((4, 2, 4, 4), torch.bfloat16)
    for paired in (False, True):
        _, _, _, values = ops.fused_apo_loss(p, p.clone(), t, 3.0, paired=paired)
        assert float(values[METRIC_SLOTS["implicit_acc"]]) == 0.5
        assert float(values[METRIC_SLOTS["loss"]]) == pytest.approx(math.log(2), rel=1e-6)


def test_nan_input_propagates():
    p, r, t = _make((3, 2, 4, 4), torch.float32)
    p[1, 0, 2, 3] = math.nan
    loss, e_th, e_rf, _ = ops.fused_apo_loss(p, r, t, 1.0)
    assert math.isnan(float(loss)) and math.isnan(float(e_th[1]))
    assert not torch.isnan(e_th[[0, 2]]).any() and not torch.isnan(e_rf).any()


def test_fused_rejects_bad_inputs():
    p, r, t = _make((2, 2, 3, 3), torch.float32)
    with pytest.raises(TypeError, match="model_pred"):
        ops.fused_apo_loss(p.double(), r.double(), t.double(), 1.0)
    with pytest.raises(TypeError, match="Triton backend"):
        apo_loss(p.double(), r.double(), t.double(), 1.0, backend="triton")
    with pytest.raises(ValueError, match="beta_t"):
        ops.fused_apo_loss(p, r, t, torch.ones(3))
    with pytest.raises(ValueError, match="mask"):
        ops.fused_apo_loss(p, r, t, 1.0, mask=torch.ones(2, 2, 3))
    huge = torch.empty((1, 2**31), device="meta")
    with pytest.raises(ValueError, match="elements per sample"):
        ops.fused_apo_loss(huge, huge, huge, 1.0)


def test_dispatch_backend_argument_and_environment(monkeypatch):
    calls = []
    real = ops.apply_fused_apo_loss
    monkeypatch.setattr(ops, "apply_fused_apo_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    p, r, t = _make((2, 2, 3, 3), torch.float32)
    monkeypatch.setenv("APO_FAST_BACKEND", "auto")
    apo_loss(p, r, t, 1.0)  # CPU tensors: auto means the reference
    assert calls == []
    fused = apo_loss(p, r, t, 1.0, backend="triton")
    assert calls == [1]
    monkeypatch.setenv("APO_FAST_BACKEND", "triton")
    apo_loss(p, r, t, 1.0)
    assert calls == [1, 1]
    reference = apo_loss(p, r, t, 1.0, backend="torch")  # the argument beats the environment
    assert calls == [1, 1]
    assert fused.metrics.keys() == reference.metrics.keys()
    for key, value in reference.metrics.items():
        assert fused.metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6)
    monkeypatch.setenv("APO_FAST_BACKEND", "fast")
    with pytest.raises(ValueError, match="APO_FAST_BACKEND"):
        apo_loss(p, r, t, 1.0)
