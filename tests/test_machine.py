"""A fresh machine, a busy machine, two runs at once: threads, the DeepSpeed op lock,
path checks before heavy imports, Ctrl-C, sample folders, empty masks."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from apo_fast.config import ConfigError, config_from_dict
from apo_fast.demo import DEMO_CONFIG
from apo_fast.machine import busy_cores, choose_threads, machine_load, omp_threads, shm_op_lock

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- threads


@pytest.mark.parametrize(
    "cores, load, want",
    [(2, 0.0, 2), (2, 0.4, 2), (2, 0.6, 1), (2, 1.9, 1), (2, 7.5, 1), (1, 0.0, 1), (8, 3.2, 5), (16, 0.0, 16)],
)
def test_auto_threads_leave_the_busy_cores_alone(cores, load, want):
    threads, why = choose_threads("auto", cores=cores, load=load, environ={})
    assert threads == want
    assert f"{cores} core" in why and f"{load:.2f}" in why


@pytest.mark.parametrize("value, want", [("1", 1), ("3", 3), (" 2 ", 2), ("4,2", 4), ("0", None), ("-1", None),
                                         ("", None), ("many", None), ("2.5", None)])
def test_auto_threads_follow_omp_num_threads_where_it_is_set(value, want):
    """``OMP_NUM_THREADS`` is the user's (or a test harness's) explicit choice, and torch
    itself follows it: ``auto`` takes it before any load rule, whatever the load; a value
    that is no positive integer is ignored (the load rule decides)."""
    assert omp_threads({"OMP_NUM_THREADS": value}) == want
    threads, why = choose_threads("auto", cores=2, load=1.9, environ={"OMP_NUM_THREADS": value})
    if want is None:
        assert threads == 1 and "load 1.90" in why
    else:
        assert threads == want and f"OMP_NUM_THREADS={want}" in why
    assert choose_threads(3, environ={"OMP_NUM_THREADS": value}) == (3, "set")  # a set number wins
    assert omp_threads({}) is None


@pytest.mark.parametrize("avg, now, want", [(1.09, 0.05, 0.05), (0.3, 1.8, 0.3), (None, 0.7, 0.7), (1.2, None, 1.2),
                                             (None, None, 0.0)])
def test_load_left_by_finished_jobs_does_not_count(avg, now, want):
    """The 1-minute average remembers jobs that already ended (an install, a test run);
    the cores busy now do not: the smaller of the two is the load."""
    assert machine_load(avg, now) == want


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="busy_cores reads Linux's /proc/stat")
def test_busy_cores_sees_a_process_spinning_now():
    """A spinning child keeps one CPU busy for the whole window (on a busier machine all
    CPUs are busy), so at least half a core is busy whatever else runs; never more than
    the machine has."""
    spin = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time() + 5\nwhile time.time() < t: pass"])
    try:
        time.sleep(0.3)  # the child is past its start-up
        busy = busy_cores(window=0.5)
    finally:
        spin.kill()
        spin.wait()
    assert busy is not None and 0.5 <= busy <= (os.cpu_count() or 1) + 1e-6


def test_set_threads_are_taken_and_bad_ones_refused():
    assert choose_threads(3) == (3, "set")
    for bad in (0, -1, "four", 2.5, True):
        with pytest.raises(ValueError, match="threads"):
            choose_threads(bad)
    assert config_from_dict(DEMO_CONFIG, ["train.threads=3"]).train.threads == 3
    assert config_from_dict(DEMO_CONFIG).train.threads == "auto"
    for bad in ("train.threads=0", "train.threads=many"):
        with pytest.raises(ConfigError, match="train.threads"):
            config_from_dict(DEMO_CONFIG, [bad])


def test_set_with_nothing_after_the_equals_sign_is_the_empty_string():
    cfg = config_from_dict(DEMO_CONFIG, ["model.subfolder=", "model.good_prompt_template=''"])
    assert cfg.model.subfolder == "" and cfg.model.good_prompt_template == ""


# --------------------------------------------------------------------------- the DeepSpeed op lock


def test_shm_op_lock_is_exclusive_across_processes(tmp_path, monkeypatch):
    """A second process waits while the first holds the lock (no two builds at once)."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    probe = (
        "import time; from apo_fast.machine import shm_op_lock\n"
        "print('ready', flush=True)\n"
        "t = time.monotonic()\n"
        "with shm_op_lock():\n"
        "    print(round(time.monotonic() - t, 2), flush=True)\n"
    )
    with shm_op_lock():
        proc = subprocess.Popen([sys.executable, "-c", probe], stdout=subprocess.PIPE, text=True, env=os.environ.copy())
        assert proc.stdout.readline().strip() == "ready"  # however long its start-up took on a busy machine
        time.sleep(2.0)
        assert proc.poll() is None, "the second process got the lock while the first held it"
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and float(out.strip()) >= 1.9
    assert (tmp_path / "ext" / ".apo_fast_deepspeed_ops.lock").is_file()


