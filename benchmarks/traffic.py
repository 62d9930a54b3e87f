"""Memory traffic of the GRPO kernels, counted under Triton's interpreter (no GPU needed).

    python benchmarks/traffic.py            # unmasked bf16 case, prints a table in units of U
    python benchmarks/traffic.py --csv benchmarks/results/traffic_interpreter.csv

Every `tl.load` / `tl.store` the interpreter executes is counted per kernel argument (per tensor),
with two figures in units of U = bytes of the logits (B * T * V * element size):

- issued: every element loaded or stored, each time;
- modelled HBM: within one launch, a program instance that reads an element it has already read (or
  written) gets it on-chip (registers/L1/L2: the design keeps a row in flight per SM), so only its
  first read counts; every other read counts again. Each distinct element a program stores counts once.

The design's figures on an unmasked case (`TARGETS`, the README's loss table): 2U for the forward + backward
of every token-level loss type whose per-token gradient weight is known after one pass over the row
(grpo, bnpo, dr_grpo, dapo, luspo, cispo, sapo; on- or off-policy; with the bias-corrected KL, token-mode
importance weights and the entropy bonus), 3U where a statistic over the whole sequence or batch must
come first (GSPO's sequence ratio, vespo's summed ratio, sequence-mode importance weights, the off-policy
mask with old or sampler log-probs, the top-entropy quantile), 1U for `selective_logps`. A GPU's profiler
(DRAM bytes) is the final word; this count is deterministic and shows the design on CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import os
import sys
from dataclasses import dataclass, field

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports a kernel

import numpy as np  # noqa: E402
import torch  # noqa: E402
from triton.runtime import interpreter  # noqa: E402


@dataclass
class Launch:
    """Traffic of one kernel launch, in bytes, per pointer argument."""

    kernel: str
    grid: int = 0
    issued: dict = field(default_factory=dict)  # arg -> [load bytes, store bytes]
    hbm: dict = field(default_factory=dict)  # arg -> [load bytes, store bytes]

    def add(self, table, arg, load, store):
        row = table.setdefault(arg, [0, 0])
        row[0] += load
        row[1] += store


class TrafficCounter:
    """Counts the interpreter's loads and stores while active (see `count_traffic`)."""

    def __init__(self):
        self.launches: list[Launch] = []
        self._ranges = None  # (starts, ends, names) of the current launch's pointer arguments
        self._program = None
        self._touched = {}  # (arg, kind) -> list of address arrays of the current program

    # -- launch and program boundaries ---------------------------------------------------------
    def begin_launch(self, name, arg_names, args):
        spans = {}
        for arg_name, arg in zip(arg_names, args):
            if not isinstance(arg, torch.Tensor) or arg.numel() == 0:
                continue
            extent = sum((size - 1) * stride for size, stride in zip(arg.shape, arg.stride())) + 1
            span = (arg.data_ptr(), arg.data_ptr() + extent * arg.element_size())
            spans.setdefault(span, []).append(arg_name)  # aliases (in place) share one entry
        ordered = sorted(spans.items())
        self._ranges = (np.array([s for (s, _), _ in ordered], dtype=np.uint64),
                        np.array([e for (_, e), _ in ordered], dtype=np.uint64),
                        ["=".join(names) for _, names in ordered])
        self.launches.append(Launch(kernel=name))
        self._program = None

    def end_launch(self):
        self._flush_program()
        self._ranges = None

    def _flush_program(self):
        launch = self.launches[-1]
        for (arg, kind), chunks in self._touched.items():
            distinct = np.unique(np.concatenate([addresses for addresses, _ in chunks]))
            size = chunks[0][1]
            launch.add(launch.hbm, arg, *((distinct.size * size, 0) if kind == "load" else (0, distinct.size * size)))
        if self._program is not None:
            launch.grid += 1
        self._touched = {}

    # -- memory operations ---------------------------------------------------------------------
    def record(self, ptrs, mask, kind):
        if self._ranges is None:
            return
        program = interpreter.interpreter_builder.grid_idx
        if program != self._program:
            self._flush_program()
            self._program = program
        addresses = np.ravel(ptrs.data)[np.ravel(np.broadcast_to(mask.data, np.shape(ptrs.data)))]
        if addresses.size == 0:
            return
        size = ptrs.get_element_ty().primitive_bitwidth // 8
        starts, ends, names = self._ranges
        index = np.searchsorted(starts, addresses, side="right") - 1
        inside = (index >= 0) & (addresses < ends[np.maximum(index, 0)])
        if not inside.all():
            raise RuntimeError("a kernel touched memory outside its tensor arguments")
        launch = self.launches[-1]
        for arg_index in np.unique(index):
            picked = addresses[index == arg_index]
            arg = names[arg_index]
            nbytes = picked.size * size
            launch.add(launch.issued, arg, *((nbytes, 0) if kind == "load" else (0, nbytes)))
            if kind == "load":  # a read of an element this program already wrote is on-chip too
                self._touched.setdefault((arg, "load"), [])
                written = self._touched.get((arg, "store"))
                if written:
                    picked = np.setdiff1d(picked, np.concatenate([a for a, _ in written]))
            self._touched.setdefault((arg, kind), []).append((picked, size))

    # -- results -------------------------------------------------------------------------------
    def totals(self, unit: int, arguments=None) -> dict:
        """{'issued': U, 'hbm': U} summed over launches, over all pointer arguments or only those
        whose name contains one of `arguments` (for example ("logits_ptr", "grad_ptr"))."""
        out = {"issued": 0.0, "hbm": 0.0}

        def wanted(arg):
            return arguments is None or any(a in arg.split("=") for a in arguments)

        for launch in self.launches:
            out["issued"] += sum(sum(v) for k, v in launch.issued.items() if wanted(k)) / unit
            out["hbm"] += sum(sum(v) for k, v in launch.hbm.items() if wanted(k)) / unit
        return out

    def per_argument(self, unit: int) -> list[tuple]:
        """(kernel, argument, issued load, issued store, hbm load, hbm store), all in U."""
        rows = []
        for launch in self.launches:
            for arg in launch.issued:
                il, is_ = launch.issued[arg]
                hl, hs = launch.hbm.get(arg, (0, 0))
                rows.append((launch.kernel, arg, il / unit, is_ / unit, hl / unit, hs / unit))
        return rows


