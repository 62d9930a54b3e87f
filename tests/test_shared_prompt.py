"""Shared prompts: each group's prompt run once (generation prefill, log-prob forwards) must give what one
full forward per completion gives: the same greedy completions, logits and gradients up to rounding."""
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo_scale.rollout import (Rollout, cache_argument, full_inputs, generate, run_lengths,
                                shared_prompt_inputs)
from grpo_scale.tasks import ProblemStream
from grpo_scale.tasks.prompts import render_prompt
import grpo_scale

EMBEDDED_DIR = Path(grpo_scale.__file__).parent / "assets" / "tiny-math"


@pytest.fixture(scope="module")
def model_and_tokenizer():
    tok = AutoTokenizer.from_pretrained(EMBEDDED_DIR)
    model = AutoModelForCausalLM.from_pretrained(EMBEDDED_DIR, dtype=torch.float32, attn_implementation="sdpa")
    return model, tok


def uneven_prompts(tok) -> list[str]:
    """Runs of 3, 1, 2 and 2 copies; questions of different lengths, so rows are padded differently."""
    rows = ProblemStream({"arithmetic": 1.0}, [1, 3], seed=5).take(4)
    qs = [render_prompt(tok, r["prompt"]) for r in rows]
    assert len({len(tok(q)["input_ids"]) for q in qs}) > 1, "want prompts of different lengths"
    return [qs[0]] * 3 + [qs[1]] + [qs[2]] * 2 + [qs[3]] * 2


@pytest.mark.parametrize("flags, expected", [
    ([], [1]), ([True], [1, 1]), ([False], [2]), ([False, False, True, True, False], [3, 1, 2]),
    ([True, False, False, False, True, False], [1, 4, 2]),
])
def test_run_lengths(flags, expected):
    assert run_lengths(torch.tensor(flags, dtype=torch.bool)).tolist() == expected


def test_prompt_runs_compare_ids_and_mask():
    ids = torch.tensor([[0, 5, 6], [0, 5, 6], [5, 5, 6], [5, 5, 6], [0, 5, 6]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1]])  # row 4: ids as row 0, mask not
    ro = Rollout(ids, mask, ids, mask, mask, torch.zeros(5, dtype=torch.bool), [""] * 5, [""] * 5)
    assert ro.prompt_runs().tolist() == [2, 2, 1]


