"""GRPO's objective, as in DeepSeekMath / R1, with the Dr. GRPO and DAPO variants as switches.

    ρ = π_θ / π_old per token,  A_i = (r_i − mean r) / std r  (per group of G samples of one prompt)
    per-token loss = −min(ρ·A, clip(ρ, 1−ε_low, 1+ε_high)·A) + β·KL_k3,
    KL_k3 = exp(ref − logp) − (ref − logp) − 1

Variants differ only in how advantages are normalised and how token losses are averaged:
    grpo     std-normalised A; mean over each sequence's tokens, then over sequences
    dr_grpo  A = r − mean r (no std); sum over tokens / a constant (the generation budget)
    dapo     std-normalised A; one mean over every token in the batch (use with eps_high > eps_low)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
