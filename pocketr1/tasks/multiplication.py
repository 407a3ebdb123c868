"""Multiplication: `Compute 47*36.`, solved by partial products, one digit pair per line, then their sum.

Every line is a single-digit product with its place's zeros (`40*30=1200`) or one addition to a running
total, so each step is something a tiny model can learn; the whole product in one shot is not.
"""

from __future__ import annotations

import random

from pocketr1.tasks.base import Problem, TaskFamily


def _places(n: int) -> list[int]:
    """47 -> [7, 40]: each nonzero digit with its place value, ones first."""
    out, scale = [], 1
    while n:
        if n % 10:
            out.append(n % 10 * scale)
        n, scale = n // 10, scale * 10
    return out


class Multiplication(TaskFamily):
    name = "multiplication"
    defaults = {"a_digits": 2, "b_digits": 1}

    def generate(self, rng: random.Random, difficulty: dict[str, int]) -> Problem:
        a = rng.randint(10 ** (difficulty["a_digits"] - 1), 10 ** difficulty["a_digits"] - 1)
        b = rng.randint(max(2, 10 ** (difficulty["b_digits"] - 1)), 10 ** difficulty["b_digits"] - 1)
        return Problem(self.name, f"Compute {a}*{b}.", str(a * b), {"a": a, "b": b})

    def worked_solution(self, problem: Problem, rng: random.Random) -> str:
        a, b = problem.data["a"], problem.data["b"]
        partials = [(x, y) for y in _places(b) for x in _places(a)]
        lines = [f"{x}*{y}={x * y}" for x, y in partials]
        total = partials[0][0] * partials[0][1]
        for x, y in partials[1:]:
            lines.append(f"{total}+{x * y}={total + x * y}")
            total += x * y
        return "\n".join(lines)

    def check(self, problem: Problem, answer: str) -> bool:
        return answer.strip() == problem.answer
