"""The combination matrix: features meet in users' runs, so they are tested together.

Factors: launch (one process, ZeRO-2 on 2 ranks, ZeRO-3 on 2 ranks, ZeRO-3 with CPU offload on 2 ranks) x
beta (0, > 0) x share_prompt x num_iterations (1, 2) x gradient accumulation (1, 2) x loss_impl (eager, and
triton and fused_linear under the Triton interpreter) x gradient checkpointing x LoRA (full fine-tuning, or
peft adapters whose reference is the network with adapters off) x dynamic sampling x padding_free (packed or
padded log-prob forwards), plus precision (fp32, and one bf16 cell in the default suite). ``ROWS`` is a pairwise covering set: every pair of values of any two
factors meets in at least one row (checked by ``test_rows_cover_every_pair``). The full product runs behind
the ``slow`` marker.

Each cell is a real run of two rollouts (2 optimiser steps, 4 with num_iterations 2) on the embedded model
(tests/matrix_probe.py), with the cells of one launch in the same processes. Each asserts: the launch exits
0, the ranks see distinct indices and sample different prompts and end with the same weights, every logged
loss is finite and no step was skipped, the saved final/ is the trained policy and its weights moved, and
on the last rollout the reference log-probs the trainer computed equal an independent forward of the
initial weights (and the policy's after training differ from them); under ZeRO-3 each rank holds 1/W of
the reference. Dynamic sampling cells assert that groups were dropped and that every step trained on groups
with reward spread only (but for the groups that fill a step whose rounds kept nothing). LoRA cells also assert that lora_B moved away from zero, no frozen base weight changed,
adapter/ is the trained adapter, and the merged final/ computes what the adapter on its base computes.
"""
import copy
import itertools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
EMBEDDED = ROOT / "grpo_scale" / "assets" / "tiny-math"
LAUNCHES = ("one", "zero2", "zero3", "zero3_offload")
IMPLS = ("eager", "triton", "fused_linear")
TEMPERATURE = 2.0  # hot sampling: the completions of a group differ
# matrix_probe:text_checksum gives distinct completions distinct rewards: every group has a spread
COMMON = ["--eval_size", "4", "--eval_batch_size", "4", "--max_completion_length", "12", "--report_to", "none",
          "--num_generations", "4", "--per_device_train_batch_size", "4", "--learning_rate", "2e-3",
          "--temperature", str(TEMPERATURE), "--cpu_threads", "1",
          "--reward_funcs", "correctness,format,matrix_probe:text_checksum", "--reward_weights", "1,0.2,1"]

