"""TRL's Python API: the scripts in examples/ run unchanged but for the import (as __main__), and
the pieces they rely on, in one process: TRL's config names and defaults, what is not supported yet, the
data formats, and the reward contract (prompts as the data has them, completions in the data's format,
completion_ids, trainer_state, log_metric, log_extra, async functions, the stop rule)."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from grpo_scale import GRPOConfig, GRPOTrainer
from grpo_scale.config import ConfigError
from grpo_scale.trainer import RewardFailed

ROOT = Path(__file__).resolve().parent.parent
EMBEDDED = str(ROOT / "grpo_scale" / "assets" / "tiny-math")


def run_example(name: str, out: Path, capsys, caplog) -> tuple[str, str]:
    """Run examples/NAME.py as a script (``__main__``, its own argv, from the repository root), in this
    process; returns (its stdout, its log)."""
    import runpy
    argv, cwd = sys.argv, os.getcwd()
    sys.argv = [f"examples/{name}.py", str(out)]
    os.chdir(ROOT)
    try:
        with caplog.at_level("INFO", logger="grpo_scale"):
            runpy.run_path(str(ROOT / "examples" / f"{name}.py"), run_name="__main__")
    finally:
        sys.argv = argv
        os.chdir(cwd)
    return capsys.readouterr().out, caplog.text


def test_example_standard_data_with_a_reward_on_an_extra_column(tmp_path, capsys, caplog):
    _, log = run_example("standard_data", tmp_path, capsys, caplog)
    assert "raised" not in log  # the reward got its column (a failing reward is logged, not fatal)
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(tmp_path) is not None  # save_model: plain transformers


def test_example_conversational_data_async_reward_and_weights(tmp_path, capsys, caplog):
    _, log = run_example("conversational_data", tmp_path, capsys, caplog)
    assert "sample |" in log and "raised" not in log  # completion[0]["content"] works


def test_example_model_object_processing_class_peft_and_save_model(tmp_path, capsys, caplog):
    out, _ = run_example("model_object", tmp_path, capsys, caplog)
    assert "reloaded Qwen2ForCausalLM" in out
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 8  # peft_config used


def test_example_reward_model(tmp_path, capsys, caplog):
    out, _ = run_example("reward_model", tmp_path, capsys, caplog)
    rewards = json.loads(out.split("reward per step:", 1)[1].strip().splitlines()[0])
    assert len(rewards) == 2 and all(r != 0.0 for r in rewards)  # the classifier's logits, not a constant


# ---------------------------------------------------------------------------- the config
def test_trl_names_and_defaults():
    cfg = GRPOConfig(max_steps=2)
    assert (cfg.learning_rate, cfg.beta, cfg.epsilon, cfg.epsilon_high, cfg.num_generations, cfg.loss_type,
            cfg.max_completion_length, cfg.logging_steps, cfg.gradient_checkpointing, cfg.log_completions,
            cfg.lr_scheduler_type, cfg.adam_beta2, cfg.report_to) == (
        1e-6, 0.0, 0.2, 0.2, 8, "dapo", 512, 10, True, False, "linear", 0.999, [])
    assert cfg.bf16 is torch.cuda.is_available()
    cfg = GRPOConfig(epsilon=0.1, epsilon_high=0.28, warmup_steps=0.1, log_completions=True, num_train_epochs=1,
                     report_to=["tensorboard"], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=3,
                     bf16=False, logging_steps=1)
    assert (cfg.epsilon, cfg.epsilon_high, cfg.report_to, cfg.seed) == (0.1, 0.28, ["tensorboard"], 3)
    assert GRPOConfig(report_to="none").report_to == [] and GRPOConfig(report_to="tensorboard").report_to == ["tensorboard"]
    # TRL's spellings of fields named differently here
    assert GRPOConfig(warmup_ratio=0.1).warmup_steps == 0.1
    assert GRPOConfig(per_device_eval_batch_size=4).eval_batch_size == 4
    assert GRPOConfig(epsilon_low=0.3).epsilon == 0.3


def test_trl_fields_not_supported_yet_say_so():
    # at their TRL defaults (a script that spells out a default) they are accepted and change nothing
    GRPOConfig(use_vllm=False, remove_unused_columns=False, optim="adamw_torch", run_name="x", push_to_hub=False)
    for field, value in (("vllm_model_impl", "transformers"), ("sync_ref_model", True), ("push_to_hub", True),
                         ("optim", "adafactor")):
        with pytest.raises(ConfigError, match=f"{field}=.*does not support yet"):
            GRPOConfig(**{field: value})
    with pytest.raises(ConfigError, match="unknown field 'num_generation'; did you mean 'num_generations'"):
        GRPOConfig(num_generation=4)
    for kwarg in ("callbacks", "optimizers", "tools", "environment_factory"):
        with pytest.raises(ConfigError, match=f"GRPOTrainer\\({kwarg}=...\\): not supported yet"):
            GRPOTrainer(model=EMBEDDED, reward_funcs="format", **{kwarg: None})


def test_a_callable_in_the_config_is_a_reward_function():
    def length(completions, **kwargs):
        return [float(len(c)) for c in completions]
    cfg = GRPOConfig(reward_funcs=[length, "format"], max_steps=2)
    assert cfg.reward_funcs == ["length", "format"] and cfg.reward_objects[0] is length
    trainer = GRPOTrainer(model=EMBEDDED, args=cfg)
    assert trainer.reward_objects[0] is length


def test_num_train_epochs_sets_the_steps_from_the_data(tmp_path):
    rows = [{"prompt": f"q{i}"} for i in range(20)]
    args = GRPOConfig(output_dir=str(tmp_path), num_train_epochs=1.5, per_device_train_batch_size=8, num_generations=4,
                      num_iterations=2, reward_funcs=["format"])
    trainer = GRPOTrainer(model=EMBEDDED, args=args, train_dataset=rows)
    trainer.check_inputs()
    assert trainer.cfg.max_steps == 15 * 2 * 1  # ceil(1.5 x 20 / 2 prompts per rollout) x num_iterations
    with pytest.raises(ConfigError, match="synthetic tasks are endless: set max_steps"):
        GRPOTrainer(model=EMBEDDED, args=GRPOConfig(output_dir=str(tmp_path))).check_inputs()


# ---------------------------------------------------------------------------- data and rewards
def small_args(tmp_path, **kw) -> GRPOConfig:
    values = dict(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=8, num_generations=4,
                  max_completion_length=8, report_to="none", use_cpu=True, gradient_checkpointing=False,
                  learning_rate=1e-4, disable_tqdm=True)
    return GRPOConfig(**{**values, **kw})


def recording_reward(calls):
    def reward(prompts, completions, completion_ids, trainer_state, log_metric, log_extra, **columns):
        calls.append(dict(prompts=prompts, completions=completions, completion_ids=completion_ids,
                          step=trainer_state.global_step, columns=columns))
        log_metric("my_metric", 2.5)
        log_extra("my_column", [f"c{i}" for i in range(len(completions))])
        return [float(len(ids)) for ids in completion_ids]
    return reward


@pytest.mark.parametrize("conversational", [False, True])
def test_rewards_get_the_data_as_it_is(tmp_path, conversational, caplog):
    """Prompts reach rewards as the data has them, completions in the data's format, token ids without
    padding, trainer_state, the other columns as keyword lists; log_metric reaches the metrics."""
    rows = [{"prompt": [{"role": "user", "content": f"Solve {i}+1"}] if conversational else f"Solve {i}+1",
             "answer": str(i + 1)} for i in range(6)]
    calls = []
    trainer = GRPOTrainer(model=EMBEDDED, reward_funcs=recording_reward(calls), args=small_args(tmp_path),
                          train_dataset=rows)
    with caplog.at_level("WARNING"):
        trainer.setup()
    batch = trainer.generate_and_score()
    call = calls[-1]
    assert all(p in [r["prompt"] for r in rows] for p in call["prompts"])
    completions = batch["rollout"].completions
    if conversational:
        assert call["completions"] == [[{"role": "assistant", "content": c}] for c in completions]
        assert "string prompts" not in caplog.text
    else:
        assert call["completions"] == completions
        assert "string prompts (TRL's standard format) are tokenized as they are" in caplog.text
    ro = batch["rollout"]
    assert call["completion_ids"] == [ids[m.bool()].tolist() for ids, m in zip(ro.completion_ids, ro.attention_mask)]
    assert call["step"] == 0 and call["columns"]["answer"] and set(call["columns"]) == {"answer"}
    assert batch["metrics"]["my_metric"] == 2.5


def test_a_function_without_kwargs_gets_what_it_names_and_async_is_awaited(tmp_path):
    def plain(completions, answer):  # no **kwargs: TRL would pass it arguments it cannot take
        return [0.5] * len(completions)

    async def later(completions, **kwargs):
        return [1.0] * len(completions)

    rows = [{"prompt": f"Solve {i}+1", "answer": str(i + 1)} for i in range(6)]
    trainer = GRPOTrainer(model=EMBEDDED, reward_funcs=[plain, later], args=small_args(tmp_path), train_dataset=rows)
    trainer.setup()
    m = trainer.generate_and_score()["metrics"]
    assert m["reward/plain"] == 0.5 and m["reward/later"] == 1.0


def test_a_reward_that_raises_on_every_item_stops_the_run(tmp_path):
    """A TRL reward written for conversational data (completion[0]["content"]) on string prompts raises on
    every item: after reward_fail_steps rollouts the run stops, naming the function and its error."""
    def conversational_only(completions, **kwargs):
        return [float(len(c[0]["content"])) for c in completions]

    rows = [{"prompt": f"Solve {i}+1"} for i in range(6)]
    trainer = GRPOTrainer(model=EMBEDDED, reward_funcs=[conversational_only, "format"],
                          args=small_args(tmp_path, reward_fail_steps=2, max_steps=4), train_dataset=rows)
    with pytest.raises(RewardFailed, match="conversational_only raised on every item for 2 rollouts in a row "
                                           "\\(TypeError: string indices must be integers"):
        trainer.train()
    assert trainer.step == 1  # the first rollout trained on the other reward; the second stopped the run


def test_iterable_dataset_is_read_as_needed_and_resumes(tmp_path):
    from datasets import IterableDataset
    rows = [{"prompt": f"Solve {i}+1", "answer": str(i + 1)} for i in range(5)]
    stream_data = IterableDataset.from_generator(lambda: iter(rows))
    trainer = GRPOTrainer(model=EMBEDDED, reward_funcs="format", args=small_args(tmp_path), train_dataset=stream_data)
    trainer.check_inputs()
    first = trainer.stream.take(7)  # past the end: a second pass
    assert [r["prompt"] for r in first] == [r["prompt"] for r in rows] + [rows[0]["prompt"], rows[1]["prompt"]]
    state = trainer.stream.state_dict()
    again = GRPOTrainer(model=EMBEDDED, reward_funcs="format", args=small_args(tmp_path), train_dataset=stream_data)
    again.check_inputs()
    again.stream.load_state_dict(state)
    assert again.stream.take(2) == trainer.stream.take(2)


def test_bad_conversational_rows_name_the_row():
    from grpo_scale.tasks.data import rows_from
    with pytest.raises(ValueError, match="train_dataset row 2: message 0 of 'prompt' must be"):
        rows_from([{"prompt": [{"role": "user", "content": "a"}]}, {"prompt": [{"role": "user"}]}], "train_dataset")
    with pytest.raises(ValueError, match="row 2: 'prompt' is standard but row 1's is conversational"):
        rows_from([{"prompt": [{"role": "user", "content": "a"}]}, {"prompt": "b"}], "train_dataset")


def test_a_loaded_reward_model_with_its_tokenizer(tmp_path):
    """A loaded AutoModelForSequenceClassification with one label, its tokenizer in
    reward_processing_classes: the reward is its logit on prompt + completion (chat template applied)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
    config = AutoConfig.from_pretrained(EMBEDDED, num_labels=1)
    config.pad_token_id = 0
    torch.manual_seed(0)
    scorer = AutoModelForSequenceClassification.from_config(config)
    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED)
    rows = [{"prompt": [{"role": "user", "content": f"Solve {i}+1"}]} for i in range(6)]
    trainer = GRPOTrainer(model=EMBEDDED, reward_funcs=[scorer], reward_processing_classes=[tokenizer],
                          args=small_args(tmp_path), train_dataset=rows)
    trainer.setup()
    batch = trainer.generate_and_score()
    scores = trainer.reward_funcs[0](prompts=[rows[0]["prompt"]], completions=[[{"role": "assistant", "content": "x"}]])
    enc = tokenizer([tokenizer.apply_chat_template(rows[0]["prompt"] + [{"role": "assistant", "content": "x"}],
                                                   tokenize=False)], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        want = float(scorer(**enc).logits[0, 0])
    assert scores == [pytest.approx(want, abs=1e-5)]
    assert torch.isfinite(torch.tensor(batch["metrics"]["reward/mean"]))
