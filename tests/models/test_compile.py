"""torch.compile of adapted UNets (apo_fast.models.compile): no graph breaks, compiled equals eager
(outputs and gradients, policy and reference pass), no recompiles between alternating passes.

Inductor compiles once per graph here (a minute or two on a cold cache); the recompile and
graph-break checks use the ``eager`` backend, which traces with Dynamo exactly as Inductor
does but skips code generation.
"""
from __future__ import annotations

import pytest
import torch

from apo_fast.adapters import (
    AdapterConfig,
    GateConfig,
    adapters_disabled,
    convert_peft_to_gated,
    freeze_base,
    inject_adapters,
)
from apo_fast.config.schema import CompileConfig
from apo_fast.models.compile import compile_kwargs, compiled_unet_call


def _adapted(make_tiny_unet, kind="sigmoid", backend=None):
    unet = make_tiny_unet()
    inject_adapters(unet, AdapterConfig(r=4, gate=GateConfig(kind=kind), backend=backend))
    freeze_base(unet)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)  # B = 0 at init would make every adapter gradient but dB vanish
    return unet


def _inputs(batch=2):
    torch.manual_seed(11)
    return torch.randn(batch, 4, 16, 16), torch.tensor([10, 900, 500][:batch]), torch.randn(batch, 3, 32)


def _passes(unet, call, x, t, ctx):
    """Policy pass (output, adapter gradients of a fixed random projection) and reference pass output."""
    for p in unet.parameters():
        p.grad = None
    y = call(x, t, {"encoder_hidden_states": ctx})
    torch.manual_seed(5)
    (y * torch.randn_like(y)).sum().backward()
    grads = {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}
    with torch.no_grad(), adapters_disabled(unet):
        ref = call(x, t, {"encoder_hidden_states": ctx})
    return y.detach(), grads, ref


def _plain(unet):
    return lambda x, t, kw: unet(x, t, **kw).sample


@pytest.mark.parametrize("kind", ["constant", "rank_prefix", "sigmoid", "learned"])
def test_an_adapted_unet_traces_as_one_graph_without_breaks(make_tiny_unet, kind):
    unet = _adapted(make_tiny_unet, kind)
    x, t, ctx = _inputs()
    explained = torch._dynamo.explain(lambda x, t, c: unet(x, t, encoder_hidden_states=c).sample)(x, t, ctx)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


def test_inductor_compiled_unet_equals_eager_policy_and_reference(make_tiny_unet, f64_close):
    """fullgraph Inductor on the CPU: outputs and every adapter gradient within the rounding
    bound of the computation, for the policy pass and the reference pass (adapters off)."""
    assert_close, terms_of = f64_close
    unet = _adapted(make_tiny_unet, "learned")
    x, t, ctx = _inputs()
    want = _passes(unet, _plain(unet), x, t, ctx)
    cfg = CompileConfig(enabled=True, fullgraph=True)
    got = _passes(unet, compiled_unet_call(unet, cfg, torch.device("cpu")), x, t, ctx)
    terms = terms_of(unet, tokens=x.shape[0] * 16 * 16)
    assert_close(got[0], want[0], terms=terms, msg="policy output")
    assert_close(got[2], want[2], terms=terms, msg="reference output")
    assert set(got[1]) == set(want[1]) and any("taca_gate" in n for n in want[1])
    for name in want[1]:
        assert_close(got[1][name], want[1][name], terms=terms, msg=f"grad {name}")
    assert (want[0] - want[2]).abs().max() > 1e-3  # the reference really ran without the adapters


