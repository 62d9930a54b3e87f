"""Two "nodes" on one machine through accelerate_configs/multinode.yaml (one process each, ZeRO-2 over
gloo, the main node at 127.0.0.1): train, checkpoint and resume with one output folder both share. (The
case of one folder per node, as on nodes without a shared file system, begins tests/test_portable.py's
chain.) Then an error raised on one rank only: every
rank stops, and the message is printed once, naming the rank.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import reliability_helpers as rh


def args(out: Path, steps: int, *extra: str) -> list[str]:
    return [*rh.FAST, "--model_name_or_path", rh.tiny_model_path(), "--output_dir", str(out), "--max_steps",
            str(steps), "--save_steps", "2", "--per_device_train_batch_size", "4", "--report_to", "none", *extra]


def ok(procs) -> str:
    text = "".join(p.stdout + p.stderr for p in procs)
    assert all(p.returncode == 0 for p in procs), text[-5000:]
    return text


def test_two_nodes_sharing_one_output_folder_and_an_error_on_one_rank(tmp_path):
    out = tmp_path / "shared"
    ok(rh.run_nodes([args(out, 2), args(out, 2)]))
    text = ok(rh.run_nodes([args(out, 4, "--resume_from_checkpoint", "latest")] * 2))
    assert "resumed from" in text and "portable state" not in text  # the same shape: Accelerate's files
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["history"]] == [1, 2, 3, 4]
    assert json.loads((out / "summary.json").read_text())["steps"] == 4

    # node 1 is given a checkpoint path that does not exist there: both nodes stop, one message names rank 1
    procs = rh.run_nodes([args(out, 6, "--resume_from_checkpoint", str(out / "checkpoint-4")),
                          args(out, 6, "--resume_from_checkpoint", str(out / "checkpoint-9"))])
    text = "".join(p.stdout + p.stderr for p in procs)
    assert all(p.returncode != 0 for p in procs), text[-3000:]  # both stopped; neither waits for the other
    found = re.findall(r"error \(rank \d\): rank 1: resume_from_checkpoint: \S+checkpoint-9 does not exist", text)
    assert len(found) == 1, text[-5000:]
    assert "]: Traceback" not in text, text[-5000:]  # no rank's traceback (torchrun adds its own)
