"""GRPO's update: the rollout's log-probabilities under the policy (and the reference), the loss
(`grpo_loss.py`), the gradients and the optimiser step.

On a CPU with several threads, each minibatch's forward and backward run as `threads` independent halves
(whole sequences each), one per Python thread with one intra-op thread each, and their gradients are summed:
the loss divides by the minibatch's global count, so the sum is the gradient of the whole. Splitting the
work beats splitting each op: a tiny model's ops are too small for intra-op threads to pay, and with
`OMP_WAIT_POLICY=passive` each parallel region also pays a worker's wake-up (2-core VM: the update took 207
ms one way, 164 ms the other). PyTorch releases the GIL inside ops, and these are big enough to overlap.
"""

from __future__ import annotations

import threading

import torch

from pocketr1.config import RunConfig
from pocketr1.engine.generate import runner
from pocketr1.model import Transformer
from pocketr1.train import distributed
from pocketr1.train.common import autocast
from pocketr1.train.grpo_batch import TreeBatch, pack_groups, scatter_logprobs
from pocketr1.train.grpo_loss import LossParts, group_advantages, grpo_loss

HEAD_ROWS = 256  # the update's output head runs on a multiple of this many states (`completion_logprobs`)


def completion_logprobs(model: Transformer, batch, rows: torch.Tensor, tree: TreeBatch | None = None) -> torch.Tensor:
    """log π(token) for every completion slot of `rows`: [len(rows), T], zero past each completion's end.
    The model runs on the tree-packed batch (grpo_batch.py: each prompt once, no padding; ~30% of the
    padded rectangle's positions; `tree`, when the caller packed `rows` already), and the head only on the
    states that predict completion tokens."""
    if tree is None:
        tree = pack_groups(batch.ids, batch.pad_left, batch.mask, batch.prompt_len, rows)
    if distributed.is_wrapped(model):  # DDP/FSDP hooks run in forward(): the head sees every slot
        logits = model(tree.ids, tree.positions, tree.mask).flatten(0, 1)[tree.source].float()
    else:
        hidden = model.hidden(tree.ids, tree.positions, tree.mask)
        # The head runs on a multiple of HEAD_ROWS states (the rest repeat slot 0): a step's token count is new
        # nearly every step, and oneDNN builds and keeps kernels per shape (memory grew ~10 MB a step).
        n = len(tree.source)
        source = torch.nn.functional.pad(tree.source, (0, -n % HEAD_ROWS))
        logits = model.lm_head(hidden.flatten(0, 1)[source])[:n].float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, tree.targets[:, None]).squeeze(-1)
    return scatter_logprobs(tree, logp)


def update(policy: torch.nn.Module, reference: Transformer | None, optimizer: torch.optim.Optimizer,
           batch, cfg: RunConfig) -> LossParts | None:
    """One rollout's optimiser steps (`grpo.minibatches` of them); None when no group was informative.
    Under torchrun `policy` is the DDP/FSDP module and `batch` this rank's groups: every rank runs the same
    number of minibatches (empty ones backpropagate a zero loss) and the loss is divided by global counts,
    so the all-reduced gradient is the one a single process would compute on the whole batch."""
    gc, device, world = cfg.grpo, batch.ids.device, distributed.world()
    advantages = group_advantages(batch.rewards, gc.group_size, gc.variant)
    keep = torch.arange(len(advantages), device=device)
    if gc.variant == "dapo":  # dynamic sampling: groups whose rewards are all equal teach nothing
        informative = batch.rewards.view(-1, gc.group_size).std(dim=1) > 0
        keep = keep[informative.repeat_interleave(gc.group_size)]
    if not (distributed.sum_all(len(keep))[0] if world > 1 else len(keep)):
        return None
    policy.train()
    with torch.no_grad(), autocast(device, cfg.dtype):
        # With one minibatch the policy has not moved since sampling, so π_old is π_θ detached (ratio 1).
        # A rank with no informative group still runs the policy forward (on a stand-in row): FSDP gathers
        # weights there, and every rank must take part.
        probe = keep if len(keep) or world == 1 else keep.new_zeros(1)
        old = completion_logprobs(policy, batch, probe) if gc.minibatches > 1 else None
        if reference is not None and device.type == "cpu":
            # The reference never trains: on CPU it runs as the engine's frozen copy (fused, prepacked, in
            # bf16 where autocast is on; a third less time), kept until a reset changes its weights.
            fast = torch.bfloat16 if torch.is_autocast_enabled(device.type) else torch.float32
            reference = runner(reference, max(len(keep), 1), fast)
    plain = distributed.unwrap(policy)
    # A model that keeps state across a training forward (DeepSeek's expert loads) runs on one thread.
    threads = 1 if world > 1 or device.type != "cpu" or hasattr(plain, "after_step") else torch.get_num_threads()
    parts = None
    order = torch.arange(len(keep), device=device)
    chunks = order.chunk(gc.minibatches) if world == 1 else order.tensor_split(gc.minibatches)
    for chunk in chunks:
        rows, mask = keep[chunk], batch.mask[keep[chunk]]
        old_c = None if old is None else old[chunk]
        if world > 1:
            local = float(mask.sum() if gc.variant == "dapo" else len(rows))
            if not len(chunk):  # nothing here this minibatch: a zero-weight row keeps the collectives in step
                rows, old_c = torch.zeros(1, dtype=torch.long, device=device), None
            denominator = distributed.sum_all(local)[0]
            if not denominator:
                continue
            denominator /= world  # the gradients are averaged over ranks
        else:  # the minibatch's own count, so that parts of it add up to its mean
            denominator = float(mask.sum().clamp(min=1) if gc.variant == "dapo" else len(rows))
        optimizer.zero_grad(set_to_none=True)
        empty = world > 1 and not len(chunk)
        parts = backward(policy, reference, batch, rows, old_c, advantages, cfg, denominator, threads, empty)
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        if hasattr(plain, "after_step"):  # e.g. DeepSeek-V3's expert balancing
            plain.after_step()
    return parts


