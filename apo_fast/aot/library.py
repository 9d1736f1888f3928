"""Ahead-of-time build of the fused kernels for the C library ``apo_fast_kernels``.

CMake runs ``python -m apo_fast.aot.library --out-dir DIR`` (no GPU needed).
It compiles every :class:`LibraryVariant` with Triton for ``sm_80`` and
``sm_90`` and writes into ``DIR``:

* ``apo_fast_kernels_cubins.c``: each cubin as a byte string, and the variant
  table the C launchers search (``apo_fk_variant_table``): kernel, arch, dtype,
  selection key, entry name, dynamic shared memory, warps and the order of the
  runtime parameters;
* ``apo_fast_kernels_args.h``: for each kernel, the index and kind of every
  Python argument (``APO_FK_ARG_<KERNEL>_<name>``, ``APO_FK_KIND_...``). The
  hand-written launchers fill argument slots by these names, so a renamed
  argument fails the C build and a reordered one is followed automatically;
* ``apo_fast_kernels_manifest.json``: the same table for people and tests
  (sizes, SHA-256 of each cubin, parameter names).

Parameters. Triton removes ``tl.constexpr`` arguments from the compiled
kernel and appends two pointers (global and profile scratch, both null here:
the build refuses kernels that need scratch memory). The number of trailing
pointers is read from each kernel's PTX ``.entry`` and stored per variant.

Specialisation. Triton's JIT launcher specialises integer arguments that
equal 1 (to constants) and marks integers divisible by 16 and 16-byte aligned
pointers with a divisibility hint. Here nothing is specialised implicitly:
each variant's signature says which pointers are promised 16-byte aligned and
which integers divisible by 16 (``"*bf16:16"``, ``"i32:16"``), and the C
launcher checks those promises before picking a variant. The APO-loss
streaming kernels come in an ``aligned`` and a ``generic`` (no hints) version;
the gated-LoRA kernels only in the aligned one (the C launcher reports
``APO_FK_ERROR_UNSUPPORTED_SHAPE`` otherwise).

Run as a script without ``--out-dir`` to list the variants.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from apo_fast.aot.variants import (
    ARCHS,
    GATED_LORA_RANK_PADS,
    KERNEL_IDS,
    KEY_FIELDS,
    LOSS_FINALIZE_TILES,
    LOSS_MASK_DIV_CHANNELS,
    LOSS_STREAM_CONFIGS,
    MANIFEST_VERSION,
    LibraryVariant,
    gated_lora_split_granules,
    library_variants,
)
from apo_fast.io_utils import atomic_write_text

# --------------------------------------------------------------------------- compile


@dataclasses.dataclass(frozen=True)
class CompiledVariant:
    """A compiled variant: the cubin and what the launcher needs to call it."""

    variant: LibraryVariant
    entry: str
    cubin: bytes
    shared_bytes: int
    params: tuple[str, ...]  # runtime parameter names, in the kernel's order
    n_scratch: int  # trailing pointer parameters Triton appends (passed as null)
    seconds: float


_PTX_ENTRY = re.compile(r"\.entry\s+(\w+)\s*\(([^)]*)\)", re.DOTALL)


def _compile_one(variant: LibraryVariant) -> CompiledVariant:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = variant.function()
    while not isinstance(fn, JITFunction):
        fn = fn.fn  # autotune / heuristics wrappers
    names = list(fn.arg_names)
    unknown = [n for n in list(variant.signature) + list(variant.constexprs) if n not in names]
    missing = [n for n in names if n not in variant.signature and n not in variant.constexprs]
    if unknown or missing:
        raise ValueError(
            f"{variant.label}: the build's signature does not match {fn.__name__}{tuple(names)}: "
            f"unknown {unknown}, missing {missing} (update apo_fast/kernels_aot.py and csrc/)"
        )
    types: dict[str, str] = {}
    attrs: dict[tuple[int], list] = {}
    for index, name in enumerate(names):
        if name in variant.constexprs:
            types[name] = "constexpr"
            continue
        ty, _, hint = variant.signature[name].partition(":")
        types[name] = ty
        if hint:
            attrs[(index,)] = [["tt.divisibility", int(hint)]]
    start = time.perf_counter()
    compiled = triton.compile(
        ASTSource(fn, types, dict(variant.constexprs), attrs),
        target=GPUTarget("cuda", variant.arch, 32),
        options={"num_warps": variant.num_warps, "num_stages": variant.num_stages},
    )
    seconds = time.perf_counter() - start
    meta = compiled.metadata
    for field in ("global_scratch_size", "profile_scratch_size", "tmem_size"):
        if getattr(meta, field, 0):
            raise RuntimeError(f"{variant.label} needs {field}={getattr(meta, field)}; the C launcher passes none")
    if getattr(meta, "num_ctas", 1) != 1 or getattr(meta, "launch_cooperative_grid", False):
        raise RuntimeError(f"{variant.label}: clusters and cooperative launches are not supported by the C launcher")
    match = _PTX_ENTRY.search(compiled.asm["ptx"])
    if match is None or match.group(1) != meta.name:
        raise RuntimeError(f"{variant.label}: no .entry {meta.name} in the PTX")
    n_ptx_params = len(re.findall(r"\.param\b", match.group(2)))
    params = tuple(n for n in names if n not in variant.constexprs)
    n_scratch = n_ptx_params - len(params)
    if n_scratch < 0:
        raise RuntimeError(f"{variant.label}: PTX has {n_ptx_params} parameters, fewer than {len(params)}")
    return CompiledVariant(variant, meta.name, compiled.asm["cubin"], int(meta.shared), params, n_scratch, seconds)


def compile_variants(variants: Sequence[LibraryVariant], jobs: int = 1) -> list[CompiledVariant]:
    """Compile ``variants`` (in order) with up to ``jobs`` worker processes.

    Triton's on-disk cache makes a rebuild of unchanged kernels fast. Set
    ``TRITON_INTERPRET=0`` (and ideally ``TRITON_DISABLE_LINE_INFO=1``, for
    cubins a third of the size) before calling; :func:`main` does.
    """
    variants = list(variants)
    if jobs <= 1 or len(variants) < 2:
        return [_compile_one(v) for v in variants]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        return list(pool.map(_compile_one, variants, chunksize=4))


# --------------------------------------------------------------------------- emit


def _c_bytes(data: bytes, width: int = 48) -> str:
    """``data`` as adjacent C string literals (compiles far faster than an initializer list)."""
    lines = []
    for start in range(0, len(data), width):
        chunk = data[start : start + width]
        lines.append('    "' + "".join(f"\\x{b:02x}" for b in chunk) + '"')
    return "\n".join(lines) if lines else '    ""'


def _arg_kinds(compiled: Sequence[CompiledVariant]) -> dict[str, dict[str, str]]:
    """kernel -> {arg name: PTR | I32 | F32 | CONSTEXPR} in the Python argument order."""
    from triton.runtime.jit import JITFunction

    kinds: dict[str, dict[str, str]] = {}
    for c in compiled:
        kernel = c.variant.kernel
        if kernel not in kinds:
            fn = c.variant.function()
            while not isinstance(fn, JITFunction):
                fn = fn.fn
            kinds[kernel] = dict.fromkeys(fn.arg_names, "CONSTEXPR")
        for name, spec in c.variant.signature.items():
            ty = spec.partition(":")[0]
            kind = "PTR" if ty.startswith("*") else {"i32": "I32", "fp32": "F32"}.get(ty)
            if kind is None:
                raise ValueError(f"{c.variant.label}: argument {name} has type {ty}, not supported by the C launcher")
            previous = kinds[kernel][name]
            if previous not in ("CONSTEXPR", kind):
                raise ValueError(f"{kernel}.{name} is {previous} in one variant and {kind} in another")
            kinds[kernel][name] = kind
    return kinds


def _stream_config(index: int) -> tuple[int, int]:
    """(BLOCK, num_warps) of apo_loss.GPU_STREAM_CONFIGS[index]."""
    from apo_fast.kernels import apo_loss as K

    config = K.GPU_STREAM_CONFIGS[index]
    return config.kwargs["BLOCK"], config.num_warps


def _args_header(kinds: dict[str, dict[str, str]], granules: dict[int, int]) -> str:
    lines = [
        "/* Generated by apo_fast/kernels_aot.py: do not edit. */",
        "#ifndef APO_FAST_KERNELS_ARGS_H",
        "#define APO_FAST_KERNELS_ARGS_H",
        "",
        "/* Argument slots of each kernel, in its Python signature order. */",
    ]
    for kernel, args in kinds.items():
        lines.append(f"#define APO_FK_NARGS_{kernel} {len(args)}")
        for index, (name, kind) in enumerate(args.items()):
            lines.append(f"#define APO_FK_ARG_{kernel}_{name} {index}")
            lines.append(f"#define APO_FK_KIND_{kernel}_{name} APO_FK_KIND_{kind}")
        lines.append("")
    lines.append("/* Token-split granule of the dA/dB reduction at each padded rank (Python launcher). */")
    small, large = GATED_LORA_RANK_PADS
    lines.append(f"#define APO_FK_GL_SPLIT_GRANULE_IN_LOOP {granules[small]}")
    lines.append(f"#define APO_FK_GL_SPLIT_GRANULE_CHUNKED {granules[large]}")
    lines += ["", "/* What was compiled (the launchers' choices follow these). */"]
    from apo_fast.ops.gated_lora.fused import IN_LOOP_MAX_R_PAD

    if GATED_LORA_RANK_PADS != (IN_LOOP_MAX_R_PAD, max(GATED_LORA_RANK_PADS)):
        raise ValueError(f"the C launcher expects rank pads (in-loop, rank-chunked), got {GATED_LORA_RANK_PADS}")
    lines.append(f"#define APO_FK_GL_IN_LOOP_MAX_R_PAD {IN_LOOP_MAX_R_PAD}")
    lines.append(f"#define APO_FK_GL_MAX_RANK {max(GATED_LORA_RANK_PADS)}")
    lines.append(f"#define APO_FK_MASK_DIV_CHANNELS {LOSS_MASK_DIV_CHANNELS}")
    small, large = (_stream_config(ci)[0] for ci in LOSS_STREAM_CONFIGS)
    lines.append(f"#define APO_FK_STREAM_BLOCK_SMALL {small}")
    lines.append(f"#define APO_FK_STREAM_BLOCK_LARGE {large}")
    chunks = ", ".join(str(c) for c, _ in LOSS_FINALIZE_TILES)
    lines.append(f"#define APO_FK_FINALIZE_BLOCK_CHUNKS {{{chunks}}}")
    lines += ["", "#endif", ""]
    return "\n".join(lines)


TILE_CONSTEXPRS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_C")  # apo_fk_variant.tiles (grids in C)


def _tiles(variant: LibraryVariant) -> tuple[int, ...]:
    return tuple(int(variant.constexprs.get(name, 0)) for name in TILE_CONSTEXPRS)


def _cubins_source(compiled: Sequence[CompiledVariant], kinds: dict[str, dict[str, str]]) -> str:
    out = [
        "/* Generated by apo_fast/kernels_aot.py: do not edit. */",
        '#include "apo_fk_internal.h"',
        '#include "apo_fast_kernels_args.h"',
        "",
    ]
    for i, c in enumerate(compiled):
        out.append(f"/* {c.variant.label}: {len(c.cubin)} bytes */")
        out.append(f"static const char cubin_{i}[] APO_FK_CUBIN_ALIGN =\n{_c_bytes(c.cubin)};")
        indices = ", ".join(f"APO_FK_ARG_{c.variant.kernel}_{name}" for name in c.params)
        out.append(f"static const unsigned char params_{i}[] = {{{indices}}};")
    out.append("")
    out.append("const apo_fk_variant apo_fk_variant_table[] = {")
    for i, c in enumerate(compiled):
        v = c.variant
        key = list(v.key) + [0] * (4 - len(v.key))
        out.append(
            f"    {{APO_FK_KERNEL_{v.kernel}, {v.arch}, APO_FK_DTYPE_{v.dtype.upper()}, "
            f'{{{", ".join(map(str, key))}}}, "{v.label}", "{c.entry}", '
            f"(const unsigned char *)cubin_{i}, {len(c.cubin)}u, {c.shared_bytes}u, {v.num_warps}, "
            f"{len(c.params)}, {c.n_scratch}, params_{i}, {{{', '.join(map(str, _tiles(v)))}}}}},"
        )
    out.append("};")
    out.append(f"const int apo_fk_variant_table_size = {len(compiled)};")
    out.append("")
    return "\n".join(out)


def _manifest(compiled: Sequence[CompiledVariant], kinds: dict[str, dict[str, str]]) -> dict:
    import triton

    return {
        "version": MANIFEST_VERSION,
        "triton_version": triton.__version__,
        "archs": sorted({c.variant.arch for c in compiled}),
        "kernels": {
            k: {"function": KERNEL_IDS[k][0], "key_fields": list(KEY_FIELDS[k]), "args": a} for k, a in kinds.items()
        },
        "variants": [
            {
                "index": i,
                "label": c.variant.label,
                "kernel": c.variant.kernel,
                "arch": c.variant.arch,
                "dtype": c.variant.dtype,
                "key": dict(zip(KEY_FIELDS[c.variant.kernel], c.variant.key, strict=True)),
                "entry": c.entry,
                "cubin_bytes": len(c.cubin),
                "cubin_sha256": hashlib.sha256(c.cubin).hexdigest(),
                "shared_bytes": c.shared_bytes,
                "num_warps": c.variant.num_warps,
                "num_stages": c.variant.num_stages,
                "params": list(c.params),
                "n_scratch": c.n_scratch,
                "signature": c.variant.signature,
                "constexprs": {k: v for k, v in c.variant.constexprs.items()},
            }
            for i, c in enumerate(compiled)
        ],
    }


def write_library_sources(compiled: Sequence[CompiledVariant], out_dir: Path) -> list[Path]:
    """Write the generated C sources and the manifest; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    kinds = _arg_kinds(compiled)
    files = {
        "apo_fast_kernels_args.h": _args_header(kinds, gated_lora_split_granules()),
        "apo_fast_kernels_cubins.c": _cubins_source(compiled, kinds),
        "apo_fast_kernels_manifest.json": json.dumps(_manifest(compiled, kinds), indent=1) + "\n",
    }
    for name, text in files.items():
        atomic_write_text(out_dir / name, text)
    return [out_dir / name for name in files]


