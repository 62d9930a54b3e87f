"""Structured attention (grpo_scale/attention.py) against the plain computation: decoding over a prompt held
once per group (PrefixKV) equals sdpa over the prompt cache repeated for each row, forward and every
gradient in float64, with grouped-query heads, left-padded prompts, several query tokens and rows
dropped; the decoding loop draws the same tokens with it; models it cannot serve keep sdpa; and the
trainer's check turns it off for a model where it would differ."""
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

import grpo_scale
from grpo_scale import attention
from grpo_scale.rollout import generate, prefix_decoding_problem
from grpo_scale.tasks import ProblemStream
from grpo_scale.tasks.prompts import render_prompt

EMBEDDED_DIR = Path(grpo_scale.__file__).parent / "assets" / "tiny-math"


class Module(torch.nn.Module):
    def __init__(self, layer_idx=0):
        super().__init__()
        self.layer_idx = layer_idx


class Cache:
    """What PrefixKV reads of a transformers cache: per layer, keys and values."""

    def __init__(self, keys, values):
        self.layers = [type("Layer", (), {"keys": keys, "values": values})()]


def plain_attention(q, k, v, kp, vp, pmask, group, scaling):
    """sdpa over each row's group prompt (repeated) followed by its own keys, causal among the last T."""
    B, H, T, D = q.shape
    S = k.shape[2]
    n_rep = H // k.shape[1]
    K = torch.cat([kp[group], k], dim=2).repeat_interleave(n_rep, dim=1)
    V = torch.cat([vp[group], v], dim=2).repeat_interleave(n_rep, dim=1)
    P = kp.shape[2]
    own = torch.ones(T, S, dtype=torch.bool).tril(S - T)
    mask = torch.cat([pmask[group].bool()[:, None, None, :].expand(B, 1, T, P), own.expand(B, 1, T, S)], dim=-1)
    return F.scaled_dot_product_attention(q, K, V, attn_mask=mask, scale=scaling).transpose(1, 2)


