"""Checkpoints that outlive the launch: the portable state (``grpo_scale.portable``), resuming on another
number of processes or ZeRO stage, and nodes with or without a shared file system.

The chain test continues one run through five launches, two of them two "nodes" on this machine through
multinode.yaml (one process each): two nodes with a folder each (checkpoint-2); one process with twice the
gradient accumulation, from node 0's copy (checkpoint-4); two nodes with a folder each again, node 1 given
a copy of that checkpoint (checkpoint-6: node 1's copy lacks the files only rank 0 writes, so the portable
state is loaded); two nodes sharing one folder, the two copies put together (checkpoint-8, through
Accelerate's files); 2 ZeRO-3 ranks (to step 10). After each load into another shape,
``tests/portable_probe.py`` gathers the weights and AdamW's moments as they stand in the new launch and
compares them with what the writing launch gathered before it saved. Then ``python -m grpo_scale.export``
turns checkpoints of each kind of launch into plain model folders.
"""
from __future__ import annotations

import json
import shutil
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


def probed(record: Path, procs) -> dict:
    """The probe's record, after checking that the launch ran to its end."""
    procs = procs if isinstance(procs, list) else [procs]
    text = "".join(p.stdout + p.stderr for p in procs)
    assert all(p.returncode == 0 for p in procs), text[-5000:]
    return json.loads(record.read_text())


def check_load(got: dict, what: str, steps: int, ranks: int, zero_stage: int, saved_shape: list) -> None:
    """What the probe found after the load: the state the writing launch gathered, exactly."""
    assert got["saved_shape"] == saved_shape and got["num_processes"] == ranks, (what, got)
    assert got["zero_stage"] == zero_stage, (what, got)
    assert got["step"] == steps - 2 and got["adam_step"] == got["saved_adam_step"] == steps - 2, (what, got)
    assert got["names"] > 10 and got["diffs"].keys() == {"weights", "exp_avg", "exp_avg_sq"}, (what, got)
    assert max(got["diffs"].values()) <= 1e-7, (what, got["diffs"])
    assert got["lr"] == pytest.approx(got["saved_lr"], rel=1e-12), (what, got)
    assert got["lr"] == pytest.approx(1e-3 * (steps - 1) / 13, rel=1e-12), (what, got)  # warm-up, step+1


def test_one_run_through_nodes_with_own_and_shared_folders_one_process_and_zero3(tmp_path):
    own = [tmp_path / "own0", tmp_path / "own1"]  # two nodes without a shared file system
    probe = lambda name: [str(tmp_path / f"{name}.json")]  # noqa: E731
    latest = ["--resume_from_checkpoint", "latest"]

    # two nodes, a folder each, train and checkpoint: each node publishes its own complete copy
    procs = run_nodes([args(own[0], 2), args(own[1], 2)])
    assert all(p.returncode == 0 for p in procs), "".join(p.stdout + p.stderr for p in procs)[-5000:]
    for folder in own:
        assert (folder / "checkpoint-2" / "trainer_state.json").is_file() and portable.has(folder / "checkpoint-2")
    assert not (own[1] / "checkpoint-2" / "pytorch_model" / "mp_rank_00_model_states.pt").exists()  # rank 0's

    # one process, twice the accumulation, from node 0's copy (2 ZeRO-2 ranks -> one process)
    got = probed(tmp_path / "one.json", run(probe("one") + args(own[0], 4, accumulation=2) + latest, script=PROBE))
    check_load(got, "one process, from 2 ZeRO-2 ranks", 4, 1, 0, [2, 2])

    # node 1 gets a copy of that checkpoint; two nodes resume from their own folders (one process -> 2
    # ZeRO-2 ranks; node 1 lacks the files only rank 0 writes) and checkpoint again, each its own copy
    shutil.copytree(own[0] / "checkpoint-4", own[1] / "checkpoint-4")
    got = probed(tmp_path / "nodes.json", run_nodes([probe("nodes") + args(own[0], 6) + latest,
                                                     probe("unused") + args(own[1], 6) + latest], script=PROBE))
    check_load(got, "two nodes with a folder each, from one process", 6, 2, 2, [1, 0])
    for folder in own:
        assert (folder / "checkpoint-6" / "trainer_state.json").is_file() and portable.has(folder / "checkpoint-6")

    # the two copies together are what a shared folder holds: two nodes resume from it (Accelerate's files)
    shared = tmp_path / "shared"
    for folder in own:
        shutil.copytree(folder / "checkpoint-6", shared / "checkpoint-6", dirs_exist_ok=True)
    procs = run_nodes([args(shared, 8) + latest] * 2)
    text = "".join(p.stdout + p.stderr for p in procs)
    assert all(p.returncode == 0 for p in procs), text[-5000:]
    assert "resumed from" in text and "portable state" not in text, text[-3000:]

    # 2 ZeRO-3 ranks from the shared folder's ZeRO-2 checkpoint
    got = probed(tmp_path / "zero3.json", run(probe("zero3") + args(shared, 10) + latest, ranks=2, launch="zero3",
                                               script=PROBE))
    check_load(got, "2 ZeRO-3 ranks, from 2 ZeRO-2 ranks", 10, 2, 3, [2, 2])

    summary = json.loads((shared / "summary.json").read_text())
    assert summary["steps"] == 10
    state = json.loads((shared / "checkpoint-10" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["history"]] == list(range(1, 11))
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in state["history"])
    check_exports({2: own[1], 4: own[0], 10: shared}, tmp_path / "exported")


