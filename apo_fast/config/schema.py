"""The run configuration's sections as typed dataclasses (loaded by :mod:`.loading`,
checked by :mod:`.checks`).

A config file mirrors :class:`APOConfig`: one mapping per section (``model``,
``data``, ``adapter``, ``loss``, ``optim``, ``train``, ``pretrain``, ``sample``,
``eval``). The ``adapter`` section *is* an :class:`~apo_fast.config.adapter.AdapterConfig`
(peft's names: ``r``, ``lora_alpha``, ``target_modules``, ``gate``), the object the
adapters package takes. Unknown keys, wrong types and out-of-range values raise
:class:`ConfigError` naming the offending key (``train.batch_size``) and what was expected.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from apo_fast.config.adapter import AdapterConfig
from apo_fast.config.choices import EVAL_SOURCES

__all__ = [
    "RUN_DEFAULTS", "APOConfig", "CompileConfig", "ConfigError", "DataConfig", "EvalConfig", "LossConfig", "ModelConfig",
    "OptimConfig", "PretrainConfig", "SampleConfig", "TrainConfig", "to_plain",
]


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or out of range."""


# Where a run's default differs from the section class's own default: the run config's
# adapter rank is 8 (the demo's), while AdapterConfig() keeps r=4 for Python callers.
RUN_DEFAULTS: dict[str, dict[str, Any]] = {"adapter": {"r": 8}}


@dataclass
class ModelConfig:
    """The diffusion UNet and its noise schedule.

    ``pretrained``: a local diffusers folder or hub id (Stable Diffusion 1.x/2.x/XL);
    the UNet is read from ``subfolder``. Without it the UNet is built from
    ``preset`` (see :mod:`apo_fast.config.unet_presets`) updated by ``unet`` overrides,
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
    # The frozen base's linear layers in bitsandbytes' NF4 (blocks of 64; base_double_quant also
    # quantizes the absmax) or LLM.int8 format, or fp8 e4m3 with row scales; with nf4 and fp8 the
    # convolutions in fp8 e4m3 too (apo_fast.models.quantize); none: the compute dtype.
    base_quantization: str = "none"
    base_double_quant: bool = False


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
class LossConfig:
    mode: str = "unpaired"  # unpaired | paired | diffusion (plain LoRA fine-tuning baseline, no preference)
    # paired mode's losers: "normal" (a normal image, no mask) | "defect_removed" (the winner with
    # its masked region taken from a normal image, the winner's mask kept: the defect not drawn)
    negative: str = "normal"
    beta: float = 5000.0
    beta_schedule: str = "dlogsnr"  # dlogsnr | constant | snr
    lambda_mask: float = 2.0
    # "pixel": w = 1 + (lambda_mask - 1) * m; "area": m divided by its area fraction first, so a
    # thin crack's region weighs as much as a large hole's; "sqrt_area": by its square root
    # (losses.area_normalized_mask)
    mask_weight: str = "pixel"
    lambda_sft: float = 0.0
    # the preference form (config/choices.LOSS_TYPES; the functional API's loss_type): sigmoid (APO),
    # hinge, ipo, kto (unpaired; every real anomaly desirable), margin (reference-free, paired)
    kind: str = "sigmoid"
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
    lr_schedule: str = "constant"  # after the warmup: constant | cosine (to 0 at train.steps)
    max_grad_norm: float = 1.0


@dataclass
class CompileConfig:
    """``torch.compile`` of the UNet call (``train.compile``, ``sample.compile``); a bare
    ``true`` / ``false`` in a file or ``--set train.compile=true`` means ``enabled``.
    See :mod:`apo_fast.models.compile`."""

    enabled: bool = False
    mode: str = "default"  # default | reduce-overhead (CUDA graphs) | max-autotune | max-autotune-no-cudagraphs
    fullgraph: bool = True  # refuse graph breaks (an error names where) instead of running split graphs
    backend: str = "inductor"  # inductor | aot_eager | eager (debugging)
    # False: one static graph per input shape (a run's shapes are fixed); None: torch's automatic
    # dynamic shapes (a dynamic recompile after a shape change: its CPU backward compile failed
    # in torch 2.13 for the demo UNet, see apo_fast/models/compile.py); True: dynamic at once
    dynamic: bool | None = False


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
    # EMA of the adapters and condition embeddings (0: off); the export (adapters/) holds
    # the average, checkpoints keep it beside the raw weights (docs/method.md).
    ema_decay: float = 0.0
    keep_checkpoints: int = 2
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    progress: bool = True
    # torch CPU threads: "auto" takes OMP_NUM_THREADS where it is set, else picks from the
    # cores this process may use and the machine's load now (apo_fast.machine.choose_threads),
    # or a number >= 1.
    threads: int | str = "auto"
    compile: CompileConfig = field(default_factory=CompileConfig)


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
    resample: int = 1  # RePaint resampling: each step but the last taken this many times (1: off)
    stop_t: int = -1  # end at the first step with t <= stop_t, on its predicted clean image (-1: every step)
    guide_dilate: int = 0  # mask-guided: the region that may change is the mask grown by this many pixels (0: off)
    num_per_defect: int = 8
    mask_guided: bool = True  # also generate on held-out normal images with a user/real mask
    mask_threshold: float = 0.5  # fraction of the map's maximum
    mask_sigma: float = 1.0  # Gaussian smoothing (pixels of the output)
    seed: int = 1234
    batch_size: int = 8
    compile: CompileConfig = field(default_factory=CompileConfig)


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
    # generators trained per generated source: the run itself and generator_seeds - 1 more from
    # its config with train.seed + k (<run>-gen<k>, and its LoRA baseline <run>-gen<k>-lora), so
    # the spread covers the generator's training as well as the detector's
    generator_seeds: int = 2
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
    adapter: AdapterConfig = field(default_factory=lambda: AdapterConfig(**RUN_DEFAULTS["adapter"]))
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> "APOConfig":
        from apo_fast.config.checks import validate_config

        validate_config(self)
        return self

    def to_dict(self) -> dict:
        return to_plain(self)


def to_plain(obj: Any) -> Any:
    """Dataclasses, tuples and dicts as plain YAML/JSON values."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj
