"""The stages of benchmarks/gpu_check.sh, one per call, each writing its CSV as soon as it has rows.

    python benchmarks/gpu_check.py --stage tests|kernels|e2e|summary --out DIR [--dry-run]

Stages (on one GPU; with --dry-run on the CPU at tiny shapes, Triton under its interpreter):
- tests: the kernel tests (the fast grid of tests/test_grpo_loss.py, test_fused_linear_grpo_loss.py and
  test_reference_loss.py) on the device, interrupted past a budget -> tests.csv (passed, failed,
  skipped, seconds);
- kernels: the GRPO loss at N = 16384 tokens (16 x 1024), V = 151936 (Qwen2.5), bf16, token and sequence
  level (``kernel_points``): dapo in full (triton, triton_inplace, eager, torch.compile, liger when
  installed on the logits; eager, triton, fused_linear, compile from the hidden states, H = 896), every
  other loss type on the logits, forward + backward. Time (do_bench quantiles), peak memory, achieved
  bandwidth against the measured copy bandwidth and the 2U floor -> kernel.csv, rewritten after every
  point;
- e2e: GRPO steps on a randomly initialised model with Qwen2.5-0.5B's shapes, bf16, beta 0.04, the
  prompt shared: full fine-tuning and LoRA, with sdpa and (when installed) flash-attention ->
  e2e.csv (steps/s, tokens/s, phases, peak memory);
- summary: summary.md, the tables of all of the above with the device's name (benchmarks/report.py).
A peer that is not installed (Liger, flash-attn) gets a `skipped: ...` row and a loud line in the output.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LOSS_TYPES = ("dapo", "grpo", "bnpo", "dr_grpo", "luspo", "cispo", "sapo", "vespo")  # dapo first: the default,
# and the one compiled; the last four are timed at token level only and without Liger (whose kernel has
# the first four)
NEW_LOSS_TYPES = ("luspo", "cispo", "sapo", "vespo")
# the fused kernel's own tests first: on a cold GPU machine Triton compiles every specialisation once
KERNEL_TESTS = ["tests/test_grpo_loss.py", "tests/test_fused_linear_grpo_loss.py", "tests/test_reference_loss.py",
                "tests/test_losses.py"]  # the last: every loss type and extra against TRL 1.16 on the device
# --dry-run: a few of the same tests, so the stage's plumbing is exercised in seconds
DRY_KERNEL_TESTS = ["tests/test_grpo_loss.py::test_empty_batch",
                    "tests/test_reference_loss.py::test_output_fields_and_types"]


def device_of(dry_run: bool) -> str:
    import torch
    if dry_run:
        return "cpu"
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device is visible; run with --dry-run to check the script on CPU")
    return "cuda"


def importlib_util_find(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


def loud(message: str) -> None:
    print(f"\n!!! {message}\n", flush=True)


# ------------------------------------------------------------------------------------------------ tests
def stage_tests(out: Path, dry_run: bool, budget_s: float = 100) -> int:
    """pytest on the kernel tests; past ``budget_s`` it is interrupted (SIGINT: pytest still writes its
    report), and the row says how many ran: a partial count, not a lost one."""
    import signal

    from benchmarks.records import Row, environment, write_csv
    xml = out / "kernel-tests.xml"
    files = DRY_KERNEL_TESTS if dry_run else KERNEL_TESTS
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *files]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, text=True)
    interrupted = False
    try:
        proc.wait(timeout=budget_s)
    except subprocess.TimeoutExpired:
        interrupted = True
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    seconds = time.perf_counter() - started
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if xml.is_file():
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in counts}
    failed = counts["failures"] + counts["errors"]
    passed = counts["tests"] - failed - counts["skipped"]
    if failed or passed == 0 or (proc.returncode != 0 and not interrupted):
        status = f"fail: pytest exit {proc.returncode}, {failed} failed, {passed} passed"
    elif interrupted:
        status = f"ok: partial, interrupted after the {budget_s:.0f} s budget"
    else:
        status = "ok"
    rows = [Row(benchmark="kernel-tests", provider="pytest", shape=" ".join(files), metric=metric, unit=unit,
                median=value, q20=value, q80=value, n=1, status=status)
            for metric, unit, value in (("passed", "tests", passed), ("failed", "tests", failed),
                                        ("skipped", "tests", counts["skipped"]), ("time", "s", seconds))]
    write_csv(out / "tests.csv", rows, environment(device_of(dry_run), "gpu-check-dry-run" if dry_run else "gpu-check"))
    return 0 if status.startswith("ok") else 1


# ------------------------------------------------------------------------------------------------ kernels
def kernel_points(dry_run: bool):
    """(point, providers to drop), in the order measured, so that a stage cut short by its cap has
    measured what matters most: dapo (the default) in full, logits and linear families, token and
    sequence level, every mode, torch.compile at token level; then each other loss type on the logits,
    forward + backward only (grpo, bnpo and dr_grpo differ from dapo by their aggregation only; luspo,
    cispo and sapo by their in-kernel surrogate, at token level; vespo takes the two-launch path; a
    compile each would cost minutes)."""
    from benchmarks.kernel_suite import Point
    B, T, V, H, dtype = (2, 8, 1031, 64, "bf16") if dry_run else (16, 1024, 151936, 896, "bf16")
    out = []
    for level in ("token", "sequence"):
        drop = set() if level == "token" and not dry_run else {"compile"}
        out.append((Point("logits", B, T, V, dtype=dtype, level=level, memory=True), drop))
        out.append((Point("linear", B, T, V, H=H, dtype=dtype, level=level, memory=True), drop))
    for loss_type in LOSS_TYPES[1:]:
        new = loss_type in NEW_LOSS_TYPES
        for level in ("token",) if dry_run or new else ("token", "sequence"):  # the dry run: one level suffices
            out.append((Point("logits", B, T, V, dtype=dtype, level=level, memory=True, modes=("fwd+bwd",),
                              loss_type=loss_type, time=not dry_run), {"compile", "liger"} if new else {"compile"}))
    return out


def stage_kernels(out: Path, dry_run: bool) -> int:
    if dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    import torch

    from benchmarks import kernel_suite
    from benchmarks.providers import default_providers, liger_available
    from benchmarks.records import Row, environment, write_csv
    from benchmarks.timing import copy_bandwidth_gbps
    device = device_of(dry_run)
    env = environment(device, "gpu-check-dry-run" if dry_run else "gpu-check")
    rows: list[Row] = []
    copy_bw = None
    if device == "cuda":
        copy_bw = copy_bandwidth_gbps(device)
        rows.append(Row(benchmark="copy", provider="torch copy_", shape="1 GiB bf16", metric="bandwidth",
                        unit="GB/s", note="2 x bytes / time (read + write)", **copy_bw))
    else:
        torch.set_num_threads(1)
    if not liger_available():
        loud("Liger-Kernel is not installed: its rows say skipped (pip install --no-deps liger-kernel)")
        rows.append(Row(benchmark="grpo_loss-logits", provider="liger", shape="", metric="time", unit="ms",
                        status="skipped: liger-kernel not installed"))
    if dry_run:
        rows.append(Row(benchmark="grpo_loss-logits", provider="compile", shape="", metric="time", unit="ms",
                        status="skipped: --dry-run (compiling costs minutes on a CPU)"))
    failed = 0
    for point, drop in kernel_points(dry_run):
        providers = [p for p in default_providers(point.family) if p.name not in drop]
        point_rows = kernel_suite.run_point(point, providers, device, copy_bw)
        failed += sum(r.metric == "check_error" and r.status.startswith("fail") for r in point_rows)
        rows += point_rows
        write_csv(out / "kernel.csv", rows, env)  # a stage stopped by its cap keeps every finished point
    return 1 if failed else 0


# ------------------------------------------------------------------------------------------------ e2e
def e2e_sides(flash: bool) -> dict:
    """Config overrides of each side: full fine-tuning and LoRA, sdpa and (when installed) flash."""
    sides = {}
    for attn in ("sdpa", "flash_attention_2") if flash else ("sdpa",):
        short = "flash" if attn.startswith("flash") else attn
        sides[f"full-{short}"] = ["--attn_implementation", attn]
        sides[f"lora-{short}"] = ["--attn_implementation", attn, "--use_peft", "true"]
    return sides


def stage_e2e(out: Path, dry_run: bool) -> int:
    from benchmarks import e2e_suite
    from benchmarks.records import Row, environment, write_csv
    device = device_of(dry_run)
    flash = importlib_util_find("flash_attn") and not dry_run
    rows = []
    if not flash:
        why = "--dry-run (CPU)" if dry_run else "flash-attn not installed"
        loud(f"flash-attention: {why}; the e2e stage measures sdpa only")
        rows.append(Row(benchmark="e2e", provider="flash", shape="", metric="steps_per_s", unit="1/s",
                        status=f"skipped: {why}"))
    folder = tempfile.mkdtemp(prefix="gpu-check-model-")
    try:
        if dry_run:  # tiny, so that the stage runs in seconds on a CPU
            from transformers import AutoTokenizer
            vocab = len(AutoTokenizer.from_pretrained(e2e_suite.EMBEDDED))
            model = e2e_suite.build_random_model(folder, e2e_suite.EMBEDDED, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                 vocab_size=vocab)
            name = "qwen2-tiny-random"
            overrides = ["--max_completion_length", "6", "--per_device_train_batch_size", "8", "--num_generations", "4"]
            warmup, steps = 1, 1
        else:
            model = e2e_suite.build_random_model(folder, e2e_suite.EMBEDDED)
            name = "qwen2.5-0.5b-random"
            overrides = ["--loss_impl", "auto", "--max_completion_length", "256"]
            warmup, steps = 1, 2
        overrides = ["--top_k", "50", "--beta", "0.04", "--share_prompt", "true", *overrides]
        sides = e2e_sides(flash)
        results = e2e_suite.run_sides(list(sides), str(model), device, warmup, steps, overrides, side_overrides=sides)
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # the random model's weights
    settings = results[next(iter(sides))]["done"]["settings"]
    base = e2e_suite._base(name, settings)
    note = "max_memory_allocated" if device == "cuda" else "process resident set size"
    for side, r in results.items():
        rows += e2e_suite._rows_of_side(side, r["steps"], dict(base, note="beta 0.04, share_prompt"), note)
    write_csv(out / "e2e.csv", rows, environment(device, "gpu-check-dry-run" if dry_run else "gpu-check"))
    return 0


# ------------------------------------------------------------------------------------------------ summary
def stage_summary(out: Path, dry_run: bool, update_readme: bool) -> int:
    from benchmarks import report
    text = report.gpu_check_report(out)
    (out / "summary.md").write_text(text + "\n")
    print(text)
    if update_readme and not dry_run:
        report.update_gpu_check(text)
        print(f"updated {report.README}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", required=True, choices=("tests", "kernels", "e2e", "summary"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--dry-run", action="store_true", help="on the CPU at tiny shapes (Triton interpreted)")
    parser.add_argument("--no-readme", dest="readme", action="store_false",
                        help="summary: do not update benchmarks/README.md")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.stage == "tests":
        return stage_tests(out, args.dry_run)
    if args.stage == "kernels":
        return stage_kernels(out, args.dry_run)
    if args.stage == "e2e":
        return stage_e2e(out, args.dry_run)
    return stage_summary(out, args.dry_run, args.readme)


if __name__ == "__main__":
    sys.exit(main())
