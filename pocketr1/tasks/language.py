"""Language: a task whose corpus mixes scripts, so the base model does too (R1-Zero's "language mixing").

`Add 3, 5 and 2. Think in English.` -> `10`, reasoned in number words: `three plus five is eight`. In the
corpus, each line of a worked solution is written, with chance `mixed_percent`, with its number words
transliterated letter by letter into Cyrillic (`тхрее plus фиве is еигхт`): same reasoning, same answer,
another script. A base model pretrained on that mixes scripts in its thinking; accuracy alone never
minds, and R1's language-consistency reward (rewards.language_consistency: the share of the thinking's
letters in the target script, here Latin) is what pulls it back. The answer itself is digits, so the
accuracy reward is blind to the script by construction.

A GRPO run adds it as  reward = accuracy + lang_weight * consistency + format_weight * format  (the
`grpo.language_weight` knob); the effect shows as the held-out consistency with and without that weight
at about the same accuracy.
"""

from __future__ import annotations

import random

from pocketr1.tasks.base import Problem, TaskFamily

TARGET_SCRIPT = "latin"
_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
         "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
# Letter-by-letter transliteration into Cyrillic: how the other script spells the same words.
CYRILLIC = str.maketrans({"a": "а", "b": "б", "c": "к", "d": "д", "e": "е", "f": "ф", "g": "г", "h": "х",
                          "i": "и", "j": "ж", "k": "к", "l": "л", "m": "м", "n": "н", "o": "о", "p": "п",
                          "q": "к", "r": "р", "s": "с", "t": "т", "u": "у", "v": "в", "w": "в", "x": "кс",
                          "y": "й", "z": "з"})


def number_word(n: int) -> str:
    """0..99 in English words: 23 -> twenty-three."""
    if n < 20:
        return _ONES[n]
    tens, ones = divmod(n, 10)
    return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")


class Language(TaskFamily):
    name = "language"
    defaults = {"min_terms": 2, "max_terms": 4, "max_value": 9, "mixed_percent": 50}
    # Every document reasons (in mixed scripts): with bare answers the base would rarely think at all, and
    # there would be no mixing for the language reward to correct.
    corpus_worked = 1.0

    def generate(self, rng: random.Random, difficulty: dict[str, int]) -> Problem:
        n = rng.randint(difficulty["min_terms"], difficulty["max_terms"])
        terms = [rng.randint(1, difficulty["max_value"]) for _ in range(n)]
        shown = ", ".join(map(str, terms[:-1])) + f" and {terms[-1]}"
        data = {"terms": terms, "script": TARGET_SCRIPT, "mixed_percent": difficulty["mixed_percent"]}
        return Problem(self.name, f"Add {shown}. Think in English.", str(sum(terms)), data)

    def worked_solution(self, problem: Problem, rng: random.Random) -> str:
        terms, mixed = problem.data["terms"], problem.data.get("mixed_percent", 0) / 100
        lines, total = [], terms[0]
        for value in terms[1:]:
            words = [number_word(total), number_word(value), number_word(total + value)]
            if rng.random() < mixed:
                words = [w.translate(CYRILLIC) for w in words]
            lines.append(f"{words[0]} plus {words[1]} is {words[2]}")
            total += value
        return "\n".join(lines)

    def check(self, problem: Problem, answer: str) -> bool:
        return answer.strip() == problem.answer
