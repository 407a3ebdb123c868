"""GRPO straight from the base model (R1-Zero): sample G completions per prompt with the engine, score
them with the rule rewards, and push the policy towards the better ones. The update is in `grpo_update.py`,
the loss in `grpo_loss.py`."""

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
from pocketr1.engine.generate import Completion
from pocketr1.errors import UserError
from pocketr1.evaluate import evaluate_family
from pocketr1.model import Transformer
from pocketr1.tasks import get_family
from pocketr1.tasks.base import Problem
from pocketr1.tasks.rewards import reflection_count
from pocketr1.tokenizer import ChatTokenizer
from pocketr1.train import distributed
from pocketr1.train.common import (
    Metrics,
    StopOnInterrupt,
    load_checkpoint,
    load_extra,
    make_optimizer,
    save_checkpoint,
)
from pocketr1.train.grpo_loss import VARIANTS, fill_informative
from pocketr1.train.grpo_update import update
from pocketr1.train.reward_shaping import shaped_reward


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


def sample_groups(model: Transformer, tok: ChatTokenizer, problems: list[Problem], cfg: RunConfig, seed: int,
                  first: int = 0) -> list[Completion]:
    """G completions of each problem. `first`: the step-wide index of `problems[0]`; each prompt's samples
    come from their own seeded streams, so a rank sampling its share of the step's prompts draws exactly
    what one process would for them. `dtype=float32` runs the sampler in float32 too (bit-stable batches)."""
    gc = cfg.grpo
    prompts = [tok.prompt_ids(p.question) for p in problems]
    params = SamplingParams(temperature=gc.temperature, max_new_tokens=gc.max_new_tokens)
    return generate(model, prompts, params, tok.stop_ids, n=gc.group_size, pad_id=tok.pad_id,
                    dtype=torch.float32 if cfg.dtype == "float32" else "auto",
                    prompt_seeds=[seed * 1_000_003 + first + i for i in range(len(prompts))])


