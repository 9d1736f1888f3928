"""Memory levers on one rank (in process): ZeRO stages 0-3, ZeRO-3 parameter handling, 8-bit
optimizers, offload, bf16, gradient checkpointing, channels_last, attention choice, latent
caching, and the configs that cannot run on a CPU.

Tolerance: a ZeRO stage changes only the order of floating-point reductions (flattened
gradient buckets, the clipping norm) against stage 0, so per-step losses agree to
``LOSS_RTOL`` (measured ~1e-6 relative after 3 steps) and each exported tensor to
``WEIGHT_RTOL`` in relative Frobenius norm (Adam turns tiny gradient differences in
near-zero gradient entries into update differences of up to ``lr``, so elementwise
bounds would have to be ~lr).
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch

from apo_fast.demo import demo_config

LOSS_RTOL = 1e-4
WEIGHT_RTOL = 1e-3
NO_PERSIST = "train.deepspeed={zero_optimization: {stage3_param_persistence_threshold: 0}}"  # partition every param


def tiny_cfg(out: Path, *overrides: str):
    base = [
        "data.image_size=16",
        "train.batch_size=4",
        "train.steps=3",
        "train.log_every=1",
        "train.progress=false",
        "train.device=cpu",
    ]
    return demo_config(str(out), base + list(overrides))


def run_train(cfg):
    from apo_fast.training.trainer import APOTrainer

    trainer = APOTrainer(cfg)
    try:
        summary = trainer.train()
    finally:
        trainer.close()
    return trainer, summary


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "train_log.jsonl").read_text().splitlines()]


def read_export(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = load_file(str(Path(out) / "adapters" / "pytorch_lora_weights.safetensors"))
    conditions = load_file(str(Path(out) / "adapters" / "conditions.safetensors"))
    tensors.update({f"cond/{k}": v for k, v in conditions.items()})
    return tensors


def assert_same_run(a: Path, b: Path, rtol: float = LOSS_RTOL, weight_rtol: float = WEIGHT_RTOL) -> None:
    la, lb = read_log(a), read_log(b)
    assert [r["step"] for r in la] == [r["step"] for r in lb]
    for ra, rb in zip(la, lb):
        for key in ("loss", "e_theta", "e_ref"):
            assert ra[key] == pytest.approx(rb[key], rel=rtol, abs=1e-7), (ra["step"], key)
    ea, eb = read_export(a), read_export(b)
    assert ea.keys() == eb.keys()
    for key in ea:
        assert ea[key].shape == eb[key].shape, key
        a_, b_ = ea[key].double(), eb[key].double()
        err = ((a_ - b_).norm() / b_.norm().clamp_min(1e-12)).item()
        assert err <= weight_rtol, (key, err)


# --------------------------------------------------------------------------- config, no training


def test_deepspeed_config_per_stage_and_overrides(tmp_path):
    from apo_fast.training.distributed import deepspeed_config

    for stage in (0, 1, 2, 3):
        ds = deepspeed_config(tiny_cfg(tmp_path, f"train.zero_stage={stage}"), 4)
        assert ds["zero_optimization"]["stage"] == stage and ds["train_micro_batch_size_per_gpu"] == 4
        assert ds["zero_allow_untested_optimizer"] and not ds["fp16"]["enabled"]
    ds = deepspeed_config(
        tiny_cfg(tmp_path, "train.zero_stage=3", "train.offload_optimizer=true", "train.offload_params=true",
                 "train.mixed_precision=bf16", NO_PERSIST), 8)
    z = ds["zero_optimization"]
    assert z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    assert z["stage3_param_persistence_threshold"] == 0 and ds["bf16"]["enabled"]
    assert z["stage3_gather_16bit_weights_on_model_save"]  # the override merged, the generated entries kept
    fp16 = deepspeed_config(tiny_cfg(tmp_path, "train.mixed_precision=fp16"), 4)["fp16"]
    assert fp16["enabled"] and fp16["loss_scale"] == 0  # dynamic loss scaling
    with pytest.raises(ValueError, match=r"train\.deepspeed\.zero_optimization\.stage is set from train\.zero_stage"):
        deepspeed_config(tiny_cfg(tmp_path, "train.deepspeed={zero_optimization: {stage: 2}}"), 4)
    with pytest.raises(ValueError, match="train.batch_size"):
        deepspeed_config(tiny_cfg(tmp_path, "train.deepspeed={train_micro_batch_size_per_gpu: 2}"), 4)
    with pytest.raises(ValueError, match="optim.max_grad_norm"):  # the trainer may clip itself (ZeRO 0)
        deepspeed_config(tiny_cfg(tmp_path, "train.deepspeed={gradient_clipping: 0.5}"), 4)


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.mixed_precision=fp16", "fp16 needs a CUDA device"),
        ("train.attention=xformers", "xformers.*cannot run here"),
        ("train.deepspeed={bf16: {enabled: true}}", "train.mixed_precision"),
    ],
)
def test_what_cannot_run_here_fails_before_any_work(tmp_path, override, words, monkeypatch):
    import apo_fast.training.trainer as train_mod
    from apo_fast.training.trainer import APOTrainer

    def no_data(*a, **k):
        raise AssertionError("the data was loaded before the config was refused")

    monkeypatch.setattr(train_mod, "load_train_data", no_data)
    with pytest.raises(ValueError, match=words):
        APOTrainer(tiny_cfg(tmp_path, override)).setup()


def test_cli_reports_fp16_on_cpu_with_exit_code_2(tmp_path, capsys):
    from apo_fast.cli import main
    from apo_fast.config import save_config

    save_config(tiny_cfg(tmp_path / "run"), tmp_path / "cfg.yaml")
    assert main(["train", "--config", str(tmp_path / "cfg.yaml"), "--set", "train.mixed_precision=fp16"]) == 2
    assert "fp16 needs a CUDA device" in capsys.readouterr().err


def test_attention_choice_is_logged_once_and_xformers_on_cpu_is_refused(caplog):
    from diffusers import UNet2DConditionModel

    from apo_fast.config.unet_presets import UNET_PRESETS
    from apo_fast.models import set_attention

    unet = UNet2DConditionModel(**dict(UNET_PRESETS["tiny"], in_channels=3, out_channels=3, sample_size=16))
    with caplog.at_level(logging.INFO, logger="apo_fast.models.build"):
        assert set_attention(unet, "auto", torch.device("cpu")) == "sdpa"
    records = [r.getMessage() for r in caplog.records if r.name == "apo_fast.models.build"]
    assert len(records) == 1 and "SDPA" in records[0] and "xformers unavailable" in records[0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="apo_fast.models.build"):
        assert set_attention(unet, "sdpa", torch.device("cpu")) == "sdpa"
    assert [r.getMessage() for r in caplog.records if r.name == "apo_fast.models.build"] == ["attention: PyTorch SDPA"]
    with pytest.raises(ValueError, match="xformers has no kernels for device cpu"):
        set_attention(unet, "xformers", torch.device("cpu"))
    with pytest.raises(ValueError, match="train.attention must be"):
        set_attention(unet, "flash", torch.device("cpu"))


@pytest.mark.parametrize("mode", ["unpaired", "paired"])
def test_global_batch_is_the_same_for_any_world_size(tmp_path, mode):
    """Rank r of W ranks with batch b gets rows r*b..(r+1)*b of what 1 rank with batch W*b gets."""
    from apo_fast.training.streaming import load_train_data
    from apo_fast.training.trainer import APOTrainer

    def batch(world, rank, b, step=3, micro=1):
        cfg = tiny_cfg(tmp_path, f"train.batch_size={b}", f"loss.mode={mode}", "train.grad_accum=2")
        trainer = APOTrainer(cfg)
        trainer.data = data
        trainer.world, trainer.rank, trainer.augment_mode = world, rank, "dihedral"
        return trainer.batch_for_step(step, micro)

    data = load_train_data(tiny_cfg(tmp_path))
    one = batch(1, 0, 6)
    for world in (2, 3):
        parts = [batch(world, r, 6 // world) for r in range(world)]
        for i, name in enumerate(("x0", "masks", "conds", "t", "noise")):
            if mode == "paired":  # each rank holds its winners then its losers
                halves = [torch.chunk(p[i], 2) for p in parts]
                joined = torch.cat([h[0] for h in halves] + [h[1] for h in halves])
            else:
                joined = torch.cat([p[i] for p in parts])
            assert torch.equal(joined, one[i]), (world, name)
    assert not torch.equal(batch(1, 0, 6, step=4)[4], one[4])  # another step draws other noise


def test_average_over_ranks_is_identity_on_one_rank():
    from apo_fast.training.distributed import average_over_ranks, rank_slice

    assert average_over_ranks({"loss": 0.25, "e_theta": 1.5}) == {"loss": 0.25, "e_theta": 1.5}
    x = torch.arange(12).view(6, 2)
    assert torch.equal(rank_slice(x, 1, 3), x[2:4])
    with pytest.raises(ValueError, match="does not split over 4 ranks"):
        rank_slice(x, 0, 4)


def test_leftovers_of_a_killed_run_are_removed_and_complete_files_kept(tmp_path):
    from apo_fast.training.checkpoints import remove_stale_checkpoint_files

    ck = tmp_path / "checkpoints"
    (ck / "step-000002").mkdir(parents=True)
    (ck / "step-000002" / "client_state.json").write_text("{}")
    (ck / "latest").write_text("step-000002\n")
    (tmp_path / "train_log.jsonl").write_text("{}\n")
    left = [ck / ".step-000004.tmp", ck / ".step-000002.old"]
    for d in left:
        d.mkdir()
        (d / "shard.pt").write_bytes(b"x")
    left += [ck / ".latest.k2j_x9.tmp", tmp_path / ".train_log.jsonl.a1b2.tmp"]
    for f in left[2:]:
        f.write_text("half")
    removed = remove_stale_checkpoint_files(tmp_path)
    assert sorted(removed) == sorted(left) and not any(p.exists() for p in left)
    assert (ck / "step-000002" / "client_state.json").exists() and (ck / "latest").exists()
    assert (tmp_path / "train_log.jsonl").exists()
    assert remove_stale_checkpoint_files(tmp_path / "missing") == []


# --------------------------------------------------------------------------- training runs


@pytest.fixture(scope="module")
def stage0_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("stage0")
    run_train(tiny_cfg(out, "train.zero_stage=0"))
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, weight_rtol",
    [
        (("train.zero_stage=1",), WEIGHT_RTOL),
        # channels_last changes the convolutions' reduction order as well (measured 9e-4).
        (("train.zero_stage=2", "train.gradient_checkpointing=true", "train.channels_last=true"), 1e-2),
    ],
    ids=["zero1", "zero2-checkpointing-channels_last"],
)
def test_zero_stages_train_like_stage_0(tmp_path, stage0_run, overrides, weight_rtol):
    trainer, _ = run_train(tiny_cfg(tmp_path, *overrides))
    assert_same_run(tmp_path, stage0_run, weight_rtol=weight_rtol)
    if "train.channels_last=true" in overrides:
        unet = trainer.engine.module.unet
        assert unet.is_gradient_checkpointing
        assert all(p.is_contiguous() for p in unet.parameters())  # DeepSpeed flattens them; inputs carry the layout


@pytest.mark.slow
def test_stage0_clips_in_the_trainer_like_deepspeed_clips_at_stage_1(tmp_path):
    """ZeRO-0 in fp32 clips the trainable gradients itself (foreach) and skips the
    one-rank all-reduce; ZeRO-1 leaves clipping to DeepSpeed. A max norm far below
    the gradient norm makes clipping decide every update, so equal runs mean equal
    clipping, and an unclipped run must differ."""
    from apo_fast.training.distributed import deepspeed_config

    clip = "optim.max_grad_norm=0.001"
    assert deepspeed_config(tiny_cfg(tmp_path, clip, "train.zero_stage=0"), 4)["gradient_clipping"] == 0.0
    assert deepspeed_config(tiny_cfg(tmp_path, clip, "train.zero_stage=1"), 4)["gradient_clipping"] == 0.001
    assert deepspeed_config(tiny_cfg(tmp_path, clip, "train.mixed_precision=bf16"), 4)["gradient_clipping"] == 0.001
    runs = {name: tmp_path / name for name in ("zero0", "zero1", "unclipped")}
    trainer, _ = run_train(tiny_cfg(runs["zero0"], clip, "train.zero_stage=0"))
    assert trainer._clip_params and not trainer.engine.enable_backward_allreduce
    run_train(tiny_cfg(runs["zero1"], clip, "train.zero_stage=1"))
    run_train(tiny_cfg(runs["unclipped"], "optim.max_grad_norm=0", "train.zero_stage=0"))
    assert_same_run(runs["zero0"], runs["zero1"])
    a, b = read_export(runs["zero0"]), read_export(runs["unclipped"])
    assert max((a[k] - b[k]).abs().max().item() for k in a if "lora_B" in k) > 1e-4


@pytest.mark.slow
def test_conv_adapters_train_alike_under_zero0_and_zero3(tmp_path):
    """GatedLoRAConv2d layers (resnet conv1, 1x1 proj_in/proj_out) beside the linear ones:
    ZeRO-3 partitions and gathers them and trains like stage 0."""
    targets = "adapter.target_modules=[to_q,to_k,to_v,to_out.0,proj_in,proj_out,conv1]"
    run_train(tiny_cfg(tmp_path / "z0", targets, "train.zero_stage=0"))
    run_train(tiny_cfg(tmp_path / "z3", targets, "train.zero_stage=3", "train.gradient_checkpointing=true",
                       NO_PERSIST))
    assert_same_run(tmp_path / "z3", tmp_path / "z0")
    assert any(v.dim() == 4 for k, v in read_export(tmp_path / "z3").items() if "conv1.lora_A" in k)


@pytest.mark.slow
def test_mask_input_trains_alike_under_zero0_and_zero3(tmp_path):
    """adapter.mask_input: ZeRO-3 partitions the mask branch, gathers it inside conv_in's hook and
    for the export, and trains like stage 0 (losses, LoRA weights and the branch)."""
    from safetensors.torch import load_file

    run_train(tiny_cfg(tmp_path / "z0", "adapter.mask_input=true", "train.zero_stage=0"))
    run_train(tiny_cfg(tmp_path / "z3", "adapter.mask_input=true", "train.zero_stage=3",
                       "train.gradient_checkpointing=true", NO_PERSIST))
    assert_same_run(tmp_path / "z3", tmp_path / "z0")
    a, b = (load_file(str(tmp_path / z / "adapters" / "mask_input.safetensors")) for z in ("z3", "z0"))
    assert a.keys() == b.keys() and b["project_weight"].abs().sum() > 0
    for key in a:
        err = ((a[key].double() - b[key].double()).norm() / b[key].double().norm().clamp_min(1e-12)).item()
        assert err <= WEIGHT_RTOL, (key, err)


@pytest.mark.slow
def test_zero3_partitions_the_frozen_base_gathers_adapters_and_trains_like_stage_0(tmp_path, stage0_run):
    """ZeRO-3 with every parameter partitioned (persistence threshold 0), gradient checkpointing
    (recompute gathers again) and the fused adapter layer reading its submodules' weights."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from apo_fast.adapters import gated_layers
    from apo_fast.adapters.mask_input import get_mask_input
    from apo_fast.training.distributed import export_parameters
    from apo_fast.training.trainer import APOTrainer

    trainer = APOTrainer(tiny_cfg(tmp_path, "train.zero_stage=3", "train.gradient_checkpointing=true", NO_PERSIST))
    trainer.setup()
    model = trainer.engine.module
    layers = dict(gated_layers(model.unet))

    def externals():
        return {m: set(m._external_params) for m in model.modules() if getattr(m, "_external_params", None)}

    # Declared at setup, before any forward (DeepSpeed would otherwise discover them on first
    # access inside its forward, one synchronous gather at a time).
    declared = externals()
    assert set(declared) == set(layers.values())
    for path, layer in layers.items():
        expected = {id(layer.base_layer.weight), id(layer.lora_A["default"].weight), id(layer.lora_B["default"].weight)}
        if layer.base_layer.bias is not None:
            expected.add(id(layer.base_layer.bias))
        assert declared[layer] == expected, path
    try:
        trainer.train()
    finally:
        trainer.close()
    assert_same_run(tmp_path, stage0_run)
    assert externals() == declared  # nothing else had to be discovered during training
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(hasattr(p, "ds_id") for p in model.parameters())  # the whole model is ZeRO-3's
    assert all(p.ds_status == ZeroParamStatus.NOT_AVAILABLE and p.data.numel() == 0 for p in frozen)
    assert sum(p.ds_numel for p in frozen) > 900_000  # the base UNet, held as partitions between uses
    # Export gathered only what it reads.
    exported = {id(p) for p in export_parameters(model)}
    mask_params = list(get_mask_input(model.unet).parameters())  # the demo config's mask input
    assert exported.isdisjoint(id(p) for p in frozen) and len(exported) == 2 * len(layers) + 1 + len(mask_params)
    assert {id(p) for p in mask_params} <= exported


