"""One tidy CSV row per measured point, with the machine, versions and revision it was measured on.

Every suite returns a list of `Row`s; `write_csv` stamps them with the environment (`environment()`)
and writes them. A point that could not be measured is still a row: `status` says why
(`fail: ...` for a provider that gave wrong results, `skipped: ...`, `not_measured: ...`), and its
numbers are empty, never made up.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import importlib.metadata
import os
import platform
import statistics
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"

# The column order of every CSV written here; tests check it.
COLUMNS = (
    "benchmark", "provider", "shape", "dtype", "level", "mode", "step", "metric", "unit",
    "median", "q20", "q80", "n", "status", "note",
    "device", "versions", "git_rev", "timestamp", "preset",
)
PACKAGES = ("torch", "triton", "transformers", "accelerate", "trl", "liger-kernel", "grpo-scale")


@dataclasses.dataclass
class Row:
    """One measurement. `median`, `q20`, `q80` are the 50th, 20th and 80th percentiles over `n` runs
    (all three equal for a deterministic count); None where nothing was measured."""

    benchmark: str
    provider: str
    shape: str
    metric: str
    unit: str
    median: float | None = None
    q20: float | None = None
    q80: float | None = None
    n: int = 0
    status: str = "ok"
    note: str = ""
    dtype: str = ""
    level: str = ""
    mode: str = ""
    step: int | str = ""


def summarize(values: list[float]) -> dict:
    """{'median', 'q20', 'q80', 'n'} of a list of samples (linear interpolation between order statistics)."""
    if not values:
        raise ValueError("summarize needs at least one sample")
    if len(values) == 1:
        return {"median": values[0], "q20": values[0], "q80": values[0], "n": 1}
    q = statistics.quantiles(values, n=10, method="inclusive")  # deciles: q[1] = 20 %, q[7] = 80 %
    return {"median": statistics.median(values), "q20": q[1], "q80": q[7], "n": len(values)}


def measured(values: list[float], **fields) -> Row:
    """A Row holding the summary of `values`."""
    return Row(**fields, **summarize(values))


def exact(value: float, **fields) -> Row:
    """A Row for a deterministic figure (a count, a ratio): median = q20 = q80 = value, n = 1."""
    return Row(**fields, median=value, q20=value, q80=value, n=1)


# ------------------------------------------------------------------------------------------------
# The environment a row was measured in.
# ------------------------------------------------------------------------------------------------
def device_name(device: str) -> str:
    """The accelerator's name on CUDA; the CPU model and the torch thread count otherwise."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s)"


def package_versions() -> str:
    """'name=version' for the packages that decide the numbers; 'absent' for those not installed."""
    out = []
    for name in PACKAGES:
        try:
            out.append(f"{name}={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{name}=absent")
    if torch.cuda.is_available():
        out.append(f"cuda={torch.version.cuda}")
    return ";".join(out)


def git_revision() -> str:
    """Short commit of the checkout, with '-dirty' when tracked files differ from it."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=10"], cwd=ROOT,
                              capture_output=True, text=True, timeout=30).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: str, preset: str) -> dict:
    """The columns shared by every row of one run."""
    return {
        "device": device_name(device),
        "versions": package_versions(),
        "git_rev": git_revision(),
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "preset": preset,
    }


def _cell(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def write_csv(path: str | os.PathLike, rows: list[Row], env: dict) -> Path:
    """Writes `rows`, each stamped with `env`, to `path` (overwritten) in the order of COLUMNS."""
    missing = set(COLUMNS) - {f.name for f in dataclasses.fields(Row)} - set(env)
    if missing:
        raise ValueError(f"env lacks the columns {sorted(missing)}; build it with environment()")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            record = {**dataclasses.asdict(row), **env}
            writer.writerow({k: _cell(record[k]) for k in COLUMNS})
    return path


def read_csv(path: str | os.PathLike) -> list[dict]:
    """The rows of a CSV written by `write_csv`, as dicts of strings."""
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))
