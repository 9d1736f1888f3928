"""Every choice list of the engine, defined once (no torch import: the CLI checks a
config before it loads torch).

The modules that implement a choice import its list from here (the gates, the beta
schedules, the backend switch, the optimizer builder, ...), and the config checks name
the same tuple in their error messages, so a new choice is added in one place.
"""
from __future__ import annotations

# adapters (apo_fast.adapters.gates): how the rank dims are gated by the timestep
GATE_KINDS = ("rank_prefix", "constant", "sigmoid", "learned")
# the modules that get an adapter by default (peft's rule: path suffixes)
DEFAULT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")

# fused ops (apo_fast.ops.backend): Triton kernels or the PyTorch reference
BACKENDS = ("auto", "triton", "torch")

# losses (apo_fast.losses)
LOSS_MODES = ("unpaired", "paired", "diffusion")  # diffusion: the plain LoRA baseline, no preference
LR_SCHEDULES = ("constant", "cosine")  # optim.lr_schedule, after the warmup
LOSS_NEGATIVES = ("normal", "defect_removed")  # paired mode's losers (docs/method.md)
MASK_WEIGHTS = ("pixel", "area", "sqrt_area")  # loss.mask_weight: how the defect mask weights the residual (docs/method.md)
BETA_SCHEDULES = ("dlogsnr", "constant", "snr")
# the preference form (apo_fast.ops.apo_loss.naive.PreferenceForm); diffusers calls it --loss_type
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "kto", "margin")
DPO_CONVENTIONS = ("diffusers", "diffusers_sdxl", "salesforce")  # the public scripts diffusion_dpo_loss reproduces
DIFFUSERS_LOSS_TYPES = ("sigmoid", "hinge", "ipo")  # train_diffusion_dpo.py --loss_type

# models (apo_fast.models)
PREDICTION_TYPES = ("epsilon", "v_prediction")
# storage of the frozen base's linear layers (nf4, int8: bitsandbytes formats; fp8: e4m3 + row
# scales); with nf4 and fp8 the convolutions are stored in fp8 e4m3 too
BASE_QUANTIZATIONS = ("none", "nf4", "int8", "fp8")
NOISE_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")  # diffusers' beta_schedule names
ATTENTION = ("auto", "xformers", "sdpa")
# torch.compile modes (train.compile.mode, sample.compile.mode); reduce-overhead adds CUDA graphs
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")

# training (apo_fast.training)
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit", "lion8bit", "ds_cpu_adam")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
ZERO_STAGES = (0, 1, 2, 3)
DEVICES = ("auto", "cpu", "cuda")  # or cuda:N

# benchmarks (apo_fast.bench): the step benchmark's UNet presets and precisions
BENCH_MODELS = ("tiny", "sd15", "sdxl")
BENCH_PRECISIONS = ("auto", "no", "fp32", "bf16", "fp16")  # auto: bf16 on CUDA, fp32 elsewhere
BENCH_ATTENTION = ("sdpa", "xformers")

# sampling (apo_fast.sampling)
SAMPLE_SCHEDULERS = ("ddim", "ddpm")

# data (apo_fast.data)
SHOTS = ("third",)  # or a number of images per defect type

# evaluation (apo_fast.eval)
EVAL_SOURCES = ("none", "cutpaste", "lora", "apo")
GUIDE_NORMALS = ("train", "test_split")
LPIPS_NETS = ("alex", "vgg", "squeeze")
