"""Rollouts through vLLM (``grpo_scale.engines``, ``grpo_scale.vllm_serve``).

Without vLLM: the weight stream's format, the policy's weights in checkpoint names (plain, tied, LoRA merged
without touching the base weights, gathered one module at a time), the settings' checks, a server that
does not answer.

With real vLLM (the CPU build here; the README's vLLM section installs it), each in processes of its own
(an in-process engine takes over torch.distributed's default group):

- ``vllm_probe.py`` on the embedded model, colocated and against a server: greedy decoding gives our
  sampler's tokens on the same weights; a 2-step run syncs the weights, after which vLLM's log-probs of
  fixed completions equal the policy's and differ from the ones before;
- the same colocated probe on SmolLM2-135M-Instruct (the real model);
- 2 ranks through ``train.py``: ZeRO-2 colocated (an engine per rank), ZeRO-3 with ``beta > 0`` against
  the server (the weight sync gathers one module at a time on both ranks); the server probe trains LoRA.

Without vLLM these skip, unless ``GRPO_SCALE_REQUIRE_VLLM=1`` (set by ``.ci/run``), which makes them fail.
SmolLM2 against a server and on 2 ranks run with ``-m slow``.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from grpo_scale import engines
from grpo_scale.config import ConfigError, GRPOConfig

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from reliability_helpers import env, run, tiny_model_path  # noqa: E402

HAS_VLLM = importlib.util.find_spec("vllm") is not None
SMOLLM2 = "embedded:smollm2-135m-instruct"
# vLLM's and the policy's log-probs of the same tokens after a sync, float32 on a CPU: measured 7.5e-7 on the
# embedded model, 2.9e-5 on SmolLM2 (a 49,152-way softmax, other kernels); a missed sync leaves them apart by
# what the training step moved (0.1 to 0.2 here), a stale tied head by more than 1
TOL = {"tiny": 1e-5, "smollm2": 5e-4}


@pytest.fixture(scope="module")
def vllm_installed():
    if not HAS_VLLM:
        if os.environ.get("GRPO_SCALE_REQUIRE_VLLM") == "1":
            pytest.fail("GRPO_SCALE_REQUIRE_VLLM=1 but vLLM does not import (see the README's vLLM section)")
        pytest.skip("vLLM is not installed (see the README's vLLM section)")


def _smollm2_or_skip():
    from grpo_scale.models import ModelSourceError, gguf_source
    try:
        gguf_source(SMOLLM2)
    except ModelSourceError as e:
        if os.environ.get("GRPO_SCALE_REQUIRE_REAL_MODEL") == "1":
            pytest.fail(f"GRPO_SCALE_REQUIRE_REAL_MODEL=1 but the real model is missing: {e}")
        pytest.skip(f"the real model is not installed: {e}")


# ============================================================================ without vLLM
def test_weight_stream_round_trips_every_dtype_and_shape():
    g = torch.Generator().manual_seed(0)
    items = [("a.weight", torch.randn(7, 3, generator=g)), ("b", torch.randn(5, generator=g).to(torch.bfloat16)),
             ("c", torch.randn(2, 3, 4, generator=g).half()), ("scalar", torch.tensor(3.5, dtype=torch.float64)),
             ("empty", torch.zeros(0, 4)), ("ids", torch.randint(0, 9, (6,), generator=g)),
             ("view", torch.randn(4, 6, generator=g)[:, ::2])]  # not contiguous
    stream = b"".join(engines.write_tensors(items))
    at = [0]

    def read(n):
        out = stream[at[0]:at[0] + n]
        if len(out) < n:
            raise ValueError("short")
        at[0] += n
        return out
    back = list(engines.read_tensors(read))
    assert [n for n, _ in back] == [n for n, _ in items]
    for (_, a), (_, b) in zip(items, back):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    assert at[0] == len(stream)


def test_a_malformed_weight_stream_is_refused():
    good = b"".join(engines.write_tensors([("w", torch.ones(4))]))

    def reader(data):
        at = [0]

        def read(n):
            if at[0] + n > len(data):
                raise ValueError("request body ended early")
            at[0] += n
            return data[at[0] - n:at[0]]
        return read
    with pytest.raises(ValueError, match="ended early"):
        list(engines.read_tensors(reader(good[:-8])))
    header = json.dumps({"name": "w", "dtype": "no_such_type", "shape": [1]}).encode()
    with pytest.raises(ValueError, match="unknown dtype"):
        list(engines.read_tensors(reader(len(header).to_bytes(4, "little") + header)))
    with pytest.raises(ValueError, match="not a weight stream"):
        list(engines.read_tensors(reader((1 << 30).to_bytes(4, "little"))))


class RecordingGather:
    """A ``gather`` for policy_weights that records what each call makes whole, and checks that every
    tensor yielded was inside a gather."""

    def __init__(self):
        self.calls, self.open = [], set()

    @contextlib.contextmanager
    def __call__(self, params):
        self.calls.append(sum(p.numel() for p in params))
        ids = {id(p) for p in params}
        self.open |= ids
        try:
            yield
        finally:
            self.open -= ids


def _tiny():
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(tiny_model_path(), dtype=torch.float32)


def test_policy_weights_are_the_checkpoint_gathered_one_module_at_a_time():
    model = _tiny()
    gather = RecordingGather()
    seen = {}
    params = {id(p) for p in model.parameters()}
    for name, t in engines.policy_weights(model, gather):
        assert gather.open & params, f"{name} yielded outside a gather"
        seen[name] = t.clone()
    state = model.state_dict()
    assert set(seen) == set(state)  # the tied head too (lm_head.weight), under its own name
    for k, v in state.items():
        assert torch.equal(seen[k], v), k
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    assert max(gather.calls) == largest < total / 4  # never the whole model at once


def test_lora_weights_are_merged_apart_and_the_base_is_untouched():
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(_tiny(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                               lora_dropout=0.0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:  # B starts at 0: make the update real
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    gather = RecordingGather()
    got = {n: t.clone() for n, t in engines.policy_weights(model, gather)}
    after = dict(model.named_parameters())
    for n, p in before.items():  # no merge / unmerge rounding left in the trained model
        assert torch.equal(p, after[n]), n
    merged = copy.deepcopy(model).merge_and_unload().state_dict()
    assert set(got) == set(merged)
    for k, v in merged.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6, msg=k)
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"],
                           _tiny().state_dict()["model.layers.0.self_attn.q_proj.weight"])
    total = sum(p.numel() for p in model.parameters())
    assert max(gather.calls) < total / 4


def test_vllm_settings_are_checked():
    GRPOConfig(use_vllm=True, vllm_mode="server", vllm_server_port=8123, vllm_tensor_parallel_size=2)
    for kwargs, match in (({"vllm_mode": "remote"}, "vllm_mode must be colocate or server"),
                          ({"vllm_gpu_memory_utilization": 1.5}, "vllm_gpu_memory_utilization must be in"),
                          ({"vllm_tensor_parallel_size": 0}, "vllm_tensor_parallel_size must be >= 1"),
                          ({"vllm_max_model_length": 64, "max_completion_length": 64}, "leaves no room"),
                          ({"vllm_mode": "server", "vllm_enable_sleep_mode": True}, "colocate only"),
                          ({"vllm_server_port": 0}, "vllm_server_port must be a port")):
        with pytest.raises(ConfigError, match=match):
            GRPOConfig(use_vllm=True, **kwargs)


def test_a_server_that_does_not_answer_says_how_to_start_one():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(engines.EngineError, match=r"did not answer within vllm_server_timeout=1s.*"
                                                  r"python -m grpo_scale\.vllm_serve"):
        from transformers import AutoTokenizer
        engines.VLLMServerEngine(f"http://127.0.0.1:{port}", AutoTokenizer.from_pretrained(tiny_model_path()),
                                 _tiny(), "cpu", engines.zero3_gather(False), timeout=1)
    assert time.monotonic() - t0 < 10


# ============================================================================ with real vLLM
def probe(tmp_path: Path, name: str, args: list[str], timeout: float = 600) -> dict:
    out = tmp_path / f"{name}.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "vllm_probe.py"), str(out), "--use_vllm", "true",
                           "--output_dir", str(tmp_path / name), "--report_to", "none", "--max_steps", "2",
                           "--eval_size", "4", "--eval_strategy", "no", "--logging_steps", "1", *args],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


def check_probe(r: dict, tol: float) -> None:
    assert all(r["greedy_same_rows"]), (r["greedy_vllm"], r["greedy_local"])
    assert r["before"]["max"] < tol, r["before"]
    assert r["after"]["max"] < tol, r["after"]  # synced: vLLM scores as the trained policy does
    assert r["vllm_moved"]["max"] > 20 * tol, r["vllm_moved"]  # ... which differs from the start
    assert r["stale_after_training"] and r["syncs_in_training"] >= 2 and r["steps"] == 2
    last = r["history"][-1]
    assert last["time/weight_sync_s"] > 0 and "sampling/logp_gap_mean" in last


@pytest.fixture(scope="module")
def tiny_server(vllm_installed, tmp_path_factory):
    """One vLLM server on the embedded model for the module's server-mode tests."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("server") / "server.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "grpo_scale.vllm_serve", "--model", "embedded:tiny-math",
                                 "--port", str(port), "--max_num_seqs", "64", "--max_model_len", "320"],
                                cwd=ROOT, env=env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_colocated_vllm_on_the_embedded_model(vllm_installed, tmp_path):
    # vLLM's own log-probs feed the importance-sampling correction and the off-policy mask
    r = probe(tmp_path, "colocate", ["--max_completion_length", "32", "--per_device_train_batch_size", "16",
                                     "--importance_sampling_correction", "true", "--off_policy_mask_threshold", "0.5"])
    check_probe(r, TOL["tiny"])
    last = r["history"][-1]
    assert 0.5 < last["importance_sampling_ratio_mean"] < 2 and "off_policy_masked" in last
    assert 0 < last["sampling/logp_gap_max"] < 0.5  # vLLM's kernels round differently from the training forward


