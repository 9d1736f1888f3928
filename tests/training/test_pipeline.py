"""End to end on the PyTorch reference path: config, training, exact resume, sampling, CLI."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from apo_fast.config import ConfigError, config_from_dict, load_config
from apo_fast.demo import DEMO_CONFIG, demo_config
from apo_fast.sampling.hierarchical import grow_mask

REPO = Path(__file__).resolve().parents[2]


def tiny_cfg(out: Path, *overrides: str):
    base = [
        "data.image_size=16",
        "train.batch_size=4",
        "train.log_every=1",
        "train.progress=false",
        "train.device=cpu",
        "sample.num_inference_steps=4",
        "sample.num_per_defect=2",
        "sample.batch_size=2",
        "pretrain.steps=3",
        "pretrain.batch_size=4",
    ]
    return demo_config(str(out), base + list(overrides))


def run_train(cfg):
    from apo_fast.training.trainer import APOTrainer

    trainer = APOTrainer(cfg)
    try:
        return trainer.train()
    finally:
        trainer.close()


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- config


def test_demo_yaml_matches_builtin_demo_config():
    assert load_config(REPO / "configs" / "demo.yaml") == demo_config(DEMO_CONFIG["output_dir"])


def test_sd15_config_loads():
    cfg = load_config(REPO / "configs" / "sd15_mvtec.yaml")
    assert cfg.model.latent and cfg.optim.name == "adamw8bit" and cfg.train.mixed_precision == "bf16"


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.steps=0", "train.steps"),
        ("loss.mode=pairwise", "loss.mode"),
        ("train.bogus=1", "train.bogus"),
        ("adapter.r=x", "adapter.r"),
        ("adapter.rank=x", "adapter.r"),  # the 0.1 name, read as r
        ("train.offload_optimizer=true", "zero_stage"),
        ("data.image_size=30", "multiple of 8"),
        ("loss.lambda_mask=0.5", "lambda_mask"),
        ("sample.s_text=[[0.5, 1.0], [0.2, 2.0]]", "sample.s_text"),
        ("adapter.gate.r_min=9", "r_min"),
        ("optim.name=sgd", "optim.name"),
        ("sample.resample=0", "sample.resample"),
        ("sample.stop_t=-2", "sample.stop_t"),
        ("sample.guide_dilate=-1", "sample.guide_dilate"),
        ("sample.guide_dilate=1.5", "sample.guide_dilate"),
        ("adapter.mask_time=maybe", "adapter.mask_time"),
    ],
)
def test_bad_config_values_name_the_key(override, words):
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        config_from_dict(json.loads(json.dumps(DEMO_CONFIG)), [override])


def test_bad_yaml_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


# --------------------------------------------------------------------------- training


@pytest.mark.slow
def test_training_resumes_exactly_and_writes_a_loadable_run(tmp_path):
    straight = tmp_path / "straight"
    run_train(tiny_cfg(straight, "train.steps=4", "train.checkpoint_every=2"))
    interrupted = tmp_path / "interrupted"
    run_train(tiny_cfg(interrupted, "train.steps=2", "train.checkpoint_every=2"))
    # "Kill" after step 2: a later run with the full step count picks up the checkpoint.
    run_train(tiny_cfg(interrupted, "train.steps=4", "train.checkpoint_every=2"))
    a, b = read_log(straight), read_log(interrupted)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for key in ("loss", "e_theta", "e_ref", "implicit_acc"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-6, abs=1e-9), (ra["step"], key)
    # The per-step metrics are those APO_SPEC names.
    assert {"loss", "e_theta", "e_ref", "reward_w", "implicit_acc", "beta_t"} <= set(a[-1])
    # Adapters and condition embeddings were exported, in the peft/diffusers layout.
    from safetensors.torch import load_file

    lora = load_file(str(straight / "adapters" / "pytorch_lora_weights.safetensors"))
    assert lora and all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in lora)
    assert any(v.abs().sum() > 0 for k, v in lora.items() if ".lora_B." in k)  # B left zero-init: trained
    ckpts = sorted(p.name for p in (straight / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert ckpts == ["step-000002", "step-000004"]
    assert not list((straight / "checkpoints").glob(".*tmp"))  # no half-written checkpoint left


def test_resume_on_another_thread_count_warns_that_it_is_not_bit_exact(tmp_path, caplog):
    """Float sums split over a different number of threads round differently, so a
    checkpoint records its run's thread count and a resume on another one says so."""
    import logging

    out = tmp_path / "run"
    before = torch.get_num_threads()
    run_train(tiny_cfg(out, "train.steps=1", "train.checkpoint_every=1"))
    state = json.loads((out / "checkpoints" / "step-000001" / "client_state.json").read_text())
    assert state["threads"] == before
    other = before + 1
    try:
        torch.set_num_threads(other)
        with caplog.at_level(logging.WARNING, logger="apo_fast.training.trainer"):
            run_train(tiny_cfg(out, "train.steps=2", "train.checkpoint_every=1"))
    finally:
        torch.set_num_threads(before)
    said = [r.getMessage() for r in caplog.records if "CPU thread" in r.getMessage()]
    assert len(said) == 1 and f"on {before} CPU thread(s) and this one runs on {other}" in said[0], said
    assert f"train.threads={before}" in said[0]
    state = json.loads((out / "checkpoints" / "step-000002" / "client_state.json").read_text())
    assert state["threads"] == other


