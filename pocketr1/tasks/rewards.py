"""R1's rule-based rewards: accuracy (the verifier on the final answer) plus format, and optionally
language consistency (the share of the thinking written in the target script).

A completion starts right after the generation prompt `<｜Assistant｜><think>\\n`, so it holds the
thinking, then `</think>`, then the answer as `<answer>…</answer>`.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from pocketr1.tasks import get_family
from pocketr1.tasks.base import Problem

THINK_END = "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
_REFLECTION = re.compile(r"\b(wait|check|verify|hmm|again)\b", re.I)


@dataclass(frozen=True, slots=True)
class Parsed:
    thinking: str  # text before </think> (everything, when </think> never came)
    answer: str | None  # inside the one <answer></answer> after </think> (None when there are several:
    # a completion listing many answers must not collect the reward for one of them)
    well_formed: bool  # one </think>, then exactly one <answer>…</answer> and nothing else


def parse_completion(text: str) -> Parsed:
    if THINK_END not in text:
        return Parsed(text, None, False)
    thinking, _, rest = text.partition(THINK_END)
    answers, leftover = _split_answers(rest)
    answer = answers[0].strip() if len(answers) == 1 else None
    well_formed = len(answers) == 1 and not leftover and THINK_END not in rest and "<think>" not in thinking
    return Parsed(thinking, answer, well_formed)


def _split_answers(text: str) -> tuple[list[str], str]:
    """The `<answer>…</answer>` spans (shortest match, left to right) and the text outside them, stripped.

    A linear scan: a regex `<answer>(.*?)</answer>` rescans the rest of the text for every unclosed
    `<answer>`, which a degenerate completion can make take minutes.
    """
    answers, outside, pos = [], [], 0
    while (start := text.find(ANSWER_OPEN, pos)) >= 0:
        end = text.find(ANSWER_CLOSE, start + len(ANSWER_OPEN))
        if end < 0:
            break  # no later <answer> can be closed either
        outside.append(text[pos:start])
        answers.append(text[start + len(ANSWER_OPEN):end])
        pos = end + len(ANSWER_CLOSE)
    outside.append(text[pos:])
    return answers, "".join(outside).strip()


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


def language_consistency(thinking: str, script: str = "latin") -> float:
    """R1's language-consistency reward: the share of the thinking's letters written in `script` (a Unicode
    script name: latin, cyrillic, greek, ...), 0..1. Digits, signs and spaces count for neither side, so
    reasoning without letters (`12+7=19`) is fully consistent (1.0) and never punished.

    A GRPO run adds it to the reward:  reward = accuracy + lang_weight * consistency + format_weight * format.
    """
    prefix = script.upper() + " "
    letters = in_script = 0
    for ch in thinking:
        if not ch.isalpha():
            continue
        letters += 1
        if ch.isascii():  # the fast path: ASCII letters are Latin
            in_script += prefix == "LATIN "
        else:
            in_script += unicodedata.name(ch, "").startswith(prefix)
    return in_script / letters if letters else 1.0


def consistency_reward(problem: Problem, completion: str) -> float:
    """`language_consistency` of a completion's thinking, in its problem's target script (Latin unless the
    problem names another in `data["script"]`)."""
    return language_consistency(parse_completion(completion).thinking, problem.data.get("script", "latin"))
