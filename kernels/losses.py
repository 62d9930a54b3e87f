"""The GRPO loss family: one registry entry per loss type, one frozen spec per run, one torch objective.

Every loss type is written once here, as TRL 1.16's ``GRPOTrainer._compute_loss`` computes it, in torch on
[B, T] tensors of per-token log-probs and entropies (`objective`). The eager reference differentiates it
through the logits; the Triton kernels either run the same objective on the log-probs of a first pass and
differentiate it with autograd on [B, T] tensors (`objective` again: sequence statistics, quantiles), or,
for the token-level cases where every token's gradient weight is known after one pass over its row, use
the in-kernel copy of the per-token formula (``kernels/grpo_loss.py``, tested against this one).

A `LossType` holds what differs between loss types: the surrogate (how the importance ratio r and the
advantage A become a per-token term), the aggregation (how the masked per-token terms become one number),
TRL's parameters with TRL's defaults, and the cross-field rules. `LossSpec` holds a run's settings,
validated once; it is frozen, so an object that passed validation stays valid.

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

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import torch

IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
IMPORTANCE_SAMPLING_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
_LOWER_LOG_CLAMP = math.log(1e-8)  # TRL's VESPO clamp of log-weights


@dataclass(frozen=True)
class LossType:
    """What one loss type is. ``surrogate`` and ``aggregation`` name entries of `SURROGATES` and
    `AGGREGATIONS`; ``params`` are its own settings (TRL's names and defaults); ``rules(spec)`` returns the
    problems of a spec for this loss type (messages that say what to change); ``kernel_id`` is the in-kernel
    surrogate of the one-launch Triton path (None: always the two-pass path)."""

    name: str
    surrogate: str
    aggregation: str
    summary: str
    params: dict = field(default_factory=dict)
    rules: Callable = lambda spec: []
    kernel_id: Optional[int] = None
    sequence_statistic: bool = False  # needs a statistic over each whole sequence before any gradient


def _clip_rules(spec) -> list[str]:
    if spec.delta is not None and spec.delta <= 1 + spec.epsilon_high:
        return [f"delta must be > 1 + epsilon_high = {1 + spec.epsilon_high}, got {spec.delta} (or set delta: null)"]
    return []


def _no_delta(name):
    def rules(spec) -> list[str]:
        if spec.delta is not None:
            return [f"delta (two-sided clipping) applies to the clipped loss types only, not {name}: set delta: null"]
        return []
    return rules


def _cispo_rules(spec) -> list[str]:
    out = _no_delta("cispo")(spec)
    if spec.epsilon_high <= 1:
        out.append(f"cispo reads epsilon_high as the cap of the ratio itself (TRL's epsilon_max, e.g. 5.0), not as "
                   f"1 + epsilon_high: epsilon_high = {spec.epsilon_high} caps every ratio below 1, so set it above 1")
    return out


def _sapo_rules(spec) -> list[str]:
    out = _no_delta("sapo")(spec)
    for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
        if not spec.params_of(name) > 0:
            out.append(f"{name} must be > 0, got {spec.params_of(name)}")
    return out


def _vespo_rules(spec) -> list[str]:
    out = _no_delta("vespo")(spec)
    for name in ("vespo_k_pos", "vespo_k_neg"):
        if not spec.params_of(name) >= 0:
            out.append(f"{name} must be >= 0, got {spec.params_of(name)}")
    for name in ("vespo_lambda_pos", "vespo_lambda_neg"):
        if not spec.params_of(name) > 0:
            out.append(f"{name} must be > 0, got {spec.params_of(name)}")
    if spec.importance_sampling_mode in ("sequence_truncate", "sequence_mask"):
        out.append(f"vespo folds the importance-sampling weight into its sequence weight token by token: set "
                   f"importance_sampling_mode to token_truncate or token_mask, got {spec.importance_sampling_mode}")
    return out


SAPO_PARAMS = {"sapo_temperature_pos": 1.0, "sapo_temperature_neg": 1.05}
VESPO_PARAMS = {"vespo_k_pos": 2.0, "vespo_lambda_pos": 3.0, "vespo_k_neg": 3.0, "vespo_lambda_neg": 2.0}

LOSS_REGISTRY: dict[str, LossType] = {t.name: t for t in (
    LossType("grpo", "clip", "sequence_mean", "mean over sequences of each sequence's token mean",
             rules=_clip_rules, kernel_id=0),
    LossType("bnpo", "clip", "token_mean", "mean over the active tokens of the micro-batch",
             rules=_clip_rules, kernel_id=0),
    LossType("dr_grpo", "clip", "fixed", "sum / (B x max_completion_length) (Dr. GRPO)",
             rules=_clip_rules, kernel_id=0),
    LossType("dapo", "clip", "items", "sum / active tokens of the whole generation batch (DAPO)",
             rules=_clip_rules, kernel_id=0),
    LossType("luspo", "clip", "sequence_sum", "mean over sequences of each sequence's token sum (LUSPO; "
             "meant for importance_sampling_level: sequence)", rules=_clip_rules, kernel_id=0),
    LossType("cispo", "cispo", "items", "clipped, detached importance weight times A logp (CISPO, MiniMax-M1); "
             "epsilon_high is the cap", rules=_cispo_rules, kernel_id=1),
    LossType("sapo", "sapo", "sequence_mean", "soft sigmoid gate instead of the hard clip (SAPO)",
             params=SAPO_PARAMS, rules=_sapo_rules, kernel_id=2),
    LossType("vespo", "vespo", "items", "detached gamma weight of the sequence ratio times A logp (VESPO)",
             params=VESPO_PARAMS, rules=_vespo_rules, sequence_statistic=True),
)}
LOSS_TYPES = tuple(LOSS_REGISTRY)
ALL_PARAMS = {**SAPO_PARAMS, **VESPO_PARAMS}


def _real(name, value, problems, low=None, high=None, low_open=False, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != value:
        problems.append(f"{name} must be a real number, got {value!r}")
        return value
    value = float(value)
    if (low is not None and (value <= low if low_open else value < low)) or (high is not None and value > high):
        bracket = "(" if low_open else "["
        problems.append(f"{name} must lie in {bracket}{'-inf' if low is None else low}, "
                        f"{'inf' if high is None else high}], got {value}")
    return value


class LossSpecError(ValueError):
    """Bad loss settings; ``problems`` lists each one (a message that says what to change)."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = list(problems)


@dataclass(frozen=True)
class LossSpec:
    """A run's loss settings, validated once (construction raises ValueError naming every problem).

    Field names are TRL 1.16's where TRL has them; the importance-sampling fields drop TRL's ``vllm_``
    prefix because here the sampler may be this project's own decoding loop.
    """

    loss_type: str = "grpo"
    beta: float = 0.0
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    delta: Optional[float] = None
    temperature: float = 1.0
    importance_sampling_level: str = "token"
    max_completion_length: Optional[int] = None
    use_bias_correction_kl: bool = False
    importance_sampling_mode: Optional[str] = None  # None: no correction
    importance_sampling_clip_min: Optional[float] = None
    importance_sampling_clip_max: Optional[float] = 3.0
    off_policy_mask_threshold: Optional[float] = None
    top_entropy_quantile: float = 1.0
    entropy_coef: float = 0.0
    params: tuple = ()  # ((name, value), ...) of the loss type's own parameters; missing ones take defaults

    def __post_init__(self):
        problems = []
        if self.loss_type not in LOSS_REGISTRY:
            raise LossSpecError([f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}"])
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise LossSpecError([f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, "
                                 f"got {self.importance_sampling_level!r}"])
        _real("beta", self.beta, problems, low=0.0)
        _real("epsilon_low", self.epsilon_low, problems, low=0.0, high=1.0)
        _real("epsilon_high", self.epsilon_high, problems, low=0.0)
        _real("delta", self.delta, problems, low=0.0, low_open=True, allow_none=True)
        _real("temperature", self.temperature, problems, low=0.0, low_open=True)
        m = self.max_completion_length
        if m is not None and (isinstance(m, bool) or not isinstance(m, numbers.Integral) or m <= 0):
            problems.append(f"max_completion_length must be a positive int, got {m!r}")
        if not isinstance(self.use_bias_correction_kl, bool):
            problems.append(f"use_bias_correction_kl must be true or false, got {self.use_bias_correction_kl!r}")
        if self.importance_sampling_mode is not None and self.importance_sampling_mode not in IMPORTANCE_SAMPLING_MODES:
            problems.append(f"importance_sampling_mode must be one of {IMPORTANCE_SAMPLING_MODES} (or null: no "
                            f"correction), got {self.importance_sampling_mode!r}")
        lo = _real("importance_sampling_clip_min", self.importance_sampling_clip_min, problems, low=0.0, allow_none=True)
        hi = _real("importance_sampling_clip_max", self.importance_sampling_clip_max, problems, low=0.0, allow_none=True)
        if isinstance(lo, float) and isinstance(hi, float) and lo > hi:
            problems.append(f"importance_sampling_clip_min ({lo}) is above importance_sampling_clip_max ({hi})")
        _real("off_policy_mask_threshold", self.off_policy_mask_threshold, problems, low=0.0, allow_none=True)
        _real("top_entropy_quantile", self.top_entropy_quantile, problems, low=0.0, high=1.0)
        _real("entropy_coef", self.entropy_coef, problems)
        kind = LOSS_REGISTRY[self.loss_type]
        for name, value in self.params:
            if name not in ALL_PARAMS:
                problems.append(f"{name} is not a loss parameter (known: {sorted(ALL_PARAMS)})")
            else:
                _real(name, value, problems)
        if not problems:
            problems += kind.rules(self)
        if problems:
            raise LossSpecError(problems)

    @classmethod
    def from_kwargs(cls, **kwargs) -> "LossSpec":
        """A spec from keyword arguments, the loss types' parameters (TRL's names) among them."""
        own = {f.name for f in dataclasses.fields(cls)} - {"params"}
        unknown = [k for k in kwargs if k not in own and k not in ALL_PARAMS]
        if unknown:
            raise LossSpecError([f"unknown loss setting(s) {unknown}; known: {sorted(own | set(ALL_PARAMS))}"])
        params = tuple(sorted((k, v) for k, v in kwargs.items() if k in ALL_PARAMS))
        return cls(params=params, **{k: v for k, v in kwargs.items() if k in own})

    def params_of(self, name: str) -> float:
        return float(dict(self.params).get(name, ALL_PARAMS[name]))

    def replace(self, **changes) -> "LossSpec":
        return dataclasses.replace(self, **changes)

    @property
    def kind(self) -> LossType:
        return LOSS_REGISTRY[self.loss_type]

    def one_pass(self, has_old: bool, has_sampling: bool) -> bool:
        """Whether every token's gradient weight is known after one pass over its own row (the one-launch,
        2U Triton path); else log-probs first, the objective on [B, T], then the gradient pass (3U).

        Token-level ratios, KL and token-mode importance weights need only the token's own old, reference and
        sampler values. A sequence ratio (GSPO), VESPO's summed ratio, sequence-mode importance weights, the
        off-policy mask (a mean over the sequence, unless nothing is off-policy: no old and no sampler
        log-probs, where it keeps every token) and the entropy quantile (over the batch) need a pass between.
        """
        if (self.kind.kernel_id is None or self.importance_sampling_level != "token"
                or self.top_entropy_quantile < 1.0):
            return False
        if self.off_policy_mask_threshold is not None and (has_old or has_sampling):
            return False
        mode = self.importance_sampling_mode
        return not (has_sampling and mode is not None and mode.startswith("sequence"))


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
        lam = torch.where(nonneg, spec.params_of("vespo_lambda_pos"), spec.params_of("vespo_lambda_neg")).clamp(min=1e-4)
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
