"""The decoding loop (rollout.sample) against transformers' generate: the same warpers, the same greedy
completions, the same sampled tokens for a seed when finished rows stay in the batch, and the same greedy
completions when they leave it (so the cache rows follow their completions)."""
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

import grpo_scale
from grpo_scale.rollout import cache_argument, draw_top_k, eos_ids, sample, tokenize_prompts, warp_logits
from grpo_scale.tasks import ProblemStream
from grpo_scale.tasks.prompts import render_prompt

EMBEDDED_DIR = Path(grpo_scale.__file__).parent / "assets" / "tiny-math"


@pytest.fixture(scope="module")
def setup():
    tok = AutoTokenizer.from_pretrained(EMBEDDED_DIR)
    model = AutoModelForCausalLM.from_pretrained(EMBEDDED_DIR, dtype=torch.float32, attn_implementation="sdpa").eval()
    rows = ProblemStream({"arithmetic": 1.0}, [1, 2, 3], seed=11).take(6)
    prompts = [render_prompt(tok, r["prompt"]) for r in rows for _ in range(2)]
    ids, mask = tokenize_prompts(tok, prompts, None, "cpu")
    eos = eos_ids(tok, model)
    return model, tok, ids, mask, eos


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.9), (0.8, 7, 0.5), (1.0, 1000, 0.3), (2.0, 1, 0.99),
])
def test_warpers_match_transformers(temperature, top_k, top_p):
    torch.manual_seed(top_k)
    logits = torch.randn(9, 263) * 3
    expected = logits.clone()
    for warper in ([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []) + \
                  ([TopKLogitsWarper(top_k)] if top_k else []) + ([TopPLogitsWarper(top_p)] if top_p < 1 else []):
        expected = warper(None, expected)
    ours = warp_logits(logits, temperature, top_k, top_p)
    assert torch.equal(torch.isinf(ours), torch.isinf(expected))
    assert torch.allclose(ours.softmax(-1), expected.softmax(-1), atol=1e-7)
    assert (~torch.isinf(ours)).sum(-1).min() >= 1


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 5, 1.0), (0.7, 12, 1.0), (1.3, 12, 0.8), (1.0, 1, 1.0)])
def test_the_top_k_draw_follows_the_warped_distribution(temperature, top_k, top_p):
    """draw_top_k's tokens over many draws: each row's frequencies match warp_logits' softmax (a chi-square
    bound far above chance, far below a wrong distribution), tokens outside it never drawn, and the
    returned log-probs are the warped distribution's."""
    gen = torch.Generator().manual_seed(top_k)
    base = torch.randn(3, 40, generator=gen) * 2
    n = 20000
    torch.manual_seed(0)
    tokens, logp = draw_top_k(base.repeat_interleave(n, 0), temperature, top_k, top_p)
    want = warp_logits(base, temperature, top_k, top_p).softmax(-1)                      # [3, 40]
    assert torch.allclose(logp.exp(), want.repeat_interleave(n, 0).gather(1, tokens[:, None]).squeeze(1), atol=1e-6)
    for r in range(3):
        counts = torch.bincount(tokens[r * n:(r + 1) * n], minlength=40).double()
        kept = want[r] > 0
        assert counts[~kept].sum() == 0
        expected = want[r][kept].double() * n
        chi2 = float(((counts[kept] - expected) ** 2 / expected).sum())
        assert chi2 < 3 * max(int(kept.sum()) - 1, 1) + 30, (r, chi2)
    if top_k > 1:  # the wrong distribution (top-k without the temperature, or uniform over it) is caught
        flat = torch.full_like(want[0], 0.0)
        flat[want[0] > 0] = 1.0 / int((want[0] > 0).sum())
        counts = torch.bincount(tokens[:n], minlength=40).double()
        kept = flat > 0
        assert float(((counts[kept] - flat[kept] * n) ** 2 / (flat[kept] * n)).sum()) > 200


def test_the_top_k_draw_leaves_ties_and_the_full_vocabulary_to_warp_logits():
    logits = torch.tensor([[3.0, 2.0, 1.0, 1.0, 0.0], [3.0, 2.0, 1.5, 1.0, 0.0]])
    assert draw_top_k(logits, 1.0, 3) is None        # row 0's third and fourth scores tie: both are kept
    assert draw_top_k(logits, 1.0, 0) is None and draw_top_k(logits, 1.0, 5) is None
    tokens, _ = draw_top_k(logits[1:], 1.0, 2)
    assert int(tokens) in (0, 1)


def hf_generate(model, ids, mask, eos, pad, **kw):
    cfg = GenerationConfig(max_new_tokens=20, eos_token_id=eos, pad_token_id=pad, repetition_penalty=1.0, **kw)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
    return out[:, ids.shape[1]:]


def our_sample(model, ids, mask, eos, pad, **kw):
    return sample(model, ids, mask, cache=None, cache_kw=cache_argument(model), max_new_tokens=20, eos=eos,
                  pad=pad, **kw)


def test_greedy_matches_generate_with_and_without_dropping_rows(setup):
    model, tok, ids, mask, eos = setup
    pad = tok.pad_token_id
    expected = hf_generate(model, ids, mask, eos, pad, do_sample=False)
    for drop in (True, False):
        ours = our_sample(model, ids, mask, eos, pad, do_sample=False, drop_finished=drop)
        assert torch.equal(ours, expected), drop


def test_sampled_tokens_match_generate_for_a_seed(setup):
    model, tok, ids, mask, eos = setup
    pad = tok.pad_token_id
    kw = dict(temperature=1.4, top_k=30, top_p=0.95)
    torch.manual_seed(7)
    expected = hf_generate(model, ids, mask, eos, pad, do_sample=True, **kw)
    torch.manual_seed(7)
    ours = our_sample(model, ids, mask, eos, pad, do_sample=True, drop_finished=False, **kw)
    assert torch.equal(ours, expected)
    lengths = (ours != pad).sum(1)
    assert lengths.min() < lengths.max(), "want rows that finish at different steps"


