"""Reward functions, the registry that names them, and how their scores combine.

**Contract** (TRL's, so reward functions move between the two):

    fn(prompts, completions, completion_ids, trainer_state, log_metric, log_extra, **columns)
        -> list[float | None]

``prompts`` are as the data set has them: strings (standard format) or lists of ``{"role", "content"}``
messages (conversational format). ``completions`` match: strings for standard data, and
``[{"role": "assistant", "content": text}]`` for conversational data. ``completion_ids`` are the sampled
token ids (lists of ints, padding removed); ``trainer_state`` has ``global_step`` and ``max_steps``;
``log_metric(name, value)`` logs a scalar with the step's metrics (mean over the batch's calls and the
ranks) and ``log_extra(name, values)`` a column next to the logged sample completions. ``columns`` are the
data set's other fields, one list per field (``answer=[...]``). Arguments are passed by keyword, as TRL
does; a function without ``**kwargs`` receives only the arguments it names. ``async def`` functions are
awaited. ``None`` (or NaN) for an item means "no opinion": the item is missing for that function.

Built-ins (the reply they judge is the opened assistant turn, if the prompt opens one, then the completion):

- ``format`` (1.0 or 0.0): the reply is ``<think>...</think>`` then ``<answer>...</answer>`` and nothing
  else, whitespace aside; exactly one of each tag, and the answer is not empty.
- ``format_graded``: a quarter for each of the four checks ``format`` makes (``format_parts``), for a
  model that does not know the format yet.
- ``correctness`` (1.0 or 0.0): the content of the last complete ``<answer>...</answer>``, in simplest
  form (``safe_math.is_simplified``), equals the row's ``answer`` as a polynomial in x (numbers are
  constants): ``-59.0`` == ``-59``, ``6+9x+3x^2`` == ``3*x**2+9*x+6``. Only a bare, worked-out expression
  counts: ``The final answer is -57`` and ``1-17`` score 0 (see ``grpo_scale.safe_math`` for the accepted
  notation and bounds). A row whose expected answer does not parse is missing (None), not 0, so bad
  data does not punish the model.
- ``correctness_lenient``: as ``correctness``, with the answer read by ``lenient_answer`` (prose around
  it allowed; without an answer block, the reply's final expression).
- ``soft_overlong_punishment``: DAPO's overlong shaping (TRL's ``get_soft_overlong_punishment``), from the
  completion's length in tokens alone. Parameters in the name, with TRL's names:
  ``soft_overlong_punishment(max_completion_len=512, soft_punish_cache=128)``; by default
  ``max_completion_len`` is the config's ``max_completion_length`` and ``soft_punish_cache`` a fifth of it
  (DAPO's 4,096 of 20,480).

Combination (TRL's semantics): ``total = nansum_f(weight_f * reward_f)``, skipping missing values. A
completion that no function scored gets total NaN, and the advantage code gives it advantage 0.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import logging
import math
import numbers
import os
import re
import sys
from fractions import Fraction
from typing import Callable, Iterable, Sequence

from grpo_scale import safe_math
from grpo_scale.tasks.prompts import is_conversational

logger = logging.getLogger(__name__)

RewardFunc = Callable[..., list]

_ANSWER_TAG = re.compile(r"(</?answer>)")


# ----------------------------------------------------------------------------- built-in rewards
def extract_answer(completion: str) -> str | None:
    """The stripped content of the last complete ``<answer>...</answer>`` block, or None.

    With nested or stray tags the innermost complete block counts: ``<answer>a<answer>b</answer>``
    gives ``b``; an unclosed ``<answer>`` after a complete block is ignored.
    """
    if not isinstance(completion, str):
        return None
    parts = _ANSWER_TAG.split(completion)  # text, tag, text, tag, ..., text
    found, content = None, None
    for i in range(1, len(parts), 2):
        if parts[i] == "<answer>":
            content = parts[i + 1]
        elif content is not None:
            found, content = content, None
    return found.strip() if found is not None else None


def completion_text(completion) -> str | None:
    """The text of a completion in either format: a string as is; for conversational data (a list of
    messages) the content of the last message. None for anything else."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content")
        return content if isinstance(content, str) else None
    return None


