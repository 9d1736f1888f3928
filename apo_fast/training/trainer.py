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
:mod:`apo_fast.training.distributed`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from apo_fast.config import APOConfig, save_config
from apo_fast.io_utils import atomic_write_json, atomic_write_text
from apo_fast.losses import diffusion_loss, loss_mask
from apo_fast.models import (
    build_scheduler,
    build_unet,
    build_vae,
    check_attention,
    pooled_dim,
    resolve_device,
    set_attention,
)
from apo_fast.models.conditions import load_conditions, save_conditions
from apo_fast.models.quantize import quantize_base
from apo_fast.training.checkpoints import (
    _read_log,
    latest_checkpoint,
    remove_stale_checkpoint_files,
    save_checkpoint,
)
from apo_fast.training.distributed import (
    UNetOutputKeeper,
    average_over_ranks,
    build_optimizer,
    check_precision_supported,
    clips_outside_deepspeed,
    deepspeed_config,
    ensure_distributed_env,
    export_parameters,
    gathered,
    rank_device,
    rank_slice,
    register_adapter_params_for_zero3,
)
from apo_fast.training.ema import ParameterEMA, ema_file
from apo_fast.training.model import APOModel
from apo_fast.training.pretrain import lr_at
from apo_fast.training.streaming import (
    augment,
    load_train_data,
    noisy_inputs,
    stream_indices,
)

