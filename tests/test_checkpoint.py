"""Checkpoint protocol: complete vs. unfinished folders, atomic publication, rotation, and what a
resumed trainer restores (RNG after seeding, data position, history, scheduler, optimiser)."""
import json
from pathlib import Path

import pytest
import torch

from grpo_scale import checkpoint as ckpt
from grpo_scale.config import ConfigError, load_config
from reliability_helpers import tiny_model_path


class FakeAccelerator:
    """One process; save_state writes two files, or dies half-way when told to."""

    is_main_process = is_local_main_process = True
    num_processes = 1

    def __init__(self, die_in_save: bool = False, disk_full: bool = False):
        self.die_in_save, self.disk_full = die_in_save, disk_full

    def wait_for_everyone(self):
        pass

    def save_state(self, output_dir):
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "model.safetensors").write_bytes(b"weights")
        if self.die_in_save:
            raise KeyboardInterrupt("killed while writing")  # stands for SIGKILL half-way through
        if self.disk_full:
            raise OSError(28, "No space left on device", str(out / "optimizer.bin"))
        (out / "optimizer.bin").write_bytes(b"state")


def complete(root: Path, step: int) -> Path:
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / ckpt.STATE_FILE).write_text(json.dumps({"step": step}))
    return path


def test_resume_ignores_tmp_and_partial_folders(tmp_path):
    complete(tmp_path, 4)
    tmp = complete(tmp_path, 8).rename(tmp_path / "checkpoint-8.tmp")  # finished writing, never renamed
    (tmp_path / "checkpoint-12").mkdir()                                # no trainer_state.json
    (tmp_path / "checkpoint-12" / "model.safetensors").write_bytes(b"half")
    (tmp_path / "checkpoint-latest").mkdir()
    assert ckpt.list_checkpoints(tmp_path) == [tmp_path / "checkpoint-4"]
    assert ckpt.resolve_resume(tmp_path, "latest") == tmp_path / "checkpoint-4"
    with pytest.raises(ConfigError, match="unfinished save"):
        ckpt.resolve_resume(tmp_path, str(tmp))
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        ckpt.resolve_resume(tmp_path, str(tmp_path / "checkpoint-12"))
    with pytest.raises(ConfigError, match="checkpoint-4 is the newest"):
        ckpt.resolve_resume(tmp_path, str(tmp_path))  # the output dir instead of a checkpoint in it
    with pytest.raises(ConfigError, match="does not exist"):
        ckpt.resolve_resume(tmp_path, str(tmp_path / "checkpoint-99"))
    assert ckpt.resolve_resume(tmp_path / "empty", "latest") is None  # a first start with 'latest'
    assert ckpt.resolve_resume(tmp_path, None) is None


def test_save_publishes_atomically_and_keeps_the_last_k(tmp_path):
    acc = FakeAccelerator()
    for step in (2, 4, 6):
        path = ckpt.save_checkpoint(acc, tmp_path, step, {"step": step}, save_total_limit=2)
        assert path == tmp_path / f"checkpoint-{step}"
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-6"]
    assert not list(tmp_path.glob("*.tmp"))
    state = ckpt.load_trainer_state(tmp_path / "checkpoint-6")
    assert state == {"version": ckpt.STATE_VERSION, "step": 6}
    assert (tmp_path / "checkpoint-6" / "optimizer.bin").is_file()


def test_kill_during_save_leaves_the_previous_checkpoint_latest(tmp_path, monkeypatch):
    ckpt.save_checkpoint(FakeAccelerator(), tmp_path, 4, {"step": 4})
    with pytest.raises(KeyboardInterrupt):  # dies inside save_state
        ckpt.save_checkpoint(FakeAccelerator(die_in_save=True), tmp_path, 8, {"step": 8})
    assert (tmp_path / "checkpoint-8.tmp").is_dir() and not (tmp_path / "checkpoint-8").exists()
    assert ckpt.resolve_resume(tmp_path, "latest") == tmp_path / "checkpoint-4"

    def die(*args):
        raise KeyboardInterrupt("killed before the rename")
    monkeypatch.setattr(ckpt, "_publish", die)  # dies after every file, the state file included, is written
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(FakeAccelerator(), tmp_path, 8, {"step": 8})
    assert (tmp_path / "checkpoint-8.tmp" / ckpt.STATE_FILE).is_file()
    assert ckpt.resolve_resume(tmp_path, "latest") == tmp_path / "checkpoint-4"
    monkeypatch.undo()
    ckpt.save_checkpoint(FakeAccelerator(), tmp_path, 8, {"step": 8, "again": True})  # cleans the leftover
    ckpt.save_checkpoint(FakeAccelerator(), tmp_path, 8, {"step": 8, "again": 2})     # replaces in place
    assert ckpt.load_trainer_state(ckpt.resolve_resume(tmp_path, "latest"))["again"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-8"]


def test_a_failed_write_keeps_the_previous_checkpoint_and_says_so(tmp_path):
    ckpt.save_checkpoint(FakeAccelerator(), tmp_path, 4, {"step": 4})
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.save_checkpoint(FakeAccelerator(disk_full=True), tmp_path, 8, {"step": 8})
    assert str(e.value).startswith("checkpoint-8 could not be written (rank 0: OSError: [Errno 28] No space left "
                                   "on device: ")
    assert f"the newest complete checkpoint, {tmp_path / 'checkpoint-4'}, is intact" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]  # nothing of checkpoint-8 left
    assert ckpt.save_checkpoint(FakeAccelerator(), tmp_path, 8, {"step": 8}) == tmp_path / "checkpoint-8"


