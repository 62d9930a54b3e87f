"""DAPO's dynamic sampling: the choice of groups by hand, the batch a trainer trains on (full, short, filled),
how a short batch splits into micro-steps, and the cross-rank share (2 processes over gloo). A 2-rank ZeRO-2
run with dynamic sampling, stopped three times and resumed, ending where the uninterrupted run ends (and
training only on groups with reward spread), is tests/test_preemption.py's 2-rank test."""
import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import reliability_helpers as rh
from grpo_scale import dynamic
from grpo_scale.config import ConfigError, load_config
from grpo_scale.rollout import Rollout

TESTS = Path(__file__).resolve().parent


def spreads(*rounds: str) -> list[torch.Tensor]:
    """'10.1' -> group stds [1, 0, nan, 1]: 1 has spread, 0 has none, '.' no rewards at all."""
    table = {"1": 1.0, "0": 0.0, ".": float("nan")}
    return [torch.tensor([table[c] for c in r]) for r in rounds]


def test_select_fills_the_batch_in_sampling_order_and_drops_the_surplus():
    sel = dynamic.select(spreads("0101", "1101"), need_groups=4, unit_groups=1)
    assert sel.groups == [(0, 1), (0, 3), (1, 0), (1, 1)]
    assert (sel.rounds, sel.sampled, sel.dropped, sel.surplus, sel.filled, sel.short) == (2, 8, 3, 1, 0, False)
    assert dynamic.slots([(1, 0), (0, 3)], 2) == [(1, 0), (1, 1), (0, 6), (0, 7)]


def test_select_short_batch_is_whole_units():
    # 3 kept groups, 4 needed, units of 2 groups: train 2, the third is surplus
    sel = dynamic.select(spreads("1.00", "0110"), need_groups=4, unit_groups=2)
    assert sel.short and sel.groups == [(0, 0), (1, 1)] and sel.surplus == 1 and sel.dropped == 5
    # a group with rewards for fewer than two completions (NaN std) has no spread
    assert dynamic.select(spreads("...."), 4, 1).groups == [(0, 0)]


def test_select_fills_one_unit_when_nothing_was_kept():
    sel = dynamic.select(spreads("0000", "0001"), need_groups=4, unit_groups=2)
    # the kept group, then the last round's zero-spread groups, in sampling order
    assert sel.groups == [(1, 0), (1, 3)] and sel.filled == 1 and sel.dropped == 6 and sel.short
    sel = dynamic.select(spreads("0000"), need_groups=4, unit_groups=2)
    assert sel.groups == [(0, 0), (0, 1)] and sel.filled == 2 and sel.dropped == 2


def test_unit_is_whole_groups_and_equal_micro_batches():
    assert dynamic.lcm_unit(8, 2, 1) == 8 and dynamic.lcm_unit(4, 2, 3) == 12 and dynamic.lcm_unit(6, 4, 1) == 12


def test_rollout_cat_rows_and_trim():
    a = Rollout(torch.tensor([[0, 5]]), torch.tensor([[0, 1]]), torch.tensor([[7, 2, 0]]), torch.tensor([[1, 1, 0]]),
                torch.tensor([[1, 1, 0]]), torch.tensor([False]), ["p"], ["c"])
    b = Rollout(torch.tensor([[4, 5, 6]]), torch.tensor([[1, 1, 1]]), torch.tensor([[9]]), torch.tensor([[1]]),
                torch.tensor([[1]]), torch.tensor([True]), ["q"], ["d"])
    both = Rollout.cat([a, b], pad_token_id=0)
    assert both.prompt_ids.tolist() == [[0, 0, 5], [4, 5, 6]] and both.prompt_mask.tolist() == [[0, 0, 1], [1, 1, 1]]
    assert both.completion_ids.tolist() == [[7, 2, 0], [9, 0, 0]] and both.attention_mask.tolist() == [[1, 1, 0], [1, 0, 0]]
    one = both.rows([1]).trimmed()
    assert one.prompt_ids.tolist() == [[4, 5, 6]] and one.completion_ids.tolist() == [[9]] and one.prompts == ["q"]
    assert both.rows([0]).trimmed().prompt_ids.tolist() == [[5]] and both.rows([1, 0]).completions == ["d", "c"]


def test_config_rules():
    with pytest.raises(ConfigError, match="max_sampling_rounds must be >= 1"):
        load_config(["--max_sampling_rounds", "0"])


# ---------------------------------------------------------------------------- a trainer, in-process
ARGS = ["--eval_size", "2", "--eval_batch_size", "2", "--max_completion_length", "6", "--report_to", "none",
        "--per_device_train_batch_size", "8", "--num_generations", "4", "--learning_rate", "1e-3",
        "--temperature", "2.0", "--cpu_threads", "1", "--max_steps", "4", "--seed", "3",
        "--reward_funcs", "reliability_helpers:half_flat_reward", "--reward_weights", "null",
        "--dynamic_sampling", "true"]


