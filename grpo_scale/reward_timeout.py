"""Reward functions with a time budget (``reward_timeout``): a call that takes longer is stopped, and its
items count as missing.

A hanging reward (sandboxed code execution, a remote judge) would otherwise hang its rank, and with it
every other rank at the next collective. With ``reward_timeout`` set:

- a synchronous function runs in a worker process (one per training process, started with ``spawn``,
  reused from call to call). A call past the budget is ended by killing the worker; the next call
  starts a new one. The function travels to the worker by name, so it must be importable: a function of a
  module (``module:function``, a built-in, or an importable callable object such as TRL's overlong
  reward). A lambda, a nested function or a function of the script being run is refused when the run
  starts, with a message saying so. ``trainer_state`` reaches it as a namespace with the same fields;
- an ``async def`` function runs in the training process under ``asyncio.wait_for``;
- reward models (a loaded sequence-classification model) run in the training process, unbounded: their
  forward is a collective under ZeRO-3 and cannot be interrupted.

A timeout raises ``RewardTimeout``; the trainer scores the call's items as missing without retrying them
one by one, and it counts as a raise on every item for ``reward_fail_steps``. ``log_metric`` and
``log_extra`` calls made in the worker are replayed in the training process.
"""
from __future__ import annotations

import asyncio
import inspect
import multiprocessing
import pickle
import types
from typing import Callable, Optional

from grpo_scale.rewards import accepted_kwargs, call_reward

_LOGGERS = ("log_metric", "log_extra")


class RewardTimeout(RuntimeError):
    """A reward call took longer than reward_timeout."""


def is_async(fn) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


def check_importable(fn, name: str) -> None:
    """Raise ValueError unless ``fn`` can be sent to a worker process by name."""
    module = getattr(fn, "__module__", None) or getattr(type(fn), "__module__", None)
    why = None
    if module == "__main__":
        why = "it is defined in the script being run, which the worker process cannot import safely"
    else:
        try:
            pickle.dumps(fn)
        except (pickle.PicklingError, AttributeError, TypeError) as e:
            why = f"it cannot be sent to a worker process by name ({type(e).__name__}: {e})"
    if why:
        raise ValueError(f"reward {name!r}: reward_timeout runs synchronous reward functions in a worker process, "
                         f"but {why}. Define it at the top level of a module and name it 'module:function' (or make "
                         "it async def, which is bounded in this process), or leave reward_timeout unset")


def _call_in_worker(fn, kwargs: dict, loggers: tuple) -> tuple:
    """In the worker: the call under the reward contract, with log_metric / log_extra recorded."""
    calls: list = []
    for key in loggers:
        kwargs[key] = (lambda key: lambda name, value: calls.append((key, name, value)))(key)
    out = call_reward(fn, **kwargs)
    if hasattr(out, "tolist") and not isinstance(out, (list, tuple)):
        out = out.tolist()
    return out, calls


def _serve(conn) -> None:
    """The worker's loop: ("call", fn, kwargs, loggers) -> ("ok", (out, calls)) or ("error", exception);
    ("ready", fn) only imports fn's module. Ends when the pipe closes."""
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        try:
            if request[0] == "ready":  # fn's module is imported by now
                reply = ("ok", callable(request[1]))
            else:
                reply = ("ok", _call_in_worker(*request[1:]))
        except Exception as e:  # noqa: BLE001 - the user's reward raised: the trainer handles it
            reply = ("error", e)
        try:
            conn.send(reply)
        except Exception as e:  # noqa: BLE001 - an exception or result that does not pickle
            conn.send(("error", RuntimeError(f"{type(e).__name__} sending the reward's result back: {e}")))


class Bounded:
    """``fn`` under a time budget of ``timeout`` seconds per call; called with the reward contract's keyword
    arguments (as ``call_reward`` passes them).

    The worker is a process and a pipe of our own rather than a ``multiprocessing.Pool``: a pool cannot
    stop one running task, and terminating a pool whose worker was killed mid-task can deadlock on the
    pool's queue locks."""

    def __init__(self, fn: Callable, name: str, timeout: float):
        self.fn, self.timeout, self.__name__ = fn, float(timeout), name
        self.in_worker = not is_async(fn)
        if self.in_worker:
            check_importable(fn, name)
        self._worker = None  # (process, connection)

    def __call__(self, **kwargs):
        if not self.in_worker:
            return asyncio.run(self._bounded_async(kwargs))
        loggers = {k: kwargs.pop(k) for k in _LOGGERS if k in kwargs}
        if "trainer_state" in kwargs:  # its fields, without transformers' class (the worker need not import it)
            kwargs["trainer_state"] = types.SimpleNamespace(**vars(kwargs["trainer_state"]))
        process, conn = self._worker or self._start()
        conn.send(("call", self.fn, kwargs, tuple(loggers)))
        if not conn.poll(self.timeout):
            self.close()  # the only way to stop a call that hangs
            raise RewardTimeout(f"took longer than reward_timeout={self.timeout:g} s on {len(kwargs['completions'])} "
                                "completion(s); its worker process was killed")
        try:
            status, value = conn.recv()
        except (EOFError, OSError):  # the worker died (killed, out of memory, a crash in native code)
            code = process.exitcode
            self.close()
            raise RuntimeError(f"the worker process running the reward died (exit code {code})") from None
        if status == "error":
            raise value
        out, calls = value
        for key, name, value in calls:
            loggers[key](name, value)
        return out

    async def _bounded_async(self, kwargs: dict):
        try:
            return await asyncio.wait_for(self.fn(**accepted_kwargs(self.fn, kwargs)), self.timeout)
        except asyncio.TimeoutError:
            raise RewardTimeout(f"took longer than reward_timeout={self.timeout:g} s on "
                                f"{len(kwargs['completions'])} completion(s)") from None

    def _start(self):
        """A new worker, ready before any call is timed: the interpreter started and the function's module
        imported (both can take seconds; neither counts against the budget)."""
        ctx = multiprocessing.get_context("spawn")
        mine, theirs = ctx.Pipe()
        process = ctx.Process(target=_serve, args=(theirs,), daemon=True, name=f"reward {self.__name__}")
        process.start()
        theirs.close()
        self._worker = (process, mine)
        mine.send(("ready", self.fn))
        status, value = mine.recv()
        if status == "error":
            self.close()
            raise value
        return self._worker

    def close(self) -> None:
        """End the worker process (killed: a call that hangs may ignore SIGTERM)."""
        if self._worker is not None:
            process, conn = self._worker
            process.kill()
            process.join()
            conn.close()
            self._worker = None


def bound(fn: Callable, name: str, timeout: Optional[float]) -> Callable:
    """``fn`` as the trainer calls it: unchanged without a timeout, else ``Bounded``."""
    return fn if not timeout else Bounded(fn, name, timeout)
