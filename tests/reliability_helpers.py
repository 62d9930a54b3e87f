"""Shared pieces of the reliability tests: the test model, `train.py` launches, user reward functions
(imported by the trainer as ``reliability_helpers:NAME``), and readers for checkpoints and TensorBoard.

The test model is the committed embedded model when it exists, else a throwaway tiny model built once
per machine (``python -m grpo_scale.tiny --steps 30``, about 15 s); ``GRPO_SCALE_TEST_MODEL`` overrides
both.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

from grpo_scale.rewards import completion_text

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent

# Small and hot: a few fast steps whose rewards differ inside groups, so the weights move.
FAST = ["--eval_size", "2", "--eval_batch_size", "2", "--max_completion_length", "12",
        "--per_device_train_batch_size", "8", "--num_generations", "4", "--learning_rate", "1e-3",
        "--temperature", "2.0", "--logging_steps", "1", "--cpu_threads", "1", "--seed", "7",
        "--reward_funcs", "reliability_helpers:text_hash_reward,format"]


# ---------------------------------------------------------------------------- the test model
def tiny_model_path() -> str:
    """A local model folder for tests (see the module docstring)."""
    if os.environ.get("GRPO_SCALE_TEST_MODEL"):
        return os.environ["GRPO_SCALE_TEST_MODEL"]
    asset = ROOT / "grpo_scale" / "assets" / "tiny-math"
    if (asset / "config.json").is_file() and any(asset.glob("*.safetensors")):
        return str(asset)
    target = Path(tempfile.gettempdir()) / "grpo-scale-test-tiny"
    if not (target / "model.safetensors").is_file():
        part = target.with_name(f"{target.name}.{os.getpid()}.part")
        subprocess.run([sys.executable, "-m", "grpo_scale.tiny", "--output_dir", str(part), "--steps", "30",
                        "--eval_size", "0", "--threads", "1"], cwd=ROOT, check=True, capture_output=True)
        try:
            os.replace(part, target)  # atomic: parallel test runs never see a half-built model
        except OSError:  # another run got there first
            shutil.rmtree(part, ignore_errors=True)
    return str(target)


# ---------------------------------------------------------------------------- launching train.py
def env(**extra) -> dict:
    """The environment of a launched run: one OpenMP thread, the tests folder importable (reward modules)."""
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **{k: str(v) for k, v in extra.items()}}


def command(args: list[str], ranks: int = 1, script: Path = ROOT / "train.py", launch: str = "zero2") -> list[str]:
    """``python train.py ARGS``, or its launch on ``ranks`` processes with accelerate_configs/LAUNCH.yaml."""
    if ranks == 1:
        return [sys.executable, str(script), *args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "accelerate_configs" / f"{launch}.yaml"), "--num_processes", str(ranks), str(script), *args]


def run(args: list[str], ranks: int = 1, timeout: float = 300, script: Path = ROOT / "train.py",
        launch: str = "zero2", **env_extra) -> subprocess.CompletedProcess:
    """Run ``script ARGS`` (train.py by default) to completion; stdout and stderr captured."""
    return subprocess.run(command(args, ranks, script, launch), cwd=ROOT, env=env(**env_extra), capture_output=True,
                          text=True, timeout=timeout)


def run_nodes(per_node: list[list[str]], timeout: float = 300,
              script: Path = ROOT / "train.py") -> list[subprocess.CompletedProcess]:
    """Launch ``script`` (train.py) as node 0 and node 1 of accelerate_configs/multinode.yaml on this machine
    (one process each, the main node at 127.0.0.1), each with its own arguments; wait for both."""
    with socket.socket() as s:  # a free port for the main node
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank, args in enumerate(per_node):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "accelerate_configs" / "multinode.yaml"), "--machine_rank", str(rank), "--num_machines", "2", "--num_processes", "2", "--main_process_ip", "127.0.0.1",
               "--main_process_port", str(port), str(script), *args]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, start_new_session=True))
    done = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def run_until_blocked(args: list[str], marker: Path, ranks: int = 1, timeout: float = 300) -> str:
    """Start a run whose text_hash_reward blocks at its 6th call (step 6), wait until every rank is blocked,
    then SIGKILL the whole process group (launcher and ranks). Returns the run's output."""
    log = marker.with_suffix(".log")
    with open(log, "w") as out:
        proc = subprocess.Popen(command(args, ranks), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env=env(REL_BLOCK_AT_CALL=6, REL_BLOCK_MARKER=marker), start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while len(list(marker.parent.glob(marker.name + ".rank*"))) < ranks:
                if proc.poll() is not None:
                    raise AssertionError(f"the run ended (rc {proc.returncode}) before blocking:\n"
                                         + log.read_text()[-4000:])
                if time.monotonic() > deadline:
                    raise AssertionError("the run did not reach step 6 in time:\n" + log.read_text()[-4000:])
                time.sleep(0.1)
        finally:
            # the launcher starts each rank in a session of its own: kill the ranks by their process ids
            for f in marker.parent.glob(marker.name + ".rank*"):
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(f.read_text()), signal.SIGKILL)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return log.read_text()


