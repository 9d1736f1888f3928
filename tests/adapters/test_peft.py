"""convert_peft_to_gated: a peft-LoRA UNet swapped for the fused gated layers behaves exactly as before."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from apo_fast.adapters import (
    AdapterConfig,
    GateConfig,
    GatedLoRALinear,
    convert_peft_to_gated,
    gated_layers,
    inject_adapters,
    save_adapters,
)

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
from peft import LoraConfig  # noqa: E402
from peft.tuners.lora import Linear as PeftLoraLinear  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

F64 = torch.float64
TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # as in diffusers' train_diffusion_dpo.py
# float64 agreement: peft computes base + (B A x) * s, apo-fast base + B (s A x) (other rounding);
# the bound is derived from the computation (conftest.assert_close_f64 / f64_terms), not picked.


@pytest.fixture(scope="module")
def peft_unet_f64(make_peft_unet):
    """A UNet with peft LoRA added the way train_diffusion_dpo.py does, B made non-zero."""
    return make_peft_unet(TARGETS)


def pair(peft_unet, gate=None):
    """(unconverted copy, converted copy)."""
    plain = copy.deepcopy(peft_unet)
    fused = copy.deepcopy(peft_unet)
    count = convert_peft_to_gated(fused, gate)
    assert count == 32
    return plain, fused


def inputs(batch=2, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g).to(dtype)
    c = torch.randn(batch, 5, 32, generator=g).to(dtype)
    t = torch.tensor([20, 880][:batch] + [500] * max(0, batch - 2))
    return x, t, c


def run(unet, x, t, c):
    return unet(x, t, c).sample


def lora_grads(unet):
    return {n: p.grad.clone() for n, p in unet.named_parameters() if "lora_" in n and p.grad is not None}


def test_converted_equals_peft_outputs_grads_names_and_parameters(peft_unet_f64, f64_close):
    plain, fused = pair(peft_unet_f64)
    assert not any(isinstance(m, PeftLoraLinear) for m in fused.modules())
    assert all(isinstance(m, GatedLoRALinear) for m in fused.modules() if isinstance(m, peft.tuners.lora.LoraLayer))
    assert [n for n, _ in fused.named_modules()] == [n for n, _ in plain.named_modules()]
    assert list(fused.state_dict()) == list(plain.state_dict())
    assert [(n, p.requires_grad) for n, p in fused.named_parameters()] == [
        (n, p.requires_grad) for n, p in plain.named_parameters()
    ]
    # the swap keeps the very parameter objects (optimizers built earlier keep working)
    unet = copy.deepcopy(peft_unet_f64)
    before = {n: p for n, p in unet.named_parameters()}
    convert_peft_to_gated(unet)
    assert all(before[n] is p for n, p in unet.named_parameters())

    x, t, c = inputs()
    close, terms = f64_close
    n = terms(plain, tokens=x.shape[0] * x.shape[-2] * x.shape[-1])
    y_plain, y_fused, g_plain, g_fused = outputs_and_grads(plain, fused, x, t, c)
    close(y_fused, y_plain, terms=n, msg="output")
    assert g_plain.keys() == g_fused.keys() and len(g_plain) == 64
    for name in g_plain:
        close(g_fused[name], g_plain[name], terms=n, msg=name)


def outputs_and_grads(plain, fused, x, t, c):
    """Both models' outputs and LoRA gradients for one weighted-sum loss."""
    y_plain, y_fused = run(plain, x, t, c), run(fused, x, t, c)
    weight = torch.randn(y_plain.shape, generator=torch.Generator().manual_seed(99), dtype=y_plain.dtype)
    (y_plain * weight).sum().backward()
    (y_fused * weight).sum().backward()
    return y_plain.detach(), y_fused.detach(), lora_grads(plain), lora_grads(fused)


