"""The Triton GRPO loss against the eager reference computed in float64.

On machines without a GPU the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports a kernel). Every kernel run uses NaN-poisoned `torch.empty`,
so an output element a kernel forgets to write fails the comparison.

Tolerances, as whole-tensor relative errors ||got - gold|| / max(||gold||, FLOOR):
- fp32 logits: 1e-5 for everything (fp32 arithmetic against float64).
- bf16/fp16 logits: the same 1e-5 for the loss, log-probs and metrics, because both sides see the same
  low-precision values (exact in fp32) and the kernel accumulates in fp32. The gradient is stored in
  the logits' dtype, so each element carries one conversion error relative to its fp32 value: at most
  2^-8 for bf16 (8 significant bits, round to nearest on a GPU) and 2^-11 for fp16. Triton's
  interpreter converts fp32 to bf16 by truncation, which doubles the bf16 bound to 2^-7. A per-element
  bound is also a bound on the whole-tensor relative error, so we allow that bound plus 10% for the
  fp32 arithmetic before the conversion.
"""
import itertools
import os

import pytest
import torch

import grpo_scale.kernels._launch as launch
from grpo_scale.kernels.grpo_loss import grpo_loss, selective_logps
from grpo_scale.kernels.losses import LOSS_REGISTRY
from grpo_scale.kernels.reference import grpo_loss_reference, selective_logps_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

FLOOR = 1e-3
_BF16_CONVERSION = 2**-8 if DEVICE == "cuda" else 2**-7  # the interpreter truncates to bf16
TOL = {  # dtype: (loss, log-probs and metrics; gradient)
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1e-5, 1.1 * _BF16_CONVERSION),
    torch.float16: (1e-5, 1.1 * 2**-11),
}
LOSS_TYPES = list(LOSS_REGISTRY)
LEVELS = ["token", "sequence"]


def rel_err(got, gold):
    got, gold = got.detach().double().cpu(), gold.detach().double().cpu()
    err = float((got - gold).norm() / max(float(gold.norm()), FLOOR))
    return err if err == err else float("inf")  # NaN (an unwritten output) fails every bound


# --------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------
SHAPES = {
    # name: (B, T, V, options)
    "B2-T5-V67": (2, 5, 67, {"block": 32}),  # three blocks, the last one partial
    "B3-T13-V1001": (3, 13, 1001, {}),
    "B3-T6-V300-masked-row": (3, 6, 300, {"block": 128, "masked_row": True}),
    "B2-T4-V4099": (2, 4, 4099, {}),
    "B2-T5-V515-strided": (2, 5, 515, {"block": 256, "strided": True}),
    "B2-T5-V259-inplace": (2, 5, 259, {"block": 128, "inplace": True}),
}


