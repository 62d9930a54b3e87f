"""Train a causal LM with GRPO.

On one CPU or GPU, the embedded demo model (configs/tiny-math.yaml):

    python train.py

On 2 processes with DeepSpeed ZeRO-2 (CPU or GPUs; set num_processes in the YAML to your GPU count):

    accelerate launch --config_file accelerate_configs/zero2.yaml train.py
    accelerate launch --config_file accelerate_configs/zero3.yaml train.py --config configs/qwen2.5-0.5b-math.yaml

Multi-node: accelerate_configs/multinode.yaml, run once per node with --machine_rank set.
Any config field can be overridden: ``train.py --config FILE --max_steps 10 --learning_rate 1e-5``.
Checkpoints every ``--save_steps N``; continue a killed run with ``--resume_from_checkpoint latest``.
"""
import os
import sys

from grpo_scale.config import ConfigError, load_config


def _error(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # once, not once per rank
        print(f"error: {message}", file=sys.stderr)


def main(argv=None) -> int:
    """Exit codes: 0 done, 2 configuration or input problem (nothing trained), 3 stopped by itself
    after too many non-finite steps (a checkpoint was saved)."""
    try:
        cfg = load_config(argv)
        # Checks that need no model, before the heavy imports: the launcher has set WORLD_SIZE
        cfg.check_world(int(os.environ.get("WORLD_SIZE", "1")))
        cfg.check_paths()
        from grpo_scale.trainer import GRPOTrainer
        trainer = GRPOTrainer(cfg)
        trainer.setup()
    except ConfigError as e:
        _error(str(e))
        return 2
    from grpo_scale.trainer import TrainingAborted
    try:
        summary = trainer.train()
    except TrainingAborted as e:
        _error(str(e))
        trainer.acc.end_training()
        _shutdown()
        return 3
    trainer.save(summary)
    if trainer.acc.is_main_process:
        print(f"done: {summary['steps']} steps in {summary['wall_seconds']:.0f}s; held-out accuracy "
              f"{summary['eval_accuracy_before']:.3f} -> {summary['eval_accuracy_after']:.3f}; "
              f"outputs in {cfg.output_dir}")
    _shutdown()
    return 0


def _shutdown() -> None:
    """Tear the process group down before the interpreter exits: left to exit handlers, a gloo or
    DeepSpeed communication thread can abort a rank after all work is done (a spurious non-zero exit)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
