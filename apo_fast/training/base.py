"""Which base model a run starts from when it names none: a base already in the run folder,
else the one shipped for the demo category when it was built with exactly the run's settings,
else one pretrained here on the product's normal images. Used by ``apo-fast demo`` and by
``apo-fast eval`` (which trains a missing run the way the demo does)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from apo_fast.config import APOConfig
from apo_fast.io_utils import atomic_directory
from apo_fast.training import pretrain

__all__ = ["SHIPPED_BASES", "base_build_record", "prepare_base", "shipped_base"]

#: The pretrained demo bases shipped with the package (tools/build_demo_base.py rebuilds them).
SHIPPED_BASES = Path(__file__).resolve().parents[1] / "assets" / "demo_base"


def base_build_record(cfg: APOConfig) -> dict:
    """The settings that decide what a pretrained base is (written to a shipped base's build.json)."""
    full = cfg.to_dict()
    # how a run stores the frozen base (base_quantization) is not what the base is
    ignored = ("pretrained", "conditions", "subfolder", "revision", "base_quantization", "base_double_quant")
    model = {k: v for k, v in full["model"].items() if k not in ignored}
    data = {k: full["data"][k] for k in ("root", "category", "image_size", "augment", "defect_types", "shots")}
    pre = {k: v for k, v in full["pretrain"].items() if k not in ("checkpoint_every", "sample_every")}
    return {"model": model, "data": data, "pretrain": pre, "seed": cfg.train.seed}


def shipped_base(cfg: APOConfig) -> tuple[Path | None, str]:
    """The shipped pretrained base for ``cfg`` if one was built with exactly its settings,
    else None; and why (for the log)."""
    folder = SHIPPED_BASES / cfg.data.category
    if cfg.data.root != "builtin:demo":
        return None, "the data is not the bundled demo dataset"
    record = folder / "build.json"
    if not record.is_file():
        return None, f"no shipped base for {cfg.data.category!r}"
    built = json.loads(record.read_text())
    want = base_build_record(cfg)
    diff = sorted(k for k in want if built.get(k) != want[k])
    if diff:
        return None, f"the shipped base was built with other {', '.join(diff)} settings"
    return folder, f"built by `{built.get('command')}`"


def prepare_base(cfg: APOConfig, base_dir: Path, *, progress: bool = True, rebuild: bool = False,
                 say=print) -> None:
    """Make ``base_dir`` hold the run's base model and point ``cfg.model`` at it: a base
    already there, else the shipped one for the category when it matches (:func:`shipped_base`),
    else one trained here (:func:`apo_fast.training.pretrain.pretrain_base`; always with ``rebuild``).
    ``say`` gets one line saying which."""
    base_dir = Path(base_dir)
    if (base_dir / "base_unet" / "config.json").is_file() and (base_dir / "base_conditions.safetensors").is_file():
        say(f"found in {base_dir}")
    else:
        shipped, why = (None, "--rebuild-base") if rebuild else shipped_base(cfg)
        if shipped is not None:
            say(f"the pretrained base shipped for {cfg.data.category} ({why}), copied to {base_dir}")
            _copy_base(shipped, base_dir)
        else:
            say(f"training the tiny base UNet on the normal images ({cfg.pretrain.steps} steps; no shipped base: {why})")
            pretrain.pretrain_base(cfg, base_dir, progress=progress)
    cfg.model.pretrained, cfg.model.subfolder = str(base_dir / "base_unet"), ""
    cfg.model.conditions = str(base_dir / "base_conditions.safetensors")


def _copy_base(src: Path, dst: Path) -> None:
    with atomic_directory(dst) as tmp:
        for item in src.iterdir():
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
