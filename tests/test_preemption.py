"""Pre-emption and faults: a stop signal saves a checkpoint and ends the run, and the run resumed from it
ends where an uninterrupted run ends (max |dw| <= 1e-6); a write that fails on one rank during a save
stops every rank with one message, the previous checkpoint intact, and no rank left waiting.

The signals arrive at fixed points (hooks in tests/signal_probe.py, or on the trainer in-process), never at
random times: during generation, during backward (GA 2: between the micro-batches, before the optimiser
update), during a save. One process training LoRA adapters (in-process: the signal goes to this process,
as to `python train.py`), stopped at all three; and 2 ranks under ZeRO-2 with full fine-tuning and
dynamic sampling, whose rounds and counters a stop must also put back, stopped during generation (SIGTERM
to the launcher's process group, as a scheduler sends it; the launcher forwards it to the ranks, whose
sessions are their own) and backward (SIGUSR1 to the ranks), then failing a save on one rank, then
killed with SIGKILL, and resumed; checked against the uninterrupted run's weights and TensorBoard
curves."""
import errno
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

import reliability_helpers as rh
from grpo_scale import checkpoint as ckpt
from grpo_scale import preemption, rollout
from grpo_scale.config import load_config

TOL = 1e-6
# (hook, step it fires in, signal, the step whose checkpoint the stop leaves)
CHAIN = [("generation", 2, signal.SIGTERM, 1), ("backward", 3, signal.SIGUSR1, 2), ("save", 4, signal.SIGINT, 4)]
ARGS = ["--eval_size", "2", "--eval_batch_size", "2", "--max_completion_length", "8", "--report_to", "none",
        "--num_generations", "4", "--learning_rate", "1e-3", "--temperature", "2.0", "--cpu_threads", "1",
        "--seed", "7", "--max_steps", "6", "--save_steps", "4", "--gradient_accumulation_steps", "2",
        "--logging_steps", "1"]


def test_second_sigint_aborts_at_once():
    stop = preemption.StopSignals()
    assert stop.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt, match="second SIGINT"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    finally:
        stop.uninstall()


# ---------------------------------------------------------------------------- one process, in-process
def one_process_trainer(out: Path, *extra):
    from grpo_scale.trainer import GRPOTrainer
    trainer = GRPOTrainer(load_config(ARGS + ["--model_name_or_path", rh.tiny_model_path(), "--per_device_train_batch_size",
                                              "4", "--reward_funcs", "reliability_helpers:text_hash_reward",
                                              "--reward_weights", "null", "--use_peft", "true", "--beta", "0.04",
                                              "--lora_dropout", "0.1", "--output_dir", str(out), *extra]))
    trainer.setup()
    return trainer


def arm(trainer, monkeypatch, hook: str, step: int, sig: int) -> None:
    """Send ``sig`` to this process at ``hook`` of ``step``, once."""
    fired = []

    def fire(now: bool) -> None:
        if now and not fired:
            fired.append(hook)
            os.kill(os.getpid(), sig)

    if hook == "generation":
        sample = rollout.sample

        def sample_hooked(*args, **kwargs):
            fire(trainer.step + 1 == step)
            return sample(*args, **kwargs)
        monkeypatch.setattr(rollout, "sample", sample_hooked)
    elif hook == "backward":
        micro_loss = trainer._micro_loss

        def micro_loss_hooked(rb, batch, idx):
            out = micro_loss(rb, batch, idx)
            fire(trainer.step + 1 == step and idx.start == 0)
            return out
        trainer._micro_loss = micro_loss_hooked
    else:
        save_files = ckpt._save_files

        def save_files_hooked(accelerator, tmp, state, **kwargs):
            save_files(accelerator, tmp, state, **kwargs)
            fire(state["step"] == step)
        monkeypatch.setattr(ckpt, "_save_files", save_files_hooked)