def opened_reply(prompt) -> str:
    """The text a conversational prompt already put in the assistant's mouth: the content of its last
    message when that is the assistant's (the reply is continued from there, as TRL does), else ''.
    An R1-style prompt opens the reply with ``<think>`` (``assistant_prefix``)."""
    if is_conversational(prompt) and prompt and prompt[-1].get("role") == "assistant":
        content = prompt[-1].get("content")
        return content if isinstance(content, str) else ""
    return ""


def reply_text(prompt, completion) -> str | None:
    """The whole reply the built-ins judge: the opened assistant turn (``opened_reply``) and then the
    completion's text. None when the completion has no text."""
    text = completion_text(completion)
    return None if text is None else opened_reply(prompt) + text


_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def format_parts(reply: str) -> tuple[bool, bool, bool, bool]:
    """The four checks ``format_graded`` gives a quarter each (``format`` wants all four), on the reply
    with surrounding whitespace removed, every tag required exactly once:

    1. ``<think>`` opens the reply;
    2. ``</think>`` comes after ``<think>``;
    3. ``<answer>`` follows ``</think>`` with only whitespace between;
    4. ``</answer>`` follows a non-empty answer and ends the reply.
    """
    if not isinstance(reply, str):
        return False, False, False, False
    s = reply.strip()
    once = {tag: s.count(tag) == 1 for tag in _TAGS}
    at = {tag: s.find(tag) for tag in _TAGS}
    think = once["<think>"] and at["<think>"] == 0
    think_end = once["</think>"] and at["</think>"] > at["<think>"] >= 0
    answer = once["<answer>"] and think_end and not s[at["</think>"] + len("</think>"):at["<answer>"]].strip() \
        and at["<answer>"] > at["</think>"]
    answer_end = once["</answer>"] and once["<answer>"] and s.endswith("</answer>") and \
        at["</answer>"] > at["<answer>"] and bool(s[at["<answer>"] + len("<answer>"):at["</answer>"]].strip())
    return think, think_end, answer, answer_end


def format_reward(prompts: list, completions: list, **kwargs) -> list[float]:
    """1.0 for ``<think>...</think> <answer>...</answer>`` (whitespace around allowed), else 0.0."""
    return [1.0 if all(format_parts(reply_text(p, c))) else 0.0 for p, c in zip(prompts, completions)]


def format_graded_reward(prompts: list, completions: list, **kwargs) -> list[float]:
    """0.25 for each of ``format_parts``' four checks: 1.0 exactly when ``format`` gives 1.0, and partial
    credit for a reply on its way there (``<think>...</think> 42`` scores 0.5)."""
    return [0.25 * sum(format_parts(reply_text(p, c))) for p, c in zip(prompts, completions)]


def _expected_polynomial(value) -> dict | None:
    """The expected answer as a polynomial; None when it is missing or cannot be read."""
    if isinstance(value, str):
        return safe_math.parse_polynomial(value)
    if isinstance(value, bool) or not isinstance(value, (int, float, Fraction)):
        return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        value = Fraction(repr(value))  # the decimal the data shows (0.1 -> 1/10), not its binary value
    return {0: Fraction(value)} if value else {}


def strict_answer(reply: str | None) -> dict | None:
    """``correctness``'s reading: the last complete answer block, in simplest form, as a polynomial."""
    given = extract_answer(reply)
    if given is None or not safe_math.is_simplified(given):
        return None
    return safe_math.parse_polynomial(given)


_LENIENT_TAIL = 1000  # characters of a reply the lenient reading looks at (from its end): bounded work
# maximal runs of the characters an expression is written with; possessive, so matching never backtracks
_RUN = re.compile(r"[-+−–*^()\dx²³ .]++")


def _expression_runs(text: str) -> list[str]:
    """The expressions written inside prose, in order: maximal runs of expression characters, with an
    ``x`` that touches a letter dropped (it belongs to a word: "expansion", "six"). Linear time."""
    runs = []
    for m in _RUN.finditer(text):
        run = m.group(0)
        if m.start() > 0 and text[m.start() - 1].isalpha():
            run = run.lstrip("x")
        if m.end() < len(text) and text[m.end()].isalpha():
            run = run.rstrip("x")
        if any(c.isdigit() or c in "x²³" for c in run):
            runs.append(run)
    return runs


def _unwrapped(text: str) -> str:
    """``text`` without surrounding whitespace, ``$...$``, ``\\boxed{...}`` or trailing punctuation."""
    t = text.strip().rstrip(".,;!").strip()
    if t.startswith("\\boxed{") and t.endswith("}"):
        t = t[len("\\boxed{"):-1]
    return t.strip("$").strip().rstrip(".,;!").strip()