def make_case(shape, dtype, seed=0):
    """Logits (maybe a strided view), ids, advantages, a ragged mask, old and ref log-probs."""
    B, T, V, opts = SHAPES[shape]
    g = torch.Generator().manual_seed(seed)
    base = 2.0 * torch.randn(B, T + 3 if opts.get("strided") else T, V + 5 if opts.get("strided") else V,
                             generator=g).to(dtype)
    logits = base[:, 1:T + 1, 2:V + 2] if opts.get("strided") else base  # strides (T+3)(V+5), V+5, 1
    ids = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    if opts.get("masked_row"):
        mask[1] = False
    ids = ids.masked_fill(~mask, -100)  # padding: must never be read
    adv = torch.randn(B, generator=g)
    gold_logp = selective_logps_reference(logits.double(), ids.clamp(min=0))
    old = (gold_logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    ref = (gold_logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    opts = dict(opts, sampling=(old.double() + 0.1 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
                .to(DEVICE))
    to = dict(device=DEVICE)
    return logits.to(**to), ids.to(**to), adv.to(**to), mask.to(**to), old.to(**to), ref.to(**to), opts


def loss_settings(loss_type, with_old):
    """Settings that make each loss type's own branches run: delta for the clipped family (ratios reach
    e^0.3 off-policy), a cap cispo reaches."""
    kind = LOSS_REGISTRY[loss_type]
    out = {"loss_type": loss_type}
    if kind.surrogate == "clip" and with_old:
        out["delta"] = 1.3
    if kind.surrogate == "cispo":
        out["epsilon_high"] = 1.15
    return out


def check_against_gold(shape, dtype, loss_type, level, beta, with_old, temperature, monkeypatch,
                       with_sampling=False, **extra):
    logits, ids, adv, mask, old, ref, opts = make_case(shape, dtype)
    if "block" in opts:
        monkeypatch.setattr(launch, "INTERPRETER_MAX_BLOCK_V", opts["block"])
    kwargs = dict(beta=beta, temperature=temperature, importance_sampling_level=level,
                  **loss_settings(loss_type, with_old), **extra)
    old = old if with_old else None
    ref = ref if beta > 0 else None
    sampling = opts["sampling"] if with_sampling else None

    gold_logits = logits.detach().double().requires_grad_()
    gold = grpo_loss_reference(gold_logits, ids, adv.double(), mask,
                               None if old is None else old.double(), None if ref is None else ref.double(),
                               sampling_logps=None if sampling is None else sampling.double(), **kwargs)
    gold.loss.backward()

    x = logits.detach().clone() if not opts.get("strided") else logits.detach()
    if opts.get("strided"):  # keep the view's strides: the kernel must use them, not a copy
        assert not x.is_contiguous() and x.stride(-1) == 1
    x.requires_grad_()
    out = grpo_loss(x, ids, adv, mask, old, ref, sampling_logps=sampling, inplace=opts.get("inplace", False),
                    **kwargs)
    out.loss.backward()

    tol_values, tol_grad = TOL[dtype]
    errors = {name: rel_err(got, want) for name, got, want in zip(out._fields, out, gold)}
    # The loss sums terms of both signs (advantages > 0 and < 0), which can cancel: its error is measured
    # against the size of the terms (the same loss with every advantage made positive), not against a
    # small difference of large terms (vespo at sequence level: terms ~13, loss 0.125).
    with torch.no_grad():
        size = grpo_loss_reference(logits.detach().double(), ids, adv.double().abs(), mask,
                                   None if old is None else old.double(), None if ref is None else ref.double(),
                                   sampling_logps=None if sampling is None else sampling.double(), **kwargs).loss
    errors["loss"] = float((out.loss.double().cpu() - gold.loss.detach().cpu()).abs()) / max(
        float(gold.loss.abs()), float(size.abs()), FLOOR)
    errors["grad"] = rel_err(x.grad, gold_logits.grad)
    bad = {k: v for k, v in errors.items() if v > (tol_grad if k == "grad" else tol_values)}
    assert not bad, f"errors over tolerance: {bad}"
    assert out.per_token_logps.dtype == torch.float32 and x.grad.dtype == dtype
    assert (out.per_token_logps[~mask] == 0).all()
    return errors


# --------------------------------------------------------------------------------------------------
# Every loss type, level, beta and policy on one small odd shape (temperature and dtype cycling); a
# pairwise selection on the others; everything when slow.
# --------------------------------------------------------------------------------------------------
FACTORS = {
    "loss_type": LOSS_TYPES,
    "level": LEVELS,
    "beta": [0.0, 0.04],
    "with_old": [False, True],
    "temperature": [1.0, 0.7],
    "dtype": [torch.float32, torch.bfloat16],
}
FULL_GRID = list(itertools.product(*FACTORS.values()))


def _small_grid():
    """Every loss type x level x beta x on/off-policy; temperature and dtype cycle within each loss type's
    eight rows, so each loss type and level meets both temperatures and both dtypes (the whole product is
    the slow grid)."""
    rows = []
    for i, (loss_type, level, beta, with_old) in enumerate(itertools.product(
            FACTORS["loss_type"], FACTORS["level"], FACTORS["beta"], FACTORS["with_old"])):
        bit = [(i >> k) & 1 for k in range(3)]  # with_old, beta, level
        temperature = FACTORS["temperature"][bit[0] ^ bit[1]]
        dtype = FACTORS["dtype"][bit[1] ^ bit[2]]
        rows.append((loss_type, level, beta, with_old, temperature, dtype))
    return rows


SMALL_GRID = _small_grid()


def _pairwise(factors):
    """A small list of combinations covering every pair of values of any two factors (greedy)."""
    names = list(factors)
    uncovered = {(i, a, j, b) for i, j in itertools.combinations(range(len(names)), 2)
                 for a in range(len(factors[names[i]])) for b in range(len(factors[names[j]]))}
    all_rows = list(itertools.product(*(range(len(factors[n])) for n in names)))
    chosen = []
    while uncovered:
        def gain(row):
            return sum((i, row[i], j, row[j]) in uncovered for i, j in itertools.combinations(range(len(row)), 2))
        best = max(all_rows, key=gain)
        uncovered -= {(i, best[i], j, best[j]) for i, j in itertools.combinations(range(len(best)), 2)}
        chosen.append(tuple(factors[n][k] for n, k in zip(names, best)))
    return chosen


def _case_id(values):
    loss_type, level, beta, with_old, temperature, dtype = values[-6:]
    tail = f"{loss_type}-{level}-beta{beta}-{'old' if with_old else 'onpolicy'}-T{temperature}-{str(dtype)[6:]}"
    return f"{values[0]}-{tail}" if len(values) == 7 else tail


PAIRWISE = _pairwise({"shape": [s for s in SHAPES if s != "B2-T5-V67"], **FACTORS})


@pytest.mark.parametrize("values", SMALL_GRID, ids=[_case_id(v) for v in SMALL_GRID])
def test_small_shape_grid(values, nan_empty, monkeypatch):
    loss_type, level, beta, with_old, temperature, dtype = values
    check_against_gold("B2-T5-V67", dtype, loss_type, level, beta, with_old, temperature, monkeypatch)


@pytest.mark.parametrize("values", PAIRWISE, ids=[_case_id(v) for v in PAIRWISE])
def test_shapes_pairwise(values, nan_empty, monkeypatch):
    shape, loss_type, level, beta, with_old, temperature, dtype = values
    check_against_gold(shape, dtype, loss_type, level, beta, with_old, temperature, monkeypatch)


SLOW_GRID = [(s, *v) for s in SHAPES for v in FULL_GRID]


@pytest.mark.slow
@pytest.mark.parametrize("values", SLOW_GRID, ids=[_case_id(v) for v in SLOW_GRID])
def test_all_shapes_full_grid(values, nan_empty, monkeypatch):
    shape, loss_type, level, beta, with_old, temperature, dtype = values
    check_against_gold(shape, dtype, loss_type, level, beta, with_old, temperature, monkeypatch)


# --------------------------------------------------------------------------------------------------
# Options, special rows and the autograd contract
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("level", LEVELS)
def test_fp16_dapo_with_device_normaliser(level, nan_empty, monkeypatch):
    check_against_gold("B3-T6-V300-masked-row", torch.float16, "dapo", level, 0.04, True, 0.7, monkeypatch,
                       num_items_in_batch=torch.tensor(23.0, device=DEVICE), epsilon_high=0.28,
                       max_completion_length=9)


@pytest.mark.parametrize("level", LEVELS)
def test_zero_advantage_rows_and_all_masked(level, nan_empty):
    logits, ids, adv, mask, old, _, _ = make_case("B3-T6-V300-masked-row", torch.float32)
    adv[0] = 0.0  # with beta = 0 row 0 has a zero gradient: the sequence kernel writes it unread
    x, gold_x = logits.clone().requires_grad_(), logits.double().requires_grad_()
    out = grpo_loss(x, ids, adv, mask, old, importance_sampling_level=level)
    gold = grpo_loss_reference(gold_x, ids, adv.double(), mask, old.double(), importance_sampling_level=level)
    out.loss.backward()
    gold.loss.backward()
    assert rel_err(x.grad, gold_x.grad) < 1e-5 and rel_err(out.loss, gold.loss) < 1e-5
    assert (x.grad[0] == 0).all() and (x.grad[1] == 0).all()

    x = logits.clone().requires_grad_()
    out = grpo_loss(x, ids, adv, torch.zeros_like(mask), old, importance_sampling_level=level)
    out.loss.backward()
    assert all((value == 0).all() for name, value in zip(out._fields, out) if name != "importance_sampling_ratio_mean")
    assert out.importance_sampling_ratio_mean == 1 and (x.grad == 0).all()  # 1: no correction


def test_grad_scale_and_upstream_gradient(nan_empty):
    logits, ids, adv, mask, old, _, _ = make_case("B2-T5-V67", torch.float32)
    x = logits.clone().requires_grad_()
    grpo_loss(x, ids, adv, mask, old).loss.backward()
    unit = x.grad.clone()

    x = logits.clone().requires_grad_()
    out = grpo_loss(x, ids, adv, mask, old, grad_scale=0.25)
    out.loss.backward()  # upstream 1: the stored gradient is final
    assert torch.allclose(x.grad, 0.25 * unit, rtol=1e-6, atol=0)
    assert torch.allclose(out.loss, grpo_loss(logits, ids, adv, mask, old).loss)  # value not scaled

    x = logits.clone().requires_grad_()
    (3.0 * grpo_loss(x, ids, adv, mask, old, grad_scale=0.5).loss).backward()  # scaled on the device
    assert torch.allclose(x.grad, 1.5 * unit, rtol=1e-6, atol=0)


def test_single_backward_only():
    logits, ids, adv, mask, old, _, _ = make_case("B2-T5-V67", torch.float32)
    x = logits.clone().requires_grad_()
    loss = grpo_loss(x, ids, adv, mask, old).loss
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="single backward"):
        loss.backward()


@pytest.mark.parametrize("inplace", [False, True])
def test_no_grad_leaves_logits_alone(inplace, nan_empty):
    logits, ids, adv, mask, old, _, _ = make_case("B2-T5-V67", torch.float32)
    x = logits.clone().requires_grad_()
    before = x.detach().clone()
    with torch.no_grad():
        out = grpo_loss(x, ids, adv, mask, old, inplace=inplace)
    gold = grpo_loss_reference(logits.double(), ids, adv.double(), mask, old.double())
    assert torch.equal(x.detach(), before)
    assert not out.loss.requires_grad
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(out, gold))


def test_inplace_consumes_the_logits(nan_empty):
    logits, ids, adv, mask, old, _, _ = make_case("B2-T5-V67", torch.float32)
    x = logits.clone().requires_grad_()
    grpo_loss(x, ids, adv, mask, old, inplace=True).loss.backward()
    assert x.grad.data_ptr() == x.data_ptr()  # the gradient lives in the logits' memory


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", ["B2-T5-V67", "B2-T4-V4099", "B2-T5-V515-strided"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_selective_logps(shape, dtype, temperature, nan_empty, monkeypatch):
    logits, ids, _, mask, _, _, opts = make_case(shape, dtype)
    if "block" in opts:
        monkeypatch.setattr(launch, "INTERPRETER_MAX_BLOCK_V", opts["block"])
    ids = ids.clamp(min=0)
    got = selective_logps(logits, ids, temperature=temperature)
    gold = selective_logps_reference(logits.double(), ids, temperature=temperature)
    assert got.dtype == torch.float32 and rel_err(got, gold) < 1e-5


# --------------------------------------------------------------------------------------------------
# Errors: the same validation as the reference, plus device dispatch
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change,match", [
    ({"loss_type": "ppo"}, "loss_type must be one of"),
    ({"beta": 0.1}, "beta > 0 needs ref_logps"),
    ({"completion_ids": torch.zeros(2, 4, dtype=torch.long)}, r"completion_ids has shape \(2, 4\)"),
    ({"completion_mask": torch.full((2, 3), 0.5)}, "completion_mask must hold only 0 and 1"),
    ({"logits": torch.zeros(2, 3, 5, dtype=torch.long)}, "logits must be floating point"),
    ({"logits": torch.zeros(2, 3, 10)[:, :, ::2]}, "contiguous last dimension"),
])
def test_errors(change, match):
    args = dict(logits=torch.zeros(2, 3, 5), completion_ids=torch.zeros(2, 3, dtype=torch.long),
                advantages=torch.zeros(2), completion_mask=torch.ones(2, 3))
    kwargs = {k: v for k, v in change.items() if k not in args}
    args.update({k: v.to(DEVICE) for k, v in change.items() if k in args})
    args = {k: v.to(DEVICE) for k, v in args.items()}
    with pytest.raises(ValueError, match=match):
        grpo_loss(**args, **kwargs)


