"""Memory planner: exact parameter counts, adapter counts, monotonic levers, activations vs a real run."""
import pytest
import torch

from apo_fast.bench.memory_plan import (
    BREAKDOWN_FIELDS,
    GIB,
    adapter_shapes,
    build_meta_unet,
    count_params_by_module_type,
    normalize_config,
    optimizer_state_bytes,
    plan_memory,
    trace_activations,
)
from apo_fast.config.unet_presets import UNET_PRESETS, unet_config

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# The tiny UNet with cross-attention at full resolution (the SD layout): large attention maps.
TINY_FULL_RES = dict(
    UNET_PRESETS["tiny"],
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)


def tiny(**overrides):
    cfg = dict(unet="tiny", batch_size=2, r=4, precision="fp32", condition_tokens=8)
    cfg.update(overrides)
    return cfg


# ---------------------------------------------------------------- parameters


@pytest.mark.parametrize("name, expected", [("sd15", 859_520_964), ("sdxl", 2_567_463_684), ("tiny", 985_444)])
def test_preset_parameter_counts_on_meta(name, expected):
    unet = build_meta_unet(UNET_PRESETS[name])
    assert all(p.is_meta for p in unet.parameters())
    by_type = count_params_by_module_type(unet)
    assert sum(by_type.values()) == expected
    assert by_type["Conv2d"] > 0 and by_type["Linear"] > 0


def test_presets_are_read_only_and_copyable():
    with pytest.raises(TypeError):
        UNET_PRESETS["sd15"]["sample_size"] = 32
    cfg = unet_config("tiny")
    cfg["in_channels"] = 3
    assert UNET_PRESETS["tiny"]["in_channels"] == 4
    with pytest.raises(ValueError, match="unknown UNet preset"):
        unet_config("sd3")


@pytest.mark.parametrize("rank", [1, 4, 7])
def test_lora_param_count_tiny_by_hand(rank):
    # tiny: 4 transformer blocks of 64 channels (down 1, mid 1, up 2); heads 8 x 8.
    # self-attention q, k, v, out: 64 -> 64, r * (64 + 64) each          -> 4 * 128 r
    # cross-attention q, out: 64 -> 64; k, v: 32 (context) -> 64          -> 2 * 128 r + 2 * 96 r
    per_block = 4 * 128 + 2 * 128 + 2 * 96
    plan = plan_memory(tiny(r=rank))
    assert plan.params_trainable == 4 * per_block * rank
    shapes = adapter_shapes(build_meta_unet(UNET_PRESETS["tiny"]), TARGETS, rank)
    assert len(shapes) == 4 * 8
    assert shapes["mid_block.attentions.0.transformer_blocks.0.attn2.to_k"] == ((rank, 32), (64, rank))
    assert plan.trainable == plan.params_trainable * 4  # fp32


def test_adapter_targets_must_match_something():
    with pytest.raises(ValueError, match="match no"):
        plan_memory(tiny(target_modules=["to_nothing"]))


def test_sd15_adapter_count_and_weights():
    plan = plan_memory(dict(unet="sd15", resolution=256, r=16, gradient_checkpointing=True))
    # 16 transformer blocks; per channel width C: self 4 * r * 2C, cross 2 * r * 2C + 2 * r * (768 + C)
    widths = [320] * 2 + [640] * 2 + [1280] * 2 + [1280] + [1280] * 3 + [640] * 3 + [320] * 3
    expected = sum(16 * (4 * 2 * c + 2 * 2 * c + 2 * (768 + c)) for c in widths)
    assert plan.params_trainable == expected == 3_188_736
    assert plan.weights == 859_520_964 * 2


# ---------------------------------------------------------------- activations vs a real run


