"""Fused GRPO loss family in Triton: same signature, results and errors as `reference.grpo_loss_reference`.

Memory traffic decides the speed (U = one pass over the logits, B*T*V elements). Two paths, chosen per
call by `LossSpec.one_pass`:

- one launch, 2U (token-level grpo / bnpo / dr_grpo / dapo / luspo / cispo / sapo, with or without old
  log-probs, KL (bias-corrected or not), token-mode importance-sampling weights and a fixed entropy
  bonus): per row, pass 1 streams the logits once for an online logsumexp and entropy (exp2, with 1/T and
  log2(e) folded into one multiplier); the token's log-prob, ratio, surrogate, importance weight, KL and
  clip flags follow, and with them the token's gradient weights g = dL/dlogp and e = dL/dH, all known
  at forward time; pass 2 re-reads the same row (from L2 on a GPU) and writes
  dL/dz = (g (onehot(y) - p) - e p (log p + H)) / T, into the logits themselves when `inplace=True`.
  This in-kernel per-token formula is the only second copy of `losses.objective`, and is tested against it.
- two launches, 3U (GSPO's sequence ratio, VESPO's summed ratio, sequence-mode importance weights, the
  off-policy mask, the top-entropy quantile): launch 1 writes every row's log-prob, entropy and
  log-sum-exp (1U); `losses.objective` runs on those [B, T] values and autograd gives g and e per token
  ([B, T] work); launch 2 writes the gradient (2U); rows whose g and e are 0 write zeros unread.

The autograd backward only applies the upstream gradient, and skips all work on the device when it is
exactly 1. Kernels -> host launchers -> torch.autograd.Function -> public functions, from top to bottom.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._launch import check_device, row_config
from .losses import LossSpec, objective, row_weights
from .reference import (
    GRPOLossOutput,
    check_grpo_loss_args,
    check_selective_logps_args,
    resolve_spec,
)

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# Rows of the per-token statistics buffer written by the token kernel ([_N_STATS, B*T] fp32).
_LOGP, _LOSS, _KL, _ENT, _LOW, _HIGH, _ISW, _N_STATS = range(8)
# Rows of the buffer written by the two-pass path's first launch.
_SEQ_LOGP, _SEQ_ENT, _SEQ_LSE2, _SEQ_N = range(4)
# In-kernel surrogates (LossType.kernel_id) and importance-sampling modes.
_CLIP, _CISPO, _SAPO = 0, 1, 2
_IS_NONE, _IS_TRUNCATE, _IS_MASK = 0, 1, 2


# --------------------------------------------------------------------------------------------------
# Kernels. One program per token row; rows are addressed through (batch, time) strides in int64.
# --------------------------------------------------------------------------------------------------
@triton.jit
def _row_logsumexp(row_ptr, V, c, BLOCK_V: tl.constexpr, WITH_ENTROPY: tl.constexpr):
    """Online pass over x = z * c (c = log2(e) / T): returns the running max mx, s = sum 2^(x - mx)
    and a = sum 2^(x - mx) * (x - mx) (for the entropy; kept relative to mx to avoid cancellation)."""
    cols = tl.arange(0, BLOCK_V)
    mx = tl.zeros([], dtype=tl.float32) - 1e30  # finite, so the first rescale is 0 and not NaN
    s = tl.zeros([], dtype=tl.float32)
    a = tl.zeros([], dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        inside = offs < V
        x = tl.load(row_ptr + offs, mask=inside, other=float("-inf")).to(tl.float32) * c
        m_new = tl.maximum(mx, tl.max(x, axis=0))
        rescale = tl.exp2(mx - m_new)
        p = tl.exp2(x - m_new)
        if WITH_ENTROPY:
            a = rescale * (a + (mx - m_new) * s) + tl.sum(p * tl.where(inside, x - m_new, 0.0), axis=0)
        s = s * rescale + tl.sum(p, axis=0)
        mx = m_new
    return mx, s, a


@triton.jit
def _write_grad_row(row_ptr, grad_row_ptr, y, V, c, lse2, coef, ecoef, entropy, BLOCK_V: tl.constexpr,
                    WITH_ENT: tl.constexpr):
    """grad[v] = coef * (onehot(y)[v] - p[v]) + ecoef * p[v] * (log p[v] + H), with p = softmax(z/T)
    = 2^(z*c - lse2); the second term is the entropy's (coef = g/T, ecoef = -e/T, see the module doc)."""
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        inside = offs < V
        x2 = tl.load(row_ptr + offs, mask=inside, other=0.0).to(tl.float32) * c - lse2
        p = tl.exp2(x2)
        g = -coef * p
        if WITH_ENT:
            g += ecoef * p * (x2 * 0.6931471805599453 + entropy)
        g = tl.where(offs == y, g + coef, g)
        tl.store(grad_row_ptr + offs, g.to(grad_row_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _zero_row(grad_row_ptr, V, BLOCK_V: tl.constexpr):
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        zeros = tl.zeros([BLOCK_V], dtype=grad_row_ptr.dtype.element_ty)
        tl.store(grad_row_ptr + offs, zeros, mask=offs < V)


@triton.jit
def _grpo_token_kernel(
    logits_ptr, grad_ptr, ids_ptr, mask_ptr, adv_ptr, weight_ptr, old_ptr, ref_ptr, sampling_ptr, ent_w_ptr,
    stats_ptr, T, V, N, stride_lb, stride_lt, stride_gb, stride_gt,
    eps_low, eps_high, delta, beta, inv_temp, grad_scale, tau_pos, tau_neg, is_min, is_max,
    SURR: tl.constexpr, HAS_OLD: tl.constexpr, HAS_KL: tl.constexpr, BIAS_KL: tl.constexpr,
    IS_MODE: tl.constexpr, HAS_ENT: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row % T
    row_ptr = logits_ptr + b * stride_lb + t * stride_lt
    grad_row_ptr = grad_ptr + b * stride_gb + t * stride_gt
    if tl.load(mask_ptr + row) == 0:
        # A masked row writes zeros without reading its logits.
        for k in tl.static_range(7):
            tl.store(stats_ptr + k * N + row, 0.0)
        if WRITE_GRAD:
            _zero_row(grad_row_ptr, V, BLOCK_V)
        return

    # Pass 1: logsumexp and entropy of z/T in base 2.
    c = inv_temp * 1.4426950408889634
    mx, s, a = _row_logsumexp(row_ptr, V, c, BLOCK_V, True)
    lse2 = mx + tl.log2(s)
    entropy = (tl.log2(s) - a / s) * 0.6931471805599453
    y = tl.load(ids_ptr + row).to(tl.int64)
    logp = (tl.load(row_ptr + y).to(tl.float32) * c - lse2) * 0.6931471805599453

    # The token's loss and dL/dlogp (losses.objective, token level); d ratio / d logp = ratio.
    adv = tl.load(adv_ptr + b)
    if HAS_OLD:
        ratio = tl.exp(logp - tl.load(old_ptr + row))
    else:
        ratio = tl.exp(logp - logp)  # on-policy: exactly 1, with a gradient
    lo = 1.0 - eps_low
    hi = 1.0 + eps_high
    if SURR == 0:  # clipped: -min(min(r, delta) A, clip(r) A)
        surr1 = tl.minimum(ratio, delta) * adv
        surr2 = tl.minimum(tl.maximum(ratio, lo), hi) * adv
        d1 = tl.where(ratio <= delta, adv * ratio, 0.0)
        d2 = tl.where((ratio >= lo) & (ratio <= hi), adv * ratio, 0.0)
        # min(surr1, surr2) sends the gradient to the smaller term, half to each on a tie (as torch.min).
        dmin = tl.where(surr1 < surr2, d1, tl.where(surr1 > surr2, d2, 0.5 * (d1 + d2)))
        loss = -tl.minimum(surr1, surr2)
        dloss = -dmin
        low = (ratio < lo) & (adv < 0)
        high = (ratio > hi) & (adv > 0)
    elif SURR == 1:  # cispo: -sg(min(r, eps_high)) A logp
        cap = tl.minimum(ratio, eps_high)
        loss = -cap * adv * logp
        dloss = -cap * adv
        low = ratio != ratio  # never (a boolean of the right shape)
        high = (ratio > eps_high) & (adv > 0)
    else:  # sapo: -sigmoid(tau (r - 1)) 4 / tau A
        tau = tl.where(adv > 0, tau_pos, tau_neg)
        gate = tl.sigmoid(tau * (ratio - 1.0))
        loss = -gate * 4.0 / tau * adv
        dloss = -4.0 * adv * gate * (1.0 - gate) * ratio
        low = ratio != ratio
        high = ratio != ratio
    isw = 1.0
    if IS_MODE != 0:  # TRL's token-mode correction weight from old (or logp) and the sampler's log-prob
        if HAS_OLD:
            gap = tl.load(old_ptr + row) - tl.load(sampling_ptr + row)
        else:
            gap = logp - tl.load(sampling_ptr + row)
        gap = tl.where(gap != gap, 0.0, gap)  # an unknown (NaN) sampler log-prob: no correction
        isw = tl.exp(gap)
        if IS_MODE == 1:
            isw = tl.minimum(tl.maximum(isw, is_min), is_max)
        else:
            isw = tl.where((isw < is_min) | (isw > is_max), 0.0, isw)
        loss = loss * isw
        dloss = dloss * isw
    kl = 0.0
    if HAS_KL:
        diff = tl.load(ref_ptr + row) - logp
        kl = tl.exp(diff) - diff - 1.0
        dkl = 1.0 - tl.exp(diff)
        if BIAS_KL:  # kl * r: d/dlogp = dkl r + kl r
            dkl = (dkl + kl) * ratio
            kl = kl * ratio
        loss += beta * kl
        dloss += beta * dkl
    weight = tl.load(weight_ptr + b)
    loss = weight * loss
    ecoef = 0.0
    if HAS_ENT:  # the bonus -coef * mean(H): ent_w = coef / active tokens; dL/dH = -ent_w
        ent_w = tl.load(ent_w_ptr)
        loss -= ent_w * entropy
        ecoef = ent_w * grad_scale * inv_temp
    # Statistics rows, in the order of _LOGP, _LOSS, _KL, _ENT, _LOW, _HIGH, _ISW.
    tl.store(stats_ptr + row, logp)
    tl.store(stats_ptr + N + row, loss)
    tl.store(stats_ptr + 2 * N + row, kl)
    tl.store(stats_ptr + 3 * N + row, entropy)
    tl.store(stats_ptr + 4 * N + row, low.to(tl.float32))
    tl.store(stats_ptr + 5 * N + row, high.to(tl.float32))
    tl.store(stats_ptr + 6 * N + row, isw)

    # Pass 2: the same row again, still in L2 on a GPU.
    if WRITE_GRAD:
        coef = weight * dloss * grad_scale * inv_temp
        _write_grad_row(row_ptr, grad_row_ptr, y, V, c, lse2, coef, ecoef, entropy, BLOCK_V, HAS_ENT)


@triton.jit
def _sequence_logp_kernel(
    logits_ptr, ids_ptr, mask_ptr, out_ptr, T, V, N, stride_lb, stride_lt, inv_temp,
    BLOCK_V: tl.constexpr,
):
    """Two-pass path, launch 1 (1U): per active row, logp, entropy and log2-sum-exp2 for launch 2."""
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row % T
    if tl.load(mask_ptr + row) == 0:
        for k in tl.static_range(3):
            tl.store(out_ptr + k * N + row, 0.0)
        return
    row_ptr = logits_ptr + b * stride_lb + t * stride_lt
    c = inv_temp * 1.4426950408889634
    mx, s, a = _row_logsumexp(row_ptr, V, c, BLOCK_V, True)
    lse2 = mx + tl.log2(s)
    y = tl.load(ids_ptr + row).to(tl.int64)
    # Rows in the order of _SEQ_LOGP, _SEQ_ENT, _SEQ_LSE2.
    tl.store(out_ptr + row, (tl.load(row_ptr + y).to(tl.float32) * c - lse2) * 0.6931471805599453)
    tl.store(out_ptr + N + row, (tl.log2(s) - a / s) * 0.6931471805599453)
    tl.store(out_ptr + 2 * N + row, lse2)


@triton.jit
def _sequence_grad_kernel(
    logits_ptr, grad_ptr, ids_ptr, coef_ptr, ecoef_ptr, rows_ptr, T, V, N, stride_lb, stride_lt, stride_gb,
    stride_gt, inv_temp, WITH_ENT: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Two-pass path, launch 2 (2U): the gradient from per-row coefficients; rows whose coefficients are 0
    are not read. ``rows_ptr`` is launch 1's buffer (entropy and log2-sum-exp2)."""
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row % T
    grad_row_ptr = grad_ptr + b * stride_gb + t * stride_gt
    coef = tl.load(coef_ptr + row)
    ecoef = 0.0
    if WITH_ENT:
        ecoef = tl.load(ecoef_ptr + row)
    if (coef == 0) & (ecoef == 0):
        _zero_row(grad_row_ptr, V, BLOCK_V)
        return
    row_ptr = logits_ptr + b * stride_lb + t * stride_lt
    y = tl.load(ids_ptr + row).to(tl.int64)
    c = inv_temp * 1.4426950408889634
    _write_grad_row(row_ptr, grad_row_ptr, y, V, c, tl.load(rows_ptr + 2 * N + row), coef, ecoef,
                    tl.load(rows_ptr + N + row), BLOCK_V, WITH_ENT)


@triton.jit
def _selective_logps_kernel(
    logits_ptr, ids_ptr, out_ptr, T, V, stride_lb, stride_lt, inv_temp, BLOCK_V: tl.constexpr,
):
    """logp of one id per row, one read of the row (1U)."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + (row // T) * stride_lb + (row % T) * stride_lt
    c = inv_temp * 1.4426950408889634
    mx, s, a = _row_logsumexp(row_ptr, V, c, BLOCK_V, False)
    y = tl.load(ids_ptr + row).to(tl.int64)
    logp = (tl.load(row_ptr + y).to(tl.float32) * c - mx - tl.log2(s)) * 0.6931471805599453
    tl.store(out_ptr + row, logp)


@triton.jit
def _scale_rows_kernel(grad_ptr, scale_ptr, T, V, stride_gb, stride_gt, BLOCK_V: tl.constexpr):
    """grad *= scale, decided on the device: a scale of exactly 1 reads and writes nothing."""
    scale = tl.load(scale_ptr).to(tl.float32)
    if scale != 1.0:
        row = tl.program_id(0).to(tl.int64)
        grad_row_ptr = grad_ptr + (row // T) * stride_gb + (row % T) * stride_gt
        cols = tl.arange(0, BLOCK_V)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            inside = offs < V
            g = tl.load(grad_row_ptr + offs, mask=inside, other=0.0).to(tl.float32)
            tl.store(grad_row_ptr + offs, (g * scale).to(grad_row_ptr.dtype.element_ty), mask=inside)


# --------------------------------------------------------------------------------------------------
# Host side.
# --------------------------------------------------------------------------------------------------
@dataclass
class _Inputs:
    """Everything but the logits, flattened to [B*T] fp32 (tiny next to the logits) where it helps."""

    ids: torch.Tensor  # [N] integer
    mask: torch.Tensor  # [B, T] bool
    mask_f: torch.Tensor  # [N] fp32
    advantages: torch.Tensor  # [B] fp32
    weights: torch.Tensor  # [B] fp32: each active token's loss weight (the aggregation)
    old: torch.Tensor | None  # [N] fp32
    ref: torch.Tensor | None  # [N] fp32, only when beta > 0
    sampling: torch.Tensor | None  # [N] fp32, the sampler's log-probs
    ent_w: torch.Tensor  # [1] fp32: entropy_coef / active tokens (the one-launch path's bonus weight)
    spec: LossSpec
    num_items_in_batch: object
    gather: object
    grad_scale: float
    inplace: bool

    @property
    def one_pass(self) -> bool:
        return self.spec.one_pass(self.old is not None, self.sampling is not None)


def _flat(t):
    return None if t is None else t.detach().to(torch.float32).reshape(-1).contiguous()


def build_inputs(completion_ids, advantages, completion_mask, old_logps, ref_logps, sampling_logps, *, spec,
                 num_items_in_batch, inplace, grad_scale, gather) -> _Inputs:
    """Everything the launchers need besides the logits, from validated public arguments."""
    mask = completion_mask != 0
    mask_f = mask.reshape(-1).to(torch.float32)
    return _Inputs(
        ids=completion_ids.reshape(-1), mask=mask, mask_f=mask_f,
        advantages=advantages.detach().to(torch.float32).contiguous(),
        weights=row_weights(mask, spec, num_items_in_batch),
        old=_flat(old_logps), ref=_flat(ref_logps) if spec.beta > 0 else None, sampling=_flat(sampling_logps),
        ent_w=(spec.entropy_coef / mask_f.sum().clamp(min=1)).reshape(1),
        spec=spec, num_items_in_batch=num_items_in_batch, gather=gather, grad_scale=float(grad_scale),
        inplace=bool(inplace),
    )


def _new_grad(logits, inplace: bool) -> torch.Tensor:
    if inplace:
        return logits.detach()  # the logits' own memory, strides included
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def launch_token_kernel(logits, grad, inp: _Inputs) -> torch.Tensor:
    """One launch over logits [B', T', V] (the one-pass path): returns the statistics [_N_STATS, B'*T'] fp32
    and, when `grad` is given (may be the logits themselves), writes the final gradient into it."""
    B, T, V = logits.shape
    N = B * T
    spec = inp.spec
    stats = torch.empty(_N_STATS, N, dtype=torch.float32, device=logits.device)
    g = grad if grad is not None else logits  # a valid pointer; never written without WRITE_GRAD
    has_kl = spec.beta > 0
    mode = spec.importance_sampling_mode if inp.sampling is not None else None
    is_mode = _IS_NONE if mode is None else (_IS_TRUNCATE if mode.endswith("truncate") else _IS_MASK)
    lo, hi = spec.importance_sampling_clip_min, spec.importance_sampling_clip_max
    if N == 0:  # Triton grids must not be empty
        return stats
    _grpo_token_kernel[(N,)](
        logits, g, inp.ids, inp.mask_f, inp.advantages, inp.weights,
        inp.old if inp.old is not None else stats, inp.ref if has_kl else stats,
        inp.sampling if inp.sampling is not None else stats, inp.ent_w, stats,
        T, V, N, logits.stride(0), logits.stride(1), g.stride(0), g.stride(1),
        spec.epsilon_low, spec.epsilon_high, float("inf") if spec.delta is None else spec.delta, spec.beta,
        1.0 / spec.temperature, inp.grad_scale, spec.params_of("sapo_temperature_pos"),
        spec.params_of("sapo_temperature_neg"), 0.0 if lo is None else lo, float("inf") if hi is None else hi,
        SURR=spec.kind.kernel_id, HAS_OLD=inp.old is not None, HAS_KL=has_kl,
        BIAS_KL=has_kl and spec.use_bias_correction_kl, IS_MODE=is_mode, HAS_ENT=spec.entropy_coef != 0,
        WRITE_GRAD=grad is not None, **row_config(V, _grpo_token_kernel),
    )
    return stats


def token_outputs(stats, inp: _Inputs, B: int, T: int):
    """Loss and metrics from the token kernel's statistics ([B*T]-sized reductions only)."""
    n_active = inp.mask_f.sum().clamp(min=1)
    zero = torch.zeros((), dtype=torch.float32, device=stats.device)
    low, high = stats[_LOW].sum() / n_active, stats[_HIGH].sum() / n_active
    entropy = stats[_ENT].sum() / n_active
    has_is = inp.spec.importance_sampling_mode is not None and inp.sampling is not None
    outputs = (
        stats[_LOGP].view(B, T),
        stats[_KL].sum() / n_active if inp.spec.beta > 0 else zero,
        low, high, low + high,  # a token is never clipped low and high at once (sign of A)
        entropy, entropy, inp.mask_f.sum(),
        stats[_ISW].sum() / n_active if has_is else zero + 1, zero,
    )
    return stats[_LOSS].sum(), outputs


def _token_forward(logits, inp: _Inputs, write_grad: bool):
    """One launch: statistics for every token and, when asked, the final gradient of the logits."""
    B, T, _ = logits.shape
    grad = _new_grad(logits, inp.inplace) if write_grad else None
    stats = launch_token_kernel(logits, grad, inp)
    return (*token_outputs(stats, inp, B, T), grad)


def launch_stats_kernel(logits, inp: _Inputs) -> torch.Tensor:
    """Launch 1 of the two-pass path over logits [B', T', V]: [_SEQ_N, B'*T'] fp32 (logp, entropy, lse2)."""
    B, T, V = logits.shape
    N = B * T
    rows = torch.empty(_SEQ_N, N, dtype=torch.float32, device=logits.device)
    if N == 0:
        return rows
    _sequence_logp_kernel[(N,)](
        logits, inp.ids, inp.mask_f, rows, T, V, N, logits.stride(0), logits.stride(1),
        1.0 / inp.spec.temperature, **row_config(V, _sequence_logp_kernel),
    )
    return rows


def launch_grad_kernel(logits, grad, ids, coef, ecoef, rows, temperature: float) -> None:
    """Launch 2 over logits [B', T', V]: the gradient from per-row coefficients [B'*T'] (``ecoef`` None:
    no entropy term) and launch 1's ``rows`` of the same rows."""
    B, T, V = logits.shape
    N = B * T
    if N == 0:
        return
    coef = coef.reshape(-1).contiguous()
    _sequence_grad_kernel[(N,)](
        logits, grad, ids, coef, coef if ecoef is None else ecoef.reshape(-1).contiguous(),
        rows.contiguous(), T, V, N, logits.stride(0), logits.stride(1), grad.stride(0), grad.stride(1),
        1.0 / temperature, WITH_ENT=ecoef is not None, **row_config(V, _sequence_grad_kernel),
    )


def two_pass_outputs(rows, inp: _Inputs, B: int, T: int, write_grad: bool):
    """`losses.objective` on launch 1's log-probs and entropies; returns the loss, the metrics and the
    gradient coefficients (coef, ecoef) of every row for launch 2 (None when not asked)."""
    spec = inp.spec
    mask = inp.mask
    logp = rows[_SEQ_LOGP].view(B, T)
    with torch.enable_grad():
        lp = logp.detach().requires_grad_(write_grad)
        ent = rows[_SEQ_ENT].view(B, T).detach().requires_grad_(write_grad and spec.entropy_coef != 0)
        terms = objective(lp, ent, inp.advantages, mask, spec,
                          old=None if inp.old is None else inp.old.view(B, T),
                          ref=None if inp.ref is None else inp.ref.view(B, T),
                          sampling=None if inp.sampling is None else inp.sampling.view(B, T),
                          num_items_in_batch=inp.num_items_in_batch, gather=inp.gather)
        coefs = None
        if write_grad:
            leaves = [lp] + ([ent] if ent.requires_grad else [])
            grads = torch.autograd.grad(terms.loss, leaves, allow_unused=True)
            scale = inp.grad_scale / spec.temperature
            coef = torch.zeros_like(logp) if grads[0] is None else grads[0] * scale
            ecoef = None if len(grads) == 1 or grads[1] is None else -grads[1] * scale
            coefs = (coef.detach(), None if ecoef is None else ecoef.detach())
    outputs = (torch.where(mask, logp, 0.0), *(t.detach() for t in terms[1:]))
    return terms.loss.detach(), outputs, coefs


def _two_pass_forward(logits, inp: _Inputs, write_grad: bool):
    """Launch 1 (log-probs, entropies), the objective in torch, launch 2 (gradient)."""
    B, T, _ = logits.shape
    rows = launch_stats_kernel(logits, inp)
    loss, outputs, coefs = two_pass_outputs(rows, inp, B, T, write_grad)
    grad = None
    if write_grad:
        grad = _new_grad(logits, inp.inplace)
        launch_grad_kernel(logits, grad, inp.ids, *coefs, rows, inp.spec.temperature)
    return loss, outputs, grad


def _forward(logits, inp: _Inputs, write_grad: bool):
    run = _token_forward if inp.one_pass else _two_pass_forward
    return run(logits, inp, write_grad)


def _scale_grad_(grad: torch.Tensor, scale: torch.Tensor) -> None:
    """grad *= scale in place, without reading `scale` on the host."""
    B, T, V = grad.shape
    scale = scale.detach().reshape(1).to(torch.float32)
    if B * T == 0:
        return
    _scale_rows_kernel[(B * T,)](grad, scale, T, V, grad.stride(0), grad.stride(1),
                                 **row_config(V, _scale_rows_kernel))


class _GRPOLossFunction(torch.autograd.Function):
    """The forward stores the final gradient; the backward only applies the upstream scale."""

    @staticmethod
    def forward(ctx, logits, inp: _Inputs):
        loss, outputs, grad = _forward(logits, inp, write_grad=True)
        ctx.grad = grad
        ctx.mark_non_differentiable(*outputs)
        return (loss, *outputs)

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError("grpo_loss stores one gradient and supports a single backward pass")
        _scale_grad_(grad, grad_loss)
        return grad, None


# --------------------------------------------------------------------------------------------------
# Public functions.
# --------------------------------------------------------------------------------------------------
def grpo_loss(
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
    """GRPO loss family with fused Triton kernels; the same results and errors as `grpo_loss_reference`.

    Args:
        logits: [B, T, V] fp32/bf16/fp16 on CUDA (or CPU under TRITON_INTERPRET=1); logits[:, t]
            scores completion_ids[:, t]. May be a strided view with a contiguous last dimension: rows
            are addressed through its strides, never copied.
        completion_ids: [B, T] integer in [0, V) where the mask is 1 (other positions are not read).
        advantages: [B] float. completion_mask: [B, T] bool or 0/1 int/float (a bool mask avoids the
            one small host synchronisation of the 0/1 check).
        old_logps: [B, T] or None (on-policy). ref_logps: [B, T], required when beta > 0.
        sampling_logps, spec / **settings, num_items_in_batch, gather: as in `grpo_loss_reference`
            (num_items_in_batch may be a device tensor; it is never read on the host).
        inplace: write the gradient into the logits buffer (they are consumed: do not use the logits
            after this call, and make sure nothing else saved them for its backward). Saves B*T*V
            elements of memory.
        grad_scale: the gradient the kernel stores is grad_scale * d loss / d logits; the returned
            loss value is not scaled. The backward then multiplies by the upstream gradient, and does
            no work at all when that is exactly 1. So pass the factor your training loop would apply
            to the loss before backward (1 / gradient_accumulation_steps) here instead, and call
            backward on the unscaled loss: the stored gradient is then already final.

    Returns:
        GRPOLossOutput; only `loss` carries a gradient, and only one backward pass may run through it.

    Example:
        >>> out = grpo_loss(logits, ids, adv, mask, beta=0.04, ref_logps=ref, grad_scale=1 / 4)
        >>> out.loss.backward()  # logits.grad is final, including the 1/4
    """
    spec = resolve_spec(spec, settings)
    check_grpo_loss_args(logits, completion_ids, advantages, completion_mask, old_logps, ref_logps, sampling_logps,
                         spec=spec, num_items_in_batch=num_items_in_batch, grad_scale=grad_scale)
    check_device("grpo_loss", logits, _grpo_token_kernel)
    if logits.stride(-1) != 1:
        raise ValueError(f"logits need a contiguous last dimension, got strides {logits.stride()}")
    inp = build_inputs(completion_ids, advantages, completion_mask, old_logps, ref_logps, sampling_logps, spec=spec,
                       num_items_in_batch=num_items_in_batch, inplace=inplace, grad_scale=grad_scale, gather=gather)
    if torch.is_grad_enabled() and logits.requires_grad:
        return GRPOLossOutput(*_GRPOLossFunction.apply(logits, inp))
    loss, outputs, _ = _forward(logits.detach(), inp, write_grad=False)
    return GRPOLossOutput(loss, *outputs)


def selective_logps(logits: torch.Tensor, completion_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T)[ids], one read of the logits, no graph.

    Args:
        logits: [B, T, V] fp32/bf16/fp16 on CUDA (or CPU under TRITON_INTERPRET=1), contiguous last dim.
        completion_ids: [B, T] integer in [0, V).
    Returns:
        [B, T] fp32.
    """
    check_selective_logps_args(logits, completion_ids, temperature)
    check_device("selective_logps", logits, _selective_logps_kernel)
    if logits.stride(-1) != 1:
        raise ValueError(f"logits need a contiguous last dimension, got strides {logits.stride()}")
    B, T, V = logits.shape
    out = torch.empty(B, T, dtype=torch.float32, device=logits.device)
    if B * T == 0:
        return out
    with torch.no_grad():
        _selective_logps_kernel[(B * T,)](
            logits, completion_ids.reshape(-1), out, T, V, logits.stride(0), logits.stride(1),
            1.0 / float(temperature), **row_config(V, _selective_logps_kernel),
        )
    return out
