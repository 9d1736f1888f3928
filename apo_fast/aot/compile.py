"""Ahead-of-time compilation of ``@triton.jit`` kernels for a GPU target, on any machine.

Triton lowers a kernel to PTX and a cubin for ``sm_80``/``sm_90`` without a GPU
(``triton.compile`` with a ``GPUTarget``); the ``ptxas``/``cuobjdump`` shipped in
``triton/backends/nvidia/bin`` then tell what the kernel costs on the real chip.
:func:`compile_kernel` does both and returns a :class:`CompiledReport`:

* registers per thread, shared memory, stack and local bytes
  (``cuobjdump --dump-resource-usage``);
* spill stores/loads (``STL``/``LDL`` in the SASS);
* the SASS and PTX text and a count of every SASS opcode, so tests can check
  that a matmul uses ``HMMA``/``HGMMA`` or that loads are 128-bit
  (``report.count("LDG.E.128")``).

It works whether or not ``TRITON_INTERPRET=1`` is set: under the interpreter
``@triton.jit`` yields interpreter objects, which are rebuilt here as real
``JITFunction`` objects (helper ``@triton.jit`` functions included) for the
compilation only.

Example::

    report = compile_kernel(my_kernel, {"x_ptr": "*fp16:16", "n": "i32"}, {"BLOCK": 1024}, arch=90)
    assert not report.has_spills and report.count("LDG.E.128") > 0
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

SUPPORTED_ARCHS = (80, 86, 89, 90)
_VALID_HINTS = {16}

# Opcode groups worth a glance in a report: tensor cores, vector and async
# copies, spills, barriers, special-function unit.
KEY_INSTRUCTIONS = (
    "HMMA",
    "HGMMA",
    "IMMA",
    "LDG.E",
    "LDG.E.64",
    "LDG.E.128",
    "STG.E",
    "STG.E.64",
    "STG.E.128",
    "LDGSTS",
    "UTMALDG",
    "LDS",
    "LDSM",
    "STS",
    "STL",
    "LDL",
    "BAR.SYNC",
    "SHFL",
    "MUFU",
    "ATOMG",
    "RED",
)

_SASS_LINE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)")
_RESOURCE_LINE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


@dataclasses.dataclass(frozen=True)
class CompiledReport:
    """What one compiled kernel variant costs on the target GPU.

    ``instructions`` maps each full SASS mnemonic (``"LDG.E.128.CONSTANT"``) to
    its count in the kernel; use :meth:`count` to query by opcode and modifiers.
    Compiled with ``with_sass=False`` (disassembly is the slow part, ~0.5 s),
    ``sass`` is empty, ``instructions`` too, and the spill counts are None;
    ``local_bytes``/``stack_bytes`` still reveal spills.
    """

    name: str
    arch: int
    num_warps: int
    num_stages: int
    registers: int
    shared_bytes: int
    stack_bytes: int
    local_bytes: int
    spill_stores: int | None
    spill_loads: int | None
    instructions: Mapping[str, int]
    sass: str = dataclasses.field(repr=False)
    ptx: str = dataclasses.field(repr=False)

    @property
    def has_spills(self) -> bool:
        """Register spills: local memory traffic or a stack frame."""
        return bool(self.spill_stores or self.spill_loads or self.local_bytes or self.stack_bytes)

    def count(self, opcode: str) -> int:
        """Number of SASS instructions matching ``opcode``.

        ``"LDG"`` counts every global load; ``"LDG.E.128"`` the ones carrying
        both the ``E`` and ``128`` modifiers, in any order and whatever other
        modifiers they have.
        """
        base, *mods = opcode.upper().split(".")
        wanted = set(mods)
        total = 0
        for mnemonic, n in self.instructions.items():
            ibase, *imods = mnemonic.split(".")
            if ibase == base and wanted.issubset(imods):
                total += n
        return total

    def key_counts(self) -> dict[str, int]:
        """Counts of :data:`KEY_INSTRUCTIONS` (zeros dropped)."""
        counts = {op: self.count(op) for op in KEY_INSTRUCTIONS}
        return {op: n for op, n in counts.items() if n}

    def summary(self) -> dict[str, Any]:
        """JSON-friendly digest: resources, spills and key instruction counts."""
        return {
            "name": self.name,
            "arch": f"sm_{self.arch}",
            "num_warps": self.num_warps,
            "num_stages": self.num_stages,
            "registers": self.registers,
            "shared_bytes": self.shared_bytes,
            "stack_bytes": self.stack_bytes,
            "local_bytes": self.local_bytes,
            "spill_stores": self.spill_stores,
            "spill_loads": self.spill_loads,
            "sass_instructions": sum(self.instructions.values()) if self.sass else None,
            "key_instructions": self.key_counts(),
        }


def nvidia_tool(name: str) -> Path:
    """Path of a CUDA binary tool shipped with Triton (``ptxas``, ``cuobjdump``, ``nvdisasm``)."""
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{name} not found at {path}; this Triton wheel ships no CUDA tools")
    return path


def _jit_function(fn: Any) -> Any:
    """The ``JITFunction`` inside ``fn`` (autotuner/heuristics wrappers removed)."""
    from triton.runtime.jit import JITFunction

    inner = fn
    while not isinstance(inner, JITFunction) and not _is_interpreted(inner) and hasattr(inner, "fn"):
        inner = inner.fn
    if isinstance(inner, JITFunction) or _is_interpreted(inner):
        return inner
    raise TypeError(f"fn must be a @triton.jit kernel, got {type(fn).__name__}")


def _is_interpreted(obj: Any) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - very old Triton
        return False
    return isinstance(obj, InterpretedFunction)


def _parse_signature(
    jit_fn: Any, signature: Mapping[str, str], constexprs: Mapping[str, Any]
) -> tuple[dict[str, str], dict[tuple[int], list]]:
    names = list(jit_fn.arg_names)
    unknown = [k for k in list(signature) + list(constexprs) if k not in names]
    if unknown:
        raise ValueError(f"signature/constexprs name arguments {unknown} that {jit_fn.__name__} does not have {names}")
    missing = [k for k in names if k not in signature and k not in constexprs]
    if missing:
        raise ValueError(f"signature must give a type for every argument of {jit_fn.__name__}; missing {missing}")
    types_: dict[str, str] = {}
    attrs: dict[tuple[int], list] = {}
    for name in names:
        if name in constexprs:
            types_[name] = "constexpr"
            continue
        spec = str(signature[name]).strip()
        ty, _, hint = spec.partition(":")
        if hint:
            if not hint.isdigit() or int(hint) not in _VALID_HINTS:
                raise ValueError(f"signature[{name!r}]={spec!r}: the only divisibility hint is ':16'")
            attrs[(names.index(name),)] = [["tt.divisibility", int(hint)]]
        types_[name] = ty
    return types_, attrs


def _parse_sass(sass: str) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for line in sass.splitlines():
        match = _SASS_LINE.search(line)
        if match:
            counts[match.group(1)] += 1
    return counts


def _resource_usage(cubin_path: Path) -> tuple[int, int, int, int]:
    out = subprocess.run(
        [str(nvidia_tool("cuobjdump")), "--dump-resource-usage", str(cubin_path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    match = _RESOURCE_LINE.search(out)
    if match is None:
        raise RuntimeError(f"could not read resource usage from cuobjdump output:\n{out}")
    reg, stack, shared, local = (int(g) for g in match.groups())
    return reg, stack, shared, local


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One kernel variant to compile: the arguments of :func:`compile_kernel`."""

    fn: Any
    signature: Mapping[str, str]
    constexprs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    arch: int = 90
    num_warps: int = 4
    num_stages: int = 2
    with_sass: bool = True


