"""Floors of each phase of a GRPO step, and the speed-ups they bound (Amdahl), from an e2e run's records.

    python benchmarks/floors.py benchmarks/results/cpu-e2e-smollm2-135m-instruct-steps.json [--threads 2]

For every measured step of our side, from its rollout's shape (each group's prompt length, each
completion's length) and the model's shapes:

- the FLOPs of the work no trainer can skip: the linear layers (projections, MLP) of every real token, the
  prompt of each group once, the vocabulary projection at the completion positions only, and nothing for
  padding; attention is left out (it is a few percent at these lengths);
- generation: the prompts' prefill, then for each decoding step the larger of reading every weight once
  (decoding is bound by memory bandwidth at small batches) and the FLOPs of the rows still decoding;
- old and reference log-probs: one forward per needed model; the policy: forward and backward (3x a
  forward); the optimiser: AdamW reads weights, gradients and its two moments and writes three of them;
- reward and the rest: not modelled (their measured time is kept).

Rates are measured here, with the run's thread count: the matrix products of the model's own shapes
(GFLOP/s) and a large copy (GB/s). Rows (provider `floor`): each phase's floor and the step's; the tokens
of a step (real, as a padded trainer computes them, prompt copies); then, per phase of ours, the bound on
the whole step's speed-up if that phase alone reached its floor, and the bound on our speed-up over TRL
if every phase did.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.records import ROOT, Row, measured

PHASES = ("generation", "reward", "logps", "policy", "optimizer", "other")


def shapes(config) -> dict:
    """Per-token FLOPs of the decoder's linear layers and of the vocabulary projection, and weight counts."""
    H, heads, inter, layers = (config.hidden_size, config.num_attention_heads, config.intermediate_size,
                               config.num_hidden_layers)
    hd = getattr(config, "head_dim", None) or H // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    per_layer = 2 * H * heads * hd + 2 * H * kv * hd + 3 * H * inter
    V = config.vocab_size
    embeddings = V * H * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    return {"linear": 2 * per_layer * layers, "head": 2 * H * V, "weights": per_layer * layers + embeddings,
            "decode_weights": per_layer * layers + V * H, "H": H, "inter": inter, "V": V}


def measure_rates(s: dict, threads: int) -> dict:
    """GFLOP/s of the model's matrix products (512 tokens through one layer's shapes and the head) and
    GB/s of a 256 MB copy, with ``threads`` threads."""
    torch.set_num_threads(threads)
    H, inter, V = s["H"], s["inter"], s["V"]
    x = torch.randn(512, H)
    mats = [torch.randn(H, H), torch.randn(H, inter), torch.randn(inter, H), torch.randn(H, V)]
    inputs = [x, x, torch.randn(512, inter), x]
    flops = sum(2 * a.shape[0] * a.shape[1] * w.shape[1] for a, w in zip(inputs, mats))
    for a, w in zip(inputs, mats):
        a @ w
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for a, w in zip(inputs, mats):
            a @ w
        times.append(time.perf_counter() - t0)
    src, dst = torch.ones(64 * 2**20), torch.empty(64 * 2**20)
    dst.copy_(src)
    copies = []
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        copies.append(time.perf_counter() - t0)
    return {"flops_per_s": flops / min(times), "bytes_per_s": 2 * src.numel() * 4 / min(copies)}


def step_floors(shape: dict, s: dict, rates: dict, settings: dict) -> tuple[dict, dict]:
    """({phase: floor seconds} for the modelled phases, token counts) of one step's rollout."""
    lengths, runs = shape["completion_lengths"], shape["prompt_runs"]
    prompts = shape["prompt_lengths"]
    firsts = [sum(runs[:k]) for k in range(len(runs))]
    group_prompts = [prompts[i] for i in firsts]
    rate, bw = rates["flops_per_s"], rates["bytes_per_s"]
    lin, head = s["linear"], s["head"]
    # one forward: each group's prompt once, each completion's inputs, the head where a token is predicted
    forward = (sum(group_prompts) + sum(max(n - 1, 0) for n in lengths)) * lin + sum(lengths) * head
    prefill = sum(p - 1 for p in group_prompts) * lin
    weights_time = 4 * s["decode_weights"] / bw
    decode = sum(max(weights_time, sum(n >= k for n in lengths) * (lin + head) / rate)
                 for k in range(1, max(lengths) + 1))
    models = (1 if settings.get("beta", 0) > 0 else 0) + (1 if settings.get("num_iterations", 1) > 1 else 0)
    floors = {"generation": prefill / rate + decode, "logps": models * forward / rate,
              "policy": 3 * forward / rate, "optimizer": 7 * 4 * s["weights"] / bw}
    N, P, T = len(lengths), max(prompts), max(lengths)
    tokens = {"real": sum(group_prompts) + sum(lengths), "padded": N * (P + T),
              "prompt_copies": sum(prompts) - sum(group_prompts)}
    return floors, tokens


