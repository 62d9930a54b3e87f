"""Kill and resume, end to end: an 8-step run is SIGKILLed during step 6 (after its step-4 checkpoint and
its step-5 TensorBoard point), resumed with `--resume_from_checkpoint latest`, and compared with an
uninterrupted run: final weights equal (max |dw| <= 1e-6), TensorBoard curves equal with each step once,
held-out evaluation before training not repeated. Single process and 2 ranks under DeepSpeed ZeRO-2, full
fine-tuning and LoRA (whose checkpoints hold the adapter and its optimiser state, not the frozen base).
These run with `-m slow`: the default suite kills and resumes 2 ranks at the end of tests/test_preemption.py's
chain of stops (full fine-tuning, with the same weight and TensorBoard checks), resumes a one-process LoRA
trainer three times there, and tests/test_checkpoint.py resumes one-process trainers in-process."""
import json
from pathlib import Path

import pytest

import reliability_helpers as rh

TOL = 1e-6


LORA = ["--use_peft", "true", "--beta", "0.04", "--learning_rate", "1e-3", "--lora_dropout", "0.1"]


def kill_and_resume(tmp_path: Path, ranks: int, extra=()) -> dict:
    args = ["--model_name_or_path", rh.tiny_model_path(), *rh.FAST, "--max_steps", "8", "--save_steps", "4",
            *extra]
    if ranks == 2:  # the same global batch, split over two ranks
        args += ["--per_device_train_batch_size", "4"]
    ref, run = tmp_path / "uninterrupted", tmp_path / "resumed"
    proc = rh.run(args + ["--output_dir", str(ref)], ranks=ranks)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    run.mkdir()
    killed_log = rh.run_until_blocked(args + ["--output_dir", str(run)], run / "blocked", ranks=ranks)
    assert [p.name for p in run.glob("checkpoint-*")] == ["checkpoint-4"], killed_log[-3000:]
    proc = rh.run(args + ["--output_dir", str(run), "--resume_from_checkpoint", "latest"], ranks=ranks)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = proc.stdout + proc.stderr
    assert "resumed from" in out and "checkpoint-4 at step 4" in out
    assert "eval before training (stored in the checkpoint)" in out
    return {"ref": ref, "run": run, "dw": rh.max_weight_diff(ref / "final", run / "final")}


def check_tensorboard(ref: Path, run: Path) -> None:
    # the killed run had logged step 5 before dying: written twice, shown once
    assert rh.raw_steps(run / "tensorboard", "train/loss").count(5) == 2
    for tag in ("train/loss", "train/reward/mean", "train/grad_norm", "train/lr"):
        got, want = rh.scalars(run / "tensorboard", tag), rh.scalars(ref / "tensorboard", tag)
        assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, 9)), (tag, got)
        assert [v for _, v in got] == pytest.approx([v for _, v in want], abs=TOL), tag
    # evaluated before training once (step 0, not again at the resumed step 4) and after
    assert [s for s, _ in rh.scalars(run / "tensorboard", "eval/accuracy")] == [0, 8]


def check_summaries(ref: Path, run: Path) -> None:
    a, b = (json.loads((d / "summary.json").read_text()) for d in (ref, run))
    assert a["steps"] == b["steps"] == 8 and b["resumed_from"].endswith("checkpoint-4")
    assert a["eval_before"] == b["eval_before"] and a["final_reward_mean"] == pytest.approx(b["final_reward_mean"])


@pytest.mark.slow
def test_kill_and_resume_single_process(tmp_path):
    r = kill_and_resume(tmp_path, ranks=1)
    print(f"single process: max |dw| = {r['dw']:.3g}")
    assert r["dw"] <= TOL
    # the steps after the checkpoint moved the weights, so the comparison is not vacuous
    assert rh.max_weight_diff(r["run"] / "checkpoint-4", r["run"] / "final") > 1e-4
    check_tensorboard(r["ref"], r["run"])
    check_summaries(r["ref"], r["run"])


