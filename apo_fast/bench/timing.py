"""Timing that a GPU's asynchrony cannot fool: device syncs, per-call medians, the step's phase breakdown.
"""
from __future__ import annotations

import itertools
import statistics
import time
from typing import Any

import torch

# --------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_per_call(fn, device: torch.device, *, warmup: int = 3, reps: int = 20, rounds: int = 5) -> float:
    """Seconds per call of ``fn``: the median over ``rounds`` of the mean of ``reps``
    back-to-back calls (what the kernel benchmarks and the GPU suite time with).

    On CUDA the calls are not synchronised one by one (as in a training loop)
    and CUDA events time each round, so host launch overhead counts only where
    it exceeds the device time; elsewhere ``perf_counter`` times each round.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    per_round = []
    for _ in range(rounds):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            end.synchronize()
            per_round.append(start.elapsed_time(end) / 1e3 / reps)
        else:
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            per_round.append((time.perf_counter() - t0) / reps)
    return statistics.median(per_round)



class PhaseTimer:
    """Times the named phases of one step: CUDA events on a GPU, ``perf_counter`` on a CPU.

    ``start()``, then ``phase(name)`` whenever a new phase begins (a name may come
    back; its times add up), then ``stop()`` -> ``(wall_seconds, {phase: seconds})``.
    On CUDA no phase boundary synchronises; ``stop`` synchronises once.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self._marks: list[tuple[str, Any]] = []
        self._t0 = 0.0

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self._marks = []
        self._t0 = time.perf_counter()
        self.phase("data")

    def phase(self, name: str) -> None:
        if self._marks and self._marks[-1][0] == name:
            return
        self._marks.append((name, self._now()))

    def stop(self) -> tuple[float, dict[str, float]]:
        end = self._now()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        wall = time.perf_counter() - self._t0
        phases: dict[str, float] = {}
        bounds = self._marks + [("_end", end)]
        for (name, a), (_, b) in itertools.pairwise(bounds):
            seconds = a.elapsed_time(b) / 1e3 if self.cuda else b - a
            phases[name] = phases.get(name, 0.0) + seconds
        return wall, phases


class _TimedEngine:
    """Stands in for the DeepSpeed engine inside ``APOTrainer.micro_step`` and tells a
    :class:`PhaseTimer` where the forward passes, the backward and the optimizer step begin."""

    def __init__(self, engine, timer: PhaseTimer | None = None):
        self._engine = engine
        self.timer = timer
        self.calls = 0

    def _phase(self, name: str) -> None:
        if self.timer is not None:
            self.timer.phase(name)

    def __call__(self, *args, reference: bool = False, **kwargs):
        self.calls += 1
        self._phase("reference_forward" if reference else "policy_forward")
        out = self._engine(*args, reference=reference, **kwargs)
        self._phase("loss")
        return out

    def backward(self, loss, *args, **kwargs):
        self._phase("backward")
        out = self._engine.backward(loss, *args, **kwargs)
        self._phase("optimizer")  # gradient clipping (the trainer's own at ZeRO 0 in fp32) onwards
        return out

    def step(self, *args, **kwargs):
        self._phase("optimizer")
        out = self._engine.step(*args, **kwargs)
        self._phase("other")
        return out

    def __getattr__(self, name):
        return getattr(self._engine, name)


