"""Built-in rewards, the reward registry and the combination of several reward functions."""
import logging
import math
import pickle
import sys
import time

import pytest
import torch

from grpo_scale.rewards import (check_reward_columns, compute_rewards, correctness_lenient_reward, correctness_reward,
                                extract_answer, format_graded_reward, format_reward, get_reward_funcs,
                                get_soft_overlong_punishment, lenient_answer, required_columns)
from grpo_scale.config import load_config
from grpo_scale.safe_math import is_simplified
from grpo_scale.tasks.synthetic import make_eval_set

NAN = math.nan


def wrap(answer: str, think: str = "some steps") -> str:
    return f"<think>{think}</think>\n<answer>{answer}</answer>"


# ----------------------------------------------------------------------------- extract_answer
@pytest.mark.parametrize("completion,expected", [
    ("<answer>-59</answer>", "-59"),
    ("<think>x</think><answer>  3x^2+9x+6 \n</answer>", "3x^2+9x+6"),
    ("<answer>1</answer> then <answer>2</answer>", "2"),                 # two blocks: the last
    ("<answer>1</answer> then <answer>2", "1"),                          # last block not closed
    ("<answer>a<answer>b</answer>c</answer>", "b"),                      # nested: innermost complete
    ("<answer>a</answer>b</answer>", "a"),                               # stray close tag
    ("<answer></answer>", ""),
    ("<answer>-59", None), ("-59</answer>", None), ("no tags at all", None), ("", None),
    ("<Answer>5</Answer>", None), ("</answer><answer>", None), (None, None), (59, None),
])
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


# ----------------------------------------------------------------------------- format
@pytest.mark.parametrize("completion,score", [
    ("<think>a</think><answer>1</answer>", 1.0),
    ("  \n<think>\nsteps\n</think>\n\n<answer> 3x^2 </answer>\n ", 1.0),
    ("<think></think><answer>1</answer>", 1.0),                          # empty reasoning is allowed
    ("<answer>1</answer>", 0.0),                                         # no think block
    ("<think>a</think>", 0.0),                                           # no answer block
    ("<think>a</think><answer>1</answer> so the answer is 1", 0.0),      # text after the answer
    ("Sure! <think>a</think><answer>1</answer>", 0.0),                   # text before the think block
    ("<think>a</think> so <answer>1</answer>", 0.0),                     # text between the blocks
    ("<answer>1</answer><think>a</think>", 0.0),                         # wrong order
    ("<think>a</think><answer>1</answer><answer>2</answer>", 0.0),       # two answers
    ("<think>a<think>b</think></think><answer>1</answer>", 0.0),         # nested tags
    ("<think>a</think><answer>  </answer>", 0.0),                        # empty answer
    ("<think>a</think><answer>1", 0.0),                                  # missing close tag
    ("<think>a<answer>1</answer>", 0.0),                                 # think never closed
    ("<think>a</think><answer>1</answer></think>", 0.0),
])
def test_format_reward(completion, score):
    assert format_reward(["p"], [completion]) == [score]


# ----------------------------------------------------------------------------- correctness
def test_correct_answers_of_every_synthetic_task_score_one():
    rows = make_eval_set({"arithmetic": 1, "polynomial": 1}, [1, 2, 3, 4], 60, seed=0)
    completions = [wrap(r["answer"]) for r in rows]
    prompts = [r["prompt"] for r in rows]
    assert correctness_reward(prompts, completions, answer=[r["answer"] for r in rows]) == [1.0] * len(rows)
    off_by_one = [wrap(r["answer"] + "+1") for r in rows]
    assert correctness_reward(prompts, off_by_one, answer=[r["answer"] for r in rows]) == [0.0] * len(rows)


