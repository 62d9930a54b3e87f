"""What a TRL script may pass that grpo-scale's GRPOConfig does not have.

TRL's GRPOConfig is a transformers ``TrainingArguments``. A field of either that grpo-scale lacks is
accepted when it is given its TRL default (a script that spells out a default changes nothing), and
refused otherwise with a message that says it is not supported yet, never "unknown field". A few fields
are spelled differently here and are accepted under TRL's name (``ALIASES``).
"""
from __future__ import annotations

import dataclasses
import functools

# TRL 1.16's GRPOConfig fields (beyond TrainingArguments) that grpo-scale does not have, with TRL's defaults.
TRL_ONLY = {
    "model_init_kwargs": None, "router_aux_loss_coef": None, "disable_dropout": False,
    "cast_lm_head_to_fp32": False, "remove_unused_columns": False, "num_generations_eval": None,
    "ds3_gather_for_generation": True, "shuffle_dataset": True, "pad_to_multiple_of": "auto",
    "generation_batch_size": None, "steps_per_generation": None, "min_p": None, "generation_kwargs": None,
    "chat_template_kwargs": None, "repetition_penalty": 1.0, "cache_implementation": None,
    "vllm_model_impl": "vllm", "vllm_structured_outputs_regex": None,
    "multi_objective_aggregation": "sum_then_normalize",
    "sync_ref_model": False, "ref_model_mixup_alpha": 0.6, "ref_model_sync_steps": 512,
    "max_tool_calling_iterations": None, "log_multimodal": True, "log_unique_prompts": False, "log_completions_hub_repo": None,
    "use_transformers_continuous_batching": False, "transformers_continuous_batching_config": None,
    "use_transformers_paged": False, "vllm_importance_sampling_cap": None,
}
# TrainingArguments fields that have no effect on what grpo-scale computes: accepted with any value.
HARMLESS = {"run_name", "logging_dir", "logging_strategy", "logging_first_step", "log_level", "log_level_replica",
            "log_on_each_node", "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
            "dataloader_prefetch_factor", "do_train", "do_eval", "do_predict", "project", "local_rank",
            "skip_memory_metrics", "save_only_model", "include_num_input_tokens_seen", "logging_nan_inf_filter",
            "hub_token", "hub_private_repo", "hub_model_id", "hub_strategy", "hub_revision",
            # TRL's port of its NCCL weight-sync group; the server mode here sends weights over its HTTP connection
            "vllm_group_port",
            # TRL applies it to vLLM rollouts only; here the correction is importance_sampling_correction, for
            # either sampler
            "vllm_importance_sampling_correction"}
# values of fields grpo-scale lacks that describe what it does anyway (torch's AdamW, its epsilon)
SAME_AS_OURS = {"optim": {"adamw_torch", "adamw_torch_fused"}, "adam_epsilon": {1e-8}}
# TRL's (or transformers') name -> grpo-scale's, for the same thing
ALIASES = {"per_device_eval_batch_size": "eval_batch_size", "warmup_ratio": "warmup_steps", "epsilon_low": "epsilon",
           "vllm_importance_sampling_mode": "importance_sampling_mode",
           "vllm_importance_sampling_clip_min": "importance_sampling_clip_min",
           "vllm_importance_sampling_clip_max": "importance_sampling_clip_max"}


@functools.lru_cache(maxsize=1)
def training_arguments_defaults() -> dict:
    """transformers' TrainingArguments fields and their defaults (as installed)."""
    try:
        from transformers import TrainingArguments
    except ImportError:
        return {}
    out = {}
    for f in dataclasses.fields(TrainingArguments):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
        else:
            out[f.name] = None
    return out


def _same(value, default) -> bool:
    if value == default:
        return True
    # enums (IntervalStrategy.NO == "no"), and lists given for a None / empty default
    return str(getattr(default, "value", default)) == str(value) or (default in (None, [], "none") and value in (None, [], "none"))


def foreign(name: str, value, where: str) -> str | None:
    """For a field grpo-scale lacks: None when it is a TRL / transformers field at its default (or one
    without effect here), so it can be ignored; else the reason it is refused (not supported yet), or
    "unknown" when neither TRL nor transformers has it."""
    if name in HARMLESS or value in SAME_AS_OURS.get(name, ()):
        return None
    if name in TRL_ONLY:
        default = TRL_ONLY[name]
    elif name in training_arguments_defaults():
        default = training_arguments_defaults()[name]
    else:
        return "unknown"
    if _same(value, default):
        return None
    return (f"{where}: {name}={value!r} is a TRL field that grpo-scale does not support yet (only its default "
            f"{getattr(default, 'value', default)!r} is accepted); remove it or set it to the default")
