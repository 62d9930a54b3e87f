"""Atomic checkpoints in HF Trainer's layout: OUTPUT_DIR/checkpoint-STEP/.

Every rank writes into ``checkpoint-STEP.tmp`` (Accelerate's ``save_state``: model, optimiser,
scheduler, per-rank RNG, DeepSpeed shards), rank 0 adds ``trainer_state.json`` and renames the
folder once every rank has finished. A kill during a save leaves a ``.tmp`` folder that is never picked
up on resume, and the previous checkpoint intact.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

_CKPT = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (with trainer_state.json), oldest first; .tmp folders are ignored."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _CKPT.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def resolve_resume(output_dir: str, resume: Optional[str]) -> Optional[Path]:
    """The checkpoint to resume from: None, 'latest' (newest complete one, or None if there is none) or a path."""
    if not resume:
        return None
    if resume == "latest":
        ckpts = list_checkpoints(output_dir)
        return ckpts[-1] if ckpts else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"resume_from_checkpoint: {path} is not a complete checkpoint "
                                f"(no {STATE_FILE}); use 'latest' or a checkpoint-STEP folder")
    return path


def save_checkpoint(accelerator, output_dir: str, step: int, trainer_state: dict,
                    save_total_limit: Optional[int] = None) -> Path:
    """Collective: every rank must call it. Returns the final checkpoint path."""
    final = Path(output_dir) / f"checkpoint-{step}"
    tmp = Path(output_dir) / f"checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a killed save
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state_path = tmp / STATE_FILE
        state_path.write_text(json.dumps(trainer_state, indent=1))
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        if save_total_limit:
            for old in list_checkpoints(output_dir)[:-save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_trainer_state(path: Path) -> dict:
    return json.loads((Path(path) / STATE_FILE).read_text())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
