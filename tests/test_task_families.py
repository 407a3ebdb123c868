"""The task families beyond arithmetic and countdown: generators, verifiers, worked solutions, knobs, splits,
the language-consistency reward, and the corpus over every family."""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import re

import pytest

from pocketr1.errors import UserError
from pocketr1.tasks import FAMILIES, get_family, is_heldout
from pocketr1.tasks.base import Problem
from pocketr1.tasks.corpus import build_corpus
from pocketr1.tasks.knights import parse_roles
from pocketr1.tasks.language import CYRILLIC, number_word
from pocketr1.tasks.rewards import accuracy_reward, consistency_reward, language_consistency, parse_completion

NEW = ["multiplication", "knights", "wordproblems", "code", "language"]
GENERATED = ["multiplication", "knights", "wordproblems", "language"]  # checked without a sandbox run
STEP = re.compile(r"(\d+)([+\-*/%])(\d+)=(-?\d+)")


def problems(name: str, n: int = 100, seed: int = 0, heldout: bool = False, **knobs) -> list[Problem]:
    family = get_family(name)
    return family.problems(n, seed, family.difficulty(knobs), heldout=heldout)


def completion(answer: str, thinking: str = "some thinking") -> str:
    return f"{thinking}\n</think>\n<answer>{answer}</answer>"