@pytest.mark.slow
def test_zero3_with_a_learned_gate_and_paired_checkpointed_training(tmp_path):
    """The learned gate's MLP (read for its device before its forward) is registered too, and a
    checkpointing recompute under ZeRO-3 still finds its forward's gates (paired: 2x batch)."""
    from apo_fast.adapters.state import GATE_MODULE_NAME

    cfg = tiny_cfg(tmp_path, "train.zero_stage=3", "adapter.gate.kind=learned", "loss.mode=paired",
                   "train.batch_size=2", "train.gradient_checkpointing=true", "train.steps=2", NO_PERSIST)
    from apo_fast.training.trainer import APOTrainer

    trainer = APOTrainer(cfg).setup()
    gate = getattr(trainer.engine.module.unet, GATE_MODULE_NAME)
    assert set(gate._external_params) == {id(p) for p in gate.parameters()}  # declared before any forward
    try:
        summary = trainer.train()
    finally:
        trainer.close()
    assert summary["final"]["step"] == 2 and math.isfinite(summary["final"]["loss"])
    from safetensors.torch import load_file

    saved_gate = load_file(str(tmp_path / "adapters" / "taca_gate.safetensors"))
    assert saved_gate and all(v.numel() > 0 for v in saved_gate.values())  # gathered, not empty shards
    assert any(v.abs().sum() > 0 for k, v in saved_gate.items() if "mlp.2" in k)  # zero-init layer trained


