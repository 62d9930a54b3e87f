"""Column-method worked solutions for two-operand arithmetic, with an optional carry slip.

The embedded demo model is warm-started on these traces: units column first, then the tens column with
its carry or borrow, so a small model computes one digit at a time instead of guessing a whole number:

    Solve 47+38   ->  7+8=15, 4+3+1=8            answer 85
    Solve 83-47   ->  13-7=6, 8-1-4=3            answer 36
    Solve 47-83   ->  83-47: 13-7=6, 8-1-4=3, so -36
    Solve 64*4    ->  4*4=16, 6*4+1=25           answer 256

A *slip* is the classic mistake of a hurried student: the tens column drops the carry (or the borrow),
and the answer follows the slipped trace (47+38 -> "7+8=15, 4+3=7", answer 75). Warm-starting on
demonstrations where a fraction of the carries slip gives a model that knows the method but applies it
unreliably: it samples both right and wrong answers for the same question, which is what GRPO with a
correctness reward can fix. Only problems with a carry or borrow can slip.
"""
from __future__ import annotations

import random
import re

_TWO_OPERANDS = re.compile(r"^Solve (\d+)([+\-*])(\d+)$")


def has_carry(x: int, op: str, y: int) -> bool:
    """Whether x op y (y a single digit for '*') needs a carry or borrow into the tens column."""
    if op == "-" and x < y:
        x, y = y, x
    if op == "+":
        return x % 10 + y % 10 >= 10
    if op == "-":
        return x % 10 < y % 10
    return (x % 10) * y >= 10


def column_trace(x: int, op: str, y: int, slip: bool = False) -> tuple[str, int]:
    """(trace, value) of x op y worked column by column (x, y < 100; y < 10 for '*').

    With ``slip`` the tens column ignores the carry or borrow, and the value is the slipped one.
    """
    if op == "-" and x < y:
        trace, value = column_trace(y, "-", x, slip)
        return (f"{y}-{x}: {trace}, so {-value}" if value else f"{y}-{x}: {trace}"), -value
    x0, x1, y0, y1 = x % 10, x // 10, y % 10, y // 10
    if op == "+":
        units = x0 + y0
        carry = units // 10
        tens = x1 + y1 + (0 if slip else carry)
        second = f"{x1}+{y1}+{carry}={tens}" if carry and not slip else f"{x1}+{y1}={tens}"
        return f"{x0}+{y0}={units}, {second}", tens * 10 + units % 10
    if op == "-":
        borrow = int(x0 < y0)
        units = x0 + 10 * borrow - y0
        tens = x1 - (0 if slip else borrow) - y1
        second = f"{x1}-{borrow}-{y1}={tens}" if borrow and not slip else f"{x1}-{y1}={tens}"
        return f"{x0 + 10 * borrow}-{y0}={units}, {second}", tens * 10 + units
    if op == "*":
        product = x0 * y
        carry = product // 10
        tens = x1 * y + (0 if slip else carry)
        second = f"{x1}*{y}+{carry}={tens}" if carry and not slip else f"{x1}*{y}={tens}"
        return f"{x0}*{y}={product}, {second}", tens * 10 + product % 10
    raise ValueError(f"unknown operator {op!r}")


def with_column_solution(row: dict, rng: random.Random | None = None, slip_rate: float = 0.0) -> dict:
    """The row with a column-method ``solution`` (and, when it slips, the slipped ``answer``).

    Rows that are not 'Solve a+b' / 'a-b' / 'a*b' with operands below 100 (b < 10 for '*') come back
    unchanged. A row with a carry slips with probability ``slip_rate`` (drawn from ``rng``).
    """
    m = _TWO_OPERANDS.match(row["prompt"])
    if not m:
        return row
    x, op, y = int(m.group(1)), m.group(2), int(m.group(3))
    if x >= 100 or y >= 100 or (op == "*" and y >= 10):
        return row
    slip = rng is not None and slip_rate > 0 and has_carry(x, op, y) and rng.random() < slip_rate
    trace, value = column_trace(x, op, y, slip)
    if not slip and str(value) != row["answer"]:
        raise AssertionError(f"column trace of {row['prompt']} gives {value}, expected {row['answer']}")
    return {**row, "solution": trace, "answer": str(value)}
