"""Fused GRPO loss in Triton: same signature, results and errors as `reference.grpo_loss_reference`.

Memory traffic decides the speed (U = one pass over the logits, B*T*V elements):

- token level, ONE launch, 2U: per row, pass 1 streams the logits once for an online logsumexp and
  entropy (exp2, with 1/T and log2(e) folded into one multiplier); the token's log-prob, ratio,
  clipped surrogate, k3 KL and clip flags follow, and with them the token's gradient weight g_t
  (known at forward time for all four loss types); pass 2 re-reads the same row (from L2 on a GPU)
  and writes dL/dz = g_t * (onehot(y) - softmax(z/T)) / T, into the logits themselves when
  `inplace=True`. The autograd backward only applies the upstream gradient, and skips all work on the
  device when it is exactly 1.
- sequence level (GSPO), 3U: a log-prob pass, the per-sequence ratio in torch ([B, T] work), then a
  gradient pass; rows whose gradient weight is 0 (masked, or A = 0 without KL) write zeros unread.

Kernels -> host launchers -> torch.autograd.Function -> public functions, from top to bottom.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._launch import check_device, row_config
from .reference import (
    GRPOLossOutput,
    check_grpo_loss_args,
    check_selective_logps_args,
)

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# Rows of the per-token statistics buffer written by the token kernel ([_N_STATS, B*T] fp32).
_LOGP, _LOSS, _KL, _ENT, _LOW, _HIGH, _N_STATS = range(7)
# Rows of the buffer written by the sequence-level log-prob kernel.
_SEQ_LOGP, _SEQ_ENT, _SEQ_LSE2, _SEQ_N = range(4)


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
def _write_grad_row(row_ptr, grad_row_ptr, y, V, c, lse2, coef, BLOCK_V: tl.constexpr):
    """grad[v] = coef * (onehot(y)[v] - softmax(z/T)[v]), with softmax = 2^(z*c - lse2)."""
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        inside = offs < V
        x = tl.load(row_ptr + offs, mask=inside, other=0.0).to(tl.float32) * c
        g = -coef * tl.exp2(x - lse2)
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
    logits_ptr, grad_ptr, ids_ptr, mask_ptr, adv_ptr, weight_ptr, old_ptr, ref_ptr, stats_ptr,
    T, V, N, stride_lb, stride_lt, stride_gb, stride_gt,
    eps_low, eps_high, delta, beta, inv_temp, grad_scale,
    HAS_OLD: tl.constexpr, HAS_KL: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row % T
    row_ptr = logits_ptr + b * stride_lb + t * stride_lt
    grad_row_ptr = grad_ptr + b * stride_gb + t * stride_gt
    if tl.load(mask_ptr + row) == 0:
        # A masked row writes zeros without reading its logits.
        for k in tl.static_range(6):
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

    # The token's loss and dL/dlogp; the ratio's derivative with respect to logp is the ratio itself.
    adv = tl.load(adv_ptr + b)
    if HAS_OLD:
        ratio = tl.exp(logp - tl.load(old_ptr + row))
    else:
        ratio = tl.exp(logp - logp)  # on-policy: exactly 1, with a gradient
    lo = 1.0 - eps_low
    hi = 1.0 + eps_high
    surr1 = tl.minimum(ratio, delta) * adv
    surr2 = tl.minimum(tl.maximum(ratio, lo), hi) * adv
    d1 = tl.where(ratio <= delta, adv * ratio, 0.0)
    d2 = tl.where((ratio >= lo) & (ratio <= hi), adv * ratio, 0.0)
    # min(surr1, surr2) sends the gradient to the smaller term, half to each on a tie (as torch.min).
    dmin = tl.where(surr1 < surr2, d1, tl.where(surr1 > surr2, d2, 0.5 * (d1 + d2)))
    loss = -tl.minimum(surr1, surr2)
    dloss = -dmin
    kl = 0.0
    if HAS_KL:
        diff = tl.load(ref_ptr + row) - logp
        kl = tl.exp(diff) - diff - 1.0
        loss += beta * kl
        dloss += beta * (1.0 - tl.exp(diff))
    weight = tl.load(weight_ptr + b)
    # Statistics rows, in the order of _LOGP, _LOSS, _KL, _ENT, _LOW, _HIGH.
    tl.store(stats_ptr + row, logp)
    tl.store(stats_ptr + N + row, weight * loss)
    tl.store(stats_ptr + 2 * N + row, kl)
    tl.store(stats_ptr + 3 * N + row, entropy)
    tl.store(stats_ptr + 4 * N + row, ((ratio < lo) & (adv < 0)).to(tl.float32))
    tl.store(stats_ptr + 5 * N + row, ((ratio > hi) & (adv > 0)).to(tl.float32))

    # Pass 2: the same row again, still in L2 on a GPU; dL/dz = g * (onehot - p) / T.
    if WRITE_GRAD:
        coef = weight * dloss * grad_scale * inv_temp
        _write_grad_row(row_ptr, grad_row_ptr, y, V, c, lse2, coef, BLOCK_V)



@triton.jit
def _sequence_logp_kernel(
    logits_ptr, ids_ptr, mask_ptr, out_ptr, T, V, N, stride_lb, stride_lt, inv_temp,
    BLOCK_V: tl.constexpr,
):
    """Sequence level, launch 1 (1U): per active row, logp, entropy and log2-sum-exp2 for launch 2."""
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
    logits_ptr, grad_ptr, ids_ptr, coef_ptr, lse2_ptr, T, V, stride_lb, stride_lt, stride_gb, stride_gt,
    inv_temp, BLOCK_V: tl.constexpr,
):
    """Sequence level, launch 2 (2U): grad = coef * (onehot - softmax); rows with coef 0 are not read."""
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row % T
    grad_row_ptr = grad_ptr + b * stride_gb + t * stride_gt
    coef = tl.load(coef_ptr + row)
    if coef == 0:
        _zero_row(grad_row_ptr, V, BLOCK_V)
        return
    row_ptr = logits_ptr + b * stride_lb + t * stride_lt
    y = tl.load(ids_ptr + row).to(tl.int64)
    c = inv_temp * 1.4426950408889634
    _write_grad_row(row_ptr, grad_row_ptr, y, V, c, tl.load(lse2_ptr + row), coef, BLOCK_V)


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
    beta: float
    epsilon_low: float
    epsilon_high: float
    delta: float  # inf when None
    temperature: float
    level: str
    grad_scale: float
    inplace: bool


def _row_weights(mask, loss_type, max_completion_length, num_items_in_batch) -> torch.Tensor:
    """[B] fp32 weight of every active token of row b, such that loss = sum_bt w_b m_bt L_bt."""
    B, T = mask.shape
    ones = torch.ones(B, dtype=torch.float32, device=mask.device)
    if loss_type == "grpo":  # mean over rows of each row's token mean
        return ones / (B * mask.sum(1).clamp(min=1))
    if loss_type == "bnpo":  # mean over all active tokens
        return ones / mask.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        return ones / (B * (max_completion_length or T))
    if num_items_in_batch is None:  # dapo
        return ones / mask.sum().clamp(min=1)
    if isinstance(num_items_in_batch, torch.Tensor):  # stays on the device: no synchronisation
        return ones / num_items_in_batch.to(device=mask.device, dtype=torch.float32).reshape(())
    return ones / float(num_items_in_batch)


def build_inputs(
    completion_ids, advantages, completion_mask, old_logps, ref_logps, *, beta, epsilon_low, epsilon_high,
    delta, temperature, loss_type, importance_sampling_level, max_completion_length, num_items_in_batch,
    inplace, grad_scale,
) -> _Inputs:
    """Everything the launchers need besides the logits, from validated public arguments."""
    mask = completion_mask != 0
    return _Inputs(
        ids=completion_ids.reshape(-1),
        mask=mask,
        mask_f=mask.reshape(-1).to(torch.float32),
        advantages=advantages.detach().to(torch.float32).contiguous(),
        weights=_row_weights(mask, loss_type, max_completion_length, num_items_in_batch),
        old=None if old_logps is None else old_logps.detach().to(torch.float32).reshape(-1).contiguous(),
        ref=None if beta <= 0 else ref_logps.detach().to(torch.float32).reshape(-1).contiguous(),
        beta=float(beta), epsilon_low=float(epsilon_low), epsilon_high=float(epsilon_high),
        delta=float("inf") if delta is None else float(delta), temperature=float(temperature),
        level=importance_sampling_level, grad_scale=float(grad_scale), inplace=bool(inplace),
    )


def _masked_mean(values, mask_f, n_active):
    return (values * mask_f).sum() / n_active


def _new_grad(logits, inplace: bool) -> torch.Tensor:
    if inplace:
        return logits.detach()  # the logits' own memory, strides included
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def launch_token_kernel(logits, grad, inp: _Inputs) -> torch.Tensor:
    """One launch over logits [B', T', V]: returns the statistics [_N_STATS, B'*T'] fp32 and, when
    `grad` is given (may be the logits themselves), writes the final gradient into it."""
    B, T, V = logits.shape
    N = B * T
    stats = torch.empty(_N_STATS, N, dtype=torch.float32, device=logits.device)
    g = grad if grad is not None else logits  # a valid pointer; never written without WRITE_GRAD
    has_kl = inp.beta > 0
    if N == 0:  # Triton grids must not be empty
        return stats
    _grpo_token_kernel[(N,)](
        logits, g, inp.ids, inp.mask_f, inp.advantages, inp.weights,
        inp.old if inp.old is not None else stats, inp.ref if has_kl else stats, stats,
        T, V, N, logits.stride(0), logits.stride(1), g.stride(0), g.stride(1),
        inp.epsilon_low, inp.epsilon_high, inp.delta, inp.beta, 1.0 / inp.temperature, inp.grad_scale,
        HAS_OLD=inp.old is not None, HAS_KL=has_kl, WRITE_GRAD=grad is not None,
        **row_config(V, _grpo_token_kernel),
    )
    return stats


def token_outputs(stats, inp: _Inputs, B: int, T: int):
    """Loss and metrics from the token kernel's statistics ([B*T]-sized reductions only)."""
    n_active = inp.mask_f.sum().clamp(min=1)
    zero = torch.zeros((), dtype=torch.float32, device=stats.device)
    low, high = stats[_LOW].sum() / n_active, stats[_HIGH].sum() / n_active
    outputs = (
        stats[_LOGP].view(B, T),
        stats[_KL].sum() / n_active if inp.beta > 0 else zero,
        low, high, low + high,  # a token is never clipped low and high at once (sign of A)
        stats[_ENT].sum() / n_active,
    )
    return stats[_LOSS].sum(), outputs