def _measure_saved_bytes(unet_cfg, batch, hw, tokens, attention, rank):
    """Bytes autograd keeps in a real fp32 CPU forward of a peft-LoRA UNet (unique storages, no params)."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
    from peft import LoraConfig

    unet = UNet2DConditionModel(**dict(unet_cfg))
    unet.set_attn_processor(AttnProcessor() if attention == "naive" else AttnProcessor2_0())
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(TARGETS), init_lora_weights="gaussian"))
    assert all("lora" in n for n, p in unet.named_parameters() if p.requires_grad)
    params = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    seen, keep = {}, []

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
            keep.append(t)
        return t

    x = torch.randn(batch, unet_cfg["in_channels"], *hw)
    context = torch.randn(batch, tokens, unet_cfg["cross_attention_dim"])
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = unet(x, torch.randint(0, 1000, (batch,)), context).sample
    out.square().mean().backward()  # the graph really was trainable
    return sum(seen.values())


@pytest.mark.parametrize("unet_cfg", [UNET_PRESETS["tiny"], TINY_FULL_RES], ids=["tiny", "tiny_full_res_attention"])
@pytest.mark.parametrize("attention", ["sdpa", "naive"])
def test_activation_estimate_matches_real_saved_tensors(unet_cfg, attention):
    # full-resolution attention runs at 16x16 latents to keep the naive case fast
    batch, hw, tokens, rank = 2, ((32, 32) if unet_cfg is UNET_PRESETS["tiny"] else (16, 16)), 8, 4
    real = _measure_saved_bytes(unet_cfg, batch, hw, tokens, attention, rank)
    trace = trace_activations(unet_cfg, batch=batch, latent_hw=hw, condition_tokens=tokens,
                              dtype=torch.float32, attention=attention, targets=TARGETS, r=rank)
    assert abs(trace.saved - real) <= 0.30 * real, (trace.saved, real)
    assert trace.checkpointed < trace.saved


def test_checkpointed_estimate_matches_profiled_peak():
    """Real checkpointed step on the CPU: the profiler's peak above the weights vs the estimate."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    cfg = dict(UNET_PRESETS["tiny"])
    unet = UNet2DConditionModel(**cfg)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(TARGETS), init_lora_weights="gaussian"))
    unet.enable_gradient_checkpointing()
    unet.train()
    x, context = torch.randn(2, 4, 32, 32), torch.randn(2, 8, 32)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        unet(x, torch.randint(0, 1000, (2,)), context).sample.square().mean().backward()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
    totals = [sum(s) for s in sizes]
    measured = max(totals) - totals[0]
    trace = trace_activations(cfg, batch=2, latent_hw=(32, 32), condition_tokens=8, dtype=torch.float32,
                              attention="sdpa", targets=TARGETS, r=4)
    assert abs(trace.checkpointed - measured) <= 0.30 * measured, (trace.checkpointed, measured)


def test_activations_scale_with_batch_and_dtype():
    base = trace_activations(UNET_PRESETS["tiny"], batch=2, latent_hw=(16, 16), condition_tokens=8,
                             dtype=torch.float32, attention="sdpa", targets=TARGETS, r=4)
    double = trace_activations(UNET_PRESETS["tiny"], batch=4, latent_hw=(16, 16), condition_tokens=8,
                               dtype=torch.float32, attention="sdpa", targets=TARGETS, r=4)
    half = trace_activations(UNET_PRESETS["tiny"], batch=2, latent_hw=(16, 16), condition_tokens=8,
                             dtype=torch.bfloat16, attention="sdpa", targets=TARGETS, r=4)
    assert double.saved == pytest.approx(2 * base.saved, rel=0.02)
    assert half.saved < 0.6 * base.saved  # bf16 halves all but the fp32 statistics
    assert set(base.by_block) >= {"down_blocks.1", "mid_block", "up_blocks.0"}
    assert sum(base.by_block.values()) == base.saved


# ---------------------------------------------------------------- levers


def test_checkpointing_lowers_activations():
    off, on = plan_memory(tiny()), plan_memory(tiny(gradient_checkpointing=True))
    assert on.activations < off.activations
    assert on.activations == off.activations_checkpointing
    assert off.activations == on.activations_no_checkpointing
    assert on.total < off.total


def test_zero2_on_two_ranks_lowers_grads_and_optimizer_per_rank():
    z0 = plan_memory(tiny(r=64))
    z2 = plan_memory(tiny(r=64, zero_stage=2, world_size=2))
    assert z2.grads + z2.optimizer < z0.grads + z0.optimizer
    assert z2.grads == pytest.approx(z0.grads / 2, abs=4)
    assert z2.weights == z0.weights  # the frozen base is replicated below stage 3
    z3 = plan_memory(tiny(r=64, zero_stage=3, world_size=2))
    assert z3.weights == pytest.approx(z0.weights / 2, abs=4)


def test_eight_bit_optimizer_lowers_optimizer_state():
    adam = plan_memory(tiny(r=64))
    adam8 = plan_memory(tiny(r=64, optimizer="adamw8bit"))
    assert adam8.optimizer < adam.optimizer
    assert optimizer_state_bytes("adamw", [4096], flat=False) == 2 * 4 * 4096
    assert optimizer_state_bytes("adamw8bit", [4096], flat=False) == 2 * (4096 + 4 * 16)
    assert optimizer_state_bytes("adamw8bit", [4095], flat=False) == 2 * 4 * 4095  # bnb keeps small tensors 32-bit
    assert optimizer_state_bytes("adamw8bit", [2048, 2048], flat=True) == 2 * (4096 + 4 * 16)  # one ZeRO partition
    assert optimizer_state_bytes("lion8bit", [4096], flat=False) == 4096 + 4 * 16
    # fp32 run, no master weights. Rank 64 LoRA per transformer block: 14 tensors of 64x64
    # (8-bit state + one fp32 absmax per 256) and the two cross-attention A's of 64x32 (32-bit state).
    assert adam.params_trainable == 4 * (14 * 4096 + 2 * 2048)
    assert adam.optimizer == 8 * adam.params_trainable
    assert adam8.optimizer == 4 * (14 * 2 * (4096 + 4 * 16) + 2 * 8 * 2048)