def weights(trainer) -> dict:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_signals_one_process(tmp_path, monkeypatch):
    from grpo_scale.trainer import TrainingStopped
    ref = one_process_trainer(tmp_path / "ref")
    start = weights(ref)
    ref.train()
    want = weights(ref)
    assert max(float((want[k] - v).abs().max()) for k, v in start.items()) > 1e-4
    out = tmp_path / "run"
    for i, (hook, step, sig, saved) in enumerate(CHAIN):
        trainer = one_process_trainer(out, *(["--resume_from_checkpoint", "latest"] if i else []))
        with monkeypatch.context() as m:
            arm(trainer, m, hook, step, sig)
            with pytest.raises(TrainingStopped, match=f"stopped by {signal.Signals(sig).name} at"):
                trainer.train()
        marker = json.loads((out / preemption.MARKER).read_text())
        assert marker["step"] == saved == trainer.step and marker["signal"] == signal.Signals(sig).name, marker
        assert marker["within_grace"] and marker["seconds_to_save"] < 25, marker
        assert ckpt.list_checkpoints(out)[-1].name == f"checkpoint-{saved}"
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers removed after train()
    last = one_process_trainer(out, "--resume_from_checkpoint", "latest")
    assert last.step == 4
    last.train()
    assert not (out / preemption.MARKER).exists()
    dw = max(float((a.double() - want[k].double()).abs().max()) for k, a in weights(last).items())
    print(f"one process, LoRA, stopped at generation, backward and a save, resumed: max |dw| = {dw:.3g}")
    assert dw <= TOL


def test_a_save_slower_than_the_grace_period_is_said(tmp_path, caplog):
    trainer = one_process_trainer(tmp_path, "--stop_grace_seconds", "1e-6")
    with caplog.at_level("WARNING", logger="grpo_scale"):
        trainer.save_checkpoint()
        trainer.save_checkpoint()
    assert caplog.text.count("more than stop_grace_seconds=1e-06: a run stopped by a signal could be killed") == 1


