"""Task families, verifiers, rewards and the pretraining corpus."""

from __future__ import annotations

import re
import time

import pytest

from pocketr1.errors import UserError
from pocketr1.tasks import get_family, is_heldout, parse_difficulty
from pocketr1.tasks.base import Problem
from pocketr1.tasks.corpus import build_corpus, describe
from pocketr1.tasks.rewards import accuracy_reward, format_reward, parse_completion

FAMILIES = ["arithmetic", "countdown"]


def problems(name: str, n: int = 200, seed: int = 0, heldout: bool = False, **knobs) -> list[Problem]:
    family = get_family(name)
    return family.problems(n, seed, family.difficulty(knobs), heldout=heldout)


def completion(answer: str, thinking: str = "some thinking") -> str:
    """A well-formed completion: it starts after the prompt's `<think>\\n`."""
    return f"{thinking}\n</think>\n<answer>{answer}</answer>"


def countdown(numbers: list[int], target: int) -> Problem:
    """A countdown problem written by hand (its gold answer is not needed by the verifier)."""
    return Problem("countdown", f"Use {','.join(map(str, numbers))} to make {target}.", "",
                   {"numbers": numbers, "target": target})


def arithmetic_terms(question: str) -> list[int]:
    expr = re.fullmatch(r"Compute ([0-9+\-]+)\.", question)
    assert expr, question
    return [int(t) for t in re.split(r"[+\-]", expr.group(1))]


# --- verifiers on gold and wrong answers --------------------------------------------------------------------

@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("heldout", [False, True])
def test_gold_answers_pass(name, heldout):
    for p in problems(name, 150, heldout=heldout):
        assert get_family(name).check(p, p.answer), p
        assert accuracy_reward(p, completion(p.answer)) == 1.0, p


def test_gold_answers_pass_at_harder_settings():
    for p in problems("countdown", 100, numbers=5, max_number=30):
        assert accuracy_reward(p, completion(p.answer)) == 1.0, p
    for p in problems("arithmetic", 100, min_terms=7, max_terms=9, max_value=99):
        assert accuracy_reward(p, completion(p.answer)) == 1.0, p


def test_arithmetic_answer_is_the_value_of_the_expression():
    for p in problems("arithmetic", 200):
        expr = p.question.removeprefix("Compute ").removesuffix(".")
        assert re.fullmatch(r"[0-9+\-]+", expr)
        assert int(p.answer) == eval(expr, {"__builtins__": {}})  # the test's own oracle


def test_arithmetic_wrong_answers_fail():
    for p in problems("arithmetic", 50):
        gold = int(p.answer)
        for wrong in (gold + 1, gold - 1, -gold if gold else 1):
            assert accuracy_reward(p, completion(str(wrong))) == 0.0
        assert accuracy_reward(p, completion(f"{gold}.5")) == 0.0
        assert accuracy_reward(p, completion(f" {gold} ")) == 1.0  # surrounding spaces are not an error


def test_countdown_correct_alternatives_pass_and_wrong_answers_fail():
    p = countdown([3, 5, 7], 22)
    for good in ("3*5+7", "7+3*5", "(5*3)+7", "7+5*3", " 3 * 5 + 7 "):
        assert accuracy_reward(p, completion(good)) == 1.0, good
    for bad in ("3*5-7", "3+5+7", "22", "3*5+7+0"):
        assert accuracy_reward(p, completion(bad)) == 0.0, bad


def test_countdown_needs_each_given_number_exactly_once():
    p = countdown([3, 5, 7], 10)
    assert accuracy_reward(p, completion("5+5")) == 0.0  # reuses 5, leaves out 3 and 7
    assert accuracy_reward(p, completion("3+7")) == 0.0  # leaves out 5
    assert accuracy_reward(p, completion("5*2")) == 0.0  # 2 was not given
    assert accuracy_reward(p, completion("3+7+5-5")) == 0.0  # 5 used twice
    assert accuracy_reward(p, completion("(3+7)*5/5")) == 0.0  # also 5 twice
    assert accuracy_reward(p, completion("3+7*(5/5)")) == 0.0
    p2 = countdown([5, 5, 2], 12)  # a number given twice may be used twice
    assert accuracy_reward(p2, completion("5+5+2")) == 1.0
    assert accuracy_reward(p2, completion("5*2+2")) == 0.0


def test_countdown_fractions_are_exact():
    p = countdown([1, 3, 3], 1)
    assert accuracy_reward(p, completion("1/3*3")) == 1.0  # exact rational arithmetic, not float