@pytest.mark.parametrize("n_rep", [1, 3])
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("drop", [False, True])
def test_prefix_attention_equals_sdpa_over_the_repeated_prompt(n_rep, T, drop):
    g = torch.Generator().manual_seed(n_rep * 10 + T + drop)
    Hkv, D, P, S = 2, 8, 7, 4 + T
    counts = torch.tensor([2, 3, 1])
    R, B = len(counts), int(counts.sum())
    pmask = torch.ones(R, P, dtype=torch.long)
    pmask[1, :3] = 0  # left padding
    pmask[2, :6] = 0  # one real prompt token
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()
    kp, vp = rnd(R, Hkv, P, D), rnd(R, Hkv, P, D)
    q, k, v = rnd(B, Hkv * n_rep, T, D), rnd(B, Hkv, S, D), rnd(B, Hkv, S, D)
    prefix = attention.PrefixKV(Cache(kp, vp), pmask, counts)
    group = torch.repeat_interleave(torch.arange(R), counts)
    live = torch.arange(B)
    if drop:  # rows 1 and 3 finished: the first group keeps one row, the second two
        live = torch.tensor([0, 2, 4, 5])
        prefix.select(live)
        group = group[live]
    qs, ks, vs = q[live], k[live], v[live]
    ours = attention.prefix_attention(0, qs, ks, vs, prefix, scaling=D ** -0.5)
    want = plain_attention(qs, ks, vs, kp, vp, pmask, group, D ** -0.5)
    assert ours.shape == want.shape == (len(live), T, Hkv * n_rep, D)
    assert torch.allclose(ours, want, atol=1e-12, rtol=0)
    w = torch.randn(want.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((ours * w).sum(), (q, k, v, kp, vp), retain_graph=True)
    wants = torch.autograd.grad((want * w).sum(), (q, k, v, kp, vp))
    for name, a, b in zip("q k v kp vp".split(), grads, wants):
        assert torch.allclose(a, b, atol=1e-12, rtol=0), name


@pytest.fixture(scope="module")
def embedded():
    tok = AutoTokenizer.from_pretrained(EMBEDDED_DIR)
    model = AutoModelForCausalLM.from_pretrained(EMBEDDED_DIR, dtype=torch.float32, attn_implementation="sdpa").eval()
    rows = ProblemStream({"arithmetic": 1.0}, [1, 2, 3], seed=5).take(4)
    prompts = [render_prompt(tok, r["prompt"]) for r, n in zip(rows, (3, 4, 1, 4)) for _ in range(n)]
    return model, tok, prompts


@pytest.mark.parametrize("do_sample", [False, True])
def test_decoding_with_the_prefix_draws_the_same_tokens(embedded, do_sample):
    model, tok, prompts = embedded
    kw = dict(max_prompt_length=None, max_new_tokens=24, do_sample=do_sample, top_k=20, with_logps=True)
    try:
        torch.manual_seed(3)
        plain = generate(model, tok, prompts, **kw)
        assert attention.enable(model) and attention.enabled(model)
        torch.manual_seed(3)
        ours = generate(model, tok, prompts, **kw)
    finally:
        attention.disable(model)
    assert not attention.enabled(model)
    lengths = plain.attention_mask.sum(1)
    assert lengths.min() < lengths.max(), "want rows that finish at different steps"
    assert torch.equal(ours.completion_ids, plain.completion_ids)
    assert torch.allclose(ours.sampling_logps, plain.sampling_logps, atol=1e-5)


def small_model(kind: str, **extra):
    from transformers import AutoConfig
    cfg = AutoConfig.for_model(kind, vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=6, num_key_value_heads=2, pad_token_id=0, **extra)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float().eval()


def test_grouped_query_models_decode_alike():
    """Llama's architecture (SmolLM2's) with 3 query heads per key head: the check passes on it."""
    model = small_model("llama")
    assert attention.enable(model)
    assert prefix_decoding_problem(model, 97) is None


def test_models_it_cannot_serve_keep_their_attention():
    sliding = small_model("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=0)
    assert "other than full attention" in attention.supported(sliding.config)
    assert not attention.enable(sliding) and sliding.config._attn_implementation == "sdpa"
    eager = AutoModelForCausalLM.from_pretrained(EMBEDDED_DIR, attn_implementation="eager")
    assert "'eager'" in attention.supported(eager.config)
    assert not attention.enable(eager)


def test_the_check_finds_a_wrong_attention_and_the_trainer_turns_it_off(monkeypatch, tmp_path, caplog):
    from grpo_scale.config import load_config
    from grpo_scale.trainer import GRPOTrainer
    right = attention.prefix_attention
    monkeypatch.setattr(attention, "prefix_attention",
                        lambda module, q, k, v, prefix, scaling, dropout=0.0: right(module, q, k, v, prefix, 1.1 * scaling))
    cfg = load_config(["--output_dir", str(tmp_path), "--report_to", "none", "--max_steps", "1", "--eval_size", "4",
                       "--per_device_train_batch_size", "8", "--max_completion_length", "8"])
    trainer = GRPOTrainer(cfg)
    with caplog.at_level(logging.WARNING, logger="grpo_scale"):
        trainer.setup()
    assert not trainer.structured_attention
    assert not attention.enabled(trainer.acc.unwrap_model(trainer.model))
    assert any("structured attention: turned off" in r.getMessage() and "differ" in r.getMessage()
               for r in caplog.records)
    trainer.grpo_step(trainer.generate_and_score())  # and it trains


def made_up_sequences(g: torch.Generator, vocab: int = 50):
    """Left-padded prompts [N, P] in groups of 3, 2 and 4 (lengths 5, 2, 7) and right-padded completions
    [N, T] of one token (which bring none to a packed row) and of many, with their masks:
    (ids, prompt_mask, completions, completion_mask)."""
    prompt_len = [5, 5, 5, 2, 2, 7, 7, 7, 7]
    lengths = [3, 1, 9, 4, 2, 6, 1, 5, 12]
    N, P, T = len(lengths), max(prompt_len), max(lengths)
    prompt_mask = (torch.arange(P)[None] >= P - torch.tensor(prompt_len)[:, None]).long()
    completion_mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
    ids = torch.randint(1, vocab, (N, P), generator=g) * prompt_mask
    comp = torch.randint(1, vocab, (N, T), generator=g) * completion_mask
    return ids, prompt_mask, comp, completion_mask


@pytest.mark.parametrize("share, cost_per_key, n_rep", [(True, 0.0, 1), (True, 0.5, 3), (False, 0.2, 2)])
def test_segment_attention_equals_the_dense_mask(share, cost_per_key, n_rep):
    """Packed rows (one row, or several padded ones; prompts of several lengths; completions of one token,
    which bring none, and of many): each sequence's attention by index equals sdpa under packing's dense
    mask at every real position, forward and the gradients of queries, keys and values, in float64."""
    from grpo_scale import packing
    g = torch.Generator().manual_seed(int(cost_per_key * 10) + n_rep)
    ids, prompt_mask, comp, completion_mask = made_up_sequences(g)
    runs = [3, 2, 4] if share else None
    dense = packing.pack(ids, prompt_mask, comp, completion_mask, runs, cost_per_key, torch.float64)
    seg = packing.pack(ids, prompt_mask, comp, completion_mask, runs, cost_per_key, torch.float64, segments=True)
    assert torch.equal(dense.input_ids, seg.input_ids) and torch.equal(dense.index, seg.index)
    R, L = dense.input_ids.shape
    Hkv, D = 2, 4
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()
    q, k, v = rnd(R, Hkv * n_rep, L, D), rnd(R, Hkv, L, D), rnd(R, Hkv, L, D)
    ours = attention.segment_attention(Module(), q, k, v, seg.segments, scaling=0.3)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1),
                                          attn_mask=dense.attention_mask, scale=0.3).transpose(1, 2)
    real = (seg.segments.inverse != seg.segments.zero_row).view(R, L)  # padding: the zero row
    assert int(real.sum()) == dense.real_tokens and (R == 1) == bool(real.all())
    assert torch.allclose(ours[real], want[real], atol=1e-12, rtol=0)
    assert (ours[~real] == 0).all()
    w = torch.randn(want.shape, generator=g, dtype=torch.float64) * real[..., None, None]
    grads = torch.autograd.grad((ours * w).sum(), (q, k, v))
    wants = torch.autograd.grad((want * w).sum(), (q, k, v))
    for name, a, b in zip("qkv", grads, wants):
        assert torch.allclose(a, b, atol=1e-12, rtol=0), name


