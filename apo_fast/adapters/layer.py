"""``GatedLoRALinear``: a time-gated LoRA adapter on an ``nn.Linear`` (APO_SPEC "TACA").

The layer keeps peft's layout and is a peft ``LoraLayer`` (a ``BaseTunerLayer``),
so peft and diffusers tooling that walks adapter layers keeps working on it:
``base_layer``; ``lora_A[name]`` / ``lora_B[name]`` (``nn.Linear`` without bias,
``(r, in)`` and ``(out, r)`` weights); ``lora_dropout[name]``; the dicts ``r``,
``lora_alpha`` and ``scaling`` (``lora_alpha / r``); the active adapter(s);
``disable_adapters``; ``merge()`` / ``unmerge()``; ``set_scale`` /
``scale_layer`` / ``unscale_layer`` (diffusers' ``set_adapters`` and
``scale_lora_layers``); state-dict keys ``<path>.lora_A.<name>.weight``.

Its forward is one call of :func:`apo_fast.ops.gated_lora.gated_lora_linear`
(the fused Triton kernel on CUDA) with the per-sample gate that the owning
model's :class:`~apo_fast.adapters.state.GateState` computed from the forward's
``timestep``. Two cases cannot be one fused pass and use the unfused form
``base(x) + scaling * ((dropout(x) A^T) * gate) B^T``: LoRA dropout active in
training (the adapter branch sees a different input than the base matmul), and
the second and later of several simultaneously active adapters.

Dtypes: under ``torch.autocast`` the op runs everything in the autocast dtype.
Without autocast the adapter weights are cast to the input's dtype (e.g. fp32
adapter weights on a bf16 base run in bf16 with fp32 accumulation; gradients
still reach the fp32 parameters), where peft would run the adapter branch in
the adapter's dtype.
"""
from __future__ import annotations

import math
import numbers
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge

from apo_fast.adapters.state import GateState
from apo_fast.ops.backend import use_triton
from apo_fast.ops.gated_lora import gate_rows, gated_lora_linear
from apo_fast.ops.gated_lora.packed import (
    is_fp8_layer,
    fused_packed_format,
    gated_lora_packed_linear,
    packed_base_linear,
)

__all__ = ["GatedLoRALinear", "GatedLoRAConv2d"]

# Per-adapter module dicts and plain dicts of a peft LoraLayer that a conversion carries over.
_MODULE_DICTS = ("lora_A", "lora_B", "lora_dropout", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
_PLAIN_DICTS = ("r", "lora_alpha", "scaling", "use_dora", "use_rslora", "lora_bias", "lora_variant")


def _check_rank_alpha_dropout(r, lora_alpha, lora_dropout) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be an int >= 1, got {r!r}")
    if (
        isinstance(lora_alpha, bool)
        or not isinstance(lora_alpha, numbers.Real)
        or not math.isfinite(lora_alpha)
        or lora_alpha <= 0
    ):
        raise ValueError(f"lora_alpha must be a finite number > 0, got {lora_alpha!r}")
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, numbers.Real) or not 0 <= lora_dropout < 1:
        raise ValueError(f"lora_dropout must be a number in [0, 1), got {lora_dropout!r}")


def _check_base_layer(base_layer, kind: type = nn.Linear) -> None:
    if isinstance(base_layer, BaseTunerLayer):
        raise TypeError(f"base_layer is already an adapter layer ({type(base_layer).__name__})")
    if not isinstance(base_layer, kind):
        raise TypeError(f"base_layer must be an nn.{kind.__name__}, got {type(base_layer).__name__}")
    if kind is nn.Conv2d and base_layer.groups != 1:
        raise TypeError(f"base_layer is a grouped convolution (groups={base_layer.groups}); only groups=1 is supported")
    if not base_layer.weight.is_floating_point() and not is_packed_base(base_layer):
        raise TypeError(
            f"base_layer.weight must be floating point, or a bitsandbytes Linear4bit / Linear8bitLt or an apo_fast "
            f"Float8Linear / Float8Conv2d (model.base_quantization), got {type(base_layer).__name__} with dtype "
            f"{base_layer.weight.dtype}"
        )


def _gated_lora_delta(x, lora_A, lora_B, gate, scaling) -> torch.Tensor:
    """Unfused ``scaling * ((x A^T) * gate[sample]) B^T`` (dropout / extra adapters only)."""
    h = F.linear(x, lora_A)
    if gate is None:
        return F.linear(h, lora_B) * scaling
    if gate.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"gate has {gate.shape[0]} rows but x has {x.shape[0]} samples (leading dim)")
    return F.linear(gate_rows(h, gate, scaling), lora_B)



