"""Completion masks and group-relative advantages (hand-computed values in comments)."""
import math

import pytest
import torch

from grpo_scale.rollout import completion_mask_from_ids, group_advantages


def test_completion_mask_stops_after_first_eos_and_flags_truncation():
    eos = 9
    ids = torch.tensor([[1, 2, 9, 4, 9],    # EOS at 2 -> mask 1,1,1,0,0
                        [9, 1, 1, 1, 1],    # EOS first -> only it counts
                        [1, 2, 3, 4, 5]])   # no EOS -> truncated, all count
    mask, truncated = completion_mask_from_ids(ids, [eos])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert truncated.tolist() == [False, False, True]


def test_several_eos_ids():
    mask, truncated = completion_mask_from_ids(torch.tensor([[5, 7, 1], [1, 1, 1]]), [7, 8])
    assert mask.tolist() == [[1, 1, 0], [1, 1, 1]] and truncated.tolist() == [False, True]


def test_group_advantages_hand_values():
    # group 1: rewards 1, 0, 0, 1 -> mean 0.5, unbiased std sqrt(1/3) = 0.57735 -> A = +-0.866
    # group 2: all equal -> std 0 -> A = 0 (no signal, no NaN)
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv, std = group_advantages(r, 4, "group", eps=0.0 + 1e-12)
    a = 0.5 / math.sqrt(1 / 3)
    assert torch.allclose(adv[:4], torch.tensor([a, -a, -a, a]), atol=1e-5)
    assert torch.equal(adv[4:], torch.zeros(4))
    assert torch.allclose(std, torch.tensor([math.sqrt(1 / 3), 0.0]), atol=1e-6)


def test_scale_none_and_batch():
    r = torch.tensor([1.0, 0.0, 3.0, 1.0])
    adv, _ = group_advantages(r, 2, "none")
    assert adv.tolist() == [0.5, -0.5, 1.0, -1.0]       # r - group mean
    adv_b, _ = group_advantages(r, 2, "batch", eps=0.0)
    batch_std = r.std()                                   # unbiased std of the whole batch
    assert torch.allclose(adv_b, adv / batch_std)


def test_missing_rewards_get_zero_advantage_and_are_left_out_of_stats():
    # group: 1, NaN, 0 -> stats over {1, 0}: mean .5, std .7071; the missing item gets 0
    r = torch.tensor([1.0, float("nan"), 0.0, float("nan")])
    adv, _ = group_advantages(r, 4, "group", eps=0.0)
    assert not torch.isnan(adv).any()
    assert adv[1] == 0 and adv[3] == 0
    assert torch.allclose(adv[[0, 2]], torch.tensor([0.5, -0.5]) / math.sqrt(0.5), atol=1e-5)


def test_wrong_group_size_raises():
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(torch.zeros(4), 3)
