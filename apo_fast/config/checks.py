"""The range and consistency checks of a run config, one function per section; each error
names the key and what was expected (``train.batch_size must be > 0; got 0``).
"""
from __future__ import annotations

import string
from typing import TYPE_CHECKING, Any

from apo_fast.config import choices as C
from apo_fast.config.schema import ConfigError

if TYPE_CHECKING:
    from apo_fast.config.schema import APOConfig, EvalConfig

# --------------------------------------------------------------------------- validation


def _choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value is None:
        return
    if (value < 0) if allow_zero else (value <= 0):
        raise ConfigError(f"{key} must be {'>= 0' if allow_zero else '> 0'}; got {value!r}")


def int_at_least(key: str, value: Any, low: int, meaning: str) -> None:
    """ConfigError (a ValueError) unless ``value`` is an int (not a bool) >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{key} must be an int >= {low} ({meaning}); got {value!r}")


def _schedule_ok(key: str, value: Any) -> None:
    if isinstance(value, (int, float)):
        return
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{key} must be a number or a list of [fraction, value] pairs; got {value!r}")
    last = -1.0
    for i, pair in enumerate(value):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(v, (int, float)) for v in pair)):
            raise ConfigError(f"{key}[{i}] must be a [fraction, value] pair of numbers; got {pair!r}")
        if not 0.0 <= pair[0] <= 1.0 or pair[0] <= last:
            raise ConfigError(f"{key}[{i}]: fractions must increase within [0, 1]; got {pair[0]!r}")
        last = pair[0]


PLACEHOLDERS = ("product", "defect")


def check_template(key: str, template: str) -> None:
    """Raise ValueError naming ``key`` unless ``template`` is a non-empty format string
    whose placeholders are among ``{product}`` and ``{defect}``."""
    if not isinstance(template, str) or not template.strip():
        raise ValueError(f"{key} must be a non-empty string; got {template!r}")
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise ValueError(f"{key}={template!r} is not a valid format string: {exc}") from exc
    bad = [f for f in fields if f not in PLACEHOLDERS]
    if bad:
        raise ValueError(f"{key}={template!r} uses placeholder(s) {bad}; only {{product}} and {{defect}} exist")



def validate_config(cfg: APOConfig) -> None:
    """Raise :class:`ConfigError` for the first out-of-range or inconsistent value."""
    _check_model(cfg.model)
    if cfg.model.base_quantization != "none" and cfg.train.zero_stage == 3:
        raise ConfigError(f"model.base_quantization {cfg.model.base_quantization} keeps the frozen base packed, "
                          "which ZeRO-3 cannot partition; use train.zero_stage 0-2 (the base is frozen: ZeRO-1/2 "
                          "partition only what trains)")
    _check_data(cfg.data)
    _check_adapter(cfg)
    _check_loss(cfg.loss)
    _check_optim(cfg.optim, cfg.train)
    _check_train(cfg.train)
    _check_pretrain(cfg.pretrain)
    _check_sample(cfg.sample)
    _check_eval(cfg.eval)


def _check_device(key: str, device: str) -> None:
    if not (device in C.DEVICES or device.startswith("cuda:")):
        raise ConfigError(f"{key} must be auto, cpu, cuda or cuda:N; got {device!r}")


def _check_model(m) -> None:
    _choice("model.prediction_type", m.prediction_type, C.PREDICTION_TYPES)
    _choice("model.noise_schedule", m.noise_schedule, C.NOISE_SCHEDULES)
    _positive("model.num_train_timesteps", m.num_train_timesteps)
    _positive("model.cond_tokens", m.cond_tokens)
    if m.pretrained is None:
        from apo_fast.config.unet_presets import UNET_PRESETS

        _choice("model.preset", m.preset, tuple(UNET_PRESETS))
    if m.prompt_template is not None:
        for key, template in (("model.prompt_template", m.prompt_template),
                              ("model.good_prompt_template", m.good_prompt_template)):
            try:
                check_template(key, template)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if not (m.text_encoder or m.pretrained):
            raise ConfigError("model.prompt_template needs a text encoder: set model.text_encoder or model.pretrained")
    _choice("model.base_quantization", m.base_quantization, C.BASE_QUANTIZATIONS)
    if m.base_double_quant and m.base_quantization != "nf4":
        raise ConfigError("model.base_double_quant is an NF4 option; set model.base_quantization: nf4")
    if m.base_quantization in ("nf4", "int8") and not _installed("bitsandbytes"):
        raise ConfigError(
            f"model.base_quantization: {m.base_quantization} uses bitsandbytes' format, and bitsandbytes is not "
            "installed: pip install bitsandbytes, or choose model.base_quantization: fp8 (no bitsandbytes needed)")
    if m.base_quantization in ("nf4", "fp8") and not _torch_has_float8():
        what = "base" if m.base_quantization == "fp8" else "convolutions"
        raise ConfigError(
            f"model.base_quantization: {m.base_quantization} stores the {what} in fp8 e4m3, which needs "
            f"torch.float8_e4m3fn (torch >= 2.1); this torch {_torch_version()} has none: upgrade torch, or "
            "choose model.base_quantization: int8")
    if m.latent and not (m.pretrained or m.vae):
        raise ConfigError("model.latent is true but neither model.pretrained nor model.vae names a VAE")


def _installed(module: str) -> bool:
    from importlib.util import find_spec

    return find_spec(module) is not None


def _torch_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:
        return "(not installed)"


def _torch_has_float8() -> bool:
    """torch >= 2.1 (its float8 dtypes), read from the installed package's metadata (no torch import here)."""
    parts = _torch_version().split(".")
    try:
        return (int(parts[0]), int(parts[1])) >= (2, 1)
    except (ValueError, IndexError):
        return False