def test_cpu_tensors_without_the_interpreter_are_refused():
    class CompiledKernel:  # stands in for a kernel decorated without TRITON_INTERPRET
        pass

    with pytest.raises(ValueError, match="need CUDA tensors"):
        launch.check_device("grpo_loss", torch.zeros(1), CompiledKernel())


# --------------------------------------------------------------------------------------------------
# The GPU compiler path, checked without a GPU: the interpreter accepts code the compiler may reject.
# --------------------------------------------------------------------------------------------------
_COMPILE_FOR_SM90 = r'''
import itertools
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import grpo_scale.kernels.grpo_loss as g

row = {"T": "i32", "V": "i32", "stride_lb": "i64", "stride_lt": "i64"}
for dt in ("fp32", "bf16"):
    p = f"*{dt}"
    token = {"logits_ptr": p, "grad_ptr": p, "ids_ptr": "*i64", **{k: "*fp32" for k in (
        "mask_ptr", "adv_ptr", "weight_ptr", "old_ptr", "ref_ptr", "sampling_ptr", "ent_w_ptr", "stats_ptr")},
        **row, "N": "i32", "stride_gb": "i64", "stride_gt": "i64", **{k: "fp32" for k in (
        "eps_low", "eps_high", "delta", "beta", "inv_temp", "grad_scale", "tau_pos", "tau_neg", "is_min",
        "is_max")}}
    # every surrogate with every importance-sampling mode and all options on, then each option off
    flags = [(surr, mode, True, True, True, True, True) for surr, mode in itertools.product([0, 1, 2], [0, 1, 2])]
    flags += [(0, 0, False, False, False, False, True), (0, 0, True, True, False, True, True),
              (0, 1, True, True, True, True, False)]
    jobs = [(g._grpo_token_kernel, token, dict(SURR=surr, IS_MODE=mode, HAS_OLD=o, HAS_KL=k, BIAS_KL=bias,
                                               HAS_ENT=ent, WRITE_GRAD=w))
            for surr, mode, o, k, bias, ent, w in (flags if dt == "fp32" else flags[-3:])]
    jobs += [
        (g._sequence_logp_kernel, {"logits_ptr": p, "ids_ptr": "*i64", "mask_ptr": "*fp32",
                                   "out_ptr": "*fp32", **row, "N": "i32", "inv_temp": "fp32"}, {}),
        *[(g._sequence_grad_kernel, {"logits_ptr": p, "grad_ptr": p, "ids_ptr": "*i64", "coef_ptr": "*fp32",
                                     "ecoef_ptr": "*fp32", "rows_ptr": "*fp32", **row, "N": "i32",
                                     "stride_gb": "i64", "stride_gt": "i64", "inv_temp": "fp32"},
                                    {"WITH_ENT": ent}) for ent in (False, True)],
        (g._selective_logps_kernel, {"logits_ptr": p, "ids_ptr": "*i64", "out_ptr": "*fp32", **row,
                                     "inv_temp": "fp32"}, {}),
        (g._scale_rows_kernel, {"grad_ptr": p, "scale_ptr": "*fp32", "T": "i32", "V": "i32",
                                "stride_gb": "i64", "stride_gt": "i64"}, {}),
    ]
    for kernel, signature, constexprs in jobs:
        signature = {**signature, **{k: "constexpr" for k in constexprs}, "BLOCK_V": "constexpr"}
        source = ASTSource(fn=kernel, signature=signature, constexprs={**constexprs, "BLOCK_V": 8192})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 16})
        assert "cubin" in compiled.asm, kernel
print("compiled")
'''


def test_kernels_compile_for_a_gpu():
    """Every kernel and flag combination goes through Triton's compiler to an sm_90 cubin."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], env=env, capture_output=True,
                            text=True, timeout=300)
    if result.returncode != 0 and "ptxas" in result.stderr and "not found" in result.stderr.lower():
        pytest.skip("Triton's ptxas is not available here")
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]


def test_empty_batch(nan_empty):
    x = torch.zeros(2, 0, 5, device=DEVICE, requires_grad=True)
    out = grpo_loss(x, torch.zeros(2, 0, dtype=torch.long, device=DEVICE), torch.zeros(2, device=DEVICE),
                    torch.zeros(2, 0, device=DEVICE), importance_sampling_level="sequence")
    out.loss.backward()
    assert out.loss.item() == 0 and x.grad.shape == x.shape