def test_cosine_lr_schedule_follows_its_formula_and_resumes_exactly(tmp_path, monkeypatch):
    """optim.lr_schedule=cosine: the logged learning rate is the warmup ramp times half a cosine
    to 0 at train.steps (written out here, not taken from the code), and a run killed after its
    step-3 checkpoint and resumed logs the same rates and losses as the uninterrupted one."""
    from apo_fast.training.trainer import APOTrainer

    cfg = ("train.steps=6", "optim.lr_schedule=cosine", "optim.warmup_steps=3", "optim.lr=0.003", "train.checkpoint_every=3")
    straight = tmp_path / "straight"
    run_train(tiny_cfg(straight, *cfg))
    interrupted = tmp_path / "interrupted"
    own = APOTrainer.micro_step

    def killed_at_step_3(self, step, micro):
        if step == 3:
            raise KeyboardInterrupt("killed")
        return own(self, step, micro)

    with monkeypatch.context() as m:
        m.setattr(APOTrainer, "micro_step", killed_at_step_3)
        with pytest.raises(KeyboardInterrupt):
            run_train(tiny_cfg(interrupted, *cfg))
    assert [r["step"] for r in read_log(interrupted)] == [1, 2, 3]
    run_train(tiny_cfg(interrupted, *cfg))
    a, b = read_log(straight), read_log(interrupted)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for r in a:  # the rate the next step will use (the scheduler has stepped past step r["step"])
        s = r["step"]
        assert r["lr"] == pytest.approx(0.003 * min(1.0, (s + 1) / 3) * 0.5 * (1 + math.cos(math.pi * s / 6)), rel=1e-12, abs=1e-15)
    assert a[-1]["lr"] == pytest.approx(0.0, abs=1e-15) and a[0]["lr"] < a[1]["lr"]
    for ra, rb in zip(a, b):
        assert rb["lr"] == ra["lr"]
        for key in ("loss", "e_theta", "e_ref"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-6, abs=1e-9), (ra["step"], key)


def test_lr_schedule_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="optim.lr_schedule must be one of constant, cosine; got 'linear'"):
        tiny_cfg(tmp_path, "optim.lr_schedule=linear")


@pytest.mark.slow
def test_paired_mode_trains_with_normals_as_losers(tmp_path):
    out = tmp_path / "paired"
    run_train(tiny_cfg(out, "train.steps=2", "loss.mode=paired", "train.batch_size=2"))
    rec = read_log(out)[-1]
    assert "reward_l" in rec and 0.0 <= rec["implicit_acc"] <= 1.0


def test_paired_batches_share_noise_and_timestep(tmp_path):
    from apo_fast.training.streaming import load_train_data
    from apo_fast.training.trainer import APOTrainer

    cfg = tiny_cfg(tmp_path, "loss.mode=paired", "train.batch_size=3")
    trainer = APOTrainer(cfg)
    trainer.data = load_train_data(cfg)
    trainer.world, trainer.rank, trainer.augment_mode = 1, 0, "dihedral"
    x0, masks, conds, t, noise = trainer.batch_for_step(5, 0)
    assert x0.shape[0] == 6 and torch.equal(t[:3], t[3:]) and torch.equal(noise[:3], noise[3:])
    assert torch.equal(conds[:3], conds[3:]) and masks[3:].sum() == 0 and masks[:3].sum() > 0
    again = trainer.batch_for_step(5, 0)
    assert all(torch.equal(u, v) for u, v in zip((x0, masks, conds, t, noise), again))


