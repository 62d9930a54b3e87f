"""The last decoder layer at the used positions only (grpo_scale/last_layer.py) against the full layer: the
same outputs where the packed forward reads them and the same gradient of every weight, in float64, for
each architecture it accepts (grouped-query heads, biases, several prompt lengths, completions of one
token and of many, several packed rows); with LoRA adapters, gradient checkpointing and dropout; its
refusals; and the trainer's use of it and its check."""
import logging

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from grpo_scale import attention, last_layer, packing
from grpo_scale.config import load_config
from test_attention import made_up_sequences


def small_model(kind: str, **extra):
    extra = {"num_hidden_layers": 2, **extra}
    cfg = AutoConfig.for_model(kind, vocab_size=53, hidden_size=48, intermediate_size=96, num_attention_heads=6,
                               num_key_value_heads=2, pad_token_id=0, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").double()
    for p in model.parameters():  # biases away from zero, norms away from one: every weight matters
        torch.nn.init.normal_(p, std=0.3 if p.dim() == 1 else 0.15)
    assert attention.enable(model)
    return model


def packed_batch(seed: int, cost_per_key: float = 0.0):
    """Prompts of several lengths in groups, completions of one token (which bring none) and of many."""
    ids, prompt_mask, comp, completion_mask = made_up_sequences(torch.Generator().manual_seed(seed), vocab=53)
    packed = packing.pack(ids, prompt_mask, comp, completion_mask, [3, 2, 4], cost_per_key, torch.float64,
                          segments=True)
    return packed, completion_mask.bool()


def outputs_and_grads(model, packed, used, weight):
    model.zero_grad()
    hidden = packed.gather(model.get_decoder()(**packed.inputs()).last_hidden_state)[used]
    (hidden * weight).sum().backward()
    return hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_alike(model, packed, used, atol=1e-12):
    weight = torch.randn(int(used.sum()), model.config.hidden_size, dtype=torch.float64)
    last_layer.disable(model)
    want, want_grads = outputs_and_grads(model, packed, used, weight)
    assert last_layer.enable(model) and last_layer.enabled(model)
    calls = []
    right = last_layer.used_positions
    last_layer.used_positions = lambda *a, **k: calls.append(1) or right(*a, **k)
    try:
        got, grads = outputs_and_grads(model, packed, used, weight)
    finally:
        last_layer.used_positions = right
    assert calls, "the used-positions forward did not run"
    assert torch.allclose(got, want, atol=atol, rtol=0)
    assert grads.keys() == want_grads.keys() and len(grads) > 0
    for name in grads:
        assert torch.allclose(grads[name], want_grads[name], atol=atol, rtol=0), name


@pytest.mark.parametrize("kind, extra", [
    ("llama", dict(attention_bias=True, mlp_bias=True)),   # SmolLM2's architecture, every bias on
    ("qwen2", {}),                                          # biased q, k, v projections
    ("mistral", dict(sliding_window=None)),
])
def test_outputs_and_every_gradient_equal_the_full_layer(kind, extra):
    model = small_model(kind, **extra).train()
    assert last_layer.supported(model) is None
    packed, used = packed_batch(1)
    keep = set(packed.segments.keep.tolist())
    assert set(packed.index[used].tolist()) <= keep, "a position the loss reads is not computed"
    assert len(keep) < packed.real_tokens, "nothing is skipped"
    assert_alike(model, packed, used)


def test_several_rows_gradient_checkpointing_and_lora():
    """Rows padded to the longest (a cost model that splits the batch), the layers checkpointed, and LoRA
    adapters on every projection (the layer's modules are called, so the adapters apply)."""
    from peft import LoraConfig, get_peft_model
    packed, used = packed_batch(2, cost_per_key=0.5)
    assert packed.input_ids.shape[0] > 1
    model = small_model("llama", attention_bias=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    assert_alike(model, packed, used)
    lora = get_peft_model(small_model("qwen2"), LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0,
                                                           init_lora_weights=False))
    lora.train()
    assert last_layer.supported(lora) is None
    assert_alike(lora, packed, used)


def test_dropout_applies():
    """Attention dropout in training mode reaches the used positions' attention (a one-layer model, whose
    only layer is the last): outputs differ from evaluation mode's, and from one draw to the next."""
    model = small_model("llama", attention_dropout=0.3, num_hidden_layers=1)
    packed, used = packed_batch(3)
    decoder = model.get_decoder()
    assert last_layer.enable(model)
    outs = []
    for mode in (True, True, False):
        model.train(mode)
        outs.append(packed.gather(decoder(**packed.inputs()).last_hidden_state)[used])
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[0], outs[2])
    assert_alike(model.eval(), packed, used)