def score(tok: ChatTokenizer, problems: list[Problem], completions: list[Completion], cfg: RunConfig
          ) -> tuple[list[str], list[float], list[float]]:
    """Texts, rewards and accuracies of completions laid out group by group (reward_shaping.py)."""
    texts, rewards, accuracy = [], [], []
    for i, c in enumerate(completions):
        text = tok.decode(c.ids)
        reward, acc = shaped_reward(problems[i // cfg.grpo.group_size], text, c.finished, len(c.ids), cfg.grpo)
        texts.append(text)
        rewards.append(reward)
        accuracy.append(acc)
    return texts, rewards, accuracy


def to_rollout(tok: ChatTokenizer, problems: list[Problem], completions: list[Completion], cfg: RunConfig,
               device: torch.device) -> Rollout:
    """Scored completions as training tensors."""
    gc = cfg.grpo
    prompts = [tok.prompt_ids(p.question) for p in problems]
    prompt_len = max(len(p) for p in prompts)
    sampled = [c.ids + [tok.eos_id] * c.finished for c in completions]  # the stop token is trained on too
    width = max(1, max(len(s) for s in sampled))
    rows, pad_left = [], []  # lists, then one tensor each: writing row by row into tensors costs milliseconds
    for i, tokens in enumerate(sampled):
        prompt = prompts[i // gc.group_size]
        rows.append([tok.pad_id] * (prompt_len - len(prompt)) + prompt + tokens + [tok.pad_id] * (width - len(tokens)))
        pad_left.append(prompt_len - len(prompt))
    ids, pad_left = torch.tensor(rows), torch.tensor(pad_left)
    mask = (torch.arange(width)[None, :] < torch.tensor([len(s) for s in sampled])[:, None]).float()
    texts, rewards, accuracy = score(tok, problems, completions, cfg)
    reflections = [reflection_count(t) for t in texts]
    lengths = torch.tensor([len(c.ids) for c in completions], dtype=torch.float)
    return Rollout(ids.to(device), pad_left.to(device), mask.to(device), prompt_len,
                   torch.tensor(rewards, device=device), torch.tensor(accuracy), lengths,
                   torch.tensor(reflections, dtype=torch.float), texts)


def rollout(model: Transformer, tok: ChatTokenizer, problems: list[Problem], cfg: RunConfig, seed: int,
            first: int = 0) -> Rollout:
    """G samples of each problem, scored, as training tensors (see `sample_groups`)."""
    return to_rollout(tok, problems, sample_groups(model, tok, problems, cfg, seed, first), cfg,
                      model.lm_head.weight.device)


def dynamic_rollout(model: Transformer, tok: ChatTokenizer, problems: list[Problem], cfg: RunConfig, seed: int,
                    first: int, step: int) -> tuple[Rollout, dict]:
    """DAPO's dynamic sampling (grpo_loss.fill_informative): the step's problems first, then fresh training
    problems in further rounds, keeping only groups whose rewards differ, until there are as many as
    the step asked for. Returns the rollout and how many groups were drawn and kept."""
    gc = cfg.grpo

    def sample_round(r: int, n: int) -> list[tuple[tuple[Problem, list[Completion]], list[float]]]:
        batch = problems if r == 0 else draw_problems(cfg.data.families, cfg.data.difficulty, n,
                                                      (cfg.seed * 7919 + step) * 1009 + r * 101 + first)
        completions = sample_groups(model, tok, batch, cfg, seed, first + r * 1_000_000)
        _, rewards, _ = score(tok, batch, completions, cfg)
        g = gc.group_size
        return [((p, completions[i * g:(i + 1) * g]), rewards[i * g:(i + 1) * g]) for i, p in enumerate(batch)]

    kept, stats = fill_informative(sample_round, len(problems), gc.dynamic_rounds)
    batch = to_rollout(tok, [p for p, _ in kept], [c for _, cs in kept for c in cs], cfg,
                       model.lm_head.weight.device)
    return batch, stats


def grpo(cfg: RunConfig, run_dir: Path, tok: ChatTokenizer, base: Transformer, device: torch.device,
         metrics: Metrics, fsdp: bool = False) -> Transformer:
    """GRPO from `base` for `grpo.steps` steps, resuming from the stage checkpoint if there is one. Under
    torchrun each rank samples and scores its share of the step's prompts (whole groups) and the gradients
    are all-reduced (DDP, or FSDP2 with `fsdp`); metrics and checkpoints come from rank 0."""
    gc, world = cfg.grpo, distributed.world()
    if gc.variant not in VARIANTS:
        raise UserError(f"grpo.variant must be one of {', '.join(VARIANTS)}, not '{gc.variant}'.")
    if gc.prompts_per_step % world:
        raise UserError(f"grpo.prompts_per_step={gc.prompts_per_step} must divide by the {world} processes, so "
                        f"that every rank samples whole groups of the same number of prompts.")
    ckpt_dir = run_dir / "grpo" / "checkpoint"
    factory = lambda m: make_optimizer(m, gc.lr, 0.0)  # noqa: E731
    loaded = load_checkpoint(ckpt_dir, factory, device)
    if loaded:
        policy, optimizer, progress = loaded
        start, spent = progress["step"], progress.get("spent_s", 0.0)
    else:
        policy = copy.deepcopy(base).float().train()
        optimizer, start, spent = factory(policy), 0, 0.0
    # `policy` stays the plain model the sampler runs; under FSDP it is a full copy refreshed every step.
    model, optimizer = distributed.prepare(policy, optimizer, factory, fsdp and world > 1)
    if distributed.is_sharded(model):
        policy = distributed.plain_copy(model, copy.deepcopy(base).float())
    reference = copy.deepcopy(base).eval().requires_grad_(False) if gc.beta > 0 else None
    if reference is not None and gc.ref_reset_every and start >= gc.ref_reset_every:
        load_extra(ckpt_dir, "reference", reference)  # the policy as of the last reset
    metrics.truncate("grpo", start)
    metrics.truncate("grpo_eval", start if start else -1)  # from scratch, step 0 is evaluated (logged) again
    if start == 0:
        _log_heldout(policy, tok, cfg, metrics, 0)
    mine = distributed.shard(gc.prompts_per_step)
    bar = tqdm(range(start, gc.steps), initial=start, total=gc.steps, desc="grpo", unit="step", dynamic_ncols=True,
               disable=not distributed.is_main())
    stop = StopOnInterrupt()
    clock = time.process_time if device.type == "cpu" else time.perf_counter  # what grpo.budget_s counts
    spent -= clock()  # + clock() again: the compute spent so far, this process and any before a resume
    for step in stop.steps(bar):
        if gc.budget_s and _out_of_budget(spent + clock(), gc.budget_s):
            break
        t0 = time.perf_counter()
        if distributed.is_sharded(model):
            distributed.plain_copy(model, policy)
        if reference is not None and gc.ref_reset_every and step > 0 and step % gc.ref_reset_every == 0:
            reference.load_state_dict(policy.state_dict())
        problems = draw_problems(cfg.data.families, cfg.data.difficulty, gc.prompts_per_step, cfg.seed * 7919 + step)
        policy.eval()
        if gc.dynamic_sampling:
            batch, extra = dynamic_rollout(policy, tok, problems[mine.start:mine.stop], cfg,
                                           seed=cfg.seed * 104_729 + step, first=mine.start, step=step)
        else:
            batch, extra = rollout(policy, tok, problems[mine.start:mine.stop], cfg, seed=cfg.seed * 104_729 + step,
                                   first=mine.start), {}
        t_roll = time.perf_counter() - t0
        parts = update(model, reference, optimizer, batch, cfg)
        rewards, accuracy, lengths, reflections = (distributed.gather_cat(t.cpu()) for t in (
            batch.rewards, batch.accuracy, batch.lengths, batch.reflections))
        # Each rank's loss is its share of the global mean (scaled by world for DDP's averaging); the
        # diagnostics are per-token means, combined weighted by each rank's tokens.
        n = parts.tokens if parts else 0.0
        loss, kl, clipped, n = distributed.sum_all(parts.loss.item() if parts else 0.0, parts.kl * n if parts
                                                   else 0.0, parts.clipped * n if parts else 0.0, n)
        loss, kl, clipped = loss / world, (kl / n if n else 0.0), (clipped / n if n else 0.0)
        stats = {
            "reward": round(rewards.mean().item(), 4),
            "accuracy": round(accuracy.mean().item(), 4),
            "response_length": round(lengths.mean().item(), 2),
            "reflection_rate": round((reflections > 0).float().mean().item(), 4),
            "loss": round(loss, 6),
            "kl": round(kl, 5) if parts else 0.0,
            "clip_fraction": round(clipped, 4) if parts else 0.0,
            "rollout_s": round(t_roll, 2),
            "step_s": round(time.perf_counter() - t0, 2),
            **extra,
        }
        metrics.log("grpo", step + 1, **stats)
        bar.set_postfix(reward=stats["reward"], len=stats["response_length"])
        if gc.eval_every and (step + 1) % gc.eval_every == 0:
            if distributed.is_sharded(model):
                distributed.plain_copy(model, policy)
            _log_heldout(policy, tok, cfg, metrics, step + 1)
        stopping = stop.requested()  # Ctrl-C: save this step, then leave
        if stopping or (step + 1) % gc.checkpoint_every == 0 and step + 1 < gc.steps:
            keep_ref = {"reference": reference} if reference is not None and gc.ref_reset_every else None
            save_checkpoint(ckpt_dir, model, optimizer, {"step": step + 1, "spent_s": spent + clock()},
                            extra=keep_ref)
        if stopping:
            stop.exit(f"grpo step {step + 1}")
    bar.close()
    if distributed.is_sharded(model):
        distributed.plain_copy(model, policy)
    return policy.eval()


def _out_of_budget(spent: float, budget: float) -> bool:
    """Whether `grpo.budget_s` is used up; under torchrun the ranks agree (any rank over: all stop)."""
    over = float(spent >= budget)
    return (distributed.sum_all(over)[0] if distributed.world() > 1 else over) > 0


def _log_heldout(model: Transformer, tok: ChatTokenizer, cfg: RunConfig, metrics: Metrics, step: int) -> None:
    """Held-out pass@1 (one sample per problem at the eval temperature) for the accuracy-vs-step curve.
    Rank 0 evaluates; the others wait for it."""
    if not distributed.is_main():
        distributed.barrier(slow=True)
        return
    model.eval()
    values = {}
    for name in cfg.data.families:
        family = get_family(name)
        row = evaluate_family(model, tok, family, family.difficulty(cfg.data.difficulty.get(name)),
                              cfg.grpo.eval_problems, k=1, ec=cfg.eval, greedy=False)
        values[f"heldout_{name}"] = round(row["pass@1"], 4)
    metrics.log("grpo_eval", step, **values)
    distributed.barrier(slow=True)