def _check_data(d) -> None:
    _positive("data.image_size", d.image_size)
    if d.image_size % 8:
        raise ConfigError(f"data.image_size must be a multiple of 8; got {d.image_size}")
    if isinstance(d.shots, str):
        _choice("data.shots", d.shots, C.SHOTS)
    else:
        _positive("data.shots", d.shots)


def _check_adapter(cfg: APOConfig) -> None:
    """``AdapterConfig`` / ``GateConfig`` check their own fields when built (ranks, alpha,
    dropout, targets, gate kind and rank range); what is left is where they meet the run."""
    a = cfg.adapter
    if a.gate.num_train_timesteps != cfg.model.num_train_timesteps:
        raise ConfigError(f"adapter.gate.num_train_timesteps ({a.gate.num_train_timesteps}) must equal "
                          f"model.num_train_timesteps ({cfg.model.num_train_timesteps})")


def _check_loss(lo) -> None:
    _choice("loss.mode", lo.mode, C.LOSS_MODES)
    _choice("loss.negative", lo.negative, C.LOSS_NEGATIVES)
    _choice("loss.mask_weight", lo.mask_weight, C.MASK_WEIGHTS)
    _choice("loss.beta_schedule", lo.beta_schedule, C.BETA_SCHEDULES)
    _choice("loss.backend", lo.backend, C.BACKENDS)
    _choice("loss.kind", lo.kind, C.LOSS_TYPES)
    if lo.kind == "kto" and lo.mode != "unpaired":
        raise ConfigError(f"loss.kind kto is unpaired (a label per sample); needs loss.mode unpaired, got {lo.mode!r}")
    if lo.kind == "margin" and lo.mode != "paired":
        raise ConfigError(f"loss.kind margin compares winners with losers; needs loss.mode paired, got {lo.mode!r}")
    _positive("loss.beta", lo.beta)
    if lo.lambda_mask < 1.0:
        raise ConfigError(f"loss.lambda_mask must be >= 1 (1 = unweighted); got {lo.lambda_mask}")
    _positive("loss.lambda_sft", lo.lambda_sft, allow_zero=True)


def _check_optim(o, t) -> None:
    _choice("optim.name", o.name, C.OPTIMIZERS)
    _positive("optim.lr", o.lr)
    _positive("optim.cond_lr", o.cond_lr, allow_zero=True)
    _positive("optim.weight_decay", o.weight_decay, allow_zero=True)
    _positive("optim.max_grad_norm", o.max_grad_norm, allow_zero=True)
    _positive("optim.warmup_steps", o.warmup_steps, allow_zero=True)
    _choice("optim.lr_schedule", o.lr_schedule, C.LR_SCHEDULES)
    for i, b in enumerate(o.betas):
        if not 0.0 <= b < 1.0:
            raise ConfigError(f"optim.betas[{i}] must be in [0, 1); got {b}")
    if o.name == "ds_cpu_adam" and not t.offload_optimizer:
        raise ConfigError("optim.name ds_cpu_adam needs train.offload_optimizer: true (ZeRO-Offload)")


