"""Word problems: short templated stories (apples, trains, money...) with small numbers; the answer is an
integer. The worked solution does the story's operations in order, one per line (`4*3=12`), as in the
arithmetic family, so what the model learns there carries over.
"""

from __future__ import annotations

import random

from pocketr1.tasks.base import Problem, TaskFamily

NAMES = ["Ann", "Ben", "Cal", "Dee", "Eli", "Fay", "Gus", "Ivy", "Jo", "Kim"]
THINGS = ["apples", "pens", "cards", "eggs", "books", "coins", "shells", "stamps"]

# (story, operations): the story names {n} (a person), {t} (things) and the numbers {a} {b} {c};
# each operation is (symbol, which number) applied left to right to the running value, starting from {a}.
ONE_STEP = [
    ("{n} has {a} {t} and gets {b} more. How many {t} does {n} have now?", [("+", "b")]),
    ("{n} has {a} {t} and gives {b} away. How many {t} are left?", [("-", "b")]),
    ("A train goes {a} km each hour. How far does it go in {b} hours?", [("*", "b")]),
    ("One {s} costs {a} dollars. How many dollars do {b} {t} cost?", [("*", "b")]),
    ("{n} shares {a} {t} equally among {b} friends. How many {t} does each friend get?", [("/", "b")]),
]
TWO_STEP = [
    ("{n} has {a} {t}, finds {b} more and loses {c}. How many {t} are left?", [("+", "b"), ("-", "c")]),
    ("{n} buys {b} bags of {a} {t} and eats {c}. How many {t} are left?", [("*", "b"), ("-", "c")]),
    ("A train goes {a} km each hour for {b} hours, then {c} km more. How far does it go?",
     [("*", "b"), ("+", "c")]),
    ("{n} has {a} dollars, earns {b} and spends {c}. How many dollars now?", [("+", "b"), ("-", "c")]),
]


def _numbers(rng: random.Random, ops: list[tuple[str, str]], top: int) -> dict[str, int] | None:
    """Numbers for a template, keeping every running value a non-negative integer (None: try again)."""
    values = {"a": rng.randint(1, top)}
    total = values["a"]
    for op, key in ops:
        if op == "/":  # pick the quotient first so the division is exact
            values[key] = rng.randint(2, max(2, top))
            values["a"] = total = values["a"] * values[key]
            total //= values[key]
            continue
        values[key] = rng.randint(1 if op != "*" else 2, max(2, top))
        total = {"+": total + values[key], "-": total - values[key], "*": total * values[key]}[op]
        if total < 0:
            return None
    return values


class WordProblems(TaskFamily):
    name = "wordproblems"
    defaults = {"max_steps": 2, "max_value": 9}

    def generate(self, rng: random.Random, difficulty: dict[str, int]) -> Problem:
        templates = ONE_STEP + (TWO_STEP if difficulty["max_steps"] >= 2 else [])
        while True:
            story, ops = rng.choice(templates)
            values = _numbers(rng, ops, difficulty["max_value"])
            if values is not None:
                break
        thing = rng.choice(THINGS)
        question = story.format(n=rng.choice(NAMES), t=thing, s=thing.removesuffix("s"), **values)
        lines, total = [], values["a"]
        for op, key in ops:
            new = {"+": total + values[key], "-": total - values[key], "*": total * values[key],
                   "/": total // values[key]}[op]
            lines.append(f"{total}{op}{values[key]}={new}")
            total = new
        return Problem(self.name, question, str(total), {"lines": lines})

    def worked_solution(self, problem: Problem, rng: random.Random) -> str:
        return "\n".join(problem.data["lines"])

    def check(self, problem: Problem, answer: str) -> bool:
        return answer.strip() == problem.answer