@pytest.mark.parametrize("given,expected,score", [
    ("-59", "-59", 1.0), ("- 59", "-59", 1.0), ("-59.0", "-59", 1.0), ("\u221259", "-59", 1.0),
    ("3x^2 + 9x + 6", "3x^2+9x+6", 1.0), ("3*x**2+9*x+6", "3x^2+9x+6", 1.0), ("6+9x+3x^2", "3x^2+9x+6", 1.0),
    # equal in value but not worked out: restating the question is no answer (simplest form only)
    ("3(x+1)(x+2)", "3x^2+9x+6", 0.0), ("3*x^2 + 4*x + 5*x + 6", "3x^2+9x+6", 0.0), ("1-17", "-16", 0.0),
    ("78-(3*(47-2)+2)", "-59", 0.0), ("59*(-1)", "-59", 0.0),
    ("3*x^2 + 9*x + 2", "3x^2+9x+6", 0.0), ("x^2 + 3x + 2", "3x^2+9x+6", 0.0),  # the origin's wrong answers
    ("The final answer is -57", "-57", 0.0),  # only a bare expression counts
    ("-57", "-59", 0.0), ("x = -59", "-59", 0.0), ("$-59$", "-59", 0.0), ("", "-59", 0.0),
    ("__import__('os').system('ls')", "-59", 0.0), ("x^99999999", "-59", 0.0), ("1e999", "-59", 0.0),
    ("0/0", "-59", 0.0), ("1/0", "-59", 0.0), ("(" * 5000, "-59", 0.0), ("9" * 10_000, "-59", 0.0),
])
def test_correctness_reward(given, expected, score):
    assert correctness_reward(["p"], [wrap(given)], answer=[expected]) == [score]


def test_correctness_without_an_answer_block_is_zero():
    assert correctness_reward(["p", "p"], ["-59", "<answer>-59"], answer=["-59", "-59"]) == [0.0, 0.0]


def test_correctness_uses_the_last_answer_block():
    assert correctness_reward(["p"], ["<answer>-57</answer> no: <answer>-59</answer>"], answer=["-59"]) == [1.0]
    assert correctness_reward(["p"], ["<answer>-59</answer> no: <answer>-57</answer>"], answer=["-59"]) == [0.0]


@pytest.mark.parametrize("expected,score", [
    (None, None), ("not math", None), ("", None), (float("nan"), None), (True, None), ([1], None),
    (-59, 1.0), (-59.0, 1.0), ("-59", 1.0), (2.5, 0.0),
])
def test_unreadable_expected_answers_are_missing(expected, score):
    assert correctness_reward(["p"], [wrap("-59")], answer=[expected]) == [score]


def test_numeric_expected_answers_compare_exactly():
    assert correctness_reward(["p"], [wrap("0.1")], answer=[0.1]) == [1.0]  # 0.1 means 1/10 here
    assert correctness_reward(["p"], [wrap("1/3")], answer=[1 / 3]) == [0.0]  # a float is not 1/3
    assert correctness_reward(["p"], [wrap("1/3")], answer=["1/3"]) == [1.0]  # a fraction is an answer


def test_hostile_answers_score_zero_quickly():
    hostile = ["(" * 100_000, "9" * 100_000, "x^" + "9" * 190, "-".join(["(x+1)^8"] * 18),
               "<answer>" * 1000, "a" * 1_000_000]
    completions = [wrap(h) for h in hostile] + ["<answer>" * 20_000 + "1</answer>" * 20_000]
    t0 = time.perf_counter()
    scores = correctness_reward(["p"] * len(completions), completions, answer=["-59"] * len(completions))
    elapsed = time.perf_counter() - t0
    assert scores == [0.0] * len(completions)
    assert elapsed < 0.5, f"{elapsed:.3f} s"


@pytest.mark.parametrize("text,simplified", [
    ("-16", True), ("+5", True), ("- 5", True), ("-59.0", True), ("3x^2+9x+6", True), ("6+9x+3x²", True),
    ("3*x**2 + 9*x + 6", True), ("x", True), ("2*x", True), ("-x^2 - 1", True), ("x^0", True),
    ("1-17", False), ("3*(x+1)*(x+2)", False), ("2x+3x", False), ("x^2x", False), ("5*3", False), ("x*2", False),
    ("2/3", True), ("-1/3x^2 + 1/2", True), ("2/1", False), ("2/0", False), ("2.5/3", False), ("x/2", False),
    ("1/2/3", False), ("3x^2+", False), ("--5", False), ("", False), ("1e3", False), ("x^y", False), ("x^2.5", False),
    ("1" * 300, False), (None, False),
])
def test_simplest_form(text, simplified):
    assert is_simplified(text) is simplified


