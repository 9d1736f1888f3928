"""Time-gated adapters (TACA): gates, layer vs peft, injection, timesteps, checkpointing, save/load."""
from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch
import torch.nn as nn

from apo_fast.adapters import (
    DEFAULT_TARGET_MODULES,
    GATE_WEIGHT_NAME,
    LORA_WEIGHT_NAME,
    AdapterConfig,
    GateConfig,
    GatedLoRALinear,
    LearnedGate,
    adapter_parameters,
    adapters_disabled,
    build_gate,
    freeze_base,
    gated_layers,
    get_gate_state,
    inject_adapters,
    load_adapters,
    rank_prefix_lengths,
    read_adapter_metadata,
    save_adapters,
    set_adapters_enabled,
)

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

F64 = torch.float64


@pytest.fixture(scope="module")
def base_unet(make_tiny_unet):
    return make_tiny_unet().eval()


def randomize_lora_B(model, std=0.5):
    """peft init leaves B = 0 (adapter is a no-op); tests need a visible adapter."""
    with torch.no_grad():
        for _, layer in gated_layers(model):
            for lin in layer.lora_B.values():
                lin.weight.normal_(0, std)


def unet_inputs(batch, dtype=torch.float32, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=g).to(dtype)
    c = torch.randn(batch, 5, 32, generator=g).to(dtype)
    return x, c


def injected(base_unet, dtype=torch.float32, **config):
    unet = copy.deepcopy(base_unet).to(dtype)
    names = inject_adapters(unet, AdapterConfig(**config))
    randomize_lora_B(unet)
    return unet, names


# --------------------------------------------------------------------------- gates
def test_gate_config_validation():
    with pytest.raises(ValueError, match="kind"):
        GateConfig(kind="cosine")
    with pytest.raises(ValueError, match="r_min"):
        GateConfig(r_min=5, r_max=4)
    with pytest.raises(ValueError, match="temperature"):
        GateConfig(temperature=0.0)
    with pytest.raises(ValueError, match="embedding_dim"):
        GateConfig(embedding_dim=7)
    with pytest.raises(ValueError, match="num_train_timesteps"):
        GateConfig(num_train_timesteps=0)
    with pytest.raises(ValueError, match="unknown gate config keys"):
        GateConfig.from_dict({"kind": "constant", "rmin": 1})
    with pytest.raises(ValueError, match="r_max"):
        GateConfig(r_max=8).rank_range(4)
    assert GateConfig.from_dict(GateConfig(kind="sigmoid", r_min=2).to_dict()) == GateConfig(kind="sigmoid", r_min=2)
    assert GateConfig().rank_range(8) == (6, 8)  # defaults: r_max = r, r_min = max(1, 3 r // 4)
    assert GateConfig().rank_range(4) == (3, 4) and GateConfig().rank_range(1) == (1, 1)
    assert GateConfig().rank_range(3) == (2, 3)
    with pytest.raises(ValueError, match="lora_alpha"):
        AdapterConfig(lora_alpha=-1)
    with pytest.raises(ValueError, match="target_modules"):
        AdapterConfig(target_modules=())
    with pytest.raises(ValueError, match="r_max"):
        AdapterConfig(r=4, gate=GateConfig(r_max=6))
    assert AdapterConfig.from_dict({"r": 8, "gate": {"kind": "constant"}}).gate == GateConfig(kind="constant")


@pytest.mark.parametrize("r_min,r_max,T", [(2, 8, 1000), (1, 5, 7), (3, 3, 50), (1, 16, 1000)])
def test_rank_prefix_lengths_match_formula(r_min, r_max, T):
    t_int = torch.arange(0, T + 1)
    got = rank_prefix_lengths(t_int, r_min, r_max, T)
    want = torch.tensor([math.floor(r_min + (r_max - r_min) * (T - t) / T + 1e-12) for t in range(T + 1)])
    assert torch.equal(got, want)
    assert got[0] == r_max and got[-1] == r_min
    assert torch.all(got[1:] <= got[:-1]), "active dims must not grow with noise"
    t_float = torch.linspace(0, T, 37, dtype=torch.float32)
    got_f = rank_prefix_lengths(t_float, r_min, r_max, T)
    want_f = torch.tensor([math.floor(r_min + (r_max - r_min) * (T - float(t)) / T) for t in t_float.double()])
    assert torch.equal(got_f, want_f)


