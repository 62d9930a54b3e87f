"""Held-out evaluation, shared by the trainer and the command line.

    python -m grpo_scale.evaluate --model outputs/smollm2-135m-math/final --n 128
    python -m grpo_scale.evaluate --model embedded:smollm2-135m-instruct --config configs/smollm2-135m-math.yaml
    python -m grpo_scale.evaluate --model DIR --dataset_path data.jsonl --num_samples 8 --output eval.json

Each held-out prompt is answered greedily (``--num_samples k`` > 1: k samples at the config's temperature,
top-p and top-k, and pass@k) and scored three ways:

- ``accuracy`` (strict): the ``correctness`` reward, the answer block in simplest form;
- ``accuracy_lenient``: the ``correctness_lenient`` reward, the arithmetic regardless of the format;
- ``format_rate``: the ``format`` reward;

with ``completion_length`` (mean tokens, EOS included) beside them, overall and per task family and level
(``accuracy/arithmetic/level1``). The trainer's before and after figures come from ``run`` with the
same batching (``eval_batch_size`` prompts per generate call), so on one process this command reproduces a
run's ``eval_accuracy_after`` exactly when given the run's config (the command reads the run's
``summary.json`` next to ``final/`` when ``--config`` is not given). For a LoRA run, give ``adapter/``:
``final/`` holds the merged weights, whose rounding differs from the adapter's, so a greedy answer can
differ. A multi-process run splits the held-out set over its ranks, so its batches, and rarely its greedy
answers, differ from one process's.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import torch

from grpo_scale import rewards
from grpo_scale.rollout import generate
from grpo_scale.tasks.prompts import open_reply, user_question

logger = logging.getLogger("grpo_scale")

SCORES = ("strict", "lenient", "format")
METRIC_OF = {"strict": "accuracy", "lenient": "accuracy_lenient", "format": "format_rate"}


def score(prompt, completion: str, answer) -> dict | None:
    """One completion's scores (1.0 or 0.0 each), or None when the expected answer is unreadable."""
    strict = rewards.correctness_reward([prompt], [completion], [answer])[0]
    if strict is None:
        return None
    return {"strict": strict,
            "lenient": rewards.correctness_lenient_reward([prompt], [completion], [answer])[0],
            "format": rewards.format_reward([prompt], [completion])[0]}


def groups_of(row: dict) -> list[str]:
    """The report groups a row counts in: all, its task family, its family and level."""
    out = ["all"]
    if row.get("task") is not None:
        out.append(str(row["task"]))
        if row.get("level") is not None:
            out.append(f"{row['task']}/level{row['level']}")
    return out


class Tally:
    """Sums per group (count, each score, pass@k, completion tokens), as one tensor so that processes can
    add theirs with one all-reduce. The groups come from all held-out rows, so every process has the same."""

    FIELDS = ("n", *SCORES, "pass", "length")

    def __init__(self, all_rows: list[dict]):
        self.groups = sorted({g for r in all_rows for g in groups_of(r)}, key=lambda g: (g != "all", g))
        self.sums = torch.zeros(len(self.groups), len(self.FIELDS), dtype=torch.float64)

    def add(self, row: dict, scores: list[dict], lengths: list[int]) -> None:
        k = len(scores)
        values = [1.0] + [sum(s[name] for s in scores) / k for name in SCORES] + \
                 [float(any(s["strict"] for s in scores)), sum(lengths) / k]
        for g in groups_of(row):
            self.sums[self.groups.index(g)] += torch.tensor(values, dtype=torch.float64)

    def result(self, num_samples: int = 1) -> dict:
        """``accuracy``, ``accuracy_lenient``, ``format_rate``, ``completion_length`` and ``n`` overall, and
        the three rates per group as ``METRIC/GROUP``; with samples, ``pass@k`` too. Groups without a
        scorable row are left out; with none at all, every figure is None."""
        out: dict = {}
        for i, g in enumerate(self.groups):
            n = float(self.sums[i, 0])
            if n == 0:
                continue
            row = {f: float(self.sums[i, j]) / n for j, f in enumerate(self.FIELDS)}
            suffix = "" if g == "all" else f"/{g}"
            for name in SCORES:
                out[METRIC_OF[name] + suffix] = row[name]
            if num_samples > 1:
                out[f"pass@{num_samples}{suffix}"] = row["pass"]
            if g == "all":
                out["completion_length"] = row["length"]
                out["n"] = int(n)
        if "accuracy" not in out:
            out = {"accuracy": None, "accuracy_lenient": None, "format_rate": None, "completion_length": None, "n": 0}
        return out


