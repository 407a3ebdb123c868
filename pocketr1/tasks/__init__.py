"""Verifiable task families, by name."""

from __future__ import annotations

from pocketr1.errors import UserError
from pocketr1.tasks.arithmetic import Arithmetic
from pocketr1.tasks.base import Problem, TaskFamily, is_heldout
from pocketr1.tasks.countdown import Countdown

FAMILIES: dict[str, TaskFamily] = {f.name: f for f in (Arithmetic(), Countdown())}


def get_family(name: str) -> TaskFamily:
    if name not in FAMILIES:
        raise UserError(f"unknown task '{name}' (known: {', '.join(FAMILIES)}).")
    return FAMILIES[name]


def parse_difficulty(text: str) -> dict[str, int]:
    """`key=value,key=value` as given on the command line."""
    out: dict[str, int] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not value.strip().lstrip("-").isdigit():
            raise UserError(f"difficulty '{item}' should look like key=integer.")
        out[key.strip()] = int(value)
    return out


__all__ = ["FAMILIES", "Problem", "TaskFamily", "get_family", "is_heldout", "parse_difficulty"]