def test_the_derived_bound_catches_a_scaling_off_by_1e6(peft_unet_f64, f64_close):
    """The bound is tight enough to see a wrong implementation: the fused layers' scaling
    multiplied by (1 + 1e-6) fails both the output and every lora_A/lora_B gradient check."""
    close, terms = f64_close
    plain, fused = pair(peft_unet_f64)
    for m in fused.modules():
        if isinstance(m, GatedLoRALinear):
            m.scaling["default"] *= 1 + 1e-6
    x, t, c = inputs()
    n = terms(plain, tokens=x.shape[0] * x.shape[-2] * x.shape[-1])
    y_plain, y_fused, g_plain, g_fused = outputs_and_grads(plain, fused, x, t, c)
    with pytest.raises(AssertionError, match="bound"):
        close(y_fused, y_plain, terms=n, msg="output")
    for name in g_plain:
        with pytest.raises(AssertionError, match="bound"):
            close(g_fused[name], g_plain[name], terms=n, msg=name)


def test_enable_disable_and_scaling_changes_keep_working(peft_unet_f64, f64_close):
    from diffusers.utils import scale_lora_layers, unscale_lora_layers

    plain, fused = pair(peft_unet_f64)
    x, t, c = inputs(seed=1)
    close, terms = f64_close
    n = terms(plain)

    def both():
        with torch.no_grad():
            return run(plain, x, t, c), run(fused, x, t, c)

    for model in (plain, fused):
        model.disable_adapters()
    a, b = both()
    close(b, a, terms=n)
    base = copy.deepcopy(peft_unet_f64)
    base.unload_lora()
    with torch.no_grad():
        close(b, run(base, x, t, c), terms=n)
    for model in (plain, fused):
        model.enable_adapters()
    on_plain, on_fused = both()
    close(on_fused, on_plain, terms=n)
    assert (on_fused - b).abs().max() > 1e-2
    assert [p.requires_grad for n, p in fused.named_parameters() if "lora_" in n] == [
        p.requires_grad for n, p in plain.named_parameters() if "lora_" in n
    ]

    for model in (plain, fused):
        model.set_adapters("default", weights=0.3)
    a, b = both()
    close(b, a, terms=n)
    assert (b - on_fused).abs().max() > 1e-3
    for model in (plain, fused):
        model.set_adapters("default", weights=1.0)
        scale_lora_layers(model, 2.5)
    a, b = both()
    close(b, a, terms=n)
    for model in (plain, fused):
        unscale_lora_layers(model, 2.5)
    a, b = both()
    close(b, on_fused, terms=n)
    # fuse / unfuse (merging is exact LoRA algebra for the constant gate)
    for model in (plain, fused):
        model.fuse_lora()
    a, b = both()
    close(b, a, terms=n)
    for model in (plain, fused):
        model.unfuse_lora()
    a, b = both()
    close(b, on_fused, terms=n)


def test_saving_paths_give_the_same_file(peft_unet_f64, tmp_path):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.utils import convert_state_dict_to_diffusers
    from safetensors.torch import load_file

    plain, fused = pair(peft_unet_f64)
    sd_plain, sd_fused = get_peft_model_state_dict(plain), get_peft_model_state_dict(fused)
    assert sd_plain.keys() == sd_fused.keys() and len(sd_plain) == 64
    assert all(torch.equal(sd_plain[k], sd_fused[k]) for k in sd_plain)
    # the save call of train_diffusion_dpo.py
    for name, model in (("plain", plain), ("fused", fused)):
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
        StableDiffusionLoraLoaderMixin.save_lora_weights(save_directory=str(tmp_path / name), unet_lora_layers=layers)
    a = load_file(tmp_path / "plain" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "fused" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # our save path writes the same tensors under peft's keys (what unet.save_lora_adapter writes), "unet."-prefixed
    save_adapters(fused, tmp_path / "ours")
    ours = load_file(tmp_path / "ours" / "pytorch_lora_weights.safetensors")
    assert ours.keys() == {f"unet.{k}" for k in sd_plain}
    assert all(torch.equal(ours[f"unet.{k}"], v) for k, v in sd_plain.items())


def test_lora_dropout_and_two_active_adapters_match_peft(make_tiny_unet, f64_close):
    unet = make_tiny_unet().to(F64)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, lora_dropout=0.25, target_modules=["to_q", "to_v"]), "a")
    unet.add_adapter(LoraConfig(r=2, lora_alpha=6, target_modules=["to_q", "to_k"]), "b")
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    unet.set_adapters(["a", "b"], weights=[1.0, 0.5])
    plain, fused = copy.deepcopy(unet), copy.deepcopy(unet)
    assert convert_peft_to_gated(fused) == 24
    plain.train()
    fused.train()
    x, t, c = inputs(seed=2)
    close, terms = f64_close
    n = terms(plain, tokens=x.shape[0] * x.shape[-2] * x.shape[-1])
    torch.manual_seed(11)
    y_plain = run(plain, x, t, c)
    torch.manual_seed(11)
    y_fused = run(fused, x, t, c)  # same dropout masks: same RNG draws in the same order
    close(y_fused, y_plain, terms=n)
    y_plain.square().sum().backward()
    y_fused.square().sum().backward()
    g_plain, g_fused = lora_grads(plain), lora_grads(fused)
    assert g_plain.keys() == g_fused.keys() and g_plain
    for name in g_plain:
        close(g_fused[name], g_plain[name], terms=n, msg=name)