def is_quantized_linear(module: nn.Module) -> bool:
    """A linear layer whose weight is stored packed (bitsandbytes' 4-bit or 8-bit formats, as
    ``model.base_quantization`` or diffusers' BitsAndBytesConfig leave it, or fp8 e4m3)."""
    weight = getattr(module, "weight", None)
    return isinstance(module, nn.Linear) and weight is not None and not weight.is_floating_point() and (
        type(module).__module__.startswith("bitsandbytes") or is_fp8_layer(module))


def is_packed_base(module: nn.Module) -> bool:
    """A base layer the adapters wrap although its weight is not floating point: a quantized
    linear (:func:`is_quantized_linear`) or an fp8 convolution (``apo_fast.models.fp8``)."""
    return is_quantized_linear(module) or (isinstance(module, nn.Conv2d) and is_fp8_layer(module))


class GatedLoRALinear(nn.Module, LoraLayer):
    """Time-gated LoRA on a frozen ``nn.Linear``, in peft's layout.

    ``y = base(x) + scaling * ((dropout(x) A^T) * k(t_sample)) B^T`` with
    ``x`` of shape ``(S, ..., in)`` (leading dim = samples) and ``y`` of shape
    ``(S, ..., out)``. ``k`` comes from ``gate_state`` (the owning model's
    per-forward gates); ``gate_state=None`` means a constant gate (plain LoRA).

    Args:
        base_layer: the wrapped ``nn.Linear`` (kept as ``self.base_layer``).
        adapter_name: name of the first adapter (peft's ``"default"``).
        r: rank. lora_alpha: scaling numerator (``None``: ``r``, scaling 1).
        lora_dropout: dropout probability on the adapter branch's input.
        gate_state: the model's :class:`GateState`, or ``None``.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"`` | ``None`` for the op.
        init_weights: peft's init (A Kaiming-uniform a=sqrt(5), B zeros).
    """

    _BASE: type = nn.Linear  # the wrapped layer type
    _PEFT_LAYER = "Linear"  # the peft.tuners.lora class that from_peft takes over

    def __init__(
        self,
        base_layer: nn.Linear,
        adapter_name: str = "default",
        r: int = 4,
        lora_alpha: float | None = None,
        lora_dropout: float = 0.0,
        *,
        gate_state: GateState | None = None,
        backend: str | None = None,
        init_weights: bool = True,
    ) -> None:
        _check_base_layer(base_layer, self._BASE)
        if not isinstance(adapter_name, str) or not adapter_name:
            raise ValueError(f"adapter_name must be a non-empty string, got {adapter_name!r}")
        lora_alpha = r if lora_alpha is None else lora_alpha
        _check_rank_alpha_dropout(r, lora_alpha, lora_dropout)
        self._setup(base_layer, gate_state, backend)
        self._active_adapter = adapter_name
        self.create_adapter(adapter_name, r, lora_alpha, lora_dropout, init_weights=init_weights)

    def _setup(self, base_layer: nn.Linear, gate_state, backend) -> None:
        nn.Module.__init__(self)
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self.gate_state = gate_state
        self.backend = backend
        # adapters_disabled's switch as data: 1.0 on, 0.0 off (the reference pass). A compiled
        # graph multiplies the gate by it, so policy and reference passes trace the same code;
        # eager calls skip the adapter branch when it is off (_switched_off mirrors it).
        self.register_buffer("adapter_switch", torch.ones((), device=base_layer.weight.device), persistent=False)
        self._switched_off = False

    @classmethod
    def from_peft(cls, layer, *, gate_state: GateState | None = None, backend: str | None = None) -> "GatedLoRALinear":
        """Take over a ``peft.tuners.lora.Linear``: same base layer, same adapter
        modules and parameter objects (optimizers keep working), same scaling,
        active adapter, disabled and merged state.

        Raises ValueError for what the gated layer does not compute: LoRA
        variants (DoRA, ...), ``lora_bias``, ``fan_in_fan_out``, non-Linear or
        quantized base layers.
        """
        import peft.tuners.lora as peft_lora

        if type(layer) is not getattr(peft_lora, cls._PEFT_LAYER):
            raise TypeError(f"layer must be a peft.tuners.lora.{cls._PEFT_LAYER}, got {type(layer).__name__}")
        base_layer = layer.base_layer
        try:
            _check_base_layer(base_layer, cls._BASE)
        except TypeError as exc:
            raise ValueError(f"cannot convert this peft LoRA layer: {exc}") from exc
        if getattr(layer, "fan_in_fan_out", False):
            raise ValueError("cannot convert a peft LoRA layer with fan_in_fan_out=True")
        variants = sorted(getattr(layer, "lora_variant", {}) or {})
        if variants or any(getattr(layer, "use_dora", {}).values()):
            raise ValueError(f"cannot convert a peft LoRA layer with LoRA variants (DoRA, ...) on adapters {variants}")
        if any(getattr(layer, "lora_bias", {}).values()):
            raise ValueError("cannot convert a peft LoRA layer with lora_bias=True")
        new = cls.__new__(cls)
        new._setup(base_layer, gate_state, backend)
        for name in _MODULE_DICTS:
            if hasattr(layer, name):
                setattr(new, name, getattr(layer, name))
        for name in _PLAIN_DICTS:
            if hasattr(layer, name):
                setattr(new, name, dict(getattr(layer, name)))
        new._active_adapter = layer._active_adapter
        new._disable_adapters = layer._disable_adapters
        new.merged_adapters = list(layer.merged_adapters)
        new.training = layer.training
        if new.merged and gate_state is not None and not gate_state.constant:
            raise ValueError("cannot give a merged LoRA layer a non-constant gate; unmerge it first")
        return new

    def create_adapter(
        self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0, *, init_weights: bool = True
    ) -> None:
        """Add adapter ``adapter_name`` (rank ``r``, scaling ``lora_alpha / r``) on the base layer's device/dtype."""
        _check_rank_alpha_dropout(r, lora_alpha, lora_dropout)
        if adapter_name in self.lora_A:
            raise ValueError(f"adapter {adapter_name!r} already exists in this layer")
        base = self.get_base_layer()
        # a quantized base (packed uint8/int8 weight): the adapter in the layer's compute dtype
        dtype = base.weight.dtype if base.weight.is_floating_point() else (
            getattr(base, "compute_dtype", None) or (base.bias.dtype if base.bias is not None else torch.float32))
        factory = {"device": base.weight.device, "dtype": dtype}
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / r
        self.use_rslora[adapter_name] = False
        self.use_dora[adapter_name] = False
        self.lora_bias[adapter_name] = False
        self.lora_dropout[adapter_name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.lora_A[adapter_name], self.lora_B[adapter_name] = self._adapter_modules(base, r, factory)
        if init_weights:
            nn.init.kaiming_uniform_(self.lora_A[adapter_name].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[adapter_name].weight)

    def _adapter_modules(self, base: nn.Module, r: int, factory: dict) -> tuple[nn.Module, nn.Module]:
        """The down (``A``) and up (``B``) projection modules of one adapter."""
        return (nn.Linear(self.in_features, r, bias=False, **factory),
                nn.Linear(r, self.out_features, bias=False, **factory))

    # -- gate ---------------------------------------------------------------
    @property
    def gate_is_constant(self) -> bool:
        return self.gate_state is None or self.gate_state.constant

    def current_gate(self, rank: int) -> torch.Tensor | None:
        """The ``(S, rank)`` gate of the model forward in progress, or ``None`` (constant).

        While compiling, the gate times :attr:`adapter_switch` (a ``(1, rank)`` gate for a
        constant one): switching the adapters off for the reference pass is then a value,
        not a traced branch. The switched-off contribution is exactly zero (``0 * h``,
        for finite adapter weights), so both forms give the same output."""
        gate = None if self.gate_state is None else self.gate_state.gate_for(rank)
        if not torch.compiler.is_compiling():
            return gate
        switch = self.adapter_switch.to(torch.float32)
        return switch.reshape(1, 1).expand(1, rank) if gate is None else gate * switch

    def set_switch(self, on: bool) -> None:
        """Switch the adapter branch on or off as data (see :func:`adapters_disabled`)."""
        self.adapter_switch.fill_(1.0 if on else 0.0)
        self._switched_off = not on

    # -- forward --------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs:
            raise TypeError(
                f"{type(self).__name__}.forward takes only the input tensor (peft's mixed-batch `adapter_names` "
                f"is not supported); got extra arguments {list(kwargs) or len(args)}"
            )
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self._base_forward(x)
        if self.merged:
            return self.base_layer(x)
        names = [name for name in self.active_adapters if name in self.lora_A]
        if not names or (not torch.compiler.is_compiling() and self._switched_off):
            return self._base_forward(x)
        for name in names:
            if name in self.lora_variant:
                raise ValueError(f"adapter {name!r} uses a LoRA variant, which {type(self).__name__} does not compute")
        return self._adapted_forward(x, names)

    def _adapted_forward(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        """The base layer plus the active adapters ``names`` (not merged, not disabled)."""
        autocasting = torch.is_autocast_enabled(x.device.type)
        base = self.base_layer
        result = None
        for index, name in enumerate(names):
            lora_A = self.lora_A[name].weight
            lora_B = self.lora_B[name].weight
            if not autocasting:
                lora_A, lora_B = lora_A.to(x.dtype), lora_B.to(x.dtype)
            gate = self.current_gate(self.r[name])
            dropout = self.lora_dropout[name]
            dropout_active = isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0
            scaling = self.scaling[name]
            if index == 0 and not dropout_active and base.weight.is_floating_point():
                result = gated_lora_linear(
                    x, base.weight, base.bias, lora_A, lora_B, gate, scaling, backend=self.backend
                )
                continue
            if index == 0 and not dropout_active and self._fused_packed(x, base):
                result = gated_lora_packed_linear(x, base, lora_A, lora_B, gate, scaling)
                continue
            if result is None:
                result = base(x)
            result = result + _gated_lora_delta(dropout(x), lora_A, lora_B, gate, scaling)
        return result

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base alone (the reference pass): a packed base on the Triton path goes through the
        kernel the policy pass uses, so both passes see the same base, bit for bit."""
        base = self.base_layer
        if self._fused_packed(x, base):
            return packed_base_linear(x, base)
        return base(x)

    def _fused_packed(self, x: torch.Tensor, base) -> bool:
        """A packed base (NF4 without double quantization, or int8 weights) on the Triton path:
        the dequantize-in-the-K-loop kernel (apo_fast.ops.gated_lora.packed)."""
        return (not base.weight.is_floating_point() and use_triton(x, override=self.backend)
                and fused_packed_format(base) is not None)

    # -- merging (constant gate only) -------------------------------------------
    def _refuse_quantized_merge(self) -> None:
        if not self.base_layer.weight.is_floating_point():
            raise ValueError("cannot merge an adapter into a quantized base layer (its weight is stored packed); "
                             "keep it unmerged, or merge into an unquantized copy of the base")

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``scaling * B A`` of shape (out, in), in the base weight's dtype."""
        weight_A = self.lora_A[adapter].weight
        weight_B = self.lora_B[adapter].weight
        dtype = self.get_base_layer().weight.dtype
        upcast = weight_A.device.type == "cpu" and weight_A.dtype in (torch.float16, torch.bfloat16)
        if upcast:
            weight_A, weight_B = weight_A.float(), weight_B.float()
        return ((weight_B @ weight_A) * self.scaling[adapter]).to(dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add ``scaling * B A`` of the active (or given) adapters into the base weight.

        Only for a constant gate: a timestep gate differs per sample.
        """
        self._refuse_quantized_merge()
        if not self.gate_is_constant:
            raise ValueError("cannot merge a time-gated adapter: its gate differs per timestep (constant gate only)")
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.lora_A:
                continue
            weight = self.get_base_layer().weight
            delta = self.get_delta_weight(name)
            if safe_merge:
                merged = weight.data + delta
                if not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs detected in the merged weights; adapter {name!r} seems broken")
                weight.data = merged
            else:
                weight.data += delta
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract the merged adapters from the base weight again."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.lora_A:
                self.get_base_layer().weight.data -= self.get_delta_weight(name)

    def __repr__(self) -> str:
        return "taca." + super().__repr__()


class GatedLoRAConv2d(GatedLoRALinear):
    """Time-gated LoRA on a frozen ``nn.Conv2d`` (groups 1), in peft's ``lora.Conv2d`` layout.

    ``y = base(x) + B(scaling * k(t_sample) * A(dropout(x)))``: ``A`` is a
    convolution with the base layer's kernel size, stride, padding, dilation
    and padding mode to ``r`` channels (weight ``(r, in, kh, kw)``), ``B`` a
    1x1 convolution back (weight ``(out, r, 1, 1)``); the gate multiplies the
    ``r`` channels of each sample. Everything else (adapter dicts, scaling,
    enable/disable, merge for a constant gate, peft/diffusers file keys,
    :func:`convert_peft_to_gated`) is as for :class:`GatedLoRALinear`.

    A pointwise convolution (1x1 kernel, stride 1, no padding or dilation, e.g.
    SD 1.5's ``proj_in``/``proj_out``) is a linear layer over the pixels: it runs
    as one :func:`~apo_fast.ops.gated_lora.gated_lora_linear` call on the
    ``(S, H*W, C)`` pixel view (the fused Triton kernel on CUDA; a free view for
    a ``channels_last`` input) with :class:`GatedLoRALinear`'s dtype rules, and
    returns a ``channels_last``-strided output. Other kernels (and LoRA dropout
    in training, or several active adapters) run on PyTorch convolutions; there,
    as in peft, the adapter branch runs in the adapter weights' dtype and is cast
    back to the base output's dtype.
    """

    _BASE = nn.Conv2d
    _PEFT_LAYER = "Conv2d"

    def _adapter_modules(self, base: nn.Conv2d, r: int, factory: dict) -> tuple[nn.Module, nn.Module]:
        down = nn.Conv2d(base.in_channels, r, base.kernel_size, base.stride, base.padding, base.dilation,
                         bias=False, padding_mode=base.padding_mode, **factory)
        return down, nn.Conv2d(r, base.out_channels, 1, 1, bias=False, **factory)

    @property
    def pointwise(self) -> bool:
        """Whether the base convolution is a per-pixel linear map (1x1, stride 1, unpadded)."""
        base = self.get_base_layer()
        return (tuple(base.kernel_size) == (1, 1) and tuple(base.stride) == (1, 1)
                and base.padding in ((0, 0), "valid") and tuple(base.dilation) == (1, 1))

    def _adapted_forward(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        dropout = self.lora_dropout[names[0]]
        dropout_active = isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0
        if (self.pointwise and len(names) == 1 and not dropout_active and x.dim() == 4
                and self.base_layer.weight.is_floating_point()):  # an fp8 base convolution decodes in its forward
            return self._pointwise_forward(x, names[0])
        result = self.base_layer(x)
        out_dtype = result.dtype
        for name in names:
            down, up = self.lora_A[name], self.lora_B[name]
            h = down(self.lora_dropout[name](x.to(down.weight.dtype)))  # (S, r, H', W')
            gate = self.current_gate(self.r[name])
            if gate is None:
                h = h * self.scaling[name]
            else:
                if gate.shape[0] not in (1, h.shape[0]):
                    raise ValueError(f"gate has {gate.shape[0]} rows but x has {h.shape[0]} samples (leading dim)")
                h = h * (gate.to(h.dtype) * self.scaling[name])[:, :, None, None]
            result = result + up(h).to(out_dtype)
        return result

    def _pointwise_forward(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """A 1x1 convolution with its adapter as one gated linear op over the pixels."""
        base = self.get_base_layer()
        S, C, H, W = x.shape
        lora_A = self.lora_A[name].weight.flatten(1)  # (r, C)
        lora_B = self.lora_B[name].weight.flatten(1)  # (out, r)
        if not torch.is_autocast_enabled(x.device.type):
            lora_A, lora_B = lora_A.to(x.dtype), lora_B.to(x.dtype)
        pixels = x.permute(0, 2, 3, 1).reshape(S, H * W, C)  # a view when x is channels_last
        y = gated_lora_linear(pixels, base.weight.flatten(1), base.bias, lora_A, lora_B,
                              self.current_gate(self.r[name]), self.scaling[name], backend=self.backend)
        return y.reshape(S, H, W, -1).permute(0, 3, 1, 2)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``scaling * B A`` as a ``(out, in, kh, kw)`` kernel, in the base weight's dtype."""
        weight_A = self.lora_A[adapter].weight
        weight_B = self.lora_B[adapter].weight
        dtype = self.get_base_layer().weight.dtype
        if weight_A.device.type == "cpu" and weight_A.dtype in (torch.float16, torch.bfloat16):
            weight_A, weight_B = weight_A.float(), weight_B.float()
        delta = (weight_B.flatten(1) @ weight_A.flatten(1)).reshape(self.get_base_layer().weight.shape)
        return (delta * self.scaling[adapter]).to(dtype)
