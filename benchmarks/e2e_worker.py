"""One side of the end-to-end benchmark, run in its own process: our trainer, or TRL's GRPOTrainer.

    python -m benchmarks.e2e_worker --side ours --model DIR --steps 4 [-- --field value ...]

The process speaks one JSON object per line on stdout (everything else it prints goes to stderr):
`{"event": "ready"}` once set up; then, for each step, it waits for a line on stdin before starting
the step and answers `{"event": "step", ...}` when the step ends; after the last step it waits for one
more line before tearing down (so that its teardown never overlaps the other side's last step), then
answers `{"event": "done", ...}`. So the two sides can be stepped in turn, and a load change on a shared
machine hits both alike.

Both sides read their settings from the same GRPOConfig (configs/tiny-math.yaml plus the overrides
given after `--`), load the same model the same way, and train on the same prompts in the same order
(the synthetic stream of that config, rendered with the tokenizer's chat template) with the same
reward functions. Every step is timed whole and by phase:

- generation: sampling the completions (tokenising the prompts and decoding included);
- reward: scoring (ours: with the advantages; TRL computes them later, under "other");
- logps: old/reference log-probs (none when beta = 0 and each rollout is used once);
- policy: the policy forward and backward (the loss included);
- optimizer: `optimizer.step()`;
- other: the rest of the step (gradient clipping, advantages and metrics, bookkeeping).

Peak memory per step: `max_memory_allocated` on CUDA; on the CPU the process's resident set size,
sampled every 2 ms (it includes the Python runtime and libraries, the same for both sides).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import threading
import time
from collections import defaultdict

import torch


class PeakRSS:
    """Peak resident set size of this process since the last `reset()`, sampled by a thread."""

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def now(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(self.interval_s)

    def reset(self) -> None:
        self.peak = self.now()

    def read(self) -> int:
        return max(self.peak, self.now())

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class StepMemory:
    """Peak memory of one step, in bytes: CUDA allocator or CPU resident set size."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.rss = None if self.cuda else PeakRSS()

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            self.rss.reset()

    def sync(self) -> None:
        """Waits for the device, so that a step's time includes its last kernels."""
        if self.cuda:
            torch.cuda.synchronize()

    def read(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return self.rss.read()


def timed(store: dict, key: str, fn):
    """fn, adding its wall time to store[key] at every call."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            store[key] += time.perf_counter() - t0
    return wrapper


class Gate:
    """The line protocol with the process that drives the steps (see the module docstring)."""

    def __init__(self):
        self.out = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)  # libraries' prints (C level too) go to stderr from now on

    def send(self, event: str, **fields) -> None:
        self.out.write(json.dumps({"event": event, **fields}) + "\n")

    def wait(self) -> None:
        if sys.stdin.readline().strip() != "go":
            raise SystemExit("the driving process stopped")


def load_settings(model: str, device: str, overrides: list[str], threads: int = 1):
    """Our GRPOConfig for the workload: the embedded default config (or --config FILE among the
    overrides), the model, `threads` CPU threads."""
    from grpo_scale.config import load_config

    out = tempfile.mkdtemp(prefix="grpo-bench-")
    base = ["--model_name_or_path", model, "--output_dir", out, "--report_to", "none", "--cpu_threads", str(threads)]
    if device.startswith("cuda"):
        base += ["--bf16", "true"]
    return load_config(base + overrides)


def attn_implementation(device: str) -> str:
    """What our trainer's attn_implementation: auto picks, so both sides run the same attention."""
    if device.startswith("cuda"):
        try:
            import flash_attn  # noqa: F401
            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def training_rows(cfg, tokenizer, n_prompts: int) -> list[dict]:
    """The first n_prompts problems our trainer would take. "prompt": the text our trainer renders (system
    prompt, question, and the reply opened with ``assistant_prefix`` when the config has one), given to
    TRL as a string: TRL 1.16 renders a conversational prompt with a new assistant turn even when it ends
    with an assistant message, so it would not continue the opened reply. "conversation": the messages,
    which the reward functions read (``trl_rewards``), as ours do."""
    from grpo_scale.tasks import ProblemStream, make_eval_set
    from grpo_scale.tasks.prompts import open_reply, render_messages

    held_out = {r["prompt"] for r in make_eval_set(cfg.task_mix, cfg.task_level, cfg.eval_size, cfg.eval_seed)}
    rows = ProblemStream(cfg.task_mix, cfg.task_level, cfg.seed, exclude=held_out).take(n_prompts)
    out = []
    for r in rows:
        conversation = open_reply([{"role": "user", "content": r["prompt"]}], cfg.assistant_prefix)
        out.append({**r, "prompt": render_messages(tokenizer, conversation, cfg.system_prompt),
                    "conversation": conversation})
    return out


def trl_rewards(funcs: list) -> list:
    """Our reward functions as TRL calls them, judging each completion against its row's conversation
    (the opened reply included) rather than the rendered prompt string."""
    def wrap(fn):
        def reward(prompts, completions, conversation, **kwargs):
            return fn(prompts=conversation, completions=completions, **kwargs)
        reward.__name__ = getattr(fn, "__name__", "reward")
        return reward
    return [wrap(f) for f in funcs]


# ------------------------------------------------------------------------------------------------
# Our trainer.
# ------------------------------------------------------------------------------------------------
def run_ours(cfg, device: str, total: int, gate: Gate) -> None:
    from grpo_scale.trainer import GRPOTrainer

    trainer = GRPOTrainer(cfg)
    trainer.setup()
    clock: dict = defaultdict(float)
    trainer.optimizer.step = timed(clock, "optimizer", trainer.optimizer.step)
    trainer.acc.clip_grad_norm_ = timed(clock, "clip", trainer.acc.clip_grad_norm_)
    memory = StepMemory(device)
    gate.send("ready")
    for _ in range(total):
        gate.wait()
        clock.clear()
        memory.reset()
        t0 = time.perf_counter()
        batch = trainer.generate_and_score()
        metrics = trainer.grpo_step(batch)
        memory.sync()
        step_s = time.perf_counter() - t0
        m = batch["metrics"]
        ro = batch["rollout"]  # the step's shape, for the floors (benchmarks/floors.py)
        shape = {"completion_lengths": ro.attention_mask.sum(1).tolist(),
                 "prompt_lengths": ro.prompt_mask.sum(1).tolist(), "prompt_runs": ro.prompt_runs().tolist()}
        phases = {"generation": m["time/generate_s"], "reward": m["time/reward_s"], "logps": m["time/logps_s"],
                  "policy": metrics["time/train_s"] - clock["optimizer"] - clock["clip"],
                  "optimizer": clock["optimizer"]}
        phases["other"] = step_s - sum(phases.values())
        # use_vllm: the weight sync's share of the generation phase
        extra = {"weight_sync_s": m["time/weight_sync_s"]} if "time/weight_sync_s" in m else {}
        gate.send("step", step_s=step_s, phases=phases, tokens=m["tokens"], reward=m["reward/mean"],
                  completion_length=m["completion/mean_length"], peak_memory=memory.read(), shape=shape, **extra)
    gate.wait()  # the driver's word to tear down


# ------------------------------------------------------------------------------------------------
# TRL's GRPOTrainer with the same settings.
# ------------------------------------------------------------------------------------------------
def trl_args(cfg, device: str, total: int, output_dir: str):
    """TRL's GRPOConfig carrying our config's values (TRL's field names where they differ)."""
    import trl

    return trl.GRPOConfig(
        output_dir=output_dir, use_cpu=not device.startswith("cuda"), bf16=cfg.bf16, fp16=cfg.fp16,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, num_generations=cfg.num_generations,
        max_completion_length=cfg.max_completion_length, temperature=cfg.temperature, top_p=cfg.top_p,
        top_k=cfg.top_k, mask_truncated_completions=cfg.mask_truncated_completions,
        beta=cfg.beta, epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high, delta=cfg.delta,
        loss_type=cfg.loss_type, importance_sampling_level=cfg.importance_sampling_level,
        num_iterations=cfg.num_iterations, scale_rewards=cfg.scale_rewards, reward_weights=cfg.reward_weights,
        learning_rate=cfg.learning_rate, adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2,
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=int(cfg.warmup_steps) if cfg.warmup_steps >= 1 else int(round(cfg.warmup_steps * total)), max_steps=total, seed=cfg.seed,
        gradient_checkpointing=cfg.gradient_checkpointing,
        shuffle_dataset=False,  # our trainer takes its stream in order
        logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True, log_completions=False,
    )


def run_trl(cfg, device: str, total: int, gate: Gate) -> None:
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from grpo_scale.rewards import get_reward_funcs

    path = cfg.resolved_model_path
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompts_per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps // cfg.num_generations
    dataset = Dataset.from_list(training_rows(cfg, tokenizer, prompts_per_step * total))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True,
                                                 attn_implementation=attn_implementation(device))
    clock: dict = defaultdict(float)
    memory = StepMemory(device)
    trainer = None
    tokens_seen = [0.0]  # TRL's token count is cumulative

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            gate.wait()
            clock.clear()
            memory.reset()
            clock["t0"] = time.perf_counter()

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            clock["opt0"] = time.perf_counter()

        def on_optimizer_step(self, args, state, control, **kwargs):
            clock["optimizer"] += time.perf_counter() - clock["opt0"]

        def on_step_end(self, args, state, control, **kwargs):
            memory.sync()
            step_s = time.perf_counter() - clock["t0"]
            phases = {"generation": clock["generation"], "reward": clock["reward"], "logps": clock["logps"],
                      "policy": clock["training_step"] - clock["prepare"], "optimizer": clock["optimizer"]}
            phases["other"] = step_s - sum(phases.values())
            logged = trainer._metrics["train"]  # this step's metrics; TRL averages and clears them at logging
            tokens = logged["num_tokens"][-1] - tokens_seen[0]
            tokens_seen[0] = logged["num_tokens"][-1]
            gate.send("step", step_s=step_s, phases=phases, tokens=tokens, reward=logged["reward"][-1],
                      completion_length=logged["completions/mean_length"][-1], peak_memory=memory.read())
            if state.global_step >= total:
                gate.wait()  # the driver's word to tear down (train() still has work to do)

    trainer = trl.GRPOTrainer(model=model, reward_funcs=trl_rewards(get_reward_funcs(cfg.reward_funcs)),
                              args=trl_args(cfg, device, total, cfg.output_dir), train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[Clock()])
    scoring = {"active": False}
    real_logps = trainer._get_per_token_logps_and_entropies

    def logps(*args, **kwargs):  # old/reference log-probs while scoring; the policy's own otherwise
        if not scoring["active"]:
            return real_logps(*args, **kwargs)
        return timed(clock, "logps", real_logps)(*args, **kwargs)

    real_score = trainer._generate_and_score_completions

    def score(*args, **kwargs):
        scoring["active"] = True
        try:
            return real_score(*args, **kwargs)
        finally:
            scoring["active"] = False

    trainer._get_per_token_logps_and_entropies = logps
    trainer._generate_and_score_completions = score
    trainer._generate = timed(clock, "generation", trainer._generate)
    trainer._calculate_rewards = timed(clock, "reward", trainer._calculate_rewards)
    trainer._prepare_inputs = timed(clock, "prepare", trainer._prepare_inputs)
    trainer.training_step = timed(clock, "training_step", trainer.training_step)
    gate.send("ready")
    trainer.train()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", choices=("ours", "trl"), required=True)
    parser.add_argument("--model", required=True, help="model directory (both sides load it)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=4, help="steps to run (warm-up included)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (the same for every side)")
    parser.add_argument("overrides", nargs="*", help="our config fields after --, e.g. -- --loss_impl triton")
    args = parser.parse_args(argv)
    gate = Gate()
    if not args.device.startswith("cuda"):
        torch.set_num_threads(args.threads)  # the same for every side
    cfg = load_settings(args.model, args.device, args.overrides, args.threads)
    (run_ours if args.side == "ours" else run_trl)(cfg, args.device, args.steps, gate)
    settings = {k: v for k, v in cfg.to_dict().items() if k != "output_dir"}
    gate.send("done", settings=settings, torch_threads=torch.get_num_threads())
    return 0


if __name__ == "__main__":
    sys.exit(main())
