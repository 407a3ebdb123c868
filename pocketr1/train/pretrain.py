"""Pretraining: a base model from random weights on the task corpus (next-token prediction only)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pocketr1.config import RunConfig
from pocketr1.errors import UserError
from pocketr1.tasks.corpus import Document
from pocketr1.tokenizer import ChatTokenizer
from pocketr1.train import distributed
from pocketr1.train.common import (
    Metrics,
    StopOnInterrupt,
    autocast,
    load_checkpoint,
    lr_at,
    make_optimizer,
    new_model,
    save_checkpoint,
)


def encode_corpus(docs: list[Document], tok: ChatTokenizer) -> list[tuple[list[int], int]]:
    """Each document as (token ids, prompt length). The prompt is exactly what RL and eval will send."""
    prompts = tok.tok.encode_batch([tok.render([{"role": "user", "content": d.problem.question}]) for d in docs],
                                   add_special_tokens=False)
    completions = tok.tok.encode_batch([d.completion for d in docs], add_special_tokens=False)
    return [(p.ids + c.ids + [tok.eos_id], len(p.ids)) for p, c in zip(prompts, completions)]


@dataclass(slots=True)
class Batch:
    inputs: torch.Tensor  # [rows, seq_len]
    targets: torch.Tensor  # next tokens
    weights: torch.Tensor  # 1 where the loss counts
    positions: torch.Tensor  # restart at 0 for every document
    mask: torch.Tensor  # [rows, 1, seq_len, seq_len]: causal within a document, blind across documents


# A document for the packer: (token ids, loss) where loss is the prompt length (the loss counts on every
# token from there on) or a per-token 0/1 mask over the ids (1: predicting this token counts, e.g. only
# assistant turns in SFT).
Encoded = tuple[list[int], "int | list[int]"]


def pack_batch(encoded: list[Encoded], gen: torch.Generator, rows: int, seq_len: int, pad_id: int,
               loss_on_prompt: bool, device: torch.device) -> Batch:
    """Random documents packed end to end into `rows` rows of `seq_len` tokens: no compute spent on padding.

    Each document keeps its own positions and sees only itself, so packing changes nothing the model can
    learn; it only stops short documents from paying for the longest one in the batch.
    """
    layout: list[list[int]] = [[] for _ in range(rows)]
    row, col = 0, 0
    while row < rows:
        i = int(torch.randint(len(encoded), (1,), generator=gen))
        n = min(len(encoded[i][0]) - 1, seq_len)
        if col + n > seq_len:  # this row is full: close it
            row, col = row + 1, 0
            continue
        layout[row].append(i)
        col += n
    return pack_rows(encoded, layout, seq_len, pad_id, loss_on_prompt, device)


def pack_rows(encoded: list[Encoded], layout: list[list[int]], seq_len: int, pad_id: int, loss_on_prompt: bool,
              device: torch.device) -> Batch:
    """The one packer: row r holds documents `encoded[i] for i in layout[r]`, end to end, each cut to
    `seq_len` tokens (the caller makes them fit); the rest of a row is padding that carries no loss."""
    rows = len(layout)
    inputs = torch.full((rows, seq_len), pad_id, dtype=torch.long)
    targets = torch.full((rows, seq_len), pad_id, dtype=torch.long)
    weights = torch.zeros((rows, seq_len))
    positions = torch.zeros((rows, seq_len), dtype=torch.long)
    doc = torch.full((rows, seq_len), -1, dtype=torch.long)
    n_doc = 0
    for row, chosen in enumerate(layout):
        col = 0
        for i in chosen:
            ids, loss = encoded[i]
            n = min(len(ids) - 1, seq_len)
            if col + n > seq_len:
                raise ValueError(f"row {row} of the layout holds more than {seq_len} tokens.")
            inputs[row, col:col + n] = torch.tensor(ids[:n])
            targets[row, col:col + n] = torch.tensor(ids[1:n + 1])
            if loss_on_prompt:
                weights[row, col:col + n] = 1.0
            elif isinstance(loss, int):
                weights[row, col + loss - 1:col + n] = 1.0  # from the target index of the first completion token
            else:
                weights[row, col:col + n] = torch.tensor(loss[1:n + 1], dtype=torch.float32)
            positions[row, col:col + n] = torch.arange(n)
            doc[row, col:col + n] = n_doc
            col, n_doc = col + n, n_doc + 1
    return Batch(inputs.to(device), targets.to(device), weights.to(device), positions.to(device),
                 document_mask(doc).to(device))


def document_mask(doc: torch.Tensor) -> torch.Tensor:
    """Boolean [rows, 1, T, T] from per-token document numbers [rows, T]: causal within a document, blind
    across documents; every position sees at least itself (padding too, so no row of scores is all -inf)."""
    seq_len = doc.shape[1]
    idx = torch.arange(seq_len, device=doc.device)
    same_doc = doc[:, :, None] == doc[:, None, :]
    mask = (same_doc & (idx[None, :] <= idx[:, None])) | torch.eye(seq_len, dtype=torch.bool, device=doc.device)
    return mask[:, None]


def token_loss(model, batch: Batch, denominator: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy over the tokens that `batch.weights` selects (divided by `denominator` instead of
    their count when given: a rank's part of the mean over the whole global batch)."""
    logits = model(batch.inputs, batch.positions, batch.mask)
    losses = F.cross_entropy(logits.flatten(0, 1).float(), batch.targets.flatten(), reduction="none")
    denominator = batch.weights.sum().clamp(min=1) if denominator is None else denominator
    return (losses * batch.weights.flatten()).sum() / denominator