@torch.no_grad()
def run(model, tokenizer, rows: list[dict], render, *, all_rows: list[dict] | None = None, batch_size: int,
        max_prompt_length: int | None, max_new_tokens: int, assistant_prefix: str = "", num_samples: int = 1,
        temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, reduce=None, records: list | None = None,
        progress: bool = False) -> dict:
    """Answer ``rows`` (this process's share; ``all_rows`` is everyone's) and score them.

    ``render`` turns rows into prompt strings (the trainer's ``_render``: chat template and system prompt).
    ``reduce(tensor)`` sums across processes (None: one process). ``records``, when given, receives one dict
    per row: question, expected answer, completions and their scores. Rows without a readable expected
    answer are left out of every figure."""
    tally = Tally(all_rows if all_rows is not None else rows)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(rows), desc="eval", file=sys.stderr)
    for start in range(0, len(rows), batch_size):
        chunk = [{**r, "prompt": open_reply(r["prompt"], assistant_prefix)} for r in rows[start:start + batch_size]]
        prompts = [p for p in render(chunk) for _ in range(num_samples)]
        ro = generate(model, tokenizer, prompts, max_prompt_length=max_prompt_length, max_new_tokens=max_new_tokens,
                      do_sample=num_samples > 1, temperature=temperature, top_p=top_p, top_k=top_k,
                      share_prompt=False)  # held-out questions are distinct; samples share little at this size
        lengths = ro.attention_mask.sum(1).tolist()
        for i, r in enumerate(chunk):
            texts = ro.completions[i * num_samples:(i + 1) * num_samples]
            scores = [score(r["prompt"], t, r.get("answer")) for t in texts]
            if scores[0] is not None:
                tally.add(r, scores, lengths[i * num_samples:(i + 1) * num_samples])
            if records is not None:
                records.append({"question": user_question(r["prompt"]), "answer": r.get("answer"),
                                "task": r.get("task"), "level": r.get("level"), "completions": texts,
                                "scores": scores if scores[0] is not None else None})
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    if reduce is not None:
        tally.sums = reduce(tally.sums)
    return tally.result(num_samples)


# ----------------------------------------------------------------------------- command line
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m grpo_scale.evaluate",
        description="Held-out accuracy (strict and lenient), format rate and completion length of a model, "
                    "per task family and level; the trainer's evaluation, callable on its own.")
    p.add_argument("--model", required=True, help="a model folder (a run's final/), an adapter folder (a run's "
                   "adapter/), a .gguf file, a Hub name or embedded:NAME")
    p.add_argument("--config", help="the YAML whose task, prompt and generation settings to use (default: the "
                   "run's own, from summary.json beside the model folder, else configs/tiny-math.yaml)")
    p.add_argument("--n", type=int, help="held-out problems (eval_size; default: the config's)")
    p.add_argument("--num_samples", type=int, default=1, help="k samples per problem at the config's temperature "
                   "and pass@k (default 1: greedy)")
    p.add_argument("--output", help="write the figures and every answer to this JSON file")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="a progress bar")
    p.epilog = ("Any other option is a config field, as for train.py: --task_level 1,2, --dataset_path FILE, "
                "--eval_dataset_path FILE, --system_prompt TEXT, --assistant_prefix TEXT, --eval_seed N, "
                "--eval_batch_size N, --max_completion_length N, ...")
    return p


def _run_config(model: str) -> dict | None:
    """The config a run was trained with: summary.json in the folder above ``final/`` or ``adapter/``."""
    folder = Path(model)
    if not folder.is_dir():  # embedded:NAME, a .gguf file, a Hub name: no run folder around it
        return None
    for summary in (folder.parent / "summary.json", folder / "summary.json"):
        if summary.is_file():
            try:
                return json.loads(summary.read_text(encoding="utf-8")).get("config")
            except (OSError, ValueError):
                return None
    return None


def main(argv: list[str] | None = None) -> int:
    import tempfile

    from grpo_scale.config import ConfigError, load_config

    args, overrides = _parser().parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    records: list = []
    try:
        stored = None if args.config else _run_config(args.model)
        if stored:
            logger.info("task, prompt and generation settings: the run's own (summary.json beside %s)", args.model)
        cfg = load_config((["--config", args.config] if args.config else []) + overrides, base=stored)
        cfg.model_name_or_path = args.model
        cfg.resume_from_checkpoint = None
        if args.n is not None:
            if args.n < 1:
                raise ConfigError(f"--n must be at least 1, got {args.n}")
            cfg.eval_size = args.n
        if args.num_samples < 1:
            raise ConfigError(f"--num_samples must be at least 1, got {args.num_samples}")
        from grpo_scale.trainer import GRPOTrainer
        with tempfile.TemporaryDirectory(prefix="grpo-eval-") as scratch:
            cfg.output_dir = scratch  # nothing is written; the accelerator wants a project folder
            trainer = GRPOTrainer(cfg)
            trainer.setup_for_eval()
            result = trainer.evaluate(num_samples=args.num_samples, records=records, progress=args.progress)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.output:
        Path(args.output).write_text(json.dumps({"model": args.model, "metrics": result, "answers": records},
                                                indent=1, allow_nan=False, default=_finite) + "\n")
        print(f"wrote {args.output}")
    return 0


def _finite(value):
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def format_table(result: dict) -> str:
    """The figures as a Markdown table: one row per group (all, each family, each family and level)."""
    groups = ["all"] + sorted({k.split("/", 1)[1] for k in result if k.startswith("accuracy/")})
    keys = ["accuracy", "accuracy_lenient", "format_rate"] + sorted(k for k in result if k.startswith("pass@") and "/" not in k)
    lines = ["| group | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for g in groups:
        cells = [result.get(k if g == "all" else f"{k}/{g}") for k in keys]
        lines.append(f"| {g} | " + " | ".join("" if v is None else f"{v:.3f}" for v in cells) + " |")
    length = result.get("completion_length")
    lines.append(f"\n{result.get('n', 0)} problems; mean completion length "
                 f"{'n/a' if length is None or math.isnan(length) else f'{length:.1f}'} tokens")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
