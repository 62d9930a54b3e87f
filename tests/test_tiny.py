"""The embedded tiny model: the builder end to end (a few steps), and the committed assets."""
import json
import shlex
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo_scale import tiny
from grpo_scale.tasks import DEFAULT_SYSTEM_PROMPT, ProblemStream, make_eval_set, render_prompt

ASSETS = Path(tiny.__file__).parent / "assets" / "tiny-math"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A throwaway model: 3 supervised steps of a 2-layer, 32-wide model, evaluated on 4 problems."""
    out = tmp_path_factory.mktemp("tiny")
    argv = ["--output_dir", str(out), "--steps", "3", "--batch_size", "4", "--hidden_size", "32",
            "--num_layers", "2", "--num_heads", "2", "--eval_size", "4", "--num_samples", "2",
            "--max_new_tokens", "8", "--task_mix", "arithmetic=1,polynomial=1", "--task_level", "2",
            "--exclude_eval_size", "64", "--slip_rate", "0.5"]
    info = tiny.main(argv)
    return out, info


def test_build_info_written(built):
    out, info = built
    on_disk = json.loads((out / "build_info.json").read_text())
    assert on_disk == json.loads(json.dumps(info))
    assert on_disk["steps"] == 3 and on_disk["problems_seen"] == 12
    assert on_disk["trace"] == "column" and on_disk["slip_rate"] == 0.5
    assert on_disk["command"].startswith("python -m grpo_scale.tiny --output_dir")
    assert set(on_disk["evaluation"]) >= {"all", "arithmetic", "polynomial"}
    assert 0.0 <= on_disk["evaluation"]["all"]["pass_at_2"] <= 1.0


def test_too_few_questions_to_hold_out_says_what_to_change(tmp_path):
    # Polynomial level 1 has 144 distinct questions: 500 of them cannot be held out.
    with pytest.raises(ValueError, match="--exclude_eval_size"):
        tiny.main(["--output_dir", str(tmp_path), "--task_mix", "polynomial=1", "--task_level", "1",
                   "--exclude_eval_size", "500", "--steps", "1"])


def test_loads_with_plain_transformers(built):
    out, info = built
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "qwen2" and model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == info["num_parameters"]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert model.config.eos_token_id == tok.eos_token_id and model.config.vocab_size == len(tok)


@pytest.mark.parametrize("text", ["Solve 78-(3*(47-2)+2)", "Expand 3*(x+1)*(x+2)", " a\tb\n\nc's  é",
                                  "<think>6+8=14</think><answer>14</answer><|im_end|>"])
def test_saved_tokenizer_matches_builder(built, text):
    # AutoTokenizer loads a qwen2 checkpoint as Qwen2Tokenizer, which rebuilds its own pipeline:
    # it must give the builder's ids, one per character outside the special and tag tokens.
    loaded, fresh = AutoTokenizer.from_pretrained(built[0]), tiny.build_tokenizer()
    ids = loaded(text, add_special_tokens=False)["input_ids"]
    assert ids == fresh(text, add_special_tokens=False)["input_ids"]
    assert loaded.decode(ids) == text


def test_tags_and_specials_are_single_tokens(built):
    tok = AutoTokenizer.from_pretrained(built[0])
    for t in ["<think>", "</think>", "<answer>", "</answer>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]:
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1, t
    digits = tok("x^2-11x+24", add_special_tokens=False)["input_ids"]
    assert len(digits) == len("x^2-11x+24")
    # The tags survive skip_special_tokens (the rewards parse them); the specials do not.
    ids = tok("<think>1+1=2</think><answer>2</answer><|im_end|>", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "<think>1+1=2</think><answer>2</answer>"


def test_chat_template(built):
    tok = AutoTokenizer.from_pretrained(built[0])
    text = render_prompt(tok, "Solve 6+8", DEFAULT_SYSTEM_PROMPT)
    assert text == (f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
                    "<|im_start|>user\nSolve 6+8<|im_end|>\n<|im_start|>assistant\n")
    no_gen = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert no_gen == "<|im_start|>user\nhi<|im_end|>\n"


def test_generation_runs(built):
    tok = AutoTokenizer.from_pretrained(built[0])
    model = AutoModelForCausalLM.from_pretrained(built[0])
    enc = tok([render_prompt(tok, "Solve 1+2"), render_prompt(tok, "Expand (x+1)*(x+2)")], return_tensors="pt",
              padding=True, padding_side="left")
    gen = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[0] == 2 and enc["input_ids"].shape[1] < gen.shape[1] <= enc["input_ids"].shape[1] + 5


def test_shared_prefix_loss_matches_full_forward():
    tok = tiny.build_tokenizer()
    model = tiny.build_model(tok, hidden_size=32, num_layers=2, num_heads=2, seed=1)
    rows = make_eval_set({"arithmetic": 1, "polynomial": 1}, [1, 2], 6, seed=3)
    prefix, rest, labels = tiny.encode_batch(tok, rows)
    assert prefix.shape[1] > 100  # the system prompt is shared
    loss = tiny.shared_prefix_loss(model, prefix, rest, labels)
    full = torch.cat([prefix.expand(len(rows), -1), rest], 1)
    full_labels = torch.cat([torch.full_like(prefix.expand(len(rows), -1), -100), labels], 1)
    logits = model(input_ids=full).logits
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), full_labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    # The labels are exactly the completions and EOS.
    for b, row in enumerate(rows):
        target = tok.decode(labels[b][labels[b] >= 0])
        assert target == tiny.completion_text(row) + "<|im_end|>"


def test_teacher_stream_slips_only_answers_of_carries():
    problems = lambda: ProblemStream({"arithmetic": 1}, [1, 2], seed=5)  # noqa: E731
    clean = problems().take(400)
    teacher = tiny.TeacherStream(problems(), trace="column", slip_rate=0.5, seed=5)
    worked = teacher.take(400)
    assert [w["prompt"] for w in worked] == [c["prompt"] for c in clean]  # the same questions
    wrong = [w for w, c in zip(worked, clean) if w["answer"] != c["answer"]]
    assert len(wrong) == teacher.slipped and 0.1 * len(worked) < len(wrong) < 0.4 * len(worked)
    for w in wrong:  # a slip drops a carry or borrow: the answer is off by a multiple of ten
        c = next(c for c in clean if c["prompt"] == w["prompt"])
        assert (int(w["answer"]) - int(c["answer"])) % 10 == 0
    # The same seed replays the same demonstrations; plain traces are the generator's own.
    assert tiny.TeacherStream(problems(), slip_rate=0.5, seed=5).take(400) == worked
    assert tiny.TeacherStream(problems(), trace="plain").take(400) == clean
    with pytest.raises(ValueError, match="slip_rate"):
        tiny.TeacherStream(problems(), trace="plain", slip_rate=0.1)


@pytest.mark.parametrize("completion, answer, ok", [
    ("<think>6+8=14</think><answer>14</answer>", "14", True),
    ("<answer>1</answer> <answer> 1 4 </answer>", "14", True),   # the last answer counts, spaces ignored
    ("<think>14</think>14", "14", False),
    ("<answer>-14</answer>", "14", False),
    ("<answer>x^2+3x+2</answer>", "x^2+3x+2", True),
])
def test_is_correct(completion, answer, ok):
    assert tiny.is_correct(completion, answer) is ok


def test_evaluate_counts_a_perfect_oracle(monkeypatch):
    rows = make_eval_set({"arithmetic": 1}, 1, 3, seed=0)
    tok = tiny.build_tokenizer()
    answers = {render_prompt(tok, r["prompt"]): tiny.completion_text(r) for r in rows}
    calls = []

    def oracle_generate(model, tokenizer, prompts, *, num_samples, **kw):
        # Each prompt's right completion, as many times as asked (greedy: once).
        calls.append(num_samples)
        return [answers[p] for p in prompts for _ in range(max(num_samples, 1))]

    monkeypatch.setattr(tiny, "_generate", oracle_generate)
    result = tiny.evaluate(torch.nn.Module(), tok, rows, num_samples=4)
    assert calls == [0, 4]
    assert result["all"]["greedy_accuracy"] == 1.0 and result["all"]["pass_at_4"] == 1.0
    assert result["arithmetic"]["mixed_groups"] == 0.0 and result["arithmetic"]["n"] == 3


@pytest.mark.skipif(not (ASSETS / "build_info.json").exists(), reason="the tiny model is not built yet")
def test_committed_assets_load_and_match_build_info():
    info = json.loads((ASSETS / "build_info.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(ASSETS)
    tok = AutoTokenizer.from_pretrained(ASSETS)
    assert sum(p.numel() for p in model.parameters()) == info["num_parameters"]
    for key, value in info["model"].items():
        assert getattr(model.config, key) == value, key
    # The recorded command is the one that built these files: its flags match what was recorded.
    prog, argv = "python -m grpo_scale.tiny ", info["command"]
    assert argv.startswith(prog)
    args = tiny.parse_args(shlex.split(argv[len(prog):]))
    assert (args.seed, args.steps, args.batch_size, args.lr) == (info["seed"], info["steps_requested"],
                                                                info["batch_size"], info["lr"])
    assert args.task_mix == info["task_mix"] and args.task_level == info["task_level"]
    assert info["steps"] == info["steps_requested"], "the committed build stopped on its time limit"
    assert info["problems_seen"] >= info["steps"] * info["batch_size"]
    assert info["excluded_eval"]["size"] >= info["evaluation"]["eval_size"]
    # The warm start leaves room for GRPO: some skill per family, and sampling that finds more.
    evaluation, k = info["evaluation"], info["evaluation"]["num_samples"]
    for task in info["task_mix"]:
        stats = evaluation[task]
        assert 0.05 <= stats["greedy_accuracy"] <= 0.5, (task, stats)
        assert stats[f"pass_at_{k}"] > 1.5 * stats["greedy_accuracy"] and stats["mixed_groups"] > 0.2, (task, stats)
    assert tok.chat_template and tok.eos_token_id == model.config.eos_token_id
    assert sum(f.stat().st_size for f in ASSETS.iterdir()) < 15 * 2**20