# (launch, loss_impl, beta > 0, share_prompt, num_iterations 2, accumulation 2, gradient checkpointing, bf16, LoRA,
#  dynamic sampling)
ROWS = [
    ("one", "eager", 0, 1, 1, 0, 0, 0, 0, 0, 0),
    ("one", "triton", 1, 1, 0, 0, 1, 0, 1, 0, 1),
    ("one", "fused_linear", 0, 0, 0, 1, 0, 0, 0, 1, 1),
    ("zero2", "eager", 0, 1, 1, 1, 0, 0, 1, 0, 1),
    ("zero2", "triton", 1, 0, 0, 0, 1, 0, 0, 1, 0),
    ("zero2", "fused_linear", 1, 0, 1, 1, 1, 0, 1, 0, 1),
    ("zero3", "eager", 0, 0, 0, 1, 1, 0, 1, 0, 0),
    ("zero3", "triton", 1, 1, 1, 1, 0, 0, 1, 1, 1),
    ("zero3", "fused_linear", 1, 1, 1, 0, 0, 0, 0, 0, 1),
    ("zero3", "eager", 1, 1, 0, 0, 0, 1, 0, 0, 1),          # the bf16 cell: a partitioned reference in bf16
    ("zero3_offload", "eager", 1, 1, 1, 1, 1, 0, 0, 1, 1),
    ("zero3_offload", "triton", 0, 0, 1, 1, 0, 0, 0, 0, 1),
    ("zero3_offload", "fused_linear", 1, 1, 0, 0, 0, 0, 1, 0, 0),
]
# The loss family rides along, one loss type (and extra) per row: every type runs under some launch, the
# cross-rank entropy quantile under ZeRO-3, importance weights from the decoding loop's log-probs with
# every launch. Row i of ROWS uses LOSSES[i].
IS = "--importance_sampling_correction"
LOSSES = [
    ["--loss_type", "grpo", "--entropy_coef", "0.01", "--use_adaptive_entropy", "true", "--entropy_target", "9"],
    ["--loss_type", "sapo"],
    ["--loss_type", "cispo", "--epsilon_high", "5", IS, "true", "--importance_sampling_mode", "token_truncate"],
    ["--loss_type", "vespo", IS, "true", "--importance_sampling_mode", "token_mask"],
    ["--loss_type", "bnpo", "--off_policy_mask_threshold", "0.01"],
    ["--loss_type", "luspo", "--importance_sampling_level", "sequence"],
    ["--loss_type", "dr_grpo", "--top_entropy_quantile", "0.5"],
    ["--loss_type", "dapo", IS, "true", "--importance_sampling_mode", "sequence_mask", "--off_policy_mask_threshold",
     "0.01"],
    ["--loss_type", "grpo", "--top_entropy_quantile", "0.5", "--entropy_coef", "0.01"],
    ["--loss_type", "dapo"],
    ["--loss_type", "sapo", IS, "true", "--importance_sampling_mode", "token_truncate"],
    ["--loss_type", "vespo"],
    ["--loss_type", "cispo", "--epsilon_high", "5", "--entropy_coef", "0.01", "--use_adaptive_entropy", "true"],
]
FACTORS = ("launch", "loss_impl", "beta", "share_prompt", "num_iterations", "gradient_accumulation_steps",
           "gradient_checkpointing", "bf16", "use_peft", "dynamic_sampling", "padding_free")
PAIRED = (0, 1, 2, 3, 4, 5, 6, 8, 9, 10)  # every factor but precision
# dynamic sampling cells: half of the prompts get a flat reward, so groups are dropped; 2 rounds at most,
# so some steps run out of rounds (a short batch, or one filled with zero-spread groups)
DYNAMIC = ["--dynamic_sampling", "true", "--max_sampling_rounds", "2",
           "--reward_funcs", "correctness,format,matrix_probe:half_flat_checksum"]


def cell_name(row) -> str:
    launch, impl, beta, share, iters, ga, gc, bf16, peft, dyn, packed = row
    return "-".join([launch, impl, "beta" if beta else "nobeta", "share" if share else "noshare",
                     f"it{1 + iters}", f"ga{1 + ga}", "gc" if gc else "nogc", "bf16" if bf16 else "fp32",
                     "lora" if peft else "full", "packed" if packed else "padded"] + (["dyn"] if dyn else []))


def cell_args(row) -> list[str]:
    launch, impl, beta, share, iters, ga, gc, bf16, peft, dyn, packed = row
    loss = LOSSES[ROWS.index(row)] if row in ROWS else ["--loss_type", "dapo"]
    # two rollouts: the second is scored after the policy moved, so reference and policy log-probs differ
    return COMMON + ["--max_steps", str(2 * (1 + iters)), "--loss_impl", impl, "--beta", "0.04" if beta else "0", "--share_prompt", str(bool(share)),
                     "--num_iterations", str(1 + iters), "--gradient_accumulation_steps", str(1 + ga),
                     "--gradient_checkpointing", str(bool(gc)), "--bf16", str(bool(bf16)), "--use_peft", str(bool(peft)),
                     "--padding_free", str(bool(packed))] + loss + (DYNAMIC if dyn else [])


