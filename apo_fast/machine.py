"""The machine a run shares: CPU threads chosen from the free cores, the load average,
and DeepSpeed's JIT-built CPU communication op built once under a file lock.

Why threads matter: on a loaded 2-core machine, two torch threads per process make
a tiny-UNet step 10-60x slower (each OpenMP region waits for a descheduled
thread; see ``benchmarks/RESULTS.md``), while one thread does not slow down.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

__all__ = ["available_cores", "busy_cores", "choose_threads", "deepspeed_cpu_ops_built", "loadavg", "machine_load",
           "omp_threads", "shm_op_lock"]


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. under ``taskset``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def loadavg() -> list[float] | None:
    """The 1/5/15-minute load averages (None where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _cpu_times() -> tuple[int, int] | None:
    """(idle, total) jiffies of all CPUs from ``/proc/stat`` (None where there is none)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(v) for v in fields[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return idle, sum(ticks[:8])  # guest time is already inside user/nice


def busy_cores(window: float = 0.3) -> float | None:
    """How many of the machine's CPUs were busy over the next ``window`` seconds (Linux;
    None elsewhere). Unlike the load average, it does not remember jobs that just ended."""
    first = _cpu_times()
    if first is None:
        return None
    time.sleep(window)
    second = _cpu_times()
    if second is None:
        return None
    idle, total = second[0] - first[0], second[1] - first[1]
    if total <= 0:
        return None
    return round((1.0 - idle / total) * (os.cpu_count() or 1), 2)


def machine_load(avg_1min: float | None, busy_now: float | None) -> float:
    """The load the thread choice subtracts: the smaller of the 1-minute load average
    and the cores busy right now, so load left by jobs that already finished (an install,
    a test run) does not cost this run its threads; 0 where neither is known."""
    known = [v for v in (avg_1min, busy_now) if v is not None]
    return min(known) if known else 0.0


def omp_threads(environ: dict | None = None) -> int | None:
    """The thread count ``OMP_NUM_THREADS`` asks for (its first level where it lists
    several), or None where it is unset or not a positive integer."""
    value = (os.environ if environ is None else environ).get("OMP_NUM_THREADS", "")
    first = value.split(",")[0].strip()
    return int(first) if first.isdigit() and int(first) >= 1 else None


def choose_threads(setting: int | str = "auto", cores: int | None = None, load: float | None = None,
                   environ: dict | None = None) -> tuple[int, str]:
    """The torch intra-op thread count for ``setting`` and why.

    ``auto``: ``OMP_NUM_THREADS`` where the environment sets it (as torch itself would);
    else the cores this process may use minus the machine's load (rounded to the
    nearest core), at least 1 and at most the cores; the load is :func:`machine_load` of
    the 1-minute load average and :func:`busy_cores` unless ``load`` is given. A number:
    that many threads. Returns ``(threads, reason)``; the reason goes in the log.
    """
    if setting != "auto":
        if not isinstance(setting, int) or isinstance(setting, bool) or setting < 1:
            raise ValueError(f"threads must be 'auto' or an integer >= 1; got {setting!r}")
        return setting, "set"
    asked = omp_threads(environ)
    if asked is not None:
        return asked, f"auto: OMP_NUM_THREADS={asked} in the environment"
    cores = available_cores() if cores is None else cores
    detail = ""
    if load is None:
        avg = loadavg()
        avg1, now = (avg[0] if avg else None), busy_cores()
        load = machine_load(avg1, now)
        detail = f" (1-minute average {avg1}, busy now {now})"
    free = cores - load
    threads = min(cores, max(1, int(math.floor(free + 0.5))))
    return threads, f"auto: {cores} core(s) available, load {load:.2f}{detail}"


def apply_threads(setting: int | str = "auto") -> int:
    """Set torch's intra-op thread count from ``setting`` (see :func:`choose_threads`), log it, return it."""
    import torch

    threads, why = choose_threads(setting)
    torch.set_num_threads(threads)
    log.info("torch CPU threads: %d (%s; set train.threads or --threads to change)", threads, why)
    return threads


def _extensions_root() -> Path:
    """Where torch's JIT extensions (and so DeepSpeed's ops) are built."""
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    if env:
        return Path(env)
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def deepspeed_cpu_ops_built(name: str = "deepspeed_shm_comm") -> bool:
    """Whether DeepSpeed's JIT op ``name`` is already built in the extensions cache."""
    root = _extensions_root()
    return root.is_dir() and any(root.glob(f"**/{name}/{name}*.so"))


@contextlib.contextmanager
def shm_op_lock(timeout_s: float = 1800.0) -> Iterator[None]:
    """Hold an exclusive file lock on the torch-extensions cache while DeepSpeed's CPU
    communication op is built and loaded.

    Two processes that JIT-build ``deepspeed_shm_comm`` at once in the same cache
    race (the loser fails with ``ImportError ... deepspeed_shm_comm.so: cannot open
    shared object file``). Under this lock the first one builds, the others wait
    and then load the finished library. The lock file lives in the cache itself,
    so runs with different ``TORCH_EXTENSIONS_DIR`` never wait for each other.
    """
    import fcntl
    import time

    root = _extensions_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".apo_fast_deepspeed_ops.lock", "a+") as fh:
        start = time.monotonic()
        announced = False
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not announced:
                    log.info("waiting for another run building DeepSpeed's CPU communication op in %s", root)
                    announced = True
                if time.monotonic() - start > timeout_s:
                    raise TimeoutError(f"waited {timeout_s:.0f}s for the lock on {root}; remove "
                                       f"{root / '.apo_fast_deepspeed_ops.lock'} if no other run is alive")
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def prebuild_deepspeed_cpu_ops(builders: tuple[str, ...] = ("ShareMemCommBuilder",)) -> list[str]:
    """Build (first run) or load DeepSpeed's JIT ops named by their builder classes under
    :func:`shm_op_lock`, saying so on the console when one has to be built: the shm
    communication op takes 20 s on a quiet machine and minutes on a busy one, before
    the first step. ``deepspeed.initialize`` (and ``DeepSpeedCPUAdam``) then find them
    loaded. Returns the names of the ops built here."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    built = []
    with shm_op_lock():
        for cls_name in builders:
            builder = get_accelerator().create_op_builder(cls_name)
            if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
                continue
            if not deepspeed_cpu_ops_built(builder.NAME):
                log.info("building DeepSpeed's %s op into %s (first run only: ~20-40 s, minutes on a busy "
                         "machine)", builder.NAME, _extensions_root())
                built.append(builder.NAME)
            builder.load(verbose=False)
    return built