def test_completions_are_batched_by_length():
    from grpo_scale.attention import MAX_BUCKETS, _buckets
    comps = [(0, i, n) for i, n in enumerate(sorted([1, 2, 2, 3, 30, 31, 33, 60, 64, 64, 5, 6]))]
    parts = _buckets(comps, prompt=20)
    assert 1 < len(parts) <= MAX_BUCKETS and sum(parts, []) == comps
    assert [p[-1][2] for p in parts] == sorted({p[-1][2] for p in parts})
    assert _buckets([], 5) == [] and _buckets(comps[:1], 5) == [comps[:1]]


def test_the_batches_are_the_cheapest_cut():
    """Against every way of cutting a sorted list into at most MAX_BUCKETS runs."""
    import itertools

    from grpo_scale.attention import MAX_BUCKETS, _buckets
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        lengths = sorted(torch.randint(1, 40, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist())
        comps = [(0, i, n) for i, n in enumerate(lengths)]
        work = lambda parts: sum(len(p) * p[-1][2] * (9 + p[-1][2]) for p in parts)
        best = min(work([comps[a:b] for a, b in zip((0,) + cut, cut + (len(comps),))])
                   for k in range(min(MAX_BUCKETS, len(comps)))
                   for cut in itertools.combinations(range(1, len(comps)), k))
        assert work(_buckets(comps, 9)) == best, lengths


def test_a_saved_model_does_not_name_the_implementation(tmp_path):
    """final/ and checkpoints load anywhere: the switch to grpo_sdpa is not written into config.json."""
    model = small_model("qwen2")
    assert attention.enable(model)
    model.save_pretrained(tmp_path)
    assert "grpo_sdpa" not in (tmp_path / "config.json").read_text()
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config._attn_implementation != attention.NAME
