"""What every run leaves for a reader, written by rank 0 at the end: ``rewards.png`` (the reward curves and
held-out figures against the step) and ``samples.md`` (held-out prompts answered greedily before and after
training, side by side)."""
from __future__ import annotations

import math
from pathlib import Path

from grpo_scale.models import describe

CURVES = (("accuracy", "strict accuracy"), ("accuracy_lenient", "lenient accuracy"), ("format_rate", "format rate"))
STYLES = {"accuracy": "-", "accuracy_lenient": "--", "format_rate": ":"}  # lenient often equals strict: dashed on top


def key_settings(cfg) -> str:
    """The settings a reader needs to read a curve: model, loss, KL, learning rate, batch, seed."""
    batch = f"{cfg.per_device_train_batch_size}x{cfg.gradient_accumulation_steps} per process"
    return (f"{describe(cfg.model_name_or_path)} | {cfg.loss_type}, beta {cfg.beta:g}, lr {cfg.learning_rate:g}"
            f"{', LoRA r' + str(cfg.lora_r) if cfg.use_peft else ''} | G {cfg.num_generations}, {batch} | "
            f"seed {cfg.seed}")


def write_rewards_png(path: Path, history: list[dict], eval_history: list[dict], reward_names: list[str], cfg) -> None:
    """Mean reward per function (and the weighted total) against the step, left; held-out strict and
    lenient accuracy and format rate against the step, right; the run's key settings in the title."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    steps = [h["step"] for h in history]
    for name in reward_names:
        values = [h.get(f"reward/{name}", math.nan) for h in history]
        left.plot(steps, values, marker=".", label=name)
    left.plot(steps, [h.get("reward/mean", math.nan) for h in history], color="black", lw=2, label="total (weighted)")
    left.set(xlabel="step", ylabel="mean reward", title="training reward (logged windows)")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    ev = sorted((e for e in eval_history if e.get("accuracy") is not None), key=lambda e: e["step"])
    for key, label in CURVES:
        points = [(e["step"], e[key]) for e in ev if e.get(key) is not None]
        if points:
            right.plot(*zip(*points), marker="o", linestyle=STYLES[key], label=label)
    right.set(xlabel="step", ylabel="held-out (greedy)", ylim=(-0.02, 1.02),
              title=f"held-out, {ev[-1].get('n', 0) if ev else 0} problems")
    right.grid(alpha=0.3)
    if ev:
        right.legend(fontsize=8)
    fig.suptitle(key_settings(cfg), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cell(text) -> str:
    """Text inside a Markdown table cell, as code so that tags show as written: one line (newlines shown
    as \\n), pipes escaped."""
    text = "" if text is None else str(text)
    text = text.replace("\r", "").replace("\n", "\\n").replace("|", "\\|")
    return "`" + text.replace("`", "'") + "`" if text.strip() else "(empty)"


def _mark(scores) -> str:
    if not scores:
        return ""
    s = scores[0]
    return "correct" if s["strict"] else ("right number, wrong form" if s["lenient"] else "wrong")


def samples_markdown(before: list[dict], after: list[dict], summary: dict, cfg) -> str:
    """The same held-out prompts answered before and after training, greedy, as a Markdown table."""
    b, a = summary.get("eval_before") or {}, summary.get("eval_after") or {}

    def fig(d, k):
        v = d.get(k)
        return "n/a" if v is None else f"{v:.3f}"

    lines = [f"# Before and after GRPO: {describe(cfg.model_name_or_path)}", "",
             f"{key_settings(cfg)}; {summary.get('steps')} steps in {summary.get('wall_seconds', 0):.0f} s.", "",
             "| held-out (greedy) | before | after |", "|---|---|---|"]
    for key, label in CURVES:
        lines.append(f"| {label} | {fig(b, key)} | {fig(a, key)} |")
    lines += ["", f"System prompt: {_cell(cfg.system_prompt)}" if cfg.system_prompt else "No system prompt.",
              *([f"The reply is opened with `{cfg.assistant_prefix}`, shown in front of each answer."]
                if cfg.assistant_prefix else []), "",
              "| question | expected | before | after |", "|---|---|---|---|"]
    after_by_question = {r["question"]: r for r in after}
    for r in before:
        later = after_by_question.get(r["question"])
        if later is None:
            continue
        prefix = cfg.assistant_prefix or ""
        lines.append(f"| {_cell(r['question'])} | {_cell(r['answer'])} | "
                     f"{_cell(prefix + r['completions'][0])}<br>*{_mark(r['scores'])}* | "
                     f"{_cell(prefix + later['completions'][0])}<br>*{_mark(later['scores'])}* |")
    return "\n".join(lines) + "\n"


def write_reports(out: Path, trainer, summary: dict) -> list[Path]:
    """rewards.png and samples.md in ``out`` (rank 0 only; the caller checks). Returns the paths written."""
    written = []
    cfg = trainer.cfg
    if trainer.history or trainer.eval_history:
        write_rewards_png(out / "rewards.png", trainer.history, trainer.eval_history, trainer.reward_names, cfg)
        written.append(out / "rewards.png")
    before, after = trainer.eval_samples.get("before"), trainer.eval_samples.get("after")
    if before and after:
        (out / "samples.md").write_text(samples_markdown(before, after, summary, cfg), encoding="utf-8")
        written.append(out / "samples.md")
    return written
