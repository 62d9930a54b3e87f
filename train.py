"""Train a causal LM with GRPO.

On one CPU or GPU, the embedded demo model (configs/tiny-math.yaml):

    python train.py

On 2 processes with DeepSpeed ZeRO-2 (CPU or GPUs; set num_processes in the YAML to your GPU count):

    accelerate launch --config_file accelerate_configs/zero2.yaml train.py
    accelerate launch --config_file accelerate_configs/zero3.yaml train.py --config configs/qwen2.5-0.5b-math.yaml

Multi-node: accelerate_configs/multinode.yaml, run once per node with --machine_rank set.
Any config field can be overridden: ``train.py --config FILE --max_steps 10 --learning_rate 1e-5``.
"""
import sys

from grpo_scale.config import ConfigError, load_config


def main(argv=None) -> int:
    try:
        cfg = load_config(argv)
        from grpo_scale.trainer import GRPOTrainer
        trainer = GRPOTrainer(cfg)
        trainer.setup()
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = trainer.train()
    trainer.save(summary)
    if trainer.acc.is_main_process:
        print(f"done: {summary['steps']} steps in {summary['wall_seconds']:.0f}s; held-out accuracy "
              f"{summary['eval_accuracy_before']:.3f} -> {summary['eval_accuracy_after']:.3f}; "
              f"outputs in {cfg.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