def _check_train(t) -> None:
    _positive("train.steps", t.steps)
    _positive("train.batch_size", t.batch_size)
    _positive("train.grad_accum", t.grad_accum)
    _choice("train.mixed_precision", t.mixed_precision, C.MIXED_PRECISIONS)
    _choice("train.attention", t.attention, C.ATTENTION)
    _choice("train.zero_stage", t.zero_stage, C.ZERO_STAGES)
    if t.offload_optimizer and t.zero_stage < 2:
        raise ConfigError("train.offload_optimizer needs train.zero_stage 2 or 3")
    if t.offload_params and t.zero_stage != 3:
        raise ConfigError("train.offload_params needs train.zero_stage 3")
    _positive("train.log_every", t.log_every)
    _positive("train.checkpoint_every", t.checkpoint_every)
    _positive("train.keep_checkpoints", t.keep_checkpoints)
    _check_device("train.device", t.device)
    if not 0.0 <= t.ema_decay < 1.0:  # the loader has already refused what is not a number
        raise ConfigError(f"train.ema_decay must be in [0, 1) (0: no EMA); got {t.ema_decay!r}")
    if not (t.threads == "auto" or (isinstance(t.threads, int) and t.threads >= 1)):
        raise ConfigError(f"train.threads must be auto or an integer >= 1; got {t.threads!r}")
    _check_compile("train.compile", t.compile)
    if t.compile.enabled and t.zero_stage == 3:
        raise ConfigError("train.compile needs train.zero_stage 0, 1 or 2: ZeRO-3 gathers each layer's "
                          "parameters in module hooks, which a compiled graph does not run")


def _check_compile(key: str, c) -> None:
    _choice(f"{key}.mode", c.mode, C.COMPILE_MODES)
    _choice(f"{key}.backend", c.backend, C.COMPILE_BACKENDS)
    if c.mode != "default" and c.backend != "inductor":
        raise ConfigError(f"{key}.mode {c.mode!r} is an inductor mode; {key}.backend is {c.backend!r}")


def _check_pretrain(p) -> None:
    _positive("pretrain.steps", p.steps, allow_zero=True)
    _positive("pretrain.batch_size", p.batch_size)
    _positive("pretrain.lr", p.lr)
    if not 0.0 <= p.uncond_prob < 1.0:
        raise ConfigError(f"pretrain.uncond_prob must be in [0, 1); got {p.uncond_prob}")
    if not 0.0 <= p.ema_decay < 1.0:
        raise ConfigError(f"pretrain.ema_decay must be in [0, 1); got {p.ema_decay}")
    _positive("pretrain.warmup_steps", p.warmup_steps, allow_zero=True)
    _positive("pretrain.checkpoint_every", p.checkpoint_every)
    _positive("pretrain.sample_every", p.sample_every, allow_zero=True)


def _check_sample(s) -> None:
    _positive("sample.num_inference_steps", s.num_inference_steps)
    _choice("sample.scheduler", s.scheduler, C.SAMPLE_SCHEDULERS)
    _schedule_ok("sample.s_text", s.s_text)
    _schedule_ok("sample.s_align", s.s_align)
    _positive("sample.resample", s.resample)
    int_at_least("sample.stop_t", s.stop_t, -1, "-1: every step")
    int_at_least("sample.guide_dilate", s.guide_dilate, 0, "pixels; 0: off")
    _positive("sample.num_per_defect", s.num_per_defect)
    _positive("sample.batch_size", s.batch_size)
    if not 0.0 < s.mask_threshold < 1.0:
        raise ConfigError(f"sample.mask_threshold must be in (0, 1); got {s.mask_threshold}")
    _positive("sample.mask_sigma", s.mask_sigma, allow_zero=True)
    _check_compile("sample.compile", s.compile)


def _check_eval(e: EvalConfig) -> None:
    if not e.sources or len(set(e.sources)) != len(e.sources):
        raise ConfigError(f"eval.sources must be a non-empty list without repeats; got {e.sources!r}")
    for i, name in enumerate(e.sources):
        _choice(f"eval.sources[{i}]", name, C.EVAL_SOURCES)
    _positive("eval.num_per_defect", e.num_per_defect)
    if not 0.0 <= e.guided_fraction <= 1.0:
        raise ConfigError(f"eval.guided_fraction must be in [0, 1]; got {e.guided_fraction}")
    _choice("eval.guide_normals", e.guide_normals, C.GUIDE_NORMALS)
    _positive("eval.num_inference_steps", e.num_inference_steps)
    if not e.seeds or len(set(e.seeds)) != len(e.seeds):
        raise ConfigError(f"eval.seeds must be a non-empty list of distinct integers; got {e.seeds!r}")
    for key in ("segmenter_steps", "segmenter_batch_size", "segmenter_channels", "segmenter_depth",
                "kid_subsets", "segmenter_lr", "judge_steps"):
        _positive(f"eval.{key}", getattr(e, key))
    int_at_least("eval.generator_seeds", e.generator_seeds, 1, "generators trained per source")
    if e.kid_subset_size < 2:
        raise ConfigError(f"eval.kid_subset_size must be >= 2; got {e.kid_subset_size}")
    _choice("eval.lpips_net", e.lpips_net, C.LPIPS_NETS)
    _positive("eval.num_threads", e.num_threads, allow_zero=True)
    _check_device("eval.device", e.device)
