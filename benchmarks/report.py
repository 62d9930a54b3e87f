"""Markdown tables from the benchmark CSVs, for benchmarks/README.md.

    python benchmarks/report.py            # print the tables
    python benchmarks/report.py --update   # rewrite the README's section between its result markers
    python benchmarks/report.py --gpu-check DIR [--update]   # the summary of a gpu_check.sh run

Every table names the device its figures were measured on (the CSV's `device` column) and the
preset; a device with no CSV is listed as not yet measured.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.records import read_csv  # noqa: E402

README = ROOT / "benchmarks" / "README.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"
GPU_START, GPU_END = "<!-- gpu-check:start -->", "<!-- gpu-check:end -->"
GPU_HEADER = "### GPU check on "
PHASES = ("generation", "reward", "logps", "policy", "optimizer", "other")


def _num(value: str, digits: int = 3) -> str:
    if value in ("", None):
        return "-"
    x = float(value)
    return f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:.0f}"


def _spread(r: dict) -> str:
    """'median (q20-q80)'; the median alone when the three agree (a count)."""
    if r["q20"] == r["q80"]:
        return _num(r["median"])
    return f"{_num(r['median'])} ({_num(r['q20'])}-{_num(r['q80'])})"


def _table(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)


def _caption(rows: list[dict], what: str) -> str:
    r = rows[0]
    return (f"**{what}** on `{r['device']}`, preset `{r['preset']}`, revision `{r['git_rev']}`, "
            f"{r['timestamp'][:10]}.")


def kernel_table(rows: list[dict]) -> str:
    """Three tables: the correctness check per point and provider, times per mode where measured,
    peak memory in U where measured."""
    def point(r):
        return f"{r['benchmark'].split('-', 1)[-1]} {r['shape']} {r['dtype']} {r['level']}"

    providers = list(dict.fromkeys(r["provider"] for r in rows))
    checks, times, memory = defaultdict(dict), defaultdict(dict), defaultdict(dict)
    for r in rows:
        if r["metric"] == "check_error":
            checks[point(r)][r["provider"]] = "ok" if r["status"] == "ok" else r["status"].split(":")[0]
        elif r["metric"] == "time" and r["status"] == "ok":
            times[(point(r), r["provider"])][r["mode"]] = _spread(r)
        elif r["metric"] == "peak_memory" and r["unit"] == "U" and r["status"] == "ok":
            memory[point(r)][r["provider"]] = _num(r["median"])
    parts = ["Correctness check against the fp32 reference (`ok` = within tolerance):\n\n" + _table(
        ["point", *providers], [[p, *[c.get(q, "-") for q in providers]] for p, c in checks.items()])]
    if times:
        parts.append("Time, ms, median (q20-q80); the Triton providers are not timed without a GPU:\n\n" + _table(
            ["point", "provider", "fwd", "bwd", "fwd+bwd"],
            [[p, q, *[t.get(m, "-") for m in ("fwd", "bwd", "fwd+bwd")]] for (p, q), t in times.items()]))
    if memory:
        shown = [q for q in providers if any(q in m for m in memory.values())]
        parts.append("Peak memory of forward + backward, in U (the bytes of the logits):\n\n" + _table(
            ["point", *shown], [[p, *[m.get(q, "-") for q in shown]] for p, m in memory.items()]))
    return "\n\n".join(parts)


def traffic_table(rows: list[dict]) -> str:
    points: dict = defaultdict(dict)
    for r in rows:
        key = (r["benchmark"].split("-", 1)[-1], r["shape"], r["dtype"], r["level"], r["provider"])
        points[key][(r["metric"], r["mode"])] = r
    lines = []
    for (family, shape, dtype, level, provider), m in points.items():
        cells = [_num(m[("traffic_hbm_logits", mode)]["median"]) for mode in ("fwd", "bwd", "fwd+bwd")]
        cells += [_num(m[("traffic_hbm", "fwd+bwd")]["median"]), _num(m[("traffic_issued", "fwd+bwd")]["median"])]
        kernels = m[("traffic_hbm", "fwd+bwd")]["note"].split("; ", 1)[-1]
        lines.append([family, shape, level, provider, *cells, kernels])
    return _table(["family", "shape", "level", "provider", "HBM fwd", "HBM bwd", "HBM fwd+bwd",
                   "HBM all args", "issued", "launches"], lines)


def e2e_table(rows: list[dict]) -> str:
    sides = list(dict.fromkeys(r["provider"] for r in rows if "/" not in r["provider"] and r["provider"] != "floor"
                               and r["metric"] != "bound_speedup_at_floor"))
    get = {(r["provider"], r["metric"], r["mode"]): r for r in rows if r["metric"] != "reward_mean"}
    lines = []
    for side in sides:
        if (side, "steps_per_s", "step") not in get or get[(side, "steps_per_s", "step")]["status"] != "ok":
            status = get.get((side, "steps_per_s", "step"), {}).get("status", "-")
            lines.append([side, status] + ["-"] * (4 + len(PHASES)))
            continue
        lines.append([side, _spread(get[(side, "steps_per_s", "step")]), _spread(get[(side, "tokens_per_s", "step")]),
                      _num(get[(side, "completion_length", "step")]["median"]),
                      _num(get[(side, "time", "step")]["median"]),
                      *[_num(get[(side, "time", p)]["median"]) for p in PHASES],
                      _num(get[(side, "peak_memory", "step")]["median"], 4)])
    table = _table(["side", "steps/s", "tokens/s", "completion tokens", "step s", *[f"{p} s" for p in PHASES],
                    "peak memory MiB"], lines)
    speedup = get.get(("ours/trl", "speedup", "step"))
    if speedup:
        table += (f"\n\nSteps/s, ours : TRL = **{_num(speedup['median'])}x** "
                  f"({_num(speedup['q20'])}-{_num(speedup['q80'])}); {speedup['note'].split('; ', 1)[-1]}.")
    curves = defaultdict(list)
    for r in rows:
        if r["metric"] == "reward_mean":
            curves[r["provider"]].append(f"{float(r['median']):.3f}")
    if curves:
        summary = []
        for side, c in curves.items():
            x = [float(v) for v in c]
            mean = sum(x) / len(x)
            se = (sum((v - mean) ** 2 for v in x) / max(len(x) - 1, 1) / len(x)) ** 0.5
            summary.append(f"{side} {mean:.3f} +- {se:.3f}")
        table += ("\n\nMean reward over the measured steps (+- standard error of the step means): "
                  + ", ".join(summary) + ".")
        table += "\n\nMean reward per measured step:\n\n" + _table(
            ["side", *[str(i + 1) for i in range(max(len(c) for c in curves.values()))]],
            [[side, *c] for side, c in curves.items()])
    return table


def floor_table(rows: list[dict]) -> str:
    """Each phase: ours, TRL, its floor (benchmarks/floors.py), and the bound on our step's speed-up were
    that phase alone at its floor; then the tokens of a step and the bound over TRL (empty without floors)."""
    get = {(r["provider"], r["metric"], r["mode"]): r for r in rows}
    if ("floor", "time", "step") not in get:
        return ""
    lines = []
    for p in (*PHASES, "step"):
        bound = get.get(("ours", "bound_speedup_at_floor", p))
        lines.append([p, *[_num(get[(side, "time", p)]["median"]) if (side, "time", p) in get else "-"
                           for side in ("ours", "trl", "floor")],
                      f"{_num(bound['median'])}x" if bound else "-"])
    table = _table(["phase", "ours s", "TRL s", "floor s", "bound on our step's speed-up, this phase at its floor"],
                   lines)
    floor_note = get[("floor", "time", "step")]["note"]
    tokens = {k: get.get(("floor", "tokens", f"tokens_{k}")) for k in ("real", "padded", "prompt_copies")}
    if all(tokens.values()):
        table += (f"\n\nTokens of a step (median): {_num(tokens['real']['median'], 4)} real (each group's prompt "
                  f"once), {_num(tokens['padded']['median'], 4)} in a padded forward, of which "
                  f"{_num(tokens['prompt_copies']['median'], 4)} are prompt copies. Rates: {floor_note}.")
    over = get.get(("ours/trl", "bound_speedup_at_floor", "step"))
    if over:
        table += f" Bound over TRL: **{_num(over['median'])}x** ({over['note']})."
    return table


def report(results: Path) -> str:
    parts = []
    prefixes = sorted({p.name.rsplit("-", 1)[0] for p in results.glob("*.csv")})
    for prefix in prefixes:
        for suite, what, build in (("kernel", "GRPO loss kernels", kernel_table),
                                   ("traffic", "Memory traffic in U (Triton interpreter count, unmasked)",
                                    traffic_table),
                                   ("e2e", "End-to-end GRPO steps", e2e_table)):
            path = results / f"{prefix}-{suite}.csv"
            if path.is_file() and (rows := read_csv(path)):
                parts.append(f"### {prefix}: {suite}\n\n{_caption(rows, what)}\n\n{build(rows)}")
    for path in sorted(results.glob("*-e2e-*.csv")):  # other models' e2e runs (memory comparisons aside)
        if "-e2e-memory-" in path.name or not (rows := read_csv(path)):
            continue
        name = path.stem.split("-e2e-", 1)
        floors = floor_table(rows)
        parts.append(f"### {name[0]}: e2e, {name[1]}\n\n{_caption(rows, 'End-to-end GRPO steps')}\n\n{e2e_table(rows)}"
                     + (f"\n\nWhere the step goes, and the floors:\n\n{floors}" if floors else ""))
    if not any(p.startswith("cuda") for p in prefixes):
        parts.append("### GPU (H100): not yet measured\n\nNo GPU was available where these results were "
                     "produced: kernel timings, bandwidth and GPU peak memory, and the end-to-end run on "
                     "Qwen2.5-0.5B's shapes are **not yet measured**. `python benchmarks/run.py` on a GPU "
                     "machine writes them (`results/cuda-<gpu>-*.csv`).")
    return "\n\n".join(parts)


def _skipped(rows: list[dict]) -> list[str]:
    """'provider: status' of the rows that stand for a whole provider that did not run."""
    return [f"`{r['provider']}`: {r['status']}" for r in rows if r["status"].startswith("skipped") and not r["shape"]]


def gpu_check_report(folder: Path) -> str:
    """The summary of one benchmarks/gpu_check.sh run (its folder of CSVs), headed by the device's name."""
    folder = Path(folder)
    read = {name: (read_csv(folder / f"{name}.csv") if (folder / f"{name}.csv").is_file() else [])
            for name in ("stages", "tests", "kernel", "e2e")}
    any_rows = next((rows[0] for name, rows in read.items() if rows and name != "stages"), None)
    device = any_rows["device"] if any_rows else "unknown device"
    dry = bool(any_rows) and "dry-run" in any_rows["preset"]
    head = f"{GPU_HEADER}{device}" + (" (dry run: CPU, tiny shapes, Triton interpreted)" if dry else "")
    parts = [head]
    if any_rows:
        parts.append(f"Revision `{any_rows['git_rev']}`, {any_rows['timestamp']}, `{any_rows['versions']}`.")
    if read["stages"]:
        parts.append("Stages:\n\n" + _table(["stage", "status", "seconds", "cap s"],
                                             [[r["stage"], r["status"], r["seconds"], r["cap_s"]] for r in read["stages"]]))
    tests = {r["metric"]: r for r in read["tests"]}
    if tests:
        parts.append(f"**Kernel tests** (`{tests['passed']['shape']}`): {_num(tests['passed']['median'])} passed, "
                     f"{_num(tests['failed']['median'])} failed, {_num(tests['skipped']['median'])} skipped in "
                     f"{_num(tests['time']['median'])} s; status `{tests['passed']['status']}`.")
    kernel = [r for r in read["kernel"] if r["shape"]]
    if kernel:
        parts.append("**GRPO loss kernels**\n\n" + kernel_table(kernel))
        copy = [r for r in kernel if r["benchmark"] == "copy"]
        fractions = [r for r in kernel if r["metric"] == "bandwidth_fraction" and r["mode"] == "fwd+bwd"]
        if fractions:
            parts.append(f"Achieved bandwidth of forward + backward against the 2U floor, as a fraction of the copy "
                         f"bandwidth ({_num(copy[0]['median']) if copy else '-'} GB/s):\n\n" + _table(
                             ["point", "provider", "fraction of copy"],
                             [[f"{r['shape']} {r['dtype']} {r['level']}", r["provider"], _spread(r)]
                              for r in fractions]))
    e2e = [r for r in read["e2e"] if r["shape"]]
    if e2e:
        parts.append("**End-to-end GRPO steps**\n\n" + e2e_table(e2e))
    skipped = _skipped(read["kernel"]) + _skipped(read["e2e"])
    if skipped:
        parts.append("Not measured: " + "; ".join(skipped) + ".")
    return "\n\n".join(parts)


