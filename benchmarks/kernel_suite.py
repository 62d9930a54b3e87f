"""Kernel suite: every GRPO loss provider on the same inputs, checked first, then timed and measured.

For each point (a shape, dtype and importance-sampling level) and each provider:
1. correctness: loss and gradients against the eager reference in fp32 on the same input values
   (on the first sequences of the batch when the whole batch would be too big for an fp32 copy). A
   provider outside the tolerance, or one that raises, gets a `fail: ...` row and is not timed;
2. time per mode (fwd = forward with autograd on; bwd = backward alone, after an untimed forward;
   fwd+bwd), with the first call's time (compilation, JIT) reported apart;
3. peak memory (all modes on CUDA; fwd+bwd on CPU, where it costs a profiled run);
4. on CUDA, achieved bandwidth for the logits family: the floor bytes of the mode (fwd: read the
   logits once, 1U; fwd+bwd: read once and write the gradient once, 2U) over the time, also as a
   fraction of the measured device copy bandwidth;
5. under Triton's interpreter, the memory traffic of every Triton provider in units of U (the bytes
   of the logits), counted by benchmarks/traffic.py: issued, modelled HBM, and modelled HBM of the
   B*T*V-sized arguments only.
Triton providers are not timed under the interpreter (its speed says nothing about a GPU): their time
row says `not_measured`.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable

import torch

from benchmarks.providers import DTYPES, Case, Provider, default_providers, make_case
from benchmarks.records import Row, exact
from benchmarks.timing import copy_bandwidth_gbps, peak_memory_bytes, time_ms

MODES = ("fwd", "bwd", "fwd+bwd")
# Relative error bounds (whole-tensor norms) against the fp32 reference on the same input values:
# (loss, gradients). Low precision: the gradient is stored in bf16/fp16 (2^-8 relative rounding), and
# in the linear family the logits themselves are rounded after the matmul.
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (2e-2, 2e-2), torch.float16: (1e-2, 1e-2)}
CHECK_ELEMENTS = {"cuda": 1 << 28, "cpu": 1 << 20}  # logits elements of the correctness check's batch


@dataclasses.dataclass
class Point:
    """One benchmark point; which measurements it takes is part of the point."""

    family: str
    B: int
    T: int
    V: int
    H: int = 0
    dtype: str = "fp32"
    level: str = "token"
    modes: tuple = MODES
    time: bool = True
    memory: bool = False
    traffic: bool = False
    loss_type: str = "dapo"


def interpreted() -> bool:
    """Whether Triton kernels run in the interpreter in this process (decided before their import)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


# ------------------------------------------------------------------------------------------------
# Correctness.
# ------------------------------------------------------------------------------------------------
def rel_err(got: torch.Tensor, gold: torch.Tensor, floor: float = 1e-3) -> float:
    """||got - gold|| / max(||gold||, floor) in float64; inf for NaN or a missing gradient."""
    if got is None:
        return float("inf")
    got, gold = got.detach().double(), gold.detach().double()
    if got.shape != gold.shape:
        return float("inf")
    err = float((got - gold).norm() / max(float(gold.norm()), floor))
    return err if err == err else float("inf")


def golden(case: Case) -> tuple[torch.Tensor, dict]:
    """The eager reference on fp32 copies of the case's inputs: (loss, gradients by name)."""
    from benchmarks.providers import eager_loss

    names = ("logits",) if case.family == "logits" else ("hidden", "weight")
    leaves = {n: getattr(case, n).detach().float().requires_grad_() for n in names}
    loss = eager_loss(leaves, dataclasses.replace(case, dtype=torch.float32))
    loss.backward()
    return loss.detach(), {n: leaves[n].grad for n in names}


def check(provider: Provider, case: Case, gold: tuple) -> tuple[float, str]:
    """(worst error / tolerance, description); the provider passes when the first is <= 1."""
    loss_tol, grad_tol = TOLERANCE[case.dtype]
    leaves = provider.leaves(case)
    loss = provider.loss(leaves, case)
    loss.backward()
    errors = {"loss": rel_err(loss, gold[0]) / loss_tol}
    grads = provider.grads(leaves)
    for name, g in gold[1].items():
        errors[f"grad {name}"] = rel_err(grads.get(name), g) / grad_tol
    worst = max(errors.values())
    text = ", ".join(f"{k} {v * (loss_tol if k == 'loss' else grad_tol):.2e}" for k, v in errors.items())
    return worst, f"relative errors {text} (tolerances {loss_tol:g}, {grad_tol:g})"


# ------------------------------------------------------------------------------------------------
# One point.
# ------------------------------------------------------------------------------------------------
def _mode_callables(provider: Provider, leaves: dict, case: Case, mode: str):
    """(fn, setup) for time_ms / peak_memory_bytes; setup is None when the whole call is timed."""
    if mode == "fwd":
        return (lambda: provider.loss(leaves, case)), None
    if mode == "fwd+bwd":
        return (lambda: provider.loss(leaves, case).backward()), None
    return (lambda loss: loss.backward()), (lambda: provider.loss(leaves, case))


