"""End-to-end suite: GRPO steps of our trainer and of TRL's GRPOTrainer, same workload, stepped in turn.

Each side runs in its own process (benchmarks/e2e_worker.py) with the same GRPOConfig: model,
prompts and completions per step, maximum completion length, beta, learning rate, reward functions,
sampling (temperature, top-k 50), one process, and on the CPU one torch thread each. Sides:

- `ours`: our trainer as configured (each group's prompt run once: `share_prompt: true`);
- `ours-unshared`: the same with `share_prompt: false` (one full forward per completion, as TRL does),
  which shows how much of the difference the shared prompt makes;
- `trl`: TRL's GRPOTrainer, when installed;
- `ours-vllm`: ours with rollouts through vLLM colocated in the process (`use_vllm: true`; asked for with
  `--sides`, when vLLM is installed), weights synced every step.

The processes are stepped alternately (forward order, then reverse order, ...), one step at a time, so
that a load change on a shared machine hits all sides alike. The first `warmup` steps of each side are
not reported.

Rows: per side, the step time and its phases (s), steps/s, tokens/s (prompt + completion tokens of
every completion, however they were computed), peak memory, the reward of every measured step (the
curve), and the ratio of steps/s ours : TRL's. Then the memory comparison (`MEMORY_SIDES`, stepped in
turn the same way): peak memory and step time of a step with beta 0.04, full fine-tuning vs LoRA, and
their ratio. On the CPU the model is the embedded one; on a GPU, a
randomly initialised model with Qwen2.5-0.5B's shapes (`qwen2_5_0_5b_config`), with the embedded
model's tokenizer.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

from benchmarks.records import ROOT, Row, exact, measured, summarize

EMBEDDED = ROOT / "grpo_scale" / "assets" / "tiny-math"
PHASES = ("generation", "reward", "logps", "policy", "optimizer", "other")
TARGET_SPEEDUP = 4.0  # the target on the CPU with the embedded model (2.5 on a real model: REAL_MODEL_TARGET)
REAL_MODEL_TARGET = 2.5
SIDE_OVERRIDES = {"ours": [], "ours-unshared": ["--share_prompt", "false"], "trl": [],
                  "ours-vllm": ["--use_vllm", "true"]}
# The memory comparison: a step with a KL penalty (beta > 0), full fine-tuning (a second, frozen model as
# the reference, gradients and AdamW state for every weight) vs LoRA (adapters only; the reference is the
# same network with its adapters off)
MEMORY_SIDES = {"ours-full-beta": ["--beta", "0.04"], "ours-lora-beta": ["--beta", "0.04", "--use_peft", "true"]}
SIDE_OVERRIDES.update(MEMORY_SIDES)


def qwen2_5_0_5b_config() -> dict:
    """Qwen2.5-0.5B's architecture (its published config.json), for randomly initialised benchmarks."""
    return dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_act="silu", hidden_size=896,
        intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0, vocab_size=151936,
        tie_word_embeddings=True, attention_dropout=0.0, initializer_range=0.02, use_sliding_window=False,
        sliding_window=32768, max_window_layers=21, use_cache=True,
    )


def build_random_model(out_dir: str | Path, tokenizer_dir: str | Path, seed: int = 0, **overrides) -> Path:
    """Saves a randomly initialised Qwen2 model (Qwen2.5-0.5B's shapes unless overridden) and the
    tokenizer of `tokenizer_dir` to `out_dir`; returns it. Token ids beyond the tokenizer decode to
    nothing, and such a model rarely ends a completion early: every step generates the full length."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen2Config(**{**qwen2_5_0_5b_config(), **overrides}, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def trl_available() -> bool:
    return importlib.util.find_spec("trl") is not None and importlib.util.find_spec("datasets") is not None


class Worker:
    """A side's process and its line protocol."""

    def __init__(self, side: str, model: str, device: str, steps: int, overrides: list[str], log_dir: Path,
                 side_overrides: dict | None = None, threads: int = 1):
        self.side = side
        self.log_path = log_dir / f"e2e-{side}.log"
        cmd = [sys.executable, "-m", "benchmarks.e2e_worker", "--side", "trl" if side == "trl" else "ours",
               "--model", str(model), "--device", device, "--steps", str(steps), "--threads", str(threads), "--",
               *overrides, *(side_overrides or SIDE_OVERRIDES)[side]]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if not device.startswith("cuda") else None
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log_path.open("w"), text=True, env=env)

    def read(self, event: str) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            tail = self.log_path.read_text()[-2000:]
            raise RuntimeError(f"the {self.side} worker exited ({self.proc.returncode}) before '{event}':\n{tail}")
        message = json.loads(line)
        if message["event"] != event:
            raise RuntimeError(f"the {self.side} worker sent {message['event']!r}, expected {event!r}")
        return message

    def step(self) -> dict:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return self.read("step")

    def close(self) -> dict:
        self.proc.stdin.write("go\n")  # tear down now; the other side has finished its steps
        self.proc.stdin.flush()
        done = self.read("done")
        self.proc.wait()
        return done