# ---------------------------------------------------------------------------- user reward functions
_calls = 0


def text_hash_reward(prompts, completions, **columns):
    """A score in [0, 1) hashed from the completion's text: a function of the text alone, yet different
    for (almost) any two different samples of a group, so advantages stay non-zero whatever the model
    learns (a reward the policy could satisfy would make every group alike after a few steps).

    With REL_BLOCK_AT_CALL=N set, the N-th call writes REL_BLOCK_MARKER.rankR and blocks (to be killed).
    """
    global _calls
    _calls += 1
    if os.environ.get("REL_BLOCK_AT_CALL") and _calls == int(os.environ["REL_BLOCK_AT_CALL"]):
        Path(f"{os.environ['REL_BLOCK_MARKER']}.rank{os.environ.get('RANK', '0')}").write_text(str(os.getpid()))
        time.sleep(3600)
    return [_text_hash(c) for c in completions]


def _text_hash(completion) -> float:
    """Of the completion's text, in either format (a string, or a conversational message list)."""
    return zlib.crc32(completion_text(completion).encode()) % 1000 / 1000


def raises_on_some(completion) -> bool:
    """The items flaky_reward fails on: about 3 in 7, decided by the text alone."""
    return zlib.crc32(completion_text(completion).encode()) % 7 < 3


def flaky_reward(prompts, completions, **columns):
    """text_hash_reward, but raises on the items raises_on_some picks (so on any batch holding one)."""
    for c in completions:
        if raises_on_some(c):
            raise RuntimeError("flaky reward cannot score this item")
    return [_text_hash(c) for c in completions]


def flat_group(prompt) -> bool:
    """The prompts half_flat_reward scores alike (zero spread): about half, decided by the question."""
    text = prompt if isinstance(prompt, str) else [m["content"] for m in prompt if m["role"] == "user"][-1]
    return zlib.crc32(text.encode()) % 2 == 0


def half_flat_reward(prompts, completions, **columns):
    """text_hash_reward for half of the prompts, 0.5 for every completion of the other half (flat_group):
    a batch in which about half of the groups have zero reward spread."""
    return [0.5 if flat_group(p) else _text_hash(c) for p, c in zip(prompts, completions)]


def constant_reward(prompts, completions, **columns):
    """1.0 for everything: every group has zero spread."""
    return [1.0] * len(completions)


def hanging_reward(prompts, completions, **columns):
    """Never returns (an hour): a remote judge that does not answer."""
    time.sleep(3600)


def napping_reward(prompts, completions, nap, log_metric, log_extra, **columns):
    """The completion's length, after sleeping ``nap[0]`` seconds; logs a metric and an extra column, as
    TRL rewards may."""
    time.sleep(nap[0])
    log_metric("mean_chars", sum(len(completion_text(c)) for c in completions) / len(completions))
    log_extra("chars", [len(completion_text(c)) for c in completions])
    return [float(len(completion_text(c))) for c in completions]


# ---------------------------------------------------------------------------- reading outputs
def max_weight_diff(dir_a: Path, dir_b: Path) -> float:
    """max |w_a - w_b| over the tensors of two model.safetensors files."""
    from safetensors.torch import load_file
    a, b = load_file(str(dir_a / "model.safetensors")), load_file(str(dir_b / "model.safetensors"))
    common = a.keys() & b.keys()  # a tied lm_head may be stored in one file and not the other
    assert len(common) >= len(a) - 1 and common
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in common)


def adapter_weight_diff(a: Path, b: Path) -> float:
    """max |dw| over the adapters (adapter/) of two LoRA runs."""
    from safetensors.torch import load_file
    x, y = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (a, b))
    assert x.keys() == y.keys() and any("lora_B" in k for k in x)
    return max(float((x[k].double() - y[k].double()).abs().max()) for k in x)


def scalars(logdir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of one TensorBoard tag as TensorBoard shows it (purged events dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def raw_steps(logdir: Path, tag: str) -> list[int]:
    """Every step written for ``tag`` in every event file of ``logdir``, purged or not."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    steps = []
    for f in sorted(logdir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(f)).Load():
            for v in event.summary.value:
                if v.tag == tag:
                    steps.append(event.step)
    return steps


def is_nan(x: float) -> bool:
    return isinstance(x, float) and math.isnan(x)


class InfGrad(torch.autograd.Function):
    """Identity forward, infinite gradient backward: a finite loss whose gradient norm is not finite."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


def conversational_only_reward(prompts, completions, **columns):
    """A TRL reward written for conversational data: c[0]["content"]. Raises on string completions."""
    return [float(len(c[0]["content"])) for c in completions]