@pytest.mark.parametrize("expr", [
    "3/(5-5)+7",  # division by zero
    "9**9**9", "2**10000",  # powers are not allowed (and must not be computed)
    "-3+5+7", "3.0+5+7", "3+5+7j", "True+5+7", "3 if 5 else 7", "__import__('os')", "open('x')",
    "(" * 150 + "3" + ")" * 150, "+".join(["1"] * 5000), "9" * 100_000, "3+5+7\x00",
    "[3, 5, 7]", "lambda: 3", "", "   ",
])
def test_countdown_hostile_answers_fail_quickly(expr):
    p = countdown([3, 5, 7], 15)
    start = time.perf_counter()
    assert accuracy_reward(p, completion(expr)) == 0.0
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize("name", FAMILIES)
def test_huge_completion_is_scored_quickly(name):
    p = problems(name, 1)[0]
    text = "x" * 1_000_000 + "</think>\n<answer>" + "9" * 1_000_000 + "</answer>" + "<answer>" * 10_000
    start = time.perf_counter()
    assert accuracy_reward(p, text) == 0.0
    assert format_reward(text, finished=True) == 0.0
    assert time.perf_counter() - start < 2.0


# --- malformed completions ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FAMILIES)
def test_malformed_completions_get_no_accuracy(name):
    p = problems(name, 1)[0]
    a = p.answer
    malformed = [
        f"thinking\n<answer>{a}</answer>",  # no </think>
        f"<answer>{a}</answer>",  # no </think> at all, answer only
        f"thinking </think>\n{a}",  # no answer tags
        f"thinking </think>\n<answer>{a}",  # answer never closed
        f"<answer>{a}</answer> thinking </think>\nno answer here",  # answer only inside the thinking
        f"thinking </think>\n<answer>not {a}?</answer><answer>wrong</answer>",  # two answers, last wrong
        f"thinking </think>\n<answer>0</answer><answer>{a}</answer>",  # hedging: listing answers earns nothing
        "",
        "\x00\ufffd garbage <<<>>> </answer><answer",
        "</think></think></think>",
    ]
    for text in malformed:
        assert accuracy_reward(p, text) == 0.0, text
        assert format_reward(text, finished=True) == 0.0, text


def test_format_reward_only_for_a_finished_well_formed_completion():
    good = "12+7=19\n19-5=14\n</think>\n<answer>14</answer>"
    assert format_reward(good, finished=True) == 1.0
    assert format_reward(good, finished=False) == 0.0  # cut off by the token budget
    assert format_reward("</think>\n<answer>14</answer>", finished=True) == 1.0  # bare answer, empty thinking
    for bad in [
        "12+7=19\n<answer>14</answer>",  # no </think>
        "12+7=19\n</think>\n14",  # no answer tags
        "12+7=19\n</think>\n<answer>14</answer>\nand more text",  # trailing text
        "12+7=19\n</think>\nthe answer: <answer>14</answer>",  # text before the answer
        "12+7=19\n</think>\n<answer>14</answer><answer>14</answer>",  # two answers
        "<think>\n12+7=19\n</think>\n<answer>14</answer>",  # a second opening tag
        "12+7=19\n</think>\n</think>\n<answer>14</answer>",  # two closing tags
    ]:
        assert format_reward(bad, finished=True) == 0.0, bad


def test_parse_completion_splits_thinking_and_answer():
    parsed = parse_completion("a\nb\n</think>\n<answer> 42 </answer>")
    assert parsed.thinking == "a\nb\n"
    assert parsed.answer == "42"
    assert parsed.well_formed


# --- splits, seeds, knobs -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FAMILIES)
def test_heldout_never_overlaps_training(name):
    train = {p.question for seed in range(3) for p in problems(name, 700, seed=seed, heldout=False)}
    heldout = {p.question for seed in range(3) for p in problems(name, 300, seed=seed, heldout=True)}
    assert len(train) > 1500 and len(heldout) > 600
    assert not train & heldout
    assert not any(is_heldout(name, q) for q in train)
    assert all(is_heldout(name, q) for q in heldout)


def test_heldout_share_is_about_ten_percent():
    import random

    family = get_family("arithmetic")
    rng, level = random.Random(5), family.difficulty()
    drawn = [family.generate(rng, level).question for _ in range(5000)]
    share = sum(is_heldout("arithmetic", q) for q in drawn) / len(drawn)
    assert 0.07 < share < 0.13


@pytest.mark.parametrize("name", FAMILIES)
def test_generators_are_reproducible_by_seed(name):
    first = problems(name, 100, seed=7)
    again = problems(name, 100, seed=7)
    other = problems(name, 100, seed=8)
    assert [(p.question, p.answer) for p in first] == [(p.question, p.answer) for p in again]
    assert [p.question for p in first] != [p.question for p in other]
    assert len({p.question for p in first}) == 100  # distinct problems


def test_arithmetic_knobs_change_the_problems():
    long = problems("arithmetic", 100, min_terms=6, max_terms=7)
    assert all(6 <= len(arithmetic_terms(p.question)) <= 7 for p in long)
    short = problems("arithmetic", 100, min_terms=2, max_terms=3)
    assert all(2 <= len(arithmetic_terms(p.question)) <= 3 for p in short)
    small = problems("arithmetic", 100, max_value=5)
    assert all(1 <= t <= 5 for p in small for t in arithmetic_terms(p.question))
    large = problems("arithmetic", 100, max_value=500)
    assert max(t for p in large for t in arithmetic_terms(p.question)) > 100