def run_sides(sides: list[str], model: str, device: str, warmup: int, steps: int, overrides: list[str],
              log: Callable[[str], None] = print, side_overrides: dict | None = None, threads: int = 1) -> dict:
    """{side: {"steps": [measured step records], "done": final message}}, the sides stepped in turn.
    side_overrides: each side's config overrides (default SIDE_OVERRIDES), after ``overrides``."""
    log_dir = Path(tempfile.mkdtemp(prefix="grpo-e2e-"))
    workers = {}
    try:
        for side in sides:  # set up one at a time, so set-up does not overlap anything measured
            workers[side] = Worker(side, model, device, warmup + steps, overrides, log_dir, side_overrides, threads)
            workers[side].read("ready")
        records = {side: [] for side in sides}
        for i in range(warmup + steps):
            order = sides if i % 2 == 0 else sides[::-1]
            for side in order:
                record = workers[side].step()
                log(f"  {side:13s} step {i}: {record['step_s']:.2f} s, reward {record['reward']:.3f}"
                    f"{' (warm-up)' if i < warmup else ''}")
                if i >= warmup:
                    records[side].append(record)
        return {side: {"steps": records[side], "done": workers[side].close()} for side in sides}
    finally:
        for w in workers.values():
            if w.proc.poll() is None:
                w.proc.kill()


def _rows_of_side(side: str, steps: list[dict], base: dict, memory_note: str) -> list[Row]:
    """Step time and phases, rates, completion length, peak memory and the reward curve of one side."""
    def row(values, mode, metric, unit, note=""):
        joined = "; ".join(n for n in (base.get("note", ""), note) if n)
        return measured(values, **dict(base, provider=side, note=joined), mode=mode, metric=metric, unit=unit)

    rows = [row([s["step_s"] for s in steps], "step", "time", "s")]
    rows += [row([s["phases"][p] for s in steps], p, "time", "s") for p in PHASES]
    rows.append(row([1.0 / s["step_s"] for s in steps], "step", "steps_per_s", "1/s"))
    rows.append(row([s["tokens"] / s["step_s"] for s in steps], "step", "tokens_per_s", "tokens/s",
                    "prompt + completion tokens"))
    rows.append(row([s["completion_length"] for s in steps], "step", "completion_length", "tokens"))
    rows.append(row([s["peak_memory"] / 2**20 for s in steps], "step", "peak_memory", "MiB", memory_note))
    rows += [exact(s["reward"], **dict(base, provider=side), mode="step", step=i + 1, metric="reward_mean",
                   unit="reward") for i, s in enumerate(steps)]
    return rows


def memory_rows(device: str, quick: bool, model: str, name: str, memory_note: str, overrides: list[str],
                log: Callable[[str], None] = print, threads: int = 1) -> list[Row]:
    """Peak memory of one step with beta > 0, full fine-tuning vs LoRA (after a warm-up step, so AdamW's
    state exists), the step times, and the ratio LoRA : full."""
    warmup, steps = (1, 1) if quick else (1, 4)
    log("  memory: beta 0.04, full fine-tuning vs LoRA")
    results = run_sides(list(MEMORY_SIDES), model, device, warmup, steps, overrides, log, threads=threads)
    base = _base(name, results["ours-full-beta"]["done"]["settings"])
    rows, peaks = [], {}
    for side, r in results.items():
        peak = [s["peak_memory"] / 2**20 for s in r["steps"]]
        peaks[side] = summarize(peak)
        note = "; ".join([f"beta 0.04, {'LoRA (peft defaults)' if 'lora' in side else 'full fine-tuning'}",
                          memory_note])
        rows.append(measured(peak, **dict(base, provider=side, note=note), mode="step", metric="peak_memory",
                             unit="MiB"))
        rows.append(measured([s["step_s"] for s in r["steps"]], **dict(base, provider=side), mode="step",
                             metric="time", unit="s"))
    lora, full = peaks["ours-lora-beta"], peaks["ours-full-beta"]
    rows.append(Row(**dict(base, provider="lora/full"), mode="step", metric="peak_memory_ratio", unit="x",
                    median=lora["median"] / full["median"], q20=lora["q20"] / full["q80"],
                    q80=lora["q80"] / full["q20"], n=lora["n"], note="median peak memory, LoRA : full, beta 0.04"))
    return rows


def config_model(config: str) -> str:
    """The model_name_or_path of a config file (an `embedded:` name or a folder)."""
    from grpo_scale.config import load_config

    return load_config(["--config", str(config)]).model_name_or_path


def model_label(model: str | None) -> str:
    """The model's name in rows and file names: the folder's name, or the embedded name without `embedded:`."""
    if model is None:
        return EMBEDDED.name
    return model.split(":", 1)[1] if model.startswith("embedded:") else Path(model).name


