"""apo-fast pretrain: the base UNet on a product's normal images (EMA, resumable, samples)."""
from __future__ import annotations

import json

import pytest
import torch

from apo_fast.demo import demo_config


def _cfg(out, *extra):
    return demo_config(str(out), ["data.image_size=16", "train.device=cpu", "pretrain.batch_size=4",
                                  "pretrain.steps=8", "pretrain.checkpoint_every=4", "pretrain.warmup_steps=2",
                                  "sample.num_inference_steps=3", *extra])


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "base_unet" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.slow
def test_pretrain_killed_and_resumed_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    import apo_fast.training.pretrain as pretrain

    straight = tmp_path / "straight"
    pretrain.pretrain_base(_cfg(straight), straight, progress=False)
    assert {p.name for p in straight.iterdir()} >= {"base_unet", "base_conditions.safetensors",
                                                     "pretrain_log.jsonl", "samples.png"}
    assert not (straight / pretrain.STATE_FILE).exists(), "a finished base leaves no resumable state behind"

    killed = tmp_path / "killed"
    original, calls = pretrain.ema_update, {"n": 0}

    def dies_at_step_6(*args):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(pretrain, "ema_update", dies_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        pretrain.pretrain_base(_cfg(killed), killed, progress=False)
    assert (killed / pretrain.STATE_FILE).is_file() and not (killed / "base_unet").exists()
    monkeypatch.setattr(pretrain, "ema_update", original)
    pretrain.pretrain_base(_cfg(killed), killed, progress=False)
    a, b = _weights(straight), _weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log_a = [json.loads(x) for x in (straight / "pretrain_log.jsonl").read_text().splitlines()]
    log_b = [json.loads(x) for x in (killed / "pretrain_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_b] == list(range(1, 9)) and log_a == log_b


def test_pretrain_saves_the_ema_weights_and_refuses_a_state_of_other_settings(tmp_path):
    from apo_fast.training.pretrain import STATE_FILE, pretrain_base

    raw = tmp_path / "raw"
    pretrain_base(_cfg(raw, "pretrain.ema_decay=0", "pretrain.steps=3"), raw, progress=False)
    ema = tmp_path / "ema"
    pretrain_base(_cfg(ema, "pretrain.ema_decay=0.9", "pretrain.steps=3"), ema, progress=False)
    a, b = _weights(raw), _weights(ema)
    assert any(not torch.equal(a[k], b[k]) for k in a), "the EMA weights are saved, not the raw ones"
    # a resumable state written with other settings is refused, not silently mixed in
    torch.save({"pretrain": {"steps": 99}, "seed": 0}, ema / STATE_FILE)
    with pytest.raises(ValueError, match="other pretrain settings"):
        pretrain_base(_cfg(ema, "pretrain.steps=3"), ema, progress=False)


def test_pretrain_config_errors_name_the_key():
    from apo_fast.config import ConfigError

    for bad, key in (("pretrain.ema_decay=1.0", "pretrain.ema_decay"), ("pretrain.checkpoint_every=0",
                     "pretrain.checkpoint_every"), ("pretrain.warmup_steps=-1", "pretrain.warmup_steps")):
        with pytest.raises(ConfigError, match=key):
            demo_config(None, [bad])


def test_the_base_saves_only_the_rows_it_trained_so_apo_starts_defects_from_good(tmp_path):
    """The base's condition file holds null and the product's good row only; the APO trainer
    then starts every defect row from the good row (the textual-inversion start)."""
    from safetensors.torch import load_file

    from apo_fast.models.conditions import load_conditions
    from apo_fast.training.pretrain import pretrain_base

    out = tmp_path / "base"
    _, cond_path = pretrain_base(_cfg(out, "pretrain.steps=2"), out, progress=False)
    saved = load_file(str(cond_path))
    assert set(saved) == {"null", "brick/good"}
    names = ["brick/good", "brick/crack", "brick/hole", "brick/stain"]
    emb = load_conditions(cond_path, names, 4, 32)
    for row in range(2, 5):
        assert torch.equal(emb.weight[row], saved["brick/good"])
    assert torch.equal(emb.weight[0], saved["null"])
