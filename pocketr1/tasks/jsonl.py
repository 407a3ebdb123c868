"""User datasets: JSONL rows `{"prompt": ..., "answer": ..., "id": optional, "thinking": optional}`,
answers verified with `math-verify` (boxed answers, fractions, LaTeX, equivalent forms).

Name a dataset as the task `jsonl:PATH` (in `data.families`, `--task`, ...). Its problems all belong to the
family `jsonl`, whose verifier needs only the gold answer, so rewards work without the file; train and
held-out rows are told apart by the same hash of the prompt as every other family, whatever the path.
A malformed row is an error naming the file and line (never skipped in silence), and so is a file with
no rows at all.
"""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path

from pocketr1.errors import UserError
from pocketr1.tasks.base import Problem, TaskFamily, is_heldout

NAME = "jsonl"
PREFIX = NAME + ":"
MAX_ANSWER = 1000  # characters of a model's answer handed to math-verify (its parser is not linear)


def _row_problem(row: object) -> tuple[Problem | None, str]:
    """The problem in one parsed row, or None and what is wrong with it."""
    if not isinstance(row, dict):
        return None, "a row must be a JSON object"
    prompt, answer = row.get("prompt"), row.get("answer")
    if not isinstance(prompt, str) or not prompt.strip():
        return None, "'prompt' must be a non-empty string"
    if isinstance(answer, bool) or not isinstance(answer, str | int | float) or not str(answer).strip():
        return None, "'answer' must be a non-empty string or a number"
    thinking = row.get("thinking", "")
    if not isinstance(thinking, str):
        return None, "'thinking' must be a string"
    if "id" in row and not isinstance(row["id"], str | int):
        return None, "'id' must be a string or an integer"
    data = {"id": row.get("id"), "thinking": thinking.strip()}
    return Problem(NAME, prompt.strip(), str(answer).strip(), data), ""


def load_jsonl(path: str | Path) -> list[Problem]:
    """Every row of a JSONL dataset as a problem; UserError (file and line) on the first malformed row."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"dataset {path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"dataset {path} cannot be read as UTF-8 text ({e}).") from None
    problems, errors = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            errors.append((number, f"not valid JSON ({e.msg})"))
            continue
        problem, why = _row_problem(row)
        if problem is None:
            errors.append((number, why))
        else:
            problems.append(problem)
    if errors:
        number, why = errors[0]
        more = f" ({len(errors)} malformed rows in all)" if len(errors) > 1 else ""
        raise UserError(f"{path} line {number}: {why}{more}.")
    if not problems:
        raise UserError(f"dataset {path} has no rows; each line should be a JSON object with 'prompt' and 'answer'.")
    return problems


def _parse(text: str, timeout: int | None) -> list:
    from math_verify import parse

    # A bare answer is read as one LaTeX expression (`4 or 5` is then a set, not a lucky 5).
    anchored = "$" in text or "\\boxed" in text
    parsed = parse(text if anchored else f"${text}$", parsing_timeout=timeout)
    return parsed or (parse(text, parsing_timeout=timeout, extraction_mode="first_match") if not anchored else [])


def verify_answer(gold: str, answer: str) -> bool:
    """math-verify's equivalence of `answer` to `gold` (0.5 = \\frac{1}{2} = \\boxed{1/2})."""
    from math_verify import verify

    answer = answer.strip()
    if not answer or len(answer) > MAX_ANSWER:
        return False
    # math-verify times out with signal.alarm, which only the main thread may use.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    target = _parse(answer, timeout)
    return bool(target) and verify(_parse(gold, timeout), target, timeout_seconds=timeout)


class Jsonl(TaskFamily):
    """The family every dataset's problems belong to: its verifier needs only the gold answer."""

    name = NAME
    defaults: dict[str, int] = {}

    def generate(self, rng: random.Random, difficulty: dict[str, int]) -> Problem:
        raise UserError("the 'jsonl' task needs a dataset: name it as jsonl:PATH (a JSONL file of prompt/answer).")

    def worked_solution(self, problem: Problem, rng: random.Random) -> str:
        return problem.data.get("thinking", "")

    def check(self, problem: Problem, answer: str) -> bool:
        return verify_answer(problem.answer, answer)


class JsonlDataset(Jsonl):
    """One dataset file: draws its rows instead of generating problems."""

    def __init__(self, path: str | Path):
        self.name = f"{PREFIX}{path}"
        self.path = Path(path)
        rows = {p.question: p for p in load_jsonl(self.path)}  # one problem per distinct prompt
        self.splits = {held: [p for p in rows.values() if is_heldout(NAME, p.question) == held]
                       for held in (False, True)}

    def sample(self, rng: random.Random, difficulty: dict[str, int], heldout: bool) -> Problem:
        rows = self.splits[heldout]
        if not rows:
            split = "held-out" if heldout else "training"
            raise UserError(f"dataset {self.path} has no {split} rows (about 1 in 10 prompts is held out, by "
                            f"hash); it needs more rows.")
        return rng.choice(rows)

    def problems(self, n: int, seed: int, difficulty: dict[str, int], heldout: bool) -> list[Problem]:
        """`n` distinct rows of one split (all of them when it has fewer), reproducible from `seed`."""
        rows = list(self.splits[heldout])
        if not rows:
            self.sample(random.Random(seed), difficulty, heldout)  # raises the readable error
        random.Random(f"{self.name}:{seed}:{heldout}").shuffle(rows)
        return rows[:n]