def step_value(line: str) -> tuple[int, int]:
    """`a op b = c` checked by the test's own arithmetic; returns (a, c)."""
    m = STEP.fullmatch(line)
    assert m, f"not an operation: {line!r}"
    a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
    assert {"+": a + b, "-": a - b, "*": a * b, "/": a // b, "%": a % b}[op] == c, line
    if op == "/":
        assert a % b == 0, line
    return a, c


# --- every new family ---------------------------------------------------------------------------------------

def test_registry_holds_every_family_and_old_ones_unchanged():
    assert {"arithmetic", "countdown", *NEW} <= set(FAMILIES)
    for name in NEW:
        assert get_family(name).name == name


@pytest.mark.parametrize("name", GENERATED)
@pytest.mark.parametrize("heldout", [False, True])
def test_gold_answers_pass(name, heldout):
    for p in problems(name, 80, heldout=heldout):
        assert accuracy_reward(p, completion(p.answer)) == 1.0, p
        assert is_heldout(name, p.question) == heldout


@pytest.mark.parametrize("name", ["multiplication", "wordproblems", "language"])
def test_wrong_integer_answers_fail(name):
    for p in problems(name, 50):
        gold = int(p.answer)
        for wrong in (gold + 1, gold - 1, f"{gold}.0", f"{gold} {gold}", ""):
            assert accuracy_reward(p, completion(str(wrong))) == 0.0, (p, wrong)


@pytest.mark.parametrize("name", NEW)
def test_generators_are_reproducible_and_splits_disjoint(name):
    first = problems(name, 60, seed=3)
    assert [(p.question, p.answer) for p in first] == [(p.question, p.answer) for p in problems(name, 60, seed=3)]
    assert [p.question for p in first] != [p.question for p in problems(name, 60, seed=4)]
    train = {p.question for seed in range(2) for p in problems(name, 150, seed=seed)}
    held = {p.question for seed in range(2) for p in problems(name, 20, seed=seed, heldout=True)}
    assert len(train) > 150 and held and not train & held


@pytest.mark.parametrize("name", NEW)
def test_unknown_knob_is_a_user_error(name):
    with pytest.raises(UserError, match="nope"):
        get_family(name).difficulty({"nope": 1})


# --- multiplication -----------------------------------------------------------------------------------------

def test_multiplication_knobs_and_partial_products():
    for a_digits, b_digits in ((2, 1), (3, 2)):
        for p in problems("multiplication", 60, a_digits=a_digits, b_digits=b_digits):
            m = re.fullmatch(r"Compute (\d+)\*(\d+)\.", p.question)
            a, b = int(m[1]), int(m[2])
            assert (len(m[1]), len(m[2])) == (a_digits, b_digits) and int(p.answer) == a * b
            lines = get_family("multiplication").worked_solution(p, random.Random(0)).splitlines()
            products = [line for line in lines if "*" in line]
            for line in products:  # each a single nonzero digit times a single nonzero digit, with zeros
                x, y = line.split("=")[0].split("*")
                assert x.rstrip("0") in "123456789" and y.rstrip("0") in "123456789", line
            assert sum(step_value(line)[1] for line in products) == a * b
            last = step_value(lines[-1])[1] if len(products) > 1 else step_value(products[0])[1]
            assert last == a * b


# --- knights and knaves -------------------------------------------------------------------------------------

def claims_from_question(question: str) -> dict[str, str]:
    return dict(re.findall(r"([A-E]): ([^.]+)\.", question))


def holds(claim: str, roles: dict[str, bool]) -> bool:
    """The test's own reading of a claim in the question's words."""
    if m := re.fullmatch(r"([A-E]) is a (knight|knave)", claim):
        return roles[m[1]] == (m[2] == "knight")
    if m := re.fullmatch(r"([A-E]) and ([A-E]) are both (knight|knave)s", claim):
        return roles[m[1]] == roles[m[2]] == (m[3] == "knight")
    m = re.fullmatch(r"([A-E]) and ([A-E]) are (alike|different)", claim)
    assert m, claim
    return (roles[m[1]] == roles[m[2]]) == (m[3] == "alike")


def test_knights_puzzles_have_exactly_the_gold_solution():
    sizes = set()
    for p in problems("knights", 120) + problems("knights", 20, min_people=4, max_people=4):
        claims = claims_from_question(p.question)
        names = sorted(claims)
        sizes.add(len(names))
        fits = []
        for values in itertools.product((True, False), repeat=len(names)):
            roles = dict(zip(names, values))
            if all(holds(c, roles) == roles[speaker] for speaker, c in claims.items()):
                fits.append(roles)
        assert len(fits) == 1, p.question
        assert parse_roles(p.answer) == fits[0]
    assert sizes == {2, 3, 4}


def test_knights_answer_parser_is_tolerant_but_not_of_hedging():
    p = Problem("knights", "q", "A knight, B knave")
    family = get_family("knights")
    for good in ("A knight, B knave", "B knave, A knight", "A: knight; B: knave", "A is a knight and B is a knave",
                 "A=Knight B=KNAVE", " A knight,B knave "):
        assert family.check(p, good), good
    for bad in ("A knave, B knight", "A knight", "A knight, B knave, C knight", "A knight, B knave, B knight",
                "A knight or knave, B knave", "knight knave", "", "a knight, b knave", "A knight, B knave, knave"):
        assert not family.check(p, bad), bad


def test_knights_worked_solution_is_a_correct_case_analysis():
    family = get_family("knights")
    for p in problems("knights", 80):
        claims = claims_from_question(p.question)
        lines = family.worked_solution(p, random.Random(0)).splitlines()
        assert lines[-1].endswith(": fits")
        for line in lines:
            m = re.fullmatch(r"([^:]+): (.*)", line)
            roles = parse_roles(m[1])
            if m[2] == "fits":
                assert roles == parse_roles(p.answer)
                continue
            said = re.fullmatch(r"([A-E]) (true|false), no", m[2])
            assert said, line
            claim = claims[said[1]]
            assert holds(claim, roles) == (said[2] == "true") != roles[said[1]], line  # a real contradiction
        cases = [parse_roles(line.split(":")[0]) for line in lines]
        assert [list(c.values()) for c in cases] == [list(v) for v in itertools.product(
            (True, False), repeat=len(claims))][:len(lines)]  # every case in order, none skipped


# --- word problems ------------------------------------------------------------------------------------------

def test_word_problems_use_the_story_numbers_and_small_values():
    seen_ops = set()
    for p in problems("wordproblems", 150):
        lines = get_family("wordproblems").worked_solution(p, random.Random(0)).splitlines()
        values = [step_value(line) for line in lines]
        assert values[-1][1] == int(p.answer) >= 0
        for (_, c), (a, _) in zip(values, values[1:]):
            assert a == c  # each line continues from the last
        used = {values[0][0]} | {int(STEP.fullmatch(line)[3]) for line in lines}  # the start and each operand
        assert used <= {int(x) for x in re.findall(r"\d+", p.question)}
        seen_ops |= {STEP.fullmatch(line)[2] for line in lines}
    assert seen_ops == {"+", "-", "*", "/"}
    one_step = problems("wordproblems", 60, max_steps=1, max_value=5)
    assert all(len(p.data["lines"]) == 1 for p in one_step)


# --- code ---------------------------------------------------------------------------------------------------

def oracle(question: str, x: int) -> int:
    """The test's own reading of `Write f(x): x plus 1, then mod 7.`"""
    for word, k in re.findall(r"(plus|minus|times|mod) (\d+)", question):
        x = {"plus": x + int(k), "minus": x - int(k), "times": x * int(k), "mod": x % int(k)}[word]
    return x


def test_code_hidden_tests_match_the_question_and_stay_hidden():
    for p in problems("code", 100, max_steps=3):
        tests = p.data["tests"]
        assert len(tests) == 5 and len({x for x, _ in tests}) == 5
        assert all(y == oracle(p.question, x) for x, y in tests)
        assert "return" not in p.question and str(tests[0][1]) not in p.question.split(":")[0]


def test_code_gold_passes_in_the_sandbox_and_wrong_code_fails():
    family = get_family("code")
    for p in problems("code", 4) + problems("code", 2, heldout=True):
        assert accuracy_reward(p, completion(p.answer)) == 1.0, p
        body = p.answer.removeprefix("def f(x): return ")
        assert not family.check(p, f"def f(x): return ({body})+1")
    p = problems("code", 1)[0]
    for bad in ("", "f = 3", "def f(x) return x", "def g(x): return x", "print('PASS')", "x" * 5000):
        assert not family.check(p, bad), bad


def test_code_worked_solution_evaluates_the_rule():
    family = get_family("code")
    for p in problems("code", 50):
        lines = family.worked_solution(p, random.Random(1)).splitlines()
        x = int(lines[0].removeprefix("try x="))
        for line in lines[1:-1]:
            a, x = (int(v) for v in (line.split("=")[0][:len(str(x))], line.split("=")[1]))
        assert x == oracle(p.question, int(lines[0].removeprefix("try x=")))
        assert lines[-1] == "so f(x) is " + p.answer.removeprefix("def f(x): return ")


# --- language mixing and the consistency reward -------------------------------------------------------------

def test_number_words():
    assert [number_word(n) for n in (0, 7, 13, 20, 23, 99)] == [
        "zero", "seven", "thirteen", "twenty", "twenty-three", "ninety-nine"]
    assert "three".translate(CYRILLIC) == "тхрее"


def test_language_consistency_is_the_share_of_letters_in_the_script():
    assert language_consistency("three plus five is eight") == 1.0
    assert language_consistency("тхрее фиве") == 0.0
    assert language_consistency("ab вг") == 0.5
    assert language_consistency("αβ ab", "greek") == 0.5
    assert language_consistency("12+7=19\n19-5=14") == 1.0  # no letters: nothing inconsistent
    assert language_consistency("") == 1.0
    assert language_consistency("Ça déjà") == 1.0  # accented Latin is Latin
    assert language_consistency("三 plus") == pytest.approx(0.8)
    p = problems("language", 1)[0]
    assert consistency_reward(p, completion(p.answer, "one plus two")) == 1.0
    assert consistency_reward(p, completion(p.answer, "оне plus тво")) == pytest.approx(4 / 10)
    assert consistency_reward(p, "тво тво") == 0.0  # no </think>: all of it is thinking


def test_language_corpus_mixes_scripts_by_the_knob():
    def consistencies(mixed: int) -> list[float]:
        family = get_family("language")
        rng = random.Random(0)
        return [language_consistency(family.worked_solution(p, rng))
                for p in problems("language", 200, mixed_percent=mixed)]

    assert all(c == 1.0 for c in consistencies(0))
    assert all(c < 0.5 for c in consistencies(100))
    mixed = consistencies(50)
    assert 0.2 < sum(c == 1.0 for c in mixed) / len(mixed) < 0.6  # some pure, ...
    assert any(0 < c < 1 for c in mixed)  # ... some mixed within one thinking
    for p in problems("language", 50):
        assert "Think in English." in p.question and p.answer.isdigit()  # the answer is script-neutral


def test_tokenizer_round_trips_other_scripts():
    from pocketr1.tokenizer import train_tokenizer

    docs = build_corpus(["language"], 60, 1.0, {}, seed=0)
    tok = train_tokenizer([d.completion for d in docs], vocab_size=300)
    for text in ("тхрее plus фиве is еигхт", "αβγ δ", "三加五", "emoji 🙂 ok"):  # seen and never-seen scripts
        assert tok.decode(tok.encode(text).ids) == text


# --- the corpus over every family ---------------------------------------------------------------------------

def test_corpus_includes_every_family_with_correct_documents():
    names = ["arithmetic", "countdown", *NEW]
    docs = build_corpus(names, 7 * 6, 0.5, {}, seed=1)
    assert sorted({d.problem.family for d in docs}) == sorted(names)
    assert {n: sum(d.problem.family == n for d in docs) for n in names} == {n: 6 for n in names}
    for d in docs:
        assert not is_heldout(d.problem.family, d.problem.question)
        parsed = parse_completion(d.completion)
        assert parsed.well_formed and parsed.answer == d.problem.answer
        assert accuracy_reward(d.problem, d.completion) == 1.0


def test_default_corpus_is_unchanged():
    """The default families' documents for seed 0, pinned when the new families arrived (same as before)."""
    docs = build_corpus(["arithmetic", "countdown"], 400, 0.3, {}, seed=0)
    rows = [[d.problem.family, d.problem.question, d.completion, d.worked] for d in docs]
    digest = hashlib.sha256(json.dumps(rows).encode()).hexdigest()
    assert digest == "fe972ada99e85f93559022d66933bb10b16fdec3bee9e63943debd40e250d8a2"
