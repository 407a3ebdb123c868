"""GRPO straight from the base model (R1-Zero): sample G completions per prompt with the engine, score
them with the rule rewards, and push the policy towards the better ones. The loss is in `grpo_loss.py`."""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from pocketr1.config import RunConfig
from pocketr1.engine import SamplingParams, generate
from pocketr1.errors import UserError
from pocketr1.evaluate import evaluate_family
from pocketr1.model import Transformer
from pocketr1.model.transformer import attention_mask, positions_for
from pocketr1.tasks import get_family
from pocketr1.tasks.base import Problem
from pocketr1.tasks.rewards import accuracy_reward, format_reward, reflection_count
from pocketr1.tokenizer import ChatTokenizer
from pocketr1.train.common import Metrics, autocast, load_checkpoint, load_extra, make_optimizer, save_checkpoint
from pocketr1.train.grpo_loss import VARIANTS, LossParts, group_advantages, grpo_loss


@dataclass(slots=True)
class Rollout:
    """One step's samples as training tensors: prompts left-padded to `prompt_len`, completions after."""
    ids: torch.Tensor  # [N, prompt_len + T]
    pad_left: torch.Tensor  # [N]
    mask: torch.Tensor  # [N, T] 1 on sampled tokens (and the stop token when the sample finished)
    prompt_len: int
    rewards: torch.Tensor  # [N]
    accuracy: torch.Tensor  # [N]
    lengths: torch.Tensor  # [N] completion tokens
    reflections: torch.Tensor  # [N] reflection words in the thinking
    texts: list[str]


def draw_problems(families: list[str], difficulty: dict, n: int, seed: int) -> list[Problem]:
    """`n` training-split problems, families taken in turn, reproducible from `seed`."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        family = get_family(families[i % len(families)])
        out.append(family.sample(rng, family.difficulty(difficulty.get(family.name)), heldout=False))
    return out


def rollout(model: Transformer, tok: ChatTokenizer, problems: list[Problem], cfg: RunConfig, seed: int) -> Rollout:
    gc = cfg.grpo
    prompts = [tok.prompt_ids(p.question) for p in problems]
    params = SamplingParams(temperature=gc.temperature, max_new_tokens=gc.max_new_tokens, seed=seed)
    completions = generate(model, prompts, params, tok.stop_ids, n=gc.group_size, pad_id=tok.pad_id)
    device = model.lm_head.weight.device
    prompt_len = max(len(p) for p in prompts)
    width = max(1, max(len(c.ids) + c.finished for c in completions))
    n = len(completions)
    ids = torch.full((n, prompt_len + width), tok.pad_id, dtype=torch.long)
    mask = torch.zeros((n, width))
    pad_left = torch.zeros(n, dtype=torch.long)
    rewards, accuracy, reflections, texts = [], [], [], []
    for i, c in enumerate(completions):
        problem, prompt = problems[i // gc.group_size], prompts[i // gc.group_size]
        sampled = c.ids + ([tok.eos_id] if c.finished else [])
        pad_left[i] = prompt_len - len(prompt)
        ids[i, pad_left[i]:prompt_len] = torch.tensor(prompt)
        ids[i, prompt_len:prompt_len + len(sampled)] = torch.tensor(sampled, dtype=torch.long)
        mask[i, :len(sampled)] = 1.0
        text = tok.decode(c.ids)
        acc = accuracy_reward(problem, text)
        rewards.append(acc + gc.format_weight * format_reward(text, c.finished))
        accuracy.append(acc)
        reflections.append(reflection_count(text))
        texts.append(text)
    lengths = torch.tensor([len(c.ids) for c in completions], dtype=torch.float)
    return Rollout(ids.to(device), pad_left.to(device), mask.to(device), prompt_len,
                   torch.tensor(rewards, device=device), torch.tensor(accuracy), lengths,
                   torch.tensor(reflections, dtype=torch.float), texts)


def completion_logprobs(model: Transformer, batch: Rollout, rows: torch.Tensor) -> torch.Tensor:
    """log π(token) for every completion slot of `rows`: [len(rows), T]."""
    ids, pad_left = batch.ids[rows], batch.pad_left[rows]
    length = ids.shape[1]
    hidden = model.hidden(ids, positions_for(pad_left, 0, length), attention_mask(pad_left, length, length))
    # Position t predicts token t+1: the completion's tokens are predicted from prompt_len-1 onwards.
    logits = model.lm_head(hidden[:, batch.prompt_len - 1:-1]).float()
    targets = ids[:, batch.prompt_len:]
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None]).squeeze(-1)


def update(policy: Transformer, reference: Transformer | None, optimizer: torch.optim.Optimizer, batch: Rollout,
           cfg: RunConfig) -> LossParts | None:
    """One rollout's optimiser steps (`grpo.minibatches` of them); None when no group was informative."""
    gc, device = cfg.grpo, batch.ids.device
    advantages = group_advantages(batch.rewards, gc.group_size, gc.variant)
    keep = torch.arange(len(advantages), device=device)
    if gc.variant == "dapo":  # dynamic sampling: groups whose rewards are all equal teach nothing
        informative = batch.rewards.view(-1, gc.group_size).std(dim=1) > 0
        keep = keep[informative.repeat_interleave(gc.group_size)]
    if not len(keep):
        return None
    policy.train()
    with torch.no_grad(), autocast(device, cfg.dtype):
        # With one minibatch the policy has not moved since sampling, so π_old is π_θ detached (ratio 1).
        old = completion_logprobs(policy, batch, keep) if gc.minibatches > 1 else None
        ref = completion_logprobs(reference, batch, keep) if reference is not None else None
    parts = None
    for chunk in torch.arange(len(keep), device=device).chunk(gc.minibatches):
        rows = keep[chunk]
        with autocast(device, cfg.dtype):
            logp = completion_logprobs(policy, batch, rows)
        parts = grpo_loss(logp, logp.detach() if old is None else old[chunk], None if ref is None else ref[chunk],
                          advantages[rows], batch.mask[rows], gc.variant, gc.eps_low, gc.eps_high, gc.beta,
                          gc.max_new_tokens)
        optimizer.zero_grad(set_to_none=True)
        parts.loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
    return parts


