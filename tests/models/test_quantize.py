"""A frozen base in bitsandbytes' NF4 / int8 formats or fp8 e4m3 (`model.base_quantization`):
the layers are bitsandbytes' own (or apo_fast's fp8 ones), the gated adapter on top matches its
float64 formula with the weight taken from bitsandbytes' own dequantization (torch's float8
conversion for fp8), the reference pass runs the same packed base, convolutions go to fp8 with
nf4 and fp8, and a tiny UNet trains, saves the same adapter file and resumes exactly."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

from apo_fast.adapters import (  # noqa: E402
    AdapterConfig,
    GateConfig,
    adapters_disabled,
    gated_layers,
    inject_adapters,
)
from apo_fast.config import ConfigError  # noqa: E402
from apo_fast.models.quantize import NF4_BLOCKSIZE, quantize_linears, quantized_bytes  # noqa: E402

F64 = torch.float64


class _Block(nn.Module):
    def __init__(self, fin=64, fout=48):
        super().__init__()
        self.to_q = nn.Linear(fin, fout)
        self.odd = nn.Linear(5, 7)  # 35 elements: not a multiple of NF4's 64-element blocks

    def forward(self, sample, timestep):
        return self.to_q(sample)


def _dequantized(layer: nn.Module) -> torch.Tensor:
    """The weight as bitsandbytes itself decodes it (the format check: bit-compatible), or as
    torch's float8_e4m3fn conversion decodes an fp8 layer's bytes."""
    w = layer.weight
    if getattr(layer, "weight_format", None) == "fp8_e4m3":
        return w.data.view(torch.float8_e4m3fn).to(F64) * layer.scale.to(F64).reshape(-1, *[1] * (w.dim() - 1))
    if w.dtype == torch.uint8:
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).to(F64)
    return bnb.functional.int8_vectorwise_dequant(w.data, w.SCB).to(F64)


KINDS = [("nf4", False), ("nf4", True), ("int8", False), ("fp8", False)]


@pytest.mark.parametrize("kind, double", KINDS)
def test_quantized_base_and_gated_adapter_match_float64(kind, double):
    torch.manual_seed(0)
    model = _Block()
    names = quantize_linears(model, kind, double_quant=double)
    assert names == (["to_q"] if kind == "nf4" else ["to_q", "odd"])
    base = model.to_q
    owner = "apo_fast.models.fp8" if kind == "fp8" else "bitsandbytes"
    assert type(base).__module__.startswith(owner) and not base.weight.is_floating_point()
    inject_adapters(model, AdapterConfig(r=5, lora_alpha=10.0, target_modules=("to_q",),
                                         gate=GateConfig(kind="rank_prefix", num_train_timesteps=1000)))
    layer = dict(gated_layers(model))["to_q"]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.2)
    x = torch.randn(3, 9, 64)
    t = torch.tensor([5, 480, 990])
    y = model(x, t)
    with torch.no_grad():
        gate = model.taca_gate(t, 5).float()  # the per-sample rank-prefix gate the forward used
        base_out = layer.base_layer(x)
    assert 0 < gate.sum() < gate.numel()
    A = layer.lora_A["default"].weight.detach().to(F64).requires_grad_(True)
    B = layer.lora_B["default"].weight.detach().to(F64).requires_grad_(True)
    delta = (((x.to(F64) @ A.t()) * gate.to(F64)[:, None, :]) * 2.0) @ B.t()
    torch.testing.assert_close(y.to(F64), base_out.to(F64) + delta, rtol=1e-5, atol=1e-5)
    if kind in ("nf4", "fp8"):  # bitsandbytes' 4-bit matmul (the fp8 layer's) is x @ dequantize(W)^T exactly
        want = x.to(F64) @ _dequantized(layer.base_layer).t() + layer.base_layer.bias.to(F64)
        torch.testing.assert_close(base_out.to(F64), want, rtol=1e-5, atol=1e-5)
    (y.square().sum()).backward()
    (((base_out.to(F64) + delta) ** 2).sum()).backward()
    torch.testing.assert_close(layer.lora_A["default"].weight.grad.to(F64), A.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.lora_B["default"].weight.grad.to(F64), B.grad, rtol=1e-4, atol=1e-4)
    with adapters_disabled(model):  # the reference: the same packed base, adapters off
        torch.testing.assert_close(model(x, t), base_out)
    with pytest.raises(ValueError, match="quantized base"):
        layer.merge()


@pytest.mark.parametrize("kind, double", KINDS)
def test_planner_bytes_match_the_packed_tensors(kind, double):
    model = _Block(128, 96)
    quantize_linears(model, kind, double_quant=double)
    w = model.to_q.weight
    if kind == "fp8":
        actual = w.numel() + model.to_q.weight_scale.numel()  # e4m3 bytes + the fp32 scales' bytes
    elif kind == "nf4":
        state = w.quant_state
        actual = w.data.numel() + state.absmax.numel() * state.absmax.element_size()
        if double:
            actual += state.state2.absmax.numel() * 4
    else:
        actual = w.data.numel() + w.SCB.numel() * 4
    assert quantized_bytes(128 * 96, 96, kind, double) == actual
    assert quantized_bytes(128 * 96, 96, kind, double) < 128 * 96 * 2 / (3 if kind == "nf4" else 1.9)


def _cfg(out: Path, *overrides: str):
    from apo_fast.demo import demo_config

    base = ["data.image_size=16", "train.batch_size=4", "train.log_every=1", "train.progress=false",
            "train.device=cpu", "train.checkpoint_every=4", "pretrain.steps=0"]
    return demo_config(str(out), base + list(overrides))


def _train(cfg):
    from apo_fast.training.trainer import APOTrainer

    trainer = APOTrainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
    return [json.loads(line) for line in (Path(cfg.output_dir) / "train_log.jsonl").read_text().splitlines()]


def test_fp8_convolutions_follow_the_format_and_take_adapters():
    """nf4 / fp8 store the convolutions in e4m3 with a per-output-channel scale: the layer
    equals the float64 convolution with the decoded weight, the decoded weight is within
    e4m3's rounding of the original, a module-wide cast leaves the bytes and scales whole, and
    a gated adapter on it (pointwise and 3x3) matches base + branch."""
    from apo_fast.models.fp8 import Float8Conv2d
    from apo_fast.models.quantize import quantize_convs

    torch.manual_seed(2)
    net = nn.Module()
    net.conv = nn.Conv2d(6, 10, 3, padding=1)
    net.proj = nn.Conv2d(10, 7, 1)
    original = net.conv.weight.detach().to(F64).clone()
    assert quantize_convs(net) == ["conv", "proj"]
    conv = net.conv
    assert isinstance(conv, Float8Conv2d) and conv.weight.dtype == torch.uint8
    w = _dequantized(conv)
    scale = conv.scale.to(F64)[:, None, None, None]
    v = (original / scale).abs()
    bound = torch.where(v >= 2 ** -6, 2 ** -4 * original.abs(), 2 ** -10 * scale.expand_as(original))
    assert ((w - original).abs() <= bound * (1 + 1e-6)).all()  # round to nearest e4m3
    x = torch.randn(2, 6, 5, 9)
    want = torch.nn.functional.conv2d(x.to(F64), w, conv.bias.to(F64), padding=1)
    torch.testing.assert_close(conv(x).to(F64), want, rtol=1e-5, atol=1e-5)
    scales = conv.scale.clone()
    net.half()
    assert conv.weight.dtype == torch.uint8 and torch.equal(conv.scale, scales)
    net.float()
    inject_adapters(net, AdapterConfig(r=3, target_modules=("conv", "proj"), gate=GateConfig(kind="constant")))
    for name, layer in gated_layers(net):
        with torch.no_grad():
            layer.lora_B["default"].weight.normal_(0, 0.3)
        inp = x if name == "conv" else torch.randn(2, 10, 5, 9)
        with torch.no_grad():
            down, up = layer.lora_A["default"], layer.lora_B["default"]
            torch.testing.assert_close(layer(inp), layer.base_layer(inp) + up(down(inp)) * layer.scaling["default"])


def test_fp8_refuses_what_it_cannot_hold():
    from apo_fast.models.fp8 import fp8_quantize

    with pytest.raises(ValueError, match="NaN or infinite"):
        fp8_quantize(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="2 or more dims"):
        fp8_quantize(torch.ones(4))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["nf4", "int8", "fp8"])
def test_training_on_a_quantized_base_saves_the_same_file_and_resumes_exactly(tmp_path, kind):
    from safetensors import safe_open

    from apo_fast.training.checkpoints import list_checkpoints

    whole = _train(_cfg(tmp_path / "whole", f"model.base_quantization={kind}", "train.steps=8"))
    assert len(whole) == 8 and all(torch.isfinite(torch.tensor(r["loss"])) for r in whole)
    assert whole[-1]["reward_w"] > 0  # the policy fits the anomalies better than the (quantized) reference
    part = _cfg(tmp_path / "part", f"model.base_quantization={kind}", "train.steps=4")
    _train(part)
    assert [s for s, _ in list_checkpoints(tmp_path / "part")] == [4]
    resumed = _train(_cfg(tmp_path / "part", f"model.base_quantization={kind}", "train.steps=8"))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in whole]  # exact resume
    plain = _train(_cfg(tmp_path / "plain", "train.steps=1"))
    assert plain
    files = [tmp_path / name / "adapters" / "pytorch_lora_weights.safetensors" for name in ("whole", "plain")]
    layouts = []
    for f in files:
        with safe_open(str(f), "pt") as fh:
            layouts.append({k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()})
    assert layouts[0] == layouts[1]  # same keys and shapes as on an unquantized base
    # and the file loads into an unquantized diffusers UNet with diffusers' own loader
    from apo_fast.config import load_config
    from apo_fast.models.build import build_unet

    run_cfg = load_config(tmp_path / "whole" / "config.yaml")
    fresh = build_unet(run_cfg.model, in_channels=3, sample_size=16, seed=run_cfg.train.seed)
    fresh.load_lora_adapter(str(files[0].parent), prefix="unet", weight_name=files[0].name)
    with safe_open(str(files[0]), "pt") as fh:
        key = next(k for k in fh.keys() if "lora_B" in k)
        saved = fh.get_tensor(key)
    module = fresh.get_submodule(key.removeprefix("unet.").rsplit(".lora_B", 1)[0])
    assert torch.equal(module.lora_B["default_0"].weight, saved) and saved.abs().sum() > 0


@pytest.mark.slow
def test_sampling_a_run_uses_its_quantized_base(tmp_path):
    from apo_fast.sampling.runs import load_run

    _train(_cfg(tmp_path / "run", "model.base_quantization=nf4", "train.steps=1"))
    run = load_run(tmp_path / "run", device="cpu")
    quantized = [m for m in run.unet.modules() if type(m).__name__ == "Linear4bit"]
    assert quantized and all(m.weight.dtype == torch.uint8 for m in quantized)
    # on the CPU only whole 64-element rows are NF4 (bitsandbytes' CPU forward fails on others)
    assert all(m.in_features % NF4_BLOCKSIZE == 0 for m in quantized)
    # the base's convolutions (not the trained mask-input branch, an adapter)
    convs = [m for name, m in run.unet.named_modules() if isinstance(m, nn.Conv2d) and "apo_mask_input" not in name]
    assert convs and all(type(m).__name__ == "Float8Conv2d" for m in convs)  # nf4: convolutions in fp8
    from apo_fast.sampling.runs import generate_for_defect

    images, _masks, _maps = generate_for_defect(run, "hole", 2, seed=0)  # no-grad sampling on the quantized base
    assert images.shape[0] == 2 and torch.isfinite(images).all()


@pytest.mark.parametrize("overrides, words", [
    (["model.base_quantization=fp4"], "model.base_quantization"),
    (["model.base_double_quant=true"], "NF4 option"),
    (["model.base_quantization=nf4", "train.zero_stage=3"], "ZeRO-3"),
])
def test_quantization_settings_are_checked_before_any_work(tmp_path, overrides, words):
    with pytest.raises(ConfigError, match=words):
        _cfg(tmp_path, *overrides)


@pytest.mark.parametrize("kind, words", [("fp8", "stores the base in fp8"), ("nf4", "stores the convolutions")])
def test_fp8_without_float8_dtypes_is_refused_with_what_to_choose(tmp_path, monkeypatch, kind, words):
    import apo_fast.config.checks as checks

    monkeypatch.setattr(checks, "_torch_version", lambda: "2.0.1")
    with pytest.raises(ConfigError, match=f"(?s){words}.*torch.float8_e4m3fn.*int8"):
        _cfg(tmp_path, f"model.base_quantization={kind}")
    _cfg(tmp_path, "model.base_quantization=int8")  # int8 needs no float8 dtype


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_a_bitsandbytes_format_without_bitsandbytes_is_refused_before_any_work(tmp_path, monkeypatch, kind):
    import apo_fast.config.checks as checks

    monkeypatch.setattr(checks, "_installed", lambda name: name != "bitsandbytes")
    with pytest.raises(ConfigError, match="(?s)bitsandbytes is not installed.*fp8"):
        _cfg(tmp_path, f"model.base_quantization={kind}")
    _cfg(tmp_path, "model.base_quantization=fp8")


def test_blocksize_is_bitsandbytes_default():
    w = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="nf4").to("cpu")
    assert w.quant_state.blocksize == NF4_BLOCKSIZE


def test_the_memory_planner_counts_the_packed_base():
    from apo_fast.bench.memory_plan import (
        build_meta_unet,
        normalize_config,
        plan_memory,
    )

    settings = dict(unet="tiny", resolution=32, batch_size=2, r=4, precision="fp32")
    plain = plan_memory(settings)
    c = normalize_config(settings)
    unet = build_meta_unet(c["unet_config"], torch.float32)
    linears = [m for m in unet.modules() if type(m) is nn.Linear]
    convs = [m for m in unet.modules() if type(m) is nn.Conv2d]
    for kind in ("nf4", "int8", "fp8"):
        quant = plan_memory({**settings, "base_quantization": kind})
        held = [m for m in linears if kind != "nf4" or m.weight.numel() % NF4_BLOCKSIZE == 0]
        saved = sum(m.weight.numel() * 4 - quantized_bytes(m.weight.numel(), m.out_features, kind) for m in held)
        fp8_convs = convs if kind in ("nf4", "fp8") else []  # convolutions in e4m3 + a scale per output channel
        saved += sum(m.weight.numel() * 3 - 4 * m.out_channels for m in fp8_convs)
        assert plain.weights - quant.weights == saved > 0
        largest = max(m.weight.numel() * 4 for m in held + fp8_convs)  # one dequantized layer at a time
        assert quant.workspace - plain.workspace == largest
    with pytest.raises(ValueError, match="ZeRO-3"):
        plan_memory({**settings, "base_quantization": "nf4", "zero_stage": 3})


def test_a_peft_lora_on_a_quantized_linear_converts_in_one_line():
    """A drop-in user's UNet with bitsandbytes linears and a peft LoRA on them (what diffusers'
    BitsAndBytesConfig + add_adapter leaves) goes through convert_peft_to_gated unchanged."""
    from peft import LoraConfig, inject_adapter_in_model

    from apo_fast.adapters import convert_peft_to_gated

    torch.manual_seed(1)
    model = _Block()
    quantize_linears(model, "nf4")
    model = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q"]), model)
    with torch.no_grad():
        model.to_q.lora_B["default"].weight.normal_(0, 0.1)
    x = torch.randn(2, 3, 64)
    before = model.to_q(x)
    convert_peft_to_gated(model)
    assert type(model.to_q).__name__ == "GatedLoRALinear"
    assert type(model.to_q.base_layer).__name__ == "Linear4bit"
    torch.testing.assert_close(model.to_q(x), before)
