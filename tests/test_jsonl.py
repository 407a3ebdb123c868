"""User datasets: loading JSONL (and refusing bad files with the file and line), math-verify answers, and a
dataset used as a task (`jsonl:PATH`) by the corpus, the splits and the rewards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pocketr1.errors import UserError
from pocketr1.tasks import get_family, is_heldout
from pocketr1.tasks.base import Problem
from pocketr1.tasks.corpus import build_corpus
from pocketr1.tasks.jsonl import load_jsonl, verify_answer
from pocketr1.tasks.rewards import accuracy_reward


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def completion(answer: str) -> str:
    return f"thinking\n</think>\n<answer>{answer}</answer>"


def test_load_reads_prompt_answer_and_optional_fields(tmp_path):
    path = write_rows(tmp_path / "d.jsonl", [
        {"prompt": "What is 1/2 + 1/4?", "answer": "\\frac{3}{4}", "id": "q1"},
        "",  # blank lines are fine
        {"prompt": "  How many legs has a spider? ", "answer": 8, "thinking": "eight legs"},
    ])
    first, second = load_jsonl(path)
    assert (first.family, first.question, first.answer, first.data["id"]) == ("jsonl", "What is 1/2 + 1/4?",
                                                                              "\\frac{3}{4}", "q1")
    assert (second.question, second.answer, second.data["thinking"]) == ("How many legs has a spider?", "8",
                                                                         "eight legs")


@pytest.mark.parametrize("bad_row, why", [
    ('{"prompt": "x", "answer": ', "not valid JSON"),
    ('["x", "y"]', "JSON object"),
    ({"answer": "1"}, "'prompt'"),
    ({"prompt": "   ", "answer": "1"}, "'prompt'"),
    ({"prompt": "x"}, "'answer'"),
    ({"prompt": "x", "answer": ""}, "'answer'"),
    ({"prompt": "x", "answer": True}, "'answer'"),
    ({"prompt": "x", "answer": ["1"]}, "'answer'"),
    ({"prompt": "x", "answer": "1", "id": [1]}, "'id'"),
    ({"prompt": "x", "answer": "1", "thinking": 3}, "'thinking'"),
])
def test_malformed_row_names_file_and_line(tmp_path, bad_row, why):
    good = {"prompt": "1+1?", "answer": "2"}
    path = write_rows(tmp_path / "bad.jsonl", [good, good, bad_row, good])
    with pytest.raises(UserError) as err:
        load_jsonl(path)
    message = str(err.value)
    assert str(path) in message and "line 3" in message and why in message


def test_all_malformed_rows_are_counted(tmp_path):
    path = write_rows(tmp_path / "bad.jsonl", ["nope", {"prompt": "a", "answer": "1"}, "{", "[]"])
    with pytest.raises(UserError, match=r"line 1: .*3 malformed rows"):
        load_jsonl(path)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_dataset_without_rows_is_an_error(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match="no rows"):
        load_jsonl(path)
    with pytest.raises(UserError, match="no rows"):
        get_family(f"jsonl:{path}")


def test_missing_or_binary_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_jsonl(tmp_path / "nope.jsonl")
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UserError, match="UTF-8"):
        load_jsonl(binary)


@pytest.mark.parametrize("gold, answer", [
    ("\\frac{1}{2}", "0.5"), ("\\frac{1}{2}", "1/2"), ("\\frac{1}{2}", "\\boxed{\\frac12}"),
    ("\\frac{1}{2}", "$\\dfrac{1}{2}$"), ("0.75", "3/4"), ("42", "42"), ("42", "The answer is \\boxed{42}."),
    ("\\boxed{7}", "7"), ("\\sqrt{2}", "\\sqrt2"), ("x^2+1", "1+x^2"), ("2\\pi", "2\\pi"), ("-3", "-3"),
    ("8", " 8 "), ("8", "8.0"), ("10", "10\\%"),
])
def test_math_verify_accepts_equivalent_answers(gold, answer):
    assert verify_answer(gold, answer)


@pytest.mark.parametrize("gold, answer", [
    ("\\frac{1}{2}", "1/3"), ("\\frac{1}{2}", "0.3333"), ("42", "43"), ("42", "4 2"), ("42", ""),
    ("42", "garbage"), ("-3", "3"), ("5", "4 or 5"), ("42", "\\boxed{41} or \\boxed{42}"), ("x^2+1", "x^2"),
    ("3", "3, 4"), ("42", "4" * 5000),
])
def test_math_verify_rejects_wrong_and_hedged_answers(gold, answer):
    assert not verify_answer(gold, answer)


def dataset(tmp_path: Path, n: int = 60) -> Path:
    rows = [{"prompt": f"What is {i} halves?", "answer": f"\\frac{{{i}}}{{2}}", "thinking": f"{i}/2"}
            for i in range(1, n + 1)]
    return write_rows(tmp_path / "halves.jsonl", rows)


def test_dataset_as_a_task_splits_rows_by_hash_and_scores_with_math_verify(tmp_path):
    family = get_family(f"jsonl:{dataset(tmp_path)}")
    train = family.problems(1000, 0, family.difficulty(), heldout=False)
    held = family.problems(1000, 0, family.difficulty(), heldout=True)
    assert len(train) + len(held) == 60 and held and train
    assert all(is_heldout("jsonl", p.question) for p in held) and not any(is_heldout("jsonl", p.question)
                                                                          for p in train)
    assert family.problems(5, 1, {}, heldout=False) == family.problems(5, 1, {}, heldout=False)
    p = train[0]
    n = int(p.question.split()[2])
    assert accuracy_reward(p, completion(str(n / 2))) == 1.0  # through the registry, by the problem's family
    assert accuracy_reward(p, completion(f"\\boxed{{\\frac{{{n}}}{{2}}}}")) == 1.0
    assert accuracy_reward(p, completion(str(n / 2 + 1))) == 0.0


def test_dataset_in_the_corpus(tmp_path):
    name = f"jsonl:{dataset(tmp_path)}"
    docs = build_corpus(["arithmetic", name], 40, 1.0, {}, seed=0)
    mine = [d for d in docs if d.problem.family == "jsonl"]
    assert len(mine) == 20 and all(d.completion.startswith(d.problem.answer.split("{")[1].rstrip("}") + "/2")
                                   for d in mine)
    assert all(accuracy_reward(d.problem, d.completion) == 1.0 for d in docs)


def test_dataset_without_heldout_rows_says_so(tmp_path):
    rows = [{"prompt": f"q{i}", "answer": str(i)} for i in range(60)]
    rows = [r for r in rows if not is_heldout("jsonl", r["prompt"])][:3]
    family = get_family(f"jsonl:{write_rows(tmp_path / 'small.jsonl', rows)}")
    assert len(family.problems(10, 0, {}, heldout=False)) == 3
    with pytest.raises(UserError, match="no held-out rows"):
        family.problems(10, 0, {}, heldout=True)


def test_plain_jsonl_family_needs_a_file_but_verifies_without_one():
    family = get_family("jsonl")
    assert family.check(Problem("jsonl", "q", "\\frac{1}{2}"), "0.5")
    with pytest.raises(UserError, match="jsonl:PATH"):
        family.problems(1, 0, {}, heldout=False)
