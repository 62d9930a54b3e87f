"""Padding-free forwards (grpo_scale.packing): the packed rows' layout, and outputs and gradients equal to
the padded forward's, on the embedded model and in the trainer (policy, old and reference log-probs)."""
import math
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo_scale import attention, packing
from grpo_scale.rollout import Rollout, full_inputs, generate

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from test_shared_prompt import EMBEDDED_DIR, uneven_prompts  # noqa: E402
from test_trainer import make_trainer, params_of  # noqa: E402


def rollout_of(prompts: list[list[int]], completions: list[list[int]], pad: int = 0) -> Rollout:
    """Prompts left-padded and completions right-padded, as generate returns them."""
    P, T = max(map(len, prompts)), max(map(len, completions))
    pid = torch.tensor([[pad] * (P - len(p)) + p for p in prompts])
    pm = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    cid = torch.tensor([c + [pad] * (T - len(c)) for c in completions])
    cm = torch.tensor([[1] * len(c) + [0] * (T - len(c)) for c in completions])
    n = len(prompts)
    return Rollout(pid, pm, cid, cm, cm.clone(), torch.zeros(n, dtype=torch.bool), [""] * n, [""] * n)


def test_layout_of_a_shared_group():
    """Prompt [5 6 7] with completions [10 11 12] and [20]: one row [5 6 7 10 11], positions restarting
    after the prompt, each completion seeing the prompt and itself only, and the index of the outputs
    that predict each completion token."""
    ro = rollout_of([[5, 6, 7], [5, 6, 7]], [[10, 11, 12], [20]])
    p = packing.pack(ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.attention_mask, [2], 0.0, torch.float32)
    assert p.input_ids.tolist() == [[5, 6, 7, 10, 11]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4]]
    assert p.index.tolist() == [[2, 3, 4], [2, 2, 2]]  # 7 predicts 10 and 20; 10 predicts 11; 11 predicts 12
    visible = (p.attention_mask[0, 0] == 0).int().tolist()
    assert visible == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert p.real_tokens == 5


def test_layout_unshared_and_spread_over_rows():
    """Without sharing each completion gets its own prompt copy; with attention costly enough the units
    go into separate rows, padding tokens see only themselves, and positions restart."""
    ro = rollout_of([[5, 6], [5, 6], [8]], [[10, 11, 12], [20, 21], [30, 31, 32, 33]])
    p = packing.pack(ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.attention_mask, None, 1.0, torch.float32)
    # units [5 6 10 11], [5 6 20], [8 30 31 32]: at 1.0 per key a row of 4 costs 4 * 5 = 20, one of 11, 132
    assert p.input_ids.shape == (3, 4) and p.real_tokens == 11
    rows = {tuple(r) for r in p.input_ids.tolist()}
    assert rows == {(5, 6, 10, 11), (5, 6, 20, 0), (8, 30, 31, 32)}
    for r in range(3):
        visible = p.attention_mask[r, 0] == 0
        assert torch.equal(visible, torch.ones(4, 4, dtype=torch.bool).tril()) or \
            torch.equal(visible, torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 1]]).bool())
    flat = p.input_ids.flatten()
    # the outputs picked for row 2 are those at 8, 30, 31, 32 (predicting 30, 31, 32, 33)
    assert flat[p.index[2]].tolist() == [8, 30, 31, 32]
    assert flat[p.index[1]].tolist() == [6, 20, 6, 6]  # past the end: the prompt's last token (masked)
    one_row = packing.pack(ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.attention_mask, None, 0.0,
                           torch.float32)
    assert one_row.input_ids.shape == (1, 11)


def test_the_layout_follows_the_cost_of_attention():
    """A group of 4 completions of 40 inputs with a prompt of 10: cheap attention keeps it one unit
    (170 tokens); costly attention splits it, each unit with its own prompt copy."""
    assert packing.units_of([10] * 4, [41] * 4, [4], 1e-4) == [(0, [0, 1, 2, 3])]
    split = packing.units_of([10] * 4, [41] * 4, [4], 0.05)
    assert len(split) == 4 and sorted(r for _, rows in split for r in rows) == [0, 1, 2, 3]
    assert packing.spread([5, 3, 4, 2], 2) == [[0, 3], [2, 1]]
    assert packing.layout([100, 100, 100], 0.0) == [[0, 1, 2]] and len(packing.layout([100] * 3, 1.0)) == 3
    from transformers import AutoConfig
    cfg = AutoConfig.for_model("llama", hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                               num_key_value_heads=3, head_dim=64)
    # SmolLM2-135M's shapes: 2304 attention FLOPs per key against 7.08M linear FLOPs per token, times 2
    assert packing.key_cost(cfg) == pytest.approx(2 * 2304 / 7_077_888)


def test_an_empty_prompt_is_not_packed():
    ro = rollout_of([[1, 2], [0]], [[4], [5]])
    ro.prompt_mask[1] = 0
    assert packing.pack(ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.attention_mask, None, 0.0,
                        torch.float32) is None


@pytest.fixture(scope="module")
def model_and_tokenizer():
    tok = AutoTokenizer.from_pretrained(EMBEDDED_DIR)
    model = AutoModelForCausalLM.from_pretrained(EMBEDDED_DIR, dtype=torch.float64, attn_implementation="sdpa")
    return model, tok


@pytest.mark.parametrize("share, cost_per_key, segments", [(True, 0.01, False), (False, 0.0, False), (True, 1.0, False),
                                                      (True, 0.0, True), (False, 0.5, True)])
