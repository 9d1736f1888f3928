"""Typed run configuration, loaded from YAML and validated before any work starts.

A config file mirrors :class:`APOConfig`: one mapping per section (``model``,
``data``, ``adapter``, ``loss``, ``optim``, ``train``, ``pretrain``, ``sample``,
``eval``).
Unknown keys, wrong types and out-of-range values raise :class:`ConfigError`
naming the offending key (``train.batch_size``) and what was expected.
"""
from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or out of range."""


@dataclass
class ModelConfig:
    """The diffusion UNet and its noise schedule.

    ``pretrained``: a local diffusers folder or hub id (Stable Diffusion 1.x/2.x/XL);
    the UNet is read from ``subfolder``. Without it the UNet is built from
    ``preset`` (see :mod:`apo_fast.models.presets`) updated by ``unet`` overrides,
    with random weights: nothing is downloaded.
    """

    pretrained: str | None = None
    subfolder: str = "unet"
    revision: str | None = None
    preset: str = "tiny"
    unet: dict = field(default_factory=dict)
    latent: bool = False  # train on VAE latents (needs a VAE from `pretrained` or `vae`)
    vae: str | None = None
    num_train_timesteps: int = 1000
    noise_schedule: str = "squaredcos_cap_v2"  # diffusers beta_schedule name
    prediction_type: str = "epsilon"  # or "v_prediction"
    cond_tokens: int = 4  # tokens per learned condition embedding
    conditions: str | None = None  # safetensors file to initialise condition embeddings from
    # CLIP prompt conditioning (SD checkpoints): with a template, each condition row starts
    # from the text encoder's encoding of its prompt, computed once before training
    # (apo_fast.models.text_encoders); rows found in `conditions` still take precedence.
    prompt_template: str | None = None  # e.g. "a photo of a {product} with {defect}"
    good_prompt_template: str = "a photo of a {product}"
    text_encoder: str | None = None  # diffusers folder with tokenizer/ + text_encoder/ (default: pretrained)
    local_files_only: bool = True


@dataclass
class DataConfig:
    """An MVTec-AD layout dataset and the few-shot split."""

    root: str = "builtin:demo"  # "builtin:demo" is the bundled demo dataset
    category: str = "brick"
    defect_types: list[str] | None = None  # None: every defect type found
    shots: str | int = "third"  # "third" (published split) or a number of images per defect
    image_size: int = 32
    augment: bool = True
    num_workers: int = 0


@dataclass
class GateSettings:
    """Time-aware capacity allocation gate (APO_SPEC "TACA")."""

    kind: str = "rank_prefix"  # rank_prefix | constant | sigmoid | learned
    r_min: int | None = None  # default: max(1, r // 4)
    r_max: int | None = None  # default: r
    temperature: float = 1.0
    hidden: int = 64


@dataclass
class AdapterSettings:
    rank: int = 8
    alpha: float | None = None  # default: rank (scaling 1)
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    gate: GateSettings = field(default_factory=GateSettings)


@dataclass
class LossConfig:
    mode: str = "unpaired"  # unpaired | paired | diffusion (plain LoRA fine-tuning baseline, no preference)
    beta: float = 5000.0
    beta_schedule: str = "dlogsnr"  # dlogsnr | constant | snr
    lambda_mask: float = 2.0
    lambda_sft: float = 0.0
    backend: str = "auto"  # auto | triton | torch


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | adamw8bit | paged_adamw8bit | lion8bit | ds_cpu_adam
    lr: float = 1e-3
    cond_lr: float | None = None  # learning rate of the condition embeddings (default: lr; 0 freezes them)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    max_grad_norm: float = 1.0


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 8  # anomalies per micro-batch (paired mode adds as many normals)
    grad_accum: int = 1
    seed: int = 0
    mixed_precision: str = "no"  # no | fp16 | bf16
    gradient_checkpointing: bool = False
    attention: str = "auto"  # auto | xformers | sdpa
    channels_last: bool = False
    allow_tf32: bool = True
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    # Extra DeepSpeed config entries merged over the generated ones (e.g. zero_optimization:
    # {stage3_param_persistence_threshold: 0, reduce_bucket_size: 5e7}); see docs/distributed.md.
    deepspeed: dict = field(default_factory=dict)
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    progress: bool = True
    # torch CPU threads: "auto" picks from the cores this process may use and the
    # machine's load (apo_fast.threads.choose_threads), or a number >= 1.
    threads: int | str = "auto"


@dataclass
class PretrainConfig:
    """Base-model training on the normal images (``apo-fast pretrain``; the demo's base)."""

    steps: int = 0
    batch_size: int = 16
    lr: float = 2e-3
    uncond_prob: float = 0.1
    warmup_steps: int = 100  # linear warmup, then cosine decay to 0
    ema_decay: float = 0.999  # EMA of the weights, saved as the base (0: save the raw weights)
    checkpoint_every: int = 500  # resumable state (pretrain_state.pt) every N steps
    sample_every: int = 0  # a free-sample grid every N steps (0: only at the end)


@dataclass
class SampleConfig:
    num_inference_steps: int = 25
    scheduler: str = "ddim"  # ddim | ddpm
    s_text: float | list = 3.0  # constant, or [[fraction_of_steps, value], ...] piecewise schedule
    s_align: float | list = 2.0
    num_per_defect: int = 8
    mask_guided: bool = True  # also generate on held-out normal images with a user/real mask
    mask_threshold: float = 0.5  # fraction of the map's maximum
    mask_sigma: float = 1.0  # Gaussian smoothing (pixels of the output)
    seed: int = 1234
    batch_size: int = 8


EVAL_SOURCES = ("none", "cutpaste", "lora", "apo")


@dataclass
class EvalConfig:
    """``apo-fast eval``: generation metrics and the downstream detector test (see :mod:`apo_fast.eval.evaluate`).

    The defaults are the demo-size settings (32 px, a CPU in minutes). Synthetic
    sources: ``none`` (normals only), ``cutpaste``, ``lora`` (plain LoRA
    baseline: constant gate, plain diffusion loss, same base and steps, trained
    into ``lora_run``) and ``apo`` (the run). Generation is guided by the
    training anomalies' masks only, never by held-out data.
    """

    sources: list[str] = field(default_factory=lambda: list(EVAL_SOURCES))
    num_per_defect: int = 16  # synthetic anomalies per defect type and generated source
    guided_fraction: float = 0.5  # share of them generated mask-guided on normal images; the rest free
    guide_normals: str = "train"  # train (train/good) | test_split (first half of test/good, dropped from the test)
    num_inference_steps: int | None = None  # sampling steps for the evaluation (None: sample.num_inference_steps)
    sample_seed: int = 2024
    lora_run: str | None = None  # LoRA-baseline run folder (None: "<run>-lora" beside the APO run)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # one segmenter per source and seed
    segmenter_steps: int = 300
    segmenter_batch_size: int = 8
    segmenter_lr: float = 1e-3
    segmenter_channels: int = 16
    segmenter_depth: int = 3
    segmenter_augment: bool | None = None  # random flips; None: on for texture categories
    generation_metrics: bool = True
    # the fidelity judge (apo_fast.eval.judge): a small classifier trained on the held-out real
    # anomalies and test/good images; right-kind, looks-like-the-product and judge-KID per source
    judge: bool = True
    judge_steps: int = 400
    lpips_net: str = "alex"
    lpips_weights: str | None = None  # LPIPS backbone checkpoint (file or folder); None: torch hub cache
    inception_weights: str | None = None  # Inception-v3 checkpoint (file or folder); None: torch hub cache
    kid_subsets: int = 100
    kid_subset_size: int = 1000  # clamped to the number of images
    num_threads: int = 1  # torch intra-op threads during the evaluation (0: leave torch's setting)
    device: str = "auto"  # auto | cpu | cuda | cuda:N


@dataclass
class APOConfig:
    output_dir: str = "runs/apo"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapter: AdapterSettings = field(default_factory=AdapterSettings)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> "APOConfig":
        validate_config(self)
        return self

    def to_dict(self) -> dict:
        return _to_plain(self)


# --------------------------------------------------------------------------- loading


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    return obj


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted where lossless."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arm, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        arm = args[0] if args else Any
        out = [_coerce(v, arm, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-3 as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key(s) {', '.join(where + u for u in unknown)}; "
            f"{cls.__name__} accepts: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    return cls(**kwargs)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {p} is not a section")
    node[parts[-1]] = value


def config_from_dict(data: dict | None, overrides: list[str] | None = None) -> APOConfig:
    """Build and validate an :class:`APOConfig` from a plain mapping.

    ``overrides`` are ``section.key=value`` strings (value parsed as YAML), as the
    CLI's ``--set`` takes them.
    """
    data = copy.deepcopy(dict(data or {}))  # overrides write into nested sections
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        dotted, raw = item.split("=", 1)
        # `--set key=` (nothing after '=') means the empty string, as `--set key=''` does.
        value = "" if raw.strip() == "" else yaml.safe_load(raw)
        _set_dotted(data, dotted.strip(), value)
    cfg = _build(APOConfig, data)
    return cfg.validate()


def load_config(path: str | Path, overrides: list[str] | None = None) -> APOConfig:
    """Read a YAML config file; errors name the file and the offending key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return config_from_dict(data, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _looks_local(name: str) -> bool:
    """A model name meant as a local path rather than a hub id ("org/name")."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def check_paths(cfg: APOConfig) -> None:
    """Refuse missing data folders and model files with the key named, before any heavy
    import (torch, diffusers, DeepSpeed take tens of seconds to import on a busy machine).

    Hub ids (``org/name``) are left to the loader, which reads only the local cache.
    """
    d, m = cfg.data, cfg.model
    if d.root != "builtin:demo":
        root = Path(d.root).expanduser()
        if not root.is_dir():
            raise ConfigError(f"data.root {d.root!r} is not a folder (expected an MVTec AD layout root)")
        if not (root / d.category).is_dir():
            found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
            raise ConfigError(f"data.category {d.category!r}: no folder {root / d.category}; "
                              f"categories there: {', '.join(found) or 'none'}")
    for key, value in (("model.pretrained", m.pretrained), ("model.vae", m.vae), ("model.text_encoder", m.text_encoder)):
        if value and _looks_local(value) and not Path(value).expanduser().is_dir():
            raise ConfigError(f"{key} {value!r} is not a folder (expected a local diffusers model folder)")
    if m.pretrained and Path(m.pretrained).expanduser().is_dir() and m.subfolder:
        sub = Path(m.pretrained).expanduser() / m.subfolder
        if not sub.is_dir():
            raise ConfigError(f"model.subfolder {m.subfolder!r}: {sub} is not a folder (set model.subfolder= "
                              "to the UNet's folder, or to nothing when model.pretrained is the UNet folder itself)")
    if m.conditions and not Path(m.conditions).expanduser().is_file():
        raise ConfigError(f"model.conditions {m.conditions!r} is not a file (expected a conditions.safetensors)")


def save_config(cfg: APOConfig, path: str | Path) -> None:
    from apo_fast.io_utils import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# --------------------------------------------------------------------------- validation


def _choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value is None:
        return
    if (value < 0) if allow_zero else (value <= 0):
        raise ConfigError(f"{key} must be {'>= 0' if allow_zero else '> 0'}; got {value!r}")


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


def validate_config(cfg: APOConfig) -> None:
    m, d, a, lo, o, t, p, s = cfg.model, cfg.data, cfg.adapter, cfg.loss, cfg.optim, cfg.train, cfg.pretrain, cfg.sample
    _choice("model.prediction_type", m.prediction_type, ("epsilon", "v_prediction"))
    _choice("model.noise_schedule", m.noise_schedule, ("linear", "scaled_linear", "squaredcos_cap_v2"))
    _positive("model.num_train_timesteps", m.num_train_timesteps)
    _positive("model.cond_tokens", m.cond_tokens)
    if m.pretrained is None:
        from apo_fast.models.presets import UNET_PRESETS

        _choice("model.preset", m.preset, tuple(UNET_PRESETS))
    if m.prompt_template is not None:
        from apo_fast.models.text_encoders import check_template

        for key, template in (("model.prompt_template", m.prompt_template),
                              ("model.good_prompt_template", m.good_prompt_template)):
            try:
                check_template(key, template)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if not (m.text_encoder or m.pretrained):
            raise ConfigError("model.prompt_template needs a text encoder: set model.text_encoder or model.pretrained")
    if m.latent and not (m.pretrained or m.vae):
        raise ConfigError("model.latent is true but neither model.pretrained nor model.vae names a VAE")
    _positive("data.image_size", d.image_size)
    if d.image_size % 8:
        raise ConfigError(f"data.image_size must be a multiple of 8; got {d.image_size}")
    if isinstance(d.shots, str):
        _choice("data.shots", d.shots, ("third",))
    else:
        _positive("data.shots", d.shots)
    _positive("adapter.rank", a.rank)
    _positive("adapter.alpha", a.alpha)
    if not 0.0 <= a.dropout < 1.0:
        raise ConfigError(f"adapter.dropout must be in [0, 1); got {a.dropout}")
    if not a.target_modules:
        raise ConfigError("adapter.target_modules must name at least one module")
    _choice("adapter.gate.kind", a.gate.kind, ("rank_prefix", "constant", "sigmoid", "learned"))
    r_min = a.gate.r_min if a.gate.r_min is not None else max(1, a.rank // 4)
    r_max = a.gate.r_max if a.gate.r_max is not None else a.rank
    if not 0 <= r_min <= r_max <= a.rank:
        raise ConfigError(f"adapter.gate needs 0 <= r_min <= r_max <= rank; got r_min={r_min}, r_max={r_max}, rank={a.rank}")
    _positive("adapter.gate.temperature", a.gate.temperature)
    _choice("loss.mode", lo.mode, ("unpaired", "paired", "diffusion"))
    _choice("loss.beta_schedule", lo.beta_schedule, ("dlogsnr", "constant", "snr"))
    _choice("loss.backend", lo.backend, ("auto", "triton", "torch"))
    _positive("loss.beta", lo.beta)
    if lo.lambda_mask < 1.0:
        raise ConfigError(f"loss.lambda_mask must be >= 1 (1 = unweighted); got {lo.lambda_mask}")
    _positive("loss.lambda_sft", lo.lambda_sft, allow_zero=True)
    _choice("optim.name", o.name, ("adamw", "adamw8bit", "paged_adamw8bit", "lion8bit", "ds_cpu_adam"))
    _positive("optim.lr", o.lr)
    _positive("optim.cond_lr", o.cond_lr, allow_zero=True)
    _positive("optim.weight_decay", o.weight_decay, allow_zero=True)
    _positive("optim.max_grad_norm", o.max_grad_norm, allow_zero=True)
    _positive("optim.warmup_steps", o.warmup_steps, allow_zero=True)
    for i, b in enumerate(o.betas):
        if not 0.0 <= b < 1.0:
            raise ConfigError(f"optim.betas[{i}] must be in [0, 1); got {b}")
    _positive("train.steps", t.steps)
    _positive("train.batch_size", t.batch_size)
    _positive("train.grad_accum", t.grad_accum)
    _choice("train.mixed_precision", t.mixed_precision, ("no", "fp16", "bf16"))
    _choice("train.attention", t.attention, ("auto", "xformers", "sdpa"))
    _choice("train.zero_stage", t.zero_stage, (0, 1, 2, 3))
    if t.offload_optimizer and t.zero_stage < 2:
        raise ConfigError("train.offload_optimizer needs train.zero_stage 2 or 3")
    if t.offload_params and t.zero_stage != 3:
        raise ConfigError("train.offload_params needs train.zero_stage 3")
    if o.name == "ds_cpu_adam" and not t.offload_optimizer:
        raise ConfigError("optim.name ds_cpu_adam needs train.offload_optimizer: true (ZeRO-Offload)")
    _positive("train.log_every", t.log_every)
    _positive("train.checkpoint_every", t.checkpoint_every)
    _positive("train.keep_checkpoints", t.keep_checkpoints)
    if not (t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:")):
        raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N; got {t.device!r}")
    if not (t.threads == "auto" or (isinstance(t.threads, int) and t.threads >= 1)):
        raise ConfigError(f"train.threads must be auto or an integer >= 1; got {t.threads!r}")
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
    _positive("sample.num_inference_steps", s.num_inference_steps)
    _choice("sample.scheduler", s.scheduler, ("ddim", "ddpm"))
    _schedule_ok("sample.s_text", s.s_text)
    _schedule_ok("sample.s_align", s.s_align)
    _positive("sample.num_per_defect", s.num_per_defect)
    _positive("sample.batch_size", s.batch_size)
    if not 0.0 < s.mask_threshold < 1.0:
        raise ConfigError(f"sample.mask_threshold must be in (0, 1); got {s.mask_threshold}")
    _positive("sample.mask_sigma", s.mask_sigma, allow_zero=True)
    _validate_eval(cfg.eval)


def _validate_eval(e: EvalConfig) -> None:
    if not e.sources or len(set(e.sources)) != len(e.sources):
        raise ConfigError(f"eval.sources must be a non-empty list without repeats; got {e.sources!r}")
    for i, name in enumerate(e.sources):
        _choice(f"eval.sources[{i}]", name, EVAL_SOURCES)
    _positive("eval.num_per_defect", e.num_per_defect)
    if not 0.0 <= e.guided_fraction <= 1.0:
        raise ConfigError(f"eval.guided_fraction must be in [0, 1]; got {e.guided_fraction}")
    _choice("eval.guide_normals", e.guide_normals, ("train", "test_split"))
    _positive("eval.num_inference_steps", e.num_inference_steps)
    if not e.seeds or len(set(e.seeds)) != len(e.seeds):
        raise ConfigError(f"eval.seeds must be a non-empty list of distinct integers; got {e.seeds!r}")
    for key in ("segmenter_steps", "segmenter_batch_size", "segmenter_channels", "segmenter_depth",
                "kid_subsets", "segmenter_lr", "judge_steps"):
        _positive(f"eval.{key}", getattr(e, key))
    if e.kid_subset_size < 2:
        raise ConfigError(f"eval.kid_subset_size must be >= 2; got {e.kid_subset_size}")
    _choice("eval.lpips_net", e.lpips_net, ("alex", "vgg", "squeeze"))
    _positive("eval.num_threads", e.num_threads, allow_zero=True)
    if not (e.device in ("auto", "cpu", "cuda") or e.device.startswith("cuda:")):
        raise ConfigError(f"eval.device must be auto, cpu, cuda or cuda:N; got {e.device!r}")
