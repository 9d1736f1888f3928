"""Runs in several processes: 2 ranks (gloo) against 1 rank, both launchers, and kill -9 + resume.

* The global batch of a step does not depend on the world size (``batch_for_step`` draws it
  from ``(seed, step, micro)`` and each rank takes its slice), and the logged metrics are
  averaged over ranks. So 2 ranks of batch 2 and 1 rank of batch 4 train on the same
  samples, t and noise, and differ only by floating-point reduction order (gradient
  all-reduce, per-rank convolution batch): per-step losses agree to ``LOSS_RTOL`` and each
  exported tensor to ``WEIGHT_RTOL`` in relative Frobenius norm.
* A run killed with SIGKILL after its first checkpoint and relaunched continues with the
  exact loss trajectory of an uninterrupted run (same process settings: bit for bit).
* Every finished run exits 0 (the CLI tears the gloo process group down before exit).
"""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from apo_fast.demo import demo_config

pytestmark = pytest.mark.multirank

LOSS_RTOL = 1e-4
WEIGHT_RTOL = 1e-3
NO_PERSIST = "train.deepspeed={zero_optimization: {stage3_param_persistence_threshold: 0}}"  # partition every param
RUN_TIMEOUT_S = 300

# Runs the CLI under torchrun and reports, per rank, how the frozen base UNet is held after setup.
ZERO3_WORKER = '''
import json, os, sys

import apo_fast.training.trainer as train_mod

_setup = train_mod.APOTrainer.setup


def setup(self):
    _setup(self)
    frozen = [p for p in self.engine.module.parameters() if not p.requires_grad]
    report = {
        "world": self.world,
        "frozen_numel": sum(p.ds_numel for p in frozen),
        "frozen_partition_numel": sum(p.ds_tensor.numel() for p in frozen),
        "frozen_materialized_numel": sum(p.data.numel() for p in frozen),
    }
    with open(os.path.join(os.environ["APO_TEST_REPORT_DIR"], f"rank{self.rank}.json"), "w") as fh:
        json.dump(report, fh)
    return self


train_mod.APOTrainer.setup = setup
from apo_fast.cli import main

sys.exit(main(sys.argv[1:]))
'''


def tiny_cfg(out: Path, *overrides: str):
    base = [
        "data.image_size=16",
        "train.steps=3",
        "train.log_every=1",
        "train.progress=false",
        "train.device=cpu",
    ]
    return demo_config(str(out), base + list(overrides))


def write_config(path: Path, out: Path, *overrides: str) -> Path:
    from apo_fast.config import save_config

    save_config(tiny_cfg(out, *overrides), path)
    return path


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "train_log.jsonl").read_text().splitlines()]


def read_export(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    adapters = Path(out) / "adapters"
    tensors = load_file(str(adapters / "pytorch_lora_weights.safetensors"))
    tensors.update({f"cond/{k}": v for k, v in load_file(str(adapters / "conditions.safetensors")).items()})
    return tensors


def assert_same_training(a: Path, b: Path) -> None:
    la, lb = read_log(a), read_log(b)
    assert [r["step"] for r in la] == [r["step"] for r in lb] == [1, 2, 3]
    for ra, rb in zip(la, lb):
        for key in ("loss", "e_theta", "e_ref", "implicit_acc"):
            assert ra[key] == pytest.approx(rb[key], rel=LOSS_RTOL, abs=1e-7), (ra["step"], key)
    ea, eb = read_export(a), read_export(b)
    assert ea.keys() == eb.keys()
    for key in ea:
        assert ea[key].shape == eb[key].shape, key
        err = ((ea[key].double() - eb[key].double()).norm() / eb[key].double().norm().clamp_min(1e-12)).item()
        assert err <= WEIGHT_RTOL, (key, err)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra: str) -> dict:
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)  # set in this process by in-process trainers; a launcher sets its own
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def run(cmd: list[str], log: Path, **env: str) -> int:
    """Run ``cmd`` in the log's folder (not the repository root, whose ``kernels/`` folder would
    shadow the ``kernels`` package bitsandbytes probes for); returns the exit code."""
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, check=False, stdout=fh, stderr=subprocess.STDOUT, env=subprocess_env(**env),
                              timeout=RUN_TIMEOUT_S, cwd=log.parent)
    return proc.returncode


def tail(log: Path, n: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:])


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    """1-rank runs with the global batch (4) of the 2-rank runs (2 per rank), in this process."""
    from apo_fast.training.trainer import APOTrainer

    outs = {}
    for stage, extra in ((2, ()), (3, (NO_PERSIST,))):
        out = tmp_path_factory.mktemp(f"one_rank_zero{stage}")
        trainer = APOTrainer(tiny_cfg(out, "train.batch_size=4", f"train.zero_stage={stage}", *extra))
        try:
            trainer.train()
        finally:
            trainer.close()
        outs[stage] = out
    return outs