def test_rows_cover_every_pair():
    """Every pair of values of any two factors (precision aside: one bf16 cell) meets in some row, and so
    do the triples where bugs lived: the shared-prompt policy forward (share_prompt on, checkpointing off)
    under every launch and with fused_linear under ZeRO-3; the partitioned reference model (beta > 0, full
    fine-tuning) with the shared prompt and with reused rollouts under both ZeRO-3 launches; and the LoRA
    reference (adapters off, through the engine) under every launch, with the shared prompt under both
    ZeRO-3 launches, with fused_linear under ZeRO-3, and LoRA with gradient checkpointing under ZeRO-3."""
    values = [LAUNCHES, IMPLS] + [(0, 1)] * 9
    for a, b in itertools.combinations(PAIRED, 2):
        have = {(r[a], r[b]) for r in ROWS}
        missing = set(itertools.product(values[a], values[b])) - have
        assert not missing, f"no row has {FACTORS[a]}, {FACTORS[b]} = {sorted(missing)}"
    fp32 = [r for r in ROWS if not r[7]]
    full, peft = [r for r in fp32 if not r[8]], [r for r in fp32 if r[8]]
    for launch in LAUNCHES:
        assert any(r[0] == launch and r[3] and not r[6] for r in fp32), launch
        assert any(r[0] == launch and r[2] for r in peft), f"{launch}: LoRA with its adapters-off reference"
    assert any(r[:2] == ("zero3", "fused_linear") and r[3] and not r[6] for r in fp32)
    for launch in ("zero3", "zero3_offload"):
        assert any(r[0] == launch and r[2] and r[3] for r in full) and any(r[0] == launch and r[2] and r[4] for r in full)
        assert any(r[0] == launch and r[2] and r[3] and not r[6] for r in peft), launch
    assert any(r[0].startswith("zero3") and r[1] == "fused_linear" and r[2] for r in peft)
    assert any(r[0].startswith("zero3") and r[6] for r in peft)
    assert any(r[7] and r[2] and r[0] == "zero3" for r in ROWS), "the bf16 cell: a partitioned reference in bf16"
    # the packed forward (decoder and head called apart from the engine) under ZeRO-3: with LoRA, with
    # fused_linear and with gradient checkpointing
    assert any(r[0].startswith("zero3") and r[10] and r[8] for r in fp32)
    assert any(r[:2] == ("zero3", "fused_linear") and r[10] for r in fp32)
    assert any(r[0].startswith("zero3") and r[10] and r[6] for r in fp32)
    from grpo_scale.kernels.losses import LOSS_TYPES
    assert len(LOSSES) == len(ROWS)
    types = {loss[1] for loss in LOSSES}
    assert types == set(LOSS_TYPES), set(LOSS_TYPES) - types
    launches_with = {flag: {r[0] for r, loss in zip(ROWS, LOSSES) if flag in loss} for flag in (
        IS, "--off_policy_mask_threshold", "--top_entropy_quantile", "--entropy_coef", "--use_adaptive_entropy")}
    assert launches_with[IS] == set(LAUNCHES) and "zero3" in launches_with["--top_entropy_quantile"]
    assert all(launches_with.values())


# A ZeRO-3 launch runs the CPU-offload cells too, with zero3_offload.yaml's settings for those cells only
# (one launch less: about a minute of the suite).
OFFLOAD_ENV = {"ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "cpu"}


def launch_cells(tmp_path: Path, launch: str, rows, extra=(), world: int = 2,
                 timeout: int = 900) -> subprocess.CompletedProcess:
    """Run ``rows`` (with ``extra`` arguments last) in one launch of ``world`` CPU processes."""
    cells = [{"name": cell_name(r), "args": cell_args(r) + list(extra),
              **({"env": OFFLOAD_ENV} if launch == "zero3" and r[0] == "zero3_offload" else {})} for r in rows]
    for c in cells:
        (tmp_path / c["name"]).mkdir(parents=True)
    probe = [str(ROOT / "tests" / "matrix_probe.py"), str(tmp_path), json.dumps(cells)]
    if launch == "one":
        cmd = [sys.executable, *probe]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "accelerate_configs" / f"{launch}.yaml"), "--num_processes", str(world), *probe]
    # The matrix is a CPU test (2 ranks need no 2 GPUs); Triton runs under its interpreter there.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1"}
    # Its own process group, so that a launch that hangs (ranks waiting on each other) is killed whole.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{launch} launch of {[c['name'] for c in cells]} hung for {timeout} s\n{out[-2000:]}{err[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def completion_logps(model, rec: dict) -> torch.Tensor:
    """Log-probs [N, T] of the recorded completions at the sampling temperature: one plain forward of
    prompt + completion per row (written out here, independent of the trainer's input builders)."""
    r = rec["rollout"]
    ids = torch.cat([r["prompt_ids"], r["completion_ids"]], 1)
    mask = torch.cat([r["prompt_mask"], r["attention_mask"]], 1)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    T = r["completion_ids"].shape[1]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -T - 1:-1].float()
    return torch.log_softmax(logits / TEMPERATURE, -1).gather(-1, r["completion_ids"].unsqueeze(-1)).squeeze(-1)


