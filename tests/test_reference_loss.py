"""The eager GRPO loss against values derived by hand, float64 gradient checks and argument errors.

Most hand cases use logits z = [0, 0] over a two-token vocabulary: then softmax(z) = [0.5, 0.5],
logp(token 0) = -ln 2, and dlogp/dz = onehot - softmax = [0.5, -0.5].
"""
import math

import pytest
import torch

from grpo_scale.kernels.reference import (
    GRPOLossOutput,
    grpo_loss_reference,
    selective_logps_reference,
)

LN2 = math.log(2.0)
E = math.e


def uniform_case(B=1, T=1, dtype=torch.float64):
    """Logits [B, T, 2] of zeros, every id 0: logp = -ln 2 everywhere."""
    logits = torch.zeros(B, T, 2, dtype=dtype, requires_grad=True)
    ids = torch.zeros(B, T, dtype=torch.long)
    return logits, ids


def run(logits, ids, adv, mask=None, old_shift=None, **kw):
    """Loss with old_logps = logp - old_shift (so the log-ratio is old_shift) when old_shift is given."""
    B, T, _ = logits.shape
    mask = torch.ones(B, T, dtype=torch.bool) if mask is None else mask
    old = None
    if old_shift is not None:
        logp = torch.log_softmax(logits.detach().double(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        old = logp - torch.as_tensor(old_shift, dtype=torch.float64).expand(B, T)
    adv = torch.as_tensor(adv, dtype=torch.float64).reshape(B)
    return grpo_loss_reference(logits, ids, adv, mask, old, **kw)


def close(actual, expected, tol=1e-9):
    """Expected values are Python floats or float64 tensors, so nothing is rounded to fp32 first."""
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert expected.dtype == torch.float64
    assert torch.allclose(torch.as_tensor(actual, dtype=torch.float64), expected, atol=tol, rtol=tol), (
        actual, expected)


def f64(values):
    return torch.tensor(values, dtype=torch.float64)


# --------------------------------------------------------------------------------------------------
# Hand-derived single tokens
# --------------------------------------------------------------------------------------------------
def test_output_fields_and_types():
    logits, ids = uniform_case(2, 3)
    out = run(logits, ids, [1.0, -1.0])
    assert isinstance(out, GRPOLossOutput)
    # the contract's first seven fields, in order; later ones are appended, never inserted
    assert out._fields[:7] == ("loss", "per_token_logps", "kl_mean", "clip_ratio_low", "clip_ratio_high",
                               "clip_ratio_region", "entropy_mean")
    assert out._fields[7:] == ("bonus_entropy_mean", "bonus_tokens", "importance_sampling_ratio_mean",
                               "off_policy_masked")
    assert out.loss.requires_grad and out.loss.dim() == 0
    assert all(not t.requires_grad for t in out[1:])
    assert out.per_token_logps.shape == (2, 3)
    close(out.per_token_logps, torch.full((2, 3), -LN2, dtype=torch.float64))


def test_ratio_e_clipped_to_1_2_for_positive_advantage():
    logits, ids = uniform_case()
    out = run(logits, ids, [1.0], old_shift=1.0)
    # ratio is e; min(e * 1, clip(e, 0.8, 1.2) * 1) = 1.2, so L = -1.2
    close(out.loss, -1.2)
    close(out.clip_ratio_high, 1.0)
    close(out.clip_ratio_low, 0.0)
    close(out.clip_ratio_region, 1.0)
    out.loss.backward()
    close(logits.grad, torch.zeros(1, 1, 2))  # the clipped branch is constant in logp


def test_ratio_1_over_e_clipped_to_0_8_for_negative_advantage():
    logits, ids = uniform_case()
    out = run(logits, ids, [-1.0], old_shift=-1.0)
    # ratio is 1/e = 0.368; min(0.368 * -1, 0.8 * -1) = -0.8, so L = 0.8
    close(out.loss, 0.8)
    close(out.clip_ratio_low, 1.0)
    close(out.clip_ratio_high, 0.0)
    close(out.clip_ratio_region, 1.0)


def test_low_ratio_with_positive_advantage_is_not_clipped():
    logits, ids = uniform_case()
    out = run(logits, ids, [1.0], old_shift=-1.0)
    # ratio is 1/e; min(1/e * 1, 0.8 * 1) = 1/e, so L = -1/e and no clip flag is set
    close(out.loss, -1 / E)
    close(out.clip_ratio_region, 0.0)
    out.loss.backward()
    # dL/dlogp = -A * r = -1/e; dL/dz = -1/e * [0.5, -0.5]
    close(logits.grad, f64([[[-0.5 / E, 0.5 / E]]]))


def test_on_policy_gradient_temperature_and_grad_scale():
    logits, ids = uniform_case()
    out = run(logits, ids, [2.0])
    # ratio is exp(logp - logp.detach()) = 1, L = -A = -2, dL/dlogp = -2, dL/dz = -2 * [0.5, -0.5]
    close(out.loss, -2.0)
    out.loss.backward()
    close(logits.grad, f64([[[-1.0, 1.0]]]))

    logits, ids = uniform_case()
    out = run(logits, ids, [2.0], temperature=2.0, grad_scale=0.25)
    # z / T is still uniform, so L = -2; dz picks up 1/T = 0.5 and grad_scale 0.25: [-1, 1] / 8
    close(out.loss, -2.0)
    out.loss.backward()
    close(logits.grad, f64([[[-0.125, 0.125]]]))


def test_temperature_logp_and_entropy():
    logits = torch.tensor([[[2.0, 0.0]]], dtype=torch.float64, requires_grad=True)
    ids = torch.zeros(1, 1, dtype=torch.long)
    out = run(logits, ids, [1.0], temperature=2.0)
    # z / T = [1, 0]: logp(0) = 1 - ln(e + 1); p = [e, 1] / (e + 1); H = -sum p ln p
    close(out.per_token_logps, [[1 - math.log(E + 1)]])
    p = torch.tensor([E, 1.0], dtype=torch.float64) / (E + 1)
    close(out.entropy_mean, -(p * p.log()).sum())
    # uniform logits: entropy is ln 2
    logits, ids = uniform_case()
    close(run(logits, ids, [1.0]).entropy_mean, LN2)


def test_delta_caps_the_unclipped_ratio():
    logits, ids = uniform_case()
    # ratio is e, A = -1: without delta min(-e, -1.2) = -e, so L = e
    close(run(logits, ids, [-1.0], old_shift=1.0).loss, E)
    # with delta = 1.5: min(min(e, 1.5) * -1, -1.2) = -1.5, so L = 1.5
    out = run(logits, ids, [-1.0], old_shift=1.0, delta=1.5)
    close(out.loss, 1.5)
    out.loss.backward()
    close(logits.grad, torch.zeros(1, 1, 2))  # ratio above delta: the capped term is constant


def test_beta_adds_the_k3_kl():
    logits, ids = uniform_case()
    ref = torch.full((1, 1), -LN2 + LN2, dtype=torch.float64)  # ref - logp = ln 2
    out = grpo_loss_reference(logits, ids, torch.zeros(1, dtype=torch.float64), torch.ones(1, 1),
                              None, ref, beta=0.1)
    # kl = exp(ln 2) - ln 2 - 1 = 1 - ln 2 = 0.307; A = 0, so L = 0.1 * (1 - ln 2)
    close(out.kl_mean, 1 - LN2)
    close(out.loss, 0.1 * (1 - LN2))
    out.loss.backward()
    # dL/dlogp = beta * (1 - exp(ref - logp)) = 0.1 * (1 - 2) = -0.1; dL/dz = -0.1 * [0.5, -0.5]
    close(logits.grad, f64([[[-0.05, 0.05]]]))
    # beta == 0: the KL metric is 0 even with ref_logps given
    close(grpo_loss_reference(logits, ids, torch.zeros(1, dtype=torch.float64), torch.ones(1, 1),
                              None, ref).kl_mean, 0.0)


# --------------------------------------------------------------------------------------------------
# Aggregation and masks
# --------------------------------------------------------------------------------------------------
AGG_MASK = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
AGG_ADV = [1.0, -4.0, 7.0]
# On-policy, so each active token has L = -A_i: row sums are -2, 4 and 0 (the third row is fully masked).
AGG_CASES = [
    ("grpo", {}, (-2 / 2 + 4 / 1 + 0) / 3),  # mean of row means, over all 3 rows = 1
    ("bnpo", {}, 2 / 3),  # (-2 + 4) / 3 active tokens
    ("dr_grpo", {}, 2 / (3 * 3)),  # / (B * T)
    ("dr_grpo", {"max_completion_length": 4}, 2 / (3 * 4)),
    ("dapo", {}, 2 / 3),  # default normaliser: 3 active tokens
    ("dapo", {"num_items_in_batch": 8}, 2 / 8),
    ("dapo", {"num_items_in_batch": torch.tensor(8.0)}, 2 / 8),
]


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type,extra,expected", AGG_CASES)
def test_aggregation_with_a_fully_masked_row(loss_type, extra, expected, level):
    logits, ids = uniform_case(3, 3)
    ids = ids.masked_fill(AGG_MASK == 0, -100)  # padding ids at masked positions are ignored
    out = run(logits, ids, AGG_ADV, mask=AGG_MASK, loss_type=loss_type,
              importance_sampling_level=level, **extra)
    close(out.loss, expected)
    out.loss.backward()
    assert torch.isfinite(logits.grad).all()
    close(logits.grad[2], torch.zeros(3, 2))  # the fully masked row contributes nothing
    close(logits.grad[0, 2], torch.zeros(2))
    close(out.per_token_logps, torch.where(AGG_MASK.bool(), f64(-LN2), f64(0.0)))


def test_all_tokens_masked_gives_zeros_not_nan():
    logits, ids = uniform_case(2, 2)
    mask = torch.zeros(2, 2)
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        out = run(logits, ids, [1.0, -1.0], mask=mask, old_shift=3.0, loss_type=loss_type)
        for name, value in zip(out._fields, out):  # the correction weight's mean is 1: no correction
            assert torch.isfinite(value).all() and (value == (name == "importance_sampling_ratio_mean")).all()


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.int32, torch.float32, torch.float64])
def test_mask_dtypes_agree(mask_dtype):
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, dtype=torch.float64)
    ids = torch.randint(0, 5, (2, 3))
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    adv = torch.tensor([0.5, -1.5], dtype=torch.float64)
    expected = grpo_loss_reference(logits, ids, adv, mask.bool())
    got = grpo_loss_reference(logits, ids, adv, mask.to(mask_dtype))
    for a, b in zip(got, expected):
        close(a, b)