def test_rank_prefix_gate_rows_are_prefixes():
    gate = build_gate(GateConfig(kind="rank_prefix", r_min=2, num_train_timesteps=1000), max_rank=8)
    t = torch.tensor([0, 125, 500, 874, 875, 999, 1000])
    k = gate(t, 8)
    assert k.shape == (7, 8) and k.dtype == torch.float32
    n = torch.tensor([8, 7, 5, 2, 2, 2, 2])  # floor(2 + 6 (1000 - t) / 1000)
    assert torch.equal(k.sum(1).long(), n)
    for row, count in zip(k, n):
        assert torch.equal(row, (torch.arange(8) < count).float())
    # the rank can be smaller than r_max only if r_max is unset: then r_max = rank
    assert torch.equal(gate(torch.tensor([0]), 4).sum(), torch.tensor(4.0))


def test_constant_gate_is_ones_and_marked_constant():
    gate = build_gate(GateConfig(kind="constant"), max_rank=6)
    assert gate.is_constant
    assert torch.equal(gate(torch.tensor([0, 500, 999]), 6), torch.ones(3, 6))


def test_sigmoid_gate_shape_monotone_and_limit():
    cfg = GateConfig(kind="sigmoid", r_min=1, r_max=8, temperature=0.7)
    gate = build_gate(cfg, 8)
    t = torch.linspace(0, 1000, 41)
    k = gate(t, 8)
    assert k.shape == (41, 8) and torch.all((k > 0) & (k < 1))
    assert torch.all(k[:, 1:] <= k[:, :-1]), "later rank dims open later"
    assert torch.all(k[1:] <= k[:-1] + 1e-7), "gates close as noise grows"
    # half-open where n_c(t) = j + 0.5: n_c = 1 + 7 (1000 - t) / 1000 = 4.5 -> t = 500, j = 4
    assert torch.allclose(gate(torch.tensor([500.0]), 8)[0, 4], torch.tensor(0.5))
    sharp = build_gate(GateConfig(kind="sigmoid", r_min=1, r_max=8, temperature=1e-3), 8)
    t_int = torch.tensor([0, 100, 333, 600, 999])
    n_c = 1 + 7 * (1000 - t_int.double()) / 1000
    hard = (torch.arange(8)[None, :] < torch.round(n_c)[:, None]).float()
    assert torch.allclose(sharp(t_int, 8), hard, atol=1e-6)


def test_learned_gate_starts_at_sigmoid_prefix_and_trains():
    cfg = GateConfig(kind="learned", r_min=2, r_max=8, temperature=0.25, hidden_size=16, embedding_dim=8)
    gate = build_gate(cfg, 8)
    assert isinstance(gate, LearnedGate)
    t = torch.tensor([0, 250, 500, 750, 999])
    k = gate(t, 8)
    sig = build_gate(GateConfig(kind="sigmoid", r_min=2, r_max=8, temperature=0.25), 8)(t, 8)
    assert torch.equal(k, sig)
    t_all = torch.arange(0, 1001, 7)
    prefix = build_gate(GateConfig(kind="rank_prefix", r_min=2, r_max=8), 8)(t_all, 8)
    k_all = gate(t_all, 8).detach()
    # near the rank-prefix default: the soft count is n_c(t) (the hard prefix floors it), the
    # gates are thresholds-equal to the hard prefix up to one edge dim, and close on average
    n_c = 2 + 6 * (1000 - t_all.double()) / 1000
    torch.testing.assert_close(k_all.double().sum(1), n_c, rtol=0, atol=0.13)  # edge dims: sigmoid(2) = 0.88
    assert ((k_all > 0.5).sum(1) - prefix.sum(1)).abs().max() <= 1
    assert (k_all - prefix).abs().mean() < 0.1
    k.sum().backward()
    assert all(p.grad is not None for p in gate.parameters())
    assert gate.mlp[2].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="r_max"):
        gate(t, 4)  # r_max 8 > rank 4
    open_ended = build_gate(GateConfig(kind="learned", hidden_size=4, embedding_dim=4), 8)
    assert open_ended(t, 4).shape == (5, 4)  # r_max unset: each rank gets its own schedule
    with pytest.raises(ValueError, match="max_rank"):
        open_ended(t, 9)