def test_gate_on_converted_model_equals_injected_model(peft_unet_f64, f64_close):
    gate = GateConfig(kind="rank_prefix", r_min=1)
    _, fused = pair(peft_unet_f64, gate)
    injected = copy.deepcopy(peft_unet_f64)
    injected.unload_lora()
    inject_adapters(injected, AdapterConfig(r=4, lora_alpha=8, target_modules=tuple(TARGETS), gate=gate))
    fused_layers = dict(gated_layers(fused))
    with torch.no_grad():
        for path, layer in gated_layers(injected):
            for part in ("lora_A", "lora_B"):
                getattr(layer, part)["default"].weight.copy_(getattr(fused_layers[path], part)["default"].weight)
    x, t, c = inputs(batch=3, seed=3)
    close, terms = f64_close
    n = terms(injected)
    with torch.no_grad():
        y_fused, y_injected = run(fused, x, t, c), run(injected, x, t, c)
        constant = run(peft_unet_f64, x, t, c)
    close(y_fused, y_injected, terms=n)
    assert (y_fused - constant).abs().max() > 1e-3, "the gate changes the output"
    layer = next(iter(fused_layers.values()))
    with pytest.raises(ValueError, match="cannot merge"):
        layer.merge()


def test_peft_model_disable_adapter_context(f64_close):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(6, 8)
            self.fc2 = nn.Linear(8, 3)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    torch.manual_seed(5)
    base = Net().to(F64)
    model = peft.get_peft_model(copy.deepcopy(base), LoraConfig(r=3, lora_alpha=5, target_modules=["fc1", "fc2"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    reference = copy.deepcopy(model)
    assert convert_peft_to_gated(model) == 2
    x = torch.randn(4, 6, dtype=F64)
    close, terms = f64_close
    n = terms(reference)
    with torch.no_grad():
        close(model(x), reference(x), terms=n)
    with model.disable_adapter(), torch.no_grad():
        close(model(x), base(x), terms=n)
    with torch.no_grad():
        close(model(x), reference(x), terms=n)
    merged = model.merge_and_unload()
    with torch.no_grad():
        close(merged(x), reference(x), terms=n)
    assert not any(isinstance(m, GatedLoRALinear) for m in merged.modules())


def test_conversion_errors(peft_unet_f64, make_tiny_unet):
    with pytest.raises(ValueError, match="no peft LoRA"):
        convert_peft_to_gated(make_tiny_unet())
    _, fused = pair(peft_unet_f64)
    with pytest.raises(ValueError, match="already has time-gated"):
        convert_peft_to_gated(fused)
    dora = nn.Sequential(nn.Linear(4, 4))
    dora = peft.get_peft_model(dora, LoraConfig(r=2, target_modules=["0"], use_dora=True))
    with pytest.raises(ValueError, match="variants"):
        convert_peft_to_gated(dora)
    assert any(isinstance(m, PeftLoraLinear) for m in dora.modules()), "a refused conversion changes nothing"
    with pytest.raises(ValueError, match="r_max"):
        convert_peft_to_gated(copy.deepcopy(peft_unet_f64), GateConfig(r_max=8))
    with pytest.raises(TypeError, match="timestep"):
        wrapped = peft.get_peft_model(nn.Sequential(nn.Linear(4, 4)), LoraConfig(r=2, target_modules=["0"]))
        convert_peft_to_gated(wrapped, GateConfig())