def run_suite(device: str, quick: bool, model: str | None = None, with_trl: bool = True,
              overrides: list[str] | None = None, log: Callable[[str], None] = print,
              with_memory: bool = True, with_speed: bool = True, config: str | None = None,
              threads: int = 1, sides: list[str] | None = None, records_out: str | Path | None = None,
              steps: int | None = None) -> list[Row]:
    """Measures our trainer, and TRL's with the same settings when installed (and `with_trl`).
    config: a config file both sides read (default configs/tiny-math.yaml); its model unless `model`.
    threads: torch threads of each side on the CPU (the sides are stepped in turn, never at once).
    sides: the speed sides to run (default: ours, ours-unshared, and trl when installed).
    records_out: a JSON file for the speed sides' raw step records and settings (benchmarks/floors.py).
    steps: measured steps of each speed side (default 3 with quick, else 20 on a CPU and 8 on a GPU)."""
    cuda = device.startswith("cuda")
    warmup, default_steps = (1, 3) if quick else (2, 20 if not cuda else 8)
    steps = steps or default_steps
    # top-k 50 on every side whatever the config file says: the demo's sampling, the same on both.
    overrides = ["--top_k", "50", *(overrides or [])]
    if config is not None:
        overrides = ["--config", str(config), *overrides]
        model = model or config_model(config)
    if cuda:
        overrides = ["--loss_impl", "auto", "--max_completion_length", "256", *overrides]
    name = model_label(model)
    if model is None:
        if not EMBEDDED.is_dir():
            raise FileNotFoundError(f"the embedded model is missing at {EMBEDDED}: build it with "
                                    f"`python -m grpo_scale.tiny --output_dir {EMBEDDED}` or pass "
                                    "--model_name_or_path")
        model = str(EMBEDDED)
        if cuda:  # a real architecture's shapes, randomly initialised (no weights can be fetched)
            log("  building a random model with Qwen2.5-0.5B's shapes")
            model = str(build_random_model(tempfile.mkdtemp(prefix="qwen-0.5b-random-"), EMBEDDED))
            name = "qwen2.5-0.5b-random"
    memory_note = ("max_memory_allocated" if cuda else
                   "process resident set size, sampled every 2 ms (runtime and libraries included)")
    rows, skipped = [], []
    if with_speed:
        rows, skipped = speed_rows(device, quick, model, name, cuda, with_trl, warmup, steps, overrides,
                                   memory_note, log, threads, sides, records_out)
    if with_memory:
        rows += memory_rows(device, quick, model, name, memory_note, overrides, log, threads)
    return rows + skipped


def _base(name: str, settings: dict) -> dict:
    shape = (f"{name}: {settings['per_device_train_batch_size'] // settings['num_generations']} prompts x "
             f"{settings['num_generations']} completions, <= {settings['max_completion_length']} tokens")
    return dict(benchmark="e2e", shape=shape, dtype="bf16" if settings.get("bf16") else "fp32",
                level=settings["importance_sampling_level"])


def speed_rows(device, quick, model, name, cuda, with_trl, warmup, steps, overrides, memory_note, log, threads=1,
               sides=None, records_out=None):
    """Our trainer (prompt shared and not) and TRL's, stepped in turn: (rows, skipped rows)."""
    with_trl = with_trl and (sides is None or "trl" in sides)
    sides = [s for s in (sides or ["ours", "ours-unshared"]) if s != "trl"]
    skipped = []
    if with_trl and trl_available():
        sides.append("trl")
    elif with_trl:
        skipped.append(Row(benchmark="e2e", provider="trl", shape=name, metric="steps_per_s", unit="1/s",
                           status="skipped: trl (and datasets) not installed"))
    results = run_sides(sides, model, device, warmup, steps, overrides, log, threads=threads)
    if records_out is not None:
        # paths inside the repository are stored relative to it (benchmarks/floors.py resolves them)
        text = json.dumps({"model": model, "name": name, "device": device, "threads": threads, "sides": results},
                          indent=1)
        Path(records_out).write_text(text.replace(json.dumps(str(ROOT) + "/")[1:-1], ""))
    base = _base(name, results["ours"]["done"]["settings"])
    threads = {side: r["done"]["torch_threads"] for side, r in results.items()}
    rows = []
    for side, r in results.items():
        rows += _rows_of_side(side, r["steps"], dict(base, note=f"{threads[side]} torch thread(s)"), memory_note)
    if "trl" in results:
        ours, trl = (summarize([1.0 / s["step_s"] for s in results[side]["steps"]]) for side in ("ours", "trl"))
        ratio = ours["median"] / trl["median"]
        note = "median steps/s ratio (q20/q80: worst/best pairing of the quantiles)"
        if not cuda:  # the settings the targets are stated for
            target, what = (TARGET_SPEEDUP, "the embedded model") if model == str(EMBEDDED) else \
                (REAL_MODEL_TARGET, "a real model")
            note += f"; target >= {target:g}x on CPU with {what}: {'met' if ratio >= target else 'NOT met'}"
        rows.append(Row(**dict(base, provider="ours/trl"), mode="step", metric="speedup", unit="x",
                        median=ratio, q20=ours["q20"] / trl["q80"], q80=ours["q80"] / trl["q20"], n=ours["n"],
                        note=note))
    return rows, skipped