def test_greedy_generation_is_the_same_with_shared_prompts(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompts = uneven_prompts(tok)
    kw = dict(max_prompt_length=None, max_new_tokens=24, do_sample=False)
    shared = generate(model, tok, prompts, share_prompt=True, **kw)
    full = generate(model, tok, prompts, share_prompt=False, **kw)
    assert torch.equal(shared.prompt_ids, full.prompt_ids) and torch.equal(shared.prompt_mask, full.prompt_mask)
    assert torch.equal(shared.completion_ids, full.completion_ids)
    assert shared.completions == full.completions
    assert shared.prompts == prompts


def test_sampling_follows_the_same_distribution(model_and_tokenizer):
    """Same seed, same logits: the sampler draws the same tokens (top-k and temperature applied alike)."""
    model, tok = model_and_tokenizer
    prompts = uneven_prompts(tok)
    kw = dict(max_prompt_length=None, max_new_tokens=24, do_sample=True, temperature=1.3, top_k=20)
    torch.manual_seed(3)
    shared = generate(model, tok, prompts, share_prompt=True, **kw)
    torch.manual_seed(3)
    full = generate(model, tok, prompts, share_prompt=False, **kw)
    agree = (shared.completion_ids == full.completion_ids).float().mean()
    assert agree > 0.95, f"only {agree:.2%} of sampled tokens agree"


@pytest.mark.parametrize("prefix", ["model", "decoder"])
def test_shared_prompt_forward_matches_the_full_forward(model_and_tokenizer, prefix):
    """Outputs at the completion positions and every parameter's gradient, for uneven runs of prompts."""
    model, tok = model_and_tokenizer
    torch.manual_seed(0)
    ro = generate(model, tok, uneven_prompts(tok), max_prompt_length=None, max_new_tokens=16, do_sample=True,
                  temperature=1.5)
    T = ro.completion_ids.shape[1]
    weights = torch.randn(*ro.completion_ids.shape, 263 if prefix == "model" else model.config.hidden_size)
    mask = ro.attention_mask.bool()
    model.train()

    def outputs(shared: bool):
        model.zero_grad()
        if prefix == "model":
            inputs = shared_prompt_inputs(ro, model, cache_argument(model)) if shared else full_inputs(ro)
            assert inputs is not None
            out = model(**inputs).logits
        else:
            decoder = model.get_decoder()
            inputs = shared_prompt_inputs(ro, decoder, cache_argument(model)) if shared else full_inputs(ro)
            out = decoder(**inputs).last_hidden_state
        out = out[:, -T:] if shared else out[:, -T - 1:-1]
        (out * weights * mask.unsqueeze(-1)).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out.detach()[mask], grads

    shared_out, shared_grads = outputs(True)
    full_out, full_grads = outputs(False)
    model.eval()
    assert torch.allclose(shared_out, full_out, atol=1e-5, rtol=1e-5)
    assert shared_grads.keys() == full_grads.keys() and len(full_grads) > 0
    for name in full_grads:
        err = (shared_grads[name] - full_grads[name]).norm() / full_grads[name].norm().clamp(min=1e-12)
        assert err < 1e-5, (name, float(err))


def test_nothing_shared_falls_back(model_and_tokenizer):
    model, tok = model_and_tokenizer
    ro = generate(model, tok, uneven_prompts(tok)[2:4], max_prompt_length=None, max_new_tokens=4, do_sample=False)
    assert ro.prompt_runs().tolist() == [1, 1]
    assert shared_prompt_inputs(ro, model, cache_argument(model)) is None


def hybrid_model(tok):
    """A small random Qwen3.5 text model: linear-attention layers (conv and recurrent states) between
    full-attention ones, a cache whose rows cannot be repeated by keys and values alone."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    if "qwen3_5_text" not in CONFIG_MAPPING:
        pytest.skip("this transformers has no hybrid linear-attention model")
    cfg = AutoConfig.for_model("qwen3_5_text", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                               num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                               linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
                               linear_value_head_dim=16, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float().eval()


def test_a_hybrid_cache_is_refused_with_the_fix_named(model_and_tokenizer):
    from grpo_scale.rollout import CacheNotRepeatable
    _, tok = model_and_tokenizer
    model = hybrid_model(tok)
    with pytest.raises(CacheNotRepeatable, match="LinearAttention.*share_prompt: false"):
        generate(model, tok, uneven_prompts(tok), max_prompt_length=None, max_new_tokens=4, do_sample=True)
    ro = generate(model, tok, uneven_prompts(tok), max_prompt_length=None, max_new_tokens=4, do_sample=True,
                  share_prompt=False)
    assert ro.completion_ids.shape[0] == 8
    with pytest.raises(CacheNotRepeatable):
        shared_prompt_inputs(ro, model, cache_argument(model))


def test_a_hybrid_model_decodes_like_generate(model_and_tokenizer):
    """Rows of a hybrid model finish at different steps but stay in the batch (its cache cannot drop
    rows): the tokens are generate's for the same seed."""
    from transformers import GenerationConfig

    from grpo_scale.rollout import sample, tokenize_prompts
    _, tok = model_and_tokenizer
    model = hybrid_model(tok)
    ids, mask = tokenize_prompts(tok, uneven_prompts(tok)[2:6], None, "cpu")
    eos = list(range(3, len(tok), 3))  # many stop tokens, so rows end at different steps
    torch.manual_seed(4)
    expected = model.generate(input_ids=ids, attention_mask=mask, generation_config=GenerationConfig(
        max_new_tokens=10, do_sample=True, top_k=0, eos_token_id=eos, pad_token_id=tok.pad_token_id))[:, ids.shape[1]:]
    torch.manual_seed(4)
    ours = sample(model, ids, mask, cache=None, cache_kw=cache_argument(model), max_new_tokens=10, eos=eos,
                  pad=tok.pad_token_id, do_sample=True)
    assert torch.equal(ours, expected)
    lengths = (ours != tok.pad_token_id).sum(1)
    assert lengths.min() < lengths.max()


def test_padding_common_to_a_micro_batch_is_dropped(model_and_tokenizer):
    """A micro-batch of short prompts cut from a batch padded for a longer one: the common left padding is
    not run, and the outputs are those of the micro-batch tokenised on its own."""
    model, tok = model_and_tokenizer
    prompts = uneven_prompts(tok)
    ro = generate(model, tok, prompts, max_prompt_length=None, max_new_tokens=6, do_sample=False)
    shortest = prompts[int(ro.prompt_mask.sum(1).argmin())]
    short = [i for i, p in enumerate(prompts) if p == shortest]  # one group: consecutive rows
    assert len(short) >= 2, "want a shared prompt"
    part = ro.select(slice(short[0], short[-1] + 1))
    assert part.prompt_mask.any(0).logical_not().any(), "want padding common to the micro-batch"
    alone = generate(model, tok, prompts[short[0]:short[-1] + 1], max_prompt_length=None, max_new_tokens=6,
                     do_sample=False)
    T = part.completion_ids.shape[1]
    with torch.no_grad():
        full = model(**full_inputs(part)).logits[:, -T - 1:-1]
        assert full_inputs(part)["input_ids"].shape[1] == alone.prompt_ids.shape[1] + T
        ref = model(**full_inputs(alone)).logits[:, -alone.completion_ids.shape[1] - 1:-1]
        shared = model(**shared_prompt_inputs(part, model, cache_argument(model))).logits
    mask = part.attention_mask.bool()
    assert torch.allclose(full[mask], ref[:, :T][mask], atol=1e-5)
    assert torch.allclose(shared[mask], full[mask], atol=1e-5)
