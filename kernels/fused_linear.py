"""GRPO loss fused with the lm_head: hidden states in, loss out, full [B, T, V] logits never stored.

Tokens are processed in chunks of `chunk_size` rows: logits_c = hidden_c @ W^T (+ bias) for one chunk
only, the GRPO kernel of `grpo_loss` turns them in place into the final gradient dL/dlogits_c, and two
matmuls fold it into grad_hidden_c = dL_c @ W and grad_W += dL_c^T @ hidden_c. All of it runs in the
forward (the per-token loss weights are known then); the backward only applies the upstream gradient on
the device (no work when it is exactly 1). Peak extra memory: one chunk of logits, plus the gradients of
hidden, W and bias. The sequence level (GSPO) needs every token's log-prob before any gradient, so it
computes each chunk's logits twice (a log-prob pass, then a gradient pass); so does every case that takes
the Triton kernels' two-pass path (`LossSpec.one_pass`).
"""
from __future__ import annotations

import dataclasses
import math

import torch
import triton

from ._launch import check_device
from .grpo_loss import (
    _Inputs,
    _grpo_token_kernel,
    _scale_grad_,
    build_inputs,
    launch_grad_kernel,
    launch_stats_kernel,
    launch_token_kernel,
    token_outputs,
    two_pass_outputs,
)
from .losses import LossSpec
from .reference import GRPOLossOutput, check_grpo_loss_args, resolve_spec


def _chunk_inputs(inp: _Inputs, per_token: dict, rows: slice) -> _Inputs:
    """Inputs for a chunk of flattened token rows, laid out as [rows, 1] (so b = row): a chunk may span
    several sequences, hence per-token advantages and weights."""
    return dataclasses.replace(
        inp,
        ids=inp.ids[rows], mask=None, mask_f=inp.mask_f[rows],
        advantages=per_token["advantages"][rows], weights=per_token["weights"][rows],
        old=None if inp.old is None else inp.old[rows], ref=None if inp.ref is None else inp.ref[rows],
        sampling=None if inp.sampling is None else inp.sampling[rows],
    )


def _chunk_logits(hidden, weight, bias, rows):
    """[rows, 1, V] logits of one chunk, in the weight's dtype (the lm_head's own precision)."""
    h = hidden[rows]
    logits = h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())
    return logits.unsqueeze(1)


def _backprop_chunk(grad_logits, hidden, weight, rows, grads):
    """Folds a chunk's final dL/dlogits [rows, V] into the gradients of hidden, weight and bias."""
    grad_hidden, grad_weight, grad_bias = grads
    if grad_hidden is not None:
        torch.mm(grad_logits, weight, out=grad_hidden[rows])
    if grad_weight is not None:
        grad_weight.addmm_(grad_logits.t(), hidden[rows])  # accumulates in the weight's dtype
    if grad_bias is not None:
        grad_bias.add_(grad_logits.sum(0))


def _fused_forward(hidden, weight, bias, inp: _Inputs, B: int, T: int, chunk: int, needs):
    """Loss, metrics and the final gradients (None where not needed) of hidden [N, H], weight, bias."""
    N = hidden.shape[0]
    grads = (
        torch.empty_like(hidden) if needs[0] else None,
        torch.zeros_like(weight) if needs[1] else None,
        torch.zeros_like(bias) if needs[2] else None,
    )
    write_grad = any(g is not None for g in grads)
    chunks = [slice(start, min(start + chunk, N)) for start in range(0, N, chunk)]
    per_token = {"advantages": inp.advantages.repeat_interleave(T), "weights": inp.weights.repeat_interleave(T)}
    if inp.one_pass:
        stats = []
        for rows in chunks:
            logits = _chunk_logits(hidden, weight, bias, rows)
            chunk_inp = _chunk_inputs(inp, per_token, rows)
            stats.append(launch_token_kernel(logits, logits if write_grad else None, chunk_inp))
            if write_grad:
                _backprop_chunk(logits.squeeze(1), hidden, weight, rows, grads)
        loss, outputs = token_outputs(torch.cat(stats, dim=1), inp, B, T)
        return loss, outputs, grads

    rows_out = torch.cat([
        launch_stats_kernel(_chunk_logits(hidden, weight, bias, rows), _chunk_inputs(inp, per_token, rows))
        for rows in chunks
    ], dim=1)
    loss, outputs, coefs = two_pass_outputs(rows_out, inp, B, T, write_grad)
    if write_grad:
        coef, ecoef = (None if c is None else c.reshape(N) for c in coefs)
        for rows in chunks:
            logits = _chunk_logits(hidden, weight, bias, rows)  # recomputed: see the module docstring
            launch_grad_kernel(logits, logits, inp.ids[rows], coef[rows], None if ecoef is None else ecoef[rows],
                               rows_out[:, rows], inp.spec.temperature)
            _backprop_chunk(logits.squeeze(1), hidden, weight, rows, grads)
    return loss, outputs, grads