def _clear(leaves: dict) -> None:
    for t in leaves.values():
        t.grad = None


def _measure(provider: Provider, case: Case, point: Point, device: str, base: dict, copy_bw) -> list[Row]:
    rows = []
    leaves = provider.leaves(case)
    provider.loss(leaves, case).backward()  # compiles / JITs for this shape when the check's was smaller
    for mode in point.modes:
        fn, setup = _mode_callables(provider, leaves, case, mode)
        if point.time:
            t = time_ms(fn, device, setup=setup, grad_to_none=list(leaves.values()))
            rows.append(Row(**base, mode=mode, metric="time", unit="ms", **t))
            floor = {"fwd": 1, "fwd+bwd": 2}.get(mode)
            if device.startswith("cuda") and case.family == "logits" and floor:
                gbps = {"median": floor * case.unit_bytes / (t["median"] * 1e6),  # bandwidth quantiles
                        "q20": floor * case.unit_bytes / (t["q80"] * 1e6),  # are the time quantiles,
                        "q80": floor * case.unit_bytes / (t["q20"] * 1e6), "n": t["n"]}  # inverted
                note = f"floor {floor}U / time"
                rows.append(Row(**base, mode=mode, metric="bandwidth", unit="GB/s", note=note, **gbps))
                if copy_bw:
                    rows.append(Row(**base, mode=mode, metric="bandwidth_fraction", unit="of copy",
                                    note=f"{note}, over copy_ bandwidth {copy_bw['median']:.0f} GB/s",
                                    **{k: v / copy_bw["median"] if k != "n" else v for k, v in gbps.items()}))
        if point.memory and (device.startswith("cuda") or mode == "fwd+bwd"):
            _clear(leaves)
            peak = peak_memory_bytes(fn, device, setup=setup)
            if peak is None:
                rows.append(Row(**base, mode=mode, metric="peak_memory", unit="MiB",
                                status="skipped: torch.profiler allocation events unavailable"))
            else:
                what = "above the inputs" if device.startswith("cuda") else "tensor storage allocated in the call"
                note = f"{what}; U = {case.unit_bytes / 2**20:.3g} MiB"
                if case.family == "linear":
                    note += "; includes the gradients of hidden and of the weight (V x H)"
                rows.append(exact(peak / 2**20, **base, mode=mode, metric="peak_memory", unit="MiB", note=note))
                rows.append(exact(peak / case.unit_bytes, **base, mode=mode, metric="peak_memory", unit="U",
                                  note=note))
    return rows


def _launch_list(names: list[str]) -> str:
    """'a + b x 4 + c': consecutive launches of one kernel (chunks) counted, not repeated."""
    groups: list[list] = []
    for name in names:
        if groups and groups[-1][0] == name:
            groups[-1][1] += 1
        else:
            groups.append([name, 1])
    return " + ".join(n if k == 1 else f"{n} x {k}" for n, k in groups) or "no launch"


def _traffic(provider: Provider, case: Case, base: dict) -> list[Row]:
    """Loads and stores of the provider's Triton launches, per mode, in units of U."""
    from benchmarks.traffic import count_traffic

    leaves = provider.leaves(case)
    with count_traffic() as fwd:
        loss = provider.loss(leaves, case)
    with count_traffic() as bwd:
        loss.backward()
    rows = []
    unit = case.unit_bytes
    for mode, counters in (("fwd", [fwd]), ("bwd", [bwd]), ("fwd+bwd", [fwd, bwd])):
        totals = [c.totals(unit) for c in counters]
        big = [c.totals(unit, arguments=provider.big_args) for c in counters]
        kernels = _launch_list([launch.kernel for c in counters for launch in c.launches])
        for metric, value in (("traffic_issued", sum(t["issued"] for t in totals)),
                              ("traffic_hbm", sum(t["hbm"] for t in totals)),
                              ("traffic_hbm_logits", sum(t["hbm"] for t in big))):
            rows.append(exact(round(value, 4), **base, mode=mode, metric=metric, unit="U",
                              note=f"unmasked; {kernels}"))
    return rows