@pytest.mark.slow  # the default suite kills and resumes 2 ranks in tests/test_preemption.py's chain
def test_kill_and_resume_two_ranks_zero2(tmp_path):
    r = kill_and_resume(tmp_path, ranks=2)
    print(f"2-rank ZeRO-2: max |dw| = {r['dw']:.3g}")
    assert r["dw"] <= TOL
    assert rh.max_weight_diff(r["run"] / "final", Path(rh.tiny_model_path())) > 1e-4
    assert (r["run"] / "checkpoint-4" / "random_states_1.pkl").is_file()  # rank 1's RNG, its own file
    state = json.loads((r["run"] / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["zero_stage"] == 2
    check_tensorboard(r["ref"], r["run"])
    check_summaries(r["ref"], r["run"])


@pytest.mark.slow  # 2 ranks, LoRA: also tests/test_preemption.py's chain of stops and resumes
@pytest.mark.parametrize("ranks", [1, 2])
def test_kill_and_resume_lora(tmp_path, ranks):
    """LoRA with the reference as adapters-off: the resumed run's adapter and merged final/ equal the
    uninterrupted run's, and the checkpoint holds the trainable state only."""
    r = kill_and_resume(tmp_path, ranks=ranks, extra=LORA)
    da = rh.adapter_weight_diff(r["ref"], r["run"])
    print(f"LoRA, {ranks} rank(s): max |dw| adapter {da:.3g}, merged final/ {r['dw']:.3g}")
    assert da <= TOL and r["dw"] <= TOL
    assert rh.max_weight_diff(r["run"] / "final", Path(rh.tiny_model_path())) > 1e-4
    ckpt = r["run"] / "checkpoint-4"
    held = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file() and "model" in f.name)
    base = (Path(rh.tiny_model_path()) / "model.safetensors").stat().st_size
    assert held < base / 10, f"checkpoint model state {held} bytes: it holds the frozen base ({base} bytes)"
    check_tensorboard(r["ref"], r["run"])
    check_summaries(r["ref"], r["run"])


@pytest.mark.slow
def test_soak_killed_five_times_at_random_moments(tmp_path):
    """200 steps with save_steps 5, SIGKILLed five times (each time a random 0-2 s after the run passed a
    new checkpoint: in a step, a save or the evaluation) and resumed each time: the final weights equal the
    uninterrupted run's."""
    import os
    import random
    import signal
    import subprocess
    import time

    from grpo_scale import checkpoint as ckpt
    args = ["--model_name_or_path", rh.tiny_model_path(), *rh.FAST, "--max_steps", "200", "--save_steps", "5",
            "--report_to", "none", "--disable_tqdm", "true"]
    ref, run = tmp_path / "uninterrupted", tmp_path / "killed"
    proc = rh.run(args + ["--output_dir", str(ref)], timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rng, kills = random.Random(20261201), []
    for _ in range(5):
        before = [p.name for p in ckpt.list_checkpoints(run)]
        p = subprocess.Popen(rh.command(args + ["--output_dir", str(run), "--resume_from_checkpoint", "latest"]),
                             cwd=rh.ROOT, env=rh.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
        deadline = time.monotonic() + 300
        while [q.name for q in ckpt.list_checkpoints(run)] == before:
            assert p.poll() is None and time.monotonic() < deadline, "the run ended or stalled before a new checkpoint"
            time.sleep(0.05)
        time.sleep(rng.uniform(0, 2))
        assert p.poll() is None, "the run finished before it could be killed"
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        kills.append(ckpt.list_checkpoints(run)[-1].name)
    proc = rh.run(args + ["--output_dir", str(run), "--resume_from_checkpoint", "latest"], timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    dw = rh.max_weight_diff(ref / "final", run / "final")
    print(f"soak: killed after {kills}, resumed each time: max |dw| = {dw:.3g}")
    assert dw <= TOL
