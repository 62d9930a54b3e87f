"""Launched by tests/test_preemption.py (as `python` or under `accelerate launch`): train.py's main, with
rank 0 holding still at one hook point of one step until the stop signal the test sends has arrived.

    signal_probe.py HOOK STEP MARKER [train.py arguments]

HOOK is where rank 0 waits, in step STEP (1-based):
- ``generation``: inside the decoding loop (the sampler's first token of the step's first round);
- ``backward``: after the loss of the step's first micro-batch, before its backward;
- ``save``: inside the save of checkpoint-STEP, after every rank wrote its files, before publication;
- ``none``: nowhere (a plain run);
- ``enospc``: no waiting; instead rank 1's writes into checkpoint-STEP fail with "No space left on device".
On reaching it, rank 0 writes MARKER (the test then signals the launcher's process group, or the one
process) and waits until its own stop flag is set (at most 60 s), then carries on.
"""
import errno
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # train.py

import train  # noqa: E402
from grpo_scale import checkpoint as ckpt  # noqa: E402
from grpo_scale import rollout  # noqa: E402
from grpo_scale.trainer import GRPOTrainer  # noqa: E402

HOOK, STEP, MARKER = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
state = {"trainer": None, "armed": False}


def hold(stop) -> None:
    """Rank 0 only: say where we are, then wait for the signal."""
    if state["trainer"].acc.process_index != 0:
        return
    MARKER.write_text(HOOK)
    deadline = time.monotonic() + 60
    while not stop() and time.monotonic() < deadline:
        time.sleep(0.02)


def patch() -> None:
    sample, sample_round = rollout.sample, GRPOTrainer._sample_round
    micro_loss, save_files = GRPOTrainer._micro_loss, ckpt._save_files

    def sample_round_hooked(self):
        state["trainer"] = self
        state["armed"] = HOOK == "generation" and self.step + 1 == STEP and not MARKER.exists()
        return sample_round(self)

    def sample_hooked(*args, stop=None, **kwargs):
        if state["armed"]:
            state["armed"] = False
            hold(stop)
        return sample(*args, stop=stop, **kwargs)

    def micro_loss_hooked(self, rb, batch, idx):
        out = micro_loss(self, rb, batch, idx)
        if HOOK == "backward" and self.step + 1 == STEP and idx.start == 0 and not MARKER.exists():
            state["trainer"] = self
            hold(self.stop)
        return out

    def save_files_hooked(accelerator, tmp, trainer_state, **kwargs):
        save_files(accelerator, tmp, trainer_state, **kwargs)
        trainer = state["trainer"]
        if HOOK == "save" and trainer_state["step"] == STEP and not MARKER.exists():
            hold(trainer.stop)

    if HOOK == "enospc" and int(os.environ.get("RANK", "0")) == 1:
        save = torch.save

        def full_disk(obj, f, *args, **kwargs):
            if f"checkpoint-{STEP}.tmp" in str(f):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
            return save(obj, f, *args, **kwargs)
        torch.save = full_disk

    rollout.sample = sample_hooked
    GRPOTrainer._sample_round = sample_round_hooked
    GRPOTrainer._micro_loss = micro_loss_hooked
    ckpt._save_files = save_files_hooked


if __name__ == "__main__":
    patch()
    sys.exit(train.main(sys.argv[4:]))
