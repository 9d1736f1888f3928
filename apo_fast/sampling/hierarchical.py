"""Hierarchical sampling (APO_SPEC "Hierarchical sampling").

Per denoising step three predictions, the two reference ones in one batched
call with the adapters off, the policy one with them on::

    eps_hat = eps_ref(z,0,t) + s_text  * (eps_ref(z,c,t) - eps_ref(z,0,t))
                             + s_align * (eps_theta(z,c,t) - eps_ref(z,c,t))

The localization map accumulates ``|| eps_theta - eps_ref(c) ||`` over channels,
weighted by the gate's mean opening ``mean_j k_j(t)``; it is upsampled, smoothed
and thresholded into the generated anomaly's mask. Mask-guided generation
replaces, after every step, the region outside the mask (grown by ``guide_dilate``
pixels) by the normal image noised to that step (RePaint-style), so only that
region changes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def schedule_value(spec, step: int, num_steps: int) -> float:
    """A guidance scale at ``step`` of ``num_steps``: a constant, or a piecewise-constant
    schedule ``[[fraction, value], ...]`` (the value of the last fraction <= step/num_steps)."""
    if isinstance(spec, (int, float)):
        return float(spec)
    frac = step / max(num_steps, 1)
    value = float(spec[0][1])
    for f, v in spec:
        if frac + 1e-9 >= f:
            value = float(v)
    return value


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, 1, H, W) maps (reflect padding)."""
    if sigma <= 0:
        return x
    radius = max(1, int(math.ceil(3 * sigma)))
    coords = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    pad = min(radius, x.shape[-1] - 1, x.shape[-2] - 1)
    if pad < radius:
        kernel = kernel[radius - pad : radius + pad + 1]
        kernel = kernel / kernel.sum()
    x = F.pad(x, (pad, pad, 0, 0), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, pad, pad), mode="reflect")
    return F.conv2d(x, kernel.view(1, 1, -1, 1))


def localization_mask(acc: torch.Tensor, size: tuple[int, int], sigma: float, threshold: float):
    """(B, h, w) accumulated deviation -> ((B,1,H,W) map in [0,1], (B,1,H,W) binary mask)."""
    m = acc.unsqueeze(1).float()
    m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
    m = gaussian_blur(m, sigma)
    lo = m.amin(dim=(2, 3), keepdim=True)
    hi = m.amax(dim=(2, 3), keepdim=True)
    m = (m - lo) / (hi - lo).clamp_min(1e-12)
    return m, (m >= threshold).float()


@dataclass
class SampleOutput:
    images: torch.Tensor  # (B, 3, H, W) in [-1, 1]
    masks: torch.Tensor  # (B, 1, H, W) {0, 1}: the user's mask if mask-guided, else thresholded map
    maps: torch.Tensor  # (B, 1, H, W) localization map in [0, 1]