def lenient_answer(reply: str | None) -> dict | None:
    """``correctness_lenient``'s reading of a reply, for a model that knows the arithmetic but not (yet)
    the format. The region read is the last complete ``<answer>`` block; else the text after an unclosed
    ``<answer>``; else the text after ``</think>``; else the whole reply (its last 1,000 characters). In
    it, the first of these that is in simplest form (``safe_math.is_simplified``) is the answer:

    1. the whole region, without ``$...$``, ``\\boxed{...}`` or trailing punctuation
       (``<answer>-57.</answer>``);
    2. what follows its last ``=`` (``7 + 18 = 25``);
    3. its last expression in prose, letters other than x ending it (``The final answer is -57``).

    So ``<answer> The final answer is -57 </answer>`` reads -57; restating the question (``The answer is
    1-17.``) is still no answer.
    """
    if not isinstance(reply, str):
        return None
    region = extract_answer(reply)
    if region is None:
        for tag in ("<answer>", "</think>"):
            if tag in reply:
                region = reply.rsplit(tag, 1)[1]
                break
        else:
            region = reply
    region = region[-_LENIENT_TAIL:]
    candidates = [_unwrapped(region)]
    if "=" in region:
        candidates.append(_unwrapped(region.rsplit("=", 1)[1]))
    runs = _expression_runs(region)
    if runs:
        candidates.append(_unwrapped(runs[-1]))
    for text in candidates:
        if safe_math.is_simplified(text):
            return safe_math.parse_polynomial(text)
    return None


def _score_answers(prompts: list, completions: list, answer: list, read, what: str) -> list[float | None]:
    if len(answer) != len(completions):
        raise ValueError(f"{what} reward: {len(answer)} answers for {len(completions)} completions")
    expected: dict = {}  # the G completions of a group share an answer: parse it once
    out: list[float | None] = []
    for prompt, completion, target in zip(prompts, completions, answer):
        key = (type(target), target) if isinstance(target, (str, int, float)) else None
        if key is None or key not in expected:
            poly = _expected_polynomial(target)
            if key is not None:
                expected[key] = poly
        else:
            poly = expected[key]
        if poly is None:
            out.append(None)
            continue
        given = read(reply_text(prompt, completion))
        out.append(1.0 if given is not None and given == poly else 0.0)
    return out


def correctness_reward(prompts: list, completions: list, answer: list, **kwargs) -> list[float | None]:
    """1.0 when the last answer block, in simplest form, equals ``answer[i]`` as a polynomial; 0.0 when it
    does not (or there is no answer block, or it does not parse, or it is an unworked expression); None
    when ``answer[i]`` itself is unreadable."""
    return _score_answers(prompts, completions, answer, strict_answer, "correctness")


def correctness_lenient_reward(prompts: list, completions: list, answer: list, **kwargs) -> list[float | None]:
    """As ``correctness``, but the answer is read by ``lenient_answer``: inside ``<answer>`` prose is
    allowed, and without one the reply's final expression counts. Measures the skill apart from the format."""
    return _score_answers(prompts, completions, answer, lenient_answer, "correctness_lenient")


class SoftOverlongPunishment:
    """DAPO's overlong reward shaping (its Eq. 13), TRL's ``get_soft_overlong_punishment``: with
    L = len(completion_ids) (the sampled tokens, end-of-sequence token included, as TRL counts them),
    Lmax = max_completion_len and c = soft_punish_cache,

        0                  when L <= Lmax - c
        (Lmax - c - L) / c when Lmax - c < L <= Lmax   (down to -1 at L = Lmax)
        -1                 when L > Lmax

    It punishes completions near and past the limit and never rewards short ones. With c = 0 the middle
    case is empty (TRL divides by zero at L = Lmax; here L = Lmax scores 0). The sampler stops at
    max_completion_length, so with Lmax equal to it a completion cut at the limit scores -1. A class, not
    a closure, so it pickles."""
    __name__ = "soft_overlong_punishment_reward"  # TRL's name: the same metric keys

    def __init__(self, max_completion_len: int, soft_punish_cache: int):
        for name, v in (("max_completion_len", max_completion_len), ("soft_punish_cache", soft_punish_cache)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"soft_overlong_punishment: {name} must be a whole number >= 0, got {v!r}")
        if max_completion_len < 1 or soft_punish_cache > max_completion_len:
            raise ValueError(f"soft_overlong_punishment: need 0 <= soft_punish_cache <= max_completion_len and "
                             f"max_completion_len >= 1, got max_completion_len={max_completion_len}, "
                             f"soft_punish_cache={soft_punish_cache}")
        self.max_completion_len = max_completion_len
        self.soft_punish_cache = soft_punish_cache

    def __call__(self, completion_ids: list, **kwargs) -> list[float]:
        top, cache = self.max_completion_len, self.soft_punish_cache
        out = []
        for ids in completion_ids:
            n = len(ids)
            if n <= top - cache:
                out.append(0.0)
            elif n <= top:
                out.append((top - cache - n) / cache)
            else:
                out.append(-1.0)
        return out

    def __repr__(self) -> str:
        return (f"soft_overlong_punishment(max_completion_len={self.max_completion_len}, "
                f"soft_punish_cache={self.soft_punish_cache})")