@pytest.mark.slow
def test_two_ranks_zero2_with_the_deepspeed_launcher_match_one_rank(tmp_path, one_rank):
    launcher = Path(sys.executable).with_name("deepspeed")
    # deepspeed is a dependency: pip installs its launcher beside the interpreter, and
    # docs/distributed.md tells users to run it, so its absence is a failure, not a skip
    assert launcher.is_file(), f"the deepspeed launcher is not beside {sys.executable}; reinstall deepspeed"
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", out, "train.batch_size=2", "train.zero_stage=2")
    log = tmp_path / "launcher.log"
    cmd = [sys.executable, str(launcher), "--num_gpus", "2", "--master_port", str(free_port()),
           "--module", "apo_fast.cli", "train", "--config", str(cfg), "--no-progress"]
    # On CPU the launcher counts "devices" from LOCAL_SIZE (else NUMA nodes).
    assert run(cmd, log, LOCAL_SIZE="2") == 0, tail(log)
    text = log.read_text()
    assert text.count("exits successfully") == 2, tail(log)
    assert_same_training(out, one_rank[2])


@pytest.mark.slow
def test_two_ranks_zero3_with_torchrun_partition_the_base_and_match_one_rank(tmp_path, one_rank):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", out, "train.batch_size=2", "train.zero_stage=3", NO_PERSIST)
    worker = tmp_path / "zero3_worker.py"
    worker.write_text(ZERO3_WORKER)
    reports = tmp_path / "reports"
    reports.mkdir()
    log = tmp_path / "torchrun.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(worker), "train", "--config", str(cfg), "--no-progress"]
    assert run(cmd, log, APO_TEST_REPORT_DIR=str(reports)) == 0, tail(log)
    ranks = [json.loads((reports / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rep in ranks:
        assert rep["world"] == 2 and rep["frozen_numel"] > 900_000
        assert rep["frozen_materialized_numel"] == 0  # nothing gathered between forwards
        # each rank holds its half (DeepSpeed pads every parameter to a multiple of the world size)
        assert rep["frozen_numel"] / 2 <= rep["frozen_partition_numel"] <= rep["frozen_numel"] / 2 + 1000
    assert_same_training(out, one_rank[3])


def _launch_train(cfg: Path, log: Path) -> subprocess.Popen:
    with open(log, "w") as fh:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "apo_fast.cli", "train", "--config", str(cfg), "--no-progress"],
            stdout=fh, stderr=subprocess.STDOUT, env=subprocess_env(), cwd=log.parent,
        )


@pytest.mark.slow
def test_kill_9_after_a_checkpoint_then_resume_equals_an_uninterrupted_run(tmp_path):
    common = ("train.batch_size=4", "train.steps=8", "train.checkpoint_every=2", "train.keep_checkpoints=2")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    cfg_straight = write_config(tmp_path / "straight.yaml", straight, *common)
    cfg_killed = write_config(tmp_path / "killed.yaml", killed, *common)

    reference = _launch_train(cfg_straight, tmp_path / "straight.log")  # runs alongside the killed one
    victim = _launch_train(cfg_killed, tmp_path / "killed.log")
    first = killed / "checkpoints" / "step-000002" / "client_state.json"
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not first.exists():
        assert victim.poll() is None, tail(tmp_path / "killed.log")
        assert time.monotonic() < deadline, "no checkpoint within the time limit"
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=60) == -signal.SIGKILL
    assert not (killed / "train_summary.json").exists()  # it really died mid-run
    steps_before = [r["step"] for r in read_log(killed)] if (killed / "train_log.jsonl").exists() else []

    resumed = _launch_train(cfg_killed, tmp_path / "resumed.log")
    assert resumed.wait(timeout=RUN_TIMEOUT_S) == 0, tail(tmp_path / "resumed.log")
    assert reference.wait(timeout=RUN_TIMEOUT_S) == 0, tail(tmp_path / "straight.log")
    said = (tmp_path / "resumed.log").read_text()
    assert "resumed from" in said and "not bit for bit" not in said  # same thread count (OMP_NUM_THREADS=1)

    a, b = read_log(straight), read_log(killed)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 9)), steps_before
    for ra, rb in zip(a, b):
        for key in ("loss", "e_theta", "e_ref", "implicit_acc", "reward_w", "beta_t"):
            assert ra[key] == rb[key] or math.isclose(ra[key], rb[key], rel_tol=1e-6), (ra["step"], key)
    ea, eb = read_export(straight), read_export(killed)
    assert all(torch.allclose(ea[k], eb[k], rtol=1e-6, atol=0) for k in ea)
    ckpts = sorted(p.name for p in (killed / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert ckpts == ["step-000006", "step-000008"]
    assert not [p for p in (killed / "checkpoints").iterdir() if p.name.startswith(".")]  # no half-written one kept