def check_exports(where: dict, to: Path) -> None:
    """``python -m grpo_scale.export`` of checkpoints of a 2-node (node 1's copy), a one-process and a ZeRO-3
    launch: plain transformers loads each, with the checkpoint's weights (the ZeRO-3 one's equal final/)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo_scale import export
    for step, out in where.items():
        ckpt = out / f"checkpoint-{step}"
        assert export.main([str(ckpt), str(to / str(step))]) == 0
        model = AutoModelForCausalLM.from_pretrained(to / str(step))
        saved = portable.read(ckpt, "weights")
        params = dict(model.named_parameters())
        assert saved.keys() <= params.keys()
        for name, value in saved.items():
            assert torch.equal(params[name].detach(), value), (step, name)
        assert AutoTokenizer.from_pretrained(to / str(step))("Solve 2+3")["input_ids"]
    last = max(where)
    final = AutoModelForCausalLM.from_pretrained(where[last] / "final")
    exported = AutoModelForCausalLM.from_pretrained(to / str(last))
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


def test_a_lora_checkpoint_resumes_from_its_portable_state_and_exports_merged(tmp_path):
    """One process, LoRA: a checkpoint whose Accelerate files are gone (as on a node without rank 0's) is
    loaded from portable/, which holds the adapter's weights and moments and not the frozen base; the run
    continues from step 2 to 4. The export of the checkpoint is the base with the adapter merged: the first
    run's final/."""
    from accelerate.state import AcceleratorState
    from transformers import AutoModelForCausalLM

    from grpo_scale import export
    from grpo_scale.config import load_config
    from grpo_scale.trainer import GRPOTrainer
    out = tmp_path / "run"
    lora = ["--use_peft", "true", "--beta", "0.04", "--eval_size", "0"]
    first = GRPOTrainer(load_config(args(out, 2) + lora))
    first.save(first.train())
    ckpt = out / "checkpoint-2"
    weights = portable.read(ckpt, "weights")
    assert weights and all("lora_" in name for name in weights), sorted(weights)[:4]
    (ckpt / "model.safetensors").unlink()
    (ckpt / "optimizer.bin").unlink()

    AcceleratorState._reset_state()
    second = GRPOTrainer(load_config(args(out, 4) + lora + ["--resume_from_checkpoint", "latest"]))
    second.setup()
    assert second.step == 2
    tensors, _, step = portable.gather(second.acc.unwrap_model(second.model), second.optimizer)
    assert step == 2
    for key, now in tensors.items():
        then = portable.read(ckpt, key)
        assert then.keys() == now.keys() and all(torch.equal(now[n], then[n]) for n in now), key
    assert second.train()["steps"] == 4

    assert export.main([str(ckpt), str(tmp_path / "exported")]) == 0
    final = AutoModelForCausalLM.from_pretrained(out / "final")  # the first run's, merged at step 2
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    for (name, a), b in zip(final.state_dict().items(), exported.state_dict().values()):
        assert torch.equal(a, b), name
