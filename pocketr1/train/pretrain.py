"""Pretraining: a base model from random weights on the task corpus (next-token prediction only)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pocketr1.config import RunConfig
from pocketr1.tasks.corpus import Document
from pocketr1.tokenizer import ChatTokenizer
from pocketr1.train.common import (Metrics, load_checkpoint, lr_at, make_optimizer, new_model, save_checkpoint)


def encode_corpus(docs: list[Document], tok: ChatTokenizer) -> list[tuple[list[int], int]]:
    """Each document as (token ids, prompt length). The prompt is exactly what RL and eval will send."""
    prompts = tok.tok.encode_batch([tok.render([{"role": "user", "content": d.problem.question}]) for d in docs],
                                   add_special_tokens=False)
    completions = tok.tok.encode_batch([d.completion for d in docs], add_special_tokens=False)
    return [(p.ids + c.ids + [tok.eos_id], len(p.ids)) for p, c in zip(prompts, completions)]


def make_batch(encoded: list[tuple[list[int], int]], rows: list[int], pad_id: int, loss_on_prompt: bool,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded inputs, next-token targets and a 0/1 loss mask."""
    length = max(len(encoded[i][0]) for i in rows) - 1
    inputs = torch.full((len(rows), length), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), length), pad_id, dtype=torch.long)
    weights = torch.zeros((len(rows), length))
    for r, i in enumerate(rows):
        ids, prompt_len = encoded[i]
        n = len(ids) - 1
        inputs[r, :n] = torch.tensor(ids[:-1])
        targets[r, :n] = torch.tensor(ids[1:])
        first = 0 if loss_on_prompt else prompt_len - 1  # target index of the first completion token
        weights[r, first:n] = 1.0
    return inputs.to(device), targets.to(device), weights.to(device)


def token_loss(model, inputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the tokens that `weights` selects."""
    positions = torch.arange(inputs.shape[1], device=inputs.device).expand_as(inputs)
    logits = model(inputs, positions, None)
    losses = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    return (losses * weights.flatten()).sum() / weights.sum().clamp(min=1)


def pretrain(cfg: RunConfig, run_dir: Path, tok: ChatTokenizer, docs: list[Document], device: torch.device,
             metrics: Metrics):
    """Train until `cfg.pretrain.steps`, resuming from the stage checkpoint if there is one."""
    pc = cfg.pretrain
    ckpt_dir = run_dir / "pretrain" / "checkpoint"
    factory = lambda m: make_optimizer(m, pc.lr, pc.weight_decay)  # noqa: E731
    loaded = load_checkpoint(ckpt_dir, factory, device)
    if loaded:
        model, optimizer, progress = loaded
        start = progress["step"]
    else:
        model = new_model(cfg.model, cfg.seed, device)
        optimizer, start = factory(model), 0
    metrics.truncate("pretrain", start)
    encoded = encode_corpus(docs, tok)
    model.train()
    bar = tqdm(range(start, pc.steps), initial=start, total=pc.steps, desc="pretrain", unit="step",
               dynamic_ncols=True)
    tokens, t0 = 0, time.perf_counter()
    for step in bar:
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)  # the same batches after a resume
        rows = torch.randint(len(encoded), (pc.batch_size,), generator=gen).tolist()
        inputs, targets, weights = make_batch(encoded, rows, tok.pad_id, pc.loss_on_prompt, device)
        lr = lr_at(step, pc.steps, pc.lr, pc.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = token_loss(model, inputs, targets, weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        tokens += inputs.numel()
        if (step + 1) % pc.log_every == 0 or step + 1 == pc.steps:
            rate = tokens / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{rate:,.0f}")
            metrics.log("pretrain", step + 1, loss=round(loss.item(), 4), lr=lr, tokens_per_s=round(rate))
        if (step + 1) % pc.checkpoint_every == 0 and step + 1 < pc.steps:
            save_checkpoint(ckpt_dir, model, optimizer, {"step": step + 1})
    bar.close()
    return model.eval()