def test_countdown_knobs_change_the_problems():
    for p in problems("countdown", 100, numbers=4, max_number=9):
        shown = re.fullmatch(r"Use ([0-9,]+) to make (\d+)\.", p.question)
        numbers = [int(x) for x in shown.group(1).split(",")]
        assert len(numbers) == 4 and all(1 <= x <= 9 for x in numbers)
        assert int(shown.group(2)) == p.data["target"]


@pytest.mark.parametrize("name", FAMILIES)
def test_unknown_knob_is_a_user_error(name):
    with pytest.raises(UserError, match="nope"):
        get_family(name).difficulty({"nope": 3})


def test_unknown_family_and_bad_difficulty_text_are_user_errors():
    with pytest.raises(UserError, match="sudoku"):
        get_family("sudoku")
    assert parse_difficulty("min_terms=6, max_terms=8") == {"min_terms": 6, "max_terms": 8}
    for bad in ("min_terms", "min_terms=six", "min_terms=1.5"):
        with pytest.raises(UserError):
            parse_difficulty(bad)


# --- corpus -------------------------------------------------------------------------------------------------

STEP = re.compile(r"(\d+)([+\-*/])(\d+)=(\d+)")


def checked_step(text: str, previous: int | None) -> int:
    """Check one written operation `a op b = c`; it must continue from the previous result. Returns c."""
    m = STEP.fullmatch(text)
    assert m, f"not an operation: {text!r}"
    a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
    expected = {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else None}[op]
    assert expected == c, f"wrong arithmetic: {text!r}"
    if previous is not None:
        assert a == previous, f"{text!r} does not continue from {previous}"
    return c


def check_arithmetic_thinking(problem: Problem, thinking: str) -> None:
    total = None
    for line in thinking.splitlines():
        total = checked_step(line, total)
    assert str(total) == problem.answer


def check_countdown_thinking(problem: Problem, thinking: str) -> None:
    target, lines = problem.data["target"], thinking.splitlines()
    for line in lines[:-1]:  # failed tries: "a+b=c, c*d=e, wait, e is not TARGET"
        *steps, wait, note = line.split(", ")
        total = None
        for step in steps:
            total = checked_step(step, total)
        assert wait == "wait" and note == f"{total} is not {target}" and total != target, line
    *steps, last = lines[-1].split(", ")  # the solution: "a+b=c, c*d=e ok"
    assert last.endswith(" ok"), lines[-1]
    total = None
    for step in [*steps, last.removesuffix(" ok")]:
        total = checked_step(step, total)
    assert total == target


def test_corpus_worked_fraction_and_correct_thinking():
    docs = build_corpus(FAMILIES, 1200, 0.3, {}, seed=3)
    assert len(docs) == 1200
    assert describe(docs) == {name: {"documents": 600, "worked": sum(d.worked for d in docs
                                                                   if d.problem.family == name),
                                     "bare": sum(not d.worked for d in docs if d.problem.family == name)}
                              for name in FAMILIES}
    share = sum(d.worked for d in docs) / len(docs)
    assert 0.25 < share < 0.35
    for d in docs:
        assert not is_heldout(d.problem.family, d.problem.question)
        parsed = parse_completion(d.completion)
        assert parsed.well_formed and parsed.answer == d.problem.answer
        assert accuracy_reward(d.problem, d.completion) == 1.0
        if not d.worked:
            assert parsed.thinking == ""
        elif d.problem.family == "arithmetic":
            check_arithmetic_thinking(d.problem, parsed.thinking.rstrip("\n"))
        else:
            check_countdown_thinking(d.problem, parsed.thinking.rstrip("\n"))


def test_corpus_extremes_and_difficulty():
    assert not any(d.worked for d in build_corpus(["arithmetic"], 100, 0.0, {}, seed=0))
    docs = build_corpus(["arithmetic"], 100, 1.0, {"arithmetic": {"min_terms": 6, "max_terms": 6}}, seed=0)
    assert all(d.worked for d in docs)
    assert all(len(arithmetic_terms(d.problem.question)) == 6 for d in docs)
    assert all(len(parse_completion(d.completion).thinking.strip().splitlines()) == 5 for d in docs)


def test_answer_parsing_matches_the_regex_definition():
    """The linear answer scan agrees with `<answer>(.*?)</answer>` (findall and sub) on random texts."""
    import random

    regex = re.compile(r"<answer>(.*?)</answer>", re.S)
    pieces = ["<answer>", "</answer>", "7", " ", "\n", "<", ">", "answer", "</think>"]
    rng = random.Random(0)
    for _ in range(3000):
        rest = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        parsed = parse_completion("thinking</think>" + rest)
        answers = regex.findall(rest)
        assert parsed.answer == (answers[0].strip() if len(answers) == 1 else None), rest
        leftover = regex.sub("", rest).strip()
        expected_well_formed = len(answers) == 1 and not leftover and "</think>" not in rest
        assert parsed.well_formed == expected_well_formed, rest