def test_defect_removed_losers_are_the_winners_with_product_under_the_mask(tmp_path):
    """``loss.negative=defect_removed``: a loser is its winner outside the mask and the normal
    image (the one ``negative=normal`` pairs it with) under it, and carries the winner's mask."""
    from apo_fast.training.streaming import load_train_data
    from apo_fast.training.trainer import APOTrainer

    batches = {}
    for negative in ("normal", "defect_removed"):
        cfg = tiny_cfg(tmp_path / negative, "loss.mode=paired", "train.batch_size=3", f"loss.negative={negative}")
        trainer = APOTrainer(cfg)
        trainer.data = load_train_data(cfg)
        trainer.world, trainer.rank, trainer.augment_mode = 1, 0, "dihedral"
        batches[negative] = trainer.batch_for_step(4, 0)
    (x_n, m_n, *rest_n), (x_d, m_d, *rest_d) = batches["normal"], batches["defect_removed"]
    assert all(torch.equal(u, v) for u, v in zip(rest_n, rest_d))  # same conditions, t and noise
    assert torch.equal(x_d[:3], x_n[:3]) and torch.equal(m_d[:3], m_n[:3]) and torch.equal(m_d[3:], m_d[:3])
    m = m_d[:3].double()
    assert 0 < m.mean() < 1
    expected = x_n[:3].double() * (1 - m) + x_n[3:].double() * m
    torch.testing.assert_close(x_d[3:].double(), expected, rtol=0, atol=1e-6)
    outside = (m == 0).expand_as(expected)
    assert torch.equal(x_d[3:][outside], x_d[:3][outside])  # outside the mask: the winner, exactly
    assert not torch.equal(x_d[3:], x_d[:3])


def test_loss_negative_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="loss.negative must be one of normal, defect_removed; got 'inpaint'"):
        tiny_cfg(tmp_path, "loss.mode=paired", "loss.negative=inpaint")


@pytest.mark.parametrize("mode", ["unpaired", "diffusion"])
def test_area_mask_weight_reaches_the_loss(tmp_path, monkeypatch, mode):
    """``loss.mask_weight=area``: the loss (APO and the plain-LoRA baseline alike) gets each
    training mask divided by its area (per-sample mean 1), ``sqrt_area`` by the area's square
    root; ``pixel`` passes the binary mask."""
    import apo_fast.losses as losses
    import apo_fast.training.trainer as trainer_mod

    seen = []
    apo, diff = losses.apo_loss, trainer_mod.diffusion_loss

    def spy_apo(*args, mask=None, **kwargs):
        seen.append(mask.detach().clone())
        return apo(*args, mask=mask, **kwargs)

    def spy_diff(pred, target, mask, lambda_mask):
        seen.append(mask.detach().clone())
        return diff(pred, target, mask, lambda_mask)

    monkeypatch.setattr(losses, "apo_loss", spy_apo)
    monkeypatch.setattr(trainer_mod, "diffusion_loss", spy_diff)
    for kind in ("pixel", "area", "sqrt_area"):
        seen.clear()
        run_train(tiny_cfg(tmp_path / kind, "train.steps=2", f"loss.mode={mode}", f"loss.mask_weight={kind}"))
        assert len(seen) == 2
        for m in seen:
            means = m.flatten(1).mean(dim=1)
            assert (means > 0).all()  # every training sample is a real anomaly with a mask
            if kind == "area":
                torch.testing.assert_close(means, torch.ones_like(means))
                assert m.max() > 1
            elif kind == "sqrt_area":  # a binary mask / sqrt(area): its value is 1 / sqrt(area) = 1 / its mean
                torch.testing.assert_close(m.flatten(1).amax(dim=1) * means, torch.ones_like(means))
                assert (means < 1).all() and m.max() > 1
            else:
                assert set(m.unique().tolist()) <= {0.0, 1.0} and (means < 1).all()


def test_loss_mask_weight_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="loss.mask_weight must be one of pixel, area, sqrt_area; got 'volume'"):
        tiny_cfg(tmp_path, "loss.mask_weight=volume")


def test_stream_indices_cover_each_epoch_once():
    from apo_fast.training.streaming import stream_indices

    idx = stream_indices(7, seed=3, start=0, count=21)
    for e in range(3):
        assert sorted(idx[7 * e : 7 * e + 7].tolist()) == list(range(7))
    assert torch.equal(stream_indices(7, 3, 5, 9), idx[5:14])


# --------------------------------------------------------------------------- sampling


def test_schedule_value_piecewise():
    from apo_fast.sampling.hierarchical import schedule_value

    assert schedule_value(2.5, 3, 10) == 2.5
    spec = [[0.0, 5.0], [0.5, 1.0]]
    assert schedule_value(spec, 0, 10) == 5.0 and schedule_value(spec, 4, 10) == 5.0
    assert schedule_value(spec, 5, 10) == 1.0 and schedule_value(spec, 9, 10) == 1.0