# --------------------------------------------------------------------------- the layer
def _peft_linear(base: nn.Linear, r: int, alpha: float):
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLoraLinear

    return PeftLoraLinear(base, "default", config=LoraConfig(r=r, lora_alpha=alpha), r=r, lora_alpha=alpha)


@pytest.mark.parametrize("x_shape", [(3, 5, 13), (4, 13), (2, 3, 2, 13)])
def test_constant_gate_layer_matches_peft_layer_float64(x_shape, f64_close):
    in_f, out_f, r, alpha = 13, 7, 3, 5.0
    base = nn.Linear(in_f, out_f).to(F64)
    ours = GatedLoRALinear(copy.deepcopy(base), r=r, lora_alpha=alpha)
    theirs = _peft_linear(copy.deepcopy(base), r, alpha)
    with torch.no_grad():
        for name in ("lora_A", "lora_B"):
            w = torch.randn_like(getattr(ours, name)["default"].weight)
            getattr(ours, name)["default"].weight.copy_(w)
            getattr(theirs, name)["default"].weight.copy_(w)
    assert ours.scaling["default"] == theirs.scaling["default"] == alpha / r
    x = torch.randn(*x_shape, dtype=F64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ours(x1), theirs(x2)
    close, terms = f64_close
    n = terms(theirs, tokens=x.numel() // in_f)
    close(y1.detach(), y2.detach(), terms=n, msg="y")
    grad_out = torch.randn_like(y1)
    y1.backward(grad_out)
    y2.backward(grad_out)
    close(x1.grad, x2.grad, terms=n, msg="dx")
    for name in ("lora_A", "lora_B"):
        close(getattr(ours, name)["default"].weight.grad, getattr(theirs, name)["default"].weight.grad,
              terms=n, msg=name)
    # same state-dict layout as peft
    assert set(ours.state_dict()) == set(theirs.state_dict())


def test_layer_init_like_peft_and_validation():
    base = nn.Linear(20, 10)
    layer = GatedLoRALinear(base, r=4, lora_alpha=8)
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    bound = 1 / math.sqrt(20)  # kaiming_uniform(a=sqrt(5)) on fan_in 20
    assert layer.lora_A["default"].weight.abs().max() <= bound
    assert layer.lora_A["default"].weight.std() > bound / 4
    x = torch.randn(2, 3, 20)
    assert torch.equal(layer(x), base(x)), "B = 0: the adapter starts as a no-op"
    with pytest.raises(ValueError, match="r must be"):
        GatedLoRALinear(nn.Linear(3, 3), r=0)
    with pytest.raises(TypeError, match="nn.Linear"):
        GatedLoRALinear(nn.Conv2d(3, 3, 1))
    with pytest.raises(TypeError, match="only the input"):
        layer(x, scale=1.0)


class _TimedMLP(nn.Module):
    """Smallest 'any module with a forward taking timestep': two linears over tokens."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 9)
        self.out = nn.Linear(9, 5)

    def forward(self, sample, timestep, scale=1.0):
        return self.out(torch.tanh(self.proj(sample))) * scale


@pytest.mark.parametrize("kind", ["rank_prefix", "sigmoid", "learned"])
def test_generic_module_per_sample_gate_matches_formula_float64(kind, f64_close):
    torch.manual_seed(3)
    model = _TimedMLP().to(F64)
    ref = copy.deepcopy(model)
    gate_cfg = GateConfig(kind=kind, r_min=1, num_train_timesteps=100, hidden_size=8, embedding_dim=4)
    inject_adapters(model, AdapterConfig(r=5, lora_alpha=3.0, target_modules=("proj", "out"), gate=gate_cfg))
    model.to(F64)
    randomize_lora_B(model)
    if kind == "learned":
        with torch.no_grad():
            for p in model.taca_gate.parameters():
                p.normal_(0, 0.3)
    x = torch.randn(4, 3, 6, dtype=F64)
    t = torch.tensor([0, 33, 67, 100])
    y = model(x, t)
    # float64 formula, one sample at a time
    gate = model.taca_gate
    k = gate(t, 5).to(F64)

    def gated(lin, xin, k_i):
        A = lin.lora_A["default"].weight
        B = lin.lora_B["default"].weight
        return lin.base_layer(xin) + 0.6 * ((xin @ A.T) * k_i) @ B.T

    outs = [gated(model.out, torch.tanh(gated(model.proj, x[i], k[i])), k[i]) for i in range(4)]
    close, terms = f64_close
    n = terms(model)
    close(y.detach(), torch.stack(outs).detach(), terms=n, msg="formula")
    # per-sample batch == separate calls, and the base model is untouched when disabled
    separate = torch.cat([model(x[i : i + 1], t[i : i + 1]) for i in range(4)])
    close(y.detach(), separate.detach(), terms=n, msg="separate calls")
    with adapters_disabled(model):
        assert torch.equal(model(x, t), ref(x, t))
    # keyword timestep and scalar timestep
    torch.testing.assert_close(model(sample=x, timestep=t), y, rtol=0, atol=0)
    close(model(x, 33).detach(), torch.cat([model(x[i : i + 1], torch.tensor([33])) for i in range(4)]).detach(),
          terms=n, msg="scalar timestep")


def _autograd_names(fn, depth=3):
    names = []
    frontier = [fn]
    for _ in range(depth):
        frontier = [f for f in frontier if f is not None]
        names += [type(f).__name__ for f in frontier]
        frontier = [g for f in frontier for g, _ in f.next_functions]
    return names


@pytest.mark.parametrize("kind", ["rank_prefix", "learned"])
def test_layer_runs_the_fused_triton_path_like_the_float64_reference(kind):
    """The layer hands its gate to the op's Triton kernels (interpreter on CPU)."""
    torch.manual_seed(4)
    gate_cfg = GateConfig(kind=kind, r_min=1, num_train_timesteps=100, hidden_size=8, embedding_dim=4)
    models = {}
    for backend in ("triton", "torch"):
        model = _TimedMLP()
        inject_adapters(model, AdapterConfig(r=5, lora_alpha=3.0, target_modules=("proj", "out"), gate=gate_cfg,
                                             backend=backend))
        models[backend] = model
    models["torch"].load_state_dict(models["triton"].state_dict())
    randomize_lora_B(models["triton"])
    with torch.no_grad():
        for p in getattr(models["triton"], "taca_gate", nn.Identity()).parameters():
            p.normal_(0, 0.3)
    models["torch"].load_state_dict(models["triton"].state_dict())
    reference = copy.deepcopy(models["torch"]).to(F64)
    for model in models.values():
        freeze_base(model)  # the kernels serve a frozen base layer
    freeze_base(reference)
    x = torch.randn(3, 7, 6)
    t = torch.tensor([0, 50, 100])
    results = {}
    for name, model in {**models, "reference": reference}.items():
        xin = (x.to(F64) if name == "reference" else x.clone()).requires_grad_()
        seen = []
        hook = model.proj.register_forward_hook(lambda m, a, y: seen.append(_autograd_names(y.grad_fn)))
        out = model(xin, t)
        hook.remove()
        assert any("apo_fast_gated_lora_linear" in n for n in seen[0]) == (name == "triton"), seen
        out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape).to(out.dtype))
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results[name] = (out, xin.grad, grads)
    ref_out, ref_dx, ref_grads = results["reference"]
    for name in ("triton", "torch"):
        out, dx, grads = results[name]
        torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(dx.double(), ref_dx, rtol=1e-4, atol=1e-5)
        assert grads.keys() == ref_grads.keys()
        for key in grads:
            torch.testing.assert_close(grads[key].double(), ref_grads[key], rtol=1e-4, atol=1e-5, msg=key)


