"""Compile report of the C library's kernel variants: what the GPU will execute.

``python -m apo_fast.aot.report --out benchmarks/COMPILE_REPORT.md``

Compiles every variant of :func:`apo_fast.aot.library.library_variants` (the
cubins ``apo_fast_kernels`` embeds) for sm_80 and sm_90 on the CPU, disassembles
them, and writes a Markdown report: per variant the registers per thread,
shared memory, spills (``STL``/``LDL`` instructions, local and stack bytes)
and the key instructions (tensor-core ``HMMA``/``HGMMA``, 128-bit global
loads/stores ``LDG.E.128``/``STG.E.128``, async copies ``LDGSTS``, TMA
``UTMALDG``), with a findings section that flags spills, streaming kernels
that lost their vector loads and matmuls without tensor cores.

The compilation is :func:`apo_fast.aot.compile.compile_kernels` (the same
signatures and constexprs as the library build; line tables kept, so only the
cubin sizes differ from the library's). About 1-2 s per variant per process.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from apo_fast.aot import library as kernels_aot
from apo_fast.aot import variants as aot_variants
from apo_fast.io_utils import atomic_write_text

# Columns of the per-variant tables: (header, SASS opcode counted by CompiledReport.count).
INSTRUCTION_COLUMNS = (
    ("HMMA", "HMMA"),
    ("HGMMA", "HGMMA"),
    ("LDG.128", "LDG.E.128"),
    ("LDG.64", "LDG.E.64"),
    ("LDG all", "LDG"),
    ("STG.128", "STG.E.128"),
    ("LDGSTS", "LDGSTS"),
    ("UTMALDG", "UTMALDG"),
    ("LDSM", "LDSM"),
    ("MUFU", "MUFU"),
)
STREAMING_KERNELS = ("RESIDUAL_SUMS", "LOSS_GRAD")
MATMUL_KERNELS = ("GL_FORWARD", "GL_PROJECT", "GL_BACKWARD_DX", "GL_BACKWARD_DADB")
KEY_ALIGNED = {"RESIDUAL_SUMS": 1, "LOSS_GRAD": 2}  # index of `aligned` in the selection key
KERNEL_TITLES = {
    "RESIDUAL_SUMS": "APO loss: residual sums (`apo_residual_sums_kernel`)",
    "LOSS_FINALIZE": "APO loss: finalize (`apo_loss_finalize_kernel`)",
    "LOSS_GRAD": "APO loss: gradient (`apo_grad_kernel`)",
    "GL_FORWARD": "Gated LoRA: forward (`gated_lora_forward_kernel`)",
    "GL_PROJECT": "Gated LoRA: skinny projection (`lowrank_project_kernel`)",
    "GL_BACKWARD_DX": "Gated LoRA: input gradient (`gated_lora_backward_dx_kernel`)",
    "GL_BACKWARD_DADB": "Gated LoRA: dA/dB partials (`gated_lora_backward_dadb_kernel`)",
}


def _compile_chunk(variants: list) -> list:
    from apo_fast.aot import compile as aot

    return aot.compile_kernels([v.kernel_spec(with_sass=True) for v in variants])


def compile_reports(variants: Sequence, jobs: int = 1) -> list:
    """``CompiledReport`` of each variant (same order), with SASS; ``jobs`` processes."""
    variants = list(variants)
    if jobs <= 1 or len(variants) < 2:
        return _compile_chunk(variants)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    chunks = [variants[i::jobs] for i in range(jobs)]
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        results = list(pool.map(_compile_chunk, chunks))
    out: list = [None] * len(variants)
    for i, chunk_reports in enumerate(results):
        out[i::jobs] = chunk_reports
    return out


def _spills(report) -> int:
    return (report.spill_stores or 0) + (report.spill_loads or 0) + report.local_bytes + report.stack_bytes


def _variant_name(variant) -> str:
    """The label without the kernel and arch (those are the table's)."""
    inner = variant.label.split("[", 1)[1].rstrip("]")
    return ",".join(part for part in inner.split(",") if not part.startswith("sm_"))


def _findings(pairs: Sequence[tuple]) -> list[str]:
    lines = []
    spilling = [v.label for v, r in pairs if r.has_spills]
    if spilling:
        lines.append(f"- **Spills** in {len(spilling)} of {len(pairs)} variants: {', '.join(spilling)}.")
    else:
        lines.append(f"- No spills in any of the {len(pairs)} variants (no STL/LDL, zero local and stack bytes).")
    for arch in sorted({v.arch for v, _ in pairs}):
        at = [(v, r) for v, r in pairs if v.arch == arch]
        regs = max(r.registers for _, r in at)
        shared = max(r.shared_bytes for _, r in at)
        lines.append(f"- sm_{arch}: at most {regs} registers per thread and {shared} B of shared memory per program.")
        stream = [(v, r) for v, r in at if v.kernel in STREAMING_KERNELS]
        if stream:
            aligned = [(v, r) for v, r in stream if v.key[KEY_ALIGNED[v.kernel]] == 1]
            scalar = [v.label for v, r in aligned if r.count("LDG.E.128") == 0]
            generic_vector = [v.label for v, r in stream if v.key[KEY_ALIGNED[v.kernel]] == 0 and r.count("LDG.E.128")]
            lines.append(
                f"  - Loss streaming kernels: {len(aligned)} aligned variants, "
                + (
                    "all with 128-bit loads (LDG.E.128)"
                    if not scalar
                    else f"**{len(scalar)} without 128-bit loads**: {', '.join(scalar)}"
                )
                + f"; the {len(stream) - len(aligned)} generic variants (no alignment hints) use "
                + (
                    "scalar loads only, as expected."
                    if not generic_vector
                    else f"vector loads in {', '.join(generic_vector)}."
                )
            )
        matmuls = [(v, r) for v, r in at if v.kernel in MATMUL_KERNELS]
        if matmuls:
            no_mma = [v.label for v, r in matmuls if r.count("HMMA") + r.count("HGMMA") == 0]
            hgmma = sum(1 for _, r in matmuls if r.count("HGMMA"))
            ldgsts = sum(1 for _, r in matmuls if r.count("LDGSTS"))
            tma = sum(1 for _, r in matmuls if r.count("UTMALDG"))
            lines.append(
                f"  - Gated-LoRA matmuls: {len(matmuls) - len(no_mma)}/{len(matmuls)} use tensor cores"
                + (f" ({hgmma} with warpgroup HGMMA)" if arch == 90 else "")
                + f"; {ldgsts} stage tiles with async copies (LDGSTS), {tma} with TMA (UTMALDG)."
                + (f" **No MMA**: {', '.join(no_mma)}." if no_mma else "")
            )
    return lines


def render_markdown(pairs: Sequence[tuple], triton_version: str, seconds: float) -> str:
    """The report for ``(LibraryVariant, CompiledReport)`` pairs."""
    out = [
        "# Compile report: apo_fast_kernels",
        "",
        (
            "Every kernel variant the C library embeds (`apo_fast.aot.library.library_variants()`), compiled by "
            f"Triton {triton_version} for sm_80 and sm_90 on a machine without a GPU and disassembled with the "
            "`cuobjdump` Triton ships. Regenerate with "
            "`python -m apo_fast.aot.report --out benchmarks/COMPILE_REPORT.md` "
            f"({len(pairs)} variants, {seconds:.0f} s here)."
        ),
        "",
        (
            "Columns: registers per thread; shared memory per program (bytes, dynamic included); spills "
            "(STL + LDL instructions + local + stack bytes); counts of SASS instructions: tensor-core MMA "
            "(HMMA; HGMMA = Hopper warpgroup MMA), global loads/stores by width (LDG.128 = 128-bit "
            "`LDG.E.128`, LDG all = every global load), async global-to-shared copies (LDGSTS), TMA loads "
            "(UTMALDG), shared-memory matrix loads (LDSM), special-function unit (MUFU: exp/log/rcp)."
        ),
        "",
        "## Findings",
        "",
        *_findings(pairs),
        "",
    ]
    by_kernel: dict[str, list] = collections.defaultdict(list)
    for v, r in pairs:
        by_kernel[v.kernel].append((v, r))
    header = ["variant", "warps", "stages", "regs", "shared B", "spills"] + [h for h, _ in INSTRUCTION_COLUMNS]
    header.append("SASS")
    for kernel, rows in by_kernel.items():
        out += [f"## {KERNEL_TITLES.get(kernel, kernel)}", ""]
        fields = ", ".join(f"`{f}`" for f in aot_variants.KEY_FIELDS[kernel])
        out += [f"Variant key: dtype, {fields}.", ""]
        for arch in sorted({v.arch for v, _ in rows}):
            out += [f"### sm_{arch}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            for v, r in rows:
                if v.arch != arch:
                    continue
                cells = [_variant_name(v), r.num_warps, r.num_stages, r.registers, r.shared_bytes, _spills(r)]
                cells += [r.count(op) for _, op in INSTRUCTION_COLUMNS]
                cells.append(sum(r.instructions.values()))
                out.append("| " + " | ".join(str(c) for c in cells) + " |")
            out.append("")
    return "\n".join(out)


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compile report of the apo_fast_kernels variants (Markdown).")
    parser.add_argument("--out", type=Path, required=True, help="Markdown file to write")
    parser.add_argument("--archs", type=kernels_aot._parse_archs, default=aot_variants.ARCHS, help="e.g. 80,90")
    parser.add_argument("--kernels", default="", help="comma-separated subset of " + ",".join(aot_variants.KERNEL_IDS))
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes")
    args = parser.parse_args(list(argv) if argv is not None else None)
    wanted = {k.strip().upper() for k in args.kernels.split(",") if k.strip()}
    unknown = wanted - set(aot_variants.KERNEL_IDS)
    if unknown:
        parser.error(f"--kernels: unknown {sorted(unknown)}; choose from {sorted(aot_variants.KERNEL_IDS)}")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    variants = [v for v in aot_variants.library_variants(args.archs) if not wanted or v.kernel in wanted]
    start = time.perf_counter()
    reports = compile_reports(variants, jobs=args.jobs)
    seconds = time.perf_counter() - start
    import triton

    text = render_markdown(list(zip(variants, reports, strict=True)), triton.__version__, seconds)
    atomic_write_text(args.out, text + "\n")
    spills = sum(r.has_spills for r in reports)
    print(f"{args.out}: {len(variants)} variants, {spills} with spills, {seconds:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    sys.exit(main())