@torch.no_grad()
def hierarchical_sample(
    unet,
    conditions,
    scheduler,
    cond_ids: torch.Tensor,
    *,
    shape: tuple[int, int, int],
    num_inference_steps: int = 25,
    s_text=3.0,
    s_align=2.0,
    generator: torch.Generator | None = None,
    known: torch.Tensor | None = None,
    known_mask: torch.Tensor | None = None,
    gate_weight=None,
    mask_threshold: float = 0.5,
    mask_sigma: float = 1.0,
    vae=None,
    image_size: int | None = None,
    progress: bool = False,
    desc: str = "sampling",
    unet_call=None,
    cond_mask: torch.Tensor | None = None,
    resample: int = 1,
    stop_t: int = -1,
    guide_dilate: int = 0,
) -> SampleOutput:
    """Generate anomalies for ``cond_ids`` (B,) with APO's hierarchical guidance.

    Args:
        unet: the UNet with injected adapters (:mod:`apo_fast.adapters`).
        conditions: :class:`apo_fast.models.ConditionEmbedding`.
        scheduler: a diffusers DDIM/DDPM scheduler.
        shape: (C, h, w) of the model space (pixels or latents).
        s_text, s_align: constants or ``[[fraction, value], ...]`` schedules over the steps.
        known: (B, C, h, w) normal images in model space for mask-guided generation.
        known_mask: (B, 1, h, w) {0,1}: where the anomaly goes (model resolution).
        gate_weight: callable t (B,) -> (B,) mean gate opening, weights the map; None = 1.
        vae: decodes latents to pixels when given.
        image_size: output resolution of masks/maps (default: the model resolution).
        desc: the progress bar's label (e.g. ``"sampling hole guided"``).
        unet_call: ``(sample, timestep, kwargs) -> unet(sample, timestep, **kwargs).sample``,
            e.g. :func:`apo_fast.models.compile.compiled_unet_call` (``sample.compile``);
            None calls ``unet``.
        cond_mask: (B, 1, H, W) {0,1}, any resolution: where the defect goes, given to the
            policy's mask input (``adapter.mask_input``; the reference passes never see it).
            Without ``known`` it is also the returned mask (a free sample drawn into it).
        resample: RePaint's resampling (Lugmayr et al. 2022, jump length 1): every step but the
            last is taken ``resample`` times, the result re-noised to the step's level in between,
            so the generated region and its surroundings (the noised normal image when
            mask-guided) agree before moving on. 1: off. Costs ``resample`` x the UNet calls.
        stop_t: end at the first step whose timestep is <= ``stop_t``: the image is that step's
            predicted clean sample (``pred_original_sample``; outside a guide mask the normal
            image), the steps below are skipped. -1: run every step.
    """
    from tqdm.auto import tqdm

    from apo_fast.models import cat_unet_kwargs, vae_scale_factor
    from apo_fast.models.compile import plain_unet_call

    device = next(unet.parameters()).device
    # the compute dtype: the first floating-point parameter (a quantized base's first layers hold
    # uint8 bytes, e.g. an fp8 conv_in), as diffusers' ModelMixin.dtype reads it
    dtype = next((p.dtype for p in unet.parameters() if p.is_floating_point()), torch.float32)
    _check_options(resample, stop_t, guide_dilate)
    known, known_mask = _check_guides(cond_ids, shape, known, known_mask, device)
    blend = grow_mask(known_mask, guide_dilate) if known is not None else None  # the region that may change
    b = cond_ids.shape[0]
    cond_ids = cond_ids.to(device)
    pixel_size = image_size or shape[-1] * (vae_scale_factor(vae) if vae is not None else 1)
    kw_c = conditions.unet_kwargs(cond_ids, dtype, pixel_size)
    kw_ref = cat_unet_kwargs(conditions.unet_kwargs(torch.full_like(cond_ids, -1), dtype, pixel_size), kw_c)
    if cond_mask is not None:
        from apo_fast.adapters.mask_input import MASK_KWARG

        if cond_mask.dim() != 4 or cond_mask.shape[:2] != (b, 1):
            raise ValueError(f"cond_mask must have shape ({b}, 1, H, W), got {tuple(cond_mask.shape)}")
        kw_c = {**kw_c, MASK_KWARG: cond_mask.to(device, dtype)}
    scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = scheduler.timesteps
    z = torch.randn((b, *shape), generator=generator, device="cpu").to(device) * scheduler.init_noise_sigma
    acc = torch.zeros((b, *shape[1:]), device=device)
    alphas = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    n = len(timesteps)
    unet_call = unet_call or plain_unet_call(unet)
    for i, t in enumerate(tqdm(timesteps, desc=desc, disable=not progress, leave=False)):
        tb = torch.full((b,), int(t), device=device, dtype=torch.long)
        st, sa = schedule_value(s_text, i, n), schedule_value(s_align, i, n)
        t_prev = int(timesteps[i + 1]) if i + 1 < n else -1
        stop = t_prev >= 0 and int(t) <= stop_t  # end on this step's predicted clean image
        if stop:
            t_prev = -1
        rounds = resample if t_prev >= 0 else 1  # the last step (to the clean image) is not repeated
        for r in range(rounds):
            if r:  # RePaint resampling: back to this step's noise level, then the step again
                z = _renoise(z, alphas[int(t)] / alphas[t_prev], generator, device)
            eps, deviation = _guided_prediction(unet, unet_call, scheduler.scale_model_input(z, t).to(dtype), tb,
                                                kw_ref, kw_c, st, sa)
            if r == rounds - 1:  # the map follows the trajectory that is kept
                w = gate_weight(tb).float().view(b, 1, 1) if gate_weight is not None else 1.0
                acc += w * deviation.pow(2).sum(1).sqrt()
            stepped = scheduler.step(eps, t, z)
            z = stepped.pred_original_sample if stop else stepped.prev_sample
            if known is not None:
                z = blend * z + (1 - blend) * _noised_background(known, alphas, t_prev, generator, device)
        if stop:
            break
    given = known_mask if known_mask is not None else (cond_mask.to(device).float() if cond_mask is not None else None)
    return _finish(z, acc, vae, image_size, given, mask_sigma, mask_threshold, device)


