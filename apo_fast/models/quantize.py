"""A frozen base stored in fewer bits (``model.base_quantization``): the UNet's linear layers as
bitsandbytes' own ``Linear4bit`` (NF4, blocks of 64, fp32 absmax, optionally double-quantized)
or ``Linear8bitLt`` (LLM.int8 row-wise), so a UNet that diffusers loaded with
``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`` is the same thing, or
in fp8 e4m3 with a per-row fp32 scale (``fp8``, :mod:`apo_fast.models.fp8`; no bitsandbytes
needed). With ``nf4`` or ``fp8`` the convolutions (which bitsandbytes does not quantize) are
stored in fp8 e4m3 with a per-output-channel scale too; norms and biases keep the compute
dtype.

The adapters then wrap the quantized layers; the reference pass (adapters off) runs the same
packed base, so policy and reference see one base. On the Triton path (CUDA, or the
interpreter) every quantized linear (NF4 with or without double quantization, int8, fp8)
runs the base matmuls of the forward and of dx in ``apo_fast.kernels.gated_lora_packed``,
which dequantizes the packed weight inside the K loop (no full-precision copy of W is
written; int8 there is weight-only: the activations stay in the compute dtype); off it
bitsandbytes' own matmul (or the fp8 layer's decode) plus the PyTorch low-rank branch run.

bitsandbytes 0.50.2's CPU ``dequantize_4bit`` (and its CPU ``Linear4bit`` forward) misdecodes
weights whose in_features is a multiple of 16 but not of 64 (measured for 32 and 48: every
block read with the first absmax); the Triton kernel follows the format
(``tests/ops/gated_lora/test_nf4.py``). SD-scale layers (in_features 320, 640, 768, 1280, ...)
are multiples of 64.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from apo_fast.config.choices import BASE_QUANTIZATIONS

__all__ = ["NF4_BLOCKSIZE", "quantize_base", "quantize_convs", "quantize_linears", "quantized_bytes"]

log = logging.getLogger(__name__)

NF4_BLOCKSIZE = 64  # bitsandbytes' default and diffusers' BitsAndBytesConfig's


def _bitsandbytes():
    try:
        import bitsandbytes as bnb
    except ImportError as exc:  # pragma: no cover - bitsandbytes is a dependency
        raise ImportError("model.base_quantization needs bitsandbytes (pip install bitsandbytes); "
                          "set model.base_quantization: none to keep the base in the compute dtype") from exc
    return bnb


def _quantized(linear: nn.Linear, kind: str, double_quant: bool, compute_dtype: torch.dtype) -> nn.Module:
    if kind == "fp8":
        from apo_fast.models.fp8 import Float8Linear

        return Float8Linear(linear, compute_dtype)
    bnb = _bitsandbytes()
    weight = linear.weight.data.detach().to(torch.float32).clone()
    device = linear.weight.device
    if kind == "nf4":
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=double_quant,
                              device="meta")
        q.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=double_quant,
                                     blocksize=NF4_BLOCKSIZE)
    else:
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                has_fp16_weights=False, threshold=0.0, device="meta")
        q.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.detach().to(compute_dtype).clone(), requires_grad=False)
    return q.to(device)  # bitsandbytes quantizes on the move to a device


def quantize_linears(model: nn.Module, kind: str, *, double_quant: bool = False,
                     compute_dtype: torch.dtype = torch.float32, whole_blocks_per_row: bool = False) -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` (before adapters are injected) by its ``kind``
    form (``nf4`` | ``int8``: bitsandbytes'; ``fp8``: :class:`~apo_fast.models.fp8.Float8Linear`),
    in place; returns the replaced module paths.

    Layers NF4 cannot hold (a weight whose element count is not a multiple of its 64-element
    blocks) stay in the compute dtype, said in the log; with ``whole_blocks_per_row`` (what
    :func:`quantize_base` sets on the CPU) so do NF4 layers whose in_features is not a multiple
    of 64, which bitsandbytes 0.50.2's CPU kernels misdecode (training) or fail on (its
    no-grad forward: ``shape '[n, 0]' is invalid``). Raises ValueError for an unknown
    ``kind``, ImportError without bitsandbytes (nf4, int8) and RuntimeError for fp8 on a torch
    without float8 dtypes.
    """
    if kind not in BASE_QUANTIZATIONS or kind == "none":
        raise ValueError(f"kind must be one of {tuple(k for k in BASE_QUANTIZATIONS if k != 'none')}, got {kind!r}")
    replaced, kept = [], []
    for path, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            if type(child) is not nn.Linear:
                continue
            full = f"{path}.{name}" if path else name
            if kind == "nf4" and (child.weight.numel() % NF4_BLOCKSIZE
                                  or (whole_blocks_per_row and child.in_features % NF4_BLOCKSIZE)):
                kept.append(full)
                continue
            setattr(module, name, _quantized(child, kind, double_quant, compute_dtype))
            replaced.append(full)
    if kept:
        log.info("base quantization %s: %d linear layer(s) kept in %s (weight%s not a multiple of %d elements), "
                 "e.g. %s", kind, len(kept), str(compute_dtype).replace("torch.", ""),
                 " or, on the CPU, a row" if whole_blocks_per_row else "", NF4_BLOCKSIZE, kept[0])
    return replaced


