"""Evaluation as the R1 paper reports it, on held-out problems only: pass@1 averaged over k samples at
T=0.6, top-p 0.95; cons@k (majority vote over the k answers); greedy accuracy as a side figure; mean
response length; and how often the model thinks at all and reflects ("wait", "check")."""

from __future__ import annotations

from collections import Counter

from pocketr1.config import EvalConfig
from pocketr1.engine import SamplingParams, generate
from pocketr1.model import Transformer
from pocketr1.tasks.base import Problem, TaskFamily
from pocketr1.tasks.rewards import consistency_reward, parse_completion, reflection_count
from pocketr1.tokenizer import ChatTokenizer

EVAL_SEED = 20250122  # held-out problems are the same for every model and run


def _complete(model, tok, problems: list[Problem], n: int, params: SamplingParams, batch_size: int):
    """Completions (text, token count) for each problem, `n` each, in chunks that fit `batch_size` rows."""
    per_chunk = max(1, batch_size // n)
    texts = []
    for start in range(0, len(problems), per_chunk):
        chunk = problems[start:start + per_chunk]
        prompts = [tok.prompt_ids(p.question) for p in chunk]
        params.seed = None if params.seed is None else params.seed + start
        for c in generate(model, prompts, params, tok.stop_ids, n=n, pad_id=tok.pad_id):
            texts.append((tok.decode(c.ids), len(c.ids)))
    return [texts[i * n:(i + 1) * n] for i in range(len(problems))]


def majority_correct(family: TaskFamily, problem: Problem, answers: list[str | None]) -> bool:
    """cons@k: the most common parsed answer (ties: the first seen) is checked."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return False
    top = max(votes.values())
    winner = next(a for a in answers if a is not None and votes[a] == top)
    return family.check(problem, winner)


def evaluate_family(model: Transformer, tok: ChatTokenizer, family: TaskFamily, difficulty: dict[str, int],
                    n_problems: int, k: int, ec: EvalConfig, greedy: bool = True, seed: int = EVAL_SEED) -> dict:
    problems = family.problems(n_problems, seed, difficulty, heldout=True)
    sampled = _complete(model, tok, problems, k,
                        SamplingParams(ec.temperature, ec.top_p, 0, ec.max_new_tokens, seed=seed), ec.batch_size)
    correct, votes, lengths, thinking, reflecting, language = [], [], [], [], [], []
    for problem, outs in zip(problems, sampled):
        answers = []
        for text, n_tokens in outs:
            parsed = parse_completion(text)
            answers.append(parsed.answer)
            correct.append(parsed.answer is not None and family.check(problem, parsed.answer))
            lengths.append(n_tokens)
            thinking.append(bool(parsed.thinking.strip()))
            reflecting.append(reflection_count(text) > 0)
            language.append(consistency_reward(problem, text))  # R1's readability figure
        votes.append(majority_correct(family, problem, answers))
    mean = lambda xs: sum(xs) / max(1, len(xs))  # noqa: E731
    row = {
        "family": family.name, "difficulty": difficulty, "problems": len(problems), "k": k,
        "pass@1": mean(correct), f"cons@{k}": mean(votes), "mean_length": mean(lengths),
        "thinking_rate": mean(thinking), "reflection_rate": mean(reflecting),
        "language_consistency": mean(language),
    }
    if greedy:
        outs = _complete(model, tok, problems, 1, SamplingParams(0.0, 1.0, 0, ec.max_new_tokens), ec.batch_size)
        row["greedy"] = mean([family.check(p, a) if (a := parse_completion(o[0][0]).answer) is not None else False
                              for p, o in zip(problems, outs)])
    return row
