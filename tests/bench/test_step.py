"""The Diffusion-DPO baseline, the step benchmark and the GPU suite's CPU dry run."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from apo_fast.bench.baseline_dpo import (
    BaselineDPOConfig,
    DiffusionDPOBaseline,
    dpo_loss_terms,
)
from apo_fast.losses import diffusion_dpo_loss

REPO = Path(__file__).resolve().parents[2]


def tiny_unet(channels: int = 3, seed: int = 0):
    from diffusers import UNet2DConditionModel

    from apo_fast.config.unet_presets import UNET_PRESETS

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        **dict(UNET_PRESETS["tiny"], in_channels=channels, out_channels=channels, sample_size=16)
    )


def scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type)


def pair_batch(b: int = 2, size: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(b, 6, size, size, generator=g) * 2 - 1
    ehs = torch.randn(b, 4, 32, generator=g)
    noise = torch.randn(b, 3, size, size, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    return pixels, ehs, noise, t


# --------------------------------------------------------------------------- baseline


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
def test_dpo_loss_terms_match_float64_formula_and_diffusion_dpo_loss(loss_type):
    g = torch.Generator().manual_seed(3)
    pred, ref, target = (torch.randn(6, 3, 5, 7, generator=g) for _ in range(3))
    pred.requires_grad_(True)
    terms = dpo_loss_terms(pred, ref, target, 40.0, loss_type)
    terms["loss"].backward()
    p64 = pred.detach().double().requires_grad_(True)
    e = (p64 - target.double()).pow(2).mean(dim=(1, 2, 3))
    e_ref = (ref.double() - target.double()).pow(2).mean(dim=(1, 2, 3))
    logits = (e_ref[:3] - e_ref[3:]) - (e[:3] - e[3:])
    loss64 = (
        -torch.nn.functional.logsigmoid(40.0 * logits).mean()
        if loss_type == "sigmoid"
        else torch.relu(1 - 40.0 * logits).mean()
    )
    loss64.backward()
    assert terms["loss"].item() == pytest.approx(loss64.item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(pred.grad.double(), p64.grad, rtol=1e-4, atol=1e-8)
    assert terms["raw_ref_loss"].item() == pytest.approx(e_ref.mean().item(), rel=1e-6)
    if loss_type == "sigmoid":
        ref_out = diffusion_dpo_loss(pred.detach(), ref, target, 40.0, convention="diffusers")
        assert terms["loss"].item() == pytest.approx(ref_out.metrics["loss"], rel=1e-6)
        assert terms["implicit_acc"].item() == pytest.approx(ref_out.metrics["implicit_acc"])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_baseline_step_loss_equals_diffusion_dpo_loss_on_the_same_inputs(prediction_type):
    """Inputs reconstructed by hand: noisy = add_noise(x0, noise, t) for the pair, the policy
    before the update, the reference = the adapter-free UNet; the step's loss equals
    apo_fast.loss.diffusion_dpo_loss(convention="diffusers") on those predictions."""
    unet = tiny_unet()
    plain = copy.deepcopy(unet)
    sched = scheduler(prediction_type)
    baseline = DiffusionDPOBaseline(unet, sched, None, BaselineDPOConfig(rank=4, beta_dpo=500.0), "cpu")
    with torch.no_grad():
        for p in baseline.params_to_optimize:  # gaussian init leaves lora_B at zero: make the policy differ
            p.normal_(0, 0.1)
    pixels, ehs, noise, t = pair_batch()
    x0 = torch.cat(pixels.chunk(2, dim=1))
    noise2, t2 = noise.repeat(2, 1, 1, 1), t.repeat(2)
    noisy = sched.add_noise(x0, noise2, t2)
    target = noise2 if prediction_type == "epsilon" else sched.get_velocity(x0, noise2, t2)
    with torch.no_grad():
        policy_before = unet(noisy, t2, ehs.repeat(2, 1, 1)).sample
        reference = plain(noisy, t2, ehs.repeat(2, 1, 1)).sample
    out = baseline.step(pixels, ehs, noise=noise, timesteps=t, return_predictions=True)
    torch.testing.assert_close(out.model_pred, policy_before, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.ref_pred, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.target, target)
    assert not torch.allclose(policy_before, reference)
    expected = diffusion_dpo_loss(policy_before, reference, target, 500.0, convention="diffusers")
    assert out.loss.item() == pytest.approx(expected.loss.item(), rel=1e-5)
    assert out.logs["loss"] == pytest.approx(expected.metrics["loss"], rel=1e-5)
    assert out.logs["raw_model_loss"] == pytest.approx(expected.metrics["e_theta"], rel=1e-5)
    assert out.logs["ref_loss"] == pytest.approx(expected.metrics["e_ref"], rel=1e-5)
    assert out.logs["implicit_acc"] == pytest.approx(expected.metrics["implicit_acc"])


def test_baseline_reference_pass_is_the_adapter_free_unet_and_training_moves_only_lora():
    unet = tiny_unet()
    plain = copy.deepcopy(unet)
    baseline = DiffusionDPOBaseline(unet, scheduler(), None, BaselineDPOConfig(rank=4, learning_rate=1e-2), "cpu")
    frozen_before = {n: p.detach().clone() for n, p in unet.named_parameters() if not p.requires_grad}
    pixels, ehs, _, _ = pair_batch()
    for _ in range(2):
        baseline.step(pixels, ehs)
    z = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([3, 250, 500, 990])
    c = torch.randn(4, 4, 32, generator=torch.Generator().manual_seed(6))
    ref = baseline.reference_forward(z, t, c)
    with torch.no_grad():
        expected = plain(z, t, c).sample
        policy = unet(z, t, c).sample
    torch.testing.assert_close(ref, expected, rtol=0, atol=0)
    assert (policy - expected).abs().max() > 1e-4  # the adapters learned something and are back on
    assert all(p.requires_grad for p in baseline.params_to_optimize)
    for n, p in unet.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), n


def test_baseline_with_vae_encodes_every_step_and_bf16_autocast_runs():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=16,
    )
    unet = tiny_unet(channels=4)
    baseline = DiffusionDPOBaseline(
        unet, scheduler(), vae, BaselineDPOConfig(rank=4, mixed_precision="bf16", vae_encode_batch_size=3), "cpu"
    )
    assert next(vae.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in baseline.params_to_optimize)  # peft follows the base (script)
    calls = []
    vae.encoder.register_forward_hook(lambda *a: calls.append(1))
    pixels, ehs, _, _ = pair_batch()
    out = baseline.step(pixels, ehs, return_predictions=True)
    assert len(calls) == 2  # 4 images in chunks of 3
    assert out.model_pred.shape == (4, 4, 8, 8) and out.model_pred.dtype == torch.float32
    assert torch.isfinite(out.loss)


def test_baseline_fp16_keeps_lora_in_float32():
    baseline = DiffusionDPOBaseline(
        tiny_unet(), scheduler(), None, BaselineDPOConfig(rank=2, mixed_precision="fp16"), "cpu"
    )
    assert all(p.dtype == torch.float32 for p in baseline.params_to_optimize)
    assert baseline.scaler is not None


def test_baseline_rejects_bad_inputs():
    with pytest.raises(ValueError, match="rank"):
        BaselineDPOConfig(rank=0)
    with pytest.raises(ValueError, match="mixed_precision"):
        BaselineDPOConfig(mixed_precision="int8")
    with pytest.raises(ValueError, match="loss_type"):
        BaselineDPOConfig(loss_type="ipo")
    with pytest.raises(TypeError, match="unet"):
        DiffusionDPOBaseline(torch.nn.Linear(2, 2), scheduler())
    baseline = DiffusionDPOBaseline(tiny_unet(), scheduler(), None, BaselineDPOConfig(rank=2), "cpu")
    pixels, ehs, noise, t = pair_batch()
    with pytest.raises(ValueError, match="pixel_values"):
        baseline.step(pixels[:, :5], ehs)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        baseline.step(pixels, ehs[:1])
    with pytest.raises(ValueError, match="noise"):
        baseline.step(pixels, ehs, noise=noise[:1])
    with pytest.raises(ValueError, match="timesteps"):
        baseline.step(pixels, ehs, timesteps=t.float())
    with pytest.raises(ValueError, match="adapters"):
        DiffusionDPOBaseline(baseline.unet, scheduler())


# --------------------------------------------------------------------------- benchmark


def test_step_bench_config_validation():
    from apo_fast.bench.step_config import StepBenchConfig

    for kwargs, words in [
        ({"model": "sd3"}, "model"),
        ({"batch": 0}, "batch"),
        ({"precision": "int8"}, "precision"),
        ({"resolution": 30}, "multiple of 8"),
        ({"gate": "x"}, "gate"),
        ({"attention": "flash"}, "attention"),
        ({"time_budget_s": -1}, "time_budget_s"),
    ]:
        with pytest.raises(ValueError, match=words):
            StepBenchConfig(**kwargs)


def test_phase_timer_on_cpu_adds_up():
    from apo_fast.bench.timing import PhaseTimer

    timer = PhaseTimer(torch.device("cpu"))
    timer.start()
    x = torch.randn(200, 200)
    timer.phase("policy_forward")
    for _ in range(3):
        x = x @ x.T / 200
    timer.phase("loss")
    timer.phase("policy_forward")  # a phase may come back; its times add up
    wall, phases = timer.stop()
    assert set(phases) == {"data", "policy_forward", "loss"}
    assert all(v >= 0 for v in phases.values())
    assert sum(phases.values()) <= wall + 1e-3


def test_bench_cli_tiny_writes_json_markdown_and_png(tmp_path):
    from apo_fast.bench.step_config import PHASES
    from apo_fast.cli import build_parser

    out = tmp_path / "bench"
    # the subcommand's own function: cli.main would also tear down the process group other tests share
    args = build_parser().parse_args(
        [
            "bench",
            "--model",
            "tiny",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--batch",
            "1",
            "--rank",
            "4",
            "--resolution",
            "16",
            "--output-dir",
            str(out),
            "--no-progress",
        ]
    )
    assert args.fn(args) == 0
    result = json.loads((out / "bench.json").read_text())
    for key in (
        "schema",
        "date",
        "config",
        "machine",
        "notes",
        "apo_fast",
        "baseline",
        "ratios",
        "telemetry",
        "per_step",
        "files",
        "build_and_warmup_s",
    ):
        assert key in result, key
    for side in ("apo_fast", "baseline"):
        s = result[side]
        for key in (
            "samples_per_s",
            "pairs_per_s",
            "step_time_s",
            "breakdown_s",
            "peak_memory_mib",
            "peak_memory_kind",
            "setup",
            "loss_last",
        ):
            assert key in s, (side, key)
        assert set(s["breakdown_s"]) == set(PHASES)
        assert s["samples_per_s"] > 0 and s["steps"] == 2 and len(result["per_step"][side]) == 2
        # the timer saw every part of the step
        assert all(s["breakdown_s"][p] > 0 for p in ("policy_forward", "reference_forward", "backward", "optimizer"))
    assert result["apo_fast"]["setup"]["engine"] == "deepspeed"
    assert result["ratios"]["samples_per_s"] == pytest.approx(
        result["apo_fast"]["samples_per_s"] / result["baseline"]["samples_per_s"]
    )
    assert result["ratios"]["peak_memory"] is None  # CPU: process RSS only
    assert result["telemetry"]["kind"] == "rss"
    md = (out / "bench.md").read_text()
    assert "apo-fast / baseline" in md and "policy_forward" in md
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- GPU suite


def _load_suite():
    spec = importlib.util.spec_from_file_location("apo_fast_gpu_suite", REPO / "benchmarks" / "gpu_suite.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_gpu_suite_dry_run_on_cpu_completes_and_writes_its_files(tmp_path, capsys):
    suite = _load_suite()
    out = tmp_path / "suite"
    rc = suite.main(["--dry-run", "--in-process", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    data = json.loads((out / "suite.json").read_text())
    assert list(data["parts"]) == list(suite.PART_NAMES)
    assert {name: rec["status"] for name, rec in data["parts"].items()} == {n: "ok" for n in suite.PART_NAMES}
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(
        [
            "suite.json",
            "SUMMARY.md",
            "suite.log",
            "step_sd15.png",
            "step_sdxl.png",
            "loss_kernels.json",
            "gated_lora_kernels.json",
        ]
    )
    assert len(files) <= 8  # what the device tool brings back
    assert not data["parts"]["correctness"]["result"]["failures"]
    step = data["parts"]["step_sd15"]["result"]["result"]
    assert step["config"]["model"] == "tiny" and step["ratios"]["samples_per_s"] > 0
    mem = data["parts"]["memory_sd15"]["result"]["cases"][0]
    assert mem["status"] == "ok" and mem["plan_allocated_mib"] > 0
    # the short table comes last
    assert printed.strip().splitlines()[0].startswith("[suite]")
    assert "== apo-fast GPU suite (dry run)" in printed.strip().splitlines()[-len(suite.PART_NAMES) - 2]
    assert "## step_sd15" in (out / "SUMMARY.md").read_text()


def test_gpu_suite_isolated_part_and_budget_skip(tmp_path, capsys):
    suite = _load_suite()
    out = tmp_path / "suite"
    rc = suite.main(["--dry-run", "--only", "env,step_sdxl", "--budget-s", "40", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "suite.json").read_text())
    assert data["parts"]["env"]["status"] == "ok"  # ran in its own process
    assert data["parts"]["env"]["result"]["device"] == "cpu"
    assert data["parts"]["step_sdxl"]["status"] == "skipped"  # needs 50 s of the 40 s budget
    with pytest.raises(SystemExit):
        suite.main(["--only", "nope"])


def test_time_per_call_runs_warmup_then_rounds_of_reps():
    from apo_fast.bench.timing import time_per_call

    calls = []
    seconds = time_per_call(lambda: calls.append(1), torch.device("cpu"), warmup=2, reps=3, rounds=4)
    assert len(calls) == 2 + 3 * 4 and seconds >= 0.0


def test_interrupted_bench_reports_the_whole_rounds_measured(tmp_path, monkeypatch):
    """Ctrl-C in the middle of round 3: the result keeps rounds 1-2 of both sides, says it was
    interrupted, and the CLI writes it and exits 130."""
    import apo_fast.bench.step as bench
    from apo_fast.cli import build_parser

    calls = {"n": 0}
    original = bench.BaselineSide.step

    def step(self, timer):
        calls["n"] += 1
        if calls["n"] == 1 + 3:  # 1 warmup, then the baseline's step of round 3
            raise KeyboardInterrupt
        return original(self, timer)

    monkeypatch.setattr(bench.BaselineSide, "step", step)
    out = tmp_path / "bench"
    args = build_parser().parse_args(
        ["bench", "--model", "tiny", "--steps", "6", "--warmup", "1", "--batch", "1", "--rank", "4",
         "--resolution", "16", "--output-dir", str(out), "--no-progress"]
    )
    assert args.fn(args) == 130
    result = json.loads((out / "bench.json").read_text())
    assert result["config"]["interrupted"] is True and result["config"]["steps_done"] == 2
    assert len(result["per_step"]["apo_fast"]) == len(result["per_step"]["baseline"]) == 2
    assert (out / "bench.md").is_file() and (out / "bench.png").is_file()
