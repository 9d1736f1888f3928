"""Frozen base layers stored in fp8 e4m3 with one fp32 scale per output channel
(``model.base_quantization: fp8`` for linears and convolutions; ``nf4`` for the convolutions,
which bitsandbytes does not quantize).

The weight is kept as the bytes of a ``torch.float8_e4m3fn`` tensor (dtype uint8) and the
scale as the bytes of its fp32 values, so a module-wide cast (``unet.half()``, DeepSpeed's
bf16 engine) leaves both whole, as it leaves bitsandbytes' packed weights and quant states.
``w ~= e4m3(w / scale) * scale`` with ``scale = max|w[row]| / 448`` (e4m3's largest finite
value): a relative error of at most 2^-4 for entries at or above 2^-6 of the scale range
(normal e4m3 numbers), an absolute one of 2^-10 * scale below.

A :class:`Float8Linear` on the Triton path (CUDA, or the interpreter) under a gated adapter
runs in ``apo_fast.kernels.gated_lora_packed`` (FORMAT 3: decoded in the K loop, no
full-precision copy of W). Off it, and for every :class:`Float8Conv2d`, the forward decodes
the weight into the compute dtype for the one call (as kohya's ``--fp8_base`` does).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from apo_fast.ops.gated_lora.packed import FP8_FORMAT, decode_e4m3

__all__ = ["E4M3_MAX", "Float8Conv2d", "Float8Linear", "fp8_available", "fp8_dequantize", "fp8_quantize"]

E4M3_MAX = 448.0


def fp8_available() -> bool:
    """Whether this torch build has the float8 e4m3 dtype (torch >= 2.1)."""
    return hasattr(torch, "float8_e4m3fn")


def _require_fp8() -> None:
    if not fp8_available():
        raise RuntimeError(f"fp8 storage needs torch.float8_e4m3fn (torch >= 2.1); this torch {torch.__version__} "
                           "has none: upgrade torch, or choose model.base_quantization: int8 (bitsandbytes)")


def fp8_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(bytes, scale)``: the e4m3 bytes (uint8, ``weight``'s shape) of ``weight / scale`` and the
    fp32 ``scale`` (one per output channel, dim 0). All-zero rows get scale 1."""
    _require_fp8()
    if not weight.is_floating_point() or weight.dim() < 2:
        raise ValueError(f"fp8_quantize takes a floating-point weight of 2 or more dims, got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        raise ValueError("fp8_quantize: the weight has NaN or infinite entries")
    w = weight.detach().to(torch.float32)
    amax = w.reshape(w.shape[0], -1).abs().amax(1)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    view = (-1,) + (1,) * (w.dim() - 1)
    q = (w / scale.view(view)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.view(torch.uint8), scale


def fp8_dequantize(qbytes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight ``e4m3(bytes) * scale`` (computed in fp32) in ``dtype``: the reference decode."""
    _require_fp8()
    view = (-1,) + (1,) * (qbytes.dim() - 1)
    return (decode_e4m3(qbytes) * scale.to(torch.float32).view(view)).to(dtype)


class _Float8Weight:
    """The shared storage: ``weight`` (uint8 e4m3 bytes, frozen) and ``weight_scale`` (fp32 bytes)."""

    weight_format = FP8_FORMAT

    def _store(self, weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype) -> None:
        qbytes, scale = fp8_quantize(weight)
        self.weight = nn.Parameter(qbytes, requires_grad=False)
        self.register_buffer("weight_scale", scale.contiguous().view(torch.uint8))
        self.bias = (nn.Parameter(bias.detach().to(compute_dtype).clone(), requires_grad=False)
                     if bias is not None else None)

    def _bias_for(self, x: torch.Tensor) -> torch.Tensor | None:
        return self.bias.to(x.dtype) if self.bias is not None else None

    @property
    def scale(self) -> torch.Tensor:
        """The fp32 per-output-channel scales (a view of ``weight_scale``'s bytes)."""
        return self.weight_scale.view(torch.float32)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return fp8_dequantize(self.weight, self.scale, dtype)


class Float8Linear(_Float8Weight, nn.Linear):
    """A frozen ``nn.Linear`` with its weight in fp8 e4m3 and a per-row fp32 scale; the bias
    stays in the compute dtype. ``forward`` decodes the weight into the input's dtype."""

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype = torch.float32) -> None:
        nn.Linear.__init__(self, linear.in_features, linear.out_features, bias=linear.bias is not None,
                           device="meta")
        self._store(linear.weight, linear.bias, compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(x.dtype), self._bias_for(x))


class Float8Conv2d(_Float8Weight, nn.Conv2d):
    """A frozen ``nn.Conv2d`` with its weight in fp8 e4m3 and a per-output-channel fp32 scale;
    the bias stays in the compute dtype. ``forward`` decodes the weight for the one call."""

    def __init__(self, conv: nn.Conv2d, compute_dtype: torch.dtype = torch.float32) -> None:
        nn.Conv2d.__init__(self, conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                           conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, device="meta")
        self._store(conv.weight, conv.bias, compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.dequantized_weight(x.dtype), self._bias_for(x))
