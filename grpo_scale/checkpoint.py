"""Atomic checkpoints in HF Trainer's layout: OUTPUT_DIR/checkpoint-STEP/.

A checkpoint holds Accelerate's ``save_state`` output (model, optimiser and scheduler state, one
``random_states_RANK.pkl`` per rank, DeepSpeed's ZeRO shards) plus ``trainer_state.json`` (step, data
position, metric history, ...). The write protocol, collective over all ranks:

1. every rank writes into ``checkpoint-STEP.tmp``;
2. once all have finished, the local main process of every node flushes the folder to disk and writes
   ``trainer_state.json`` (atomically: temporary file, then rename);
3. rank 0 renames ``checkpoint-STEP.tmp`` to ``checkpoint-STEP``. Nodes that do not share the file
   system rename their own copy afterwards.

A checkpoint is *complete* when its folder is named ``checkpoint-STEP`` and holds ``trainer_state.json``.
A kill at any point leaves either the previous complete checkpoints untouched plus a ``.tmp`` folder, or
the new checkpoint complete; resume never picks a ``.tmp`` folder or a folder without the state file.

Checkpoint files other than ``model.safetensors`` are pickles (optimiser, RNG, scheduler, DeepSpeed
shards): resume only from checkpoints your own runs wrote.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Optional

from grpo_scale.config import ConfigError

logger = logging.getLogger(__name__)

_CKPT = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
TMP_SUFFIX = ".tmp"
STATE_VERSION = 1


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (named checkpoint-STEP, with trainer_state.json), oldest first.

    ``.tmp`` folders of interrupted saves and folders without the state file are ignored.
    """
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _CKPT.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def resolve_resume(output_dir: str | os.PathLike, resume: Optional[str]) -> Optional[Path]:
    """The checkpoint to resume from.

    resume: None or "" (start from scratch), ``"latest"`` (the newest complete checkpoint in
    ``output_dir``, or None when there is none yet, so a restarted job starts cleanly), or a path to a
    complete ``checkpoint-STEP`` folder. Raises ConfigError for a path that is not one.
    """
    if not resume:
        return None
    if resume == "latest":
        ckpts = list_checkpoints(output_dir)
        return ckpts[-1] if ckpts else None
    path = Path(resume)
    if path.name.endswith(TMP_SUFFIX):
        raise ConfigError(f"resume_from_checkpoint: {path} is an unfinished save (a .tmp folder left by a "
                          "killed run); use 'latest' or a complete checkpoint-STEP folder")
    if not path.is_dir():
        raise ConfigError(f"resume_from_checkpoint: {path} does not exist; use 'latest' or a checkpoint-STEP folder")
    if not (path / STATE_FILE).is_file():
        inside = list_checkpoints(path)
        hint = (f"; it holds checkpoints ({inside[-1].name} is the newest): pass that folder, or set "
                f"output_dir to it and use 'latest'") if inside else "; use 'latest' or a checkpoint-STEP folder"
        raise ConfigError(f"resume_from_checkpoint: {path} is not a complete checkpoint (no {STATE_FILE}){hint}")
    return path


class CheckpointError(RuntimeError):
    """A checkpoint could not be written on some rank (a full disk, an unwritable folder). Raised on every
    rank alike; the previous checkpoints are untouched."""