def test_few_row_linears_and_the_reserved_cache_sample_the_same_tokens(setup):
    """The policy's linears in the few-row orientation (rollout.few_row_linears) and the KV cache with
    preallocated room (rollout.reserve, which sample() applies) change rounding only: transformers'
    generate on the untouched model draws the same tokens for a seed, and one decoding step's logits agree."""
    import copy

    from grpo_scale.rollout import few_row_linears, linear, reserve
    model, tok, ids, mask, eos = setup
    pad = tok.pad_token_id
    patched = copy.deepcopy(model)
    assert few_row_linears(copy.deepcopy(model)) == 0  # the embedded model's weights are all small
    assert few_row_linears(patched, min_weight=0) == sum(type(m) is torch.nn.Linear for m in model.modules()) > 0
    kw = dict(temperature=1.4, top_k=30, top_p=0.95)
    torch.manual_seed(7)
    expected = hf_generate(model, ids, mask, eos, pad, do_sample=True, **kw)
    torch.manual_seed(7)
    assert torch.equal(our_sample(patched, ids, mask, eos, pad, do_sample=True, drop_finished=False, **kw), expected)
    x, w, b = torch.randn(3, 5, 128), torch.randn(263, 128), torch.randn(263)
    assert torch.allclose(linear(x, w, b), torch.nn.functional.linear(x, w, b), atol=1e-5)
    assert linear(x, w).is_contiguous() and linear(x[:, :2], w).shape == (3, 2, 263)
    with torch.no_grad():  # a reserved cache holds what a concatenating one holds, through row selection
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        plain, roomy = out.past_key_values, copy.deepcopy(out.past_key_values)
        assert reserve(roomy, 4) and not reserve(roomy, 4)  # converted once
        step = ids[:, -1:]
        attn = torch.cat([mask, mask.new_ones(len(ids), 1)], 1)
        a = model(input_ids=step, attention_mask=attn, past_key_values=plain, use_cache=True).logits
        b = model(input_ids=step, attention_mask=attn, past_key_values=roomy, use_cache=True).logits
        assert torch.allclose(a, b, atol=1e-6)
        keep = torch.tensor([0, 2, 3])
        plain.batch_select_indices(keep)
        roomy.batch_select_indices(keep)
        for p, r in zip(plain.layers, roomy.layers):
            assert torch.equal(p.keys, r.keys) and torch.equal(p.values, r.values)


def test_dropped_rows_sample_from_their_own_distribution(setup):
    """Rows leave the batch at their EOS: every later token of every row must still come from that row's
    own top-3 (scored again by one full forward), which a row fed another row's cache would break."""
    model, tok, ids, mask, eos = setup
    pad = tok.pad_token_id
    torch.manual_seed(1)
    out = our_sample(model, ids, mask, eos, pad, do_sample=True, drop_finished=True, temperature=1.5, top_k=3)
    live = torch.ones_like(out, dtype=torch.bool)
    for t in range(1, out.shape[1]):
        live[:, t] = live[:, t - 1] & ~torch.isin(out[:, t - 1], torch.tensor(eos))
    lengths = live.sum(1)
    assert lengths.min() < lengths.max(), "want rows that finish at different steps"
    full_ids, full_mask = torch.cat([ids, out], 1), torch.cat([mask, live.long()], 1)
    with torch.no_grad():
        logits = model(input_ids=full_ids, attention_mask=full_mask,
                       position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0)).logits[:, ids.shape[1] - 1:-1]
    top3 = logits.topk(3, dim=-1).indices
    in_top3 = (top3 == out.unsqueeze(-1)).any(-1)
    assert bool(in_top3[live].all()), f"{int((~in_top3[live]).sum())} token(s) outside their row's top-3"


@pytest.mark.parametrize("drop", [True, False])
@pytest.mark.parametrize("temperature, top_k, top_p", [(1.4, 0, 1.0), (0.9, 30, 0.95)])
def test_recorded_logps_are_the_sampling_distributions(setup, drop, temperature, top_k, top_p):
    """with_logps: each sampled token's log-prob under the warped distribution it was drawn from equals
    the one a full forward of prompt + completion gives (up to rounding), 0 after the row's EOS; the
    tokens are those of a run without it (the same seed)."""
    model, tok, ids, mask, eos = setup
    pad = tok.pad_token_id
    kw = dict(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p, drop_finished=drop)
    torch.manual_seed(3)
    plain = our_sample(model, ids, mask, eos, pad, **kw)
    torch.manual_seed(3)
    out, logps = our_sample(model, ids, mask, eos, pad, with_logps=True, **kw)
    assert torch.equal(out, plain) and logps.shape == out.shape and logps.dtype == torch.float32
    seq = torch.cat([ids, out], 1)
    alive = torch.ones_like(out, dtype=torch.bool)
    for t in range(1, out.shape[1]):  # active: up to and including the first EOS
        alive[:, t] = alive[:, t - 1] & ~torch.isin(out[:, t - 1], torch.tensor(eos))
    attn = torch.cat([mask, alive.long()], 1)
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=seq, attention_mask=attn, position_ids=pos).logits[:, ids.shape[1] - 1:-1]
    warped = warp_logits(logits.reshape(-1, logits.shape[-1]), temperature, top_k, top_p).log_softmax(-1)
    want = warped.gather(1, out.reshape(-1, 1)).view(out.shape)
    assert torch.allclose(logps[alive], want[alive], atol=1e-4)
    assert (logps[~alive] == 0).all() and bool((~alive).any())
