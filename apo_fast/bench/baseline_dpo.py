"""The Diffusion-DPO LoRA training step of diffusers, re-implemented as apo-fast's benchmark baseline.

This follows the approach of diffusers' ``examples/research_projects/diffusion_dpo/
train_diffusion_dpo.py`` (Wallace et al., "Diffusion Model Alignment Using Direct
Preference Optimization"), written here from the published algorithm so that
apo-fast can be measured against it side by side (:mod:`apo_fast.bench.step`):

* setup: the base UNet (and VAE) frozen and cast to the mixed-precision weight
  dtype; a peft LoRA added with ``unet.add_adapter(LoraConfig(r, lora_alpha=r,
  init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v",
  "to_out.0"]))``; under fp16 only the trainable LoRA weights go back to
  float32; optional xformers attention, gradient checkpointing, TF32 and
  bitsandbytes 8-bit AdamW; a diffusers ``get_scheduler`` learning-rate schedule;
* every step: the VAE encodes the pixel pairs (no latent cache; posterior
  samples times ``scaling_factor``), one noise draw and one timestep per pair
  (repeated for winner and loser), ``noise_scheduler.add_noise``; the policy
  pass under autocast (as accelerate wraps a prepared model's forward; outputs
  cast to float32); the eager per-sample MSE loss; the reference pass with
  ``unet.disable_adapters()`` under ``no_grad``, then ``enable_adapters()``;
  ``-logsigmoid(beta_dpo * (ref_diff - model_diff))``; backward (GradScaler
  under fp16), gradient clipping, a plain torch optimizer step, the lr
  schedule step, ``zero_grad``; the logged values read with ``.item()``.

What is left out: the CLIP text encoder (the caller passes precomputed
``encoder_hidden_states``, the text encoder's output that the script recomputes
every step), the image decoding and resizing of its data loader, and
accelerate's process handling (one process, no gradient accumulation).

Example::

    baseline = DiffusionDPOBaseline(unet, DDPMScheduler(), vae, BaselineDPOConfig(rank=16, mixed_precision="bf16"),
                                    device="cuda")
    out = baseline.step(pixel_values, encoder_hidden_states)   # (B, 2*3, H, W), (B, L, D)
    out.logs  # {"loss": ..., "raw_model_loss": ..., "ref_loss": ..., "implicit_acc": ..., "lr": ...}
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "DIFFUSERS_DPO_TARGET_MODULES",
    "BaselineDPOConfig",
    "BaselineStepOutput",
    "DiffusionDPOBaseline",
    "dpo_loss_terms",
]

#: The LoRA target modules of ``train_diffusion_dpo.py``, in its order.
DIFFUSERS_DPO_TARGET_MODULES = ("to_k", "to_q", "to_v", "to_out.0")
MIXED_PRECISIONS = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LOSS_TYPES = ("sigmoid", "hinge")


@dataclass(frozen=True)
class BaselineDPOConfig:
    """The script's training arguments that shape one step (its defaults).

    Attributes:
        rank: LoRA rank (``lora_alpha = rank``, scaling 1).
        beta_dpo: DPO temperature.
        loss_type: ``"sigmoid"`` (default) or ``"hinge"`` (the script's ``ipo``
            branch reads an argument it never defines, so it is not offered).
        learning_rate, adam_beta1, adam_beta2, adam_weight_decay, adam_epsilon:
            the optimizer's settings.
        max_grad_norm: gradient clipping norm.
        lr_scheduler, lr_warmup_steps, max_train_steps: the diffusers lr schedule.
        mixed_precision: ``"no"`` (alias ``"fp32"``), ``"fp16"`` or ``"bf16"``.
        gradient_checkpointing, enable_xformers_memory_efficient_attention,
        use_8bit_adam, allow_tf32: the script's memory and speed flags.
        vae_encode_batch_size: images per VAE encode call.
    """

    rank: int = 4
    beta_dpo: float = 2500.0
    loss_type: str = "sigmoid"
    learning_rate: float = 5e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 500
    max_train_steps: int = 1000
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    enable_xformers_memory_efficient_attention: bool = False
    use_8bit_adam: bool = False
    allow_tf32: bool = False
    vae_encode_batch_size: int = 8
    torch_compile: bool = False  # kohya's --torch_compile: torch.compile the UNet call (graph breaks allowed)
    torch_compile_backend: str = "inductor"

    def __post_init__(self) -> None:
        for name in ("rank", "lr_warmup_steps", "max_train_steps", "vae_encode_batch_size"):
            value = getattr(self, name)
            low = 0 if name == "lr_warmup_steps" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"BaselineDPOConfig.{name} must be an int >= {low}, got {value!r}")
        for name in (
            "beta_dpo",
            "learning_rate",
            "adam_beta1",
            "adam_beta2",
            "adam_weight_decay",
            "adam_epsilon",
            "max_grad_norm",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"BaselineDPOConfig.{name} must be a finite number >= 0, got {value!r}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"BaselineDPOConfig.loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(
                f"BaselineDPOConfig.mixed_precision must be one of {tuple(MIXED_PRECISIONS)}, got {self.mixed_precision!r}"
            )
        for name in (
            "gradient_checkpointing",
            "enable_xformers_memory_efficient_attention",
            "use_8bit_adam",
            "allow_tf32",
        ):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"BaselineDPOConfig.{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype frozen weights are cast to (float32 without mixed precision)."""
        return MIXED_PRECISIONS[self.mixed_precision]

    @property
    def mixed(self) -> bool:
        return self.weight_dtype != torch.float32