def test_packed_forward_matches_the_padded_forward(model_and_tokenizer, share, cost_per_key, segments):
    """float64: the outputs at every completion position and every parameter's gradient, for uneven runs
    of prompts and completions of different lengths: all in one row, spread over rows, groups split.
    Outputs agree to 1e-10. Gradients to 1e-6: the model's RMSNorm computes in float32 whatever its input,
    and a shared prompt's gradient goes through it once summed rather than once per completion (the
    completion tokens' own gradients agree exactly). ``segments``: attention within each sequence by index
    (attention.Segments, the model switched to attention.NAME) instead of the dense mask."""
    model, tok = model_and_tokenizer
    torch.manual_seed(1)
    ro = generate(model, tok, uneven_prompts(tok), max_prompt_length=None, max_new_tokens=16, do_sample=True,
                  temperature=1.5)
    lengths = ro.attention_mask.sum(1)
    assert len(set(lengths.tolist())) > 2, "want completions of different lengths"
    T = ro.completion_ids.shape[1]
    weights = torch.randn(*ro.completion_ids.shape, model.config.vocab_size, dtype=torch.float64)
    mask = ro.attention_mask.bool()
    runs = ro.prompt_runs().tolist() if share else None
    p = packing.pack(ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.attention_mask, runs, cost_per_key,
                     torch.float64, segments=segments)
    assert (p.segments is not None) == segments
    padded_tokens = ro.prompt_ids.numel() + ro.completion_ids.numel()
    assert p.real_tokens < padded_tokens and p.input_ids.numel() < padded_tokens
    model.train()

    def outputs(packed: bool):
        model.zero_grad()
        if packed:
            logits = model.get_output_embeddings()(p.gather(model.get_decoder()(**p.inputs()).last_hidden_state))
        else:
            logits = model(**full_inputs(ro)).logits[:, -T - 1:-1]
        (logits * weights * mask.unsqueeze(-1)).sum().backward()
        return logits.detach()[mask], {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}

    if segments:
        assert attention.enable(model)
    try:
        packed_out, packed_grads = outputs(True)
        padded_out, padded_grads = outputs(False)
    finally:
        attention.disable(model)
    model.eval()
    assert torch.allclose(packed_out, padded_out, atol=1e-10, rtol=1e-10)
    assert packed_grads.keys() == padded_grads.keys() and len(padded_grads) > 0
    for name in padded_grads:
        err = (packed_grads[name] - padded_grads[name]).norm() / padded_grads[name].norm().clamp(min=1e-30)
        assert err < (1e-6 if share else 1e-10), (name, float(err))


@pytest.mark.parametrize("extra", [[], ["--share_prompt", "false", "--gradient_checkpointing", "true", "--loss_impl",
                                       "fused_linear", "--loss_type", "cispo", "--epsilon_high", "5"]])
def test_padding_free_trains_the_same(tmp_path, extra):
    """padding_free on and off from one rollout: the same old and reference log-probs, losses and
    weights (beta > 0, two iterations, groups split across micro-batches)."""
    args = ["--beta", "0.1", "--num_iterations", "2", "--gradient_accumulation_steps", "2",
            "--per_device_train_batch_size", "6", "--max_steps", "2", "--learning_rate", "1e-5",
            "--temperature", "2.0", *extra]
    packed = make_trainer(tmp_path / "packed", *args)
    padded = make_trainer(tmp_path / "padded", *args, "--padding_free", "false")
    assert packed.padding_free and not padded.padding_free
    batch = packed.generate_and_score()
    ro = batch["rollout"]
    real = ro.attention_mask.bool()  # past a completion's end the two read different (masked) outputs
    assert torch.allclose(padded._logps(padded.model, ro)[real], batch["old_logps"][real], atol=1e-5)
    assert torch.allclose(padded._logps(padded.ref_model, ro)[real], batch["ref_logps"][real], atol=1e-5)
    calls = []  # the attention mask's rank in each policy forward
    decoder = packed.acc.unwrap_model(packed.model).get_decoder()
    hook = decoder.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["attention_mask"].dim()),
                                             with_kwargs=True)
    m_packed = packed.grpo_step(batch)
    hook.remove()
    m_padded = padded.grpo_step(batch)
    assert calls and set(calls) == {4}, "the policy forward did not run packed"
    assert packed.packed_segments, "the packed forward used the dense mask"
    for key in ("loss", "kl_mean", "entropy_mean", "grad_norm"):
        assert m_packed[key] == pytest.approx(m_padded[key], rel=1e-4, abs=1e-7), key
    assert torch.allclose(params_of(packed), params_of(padded), atol=5e-5)


def test_a_model_the_packed_forward_does_not_fit_runs_padded(tmp_path, caplog):
    """A model whose causal-LM head does more than the output embedding (Gemma 2's logit soft-capping):
    the start-up check finds the packed logits differ, says so once, and the run trains padded."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    tok = AutoTokenizer.from_pretrained(EMBEDDED_DIR)
    cfg = Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=1.0,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    path = tmp_path / "gemma2"
    Gemma2ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    with caplog.at_level("WARNING", logger="grpo_scale"):
        trainer = make_trainer(tmp_path, "--model_name_or_path", str(path), "--max_completion_length", "4",
                               "--attn_implementation", "eager")
        m = trainer.grpo_step(trainer.generate_and_score())
    assert not trainer.padding_free and math.isfinite(m["loss"])
    assert sum("padding_free: turned off" in r.getMessage() for r in caplog.records) == 1
