"""PNGs from the benchmark CSVs in benchmarks/results (matplotlib, from the dev extra).

    python benchmarks/plot.py [--results DIR] [--prefix cpu]

For every device prefix found (or the one given) it draws, from the rows whose status is ok:
<prefix>-kernel-time.png (fwd+bwd time per provider), <prefix>-kernel-memory.png (peak memory in U),
<prefix>-traffic.png (modelled HBM and issued bytes in U), <prefix>-e2e-phases.png (median step time
by phase, per side) and <prefix>-e2e-reward.png (reward of each measured step, per side). A plot whose
rows are absent is not drawn.
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

PHASE_ORDER = ("generation", "reward", "logps", "policy", "optimizer", "other")


def _ok(rows, **match):
    return [r for r in rows if r["status"] == "ok" and r["median"] != ""
            and all(r[k] == v for k, v in match.items())]


def _grouped_bars(ax, groups: dict, ylabel: str, log: bool = False):
    """groups: {x label: {provider: (median, q20, q80)}} -> bars per provider, error bars q20..q80."""
    providers = list(dict.fromkeys(p for g in groups.values() for p in g))
    width = 0.8 / max(len(providers), 1)
    for i, provider in enumerate(providers):
        xs, ys, lo, hi = [], [], [], []
        for j, values in enumerate(groups.values()):
            if provider in values:
                m, q20, q80 = values[provider]
                xs.append(j + i * width)
                ys.append(m)
                lo.append(max(m - q20, 0))
                hi.append(max(q80 - m, 0))
        bars = ax.bar(xs, ys, width, yerr=[lo, hi], label=provider, capsize=2)
        ax.bar_label(bars, fmt="%.3g", fontsize=6, padding=2)
    ax.set_xticks([j + width * (len(providers) - 1) / 2 for j in range(len(groups))])
    ax.set_xticklabels(list(groups), rotation=20, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    if log:
        from matplotlib.ticker import FormatStrFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter(""))
    ax.legend(fontsize=7)


def _values(r):
    return float(r["median"]), float(r["q20"]), float(r["q80"])


def _figure(rows, title, panels):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (name, draw) in zip(axes[0], panels.items()):
        draw(ax)
        ax.set_title(name, fontsize=9)
    device = rows[0]["device"] if rows else ""
    fig.suptitle(f"{title}\n{device}", fontsize=9)
    fig.tight_layout()
    return fig


def _by_panel(rows, key, label, value=_values):
    """{panel: {x label: {provider: values}}} with panel = key(row), x = label(row)."""
    panels: dict = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        panels[key(r)][label(r)][r["provider"]] = value(r)
    return panels


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def plot_kernel(results: Path, prefix: str) -> list[Path]:
    path = results / f"{prefix}-kernel.csv"
    if not path.is_file():
        return []
    rows = read_csv(path)
    out = []
    panel_of = lambda r: f"{r['benchmark']} {r['level']} {r['dtype']}"  # noqa: E731
    for metric, unit, title, log in (("time", "ms", "GRPO loss, forward + backward time (median, q20-q80)", True),
                                     ("peak_memory", "U", "GRPO loss, forward + backward peak memory", False)):
        chosen = _ok(rows, metric=metric, unit=unit, mode="fwd+bwd")
        if not chosen:
            continue
        panels = _by_panel(chosen, panel_of, lambda r: r["shape"])
        fig = _figure(chosen, title, {name: (lambda ax, g=g: _grouped_bars(ax, g, f"{metric} ({unit})", log))
                                      for name, g in panels.items()})
        out.append(_save(fig, results / f"{prefix}-kernel-{'time' if metric == 'time' else 'memory'}.png"))
    return out


def plot_traffic(results: Path, prefix: str) -> list[Path]:
    path = results / f"{prefix}-traffic.csv"
    if not path.is_file():
        return []
    rows = _ok(read_csv(path), mode="fwd+bwd")
    panels = {}
    for metric in ("traffic_hbm_logits", "traffic_issued"):
        chosen = [r for r in rows if r["metric"] == metric]
        for level, groups in _by_panel(chosen, lambda r: r["level"], lambda r: f"{r['benchmark']} {r['shape']}").items():
            panels[f"{metric} ({level})"] = groups
    if not panels:
        return []
    fig = _figure(rows, "Memory traffic per forward + backward, in U (Triton interpreter count)",
                  {name: (lambda ax, g=g: _grouped_bars(ax, g, "U")) for name, g in panels.items()})
    return [_save(fig, results / f"{prefix}-traffic.png")]


def plot_e2e(results: Path, prefix: str) -> list[Path]:
    path = results / f"{prefix}-e2e.csv"
    if not path.is_file():
        return []
    rows = read_csv(path)
    out = []
    phases = _ok(rows, metric="time")
    sides = list(dict.fromkeys(r["provider"] for r in phases))
    if phases:
        def stacked(ax):
            bottom = [0.0] * len(sides)
            for phase in PHASE_ORDER:
                heights = [next((float(r["median"]) for r in phases if r["provider"] == s and r["mode"] == phase), 0.0)
                           for s in sides]
                ax.bar(sides, heights, bottom=bottom, label=phase)
                bottom = [b + h for b, h in zip(bottom, heights)]
            ax.set_ylabel("median time per step (s)")
            ax.legend(fontsize=7)
        out.append(_save(_figure(phases, f"GRPO step by phase: {phases[0]['shape']}", {"phases": stacked}),
                         results / f"{prefix}-e2e-phases.png"))
    rewards = _ok(rows, metric="reward_mean")
    if rewards:
        def curves(ax):
            for side in dict.fromkeys(r["provider"] for r in rewards):
                points = sorted((int(r["step"]), float(r["median"])) for r in rewards if r["provider"] == side)
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=side)
            ax.set_xlabel("measured step")
            ax.set_ylabel("mean reward")
            ax.legend(fontsize=7)
        out.append(_save(_figure(rewards, "Reward per measured step", {"reward": curves}),
                         results / f"{prefix}-e2e-reward.png"))
    return out


def plot_all(results: str | Path, prefix: str | None = None) -> list[Path]:
    """Every plot for `prefix` (default: every prefix with a CSV in `results`); the paths written."""
    results = Path(results)
    prefixes = [prefix] if prefix else sorted({p.name.rsplit("-", 1)[0] for p in results.glob("*.csv")})
    out = []
    for name in prefixes:
        out += plot_kernel(results, name) + plot_traffic(results, name) + plot_e2e(results, name)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--prefix", default=None, help="device prefix, e.g. cpu (default: all found)")
    args = parser.parse_args(argv)
    for path in plot_all(args.results, args.prefix):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
