"""Checkpoints published atomically (every rank's shards, then one rename), and the log a
resume truncates.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Callable

import torch

from apo_fast.io_utils import atomic_write_json, atomic_write_text, publish_directory

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LATEST_FILE = "latest"

# --------------------------------------------------------------------------- checkpoints


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    root = Path(out_dir) / CHECKPOINT_DIR
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = re.fullmatch(r"step-(\d+)", p.name)
            if m and (p / "client_state.json").is_file():  # complete checkpoints only
                found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(out_dir: Path) -> Path | None:
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1][1] if ckpts else None


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def save_checkpoint(engine, out_dir: Path, step: int, keep: int, extra: dict,
                    write_rank_files: Callable[[Path], None] | None = None) -> Path:
    """DeepSpeed checkpoint of ``step``, published atomically; call on every rank.

    Every rank writes its shards (ZeRO partitions of the optimizer, and of the
    parameters under stage 3) into one temporary folder ``checkpoints/.step-N.tmp``;
    after a barrier rank 0 adds ``client_state.json``, flushes the files and renames
    the folder to ``checkpoints/step-N``, then updates ``latest`` and keeps the last
    ``keep`` checkpoints. ``write_rank_files(folder)``, where given, runs on every rank
    beside DeepSpeed's own writes (the adapters' EMA). A kill at any moment leaves
    either no ``step-N`` or a complete one; :func:`list_checkpoints` only lists folders with ``client_state.json``.
    With several nodes ``output_dir`` must be on a filesystem every node sees.
    """
    root = Path(out_dir) / CHECKPOINT_DIR
    final = root / f"step-{step:06d}"
    tmp = root / f".{final.name}.tmp"
    is_main = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    if is_main:
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a killed run
        tmp.mkdir(parents=True)
    _barrier()
    engine.save_checkpoint(str(tmp), tag="state", client_state={"step": step})
    if write_rank_files is not None:
        write_rank_files(tmp)
    _barrier()
    if is_main:
        atomic_write_json(tmp / "client_state.json", {"step": step, **extra})
        publish_directory(tmp, final)  # replaces a step-N rewritten after a resume from an earlier step
        atomic_write_text(root / LATEST_FILE, final.name + "\n")
        for _, stale in list_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    return final


def remove_stale_checkpoint_files(out_dir: Path) -> list[Path]:
    """Delete what a killed run left half-written (call on rank 0, before training):
    temporary checkpoint folders (``.step-N.tmp``, ``.step-N.old``) and temporary
    files of atomic writes (``.latest.<random>.tmp`` in ``checkpoints/``, ``.<name>.<random>.tmp``
    beside the run's logs); returns what was removed."""
    out_dir = Path(out_dir)
    root = out_dir / CHECKPOINT_DIR
    stale = sorted(root.glob(".*.tmp")) + sorted(root.glob(".step-*.old")) if root.is_dir() else []
    stale += sorted(p for p in out_dir.glob(".*.tmp") if p.is_file()) if out_dir.is_dir() else []
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale


def _read_log(path: Path, upto: int | None = None) -> list[dict]:
    if not Path(path).is_file():
        return []
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if upto is None or rec.get("step", 0) <= upto:
            out.append(rec)
    return out
