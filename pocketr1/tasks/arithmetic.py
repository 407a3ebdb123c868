"""Arithmetic chains: `Compute 12+7-5+23.`, solved one operation per line.

A chain of several terms is hard to do in one shot for a small model and easy step by step (each step
adds or subtracts one digit to a running total); that gap is what R1-Zero-style RL can discover and
amplify.
"""

from __future__ import annotations

import random

from pocketr1.tasks.base import Problem, TaskFamily


class Arithmetic(TaskFamily):
    name = "arithmetic"
    defaults = {"min_terms": 5, "max_terms": 8, "max_value": 9}

    def generate(self, rng: random.Random, difficulty: dict[str, int]) -> Problem:
        n_terms = rng.randint(difficulty["min_terms"], difficulty["max_terms"])
        terms = [rng.randint(1, difficulty["max_value"])]
        ops = []
        total = terms[0]
        for _ in range(n_terms - 1):
            value = rng.randint(1, difficulty["max_value"])
            # Subtract only when the running total stays non-negative: no minus signs to juggle.
            op = "-" if value <= total and rng.random() < 0.5 else "+"
            total = total + value if op == "+" else total - value
            ops.append(op)
            terms.append(value)
        expr = str(terms[0]) + "".join(f"{op}{v}" for op, v in zip(ops, terms[1:]))
        return Problem(self.name, f"Compute {expr}.", str(total), {"terms": terms, "ops": ops})

    def worked_solution(self, problem: Problem, rng: random.Random) -> str:
        terms, ops = problem.data["terms"], problem.data["ops"]
        lines, total = [], terms[0]
        for op, value in zip(ops, terms[1:]):
            new = total + value if op == "+" else total - value
            lines.append(f"{total}{op}{value}={new}")
            total = new
        return "\n".join(lines)

    def check(self, problem: Problem, answer: str) -> bool:
        return answer.strip() == problem.answer
