"""Loading a trained APO run and generating anomalies with masks from it."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from apo_fast.config import APOConfig, load_config
from apo_fast.io_utils import atomic_write_json
from apo_fast.models import (
    build_scheduler,
    build_unet,
    build_vae,
    encode_images,
    pooled_dim,
    resolve_device,
    set_attention,
    vae_scale_factor,
)
from apo_fast.sampling.hierarchical import hierarchical_sample
from apo_fast.sampling.images import save_grid, save_images


@dataclass
class LoadedRun:
    cfg: APOConfig
    unet: torch.nn.Module
    conditions: torch.nn.Module
    condition_names: list[str]
    vae: torch.nn.Module | None
    device: torch.device
    unet_call: object = None  # the UNet call, compiled when sample.compile says so
    mask_bank: object = None  # the training masks free samples draw from (adapter.mask_input)


def load_run(run_dir: str | Path, device: str = "auto", adapters: str | Path | None = None,
             compile: bool | None = None) -> LoadedRun:
    """The base UNet of a run's config with its trained adapters and condition embeddings;
    ``compile`` overrides the run's ``sample.compile.enabled``."""
    from safetensors import safe_open

    from apo_fast.adapters import load_adapters
    from apo_fast.adapters.mask_input import get_mask_input
    from apo_fast.models.conditions import load_conditions
    from apo_fast.models.quantize import quantize_base

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not an apo-fast run folder (no config.yaml)")
    cfg = load_config(cfg_path)
    if compile is not None:
        cfg.sample.compile.enabled = bool(compile)
    adapters = Path(adapters) if adapters else run_dir / "adapters"
    cond_file = adapters / "conditions.safetensors"
    if not cond_file.is_file():
        raise FileNotFoundError(f"{cond_file} is missing: train the run first (apo-fast train)")
    with safe_open(str(cond_file), "pt") as fh:
        names = json.loads(fh.metadata()["names"])
    dev = resolve_device(device if device != "auto" else cfg.train.device)
    vae = build_vae(cfg.model)
    in_channels = vae.config.latent_channels if vae is not None else 3
    unet = build_unet(cfg.model, in_channels=in_channels, sample_size=None, seed=cfg.train.seed)  # the trained base
    set_attention(unet, "sdpa" if dev.type != "cuda" else cfg.train.attention, dev)
    quantize_base(unet, cfg, dev)  # sample from the base the adapters were trained on
    load_adapters(unet, adapters)
    conds = load_conditions(cond_file, names, cfg.model.cond_tokens, unet.config.cross_attention_dim, pooled_dim(unet))
    unet.to(dev).eval()
    conds.to(dev).eval()
    unet_call = None
    if cfg.sample.compile.enabled:
        from apo_fast.models.compile import compiled_unet_call

        unet_call = compiled_unet_call(unet, cfg.sample.compile, dev)
    mask_bank = None
    if get_mask_input(unet) is not None:
        from apo_fast.sampling.mask_bank import MASK_BANK_NAME, load_mask_bank

        mask_bank = load_mask_bank(adapters / MASK_BANK_NAME)
    return LoadedRun(cfg, unet, conds, names, vae, dev, unet_call, mask_bank)


def gate_weight_fn(unet):
    """t (B,) -> mean gate opening mean_j k_j(t) (B,), or None for a constant gate."""
    from apo_fast.adapters import get_gate_state

    state = get_gate_state(unet)
    gate = getattr(unet, "taca_gate", None)
    if state is None or state.constant or gate is None:
        return None
    rank = max(state.ranks)
    return lambda t: gate(t, rank).float().mean(dim=1)