def test_localization_mask_marks_the_peak():
    from apo_fast.sampling.hierarchical import localization_mask

    acc = torch.zeros(2, 8, 8)
    acc[0, 2:4, 2:4] = 5.0
    acc[1, 5:7, 1:3] = 1.0
    maps, masks = localization_mask(acc, (16, 16), sigma=0.5, threshold=0.5)
    assert maps.shape == masks.shape == (2, 1, 16, 16)
    assert masks[0, 0, 4:8, 4:8].mean() > 0.9 and masks[0, 0, 10:, 10:].sum() == 0
    assert masks[1, 0, 10:14, 2:6].mean() > 0.9 and masks[1, 0, :6].sum() == 0


@pytest.mark.slow
def test_sampling_free_and_mask_guided(tmp_path):
    from apo_fast.sampling.runs import (
        generate_for_defect,
        heldout_guides,
        load_run,
        sample_run,
    )

    out = tmp_path / "run"
    run_train(tiny_cfg(out, "train.steps=1"))
    res = sample_run(out, num=2, progress=False)
    for defect in ("crack", "hole", "stain"):
        for kind in ("free", "guided"):
            folder = out / "samples" / defect / kind
            assert sorted(p.name for p in folder.iterdir()) == ["0000.png", "0000_mask.png", "0001.png", "0001_mask.png"]
    assert (out / "samples" / "grid.png").stat().st_size > 0 and res["defects"]["hole"]["guided"] == 2
    # Mask-guided: outside the mask (grown by sample.guide_dilate) the normal image is kept
    # exactly (pixel space).
    run = load_run(out, device="cpu")
    known, kmask = heldout_guides(run.cfg, "hole", 2)
    imgs, masks, _ = generate_for_defect(run, "hole", 2, known_images=known, known_masks=kmask)
    outside = (1 - grow_mask(kmask, run.cfg.sample.guide_dilate)).bool().expand_as(imgs)
    assert torch.allclose(imgs[outside], known.clamp(-1, 1)[outside], atol=1e-6)
    assert torch.equal(masks, kmask)
    assert not torch.allclose(imgs[~outside], known[~outside], atol=1e-3)
    with pytest.raises(ValueError, match="unknown defect type"):
        generate_for_defect(run, "scratch", 1)


def test_renoise_takes_a_sample_back_to_the_earlier_noise_level():
    """RePaint's jump: z at level abar_prev, re-noised with ratio abar_t / abar_prev, is x0 at
    level abar_t: mean sqrt(abar_t) x0 and variance 1 - abar_t (float64; the bound is 6 standard
    errors of a variance estimated from n samples, sqrt(2 / n) relative)."""
    from apo_fast.sampling.hierarchical import _renoise

    n = 200_000
    g = torch.Generator().manual_seed(5)
    x0 = torch.full((n,), 0.7, dtype=torch.float64)
    a_prev, a_t = torch.tensor(0.9, dtype=torch.float64), torch.tensor(0.35, dtype=torch.float64)
    z = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * torch.randn(n, generator=g, dtype=torch.float64)
    back = _renoise(z, a_t / a_prev, g, "cpu").double()
    se = 6 * (2 / n) ** 0.5
    assert back.mean().item() == pytest.approx(a_t.sqrt().item() * 0.7, abs=6 * (1 / n) ** 0.5)
    assert back.var().item() == pytest.approx(1 - a_t.item(), rel=se)
    assert torch.equal(_renoise(z, torch.tensor(1.0, dtype=torch.float64), g, "cpu"), z)


@pytest.mark.slow
def test_resampled_guided_generation_keeps_the_outside_and_repeats_the_steps(tmp_path):
    """sample.resample = r: every step but the last runs r times (3 UNet batches each: the two
    reference ones in one call, the policy's), the outside of the mask is still the normal image
    exactly, the inside differs from r = 1, and r = 1 is the plain sampler."""
    from apo_fast.sampling.runs import generate_for_defect, heldout_guides, load_run

    out = tmp_path / "run"
    run_train(tiny_cfg(out, "train.steps=1"))
    run = load_run(out, device="cpu")
    known, kmask = heldout_guides(run.cfg, "hole", 2)
    calls = []

    def counting(sample, timestep, kwargs):
        calls.append(int(timestep[0]))
        return run.unet(sample, timestep, **kwargs).sample

    run.unet_call = counting
    plain = generate_for_defect(run, "hole", 2, seed=4, known_images=known, known_masks=kmask)
    steps = len(set(calls))
    assert len(calls) == 2 * steps
    run.cfg.sample.resample = 3
    calls.clear()
    imgs, masks, _ = generate_for_defect(run, "hole", 2, seed=4, known_images=known, known_masks=kmask)
    assert len(calls) == 2 * (3 * (steps - 1) + 1)
    outside = (1 - grow_mask(kmask, run.cfg.sample.guide_dilate)).bool().expand_as(imgs)
    assert torch.allclose(imgs[outside], known.clamp(-1, 1)[outside], atol=1e-6)
    assert torch.equal(masks, kmask)
    assert not torch.allclose(imgs[~outside], plain[0][~outside], atol=1e-3)
    run.cfg.sample.resample = 1
    again = generate_for_defect(run, "hole", 2, seed=4, known_images=known, known_masks=kmask)
    assert torch.equal(again[0], plain[0])
    run.cfg.sample.resample = 0
    with pytest.raises(ValueError, match="resample must be an int >= 1"):
        generate_for_defect(run, "hole", 1)