@contextlib.contextmanager
def count_traffic():
    """Within the block, every interpreted Triton launch is counted; yields the TrafficCounter."""
    counter = TrafficCounter()
    builder_cls = type(interpreter.interpreter_builder)
    real_load, real_store = builder_cls.create_masked_load, builder_cls.create_masked_store
    real_call = interpreter.GridExecutor.__call__

    def load(self, ptrs, mask, other, *rest):
        counter.record(ptrs, mask, "load")
        return real_load(self, ptrs, mask, other, *rest)

    def store(self, ptrs, value, mask, *rest):
        counter.record(ptrs, mask, "store")
        return real_store(self, ptrs, value, mask, *rest)

    def call(self, *args, **kwargs):
        names = list(self.arg_names)
        values = list(args) + [kwargs.get(n) for n in names[len(args):]]
        counter.begin_launch(self.fn.__name__, names, values)
        try:
            return real_call(self, *args, **kwargs)
        finally:
            counter.end_launch()

    builder_cls.create_masked_load, builder_cls.create_masked_store = load, store
    interpreter.GridExecutor.__call__ = call
    try:
        yield counter
    finally:
        builder_cls.create_masked_load, builder_cls.create_masked_store = real_load, real_store
        interpreter.GridExecutor.__call__ = real_call


# --------------------------------------------------------------------------------------------------
# The design's cases.
# --------------------------------------------------------------------------------------------------
# The kernels' arguments that hold B*T*V elements; the rest are per-token vectors.
LOGITS_SIZED = ("logits_ptr", "grad_ptr")


# case -> (settings, which inputs exist, stated HBM traffic of the logits and gradient tensors in U). The
# quantile's figure is a bound: its launch 2 skips the rows the quantile dropped (zero gradient weight) and
# writes their zeros unread, so it moves 2U + the kept share of the rows.
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")
TARGETS = {
    **{f"{t} {p}": (dict(loss_type=t, **({"epsilon_high": 5.0} if t == "cispo" else {})), p,
                    3.0 if t == "vespo" else 2.0)
       for t in LOSS_TYPES for p in ("on-policy", "old_logps")},
    "grpo sequence level (GSPO)": (dict(loss_type="grpo", importance_sampling_level="sequence"), "old_logps", 3.0),
    "dapo top_entropy_quantile 0.2": (dict(top_entropy_quantile=0.2), "on-policy", 3.0),
    "dapo off-policy mask, on-policy": (dict(off_policy_mask_threshold=0.1), "on-policy", 2.0),
    "dapo off-policy mask, old_logps": (dict(off_policy_mask_threshold=0.1), "old_logps", 3.0),
    "dapo IS token_truncate": (dict(importance_sampling_mode="token_truncate"), "sampler", 2.0),
    "dapo IS sequence_mask": (dict(importance_sampling_mode="sequence_mask"), "sampler", 3.0),
    "dapo KL (bias-corrected) + entropy bonus": (dict(beta=0.04, use_bias_correction_kl=True, entropy_coef=0.01),
                                                 "old_logps", 2.0),
}


