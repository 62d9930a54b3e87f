"""The GRPO loss family: one registry entry per loss type, one frozen spec per run, one torch objective.

Every loss type is written once here, as TRL 1.16's ``GRPOTrainer._compute_loss`` computes it, in torch on
[B, T] tensors of per-token log-probs and entropies (`objective`). The eager reference differentiates it
through the logits; the Triton kernels either run the same objective on the log-probs of a first pass and
differentiate it with autograd on [B, T] tensors (`objective` again: sequence statistics, quantiles), or,
for the token-level cases where every token's gradient weight is known after one pass over its row, use
the in-kernel copy of the per-token formula (``kernels/grpo_loss.py``, tested against this one).

A `LossType` (``loss_types.py``, importable without torch, with `LOSS_REGISTRY` and `LossSpec`) holds what
differs between loss types: the surrogate (how the importance ratio r and the advantage A become a
per-token term, `SURROGATES` here), the aggregation (how the masked per-token terms become one number,
`AGGREGATIONS` here), TRL's parameters with TRL's defaults, and the cross-field rules. `LossSpec` holds a
run's settings, validated once; it is frozen, so an object that passed validation stays valid.

Per token (m = completion mask, r = exp(logp - old), or GSPO's sequence ratio):
    clip (grpo, bnpo, dr_grpo, dapo, luspo): -min(min(r, delta) A, clip(r, 1 - eps_low, 1 + eps_high) A)
    cispo: -sg(min(r, eps_high)) A logp                   (sg: no gradient; eps_high is the cap itself)
    sapo:  -sigmoid(tau (r - 1)) 4 / tau A                (tau = sapo_temperature_pos if A > 0, else _neg)
    vespo: -sg(phi(w)) A logp, phi(w) = exp(lambda + k log w - lambda w), w = exp(sum_t m clamp(logp - old))
then, in TRL's order: x off-policy mask (sequences with A < 0 whose mean sampler-to-policy KL exceeds the
threshold), x top-entropy mask, x importance-sampling weight (not vespo, whose w includes it), + beta KL
(k3, times r when use_bias_correction_kl), aggregated, minus entropy_coef times the mean entropy.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from .loss_types import (  # noqa: F401 (re-exported: one import for the registry, the spec and the maths)
    ALL_PARAMS,
    IMPORTANCE_SAMPLING_LEVELS,
    IMPORTANCE_SAMPLING_MODES,
    LOSS_REGISTRY,
    LOSS_TYPES,
    SAPO_PARAMS,
    VESPO_PARAMS,
    LossSpec,
    LossSpecError,
    LossType,
)

_LOWER_LOG_CLAMP = math.log(1e-8)  # TRL's VESPO clamp of log-weights


class Terms(NamedTuple):
    """What `objective` returns: the loss (differentiable w.r.t. logp and entropy) and detached metrics."""

    loss: torch.Tensor
    kl_mean: torch.Tensor
    clip_ratio_low: torch.Tensor
    clip_ratio_high: torch.Tensor
    clip_ratio_region: torch.Tensor
    entropy_mean: torch.Tensor
    bonus_entropy_mean: torch.Tensor  # mean entropy over the tokens the policy term and the bonus act on
    bonus_tokens: torch.Tensor  # how many there are
    importance_sampling_ratio_mean: torch.Tensor  # over active tokens (1 without correction)
    off_policy_masked: torch.Tensor  # share of active tokens whose policy term the off-policy mask removed


# --------------------------------------------------------------------------------------------------
# Surrogates: (ratio, A, logp, spec, extra) -> per-token policy term; clipped flags for the metrics.
# ``ratio`` and the result are [B, T] (token level) or [B, 1] (sequence level).
# --------------------------------------------------------------------------------------------------
def _clip_surrogate(ratio, adv, logp, spec, extra):
    clipped = torch.clamp(ratio, 1 - spec.epsilon_low, 1 + spec.epsilon_high)
    unclipped = ratio if spec.delta is None else torch.clamp(ratio, max=spec.delta)
    return -torch.min(unclipped * adv, clipped * adv)


def _cispo_surrogate(ratio, adv, logp, spec, extra):
    return -torch.clamp(ratio, max=spec.epsilon_high).detach() * adv * logp


def _sapo_surrogate(ratio, adv, logp, spec, extra):
    tau = torch.where(adv > 0, spec.params_of("sapo_temperature_pos"), spec.params_of("sapo_temperature_neg"))
    return -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv


def gamma_weights(adv, log_ratio, mask, is_ratio, spec) -> torch.Tensor:
    """VESPO's phi(w) per sequence [B, 1], detached: w = exp(sum_t m clamp(log r, -20, 20) + sum_t log IS)."""
    with torch.no_grad():
        seq = (torch.clamp(log_ratio, -20.0, 20.0) * mask).sum(-1, keepdim=True)
        if is_ratio is not None:
            seq = seq + torch.clamp(torch.log(is_ratio), _LOWER_LOG_CLAMP, 20.0).sum(-1, keepdim=True)
        log_w = torch.clamp(seq, _LOWER_LOG_CLAMP, 20.0)
        nonneg = adv >= 0
        k = torch.where(nonneg, spec.params_of("vespo_k_pos"), spec.params_of("vespo_k_neg"))
        lam = torch.where(nonneg, spec.params_of("vespo_lambda_pos"), spec.params_of("vespo_lambda_neg"))
        lam = lam.clamp(min=1e-4)
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
        return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def _vespo_surrogate(ratio, adv, logp, spec, extra):
    return -extra["phi"] * adv * logp