def rows_loss(policy: torch.nn.Module, reference: Transformer | None, batch, rows: torch.Tensor,
              old: torch.Tensor | None, advantages: torch.Tensor, cfg: RunConfig, denominator: float,
              empty: bool = False) -> LossParts:
    """The loss of `rows` (reference log-probabilities and all), ready to backpropagate. `empty`: `rows` is a
    stand-in that must weigh nothing."""
    gc, device = cfg.grpo, batch.ids.device
    mask = torch.zeros_like(batch.mask[:1]) if empty else batch.mask[rows]
    tree = pack_groups(batch.ids, batch.pad_left, batch.mask, batch.prompt_len, rows)  # once for both models
    ref = None
    if reference is not None and not empty:
        with torch.no_grad(), autocast(device, cfg.dtype):
            ref = completion_logprobs(reference, batch, rows, tree)
    with autocast(device, cfg.dtype):
        logp = completion_logprobs(policy, batch, rows, tree)
    return grpo_loss(logp, logp.detach() if old is None else old, ref, advantages[rows], mask, gc.variant,
                     gc.eps_low, gc.eps_high, gc.beta, gc.max_new_tokens, denominator)


def backward(policy: torch.nn.Module, reference: Transformer | None, batch, rows: torch.Tensor,
             old: torch.Tensor | None, advantages: torch.Tensor, cfg: RunConfig, denominator: float, threads: int,
             empty: bool = False) -> LossParts:
    """The minibatch's loss, its gradients left in `.grad`: on `threads` Python threads, each with its share of
    the rows (see the module docstring), or on this one; in passes of about `grpo.pass_tokens` completion
    tokens when that is set (each pass's graph is freed before the next: the same gradient, bounded memory).
    Under torchrun every rank must run the same collectives, so there the minibatch runs whole."""
    args = (advantages, cfg, denominator)
    tokens = batch.mask[rows].sum(dim=1)
    limit = cfg.grpo.pass_tokens if distributed.world() == 1 else 0
    passes = -(-int(tokens.sum()) // limit) if limit else 1
    if threads < 2 or len(rows) < 2:
        shares = balanced_shares(tokens, min(max(passes, 1), len(rows)))
        parts = []
        for share in shares:
            part = rows_loss(policy, reference, batch, rows[share], None if old is None else old[share], *args,
                             empty=empty)
            part.loss.backward()
            parts.append(part)
        return parts[0] if len(parts) == 1 else combine(parts)
    shares = balanced_shares(tokens, min(threads * max(passes, 1), len(rows)))
    params = [p for p in policy.parameters() if p.requires_grad]
    grads: list[torch.Tensor | None] = [None] * len(params)
    parts = []
    for first in range(0, len(shares), threads):  # a pass: one share per thread
        for part, share_grads in _threaded_pass(policy, reference, batch, rows, old, shares[first:first + threads],
                                                params, args):
            parts.append(part)
            for i, g in enumerate(share_grads):  # summed in a fixed order: runs repeat bit for bit
                if g is not None:
                    grads[i] = g if grads[i] is None else grads[i] + g
    for p, g in zip(params, grads):
        p.grad = g
    return combine(parts)


def _threaded_pass(policy: torch.nn.Module, reference: Transformer | None, batch, rows: torch.Tensor,
                   old: torch.Tensor | None, shares: list[torch.Tensor], params: list[torch.Tensor],
                   args: tuple) -> list[tuple[LossParts, tuple]]:
    """Each share's loss and gradients, one Python thread (one intra-op thread) per share."""
    results: list = [None] * len(shares)

    def work(i: int) -> None:
        torch.set_num_threads(1)
        try:
            share = shares[i]
            parts = rows_loss(policy, reference, batch, rows[share], None if old is None else old[share], *args)
            results[i] = (parts, torch.autograd.grad(parts.loss, params, allow_unused=True))
        except BaseException as error:  # re-raised on the calling thread
            results[i] = error

    before = torch.get_num_threads()
    workers = [threading.Thread(target=work, args=(i,), name=f"grpo-update-{i}") for i in range(len(shares))]
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        torch.set_num_threads(before)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def balanced_shares(tokens: torch.Tensor, parts: int) -> list[torch.Tensor]:
    """Contiguous runs of row indices (groups stay together, their prompt packed once) with about equal
    completion tokens each: the threads finish together."""
    ends = torch.cumsum(tokens.double() + 1, 0)  # + 1: a row costs something even when short
    targets = ends[-1] * torch.arange(1, parts, dtype=torch.float64) / parts
    cuts = ((ends[None, :] - targets[:, None]).abs().argmin(dim=1) + 1).tolist()  # after the nearest row end
    cuts = sorted({min(max(c, 1), len(tokens) - 1) for c in cuts})  # every share gets at least one row
    return list(torch.arange(len(tokens), device=tokens.device).tensor_split(cuts))


def combine(parts: list[LossParts]) -> LossParts:
    """The diagnostics of a minibatch from those of its shares: losses add up (each divides by the whole's
    count), per-token means are weighted by tokens."""
    tokens = sum(p.tokens for p in parts)
    mean = lambda values: sum(v * p.tokens for v, p in zip(values, parts)) / max(tokens, 1.0)  # noqa: E731
    return LossParts(sum(p.loss.detach() for p in parts), mean([p.kl for p in parts]),
                     mean([p.clipped for p in parts]), tokens)