def grpo(cfg: RunConfig, run_dir: Path, tok: ChatTokenizer, base: Transformer, device: torch.device,
         metrics: Metrics) -> Transformer:
    """GRPO from `base` for `grpo.steps` steps, resuming from the stage checkpoint if there is one."""
    gc = cfg.grpo
    if gc.variant not in VARIANTS:
        raise UserError(f"grpo.variant must be one of {', '.join(VARIANTS)}, not '{gc.variant}'.")
    ckpt_dir = run_dir / "grpo" / "checkpoint"
    factory = lambda m: make_optimizer(m, gc.lr, 0.0)  # noqa: E731
    loaded = load_checkpoint(ckpt_dir, factory, device)
    if loaded:
        policy, optimizer, progress = loaded
        start = progress["step"]
    else:
        policy = copy.deepcopy(base).float().train()
        optimizer, start = factory(policy), 0
    reference = copy.deepcopy(base).eval().requires_grad_(False) if gc.beta > 0 else None
    if reference is not None and gc.ref_reset_every and start >= gc.ref_reset_every:
        load_extra(progress["folder"], "reference", reference)  # the policy as of the last reset
    metrics.truncate("grpo", start)
    metrics.truncate("grpo_eval", start)
    if start == 0:
        _log_heldout(policy, tok, cfg, metrics, 0)
    bar = tqdm(range(start, gc.steps), initial=start, total=gc.steps, desc="grpo", unit="step", dynamic_ncols=True)
    for step in bar:
        t0 = time.perf_counter()
        if reference is not None and gc.ref_reset_every and step > 0 and step % gc.ref_reset_every == 0:
            reference.load_state_dict(policy.state_dict())
        problems = draw_problems(cfg.data.families, cfg.data.difficulty, gc.prompts_per_step, cfg.seed * 7919 + step)
        policy.eval()
        batch = rollout(policy, tok, problems, cfg, seed=cfg.seed * 104_729 + step)
        t_roll = time.perf_counter() - t0
        parts = update(policy, reference, optimizer, batch, cfg)
        stats = {
            "reward": round(batch.rewards.mean().item(), 4),
            "accuracy": round(batch.accuracy.mean().item(), 4),
            "response_length": round(batch.lengths.mean().item(), 2),
            "reflection_rate": round((batch.reflections > 0).float().mean().item(), 4),
            "kl": round(parts.kl, 5) if parts else 0.0,
            "clip_fraction": round(parts.clipped, 4) if parts else 0.0,
            "rollout_s": round(t_roll, 2),
            "step_s": round(time.perf_counter() - t0, 2),
        }
        metrics.log("grpo", step + 1, **stats)
        bar.set_postfix(reward=stats["reward"], len=stats["response_length"])
        if gc.eval_every and (step + 1) % gc.eval_every == 0:
            _log_heldout(policy, tok, cfg, metrics, step + 1)
        if (step + 1) % gc.checkpoint_every == 0 and step + 1 < gc.steps:
            keep_ref = {"reference": reference} if reference is not None and gc.ref_reset_every else None
            save_checkpoint(ckpt_dir, policy, optimizer, {"step": step + 1}, extra=keep_ref)
    bar.close()
    return policy.eval()


def _log_heldout(model: Transformer, tok: ChatTokenizer, cfg: RunConfig, metrics: Metrics, step: int) -> None:
    """Held-out pass@1 (one sample per problem at the eval temperature) for the accuracy-vs-step curve."""
    model.eval()
    values = {}
    for name in cfg.data.families:
        family = get_family(name)
        row = evaluate_family(model, tok, family, family.difficulty(cfg.data.difficulty.get(name)),
                              cfg.grpo.eval_problems, k=1, ec=cfg.eval, greedy=False)
        values[f"heldout_{name}"] = round(row["pass@1"], 4)
    metrics.log("grpo_eval", step, **values)
