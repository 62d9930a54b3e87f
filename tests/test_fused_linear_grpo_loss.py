"""fused_linear_grpo_loss against the eager reference in float64.

Runs under Triton's interpreter on CPU (tests/conftest.py). The gold logits are the lm_head's own
(hidden @ W^T + bias in the input dtype, then float64), so the loss sees the same logits on both sides;
the gold gradients of hidden, weight and bias are the float64 products of the gold dL/dlogits.
Tolerances (whole-tensor relative errors, floor 1e-3):
- fp32: 1e-5 for values and gradients.
- bf16: values 1e-4 (the same bf16 logits; chunked and whole matmuls may round a logit differently
  in the last place); gradients 1e-2 (measured 4e-3): dL/dlogits is stored in bf16 (2^-7 under the
  interpreter, which truncates) and goes through bf16 matmuls whose outputs round again (2^-8).
"""
import os

import pytest
import torch

from grpo_scale.kernels.fused_linear import default_chunk_size, fused_linear_grpo_loss
from grpo_scale.kernels.reference import grpo_loss_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-4, 1e-2)}  # (values, gradients)
B, T, H, V = 3, 4, 16, 67  # 12 token rows: chunks of 5 span sequences, the last chunk is partial


def rel_err(got, gold):
    got, gold = got.detach().double().cpu(), gold.detach().double().cpu()
    err = float((got - gold).norm() / max(float(gold.norm()), 1e-3))
    return err if err == err else float("inf")  # NaN (an unwritten output) fails every bound


def make_case(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).to(dtype)
    weight = (0.4 * torch.randn(V, H, generator=g)).to(dtype)
    bias = (0.1 * torch.randn(V, generator=g)).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)  # ragged, empty row
    adv = torch.randn(B, generator=g)
    logp = torch.log_softmax((hidden.double() @ weight.double().t() + bias.double()) / 0.7, -1)
    logp = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    old = (logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    ref = (logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    return [t.to(DEVICE) for t in (hidden, weight, bias, ids, mask, adv, old, ref)]


def run_both(dtype, with_bias=True, chunk_size=5, upstream=1.0, **kwargs):
    hidden, weight, bias, ids, mask, adv, old, ref = make_case(dtype)
    bias = bias if with_bias else None
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight) + ((bias,) if with_bias else ())]
    out = fused_linear_grpo_loss(leaves[0], leaves[1], ids, adv, mask, old, ref,
                                 bias=leaves[2] if with_bias else None, chunk_size=chunk_size, **kwargs)
    (out.loss * upstream).backward()

    h, w = hidden.detach(), weight.detach()
    logits = (h @ w.t() if bias is None else torch.addmm(bias.detach(), h.reshape(-1, H), w.t()).view(B, T, V))
    logits = logits.double().requires_grad_()
    kwargs.pop("grad_scale", None)
    gold = grpo_loss_reference(logits, ids, adv.double(), mask, old.double(), ref.double(), **kwargs)
    gold.loss.backward()
    dz = logits.grad.reshape(-1, V)  # the gold dL/dlogits, float64
    gold_grads = [(dz @ w.double()).view(B, T, H), dz.t() @ h.double().reshape(-1, H), dz.sum(0)]
    return out, gold, leaves, gold_grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_matches_reference(loss_type, level, dtype, nan_empty):
    out, gold, leaves, gold_grads = run_both(dtype, beta=0.04, temperature=0.7, delta=1.5,
                                             loss_type=loss_type, importance_sampling_level=level)
    errors = {name: rel_err(a, b) for name, a, b in zip(out._fields, out, gold)}
    errors.update({f"grad_{n}": rel_err(a.grad, b)
                   for n, a, b in zip(("hidden", "weight", "bias"), leaves, gold_grads)})
    bad = {k: v for k, v in errors.items() if v > TOL[dtype][k.startswith("grad_")]}
    assert not bad, f"errors over tolerance: {bad}"
    assert all(leaf.grad.dtype == dtype for leaf in leaves)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_grad_scale_upstream_and_frozen_weight(level, nan_empty):
    _, _, _, unit = run_both(torch.float32, with_bias=False, importance_sampling_level=level)
    out, gold, leaves, _ = run_both(torch.float32, with_bias=False, chunk_size=None, upstream=3.0,
                                    grad_scale=0.5, importance_sampling_level=level)
    assert rel_err(out.loss, gold.loss) < 1e-5  # grad_scale leaves the value alone
    assert rel_err(leaves[0].grad, 1.5 * unit[0]) < 1e-5
    assert rel_err(leaves[1].grad, 1.5 * unit[1]) < 1e-5

    hidden, weight, _, ids, mask, adv, old, _ = make_case(torch.float32)
    hidden.requires_grad_()
    fused_linear_grpo_loss(hidden, weight, ids, adv, mask, old, importance_sampling_level=level).loss.backward()
    assert weight.grad is None and rel_err(hidden.grad, unit[0]) < 1e-5


def test_no_grad_gives_the_same_values(nan_empty):
    hidden, weight, bias, ids, mask, adv, old, _ = make_case(torch.float32)
    with torch.no_grad():
        out = fused_linear_grpo_loss(hidden, weight, ids, adv, mask, old, bias=bias, chunk_size=5)
    logits = hidden.double() @ weight.double().t() + bias.double()
    gold = grpo_loss_reference(logits, ids, adv.double(), mask, old.double())
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(out, gold))


def test_default_chunk_size():
    assert default_chunk_size(4096, 151936, 896) == 32  # a chunk of logits is about all of hidden
    assert default_chunk_size(3, 10, 100) == 3  # never more rows than tokens
    assert default_chunk_size(1, 10**6, 8) == 1


@pytest.mark.parametrize("change,match", [
    ({"weight": torch.zeros(7, 5)}, r"lm_head_weight must have shape \[V, H\] with H = 4"),
    ({"weight": torch.zeros(7, 4, dtype=torch.float64)}, "must match hidden"),
    ({"bias": torch.zeros(6)}, r"bias must have shape \(7,\)"),
    ({"hidden": torch.zeros(2, 3)}, r"hidden must be a floating \[B, T, H\] tensor"),
    ({"chunk_size": 0}, "chunk_size must be a positive int"),
    ({"loss_type": "ppo"}, "loss_type must be one of"),
    ({"completion_ids": torch.zeros(2, 2, dtype=torch.long)}, r"completion_ids has shape \(2, 2\)"),
])
def test_errors(change, match):
    args = dict(hidden=torch.zeros(2, 3, 4), weight=torch.zeros(7, 4), completion_ids=torch.zeros(2, 3, dtype=torch.long),
                advantages=torch.zeros(2), completion_mask=torch.ones(2, 3))
    args.update(change)
    args = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    hidden, weight = args.pop("hidden"), args.pop("weight")
    with pytest.raises(ValueError, match=match):
        fused_linear_grpo_loss(hidden, weight, **args)
