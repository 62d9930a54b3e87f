"""Reward functions under reward_timeout: synchronous ones in a worker process that is killed when a call
runs over, async ones under asyncio.wait_for; what is refused, and a run whose reward hangs."""
import asyncio
import time

import pytest

import reliability_helpers as rh
from grpo_scale.config import ConfigError, load_config
from grpo_scale.reward_timeout import Bounded, RewardTimeout
from grpo_scale.rewards import correctness_reward
from grpo_scale.trainer import guard_reward

PROMPTS = ["Solve 1+1", "Solve 2+2", "Solve 3+3"]
COMPLETIONS = ["<think>1+1</think><answer>2</answer>", "<answer>5</answer>", "4"]


def call(fn, **extra):
    return fn(prompts=PROMPTS, completions=COMPLETIONS, completion_ids=[[1]] * 3, **extra)


def test_a_call_that_runs_over_is_stopped_and_the_next_call_works():
    """One function: a call within the budget (its log calls replayed here), one past it (the worker is
    killed, the items scored missing once, not retried one by one), and a call again (a new worker)."""
    fn = Bounded(rh.napping_reward, "napping_reward", timeout=1.0)
    metrics, extras = [], []
    logs = dict(log_metric=lambda n, v: metrics.append((n, v)), log_extra=lambda n, v: extras.append((n, v)))
    try:
        assert call(fn, nap=[0.0] * 3, **logs) == [float(len(c)) for c in COMPLETIONS]
        assert metrics == [("mean_chars", sum(map(len, COMPLETIONS)) / 3)]
        assert extras == [("chars", list(map(len, COMPLETIONS)))]
        guarded = guard_reward(fn, "napping_reward")
        t0 = time.monotonic()
        assert call(guarded, nap=[3600.0] * 3, **logs) == [None, None, None]
        assert time.monotonic() - t0 < 1.0 + 5  # the budget once, not once per item
        assert guarded.failure == ("RewardTimeout: took longer than reward_timeout=1 s on 3 completion(s); its "
                                   "worker process was killed")
        assert fn._worker is None
        assert call(fn, nap=[0.0] * 3, **logs) == [float(len(c)) for c in COMPLETIONS]
    finally:
        fn.close()


def test_results_are_those_of_a_call_in_this_process():
    fn = Bounded(correctness_reward, "correctness", timeout=30)
    try:
        assert call(fn, answer=["2", "4", "6"]) == correctness_reward(PROMPTS, COMPLETIONS, ["2", "4", "6"])
    finally:
        fn.close()


def test_async_rewards_are_bounded_in_this_process():
    async def slow(prompts, completions, **kwargs):
        await asyncio.sleep(30)

    async def quick(completions, **kwargs):
        await asyncio.sleep(0)
        return [1.0] * len(completions)

    t0 = time.monotonic()
    with pytest.raises(RewardTimeout):
        call(Bounded(slow, "slow", timeout=0.2))
    assert time.monotonic() - t0 < 5
    assert call(Bounded(quick, "quick", timeout=5)) == [1.0, 1.0, 1.0]
    assert Bounded(quick, "quick", 5).in_worker is False


def test_functions_a_worker_cannot_import_are_refused():
    def nested(prompts, completions, **kwargs):
        return [0.0] * len(completions)

    def in_script(prompts, completions, **kwargs):
        return [0.0] * len(completions)
    in_script.__module__ = "__main__"
    for fn, why in [(lambda prompts, completions, **kw: [0.0], "cannot be sent to a worker process by name"),
                    (nested, "cannot be sent to a worker process by name"),
                    (in_script, "defined in the script being run")]:
        with pytest.raises(ValueError, match=f"reward 'mine': reward_timeout runs synchronous .* {why}.*module:function"):
            Bounded(fn, "mine", 5)


def test_config_rule():
    with pytest.raises(ConfigError, match="reward_timeout must be > 0 seconds or null"):
        load_config(["--reward_timeout", "0"])


def test_a_reward_that_hangs_stops_the_run_after_reward_fail_steps(tmp_path):
    from grpo_scale.trainer import GRPOTrainer, RewardFailed
    cfg = load_config(["--model_name_or_path", rh.tiny_model_path(), *rh.FAST, "--max_steps", "4",
                       "--reward_funcs", "format,reliability_helpers:hanging_reward", "--reward_timeout", "1",
                       "--reward_fail_steps", "1", "--report_to", "none", "--output_dir", str(tmp_path)])
    trainer = GRPOTrainer(cfg)
    with pytest.raises(RewardFailed, match="hanging_reward.*RewardTimeout: took longer than reward_timeout=1 s"):
        trainer.train()
    assert trainer.step == 0 and len(trainer._bounded) == 2  # format ran in a worker too
    assert all(f._worker is None for f in trainer._bounded)  # the workers are gone
