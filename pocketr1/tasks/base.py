"""What every task family is: a seeded problem generator with difficulty knobs, a worked-solution writer
for the pretraining corpus, and a verifier. Train and held-out problems are told apart by a hash of the
problem text, so the split never depends on the seed or on the order problems were drawn in."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any

from pocketr1.errors import UserError

HELDOUT_PERCENT = 10  # share of the problem space reserved for evaluation, by hash
EXHAUSTED = 2000  # draws in a row that repeat earlier problems: the split has no more (small spaces)


@dataclass(frozen=True, slots=True)
class Problem:
    family: str
    question: str  # the user's message
    answer: str  # the gold answer, as the verifier's reference
    data: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


def is_heldout(family: str, question: str) -> bool:
    digest = hashlib.sha1(f"{family}\n{question}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < HELDOUT_PERCENT


class TaskFamily:
    """Subclasses set `name` and `defaults` (the difficulty knobs) and implement the three methods."""

    name: str = ""
    defaults: dict[str, int] = {}
    corpus_worked: float | None = None  # this family's share of worked documents, over data.worked_fraction

    def generate(self, rng: random.Random, difficulty: dict[str, int]) -> Problem:
        raise NotImplementedError

    def worked_solution(self, problem: Problem, rng: random.Random) -> str:
        """Readable reasoning for the corpus: the text that goes between `<think>\\n` and `</think>`."""
        raise NotImplementedError

    def check(self, problem: Problem, answer: str) -> bool:
        """True when `answer` (the text inside <answer></answer>) solves `problem`."""
        raise NotImplementedError

    def difficulty(self, overrides: dict[str, int] | None = None) -> dict[str, int]:
        merged = dict(self.defaults)
        for key, value in (overrides or {}).items():
            if key not in merged:
                known = ", ".join(sorted(merged))
                raise UserError(f"task '{self.name}' has no difficulty knob '{key}' (known: {known}).")
            merged[key] = int(value)
        return merged

    def sample(self, rng: random.Random, difficulty: dict[str, int], heldout: bool) -> Problem:
        """Draw problems until one falls in the requested split."""
        for _ in range(10_000):
            problem = self.generate(rng, difficulty)
            if is_heldout(self.name, problem.question) == heldout:
                return problem
        raise UserError(f"task '{self.name}' at difficulty {difficulty} has too few distinct problems.")

    def problems(self, n: int, seed: int, difficulty: dict[str, int], heldout: bool) -> list[Problem]:
        """`n` distinct problems of one split, reproducible from `seed` (fewer when the split has fewer:
        drawing stops once `EXHAUSTED` draws in a row bring nothing new)."""
        rng = random.Random(f"{self.name}:{seed}:{heldout}")
        seen: dict[str, Problem] = {}
        misses = 0
        for _ in range(n * 50):
            if len(seen) == n or misses == EXHAUSTED:
                break
            p = self.sample(rng, difficulty, heldout)
            misses = misses + 1 if p.question in seen else 0
            seen.setdefault(p.question, p)
        return list(seen.values())