log = logging.getLogger(__name__)

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
        self.ema = None  # train.ema_decay > 0: the adapters' ParameterEMA (built in setup)
        self.step = 0  # the last finished optimisation step

    # ---- setup
    def setup(self):
        """Refuse what cannot run here, then build the data, the model and the DeepSpeed engine."""
        cfg = self.cfg
        # Everything that can be refused is refused before data, models or ranks are touched.
        check_precision_supported(cfg.train.mixed_precision, self.device)
        check_attention(cfg.train.attention, self.device)
        self.micro_batch = cfg.train.batch_size * (2 if cfg.loss.mode == "paired" else 1)
        ds_config = deepspeed_config(cfg, self.micro_batch)
        self.device = rank_device(self.device)
        torch.manual_seed(cfg.train.seed)
        if self.device.type == "cuda" and cfg.train.allow_tf32:
            # TF32 matmuls/convolutions on Ampere+ (fp32 runs only; a no-op before Ampere).
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self._setup_data()
        model = self._setup_model()
        self._setup_optimizer(model, ds_config)
        return self

    def _setup_data(self) -> None:
        """The training tensors (VAE latents once, for latent models) and the augmentation."""
        from apo_fast.data import category_augment

        cfg = self.cfg
        vae = build_vae(cfg.model)
        self.data = load_train_data(cfg, vae, self.device)
        self.augment_mode = "none"
        if cfg.data.augment:
            self.augment_mode = category_augment(cfg.data.category, self.data.normal_images, log)

    def _setup_model(self) -> APOModel:
        """The UNet with adapters (base frozen) and the condition embeddings, as one module."""
        from apo_fast.adapters import freeze_base, inject_adapters

        cfg = self.cfg
        in_ch = self.data.anomalies.shape[1]
        unet = build_unet(cfg.model, in_channels=in_ch, sample_size=self.data.anomalies.shape[-1], seed=cfg.train.seed)
        if unet.config.in_channels != in_ch:
            raise ValueError(
                f"the UNet takes {unet.config.in_channels} input channels but the data has {in_ch} "
                f"({'latents' if cfg.model.latent else 'pixels'}); set model.latent accordingly"
            )
        self.attention = set_attention(unet, cfg.train.attention, self.device)
        quantize_base(unet, cfg, self.device)
        self.adapter_names = inject_adapters(unet, cfg.adapter)
        freeze_base(unet)  # everything but the adapters (and a learned gate)
        if cfg.train.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        conditions = load_conditions(
            cfg.model.conditions, self.data.condition_names, cfg.model.cond_tokens, unet.config.cross_attention_dim,
            pooled_dim(unet), init=self._prompt_init(unet),
        )
        if cfg.optim.cond_lr == 0:  # frozen conditions: no gradient through the context projections
            conditions.requires_grad_(False)
        # channels_last: the inputs are made channels_last in micro_step and convolutions
        # propagate the layout (cuDNN picks NHWC kernels for a channels_last input). The
        # parameters stay contiguous: DeepSpeed broadcasts and flattens them as byte views.
        model = APOModel(unet, conditions, cfg.data.image_size)
        if cfg.train.compile.enabled:
            model.compile_unet(cfg.train.compile, self.device)
        return model

    def _prompt_init(self, unet):
        """CLIP encodings of the conditions' prompts (``model.prompt_template``), else None."""
        cfg = self.cfg
        if cfg.model.prompt_template is None:
            return None
        from apo_fast.models.text_encoders import prompt_condition_table

        table, pooled_table, prompts = prompt_condition_table(
            cfg.model, self.data.condition_names, cfg.model.cond_tokens, unet.config.cross_attention_dim,
            pooled_dim(unet), self.device,
        )
        log.info("condition embeddings start from the CLIP encodings of %d prompts, e.g. %r", len(prompts) - 1,
                 prompts[-1])
        return table, pooled_table

    def _setup_optimizer(self, model: APOModel, ds_config: dict) -> None:
        """The client optimizer and LR schedule, wrapped by ``deepspeed.initialize``."""
        import deepspeed

        cfg = self.cfg
        self.scheduler = build_scheduler(cfg.model, "ddpm")
        if self.device.type == "cpu":
            # DeepSpeed JIT-builds its CPU ops on first use; build them under a file lock
            # (concurrent runs share the cache) and say so, since it can take minutes.
            from apo_fast.machine import prebuild_deepspeed_cpu_ops

            prebuild_deepspeed_cpu_ops(("ShareMemCommBuilder",) + (("CPUAdamBuilder",) if cfg.optim.name == "ds_cpu_adam" else ()))
        optimizer = build_optimizer(cfg, model)
        o = cfg.optim
        lr_sched = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_at(s, cfg.train.steps, o.warmup_steps, o.lr_schedule)
        )
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
        if cfg.train.ema_decay > 0:  # over what the export reads, each rank over what it holds
            self.ema = ParameterEMA(export_parameters(self.engine.module), cfg.train.ema_decay)
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
            xn, mn = rank_slice(xn, rank, world), torch.zeros_like(masks)
            if cfg.loss.negative == "defect_removed":  # the winner, its defect replaced by product
                xn, mn = torch.lerp(x0, xn, masks), masks
            x0, masks = torch.cat([x0, xn]), torch.cat([masks, mn])
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
        pred = self.engine(z, t, conds, masks=masks.to(z.dtype))
        if pred.shape[-2:] != masks.shape[-2:]:
            masks = F.adaptive_max_pool2d(masks, pred.shape[-2:])  # keep thin defects at latent size
        masks = loss_mask(masks, cfg.loss.mask_weight)
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
        from apo_fast.losses import apo_loss, beta_schedule

        cfg = self.cfg
        if cfg.loss.kind == "margin":  # reference-free: no reference pass (e_ref is reported as e_theta)
            ref = pred.detach()
        else:
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
            loss_type=cfg.loss.kind,
            backend=cfg.loss.backend,
        )
        if not torch.isfinite(out.loss):
            raise FloatingPointError(f"step {step}: the APO loss is {out.loss.item()} (inputs or weights hold NaN/Inf)")
        return out

    # ---- the loop
    def _resume(self) -> int:
        """Load the run folder's last complete checkpoint (when resuming); the step it ended."""
        ckpt = latest_checkpoint(self.out) if self.resume else None
        if ckpt is None:
            return 0
        # A quantized base's packed weights come back as saved, but bitsandbytes keeps their
        # quantization state (absmax, code map) beside them under extra keys that the module's
        # strict loading rejects; the base is rebuilt from the config, so those keys are
        # re-created identically (and the trainable weights are checked below by the resume test).
        strict = self.cfg.model.base_quantization == "none"
        self.engine.load_checkpoint(str(ckpt), tag="state", load_module_strict=strict)
        if self.ema is not None:
            saved_ema = ema_file(ckpt, self.rank)
            if not saved_ema.is_file():
                raise FileNotFoundError(
                    f"{ckpt} holds no EMA of the adapters ({saved_ema.name}): it was written with train.ema_decay=0; "
                    f"resume with train.ema_decay=0 or start a new output_dir")
            self.ema.load(saved_ema)
        state = json.loads((ckpt / "client_state.json").read_text())
        start = state["step"]
        log.info("resumed from %s at step %d", ckpt, start)
        saved, now = state.get("threads"), torch.get_num_threads()
        if saved is not None and saved != now:
            log.warning("the checkpoint was written by a run on %d CPU thread(s) and this one runs on %d: "
                        "the losses will agree to float rounding, not bit for bit (set train.threads=%d or "
                        "--threads %d for an exact continuation)", saved, now, saved, saved)
        return start

    def train(self) -> dict:
        from tqdm.auto import tqdm

        from apo_fast.telemetry import Telemetry

        cfg = self.cfg
        if not hasattr(self, "engine"):
            self.setup()
        start = self._resume()
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
        from apo_fast.models.compile import compile_seconds, mark_step

        t_last = time.perf_counter()
        samples_since = 0
        compile_start = compile_last = compile_seconds()
        with Telemetry(self.device) as tel, open(log_path if is_main else os.devnull, "a") as fh:
            for step in range(start, cfg.train.steps):
                metrics: dict[str, float] = {}
                for micro in range(cfg.train.grad_accum):
                    mark_step(cfg.train.compile)
                    out = self.micro_step(step, micro)
                    for k, v in out.metrics.items():
                        metrics[k] = metrics.get(k, 0.0) + float(v) / cfg.train.grad_accum
                if self.ema is not None:
                    self.ema.update(step)
                metrics = average_over_ranks(metrics)  # the global batch's values, logged by rank 0
                samples_since += cfg.train.batch_size * cfg.train.grad_accum * self.world
                rec = {"step": step + 1, **metrics, "lr": self.lr_scheduler.get_last_lr()[0]}
                if (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.steps:
                    now, compiled = time.perf_counter(), compile_seconds()
                    # step time without the (first-call) compile time, which is logged apart
                    rec["samples_per_s"] = samples_since / max(now - t_last - (compiled - compile_last), 1e-9)
                    if cfg.train.compile.enabled:
                        rec["compile_s"] = compiled - compile_start
                    t_last, samples_since, compile_last = now, 0, compiled
                    rec.update({f"telemetry/{k}": v for k, v in tel.snapshot().items() if isinstance(v, (int, float))})
                if is_main:
                    fh.write(json.dumps(rec) + "\n")
                    fh.flush()
                acc = f" acc {metrics['implicit_acc']:.2f}" if "implicit_acc" in metrics else ""
                bar.set_postfix_str(f"loss {metrics['loss']:.4f}{acc} {tel.postfix()}")
                bar.update(1)
                if (step + 1) % cfg.train.checkpoint_every == 0 or step + 1 == cfg.train.steps:
                    save_checkpoint(self.engine, self.out, step + 1, cfg.train.keep_checkpoints,
                                    {"telemetry": tel.summary(), "threads": torch.get_num_threads()},
                                    None if self.ema is None else lambda d: self.ema.save(ema_file(d, self.rank)))
                self.step = step + 1
            telemetry = tel.summary()
        bar.close()
        self.export(self.out / "adapters")
        summary = {"steps": cfg.train.steps, "attention": self.attention, "adapted_modules": len(self.adapter_names),
                   "telemetry": telemetry}
        if cfg.train.compile.enabled:
            summary["compile_s"] = compile_seconds() - compile_start
        if is_main:
            final = _read_log(log_path)
            summary["final"] = final[-1] if final else {}
            atomic_write_json(self.out / "train_summary.json", summary)
        return summary

    def export(self, path: Path) -> None:
        """Write the adapters (peft/diffusers file) and condition embeddings from rank 0
        (and, with ``adapter.mask_input``, the training masks free samples draw from);
        with ``train.ema_decay`` their moving average, not the last step's weights.

        Under ZeRO-3 only what the export reads (adapter weights, a learned gate,
        condition embeddings: :func:`apo_fast.training.distributed.export_parameters`) is
        gathered from the partitions, never the frozen base UNet.
        """
        from apo_fast.adapters import save_adapters

        model = self.engine.module
        average = self.ema.applied() if self.ema is not None else contextlib.nullcontext()
        with average, gathered(export_parameters(model), self.cfg.train.zero_stage):
            if self.rank == 0:
                meta = {"condition_names": json.dumps(self.data.condition_names)}
                save_adapters(model.unet, path, metadata=meta)
                save_conditions(model.conditions, self.data.condition_names, Path(path) / "conditions.safetensors")
                if self.cfg.adapter.mask_input:  # where free samples draw their defects (sampling.mask_bank)
                    from apo_fast.sampling.mask_bank import MASK_BANK_NAME, save_mask_bank

                    save_mask_bank(Path(path) / MASK_BANK_NAME, self.data.anomaly_masks, self.data.anomaly_conds,
                                   self.data.condition_names, self.augment_mode)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()

    def close(self) -> None:
        """Wait for every rank. The process group stays up for later trainers in this
        process; a program ends it with :func:`shutdown_distributed`."""
        if torch.distributed.is_initialized():
            torch.distributed.barrier()


