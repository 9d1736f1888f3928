"""The defect mask as a spatial input of the policy (``adapter.mask_input``).

A diffusion UNet conditioned only on a defect *kind* does not know *where* the defect
goes: mask-guided sampling tells it only through the RePaint blend of the region outside
the mask, and at the demo's 32 px the frozen full-resolution layers carry no adapter at
all, so thin defects (cracks, scratches) were never drawn inside their masks
(``docs/fidelity.md``). This adapter gives the policy the mask itself, ControlNet-style:

    h = conv_in(z_t) + P(silu(E(m)))        m: (B, 1, H, W) in [0, 1]

``E`` (1 -> hidden, 3x3) and ``P`` (hidden -> conv_in's channels, 3x3, zero-initialised)
have no bias, so an all-zero mask (or none) adds exactly nothing and the policy starts
equal to the reference. The mask is resized to conv_in's output by max-pooling (a thin
defect survives a latent's 8x downsampling) or nearest upsampling.

The mask reaches the layer as a keyword of the UNet call, ``unet(z, t, ..., apo_mask=m)``:
a forward pre-hook on the UNet takes it out of the keywords (diffusers' forward never
sees it) and a forward hook on ``conv_in`` adds the branch. Like the LoRA layers the
branch is off inside :func:`apo_fast.adapters.adapters_disabled` (the reference pass),
and a call without ``apo_mask`` runs the UNet unchanged.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MASK_KWARG", "MASK_MODULE_NAME", "MaskInput", "attach_mask_input", "get_mask_input", "resize_mask"]

#: attribute name of the mask branch on a model (a registered submodule).
MASK_MODULE_NAME = "apo_mask_input"
#: keyword of the UNet call that carries the mask.
MASK_KWARG = "apo_mask"


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 1, H, W) -> (B, 1, *size): max-pool down (thin defects survive), nearest up."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    if mask.shape[-2] >= size[0] and mask.shape[-1] >= size[1]:
        return F.adaptive_max_pool2d(mask, size)
    return F.interpolate(mask, size=size, mode="nearest")


class MaskInput(nn.Module):
    """``m (B, 1, H, W) -> (B, out_channels, h, w)``, added to the UNet's ``conv_in`` output.

    Attributes:
        enabled: False inside ``adapters_disabled`` (the reference pass adds nothing).
    """

    def __init__(self, out_channels: int, hidden: int = 32, time_dim: int = 0) -> None:
        super().__init__()
        if not isinstance(out_channels, int) or out_channels < 1:
            raise ValueError(f"out_channels must be an int >= 1, got {out_channels!r}")
        if not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 1:
            raise ValueError(f"hidden must be an int >= 1, got {hidden!r}")
        if not isinstance(time_dim, int) or isinstance(time_dim, bool) or time_dim < 0:
            raise ValueError(f"time_dim must be an int >= 0 (0: no time input), got {time_dim!r}")
        self.hidden = hidden
        self.out_channels = out_channels
        self.time_dim = time_dim
        # plain parameters of this module (no child convolutions): its forward reads only its own
        # weights, so ZeRO-3 gathers them with the module and never has to discover them
        self.encode_weight = nn.Parameter(torch.empty(hidden, 1, 3, 3))
        self.project_weight = nn.Parameter(torch.empty(out_channels, hidden, 3, 3))
        for weight in (self.encode_weight, self.project_weight):  # nn.Conv2d's init, same random draws
            nn.init.kaiming_uniform_(weight, a=5 ** 0.5)
        nn.init.zeros_(self.project_weight)  # the policy starts as the reference
        if time_dim:
            # hidden features scaled per channel by 1 + W emb(t): zero W starts time-independent
            self.time_weight = nn.Parameter(torch.zeros(hidden, time_dim))
        self.enabled = True
        self._pending: list[torch.Tensor | None] = []
        self._emb: list[torch.Tensor] = []  # the UNet's time embedding of the call (time_dim > 0)

    def forward(self, mask: torch.Tensor, size: tuple[int, int], emb: torch.Tensor | None = None) -> torch.Tensor:
        """The branch for masks (B, 1, H, W) at conv_in's ``size``; with a time input, ``emb`` is
        the UNet's time embedding (B, time_dim) of the same call."""
        mask = resize_mask(mask.to(self.encode_weight.dtype), size)
        hidden = F.silu(F.conv2d(mask, self.encode_weight, padding=1))
        if self.time_dim:
            if emb is None or tuple(emb.shape) != (mask.shape[0], self.time_dim):
                got = None if emb is None else tuple(emb.shape)
                raise ValueError(f"the mask input's time embedding must be ({mask.shape[0]}, {self.time_dim}), got {got}")
            scale = 1 + emb.to(self.time_weight.dtype) @ self.time_weight.t()
            hidden = hidden * scale[:, :, None, None]
        return F.conv2d(hidden, self.project_weight, padding=1)

    # -- hooks ---------------------------------------------------------------
    def take_mask(self, sample: torch.Tensor, kwargs: dict) -> None:
        """The UNet's pre-hook: pop ``apo_mask`` from the call's keywords, check it, push it."""
        mask = kwargs.pop(MASK_KWARG, None)
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[1] != 1:
                got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(f"{MASK_KWARG} must be a (B, 1, H, W) tensor, got {got}")
            if mask.shape[0] != sample.shape[0]:
                raise ValueError(
                    f"{MASK_KWARG} has {mask.shape[0]} masks for a batch of {sample.shape[0]} samples"
                )
            mask = mask.to(sample.device)
        self._pending.append(mask)

    def add_branch(self, output: torch.Tensor) -> torch.Tensor:
        """conv_in's forward hook: ``output + branch(mask)`` when enabled and a mask was given."""
        mask = self._pending[-1] if self._pending else None
        if mask is None or not self.enabled:
            return output
        emb = self._emb[-1] if (self.time_dim and self._emb) else None
        return output + self(mask, tuple(output.shape[-2:]), emb).to(output.dtype)

    def take_emb(self, emb: torch.Tensor) -> None:
        """The time embedding's forward hook (time input only): keep this call's embedding."""
        self._emb.append(emb)

    def release(self) -> None:
        if self._pending:
            self._pending.pop()
        if self._emb:
            self._emb.pop()


