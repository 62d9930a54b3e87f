"""LoRA through peft: wrapping the policy, its reference (the same network with adapters off, or the
continued adapter as it was loaded), and the merged weights of ``final/``.

The trainer calls these on the plain module (``Accelerator.unwrap_model``); under ZeRO-3 the callers
gather the partitioned weights first (``GRPOTrainer.gathered``).
"""
from __future__ import annotations

import contextlib
import logging

import torch

from grpo_scale.config import ConfigError, GRPOConfig

logger = logging.getLogger("grpo_scale")

REF_ADAPTER = "ref"  # a continued adapter's frozen copy, the reference of beta > 0


def lora_config(cfg: GRPOConfig):
    """peft's LoraConfig from the training config's lora_* fields (TRL's names)."""
    from peft import LoraConfig
    targets = cfg.lora_target_modules
    if targets is not None and len(targets) == 1 and targets[0] == "all-linear":
        targets = "all-linear"
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, modules_to_save=cfg.lora_modules_to_save,
                      task_type=cfg.lora_task_type, bias="none")


def wrap(model, cfg: GRPOConfig, adapter_dir: str | None, reference: bool, config=None):
    """The peft model to train: new adapters on ``model``, or the adapter in ``adapter_dir`` continued
    (trainable). With ``reference`` (beta > 0) a continued adapter is loaded a second time, frozen, as
    REF_ADAPTER: the reference is the adapter the run started from. Refuses combinations whose gradient
    would be silently wrong (see ``check_heads``). ``config``: a peft LoraConfig to use instead of the
    lora_* fields (the Python API's peft_config)."""
    from peft import PeftModel, get_peft_model
    try:
        if adapter_dir is None:
            peft_model = get_peft_model(model, config if config is not None else lora_config(cfg))
        else:
            peft_model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
            if reference:
                peft_model.load_adapter(adapter_dir, adapter_name=REF_ADAPTER, is_trainable=False)
                peft_model.set_adapter("default")  # the trained one stays active (and the only trainable)
    except ValueError as e:  # e.g. a target module the model does not have
        raise ConfigError(f"LoRA: {e}") from None
    check_heads(peft_model, cfg)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(getattr(p, "ds_numel", p.numel()) for p in peft_model.parameters())
    logger.info("LoRA: %s trainable parameters of %s (%.3f%%)%s", f"{trainable:,}", f"{total:,}",
                100 * trainable / max(1, total), f"; continuing the adapter in {adapter_dir}" if adapter_dir else "")
    return peft_model


def _wrapped(module) -> bool:
    """Whether peft replaced or wrapped ``module`` (a LoRA layer or a modules_to_save copy)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper
    return isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper))


def check_heads(peft_model, cfg: GRPOConfig) -> None:
    """Refuse what would train silently wrong: loss_impl fused_linear multiplies the hidden states by the
    output head's ``weight`` itself, so a LoRA or modules_to_save head would lose its update; and with tied
    input and output embeddings, an adapter on either would make the merged final/ model differ from the
    trained one (merging writes the update into the one tensor both share)."""
    base = peft_model.get_base_model()
    head, embed = base.get_output_embeddings(), base.get_input_embeddings()
    tied = bool(getattr(base.config.get_text_config(), "tie_word_embeddings", False))
    names = {id(m): n for n, m in base.named_modules()}
    if tied and (_wrapped(head) or _wrapped(embed)):
        which = names.get(id(head if _wrapped(head) else embed), "the embeddings")
        raise ConfigError(
            f"LoRA: {which} gets an adapter or is in lora_modules_to_save, but this model ties its input and output "
            "embeddings (tie_word_embeddings): the update would reach one of them only while training and both "
            f"once merged into final/. Drop {which.rsplit('.', 1)[-1]} from lora_target_modules and "
            "lora_modules_to_save")
    if cfg.loss_impl == "fused_linear" and _wrapped(head):
        raise ConfigError(
            f"LoRA: loss_impl fused_linear reads the output head's weight directly, but {names.get(id(head))} gets "
            "an adapter or is in lora_modules_to_save, so its update would be lost. Use loss_impl triton (the same "
            "fused loss, on logits) or eager, or drop the head from lora_target_modules / lora_modules_to_save")


@contextlib.contextmanager
def reference(peft_model):
    """The reference forward's state of the peft model: the continued adapter's frozen copy active, or
    every adapter off. Callers run it in eval mode (no LoRA dropout: the reference is deterministic)."""
    if REF_ADAPTER in peft_model.peft_config:
        peft_model.set_adapter(REF_ADAPTER, inference_mode=True)
        try:
            yield
        finally:
            peft_model.set_adapter("default")  # trainable again; the reference copy stays frozen
    else:
        with peft_model.disable_adapter():
            yield


def trainable_names(model) -> set[str]:
    """Names of the parameters the optimiser updates (the state a LoRA checkpoint holds)."""
    return {n for n, p in model.named_parameters() if p.requires_grad}


def merged_state_dict(peft_model) -> dict[str, torch.Tensor]:
    """The state dict of the base model with the active adapters merged into its weights, under the base
    model's own names (what ``merge_and_unload`` would save), as CPU copies. The live model is left
    exactly as it was: the merge is undone by restoring the original weights, not by subtracting."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    layers = [m for m in peft_model.modules() if isinstance(m, BaseTunerLayer) and m.active_adapters]
    originals = [m.get_base_layer().weight.detach().clone() for m in layers]
    with torch.no_grad():
        try:
            for m in layers:
                m.merge(adapter_names=[a for a in m.active_adapters if a != REF_ADAPTER])
            state, seen = {}, set()
            for name, tensor in peft_model.get_base_model().state_dict().items():
                clean = _base_name(name)
                # tied weights appear under two names: keep the first (the input embeddings), as
                # save_pretrained does for tensors that share memory
                if clean is not None and tensor.data_ptr() not in seen:
                    seen.add(tensor.data_ptr())
                    state[clean] = tensor.detach().to("cpu", copy=True)
        finally:
            for m, w in zip(layers, originals):
                m.merged_adapters.clear()
                m.get_base_layer().weight.copy_(w)
    return state


def _base_name(name: str) -> str | None:
    """The merged model's name of a peft state-dict entry; None for entries merging removes (adapter
    weights, the original copy of a modules_to_save module)."""
    parts = name.split(".")
    if any(p.startswith("lora_") for p in parts) or "original_module" in parts:
        return None
    out, i = [], 0
    while i < len(parts):
        if parts[i] == "base_layer":
            i += 1
        elif parts[i] == "modules_to_save":  # modules_to_save.ADAPTER.x -> x, the trained adapter's copy
            if i + 1 < len(parts) and parts[i + 1] != "default":
                return None
            i += 2
        else:
            out.append(parts[i])
            i += 1
    return ".".join(out)
