"""The C library ``apo_fast_kernels``: CMake configure + build + CTest, and its launches
checked against the Python launchers.

* ``test_ctest``: ``cmake -S . -B <tmp>``, ``cmake --build``, ``ctest`` (no GPU: the
  C++ tests check the clean "no driver" errors, the embedded cubins, and every
  launch through a fake CUDA driver that reads parameter layouts from the cubins).
* ``test_*_launches_match_python``: the library loaded with ctypes on the fake
  driver, next to the Python launchers of ``apo_fast/ops`` with their Triton
  kernels replaced by recorders: same grid, same parameter values in the
  compiled kernel's order, same compile-time flags, for each case.
* ``test_gpu_*`` (CUDA only): the C library on CUDA tensors against the Python
  Triton path.

Skipped with a message only when cmake or a C compiler is missing. The first
build compiles 226 kernel variants with Triton (about a minute of CPU on 2
cores); Triton's cache makes later builds take seconds.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import shutil
import struct
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SM_COUNT = 132  # the fake device: an H100/H200

pytestmark = pytest.mark.skipif(
    shutil.which("cmake") is None or not any(shutil.which(c) for c in ("cc", "gcc", "clang")),
    reason="the C library test needs cmake and a C compiler on PATH",
)


# --------------------------------------------------------------------------- build


def _build_env() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the generator compiles for real (it sets 0 itself too)
    env.pop("APO_FAST_KERNELS_LIBCUDA", None)
    return env


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory) -> Path:
    """Configure and build the library once for this module."""
    build = tmp_path_factory.mktemp("cmake_build")
    configure = [
        "cmake",
        "-S",
        str(ROOT),
        "-B",
        str(build),
        f"-DPython3_EXECUTABLE={sys.executable}",
        "-DAPO_FAST_KERNELS_WERROR=ON",
        "-DCMAKE_BUILD_TYPE=Release",
    ]
    for cmd in (configure, ["cmake", "--build", str(build), "-j", "2"]):
        proc = subprocess.run(cmd, cwd=ROOT, env=_build_env(), capture_output=True, text=True, timeout=900, check=False)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return build


def test_ctest(build_dir):
    proc = subprocess.run(
        ["ctest", "--test-dir", str(build_dir), "--output-on-failure"],
        env=_build_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    for name in ("c_api_no_driver", "c_api_fake_driver", "c_api_fake_no_device", "apo_loss_example"):
        assert any(name in line and "Passed" in line for line in proc.stdout.splitlines()), proc.stdout
    gpu_line = next(line for line in proc.stdout.splitlines() if "c_api_gpu" in line and "Test #" in line)
    assert ("Passed" in gpu_line) if torch.cuda.is_available() else ("Skipped" in gpu_line), proc.stdout


# --------------------------------------------------------------------------- ctypes


class LossDesc(ctypes.Structure):
    _fields_ = [
        ("dtype", ctypes.c_int),
        ("layout", ctypes.c_int),
        ("n_samples", ctypes.c_int64),
        ("channels", ctypes.c_int64),
        ("spatial", ctypes.c_int64),
        ("mask_channels", ctypes.c_int64),
        ("lambda_mask", ctypes.c_double),
        ("lambda_sft", ctypes.c_double),
        ("beta", ctypes.c_double),
        ("paired", ctypes.c_int),
    ]


class LossPlan(ctypes.Structure):
    _fields_ = [("desc", LossDesc)] + [
        (name, ctypes.c_int64)
        for name in (
            "n_terms",
            "sample_numel",
            "positions",
            "repeats",
            "repeat_stride",
            "mask_mode",
            "mask_div",
            "mask_sample_numel",
            "chunk",
            "n_chunks",
            "partials_floats",
            "stats_floats",
        )
    ]


class GatedLoraDesc(ctypes.Structure):
    _fields_ = (
        [("dtype", ctypes.c_int)]
        + [
            (name, ctypes.c_int64)
            for name in ("tokens", "in_features", "out_features", "rank", "tokens_per_sample", "gate_row_stride")
        ]
        + [("scaling", ctypes.c_double)]
        + [(name, ctypes.c_int64) for name in ("ld_x", "ld_weight", "ld_lora_a", "ld_lora_b", "ld_y")]
    )


class VariantInfo(ctypes.Structure):
    _fields_ = [
        ("label", ctypes.c_char_p),
        ("kernel", ctypes.c_char_p),
        ("arch", ctypes.c_int),
        ("dtype", ctypes.c_int),
        ("cubin", ctypes.c_void_p),
        ("cubin_size", ctypes.c_size_t),
        ("shared_bytes", ctypes.c_uint),
        ("num_warps", ctypes.c_int),
        ("num_params", ctypes.c_int),
    ]


class FakeLaunch(ctypes.Structure):
    _fields_ = [
        ("function", ctypes.c_char * 128),
        ("arch", ctypes.c_int),
        ("image", ctypes.c_void_p),
        ("grid", ctypes.c_uint * 3),
        ("block", ctypes.c_uint * 3),
        ("shared_bytes", ctypes.c_uint),
        ("stream", ctypes.c_void_p),
        ("context", ctypes.c_void_p),
        ("n_params", ctypes.c_int),
        ("offsets", ctypes.c_uint * 64),
        ("sizes", ctypes.c_uint * 64),
        ("params", ctypes.c_ubyte * 1024),
    ]


DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
OK = 0
VP = ctypes.c_void_p


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    i32 = ctypes.c_int
    signatures = {
        "apo_fk_driver_status": (i32, []),
        "apo_fk_variant_count": (i32, []),
        "apo_fk_variant_get": (i32, [i32, ctypes.POINTER(VariantInfo)]),
        "apo_fk_loss_plan_make": (i32, [ctypes.POINTER(LossDesc), i32, ctypes.POINTER(LossPlan)]),
        "apo_fk_loss_forward": (i32, [VP, ctypes.POINTER(LossPlan)] + [VP] * 8),
        "apo_fk_loss_grad": (i32, [VP, ctypes.POINTER(LossPlan)] + [VP] * 6),
        "apo_fk_gated_lora_forward": (i32, [VP, ctypes.POINTER(GatedLoraDesc)] + [VP] * 8),
        "apo_fk_gated_lora_backward_dx": (i32, [VP, ctypes.POINTER(GatedLoraDesc)] + [VP] * 7),
        "apo_fk_gated_lora_dadb_splits": (
            i32,
            [ctypes.POINTER(GatedLoraDesc), i32, ctypes.POINTER(i32), ctypes.POINTER(i32)],
        ),
        "apo_fk_gated_lora_backward_dadb": (i32, [VP, ctypes.POINTER(GatedLoraDesc), i32, i32] + [VP] * 7),
        "apo_fk_status_string": (ctypes.c_char_p, [i32]),
        "apo_fk_device_query": (i32, [ctypes.POINTER(i32)] * 3),
    }
    for name, (restype, argtypes) in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def _load_library(build_dir: Path, tag: str, libcuda: str | None) -> ctypes.CDLL:
    """A private copy of the library (its own driver state), its driver chosen by ``libcuda``."""
    copy = build_dir / f"libapo_fast_kernels_{tag}.so"
    shutil.copyfile(build_dir / "libapo_fast_kernels.so", copy)
    lib = _declare(ctypes.CDLL(str(copy)))
    saved = os.environ.get("APO_FAST_KERNELS_LIBCUDA")
    if libcuda is not None:
        os.environ["APO_FAST_KERNELS_LIBCUDA"] = libcuda
    try:
        lib.status = lib.apo_fk_driver_status()  # the driver is chosen once, here
    finally:
        if saved is None:
            os.environ.pop("APO_FAST_KERNELS_LIBCUDA", None)
        else:
            os.environ["APO_FAST_KERNELS_LIBCUDA"] = saved
    return lib


@pytest.fixture(scope="module")
def manifest(build_dir) -> dict:
    return json.loads((build_dir / "generated" / "apo_fast_kernels_manifest.json").read_text())


@pytest.fixture(scope="module")
def fake(build_dir):
    """(library on the fake driver, the fake driver's controls)."""
    fake_path = build_dir / "tests" / "cpp" / "libapo_fk_fake_cuda.so"
    lib = _load_library(build_dir, "fake", str(fake_path))
    assert lib.status == OK
    driver = ctypes.CDLL(str(fake_path))  # the instance the library opened
    driver.fake_cuda_launch_get.argtypes = [ctypes.c_int, ctypes.POINTER(FakeLaunch)]
    driver.fake_cuda_configure(9, 0, SM_COUNT, 232448, 1)
    return lib, driver


def _variants_by_image(lib) -> dict[int, int]:
    out = {}
    for i in range(lib.apo_fk_variant_count()):
        info = VariantInfo()
        assert lib.apo_fk_variant_get(i, ctypes.byref(info)) == OK
        out[info.cubin] = i
    return out


def test_manifest_matches_library_and_kernel_sources(build_dir, manifest, fake):
    """The embedded table is the manifest, and its parameter lists are the current kernels'."""
    import hashlib

    from apo_fast.aot import variants as kernels_aot

    lib, _ = fake
    assert lib.apo_fk_variant_count() == len(manifest["variants"]) == len(kernels_aot.library_variants())
    for i, entry in enumerate(manifest["variants"]):
        info = VariantInfo()
        assert lib.apo_fk_variant_get(i, ctypes.byref(info)) == OK
        assert info.label.decode() == entry["label"] and info.arch == entry["arch"]
        cubin = ctypes.string_at(info.cubin, info.cubin_size)
        assert hashlib.sha256(cubin).hexdigest() == entry["cubin_sha256"]
        assert info.num_params == len(entry["params"]) + entry["n_scratch"]
    for variant in kernels_aot.library_variants():
        fn = variant.function()
        while hasattr(fn, "fn") and not hasattr(fn, "arg_names"):
            fn = fn.fn
        names = [n for n in fn.arg_names if n not in variant.constexprs]
        entry = next(e for e in manifest["variants"] if e["label"] == variant.label)
        assert entry["params"] == names, f"stale build: {variant.label}"


# --------------------------------------------------------------------------- recorders


class _Recorder:
    """Stands in for a Triton kernel: records ``kernel[grid](*args, **kwargs)``."""

    def __init__(self, name: str, kernel, log: list, meta: dict | None = None):
        fn = kernel
        while not hasattr(fn, "arg_names"):
            fn = fn.fn
        self.name, self.arg_names, self.log, self.meta = name, list(fn.arg_names), log, dict(meta or {})

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            values = dict(zip(self.arg_names, args))
            values.update({k: v for k, v in kwargs.items() if k in self.arg_names})
            options = {k: v for k, v in kwargs.items() if k not in self.arg_names}
            g = grid({**values, **self.meta}) if callable(grid) else grid
            self.log.append(
                {"kernel": self.name, "grid": tuple(g) + (1,) * (3 - len(g)), "args": values, "options": options}
            )

        return launch


def _c_launches(lib, driver, manifest) -> list[dict]:
    """The fake driver's recorded launches, each decoded with its variant's parameter names and types."""
    by_image = _variants_by_image(lib)
    out = []
    for i in range(driver.fake_cuda_launch_count()):
        launch = FakeLaunch()
        assert driver.fake_cuda_launch_get(i, ctypes.byref(launch)) == 0
        entry = manifest["variants"][by_image[launch.image]]
        raw = bytes(launch.params)
        values = {}
        assert launch.n_params == len(entry["params"]) + entry["n_scratch"]
        for j, name in enumerate(entry["params"]):
            ty = entry["signature"][name].partition(":")[0]
            off, size = launch.offsets[j], launch.sizes[j]
            fmt = {"i32": "<i", "fp32": "<f"}.get(ty, "<Q")
            assert size == struct.calcsize(fmt), f"{entry['label']}.{name}: {size} bytes in the cubin"
            values[name] = struct.unpack_from(fmt, raw, off)[0]
        for j in range(len(entry["params"]), launch.n_params):
            assert struct.unpack_from("<Q", raw, launch.offsets[j])[0] == 0  # scratch pointers are null
        out.append({"entry": entry, "grid": tuple(launch.grid), "block": launch.block[0], "args": values})
    return out


def _python_value(value):
    if isinstance(value, torch.Tensor):
        return value.data_ptr()
    if isinstance(value, bool):
        return int(value)
    return value


def _assert_same_launch(c: dict, py: dict, flags: tuple[str, ...]) -> None:
    label = c["entry"]["label"]
    assert c["grid"] == py["grid"], f"{label}: grid {c['grid']} != {py['grid']}"
    for name, got in c["args"].items():
        want = _python_value(py["args"][name])
        if isinstance(got, float):
            want = struct.unpack("<f", struct.pack("<f", want))[0]  # as the fp32 kernel argument
        assert got == want, f"{label}: argument {name} = {got}, Python passes {want}"
    for name in flags:
        want = _python_value(py["args"].get(name, py["options"].get(name)))
        assert c["entry"]["constexprs"][name] == want, f"{label}: {name}"
    if "num_warps" in py["options"]:
        assert c["block"] == 32 * py["options"]["num_warps"]


# --------------------------------------------------------------------------- loss vs Python


LOSS_CASES = {
    # name: (shape, dtype, channels_last, mask ("none" | "broadcast" | "full"), lambda_mask, paired, beta, sft)
    "sd-bf16-broadcast-mask": ((4, 4, 64, 64), torch.bfloat16, False, "broadcast", 2.0, False, 5.0, 0.0),
    "odd-fp16-paired-beta-vector": ((6, 4, 17, 19), torch.float16, False, "none", 1.0, True, "vector", 0.1),
    "fp32-channels-last-broadcast": ((4, 4, 24, 24), torch.float32, True, "broadcast", 3.0, False, 2.0, 0.0),
    "odd-bf16-full-mask": ((2, 3, 33, 31), torch.bfloat16, False, "full", 2.0, False, "vector", 0.5),
    "lambda-mask-one-skips-mask": ((2, 4, 16, 16), torch.float32, False, "broadcast", 1.0, True, 1.5, 0.0),
    "large-chunks-fp16": ((64, 4, 128, 128), torch.float16, False, "none", 1.0, False, 3.0, 0.0),
}


@pytest.mark.parametrize("case", list(LOSS_CASES), ids=list(LOSS_CASES))
def test_loss_launches_match_python(case, fake, manifest, monkeypatch):
    from apo_fast.kernels import apo_loss as kernels

    from apo_fast.ops.apo_loss import fused as ops

    shape, dtype, channels_last, mask_kind, lambda_mask, paired, beta, sft = LOSS_CASES[case]
    lib, driver = fake
    driver.fake_cuda_configure(9, 0, SM_COUNT, 232448, 1)
    log: list = []
    fake_k = types.SimpleNamespace(
        MASK_NONE=kernels.MASK_NONE,
        MASK_DIRECT=kernels.MASK_DIRECT,
        MASK_DIV=kernels.MASK_DIV,
        CHUNK_ALIGN=kernels.GPU_CHUNK_ALIGN,
        apo_residual_sums_kernel=_Recorder("sums", kernels.apo_residual_sums_kernel, log),
        apo_loss_finalize_kernel=_Recorder("finalize", kernels.apo_loss_finalize_kernel, log),
        apo_grad_kernel=_Recorder("grad", kernels.apo_grad_kernel, log),
    )
    # The Python launchers as on a GPU with SM_COUNT multiprocessors.
    monkeypatch.setattr(ops, "K", fake_k)
    monkeypatch.setattr(ops, "wrap_triton", lambda kernel: kernel)  # recorders are not Triton kernels
    monkeypatch.setattr(ops, "_target_programs", lambda device: 8 * SM_COUNT)

    gen = torch.Generator().manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    p, r, t = (torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=memory_format) for _ in range(3))
    p.requires_grad_(True)
    B, C = shape[:2]
    mask = None
    if mask_kind != "none":
        mshape = (B, 1, *shape[2:]) if mask_kind == "broadcast" else shape
        mask = (torch.rand(mshape, generator=gen) > 0.7).to(dtype)
        if mask_kind == "full":
            mask = mask.contiguous(memory_format=memory_format)
    beta_t = torch.rand(B, generator=gen) + 1.0 if beta == "vector" else beta
    loss, _, _, _ = ops.fused_apo_loss(
        p, r, t, beta_t, mask=mask, lambda_mask=lambda_mask, paired=paired, lambda_sft=sft
    )
    loss.backward()
    assert [e["kernel"] for e in log] == ["sums", "finalize", "grad"]
    sums, fin, grad = log

    desc = LossDesc(
        DTYPE_CODES[dtype],
        int(channels_last),
        B,
        C,
        p[0, 0].numel(),
        0 if mask is None else mask.shape[1],
        lambda_mask,
        sft,
        0.0 if beta == "vector" else beta,
        int(paired),
    )
    plan = LossPlan()
    assert lib.apo_fk_loss_plan_make(ctypes.byref(desc), 0, ctypes.byref(plan)) == OK  # SMs of the device
    assert (plan.n_chunks, plan.chunk) == (sums["grid"][1], sums["args"]["chunk"])
    driver.fake_cuda_reset_launches()
    a = {**sums["args"], **fin["args"]}
    ptr = _python_value
    status = lib.apo_fk_loss_forward(
        None,
        ctypes.byref(plan),
        ptr(a["pred_ptr"]),
        ptr(a["ref_ptr"]),
        ptr(a["target_ptr"]),
        ptr(mask) if mask is not None else None,
        ptr(a["beta_ptr"]) if fin["args"]["BETA_PER_TERM"] else None,
        ptr(a["partial_ptr"]),
        ptr(a["stats_ptr"]),
        ptr(a["loss_ptr"]),
    )
    assert status == OK, lib.apo_fk_status_string(status)
    g = grad["args"]
    n = B
    assert ptr(g["coef_ptr"]) == ptr(fin["args"]["stats_ptr"]) + 4 * 2 * n
    status = lib.apo_fk_loss_grad(
        None,
        ctypes.byref(plan),
        ptr(g["pred_ptr"]),
        ptr(g["target_ptr"]),
        ptr(mask) if mask is not None else None,
        ptr(fin["args"]["stats_ptr"]),
        ptr(g["scale_ptr"]) if g["HAS_SCALE"] else None,
        ptr(g["grad_ptr"]),
    )
    assert status == OK, lib.apo_fk_status_string(status)
    c_sums, c_fin, c_grad = _c_launches(lib, driver, manifest)
    _assert_same_launch(c_sums, sums, ("MASK_MODE", "MASK_DIV"))
    _assert_same_launch(c_fin, fin, ("PAIRED", "BETA_PER_TERM"))
    _assert_same_launch(c_grad, grad, ("MASK_MODE", "MASK_DIV", "HAS_SCALE"))
    aligned = (
        all(x.data_ptr() % 16 == 0 for x in (p, r, t))
        and plan.sample_numel % 16 == 0
        and (plan.positions % 16 == 0 and plan.mask_sample_numel % 16 == 0 and plan.repeat_stride % 16 == 0)
    )
    assert c_sums["entry"]["key"]["aligned"] == int(aligned)