class _TakeMask:
    """Forward pre-hook object on the UNet (a plain callable, so ``deepcopy`` copies it)."""

    def __init__(self, module: MaskInput) -> None:
        self.module = module

    def __call__(self, model, args, kwargs):
        sample = args[0] if args else kwargs.get("sample")
        if not isinstance(sample, torch.Tensor):
            raise TypeError("a UNet with a mask input must be called with a batched tensor `sample` first")
        self.module.take_mask(sample, kwargs)
        return args, kwargs


class _Release:
    def __init__(self, module: MaskInput) -> None:
        self.module = module

    def __call__(self, model, args, output):
        self.module.release()
        return None


class _TakeEmb:
    def __init__(self, module: MaskInput) -> None:
        self.module = module

    def __call__(self, time_embedding, args, output):
        self.module.take_emb(output)
        return None


class _AddBranch:
    def __init__(self, module: MaskInput) -> None:
        self.module = module

    def __call__(self, conv_in, args, output):
        return self.module.add_branch(output)


def get_mask_input(model: nn.Module) -> MaskInput | None:
    """The model's mask branch, or ``None``."""
    module = getattr(model, MASK_MODULE_NAME, None)
    return module if isinstance(module, MaskInput) else None


def attach_mask_input(model: nn.Module, hidden: int = 32, time: bool = False) -> MaskInput:
    """Register a :class:`MaskInput` as ``model.apo_mask_input`` and its hooks.

    ``model`` must have a ``conv_in`` convolution (diffusers' UNets do); the branch is
    created on its device and dtype. ``time``: the branch's hidden features are scaled by
    ``1 + W emb(t)`` (``W`` zero-initialised), ``emb`` the output of the model's
    ``time_embedding`` (diffusers' UNets compute it before ``conv_in``), so the branch's
    strength can depend on the noise level (``adapter.mask_time``).
    """
    if get_mask_input(model) is not None:
        raise ValueError(f"{type(model).__name__} already has a mask input")
    conv_in = getattr(model, "conv_in", None)
    if not isinstance(conv_in, nn.Conv2d):
        raise TypeError(
            f"{type(model).__name__} has no `conv_in` convolution to add the mask input to "
            "(adapter.mask_input needs a diffusers UNet)"
        )
    time_dim = 0
    if time:
        linear = getattr(getattr(model, "time_embedding", None), "linear_2", None)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{type(model).__name__} has no `time_embedding.linear_2` to give the mask input the time")
        time_dim = linear.out_features
    module = MaskInput(conv_in.out_channels, hidden, time_dim)
    weight = next((p for p in conv_in.parameters() if p.is_floating_point()), None)
    if weight is not None:
        module.to(device=weight.device, dtype=weight.dtype)
    setattr(model, MASK_MODULE_NAME, module)
    model.register_forward_pre_hook(_TakeMask(module), with_kwargs=True)
    model.register_forward_hook(_Release(module), always_call=True)
    conv_in.register_forward_hook(_AddBranch(module))
    if time_dim:
        model.time_embedding.register_forward_hook(_TakeEmb(module))
    return module