def train_step(model, optimizer: torch.optim.Optimizer, batch: Batch, denominator: torch.Tensor | None, lr: float,
               dtype: str) -> torch.Tensor:
    """One optimiser step on `batch` at learning rate `lr` (gradients clipped to norm 1); its loss, detached.
    The step of pretraining and of SFT alike: they differ only in which tokens `batch.weights` selects."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast(batch.inputs.device, dtype):
        loss = token_loss(model, batch, denominator)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    return loss.detach()


def rank_rows(batch: Batch, rows: range) -> Batch:
    """This rank's rows of the global batch (every rank packs the same global batch, then keeps its part)."""
    part = slice(rows.start, rows.stop)
    return Batch(batch.inputs[part], batch.targets[part], batch.weights[part], batch.positions[part],
                 batch.mask[part])


def pretrain(cfg: RunConfig, run_dir: Path, tok: ChatTokenizer, docs: list[Document], device: torch.device,
             metrics: Metrics, fsdp: bool = False):
    """Train until `cfg.pretrain.steps`, resuming from the stage checkpoint if there is one. Under torchrun
    each rank trains on its rows of the same global batch of `pretrain.rows` rows (DDP, or FSDP2)."""
    pc = cfg.pretrain
    world = distributed.world()
    if pc.rows < world:
        raise UserError(f"pretrain.rows={pc.rows} cannot be split over {world} processes; use at least {world}.")
    ckpt_dir = run_dir / "pretrain" / "checkpoint"
    factory = lambda m: make_optimizer(m, pc.lr, pc.weight_decay)  # noqa: E731
    loaded = load_checkpoint(ckpt_dir, factory, device)
    if loaded:
        model, optimizer, progress = loaded
        start = progress["step"]
    else:
        model = new_model(cfg.model, cfg.seed, device)
        optimizer, start = factory(model), 0
    plain = model
    model, optimizer = distributed.prepare(model, optimizer, factory, fsdp)
    my_rows = distributed.shard(pc.rows)
    metrics.truncate("pretrain", start)
    encoded = encode_corpus(docs, tok)
    model.train()
    bar = tqdm(range(start, pc.steps), initial=start, total=pc.steps, desc="pretrain", unit="step",
               dynamic_ncols=True, disable=not distributed.is_main())
    tokens, t0 = 0, time.perf_counter()
    stop = StopOnInterrupt()
    for step in stop.steps(bar):
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)  # the same batches after a resume
        batch = pack_batch(encoded, gen, pc.rows, pc.seq_len, tok.pad_id, pc.loss_on_prompt, device)
        lr = lr_at(step, pc.steps, pc.lr, pc.warmup)
        denominator = None
        if world > 1:
            # The mean over every loss token of the global batch: DDP/FSDP average gradients over ranks, so
            # each rank's sum is scaled by world / (global token count) to give one process's gradient.
            denominator = batch.weights.sum().clamp(min=1) / world
            batch = rank_rows(batch, my_rows)
        loss = train_step(model, optimizer, batch, denominator, lr, cfg.dtype)
        if hasattr(plain, "after_step"):  # e.g. DeepSeek-V3's expert balancing
            plain.after_step()
        tokens += pc.rows * pc.seq_len  # the global batch: tokens/s of the whole job
        if (step + 1) % pc.log_every == 0 or step + 1 == pc.steps:
            if world > 1:
                loss = torch.tensor(distributed.sum_all(loss.item())[0] / world)  # the global batch's mean
            rate = tokens / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{rate:,.0f}")
            metrics.log("pretrain", step + 1, loss=round(loss.item(), 4), lr=lr, tokens_per_s=round(rate))
        stopping = stop.requested()  # Ctrl-C: save this step, then leave
        if stopping or (step + 1) % pc.checkpoint_every == 0 and step + 1 < pc.steps:
            save_checkpoint(ckpt_dir, model, optimizer, {"step": step + 1})
        if stopping:
            stop.exit(f"pretrain step {step + 1}")
    bar.close()
    if world > 1:  # every rank takes part in the gather; the caller saves on rank 0
        return distributed.plain_copy(model, new_model(cfg.model, cfg.seed, device) if fsdp else plain).eval()
    return model.eval()