def get_soft_overlong_punishment(max_completion_len: int, soft_punish_cache: int) -> SoftOverlongPunishment:
    """TRL's factory, with its name and parameters: ``reward_funcs=[get_soft_overlong_punishment(512, 128)]``."""
    return SoftOverlongPunishment(max_completion_len, soft_punish_cache)


def _overlong_from_name(params: dict, defaults: dict) -> SoftOverlongPunishment:
    top = params.get("max_completion_len", defaults.get("max_completion_length"))
    if top is None:
        raise ValueError("soft_overlong_punishment needs max_completion_len (no max_completion_length to default to)")
    return SoftOverlongPunishment(top, params.get("soft_punish_cache", top // 5))


BUILTIN_REWARDS: dict[str, RewardFunc] = {"format": format_reward, "correctness": correctness_reward,
                                           "format_graded": format_graded_reward,
                                           "correctness_lenient": correctness_lenient_reward}
# Built-ins with parameters: name -> (builder(params, defaults), the parameters it accepts). Named alone
# or as ``name(key=value, ...)`` with whole-number values.
BUILTIN_FACTORIES: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "soft_overlong_punishment": (_overlong_from_name, ("max_completion_len", "soft_punish_cache")),
}
_CALL = re.compile(r"([A-Za-z_]\w*)\s*\((.*)\)", re.S)
_PARAM = re.compile(r"\s*([A-Za-z_]\w*)\s*=\s*(\d{1,9})\s*")


# ----------------------------------------------------------------------------- calling
def call_reward(fn, **kwargs) -> list:
    """``fn(**kwargs)`` under the contract: a function without ``**kwargs`` gets only the arguments it
    names (TRL requires ``**kwargs``; a plain ``def f(completions, answer)`` works here too); an
    ``async def`` function is run to completion."""
    out = fn(**accepted_kwargs(fn, kwargs))
    if inspect.isawaitable(out):
        import asyncio
        out = asyncio.run(_awaited(out))
    return out


def accepted_kwargs(fn, kwargs: dict) -> dict:
    """The arguments of ``kwargs`` that ``fn`` takes (all of them when it takes ``**kwargs``)."""
    accepted = _accepted(fn)
    return kwargs if accepted is None else {k: v for k, v in kwargs.items() if k in accepted}


async def _awaited(awaitable):
    return await awaitable


def _accepted(fn) -> set | None:
    """The keyword names ``fn`` accepts, or None when it takes ``**kwargs`` (or has no signature); read
    once per function (the trainer calls it per batch, and per item when a batch raises)."""
    try:
        return _accepted_cached(fn)
    except TypeError:  # an unhashable callable
        return _signature_names(fn)


@functools.lru_cache(maxsize=256)
def _accepted_cached(fn) -> set | None:
    return _signature_names(fn)


def _signature_names(fn) -> set | None:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}


# ----------------------------------------------------------------------------- registry
def _import_user_function(name: str, where: str) -> RewardFunc:
    module_name, _, func_name = name.partition(":")
    if not module_name or not func_name:
        raise ValueError(f"{where}: {name!r} must look like 'module:function'")
    # Like `python -m`, the current directory is importable (launchers put the script's folder first).
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.split(".")[0] == e.name.split(".")[0]:
            raise ValueError(f"{where}: cannot import module {module_name!r}: no such module in the current "
                             f"directory ({cwd}) or on the Python path; run from the folder that holds "
                             f"{module_name.split('.')[0]}.py") from e
        raise ValueError(f"{where}: importing module {module_name!r} failed: {e}") from e
    except Exception as e:  # the user's module raised while importing: show what and where
        raise ValueError(f"{where}: importing module {module_name!r} failed: {type(e).__name__}: {e}") from e
    func = getattr(module, func_name, None)
    if func is None:
        raise ValueError(f"{where}: module {module_name!r} has no function {func_name!r}")
    if not callable(func):
        raise ValueError(f"{where}: {name!r} is a {type(func).__name__}, not a function")
    return func