def test_grow_mask_is_a_square_max_filter():
    """grow_mask(m, p): a pixel is in the grown mask iff some mask pixel lies within p in both
    axes (written out with loops on random masks of odd sizes); p = 0 returns the mask."""
    g = torch.Generator().manual_seed(11)
    for h, w, p in ((7, 5, 1), (9, 13, 2), (3, 3, 4)):
        m = (torch.rand(2, 1, h, w, generator=g) > 0.85).double()
        want = torch.zeros_like(m)
        for b, i, j in ((b, i, j) for b in range(2) for i in range(h) for j in range(w)):
            want[b, 0, i, j] = m[b, 0, max(0, i - p) : i + p + 1, max(0, j - p) : j + p + 1].max()
        assert torch.equal(grow_mask(m, p), want)
    assert grow_mask(m, 0) is m


@pytest.mark.slow
def test_guide_dilate_changes_a_ring_around_the_mask_and_keeps_the_rest(tmp_path):
    """sample.guide_dilate = p: outside the mask grown by p the normal image is kept exactly, the
    ring between the mask and the grown mask is generated (differs from the normal image), the
    returned mask is the given one; with p = 0 only the mask itself changes."""
    from apo_fast.sampling.runs import generate_for_defect, heldout_guides, load_run

    out = tmp_path / "run"
    run_train(tiny_cfg(out, "train.steps=1", "sample.num_inference_steps=5"))
    run = load_run(out, device="cpu")
    known, kmask = heldout_guides(run.cfg, "crack", 2)
    run.cfg.sample.guide_dilate = 0
    plain = generate_for_defect(run, "crack", 2, seed=4, known_images=known, known_masks=kmask)
    run.cfg.sample.guide_dilate = 2
    imgs, masks, _ = generate_for_defect(run, "crack", 2, seed=4, known_images=known, known_masks=kmask)
    grown = grow_mask(kmask, 2)
    outside = (1 - grown).bool().expand_as(imgs)
    ring = (grown - kmask).bool().expand_as(imgs)
    assert ring.any() and outside.any()
    assert torch.allclose(imgs[outside], known.clamp(-1, 1)[outside], atol=1e-6)
    assert (imgs[ring] - known.clamp(-1, 1)[ring]).abs().mean() > 1e-2
    assert torch.equal(masks, kmask)
    # p = 0: only the mask itself changes
    outside0 = (1 - kmask).bool().expand_as(imgs)
    assert torch.allclose(plain[0][outside0], known.clamp(-1, 1)[outside0], atol=1e-6)
    assert not torch.equal(plain[0], imgs)