def test_torch_compile_of_the_module_fullgraph_equals_eager(make_peft_unet, f64_close):
    """``torch.compile(unet, fullgraph=True)`` of a peft UNet converted to gated adapters (the
    drop-in path), float64: every frame traces whole, outputs and gradients as eager."""
    assert_close, terms_of = f64_close
    unet = make_peft_unet(["to_q", "to_k", "to_v", "to_out.0"])
    convert_peft_to_gated(unet, GateConfig(kind="sigmoid"))
    x, t, ctx = (v.double() if v.is_floating_point() else v for v in _inputs())
    want = _passes(unet, _plain(unet), x, t, ctx)
    compiled = torch.compile(unet, fullgraph=True, backend="aot_eager")
    got = _passes(unet, _plain(compiled), x, t, ctx)
    terms = terms_of(unet, tokens=x.shape[0] * 16 * 16)
    for a, b, what in ((got[0], want[0], "policy"), (got[2], want[2], "reference")):
        assert_close(a, b, terms=terms, msg=what)
    assert set(got[1]) == set(want[1]) and len(want[1]) > 0
    for name in want[1]:
        assert_close(got[1][name], want[1][name], terms=terms, msg=f"grad {name}")


@pytest.mark.parametrize("kind", ["constant", "sigmoid"])
def test_alternating_policy_and_reference_passes_do_not_recompile(make_tiny_unet, kind):
    """Ten alternating steps compile once per pass (grad mode): switching the adapters off is data."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    unet = _adapted(make_tiny_unet, kind)
    call = compiled_unet_call(unet, CompileConfig(enabled=True, backend="eager"), torch.device("cpu"))
    x, t, ctx = _inputs()
    outputs = []
    for step in range(10):
        outputs.append(_passes(unet, call, x, t, ctx))
        if step == 0:
            first = dict(counters["stats"])
    assert first["unique_graphs"] == 2, first  # one policy (grad) graph, one reference (no-grad) graph
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    assert sum(counters["recompiles"].values()) <= 1, dict(counters["recompiles"])  # the grad-mode entry
    assert all(torch.equal(o[2], outputs[0][2]) for o in outputs)


def test_adapters_on_and_off_in_one_grad_mode_share_one_graph(make_peft_unet):
    """Switching the adapters off is a value: six alternating calls under no_grad compile once
    (peft's disable_adapters() flag would be a guard and a second graph)."""
    from torch._dynamo.utils import counters

    unet = make_peft_unet(["to_q", "to_k", "to_v", "to_out.0"])
    convert_peft_to_gated(unet)
    torch._dynamo.reset()
    counters.clear()
    call = compiled_unet_call(unet, CompileConfig(enabled=True, backend="eager"), torch.device("cpu"))
    x, t, ctx = (v.double() if v.is_floating_point() else v for v in _inputs())
    outs = []
    with torch.no_grad():
        for step in range(6):
            if step % 2:
                with adapters_disabled(unet):
                    outs.append(call(x, t, {"encoder_hidden_states": ctx}))
            else:
                outs.append(call(x, t, {"encoder_hidden_states": ctx}))
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert torch.equal(outs[1], outs[3]) and torch.equal(outs[0], outs[2])
    assert (outs[0] - outs[1]).abs().max() > 1e-3  # off really is off


def test_the_triton_op_traces_into_a_compiled_graph(make_tiny_unet):
    """backend='triton' puts ``apo_fast::gated_lora_linear`` in the UNet's traced graph without a
    break; compiled on the CPU it decomposes into the reference, which matches the op's eager
    (interpreter) run, outputs and gradients."""
    from apo_fast.ops.gated_lora import gated_lora_linear

    unet = _adapted(make_tiny_unet, "sigmoid", backend="triton")
    x, t, ctx = _inputs()
    explained = torch._dynamo.explain(lambda x, t, c: unet(x, t, encoder_hidden_states=c).sample)(x, t, ctx)
    assert explained.graph_break_count == 0
    ops = {str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert any("apo_fast.gated_lora_linear" in o for o in ops), sorted(ops)[:20]

    torch.manual_seed(2)
    xs = torch.randn(3, 7, 24, requires_grad=True)
    w, b = torch.randn(20, 24), torch.randn(20)
    A, B = torch.randn(5, 24, requires_grad=True), torch.randn(20, 5, requires_grad=True)
    g = torch.rand(3, 5, requires_grad=True)

    def f(xs, A, B, g):
        return gated_lora_linear(xs, w, b, A, B, g, 0.5, backend="triton")

    def run(fn):
        for v in (xs, A, B, g):
            v.grad = None
        y = fn(xs, A, B, g)
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        return [y.detach()] + [v.grad.clone() for v in (xs, A, B, g)]

    want = run(f)
    got = run(torch.compile(f, fullgraph=True, backend="aot_eager"))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_more_unets_than_dynamos_recompile_limit_compile_in_one_process():
    """Each compiled call has a code object of its own: a process that builds a tenth UNet
    (another run, eval, tests) still compiles it with fullgraph instead of failing at Dynamo's
    recompile limit (8 per code object; a new UNet's hooks fail the old entries' guards)."""
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.to_q = torch.nn.Linear(6, 6)

        def forward(self, sample, timestep, encoder_hidden_states=None):
            return UNet2DConditionOutput(sample=self.to_q(sample))

    limit = torch._dynamo.config.recompile_limit
    x, t = torch.randn(2, 3, 6), torch.tensor([5, 700])
    for _ in range(limit + 2):
        model = Tiny()
        inject_adapters(model, AdapterConfig(r=2, target_modules=("to_q",), gate=GateConfig(kind="sigmoid")))
        call = compiled_unet_call(model, CompileConfig(enabled=True, backend="eager"), torch.device("cpu"))
        with torch.no_grad():
            torch.testing.assert_close(call(x, t, {}), model(x, t).sample)


def test_compile_kwargs_keep_layout_optimization_off_on_the_cpu():
    cpu = compile_kwargs(CompileConfig(enabled=True, mode="max-autotune"), torch.device("cpu"))
    assert cpu["options"]["layout_optimization"] is False and "mode" not in cpu
    assert cpu["options"]["max_autotune"] is True  # the mode, spelled out as its options
    cuda = compile_kwargs(CompileConfig(enabled=True, mode="reduce-overhead"), torch.device("cuda"))
    assert cuda["mode"] == "reduce-overhead" and "options" not in cuda
    plain = compiled_unet_call(torch.nn.Identity(), CompileConfig(enabled=False), torch.device("cpu"))
    assert not hasattr(plain, "_torchdynamo_orig_callable")


def test_torch_export_of_an_adapted_unet_for_inference(make_tiny_unet):
    """torch.export of a time-gated UNet (adapters unfused: the graph holds the gated products)."""
    unet = _adapted(make_tiny_unet, "rank_prefix").eval()

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = unet

        def forward(self, x, t, c):
            return self.unet(x, t, encoder_hidden_states=c).sample

    x, t, ctx = _inputs()
    with torch.no_grad():
        program = torch.export.export(Wrapper(), (x, t, ctx))
        want = unet(x, t, encoder_hidden_states=ctx).sample
        got = program.module()(x, t, ctx)
        x2, t2, c2 = _inputs()
        t2 = torch.tensor([999, 0])
        torch.testing.assert_close(program.module()(x2, t2, c2), unet(x2, t2, encoder_hidden_states=c2).sample,
                                   rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_compiled_call_with_gradient_checkpointing_equals_eager(make_tiny_unet):
    """Checkpointed blocks recompute inside the compiled backward from the traced gates (the
    gate state's recompute bookkeeping is skipped under compile)."""
    unet = _adapted(make_tiny_unet, "learned")
    unet.enable_gradient_checkpointing()
    unet.train()
    x, t, ctx = _inputs()
    want = _passes(unet, _plain(unet), x, t, ctx)
    got = _passes(unet, compiled_unet_call(unet, CompileConfig(enabled=True, backend="aot_eager"),
                                           torch.device("cpu")), x, t, ctx)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-6)
    assert set(got[1]) == set(want[1])
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], rtol=1e-4, atol=1e-7)