def test_token_versus_sequence_ratio():
    logits, ids = uniform_case(1, 2)
    # log-ratios 0.1 and -0.3, A = 1.
    # token: r = e^0.1 = 1.105 and e^-0.3 = 0.741, both unclipped for A > 0 (min picks r itself),
    #        grpo L = -(1.105 + 0.741) / 2
    out = run(logits, ids, [1.0], old_shift=[0.1, -0.3])
    close(out.loss, -(math.exp(0.1) + math.exp(-0.3)) / 2)
    close(out.clip_ratio_region, 0.0)
    # sequence: s = exp((0.1 - 0.3) / 2) = e^-0.1 = 0.905 for both tokens, L = -0.905
    out = run(logits, ids, [1.0], old_shift=[0.1, -0.3], importance_sampling_level="sequence")
    close(out.loss, -math.exp(-0.1))
    # sequence: log-ratios 1 and 0.5 give s = e^0.75 = 2.12, clipped to 1.2 on both tokens
    out = run(logits, ids, [1.0], old_shift=[1.0, 0.5], importance_sampling_level="sequence")
    close(out.loss, -1.2)
    close(out.clip_ratio_high, 1.0)
    # a masked token's log-ratio (5) does not enter the sequence mean: s = e^0.1, unclipped
    out = run(logits, ids, [1.0], mask=torch.tensor([[1, 0]]), old_shift=[0.1, 5.0],
              importance_sampling_level="sequence")
    close(out.loss, -math.exp(0.1))