def run_point(point: Point, providers: list[Provider], device: str, copy_bw=None,
              log: Callable[[str], None] = print) -> list[Row]:
    """All rows of one point: per provider a correctness row, then (when it passed) its measurements."""
    dtype = DTYPES[point.dtype]
    case = make_case(point.family, point.B, point.T, point.V, H=point.H, dtype=dtype, device=device,
                     level=point.level, loss_type=point.loss_type)
    budget = CHECK_ELEMENTS["cuda" if device.startswith("cuda") else "cpu"]
    check_case = case.head(max(1, min(case.B, budget // (case.T * case.V))))
    gold = golden(check_case)
    if any(p.name == "compile" for p in providers):
        torch._dynamo.reset()  # every point compiles afresh, for its own shapes
    rows = []
    for provider in providers:
        base = dict(benchmark=f"grpo_loss-{point.family}", provider=provider.name, shape=case.shape,
                    dtype=point.dtype, level=point.level)
        started = time.perf_counter()
        oom = False
        try:
            worst, text = check(provider, check_case, gold)
        except torch.cuda.OutOfMemoryError:
            oom, worst, text = True, float("inf"), "out of memory in the check"
            torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001 - a provider that raises is reported, not fatal
            message = (str(e).strip().splitlines() or [""])[0][:200]
            worst, text = float("inf"), f"raised {type(e).__name__}: {message}"
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        first = time.perf_counter() - started  # the first call: compilation, JIT, interpreter
        ok = worst <= 1.0
        status = "ok" if ok else ("skipped: " if oom else "fail: ") + text
        rows.append(exact(worst if worst != float("inf") else None, **base, mode="fwd+bwd",
                          metric="check_error", unit="of tolerance", status=status,
                          note=f"{text}; checked on {check_case.shape}, first call {first:.2f} s"))
        if ok:
            if provider.triton and interpreted():
                if point.traffic:
                    rows += _traffic(provider, case, base)
                if point.time:
                    rows.append(Row(**base, mode="fwd+bwd", metric="time", unit="ms", status="not_measured: "
                                    "Triton interpreter on CPU; needs a GPU (H100 not yet measured)"))
                if point.memory:
                    rows += _measure(provider, case, dataclasses.replace(point, time=False), device, base, None)
            elif point.time or point.memory:
                try:
                    rows += _measure(provider, case, point, device, base, copy_bw)
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    rows.append(Row(**base, metric="time", unit="ms", status="skipped: out of memory"))
        log(f"  {provider.name:15s} {case.shape:24s} {point.dtype:5s} {point.level:8s} "
            f"{'ok' if ok else 'FAIL'} ({time.perf_counter() - started:.1f}s)")
        if device.startswith("cuda"):
            torch.cuda.empty_cache()  # each provider starts from the same free memory
    return rows


# ------------------------------------------------------------------------------------------------
# The points of each preset.
# ------------------------------------------------------------------------------------------------
def points(device: str, quick: bool) -> list[Point]:
    """The measured points for a device and preset. CPU: eager and compiled timings at small sizes,
    Triton checked and traffic-counted under the interpreter, peak memory at a moderate size. CUDA:
    up to N = 16384 tokens and Qwen's V = 151936 in bf16."""
    levels = ("token", "sequence")
    if device.startswith("cuda"):
        Qwen_V, H = 151936, 896  # Qwen2.5-0.5B's vocabulary and hidden size
        rows = (1, 4) if quick else (1, 4, 16)  # x T = 1024 tokens each
        out = [Point("logits", b, 1024, Qwen_V, dtype="bf16", level=lv, memory=True) for b in rows for lv in levels]
        out += [Point("linear", b, 1024, Qwen_V, H=H, dtype="bf16", level=lv, memory=True)
                for b in rows for lv in levels]
        if not quick:
            out += [Point("logits", 4, 1024, v, dtype="bf16", memory=True) for v in (32768, 128256)]
            out += [Point("logits", 4, 1024, Qwen_V, dtype="fp32", memory=True)]
        return out
    traffic = [Point("logits", 2, 8, 4099, dtype="bf16", level=lv, time=False, traffic=True) for lv in levels]
    traffic += [Point("linear", 2, 8, 4099, H=64, dtype="bf16", level=lv, time=False, traffic=True) for lv in levels]
    # Linear family on CPU: H small next to the number of tokens, so that the weight's gradient
    # (V x H, i.e. H / (B*T) U) does not hide the logits in the peak memory.
    if quick:
        timed = [Point("logits", 4, 32, 4096, memory=True), Point("logits", 4, 32, 4096, level="sequence")]
        timed += [Point("linear", 4, 64, 2048, H=64, memory=True)]
        return timed + traffic
    timed = [Point("logits", b, t, v, level=lv) for (b, t, v) in ((4, 64, 4096), (8, 128, 4096), (4, 64, 32768))
             for lv in levels]
    timed += [Point("logits", 4, 64, 8192, level=lv, time=False, memory=True) for lv in levels]
    timed += [Point("linear", 8, 64, 4096, H=64, level=lv, memory=True) for lv in levels]
    return timed + traffic


def run_suite(device: str, quick: bool, providers_for=default_providers, only_traffic: bool = False,
              log: Callable[[str], None] = print) -> list[Row]:
    """Every point of the preset; on CUDA the device's copy bandwidth first."""
    rows: list[Row] = []
    copy_bw = None
    if device.startswith("cuda") and not only_traffic:
        copy_bw = copy_bandwidth_gbps(device)
        rows.append(Row(benchmark="copy", provider="torch copy_", shape="1 GiB bf16", metric="bandwidth",
                        unit="GB/s", note="2 x bytes / time (read + write)", **copy_bw))
    for point in points(device, quick):
        if only_traffic and not point.traffic:
            continue
        providers = providers_for(point.family)
        if not (point.time or point.memory):  # a traffic count: only Triton providers have one
            providers = [p for p in providers if p.triton]
        rows += run_point(point, providers, device, copy_bw, log)
    return rows