ARGS = ["--eval_size", "2", "--eval_batch_size", "2", "--max_completion_length", "8", "--report_to", "none",
        "--per_device_train_batch_size", "4", "--num_generations", "4", "--learning_rate", "1e-3",
        "--temperature", "2.0", "--cpu_threads", "1", "--lr_scheduler_type", "linear", "--max_steps", "4",
        "--reward_funcs", "reliability_helpers:text_hash_reward", "--reward_weights", "null"]


def make_trainer(out, *extra):
    from grpo_scale.trainer import GRPOTrainer
    trainer = GRPOTrainer(load_config(ARGS + ["--model_name_or_path", tiny_model_path(), "--output_dir",
                                              str(out), *extra]))
    trainer.setup()
    return trainer


def test_resumed_trainer_restores_state_after_its_own_seeding(tmp_path):
    first = make_trainer(tmp_path)
    first.eval_before = {"accuracy": 0.25}
    for _ in range(2):
        first.grpo_step(first.generate_and_score())
    first.history.append({"step": 2, "loss": 0.5})
    path = first.save_checkpoint()
    saved_rng = torch.load(path / "random_states_0.pkl", weights_only=False)["torch_manual_seed"]
    torch.manual_seed(1234)  # whatever happens between the runs

    second = make_trainer(tmp_path, "--resume_from_checkpoint", "latest")
    assert second.resumed_from == path and second.step == 2
    assert torch.equal(torch.get_rng_state(), saved_rng), "set_seed in setup overwrote the restored RNG"
    assert second.stream.state_dict() == first.stream.state_dict()
    assert second.history == first.history and second.eval_before == {"accuracy": 0.25}
    assert second.scheduler.last_epoch == first.scheduler.last_epoch == 2
    assert second.scheduler.get_last_lr() == first.scheduler.get_last_lr()
    a, b = first.optimizer.state_dict()["state"], second.optimizer.state_dict()["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k]["exp_avg"], b[k]["exp_avg"]) for k in a)
    # the next rollout is the one the first trainer would have drawn (both share the global RNG)
    resumed = second.generate_and_score()["rollout"].completions
    torch.set_rng_state(saved_rng)
    assert resumed == first.generate_and_score()["rollout"].completions

    with pytest.raises(ConfigError, match="seed 42 \\(checkpoint\\) vs 43"):
        make_trainer(tmp_path, "--resume_from_checkpoint", "latest", "--seed", "43")
    with pytest.raises(ConfigError, match="would not end at max_steps 8; make max_steps - 2 a multiple"):
        make_trainer(tmp_path, "--resume_from_checkpoint", "latest", "--num_iterations", "4", "--max_steps", "8")
    (path / "random_states_0.pkl").unlink()
    with pytest.raises(ConfigError, match="random_states_0.pkl"):
        make_trainer(tmp_path, "--resume_from_checkpoint", str(path))


def test_trainer_state_is_plain_json(tmp_path):
    trainer = make_trainer(tmp_path, "--save_total_limit", "1")
    trainer.grpo_step(trainer.generate_and_score())
    trainer.save_checkpoint()
    trainer.grpo_step(trainer.generate_and_score())
    path = trainer.save_checkpoint()
    assert ckpt.list_checkpoints(tmp_path) == [path]
    state = json.loads((path / ckpt.STATE_FILE).read_text())
    for key in ("step", "data", "history", "window", "eval_before", "skipped_steps", "bad_in_a_row",
                "num_processes", "zero_stage", "seed", "config"):
        assert key in state, key
    assert state["step"] == 2 and state["data"]["position"] == 2 and state["num_processes"] == 1