def test_a_vllm_server_on_the_embedded_model(tiny_server, tmp_path):
    # with LoRA: the server gets merged weights (and the policy's forward has its adapters on)
    r = probe(tmp_path, "server", ["--vllm_mode", "server", "--vllm_server_port", str(tiny_server),
                                   "--max_completion_length", "32", "--per_device_train_batch_size", "16",
                                   "--use_peft", "true", "--lora_r", "8", "--learning_rate", "1e-3"])
    assert r["engine"] == "vllm-server"
    check_probe(r, TOL["tiny"])


def _two_ranks(tmp_path, name, extra, model_args=(), launch="zero2"):
    out = tmp_path / name
    proc = run(["--use_vllm", "true", "--max_steps", "2", "--output_dir", str(out), "--eval_size", "2",
                "--eval_batch_size", "2", "--max_completion_length", "16", "--per_device_train_batch_size", "8",
                "--logging_steps", "1", *model_args, *extra], ranks=2, timeout=600, launch=launch)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["num_processes"] == 2 and summary["skipped_steps"] == 0
    return proc


def test_two_ranks_colocated_and_against_the_server(tiny_server, tmp_path):
    proc = _two_ranks(tmp_path, "colocate2", [])
    assert (proc.stdout + proc.stderr).count("Initializing a V1 LLM engine") == 2  # one engine per rank
    # ZeRO-3 with a reference model: the sync gathers one module at a time on both ranks, rank 0 sends
    _two_ranks(tmp_path, "server2", ["--vllm_mode", "server", "--vllm_server_port", str(tiny_server),
                                     "--beta", "0.04"], launch="zero3")