def test_sequence_gradient_flows_through_the_mean():
    logits, ids = uniform_case(1, 2)
    out = run(logits, ids, [1.0], old_shift=[0.1, -0.3], importance_sampling_level="sequence")
    out.loss.backward()
    # loss = -s, s = exp(mean(logp - old)): dloss/dlogp_t = -s / 2 for each token; dz = that * [0.5, -0.5]
    g = -math.exp(-0.1) / 2
    close(logits.grad, f64([[[0.5 * g, -0.5 * g], [0.5 * g, -0.5 * g]]]))


def test_low_precision_logits_use_fp32_maths():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7).to(torch.bfloat16)
    ids = torch.randint(0, 7, (2, 3))
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 3, dtype=torch.bool)
    out = grpo_loss_reference(logits, ids, adv, mask)
    gold = grpo_loss_reference(logits.double(), ids, adv.double(), mask)
    assert out.per_token_logps.dtype == torch.float32
    close(out.per_token_logps, gold.per_token_logps, tol=1e-6)
    close(out.entropy_mean, gold.entropy_mean, tol=1e-6)


def test_selective_logps_reference_matches_loss_logps():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 11)
    ids = torch.randint(0, 11, (2, 3))
    out = grpo_loss_reference(logits, ids, torch.zeros(2), torch.ones(2, 3), temperature=0.7)
    logps = selective_logps_reference(logits, ids, temperature=0.7)
    assert logps.dtype == torch.float32 and not logps.requires_grad
    close(logps, out.per_token_logps, tol=1e-6)


