"""The APO loss's plain PyTorch reference and the output contract both paths fill.

Per sample ``i`` (APO_SPEC "Loss"), with ``w = 1 + (lambda_mask - 1) * m`` (``w = 1``
without a mask) and the mean taken over every non-batch element::

    e_theta_i = mean(w * (model_pred_i - target_i)^2)
    e_ref_i   = mean(w * (ref_pred_i   - target_i)^2)
    delta_i   = e_theta_i - e_ref_i

    unpaired: L = mean_i  -log sigmoid(-beta_t_i * delta_i)
    paired:   L = mean_j  -log sigmoid(-beta_t_j * (delta_w_j - delta_l_j))
              (winners are the first half of the batch, losers the second)
    optional: L += lambda_sft * mean(e_theta over the positives)

The fused path (:mod:``apo_fast.ops.apo_loss.fused``) writes the same metrics vector
(:data:``METRIC_SLOTS``) and returns the same :class:``APOLossOutput``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from apo_fast.config.choices import LOSS_TYPES
from apo_fast.ops.apo_loss.checks import check_number

# Layout of the metrics vector written by both paths: name -> slot.
METRIC_SLOTS: Mapping[str, int] = {
    "loss": 0,
    "e_theta": 1,
    "e_ref": 2,
    "reward_w": 3,
    "reward_l": 4,
    "implicit_acc": 5,
    "beta_t": 6,
    "sft": 7,
}
NUM_METRIC_SLOTS = len(METRIC_SLOTS)
# The preference forms (config/choices.LOSS_TYPES), by the id the fused kernel takes.
LOSS_TYPE_IDS: Mapping[str, int] = {name: i for i, name in enumerate(LOSS_TYPES)}
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclasses.dataclass
class APOLossOutput:
    """Result of :func:`apo_loss` / :func:`diffusion_dpo_loss`.

    Attributes:
        loss: scalar tensor, differentiable w.r.t. ``model_pred`` only; float32
            (float64 for float64 inputs; the Salesforce convention keeps the
            inputs' dtype, as its script does).
        e_theta: (B,) detached per-sample weighted policy residual error.
        e_ref: (B,) detached, the same for the reference prediction.
        metric_values: (8,) detached, on the inputs' device; the slots
            of :data:`METRIC_SLOTS`.
        metric_names: names of the slots that are meaningful for this call.

    ``metrics`` (a ``dict[str, float]``) is built on first access, so a step
    that does not log never waits for the device.
    """

    loss: torch.Tensor
    e_theta: torch.Tensor
    e_ref: torch.Tensor
    metric_values: torch.Tensor = dataclasses.field(repr=False)
    metric_names: tuple[str, ...] = dataclasses.field(repr=False)

    @functools.cached_property
    def metrics(self) -> dict[str, float]:
        """``loss``, ``e_theta``, ``e_ref``, ``reward_w``, ``reward_l`` (paired),
        ``implicit_acc``, ``beta_t`` (mean), ``sft`` (when ``lambda_sft > 0``)."""
        values = self.metric_values.tolist()  # one device sync
        return {name: float(values[METRIC_SLOTS[name]]) for name in self.metric_names}


@functools.cache
def metric_names_for(paired: bool, with_sft: bool) -> tuple[str, ...]:
    """Names of the meaningful metric slots for this call's options."""
    names = ["loss", "e_theta", "e_ref", "reward_w"]
    if paired:
        names.append("reward_l")
    names += ["implicit_acc", "beta_t"]
    if with_sft:
        names.append("sft")
    return tuple(names)



def beta_per_term(beta_t: object, n_samples: int, paired: bool, device: torch.device) -> float | torch.Tensor:
    """``beta_t`` as a float, or a tensor (float32, or float64 if given) with one entry per loss term.

    Loss terms are samples (unpaired) or pairs (paired). A (B,) tensor in
    paired mode gives each pair its winner's value (the first half).
    """
    if paired and n_samples % 2:
        raise ValueError(f"paired=True needs an even batch (winners then losers), got B={n_samples}")
    n_terms = n_samples // 2 if paired else n_samples
    if not isinstance(beta_t, torch.Tensor):
        return check_number("beta_t", beta_t)
    if not beta_t.is_floating_point():
        raise TypeError(f"beta_t must be a float or a floating-point tensor, got {beta_t.dtype}")
    dtype = torch.promote_types(beta_t.dtype, torch.float32)
    if beta_t.dim() == 0:
        return beta_t.reshape(1).expand(n_terms).to(device=device, dtype=dtype)
    allowed = {(n_terms,), (n_samples,)} if paired else {(n_samples,)}
    if beta_t.dim() != 1 or tuple(beta_t.shape) not in allowed:
        expected = f"({n_terms},) or ({n_samples},)" if paired else f"({n_samples},)"
        raise ValueError(f"beta_t must be a float or a tensor of shape {expected}, got {tuple(beta_t.shape)}")
    return beta_t[:n_terms].to(device=device, dtype=dtype)


# --------------------------------------------------------------------------- reference


@dataclasses.dataclass(frozen=True)
class PreferenceForm:
    """Which preference loss turns the per-term residual difference ``d`` into a loss.

    ``d`` is ``delta_i = e_theta_i - e_ref_i`` (unpaired) or ``delta_w - delta_l`` (paired);
    ``z = beta_t * d``. Per term (validated inputs; see :func:`apo_fast.ops.apo_loss.apo_loss`):

    * ``sigmoid`` (APO / Diffusion-DPO): ``softplus(z) = -log sigmoid(-z)``
    * ``hinge`` (SLiC, diffusers' ``--loss_type hinge``): ``relu(1 + z)``
    * ``ipo`` (IPO, Azar et al. eq. 17 with ``tau = beta_t``): ``(d + 1 / (2 beta_t))^2``
    * ``kto`` (Diffusion-KTO, unpaired): with ``g = -delta``, the reference point
      ``kl = max(0, mean(g))`` (detached), the label sign ``s = 2 y - 1`` and
      ``u = s beta_t (g - kl)``: ``lambda_y (1 - sigmoid(u))``
      (``lambda_desirable`` / ``lambda_undesirable``)
    * ``margin`` (reference-free, the CPO / MaPO family, paired): ``softplus(beta_t (e_theta_w -
      e_theta_l))``, usually with ``lambda_sft > 0`` (the SFT term on the winners)

    ``labels``: (B,) 1 desirable / 0 undesirable (``kto``; default all desirable, as APO's real
    anomalies are). ``weights``: optional (n_terms,) per-term weights of the preference term
    (per-sample or per-timestep weighting); the mean is over terms, weights included.
    """

    loss_type: str = "sigmoid"
    labels: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    lambda_desirable: float = 1.0
    lambda_undesirable: float = 1.0

    @property
    def form_id(self) -> int:
        return LOSS_TYPE_IDS[self.loss_type]


SIGMOID = PreferenceForm()


def preference_terms(d: torch.Tensor, delta: torch.Tensor, beta: torch.Tensor, form: PreferenceForm):
    """Per-term loss, implicit-accuracy indicator and slope ``d loss / d d`` of ``form`` (float
    math; the loss is differentiable in ``d``, the slope is its closed form, KTO's reference
    point held fixed as it is detached; per-term weights are the caller's)."""
    z = beta * d
    kind = form.loss_type
    if kind in ("sigmoid", "margin"):
        losses, slopes = F.softplus(z), torch.sigmoid(z) * beta
    elif kind == "hinge":
        losses, slopes = torch.relu(1.0 + z), beta * (1.0 + z > 0).to(d.dtype)
    elif kind == "ipo":
        losses, slopes = (d + 0.5 / beta).square(), 2.0 * (d + 0.5 / beta)
    else:  # kto: unpaired, d = delta
        g = -d
        kl = g.detach().mean().clamp(min=0.0)
        labels = form.labels.to(d.dtype) if form.labels is not None else torch.ones_like(d)
        sign = 2.0 * labels - 1.0
        u = sign * beta * (g - kl)
        lam = labels * form.lambda_desirable + (1.0 - labels) * form.lambda_undesirable
        s = torch.sigmoid(u)
        return lam * (1.0 - s), (u > 0).to(d.dtype), (lam * s * (1.0 - s) * sign * beta).detach()
    wins = (d < 0).to(d.dtype) + 0.5 * (d == 0).to(d.dtype)
    return losses, wins, slopes.detach()


def term_differences(e_theta: torch.Tensor, delta: torch.Tensor, paired: bool, form: PreferenceForm) -> torch.Tensor:
    """``d`` per loss term: ``delta`` (unpaired), ``delta_w - delta_l`` (paired) or, for the
    reference-free ``margin`` form, ``e_theta_w - e_theta_l``."""
    if not paired:
        return delta
    if form.loss_type == "margin":
        e_w, e_l = e_theta.chunk(2)
        return e_w - e_l
    delta_w, delta_l = delta.chunk(2)
    return delta_w - delta_l


def gradient_coefficients(e_theta, e_ref, beta, paired: bool, lambda_sft: float, form: PreferenceForm,
                          sample_numel: int) -> torch.Tensor:
    """``coef_i = dL / de_theta_i * 2 / N`` per sample (B,), so that the gradient of the loss
    in the prediction is ``coef_i * w * (p - t)``: what the fused finalize kernel writes."""
    delta = e_theta - e_ref
    n_terms = len(delta) // 2 if paired else len(delta)
    beta = beta.to(delta.dtype) if isinstance(beta, torch.Tensor) else torch.full_like(delta[:n_terms], beta)
    slopes = preference_terms(term_differences(e_theta, delta, paired, form), delta, beta, form)[2]
    if form.weights is not None:
        slopes = slopes * form.weights.to(delta.dtype)
    scale = 2.0 / (n_terms * sample_numel)
    winners = (slopes + lambda_sft) * scale
    return torch.cat([winners, -slopes * scale]) if paired else winners


def apo_loss_reference(
    model_pred: torch.Tensor,
    ref_pred: torch.Tensor,
    target: torch.Tensor,
    beta: float | torch.Tensor,
    mask: torch.Tensor | None = None,
    lambda_mask: float = 1.0,
    paired: bool = False,
    lambda_sft: float = 0.0,
    form: PreferenceForm = SIGMOID,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain PyTorch APO loss on validated inputs (``beta`` from :func:`beta_per_term`), in the
    preference ``form`` (:class:`PreferenceForm`; the sigmoid form by default).

    Computes in float32 (float64 inputs stay float64, and so do the outputs);
    free of host syncs and of Python branching on values, so ``torch.compile``
    traces it whole.

    Returns:
        loss (scalar), e_theta (B,), e_ref (B,), metric_values (8,) (slots of
        :data:`METRIC_SLOTS`, zero where unused); all but loss detached.
    """
    compute = functools.reduce(torch.promote_types, (model_pred.dtype, ref_pred.dtype, target.dtype), torch.float32)
    dims = tuple(range(1, model_pred.dim()))
    pred = model_pred.to(compute)
    target = target.detach().to(compute)
    ref = ref_pred.detach().to(compute)
    sq_theta = (pred - target).square()
    sq_ref = (ref - target).square()
    if mask is not None:
        weight = 1.0 + (lambda_mask - 1.0) * mask.detach().to(compute)
        sq_theta = sq_theta * weight
        sq_ref = sq_ref * weight
    e_theta = sq_theta.mean(dim=dims)
    e_ref = sq_ref.mean(dim=dims)
    delta = e_theta - e_ref
    n_terms = len(delta) // 2 if paired else len(delta)
    beta = beta.to(compute) if isinstance(beta, torch.Tensor) else torch.full_like(delta[:n_terms], beta)
    if paired:
        delta_w, delta_l = delta.chunk(2)
        reward_w, reward_l = -beta * delta_w, -beta * delta_l
        positives = e_theta.chunk(2)[0]
    else:
        reward_w = -beta * delta
        reward_l = torch.zeros_like(reward_w)
        positives = e_theta
    losses, wins, _ = preference_terms(term_differences(e_theta, delta, paired, form), delta, beta, form)
    if form.weights is not None:
        losses = losses * form.weights.to(compute)
    loss = losses.mean()
    sft = positives.mean()
    if lambda_sft:
        loss = loss + lambda_sft * sft
    metric_values = torch.stack(
        [
            loss.detach(),
            e_theta.detach().mean(),
            e_ref.mean(),
            reward_w.detach().mean(),
            reward_l.detach().mean(),
            wins.mean(),
            beta.mean(),
            sft.detach() if lambda_sft else torch.zeros_like(sft),
        ]
    )
    return loss, e_theta.detach(), e_ref, metric_values

