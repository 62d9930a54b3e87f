"""Launched by tests/test_matrix.py (under `accelerate launch`, or as one plain process): runs several
combination cells one after the other in the same processes, so start-up is paid once per launch.

    matrix_probe.py OUT_DIR CELLS_JSON

CELLS_JSON is a list of {"name": ..., "args": [train.py arguments]}. Each cell is a real run through
GRPOTrainer's setup, train (with evaluation before and after) and save. Per cell and rank it writes
OUT_DIR/NAME/rank{i}.pt: what the rank saw (its index and the world size), the logged history, the last
rollout's tensors, the reference log-probs the trainer computed for it (``ref_logps``, None when beta is
0) and the policy's log-probs of the same rollout after training, computed by the trainer's own path;
and the parameter bytes each rank holds of the reference; for LoRA cells, the adapter's state and the
drift of the frozen base (``lora_state``). The test compares these with an independent
forward of the initial weights. Each rank also records the collectives its decoding loops called (none
may be), and under ZeRO-3 rank 1 decodes half as many tokens as rank 0 (``watched_decoding``).
"""
import contextlib
import json
import os
import sys
import time
import zlib
from pathlib import Path

import torch

from grpo_scale import last_layer, rollout
from grpo_scale.config import load_config
from grpo_scale.rewards import completion_text
from grpo_scale.trainer import GRPOTrainer, param_bytes


def text_checksum(prompts, completions, **columns) -> list[float]:
    """A reward in [0, 1) that differs between distinct completions (a checksum of the text), so every
    group has a reward spread and every cell's weights move, whatever the model writes in a few tokens."""
    return [zlib.crc32(completion_text(c).encode()) / 2**32 for c in completions]


def half_flat_checksum(prompts, completions, **columns) -> list[float]:
    """text_checksum for half of the prompts (by the question's checksum), 0.5 for every completion of the
    others: about half of the groups have zero reward spread (the dynamic sampling cells)."""
    def flat(prompt) -> bool:
        text = prompt if isinstance(prompt, str) else [m["content"] for m in prompt if m["role"] == "user"][-1]
        return zlib.crc32(text.encode()) % 2 == 0
    return [0.5 if flat(p) else zlib.crc32(completion_text(c).encode()) / 2**32 for p, c in zip(prompts, completions)]


def lora_state(peft_model, base_path: str) -> dict:
    """What a LoRA cell checks of the live model: the largest |lora_B| (zero at the start), the sum of the
    trainable (adapter) weights, and the largest change of any frozen base weight against the files it
    was loaded from (under the merged model's names)."""
    from safetensors.torch import load_file

    from grpo_scale.lora import _base_name
    initial = load_file(str(Path(base_path) / "model.safetensors"))
    b_max = max(float(p.detach().abs().max()) for n, p in peft_model.named_parameters() if "lora_B" in n)
    trained = float(sum(p.detach().double().sum() for p in peft_model.parameters() if p.requires_grad))
    drift, compared = 0.0, 0
    for name, p in peft_model.get_base_model().named_parameters():
        clean = _base_name(name)
        if clean in initial and not p.requires_grad:
            drift = max(drift, float((p.detach().double() - initial[clean].double()).abs().max()))
            compared += 1
    return {"b_max": b_max, "trained_sum": trained, "base_drift": drift, "base_compared": compared}


COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
               "all_gather_object", "broadcast_object_list", "barrier")