def measure(B=2, T=8, V=1000, dtype=torch.bfloat16, seed=0) -> list[dict]:
    """Runs every case on an unmasked batch; returns one row per case with issued and modelled U, and the
    stated target (None where there is none) of the logits-sized tensors' modelled traffic."""
    from grpo_scale.kernels.grpo_loss import grpo_loss, selective_logps

    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=g)
    adv = torch.randn(B, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    old = selective_logps(logits, ids) + 0.1 * torch.randn(B, T, generator=g)
    sampler = old + 0.05 * torch.randn(B, T, generator=g)
    ref = old + 0.1 * torch.randn(B, T, generator=g)
    unit = logits.numel() * logits.element_size()

    def fwd_bwd(upstream=1.0, inputs="old_logps", **kwargs):
        x = logits.clone().requires_grad_()
        out = grpo_loss(x, ids, adv, mask, None if inputs == "on-policy" else old,
                        ref if kwargs.get("beta") else None, sampling_logps=sampler if inputs == "sampler" else None,
                        **kwargs)
        (out.loss * upstream if upstream != 1.0 else out.loss).backward()

    cases = {
        "token fwd+bwd": (lambda: fwd_bwd(), 2.0),
        "token fwd+bwd inplace": (lambda: fwd_bwd(inplace=True), 2.0),
        "token fwd+bwd, upstream 0.5": (lambda: fwd_bwd(upstream=0.5), 4.0),  # the scaling re-reads and rewrites
        "sequence fwd+bwd": (lambda: fwd_bwd(importance_sampling_level="sequence"), 3.0),
        "selective_logps": (lambda: selective_logps(logits, ids), 1.0),
        **{name: ((lambda s=settings, i=inputs: fwd_bwd(inputs=i, **s)), target)
           for name, (settings, inputs, target) in TARGETS.items()},
    }
    rows = []
    for name, (run, target) in cases.items():
        with count_traffic() as counter:
            run()
        totals = counter.totals(unit)
        big = counter.totals(unit, arguments=LOGITS_SIZED)
        rows.append({"case": name, "launches": len(counter.launches),
                     "issued_U": round(totals["issued"], 4), "hbm_U": round(totals["hbm"], 4),
                     "logits_grad_issued_U": round(big["issued"], 4), "logits_grad_hbm_U": round(big["hbm"], 4),
                     "target_U": target, "meets_target": round(big["hbm"], 4) <= target,
                     "B": B, "T": T, "V": V, "dtype": str(dtype).replace("torch.", ""),
                     "kernels": " + ".join(launch.kernel for launch in counter.launches)})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--B", type=int, default=2)
    parser.add_argument("--T", type=int, default=8)
    parser.add_argument("--V", type=int, default=1000)
    parser.add_argument("--csv", help="also write the rows to this CSV file")
    args = parser.parse_args(argv)
    rows = measure(args.B, args.T, args.V)
    print(f"B={args.B} T={args.T} V={args.V} bf16, unmasked; U = {args.B * args.T * args.V * 2} bytes. "
          "All arguments / only the logits and gradient tensors:")
    print(f"{'case':42s} {'launches':>8s} {'issued U':>9s} {'HBM U':>7s} {'issued U':>9s} {'HBM U':>7s} "
          f"{'target':>6s}  kernels")
    for r in rows:
        print(f"{r['case']:42s} {r['launches']:8d} {r['issued_U']:9.3f} {r['hbm_U']:7.3f} "
              f"{r['logits_grad_issued_U']:9.3f} {r['logits_grad_hbm_U']:7.3f} "
              f"{r['target_U']:5.1f}{' ' if r['meets_target'] else '!'}  {r['kernels']}")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return rows


if __name__ == "__main__":
    sys.exit(0 if all(r["meets_target"] for r in main()) else 1)
