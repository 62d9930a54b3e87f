"""The command line explains itself: --help, --print_config, --check; overriding reward_funcs drops
weights meant for other functions; a finished output_dir is not silently replaced; user data's held-out
split is announced; data without an answer column gets no accuracy figure; summary.json is strict JSON;
benchmarks' --quick never writes over the committed results."""
import argparse
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from grpo_scale.config import ConfigError, GRPOConfig, help_text, load_config, print_config

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--eval_size", "4", "--eval_batch_size", "4", "--max_completion_length", "8", "--report_to", "none",
        "--per_device_train_batch_size", "8", "--num_generations", "4", "--cpu_threads", "1"]


def train(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**__import__("os").environ, "OMP_NUM_THREADS": "1",
                                                "CUDA_VISIBLE_DEVICES": ""})


def test_help_lists_every_field_with_type_value_and_help():
    proc = train("-h", "--max_steps", "7", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == train("--max_steps", "7", "--help", timeout=120).stdout
    out = proc.stdout
    assert out.startswith("usage: python train.py") and "configs/tiny-math.yaml" in out
    for f in dataclasses.fields(GRPOConfig):
        assert f"  --{f.name} " in out, f.name
        assert f.metadata["help"][:40] in out, f.name
    assert "--max_steps INT\n      7 (from command line)" in out
    assert "--learning_rate FLOAT\n      0.0001 (from configs/tiny-math.yaml)" in out
    assert "--dataset_path STR_OR_NULL\n      None." in out


def test_print_config_gives_each_value_its_source():
    text = print_config(["--reward_funcs", "format", "--seed", "3"])
    lines = dict(line.split(":", 1) for line in text.splitlines() if not line.startswith("#"))
    assert lines["seed"].strip() == "3  # command line"
    assert lines["learning_rate"].strip() == "0.0001  # configs/tiny-math.yaml"
    assert lines["beta"].strip().endswith("# configs/tiny-math.yaml")
    assert lines["trust_remote_code"].strip() == "false  # default"
    assert lines["reward_weights"].strip() == "null  # default"
    assert "# note: reward_weights [1.0, 0.2] of tiny-math.yaml" in text
    proc = train("--print_config", "--max_steps", "3", timeout=120)
    assert proc.returncode == 0 and "max_steps: 3  # command line" in proc.stdout


def test_overriding_reward_funcs_drops_the_files_weights():
    """configs/tiny-math.yaml weighs [correctness, format] as [1.0, 0.2]: a user's own reward list must not
    inherit 0.2 for its second function."""
    assert load_config([]).reward_weights == [1.0, 0.2]
    cfg = load_config(["--reward_funcs", "correctness,my_rewards:length"])
    assert cfg.reward_weights is None and "reward_weights" in cfg.notes[0]
    assert load_config(["--reward_funcs", "format,correctness", "--reward_weights", "0.5,1"]).reward_weights == [0.5, 1.0]


def test_a_finished_output_dir_is_refused_unless_overwritten_or_resumed(tmp_path):
    out = tmp_path / "run"
    (out / "final").mkdir(parents=True)
    (out / "summary.json").write_text("{}")
    with pytest.raises(ConfigError, match="already holds a finished run .*--overwrite_output_dir true"):
        GRPOConfig(output_dir=str(out)).check_paths()
    GRPOConfig(output_dir=str(out), overwrite_output_dir=True).check_paths()
    GRPOConfig(output_dir=str(out), resume_from_checkpoint="latest").check_paths()
    proc = train("--output_dir", str(out), "--max_steps", "1", timeout=120)
    assert proc.returncode == 2 and "already holds a finished run" in proc.stderr


def test_check_validates_without_loading_a_model(tmp_path, capsys):
    """train.py --check (run in this process: train.main), one launch through python for the exit status."""
    sys.path.insert(0, str(ROOT))
    import train as train_py
    proc = train("--check", "--num_processes", "2", "--output_dir", str(tmp_path / "x"), timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1].startswith("ok:"), proc.stderr[-2000:]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "answer": "1"}\n{"prompt": 3}\n')
    out = ["--output_dir", str(tmp_path / "y")]
    for argv, message in ((["--dataset_path", str(bad)], "line 2"),
                          (["--num_processes", "3", *FAST, "--per_device_train_batch_size", "6"],
                           "not divisible by num_generations"),
                          (["--reward_funcs", "no_such_module:fn"], "no_such_module")):
        assert train_py.main(["--check", *argv, *out]) == 2
        assert message in capsys.readouterr().err, argv


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_user_data_without_answers_gets_no_accuracy_and_a_strict_summary(tmp_path, caplog):
    """The held-out split is announced with its size; with no answer column accuracy is null (not 0.000),
    said once; summary.json has no NaN anywhere (strict JSON)."""
    from grpo_scale.trainer import GRPOTrainer
    data = write_rows(tmp_path / "d.jsonl", [{"prompt": f"Solve {i}+{i}"} for i in range(20)])
    cfg = load_config(FAST + ["--dataset_path", str(data), "--reward_funcs", "format", "--max_steps", "1",
                              "--eval_size", "6", "--output_dir", str(tmp_path / "out")])
    trainer = GRPOTrainer(cfg)
    with caplog.at_level("WARNING"):
        trainer.setup()
        summary = trainer.train()
    assert "6 of the 20 rows" in caplog.text and "held out" in caplog.text
    assert caplog.text.count("no 'answer' column") == 1
    assert summary["eval_accuracy_before"] is None and summary["eval_accuracy_after"] is None
    summary["final_reward_mean"] = float("nan")  # what a run whose rewards all failed reports
    trainer.save(summary)
    text = (tmp_path / "out" / "summary.json").read_text()
    parsed = json.loads(text, parse_constant=lambda c: pytest.fail(f"summary.json holds {c}"))
    assert parsed["final_reward_mean"] is None and parsed["eval_accuracy_after"] is None


def test_rows_without_a_readable_answer_are_left_out_of_the_accuracy(tmp_path):
    """Unreadable expected answers are missing, not wrong: they do not count against the model."""
    from grpo_scale.trainer import GRPOTrainer
    cfg = load_config(FAST + ["--eval_size", "6", "--output_dir", str(tmp_path)])
    trainer = GRPOTrainer(cfg)
    trainer.setup()
    full = trainer.evaluate()["accuracy"]
    trainer.eval_rows = trainer.eval_rows + [{"prompt": "Solve 1+1", "answer": "not a number ((("}] * 6
    assert trainer.evaluate()["accuracy"] == pytest.approx(full)
    assert math.isfinite(full)


def test_benchmarks_quick_writes_to_a_temporary_folder():
    sys.path.insert(0, str(ROOT))
    from benchmarks import run
    quick = run.results_dir(argparse.Namespace(out=None, quick=True))
    assert Path(quick).is_dir() and not Path(quick).resolve().is_relative_to(ROOT)
    assert run.results_dir(argparse.Namespace(out=None, quick=False)) == str(ROOT / "benchmarks" / "results")
    assert run.results_dir(argparse.Namespace(out="x", quick=True)) == "x"


def test_help_text_survives_a_bad_command_line():
    assert "usage:" in help_text(["--no_such_field", "1"])