def test_mixed_precision_adds_master_weights():
    fp32 = plan_memory(tiny(r=64))
    bf16 = plan_memory(tiny(r=64, precision="bf16"))
    assert bf16.trainable == fp32.trainable // 2
    assert bf16.optimizer == fp32.optimizer + 4 * fp32.params_trainable
    assert bf16.activations < fp32.activations


def test_offload_moves_optimizer_and_params_to_cpu():
    base = plan_memory(tiny(zero_stage=2, world_size=2))
    off = plan_memory(tiny(zero_stage=2, world_size=2, offload_optimizer=True))
    assert off.optimizer == 0 and base.optimizer > 0
    assert off.cpu_offload == base.optimizer
    both = plan_memory(tiny(zero_stage=3, world_size=2, offload_optimizer=True, offload_params=True))
    assert both.weights == 0 and both.trainable == 0 and both.optimizer == 0
    assert both.cpu_offload > off.cpu_offload


def test_paired_mode_doubles_the_batch_and_naive_attention_costs_more():
    single = plan_memory(tiny(unet=TINY_FULL_RES))
    paired = plan_memory(tiny(unet=TINY_FULL_RES, paired=True))
    naive = plan_memory(tiny(unet=TINY_FULL_RES, attention="naive"))
    assert paired.activations == pytest.approx(2 * single.activations, rel=0.02)
    assert naive.activations > 2 * single.activations  # (B*heads, N, N) probabilities at 32x32
    assert naive.workspace > single.workspace


# ---------------------------------------------------------------- outputs


def test_breakdown_sums_to_total_and_fits():
    plan = plan_memory(tiny())
    parts = plan.breakdown()
    assert list(parts) == list(BREAKDOWN_FIELDS)
    assert sum(v for k, v in parts.items() if k != "total") == plan.total
    assert plan.allocated == plan.total - plan.overhead
    assert plan.overhead >= 500 * 2**20  # CUDA context by default
    gib = plan.total / GIB
    assert plan.fits(gib * 1.01) and not plan.fits(gib * 0.99)
    with pytest.raises(ValueError, match="gpu_gib"):
        plan.fits(0)
    with pytest.raises(ValueError, match="gpu_gib"):
        plan.fits("8")


def test_to_markdown_has_every_line():
    plan = plan_memory(tiny(gradient_checkpointing=True, optimizer="adamw8bit"))
    text = plan.to_markdown(gpu_gib=8)
    for name in BREAKDOWN_FIELDS:
        assert f"| {name} |" in text or f"| **{name}** |" in text
    assert "cpu_offload" in text and "fits in a 8 GiB GPU" in text
    assert f"{plan.params_base:,}" in text and "adamw8bit" in text
    tight = plan.to_markdown(gpu_gib=0.1)
    assert "does NOT fit" in tight


def test_resolution_and_latent_size():
    c = normalize_config({"unet": "sd15", "resolution": 512})
    assert c["latent_hw"] == (64, 64)
    assert normalize_config({"unet": "sdxl"})["latent_hw"] == (128, 128)
    assert normalize_config({"unet": "tiny", "latent_size": (16, 24)})["latent_hw"] == (16, 24)
    assert normalize_config({"precision": "no"})["precision"] == "fp32"


@pytest.mark.parametrize(
    "cfg, error, match",
    [
        ({"batchsize": 2}, ValueError, "unknown memory-plan keys"),
        ({"precision": "fp8"}, ValueError, "precision"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"batch_size": 2.0}, TypeError, "batch_size"),
        ({"zero_stage": 4}, ValueError, "zero_stage"),
        ({"offload_optimizer": True, "zero_stage": 1}, ValueError, "offload_optimizer"),
        ({"offload_params": True, "zero_stage": 2}, ValueError, "offload_params"),
        ({"optimizer": "ds_cpu_adam"}, ValueError, "ds_cpu_adam"),
        ({"optimizer": "sgd"}, ValueError, "optimizer"),
        ({"attention": "flash3"}, ValueError, "attention"),
        ({"resolution": 500}, ValueError, "vae_scale_factor"),
        ({"resolution": "512"}, TypeError, "resolution"),
        ({"target_modules": "to_q"}, TypeError, "target_modules"),
        ({"fragmentation": 0.9}, ValueError, "fragmentation"),
        ({"gradient_checkpointing": 1}, TypeError, "gradient_checkpointing"),
        ({"unet": 5}, TypeError, "unet"),
    ],
)
def test_bad_config_raises_naming_the_key(cfg, error, match):
    with pytest.raises(error, match=match):
        plan_memory(cfg)
    with pytest.raises(TypeError, match="mapping"):
        plan_memory(["sd15"])