def test_timestep_errors_and_layer_outside_forward(base_unet):
    unet, _ = injected(base_unet)
    x, c = unet_inputs(3)
    with pytest.raises(ValueError, match="timestep must be a scalar or of shape"):
        unet(x, torch.tensor([1, 2]), c)
    with pytest.raises(TypeError, match="timestep"):
        unet(x, "5", c)
    layer = gated_layers(unet)[0][1]
    with pytest.raises(RuntimeError, match="outside a forward"):
        layer(torch.randn(3, 4, layer.in_features))
    # a failed call leaves no gate behind: the next call works
    unet(x, torch.tensor([1, 2, 3]), c)
    assert not get_gate_state(unet)._stack


# --------------------------------------------------------------------------- injection
def test_injection_targets_exactly_the_named_modules(base_unet):
    expected = [
        n for n, m in base_unet.named_modules()
        if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in DEFAULT_TARGET_MODULES)
    ]
    unet, names = injected(base_unet)
    assert names == expected and len(names) == 32
    assert [n for n, _ in gated_layers(unet)] == expected
    base_keys = set(base_unet.state_dict())
    keys = set(unet.state_dict())
    lora_keys = {k for k in keys if ".lora_A." in k or ".lora_B." in k}
    assert len(lora_keys) == 2 * len(names)
    moved = {k.replace(".base_layer.", ".") for k in keys - lora_keys}
    assert moved == base_keys, "every base weight is kept, under peft's base_layer name"
    # to_out.1 (Dropout), proj_in/out, ff layers are untouched
    assert not isinstance(unet.get_submodule(names[0].replace("to_q", "to_out.1")), GatedLoRALinear)
    assert isinstance(unet.down_blocks[0].attentions[0].proj_in, nn.Linear | nn.Conv2d)
    with pytest.raises(ValueError, match="already has"):
        inject_adapters(unet, AdapterConfig())
    with pytest.raises(ValueError, match="no module"):
        inject_adapters(copy.deepcopy(base_unet), AdapterConfig(target_modules=("to_qq",)))
    with pytest.raises(TypeError, match="only nn.Linear"):
        inject_adapters(copy.deepcopy(base_unet), AdapterConfig(target_modules=("to_out",)))
    with pytest.raises(TypeError, match=r"must take \(sample, timestep"):
        inject_adapters(nn.Sequential(nn.Linear(3, 3)), AdapterConfig(target_modules=("0",)))
    # the constant gate needs no timestep
    seq = nn.Sequential(nn.Linear(3, 3))
    inject_adapters(seq, AdapterConfig(target_modules=("0",), gate=GateConfig(kind="constant")))
    assert seq(torch.randn(2, 3)).shape == (2, 3)


