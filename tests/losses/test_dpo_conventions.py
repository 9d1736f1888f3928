"""diffusion_dpo_loss reproduces the public scripts number for number: diffusers'
train_diffusion_dpo.py for every --loss_type, train_diffusion_dpo_sdxl.py and the Salesforce
original, ties in the implicit accuracy included, with mixed input dtypes as accelerate hands
them over. The expected values are the scripts' lines, transcribed here on their own."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from apo_fast.losses import METRIC_SLOTS, diffusion_dpo_loss


def _batch(seed, dtype=torch.float32, tie=True):
    g = torch.Generator().manual_seed(seed)
    shape = (6, 4, 5, 7)  # 3 pairs
    target = torch.randn(shape, generator=g)
    model = target + 0.5 * torch.randn(shape, generator=g)
    ref = target + 0.5 * torch.randn(shape, generator=g)
    if tie:  # pair 1: winner and loser identical on both sides -> logits == 0 exactly
        model[4], ref[4], target[4] = model[1], ref[1], target[1]
    return model.to(dtype), ref.to(dtype), target.to(dtype)


def _diffusers_sd(model_pred, ref_preds, target, beta_dpo, loss_type):
    """train_diffusion_dpo.py, the lines after the two UNet passes."""
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
    if loss_type == "sigmoid":
        loss = -1 * F.logsigmoid(beta_dpo * logits).mean()
    elif loss_type == "hinge":
        loss = torch.relu(1 - beta_dpo * logits).mean()
    else:  # the script's `args.beta` does not exist; the IPO paper's tau is beta_dpo
        loss = ((logits - 1 / (2 * beta_dpo)) ** 2).mean()
    implicit_acc = (logits > 0).sum().float() / logits.size(0)
    implicit_acc += 0.5 * (logits == 0).sum().float() / logits.size(0)
    return loss, raw_model_loss, raw_ref_loss, implicit_acc


def _diffusers_sdxl(model_pred, ref_preds, target, beta_dpo):
    """train_diffusion_dpo_sdxl.py."""
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
    scale_term = -0.5 * beta_dpo
    inside_term = scale_term * (model_diff - ref_diff)
    loss = -1 * F.logsigmoid(inside_term).mean()
    implicit_acc = (inside_term > 0).sum().float() / inside_term.size(0)
    implicit_acc += 0.5 * (inside_term == 0).sum().float() / inside_term.size(0)
    return loss, raw_model_loss, raw_ref_loss, implicit_acc


def _salesforce(model_pred, ref_pred, target, beta_dpo):
    """SalesforceAIResearch/DiffusionDPO train.py."""
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


def _assert_same(out, expected):
    loss, raw_model, raw_ref, acc = expected
    values = out.metric_values
    assert torch.equal(out.loss, loss), (out.loss, loss)
    assert torch.equal(values[METRIC_SLOTS["e_theta"]], raw_model.float())
    assert torch.equal(values[METRIC_SLOTS["e_ref"]], raw_ref.float())
    assert torch.equal(values[METRIC_SLOTS["implicit_acc"]], acc.float())


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
@pytest.mark.parametrize("dtypes", [(torch.float32,) * 3, (torch.float32, torch.bfloat16, torch.bfloat16),
                                    (torch.bfloat16,) * 3, (torch.float16, torch.float32, torch.float16)])
def test_diffusers_sd_every_loss_type(loss_type, dtypes):
    m, r, t = _batch(1)
    m, r, t = m.to(dtypes[0]), r.to(dtypes[1]), t.to(dtypes[2])
    out = diffusion_dpo_loss(m, r, t, beta_dpo=50.0, convention="diffusers", loss_type=loss_type)
    _assert_same(out, _diffusers_sd(m, r, t, 50.0, loss_type))


@pytest.mark.parametrize("dtypes", [(torch.float32,) * 3, (torch.float32, torch.bfloat16, torch.bfloat16)])
def test_diffusers_sdxl(dtypes):
    m, r, t = _batch(2)
    m, r, t = m.to(dtypes[0]), r.to(dtypes[1]), t.to(dtypes[2])
    out = diffusion_dpo_loss(m, r, t, beta_dpo=50.0, convention="diffusers_sdxl")
    _assert_same(out, _diffusers_sdxl(m, r, t, 50.0))
    sd = diffusion_dpo_loss(m, r, t, beta_dpo=50.0, convention="diffusers")
    assert not torch.isclose(sd.loss, out.loss)  # the -0.5 matters: the SD call is wrong for SDXL


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_salesforce(dtype):
    m, r, t = _batch(3, dtype)
    out = diffusion_dpo_loss(m, r, t, beta_dpo=50.0, convention="salesforce")
    _assert_same(out, _salesforce(m, r, t, 50.0))


def test_tie_rules_differ_by_script():
    m, r, t = _batch(4)
    acc = METRIC_SLOTS["implicit_acc"]
    xl = diffusion_dpo_loss(m, r, t, 50.0, convention="diffusers_sdxl").metric_values[acc]
    sf = diffusion_dpo_loss(m, r, t, 50.0, convention="salesforce").metric_values[acc]
    assert float(xl - sf) == pytest.approx(0.5 / 3)  # the tied pair counts 1/2 in SDXL, 0 in Salesforce


def test_bad_conventions_and_loss_types_are_refused():
    m, r, t = _batch(5)
    with pytest.raises(ValueError, match="convention"):
        diffusion_dpo_loss(m, r, t, 1.0, convention="trl")
    with pytest.raises(ValueError, match="loss_type"):
        diffusion_dpo_loss(m, r, t, 1.0, loss_type="kto")
    with pytest.raises(ValueError, match="diffusers SD script"):
        diffusion_dpo_loss(m, r, t, 1.0, convention="salesforce", loss_type="hinge")


def _diffusion_kto(model_pred, ref_preds, target, beta, labels, lambda_d, lambda_u):
    """Diffusion-KTO train_kto_sd_v1.5.py (--loss kto, --halo sigmoid), one process."""
    model_losses = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    model_losses = model_losses.mean(dim=list(range(1, len(model_losses.shape))))
    ref_loss = F.mse_loss(ref_preds.float(), target.float(), reduction="none")
    ref_loss = ref_loss.mean(dim=list(range(1, len(ref_loss.shape))))
    g_term = -model_losses - (-ref_loss)
    kl = g_term.mean().detach().clamp(min=0).detach()
    g_term = g_term - kl
    label_sgn = 2 * labels - 1
    labels_binary = labels == 1
    label_scale_g = label_sgn * beta * g_term
    h = torch.sigmoid(label_scale_g)
    w_y = lambda_d * labels_binary + lambda_u * ~labels_binary
    loss = (w_y * (1 - h)).mean()
    acc = (label_scale_g > 0).sum().detach() / len(label_scale_g)
    return loss, acc


@pytest.mark.parametrize("dtypes", [(torch.float32,) * 3, (torch.float32, torch.bfloat16, torch.bfloat16)])
def test_diffusion_kto_script(dtypes):
    from apo_fast.losses import apo_loss

    m, r, t = _batch(6, tie=False)
    m, r, t = m.to(dtypes[0]), r.to(dtypes[1]), t.to(dtypes[2])
    labels = torch.tensor([1, 0, 1, 1, 0, 0])
    mg = m.clone().requires_grad_(True)
    out = apo_loss(mg, r, t, 40.0, loss_type="kto", labels=labels, lambda_desirable=1.3, lambda_undesirable=0.8)
    ms = m.clone().requires_grad_(True)
    loss, acc = _diffusion_kto(ms, r, t, 40.0, labels, 1.3, 0.8)
    torch.testing.assert_close(out.loss, loss, rtol=1e-6, atol=1e-7)
    assert float(out.metrics["implicit_acc"]) == pytest.approx(float(acc))
    out.loss.backward()
    loss.backward()
    torch.testing.assert_close(mg.grad, ms.grad, rtol=1e-5, atol=1e-5 * float(ms.grad.abs().max()))