def make_trainer(out, *extra):
    from grpo_scale.trainer import GRPOTrainer
    trainer = GRPOTrainer(load_config(ARGS + ["--model_name_or_path", rh.tiny_model_path(), "--output_dir",
                                              str(out), *extra]))
    trainer.setup()
    return trainer


def group_spread(batch, G: int) -> torch.Tensor:
    """Per trained group: whether its advantages are not all zero (one process: the batch is every group)."""
    return batch["advantages"].view(-1, G).abs().sum(1) > 0


def test_every_trained_group_has_reward_spread(tmp_path):
    trainer = make_trainer(tmp_path)
    rounds, dropped = [], 0
    for _ in range(3):
        batch = trainer.generate_and_score()
        m = batch["metrics"]
        assert len(batch["rollout"]) == 8 and bool(group_spread(batch, 4).all())
        assert m["reward/frac_zero_std"] == 0.0 and m["dynamic/short_batch"] == 0.0
        # the batch holds no question that half_flat_reward scores alike
        questions = [re.search(r"Solve [^\n<]*[^\s<]", p).group(0) for p in batch["rollout"].prompts]
        assert not any(rh.flat_group(q) for q in questions), questions
        rounds.append(m["dynamic/rounds"])
        dropped += m["dynamic/dropped_groups"]
        assert m["dynamic/trained_groups"] == 2 and m["dynamic/sampled_groups"] == 2 * m["dynamic/rounds"]
        trainer.grpo_step(batch)
    assert max(rounds) >= 2 and dropped > 0, (rounds, dropped)  # the test exercised dropping
    # the prompt stream moved by every round's prompts, and the totals say so
    assert trainer.stream.state_dict()["position"] == trainer.sampling["prompts"] == 2 * sum(rounds)
    assert trainer.sampling["rounds"] == sum(rounds) and trainer.sampling["dropped_groups"] == dropped
    state = json.loads((trainer.save_checkpoint() / "trainer_state.json").read_text())
    assert state["sampling"] == trainer.sampling


def test_rounds_exhausted_trains_a_short_batch_in_every_micro_step(tmp_path):
    # 4 groups of 2 needed, one round: the kept groups (units of 1 group: 2 completions, 2 micro-steps)
    trainer = make_trainer(tmp_path, "--num_generations", "2", "--per_device_train_batch_size", "4",
                           "--gradient_accumulation_steps", "2", "--max_sampling_rounds", "1", "--seed", "5")
    batch = trainer.generate_and_score()
    m, n = batch["metrics"], len(batch["rollout"])
    assert m["dynamic/short_batch"] == 1.0 and 0 < m["dynamic/trained_groups"] < 4, m
    assert n == 2 * m["dynamic/trained_groups"] and bool(group_spread(batch, 2).all())
    # dapo counts the tokens trained on: all ranks' active tokens / (processes x accumulation)
    assert float(batch["num_items_in_batch"]) == pytest.approx(batch["rollout"].completion_mask.sum().item() / 2)
    calls = []
    original = trainer._micro_loss
    trainer._micro_loss = lambda rb, b, idx: calls.append(len(rb)) or original(rb, b, idx)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    out = trainer.grpo_step(batch)
    assert calls == [n // 2, n // 2] and out["skipped_step"] == 0.0 and trainer.step == 1
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.model.parameters())), "no optimiser step"


def test_nothing_kept_fills_one_unit_with_zero_spread_groups(tmp_path, caplog):
    trainer = make_trainer(tmp_path, "--reward_funcs", "reliability_helpers:constant_reward",
                           "--max_sampling_rounds", "2")
    with caplog.at_level("WARNING", logger="grpo_scale"):
        batch = trainer.generate_and_score()
    m = batch["metrics"]
    assert len(batch["rollout"]) == 4 and m["dynamic/filled_groups"] == 1 and m["dynamic/rounds"] == 2
    assert m["reward/frac_zero_std"] == 1.0 and m["dynamic/dropped_groups"] == 3
    assert "kept 0 of the 2 groups the batch needs after max_sampling_rounds=2" in caplog.text
    assert trainer.grpo_step(batch)["skipped_step"] == 0.0


# ---------------------------------------------------------------------------- 2 processes
def test_share_of_two_ranks(tmp_path):
    """Each rank sampled different widths; every rank gets exactly the chosen rows, in order."""
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(port),
                           str(TESTS / "dynamic_probe.py"), str(tmp_path)],
                          env=rh.env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.0", "ok.1"]