def _uint8_moments(optimizer, moments: tuple[str, ...]) -> int:
    """Check every state of a tensor of >= 4096 elements holds uint8 moments; return how many."""
    big = [(p, st) for p, st in optimizer.state.items() if p.numel() >= 4096]
    for p, st in big:
        for key in moments:
            assert st[key].dtype == torch.uint8 and st[key].numel() == p.numel(), key
    return len(big)


@pytest.mark.slow
@pytest.mark.parametrize("name, stage", [("adamw8bit", 0), ("paged_adamw8bit", 2), ("lion8bit", 3)])
def test_8bit_optimizer_state_is_uint8(tmp_path, name, stage):
    """bitsandbytes keeps tensors under 4096 elements in 32-bit state; rank 64 gives 64x64 adapters
    (stage 0: one state per tensor); under ZeRO the state belongs to the flat fp32 partition.
    The ZeRO-2 case also resumes its 8-bit state from the checkpoint."""
    from apo_fast.training.distributed import client_optimizer

    classes = {"adamw8bit": "AdamW8bit", "paged_adamw8bit": "PagedAdamW8bit", "lion8bit": "Lion8bit"}
    moments = ("state1",) if name == "lion8bit" else ("state1", "state2")
    common = (f"optim.name={name}", f"train.zero_stage={stage}", "adapter.r=64", "train.checkpoint_every=2")
    trainer, _ = run_train(tiny_cfg(tmp_path, *common, "train.steps=2"))
    opt = client_optimizer(trainer.engine.optimizer)
    assert type(opt).__name__ == classes[name]
    assert _uint8_moments(opt, moments) >= 1
    if stage == 2:
        trainer, _ = run_train(tiny_cfg(tmp_path, *common, "train.steps=3"))  # resumes at step 2
        assert _uint8_moments(client_optimizer(trainer.engine.optimizer), moments) >= 1
        assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in read_log(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        ("train.zero_stage=2", "train.offload_optimizer=true", "optim.name=ds_cpu_adam"),
        ("train.zero_stage=3", "train.offload_optimizer=true", "train.offload_params=true"),
    ],
    ids=["zero2-offload-ds_cpu_adam", "zero3-offload-params-and-optimizer-adamw"],
)
def test_offload_runs_complete(tmp_path, stage0_run, overrides):
    """ZeRO-Offload keeps the optimizer (and with stage 3 the parameters) in host memory; on a
    CPU that changes where nothing lives, but the run goes through DeepSpeed's offload code.
    DeepSpeedCPUAdam is JIT-built once (cached under TORCH_EXTENSIONS_DIR)."""
    from apo_fast.training.distributed import client_optimizer

    trainer, summary = run_train(tiny_cfg(tmp_path, *overrides))
    assert summary["final"]["step"] == 3
    if "optim.name=ds_cpu_adam" in overrides:
        assert type(client_optimizer(trainer.engine.optimizer)).__name__ == "DeepSpeedCPUAdam"
    assert_same_run(tmp_path, stage0_run)


