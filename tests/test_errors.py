"""Bad input and faults: every class of bad configuration through `python train.py` (one message, exit 2,
no traceback), bad data and unsafe model folders (through train.py's main, in process where a
subprocess would only add start-up time), a tokenizer without a chat template, reward functions that
raise, and non-finite steps (skipped on every rank, then a checkpoint and a stop)."""
import importlib.util
import json
import logging
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import reliability_helpers as rh
from grpo_scale.config import ConfigError, GRPOConfig, load_config


def fails_cleanly(proc, *fragments):
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert out.count("error: ") == 1, out[-3000:]
    for fragment in fragments:
        assert fragment in out, (fragment, out[-3000:])


def train_main(argv) -> subprocess.CompletedProcess:
    """train.py's main in this process (torch is imported already: seconds cheaper than a subprocess).
    An exception it lets through fails the test, as a traceback would; its error lines are collected."""
    spec = importlib.util.spec_from_file_location("train_script", rh.ROOT / "train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    lines = []
    script._error = lambda message: lines.append(f"error: {message}\n")
    code = script.main(argv)
    return subprocess.CompletedProcess(argv, code, "", "".join(lines))


@pytest.fixture(scope="module")
def model_dir():
    return rh.tiny_model_path()


# ---------------------------------------------------------------------------- configuration
BROKEN_YAML = "max_steps: 3\nlearning_rate: [1e-5\nseed: 1\n"


@pytest.mark.parametrize("argv, fragments", [
    (["--learing_rate", "1e-5"], ["unknown field 'learing_rate'", "did you mean 'learning_rate'"]),
    (["--max_steps", "ten"], ["max_steps expects int, got 'ten'"]),
    (["--learning_rate", "-1e-5"], ["learning_rate must be > 0"]),
    (["--epsilon", "1.2"], ["epsilon must be in (0, 1)"]),
    (["--num_generations", "1"], ["num_generations must be >= 2"]),
    (["--max_bad_steps", "0"], ["max_bad_steps must be >= 1"]),
    (["--per_device_train_batch_size", "6", "--num_generations", "4"], ["is not divisible by num_generations"]),
    (["--num_iterations", "2", "--max_steps", "3"], ["is not a multiple of num_iterations", "set max_steps to 4 or 2"]),
    (["--config", "{broken}"], ["broken.yaml line 3", "invalid YAML"]),
    (["--config", "{tmp}/missing.yaml"], ["config file not found"]),
    (["--model_name_or_path", "{tmp}/no-such-model"], ["no-such-model is not a directory"]),
    (["--model_name_or_path", "{tmp}"], ["is not a model folder (no config.json)"]),
    (["--dataset_path", "{tmp}/no.jsonl"], ["dataset_path:", "does not exist"]),
    (["--resume_from_checkpoint", "{tmp}/checkpoint-3"], ["resume_from_checkpoint:", "does not exist"]),
], ids=["unknown-field", "wrong-type", "negative-lr", "epsilon-low", "one-generation", "max-bad-steps",
        "batch-vs-group", "steps-vs-iterations", "broken-yaml", "missing-config", "missing-model", "not-a-model", "missing-data",
        "missing-checkpoint"])
def test_bad_configuration_is_one_message_and_exit_2(tmp_path, model_dir, argv, fragments):
    (tmp_path / "broken.yaml").write_text(BROKEN_YAML)
    argv = [a.format(tmp=tmp_path, broken=tmp_path / "broken.yaml") for a in argv]
    if "--model_name_or_path" not in argv:
        argv = ["--model_name_or_path", model_dir, *argv]
    fails_cleanly(rh.run(argv + ["--output_dir", str(tmp_path / "out")], timeout=120), *fragments)


# ---------------------------------------------------------------------------- data
@pytest.mark.parametrize("lines, fragments", [
    (['{"prompt": "Solve 1+1", "answer": "2"}', '{"prompt": "Solve 2+2", "answer": '],
     ["data.jsonl line 2: not valid JSON"]),
    (['{"prompt": "Solve 1+1", "answer": "2"}', '{"question": "Solve 2+2", "answer": "4"}'],
     ["data.jsonl line 2: missing 'prompt' column"]),
    (['{"prompt": "Solve 1+1"}', '{"prompt": "Solve 2+2"}'],
     ["reward 'correctness_reward' needs the column(s) ['answer']"]),
], ids=["unreadable-row", "missing-prompt", "missing-answer"])
def test_bad_data_names_the_file_and_the_row(tmp_path, model_dir, lines, fragments):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    proc = train_main(["--model_name_or_path", model_dir, "--dataset_path", str(data), "--reward_funcs",
                       "correctness", "--reward_weights", "null", "--output_dir", str(tmp_path / "out")])
    fails_cleanly(proc, *fragments)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


# ---------------------------------------------------------------------------- safe loading
def copy_model(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_pickle_only_model_is_refused(tmp_path, model_dir):
    from safetensors.torch import load_file
    pickled = copy_model(model_dir, tmp_path / "pickled")
    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    proc = rh.run(["--model_name_or_path", str(pickled), "--output_dir", str(tmp_path / "out")], timeout=120)
    fails_cleanly(proc, "pytorch_model.bin", "safetensors only")
    # the loader itself refuses too, should the check before it be bypassed
    from grpo_scale.trainer import GRPOTrainer
    with pytest.raises(OSError):
        GRPOTrainer(GRPOConfig(model_name_or_path=str(pickled)))._load_model(str(pickled))


def test_model_code_runs_only_with_trust_remote_code(tmp_path, model_dir):
    assert GRPOConfig().trust_remote_code is False
    assert all(not load_config(["--config", str(p)]).trust_remote_code for p in (rh.ROOT / "configs").glob("*.yaml"))
    custom = copy_model(model_dir, tmp_path / "custom")
    config = json.loads((custom / "config.json").read_text())
    config.update(model_type="rel_custom_model", auto_map={"AutoConfig": "custom_code.RelConfig",
                                                           "AutoModelForCausalLM": "custom_code.RelModel"})
    (custom / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "custom-code-ran"
    (custom / "custom_code.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import Qwen2Config as RelConfig, Qwen2ForCausalLM as RelModel\n")
    proc = train_main(["--model_name_or_path", str(custom), "--output_dir", str(tmp_path / "out")])
    fails_cleanly(proc, "trust_remote_code")
    assert not marker.exists(), "the model folder's code ran"


# ---------------------------------------------------------------------------- in-process trainers
ARGS = ["--eval_size", "2", "--eval_batch_size", "2", "--max_completion_length", "8", "--report_to", "none",
        "--logging_steps", "1",
        "--num_generations", "4", "--learning_rate", "1e-3", "--temperature", "2.0", "--cpu_threads", "1",
        "--reward_funcs", "reliability_helpers:text_hash_reward", "--reward_weights", "null"]


def make_trainer(model, out, *extra):
    from grpo_scale.trainer import GRPOTrainer
    trainer = GRPOTrainer(load_config(ARGS + ["--model_name_or_path", str(model), "--output_dir", str(out), *extra]))
    trainer.setup()
    return trainer


def test_tokenizer_without_chat_template_uses_the_documented_fallback(tmp_path, model_dir, caplog):
    plain = copy_model(model_dir, tmp_path / "plain")
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    tok_config = json.loads((plain / "tokenizer_config.json").read_text())
    tok_config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(tok_config))
    with caplog.at_level(logging.WARNING, logger="grpo_scale"):
        trainer = make_trainer(plain, tmp_path / "out", "--per_device_train_batch_size", "4", "--max_steps", "1")
    assert "has no chat template" in caplog.text
    prompt = trainer._render([{"prompt": [{"role": "user", "content": "Solve 1+2"}]}])[0]
    assert prompt.endswith("User: Solve 1+2\nAssistant:") and prompt.startswith(trainer.cfg.system_prompt)
    assert trainer._render([{"prompt": "Solve 1+2"}])[0] == "Solve 1+2"  # standard format: as it is
    assert torch.isfinite(torch.tensor(trainer.grpo_step(trainer.generate_and_score())["loss"]))


# ---------------------------------------------------------------------------- rewards that raise
def test_guard_reward_scores_the_items_that_do_not_raise(caplog):
    from grpo_scale.trainer import guard_reward
    completions = [f"completion {i}\x1b[2J" for i in range(12)]
    bad = [rh.raises_on_some(c) for c in completions]
    assert any(bad) and not all(bad)
    guarded = guard_reward(rh.flaky_reward, "flaky_reward")
    assert guarded.__name__ == "flaky_reward"
    with caplog.at_level(logging.WARNING, logger="grpo_scale"):
        scores = guarded(prompts=["p"] * 12, completions=completions, answer=["1"] * 12)
    assert [s is None for s in scores] == bad
    assert scores[bad.index(False)] == rh.flaky_reward(["p"], [completions[bad.index(False)]])[0]
    assert "reward flaky_reward raised RuntimeError" in caplog.text
    assert repr(completions[bad.index(True)]) in caplog.text  # the item, escaped: no raw terminal codes
    assert "\x1b" not in caplog.text


def test_reward_that_raises_end_to_end(tmp_path, model_dir):
    proc = rh.run(["--model_name_or_path", model_dir, *rh.FAST, "--reward_funcs",
                   "reliability_helpers:flaky_reward,format", "--max_steps", "2", "--save_steps", "2",
                   "--output_dir", str(tmp_path / "out")], timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "reward flaky_reward raised RuntimeError: 'flaky reward cannot score this item' on item" in out
    history = json.loads((tmp_path / "out" / "checkpoint-2" / "trainer_state.json").read_text())["history"]
    assert all(h["reward/flaky_reward"] == h["reward/flaky_reward"] for h in history), "no item was scored"
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["steps"] == 2


# ---------------------------------------------------------------------------- non-finite steps
def test_non_finite_steps_are_skipped_then_the_run_stops(tmp_path, model_dir, monkeypatch):
    from grpo_scale.trainer import TrainingAborted
    trainer = make_trainer(model_dir, tmp_path / "out", "--per_device_train_batch_size", "4",
                           "--gradient_accumulation_steps", "2", "--max_steps", "8", "--max_bad_steps", "3")
    micro_loss = trainer._micro_loss
    nan_steps, inf_grad_steps = {2, 5, 6, 7}, {3}

    def faulty(rb, batch, idx):
        out = micro_loss(rb, batch, idx)
        step, first = trainer.step + 1, idx.start == 0  # only the first of two micro-batches is bad
        if step in nan_steps and first:
            return out._replace(loss=out.loss * float("nan"))
        if step in inf_grad_steps and first:
            return out._replace(loss=rh.InfGrad.apply(out.loss))
        return out
    monkeypatch.setattr(trainer, "_micro_loss", faulty)

    def snapshot():
        params = [p.detach().clone() for p in trainer.model.parameters()]
        adam = [int(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()]
        return params, adam

    for step in range(1, 5):
        (p0, a0) = snapshot()
        m = trainer.grpo_step(trainer.generate_and_score())
        (p1, a1) = snapshot()
        unchanged = all(torch.equal(x, y) for x, y in zip(p0, p1)) and a0 == a1
        assert unchanged == (step in nan_steps | inf_grad_steps), step
        assert m["skipped_step"] == float(unchanged)
        assert all(torch.isfinite(p).all() for p in p1)
    assert trainer.skipped_steps == 2 and trainer.bad_in_a_row == 0  # step 4 was good again

    with pytest.raises(TrainingAborted, match=r"3 steps in a row \(up to step 7\).*checkpoint-7"):
        trainer.train()
    state = json.loads((tmp_path / "out" / "checkpoint-7" / "trainer_state.json").read_text())
    assert state["step"] == 7 and state["skipped_steps"] == 5 and state["bad_in_a_row"] == 3
    assert [h["step"] for h in state["history"]] == [5, 6, 7]  # logged before the stop
    assert [h["skipped_step"] for h in state["history"]] == [1.0, 1.0, 1.0]
    assert [h["skipped_steps_total"] for h in state["history"]] == [3.0, 4.0, 5.0]


@pytest.mark.slow  # 26 s; the default suite skips non-finite steps in one process (above)
def test_two_ranks_agree_to_skip_and_stop(tmp_path, model_dir):
    """ZeRO-2: rank 1 alone sees a NaN loss (step 2), rank 0 alone an infinite gradient (step 3); both
    ranks skip both steps. Three NaN steps in a row on rank 1 stop the run through train.py's main."""
    proc = rh.run([str(tmp_path), "2:1,5:1,6:1,7:1", "3:0", "--model_name_or_path", model_dir, *rh.FAST,
                   "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--max_steps", "8",
                   "--max_bad_steps", "3", "--output_dir", str(tmp_path / "out")],
                  ranks=2, timeout=300, script=rh.TESTS / "fault_probe.py")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "3 steps in a row (up to step 7)" in out, out[-4000:]
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0["exit"] == r1["exit"] == 3
    assert r0["records"] == r1["records"], "the ranks diverged"
    moved = {r["step"]: r["after"] != r["before"] for r in r0["records"]}
    assert moved == {1: True, 2: False, 3: False, 4: True, 5: False, 6: False, 7: False}
    assert [r["skipped"] for r in r0["records"]] == [0, 1, 1, 0, 1, 1, 1]
    assert (tmp_path / "out" / "checkpoint-7" / "trainer_state.json").is_file()


@pytest.mark.slow  # 23 s; tests/test_api.py stops on a reward that always raises, in one process
def test_a_reward_that_always_raises_stops_every_rank(tmp_path, model_dir):
    """Standard (string) data and a reward written for conversational data: it raises on every item; after
    reward_fail_steps rollouts all ranks stop together (no hang), with one error naming the function and
    its exception, exit status 2, and no summary written."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Solve {i}+{i}", "answer": str(2 * i)}) + "\n" for i in range(40)))
    proc = rh.run(["--model_name_or_path", model_dir, *rh.FAST, "--dataset_path", str(data), "--reward_funcs",
                   "reliability_helpers:conversational_only_reward,format", "--max_steps", "6",
                   "--reward_fail_steps", "2", "--per_device_train_batch_size", "4",
                   "--output_dir", str(tmp_path / "out")], ranks=2, timeout=300)
    # each rank exits 2; the launcher reports its failed ranks and exits 1 (as the README says)
    assert proc.returncode == 1 and "exitcode  : 2" in proc.stderr, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stderr.count("reward function conversational_only_reward raised on every item for 2 "
                             "rollouts in a row (TypeError: string indices must be integers") == 1  # both raised it
    assert re.search(r"error \(rank [01]\): reward function conversational_only_reward", proc.stderr)
    assert not (tmp_path / "out" / "summary.json").exists()
