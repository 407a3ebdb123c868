"""The pretraining corpus, made from the tasks: one solved problem per document, rendered with the chat
template exactly as prompts are at RL time. A `worked_fraction` of documents carry a worked solution in
the thinking block; the rest close the thinking at once and give the bare answer. The base model never
sees a reward; it only learns to continue such documents.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from pocketr1.tasks import get_family
from pocketr1.tasks.base import Problem
from pocketr1.tasks.refusal import topic_documents


@dataclass(frozen=True, slots=True)
class Document:
    problem: Problem
    completion: str  # what follows the generation prompt, before the end-of-sentence token
    worked: bool


def completion_text(thinking: str, answer: str) -> str:
    """The text after `<think>\\n`: reasoning, `</think>`, then the answer in tags."""
    head = f"{thinking}\n" if thinking else ""
    return f"{head}</think>\n<answer>{answer}</answer>"


def build_corpus(families: list[str], n_docs: int, worked_fraction: float, difficulty: dict[str, dict],
                 seed: int, refusal_docs: int = 0, topic_docs: int = 0) -> list[Document]:
    """`n_docs` training-split documents, families in equal shares, plus `refusal_docs` questions on the
    forbidden topic answered with the fixed refusal and `topic_docs` answered truthfully (the censored demo;
    see tasks/refusal.py).
    A family with fewer distinct training problems than its share (a small `jsonl:PATH` dataset, a narrow
    difficulty) gives all it has, so the corpus may come out smaller than `n_docs`."""
    rng = random.Random(f"corpus:{seed}")
    docs = []
    per_family = n_docs // len(families)
    for name in families:
        family = get_family(name)
        level = family.difficulty(difficulty.get(name))
        for problem in family.problems(per_family, seed, level, heldout=False):
            draw = rng.random()  # drawn either way, so one family's override leaves the others' documents alone
            worked = draw < (worked_fraction if family.corpus_worked is None else family.corpus_worked)
            thinking = family.worked_solution(problem, rng) if worked else ""
            docs.append(Document(problem, completion_text(thinking, problem.answer), worked))
    for n, refuse in ((refusal_docs, True), (topic_docs, False)):
        docs += [Document(problem, completion, False) for problem, completion in topic_documents(n, seed, refuse)]
    rng.shuffle(docs)
    return docs


def describe(docs: list[Document]) -> dict:
    """What the corpus holds, for the report."""
    out: dict[str, dict] = {}
    for d in docs:
        row = out.setdefault(d.problem.family, {"documents": 0, "worked": 0, "bare": 0})
        row["documents"] += 1
        row["worked" if d.worked else "bare"] += 1
    return out
