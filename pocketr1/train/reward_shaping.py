"""The reward a GRPO sample is trained on: R1's rule rewards plus the optional shaping terms.

    reward = accuracy + format_weight · format + language_weight · language consistency + overlong penalty

Accuracy and format are R1's (tasks/rewards.py). Language consistency is R1's readability term: the share
of the thinking written in the prompt's target script, summed with accuracy. The overlong penalty is DAPO's
soft punishment of completions that run into the token budget (grpo_loss.overlong_penalty). The terms
that are off (weight 0, cache 0) cost nothing.
"""

from __future__ import annotations

from pocketr1.config import GRPOConfig
from pocketr1.tasks.base import Problem
from pocketr1.tasks.rewards import accuracy_reward, consistency_reward, format_reward
from pocketr1.train.grpo_loss import overlong_penalty


def language_score(problem: Problem, completion: str) -> float:
    """Share of the thinking's letters in the problem's target script (1.0 when it has no letters)."""
    return consistency_reward(problem, completion)


def shaped_reward(problem: Problem, completion: str, finished: bool, n_tokens: int,
                  gc: GRPOConfig) -> tuple[float, float]:
    """(reward, accuracy) of one sample."""
    accuracy = accuracy_reward(problem, completion)
    reward = accuracy + gc.format_weight * format_reward(completion, finished)
    if gc.language_weight:
        reward += gc.language_weight * language_score(problem, completion)
    if gc.overlong_cache:
        reward += overlong_penalty(n_tokens, gc.max_new_tokens, gc.overlong_cache)
    return reward, accuracy
