"""Every preference form (sigmoid, hinge, ipo, kto, margin) against a float64 implementation
written from its formula: loss, gradient and metrics, paired and unpaired, masks, per-term
beta_t and weights, KTO labels, odd shapes; through the PyTorch reference and the fused
kernels (Triton interpreter); and mixed input dtypes computed in float32 as the scripts do."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from apo_fast.losses import METRIC_SLOTS, apo_loss

F64 = torch.float64
RTOL = 1e-5  # the target for fp32 against float64


def _inputs(shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g, dtype=F64)
    p = t + 0.6 * torch.randn(shape, generator=g, dtype=F64)
    r = t + 0.6 * torch.randn(shape, generator=g, dtype=F64)
    mask = (torch.rand((shape[0], 1, *shape[2:]), generator=g) > 0.6).to(F64)
    return p.to(dtype), r.to(dtype), t.to(dtype), mask


def _float64_loss(p, r, t, beta, *, kind, paired, mask=None, lambda_mask=1.0, lambda_sft=0.0, labels=None,
                  weights=None, lam_d=1.0, lam_u=1.0):
    """The forms written out from their papers / scripts, in float64 (independent of the library)."""
    p, r, t = p.double(), r.double(), t.double()
    w = 1.0 if mask is None else 1.0 + (lambda_mask - 1.0) * mask.double()
    dims = tuple(range(1, p.dim()))
    e = (w * (p - t) ** 2).mean(dim=dims)
    er = (w * (r - t) ** 2).mean(dim=dims)
    n = p.shape[0] // 2 if paired else p.shape[0]
    beta = torch.as_tensor(beta, dtype=F64).expand(n) if not torch.is_tensor(beta) or beta.dim() == 0 \
        else beta.double()[:n]
    delta = e - er
    if paired:
        d = (e[:n] - e[n:]) if kind == "margin" else (delta[:n] - delta[n:])
        positives = e[:n]
    else:
        d = delta
        positives = e
    if kind == "sigmoid" or kind == "margin":
        terms = -F.logsigmoid(-beta * d)
        wins = (d < 0).double() + 0.5 * (d == 0).double()
    elif kind == "hinge":
        terms = torch.relu(1 + beta * d)
        wins = (d < 0).double() + 0.5 * (d == 0).double()
    elif kind == "ipo":
        terms = (-d - 1 / (2 * beta)) ** 2  # (logits - 1/(2 tau))^2 with logits = -d
        wins = (d < 0).double() + 0.5 * (d == 0).double()
    else:  # kto
        y = torch.ones(n, dtype=F64) if labels is None else labels.double()
        g = -delta
        kl = g.detach().mean().clamp(min=0)
        u = (2 * y - 1) * beta * (g - kl)
        terms = torch.where(y == 1, torch.full_like(y, lam_d), torch.full_like(y, lam_u)) * (1 - torch.sigmoid(u))
        wins = (u > 0).double()
    if weights is not None:
        terms = terms * weights.double()
    loss = terms.mean() + lambda_sft * positives.mean()
    return loss, {"implicit_acc": wins.mean(), "e_theta": e.mean(), "e_ref": er.mean(), "beta_t": beta.mean()}


CASES = [
    # kind, paired, shape, extras
    ("sigmoid", False, (5, 3, 7, 9), {}),
    ("sigmoid", True, (6, 4, 5, 3), {"lambda_sft": 0.3}),
    ("hinge", False, (4, 2, 9, 5), {}),
    ("hinge", True, (6, 3, 6, 7), {"per_term_beta": True}),
    ("ipo", False, (3, 4, 5, 5), {"per_term_beta": True}),
    ("ipo", True, (4, 2, 3, 11), {}),
    ("kto", False, (6, 3, 5, 7), {"labels": [1, 0, 1, 1, 0, 1], "lam_d": 1.5, "lam_u": 0.7}),
    ("kto", False, (5, 2, 4, 4), {}),
    ("margin", True, (4, 3, 7, 5), {"lambda_sft": 1.0}),
]


def _case_kwargs(kind, paired, shape, extras, masked, weighted, seed):
    n = shape[0] // 2 if paired else shape[0]
    g = torch.Generator().manual_seed(seed + 99)
    beta = (torch.rand(n, generator=g, dtype=F64) * 3 + 0.5) if extras.get("per_term_beta") else 2.0
    labels = torch.tensor(extras["labels"]) if "labels" in extras else None
    weights = (torch.rand(n, generator=g, dtype=F64) + 0.25) if weighted else None
    return dict(beta=beta, labels=labels, weights=weights, lambda_sft=extras.get("lambda_sft", 0.0),
                lam_d=extras.get("lam_d", 1.0), lam_u=extras.get("lam_u", 1.0), lambda_mask=3.0 if masked else 1.0)


def _library_loss(p, r, t, mask, kind, paired, kw, backend):
    beta = kw["beta"].float() if torch.is_tensor(kw["beta"]) else kw["beta"]
    return apo_loss(p, r, t, beta, mask=None if mask is None else mask.float(), lambda_mask=kw["lambda_mask"],
                    paired=paired, lambda_sft=kw["lambda_sft"], loss_type=kind, labels=kw["labels"],
                    weights=None if kw["weights"] is None else kw["weights"].float(),
                    lambda_desirable=kw["lam_d"], lambda_undesirable=kw["lam_u"], backend=backend)


def _check(kind, paired, shape, extras, masked, weighted, backend, seed):
    p, r, t, mask = _inputs(shape, seed)
    mask = mask if masked else None
    kw = _case_kwargs(kind, paired, shape, extras, masked, weighted, seed)
    p64 = p.double().requires_grad_(True)
    want, want_metrics = _float64_loss(p64, r, t, kw["beta"], kind=kind, paired=paired, mask=mask,
                                       lambda_mask=kw["lambda_mask"], lambda_sft=kw["lambda_sft"],
                                       labels=kw["labels"], weights=kw["weights"], lam_d=kw["lam_d"], lam_u=kw["lam_u"])
    want.backward()
    p32 = p.clone().requires_grad_(True)
    out = _library_loss(p32, r, t, mask, kind, paired, kw, backend)
    out.loss.backward()
    torch.testing.assert_close(out.loss.double(), want.detach(), rtol=RTOL, atol=RTOL * 1e-3)
    scale = p64.grad.abs().max()
    torch.testing.assert_close(p32.grad.double(), p64.grad, rtol=RTOL, atol=RTOL * float(scale))
    values = out.metric_values.double()
    for name, value in want_metrics.items():
        torch.testing.assert_close(values[METRIC_SLOTS[name]], value.detach(), rtol=RTOL, atol=RTOL * 1e-3)


@pytest.mark.parametrize("kind, paired, shape, extras", CASES, ids=[f"{c[0]}-{'paired' if c[1] else 'unpaired'}-{i}"
                                                                   for i, c in enumerate(CASES)])
@pytest.mark.parametrize("masked, weighted", [(False, False), (True, True)], ids=["plain", "mask+weights"])
def test_reference_path_matches_float64(kind, paired, shape, extras, masked, weighted):
    _check(kind, paired, shape, extras, masked, weighted, "torch", seed=sum(shape))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("kind, paired, shape, extras", CASES, ids=[f"{c[0]}-{'paired' if c[1] else 'unpaired'}-{i}"
                                                                   for i, c in enumerate(CASES)])
@pytest.mark.parametrize("masked, weighted", [(False, False), (True, True)], ids=["plain", "mask+weights"])
def test_fused_kernels_match_float64(kind, paired, shape, extras, masked, weighted):
    pytest.importorskip("triton")
    _check(kind, paired, shape, extras, masked, weighted, "triton", seed=sum(shape) + 1)


def test_a_wrong_formula_would_be_caught():
    """The float64 oracle separates the forms: hinge and ipo differ from sigmoid on these inputs."""
    p, r, t, _ = _inputs((4, 2, 5, 5), seed=3)
    losses = {k: float(_float64_loss(p, r, t, 2.0, kind=k, paired=False)[0]) for k in ("sigmoid", "hinge", "ipo")}
    assert len({round(v, 6) for v in losses.values()}) == 3


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), reason="needs TRITON_INTERPRET=1 (set by conftest)"))])
@pytest.mark.parametrize("pred_dtype, other_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                                     (torch.float16, torch.float32), (torch.float32, torch.float16)])
def test_mixed_dtypes_give_the_float32_result(pred_dtype, other_dtype, backend):
    """accelerate's fp32 prediction beside a bf16 target (and the reverse): the loss is the
    float32 loss of the same values, as the scripts' `.float()` makes it."""
    p, r, t, mask = _inputs((4, 3, 6, 5), seed=11)
    p, r, t = p.to(pred_dtype), r.to(other_dtype), t.to(other_dtype)
    pa = p.clone().requires_grad_(True)
    out = apo_loss(pa, r, t, 3.0, mask=mask.float(), lambda_mask=2.0, backend=backend)
    out.loss.backward()
    pb = p.float().clone().requires_grad_(True)
    want = apo_loss(pb, r.float(), t.float(), 3.0, mask=mask.float(), lambda_mask=2.0, backend="torch")
    want.loss.backward()
    torch.testing.assert_close(out.loss, want.loss, rtol=RTOL, atol=1e-7)
    assert pa.grad.dtype == pred_dtype
    tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}[pred_dtype]
    torch.testing.assert_close(pa.grad.float(), pb.grad, rtol=tol, atol=tol * float(pb.grad.abs().max()))