# --------------------------------------------------------------------------------------------------
# Gradient checks in float64
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_gradcheck(loss_type, level):
    g = torch.Generator().manual_seed(1)
    B, T, V = 3, 4, 5
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    adv = torch.tensor([1.3, -0.7, 0.4], dtype=torch.float64)
    logp = torch.log_softmax(logits.detach() / 0.7, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    # log-ratios of +-0.45 push some ratios outside [0.8, 1.2] and leave others inside
    old = logp + 0.45 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)

    def f(x):
        return grpo_loss_reference(x, ids, adv, mask, old, ref, beta=0.05, delta=1.4, temperature=0.7,
                                   loss_type=loss_type, importance_sampling_level=level).loss

    assert torch.autograd.gradcheck(f, (logits,), eps=1e-6, atol=1e-8)


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------
def _good_args():
    B, T, V = 2, 3, 5
    return dict(
        logits=torch.zeros(B, T, V), completion_ids=torch.zeros(B, T, dtype=torch.long),
        advantages=torch.zeros(B), completion_mask=torch.ones(B, T), old_logps=None, ref_logps=None,
    )


BAD_ARGS = [
    ({"loss_type": "ppo"}, "loss_type must be one of"),
    ({"importance_sampling_level": "batch"}, "importance_sampling_level must be one of"),
    ({"beta": 0.1}, "beta > 0 needs ref_logps"),
    ({"beta": -0.1}, "beta must lie in"),
    ({"logits": torch.zeros(2, 3)}, r"logits must have shape \[B, T, V\]"),
    ({"logits": torch.zeros(2, 3, 5, dtype=torch.long)}, "logits must be floating point"),
    ({"logits": torch.zeros(2, 3, 0)}, "empty vocabulary"),
    ({"completion_ids": torch.zeros(2, 4, dtype=torch.long)}, r"completion_ids has shape \(2, 4\).*\(2, 3\)"),
    ({"completion_ids": torch.zeros(2, 3)}, "completion_ids must be an integer tensor"),
    ({"advantages": torch.zeros(3)}, r"advantages has shape \(3,\).*\(2,\)"),
    ({"advantages": torch.zeros(2, dtype=torch.long)}, "advantages must be floating point"),
    ({"completion_mask": torch.ones(3, 3)}, r"completion_mask has shape \(3, 3\).*\(2, 3\)"),
    ({"completion_mask": torch.full((2, 3), 0.5)}, "completion_mask must hold only 0 and 1"),
    ({"completion_mask": torch.full((2, 3), 2)}, "completion_mask must hold only 0 and 1"),
    ({"old_logps": torch.zeros(2, 2)}, r"old_logps has shape \(2, 2\).*\(2, 3\)"),
    ({"ref_logps": torch.zeros(3, 3), "beta": 0.1}, r"ref_logps has shape \(3, 3\).*\(2, 3\)"),
    ({"old_logps": torch.zeros(2, 3, dtype=torch.long)}, "old_logps must be floating point"),
    ({"epsilon_low": 1.5}, "epsilon_low must lie in"),
    ({"epsilon_low": -0.1}, "epsilon_low must lie in"),
    ({"epsilon_high": -0.1}, "epsilon_high must lie in"),
    ({"delta": 0.0}, "delta must lie in"),
    ({"temperature": 0.0}, "temperature must lie in"),
    ({"max_completion_length": 0}, "max_completion_length must be a positive int"),
    ({"num_items_in_batch": 0}, "num_items_in_batch must lie in"),
    ({"num_items_in_batch": torch.ones(2)}, "num_items_in_batch must be a number or a one-element"),
    ({"grad_scale": float("nan")}, "grad_scale must lie in"),
]


@pytest.mark.parametrize("change,match", BAD_ARGS, ids=[m.split()[0] + str(i) for i, (_, m) in enumerate(BAD_ARGS)])
def test_bad_arguments_raise_value_error(change, match):
    args, change = _good_args(), dict(change)
    kwargs = {k: change.pop(k) for k in list(change) if k not in args}
    args.update(change)
    with pytest.raises(ValueError, match=match):
        grpo_loss_reference(**args, **kwargs)


def test_selective_logps_reference_errors():
    with pytest.raises(ValueError, match="completion_ids has shape"):
        selective_logps_reference(torch.zeros(2, 3, 5), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature must lie in"):
        selective_logps_reference(torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), temperature=-1)