# --------------------------------------------------------------------------- gated LoRA vs Python


@pytest.mark.parametrize("rank,bias", [(4, True), (16, False), (40, True), (64, False)])
def test_gated_lora_launches_match_python(rank, bias, fake, manifest, monkeypatch):
    from apo_fast.kernels import gated_lora as kernels

    from apo_fast.ops.gated_lora import fused as ops

    lib, driver = fake
    sm_count = 2  # the Python launcher counts 4 programs for dA/dB off the GPU: 2 per SM
    driver.fake_cuda_configure(9, 0, sm_count, 232448, 5)
    r_pad = ops._rank_pad(rank)
    from apo_fast.kernels.gated_lora import autotune_configs

    configs = autotune_configs(interpret=False, r_pad=r_pad)
    log: list = []

    def recorder(name, kernel, key):
        return _Recorder(name, kernel, log, configs[key][0].kwargs)

    namespace = types.SimpleNamespace(
        forward=recorder("forward", kernels.gated_lora_forward_kernel, "forward"),
        backward_dx=recorder("dx", kernels.gated_lora_backward_dx_kernel, "backward_dx"),
        backward_dadb=recorder("dadb", kernels.gated_lora_backward_dadb_kernel, "backward_dadb"),
        project=recorder("project", kernels.lowrank_project_kernel, "project"),
        split_granule=max(c.kwargs["BLOCK_M"] for c in configs["backward_dadb"]),
    )
    monkeypatch.setattr(ops, "_kernels", lambda r_pad, dtype: namespace)
    monkeypatch.setattr(ops, "wrap_triton", lambda kernel: kernel)  # recorders are not Triton kernels

    S, T, K, N, scaling = 2, 77, 64, 96, 0.5
    M = S * T
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(M, K, generator=gen).half()
    weight, b = torch.randn(N, K, generator=gen).half(), torch.randn(N, generator=gen).half()
    lora_a, lora_b = torch.randn(rank, K, generator=gen).half(), torch.randn(N, rank, generator=gen).half()
    gate = torch.rand(S, rank, generator=gen)
    _, h = ops.gated_lora_forward(x, weight, b if bias else None, lora_a, lora_b, gate, scaling, T, True)
    dy = torch.randn(M, N, generator=gen).half()
    ops.gated_lora_backward(dy, x, weight, lora_a, lora_b, gate, h, scaling, T, True, True, True, False)

    desc = GatedLoraDesc(DTYPE_CODES[torch.float16], M, K, N, rank, T, gate.stride(0), scaling, 0, 0, 0, 0, 0)
    by_kernel: dict[str, list] = {}
    for entry in log:
        by_kernel.setdefault(entry["kernel"], []).append(entry)
    fwd, dx, dadb = by_kernel["forward"][0], by_kernel["dx"][0], by_kernel["dadb"][0]
    ptr = _python_value
    driver.fake_cuda_reset_launches()
    status = lib.apo_fk_gated_lora_forward(
        None,
        ctypes.byref(desc),
        ptr(x),
        ptr(weight),
        ptr(b) if bias else None,
        ptr(lora_a),
        ptr(lora_b),
        ptr(gate),
        ptr(fwd["args"]["y_ptr"]),
        ptr(fwd["args"]["h_ptr"]),
    )
    assert status == OK, lib.apo_fk_status_string(status)
    status = lib.apo_fk_gated_lora_backward_dx(
        None,
        ctypes.byref(desc),
        ptr(dy),
        ptr(weight),
        ptr(lora_a),
        ptr(lora_b),
        ptr(gate),
        ptr(dx["args"]["dx_ptr"]),
        ptr(dx["args"]["u_ptr"]),
    )
    assert status == OK, lib.apo_fk_status_string(status)
    splits, per_split = ctypes.c_int(), ctypes.c_int()
    assert lib.apo_fk_gated_lora_dadb_splits(ctypes.byref(desc), 0, ctypes.byref(splits), ctypes.byref(per_split)) == OK
    assert (splits.value, per_split.value) == (dadb["grid"][1], dadb["args"]["tokens_per_split"])
    status = lib.apo_fk_gated_lora_backward_dadb(
        None,
        ctypes.byref(desc),
        splits,
        per_split,
        ptr(x),
        ptr(h),
        ptr(dy),
        ptr(dadb["args"]["u_ptr"]),
        ptr(gate),
        ptr(dadb["args"]["da_part_ptr"]),
        ptr(dadb["args"]["dbt_part_ptr"]),
    )
    assert status == OK, lib.apo_fk_status_string(status)

    c_launches = _c_launches(lib, driver, manifest)
    names = {
        "gated_lora_forward_kernel": "forward",
        "gated_lora_backward_dx_kernel": "dx",
        "gated_lora_backward_dadb_kernel": "dadb",
        "lowrank_project_kernel": "project",
    }
    assert [names[c["entry"]["entry"]] for c in c_launches] == [e["kernel"] for e in log]
    flags = {
        "forward": ("HAS_BIAS", "H_IN_LOOP", "R_PAD", "R_CHUNK", "DOT_PRECISION"),
        "dx": ("U_IN_LOOP", "R_PAD", "R_CHUNK", "DOT_PRECISION"),
        "dadb": ("R_PAD", "DOT_PRECISION"),
        "project": ("R_PAD", "DOT_PRECISION"),
    }
    for c, py in zip(c_launches, log, strict=True):
        _assert_same_launch(c, py, flags[py["kernel"]])
        tiles = {k: v for k, v in c["entry"]["constexprs"].items() if k.startswith(("BLOCK_", "GROUP_"))}
        assert tiles == {
            k: v
            for k, v in configs[{"dx": "backward_dx", "dadb": "backward_dadb"}.get(py["kernel"], py["kernel"])][
                0
            ].kwargs.items()
        }