class AOTCompileError(RuntimeError):
    """A kernel failed to compile in the helper process (message holds its traceback)."""


def compile_kernel(
    fn: Any,
    signature: Mapping[str, str],
    constexprs: Mapping[str, Any] | None = None,
    arch: int = 90,
    num_warps: int = 4,
    num_stages: int = 2,
    with_sass: bool = True,
) -> CompiledReport:
    """Compile ``fn`` for ``sm_<arch>`` and report its resources and SASS.

    Args:
        fn: a ``@triton.jit`` kernel (optionally wrapped by ``@triton.autotune``
            or ``@triton.heuristics``; the wrappers are ignored).
        signature: type of every runtime argument, Triton spelling: ``"*fp16"``,
            ``"*bf16"``, ``"*fp32"``, ``"i32"``, ``"i64"``, ``"fp32"``. Append
            ``":16"`` to promise 16-byte alignment (pointers) or divisibility
            by 16 (integers), as Triton's launcher does for such arguments;
            that decides vector widths.
        constexprs: values of the ``tl.constexpr`` arguments (ints, floats,
            bools, strings or ``tl`` dtypes).
        arch: compute capability as an int (80 = A100, 90 = H100/H200).
        num_warps, num_stages: launch options, as in ``triton.Config``.
        with_sass: disassemble the cubin (SASS text, instruction counts, STL/LDL);
            False saves ~0.5 s per kernel when only resources matter.

    Under ``TRITON_INTERPRET=1`` (the test suite) the compilation runs in a
    child process without the interpreter, because the interpreter replaces
    ``triton.language``'s own ``@jit`` helpers (``tl.zeros``, ``tl.sum``...);
    the kernel must then be a module-level attribute importable by the child.
    Use :func:`compile_kernels` to pay the child's start-up once for many variants.

    Raises:
        ValueError: bad signature, arch or launch options.
        AOTCompileError: compile failure in the child process. In-process,
        Triton's ``CompilationError`` (or the ``ptxas`` error) propagates unchanged.
    """
    spec = KernelSpec(fn, signature, dict(constexprs or {}), arch, num_warps, num_stages, with_sass)
    return compile_kernels([spec])[0]