def builtin_names() -> list[str]:
    """Every built-in reward's name, with or without parameters, for messages."""
    return sorted([*BUILTIN_REWARDS, *BUILTIN_FACTORIES])


def _called(name: str) -> tuple[str, re.Match | None]:
    """(the name before any parentheses, the ``name(...)`` match or None)."""
    call = _CALL.fullmatch(name)
    return (call.group(1) if call else name), call


def is_builtin(name: str) -> bool:
    """Whether ``name`` names a built-in reward (with or without parameters)."""
    name = name.strip()
    return name in BUILTIN_REWARDS or _called(name)[0] in BUILTIN_FACTORIES


def _builtin_with_params(name: str, where: str, defaults: dict) -> RewardFunc | None:
    """A built-in with parameters (``BUILTIN_FACTORIES``) named alone or as ``name(key=value, ...)``;
    None when ``name`` is not one. The parameters are parsed, never evaluated."""
    base, call = _called(name)
    if base not in BUILTIN_FACTORIES:
        return None
    build, accepted = BUILTIN_FACTORIES[base]
    params: dict = {}
    for item in (call.group(2).split(",") if call and call.group(2).strip() else []):
        m = _PARAM.fullmatch(item)
        usage = f"write {base}({', '.join(f'{a}=N' for a in accepted)}) with whole numbers N"
        if not m:
            raise ValueError(f"{where}: in {name!r}, {item.strip()!r} is not 'parameter=N' with a whole number N; "
                             f"{usage}")
        if m.group(1) not in accepted:
            raise ValueError(f"{where}: in {name!r}, {m.group(1)!r} is not a parameter of {base}; {usage}")
        if m.group(1) in params:
            raise ValueError(f"{where}: {name!r} gives {m.group(1)} twice")
        params[m.group(1)] = int(m.group(2))
    try:
        return build(params, defaults)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def get_reward_funcs(names: Sequence[str], defaults: dict | None = None) -> list[RewardFunc]:
    """The reward functions for config names: a built-in (``BUILTIN_REWARDS``; ``BUILTIN_FACTORIES``
    with their parameters, which default from ``defaults``, the config's values) or ``module:function``
    imported from the user's code. Raises ValueError naming the bad entry."""
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise ValueError(f"reward_funcs must be a list of names such as ['correctness', 'format'], got {names!r}")
    if not names:
        raise ValueError("reward_funcs is empty: name at least one reward function")
    funcs = []
    for i, name in enumerate(names):
        where = f"reward_funcs[{i}]"
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{where}: expected a name such as 'correctness' or 'module:function', got {name!r}")
        name = name.strip()
        if name in BUILTIN_REWARDS:
            funcs.append(BUILTIN_REWARDS[name])
        elif (func := _builtin_with_params(name, where, defaults or {})) is not None:
            funcs.append(func)
        elif ":" in name:
            funcs.append(_import_user_function(name, where))
        else:
            raise ValueError(f"{where}: unknown reward {name!r}; built-ins are {builtin_names()}, "
                             "or name your own as 'module:function'")
    return funcs


PASSED = ("prompts", "completions", "completion_ids", "trainer_state", "log_metric", "log_extra")


def required_columns(func: RewardFunc) -> list[str]:
    """Data columns ``func`` cannot run without: its parameters without a default, besides the
    arguments every call passes (``correctness_reward`` -> ['answer'])."""
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):  # some builtins and C callables have no signature
        return []
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in params
            if p.kind in kinds and p.default is inspect.Parameter.empty and p.name not in PASSED]


def check_reward_columns(funcs: Sequence[RewardFunc], names: Sequence[str], columns: Iterable[str]) -> None:
    """Raise ValueError before training when a reward function needs a column the data lacks."""
    have = set(columns)
    for func, name in zip(funcs, names):
        missing = [c for c in required_columns(func) if c not in have]
        if missing:
            raise ValueError(f"reward {name!r} needs the column(s) {missing}, which the data does not have "
                             f"(columns: {', '.join(sorted(have)) or 'none'}); add them or choose another reward")


