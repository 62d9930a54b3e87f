"""The GRPO recipe: setup -> (generate and score -> grpo step) x max_steps -> save.

This is the only module that knows about Accelerate and DeepSpeed. One optimiser step consumes one
generation batch of ``per_device_train_batch_size x processes x gradient_accumulation_steps``
completions (``num_generations`` per prompt; a group may span processes), reused ``num_iterations``
times. Batch sizes and loss normalisers have TRL's meaning.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo_scale import checkpoint as ckpt
from grpo_scale import (attention, cpu_memory, decoding, dynamic, engines, last_layer, lora, packing, portable,
                        preemption, reward_timeout)
from grpo_scale.reward_timeout import RewardTimeout
from grpo_scale.config import ConfigError, GRPOConfig, adapter_base, is_adapter_dir
from grpo_scale.rewards import call_reward, check_reward_columns, compute_rewards, get_reward_funcs
from grpo_scale.rollout import (CacheNotRepeatable, Rollout, cache_argument, can_share_prompt,
                                few_row_linears, full_inputs, group_advantages, linear, pad_cat, pad_id,
                                prefix_decoding_problem, shared_prompt_inputs)
from grpo_scale.tasks import ProblemStream, make_eval_set
from grpo_scale.tasks.prompts import is_conversational, open_reply, render_messages

logger = logging.getLogger("grpo_scale")


def _is_iterable_dataset(data) -> bool:
    return type(data).__name__ == "IterableDataset" or (
        hasattr(data, "__iter__") and not isinstance(data, (list, tuple, dict, str)) and not hasattr(data, "to_list")
        and not hasattr(data, "__len__"))


def _reward_label(r) -> str:
    """How a reward given to the constructor is named in the config, logs and metrics."""
    if isinstance(r, str):
        return r
    if isinstance(r, torch.nn.Module):
        return getattr(getattr(r, "config", None), "_name_or_path", "") or type(r).__name__
    return getattr(r, "__name__", type(r).__name__)


class RewardModel:
    """A sequence-classification model with one label as a reward function (TRL's behaviour): it scores
    prompt + completion, rendered with its own tokenizer's chat template for conversational data and
    concatenated for standard data; the score is the logit. Its forward runs without gradients, on the
    trainer's device, inside ``context`` (the trainer's ``gathered``: ZeRO-3 may have partitioned it)."""

    def __init__(self, model, tokenizer, context):
        self.model, self.tokenizer, self.context = model.eval().requires_grad_(False), tokenizer, context
        labels = getattr(model.config, "num_labels", 1)
        if labels != 1:
            raise ValueError(f"reward model {_reward_label(model)} has {labels} labels; a reward model has one")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.__name__ = _reward_label(model).rstrip("/").split("/")[-1]

    @torch.no_grad()
    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        if is_conversational(prompts[0]):
            texts = [self.tokenizer.apply_chat_template(list(p) + list(c), tokenize=False)
                     for p, c in zip(prompts, completions)]
        else:
            texts = [p + c for p, c in zip(prompts, completions)]
        with self.context(self.model) as model:
            device = next(model.parameters()).device
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side="right",
                                 add_special_tokens=False).to(device)
            return model(**enc).logits[:, 0].float().tolist()


def as_conversation(row: dict) -> dict:
    """A row whose string prompt becomes a one-message conversation (the synthetic tasks' format)."""
    return {**row, "prompt": [{"role": "user", "content": row["prompt"]}]}


class AsConversation:
    """A prompt stream (``take``, ``state_dict``, ``load_state_dict``) whose rows are conversational."""

    def __init__(self, stream):
        self.stream = stream

    def take(self, n: int) -> list[dict]:
        return [as_conversation(r) for r in self.stream.take(n)]

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)


class TrainingAborted(RuntimeError):
    """The run stopped itself (too many non-finite steps in a row) after saving a checkpoint."""


class TrainingStopped(TrainingAborted):
    """A stop signal (SIGTERM, SIGUSR1, SIGINT) ended the run after saving a checkpoint
    (``grpo_scale.preemption``); OUTPUT_DIR/preempted says which."""


class LossBackend:
    """``loss_impl`` resolved once: ``loss(logits_or_model_output, ...)`` and ``logps(logits, ids, T)``.

    eager: the PyTorch reference; triton: the fused kernel on the logits (consumed in place); fused_linear:
    the kernel fused with the lm_head (the trainer passes hidden states through the patched lm_head).
    """

    def __init__(self, name: str, loss, logps):
        self.name, self._loss, self.logps = name, loss, logps

    def loss(self, logits, args: tuple, **kwargs):
        if self.name == "triton":
            kwargs["inplace"] = True
        return self._loss(logits, *args, **kwargs)


def pick_backend(loss_impl: str, device: torch.device) -> LossBackend:
    """The loss backend for ``loss_impl``, chosen once.

    auto: the fused Triton kernel on CUDA, the eager reference elsewhere. Triton on CPU runs only under
    TRITON_INTERPRET=1 (tests); it never silently falls back.
    """
    from grpo_scale.kernels.reference import grpo_loss_reference, selective_logps_reference
    if loss_impl == "auto":
        loss_impl = "triton" if device.type == "cuda" else "eager"
    if loss_impl == "eager":
        return LossBackend("eager", grpo_loss_reference, selective_logps_reference)
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(f"loss_impl: {loss_impl} needs a CUDA device (or TRITON_INTERPRET=1 for tests); "
                          "use loss_impl: auto or eager on CPU")
    from grpo_scale.kernels.grpo_loss import grpo_loss, selective_logps
    if loss_impl == "triton":
        return LossBackend("triton", grpo_loss, selective_logps)
    from grpo_scale.kernels.fused_linear import fused_linear_grpo_loss
    return LossBackend("fused_linear", fused_linear_grpo_loss, selective_logps)


# The start-up check's layout cost: its two groups go into two rows, one padded, and each keeps its
# prompt once for both completions (see packing.layout).
PROBE_KEY_COST = 0.02


def _fused_lm_head_forward(self, hidden, **loss_kwargs):
    """lm_head.forward for loss_impl fused_linear: plain logits without loss arguments (generation),
    the fused GRPO loss with them. Running inside the lm_head module keeps ZeRO-3's gather hooks on."""
    if not loss_kwargs:
        return linear(hidden, self.weight, self.bias)
    from grpo_scale.kernels.fused_linear import fused_linear_grpo_loss
    args = loss_kwargs.pop("args")
    return fused_linear_grpo_loss(hidden, self.weight, *args, bias=self.bias, **loss_kwargs)


class RewardFailed(TrainingAborted):
    """A reward function raised on every item for reward_fail_steps steps in a row (nothing saved)."""


def guard_reward(fn, name: str, max_logged: int = 3):
    """``fn`` for the trainer, called under the reward contract (``call_reward``): when a call over the
    batch raises, the items are scored one at a time, so one bad item costs only its own score. Items
    that raise are logged (function, error, the prompt and completion, escaped and truncated: model
    output is untrusted) and returned as None (missing). After each call ``guarded.failure`` is
    "ExceptionType: message" when every item raised, else None."""
    def guarded(**kwargs):
        guarded.failure = None
        prompts, completions = kwargs["prompts"], kwargs["completions"]
        n = len(completions)
        try:
            return call_reward(fn, **kwargs)
        except RewardTimeout as e:  # no item-by-item retry: each item could take as long
            logger.warning("reward %s %s: its %d item(s) are scored as missing", name, e, n)
            guarded.failure = f"RewardTimeout: {e}"
            return [None] * n
        except Exception as batch_error:  # noqa: BLE001 - user code; find the items that fail
            first_error = last_error = batch_error
        per_item = {k for k, v in kwargs.items() if isinstance(v, list) and len(v) == n}
        out, failed = [], 0
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            try:
                one = list(call_reward(fn, **{k: [v[i]] if k in per_item else v for k, v in kwargs.items()}))
                if len(one) != 1:
                    raise ValueError(f"returned {len(one)} rewards for 1 completion")
                out.append(one[0])
            except Exception as e:  # noqa: BLE001
                failed, last_error = failed + 1, e
                if failed <= max_logged:
                    logger.warning("reward %s raised %s: %s on item %d (scored as missing) | prompt %s | "
                                   "completion %s", name, type(e).__name__, _clip(e), i, _clip(prompt), _clip(completion))
                out.append(None)
        if failed > max_logged:
            logger.warning("reward %s raised on %d more item(s) of this batch (scored as missing)", name,
                           failed - max_logged)
        if not failed:  # the batch call failed but no single item does: the batch is the problem
            logger.warning("reward %s raised %s: %s on the batch, not on any single item; scored item by item",
                           name, type(first_error).__name__, _clip(first_error))
        if n and failed == n:
            guarded.failure = f"{type(last_error).__name__}: {last_error}"
        return out
    guarded.__name__ = name
    guarded.failure = None
    return guarded


def _clip(x, n: int = 200) -> str:
    text = repr(x) if isinstance(x, str) else repr(str(x))  # repr escapes control characters
    return text if len(text) <= n else text[:n] + "...'"


def lr_lambda(cfg: GRPOConfig):
    warmup = int(cfg.warmup_steps) if cfg.warmup_steps >= 1 else int(round(cfg.warmup_steps * cfg.max_steps))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, cfg.max_steps - warmup)
        if cfg.lr_scheduler_type == "linear":
            return max(0.0, 1.0 - progress)
        if cfg.lr_scheduler_type == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0
    return f