def test_gated_lora_rejects_what_it_was_not_compiled_for(fake):
    lib, driver = fake
    driver.fake_cuda_configure(9, 0, SM_COUNT, 232448, 1)
    p = 1 << 20
    ptrs = [p] * 8

    def forward(**changes):
        fields = {
            "dtype": 1,
            "tokens": 154,
            "in_features": 64,
            "out_features": 96,
            "rank": 4,
            "tokens_per_sample": 77,
            "gate_row_stride": 4,
            "scaling": 1.0,
            "ld_x": 0,
            "ld_weight": 0,
            "ld_lora_a": 0,
            "ld_lora_b": 0,
            "ld_y": 0,
        }
        fields.update(changes)
        return lib.apo_fk_gated_lora_forward(None, ctypes.byref(GatedLoraDesc(**fields)), *ptrs)

    assert forward() == OK
    assert forward(dtype=0) == 2  # fp32: UNSUPPORTED_DTYPE
    assert forward(in_features=72) == 3  # not a multiple of 16: UNSUPPORTED_SHAPE
    assert forward(rank=65) == 3
    assert forward(ld_x=32) == 1  # row stride below the row: INVALID_ARGUMENT
    ptrs[0] = p + 8
    assert forward() == 3  # x not 16-byte aligned


# --------------------------------------------------------------------------- GPU


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