def _parse_archs(text: str) -> tuple[int, ...]:
    archs = tuple(int(a.strip().removeprefix("sm_")) for a in text.split(",") if a.strip())
    bad = [a for a in archs if a not in ARCHS]
    if not archs or bad:
        raise argparse.ArgumentTypeError(f"--archs must be a comma-separated subset of {ARCHS}, got {text!r}")
    return archs


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, help="where to write the generated sources (omit to list variants)")
    parser.add_argument("--archs", type=_parse_archs, default=ARCHS, help="e.g. 80,90")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    variants = library_variants(args.archs)
    if args.out_dir is None:
        for v in variants:
            print(v.label)
        print(f"{len(variants)} variants", file=sys.stderr)
        return 0
    start = time.perf_counter()
    compiled = compile_variants(variants, jobs=args.jobs)
    write_library_sources(compiled, args.out_dir)
    total = sum(len(c.cubin) for c in compiled)
    print(
        f"apo_fast_kernels: {len(compiled)} variants for sm_{', sm_'.join(map(str, args.archs))}, "
        f"{total / 1e6:.2f} MB of cubins, {time.perf_counter() - start:.1f} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    # Real compilation (not the interpreter), smaller cubins without line tables.
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ.setdefault("TRITON_DISABLE_LINE_INFO", "1")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    sys.exit(main())
