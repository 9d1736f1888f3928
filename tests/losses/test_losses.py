"""The PyTorch reference of the APO loss against hand formulas in float64,
the beta_t schedules, the two public Diffusion-DPO conventions, and input validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from apo_fast.losses import (
    METRIC_SLOTS,
    APOLossOutput,
    apo_loss,
    beta_schedule,
    diffusion_dpo_loss,
)

F64 = torch.float64


def _inputs(shape, dtype=F64, spread=0.3):
    p = torch.randn(shape, dtype=F64)
    r = p + spread * torch.randn(shape, dtype=F64)
    t = torch.randn(shape, dtype=F64)
    return p.to(dtype), r.to(dtype), t.to(dtype)


def _softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _hand_apo(p, r, t, beta, mask=None, lambda_mask=1.0, paired=False, lambda_sft=0.0):
    """APO_SPEC written out sample by sample in float64 with Python scalars."""
    b = p.shape[0]
    n = p[0].numel()
    w = torch.ones_like(p) if mask is None else 1.0 + (lambda_mask - 1.0) * mask.to(F64).expand_as(p)
    e_th = [float((w[i] * (p[i] - t[i]) ** 2).sum()) / n for i in range(b)]
    e_rf = [float((w[i] * (r[i] - t[i]) ** 2).sum()) / n for i in range(b)]
    d = [e_th[i] - e_rf[i] for i in range(b)]
    terms = b // 2 if paired else b
    betas = [float(beta)] * terms if not isinstance(beta, torch.Tensor) else [float(x) for x in beta[:terms]]
    coef = [0.0] * b
    losses, wins, rw, rl = [], [], [], []
    for j in range(terms):
        if paired:
            z = betas[j] * (d[j] - d[j + terms])
            rw.append(-betas[j] * d[j])
            rl.append(-betas[j] * d[j + terms])
            wins.append(1.0 if rw[-1] > rl[-1] else 0.5 if rw[-1] == rl[-1] else 0.0)
            coef[j] += _sigmoid(z) * betas[j] / terms
            coef[j + terms] -= _sigmoid(z) * betas[j] / terms
        else:
            z = betas[j] * d[j]
            rw.append(-betas[j] * d[j])
            wins.append(1.0 if d[j] < 0 else 0.5 if d[j] == 0 else 0.0)
            coef[j] += _sigmoid(z) * betas[j] / terms
        losses.append(_softplus(z))
    sft = sum(e_th[:terms]) / terms
    for j in range(terms):
        coef[j] += lambda_sft / terms
    loss = sum(losses) / terms + lambda_sft * sft
    grad = torch.stack([coef[i] * 2.0 * w[i] * (p[i] - t[i]) / n for i in range(b)])
    metrics = {
        "loss": loss,
        "e_theta": sum(e_th) / b,
        "e_ref": sum(e_rf) / b,
        "reward_w": sum(rw) / terms,
        "implicit_acc": sum(wins) / terms,
        "beta_t": sum(betas) / terms,
    }
    if paired:
        metrics["reward_l"] = sum(rl) / terms
    if lambda_sft > 0:
        metrics["sft"] = sft
    return loss, torch.tensor(e_th, dtype=F64), torch.tensor(e_rf, dtype=F64), metrics, grad


def _check_against_hand(shape, beta, mask=None, lambda_mask=1.0, paired=False, lambda_sft=0.0):
    p, r, t = _inputs(shape)
    pp = p.clone().requires_grad_()
    out = apo_loss(
        pp, r, t, beta, mask=mask, lambda_mask=lambda_mask, paired=paired, lambda_sft=lambda_sft, backend="torch"
    )
    out.loss.backward()
    loss, e_th, e_rf, metrics, grad = _hand_apo(p, r, t, beta, mask, lambda_mask, paired, lambda_sft)
    assert isinstance(out, APOLossOutput)
    assert out.loss.dim() == 0 and out.loss.dtype == F64
    torch.testing.assert_close(out.loss, torch.tensor(loss, dtype=F64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.e_theta, e_th, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.e_ref, e_rf, rtol=1e-12, atol=1e-12)
    assert set(out.metrics) == set(metrics)
    for key, value in metrics.items():
        assert out.metrics[key] == pytest.approx(value, rel=1e-10, abs=1e-12), key
    torch.testing.assert_close(pp.grad, grad, rtol=1e-10, atol=1e-14)
    assert not out.e_theta.requires_grad and not out.e_ref.requires_grad


@pytest.mark.parametrize("shape", [(4, 3, 5, 7), (1, 1, 1, 1), (3, 2, 6), (2, 2, 3, 4, 5)])
def test_unpaired_matches_hand_formula(shape):
    _check_against_hand(shape, 1.7)
    _check_against_hand(shape, torch.rand(shape[0], dtype=F64) + 0.2)


@pytest.mark.parametrize("mask_kind", ["broadcast", "full"])
@pytest.mark.parametrize("paired", [False, True])
def test_mask_and_sft_match_hand_formula(mask_kind, paired):
    shape = (4, 3, 6, 5)
    mshape = (4, 1, 6, 5) if mask_kind == "broadcast" else shape
    mask = (torch.rand(mshape, dtype=F64) > 0.5).to(F64) * torch.rand(mshape, dtype=F64)
    _check_against_hand(shape, 2.5, mask=mask, lambda_mask=4.0, paired=paired, lambda_sft=0.3)


@pytest.mark.parametrize("beta_shape", ["float", "pairs", "batch", "scalar_tensor"])
def test_paired_beta_shapes(beta_shape):
    shape = (6, 2, 4, 4)
    beta = {
        "float": 3.0,
        "pairs": torch.rand(3, dtype=F64) + 0.5,
        "batch": torch.rand(6, dtype=F64) + 0.5,
        "scalar_tensor": torch.tensor(2.0, dtype=F64),
    }[beta_shape]
    hand_beta = beta if beta_shape != "scalar_tensor" else 2.0
    p, r, t = _inputs(shape)
    out = apo_loss(p, r, t, beta, paired=True, backend="torch")
    loss, *_ = _hand_apo(p, r, t, hand_beta, paired=True)
    assert float(out.loss) == pytest.approx(loss, rel=1e-12)


def test_spec_gradient_formula_unpaired():
    """APO_SPEC: dL/d eps_theta = (1/B) s_i beta_i 2 w (eps_theta - eps) / (C H W)."""
    p, r, t = _inputs((3, 2, 4, 5))
    mask = torch.rand(3, 1, 4, 5, dtype=F64)
    beta = torch.tensor([0.5, 2.0, 7.0], dtype=F64)
    pp = p.clone().requires_grad_()
    out = apo_loss(pp, r, t, beta, mask=mask, lambda_mask=3.0, backend="torch")
    out.loss.backward()
    w = 1 + 2.0 * mask
    delta = out.e_theta - out.e_ref
    s = torch.sigmoid(beta * delta)
    expected = (s * beta)[:, None, None, None] * 2 * w * (p - t) / (3 * 2 * 4 * 5)
    torch.testing.assert_close(pp.grad, expected, rtol=1e-12, atol=1e-15)


def test_no_gradient_to_reference_or_target():
    p, r, t = _inputs((2, 2, 3, 3))
    pp, rr, tt = (x.clone().requires_grad_() for x in (p, r, t))
    apo_loss(pp, rr, tt, 1.0, paired=True, backend="torch").loss.backward()
    assert pp.grad is not None and rr.grad is None and tt.grad is None


def test_implicit_accuracy_ties_and_signs():
    p, _, t = _inputs((4, 2, 3, 3))
    same = apo_loss(p, p.clone(), t, 1.0, backend="torch")
    assert same.metrics["implicit_acc"] == 0.5 and same.metrics["loss"] == pytest.approx(math.log(2))
    paired_same = apo_loss(p, p.clone(), t, 1.0, paired=True, backend="torch")
    assert paired_same.metrics["implicit_acc"] == 0.5
    # policy exact on samples 0, 1 (delta < 0); worse on 2, 3 (delta > 0)
    ref = t + 0.5
    pol = torch.cat([t[:2], t[2:] + 1.0])
    out = apo_loss(pol, ref, t, 1.0, backend="torch")
    assert out.metrics["implicit_acc"] == 0.5
    assert out.metrics["reward_w"] == pytest.approx(float(-(out.e_theta - out.e_ref).mean()))
    out = apo_loss(torch.cat([t[:3], t[3:] + 1.0]), ref, t, 1.0, backend="torch")
    assert out.metrics["implicit_acc"] == 0.75


def test_half_inputs_computed_in_float32():
    p, r, t = _inputs((2, 4, 8, 8), dtype=torch.float16)
    out = apo_loss(p, r, t, 1.0, backend="torch")
    assert out.loss.dtype == torch.float32 and out.e_theta.dtype == torch.float32
    ref = apo_loss(p.double(), r.double(), t.double(), 1.0, backend="torch")
    torch.testing.assert_close(out.e_theta.double(), ref.e_theta, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- beta schedules


def _scaled_linear_alphas_cumprod(steps=1000):
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, steps, dtype=F64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def test_beta_schedule_dlogsnr_matches_finite_difference():
    abar = _scaled_linear_alphas_cumprod()
    a = abar.double()
    lam = [math.log(float(x) / (1 - float(x))) for x in a]
    ts = torch.tensor([0, 1, 500, 998, 999])
    got = beta_schedule(ts, abar, beta=2.0)
    expected = [
        -0.5 * 2.0 * (lam[1] - lam[0]),
        -0.5 * 2.0 * (lam[2] - lam[0]) / 2,
        -0.5 * 2.0 * (lam[501] - lam[499]) / 2,
        -0.5 * 2.0 * (lam[999] - lam[997]) / 2,
        -0.5 * 2.0 * (lam[999] - lam[998]),
    ]
    assert got.dtype == torch.float32 and got.shape == (5,)
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=F64), rtol=1e-6, atol=0)
    everything = beta_schedule(torch.arange(1000), abar)
    assert bool((everything > 0).all())


def test_beta_schedule_constant_and_snr():
    abar = _scaled_linear_alphas_cumprod(50)
    ts = torch.tensor([3, 0, 49])
    assert beta_schedule(ts, abar, kind="constant", beta=7.0).tolist() == [7.0, 7.0, 7.0]
    snr = beta_schedule(ts, abar, kind="snr", beta=3.0)
    a = abar.double()[ts]
    torch.testing.assert_close(snr.double(), 3.0 * (a / (1 - a)) / (1 + a / (1 - a)), rtol=1e-6, atol=0)
    assert bool((snr > 0).all()) and snr[1] > snr[0] > snr[2]


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(kind="cosine"), ValueError),
        (dict(beta=0.0), ValueError),
        (dict(timesteps=torch.tensor([1.0])), TypeError),
        (dict(timesteps=torch.tensor([[1]])), ValueError),
        (dict(timesteps=torch.tensor([0, 50])), ValueError),
        (dict(timesteps=torch.tensor([-1])), ValueError),
        (dict(alphas_cumprod=torch.tensor([0.5, 0.6, 0.4])), ValueError),
        (dict(alphas_cumprod=torch.tensor([1.0, 0.5])), ValueError),
        (dict(alphas_cumprod=torch.tensor([1, 0])), TypeError),
    ],
)
def test_beta_schedule_rejects_bad_inputs(kwargs, error):
    args = dict(timesteps=torch.tensor([0, 3]), alphas_cumprod=_scaled_linear_alphas_cumprod(50))
    args.update(kwargs)
    timesteps, abar = args.pop("timesteps"), args.pop("alphas_cumprod")
    with pytest.raises(error):
        beta_schedule(timesteps, abar, **args)


# --------------------------------------------------------------------------- Diffusion-DPO


def _diffusers_script(model_pred, ref_preds, target, beta_dpo):
    """Transcription of diffusers examples/research_projects/diffusion_dpo/train_diffusion_dpo.py."""
    model_losses = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    model_losses = model_losses.mean(dim=list(range(1, len(model_losses.shape))))
    model_losses_w, model_losses_l = model_losses.chunk(2)
    raw_model_loss = 0.5 * (model_losses_w.mean() + model_losses_l.mean())
    model_diff = model_losses_w - model_losses_l
    ref_loss = F.mse_loss(ref_preds.float(), target.float(), reduction="none")
    ref_loss = ref_loss.mean(dim=list(range(1, len(ref_loss.shape))))
    ref_losses_w, ref_losses_l = ref_loss.chunk(2)
    ref_diff = ref_losses_w - ref_losses_l
    raw_ref_loss = ref_loss.mean()
    logits = ref_diff - model_diff
    loss = -1 * F.logsigmoid(beta_dpo * logits).mean()
    implicit_acc = (logits > 0).sum().float() / logits.size(0)
    implicit_acc += 0.5 * (logits == 0).sum().float() / logits.size(0)
    return loss, raw_model_loss, raw_ref_loss, implicit_acc


def _salesforce_script(model_pred, ref_pred, target, beta_dpo):
    """Transcription of SalesforceAIResearch/DiffusionDPO train.py (train_method == 'dpo')."""
    model_losses = (model_pred - target).pow(2).mean(dim=[1, 2, 3])
    model_losses_w, model_losses_l = model_losses.chunk(2)
    raw_model_loss = 0.5 * (model_losses_w.mean() + model_losses_l.mean())
    model_diff = model_losses_w - model_losses_l
    ref_losses = (ref_pred - target).pow(2).mean(dim=[1, 2, 3])
    ref_losses_w, ref_losses_l = ref_losses.chunk(2)
    ref_diff = ref_losses_w - ref_losses_l
    raw_ref_loss = ref_losses.mean()
    scale_term = -0.5 * beta_dpo
    inside_term = scale_term * (model_diff - ref_diff)
    implicit_acc = (inside_term > 0).sum().float() / inside_term.size(0)
    loss = -1 * F.logsigmoid(inside_term).mean()
    return loss, raw_model_loss, raw_ref_loss, implicit_acc


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("convention", ["diffusers", "salesforce"])
def test_diffusion_dpo_reproduces_the_scripts_exactly(convention, dtype):
    script = _diffusers_script if convention == "diffusers" else _salesforce_script
    p, r, t = _inputs((6, 4, 8, 8), dtype=dtype, spread=0.05)
    beta_dpo = 2500.0
    pa, pb = p.clone().requires_grad_(), p.clone().requires_grad_()
    out = diffusion_dpo_loss(pa, r, t, beta_dpo, convention=convention)
    loss, raw_model, raw_ref, acc = script(pb, r, t, beta_dpo)
    assert out.loss.dtype == loss.dtype
    assert torch.equal(out.loss, loss)
    out.loss.backward()
    loss.backward()
    assert torch.equal(pa.grad, pb.grad)
    assert out.metrics["e_theta"] == float(raw_model.detach())
    assert out.metrics["e_ref"] == float(raw_ref)
    assert out.metrics["implicit_acc"] == float(acc)
    assert out.metrics["beta_t"] == (beta_dpo if convention == "diffusers" else 0.5 * beta_dpo)


def test_diffusion_dpo_conventions_differ_only_by_half_beta_and_ties():
    p, r, t = _inputs((4, 2, 5, 5), dtype=torch.float32, spread=0.05)
    diff = diffusion_dpo_loss(p, r, t, 100.0, convention="diffusers")
    sf = diffusion_dpo_loss(p, r, t, 200.0, convention="salesforce")
    torch.testing.assert_close(diff.loss, sf.loss, rtol=1e-5, atol=1e-6)
    apo = apo_loss(p, r, t, 100.0, paired=True, backend="torch")
    torch.testing.assert_close(apo.loss, diff.loss, rtol=1e-5, atol=1e-6)
    for key in ("reward_w", "reward_l", "implicit_acc"):
        assert apo.metrics[key] == pytest.approx(diff.metrics[key], rel=1e-5, abs=1e-6)
    # policy == reference (LoRA at init): diffusers counts the ties 1/2, Salesforce 0
    assert diffusion_dpo_loss(p, p, t, 1.0).metrics["implicit_acc"] == 0.5
    assert diffusion_dpo_loss(p, p, t, 1.0, convention="salesforce").metrics["implicit_acc"] == 0.0


def test_diffusion_dpo_rejects_bad_inputs():
    p, r, t = _inputs((4, 2, 3, 3))
    with pytest.raises(ValueError, match="convention"):
        diffusion_dpo_loss(p, r, t, 1.0, convention="trl")
    with pytest.raises(ValueError, match="even"):
        diffusion_dpo_loss(p[:3], r[:3], t[:3], 1.0)
    with pytest.raises(TypeError, match="beta_dpo"):
        diffusion_dpo_loss(p, r, t, "2500")
    with pytest.raises(ValueError, match="4-D"):
        diffusion_dpo_loss(p[..., 0], r[..., 0], t[..., 0], 1.0, convention="salesforce")


# --------------------------------------------------------------------------- validation


def _bad_call(**overrides):
    p, r, t = _inputs((4, 3, 5, 5), dtype=torch.float32)
    args = dict(model_pred=p, ref_pred=r, target=t, beta_t=1.0)
    args.update(overrides)
    return apo_loss(args.pop("model_pred"), args.pop("ref_pred"), args.pop("target"), args.pop("beta_t"), **args)


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (dict(ref_pred=torch.randn(4, 3, 5, 4)), ValueError, "ref_pred"),
        (dict(target=torch.randint(0, 3, (4, 3, 5, 5))), TypeError, "target"),
        (dict(loss_type="dpo"), ValueError, "loss_type"),
        (dict(loss_type="kto", paired=True), ValueError, "kto"),
        (dict(loss_type="margin"), ValueError, "margin"),
        (dict(loss_type="kto", labels=torch.tensor([1, 0, 2, 1])), ValueError, "labels"),
        (dict(loss_type="kto", labels=torch.ones(3)), ValueError, "labels"),
        (dict(labels=torch.ones(4)), ValueError, "labels"),
        (dict(weights=torch.ones(2)), ValueError, "weights"),
        (dict(weights=-torch.ones(4)), ValueError, "weights"),
        (dict(lambda_desirable=-1.0), ValueError, "lambda_desirable"),
        (dict(model_pred=torch.randint(0, 3, (4, 3, 5, 5))), TypeError, "model_pred"),
        (dict(model_pred=[1.0]), TypeError, "model_pred"),
        (dict(model_pred=torch.randn(4), ref_pred=torch.randn(4), target=torch.randn(4)), ValueError, "model_pred"),
        (dict(target=torch.randn(4, 3, 5, 5, device="meta")), ValueError, "device"),
        (dict(mask=torch.rand(4, 2, 5, 5)), ValueError, "mask"),
        (dict(mask=torch.rand(4, 1, 5, 5, device="meta")), ValueError, "mask"),
        (dict(mask=[0.0]), TypeError, "mask"),
        (dict(beta_t=torch.ones(3)), ValueError, "beta_t"),
        (dict(beta_t=torch.ones(4, 1)), ValueError, "beta_t"),
        (dict(beta_t=torch.ones(4, dtype=torch.long)), TypeError, "beta_t"),
        (dict(beta_t="1"), TypeError, "beta_t"),
        (dict(beta_t=float("nan")), ValueError, "beta_t"),
        (dict(beta_t=torch.ones(3), paired=True), ValueError, "beta_t"),
        (dict(lambda_mask=-1.0), ValueError, "lambda_mask"),
        (dict(lambda_sft=-0.1), ValueError, "lambda_sft"),
        (dict(paired=1), TypeError, "paired"),
        (dict(backend="cuda"), ValueError, "backend"),
    ],
)
def test_apo_loss_rejects_bad_inputs(overrides, error, match):
    with pytest.raises(error, match=match):
        _bad_call(**overrides)


def test_paired_needs_even_batch():
    p, r, t = _inputs((3, 2, 3, 3))
    with pytest.raises(ValueError, match="even"):
        apo_loss(p, r, t, 1.0, paired=True)


def test_metrics_are_lazy_and_slots_are_complete():
    p, r, t = _inputs((4, 2, 3, 3), dtype=torch.float32)
    out = apo_loss(p, r, t, 1.0, paired=True, lambda_sft=0.5, backend="torch")
    assert out.metric_values.shape == (len(METRIC_SLOTS),)
    assert list(out.metrics) == ["loss", "e_theta", "e_ref", "reward_w", "reward_l", "implicit_acc", "beta_t", "sft"]
    assert all(isinstance(v, float) for v in out.metrics.values())
    assert out.metrics["loss"] == float(out.loss)
    plain = apo_loss(p, r, t, 1.0, backend="torch")
    assert "reward_l" not in plain.metrics and "sft" not in plain.metrics


def test_reference_traces_under_torch_compile():
    from apo_fast.ops.apo_loss.naive import apo_loss_reference

    p, r, t = _inputs((2, 2, 4, 4), dtype=torch.float32)
    beta = torch.tensor([1.0, 2.0])
    torch._dynamo.reset()  # earlier tests may have run this function with dynamo disabled (cached as skipped)
    compiled = torch.compile(apo_loss_reference, fullgraph=True, backend="eager")
    got = compiled(p, r, t, beta, None, 1.0, False, 0.0)
    want = apo_loss_reference(p, r, t, beta, None, 1.0, False, 0.0)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- loss.mask_weight


@pytest.mark.parametrize("shape", [(3, 1, 7, 5), (4, 3, 9, 11), (2, 1, 1, 1)])
def test_area_normalized_mask_gives_every_defect_the_same_total_weight(shape):
    """``area``: each sample's mask divided by its mean (float64 formula written out here), so a
    thin defect's region weighs as much as a large one's; a normal image's empty mask stays 0."""
    from apo_fast.losses import area_normalized_mask, loss_mask

    g = torch.Generator().manual_seed(sum(shape))
    m = torch.rand(shape, generator=g, dtype=torch.float64) * (torch.rand(shape, generator=g) > 0.6)
    m[0] = 0.0  # a normal image
    m.view(shape[0], -1)[-1, 0] = 0.5  # at least one masked pixel in the last sample
    out = area_normalized_mask(m)
    assert out.dtype == m.dtype and out.shape == m.shape and torch.isfinite(out).all()
    flat = m.reshape(shape[0], -1)
    for i in range(shape[0]):
        area = flat[i].sum() / flat[i].numel()
        want = flat[i] / area if area > 0 else torch.zeros_like(flat[i])
        torch.testing.assert_close(out.reshape(shape[0], -1)[i], want, rtol=1e-12, atol=0)
    means = out.reshape(shape[0], -1).mean(dim=1)
    assert means[0] == 0 and torch.allclose(means[-1], torch.ones((), dtype=torch.float64))
    assert area_normalized_mask(m.float()).dtype == torch.float32
    binary = area_normalized_mask((m > 0).to(torch.uint8))  # an integer mask is not truncated
    assert binary.dtype == torch.float32
    torch.testing.assert_close(binary.reshape(shape[0], -1).mean(dim=1)[1:], torch.ones(shape[0] - 1))
    assert loss_mask(m, "pixel") is m and torch.equal(loss_mask(m, "area"), out)
    half = loss_mask(m, "sqrt_area")  # mask / sqrt(area)
    for i in range(1, shape[0]):
        area = flat[i].sum() / flat[i].numel()
        torch.testing.assert_close(half.reshape(shape[0], -1)[i], flat[i] / area.sqrt(), rtol=1e-12, atol=0)
    assert torch.equal(half[0], torch.zeros_like(half[0]))
    with pytest.raises(ValueError, match="mask_weight must be one of pixel, area, sqrt_area; got 'volume'"):
        loss_mask(m, "volume")