NO_KERNEL_FOR_ARCH = 4  # APO_FK_ERROR_NO_KERNEL_FOR_ARCH


@functools.lru_cache(maxsize=1)
def _gpu_library(build_dir: Path):
    """(library, the status its launches must return here): OK on sm_80/sm_90, whose cubins it
    embeds; APO_FK_ERROR_NO_KERNEL_FOR_ARCH on any other GPU (documented, and checked)."""
    lib = _load_library(build_dir, "gpu", None)
    # a CUDA machine (these tests are marked `gpu`) must be able to load the library
    assert lib.status == OK, f"C library on this machine: {lib.apo_fk_status_string(lib.status).decode()}"
    torch.cuda.init()
    torch.empty(1, device="cuda")  # the primary context, current on this thread
    cc, arch = ctypes.c_int(), ctypes.c_int()
    assert lib.apo_fk_device_query(ctypes.byref(cc), ctypes.byref(arch), None) == OK
    return lib, (OK if arch.value else NO_KERNEL_FOR_ARCH)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("paired", [False, True])
def test_gpu_loss_matches_python_path(build_dir, dtype, paired):
    from apo_fast.ops.apo_loss.fused import fused_apo_loss

    lib, launch_status = _gpu_library(build_dir)
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    shape = (8, 4, 64, 64) if not paired else (6, 4, 33, 31)
    t = torch.randn(shape, device=dev, generator=gen).to(dtype)
    p = (t.float() + 0.7 * torch.randn(shape, device=dev, generator=gen)).to(dtype).requires_grad_(True)
    r = (t.float() + 0.7 * torch.randn(shape, device=dev, generator=gen)).to(dtype)
    mask = (torch.rand((shape[0], 1, *shape[2:]), device=dev, generator=gen) > 0.7).to(dtype)
    beta, lambda_mask, sft = 4.0, 2.0, 0.1
    loss, e_theta, e_ref, metrics = fused_apo_loss(
        p, r, t, beta, mask=mask, lambda_mask=lambda_mask, paired=paired, lambda_sft=sft, grad_in_forward=True
    )
    loss.backward()

    desc = LossDesc(
        DTYPE_CODES[dtype], 0, shape[0], shape[1], shape[2] * shape[3], 1, lambda_mask, sft, beta, int(paired)
    )
    plan = LossPlan()
    assert lib.apo_fk_loss_plan_make(ctypes.byref(desc), 0, ctypes.byref(plan)) == OK
    partials = torch.full((plan.partials_floats,), float("nan"), device=dev)
    stats = torch.full((plan.stats_floats,), float("nan"), device=dev)
    c_loss = torch.full((1,), float("nan"), device=dev)
    c_grad = torch.full_like(p, float("nan"))
    stream = torch.cuda.current_stream().cuda_stream
    pd = p.detach()
    assert (
        lib.apo_fk_loss_forward(
            stream,
            ctypes.byref(plan),
            pd.data_ptr(),
            r.data_ptr(),
            t.data_ptr(),
            mask.data_ptr(),
            None,
            partials.data_ptr(),
            stats.data_ptr(),
            c_loss.data_ptr(),
        )
        == launch_status
    )
    assert (
        lib.apo_fk_loss_grad(
            stream,
            ctypes.byref(plan),
            pd.data_ptr(),
            t.data_ptr(),
            mask.data_ptr(),
            stats.data_ptr(),
            None,
            c_grad.data_ptr(),
        )
        == launch_status
    )
    if launch_status != OK:
        return  # this GPU has no cubin: every launch refused with NO_KERNEL_FOR_ARCH, as documented
    torch.cuda.synchronize()
    n = shape[0]
    # Same kernels; the block sizes may differ from the autotuner's pick (summation order).
    torch.testing.assert_close(c_loss[0], loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats[:n], e_theta, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(stats[n : 2 * n], e_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(stats[3 * n :], metrics, rtol=1e-5, atol=1e-6)
    tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(c_grad.float(), p.grad.float(), rtol=tol, atol=tol * p.grad.abs().max().item())


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rank", [4, 64])
def test_gpu_gated_lora_matches_python_path(build_dir, dtype, rank):
    from apo_fast.ops.gated_lora import gated_lora_linear

    lib, launch_status = _gpu_library(build_dir)
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(rank)
    S, T, K, N, scaling = 4, 77, 320, 640, 2.0
    M = S * T

    def rand(*size, scale=1.0):
        return (torch.randn(size, device=dev, generator=gen) * scale).to(dtype)

    x = rand(S, T, K).requires_grad_(True)
    weight, bias = rand(N, K, scale=K**-0.5), rand(N, scale=0.1)
    lora_a = rand(rank, K, scale=K**-0.5).requires_grad_(True)
    lora_b = rand(N, rank, scale=rank**-0.5).requires_grad_(True)
    gate = torch.rand(S, rank, device=dev, generator=gen)
    y = gated_lora_linear(x, weight, bias, lora_a, lora_b, gate, scaling, backend="triton")
    dy = rand(S, T, N)
    y.backward(dy)

    desc = GatedLoraDesc(DTYPE_CODES[dtype], M, K, N, rank, T, rank, scaling, 0, 0, 0, 0, 0)
    c_y = torch.full((M, N), float("nan"), device=dev, dtype=dtype)
    h = torch.full((M, rank), float("nan"), device=dev, dtype=dtype)
    u = torch.full((M, rank), float("nan"), device=dev)
    c_dx = torch.full((M, K), float("nan"), device=dev, dtype=dtype)
    splits, per_split = ctypes.c_int(), ctypes.c_int()
    assert lib.apo_fk_gated_lora_dadb_splits(ctypes.byref(desc), 0, ctypes.byref(splits), ctypes.byref(per_split)) == OK
    da_part = torch.full((splits.value, rank, K), float("nan"), device=dev)
    dbt_part = torch.full((splits.value, rank, N), float("nan"), device=dev)
    stream = torch.cuda.current_stream().cuda_stream
    xd = x.detach()
    assert (
        lib.apo_fk_gated_lora_forward(
            stream,
            ctypes.byref(desc),
            xd.data_ptr(),
            weight.data_ptr(),
            bias.data_ptr(),
            lora_a.data_ptr(),
            lora_b.data_ptr(),
            gate.data_ptr(),
            c_y.data_ptr(),
            h.data_ptr(),
        )
        == launch_status
    )
    assert (
        lib.apo_fk_gated_lora_backward_dx(
            stream,
            ctypes.byref(desc),
            dy.data_ptr(),
            weight.data_ptr(),
            lora_a.data_ptr(),
            lora_b.data_ptr(),
            gate.data_ptr(),
            c_dx.data_ptr(),
            u.data_ptr(),
        )
        == launch_status
    )
    assert (
        lib.apo_fk_gated_lora_backward_dadb(
            stream,
            ctypes.byref(desc),
            splits,
            per_split,
            xd.data_ptr(),
            h.data_ptr(),
            dy.data_ptr(),
            u.data_ptr(),
            gate.data_ptr(),
            da_part.data_ptr(),
            dbt_part.data_ptr(),
        )
        == launch_status
    )
    if launch_status != OK:
        return  # this GPU has no cubin: every launch refused with NO_KERNEL_FOR_ARCH, as documented
    torch.cuda.synchronize()
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]

    def close(got, want):
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * want.float().abs().max().item())

    close(c_y, y.detach().reshape(M, N))
    close(c_dx, x.grad.reshape(M, K))
    close(da_part.sum(0), lora_a.grad)
    close(dbt_part.sum(0).t(), lora_b.grad)
