"""Telemetry: NVML path through an injected fake pynvml, RSS fallback, thread lifecycle, statistics."""
import json
import logging
import sys
import threading
import time
import types

import pytest

from apo_fast.telemetry import Telemetry, read_rss_bytes, summarize

LOGGER = "apo_fast.telemetry"


def _warnings(caplog):
    return [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def make_fake_pynvml(util=(87, 91, 60), mem_mib=(10240, 10752), power_mw=(310_000, 250_000),
                     sm=(1980,), memclk=(2619,), init_error=False, broken=()):
    """A stand-in for nvidia-ml-py: each reading cycles through the given values.

    ``broken`` names readings that raise (``"power"`` raises NVMLError_NotSupported,
    ``"util"`` a RuntimeError), to exercise the once-only error path.
    """
    fake = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    class NVMLError_LibraryNotFound(NVMLError):
        pass

    class NVMLError_NotSupported(NVMLError):
        pass

    fake.NVMLError = NVMLError
    fake.NVMLError_LibraryNotFound = NVMLError_LibraryNotFound
    fake.NVMLError_NotSupported = NVMLError_NotSupported
    fake.NVML_CLOCK_GRAPHICS, fake.NVML_CLOCK_SM, fake.NVML_CLOCK_MEM = 0, 1, 2
    fake.calls = {"init": 0, "shutdown": 0, "util": 0, "power": 0}
    counters = {}

    def cycle(name, values):
        i = counters.get(name, 0)
        counters[name] = i + 1
        return values[i % len(values)]

    def nvmlInit():
        fake.calls["init"] += 1
        if init_error:
            raise NVMLError_LibraryNotFound("NVML Shared Library Not Found")

    def nvmlShutdown():
        fake.calls["shutdown"] += 1

    def nvmlDeviceGetHandleByIndex(i):
        return ("handle", i)

    def nvmlDeviceGetUtilizationRates(handle):
        fake.calls["util"] += 1
        if "util" in broken:
            raise RuntimeError("driver hiccup")
        return types.SimpleNamespace(gpu=cycle(("util", handle), util), memory=40)

    def nvmlDeviceGetMemoryInfo(handle):
        used = cycle(("mem", handle), mem_mib) * 2**20
        return types.SimpleNamespace(used=used, total=141 * 2**30, free=141 * 2**30 - used)

    def nvmlDeviceGetPowerUsage(handle):
        fake.calls["power"] += 1
        if "power" in broken:
            raise NVMLError_NotSupported("Not Supported")
        return cycle(("power", handle), power_mw)

    def nvmlDeviceGetClockInfo(handle, kind):
        if kind == fake.NVML_CLOCK_SM:
            return cycle(("sm", handle), sm)
        if kind == fake.NVML_CLOCK_MEM:
            return cycle(("memclk", handle), memclk)
        raise NVMLError("unknown clock")

    for fn in (nvmlInit, nvmlShutdown, nvmlDeviceGetHandleByIndex, nvmlDeviceGetUtilizationRates,
               nvmlDeviceGetMemoryInfo, nvmlDeviceGetPowerUsage, nvmlDeviceGetClockInfo):
        setattr(fake, fn.__name__, fn)
    return fake


# ---------------------------------------------------------------- statistics


def test_summarize_injected_records():
    records = [
        {"t": 0.0, "util_pct": 10.0, "mem_used_mib": 100.0, "note": "x"},
        {"t": 0.5, "util_pct": 30.0, "mem_used_mib": 300.0, "power_w": 200.0},
        {"t": 1.5, "util_pct": 80.0, "mem_used_mib": 200.0, "flag": True, "bad": float("nan")},
    ]
    s = summarize(records)
    assert s["util_pct.mean"] == pytest.approx(40.0)
    assert s["util_pct.max"] == 80.0
    assert s["mem_used_mib.mean"] == pytest.approx(200.0)
    assert s["mem_used_mib.max"] == 300.0
    assert s["power_w.mean"] == 200.0 and s["power_w.max"] == 200.0  # only where present
    assert s["num_samples"] == 3 and s["duration_s"] == pytest.approx(1.5)
    assert not any(k.startswith(("t.", "note", "flag", "bad")) for k in s)
    assert summarize([]) == {"num_samples": 0, "duration_s": 0.0}


# ---------------------------------------------------------------- NVML path (fake module)


def test_nvml_values_reach_snapshot_summary_postfix(monkeypatch, caplog):
    fake = make_fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with Telemetry("cuda:0", period_s=60.0) as tel:  # the thread never fires: samples are explicit
        first = tel.snapshot()
        tel.sample()
    assert tel.kind == "nvml"
    assert fake.calls["init"] == 1 and fake.calls["shutdown"] == 1
    assert first["util_pct"] == 87.0 and first["mem_used_mib"] == pytest.approx(10240.0)
    assert first["power_w"] == pytest.approx(310.0)
    assert first["sm_clock_mhz"] == 1980.0 and first["mem_clock_mhz"] == 2619.0
    assert "rss_mib" not in first
    records = tel.records  # start, explicit, stop
    assert [r["util_pct"] for r in records] == [87.0, 91.0, 60.0]
    assert [r["power_w"] for r in records] == pytest.approx([310.0, 250.0, 310.0])
    s = tel.summary()
    assert s["util_pct.mean"] == pytest.approx((87 + 91 + 60) / 3)
    assert s["util_pct.max"] == 91.0
    assert s["mem_used_mib.max"] == pytest.approx(10752.0)
    assert s["power_w.mean"] == pytest.approx((310 + 250 + 310) / 3)
    assert s["num_samples"] == 3 and s["kind"] == "nvml" and s["errors"] == []
    assert tel.snapshot() == records[-1]
    # last sample: util 60 %, 10240 MiB = 10.0 GiB, 310 W
    assert tel.postfix() == "gpu 60% 10.0GiB 310W"
    assert _warnings(caplog) == []


def test_nvml_reading_errors_are_recorded_once_and_never_raise(monkeypatch, caplog):
    fake = make_fake_pynvml(broken=("power", "util"))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with Telemetry(0, period_s=60.0) as tel:
        for _ in range(3):
            tel.sample()
    records = tel.records
    assert len(records) == 5
    assert all("power_w" not in r and "util_pct" not in r for r in records)
    assert all(r["mem_used_mib"] > 0 and r["sm_clock_mhz"] == 1980.0 for r in records)
    assert fake.calls["power"] == 1 and fake.calls["util"] == 1  # disabled after the first failure
    assert len(tel.errors) == 2 and any("NVMLError_NotSupported" in e for e in tel.errors)
    assert len(_warnings(caplog)) == 2
    assert tel.postfix() == "gpu 10.0GiB"


def test_several_devices_get_prefixed_keys(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", make_fake_pynvml())
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with Telemetry(["cuda:0", "cuda:1"], period_s=60.0) as tel:
        snap = tel.snapshot()
    for i in (0, 1):
        assert snap[f"cuda{i}.util_pct"] == 87.0
        assert snap[f"cuda{i}.power_w"] == pytest.approx(310.0)
    assert "util_pct" not in snap
    assert tel.postfix().startswith("gpu ")


# ---------------------------------------------------------------- RSS fallback


def test_fallback_when_nvml_library_missing_gives_rss_and_one_warning(monkeypatch, caplog):
    fake = make_fake_pynvml(init_error=True)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with Telemetry("cuda:0", period_s=0.01) as tel:
        time.sleep(0.1)
    assert tel.kind == "rss"
    records = tel.records
    assert len(records) >= 3
    assert all(r["rss_mib"] > 0 for r in records)
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "RSS" in warnings[0].getMessage()
    assert "NVMLError_LibraryNotFound" in warnings[0].getMessage()
    assert tel.summary()["rss_mib.max"] > 0
    assert tel.postfix().startswith("rss ") and tel.postfix().endswith("GiB")


def test_real_pynvml_on_this_machine_samples_or_falls_back(caplog):
    """With the real nvidia-ml-py: NVML sampling where a driver answers (a GPU machine), else
    the RSS fallback with one warning (this CPU machine); either way the machine's own case."""
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        nvml_works = False
    else:
        pynvml.nvmlShutdown()
        nvml_works = True
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with Telemetry("cuda:0", period_s=0.02) as tel:
        time.sleep(0.1)
    if nvml_works:
        assert tel.kind == "nvml" and not _warnings(caplog)
        assert tel.records, "NVML sampling recorded nothing"
    else:
        assert tel.kind == "rss"
        assert tel.snapshot()["rss_mib"] > 0
        assert len(_warnings(caplog)) == 1


def test_fallback_without_nvidia_ml_py_and_for_cpu(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with Telemetry("cuda:0", period_s=60.0) as tel:
        pass
    assert tel.kind == "rss" and tel.snapshot()["rss_mib"] > 0
    assert len(_warnings(caplog)) == 1
    caplog.clear()
    with Telemetry("cpu", period_s=60.0) as tel_cpu:
        tel_cpu.sample()
    assert tel_cpu.kind == "rss" and len(tel_cpu.records) == 3
    assert len(_warnings(caplog)) == 1


def test_read_rss_bytes_is_positive_and_grows_with_an_allocation():
    import numpy as np

    before = read_rss_bytes()
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    after = read_rss_bytes()
    assert before > 0 and after - before > 32 * 2**20
    del block


# ---------------------------------------------------------------- lifecycle


def test_thread_samples_periodically_and_stops(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", make_fake_pynvml())
    with Telemetry("cuda:0", period_s=0.01) as tel:
        assert tel.running
        time.sleep(0.15)
    assert not tel.running
    assert not any(t.name == "apo-fast-telemetry" for t in threading.enumerate())
    n = len(tel.records)
    assert n >= 3  # start + stop + at least one from the thread
    time.sleep(0.05)
    assert len(tel.records) == n  # nothing samples after exit
    ts = [r["t"] for r in tel.records]
    assert ts == sorted(ts)


def test_exit_on_exception_stops_thread_and_keeps_exception(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", make_fake_pynvml())
    with pytest.raises(KeyError):
        with Telemetry("cuda:0", period_s=0.01) as tel:
            raise KeyError("training failed")
    assert not tel.running


def test_write_jsonl_and_max_records(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pynvml", make_fake_pynvml())
    with Telemetry("cuda:0", period_s=60.0, max_records=2) as tel:
        tel.sample()
        tel.sample()
    assert len(tel.records) == 2
    path = tel.write_jsonl(tmp_path / "logs" / "telemetry.jsonl")
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == tel.records
    assert not (tmp_path / "logs" / "telemetry.jsonl.tmp").exists()


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="period_s"):
        Telemetry("cpu", period_s=0)
    with pytest.raises(ValueError, match="max_records"):
        Telemetry("cpu", max_records=0)
    with pytest.raises(TypeError, match="device"):
        Telemetry(1.5)
    with pytest.raises(ValueError, match="device"):
        Telemetry(["cuda:0", "cpu"])
    tel = Telemetry("cpu", period_s=60.0)
    assert tel.snapshot() == {} and tel.postfix() == ""
    with tel:
        with pytest.raises(RuntimeError, match="already started"):
            tel.start()