@pytest.mark.slow
def test_bf16_trains_on_cpu_with_fp32_master_weights(tmp_path, stage0_run):
    from apo_fast.training.distributed import client_optimizer

    trainer, _ = run_train(tiny_cfg(tmp_path, "train.mixed_precision=bf16", "train.zero_stage=2"))
    assert {p.dtype for p in trainer.engine.module.parameters()} == {torch.bfloat16}
    master = [p for g in client_optimizer(trainer.engine.optimizer).param_groups for p in g["params"]]
    assert master and all(p.dtype == torch.float32 for p in master)
    # bf16 keeps 8 bits of mantissa: the losses follow the fp32 run loosely.
    for a, b in zip(read_log(tmp_path), read_log(stage0_run)):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-2)
    lora = read_export(tmp_path)
    assert all(v.dtype == torch.bfloat16 for k, v in lora.items() if ".lora_" in k)


@pytest.mark.slow
def test_a_trainer_after_shutdown_distributed_starts_on_a_new_group(tmp_path, stage0_run):
    """The CLI ends the process group when a command returns; a later trainer in the same
    process (tests, notebooks) must get a fresh group, not DeepSpeed's stale cached ones."""
    from apo_fast.training.distributed import shutdown_distributed

    assert torch.distributed.is_initialized()  # left up by the stage-0 run
    shutdown_distributed()
    assert not torch.distributed.is_initialized()
    _, summary = run_train(tiny_cfg(tmp_path, "train.steps=1", "train.zero_stage=2"))
    assert summary["final"]["step"] == 1


