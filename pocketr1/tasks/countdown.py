"""Countdown (as in TinyZero): reach the target using each given number exactly once with + - * /.

The worked solutions in the corpus are short searches: a few failed tries, each noticed ("wait"), then the
one that reaches the target. Verification evaluates the expression safely (an AST walk, no eval).
"""

from __future__ import annotations

import ast
import random
from fractions import Fraction

from pocketr1.tasks.base import Problem, TaskFamily

OPS = "+-*/"


def _apply(a: int, op: str, b: int) -> int | None:
    """Integer-valued result of `a op b`, or None when it leaves the non-negative integers."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b if a >= b else None
    if op == "*":
        return a * b
    return a // b if b != 0 and a % b == 0 else None


def _chain(numbers: list[int], ops: list[str]) -> tuple[list[str], int | None]:
    """Evaluate numbers[0] op numbers[1] op ... left to right; the lines written and the result."""
    lines, total = [], numbers[0]
    for op, value in zip(ops, numbers[1:]):
        new = _apply(total, op, value)
        if new is None:
            return lines, None
        lines.append(f"{total}{op}{value}={new}")
        total = new
    return lines, total


def _expression(numbers: list[int], ops: list[str]) -> str:
    expr = str(numbers[0])
    for i, (op, value) in enumerate(zip(ops, numbers[1:])):
        expr = f"({expr}){op}{value}" if i > 0 and op in "*/" and ops[i - 1] in "+-" else f"{expr}{op}{value}"
    return expr


class Countdown(TaskFamily):
    name = "countdown"
    defaults = {"numbers": 3, "max_number": 20}

    def generate(self, rng: random.Random, difficulty: dict[str, int]) -> Problem:
        n = difficulty["numbers"]
        while True:
            numbers = [rng.randint(1, difficulty["max_number"]) for _ in range(n)]
            order = rng.sample(numbers, n)
            ops = [rng.choice(OPS) for _ in range(n - 1)]
            _, target = _chain(order, ops)
            if target is not None and 0 < target <= 1000:
                break
        shown = ",".join(map(str, numbers))
        question = f"Use {shown} to make {target}."
        return Problem(self.name, question, _expression(order, ops),
                       {"numbers": numbers, "target": target, "order": order, "ops": ops})

    def worked_solution(self, problem: Problem, rng: random.Random) -> str:
        target, numbers = problem.data["target"], problem.data["numbers"]
        lines = []
        for _ in range(rng.randint(0, 2)):  # a few failed tries, each noticed
            tried, result = _chain(rng.sample(numbers, len(numbers)),
                                   [rng.choice(OPS) for _ in numbers[1:]])
            if result is not None and result != target and tried:
                lines.append(", ".join(tried) + f", wait, {result} is not {target}")
        good, _ = _chain(problem.data["order"], problem.data["ops"])
        lines.append(", ".join(good) + " ok")
        return "\n".join(lines)

    def check(self, problem: Problem, answer: str) -> bool:
        value, used = _safe_eval(answer)
        if value is None:
            return False
        return sorted(used) == sorted(problem.data["numbers"]) and abs(value - problem.data["target"]) < 1e-5


def _safe_eval(text: str) -> tuple[Fraction | None, list[int]]:
    """Value of an arithmetic expression of integers, + - * / and brackets, and the numbers it used."""
    if len(text) > 200:
        return None, []
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError):
        return None, []
    used: list[int] = []

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](walk(node.left), walk(node.right))
        raise ValueError("not plain arithmetic")

    try:
        return walk(tree), used
    except (ValueError, ZeroDivisionError):
        return None, []


_BINOPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
}
