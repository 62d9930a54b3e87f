"""Checkpoints that outlive the launch: the portable state (``grpo_scale.portable``), resuming on another
number of processes or ZeRO stage, and on nodes without a shared file system.

The chain test resumes one run through five launches: two nodes through multinode.yaml with one output
folder each (checkpoint-2, then resumed by both to checkpoint-4: node 1's copy lacks the files only rank 0
writes, so the portable state is loaded), then from node 0's folder one process with twice the gradient
accumulation (checkpoint-6), 2 ZeRO-2 ranks (checkpoint-8), 2 ZeRO-3 ranks (to step 10). After each of
the last three loads, ``tests/portable_probe.py`` gathers the weights and AdamW's moments as they stand in
the new launch and compares them with what the writing launch gathered before it saved. Then
``python -m grpo_scale.export`` turns the checkpoints of each kind of launch into plain model folders.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reliability_helpers import FAST, TESTS, run, run_nodes, tiny_model_path  # noqa: E402

from grpo_scale import portable  # noqa: E402
from grpo_scale.checkpoint import check_compatible  # noqa: E402
from grpo_scale.config import ConfigError  # noqa: E402

PROBE = TESTS / "portable_probe.py"


def args(out: Path, steps: int, per_device: int = 4, accumulation: int = 1) -> list[str]:
    return [*FAST, "--model_name_or_path", tiny_model_path(), "--output_dir", str(out), "--max_steps", str(steps),
            "--save_steps", "2", "--per_device_train_batch_size", str(per_device), "--gradient_accumulation_steps",
            str(accumulation), "--beta", "0.04", "--report_to", "none",
            # a learning rate that changes at every step and does not depend on max_steps
            "--lr_scheduler_type", "constant", "--warmup_steps", "12"]


def test_one_run_through_two_nodes_one_process_zero2_and_zero3(tmp_path):
    own = [tmp_path / "own0", tmp_path / "own1"]  # two nodes without a shared file system
    for steps, resume in ((2, []), (4, ["--resume_from_checkpoint", "latest"])):
        procs = run_nodes([args(own[0], steps) + resume, args(own[1], steps) + resume])
        text = "".join(p.stdout + p.stderr for p in procs)
        assert all(p.returncode == 0 for p in procs), text[-5000:]
        for folder in own:  # each node published its own complete copy, with the whole portable state
            ckpt = folder / f"checkpoint-{steps}"
            assert (ckpt / "trainer_state.json").is_file() and portable.has(ckpt), (steps, folder)
        assert not (own[1] / f"checkpoint-{steps}" / "pytorch_model" / "mp_rank_00_model_states.pt").exists()
    assert "resumed from the portable state" in text, text[-3000:]  # node 1 lacks rank 0's files

    out = own[0]
    stages = [("one process, from 2 ZeRO-2 ranks", 1, "zero2", 6, 2, [2, 2]),
              ("2 ZeRO-2 ranks, from one process", 2, "zero2", 8, 1, [1, 0]),
              ("2 ZeRO-3 ranks, from 2 ZeRO-2 ranks", 2, "zero3", 10, 1, [2, 2])]
    for what, ranks, launch, steps, accumulation, saved_shape in stages:
        record = tmp_path / f"step{steps}.json"
        proc = run([str(record), *args(out, steps, accumulation=accumulation), "--resume_from_checkpoint", "latest"],
                   ranks=ranks, launch=launch, script=PROBE)
        assert proc.returncode == 0, f"{what}\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}"
        got = json.loads(record.read_text())
        assert got["saved_shape"] == saved_shape and got["num_processes"] == ranks, (what, got)
        assert got["zero_stage"] == {1: 0}.get(ranks, 3 if launch == "zero3" else 2), (what, got)
        assert got["step"] == steps - 2 and got["adam_step"] == got["saved_adam_step"] == steps - 2, (what, got)
        assert got["names"] > 10 and got["diffs"].keys() == {"weights", "exp_avg", "exp_avg_sq"}, (what, got)
        assert max(got["diffs"].values()) <= 1e-7, (what, got["diffs"])
        assert got["lr"] == pytest.approx(got["saved_lr"], rel=1e-12), (what, got)
        assert got["lr"] == pytest.approx(1e-3 * (steps - 1) / 13, rel=1e-12), (what, got)  # warm-up, step+1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 10
    state = json.loads((out / "checkpoint-10" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["history"]] == list(range(1, 11))
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in state["history"])
    check_exports(out, tmp_path / "exported")


def check_exports(out: Path, to: Path) -> None:
    """``python -m grpo_scale.export`` of the checkpoints of a 2-node, a one-process and a ZeRO-3 launch:
    plain transformers loads each, with the checkpoint's weights (the ZeRO-3 one's equal final/)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo_scale import export
    for step in (4, 6, 10):
        ckpt = out / f"checkpoint-{step}"
        assert export.main([str(ckpt), str(to / str(step))]) == 0
        model = AutoModelForCausalLM.from_pretrained(to / str(step))
        saved = portable.read(ckpt, "weights")
        params = dict(model.named_parameters())
        assert saved.keys() <= params.keys()
        for name, value in saved.items():
            assert torch.equal(params[name].detach(), value), (step, name)
        assert AutoTokenizer.from_pretrained(to / str(step))("Solve 2+3")["input_ids"]
    final = AutoModelForCausalLM.from_pretrained(out / "final")
    exported = AutoModelForCausalLM.from_pretrained(to / "10")
    for (name, a), b in zip(final.state_dict().items(), exported.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_changed_global_batch_is_refused_with_the_values_that_keep_it(tmp_path):
    state = {"num_processes": 2, "zero_stage": 2, "seed": 7,
             "config": {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1}}
    keep = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2}
    assert check_compatible(state, tmp_path, num_processes=1, zero_stage=0, seed=7, batch=keep) is False
    assert check_compatible(state, tmp_path, num_processes=2, zero_stage=2, seed=7,
                            batch={"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1}) is True
    with pytest.raises(ConfigError, match=r"trained 8 completions per step .* would train 4.*"
                                          r"--gradient_accumulation_steps 2 or --per_device_train_batch_size 8"):
        check_compatible(state, tmp_path, num_processes=1, zero_stage=0, seed=7,
                         batch={"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1})
    with pytest.raises(ConfigError, match="seed 7 .* vs 8"):
        check_compatible(state, tmp_path, num_processes=2, zero_stage=2, seed=8, batch=keep)


def test_gather_and_load_continue_adamw_exactly(tmp_path):
    """One process, plain torch: a model and AdamW after two steps, written and loaded into a fresh model
    and optimiser, take the third step to the same weights as the original."""
    torch.manual_seed(0)

    def make():
        model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
        model[2].bias.requires_grad_(False)  # a frozen parameter is not part of the state
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def step(model, opt, x):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()

    xs = [torch.randn(4, 5) for _ in range(3)]
    model, opt = make()
    for x in xs[:2]:
        step(model, opt, x)
    tensors, shapes, adam_step = portable.gather(model, opt)
    assert adam_step == 2 and set(shapes) == {"0.weight", "0.bias", "2.weight"}
    portable.write(tmp_path, tensors, {"adam_step": adam_step, "shapes": shapes})
    fresh, fresh_opt = make()
    fresh[2].bias.data.copy_(model[2].bias)  # frozen: loaded from the model, not from the checkpoint
    assert portable.check_names(tmp_path, fresh) is None
    assert portable.load(tmp_path, fresh, fresh_opt) == 2
    step(model, opt, xs[2])
    step(fresh, fresh_opt, xs[2])
    for a, b in zip(model.parameters(), fresh.parameters()):
        if a.requires_grad:
            assert torch.equal(a, b)
    other = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    assert "of another shape" in portable.check_names(tmp_path, other)