@dataclass
class BaselineStepOutput:
    """One baseline step's results.

    Attributes:
        loss: the detached scalar loss (float32).
        logs: the values the script logs each step, read with ``.item()``:
            ``loss``, ``raw_model_loss``, ``ref_loss``, ``implicit_acc``, ``lr``.
        model_pred, ref_pred, target: (2B, C, h, w) float32, only when the step
            was asked to return them (tests), else None.
        timesteps: (2B,) the timesteps used (winners then losers).
    """

    loss: torch.Tensor
    logs: dict[str, float]
    timesteps: torch.Tensor
    model_pred: torch.Tensor | None = None
    ref_pred: torch.Tensor | None = None
    target: torch.Tensor | None = None


def dpo_loss_terms(
    model_pred: torch.Tensor, ref_pred: torch.Tensor, target: torch.Tensor, beta_dpo: float, loss_type: str = "sigmoid"
) -> dict[str, torch.Tensor]:
    """The script's eager Diffusion-DPO loss on precomputed predictions (winners first half).

    Args:
        model_pred, ref_pred, target: (2B, ...) tensors, same shape.
        beta_dpo: temperature.
        loss_type: ``"sigmoid"`` or ``"hinge"``.

    Returns:
        ``loss`` (scalar float32, differentiable w.r.t. ``model_pred``),
        ``raw_model_loss``, ``raw_ref_loss``, ``implicit_acc`` (detached scalars).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if model_pred.shape != target.shape or ref_pred.shape != target.shape:
        raise ValueError(
            f"model_pred {tuple(model_pred.shape)}, ref_pred {tuple(ref_pred.shape)} and target "
            f"{tuple(target.shape)} must have one shape"
        )
    if model_pred.shape[0] % 2:
        raise ValueError(f"the batch must hold winners then losers (even size), got {model_pred.shape[0]}")
    model_diff, raw_model_loss = _policy_terms(model_pred, target)
    with torch.no_grad():
        ref_diff, raw_ref_loss = _reference_terms(ref_pred, target)
    return _final_loss(model_diff, raw_model_loss, ref_diff, raw_ref_loss, beta_dpo, loss_type)


def _per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    err = F.mse_loss(pred.float(), target.float(), reduction="none")
    return err.mean(dim=list(range(1, err.dim())))


def _policy_terms(model_pred, target):
    losses = _per_sample_mse(model_pred, target)
    win, lose = losses.chunk(2)
    return win - lose, 0.5 * (win.mean() + lose.mean())


def _reference_terms(ref_pred, target):
    losses = _per_sample_mse(ref_pred, target)
    win, lose = losses.chunk(2)
    return win - lose, losses.mean()


def _final_loss(model_diff, raw_model_loss, ref_diff, raw_ref_loss, beta_dpo, loss_type):
    logits = ref_diff - model_diff
    if loss_type == "sigmoid":
        loss = -F.logsigmoid(beta_dpo * logits).mean()
    else:
        loss = torch.relu(1 - beta_dpo * logits).mean()
    n = logits.size(0)
    implicit_acc = (logits > 0).sum().float() / n + 0.5 * (logits == 0).sum().float() / n
    return {
        "loss": loss,
        "raw_model_loss": raw_model_loss.detach(),
        "raw_ref_loss": raw_ref_loss.detach(),
        "implicit_acc": implicit_acc.detach(),
    }


class _NoTimer:
    def phase(self, name: str) -> None:
        pass


class DiffusionDPOBaseline:
    """The diffusers Diffusion-DPO LoRA trainer's state and training step.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` without adapters; it is
            frozen, cast to the weight dtype, moved to ``device`` and given the
            peft LoRA (in place).
        noise_scheduler: a diffusers ``DDPMScheduler`` (``add_noise``, and
            ``get_velocity`` for v-prediction).
        vae: a diffusers ``AutoencoderKL`` (frozen and cast here) that encodes
            the pixels every step, or None for a pixel-space UNet (the pixels
            are the model inputs).
        config: :class:`BaselineDPOConfig`.
        device: where the models run.

    Attributes:
        unet, vae, optimizer, lr_scheduler, params_to_optimize, weight_dtype.
    """

    def __init__(
        self,
        unet,
        noise_scheduler,
        vae=None,
        config: BaselineDPOConfig | None = None,
        device: str | torch.device = "cpu",
    ):
        from peft import LoraConfig

        config = BaselineDPOConfig() if config is None else config
        if not isinstance(config, BaselineDPOConfig):
            raise TypeError(f"config must be a BaselineDPOConfig, got {type(config).__name__}")
        if not isinstance(unet, torch.nn.Module) or not hasattr(unet, "add_adapter"):
            raise TypeError(f"unet must be a diffusers UNet2DConditionModel, got {type(unet).__name__}")
        if getattr(unet, "_hf_peft_config_loaded", False):
            raise ValueError("unet already carries adapters; the baseline adds its own LoRA to a plain UNet")
        if not hasattr(noise_scheduler, "add_noise"):
            raise TypeError(f"noise_scheduler must be a diffusers DDPMScheduler, got {type(noise_scheduler).__name__}")
        self.config = config
        self.device = torch.device(device)
        self.weight_dtype = config.weight_dtype
        if self.device.type == "cuda" and config.allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = True  # the script's --allow_tf32
        self.noise_scheduler = noise_scheduler
        self.vae = vae
        unet.requires_grad_(False)
        unet.to(self.device, dtype=self.weight_dtype)
        if vae is not None:
            vae.requires_grad_(False)
            vae.to(self.device, dtype=self.weight_dtype)
        unet.add_adapter(
            LoraConfig(
                r=config.rank,
                lora_alpha=config.rank,
                init_lora_weights="gaussian",
                target_modules=list(DIFFUSERS_DPO_TARGET_MODULES),
            )
        )
        if config.mixed_precision == "fp16":
            for param in unet.parameters():  # only the trainable LoRA weights back to float32
                if param.requires_grad:
                    param.data = param.to(torch.float32)
        if config.enable_xformers_memory_efficient_attention:
            unet.enable_xformers_memory_efficient_attention()
        if config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.unet = unet
        self.unet_call = lambda noisy, t, ehs: self.unet(noisy, t, ehs).sample
        if config.torch_compile:
            from apo_fast.config.schema import CompileConfig
            from apo_fast.models.compile import compile_kwargs

            # As a peft user compiles it: fullgraph off (older peft versions break the graph), and
            # the reference pass through peft's disable_adapters() flag.
            self.unet_call = torch.compile(self.unet_call,
                                           **compile_kwargs(CompileConfig(enabled=True, fullgraph=False,
                                                                          backend=config.torch_compile_backend),
                                                            self.device))
        self.params_to_optimize = [p for p in unet.parameters() if p.requires_grad]
        self.optimizer = self._build_optimizer()
        from diffusers.optimization import get_scheduler

        self.lr_scheduler = get_scheduler(
            config.lr_scheduler,
            optimizer=self.optimizer,
            num_warmup_steps=config.lr_warmup_steps,
            num_training_steps=config.max_train_steps,
        )
        self.scaler = torch.amp.GradScaler(self.device.type) if config.mixed_precision == "fp16" else None
        unet.train()

    def _build_optimizer(self):
        c = self.config
        if c.use_8bit_adam:
            import bitsandbytes as bnb

            optimizer_class = bnb.optim.AdamW8bit
        else:
            optimizer_class = torch.optim.AdamW
        return optimizer_class(
            self.params_to_optimize,
            lr=c.learning_rate,
            betas=(c.adam_beta1, c.adam_beta2),
            weight_decay=c.adam_weight_decay,
            eps=c.adam_epsilon,
        )

    # ------------------------------------------------------------------ forward passes

    def _autocast(self):
        if not self.config.mixed:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.weight_dtype)

    def _unet(self, noisy, timesteps, encoder_hidden_states) -> torch.Tensor:
        """The prepared model's forward: autocast, outputs cast to float32 (accelerate's wrapping)."""
        with self._autocast():
            out = self.unet_call(noisy, timesteps, encoder_hidden_states)
        return out.float() if self.config.mixed else out

    def reference_forward(self, noisy, timesteps, encoder_hidden_states) -> torch.Tensor:
        """The reference prediction: the same UNet with its adapters disabled, under ``no_grad``."""
        self.unet.disable_adapters()
        try:
            with torch.no_grad():
                return self._unet(noisy, timesteps, encoder_hidden_states).detach()
        finally:
            self.unet.enable_adapters()

    @torch.no_grad()
    def encode(self, feed_pixel_values: torch.Tensor) -> torch.Tensor:
        """Model-space inputs of (N, 3, H, W) pixels: VAE posterior samples times the scaling
        factor, encoded ``vae_encode_batch_size`` images at a time; the pixels themselves without a VAE."""
        if self.vae is None:
            return feed_pixel_values
        n = self.config.vae_encode_batch_size
        latents = [
            self.vae.encode(feed_pixel_values[i : i + n]).latent_dist.sample()
            for i in range(0, feed_pixel_values.shape[0], n)
        ]
        return torch.cat(latents, dim=0) * self.vae.config.scaling_factor

    # ------------------------------------------------------------------ the step

    def step(
        self,
        pixel_values: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        *,
        noise: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        timer=None,
        return_predictions: bool = False,
    ) -> BaselineStepOutput:
        """One optimisation step on a batch of B preference pairs.

        Args:
            pixel_values: (B, 2*C, H, W) pixels in [-1, 1], winner's channels then
                loser's (the script's collated batch); any device, cast here.
            encoder_hidden_states: (B, L, D) conditioning of each pair (repeated
                for the losers, as the script repeats the prompt embeddings).
            noise: optional (B, c, h, w) noise per pair in model space (drawn like
                the script otherwise).
            timesteps: optional (B,) int timesteps per pair (drawn otherwise).
            timer: optional object with ``phase(name)``, told when each part of
                the step starts (``data``, ``policy_forward``, ``loss``,
                ``reference_forward``, ``backward``, ``optimizer``, ``other``).
            return_predictions: keep model_pred, ref_pred and target in the output.
        """
        timer = _NoTimer() if timer is None else timer
        self._check_batch(pixel_values, encoder_hidden_states)
        timer.phase("data")
        noisy_model_input, timesteps, encoder_hidden_states, target = self._noised_batch(
            pixel_values, encoder_hidden_states, noise, timesteps)
        timer.phase("policy_forward")
        model_pred = self._unet(noisy_model_input, timesteps, encoder_hidden_states)
        timer.phase("loss")
        model_diff, raw_model_loss = _policy_terms(model_pred, target)
        timer.phase("reference_forward")
        self.unet.disable_adapters()
        try:
            with torch.no_grad():
                ref_pred = self._unet(noisy_model_input, timesteps, encoder_hidden_states).detach()
                timer.phase("loss")
                ref_diff, raw_ref_loss = _reference_terms(ref_pred, target)
        finally:
            self.unet.enable_adapters()
        terms = _final_loss(
            model_diff, raw_model_loss, ref_diff, raw_ref_loss, self.config.beta_dpo, self.config.loss_type
        )
        loss = terms["loss"]
        timer.phase("backward")
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        timer.phase("optimizer")
        self._optimizer_step()
        timer.phase("other")
        logs = {
            "loss": loss.detach().item(),
            "raw_model_loss": terms["raw_model_loss"].item(),
            "ref_loss": terms["raw_ref_loss"].item(),
            "implicit_acc": terms["implicit_acc"].item(),
            "lr": self.lr_scheduler.get_last_lr()[0],
        }
        out = BaselineStepOutput(loss.detach(), logs, timesteps)
        if return_predictions:
            out.model_pred, out.ref_pred, out.target = model_pred.detach().float(), ref_pred.float(), target.float()
        return out

    def _noised_batch(self, pixel_values, encoder_hidden_states, noise, timesteps):
        """The script's data step: VAE latents of winners then losers, one noise and timestep per
        pair, the noised input and the regression target."""
        pixel_values = pixel_values.to(self.device, dtype=self.weight_dtype, non_blocking=True)
        feed_pixel_values = torch.cat(pixel_values.chunk(2, dim=1))
        latents = self.encode(feed_pixel_values)
        bsz = latents.shape[0] // 2
        if noise is None:
            noise = torch.randn_like(latents).chunk(2)[0]
        elif tuple(noise.shape) != (bsz, *latents.shape[1:]):
            raise ValueError(f"noise must have shape {(bsz, *latents.shape[1:])}, got {tuple(noise.shape)}")
        noise = noise.to(latents.device, latents.dtype).repeat(2, 1, 1, 1)
        if timesteps is None:
            timesteps = torch.randint(
                0, self.noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device, dtype=torch.long
            )
        elif tuple(timesteps.shape) != (bsz,) or timesteps.dtype.is_floating_point:
            raise ValueError(
                f"timesteps must be an integer tensor of shape ({bsz},), got {timesteps.dtype} {tuple(timesteps.shape)}"
            )
        timesteps = timesteps.to(latents.device, torch.long).repeat(2)
        noisy_model_input = self.noise_scheduler.add_noise(latents, noise, timesteps)
        encoder_hidden_states = encoder_hidden_states.to(self.device, self.weight_dtype).repeat(2, 1, 1)
        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"unknown prediction type {prediction_type!r}")
        return noisy_model_input, timesteps, encoder_hidden_states, target

    def _optimizer_step(self) -> None:
        """Unscale (fp16), clip, step, schedule, zero the gradients: the script's order."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params_to_optimize, self.config.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad()

    def _check_batch(self, pixel_values, encoder_hidden_states) -> None:
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4 or pixel_values.shape[1] % 2:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise ValueError(f"pixel_values must be a (B, 2*C, H, W) tensor (winner then loser channels), got {shape}")
        if not pixel_values.is_floating_point():
            raise TypeError(f"pixel_values must be a floating-point tensor, got {pixel_values.dtype}")
        if (
            not isinstance(encoder_hidden_states, torch.Tensor)
            or encoder_hidden_states.dim() != 3
            or encoder_hidden_states.shape[0] != pixel_values.shape[0]
        ):
            shape = (
                tuple(encoder_hidden_states.shape)
                if isinstance(encoder_hidden_states, torch.Tensor)
                else type(encoder_hidden_states).__name__
            )
            raise ValueError(f"encoder_hidden_states must have shape ({pixel_values.shape[0]}, L, D), got {shape}")

    def trainable_parameters(self) -> int:
        """Number of trainable (LoRA) elements."""
        return sum(p.numel() for p in self.params_to_optimize)

    def describe(self) -> dict:
        """The configuration as a plain dict, for reports."""
        return {
            **dataclasses.asdict(self.config),
            "trainable_parameters": self.trainable_parameters(),
            "vae": self.vae is not None,
            "device": str(self.device),
        }
