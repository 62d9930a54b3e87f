"""Decoding steps computed from the weights (grpo_scale/decoding.py) against the model's own forward: the
same logits in float64 for every architecture it accepts (Llama with grouped-query heads and biases,
Qwen2, Mistral), the same tokens and log-probs through generate, its refusals, and the trainer's check
turning it off where it would differ."""
import logging
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import grpo_scale
from grpo_scale import attention, decoding
from grpo_scale.config import load_config
from grpo_scale.rollout import generate
from grpo_scale.tasks import ProblemStream
from grpo_scale.tasks.prompts import render_prompt

EMBEDDED_DIR = Path(grpo_scale.__file__).parent / "assets" / "tiny-math"


def small_model(kind: str, **extra):
    cfg = AutoConfig.for_model(kind, vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=6, num_key_value_heads=2, pad_token_id=0, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").double().eval()
    for p in model.parameters():  # biases away from zero, norms away from one: every weight matters
        torch.nn.init.normal_(p, std=0.3 if p.dim() == 1 else 0.15)
    assert attention.enable(model)
    return model


@pytest.mark.parametrize("kind, extra", [
    ("llama", dict(attention_bias=True, mlp_bias=True)),   # SmolLM2's architecture, every bias on
    ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    ("qwen2", {}),                                          # biased q, k, v projections
    ("mistral", dict(sliding_window=None)),
])
def test_the_step_gives_the_forwards_logits_in_float64(kind, extra):
    model = small_model(kind, **extra)
    assert decoding.supported(model) is None
    assert decoding.decoding_problem(model, 97, tol=1e-12) is None


@pytest.mark.parametrize("fuse_max, elementwise_max", [(0, 0), (1 << 30, 1 << 30)])
def test_separate_and_fused_products_alike(monkeypatch, fuse_max, elementwise_max):
    """q/k/v and gate/up fused or separate; a row's own attention by products and sums or batched products."""
    monkeypatch.setattr(decoding, "FUSE_MAX_BYTES", fuse_max)
    monkeypatch.setattr(decoding, "ELEMENTWISE_MAX", elementwise_max)
    model = small_model("qwen2")
    assert decoding.decoding_problem(model, 97, tol=1e-12) is None


def test_the_orientation_follows_each_linear_not_the_fused_product(monkeypatch):
    """rollout.few_row_linears' rule (x W^T computed as (W x^T)^T for large weights) decided on the model's
    own linears: a fused product of small ones keeps the plain orientation (on the embedded model, gate and
    up fused are exactly 2^17 weights, where the plain orientation is the faster)."""
    from grpo_scale import rollout
    model = small_model("llama")
    gate = model.model.layers[0].mlp.gate_proj.weight.numel()
    ids = torch.randint(1, 97, (2, 4))
    cache = rollout.prefill(model, ids, torch.ones_like(ids), None, rollout.cache_argument(model))
    prefix = attention.PrefixKV(cache, torch.ones_like(ids), torch.tensor([1, 1]))
    for threshold, expected in ((1, True), (gate + 1, False)):
        monkeypatch.setattr(rollout, "FEW_ROWS_MIN_WEIGHT", threshold)
        step = decoding.DecodeStep(model, prefix, rows=2, room=2)
        assert step.fused
        (weight, _, few_rows), = step.layers[0]["gate_up"]
        assert weight.numel() >= gate + 1 and few_rows is expected


def test_a_wrong_step_is_found(monkeypatch):
    model = small_model("llama")
    right = decoding.DecodeStep._rms
    monkeypatch.setattr(decoding.DecodeStep, "_rms", staticmethod(lambda x, we: right(x, (we[0], we[1] + 1e-2))))
    assert "differ" in decoding.decoding_problem(model, 97)


def test_what_it_refuses():
    model = small_model("llama")
    attention.disable(model)
    assert "does not use grpo_sdpa" in decoding.supported(model)
    attention.enable(model)

    class Quantized(torch.nn.Linear):
        pass

    q = model.model.layers[1].self_attn.q_proj
    model.model.layers[1].self_attn.q_proj = Quantized(q.in_features, q.out_features)
    assert "not plain nn.Linear" in decoding.supported(model)
    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2))
    assert "is not one of" in decoding.supported(gpt2)
    decoding.enable(gpt2)
    assert not decoding.enabled(gpt2)  # the flag alone does not make a model decodable


