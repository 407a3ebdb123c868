"""Knights and Knaves (as in Logic-RL): knights always tell the truth, knaves always lie; say who is who.

`Knights tell the truth, knaves lie. A: B is a knave. B: A and B are alike. Who is what?` ->
`A knight, B knave`. Each puzzle is kept only when brute force over all 2^N assignments finds exactly one
that fits. The worked solution is that case analysis, written out tersely (a small model's token budget is
short): the cases in a fixed order, each stopping at the first speaker whose claim contradicts it
(`A knight, B knight: A false, no` - a knight's claim is false), until the one that fits.
"""

from __future__ import annotations

import itertools
import random
import re

from pocketr1.tasks.base import Problem, TaskFamily

NAMES = "ABCDE"
RULES = "Knights tell the truth, knaves lie."
# A claim: ("is", X, knight?) or (kind, X, Y) with kind alike | different | knights (both) | knaves (both);
# X and Y index the people.
Claim = tuple[str, int, object]
_PAIR = re.compile(r"\b([A-Z])\b[\s:=\-]*(?:is\s+)?(?:an?\s+)?((?i:knight|knave))s?\b")
_ROLE = re.compile(r"(?i:knight|knave)")


def _true(claim: Claim, roles: tuple[bool, ...]) -> bool:
    kind, x, y = claim
    if kind == "is":
        return roles[x] == y
    if kind in ("knights", "knaves"):
        return roles[x] == roles[y] == (kind == "knights")
    return (roles[x] == roles[y]) == (kind == "alike")


def _say(claim: Claim) -> str:
    kind, x, y = claim
    if kind == "is":
        return f"{NAMES[x]} is a {'knight' if y else 'knave'}"
    return f"{NAMES[x]} and {NAMES[y]} are {'both ' if kind in ('knights', 'knaves') else ''}{kind}"


def _fits(claims: list[Claim], roles: tuple[bool, ...]) -> int | None:
    """The first speaker whose claim contradicts `roles` (a knight saying something false or a knave
    something true), or None when every claim is consistent."""
    for speaker, claim in enumerate(claims):
        if _true(claim, roles) != roles[speaker]:
            return speaker
    return None


def _cases(n: int) -> list[tuple[bool, ...]]:
    return list(itertools.product((True, False), repeat=n))  # knights first: the order the solution tries


def solutions(claims: list[Claim]) -> list[tuple[bool, ...]]:
    return [roles for roles in _cases(len(claims)) if _fits(claims, roles) is None]


def _render(roles: tuple[bool, ...] | dict[str, bool]) -> str:
    items = roles.items() if isinstance(roles, dict) else zip(NAMES, roles)
    return ", ".join(f"{name} {'knight' if knight else 'knave'}" for name, knight in items)


def parse_roles(answer: str) -> dict[str, bool] | None:
    """`A knight, B knave` and its variants (`A: knight; B is a knave`, `a=Knight b=knave` is not: names are
    capitals). None when a role word is left unpaired or a person is named twice (hedging earns nothing)."""
    pairs = _PAIR.findall(answer)
    if not pairs or len(pairs) != len(_ROLE.findall(answer)):
        return None
    roles: dict[str, bool] = {}
    for name, role in pairs:
        if name in roles:
            return None
        roles[name] = role.lower() == "knight"
    return roles


class Knights(TaskFamily):
    name = "knights"
    defaults = {"min_people": 2, "max_people": 3}

    def generate(self, rng: random.Random, difficulty: dict[str, int]) -> Problem:
        n = rng.randint(difficulty["min_people"], min(difficulty["max_people"], len(NAMES)))
        while True:
            claims = [self._claim(rng, n) for _ in range(n)]
            found = solutions(claims)
            if len(found) == 1:
                break
        said = " ".join(f"{NAMES[i]}: {_say(c)}." for i, c in enumerate(claims))
        return Problem(self.name, f"{RULES} {said} Who is what?", _render(found[0]), {"claims": claims})

    @staticmethod
    def _claim(rng: random.Random, n: int) -> Claim:
        kind = rng.choice(["is", "is", "alike", "different", "knights", "knaves"])
        if kind == "is":
            return ("is", rng.randrange(n), rng.random() < 0.5)
        x, y = sorted(rng.sample(range(n), 2))
        return (kind, x, y)

    def worked_solution(self, problem: Problem, rng: random.Random) -> str:
        claims = problem.data["claims"]
        lines = []
        for roles in _cases(len(claims)):
            liar = _fits(claims, roles)
            if liar is None:
                lines.append(f"{_render(roles)}: fits")
                break
            # The claim's truth in this case: a knight's false claim or a knave's true one rules it out.
            value = "true" if _true(claims[liar], roles) else "false"
            lines.append(f"{_render(roles)}: {NAMES[liar]} {value}, no")
        return "\n".join(lines)

    def check(self, problem: Problem, answer: str) -> bool:
        gold = parse_roles(problem.answer)
        return parse_roles(answer) == gold