def save_checkpoint(accelerator, output_dir: str | os.PathLike, step: int, trainer_state: dict,
                    save_total_limit: Optional[int] = None, extra=None, **save_state_kwargs) -> Path:
    """Write ``OUTPUT_DIR/checkpoint-{step}`` atomically. Collective: every rank must call it.

    trainer_state: JSON-serialisable dict, identical on every rank (written by each node's local main
    process). save_total_limit: keep only the newest this many complete checkpoints. ``extra(folder)``: a
    further writer called on every rank after Accelerate's files (the portable state; it may call
    collectives). save_state_kwargs go to ``Accelerator.save_state`` (DeepSpeed's save_checkpoint).
    Returns the path.

    A write that fails on any rank (OSError: disk full, permissions) is caught there, and the ranks agree
    on the outcome after each phase (one small all-reduce) instead of meeting at a barrier that a failed
    rank would never reach; DeepSpeed's own writes record their error and let the rank pass DeepSpeed's
    barriers. Then the unfinished folder is removed and CheckpointError raised on every rank, naming the
    rank, the error and the newest complete checkpoint.
    """
    root = Path(output_dir)
    final = root / f"checkpoint-{step}"
    tmp = root / f"checkpoint-{step}{TMP_SUFFIX}"

    def prepare():
        if accelerator.is_local_main_process:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(f"checkpoint-*{TMP_SUFFIX}"):  # leftovers of killed saves
                shutil.rmtree(stale, ignore_errors=True)

    def describe():
        if accelerator.is_local_main_process:
            _fsync_tree(tmp)  # the rename must not reach the disk before the files it publishes
            _write_json_atomic(tmp / STATE_FILE, {"version": STATE_VERSION, **trainer_state})

    def publish():
        if accelerator.is_main_process:
            _publish(tmp, final)

    phases = [prepare, lambda: _save_files(accelerator, tmp, trainer_state, **save_state_kwargs)]
    if extra is not None:
        phases.append(lambda: extra(tmp))
    for phase in (*phases, describe, publish):
        agree_written(accelerator, attempt(phase), final.name, root, remove=tmp)
    if accelerator.is_local_main_process:
        if tmp.exists():  # a node that does not share rank 0's file system publishes its own copy
            _publish(tmp, final)
        if save_total_limit:
            for old in list_checkpoints(root)[:-save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    logger.info("saved checkpoint %s", final)
    return final


def _save_files(accelerator, tmp: Path, trainer_state: dict, **save_state_kwargs) -> None:
    """Every rank's part of Accelerate's save_state into ``tmp`` (no barrier after it). An error in one of
    DeepSpeed's writes is kept until DeepSpeed's save has passed its barriers, then raised."""
    errors: list[BaseException] = []
    engines = [m.checkpoint_engine for m in getattr(accelerator, "_models", []) if hasattr(m, "checkpoint_engine")]
    originals = [engine.save for engine in engines]

    def deferred(save):
        def write(*args, **kwargs):
            try:
                return save(*args, **kwargs)
            except OSError as e:
                errors.append(e)
        return write

    for engine, save in zip(engines, originals):
        engine.save = deferred(save)
    try:
        accelerator.save_state(str(tmp), **save_state_kwargs)
    except OSError as e:
        errors.append(e)
    finally:
        for engine, save in zip(engines, originals):
            engine.save = save
    if errors:
        raise errors[0]  # the first


def attempt(fn) -> Optional[str]:
    """None when ``fn()`` ran, else what went wrong (an OSError: a full disk, a read-only folder)."""
    try:
        fn()
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    return None


def agree_written(accelerator, error: Optional[str], what: str, root: Path, remove: Optional[Path] = None) -> None:
    """Every rank learns whether any rank failed to write ``what`` (one small collective, reached by all,
    failed or not): on failure ``remove`` (the unfinished folder) goes and every rank raises
    CheckpointError naming the ranks, their errors and the newest complete checkpoint in ``root``."""
    errors = [error]
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object
        errors = gather_object([error])
    failed = [(rank, e) for rank, e in enumerate(errors) if e is not None]
    if not failed:
        return
    if accelerator.is_local_main_process and remove is not None:
        shutil.rmtree(remove, ignore_errors=True)
    done = list_checkpoints(root)
    kept = f"the newest complete checkpoint, {done[-1]}, is intact" if done else "no earlier checkpoint exists"
    where = "; ".join(f"rank {rank}: {e}" for rank, e in failed)
    raise CheckpointError(f"{what} could not be written ({where}); {kept}. Free space on the output file "
                          "system (or make it writable), then continue with --resume_from_checkpoint latest")


def load_trainer_state(path: str | os.PathLike) -> dict:
    """The ``trainer_state.json`` of a checkpoint folder, as a dict."""
    return json.loads((Path(path) / STATE_FILE).read_text())


def check_compatible(state: dict, path: Path, *, num_processes: int, zero_stage: int, seed: int,
                     batch: dict) -> bool:
    """Whether this launch has the shape of the run that wrote ``state`` (number of processes and ZeRO
    stage): then Accelerate's and DeepSpeed's per-process files load as they are; otherwise the portable
    state does (``grpo_scale.portable``). Raises ConfigError for what no resume can bridge: another seed
    (the data stream is seeded), or another global batch. ``batch``: this run's per_device_train_batch_size
    and gradient_accumulation_steps."""
    saved_seed = state.get("seed", seed)
    if saved_seed != seed:
        raise ConfigError(f"cannot resume from {path}: seed {saved_seed} (checkpoint) vs {seed} (this run): the "
                          "prompt stream is seeded; resume with the seed of the run that wrote it")
    then = {"num_processes": state.get("num_processes", num_processes), "zero_stage": state.get("zero_stage", zero_stage)}
    cfg = state.get("config", {})
    per_device = int(cfg.get("per_device_train_batch_size", batch["per_device_train_batch_size"]))
    accumulation = int(cfg.get("gradient_accumulation_steps", batch["gradient_accumulation_steps"]))
    before = then["num_processes"] * per_device * accumulation
    now = num_processes * batch["per_device_train_batch_size"] * batch["gradient_accumulation_steps"]
    if before != now:
        keep = [f"--gradient_accumulation_steps {before // (num_processes * batch['per_device_train_batch_size'])}"
                ] if before % (num_processes * batch["per_device_train_batch_size"]) == 0 else []
        keep += [f"--per_device_train_batch_size {before // (num_processes * batch['gradient_accumulation_steps'])}"
                 ] if before % (num_processes * batch["gradient_accumulation_steps"]) == 0 else []
        fix = (f"keep it with {' or '.join(keep)}" if keep else
               f"choose per_device_train_batch_size x gradient_accumulation_steps = {before} / {num_processes}")
        raise ConfigError(
            f"cannot resume from {path}: its run trained {before} completions per step ({then['num_processes']} "
            f"process(es) x per_device_train_batch_size {per_device} x gradient_accumulation_steps {accumulation}), "
            f"this one would train {now}; the global batch must stay the same to continue the run: {fix}")
    return then["num_processes"] == num_processes and then["zero_stage"] == zero_stage


def _publish(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``, replacing an older folder of the same name (os.replace cannot
    replace a non-empty folder, so the old one is first moved aside under a name resume ignores)."""
    if final.exists():
        aside = final.with_name(final.name + ".replaced" + TMP_SUFFIX)
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
        os.replace(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)


def _write_json_atomic(path: Path, data: dict) -> None:
    part = path.with_name(f".{path.name}.{os.getpid()}.part")
    with open(part, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)
    _fsync_dir(path.parent)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            try:
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems do not support fsync on directories
        pass
    finally:
        os.close(fd)
