"""R1's rule-based rewards: accuracy (the verifier on the final answer) plus format.

A completion starts right after the generation prompt `<｜Assistant｜><think>\\n`, so it holds the
thinking, then `</think>`, then the answer as `<answer>…</answer>`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pocketr1.tasks import get_family
from pocketr1.tasks.base import Problem

THINK_END = "</think>"
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
_REFLECTION = re.compile(r"\b(wait|check|verify|hmm|again)\b", re.I)


@dataclass(frozen=True, slots=True)
class Parsed:
    thinking: str  # text before </think> (everything, when </think> never came)
    answer: str | None  # inside the last <answer></answer> after </think>
    well_formed: bool  # one </think>, then exactly one <answer>…</answer> and nothing else


def parse_completion(text: str) -> Parsed:
    if THINK_END not in text:
        return Parsed(text, None, False)
    thinking, _, rest = text.partition(THINK_END)
    answers = _ANSWER.findall(rest)
    answer = answers[-1].strip() if answers else None
    leftover = _ANSWER.sub("", rest).strip()
    well_formed = len(answers) == 1 and not leftover and THINK_END not in rest and "<think>" not in thinking
    return Parsed(thinking, answer, well_formed)


def accuracy_reward(problem: Problem, completion: str) -> float:
    parsed = parse_completion(completion)
    if parsed.answer is None:
        return 0.0
    return 1.0 if get_family(problem.family).check(problem, parsed.answer) else 0.0


def format_reward(completion: str, finished: bool) -> float:
    """1 when the completion is `thinking</think><answer>…</answer>` and stopped on its own."""
    return 1.0 if finished and parse_completion(completion).well_formed else 0.0


def reflection_count(completion: str) -> int:
    """How many self-reflection words ("wait", "check", ...) the thinking holds: the 'aha' signal."""
    return len(_REFLECTION.findall(parse_completion(completion).thinking))
