"""APO training on a DeepSpeed engine (and the demo's base-model pretraining).

One optimisation step, per micro-batch (APO_SPEC "Loss"):

1. draw t and eps (one per pair in paired mode: winners and losers share both);
2. policy pass ``eps_theta(z_t, c, t)`` with adapters on (grad);
3. reference pass with adapters off, same weights, under ``no_grad``;
4. :func:`apo_fast.loss.apo_loss` -> ``engine.backward`` -> ``engine.step``.

Every random draw of step ``k`` comes from generators seeded by ``(seed, k)``, and
the data order of epoch ``e`` from ``(seed, e)``: a run resumed from the
checkpoint of step ``k`` continues with exactly the batches, timesteps and
noise an uninterrupted run would have drawn. The global batch of a step is drawn
whole and each rank takes its slice, so it does not depend on the number of ranks.

Distributed training (ZeRO stages 0-3, offload, 8-bit optimizers, launchers) is
described in ``docs/distributed.md``; the DeepSpeed plumbing is in
:mod:`apo_fast.distributed`.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from apo_fast.config import APOConfig, save_config
from apo_fast.distributed import (
    UNetOutputKeeper,
    average_over_ranks,
    check_precision_supported,
    export_parameters,
    gathered,
    merge_deepspeed_overrides,
    rank_slice,
    register_adapter_params_for_zero3,
)
from apo_fast.io_utils import atomic_write_json, atomic_write_text
from apo_fast.models import (
    ConditionEmbedding,
    pooled_dim,
    build_scheduler,
    build_unet,
    build_vae,
    check_attention,
    encode_images,
    resolve_device,
    set_attention,
)

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LATEST_FILE = "latest"


# --------------------------------------------------------------------------- data


@dataclass
class TrainData:
    """Everything the loop samples from, as in-memory tensors (few-shot data is small)."""

    condition_names: list[str]
    anomalies: torch.Tensor  # (N, C, H, W) model space (pixels in [-1, 1] or VAE latents)
    anomaly_masks: torch.Tensor  # (N, 1, h, w) image-resolution masks in {0, 1}
    anomaly_conds: torch.Tensor  # (N,) int64 condition ids
    normals: torch.Tensor  # (M, C, H, W)
    normal_cond: int  # the id of "<category>/good"
    anomaly_images: torch.Tensor  # (N, 3, H, W) pixels, for plots
    normal_images: torch.Tensor


def load_train_data(cfg: APOConfig, vae=None, device: torch.device | None = None) -> TrainData:
    """Scan the dataset, load the few-shot training split, and cache VAE latents once."""
    from apo_fast.data import AnomalyDataset, NormalDataset, condition_names, scan_mvtec

    root = resolve_data_root(cfg.data.root)
    index = scan_mvtec(root, cfg.data.category, cfg.data.defect_types, cfg.data.shots)
    names = condition_names(index)
    anomaly_ds = AnomalyDataset(index, cfg.data.image_size, split="train")
    normal_ds = NormalDataset(index, cfg.data.image_size, split="train")
    if len(anomaly_ds) == 0:
        raise ValueError(f"dataset {root}/{cfg.data.category}: no anomalous training images after the few-shot split")
    if len(normal_ds) == 0:
        raise ValueError(f"dataset {root}/{cfg.data.category}: train/good has no images")
    a_items = [anomaly_ds[i] for i in range(len(anomaly_ds))]
    n_items = [normal_ds[i] for i in range(len(normal_ds))]
    a_img = torch.stack([it["image"] for it in a_items])
    n_img = torch.stack([it["image"] for it in n_items])
    masks = torch.stack([it["mask"] for it in a_items]).float()
    conds = torch.tensor([int(it["cond"]) for it in a_items], dtype=torch.int64)
    normal_cond = names.index(f"{cfg.data.category}/good")
    a_model, n_model = a_img, n_img
    if vae is not None:
        log.info("encoding %d images to VAE latents once (cached for the whole run)", len(a_img) + len(n_img))
        vae.to(device or "cpu")
        a_model, n_model = encode_images(vae, a_img), encode_images(vae, n_img)
        vae.to("cpu")  # latents are cached: the VAE stays off the GPU during training
    return TrainData(names, a_model, masks, conds, n_model, normal_cond, a_img, n_img)


def resolve_data_root(root: str) -> Path:
    if root == "builtin:demo":
        return Path(__file__).resolve().parent / "assets" / "demo_mvtec"
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"data.root {root!r} is not a folder")
    return path


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def stream_indices(n: int, seed: int, start: int, count: int) -> torch.Tensor:
    """Items ``start .. start+count`` of the endless stream of per-epoch permutations of ``range(n)``."""
    out = []
    pos = start
    while len(out) < count:
        epoch, offset = divmod(pos, n)
        perm = epoch_permutation(n, seed, epoch)
        take = min(n - offset, count - len(out))
        out.extend(perm[offset : offset + take].tolist())
        pos += take
    return torch.tensor(out, dtype=torch.int64)


def augment(x: torch.Tensor, mask: torch.Tensor | None, g: torch.Generator, mode: str):
    """Random symmetries (``flip`` or ``dihedral``, see :func:`apo_fast.data.augment_pair`)
    drawn from ``g``, applied alike to each image and its mask."""
    from apo_fast.data import AUGMENT_VARIANTS, augment_pair

    variants = torch.randint(AUGMENT_VARIANTS[mode], (x.shape[0],), generator=g).tolist()
    m = mask if mask is not None else torch.zeros_like(x[:, :1])
    pairs = [augment_pair(x[i], m[i], v) for i, v in enumerate(variants)]
    x = torch.stack([p[0] for p in pairs])
    return x, (torch.stack([p[1] for p in pairs]) if mask is not None else None)


# --------------------------------------------------------------------------- model


class APOModel(nn.Module):
    """The UNet (with adapters) and the condition embeddings, as one module for DeepSpeed.

    ``forward(z, t, cond_ids, reference=False)``: z (B, C, H, W), t (B,) int, cond_ids
    (B,) -> noise prediction (B, C, H, W). ``reference=True`` runs the same UNet
    with its adapters disabled (APO's reference), the condition taken without grad.
    """

    def __init__(self, unet: nn.Module, conditions: ConditionEmbedding, pixel_size: int):
        super().__init__()
        self.unet = unet
        self.conditions = conditions
        self.pixel_size = pixel_size

    def forward(self, z, t, cond_ids, reference: bool = False):
        from apo_fast.adapters import adapters_disabled

        cond = self.conditions.unet_kwargs(cond_ids, z.dtype, self.pixel_size, detach=reference)
        if reference:
            with adapters_disabled(self.unet):
                return self.unet(z, t, **cond).sample
        return self.unet(z, t, **cond).sample


def adapter_config(cfg: APOConfig):
    """The adapters package's config from the run config."""
    from apo_fast.adapters import AdapterConfig, GateConfig

    a = cfg.adapter
    gate = GateConfig(
        kind=a.gate.kind,
        r_min=a.gate.r_min if a.gate.r_min is not None else max(1, a.rank // 4),
        r_max=a.gate.r_max if a.gate.r_max is not None else a.rank,
        num_train_timesteps=cfg.model.num_train_timesteps,
        temperature=a.gate.temperature,
        hidden_size=a.gate.hidden,
    )
    return AdapterConfig(
        r=a.rank,
        lora_alpha=a.alpha if a.alpha is not None else float(a.rank),
        target_modules=list(a.target_modules),
        gate=gate,
        dropout=a.dropout,
    )


def load_conditions(path: Path | None, names: list[str], tokens: int, dim: int, pooled: int | None = None,
                    init: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> ConditionEmbedding:
    """Condition embeddings for ``names``; ``init`` (rows ``(len(names) + 1, tokens, dim)``
    and pooled rows, e.g. CLIP prompt encodings) fills the tables first; then rows found
    by name in ``path`` are copied, and without ``init`` new defect rows start from the
    product's ``good`` row (textual-inversion style init)."""
    from safetensors.torch import load_file

    emb = ConditionEmbedding(len(names), tokens, dim, pooled_dim=pooled)
    if init is not None:
        with torch.no_grad():
            emb.weight.copy_(init[0])
            if emb.pooled is not None:
                emb.pooled.copy_(init[1])
    if path is None:
        return emb
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"condition embeddings file {path} does not exist")
    saved = load_file(str(path))
    good = next((n for n in names if n.endswith("/good")), None)
    tables = [("", emb.weight, (tokens, dim))]
    if emb.pooled is not None:
        tables.append(("pooled/", emb.pooled, (pooled,)))
    with torch.no_grad():
        for prefix, table, shape in tables:
            for row, name in enumerate(["null", *names]):
                src = saved.get(prefix + name)
                if src is None and name != "null" and init is None:
                    src = saved.get(prefix + good) if good else None
                if src is None:
                    continue
                if tuple(src.shape) != shape:
                    raise ValueError(f"{path}: condition {prefix + name!r} has shape {tuple(src.shape)}, expected {shape}")
                table[row].copy_(src)
    return emb


def save_conditions(emb: ConditionEmbedding, names: list[str], path: Path, keep: list[str] | None = None) -> None:
    """Write the condition rows by name (``keep``: only these names and ``null``; a base model
    keeps only the rows it trained, so APO starts each defect row from the ``good`` row)."""
    from safetensors.torch import save_file

    from apo_fast.io_utils import atomic_save

    tensors = {}
    for prefix, table in (("", emb.weight), ("pooled/", emb.pooled)):
        if table is None:
            continue
        for row, name in enumerate(["null", *names]):
            if keep is not None and name != "null" and name not in keep:
                continue
            tensors[prefix + name] = table[row].detach().float().cpu().contiguous()
    saved = [n for n in names if keep is None or n in keep]
    atomic_save(path, lambda tmp: save_file(tensors, str(tmp), metadata={"names": json.dumps(saved)}))


# --------------------------------------------------------------------------- DeepSpeed


def ensure_distributed_env() -> bool:
    """Set the single-process rendezvous variables when no launcher did. Returns True if set here."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return False
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return True


def rank_device(device: torch.device) -> torch.device:
    """``cuda`` without an index means this rank's GPU (``LOCAL_RANK`` of the launcher)."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


def clips_outside_deepspeed(cfg: APOConfig) -> bool:
    """Whether the trainer clips the gradient norm itself rather than DeepSpeed.

    At ZeRO stage 0 in fp32, DeepSpeed clips with a Python loop over every module
    parameter (the frozen base UNet included); the trainer then clips the
    trainable parameters with torch's foreach ``clip_grad_norm_`` instead (the
    same rule: scale by ``max_norm / (norm + 1e-6)`` when the norm exceeds
    ``max_norm``). ZeRO 1-3 and the bf16/fp16 optimizers keep DeepSpeed's
    clipping: there the gradients are partitioned or held by DeepSpeed.
    """
    return cfg.train.zero_stage == 0 and cfg.train.mixed_precision == "no" and cfg.optim.max_grad_norm > 0


def deepspeed_config(cfg: APOConfig, micro_batch: int) -> dict:
    """The DeepSpeed config of a run: ZeRO stage, offload, precision and batch from
    ``cfg.train``, then ``cfg.train.deepspeed`` merged over it (bucket sizes, ZeRO-3
    prefetch/persistence, loss-scale settings...; entries that ``train.*`` fields
    own are refused with a ValueError naming the field).

    The optimizer is always the client optimizer of :func:`build_optimizer`; with
    ZeRO, bitsandbytes' 8-bit optimizers are "untested" to DeepSpeed and need
    ``zero_allow_untested_optimizer``, and a client optimizer other than
    DeepSpeedCPUAdam under ZeRO-Offload needs ``zero_force_ds_cpu_optimizer: false``.
    """
    t = cfg.train
    zero: dict = {"stage": t.zero_stage}
    if t.zero_stage >= 2:
        zero.update(contiguous_gradients=True, overlap_comm=False, reduce_scatter=True)
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if t.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if t.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True)
    base = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": 0.0 if clips_outside_deepspeed(cfg) else max(cfg.optim.max_grad_norm, 0.0),
        "zero_optimization": zero,
        "bf16": {"enabled": t.mixed_precision == "bf16"},
        # fp16: dynamic loss scaling (loss_scale 0), starting at 2**12.
        "fp16": {"enabled": t.mixed_precision == "fp16", "loss_scale": 0, "initial_scale_power": 12},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return merge_deepspeed_overrides(base, t.deepspeed)


def build_optimizer(cfg: APOConfig, model: APOModel):
    """The client optimizer over the trainable parameters (adapters, gates, conditions)."""
    o = cfg.optim
    cond_params = [p for p in model.conditions.parameters() if p.requires_grad]
    cond_ids = {id(p) for p in cond_params}
    other = [p for p in model.parameters() if p.requires_grad and id(p) not in cond_ids]
    groups = [{"params": other, "lr": o.lr}]
    if cond_params and (o.cond_lr is None or o.cond_lr > 0):
        groups.append({"params": cond_params, "lr": o.cond_lr if o.cond_lr is not None else o.lr})
    kwargs = dict(betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    if o.name == "adamw":
        # torch's fused AdamW (one kernel over all tensors, CPU and CUDA): same update as the loop.
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    if o.name == "ds_cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    import bitsandbytes as bnb

    if o.name == "adamw8bit":
        return bnb.optim.AdamW8bit(groups, **kwargs)
    if o.name == "paged_adamw8bit":
        return bnb.optim.PagedAdamW8bit(groups, **kwargs)
    if o.name == "lion8bit":
        return bnb.optim.Lion8bit(groups, betas=tuple(o.betas), weight_decay=o.weight_decay)
    raise ValueError(f"optim.name {o.name!r} is not supported")


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


def _fsync_tree(folder: Path) -> None:
    """Flush every file of ``folder`` to disk (so a rename publishes complete files)."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


def save_checkpoint(engine, out_dir: Path, step: int, keep: int, extra: dict) -> Path:
    """DeepSpeed checkpoint of ``step``, published atomically; call on every rank.

    Every rank writes its shards (ZeRO partitions of the optimizer, and of the
    parameters under stage 3) into one temporary folder ``checkpoints/.step-N.tmp``;
    after a barrier rank 0 adds ``client_state.json``, flushes the files and renames
    the folder to ``checkpoints/step-N``, then updates ``latest`` and keeps the last
    ``keep`` checkpoints. A kill at any moment leaves either no ``step-N`` or a
    complete one; :func:`list_checkpoints` only lists folders with ``client_state.json``.
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
    _barrier()
    if is_main:
        atomic_write_json(tmp / "client_state.json", {"step": step, **extra})
        _fsync_tree(tmp)
        if final.exists():  # rewritten after a resume from an earlier step
            old = root / f".{final.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
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


# --------------------------------------------------------------------------- training


def diffusion_loss(pred, target, mask, lambda_mask: float):
    """The plain (mask-weighted) diffusion loss of LoRA fine-tuning: the no-preference baseline.

    Returns an :class:`apo_fast.loss.APOLossOutput` whose ``e_ref`` is NaN (no reference pass).
    """
    from apo_fast.loss import METRIC_SLOTS, NUM_METRIC_SLOTS, APOLossOutput

    w = 1.0 + (lambda_mask - 1.0) * mask.float()
    e = (w * (pred.float() - target.float()) ** 2).mean(dim=tuple(range(1, pred.dim())))
    loss = e.mean()
    values = torch.full((NUM_METRIC_SLOTS,), float("nan"), device=e.device)
    values[METRIC_SLOTS["loss"]] = loss.detach()
    values[METRIC_SLOTS["e_theta"]] = e.detach().mean()
    return APOLossOutput(loss, e.detach(), torch.full_like(e, float("nan")), values, ("loss", "e_theta"))


def noisy_inputs(x0, noise, t, alphas_cumprod, prediction_type):
    """z_t and the regression target for ``prediction_type`` (float32 math)."""
    a = alphas_cumprod[t].to(torch.float32).view(-1, *([1] * (x0.dim() - 1)))
    z = a.sqrt() * x0 + (1 - a).sqrt() * noise
    if prediction_type == "epsilon":
        return z, noise
    return z, a.sqrt() * noise - (1 - a).sqrt() * x0  # v-prediction


class APOTrainer:
    """Builds the model, data and DeepSpeed engine from a config and runs APO training.

    Example::

        trainer = APOTrainer(load_config("configs/demo.yaml"))
        summary = trainer.train()        # resumes from the last checkpoint if any
    """

    def __init__(self, cfg: APOConfig, resume: bool = True):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.resume = resume
        self.device = resolve_device(cfg.train.device)
        self._output_keeper = None
        self.step = 0  # the last finished optimisation step

    # ---- setup
    def setup(self):
        import deepspeed

        from apo_fast.adapters import freeze_base, inject_adapters
        from apo_fast.data import category_augment

        cfg = self.cfg
        # Everything that can be refused is refused before data, models or ranks are touched.
        check_precision_supported(cfg.train.mixed_precision, self.device)
        check_attention(cfg.train.attention, self.device)
        self.micro_batch = cfg.train.batch_size * (2 if cfg.loss.mode == "paired" else 1)
        ds_config = deepspeed_config(cfg, self.micro_batch)
        self.device = rank_device(self.device)
        torch.manual_seed(cfg.train.seed)
        self.augment_mode = "none"
        if self.device.type == "cuda" and cfg.train.allow_tf32:
            # TF32 matmuls/convolutions on Ampere+ (fp32 runs only; a no-op before Ampere).
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        vae = build_vae(cfg.model)
        self.data = load_train_data(cfg, vae, self.device)
        if cfg.data.augment:
            self.augment_mode = category_augment(cfg.data.category, self.data.normal_images, log)
        in_ch = self.data.anomalies.shape[1]
        unet = build_unet(cfg.model, in_channels=in_ch, sample_size=self.data.anomalies.shape[-1], seed=cfg.train.seed)
        if unet.config.in_channels != in_ch:
            raise ValueError(
                f"the UNet takes {unet.config.in_channels} input channels but the data has {in_ch} "
                f"({'latents' if cfg.model.latent else 'pixels'}); set model.latent accordingly"
            )
        self.attention = set_attention(unet, cfg.train.attention, self.device)
        self.adapter_names = inject_adapters(unet, adapter_config(cfg))
        freeze_base(unet)  # everything but the adapters (and a learned gate)
        if cfg.train.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        init = None
        if cfg.model.prompt_template is not None:
            from apo_fast.text_conditions import prompt_condition_table

            table, pooled_table, prompts = prompt_condition_table(
                cfg.model, self.data.condition_names, cfg.model.cond_tokens, unet.config.cross_attention_dim,
                pooled_dim(unet), self.device,
            )
            init = (table, pooled_table)
            log.info("condition embeddings start from the CLIP encodings of %d prompts, e.g. %r", len(prompts) - 1,
                     prompts[-1])
        conditions = load_conditions(
            cfg.model.conditions, self.data.condition_names, cfg.model.cond_tokens, unet.config.cross_attention_dim,
            pooled_dim(unet), init=init,
        )
        if cfg.optim.cond_lr == 0:  # frozen conditions: no gradient through the context projections
            conditions.requires_grad_(False)
        model = APOModel(unet, conditions, cfg.data.image_size)
        # channels_last: the inputs are made channels_last in micro_step and convolutions
        # propagate the layout (cuDNN picks NHWC kernels for a channels_last input). The
        # parameters stay contiguous: DeepSpeed broadcasts and flattens them as byte views.
        self.scheduler = build_scheduler(cfg.model, "ddpm")
        if self.device.type == "cpu":
            # DeepSpeed JIT-builds its CPU ops on first use; build them under a file lock
            # (concurrent runs share the cache) and say so, since it can take minutes.
            from apo_fast.machine import prebuild_deepspeed_cpu_ops

            prebuild_deepspeed_cpu_ops(("ShareMemCommBuilder",) + (("CPUAdamBuilder",) if cfg.optim.name == "ds_cpu_adam" else ()))
        optimizer = build_optimizer(cfg, model)
        warm = cfg.optim.warmup_steps
        lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        self._own_dist = ensure_distributed_env()
        self.engine, self.optimizer, _, self.lr_scheduler = deepspeed.initialize(
            model=model,  # the whole model: ZeRO-3 partitions the frozen base too
            optimizer=optimizer,
            lr_scheduler=lr_sched,
            config=ds_config,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
        )
        if cfg.train.zero_stage == 0 and self.engine.world_size == 1:
            # Nothing to all-reduce on one rank; DeepSpeed would still flatten every
            # gradient into a bucket and copy it back each step.
            self.engine.enable_backward_allreduce = False
        self._clip_params = (
            [p for p in self.engine.module.parameters() if p.requires_grad] if clips_outside_deepspeed(cfg) else None
        )
        if cfg.train.zero_stage == 3:
            register_adapter_params_for_zero3(self.engine.module.unet)
        # ZeRO-3 replaces module outputs; the time gate must still see its forward pending
        # during a gradient-checkpointing recompute (see UNetOutputKeeper).
        self._output_keeper = UNetOutputKeeper.attach(self.engine.module.unet) if cfg.train.zero_stage == 3 else None
        self.rank = self.engine.global_rank
        self.world = self.engine.world_size
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(device=self.engine.device, dtype=torch.float64)
        self.model_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.mixed_precision, torch.float32)
        if self.rank == 0:
            log.info(
                "DeepSpeed: ZeRO stage %d on %d rank(s), %s, optimizer %s%s%s, attention %s%s",
                cfg.train.zero_stage, self.world, str(self.model_dtype).replace("torch.", ""), cfg.optim.name,
                " (state offloaded to CPU)" if cfg.train.offload_optimizer else "",
                ", parameters offloaded to CPU" if cfg.train.offload_params else "", self.attention,
                ", gradient checkpointing" if cfg.train.gradient_checkpointing else "",
            )
        return self

    # ---- one step
    def batch_for_step(self, step: int, micro: int):
        """This rank's share of micro-batch ``micro`` of optimisation step ``step``.

        The global micro-batch (``batch_size * world`` samples: data items,
        augmentations, t and noise) is drawn from generators seeded by
        ``(seed, step, micro)`` alone, and rank ``r`` takes rows ``r*b .. (r+1)*b``.
        So the global batch of a step does not depend on the world size: 2 ranks of
        batch ``b`` train on exactly the samples 1 rank of batch ``2b`` does.

        Returns ``(x0, masks, conds, t, noise)``; in paired mode winners then losers
        (a pair shares condition, t and noise).
        """
        cfg, d = self.cfg, self.data
        b, world, rank = cfg.train.batch_size, self.world, self.rank
        gb = b * world
        k = step * cfg.train.grad_accum + micro  # global micro-batch index
        g = torch.Generator().manual_seed(cfg.train.seed * 7919 + k)
        idx = stream_indices(d.anomalies.shape[0], cfg.train.seed, k * gb, gb)
        x0 = d.anomalies[idx]
        masks = d.anomaly_masks[idx]
        conds = d.anomaly_conds[idx]
        if self.augment_mode != "none":
            x0, masks = augment(x0, masks, g, self.augment_mode)
        xn = None
        if cfg.loss.mode == "paired":
            nidx = stream_indices(d.normals.shape[0], cfg.train.seed + 1, k * gb, gb)
            xn = d.normals[nidx]
            if self.augment_mode != "none":
                xn, _ = augment(xn, None, g, self.augment_mode)
        t = torch.randint(0, cfg.model.num_train_timesteps, (gb,), generator=g)
        noise = torch.randn((gb, *x0.shape[1:]), generator=g)
        x0, masks, conds, t, noise = (rank_slice(v, rank, world) for v in (x0, masks, conds, t, noise))
        if xn is not None:
            x0 = torch.cat([x0, rank_slice(xn, rank, world)])
            masks = torch.cat([masks, torch.zeros_like(masks)])
            conds = torch.cat([conds, conds])  # a pair shares the condition
            t, noise = torch.cat([t, t]), torch.cat([noise, noise])
        return x0, masks, conds, t, noise

    def micro_step(self, step: int, micro: int):
        """Forward, loss, ``engine.backward`` and ``engine.step`` of one micro-batch
        (DeepSpeed applies the update at the gradient-accumulation boundary)."""
        cfg = self.cfg
        dev = self.engine.device
        # The global RNG (LoRA dropout, anything stochastic inside the model) restarts from
        # (seed, step, micro, rank) too, so a resumed run draws what an uninterrupted one does.
        torch.manual_seed((cfg.train.seed * 1_000_003 + step * cfg.train.grad_accum + micro) * 4099 + self.rank)
        x0, masks, conds, t, noise = self.batch_for_step(step, micro)
        x0, masks, conds, t, noise = (v.to(dev) for v in (x0, masks, conds, t, noise))
        z, target = noisy_inputs(x0, noise, t, self.alphas_cumprod, cfg.model.prediction_type)
        z = z.to(self.model_dtype)
        if cfg.train.channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        pred = self.engine(z, t, conds)
        if pred.shape[-2:] != masks.shape[-2:]:
            masks = F.adaptive_max_pool2d(masks, pred.shape[-2:])  # keep thin defects at latent size
        if cfg.loss.mode == "diffusion":
            out = diffusion_loss(pred, target.to(pred.dtype), masks.to(pred.dtype), cfg.loss.lambda_mask)
        else:
            out = self._apo_loss(step, z, t, conds, pred, target, masks)
        self.engine.backward(out.loss)
        if self._clip_params is not None and self.engine.is_gradient_accumulation_boundary():
            torch.nn.utils.clip_grad_norm_(self._clip_params, cfg.optim.max_grad_norm, foreach=True)
        self.engine.step()
        if self._output_keeper is not None:
            self._output_keeper.clear()
        return out

    def _apo_loss(self, step, z, t, conds, pred, target, masks):
        from apo_fast.loss import apo_loss, beta_schedule

        cfg = self.cfg
        with torch.no_grad():
            ref = self.engine(z, t, conds, reference=True)
        n_beta = t.shape[0] // 2 if cfg.loss.mode == "paired" else t.shape[0]
        beta_t = beta_schedule(t[:n_beta], self.alphas_cumprod, kind=cfg.loss.beta_schedule, beta=cfg.loss.beta)
        out = apo_loss(
            pred,
            ref,
            target.to(pred.dtype),
            beta_t,
            mask=masks.to(pred.dtype),
            lambda_mask=cfg.loss.lambda_mask,
            paired=cfg.loss.mode == "paired",
            lambda_sft=cfg.loss.lambda_sft,
            backend=cfg.loss.backend,
        )
        if not torch.isfinite(out.loss):
            raise FloatingPointError(f"step {step}: the APO loss is {out.loss.item()} (inputs or weights hold NaN/Inf)")
        return out

    # ---- the loop
    def train(self) -> dict:
        from tqdm.auto import tqdm

        from apo_fast.telemetry import Telemetry

        cfg = self.cfg
        if not hasattr(self, "engine"):
            self.setup()
        start = 0
        ckpt = latest_checkpoint(self.out) if self.resume else None
        if ckpt is not None:
            self.engine.load_checkpoint(str(ckpt), tag="state")
            start = json.loads((ckpt / "client_state.json").read_text())["step"]
            log.info("resumed from %s at step %d", ckpt, start)
        is_main = self.rank == 0
        if is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
            for path in remove_stale_checkpoint_files(self.out):
                log.info("removed %s (an unfinished checkpoint of an interrupted run)", path)
        log_path = self.out / "train_log.jsonl"
        records = _read_log(log_path, upto=start) if is_main else []
        if is_main:
            atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in records))
        self.step = start  # the last finished step (the CLI names it when interrupted)
        phase = "plain-LoRA baseline" if cfg.loss.mode == "diffusion" else f"APO ({cfg.loss.mode})"
        if is_main and start < cfg.train.steps:
            log.info("%s training: steps %d-%d into %s", phase, start + 1, cfg.train.steps, self.out)
        bar = tqdm(total=cfg.train.steps, initial=start, desc=phase, disable=not (cfg.train.progress and is_main),
                   dynamic_ncols=True)
        t_last = time.perf_counter()
        samples_since = 0
        with Telemetry(self.device) as tel, open(log_path if is_main else os.devnull, "a") as fh:
            for step in range(start, cfg.train.steps):
                metrics: dict[str, float] = {}
                for micro in range(cfg.train.grad_accum):
                    out = self.micro_step(step, micro)
                    for k, v in out.metrics.items():
                        metrics[k] = metrics.get(k, 0.0) + float(v) / cfg.train.grad_accum
                metrics = average_over_ranks(metrics)  # the global batch's values, logged by rank 0
                samples_since += cfg.train.batch_size * cfg.train.grad_accum * self.world
                rec = {"step": step + 1, **metrics, "lr": self.lr_scheduler.get_last_lr()[0]}
                if (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.steps:
                    now = time.perf_counter()
                    rec["samples_per_s"] = samples_since / max(now - t_last, 1e-9)
                    t_last, samples_since = now, 0
                    rec.update({f"telemetry/{k}": v for k, v in tel.snapshot().items() if isinstance(v, (int, float))})
                if is_main:
                    fh.write(json.dumps(rec) + "\n")
                    fh.flush()
                acc = f" acc {metrics['implicit_acc']:.2f}" if "implicit_acc" in metrics else ""
                bar.set_postfix_str(f"loss {metrics['loss']:.4f}{acc} {tel.postfix()}")
                bar.update(1)
                if (step + 1) % cfg.train.checkpoint_every == 0 or step + 1 == cfg.train.steps:
                    save_checkpoint(self.engine, self.out, step + 1, cfg.train.keep_checkpoints,
                                    {"telemetry": tel.summary()})
                self.step = step + 1
            telemetry = tel.summary()
        bar.close()
        self.export(self.out / "adapters")
        summary = {"steps": cfg.train.steps, "attention": self.attention, "adapted_modules": len(self.adapter_names),
                   "telemetry": telemetry}
        if is_main:
            final = _read_log(log_path)
            summary["final"] = final[-1] if final else {}
            atomic_write_json(self.out / "train_summary.json", summary)
        return summary

    def export(self, path: Path) -> None:
        """Write the adapters (peft/diffusers file) and condition embeddings from rank 0.

        Under ZeRO-3 only what the export reads (adapter weights, a learned gate,
        condition embeddings: :func:`apo_fast.distributed.export_parameters`) is
        gathered from the partitions, never the frozen base UNet.
        """
        from apo_fast.adapters import save_adapters

        model = self.engine.module
        with gathered(export_parameters(model), self.cfg.train.zero_stage):
            if self.rank == 0:
                meta = {"condition_names": json.dumps(self.data.condition_names)}
                save_adapters(model.unet, path, metadata=meta)
                save_conditions(model.conditions, self.data.condition_names, Path(path) / "conditions.safetensors")
        if torch.distributed.is_initialized():
            torch.distributed.barrier()

    def close(self) -> None:
        """Wait for every rank. The process group stays up for later trainers in this
        process; a program ends it with :func:`shutdown_distributed`."""
        if torch.distributed.is_initialized():
            torch.distributed.barrier()


def shutdown_distributed() -> None:
    """Tear down the process group at the end of a program (two-rank gloo runs can abort at
    interpreter exit otherwise).

    Goes through DeepSpeed when it set the group up, so DeepSpeed also drops its cached
    groups and a later trainer in the same process starts cleanly on a new group.
    """
    if not torch.distributed.is_initialized():
        return
    torch.distributed.barrier()
    ds_comm = sys.modules.get("deepspeed.comm.comm")
    if ds_comm is not None and ds_comm.cdb is not None and ds_comm.cdb.is_initialized():
        ds_comm.destroy_process_group()
    else:
        torch.distributed.destroy_process_group()


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
