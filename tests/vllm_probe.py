"""Launched by tests/test_vllm.py as one plain process: a GRPOTrainer with use_vllm, through set-up and a
short run, checked against its own policy.

    vllm_probe.py OUT_JSON [train.py arguments]

The arguments choose the model, vllm_mode and the rest. After set-up (the engine has the model files'
weights), the probe:

1. decodes the same held-out prompts greedily with the vLLM engine and with the trainer's own sampler
   (``LocalEngine``) on the same weights;
2. takes our sampler's completions as fixed completions and records vLLM's log-prob of each of their tokens
   and the policy's (a forward of the plain module);
3. trains (``max_steps``), which syncs the weights to vLLM before each rollout after the first;
4. records both log-probs of the same completions again (the engine syncs first: the last step changed the
   weights).

It writes the figures to OUT_JSON; the test asserts on them.
"""
import json
import sys
import time

import torch

from grpo_scale import engines
from grpo_scale.config import load_config
from grpo_scale.trainer import GRPOTrainer


def policy_logps(trainer, prompts, completions):
    """The policy's log-prob of each completion token (temperature 1), one sequence at a time."""
    inner = trainer.acc.unwrap_model(trainer.model)
    was = inner.training
    inner.eval()
    out = []
    with torch.no_grad():
        for p, c in zip(prompts, completions):
            ids = torch.tensor([p + c], device=trainer.acc.device)
            logits = inner(input_ids=ids).logits[0, len(p) - 1:-1].float()
            out.append(logits.log_softmax(-1).gather(1, ids[0, len(p):, None]).squeeze(1).tolist())
    inner.train(was)
    return out


def gap(a, b):
    d = [abs(x - y) for u, v in zip(a, b) for x, y in zip(u, v)]
    return {"max": max(d), "mean": sum(d) / len(d), "tokens": len(d)}


def main():
    out_path, argv = sys.argv[1], sys.argv[2:]
    cfg = load_config(argv)
    t0 = time.perf_counter()
    trainer = GRPOTrainer(cfg)
    trainer.setup()
    setup_s = time.perf_counter() - t0
    engine = trainer.engine
    prompts = trainer._render(trainer.eval_rows[:4])
    greedy = engines.Sampling(max_new_tokens=cfg.max_completion_length, max_prompt_length=cfg.max_prompt_length,
                              do_sample=False, with_logps=True)
    t1 = time.perf_counter()
    got = engine.generate(prompts, greedy)
    first_generate_s = time.perf_counter() - t1
    local = engines.LocalEngine(trainer.model, trainer.tokenizer, trainer.gathered).generate(prompts, greedy)
    same_rows = [bool(torch.equal(a[m.bool()].cpu(), b[n.bool()].cpu())) for a, m, b, n in
                 zip(got.completion_ids, got.attention_mask, local.completion_ids, local.attention_mask)]
    p_ids = [row[m.bool()].tolist() for row, m in zip(local.prompt_ids.cpu(), local.prompt_mask.cpu())]
    c_ids = [row[m.bool()].tolist() for row, m in zip(local.completion_ids.cpu(), local.attention_mask.cpu())]
    before_v = engine.sequence_logps(p_ids, c_ids)
    before_p = policy_logps(trainer, p_ids, c_ids)
    summary = trainer.train()
    stale_after_training = engine.stale
    syncs_in_training = engine.syncs
    t2 = time.perf_counter()
    after_v = engine.sequence_logps(p_ids, c_ids)  # syncs first
    last_sync_s = time.perf_counter() - t2
    after_p = policy_logps(trainer, p_ids, c_ids)
    result = {
        "engine": engine.name, "setup_s": setup_s, "start_s": getattr(engine, "start_s", None),
        "first_generate_s": first_generate_s, "greedy_same_rows": same_rows,
        "greedy_vllm": got.completions, "greedy_local": local.completions,
        "greedy_sampler_logp_gap": float((got.sampling_logps - local.sampling_logps).abs().max())
        if all(same_rows) else None,
        "before": gap(before_v, before_p), "after": gap(after_v, after_p),
        "vllm_moved": gap(after_v, before_v), "policy_moved": gap(after_p, before_p),
        "stale_after_training": stale_after_training, "syncs_in_training": syncs_in_training,
        "syncs": engine.syncs, "sync_s_total": engine.sync_s, "last_sync_s": last_sync_s,
        "steps": summary["steps"], "history": [{k: v for k, v in h.items() if isinstance(v, (int, float))}
                                               for h in trainer.history],
    }
    engine.close()
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
