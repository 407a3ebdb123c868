"""Code: write a one-line Python function, scored by running it on hidden tests in the sandbox.

`Write f(x): x times 3, then plus 2.` -> `def f(x): return (x*3)+2`. The steps are applied left to right,
so the gold function brackets each one. The hidden tests (inputs and expected values) are drawn with the
problem and stay in the parent process; the question never shows them. The worked solution tries the
rule on one input, step by step, then writes the function.
"""

from __future__ import annotations

import ast
import random

from pocketr1.tasks.base import Problem, TaskFamily
from pocketr1.tasks.sandbox import Limits, run_tests

# name in the question -> Python operator; "mod" keeps Python's sign rule (the tests compute it the same way)
STEPS = {"plus": "+", "minus": "-", "times": "*", "mod": "%"}
N_TESTS = 5
LIMITS = Limits(cpu_seconds=2, wall_seconds=5.0, memory_mb=512, file_mb=1)


def _apply(x: int, op: str, k: int) -> int:
    return {"+": x + k, "-": x - k, "*": x * k, "%": x % k if k else 0}[op]


def _body(steps: list[tuple[str, int]]) -> str:
    expr = "x"
    for i, (op, k) in enumerate(steps):
        expr = f"({expr}){op}{k}" if i else f"x{op}{k}"
    return expr


def evaluate_steps(steps: list[tuple[str, int]], x: int) -> int:
    for op, k in steps:
        x = _apply(x, op, k)
    return x


class Code(TaskFamily):
    name = "code"
    defaults = {"min_steps": 1, "max_steps": 2, "max_k": 9, "max_input": 20}

    def generate(self, rng: random.Random, difficulty: dict[str, int]) -> Problem:
        n = rng.randint(difficulty["min_steps"], difficulty["max_steps"])
        words = list(STEPS)
        steps = []
        for _ in range(n):
            word = rng.choice(words)
            low = 2 if word in ("mod", "times") else 1
            steps.append((STEPS[word], rng.randint(low, max(low, difficulty["max_k"]))))
        names = {v: k for k, v in STEPS.items()}
        said = ", then ".join(f"{names[op]} {k}" for op, k in steps)
        question = f"Write f(x): x {said}."
        top = difficulty["max_input"]
        inputs = rng.sample(range(-top, top + 1), min(N_TESTS, 2 * top + 1))
        tests = [[x, evaluate_steps(steps, x)] for x in inputs]
        return Problem(self.name, question, f"def f(x): return {_body(steps)}",
                       {"steps": steps, "tests": tests})

    def worked_solution(self, problem: Problem, rng: random.Random) -> str:
        steps = problem.data["steps"]
        x = rng.randint(1, 9)
        lines = [f"try x={x}"]
        for op, k in steps:
            new = _apply(x, op, k)
            lines.append(f"{x}{op}{k}={new}")
            x = new
        lines.append(f"so f(x) is {_body(steps)}")
        return "\n".join(lines)

    def check(self, problem: Problem, answer: str) -> bool:
        code = answer.strip()
        if not _defines_f(code):  # most wrong answers never need a process
            return False
        tests = problem.data["tests"]
        result = run_tests(code, "f", [[x] for x, _ in tests], [y for _, y in tests], LIMITS)
        return result.score == 1.0


def _defines_f(code: str) -> bool:
    """Parses, and defines `f` at the top level: a quick check in the parent, never running anything."""
    if not code or len(code) > 2000:
        return False
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return any(isinstance(node, ast.FunctionDef) and node.name == "f"
               or isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "f" for t in node.targets)
               for node in tree.body)