def _token_forward(logits, inp: _Inputs, write_grad: bool):
    """One launch: statistics for every token and, when asked, the final gradient of the logits."""
    B, T, _ = logits.shape
    grad = _new_grad(logits, inp.inplace) if write_grad else None
    stats = launch_token_kernel(logits, grad, inp)
    return (*token_outputs(stats, inp, B, T), grad)


def _sequence_terms(logp, inp: _Inputs):
    """GSPO in torch on [B, T]: per-token loss terms, clip flags and the gradient weight of each logp.

    The sequence ratio s = exp(masked mean of logp - old) enters every active token, so d loss/d logp_t
    = w_b * m_t * (dP/dlog s + beta * (1 - exp(ref_t - logp_t))), with P the clipped surrogate.
    """
    mask = inp.mask
    B, T = mask.shape
    if inp.old is None:
        log_ratio = torch.zeros(B, device=logp.device)
    else:
        per_token = torch.where(mask, logp - inp.old.view(B, T), 0.0)
        log_ratio = per_token.sum(1) / mask.sum(1).clamp(min=1)
    ratio = torch.exp(log_ratio)  # [B]
    adv = inp.advantages
    lo, hi = 1.0 - inp.epsilon_low, 1.0 + inp.epsilon_high
    surr1 = torch.clamp(ratio, max=inp.delta) * adv
    surr2 = torch.clamp(ratio, lo, hi) * adv
    d1 = torch.where(ratio <= inp.delta, adv * ratio, 0.0)
    d2 = torch.where((ratio >= lo) & (ratio <= hi), adv * ratio, 0.0)
    dmin = torch.where(surr1 < surr2, d1, torch.where(surr1 > surr2, d2, 0.5 * (d1 + d2)))
    loss = (-torch.minimum(surr1, surr2)).unsqueeze(1).expand(B, T)
    dloss = (-dmin).unsqueeze(1).expand(B, T)
    kl = None
    if inp.beta > 0:
        diff = torch.where(mask, inp.ref.view(B, T) - logp, 0.0)
        kl = torch.exp(diff) - diff - 1
        loss = loss + inp.beta * kl
        dloss = dloss + inp.beta * (1 - torch.exp(diff))
    w = inp.weights.unsqueeze(1)
    loss_terms = torch.where(mask, w * loss, 0.0)
    coef = torch.where(mask, w * dloss * (inp.grad_scale / inp.temperature), 0.0)
    low = ((ratio < lo) & (adv < 0)).float().unsqueeze(1)
    high = ((ratio > hi) & (adv > 0)).float().unsqueeze(1)
    return loss_terms, coef, kl, low, high