SURROGATES = {"clip": _clip_surrogate, "cispo": _cispo_surrogate, "sapo": _sapo_surrogate, "vespo": _vespo_surrogate}


def clipped_flags(ratio, adv, spec):
    """(low, high) clip flags, as TRL logs them: the clipped family's low and high clips, cispo's cap."""
    surrogate = spec.kind.surrogate
    if surrogate == "clip":
        return (ratio < 1 - spec.epsilon_low) & (adv < 0), (ratio > 1 + spec.epsilon_high) & (adv > 0)
    if surrogate == "cispo":
        return torch.zeros_like(ratio, dtype=torch.bool), (ratio > spec.epsilon_high) & (adv > 0)
    none = torch.zeros_like(ratio, dtype=torch.bool)
    return none, none


# --------------------------------------------------------------------------------------------------
# Aggregations: masked per-token terms [B, T] -> the loss. TRL's normalisers; see LOSS_REGISTRY.
# --------------------------------------------------------------------------------------------------
AGGREGATIONS = {
    "sequence_mean": "mean over sequences of sum_t m L / max(sum_t m, 1)",
    "token_mean": "sum m L / max(sum m, 1)",
    "fixed": "sum m L / (B x max_completion_length)",
    "items": "sum m L / num_items_in_batch",
    "sequence_sum": "mean over sequences of sum_t m L",
}


def row_weights(mask: torch.Tensor, spec: LossSpec, num_items_in_batch=None, dtype=torch.float32) -> torch.Tensor:
    """[B] weight of every active token of row b (bool mask [B, T]), so that loss = sum_bt w_b m_bt L_bt."""
    B, T = mask.shape
    ones = torch.ones(B, dtype=dtype, device=mask.device)
    how = spec.kind.aggregation
    if how == "sequence_mean":
        return ones / (B * mask.sum(1).clamp(min=1))
    if how == "token_mean":
        return ones / mask.sum().clamp(min=1)
    if how == "fixed":
        return ones / (B * (spec.max_completion_length or T))
    if how == "sequence_sum":
        return ones / B
    if num_items_in_batch is None:  # items
        return ones / mask.sum().clamp(min=1)
    if isinstance(num_items_in_batch, torch.Tensor):  # stays on the device: no synchronisation
        return ones / num_items_in_batch.to(device=mask.device, dtype=dtype).reshape(())
    return ones / float(num_items_in_batch)


# --------------------------------------------------------------------------------------------------
# Importance sampling between the sampler and the trainer, and the masks.
# --------------------------------------------------------------------------------------------------
def importance_weights(old, sampling, mask_f, spec) -> Optional[torch.Tensor]:
    """TRL's correction weight, detached: [B, T] (token modes) or [B, 1] (sequence modes), or None.
    ``old`` is the trainer's log-probs before the update, ``sampling`` the sampler's (NaN: unknown)."""
    if spec.importance_sampling_mode is None or sampling is None:
        return None
    with torch.no_grad():
        diff = torch.nan_to_num((old - sampling) * mask_f, nan=0.0)
        if spec.importance_sampling_mode.startswith("sequence"):
            diff = diff.sum(-1, keepdim=True)
        ratio = torch.exp(diff)
        lo, hi = spec.importance_sampling_clip_min, spec.importance_sampling_clip_max
        if spec.importance_sampling_mode.endswith("truncate"):
            return torch.clamp(ratio, min=lo, max=hi)
        outside = (ratio < (-math.inf if lo is None else lo)) | (ratio > (math.inf if hi is None else hi))
        return ratio.masked_fill(outside, 0.0)


def off_policy_mask(adv, logp, sampling, mask_f, threshold) -> torch.Tensor:
    """DeepSeek-V3.2's off-policy sequence mask [B, 1]: keep A >= 0 or mean (sampling - logp) <= threshold."""
    with torch.no_grad():
        kl = torch.nan_to_num(sampling - logp.detach(), nan=0.0)
        mean = (kl * mask_f).sum(1, keepdim=True) / mask_f.sum(1, keepdim=True).clamp(min=1.0)
        return ((adv >= 0) | (mean <= threshold)).to(mask_f.dtype)