def test_answer_list_must_match_completions():
    with pytest.raises(ValueError, match="2 answers for 1 completions"):
        correctness_reward(["p"], ["c"], answer=["1", "2"])


# ----------------------------------------------------------------------------- registry
@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    """A fresh current directory, with sys.path and sys.modules restored afterwards."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")])
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:  # forget the modules imported from tmp_path only
        if str(getattr(sys.modules[name], "__file__", None) or "").startswith(str(tmp_path)):
            del sys.modules[name]


def test_builtins_by_name():
    assert get_reward_funcs(["correctness", "format"]) == [correctness_reward, format_reward]
    assert get_reward_funcs([" format "]) == [format_reward]


def test_user_function_from_the_current_directory(user_dir):
    (user_dir / "my_rewards_a.py").write_text(
        "def length_penalty(completions, **kwargs):\n"
        "    return [-len(c) / 100 for c in completions]\n")
    [fn] = get_reward_funcs(["my_rewards_a:length_penalty"])
    per_func, total = compute_rewards([fn], None, ["p", "p"], ["abc", "a"], {})
    assert total.tolist() == pytest.approx([-0.03, -0.01])


def test_user_function_in_a_package(user_dir):
    (user_dir / "pkg_b").mkdir()
    (user_dir / "pkg_b" / "__init__.py").write_text("")
    (user_dir / "pkg_b" / "scores.py").write_text("def one(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")
    [fn] = get_reward_funcs(["pkg_b.scores:one"])
    assert fn(prompts=["p"], completions=["c"]) == [1.0]


@pytest.mark.parametrize("files,names,message", [
    ({}, ["correctness", "nope"], r"reward_funcs\[1\]: unknown reward 'nope'; built-ins are \['correctness', 'correctness_lenient', 'format', 'format_graded', 'soft_overlong_punishment'\]"),
    ({}, ["missing_mod_c:f"], r"reward_funcs\[0\]: cannot import module 'missing_mod_c'.*missing_mod_c\.py"),
    ({"mod_d.py": "def g(**kw): return []\n"}, ["format", "mod_d:bar"],
     r"reward_funcs\[1\]: module 'mod_d' has no function 'bar'"),
    ({"mod_e.py": "bar = 3\n"}, ["mod_e:bar"], r"reward_funcs\[0\]: 'mod_e:bar' is a int, not a function"),
    ({"mod_f.py": "import not_installed_dep_f\n"}, ["mod_f:g"],
     r"reward_funcs\[0\]: importing module 'mod_f' failed: No module named 'not_installed_dep_f'"),
    ({"mod_g.py": "def g(:\n"}, ["mod_g:g"], r"reward_funcs\[0\]: importing module 'mod_g' failed: SyntaxError"),
    ({"mod_h.py": "raise RuntimeError('boom')\n"}, ["mod_h:g"], r"importing module 'mod_h' failed: RuntimeError: boom"),
    ({}, [":f"], r"reward_funcs\[0\]: ':f' must look like 'module:function'"),
    ({}, ["mod:"], r"must look like 'module:function'"),
    ({}, ["format", 3], r"reward_funcs\[1\]: expected a name"),
    ({}, [], r"reward_funcs is empty"),
    ({}, "format", r"must be a list of names"),
])
def test_bad_reward_names(user_dir, files, names, message):
    for name, text in files.items():
        (user_dir / name).write_text(text)
    with pytest.raises(ValueError, match=message):
        get_reward_funcs(names)


def test_required_columns_are_checked_before_training():
    assert required_columns(correctness_reward) == ["answer"]
    assert required_columns(format_reward) == []
    check_reward_columns([correctness_reward], ["correctness"], ["prompt", "answer"])
    with pytest.raises(ValueError, match=r"reward 'correctness' needs the column\(s\) \['answer'\].*columns: prompt, question"):
        check_reward_columns([correctness_reward], ["correctness"], ["prompt", "question"])


# ----------------------------------------------------------------------------- compute_rewards
def const(values):
    def fn(prompts, completions, **kwargs):
        return list(values)
    fn.__name__ = f"const{values}"
    return fn


def test_weighted_nansum_with_missing_items():
    a = const([1.0, None, NAN, None])
    b = const([0.5, 2.0, 1.0, NAN])
    per_func, total = compute_rewards([a, b], [2.0, -1.0], ["p"] * 4, ["c"] * 4, {})
    assert per_func.dtype == torch.float32 and per_func.shape == (4, 2)
    expected = torch.tensor([[1.0, 0.5], [NAN, 2.0], [NAN, 1.0], [NAN, NAN]])
    torch.testing.assert_close(per_func, expected, equal_nan=True)
    # row 0: 2*1 - 0.5 = 1.5; rows 1-2 skip the missing a; row 3 has no reward at all -> NaN
    torch.testing.assert_close(total, torch.tensor([1.5, -2.0, -1.0, NAN]), equal_nan=True)


def test_all_missing_total_gets_advantage_zero():
    from grpo_scale.rollout import group_advantages
    _, total = compute_rewards([const([1.0, 0.0, None, 1.0])], None, ["p"] * 4, ["c"] * 4, {})
    adv, _ = group_advantages(total, num_generations=4)
    assert adv[2] == 0 and torch.isfinite(adv).all()


def test_builtins_together_on_columns():
    completions = [wrap("-59"), "<answer>-59</answer>", wrap("-57"), "nothing"]
    columns = {"prompt": ["Solve 78-(3*(47-2)+2)"] * 4, "answer": ["-59"] * 4, "task": ["arithmetic"] * 4}
    per_func, total = compute_rewards(get_reward_funcs(["correctness", "format"]), [1.0, 0.5],
                                      columns["prompt"], completions, columns)
    assert per_func.tolist() == [[1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]
    assert total.tolist() == [1.5, 1.0, 0.5, 0.0]


def test_raising_function_is_logged_and_missing(caplog):
    def flaky(prompts, completions, **kwargs):
        raise ZeroDivisionError("division by zero in my metric")
    with caplog.at_level(logging.WARNING, logger="grpo_scale.rewards"):
        per_func, total = compute_rewards([flaky, const([1.0, 2.0])], None, ["p"] * 2, ["c"] * 2, {})
    assert torch.isnan(per_func[:, 0]).all() and total.tolist() == [1.0, 2.0]
    [record] = caplog.records
    assert "flaky" in record.getMessage() and "ZeroDivisionError" in record.getMessage()
    assert "division by zero in my metric" in record.getMessage()


def test_columns_reach_the_functions_by_keyword():
    seen = {}

    def trl_style(completions, **kwargs):  # TRL reward functions often leave out `prompts`
        seen.update(kwargs, completions=completions)
        return [float(len(c)) for c in completions]
    compute_rewards([trl_style], None, ["p1", "p2"], ["a", "bb"], {"prompt": ["p1", "p2"], "level": [1, 2]})
    assert seen == {"prompts": ["p1", "p2"], "completions": ["a", "bb"], "level": [1, 2]}


def test_tensors_inf_and_numbers_are_accepted():
    per_func, total = compute_rewards([const(torch.tensor([1.0, math.inf])), const([True, 3])], None,
                                      ["p"] * 2, ["c"] * 2, {})
    assert per_func[0].tolist() == [1.0, 1.0] and math.isnan(per_func[1, 0]) and total.tolist() == [2.0, 3.0]


@pytest.mark.parametrize("funcs,weights,columns,message", [
    ([const([1.0])], None, {}, r"reward function test_rewards:const\[1.0\] returned 1 rewards for 2 completions"),
    ([const("ab")], None, {}, r"returned str 'a' for completion 0; return a float or None"),
    ([lambda **kw: 1.0], None, {}, r"returned float; return a list"),
    ([const([1.0, 1.0])], [1.0, 2.0], {}, r"reward_weights must be 1 finite numbers"),
    ([const([1.0, 1.0])], [NAN], {}, r"reward_weights must be 1 finite numbers"),
    ([], None, {}, r"no reward functions"),
    ([const([1.0, 1.0])], None, {"answer": ["1"]}, r"data column 'answer' has 1 values for 2 completions"),
    ([const([1.0, 1.0])], None, {"completions": ["a", "b"]}, r"data column 'completions' clashes"),
])
def test_bad_results_and_arguments_raise(funcs, weights, columns, message):
    with pytest.raises(ValueError, match=message):
        compute_rewards(funcs, weights, ["p"] * 2, ["c"] * 2, columns)


def test_empty_batch():
    per_func, total = compute_rewards([format_reward], None, [], [], {})
    assert per_func.shape == (0, 1) and total.shape == (0,)


# ----------------------------------------------------------------------------- rewards for a model new to the format
OPENED = [{"role": "user", "content": "Solve 10+5"}, {"role": "assistant", "content": "<think>"}]


@pytest.mark.parametrize("completion,graded", [
    ("<think>a</think><answer>15</answer>", 1.0),
    ("  <think>a</think>\n <answer> 15 </answer>\n", 1.0),   # whitespace around and between is fine
    ("<think>a</think><answer>15</answer> and more", 0.75),   # text after </answer>
    ("<think>a</think><answer>15", 0.75),                      # the answer never closed
    ("<think>a</think><answer></answer>", 0.75),              # an empty answer
    ("<think>a</think> so <answer>15</answer>", 0.75),         # text between the blocks: check 3 fails
    ("<think>a</think> 15", 0.5),
    ("a</think><answer>15</answer>", 0.25),                    # no <think>: checks 1-3 fail (2 and 3 build on it)
    ("<think>a <answer>15</answer>", 0.5),                     # no </think>: checks 2 and 3 fail
    ("The answer is 15.", 0.0), ("", 0.0),
    ("<think>a</think><think>b</think><answer>15</answer>", 0.25),  # think tags twice: checks 1-3 fail
])
def test_format_graded_by_hand(completion, graded):
    assert format_graded_reward(["p"], [completion]) == [graded]
    assert format_reward(["p"], [completion]) == [1.0 if graded == 1.0 else 0.0]


def test_format_graded_is_one_exactly_when_format_is(seed=0):
    import random
    rng = random.Random(seed)
    pieces = ["<think>", "</think>", "<answer>", "</answer>", "15", " ", "\n", "x"]
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randrange(9)))
        assert (format_graded_reward(["p"], [text])[0] == 1.0) == (format_reward(["p"], [text])[0] == 1.0), text


def test_builtins_judge_the_opened_reply():
    """An R1-style prompt opens the reply with <think>: the completion continues it, and the built-ins
    judge the two together (TRL's rule: a conversation ending with the assistant is continued)."""
    completion = "10+5 = 15</think><answer>15</answer>"
    assert format_reward([OPENED], [completion]) == [1.0]
    assert format_graded_reward([OPENED], [completion]) == [1.0]
    assert format_reward(["Solve 10+5"], [completion]) == [0.0]  # nothing opened: <think> is missing
    conversational = [{"role": "assistant", "content": completion}]
    assert correctness_reward([OPENED], [conversational], answer=["15"]) == [1.0]


@pytest.mark.parametrize("reply,value", [
    ("<answer>-57</answer>", -57),
    ("<answer> The final answer is -57 </answer>", -57),        # the origin's own "before" sample
    ("<answer>-57.</answer>", -57), ("<answer>$-57$</answer>", -57), ("<answer>\\boxed{-57}</answer>", -57),
    ("<answer>7 + 18 = 25</answer>", 25),                       # what follows the last '='
    ("<think>7+18</think> The final result is 7 + 18 = 25.", 25),  # no answer block: after </think>
    ("The answer is 19.\n\nSo, the solution is 19.", 19),       # the last expression in prose
    ("<think>a</think><answer>x = 3x^2+9x+6", "3x^2+9x+6"),      # an unclosed answer block
    ("The expansion is 3x^2 + 9x + 6.", "3x^2+9x+6"),            # 'x' inside a word is not the variable
    ("The answer is 1-17.", None),                              # restating the question is still no answer
    ("<answer>1-17</answer>", None), ("no number here", None), ("", None), (None, None),
])
def test_lenient_answer_rules(reply, value):
    from grpo_scale.safe_math import parse_polynomial
    expected = None if value is None else parse_polynomial(str(value))
    assert lenient_answer(reply) == expected


def test_lenient_correctness_counts_the_skill_apart_from_the_format():
    completions = ["<think>a</think><answer>15</answer>", "The final result is 10 + 5 = 15.",
                   "<think>a</think><answer>The answer is 15</answer>", "The answer is 16.", "The answer is 10+5."]
    assert correctness_lenient_reward(["p"] * 5, completions, answer=["15"] * 5) == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert correctness_reward(["p"] * 5, completions, answer=["15"] * 5) == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert correctness_lenient_reward(["p"], ["15"], answer=["not math"]) == [None]


def test_lenient_reading_is_bounded():
    hostile = ["(" * 100_000, "9" * 100_000 + "=", "= " * 50_000, "x" * 1_000_000, "1-" * 200_000 + "1",
               " " * 500 + "x" * 499 + "a", "(" * 500 + "x" * 499 + "b", "$" * 999 + "1", "\\boxed{" * 150,
               "<answer>" * 20_000 + "1" + "</answer>" * 20_000]
    t0 = time.perf_counter()
    scores = correctness_lenient_reward(["p"] * len(hostile), hostile, answer=["-59"] * len(hostile))
    elapsed = time.perf_counter() - t0
    assert scores == [0.0] * len(hostile)
    assert elapsed < 1.0, f"{elapsed:.3f} s"


def test_new_builtins_by_name():
    assert get_reward_funcs(["format_graded", "correctness_lenient"]) == [format_graded_reward,
                                                                         correctness_lenient_reward]


# ----------------------------------------------------------------------------- DAPO's overlong shaping
def test_soft_overlong_punishment_at_the_edges_of_its_window():
    """Lmax 20, cache 4: 0 up to 16 tokens, then -1/4 per token down to -1 at 20; -1 beyond (by hand)."""
    fn = get_soft_overlong_punishment(max_completion_len=20, soft_punish_cache=4)
    lengths = [0, 1, 15, 16, 17, 18, 19, 20, 21, 500]
    want = [0.0, 0.0, 0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0, -1.0]
    assert fn(completion_ids=[[7] * n for n in lengths]) == want
    assert fn.__name__ == "soft_overlong_punishment_reward"  # TRL's name, so TRL's metric keys
    # cache 0: no soft window (TRL would divide by zero at exactly Lmax)
    assert get_soft_overlong_punishment(20, 0)(completion_ids=[[1] * 20, [1] * 21]) == [0.0, -1.0]
    # cache == Lmax: the window starts at the first token
    assert get_soft_overlong_punishment(4, 4)(completion_ids=[[], [1], [1] * 4]) == [0.0, -0.25, -1.0]
    assert pickle.loads(pickle.dumps(fn))(completion_ids=[[1] * 18]) == [-0.5]


def test_soft_overlong_punishment_by_name():
    [fn] = get_reward_funcs(["soft_overlong_punishment"], {"max_completion_length": 64})
    assert (fn.max_completion_len, fn.soft_punish_cache) == (64, 12)  # DAPO's fifth as the cache
    [fn] = get_reward_funcs([" soft_overlong_punishment( soft_punish_cache = 8 ,max_completion_len=32) "])
    assert (fn.max_completion_len, fn.soft_punish_cache) == (32, 8)
    # the command line splits lists at commas, but not inside the parentheses
    cfg = load_config(["--reward_funcs", "format,soft_overlong_punishment(max_completion_len=32,soft_punish_cache=8)"])
    assert cfg.reward_funcs == ["format", "soft_overlong_punishment(max_completion_len=32,soft_punish_cache=8)"]
    for name, message in [
        ("soft_overlong_punishment(cache=3)", r"'cache' is not a parameter of soft_overlong_punishment"),
        ("soft_overlong_punishment(soft_punish_cache=x)", r"'soft_punish_cache=x' is not 'parameter=N'"),
        ("soft_overlong_punishment(soft_punish_cache=-1)", r"is not 'parameter=N'"),
        ("soft_overlong_punishment(soft_punish_cache=9)", r"soft_punish_cache <= max_completion_len"),
        ("soft_overlong_punishment(max_completion_len=4,max_completion_len=5)", r"gives max_completion_len twice"),
        ("soft_overlong_punishment()", r"needs max_completion_len"),
    ]:
        with pytest.raises(ValueError, match=r"reward_funcs\[0\]: .*" + message):
            get_reward_funcs([name], {} if name.endswith("()") else {"max_completion_length": 8})