# ---------------------------------------------------------------------------- 2 ranks, launched
def launch_probe(hook: str, step: int, marker: Path, args: list[str]) -> subprocess.Popen:
    cmd = rh.command([hook, str(step), str(marker), *args], 2, script=rh.TESTS / "signal_probe.py")
    return subprocess.Popen(cmd, cwd=rh.ROOT, env=rh.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def signalled(proc: subprocess.Popen, marker: Path, sig: int, timeout: float = 240) -> str:
    """Wait for rank 0 to reach its hook, then signal as schedulers do, and return the output. SIGTERM and
    SIGINT go to the launcher's process group (torchrun forwards them to the ranks). The launcher does not
    handle SIGUSR1 (it would die of it, and accelerate launch cannot change that), so SIGUSR1 goes to the
    ranks' processes, as a scheduler that signals the training processes sends it."""
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the run never reached its hook:\n" + proc.communicate()[0][-4000:])
        time.sleep(0.05)
    if sig in (signal.SIGUSR1, signal.SIGKILL):  # SIGKILL: the ranks too (their sessions are their own)
        ranks = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert len(ranks) == 2, ranks
        for pid in ranks:
            os.kill(int(pid), sig)
    if sig != signal.SIGUSR1:
        os.killpg(proc.pid, sig)
    try:
        return proc.communicate(timeout=120)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("the ranks did not stop within 120 s:\n" + proc.communicate()[0][-4000:])


def test_two_ranks_stopped_failing_a_save_and_killed_resume_exactly(tmp_path):
    """Full fine-tuning with dynamic sampling, 3 completions per rank and micro-step in groups of 4 (groups
    span the ranks); the overlong reward is logged (weight 0). The run is stopped by SIGTERM to the
    launcher's process group during generation of step 2, by SIGUSR1 to the ranks during backward of step
    3; then rank 1's disk is full while checkpoint-4 is written (every rank stops with one message, exit
    status 5, checkpoint-2 intact, nothing of checkpoint-4 left); then a run is SIGKILLed in step 6 after
    logging step 5, and resumed to the end. Weights, TensorBoard curves (each step once) and the
    dynamic-sampling counters equal the uninterrupted run's. (A signal during a save: the one-process
    test.)"""
    args = ARGS + ["--model_name_or_path", rh.tiny_model_path(), "--per_device_train_batch_size", "3",
                   "--report_to", "tensorboard", "--dynamic_sampling", "true", "--max_sampling_rounds", "3",
                   "--reward_weights", "1,0",
                   "--reward_funcs", "reliability_helpers:half_flat_reward,soft_overlong_punishment(soft_punish_cache=4)"]
    ref, out = tmp_path / "uninterrupted", tmp_path / "run"
    proc = rh.run(args + ["--output_dir", str(ref)], ranks=2)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    resume = ["--output_dir", str(out), "--resume_from_checkpoint", "latest"]
    for hook, step, sig, saved in CHAIN[:2]:
        marker = tmp_path / f"hooked-{hook}"
        text = signalled(launch_probe(hook, step, marker, args + resume), marker, sig)
        name = signal.Signals(sig).name
        assert re.search(rf"error \(rank [01]\): stopped by {name} at", text), text[-4000:]
        assert text.count(f"stopped by {name} at") == 1, text[-4000:]  # both ranks raised it: printed once
        state = json.loads((out / preemption.MARKER).read_text())
        assert state["step"] == saved and state["signal"] == name and state["within_grace"], state
        assert ckpt.list_checkpoints(out)[-1].name == f"checkpoint-{saved}", text[-3000:]
        assert not list(out.glob("*.tmp")), text[-3000:]

    proc = subprocess.run(rh.command(["enospc", "4", str(tmp_path / "unused"), *args, *resume], 2,
                                     script=rh.TESTS / "signal_probe.py"),
                          cwd=rh.ROOT, env=rh.env(), capture_output=True, text=True, timeout=240)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "exitcode  : 5" in text, text[-3000:]
    assert re.search(r"error \(rank [01]\): checkpoint-4 could not be written \(rank 1: OSError: \[Errno "
                     rf"{errno.ENOSPC}\] No space left on device", text), text[-4000:]
    assert text.count("could not be written") == 1, text[-4000:]  # raised by both ranks, printed once
    assert f"the newest complete checkpoint, {out / 'checkpoint-2'}, is intact" in text
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]

    signalled(launch_probe("generation", 6, tmp_path / "hooked-kill", args + resume), tmp_path / "hooked-kill",
              signal.SIGKILL)
    assert ckpt.list_checkpoints(out)[-1].name == "checkpoint-4"
    proc = rh.run(args + resume, ranks=2)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "checkpoint-4 at step 4" in proc.stdout + proc.stderr and not (out / preemption.MARKER).exists()
    dw = rh.max_weight_diff(ref / "final", out / "final")
    print(f"2-rank ZeRO-2, dynamic sampling, stopped at generation and backward, a failed save, killed, resumed: "
          f"max |dw| = {dw:.3g}")
    assert dw <= TOL
    assert rh.max_weight_diff(out / "final", Path(rh.tiny_model_path())) > 1e-4
    # TensorBoard: the killed run had logged step 5 (written twice, shown once); each curve equals the
    # uninterrupted run's, every step once; evaluated before training once
    assert rh.raw_steps(out / "tensorboard", "train/loss").count(5) == 2
    for tag in ("train/loss", "train/reward/mean", "train/grad_norm", "train/lr", "train/dynamic/rounds"):
        got, want = rh.scalars(out / "tensorboard", tag), rh.scalars(ref / "tensorboard", tag)
        assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, 7)), (tag, got)
        assert [v for _, v in got] == pytest.approx([v for _, v in want], abs=TOL), tag
    assert [s for s, _ in rh.scalars(out / "tensorboard", "eval/accuracy")] == [0, 6]
    # dynamic sampling: every trained group had reward spread; its counters survived the stops
    a, b = (json.loads((d / "checkpoint-4" / "trainer_state.json").read_text()) for d in (ref, out))
    assert a["sampling"] == b["sampling"] and a["data"] == b["data"]
    history = a["history"]
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert all(h["reward/frac_zero_std"] == 0.0 and h["dynamic/short_batch"] == 0.0 for h in history), history
    assert sum(h["dynamic/dropped_groups"] for h in history) == a["sampling"]["dropped_groups"] > 0
    assert all(-1.0 <= h["reward/soft_overlong_punishment_reward"] <= 0.0 for h in history)
