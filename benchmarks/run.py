"""Benchmarks of grpo-scale: GRPO loss kernels and end-to-end GRPO steps, one CSV row per measured point.

    python benchmarks/run.py --quick                 # CPU smoke run, a few minutes
    python benchmarks/run.py --suite kernel          # kernel suite only (CUDA when available)
    python benchmarks/run.py --suite e2e --no-trl    # our trainer only
    python benchmarks/run.py --suite e2e --memory-only --model_name_or_path DIR   # beta > 0: full vs LoRA
    python benchmarks/plot.py                        # PNGs from the CSVs (run.py also calls it)
    python benchmarks/report.py                      # the README's tables from the CSVs

Writes benchmarks/results/<device>-kernel.csv, <device>-traffic.csv and <device>-e2e.csv, where
<device> is `cpu` or the GPU's name (e.g. `cuda-nvidia-h100-80gb-hbm3`); --memory-only writes
<device>-e2e-memory-<model folder name>.csv. Without a GPU the Triton
providers run under Triton's interpreter (set here before any kernel is imported): they are checked
and their memory traffic is counted, but not timed. On a GPU the traffic is counted in a child process
under the interpreter, since a process decides once whether its kernels are interpreted.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` and `grpo_scale` importable
    sys.path.insert(0, str(ROOT))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--suite", choices=("kernel", "e2e", "all"), default="all")
    parser.add_argument("--quick", action="store_true", help="the small preset (CPU smoke run: minutes)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    parser.add_argument("--out", default=None, help="where the CSVs go (default: benchmarks/results; with --quick "
                        "a new temporary folder, so a smoke run never replaces the committed results)")
    parser.add_argument("--model_name_or_path", default=None,
                        help="e2e model directory (default: the embedded model on CPU, a random model with "
                             "Qwen2.5-0.5B's shapes on a GPU)")
    parser.add_argument("--config", default=None,
                        help="e2e: the config file both sides read (default configs/tiny-math.yaml), and its model "
                             "unless --model_name_or_path")
    parser.add_argument("--threads", type=int, default=1,
                        help="e2e on the CPU: torch threads of each side (the sides are stepped in turn, never at once)")
    parser.add_argument("--sides", default=None, help="e2e: comma-separated speed sides (default "
                        "ours,ours-unshared,trl; trl only when installed)")
    parser.add_argument("--steps", type=int, default=None,
                        help="e2e: measured steps per side (default 20 on a CPU, 8 on a GPU, 3 with --quick)")
    parser.add_argument("--no-memory", dest="memory", action="store_false",
                        help="e2e: skip the memory comparison (full fine-tuning vs LoRA)")
    parser.add_argument("--no-trl", dest="trl", action="store_false", help="skip TRL's side of the e2e suite")
    parser.add_argument("--memory-only", action="store_true",
                        help="e2e: only the memory comparison (a step with beta > 0, full fine-tuning vs LoRA)")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="do not call plot.py")
    parser.add_argument("--traffic-only", action="store_true", help=argparse.SUPPRESS)  # the CUDA run's child
    parser.add_argument("--prefix", default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="e2e config overrides after --, e.g. -- --loss_impl fused_linear")
    return parser.parse_args(argv)


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible here; use --device cpu")
    return name


def device_prefix(device: str) -> str:
    """'cpu', or 'cuda-' and the GPU's name in lower case with dashes."""
    if not device.startswith("cuda"):
        return "cpu"
    import torch

    return "cuda-" + re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def traffic_in_child(args, prefix: str) -> None:
    """Counts traffic under the interpreter in a CPU-only child process (the GPU run's kernels are not
    interpreted); the child writes <prefix>-traffic.csv."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--suite", "kernel", "--device", "cpu",
           "--traffic-only", "--prefix", prefix, "--out", args.out, "--no-plots"] + (["--quick"] if args.quick else [])
    subprocess.run(cmd, check=True, env=env)


def results_dir(args: argparse.Namespace) -> str:
    """--out; else benchmarks/results, or a new temporary folder for --quick (a smoke run never replaces
    the committed results)."""
    if args.out is not None:
        return args.out
    if args.quick:
        out = tempfile.mkdtemp(prefix="grpo-bench-quick-")
        print(f"--quick without --out: results go to {out}")
        return out
    return str(ROOT / "benchmarks" / "results")


def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if not device.startswith("cuda"):
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
    import torch

    from benchmarks import e2e_suite, kernel_suite
    from benchmarks.records import environment, write_csv

    if not device.startswith("cuda"):
        torch.set_num_threads(1)  # 2 shared cores: one thread, the same for every measurement
    preset = "quick" if args.quick else "full"
    prefix = args.prefix or device_prefix(device)
    args.out = results_dir(args)
    out = Path(args.out)
    written = []
    started = time.perf_counter()
    if args.suite in ("kernel", "all"):
        print(f"kernel suite on {device} ({preset})")
        rows = kernel_suite.run_suite(device, args.quick, only_traffic=args.traffic_only)
        env = environment(device, preset)
        traffic = [r for r in rows if r.metric.startswith("traffic")]
        if traffic:
            written.append(write_csv(out / f"{prefix}-traffic.csv", traffic, env))
        if not args.traffic_only:
            kernel = [r for r in rows if not r.metric.startswith("traffic")]
            written.append(write_csv(out / f"{prefix}-kernel.csv", kernel, env))
            if device.startswith("cuda"):
                traffic_in_child(args, prefix)
                written.append(out / f"{prefix}-traffic.csv")
    if args.suite in ("e2e", "all") and not args.traffic_only:
        print(f"e2e suite on {device} ({preset})")
        model = args.model_name_or_path or (e2e_suite.config_model(args.config) if args.config else None)
        model_name = e2e_suite.model_label(model)
        name = f"{prefix}-e2e"  # the embedded model's (or on a GPU the random Qwen shapes')
        if args.memory_only:
            name = f"{prefix}-e2e-memory-{model_name}"
        elif model is not None:
            name = f"{prefix}-e2e-{model_name}"
        records = None if args.memory_only else out / f"{name}-steps.json"
        out.mkdir(parents=True, exist_ok=True)
        rows = e2e_suite.run_suite(device, args.quick, model=args.model_name_or_path, with_trl=args.trl,
                                   overrides=args.overrides, with_speed=not args.memory_only, config=args.config,
                                   threads=args.threads, with_memory=args.memory or args.memory_only,
                                   sides=args.sides.split(",") if args.sides else None, records_out=records,
                                   steps=args.steps)
        name += ".csv"
        written.append(write_csv(out / name, rows, environment(device, preset)))
        if records is not None:  # the floors of each phase and the bounds they set (Amdahl), appended
            from benchmarks import floors
            write_csv(out / name, rows + floors.floor_rows(records, args.threads), environment(device, preset))
            print(f"wrote {records}")
    for path in written:
        print(f"wrote {path}")
    failed = _failures(written)
    if args.plots and not args.traffic_only:
        from benchmarks import plot

        try:
            for path in plot.plot_all(out, prefix):
                print(f"wrote {path}")
        except ImportError as e:  # matplotlib comes with the dev extra; the CSVs stand without it
            print(f"no plots ({e}); pip install matplotlib, then python benchmarks/plot.py")
    print(f"done in {time.perf_counter() - started:.0f} s")
    if failed:
        print("providers that failed their correctness check:\n  " + "\n  ".join(failed))
    return 0


def _failures(paths) -> list[str]:
    """'provider shape: status' of every failing row (reported, not fatal: the run measured the rest)."""
    from benchmarks.records import read_csv

    out = []
    for path in paths:
        out += [f"{r['provider']} {r['shape']} {r['level']}: {r['status'][:160]}"
                for r in read_csv(path) if r["status"].startswith("fail")]
    return out


if __name__ == "__main__":
    sys.exit(main())
