"""GPU telemetry sampled in a background thread: NVML (nvidia-ml-py) with a process-RSS fallback.

::

    with Telemetry(device, period_s=0.5) as tel:
        for step in progress:
            ...
            progress.set_postfix_str(tel.postfix())   # "gpu 87% 10.2GiB 310W"
    log.info("telemetry %s", tel.summary())
    tel.write_jsonl(run_dir / "telemetry.jsonl")

Each sample is a flat dict: ``t`` (seconds since start), then per CUDA device
``util_pct``, ``mem_used_mib``, ``power_w``, ``sm_clock_mhz``, ``mem_clock_mhz``
from NVML and ``max_allocated_mib``, ``max_reserved_mib`` from ``torch.cuda``
(keys are prefixed ``cuda<i>.`` when several devices are sampled), or
``rss_mib`` (the process's resident memory) when NVML cannot be used. A failing
reading is skipped, recorded once in :attr:`Telemetry.errors` and logged once;
nothing is ever raised into the training loop once sampling has started.
"""
from __future__ import annotations

import importlib
import json
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

log = logging.getLogger(__name__)

MIB = 2**20
NVML_FIELDS = ("util_pct", "mem_used_mib", "power_w", "sm_clock_mhz", "mem_clock_mhz")
CUDA_FIELDS = ("max_allocated_mib", "max_reserved_mib")


def read_rss_bytes() -> int:
    """Resident set size of this process in bytes: ``/proc/self/statm``, else ``resource`` (peak RSS)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def summarize(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Mean and max of every numeric field over ``records``.

    Returns ``{"<field>.mean": ..., "<field>.max": ..., "num_samples": n,
    "duration_s": last t - first t}``; the time stamp ``t`` itself is not summarized
    and a field missing from some records is summarized over those that have it.
    """
    values: dict[str, list[float]] = {}
    for record in records:
        for key, value in record.items():
            if key != "t" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                values.setdefault(key, []).append(float(value))
    out: dict[str, float] = {}
    for key, vals in values.items():
        out[f"{key}.mean"] = sum(vals) / len(vals)
        out[f"{key}.max"] = max(vals)
    times = [r["t"] for r in records if "t" in r]
    out["num_samples"] = len(records)
    out["duration_s"] = (max(times) - min(times)) if times else 0.0
    return out


def _cuda_indices(device) -> list[int] | None:
    """CUDA device indices to sample, or None for a CPU (or other non-CUDA) run."""
    if device is None:
        return [torch.cuda.current_device()] if torch.cuda.is_available() else None
    if isinstance(device, (list, tuple)):
        if not device:
            raise ValueError("device must not be an empty list")
        indices = [_cuda_indices(d) for d in device]
        if any(i is None for i in indices):
            raise ValueError(f"device list must hold only CUDA devices, got {device!r}")
        return [i for group in indices for i in group]
    if isinstance(device, bool):
        raise TypeError(f"device must be None, an int, a str, a torch.device or a list of them, got {device!r}")
    if isinstance(device, int):
        if device < 0:
            raise ValueError(f"device index must be >= 0, got {device}")
        return [device]
    if isinstance(device, (str, torch.device)):
        dev = torch.device(device)
        if dev.type != "cuda":
            return None
        if dev.index is not None:
            return [dev.index]
        return [torch.cuda.current_device()] if torch.cuda.is_available() else [0]
    raise TypeError(f"device must be None, an int, a str, a torch.device or a list of them, got {type(device).__name__}")