def launch_sequence_logp_kernel(logits, inp: _Inputs) -> torch.Tensor:
    """Launch 1 over logits [B', T', V]: returns [_SEQ_N, B'*T'] fp32 (logp, entropy, lse2)."""
    B, T, V = logits.shape
    N = B * T
    rows = torch.empty(_SEQ_N, N, dtype=torch.float32, device=logits.device)
    if N == 0:
        return rows
    _sequence_logp_kernel[(N,)](
        logits, inp.ids, inp.mask_f, rows, T, V, N, logits.stride(0), logits.stride(1),
        1.0 / inp.temperature, **row_config(V, _sequence_logp_kernel),
    )
    return rows


def launch_sequence_grad_kernel(logits, grad, ids, coef, lse2, temperature: float) -> None:
    """Launch 2 over logits [B', T', V]: grad = coef * (onehot - softmax(z/T)) per row ([B'*T'] coef)."""
    B, T, V = logits.shape
    if B * T == 0:
        return
    _sequence_grad_kernel[(B * T,)](
        logits, grad, ids, coef.reshape(-1).contiguous(), lse2, T, V,
        logits.stride(0), logits.stride(1), grad.stride(0), grad.stride(1),
        1.0 / temperature, **row_config(V, _sequence_grad_kernel),
    )


