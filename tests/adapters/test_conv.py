"""Time-gated LoRA on convolutions (GatedLoRAConv2d): the float64 formula, every
gate kind, peft's lora.Conv2d (constant gate), merge, the peft/diffusers file."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from apo_fast.adapters import (
    AdapterConfig,
    GateConfig,
    GatedLoRAConv2d,
    GatedLoRALinear,
    adapters_disabled,
    convert_peft_to_gated,
    gated_layers,
    inject_adapters,
    load_adapters,
    save_adapters,
)

pytest.importorskip("peft")

F64 = torch.float64
CONV_TARGETS = ["conv1", "proj_in", "proj_out", "downsamplers.0.conv"]


def _formula(x, conv: nn.Conv2d, A, B, gate, scaling):
    """float64: conv(x) + conv1x1(scaling * gate[s] * convA(x)) from the weights alone."""
    kw = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
    h = F.conv2d(x, A, **kw)
    if gate is not None:
        h = h * gate[:, :, None, None]
    return F.conv2d(x, conv.weight, conv.bias, **kw) + F.conv2d(h * scaling, B)


def _layer(conv, r=3, alpha=6.0):
    layer = GatedLoRAConv2d(conv, r=r, lora_alpha=alpha)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.5)
    return layer


class _FixedGate:
    """A stand-in gate state: a fixed (S, r) gate, or None (constant)."""

    def __init__(self, gate):
        self.gate, self.constant = gate, gate is None

    def gate_for(self, rank):
        return self.gate


@pytest.mark.parametrize("kernel, stride, padding", [(3, 1, 1), (3, 2, 1), (1, 1, 0), (2, 1, 0)])
@pytest.mark.parametrize("gate_kind", ["none", "prefix", "learned"])
def test_forward_and_gradients_match_the_float64_formula(kernel, stride, padding, gate_kind, f64_close):
    conv = nn.Conv2d(5, 7, kernel, stride, padding).to(F64).requires_grad_(False)
    layer = _layer(conv)
    S, r = 3, 3
    gate = {
        "none": None,
        "prefix": torch.tensor([[1.0, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=F64),
        "learned": torch.rand(S, r, dtype=F64, requires_grad=True),
    }[gate_kind]
    layer.gate_state = _FixedGate(gate)
    x = torch.randn(S, 5, 9, 11, dtype=F64, requires_grad=True)
    y = layer(x)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    want = _formula(x, conv, A, B, gate, layer.scaling["default"])
    close, terms = f64_close
    n = terms(layer, tokens=y.shape[0] * y.shape[-2] * y.shape[-1])
    close(y.detach(), want.detach(), terms=n, msg="y")
    dy = torch.randn_like(y)
    leaves = [x, A, B] + ([gate] if gate is not None and gate.requires_grad else [])
    got = torch.autograd.grad(y, leaves, dy, retain_graph=gate_kind == "prefix")
    expect = torch.autograd.grad(want, leaves, dy)
    for i, (g, e) in enumerate(zip(got, expect)):
        close(g, e, terms=n, msg=f"gradient {i}")
    if gate_kind == "prefix":  # sample 0 uses only the first rank channel
        only_first = _formula(x[:1], conv, A[:1], B[:, :1], None, layer.scaling["default"])
        close(y[:1].detach(), only_first.detach(), terms=n, msg="first sample")


def test_bf16_input_with_fp32_adapter_weights_and_merge():
    conv = nn.Conv2d(4, 6, 3, padding=1).requires_grad_(False)
    layer = _layer(conv)
    x = torch.randn(2, 4, 8, 8)
    y = layer(x)
    merged = copy.deepcopy(layer)
    merged.merge()
    torch.testing.assert_close(merged(x), y, rtol=1e-5, atol=1e-5)
    merged.unmerge()
    torch.testing.assert_close(merged.base_layer.weight, conv.weight, rtol=0, atol=1e-6)
    half = copy.deepcopy(layer)
    half.base_layer.to(torch.bfloat16)
    out = half(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), y, rtol=3e-2, atol=3e-2)
    layer.gate_state = _FixedGate(torch.ones(1, 3))  # a time gate cannot be merged
    layer.gate_state.constant = False
    with pytest.raises(ValueError, match="cannot merge a time-gated adapter"):
        layer.merge()


def test_grouped_and_wrong_base_layers_are_refused():
    with pytest.raises(TypeError, match="grouped convolution"):
        GatedLoRAConv2d(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(TypeError, match=r"must be an nn\.Conv2d"):
        GatedLoRAConv2d(nn.Linear(4, 4))


def _inputs(dtype=F64):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 16, 16, generator=g).to(dtype)
    c = torch.randn(2, 5, 32, generator=g).to(dtype)
    return x, torch.tensor([30, 870]), c


def test_converted_peft_conv_lora_equals_peft_and_saves_peft_keys(make_peft_unet, tmp_path, f64_close):
    from peft.utils import get_peft_model_state_dict

    peft_unet = make_peft_unet(CONV_TARGETS + ["to_q"])
    plain, fused = copy.deepcopy(peft_unet), copy.deepcopy(peft_unet)
    count = convert_peft_to_gated(fused)
    layers = dict(gated_layers(fused))
    convs = [p for p, m in layers.items() if isinstance(m, GatedLoRAConv2d)]
    assert count == len(layers) and convs and any(type(m) is GatedLoRALinear for m in layers.values())
    x, t, c = _inputs()
    x.requires_grad_()
    ya = plain(x, t, encoder_hidden_states=c).sample
    yb = fused(x, t, encoder_hidden_states=c).sample
    close, terms = f64_close
    n = terms(plain, tokens=x.shape[0] * x.shape[-2] * x.shape[-1])
    close(yb.detach(), ya.detach(), terms=n, msg="output")
    dy = torch.randn_like(ya)
    pa = [p for n, p in plain.named_parameters() if "lora_" in n and ".conv1." in n]
    pb = [p for n, p in fused.named_parameters() if "lora_" in n and ".conv1." in n]
    assert pa and all(p.requires_grad for p in pa + pb)
    for i, (a, b) in enumerate(zip(torch.autograd.grad(ya, [x] + pa, dy), torch.autograd.grad(yb, [x] + pb, dy))):
        close(b, a, terms=n, msg=f"gradient {i}")
    save_adapters(fused, tmp_path / "out")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"))
    want = {f"unet.{k}": v for k, v in get_peft_model_state_dict(plain).items()}
    assert saved.keys() == want.keys()
    assert any(v.dim() == 4 for v in saved.values())
    for key in want:
        torch.testing.assert_close(saved[key].to(F64), want[key], rtol=0, atol=0)


def test_injected_conv_adapters_train_with_a_time_gate_and_round_trip(make_tiny_unet, tmp_path):
    unet = make_tiny_unet()
    cfg = AdapterConfig(r=4, lora_alpha=4, target_modules=["to_k", "proj_in", "conv2"],
                        gate=GateConfig(kind="rank_prefix", r_min=1, r_max=4))
    paths = inject_adapters(unet, cfg)
    layers = dict(gated_layers(unet))
    assert any(isinstance(layers[p], GatedLoRAConv2d) for p in paths if p.endswith("conv2"))
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    x, t, c = _inputs(torch.float32)
    y = unet(x, t, encoder_hidden_states=c).sample
    with adapters_disabled(unet):
        ref = unet(x, t, encoder_hidden_states=c).sample
    assert (y - ref).abs().max() > 1e-3
    (y - ref).square().mean().backward()
    conv_grads = [p.grad for n, p in unet.named_parameters() if "conv2.lora_A" in n]
    assert conv_grads and all(g is not None and g.abs().sum() > 0 for g in conv_grads)
    save_adapters(unet, tmp_path / "ad")
    fresh = make_tiny_unet()
    load_adapters(fresh, tmp_path / "ad")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t, encoder_hidden_states=c).sample, y.detach(), rtol=1e-5, atol=1e-5)
    assert sum(isinstance(m, GatedLoRAConv2d) for _, m in gated_layers(fresh)) == sum(
        isinstance(m, GatedLoRAConv2d) for m in layers.values())


def test_diffusers_loads_the_conv_adapter_file_as_plain_lora(make_tiny_unet, tmp_path):
    unet = make_tiny_unet()
    inject_adapters(unet, AdapterConfig(r=2, lora_alpha=4, target_modules=["conv1", "proj_out"],
                                        gate=GateConfig(kind="constant")))
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    save_adapters(unet, tmp_path / "ad")
    other = make_tiny_unet()
    other.load_lora_adapter(str(tmp_path / "ad"), weight_name="pytorch_lora_weights.safetensors", prefix="unet")
    x, t, c = _inputs(torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(other(x, t, encoder_hidden_states=c).sample,
                                   unet(x, t, encoder_hidden_states=c).sample, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_pointwise_conv_runs_as_the_gated_linear_op(backend, channels_last, monkeypatch):
    """1x1 convolutions (SD 1.5's proj_in/proj_out) go through gated_lora_linear on the
    pixel view: the Triton kernel (interpreter here) or the PyTorch path, float64-exact
    up to fp32 rounding, gradients included, channels_last-strided output."""
    pytest.importorskip("triton")
    import apo_fast.ops.gated_lora.op as gl

    calls = []
    real = gl.gated_lora_forward
    monkeypatch.setattr(gl, "gated_lora_forward", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    conv = nn.Conv2d(6, 10, 1).requires_grad_(False)
    layer = _layer(conv)
    layer.backend = backend
    assert layer.pointwise and not GatedLoRAConv2d(nn.Conv2d(6, 10, 3, padding=1)).pointwise
    gate = torch.rand(2, 3, requires_grad=True)
    layer.gate_state = _FixedGate(gate)
    x = torch.randn(2, 6, 5, 7)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    y = layer(x)
    assert bool(calls) == (backend == "triton") and (not calls or calls[0] == (2 * 5 * 7, 6))
    assert y.shape == (2, 10, 5, 7) and y.is_contiguous(memory_format=torch.channels_last)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    leaves64 = [t.detach().double().requires_grad_() for t in (x, A, B, gate)]
    conv64 = copy.deepcopy(conv).double()
    want = _formula(leaves64[0], conv64, leaves64[1], leaves64[2], leaves64[3], layer.scaling["default"])
    torch.testing.assert_close(y.double(), want, rtol=2e-5, atol=2e-5)
    dy = torch.randn_like(want)
    got = torch.autograd.grad(y, (x, A, B, gate), dy.float())
    expect = torch.autograd.grad(want, leaves64, dy)
    for name, g, e in zip(("dx", "dA", "dB", "dgate"), got, expect):
        assert g.shape == e.shape, name
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-4 * e.abs().max().item(), msg=name)
