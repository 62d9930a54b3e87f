"""Launched by tests/test_portable.py (one process, or under `accelerate launch`): a run of train.py's
arguments that resumes from a checkpoint, with one check between the load and the first step.

    portable_probe.py OUT_JSON TRAIN_ARGS...

After setup (which loads the checkpoint named by --resume_from_checkpoint), every rank gathers the
trainable weights and AdamW's moments and step as they now stand in this launch (``portable.gather``:
through DeepSpeed's accessors for ZeRO fragments) and rank 0 writes to OUT_JSON the largest difference
from the checkpoint's portable files (the state its writer gathered before saving), the scheduler's
learning rate and the resumed step. Then the run trains to max_steps and saves, as train.py does.
"""
import json
import sys
from pathlib import Path

import torch

from grpo_scale import portable
from grpo_scale.config import load_config
from grpo_scale.trainer import GRPOTrainer


def main() -> None:
    out, args = Path(sys.argv[1]), sys.argv[2:]
    trainer = GRPOTrainer(load_config(args))
    trainer.setup()
    assert trainer.resumed_from is not None, "the probe resumes"
    tensors, shapes, step = portable.gather(trainer.acc.unwrap_model(trainer.model), trainer.optimizer)
    if trainer.acc.is_main_process:
        ckpt = trainer.resumed_from
        meta = portable.read_meta(ckpt)
        diffs = {}
        for key, now in tensors.items():
            then = portable.read(ckpt, key)
            assert then.keys() == now.keys(), (key, sorted(then.keys() ^ now.keys())[:4])
            diffs[key] = max(float((now[n] - then[n]).abs().max()) for n in now)
        record = {"diffs": diffs, "names": len(shapes), "adam_step": step, "saved_adam_step": meta["adam_step"],
                  "lr": portable.inner_optimizer(trainer.optimizer).param_groups[0]["lr"],
                  "saved_lr": meta["scheduler"]["_last_lr"][0], "step": trainer.step,
                  "zero_stage": trainer.zero_stage, "num_processes": trainer.acc.num_processes,
                  "saved_shape": [meta["num_processes"], meta["zero_stage"]]}
        out.write_text(json.dumps(record))
    summary = trainer.train()
    trainer.save(summary)
    if torch.distributed.is_initialized():  # see train.py's _shutdown
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
