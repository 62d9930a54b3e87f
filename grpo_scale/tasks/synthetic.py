"""Seeded synthetic math problems: arithmetic evaluation and polynomial expansion.

Every problem is a row ``{"prompt", "answer", "task", "level", "solution"}``:

    {"prompt": "Solve 78-(3*(47-2)+2)", "answer": "-59", "task": "arithmetic", "level": 4,
     "solution": "47-2=45, 3*45=135, 135+2=137, 78-137=-59"}
    {"prompt": "Expand 3*(x+1)*(x+2)", "answer": "3x^2+9x+6", "task": "polynomial", "level": 3,
     "solution": "(x+1)*(x+2)=x^2+3x+2, 3*(x^2+3x+2)=3x^2+9x+6"}

Answers are computed from the generator's own expression tree (never by evaluating a string).
``solution`` is a worked trace, used only by supervised warm starts.

Difficulty levels (1 = easiest):

    arithmetic  1: a+b, a-b with operands below 20        3: three operands, one bracket
                2: a+b, a-b below 100, a*b with b <= 9    4: four or five operands, nested brackets
    polynomial  1: k*(x+a)       2: (x+a)*(x+b)          3: k*(x+a)*(x+b)       4: (x+a)*(x+b)*(x+c)

Training prompts come from a ``ProblemStream`` (infinite, seeded, resumable by position) that never
yields a question of the held-out evaluation set.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterable

TASKS = ("arithmetic", "polynomial")
LEVELS = (1, 2, 3, 4)


# ----------------------------------------------------------------------------- arithmetic
@dataclass
class _Node:
    op: str | None = None  # None for a leaf
    value: int = 0
    left: "_Node | None" = None
    right: "_Node | None" = None


_PREC = {"+": 1, "-": 1, "*": 2}


def _apply(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _render(node: _Node) -> str:
    if node.op is None:
        return str(node.value)
    left, right = _render(node.left), _render(node.right)
    if node.left.op is not None and _PREC[node.left.op] < _PREC[node.op]:
        left = f"({left})"
    r = node.right.op
    # a-(b+c) and a*(b+c) need brackets; a+(b*c) and a*(b*c) do not.
    if r is not None and (_PREC[r] < _PREC[node.op] or (node.op == "-" and _PREC[r] == 1)):
        right = f"({right})"
    return f"{left}{node.op}{right}"


def _evaluate(node: _Node, steps: list[str]) -> int:
    """Value of the tree; appends one 'a op b=v' step per operator, innermost first."""
    if node.op is None:
        return node.value
    a, b = _evaluate(node.left, steps), _evaluate(node.right, steps)
    v = _apply(node.op, a, b)
    bs = f"({b})" if b < 0 else str(b)
    steps.append(f"{a}{node.op}{bs}={v}")
    return v


def _random_tree(rng: random.Random, n_leaves: int, hi: int) -> _Node:
    if n_leaves == 1:
        return _Node(value=rng.randrange(1, hi))
    k = rng.randrange(1, n_leaves)
    node = _Node(op=rng.choice("+-*"), left=_random_tree(rng, k, hi), right=_random_tree(rng, n_leaves - k, hi))
    if node.op == "*":  # keep products small: a leaf factor is a single digit
        for child in (node.left, node.right):
            if child.op is None:
                child.value = rng.randrange(2, 10)
    return node


def arithmetic_problem(rng: random.Random, level: int) -> dict:
    if level == 1:
        tree = _Node(op=rng.choice("+-"), left=_Node(value=rng.randrange(20)), right=_Node(value=rng.randrange(20)))
    elif level == 2:
        op = rng.choice("+-*")
        b_hi = 10 if op == "*" else 100
        tree = _Node(op=op, left=_Node(value=rng.randrange(100)), right=_Node(value=rng.randrange(b_hi)))
    elif level == 3:
        tree = _random_tree(rng, 3, 50)
        while "(" not in _render(tree):
            tree = _random_tree(rng, 3, 50)
    else:
        tree = _random_tree(rng, rng.choice((4, 5)), 100)
        while _render(tree).count("(") < 2:
            tree = _random_tree(rng, rng.choice((4, 5)), 100)
    steps: list[str] = []
    value = _evaluate(tree, steps)
    return {"prompt": f"Solve {_render(tree)}", "answer": str(value), "task": "arithmetic", "level": level,
            "solution": ", ".join(steps)}


# ----------------------------------------------------------------------------- polynomials
Poly = dict  # power -> integer coefficient


def _poly_mul(p: Poly, q: Poly) -> Poly:
    out: Poly = {}
    for i, a in p.items():
        for j, b in q.items():
            out[i + j] = out.get(i + j, 0) + a * b
    return {k: v for k, v in out.items() if v != 0}


def format_poly(p: Poly) -> str:
    """Canonical text of a polynomial in x: descending powers, no '*', '^' for powers: 3x^2+9x+6."""
    terms = []
    for power in sorted(p, reverse=True):
        c = p[power]
        if c == 0:
            continue
        sign = "-" if c < 0 else "+"
        mag = abs(c)
        body = "" if (mag == 1 and power > 0) else str(mag)
        if power >= 1:
            body += "x" if power == 1 else f"x^{power}"
        terms.append((sign, body))
    if not terms:
        return "0"
    text = ("-" if terms[0][0] == "-" else "") + terms[0][1]
    return text + "".join(s + b for s, b in terms[1:])


def _linear(rng: random.Random) -> tuple[str, Poly]:
    a = rng.choice([i for i in range(-9, 10) if i != 0])
    return (f"(x+{a})" if a > 0 else f"(x-{-a})"), {1: 1, 0: a}


def polynomial_problem(rng: random.Random, level: int) -> dict:
    n_factors = {1: 1, 2: 2, 3: 2, 4: 3}[level]
    k = rng.randrange(2, 10) if level in (1, 3) else 1
    factors = [_linear(rng) for _ in range(n_factors)]
    steps = []
    text, acc = factors[0]
    for f_text, f_poly in factors[1:]:
        new = _poly_mul(acc, f_poly)
        steps.append(f"{text}*{f_text}={format_poly(new)}")
        text, acc = f"({format_poly(new)})", new
    if k != 1:
        new = _poly_mul({0: k}, acc)
        steps.append(f"{k}*{text}={format_poly(new)}")
        acc = new
    expr = (f"{k}*" if k != 1 else "") + "*".join(t for t, _ in factors)
    return {"prompt": f"Expand {expr}", "answer": format_poly(acc), "task": "polynomial", "level": level,
            "solution": ", ".join(steps)}


_GENERATORS = {"arithmetic": arithmetic_problem, "polynomial": polynomial_problem}


# ----------------------------------------------------------------------------- streams and splits
def normalize_mix(task_mix: dict[str, float]) -> list[tuple[str, float]]:
    """[(task, probability)] with probabilities summing to 1; unknown tasks raise ValueError."""
    unknown = sorted(set(task_mix) - set(TASKS))
    if unknown:
        raise ValueError(f"task_mix: unknown task(s) {unknown}; known tasks are {list(TASKS)}")
    if any(w < 0 for w in task_mix.values()) or sum(task_mix.values()) <= 0:
        raise ValueError(f"task_mix: weights must be >= 0 with a positive sum, got {task_mix}")
    total = sum(task_mix.values())
    return [(t, w / total) for t, w in sorted(task_mix.items()) if w > 0]


def _levels(level: int | Iterable[int]) -> tuple[int, ...]:
    levels = (level,) if isinstance(level, int) else tuple(level)
    bad = [lv for lv in levels if lv not in LEVELS]
    if bad or not levels:
        raise ValueError(f"task level(s) {bad or levels} not in {list(LEVELS)}")
    return levels


def sample_problem(rng: random.Random, mix: list[tuple[str, float]], levels: tuple[int, ...]) -> dict:
    r, task = rng.random(), mix[-1][0]
    for name, p in mix:
        if r < p:
            task = name
            break
        r -= p
    return _GENERATORS[task](rng, rng.choice(levels))


def make_eval_set(task_mix: dict[str, float], level, n: int, seed: int) -> list[dict]:
    """n distinct held-out problems, split over tasks in proportion to the mix (deterministic).

    Each task draws from its own generator, so a smaller evaluation set of the same task is a prefix
    of a larger one: data built to avoid ``make_eval_set(mix, level, 1000, seed)`` avoids every
    evaluation set of up to 1000 problems per task.
    """
    mix, levels = normalize_mix(task_mix), _levels(level)
    counts = [round(n * p) for _, p in mix]
    counts[-1] = n - sum(counts[:-1])
    rows = []
    for (task, _), count in zip(mix, counts):
        rng = random.Random(f"grpo-scale-eval-{seed}-{task}-{levels}")
        seen: set[str] = set()
        for _ in range(100 * max(count, 1)):
            if len(seen) == count:
                break
            row = _GENERATORS[task](rng, rng.choice(levels))
            if row["prompt"] not in seen:
                seen.add(row["prompt"])
                rows.append(row)
        if len(seen) < count:
            raise ValueError(f"cannot draw {count} distinct {task} problems at level(s) {list(levels)}; "
                             "lower eval_size or raise task_level")
    return rows


class ProblemStream:
    """Infinite seeded stream of training problems that skips every question in ``exclude``.

    The stream is a pure function of (mix, levels, seed, exclude): ``state_dict()`` is the number of
    problems taken, and ``load_state_dict`` replays the stream to that position.
    """

    def __init__(self, task_mix: dict[str, float], level, seed: int, exclude: Iterable[str] = ()):
        self.mix, self.levels, self.seed = normalize_mix(task_mix), _levels(level), seed
        self.exclude = frozenset(exclude)
        self._rng = random.Random(f"grpo-scale-train-{seed}")
        self.position = 0

    def __next__(self) -> dict:
        for _ in range(10_000):
            row = sample_problem(self._rng, self.mix, self.levels)
            if row["prompt"] not in self.exclude:
                self.position += 1
                return row
        raise RuntimeError("the training stream keeps hitting held-out questions; raise the task level")

    def __iter__(self):
        return self

    def take(self, n: int) -> list[dict]:
        return [next(self) for _ in range(n)]

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"data state was saved with seed {state['seed']}, this run uses {self.seed}")
        self._rng = random.Random(f"grpo-scale-train-{self.seed}")
        self.position = 0
        self.take(int(state["position"]))