def floor_rows(records_path, threads: int | None = None) -> list[Row]:
    from transformers import AutoConfig

    from grpo_scale.models import resolve_model_path

    rec = json.loads(Path(records_path).read_text())
    threads = threads or rec.get("threads", 1)
    model = rec["model"]
    if (ROOT / model).exists():  # stored relative to the repository
        model = str(ROOT / model)
    config = AutoConfig.from_pretrained(resolve_model_path(model))
    s = shapes(config)
    rates = measure_rates(s, threads)
    ours = rec["sides"]["ours"]
    settings = ours["done"]["settings"]
    steps = ours["steps"]
    per_step = [step_floors(st["shape"], s, rates, settings) for st in steps]
    shape = (f"{rec['name']}: {settings['per_device_train_batch_size'] // settings['num_generations']} prompts x "
             f"{settings['num_generations']} completions, <= {settings['max_completion_length']} tokens")
    base = dict(benchmark="e2e", shape=shape, dtype="bf16" if settings.get("bf16") else "fp32",
                level=settings["importance_sampling_level"])
    note = (f"{rates['flops_per_s'] / 1e9:.0f} GFLOP/s (the model's matrix products), "
            f"{rates['bytes_per_s'] / 1e9:.1f} GB/s (copy), {threads} thread(s)")
    rows = []
    floors_by_step = []
    for (f, _), st in zip(per_step, steps):  # unmodelled phases keep their measured time
        floors_by_step.append({p: f.get(p, st["phases"][p]) for p in PHASES})
    for p in PHASES:
        kind = "modelled" if p in per_step[0][0] else "not modelled: the measured time"
        rows.append(measured([fs[p] for fs in floors_by_step], **base, provider="floor", mode=p, metric="time",
                             unit="s", note=f"{kind}; {note}"))
    totals = [sum(fs.values()) for fs in floors_by_step]
    rows.append(measured(totals, **base, provider="floor", mode="step", metric="time", unit="s", note=note))
    for key, what in (("real", "each group's prompt once and every completion token"),
                      ("padded", "completions x (longest prompt + longest completion), as a padded forward"),
                      ("prompt_copies", "prompt tokens computed again for each completion of a group")):
        rows.append(measured([t[key] for _, t in per_step], **base, provider="floor", mode=f"tokens_{key}",
                             metric="tokens", unit="tokens", note=what))
    # Amdahl: ours with one phase at its floor, step by step
    for p in PHASES[:5]:
        bound = [st["step_s"] / (st["step_s"] - st["phases"][p] + fs[p]) for st, fs in zip(steps, floors_by_step)]
        rows.append(measured(bound, **base, provider="ours", mode=p, metric="bound_speedup_at_floor", unit="x",
                             note=f"step time over step time with {p} at its floor"))
    if "trl" in rec["sides"]:
        trl = statistics.median(st["step_s"] for st in rec["sides"]["trl"]["steps"])
        ours_median = statistics.median(st["step_s"] for st in steps)
        rows.append(Row(**base, provider="ours/trl", mode="step", metric="bound_speedup_at_floor", unit="x",
                        median=trl / statistics.median(totals), n=len(totals),
                        note=f"TRL's median step ({trl:.1f} s) over the floor step: the most any trainer could "
                             f"gain on TRL here; ours now {trl / ours_median:.2f}x"))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records", help="an e2e run's <name>-steps.json")
    parser.add_argument("--threads", type=int, default=None, help="threads for the rates (default: the run's)")
    args = parser.parse_args(argv)
    for r in floor_rows(args.records, args.threads):
        print(f"{r.provider:9s} {r.mode:22s} {r.metric:24s} {r.median:10.3f} {r.unit:7s} {r.note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