def check_cell(out: Path, row, initial, initial_bf16, world: int = 2, groups_span_ranks: bool = False) -> None:
    launch, impl, beta, share, iters, ga, gc, bf16, peft, dyn, packed = row
    name = cell_name(row)
    world = 1 if launch == "one" else world
    recs = [torch.load(out / name / f"rank{i}.pt", weights_only=False) for i in range(world)]
    assert [r["process_index"] for r in recs] == list(range(world)), name
    assert all(r["num_processes"] == r["world_size"] == world for r in recs), name
    assert recs[0]["zero_stage"] == {"one": 0, "zero2": 2}.get(launch, 3), name
    assert recs[0]["offload"] == {"one": None, "zero3_offload": ("cpu", "cpu")}.get(launch, ("none", "none")), \
        (name, recs[0]["offload"])
    assert recs[0]["loss_impl"] == impl, name
    assert recs[0]["padding_free"] == bool(packed), name  # on: the start-up check passed for this cell
    # grpo_sdpa (attention.py) passed its start-up checks: decoding over each group's prompt held once, and
    # packed rows' attention by index, under every launch, LoRA, checkpointing, bf16 and loss_impl
    assert recs[0]["structured_attention"] and (recs[0]["packed_segments"] or not packed), name
    # decoding steps from the weights (decoding.py) passed their check, gathered under ZeRO-3, in bf16;
    # a LoRA policy decodes through its forward
    assert recs[0]["decode_step"] == (not peft), name
    # the packed forward's last layer at the used positions only (last_layer.py) passed its check, LoRA
    # included; the reference model (beta > 0, full fine-tuning) has it too
    assert recs[0]["last_layer"] == bool(packed), name
    assert recs[0]["ref_last_layer"] == bool(packed and beta and not peft), name
    assert recs[0]["steps"] == 2 * (1 + iters) and recs[0]["history"], name
    for h in recs[0]["history"]:
        assert torch.isfinite(torch.tensor(h["loss"])), (name, h)
        assert h["skipped_step"] == 0, (name, h)

    if dyn:
        check_dynamic(recs[0]["step_metrics"], name)
        groups_span_ranks = True  # a short batch may split a group between the ranks
    # a group of 4 lies within one rank in the matrix: the ranks sampled different prompts
    prompts = [{tuple(ids[m.bool()].tolist()) for ids, m in zip(r["rollout"]["prompt_ids"], r["rollout"]["prompt_mask"])}
                for r in recs]
    assert groups_span_ranks or world == 1 or prompts[0].isdisjoint(prompts[1]), \
        f"{name}: the ranks sampled the same prompts"
    for r in recs:  # ranks that stop decoding at different steps must not wait on each other
        assert r["collectives_in_decoding"] == [], (name, r["process_index"], r["collectives_in_decoding"])
    checksums = [r["checksum"] for r in recs]
    assert max(checksums) - min(checksums) <= 1e-6 * max(1.0, abs(checksums[0])), f"{name}: ranks diverged"

    from transformers import AutoModelForCausalLM
    final = AutoModelForCausalLM.from_pretrained(out / name / "run" / "final")  # ZeRO-3: gathered on save
    # bf16 cells hold and compute in bf16: compare with the initial weights in bf16. bf16 keeps 8 bits of
    # mantissa, so logits near 16 are rounded to 1/16 (at temperature 2, log-probs differ by up to ~0.1).
    start, tol = (initial_bf16, 0.25) if bf16 else (initial, 1e-4)
    with torch.no_grad():
        moved = max(float((a.to(b.dtype) - b).abs().max()) for a, b in zip(final.parameters(), start.parameters()))
        saved = float(sum(p.double().sum() for p in final.parameters()))
    assert moved > 1e-4, f"{name}: weights did not move (max |dw| {moved:.2e})"
    if peft:
        check_lora(out / name / "run", recs, start, final, name)
    else:
        assert abs(saved - checksums[0]) <= 1e-5 * max(1.0, abs(saved)), f"{name}: final/ is not the trained policy"
    # bf16: each forward rounds its own way (8-bit mantissa through every layer), so two bf16 forwards of the
    # same weights can differ by twice one's error on a token (measured: 0.50, each 0.22-0.29 from float32).
    # The reference is compared with float32 forwards of the same (bf16) weights, on its worst token and
    # on average; the policy must have moved away from it on average.
    truth_model = copy.deepcopy(initial_bf16).float() if bf16 and beta else None
    for rec in recs:
        active = rec["rollout"]["attention_mask"].bool()
        expect = completion_logps(start, rec)[active]
        drift = float((rec["policy_logps"][active] - expect).abs().max())
        if beta and bf16:
            truth = completion_logps(truth_model, rec)[active]
            gap = (rec["ref_logps"][active] - truth).abs()
            moved_mean = float((rec["policy_logps"][active] - truth).abs().mean())
            assert float(gap.max()) <= 0.35 and float(gap.mean()) <= 0.05, \
                f"{name} rank {rec['process_index']}: reference log-probs off by {float(gap.max()):.2e} (mean {float(gap.mean()):.2e})"
            assert moved_mean > 5 * float(gap.mean()), \
                f"{name}: the policy's log-probs ({moved_mean:.2e}) hardly differ from the reference's ({float(gap.mean()):.2e})"
        elif beta:
            err = float((rec["ref_logps"][active] - expect).abs().max())
            assert err <= tol, f"{name} rank {rec['process_index']}: reference log-probs off by {err:.2e}"
            assert drift > 5 * max(err, tol / 10), \
                f"{name}: the policy's log-probs ({drift:.2e}) hardly differ from the reference's ({err:.2e})"
        if beta:
            if peft:  # the reference is the policy with its adapters off: no second model
                assert rec["ref_param_bytes"] is None, name
                continue
            held, full = rec["ref_param_bytes"]
            if launch.startswith("zero3"):  # each rank holds its partition (padded to a multiple of W)
                assert held < full / world * 1.05, f"{name}: rank holds {held} of the reference's {full} bytes"
            else:
                assert held == full, name
        else:
            assert rec["ref_logps"] is None and rec["ref_param_bytes"] is None, name
            assert drift > 1e-4, f"{name}: the policy's log-probs did not change ({drift:.2e})"


