"""benchmarks/gpu_check.sh --dry-run end to end (every stage on the CPU at tiny shapes, Triton under its
interpreter), each stage's output checked; the README update of a GPU run; the wheel list to carry."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import carry, gpu_check, report  # noqa: E402
from benchmarks.records import read_csv  # noqa: E402


# The dry run (about 1.5 minutes on 2 cores) runs with `pytest -m slow tests/test_gpu_check.py`, and must pass
# before a GPU is used: run it (or `bash benchmarks/gpu_check.sh --dry-run`) ahead of a GPU session.
slow_dry_run = pytest.mark.slow


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    return out, proc


@slow_dry_run
def test_every_stage_passes_within_its_cap(dry_run):
    out, proc = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stages = read_csv(out / "stages.csv")
    assert [s["stage"] for s in stages] == ["tests", "kernels", "e2e", "summary"]
    assert all(s["status"] == "ok" and int(s["seconds"]) <= int(s["cap_s"]) for s in stages), stages
    # peers that are not installed are said loudly, not silently left out
    assert "!!! flash-attention" in proc.stdout
    if not gpu_check.importlib_util_find("liger_kernel"):
        assert "!!! Liger-Kernel is not installed" in proc.stdout


@slow_dry_run
def test_tests_stage_counts_the_kernel_tests(dry_run):
    out, _ = dry_run
    rows = {r["metric"]: r for r in read_csv(out / "tests.csv")}
    assert float(rows["passed"]["median"]) >= 2 and float(rows["failed"]["median"]) == 0
    assert rows["passed"]["status"] == "ok" and rows["passed"]["preset"] == "gpu-check-dry-run"


@slow_dry_run
def test_kernels_stage_checks_every_loss_type_and_provider(dry_run):
    out, _ = dry_run
    rows = read_csv(out / "kernel.csv")
    checks = {(r["benchmark"], r["shape"], r["level"], r["provider"]): r["status"]
              for r in rows if r["metric"] == "check_error"}
    assert checks and all(s == "ok" for s in checks.values()), checks
    for loss_type in gpu_check.LOSS_TYPES:
        suffix = "" if loss_type == "dapo" else f" {loss_type}"
        for level in ("token", "sequence") if loss_type == "dapo" else ("token",):  # the dry run's points
            for provider in ("eager", "triton", "triton_inplace"):
                assert ("grpo_loss-logits", f"B2-T8-V1031{suffix}", level, provider) in checks
    for provider in ("eager", "triton", "fused_linear"):
        assert ("grpo_loss-linear", "B2-T8-H64-V1031", "token", provider) in checks
    assert any(r["metric"] == "peak_memory" and r["unit"] == "U" and r["provider"] == "triton" for r in rows)
    assert any(r["provider"] == "compile" and r["status"].startswith("skipped") for r in rows)


@slow_dry_run
def test_e2e_stage_steps_full_and_lora(dry_run):
    out, _ = dry_run
    rows = read_csv(out / "e2e.csv")
    for side in ("full-sdpa", "lora-sdpa"):
        (rate,) = [r for r in rows if r["provider"] == side and r["metric"] == "steps_per_s"]
        assert rate["status"] == "ok" and float(rate["median"]) > 0
        assert [r for r in rows if r["provider"] == side and r["metric"] == "peak_memory"]
    assert any(r["provider"] == "flash" and r["status"].startswith("skipped") for r in rows)


@slow_dry_run
def test_summary_names_the_device_and_holds_every_table(dry_run):
    out, _ = dry_run
    text = (out / "summary.md").read_text()
    assert text.startswith("### GPU check on cpu: ") and "dry run" in text
    for part in ("Stages:", "**Kernel tests**", "**GRPO loss kernels**", "**End-to-end GRPO steps**",
                 "Not measured:", "lora-sdpa"):
        assert part in text, part


def test_a_gpu_summary_replaces_its_own_block_in_the_readme(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.GPU_START}\nnot run yet\n{report.GPU_END}\nend\n")
    h100 = f"{report.GPU_HEADER}NVIDIA H100\n\nfirst"
    report.update_gpu_check(h100, readme)
    report.update_gpu_check(f"{report.GPU_HEADER}NVIDIA H200\n\nother", readme)
    report.update_gpu_check(f"{report.GPU_HEADER}NVIDIA H100\n\nsecond", readme)
    text = readme.read_text()
    assert "not run yet" not in text and "first" not in text
    assert text.index("NVIDIA H200") < text.index("second") and text.endswith(f"{report.GPU_END}\nend\n")


def test_carry_lists_the_closure_without_torch_and_builds_deepspeed():
    pins = carry.closure()
    assert "deepspeed" in pins and "transformers" in pins and "hjson" in pins and "pydantic" in pins
    assert not any(n in pins for n in ("torch", "triton")) and not any(n.startswith("nvidia") for n in pins)
    text = carry.commands(pins, {})
    assert f"pip wheel --no-deps -w wheels deepspeed=={pins['deepspeed']}" in text
    assert f"transformers=={pins['transformers']}" in text and "--no-index" in text


def test_without_a_gpu_the_real_run_refuses_clearly():
    if shutil.which("nvidia-smi"):
        pytest.skip("a GPU machine")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin",
                                                       "PYTHON": sys.executable})
    assert proc.returncode == 2 and "no CUDA device visible; use --dry-run" in proc.stderr