def update_gpu_check(text: str, readme: Path = README) -> None:
    """Put one device's gpu_check summary between the README's GPU-check markers: it replaces the
    earlier summary of the same device and is appended after those of other devices."""
    content = readme.read_text()
    if GPU_START not in content or GPU_END not in content:
        raise ValueError(f"{readme} lacks the markers {GPU_START} and {GPU_END}")
    head, rest = content.split(GPU_START, 1)
    body, tail = rest.split(GPU_END, 1)
    blocks = [b for b in ("\n" + body).split("\n" + GPU_HEADER)[1:]]
    name = text.splitlines()[0][len(GPU_HEADER):]
    kept = [GPU_HEADER + b.strip() for b in blocks if b.splitlines()[0] != name]
    readme.write_text(f"{head}{GPU_START}\n" + "\n\n".join(kept + [text.strip()]) + f"\n{GPU_END}{tail}")


def update_readme(results: Path, readme: Path = README) -> None:
    text = readme.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{readme} lacks the markers {START} and {END} around its results section")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{report(results)}\n{END}{tail}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--update", action="store_true", help=f"rewrite the tables in {README.name}")
    parser.add_argument("--gpu-check", default=None, help="the folder of a gpu_check.sh run: its summary")
    args = parser.parse_args(argv)
    if args.gpu_check:
        text = gpu_check_report(Path(args.gpu_check))
        if args.update:
            update_gpu_check(text)
        print(text)
    elif args.update:
        update_readme(Path(args.results))
    else:
        print(report(Path(args.results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
