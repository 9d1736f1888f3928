"""The mask input (``adapter.mask_input``): the policy sees the defect mask, the reference does not."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from apo_fast.adapters import (
    AdapterConfig,
    adapter_parameters,
    adapters_disabled,
    freeze_base,
    inject_adapters,
    load_adapters,
    save_adapters,
    set_adapters_enabled,
)
from apo_fast.adapters.io import MASK_WEIGHT_NAME
from apo_fast.adapters.mask_input import MASK_KWARG, MaskInput, get_mask_input, resize_mask

pytest.importorskip("diffusers")

F64 = torch.float64


def masked_unet(make_tiny_unet, dtype=torch.float32, std=0.3, seed=5):
    unet = make_tiny_unet().to(dtype).eval()
    inject_adapters(unet, AdapterConfig(r=4, mask_input=True))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in get_mask_input(unet).parameters():
            p.normal_(0, std)
    return unet


def inputs(batch, size=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, 4, size, size, generator=g, dtype=F64).to(dtype)
    c = torch.randn(batch, 5, 32, generator=g, dtype=F64).to(dtype)
    m = (torch.rand(batch, 1, size, size, generator=g) > 0.7).to(dtype)
    t = torch.randint(0, 1000, (batch,), generator=g)
    return z, t, c, m


def branch_f64(module: MaskInput, mask: torch.Tensor, size) -> torch.Tensor:
    """The branch written out in float64: max-pool/nearest resize, conv, SiLU, conv."""
    m = mask.to(F64)
    if m.shape[-2] >= size[0]:
        m = F.adaptive_max_pool2d(m, size)
    else:
        m = F.interpolate(m, size=size, mode="nearest")
    h = F.conv2d(m, module.encode_weight.to(F64), padding=1)
    h = h * torch.sigmoid(h)
    return F.conv2d(h, module.project_weight.to(F64), padding=1)


@pytest.mark.parametrize("mask_size,size", [(13, 13), (29, 7), (5, 11), (32, 4)])
def test_branch_matches_float64_reference_with_gradients(mask_size, size, f64_close):
    assert_close, _ = f64_close
    torch.manual_seed(mask_size)
    module = MaskInput(out_channels=6, hidden=5)
    with torch.no_grad():
        module.project_weight.normal_(0, 0.5)
    ref = MaskInput(out_channels=6, hidden=5).to(F64)
    ref.load_state_dict({k: v.to(F64) for k, v in module.state_dict().items()})
    mask = (torch.rand(3, 1, mask_size, mask_size) > 0.6).float()
    out = module(mask, (size, size))
    expected = branch_f64(ref, mask, (size, size))
    assert out.shape == (3, 6, size, size)
    torch.testing.assert_close(out.to(F64), expected, rtol=1e-5, atol=1e-5)
    # gradients of both weights, float64 module vs the written-out float64 reference
    w = torch.randn_like(expected)
    (ref(mask.to(F64), (size, size)) * w).sum().backward()
    enc = ref.encode_weight.detach().clone().requires_grad_(True)
    proj = ref.project_weight.detach().clone().requires_grad_(True)
    m = resize_mask(mask.to(F64), (size, size))
    h = F.conv2d(m, enc, padding=1)
    (F.conv2d(h * torch.sigmoid(h), proj, padding=1) * w).sum().backward()
    terms = 2 * 2 * 9 * 5
    assert_close(ref.encode_weight.grad, enc.grad, terms=terms, msg="encode grad")
    assert_close(ref.project_weight.grad, proj.grad, terms=terms, msg="project grad")


def test_resize_keeps_a_one_pixel_line_when_pooling_down():
    mask = torch.zeros(1, 1, 32, 32)
    mask[0, 0, 5, :] = 1.0  # a 1-pixel crack
    down = resize_mask(mask, (4, 4))
    assert down.sum() == 4 and down[0, 0, 0].eq(1).all()
    up = resize_mask(torch.eye(3).view(1, 1, 3, 3), (6, 6))
    assert torch.equal(up[0, 0, ::2, ::2], torch.eye(3))


def test_policy_starts_as_the_reference_and_a_zero_mask_adds_nothing(make_tiny_unet):
    unet = make_tiny_unet().eval()
    inject_adapters(unet, AdapterConfig(r=4, mask_input=True))
    z, t, c, m = inputs(2)
    with torch.no_grad():
        plain = unet(z, t, encoder_hidden_states=c).sample
        assert torch.equal(unet(z, t, encoder_hidden_states=c, **{MASK_KWARG: m}).sample, plain)  # zero-init P
        for p in get_mask_input(unet).parameters():
            p.normal_(0, 0.3)
        # no bias anywhere: an all-zero mask is exactly no mask
        zero = unet(z, t, encoder_hidden_states=c, **{MASK_KWARG: torch.zeros_like(m)}).sample
        assert torch.equal(zero, plain)
        assert not torch.allclose(unet(z, t, encoder_hidden_states=c, **{MASK_KWARG: m}).sample, plain, atol=1e-4)


def test_unet_output_equals_conv_in_plus_branch_in_float64(make_tiny_unet, f64_close):
    """The hooked UNet equals the same UNet whose conv_in output gets the written-out branch."""
    unet = masked_unet(make_tiny_unet, F64)
    z, t, c, m = inputs(3, dtype=F64)
    module = get_mask_input(unet)
    with torch.no_grad():
        out = unet(z, t, encoder_hidden_states=c, **{MASK_KWARG: m}).sample
        with adapters_disabled(unet):
            handle = unet.conv_in.register_forward_hook(lambda mod, a, o: o + branch_f64(module, m, o.shape[-2:]))
            try:
                expected = unet(z, t, encoder_hidden_states=c).sample
            finally:
                handle.remove()
    # adapters_disabled also switched the LoRA layers off: B is zero-init, so they add nothing
    assert_close, terms = f64_close
    assert_close(out, expected, terms=terms(unet), msg="unet with mask input")


def test_reference_pass_ignores_the_mask_and_only_the_policy_gets_gradients(make_tiny_unet):
    unet = masked_unet(make_tiny_unet)
    freeze_base(unet)
    module = get_mask_input(unet)
    params = {id(p) for p in adapter_parameters(unet)}
    assert all(id(p) in params and p.requires_grad for p in module.parameters())
    z, t, c, m = inputs(2)
    plain = unet(z, t, encoder_hidden_states=c).sample.detach()
    with adapters_disabled(unet):
        ref = unet(z, t, encoder_hidden_states=c, **{MASK_KWARG: m}).sample
    assert torch.equal(ref.detach(), plain) and module.enabled
    assert ref.grad_fn is None or all(p.grad is None for p in module.parameters())
    set_adapters_enabled(unet, False)
    assert torch.equal(unet(z, t, encoder_hidden_states=c, **{MASK_KWARG: m}).sample.detach(), plain)
    set_adapters_enabled(unet, True)
    unet(z, t, encoder_hidden_states=c, **{MASK_KWARG: m}).sample.pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    assert not module._pending  # every forward released its mask


@pytest.mark.parametrize("bad,words", [
    (torch.zeros(3, 1, 16, 16), "3 masks for a batch of 2"),
    (torch.zeros(2, 16, 16), r"\(B, 1, H, W\)"),
    (torch.zeros(2, 2, 16, 16), r"\(B, 1, H, W\)"),
])
def test_wrong_masks_are_named(make_tiny_unet, bad, words):
    unet = masked_unet(make_tiny_unet)
    z, t, c, _ = inputs(2)
    with pytest.raises(ValueError, match=words):
        unet(z, t, encoder_hidden_states=c, **{MASK_KWARG: bad})
    assert not get_mask_input(unet)._pending


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="mask_input must be true or false"):
        AdapterConfig(mask_input="yes")
    with pytest.raises(ValueError, match="hidden must be"):
        MaskInput(4, hidden=0)


def test_save_and_load_roundtrip_and_stale_file_removed(make_tiny_unet, tmp_path):
    unet = masked_unet(make_tiny_unet)
    save_adapters(unet, tmp_path)
    assert (tmp_path / MASK_WEIGHT_NAME).is_file()
    fresh = make_tiny_unet().eval()
    config = load_adapters(fresh, tmp_path)
    assert config.mask_input and get_mask_input(fresh) is not None
    z, t, c, m = inputs(2, seed=3)
    with torch.no_grad():
        a = unet(z, t, encoder_hidden_states=c, **{MASK_KWARG: m}).sample
        b = fresh(z, t, encoder_hidden_states=c, **{MASK_KWARG: m}).sample
    assert torch.equal(a, b)
    plain = make_tiny_unet().eval()
    inject_adapters(plain, AdapterConfig(r=4))
    save_adapters(plain, tmp_path)  # the same folder, now without a mask input
    assert not (tmp_path / MASK_WEIGHT_NAME).exists()


def test_missing_or_mismatched_mask_file_is_named(make_tiny_unet, tmp_path):
    from safetensors.torch import save_file

    unet = masked_unet(make_tiny_unet)
    save_adapters(unet, tmp_path)
    other = make_tiny_unet().eval()
    inject_adapters(other, AdapterConfig(r=4))
    from apo_fast.adapters.mask_input import attach_mask_input

    attach_mask_input(other, hidden=8)  # a branch of another width than the saved one (32)
    with pytest.raises(ValueError, match="does not fit the model's mask input"):
        load_adapters(other, tmp_path)
    (tmp_path / MASK_WEIGHT_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="names a mask input file"):
        load_adapters(make_tiny_unet().eval(), tmp_path)
    save_file({"x": torch.zeros(1)}, str(tmp_path / MASK_WEIGHT_NAME))
    with pytest.raises(ValueError, match="does not fit"):
        load_adapters(make_tiny_unet().eval(), tmp_path)


def test_a_branch_of_another_width_loads_into_a_fresh_unet(make_tiny_unet, tmp_path):
    """load_adapters attaches the branch at its saved width (it once attached the default 32
    first and then refused the file)."""
    from apo_fast.adapters.mask_input import attach_mask_input

    unet = make_tiny_unet().eval()
    inject_adapters(unet, AdapterConfig(r=4))
    with torch.no_grad():
        for p in attach_mask_input(unet, hidden=8).parameters():
            p.normal_(0, 0.3)
    save_adapters(unet, tmp_path)
    fresh = make_tiny_unet().eval()
    assert load_adapters(fresh, tmp_path).mask_input and get_mask_input(fresh).hidden == 8
    z, t, c, m = inputs(2, seed=4)
    with torch.no_grad():
        assert torch.equal(unet(z, t, encoder_hidden_states=c, **{MASK_KWARG: m}).sample,
                           fresh(z, t, encoder_hidden_states=c, **{MASK_KWARG: m}).sample)


def timed_unet(make_tiny_unet, dtype=torch.float32, std=0.3, seed=6):
    unet = make_tiny_unet().to(dtype).eval()
    inject_adapters(unet, AdapterConfig(r=4, mask_input=True, mask_time=True))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in get_mask_input(unet).parameters():
            p.normal_(0, std)
    return unet


def test_timed_branch_scales_its_features_by_the_time_embedding_in_float64(make_tiny_unet, f64_close):
    """adapter.mask_time: the UNet equals the same UNet whose conv_in output gets the written-out
    branch with the hidden features scaled by 1 + W emb(t), emb the UNet's own time embedding;
    the branch now differs between timesteps, and W = 0 is the time-free branch."""
    unet = timed_unet(make_tiny_unet, F64)
    module = get_mask_input(unet)
    assert module.time_dim == unet.time_embedding.linear_2.out_features
    z, t, c, m = inputs(3, dtype=F64)

    def written_out(emb, mask, size):
        r = resize_mask(mask.to(F64), size)
        h = F.conv2d(r, module.encode_weight, padding=1)
        h = h * torch.sigmoid(h) * (1 + emb @ module.time_weight.t())[:, :, None, None]
        return F.conv2d(h, module.project_weight, padding=1)

    with torch.no_grad():
        out = unet(z, t, encoder_hidden_states=c, **{MASK_KWARG: m}).sample
        embs = []
        with adapters_disabled(unet):
            hooks = [unet.time_embedding.register_forward_hook(lambda mod, a, o: embs.append(o)),
                     unet.conv_in.register_forward_hook(lambda mod, a, o: o + written_out(embs[-1], m, o.shape[-2:]))]
            try:
                expected = unet(z, t, encoder_hidden_states=c).sample
            finally:
                for h in hooks:
                    h.remove()
        assert_close, terms = f64_close
        assert_close(out, expected, terms=terms(unet), msg="unet with a timed mask input")
        assert not module._emb and not module._pending  # every call released its embedding and mask
        same_mask = m[:1].expand(2, -1, -1, -1)
        other_t = torch.tensor([int(t[0]), (int(t[0]) + 500) % 1000])
        by_t = unet(z[:1].expand(2, -1, -1, -1), other_t, encoder_hidden_states=c[:1].expand(2, -1, -1),
                    **{MASK_KWARG: same_mask}).sample
        with adapters_disabled(unet):
            plain = unet(z[:1].expand(2, -1, -1, -1), other_t, encoder_hidden_states=c[:1].expand(2, -1, -1)).sample
        # the branch's effect differs between the two timesteps beyond what the base's own
        # time dependence gives: zeroing W changes the output
        module.time_weight.zero_()
        untimed = unet(z[:1].expand(2, -1, -1, -1), other_t, encoder_hidden_states=c[:1].expand(2, -1, -1),
                       **{MASK_KWARG: same_mask}).sample
        assert not torch.allclose(by_t - plain, untimed - plain, atol=1e-6)
        flat = MaskInput(module.out_channels, module.hidden).to(F64)
        flat.load_state_dict({k: v for k, v in module.state_dict().items() if k != "time_weight"})
        assert torch.equal(module(m, (16, 16), torch.randn(3, module.time_dim, dtype=F64)), flat(m, (16, 16)))


def test_timed_branch_saves_loads_trains_and_is_refused_without_a_mask_input(make_tiny_unet, tmp_path):
    unet = timed_unet(make_tiny_unet)
    save_adapters(unet, tmp_path)
    fresh = make_tiny_unet().eval()
    config = load_adapters(fresh, tmp_path)
    assert config.mask_input and config.mask_time and get_mask_input(fresh).time_dim > 0
    z, t, c, m = inputs(2, seed=7)
    with torch.no_grad():
        assert torch.equal(unet(z, t, encoder_hidden_states=c, **{MASK_KWARG: m}).sample,
                           fresh(z, t, encoder_hidden_states=c, **{MASK_KWARG: m}).sample)
    freeze_base(unet)
    module = get_mask_input(unet)
    assert any(p is module.time_weight for p in adapter_parameters(unet))
    unet(z, t, encoder_hidden_states=c, **{MASK_KWARG: m}).sample.pow(2).mean().backward()
    assert module.time_weight.grad is not None and module.time_weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="mask_time needs mask_input"):
        AdapterConfig(mask_time=True)
    with pytest.raises(ValueError, match="mask_time must be true or false"):
        AdapterConfig(mask_input=True, mask_time=1)
    with pytest.raises(ValueError, match="time embedding must be"):
        module(m, (16, 16))