def generate_for_defect(
    run: LoadedRun,
    defect: str,
    num: int,
    *,
    known_images: torch.Tensor | None = None,
    known_masks: torch.Tensor | None = None,
    seed: int | None = None,
    progress: bool = False,
    label: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``num`` anomalies of ``defect`` -> (images (N,3,H,W) [-1,1], masks (N,1,H,W), maps).

    With ``known_images`` (N,3,H,W) pixels and ``known_masks`` (N,1,H,W) the
    generation is mask-guided: the product outside the mask stays as given.
    """
    cfg = run.cfg
    s = cfg.sample
    name = f"{cfg.data.category}/{defect}"
    if name not in run.condition_names:
        known = [n.split("/", 1)[1] for n in run.condition_names if not n.endswith("/good")]
        raise ValueError(f"unknown defect type {defect!r}; this run was trained on: {', '.join(known)}")
    cid = run.condition_names.index(name)
    size = cfg.data.image_size
    latent_scale = vae_scale_factor(run.vae) if run.vae is not None else 1
    shape = (run.unet.config.in_channels, size // latent_scale, size // latent_scale)
    g = torch.Generator().manual_seed(s.seed if seed is None else seed)
    desc = label or f"sampling {defect} {'guided' if known_images is not None else 'free'}"
    imgs, masks, maps = [], [], []
    for start in range(0, num, s.batch_size):
        bsz = min(s.batch_size, num - start)
        known = kmask = cond_mask = None
        if known_images is not None:
            ki = known_images[start : start + bsz]
            km = known_masks[start : start + bsz].float()
            known = encode_images(run.vae, ki) if run.vae is not None else ki
            kmask = F.adaptive_max_pool2d(km, shape[1:]) if km.shape[-2:] != shape[1:] else km
            cond_mask = km if run.mask_bank is not None else None
        elif run.mask_bank is not None:  # a mask-input policy draws its free defect into a training mask
            cond_mask = run.mask_bank.draw(name, bsz, g)
        out = hierarchical_sample(
            run.unet,
            run.conditions,
            build_scheduler(cfg.model, s.scheduler),
            torch.full((bsz,), cid, dtype=torch.long),
            shape=shape,
            num_inference_steps=s.num_inference_steps,
            s_text=s.s_text,
            s_align=s.s_align,
            generator=g,
            known=known,
            known_mask=kmask,
            gate_weight=gate_weight_fn(run.unet),
            mask_threshold=s.mask_threshold,
            mask_sigma=s.mask_sigma,
            vae=run.vae,
            image_size=size,
            progress=progress,
            unet_call=run.unet_call,
            cond_mask=cond_mask,
            resample=s.resample,
            stop_t=s.stop_t,
            guide_dilate=s.guide_dilate,
            desc=f"{desc} {start // s.batch_size + 1}/{-(-num // s.batch_size)}" if num > s.batch_size else desc,
        )
        imgs.append(out.images)
        masks.append(out.masks)
        maps.append(out.maps)
    return torch.cat(imgs), torch.cat(masks), torch.cat(maps)


def heldout_guides(cfg: APOConfig, defect: str, num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normal test images and held-out real masks of ``defect`` (cycled) for mask-guided runs."""
    from apo_fast.data import (
        AnomalyDataset,
        NormalDataset,
        resolve_data_root,
        scan_mvtec,
    )

    index = scan_mvtec(resolve_data_root(cfg.data.root), cfg.data.category, cfg.data.defect_types, cfg.data.shots)
    normals = NormalDataset(index, cfg.data.image_size, split="test")
    if len(normals) == 0:
        normals = NormalDataset(index, cfg.data.image_size, split="train")
    held = AnomalyDataset(index, cfg.data.image_size, split="heldout")
    masks = [held[i]["mask"] for i in range(len(held)) if held[i]["defect"] == defect]
    if not masks:
        train = AnomalyDataset(index, cfg.data.image_size, split="train")
        masks = [train[i]["mask"] for i in range(len(train)) if train[i]["defect"] == defect]
    imgs = torch.stack([normals[i % len(normals)]["image"] for i in range(num)])
    return imgs, torch.stack([masks[i % len(masks)] for i in range(num)]).float()


def sample_run(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    defects: list[str] | None = None,
    num: int | None = None,
    mask_guided: bool | None = None,
    device: str = "auto",
    progress: bool = True,
    compile: bool | None = None,
) -> dict:
    """Generate for every (or the given) defect type; writes images, masks and grid.png
    (``compile``: torch.compile the UNet call, see :mod:`apo_fast.models.compile`).

    Layout: ``<out>/<defect>/free/NNNN.png`` (+ ``_mask.png``), ``<out>/<defect>/guided/...``,
    ``<out>/grid.png`` and ``<out>/samples.json``.
    """
    run = load_run(run_dir, device=device, compile=compile)
    cfg = run.cfg
    out_dir = Path(out_dir) if out_dir else Path(run_dir) / "samples"
    num = num or cfg.sample.num_per_defect
    guided = cfg.sample.mask_guided if mask_guided is None else mask_guided
    all_defects = [n.split("/", 1)[1] for n in run.condition_names if not n.endswith("/good")]
    defects = defects or all_defects
    rows, outlines, record = {}, {}, {}
    for defect in defects:
        imgs, masks, _ = generate_for_defect(run, defect, num, progress=progress)
        save_images(imgs, masks, out_dir / defect / "free")
        rows[f"{defect} free"], outlines[f"{defect} free"] = imgs, masks
        record[defect] = {"free": num, "mask_fraction_free": float(masks.mean())}
        if guided:
            ki, km = heldout_guides(cfg, defect, num)
            gi, gm, _ = generate_for_defect(run, defect, num, known_images=ki, known_masks=km, progress=progress)
            save_images(gi, gm, out_dir / defect / "guided")
            rows[f"{defect} guided"], outlines[f"{defect} guided"] = gi, gm
            record[defect]["guided"] = num
    save_grid(rows, out_dir / "grid.png", outlines=outlines)
    atomic_write_json(out_dir / "samples.json", record)
    return {"out_dir": str(out_dir), "defects": record}