# ----------------------------------------------------------------------------- combination
def _func_name(func) -> str:
    module = getattr(func, "__module__", None)
    name = getattr(func, "__name__", None)
    if name is None:
        return repr(func)
    return name if module in (None, __name__) else f"{module}:{name}"


def _as_floats(out, n: int, name: str) -> list[float]:
    """One float per completion, NaN for missing; ValueError for a result of the wrong shape or type."""
    if hasattr(out, "tolist") and not isinstance(out, (list, tuple)):  # torch / numpy arrays
        out = out.tolist()
    if not isinstance(out, (list, tuple)):
        raise ValueError(f"reward function {name} returned {type(out).__name__}; return a list with one "
                         "float (or None) per completion")
    if len(out) != n:
        raise ValueError(f"reward function {name} returned {len(out)} rewards for {n} completions; return "
                         "one float (or None) per completion")
    values = []
    for i, v in enumerate(out):
        if v is None:
            values.append(math.nan)
            continue
        if isinstance(v, (str, bytes)) or not hasattr(v, "__float__"):
            raise ValueError(f"reward function {name} returned {type(v).__name__} {v!r} for completion {i}; "
                             "return a float or None")
        x = float(v)
        if math.isinf(x):
            logger.warning("reward function %s returned %s for completion %d; counted as missing", name, x, i)
            x = math.nan
        values.append(x)
    return values


def compute_rewards(funcs: Sequence[RewardFunc], weights: Sequence[float] | None, prompts: list,
                    completions: list, columns: dict[str, list], *, names: Sequence[str] | None = None,
                    extras: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Score N completions with F reward functions and combine them.

    Each function is called as ``fn(prompts=..., completions=..., **extras, **columns)`` through
    ``call_reward`` (columns named ``prompt`` or ``completion`` are not passed; the prompt arrives as
    ``prompts``); ``extras`` are the contract's other arguments (completion_ids, trainer_state, ...). A function that raises is
    logged and counts as missing for every item of this call; None and NaN items are missing; a
    wrong-length or non-numeric result raises ValueError naming the function.

    weights: F floats, or None for all 1.0. names: F labels for messages (default: the functions' names).
    Returns (per_func [N, F] float32 with NaN for missing, total [N] float32): total is the weighted sum
    over the functions that scored the item, NaN when none did (its advantage is then 0).
    """
    import torch  # here, not at the top: reward worker processes import this module and need no torch
    n, f = len(completions), len(funcs)
    if f == 0:
        raise ValueError("no reward functions: name at least one in reward_funcs")
    if len(prompts) != n:
        raise ValueError(f"{len(prompts)} prompts for {n} completions: pass one prompt per completion")
    weights = [1.0] * f if weights is None else list(weights)
    if len(weights) != f or not all(isinstance(w, numbers.Real) and math.isfinite(w) for w in weights):
        raise ValueError(f"reward_weights must be {f} finite numbers (one per reward function), got {weights}")
    names = [_func_name(fn) for fn in funcs] if names is None else list(names)
    for key, values in columns.items():
        if key in PASSED:
            raise ValueError(f"data column {key!r} clashes with the reward argument of that name; rename the column")
        if len(values) != n:
            raise ValueError(f"data column {key!r} has {len(values)} values for {n} completions")
    kwargs = {k: v for k, v in columns.items() if k not in ("prompt", "completion")}

    per_func = torch.full((n, f), math.nan, dtype=torch.float32)
    for j, fn in enumerate(funcs):
        try:
            out = call_reward(fn, prompts=prompts, completions=completions, **(extras or {}), **kwargs)
        except Exception as e:  # the contract: a failing reward never stops training
            logger.warning("reward function %s raised %s: %s; its rewards count as missing for these %d "
                           "completions", names[j], type(e).__name__, e, n)
            continue
        per_func[:, j] = torch.tensor(_as_floats(out, n, names[j]), dtype=torch.float32)

    weighted = per_func * torch.tensor(weights, dtype=torch.float32)  # NaN * w stays NaN, then skipped
    total = torch.nansum(weighted, dim=1)
    total[torch.isnan(per_func).all(dim=1)] = math.nan
    return per_func, total
