"""A 20-step training run of the demo model with each preference form (`loss.kind`): finite
losses, and the form's own quantity moving the expected way on a fixed batch: the policy's
residual below the reference's (unpaired forms), the policy's gain over the reference larger
on the winners than on the losers (paired forms), the winners' residual below the losers' by
more than the base model's (the reference-free margin form)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from apo_fast.config import ConfigError
from apo_fast.demo import demo_config

pytestmark = pytest.mark.slow


def _cfg(out: Path, *overrides: str):
    base = ["data.image_size=16", "train.batch_size=4", "train.log_every=1", "train.progress=false",
            "train.device=cpu", "train.steps=20", "train.checkpoint_every=20", "pretrain.steps=0"]
    return demo_config(str(out), base + list(overrides))


def _residuals(trainer):
    """(e_policy, e_reference) per sample on the batch of step 0 (fixed t and noise)."""
    from apo_fast.training.streaming import noisy_inputs

    x0, masks, conds, t, noise = trainer.batch_for_step(0, 0)
    z, target = noisy_inputs(x0, noise, t, trainer.alphas_cumprod.cpu(), trainer.cfg.model.prediction_type)
    with torch.no_grad():
        e = [((trainer.engine(z, t, conds, reference=ref) - target) ** 2).mean(dim=(1, 2, 3)) for ref in (False, True)]
    return e[0], e[1]


@pytest.mark.parametrize("kind, mode", [("sigmoid", "unpaired"), ("hinge", "unpaired"), ("ipo", "unpaired"),
                                        ("kto", "unpaired"), ("hinge", "paired"), ("margin", "paired")])
def test_twenty_steps_of_each_form(tmp_path, kind, mode):
    from apo_fast.training.trainer import APOTrainer

    extra = ["loss.lambda_sft=1.0", "loss.beta_schedule=constant", "loss.beta=50.0"] if kind == "margin" else []
    cfg = _cfg(tmp_path / kind, f"loss.kind={kind}", f"loss.mode={mode}", *extra)
    trainer = APOTrainer(cfg)
    try:
        trainer.train()
        log = [json.loads(line) for line in (tmp_path / kind / "train_log.jsonl").read_text().splitlines()]
        assert len(log) == 20 and all(math.isfinite(r["loss"]) for r in log)
        e_policy, e_ref = _residuals(trainer)
    finally:
        trainer.close()
    if kind == "margin":
        n = len(e_policy) // 2
        assert (e_policy[:n] - e_policy[n:]).mean() < (e_ref[:n] - e_ref[n:]).mean()
    elif mode == "paired":
        # the paired forms' own quantity: the policy's error minus the reference's is lower on the
        # winners than on the losers (it may get there by fitting the losers worse, not the winners better)
        n = len(e_policy) // 2
        delta = e_policy - e_ref
        assert delta[:n].mean() < delta[n:].mean()
    else:
        assert (e_policy - e_ref).mean() < 0  # the policy fits the real anomalies better than the reference


@pytest.mark.parametrize("override, words", [("loss.kind=dpo", "loss.kind"), ("loss.kind=margin", "paired"),
                                             ("loss.kind=kto,loss.mode=paired", "unpaired")])
def test_loss_kind_is_checked_before_any_work(tmp_path, override, words):
    with pytest.raises(ConfigError, match=words):
        _cfg(tmp_path, *override.split(","))