def high_entropy_mask(entropy, mask, quantile, gather=None) -> torch.Tensor:
    """Tokens at or above the (1 - quantile) quantile of the active entropies of all ranks (``gather`` maps
    this rank's 1-D tensor to all ranks' concatenation; None: this call's tokens only)."""
    with torch.no_grad():
        local = entropy[mask].float()
        every = local if gather is None else gather(local)
        if every.numel() == 0:
            return torch.zeros_like(mask)
        threshold = torch.quantile(every, 1 - quantile)
        return (entropy * mask >= threshold.to(entropy.dtype)) & mask


# --------------------------------------------------------------------------------------------------
# The objective.
# --------------------------------------------------------------------------------------------------
def objective(logp, entropy, advantages, mask, spec: LossSpec, *, old=None, ref=None, sampling=None,
              num_items_in_batch=None, gather=None) -> Terms:
    """The loss of one micro-batch from per-token log-probs and entropies, following TRL's `_compute_loss`.

    Args:
        logp: [B, T] log-probs of the completion tokens (differentiable); any value where the mask is 0.
        entropy: [B, T] entropies of softmax(z / T) (differentiable when the entropy bonus is on).
        advantages: [B]. mask: [B, T] bool.
        old: [B, T] log-probs before the update (None: logp, detached: on-policy).
        ref: [B, T] reference log-probs (needed when beta > 0). sampling: [B, T] the sampler's log-probs
            (NaN where unknown), for the importance-sampling correction and the off-policy mask.
        num_items_in_batch: the normaliser of the "items" aggregations (None: this call's active tokens).
        gather: see `high_entropy_mask`.
    """
    dtype = logp.dtype
    mask_f = mask.to(dtype)
    detached = logp.detach()
    # masked positions get neutral values, so no inf / NaN of padding reaches a gradient
    old = detached if old is None else torch.where(mask, old.to(dtype), detached)
    sampling = None if sampling is None else torch.where(mask, sampling.to(dtype), detached)
    adv = advantages.to(dtype).unsqueeze(1)
    zero = torch.zeros((), dtype=dtype, device=logp.device)

    entropy_mask = None
    if spec.top_entropy_quantile < 1.0:
        entropy_mask = high_entropy_mask(entropy.detach(), mask, spec.top_entropy_quantile, gather)
    keep = None
    if spec.off_policy_mask_threshold is not None:
        keep = off_policy_mask(adv, logp, old if sampling is None else sampling, mask_f, spec.off_policy_mask_threshold)
    is_ratio = importance_weights(old, sampling, mask_f, spec)

    log_ratio = logp - old
    if spec.importance_sampling_level == "sequence":
        log_ratio_seq = (log_ratio * mask_f).sum(-1, keepdim=True) / mask_f.sum(-1, keepdim=True).clamp(min=1.0)
        ratio = torch.exp(log_ratio_seq)
    else:
        ratio = torch.exp(log_ratio)

    extra = {}
    if spec.kind.surrogate == "vespo":
        extra["phi"] = gamma_weights(adv, log_ratio.detach(), mask_f, is_ratio, spec)
    per_token = SURROGATES[spec.kind.surrogate](ratio, adv, logp, spec, extra)
    if keep is not None:
        per_token = per_token * keep
    if entropy_mask is not None:
        per_token = per_token * entropy_mask
    if is_ratio is not None and spec.kind.surrogate != "vespo":
        per_token = per_token * is_ratio
    kl = None
    if spec.beta > 0:
        diff = torch.where(mask, ref.to(dtype), detached) - logp
        kl = torch.exp(diff) - diff - 1
        if spec.use_bias_correction_kl:
            kl = kl * ratio
        per_token = per_token + spec.beta * kl
    per_token = per_token.expand_as(mask_f) if per_token.shape != mask_f.shape else per_token
    weights = row_weights(mask, spec, num_items_in_batch, dtype)
    loss = (torch.where(mask, per_token, 0.0) * weights.unsqueeze(1)).sum()

    effective = mask if entropy_mask is None else mask & entropy_mask
    n_effective = effective.sum().to(dtype)
    bonus_entropy = torch.where(effective, entropy, 0.0).sum() / n_effective.clamp(min=1.0)
    if spec.entropy_coef != 0:
        loss = loss - spec.entropy_coef * bonus_entropy

    with torch.no_grad():
        n_active = mask.sum().clamp(min=1).to(dtype)

        def masked_mean(x):
            return torch.where(mask, x.expand_as(mask_f), 0.0).sum().to(dtype) / n_active

        low, high = clipped_flags(ratio.detach(), adv, spec)
        return Terms(
            loss=loss,
            kl_mean=masked_mean(kl.detach()) if kl is not None else zero,
            clip_ratio_low=masked_mean(low),
            clip_ratio_high=masked_mean(high),
            clip_ratio_region=masked_mean(low | high),
            entropy_mean=masked_mean(entropy.detach()),
            bonus_entropy_mean=bonus_entropy.detach(),
            bonus_tokens=n_effective,
            importance_sampling_ratio_mean=masked_mean(is_ratio) if is_ratio is not None else zero + 1,
            off_policy_masked=masked_mean(1 - keep) if keep is not None else zero,
        )