def test_freeze_base_and_adapter_parameters(base_unet):
    unet, names = injected(base_unet, gate=GateConfig(kind="learned", hidden_size=8, embedding_dim=8))
    n_trainable = freeze_base(unet)
    params = adapter_parameters(unet)
    assert len(params) == 2 * len(names) + 4  # A, B per layer + the gate MLP's two linears
    assert {id(p) for p in params} == {id(p) for p in unet.parameters() if p.requires_grad}
    assert n_trainable == sum(p.numel() for p in params)
    gate_ids = {id(p) for p in unet.taca_gate.parameters()}
    assert gate_ids <= {id(p) for p in params}, "learned gate parameters are model parameters"
    assert {n for n, _ in unet.named_parameters() if n.startswith("taca_gate.")}


def test_disabled_adapters_equal_base_unet_exactly(base_unet):
    unet, _ = injected(base_unet)
    x, c = unet_inputs(3)
    t = torch.tensor([5, 500, 995])
    with torch.no_grad():
        base = base_unet(x, t, c).sample
        on = unet(x, t, c).sample
        with adapters_disabled(unet):
            off = unet(x, t, c).sample
        set_adapters_enabled(unet, False)
        off2 = unet(x, t, c).sample
        set_adapters_enabled(unet, True)
        on2 = unet(x, t, c).sample
    assert torch.equal(off, base) and torch.equal(off2, base)
    assert not torch.allclose(on, base, atol=1e-3), "the adapters must change the output"
    assert torch.equal(on, on2)
    assert all(p.requires_grad for p in adapter_parameters(unet)), "switching leaves requires_grad alone"


