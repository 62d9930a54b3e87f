"""The benchmark harness: CSV schema on the smallest kernel point, the correctness gate, e2e rows, plots.

Runs under Triton's interpreter on CPU (tests/conftest.py sets it before any kernel is imported).
"""
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import e2e_suite, kernel_suite, records  # noqa: E402
from benchmarks.providers import Provider, default_providers, eager_loss  # noqa: E402

if torch.cuda.is_available():
    pytest.skip("these tests pin the CPU (interpreter) path; GPU runs use benchmarks/run.py", allow_module_level=True)

SMALLEST = kernel_suite.Point("logits", 1, 4, 67, level="token", memory=True, traffic=True)


def by(rows, **match):
    return [r for r in rows if all(getattr(r, k) == v for k, v in match.items())]


def quiet(_):
    pass


@pytest.fixture(scope="module")
def smallest_rows():
    providers = [p for p in default_providers("logits") if p.name in ("eager", "triton")]
    return kernel_suite.run_point(SMALLEST, providers, "cpu", log=quiet)


def test_smallest_point_writes_the_csv_schema(smallest_rows, tmp_path):
    path = records.write_csv(tmp_path / "cpu-kernel.csv", smallest_rows, records.environment("cpu", "test"))
    lines = path.read_text().splitlines()
    assert lines[0].split(",") == list(records.COLUMNS)
    rows = records.read_csv(path)
    assert len(rows) == len(smallest_rows) > 0
    for row in rows:
        assert row["benchmark"] == "grpo_loss-logits" and row["shape"] == "B1-T4-V67"
        assert row["device"].startswith("cpu") and "torch=" in row["versions"] and row["git_rev"]
        assert row["timestamp"] and row["preset"] == "test"
        if row["status"] == "ok":  # every measured value has its quantiles around it
            assert float(row["q20"]) <= float(row["median"]) <= float(row["q80"])


def test_eager_is_timed_in_every_mode_and_triton_is_counted(smallest_rows):
    for mode in kernel_suite.MODES:
        (t,) = by(smallest_rows, provider="eager", metric="time", mode=mode)
        assert t.status == "ok" and t.median > 0 and t.n >= 3
    (mem,) = by(smallest_rows, provider="eager", metric="peak_memory", unit="U")
    assert mem.median >= 1.0  # eager keeps at least the log-softmax: one U
    # Triton runs interpreted here: checked and traffic-counted, never timed.
    (check,) = by(smallest_rows, provider="triton", metric="check_error")
    assert check.status == "ok" and check.median <= 1.0
    (t,) = by(smallest_rows, provider="triton", metric="time")
    assert t.status.startswith("not_measured") and t.median is None
    (hbm,) = by(smallest_rows, provider="triton", metric="traffic_hbm_logits", mode="fwd+bwd")
    assert hbm.median == pytest.approx(2.0)  # the design's token level: read once, write the gradient once


def test_a_wrong_provider_is_reported_failing_and_not_timed():
    wrong = Provider("wrong", "logits", lambda leaves, case: 1.5 * eager_loss(leaves, case))

    def raises(leaves, case):
        raise RuntimeError("no kernel for this shape")

    broken = Provider("broken", "logits", raises)
    eager = Provider("eager", "logits", eager_loss)
    point = kernel_suite.Point("logits", 1, 4, 67, modes=("fwd",))
    rows = kernel_suite.run_point(point, [wrong, broken, eager], "cpu", log=quiet)
    for name, reason in (("wrong", "loss"), ("broken", "RuntimeError")):
        mine = by(rows, provider=name)
        assert [r.metric for r in mine] == ["check_error"], "a failing provider must not be measured"
        assert mine[0].status.startswith("fail") and reason in mine[0].status
    assert by(rows, provider="eager", metric="time")[0].status == "ok"


def test_rel_err_treats_nan_and_missing_gradients_as_failures():
    gold = torch.ones(3)
    assert kernel_suite.rel_err(torch.tensor([1.0, float("nan"), 1.0]), gold) == math.inf
    assert kernel_suite.rel_err(None, gold) == math.inf
    assert kernel_suite.rel_err(gold * 1.01, gold) == pytest.approx(0.01)


def test_summarize_quantiles():
    s = records.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s["median"], s["n"]) == (3.0, 5)
    assert s["q20"] == pytest.approx(1.8) and s["q80"] == pytest.approx(4.2)
    with pytest.raises(ValueError):
        records.summarize([])


def fake_steps(step_s, n=4):
    phases = {"generation": 0.4 * step_s, "reward": 0.01, "logps": 0.0, "policy": 0.5 * step_s,
              "optimizer": 0.02, "other": 0.1 * step_s - 0.03}
    return [{"step_s": step_s, "phases": phases, "tokens": 1000, "completion_length": 20.0, "reward": 0.1 * i,
             "peak_memory": 2**30} for i in range(n)]


def test_e2e_rows_of_one_side():
    base = dict(benchmark="e2e", shape="tiny", dtype="fp32", level="token")
    rows = e2e_suite._rows_of_side("ours", fake_steps(2.0), base, "rss")
    (rate,) = by(rows, metric="steps_per_s")
    assert rate.median == pytest.approx(0.5)
    phases = [r for r in rows if r.metric == "time" and r.mode in e2e_suite.PHASES]
    assert sum(r.median for r in phases) == pytest.approx(2.0)  # the phases add up to the step
    curve = by(rows, metric="reward_mean")
    assert [r.step for r in curve] == [1, 2, 3, 4] and curve[-1].median == pytest.approx(0.3)


