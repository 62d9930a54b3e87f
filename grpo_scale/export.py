"""A checkpoint to a plain Hugging Face model folder.

    python -m grpo_scale.export OUTPUT_DIR/checkpoint-STEP OUT

Works for a checkpoint written by any launch (one process, ZeRO-2, ZeRO-3; full fine-tuning or LoRA),
without DeepSpeed or a GPU: the model the run trained is rebuilt from its config (``trainer_state.json``),
its trainable weights are set from the checkpoint's portable state (``grpo_scale.portable``), and OUT gets
``model.safetensors``, ``config.json`` and the tokenizer, which ``AutoModelForCausalLM.from_pretrained``
loads. With LoRA the adapter is merged into the base weights, as the run's ``final/`` is. Checkpoints
written before the portable state existed are read from their DeepSpeed shards (``zero_to_fp32``) or
Accelerate's ``model.safetensors``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from grpo_scale import checkpoint as ckpt
from grpo_scale import portable
from grpo_scale.config import ConfigError, GRPOConfig, adapter_base, is_adapter_dir

logger = logging.getLogger(__name__)


def trained_model(checkpoint: Path):
    """(the model as the run built it, with the checkpoint's trainable weights; the run's config; the folder
    of its base model, which holds the tokenizer)."""
    from transformers import AutoModelForCausalLM

    from grpo_scale import lora
    checkpoint = Path(checkpoint)
    if not (checkpoint / ckpt.STATE_FILE).is_file():
        raise ConfigError(f"{checkpoint} is not a complete checkpoint (no {ckpt.STATE_FILE})")
    state = ckpt.load_trainer_state(checkpoint)
    cfg = GRPOConfig(**state["config"])
    path = cfg.resolved_model_path
    adapter_dir = path if is_adapter_dir(path) else None
    base_path = adapter_base(path) if adapter_dir else path
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, use_safetensors=True)
    if cfg.use_peft:
        model = lora.wrap(model, cfg, adapter_dir, reference=False)
    weights = _weights(checkpoint, model)
    names = [n for n, _ in portable.trainable(model)]
    missing = [n for n in names if n not in weights]
    if missing:
        raise ConfigError(f"{checkpoint}: its weights lack {missing[:3]}{'...' if len(missing) > 3 else ''} of the "
                          f"model its run names ({cfg.model_name_or_path}); was the model folder changed since?")
    with torch.no_grad():
        for name, p in portable.trainable(model):
            p.copy_(weights[name].reshape(p.shape))
    return model, cfg, base_path


def _weights(checkpoint: Path, model) -> dict[str, torch.Tensor]:
    """The trainable weights by the model's parameter names: the portable state, else (older checkpoints)
    DeepSpeed's shards or Accelerate's model.safetensors."""
    if portable.has(checkpoint):
        wrong = portable.check_names(checkpoint, model)
        if wrong:
            raise ConfigError(f"{checkpoint}: its portable state is not the trainable parameters of the model its run "
                              f"names ({wrong})")
        return portable.read(checkpoint, portable.WEIGHTS)
    if (checkpoint / "pytorch_model").is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="pytorch_model")
    if (checkpoint / "model.safetensors").is_file():
        from safetensors.torch import load_file
        return load_file(str(checkpoint / "model.safetensors"))
    raise ConfigError(f"{checkpoint} holds no model weights ({portable.DIR}/, pytorch_model/ or model.safetensors)")


def export(checkpoint: Path, out: Path) -> Path:
    """Write the checkpoint's model to ``out`` (Hugging Face format, safetensors, with the tokenizer)."""
    from transformers import AutoTokenizer

    from grpo_scale import lora
    model, cfg, base_path = trained_model(checkpoint)
    out = Path(out)
    base = model.get_base_model() if cfg.use_peft else model
    state_dict = lora.merged_state_dict(model) if cfg.use_peft else None
    base.config.use_cache = True
    base.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_path).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grpo_scale.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a checkpoint-STEP folder (any launch: one process, ZeRO-2/3)")
    parser.add_argument("out", type=Path, help="the folder to write the model to")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = export(args.checkpoint, args.out)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