def test_calls_without_segments_run_the_layers_own_forward():
    model = small_model("llama").eval()
    ids = torch.randint(1, 53, (2, 7))
    want = model(input_ids=ids).logits
    last_layer.enable(model)
    assert torch.equal(model(input_ids=ids).logits, want)
    out = model(input_ids=ids[:, :4], use_cache=True)  # a cache through the layer's own forward
    assert torch.allclose(model(input_ids=ids[:, 4:], past_key_values=out.past_key_values).logits, want[:, 4:],
                          atol=1e-12, rtol=0)


def test_what_it_refuses():
    model = small_model("llama")
    attention.disable(model)
    assert "does not use grpo_sdpa" in last_layer.supported(model)
    assert not last_layer.enable(model) and not last_layer.enabled(model)
    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2))
    assert "is not one of" in last_layer.supported(gpt2)


def _trainer(tmp_path, *extra):
    from grpo_scale.trainer import GRPOTrainer
    cfg = load_config(["--output_dir", str(tmp_path), "--report_to", "none", "--max_steps", "1", "--eval_size", "4",
                       "--per_device_train_batch_size", "16", "--max_completion_length", "12", *extra])
    return GRPOTrainer(cfg)


def test_the_trainer_uses_it_and_turns_off_a_wrong_one(tmp_path, monkeypatch, caplog):
    trainer = _trainer(tmp_path / "a", "--beta", "0.04")
    trainer.setup()
    assert trainer.last_layer and last_layer.enabled(trainer.acc.unwrap_model(trainer.model))
    assert last_layer.enabled(trainer.ref_model) and trainer.decode_step
    calls = []
    right_kv = last_layer.keys_values
    monkeypatch.setattr(last_layer, "keys_values", lambda *a: calls.append(1) or right_kv(*a))
    trainer.grpo_step(trainer.generate_and_score())
    assert calls, "the prefill for the decoding steps ran the whole last layer"
    monkeypatch.setattr(last_layer, "keys_values", right_kv)

    right = last_layer.used_positions
    monkeypatch.setattr(last_layer, "used_positions", lambda *a, **k: right(*a, **k) + 0.1)  # (the final norm undoes a scale)
    trainer = _trainer(tmp_path / "b")
    with caplog.at_level(logging.WARNING, logger="grpo_scale"):
        trainer.setup()
    assert not trainer.last_layer and trainer.packed_segments
    assert not last_layer.enabled(trainer.acc.unwrap_model(trainer.model))
    assert any("last layer" in r.getMessage() and "differ" in r.getMessage() for r in caplog.records)
    trainer.grpo_step(trainer.generate_and_score())  # and it trains


@pytest.mark.parametrize("kind, extra", [("llama", dict(attention_bias=True)), ("qwen2", {})])
def test_a_prefill_of_keys_and_values_only(kind, extra):
    """The prefill for decoding steps: the last layer's keys and values alone give the full forward's cache,
    and the decoding check passes with it in float64 (and finds a wrong one)."""
    from grpo_scale import decoding, rollout
    model = small_model(kind, **extra).eval()
    ids = torch.randint(1, 53, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    kw = rollout.cache_argument(model)
    want = rollout.prefill(model, ids, mask, None, kw)
    assert last_layer.enable(model)
    got = rollout.prefill(model, ids, mask, None, kw, keys_values_only=True)
    for a, b in zip(got.layers, want.layers):
        assert torch.allclose(a.keys, b.keys, atol=1e-12, rtol=0) and torch.allclose(a.values, b.values, atol=1e-12, rtol=0)
    assert decoding.decoding_problem(model, 53, tol=1e-12) is None
    right = last_layer.keys_values
    last_layer.keys_values = lambda layer, h, pe, cache: right(layer, h + 0.1, pe, cache)
    try:
        assert "differ" in decoding.decoding_problem(model, 53)
    finally:
        last_layer.keys_values = right
