"""Training-step benchmark: apo-fast against the diffusers Diffusion-DPO baseline, side by side.

``run_step_benchmark(StepBenchConfig(model="tiny"))`` builds both trainers on the
same UNet config (random weights, :data:`apo_fast.config.unet_presets.UNET_PRESETS`),
the same data (the bundled demo dataset), batch and precision, and times their
training steps interleaved (A B B A ...), so that a machine whose speed drifts
(a shared CPU, GPU clocks) affects both alike:

* apo-fast: its real step, :meth:`apo_fast.training.trainer.APOTrainer.micro_step`, on the
  DeepSpeed engine that :meth:`~apo_fast.training.trainer.APOTrainer.setup` builds (time-gated
  adapters, fused loss and adapter kernels on CUDA, cached latents), in paired
  mode with a constant ``beta_t = beta_dpo``: the Diffusion-DPO objective;
* baseline: :class:`apo_fast.bench.baseline_dpo.DiffusionDPOBaseline`, the approach of
  diffusers' ``train_diffusion_dpo.py`` (peft LoRA, eager loss, adapters disabled
  for the reference, the VAE encoding every step).

Reported per side: samples/s (UNet images: a pair counts two), step time and its
breakdown (``data``, ``policy_forward``, ``reference_forward``, ``loss``,
``backward``, ``optimizer``, ``other``; CUDA events on a GPU, ``perf_counter`` on
the CPU), peak memory (``torch.cuda.max_memory_allocated`` of the side's own
steps minus what the other side keeps resident; process RSS from
:class:`apo_fast.telemetry.Telemetry` on a CPU) and telemetry; then apo-fast's
ratios to the baseline. :func:`write_reports` writes ``bench.json``,
``bench.md`` and ``bench.png``.

Latent models (``sd15``, ``sdxl``): nothing is downloaded. A randomly initialised
``AutoencoderKL`` with the Stable Diffusion VAE config is saved to a scratch
folder; apo-fast's setup encodes the demo images with it once (its latent
cache) and the baseline encodes pixels with the same VAE every step, so the
baseline pays the real VAE cost.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import logging
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from apo_fast.bench.sides import APOFastSide, BaselineSide, save_random_vae
from apo_fast.bench.step_config import MIB, PHASES, SCHEMA, SIDES, StepBenchConfig
from apo_fast.bench.timing import PhaseTimer
from apo_fast.machine import loadavg

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- the run


def _cuda_allocated(device: torch.device) -> int:
    gc.collect()
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device)


def _summarize_side(records: list[dict], images_per_step: int, tel_records: list[dict], cuda: bool) -> dict:
    walls = [r["wall_s"] for r in records]
    phases = {p: statistics.fmean(r["phases"].get(p, 0.0) for r in records) for p in PHASES}
    out: dict[str, Any] = {
        "steps": len(records),
        "samples_per_s": images_per_step * len(walls) / sum(walls),
        "pairs_per_s": images_per_step / 2 * len(walls) / sum(walls),
        "step_time_s": {
            "mean": statistics.fmean(walls),
            "median": statistics.median(walls),
            "min": min(walls),
            "max": max(walls),
            "stdev": statistics.stdev(walls) if len(walls) > 1 else 0.0,
        },
        "breakdown_s": phases,
        "breakdown_sum_s": sum(phases.values()),
        "loss_last": records[-1]["loss"],
    }
    side_tel = [t for t in tel_records if any(r["t0"] <= t["t"] <= r["t1"] for r in records)]
    if cuda:
        out["peak_memory_mib"] = max(r["peak_own_bytes"] for r in records) / MIB
        out["peak_memory_total_mib"] = max(r["peak_total_bytes"] for r in records) / MIB
        out["peak_memory_kind"] = (
            "torch.cuda.max_memory_allocated during this side's steps, minus the other side's resident memory"
        )
    else:
        rss = [t["rss_mib"] for t in side_tel if "rss_mib" in t]
        out["peak_memory_mib"] = max(rss) if rss else None
        out["peak_memory_kind"] = "process RSS (both sides resident), max of telemetry samples during this side's steps"
    for key in ("util_pct", "power_w", "sm_clock_mhz", "mem_used_mib"):
        vals = [t[key] for t in side_tel if key in t]
        if vals:
            out[f"telemetry_{key}_mean"] = statistics.fmean(vals)
    out["telemetry_samples"] = len(side_tel)
    return out


def _machine(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    info["load_avg_1_5_15"] = loadavg()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
        info["cuda"] = torch.version.cuda
    for name in ("triton", "diffusers", "peft", "deepspeed"):
        try:
            info[name] = __import__(name).__version__
        except Exception as exc:  # noqa: BLE001 - a missing optional package is reported as such
            info[name] = f"missing ({type(exc).__name__})"
    info["APO_FAST_BACKEND"] = os.environ.get("APO_FAST_BACKEND", "auto")
    return info


def _notes(cfg: StepBenchConfig, device: torch.device) -> list[str]:
    notes = [
        (
            "baseline: apo_fast.bench.baseline_dpo, a re-implementation of the diffusers train_diffusion_dpo.py step "
            "(peft LoRA on to_k/to_q/to_v/to_out.0, eager loss, disable_adapters() reference under no_grad, "
            "autocast + frozen weights cast to the weight dtype, plain torch optimizer step)"
        ),
        (
            f"apo-fast: APOTrainer.micro_step on its DeepSpeed engine, paired mode, constant beta_t = beta_dpo "
            f"(the Diffusion-DPO objective), gate {cfg.gate!r}, trainable condition embeddings"
        ),
        (
            f"same UNet config ({cfg.model}, random weights, seed {cfg.seed}), batch {cfg.batch} pairs "
            f"({2 * cfg.batch} images per UNet pass), rank {cfg.r}, {cfg.pixel_size} px, "
            f"{cfg.tokens} condition tokens"
        ),
        "steps interleaved A B B A ...; samples/s counts UNet images (2 per pair)",
        (
            "text encoder left out on both sides: fixed condition embeddings stand in for the baseline's prompt "
            "embeddings (the script recomputes them with CLIP every step); no image decoding or augmentation "
            "on either side"
        ),
    ]
    if cfg.latent:
        notes.append(
            "latents: apo-fast encodes the demo images once at setup with a randomly initialised AutoencoderKL "
            "(SD VAE config) and trains on the cached latents; the baseline encodes pixels with the same VAE "
            "every step (posterior sample), as the script does"
        )
    else:
        notes.append("pixel-space tiny UNet: no VAE on either side")
    if cfg.model == "sdxl":
        notes.append(
            "SDXL: addition_embed_type 'text_time' removed from the UNet config on both sides "
            "(apo-fast's APOModel passes no added_cond_kwargs)"
        )
    if device.type != "cuda":
        notes.append(
            "CPU: peak memory is the process RSS with both sides resident, not a per-side figure; "
            "the memory ratio is not reported"
        )
    return notes


def run_step_benchmark(cfg: StepBenchConfig, workdir: str | Path | None = None, progress: bool = False) -> dict:
    """Build both sides, run ``warmup`` then ``steps`` interleaved steps each, return the result dict.

    ``workdir`` holds scratch files (the random VAE); a temporary folder by default.
    The result has ``config``, ``machine``, ``date``, ``notes``, one dict per side
    (``apo_fast``, ``baseline``: samples/s, step time, breakdown, peak memory,
    telemetry means), ``ratios`` (apo-fast / baseline) and ``telemetry``.
    """
    from apo_fast.telemetry import Telemetry

    if not isinstance(cfg, StepBenchConfig):
        raise TypeError(f"cfg must be a StepBenchConfig, got {type(cfg).__name__}")
    device = cfg.resolved_device()
    previous_threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    own_tmp = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="apo_bench_")) if own_tmp else Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t_build = time.perf_counter()
    load_start = loadavg()
    try:
        sides, resident = _build_sides(cfg, device, workdir)
        build_s = time.perf_counter() - t_build
        run = _Rounds(cfg, sides, device, resident, progress, t_build)
        with Telemetry(device if run.cuda else "cpu", period_s=cfg.telemetry_period_s) as tel:
            run.measure()
            tel_records, tel_summary = tel.records, tel.summary()
        return _result(cfg, device, run, sides, resident, build_s, load_start, tel_records, tel_summary)
    finally:
        if cfg.threads is not None:
            torch.set_num_threads(previous_threads)
        if own_tmp:
            shutil.rmtree(workdir, ignore_errors=True)
        elif (workdir / "random_vae").exists():
            shutil.rmtree(workdir / "random_vae", ignore_errors=True)


def _build_sides(cfg: StepBenchConfig, device: torch.device, workdir: Path) -> tuple[dict, dict]:
    """Both sides built and warmed up; on CUDA, the memory each keeps resident."""
    cuda = device.type == "cuda"
    vae_dir = save_random_vae(cfg.model, workdir / "random_vae", cfg.seed) if cfg.latent else None
    from apo_fast.models.compile import compile_seconds

    m0 = _cuda_allocated(device) if cuda else 0
    apo = APOFastSide(cfg, device, workdir, vae_dir)
    c0 = compile_seconds()
    for _ in range(cfg.warmup):
        apo.step(None)
    apo.compile_s = compile_seconds() - c0  # (cfg.compile: the warmup absorbs the compilation)
    resident = {}
    if cuda:
        resident["apo_fast"] = _cuda_allocated(device) - m0
    base = BaselineSide(cfg, device, apo, vae_dir)
    c0 = compile_seconds()
    for _ in range(cfg.warmup):
        base.step(None)
    base.compile_s = compile_seconds() - c0
    if cuda:
        resident["baseline"] = _cuda_allocated(device) - m0 - resident["apo_fast"]
    if apo.engine.calls == 0 and cfg.warmup:
        raise RuntimeError("APOTrainer.micro_step did not call trainer.engine; the step breakdown cannot be timed")
    return {"apo_fast": apo, "baseline": base}, resident


class _Rounds:
    """The timed rounds: each runs one step of both sides, in alternating order. Ctrl-C keeps
    the whole rounds measured so far (both sides) and marks the run interrupted."""

    def __init__(self, cfg, sides, device, resident, progress, t_build):
        self.cfg, self.sides, self.device, self.resident = cfg, sides, device, resident
        self.progress, self.t_build = progress, t_build
        self.cuda = device.type == "cuda"
        self.records: dict[str, list[dict]] = {name: [] for name in SIDES}
        self.steps_done, self.interrupted = 0, False

    def measure(self) -> None:
        try:
            self._rounds()
        except KeyboardInterrupt:
            if min(len(r) for r in self.records.values()) == 0:
                raise
            self.interrupted = True
            self.steps_done = min(len(r) for r in self.records.values())
            for recs in self.records.values():
                del recs[self.steps_done:]
            log.warning("step benchmark interrupted: reporting the %d step(s) per side measured", self.steps_done)

    def _rounds(self) -> None:
        cfg, timer, origin = self.cfg, PhaseTimer(self.device), time.monotonic()
        for i in range(cfg.steps):
            if cfg.time_budget_s is not None and i >= 2 and time.perf_counter() - self.t_build > cfg.time_budget_s:
                log.warning("step benchmark: time budget of %.0f s reached after %d steps per side", cfg.time_budget_s, i)
                break
            self.steps_done = i + 1
            for name in SIDES if i % 2 == 0 else SIDES[::-1]:
                self.records[name].append(self._one_step(name, timer, origin))
            if self.progress:
                print(f"step {i + 1}/{cfg.steps}: apo-fast {self.records['apo_fast'][-1]['wall_s'] * 1e3:.1f} ms, "
                      f"baseline {self.records['baseline'][-1]['wall_s'] * 1e3:.1f} ms", flush=True)

    def _one_step(self, name: str, timer: PhaseTimer, origin: float) -> dict:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.monotonic() - origin
        timer.start()
        loss = self.sides[name].step(timer)
        wall, phases = timer.stop()
        rec = {"wall_s": wall, "phases": phases, "loss": loss, "t0": t0, "t1": time.monotonic() - origin}
        if self.cuda:
            other = "baseline" if name == "apo_fast" else "apo_fast"
            peak = torch.cuda.max_memory_allocated(self.device)
            rec["peak_total_bytes"] = peak
            rec["peak_own_bytes"] = peak - self.resident[other]
        return rec


def _result(cfg, device, run: _Rounds, sides, resident, build_s, load_start, tel_records, tel_summary) -> dict:
    images, records, cuda = 2 * cfg.batch, run.records, run.cuda
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": {
            **dataclasses.asdict(cfg),
            "device": str(device),
            "mixed_precision": cfg.mixed_precision(device),
            "pixel_size": cfg.pixel_size,
            "cond_tokens": cfg.tokens,
            "images_per_step": images,
            "steps_done": run.steps_done,
            "interrupted": run.interrupted,
        },
        "machine": {**_machine(device), "load_avg_at_start": load_start},
        "notes": _notes(cfg, device),
        "build_and_warmup_s": build_s,
        **{name: {**_summarize_side(records[name], images, tel_records, cuda), "setup": sides[name].describe(),
                  "compile_s": sides[name].compile_s}
           for name in SIDES},
        "telemetry": tel_summary,
        "per_step": {
            name: [{k: v for k, v in r.items() if k not in ("t0", "t1")} for r in recs]
            for name, recs in records.items()
        },
    }
    if cuda:
        result["resident_mib"] = {k: v / MIB for k, v in resident.items()}
    result["ratios"] = _ratios(result["apo_fast"], result["baseline"], cuda)
    result["ratios"]["step_time_paired"] = _paired_ratios(records["apo_fast"], records["baseline"])
    return result


def _ratio(a, b):
    return a / b if a is not None and b else None


def _paired_ratios(apo: list[dict], base: list[dict]) -> dict:
    """Per-round ratios apo-fast / baseline of the step times of the same round (adjacent in
    time, so a drifting machine cancels out): median and quartiles."""
    ratios = sorted(a["wall_s"] / b["wall_s"] for a, b in zip(apo, base))
    if len(ratios) < 2:
        return {"median": ratios[0], "p25": ratios[0], "p75": ratios[0], "rounds": len(ratios)}
    p25, _, p75 = statistics.quantiles(ratios, n=4, method="inclusive")
    return {"median": statistics.median(ratios), "p25": p25, "p75": p75, "rounds": len(ratios)}


def _ratios(apo: dict, base: dict, cuda: bool) -> dict:
    """apo-fast / baseline: ``samples_per_s`` > 1 and the others < 1 favour apo-fast."""
    out = {
        "samples_per_s": _ratio(apo["samples_per_s"], base["samples_per_s"]),
        "step_time_median": _ratio(apo["step_time_s"]["median"], base["step_time_s"]["median"]),
        "step_time_mean": _ratio(apo["step_time_s"]["mean"], base["step_time_s"]["mean"]),
        "peak_memory": _ratio(apo["peak_memory_mib"], base["peak_memory_mib"]) if cuda else None,
    }
    out["breakdown"] = {p: _ratio(apo["breakdown_s"][p], base["breakdown_s"][p]) for p in PHASES}
    return out


