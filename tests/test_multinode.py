"""Two "nodes" on one machine through accelerate_configs/multinode.yaml (one process each, ZeRO-2 over
gloo, the main node at 127.0.0.1): train, checkpoint and resume, once with one output folder both share
and once with one folder per node, as on nodes without a shared file system. Then an error raised on one
rank only: every rank stops, and the message is printed once, naming the rank.
"""
from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import reliability_helpers as rh

MULTINODE = rh.ROOT / "accelerate_configs" / "multinode.yaml"


def nodes(per_node: list[list[str]], timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """Launch train.py as node 0 and node 1 (one process each) with each node's arguments; wait for both."""
    with socket.socket() as s:  # a free port for the main node
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank, args in enumerate(per_node):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(MULTINODE), "--machine_rank",
               str(rank), "--num_machines", "2", "--num_processes", "2", "--main_process_ip", "127.0.0.1",
               "--main_process_port", str(port), str(rh.ROOT / "train.py"), *args]
        procs.append(subprocess.Popen(cmd, cwd=rh.ROOT, env=rh.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, start_new_session=True))
    done = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def args(out: Path, steps: int, *extra: str) -> list[str]:
    return [*rh.FAST, "--model_name_or_path", rh.tiny_model_path(), "--output_dir", str(out), "--max_steps",
            str(steps), "--save_steps", "2", "--per_device_train_batch_size", "4", "--report_to", "none", *extra]


def ok(procs) -> str:
    text = "".join(p.stdout + p.stderr for p in procs)
    assert all(p.returncode == 0 for p in procs), text[-5000:]
    return text


def test_two_nodes_sharing_one_output_folder(tmp_path):
    out = tmp_path / "shared"
    ok(nodes([args(out, 2), args(out, 2)]))
    text = ok(nodes([args(out, 4, "--resume_from_checkpoint", "latest")] * 2))
    assert "resumed from" in text and "portable state" not in text  # the same shape: Accelerate's files
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["history"]] == [1, 2, 3, 4]
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


def test_two_nodes_each_with_its_own_folder_and_an_error_on_one_rank(tmp_path):
    own = [tmp_path / "own0", tmp_path / "own1"]
    ok(nodes([args(own[0], 2), args(own[1], 2)]))
    for folder in own:  # each node published its own complete copy, with its own portable state
        ckpt = folder / "checkpoint-2"
        assert (ckpt / "trainer_state.json").is_file() and (ckpt / "portable" / "weights.safetensors").is_file()
    assert not (own[1] / "checkpoint-2" / "pytorch_model" / "mp_rank_00_model_states.pt").exists()  # rank 0's
    text = ok(nodes([args(own[0], 4, "--resume_from_checkpoint", "latest"),
                     args(own[1], 4, "--resume_from_checkpoint", "latest")]))
    assert "resumed from the portable state" in text, text[-3000:]
    state = json.loads((own[0] / "checkpoint-4" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["history"]] == [1, 2, 3, 4]
    assert (own[1] / "checkpoint-4" / "trainer_state.json").is_file()

    # node 1 is given a checkpoint path that does not exist there: both nodes stop, one message names rank 1
    procs = nodes([args(own[0], 6, "--resume_from_checkpoint", str(own[0] / "checkpoint-4")),
                   args(own[1], 6, "--resume_from_checkpoint", str(own[1] / "checkpoint-9"))])
    text = "".join(p.stdout + p.stderr for p in procs)
    found = re.findall(r"error \(rank \d\): rank 1: resume_from_checkpoint: \S+checkpoint-9 does not exist", text)
    assert len(found) == 1, text[-5000:]
    assert all(p.returncode != 0 for p in procs), text[-3000:]  # both stopped; neither waits for the other
    assert "]: Traceback" not in text, text[-5000:]  # no rank's traceback (torchrun adds its own)
