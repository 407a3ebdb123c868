"""GRPO's objective, as in DeepSeekMath / R1, with the Dr. GRPO and DAPO variants as switches.

    ρ = π_θ / π_old per token,  A_i = (r_i − mean r) / std r  (per group of G samples of one prompt)
    per-token loss = −min(ρ·A, clip(ρ, 1−ε_low, 1+ε_high)·A) + β·KL_k3,
    KL_k3 = exp(ref − logp) − (ref − logp) − 1

Variants differ only in how advantages are normalised and how token losses are averaged:
    grpo     std-normalised A; mean over each sequence's tokens, then over sequences
    dr_grpo  A = r − mean r (no std); sum over tokens / a constant (the generation budget)
    dapo     std-normalised A; one mean over every token in the batch (use with eps_high > eps_low)

DAPO's two other pieces act on rewards and on which groups are trained on, before the loss; they are here
as plain functions so each can be checked on a hand-computed batch:
    soft overlong penalty  0 up to (budget − cache) tokens, then linearly down to −1 at the budget
    dynamic sampling       keep only groups whose rewards differ (the others have A = 0 everywhere),
                           drawing new prompts until the step has enough of them
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

T = TypeVar("T")

VARIANTS = ("grpo", "dr_grpo", "dapo")


def group_advantages(rewards: torch.Tensor, group_size: int, variant: str) -> torch.Tensor:
    """Advantages for rewards laid out group by group ([prompt0 × G, prompt1 × G, ...])."""
    grouped = rewards.view(-1, group_size)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if variant != "dr_grpo":
        centered = centered / (grouped.std(dim=1, keepdim=True) + 1e-4)  # unbiased std, as TRL
    return centered.flatten()


@dataclass(slots=True)
class LossParts:
    loss: torch.Tensor
    kl: float  # mean k3 KL per token
    clipped: float  # share of tokens where the clip was active
    tokens: float = 0.0  # completion tokens these means are over (to combine data-parallel ranks' figures)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, variant: str, eps_low: float, eps_high: float,
              beta: float, budget: int, denominator: float | None = None) -> LossParts:
    """Loss over completions [N, T]; `mask` marks real completion tokens; `budget` is max_new_tokens.
    `denominator` replaces the local count the variant averages over (sequences, or tokens for dapo): a
    data-parallel rank divides its sum by the global count so that its share adds up to the global mean."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(logp)
    if ref_logp is not None and beta > 0:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
    per_token = per_token * mask
    lengths = mask.sum(dim=1).clamp(min=1)
    if variant == "grpo":
        per_seq = per_token.sum(dim=1) / lengths
    elif variant == "dr_grpo":
        per_seq = per_token.sum(dim=1) / budget
    elif variant == "dapo":
        loss = per_token.sum() / (mask.sum().clamp(min=1) if denominator is None else denominator)
    else:
        raise ValueError(f"unknown GRPO variant {variant!r}")
    if variant != "dapo":
        loss = per_seq.mean() if denominator is None else per_seq.sum() / denominator
    with torch.no_grad():  # diagnostics only
        n_tokens = mask.sum().clamp(min=1)
        clip_active = (clipped < unclipped).float() * mask  # the min took the clipped term: no gradient there
        return LossParts(loss, float((kl * mask).sum() / n_tokens), float(clip_active.sum() / n_tokens),
                         float(mask.sum()))


def overlong_penalty(length: int, budget: int, cache: int) -> float:
    """DAPO's soft overlong punishment for a completion of `length` tokens under a `budget` of new tokens:
    0 while length <= budget − cache, then ((budget − cache) − length) / cache, reaching −1 at the budget
    (a completion cut off there). `cache` <= 0 turns it off."""
    if cache <= 0:
        return 0.0
    return max(-1.0, min(0.0, (budget - cache - length) / cache))


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[groups] bool: True where the group's rewards are not all equal (only those carry an advantage)."""
    grouped = rewards.view(-1, group_size)
    return grouped.amax(dim=1) > grouped.amin(dim=1)


def fill_informative(sample_round: Callable[[int, int], Sequence[tuple[T, Sequence[float]]]], needed: int,
                     max_rounds: int) -> tuple[list[T], dict[str, int]]:
    """DAPO's dynamic sampling. `sample_round(round, n)` draws `n` new groups as (group, rewards); groups
    whose rewards are all equal are dropped and new ones drawn until `needed` are kept or `max_rounds`
    rounds are spent. When no group at all was informative the first round is returned as it is (the
    step then learns nothing from rewards, as plain GRPO would). Also returns what was drawn and kept."""
    kept: list[T] = []
    first: list[T] = []
    drawn = 0
    for r in range(max(1, max_rounds)):
        groups = sample_round(r, needed - len(kept))
        drawn += len(groups)
        if r == 0:
            first = [g for g, _ in groups]
        kept += [g for g, rewards in groups if max(rewards) > min(rewards)]
        if len(kept) >= needed:
            break
    stats = {"groups_drawn": drawn, "groups_informative": len(kept), "rounds": r + 1}
    return (kept[:needed] if kept else first), stats
