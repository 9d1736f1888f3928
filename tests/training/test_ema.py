"""``train.ema_decay``: the adapters' moving average against a float64 reference, its
export, and its checkpoint (a resumed run continues the same average)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from apo_fast.config import ConfigError
from apo_fast.demo import demo_config
from apo_fast.training.ema import ParameterEMA, ema_file

F64 = torch.float64
EPS32 = torch.finfo(torch.float32).eps


def reference_ema(trajectory: list[list[torch.Tensor]], start: list[torch.Tensor], decay: float) -> list[torch.Tensor]:
    """e_0 = w_start; after step k: d = min(decay, (1 + k) / (10 + k)), e = d e + (1 - d) w_k, in float64."""
    ema = [w.to(F64) for w in start]
    for k, weights in enumerate(trajectory):
        d = min(decay, (1 + k) / (10 + k))
        ema = [d * e + (1 - d) * w.to(F64) for e, w in zip(ema, weights)]
    return ema


def bound(trajectory, start) -> float:
    """Each float32 lerp rounds its result (relative eps) and reads its operands exactly,
    so after n steps the error is at most ~ 2 n eps max|w| (factor 4 kept for the lerp's
    two roundings)."""
    biggest = max(float(w.abs().max()) for ws in [start, *trajectory] for w in ws)
    return 4 * (len(trajectory) + 1) * EPS32 * biggest


@pytest.mark.parametrize("decay", [0.5, 0.9, 0.999])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ema_follows_the_float64_formula_on_odd_shapes(decay, dtype):
    g = torch.Generator().manual_seed(int(decay * 1000) + (dtype == torch.bfloat16))
    shapes = [(7, 3), (1,), (5, 1, 3, 3), (13,)]
    params = [nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]
    ema = ParameterEMA(params, decay)
    start = [p.detach().clone() for p in params]
    trajectory = []
    for k in range(23):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape, generator=g).to(dtype) * 0.3)
        trajectory.append([p.detach().clone() for p in params])
        ema.update(k)
    want = reference_ema(trajectory, start, decay)
    tol = bound(trajectory, start)
    for e, w in zip(ema.shadow, want):
        assert e.dtype == torch.float32  # kept in float32 whatever the parameters' dtype
        assert float((e.to(F64) - w).abs().max()) <= tol
    # the average is not the last weights (it would be for decay 0)
    assert any(float((e.to(F64) - w[-1].to(F64)).abs().max()) > 1e-3 for e, w in zip(ema.shadow, zip(*trajectory)))


def test_applied_swaps_the_average_in_and_the_raw_weights_back_bit_for_bit():
    params = [nn.Parameter(torch.randn(4, 5)), nn.Parameter(torch.randn(3))]
    ema = ParameterEMA(params, 0.9)
    with torch.no_grad():
        for p in params:
            p.mul_(3.0).add_(1.0)
    ema.update(0)
    raw = [p.detach().clone() for p in params]
    with ema.applied():
        for p, e in zip(params, ema.shadow):
            assert torch.equal(p.detach(), e)
    assert all(torch.equal(p.detach(), r) for p, r in zip(params, raw))
    with pytest.raises(RuntimeError, match="boom"):
        with ema.applied():
            raise RuntimeError("boom")
    assert all(torch.equal(p.detach(), r) for p, r in zip(params, raw))  # also after an error


def test_saved_average_round_trips_and_a_foreign_one_is_refused(tmp_path):
    params = [nn.Parameter(torch.randn(4, 5)), nn.Parameter(torch.randn(3))]
    ema = ParameterEMA(params, 0.9)
    ema.shadow[0].add_(1.5)
    ema.save(tmp_path / "e.safetensors")
    other = ParameterEMA(params, 0.9)
    other.load(tmp_path / "e.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow, other.shadow))
    with pytest.raises(ValueError, match="holds 2 tensors; this model trains 1"):
        ParameterEMA(params[:1], 0.9).load(tmp_path / "e.safetensors")
    with pytest.raises(ValueError, match=r"tensor 1 has shape \(3,\); this model's is \(4,\)"):
        ParameterEMA([params[0], nn.Parameter(torch.zeros(4))], 0.9).load(tmp_path / "e.safetensors")
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="EMA decay"):
            ParameterEMA(params, bad)


@pytest.mark.parametrize("bad", ["1.0", "-0.5", "1.5", "yes"])
def test_bad_train_ema_decay_is_named(tmp_path, bad):
    with pytest.raises(ConfigError, match="train.ema_decay"):
        demo_config(str(tmp_path), [f"train.ema_decay={bad}"])


# --------------------------------------------------------------------------- in the trainer


def tiny_cfg(out: Path, *overrides: str):
    base = ["data.image_size=16", "train.batch_size=4", "train.log_every=1", "train.progress=false",
            "train.device=cpu", "train.ema_decay=0.6"]
    return demo_config(str(out), base + list(overrides))


class Recorder:
    """The trainer's EMA, with every step's raw weights recorded before the update."""

    def __init__(self, trainer):
        self.ema = trainer.ema
        self.start = [s.clone() for s in self.ema.shadow]
        self.trajectory: list[list[torch.Tensor]] = []
        inner = self.ema.update

        def update(step):
            self.trajectory.append([p.detach().float().clone() for p in self.ema.params])
            inner(step)

        self.ema.update = update


def train(cfg, record: bool = False):
    from apo_fast.training.trainer import APOTrainer

    trainer = APOTrainer(cfg).setup()
    rec = Recorder(trainer) if record else None
    try:
        trainer.train()
    finally:
        trainer.close()
    return trainer, rec


def exported(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = load_file(str(out / "adapters" / "pytorch_lora_weights.safetensors"))
    tensors.update({f"cond/{k}": v for k, v in load_file(str(out / "adapters" / "conditions.safetensors")).items()})
    return tensors


@pytest.mark.slow
def test_trainer_exports_the_float64_average_of_its_steps_not_the_last_weights(tmp_path):
    trainer, rec = train(tiny_cfg(tmp_path / "run", "train.steps=4", "train.checkpoint_every=4"), record=True)
    assert len(rec.trajectory) == 4
    want = reference_ema(rec.trajectory, rec.start, 0.6)
    tol = bound(rec.trajectory, rec.start)
    for e, w in zip(trainer.ema.shadow, want):
        assert float((e.to(F64) - w).abs().max()) <= tol
    # The export holds the average: every exported adapter tensor is one of the averaged
    # parameters' values (matched by shape and value), and some differ from the last weights.
    files = exported(tmp_path / "run")
    averaged = [w.float() for w in want]
    last = rec.trajectory[-1]
    lora = {k: v for k, v in files.items() if ".lora_" in k}
    assert lora
    moved = 0
    for key, value in lora.items():
        hits = [i for i, w in enumerate(averaged) if w.shape == value.shape and torch.allclose(value.float(), w, atol=tol)]
        assert hits, key
        moved += any(not torch.allclose(value.float(), last[i], atol=tol) for i in hits)
    assert moved > 0
    # the raw weights are back in the model after the export
    assert all(torch.equal(p.detach().float(), w) for p, w in zip(trainer.ema.params, last))
    state = sorted(p.name for p in (tmp_path / "run" / "checkpoints" / "step-000004").iterdir())
    assert ema_file(Path("."), 0).name in state


@pytest.mark.slow
def test_resumed_run_continues_the_same_average(tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    train(tiny_cfg(straight, "train.steps=4", "train.checkpoint_every=2"))
    train(tiny_cfg(interrupted, "train.steps=2", "train.checkpoint_every=2"))
    train(tiny_cfg(interrupted, "train.steps=4", "train.checkpoint_every=2"))
    a, b = exported(straight), exported(interrupted)
    assert a.keys() == b.keys()
    # same thread count, same draws (a resumed run matches to float rounding, as the raw weights do)
    assert all(torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-9) for k in a)
    log = [json.loads(line) for line in (interrupted / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]


@pytest.mark.slow
def test_resume_with_ema_from_a_checkpoint_without_it_says_what_to_do(tmp_path):
    out = tmp_path / "run"
    train(tiny_cfg(out, "train.steps=1", "train.checkpoint_every=1", "train.ema_decay=0"))
    with pytest.raises(FileNotFoundError, match="written with train.ema_decay=0"):
        train(tiny_cfg(out, "train.steps=2", "train.checkpoint_every=1"))


@pytest.mark.slow
def test_zero3_averages_its_partitions_and_exports_what_stage_0_exports(tmp_path):
    """Under ZeRO-3 (every parameter partitioned) each rank averages its partition
    (``ds_tensor``) and the export gathers the average: the same file as stage 0 up to
    the reduction-order differences the raw weights have (relative Frobenius 1e-3)."""
    no_persist = "train.deepspeed={zero_optimization: {stage3_param_persistence_threshold: 0}}"
    z0, _ = train(tiny_cfg(tmp_path / "z0", "train.steps=3", "train.zero_stage=0"))
    z3, _ = train(tiny_cfg(tmp_path / "z3", "train.steps=3", "train.zero_stage=3", no_persist))
    assert all(hasattr(p, "ds_tensor") for p in z3.ema.params)  # partitioned: the shadows are partitions
    assert sum(s.numel() for s in z3.ema.shadow) >= sum(p.ds_numel for p in z3.ema.params)
    a, b = exported(tmp_path / "z3"), exported(tmp_path / "z0")
    assert a.keys() == b.keys()
    for key in a:
        err = ((a[key].double() - b[key].double()).norm() / b[key].double().norm().clamp_min(1e-12)).item()
        assert err <= 1e-3, (key, err)
