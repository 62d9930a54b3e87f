"""Timing and peak memory of one callable, on CUDA or on the CPU.

CUDA: `triton.testing.do_bench` (L2 flushed before every run, gradients reset), all samples kept so the
median and the 20/80 % quantiles come from the same runs; peak memory is `max_memory_allocated` above
what was allocated before the call. A run that needs untimed preparation each time (a backward needs a
fresh forward) uses the same recipe by hand: CUDA events around the timed part only, L2 flushed first.

CPU: `time.perf_counter` around each call. Peak memory is the highest total of tensor storage live at
once during the call among the storage allocated inside it, from torch.profiler's allocation events
(every allocation and free of torch's CPU allocator, in time order); tensors that existed before the
call are not counted, and neither is memory outside torch (the Triton interpreter's NumPy arrays,
Python objects). It is the CPU counterpart of CUDA's `max_memory_allocated` above the start.
"""
from __future__ import annotations

import gc
import time
from typing import Callable

import torch

from benchmarks.records import summarize


def _reset(grad_to_none) -> None:
    for t in grad_to_none:
        t.grad = None


def time_ms(fn: Callable, device: str, *, setup: Callable | None = None, grad_to_none=(),
            warmup_ms: float = 25, rep_ms: float = 100, min_reps: int = 3, max_reps: int = 1000) -> dict:
    """Milliseconds per call of `fn()`: {'median', 'q20', 'q80', 'n'} over the timed runs.

    setup: called untimed before every run (its result is passed to `fn`); without it, `fn()` is timed
    as is (do_bench on CUDA). grad_to_none: tensors whose .grad is reset before every run.
    """
    if device.startswith("cuda"):
        if setup is None:
            return _do_bench(fn, list(grad_to_none), warmup_ms, rep_ms)
        return summarize(_time_cuda(fn, setup, list(grad_to_none), warmup_ms, rep_ms))
    return summarize(_time_cpu(fn, setup, list(grad_to_none), warmup_ms, rep_ms, min_reps, max_reps))


def _do_bench(fn, grad_to_none, warmup_ms, rep_ms) -> dict:
    from triton.testing import do_bench

    try:  # every sample, so that the quantiles come from the same runs as the median
        return summarize(list(do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none or None,
                                       return_mode="all")))
    except (AssertionError, TypeError, ValueError):  # a Triton without return_mode="all"
        q50, q20, q80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none or None,
                                 quantiles=[0.5, 0.2, 0.8])
        return {"median": q50, "q20": q20, "q80": q80, "n": 0}  # n unknown


def _time_cuda(fn, setup, grad_to_none, warmup_ms, rep_ms) -> list[float]:
    import triton

    driver = triton.runtime.driver.active
    cache = driver.get_empty_cache_for_benchmark()

    def one(timed: bool):
        _reset(grad_to_none)
        state = setup()
        driver.clear_cache(cache)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(state)
        end.record()
        return (start, end) if timed else None

    one(False)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    one(False)
    torch.cuda.synchronize()
    estimate_ms = max((time.perf_counter() - t0) * 1e3, 1e-3)  # includes setup: an upper bound
    for _ in range(max(1, int(warmup_ms / estimate_ms))):
        one(False)
    events = [one(True) for _ in range(max(3, int(rep_ms / estimate_ms)))]
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in events]


def _time_cpu(fn, setup, grad_to_none, warmup_ms, rep_ms, min_reps, max_reps) -> list[float]:
    def one() -> float:
        _reset(grad_to_none)
        state = setup() if setup is not None else None
        t0 = time.perf_counter()
        fn(state) if setup is not None else fn()
        return (time.perf_counter() - t0) * 1e3

    spent = 0.0
    while True:  # at least one warm-up run
        spent += one()
        if spent >= warmup_ms:
            break
    samples: list[float] = []
    while len(samples) < min_reps or (sum(samples) < rep_ms and len(samples) < max_reps):
        samples.append(one())
    return samples


def peak_memory_bytes(fn: Callable, device: str, *, setup: Callable | None = None) -> int | None:
    """Peak bytes allocated during `fn()` (or `fn(setup())`, setup not counted) above what was live
    before it; None when it cannot be measured here (see the module docstring for what is counted)."""
    gc.collect()  # garbage of earlier runs, freed mid-call, would hide allocations
    state = setup() if setup is not None else None
    call = (lambda: fn(state)) if setup is not None else fn
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return _cpu_peak_bytes(call)


def _cpu_peak_bytes(call) -> int | None:
    """Highest running sum of the allocation events' sizes (frees are negative) in time order."""
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        return None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    try:  # an experimental API: say so rather than guess when it changes
        stack, events = list(prof.profiler.kineto_results.experimental_event_tree()), []
        while stack:
            event = stack.pop()
            stack.extend(event.children)
            if event.typed[0] == _EventType.Allocation and event.typed[1].device.type == "cpu":
                events.append((event.start_time_ns, event.typed[1].alloc_size, event.typed[1].ptr))
    except (AttributeError, RuntimeError, TypeError):
        return None
    blocks: dict = {}  # address -> size of the blocks allocated inside the call and still live
    live = peak = 0
    for _, size, ptr in sorted(events, key=lambda e: e[0]):
        if size > 0:
            blocks[ptr] = size
            live += size
            peak = max(peak, live)
        elif ptr in blocks:  # frees of older storage (garbage collected mid-call) are not counted
            live -= blocks.pop(ptr)
    return peak


def copy_bandwidth_gbps(device: str, nbytes: int = 1 << 30) -> dict:
    """Device memory bandwidth of `dst.copy_(src)` (reads and writes `nbytes` each), GB/s summary."""
    if not device.startswith("cuda"):
        raise ValueError("copy bandwidth is measured on CUDA devices only")
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup_ms=50, rep_ms=300)
    # GB/s falls as time rises: the 20 % time quantile is the 80 % bandwidth quantile
    return {"median": 2 * nbytes / (ms["median"] * 1e6), "q20": 2 * nbytes / (ms["q80"] * 1e6),
            "q80": 2 * nbytes / (ms["q20"] * 1e6), "n": ms["n"]}
