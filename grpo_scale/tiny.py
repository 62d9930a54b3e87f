"""The embedded tiny model: a character-level Qwen2 warm-started on synthetic math, small enough for a CPU.

It exists so the whole GRPO trainer runs, learns and is tested without a GPU or the Hub. The builder

    python -m grpo_scale.tiny --output_dir grpo_scale/assets/tiny-math

1. builds a character-level tokenizer (every printable ASCII character is a token; ChatML specials;
   the four format tags are single tokens so completions stay short) with a Qwen-style chat template;
2. builds a small ``Qwen2ForCausalLM`` (fp32, tied embeddings);
3. warm-starts it with a short supervised phase (plain PyTorch, AdamW, loss on completion tokens only)
   on ``ProblemStream`` problems that never include a question of the held-out evaluation set: the
   target is ``<think>{solution}</think><answer>{answer}</answer><|im_end|>`` after the rendered prompt;
4. saves model + tokenizer (``save_pretrained``, safetensors) and ``build_info.json`` (command, settings,
   steps, wall time, measured held-out accuracies), loadable by plain ``from_pretrained``.

The demonstrations come from an imperfect teacher (``TeacherStream``): two-operand problems are worked
column by column (units, then tens with the carry or borrow), and the teacher drops ``slip_rate`` of
the carries, writing the answer its slipped trace gives. The model learns the method and learns to
apply it unreliably: greedy decoding often follows the slip, sampling often does not, so groups of
samples hold right and wrong answers and a correctness reward (GRPO) can teach what imitation could
not. The held-out answers are never shown; only some demonstrated answers are wrong, on purpose.
Everything is seeded and step-budgeted, so the command reproduces the committed files.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import random
import shlex
import sys
import time
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import DynamicCache, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from grpo_scale.rewards import extract_answer
from grpo_scale.tasks import DEFAULT_SYSTEM_PROMPT, ProblemStream, make_eval_set, render_prompt
from grpo_scale.tasks.column import with_column_solution
from grpo_scale.tasks.column import with_column_solution
from grpo_scale.tasks.synthetic import normalize_mix

PAD, IM_START, EOS = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
TAGS = ("<think>", "</think>", "<answer>", "</answer>")
# Qwen's pre-tokenizer split; with no merges it only decides where words break, never the tokens.
_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")


def _byte_symbols() -> dict[str, int]:
    """Byte-level symbol -> byte value (GPT-2's table: visible bytes stand for themselves, the other
    bytes, space and newline among them, for chr(256 + n) in byte order)."""
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
               *range(ord("\u00ae"), ord("\u00ff") + 1)]
    hidden = [b for b in range(256) if b not in visible]
    return {chr(b): b for b in visible} | {chr(256 + n): b for n, b in enumerate(hidden)}


_BYTE_OF = _byte_symbols()

# Qwen's ChatML layout, without Qwen's default system message (render_prompt adds ours).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Evaluation questions the warm start must never see: every held-out set the trainer draws with
# eval_seed 0 and up to this many problems is a prefix of this one (see make_eval_set).
EXCLUDED_EVAL_SIZE = 1000
EVAL_SEED = 0


# ----------------------------------------------------------------------------- tokenizer and model
def build_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer in Qwen2's byte-level layout, without merges.

    Ids 0-2 are the ChatML specials, 3-6 the format tags, then one id per byte (the 256 byte-level
    symbols: every printable ASCII character is its own token, and any other text still encodes).
    The pipeline (NFC, Qwen's split, ByteLevel) is the one ``Qwen2Tokenizer`` rebuilds when
    ``AutoTokenizer`` loads a ``qwen2`` checkpoint, so both loading paths give the same ids.
    """
    specials = [PAD, IM_START, EOS]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda ch: _BYTE_OF[ch])
    vocab = {tok: i for i, tok in enumerate(specials + list(TAGS) + alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    # Tags are added but not special: decoding with skip_special_tokens keeps them for the rewards.
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAGS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOS, pad_token=PAD, additional_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE, model_max_length=512, padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def build_model(tokenizer, *, hidden_size: int = 128, num_layers: int = 4, num_heads: int = 4,
                intermediate_size: int | None = None, max_positions: int = 512, seed: int = 0) -> Qwen2ForCausalLM:
    """A randomly initialised fp32 Qwen2 with tied embeddings, vocabulary = the tokenizer's."""
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=max_positions, rope_theta=10_000.0, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).float()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model


def completion_text(row: dict) -> str:
    """The supervised target for one problem (without the EOS token)."""
    return f"<think>{row['solution']}</think><answer>{row['answer']}</answer>"


class TeacherStream:
    """The warm start's demonstrations: problems from ``stream``, worked by an imperfect teacher.

    ``trace="column"`` rewrites two-operand arithmetic as column-method traces (units first, then the
    tens with its carry or borrow: see ``grpo_scale.tasks.column``); other rows keep their solution.
    With ``slip_rate`` > 0 the teacher drops the carry or borrow of that fraction of the problems that
    have one, and its answer follows the slipped trace. The questions are the stream's (never a
    held-out one); only the demonstrated answers can be wrong. Seeded: a pure function of the stream.
    """

    def __init__(self, stream: ProblemStream, *, trace: str = "column", slip_rate: float = 0.0, seed: int = 0):
        if trace not in ("column", "plain"):
            raise ValueError(f"trace must be 'column' or 'plain', got {trace!r}")
        if not 0.0 <= slip_rate <= 1.0 or (slip_rate and trace != "column"):
            raise ValueError(f"slip_rate ({slip_rate}) must be in [0, 1], and 0 unless trace='column'")
        self.stream, self.trace, self.slip_rate = stream, trace, slip_rate
        self._rng = random.Random(f"grpo-scale-teacher-{seed}")
        self.slipped = 0

    @property
    def position(self) -> int:
        return self.stream.position

    def take(self, n: int) -> list[dict]:
        rows = self.stream.take(n)
        if self.trace == "plain":
            return rows
        worked = [with_column_solution(r, self._rng, self.slip_rate) for r in rows]
        self.slipped += sum(w["answer"] != r["answer"] for w, r in zip(worked, rows))
        return worked


# ----------------------------------------------------------------------------- supervised warm start
def encode_batch(tokenizer, rows: list[dict], system_prompt: str | None = DEFAULT_SYSTEM_PROMPT):
    """Token ids for a batch, split into the prefix every row shares and the per-row rest.

    Returns ``prefix`` [1, P], ``rest`` [B, S] (right-padded) and ``labels`` [B, S], where
    ``labels[b, j]`` is the token that position ``P + j`` must predict: completion tokens and EOS,
    -100 for prompt and padding positions.
    """
    prompts = [tokenizer(render_prompt(tokenizer, r["prompt"], system_prompt), add_special_tokens=False)["input_ids"]
               for r in rows]
    targets = [tokenizer(completion_text(r), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
               for r in rows]
    # Shared prefix: at most the shortest prompt minus one token, so each row's last prompt token
    # (which predicts the first completion token) sits in the per-row part.
    first, shared = prompts[0], min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        shared = next((i for i in range(shared) if p[i] != first[i]), shared)
    seqs = [p[shared:] + t for p, t in zip(prompts, targets)]
    width = max(len(s) for s in seqs)
    rest = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for b, (p, t, s) in enumerate(zip(prompts, targets, seqs)):
        rest[b, :len(s)] = torch.tensor(s)
        start = len(p) - shared - 1  # position whose next token is the first completion token
        labels[b, start:start + len(t)] = torch.tensor(t)
    return torch.tensor([first[:shared]]), rest, labels


def _cache_argument(model) -> str:
    """The forward's name for the key/value cache: ``cache`` in newer transformers, else ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.model.forward).parameters else "past_key_values"


def shared_prefix_loss(model, prefix: torch.Tensor, rest: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled tokens, running the shared prefix once.

    The system prompt is most of every sequence; encoding it once (batch 1) and broadcasting its
    key/value cache to the batch gives the same logits and gradients as the full batch, about 5x faster
    on a CPU. Padding sits at the right end of ``rest``, after every labelled token, so the causal mask
    alone keeps it out of the labelled positions.
    """
    cache = DynamicCache(config=model.config)
    name = _cache_argument(model)
    model.model(input_ids=prefix, use_cache=True, **{name: cache})  # fills the cache: [1, heads, P, head_dim]
    cache.batch_repeat_interleave(rest.shape[0])  # -> [B, heads, P, head_dim], gradients flow back to 1
    logits = model(input_ids=rest, use_cache=True, **{name: cache}).logits  # [B, S, V]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def warm_start(model, tokenizer, stream, *, steps: int, batch_size: int = 64, lr: float = 2e-3,
               warmup_steps: int = 50, weight_decay: float = 0.01, max_seconds: float | None = None,
               log_every: int = 50, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> list[dict]:
    """Supervised training on ``batch_size`` fresh problems per step; returns the logged losses.

    AdamW with linear warm-up and cosine decay to 10% of ``lr``. Stops before ``steps`` only if
    ``max_seconds`` runs out (the last log entry then shows fewer steps): a step budget, not a time
    budget, is what reproduces the same weights.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps ({steps}) and batch_size ({batch_size}) must be >= 1")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < warmup_steps:
            return lr * (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(steps - warmup_steps, 1)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    model.train()
    log, start, running = [], time.perf_counter(), 0.0
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = shared_prefix_loss(model, *encode_batch(tokenizer, stream.take(batch_size), system_prompt))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running += loss.item()
        elapsed = time.perf_counter() - start
        done = step + 1 == steps or (max_seconds is not None and elapsed > max_seconds)
        if (step + 1) % log_every == 0 or done:
            n = (step % log_every) + 1
            log.append({"step": step + 1, "loss": running / n, "lr": lr_at(step), "seconds": round(elapsed, 1)})
            print(f"step {step + 1}/{steps}  loss {running / n:.4f}  {elapsed:.0f}s", flush=True)
            running = 0.0
        if done:
            break
    model.eval()
    return log


# ----------------------------------------------------------------------------- evaluation
def is_correct(completion: str, answer: str) -> bool:
    """The last <answer> block equals ``answer`` as text, spaces ignored (the build's own check; the
    trainer judges with ``correctness_reward``)."""
    got = extract_answer(completion)
    return got is not None and got.replace(" ", "") == answer.replace(" ", "")


@torch.no_grad()
def _generate(model, tokenizer, prompts: list[str], *, num_samples: int, temperature: float,
              max_new_tokens: int, batch_size: int) -> list[str]:
    """Completions, ``num_samples`` per prompt in prompt order (greedy when num_samples == 0 -> 1)."""
    greedy = num_samples == 0
    per_prompt = max(num_samples, 1)
    out = []
    step = max(batch_size // per_prompt, 1)
    for i in range(0, len(prompts), step):
        enc = tokenizer(prompts[i:i + step], return_tensors="pt", padding=True, padding_side="left",
                        add_special_tokens=False)
        sampling = {} if greedy else {"temperature": temperature, "top_k": 0, "top_p": 1.0}
        gen = model.generate(**enc, do_sample=not greedy, num_return_sequences=per_prompt,
                             max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, **sampling)
        out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


def evaluate(model, tokenizer, rows: list[dict], *, num_samples: int = 8, temperature: float = 1.0,
             max_new_tokens: int = 64, batch_size: int = 256, seed: int = 0,
             system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> dict:
    """Greedy accuracy and sampled pass@k, overall and per task family.

    For each family (and ``"all"``): ``greedy_accuracy``; with ``num_samples`` k > 0 also
    ``sample_accuracy`` (mean over the k samples), ``pass_at_k`` (any of k right) and
    ``mixed_groups`` (fraction of questions whose k samples hold both a right and a wrong answer:
    those are the questions on which GRPO has a signal). Sampling is plain temperature sampling
    (no top-k/top-p), seeded.
    """
    if not rows:
        raise ValueError("evaluate needs at least one row")
    prompts = [render_prompt(tokenizer, r["prompt"], system_prompt) for r in rows]
    kwargs = dict(temperature=temperature, max_new_tokens=max_new_tokens, batch_size=batch_size)
    model.eval()
    greedy = _generate(model, tokenizer, prompts, num_samples=0, **kwargs)
    per_row = [{"task": r["task"], "greedy": is_correct(g, r["answer"])} for r, g in zip(rows, greedy)]
    if num_samples > 0:
        torch.manual_seed(seed)
        samples = _generate(model, tokenizer, prompts, num_samples=num_samples, **kwargs)
        for i, (r, item) in enumerate(zip(rows, per_row)):
            item["right"] = sum(is_correct(s, r["answer"]) for s in samples[i * num_samples:(i + 1) * num_samples])
    result = {}
    for task in ["all"] + sorted({r["task"] for r in rows}):
        items = [x for x in per_row if task in ("all", x["task"])]
        stats = {"n": len(items), "greedy_accuracy": sum(x["greedy"] for x in items) / len(items)}
        if num_samples > 0:
            stats["sample_accuracy"] = sum(x["right"] for x in items) / (len(items) * num_samples)
            stats[f"pass_at_{num_samples}"] = sum(x["right"] > 0 for x in items) / len(items)
            stats["mixed_groups"] = sum(0 < x["right"] < num_samples for x in items) / len(items)
        result[task] = {k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items()}
    result["examples"] = [{"prompt": r["prompt"], "answer": r["answer"], "greedy": g}
                          for r, g in list(zip(rows, greedy))[:4]]
    return result


def print_eval(result: dict, label: str) -> None:
    for task, stats in result.items():
        if task != "examples":
            print(f"[{label}] {task}: " + "  ".join(f"{k} {v}" for k, v in stats.items()), flush=True)


# ----------------------------------------------------------------------------- command line
def _parse_mix(text: str) -> dict[str, float]:
    """'arithmetic=3,polynomial=1' -> {'arithmetic': 3.0, 'polynomial': 1.0}."""
    mix = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        mix[name.strip()] = float(weight or 1)
    normalize_mix(mix)  # raises ValueError on unknown tasks or bad weights
    return mix


def _parse_levels(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m grpo_scale.tiny", description=__doc__.split("\n")[0])
    p.add_argument("--output_dir", required=True, help="where model, tokenizer and build_info.json go")
    p.add_argument("--seed", type=int, default=0, help="seeds initialisation, data stream and sampling")
    p.add_argument("--task_mix", type=_parse_mix, default="arithmetic=1", help="e.g. arithmetic=3,polynomial=1")
    p.add_argument("--task_level", type=_parse_levels, default="2", help="difficulty level(s), e.g. 2 or 1,2")
    p.add_argument("--trace", choices=("column", "plain"), default="column",
                   help="worked solutions of two-operand arithmetic: column method or the generator's own")
    p.add_argument("--slip_rate", type=float, default=0.6,
                   help="fraction of carries/borrows the teacher drops (column traces only)")
    p.add_argument("--steps", type=int, default=1000, help="supervised optimiser steps")
    p.add_argument("--batch_size", type=int, default=64, help="problems per step (each one fresh)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup_steps", type=int, default=30)
    p.add_argument("--hidden_size", type=int, default=128)
    p.add_argument("--num_layers", type=int, default=4)
    p.add_argument("--num_heads", type=int, default=4)
    p.add_argument("--intermediate_size", type=int, default=None, help="default 4 * hidden_size")
    p.add_argument("--max_minutes", type=float, default=None,
                   help="safety stop for the supervised phase (build_info records the steps done)")
    p.add_argument("--eval_size", type=int, default=256, help="held-out problems measured after the build; 0: skip")
    p.add_argument("--num_samples", type=int, default=8, help="samples per question for pass@k; 0: greedy only")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--exclude_eval_size", type=int, default=EXCLUDED_EVAL_SIZE,
                   help="the warm start never sees make_eval_set(task_mix, task_level, this, eval_seed=0); "
                        "lower it only for task levels with few distinct questions")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 1 keeps the floating-point reduction order, hence the weights, the "
                        "same on every machine, and loses little on matrices this small")
    args = p.parse_args(argv)
    if args.eval_size > args.exclude_eval_size:
        p.error(f"--eval_size ({args.eval_size}) must be <= --exclude_eval_size ({args.exclude_eval_size}): "
                "the measured held-out set must be one the warm start never saw")
    return args


def build(args: argparse.Namespace, command: str) -> dict:
    """Builds, trains, evaluates and saves the tiny model as ``args`` say; returns build_info."""
    t0 = time.perf_counter()
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, hidden_size=args.hidden_size, num_layers=args.num_layers,
                        num_heads=args.num_heads, intermediate_size=args.intermediate_size, seed=args.seed)
    try:
        excluded = make_eval_set(args.task_mix, args.task_level, args.exclude_eval_size, seed=EVAL_SEED)
    except ValueError as err:
        raise ValueError(f"{err} (the questions the warm start must avoid): lower --exclude_eval_size, "
                         "raise --task_level or change --task_mix") from err
    problems = ProblemStream(args.task_mix, args.task_level, args.seed, exclude=[r["prompt"] for r in excluded])
    stream = TeacherStream(problems, trace=args.trace, slip_rate=args.slip_rate, seed=args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params:,}  task_mix {args.task_mix}  level {args.task_level}", flush=True)

    t_train = time.perf_counter()
    log = warm_start(model, tokenizer, stream, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                     warmup_steps=args.warmup_steps,
                     max_seconds=args.max_minutes * 60 if args.max_minutes else None)
    train_seconds = time.perf_counter() - t_train

    evaluation = None
    if args.eval_size > 0:
        rows = make_eval_set(args.task_mix, args.task_level, args.eval_size, seed=EVAL_SEED)
        evaluation = evaluate(model, tokenizer, rows, num_samples=args.num_samples,
                              max_new_tokens=args.max_new_tokens, seed=args.seed)
        print_eval(evaluation, "held-out")

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    info = {
        "command": command,
        "seed": args.seed,
        "task_mix": args.task_mix,
        "task_level": args.task_level,
        "system_prompt": DEFAULT_SYSTEM_PROMPT,
        "excluded_eval": {"size": args.exclude_eval_size, "eval_seed": EVAL_SEED},
        "steps_requested": args.steps,
        "steps": log[-1]["step"],
        "problems_seen": stream.position,
        "trace": args.trace,
        "slip_rate": args.slip_rate,
        "demonstrations_slipped": stream.slipped,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "lr": args.lr,
        "warmup_steps": args.warmup_steps,
        "num_parameters": n_params,
        "model": {k: getattr(model.config, k) for k in
                  ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")},
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "final_loss": round(log[-1]["loss"], 4),
        "loss_log": log,
        "evaluation": evaluation and {"eval_size": args.eval_size, "eval_seed": EVAL_SEED, "greedy": True,
                                      "num_samples": args.num_samples, "temperature": 1.0,
                                      "max_new_tokens": args.max_new_tokens, **evaluation},
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
    }
    (out / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"saved to {out} in {info['wall_seconds']:.0f}s", flush=True)
    return info


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args, threads = parse_args(argv), torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return build(args, "python -m grpo_scale.tiny " + " ".join(shlex.quote(a) for a in argv))
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