def compile_kernels(specs: Sequence[KernelSpec]) -> list[CompiledReport]:
    """Compile several variants; reports in the same order. See :func:`compile_kernel`."""
    specs = list(specs)
    for spec in specs:
        _validate(spec)
    if not specs:
        return []
    if _interpreter_active() or any(_is_interpreted(_jit_function(s.fn)) for s in specs):
        return _compile_in_child(specs)
    return [_compile_here(spec) for spec in specs]


def _validate(spec: KernelSpec) -> None:
    if spec.arch not in SUPPORTED_ARCHS:
        raise ValueError(f"arch must be one of {SUPPORTED_ARCHS}, got {spec.arch!r}")
    if spec.num_warps < 1 or spec.num_warps & (spec.num_warps - 1):
        raise ValueError(f"num_warps must be a power of two, got {spec.num_warps!r}")
    if spec.num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {spec.num_stages!r}")
    _parse_signature(_jit_function(spec.fn), spec.signature, spec.constexprs)


def _interpreter_active() -> bool:
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # pragma: no cover - older Triton
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _compile_here(spec: KernelSpec) -> CompiledReport:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constexprs = dict(spec.constexprs)
    jit_fn = _jit_function(spec.fn)
    types_, attrs = _parse_signature(jit_fn, spec.signature, constexprs)
    source = ASTSource(jit_fn, types_, constexprs, attrs)
    compiled = triton.compile(
        source,
        target=GPUTarget("cuda", spec.arch, 32),
        options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
    )
    with tempfile.TemporaryDirectory(prefix="apo_fast_aot_") as tmp:
        cubin_path = Path(tmp) / f"{jit_fn.__name__}.cubin"
        cubin_path.write_bytes(compiled.asm["cubin"])
        regs, stack, static_shared, local = _resource_usage(cubin_path)
        sass = ""
        if spec.with_sass:
            sass = subprocess.run(
                [str(nvidia_tool("cuobjdump")), "--dump-sass", str(cubin_path)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
    counts = _parse_sass(sass)
    spills = {
        kind: sum(n for op, n in counts.items() if op.split(".")[0] == kind) if spec.with_sass else None
        for kind in ("STL", "LDL")
    }
    return CompiledReport(
        name=jit_fn.__name__,
        arch=spec.arch,
        num_warps=spec.num_warps,
        num_stages=spec.num_stages,
        registers=regs,
        shared_bytes=int(getattr(compiled.metadata, "shared", 0)) + static_shared,
        stack_bytes=stack,
        local_bytes=local,
        spill_stores=spills["STL"],
        spill_loads=spills["LDL"],
        instructions=dict(counts),
        sass=sass,
        ptx=compiled.asm["ptx"],
    )


# --- child process: compile with the interpreter off ---------------------------------


def _encode_value(value: Any) -> Any:
    import triton.language as tl

    if isinstance(value, tl.dtype):
        return {"tl_dtype": value.name}
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    raise TypeError(f"constexpr value {value!r} cannot be sent to the compile process")


def _decode_value(value: Any) -> Any:
    import triton.language as tl

    if isinstance(value, dict) and "tl_dtype" in value:
        name = value["tl_dtype"]
        return getattr(tl, _TL_DTYPE_ATTR.get(name, name))
    return value


_TL_DTYPE_ATTR = {
    "fp16": "float16",
    "bf16": "bfloat16",
    "fp32": "float32",
    "fp64": "float64",
    "fp8e4nv": "float8e4nv",
    "fp8e5": "float8e5",
}


def _kernel_address(fn: Any) -> tuple[str, str]:
    jit_fn = _jit_function(fn)
    raw = jit_fn.fn
    module, name = raw.__module__, raw.__name__
    attr = getattr(sys.modules.get(module), name, None)
    if module in (None, "__main__") or attr is None or _jit_function(attr) is not jit_fn:
        raise ValueError(
            f"kernel {name!r} must be a module-level attribute of an importable module to be compiled "
            "while TRITON_INTERPRET=1 is set"
        )
    return module, name


def _compile_in_child(specs: list[KernelSpec]) -> list[CompiledReport]:
    requests = []
    for spec in specs:
        module, name = _kernel_address(spec.fn)
        requests.append(
            {
                "module": module,
                "name": name,
                "signature": dict(spec.signature),
                "constexprs": {k: _encode_value(v) for k, v in spec.constexprs.items()},
                "arch": spec.arch,
                "num_warps": spec.num_warps,
                "num_stages": spec.num_stages,
                "with_sass": spec.with_sass,
            }
        )
    env = dict(os.environ, TRITON_INTERPRET="0")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    with tempfile.TemporaryDirectory(prefix="apo_fast_aot_") as tmp:
        request_path, result_path = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request_path.write_text(json.dumps(requests))
        proc = subprocess.run(
            [sys.executable, "-m", "apo_fast.aot.compile", str(request_path), str(result_path)],
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0 or not result_path.exists():
            raise AOTCompileError(f"compile process failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
        results = json.loads(result_path.read_text())
    reports = []
    for request, result in zip(requests, results, strict=True):
        if "error" in result:
            raise AOTCompileError(f"{request['name']} for sm_{request['arch']} failed to compile:\n{result['error']}")
        reports.append(CompiledReport(**result))
    return reports


def _child_main(request_path: str, result_path: str) -> None:
    import importlib
    import traceback

    results = []
    for req in json.loads(Path(request_path).read_text()):
        try:
            fn = getattr(importlib.import_module(req["module"]), req["name"])
            spec = KernelSpec(
                fn,
                req["signature"],
                {k: _decode_value(v) for k, v in req["constexprs"].items()},
                req["arch"],
                req["num_warps"],
                req["num_stages"],
                req["with_sass"],
            )
            results.append(dataclasses.asdict(_compile_here(spec)))
        except Exception:  # reported to the parent, which raises
            results.append({"error": traceback.format_exc()})
    Path(result_path).write_text(json.dumps(results))


if __name__ == "__main__":
    _child_main(sys.argv[1], sys.argv[2])
