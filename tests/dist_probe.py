"""Launched by tests/test_trainer.py under `accelerate launch`: runs a few GRPO steps and writes, per
rank, what that rank saw (its index, the world size, its prompts, parameter checksums)."""
import json
import sys
from pathlib import Path

import torch

from grpo_scale.config import load_config
from grpo_scale.trainer import GRPOTrainer


def checksum(trainer) -> float:
    with trainer.unwrapped_for_generation() as model:
        return float(sum(p.detach().double().sum() for p in model.parameters()))


def main():
    out = Path(sys.argv[1])
    cfg = load_config(sys.argv[2:])
    trainer = GRPOTrainer(cfg)
    trainer.setup()
    before = checksum(trainer)
    prompts = []
    for _ in range(cfg.max_steps):
        batch = trainer.generate_and_score()
        prompts += batch["rollout"].prompts
        trainer.grpo_step(batch)
    after = checksum(trainer)
    acc = trainer.acc
    record = {"process_index": acc.process_index, "num_processes": acc.num_processes,
              "world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
              "zero_stage": trainer.zero_stage, "prompts": prompts, "before": before, "after": after,
              "steps": trainer.step}
    (out / f"rank{acc.process_index}.json").write_text(json.dumps(record))
    trainer.save({"steps": trainer.step})


if __name__ == "__main__":
    main()