# --------------------------------------------------------------------------- latent caching


def _tiny_vae_folder(path: Path) -> Path:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4, sample_size=16,
    )
    vae.save_pretrained(path)
    return path


@pytest.mark.slow
def test_latents_are_encoded_once_and_training_runs_on_them(tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    from apo_fast.training.trainer import APOTrainer

    encoded = []
    original = AutoencoderKL.encode

    def counting_encode(self, x, *args, **kwargs):
        encoded.append(x.shape[0])
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", counting_encode)
    vae_dir = _tiny_vae_folder(tmp_path / "vae")
    cfg = tiny_cfg(tmp_path / "run", "model.latent=true", f"model.vae={vae_dir}", "train.steps=2")
    trainer = APOTrainer(cfg)
    try:
        trainer.setup()
        d = trainer.data
        n_images = d.anomaly_images.shape[0] + d.normal_images.shape[0]
        assert sum(encoded) == n_images  # every training image encoded exactly once
        assert d.anomalies.shape[1:] == (4, 8, 8) and d.normals.shape[1:] == (4, 8, 8)  # 16 px -> 8x8 latents
        assert trainer.engine.module.unet.config.in_channels == 4
        summary = trainer.train()
    finally:
        trainer.close()
    assert sum(encoded) == n_images  # training reads the cache, never the VAE
    assert summary["final"]["step"] == 2 and math.isfinite(summary["final"]["loss"])


@pytest.mark.slow
def test_a_latent_run_on_a_preset_unet_samples_with_its_trained_base(tmp_path):
    """load_run rebuilds the preset UNet the trainer trained (same seeded random base),
    with the VAE's own latent channels and scale factor (2 for this tiny VAE, 8 for SD)."""
    from apo_fast.models import vae_scale_factor
    from apo_fast.sampling.runs import generate_for_defect, load_run
    from apo_fast.training.trainer import APOTrainer

    vae_dir = _tiny_vae_folder(tmp_path / "vae")
    cfg = tiny_cfg(tmp_path / "run", "model.latent=true", f"model.vae={vae_dir}", "train.steps=2",
                   "sample.num_inference_steps=3")
    trainer = APOTrainer(cfg)
    try:
        trainer.train()
        trained = {k: v.detach().clone() for k, v in trainer.engine.module.unet.state_dict().items()}
    finally:
        trainer.close()
    run = load_run(tmp_path / "run", device="cpu")
    assert vae_scale_factor(run.vae) == 2 and run.unet.config.in_channels == 4
    loaded = run.unet.state_dict()
    assert trained.keys() == loaded.keys()
    for key in trained:  # base weights and trained adapters alike
        torch.testing.assert_close(loaded[key], trained[key], rtol=0, atol=0, msg=key)
    images, masks, _ = generate_for_defect(run, "hole", 2)
    assert images.shape == (2, 3, 16, 16) and masks.shape[-2:] == (16, 16) and torch.isfinite(images).all()
    known = torch.rand(2, 3, 16, 16) * 2 - 1  # mask-guided: the known image is encoded to 8x8 latents
    known_masks = torch.zeros(2, 1, 16, 16)
    known_masks[..., 4:12, 4:12] = 1
    guided, _, _ = generate_for_defect(run, "hole", 2, known_images=known, known_masks=known_masks)
    assert guided.shape == (2, 3, 16, 16) and torch.isfinite(guided).all()