class _FusedLinearGRPOLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, inp, B, T, chunk):
        needs = ctx.needs_input_grad[:3]
        loss, outputs, grads = _fused_forward(hidden.reshape(B * T, -1), weight, bias, inp, B, T, chunk, needs)
        ctx.grads = grads
        ctx.hidden_shape = hidden.shape
        ctx.mark_non_differentiable(*outputs)
        return (loss, *outputs)

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("fused_linear_grpo_loss stores one gradient and supports a single backward pass")
        for g in grads:
            if g is not None:  # viewed as rows of its last dimension for the scaling kernel
                _scale_grad_(g.view(1, -1, g.shape[-1]), grad_loss)
        grad_hidden, grad_weight, grad_bias = grads
        if grad_hidden is not None:
            grad_hidden = grad_hidden.view(ctx.hidden_shape)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def _check_linear_args(hidden, weight, bias, chunk_size):
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or not hidden.is_floating_point():
        raise ValueError("hidden must be a floating [B, T, H] tensor (the last hidden states of the "
                         f"completion positions), got {getattr(hidden, 'shape', type(hidden))}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"lm_head_weight must have shape [V, H] with H = {hidden.shape[2]}, got "
                         f"{tuple(getattr(weight, 'shape', ()))}")
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(f"lm_head_weight ({weight.dtype}, {weight.device}) must match hidden "
                         f"({hidden.dtype}, {hidden.device}): cast or move one of them")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != weight.dtype):
        raise ValueError(f"bias must have shape ({weight.shape[0]},) and dtype {weight.dtype}, got "
                         f"{tuple(bias.shape)} {bias.dtype}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def default_chunk_size(num_tokens: int, vocab: int, hidden: int) -> int:
    """Token rows per chunk such that a chunk of logits is about as large as all the hidden states."""
    chunks = math.ceil(vocab / hidden)
    return max(1, min(num_tokens, triton.next_power_of_2(math.ceil(num_tokens / chunks))))


def fused_linear_grpo_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    completion_ids: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    old_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    sampling_logps: torch.Tensor | None = None,
    spec: LossSpec | None = None,
    num_items_in_batch=None,
    grad_scale: float = 1.0,
    gather=None,
    **settings,
) -> GRPOLossOutput:
    """`grpo_loss(hidden @ lm_head_weight.T + bias, ...)` without materialising the [B, T, V] logits.

    Args:
        hidden: [B, T, H] last hidden states of the completion positions (hidden[:, t] predicts
            completion_ids[:, t]), fp32/bf16/fp16 on CUDA (or CPU under TRITON_INTERPRET=1).
        lm_head_weight: [V, H], same dtype and device. bias: [V] or None.
        chunk_size: token rows per chunk (default: `default_chunk_size`, a chunk of logits about the
            size of `hidden`).
        completion_ids ... gather, **settings: as in `grpo_loss` (there is no `inplace`: chunk logits are
            always turned into their gradient in place).

    Returns:
        GRPOLossOutput, as `grpo_loss`; `loss` is differentiable w.r.t. hidden, lm_head_weight and bias
        (one backward pass). The weight gradient accumulates over chunks in the weight's dtype.
    """
    _check_linear_args(hidden, lm_head_weight, bias, chunk_size)
    B, T, H = hidden.shape
    V = lm_head_weight.shape[0]
    stand_in = hidden.new_empty(()).expand(B, T, V)  # shape, dtype and device of the logits, no memory
    spec = resolve_spec(spec, settings)
    check_grpo_loss_args(stand_in, completion_ids, advantages, completion_mask, old_logps, ref_logps, sampling_logps,
                         spec=spec, num_items_in_batch=num_items_in_batch, grad_scale=grad_scale)
    check_device("fused_linear_grpo_loss", hidden, _grpo_token_kernel)
    inp = build_inputs(completion_ids, advantages, completion_mask, old_logps, ref_logps, sampling_logps, spec=spec,
                       num_items_in_batch=num_items_in_batch, inplace=True, grad_scale=grad_scale, gather=gather)
    chunk = chunk_size or default_chunk_size(B * T, V, H)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, lm_head_weight, bias)):
        return GRPOLossOutput(*_FusedLinearGRPOLossFunction.apply(hidden, lm_head_weight, bias, inp, B, T, chunk))
    with torch.no_grad():
        loss, outputs, _ = _fused_forward(hidden.reshape(B * T, H), lm_head_weight, bias, inp, B, T, chunk,
                                          (False, False, False))
    return GRPOLossOutput(loss, *outputs)
