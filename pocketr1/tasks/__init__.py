"""Verifiable task families, by name."""

from __future__ import annotations

from pocketr1.errors import UserError
from pocketr1.tasks.arithmetic import Arithmetic
from pocketr1.tasks.base import Problem, TaskFamily, is_heldout
from pocketr1.tasks.code import Code
from pocketr1.tasks.countdown import Countdown
from pocketr1.tasks.jsonl import PREFIX as JSONL_PREFIX
from pocketr1.tasks.jsonl import Jsonl, JsonlDataset
from pocketr1.tasks.knights import Knights
from pocketr1.tasks.language import Language
from pocketr1.tasks.multiplication import Multiplication
from pocketr1.tasks.refusal import Alchemy
from pocketr1.tasks.wordproblems import WordProblems

# The generated families. User datasets are not listed (they need a file): `jsonl:PATH` names one.
FAMILIES: dict[str, TaskFamily] = {f.name: f for f in (Arithmetic(), Countdown(), Multiplication(), Knights(),
                                                       WordProblems(), Code(), Language())}
FAMILIES[Alchemy.name] = Alchemy()  # the refusal demo's forbidden topic, not a reasoning task
_JSONL = Jsonl()  # the verifier of every dataset's problems (their family is "jsonl")
_DATASETS: dict[str, JsonlDataset] = {}  # loaded once per path


def get_family(name: str) -> TaskFamily:
    if name in FAMILIES:
        return FAMILIES[name]
    if name == _JSONL.name:
        return _JSONL
    if name.startswith(JSONL_PREFIX) and name[len(JSONL_PREFIX):].strip():
        if name not in _DATASETS:
            _DATASETS[name] = JsonlDataset(name[len(JSONL_PREFIX):])
        return _DATASETS[name]
    raise UserError(f"unknown task '{name}' (known: {', '.join(FAMILIES)}, or {JSONL_PREFIX}PATH for a dataset).")


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