@pytest.mark.slow  # 80 s: the suite's vLLM tests run the embedded model; this one and the next use SmolLM2
def test_colocated_vllm_on_smollm2(vllm_installed, tmp_path):
    _smollm2_or_skip()
    r = probe(tmp_path, "smollm2", ["--config", "configs/smollm2-135m-math.yaml", "--max_completion_length", "24",
                                    "--max_prompt_length", "160", "--per_device_train_batch_size", "8",
                                    "--num_generations", "4"], timeout=900)
    check_probe(r, TOL["smollm2"])


@pytest.mark.slow
def test_smollm2_against_a_server_and_on_two_ranks(vllm_installed, tmp_path):
    _smollm2_or_skip()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(tmp_path / "server.log", "w") as f:
        server = subprocess.Popen([sys.executable, "-m", "grpo_scale.vllm_serve", "--model", SMOLLM2, "--port",
                                   str(port), "--max_num_seqs", "16", "--max_model_len", "192"], cwd=ROOT, env=env(),
                                  stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        model = ["--config", "configs/smollm2-135m-math.yaml", "--max_prompt_length", "160", "--num_generations", "4"]
        r = probe(tmp_path, "smollm2-server", [*model, "--vllm_mode", "server", "--vllm_server_port", str(port),
                                               "--max_completion_length", "24", "--per_device_train_batch_size", "8"],
                  timeout=900)
        check_probe(r, TOL["smollm2"])
        _two_ranks(tmp_path, "smollm2-colocate2", [], model)
        _two_ranks(tmp_path, "smollm2-server2", ["--vllm_mode", "server", "--vllm_server_port", str(port)], model)
    finally:
        server.terminate()
        server.wait(timeout=30)