def _guided_prediction(unet, unet_call, zin, tb, kw_ref, kw_c, s_text: float, s_align: float):
    """One step's three predictions (the reference's unconditional and conditional ones in one
    batched call with the adapters off, the policy's) -> (the guided prediction, the policy's
    deviation from the conditional reference, which the localization map accumulates)."""
    from apo_fast.adapters import adapters_disabled

    with adapters_disabled(unet):
        e_ref = unet_call(torch.cat([zin, zin]), torch.cat([tb, tb]), kw_ref).float()
    e_u, e_c = e_ref.chunk(2)
    deviation = unet_call(zin, tb, kw_c).float() - e_c
    return e_u + s_text * (e_c - e_u) + s_align * deviation, deviation


def grow_mask(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """(B, 1, H, W) {0,1} masks grown by ``pixels`` (a (2p+1)^2 max filter; 0: unchanged)."""
    if pixels == 0:
        return mask
    return F.max_pool2d(mask, 2 * pixels + 1, stride=1, padding=pixels)


def _check_options(resample, stop_t, guide_dilate) -> None:
    from apo_fast.config.checks import int_at_least

    int_at_least("resample", resample, 1, "1 = off")
    int_at_least("stop_t", stop_t, -1, "-1 = every step")
    int_at_least("guide_dilate", guide_dilate, 0, "0 = off")


def _check_guides(cond_ids, shape, known, known_mask, device):
    """Mask-guided sampling's inputs checked and moved to ``device`` (float32)."""
    if cond_ids.dim() != 1:
        raise ValueError(f"cond_ids must be (B,), got shape {tuple(cond_ids.shape)}")
    if (known is None) != (known_mask is None):
        raise ValueError("mask-guided sampling needs both `known` and `known_mask`")
    if known is None:
        return None, None
    b = cond_ids.shape[0]
    if known.shape != (b, *shape):
        raise ValueError(f"known must have shape {(b, *shape)}, got {tuple(known.shape)}")
    if known_mask.shape != (b, 1, *shape[1:]):
        raise ValueError(f"known_mask must have shape {(b, 1, *shape[1:])}, got {tuple(known_mask.shape)}")
    return known.to(device, torch.float32), known_mask.to(device, torch.float32)


def _renoise(z, ratio: torch.Tensor, generator, device) -> torch.Tensor:
    """``z`` at a level ``abar_prev`` taken back to ``abar_t = ratio * abar_prev`` (one forward
    diffusion jump, ``ratio`` = abar_t / abar_prev in (0, 1])."""
    noise = torch.randn(z.shape, generator=generator).to(device)
    return ratio.sqrt() * z + (1 - ratio).sqrt() * noise


def _noised_background(known, alphas, t_prev: int, generator, device) -> torch.Tensor:
    """The normal image noised to the next step's level (``t_prev`` < 0: the clean image)."""
    if t_prev < 0:
        return known
    noise = torch.randn(known.shape, generator=generator).to(device)
    a = alphas[t_prev]
    return a.sqrt() * known + (1 - a).sqrt() * noise


def _finish(z, acc, vae, image_size, known_mask, mask_sigma, mask_threshold, device) -> SampleOutput:
    """Decode (latent models), clamp, resize to ``image_size``, and the localization map and mask
    (the given mask when there is one: the user's when mask-guided, the drawn one for a free
    sample of a mask-input policy)."""
    images = z.float()
    if vae is not None:
        from apo_fast.models import decode_latents

        images = decode_latents(vae, images).to(device)
    images = images.clamp(-1, 1)
    out_size = (image_size, image_size) if image_size else tuple(images.shape[-2:])
    if images.shape[-2:] != out_size:
        images = F.interpolate(images, size=out_size, mode="bilinear", align_corners=False)
    maps, masks = localization_mask(acc, out_size, mask_sigma, mask_threshold)
    if known_mask is not None:
        masks = (F.interpolate(known_mask, size=out_size, mode="nearest") > 0.5).float()
    return SampleOutput(images.cpu(), masks.cpu(), maps.cpu())