def test_plots_are_drawn_from_the_csv(smallest_rows, tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks import plot

    env = records.environment("cpu", "test")
    records.write_csv(tmp_path / "cpu-kernel.csv", [r for r in smallest_rows if not r.metric.startswith("traffic")], env)
    records.write_csv(tmp_path / "cpu-traffic.csv", [r for r in smallest_rows if r.metric.startswith("traffic")], env)
    written = plot.plot_all(tmp_path, "cpu")
    assert {p.name for p in written} == {"cpu-kernel-time.png", "cpu-kernel-memory.png", "cpu-traffic.png"}
    assert all(p.stat().st_size > 1000 for p in written)


@pytest.mark.slow  # the GPU check's dry run (tests/test_gpu_check.py, -m slow) runs the e2e stage too
def test_e2e_suite_steps_our_sides_on_a_random_qwen2(tmp_path):
    """The e2e harness end to end on CPU (worker processes, line protocol, rows): our two sides on a
    randomly initialised model built by the GPU path's builder, shrunk to run in seconds."""
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(e2e_suite.EMBEDDED))
    model = e2e_suite.build_random_model(tmp_path / "qwen2-small", e2e_suite.EMBEDDED, hidden_size=32,
                                         intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, vocab_size=vocab)
    rows = e2e_suite.run_suite("cpu", quick=True, model=str(model), with_trl=False, log=quiet, with_memory=False,
                               overrides=["--max_completion_length", "6", "--per_device_train_batch_size", "8",
                                          "--num_generations", "4"], records_out=tmp_path / "steps.json")
    for side in ("ours", "ours-unshared"):
        (rate,) = by(rows, provider=side, metric="steps_per_s")
        assert rate.status == "ok" and rate.median > 0 and rate.n == 3
        assert len(by(rows, provider=side, metric="reward_mean")) == 3
        (length,) = by(rows, provider=side, metric="completion_length")
        assert 1 <= length.median <= 6
    assert rows[0].shape.startswith("qwen2-small: 2 prompts x 4 completions")
    assert not by(rows, provider="ours/trl")
    from benchmarks import floors
    floor = floors.floor_rows(tmp_path / "steps.json", threads=1)
    (step,) = by(floor, provider="floor", mode="step", metric="time")
    assert step.status == "ok" and step.n == 3 and step.median > 0
    assert len(by(floor, provider="ours", metric="bound_speedup_at_floor")) == 5
    (real,), (padded,) = by(floor, mode="tokens_real"), by(floor, mode="tokens_padded")
    assert 0 < real.median <= padded.median
    # the memory comparison's workers run in the GPU check's dry run (tests/test_gpu_check.py, -m slow);
    # their rows are checked by hand below


def test_floors_of_one_step_by_hand():
    """A one-layer model (40 linear weights, a tied 10 x 2 embedding), one group of 2 completions of 3 and 1
    tokens after a 4-token prompt, 1 GFLOP/s and 1 GB/s."""
    from types import SimpleNamespace

    from benchmarks import floors
    config = SimpleNamespace(hidden_size=2, num_attention_heads=1, intermediate_size=4, num_hidden_layers=1,
                             head_dim=2, num_key_value_heads=1, vocab_size=10, tie_word_embeddings=True)
    s = floors.shapes(config)
    assert (s["linear"], s["head"], s["weights"]) == (80, 40, 60)
    shape = {"completion_lengths": [3, 1], "prompt_lengths": [4, 4], "prompt_runs": [2]}
    f, tokens = floors.step_floors(shape, s, {"flops_per_s": 1e9, "bytes_per_s": 1e9}, {"beta": 0.04})
    # a forward: (4 prompt + 2 completion inputs) x 80 + 4 predicted tokens x 40 = 640 FLOPs
    assert f["logps"] == pytest.approx(640e-9) and f["policy"] == pytest.approx(3 * 640e-9)
    # prefill 3 x 80; three decoding steps, each bound by reading 60 weights of 4 bytes (240 ns)
    assert f["generation"] == pytest.approx(240e-9 + 3 * 240e-9)
    assert f["optimizer"] == pytest.approx(7 * 4 * 60e-9)
    assert tokens == {"real": 8, "padded": 14, "prompt_copies": 4}


def test_memory_rows_of_full_and_lora(monkeypatch):
    """The memory comparison's rows (peak memory and time per side, the LoRA : full ratio) from the
    workers' step records, given here by hand."""
    settings = {"per_device_train_batch_size": 8, "num_generations": 4, "max_completion_length": 6,
                "importance_sampling_level": "token", "bf16": False}
    canned = {"ours-full-beta": {"steps": [{"peak_memory": 400 * 2**20, "step_s": 2.0}], "done": {"settings": settings}},
              "ours-lora-beta": {"steps": [{"peak_memory": 300 * 2**20, "step_s": 1.5}], "done": {"settings": settings}}}
    monkeypatch.setattr(e2e_suite, "run_sides", lambda sides, *a, **k: {side: canned[side] for side in sides})
    rows = e2e_suite.memory_rows("cpu", True, "m", "qwen2-small", "process resident set size", [], log=quiet)
    peaks = {side: by(rows, provider=side, metric="peak_memory") for side in e2e_suite.MEMORY_SIDES}
    assert all(len(p) == 1 and p[0].median > 0 and p[0].n == 1 for p in peaks.values())
    assert "LoRA" in peaks["ours-lora-beta"][0].note and "full" in peaks["ours-full-beta"][0].note
    (ratio,) = by(rows, provider="lora/full", metric="peak_memory_ratio")
    assert ratio.median == pytest.approx(peaks["ours-lora-beta"][0].median / peaks["ours-full-beta"][0].median)
    assert peaks["ours-full-beta"][0].median == 400 and ratio.median == 0.75
