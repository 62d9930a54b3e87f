"""The interpreter traffic counter (benchmarks/traffic.py) and the kernels' traffic design figures."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

import grpo_scale.kernels.grpo_loss as kernels

if not type(kernels._grpo_token_kernel).__name__ == "InterpretedFunction":
    pytest.skip("traffic is counted under TRITON_INTERPRET=1 only", allow_module_level=True)

_spec = importlib.util.spec_from_file_location(
    "grpo_scale_traffic", Path(__file__).resolve().parents[1] / "benchmarks" / "traffic.py")
traffic = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = traffic  # dataclasses look their module up there
_spec.loader.exec_module(traffic)


@triton.jit
def _read_twice_write_once(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    a = tl.load(x_ptr + offs, mask=inside)
    b = tl.load(x_ptr + offs, mask=inside)  # the same program again: on-chip
    tl.store(y_ptr + offs, a + b, mask=inside)


def test_counter_rules_on_a_hand_kernel():
    x, y = torch.ones(100), torch.empty(100)
    with traffic.count_traffic() as counter:
        _read_twice_write_once[(4,)](x, y, 100, BLOCK=32)  # 4 x 32 lanes, 28 masked off
        _read_twice_write_once[(4,)](x, y, 100, BLOCK=32)  # a second launch reads from HBM again
    unit = x.numel() * 4
    assert counter.totals(unit) == {"issued": 6.0, "hbm": 4.0}
    assert [launch.grid for launch in counter.launches] == [4, 4]
    assert counter.launches[0].hbm == {"x_ptr": [400, 0], "y_ptr": [0, 400]}


def test_design_figures_on_an_unmasked_batch():
    rows = {r["case"]: r for r in traffic.measure(B=2, T=3, V=301)}
    hbm = {case: r["logits_grad_hbm_U"] for case, r in rows.items()}
    assert {case: hbm[case] for case in list(hbm)[:5]} == {
        "token fwd+bwd": 2.0,  # one read, one gradient write
        "token fwd+bwd inplace": 2.0,
        "token fwd+bwd, upstream 0.5": 4.0,  # the scaling step re-reads and rewrites the gradient
        "sequence fwd+bwd": 3.0,  # log-prob pass, then read + write
        "selective_logps": 1.0,
    }
    # every loss type and extra meets its stated figure exactly (not less: a case that skipped its
    # gradient pass would read less)
    exact = [case for case in traffic.TARGETS if "quantile" not in case]
    assert {case: hbm[case] for case in exact} == {case: traffic.TARGETS[case][2] for case in exact}
    assert all(rows[case]["meets_target"] for case in rows)
    # the quantile keeps the top 20% of 6 tokens by entropy, 2 rows: 1U + 2/6 U read + 1U written
    assert hbm["dapo top_entropy_quantile 0.2"] == pytest.approx(2 + 2 / 6, abs=1e-3)
    # The token forward is one launch; the backward's scaling kernel reads only the upstream scalar.
    assert rows["token fwd+bwd"]["kernels"] == "_grpo_token_kernel + _scale_rows_kernel"
    assert rows["token fwd+bwd"]["issued_U"] == pytest.approx(3.0, abs=0.1)  # pass 2 re-reads on-chip


def test_masked_rows_are_not_read():
    B, T, V = 2, 4, 257
    logits = torch.randn(B, T, V, requires_grad=True)
    ids = torch.randint(0, V, (B, T))
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)  # 3 of 8 rows active
    unit = logits.numel() * 4
    for level, reads in (("token", 1), ("sequence", 2)):
        with traffic.count_traffic() as counter:
            kernels.grpo_loss(logits, ids, torch.randn(B), mask, importance_sampling_level=level).loss.backward()
        logits.grad = None
        # active rows: `reads` passes over the row plus the gradient write; masked rows: zeros written
        expected = 3 / 8 * (reads + 1) + 5 / 8 * 1
        assert counter.totals(unit, arguments=traffic.LOGITS_SIZED)["hbm"] == pytest.approx(expected, abs=1e-9)
