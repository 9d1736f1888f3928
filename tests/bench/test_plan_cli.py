"""``apo-fast plan-memory``: the run config mapped onto the memory planner, the report, exit codes."""
from __future__ import annotations

from pathlib import Path

import pytest

from apo_fast.config import save_config
from apo_fast.demo import demo_config

REPO = Path(__file__).resolve().parents[2]


def write_cfg(tmp_path: Path, *overrides: str) -> Path:
    path = tmp_path / "cfg.yaml"
    save_config(demo_config(str(tmp_path / "run"), list(overrides)), path)
    return path


def test_plan_memory_prints_the_breakdown_and_whether_it_fits(tmp_path, capsys):
    from apo_fast.cli import main

    cfg = write_cfg(tmp_path)
    assert main(["plan-memory", "--config", str(cfg), "--gpu-gib", "8", "--json", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    assert "### Memory plan: custom UNet, latent 32x32, batch 8, rank 8, fp32" in out  # tiny with 3 pixel channels
    for line in ("| weights |", "| activations |", "| optimizer |", "| **total** |"):
        assert line in out
    assert "preset tiny: peak" in out and "(fits in 8.0 GiB, --gpu-gib)" in out
    import json

    record = json.loads((tmp_path / "plan.json").read_text())
    assert record["fits"] and record["breakdown_bytes"]["total"] > record["breakdown_bytes"]["weights"] > 0
    # Too small a GPU: still exit code 0, the verdict says so.
    assert main(["plan-memory", "--config", str(cfg), "--gpu-gib", "0.25"]) == 0
    assert "does NOT fit in 0.2 GiB" in capsys.readouterr().out


def test_planner_settings_follow_the_run_config(tmp_path):
    from apo_fast.bench.plan_cli import plan_for_config, planner_settings

    cfg = demo_config(None, [
        "train.zero_stage=3", "train.offload_optimizer=true", "train.mixed_precision=bf16",
        "train.gradient_checkpointing=true", "train.attention=sdpa", "train.batch_size=3", "loss.mode=paired",
        "adapter.r=16", "optim.name=adamw8bit", "model.cond_tokens=6",
        "train.deepspeed={zero_optimization: {reduce_bucket_size: 2.0e+7, stage3_prefetch_bucket_size: 1000}}",
    ])
    s = planner_settings(cfg, world_size=2)
    assert s["unet"]["in_channels"] == 3  # the tiny preset on pixels
    assert (s["latent_size"], s["batch_size"], s["paired"], s["condition_tokens"], s["r"]) == (32, 3, True, 6, 16)
    assert (s["precision"], s["gradient_checkpointing"]) == ("bf16", True)
    assert (s["attention"], s["optimizer"]) == ("sdpa", "adamw8bit")
    assert (s["zero_stage"], s["world_size"], s["offload_optimizer"], s["offload_params"]) == (3, 2, True, False)
    assert (s["reduce_bucket_elements"], s["prefetch_elements"]) == (20_000_000, 1000)
    # Condition embeddings: good + 3 demo defect types + the null row, 6 tokens of width 32.
    assert s["extra_trainable_params"] == 5 * 6 * 32
    one, _ = plan_for_config(cfg, 1)
    two, _ = plan_for_config(cfg, 2)
    assert two.weights < one.weights and two.cpu_offload > 0  # ZeRO-3 splits the base; the optimizer is offloaded
    with pytest.raises(ValueError, match="world_size"):
        planner_settings(cfg, world_size=0)


def test_latents_and_a_local_pretrained_unet_config(tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from apo_fast.bench.plan_cli import planner_settings
    from apo_fast.config.unet_presets import UNET_PRESETS

    vae = AutoencoderKL(latent_channels=4, block_out_channels=(8, 16, 16), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        norm_num_groups=4)
    vae.save_config(tmp_path / "vae")  # config.json only: the planner reads no weights
    s = planner_settings(demo_config(None, ["model.latent=true", f"model.vae={tmp_path / 'vae'}",
                                                              "data.image_size=64"]))
    assert s["latent_size"] == 16  # 64 px / 4 pixels per latent (3 VAE blocks)
    unet_cfg = s["unet"] if isinstance(s["unet"], dict) else dict(UNET_PRESETS[s["unet"]])
    assert unet_cfg["in_channels"] == 4
    custom = dict(UNET_PRESETS["tiny"], block_out_channels=(16, 32), cross_attention_dim=24)
    UNet2DConditionModel(**custom).save_config(tmp_path / "sd" / "unet")
    s = planner_settings(demo_config(None, [f"model.pretrained={tmp_path / 'sd'}"]))
    assert s["unet"]["block_out_channels"] == [16, 32] and "_class_name" not in s["unet"]
    assert s["extra_trainable_params"] == 5 * 4 * 24


@pytest.mark.slow
def test_sd15_config_without_weights_needs_a_preset(tmp_path, capsys):
    from apo_fast.cli import main

    sd15 = str(REPO / "configs" / "sd15_mvtec.yaml")
    assert main(["plan-memory", "--config", sd15]) == 2
    assert "--unet sd15" in capsys.readouterr().err
    assert main(["plan-memory", "--config", sd15, "--unet", "sd15", "--gpu-gib", "8", "--world-size", "2",
                 "--set", "train.zero_stage=2"]) == 0
    out = capsys.readouterr().out
    assert "### Memory plan: sd15, latent 64x64, batch 4, rank 16, bf16" in out
    assert "ZeRO stage 2 on 2 rank(s)" in out and "preset sd15: peak" in out


def test_bad_arguments_exit_2(tmp_path, capsys):
    from apo_fast.cli import main

    cfg = write_cfg(tmp_path)
    assert main(["plan-memory", "--config", str(cfg), "--world-size", "0"]) == 2
    assert "world_size" in capsys.readouterr().err
    assert main(["plan-memory", "--config", str(cfg), "--gpu-gib", "-1"]) == 2
    assert "--gpu-gib" in capsys.readouterr().err
