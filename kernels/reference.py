"""Eager PyTorch reference of the GRPO loss family: the readable definition the Triton kernels must match.

Shared by the trainer (on machines without Triton), the tests (the golden path, run in float64) and the
benchmarks (the eager baseline). The log-probs and entropies of softmax(z / T) are computed from the
logits here; everything after them is `losses.objective`, TRL 1.16's `_compute_loss` written once for
all loss types (see `grpo_scale.kernels.losses` for the formulas):

    logp_t = z[y_t]/T - logsumexp(z/T)                      (T = temperature)
    r_t    = exp(logp_t - old_t)                            (token level)
    s_i    = exp(sum_t m (logp - old) / max(sum_t m, 1))    (sequence level, GSPO: r_t = s_i for all t)
    L_t    = surrogate(r, A) (x masks, x importance weight) + beta * (exp(ref_t - logp_t) - (ref_t - logp_t) - 1)

aggregated over active tokens (m = 1) as the loss type says.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .loss_types import real_problem
from .losses import IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES, LossSpec, objective  # noqa: F401 (re-exported)


class GRPOLossOutput(NamedTuple):
    """What both GRPO loss implementations return. New fields may be appended, never inserted."""

    loss: torch.Tensor  # 0-d, differentiable w.r.t. logits
    per_token_logps: torch.Tensor  # [B, T] fp32, detached, 0 where the mask is 0
    kl_mean: torch.Tensor  # 0-d, masked mean of the k3 KL over active tokens (0 when beta == 0)
    clip_ratio_low: torch.Tensor  # 0-d, share of active tokens with r < 1 - eps_low and A < 0
    clip_ratio_high: torch.Tensor  # 0-d, share of active tokens with r > 1 + eps_high and A > 0
    clip_ratio_region: torch.Tensor  # 0-d, low or high
    entropy_mean: torch.Tensor  # 0-d, masked mean of the entropy of softmax(z / T)
    bonus_entropy_mean: torch.Tensor  # 0-d, mean entropy over the tokens the entropy bonus acts on
    bonus_tokens: torch.Tensor  # 0-d, how many tokens that is (all active ones without top_entropy_quantile)
    importance_sampling_ratio_mean: torch.Tensor  # 0-d, mean correction weight over active tokens (1: none)
    off_policy_masked: torch.Tensor  # 0-d, share of active tokens the off-policy mask removed


# --------------------------------------------------------------------------------------------------
# Validation, shared with the Triton implementation so both raise the same errors.
# --------------------------------------------------------------------------------------------------
def _check_shape(name: str, tensor: torch.Tensor, expected: tuple, hint: str) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(
            f"{name} has shape {tuple(tensor.shape)} but logits of shape {hint} need {tuple(expected)}"
        )


def _check_tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _check_float(name: str, value, low=None, high=None, low_open=False) -> float:
    problem = real_problem(name, value, low, high, low_open)
    if problem:
        raise ValueError(problem)
    return float(value)


def check_mask(completion_mask: torch.Tensor, shape: tuple, hint: str) -> None:
    """Checks a completion mask: bool, or integer/float holding only 0 and 1.

    A non-bool mask costs one small device-to-host synchronisation (the 0/1 check); pass a bool mask
    to avoid it.
    """
    _check_tensor("completion_mask", completion_mask)
    _check_shape("completion_mask", completion_mask, shape, hint)
    if completion_mask.dtype == torch.bool:
        return
    if completion_mask.is_complex():
        raise ValueError(f"completion_mask must be bool or 0/1 int/float, got {completion_mask.dtype}")
    if bool(((completion_mask != 0) & (completion_mask != 1)).any()):
        raise ValueError(
            "completion_mask must hold only 0 and 1 (1 = the token counts); fractional or other "
            "weights are not supported: fold per-token weights into the advantages instead"
        )


def resolve_spec(spec: LossSpec | None, settings: dict) -> LossSpec:
    """The loss settings of a call: a validated `LossSpec`, or keyword settings (TRL's names) made into one."""
    if spec is None:
        return LossSpec.from_kwargs(**settings)
    if not isinstance(spec, LossSpec):
        raise ValueError(f"spec must be a grpo_scale.kernels.losses.LossSpec, got {type(spec).__name__}")
    if settings:
        raise ValueError(f"pass the loss settings either as spec or as keywords, not both (got spec and {sorted(settings)})")
    return spec


def check_grpo_loss_args(
    logits, completion_ids, advantages, completion_mask, old_logps, ref_logps, sampling_logps=None, *,
    spec: LossSpec, num_items_in_batch, grad_scale,
) -> None:
    """Raises ValueError, with a message that says what to change, for any bad GRPO loss tensor argument
    (the settings were checked when ``spec`` was made)."""
    _check_tensor("logits", logits)
    if logits.dim() != 3:
        raise ValueError(f"logits must have shape [B, T, V], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point (fp32/bf16/fp16), got {logits.dtype}")
    B, T, V = logits.shape
    if V == 0:
        raise ValueError("logits have an empty vocabulary dimension (V = 0)")
    hint = f"[B, T, V] = {[B, T, V]}"
    _check_tensor("completion_ids", completion_ids)
    _check_shape("completion_ids", completion_ids, (B, T), hint)
    if completion_ids.is_floating_point() or completion_ids.is_complex() or completion_ids.dtype == torch.bool:
        raise ValueError(f"completion_ids must be an integer tensor (int64), got {completion_ids.dtype}")
    _check_tensor("advantages", advantages)
    _check_shape("advantages", advantages, (B,), hint)
    if not advantages.is_floating_point():
        raise ValueError(f"advantages must be floating point, got {advantages.dtype}")
    tensors = (("old_logps", old_logps), ("ref_logps", ref_logps), ("sampling_logps", sampling_logps))
    for name, value in tensors:
        if value is not None:
            _check_tensor(name, value)
            _check_shape(name, value, (B, T), hint)
            if not value.is_floating_point():
                raise ValueError(f"{name} must be floating point (fp32), got {value.dtype}")
    for name, value in (("completion_ids", completion_ids), ("advantages", advantages),
                        ("completion_mask", completion_mask), *tensors):
        if isinstance(value, torch.Tensor) and value.device != logits.device:
            raise ValueError(f"{name} is on {value.device} but logits are on {logits.device}: move it")
    if spec.beta > 0 and ref_logps is None:
        raise ValueError("beta > 0 needs ref_logps (the reference model's log-probs); pass them or set beta=0")
    if _check_float("grad_scale", grad_scale) in (float("inf"), float("-inf")):
        raise ValueError(f"grad_scale must be finite, got {grad_scale}")
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            if num_items_in_batch.numel() != 1:
                raise ValueError(
                    f"num_items_in_batch must be a number or a one-element tensor, got shape "
                    f"{tuple(num_items_in_batch.shape)}"
                )
        else:
            _check_float("num_items_in_batch", num_items_in_batch, low=0.0, low_open=True)
    check_mask(completion_mask, (B, T), hint)


def check_selective_logps_args(logits, completion_ids, temperature) -> None:
    """Raises ValueError for bad `selective_logps` arguments."""
    _check_tensor("logits", logits)
    if logits.dim() != 3 or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating [B, T, V] tensor, got {logits.dtype} {tuple(logits.shape)}")
    B, T, V = logits.shape
    _check_tensor("completion_ids", completion_ids)
    _check_shape("completion_ids", completion_ids, (B, T), f"[B, T, V] = {[B, T, V]}")
    if completion_ids.is_floating_point() or completion_ids.is_complex() or completion_ids.dtype == torch.bool:
        raise ValueError(f"completion_ids must be an integer tensor (int64), got {completion_ids.dtype}")
    if completion_ids.device != logits.device:
        raise ValueError(f"completion_ids is on {completion_ids.device} but logits are on {logits.device}")
    _check_float("temperature", temperature, low=0.0, low_open=True)


# --------------------------------------------------------------------------------------------------
# The loss.
# --------------------------------------------------------------------------------------------------
class _ScaleGrad(torch.autograd.Function):
    """Identity in the forward, multiplies the gradient by `scale` in the backward."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def _logps_and_entropy(logits, ids, temperature, dtype, entropy_grad: bool):
    """Per-token log-prob of `ids` (differentiable) and entropy of softmax(z/T), [B, T] each; the entropy is
    differentiable only when ``entropy_grad`` (the entropy bonus), else computed without a graph."""
    if temperature == 1.0:
        logprobs = logits.log_softmax(-1, dtype=dtype)  # upcasts inside the kernel: no extra copy
    else:
        logprobs = (logits.to(dtype) / temperature).log_softmax(-1)
    logp = logprobs.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    if entropy_grad:
        return logp, -(logprobs.exp() * logprobs).sum(-1)
    with torch.no_grad():
        plogp = logprobs.exp().mul_(logprobs)  # one N x V temporary, freed at once
        entropy = -plogp.sum(-1)
    return logp, entropy


def grpo_loss_reference(
    logits: torch.Tensor,
    completion_ids: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    old_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    *,
    sampling_logps: torch.Tensor | None = None,
    spec: LossSpec | None = None,
    num_items_in_batch=None,
    inplace: bool = False,
    grad_scale: float = 1.0,
    gather=None,
    **settings,
) -> GRPOLossOutput:
    """GRPO loss family in eager PyTorch (fp32 maths for low-precision logits; float64 stays float64).

    Args:
        logits: [B, T, V] fp32/bf16/fp16 (float64 for gradient checks); logits[:, t] scores
            completion_ids[:, t] (already shifted). May be a strided view.
        completion_ids: [B, T] integer. Ids at masked positions are ignored (padding may be anything).
        advantages: [B] float.
        completion_mask: [B, T] bool or 0/1 int/float; 1 = the token counts.
        old_logps: [B, T] or None (on-policy: old = logp.detach(), so the ratio is 1 with a gradient).
        ref_logps: [B, T]; required when beta > 0.
        sampling_logps: [B, T] the sampler's log-probs of the completion tokens (NaN where unknown), for
            the importance-sampling correction and the off-policy mask; None: the sampler is the policy.
        spec: a `LossSpec`, or instead the settings as keywords (``**settings``, TRL's names): loss_type
            ("grpo" | "bnpo" | "dr_grpo" | "dapo" | "luspo" | "cispo" | "sapo" | "vespo"), beta,
            epsilon_low, epsilon_high, delta, temperature, importance_sampling_level ("token" | "sequence",
            GSPO), max_completion_length (the dr_grpo normaliser, default T), use_bias_correction_kl,
            importance_sampling_mode / _clip_min / _clip_max, off_policy_mask_threshold,
            top_entropy_quantile, entropy_coef, sapo_temperature_pos / _neg, vespo_k_pos / _lambda_pos /
            _k_neg / _lambda_neg. Defaults are `LossSpec`'s.
        num_items_in_batch: normaliser of dapo / cispo / vespo, a number or a one-element tensor (default:
            the number of active tokens in this call, at least 1).
        inplace: accepted for signature compatibility with the Triton version and ignored.
        grad_scale: multiplies the gradient of the loss (not the returned loss value); the Triton
            version folds it into the gradient it stores during the forward.
        gather: maps this rank's 1-D tensor of active entropies to all ranks' (top_entropy_quantile).

    Returns:
        GRPOLossOutput; everything but `loss` is detached. Tensors are fp32 (float64 for float64 logits).
    """
    spec = resolve_spec(spec, settings)
    check_grpo_loss_args(logits, completion_ids, advantages, completion_mask, old_logps, ref_logps, sampling_logps,
                         spec=spec, num_items_in_batch=num_items_in_batch, grad_scale=grad_scale)
    del inplace  # the eager path never consumes the logits
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    mask = completion_mask != 0  # [B, T] bool
    ids = completion_ids.masked_fill(~mask, 0).long()  # padding ids may be out of range

    logp, entropy = _logps_and_entropy(logits, ids, float(spec.temperature), dtype, spec.entropy_coef != 0)
    terms = objective(logp, entropy, advantages, mask, spec, old=old_logps, ref=ref_logps, sampling=sampling_logps,
                      num_items_in_batch=num_items_in_batch, gather=gather)
    loss = terms.loss
    if grad_scale != 1.0:
        loss = _ScaleGrad.apply(loss, float(grad_scale))
    return GRPOLossOutput(loss, torch.where(mask, logp.detach(), 0.0), *terms[1:])


def selective_logps_reference(
    logits: torch.Tensor, completion_ids: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """log softmax(logits / T)[ids] without building a graph.

    Args:
        logits: [B, T, V] floating. completion_ids: [B, T] integer, in [0, V).
    Returns:
        [B, T] fp32 (float64 for float64 logits).
    """
    check_selective_logps_args(logits, completion_ids, temperature)
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        z = logits.to(dtype)
        if temperature != 1.0:
            z = z / temperature
        picked = z.gather(-1, completion_ids.long().unsqueeze(-1)).squeeze(-1)
        return picked - torch.logsumexp(z, dim=-1)