def test_area_weight_makes_a_thin_defect_count_as_much_as_a_large_one():
    """With ``pixel`` weights the mask's extra term (``e`` at ``lambda_mask`` 2 minus ``e``
    unweighted) for the same per-pixel error is 4x smaller inside a 1-row defect than inside
    a half-image one; with ``sqrt_area`` 2x; with ``area`` weights it is the same for both."""
    from apo_fast.losses import diffusion_loss, loss_mask

    h = w = 8
    thin, large = torch.zeros(1, 1, h, w), torch.zeros(1, 1, h, w)
    thin[..., 3, :] = 1
    large[..., : h // 2, :] = 1
    masks = torch.cat([thin, large]).double()
    err = masks.clone()  # error 1 inside each defect, 0 outside
    # the large defect has 4x the thin one's area: pixel 4x apart, sqrt_area 2x, area 1x
    for kind, ratio in (("pixel", 4.0), ("sqrt_area", 2.0), ("area", 1.0)):
        e2, e1 = (diffusion_loss(err, torch.zeros_like(err), loss_mask(masks, kind), lambda_mask=lam).e_theta
                  for lam in (2.0, 1.0))
        extra = e2 - e1
        assert torch.isclose(extra[1] / extra[0], torch.tensor(ratio, dtype=extra.dtype)), (kind, extra)