def check_dynamic(steps: list[dict], name: str) -> None:
    """Every rollout trained only on groups with reward spread, but for the zero-spread groups that fill a
    step whose rounds kept nothing; groups were dropped in the cell."""
    for m in steps:
        assert m["reward/frac_zero_std"] * m["dynamic/trained_groups"] == m["dynamic/filled_groups"], (name, m)
        assert m["dynamic/rounds"] <= 2, (name, m)
    assert sum(m["dynamic/dropped_groups"] for m in steps) > 0, f"{name}: dynamic sampling dropped nothing"


def check_lora(run: Path, recs, start, final, name: str) -> None:
    """A LoRA cell: lora_B moved away from zero, no frozen base weight changed (on any rank), adapter/ holds
    the trained adapter, and final/ (merged) computes what the adapter on the untouched base computes."""
    import copy

    from peft import PeftModel
    from safetensors.torch import load_file
    for rec in recs:
        st = rec["lora"]
        assert st["b_max"] > 1e-4, f"{name}: lora_B did not move away from zero ({st['b_max']:.2e})"
        assert st["base_compared"] > 0 and st["base_drift"] == 0.0, f"{name}: the frozen base moved ({st})"
    adapter = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    saved = float(sum(t.double().sum() for t in adapter.values()))
    assert abs(saved - recs[0]["lora"]["trained_sum"]) <= 1e-6 * max(1.0, abs(saved)), \
        f"{name}: adapter/ is not the trained adapter"
    with_adapter = PeftModel.from_pretrained(copy.deepcopy(start), run / "adapter").eval()
    err = float((completion_logps(final, recs[0]) - completion_logps(with_adapter, recs[0])).abs().max())
    assert err <= 1e-4, f"{name}: merged final/ differs from the adapter on its base by {err:.2e}"
    assert torch.equal(final.get_input_embeddings().weight, start.get_input_embeddings().weight), \
        f"{name}: merging changed the (tied) input embeddings"


