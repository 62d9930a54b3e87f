"""Stopping on request: a pre-emption signal saves a checkpoint and ends the run.

Schedulers pre-empt with SIGTERM (SLURM, Kubernetes) and kill a grace period later; SLURM can warn ahead
with SIGUSR1; a person stops a run with Ctrl-C (SIGINT). While ``GRPOTrainer.train`` runs, each of these
only sets a flag. At the trainer's stop points every rank asks whether any rank has the flag (one small
all-reduce), so all ranks stop at the same point: the step in progress, if any, is abandoned (weights,
optimiser, schedule, data position and random states stay those of its start), a checkpoint of the last
finished step is written, ``OUTPUT_DIR/preempted`` records it, and ``train.py`` exits with status
``EXIT_STOPPED``. Resuming with ``--resume_from_checkpoint latest`` redoes the abandoned step exactly.
A second SIGINT aborts at once (KeyboardInterrupt).

The stop points: the end of every step; after each round's generation, which itself ends within one
token once the flag is set on its rank; after scoring; after the old and reference log-probs; between
the micro-batches of a step, before its optimiser update. A step's optimiser update, a reward call and
a save run to their end.
"""
from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Optional

import torch

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
EXIT_STOPPED = 4       # train.py's status after a stop signal (a checkpoint was written)
EXIT_SAVE_FAILED = 5   # train.py's status when a checkpoint could not be written on some rank
MARKER = "preempted"


class StopRequested(Exception):
    """Raised at a stop point that all ranks agreed on; caught by the training loop."""

    def __init__(self, where: str):
        super().__init__(where)
        self.where = where


class StopSignals:
    """While installed, STOP_SIGNALS set ``signum`` (the first one received) instead of ending the process;
    a second SIGINT raises KeyboardInterrupt. Handlers can only be installed from the main thread:
    elsewhere ``install`` does nothing and returns False."""

    def __init__(self):
        self.signum: Optional[int] = None
        self.received_at: Optional[float] = None
        self._sigints = 0
        self._previous: dict = {}

    def install(self) -> bool:
        if threading.current_thread() is not threading.main_thread():
            return False
        for s in STOP_SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return True

    def uninstall(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            self._sigints += 1
            if self._sigints > 1:
                raise KeyboardInterrupt("second SIGINT: stopping at once, without a checkpoint")
        if self.signum is None:
            self.signum, self.received_at = signum, time.monotonic()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __call__(self) -> bool:  # the sampler's "stop now?" question
        return self.signum is not None


class RandomStates:
    """The process's random states (Python, NumPy, torch CPU and every CUDA device): taken at the start of
    a step and put back when the step is abandoned, so the checkpoint continues from the step's start."""

    def __init__(self):
        import numpy as np
        self.python = random.getstate()
        self.numpy = np.random.get_state()
        self.torch = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    @classmethod
    def from_file(cls, path: Path) -> "RandomStates":
        """The states in one of Accelerate's ``random_states_RANK.pkl`` (a pickle: own checkpoints only)."""
        saved = torch.load(path, weights_only=False)
        states = cls.__new__(cls)
        states.python, states.numpy, states.torch = (saved["random_state"], saved["numpy_random_seed"],
                                                     saved["torch_manual_seed"])
        cuda = saved.get("torch_cuda_manual_seed")
        states.cuda = cuda if cuda and torch.cuda.is_available() else None
        return states

    def restore(self) -> None:
        import numpy as np
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        torch.set_rng_state(self.torch)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def write_marker(output_dir: str | os.PathLike, step: int, checkpoint: Path, signal_name: str,
                 seconds: float, grace: float) -> Path:
    """OUTPUT_DIR/preempted: what a requeue script reads (the launcher's exit status does not say)."""
    path = Path(output_dir) / MARKER
    part = path.with_name(f".{MARKER}.{os.getpid()}.part")
    part.write_text(json.dumps({"step": step, "checkpoint": str(checkpoint), "signal": signal_name,
                                "seconds_to_save": round(seconds, 3), "within_grace": seconds <= grace,
                                "stop_grace_seconds": grace, "resume": "--resume_from_checkpoint latest"},
                               indent=1) + "\n")
    os.replace(part, path)
    return path


def clear_marker(output_dir: str | os.PathLike) -> None:
    """A run that starts (or resumes) is no longer pre-empted."""
    try:
        (Path(output_dir) / MARKER).unlink()
    except FileNotFoundError:
        pass