@contextlib.contextmanager
def watched_decoding(cut_short: bool, seen: list):
    """Every decoding loop of this process (``rollout.sample``) with the collectives it calls counted into
    ``seen``: there must be none, or ranks that stop decoding at different steps wait on each other. With
    ``cut_short`` the loop stops after half the tokens (at least one): under ZeRO-3 rank 1's completions
    then end before rank 0's, as a real model's do when one rank's completions all reach end-of-sequence
    first (the embedded model writes every completion to the limit)."""
    original = rollout.sample
    dist = torch.distributed

    def counted(name):
        call = getattr(dist, name)

        def wrapper(*args, **kwargs):
            seen.append(name)
            return call(*args, **kwargs)
        return call, wrapper

    def watched(*args, max_new_tokens, **kwargs):
        if cut_short:
            max_new_tokens = max(1, max_new_tokens // 2)
        saved = {n: counted(n) for n in COLLECTIVES}
        for n, (_, wrapper) in saved.items():
            setattr(dist, n, wrapper)
        try:
            return original(*args, max_new_tokens=max_new_tokens, **kwargs)
        finally:
            for n, (call, _) in saved.items():
                setattr(dist, n, call)
    rollout.sample = watched
    try:
        yield
    finally:
        rollout.sample = original


def run_cell(out: Path, name: str, args: list[str], env: dict | None = None) -> None:
    """One cell. ``env``: Accelerate's DeepSpeed settings for this cell only (the launcher's config file
    sets them for the launch; a ZeRO-3 launch runs its CPU-offload cells this way, without a launch of
    their own)."""
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state()  # a fresh Accelerator (precision, accumulation, DeepSpeed config) per cell
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        cfg = load_config(args + ["--output_dir", str(out / name / "run")])
        trainer = GRPOTrainer(cfg)
        trainer.setup()
        seen = []
        with watched_decoding(trainer.zero_stage == 3 and trainer.acc.process_index == 1, seen):
            _run_cell(out, name, cfg, trainer, seen)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run_cell(out: Path, name: str, cfg, trainer: GRPOTrainer, seen: list) -> None:
    last = {}
    generate_and_score = trainer.generate_and_score

    def capture():
        last["batch"] = generate_and_score()
        last.setdefault("metrics", []).append(last["batch"]["metrics"])
        return last["batch"]

    trainer.generate_and_score = capture
    summary = trainer.train()
    batch = last["batch"]
    rollout = batch["rollout"]
    policy_logps = trainer._logps(trainer.model, rollout)  # after training; a collective under ZeRO-3
    with trainer.gathered(trainer.model) as model:
        checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
        lora_record = lora_state(model, cfg.resolved_model_path) if cfg.use_peft else None
    acc = trainer.acc
    record = {
        "process_index": acc.process_index, "num_processes": acc.num_processes,
        "world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
        "zero_stage": trainer.zero_stage, "steps": trainer.step, "history": trainer.history,
        "step_metrics": last["metrics"],
        "loss_impl": trainer.loss_impl, "padding_free": trainer.padding_free,
        "structured_attention": trainer.structured_attention, "packed_segments": trainer.packed_segments,
        "decode_step": trainer.decode_step, "last_layer": trainer.last_layer,
        "ref_last_layer": trainer.ref_model is not None and last_layer.enabled(trainer.ref_model),
        "rollout": {k: getattr(rollout, k).cpu() for k in ("prompt_ids", "prompt_mask", "completion_ids",
                                                           "completion_mask", "attention_mask")},
        "ref_logps": None if batch["ref_logps"] is None else batch["ref_logps"].float().cpu(),
        "policy_logps": policy_logps.float().cpu(), "checksum": checksum,
        "ref_param_bytes": None if trainer.ref_model is None else param_bytes(trainer.ref_model),
        "lora": lora_record, "collectives_in_decoding": sorted(set(seen)),
        "offload": _offload_devices(trainer),
    }
    trainer.save(summary)
    torch.save(record, out / name / f"rank{acc.process_index}.pt")


def _offload_devices(trainer) -> tuple:
    """(optimizer, parameter) offload devices of this cell's DeepSpeed engine, or None without DeepSpeed."""
    plugin = trainer.acc.state.deepspeed_plugin
    if plugin is None:
        return None
    zero = plugin.deepspeed_config.get("zero_optimization", {})
    return tuple(str((zero.get(k) or {}).get("device", "none")) for k in ("offload_optimizer", "offload_param"))


def main():
    out, cells = Path(sys.argv[1]), json.loads(sys.argv[2])
    # save() ends training, which tears the process group down; DeepSpeed keeps its groups across engines,
    # so the cells share one process group and it is torn down once, at the end.
    from accelerate.state import PartialState
    PartialState.destroy_process_group = lambda self, group=None: None
    for cell in cells:
        t0 = time.perf_counter()
        print(f"cell {cell['name']}: start", flush=True)
        run_cell(out, cell["name"], cell["args"], cell.get("env"))
        print(f"cell {cell['name']}: done in {time.perf_counter() - t0:.1f}s", flush=True)
    if torch.distributed.is_initialized():  # see train.py's _shutdown
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
