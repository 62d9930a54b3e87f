"""grpo-scale: GRPO fine-tuning of causal language models, from a laptop CPU to many GPUs.

    from grpo_scale import GRPOConfig, GRPOTrainer   # TRL's names: a TRL script changes one import
"""
__version__ = "0.4.0.dev0"

__all__ = ["GRPOConfig", "GRPOTrainer", "__version__"]


def __getattr__(name):
    # GRPOTrainer imports torch, transformers and accelerate: loaded on first use, so that the config and
    # the command line's checks stay light
    if name == "GRPOConfig":
        from grpo_scale.config import GRPOConfig
        return GRPOConfig
    if name == "GRPOTrainer":
        from grpo_scale.trainer import GRPOTrainer
        return GRPOTrainer
    raise AttributeError(f"module 'grpo_scale' has no attribute {name!r}")