@pytest.fixture(scope="module")
def embedded():
    tok = AutoTokenizer.from_pretrained(EMBEDDED_DIR)
    model = AutoModelForCausalLM.from_pretrained(EMBEDDED_DIR, attn_implementation="sdpa").double().eval()
    rows = ProblemStream({"arithmetic": 1.0}, [1, 2, 3], seed=5).take(4)
    return model, tok, rows


@pytest.mark.parametrize("do_sample", [False, True])
@pytest.mark.parametrize("groups", [(3, 4, 1, 4), (4, 4, 4, 4)])
def test_generate_draws_the_same_tokens_with_it(embedded, do_sample, groups):
    """The embedded model in float64, rows finishing at different steps: the same completions and log-probs
    with the step computed from the weights as through the forward. Groups of 3, 4, 1 and 4 leave slots of
    the attention's layout empty from the start; groups of 4 fill it until the first row finishes; as rows
    finish, the layout is rebuilt on fewer slots."""
    model, tok, rows = embedded
    prompts = [render_prompt(tok, r["prompt"]) for r, n in zip(rows, groups) for _ in range(n)]
    kw = dict(max_prompt_length=None, max_new_tokens=24, do_sample=do_sample, temperature=1.5, top_k=20,
              with_logps=True)
    assert attention.enable(model)
    try:
        torch.manual_seed(3)
        plain = generate(model, tok, prompts, **kw)
        decoding.enable(model)
        assert decoding.enabled(model)
        calls = []  # at each step: whether every slot held a live row, and the number of slots
        right = decoding.DecodeStep.step
        decoding.DecodeStep.step = lambda self, *a: calls.append((self.full, self.groups * self.width)) or \
            right(self, *a)
        try:
            torch.manual_seed(3)
            ours = generate(model, tok, prompts, **kw)
        finally:
            decoding.DecodeStep.step = right
    finally:
        decoding.disable(model)
        attention.disable(model)
    assert calls, "the step from the weights did not run"
    full, slots = zip(*calls)
    assert full[0] == (len(set(groups)) == 1)
    assert min(slots) < slots[0], "the layout was never rebuilt on fewer slots"
    lengths = plain.attention_mask.sum(1)
    assert lengths.min() < lengths.max(), "want rows that finish at different steps"
    assert torch.equal(ours.completion_ids, plain.completion_ids)
    assert torch.allclose(ours.sampling_logps, plain.sampling_logps, atol=1e-10, rtol=0)


def _trainer(tmp_path, *extra):
    from grpo_scale.trainer import GRPOTrainer
    cfg = load_config(["--output_dir", str(tmp_path), "--report_to", "none", "--max_steps", "1", "--eval_size", "4",
                       "--per_device_train_batch_size", "8", "--max_completion_length", "8", *extra])
    return GRPOTrainer(cfg)


def test_the_trainer_uses_it_and_turns_it_off_where_it_differs(monkeypatch, tmp_path, caplog):
    trainer = _trainer(tmp_path / "on")
    trainer.setup()
    assert trainer.decode_step and decoding.enabled(trainer.acc.unwrap_model(trainer.model))
    right = decoding.DecodeStep._rms
    monkeypatch.setattr(decoding.DecodeStep, "_rms", staticmethod(lambda x, we: 2 * right(x, we)))
    trainer = _trainer(tmp_path / "off")
    with caplog.at_level(logging.WARNING, logger="grpo_scale"):
        trainer.setup()
    assert not trainer.decode_step and trainer.structured_attention
    assert not decoding.enabled(trainer.acc.unwrap_model(trainer.model))
    assert any("decoding steps: computed by the model's forward" in r.getMessage() for r in caplog.records)
    trainer.grpo_step(trainer.generate_and_score())  # and it trains


def test_a_lora_policy_decodes_through_its_forward(tmp_path, caplog):
    trainer = _trainer(tmp_path, "--use_peft", "true")
    with caplog.at_level(logging.WARNING, logger="grpo_scale"):
        trainer.setup()
    assert trainer.structured_attention and not trainer.decode_step
    assert not any("decoding steps" in r.getMessage() for r in caplog.records)  # not a failure: not its kind


def test_the_start_up_batch_rebuilds_the_layout(monkeypatch):
    """The made-up batch of the start-up check drops rows so that DecodeStep rebuilds its slot layout, with
    rows of a group missing before and after: the check covers every path of its attention."""
    model = small_model("llama")
    seen = []
    right = decoding.DecodeStep.select
    monkeypatch.setattr(decoding.DecodeStep, "select",
                        lambda self, live: (right(self, live), seen.append((self.groups * self.width, self.full))))
    assert decoding.decoding_problem(model, 97, tol=1e-12) is None
    assert seen == [(4, False)]