@pytest.mark.slow
def test_stop_t_ends_on_the_predicted_clean_image(tmp_path):
    """sample.stop_t: sampling ends at the first step with t <= stop_t; the image is that step's
    predicted x0 (DDIM's pred_original_sample, recomputed here from the policy and reference
    calls of that step), the normal image outside a guide mask; -1 runs every step."""
    from apo_fast.models import build_scheduler
    from apo_fast.sampling.runs import generate_for_defect, heldout_guides, load_run

    out = tmp_path / "run"
    run_train(tiny_cfg(out, "train.steps=1", "sample.num_inference_steps=5"))
    run = load_run(out, device="cpu")
    known, kmask = heldout_guides(run.cfg, "hole", 2)
    calls = []

    def recording(sample, timestep, kwargs):
        res = run.unet(sample, timestep, **kwargs).sample
        calls.append((int(timestep[0]), sample.clone(), res.clone()))
        return res

    run.unet_call = recording
    full = generate_for_defect(run, "hole", 2, seed=4, known_images=known, known_masks=kmask)
    ts = sorted({t for t, _, _ in calls}, reverse=True)
    assert len(ts) == 5
    stop_at = ts[2]  # the third step
    run.cfg.sample.stop_t = stop_at + 1  # any value in [stop_at, previous step) stops there
    calls.clear()
    imgs, masks, _ = generate_for_defect(run, "hole", 2, seed=4, known_images=known, known_masks=kmask)
    assert sorted({t for t, _, _ in calls}, reverse=True) == ts[:3]
    # the last step's three predictions (reference unconditional and conditional in one call, policy)
    (t_ref, z, e_ref), (t_pol, _, e_pol) = calls[-2], calls[-1]
    assert t_ref == t_pol == stop_at
    e_u, e_c = e_ref.chunk(2)
    s = run.cfg.sample
    v = e_u + s.s_text * (e_c - e_u) + s.s_align * (e_pol - e_c)
    a = build_scheduler(run.cfg.model, "ddim").alphas_cumprod[stop_at]
    z = z[: v.shape[0]]
    x0 = a.sqrt() * z - (1 - a).sqrt() * v if run.cfg.model.prediction_type == "v_prediction" else None
    x0 = x0 if x0 is not None else (z - (1 - a).sqrt() * v) / a.sqrt()
    grown = grow_mask(kmask, s.guide_dilate)
    want = (grown * x0 + (1 - grown) * known).clamp(-1, 1)
    torch.testing.assert_close(imgs, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(masks, kmask) and not torch.allclose(imgs, full[0], atol=1e-3)
    run.cfg.sample.stop_t = -1
    assert torch.equal(generate_for_defect(run, "hole", 2, seed=4, known_images=known, known_masks=kmask)[0], full[0])


def test_compiled_sampling_gives_the_eager_samples(tmp_path):
    """sample.compile (Dynamo-traced, eager backend: the traced code, not Inductor's CPU codegen):
    free and mask-guided samples equal the uncompiled ones; the reference pass (adapters off as
    data) ran inside the compiled call."""
    from apo_fast.sampling.runs import generate_for_defect, heldout_guides, load_run

    out = tmp_path / "run"
    run_train(tiny_cfg(out, "train.steps=2", "sample.compile.backend=eager"))
    eager, compiled = load_run(out, device="cpu"), load_run(out, device="cpu", compile=True)
    assert eager.unet_call is None and compiled.unet_call is not None
    known, kmask = heldout_guides(eager.cfg, "hole", 2)
    for kwargs in ({}, {"known_images": known, "known_masks": kmask}):
        a = generate_for_defect(eager, "hole", 2, seed=3, **kwargs)
        b = generate_for_defect(compiled, "hole", 2, seed=3, **kwargs)
        for x, y in zip(a, b):
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- CLI


def test_cli_reports_config_errors(tmp_path, capsys):
    from apo_fast.cli import main

    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--config", str(REPO / "configs" / "demo.yaml"), "--set", "train.steps=-1"]) == 2
    assert "train.steps" in capsys.readouterr().err


def test_missing_dataset_is_a_clear_error(tmp_path):
    from apo_fast.training.trainer import APOTrainer

    cfg = tiny_cfg(tmp_path, f"data.root={tmp_path / 'nowhere'}")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        APOTrainer(cfg).setup()


@pytest.mark.slow
def test_plain_diffusion_baseline_mode_trains(tmp_path):
    out = tmp_path / "lora"
    run_train(tiny_cfg(out, "train.steps=2", "loss.mode=diffusion", "adapter.gate.kind=constant"))
    rec = read_log(out)[-1]
    assert rec["loss"] == pytest.approx(rec["e_theta"]) and rec["loss"] > 0


def test_cond_lr_zero_freezes_the_condition_embeddings(tmp_path):
    from safetensors.torch import load_file

    from apo_fast.training.trainer import APOTrainer

    out = tmp_path / "frozen_cond"
    trainer = APOTrainer(tiny_cfg(out, "train.steps=2", "optim.cond_lr=0")).setup()
    try:
        conditions = trainer.engine.module.conditions
        before = {k: v.detach().clone() for k, v in conditions.state_dict().items()}
        assert not any(p.requires_grad for p in conditions.parameters())
        trainer.train()
    finally:
        trainer.close()
    after = conditions.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    lora = load_file(str(out / "adapters" / "pytorch_lora_weights.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in lora.items() if ".lora_B." in k)  # the adapters did train


@pytest.mark.slow
def test_sdxl_style_unet_trains_and_samples_with_pooled_conditions(tmp_path):
    """UNets with addition_embed_type='text_time' (SDXL) get a learned pooled vector and time_ids."""
    from safetensors.torch import load_file

    from apo_fast.sampling.runs import generate_for_defect, load_run

    out = tmp_path / "xl"
    unet = '{"addition_embed_type": "text_time", "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 80}'
    run_train(tiny_cfg(out, "train.steps=2", f"model.unet={unet}"))
    saved = load_file(str(out / "adapters" / "conditions.safetensors"))
    assert saved["pooled/brick/hole"].shape == (80 - 6 * 8,)
    run = load_run(out, device="cpu")
    imgs, masks, _ = generate_for_defect(run, "hole", 1)
    assert imgs.shape == (1, 3, 16, 16) and torch.isfinite(imgs).all()


def test_demo_without_progress_silences_the_training_bar(tmp_path, monkeypatch):
    import apo_fast.training.pretrain as pretrain
    import apo_fast.training.trainer as train
    from apo_fast.demo import run_demo

    seen = {}

    class Stop(Exception):
        pass

    class RecordingTrainer:
        def __init__(self, cfg, resume=True):
            seen["progress"] = cfg.train.progress
            raise Stop

    monkeypatch.setattr(pretrain, "pretrain_base", lambda cfg, out, progress=True: seen.setdefault("pre", progress))
    monkeypatch.setattr(train, "APOTrainer", RecordingTrainer)
    state = {}
    with pytest.raises(Stop):
        run_demo(demo_config(str(tmp_path / "demo")), progress=False, state=state, rebuild_base=True)
    assert seen == {"pre": False, "progress": False}
    assert state["phase"] == "APO"  # what the CLI names on Ctrl-C


def test_demo_metrics_window_mean(tmp_path):
    from apo_fast.demo import _tail_mean

    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": i, "loss": float(i)}) + "\n" for i in range(1, 31)))
    assert _tail_mean(log, "loss", 20) == pytest.approx(sum(range(11, 31)) / 20)
    assert _tail_mean(log, "implicit_acc", 10) is None


def test_demo_copies_the_matching_shipped_base_and_trains_otherwise(tmp_path, monkeypatch):
    """A shipped base is used only when its build.json holds the demo's own settings."""
    import apo_fast.demo as demo
    import apo_fast.training.base as base_choice
    import apo_fast.training.pretrain as pretrain
    import apo_fast.training.trainer as train

    class Stop(Exception):
        pass

    def no_trainer(cfg, resume=True):
        raise Stop

    shipped = tmp_path / "shipped"
    base = shipped / "brick"
    (base / "base_unet").mkdir(parents=True)
    (base / "base_unet" / "config.json").write_text("{}")
    (base / "base_conditions.safetensors").write_bytes(b"x")
    cfg = demo_config(str(tmp_path / "run"))
    (base / "build.json").write_text(json.dumps({**base_choice.base_build_record(cfg), "command": "tools/build_demo_base.py"}))
    monkeypatch.setattr(base_choice, "SHIPPED_BASES", shipped)
    monkeypatch.setattr(train, "APOTrainer", no_trainer)
    trained = []
    monkeypatch.setattr(pretrain, "pretrain_base", lambda cfg, out, progress=True: trained.append(out))
    with pytest.raises(Stop):
        demo.run_demo(cfg, progress=False)
    assert not trained and (tmp_path / "run" / "base" / "base_unet" / "config.json").is_file()
    # other settings: the shipped base does not match, the demo trains its own
    other = demo_config(str(tmp_path / "run2"), ["pretrain.steps=10"])
    found, why = base_choice.shipped_base(other)
    assert found is None and "pretrain" in why
    with pytest.raises(Stop):
        demo.run_demo(other, progress=False)
    assert trained == [tmp_path / "run2" / "base"]


def test_compiled_training_matches_eager_and_resumes_exactly(tmp_path):
    """train.compile (Inductor on the CPU) for two dozen demo steps: the losses follow the eager
    run's within 1e-3 (relative; two fp32 implementations whose rounding the optimizer carries
    forward), the compile time is logged apart, and a compiled run resumed at step 12 repeats
    the uninterrupted compiled run to 1e-6."""
    common = ("train.steps=24", "train.checkpoint_every=12")
    eager = tmp_path / "eager"
    run_train(tiny_cfg(eager, *common))
    straight = tmp_path / "compiled"
    summary = run_train(tiny_cfg(straight, *common, "train.compile=true"))
    interrupted = tmp_path / "interrupted"
    run_train(tiny_cfg(interrupted, "train.steps=12", "train.checkpoint_every=12", "train.compile=true"))
    run_train(tiny_cfg(interrupted, *common, "train.compile=true"))
    e, c, r = read_log(eager), read_log(straight), read_log(interrupted)
    assert [x["step"] for x in c] == [x["step"] for x in r] == list(range(1, 25))
    for re_, rc, rr in zip(e, c, r):
        assert rc["loss"] == pytest.approx(re_["loss"], rel=1e-3), rc["step"]
        for key in ("loss", "e_theta", "e_ref", "implicit_acc"):
            assert rr[key] == pytest.approx(rc[key], rel=1e-6, abs=1e-9), (rc["step"], key)
    assert summary["compile_s"] > 0 and "compile_s" in c[0] and "compile_s" not in e[0]
    assert c[0]["compile_s"] <= c[-1]["compile_s"] <= summary["compile_s"] + 1e-9


# --------------------------------------------------------------------------- mask input


@pytest.mark.slow
def test_mask_input_run_resumes_exactly_and_samples_into_its_masks(tmp_path):
    """adapter.mask_input: training resumes exactly, the export keeps the mask branch and the
    training masks; free samples are drawn into a training mask of their kind (moved by the
    run's symmetries) and returned with it, guided ones keep the product outside the user's
    mask; the compiled sampler (eager backend) gives the same samples."""
    from safetensors.torch import load_file

    from apo_fast.adapters.mask_input import get_mask_input
    from apo_fast.sampling.runs import generate_for_defect, heldout_guides, load_run

    common = ("adapter.mask_input=true", "train.checkpoint_every=2", "sample.compile.backend=eager")
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    run_train(tiny_cfg(straight, "train.steps=4", *common))
    run_train(tiny_cfg(interrupted, "train.steps=2", *common))
    run_train(tiny_cfg(interrupted, "train.steps=4", *common))
    for ra, rb in zip(read_log(straight), read_log(interrupted)):
        for key in ("loss", "e_theta", "e_ref"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-6, abs=1e-9), (ra["step"], key)
    adapters = straight / "adapters"
    branch = load_file(str(adapters / "mask_input.safetensors"))
    assert branch["project_weight"].abs().sum() > 0  # zero-init projection was trained
    bank = load_file(str(adapters / "mask_bank.safetensors"))
    assert sorted(bank) == ["brick/crack", "brick/hole", "brick/stain"]
    run = load_run(straight, device="cpu")
    assert get_mask_input(run.unet) is not None and run.mask_bank.augment == "dihedral"
    imgs, masks, _ = generate_for_defect(run, "hole", 3, seed=1)
    sizes = {int(m.sum()) for m in bank["brick/hole"]}
    assert imgs.shape == (3, 3, 16, 16) and all(int(m.sum()) in sizes for m in masks)
    known, kmask = heldout_guides(run.cfg, "crack", 2)
    gi, gm, _ = generate_for_defect(run, "crack", 2, known_images=known, known_masks=kmask)
    outside = (1 - grow_mask(kmask, run.cfg.sample.guide_dilate)).bool().expand_as(gi)
    assert torch.equal(gm, kmask) and torch.allclose(gi[outside], known.clamp(-1, 1)[outside], atol=1e-6)
    compiled = load_run(straight, device="cpu", compile=True)
    for kwargs in ({}, {"known_images": known, "known_masks": kmask}):
        a = generate_for_defect(run, "crack", 2, seed=3, **kwargs)
        b = generate_for_defect(compiled, "crack", 2, seed=3, **kwargs)
        for x, y in zip(a, b):
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)
    # tools/defect_timing.py: cut 0 is the run as it samples; the mask left out of every step
    # (cut above every timestep) changes the samples, since the branch was trained
    import importlib.util

    spec = importlib.util.spec_from_file_location("tools_defect_timing", REPO / "tools" / "defect_timing.py")
    timing = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(timing)
    rows, outlines = timing.timing_rows(run, ["hole"], [0, 10_000], 2, seed=5)
    assert run.unet_call is None  # put back
    for mode, kwargs in (("free", {}), ("guided", dict(zip(("known_images", "known_masks"),
                                                           heldout_guides(run.cfg, "hole", 2))))):
        a, m, _ = generate_for_defect(run, "hole", 2, seed=5, **kwargs)
        assert torch.equal(rows[f"hole {mode} off<0"], a) and torch.equal(outlines[f"hole {mode} off<0"], m)
        assert not torch.allclose(rows[f"hole {mode} off<10000"], a, atol=1e-4)
    # the step-by-step table: one row per policy call (the reference's carry no mask), from the
    # noisiest step down, mean RGB of z_t and of the policy's x0 inside the mask
    steps = timing.trajectory(run, "hole", 2, seed=5)
    assert run.unet_call is None and len(steps) == run.cfg.sample.num_inference_steps
    ts = [t for t, _, _ in steps]
    assert ts == sorted(ts, reverse=True) and ts[0] > 900
    assert all(len(z) == len(x0) == 3 and all(map(math.isfinite, z + x0)) for _, z, x0 in steps)
