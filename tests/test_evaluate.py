"""`python -m grpo_scale.evaluate` against the trainer's own held-out figures, and the evaluation's parts."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from grpo_scale.evaluate import Tally, format_table, score

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from reliability_helpers import FAST, ROOT, run, tiny_model_path  # noqa: E402


def evaluate_cli(*args):
    """``python -m grpo_scale.evaluate ARGS``, run in this process (an interpreter start per call would
    cost more than the evaluation): (exit status, stdout, stderr)."""
    import contextlib
    import io
    import os

    from grpo_scale.evaluate import main
    out, err, cwd = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([*args, "--no-progress"])
    finally:
        os.chdir(cwd)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    proc = run(FAST + ["--model_name_or_path", tiny_model_path(), "--output_dir", str(out), "--max_steps", "2",
                       "--eval_size", "16", "--eval_batch_size", "5", "--max_completion_length", "32",
                       "--task_level", "1,2", "--task_mix", "arithmetic=0.5,polynomial=0.5", "--report_to", "none"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "summary.json").read_text())


def test_the_command_reproduces_a_runs_after_figures_exactly(trained, tmp_path):
    """One process, the run's settings read from its summary.json: every figure equal, per family and level."""
    out, summary = trained
    proc = evaluate_cli("--model", str(out / "final"), "--n", "16", "--output", str(tmp_path / "e.json"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    written = json.loads((tmp_path / "e.json").read_text())
    assert written["metrics"] == summary["eval_after"]
    assert {"accuracy/arithmetic/level1", "accuracy_lenient/polynomial/level2", "format_rate/arithmetic"} <= \
        set(written["metrics"])
    assert len(written["answers"]) == 16 and all(a["completions"] for a in written["answers"])
    assert "| all | " in proc.stdout and "| arithmetic/level1 | " in proc.stdout
    assert f"{summary['eval_after']['accuracy']:.3f}" in proc.stdout


def test_samples_and_pass_at_k(trained, tmp_path):
    out, summary = trained
    proc = evaluate_cli("--model", str(out / "final"), "--n", "6", "--num_samples", "3", "--output",
                        str(tmp_path / "e.json"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "e.json").read_text())["metrics"]
    assert metrics["n"] == 6 and metrics["accuracy"] <= metrics["pass@3"] <= 1.0
    answers = json.loads((tmp_path / "e.json").read_text())["answers"]
    assert all(len(a["completions"]) == 3 for a in answers)


def test_a_config_file_and_overrides_choose_the_tasks(trained, tmp_path):
    out, _ = trained
    proc = evaluate_cli("--model", str(out / "final"), "--config", "configs/tiny-math.yaml", "--n", "4",
                        "--task_level", "3", "--eval_batch_size", "4", "--output", str(tmp_path / "e.json"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "e.json").read_text())["metrics"]
    assert "accuracy/arithmetic/level3" in metrics and metrics["n"] == 4


@pytest.mark.parametrize("args,message", [
    (["--model", "no/such/folder/at/all"], "model_name_or_path: no/such/folder/at/all is not a directory"),
    (["--model", "embedded:nope"], "unknown embedded model"),
    (["--model", "embedded:tiny-math", "--n", "0"], "--n must be at least 1"),
    (["--model", "embedded:tiny-math", "--num_samples", "0"], "--num_samples must be at least 1"),
    (["--model", "embedded:tiny-math", "--task_levle", "2"], "task_levle"),
])
def test_bad_input_is_one_clear_line(args, message):
    proc = evaluate_cli(*args)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_scores_and_tally_by_hand():
    prompt = [{"role": "user", "content": "Solve 10+5"}, {"role": "assistant", "content": "<think>"}]
    assert score(prompt, "a</think><answer>15</answer>", "15") == {"strict": 1.0, "lenient": 1.0, "format": 1.0}
    assert score(prompt, "a</think> 10+5 = 15", "15") == {"strict": 0.0, "lenient": 1.0, "format": 0.0}
    assert score(prompt, "x", "not math") is None
    rows = [{"task": "arithmetic", "level": 1}, {"task": "arithmetic", "level": 2}, {"task": "polynomial", "level": 1}]
    tally = Tally(rows)
    tally.add(rows[0], [{"strict": 1.0, "lenient": 1.0, "format": 1.0}], [10])
    tally.add(rows[1], [{"strict": 0.0, "lenient": 1.0, "format": 0.0}, {"strict": 1.0, "lenient": 1.0,
                                                                         "format": 1.0}], [4, 6])
    result = tally.result(num_samples=2)
    assert result["n"] == 2 and result["accuracy"] == 0.75 and result["accuracy_lenient"] == 1.0
    assert result["accuracy/arithmetic/level2"] == 0.5 and result["pass@2/arithmetic/level2"] == 1.0
    assert result["completion_length"] == 7.5
    assert "accuracy/polynomial" not in result  # no scorable row: left out, not 0
    assert "| arithmetic/level2 | 0.500 | 1.000 | 0.500 | 1.000 |" in format_table(result)
    assert Tally(rows).result()["accuracy"] is None


def test_the_inference_example_answers_as_the_evaluation_did(trained, tmp_path, capsys):
    """examples/inference.py (plain transformers, the run's own prompt settings from summary.json) gives
    the greedy answer the evaluation recorded for the same question."""
    import runpy
    out, _ = trained
    assert evaluate_cli("--model", str(out / "final"), "--n", "3", "--output", str(tmp_path / "e.json")).returncode == 0
    answers = json.loads((tmp_path / "e.json").read_text())["answers"]
    capsys.readouterr()
    argv = sys.argv
    for a in answers:
        sys.argv = ["examples/inference.py", str(out), a["question"]]
        try:
            runpy.run_path(str(ROOT / "examples" / "inference.py"), run_name="__main__")
        finally:
            sys.argv = argv
        assert capsys.readouterr().out.strip() == a["completions"][0].strip()


def test_reports_by_hand(tmp_path):
    """samples.md: the same questions side by side, cells escaped onto one line; rewards.png: drawn from
    the logged history and the held-out evaluations."""

    from grpo_scale.config import GRPOConfig
    from grpo_scale.report import samples_markdown, write_rewards_png
    cfg = GRPOConfig(assistant_prefix="<think>", output_dir=str(tmp_path))
    s1 = {"strict": 1.0, "lenient": 1.0, "format": 1.0}
    s0 = {"strict": 0.0, "lenient": 1.0, "format": 1.0}
    before = [{"question": "Solve 2+8", "answer": "10", "completions": ["2+8 = 10 | ten\nso</think><answer>10 </answer>"],
               "scores": [s0]}, {"question": "only before", "answer": "1", "completions": ["x"], "scores": [s0]}]
    after = [{"question": "Solve 2+8", "answer": "10", "completions": ["2+8 = 10</think><answer>10</answer>"],
              "scores": [s1]}]
    summary = {"steps": 3, "wall_seconds": 12.0, "eval_before": {"accuracy": 0.25, "accuracy_lenient": 0.5,
                                                                  "format_rate": 1.0}, "eval_after": {"accuracy": 0.5}}
    text = samples_markdown(before, after, summary, cfg)
    row = [line for line in text.splitlines() if line.startswith("| `Solve 2+8`")]
    assert row == ["| `Solve 2+8` | `10` | `<think>2+8 = 10 \\| ten\\nso</think><answer>10 </answer>`<br>*right number, "
                   "wrong form* | `<think>2+8 = 10</think><answer>10</answer>`<br>*correct* |"]
    assert "only before" not in text and "| strict accuracy | 0.250 | 0.500 |" in text
    assert "| format rate | 1.000 | n/a |" in text
    history = [{"step": s, "reward/correctness": 0.1 * s, "reward/format": 1.0, "reward/mean": 0.2 * s} for s in (1, 2, 3)]
    evals = [{"step": 0, "accuracy": 0.25, "accuracy_lenient": 0.5, "format_rate": 1.0, "n": 4},
             {"step": 3, "accuracy": 0.5, "accuracy_lenient": 0.5, "format_rate": 1.0, "n": 4}]
    write_rewards_png(tmp_path / "rewards.png", history, evals, ["correctness", "format"], cfg)
    assert (tmp_path / "rewards.png").read_bytes()[:4] == b"\x89PNG"