def _physical_ids(indices: Iterable[int]) -> list[int | str]:
    """Map CUDA ordinals to NVML ids through ``CUDA_VISIBLE_DEVICES`` (ints or GPU UUIDs)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    entries = [e.strip() for e in visible.split(",") if e.strip()] if visible else []
    out: list[int | str] = []
    for i in indices:
        if i < len(entries):
            e = entries[i]
            out.append(int(e) if e.isdigit() else e)
        else:
            out.append(i)
    return out


class Telemetry:
    """Background sampler of GPU utilisation, memory, power and clocks (NVML) or process RSS.

    Args:
        device: what to sample: None (the current CUDA device, or the process on a
            CPU-only machine), an int or ``"cuda:N"``/``torch.device`` or a list of
            CUDA devices, or ``"cpu"`` (process RSS).
        period_s: seconds between samples (> 0).
        max_records: keep at most this many samples (oldest dropped); None keeps all.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. One sample is
    taken synchronously at start and one at stop, the rest by the thread.
    """

    def __init__(self, device=None, period_s: float = 0.5, max_records: int | None = None):
        if isinstance(period_s, bool) or not isinstance(period_s, (int, float)) or not period_s > 0:
            raise ValueError(f"period_s must be a positive number of seconds, got {period_s!r}")
        if max_records is not None and (isinstance(max_records, bool) or not isinstance(max_records, int) or max_records < 1):
            raise ValueError(f"max_records must be None or an int >= 1, got {max_records!r}")
        self.period_s = float(period_s)
        self.max_records = max_records
        self.cuda_indices = _cuda_indices(device)
        self.kind: str | None = None  # "nvml" or "rss" once started
        self.errors: list[str] = []
        self._records: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml = None
        self._handles: list[Any] = []
        self._disabled: set[str] = set()
        self._warned_fallback = False
        self._t0 = 0.0

    # ---------------------------------------------------------------- lifecycle

    def __enter__(self) -> "Telemetry":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop()

    def start(self) -> "Telemetry":
        """Open NVML (or choose the RSS fallback), take one sample and start the thread."""
        if self._thread is not None:
            raise RuntimeError("Telemetry already started")
        self._t0 = time.monotonic()
        self._stop.clear()
        self._open()
        self.sample()
        self._thread = threading.Thread(target=self._run, name="apo-fast-telemetry", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop and join the thread (``timeout_s`` default ``max(1, 2 * period_s)``), take a last sample."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        thread.join(timeout=max(1.0, 2 * self.period_s) if timeout_s is None else timeout_s)
        if thread.is_alive():
            self._record_error("thread", "sampling thread did not stop within the join timeout")
        self.sample()
        self._close()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.sample()

    # ---------------------------------------------------------------- NVML

    def _open(self) -> None:
        self._disabled.clear()
        self._handles = []
        if self.cuda_indices is None:
            self.kind = "rss"
            self._fallback("no CUDA device to sample (device is CPU)")
            return
        try:
            nvml = importlib.import_module("pynvml")
        except ImportError as exc:
            self.kind = "rss"
            self._fallback(f"nvidia-ml-py is not installed ({exc})")
            return
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            self.kind = "rss"
            self._fallback(f"NVML is unavailable ({type(exc).__name__}: {exc})")
            return
        try:
            for ident in _physical_ids(self.cuda_indices):
                if isinstance(ident, str):
                    self._handles.append(nvml.nvmlDeviceGetHandleByUUID(ident))
                else:
                    self._handles.append(nvml.nvmlDeviceGetHandleByIndex(ident))
        except nvml.NVMLError as exc:
            self._handles = []
            self._safe_shutdown(nvml)
            self.kind = "rss"
            self._fallback(f"NVML has no handle for CUDA device(s) {self.cuda_indices} ({type(exc).__name__}: {exc})")
            return
        self._nvml = nvml
        self.kind = "nvml"

    def _close(self) -> None:
        nvml, self._nvml = self._nvml, None
        if nvml is not None:
            self._safe_shutdown(nvml)

    def _safe_shutdown(self, nvml) -> None:
        try:
            nvml.nvmlShutdown()
        except Exception as exc:  # a failing shutdown must not reach the training loop
            self._record_error("shutdown", f"{type(exc).__name__}: {exc}")

    def _fallback(self, reason: str) -> None:
        if not self._warned_fallback:
            self._warned_fallback = True
            log.warning("telemetry: %s; sampling process RSS instead of GPU metrics", reason)

    def _record_error(self, source: str, message: str) -> None:
        if source in self._disabled:
            return
        self._disabled.add(source)
        text = f"{source}: {message}"
        self.errors.append(text)
        log.warning("telemetry: %s (this reading is skipped from now on)", text)

    def _read(self, source: str, fn):
        if source in self._disabled:
            return None
        try:
            return fn()
        except Exception as exc:  # NVMLError_NotSupported, driver hiccups: skip this reading
            self._record_error(source, f"{type(exc).__name__}: {exc}")
            return None

    def _nvml_sample(self, handle, prefix: str, out: dict) -> None:
        nvml = self._nvml
        readings = {
            "util_pct": lambda: float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
            "mem_used_mib": lambda: nvml.nvmlDeviceGetMemoryInfo(handle).used / MIB,
            "power_w": lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
            "sm_clock_mhz": lambda: float(nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM)),
            "mem_clock_mhz": lambda: float(nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_MEM)),
        }
        for name, fn in readings.items():
            value = self._read(prefix + name, fn)
            if value is not None:
                out[prefix + name] = value

    def _cuda_sample(self, index: int, prefix: str, out: dict) -> None:
        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return
        for name, fn in (("max_allocated_mib", torch.cuda.max_memory_allocated),
                         ("max_reserved_mib", torch.cuda.max_memory_reserved)):
            value = self._read(prefix + name, lambda fn=fn: fn(index) / MIB)
            if value is not None:
                out[prefix + name] = value

    # ---------------------------------------------------------------- sampling

    def sample(self) -> dict[str, Any]:
        """Take one sample now (also called by the thread), store and return it. Never raises."""
        try:
            record: dict[str, Any] = {"t": time.monotonic() - self._t0}
            indices = self.cuda_indices or []
            multi = len(indices) > 1
            for pos, index in enumerate(indices):
                prefix = f"cuda{index}." if multi else ""
                if self.kind == "nvml" and pos < len(self._handles):
                    self._nvml_sample(self._handles[pos], prefix, record)
                self._cuda_sample(index, prefix, record)
            if self.kind != "nvml":
                rss = self._read("rss", read_rss_bytes)
                if rss is not None:
                    record["rss_mib"] = rss / MIB
            with self._lock:
                self._records.append(record)
                if self.max_records is not None and len(self._records) > self.max_records:
                    del self._records[: len(self._records) - self.max_records]
            return dict(record)
        except Exception as exc:  # the sampler must never raise into training
            self._record_error("sample", f"{type(exc).__name__}: {exc}")
            return {}

    # ---------------------------------------------------------------- results

    @property
    def records(self) -> list[dict[str, Any]]:
        """A copy of every stored sample, oldest first."""
        with self._lock:
            return [dict(r) for r in self._records]

    def snapshot(self) -> dict[str, Any]:
        """The latest sample (empty before the first)."""
        with self._lock:
            return dict(self._records[-1]) if self._records else {}

    def summary(self) -> dict[str, Any]:
        """Mean and max per field over the run (see :func:`summarize`), plus ``kind`` and ``errors``."""
        out: dict[str, Any] = summarize(self.records)
        out["kind"] = self.kind
        out["errors"] = list(self.errors)
        return out

    def postfix(self) -> str:
        """Short text for a tqdm bar: ``"gpu 87% 10.2GiB 310W"``, ``"rss 1.2GiB"``; "" before any sample."""
        snap = self.snapshot()
        if not snap:
            return ""
        multi = self.cuda_indices is not None and len(self.cuda_indices) > 1
        prefix = f"cuda{self.cuda_indices[0]}." if multi else ""
        parts: list[str] = []
        if self.kind == "nvml":
            parts.append("gpu")
            if prefix + "util_pct" in snap:
                parts.append(f"{snap[prefix + 'util_pct']:.0f}%")
            if prefix + "mem_used_mib" in snap:
                parts.append(f"{snap[prefix + 'mem_used_mib'] / 1024:.1f}GiB")
            if prefix + "power_w" in snap:
                parts.append(f"{snap[prefix + 'power_w']:.0f}W")
        else:
            if "rss_mib" in snap:
                parts.append(f"rss {snap['rss_mib'] / 1024:.1f}GiB")
            if prefix + "max_allocated_mib" in snap:
                parts.append(f"peak {snap[prefix + 'max_allocated_mib'] / 1024:.1f}GiB")
        return " ".join(parts)

    def write_jsonl(self, path: str | os.PathLike) -> Path:
        """Write every sample as one JSON object per line (atomically: a temp file then rename)."""
        from apo_fast.io_utils import atomic_write_text

        path = Path(path)
        atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in self.records))
        return path


__all__ = ["CUDA_FIELDS", "NVML_FIELDS", "Telemetry", "read_rss_bytes", "summarize"]
