"""Synthetic generators: determinism, answers that check out, held-out disjointness, resumable streams."""
import random
from fractions import Fraction

import pytest

from grpo_scale.tasks import LEVELS, TASKS, ProblemStream, format_poly, make_eval_set
from grpo_scale.tasks.stream import RowStream
from grpo_scale.tasks.synthetic import arithmetic_problem, polynomial_problem


def _eval_int(expr: str) -> int:
    """A tiny independent evaluator for the generator's own output (digits, + - * and brackets only)."""
    tokens = expr.replace("(", " ( ").replace(")", " ) ").replace("+", " + ").replace("-", " - ").replace("*", " * ").split()
    pos = 0

    def atom():
        nonlocal pos
        tok = tokens[pos]
        pos += 1
        if tok == "-":
            return -atom()
        if tok == "(":
            v = add()
            pos += 1
            return v
        return int(tok)

    def mul():
        nonlocal pos
        v = atom()
        while pos < len(tokens) and tokens[pos] == "*":
            pos += 1
            v *= atom()
        return v

    def add():
        nonlocal pos
        v = mul()
        while pos < len(tokens) and tokens[pos] in "+-":
            op = tokens[pos]
            pos += 1
            v = v + mul() if op == "+" else v - mul()
        return v

    return add()


@pytest.mark.parametrize("level", LEVELS)
def test_arithmetic_answers_are_right(level):
    rng = random.Random(level)
    for _ in range(300):
        row = arithmetic_problem(rng, level)
        assert row["prompt"].startswith("Solve ")
        assert _eval_int(row["prompt"][6:]) == int(row["answer"]), row
        # the worked trace ends with the answer
        assert row["solution"].split("=")[-1] == row["answer"]


@pytest.mark.parametrize("level", LEVELS)
def test_polynomial_answers_are_right(level):
    rng = random.Random(level)
    for _ in range(200):
        row = polynomial_problem(rng, level)
        expr = row["prompt"][len("Expand "):]
        # check at several points x: expand by evaluating the product directly
        for x in (-3, -1, 0, 2, 5):
            lhs = _eval_int(expr.replace("x", f"({x})"))
            # canonical answer text -> value at x, by parsing "3x^2+9x+6"-style terms
            text = row["answer"].replace("-", "+-")
            val = 0
            for term in filter(None, text.split("+")):
                if "x" in term:
                    coef, _, power = term.partition("x")
                    coef = {"": 1, "-": -1}.get(coef, coef)
                    val += int(coef) * x ** (int(power[1:]) if power else 1)
                else:
                    val += int(term)
            assert lhs == val, row


def test_format_poly():
    assert format_poly({2: 3, 1: 9, 0: 6}) == "3x^2+9x+6"
    assert format_poly({2: -1, 0: 1}) == "-x^2+1"
    assert format_poly({1: 1}) == "x" and format_poly({}) == "0" and format_poly({3: 1, 1: -2}) == "x^3-2x"


def test_generators_are_deterministic():
    a = ProblemStream({"arithmetic": 1, "polynomial": 1}, [1, 2, 3], seed=5).take(50)
    b = ProblemStream({"arithmetic": 1, "polynomial": 1}, [1, 2, 3], seed=5).take(50)
    c = ProblemStream({"arithmetic": 1, "polynomial": 1}, [1, 2, 3], seed=6).take(50)
    assert a == b and a != c
    assert make_eval_set({"arithmetic": 1}, [2], 64, 0) == make_eval_set({"arithmetic": 1}, [2], 64, 0)


@pytest.mark.parametrize("mix, level", [({"arithmetic": 1}, [1]), ({"arithmetic": 1}, [2]),
                                        ({"arithmetic": 1, "polynomial": 1}, [1, 2]), ({"polynomial": 1}, [3])])
def test_training_stream_never_yields_a_held_out_question(mix, level):
    held_out = make_eval_set(mix, level, 200, seed=0)
    assert len({r["prompt"] for r in held_out}) == 200
    stream = ProblemStream(mix, level, seed=1, exclude={r["prompt"] for r in held_out})
    train = {r["prompt"] for r in stream.take(3000)}
    assert not train & {r["prompt"] for r in held_out}


def test_smaller_eval_set_is_a_prefix_of_a_larger_one():
    """Warm-start data built to avoid 1000 eval problems per task avoids any smaller eval set."""
    small = make_eval_set({"arithmetic": 1, "polynomial": 1}, [2], 100, 0)
    large = make_eval_set({"arithmetic": 1, "polynomial": 1}, [2], 400, 0)
    by_task = lambda rows, t: [r["prompt"] for r in rows if r["task"] == t]
    for t in TASKS:
        assert by_task(large, t)[:len(by_task(small, t))] == by_task(small, t)


def test_eval_set_splits_by_mix_and_rejects_impossible_sizes():
    rows = make_eval_set({"arithmetic": 3, "polynomial": 1}, [2], 200, 0)
    assert sum(r["task"] == "arithmetic" for r in rows) == 150
    with pytest.raises(ValueError, match="distinct"):
        make_eval_set({"polynomial": 1}, [1], 5000, 0)  # only 8*18 level-1 expansions exist
    with pytest.raises(ValueError, match="unknown task"):
        make_eval_set({"geometry": 1}, [1], 10, 0)


@pytest.mark.parametrize("make", [
    lambda: ProblemStream({"arithmetic": 1, "polynomial": 1}, [1, 2], seed=3),
    lambda: RowStream([{"prompt": str(i)} for i in range(7)], seed=3),
], ids=["synthetic", "rows"])
def test_streams_resume_at_their_position(make):
    full = make().take(40)
    s = make()
    s.take(17)
    state = s.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    assert resumed.take(23) == full[17:]


def test_row_stream_covers_every_row_each_epoch():
    rows = [{"prompt": str(i)} for i in range(10)]
    s = RowStream(rows, seed=0)
    first, second = s.take(10), s.take(10)
    assert sorted(r["prompt"] for r in first) == sorted(r["prompt"] for r in rows)
    assert sorted(r["prompt"] for r in second) == sorted(r["prompt"] for r in rows) and first != second