@pytest.fixture(scope="module")
def initial_models():
    from transformers import AutoModelForCausalLM
    fp32 = AutoModelForCausalLM.from_pretrained(EMBEDDED, dtype=torch.float32).eval()
    bf16 = AutoModelForCausalLM.from_pretrained(EMBEDDED, dtype=torch.bfloat16).eval()
    return fp32, bf16


def run_and_check(tmp_path, launch, rows, initial_models):
    proc = launch_cells(tmp_path, launch, rows)
    done = [line for line in proc.stdout.splitlines() if line.startswith("cell ")]
    assert proc.returncode == 0, "\n".join(done) + "\n" + proc.stdout[-2000:] + proc.stderr[-6000:]
    for row in rows:
        check_cell(tmp_path, row, *initial_models)


@pytest.mark.parametrize("launch", ("one", "zero2", "zero3"))
def test_pairwise_cells(tmp_path, launch, initial_models):
    run_and_check(tmp_path, launch, [r for r in ROWS if r[0].split("_")[0] == launch], initial_models)


@pytest.mark.slow  # 41 s; the default suite's ZeRO-3 cells share prompts on 2 ranks
def test_zero3_ranks_agree_whether_to_share_the_prompt(tmp_path, initial_models):
    """3 ranks, groups of 3, micro-batches of 2: rank 1's micro-batch holds two different prompts (nothing to
    share) while ranks 0 and 2 hold one prompt twice. A shared forward through the ZeRO-3 engine is two
    forwards (prompt, then completions), each gathering parameters collectively: unless the ranks agree,
    their gathers pair up wrongly and the run hangs or fails."""
    row = ("zero3", "eager", 1, 1, 0, 0, 0, 0, 0, 0, 0)  # padded: the packed forward is one forward anyway
    extra = ["--num_generations", "3", "--per_device_train_batch_size", "2"]
    proc = launch_cells(tmp_path, "zero3", [row], extra, world=3, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    check_cell(tmp_path, row, *initial_models, world=3, groups_span_ranks=True)


def product_chunks(size: int = 16):
    """The full product, by launch, in chunks of ``size`` cells (one launch each)."""
    for launch in LAUNCHES:
        rows = [(launch, impl, *bits[:6], peft, dyn, 1) for impl in IMPLS  # padding_free: the default
                for bits in itertools.product((0, 1), repeat=6) for peft in (0, 1) for dyn in (0, 1)]
        for i in range(0, len(rows), size):
            yield pytest.param(launch, rows[i:i + size], id=f"{launch}-{i // size}")


@pytest.mark.slow
@pytest.mark.parametrize("launch, rows", list(product_chunks()))
def test_full_product(tmp_path, launch, rows, initial_models):
    run_and_check(tmp_path, launch, rows, initial_models)