def sequence_outputs(rows, inp: _Inputs, B: int, T: int):
    """Loss, metrics and the per-token gradient coefficients [B, T] from launch 1's rows."""
    logp = rows[_SEQ_LOGP].view(B, T)
    loss_terms, coef, kl, low, high = _sequence_terms(logp, inp)
    n_active = inp.mask_f.sum().clamp(min=1)
    mask_f = inp.mask_f.view(B, T)
    zero = torch.zeros((), dtype=torch.float32, device=rows.device)
    low_mean, high_mean = _masked_mean(low, mask_f, n_active), _masked_mean(high, mask_f, n_active)
    outputs = (
        logp,
        _masked_mean(kl, mask_f, n_active) if kl is not None else zero,
        low_mean, high_mean, low_mean + high_mean,
        rows[_SEQ_ENT].sum() / n_active,
    )
    return loss_terms.sum(), outputs, coef


def _sequence_forward(logits, inp: _Inputs, write_grad: bool):
    """Launch 1 (log-probs), the sequence ratio in torch, launch 2 (gradient)."""
    B, T, _ = logits.shape
    rows = launch_sequence_logp_kernel(logits, inp)
    loss, outputs, coef = sequence_outputs(rows, inp, B, T)
    grad = None
    if write_grad:
        grad = _new_grad(logits, inp.inplace)
        launch_sequence_grad_kernel(logits, grad, inp.ids, coef, rows[_SEQ_LSE2], inp.temperature)
    return loss, outputs, grad