class GRPOTrainer:
    def __init__(self, model=None, reward_funcs=None, args: Optional[GRPOConfig] = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, reward_processing_classes=None, peft_config=None,
                 **unsupported):
        """TRL's constructor: a TRL script changes only its import line.

        model: a Hub name or local folder (also a LoRA adapter folder), or a loaded PreTrainedModel;
        default ``args.model_name_or_path``. reward_funcs: a function (``async def`` too), a built-in name,
        'module:function', a reward model (a folder or name of an AutoModelForSequenceClassification with one
        label, or the loaded model), or a list of these; default ``args.reward_funcs``. args: GRPOConfig
        (default GRPOConfig(), TRL's defaults). train_dataset / eval_dataset: a datasets.Dataset or
        IterableDataset, a list of dicts or a path; default ``args.dataset_path`` (else the synthetic tasks).
        processing_class: the tokenizer; reward_processing_classes: the reward models' tokenizers;
        peft_config: a peft LoraConfig (LoRA with exactly that configuration).
        ``GRPOTrainer(config)`` (the config alone) is the command line's form."""
        if isinstance(model, GRPOConfig) and args is None:
            model, args = None, model
        if unsupported:
            names = ", ".join(sorted(unsupported))
            raise ConfigError(f"GRPOTrainer({names}=...): not supported yet by grpo-scale; remove the argument "
                              "(see the README's 'Coming from TRL')")
        cfg = args if args is not None else GRPOConfig()
        self.model_object = None
        self._unwrapped: dict = {}  # id(model) -> (model, acc.unwrap_model(model)), see _unwrap
        if model is not None:
            if isinstance(model, (str, os.PathLike)):
                cfg.model_name_or_path = os.fspath(model)
            elif isinstance(model, torch.nn.Module):
                self.model_object = model
                cfg.model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", "") or "<model object>"
            else:
                raise ConfigError(f"model: expected a name, a path or a PreTrainedModel, got {type(model).__name__}")
        self.reward_objects = getattr(cfg, "reward_objects", None)  # callables given in GRPOConfig(reward_funcs=)
        if reward_funcs is not None:
            self.reward_objects = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
            cfg.reward_funcs = [_reward_label(r) for r in self.reward_objects]
            if cfg.reward_weights is not None and len(cfg.reward_weights) != len(cfg.reward_funcs):
                raise ConfigError(f"reward_weights has {len(cfg.reward_weights)} entries but reward_funcs has "
                                  f"{len(cfg.reward_funcs)}: give one weight per function")
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        if isinstance(train_dataset, (str, os.PathLike)):
            cfg.dataset_path, self.train_dataset = os.fspath(train_dataset), None
        if isinstance(eval_dataset, (str, os.PathLike)):
            cfg.eval_dataset_path, self.eval_dataset = os.fspath(eval_dataset), None
        self.processing_class = processing_class
        self.reward_processing_classes = reward_processing_classes
        self.peft_config = peft_config
        if peft_config is not None:
            cfg.use_peft = True
        self.is_set_up = False
        self.cfg = self.args = cfg
        self.step = 0                        # optimiser steps done (skipped ones included)
        self.history: list[dict] = []        # logged metrics, one dict per logging step
        self.window: list[dict] = []         # per-step metrics not logged yet (logging_steps > 1)
        self.stop = preemption.StopSignals()  # installed while train() runs
        self._last_saved_step: Optional[int] = None
        self.eval_before: Optional[dict] = None
        self.eval_history: list[dict] = []   # {"step", figures} of every held-out evaluation, for rewards.png
        self.eval_samples: dict = {}         # "before"/"after": answers to the first held-out prompts (samples.md)
        self.skipped_steps = 0               # steps skipped for a non-finite loss or gradient norm
        # prompts read from the stream, sampling rounds, groups dropped and short batches (dynamic sampling)
        self.sampling = {"prompts": 0, "rounds": 0, "dropped_groups": 0, "short_steps": 0}
        self.bad_in_a_row = 0
        self.timings: dict[str, float] = defaultdict(float)

    # ================================================================== setup
    def setup(self) -> None:
        """Everything the run needs, cheapest checks first: a bad path, data set or reward fails before
        any model is loaded. Restores the checkpoint last, so its RNG states win over the seeding."""
        self.cfg.check_paths(model=self.model_object is None)
        self._setup_accelerator()
        self.resumed_from = self._resolve_resume()
        self._setup_data()
        self._check_assistant_prefix()
        self._resolve_max_steps(self.acc.num_processes)
        self._setup_rewards()
        self._setup_model()
        self._setup_optimizer()
        self._setup_reference()
        self.backend = pick_backend(self.cfg.loss_impl, self.acc.device)
        self.loss_impl = self.backend.name
        self.loss_spec = self.cfg.loss_spec()  # validated once; the adaptive entropy bonus replaces its coef
        if self.acc.is_main_process:
            for warning in self.loss_spec.warnings():
                logger.warning(warning)
        self.entropy_control = {"coef": self.cfg.entropy_coef, "last_entropy": None}  # None: not measured yet
        self.step_spec = self.loss_spec
        self.decode_step = False  # decoding steps from the weights (decoding.DecodeStep), set by the check below
        self.last_layer = False   # the packed forward's last layer at the used positions only (last_layer)
        self.structured_attention = self._structured_attention_fits()
        self.packed_segments = self.structured_attention  # packed rows' attention by index, not a dense mask
        self.padding_free = self.cfg.padding_free and self._packing_fits()
        if self.loss_impl == "fused_linear":
            import types
            head = self.acc.unwrap_model(self.model).get_output_embeddings()
            head.forward = types.MethodType(_fused_lm_head_forward, head)
        if self.acc.device.type == "cpu":  # decoding's few-row products in the BLAS's fast orientation
            few_row_linears(self.acc.unwrap_model(self.model))
        if self.resumed_from is not None:
            self._load_checkpoint(self.resumed_from)
        self.engine = self._make_engine()
        self.is_set_up = True
        if "tensorboard" in self.cfg.report_to:
            # purge_step: TensorBoard drops the events a killed run logged after its last checkpoint (steps
            # >= purge_step in older files), so resumed curves have no duplicate steps.
            self.acc.init_trackers("tensorboard", config=_flat_hparams(self.cfg.to_dict()),
                                   init_kwargs={"tensorboard": {"purge_step": self.step + 1}})

    def setup_for_eval(self) -> None:
        """What ``evaluate`` needs and nothing more (``python -m grpo_scale.evaluate``): the held-out data,
        the tokenizer and the model on the device in eval mode; no optimiser, reference model, checkpoint,
        tracker or output folder. An adapter folder is loaded on its base."""
        cfg = self.cfg
        cfg.beta, cfg.gradient_checkpointing, cfg.report_to = 0.0, False, []
        cfg.use_peft = is_adapter_dir(cfg.resolved_model_path) if self.model_object is None else cfg.use_peft
        cfg._check_model_path()
        self._eval_only = True
        self._setup_accelerator()
        self._setup_data()
        self._setup_model()
        self.model = self.acc.prepare_model(self.model, evaluation_mode=True)
        self.model.eval()
        self.is_set_up = True

    def check_inputs(self, num_processes: int = 1) -> None:
        """The checks of ``setup`` that load no model (``train.py --check``): paths, data, rewards."""
        self.cfg.check_paths(model=self.model_object is None)
        self._setup_data()
        self._check_assistant_prefix()
        self._resolve_max_steps(num_processes)
        self._setup_rewards()

    def _setup_accelerator(self) -> None:
        cfg = self.cfg
        # Without CUDA, Accelerate does not build its process state under DeepSpeed unless told the backend:
        # every rank would then believe it is rank 0 of 1 and no data would be sharded.
        launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
        handlers = [InitProcessGroupKwargs(backend="gloo")] if launched and not torch.cuda.is_available() else []
        self.acc = Accelerator(
            mixed_precision="bf16" if cfg.bf16 else "fp16" if cfg.fp16 else "no",
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            log_with="tensorboard" if "tensorboard" in cfg.report_to else None, cpu=cfg.use_cpu,
            project_dir=cfg.output_dir, kwargs_handlers=handlers)
        self.acc.gradient_accumulation_steps = cfg.gradient_accumulation_steps  # the training config decides
        if not getattr(self, "_eval_only", False):  # the batch split matters to training only
            cfg.check_world(self.acc.num_processes)
        ds = self.acc.state.deepspeed_plugin
        self.deepspeed = ds is not None
        self.zero_stage = 0
        if ds is not None:
            # No DataLoader goes through prepare(): DeepSpeed's batch fields come from the training config.
            conf = ds.deepspeed_config
            conf["train_micro_batch_size_per_gpu"] = cfg.per_device_train_batch_size
            conf["gradient_accumulation_steps"] = cfg.gradient_accumulation_steps
            conf["train_batch_size"] = (cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
                                        * self.acc.num_processes)
            conf["gradient_clipping"] = cfg.max_grad_norm
            if cfg.bf16:  # DeepSpeed's overflow check is how a non-finite step is dropped (see grpo_step)
                conf.setdefault("bf16", {})["check_grad_overflow"] = True
            self.zero_stage = int(conf.get("zero_optimization", {}).get("stage", 0))
        if self.acc.device.type == "cpu":
            # Idle OpenMP threads spin at barriers: oversubscribed cores stall small models for seconds.
            local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            torch.set_num_threads(cfg.cpu_threads or max(1, (os.cpu_count() or 1) // local))
            if cfg.cpu_keep_freed_memory:  # a step's activations reuse freed memory instead of page-faulting
                cpu_memory.keep_freed_memory()
        set_seed(cfg.seed)
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            level=logging.INFO if self.acc.is_main_process else logging.WARNING)
        if self.acc.is_main_process:
            for note in getattr(cfg, "notes", []):
                logger.warning("%s", note)

    def _resolve_resume(self) -> Optional[Path]:
        """The checkpoint to continue from, the same on every rank. ``latest``: the newest checkpoint that is
        complete in every rank's output_dir, agreed by name (nodes that do not share a file system each
        hold their own copy, under their own output_dir; a kill between two nodes' renames leaves the
        newest on one node only). A path: every rank's own. A rank that cannot resume makes all raise."""
        from accelerate.utils import gather_object
        cfg, acc = self.cfg, self.acc
        many = acc.num_processes > 1
        if cfg.resume_from_checkpoint == "latest":
            mine = [p.name for p in ckpt.list_checkpoints(cfg.output_dir)]
            everyone = gather_object([mine]) if many else [mine]
            common = set(everyone[0]).intersection(*everyone[1:])
            if not common and any(everyone):
                held = "; ".join(f"rank {r}: {', '.join(names) or 'none'}" for r, names in enumerate(everyone))
                raise ConfigError(f"resume_from_checkpoint: latest: no checkpoint is complete in the output_dir of "
                                  f"every rank ({held}); give each node the output_dir that holds its copy")
            if not common:
                if acc.is_main_process:
                    logger.info("resume_from_checkpoint: latest: no complete checkpoint in %s yet; starting from "
                                "scratch", cfg.output_dir)
                return None
            newest = max(common, key=lambda name: int(name.rsplit("-", 1)[1]))
            if acc.is_main_process and newest != everyone[0][-1]:
                logger.warning("resume_from_checkpoint: latest: %s is not complete on every node; resuming from %s",
                               everyone[0][-1], newest)
            return Path(cfg.output_dir) / newest
        path, error = None, None
        try:
            path = ckpt.resolve_resume(cfg.output_dir, cfg.resume_from_checkpoint)
        except ConfigError as e:
            error = str(e)
        errors = gather_object([error]) if many else [error]
        if any(errors):
            raise ConfigError("; ".join(e if not many else f"rank {r}: {e}" for r, e in enumerate(errors) if e))
        existing = ckpt.list_checkpoints(cfg.output_dir)
        if path is None and existing and acc.is_main_process:
            logger.warning("%s already holds checkpoints (newest: %s); this run starts from scratch and overwrites "
                           "them. To continue that run, pass --resume_from_checkpoint latest", cfg.output_dir,
                           existing[-1].name)
        return path

    def _load_model(self, path: str):
        cfg = self.cfg
        attn = cfg.attn_implementation
        if attn == "auto":
            attn = "sdpa"
            if torch.cuda.is_available():
                try:
                    import flash_attn  # noqa: F401
                    attn = "flash_attention_2"
                except ImportError:
                    pass
        # safetensors only (a pickle can run code when loaded); model code from the repository only when
        # the user allowed it with trust_remote_code
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation=attn, trust_remote_code=cfg.trust_remote_code,
            use_safetensors=True)

    def _setup_model(self) -> None:
        cfg = self.cfg
        if self.model_object is not None:  # a loaded model given to the constructor
            import copy
            model = self.model_object
            from peft import PeftModel
            if isinstance(model, PeftModel):
                raise ConfigError("model: a PeftModel; pass its base model and the LoraConfig as peft_config, or "
                                  "save the adapter and pass its folder as model")
            self.tokenizer = self.processing_class
            if self.tokenizer is None:
                try:
                    self.tokenizer = AutoTokenizer.from_pretrained(cfg.model_name_or_path,
                                                                   trust_remote_code=cfg.trust_remote_code)
                except (OSError, ValueError) as e:
                    raise ConfigError(f"model: a loaded model without processing_class, and no tokenizer at "
                                      f"{cfg.model_name_or_path!r} ({e}); pass processing_class=tokenizer") from None
            # the reference: a frozen copy of the start (TRL makes the same copy)
            self.ref_model = copy.deepcopy(model) if cfg.beta > 0 and not cfg.use_peft else None
            adapter_dir, path = None, cfg.model_name_or_path
        else:
            path = cfg.resolved_model_path
            adapter_dir = path if is_adapter_dir(path) else None  # continue this LoRA adapter
            base_path = adapter_base(path) if adapter_dir else path
            tokenizer_path = adapter_dir if adapter_dir and (Path(adapter_dir) / "tokenizer_config.json").is_file() \
                else base_path
            try:
                self.tokenizer = self.processing_class or AutoTokenizer.from_pretrained(
                    tokenizer_path, trust_remote_code=cfg.trust_remote_code)
                model = self._load_model(base_path)
                # a frozen copy of the start; a LoRA run's reference is the same network with its adapters off
                self.ref_model = self._load_model(base_path) if cfg.beta > 0 and not cfg.use_peft else None
            except (OSError, ValueError) as e:  # missing files, Hub errors, custom code without trust_remote_code
                raise ConfigError(f"model_name_or_path: cannot load {base_path}: {e}") from None
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if not getattr(self.tokenizer, "chat_template", None):
            logger.warning("the tokenizer of %s has no chat template: prompts use the plain fallback "
                           "'SYSTEM\\n\\nUser: QUESTION\\nAssistant:' (grpo_scale.tasks.prompts.render_prompt)", path)
        if cfg.gradient_checkpointing:
            # Non-reentrant: it needs no input that requires grad (frozen LoRA embeddings give none) and
            # recomputes under ZeRO-3's parameter hooks like any forward.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False  # training forwards; generation turns the cache on explicitly
        if cfg.use_peft:
            model = lora.wrap(model, cfg, adapter_dir, reference=cfg.beta > 0, config=self.peft_config)
        model.train()  # from_pretrained returns eval mode: dropout (LoRA's too) and checkpointing need train
        self.model = model
        self.cache_kw = cache_argument(model)
        self.share_prompt = cfg.share_prompt  # turned off at the first cache that cannot be repeated

    def _setup_optimizer(self) -> None:
        cfg = self.cfg
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                           weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.model, self.optimizer = self.acc.prepare(self.model, self.optimizer)
        # Stepped by hand once per optimiser step (Accelerate's wrapper would step it once per process).
        self.acc.register_for_checkpointing(self.scheduler)
        if cfg.use_peft and not self.deepspeed:
            self.acc.register_save_state_pre_hook(self._keep_trainable)

    def _setup_reference(self) -> None:
        """The frozen reference (beta > 0), placed once the policy is prepared. Under ZeRO-3 transformers
        loaded it partitioned (zero.Init, in the DeepSpeed config's precision, offloaded where offload_param
        says): each rank holds 1/W of it, and its forwards gather it for the block (``gathered``), as
        generation gathers the policy. Otherwise every rank holds a full copy, in the dtype the policy's
        engine computes in under DeepSpeed (bf16/fp16), in bf16 with bf16 in one process (the policy runs
        under autocast there), else in fp32."""
        if self.ref_model is None:
            return
        self.ref_model.eval().requires_grad_(False)
        if not _partitioned(self.ref_model):
            if self.deepspeed:
                dtype = next(self.acc.unwrap_model(self.model).parameters()).dtype
            else:
                dtype = torch.bfloat16 if self.cfg.bf16 else None
            self.ref_model.to(device=self.acc.device, dtype=dtype)
        held, full = param_bytes(self.ref_model)
        logger.info("reference model: %.1f MiB of parameters held per process of %.1f MiB%s", held / 2**20,
                    full / 2**20, " (ZeRO-3 partitions, gathered once per rollout for its forward)"
                    if _partitioned(self.ref_model) else "")

    def _setup_data(self) -> None:
        cfg = self.cfg
        if self.train_dataset is not None:  # given to the constructor
            self._setup_data_objects()
        elif cfg.dataset_path:
            from grpo_scale.tasks.data import load_rows
            from grpo_scale.tasks.stream import RowStream
            try:
                rows = load_rows(cfg.dataset_path)
                eval_rows = load_rows(cfg.eval_dataset_path) if cfg.eval_dataset_path else None
            except ValueError as e:  # names the file, the line or row, and the fix
                raise ConfigError(f"data: {e}") from None
            if eval_rows is not None:
                self.eval_rows = eval_rows[:cfg.eval_size]
                train_rows = rows
            else:  # hold out the last eval_size rows of a seeded shuffle
                train_rows, self.eval_rows = self._hold_out(rows, cfg.dataset_path)
            self.stream = RowStream(train_rows, cfg.seed)
            self.columns = [k for k in train_rows[0] if k != "prompt"]
        else:  # the synthetic tasks, as conversational rows (the question is the user's message)
            eval_rows = make_eval_set(cfg.task_mix, cfg.task_level, cfg.eval_size, cfg.eval_seed)
            self.stream = AsConversation(ProblemStream(cfg.task_mix, cfg.task_level, cfg.seed,
                                                       exclude={r["prompt"] for r in eval_rows}))
            self.eval_rows = [as_conversation(r) for r in eval_rows]
            sample = ProblemStream(cfg.task_mix, cfg.task_level, cfg.seed).take(1)[0]  # a throwaway stream
            self.columns = [k for k in sample if k != "prompt"]

    def _check_assistant_prefix(self) -> None:
        """assistant_prefix needs conversational prompts: appended to a string prompt, it could not be told
        from the question, so rewards (the built-ins too) would judge the completion without it."""
        if not self.cfg.assistant_prefix:
            return
        rows = list(getattr(self.stream, "rows", None) or [])[:1] + list(self.eval_rows or [])[:1]
        if any(isinstance(r.get("prompt"), str) for r in rows):
            raise ConfigError(
                "assistant_prefix: the prompts are strings (TRL's standard format), so the opened reply could not be "
                "told from the question and rewards would judge the completion without it; give prompts as messages "
                "([{\"role\": \"user\", \"content\": ...}]), or leave assistant_prefix empty and end your prompt "
                "strings with the text yourself")

    def _resolve_max_steps(self, num_processes: int) -> None:
        """max_steps -1 (TRL's default): num_train_epochs passes over the training prompts. A rollout takes
        per_device_train_batch_size x processes x gradient_accumulation_steps / num_generations prompts and
        trains num_iterations steps."""
        cfg = self.cfg
        if cfg.max_steps != -1:
            return
        rows = getattr(self.stream, "rows", None)
        if rows is None:
            what = "the synthetic tasks are" if isinstance(self.stream, AsConversation) else "an IterableDataset is"
            raise ConfigError(f"max_steps is -1 (train num_train_epochs passes over the data), but {what} endless: "
                              "set max_steps")
        per_rollout = cfg.per_device_train_batch_size * num_processes * cfg.gradient_accumulation_steps // cfg.num_generations
        cfg.max_steps = max(1, math.ceil(cfg.num_train_epochs * len(rows) / max(1, per_rollout))) * cfg.num_iterations
        logger.info("max_steps -1: %g epoch(s) of %d prompts, %d prompts per rollout: %d steps", cfg.num_train_epochs,
                    len(rows), per_rollout, cfg.max_steps)

    def _reward_object(self, r, i: int):
        """One entry of the constructor's reward_funcs as a function: a callable as it is; a name as the
        command line reads it; a reward model (loaded, or a folder / name that is not a function)."""
        from grpo_scale.rewards import builtin_names, is_builtin
        if isinstance(r, torch.nn.Module):
            return RewardModel(self._placed(r), self._reward_tokenizer(i, r), self.gathered)
        if callable(r):
            return r
        if not isinstance(r, str):
            raise ValueError(f"reward_funcs[{i}]: expected a function, a name or a reward model, got {type(r).__name__}")
        if is_builtin(r) or (":" in r and not os.path.isdir(r)):
            return get_reward_funcs([r], self._reward_defaults())[0]
        from transformers import AutoModelForSequenceClassification
        try:
            model = AutoModelForSequenceClassification.from_pretrained(r, num_labels=1, use_safetensors=True,
                                                                       trust_remote_code=self.cfg.trust_remote_code)
        except (OSError, ValueError) as e:
            raise ValueError(f"reward_funcs[{i}]: {r!r} is not a built-in reward ({builtin_names()}), not "
                             f"'module:function', and loading it as a reward model failed: {e}") from None
        return RewardModel(self._placed(model), self._reward_tokenizer(i, model), self.gathered)

    def _reward_defaults(self) -> dict:
        """Config values that built-in rewards with parameters default to."""
        return {"max_completion_length": self.cfg.max_completion_length}

    def _placed(self, model):
        """A reward model on the training device (left where it is when ZeRO-3 partitioned it: its forward
        then gathers it, see RewardModel), in the precision the policy computes in."""
        acc = getattr(self, "acc", None)  # train.py --check scores nothing: no accelerator there
        if acc is not None and not _partitioned(model):
            model.to(acc.device, dtype=torch.bfloat16 if self.cfg.bf16 else None)
        return model

    def _reward_tokenizer(self, i: int, model):
        given = self.reward_processing_classes
        if isinstance(given, (list, tuple)):
            given = given[i] if i < len(given) else None
        if given is not None:
            return given
        from transformers import AutoTokenizer
        path = getattr(model.config, "_name_or_path", "")
        try:
            return AutoTokenizer.from_pretrained(path, trust_remote_code=self.cfg.trust_remote_code)
        except (OSError, ValueError) as e:
            raise ValueError(f"reward_funcs[{i}]: no tokenizer for the reward model {path!r} ({e}); pass it in "
                             "reward_processing_classes") from None

    def _setup_data_objects(self) -> None:
        """train_dataset / eval_dataset given as objects: a datasets.Dataset or a list of dicts (read in
        full and validated like a file), or an IterableDataset (read as needed). Without eval_dataset the
        Python API holds nothing out (TRL's behaviour): no held-out accuracy then."""
        from grpo_scale.tasks.data import IterableRows, rows_from
        from grpo_scale.tasks.stream import RowStream
        cfg = self.cfg
        try:
            if _is_iterable_dataset(self.train_dataset):
                stream = IterableRows(self.train_dataset, "train_dataset")
                self.stream, self.columns, rows = stream, stream.columns(), None
            else:
                rows = rows_from(self.train_dataset, "train_dataset")
            if self.eval_dataset is not None:
                if _is_iterable_dataset(self.eval_dataset):
                    eval_rows = IterableRows(self.eval_dataset, "eval_dataset").take(cfg.eval_size)
                else:
                    eval_rows = rows_from(self.eval_dataset, "eval_dataset")
                self.eval_rows = eval_rows[:cfg.eval_size]
            elif cfg.eval_dataset_path:
                from grpo_scale.tasks.data import load_rows
                self.eval_rows = load_rows(cfg.eval_dataset_path)[:cfg.eval_size]
            else:  # TRL's behaviour: every row is trained on, nothing is held out
                self.eval_rows = []
        except ValueError as e:
            raise ConfigError(f"data: {e}") from None
        if rows is not None:
            self.stream = RowStream(rows, cfg.seed)
            self.columns = [k for k in rows[0] if k != "prompt"]

    def _hold_out(self, rows: list[dict], what: str) -> tuple[list[dict], list[dict]]:
        """(train rows, held-out rows): the last eval_size rows of a seeded shuffle, at most half, said."""
        import random
        cfg = self.cfg
        order = list(range(len(rows)))
        random.Random(cfg.eval_seed).shuffle(order)
        n_eval = min(cfg.eval_size, len(rows) // 2)
        if n_eval:
            logger.warning("no eval data: %d of the %d rows of %s are held out for evaluation and not trained on "
                           "(eval_size %d, at most half the data; eval_seed %d). Give eval_dataset / eval_dataset_path "
                           "to choose them, or eval_size 0 to train on every row", n_eval, len(rows), what,
                           cfg.eval_size, cfg.eval_seed)
        return [rows[i] for i in order[:len(rows) - n_eval]], [rows[i] for i in order[len(rows) - n_eval:]]

    def _setup_rewards(self) -> None:
        """The reward functions, each guarded so that an item that raises is scored as missing."""
        cfg = self.cfg
        try:
            if self.reward_objects is None:
                funcs = get_reward_funcs(cfg.reward_funcs, self._reward_defaults())
            else:
                funcs = [self._reward_object(r, i) for i, r in enumerate(self.reward_objects)]
            names = [getattr(f, "__name__", str(i)) for i, f in enumerate(funcs)]
            check_reward_columns(funcs, names, self.columns)
        except ValueError as e:
            raise ConfigError(f"reward_funcs: {e}") from None
        try:  # after the column check, which reads the functions' own signatures
            funcs = [f if isinstance(f, RewardModel) else reward_timeout.bound(f, n, cfg.reward_timeout)
                     for f, n in zip(funcs, names)]
        except ValueError as e:
            raise ConfigError(f"reward_funcs: {e}") from None
        self._bounded = [f for f in funcs if isinstance(f, reward_timeout.Bounded)]
        self.reward_names = names
        self.reward_funcs = [guard_reward(f, n) for f, n in zip(funcs, names)]
        self.reward_weights = cfg.reward_weights or [1.0] * len(funcs)

    # ================================================================== helpers
    @contextlib.contextmanager
    def gathered(self, model):
        """The plain module of ``model`` (the policy's engine, or the reference), with ZeRO-3's partitioned
        weights gathered once for the whole block: a collective, entered by every rank alike. A module
        outside a DeepSpeed engine has no hooks that gather its weights, so each of its forwards must run
        inside this block. The engine's hooks are off inside it, so its forwards there are local: ranks may
        run different numbers of them (decoding stops at each rank's last end-of-sequence)."""
        engine, model = model, self._unwrap(model)
        if _partitioned(model):
            import deepspeed
            with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None), \
                    _zero3_hooks_off(engine):
                yield model
        else:
            yield model

    @contextlib.contextmanager
    def reference(self):
        """The model whose forward gives the reference log-probs (beta > 0): the frozen reference model,
        gathered for the block under ZeRO-3 (one gather for all its micro-batches); with LoRA, the policy
        itself, through its engine, with its adapters off (or the continued adapter's starting copy on),
        in eval mode so that no LoRA dropout applies."""
        if self.ref_model is not None:
            with self.gathered(self.ref_model) as ref:
                yield ref
            return
        inner = self.acc.unwrap_model(self.model)
        was_training = inner.training
        inner.eval()
        try:
            with lora.reference(inner):
                yield self.model
        finally:
            inner.train(was_training)

    def unwrapped_for_generation(self):
        """The plain policy module, with ZeRO-3's sharded weights gathered once for the whole block."""
        return self.gathered(self.model)

    def _render(self, rows: list[dict]) -> list[str]:
        """The prompt text of each row: a conversation through the chat template (system_prompt first
        unless it has its own system message); a string as it is (TRL's standard format)."""
        out = []
        for r in rows:
            prompt = r["prompt"]
            if is_conversational(prompt):
                out.append(render_messages(self.tokenizer, prompt, self.cfg.system_prompt))
                continue
            if not getattr(self, "_said_standard", False) and getattr(self.tokenizer, "chat_template", None):
                self._said_standard = True
                if self.acc.is_main_process:
                    logger.warning(
                        "string prompts (TRL's standard format) are tokenized as they are: no chat template and no "
                        "system_prompt, although this tokenizer has a chat template. (Before 0.2 grpo-scale "
                        "templated them.) To use the template, give each prompt as a list of messages: "
                        "[{\"role\": \"user\", \"content\": \"...\"}]")
            out.append(prompt)
        return out

    def _inputs(self, model, rb: Rollout, prefix_model) -> tuple[dict, int]:
        """(model inputs, how many of the last output positions to keep; the first T of those predict rb's
        T completion tokens) for the forward; shared-prompt inputs where the config allows."""
        inner = self._unwrap(model)
        share = self.share_prompt and not (inner.training and getattr(inner, "is_gradient_checkpointing", False))
        if share and model is self.model and self.zero_stage == 3:
            # Every forward through the ZeRO-3 engine gathers parameters collectively, and a shared forward
            # is two of them: all ranks must take the same path, or the gathers pair up wrongly and hang.
            # (A micro-batch with no repeated prompt on one rank only: a group of 3 over micro-batches of
            # 2 on 3 ranks.) The gathered reference and generation run on plain modules: no collective.
            share = self._on_all_ranks(can_share_prompt(rb))
        if share:
            try:
                inputs = shared_prompt_inputs(rb, prefix_model, self.cache_kw)
            except CacheNotRepeatable as e:
                self._stop_sharing(e)
                inputs = None
            if inputs is not None:
                return inputs, rb.completion_ids.shape[1]
        return full_inputs(rb), rb.completion_ids.shape[1] + 1

    def _make_engine(self) -> engines.Engine:
        """The rollout engine (``grpo_scale.engines``): our sampler, or vLLM when use_vllm."""
        cfg, acc = self.cfg, self.acc
        if not cfg.use_vllm:
            return engines.LocalEngine(self.model, self.tokenizer, self.gathered, share_prompt=self.share_prompt,
                                       on_unshareable=self._stop_sharing, stop=self.stop)
        inner = acc.unwrap_model(self.model)
        gather = engines.zero3_gather(_partitioned(inner))
        try:
            if cfg.vllm_mode == "server":
                return engines.VLLMServerEngine(engines.server_url(cfg), self.tokenizer, inner, acc.device, gather,
                                                timeout=cfg.vllm_server_timeout, accelerator=acc)
            path = self._vllm_model_path()
            dtype = next(p for p in inner.parameters()).dtype
            rows = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
            engine = engines.VLLMColocateEngine(
                path, self.tokenizer, inner, acc.device, gather, dtype=dtype, max_model_len=engines.max_model_len(cfg),
                max_rows=rows, seed=cfg.seed, gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                tensor_parallel_size=cfg.vllm_tensor_parallel_size, enable_sleep_mode=cfg.vllm_enable_sleep_mode,
                rank=acc.process_index, local_rank=acc.local_process_index, world_size=acc.num_processes,
                trust_remote_code=cfg.trust_remote_code)
        except engines.EngineError as e:
            raise ConfigError(f"use_vllm: {e}") from None
        acc.wait_for_everyone()  # every rank's engine is up before the first collective of the run
        return engine

    def _vllm_model_path(self) -> str:
        """The folder vLLM loads its starting weights and configuration from: the model files the policy came
        from (a LoRA adapter's base); a model object passed in must name a folder (config._name_or_path)."""
        if self.model_object is None:
            path = self.cfg.resolved_model_path
            return adapter_base(path) if is_adapter_dir(path) else path
        name = getattr(getattr(self.acc.unwrap_model(self.model), "config", None), "_name_or_path", "")
        if name and Path(name).is_dir():
            return name
        raise engines.EngineError("vLLM builds its engine from model files, and the model object passed in names "
                                  f"no local folder (config._name_or_path={name!r}); save it with save_pretrained "
                                  "and pass the folder as model_name_or_path")

    def _stop_sharing(self, why: CacheNotRepeatable) -> None:
        """share_prompt off for the rest of the run (every rank reaches this at the same point)."""
        self.share_prompt = False
        if isinstance(getattr(self, "engine", None), engines.LocalEngine):
            self.engine.share_prompt = False
        if self.acc.is_main_process:
            logger.warning("share_prompt: the KV cache of this model (%s) cannot be repeated for each completion "
                           "of a group; running one full forward per completion instead", why.kinds)

    def _packed(self, model, rb: Rollout) -> Optional[packing.Packed]:
        """rb packed for a padding-free forward (``padding_free``), or None for the padded one."""
        if not self.padding_free:
            return None
        packed = self._pack(self._unwrap(model), rb)
        if model is self.model and self.zero_stage == 3:
            # The packed forward calls the decoder and the lm_head, the padded one the engine: under ZeRO-3
            # every rank must take the same path (their parameter gathers pair up).
            if not self._on_all_ranks(packed is not None):
                return None
        return packed

    def _unwrap(self, model):
        """``acc.unwrap_model(model)``, remembered per model: Accelerate looks up the installed packages on
        every call (3 ms each, twice in each micro-batch)."""
        hit = self._unwrapped.get(id(model))
        if hit is None or hit[0] is not model:
            hit = self._unwrapped[id(model)] = (model, self.acc.unwrap_model(model))
        return hit[1]

    def _pack(self, inner, rb: Rollout, cost_per_key: Optional[float] = None) -> Optional[packing.Packed]:
        """rb packed for ``inner`` (the plain model): with structured attention one row, attention kept within
        each sequence by index; otherwise rows laid out by the dense mask's cost model."""
        segments = self.packed_segments and attention.enabled(inner)
        if cost_per_key is None:
            cost_per_key = 0.0 if segments else packing.key_cost(inner.config)
        return packing.pack(rb.prompt_ids, rb.prompt_mask, rb.completion_ids, rb.attention_mask,
                            rb.prompt_runs().tolist() if self.share_prompt else None, cost_per_key,
                            dtype=inner.get_input_embeddings().weight.dtype, segments=segments)

    def _logits(self, model, rb: Rollout) -> torch.Tensor:
        """Policy logits [N, T, V] for the completion positions only (no full-sequence logits)."""
        if self.padding_free:  # the decoder, then the head at the real completion positions only
            hidden, head = self._hidden(model, rb)
            real = rb.attention_mask.bool()
            if bool(real.all()):
                return head(hidden)
            out = head(hidden[real])  # [K, V]; positions past a completion's end get logits 0 (masked)
            logits = out.new_zeros(*real.shape, out.shape[-1])
            logits[real] = out
            return logits
        inputs, keep = self._inputs(model, rb, model)
        return model(**inputs, logits_to_keep=keep).logits[:, :rb.completion_ids.shape[1]]

    def _hidden(self, model, rb: Rollout) -> tuple[torch.Tensor, torch.nn.Module]:
        """Last hidden states [N, T, H] of the completion positions, and the lm_head module."""
        inner = self._unwrap(model)
        decoder = inner.get_decoder()
        packed = self._packed(model, rb)
        if packed is not None:
            return packed.gather(decoder(**packed.inputs()).last_hidden_state), inner.get_output_embeddings()
        inputs, keep = self._inputs(model, rb, decoder)
        hidden = decoder(**inputs).last_hidden_state[:, -keep:]
        return hidden[:, :rb.completion_ids.shape[1]], inner.get_output_embeddings()

    def _structured_attention_fits(self) -> bool:
        """Switches the policy and the reference model to ``attention.NAME`` (a group's prompt held once in
        decoding) where the architecture allows it, and checks on a small made-up batch that decoding gives
        the logits of the repeated cache; off with a warning where it does not. Under the same gather, the
        decoding steps computed from the policy's weights (``decoding.DecodeStep``) are checked against its
        forward where its architecture is one they reproduce: on where they agree (``self.decode_step``);
        the model's forward where not (silently for a LoRA or quantized model or another architecture,
        with a warning where the check fails)."""
        inner = self.acc.unwrap_model(self.model)
        if not attention.enable(inner):
            return False
        vocab = min(int(getattr(inner.config, "vocab_size", 0) or 1000), 1000)
        was_training = inner.training
        inner.eval()
        why = decode_problem = "not checked"
        try:
            with self.gathered(self.model) as plain:
                problem = prefix_decoding_problem(plain, vocab)
                why = decoding.supported(plain)
                if problem is None and why is None:
                    try:
                        last_layer.enable(plain)  # the decoding steps' prefill: the last layer's cache alone
                        decode_problem = decoding.decoding_problem(plain, vocab)
                    except Exception as e:  # noqa: BLE001 - any failure means: decode through the forward
                        decode_problem = f"it raised {type(e).__name__}: {str(e)[:200]}"
        except Exception as e:  # noqa: BLE001 - any refusal means: keep plain sdpa for this model
            problem = f"decoding with it raised {type(e).__name__}: {str(e)[:200]}"
        finally:
            inner.train(was_training)
        fits = self._on_all_ranks(problem is None)
        if not fits:
            attention.disable(inner)
            if self.acc.is_main_process:
                logger.warning("structured attention: turned off for this model (%s); decoding repeats each "
                               "prompt's cache for its completions", problem or "the check failed on another rank")
            return False
        if self.ref_model is not None:
            attention.enable(self.ref_model)
        self.decode_step = self._on_all_ranks(why is None and decode_problem is None)
        if self.decode_step:
            decoding.enable(inner)
        elif why is None and self.acc.is_main_process:
            logger.warning("decoding steps: computed by the model's forward (%s)",
                           decode_problem or "the check failed on another rank")
        return True

    def _packing_fits(self) -> bool:
        """Whether the padding-free forward gives this model's padded-forward logits (up to rounding), on
        a small made-up micro-batch: two prompts of different lengths, groups of two, completions of
        different lengths (one empty but its end). A model that ignores or refuses a 4D attention mask
        (flash-attention), or whose head does more than the output embedding (logit soft-capping), fails
        it, and padding_free is turned off with a warning. With structured attention the packed rows are
        checked with ``attention.Segments`` first, and with the dense mask where that differs; with
        segments, the last layer computes the used positions only (``last_layer``) where the architecture
        allows it, checked the same way, and at every position where that differs. Uses no global random
        state."""
        if self.packed_segments:
            inner = self._unwrap(self.model)
            self.last_layer = last_layer.enable(inner)
            problem = self._packing_problem()
            if self.last_layer and not self._on_all_ranks(problem is None):
                last_layer.disable(inner)
                self.last_layer = False
                if self.acc.is_main_process:
                    logger.warning("last layer: computed at every position of packed rows (%s)",
                                   problem or "the check failed on another rank")
                problem = self._packing_problem()
            if self._on_all_ranks(problem is None):
                if self.last_layer and self.ref_model is not None:
                    last_layer.enable(self.ref_model)
                return True
            last_layer.disable(inner)
            self.last_layer = False
            self.packed_segments = False
            if self.acc.is_main_process:
                logger.warning("structured attention: packed rows use a dense mask for this model (%s)",
                               problem or "the check failed on another rank")
        problem = self._packing_problem()
        fits = self._on_all_ranks(problem is None)
        if not fits and self.acc.is_main_process:
            logger.warning("padding_free: turned off for this model (%s); forwards run padded",
                           problem or "the check failed on another rank")
        return fits

    def _packing_problem(self) -> Optional[str]:
        """Why the packed forward's logits differ from the padded forward's on the made-up micro-batch of
        ``_packing_fits``, or None."""
        gen = torch.Generator().manual_seed(0)
        inner = self.acc.unwrap_model(self.model)
        vocab = min(int(getattr(inner.config, "vocab_size", 0) or 1000), 1000)  # (ZeRO-3 shards the weights)
        pad = pad_id(self.tokenizer, inner)
        prompts = [torch.randint(1, vocab, (n,), generator=gen) for n in (5, 5, 3, 3)]
        prompts = [prompts[0], prompts[0], prompts[2], prompts[2]]  # two groups of two
        lengths = [4, 1, 6, 3]
        ones = lambda n: torch.ones(1, n, dtype=torch.long)
        completion_mask = pad_cat([ones(n) for n in lengths], 0, left=False)
        dev = self.acc.device
        rb = Rollout(pad_cat([p.unsqueeze(0) for p in prompts], pad, left=True).to(dev),
                     pad_cat([ones(len(p)) for p in prompts], 0, left=True).to(dev),
                     pad_cat([torch.randint(1, vocab, (1, n), generator=gen) for n in lengths], pad, left=False).to(dev),
                     completion_mask.to(dev), completion_mask.to(dev), torch.zeros(4, dtype=torch.bool, device=dev),
                     [""] * 4, [""] * 4)
        was_training = inner.training
        inner.eval()
        try:
            with torch.no_grad(), self.gathered(self.model) as plain:
                padded = plain(**full_inputs(rb)).logits[:, -rb.completion_ids.shape[1] - 1:-1].float()
                packed = self._pack(plain, rb, PROBE_KEY_COST)
                hidden = packed.gather(plain.get_decoder()(**packed.inputs()).last_hidden_state)
                logits = plain.get_output_embeddings()(hidden).float()
            active = rb.attention_mask.bool()
            err = float((logits - padded)[active].abs().max())
            scale = 1.0 + float(padded[active].abs().max())
            tol = 1e-4 if inner.get_input_embeddings().weight.dtype == torch.float32 else 3e-2
            problem = None if err <= tol * scale else f"its logits differ from the padded forward's by {err:.3g}"
        except Exception as e:  # noqa: BLE001 - any refusal means: do not pack this model
            problem = f"the packed forward raised {type(e).__name__}: {str(e)[:200]}"
        finally:
            inner.train(was_training)
        return problem

    @torch.no_grad()
    def _logps(self, model, rollout: Rollout) -> torch.Tensor:
        mb = self.cfg.per_device_train_batch_size
        parts = []
        for s in range(0, len(rollout), mb):
            rb = rollout.select(slice(s, s + mb))
            parts.append(self.backend.logps(self._logits(model, rb), rb.completion_ids, self.cfg.temperature))
        return torch.cat(parts)

    # ================================================================== one step
    def generate_and_score(self) -> dict:
        """Sample this process's share of a generation batch, score it, and compute advantages. With
        dynamic_sampling, rounds of prompts are sampled until the batch is full of groups whose rewards
        differ (``grpo_scale.dynamic``)."""
        cfg, acc = self.cfg, self.acc
        G, W, rank = cfg.num_generations, acc.num_processes, acc.process_index
        self._reward_logs, self._reward_extra = defaultdict(list), {}
        if cfg.dynamic_sampling:
            rollout, all_total, all_per_func, m = self._sample_dynamic()
        else:
            s = self._sample_round()
            rollout, all_total, all_per_func = s["rollout"], s["all_total"], s["all_per_func"]
            m = {"time/generate_s": s["generate_s"], "time/reward_s": s["reward_s"]}
            if cfg.use_vllm:  # within time/generate_s
                m["time/weight_sync_s"] = s["weight_sync_s"]
            self.sampling["prompts"] += s["prompts"]
        n = len(rollout)  # this rank's share (all ranks train the same number)
        adv, group_std = group_advantages(all_total.cpu(), G, cfg.scale_rewards)
        advantages = adv[rank * n:(rank + 1) * n].to(acc.device)
        t2 = time.perf_counter()
        batch = {"rollout": rollout, "advantages": advantages, "old_logps": None, "ref_logps": None}
        if cfg.num_iterations > 1:
            batch["old_logps"] = self._logps(self.model, rollout)
        if cfg.beta > 0:
            with self.reference() as ref:
                batch["ref_logps"] = self._logps(ref, rollout)
        self._stop_point("log-probs")
        t3 = time.perf_counter()
        # dapo: tokens of the whole trained batch on all ranks, per process and micro-step, because the
        # backward divides by gradient_accumulation_steps and DeepSpeed averages over processes.
        active = acc.reduce(rollout.completion_mask.sum().float().to(acc.device), "sum")
        batch["num_items_in_batch"] = active / (W * cfg.gradient_accumulation_steps)
        valid = ~torch.isnan(all_total)
        lengths = acc.gather(rollout.attention_mask.sum(1).float().to(acc.device))
        n_tokens = acc.reduce(torch.tensor(float(rollout.prompt_mask.sum() + rollout.attention_mask.sum()),
                                           device=acc.device), "sum")
        m.update({f"reward/{name}": _nanmean(all_per_func[:, i]) for i, name in enumerate(self.reward_names)})
        m.update({
            "reward/mean": float(all_total[valid].mean()) if valid.any() else float("nan"),
            "reward/std": float(all_total[valid].std()) if valid.sum() > 1 else 0.0,
            "reward/group_std": float(group_std.mean()),
            "reward/frac_zero_std": float((~dynamic.has_spread(group_std)).float().mean()),
            "completion/mean_length": float(lengths.mean()),
            "completion/truncated_rate": float(acc.gather(rollout.is_truncated.float().to(acc.device)).mean()),
            "advantage/std": float(adv.std()),
            "time/logps_s": t3 - t2,
            "tokens": float(n_tokens),
        })
        m.update(self._gathered_reward_logs())
        batch["metrics"] = m
        return batch

    def _sample_round(self) -> dict:
        """One generation batch of prompts from the stream (the same on every rank): this rank's completions
        of them, scored, and the whole batch's rewards gathered from every rank (groups consecutive)."""
        cfg, acc = self.cfg, self.acc
        G, W, rank = cfg.num_generations, acc.num_processes, acc.process_index
        local = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
        rows = self.stream.take(local * W // G)          # the same prompts on every rank
        if cfg.assistant_prefix:  # the reply opened (R1-style '<think>'): rewards see it in the prompt
            rows = [{**r, "prompt": open_reply(r["prompt"], cfg.assistant_prefix)} for r in rows]
        slots = [row for row in rows for _ in range(G)]   # global completion slots, groups consecutive
        mine = slots[rank * local:(rank + 1) * local]
        t0 = time.perf_counter()
        sampling = engines.Sampling(max_new_tokens=cfg.max_completion_length, max_prompt_length=cfg.max_prompt_length,
                                    do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                    mask_truncated=cfg.mask_truncated_completions, with_logps=True)
        # vLLM draws each completion from a seed of the trainer's generator (saved in checkpoints); our sampler
        # draws from the generator itself
        seeds = None if isinstance(self.engine, engines.LocalEngine) else \
            torch.randint(0, engines.SEED_RANGE, (len(mine),)).tolist()
        synced = self.engine.sync_s
        rollout = self.engine.generate(self._render(mine), sampling, seeds=seeds)
        sync_s = self.engine.sync_s - synced
        self._stop_point("generation")
        t1 = time.perf_counter()
        columns = {k: [r.get(k) for r in mine] for k in mine[0] if k != "prompt"}
        prompts = [r["prompt"] for r in mine]  # as the data set has them
        completions = rollout.completions
        if is_conversational(prompts[0]):
            completions = [[{"role": "assistant", "content": c}] for c in completions]
        extras = {"completion_ids": [ids[m.bool()].tolist() for ids, m in
                                     zip(rollout.completion_ids.cpu(), rollout.attention_mask.cpu())],
                  "trainer_state": self._reward_state(), "log_metric": self._log_metric,
                  "log_extra": self._log_extra}
        per_func, total = compute_rewards(self.reward_funcs, self.reward_weights, prompts, completions, columns,
                                          names=self.reward_names, extras=extras)
        self._check_reward_failures()
        self._stop_point("scoring")
        return {"rollout": rollout, "all_total": acc.gather(total.to(acc.device)).cpu(),
                "all_per_func": acc.gather(per_func.to(acc.device)).cpu(), "prompts": len(rows),
                "generate_s": t1 - t0, "reward_s": time.perf_counter() - t1, "weight_sync_s": sync_s}

    def _sample_dynamic(self) -> tuple[Rollout, torch.Tensor, torch.Tensor, dict]:
        """DAPO's dynamic sampling: rounds until the kept groups fill the batch or max_sampling_rounds ran
        out, then every rank's share of the chosen completions (see ``grpo_scale.dynamic``). Returns
        (rollout, totals [K], per-function rewards [K, F], metrics) for the K chosen completions."""
        cfg, acc = self.cfg, self.acc
        G, W, GA = cfg.num_generations, acc.num_processes, cfg.gradient_accumulation_steps
        local = cfg.per_device_train_batch_size * GA
        need, unit = local * W // G, dynamic.lcm_unit(G, W, GA) // G
        rounds, kept = [], 0
        while len(rounds) < cfg.max_sampling_rounds and kept < need:
            s = self._sample_round()
            s["spread"] = group_advantages(s["all_total"], G, "none")[1]
            kept += int(dynamic.has_spread(s["spread"]).sum())
            rounds.append(s)
        sel = dynamic.select([s["spread"] for s in rounds], need, unit)
        chosen = dynamic.slots(sel.groups, G)
        all_total = torch.stack([rounds[r]["all_total"][j] for r, j in chosen])
        all_per_func = torch.stack([rounds[r]["all_per_func"][j] for r, j in chosen])
        rollout = self._share_of([s["rollout"] for s in rounds], chosen, local)
        self._reward_extra = {}  # log_extra columns follow one round's rows, not the chosen ones
        totals = self.sampling
        totals["prompts"] += sum(s["prompts"] for s in rounds)
        totals["rounds"] += sel.rounds
        totals["dropped_groups"] += sel.dropped
        totals["short_steps"] += sel.short
        if sel.short and acc.is_main_process:
            logger.warning("step %d: dynamic sampling kept %d of the %d groups the batch needs after "
                           "max_sampling_rounds=%d rounds; training on %d groups (%d completions per process)%s",
                           self.step + 1, len(sel.groups) - sel.filled + sel.surplus, need, cfg.max_sampling_rounds,
                           len(sel.groups), len(rollout),
                           f", {sel.filled} of them without reward spread" if sel.filled else "")
        sampled = torch.cat([s["all_total"] for s in rounds])
        return rollout, all_total, all_per_func, {
            "time/generate_s": sum(s["generate_s"] for s in rounds),
            "time/reward_s": sum(s["reward_s"] for s in rounds),
            "dynamic/rounds": float(sel.rounds), "dynamic/sampled_groups": float(sel.sampled),
            "dynamic/dropped_groups": float(sel.dropped), "dynamic/surplus_groups": float(sel.surplus),
            "dynamic/filled_groups": float(sel.filled), "dynamic/trained_groups": float(len(sel.groups)),
            "dynamic/short_batch": float(sel.short),
            "dynamic/frac_zero_std_sampled": (sel.dropped + sel.filled) / max(1, sel.sampled),
            "dynamic/reward_mean_sampled": _nanmean(sampled),
            "dynamic/prompts_total": float(totals["prompts"]), "dynamic/rounds_total": float(totals["rounds"]),
            "dynamic/dropped_groups_total": float(totals["dropped_groups"]),
        }

    def _share_of(self, parts: list[Rollout], chosen: list[tuple[int, int]], local: int) -> Rollout:
        """This rank's share of the ``chosen`` completions, given as (round, global slot) in training
        order: ``parts`` are this rank's rollouts of each round (slots rank*local ... +local). The rank
        that sampled a completion sends it (ids and masks in one gather, texts in one object gather);
        every rank gets an equal, consecutive share."""
        acc = self.acc
        W, rank = acc.num_processes, acc.process_index
        pad = pad_id(self.tokenizer, acc.unwrap_model(self.model))
        mine = Rollout.cat(parts, pad)
        n = len(chosen) // W
        if W == 1:
            return mine.rows([r * local + j for r, j in chosen]).trimmed()
        owner = [j // local for _, j in chosen]
        sent = [[k for k, o in enumerate(owner) if o == w] for w in range(W)]  # positions in chosen, per sender
        out = mine.rows([chosen[k][0] * local + chosen[k][1] - rank * local for k in sent[rank]])
        P, T = (int(x) for x in acc.gather(torch.tensor([[out.prompt_ids.shape[1], out.completion_ids.shape[1]]],
                                                            device=acc.device)).max(0).values)
        R = max(len(k) for k in sent)

        def padded(t, width, value, left):
            t = pad_cat([t], value, left, width)
            return torch.cat([t, t.new_full((R - t.shape[0], width), value)])

        has_lp = out.sampling_logps is not None  # the sampler's fp32 log-probs travel bit-cast to integers
        packed = torch.cat([padded(out.prompt_ids, P, pad, True), padded(out.prompt_mask, P, 0, True),
                            padded(out.completion_ids, T, pad, False), padded(out.completion_mask, T, 0, False),
                            padded(out.attention_mask, T, 0, False),
                            padded(out.is_truncated.long().unsqueeze(1), 1, 0, False)]
                           + ([padded(out.sampling_logps.view(torch.int32).long(), T, 0, False)] if has_lp else []),
                           dim=1)
        every = acc.gather(packed.to(acc.device))  # [W * R, 2P + 3T + 1 (+ T)]
        from accelerate.utils import gather_object
        texts = gather_object([list(zip(out.prompts, out.completions))])  # one list per rank
        at = {k: (w, i) for w in range(W) for i, k in enumerate(sent[w])}
        rows = [at[k] for k in range(rank * n, (rank + 1) * n)]
        got = every[torch.tensor([w * R + i for w, i in rows], device=every.device)].to(out.completion_ids.device)
        cols = torch.split(got, [P, P, T, T, T, 1] + ([T] if has_lp else []), dim=1)
        return Rollout(*cols[:5], cols[5].squeeze(1).bool(), [texts[w][i][0] for w, i in rows],
                       [texts[w][i][1] for w, i in rows],
                       cols[6].to(torch.int32).view(torch.float32) if has_lp else None).trimmed()

    # ------------------------------------------------------------------ reward contract helpers
    def _reward_state(self):
        """What reward functions get as ``trainer_state`` (transformers' TrainerState, as in TRL)."""
        from transformers import TrainerState
        return TrainerState(global_step=self.step, max_steps=self.cfg.max_steps,
                            is_world_process_zero=self.acc.is_main_process)

    def _log_metric(self, name: str, value: float) -> None:
        self._reward_logs[str(name)].append(float(value))

    def _log_extra(self, name: str, values: list) -> None:
        self._reward_extra[str(name)] = list(values)

    def _gathered_reward_logs(self) -> dict:
        """The log_metric values of this rollout, averaged over calls and ranks (one collective, of
        objects, so ranks may log different names)."""
        from accelerate.utils import gather_object
        mine = {k: (sum(v), len(v)) for k, v in self._reward_logs.items()}
        every = gather_object([mine]) if self.acc.num_processes > 1 else [mine]
        sums: dict = defaultdict(lambda: [0.0, 0])
        for d in every:
            for k, (total, count) in d.items():
                sums[k][0] += total
                sums[k][1] += count
        return {k: total / count for k, (total, count) in sums.items() if count}

    def _check_reward_failures(self) -> None:
        """Stop the run when a reward function raised on every item, on every rank, for
        reward_fail_steps rollouts in a row (one small all-reduce; every rank decides alike)."""
        failed = torch.tensor([float(getattr(f, "failure", None) is not None) for f in self.reward_funcs],
                              device=self.acc.device)
        everywhere = self.acc.reduce(failed, "sum") >= self.acc.num_processes
        if not hasattr(self, "_fail_streak"):
            self._fail_streak = [0] * len(self.reward_funcs)
        for i, (f, bad) in enumerate(zip(self.reward_funcs, everywhere.tolist())):
            self._fail_streak[i] = self._fail_streak[i] + 1 if bad else 0
            if self._fail_streak[i] >= self.cfg.reward_fail_steps:
                why = f.failure or "(on the other ranks)"
                raise RewardFailed(
                    f"reward function {self.reward_names[i]} raised on every item for {self._fail_streak[i]} rollouts "
                    f"in a row ({why}); nothing was trained on its scores. Fix the function: it is called as "
                    "fn(prompts, completions, completion_ids, trainer_state, log_metric, log_extra, **columns), "
                    "with completions as strings for string prompts and as [{'role': 'assistant', 'content': ...}] "
                    "for conversational ones (or raise reward_fail_steps)")

    def grpo_step(self, batch: dict) -> dict:
        """num_iterations optimiser steps on one rollout, each over gradient_accumulation_steps micro-batches.

        A step whose loss (on any rank, any micro-batch) or gradient norm is not finite is skipped on every
        rank: no optimiser update; it is counted, logged, and still advances ``self.step`` and the
        learning-rate schedule (the rollout was consumed).
        """
        cfg, acc = self.cfg, self.acc
        # per_device_train_batch_size, or less for a short dynamic-sampling batch: always GA micro-batches
        rollout = batch["rollout"]
        mb = len(rollout) // cfg.gradient_accumulation_steps
        sums: dict[str, float] = defaultdict(float)
        n = skipped = 0
        gaps = []
        t0 = time.perf_counter()
        for it in range(cfg.num_iterations):
            bad = False
            self.step_spec = self._step_spec()  # what _micro_loss computes during this optimiser step
            window = 0.0  # the bonus tokens' entropy sum and count, [2], over this step's micro-batches
            for s in range(0, len(rollout), mb):
                if it == 0 and s:  # before the optimiser update, a stop abandons the step
                    self._stop_point("backward")
                idx = slice(s, s + mb)
                rb = rollout.select(idx)
                with acc.accumulate(self.model):
                    out = self._micro_loss(rb, batch, idx)
                    bad = bad or not self._finite_on_all_ranks(out.loss)
                    # The loss function folds 1/GA into the gradient it stores, and backward runs on
                    # loss * GA, which Accelerate/DeepSpeed divide by GA again: the upstream gradient is
                    # exactly 1, so the fused kernels' backward moves no logits bytes.
                    loss = out.loss * cfg.gradient_accumulation_steps
                    if bad:
                        # Poison the gradient rather than skip the backward: every rank still runs its
                        # collectives, and the non-finite check at the boundary (DeepSpeed's overflow
                        # check, or the grad norm below) then drops the whole accumulated step everywhere.
                        loss = loss * float("nan")
                    acc.backward(loss)
                    if acc.sync_gradients:
                        if it == 0 and not self.deepspeed:  # (DeepSpeed's backward has stepped already)
                            self._stop_point("backward")
                        bad = self._finish_step(bad, sums)
                for key in ("loss", "kl_mean", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region",
                            "entropy_mean"):
                    sums[key] += float(getattr(out, key).detach())
                if cfg.importance_sampling_correction:
                    sums["importance_sampling_ratio_mean"] += float(out.importance_sampling_ratio_mean)
                if cfg.off_policy_mask_threshold is not None:
                    sums["off_policy_masked"] += float(out.off_policy_masked)
                if cfg.use_adaptive_entropy:  # on the device: no wait per micro-batch
                    window = window + torch.stack([out.bonus_entropy_mean * out.bonus_tokens, out.bonus_tokens])
                if it == 0 and rb.sampling_logps is not None:
                    gaps.append(self._sampler_gap(out, rb))
                n += 1
            if cfg.use_adaptive_entropy:
                self._update_entropy_control(window)
            skipped += bad
            self._count_bad_step(bad)
            self.scheduler.step()
            self.engine.mark_stale()
            self.step += 1
        m = {k: v / (n if k != "grad_norm" else cfg.num_iterations) for k, v in sums.items()}
        m = {k: float(acc.reduce(torch.tensor(v, device=acc.device), "mean")) for k, v in m.items()}
        m["skipped_step"] = skipped / cfg.num_iterations
        if gaps:  # how far the sampler's log-probs are from the training forward's (rounding, top-k / top-p)
            g = acc.gather(torch.stack(gaps).to(acc.device))  # [micro-batches of all ranks, 2]: one wait
            m["sampling/logp_gap_mean"], m["sampling/logp_gap_max"] = float(g[:, 0].mean()), float(g[:, 1].max())
        if cfg.entropy_coef or cfg.use_adaptive_entropy:
            m["entropy_coef"] = self.entropy_control["coef"] if cfg.use_adaptive_entropy else cfg.entropy_coef
        m["time/train_s"] = time.perf_counter() - t0
        m["lr"] = self.scheduler.get_last_lr()[0]
        return m

    def _stop_point(self, where: str) -> None:
        """A point where every rank asks whether any rank received a stop signal (one small all-reduce);
        raises StopRequested on every rank alike when one did."""
        signum = self.stop.signum or 0
        if self.acc.num_processes > 1:
            flag = torch.tensor(float(signum), device=self.acc.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            signum = int(flag)
        if signum:
            self._stop_signal = signum
            raise preemption.StopRequested(where)

    def _finite_on_all_ranks(self, loss: torch.Tensor) -> bool:
        """True when the loss is finite on every rank, so all ranks decide alike."""
        return self._on_all_ranks(bool(torch.isfinite(loss.detach()).all()))

    def _on_all_ranks(self, ok: bool) -> bool:
        """True when ``ok`` holds on every rank (one small all-reduce)."""
        flag = torch.tensor(0.0 if ok else 1.0, device=self.acc.device)
        return float(self.acc.reduce(flag, "sum")) == 0.0

    def _finish_step(self, bad: bool, sums: dict) -> bool:
        """The optimiser step at an accumulation boundary, unless ``bad`` or the gradient norm is not
        finite. Returns whether the step was bad (skipped)."""
        cfg = self.cfg
        if self.deepspeed:  # acc.backward has already run engine.step(), which drops non-finite steps
            applied = self.model.was_step_applied()
            gn = self.model.get_global_grad_norm()
            if gn is not None:
                sums["grad_norm"] += float(gn)
            if bad and applied:
                raise RuntimeError("DeepSpeed applied an optimiser step with non-finite gradients: this DeepSpeed "
                                   "optimiser does not check for overflow; use ZeRO stage 2 or 3")
            # fp16: the loss scaler skips overflowing steps as routine, so they do not count as bad
            return bad or (not applied and not cfg.fp16)
        # max_grad_norm 0: clip at infinity, which only measures the norm
        gn = float(self.acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm or float("inf")))
        sums["grad_norm"] += gn
        if self.acc.scaler is None:
            bad = bad or not math.isfinite(gn)
            if not bad:
                self.optimizer.step()
        else:  # the GradScaler skips non-finite gradients itself (and lowers its scale)
            self.optimizer.step()
        self.optimizer.zero_grad()
        return bad

    def _count_bad_step(self, bad: bool) -> None:
        if not bad:
            self.bad_in_a_row = 0
            return
        self.skipped_steps += 1
        self.bad_in_a_row += 1
        if self.acc.is_main_process:  # every rank took the same decision: say it once
            logger.warning("step %d skipped: non-finite loss or gradient norm (%d in a row, %d in total; the "
                           "run stops after max_bad_steps=%d in a row)", self.step + 1, self.bad_in_a_row,
                           self.skipped_steps, self.cfg.max_bad_steps)

    def _step_spec(self):
        """The loss spec of this optimiser step: with use_adaptive_entropy, TRL's rule applies the current
        coefficient only while the last step's entropy was at or below entropy_target."""
        cfg = self.cfg
        if not cfg.use_adaptive_entropy:
            return self.loss_spec
        c = self.entropy_control
        coef = c["coef"] if c["last_entropy"] is not None and c["last_entropy"] <= cfg.entropy_target else 0.0
        return self.loss_spec if coef == self.loss_spec.entropy_coef else self.loss_spec.replace(entropy_coef=coef)

    def _update_entropy_control(self, window: torch.Tensor) -> None:
        """After an optimiser step: the mean entropy of the step's bonus tokens on all ranks ([sum, count]
        of its micro-batches) moves the adaptive coefficient by entropy_coef_delta, within its bounds."""
        cfg, c = self.cfg, self.entropy_control
        total = self.acc.reduce(window.to(device=self.acc.device, dtype=torch.float64), "sum")
        entropy = float(total[0] / total[1].clamp(min=1.0))
        step = cfg.entropy_coef_delta if entropy <= cfg.entropy_target else -cfg.entropy_coef_delta
        c["coef"] = min(max(c["coef"] + step, cfg.entropy_coef_min), cfg.entropy_coef_max)
        c["last_entropy"] = entropy

    def _gather_entropies(self, local: torch.Tensor) -> torch.Tensor:
        """Every rank's active entropies, for top_entropy_quantile (padded with a negative sentinel)."""
        acc = self.acc
        if acc.num_processes == 1:
            return local
        padded = acc.pad_across_processes(local.to(acc.device), dim=0, pad_index=-1e9)
        every = acc.gather(padded)
        return every[every != -1e9].to(local.device)

    def _micro_loss(self, rb: Rollout, batch: dict, idx: slice):
        cfg, spec = self.cfg, self.step_spec
        args = (rb.completion_ids, batch["advantages"][idx], rb.completion_mask,
                None if batch["old_logps"] is None else batch["old_logps"][idx],
                None if batch["ref_logps"] is None else batch["ref_logps"][idx])
        kwargs = dict(spec=spec, sampling_logps=rb.sampling_logps if cfg.needs_sampler_logps else None,
                      num_items_in_batch=batch["num_items_in_batch"],
                      gather=self._gather_entropies if spec.top_entropy_quantile < 1 else None,
                      grad_scale=1.0 / cfg.gradient_accumulation_steps)
        if self.loss_impl == "fused_linear":
            hidden, head = self._hidden(self.model, rb)
            return head(hidden, args=args, **kwargs)  # inside lm_head: ZeRO-3 gathers its weight
        return self.backend.loss(self._logits(self.model, rb), args, **kwargs)

    @staticmethod
    def _sampler_gap(out, rb: Rollout) -> torch.Tensor:
        """[mean, max] |trainer - sampler| log-prob over the active tokens (before any update), on the device."""
        active = rb.completion_mask.bool().to(out.per_token_logps.device)
        gap = (out.per_token_logps.float() - rb.sampling_logps.to(out.per_token_logps.device)).abs()
        count = active.sum()
        return torch.stack([torch.where(active, gap, 0.0).sum() / count.clamp(min=1),
                            torch.where(active, gap, 0.0).max() if gap.numel() else gap.new_zeros(())])

    # ================================================================== evaluation
    SAMPLES_SHOWN = 6  # held-out prompts shown before and after training in samples.md

    @torch.no_grad()
    def evaluate(self, num_samples: int = 1, records: list | None = None, progress: bool = False) -> dict:
        """Held-out figures (``grpo_scale.evaluate``): greedy strict accuracy (the correctness reward) as
        ``accuracy``, lenient accuracy, format rate and completion length, overall and per task family and
        level; all ranks share the work. Rows whose expected answer is missing or unreadable are left out;
        with none left (data without an ``answer`` column) the figures are None and no generation runs.
        ``records`` receives this rank's answers (see ``grpo_scale.evaluate.run``)."""
        from grpo_scale import evaluate as evaluation
        if not self.is_set_up:
            self.setup()
        cfg, acc = self.cfg, self.acc
        empty = {"accuracy": None, "accuracy_lenient": None, "format_rate": None, "completion_length": None, "n": 0}
        if not self.eval_rows:
            return empty
        if not any(r.get("answer") is not None for r in self.eval_rows):
            if not getattr(self, "_said_no_answer", False) and acc.is_main_process:
                logger.warning("the held-out data has no 'answer' column: held-out accuracy is not computed (the "
                               "correctness reward needs one); summary.json reports null")
            self._said_no_answer = True
            return empty
        rows = self.eval_rows[acc.process_index::acc.num_processes]
        mine = [] if records is None else records
        reduce = (lambda t: acc.reduce(t.to(acc.device), "sum").cpu()) if acc.num_processes > 1 else None
        with self.unwrapped_for_generation() as model:
            result = evaluation.run(
                model, self.tokenizer, rows, self._render, all_rows=self.eval_rows, batch_size=cfg.eval_batch_size,
                max_prompt_length=cfg.max_prompt_length, max_new_tokens=cfg.max_completion_length,
                assistant_prefix=cfg.assistant_prefix, num_samples=num_samples, temperature=cfg.temperature,
                top_p=cfg.top_p, top_k=cfg.top_k, reduce=reduce, records=mine, progress=progress)
        self._last_eval_records = mine[:self.SAMPLES_SHOWN]
        for r in mine[:3]:
            logger.info("eval sample | %s | expected %s | %r", r["question"], r["answer"], r["completions"][0])
        return result

    def _record_eval(self, when: str, result: dict) -> None:
        """Keep an evaluation for rewards.png (held-out accuracy against the step) and samples.md."""
        self.eval_history.append({"step": self.step, **result})
        if when in ("before", "after"):
            self.eval_samples[when] = getattr(self, "_last_eval_records", [])
        self.acc.log({f"eval/{k}": v for k, v in result.items() if v is not None}, step=self.step)

    # ================================================================== training loop
    def train(self) -> dict:
        """Steps until max_steps (from the restored step when resumed); returns the run summary.

        Raises TrainingAborted, after saving a checkpoint, when max_bad_steps steps in a row were skipped.
        Sets the trainer up first when ``setup`` has not run (the Python API's ``trainer.train()``).
        """
        if not self.is_set_up:
            self.setup()
        if self.acc.is_main_process:
            preemption.clear_marker(self.cfg.output_dir)
        self.stop.install()
        try:
            return self._train()
        finally:
            self.stop.uninstall()
            for f in getattr(self, "_bounded", []):  # reward worker processes
                f.close()

    def _train(self) -> dict:
        cfg, acc = self.cfg, self.acc
        wall0 = time.perf_counter()
        before = self._evaluate_before()
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not acc.is_main_process or cfg.disable_tqdm, desc="grpo")
        t_train = time.perf_counter()
        while self.step < cfg.max_steps:
            t0, prev = time.perf_counter(), self.step
            start = self._step_start()
            try:
                batch = self.generate_and_score()
                metrics = {**batch["metrics"], **self.grpo_step(batch)}
            except preemption.StopRequested as e:
                bar.close()
                self._abandon_step(start)
                self._stop_on_request(f"{e.where} in step {self.step + 1}")
            step_time = time.perf_counter() - t0
            metrics["time/step_s"] = step_time
            metrics["tokens_per_s"] = metrics.pop("tokens") / step_time
            metrics["skipped_steps_total"] = float(self.skipped_steps)
            self.window.append(metrics)
            bar.update(cfg.num_iterations)
            bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", loss=f"{metrics['loss']:.4f}")
            stop = self.bad_in_a_row >= cfg.max_bad_steps

            def due(every: int) -> bool:  # a multiple of ``every`` was reached during this rollout's steps
                return every > 0 and self.step // every > prev // every

            if due(cfg.logging_steps) or self.step >= cfg.max_steps or stop:
                self._log_window(batch["rollout"])
            if stop:
                bar.close()
                self._abort()
            if cfg.eval_strategy == "steps" and due(cfg.eval_steps) and self.step < cfg.max_steps:
                ev = self.evaluate()
                logger.info("eval at step %d: %s", self.step, ev)
                self._record_eval("during", ev)
            if cfg.save_strategy == "steps" and due(cfg.save_steps):
                self.save_checkpoint()
            try:
                self._stop_point("the end of the step")
            except preemption.StopRequested as e:
                bar.close()
                self._stop_on_request(f"{e.where} {self.step}")
        bar.close()
        train_seconds = time.perf_counter() - t_train
        after = self.evaluate()
        logger.info("eval after training: %s", after)
        self._record_eval("after", after)
        last = self.history[-max(1, 10 // cfg.logging_steps):] if self.history else []
        summary = {
            "steps": self.step, "wall_seconds": time.perf_counter() - wall0, "train_seconds": train_seconds,
            "eval_accuracy_before": before["accuracy"], "eval_accuracy_after": after["accuracy"],
            "eval_before": before, "eval_after": after,
            "final_reward_mean": (sum(h["reward/mean"] for h in last) / len(last)) if last else float("nan"),
            "skipped_steps": self.skipped_steps,
            "num_processes": acc.num_processes, "resumed_from": str(self.resumed_from) if self.resumed_from else None,
            "config": self.cfg.to_dict(),
        }
        return summary

    def _evaluate_before(self) -> dict:
        """Held-out accuracy before training; a resumed run reuses the stored one (no second evaluation,
        no second TensorBoard point), so its summary compares the same numbers."""
        if self.eval_before is not None:
            logger.info("eval before training (stored in the checkpoint): %s", self.eval_before)
            return self.eval_before
        self.eval_before = self.evaluate()
        logger.info("eval before training: %s", self.eval_before)
        self._record_eval("before", self.eval_before)
        return self.eval_before

    def _log_window(self, rollout: Rollout) -> None:
        """Log the mean of the metrics of the steps since the last log, at the current step."""
        window, self.window = self.window, []
        logged = {k: sum(w[k] for w in window) / len(window) for k in window[-1]}
        logged["step"] = self.step
        self.history.append(logged)
        self.acc.log({f"train/{k}": v for k, v in logged.items() if k != "step"}, step=self.step)
        extra = getattr(self, "_reward_extra", {})
        shown = (self.cfg.num_completions_to_print or len(rollout.completions)) if self.cfg.log_completions else 0
        for i, c in enumerate(rollout.completions[:shown]):
            columns = "".join(f" | {k}={v[i]!r}" for k, v in extra.items() if i < len(v))
            logger.info("sample | %r%s", c, columns)

    def _step_start(self) -> dict:
        """What a step changes before its optimiser update, as it was at the step's start: put back by
        ``_abandon_step`` so that a stop in the middle of a step checkpoints the step's start."""
        # acc.step counts micro-steps for gradient accumulation and is saved with the checkpoint
        return {"rng": preemption.RandomStates(), "data": copy.deepcopy(self.stream.state_dict()),
                "sampling": dict(self.sampling), "micro_steps": self.acc.step}

    def _abandon_step(self, start: dict) -> None:
        start["rng"].restore()
        self.stream.load_state_dict(start["data"])
        self.sampling = start["sampling"]
        self.acc.step = start["micro_steps"]
        if not self.deepspeed:  # gradients of the abandoned micro-batches (DeepSpeed's are not saved)
            self.optimizer.zero_grad()

    def _stop_on_request(self, where: str) -> None:
        """Every rank agreed to stop: write the checkpoint of the last finished step (unless it was just
        written), leave OUTPUT_DIR/preempted, and raise TrainingStopped."""
        name = preemption.signal_name(getattr(self, "_stop_signal", 0))
        t0 = self.stop.received_at or time.monotonic()
        path = (Path(self.cfg.output_dir) / f"checkpoint-{self.step}" if self._last_saved_step == self.step
                else self.save_checkpoint())
        seconds, grace = time.monotonic() - t0, self.cfg.stop_grace_seconds
        if self.acc.is_main_process:
            preemption.write_marker(self.cfg.output_dir, self.step, path, name, seconds, grace)
            logger.warning("%s: stopped at %s; checkpoint %s written %.1f s after the signal (%s stop_grace_seconds=%g)",
                           name, where, path, seconds, "within" if seconds <= grace else "NOT within", grace)
        raise TrainingStopped(f"stopped by {name} at {where}: saved {path} ({seconds:.1f} s after the signal) and "
                              f"wrote {Path(self.cfg.output_dir) / preemption.MARKER}; continue with "
                              "--resume_from_checkpoint latest")

    def _abort(self) -> None:
        path = self.save_checkpoint()
        raise TrainingAborted(
            f"{self.bad_in_a_row} steps in a row (up to step {self.step}) had a non-finite loss or gradient norm "
            f"and were skipped (max_bad_steps={self.cfg.max_bad_steps}); saved {path}. Lower learning_rate, "
            "check the reward functions and data, then continue with --resume_from_checkpoint latest")

    # ================================================================== checkpoints and saving
    def _trainer_state(self) -> dict:
        """Everything besides Accelerate's state that a resumed run needs to continue exactly."""
        return {"step": self.step, "data": self.stream.state_dict(), "history": self.history,
                "window": self.window, "eval_before": self.eval_before,
                "eval_history": self.eval_history, "eval_samples": self.eval_samples, "skipped_steps": self.skipped_steps,
                "bad_in_a_row": self.bad_in_a_row, "sampling": self.sampling, "num_processes": self.acc.num_processes,
                "zero_stage": self.zero_stage, "seed": self.cfg.seed, "entropy_control": self.entropy_control,
                "config": self.cfg.to_dict()}

    def save_checkpoint(self) -> Path:
        """OUTPUT_DIR/checkpoint-STEP, written atomically (see grpo_scale.checkpoint). Collective."""
        # LoRA: the trainable state only (adapter and optimiser); the frozen base is reloaded on resume
        kwargs = {"exclude_frozen_parameters": True} if self.cfg.use_peft and self.deepspeed else {}
        t0 = time.monotonic()
        path = ckpt.save_checkpoint(self.acc, self.cfg.output_dir, self.step, self._trainer_state(),
                                    self.cfg.save_total_limit,
                                    extra=self._write_portable if self.cfg.save_portable else None, **kwargs)
        seconds, grace = time.monotonic() - t0, self.cfg.stop_grace_seconds
        if self.acc.is_main_process:
            logger.info("checkpoint %s took %.1f s to save", path.name, seconds)
        if seconds > grace and not getattr(self, "_said_slow_save", False) and self.acc.is_main_process:
            logger.warning("saving %s took %.1f s, more than stop_grace_seconds=%g: a run stopped by a signal could "
                           "be killed before its checkpoint is complete (the previous one stays valid); ask the "
                           "scheduler for a longer grace period and set stop_grace_seconds to it", path.name, seconds,
                           grace)
            self._said_slow_save = True
        self._last_saved_step = self.step
        return path

    def _write_portable(self, folder: Path) -> None:
        """The checkpoint's shape-free state (``grpo_scale.portable``): gathered on every rank (collective
        under DeepSpeed), written by each node's local main process."""
        model = self.acc.unwrap_model(self.model)
        tensors, shapes, adam_step = portable.gather(model, self.optimizer)
        if self.acc.is_local_main_process:
            portable.write(folder, tensors, {
                "step": self.step, "adam_step": adam_step, "shapes": shapes,
                "scheduler": portable.scheduler_state(self.scheduler), "num_processes": self.acc.num_processes,
                "zero_stage": self.zero_stage, "use_peft": self.cfg.use_peft})

    def _native_files(self, path: Path) -> list[str]:
        """The files this rank needs to load ``path`` through Accelerate (and DeepSpeed) that are missing:
        on a node that does not share rank 0's file system, the files only rank 0 writes are."""
        rank = self.acc.process_index
        need = [f"random_states_{rank}.pkl", "custom_checkpoint_0.pkl"]
        if self.deepspeed:
            tag = path / "pytorch_model"
            need.append("pytorch_model/mp_rank_00_model_states.pt")
            if not list(tag.glob(f"*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")):
                need.append(f"pytorch_model/*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        else:
            need += ["model.safetensors", "optimizer.bin"]
        return [f for f in need if "*" in f or not (path / f).is_file()]

    def _load_checkpoint(self, path: Path) -> None:
        """Restore model, optimiser, scheduler, this rank's RNG states, data position and history: through
        Accelerate's files when this launch has the checkpoint's shape and every rank finds them, else
        from the portable state (another number of processes or ZeRO stage; one folder per node)."""
        state = ckpt.load_trainer_state(path)
        cfg = self.cfg
        same_shape = ckpt.check_compatible(
            state, path, num_processes=self.acc.num_processes, zero_stage=self.zero_stage, seed=cfg.seed,
            batch={"per_device_train_batch_size": cfg.per_device_train_batch_size,
                   "gradient_accumulation_steps": cfg.gradient_accumulation_steps})
        step = int(state["step"])
        if (cfg.max_steps - step) % cfg.num_iterations:  # num_iterations changed since the checkpoint
            raise ConfigError(f"cannot resume from {path} (step {step}) with num_iterations {cfg.num_iterations}: "
                              f"each rollout trains {cfg.num_iterations} steps, so the run would not end at "
                              f"max_steps {cfg.max_steps}; make max_steps - {step} a multiple of num_iterations")
        missing = self._native_files(path) if same_shape else ["(another shape)"]
        if self._on_all_ranks(not missing):
            self._load_native(path)
        else:
            self._load_portable(path, state, missing)
        self._restore_trainer_state(path, state)

    def _load_portable(self, path: Path, state: dict, missing: list[str]) -> None:
        """The portable state into this launch (any number of processes, ZeRO stage 0, 2 or 3)."""
        from accelerate.utils import gather_object
        cfg, acc = self.cfg, self.acc
        model = acc.unwrap_model(self.model)
        problem = None
        if not portable.has(path):
            problem = (f"it was written by {state.get('num_processes')} process(es) under ZeRO stage "
                       f"{state.get('zero_stage')} and this copy has no {portable.DIR}/ state (checkpoints before "
                       f"0.4), and this launch ({acc.num_processes} process(es), ZeRO stage {self.zero_stage}) "
                       f"cannot load its per-process files (this rank lacks {', '.join(missing) or 'none'}); launch "
                       "it as it was written")
        else:
            wrong = portable.check_names(path, model)
            if wrong:
                problem = (f"its {portable.DIR}/ state is not this model's trainable parameters ({wrong}); resume "
                           "with the model and lora_* settings of the run that wrote it")
        problems = gather_object([problem]) if acc.num_processes > 1 else [problem]  # all load, or none
        if any(problems):
            where = [p if acc.num_processes == 1 else f"rank {r}: {p}" for r, p in enumerate(problems) if p]
            raise ConfigError(f"cannot resume from {path}: {'; '.join(where)}")
        meta = portable.read_meta(path)
        portable.load(path, model, self.optimizer)
        self.scheduler.load_state_dict(meta["scheduler"])
        for group, lr in zip(portable.inner_optimizer(self.optimizer).param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr
        rng = path / f"random_states_{acc.process_index}.pkl"
        same_world = meta["num_processes"] == acc.num_processes
        if same_world and not rng.is_file():  # Accelerate would only log this and sample differently
            raise ConfigError(f"cannot resume from {path}: it has no {rng.name} (RNG state of rank "
                              f"{acc.process_index})")
        if same_world:
            preemption.RandomStates.from_file(rng).restore()
        else:  # a new rank layout: each rank's stream starts afresh, seeded by the run's seed, step and rank
            set_seed(cfg.seed + 1_000_003 * int(state["step"]) + acc.process_index)
        logger.info("resumed from the portable state of %s (written by %d process(es), ZeRO stage %d; this launch: "
                    "%d, stage %d)%s", path, meta["num_processes"], meta["zero_stage"], acc.num_processes,
                    self.zero_stage, "" if same_world else "; the per-rank random streams start afresh")

    def _load_native(self, path: Path) -> None:
        """Accelerate's load_state (DeepSpeed's load_checkpoint): the launch has the checkpoint's shape."""
        cfg = self.cfg
        if cfg.use_peft:  # the checkpoint holds the trainable parameters only (see save_checkpoint)
            if self.deepspeed:
                self.acc.load_state(str(path), load_module_strict=False)
            else:
                self._check_trainable_weights(path)
                self.acc.load_state(str(path), strict=False)
        else:
            self.acc.load_state(str(path))  # after set_seed: the restored RNG states win

    def _restore_trainer_state(self, path: Path, state: dict) -> None:
        """Step, data position, history and counters from trainer_state.json."""
        step = int(state["step"])
        try:
            self.stream.load_state_dict(state["data"])
        except ValueError as e:
            raise ConfigError(f"cannot resume from {path}: {e}") from None
        self.step = step
        self.history = state["history"]
        self.window = state.get("window", [])
        self.eval_before = state.get("eval_before")
        self.eval_history = state.get("eval_history", [])
        self.eval_samples = state.get("eval_samples", {})
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.bad_in_a_row = int(state.get("bad_in_a_row", 0))
        self.sampling.update(state.get("sampling", {}))
        self.entropy_control.update(state.get("entropy_control", {}))
        saved_cfg, now = state.get("config", {}), self.cfg.to_dict()
        changed = sorted(k for k in now if k in saved_cfg and saved_cfg[k] != now[k]
                         and k not in ("output_dir", "resume_from_checkpoint"))
        if changed:
            logger.warning("resuming with changed config fields %s: the run will not match an uninterrupted one",
                           changed)
        logger.info("resumed from %s at step %d", path, self.step)

    def _keep_trainable(self, models, weights, output_dir) -> None:
        """Accelerate's save_state pre-hook (LoRA, without DeepSpeed): drop the frozen base from the
        model state it writes, keeping the adapter (and modules_to_save)."""
        for i, model in enumerate(models):
            keep = lora.trainable_names(model)
            weights[i] = {k: v for k, v in weights[i].items() if k in keep}

    def _check_trainable_weights(self, path: Path) -> None:
        """A LoRA checkpoint is loaded non-strictly (it lacks the frozen base): check first that it holds
        exactly this model's trainable parameters, so none stays silently at its initial value."""
        from safetensors import safe_open
        file = path / "model.safetensors"
        if not file.is_file():
            raise ConfigError(f"cannot resume from {path}: it has no model.safetensors")
        with safe_open(str(file), "pt") as f:
            saved = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        model = self.model  # named as Accelerate names them in save_state (see _keep_trainable)
        trainable = lora.trainable_names(model)  # once: not once per parameter
        want = {n: list(p.shape) for n, p in model.named_parameters() if n in trainable}
        wrong = portable.shape_differences(saved, want)
        if wrong:
            raise ConfigError(f"cannot resume from {path}: its model state is not this run's LoRA adapter "
                              f"({wrong}); resume with the same model and lora_* settings as the run that wrote it")

    def save(self, summary: dict) -> None:
        """OUTPUT_DIR/final (HF format, safetensors; with LoRA the merged model, and OUTPUT_DIR/adapter),
        OUTPUT_DIR/summary.json (strict JSON), rewards.png and samples.md (``grpo_scale.report``); ends
        training (trackers closed). Collective."""
        from grpo_scale import report
        acc = self.acc
        out = Path(self.cfg.output_dir)
        self._write_model(out / "final", out / "adapter")
        summary_file = out / "summary.json"
        error = ckpt.attempt(lambda: summary_file.write_text(json.dumps(strict_json(summary), indent=1,
                                                                        allow_nan=False))) if acc.is_main_process else None
        ckpt.agree_written(acc, error, "summary.json", out)
        if acc.is_main_process:
            try:
                for path in report.write_reports(out, self, summary):
                    logger.info("wrote %s", path)
            except Exception as e:  # a report must not fail a finished run, nor leave the other ranks waiting
                logger.warning("could not write rewards.png / samples.md: %s: %s", type(e).__name__, e)
        acc.wait_for_everyone()
        acc.end_training()

    def save_model(self, output_dir: Optional[str] = None) -> None:
        """TRL's ``save_model``: the trained model in ``output_dir`` (default: the config's), in Hugging
        Face format that plain transformers loads, with the tokenizer; with LoRA the merged model there
        and the adapter alone in ``output_dir/adapter``. Collective under DeepSpeed."""
        out = Path(output_dir or self.cfg.output_dir)
        self._write_model(out, out / "adapter")

    def _write_model(self, final: Path, adapter: Path) -> None:
        """Rank 0 writes; a write error (disk full) is agreed on by every rank and raised as CheckpointError
        on all of them, instead of leaving the others at a barrier."""
        acc = self.acc
        if self.cfg.use_peft:
            error = self._save_lora(final, adapter)
        else:
            state_dict = acc.get_state_dict(self.model)  # gathers ZeRO-3 shards on rank 0

            def write():
                model = acc.unwrap_model(self.model)
                model.config.use_cache = True
                try:
                    model.save_pretrained(final, state_dict=state_dict, safe_serialization=True)
                finally:
                    model.config.use_cache = False
            error = ckpt.attempt(write) if acc.is_main_process else None
        if acc.is_main_process and error is None:
            error = ckpt.attempt(lambda: self.tokenizer.save_pretrained(final))
        ckpt.agree_written(acc, error, f"{final.name}/", Path(self.cfg.output_dir))

    def _save_lora(self, final: Path, adapter: Path) -> Optional[str]:
        """``adapter`` (the adapter alone: PeftModel.from_pretrained(base, dir)) and ``final`` (the base with
        the adapter merged, a plain transformers model). Collective under ZeRO-3. Returns rank 0's write
        error (see ``checkpoint.attempt``)."""
        with self.gathered(self.model) as peft_model:
            if not self.acc.is_main_process:
                return None

            def write():
                peft_model.save_pretrained(adapter, selected_adapters=["default"], safe_serialization=True)
                self.tokenizer.save_pretrained(adapter)
                merged = lora.merged_state_dict(peft_model)
                base = peft_model.get_base_model()
                base.config.use_cache = True
                try:
                    base.save_pretrained(final, state_dict=merged, safe_serialization=True)
                finally:
                    base.config.use_cache = False
            return ckpt.attempt(write)


def strict_json(value):
    """``value`` with every non-finite float replaced by None: JSON has no NaN (strict parsers reject it)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def param_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of parameters this rank holds, bytes of the whole model's parameters). A ZeRO-3 partitioned
    parameter holds its partition (``ds_tensor``, 1/W of it, padded); any other holds all of it."""
    held = full = 0
    for p in model.parameters():
        part = getattr(p, "ds_tensor", p)
        held += part.numel() * part.element_size()
        full += getattr(p, "ds_numel", p.numel()) * part.element_size()
    return held, full


@contextlib.contextmanager
def _zero3_hooks_off(engine):
    """A ZeRO-3 engine's parameter hooks removed for the block, registered again after it.

    With the hooks on, a forward can be a collective even though ``GatheredParameters`` gathered every
    weight for the block: the hook at the start of the model's forward checks, while the coordinator's
    trace is being recorded (after any change of the module order, such as decoding after training),
    that all ranks recorded the same modules; and the hooks after each module's forward may release (partition
    again) what the block gathered, so that the next forward gathers it again. Ranks whose completions
    end at different steps would then wait on each other for ever. Inside the block every weight is whole,
    so no hook is needed: all of them are off, the start-of-forward hook included (TRL's
    ``remove_hooks`` leaves that one on). Registering them again invalidates the coordinator's trace (it
    records afresh on the next forward of the engine); the modules keep their ids.
    """
    offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)
    if offload is None:  # not a ZeRO-3 engine (a partitioned reference has no hooks)
        yield
        return
    root = offload.module
    first_id = root.ds_id
    start_of_forward = root._forward_pre_hooks[offload.fwd_pre_hook.id]
    for p in root.parameters():
        p.ds_active_sub_modules.clear()
    for hook in [offload.fwd_pre_hook] + offload.forward_hooks + offload.backward_hooks:
        hook.remove()
    offload.forward_hooks, offload.backward_hooks = [], []
    try:
        yield
    finally:
        offload.fwd_pre_hook = root.register_forward_pre_hook(start_of_forward)  # first, as DeepSpeed has it
        offload._register_deepspeed_module(root, count=[first_id])


def _partitioned(model: torch.nn.Module) -> bool:
    """Whether ZeRO-3 partitioned the parameters of ``model`` (zero.Init or a stage-3 engine)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _nanmean(x: torch.Tensor) -> float:
    v = x[~torch.isnan(x)]
    return float(v.mean()) if v.numel() else float("nan")


def _flat_hparams(d: dict) -> dict:
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in d.items()}