def test_per_sample_timesteps_reach_the_gates(base_unet, f64_close):
    unet, _ = injected(base_unet, dtype=F64, r=8, lora_alpha=8, gate=GateConfig(kind="rank_prefix", r_min=1))
    x, c = unet_inputs(3, F64)
    t = torch.tensor([0, 400, 999])
    with torch.no_grad():
        batched = unet(x, t, c).sample
        separate = torch.cat([unet(x[i : i + 1], t[i : i + 1], c[i : i + 1]).sample for i in range(3)])
        same_t = unet(x, torch.tensor([999, 999, 999]), c).sample
    close, terms = f64_close
    close(batched, separate, terms=terms(unet), msg="batched vs separate")
    close(batched[2], same_t[2], terms=terms(unet), msg="same t")
    assert (batched[0] - same_t[0]).abs().max() > 1e-3, "a sample's own t decides its gate"
    # a deep copy carries its own gate state, hooks and layers
    clone = copy.deepcopy(unet)
    assert get_gate_state(clone) is not get_gate_state(unet)
    assert all(layer.gate_state is get_gate_state(clone) for _, layer in gated_layers(clone))
    with torch.no_grad():
        assert torch.equal(clone(x, t, c).sample, batched)


def test_cfg_doubled_batch(base_unet):
    unet, _ = injected(base_unet, gate=GateConfig(kind="sigmoid"))
    x, c = unet_inputs(2, seed=4)
    uncond = torch.zeros_like(c)
    t = torch.tensor([100, 700])
    with torch.no_grad():
        both = unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, c])).sample
        u_part = unet(x, t, uncond).sample
        c_part = unet(x, t, c).sample
        scalar = unet(torch.cat([x, x]), 700, torch.cat([uncond, c])).sample
        c_700 = unet(x, torch.tensor([700, 700]), c).sample
    torch.testing.assert_close(both, torch.cat([u_part, c_part]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scalar[2:], c_700, rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_matches_and_recomputes_with_the_right_gate(base_unet, f64_close):
    unet, _ = injected(
        base_unet, dtype=F64, gate=GateConfig(kind="learned", hidden_size=8, embedding_dim=8)
    )
    with torch.no_grad():
        for p in unet.taca_gate.parameters():
            p.normal_(0, 0.3)
    freeze_base(unet)
    x, c = unet_inputs(2, F64, seed=5)
    t = torch.tensor([50, 950])

    def run():
        unet.zero_grad(set_to_none=True)
        out = unet(x, t, c).sample
        with torch.no_grad(), adapters_disabled(unet):  # a reference pass in between, as in APO
            unet(x, torch.tensor([500, 500]), c)
        (out * torch.linspace(-1, 1, out.numel(), dtype=F64).reshape(out.shape)).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}

    out_plain, grads_plain = run()
    unet.enable_gradient_checkpointing()
    unet.train()
    state = get_gate_state(unet)
    calls = []
    original = state._gate_for_recompute
    state._gate_for_recompute = lambda rank: calls.append(rank) or original(rank)
    out_ckpt, grads_ckpt = run()
    assert calls, "checkpointed blocks must have been recomputed during backward"
    close, terms = f64_close
    n = terms(unet, tokens=x.shape[0] * x.shape[-2] * x.shape[-1])
    close(out_ckpt, out_plain, terms=n, msg="output")
    assert grads_plain.keys() == grads_ckpt.keys() and any(k.startswith("taca_gate") for k in grads_ckpt)
    for name in grads_plain:
        close(grads_ckpt[name], grads_plain[name], terms=n, msg=name)
    # two grad-enabled forwards with different gates, one backward: refuse to guess
    a = unet(x, t, c).sample
    b = unet(x, torch.tensor([999, 0]), c).sample
    with pytest.raises(RuntimeError, match="ambiguous"):
        (a.sum() + b.sum()).backward()


def test_triton_path_inside_checkpointed_unet(base_unet):
    """Fused kernels (interpreter) under gradient checkpointing: same grads as the torch path.

    One target layer keeps the interpreter time small.
    """
    target = (
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
        "up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_v",
    )
    gate = GateConfig(kind="learned", hidden_size=8, embedding_dim=8)
    models = {}
    for backend in ("triton", "torch"):
        models[backend], _ = injected(base_unet, target_modules=target, gate=gate, backend=backend)
    models["torch"].load_state_dict(models["triton"].state_dict())
    x, c = unet_inputs(2, seed=12)
    t = torch.tensor([10, 900])
    grads = {}
    for backend, unet in models.items():
        freeze_base(unet)
        unet.enable_gradient_checkpointing()
        unet.train()
        seen = []
        layer = unet.get_submodule(target[0])
        hook = layer.register_forward_hook(lambda m, a, y: seen.append(_autograd_names(y.grad_fn)))
        out = unet(x, t, c).sample
        out.square().mean().backward()
        hook.remove()
        assert len(seen) == 2, "forward, then the checkpoint recompute in backward"
        assert all(any("apo_fast_gated_lora_linear" in n for n in names) == (backend == "triton") for names in seen)
        grads[backend] = {n: p.grad for n, p in unet.named_parameters() if p.requires_grad}
    assert len(grads["torch"]) == 2 * len(target) + 4
    for name, ref in grads["torch"].items():
        torch.testing.assert_close(grads["triton"][name], ref, rtol=1e-4, atol=1e-6, msg=name)


def test_autocast_bf16_forward_backward(base_unet):
    unet, _ = injected(base_unet, gate=GateConfig(kind="rank_prefix"))
    freeze_base(unet)
    x, c = unet_inputs(2, seed=6)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        ref = unet(x, t, c).sample
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = unet(x, t, c).sample
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()
    out.float().square().mean().backward()
    for p in adapter_parameters(unet):
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()


# --------------------------------------------------------------------------- save / load
def test_save_load_round_trip_exact_with_learned_gate(base_unet, tmp_path):
    gate = GateConfig(kind="learned", r_min=2, hidden_size=8, embedding_dim=8)
    unet, names = injected(base_unet, r=4, lora_alpha=6, gate=gate)
    with torch.no_grad():
        for p in unet.taca_gate.parameters():
            p.normal_(0, 0.3)
    path = save_adapters(unet, tmp_path, metadata={"run": "unit-test"})
    assert path == tmp_path / LORA_WEIGHT_NAME and (tmp_path / GATE_WEIGHT_NAME).is_file()
    assert sorted(os.listdir(tmp_path)) == sorted([LORA_WEIGHT_NAME, GATE_WEIGHT_NAME]), "no temp files left"
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        header = f.metadata()
    assert keys == {f"unet.{n}.lora_{p}.weight" for n in names for p in "AB"}
    assert header["run"] == "unit-test" and header["format"] == "pt"
    lora_meta = json.loads(header["lora_adapter_metadata"])
    assert lora_meta["unet.r"] == 4 and lora_meta["unet.lora_alpha"] == 6
    assert sorted(lora_meta["unet.target_modules"]) == sorted(names)
    taca = read_adapter_metadata(tmp_path)
    assert GateConfig.from_dict(taca["gate"]) == gate and taca["adapter_config"]["r"] == 4

    fresh = copy.deepcopy(base_unet)
    config = load_adapters(fresh, tmp_path)
    assert config.gate == gate and config.r == 4 and config.alpha == 6
    x, c = unet_inputs(3, seed=7)
    t = torch.tensor([0, 480, 999])
    with torch.no_grad():
        assert torch.equal(fresh(x, t, c).sample, unet(x, t, c).sample)
    # loading into an already injected model with another gate restores the saved gate
    other, _ = injected(base_unet, r=4, lora_alpha=6, gate=GateConfig(kind="constant"))
    load_adapters(other, tmp_path)
    assert other.taca_gate.config == gate
    with torch.no_grad():
        assert torch.equal(other(x, t, c).sample, unet(x, t, c).sample)
    # mismatched layers are refused with the names
    few, _ = injected(base_unet, r=4, target_modules=("to_q",))
    with pytest.raises(ValueError, match="does not match"):
        load_adapters(few, tmp_path)
    # re-saving with a non-learned gate removes the stale gate file
    constant_unet, _ = injected(base_unet, gate=GateConfig(kind="constant"))
    save_adapters(constant_unet, tmp_path)
    assert not (tmp_path / GATE_WEIGHT_NAME).exists()
    with pytest.raises(ValueError, match="reserved"):
        save_adapters(unet, tmp_path, metadata={"format": "x"})


class _UnetOnlyPipeline:
    """The parts of a StableDiffusionPipeline that `load_lora_weights` touches (no text encoder)."""

    hf_device_map = None
    text_encoder = None
    lora_scale = 1.0

    def __init__(self, unet):
        self.unet = unet
        self.components = {"unet": unet}


def test_saved_file_loads_with_diffusers_lora_loader(base_unet, tmp_path):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    unet, _ = injected(base_unet, r=4, lora_alpha=8, gate=GateConfig(kind="constant"))
    save_adapters(unet, tmp_path)
    pipeline_cls = type("Pipe", (_UnetOnlyPipeline, StableDiffusionLoraLoaderMixin), {})
    fresh = copy.deepcopy(base_unet)
    pipeline_cls(fresh).load_lora_weights(str(tmp_path), adapter_name="default")
    assert fresh.peft_config["default"].lora_alpha == 8, "alpha restored from the file's metadata"
    fresh2 = copy.deepcopy(base_unet)
    fresh2.load_lora_adapter(str(tmp_path), prefix="unet", weight_name=LORA_WEIGHT_NAME)
    x, c = unet_inputs(2, seed=8)
    t = torch.tensor([30, 600])
    with torch.no_grad():
        ours = unet(x, t, c).sample
        theirs = fresh(x, t, c).sample
        theirs2 = fresh2(x, t, c).sample
        base = base_unet(x, t, c).sample
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs2, ours, rtol=1e-5, atol=1e-5)
    assert (ours - base).abs().max() > 1e-2


def test_plain_peft_lora_file_loads_as_constant_gate(base_unet, tmp_path):
    from peft import LoraConfig

    peft_unet = copy.deepcopy(base_unet)
    peft_unet.add_adapter(LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_v"], init_lora_weights="gaussian"))
    with torch.no_grad():
        for n, p in peft_unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    peft_unet.save_lora_adapter(str(tmp_path), adapter_name="default")
    fresh = copy.deepcopy(base_unet)
    config = load_adapters(fresh, tmp_path, prefix=None)
    assert config.gate.kind == "constant" and config.alpha == 2 and len(gated_layers(fresh)) == 16
    x, c = unet_inputs(2, seed=9)
    t = torch.tensor([1, 2])
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t, c).sample, peft_unet(x, t, c).sample, rtol=1e-5, atol=1e-5)
