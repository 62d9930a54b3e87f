"""Column-method traces: right values on every small problem, slips only where a carry exists."""
import random
import re

import pytest

from grpo_scale.tasks import ProblemStream
from grpo_scale.tasks.column import column_trace, has_carry, with_column_solution


@pytest.mark.parametrize("q, trace, value", [
    ("47+38", "7+8=15, 4+3+1=8", 85),             # 7+8 carries one into 4+3
    ("83-47", "13-7=6, 8-1-4=3", 36),             # 3<7: borrow ten, tens lose one
    ("47-83", "83-47: 13-7=6, 8-1-4=3, so -36", -36),
    ("64*4", "4*4=16, 6*4+1=25", 256),
    ("52-48", "12-8=4, 5-1-4=0", 4),              # a zero tens digit disappears from the answer
    ("99+99", "9+9=18, 9+9+1=19", 198),
])
def test_hand_traces(q, trace, value):
    x, op, y = q[:2].rstrip("+-*"), q[len(q[:2].rstrip("+-*"))], q[len(q[:2].rstrip("+-*")) + 1:]
    assert column_trace(int(x), op, int(y)) == (trace, value)


def test_every_small_problem_is_right():
    for op in "+-":
        for x in range(100):
            for y in range(100):
                assert column_trace(x, op, y)[1] == (x + y if op == "+" else x - y)
    for x in range(100):
        for y in range(10):
            assert column_trace(x, "*", y)[1] == x * y


def test_slips_drop_the_carry_and_only_where_there_is_one():
    assert column_trace(47, "+", 38, slip=True) == ("7+8=15, 4+3=7", 75)
    assert column_trace(83, "-", 47, slip=True) == ("13-7=6, 8-4=4", 46)
    for x in range(100):
        for y in range(100):
            if not has_carry(x, "+", y):
                assert column_trace(x, "+", y, slip=True) == column_trace(x, "+", y)


def test_rows_from_the_generators():
    rng = random.Random(0)
    rows = ProblemStream({"arithmetic": 1}, [1, 2], 0).take(2000)
    clean = [with_column_solution(r) for r in rows]
    assert all(c["answer"] == r["answer"] for c, r in zip(clean, rows))
    noisy = [with_column_solution(r, rng, slip_rate=0.5) for r in rows]
    slipped = [n for n, r in zip(noisy, rows) if n["answer"] != r["answer"]]
    operands = [re.match(r"Solve (\d+)([+\-*])(\d+)$", r["prompt"]).groups() for r in rows]
    carries = [1 for x, op, y in operands if has_carry(int(x), op, int(y))]
    assert 0.4 < len(slipped) / len(carries) < 0.6  # about half the carries slip at slip_rate 0.5
    bracketed = {"prompt": "Solve 8*(3+6)", "answer": "72", "solution": "3+6=9, 8*9=72"}
    assert with_column_solution(bracketed, rng, 1.0) is bracketed  # not a two-operand problem: unchanged