def _forward(logits, inp: _Inputs, write_grad: bool):
    run = _token_forward if inp.level == "token" else _sequence_forward
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
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    delta: float | None = None,
    temperature: float = 1.0,
    loss_type: str = "grpo",
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    num_items_in_batch=None,
    inplace: bool = False,
    grad_scale: float = 1.0,
) -> GRPOLossOutput:
    """GRPO loss with fused Triton kernels; the same results and errors as `grpo_loss_reference`.

    Maths (T = temperature, m = completion_mask, A = advantages):
        logp_t = z[y_t]/T - logsumexp(z/T); r_t = exp(logp_t - old_t), or at sequence level (GSPO)
        s_b = exp(sum_t m (logp - old) / max(sum_t m, 1)) for every token of row b;
        L_t = -min(min(r, delta) A, clip(r, 1 - eps_low, 1 + eps_high) A)
              + beta * (exp(ref_t - logp_t) - (ref_t - logp_t) - 1),
        aggregated as grpo / bnpo / dr_grpo / dapo (see the reference's docstring).

    Args:
        logits: [B, T, V] fp32/bf16/fp16 on CUDA (or CPU under TRITON_INTERPRET=1); logits[:, t]
            scores completion_ids[:, t]. May be a strided view with a contiguous last dimension: rows
            are addressed through its strides, never copied.
        completion_ids: [B, T] integer in [0, V) where the mask is 1 (other positions are not read).
        advantages: [B] float. completion_mask: [B, T] bool or 0/1 int/float (a bool mask avoids the
            one small host synchronisation of the 0/1 check).
        old_logps: [B, T] or None (on-policy). ref_logps: [B, T], required when beta > 0.
        beta, epsilon_low, epsilon_high, delta, temperature, loss_type, importance_sampling_level,
        max_completion_length, num_items_in_batch: as in `grpo_loss_reference` (num_items_in_batch may
            be a device tensor; it is never read on the host).
        inplace: write the gradient into the logits buffer (they are consumed: do not use the logits
            after this call, and make sure nothing else saved them for its backward). Saves B*T*V
            elements of memory.
        grad_scale: the gradient the kernel stores is grad_scale * d loss / d logits; the returned
            loss value is not scaled. The backward then multiplies by the upstream gradient, and does
            no work at all when that is exactly 1. So pass the factor your training loop would apply
            to the loss before backward (1 / gradient_accumulation_steps) here instead, and call
            backward on the unscaled loss: the stored gradient is then already final.

    Returns:
        GRPOLossOutput(loss, per_token_logps [B, T] fp32, kl_mean, clip_ratio_low, clip_ratio_high,
        clip_ratio_region, entropy_mean); only `loss` carries a gradient, and only one backward pass
        may run through it.

    Example:
        >>> out = grpo_loss(logits, ids, adv, mask, beta=0.04, ref_logps=ref, grad_scale=1 / 4)
        >>> out.loss.backward()  # logits.grad is final, including the 1/4
    """
    check_grpo_loss_args(
        logits, completion_ids, advantages, completion_mask, old_logps, ref_logps,
        beta=beta, epsilon_low=epsilon_low, epsilon_high=epsilon_high, delta=delta,
        temperature=temperature, loss_type=loss_type, importance_sampling_level=importance_sampling_level,
        max_completion_length=max_completion_length, num_items_in_batch=num_items_in_batch,
        grad_scale=grad_scale,
    )
    check_device("grpo_loss", logits, _grpo_token_kernel)
    if logits.stride(-1) != 1:
        raise ValueError(f"logits need a contiguous last dimension, got strides {logits.stride()}")
    inp = build_inputs(
        completion_ids, advantages, completion_mask, old_logps, ref_logps, beta=beta,
        epsilon_low=epsilon_low, epsilon_high=epsilon_high, delta=delta, temperature=temperature,
        loss_type=loss_type, importance_sampling_level=importance_sampling_level,
        max_completion_length=max_completion_length, num_items_in_batch=num_items_in_batch,
        inplace=inplace, grad_scale=grad_scale,
    )
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
