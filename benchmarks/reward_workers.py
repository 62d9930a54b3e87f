"""What `reward_timeout` costs: a reward call in this process against the same call in a worker process.

    python benchmarks/reward_workers.py [--calls 50] [--completions 128]

Rows (benchmarks/results/cpu-reward-workers.csv): per call, `correctness` and `format` on a batch of the
demo's completions, in this process and through `grpo_scale.reward_timeout.Bounded` (its worker process);
the worker's start (an interpreter plus the reward's module, paid at the first call and after each
timeout, not counted against the budget); and how long a call that runs over takes to come back (the
budget plus killing the worker).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Light imports only at the top: a spawned worker imports this script again (as __mp_main__), as it
# imports train.py in a run, and this module's torch-importing helpers would be counted in its start.
from grpo_scale.reward_timeout import Bounded, RewardTimeout  # noqa: E402
from grpo_scale.rewards import correctness_reward, format_reward  # noqa: E402
from grpo_scale.tasks import make_eval_set  # noqa: E402


def batch(n: int) -> dict:
    rows = make_eval_set({"arithmetic": 1.0}, [2], n, 0)
    return {"prompts": [r["prompt"] for r in rows], "answer": [r["answer"] for r in rows],
            "completions": [f"<think>{r['prompt']}</think><answer>{r['answer']}</answer>" for r in rows],
            "completion_ids": [[1] * 20 for _ in rows]}


def per_call_ms(fn, kwargs: dict, calls: int) -> list[float]:
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn(**kwargs)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--completions", type=int, default=128)
    ap.add_argument("--output", default=str(Path(__file__).resolve().parent / "results" / "cpu-reward-workers.csv"))
    args = ap.parse_args(argv)
    from benchmarks.records import environment, measured, write_csv
    kwargs, shape = batch(args.completions), f"{args.completions} completions"
    rows = []
    for name, fn in (("correctness", correctness_reward), ("format", format_reward)):
        rows.append(measured(per_call_ms(fn, kwargs, args.calls), benchmark="reward_timeout", provider="in-process",
                             shape=shape, metric=f"{name}_call", unit="ms"))
        starts, calls = [], []
        for _ in range(3):
            bounded = Bounded(fn, name, timeout=60)
            t0 = time.perf_counter()
            bounded._start()
            starts.append(time.perf_counter() - t0)
            calls += per_call_ms(bounded, kwargs, args.calls)
            bounded.close()
        rows.append(measured(calls, benchmark="reward_timeout", provider="worker", shape=shape,
                             metric=f"{name}_call", unit="ms", note="reward_timeout set: the call goes through a pipe"))
        rows.append(measured(starts, benchmark="reward_timeout", provider="worker", shape=shape,
                             metric=f"{name}_worker_start", unit="s",
                             note="spawn + import of the reward's module; not counted against the budget"))
    from benchmarks.reward_workers import hang  # by its module's name: a worker can import it
    overrun = []
    bounded = Bounded(hang, "hang", timeout=1.0)
    for _ in range(3):
        bounded._start()
        t0 = time.perf_counter()
        try:
            bounded(**kwargs)
        except RewardTimeout:
            overrun.append(time.perf_counter() - t0)
    rows.append(measured(overrun, benchmark="reward_timeout", provider="worker", shape=shape,
                         metric="overrun_return", unit="s", note="reward_timeout 1 s: the budget, then the kill"))
    path = write_csv(args.output, rows, environment("cpu", "reward-workers"))
    print(f"{'provider':<11} {'metric':<26} {'median':>9} {'q20':>9} {'q80':>9}  unit")
    for r in rows:
        print(f"{r.provider:<11} {r.metric:<26} {r.median:>9.3f} {r.q20:>9.3f} {r.q80:>9.3f}  {r.unit}")
    print(f"wrote {path}")
    return rows


def hang(**kwargs):
    """A reward that never answers."""
    time.sleep(3600)


if __name__ == "__main__":
    main()