def quantize_convs(model: nn.Module, compute_dtype: torch.dtype = torch.float32) -> list[str]:
    """Replace every ``nn.Conv2d`` of ``model`` by a :class:`~apo_fast.models.fp8.Float8Conv2d`
    (e4m3 weight, per-output-channel fp32 scale), in place; returns the replaced paths."""
    from apo_fast.models.fp8 import Float8Conv2d

    replaced = []
    for path, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Conv2d:
                setattr(module, name, Float8Conv2d(child, compute_dtype))
                replaced.append(f"{path}.{name}" if path else name)
    return replaced


def _stored_bytes(module: nn.Module) -> int:
    """Parameter and buffer bytes (the fp8 scales are buffers)."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def quantize_base(unet: nn.Module, cfg, device: torch.device) -> list[str]:
    """``cfg.model.base_quantization`` applied to a freshly built UNet (before the adapters), on
    ``device``, with the compute dtype of ``cfg.train.mixed_precision`` (the convolutions in fp8
    for ``nf4`` and ``fp8``); logs the weight bytes and returns the replaced layers' paths."""
    kind = cfg.model.base_quantization
    if kind == "none":
        return []
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.mixed_precision, torch.float32)
    before = _stored_bytes(unet)
    unet.to(device)
    names = quantize_linears(unet, kind, double_quant=cfg.model.base_double_quant, compute_dtype=compute,
                             whole_blocks_per_row=torch.device(device).type == "cpu")
    convs = quantize_convs(unet, compute) if kind in ("nf4", "fp8") else []
    after = _stored_bytes(unet)
    log.info("frozen base: %d linear layers in %s%s, %d convolutions in %s; UNet weights %.1f MB -> %.1f MB",
             len(names), kind, " (double-quantized absmax)" if cfg.model.base_double_quant else "", len(convs),
             "fp8 e4m3" if convs else str(compute).replace("torch.", ""), before / 2**20, after / 2**20)
    return names + convs


def quantized_bytes(numel: int, out_features: int, kind: str, double_quant: bool = False) -> int:
    """Bytes a linear weight of ``numel`` elements takes in ``kind`` (the memory planner's count):
    NF4 packs two codes per byte plus an fp32 absmax per 64-element block (an 8-bit absmax plus a
    second-level fp32 absmax per 256 blocks when double-quantized); int8 and fp8 one byte per
    element plus an fp32 scale per output row (channel, for a convolution)."""
    if kind == "nf4":
        blocks = -(-numel // NF4_BLOCKSIZE)
        absmax = blocks + 4 * -(-blocks // 256) if double_quant else 4 * blocks
        return -(-numel // 2) + absmax
    if kind in ("int8", "fp8"):
        return numel + 4 * out_features
    raise ValueError(f"kind must be nf4, int8 or fp8, got {kind!r}")