def _train_cmd(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "apo_fast.cli", "train", "--config", str(REPO / "configs" / "demo.yaml"),
        "--output_dir", str(out), "--threads", "1", "--no-progress",
        "--set", "data.image_size=16", "--set", "train.batch_size=2", "--set", "train.device=cpu",
        "--set", "train.log_every=1", *extra,
    ]


def _env(ext: Path) -> dict:
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(ext), PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


@pytest.mark.slow
def test_two_train_runs_at_once_on_a_fresh_extensions_dir_both_finish(tmp_path):
    """Both JIT-build DeepSpeed's shm op in one fresh cache at the same moment: the lock
    makes one build and the other wait, and both train to the end."""
    ext = tmp_path / "ext"
    runs = [tmp_path / "apo", tmp_path / "lora"]
    cmds = [_train_cmd(runs[0], "--set", "train.steps=2"),
            _train_cmd(runs[1], "--set", "train.steps=2", "--set", "loss.mode=diffusion",
                       "--set", "adapter.gate.kind=constant")]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(ext), cwd=tmp_path)
             for c in cmds]
    try:
        outs = [p.communicate(timeout=1200)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    for run in runs:
        assert (run / "adapters" / "pytorch_lora_weights.safetensors").is_file()
    assert list(ext.glob("**/deepspeed_shm_comm*.so")), "the op was built in the fresh cache"
    said = "\n".join(outs)
    assert "building DeepSpeed's deepspeed_shm_comm op" in said, "the wait before step 1 is explained"
    assert "torch CPU threads: 1" in said
    assert "plain-LoRA baseline training" in outs[1] and "APO (unpaired) training" in outs[0]


@pytest.mark.slow
def test_ctrl_c_in_train_names_the_step_and_how_to_resume(tmp_path):
    out = tmp_path / "run"
    cmd = _train_cmd(out, "--set", "train.steps=100000", "--set", "train.checkpoint_every=2")
    # A shell without job control starts background jobs with SIGINT ignored, and Python keeps an
    # ignored SIGINT ignored: give the child the default disposition, as a terminal would.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(tmp_path / "ext"), cwd=tmp_path,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    log = out / "train_log.jsonl"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            if log.is_file() and len(log.read_text().splitlines()) >= 3:
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:  # never leave a 100000-step run behind
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert "interrupted at step" in last and "resume with: apo-fast train --config" in last, last
    assert "Traceback" not in err
    step = int(last.split("interrupted at step ")[1].split(";")[0])
    assert step >= 3 and "checkpoints" in last


# --------------------------------------------------------------------------- path checks and messages


def _probe_cli(args: list[str], tmp_path: Path) -> tuple[int, str, bool]:
    """Run the CLI in a fresh interpreter; returns (exit code, stderr, whether torch got imported)."""
    code = (
        "import sys, json; from apo_fast.cli import main\n"
        f"rc = main({args!r})\n"
        "print(json.dumps([rc, 'torch' in sys.modules]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    rc, torch_imported = json.loads(proc.stdout.strip().splitlines()[-1])
    return rc, proc.stderr, torch_imported


@pytest.mark.parametrize(
    "override, words",
    [
        ("data.root={tmp}/nowhere", "data.root"),
        ("data.category=bottle", "categories there: brick, gravel"),
        ("model.pretrained={tmp}/no_model", "model.pretrained"),
        ("model.conditions={tmp}/none.safetensors", "model.conditions"),
    ],
)
def test_bad_paths_are_refused_before_torch_is_imported(tmp_path, override, words):
    override = override.format(tmp=tmp_path)
    if override.startswith("data.category"):
        override = f"data.root={REPO / 'apo_fast' / 'assets' / 'demo_mvtec'} --set {override}"
    args = ["train", "--config", str(REPO / "configs" / "demo.yaml")]
    for part in override.split(" --set "):
        args += ["--set", part]
    rc, err, torch_imported = _probe_cli(args, tmp_path)
    assert rc == 2 and words in err, err
    assert not torch_imported, "the path check must come before the heavy imports"


def test_demo_base_as_pretrained_needs_the_right_subfolder(tmp_path):
    base = tmp_path / "base_unet"
    base.mkdir()
    (base / "config.json").write_text("{}")
    args = ["train", "--config", str(REPO / "configs" / "demo.yaml"), "--set", f"model.pretrained={base}"]
    rc, err, torch_imported = _probe_cli(args, tmp_path)
    assert rc == 2 and "model.subfolder" in err and not torch_imported


def test_cuda_device_on_a_cpu_machine_says_what_to_set(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU machine, on any machine
    from apo_fast.cli import build_parser

    args = build_parser().parse_args(
        ["train", "--config", str(REPO / "configs" / "demo.yaml"), "--set", "train.device=cuda",
         "--output_dir", str(tmp_path / "run"), "--threads", "1"]
    )
    args.argv = []
    with pytest.raises(RuntimeError, match="set train.device: cpu"):
        args.fn(args)
    from apo_fast.cli import _is_user_error

    assert _is_user_error(RuntimeError("train.device is 'cuda' but CUDA is not available on this machine"))


# --------------------------------------------------------------------------- sample folders


def _sample_args(run: Path, output_dir=None, overwrite=False):
    return argparse.Namespace(run=str(run), output_dir=output_dir, overwrite=overwrite)


def test_sample_never_writes_over_earlier_samples(tmp_path):
    from apo_fast.cli import _samples_folder

    run = tmp_path / "run"
    run.mkdir()
    assert _samples_folder(_sample_args(run)) == run / "samples"  # nothing there yet
    (run / "samples").mkdir()
    (run / "samples" / "samples.json").write_text("{}")
    assert _samples_folder(_sample_args(run)) == run / "samples-1"
    (run / "samples-1").mkdir()
    assert _samples_folder(_sample_args(run)) == run / "samples-2"
    # --overwrite replaces an apo-fast samples folder, refuses anything else
    assert _samples_folder(_sample_args(run, overwrite=True)) == run / "samples"
    assert not (run / "samples").exists()
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not an apo-fast samples folder"):
        _samples_folder(_sample_args(run, output_dir=str(other), overwrite=True))
    with pytest.raises(ValueError, match="--overwrite"):
        _samples_folder(_sample_args(run, output_dir=str(other)))
    assert (other / "keep.txt").is_file()


def test_sample_of_a_folder_that_is_no_run_is_refused(tmp_path, capsys):
    from apo_fast.cli import build_parser

    args = build_parser().parse_args(["sample", "--run", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="not an apo-fast run folder"):
        args.fn(args)


# --------------------------------------------------------------------------- masks


def _tree_with_mask(root: Path, mask: np.ndarray) -> Path:
    rng = np.random.default_rng(0)
    cat = root / "widget"
    for folder, n in (("train/good", 3), ("test/good", 1), ("test/dent", 3)):
        (cat / folder).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(cat / folder / f"{i:03d}.png")
    (cat / "ground_truth" / "dent").mkdir(parents=True)
    for i in range(3):
        m = mask if i == 0 else np.pad(np.full((4, 4), 255, np.uint8), 6)
        Image.fromarray(m).save(cat / "ground_truth" / "dent" / f"{i:03d}_mask.png")
    return root


def test_an_all_black_mask_is_refused_with_the_file_named(tmp_path):
    from apo_fast.data import AnomalyDataset, DatasetError, scan_mvtec

    root = _tree_with_mask(tmp_path, np.zeros((16, 16), np.uint8))
    index = scan_mvtec(root, "widget")
    with pytest.raises(DatasetError, match="is empty") as err:
        AnomalyDataset(index, 16, split="train")
    assert str(root / "widget" / "ground_truth" / "dent" / "000_mask.png") in str(err.value)


def test_a_defect_that_vanishes_at_the_working_size_warns(tmp_path):
    from apo_fast.data import AnomalyDataset, scan_mvtec

    dot = np.zeros((16, 16), np.uint8)
    dot[5, 5] = 255  # one pixel: gone after a nearest-neighbour resize to 4x4
    index = scan_mvtec(_tree_with_mask(tmp_path, dot), "widget")
    with pytest.warns(UserWarning, match="vanishes"):
        AnomalyDataset(index, 4, split="train")
