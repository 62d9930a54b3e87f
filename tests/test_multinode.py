"""Two "nodes" on one machine through accelerate_configs/multinode.yaml (one process each, ZeRO-2 over
gloo, the main node at 127.0.0.1). Training, checkpointing and resuming with one folder per node and with
a shared folder are links of tests/test_portable.py's chain; here, an error raised on one node only.
"""
from __future__ import annotations

import re
from pathlib import Path

import reliability_helpers as rh


def args(out: Path, steps: int, *extra: str) -> list[str]:
    return [*rh.FAST, "--model_name_or_path", rh.tiny_model_path(), "--output_dir", str(out), "--max_steps",
            str(steps), "--save_steps", "2", "--per_device_train_batch_size", "4", "--report_to", "none", *extra]


def test_an_error_on_one_node_stops_both_with_one_message(tmp_path):
    """Node 1 is given a checkpoint path that does not exist there (node 0's exists): both nodes stop with
    status 2 instead of node 0 waiting for node 1, and the message naming rank 1 is printed once."""
    out = tmp_path / "run"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / "trainer_state.json").write_text("{}")
    procs = rh.run_nodes([args(out, 4, "--resume_from_checkpoint", str(out / "checkpoint-2")),
                          args(out, 4, "--resume_from_checkpoint", str(out / "checkpoint-9"))])
    text = "".join(p.stdout + p.stderr for p in procs)
    assert all(p.returncode != 0 for p in procs), text[-3000:]  # both stopped; neither waits for the other
    found = re.findall(r"error \(rank \d\): rank 1: resume_from_checkpoint: \S+checkpoint-9 does not exist", text)
    assert len(found) == 1, text[-5000:]
    assert "]: Traceback" not in text, text[-5000:]  # no rank's traceback (torchrun adds its own)
